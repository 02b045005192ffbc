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
from dataclasses import dataclass, field
from typing import Any, Sequence

from nos_gym.dsl import Program
from nos_gym.dsl.vocabulary import SEMANTICS_VERSION  # not nos_gym.rules: this module needs no torch


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
