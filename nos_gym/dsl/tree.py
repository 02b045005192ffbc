"""The expression tree of a rule, and the walks over it that need nothing but the tree.

A tree is plain tuples, so it is cheap, hashable and easy to walk:

- ``("op", name)`` a base operand,
- ``("u", name, child)`` a unary function,
- ``("b", name, left, right)`` a binary function.

``Program.tree`` builds one from a token string; ``canonical.py`` rewrites one into the
canonical form; ``format_tree`` (here) writes one in the paper's notation and
``notation.py`` parses it back. This module sits below all of them and imports only the
vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

from nos_gym.dsl.vocabulary import BASE_OPERANDS, UNARY, WEIGHT_SCALES

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


# ------------------------------------------------------------------------------ format
_PREC = {"add": 1, "sub": 1, "mul": 2, "div": 2}
_ATOM = 4


def _prec(node: Tree) -> int:
    if node[0] == "b":
        return _PREC[node[1]]
    if node[0] == "u" and node[1] == "neg":
        return 3
    if node[0] == "op" and node[1] in WEIGHT_SCALES:
        return 2  # "1e-3 * w" reads as a product
    return _ATOM


def format_tree(node: Tree) -> str:
    """Infix paper notation with the fewest parentheses that keep the meaning."""
    kind = node[0]
    if kind == "op":
        return BASE_OPERANDS[node[1]]
    if kind == "u":
        child = node[2]
        if node[1] == "neg":
            inner = format_tree(child)
            return f"-{inner}" if _prec(child) >= 3 else f"-({inner})"
        return UNARY[node[1]].format(format_tree(child))
    name, left, right = node[1], node[2], node[3]
    p = _PREC[name]
    ls = format_tree(left)
    rs = format_tree(right)
    if _prec(left) < p:
        ls = f"({ls})"
    # the parser is left-associative, so a right operand of equal or looser precedence
    # keeps its brackets: parse(format(p)) gives back p's exact tokens
    if _prec(right) <= p:
        rs = f"({rs})"
    return f"{ls} {'+-*/'['add sub mul div'.split().index(name)]} {rs}"
