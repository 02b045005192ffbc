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
  distinct token, whatever B is. What runs where is a ``Plan`` (``nos_gym.rule_plan``,
  built from the programs' tokens alone); ``BatchedRule`` binds it to tensors and runs it.

Operand definitions (section 4.1, hyperparameters of section 4.2):

- ``m, v, y``: ``m = beta1 m + (1 - beta1) g`` (likewise v from g^2, y from g^3), divided
  by ``1 - beta^t`` when ``Hyper.bias_correction`` (the default, the paper's hats);
- ``ADAM = m / (sqrt(v) + eps)``, ``RMSProp = g / (sqrt(v) + eps)``;
- ``noise``: fresh N(0, ``Hyper.noise_std``^2) each step and each read; ``drop(x, p)``:
  zero each entry with probability p (no rescaling; an inf entry too), both from the
  rule's seeded generator;
- ``x / y`` is ``x / (y + eps)``; ``clip(x, l)`` clamps to [-l, l]; ``log|x|``, ``sqrt|x|``.

Non-finite values are never an error here: they are returned and the caller decides.
"""

from __future__ import annotations

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
    NOISE_STD,
    SEMANTICS_VERSION,  # re-exported: the version of the semantics defined here
    WEIGHT_SCALES,
    is_result_operand,
    result_index,
)
from nos_gym.rule_plan import FAMILIES, Plan, build_plan, needed_averages, pad_program

__all__ = ["BINARY_FUNCTIONS", "SEMANTICS_VERSION", "UNARY_FAMILIES", "UNARY_FUNCTIONS", "BatchedRule", "Hyper",
           "Inputs", "Plan", "RuleState", "advance_averages", "apply_rule", "build_plan", "clip_", "draw_noise",
           "drop_", "needed_averages", "pad_program", "update_averages"]

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


# ----------------------------------------------------------------------------- operands
class Inputs:
    """What operands read at one step: the gradient, the weights, the running averages."""

    def __init__(self, g: Values, w: Values, m: Values | None, v: Values | None, y: Values | None,
                 step: int, hyper: Hyper, generator: torch.Generator | None, known: dict[str, Values] | None = None):
        self.g, self.w, self.m, self.v, self.y = g, w, m, v, y
        self.step, self.hyper, self.generator = step, hyper, generator
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
            return [draw_noise(t, h, self.generator) for t in self.g], True
        if name in WEIGHT_SCALES:
            return torch._foreach_mul(self.w, WEIGHT_SCALES[name]), True
        if name == "adam":
            return torch._foreach_div(self._average("m", h.beta1, share=True)[0], self._denominator()), True
        if name == "rmsprop":
            return torch._foreach_div(self.g, self._denominator()), True
        raise KeyError(f"unknown operand {name!r}")


# ---------------------------------------------------------------------------- functions
# Every function works in place on its first argument (a list of tensors or of views).
def draw_noise(like: Tensor, hyper: Hyper, generator: torch.Generator | None, out: Tensor | None = None) -> Tensor:
    """Fresh N(0, noise_std^2) values of ``like``'s shape and dtype (into ``out`` if given).
    Drawn in float32: a float64 draw costs 5x as much on CPU, and the noise needs no more
    than float32 resolution."""
    z = torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    if out is not None:
        return torch.mul(z, hyper.noise_std, out=out)
    return z.mul_(hyper.noise_std).to(like.dtype)


def drop_(x: Values, rate: float | Values, gen: torch.Generator | None) -> None:
    """``drop(x, p)``: zero each entry with probability p (no rescaling).

    ``rate`` is one p for every tensor, or one tensor of p per tensor of ``x`` that
    broadcasts against it (the batched executor gives each row its own p).
    """
    rates = rate if isinstance(rate, list) else [rate] * len(x)
    for t, p in zip(x, rates):
        t.masked_fill_(torch.rand(t.shape, generator=gen, device=t.device) < p, 0.0)


def clip_(x: Values, level: float | list[tuple[Tensor, Tensor]]) -> None:
    """``clip(x, l)``: clamp to [-l, l]. ``level`` is one l for every tensor, or per tensor
    of ``x`` the bounds ``(-l, l)`` as tensors that broadcast against it (one kernel each)."""
    if not isinstance(level, list):
        torch._foreach_clamp_min_(x, -level)
        torch._foreach_clamp_max_(x, level)
        return
    for t, (lo, hi) in zip(x, level):
        torch.clamp(t, lo, hi, out=t)


def _log_abs(x: Values, gen: torch.Generator | None) -> None:
    torch._foreach_abs_(x)
    torch._foreach_log_(x)


def _sqrt_abs(x: Values, gen: torch.Generator | None) -> None:
    torch._foreach_abs_(x)
    torch._foreach_sqrt_(x)


#: unary name -> its function, in place on a list of tensors (``nos_gym.dsl.UNARY``: name -> notation)
UNARY_FUNCTIONS: dict[str, Callable[[Values, torch.Generator | None], None]] = {
    "id": lambda x, gen: None,
    "neg": lambda x, gen: torch._foreach_neg_(x),
    "exp": lambda x, gen: torch._foreach_exp_(x),
    "log_abs": _log_abs,
    "sign": lambda x, gen: torch._foreach_sign_(x),
    "sqrt_abs": _sqrt_abs,
    **{name: (lambda x, gen, lv=level: clip_(x, lv)) for name, level in CLIP_LEVELS.items()},
    **{name: (lambda x, gen, p=rate: drop_(x, p, gen)) for name, rate in DROP_RATES.items()},
}

#: unary tokens that differ only in a constant (``nos_gym.rule_plan.FAMILIES``): the batched
#: executor runs each family as one call with a per-row constant. Per family: (function,
#: the function's argument made from a column of per-row constants of the data's dtype)
UNARY_FAMILIES: dict[str, tuple[Callable[[Values, list, torch.Generator | None], None], Callable[[Tensor], object]]] = {
    "clip": (lambda x, bounds, gen: clip_(x, bounds), lambda c: (-c, c)),
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

    def side(op: str, unary: str) -> tuple[Values, bool]:
        if is_result_operand(op):
            vals, owned = results[result_index(op) - 1]
            owned = owned and refs[op] == 1
        else:
            vals, owned = inp.get(op)
        if unary != "id":
            if not owned:
                vals, owned = [t.clone() for t in vals], True
            UNARY_FUNCTIONS[unary](vals, inp.generator)
        return vals, owned

    for op1, op2, u1, u2, b in program.groups:
        a, a_owned = side(op1, u1)
        if b != "keep":
            c, c_owned = side(op2, u2)
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
    ``nos_gym.rule_plan.Plan``, built from the tokens alone) says which row goes where and
    which call runs on which rows; the first ``update`` of each row width, dtype and device
    binds it to tensors (the bank, the buffers, their views, the list of calls).

    ``update`` is pure in optax's sense: it returns the direction and a new state, and
    leaves the state it was given as it was. ``select`` keeps some rows (e.g. to drop
    diverged ones) with their state.

    Programs may have different depths (shorter ones are padded with pass-through groups).
    ``drop`` and ``noise`` draw from ``generator``; their draws depend on the batch's
    layout, so a stochastic rule gets other (equally distributed) numbers in another batch.
    """

    def __init__(self, programs: Sequence[Program], hyper: Hyper = Hyper(),
                 generator: torch.Generator | None = None, device: torch.device | str | None = None):
        if not programs:
            raise ValueError("BatchedRule needs at least one program")
        self.programs = list(programs)
        self.hyper = hyper
        self.generator = generator
        self.device = torch.device(device) if device is not None else None
        self.plan: Plan = build_plan(self.programs)
        self._executor: _Executor | None = None

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
        ex = self._executor
        if ex is None or ex.key != (D, grad.dtype, grad.device):
            ex = self._executor = _Executor(self.plan, D, grad.dtype, grad.device, self.hyper, self.generator)
        g = grad.reshape(R, D)
        known = ex.powers(g)
        g3 = known["g3"][0].view_as(grad) if "g3" in known else None
        averages = advance_averages(state.averages, grad, self.hyper, g3=g3)
        step = state.step + 1
        d = ex.run(g, params.reshape(R, D), averages, step, known)
        return d.view_as(grad), RuleState(step, averages)

    def select(self, rows: Sequence[int] | Tensor, state: RuleState) -> tuple[BatchedRule, RuleState]:
        """The rule of rows ``rows`` only (in that order), and their part of ``state``.

        For dropping rows from a batch (diverged ones, say): the kept rows go on with the
        same numbers as if nothing had been dropped (the averages a smaller batch no longer
        reads are left out). The new rule shares this one's hyperparameters, generator and
        device.
        """
        index = [int(i) for i in (rows.tolist() if isinstance(rows, Tensor) else rows)]
        rule = BatchedRule([self.programs[i] for i in index], self.hyper, self.generator, self.device)
        averages = {}
        for name in rule.plan.averages:
            avg = state.averages[name]
            averages[name] = avg[torch.tensor(index, dtype=torch.long, device=avg.device)]
        return rule, RuleState(state.step, averages)


_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _wide_rows(t: Tensor) -> Tensor:
    """``t``'s rows as half as many complex numbers: a row gather then moves half as many
    items (3.5x faster for the Rosenbrock task's 2-number rows). Same bytes, same values."""
    if t.dim() == 2 and t.shape[1] % 2 == 0 and t.dtype in _COMPLEX_OF and t.stride(1) == 1 and t.stride(0) == t.shape[1]:
        wide = t.view(_COMPLEX_OF[t.dtype])
        return wide.view(-1) if wide.shape[1] == 1 else wide  # 1-D: index_select's fast path
    return t


class _Executor:
    """A ``Plan`` bound to rows of ``width`` numbers of one dtype on one device: the bank,
    the work buffers, their fixed views and the list of calls of one step. The buffers are
    scratch space, overwritten every step; no state lives here."""

    def __init__(self, plan: Plan, width: int, dtype: torch.dtype, device: torch.device, hyper: Hyper,
                 generator: torch.Generator | None):
        self.key = (width, dtype, device)
        self.plan, self.hyper, self.generator = plan, hyper, generator
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

        gen, eps = generator, hyper.eps
        calls: list[Callable[[], None]] = []
        out: Tensor | None = None
        for grp in plan.groups:
            # the slots in unary order (outside the bank: a gather may not write into its source)
            work = torch.empty(len(grp.reads), D, dtype=dtype, device=device)
            calls.append(_gather(bank, grp.reads, work))
            for run in grp.unary_runs:
                view = [work[run.lo: run.hi]]
                if run.constants:
                    fn, argument = UNARY_FAMILIES[run.token]
                    const = [argument(torch.tensor(run.constants, dtype=dtype, device=device).view(-1, 1))]
                    calls.append(lambda fn=fn, view=view, const=const: fn(view, const, gen))
                else:
                    fn = UNARY_FUNCTIONS[run.token]
                    calls.append(lambda fn=fn, view=view: fn(view, gen))
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
                     step, h, self.generator, known)
        lay = self.plan.bank
        if lay.computed:
            torch.stack([inp.get(t)[0][0] for t in lay.computed], out=self.computed_view)
        if lay.scaled_w:  # the operands w * 10^k (as Inputs.get defines them) as one broadcast multiply
            torch.mul(w.reshape(1, B, D), self.w_scales, out=self.scaled_w_view)
        if lay.noise_rows:
            draw_noise(self.noise_view, h, self.generator, out=self.noise_view)
        for call in self.calls:
            call()
        out = self.out
        d = out.clone() if self.output_index is None else out.index_select(0, self.output_index)
        return d.view(g.dtype)


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
