"""Fused optimizer steps: a rule's whole per-parameter update as one compiled kernel.

``NOSOptimizer``'s foreach path runs a rule as about one ``torch._foreach_*`` kernel per
token, each a full pass over the parameters in memory. Here the whole step of one
parameter tensor -- the running averages, every operand, unary and binary of the rule,
the ``drop`` masks and ``w <- w - lr * d`` -- is one Python function generated from the
rule's tokens (``rule_source``), compiled by ``torch.compile`` (inductor: C++/OpenMP on
CPU, Triton on CUDA) into one loop that reads g, w and the averages once and writes w
and the averages once.

- **One compile per rule** (and per dtype and device): every parameter is passed
  flattened to 1-D with dynamic shapes (``dynamic=True``), so one kernel serves all
  parameter sizes; per-step numbers (the learning rate, the bias corrections, the sign
  decay, the random draws' step keys) are tensor inputs, so nothing recompiles as
  training goes on. Each rule gets its own generated code object, so rules never evict
  each other from dynamo's cache. A compile costs seconds (inductor's start-up and a C++
  build; far less from inductor's on-disk cache), then each step a small call overhead per
  parameter tensor: docs/results.md ("The rule engine"). The kernels follow ``torch.set_num_threads``
  at run time (``cpp.dynamic_threads``).
- **Draws**: ``drop``'s uniforms are computed inside the kernel from the same splitmix64
  hash as ``nos_gym.engine.random_streams`` (bit-exact: integer ops and one int->float
  conversion). ``noise`` is not: its Box-Muller polynomial is rounded differently once
  inductor fuses it (1 ulp), so the normals are computed outside with the existing
  vectorised generator (``Draws.noise``) and passed in.
- **Fallback**: where compiling fails (no C++ compiler, an unsupported platform or Python),
  the first use catches the error -- on small dummy tensors, before any real state is
  touched -- warns once (``FusedUnavailableWarning``) and every later request returns
  ``None``: the caller runs its foreach path.
- Tensors that are not contiguous, or have fewer than 64 entries, run the same generated
  function eagerly (no compile), so the compiled graph stays one.
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from nos_gym.dsl.program import Program
from nos_gym.dsl.vocabulary import CLIP_LEVELS, DROP_RATES, GROUP_SIZE, WEIGHT_SCALES, is_result_operand, result_index
from nos_gym.engine.random_streams import GAMMA, hash64
from nos_gym.engine.step_plan import draw_sites, needed_averages

__all__ = ["FUSED_MIN_NUMEL", "FusedStep", "FusedUnavailableWarning", "addsign_step", "available", "powersign_step",
           "rule_source", "rule_step", "step_keys", "use_fused"]

#: ``fused=None`` uses the fused path when an optimizer holds at least this many entries
#: (see ``NOSOptimizer``): below it a foreach step costs well under a millisecond and a
#: compile of seconds does not pay back within a short run.
FUSED_MIN_NUMEL = 1 << 20


# The compiled graph's sizes are dynamic; dynamo still specialises sizes 0 and 1, and sizes that
# equal another input's (duck sizing: ``s`` has 4 entries, ``ints`` 1 + the drop sites). So the
# probe compiles with an odd size no small input has, and tensors below _MIN_COMPILED entries
# run the generated function eagerly: one graph serves every parameter.
_PROBE = 67
_MIN_COMPILED = 64


class FusedUnavailableWarning(RuntimeWarning):
    """torch.compile could not build a fused step here; the foreach path runs instead."""


_lock = threading.Lock()
_unavailable: str | None = None  # why compiling failed, once it has
_cache: dict[Any, FusedStep] = {}


def _signed(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >> 63 else x


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _isolate_inductor_cache() -> None:
    """One inductor disk cache per forced ATen kernel set.

    inductor's cache key does not include ``ATEN_CPU_CAPABILITY``: a kernel compiled in a
    process with the native (AVX-512) kernels and loaded from the cache by a process run with
    ``ATEN_CPU_CAPABILITY=avx2`` computed a wrong step (SGD off by 7e-4 relative at step 0);
    compiled afresh under avx2 it was right. So a process that forces a kernel set, and sets no
    cache folder of its own, gets a folder of its own. Called when this module is imported:
    parts of inductor read the folder when they are first imported, which a first compile does."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if cap and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}-aten-{cap}"


