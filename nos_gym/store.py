"""``Store``: every evaluation in one SQLite file, so no completed training is ever redone.

A rule's score depends on the task setup and on the rule, nothing else, so rows are keyed
by (task fingerprint, canonical program key): two strings that denote one rule share a
row, and two setups (a "ci" and a "paper" protocol, another data copy) never do.

Why SQLite in WAL mode: it is in the standard library, a file is the whole deployment,
several processes (runs, agents, a notebook) can read and write it at once, and a
transaction committed before the writer is SIGKILLed is on disk -- each result is
committed the moment it arrives. Readers never block the writer.

Statuses: ``ok`` (the task scored the rule; a diverged rule is ``ok`` with reward 0),
``timeout`` (over the time limit), ``crashed`` (its worker died more often than the retry
bound), ``error`` (the task raised). Only ``ok`` rows are reused as cache hits by
default; failures are kept with their cause, and a later success replaces them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from nos_gym.dsl import Program
from nos_gym.tasks.base import Result

__all__ = ["Record", "STATUSES", "Store"]

STATUSES = ("ok", "timeout", "crashed", "error")

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

# An ok row is final; a failure is replaced by anything newer. Attempts add up.
_UPSERT = """
INSERT INTO evaluations (fingerprint, key, program, tokens, status, reward, metrics, error, seconds,
                         attempts, run, created, updated)
VALUES (:fingerprint, :key, :program, :tokens, :status, :reward, :metrics, :error, :seconds,
        :attempts, :run, :now, :now)
ON CONFLICT (fingerprint, key) DO UPDATE SET
    program = excluded.program, tokens = excluded.tokens, status = excluded.status,
    reward = excluded.reward, metrics = excluded.metrics, error = excluded.error,
    seconds = excluded.seconds, run = excluded.run, updated = excluded.updated,
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

    def result(self) -> Result:
        """The stored score as a ``Result`` marked ``cached``."""
        return Result(self.reward, dict(self.metrics), self.error, cached=True)

    def as_program(self) -> Program:
        return Program(self.tokens)


class Store:
    """A SQLite file of evaluations keyed by (task fingerprint, canonical program key).

    >>> store = Store("runs/search.sqlite")
    >>> store.put(task.fingerprint, program, result, seconds=12.5)
    >>> store.get(task.fingerprint, program.canonical_key).reward

    Safe to share between processes (each opens its own ``Store`` on the path) and
    between threads of one process. ``path=":memory:"`` gives a private, unsaved store.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0):
        self.path = str(path)
        if self.path != ":memory:":
            parent = Path(self.path).expanduser().resolve().parent
            if not parent.is_dir():
                raise FileNotFoundError(f"cannot create the store {self.path}: directory {parent} does not exist")
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the process being killed (not a power cut)
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise sqlite3.DatabaseError(f"{self.path} is not a usable nos-gym store: {e}") from e

    # -- writing ------------------------------------------------------------------------
    def put(self, fingerprint: str, program: Program, result: Result, *, status: str = "ok",
            seconds: float | None = None, attempts: int = 1, run: str | None = None) -> None:
        """Record one evaluation (committed before returning)."""
        self.put_many(fingerprint, [(program, result, status, seconds, attempts)], run=run)

    def put_many(self, fingerprint: str, rows: Iterable[tuple[Program, Result, str, float | None, int]],
                 *, run: str | None = None) -> None:
        """Record several evaluations ``(program, result, status, seconds, attempts)`` in one transaction."""
        now = time.time()
        params = []
        for program, result, status, seconds, attempts in rows:
            if status not in STATUSES:
                raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
            if not isinstance(program, Program):
                raise TypeError(f"expected a Program, got {type(program).__name__}")
            params.append(dict(fingerprint=fingerprint, key=program.canonical_key, program=str(program),
                               tokens=json.dumps(list(program.tokens)), status=status,
                               reward=float(result.reward), metrics=_dumps(result.metrics),
                               error=result.error, seconds=seconds, attempts=int(attempts), run=run, now=now))
        if not params:
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(_UPSERT, params)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def register_task(self, fingerprint: str, name: str, config: dict[str, Any]) -> None:
        """Keep the setup behind a fingerprint, so a reader of the file knows what was scored."""
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO tasks VALUES (?, ?, ?, ?)",
                               (fingerprint, name, _dumps(config), time.time()))

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

    def records(self, fingerprint: str | None = None, status: str | None = None) -> list[Record]:
        """All records (of one task and/or status), best reward first."""
        where, args = self._where(fingerprint, status)
        return self._select(f"SELECT * FROM evaluations{where} ORDER BY reward DESC, created", args)

    def count(self, fingerprint: str | None = None, status: str | None = None) -> int:
        where, args = self._where(fingerprint, status)
        with self._lock:
            return int(self._conn.execute(f"SELECT COUNT(*) FROM evaluations{where}", args).fetchone()[0])

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Fingerprint -> {"name", "config"} of every registered task."""
        with self._lock:
            rows = self._conn.execute("SELECT fingerprint, name, config FROM tasks").fetchall()
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

    def _select(self, sql: str, args: Sequence[Any]) -> list[Record]:
        with self._lock:
            cur = self._conn.execute(sql, args)
            cols = [c[0] for c in cur.description]
            rows = cur.fetchall()
        out = []
        for row in rows:
            d = dict(zip(cols, row))
            d["tokens"] = tuple(json.loads(d["tokens"]))
            d["metrics"] = json.loads(d["metrics"])
            out.append(Record(**d))
        return out

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.path!r})"


def _dumps(obj: Any) -> str:
    """JSON that keeps NaN/Infinity (Python's json reads them back) and writes other objects as str."""
    return json.dumps(obj, default=str)
