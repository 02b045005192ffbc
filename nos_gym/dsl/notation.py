"""The paper's notation: format a rule for people and parse it back (no eval, no exec).

Grammar (whitespace is ignored; ``[ ]`` group like ``( )``)::

    expr   := term (("+" | "-") term)*
    term   := factor ("*" factor | "/" divisor)*    "/" is the language's x / (y + eps)
    divisor:= "(" expr "+" EPS ")" | factor          EPS in eps, epsilon, ε: x / (y + eps) is x / y
    factor := "-" factor | atom
    atom   := "(" expr ")" | "[" expr "]"
            | "g" ["^2" | "^3"] | "m" | "v" | "y" | "noise" | "ADAM" | "RMSProp" | "1"
            | SCALE "*" "w"                          SCALE in 1e-4, 1e-3, 1e-2, 1e-1
            | "exp(" expr ")" | "e^" atom | "log|" expr "|" | "sqrt|" expr "|"
            | "clip(" expr "," LEVEL ")"             LEVEL in 1e-5, 1e-4, 1e-3
            | "drop(" expr "," RATE ")"              RATE in 0.1, 0.3, 0.5
            | "sign(" expr ")"

Aliases: ``m_hat``/``m̂`` for m, ``v_hat``/``v̂`` for v, ``gamma``/``γ``/``γ̂`` for y,
``adam``/``rmsprop`` in any case, ``log(|x|)`` and ``sqrt(x)`` for ``log|x|`` and
``sqrt|x|``, ``g²``/``g³`` for ``g^2``/``g^3``, braces ``e^{x}``, and the paper's literal
division ``x / (y + eps)`` for ``x / y`` (formatting always writes ``x / y``).

Size: at most 64 levels of brackets and at most 100 operations nested in one another
(each operator of a chain ``g + g + ... + g`` nests in the next; a program of depth d
nests at most 2d), so that every recursive walk of the tree stays far from Python's
recursion limit; longer rules raise ``RuleTooLongError``, a ``ParseError``.
"""

from __future__ import annotations

import math
import re

from nos_gym.dsl.program import Program
from nos_gym.dsl.tree import Tree, format_tree  # noqa: F401  (format_tree: re-exported)
from nos_gym.dsl.vocabulary import (
    CLIP_LEVELS,
    DROP_RATES,
    WEIGHT_SCALES,
    result_operand,
)


# ------------------------------------------------------------------------------- parse
class ParseError(ValueError):
    """A string that is not a rule in the paper's notation.

    ``position`` is the 0-based character offset, ``expected`` what would have been valid.
    """

    def __init__(self, text: str, position: int, expected: str, found: str | None = None):
        self.text = text
        self.position = position
        self.expected = expected
        self.found = found
        what = "end of input" if found is None else repr(found)
        pointer = f"\n  {text}\n  {' ' * position}^" if len(text) <= 200 and position <= len(text) else ""
        super().__init__(f"at position {position}: expected {expected}, found {what}{pointer}")


class RuleTooLongError(ParseError):
    """A rule nested deeper than ``limit`` operations (``depth`` is how deep it goes)."""

    def __init__(self, text: str, position: int, depth: int, limit: int):
        super().__init__(text, position, f"a rule at most {limit} operations deep")
        self.depth, self.limit = depth, limit
        self.args = (f"rule too long: {depth} nested operations, at most {limit} (each operator of a chain "
                     f"like g + g + ... + g nests in the next; a program of depth d needs at most 2d)",)


_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
    r"|(?P<name>m̂|v̂|γ̂|γ|ε|[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<sym>[-+*/^()\[\]{}|,²³]))"
)
_NAMES = {
    "g": "g", "m": "m", "m_hat": "m", "m̂": "m", "v": "v", "v_hat": "v", "v̂": "v",
    "y": "y", "gamma": "y", "γ": "y", "γ̂": "y", "y_hat": "y", "noise": "noise",
    "adam": "adam", "rmsprop": "rmsprop",
}
_EPS = ("eps", "epsilon", "ε")
_MAX_NESTING = 64
#: operations nested in one another (a parsed tree's height); keeps every recursive walk shallow
_MAX_OPERATIONS = 100
#: characters: a depth-10 program that reuses each result on both sides formats to ~40,000
_MAX_LENGTH = 100_000