_isolate_inductor_cache()


def _compile(fn: Callable) -> Callable:
    """``torch.compile`` of one generated step (a seam: tests make it fail)."""
    # dynamic_threads: the kernel follows torch.set_num_threads at run time (else fixed at compile)
    return torch.compile(fn, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})


def available() -> bool:
    """False once a compile has failed in this process (the fused path is then off)."""
    return _unavailable is None


def _mark_unavailable(err: BaseException) -> None:
    global _unavailable
    if _unavailable is None:
        _unavailable = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        warnings.warn(f"nos_gym: fused optimizer steps unavailable ({_unavailable[:200]}); "
                      "using the foreach path", FusedUnavailableWarning, stacklevel=4)


# --------------------------------------------------------------------------- codegen
_HASH = f"""\
def _bits(key, idx):
    z = key + (idx + 1) * {_signed(GAMMA)}
    z = z ^ ((z >> 30) & {(1 << 34) - 1})
    z = z * {_signed(0xBF58476D1CE4E5B9)}
    z = z ^ ((z >> 27) & {(1 << 37) - 1})
    z = z * {_signed(0x94D049BB133111EB)}
    return z ^ ((z >> 31) & {(1 << 33) - 1})
"""


def rule_source(program: Program, hyper) -> tuple[str, list[int], list[int]]:
    """Python source of ``program``'s fused step on one tensor, and its drop and noise sites.

    ``step(p, g, m, v, y, s, ints, noise)``: updates the averages and ``p`` in place.
    ``s`` (``p``'s dtype): ``[lr, m's bias-correction divisor, v's, y's]``; ``ints``
    (int64): ``[element index of p's first entry, step key of each drop site...]``;
    ``noise``: one tensor per noise site, like ``p``. The arithmetic is ``apply_rule``'s,
    op for op (``nos_gym.engine.rules``).
    """
    sites = draw_sites(program)
    drop_sites: list[int] = []
    noise_sites: list[int] = []
    needs = needed_averages([program])
    body: list[str] = []
    emit = body.append
    h = hyper
    if "m" in needs:
        emit(f"m.lerp_(g, {1.0 - h.beta1!r})")
    if "v" in needs:
        emit(f"v.mul_({h.beta2!r}).addcmul_(g, g, value={1.0 - h.beta2!r})")
    if "y" in needs:
        emit(f"y.mul_({h.beta3!r}).add_(g * g * g, alpha={1.0 - h.beta3!r})")
    defined: set[str] = set()

    def base(name: str) -> str:
        var = "x_" + "".join(ch if ch.isalnum() else "_" for ch in name)  # w1e-3 -> x_w1e_3
        if var in defined:
            return var
        bc = h.bias_correction
        if name == "mh":
            expr = "m / s[1]" if bc else "m"
        elif name == "vh":
            expr = "v / s[2]" if bc else "v"
        elif name == "yh":
            expr = "y / s[3]" if bc else "y"
        elif name == "den":
            expr = f"torch.sqrt({base('vh')}) + {h.eps!r}"
        elif name == "g2":
            expr = "g * g"
        elif name == "g3":
            expr = "g * g * g"
        elif name == "sign_g":
            expr = "torch.sign(g)"
        elif name == "sign_m":
            expr = "torch.sign(m)"
        elif name == "one":
            expr = "torch.ones_like(g)"
        elif name in WEIGHT_SCALES:
            expr = f"p * {WEIGHT_SCALES[name]!r}"
        elif name == "adam":
            expr = f"{base('mh')} / {base('den')}"
        elif name == "rmsprop":
            expr = f"g / {base('den')}"
        else:
            raise KeyError(f"unknown operand {name!r}")
        emit(f"{var} = {expr}")
        defined.add(var)
        return var

    alias = {"g": "g", "m": "mh", "v": "vh", "y": "yh"}

    def side(op: str, unary: str, position: int) -> str:
        if is_result_operand(op):
            x = f"r{result_index(op)}"
        elif op == "noise":
            noise_sites.append(sites[position])
            x = f"noise[{len(noise_sites) - 1}]"
        elif op in alias:
            x = alias[op] if op == "g" else base(alias[op])
        else:
            x = base(op)
        if unary == "id":
            return x
        if unary == "neg":
            return f"(-{x})"
        if unary == "exp":
            return f"torch.exp({x})"
        if unary == "log_abs":
            return f"torch.log(torch.abs({x}))"
        if unary == "sign":
            return f"torch.sign({x})"
        if unary == "sqrt_abs":
            return f"torch.sqrt(torch.abs({x}))"
        if unary in CLIP_LEVELS:
            lv = CLIP_LEVELS[unary]
            return f"torch.clamp({x}, {-lv!r}, {lv!r})"
        if unary in DROP_RATES:
            drop_sites.append(sites[position + 2])
            k = len(drop_sites)
            if k == 1:  # the element index of every entry
                emit("idx = torch.arange(g.numel(), device=g.device, dtype=torch.int64).view(g.shape) + ints[0]")
            emit(f"u{k} = (((_bits(ints[{k}], idx) >> 40) & {(1 << 24) - 1}).to(torch.float32) * {2.0 ** -24!r})")
            return f"torch.where(u{k} < {_f32(DROP_RATES[unary])!r}, 0.0, {x})"
        raise KeyError(f"unknown unary {unary!r}")

    for k, (op1, op2, u1, u2, b) in enumerate(program.groups):
        a = side(op1, u1, GROUP_SIZE * k)
        if b == "keep":
            expr = a
        else:
            c = side(op2, u2, GROUP_SIZE * k + 1)
            expr = {"add": f"{a} + {c}", "sub": f"{a} - {c}", "mul": f"{a} * {c}",
                    "div": f"{a} / ({c} + {h.eps!r})"}[b]
        emit(f"r{k + 1} = {expr}")
    emit(f"p.sub_(s[0] * r{len(program.groups)})")
    head = "def step(p, g, m, v, y, s, ints, noise):\n"
    src = (_HASH if drop_sites else "") + head + "".join(f"    {line}\n" for line in body)
    return src, drop_sites, noise_sites


