"""What a rule is scored on: the ``Task`` interface and its ``Result``.

A task takes a whole batch of programs at once (``evaluate``), so that cheap tasks can
vectorise over rules and expensive ones can train many children in one grouped network.
Its ``fingerprint`` names the exact scoring setup; the result store and caches key on
(fingerprint, canonical program key), so two setups never share cached scores.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nos_gym.dsl import Program
from nos_gym.dsl.vocabulary import SEMANTICS_VERSION  # not nos_gym.engine.rules: this module needs no torch


@dataclass
class Result:
    """The score of one program on one task.

    ``reward`` is in [0, 1] (0 for a rule that diverged or failed), ``metrics`` holds
    what the task measured (losses, accuracies, the chosen learning rate ...), ``error``
    is None or a message saying why the rule failed.
    """

    reward: float
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: True when the score was read from a cache or store instead of being computed
    cached: bool = False
    #: where the score came from (set by the Evaluator's funnel): "trained" (the task
    #: computed it), "cache" (this session, same canonical key), "store" (the store, same
    #: key), "fingerprint" (an equivalent rule's score: same behaviour on the probe,
    #: ``metrics["equivalent_to"]`` names it) or "screen" (degenerate on the probe: the
    #: task's ``screen_score()``, ``metrics["screen"]`` says why)
    source: str = "trained"

    def __post_init__(self) -> None:
        r = float(self.reward)
        # A non-finite or out-of-range score is a task bug or a diverged rule: never
        # let it reach an agent as a reward.
        self.reward = min(1.0, max(0.0, r)) if math.isfinite(r) else 0.0


class Task(ABC):
    """Scores batches of update rules. Subclasses set ``name`` and implement ``evaluate``."""

    name: str = "task"
    #: bump when the scoring code changes, so cached scores of the old code are not reused
    version: int = 1
    #: whether the Evaluator may run rules on its probe (``nos_gym.evaluation.probe``) to
    #: share one score between rules of one behaviour and to screen degenerate ones. Set it
    #: False for a task that does not apply rules elementwise as ``w <- w - lr * d``.
    supports_probe: bool = True

    def screen_score(self) -> float | None:
        """The score of a rule the probe screens out (NaN/inf, zero, ignoring the gradient,
        never descending), given without training it; None: this task screens nothing.

        Default 0.0, the score of a rule that makes no progress on a task scored by loss
        progress (Rosenbrock, quadratic). A task whose untrained state scores above 0 says
        so (the ConvNet task: the untrained child's validation accuracy).
        """
        return 0.0

    def check_programs(self, programs: Sequence[Program]) -> None:  # noqa: B027  (a default that accepts all)
        """Raise for programs this task cannot score at all (not a bad rule: one outside the
        task's domain, e.g. a rule a NOS-Bench table lacks). The Evaluator calls it before
        anything is scored, so the error reaches the caller instead of becoming a score of 0."""

    @abstractmethod
    def evaluate(self, programs: Sequence[Program]) -> list[Result]:
        """One ``Result`` per program, in order. Must not raise for a bad rule."""

    def config(self) -> dict[str, Any]:
        """Everything that changes the scores (JSON-serialisable)."""
        return {}

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"name": self.name, "version": self.version, "semantics": SEMANTICS_VERSION,
                           **self.config()}, sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


# ------------------------------------------------------------------- stochastic rules
# A stochastic rule's score is an estimate of its expected score: the mean over ``draws``
# evaluations, draw j with the stream seed ``stream_seed(task seed, canonical key, j)``
# (``nos_gym.engine.random_streams``). A deterministic rule is evaluated once.
def check_draws(draws: Any) -> int:
    """``draws`` as a positive int (a task option: the evaluations a stochastic rule's score averages)."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    return draws


def expand_draws(programs: Sequence[Program], draws: int) -> list[tuple[int, int]]:
    """The evaluations a batch needs, as (program index, draw index): ``draws`` per
    stochastic program (``Program.stochastic``), one per deterministic program, in order."""
    return [(i, j) for i, p in enumerate(programs) for j in range(draws if p.stochastic else 1)]


def evaluate_draws(programs: Sequence[Program], draws: int,
                   evaluate: Callable[[list[Program], list[int]], list[Result]]) -> list[Result]:
    """Score ``programs``, a stochastic one as the mean of ``draws`` evaluations.

    ``evaluate(programs, draw_indices)`` scores one evaluation per item (a program may come
    several times, with draw indices 0, 1, ...); see ``expand_draws`` and ``merge_draws``.
    """
    programs = list(programs)
    if not programs:
        return []
    entries = expand_draws(programs, draws)
    results = evaluate([programs[i] for i, _ in entries], [j for _, j in entries])
    return merge_draws(len(programs), entries, results)


def merge_draws(n: int, entries: Sequence[tuple[int, int]], results: Sequence[Result]) -> list[Result]:
    """One Result per program from the results of its draws (``entries``: ``expand_draws``'s).

    ``reward``: the mean of the draws' rewards; ``metrics``: the first draw's, with
    ``draws`` (how many) and ``draw_rewards`` (each draw's reward, in draw order);
    ``error``: the first draw's when every draw failed, else None.
    """
    per: list[list[Result]] = [[] for _ in range(n)]
    for (i, _), r in zip(entries, results, strict=True):
        per[i].append(r)
    merged = []
    for rs in per:
        rewards = [r.reward for r in rs]
        error = rs[0].error if all(r.error is not None for r in rs) else None
        merged.append(Result(sum(rewards) / len(rewards),
                             {**rs[0].metrics, "draws": len(rs), "draw_rewards": rewards}, error))
    return merged
