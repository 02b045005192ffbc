"""Local worker processes: the default pool for tasks that train networks.

Each worker is a spawned process holding its own copy of the task (the data is loaded
once per worker, from disk) and running one job at a time with ``threads`` torch
threads, so N workers on N cores do not fight over cores. Why not
``concurrent.futures.ProcessPoolExecutor``: when one of its workers dies every pending
future fails, and it cannot stop a single job that runs too long. Here the parent talks
to each worker over its own pipe and watches its process sentinel, so:

- a job over its time limit gets its worker killed and a "timeout" outcome;
- a worker that dies (OOM killer, SIGKILL, segfault) has its job put back at the head of
  the queue for another (or a fresh) worker, at most ``max_retries`` times, then the
  job's outcome is "crashed" with the exit code;
- a worker whose parent disappears exits on its own (a watchdog thread), so a killed
  search leaves no orphans training.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from nos_gym.evaluation.backends import Backend, Job, Outcome, run_job
from nos_gym.tasks.base import Task

#: time a fresh worker gets to import torch and unpickle the task before its job's clock starts
STARTUP_GRACE = 300.0


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main(conn: Connection, task: Task, threads: int, env: dict[str, str], parent_pid: int) -> None:
    """Worker loop: receive (job id, token lists), send ("start", id) then ("done"|"error", id, payload, seconds)."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
        pass
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job_id, tokens = msg
        conn.send(("start", job_id))
        t0 = time.perf_counter()
        try:
            reply: tuple[Any, ...] = ("done", job_id, run_job(task, tokens), time.perf_counter() - t0)
        except Exception:
            reply = ("error", job_id, traceback.format_exc(limit=8), time.perf_counter() - t0)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    job: Job | None = None
    sent: float = 0.0
    started: float | None = None


