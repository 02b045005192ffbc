"""The update-rule language's vocabulary (Bello et al. 2017, section 4.1).

Every token has a short, stable name (used in ``Program.tokens``, configs, logs and the
result store) and a paper-notation spelling (used by ``format``/``parse``).

Operands are inputs a rule reads each step. ``m``, ``v`` and ``y`` (the paper's
m-hat, v-hat and gamma-hat) are the bias-corrected running averages of g, g^2 and g^3
with beta1 = 0.9 and beta2 = beta3 = 0.999 (section 4.2). ``ADAM`` is
m / (sqrt(v) + eps) and ``RMSProp`` is g / (sqrt(v) + eps), both with those averages.
``r1, r2, ...`` are the results of earlier groups (the "operand bank").

``sqrt|x|`` is not in section 4.1's list, but Figure 2 needs it to write SGD-free forms
of RMSProp and Adam; of the named search spaces (``nos_gym.dsl.spaces``) only "extended"
has it.

This module imports nothing heavy (no torch, no numpy): the whole language's constants,
``SEMANTICS_VERSION`` included, can be read without loading an executor.
"""

from __future__ import annotations

from dataclasses import dataclass

# name -> paper notation
BASE_OPERANDS: dict[str, str] = {
    "g": "g",
    "g2": "g^2",
    "g3": "g^3",
    "m": "m",
    "v": "v",
    "y": "y",
    "sign_g": "sign(g)",
    "sign_m": "sign(m)",
    "one": "1",
    "noise": "noise",
    "w1e-4": "1e-4 * w",
    "w1e-3": "1e-3 * w",
    "w1e-2": "1e-2 * w",
    "w1e-1": "1e-1 * w",
    "adam": "ADAM",
    "rmsprop": "RMSProp",
}

# name -> template in paper notation ({} is the argument)
UNARY: dict[str, str] = {
    "id": "{}",
    "neg": "-{}",
    "exp": "exp({})",
    "log_abs": "log|{}|",
    "clip1e-5": "clip({}, 1e-5)",
    "clip1e-4": "clip({}, 1e-4)",
    "clip1e-3": "clip({}, 1e-3)",
    "drop0.1": "drop({}, 0.1)",
    "drop0.3": "drop({}, 0.3)",
    "drop0.5": "drop({}, 0.5)",
    "sign": "sign({})",
    "sqrt_abs": "sqrt|{}|",
}

# name -> infix symbol in paper notation ("keep" has none: it drops its right argument)
BINARY: dict[str, str] = {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "div": "/",
    "keep": "",
}

#: binaries whose arguments commute (the canonical form sorts them; an executor may swap them)
COMMUTATIVE: frozenset[str] = frozenset({"add", "mul"})

# Section 4.1 exactly (the extension sqrt_abs is excluded).
PAPER_UNARY: tuple[str, ...] = tuple(u for u in UNARY if u != "sqrt_abs")

# Numerical constants of the language (section 4.2). NOISE_STD is ours: the paper says
# only "small constant noise"; we draw N(0, NOISE_STD^2) fresh every step.
BETA1 = 0.9
BETA2 = 0.999
BETA3 = 0.999
EPS = 1e-8
NOISE_STD = 0.01
CLIP_LEVELS = {"clip1e-5": 1e-5, "clip1e-4": 1e-4, "clip1e-3": 1e-3}
DROP_RATES = {"drop0.1": 0.1, "drop0.3": 0.3, "drop0.5": 0.5}
WEIGHT_SCALES = {"w1e-4": 1e-4, "w1e-3": 1e-3, "w1e-2": 1e-2, "w1e-1": 1e-1}
#: tokens that draw random numbers: a rule using one scores differently with other draws
STOCHASTIC: frozenset[str] = frozenset({"noise", *DROP_RATES})

#: The version of the language's numerical semantics (operands, functions, random draws).
#: Every task's fingerprint includes it, so scores computed under other semantics are never
#: reused from a cache or store. 2: ``drop`` zeroes entries even when inf; ``noise`` is a
#: fresh float32 draw per read (stochastic rules score differently than under 1). 3: every
#: rule draws from its own counter-based stream (``nos_gym.engine.random_streams``), a function of
#: (stream seed, step, draw site, element), not from one generator per batch: stochastic
#: rules get other numbers than under 2, the same ones in every batch and executor.
#: (``nos_gym.engine.rules.SEMANTICS_VERSION`` is this number.)
SEMANTICS_VERSION = 3

GROUP_SIZE = 5
# position within a group -> kind of token allowed there
SLOT_KINDS = ("operand", "operand", "unary", "unary", "binary")


def result_operand(k: int) -> str:
    """Name of the result of group ``k`` (1-based) as an operand of later groups."""
    return f"r{k}"


def is_result_operand(name: str) -> bool:
    return len(name) > 1 and name[0] == "r" and name[1:].isdigit()


def result_index(name: str) -> int:
    """1-based group index of a result operand name such as ``"r2"``."""
    return int(name[1:])


@dataclass(frozen=True)
class Vocabulary:
    """A flat integer indexing of every token for a given maximum depth.

    The Gymnasium env's ``Discrete(V)`` action space uses these ids. Order: base operands,
    result operands ``r1 .. r{depth-1}``, unary functions, binary functions.
    """

    depth: int

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")

    @property
    def tokens(self) -> tuple[str, ...]:
        results = tuple(result_operand(k) for k in range(1, self.depth))
        return tuple(BASE_OPERANDS) + results + tuple(UNARY) + tuple(BINARY)

    @property
    def operands(self) -> tuple[str, ...]:
        return tuple(BASE_OPERANDS) + tuple(result_operand(k) for k in range(1, self.depth))

    def __len__(self) -> int:
        return len(self.tokens)

    def index(self, token: str) -> int:
        try:
            return self._index_map()[token]
        except KeyError:
            raise KeyError(f"unknown token {token!r}; known tokens: {', '.join(self.tokens)}") from None

    def _index_map(self) -> dict[str, int]:
        cache = self.__dict__.get("_cache")
        if cache is None:
            cache = {t: i for i, t in enumerate(self.tokens)}
            object.__setattr__(self, "_cache", cache)
        return cache

    def kind(self, token: str) -> str:
        if token in BASE_OPERANDS or is_result_operand(token):
            return "operand"
        if token in UNARY:
            return "unary"
        if token in BINARY:
            return "binary"
        raise KeyError(f"unknown token {token!r}")
