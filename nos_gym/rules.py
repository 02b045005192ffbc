"""Compile programs into elementwise updates: one rule, or a batch of different rules at once.

The split follows optax: ``rule.init(params)`` makes the state (running averages and the
step count), ``rule.update(state, grad, params)`` returns the update direction ``d`` and
advances the state once; the caller applies ``w <- w - lr * d``.

Batched form: ``BatchedRule([p_1, ..., p_B])`` works on parameters stacked on a leading
axis of size B (row i is trained by rule p_i). Each step loops over the vocabulary, not
over the rules: for every slot of every group, rows that chose the same token are
gathered and computed together, so the cost per step is a fixed number of kernels
whatever B is. When all rows share a token (always the case for one rule) no gather is
done at all.

The same interpreter runs ``NOSOptimizer`` (``nos_gym.optim``) on a list of parameter
tensors with ``torch._foreach_*`` kernels: values are lists of tensors throughout.

Operand definitions (section 4.1, hyperparameters of section 4.2):

- ``m, v, y``: ``m = beta1 m + (1 - beta1) g`` (likewise v from g^2, y from g^3), divided
  by ``1 - beta^t`` when ``Hyper.bias_correction`` (the default, the paper's hats);
- ``ADAM = m / (sqrt(v) + eps)``, ``RMSProp = g / (sqrt(v) + eps)``;
- ``noise``: fresh N(0, ``Hyper.noise_std``^2) each step; ``drop(x, p)``: zero each entry
  with probability p (no rescaling), both from the rule's seeded generator;
- ``x / y`` is ``x / (y + eps)``; ``clip(x, l)`` clamps to [-l, l]; ``log|x|``, ``sqrt|x|``.

Non-finite values are never an error here: they are returned and the caller decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from nos_gym.dsl.program import Program
from nos_gym.dsl.vocabulary import (
    BETA1,
    BETA2,
    BETA3,
    CLIP_LEVELS,
    DROP_RATES,
    EPS,
    NOISE_STD,
    WEIGHT_SCALES,
    is_result_operand,
    result_index,
)

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


# ----------------------------------------------------------------------------- inputs
class Inputs:
    """Everything an operand may read at one step, computed lazily and at most once."""

    def __init__(self, g: Values, w: Values, m: Values | None, v: Values | None, y: Values | None,
                 step: int, hyper: Hyper, generator: torch.Generator | None):
        self._fields = {"g": g, "w": w, "m": m, "v": v, "y": y}
        self.step, self.hyper, self.generator = step, hyper, generator
        self._cache: dict[str, Values] = {}

    def take(self, rows: Tensor) -> "Inputs":
        """The same inputs restricted to some rows of a stacked tensor (gathered on use)."""
        sub = Inputs.__new__(Inputs)
        sub.step, sub.hyper, sub.generator, sub._cache = self.step, self.hyper, self.generator, {}
        sub._fields = _RowFields(self._fields, rows)
        return sub

    g = property(lambda self: self._fields["g"])
    w = property(lambda self: self._fields["w"])
    m = property(lambda self: self._fields["m"])
    v = property(lambda self: self._fields["v"])
    y = property(lambda self: self._fields["y"])

    def _corrected(self, name: str, raw: Values | None, beta: float) -> Values:
        if raw is None:
            raise RuntimeError(f"operand {name!r} needs its running average, which this rule did not keep")
        if not self.hyper.bias_correction:
            return raw
        return torch._foreach_div(raw, 1.0 - beta ** self.step)

    def get(self, name: str) -> Values:
        if name in self._cache:
            return self._cache[name]
        h = self.hyper
        if name == "g":
            val = self.g
        elif name == "g2":
            val = torch._foreach_mul(self.g, self.g)
        elif name == "g3":
            val = torch._foreach_mul(torch._foreach_mul(self.g, self.g), self.g)
        elif name == "m":
            val = self._corrected("m", self.m, h.beta1)
        elif name == "v":
            val = self._corrected("v", self.v, h.beta2)
        elif name == "y":
            val = self._corrected("y", self.y, h.beta3)
        elif name == "sign_g":
            val = torch._foreach_sign(self.g)
        elif name == "sign_m":
            # the sign of m-hat is the sign of the raw average: skip the correction
            val = torch._foreach_sign(self.m)
        elif name == "one":
            val = [torch.ones_like(t) for t in self.g]
        elif name == "noise":
            val = [torch.randn(t.shape, generator=self.generator, device=t.device, dtype=t.dtype) * h.noise_std
                   for t in self.g]
        elif name in WEIGHT_SCALES:
            val = torch._foreach_mul(self.w, WEIGHT_SCALES[name])
        elif name in ("adam", "rmsprop"):
            denom = torch._foreach_sqrt(self.get("v"))
            torch._foreach_add_(denom, h.eps)
            val = torch._foreach_div(self.get("m") if name == "adam" else self.g, denom)
        else:
            raise KeyError(f"unknown operand {name!r}")
        self._cache[name] = val
        return val


class _RowFields(dict):
    """Input fields of some rows, gathered from the full tensors on first use."""

    def __init__(self, parent: dict, rows: Tensor):
        super().__init__()
        self.parent, self.rows = parent, rows

    def __missing__(self, key: str) -> Values | None:
        vals = self.parent[key]
        self[key] = None if vals is None else [vals[0].index_select(0, self.rows)]
        return self[key]


# -------------------------------------------------------------------------- functions
def _drop(rate: float) -> Callable[[Values, Inputs], Values]:
    def fn(x: Values, inp: Inputs) -> Values:
        return [t * (torch.rand(t.shape, generator=inp.generator, device=t.device) >= rate) for t in x]
    return fn


def _clip(level: float) -> Callable[[Values, Inputs], Values]:
    def fn(x: Values, inp: Inputs) -> Values:
        return torch._foreach_clamp_max(torch._foreach_clamp_min(x, -level), level)
    return fn


UNARY_FNS: dict[str, Callable[[Values, Inputs], Values]] = {
    "id": lambda x, inp: x,
    "neg": lambda x, inp: torch._foreach_neg(x),
    "exp": lambda x, inp: torch._foreach_exp(x),
    "log_abs": lambda x, inp: torch._foreach_log(torch._foreach_abs(x)),
    "sign": lambda x, inp: torch._foreach_sign(x),
    "sqrt_abs": lambda x, inp: torch._foreach_sqrt(torch._foreach_abs(x)),
    **{name: _clip(level) for name, level in CLIP_LEVELS.items()},
    **{name: _drop(rate) for name, rate in DROP_RATES.items()},
}


def _div(x: Values, y: Values, inp: Inputs) -> Values:
    return torch._foreach_div(x, torch._foreach_add(y, inp.hyper.eps))


BINARY_FNS: dict[str, Callable[[Values, Values, Inputs], Values]] = {
    "add": lambda x, y, inp: torch._foreach_add(x, y),
    "sub": lambda x, y, inp: torch._foreach_sub(x, y),
    "mul": lambda x, y, inp: torch._foreach_mul(x, y),
    "div": _div,
    "keep": lambda x, y, inp: x,
}


# ------------------------------------------------------------------------ interpreter
# A plan is, for each group, five slots; a slot is a list of (token, rows) pairs, where
# rows is None (every row uses the token) or a LongTensor of the rows that do.
Slot = list[tuple[str, "Tensor | None"]]


def _plan(programs: Sequence[Program], device: torch.device | None) -> list[list[Slot]]:
    depth = programs[0].depth
    if any(p.depth != depth for p in programs):
        raise ValueError("a plan needs programs of one depth; pad them with pad_program first")
    plan = []
    for k in range(depth):
        slots = []
        for s in range(5):
            rows_of: dict[str, list[int]] = {}
            for i, p in enumerate(programs):
                rows_of.setdefault(p.groups[k][s], []).append(i)
            if len(rows_of) == 1:
                slots.append([(next(iter(rows_of)), None)])
            else:
                slots.append([(tok, torch.tensor(rows, dtype=torch.long, device=device))
                              for tok, rows in rows_of.items()])
        plan.append(slots)
    return plan


def _operand(tok: str, inp: Inputs, results: list[Values], rows: Tensor | None) -> Values:
    if is_result_operand(tok):
        val = results[result_index(tok) - 1]
        return val if rows is None else [val[0].index_select(0, rows)]
    return (inp if rows is None else inp.take(rows)).get(tok)


def _per_rows(slot: Slot, like: Values, compute: Callable[[str, Tensor | None], Values]) -> Values:
    """Run ``compute(token, rows)`` for each token of a slot and scatter rows back."""
    if len(slot) == 1:
        return compute(slot[0][0], None)
    out = torch.empty_like(like[0])
    for tok, rows in slot:
        out.index_copy_(0, rows, compute(tok, rows)[0])
    return [out]


def run_plan(plan: list[list[Slot]], inp: Inputs) -> Values:
    """Evaluate every group of the plan; returns the last group's result (the direction)."""
    results: list[Values] = []
    for op1, op2, u1, u2, b in plan:
        def side(op_slot: Slot, u_slot: Slot) -> Values:
            x = _per_rows(op_slot, inp.g, lambda tok, rows: _operand(tok, inp, results, rows))
            return _per_rows(u_slot, x, lambda tok, rows: UNARY_FNS[tok](
                x if rows is None else [x[0].index_select(0, rows)], inp))
        a = side(op1, u1)
        if len(b) == 1 and b[0][0] == "keep":
            results.append(a)  # keep-left everywhere: the right side is never computed
            continue
        c = side(op2, u2)
        results.append(_per_rows(b, a, lambda tok, rows: BINARY_FNS[tok](
            a if rows is None else [a[0].index_select(0, rows)],
            c if rows is None else [c[0].index_select(0, rows)], inp)))
    return results[-1]


