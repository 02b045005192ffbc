"""``Evaluator``: scores programs on a task through a pool, never scoring one rule twice.

The data flow is env/agent -> Evaluator -> Task. A program goes down a funnel, each stage
cheaper than the next (DESIGN.md, "The evaluator's funnel"):

1. its canonical key: a score of this rule in memory ("cache") or in the ``Store`` ("store");
2. its behaviour fingerprint on the probe (``nos_gym.evaluation.probe``): an equivalent
   rule already scored (in memory or in the store) or being scored now, in this batch or an
   earlier one, gives its score ("fingerprint", ``metrics["equivalent_to"]`` names it);
3. the screen: a rule degenerate on the probe (NaN/inf, zero, ignoring the gradient,
   never descending) gets ``task.screen_score()`` untrained ("screen", ``metrics["screen"]``
   and ``error`` say why);
4. the task: a job for a worker ("trained").

``Result.source`` says which stage gave a score. Scores are keyed by the task fingerprint
and compared only within it (fingerprints too). Stages 2 and 3 are on by default
(``fingerprints=True, screen=True``); a task opts out with ``supports_probe = False``
(both) or a ``screen_score()`` of None (screen only). Only trained rules are stored
(with their behaviour); the others are derived again cheaply on the next run.

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
import warnings
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

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
    #: keys of equivalent rules (same behaviour fingerprint) waiting for this one's score
    followers: list[str] = field(default_factory=list)


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
        fingerprints: share one score between rules of one behaviour fingerprint (funnel stage 2).
        screen: give rules degenerate on the probe the task's ``screen_score()`` untrained (stage 3).
    """

    def __init__(self, task: str | Task, backend: str = "auto", *, store: Store | str | os.PathLike | None = None,
                 workers: int | None = None, threads_per_worker: int | None = None, timeout: float | None = 3600.0,
                 max_retries: int = 2, job_size: int | None = None, address: str | None = None,
                 ray_init: dict[str, Any] | None = None, run: str | None = None, fingerprints: bool = True,
                 screen: bool = True, **task_options: Any):
        self.task = make(task, **task_options)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
        if backend == "auto":
            backend = "process" if getattr(self.task, "parallel", False) else "serial"
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
        if job_size is not None and job_size < 1:
            raise ValueError(f"job_size must be >= 1, got {job_size}")
        self.backend_name = backend  # the resolved name: "serial", "process" or "ray"
        self.timeout = timeout
        self.run = run or uuid.uuid4().hex[:12]
        self.fingerprint = self.task.fingerprint
        self.use_fingerprints = bool(fingerprints)
        self.use_screen = bool(screen)
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
        # behaviour fingerprint -> (key, program) of the rule whose score it shares (scored or being scored)
        self._behaviours: dict[str, tuple[str, Program]] = {}
        # key being trained -> its behaviour fingerprint (stored with the result)
        self._behaviour_of: dict[str, str] = {}
        self._floor: tuple[float | None] | None = None  # the task's screen_score(), asked once
        self._queue: deque[Job] = deque()
        self._inflight = 0
        self._completed: OrderedDict[int, Completed] = OrderedDict()
        self._tickets = itertools.count()
        self._jobs = itertools.count()
        self.stats = {"computed": 0, "memory_hits": 0, "store_hits": 0, "fingerprint_hits": 0, "screened": 0,
                      "failed": 0, "retried": 0}

    @property
    def backend(self) -> Backend:
        """The backend object that runs the jobs (``backend_name`` is its name): its workers'
        pids, deaths, slots, ..."""
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
        self.task.check_programs(programs)  # a rule outside the task's domain raises here, never scores 0
        tickets = [next(self._tickets) for _ in programs]
        keys = [p.canonical_key for p in programs]
        unknown = [k for k in dict.fromkeys(keys) if k not in self._cache and k not in self._pending]
        stored = self.store.get_many(self.fingerprint, unknown) if (self.store is not None and unknown) else {}
        fresh: list[Program] = []
        for ticket, key, p in zip(tickets, keys, programs):
            if key in self._cache:
                self.stats["memory_hits"] += 1
                self._completed[ticket] = Completed(ticket, p, replace(self._cache[key], cached=True, source="cache"))
            elif key in self._pending:
                self._pending[key].tickets.append(ticket)
            elif key in stored:
                self.stats["store_hits"] += 1
                rec = stored[key]
                self._cache[key] = rec.result()
                if rec.behaviour is not None:
                    self._behaviours.setdefault(rec.behaviour, (key, rec.as_program()))
                self._completed[ticket] = Completed(ticket, p, self._cache[key])
            else:
                self._pending[key] = _Pending(p, [ticket])
                fresh.append(p)
        fresh = self._funnel(fresh)
        size = self.job_size or max(1, len(fresh))
        for start in range(0, len(fresh), size):
            chunk = fresh[start:start + size]
            limit = None if self.timeout is None else self.timeout * len(chunk)
            self._queue.append(Job(next(self._jobs), chunk, time_limit=limit))
        self._pump()
        return tickets

    def _funnel(self, fresh: list[Program]) -> list[Program]:
        """Stages 2 and 3 for rules not known by key (each already in ``_pending``): resolve
        those an equivalent rule or the screen settles; return the rest, to be trained."""
        if not fresh or not (self.use_fingerprints or self.use_screen) or not getattr(self.task, "supports_probe", True):
            return fresh
        from nos_gym.evaluation.probe import probe  # torch: imported when first needed

        try:
            probes = probe(fresh)
        except Exception as e:  # a probe bug must not stop a search: train these rules instead
            warnings.warn(f"the probe failed ({type(e).__name__}: {e}); {len(fresh)} rules are trained "
                          f"without the fingerprint and screen stages", RuntimeWarning, stacklevel=3)
            return fresh
        stored = {}
        if self.use_fingerprints and self.store is not None:
            wanted = [pr.fingerprint for p, pr in zip(fresh, probes)
                      if not p.stochastic and pr.fingerprint not in self._behaviours]
            stored = self.store.get_by_behaviour(self.fingerprint, wanted) if wanted else {}
        train: list[Program] = []
        for p, pr in zip(fresh, probes):
            key, fp = p.canonical_key, pr.fingerprint
            # only deterministic rules share a score: a stochastic rule's draws come from its own
            # stream (task seed, canonical key), so an equivalent rule's score would be other draws
            # of the same distribution, and which one came first would decide the score
            merge = self.use_fingerprints and not p.stochastic
            if merge:
                known = self._behaviours.get(fp)
                if known is None and fp in stored:
                    rec = stored[fp]
                    known = self._behaviours[fp] = (rec.key, rec.as_program())
                    self._cache.setdefault(rec.key, rec.result())
                if known is not None:
                    rep_key, rep_program = known
                    if rep_key in self._cache:
                        self.stats["fingerprint_hits"] += 1
                        self._resolve(key, _shared(self._cache[rep_key], rep_program), remember=True)
                        continue
                    if rep_key in self._pending:  # being scored: share its result when it comes
                        self.stats["fingerprint_hits"] += 1
                        self._pending[rep_key].followers.append(key)
                        continue
            if self.use_screen and pr.screen is not None:
                floor = self._screen_score()
                if floor is not None:
                    self.stats["screened"] += 1
                    result = Result(floor, {"screen": pr.screen}, error=f"screened: {pr.reason}",
                                    source="screen")
                    self._resolve(key, result, remember=True)
                    continue
            if merge:  # stored beside the score, so later runs find it by behaviour
                self._behaviour_of[key] = fp
                self._behaviours[fp] = (key, p)
            train.append(p)
        return train

    def _screen_score(self) -> float | None:
        """The task's score for a screened rule, asked once (None: the task screens nothing)."""
        if self._floor is None:
            try:
                score = self.task.screen_score()
                self._floor = (None if score is None else float(score),)
            except Exception as e:  # e.g. the data for it is missing: screen nothing, train instead
                warnings.warn(f"{self.task.name}: screen_score() failed ({type(e).__name__}: {e}); "
                              f"degenerate rules are trained", RuntimeWarning, stacklevel=4)
                self._floor = (None,)
        return self._floor[0]

    def _resolve(self, key: str, result: Result, *, remember: bool) -> None:
        """Complete every ticket waiting for ``key`` with ``result`` (the first as is, the rest as cache hits)."""
        pending = self._pending.pop(key)
        if remember:
            self._cache[key] = result
            if self.store is not None and result.source in ("fingerprint", "screen"):
                # settled without training, and recorded all the same: the store then holds every
                # rule a search saw, under its own key (a later run reads it back as a store hit)
                self.store.put(self.fingerprint, pending.program, result, seconds=0.0, attempts=0, run=self.run)
        first, *rest = pending.tickets
        self._completed[first] = Completed(first, pending.program, result)
        for t in rest:
            self._completed[t] = Completed(t, pending.program, replace(result, cached=True, source="cache"))
        for follower in pending.followers:  # equivalent rules that waited for this one
            self._resolve(follower, _shared(result, pending.program), remember=remember)

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
        behaviours = [self._behaviour_of.pop(p.canonical_key, None) for p in job.programs]
        if self.store is not None:
            self.store.put_many(self.fingerprint, [(p, r, s, outcome.seconds / n, outcome.attempts, b)
                                                   for p, r, s, b in zip(job.programs, results, statuses, behaviours)],
                                run=self.run)
        for p, result, status, fp in zip(job.programs, results, statuses, behaviours):
            remember = status in _REMEMBERED
            if not remember and fp is not None and self._behaviours.get(fp, (None,))[0] == p.canonical_key:
                del self._behaviours[fp]  # a failed rule is no one's representative: the next equivalent trains
            self._resolve(p.canonical_key, result, remember=remember)

    def close(self) -> None:
        """Stop the workers (and Ray if this Evaluator started it); close a store it opened."""
        backend, self._backend = getattr(self, "_backend", None), None
        if backend is not None:
            backend.close()
        if getattr(self, "_own_store", False) and self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Evaluator({self.task!r}, backend={self.backend_name!r}, job_size={self.job_size})"


def _shared(result: Result, program: Program) -> Result:
    """``result`` given to a rule equivalent to ``program`` (one behaviour fingerprint), saying so."""
    metrics = {**result.metrics, "equivalent_to": program.format(), "equivalent_key": program.canonical_key}
    return replace(result, metrics=metrics, cached=True, source="fingerprint")
