"""What every pool backend shares: jobs, outcomes, the in-process backend.

A *job* is a list of programs that one worker scores with one ``task.evaluate`` call (so a
GPU worker can train them as one grouped network). A backend runs jobs and reports
*outcomes*: the job's results, or why it failed. Retrying a job whose worker died is the
backend's business (it knows whether a worker died); the ``Evaluator`` above it only
sees final outcomes.
"""

from __future__ import annotations

import os
import time
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from nos_gym.dsl import Program
from nos_gym.tasks.base import Result, Task


@dataclass
class Job:
    """Programs scored together by one worker."""

    id: int
    programs: list[Program]
    #: seconds the job may run once started (None: no limit)
    time_limit: float | None = None
    #: times a worker died while running this job
    crashes: int = 0


@dataclass
class Outcome:
    """How a job ended: ``status`` is "ok" (``results`` set), "timeout", "crashed" or "error" (``error`` set)."""

    job: Job
    status: str
    results: list[Result] | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def attempts(self) -> int:
        """Times the job was started: each crash was one, and so is a final run that ended otherwise."""
        return self.job.crashes + (self.status != "crashed")


class RuleFailure(Result):
    """The ``Result`` of one rule whose evaluation raised, inside a job whose other rules were scored.

    ``run_job`` returns it in the failing rule's place (reward 0, ``error`` the traceback);
    the ``Evaluator`` records that rule as status "error" and the others as "ok".
    """


def run_job(task: Task, programs: Sequence[Program | Sequence[str]]) -> list[Result]:
    """Score programs (or token lists, what workers receive); checks the task kept its contract.

    If ``task.evaluate`` raises on a job of several rules, the job is split in halves and
    each half scored again (recursively), so that only the rules that raise on their own
    fail: each gets a ``RuleFailure`` in its place and the others their scores (a rule
    that fails alone costs about 2 log2(n) extra calls). A job of one rule that raises
    raises, as does a ``BaseException`` (KeyboardInterrupt, SystemExit) at any size.
    """
    programs = [p if isinstance(p, Program) else Program(tuple(p)) for p in programs]
    try:
        return _evaluate(task, programs)
    except Exception:
        if len(programs) == 1:
            raise
    return _bisect(task, programs)


def _evaluate(task: Task, programs: list[Program]) -> list[Result]:
    results = task.evaluate(programs)
    if len(results) != len(programs) or not all(isinstance(r, Result) for r in results):
        raise RuntimeError(f"{type(task).__name__}.evaluate returned {len(results)} items for {len(programs)} "
                           f"programs; it must return one Result per program")
    return list(results)


def _bisect(task: Task, programs: list[Program]) -> list[Result]:
    """Score both halves of a job that raised, splitting again the halves that raise."""
    mid = len(programs) // 2
    out: list[Result] = []
    for part in (programs[:mid], programs[mid:]):
        try:
            out += _evaluate(task, part)
        except Exception:
            if len(part) > 1:
                out += _bisect(task, part)
            else:
                error = traceback.format_exc(limit=8)
                out.append(RuleFailure(0.0, {"status": "error", "attempts": 1}, error))
    return out


def cpu_count() -> int:
    """CPUs this process may use (respects affinity masks and container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Backend(ABC):
    """Runs jobs. ``slots`` jobs may run at once; the Evaluator never has more in flight."""

    name = "backend"
    slots = 1

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Start ``job`` (there is a free slot)."""

    @abstractmethod
    def poll(self, timeout: float | None) -> list[Outcome]:
        """Outcomes of jobs that ended, waiting up to ``timeout`` seconds (None: until one ends)."""

    def close(self) -> None:  # noqa: B027  (a default that does nothing; backends with workers override it)
        """Stop workers; jobs still running are abandoned."""


class SerialBackend(Backend):
    """Runs jobs in this process, one per ``poll``: no isolation and no time limit (a hang hangs).

    The choice for cheap tasks, where starting a worker costs more than the work, and for
    debugging. A task exception is reported as an "error" outcome, not raised.
    """

    name = "serial"
    slots = 1

    def __init__(self, task: Task):
        self.task = task
        self._queue: deque[Job] = deque()

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def poll(self, timeout: float | None) -> list[Outcome]:
        if not self._queue:
            return []
        job = self._queue.popleft()
        t0 = time.perf_counter()
        try:
            return [Outcome(job, "ok", run_job(self.task, job.programs), seconds=time.perf_counter() - t0)]
        except Exception:
            return [Outcome(job, "error", error=traceback.format_exc(limit=8), seconds=time.perf_counter() - t0)]