def _lex(text: str) -> list[tuple[str, str, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        match = _TOKEN_RE.match(text, pos)
        if match is None or match.end() == pos:
            raise ParseError(text, pos, "an operand, a function, a number or one of + - * / ( ) [ ] | ,", text[pos])
        kind = match.lastgroup
        start = match.start(kind)
        tokens.append((kind, match.group(kind), start))
        pos = match.end()
    tokens.append(("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _lex(text)
        self.i = 0
        self.nesting = 0
        # height of every inner node built (the node is kept, so its id stays unique)
        self._heights: dict[int, tuple[Tree, int]] = {}
        self.height = 0
        self.too_deep_at: int | None = None

    # -- helpers ---------------------------------------------------------------------
    def peek(self, offset: int = 0) -> tuple[str, str, int]:
        return self.tokens[min(self.i + offset, len(self.tokens) - 1)]

    def fail(self, expected: str) -> ParseError:
        kind, value, pos = self.peek()
        return ParseError(self.text, pos, expected, None if kind == "end" else value)

    def accept(self, value: str) -> bool:
        kind, v, _ = self.peek()
        if kind != "end" and v == value:
            self.i += 1
            return True
        return False

    def expect(self, value: str, what: str | None = None) -> None:
        if not self.accept(value):
            raise self.fail(what or repr(value))

    def number(self, allowed: dict[str, float], what: str) -> str:
        kind, value, _ = self.peek()
        if kind == "num":
            for name, level in allowed.items():
                if math.isclose(float(value), level, rel_tol=1e-9):
                    self.i += 1
                    return name
        raise self.fail(f"{what}, one of {', '.join(format(v, 'g') for v in allowed.values())}")

    def node(self, *parts: object) -> Tree:
        """An inner node ("u", name, child) or ("b", name, left, right), its height recorded."""
        node: Tree = parts  # type: ignore[assignment]
        height = 1 + max(self._height_of(child) for child in parts[2:])  # type: ignore[arg-type]
        self._heights[id(node)] = (node, height)
        if height > self.height:
            self.height = height
            if height > _MAX_OPERATIONS and self.too_deep_at is None:
                self.too_deep_at = self.peek(-1)[2] if self.i else 0
        return node

    def _height_of(self, node: Tree) -> int:
        entry = self._heights.get(id(node))
        return entry[1] if entry is not None and entry[0] is node else 0

    # -- grammar ---------------------------------------------------------------------
    def parse(self) -> Tree:
        node = self.expr()
        if self.peek()[0] != "end":
            raise self.fail("an operator (+ - * /) or the end of the rule")
        if self.too_deep_at is not None:
            raise RuleTooLongError(self.text, self.too_deep_at, self.height, _MAX_OPERATIONS)
        return node

    def expr(self, eps_before: str | None = None) -> Tree:
        """A sum; ``eps_before``: inside a divisor's brackets, ``+ eps`` before this closing bracket ends it."""
        self.enter()
        node = self.term()
        while True:
            if eps_before is not None and self.at_eps(eps_before):
                self.i += 2  # "+ eps": the language's division adds it (x / (y + eps) is x / y)
                break
            if self.accept("+"):
                node = self.node("b", "add", node, self.term())
            elif self.accept("-"):
                node = self.node("b", "sub", node, self.term())
            else:
                break
        self.nesting -= 1
        return node

    def at_eps(self, close: str) -> bool:
        eps = self.peek(1)
        return (self.peek()[1] == "+" and eps[0] == "name" and eps[1].lower() in _EPS
                and self.peek(2)[0] == "sym" and self.peek(2)[1] == close)

    def enter(self) -> None:
        self.nesting += 1
        if self.nesting > _MAX_NESTING:
            raise self.fail(f"at most {_MAX_NESTING} levels of nesting")

    def term(self) -> Tree:
        node = self.factor()
        while True:
            if self.accept("*"):
                node = self.node("b", "mul", node, self.factor())
            elif self.accept("/"):
                node = self.node("b", "div", node, self.divisor())
            else:
                return node

    def divisor(self) -> Tree:
        """What follows "/": a factor, where ``(y + eps)`` is read as ``y``."""
        kind, value, _ = self.peek()
        if kind == "sym" and value in "([{":
            close = {"(": ")", "[": "]", "{": "}"}[value]
            self.i += 1
            node = self.expr(eps_before=close)
            self.expect(close, f"{close!r} to close the bracket")
            return node
        return self.factor()

    def factor(self) -> Tree:
        if self.accept("-"):
            self.enter()
            node = self.node("u", "neg", self.factor())
            self.nesting -= 1
            return node
        return self.atom()

    def bracketed(self, close: str) -> Tree:
        node = self.expr()
        self.expect(close, f"{close!r} to close the bracket")
        return node

    def atom(self) -> Tree:
        kind, value, _ = self.peek()
        if kind == "sym" and value in "([{":
            self.i += 1
            return self.bracketed({"(": ")", "[": "]", "{": "}"}[value])
        if kind == "num":
            return self.constant()
        if kind != "name":
            raise self.fail("an operand (g, g^2, g^3, m, v, y, sign(g), sign(m), 1, noise, "
                            "1e-4 * w .. 1e-1 * w, ADAM, RMSProp) or a function "
                            "(exp, log|x|, clip, drop, sign, sqrt|x|)")
        self.i += 1
        low = value.lower()
        if low == "g" and value == "g":
            if self.accept("²"):
                return ("op", "g2")
            if self.accept("³"):
                return ("op", "g3")
            if self.peek()[1] == "^":
                self.i += 1
                return ("op", self.number({"g2": 2.0, "g3": 3.0}, "a power of g"))
            return ("op", "g")
        if value in _NAMES or low in ("adam", "rmsprop"):
            return ("op", _NAMES.get(value, low))
        if low == "exp":
            self.expect("(", "'(' after exp")
            return self.node("u", "exp", self.bracketed(")"))
        if value == "e":
            self.expect("^", "'^' after e (e^x is exp(x))")
            self.enter()
            node = self.node("u", "exp", self.atom())
            self.nesting -= 1
            return node
        if low in ("log", "sqrt"):
            name = "log_abs" if low == "log" else "sqrt_abs"
            if self.accept("|"):
                return self.node("u", name, self.bracketed("|"))
            self.expect("(", f"'|' or '(' after {low}")
            inner = self.expr()
            # log(|x|) and log(x) both mean log|x|; the language has no other log
            self.expect(")", "')' to close the bracket")
            return self.node("u", name, inner)
        if low in ("clip", "drop"):
            self.expect("(", f"'(' after {low}")
            inner = self.expr()
            self.expect(",", f"',' and then the {'level' if low == 'clip' else 'rate'} of {low}")
            if low == "clip":
                name = self.number(CLIP_LEVELS, "a clip level")
            else:
                name = self.number(DROP_RATES, "a drop rate")
            self.expect(")", f"')' to close {low}(...)")
            return self.node("u", name, inner)
        if low == "sign":
            self.expect("(", "'(' after sign")
            inner = self.bracketed(")")
            if inner[0] == "op" and inner[1] in ("g", "m"):
                return ("op", f"sign_{inner[1]}")
            return self.node("u", "sign", inner)
        if low == "w":
            self.i -= 1
            raise self.fail("a scale before w: the operands are 1e-4 * w, 1e-3 * w, 1e-2 * w, 1e-1 * w")
        if low in _EPS:
            self.i -= 1
            raise self.fail("an operand; eps is written only in a divisor, x / (y + eps), the language's "
                            "protected division x / y")
        self.i -= 1
        raise self.fail("an operand or a function; unknown name")

    def constant(self) -> Tree:
        _, value, _ = self.peek()
        if self.peek(1)[1] == "*" and self.peek(2)[0] == "name" and self.peek(2)[1] == "w":
            name = self.number(WEIGHT_SCALES, "a weight scale")
            self.i += 2
            return ("op", name)
        if math.isclose(float(value), 1.0):
            self.i += 1
            return ("op", "one")
        raise self.fail("the constant 1 or a weight term (1e-4 * w, 1e-3 * w, 1e-2 * w, 1e-1 * w)")


def parse_tree(text: str) -> Tree:
    """Parse paper notation into an expression tree (see module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"parse() takes a string, got {type(text).__name__}")
    if len(text) > _MAX_LENGTH:
        raise ParseError(text[:50] + "...", _MAX_LENGTH, f"a rule of at most {_MAX_LENGTH} characters")
    if not text.strip():
        raise ParseError(text, 0, "a rule, e.g. 'g * exp(sign(g) * sign(m))'")
    return _Parser(text).parse()


def parse(text: str) -> Program:
    """Parse a rule in the paper's notation into a ``Program``.

    >>> str(parse("g*exp(sign(g)*sign(m))"))
    'g * exp(sign(g) * sign(m))'

    Raises ``ParseError`` (with ``.position`` and ``.expected``) for malformed text.
    """
    return tree_to_program(parse_tree(text))


def tree_to_program(tree: Tree) -> Program:
    """Lay an expression tree out as groups of five tokens (left subtree first).

    Each binary node becomes a group. A unary on an operand fills that operand's unary
    slot; a stack of unaries, or a rule whose root is not binary, uses keep-left groups.
    """
    groups: list[tuple[str, str, str, str, str]] = []

    def filler(op: str) -> str:  # right operand of a keep-left group: any other operand
        return "one" if op != "one" else "g"

    def slot(node: Tree) -> tuple[str, str]:
        if node[0] == "op":
            return node[1], "id"
        if node[0] == "b":
            return emit(node), "id"
        child = node[2]
        if child[0] == "op":
            return child[1], node[1]
        if child[0] == "b":
            return emit(child), node[1]
        op, unary = slot(child)
        groups.append((op, filler(op), unary, "id", "keep"))
        return result_operand(len(groups)), node[1]

    def emit(node: Tree) -> str:
        o1, u1 = slot(node[2])
        o2, u2 = slot(node[3])
        groups.append((o1, o2, u1, u2, node[1]))
        return result_operand(len(groups))

    if tree[0] == "b":
        emit(tree)
    else:
        op, unary = slot(tree)
        groups.append((op, filler(op), unary, "id", "keep"))
    return Program(tuple(t for g in groups for t in g))
