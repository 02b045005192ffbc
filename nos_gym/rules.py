"""Compile programs into elementwise updates: one rule, or a batch of different rules at once.

The split follows optax: ``rule.init(params)`` makes the state (running averages and the
step count), ``rule.update(state, grad, params)`` returns the update direction ``d`` and
advances the state once; the caller applies ``w <- w - lr * d``.

The language's primitives are defined once, below, on lists of tensors with
``torch._foreach_*`` kernels: ``Inputs.get`` computes operands, ``UNARY`` and ``BINARY``
apply functions in place. Two executors use them:

- ``apply_rule`` runs one program over a list of parameter tensors (``NOSOptimizer``);
- ``BatchedRule`` runs B different programs on parameters stacked on a leading axis of size
  B (row i is trained by program i), with no Python loop over the rules: per step, one
  "bank" of every base operand any row reads, then per group one gather (both sides of
  every row, ordered by unary), one call per unary token, one gather into the binary's
  order and one call per binary token. A step costs a fixed number of kernels per
  distinct token, whatever B is (the class docstring has the details).

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

from dataclasses import dataclass, field
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

#: The version of the language's numerical semantics (operands, functions, random draws).
#: Every task's fingerprint includes it, so scores computed under other semantics are never
#: reused from a cache or store. 2: ``drop`` zeroes entries even when inf; ``noise`` is a
#: fresh float32 draw per read (stochastic rules score differently than under 1).
SEMANTICS_VERSION = 2


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


UNARY: dict[str, Callable[[Values, torch.Generator | None], None]] = {
    "id": lambda x, gen: None,
    "neg": lambda x, gen: torch._foreach_neg_(x),
    "exp": lambda x, gen: torch._foreach_exp_(x),
    "log_abs": _log_abs,
    "sign": lambda x, gen: torch._foreach_sign_(x),
    "sqrt_abs": _sqrt_abs,
    **{name: (lambda x, gen, lv=level: clip_(x, lv)) for name, level in CLIP_LEVELS.items()},
    **{name: (lambda x, gen, p=rate: drop_(x, p, gen)) for name, rate in DROP_RATES.items()},
}

#: unary tokens that differ only in a constant: the batched executor runs each family as
#: one call with a per-row constant. Per family: (function, token -> constant, the function's
#: argument made from a column of per-row constants of the data's dtype)
UNARY_FAMILIES: dict[str, tuple[Callable[[Values, list, torch.Generator | None], None], dict[str, float],
                                Callable[[Tensor], object]]] = {
    "clip": (lambda x, bounds, gen: clip_(x, bounds), CLIP_LEVELS, lambda c: (-c, c)),
    "drop": (drop_, DROP_RATES, lambda c: c.float()),  # compared with float32 draws
}
_FAMILY_OF = {tok: fam for fam, (_, consts, _) in UNARY_FAMILIES.items() for tok in consts}

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


def update_averages(avgs: dict[str, Values], g: Values, hyper: Hyper, g3: Values | None = None) -> None:
    """Advance the running averages in place by one step (``g3``: g^3 if the caller has it)."""
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
    if depth == program.depth:
        return program
    tokens = list(program.tokens)
    for k in range(program.depth, depth):
        tokens += [f"r{k}", "one", "id", "id", "keep"]
    return Program(tuple(tokens))


def _unary_key(tok: str) -> tuple[str, str]:
    # members of a family (clip levels, drop rates) sort next to each other: one call each
    return (_FAMILY_OF.get(tok, tok), tok)


def _sort_rows(tokens: list[str], key: Callable[[str], object] = str) -> tuple[list[int], list[tuple[str, int, int]]]:
    """Rows ordered so that equal tokens are contiguous (stable), and each token's run ``(token, lo, hi)``."""
    rank = {tok: i for i, tok in enumerate(sorted(set(tokens), key=key))}
    order = sorted(range(len(tokens)), key=lambda i: (rank[tokens[i]], i))
    runs: list[tuple[str, int, int]] = []
    for pos, row in enumerate(order):
        tok = tokens[row]
        if runs and runs[-1][0] == tok:
            runs[-1] = (tok, runs[-1][1], pos + 1)
        else:
            runs.append((tok, pos, pos + 1))
    return order, runs


def _family_runs(runs: list[tuple[str, int, int]]) -> list[tuple[str, int, int, list[float]]]:
    """Adjacent runs of one family's tokens merged into one run of the family, with each
    row's constant; other runs unchanged (with no constants)."""
    merged: list[tuple[str, int, int, list[float]]] = []
    for tok, lo, hi in runs:
        fam = _FAMILY_OF.get(tok)
        if fam is None:
            merged.append((tok, lo, hi, []))
            continue
        const = [UNARY_FAMILIES[fam][1][tok]] * (hi - lo)
        if merged and merged[-1][0] == fam and merged[-1][2] == lo:
            merged[-1] = (fam, merged[-1][1], hi, merged[-1][3] + const)
        else:
            merged.append((fam, lo, hi, const))
    return merged


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for pos, row in enumerate(order):
        inv[row] = pos
    return inv


