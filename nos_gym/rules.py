"""Compile programs into elementwise updates: one rule, or a batch of different rules at once.

The split follows optax: ``rule.init(params)`` makes the state (running averages and the
step count), ``rule.update(state, grad, params)`` returns the update direction ``d`` and
advances the state once; the caller applies ``w <- w - lr * d``.

The language's primitives are defined once, below, on lists of tensors with
``torch._foreach_*`` kernels: ``Inputs.get`` computes operands, ``UNARY`` and ``BINARY``
apply functions in place. Two executors use them:

- ``apply_rule`` runs one program over a list of parameter tensors (``NOSOptimizer``);
- ``BatchedRule`` runs B different programs on parameters stacked on a leading axis of size
  B (row i is trained by program i), with no Python loop over the rules. Each step, every
  base operand any row reads is computed once for all rows into one "bank" tensor
  ``(entries, B, D)``; before each unary slot one gather takes each row's operand from the
  bank *and* orders the rows so that rows choosing the same unary are contiguous; each
  unary is then one in-place kernel on a slice (a view); before each binary slot one
  gather per side puts the rows in the binary's order. A step therefore costs a fixed
  number of kernels per distinct token, whatever B is.

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


# ----------------------------------------------------------------------------- operands
class Inputs:
    """What operands read at one step: the gradient, the weights, the running averages."""

    def __init__(self, g: Values, w: Values, m: Values | None, v: Values | None, y: Values | None,
                 step: int, hyper: Hyper, generator: torch.Generator | None):
        self.g, self.w, self.m, self.v, self.y = g, w, m, v, y
        self.step, self.hyper, self.generator = step, hyper, generator

    def _average(self, name: str, beta: float) -> tuple[Values, bool]:
        raw = getattr(self, name)
        if raw is None:
            raise RuntimeError(f"operand {name!r} needs its running average, which this rule did not keep")
        if not self.hyper.bias_correction:
            return raw, False
        return torch._foreach_div(raw, 1.0 - beta ** self.step), True

    def get(self, name: str) -> tuple[Values, bool]:
        """The operand's values, and whether they are a fresh copy the caller may overwrite."""
        h = self.hyper
        if name == "g":
            return self.g, False
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
            return [torch.randn(t.shape, generator=self.generator, device=t.device, dtype=t.dtype).mul_(h.noise_std)
                    for t in self.g], True
        if name in WEIGHT_SCALES:
            return torch._foreach_mul(self.w, WEIGHT_SCALES[name]), True
        if name in ("adam", "rmsprop"):
            denom, _ = self._average("v", h.beta2)
            denom = torch._foreach_sqrt(denom)
            torch._foreach_add_(denom, h.eps)
            numer = self._average("m", h.beta1)[0] if name == "adam" else self.g
            return torch._foreach_div(numer, denom), True
        raise KeyError(f"unknown operand {name!r}")


# ---------------------------------------------------------------------------- functions
# Every function works in place on its first argument (a list of tensors or of views).
def _drop(rate: float) -> Callable[[Values, torch.Generator | None], None]:
    def fn(x: Values, gen: torch.Generator | None) -> None:
        for t in x:
            t.mul_(torch.rand(t.shape, generator=gen, device=t.device) >= rate)
    return fn


def _clip(level: float) -> Callable[[Values, torch.Generator | None], None]:
    def fn(x: Values, gen: torch.Generator | None) -> None:
        torch._foreach_clamp_min_(x, -level)
        torch._foreach_clamp_max_(x, level)
    return fn


def _log_abs(x: Values, gen: torch.Generator | None) -> None:
    torch._foreach_abs_(x)
    torch._foreach_log_(x)


def _sqrt_abs(x: Values, gen: torch.Generator | None) -> None:
    torch._foreach_abs_(x)
    torch._foreach_sqrt_(x)


UNARY: dict[str, Callable[[Values, torch.Generator | None], None]] = {
    "id": lambda x, gen: None,
    "neg": lambda x, gen: torch._foreach_neg_(x),
    "exp": lambda x, gen: torch._foreach_exp_(x),
    "log_abs": _log_abs,
    "sign": lambda x, gen: torch._foreach_sign_(x),
    "sqrt_abs": _sqrt_abs,
    **{name: _clip(level) for name, level in CLIP_LEVELS.items()},
    **{name: _drop(rate) for name, rate in DROP_RATES.items()},
}

