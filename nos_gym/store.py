"""``Store``: every evaluation in one SQLite file, so no completed training is ever redone.

A rule's score depends on the task setup and on the rule, nothing else, so rows are keyed
by (task fingerprint, canonical program key): two strings that denote one rule share a
row, and two setups (a "ci" and a "paper" protocol, another data copy) never do.

Why SQLite in WAL mode: it is in the standard library, a file is the whole deployment,
several processes (runs, agents, a notebook) can read and write it at once, and a
transaction committed before the writer is SIGKILLed is on disk -- each result is
committed the moment it arrives. Readers never block the writer.

Behaviour fingerprints: a row also holds the rule's ``behaviour`` (its fingerprint on the
Evaluator's probe, ``nos_gym.evaluation.probe``), indexed, so a rule that behaves like a
stored one reuses its score (``get_by_behaviour``) within the same task fingerprint. A
store written before the column existed opens as it is: a writer adds the column (its old
rows have none and are matched by key only), a read-only reader finds no behaviours.

Statuses: ``ok`` (the task scored the rule; a diverged rule is ``ok`` with reward 0),
``timeout`` (over the time limit), ``crashed`` (its worker died more often than the retry
bound), ``error`` (the task raised). Only ``ok`` rows are reused as cache hits by
default; failures are kept with their cause, and a later success replaces them.

Readers that must not change anything (``nos-gym top``, ``nos-gym export``) open the file
with ``Store(path, readonly=True)``: SQLite's read-only mode, and a file that is not a
store (empty, another program's database, text, damaged) is refused untouched with a
``StoreError``. A writer refuses another program's database too, and turns an
empty file or a new path into a store.

Copies: while a writer is running, or after it was killed, the newest rows may live in
``PATH-wal`` beside the file, so a copy of ``PATH`` alone can miss them (or, for a new store,
hold no tables at all). A writer copies the WAL into the file when it opens and when it
closes (``checkpoint``); ``export`` (``nos-gym export STORE OUT``) writes a consistent
single-file copy at any time.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nos_gym.dsl import Program
from nos_gym.tasks.base import Result

__all__ = ["Record", "STATUSES", "Store", "StoreError"]

STATUSES = ("ok", "timeout", "crashed", "error")
_COLUMNS = ("fingerprint", "key", "program", "tokens", "status", "reward", "metrics", "error", "seconds",
            "attempts", "run", "created", "updated")
#: added later: a store without them still opens (a writer adds them)
_OPTIONAL_COLUMNS = ("behaviour",)


class StoreError(sqlite3.DatabaseError):
    """A store that cannot be opened, read or written; the message names the file and what to do."""


def _connect(target: str, *, timeout: float, uri: bool) -> sqlite3.Connection:
    """One SQLite connection (a seam for tests that simulate an unwritable folder)."""
    return sqlite3.connect(target, timeout=timeout, isolation_level=None, check_same_thread=False, uri=uri)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    fingerprint TEXT NOT NULL,
    key         TEXT NOT NULL,
    program     TEXT NOT NULL,
    tokens      TEXT NOT NULL,
    status      TEXT NOT NULL,
    reward      REAL NOT NULL,
    metrics     TEXT NOT NULL,
    error       TEXT,
    seconds     REAL,
    attempts    INTEGER NOT NULL,
    run         TEXT,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    behaviour   TEXT,
    PRIMARY KEY (fingerprint, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS evaluations_by_reward ON evaluations (fingerprint, status, reward);
CREATE TABLE IF NOT EXISTS tasks (
    fingerprint TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    config      TEXT NOT NULL,
    created     REAL NOT NULL
);
"""
# after the migration that adds the column to an older store
_BEHAVIOUR_INDEX = "CREATE INDEX IF NOT EXISTS evaluations_by_behaviour ON evaluations (fingerprint, behaviour)"

