"""A noisy, ill-conditioned quadratic: a second cheap reward beside Rosenbrock.

Each rule minimises

    f(w) = 1/2 * sum_i h_i (w_i - w*_i)^2,      w in R^dim (dim = 100),

with curvatures ``h_i`` log-spaced from ``1 / condition`` to 1 (condition = 1e3) and the
minimum ``w* ~ N(0, I)`` (drawn once from ``seed``; not at the origin, so the weight
operands ``1e-k * w`` are no shortcut), from the start ``w0 = 0``, for ``iterations`` = 300 steps,
on the learning-rate grid ``(1e-3, 1e-2, 1e-1, 1)``. The rule sees a noisy gradient
``g_t = h * (w_t - w*) + noise_std * eps_t`` with ``eps_t ~ N(0, I)`` and ``noise_std`` = 0.01.
The noise sequence is drawn once from ``seed`` and shared by every row (common random
numbers), so a program's score does not depend on its batch, and rules are compared on
the same noise. The score is the one of the Rosenbrock task, on the exact (noise-free)
final loss: ``log_progress(f(w0), L*, loss_floor)``, with ``L*`` the best final loss over
the grid and ``loss_floor`` = 1e-6 (see ``nos_gym.tasks.grid.log_progress``).

All B programs x L learning rates run as one ``(B * L, dim)`` computation: one
``BatchedRule``, programs of every depth together (shorter ones padded with pass-through
groups to the deepest).

A stochastic rule (``drop``, ``noise``) draws from its own stream, the same in any batch,
and scores the mean of ``draws`` evaluations (default ``DRAWS``), draw j with stream seed
``stream_seed(seed, canonical key, j)``, as on the Rosenbrock task (``metrics``: draw 0's,
plus ``draws`` and ``draw_rewards``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from nos_gym.dsl import Program
from nos_gym.engine.random_streams import stream_seed
from nos_gym.engine.rules import BatchedRule, Hyper
from nos_gym.tasks.base import check_draws
from nos_gym.tasks.grid import LossGridTask

#: evaluations a stochastic rule's reward averages. 1, by measurement: the task's own
#: gradient noise dominates a rule's draws (docs/guarantees.md, docs/results.md)
DRAWS = 1


class QuadraticTask(LossGridTask):
    """Score rules on a noisy, ill-conditioned quadratic (see the module docstring).

    Args:
        dim: number of parameters per run.
        condition: ratio of the largest to the smallest curvature.
        noise_std: standard deviation of the gradient noise.
        iterations: optimisation steps per learning rate.
        learning_rates: the grid; the best final loss over it is scored.
        loss_floor: the loss that earns reward 1.
        seed: seeds the start, the noise sequence, ``drop`` and the rule's ``noise``.
        draws: evaluations a stochastic rule's reward is the mean of.
    """

    name = "quadratic"
    version = 1

    def __init__(self, dim: int = 100, condition: float = 1e3, noise_std: float = 0.01,
                 iterations: int = 300, learning_rates: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0),
                 loss_floor: float = 1e-6, seed: int = 0, draws: int = DRAWS):
        if int(dim) < 1 or int(iterations) < 1:
            raise ValueError(f"dim and iterations must be >= 1, got dim={dim}, iterations={iterations}")
        if not condition >= 1:
            raise ValueError(f"condition must be >= 1, got {condition}")
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        lrs = tuple(float(lr) for lr in learning_rates)
        if not lrs or not all(lr > 0 and math.isfinite(lr) for lr in lrs):
            raise ValueError(f"learning_rates must be positive finite numbers, got {learning_rates}")
        self.dim, self.condition, self.noise_std = int(dim), float(condition), float(noise_std)
        self.iterations, self.learning_rates = int(iterations), lrs
        self.seed = int(seed)
        self.draws = check_draws(draws)
        gen = torch.Generator().manual_seed(self.seed)
        self.curvatures = torch.logspace(-math.log10(self.condition), 0.0, self.dim, dtype=torch.float64)
        self.optimum = torch.randn(self.dim, generator=gen, dtype=torch.float64)
        self.start = torch.zeros(self.dim, dtype=torch.float64)
        self._noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        self.initial_loss = self.loss(self.start.view(1, -1)).item()
        if not 0 < loss_floor < self.initial_loss:
            raise ValueError(f"loss_floor must be in (0, f(w0) = {self.initial_loss:g}), got {loss_floor}")
        self.loss_floor = float(loss_floor)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "condition": self.condition, "noise_std": self.noise_std,
                "iterations": self.iterations, "learning_rates": list(self.learning_rates),
                "loss_floor": self.loss_floor, "seed": self.seed, "draws": self.draws}

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """``f`` of each row of ``w`` (shape (R, dim))."""
        diff = w - self.optimum
        return 0.5 * (diff * diff * self.curvatures).sum(dim=1)

    def _grid_losses(self, programs: list[Program], draws: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, L)`` final losses; ``draws``: each program's draw index (default: draw 0)."""
        return self.loss(self._run(programs, draws)).view(len(programs), -1)

    @torch.inference_mode()  # no autograd bookkeeping: 15-20% off each of the step's small kernels
    def _run(self, programs: list[Program], draws: Sequence[int] | None = None) -> torch.Tensor:
        L = len(self.learning_rates)
        rows = [p for p in programs for _ in range(L)]
        R = len(rows)
        draws = [0] * len(programs) if draws is None else draws
        seeds = [stream_seed(self.seed, p.canonical_key, j) if p.stochastic else 0 for p, j in zip(programs, draws)]
        rule = BatchedRule(rows, Hyper(), seeds=[s for s in seeds for _ in range(L)], fused=False)  # as stored scores
        params = self.start.repeat(R, 1)
        lr = torch.tensor(self.learning_rates, dtype=torch.float64).repeat(len(programs))
        lr = lr.view(R, 1).expand(R, self.dim).contiguous()
        noise_gen = torch.Generator().manual_seed(self._noise_seed)
        grad = torch.empty_like(params)
        h, target = self.curvatures, self.optimum
        state = rule.init(params)
        for _ in range(self.iterations):
            eps = torch.randn(self.dim, generator=noise_gen, dtype=torch.float64).mul_(self.noise_std)
            torch.sub(params, target, out=grad).mul_(h).add_(eps)
            d, state = rule.update(state, grad, params)
            params.addcmul_(lr, d, value=-1.0)
        return params
