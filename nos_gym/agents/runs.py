"""Run directories: config, a log of every sampled rule, checkpoints, top-k, the store.

Every agent run writes one directory::

    runs/trpo_lstm-rosenbrock-s1-20260101-120000/
      config.yaml     every setting (and the agent's name); ``--resume`` reads it back
      log.jsonl       one line per sampled rule: sample index, batch, tokens, paper notation,
                      canonical key, reward, whether the score was reused (cached), metrics
      updates.jsonl   one line per batch: what the agent's update did (KL, surrogate, loss ...)
      checkpoint.pt   the agent's state after the last finished batch (controller,
                      optimizer, baseline, RNG states) and the sha256 of the log lines it
                      covers; a ``torch.save`` file
      checkpoint.pt.sha256   the checkpoint's sha256 (JSON), so a damaged one is refused
      top.txt         the best distinct rules in paper notation (also top.json)
      run.lock        held (``flock``) by the process using the run; the kernel drops it
                      when that process ends, however it ends

and records every scored rule in the SQLite store (``args.store``, shared by runs), so a
rule scored once -- in this run, an earlier one, or before an interruption -- is never
scored again.

Writing: the log is appended and flushed after every batch; config.yaml, top.txt,
top.json and the checkpoint are written to a temporary file, fsync'ed and renamed over
the old one, so a kill or a full disk never leaves a truncated file. A checkpoint is
written as: checkpoint.pt.tmp (fsync), then checkpoint.pt.sha256 naming the new digest
and the previous one, then the rename -- a kill between the last two leaves the previous
checkpoint, which the sidecar still accepts.

One process per run: ``Run.open`` takes ``run.lock`` (``fcntl.flock``, non-blocking); a
second process on the same directory stops with an error naming the holder.

Resuming: the checkpoint is accepted only if its sha256 is the recorded one and the log's
first ``samples`` lines are the ones it was written after (their sha256). Records past it
(at most one checkpoint interval: the batch in progress at a kill, or its half-written
last line) are cut and re-sampled -- the RNG states are restored, so the same rules come
back, and their scores come from the store. Anything else -- no checkpoint but more
records than one interval, a damaged checkpoint, a log that lost or changed records --
is refused, with nothing changed, and the error says how to recover: ``--rebuild``
(continue from the log: every record kept, the damaged checkpoint kept aside, the
agent's state restarting from its seed) or a new run directory with the same settings.

Budget on resume: ``--total-rules`` may extend a run (finished or not) or shorten the
rest of it, but not below the rules already sampled; resuming a finished run without a
larger budget is an error (nothing to do). config.yaml is rewritten only when a setting
changed.

Ctrl-C: the first press asks the run to stop after the batch in progress (the loop
checks ``run.stop_requested``), which then is logged and checkpointed as usual; a second
press stops at once, keeping the last checkpoint. Either way the top-k file is written,
the command to resume is printed and the process exits with status 130. SIGTERM does the
same and exits with 143.

Errors: a setting, a run directory in use, damaged or unwritable, a full disk -- each
stops with a ``ConfigError`` (``RunError`` for the run directory): one line that names the
file and what to do; the command line turns it into exit status 2. A new run that fails
before it logged anything leaves no directory behind.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from nos_gym.agents.config import ConfigError, RunArgs

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Run", "RunError", "read_log", "top_rules", "format_top"]

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
UPDATES_FILE = "updates.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKSUM_FILE = "checkpoint.pt.sha256"
LOCK_FILE = "run.lock"
TOP_TXT = "top.txt"
TOP_JSON = "top.json"
#: the checkpoint format written here (older checkpoints have no "format" key and no sidecar)
CHECKPOINT_FORMAT = 2
_CHECKPOINT_KEYS = ("agent", "batch", "samples", "global_rng", "state")


class RunError(ConfigError):
    """A run directory that cannot be used as asked: in use, damaged, unwritable, a full disk.

    A ``ConfigError``, so the command line prints it as one line and exits with status 2.
    """


# ------------------------------------------------------------------------- reading
def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl`` (a half-written last line is ignored)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a run directory?")
    out = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # killed mid-write: everything before it is whole
    return out


def top_rules(records: Sequence[dict[str, Any]], k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` best distinct rules (by canonical key) of log records, best first.

    Ties keep the rule found first. Each item: rank, reward, rule, key, tokens, sample
    (the index of the first sample of that rule) and count (how often it was sampled).
    """
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        key = r["key"]
        if key in best:
            best[key]["count"] += 1
            continue
        best[key] = {"reward": float(r["reward"]), "rule": r["rule"], "key": key,
                     "tokens": list(r["tokens"]), "sample": int(r["sample"]), "count": 1}
    ranked = sorted(best.values(), key=lambda d: (-d["reward"], d["sample"]))[:k]
    for i, d in enumerate(ranked):
        d["rank"] = i + 1
    return ranked