BINARY: dict[str, Callable[[Values, Values, float], None]] = {
    "add": lambda a, c, eps: torch._foreach_add_(a, c),
    "sub": lambda a, c, eps: torch._foreach_sub_(a, c),
    "mul": lambda a, c, eps: torch._foreach_mul_(a, c),
    "div": lambda a, c, eps: torch._foreach_div_(a, torch._foreach_add(c, eps)),
    "keep": lambda a, c, eps: None,
}
_COMMUTATIVE = ("add", "mul")


# ------------------------------------------------------------------------ running state
def needed_averages(programs: Sequence[Program]) -> set[str]:
    """Which running averages (m, v, y) the executors will read for these programs.

    Every operand slot is computed, except the right side of a group whose binary is
    keep-left in every program (the executors skip that side).
    """
    used: set[str] = set()
    depth = max(p.depth for p in programs)
    for k in range(depth):
        live = [p for p in programs if k < p.depth]
        all_keep = all(p.groups[k][4] == "keep" for p in live)
        for p in live:
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
        g3 = torch._foreach_mul(g, g)
        torch._foreach_mul_(g3, g)
        torch._foreach_add_(avgs["y"], g3, alpha=1.0 - hyper.beta3)


@dataclass
class RuleState:
    """State of a (batched) rule: the step count and the running averages it needs."""

    step: int = 0
    averages: dict[str, Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------- one rule, a list
def apply_rule(program: Program, inp: Inputs) -> Values:
    """The update direction of one program, over the lists of tensors in ``inp``.

    Functions run in place on fresh values; an input that must not change (the gradient,
    a result read twice) is copied first, so a rule costs about one kernel per token.
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
            UNARY[unary](vals, inp.generator)
        return vals, owned

    for op1, op2, u1, u2, b in program.groups:
        a, a_owned = side(op1, u1)
        if b != "keep":
            c, c_owned = side(op2, u2)
            if not a_owned:
                if c_owned and b in _COMMUTATIVE:
                    a, c = c, a
                else:
                    a = [t.clone() for t in a]
                a_owned = True
            BINARY[b](a, c, inp.hyper.eps)
        results.append((a, a_owned))
    return results[-1][0]


# ---------------------------------------------------------------- many rules, stacked
def pad_program(program: Program, depth: int) -> Program:
    """``program`` lengthened to ``depth`` groups by pass-through groups ``keep(r_k, 1)``."""
    if depth < program.depth:
        raise ValueError(f"cannot pad a depth-{program.depth} program to depth {depth}")
    tokens = list(program.tokens)
    for k in range(program.depth, depth):
        tokens += [f"r{k}", "one", "id", "id", "keep"]
    return Program(tuple(tokens))


def _sort_rows(tokens: list[str]) -> tuple[list[int], list[tuple[str, int, int]]]:
    """Rows ordered so that equal tokens are contiguous (stable), and each token's slice."""
    order = sorted(range(len(tokens)), key=lambda i: (tokens[i], i))
    slices: list[tuple[str, int, int]] = []
    for pos, row in enumerate(order):
        tok = tokens[row]
        if slices and slices[-1][0] == tok:
            slices[-1] = (tok, slices[-1][1], pos + 1)
        else:
            slices.append((tok, pos, pos + 1))
    return order, slices


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for pos, row in enumerate(order):
        inv[row] = pos
    return inv


@dataclass
class _Side:
    entry: int                       # bank entry when every row reads one entry in order
    gather: list[int] | None         # else: bank rows to gather, in this side's order
    slices: list[tuple[str, int, int]]  # (unary, lo, hi) over this side's order
    index: Tensor | None = None


@dataclass
class _Group:
    sides: list[_Side]
    perms: list[list[int] | None]    # reorder each side from its unary order to the binary's
    binary_slices: list[tuple[str, int, int]]
    result_entry: int | None
    perm_index: list[Tensor | None] = field(default_factory=list)


class BatchedRule:
    """B different programs applied to B stacked parameter copies in one call.

    >>> rule = BatchedRule([parse("g"), parse("m"), parse("ADAM")])
    >>> state = rule.init(params)            # params: (3, ...) tensor
    >>> d, state = rule.update(state, grad, params)
    >>> params -= lr.view(-1, 1) * d         # lr: a scalar or one per row

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
        depth = max(p.depth for p in self.programs)
        rows = [pad_program(p, depth) for p in self.programs]
        self._needs = needed_averages(rows)
        R = len(rows)
        ident = list(range(R))
        # the right side of a group is skipped when every row keeps left
        sides_of = [((0, 2),) if all(p.groups[k][4] == "keep" for p in rows) else ((0, 2), (1, 3))
                    for k in range(depth)]
        used = {p.groups[k][s] for k in range(depth) for p in rows for s, _ in sides_of[k]}
        self._base = sorted(t for t in used if not is_result_operand(t))
        results = sorted((t for t in used if is_result_operand(t)), key=result_index)
        entries = self._base + results
        entry = {t: i for i, t in enumerate(entries)}
        where: dict[str, list[int]] = {t: ident for t in self._base}  # row -> position in entry
        self._groups: list[_Group] = []
        order_b = ident
        for k in range(depth):
            sides, orders = [], []
            for s_op, s_u in sides_of[k]:
                order, slices = _sort_rows([p.groups[k][s_u] for p in rows])
                ops = [rows[r].groups[k][s_op] for r in order]
                if len(set(ops)) == 1 and order == ident and where[ops[0]] == ident:
                    gather = None  # every row reads one entry in its natural order
                else:
                    gather = [entry[t] * R + where[t][r] for t, r in zip(ops, order)]
                sides.append(_Side(entry[ops[0]], gather, slices))
                orders.append(order)
            if len(sides) == 1:
                order_b, binary_slices, perms = orders[0], [], [None]
            else:
                order_b, binary_slices = _sort_rows([p.groups[k][4] for p in rows])
                perms = []
                for order in orders:
                    inv = _inverse(order)
                    perm = [inv[r] for r in order_b]
                    perms.append(None if perm == ident else perm)
            rk = f"r{k + 1}"
            if rk in entry:
                where[rk] = _inverse(order_b)
            self._groups.append(_Group(sides, perms, [s for s in binary_slices if s[0] != "keep"], entry.get(rk)))
        self._final = None if order_b == ident else _inverse(order_b)
        self._entries = len(entries)
        self._layout: tuple | None = None

    def __len__(self) -> int:
        return len(self.programs)

    def init(self, params: Tensor) -> RuleState:
        if params.shape[0] != len(self.programs):
            raise ValueError(f"params has {params.shape[0]} rows for {len(self.programs)} rules")
        return RuleState(0, {k: torch.zeros_like(params) for k in sorted(self._needs)})

    def _prepare(self, R: int, D: int, dtype: torch.dtype, device: torch.device) -> None:
        """Index tensors and the operand bank for R rows of D numbers."""
        def as_index(idx: list[int] | None) -> Tensor | None:
            return None if idx is None else torch.tensor(idx, dtype=torch.long, device=device)

        for grp in self._groups:
            for side in grp.sides:
                side.index = as_index(side.gather)
            grp.perm_index = [as_index(p) for p in grp.perms]
        self._final_index = as_index(self._final)
        self._bank = torch.empty(self._entries, R, D, dtype=dtype, device=device)
        self._layout = (R, D, dtype, device)

    def update(self, state: RuleState, grad: Tensor, params: Tensor) -> tuple[Tensor, RuleState]:
        R = grad.shape[0]
        if R != len(self.programs):
            raise ValueError(f"grad has {R} rows for {len(self.programs)} rules")
        D = grad[0].numel()
        if self._layout != (R, D, grad.dtype, grad.device):
            self._prepare(R, D, grad.dtype, grad.device)
        h, gen, bank = self.hyper, self.generator, self._bank
        avgs = {k: [t] for k, t in state.averages.items()}
        update_averages(avgs, [grad], h)
        step = state.step + 1
        inp = Inputs([grad.reshape(R, D)], [params.reshape(R, D)],
                     *([avgs[k][0].reshape(R, D)] if k in avgs else None for k in ("m", "v", "y")),
                     step, h, gen)
        if self._base:
            torch.stack([inp.get(t)[0][0] for t in self._base], out=bank[: len(self._base)])
        rows_of_bank = bank.view(-1, D)
        x: Tensor | None = None
        for grp in self._groups:
            vals = []
            for side in grp.sides:
                v = bank[side.entry].clone() if side.index is None else rows_of_bank.index_select(0, side.index)
                for tok, lo, hi in side.slices:
                    if tok != "id":
                        UNARY[tok]([v[lo:hi]], gen)
                vals.append(v)
            a, *rest = [v if p is None else v.index_select(0, p) for v, p in zip(vals, grp.perm_index)]
            if rest:
                c = rest[0]
                for tok, lo, hi in grp.binary_slices:
                    BINARY[tok]([a[lo:hi]], [c[lo:hi]], h.eps)
            if grp.result_entry is not None:
                bank[grp.result_entry].copy_(a)
            x = a
        assert x is not None
        d = x if self._final_index is None else x.index_select(0, self._final_index)
        return d.view_as(grad), replace(state, step=step)
