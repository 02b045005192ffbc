"""The NOS-Bench table file: its format, the writer and the loader (no torch).

A table holds one row per canonical rule of a (space, depth, constraints), scored once on
one task and protocol by ``nos-gym tabulate`` (``nos_gym.evaluation.tabulate``). The file is
gzip-compressed UTF-8 text (``NAME.csv.gz``):

- line 1: ``#nosbench-table`` and one JSON object, the metadata (``SCHEMA_VERSION``, the
  space and what it holds, the task fingerprint and config, the protocol, SEMANTICS_VERSION,
  the code commit, the date, the CPU and ATen kernel set, the cost, the columns, the row
  count and the sha256 of everything after line 1);
- then a CSV table (header, then one row per rule, best reward first): see ``COLUMNS``.

Cells: an empty cell is "absent" (``None`` in a row dict; a rate not trained at that rung, a
test score not measured); ``NaN`` in a sweep column is a rate that diverged; booleans are
``1``/``0``; floats are written with Python's shortest round-trip repr, so a reward read
back is the float that was scored, bit for bit. No pickle: ``pandas.read_csv(path,
skiprows=1)`` and R's ``read.csv(gzfile(path), skip=1)`` read the file as it is, and
``BenchTable.to_csv`` writes a plain CSV (and the metadata as JSON beside it).

Anything wrong with a file (not gzip, truncated, a changed byte, a missing or extra row or
column, a value that is not a number) raises ``TableError`` with a one-line message naming
the file: a damaged table never yields a reward.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nos_gym.dsl import ParseError, Program, parse

__all__ = ["COLUMNS", "DEFAULT", "MAGIC", "SCHEMA_VERSION", "TABLES_DIR", "BenchTable", "RuleNotInTableError",
           "TableError", "available", "load", "table_path", "write_table"]

#: the format version written in every file's metadata; the loader reads this one and older
SCHEMA_VERSION = 1
#: the first characters of a table file's first line
MAGIC = "#nosbench-table "
#: where the tables shipped with the package live (package data)
TABLES_DIR = Path(__file__).resolve().parent / "tables"
SUFFIX = ".csv.gz"
#: the table ``load()`` gives without a name: the small space at depth 1, CIFAR-10 child, "cpu" protocol
DEFAULT = "small1-cifar10-cpu"

#: the fixed columns, in file order; then the sweep columns ``sweep_r{rung}_{rate}`` (the accuracy
#: of each rate when it left rung ``rung``), then the test columns ``{test}_mean``, ``{test}_sd``,
#: ``{test}_s{seed}`` when the table has a test (e.g. ``fast``)
COLUMNS: dict[str, str] = {
    "key": "text",            # the canonical key (nos_gym.dsl.canonical): the row's identity
    "rule": "text",           # the rule in paper notation (one spelling of it)
    "tokens": "text",         # that spelling's tokens, space-separated
    "stochastic": "bool",     # the rule draws random numbers (drop, noise)
    "source": "text",         # how the funnel settled it: trained, fingerprint, screen
    "reward": "float",        # the score (validation accuracy for the child)
    "lr": "float",            # the chosen learning rate (absent: every rate diverged)
    "sweep_accuracy": "float",  # the chosen rate's accuracy at the end of the sweep (what a hurdle compares)
    "diverged": "bool",
    "fidelity": "text",       # full, sweep (hurdled), final-rung (the task's metrics["fidelity"])
    "child_images": "int",    # images the child trained on to score the rule (a fingerprint row: its twin's)
    "train_seconds": "float",  # seconds the task spent on it (a fingerprint row: its twin's)
    "equivalent_to": "text",  # fingerprint rows: the canonical key of the rule whose score it shares
    "screen": "text",         # screen rows: why (nan_inf, zero, ignores_gradient, never_descent)
    "error": "text",          # the evaluator's error text, if any (screened rules say why)
}
_SWEEP = re.compile(r"^sweep_r(\d+)_(.+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class TableError(ValueError):
    """A table file that cannot be used (missing, damaged, truncated, not a table); the message names it."""


class RuleNotInTableError(LookupError):
    """A rule outside the space a table covers; the message names the table and that space."""

    def __str__(self) -> str:  # LookupError/KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- writing
def _cell(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "bool":
        return "1" if value else "0"
    if kind == "int":
        return str(int(value))
    if kind == "float":
        v = float(value)
        return "NaN" if math.isnan(v) else repr(v)
    text = str(value)
    return " ".join(text.split())  # one line per row: no newlines in a cell


def column_kind(name: str) -> str:
    """``"text"``, ``"bool"``, ``"int"`` or ``"float"``: how a column's cells are written and read."""
    return COLUMNS.get(name, "float")


