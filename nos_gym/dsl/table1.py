"""The paper's Table 1 as rules of the language, and ``get_rule``: a Program from a name or text.

>>> table1()["optimizer_2"]
'drop(m, 0.3) * exp(1e-3 * w)'
>>> get_rule("powersign").format()
'g * exp(sign(g) * sign(m))'

Language-level (no torch): ``nos_gym.optim`` re-exports both for its optimizers.
"""

from __future__ import annotations

from nos_gym.dsl.notation import parse
from nos_gym.dsl.program import Program

# The 20 rows of the paper's Table 1 (4 baselines, 16 discovered rules) in paper order.
# Baselines are written in the language: SGD is g, Momentum is the running average m
# (a rescaled heavy-ball; the learning-rate sweep absorbs the 1/(1-beta1) factor).
TABLE1: dict[str, str] = {
    "sgd": "g",
    "momentum": "m",
    "adam": "ADAM",
    "rmsprop": "RMSProp",
    "optimizer_1": "(exp(sign(g) * sign(m)) + clip(g, 1e-4)) * g",
    "clipm_expv": "clip(m, 1e-4) * exp(v)",
    "m_expv": "m * exp(v)",
    "powersign": "g * exp(sign(g) * sign(m))",
    "dropg03_powersign": "drop(g, 0.3) * exp(sign(g) * sign(m))",
    "m_expg2": "m * exp(g^2)",
    "dropm01_div_expg2": "drop(m, 0.1) / exp(g^2)",
    "dropg01_powersign": "drop(g, 0.1) * exp(sign(g) * sign(m))",
    "cliprmsprop_plus_dropm03": "clip(RMSProp, 1e-5) + drop(m, 0.3)",
    "adam_powersign": "ADAM * exp(sign(g) * sign(m))",
    "adam_expm": "ADAM * exp(m)",
    "g_plus_dropm03": "g + drop(m, 0.3)",
    "dropm01_expg3": "drop(m, 0.1) * exp(g^3)",
    "g_minus_clipg2": "g - clip(g^2, 1e-4)",
    "expg_minus_expm": "exp(g) - exp(m)",
    "optimizer_2": "drop(m, 0.3) * exp(1e-3 * w)",
}


def table1() -> dict[str, str]:
    """Name -> rule (paper notation) for the 20 rows of Table 1, in the paper's order."""
    return dict(TABLE1)


def get_rule(rule: str | Program) -> Program:
    """A Program from a Table 1 name, a rule in paper notation, or a Program."""
    if isinstance(rule, Program):
        return rule
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a string or a Program, got {type(rule).__name__}")
    return parse(TABLE1.get(rule.strip().lower(), rule))
