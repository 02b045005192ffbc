"""The SQLite store: keyed by (fingerprint, canonical key), shared by processes, SIGKILL-safe."""

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from nos_gym.dsl import Masker, get_space, parse
from nos_gym.store import Store, StoreError
from nos_gym.tasks import Result

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def test_roundtrip_is_keyed_by_canonical_rule_and_fingerprint(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        s.put("task-a", parse("ADAM"), Result(0.61, {"lr": 1e-3, "sweep": {"0.001": 0.5}}), seconds=2.5, run="r1")
        rec = s.get("task-a", parse("m / sqrt|v|").canonical_key)  # another spelling of ADAM
        assert rec is not None and rec.reward == pytest.approx(0.61) and rec.status == "ok"
        assert rec.metrics == {"lr": 1e-3, "sweep": {"0.001": 0.5}} and rec.seconds == 2.5 and rec.run == "r1"
        assert rec.as_program() == parse("ADAM") and rec.program == "ADAM"
        res = rec.result()
        assert res.cached and res.reward == pytest.approx(0.61)
        assert s.get("task-b", parse("ADAM").canonical_key) is None
        assert s.count() == 1 and s.count("task-a", "ok") == 1


def test_ok_rows_are_final_and_failures_are_replaced(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        p = parse("g")
        s.put("t", p, Result(0.0, {}, "timeout: 30s"), status="timeout")
        assert s.get("t", p.canonical_key) is None  # failures are not cache hits ...
        assert s.get("t", p.canonical_key, statuses=("timeout",)).error == "timeout: 30s"  # ... but are kept
        s.put("t", p, Result(0.42), status="ok", attempts=2)
        rec = s.get("t", p.canonical_key)
        assert rec.reward == pytest.approx(0.42) and rec.error is None and rec.attempts == 3
        s.put("t", p, Result(0.0, {}, "crashed"), status="crashed")  # a late failure never hides a score
        assert s.get("t", p.canonical_key).reward == pytest.approx(0.42)
        with pytest.raises(ValueError, match="status"):
            s.put("t", p, Result(0.1), status="done")


def test_records_are_sorted_and_nonfinite_metrics_survive(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        s.put_many("t", [(parse("g"), Result(0.3, {"loss": math.inf}), "ok", 1.0, 1),
                         (parse("ADAM"), Result(0.6, {"loss": math.nan}), "ok", 1.0, 1)])
        recs = s.records("t")
        assert [r.program for r in recs] == ["ADAM", "g"]
        assert math.isnan(recs[0].metrics["loss"]) and recs[1].metrics["loss"] == math.inf


def test_a_file_that_is_not_a_store_is_rejected(tmp_path):
    bad = tmp_path / "junk.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(sqlite3.DatabaseError, match="not a usable nos-gym store"):
        Store(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Store(tmp_path / "no" / "such" / "dir.sqlite")


def _not_stores(folder: Path) -> dict[str, Path]:
    """Files that are not stores: what a reader must refuse and leave byte-identical."""
    folder.mkdir(exist_ok=True)
    files = {"empty": folder / "log.jsonl", "text": folder / "notes.txt", "garbage": folder / "junk.sqlite",
             "other db": folder / "other.db"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("hello\n")
    files["garbage"].write_bytes(bytes(range(256)) * 20)
    con = sqlite3.connect(files["other db"])
    con.execute("CREATE TABLE songs (title TEXT)")
    con.execute("INSERT INTO songs VALUES ('x')")
    con.commit()
    con.close()
    return files


def test_readonly_refuses_what_is_not_a_store_and_changes_nothing(tmp_path):
    files = _not_stores(tmp_path / "in")
    before = {name: p.read_bytes() for name, p in files.items()}
    for name, path in files.items():
        with pytest.raises(StoreError, match="not a (usable )?nos-gym store") as info:
            Store(path, readonly=True)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        if name != "empty":  # a writer refuses them too (an empty file may become a new store)
            with pytest.raises(StoreError, match="not a (usable )?nos-gym store"):
                Store(path)
        assert path.read_bytes() == before[name], name
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(p.name for p in files.values())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Store(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()


def test_readonly_store_reads_and_refuses_writes(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as s:
        s.register_task("t", "bowl", {"a": 1})
        s.put("t", parse("ADAM"), Result(0.5))
    data = path.read_bytes()
    with Store(path, readonly=True) as r:
        assert [x.program for x in r.records()] == ["ADAM"] and r.tasks()["t"]["name"] == "bowl"
        with pytest.raises(StoreError, match="read-only"):
            r.put("t", parse("g"), Result(0.1))
        assert r.checkpoint() is False
    assert path.read_bytes() == data


def test_a_folder_a_damaged_file_and_an_unwritable_folder_are_clear_errors(tmp_path, monkeypatch):
    import nos_gym.store as store_module

    with pytest.raises(StoreError, match="is a directory"):
        Store(tmp_path)
    assert issubclass(StoreError, sqlite3.DatabaseError)

    # tests run as root, where chmod does not stop writes: simulate SQLite's own errors
    def cannot_open(target, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(store_module, "_connect", cannot_open)
    with pytest.raises(StoreError) as info:
        Store(tmp_path / "new.sqlite")
    msg = str(info.value)
    assert str(tmp_path / "new.sqlite") in msg and "unable to open" in msg and "writable" in msg and "\n" not in msg
    monkeypatch.undo()

    class ReadOnlyFile(sqlite3.Connection):  # an existing store in a folder we may not write to
        def execute(self, sql, *args):
            if sql.startswith(("PRAGMA journal_mode", "BEGIN IMMEDIATE", "INSERT")):
                raise sqlite3.OperationalError("attempt to write a readonly database")
            return super().execute(sql, *args)

    path = tmp_path / "s.sqlite"
    Store(path).close()
    monkeypatch.setattr(store_module, "_connect",
                        lambda target, **kw: sqlite3.connect(target, factory=ReadOnlyFile, isolation_level=None,
                                                             check_same_thread=False, timeout=kw["timeout"],
                                                             uri=kw["uri"]))
    with pytest.raises(StoreError, match=r"cannot write the store .*s\.sqlite.*readonly.*writable"):
        Store(path)
    with Store(path, readonly=True) as r:  # reading still works
        assert r.count() == 0
    monkeypatch.undo()

    # a store that breaks while in use: the write error names the file
    s = Store(path)
    s._conn.close()
    s._conn = sqlite3.connect(path, factory=ReadOnlyFile, isolation_level=None, check_same_thread=False)
    with pytest.raises(StoreError, match=r"cannot write to the store .*s\.sqlite"):
        s.put("t", parse("g"), Result(0.1))
    with pytest.raises(StoreError, match=r"cannot write to the store"):
        s.register_task("t", "x", {})
    s.close()


def test_close_and_open_bring_the_wal_into_the_file(tmp_path):
    """The .sqlite file alone (copied without its -wal) holds the schema at once and every row after close."""
    path = tmp_path / "s.sqlite"

    def copy_alone() -> tuple[set[str], int]:
        alone = tmp_path / "alone.sqlite"
        alone.write_bytes(path.read_bytes())
        con = sqlite3.connect(alone)
        tables = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] if "evaluations" in tables else -1
        con.close()
        alone.unlink()
        return tables, rows

    s = Store(path)
    s.put("t", parse("g"), Result(0.1))
    assert {"evaluations", "tasks"} <= copy_alone()[0]  # the schema is in the file from the start
    assert s.checkpoint() is True and copy_alone()[1] == 1  # a run can checkpoint any time (after a resume)
    s.put("t", parse("m"), Result(0.2))
    s.close()
    assert copy_alone()[1] == 2
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    s.close()  # closing twice is harmless


_KILLED = textwrap.dedent("""
    import os, signal, sys
    from nos_gym.dsl import parse
    from nos_gym.store import Store
    from nos_gym.tasks import Result
    s = Store(sys.argv[1])
    for rule in ("g", "m", "ADAM"):
        s.put("t", parse(rule), Result(0.5))
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_writers_rows_reach_the_file_when_the_store_is_opened_again(tmp_path):
    path = tmp_path / "s.sqlite"
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(path)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert Path(f"{path}-wal").stat().st_size > 0  # the rows are in the WAL ...
    export = tmp_path / "copy.sqlite"
    with Store(path, readonly=True) as r:  # ... which a reader sees, and export copies
        assert r.count() == 3
        r.export(export)
    with Store(export, readonly=True) as c:
        assert c.count() == 3
    Store(path).close()  # a writer (a resumed run) brings them into the file
    con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)  # the file alone, WAL ignored
    assert con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 3
    con.close()


def test_export_writes_a_consistent_single_file_copy_jsonl_or_csv(tmp_path):
    import csv
    import json

    path = tmp_path / "s.sqlite"
    s = Store(path)  # left open: the export runs beside a live writer
    s.register_task("t", "bowl", {})
    s.put_many("t", [(parse("ADAM"), Result(0.6, {"loss": math.nan}), "ok", 1.0, 1),
                     (parse("g"), Result(0.0, {}, "boom"), "error", 0.5, 1)], run="r1")
    out = s.export(tmp_path / "copy.sqlite")
    assert out == tmp_path / "copy.sqlite" and not Path(f"{out}-wal").exists()
    con = sqlite3.connect(out)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
    with Store(out, readonly=True) as c:
        assert [(r.program, r.status) for r in c.records()] == [("ADAM", "ok"), ("g", "error")]
    rows = [json.loads(line) for line in s.export(tmp_path / "copy.jsonl").read_text().splitlines()]
    assert [(r["task"], r["program"], r["tokens"], r["status"]) for r in rows] == [
        ("bowl", "ADAM", ["adam", "one", "id", "id", "keep"], "ok"), ("bowl", "g", ["g", "one", "id", "id", "keep"], "error")]
    assert math.isnan(rows[0]["metrics"]["loss"]) and rows[1]["error"] == "boom"
    with open(s.export(tmp_path / "copy.csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["program"], r["tokens"], r["run"]) for r in table] == [("ADAM", "adam one id id keep", "r1"),
                                                                     ("g", "g one id id keep", "r1")]
    with pytest.raises(FileExistsError):
        s.export(tmp_path / "copy.csv")
    with pytest.raises(StoreError, match="onto itself"):
        s.export(path, overwrite=True)
    assert s.count() == 2
    s.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from nos_gym.dsl import Masker, get_space
    from nos_gym.store import Store
    from nos_gym.tasks import Result
    path, seed = sys.argv[1], int(sys.argv[2])
    masker, rng = Masker(get_space("full"), 2), np.random.default_rng(seed)
    with Store(path) as s:
        for i in range(60):
            s.put("shared", masker.sample(rng), Result(0.5), run=f"writer{seed}")
""")


def test_several_processes_share_one_store(tmp_path):
    path = tmp_path / "shared.sqlite"
    Store(path).close()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(seed)]) for seed in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    expected = set()
    for seed in (1, 2):
        masker, rng = Masker(get_space("full"), 2), np.random.default_rng(seed)
        expected |= {masker.sample(rng).canonical_key for _ in range(60)}
    with Store(path) as s:
        assert {r.key for r in s.records("shared")} == expected
        assert {r.run for r in s.records("shared")} == {"writer1", "writer2"}


# --------------------------------------------------------------------------- SIGKILL safety
# A small protocol: what matters here is that evaluations take real training time.
TINY = dict(preset="ci", data_dir=str(SHARED), device="cpu", lrs=[1e-3], sweep_examples=300,
            train_examples=400, val_examples=200)
RULES = ["ADAM", "g", "g * exp(sign(g) * sign(m))", "RMSProp", "m", "clip(m, 1e-4) * exp(v)"]

_SEARCH = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from nos_gym.dsl import parse
    from nos_gym.evaluation import Evaluator
    store, options, rules = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    with Evaluator("convnet-cifar10", backend="serial", store=store, **options) as ev:
        for rule in rules:  # one at a time, as an agent's loop would
            ev.evaluate([parse(rule)])
""")


def test_a_search_killed_with_sigkill_loses_no_completed_evaluation(tmp_path):
    import json

    import torch

    from nos_gym.evaluation import Evaluator

    path = tmp_path / "search.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _SEARCH, str(path), json.dumps(TINY), json.dumps(RULES)],
                            cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        done = 0
        while done < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            if path.exists():
                with Store(path) as s:
                    done = s.count(status="ok")
        os.kill(proc.pid, signal.SIGKILL)  # mid-way through the third evaluation
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    with Store(path) as s:
        survived = {r.key: r for r in s.records(status="ok")}
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert 2 <= len(survived) < len(RULES), "the search must be killed part-way"

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Evaluator("convnet-cifar10", backend="serial", store=path, **TINY) as ev:  # restart
            results = ev.evaluate([parse(r) for r in RULES])
            stats = dict(ev.stats)
    finally:
        torch.set_num_threads(before)
    # completed evaluations were reused, not recomputed; only the rest were trained
    assert stats["store_hits"] == len(survived) and stats["computed"] == len(RULES) - len(survived)
    for rule, result in zip(RULES, results):
        key = parse(rule).canonical_key
        assert result.cached == (key in survived)
        if key in survived:
            assert result.reward == survived[key].reward
    with Store(path) as s:
        after = {r.key: r for r in s.records(status="ok")}
    assert len(after) == len(RULES)
    assert all(after[k].created == survived[k].created and after[k].updated == survived[k].updated for k in survived)
    # real trainings, from both runs (one rate, 8 steps: above zero, not necessarily above chance)
    assert all(r.error is None and not r.metrics["diverged"] and 0.05 < r.reward < 1 for r in results)
