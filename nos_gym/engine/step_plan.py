"""The batched executor's step plan: what ``BatchedRule`` does in one step, as plain records.

``build_plan(programs)`` looks only at the programs' tokens (no torch, no tensors) and
says, for B programs run side by side on B stacked rows, where every operand is kept and
which call runs over which rows. ``nos_gym.engine.rules.BatchedRule`` binds a plan to tensors
(a row width, dtype and device) and runs it; the plan can be read and tested alone.

The words of the plan:

- a **row** is one program: row ``i`` of the stacked parameters is trained by program ``i``
  (shorter programs are padded to the deepest with pass-through groups ``keep(r_k, 1)``);
- the **bank** is one tensor of rows holding every operand any program reads in a step,
  in entries of ``rows`` rows each (row ``i`` of an entry is program ``i``'s value): the
  constant ``1`` (written once), the powers ``g^2``, ``g^3`` (computed first, and shared
  with y's running average), the operands computed from g and the averages (one stack per
  step), the weight operands ``10^-k w`` (one broadcast multiply per step); then one row
  per read of ``noise`` (every read is a fresh draw); then an entry per group result that
  a later group reads (``BankLayout``);
- a **slot** is one side of one row's group: its operand and unary. A group has 2B slots
  (all left sides, then all right sides), or B when every program keeps the left side
  (the right sides are then never computed);
- a **run** is a contiguous range ``lo:hi`` of slots or rows that one call processes: one
  unary or binary token, or a whole family of unaries that differ only in a constant (the
  clip levels, the drop rates) with each slot's constant (``Run``).

Per group (``GroupPlan``): gather the slots from the bank (``reads``, in an order where the
slots with equal unaries are contiguous), run ``unary_runs`` in place, gather the two
sides into the binaries' order (``sides_order``), run ``binary_runs`` in place, and copy
the result into the bank (``result_row``) if a later group reads it. After the last group,
``Plan.output_index`` puts the rows back in program order.

Random draws (``drop``, ``noise``): every ``drop``/``noise`` token of a program is a
**draw site**, numbered on the program's canonical form (``draw_sites``), and a row's draws
at a site are a fixed function of (the row's stream seed, the step, the site, the column):
``nos_gym.engine.random_streams``. The plan says which (row, site) each noise row of the bank
(``Plan.noise``) and each slot of a ``drop`` run (``Run.draws``) reads, so a row draws the
same numbers in any batch, at any position, and as ``NOSOptimizer`` draws them alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from nos_gym.dsl.canonical import canonicalize
from nos_gym.dsl.program import Program
from nos_gym.dsl.vocabulary import (
    CLIP_LEVELS,
    DROP_RATES,
    GROUP_SIZE,
    STOCHASTIC,
    WEIGHT_SCALES,
    is_result_operand,
    result_index,
)

#: unary tokens that differ only in a constant, by family: one call runs a whole family
#: with a constant per slot (``nos_gym.engine.rules.UNARY_FAMILIES`` holds the functions)
FAMILIES: dict[str, dict[str, float]] = {"clip": CLIP_LEVELS, "drop": DROP_RATES}
_FAMILY_OF = {tok: fam for fam, consts in FAMILIES.items() for tok in consts}


class Draw(NamedTuple):
    """Where a row's random numbers come from: its stream (row ``row``) at draw site ``site``."""

    row: int
    site: int


class Run(NamedTuple):
    """One call over slots (or rows) ``lo:hi``: a token, or a family with each slot's constant
    (and, for ``drop``, each slot's ``Draw``)."""

    token: str
    lo: int
    hi: int
    constants: tuple[float, ...] = ()
    draws: tuple[Draw, ...] = ()


