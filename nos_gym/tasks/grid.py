"""Tasks scored by the best final loss over a learning-rate grid (Rosenbrock, quadratic)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from nos_gym.dsl import Program
from nos_gym.tasks.base import Result, Task, evaluate_draws


def log_progress(initial_loss: float, best_loss: float, loss_floor: float) -> float:
    """``clip(log10(initial / max(best, floor)) / log10(initial / floor), 0, 1)``; 0 if not finite.

    The fraction of the orders of magnitude between the starting loss and ``loss_floor``
    that a run closed: monotone decreasing in ``best_loss``.
    """
    if not math.isfinite(best_loss):
        return 0.0
    top = math.log10(initial_loss / loss_floor)
    return min(1.0, max(0.0, math.log10(initial_loss / max(best_loss, loss_floor)) / top))


def grid_results(losses: np.ndarray, learning_rates: Sequence[float],
                 score: Callable[[float], float]) -> list[Result]:
    """Results from a ``(B, L)`` array of final losses (NaN: diverged) over a learning-rate grid.

    ``metrics``: ``best_loss`` and ``best_lr`` (None when every run diverged) and
    ``final_losses`` (learning rate as text -> loss, None for a diverged run).
    """
    results = []
    labels = [f"{lr:g}" for lr in learning_rates]
    finite = np.isfinite(losses)
    best_of = np.argmin(np.where(finite, losses, np.inf), axis=1) if losses.size else []
    # plain Python floats and bools from here: a batch has thousands of rows
    for row, ok_row, any_ok, best in zip(losses.tolist(), finite.tolist(), finite.any(axis=1).tolist(), best_of):
        per_lr = {label: (v if ok else None) for label, v, ok in zip(labels, row, ok_row)}
        if not any_ok:
            results.append(Result(0.0, {"best_loss": None, "best_lr": None, "final_losses": per_lr},
                                  error="diverged at every learning rate (final loss NaN or inf)"))
            continue
        best_loss = row[int(best)]
        results.append(Result(score(best_loss), {"best_loss": best_loss, "best_lr": float(learning_rates[int(best)]),
                                                 "final_losses": per_lr}))
    return results



class LossGridTask(Task):
    """A task that trains every program at every learning rate of ``learning_rates`` and
    scores the best final loss with ``log_progress(initial_loss, best, loss_floor)``.

    Subclasses set ``learning_rates``, ``initial_loss`` and ``loss_floor`` and implement
    ``_grid_losses`` for the whole batch at once (programs of any depths together).
    """

    learning_rates: tuple[float, ...]
    initial_loss: float
    loss_floor: float
    draws: int = 1  # runs a stochastic rule's score averages (``nos_gym.tasks.base.evaluate_draws``)

    def _grid_losses(self, programs: list[Program], draws: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, L)`` final losses (any non-finite value means diverged); ``draws``: each
        program's draw index (default: draw 0)."""
        raise NotImplementedError

    def score(self, best_loss: float) -> float:
        """The documented monotone map of the best final loss onto [0, 1]."""
        return log_progress(self.initial_loss, best_loss, self.loss_floor)

    def evaluate(self, programs: Sequence[Program]) -> list[Result]:
        return evaluate_draws(programs, self.draws, self._evaluate_draws)

    def _evaluate_draws(self, programs: list[Program], draws: list[int]) -> list[Result]:
        return grid_results(self.final_losses(programs, draws), self.learning_rates, self.score)

    def final_losses(self, programs: Sequence[Program], draws: Sequence[int] | None = None) -> np.ndarray:
        """``(B, L)`` array: final loss of each program at each learning rate (NaN if diverged)."""
        loss = self._grid_losses(list(programs), draws)
        return torch.where(torch.isfinite(loss), loss, torch.full_like(loss, float("nan"))).double().numpy()
