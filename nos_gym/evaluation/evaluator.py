"""``Evaluator``: scores programs on a task through a pool, never scoring one rule twice.

The data flow is env/agent -> Evaluator -> Task. Every score is keyed by (task
fingerprint, canonical program key), so strings that denote one rule are scored once:
first an in-memory cache, then the optional ``Store`` (SQLite, shared by runs and
surviving kills), and only then a job for a worker.

Two ways to use it:

- batch: ``evaluate(programs) -> list[Result]``, in order (what the env calls);
- async, for agents that follow the paper's queue (section 3.3: the controller adds
  samples to a queue, workers return rewards as they finish): ``submit(programs)``
  returns one ticket per program, ``poll(timeout)`` returns ``Completed(ticket, program,
  result)`` items as they finish.

Backends: "serial" (in this process), "process" (local worker processes, one torch
thread each by default), "ray" (a local Ray or a cluster). "auto" (the default) picks
"process" for tasks that train networks (``task.parallel``) and "serial" for cheap ones,
where a worker costs more than the work. Failures -- a time limit passed, a worker that
died more often than ``max_retries``, a task exception -- come back as ``Result(0.0,
error=<cause>)`` with ``metrics["status"]`` and are recorded in the store; only "ok"
results are reused. A job of several rules that raises is re-run in halves (``run_job``),
so one bad rule fails alone and the rest of its job is scored.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Sequence

from nos_gym.dsl import Program
from nos_gym.evaluation.backends import Backend, Job, Outcome, RuleFailure, SerialBackend, cpu_count
from nos_gym.store import Store
from nos_gym.tasks import Result, Task, make

BACKENDS = ("auto", "serial", "process", "ray")
#: statuses kept in memory for the session (a rule that timed out once is not retried in this run)
_REMEMBERED = ("ok", "timeout")


class Completed(NamedTuple):
    """A finished evaluation: the ticket ``submit`` gave, the program and its Result."""

    ticket: int
    program: Program
    result: Result


@dataclass
class _Pending:
    """A canonical key being computed, and the tickets waiting for it (the first gets the fresh result)."""

    program: Program
    tickets: list[int]


class Evaluator:
    """Scores programs on ``task`` with a cache, an optional store and a pool of workers.

    Args:
        task: a Task or a registered task name (``task_options`` go to ``make``).
        backend: "auto", "serial", "process" or "ray" (see the module doc).
        store: a ``Store`` or a path to one; results are read from it and written to it.
        workers: parallel jobs. process: CPUs // threads (1 per GPU for CUDA tasks);
            ray: what the cluster allows.
        threads_per_worker: torch threads per worker (default 1 for CPU tasks).
        timeout: seconds one evaluation may take (a job of k programs gets k times as long,
            so that big jobs are not punished); None for no limit. Serial runs cannot be
            stopped, so the serial backend ignores it.
        max_retries: how often an evaluation is retried after its worker died.
        job_size: programs per job. Default: ``task.preferred_batch`` for GPU tasks, 1 for
            CPU tasks on process/ray (even load; the same grouping, hence bit-identical
            rewards, on every backend), and for serial the task's preference or the whole batch.
        address: Ray cluster address (ray backend).
        ray_init: extra ``ray.init`` arguments when the Evaluator starts Ray itself.
        run: a name for this run, recorded with each stored evaluation.
    """

    def __init__(self, task: str | Task, backend: str = "auto", *, store: Store | str | os.PathLike | None = None,
                 workers: int | None = None, threads_per_worker: int | None = None, timeout: float | None = 3600.0,
                 max_retries: int = 2, job_size: int | None = None, address: str | None = None,
                 ray_init: dict[str, Any] | None = None, run: str | None = None, **task_options: Any):
        self.task = make(task, **task_options)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
        if backend == "auto":
            backend = "process" if getattr(self.task, "parallel", False) else "serial"
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
        if job_size is not None and job_size < 1:
            raise ValueError(f"job_size must be >= 1, got {job_size}")
        self.backend = backend  # the resolved name: "serial", "process" or "ray"
        self.timeout = timeout
        self.run = run or uuid.uuid4().hex[:12]
        self.fingerprint = self.task.fingerprint
        self._own_store = not isinstance(store, Store) and store is not None
        self.store = Store(store) if self._own_store else store
        if self.store is not None:
            self.store.register_task(self.fingerprint, self.task.name, self.task.config())
        device = getattr(self.task, "device", None)
        on_gpu = getattr(device, "type", str(device)) == "cuda"
        if job_size is None:
            # GPU workers and the serial loop want full groups; CPU workers one rule each (even load)
            job_size = getattr(self.task, "preferred_batch", None) if (backend == "serial" or on_gpu) else 1
        self.job_size = job_size
        self._backend = self._make_backend(backend, workers, threads_per_worker, max_retries, on_gpu,
                                           address, ray_init)
        self._cache: dict[str, Result] = {}
        self._pending: dict[str, _Pending] = {}
        self._queue: deque[Job] = deque()
        self._inflight = 0
        self._completed: OrderedDict[int, Completed] = OrderedDict()
        self._tickets = itertools.count()
        self._jobs = itertools.count()
        self.stats = {"computed": 0, "memory_hits": 0, "store_hits": 0, "failed": 0, "retried": 0}

    @property
    def pool(self) -> Backend:
        """The backend object (its workers' pids, deaths, ...)."""
        return self._backend

    def _make_backend(self, backend: str, workers: int | None, threads: int | None, max_retries: int,
                      on_gpu: bool, address: str | None, ray_init: dict[str, Any] | None) -> Backend:
        if backend == "serial":
            return SerialBackend(self.task)
        if backend == "process":
            from nos_gym.evaluation.process import ProcessBackend

            gpus = 0
            if on_gpu:
                import torch

                gpus = torch.cuda.device_count()
            threads = threads or (max(1, cpu_count() // max(1, gpus)) if on_gpu else 1)
            workers = workers or (max(1, gpus) if on_gpu else max(1, cpu_count() // threads))
            return ProcessBackend(self.task, workers, threads, max_retries=max_retries, gpus=gpus)
        from nos_gym.evaluation.ray_backend import RayBackend

        return RayBackend(self.task, address=address, workers=workers, threads=threads or 1,
                          gpus_per_job=1 if on_gpu else 0, max_retries=max_retries, ray_init=ray_init)

    # -- async API ----------------------------------------------------------------------
    def submit(self, programs: Sequence[Program]) -> list[int]:
        """Queue programs for scoring; one ticket each. Known rules complete at once."""
        programs = list(programs)
        for p in programs:
            if not isinstance(p, Program):
                raise TypeError(f"expected Programs (nos_gym.dsl.parse makes them), got {type(p).__name__}")
        tickets = [next(self._tickets) for _ in programs]
        keys = [p.canonical_key for p in programs]
        unknown = [k for k in dict.fromkeys(keys) if k not in self._cache and k not in self._pending]
        stored = self.store.get_many(self.fingerprint, unknown) if (self.store is not None and unknown) else {}
        fresh: list[Program] = []
        for ticket, key, p in zip(tickets, keys, programs):
            if key in self._cache:
                self.stats["memory_hits"] += 1
                self._completed[ticket] = Completed(ticket, p, replace(self._cache[key], cached=True))
            elif key in self._pending:
                self._pending[key].tickets.append(ticket)
            elif key in stored:
                self.stats["store_hits"] += 1
                self._cache[key] = stored[key].result()
                self._completed[ticket] = Completed(ticket, p, self._cache[key])
            else:
                self._pending[key] = _Pending(p, [ticket])
                fresh.append(p)
        size = self.job_size or max(1, len(fresh))
        for start in range(0, len(fresh), size):
            chunk = fresh[start:start + size]
            limit = None if self.timeout is None else self.timeout * len(chunk)
            self._queue.append(Job(next(self._jobs), chunk, time_limit=limit))
        self._pump()
        return tickets

    def poll(self, timeout: float | None = 0.0) -> list[Completed]:
        """Evaluations finished since the last poll, waiting up to ``timeout`` s for one (None: until one).

        With the serial backend a poll runs the next job here and now, whatever ``timeout`` is.
        """
        if not self._completed and (self._inflight or self._queue):
            self._advance(timeout)
        out = list(self._completed.values())
        self._completed.clear()
        return out

    @property
    def pending(self) -> int:
        """Evaluations submitted and not yet returned by ``poll``."""
        return sum(len(p.tickets) for p in self._pending.values()) + len(self._completed)

    # -- batch API ----------------------------------------------------------------------
    def evaluate(self, programs: Sequence[Program]) -> list[Result]:
        """One Result per program, in order; duplicates and known rules are not recomputed."""
        tickets = self.submit(programs)
        waiting = set(tickets)
        got: dict[int, Result] = {}
        while waiting:
            for t in list(waiting):
                if t in self._completed:
                    got[t] = self._completed.pop(t).result
                    waiting.discard(t)
            if waiting:
                if not (self._inflight or self._queue):
                    raise RuntimeError("internal error: evaluations are pending but no job is queued")
                self._advance(None)
        return [got[t] for t in tickets]

    # -- machinery ----------------------------------------------------------------------
    def _pump(self) -> None:
        while self._queue and self._inflight < self._backend.slots:
            job = self._queue.popleft()
            self._backend.submit(job)
            self._inflight += 1

    def _advance(self, timeout: float | None) -> None:
        for outcome in self._backend.poll(timeout):
            self._inflight -= 1
            self._finish(outcome)
        self._pump()

    def _finish(self, outcome: Outcome) -> None:
        job = outcome.job
        # every crash but a final one was followed by a retry
        self.stats["retried"] += job.crashes - (outcome.status == "crashed")
        n = len(job.programs)
        if outcome.status == "ok":
            # a job that raised was re-run in parts (run_job): only the rules that raise alone failed
            results, statuses = [], []
            for r in outcome.results:
                failed = isinstance(r, RuleFailure)
                results.append(Result(r.reward, {**r.metrics, "attempts": outcome.attempts}, r.error) if failed else r)
                statuses.append("error" if failed else "ok")
            self.stats["failed"] += statuses.count("error")
            self.stats["computed"] += statuses.count("ok")
        else:
            self.stats["failed"] += n
            results = [Result(0.0, {"status": outcome.status, "attempts": outcome.attempts}, outcome.error)] * n
            statuses = [outcome.status] * n
        if self.store is not None:
            self.store.put_many(self.fingerprint, [(p, r, s, outcome.seconds / n, outcome.attempts)
                                                   for p, r, s in zip(job.programs, results, statuses)], run=self.run)
        for p, result, status in zip(job.programs, results, statuses):
            key = p.canonical_key
            pending = self._pending.pop(key)
            if status in _REMEMBERED:
                self._cache[key] = result
            first, *rest = pending.tickets
            self._completed[first] = Completed(first, pending.program, result)
            for t in rest:
                self._completed[t] = Completed(t, pending.program, replace(result, cached=True))

    def close(self) -> None:
        """Stop the workers (and Ray if this Evaluator started it); close a store it opened."""
        backend, self._backend = getattr(self, "_backend", None), None
        if backend is not None:
            backend.close()
        if getattr(self, "_own_store", False) and self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Evaluator({self.task!r}, backend={self.backend!r}, job_size={self.job_size})"
