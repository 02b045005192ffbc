"""The expression tree of a rule, and the walks over it that need nothing but the tree.

A tree is plain tuples, so it is cheap, hashable and easy to walk:

- ``("op", name)`` a base operand,
- ``("u", name, child)`` a unary function,
- ``("b", name, left, right)`` a binary function.

``Program.tree`` builds one from a token string; ``canonical.py`` rewrites one into the
canonical form; ``notation.py`` formats and parses them. This module sits below all of
them and imports none of them.
"""

from __future__ import annotations

from collections.abc import Iterator

Tree = tuple[str, str] | tuple[str, str, "Tree"] | tuple[str, str, "Tree", "Tree"]


def simplify(node: Tree) -> Tree:
    """Drop identity unaries and keep-left's right branch: what a reader sees, order kept."""
    kind = node[0]
    if kind == "op":
        return node
    if kind == "u":
        child = simplify(node[2])
        return child if node[1] == "id" else ("u", node[1], child)
    if node[1] == "keep":
        return simplify(node[2])
    return ("b", node[1], simplify(node[2]), simplify(node[3]))


def names(node: Tree) -> Iterator[str]:
    """Every operand and function name in the tree."""
    yield node[1]
    for child in node[2:]:
        yield from names(child)  # type: ignore[arg-type]


def leaves(node: Tree) -> Iterator[str]:
    """The operand names at the leaves, left to right."""
    if node[0] == "op":
        yield node[1]
    else:
        for child in node[2:]:
            yield from leaves(child)  # type: ignore[arg-type]
