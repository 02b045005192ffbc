"""Counter-based random streams: a rule's ``drop`` and ``noise`` draws as a pure function.

A stochastic rule draws random numbers at every step. So that its score depends only on
the task and the rule -- not on the batch it came in, its row in the batch, the backend or
the number of rules in flight -- every draw is a fixed function of four integers:

    value = f(stream seed, step, draw site, element index)

- **stream seed**: one per (task seed, rule, draw): ``stream_seed(task_seed, canonical_key, draw)``;
- **step**: the optimizer's step count t = 1, 2, ... (state that both executors keep and resume);
- **draw site**: which ``drop``/``noise`` token of the rule is drawing; numbered on the
  rule's canonical form, so that equivalent programs draw the same numbers
  (``nos_gym.engine.step_plan.draw_sites``);
- **element index**: the position of the entry in the rule's flat parameter vector (a
  column of a ``BatchedRule`` row; for ``NOSOptimizer``, the offset over its parameters in
  order, see ``nos_gym.optim``).

Nothing is carried from step to step: no generator state to save, split or advance, and
the numbers of step t can be computed before, after or without those of step t - 1.

**The generator** is splitmix64 (Steele, Lea and Flood 2014, with Stafford's "variant 13"
finalizer, as in Java's ``SplittableRandom``) used as a hash:
``H(k, c) = mix64(k + (c + 1) * GAMMA)`` is output c of the splitmix64 stream with state k
(``GAMMA = 0x9E3779B97F4A7C15``). Three levels:

    site key   K_s  = H(seed, site)
    step key   K_st = H(K_s, step)
    bits       X    = H(K_st, element index)      (64 bits per element)

The keys are a handful of numbers per step; the last level is one hash per element, 11
int64 tensor ops (shift, mask, xor, multiply; torch's ``>>`` on int64 is arithmetic, so
each shift is masked, and multiplication wraps modulo 2^64, as intended).

- ``uniform``: the top 24 bits of X times 2^-24, a float32 on the grid {0, 2^-24, ..., 1 - 2^-24};
  ``drop(x, p)`` zeroes an entry when ``uniform < p`` (p as float32); ``uniform53``: the
  top 53 bits, a float64.
- ``normal``: Box-Muller, ``sqrt(-2 ln u1) * cos(2 pi u2)``, from two 24-bit fields of X
  (u1 in (0, 1], so |z| <= 5.77), in float32. ``ln`` and ``cos`` are evaluated here by
  polynomials with ``+ - * /`` and ``sqrt`` only, so a value never depends on where in a
  tensor it was computed (torch's own ``log``/``cos`` round differently in the SIMD body
  and the scalar tail of a loop, and between CPU kernel sets). ``+ - * /`` are exactly
  rounded everywhere; torch's CPU ``sqrt`` is *not*: measured on a 2-core AMD EPYC (torch
  2.14.1), 15.7% of float32 results are 1 ulp off the IEEE value, the same under every
  ``ATEN_CPU_CAPABILITY`` and at every position in a tensor (so a value is the same in any
  batch on that machine), but it may round differently on another CPU. The native
  Rosenbrock kernel (``nos_gym/engine/csrc``) follows these operations with IEEE ``sqrt``, so its
  normals can differ from these in the last bit. ``noise`` is ``normal * noise_std``.

Everything here is vectorised: a whole block of (steps, draw rows, elements) is one
sequence of about 16 (uniform) or 60 (normal) elementwise ops, whatever its size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GAMMA", "counters", "hash64", "mix64", "normal", "random_bits", "site_keys", "step_keys",
           "stream_seed", "uniform", "uniform53"]

_U64 = (1 << 64) - 1
#: the splitmix64 increment (the golden ratio times 2^64, odd)
GAMMA = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SHIFTS = ((30, _C1), (27, _C2), (31, None))


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    x &= _U64
    return x - (1 << 64) if x >> 63 else x


# ------------------------------------------------------------------- plain integers
def mix64(x: int) -> int:
    """splitmix64's finalizer on a 64-bit pattern (returned in [0, 2^64))."""
    x &= _U64
    for shift, mult in _SHIFTS:
        x ^= x >> shift
        if mult is not None:
            x = (x * mult) & _U64
    return x


def hash64(key: int, counter: int) -> int:
    """``H(key, counter)``: output ``counter`` of the splitmix64 stream with state ``key``, in [0, 2^64)."""
    return mix64(key + (counter + 1) * GAMMA)


def stream_seed(task_seed: int, key: str, draw: int = 0) -> int:
    """The stream seed of draw ``draw`` of the rule with canonical key ``key`` under ``task_seed``.

    ``H(H(H(task_seed, 0), sha256(key)), draw)``, as an int64: any task seed, any rule
    and any draw index give unrelated streams.
    """
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return _signed(hash64(hash64(hash64(int(task_seed), 0), digest), int(draw)))


# --------------------------------------------------------------------------- tensors
def _mix_(z: Tensor, tmp: Tensor) -> Tensor:
    """``mix64`` in place on an int64 tensor (``tmp``: scratch of the same shape)."""
    for shift, mult in _SHIFTS:
        torch.bitwise_right_shift(z, shift, out=tmp)
        tmp.bitwise_and_((1 << (64 - shift)) - 1)  # a logical shift: drop the copied sign bits
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(_signed(mult))  # wraps modulo 2^64
    return z


