"""Which sampled rules a policy-gradient step learns from, and by how much: the baselines.

Two choices for the LSTM controllers (``trpo_lstm``, ``reinforce_lstm``):

- ``"ema"`` (the paper, section 3.2): every rule of the batch counts, with advantage
  ``R - b``, where ``b`` is an exponential moving average of the batch mean reward
  (``b <- decay * b + (1 - decay) * mean(R)``, started at the first batch's mean). It
  maximises the expected reward of a sampled rule.
- ``"risk_seeking"`` (Petersen et al., "Deep symbolic regression", ICLR 2021; dso's
  ``risk_factor``): only the rules at or above the batch's ``(1 - epsilon)`` reward
  quantile ``R_eps`` count, with advantage ``R - R_eps``; the rest are left out of the
  step (also out of its entropy term). It maximises the expected reward of the best
  ``epsilon`` fraction of samples, which is what a search is for: finding the best few
  rules, not a good average. The quantile is the baseline, so no state is kept. With
  100 rules a batch and epsilon 0.05, the top 5 (and any ties with the 5th) are kept.

``Advantages.compute(rewards)`` returns the per-rule advantages and the bool mask of the
rules that count; the agents restrict their batch to that mask, as dso does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["BASELINES", "Advantages", "AdvantageBatch", "first_occurrences"]

BASELINES = ("ema", "risk_seeking")


@dataclass(frozen=True)
class AdvantageBatch:
    """``advantages`` (N,) float32, ``keep`` (N,) bool (the rules the step learns from),
    ``baseline`` (the value subtracted: the EMA before this batch, or the quantile)."""

    advantages: Tensor
    keep: Tensor
    baseline: float


class Advantages:
    """The baseline of a policy-gradient agent, with its state (the EMA) for checkpoints.

    Args:
        kind: "ema" (the paper's) or "risk_seeking".
        decay: the EMA's decay (``kind="ema"``).
        epsilon: the fraction of each batch a risk-seeking step learns from, in (0, 1].
    """

    def __init__(self, kind: str = "ema", decay: float = 0.9, epsilon: float = 0.05):
        if kind not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1], got {decay!r}")
        if not (0.0 < epsilon <= 1.0):
            raise ValueError(f"risk_epsilon must be in (0, 1], got {epsilon!r}")
        self.kind, self.decay, self.epsilon = kind, float(decay), float(epsilon)
        self.ema: float | None = None  # the EMA of batch mean rewards (kept in both modes, for the logs)

    def compute(self, rewards: Tensor | np.ndarray, keys: Sequence[str] | None = None) -> AdvantageBatch:
        """Advantages of one batch of rewards (N,), and the EMA advanced past it.

        ``keys`` (the rules' canonical keys) make the step count each distinct rule of the
        batch once: a repeat of an earlier sample is left out (``keep`` False). See
        ``first_occurrences`` for what that does to the gradient.
        """
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
        mean = rewards.mean().item()
        if self.ema is None:
            self.ema = mean
        if self.kind == "ema":
            baseline = self.ema
            out = AdvantageBatch(rewards - baseline, torch.ones_like(rewards, dtype=torch.bool), baseline)
        else:
            # dso's quantile: the (1 - epsilon) quantile of the batch, the "higher" one (a reward
            # some sample got, so at least one is kept): with 100 rules and epsilon 0.05, the top 5
            q = torch.quantile(rewards.double(), 1.0 - self.epsilon, interpolation="higher").item()
            keep = rewards >= q
            out = AdvantageBatch(torch.where(keep, rewards - q, 0.0), keep, q)
        self.ema = self.decay * self.ema + (1 - self.decay) * mean
        if keys is not None:
            out = AdvantageBatch(out.advantages, out.keep & first_occurrences(keys), out.baseline)
        return out

    # -------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any] | float | None) -> None:
        """Accepts this class's state, or a bare EMA value (checkpoints of earlier versions)."""
        if isinstance(state, dict):
            self.ema = state.get("ema")
        else:
            self.ema = None if state is None or not math.isfinite(state) else float(state)


def first_occurrences(keys: Sequence[str]) -> Tensor:
    """(N,) bool: True for the first sample of each distinct rule of a batch.

    dso's "novel samples" idea, for a batch that a converging controller fills with copies
    of one rule (in the default Rosenbrock run, hundreds of the last samples were one rule).
    Scoring a copy costs nothing here (the evaluator's cache), but each copy adds its own
    ``(R - b) * grad log p`` term, so a rule sampled k times pulls k times. Counting it once
    makes the step a biased estimate of the gradient of the expected reward: the terms of
    probable rules are down-weighted by their multiplicity, which keeps the policy from
    collapsing onto one rule (an effect like an entropy bonus that grows with collapse). The
    risk-seeking objective (ties at the quantile) is where it matters most. Off by default.
    """
    seen: set[str] = set()
    first = []
    for key in keys:
        first.append(key not in seen)
        seen.add(key)
    return torch.tensor(first, dtype=torch.bool)