@dataclass(frozen=True)
class BankLayout:
    """Where each operand lives in the bank: entries of ``rows`` rows, in this order."""

    rows: int                            # B: rows per entry, one per program
    constant: tuple[str, ...]            # ("one",) or (): written once, when the bank is made
    powers: tuple[str, ...]              # (), ("g2",) or ("g2", "g3")
    computed: tuple[str, ...]            # operands computed from g and the running averages
    scaled_w: tuple[str, ...]            # weight operands "w1e-4" ... "w1e-1"
    noise_rows: int                      # one row per read of noise
    results: tuple[tuple[str, int], ...]  # (result operand, its first row), for results read later

    @property
    def powers_start(self) -> int:
        return len(self.constant) * self.rows

    @property
    def computed_start(self) -> int:
        return self.powers_start + len(self.powers) * self.rows

    @property
    def scaled_w_start(self) -> int:
        return self.computed_start + len(self.computed) * self.rows

    @property
    def noise_start(self) -> int:
        return self.scaled_w_start + len(self.scaled_w) * self.rows

    @property
    def size(self) -> int:
        """Rows of the whole bank."""
        return self.noise_start + self.noise_rows + len(self.results) * self.rows

    def entry(self, operand: str) -> int:
        """First bank row of a base operand's or a result's entry (not of ``noise``)."""
        for names, start in ((self.constant, 0), (self.powers, self.powers_start),
                             (self.computed, self.computed_start), (self.scaled_w, self.scaled_w_start)):
            if operand in names:
                return start + names.index(operand) * self.rows
        for name, start in self.results:
            if name == operand:
                return start
        raise KeyError(f"operand {operand!r} has no entry in the bank")


@dataclass(frozen=True)
class GroupPlan:
    """One group of every program: two gathers, the unary calls, the binary calls."""

    reads: tuple[int, ...]               # the bank row of each slot, slots in unary order
    unary_runs: tuple[Run, ...]          # over slots; no call for "id"
    row_order: tuple[int, ...]           # the program of each row of the group's output
    sides_order: tuple[int, ...] | None  # the slots of the left sides in row_order, then those of
                                         # the right sides; None: every program keeps the left side
    binary_runs: tuple[Run, ...]         # over rows of the output; no call for "keep"
    result_row: int | None               # where the output is copied in the bank, if a later group reads it


@dataclass(frozen=True)
class Plan:
    """Everything a step of ``BatchedRule`` does for these programs (see the module docstring)."""

    rows: int                            # B, the number of programs
    depth: int                           # groups per program after padding
    averages: tuple[str, ...]            # running averages to keep ("m", "v", "y"), sorted
    bank: BankLayout
    groups: tuple[GroupPlan, ...]
    output_index: tuple[int, ...] | None  # the row of the last output holding each program's update;
                                          # None: already in program order
    noise: tuple[Draw, ...] = ()         # the draw of each noise row of the bank, in bank order

    @property
    def drop_draws(self) -> tuple[Draw, ...]:
        """The draw of every slot of every ``drop`` run, group by group, run by run."""
        return tuple(d for grp in self.groups for run in grp.unary_runs for d in run.draws)


# ---------------------------------------------------------------------- the builder
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


def build_plan(programs: Sequence[Program]) -> Plan:
    """The step plan of ``programs`` run side by side, one row each."""
    if not programs:
        raise ValueError("a plan needs at least one program")
    depth = max(p.depth for p in programs)
    padded = [pad_program(p, depth) for p in programs]
    B = len(padded)
    rows = list(range(B))
    groups = [[p.groups[k] for p in padded] for k in range(depth)]  # groups[k][row] = (op1, op2, u1, u2, b)
    averages = tuple(sorted(needed_averages(padded)))
    # the sides computed in group k: the right side is skipped when every program keeps the left
    sides = [(0,) if all(g[4] == "keep" for g in grp) else (0, 1) for grp in groups]
    bank = _bank_layout(B, [g[s] for k, grp in enumerate(groups) for g in grp for s in sides[k]], averages)

    entry = {t: bank.entry(t) for t in (*bank.constant, *bank.powers, *bank.computed, *bank.scaled_w)}
    entry.update(bank.results)
    sites = [draw_sites(p) for p in programs]  # padding adds no draws and moves no token
    result_order: dict[str, list[int]] = {}  # result operand -> position of each row in its entry
    noise_row = bank.noise_start
    noise: list[Draw] = []
    plans: list[GroupPlan] = []
    row_order = rows
    for k, grp in enumerate(groups):
        slots = [(r, s) for s in sides[k] for r in rows]  # all left sides, then all right sides
        order, unary_runs = _sort_rows([grp[r][2 + s] for r, s in slots], key=_unary_key)
        slot_reads = []
        ordered = [slots[i] for i in order]
        for r, s in ordered:
            op = grp[r][s]
            if op == "noise":  # a fresh draw per read: a row of its own
                noise.append(Draw(r, sites[r][GROUP_SIZE * k + s]))
                slot_reads.append(noise_row)
                noise_row += 1
            elif op in result_order:  # the result of an earlier group
                slot_reads.append(entry[op] + result_order[op][r])
            else:
                slot_reads.append(entry[op] + r)
        if len(sides[k]) == 1:  # no binary: the output is the left sides, in unary order
            row_order, binary_runs, sides_order = [slots[i][0] for i in order], [], None
        else:
            row_order, binary_runs = _sort_rows([g[4] for g in grp])
            at = _inverse(order)  # slot -> its position in unary order
            sides_order = tuple([at[r] for r in row_order] + [at[B + r] for r in row_order])
        result = f"r{k + 1}"
        read_later = result in entry
        if read_later:
            result_order[result] = _inverse(row_order)
        plans.append(GroupPlan(
            reads=tuple(slot_reads),
            unary_runs=tuple(_with_draws(run, ordered, sites, k) for run in _family_runs(unary_runs)
                             if run.token != "id"),
            row_order=tuple(row_order),
            sides_order=sides_order,
            binary_runs=tuple(r for r in binary_runs if r.token != "keep"),
            result_row=entry[result] if read_later else None,
        ))
    output_index = None if row_order == rows else tuple(_inverse(row_order))
    return Plan(B, depth, averages, bank, tuple(plans), output_index, tuple(noise))


