"""``Program``: an update rule as the paper's token string, and the expression it denotes.

A program of depth n is 5n tokens, groups ``(op1, op2, u1, u2, b)``. Group k computes
``b(u1(op1), u2(op2))``; its result becomes operand ``r{k}`` of later groups, and the
last group's result is the update direction: ``w <- w - lr * result``.

The expression tree uses plain tuples so it is cheap, hashable and easy to walk:

- ``("op", name)`` a base operand,
- ``("u", name, child)`` a unary function,
- ``("b", name, left, right)`` a binary function.

(``Tree`` and the walks over it live in ``tree.py``, the canonical form in ``canonical.py``;
both sit below this module.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from nos_gym.dsl.canonical import canonicalize, tree_key
from nos_gym.dsl.tree import Tree, format_tree, leaves, names, simplify
from nos_gym.dsl.vocabulary import (
    BASE_OPERANDS,
    BINARY,
    GROUP_SIZE,
    SLOT_KINDS,
    STOCHASTIC,
    UNARY,
    Vocabulary,
    is_result_operand,
    result_index,
    result_operand,
)

__all__ = ["InvalidProgramError", "Program", "Tree"]


class InvalidProgramError(ValueError):
    """A token string that is not a well-formed program (wrong kind, length or reference)."""


def _check_tokens(tokens: tuple[str, ...]) -> None:
    if len(tokens) == 0 or len(tokens) % GROUP_SIZE:
        raise InvalidProgramError(
            f"a program has 5n tokens (groups of op1, op2, u1, u2, b); got {len(tokens)}"
        )
    for i, tok in enumerate(tokens):
        group, slot = divmod(i, GROUP_SIZE)
        kind = SLOT_KINDS[slot]
        if kind == "operand":
            if tok in BASE_OPERANDS:
                continue
            if is_result_operand(tok):
                if 1 <= result_index(tok) <= group:
                    continue
                raise InvalidProgramError(
                    f"token {i} ({tok!r}) in group {group + 1} refers to a result that is not "
                    f"computed yet; allowed results here: "
                    f"{[result_operand(k) for k in range(1, group + 1)]}"
                )
            raise InvalidProgramError(f"token {i} ({tok!r}) must be an operand: {list(BASE_OPERANDS)}")
        table = UNARY if kind == "unary" else BINARY
        if tok not in table:
            raise InvalidProgramError(f"token {i} ({tok!r}) must be a {kind} function: {list(table)}")


@dataclass(frozen=True)
class Program:
    """An update rule in the paper's language: ``tokens`` is a tuple of 5n token names."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        _check_tokens(self.tokens)

    # -- structure -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.tokens) // GROUP_SIZE

    @cached_property
    def groups(self) -> tuple[tuple[str, str, str, str, str], ...]:
        # cached: the batched executors read it for every row and slot
        t = self.tokens
        return tuple(tuple(t[i : i + GROUP_SIZE]) for i in range(0, len(t), GROUP_SIZE))  # type: ignore[misc]

    @cached_property
    def tree(self) -> Tree:
        """The expression tree of the final update, with earlier results substituted in."""
        results: list[Tree] = []
        for op1, op2, u1, u2, b in self.groups:
            left = ("u", u1, results[result_index(op1) - 1] if is_result_operand(op1) else ("op", op1))
            right = ("u", u2, results[result_index(op2) - 1] if is_result_operand(op2) else ("op", op2))
            results.append(("b", b, left, right))
        return results[-1]

    @cached_property
    def used_operands(self) -> frozenset[str]:
        """Base operands the update actually depends on (keep-left's dropped branch excluded)."""
        return frozenset(leaves(simplify(self.tree)))

    @cached_property
    def stochastic(self) -> bool:
        """Whether the update draws random numbers (``noise`` or ``drop``; unused branches aside)."""
        return any(name in STOCHASTIC for name in names(simplify(self.tree)))

    # -- notation ------------------------------------------------------------------------
    def format(self) -> str:
        """The rule in the paper's notation, e.g. ``g * exp(sign(g) * sign(m))``."""
        return format_tree(simplify(self.tree))

    def __str__(self) -> str:
        return self.format()

    @cached_property
    def canonical_tree(self) -> Tree:
        return canonicalize(self.tree)

    @cached_property
    def canonical_key(self) -> str:
        """A string shared by all token strings that denote the same rule (see ``canonical``)."""
        return tree_key(self.canonical_tree)

    # -- integer ids (the env's action space) ---------------------------------------------
    def ids(self, vocab: Vocabulary | None = None) -> list[int]:
        vocab = vocab or Vocabulary(self.depth)
        return [vocab.index(t) for t in self.tokens]

    @classmethod
    def from_ids(cls, ids, vocab: Vocabulary) -> Program:
        tokens = vocab.tokens
        return cls(tuple(tokens[int(i)] for i in ids))