# An ok row is final; a failure is replaced by anything newer. Attempts add up.
_UPSERT = """
INSERT INTO evaluations (fingerprint, key, program, tokens, status, reward, metrics, error, seconds,
                         attempts, run, created, updated, behaviour)
VALUES (:fingerprint, :key, :program, :tokens, :status, :reward, :metrics, :error, :seconds,
        :attempts, :run, :now, :now, :behaviour)
ON CONFLICT (fingerprint, key) DO UPDATE SET
    program = excluded.program, tokens = excluded.tokens, status = excluded.status,
    reward = excluded.reward, metrics = excluded.metrics, error = excluded.error,
    seconds = excluded.seconds, run = excluded.run, updated = excluded.updated,
    behaviour = coalesce(excluded.behaviour, evaluations.behaviour),
    attempts = evaluations.attempts + excluded.attempts
WHERE evaluations.status != 'ok'
"""


@dataclass(frozen=True)
class Record:
    """One stored evaluation."""

    fingerprint: str
    key: str
    program: str
    tokens: tuple[str, ...]
    status: str
    reward: float
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float | None = None
    attempts: int = 1
    run: str | None = None
    created: float = 0.0
    updated: float = 0.0
    #: the rule's behaviour fingerprint on the probe (None: not recorded, e.g. an older row)
    behaviour: str | None = None

    def result(self) -> Result:
        """The stored score as a ``Result`` marked ``cached`` (``source="store"``)."""
        return Result(self.reward, dict(self.metrics), self.error, cached=True, source="store")

    def as_program(self) -> Program:
        return Program(self.tokens)


