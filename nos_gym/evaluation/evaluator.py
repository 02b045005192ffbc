"""``Evaluator``: scores batches of programs on a task, reusing known scores.

The data flow is env -> Evaluator -> Task. The evaluator keys every score on
(task fingerprint, canonical program key), so strings that denote one rule are scored once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from nos_gym.dsl import Program
from nos_gym.tasks import Result, Task, make


class Evaluator:
    """Scores programs on ``task``; ``backend="serial"`` runs them in this process."""

    def __init__(self, task: str | Task, backend: str = "serial", **task_options):
        self.task = make(task, **task_options)
        if backend != "serial":
            raise ValueError(f"unknown backend {backend!r}; choose from ['serial']")
        self.backend = backend
        self._cache: dict[str, Result] = {}

    @property
    def fingerprint(self) -> str:
        return self.task.fingerprint

    def evaluate(self, programs: Sequence[Program]) -> list[Result]:
        """One Result per program, in order; duplicates and known rules are not recomputed."""
        keys = [p.canonical_key for p in programs]
        todo: dict[str, Program] = {}
        for key, p in zip(keys, programs):
            if key not in self._cache and key not in todo:
                todo[key] = p
        if todo:
            fresh = self.task.evaluate(list(todo.values()))
            for key, result in zip(todo, fresh):
                self._cache[key] = result
        out = []
        for key in keys:
            result = self._cache[key]
            out.append(result if key in todo and todo.pop(key, None) is not None else replace(result, cached=True))
        return out
