"""A run directory: one process at a time, an append-only log, checksummed checkpoints, the
checks before a resume, and Ctrl-C / SIGTERM.

``RunDir`` keeps the files of a run whole across kills, full disks and second processes.
It knows nothing of what is searched: no agent, task, evaluator or env. Its owner
(``nos_gym.agents.runs.Run`` for every agent) hands it the settings to save, one batch of
records at a time to log, and the state to checkpoint. The files::

    runs/trpo_lstm-rosenbrock-s1-20260101-120000/
      config.yaml     the owner's settings (``write_config``); ``--resume`` reads it back
      log.jsonl       one record per line: ``sample`` (0, 1, 2 ... in order), ``batch``, the
                      owner's fields, and ``time`` (seconds since the run began, across resumes)
      updates.jsonl   one line per batch: ``batch`` and what the owner did after it
      checkpoint.pt   the state after the last finished batch: the writer's name (key
                      ``agent``), ``batch``, ``samples``, the sha256 of the log lines it covers,
                      the elapsed time, Python's, NumPy's and torch's global RNG states and
                      the owner's ``state``; a ``torch.save`` file
      checkpoint.pt.sha256   the checkpoint's sha256 (JSON), so a damaged one is refused
      run.lock        held (``flock``) by the process using the run; the kernel drops it
                      when that process ends, however it ends

Writing: the log is appended and flushed after every batch; config.yaml, the sidecar and
any file given to ``write_atomic`` are written to a temporary file, fsync'ed and renamed
over the old one, so a kill or a full disk never leaves a truncated file. A checkpoint is
written as: checkpoint.pt.tmp (fsync), then checkpoint.pt.sha256 naming the new digest and
the previous one, then the rename -- a kill between the last two leaves the previous
checkpoint, which the sidecar still accepts.

One process per run: ``lock`` takes ``run.lock`` (``fcntl.flock``, non-blocking); a second
process on the same directory (or a second ``RunDir`` in one process) stops with an error
naming the holder.

Resuming (``check_resume``, then ``resume``): the checkpoint is accepted only if its sha256
is the recorded one and the log's first ``samples`` lines are the ones it was written after
(their sha256). Records past it (at most one checkpoint interval: the batch in progress at
a kill, or its half-written last line) are cut, so the owner samples them again -- the RNG
states are restored, so the same records come back. Anything else -- no checkpoint but
more records than one interval, a damaged checkpoint, a log that lost or changed records --
is refused by ``check_resume``, with nothing changed, and the error says how to recover:
``--rebuild`` (continue from the log: every record kept, the damaged checkpoint kept aside,
the state restarting from the seed) or a new run directory with the same settings. Only
``resume`` changes files, so an owner can add checks of its own in between.

Ctrl-C and SIGTERM (``catch_stop_signals``): the first one sets ``stop_requested``, which
the owner's loop checks to stop after the batch in progress; a second one raises
``KeyboardInterrupt`` at once. The owner exits with status 128 + ``stop_signal``.

Errors: a directory in use, damaged or unwritable, a full disk -- each raises ``error``
(a ``RunDirError`` unless the owner passes its own class): one line that names the file
and what to do, in the words of the nos-gym command line (``--resume``, ``--rebuild``).
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
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunDir", "RunDirError", "read_log", "run_files"]

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
UPDATES_FILE = "updates.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKSUM_FILE = "checkpoint.pt.sha256"
LOCK_FILE = "run.lock"
#: the checkpoint format written here (older checkpoints have no "format" key and no sidecar)
CHECKPOINT_FORMAT = 2
_CHECKPOINT_KEYS = ("agent", "batch", "samples", "global_rng", "state")


class RunDirError(Exception):
    """A run directory that cannot be used as asked: in use, damaged, unwritable, a full disk."""


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


def run_files(path: str | os.PathLike) -> list[str]:
    """The files of a run that ``path`` holds (config.yaml first, then log, checkpoint, updates); [] for none."""
    path = Path(path)
    return [name for name in (CONFIG_FILE, LOG_FILE, CHECKPOINT_FILE, UPDATES_FILE) if (path / name).exists()]


# --------------------------------------------------------------------------- RunDir
class RunDir:
    """One run's directory: lock, log, checkpoints, resume checks, stop signals (see the module doc).

    A new run::

        d = RunDir(path, writer="my_agent", seed=1, batch_size=8)
        d.make(); d.lock(); d.seed_globals(); d.write_config({...}); d.open_log()
        d.append(batch, [{...}, ...]); d.save(state)      # after every batch
        d.close()

    A resumed one: ``lock()``, ``check_resume(rebuild)`` (refuses, changing nothing), the
    owner's own checks, ``resume()`` (cuts the log back to the checkpoint, restores the
    RNG states), ``write_config(..., only_if_changed=True)``, ``open_log()``; then
    ``checkpoint["state"]`` is the owner's state (None when it restarts from its seed).

    ``writer``: the name saved in each checkpoint (key ``agent``); a checkpoint of another
    writer is refused. ``seed``: seeds Python's, NumPy's and torch's global generators of
    a new run (and of a resumed one without a usable checkpoint). ``batch_size``: records
    per batch. ``batches_per_checkpoint``: batches between two ``save`` calls (how far the
    log may be ahead of the checkpoint after a kill). ``record_keys``: keys every log
    record must have (besides ``sample`` and ``batch``) to count as whole on resume.
    ``new_run_note``: said after the hint to start a new run with the same settings.
    ``error``: the exception class raised (``nos_gym.agents.runs.RunError`` for the
    agents, so that the command line prints it as one line and exits 2).
    """

    def __init__(self, path: str | os.PathLike, *, writer: str, seed: int, batch_size: int,
                 batches_per_checkpoint: int = 1, resumed: bool = False, record_keys: Sequence[str] = (),
                 new_run_note: str = "", error: type[Exception] = RunDirError):
        self.path = Path(path)
        self.writer = writer
        self.seed = seed
        self.batch_size = int(batch_size)
        self.batches_per_checkpoint = max(1, int(batches_per_checkpoint))
        self.resumed = resumed
        self.record_keys = tuple(record_keys)
        self.new_run_note = new_run_note
        self.error = error
        #: True when ``check_resume(rebuild=True)`` continued the run from its log (the state restarted)
        self.rebuilt = False
        self.log_path = self.path / LOG_FILE
        self.checkpoint_path = self.path / CHECKPOINT_FILE
        #: the last checkpoint written or accepted on resume (None before the first)
        self.checkpoint: dict[str, Any] | None = None
        #: every record in the log, in order (after a resume: the ones the checkpoint covers, then new ones)
        self.records: list[dict[str, Any]] = []
        self.stop_requested = False
        self.interrupted = False
        self.stop_signal = signal.SIGINT
        self._t0 = time.time()
        self._elapsed_before = 0.0
        self._start_batch = 0
        self._log_hash = hashlib.sha256()
        self._checkpoint_sha: str | None = None
        self._log_file: Any = None
        self._lock_fd: int | None = None
        self._created_dir = False
        self._written: set[str] = set()
        self._old_handlers: dict[int, Any] = {}
        self._pending: tuple[list[bytes], bytes, int] | None = None  # check_resume -> resume

    # ------------------------------------------------------------------ counters
    @property
    def samples(self) -> int:
        """Records logged so far (including before a resume)."""
        return len(self.records)

    @property
    def batch_index(self) -> int:
        """Batches finished (checkpointed) so far."""
        return int(self.checkpoint["batch"]) if self.checkpoint is not None else self._start_batch

    @property
    def next_batch(self) -> int:
        """The batch the next ``append`` logs, and the batches finished once the last one logged is saved."""
        return math.ceil(self.samples / self.batch_size)

    @property
    def elapsed(self) -> float:
        """Seconds the run has taken, across resumes."""
        return self._elapsed_before + time.time() - self._t0

    # ------------------------------------------------------------------ opening
    def make(self) -> None:
        """Create the directory (and its parents); ``discard`` removes it again if this created it."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self.error(io_message(e, "create the run directory", self.path,
                                        advice="choose a writable place with --runs-root or --run-dir")) from None
        self._created_dir = created

    def seed_globals(self) -> None:
        """Seed Python's, NumPy's and torch's global generators from ``seed``."""
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def restore_global_rng(self) -> None:
        """Set Python's, NumPy's and torch's global generators back to the checkpoint's states."""
        if self.checkpoint is not None:
            _set_global_rng_states(self.checkpoint["global_rng"])

    def write_config(self, data: dict[str, Any], only_if_changed: bool = False) -> None:
        """Write config.yaml (atomically); with ``only_if_changed``, leave an equal one alone."""
        if only_if_changed:
            try:
                if yaml.safe_load((self.path / CONFIG_FILE).read_text()) == data:
                    return  # nothing changed: leave the file alone
            except (OSError, yaml.YAMLError):
                pass
        self.write_atomic(CONFIG_FILE, yaml.safe_dump(data, sort_keys=False).encode())

    def open_log(self) -> None:
        """Open log.jsonl for appending."""
        try:
            self._log_file = self.log_path.open("ab")
        except OSError as e:
            raise self.io_error(e, "open", self.log_path) from None

    def close_log(self) -> None:
        f, self._log_file = self._log_file, None
        if f is not None and not f.closed:
            try:
                f.close()  # flushes; on a full disk what is lost is past the checkpoint, and resume cuts it
            except OSError:
                pass

    def close(self) -> None:
        """Close the log and release the lock."""
        self.close_log()
        self.unlock()

    # ------------------------------------------------------------------ the lock
    def lock(self) -> None:
        """Take ``run.lock`` for this process (released by ``unlock`` or when the process ends)."""
        lock_path = self.path / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            advice = (f"a run writes in its directory: make {self.path} writable (or copy the directory somewhere "
                      f"writable and resume the copy)") if self.resumed else None
            raise self.io_error(e, "open the lock file", lock_path, advice=advice) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _lock_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self.error(f"{self.path} is in use by another process{holder}: one run directory takes one "
                                     f"process at a time (two would both append to its log). Wait for it to finish, "
                                     f"or stop it (Ctrl-C) and then continue with --resume {self.path}") from None
                raise self.io_error(e, "lock", lock_path) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {_hostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        except OSError:
            pass  # the lock holds without the note
        self._lock_fd = fd

    def unlock(self) -> None:
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
    def check_resume(self, rebuild: bool = False) -> None:
        """Check the directory for a resume; raise ``error`` (nothing changed) if it cannot continue.

        Afterwards ``records``, ``checkpoint`` and ``batch_index`` say where the run continues;
        no file has changed yet: ``resume`` does that. ``rebuild``: continue from the log
        (every record kept) when the checkpoint is missing or damaged.
        """
        lines, partial = self._read_log_lines()
        records = self._parse_log(lines)
        ckpt, problem = self._read_checkpoint()
        every = self.batches_per_checkpoint * self.batch_size
        if ckpt is not None:
            problem = self._disagreement(ckpt, lines, records)
        if rebuild:
            if ckpt is not None and problem is None:
                raise self.error(f"--rebuild: the checkpoint of {self.path} is intact and agrees with its log; "
                                 f"continue it with --resume {self.path} (without --rebuild)")
            keep = len(records)
            self._start_batch = math.ceil(keep / self.batch_size)
            self.rebuilt = True
        elif problem is not None:
            raise self._refusal(problem, len(records))
        elif ckpt is None:
            if len(records) > every or any(r["batch"] >= self.batches_per_checkpoint for r in records):
                raise self._refusal(f"{CHECKPOINT_FILE} is missing, but {LOG_FILE} holds {len(records)} records "
                                    f"(a kill before the first checkpoint leaves at most {every})", len(records))
            keep = 0  # stopped before its first checkpoint: start over (same seed, same records)
        else:
            self.checkpoint = ckpt
            keep = int(ckpt["samples"])
        self.records = records[:keep]
        self._pending = (lines, partial, keep)

    def resume(self) -> None:
        """Make the directory continue where ``check_resume`` said: put a damaged checkpoint aside
        (``--rebuild``), cut the log and updates.jsonl back to the checkpoint, restore the
        elapsed time and the global RNG states (or seed them when there is no checkpoint)."""
        if self._pending is None:
            raise RuntimeError("RunDir.resume() comes after check_resume()")
        lines, partial, keep = self._pending
        self._pending = None
        if self.rebuilt:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name in (CHECKPOINT_FILE, CHECKSUM_FILE):
                src = self.path / name
                if src.exists():
                    try:
                        os.replace(src, self.path / f"{name}.bad-{stamp}")
                    except OSError as e:
                        raise self.io_error(e, "rename", src) from None
            print(f"[nos-gym] rebuilding {self.path} from its log: its {keep} records are kept and the run continues "
                  f"at batch {self._start_batch}; the agent's state restarts from seed {self.seed} (any old "
                  f"checkpoint is kept as {CHECKPOINT_FILE}.bad-{stamp})", file=sys.stderr, flush=True)
        if keep != len(lines) or partial:
            # cut back to the checkpoint: the rest is sampled again (same RNG states)
            self.write_atomic(LOG_FILE, b"".join(lines[:keep]))
        self._log_hash = hashlib.sha256(b"".join(lines[:keep]))
        updates = self.path / UPDATES_FILE
        if updates.exists() and not self.rebuilt:
            last = self.batch_index  # updates of batches before it are kept
            text = self._read_text(updates)
            keep_lines = [line for line in text.splitlines()
                          if line.strip() and _batch_of(line) is not None and _batch_of(line) < last]
            new_text = "".join(line + "\n" for line in keep_lines)
            if new_text != text:
                self.write_atomic(UPDATES_FILE, new_text.encode())
        if self.checkpoint is not None:
            self._elapsed_before = float(self.checkpoint.get("elapsed", 0.0))
            _set_global_rng_states(self.checkpoint["global_rng"])
        else:
            self._elapsed_before = float(self.records[-1].get("time") or 0.0) if self.records else 0.0
            self.seed_globals()

    def _read_text(self, path: Path) -> str:
        try:
            return path.read_text()
        except OSError as e:
            raise self.io_error(e, "read", path) from None

    def _read_log_lines(self) -> tuple[list[bytes], bytes]:
        """The log's whole lines (bytes, each ending in a newline) and a half-written last line (or b"")."""
        if not self.log_path.exists():
            return [], b""
        try:
            data = self.log_path.read_bytes()
        except OSError as e:
            raise self.io_error(e, "read", self.log_path) from None
        parts = data.split(b"\n")
        partial = parts.pop()
        return [p + b"\n" for p in parts], partial

    def _parse_log(self, lines: list[bytes]) -> list[dict[str, Any]]:
        records = []
        for i, raw in enumerate(lines):
            try:
                rec = json.loads(raw)
                ok = (isinstance(rec, dict) and isinstance(rec.get("batch"), int)
                      and all(k in rec for k in self.record_keys))
            except (ValueError, UnicodeDecodeError):
                ok = False
            if not ok:
                raise self.error(f"cannot resume {self.path}: {LOG_FILE} line {i + 1} is not a whole record "
                                 f"({raw[:60]!r}); the {i} records before it are intact. Nothing was changed. Repair "
                                 f"or remove that line by hand, or start a new run with the same settings: "
                                 f"{self._new_run_hint()}")
            if rec.get("sample") != i:
                raise self.error(f"cannot resume {self.path}: {LOG_FILE} line {i + 1} holds sample "
                                 f"{rec.get('sample')!r}, expected {i} (records are missing or repeated). Nothing was "
                                 f"changed. Start a new run with the same settings: {self._new_run_hint()}")
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
            raise self.io_error(e, "read", path) from None
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
            return None, f"{CHECKPOINT_FILE} cannot be read ({type(e).__name__}: {one_line(e)})"
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
            raise self.io_error(e, "read", path) from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None, f"{CHECKSUM_FILE} is damaged, so {CHECKPOINT_FILE} cannot be verified"
        return known, None

    def _disagreement(self, ckpt: dict[str, Any], lines: list[bytes], records: list[dict[str, Any]]) -> str | None:
        """Why the log and the checkpoint do not belong together (None when they do)."""
        if ckpt.get("agent") != self.writer:
            return f"{CHECKPOINT_FILE} was written by the {ckpt.get('agent')!r} agent, not by {self.writer!r}"
        n, batch = int(ckpt["samples"]), int(ckpt["batch"])
        if len(records) < n:
            return (f"{LOG_FILE} holds {len(records)} records but the checkpoint was written after {n} "
                    f"(records were lost)")
        want = ckpt.get("log_sha256")
        if want is not None and hashlib.sha256(b"".join(lines[:n])).hexdigest() != want:
            return (f"the first {n} records of {LOG_FILE} are not the ones the checkpoint was written after "
                    f"(the log was edited or replaced)")
        every = self.batches_per_checkpoint * self.batch_size
        tail = records[n:]
        if len(tail) > every or any(r["batch"] < batch for r in tail):
            return (f"{LOG_FILE} holds {len(tail)} records past the checkpoint (a kill leaves at most {every}, "
                    f"one checkpoint interval)")
        return None

    def _refusal(self, problem: str, n_records: int) -> Exception:
        kept = (f"; {CHECKPOINT_FILE} is kept aside as {CHECKPOINT_FILE}.bad-TIME"
                if self.checkpoint_path.exists() else "")
        return self.error(f"cannot resume {self.path}: {problem}. Nothing was changed (its {n_records} records are in "
                          f"{LOG_FILE}). To recover, continue the run from its log: --resume {self.path} --rebuild "
                          f"(every record kept; the agent's state restarts from its seed{kept}); or start a new run "
                          f"with the same settings: {self._new_run_hint()}")

    def _new_run_hint(self) -> str:
        return f"--config {self.path / CONFIG_FILE} --run-dir NEW_DIR{self.new_run_note}"

    # ------------------------------------------------------------------ writing
    def append(self, batch: int, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Log one batch: each item becomes a record ``{"sample", "batch", **item, "time"}``,
        appended and flushed; returns the records."""
        now = self.elapsed
        n = len(self.records)
        new = [{"sample": n + i, "batch": int(batch), **item, "time": round(now, 3)} for i, item in enumerate(items)]
        data = b"".join((json.dumps(rec) + "\n").encode() for rec in new)
        try:
            self._log_file.write(data)
            self._log_file.flush()
        except OSError as e:
            raise self.io_error(e, "append to", self.log_path) from None
        self._log_hash.update(data)
        self.records.extend(new)
        return new

    def append_update(self, batch: int, stats: dict[str, Any]) -> None:
        """Append ``{"batch": batch, **stats}`` to ``updates.jsonl``."""
        path = self.path / UPDATES_FILE
        try:
            with path.open("a") as f:
                f.write(json.dumps({"batch": int(batch), **jsonable(stats)}) + "\n")
        except OSError as e:
            raise self.io_error(e, "append to", path) from None

    def save(self, state: Any) -> None:
        """Checkpoint ``state`` (plus the run's counters and global RNG states), atomically.

        Order: the log is fsync'ed; checkpoint.pt.tmp is written and fsync'ed; the sidecar
        naming its sha256 (and the previous checkpoint's) replaces the old sidecar; then
        checkpoint.pt.tmp replaces checkpoint.pt. A kill at any point leaves a checkpoint
        that verifies: the new one or the previous one.
        """
        try:
            os.fsync(self._log_file.fileno())
        except OSError as e:
            raise self.io_error(e, "write", self.log_path) from None
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "agent": self.writer,
            "batch": self.next_batch,
            "samples": self.samples,
            "log_sha256": self._log_hash.hexdigest(),
            "elapsed": self.elapsed,
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
            raise self.io_error(e, "write", tmp) from None
        sums = {"sha256": digest, "previous": self._checkpoint_sha, "file": CHECKPOINT_FILE,
                "bytes": len(data), "samples": self.samples}
        try:
            self.write_atomic(CHECKSUM_FILE, (json.dumps(sums) + "\n").encode())
        except self.error:
            _remove_quietly(tmp)
            raise
        try:
            os.replace(tmp, self.checkpoint_path)
        except OSError as e:
            _remove_quietly(tmp)
            raise self.io_error(e, "write", self.checkpoint_path) from None
        _fsync_dir(self.path)
        self._checkpoint_sha = digest
        self.checkpoint = ckpt

    def write_atomic(self, name: str, data: bytes) -> None:
        """The file ``name`` of the directory replaced by ``data`` whole or not at all (tmp file, fsync, rename)."""
        path = self.path / name
        tmp = path.with_name(path.name + ".tmp")
        self._written.add(name)
        try:
            _write_synced(tmp, data)
            os.replace(tmp, path)
        except OSError as e:
            _remove_quietly(tmp)
            raise self.io_error(e, "write", path) from None
        _fsync_dir(path.parent)

    # ------------------------------------------------------------------ errors
    def then_hint(self) -> str:
        """What to do once the cause of an error is fixed."""
        if self.resumed or self.records or self.checkpoint is not None:
            return f", then continue with --resume {self.path}"
        return ", then run the command again"

    def io_error(self, e: OSError, doing: str, path: Path, advice: str | None = None) -> Exception:
        """The one-line ``error`` for ``e`` raised while ``doing`` something to ``path``."""
        return self.error(io_message(e, doing, path, advice=advice, then=self.then_hint()))

    # ------------------------------------------------------------------ signals
    def catch_stop_signals(self) -> None:
        """Ctrl-C, and SIGTERM (`kill PID`, a job scheduler's stop, the end of a nohup'd session), from
        now on set ``stop_requested`` (the owner finishes the batch in flight and saves); a second
        one raises ``KeyboardInterrupt``. Only in the main thread (where Python runs handlers)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_stop_signal)

    def release_stop_signals(self) -> None:
        """Put back the handlers ``catch_stop_signals`` replaced."""
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.interrupted = True
        self.stop_signal = signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n[nos-gym] {what}: stopping after this batch and saving (send it again to stop now, "
              "keeping the last checkpoint)", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ discarding
    def discard(self) -> None:
        """Remove what opening a new run created (nothing was logged): no directory is left behind."""
        self.close_log()
        names = {CONFIG_FILE, CONFIG_FILE + ".tmp", CHECKPOINT_FILE + ".tmp", CHECKSUM_FILE + ".tmp", LOCK_FILE}
        for name in sorted(names | {name + ".tmp" for name in self._written}):
            _remove_quietly(self.path / name)
        for name in (LOG_FILE, UPDATES_FILE):
            p = self.path / name
            try:
                if p.is_file() and not p.is_symlink() and p.stat().st_size == 0:
                    p.unlink()
            except OSError:
                pass
        self.unlock()
        if self._created_dir:
            try:
                self.path.rmdir()
            except OSError:
                pass


# ------------------------------------------------------------------------- helpers
def io_message(e: OSError, doing: str, path: Path | str, advice: str | None = None, then: str = "") -> str:
    """One line: what could not be done to which file, why, and what to do."""
    reason = e.strerror or one_line(e) or type(e).__name__
    if advice is None:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            advice = "free some disk space"
        elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            advice = (f"make {Path(path).parent} writable, or choose another place for the run "
                      f"(--runs-root, --run-dir)")
        else:
            advice = "check the file and its file system"
    return f"cannot {doing} {path}: {reason}; {advice}{then}"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def jsonable(obj: Any) -> Any:
    """Metrics as JSON (non-finite floats as None, unknown objects as strings)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return str(obj)


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