class Store:
    """A SQLite file of evaluations keyed by (task fingerprint, canonical program key).

    >>> store = Store("runs/search.sqlite")
    >>> store.put(task.fingerprint, program, result, seconds=12.5)
    >>> store.get(task.fingerprint, program.canonical_key).reward

    Safe to share between processes (each opens its own ``Store`` on the path) and
    between threads of one process. ``path=":memory:"`` gives a private, unsaved store.
    ``readonly=True`` opens an existing store for reading only (SQLite's ``mode=ro``):
    nothing is written, and a file that is not a store is refused with ``StoreError``.
    Opening, reading or writing a file that is not a usable store (a folder, damaged,
    another program's database, not writable) raises ``StoreError`` (a
    ``sqlite3.DatabaseError``) whose one-line message names the file and what to do.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0, readonly: bool = False):
        self.path = str(path)
        self.readonly = bool(readonly)
        self._closed = False
        memory = self.path == ":memory:"
        if memory and self.readonly:
            raise ValueError("a read-only store needs a file path, not ':memory:'")
        if not memory:
            file = Path(self.path).expanduser()
            if file.is_dir():
                raise StoreError(f"{self.path} is a directory, not a store file; give a file path such as "
                                 f"{file / 'store.sqlite'}")
            if self.readonly and not file.exists():
                raise FileNotFoundError(f"no store at {self.path}: the file does not exist")
            parent = file.resolve().parent
            if not parent.is_dir():
                raise FileNotFoundError(f"cannot create the store {self.path}: directory {parent} does not exist")
        self._lock = threading.RLock()
        try:
            if self.readonly:
                # SQLite's read-only mode: nothing is ever written to the file
                target = Path(self.path).expanduser().resolve().as_uri() + "?mode=ro"
                self._conn = _connect(target, timeout=timeout, uri=True)
            else:
                self._conn = _connect(self.path, timeout=timeout, uri=False)
        except sqlite3.Error as e:
            raise self._open_error(e) from e
        try:
            self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            self._check_schema()
            if not self.readonly:
                self._conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a commit survives the process being killed (not a power cut)
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.executescript(_SCHEMA)
                self._migrate()
                if not memory:
                    # bring in what a killed writer left in the WAL, and put a new schema in the file itself
                    self.checkpoint("PASSIVE")
        except BaseException as e:
            self._conn.close()
            self._closed = True
            if isinstance(e, sqlite3.Error) and not isinstance(e, StoreError):
                raise self._open_error(e) from e
            raise

    def _check_schema(self) -> None:
        """Refuse a database that is not a store (a writer may start from an empty one)."""
        tables = {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "evaluations" not in tables:
            if self.readonly:
                what = "an empty file or database" if not tables else f"a database with tables {sorted(tables)}"
                raise StoreError(f"{self.path} is not a nos-gym store ({what}, no 'evaluations' table)")
            if tables:
                raise StoreError(f"{self.path} is not a nos-gym store: it is another SQLite database (tables "
                                 f"{sorted(tables)}); it was left untouched, give a new path for the store")
            return
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(evaluations)")}
        missing = [c for c in _COLUMNS if c not in columns]
        if missing:
            raise StoreError(f"{self.path} is not a nos-gym store: its 'evaluations' table lacks {missing}")

    def _migrate(self) -> None:
        """Add the columns a store written by an older version lacks (their old rows get NULL)."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(evaluations)")}
        for name in _OPTIONAL_COLUMNS:
            if name not in columns:
                try:
                    self._conn.execute(f"ALTER TABLE evaluations ADD COLUMN {name} TEXT")
                except sqlite3.OperationalError as e:  # another writer added it just now
                    if "duplicate column" not in str(e):
                        raise
        self._conn.execute(_BEHAVIOUR_INDEX)

    @property
    def _has_behaviour(self) -> bool:
        """Whether the file has the ``behaviour`` column (a read-only older store has not)."""
        return any(row[1] == "behaviour" for row in self._fetch("PRAGMA table_info(evaluations)", ())[1])

    def _open_error(self, e: sqlite3.Error) -> StoreError:
        """A one-line cause for a store that cannot be opened, naming the file and what to do."""
        msg = str(e)
        if isinstance(e, sqlite3.OperationalError) and ("readonly" in msg or "unable to open" in msg
                                                         or "read-only" in msg):
            if self.readonly:
                return StoreError(f"cannot read the store {self.path}: {msg}; check that the file is readable")
            name = Path(self.path).name
            return StoreError(f"cannot write the store {self.path}: {msg}; the file and its folder must be "
                              f"writable (SQLite also writes {name}-wal and {name}-shm beside it): fix the "
                              f"permissions, or give a store path in a writable folder")
        if isinstance(e, sqlite3.OperationalError) and "locked" in msg:
            return StoreError(f"the store {self.path} is locked by another process: {msg}; try again later")
        hint = "" if self.readonly else "; move it away or give another store path"
        return StoreError(f"{self.path} is not a usable nos-gym store: {msg} (damaged, or not a SQLite file){hint}")

    def _write_error(self, e: sqlite3.Error) -> StoreError:
        if isinstance(e, StoreError):
            return e
        return StoreError(f"cannot write to the store {self.path}: {e}; check the disk space and that the "
                          f"file and its folder are writable")

    def _check_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"the store {self.path} was opened read-only")

    # -- writing ------------------------------------------------------------------------
    def put(self, fingerprint: str, program: Program, result: Result, *, status: str = "ok",
            seconds: float | None = None, attempts: int = 1, run: str | None = None,
            behaviour: str | None = None) -> None:
        """Record one evaluation (committed before returning); ``behaviour``: its probe fingerprint."""
        self.put_many(fingerprint, [(program, result, status, seconds, attempts, behaviour)], run=run)

    def put_many(self, fingerprint: str, rows: Iterable[tuple[Any, ...]], *, run: str | None = None) -> None:
        """Record several evaluations in one transaction: rows ``(program, result, status, seconds,
        attempts)``, or with a sixth item, the rule's behaviour fingerprint (None: unknown)."""
        now = time.time()
        params = []
        for row in rows:
            if len(row) not in (5, 6):
                raise ValueError(f"a row is (program, result, status, seconds, attempts[, behaviour]), got {len(row)} items")
            program, result, status, seconds, attempts = row[:5]
            behaviour = row[5] if len(row) == 6 else None
            if status not in STATUSES:
                raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
            if not isinstance(program, Program):
                raise TypeError(f"expected a Program, got {type(program).__name__}")
            params.append(dict(fingerprint=fingerprint, key=program.canonical_key, program=str(program),
                               tokens=json.dumps(list(program.tokens)), status=status,
                               reward=float(result.reward), metrics=_dumps(result.metrics),
                               error=result.error, seconds=seconds, attempts=int(attempts), run=run, now=now,
                               behaviour=behaviour))
        if not params:
            return
        self._check_writable()
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._write_error(e) from e
            try:
                self._conn.executemany(_UPSERT, params)
                self._conn.execute("COMMIT")
            except BaseException as e:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (e.g. disk full)
                if isinstance(e, sqlite3.Error):
                    raise self._write_error(e) from e
                raise

    def register_task(self, fingerprint: str, name: str, config: dict[str, Any]) -> None:
        """Keep the setup behind a fingerprint, so a reader of the file knows what was scored."""
        self._check_writable()
        with self._lock:
            try:
                self._conn.execute("INSERT OR IGNORE INTO tasks VALUES (?, ?, ?, ?)",
                                   (fingerprint, name, _dumps(config), time.time()))
            except sqlite3.Error as e:
                raise self._write_error(e) from e

    # -- reading ------------------------------------------------------------------------
    def get(self, fingerprint: str, key: str, *, statuses: Sequence[str] = ("ok",)) -> Record | None:
        """The record of ``key`` under ``fingerprint`` if its status is one of ``statuses``."""
        return self.get_many(fingerprint, [key], statuses=statuses).get(key)

    def get_many(self, fingerprint: str, keys: Sequence[str], *, statuses: Sequence[str] = ("ok",)) -> dict[str, Record]:
        """Records of those ``keys`` that exist with one of ``statuses``, by key."""
        out: dict[str, Record] = {}
        keys = list(dict.fromkeys(keys))
        st = list(statuses)
        for start in range(0, len(keys), 500):  # stay under SQLite's parameter limit
            chunk = keys[start:start + 500]
            sql = (f"SELECT * FROM evaluations WHERE fingerprint = ? AND key IN ({','.join('?' * len(chunk))}) "
                   f"AND status IN ({','.join('?' * len(st))})")
            for rec in self._select(sql, [fingerprint, *chunk, *st]):
                out[rec.key] = rec
        return out

    def get_by_behaviour(self, fingerprint: str, behaviours: Sequence[str], *,
                         statuses: Sequence[str] = ("ok",)) -> dict[str, Record]:
        """For each of ``behaviours`` (probe fingerprints) found under the task ``fingerprint``
        with one of ``statuses``: the first such record stored, by behaviour."""
        out: dict[str, Record] = {}
        behaviours = list(dict.fromkeys(behaviours))
        if not behaviours or not self._has_behaviour:
            return out
        st = list(statuses)
        for start in range(0, len(behaviours), 500):
            chunk = behaviours[start:start + 500]
            sql = (f"SELECT * FROM evaluations WHERE fingerprint = ? AND behaviour IN "
                   f"({','.join('?' * len(chunk))}) AND status IN ({','.join('?' * len(st))}) ORDER BY created")
            for rec in self._select(sql, [fingerprint, *chunk, *st]):
                out.setdefault(rec.behaviour, rec)  # type: ignore[arg-type]
        return out

    def records(self, fingerprint: str | None = None, status: str | None = None) -> list[Record]:
        """All records (of one task and/or status), best reward first."""
        where, args = self._where(fingerprint, status)
        return self._select(f"SELECT * FROM evaluations{where} ORDER BY reward DESC, created", args)

    def count(self, fingerprint: str | None = None, status: str | None = None) -> int:
        where, args = self._where(fingerprint, status)
        return int(self._fetch(f"SELECT COUNT(*) FROM evaluations{where}", args)[1][0][0])

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Fingerprint -> {"name", "config"} of every registered task."""
        rows = self._fetch("SELECT fingerprint, name, config FROM tasks", ())[1]
        return {fp: {"name": name, "config": json.loads(cfg)} for fp, name, cfg in rows}

    @staticmethod
    def _where(fingerprint: str | None, status: str | None) -> tuple[str, list[str]]:
        conds, args = [], []
        if fingerprint is not None:
            conds.append("fingerprint = ?")
            args.append(fingerprint)
        if status is not None:
            conds.append("status = ?")
            args.append(status)
        return (" WHERE " + " AND ".join(conds) if conds else ""), args

    def _fetch(self, sql: str, args: Sequence[Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and rows of a query; a damaged file raises ``StoreError`` naming it."""
        with self._lock:
            try:
                cur = self._conn.execute(sql, args)
                return [c[0] for c in cur.description], cur.fetchall()
            except sqlite3.Error as e:
                if isinstance(e, sqlite3.ProgrammingError):  # closed, misuse: a bug, not the file
                    raise
                raise StoreError(f"cannot read the store {self.path}: {e}") from e

    def _select(self, sql: str, args: Sequence[Any]) -> list[Record]:
        cols, rows = self._fetch(sql, args)
        out = []
        for row in rows:
            d = dict(zip(cols, row))
            d["tokens"] = tuple(json.loads(d["tokens"]))
            d["metrics"] = json.loads(d["metrics"])
            out.append(Record(**d))
        return out

    # -- copies -------------------------------------------------------------------------
    def checkpoint(self, mode: str = "TRUNCATE", wait: float = 5.0) -> bool:
        """Copy the WAL (``PATH-wal``) into the file itself, so that ``PATH`` alone holds every row.

        ``mode``: "PASSIVE" (never waits), "FULL", "RESTART" or "TRUNCATE" (the default: also
        empties the WAL; waits up to ``wait`` seconds for other processes' readers). True when
        the whole WAL was copied. A no-op (False) on a read-only or in-memory store.
        """
        mode = mode.upper()
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"mode must be PASSIVE, FULL, RESTART or TRUNCATE, got {mode!r}")
        if self.readonly or self.path == ":memory:" or self._closed:
            return False
        with self._lock:
            busy_ms = self._conn.execute("PRAGMA busy_timeout").fetchone()[0]
            self._conn.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            try:
                busy, log, done = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            finally:
                self._conn.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        return busy == 0 and log == done

    def export(self, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a consistent copy of the store to ``out`` and return its path.

        By the suffix of ``out``: ``.jsonl`` one JSON object per evaluation, ``.csv`` a table
        of the same fields (``tokens`` space-separated, ``metrics`` as JSON), anything else a
        single-file SQLite copy (SQLite's backup API, no WAL beside it) that ``Store`` opens.
        Each row carries its task's ``task`` name. The file is written under a temporary name
        and renamed, so ``out`` is never half-written; an existing ``out`` is refused unless
        ``overwrite``, and ``out`` may never be the store itself.
        """
        out = Path(out).expanduser()
        if self.path != ":memory:" and out.exists() and out.resolve() == Path(self.path).expanduser().resolve():
            raise StoreError(f"cannot export {self.path} onto itself; give another output path")
        if out.is_dir():
            raise StoreError(f"{out} is a directory; give an output file such as {out / 'store-copy.sqlite'}")
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; remove it or choose another output path")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"cannot write {out}: directory {out.parent} does not exist")
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        suffix = out.suffix.lower()
        try:
            if suffix in (".jsonl", ".csv"):
                self._export_records(tmp, suffix)
            else:
                if tmp.exists():
                    tmp.unlink()
                dst = sqlite3.connect(str(tmp), isolation_level=None)
                try:
                    with self._lock:
                        self._conn.backup(dst)
                    dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                finally:
                    dst.close()
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return out

    def _export_records(self, tmp: Path, suffix: str) -> None:
        with self._lock:  # one read transaction: a consistent snapshot
            self._conn.execute("BEGIN")
            try:
                names = {fp: t["name"] for fp, t in self.tasks().items()}
                records = self.records()
            finally:
                self._conn.execute("COMMIT")
        columns = (*_COLUMNS, *_OPTIONAL_COLUMNS)
        fields = ["task", *columns]
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if suffix == ".jsonl":
                for r in records:
                    row = {"task": names.get(r.fingerprint), **{c: getattr(r, c) for c in columns}}
                    row["tokens"] = list(r.tokens)
                    f.write(_dumps(row) + "\n")
            else:
                writer = csv.writer(f)
                writer.writerow(fields)
                for r in records:
                    row = {"task": names.get(r.fingerprint), **{c: getattr(r, c) for c in columns}}
                    row["tokens"] = " ".join(r.tokens)
                    row["metrics"] = _dumps(r.metrics)
                    writer.writerow(["" if row[c] is None else row[c] for c in fields])

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the store; a writer first copies the WAL into the file (``checkpoint``)."""
        with self._lock:
            if self._closed:
                return
            try:
                self.checkpoint("TRUNCATE", wait=2.0)
            except sqlite3.Error:
                pass  # other processes still reading: the last one to close checkpoints
            self._conn.close()
            self._closed = True

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.path!r}{', readonly=True' if self.readonly else ''})"


def _dumps(obj: Any) -> str:
    """JSON that keeps NaN/Infinity (Python's json reads them back) and writes other objects as str."""
    return json.dumps(obj, default=str)
