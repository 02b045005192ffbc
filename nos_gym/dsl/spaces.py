"""Search spaces (named subsets of the vocabulary), the paper's constraints, and masks.

Section 4.1: "we find it helpful to only work with subsets of the operands and functions
... typical search space sizes ranging from 10^6 to 10^10". The constraints, each
switchable, are: the two operands of a group differ; addition is not the final binary;
each later group reuses an earlier result (op1 or op2 of group k >= 2 is some r_j).
They are enforced as masks, as the paper does with -inf logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nos_gym.dsl.program import Program
from nos_gym.dsl.vocabulary import (
    BASE_OPERANDS,
    BINARY,
    GROUP_SIZE,
    PAPER_UNARY,
    UNARY,
    Vocabulary,
    is_result_operand,
    result_operand,
)


@dataclass(frozen=True)
class Constraints:
    """The paper's sampling constraints (section 4.1), each on by default."""

    distinct_operands: bool = True
    no_final_addition: bool = True
    reuse_result: bool = True


@dataclass(frozen=True)
class SearchSpace:
    """The base operands, unary and binary functions an agent may choose from."""

    name: str
    operands: tuple[str, ...]
    unary: tuple[str, ...]
    binary: tuple[str, ...]

    def __post_init__(self) -> None:
        for kind, chosen, table in (
            ("operand", self.operands, BASE_OPERANDS),
            ("unary function", self.unary, UNARY),
            ("binary function", self.binary, BINARY),
        ):
            unknown = [t for t in chosen if t not in table]
            if unknown or not chosen:
                raise ValueError(
                    f"search space {self.name!r}: bad {kind}s {unknown or '(none given)'}; "
                    f"choose from {list(table)}"
                )

    def size(self, depth: int, constraints: Constraints = Constraints()) -> int:
        """Number of distinct token strings of this depth that obey the constraints."""
        total = 1
        n_base = len(self.operands)
        for k in range(1, depth + 1):
            n = n_base + k - 1
            pairs = n * (n - 1) if constraints.distinct_operands else n * n
            if constraints.reuse_result and k >= 2:
                pairs -= n_base * (n_base - 1) if constraints.distinct_operands else n_base * n_base
            n_binary = len(self.binary)
            if k == depth and constraints.no_final_addition and "add" in self.binary:
                n_binary -= 1
            total *= pairs * len(self.unary) ** 2 * n_binary
        return total

    def contains(self, program: Program, constraints: Constraints | None = None) -> bool:
        """Whether every token of ``program`` is allowed here (and obeys ``constraints``)."""
        masker = Masker(self, program.depth, constraints or Constraints(False, False, False))
        vocab = masker.vocab
        prefix: list[int] = []
        for tok in program.tokens:
            if not masker.mask(prefix)[vocab.index(tok)]:
                return False
            prefix.append(vocab.index(tok))
        return True


SPACES: dict[str, SearchSpace] = {
    space.name: space
    for space in (
        # Section 4.1 exactly.
        SearchSpace("full", tuple(BASE_OPERANDS), PAPER_UNARY, tuple(BINARY)),
        # Section 4.1 plus sqrt|x|, which Figure 2's RMSProp and Adam strings need.
        SearchSpace("extended", tuple(BASE_OPERANDS), tuple(UNARY), tuple(BINARY)),
        # A subset around the paper's discovered rules: about 1e6 rules at depth 2.
        SearchSpace(
            "small",
            ("g", "g2", "m", "v", "sign_g", "sign_m", "one", "adam"),
            ("id", "neg", "exp", "sign", "clip1e-4", "drop0.3"),
            ("add", "sub", "mul", "div", "keep"),
        ),
        # The PowerSign/AddSign family: sign agreement of g and m, scaled.
        SearchSpace(
            "sign",
            ("g", "m", "sign_g", "sign_m", "one", "adam"),
            ("id", "neg", "exp", "sign"),
            ("add", "sub", "mul", "keep"),
        ),
    )
}


def get_space(space: str | SearchSpace) -> SearchSpace:
    if isinstance(space, SearchSpace):
        return space
    try:
        return SPACES[space]
    except KeyError:
        raise ValueError(f"unknown search space {space!r}; choose from {sorted(SPACES)}") from None