_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _wide_rows(t: Tensor) -> Tensor:
    """``t``'s rows as half as many complex numbers: a row gather then moves half as many
    items (3.5x faster for the Rosenbrock task's 2-number rows). Same bytes, same values."""
    if t.dim() == 2 and t.shape[1] % 2 == 0 and t.dtype in _COMPLEX_OF and t.stride(1) == 1 and t.stride(0) == t.shape[1]:
        wide = t.view(_COMPLEX_OF[t.dtype])
        return wide.view(-1) if wide.shape[1] == 1 else wide  # 1-D: index_select's fast path
    return t


@dataclass
class _Group:
    reads: list[int]                    # the bank row each slot reads, slots in unary order
    runs: list[tuple[str, int, int]]    # (unary, lo, hi) over the slots
    perm: list[int] | None              # two-sided: the slots of the left sides in the binary's
                                        # order, then those of the right sides
    binary_runs: list[tuple[str, int, int]]
    result: int | None                  # first bank row of this group's result, if a later group reads it


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
    number of kernels per distinct token, whatever B is; the plan (indices, views, the
    list of calls) is built once per shape.

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
        groups = [[p.groups[k] for p in rows] for k in range(depth)]
        self._needs = needed_averages(rows)
        R = len(rows)
        ident = list(range(R))
        # slots of group k: (row, side); the right side is skipped when every row keeps left
        sides = [(0,) if all(g[4] == "keep" for g in grp) else (0, 1) for grp in groups]
        used = {g[s] for k, grp in enumerate(groups) for g in grp for s in sides[k]}
        base = sorted(t for t in used if not is_result_operand(t))
        self._constant = [t for t in base if t == "one"]                   # written once
        # g^2 and g^3 first, once: the operands and y's average share them
        g3 = "g3" in base or "y" in self._needs
        self._powers = ["g2", "g3"] if g3 else ["g2"] if "g2" in base else []
        self._scaled_w = [t for t in base if t in WEIGHT_SCALES]           # one multiply, every step
        self._computed = [t for t in base if t not in ("one", "noise", "g2", "g3", *WEIGHT_SCALES)]
        # bank rows: constants, powers, computed operands, weight operands (R rows each), one
        # noise row per read, results
        entries = self._constant + self._powers + self._computed + self._scaled_w
        offset = {t: i * R for i, t in enumerate(entries)}
        self._noise_start = len(entries) * R
        self._noise_rows = sum(g[s] == "noise" for k, grp in enumerate(groups) for g in grp for s in sides[k])
        next_row = self._noise_start + self._noise_rows
        for t in sorted((t for t in used if is_result_operand(t)), key=result_index):
            offset[t], next_row = next_row, next_row + R
        self._bank_rows = next_row
        noise_row = self._noise_start
        where: dict[str, list[int]] = {}  # result operand -> position of each row in its bank entry
        self._groups: list[_Group] = []
        order_b = ident
        for k, grp in enumerate(groups):
            slots = [(r, s) for s in sides[k] for r in ident]
            order, runs = _sort_rows([grp[r][2 + s] for r, s in slots], key=_unary_key)
            reads = []
            for r, s in (slots[i] for i in order):
                op = grp[r][s]
                if op == "noise":
                    reads.append(noise_row)
                    noise_row += 1
                else:
                    reads.append(offset[op] + (where[op][r] if is_result_operand(op) else r))
            if len(sides[k]) == 1:  # every row keeps its left side: no binary
                order_b, binary_runs, perm = [slots[i][0] for i in order], [], None
            else:
                order_b, binary_runs = _sort_rows([g[4] for g in grp])
                at = _inverse(order)  # slot -> position in the unary order
                perm = [at[r] for r in order_b] + [at[R + r] for r in order_b]
            rk = f"r{k + 1}"
            if rk in offset:
                where[rk] = _inverse(order_b)
            self._groups.append(_Group(reads, runs, perm, [b for b in binary_runs if b[0] != "keep"], offset.get(rk)))
        self._final = None if order_b == ident else _inverse(order_b)
        self._layout: tuple | None = None

    def __len__(self) -> int:
        return len(self.programs)

    def init(self, params: Tensor) -> RuleState:
        if params.shape[0] != len(self.programs):
            raise ValueError(f"params has {params.shape[0]} rows for {len(self.programs)} rules")
        return RuleState(0, {k: torch.zeros_like(params) for k in sorted(self._needs)})

    # ------------------------------------------------------------------ the step plan
    def _prepare(self, R: int, D: int, dtype: torch.dtype, device: torch.device) -> None:
        """The bank, the work buffers, their fixed views and the list of calls of one step."""
        def index(rows: list[int]) -> Tensor:
            return torch.tensor(rows, dtype=torch.long, device=device)

        def gather(src: Tensor, rows: list[int], dst: Tensor) -> Callable[[], None]:
            n = len(rows)
            if rows == list(range(rows[0], rows[0] + n)):  # a contiguous block: a plain copy
                block = src[rows[0]: rows[0] + n]
                return lambda: dst.copy_(block)
            src_w, dst_w, idx = _wide_rows(src), _wide_rows(dst), index(rows)
            return lambda: torch.index_select(src_w, 0, idx, out=dst_w)

        bank = torch.empty(self._bank_rows, D, dtype=dtype, device=device)
        for i, t in enumerate(self._constant):
            bank[i * R: (i + 1) * R].fill_(1.0)  # "one", the only constant operand
        p0 = len(self._constant) * R
        self._power_views = [bank[p0 + i * R: p0 + (i + 1) * R] for i in range(len(self._powers))]
        c0 = p0 + len(self._powers) * R
        self._computed_view = bank[c0: c0 + len(self._computed) * R].view(len(self._computed), R, D)
        w0 = c0 + len(self._computed) * R
        self._scaled_w_view = bank[w0: w0 + len(self._scaled_w) * R].view(len(self._scaled_w), R, D)
        self._w_scales = torch.tensor([WEIGHT_SCALES[t] for t in self._scaled_w], dtype=dtype, device=device).view(-1, 1, 1)
        self._noise_view = bank[self._noise_start: self._noise_start + self._noise_rows]
        gen, eps = self.generator, self.hyper.eps
        calls: list[Callable[[], None]] = []
        last: Tensor | None = None
        for grp in self._groups:
            result = None if grp.result is None else bank[grp.result: grp.result + R]
            # the slots in unary order (outside the bank: a gather may not write into its source)
            work = torch.empty(len(grp.reads), D, dtype=dtype, device=device)
            calls.append(gather(bank, grp.reads, work))
            for tok, lo, hi, consts in _family_runs(grp.runs):
                view = [work[lo:hi]]
                if tok in UNARY_FAMILIES:
                    fn, _, argument = UNARY_FAMILIES[tok]
                    const = [argument(torch.tensor(consts, dtype=dtype, device=device).view(-1, 1))]
                    calls.append(lambda fn=fn, view=view, const=const: fn(view, const, gen))
                elif tok != "id":
                    fn = UNARY[tok]
                    calls.append(lambda fn=fn, view=view: fn(view, gen))
            if grp.perm is None:
                a = work
            else:
                sides = torch.empty(2 * R, D, dtype=dtype, device=device)
                calls.append(gather(work, grp.perm, sides))
                a, c = sides[:R], sides[R:]
                for tok, lo, hi in grp.binary_runs:
                    fn, left, right = BINARY[tok], [a[lo:hi]], [c[lo:hi]]
                    calls.append(lambda fn=fn, left=left, right=right: fn(left, right, eps))
            if result is not None:
                calls.append(lambda src=a, dst=result: dst.copy_(src))
            last = a
        assert last is not None
        self._last = _wide_rows(last)
        self._final_index = None if self._final is None else index(self._final)
        self._calls = calls
        self._layout = (R, D, dtype, device)

    def update(self, state: RuleState, grad: Tensor, params: Tensor) -> tuple[Tensor, RuleState]:
        R = grad.shape[0]
        if R != len(self.programs):
            raise ValueError(f"grad has {R} rows for {len(self.programs)} rules")
        D = grad.numel() // R
        if self._layout != (R, D, grad.dtype, grad.device):
            self._prepare(R, D, grad.dtype, grad.device)
        h = self.hyper
        g = grad.reshape(R, D)
        known: dict[str, Values] = {}
        if self._powers:
            known["g2"] = [torch.mul(g, g, out=self._power_views[0])]
            if len(self._powers) == 2:
                known["g3"] = [torch.mul(known["g2"][0], g, out=self._power_views[1])]
        avgs = {k: [t] for k, t in state.averages.items()}
        update_averages(avgs, [grad], h, g3=[known["g3"][0].view_as(grad)] if "g3" in known else None)
        step = state.step + 1
        inp = Inputs([g], [params.reshape(R, D)],
                     *([avgs[k][0].reshape(R, D)] if k in avgs else None for k in ("m", "v", "y")),
                     step, h, self.generator, known)
        if self._computed:
            torch.stack([inp.get(t)[0][0] for t in self._computed], out=self._computed_view)
        if self._scaled_w:  # the operands w * 10^k (as Inputs.get defines them) as one broadcast multiply
            torch.mul(params.reshape(1, R, D), self._w_scales, out=self._scaled_w_view)
        if self._noise_rows:
            draw_noise(self._noise_view, h, self.generator, out=self._noise_view)
        for call in self._calls:
            call()
        last = self._last
        d = last.clone() if self._final_index is None else last.index_select(0, self._final_index)
        return d.view(grad.dtype).view_as(grad), RuleState(step, state.averages)