def site_keys(seeds: Sequence[int], sites: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """``K_s = H(seed, site)`` for pairs of stream seeds and draw sites: an int64 tensor."""
    return torch.tensor([_signed(hash64(int(s), int(site))) for s, site in zip(seeds, sites, strict=True)],
                        dtype=torch.int64, device=device)


def step_keys(keys: Tensor, steps: Tensor) -> Tensor:
    """``K_st = H(K_s, step)``: shape ``steps.shape + keys.shape``."""
    z = (steps.to(torch.int64) + 1).mul_(_signed(GAMMA)).view(*steps.shape, *([1] * keys.dim())) + keys
    return _mix_(z, torch.empty_like(z))


def counters(index: Tensor) -> Tensor:
    """``(index + 1) * GAMMA``: the element indices as ``random_bits`` adds them to a key."""
    return (index.to(torch.int64) + 1).mul_(_signed(GAMMA))


def random_bits(keys: Tensor, index: Tensor | None = None, out: Tensor | None = None, tmp: Tensor | None = None,
                *, counted: Tensor | None = None) -> Tensor:
    """``X = H(key, index)`` for every key (any shape K) and element index (shape I): shape K + I, int64.

    ``out``/``tmp``: int64 buffers of that shape to use; ``counted``: ``counters(index)``
    instead of ``index``, if the caller keeps it (then nothing is allocated).
    """
    if (index is None) == (counted is None):
        raise ValueError("random_bits takes the element indices or their counters, one of the two")
    c = counters(index) if counted is None else counted
    z = torch.add(keys.view(*keys.shape, *([1] * c.dim())), c, out=out)
    return _mix_(z, torch.empty_like(z) if tmp is None else tmp)


def uniform(bits: Tensor) -> Tensor:
    """float32 uniforms in [0, 1) on the grid of 2^-24: the top 24 bits of ``bits``."""
    top = torch.bitwise_right_shift(bits, 40).bitwise_and_((1 << 24) - 1)
    return top.to(torch.float32).mul_(2.0 ** -24)


def uniform53(bits: Tensor) -> Tensor:
    """float64 uniforms in [0, 1) on the grid of 2^-53: the top 53 bits of ``bits``."""
    top = torch.bitwise_right_shift(bits, 11).bitwise_and_((1 << 53) - 1)
    return top.to(torch.float64).mul_(2.0 ** -53)


# Both series stop where the next term is below float32's resolution (2^-24 = 6e-8):
# ln(m) = s * sum_k 2 s^(2k) / (2k + 1), s = (m - 1) / (m + 1), for m in [sqrt(1/2), sqrt(2)):
# |s| <= 0.1716, and the first term left out is below 3e-9 of the sum
_LOG_COEFFS = tuple(2.0 / (2 * k + 1) for k in range(5))
# cos(b) = sum_k (-1)^k b^(2k) / (2k)! on [0, pi/2]: the first term left out is below 7e-9
_COS_COEFFS = tuple((-1) ** k / math.factorial(2 * k) for k in range(7))
_LN2 = math.log(2.0)
_SQRT_HALF = math.sqrt(0.5)


def _horner(x: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """``sum_k coeffs[k] x^k`` by Horner's rule: one multiply and one add per coefficient."""
    acc = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc.mul_(x).add_(c)
    return acc


def normal(bits: Tensor, std: float = 1.0) -> Tensor:
    """float32 N(0, std^2) values from ``bits`` (one per element): Box-Muller, see the module doc."""
    # radius: sqrt(-2 ln u1), u1 = (a + 1) 2^-24 in (0, 1]; ln by frexp and an atanh series
    a = torch.bitwise_right_shift(bits, 40).bitwise_and_((1 << 24) - 1).add_(1).to(torch.float32)
    m, e = torch.frexp(a)                      # a = m 2^e, m in [1/2, 1): exact
    small = m < _SQRT_HALF
    m = torch.where(small, m * 2.0, m)         # m in [sqrt(1/2), sqrt(2))
    e = e.to(torch.float32).sub_(small.to(torch.float32)).sub_(24.0)  # u1 = m 2^e
    s = (m - 1.0).div_(m + 1.0)
    log_u = _horner(s * s, _LOG_COEFFS).mul_(s).add_(e.mul_(_LN2))
    radius = log_u.mul_(-2.0).sqrt_()
    # angle: cos(2 pi u2) has the law of +-cos(b), b uniform in [0, pi/2), the sign a fair coin
    b = torch.bitwise_right_shift(bits, 16).bitwise_and_((1 << 24) - 1)
    sign = b.bitwise_and(1).to(torch.float32).mul_(-2.0).add_(1.0)  # +1 or -1
    angle = torch.bitwise_right_shift(b, 1).to(torch.float32).add_(0.5).mul_(math.pi / 2 / 2 ** 23)
    cos = _horner(angle.mul_(angle), _COS_COEFFS)
    return radius.mul_(cos).mul_(sign).mul_(std)