def _build(src: str, name: str) -> Callable:
    namespace: dict[str, Any] = {"torch": torch}
    exec(compile(src, f"<nos_gym.engine.fused {name}>", "exec"), namespace)  # noqa: S102 -- our own generated code
    return namespace["step"]


# ------------------------------------------------------------------ the sign optimizers
# s = [lr, 1 - beta, scale of sign(g) sign(m) (decay; times ln(base) for PowerSign), alpha]
def _powersign(p, g, m, v, y, s, ints, noise):
    m.lerp_(g, s[1])
    p.sub_(s[0] * (torch.exp(torch.sign(g) * torch.sign(m) * s[2]) * g))


def _addsign(p, g, m, v, y, s, ints, noise):
    m.lerp_(g, s[1])
    p.sub_(s[0] * ((torch.sign(g) * torch.sign(m) * s[2] + s[3]) * g))


# ---------------------------------------------------------------------------- the step
class FusedStep:
    """A compiled per-tensor step (``fn``, the generated Python; compiled lazily by ``ready``); ``run`` applies it to lists of tensors."""

    def __init__(self, fn: Callable, name: str, drop_sites: list[int] = (), noise_sites: list[int] = ()):
        self.fn, self.name = fn, name
        self.drop_sites, self.noise_sites = list(drop_sites), list(noise_sites)
        self._compiled: Callable | None = None
        self._ready: set[tuple[torch.dtype, torch.device]] = set()

    def ready(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Compile for (dtype, device) if not yet done, on dummies; False if that fails."""
        if (dtype, device) in self._ready:
            return True
        if _unavailable is not None:
            return False
        with _lock:
            try:
                if self._compiled is None:
                    self._compiled = _compile(self.fn)
                z = [torch.zeros(_PROBE, dtype=dtype, device=device) for _ in range(5)]
                s = torch.ones(4, dtype=dtype, device=device)
                ints = (torch.zeros(1 + len(self.drop_sites), dtype=torch.int64, device=device)
                        if self.drop_sites else None)
                noise = [torch.zeros(_PROBE, dtype=dtype, device=device) for _ in self.noise_sites]
                with torch.no_grad():
                    self._compiled(*z, s, ints, noise)
            except Exception as err:  # no compiler, unsupported platform, ...: fall back
                _mark_unavailable(err)
                return False
            self._ready.add((dtype, device))
        return True

    def run(self, params: list[Tensor], grads: list[Tensor], avgs: dict[str, list[Tensor]], scalars: list[float],
            offsets: list[int] | None = None, step_keys: list[int] = (), noise: Callable | None = None) -> None:
        """One step over the tensors (all ready); ``noise(k, site)``: tensor k's normals at a site."""
        none = [None] * len(params)
        ms, vs, ys = avgs.get("m", none), avgs.get("v", none), avgs.get("y", none)
        svec: dict[tuple, Tensor] = {}
        for k, (p, g, m, v, y) in enumerate(zip(params, grads, ms, vs, ys)):
            key = (p.dtype, p.device)
            s = svec.get(key)
            if s is None:
                s = svec[key] = torch.tensor(scalars, dtype=p.dtype, device=p.device)
            ints = (torch.tensor([offsets[k], *step_keys], dtype=torch.int64, device=p.device)
                    if self.drop_sites else None)
            nz = [noise(k, site) for site in self.noise_sites] if self.noise_sites else []
            group = [p, g, m, v, y, *nz]
            if p.numel() >= _MIN_COMPILED and all(t is None or t.is_contiguous() for t in group):
                flat = [None if t is None else _flat(t) for t in group]
                self._compiled(*flat[:5], s, ints, flat[5:])
            else:
                self.fn(p, g, m, v, y, s, ints, nz)


def _flat(t: Tensor) -> Tensor:
    """A contiguous tensor as a 1-D alias of its memory: no autograd base, no requires_grad.

    So every parameter meets the compiled graph in one form (``view(-1)`` would carry
    the parameter's rank and requires_grad into dynamo's guards: a recompile per rank).
    """
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(),
                                                                (t.numel(),), (1,))