def write_table(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts by column; missing or None: empty) and ``meta`` as a table file at ``path``.

    ``columns`` must start with ``COLUMNS``' keys. The metadata gets ``schema``, ``columns``,
    ``rows`` and ``sha256`` (of the CSV part) added. Written under a temporary name and
    renamed: ``path`` is never half-written. Returns ``path``.
    """
    columns = list(columns)
    if columns[: len(COLUMNS)] != list(COLUMNS):
        raise ValueError(f"a table's columns start with {list(COLUMNS)}")
    if len(set(columns)) != len(columns):
        raise ValueError("duplicate column names")
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError("two rows with one canonical key")
    body = io.StringIO()
    writer = csv.writer(body, lineterminator="\n")
    writer.writerow(columns)
    kinds = [column_kind(c) for c in columns]
    for r in rows:
        writer.writerow([_cell(r.get(c), k) for c, k in zip(columns, kinds)])
    data = body.getvalue().encode("utf-8")
    meta = {**meta, "schema": SCHEMA_VERSION, "columns": columns, "rows": len(rows),
            "sha256": hashlib.sha256(data).hexdigest()}
    head = (MAGIC + json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0) as gz:  # same bytes for same rows
                gz.write(head + data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# ----------------------------------------------------------------------------- reading
def available() -> list[str]:
    """Names of the tables shipped with this installation (``load(name)`` loads one)."""
    if not TABLES_DIR.is_dir():
        return []
    return sorted(p.name[: -len(SUFFIX)] for p in TABLES_DIR.glob(f"*{SUFFIX}"))


def table_path(table: str | os.PathLike | None = None) -> Path:
    """The file of a table: a shipped table's name (None: ``DEFAULT``), or a path to a table file."""
    table = DEFAULT if table is None else table
    text = os.fspath(table)
    if isinstance(table, str) and _NAME.match(text) and not text.endswith(SUFFIX):
        path = TABLES_DIR / f"{text}{SUFFIX}"
        if not path.is_file():
            shipped = available()
            raise TableError(f"no NOS-Bench table {text!r} in this installation ({TABLES_DIR}); tables here: "
                             f"{shipped or 'none'}; make one with `nos-gym tabulate`, or give the path of a "
                             f"table file")
        return path
    path = Path(text).expanduser()
    if not path.is_file():
        raise TableError(f"no NOS-Bench table file at {path}")
    return path


_CACHE: dict[tuple[str, int, int], BenchTable] = {}


def load(table: str | os.PathLike | None = None) -> BenchTable:
    """A NOS-Bench table: by name (``load("small1-cifar10-cpu")``; no argument: ``DEFAULT``) or by path.

    Loaded once per file version and shared: treat the returned table and its rows as read-only.
    Raises ``TableError`` (one line, naming the file) for a missing or damaged file.
    """
    path = table_path(table)
    try:
        st = path.stat()
    except OSError as e:
        raise TableError(f"cannot read the NOS-Bench table {path}: {e.strerror or e}") from e
    cache_key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    found = _CACHE.get(cache_key)
    if found is None:
        found = _read(path)
        if len(_CACHE) >= 4:  # a few tables at most per process; a rewritten file is a new entry
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[cache_key] = found
    return found