def format_top(top: Sequence[dict[str, Any]], title: str = "") -> str:
    """A leaderboard as plain text: rank, reward, first sample, rule in paper notation."""
    lines = [title] if title else []
    lines.append(f"{'rank':>4}  {'reward':>7}  {'sample':>7}  rule")
    for d in top:
        lines.append(f"{d['rank']:>4}  {d['reward']:>7.4f}  {d['sample']:>7}  {d['rule']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Run
class Run:
    """One agent run's directory, log, checkpoints and env/evaluator (see the module doc).

    Use as a context manager::

        with Run.open(args, "trpo_lstm", resume) as run:
            envs = run.make_envs()
            state = run.checkpoint          # None for a new run (or one rebuilt from its log)
            for batch in run.batches():     # resumes at the right batch, progress bar
                ... sample through envs, run.record(batch, infos, rewards), update ...
                run.save({...agent state...})
                if run.stop_requested: break
    """

    def __init__(self, path: Path, args: RunArgs, agent: str, resumed: bool, batches_per_checkpoint: int = 1):
        self.path = path
        self.args = args
        self.agent = agent
        self.resumed = resumed
        #: True when ``--rebuild`` continued the run from its log (the agent's state restarted)
        self.rebuilt = False
        #: batches between two checkpoints (1 for agents that save after every batch)
        self.batches_per_checkpoint = max(1, int(batches_per_checkpoint))
        self.name = path.name
        self.log_path = path / LOG_FILE
        self.checkpoint_path = path / CHECKPOINT_FILE
        self.checkpoint: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        self.stop_requested = False
        self.interrupted = False
        self._t0 = time.time()
        self._elapsed_before = 0.0
        self._start_batch = 0
        self._log_hash = hashlib.sha256()
        self._checkpoint_sha: str | None = None
        self._evaluator = None
        self._envs = None
        self._log_file: Any = None
        self._lock_fd: int | None = None
        self._created_dir = False
        self._old_handlers: dict[int, Any] = {}
        self._stop_signal = signal.SIGINT
        self._bar = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, args: RunArgs, agent: str, resume: str | os.PathLike | None = None, *,
             rebuild: bool | None = None, batches_per_checkpoint: int = 1) -> Run:
        """A new run directory for ``args``, or the run in ``resume`` made ready to continue.

        ``args`` are validated first (so nothing is created for a bad setting). A new run
        seeds Python's, NumPy's and torch's global generators from ``args.seed``; a resumed
        one restores them from its checkpoint (agents keep their own generators in the
        checkpoint's ``state``). ``rebuild`` (default: ``resume.rebuild``, set by
        ``--rebuild``) continues a run whose checkpoint is missing or damaged from its log.
        ``batches_per_checkpoint``: how many batches the agent runs between two ``save``
        calls (how far the log may be ahead of the checkpoint after a kill).

        Raises ``ConfigError`` for a bad setting and ``RunError`` for a run directory that
        is in use, damaged or cannot be written.
        """
        args.validate()
        if rebuild is None:
            rebuild = bool(getattr(resume, "rebuild", False))
        if rebuild and resume is None:
            raise ConfigError("--rebuild continues a run from its log: it goes with --resume RUN_DIR")
        torch.set_num_threads(args.torch_threads)
        if resume is None:
            return cls._open_new(args, agent, batches_per_checkpoint)
        return cls._open_resumed(Path(resume), args, agent, rebuild, batches_per_checkpoint)

    @classmethod
    def _open_new(cls, args: RunArgs, agent: str, every: int) -> Run:
        path = Path(args.run_dir) if args.run_dir else _fresh_dir(Path(args.runs_root), agent, args)
        _refuse_a_run_there(path)
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _io_error(e, "create the run directory", path,
                            advice="choose a writable place with --runs-root or --run-dir") from None
        args.run_dir = str(path)
        run = cls(path, args, agent, resumed=False, batches_per_checkpoint=every)
        run._created_dir = created
        try:
            run._lock()
            _refuse_a_run_there(path)  # another process may have started one there meanwhile
            run._seed_globals()
            run._write_config()
            run._open_log()
        except BaseException:
            run._discard()
            raise
        return run

    @classmethod
    def _open_resumed(cls, path: Path, args: RunArgs, agent: str, rebuild: bool, every: int) -> Run:
        run = cls(path, args, agent, resumed=True, batches_per_checkpoint=every)
        try:
            run._lock()
            run._load_for_resume(rebuild)
            run._write_config(only_if_changed=True)
            run._open_log()
        except BaseException:
            run._close_log()
            run._unlock()
            raise
        return run

    def _seed_globals(self) -> None:
        random.seed(self.args.seed)
        np.random.seed(self.args.seed % 2**32)
        torch.manual_seed(self.args.seed)

    def _write_config(self, only_if_changed: bool = False) -> None:
        data = {"agent": self.agent, **asdict(self.args)}
        if only_if_changed:
            try:
                if yaml.safe_load((self.path / CONFIG_FILE).read_text()) == data:
                    return  # nothing changed: leave the file alone
            except (OSError, yaml.YAMLError):
                pass
        self._write_atomic(self.path / CONFIG_FILE, yaml.safe_dump(data, sort_keys=False).encode())

    def _open_log(self) -> None:
        try:
            self._log_file = self.log_path.open("ab")
        except OSError as e:
            raise self._io_error(e, "open", self.log_path) from None

    # ------------------------------------------------------------------ the lock
    def _lock(self) -> None:
        """Take ``run.lock`` for this process (released when the run closes or the process ends)."""
        lock_path = self.path / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            advice = (f"a run writes in its directory: make {self.path} writable (or copy the directory somewhere "
                      f"writable and resume the copy)") if self.resumed else None
            raise self._io_error(e, "open the lock file", lock_path, advice=advice) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _lock_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunError(f"{self.path} is in use by another process{holder}: one run directory takes one "
                                   f"process at a time (two would both append to its log). Wait for it to finish, "
                                   f"or stop it (Ctrl-C) and then continue with --resume {self.path}") from None
                raise self._io_error(e, "lock", lock_path) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {_hostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        except OSError:
            pass  # the lock holds without the note
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.ftruncate(self._lock_fd, 0)  # no stale "pid ..." note once the run is free
            except OSError:
                pass
            try:
                os.close(self._lock_fd)  # closing the file drops the flock
            except OSError:
                pass
            self._lock_fd = None

    # ------------------------------------------------------------------ resuming
    def _load_for_resume(self, rebuild: bool) -> None:
        """Check the run directory, then (only if every check passed) cut it back to its checkpoint."""
        lines, partial = self._read_log_lines()
        records = self._parse_log(lines)
        ckpt, problem = self._read_checkpoint()
        every = self.batches_per_checkpoint * self.args.num_envs
        if ckpt is not None:
            problem = self._disagreement(ckpt, lines, records)
        if rebuild:
            if ckpt is not None and problem is None:
                raise RunError(f"--rebuild: the checkpoint of {self.path} is intact and agrees with its log; "
                               f"continue it with --resume {self.path} (without --rebuild)")
            keep = len(records)
            self._start_batch = math.ceil(keep / self.args.num_envs)
            self.rebuilt = True
        elif problem is not None:
            raise self._refusal(problem, len(records))
        elif ckpt is None:
            if len(records) > every or any(r["batch"] >= self.batches_per_checkpoint for r in records):
                raise self._refusal(f"{CHECKPOINT_FILE} is missing, but {LOG_FILE} holds {len(records)} records "
                                    f"(a kill before the first checkpoint leaves at most {every})", len(records))
            keep = 0  # stopped before its first checkpoint: start over (same seed, same rules, scores from the store)
        else:
            self.checkpoint = ckpt
            keep = int(ckpt["samples"])
        self.records = records[:keep]
        self._check_budget()

        # every check passed: now change files
        if rebuild:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name in (CHECKPOINT_FILE, CHECKSUM_FILE):
                src = self.path / name
                if src.exists():
                    try:
                        os.replace(src, self.path / f"{name}.bad-{stamp}")
                    except OSError as e:
                        raise self._io_error(e, "rename", src) from None
            print(f"[nos-gym] rebuilding {self.path} from its log: its {keep} records are kept and the run continues "
                  f"at batch {self._start_batch}; the agent's state restarts from seed {self.args.seed} (any old "
                  f"checkpoint is kept as {CHECKPOINT_FILE}.bad-{stamp})", file=sys.stderr, flush=True)
        if keep != len(lines) or partial:
            # cut back to the checkpoint: the rest is re-sampled (same RNG states) and read from the store
            self._write_atomic(self.log_path, b"".join(lines[:keep]))
        self._log_hash = hashlib.sha256(b"".join(lines[:keep]))
        updates = self.path / UPDATES_FILE
        if updates.exists() and not rebuild:
            last = self.batch_index  # updates of batches before it are kept
            text = self._read_text(updates)
            keep_lines = [line for line in text.splitlines()
                          if line.strip() and _batch_of(line) is not None and _batch_of(line) < last]
            new_text = "".join(line + "\n" for line in keep_lines)
            if new_text != text:
                self._write_atomic(updates, new_text.encode())
        if self.checkpoint is not None:
            self._elapsed_before = float(self.checkpoint.get("elapsed", 0.0))
            _set_global_rng_states(self.checkpoint["global_rng"])
        else:
            self._elapsed_before = float(self.records[-1].get("time") or 0.0) if self.records else 0.0
            self._seed_globals()

    def _read_text(self, path: Path) -> str:
        try:
            return path.read_text()
        except OSError as e:
            raise self._io_error(e, "read", path) from None

    def _read_log_lines(self) -> tuple[list[bytes], bytes]:
        """The log's whole lines (bytes, each ending in a newline) and a half-written last line (or b"")."""
        if not self.log_path.exists():
            return [], b""
        try:
            data = self.log_path.read_bytes()
        except OSError as e:
            raise self._io_error(e, "read", self.log_path) from None
        parts = data.split(b"\n")
        partial = parts.pop()
        return [p + b"\n" for p in parts], partial

    def _parse_log(self, lines: list[bytes]) -> list[dict[str, Any]]:
        records = []
        for i, raw in enumerate(lines):
            try:
                rec = json.loads(raw)
                ok = (isinstance(rec, dict) and isinstance(rec.get("batch"), int) and "key" in rec
                      and "reward" in rec)
            except (ValueError, UnicodeDecodeError):
                ok = False
            if not ok:
                raise RunError(f"cannot resume {self.path}: {LOG_FILE} line {i + 1} is not a whole record "
                               f"({raw[:60]!r}); the {i} records before it are intact. Nothing was changed. Repair or "
                               f"remove that line by hand, or start a new run with the same settings: "
                               f"{self._new_run_hint()}")
            if rec.get("sample") != i:
                raise RunError(f"cannot resume {self.path}: {LOG_FILE} line {i + 1} holds sample {rec.get('sample')!r}, "
                               f"expected {i} (records are missing or repeated). Nothing was changed. Start a new run "
                               f"with the same settings: {self._new_run_hint()}")
            records.append(rec)
        return records

    def _read_checkpoint(self) -> tuple[dict[str, Any] | None, str | None]:
        """``(checkpoint, None)``, ``(None, None)`` when there is none, ``(None, problem)`` when it is bad."""
        path = self.checkpoint_path
        if not path.exists():
            return None, None
        try:
            data = path.read_bytes()
        except OSError as e:
            raise self._io_error(e, "read", path) from None
        digest = hashlib.sha256(data).hexdigest()
        known, problem = self._read_checksums()
        if problem is not None:
            return None, problem
        if known is not None and digest not in known:
            return None, (f"{CHECKPOINT_FILE} is damaged: its sha256 is not the one recorded in {CHECKSUM_FILE} "
                          f"(it was truncated, overwritten or altered; {len(data)} bytes)")
        try:
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - whatever torch/pickle raise for a bad file
            return None, f"{CHECKPOINT_FILE} cannot be read ({type(e).__name__}: {_one_line(e)})"
        if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
            return None, f"{CHECKPOINT_FILE} is not a checkpoint of a nos-gym run"
        if known is None:
            if ckpt.get("format", 1) >= CHECKPOINT_FORMAT:
                return None, f"{CHECKSUM_FILE} is missing, so {CHECKPOINT_FILE} cannot be verified"
            print(f"[nos-gym] {path} carries no checksum (written by an older nos-gym); resuming without verifying it",
                  file=sys.stderr, flush=True)
        self._checkpoint_sha = digest
        return ckpt, None

    def _read_checksums(self) -> tuple[set[str] | None, str | None]:
        path = self.path / CHECKSUM_FILE
        if not path.exists():
            return None, None
        try:
            data = json.loads(path.read_bytes())
            known = {data["sha256"]} | ({data["previous"]} if data.get("previous") else set())
            if not all(isinstance(d, str) for d in known):
                raise ValueError
        except OSError as e:
            raise self._io_error(e, "read", path) from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None, f"{CHECKSUM_FILE} is damaged, so {CHECKPOINT_FILE} cannot be verified"
        return known, None

    def _disagreement(self, ckpt: dict[str, Any], lines: list[bytes], records: list[dict[str, Any]]) -> str | None:
        """Why the log and the checkpoint do not belong together (None when they do)."""
        if ckpt.get("agent") != self.agent:
            return f"{CHECKPOINT_FILE} was written by the {ckpt.get('agent')!r} agent, not by {self.agent!r}"
        n, batch = int(ckpt["samples"]), int(ckpt["batch"])
        if len(records) < n:
            return (f"{LOG_FILE} holds {len(records)} records but the checkpoint was written after {n} "
                    f"(records were lost)")
        want = ckpt.get("log_sha256")
        if want is not None and hashlib.sha256(b"".join(lines[:n])).hexdigest() != want:
            return (f"the first {n} records of {LOG_FILE} are not the ones the checkpoint was written after "
                    f"(the log was edited or replaced)")
        every = self.batches_per_checkpoint * self.args.num_envs
        tail = records[n:]
        if len(tail) > every or any(r["batch"] < batch for r in tail):
            return (f"{LOG_FILE} holds {len(tail)} records past the checkpoint (a kill leaves at most {every}, "
                    f"one checkpoint interval)")
        return None

    def _refusal(self, problem: str, n_records: int) -> RunError:
        kept = (f"; {CHECKPOINT_FILE} is kept aside as {CHECKPOINT_FILE}.bad-TIME"
                if self.checkpoint_path.exists() else "")
        return RunError(f"cannot resume {self.path}: {problem}. Nothing was changed (its {n_records} records are in "
                        f"{LOG_FILE}). To recover, continue the run from its log: --resume {self.path} --rebuild "
                        f"(every record kept; the agent's state restarts from its seed{kept}); or start a new run "
                        f"with the same settings: {self._new_run_hint()}")

    def _new_run_hint(self) -> str:
        return (f"--config {self.path / CONFIG_FILE} --run-dir NEW_DIR (rules scored before come from the store, "
                f"none is trained again)")

    def _check_budget(self) -> None:
        """A resumed run must have something to do, and cannot shrink below what it sampled."""
        if self.num_batches > self.batch_index:
            return
        done, total = self.samples, self.args.total_rules
        more = self.batch_index * self.args.num_envs
        if total < done:
            raise RunError(f"cannot resume {self.path} with --total-rules {total}: it has already sampled {done} "
                           f"rules and a run cannot shrink; pass --total-rules N with N > {more} to extend it")
        raise RunError(f"{self.path} is finished: {done} rules sampled, its budget is {total}; nothing to do. "
                       f"To extend it, pass --total-rules N with N > {more}")

    # ------------------------------------------------------------------ progress
    @property
    def samples(self) -> int:
        """Rules logged so far (including before a resume)."""
        return len(self.records)

    @property
    def num_batches(self) -> int:
        """Batches in the whole budget: ceil(total_rules / num_envs)."""
        return math.ceil(self.args.total_rules / self.args.num_envs)

    @property
    def batch_index(self) -> int:
        """Batches finished (checkpointed) so far."""
        return int(self.checkpoint["batch"]) if self.checkpoint is not None else self._start_batch

    @property
    def next_batch(self) -> int:
        """The index of the batch the next ``record`` call logs (batches before it are in the log)."""
        return math.ceil(self.samples / self.args.num_envs)

    def batches(self) -> Iterator[int]:
        """Indices of the batches still to run, with a progress bar; stops early on Ctrl-C."""
        self.start_progress()
        try:
            for b in range(self.batch_index, self.num_batches):
                if self.stop_requested:
                    break
                yield b
        finally:
            self.close_progress()

    def start_progress(self) -> None:
        """Open the tqdm bar over the budget (``batches()`` does it; agents with their own loop call it)."""
        from tqdm.auto import tqdm

        total = self.num_batches * self.args.num_envs
        self._bar = tqdm(total=total, initial=min(self.samples, total), unit="rule", dynamic_ncols=True,
                         desc=f"{self.agent} {self.args.task}", disable=not self.args.progress,
                         file=sys.stderr)
        if self.records:
            self._bar.set_postfix(best=f"{max(r['reward'] for r in self.records):.3f}", refresh=False)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ the env
    @property
    def evaluator(self):
        """The evaluator every rule is scored through (store-backed, shared by the envs)."""
        if self._evaluator is None:
            from nos_gym.evaluation import Evaluator

            a = self.args
            store = a.store or None
            try:
                if store is not None and store != ":memory:":
                    Path(store).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
                self._evaluator = Evaluator(a.task, backend=a.backend, store=store, run=self.name,
                                            timeout=a.eval_timeout, address=a.ray_address or None,
                                            fingerprints=a.fingerprints, screen=a.screen, **a.task_options)
            except ConnectionError as e:
                raise RunError(f"backend {a.backend!r}: cannot connect to {a.ray_address or '$RAY_ADDRESS'}: "
                               f"{_one_line(e)}; check --ray-address{self._then()}") from None
            except OSError as e:
                raise _io_error(e, "open the result store", Path(str(store)),
                                advice="choose a writable --store (or --store '' for none)",
                                then=self._then()) from None
            except sqlite3.Error as e:
                raise self._store_error(e) from None
        return self._evaluator

    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``OptimizerSearch-v0`` that match this run's settings."""
        a = self.args
        return dict(evaluator=self.evaluator, depth=a.depth, space=a.space,
                    distinct_operands=a.distinct_operands, no_final_addition=a.no_final_addition,
                    reuse_result=a.reuse_result)

    def make_envs(self, invalid_action: str = "raise"):
        """The vector env of ``num_envs`` lockstep sub-envs (one batch of rules scored together).

        ``invalid_action="raise"``: our agents always sample with the masks, so an invalid
        token is a bug that must not be silently projected.
        """
        if self._envs is None:
            import gymnasium as gym

            import nos_gym  # noqa: F401  (registers the env ids)

            self._envs = gym.make_vec("OptimizerSearch-v0", num_envs=self.args.num_envs,
                                      vectorization_mode="vector_entry_point", invalid_action=invalid_action,
                                      **self.env_kwargs())
        return self._envs

    # ------------------------------------------------------------------ recording
    def record(self, batch: int, infos: Sequence[dict[str, Any]], rewards: Sequence[float]) -> list[dict[str, Any]]:
        """Log one batch of finished rules (terminal env infos and rewards); returns the records."""
        now = self._elapsed_before + time.time() - self._t0
        new = []
        for i, (info, reward) in enumerate(zip(infos, rewards)):
            new.append({"sample": len(self.records) + i, "batch": int(batch), "reward": float(reward),
                        "rule": info["rule"], "key": info["canonical_key"], "tokens": list(info["tokens"]),
                        "cached": bool(info.get("cached", False)), "source": info.get("source", "trained"),
                        "error": info.get("error"),
                        "metrics": _jsonable(info.get("metrics", {})), "time": round(now, 3)})
        data = b"".join((json.dumps(rec) + "\n").encode() for rec in new)
        try:
            self._log_file.write(data)
            self._log_file.flush()
        except OSError as e:
            raise self._io_error(e, "append to", self.log_path) from None
        self._log_hash.update(data)
        self.records.extend(new)
        if self._bar is not None and new:
            best = max(r["reward"] for r in self.records)
            self._bar.set_postfix(best=f"{best:.3f}", batch_mean=f"{float(np.mean([r['reward'] for r in new])):.3f}",
                                  refresh=False)
            self._bar.update(len(new))
        return new

    def restore_global_rng(self) -> None:
        """Set Python's, NumPy's and torch's global generators back to the checkpoint's states."""
        if self.checkpoint is not None:
            _set_global_rng_states(self.checkpoint["global_rng"])

    def log_update(self, batch: int, stats: dict[str, Any]) -> None:
        """Append what the agent's update after ``batch`` did to ``updates.jsonl``."""
        path = self.path / UPDATES_FILE
        try:
            with path.open("a") as f:
                f.write(json.dumps({"batch": int(batch), **_jsonable(stats)}) + "\n")
        except OSError as e:
            raise self._io_error(e, "append to", path) from None

    def restore(self, **objects: Any) -> bool:
        """On ``--resume``, load each object's saved state from the checkpoint: ``name=obj`` for
        an object saved as ``state[name]``, through its ``load_state_dict`` (a module, an
        optimizer, a baseline) or ``set_state`` (a ``torch.Generator``). False (nothing loaded)
        for a new run."""
        if self.checkpoint is None:
            return False
        state = self.checkpoint["state"]
        for name, obj in objects.items():
            (obj.set_state if isinstance(obj, torch.Generator) else obj.load_state_dict)(state[name])
        return True

    def save(self, state: dict[str, Any]) -> None:
        """Checkpoint the agent's ``state`` (plus the run's counters and global RNG states), atomically.

        Order: the log is fsync'ed; checkpoint.pt.tmp is written and fsync'ed; the sidecar
        naming its sha256 (and the previous checkpoint's) replaces the old sidecar; then
        checkpoint.pt.tmp replaces checkpoint.pt. A kill at any point leaves a checkpoint
        that verifies: the new one or the previous one.
        """
        try:
            os.fsync(self._log_file.fileno())
        except OSError as e:
            raise self._io_error(e, "write", self.log_path) from None
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "agent": self.agent,
            "batch": self.batch_index_after_save(),
            "samples": self.samples,
            "log_sha256": self._log_hash.hexdigest(),
            "elapsed": self._elapsed_before + time.time() - self._t0,
            "global_rng": _global_rng_states(),
            "state": state,
        }
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        tmp = self.path / (CHECKPOINT_FILE + ".tmp")
        try:
            _write_synced(tmp, data)
        except OSError as e:
            _remove_quietly(tmp)
            raise self._io_error(e, "write", tmp) from None
        sums = {"sha256": digest, "previous": self._checkpoint_sha, "file": CHECKPOINT_FILE,
                "bytes": len(data), "samples": self.samples}
        try:
            self._write_atomic(self.path / CHECKSUM_FILE, (json.dumps(sums) + "\n").encode())
        except RunError:
            _remove_quietly(tmp)
            raise
        try:
            os.replace(tmp, self.checkpoint_path)
        except OSError as e:
            _remove_quietly(tmp)
            raise self._io_error(e, "write", self.checkpoint_path) from None
        _fsync_dir(self.path)
        self._checkpoint_sha = digest
        self.checkpoint = ckpt

    def batch_index_after_save(self) -> int:
        """Batches finished once the batch just logged is counted (a batch is ``num_envs`` records)."""
        return math.ceil(self.samples / self.args.num_envs)

    def top(self, k: int | None = None) -> list[dict[str, Any]]:
        return top_rules(self.records, k or self.args.top_k)

    def write_top(self) -> str:
        """Write top.txt and top.json (each atomically) and return the text."""
        top = self.top()
        text = format_top(top, title=f"top {len(top)} rules of {self.name} ({self.samples} sampled rules, "
                                     f"task {self.args.task})")
        self._write_atomic(self.path / TOP_TXT, (text + "\n").encode())
        self._write_atomic(self.path / TOP_JSON, (json.dumps(top, indent=1) + "\n").encode())
        return text

    # ------------------------------------------------------------------ I/O errors
    def _write_atomic(self, path: Path, data: bytes) -> None:
        """``path`` replaced by ``data`` whole or not at all (tmp file, fsync, rename)."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            _write_synced(tmp, data)
            os.replace(tmp, path)
        except OSError as e:
            _remove_quietly(tmp)
            raise self._io_error(e, "write", path) from None
        _fsync_dir(path.parent)

    def _then(self) -> str:
        """What to do once the cause is fixed."""
        if self.resumed or self.records or self.checkpoint is not None:
            return f", then continue with --resume {self.path}"
        return ", then run the command again"

    def _io_error(self, e: OSError, doing: str, path: Path, advice: str | None = None) -> RunError:
        return _io_error(e, doing, path, advice=advice, then=self._then())

    def _store_error(self, e: sqlite3.Error) -> RunError:
        text = _one_line(e)
        if type(e).__name__ == "StoreError":  # nos_gym.store's own message names the file and what to do
            return RunError(f"{text}{self._then()}")
        low = text.lower()
        if "full" in low:
            advice = "free some disk space"
        elif "readonly" in low or "read-only" in low or "unable to open" in low:
            advice = "choose a writable --store (or --store '' for none)"
        else:
            advice = "check the store file, or choose another --store"
        return RunError(f"the result store {self.args.store}: {text}; {advice}{self._then()}")

    def _as_run_error(self, exc: BaseException | None) -> BaseException | None:
        """The one-line error an exception ending the run becomes (None: let it through as it is)."""
        if exc is None or isinstance(exc, ConfigError):
            return exc
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
            name = exc.filename if exc.filename is not None else "a file"
            return _io_error(exc, "use", Path(str(name)), then=self._then())
        if isinstance(exc, sqlite3.Error):
            return self._store_error(exc)
        return exc

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> Run:
        # Ctrl-C, and SIGTERM (`kill PID`, a job scheduler's stop, the end of a nohup'd session):
        # finish the batch in flight, save, and exit 128 + the signal (130, 143)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_stop_signal)
        return self

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.interrupted = True
        self._stop_signal = signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n[nos-gym] {what}: stopping after this batch and saving (send it again to stop now, "
              "keeping the last checkpoint)", file=sys.stderr, flush=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        hard_stop = exc_type is KeyboardInterrupt
        if hard_stop:
            self.interrupted = True
        failed = exc_type is not None and issubclass(exc_type, Exception)
        error = self._as_run_error(exc) if failed else None
        try:
            self.close()
            if failed and not self.resumed and not self.records:
                self._discard()  # a new run that failed before logging a rule leaves nothing behind
            elif self.records:
                try:
                    text = self.write_top()
                except RunError as e:
                    if error is None:
                        error = e
                else:
                    if error is None and (exc_type is None or hard_stop):
                        print(text)
            if error is None and exc_type is None and not self.interrupted and self.finished and self.args.promote:
                error = self._promote_at_end()
            if self.interrupted and error is None:
                print(f"[nos-gym] stopped after {self.samples} rules ({self.batch_index} batches checkpointed); "
                      f"continue with:  --resume {self.path}", file=sys.stderr, flush=True)
        finally:
            self._unlock()
        if error is not None and error is not exc:
            raise error from exc
        if error is None and (hard_stop or (self.interrupted and exc_type is None)):
            raise SystemExit(128 + int(self._stop_signal))  # stopped by a signal: not a finished run (130, 143)
        return False

    def _promote_at_end(self) -> RunError | None:
        """The setting ``promote``: re-score the best rules at a higher fidelity (``nos_gym.evaluation.promotion``);
        skipped when the run's current leaderboard was promoted before (a finished run resumed)."""
        from nos_gym.evaluation.promotion import promotion_label

        s = self.args.promote
        label = promotion_label(s.get("preset"), s.get("seeds", ()))
        done = self.path / f"promoted-{label}.json"
        try:
            if json.loads(done.read_text()).get("run_samples") == self.samples:
                return None
        except (OSError, ValueError):
            pass
        again = (f"nos-gym promote {self.path} {'--preset ' + s['preset'] if s.get('preset') else ''} "
                 f"--top {s.get('top', 10)}{' --seeds ' + ' '.join(map(str, s['seeds'])) if s.get('seeds') else ''}")
        print(f"[nos-gym] the run is complete; promoting its best {s.get('top', 10)} rules to {label}",
              file=sys.stderr, flush=True)
        try:
            board = promote_run(self.path, preset=s.get("preset"), top=s.get("top", 10), seeds=s.get("seeds", ()),
                                task_options=s.get("task_options"), store=self.args.store or "",
                                backend=s.get("backend", self.args.backend))
        except KeyboardInterrupt:
            print(f"[nos-gym] promotion interrupted; the run is complete: promote with  {again}", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as e:  # noqa: BLE001 - the run's own results are safe: say how to promote again
            return RunError(f"the run is complete, but promoting its best rules failed: {' '.join(str(e).split())}; "
                            f"promote with  {again}")
        print(board.text())
        print(f"[nos-gym] saved {' and '.join(map(str, board.saved))}", file=sys.stderr, flush=True)
        return None

    def close(self) -> None:
        """Close the progress bar, the log, the envs and the evaluator (the lock is released by ``__exit__``)."""
        self.close_progress()
        self._close_log()
        if self._envs is not None:
            self._envs.close()
            self._envs = None
        if self._evaluator is not None:
            close = getattr(self._evaluator, "close", None)
            if close is not None:
                close()
            self._evaluator = None

    def _close_log(self) -> None:
        f, self._log_file = self._log_file, None
        if f is not None and not f.closed:
            try:
                f.close()  # flushes; on a full disk what is lost is past the checkpoint, and resume cuts it
            except OSError:
                pass

    def _discard(self) -> None:
        """Remove what opening a new run created (nothing was logged): no directory is left behind."""
        self._close_log()
        for name in (CONFIG_FILE, CONFIG_FILE + ".tmp", CHECKPOINT_FILE + ".tmp", CHECKSUM_FILE + ".tmp",
                     TOP_TXT + ".tmp", TOP_JSON + ".tmp", LOCK_FILE):
            _remove_quietly(self.path / name)
        for name in (LOG_FILE, UPDATES_FILE):
            p = self.path / name
            try:
                if p.is_file() and not p.is_symlink() and p.stat().st_size == 0:
                    p.unlink()
            except OSError:
                pass
        self._unlock()
        if self._created_dir:
            try:
                self.path.rmdir()
            except OSError:
                pass

    @property
    def finished(self) -> bool:
        return self.batch_index >= self.num_batches


# ------------------------------------------------------------------------- promotion
def promote_run(run_dir: str | os.PathLike, *, preset: str | None, top: int = 10, task: str | None = None,
                task_options: dict[str, Any] | None = None, seeds: Sequence[int] = (), store: str | None = None,
                backend: str = "auto", out: str | os.PathLike | None = None, quiet: bool = False):
    """Re-score a run's best ``top`` distinct rules at a higher fidelity (``nos_gym.evaluation.promotion``) and save
    ``promoted-LABEL.txt/.json`` in ``out`` (default: the run directory). ``task``: the run's own by
    default, with its options' protocol replaced by ``preset``; ``seeds``: score each rule at these task
    seeds and rank by the mean; ``store``: the run's store by default ('' for none). Returns the
    ``Leaderboard``."""
    from nos_gym.agents.config import load_yaml
    from nos_gym.evaluation.promotion import promote, promotion_label, promotion_options

    path = Path(run_dir)
    config = load_yaml(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
    task_name = task or config.get("task") or "convnet-cifar10"
    base = dict(config.get("task_options") or {}) if task_name == config.get("task") else {}
    records = read_log(path)
    candidates = [{"rule": d["rule"], "key": d["key"], "tokens": d["tokens"], "reward": d["reward"]}
                  for d in top_rules(records, top)]
    title = f"{path}: the best {len(candidates)} of {len({r['key'] for r in records})} distinct rules"
    board = promote(candidates, task_name, promotion_options(task_name, base, preset, task_options), title=title,
                    source=str(path), seeds=seeds, store=config.get("store", "") if store is None else store,
                    backend=backend, quiet=quiet)
    board.run_samples = len(records)  # a resumed run that sampled more is promoted afresh
    board.save(out if out is not None else path, promotion_label(preset, seeds))
    return board


# ------------------------------------------------------------------------- helpers
def _refuse_a_run_there(path: Path) -> None:
    """A new run never goes where a run (or what is left of one) already is."""
    if (path / CONFIG_FILE).exists():
        raise ConfigError(f"config key 'run_dir': {path} already holds a run; continue it with "
                          f"--resume {path}, or choose another run_dir")
    left = [name for name in (LOG_FILE, CHECKPOINT_FILE, UPDATES_FILE) if (path / name).exists()]
    if left:
        raise ConfigError(f"config key 'run_dir': {path} holds {', '.join(left)} of a run but no {CONFIG_FILE}; "
                          f"choose another run_dir (a new run would mix its log with that one)")


def _io_error(e: OSError, doing: str, path: Path | str, advice: str | None = None, then: str = "") -> RunError:
    """One line: what could not be done to which file, why, and what to do."""
    reason = e.strerror or _one_line(e) or type(e).__name__
    if advice is None:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            advice = "free some disk space"
        elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            advice = (f"make {Path(path).parent} writable, or choose another place for the run "
                      f"(--runs-root, --run-dir)")
        else:
            advice = "check the file and its file system"
    return RunError(f"cannot {doing} {path}: {reason}; {advice}{then}")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _lock_holder(fd: int) -> str:
    """`` (pid 123 on host since ...)`` from a lock file, or ``""``."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        note = os.read(fd, 200).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f" ({note})" if note else ""


def _hostname() -> str:
    import socket

    try:
        return socket.gethostname()
    except OSError:
        return "?"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _fresh_dir(root: Path, agent: str, args: RunArgs) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / f"{agent}-{args.task}-s{args.seed}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _batch_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["batch"])
    except (ValueError, KeyError, TypeError):
        return None


def _global_rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_global_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _jsonable(obj: Any) -> Any:
    """Metrics as JSON (non-finite floats as None, unknown objects as strings)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return str(obj)