class ProcessBackend(Backend):
    """``workers`` local processes with ``threads`` torch threads each.

    Args:
        task: what to score; pickled once per worker (``ConvNetTask`` leaves its data out).
        workers: number of processes.
        threads: torch threads per worker.
        max_retries: how often a job is retried after its worker died.
        gpus: on a CUDA task, worker i sees only GPU ``i % gpus`` (``CUDA_VISIBLE_DEVICES``).
        start_method: "spawn" (default; safe with threads and CUDA) or "forkserver".
    """

    name = "process"

    def __init__(self, task: Task, workers: int, threads: int = 1, max_retries: int = 2, gpus: int = 0,
                 start_method: str = "spawn"):
        if workers < 1 or threads < 1:
            raise ValueError(f"workers and threads must be >= 1, got {workers} and {threads}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.task, self.slots, self.threads = task, workers, threads
        self.max_retries, self.gpus = max_retries, gpus
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker | None] = [None] * workers
        self._queue: deque[Job] = deque()
        #: (job id, exit code) of every worker death seen, for logs and tests
        self.deaths: list[tuple[int, int | None]] = []
        self._startup_failures = 0

    # -- workers ------------------------------------------------------------------------
    def _spawn(self, slot: int) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % self.gpus)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.task, self.threads, env, os.getpid()),
                                 name=f"nos-gym-worker-{slot}", daemon=True)
        try:
            proc.start()
        except Exception as e:  # the task could not be pickled, ...
            parent.close()
            child.close()
            raise TypeError(f"cannot send {type(self.task).__name__} to a worker process ({type(e).__name__}: {e}); "
                            f"make it picklable or use backend='serial'") from e
        child.close()
        worker = self._workers[slot] = _Worker(proc, parent)
        return worker

    def _kill(self, slot: int) -> None:
        worker = self._workers[slot]
        self._workers[slot] = None
        if worker is None:
            return
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=10)
        worker.conn.close()

    @property
    def pids(self) -> dict[int, int]:
        """Worker slot -> pid of the live workers (to watch or kill them)."""
        return {i: w.process.pid for i, w in enumerate(self._workers) if w is not None and w.process.pid}

    def busy_pids(self) -> list[int]:
        """Pids of workers that have started a job."""
        return [w.process.pid for w in self._workers if w is not None and w.job is not None and w.started is not None]

    # -- jobs ---------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self._queue.append(job)
        self._dispatch()

    def _dispatch(self) -> None:
        for slot in range(self.slots):
            if not self._queue:
                return
            worker = self._workers[slot]
            if worker is not None and worker.job is not None:
                continue
            if worker is None or not worker.process.is_alive():
                self._kill(slot)
                worker = self._spawn(slot)
            job = self._queue.popleft()
            try:
                worker.conn.send((job.id, [p.tokens for p in job.programs]))
            except (BrokenPipeError, OSError):  # died between the check and the send
                self._queue.appendleft(job)
                self._kill(slot)
                continue
            worker.job, worker.sent, worker.started = job, time.monotonic(), None

    @staticmethod
    def _deadline(w: _Worker) -> float:
        if w.job.time_limit is None:
            return float("inf")
        # until the worker says it started the job (a fresh one imports torch first), allow a grace period
        start = w.started if w.started is not None else w.sent + STARTUP_GRACE
        return start + w.job.time_limit

    def poll(self, timeout: float | None) -> list[Outcome]:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatch()
            busy = {i: w for i, w in enumerate(self._workers) if w is not None and w.job is not None}
            if not busy:
                return []
            outcomes: list[Outcome] = []
            now = time.monotonic()
            for slot, w in busy.items():
                if now >= self._deadline(w):
                    job = w.job
                    ran = now - (w.started or w.sent)
                    self._kill(slot)
                    outcomes.append(Outcome(job, "timeout", error=f"timeout: the job ran {ran:.1f}s, over its "
                                                                  f"limit of {job.time_limit:g}s; its worker was killed",
                                            seconds=ran))
            busy = {i: w for i, w in busy.items() if self._workers[i] is w}
            if busy and not outcomes:
                nearest = min(self._deadline(w) for w in busy.values())
                limit = nearest if end is None else min(nearest, end)
                wait_for = None if limit == float("inf") else max(0.0, limit - time.monotonic())
                handles: list[Any] = [w.conn for w in busy.values()] + [w.process.sentinel for w in busy.values()]
                wait(handles, timeout=wait_for)
            for slot, w in busy.items():
                outcomes += self._collect(slot, w)
            if outcomes:
                self._dispatch()
                return outcomes
            if end is not None and time.monotonic() >= end:
                return []

    def _collect(self, slot: int, w: _Worker) -> list[Outcome]:
        """Read what worker ``slot`` sent; handle its death."""
        out: list[Outcome] = []
        try:
            while w.job is not None and w.conn.poll():
                msg = w.conn.recv()
                kind, job_id = msg[0], msg[1]
                if w.job is None or job_id != w.job.id:
                    continue
                if kind == "start":
                    w.started = time.monotonic()
                    self._startup_failures = 0
                    continue
                job, w.job = w.job, None
                if kind == "done":
                    out.append(Outcome(job, "ok", results=msg[2], seconds=msg[3]))
                else:
                    out.append(Outcome(job, "error", error=msg[2], seconds=msg[3]))
            if w.job is None or w.process.is_alive():
                return out
        except (EOFError, OSError):
            pass  # the pipe closed: the worker is gone
        job = w.job
        w.process.join(timeout=5)
        code = w.process.exitcode
        self._kill(slot)
        if job is None:
            return out
        self.deaths.append((job.id, code))
        if w.started is None:
            # died before taking its job: the worker cannot start here, whatever the job is
            self._startup_failures += 1
            self._queue.appendleft(job)
            if self._startup_failures >= 2 * self.slots:
                raise RuntimeError(
                    f"{self._startup_failures} worker processes in a row died while starting (last exit code "
                    f"{_describe_exit(code)}); their stderr is above. A common cause: spawned workers import "
                    f"your main script, so a script that creates an Evaluator at module level must guard it "
                    f"with `if __name__ == '__main__':`. Or use backend='serial'.")
            return out
        job.crashes += 1
        if job.crashes <= self.max_retries:
            self._queue.appendleft(job)  # the next free (or a fresh) worker takes it first
        else:
            out.append(Outcome(job, "crashed", error=f"crashed: the worker died {job.crashes} times running this "
                                                     f"evaluation (last exit code {_describe_exit(code)}); retries exhausted",
                               seconds=time.monotonic() - (w.started or w.sent)))
        return out

    def close(self) -> None:
        for slot, w in enumerate(self._workers):
            if w is None:
                continue
            try:
                if w.job is None:
                    w.conn.send(None)
                    w.process.join(timeout=2)
            except (BrokenPipeError, OSError):
                pass
            self._kill(slot)
        self._queue.clear()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)