# ------------------------------------------------------------------------ draw sites
#: site of a drop/noise token whose value the update never reads (a keep-left's right
#: side, a result no later group reads): the executors may still compute it, and its
#: numbers change nothing. ``UNUSED_SITE + token position``, away from the used ones.
UNUSED_SITE = 1 << 20
_STOCHASTIC = frozenset(STOCHASTIC)


def draw_sites(program: Program) -> dict[int, int]:
    """The draw site of each ``drop``/``noise`` token of ``program``: token position -> site.

    Sites are numbered on the canonical form (``Program.canonical_tree``), so that programs
    with one canonical key draw the same numbers: the canonical tree is walked in prefix
    order (a node before its arguments, arguments in their canonical order) and its
    ``drop`` nodes and ``noise`` leaves are numbered 0, 1, 2, ...; a token gets the number
    of its node (the first, if its group's result is read twice, so it appears twice in
    the tree). E.g. ``drop(g, 0.3) * exp(sign(g) * sign(m))`` and its mirror
    ``exp(sign(m) * sign(g)) * drop(g, 0.3)`` both have one site, 0, at their drop tokens
    (positions 7 and 8 of their token strings). A token the update never reads gets
    ``UNUSED_SITE`` + its position. The canonical rewrites are those of
    ``nos_gym.dsl.canonical`` (tests/test_rules.py checks the two agree), applied to a tree
    whose stochastic nodes carry their token's position. Computed once per Program object
    (kept with it, as its cached properties are).
    """
    known = program.__dict__.get("_draw_sites")
    if known is None:
        known = program.__dict__["_draw_sites"] = _draw_sites(program) if _STOCHASTIC & set(program.tokens) else {}
    return known


def _draw_sites(program: Program) -> dict[int, int]:
    numbered: dict[int, int] = {}
    for n, tag in enumerate(_prefix_tags(canonicalize(_tagged_tree(program)))):
        numbered.setdefault(tag, n)
    sites = {}
    for k, (op1, op2, u1, u2, _) in enumerate(program.groups):
        for s, (op, u) in enumerate(((op1, u1), (op2, u2))):
            for pos, stochastic in ((GROUP_SIZE * k + s, op == "noise"), (GROUP_SIZE * k + 2 + s, u in DROP_RATES)):
                if stochastic:
                    sites[pos] = numbered.get(pos, UNUSED_SITE + pos)
    return sites