def _cached(key: Any, make: Callable[[], FusedStep]) -> FusedStep:
    with _lock:
        step = _cache.get(key)
        if step is None:
            step = _cache[key] = make()
    return step


def rule_step(program: Program, hyper) -> FusedStep:
    """The fused step of ``program`` under ``hyper`` (built once per process, then shared)."""
    def make():
        src, drops, noises = rule_source(program, hyper)
        return FusedStep(_build(src, str(program)), str(program), drops, noises)
    return _cached(("rule", program.tokens, hyper), make)


def powersign_step() -> FusedStep:
    return _cached(("powersign",), lambda: FusedStep(_powersign, "powersign"))


def addsign_step() -> FusedStep:
    return _cached(("addsign",), lambda: FusedStep(_addsign, "addsign"))


def step_keys(seed: int, step: int, sites: list[int]) -> list[int]:
    """The step key ``H(H(seed, site), step)`` of each site, as int64 values."""
    return [_signed(hash64(hash64(seed, site), step)) for site in sites]


def use_fused(fused: bool | None, params: list[Tensor]) -> bool:
    """Whether an optimizer asked for ``fused`` should try the fused path (see ``NOSOptimizer``)."""
    if fused is False or _unavailable is not None:
        return False
    if fused is None:
        return (sum(p.numel() for p in params) >= FUSED_MIN_NUMEL
                and all(p.device.type in ("cpu", "cuda") for p in params))
    return True

