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
from nos_gym.store import Store
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