def needed_averages(programs: Sequence[Program]) -> set[str]:
    """Which running averages (m, v, y) the interpreter will read for this batch.

    Every operand slot is computed, except the right side of a group whose binary is
    keep-left in every program of the batch (``run_plan`` skips that side).
    """
    used: set[str] = set()
    for k in range(programs[0].depth):
        all_keep = all(p.groups[k][4] == "keep" for p in programs)
        for p in programs:
            used.add(p.groups[k][0])
            if not all_keep:
                used.add(p.groups[k][1])
    need: set[str] = set()
    if used & {"m", "sign_m", "adam"}:
        need.add("m")
    if used & {"v", "adam", "rmsprop"}:
        need.add("v")
    if "y" in used:
        need.add("y")
    return need


def update_averages(avgs: dict[str, Values], g: Values, hyper: Hyper) -> None:
    """Advance the running averages in place by one step."""
    if "m" in avgs:
        torch._foreach_lerp_(avgs["m"], g, 1.0 - hyper.beta1)
    if "v" in avgs:
        torch._foreach_mul_(avgs["v"], hyper.beta2)
        torch._foreach_addcmul_(avgs["v"], g, g, value=1.0 - hyper.beta2)
    if "y" in avgs:
        torch._foreach_mul_(avgs["y"], hyper.beta3)
        g3 = torch._foreach_mul(torch._foreach_mul(g, g), g)
        torch._foreach_add_(avgs["y"], g3, alpha=1.0 - hyper.beta3)


