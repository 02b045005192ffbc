"""Ray: the same jobs on a laptop's local Ray or on a cluster (the paper's 100 workers, section 3.3).

Each job is a Ray *task* (``nos_gym_job``) rather than an actor: tasks are stateless, Ray
places each on any node with a free CPU or GPU, and Ray itself re-runs a task whose
worker process or node died (``max_retries``) -- on another worker, so no evaluation is
lost and nothing here has to track worker health. The task object is put in the object
store once; each worker process loads the data on its first job and keeps it
(``nos_gym.data`` caches per process).

A job over its time limit is cancelled with ``ray.cancel(force=True)``, which kills its
worker; Ray does not retry cancelled tasks, and the outcome is "timeout". On a cluster
with GPUs, ``gpus_per_job=1`` gives each job a GPU, where ``ConvNetTask`` trains its
programs as one grouped network (give the Evaluator a ``job_size`` of
``task.preferred_batch``; that is its default for CUDA tasks).

The programs' package must be importable on every node (install nos-gym there, or pass
``runtime_env`` through ``ray_init``).
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from nos_gym.evaluation.backends import Backend, Job, Outcome, run_job
from nos_gym.tasks.base import Result, Task


def nos_gym_job(task: Task, tokens: list[tuple[str, ...]], threads: int) -> tuple[list[Result], float]:
    """The Ray task: score one job (runs in a Ray worker; its process title is ``ray::nos_gym_job``)."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    return run_job(task, tokens), time.perf_counter() - t0


class RayBackend(Backend):
    """Jobs as Ray tasks.

    Args:
        task: what to score.
        address: an existing cluster ("auto", "ray://host:10001", ...); None starts a local
            Ray unless this process already joined one.
        workers: jobs in flight at once; None: as many as the cluster's CPUs (or GPUs) allow.
        threads: CPUs (and torch threads) per job.
        gpus_per_job: GPUs per job (0 on CPU clusters).
        max_retries: how often Ray re-runs a job whose worker died.
        ray_init: extra ``ray.init`` arguments when we start Ray (e.g. ``num_cpus``, ``runtime_env``).
    """

    name = "ray"

    def __init__(self, task: Task, *, address: str | None = None, workers: int | None = None, threads: int = 1,
                 gpus_per_job: float = 0, max_retries: int = 2,
                 ray_init: dict[str, Any] | None = None):
        try:
            import ray
        except ImportError as e:
            raise ImportError("backend='ray' needs Ray: pip install 'nos-gym[ray]' (or 'ray[default]')") from e
        if max_retries < 0 or threads < 1:
            raise ValueError(f"max_retries must be >= 0 and threads >= 1, got {max_retries} and {threads}")
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            ray.init(address=address, **{"include_dashboard": False, "logging_level": "WARNING", **(ray_init or {})})
            self._owns_ray = True
        self.threads = threads
        resources = ray.cluster_resources()
        if workers is None:
            if gpus_per_job:
                workers = int(resources.get("GPU", 0) // gpus_per_job)
                if workers < 1:
                    raise ValueError(f"gpus_per_job={gpus_per_job} but the Ray cluster has {resources.get('GPU', 0)} GPUs")
            else:
                workers = max(1, int(resources.get("CPU", 1) // threads))
        self.slots = workers
        self._task_ref = ray.put(task)
        self._remote = ray.remote(nos_gym_job).options(num_cpus=threads, num_gpus=gpus_per_job,
                                                       max_retries=max_retries, retry_exceptions=False)
        self.max_retries = max_retries
        self._inflight: dict[Any, tuple[Job, float]] = {}

    def submit(self, job: Job) -> None:
        ref = self._remote.remote(self._task_ref, [p.tokens for p in job.programs], self.threads)
        self._inflight[ref] = (job, time.monotonic())

    def poll(self, timeout: float | None) -> list[Outcome]:
        ray = self._ray
        end = None if timeout is None else time.monotonic() + timeout
        while self._inflight:
            outcomes = self._expire()
            if outcomes:
                return outcomes
            now = time.monotonic()
            limits = [t + job.time_limit for job, t in self._inflight.values() if job.time_limit is not None]
            if end is not None:
                limits.append(end)
            wait_for = max(0.0, min(limits) - now) if limits else None
            ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=wait_for)
            if ready:
                # take everything else that is already done too
                ready, _ = ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
                return [self._outcome(ref) for ref in ready]
            if end is not None and time.monotonic() >= end:
                return self._expire()
        return []

    def _expire(self) -> list[Outcome]:
        """Cancel jobs over their time limit (counted from submission: the Evaluator keeps no more
        jobs in flight than there are slots, so a job starts about when it is submitted)."""
        now, out = time.monotonic(), []
        for ref, (job, t0) in list(self._inflight.items()):
            if job.time_limit is not None and now - t0 >= job.time_limit:
                del self._inflight[ref]
                self._ray.cancel(ref, force=True)  # kills the worker running it
                out.append(Outcome(job, "timeout", error=f"timeout: the evaluation ran {now - t0:.1f}s, over the "
                                                         f"limit of {job.time_limit:g}s; its Ray task was cancelled",
                                   seconds=now - t0))
        return out

    def _outcome(self, ref: Any) -> Outcome:
        ray = self._ray
        job, t0 = self._inflight.pop(ref)
        try:
            results, seconds = ray.get(ref)
            return Outcome(job, "ok", results=results, seconds=seconds)
        except ray.exceptions.RayTaskError as e:  # the task raised: a bug, not a lost worker
            return Outcome(job, "error", error=str(e), seconds=time.monotonic() - t0)
        except ray.exceptions.TaskCancelledError as e:
            return Outcome(job, "timeout", error=f"cancelled: {e}", seconds=time.monotonic() - t0)
        except ray.exceptions.RayError as e:  # worker or node died more often than max_retries
            job.crashes = self.max_retries + 1
            return Outcome(job, "crashed", error=f"crashed: {type(e).__name__}: {e}".strip()[:2000],
                           seconds=time.monotonic() - t0)
        except Exception:
            return Outcome(job, "error", error=traceback.format_exc(limit=8), seconds=time.monotonic() - t0)

    def close(self) -> None:
        for ref in list(self._inflight):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:
                pass
        self._inflight.clear()
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False