# A tagged tree is Program.tree with the position of the token in every stochastic node:
# ("op", "noise", pos) and ("u", "drop0.3", child, pos).
def _tagged_tree(program: Program) -> tuple:
    results: list[tuple] = []
    for k, (op1, op2, u1, u2, b) in enumerate(program.groups):
        sides = []
        for s, (op, u) in enumerate(((op1, u1), (op2, u2))):
            if is_result_operand(op):
                leaf = results[result_index(op) - 1]
            else:
                leaf = ("op", op, GROUP_SIZE * k + s) if op == "noise" else ("op", op)
            sides.append(("u", u, leaf, GROUP_SIZE * k + 2 + s) if u in DROP_RATES else ("u", u, leaf))
        results.append(("b", b, *sides))
    return results[-1]


def _tag_of(node: tuple) -> int | None:
    if node[0] == "op":
        return node[2] if len(node) == 3 else None
    if node[0] == "u":
        return node[3] if len(node) == 4 else None
    return None


def _prefix_tags(node: tuple):
    """The tags of a tagged tree's stochastic nodes in prefix order (repeats included)."""
    tag = _tag_of(node)
    if tag is not None:
        yield tag
    children = node[2:3] if node[0] == "u" else node[2:] if node[0] == "b" else ()
    for child in children:
        yield from _prefix_tags(child)


def _with_draws(run: Run, ordered: list[tuple[int, int]], sites: list[dict[int, int]], k: int) -> Run:
    """A drop run with the draw of each of its slots (``ordered``: group k's (row, side) in unary order)."""
    if run.token != "drop":
        return run
    return run._replace(draws=tuple(Draw(r, sites[r][GROUP_SIZE * k + 2 + s]) for r, s in ordered[run.lo:run.hi]))


def _bank_layout(B: int, reads: list[str], averages: tuple[str, ...]) -> BankLayout:
    """The bank for slots reading the operands ``reads`` (one name per slot, every group)."""
    distinct = set(reads)
    base = sorted(t for t in distinct if not is_result_operand(t))
    # g^2 and g^3 once, first: the operands and y's average share them
    if "g3" in base or "y" in averages:
        powers: tuple[str, ...] = ("g2", "g3")
    else:
        powers = ("g2",) if "g2" in base else ()
    constant = ("one",) if "one" in base else ()
    computed = tuple(t for t in base if t not in ("one", "noise", "g2", "g3", *WEIGHT_SCALES))
    scaled_w = tuple(t for t in base if t in WEIGHT_SCALES)
    noise_rows = reads.count("noise")
    first_result = (len(constant) + len(powers) + len(computed) + len(scaled_w)) * B + noise_rows
    results = sorted((t for t in distinct if is_result_operand(t)), key=result_index)
    return BankLayout(B, constant, powers, computed, scaled_w, noise_rows,
                      tuple((t, first_result + i * B) for i, t in enumerate(results)))


def _unary_key(tok: str) -> tuple[str, str]:
    # members of a family (clip levels, drop rates) sort next to each other: one call each
    return (_FAMILY_OF.get(tok, tok), tok)


def _sort_rows(tokens: list[str], key: Callable[[str], object] = str) -> tuple[list[int], list[Run]]:
    """Indices ordered so that equal tokens are contiguous (stable), and each token's run."""
    rank = {tok: i for i, tok in enumerate(sorted(set(tokens), key=key))}
    order = sorted(range(len(tokens)), key=lambda i: (rank[tokens[i]], i))
    runs: list[Run] = []
    lo = 0
    for pos in range(1, len(order) + 1):
        if pos == len(order) or tokens[order[pos]] != tokens[order[lo]]:
            runs.append(Run(tokens[order[lo]], lo, pos))
            lo = pos
    return order, runs


def _family_runs(runs: list[Run]) -> list[Run]:
    """Adjacent runs of one family's tokens merged into one run of the family, with each
    slot's constant; other runs unchanged."""
    merged: list[Run] = []
    for run in runs:
        fam = _FAMILY_OF.get(run.token)
        if fam is None:
            merged.append(run)
            continue
        const = (FAMILIES[fam][run.token],) * (run.hi - run.lo)
        if merged and merged[-1].token == fam and merged[-1].hi == run.lo:
            merged[-1] = Run(fam, merged[-1].lo, run.hi, merged[-1].constants + const)
        else:
            merged.append(Run(fam, run.lo, run.hi, const))
    return merged


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for pos, i in enumerate(order):
        inv[i] = pos
    return inv
