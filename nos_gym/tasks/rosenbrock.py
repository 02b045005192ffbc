"""The Rosenbrock fast-reward task (paper section 5.1, Figure 6).

Each rule minimises the 2-D Rosenbrock function

    f(x, y) = (a - x)^2 + b (y - x^2)^2,      a = 1, b = 100, minimum f(1, 1) = 0,

from the fixed start ``START = (-1.2 - sqrt(2)/100, 1 + sqrt(3)/100) = (-1.21414, 1.01732)``
for 4,000 iterations of ``w <- w - lr * rule(g, ...)``, once per learning rate of the
4-point log grid ``(1e-4, 1e-3, 1e-2, 1e-1)``, as the paper does ("4000 iterations with 4 different
learning rates on a logarithmic scale and the best performance is plotted").

The start is Rosenbrock's classic (-1.2, 1), inside the region Figure 6 plots
(x in [-2, 2], y in [-1, 3]), moved by (-sqrt 2, sqrt 3) / 100 so that its offsets to the
optimum (1, 1) are irrational. Sign-based rules move on the lattice ``start + lr * Z^2``;
from a decimal start they can land exactly on the optimum by coincidence (``sign(m)`` at
lr 0.1 from (-1.2, 1) ends at loss 5e-30, a perfect score for an artefact).

**Score.** ``L*`` is the best (lowest) final loss over the grid; a run whose final loss is
NaN or infinite counts as diverged. The reward is the fraction of the orders of magnitude
between the start and ``loss_floor`` that the rule closed:

    reward = clip( log10(f0 / max(L*, loss_floor)) / log10(f0 / loss_floor), 0, 1 )

with ``f0 = f(start)`` and ``loss_floor = 1e-12``. It is 0 for a rule that ends no
lower than it started (or diverged at every learning rate), 1 for ``L* <= 1e-12``, and
strictly decreasing in ``L*`` in between (each factor 10 is worth 1/13.4 = 0.075).

**Batching.** ``evaluate`` runs all B programs x L learning rates as one vectorised
computation: a ``(B * L, 2)`` parameter tensor trained by one ``BatchedRule`` (the
batched rule compiler, ``nos_gym.engine.rules``); programs of different depths run together in
it (shorter ones padded with pass-through groups to the deepest). Rows that diverge (NaN
or inf parameters, which never come back) are dropped from the computation at steps 25,
100, 400 and 1,600 (``BatchedRule.select``), which changes no other row's numbers.

**Stochastic rules** (``drop``, ``noise``): each row draws from the rule's own stream
(``nos_gym.engine.random_streams``), so a rule gets the same numbers alone, anywhere in any
batch and on any backend. Its reward is the mean of ``draws`` evaluations (default
``DRAWS``), draw j with stream seed ``stream_seed(seed, canonical key, j)``; ``metrics``
are draw 0's, plus ``draws`` and ``draw_rewards``. A deterministic rule is run once.

Also here: ``rosenbrock`` (the plain function, for floats, NumPy or torch) and
``RosenbrockTask.path`` (the iterates of one rule, for Figure-6 style plots).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nos_gym.dsl import Program
from nos_gym.dsl.table1 import get_rule
from nos_gym.engine import native
from nos_gym.engine.random_streams import stream_seed
from nos_gym.engine.rules import BatchedRule, Hyper
from nos_gym.tasks.base import check_draws
from nos_gym.tasks.grid import LossGridTask

START: tuple[float, float] = (-1.2 - math.sqrt(2.0) / 100, 1.0 + math.sqrt(3.0) / 100)
LEARNING_RATES: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
ITERATIONS = 4000
LOSS_FLOOR = 1e-12
#: evaluations a stochastic rule's reward averages (chosen by measurement: docs/guarantees.md)
DRAWS = 4
#: the plotted region of Figure 6
X_RANGE: tuple[float, float] = (-2.0, 2.0)
Y_RANGE: tuple[float, float] = (-1.0, 3.0)

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: the task's executors (see ``RosenbrockTask``)
EXECUTORS = ("auto", "native", "batched", "fused")
#: steps at which rows that diverged are dropped (speed only: no finite row's numbers change)
_CHECKPOINTS = (25, 100, 400, 1600)


def rosenbrock(x: Any, y: Any, a: float = 1.0, b: float = 100.0) -> Any:
    """``(a - x)^2 + b (y - x^2)^2`` for floats, NumPy arrays or torch tensors."""
    return (a - x) ** 2 + b * (y - x * x) ** 2


def rosenbrock_grad(x: Any, y: Any, a: float = 1.0, b: float = 100.0) -> tuple[Any, Any]:
    """The gradient ``(df/dx, df/dy)`` of ``rosenbrock``."""
    t = y - x * x
    return 2.0 * (x - a) - 4.0 * b * x * t, 2.0 * b * t


class RosenbrockTask(LossGridTask):
    """Score rules by minimising 2-D Rosenbrock (see the module docstring for the setup).

    Args:
        iterations: optimisation steps per learning rate (the paper's 4,000).
        learning_rates: the grid; the best final loss over it is scored.
        start: the fixed starting point ``(x, y)``.
        a, b: the function's constants.
        loss_floor: the loss that earns reward 1 (the bottom of the log scale).
        seed: seeds ``drop`` and ``noise`` (with the rule and the draw: ``stream_seed``).
        dtype: "float64" (default) or "float32".
        draws: evaluations a stochastic rule's reward is the mean of.
        executor: what runs the rules (each is part of the fingerprint, so scores of
            different executors never mix: their exp, log and sqrt round differently, and
            chaotic trajectories amplify an ulp):

            - ``"auto"`` (default): ``"native"`` where it builds, else ``"batched"``
              (decided here, once; ``self.executor`` says which);
            - ``"native"``: the whole run as one C++ call (``nos_gym.engine.native``): the time
              loop inside the kernel, each rule interpreted once per step for all its
              learning rates; ~10x ``"batched"``, and the same bits on every x86-64 CPU;
            - ``"batched"``: ``BatchedRule``, torch's per-token kernels (the executor of
              every score stored before the native one existed);
            - ``"fused"``: ``BatchedRule``'s fused path (one compiled kernel per step,
              ``nos_gym.engine.fused_batched``).
        fused: ``fused=True`` is ``executor="fused"`` (the older spelling).
        threads: the native kernel's threads (rule instances are shared out; the numbers
            are the same for any count, so it is not part of the fingerprint).
    """

    name = "rosenbrock"
    version = 1
    #: the ``-march`` the native kernel is built for: the host's; other targets (x86-64 for
    #: SSE2 only, x86-64-v3 for AVX2) give the same numbers, which benchmarks/portability.py checks
    native_arch = "native"

    def __init__(self, iterations: int = ITERATIONS, learning_rates: Sequence[float] = LEARNING_RATES,
                 start: tuple[float, float] = START, a: float = 1.0, b: float = 100.0,
                 loss_floor: float = LOSS_FLOOR, seed: int = 0, dtype: str = "float64", draws: int = DRAWS,
                 executor: str = "auto", fused: bool = False, threads: int = 1):
        if int(iterations) < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        lrs = tuple(float(lr) for lr in learning_rates)
        if not lrs or not all(lr > 0 and math.isfinite(lr) for lr in lrs):
            raise ValueError(f"learning_rates must be positive finite numbers, got {learning_rates}")
        if len(start) != 2:
            raise ValueError(f"start is a point (x, y), got {start}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.iterations = int(iterations)
        self.learning_rates = lrs
        self.start = (float(start[0]), float(start[1]))
        self.a, self.b = float(a), float(b)
        self.initial_loss = float(rosenbrock(self.start[0], self.start[1], self.a, self.b))
        if not 0 < loss_floor < self.initial_loss:
            raise ValueError(f"loss_floor must be in (0, f(start) = {self.initial_loss:g}), got {loss_floor}")
        self.loss_floor = float(loss_floor)
        self.seed = int(seed)
        self.dtype = dtype
        self.draws = check_draws(draws)
        if fused:
            executor = "fused"
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        if executor == "auto":
            executor = "native" if native.available() else "batched"
        elif executor == "native" and not native.available():
            raise RuntimeError("executor='native': the native Rosenbrock kernel cannot be built here "
                               "(see the NativeUnavailableWarning); use executor='batched' or 'auto'")
        #: the executor that runs the rules: "native", "batched" or "fused"
        self.executor = executor
        self.fused = executor == "fused"
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads)

    def config(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "learning_rates": list(self.learning_rates),
                "start": list(self.start), "a": self.a, "b": self.b, "loss_floor": self.loss_floor,
                "seed": self.seed, "dtype": self.dtype, "draws": self.draws,
                # "batched" adds nothing: its fingerprint (and its stored scores) stay as they were
                **({"fused": True} if self.fused else {}),
                **({"executor": "native", "native_abi": native.ABI_VERSION} if self.executor == "native" else {})}

    def _grid_losses(self, programs: list[Program], draws: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, L)`` final losses; ``draws``: each program's draw index (default: draw 0)."""
        final = self._run(programs, self.learning_rates, draws=draws)[0]
        return rosenbrock(final[:, 0], final[:, 1], self.a, self.b).view(len(programs), -1)

    def stream_seeds(self, programs: Sequence[Program], draws: Sequence[int] | None = None) -> list[int]:
        """The stream seed of each program's draw (0 for a deterministic program, which draws nothing)."""
        draws = [0] * len(programs) if draws is None else draws
        return [stream_seed(self.seed, p.canonical_key, j) if p.stochastic else 0 for p, j in zip(programs, draws)]

    def path(self, rule: str | Program, lr: float | None = None, iterations: int | None = None) -> np.ndarray:
        """The iterates ``(iterations + 1, 2)`` of one rule, start included.

        ``rule`` is a Program, a rule in paper notation or a Table 1 name ("powersign").
        ``lr`` defaults to the rule's best learning rate on the grid. A stochastic rule
        follows its draw 0.
        """
        program = get_rule(rule)
        if lr is None:
            result = self.evaluate([program])[0]
            lr = result.metrics["best_lr"] if result.metrics.get("best_lr") is not None else self.learning_rates[0]
        _, trace = self._run([program], (float(lr),), iterations=iterations, record=True)
        return trace[:, 0, :].double().numpy()

    # ----------------------------------------------------------------------- the loop
    def _run(self, programs: list[Program], lrs: Sequence[float], iterations: int | None = None,
             record: bool = False, draws: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.executor == "native":
            return self._native(programs, lrs, iterations, record, draws)
        # no autograd bookkeeping: inference mode takes 15-20% off each of the step's small kernels;
        # the fused path runs one kernel a step, compiled for ordinary tensors (inference tensors
        # would make torch.compile build a second graph), so no_grad is enough there
        with torch.no_grad() if self.fused else torch.inference_mode():
            return self._loop(programs, lrs, iterations, record, draws)

    def _loop(self, programs: list[Program], lrs: Sequence[float], iterations: int | None,
              record: bool, draws: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Train B x L rows (program-major) for ``iterations`` steps; final params (B*L, 2).
        Program i draws its draw ``draws[i]`` (default 0) at every learning rate.

        A row whose parameters turned NaN or inf can never come back (inf - finite stays
        inf, NaN stays NaN), so at a few checkpoints such rows are dropped and the rest
        go on as a smaller batch; they end as NaN. This changes no finite row's numbers.
        """
        dtype = _DTYPES[self.dtype]
        steps = self.iterations if iterations is None else int(iterations)
        L = len(lrs)
        rows = [p for p in programs for _ in range(L)]
        R = len(rows)
        rule = BatchedRule(rows, Hyper(), seeds=[s for s in self.stream_seeds(programs, draws) for _ in range(L)],
                           fused=self.fused)
        params = torch.tensor(self.start, dtype=dtype).repeat(R, 1)
        # (R, 2), not (R, 1): broadcasting a column costs 5x a plain kernel at this size
        lr = torch.tensor(lrs, dtype=dtype).repeat(len(programs)).view(R, 1).expand(R, 2).contiguous()
        final = torch.full((R, 2), float("nan"), dtype=dtype)
        live = torch.arange(R)  # original row of each current row
        trace = torch.empty(steps + 1, R, 2, dtype=dtype) if record else None
        if trace is not None:
            trace[0] = params
        checkpoints = set() if record else {c for c in _CHECKPOINTS if c < steps}
        state = rule.init(params)
        grad, tmp, (x, y), (gx, gy) = self._buffers(params)
        a, two_b = self.a, 2.0 * self.b
        for t in range(steps):
            if t in checkpoints:
                ok = torch.isfinite(params).all(dim=1)
                n_ok = int(ok.sum())
                if n_ok == 0:
                    live = live[:0]
                    break
                if n_ok <= 0.95 * len(ok):  # drop the diverged rows
                    keep = torch.nonzero(ok).flatten()
                    live, params, lr = live[keep], params[keep].contiguous(), lr[keep].contiguous()
                    rule, state = rule.select(keep, state)
                    grad, tmp, (x, y), (gx, gy) = self._buffers(params)
            # df/dy = 2b (y - x^2);  df/dx = 2 (x - a) - 2 x df/dy
            torch.addcmul(y, x, x, value=-1.0, out=tmp)
            torch.mul(tmp, two_b, out=gy)
            torch.mul(x, gy, out=tmp)
            torch.add(x, tmp, alpha=-1.0, out=gx)
            gx.sub_(a).mul_(2.0)
            d, state = rule.update(state, grad, params)
            params.addcmul_(lr, d, value=-1.0)
            if trace is not None:
                trace[t + 1] = params
        if len(live):
            final[live] = params
        return final, trace

    def _native(self, programs: list[Program], lrs: Sequence[float], iterations: int | None,
                record: bool, draws: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``_loop``'s result from the native kernel: the same rows, steps and checkpoints."""
        steps = self.iterations if iterations is None else int(iterations)
        hyper = Hyper()
        final, trace = native.rosenbrock_run(
            native.rule_tables(programs, self.stream_seeds(programs, draws)), lrs, steps, start=self.start, a=self.a,
            b=self.b, hyper=hyper, corrections=native.bias_corrections(hyper, steps),
            checkpoints=() if record else _CHECKPOINTS,
            dtype=self.dtype, record=record, threads=self.threads, lib=native.library(self.native_arch))
        dtype = _DTYPES[self.dtype]
        R = len(programs) * len(lrs)
        out = torch.from_numpy(final.reshape(R, 2)).to(dtype)
        return out, None if trace is None else torch.from_numpy(trace.reshape(steps + 1, R, 2)).to(dtype)

    @staticmethod
    def _buffers(params: torch.Tensor):
        grad = torch.empty_like(params)
        tmp = torch.empty(params.shape[0], dtype=params.dtype)
        return grad, tmp, (params[:, 0], params[:, 1]), (grad[:, 0], grad[:, 1])
