"""Canonical form: one key for the many token strings that denote one rule.

Section 3.1 notes that many strings map to one update rule, including strings of
different lengths (the 1-step and 2-step Adam of Figure 2). The rewrites below are exact
identities of the computation, so two programs with one key compute the same numbers
(up to floating-point reassociation, and up to the random draws of ``drop``/``noise``):

- ``x`` (identity) disappears, and keep-left drops its right branch;
- ``-(-x) = x``; ``sign(sign(x)) = sign(x)``; ``sign(g)``/``sign(m)`` as a unary on the
  operand equals the operand of that name;
- ``ADAM`` is ``m / sqrt|v|`` and ``RMSProp`` is ``g / sqrt|v|`` (with the language's
  protected division ``x / (y + eps)``), so the operand, the 1-step string and the
  2-step string of Adam share a key;
- ``+`` and ``*`` are associative and commutative: nested sums and products are
  flattened and their terms sorted.
"""

from __future__ import annotations

from nos_gym.dsl.tree import Tree
from nos_gym.dsl.vocabulary import COMMUTATIVE

_EXPANSIONS: dict[str, Tree] = {
    "adam": ("b", "div", ("op", "m"), ("u", "sqrt_abs", ("op", "v"))),
    "rmsprop": ("b", "div", ("op", "g"), ("u", "sqrt_abs", ("op", "v"))),
}
_SIGN_OPERANDS = {"g": "sign_g", "m": "sign_m"}


def canonicalize(node: Tree) -> Tree:
    kind = node[0]
    if kind == "op":
        return _EXPANSIONS.get(node[1], node)
    if kind == "u":
        name, child = node[1], canonicalize(node[2])
        if name == "id":
            return child
        if name == "neg" and child[0] == "u" and child[1] == "neg":
            return child[2]
        if name == "sign":
            if child[0] == "op" and child[1] in _SIGN_OPERANDS:
                return ("op", _SIGN_OPERANDS[child[1]])
            if child[0] == "op" and child[1] in ("sign_g", "sign_m"):
                return child
            if child[0] == "u" and child[1] == "sign":
                return child
        return ("u", name, child, *node[3:])  # extra items (a draw-site tag) ride along
    name = node[1]
    if name == "keep":
        return canonicalize(node[2])
    left, right = canonicalize(node[2]), canonicalize(node[3])
    if name in COMMUTATIVE:
        terms: list[Tree] = []
        for t in (left, right):
            # flatten n-ary sums/products: ("b", "add", t1, t2, t3, ...)
            terms.extend(t[2:] if t[0] == "b" and t[1] == name else (t,))
        return ("b", name, *sorted(terms, key=tree_key))  # type: ignore[return-value]
    return ("b", name, left, right)


def tree_key(node: Tree) -> str:
    """A compact prefix serialisation, e.g. ``mul(exp(mul(sign_g,sign_m)),g)``."""
    if node[0] == "op":
        return node[1]
    children = node[2:3] if node[0] == "u" else node[2:]  # a unary's extra items (tags) are not part of the key
    return f"{node[1]}({','.join(tree_key(c) for c in children)})"