# ----------------------------------------------------------------------- batched rule
@dataclass
class RuleState:
    """State of a (batched) rule: the step count and the running averages it needs."""

    step: int = 0
    averages: dict[str, Tensor] = field(default_factory=dict)


class BatchedRule:
    """B different programs applied to B stacked parameter copies in one call.

    >>> rule = BatchedRule([parse("g"), parse("m"), parse("ADAM")])
    >>> state = rule.init(params)            # params: (3, ...) tensor
    >>> d, state = rule.update(state, grad, params)
    >>> params -= lr.view(-1, 1) * d         # lr: a scalar or one per row
    """

    def __init__(self, programs: Sequence[Program], hyper: Hyper = Hyper(),
                 generator: torch.Generator | None = None, device: torch.device | str | None = None):
        if not programs:
            raise ValueError("BatchedRule needs at least one program")
        self.programs = list(programs)
        self.hyper = hyper
        self.generator = generator
        self.device = torch.device(device) if device is not None else None
        # Rules of different depths share one plan: shorter ones are padded with groups
        # that pass their result through unchanged (keep-left), so they compute the same.
        depth = max(p.depth for p in self.programs)
        self._padded = [pad_program(p, depth) for p in self.programs]
        self._plan = _plan(self._padded, self.device)
        self._needs = needed_averages(self._padded)

    def __len__(self) -> int:
        return len(self.programs)

    def init(self, params: Tensor) -> RuleState:
        if params.shape[0] != len(self.programs):
            raise ValueError(f"params has {params.shape[0]} rows for {len(self.programs)} rules")
        if self.device is None and params.device.type != "cpu":
            self.device = params.device
            self._plan = _plan(self._padded, params.device)
        return RuleState(0, {k: torch.zeros_like(params) for k in sorted(self._needs)})

    def update(self, state: RuleState, grad: Tensor, params: Tensor) -> tuple[Tensor, RuleState]:
        avgs = {k: [t] for k, t in state.averages.items()}
        update_averages(avgs, [grad], self.hyper)
        step = state.step + 1
        inp = Inputs([grad], [params], avgs.get("m"), avgs.get("v"), avgs.get("y"),
                     step, self.hyper, self.generator)
        direction = run_plan(self._plan, inp)[0]
        return direction, replace(state, step=step)


def pad_program(program: Program, depth: int) -> Program:
    """``program`` lengthened to ``depth`` groups by pass-through groups ``keep(r_k, 1)``."""
    if depth < program.depth:
        raise ValueError(f"cannot pad a depth-{program.depth} program to depth {depth}")
    tokens = list(program.tokens)
    for k in range(program.depth, depth):
        tokens += [f"r{k}", "one", "id", "id", "keep"]
    return Program(tuple(tokens))


def single_plan(program: Program) -> list[list[Slot]]:
    """The plan of one rule (every slot has one token), for list-of-tensor interpreters."""
    return _plan([program], None)
