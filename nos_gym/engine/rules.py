"""Compile programs into elementwise updates: one rule, or a batch of different rules at once.

The split follows optax: ``rule.init(params)`` makes the state (running averages and the
step count), ``rule.update(state, grad, params)`` returns the update direction ``d`` and
the state one step on, as new tensors: the state passed in is left as it was (so a
caller may keep it, e.g. to retry a step). The caller applies ``w <- w - lr * d``.

The language's primitives are defined once, below, on lists of tensors with
``torch._foreach_*`` kernels: ``Inputs.get`` computes operands, ``UNARY_FUNCTIONS`` and
``BINARY_FUNCTIONS`` apply functions in place (the dsl's ``UNARY``/``BINARY`` map the same
names to paper notation). Two executors use them:

- ``apply_rule`` runs one program over a list of parameter tensors (``NOSOptimizer``);
- ``BatchedRule`` runs B different programs on parameters stacked on a leading axis of size
  B (row i is trained by program i), with no Python loop over the rules: per step, one
  "bank" of every base operand any row reads, then per group one gather (both sides of
  every row, ordered by unary), one call per unary token, one gather into the binary's
  order and one call per binary token. A step costs a fixed number of kernels per
  distinct token, whatever B is. What runs where is a ``Plan`` (``nos_gym.engine.step_plan``,
  built from the programs' tokens alone); ``BatchedRule`` binds it to tensors and runs it.
  ``BatchedRule(fused=...)`` can instead run each step as one compiled kernel that reads
  the rules' tokens as per-row opcodes (``nos_gym.engine.fused_batched``).

Operand definitions (section 4.1, hyperparameters of section 4.2):

- ``m, v, y``: ``m = beta1 m + (1 - beta1) g`` (likewise v from g^2, y from g^3), divided
  by ``1 - beta^t`` when ``Hyper.bias_correction`` (the default, the paper's hats);
- ``ADAM = m / (sqrt(v) + eps)``, ``RMSProp = g / (sqrt(v) + eps)``;
- ``noise``: fresh N(0, ``Hyper.noise_std``^2) each step and each read; ``drop(x, p)``:
  zero each entry with probability p (no rescaling; an inf entry too). Both come from the
  rule's own counter-based stream (``nos_gym.engine.random_streams``): the value at step t, draw
  site s (``nos_gym.engine.step_plan.draw_sites``) and element i is a fixed function of (the rule's
  stream seed, t, s, i), so both executors, every batch and every position in it draw the
  same numbers for a rule. The element index is the column of a ``BatchedRule`` row, and
  for ``apply_rule`` over a list of tensors the offset of the entry in the tensors laid end
  to end (``Draws``);
- ``x / y`` is ``x / (y + eps)``; ``clip(x, l)`` clamps to [-l, l]; ``log|x|``, ``sqrt|x|``.

Non-finite values are never an error here: they are returned and the caller decides.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nos_gym.dsl.program import Program
from nos_gym.dsl.vocabulary import (
    BETA1,
    BETA2,
    BETA3,
    CLIP_LEVELS,
    COMMUTATIVE,
    DROP_RATES,
    EPS,
    GROUP_SIZE,
    NOISE_STD,
    SEMANTICS_VERSION,  # re-exported: the version of the semantics defined here
    WEIGHT_SCALES,
    is_result_operand,
    result_index,
)
from nos_gym.engine import fused as _fused
from nos_gym.engine.random_streams import (
    counters,
    hash64,
    normal,
    random_bits,
    site_keys,
    step_keys,
    stream_seed,
    uniform,
)
from nos_gym.engine.step_plan import FAMILIES, Draw, Plan, build_plan, draw_sites, needed_averages, pad_program

__all__ = ["BINARY_FUNCTIONS", "SEMANTICS_VERSION", "UNARY_FAMILIES", "UNARY_FUNCTIONS", "BatchedRule", "Draws",
           "Hyper", "Inputs", "Plan", "RuleState", "advance_averages", "apply_rule", "build_plan", "clip_",
           "draw_sites", "drop_", "needed_averages", "pad_program", "update_averages"]

Values = list[Tensor]


@dataclass(frozen=True)
class Hyper:
    """Numerical constants of the language (section 4.2 defaults)."""

    beta1: float = BETA1
    beta2: float = BETA2
    beta3: float = BETA3
    eps: float = EPS
    bias_correction: bool = True
    noise_std: float = NOISE_STD


# ------------------------------------------------------------------------ random draws
class Draws:
    """One rule's random numbers at one step, over a list of tensors laid end to end.

    ``seed`` is the rule's stream seed, ``step`` the step count (1, 2, ...), ``offsets[k]``
    the element index of the first entry of tensor k (``NOSOptimizer``: the offset of a
    parameter over all its parameters in order). Entry j of tensor k draws at element
    index ``offsets[k] + j`` (its flat index), so a list of tensors draws what the same
    entries draw as one flat row of ``BatchedRule``.
    """

    def __init__(self, seed: int, step: int, offsets: Sequence[int]):
        self.seed, self.step, self.offsets = int(seed), int(step), [int(o) for o in offsets]

    def bits(self, site: int, like: Values) -> Values:
        """The 64 random bits of every entry of ``like`` at draw site ``site`` (int64, ``like``'s shapes)."""
        key = hash64(hash64(self.seed, site), self.step)  # the step key: as random_streams.step_keys computes it
        out = []
        for t, offset in zip(like, self.offsets, strict=True):
            index = torch.arange(offset, offset + t.numel(), dtype=torch.int64, device=t.device)
            k = torch.tensor(key - (1 << 64) if key >> 63 else key, dtype=torch.int64, device=t.device)
            out.append(random_bits(k, index).view(t.shape))
        return out

    def uniform(self, site: int, like: Values) -> Values:
        """float32 uniforms in [0, 1) for ``drop``."""
        return [uniform(b) for b in self.bits(site, like)]

    def noise(self, site: int, like: Values, std: float) -> Values:
        """N(0, std^2) values (drawn in float32) in ``like``'s dtypes, for the operand ``noise``."""
        return [normal(b, std).to(t.dtype) for b, t in zip(self.bits(site, like), like)]


# ----------------------------------------------------------------------------- operands
class Inputs:
    """What operands read at one step: the gradient, the weights, the running averages,
    and the rule's random draws (``draws``; only ``apply_rule`` reads them)."""

    def __init__(self, g: Values, w: Values, m: Values | None, v: Values | None, y: Values | None,
                 step: int, hyper: Hyper, draws: Draws | None = None, known: dict[str, Values] | None = None):
        self.g, self.w, self.m, self.v, self.y = g, w, m, v, y
        self.step, self.hyper, self.draws = step, hyper, draws
        # what this step already has, never recomputed: operands the caller computed
        # (``known``: g2, g3), and the bias-corrected averages and ADAM/RMSProp's denominator
        # that m, v, ADAM and RMSProp share
        self._shared: dict[str, Values] = dict(known or {})

    def _average(self, name: str, beta: float, share: bool = False) -> tuple[Values, bool]:
        raw = getattr(self, name)
        if raw is None:
            raise RuntimeError(f"operand {name!r} needs its running average, which this rule did not keep")
        if not self.hyper.bias_correction:
            return raw, False
        if name in self._shared:
            return self._shared[name], False
        hat = torch._foreach_div(raw, 1.0 - beta ** self.step)
        if share:
            self._shared[name] = hat
            return hat, False
        return hat, True

    def _denominator(self) -> Values:
        """``sqrt(v-hat) + eps``, computed once per step."""
        if "denominator" not in self._shared:
            denom = torch._foreach_sqrt(self._average("v", self.hyper.beta2, share=True)[0])
            torch._foreach_add_(denom, self.hyper.eps)
            self._shared["denominator"] = denom
        return self._shared["denominator"]

    def get(self, name: str) -> tuple[Values, bool]:
        """The operand's values, and whether they are a fresh copy the caller may overwrite."""
        h = self.hyper
        if name == "g":
            return self.g, False
        if name in self._shared:  # a known operand, or a hat another operand already made
            return self._shared[name], False
        if name == "g2":
            return torch._foreach_mul(self.g, self.g), True
        if name == "g3":
            g3 = torch._foreach_mul(self.g, self.g)
            torch._foreach_mul_(g3, self.g)
            return g3, True
        if name == "m":
            return self._average("m", h.beta1)
        if name == "v":
            return self._average("v", h.beta2)
        if name == "y":
            return self._average("y", h.beta3)
        if name == "sign_g":
            return torch._foreach_sign(self.g), True
        if name == "sign_m":
            # the sign of m-hat is the sign of the raw average: skip the correction
            if self.m is None:
                raise RuntimeError("operand 'sign_m' needs the running average m, which this rule did not keep")
            return torch._foreach_sign(self.m), True
        if name == "one":
            return [torch.ones_like(t) for t in self.g], True
        if name == "noise":
            raise KeyError("operand 'noise' is drawn at a site: use Inputs.noise(site)")
        if name in WEIGHT_SCALES:
            return torch._foreach_mul(self.w, WEIGHT_SCALES[name]), True
        if name == "adam":
            return torch._foreach_div(self._average("m", h.beta1, share=True)[0], self._denominator()), True
        if name == "rmsprop":
            return torch._foreach_div(self.g, self._denominator()), True
        raise KeyError(f"unknown operand {name!r}")

    def noise(self, site: int) -> Values:
        """The operand ``noise`` read at draw site ``site``: a fresh copy."""
        if self.draws is None:
            raise RuntimeError("operand 'noise' needs the rule's random draws (Inputs(..., draws=Draws(...)))")
        return self.draws.noise(site, self.g, self.hyper.noise_std)


# ---------------------------------------------------------------------------- functions
# Every function works in place on its first argument (a list of tensors or of views).
def drop_(x: Values, rate: float | Values, u: Values) -> None:
    """``drop(x, p)``: zero each entry whose uniform (float32, ``u``: one tensor per tensor of
    ``x``) is below p (no rescaling), i.e. with probability p.

    ``rate`` is one p for every tensor, or one float32 tensor of p per tensor of ``x`` that
    broadcasts against it (the batched executor gives each row its own p). p is compared
    as a float32, so both executors draw the same mask.
    """
    # a Python p is rounded to float32 here: compared with a float32 tensor, torch takes it as that
    rates = rate if isinstance(rate, list) else [struct.unpack("f", struct.pack("f", rate))[0]] * len(x)
    for t, p, ut in zip(x, rates, u, strict=True):
        t.masked_fill_(ut < p, 0.0)


def clip_(x: Values, level: float | list[tuple[Tensor, Tensor]]) -> None:
    """``clip(x, l)``: clamp to [-l, l]. ``level`` is one l for every tensor, or per tensor
    of ``x`` the bounds ``(-l, l)`` as tensors that broadcast against it (one kernel each)."""
    if not isinstance(level, list):
        torch._foreach_clamp_min_(x, -level)
        torch._foreach_clamp_max_(x, level)
        return
    for t, (lo, hi) in zip(x, level):
        torch.clamp(t, lo, hi, out=t)


def _log_abs(x: Values, u: Values | None) -> None:
    torch._foreach_abs_(x)
    torch._foreach_log_(x)


def _sqrt_abs(x: Values, u: Values | None) -> None:
    torch._foreach_abs_(x)
    torch._foreach_sqrt_(x)


#: unary name -> its function, in place on a list of tensors (``nos_gym.dsl.UNARY``: name ->
#: notation). The second argument is the uniforms a ``drop`` reads (None for the others).
UNARY_FUNCTIONS: dict[str, Callable[[Values, Values | None], None]] = {
    "id": lambda x, u: None,
    "neg": lambda x, u: torch._foreach_neg_(x),
    "exp": lambda x, u: torch._foreach_exp_(x),
    "log_abs": _log_abs,
    "sign": lambda x, u: torch._foreach_sign_(x),
    "sqrt_abs": _sqrt_abs,
    **{name: (lambda x, u, lv=level: clip_(x, lv)) for name, level in CLIP_LEVELS.items()},
    **{name: (lambda x, u, p=rate: drop_(x, p, u)) for name, rate in DROP_RATES.items()},
}

#: unary tokens that differ only in a constant (``nos_gym.engine.step_plan.FAMILIES``): the batched
#: executor runs each family as one call with a per-row constant. Per family: (function of
#: the values, the argument and the drop's uniforms; the argument made from a column of
#: per-row constants of the data's dtype)
UNARY_FAMILIES: dict[str, tuple[Callable[[Values, list, Values | None], None], Callable[[Tensor], object]]] = {
    "clip": (lambda x, bounds, u: clip_(x, bounds), lambda c: (-c, c)),
    "drop": (drop_, lambda c: c.float()),  # compared with float32 draws
}
assert set(UNARY_FAMILIES) == set(FAMILIES)

#: binary name -> its function, in place on its first argument (``nos_gym.dsl.BINARY``: name -> notation)
BINARY_FUNCTIONS: dict[str, Callable[[Values, Values, float], None]] = {
    "add": lambda a, c, eps: torch._foreach_add_(a, c),
    "sub": lambda a, c, eps: torch._foreach_sub_(a, c),
    "mul": lambda a, c, eps: torch._foreach_mul_(a, c),
    "div": lambda a, c, eps: torch._foreach_div_(a, torch._foreach_add(c, eps)),
    "keep": lambda a, c, eps: None,
}


# ------------------------------------------------------------------------ running state
@dataclass(frozen=True)
class RuleState:
    """State of a (batched) rule: the step count and the running averages it needs.

    ``BatchedRule.update`` never changes a state: it returns a new one.
    """

    step: int = 0
    averages: dict[str, Tensor] = field(default_factory=dict)


def advance_averages(avgs: dict[str, Tensor], g: Tensor, hyper: Hyper, g3: Tensor | None = None) -> dict[str, Tensor]:
    """The running averages one step on, as new tensors (``avgs`` is left as it was).

    The same arithmetic as ``update_averages``, so both executors get the same numbers;
    ``g3``: g^3 if the caller has it.
    """
    new: dict[str, Tensor] = {}
    if "m" in avgs:
        new["m"] = torch.lerp(avgs["m"], g, 1.0 - hyper.beta1)
    if "v" in avgs:
        new["v"] = torch.mul(avgs["v"], hyper.beta2).addcmul_(g, g, value=1.0 - hyper.beta2)
    if "y" in avgs:
        if g3 is None:
            g3 = g * g * g
        new["y"] = torch.mul(avgs["y"], hyper.beta3).add_(g3, alpha=1.0 - hyper.beta3)
    return new


def update_averages(avgs: dict[str, Values], g: Values, hyper: Hyper, g3: Values | None = None) -> None:
    """Advance the running averages in place by one step (``g3``: g^3 if the caller has it).

    For ``NOSOptimizer``, whose state lives in the torch optimizer's ``state`` and is
    changed in place like every torch optimizer's; ``advance_averages`` is the pure form.
    """
    if "m" in avgs:
        torch._foreach_lerp_(avgs["m"], g, 1.0 - hyper.beta1)
    if "v" in avgs:
        torch._foreach_mul_(avgs["v"], hyper.beta2)
        torch._foreach_addcmul_(avgs["v"], g, g, value=1.0 - hyper.beta2)
    if "y" in avgs:
        torch._foreach_mul_(avgs["y"], hyper.beta3)
        if g3 is None:
            g3 = torch._foreach_mul(g, g)
            torch._foreach_mul_(g3, g)
        torch._foreach_add_(avgs["y"], g3, alpha=1.0 - hyper.beta3)


# ------------------------------------------------------------------- one rule, a list
def apply_rule(program: Program, inp: Inputs) -> Values:
    """The update direction of one program, over the lists of tensors in ``inp``.

    Functions run in place on fresh values; an input that must not change (the gradient,
    a result read twice) is copied first, so a rule costs about one kernel per token. No
    input is changed; the result may be an input itself (the rule ``g`` returns ``inp.g``).
    """
    refs: dict[str, int] = {}
    for op1, op2, _, _, b in program.groups:
        for op in (op1,) if b == "keep" else (op1, op2):
            refs[op] = refs.get(op, 0) + 1
    results: list[tuple[Values, bool]] = []
    sites = draw_sites(program)

    def side(op: str, unary: str, position: int) -> tuple[Values, bool]:
        # position: of the operand token; its unary is 2 tokens on
        if is_result_operand(op):
            vals, owned = results[result_index(op) - 1]
            owned = owned and refs[op] == 1
        elif op == "noise":
            vals, owned = inp.noise(sites[position]), True
        else:
            vals, owned = inp.get(op)
        if unary != "id":
            if not owned:
                vals, owned = [t.clone() for t in vals], True
            u = None
            if unary in DROP_RATES:
                if inp.draws is None:
                    raise RuntimeError(f"{unary} needs the rule's random draws (Inputs(..., draws=Draws(...)))")
                u = inp.draws.uniform(sites[position + 2], vals)
            UNARY_FUNCTIONS[unary](vals, u)
        return vals, owned

    for k, (op1, op2, u1, u2, b) in enumerate(program.groups):
        a, a_owned = side(op1, u1, GROUP_SIZE * k)
        if b != "keep":
            c, c_owned = side(op2, u2, GROUP_SIZE * k + 1)
            if not a_owned:
                if c_owned and b in COMMUTATIVE:
                    a, c = c, a
                else:
                    a = [t.clone() for t in a]
                a_owned = True
            BINARY_FUNCTIONS[b](a, c, inp.hyper.eps)
        results.append((a, a_owned))
    return results[-1][0]


# ---------------------------------------------------------------- many rules, stacked
class BatchedRule:
    """B different programs applied to B stacked parameter copies in one call.

    >>> rule = BatchedRule([parse("g"), parse("m"), parse("ADAM")])
    >>> state = rule.init(params)            # params: (3, ...) tensor
    >>> d, state = rule.update(state, grad, params)
    >>> params -= lr.view(-1, 1) * d         # lr: a scalar or one per row

    How a step runs, with no Python loop over the rules: every base operand any row reads
    is computed once for all rows into one "bank" tensor of rows (``noise`` only for the
    rows that read it, a fresh draw per read; ``1`` once). For each group, one row gather
    takes both sides' operands of every row from the bank into one buffer, ordered so that
    the slots choosing the same unary are contiguous: each unary is then one in-place call
    on a fixed view of that buffer (the clip levels, and the drop rates, as one call with a
    per-slot constant). A second gather puts the left and right sides in the binary's
    order; each binary is one in-place call on fixed views. A step therefore costs a fixed
    number of kernels per distinct token, whatever B is. ``self.plan`` (a
    ``nos_gym.engine.step_plan.Plan``, built from the tokens alone) says which row goes where and
    which call runs on which rows; the first ``update`` of each row width, dtype and device
    binds it to tensors (the bank, the buffers, their views, the list of calls).

    ``update`` is pure in optax's sense: it returns the direction and a new state, and
    leaves the state it was given as it was. ``select`` keeps some rows (e.g. to drop
    diverged ones) with their state.

    Programs may have different depths (shorter ones are padded with pass-through groups).

    Random draws: row i draws ``drop`` and ``noise`` from its own counter-based stream
    (``nos_gym.engine.random_streams``), with stream seed ``seeds[i]``: its numbers at step t,
    draw site s and column j depend on (``seeds[i]``, t, s, j) only, not on the batch, the
    row's position in it or the other rows, and ``NOSOptimizer`` draws the same ones for
    that program and stream seed. Without ``seeds``, row i's stream seed is
    ``stream_seed(seed, programs[i].canonical_key, 0)`` (draw 0 of the rule under task seed
    ``seed``); ``generator`` (the old interface) stands for ``seed=generator.initial_seed()``.
    The draws of a block of steps are computed at once (``_Executor``).

    ``fused``: the fused path (``nos_gym.engine.fused_batched``): the programs' tokens become
    per-row opcode tables and one kernel, compiled once per code shape (depth, averages
    kept, noise, drop; not per batch), computes every row's step: one kernel per step
    instead of a few per distinct token. Same arithmetic, same draws; exp and log round
    as inductor's vector code does (within 1 ulp of ATen's), so trajectories agree to
    rounding, not bit for bit. ``False``: today's executor. ``True``: fused whatever the
    size. ``None`` (default): fused when rows have at least ``FUSED_MIN_WIDTH`` (16)
    numbers and the batch at least ``FUSED_MIN_NUMEL`` (2^19) in all, on CPU or CUDA: the
    fused step is faster per step, but a cold compile takes seconds, which pays back
    only where a step saves milliseconds, i.e. on big batches (``benchmarks/rule_throughput.py``
    part (c); the measurement is in docs/results.md, "The rule engine"). Where compiling fails, ``None`` and ``True`` warn
    once (``FusedUnavailableWarning``) and run today's executor. The tasks pass ``False``:
    their stored scores were computed by today's executor (``RosenbrockTask(fused=True)``
    opts in, under a fingerprint of its own). ``fused`` says which path the last update took.
    """

    def __init__(self, programs: Sequence[Program], hyper: Hyper = Hyper(),
                 generator: torch.Generator | None = None, device: torch.device | str | None = None, *,
                 seed: int = 0, seeds: Sequence[int] | None = None, fused: bool | None = None):
        if not programs:
            raise ValueError("BatchedRule needs at least one program")
        self.programs = list(programs)
        self.hyper = hyper
        self.device = torch.device(device) if device is not None else None
        if seeds is None:
            base = generator.initial_seed() if generator is not None else int(seed)
            seeds = [stream_seed(base, p.canonical_key, 0) if p.stochastic else 0 for p in self.programs]
        elif len(seeds) != len(self.programs):
            raise ValueError(f"{len(seeds)} seeds for {len(self.programs)} programs")
        #: the stream seed of each row
        self.seeds: tuple[int, ...] = tuple(int(x) for x in seeds)
        self.plan: Plan = build_plan(self.programs)
        self._executor: _Executor | None = None
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        #: the ``fused`` argument (see the class docstring)
        self.fused_arg: bool | None = fused
        self._fused: _FusedExecutor | None = None
        # the fused path's code shape (depth, averages, noise, drop): at least this batch's;
        # a ``select``ed rule keeps its parent's, so dropping rows never compiles another kernel
        self._code_shape = _code_shape(self.programs, self.plan.averages)

    def __len__(self) -> int:
        return len(self.programs)

    def init(self, params: Tensor) -> RuleState:
        if params.shape[0] != len(self.programs):
            raise ValueError(f"params has {params.shape[0]} rows for {len(self.programs)} rules")
        return RuleState(0, {k: torch.zeros_like(params) for k in self.plan.averages})

    def update(self, state: RuleState, grad: Tensor, params: Tensor) -> tuple[Tensor, RuleState]:
        """The update direction of every row, and the state one step on (``state`` is not changed)."""
        R = grad.shape[0]
        if R != len(self.programs):
            raise ValueError(f"grad has {R} rows for {len(self.programs)} rules")
        D = grad.numel() // R
        on = self.fused_arg is not False and _fused.available() and self._fused_update_ok(D, grad)
        self._last_fused = on
        if on:
            return self._fused.update(state, grad, params)
        ex = self._executor
        if ex is None or ex.key != (D, grad.dtype, grad.device):
            ex = self._executor = _Executor(self.plan, D, grad.dtype, grad.device, self.hyper, self.seeds)
        g = grad.reshape(R, D)
        known = ex.powers(g)
        g3 = known["g3"][0].view_as(grad) if "g3" in known else None
        averages = advance_averages(state.averages, grad, self.hyper, g3=g3)
        step = state.step + 1
        d = ex.run(g, params.reshape(R, D), averages, step, known)
        return d.view_as(grad), RuleState(step, averages)

    @property
    def fused(self) -> bool | None:
        """Whether the last ``update`` took the fused path (None before the first)."""
        return self._last_fused

    _last_fused: bool | None = None

    def _fused_update_ok(self, width: int, grad: Tensor) -> bool:
        """Whether this update takes the fused path (and its executor is bound and compiled)."""
        on = self.fused_arg is True or (grad.device.type in ("cpu", "cuda") and width >= FUSED_MIN_WIDTH
                                        and grad.numel() >= FUSED_MIN_NUMEL)
        if on:
            fx = self._fused
            if fx is None or fx.key != (width, grad.dtype, grad.device):
                fx = _FusedExecutor(self, width, grad.dtype, grad.device)
                self._fused = fx
            with fx.threads(grad):
                on = fx.code.ready(grad.dtype, grad.device)
        return on

    def select(self, rows: Sequence[int] | Tensor, state: RuleState) -> tuple[BatchedRule, RuleState]:
        """The rule of rows ``rows`` only (in that order), and their part of ``state``.

        For dropping rows from a batch (diverged ones, say): the kept rows go on with the
        same numbers as if nothing had been dropped (the averages a smaller batch no longer
        reads are left out; each row keeps its stream seed). The new rule shares this one's
        hyperparameters and device.
        """
        index = [int(i) for i in (rows.tolist() if isinstance(rows, Tensor) else rows)]
        rule = BatchedRule([self.programs[i] for i in index], self.hyper, device=self.device,
                           seeds=[self.seeds[i] for i in index], fused=self.fused_arg)
        rule._code_shape = _join_shapes(rule._code_shape, self._code_shape)
        averages = {}
        for name in rule.plan.averages:
            avg = state.averages[name]
            averages[name] = avg[torch.tensor(index, dtype=torch.long, device=avg.device)]
        return rule, RuleState(state.step, averages)


_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _wide_rows(t: Tensor) -> Tensor:
    """``t``'s rows as half as many complex numbers: a row gather then moves half as many
    items (much faster for the Rosenbrock task's 2-number rows). Same bytes, same values."""
    if t.dim() == 2 and t.shape[1] % 2 == 0 and t.dtype in _COMPLEX_OF and t.stride(1) == 1 and t.stride(0) == t.shape[1]:
        wide = t.view(_COMPLEX_OF[t.dtype])
        return wide.view(-1) if wide.shape[1] == 1 else wide  # 1-D: index_select's fast path
    return t


#: random numbers computed at once: steps per block, so that a block holds about this many
#: (fewer kernels per step when rows are short, as in the loss-grid tasks' 2-number rows;
#: small enough for the generator's temporaries to stay in a CPU's L2 cache)
_BLOCK_ELEMENTS = 1 << 14
_MAX_BLOCK_STEPS = 64
#: elements generated per call inside a block (bounds the generator's temporaries)
_CHUNK_ELEMENTS = 1 << 20


class _Streams:
    """The random numbers of a batch's draws (``Draw(row, site)`` each) for a block of steps:
    uniforms (``drop``) or noise values, one row of ``width`` per draw, computed a block of
    steps at a time (they depend on nothing but the step)."""

    def __init__(self, draws: Sequence[Draw], seeds: Sequence[int], width: int, device: torch.device,
                 kind: str, dtype: torch.dtype, std: float = 1.0):
        self.n, self.kind, self.std, self.dtype = len(draws), kind, std, dtype
        self.keys = site_keys([seeds[d.row] for d in draws], [d.site for d in draws], device)
        self.counted = counters(torch.arange(width, dtype=torch.int64, device=device))  # column j: index j
        self.steps = max(1, min(_MAX_BLOCK_STEPS, _BLOCK_ELEMENTS // max(1, self.n * width)))
        self.block = torch.empty(self.steps, self.n, width, dtype=dtype, device=device)
        self.first: int | None = None  # the step of block[0]

    def at(self, step: int) -> Tensor:
        """The (draws, width) numbers of ``step``."""
        if self.first is None or not 0 <= step - self.first < self.steps:
            self._fill(step)
        return self.block[step - self.first]

    def _fill(self, first: int) -> None:
        steps = torch.arange(first, first + self.steps, dtype=torch.int64, device=self.keys.device)
        keys = step_keys(self.keys, steps).view(-1)  # (steps * draws,)
        flat = self.block.view(-1, self.block.shape[-1])
        rows = max(1, _CHUNK_ELEMENTS // self.block.shape[-1])
        for lo in range(0, len(keys), rows):
            bits = random_bits(keys[lo: lo + rows], counted=self.counted)
            values = uniform(bits) if self.kind == "uniform" else normal(bits, self.std)
            flat[lo: lo + rows].copy_(values)
        self.first = first


class _Executor:
    """A ``Plan`` bound to rows of ``width`` numbers of one dtype on one device: the bank,
    the work buffers, their fixed views and the list of calls of one step. The buffers are
    scratch space, overwritten every step; no state lives here (the random numbers of a
    block of steps are a cache of a pure function of the step)."""

    def __init__(self, plan: Plan, width: int, dtype: torch.dtype, device: torch.device, hyper: Hyper,
                 seeds: Sequence[int]):
        self.key = (width, dtype, device)
        self.plan, self.hyper = plan, hyper
        # drop's uniforms: one row per slot of every drop run, in plan order; noise: one per bank row
        drops = plan.drop_draws
        self.uniforms = _Streams(drops, seeds, width, device, "uniform", torch.float32) if drops else None
        self.noise = (_Streams(plan.noise, seeds, width, device, "normal", dtype, hyper.noise_std)
                      if plan.noise else None)
        self._step = 0
        B, D, lay = plan.rows, width, plan.bank

        def block(start: int, entries: int) -> Tensor:
            return bank[start: start + entries * B]

        bank = torch.empty(lay.size, D, dtype=dtype, device=device)
        block(0, len(lay.constant)).fill_(1.0)  # "one", the only constant operand
        self.power_views = [block(lay.powers_start + i * B, 1) for i in range(len(lay.powers))]
        self.computed_view = block(lay.computed_start, len(lay.computed)).view(len(lay.computed), B, D)
        self.scaled_w_view = block(lay.scaled_w_start, len(lay.scaled_w)).view(len(lay.scaled_w), B, D)
        self.w_scales = torch.tensor([WEIGHT_SCALES[t] for t in lay.scaled_w], dtype=dtype, device=device).view(-1, 1, 1)
        self.noise_view = bank[lay.noise_start: lay.noise_start + lay.noise_rows]

        eps = hyper.eps
        calls: list[Callable[[], None]] = []
        out: Tensor | None = None
        drawn = 0  # drop slots so far: the first row of the next drop run's uniforms
        for grp in plan.groups:
            # the slots in unary order (outside the bank: a gather may not write into its source)
            work = torch.empty(len(grp.reads), D, dtype=dtype, device=device)
            calls.append(_gather(bank, grp.reads, work))
            for run in grp.unary_runs:
                view = [work[run.lo: run.hi]]
                if run.constants:
                    fn, argument = UNARY_FAMILIES[run.token]
                    const = [argument(torch.tensor(run.constants, dtype=dtype, device=device).view(-1, 1))]
                    if run.draws:  # drop: this run's rows of the step's uniforms
                        lo, hi = drawn, drawn + len(run.draws)
                        drawn = hi
                        calls.append(lambda fn=fn, view=view, const=const, lo=lo, hi=hi:
                                     fn(view, const, [self.uniforms.at(self._step)[lo:hi]]))
                    else:
                        calls.append(lambda fn=fn, view=view, const=const: fn(view, const, None))
                else:
                    fn = UNARY_FUNCTIONS[run.token]
                    calls.append(lambda fn=fn, view=view: fn(view, None))
            if grp.sides_order is None:
                out = work
            else:
                sides = torch.empty(2 * B, D, dtype=dtype, device=device)
                calls.append(_gather(work, grp.sides_order, sides))
                out, right = sides[:B], sides[B:]
                for run in grp.binary_runs:
                    fn, left_view, right_view = BINARY_FUNCTIONS[run.token], [out[run.lo: run.hi]], [right[run.lo: run.hi]]
                    calls.append(lambda fn=fn, a=left_view, c=right_view: fn(a, c, eps))
            if grp.result_row is not None:
                calls.append(lambda src=out, dst=bank[grp.result_row: grp.result_row + B]: dst.copy_(src))
        assert out is not None
        self.calls = calls
        self.out = _wide_rows(out)
        self.output_index = None if plan.output_index is None else _index(plan.output_index, device)

    def powers(self, g: Tensor) -> dict[str, Values]:
        """g^2 (and g^3) of this step, written into the bank, by name."""
        known: dict[str, Values] = {}
        if self.power_views:
            known["g2"] = [torch.mul(g, g, out=self.power_views[0])]
            if len(self.power_views) == 2:
                known["g3"] = [torch.mul(known["g2"][0], g, out=self.power_views[1])]
        return known

    def run(self, g: Tensor, w: Tensor, averages: dict[str, Tensor], step: int, known: dict[str, Values]) -> Tensor:
        """One step's update direction (B, width), a new tensor, rows in program order."""
        B, D = g.shape
        h = self.hyper
        inp = Inputs([g], [w], *([averages[k].reshape(B, D)] if k in averages else None for k in ("m", "v", "y")),
                     step, h, None, known)
        self._step = step
        lay = self.plan.bank
        if lay.computed:
            torch.stack([inp.get(t)[0][0] for t in lay.computed], out=self.computed_view)
        if lay.scaled_w:  # the operands w * 10^k (as Inputs.get defines them) as one broadcast multiply
            torch.mul(w.reshape(1, B, D), self.w_scales, out=self.scaled_w_view)
        if self.noise is not None:
            self.noise_view.copy_(self.noise.at(step))
        for call in self.calls:
            call()
        out = self.out
        d = out.clone() if self.output_index is None else out.index_select(0, self.output_index)
        return d.view(g.dtype)


def _code_shape(programs: Sequence[Program], averages: tuple[str, ...]) -> tuple[int, tuple[str, ...], bool, bool]:
    """(depth, averages, whether a row reads noise, whether one drops): what the fused step's code depends on."""
    tokens = {t for p in programs for t in p.tokens}
    return (max(p.depth for p in programs), tuple(averages), "noise" in tokens, bool(tokens & set(DROP_RATES)))


def _join_shapes(a: tuple, b: tuple) -> tuple:
    return (max(a[0], b[0]), tuple(sorted(set(a[1]) | set(b[1]))), a[2] or b[2], a[3] or b[3])


class _FusedExecutor:
    """``BatchedRule``'s fused path (``nos_gym.engine.fused_batched``) bound to rows of ``width``
    numbers of one dtype on one device: the per-row opcode tables, the noise generator."""

    def __init__(self, rule: BatchedRule, width: int, dtype: torch.dtype, device: torch.device):
        from nos_gym.engine import fused_batched as fb

        self.key = (width, dtype, device)
        self.hyper = rule.hyper
        depth, self.averages, noise, drop = rule._code_shape
        self.flat = width < FUSED_FLAT_BELOW
        self.tables = t = fb.BatchedTables(rule.programs, rule.seeds, width, dtype, device, self.flat, depth)
        self.code = fb.batched_step(depth, self.averages, noise, drop, rule.hyper, self.flat)
        self._zeros: dict[str, Tensor] = {}  # averages the code keeps but this batch does not need
        self.noise = (_Streams(t.noise_draws, rule.seeds, width, device, "normal", dtype, rule.hyper.noise_std)
                      if t.noise_draws else None)
        self._step_key = fb.step_count_key

    def update(self, state: RuleState, grad: Tensor, params: Tensor) -> tuple[Tensor, RuleState]:
        R, h, t = grad.shape[0], self.hyper, self.tables
        shape = (grad.numel(),) if self.flat else (R, grad.numel() // R)
        step = state.step + 1
        avg = [state.averages[k].reshape(shape).contiguous() if k in state.averages else self._zero(k, shape, grad)
               if k in self.averages else None for k in ("m", "v", "y")]
        s = torch.tensor([1.0 - h.beta1 ** step, 1.0 - h.beta2 ** step, 1.0 - h.beta3 ** step],
                         dtype=grad.dtype, device=grad.device)
        tg = self._step_key(step).to(grad.device) if t.drop else None
        normals = (self.noise.at(step) if self.noise is not None
                   else self._zero("normals", (1, self.key[0]), grad) if self.code.noise else None)
        if tg is None and self.code.drop:
            tg = self._zero("tg", (1,), grad, torch.int64)
        g, w = grad.reshape(shape).contiguous(), params.reshape(shape).contiguous()
        with self.threads(grad):
            d, m, v, y = self.code(g, w, *avg, s, t.codes, t.level, t.rate, t.keys, tg, normals, *t.args())
        new = {k: x.view_as(grad) for k, x in (("m", m), ("v", v), ("y", y)) if k in state.averages}
        return d.view_as(grad), RuleState(step, new)

    @contextlib.contextmanager
    def threads(self, grad: Tensor):
        """One CPU thread for small steps. inductor's CPU kernel runs an OpenMP team whatever
        the size, and on a busy machine a team waiting for a core can stall a small step for
        far longer than the step takes (ATen's kernels stay serial below 32k entries)."""
        n = torch.get_num_threads()
        if n == 1 or grad.device.type != "cpu" or grad.numel() >= FUSED_PARALLEL_FROM:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    def _zero(self, name: str, shape: tuple, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        z = self._zeros.get(name)
        if z is None or z.shape != shape:
            z = self._zeros[name] = torch.zeros(shape, dtype=dtype or like.dtype, device=like.device)
        return z


#: the fused path's steps of fewer entries than this run on one CPU thread (``_FusedExecutor.threads``)
FUSED_PARALLEL_FROM = 1 << 16
#: the fused path's rows narrower than this run with per-entry tables (``flat``; see ``nos_gym.engine.fused_batched``)
FUSED_FLAT_BELOW = 16
#: ``BatchedRule(fused=None)`` takes the fused path for rows at least this wide (the per-row
#: tables; narrower rows take it only with ``fused=True``) in batches of at least this many entries
#: (where a step saves enough for a compile of seconds to pay back; see ``BatchedRule``)
FUSED_MIN_WIDTH = FUSED_FLAT_BELOW
FUSED_MIN_NUMEL = 1 << 19


def _index(rows: Sequence[int], device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _gather(src: Tensor, rows: Sequence[int], dst: Tensor) -> Callable[[], None]:
    """A call copying rows ``rows`` of ``src`` into ``dst``."""
    n = len(rows)
    if list(rows) == list(range(rows[0], rows[0] + n)):  # a contiguous block: a plain copy
        block = src[rows[0]: rows[0] + n]
        return lambda: dst.copy_(block)
    src_w, dst_w, idx = _wide_rows(src), _wide_rows(dst), _index(rows, dst.device)
    return lambda: torch.index_select(src_w, 0, idx, out=dst_w)