@dataclass
class Masker:
    """Valid next tokens for a prefix, as a bool array over ``Vocabulary(depth)``.

    Masks for each position are built once; a call only applies the constraints that
    depend on the prefix (the first operand of the group), so it is cheap enough for
    the env's step loop.
    """

    space: SearchSpace
    depth: int
    constraints: Constraints = field(default_factory=Constraints)

    def __post_init__(self) -> None:
        self.vocab = Vocabulary(self.depth)
        V = len(self.vocab)
        idx = self.vocab.index
        if self.constraints.distinct_operands and len(self.space.operands) < 2:
            raise ValueError(f"space {self.space.name!r} has one operand: it cannot obey distinct_operands")
        self._base: list[np.ndarray] = []
        self._results_only: list[np.ndarray] = []
        for pos in range(GROUP_SIZE * self.depth):
            k, slot = divmod(pos, GROUP_SIZE)  # k is the 0-based group
            m = np.zeros(V, dtype=bool)
            results = np.zeros(V, dtype=bool)
            if slot < 2:
                m[[idx(o) for o in self.space.operands]] = True
                for j in range(1, k + 1):
                    m[idx(result_operand(j))] = True
                    results[idx(result_operand(j))] = True
            elif slot < 4:
                m[[idx(u) for u in self.space.unary]] = True
            else:
                allowed = [b for b in self.space.binary]
                if k == self.depth - 1 and self.constraints.no_final_addition:
                    allowed = [b for b in allowed if b != "add"]
                    if not allowed:
                        raise ValueError(f"space {self.space.name!r}: no final binary left after no_final_addition")
                m[[idx(b) for b in allowed]] = True
            self._base.append(m)
            self._results_only.append(results)

    @property
    def length(self) -> int:
        return GROUP_SIZE * self.depth

    def mask(self, prefix: list[int] | tuple[int, ...] | np.ndarray) -> np.ndarray:
        """Bool mask of the valid tokens at position ``len(prefix)`` (a fresh array)."""
        pos = len(prefix)
        if pos >= self.length:
            raise IndexError(f"the program is complete ({self.length} tokens)")
        m = self._base[pos].copy()
        if pos % GROUP_SIZE == 1:
            op1 = int(prefix[-1])
            if self.constraints.distinct_operands:
                m[op1] = False
            if self.constraints.reuse_result and pos >= GROUP_SIZE and not is_result_operand(self.vocab.tokens[op1]):
                m &= self._results_only[pos]
        return m

    def sample(self, rng: np.random.Generator) -> Program:
        """A program drawn token by token, uniformly among the valid tokens at each step."""
        prefix: list[int] = []
        for _ in range(self.length):
            choices = np.flatnonzero(self.mask(prefix))
            prefix.append(int(rng.choice(choices)))
        return Program.from_ids(prefix, self.vocab)

    def sample_many(self, n: int, seed: int | np.random.Generator = 0, *, distinct: bool = False,
                    deterministic: bool = False) -> list[Program]:
        """``n`` programs drawn by ``sample``; ``distinct``: no two with one canonical key;
        ``deterministic``: none that draws random numbers (``Program.stochastic``)."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        out: dict[object, Program] = {}
        misses = 0  # draws in a row that added nothing: the space is (nearly) used up
        while len(out) < n:
            p = self.sample(rng)
            key = p.canonical_key if distinct else len(out)
            if (deterministic and p.stochastic) or key in out:
                misses += 1
                if misses > 2_000:
                    raise ValueError(f"drew {len(out)} of {n} programs (distinct={distinct}, deterministic="
                                     f"{deterministic}), then 2,000 draws in a row added none: the space "
                                     f"holds too few such programs")
                continue
            misses = 0
            out[key] = p
        return list(out.values())

    def violations(self, program: Program) -> list[str]:
        """Human-readable list of constraints ``program`` breaks (empty when valid)."""
        out = []
        for k, (op1, op2, _, _, b) in enumerate(program.groups):
            if self.constraints.distinct_operands and op1 == op2:
                out.append(f"group {k + 1}: both operands are {op1!r}")
            if self.constraints.reuse_result and k >= 1 and not (is_result_operand(op1) or is_result_operand(op2)):
                out.append(f"group {k + 1}: uses no earlier result")
            if self.constraints.no_final_addition and k == program.depth - 1 and b == "add":
                out.append("the final binary is addition")
        return out
