"""``nos-gym tabulate`` (nos_gym.evaluation.tabulate): the space, the refusal, resuming after SIGKILL,
the hurdle against the live ConvNet task, and (once it ships) the real table against live scores."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nos_gym import bench
from nos_gym.dsl import Constraints, Masker, Program, SearchSpace, get_space
from nos_gym.evaluation import Evaluator
from nos_gym.evaluation.tabulate import (
    TabulateError,
    canonical_rules,
    check_size,
    enumerate_programs,
    images_per_rule,
    plan_space,
    tabulate,
)
from nos_gym.tasks import make

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: 324 token strings, 174 canonical rules (80 deterministic): the funnel trains 126, shares 40, screens 8
KILL_SPACE = SearchSpace("kill", ("g", "m", "one", "sign_m"), ("id", "neg", "drop0.3"), ("sub", "mul", "keep"))
KILL_SPACE_YAML = "{name: kill, operands: [g, m, one, sign_m], unary: [id, neg, drop0.3], binary: [sub, mul, keep]}"
#: ~50 ms a rule (torch's executor, 4,000 steps): slow enough to be killed half-way
KILL_TASK = {"iterations": 4000, "executor": "batched"}


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    # the kernel set goes along: the in-process tabulation it is compared with runs under the same one
    kernels = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY",) if k in os.environ}
    return subprocess.Popen([sys.executable, "-m", "nos_gym.cli", "tabulate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "", **kernels},
                            **kwargs)


def _rows(store: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM evaluations WHERE status = 'ok'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:  # not created yet
        return 0


# ----------------------------------------------------------------------------- the space
def test_enumeration_gives_every_valid_token_string_once():
    for space, depth, constraints in [("small", 1, Constraints()), ("sign", 1, Constraints(False, False, False)),
                                      (KILL_SPACE, 2, Constraints())]:
        programs = list(enumerate_programs(space, depth, constraints))
        assert len(programs) == len({p.tokens for p in programs}) == get_space(space).size(depth, constraints)
        masker = Masker(get_space(space), depth, constraints)
        assert all(not masker.violations(p) for p in programs[:: max(1, len(programs) // 500)])
    rules = canonical_rules(KILL_SPACE, 1)
    assert len(rules) == 174 and rules[0].tokens == next(enumerate_programs(KILL_SPACE, 1)).tokens


def test_a_space_too_large_is_refused_with_its_rule_count_and_child_images(capsys):
    task = make("convnet-cifar10", preset="cpu", schedule="halving", data_dir=SHARED)
    assert images_per_rule(task) == 5 * 7 * 50 + 2 * 13 * 50 + 16_000  # two rungs of the sweep, then the final
    assert images_per_rule(make("convnet-cifar10", preset="paper", data_dir=SHARED)) == 295_000
    assert images_per_rule(make("rosenbrock")) is None
    plan = plan_space("small", 1, task=task)
    check_size(plan)  # the NOS-Bench space passes the default limits
    with pytest.raises(TabulateError, match=r"^refusing to tabulate space 'small' at depth 1: 8,064 token sequences, "
                                            r"4,320 canonical rules .* about 8\.23e\+07 child-images"):
        check_size(plan, max_child_images=5e7)
    with pytest.raises(TabulateError, match=r"23,224,320 token sequences .* up to 4\.42e\+11 child-images"):
        plan_space("small", 2, task=task)
    # the command: one line on stderr, exit code 2, nothing trained
    proc = _cli("--task-options", "{preset: paper}", "--store", "/nonexistent/never.sqlite")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.count("\n") == 1 and "4,320 canonical rules" in err
    assert "1.27e+09 child-images" in err and "--max-child-images" in err and "Traceback" not in err


def test_a_dry_run_prints_the_numbers_and_trains_nothing(tmp_path):
    proc = _cli("--dry-run", "--task-options", "{preset: cpu, schedule: halving}", cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "8,064 token sequences, 4,320 canonical rules (2,902 deterministic, 1,418 stochastic)" in out
    assert "the funnel on an empty store" in out and "estimated cost" in out
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- resuming
def test_a_tabulation_killed_with_sigkill_resumes_to_one_row_per_rule(tmp_path):
    out, store = tmp_path / "kill1.csv.gz", tmp_path / "kill1.sqlite"
    args = ("--task", "rosenbrock", "--task-options", str(KILL_TASK).replace("'", ""), "--space", KILL_SPACE_YAML,
            "--name", "kill1", "--out", str(out), "--store", str(store), "--backend", "process", "--workers", "1",
            "--no-progress")
    proc = _cli(*args)
    deadline = time.monotonic() + 240
    while _rows(store) < 60:
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = _rows(store)
    assert proc.returncode == -signal.SIGKILL and 60 <= killed_at < 174 and not out.exists()

    resumed = _cli(*args)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    table = bench.load(out)
    keys = {p.canonical_key for p in canonical_rules(KILL_SPACE, 1)}
    assert len(table) == 174 and set(table.rows) == keys
    assert _rows(store) == 174  # one stored row per rule, none twice
    assert len(table.meta["made"]["sessions"]) == 2  # the killed session and the one that finished
    # the same table as a tabulation that was never stopped
    fresh = tabulate("rosenbrock", KILL_TASK, space=KILL_SPACE, depth=1, out=tmp_path / "fresh.csv.gz",
                     store=tmp_path / "fresh.sqlite", backend="serial", job_size=1, progress=False, log=None)
    again = bench.load(fresh.path)
    for key, row in table.rows.items():
        assert (row["reward"], row["source"], row["equivalent_to"]) == \
            (again.rows[key]["reward"], again.rows[key]["source"], again.rows[key]["equivalent_to"]), key


def test_a_finished_tabulation_run_again_trains_nothing(tmp_path):
    options = dict(space=KILL_SPACE, depth=1, out=tmp_path / "t.csv.gz", store=tmp_path / "s.sqlite",
                   backend="serial", progress=False, log=None)
    first = tabulate("rosenbrock", {"iterations": 300}, **options)
    assert first.session.get("trained") == first.sources["trained"] and first.rules == 174
    second = tabulate("rosenbrock", {"iterations": 300}, **options)
    assert second.session == {"store": 174}
    a, b = bench.load(first.path), bench.load(second.path)
    assert a is b or [r["reward"] for r in a.rows.values()] == [r["reward"] for r in b.rows.values()]


def test_failed_rules_leave_no_table_and_are_retried(tmp_path, monkeypatch):
    from nos_gym.tasks.rosenbrock import RosenbrockTask

    broken = canonical_rules(KILL_SPACE, 1)[5].canonical_key
    real = RosenbrockTask.evaluate

    def flaky(self, programs):
        if any(p.canonical_key == broken for p in programs):
            raise RuntimeError("worker lost")
        return real(self, programs)

    monkeypatch.setattr(RosenbrockTask, "evaluate", flaky)
    options = dict(space=KILL_SPACE, depth=1, out=tmp_path / "t.csv.gz", store=tmp_path / "s.sqlite",
                   backend="serial", job_size=8, progress=False, log=None)
    with pytest.raises(TabulateError, match=r"^1 of 174 rules have no score .*error.*run the same command again"):
        tabulate("rosenbrock", {"iterations": 300}, **options)
    assert not (tmp_path / "t.csv.gz").exists()
    monkeypatch.setattr(RosenbrockTask, "evaluate", real)
    done = tabulate("rosenbrock", {"iterations": 300}, **options)
    assert done.rules == 174 and done.session.get("trained") == 1


# ----------------------------------------------------------------------------- the child
#: 16 token strings, 8 canonical rules: g, ADAM and g * ADAM trained, the rest screened or their twins
CI_SPACE = SearchSpace("ci-tiny", ("g", "adam"), ("id", "neg"), ("mul", "keep"))
CI_PROTOCOL = {"preset": "ci", "schedule": "halving", "rungs": 2, "data_dir": str(SHARED)}


def test_a_ci_table_with_a_hurdle_gives_what_the_live_task_gives(tmp_path):
    """The table's hurdle option against ConvNetTask(hurdle=h) through the Evaluator, rule by rule, exactly."""
    done = tabulate("convnet-cifar10", CI_PROTOCOL, space=CI_SPACE, depth=1, out=tmp_path / "ci.csv.gz",
                    store=tmp_path / "ci.sqlite", backend="serial", job_size=1, progress=False, log=None)
    table = bench.load(done.path)
    assert set(done.sources) == {"trained", "fingerprint", "screen"}
    rows = list(table.rows.values())
    assert all(r["child_images"] == 3350 for r in rows if r["source"] == "trained")  # 2 x 350 + 650 + 2,000
    assert all(r["sweep_r0_0.001"] is not None and r["sweep_r0_0.1"] is not None and r["sweep_r1_" + f"{r['lr']:g}"]
               is not None for r in rows if r["source"] == "trained")
    sweeps = sorted({r["sweep_accuracy"] for r in rows if r["source"] == "trained"})
    assert len(sweeps) >= 2
    programs = [Program(tuple(r["tokens"].split())) for r in rows]
    for hurdle in (sweeps[len(sweeps) // 2], 0.0):  # some rules below, some at or above
        with Evaluator("convnet-cifar10", backend="serial", job_size=1, hurdle=hurdle, **CI_PROTOCOL) as ev:
            live = ev.evaluate(programs)
        assert [r.reward for r in live] == table.rewards(programs, hurdle=hurdle).tolist()
        if hurdle:
            assert any(r.metrics.get("hurdled") for r in live) and not all(r.metrics.get("hurdled") for r in live)


# ----------------------------------------------------------------------------- the real table
SHIPPED = bench.DEFAULT in bench.available()


@pytest.mark.skipif(not SHIPPED, reason="the NOS-Bench table is not shipped yet")
def test_the_shipped_table_has_one_row_per_canonical_rule():
    table = bench.load()
    keys = {p.canonical_key for p in canonical_rules("small", 1)}
    assert len(table) == 4320 and set(table.rows) == keys
    assert table.meta["counts"]["token_sequences"] == 8064
    assert table.meta["protocol"]["schedule"] == "halving" and table.meta["protocol"].get("hurdle") is None


@pytest.mark.skipif(not SHIPPED, reason="the NOS-Bench table is not shipped yet")
def test_the_shipped_table_has_fast_scores_at_three_seeds_for_the_best_rules_and_the_references():
    import statistics

    table = bench.load()
    test = table.meta["test"]
    assert (test["name"], test["options"], test["seeds"]) == ("fast", {"preset": "fast"}, [0, 1, 2])
    assert table.test_name == "fast" and len(test["fingerprints"]) == 3
    best = sorted(table.rows.values(), key=lambda r: (-r["reward"], r["key"]))[:100]
    for row in best:
        per_seed = [row[f"fast_s{s}"] for s in (0, 1, 2)]
        assert None not in per_seed, row["rule"]
        assert row["fast_mean"] == pytest.approx(statistics.fmean(per_seed), abs=1e-9)
        assert row["fast_sd"] == pytest.approx(statistics.stdev(per_seed), abs=1e-9)
    refs = test["references"]
    assert {"sgd", "momentum", "adam", "rmsprop", "powersign", "addsign"} <= set(refs)
    for name, ref in refs.items():
        assert len(ref["per_seed"]) == 3 and 0.0 <= ref["mean"] <= 1.0, name
        if ref["in_space"]:  # its row carries the same numbers
            assert table.rows[ref["key"]]["fast_s0"] == ref["per_seed"][0], name
        else:
            assert ref["key"] not in table.rows, name
    assert refs["adam"]["mean"] > 0.5 and refs["adam"]["mean"] > refs["sgd"]["mean"]  # the references learn


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="the NOS-Bench table is not shipped yet")
def test_twenty_random_rules_scored_live_reproduce_the_shipped_table():
    """Same kernel set as the table's: the same rewards exactly; another: within the 0.025 that
    benchmarks/portability.py documents for the child (docs/guarantees.md, "How far a reward moves")."""
    import torch

    table = bench.load()
    task_meta = table.meta["task"]
    task = make(task_meta["name"], **task_meta["options"])
    assert task.fingerprint == task_meta["fingerprint"], "another protocol or data copy than the table's"
    rng = np.random.default_rng(21)
    keys = list(table.rows)
    chosen = [table.rows[keys[i]] for i in rng.choice(len(keys), 20, replace=False)]
    # a fingerprint row's score is its twin's: score the twin live, as the funnel did
    twins = [table.rows.get(r["equivalent_to"], r) if r["source"] == "fingerprint" else r for r in chosen]
    with Evaluator(task, backend="serial", job_size=1) as ev:
        live = np.array([r.reward for r in ev.evaluate([Program(tuple(r["tokens"].split())) for r in twins])])
    shipped = np.array([r["reward"] for r in chosen])
    if torch.backends.cpu.get_cpu_capability() == table.meta["made"]["aten_kernels"]:
        assert live.tolist() == shipped.tolist()
    else:
        assert np.abs(live - shipped).max() <= 0.025