def _read(path: Path) -> BenchTable:
    name = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.stem
    where = f"the NOS-Bench table {path}"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, CRC mismatch
        what = "truncated" if isinstance(e, EOFError) else "damaged or not a table file"
        raise TableError(f"{where} is {what} ({type(e).__name__}: {' '.join(str(e).split())}); "
                         f"reinstall nos-gym or tabulate again") from e
    head, sep, data = raw.partition(b"\n")
    if not head.startswith(MAGIC.encode()) or not sep:
        raise TableError(f"{where} is not a NOS-Bench table (its first line is not '{MAGIC.strip()} {{...}}')")
    try:
        meta = json.loads(head[len(MAGIC):].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"{where} has damaged metadata ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("schema"), int):
        raise TableError(f"{where} has no schema version in its metadata")
    if meta["schema"] > SCHEMA_VERSION:
        raise TableError(f"{where} has schema version {meta['schema']}, newer than this nos-gym reads "
                         f"({SCHEMA_VERSION}): upgrade nos-gym")
    for field in ("columns", "rows", "sha256"):
        if field not in meta:
            raise TableError(f"{where} lacks {field!r} in its metadata")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise TableError(f"{where} is damaged: its rows do not match the checksum in its metadata")
    try:
        reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
        header = next(reader, None)
        body = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise TableError(f"{where} is damaged ({e})") from e
    columns = list(meta["columns"])
    if header != columns:
        raise TableError(f"{where} is damaged: its header is not the columns its metadata lists")
    if columns[: len(COLUMNS)] != list(COLUMNS):
        raise TableError(f"{where} lacks the columns {list(COLUMNS)}")
    if len(body) != meta["rows"]:
        raise TableError(f"{where} has {len(body)} rows, its metadata says {meta['rows']}")
    return BenchTable(name, path, meta, columns, body)


def _parse(text: str, kind: str) -> Any:
    if text == "":
        return None
    if kind == "text":
        return text
    if kind == "bool":
        if text not in ("0", "1"):
            raise ValueError(f"{text!r} is not 0 or 1")
        return text == "1"
    if kind == "int":
        return int(text)
    return float(text)


class BenchTable:
    """One NOS-Bench table: ``rows`` (canonical key -> row dict), ``meta`` (the metadata) and lookups.

    A rule is given as a ``Program``, a canonical key or a rule in paper notation. Lookups
    of a rule outside the table raise ``RuleNotInTableError`` naming the table and its space.

    ``hurdle``: the fixed hurdle of the ConvNet task's multi-fidelity protocol applied to the
    table afterwards (``reward(rule, hurdle=h)`` is what the live task with ``hurdle=h``
    returns): a rule whose sweep accuracy is below ``h`` scores that sweep accuracy, a rule
    that diverged at every rate 0, a screened rule the screen's score, the others their reward.
    """

    def __init__(self, name: str, path: Path, meta: dict[str, Any], columns: list[str], body: list[list[str]]):
        self.name = name
        self.path = path
        self.meta = meta
        self.columns = tuple(columns)
        kinds = [column_kind(c) for c in columns]
        rows: dict[str, dict[str, Any]] = {}
        for i, cells in enumerate(body):
            if len(cells) != len(columns):
                raise TableError(f"the NOS-Bench table {path} is damaged: row {i + 1} has {len(cells)} cells, "
                                 f"not {len(columns)}")
            try:
                row = {c: _parse(t, k) for c, t, k in zip(columns, cells, kinds)}
            except ValueError as e:
                raise TableError(f"the NOS-Bench table {path} is damaged: row {i + 1}: {e}") from e
            key = row["key"]
            if key is None or key in rows:
                raise TableError(f"the NOS-Bench table {path} is damaged: row {i + 1} has "
                                 f"{'no key' if key is None else f'the key {key!r} of an earlier row'}")
            if row["reward"] is None or row["source"] is None:
                raise TableError(f"the NOS-Bench table {path} is damaged: row {i + 1} ({key}) has no reward or source")
            rows[key] = row
        #: canonical key -> row (a dict by column; None where a cell is empty)
        self.rows = rows
        self._keys = list(rows)
        self._index = {k: i for i, k in enumerate(self._keys)}

        def array(column: str) -> np.ndarray:
            return np.array([np.nan if r[column] is None else float(r[column]) for r in rows.values()], dtype=float)

        self._reward = array("reward")
        self._sweep = array("sweep_accuracy")
        self._no_lr = np.isnan(array("lr"))
        self._screen = np.array([r["source"] == "screen" for r in rows.values()], dtype=bool)

    # -- what it covers ------------------------------------------------------------------
    @property
    def test_name(self) -> str | None:
        """The name of the table's test columns (e.g. "fast"), None without them."""
        test = self.meta.get("test")
        return test.get("name") if isinstance(test, dict) else None

    def covers(self) -> str:
        """The space the table covers, in words (for messages)."""
        space = self.meta.get("space", {})
        constraints = self.meta.get("constraints", {})
        on = [k.replace("_", " ") for k, v in constraints.items() if v]
        return (f"space {space.get('name', '?')!r} at depth {self.meta.get('depth', '?')} with "
                f"{', '.join(on) if on else 'no constraints'} ({len(self):,} canonical rules)")

    # -- lookups -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self._keys)

    def __contains__(self, rule: object) -> bool:
        try:
            return self.key_of(rule) in self._index  # type: ignore[arg-type]
        except (ParseError, TypeError, ValueError):
            return False

    def key_of(self, rule: Program | str) -> str:
        """The canonical key of a Program, a key, or a rule in paper notation (a key if it is one here)."""
        if isinstance(rule, Program):
            return rule.canonical_key
        if isinstance(rule, str):
            if rule in self._index:
                return rule
            return parse(rule).canonical_key
        raise TypeError(f"a rule is a Program, a canonical key or paper notation, got {type(rule).__name__}")

    def _missing(self, rule: Program | str) -> RuleNotInTableError:
        shown = rule.format() if isinstance(rule, Program) else str(rule)
        return RuleNotInTableError(
            f"rule {shown!r} is not in the NOS-Bench table {self.name!r}, which covers {self.covers()}: search "
            f"that space (OptimizerSearch-Bench-v0 does), or tabulate yours with `nos-gym tabulate`")

    def index(self, rules: Iterable[Program | str]) -> np.ndarray:
        """Row positions of ``rules`` (``RuleNotInTableError`` for the first one missing)."""
        out = []
        get = self._index.get
        for r in rules:
            i = get(r.canonical_key if isinstance(r, Program) else r)
            if i is None:
                try:
                    i = self._index.get(self.key_of(r))
                except ParseError as e:
                    raise RuleNotInTableError(
                        f"{r!r} is not in the NOS-Bench table {self.name!r}, which covers {self.covers()}: it is "
                        f"neither one of its canonical keys nor a rule in paper notation ({' '.join(str(e).split())})"
                    ) from e
                if i is None:
                    raise self._missing(r)
            out.append(i)
        return np.array(out, dtype=np.int64)

    def __getitem__(self, rule: Program | str) -> dict[str, Any]:
        return self.rows[self._keys[int(self.index([rule])[0])]]

    def lookup(self, rules: Iterable[Program | str]) -> list[dict[str, Any]]:
        """The rows of ``rules``, in order."""
        keys = self._keys
        return [self.rows[keys[i]] for i in self.index(rules)]

    def rewards(self, rules: Iterable[Program | str], hurdle: float | None = None) -> np.ndarray:
        """The rewards of ``rules`` (with ``hurdle`` applied, if given) as a float array."""
        idx = self.index(rules)
        return self._hurdled(hurdle)[idx]

    def reward(self, rule: Program | str, hurdle: float | None = None) -> float:
        return float(self.rewards([rule], hurdle)[0])

    def _hurdled(self, hurdle: float | None) -> np.ndarray:
        if hurdle is None:
            return self._reward
        self.check_hurdle(hurdle)
        below = ~self._screen & ~self._no_lr & (self._sweep < hurdle)
        out = np.where(below, self._sweep, self._reward)
        return np.where(~self._screen & self._no_lr, 0.0, out)

    def check_hurdle(self, hurdle: float) -> None:
        """Raise ValueError when the table cannot say what ``hurdle`` gives (no sweep, or a higher hurdle made it)."""
        if isinstance(hurdle, bool) or not isinstance(hurdle, (int, float)) or not 0.0 <= float(hurdle) <= 1.0:
            raise ValueError(f"hurdle must be a number in [0, 1] or None, got {hurdle!r}")
        trained = ~self._screen
        if trained.any() and np.isnan(self._sweep[trained & ~self._no_lr]).all():
            raise ValueError(f"the NOS-Bench table {self.name!r} has no sweep accuracies (task "
                             f"{self.meta.get('task', {}).get('name')!r}): a hurdle needs a table of the ConvNet task")
        protocol = self.meta.get("protocol") or {}
        if protocol.get("hurdle_quantile") is not None:
            raise ValueError(f"the NOS-Bench table {self.name!r} was made with a rolling hurdle: it cannot take another")
        made = protocol.get("hurdle")
        if made is not None and float(hurdle) < float(made):
            raise ValueError(f"the NOS-Bench table {self.name!r} was made with hurdle {made}: the rules below it "
                             f"had no final training, so it can give hurdles of {made} or more, not {hurdle}")

    # -- the whole table ------------------------------------------------------------------
    def optimum(self, hurdle: float | None = None) -> float:
        """The best reward in the table (with ``hurdle`` applied, if given)."""
        return float(self._hurdled(hurdle).max()) if len(self) else float("nan")

    def top(self, k: int = 10, hurdle: float | None = None) -> list[dict[str, Any]]:
        """The ``k`` best rows by reward (ties: by key)."""
        scores = self._hurdled(hurdle)
        order = sorted(range(len(self._keys)), key=lambda i: (-scores[i], self._keys[i]))
        return [self.rows[self._keys[i]] for i in order[:k]]

    def to_csv(self, out: str | os.PathLike) -> Path:
        """A plain CSV of the rows (for pandas, R, a spreadsheet) at ``out``; the metadata as
        JSON beside it (``out`` with the suffix ``.json``). Returns ``out``."""
        out = Path(out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(self.columns)
            kinds = [column_kind(c) for c in self.columns]
            for row in self.rows.values():
                writer.writerow([_cell(row[c], k) for c, k in zip(self.columns, kinds)])
        out.with_suffix(".json").write_text(json.dumps(self.meta, indent=1, sort_keys=True) + "\n")
        return out

    def sweep_columns(self) -> list[tuple[str, int, str]]:
        """(column, rung, rate) of each sweep column."""
        out = []
        for c in self.columns:
            m = _SWEEP.match(c)
            if m:
                out.append((c, int(m.group(1)), m.group(2)))
        return out

    def __repr__(self) -> str:
        return f"BenchTable({self.name!r}, {len(self):,} rules, {self.path})"
