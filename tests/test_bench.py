"""NOS-Bench (nos_gym.bench, the "nosbench" task, OptimizerSearch-Bench-v0) on stand-in tables.

The real table (the small space at depth 1 on the CIFAR-10 child) is made later; these tests
tabulate the same space on Rosenbrock (seconds) and write small hand-made tables, in tmp_path.
"""

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import nos_gym
from nos_gym import bench
from nos_gym.bench import COLUMNS, RuleNotInTableError, TableError, write_table
from nos_gym.bench.report import hurdle_cuts, plot, summary
from nos_gym.cli import main as cli
from nos_gym.dsl import Masker, get_space, parse, space_sizes
from nos_gym.evaluation import Evaluator
from nos_gym.evaluation.tabulate import TestSpec, canonical_rules, tabulate
from nos_gym.tasks import make
from nos_gym.tasks.nosbench import NOSBenchTask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """The small space at depth 1 (OptimizerSearch-Bench-v0's) tabulated on a short Rosenbrock,
    with test columns ("fast": Rosenbrock at 300 iterations, seeds 0-2) for the 20 best rules."""
    folder = tmp_path_factory.mktemp("standin")
    out = folder / "small1-rosenbrock.csv.gz"
    tabulate("rosenbrock", {"iterations": 200}, space="small", depth=1, out=out, store=folder / "s.sqlite",
             name="small1-rosenbrock", backend="serial", progress=False, log=None,
             test=TestSpec("fast", {"iterations": 300}, (0, 1, 2), top=20))
    return out


def _row(key, reward, **cells):
    return {"key": key, "rule": key, "tokens": "", "stochastic": False, "source": "trained", "reward": reward,
            **cells}


def hand_table(path: Path, protocol=None) -> Path:
    """A tiny ConvNet-like table: a rule above and one below a hurdle of 0.3, one that diverged
    at every rate, one screened, one sharing its twin's score."""
    rows = [
        _row("g", 0.45, lr=0.1, sweep_accuracy=0.35, child_images=19050, train_seconds=4.5,
             **{"sweep_r0_0.1": 0.2, "sweep_r1_0.1": 0.35, "sweep_r0_1": float("nan")}),
        _row("m", 0.40, lr=0.01, sweep_accuracy=0.25, child_images=19050, train_seconds=4.4),
        _row("exp(g)", 0.0, lr=None, sweep_accuracy=0.0, diverged=True, child_images=3050, train_seconds=1.0),
        {**_row("neg(g)", 0.096, child_images=0, train_seconds=0.0), "source": "screen", "screen": "never_descent",
         "error": "screened: never_descent"},
        {**_row("mul(g,one)", 0.45, lr=0.1, sweep_accuracy=0.35, child_images=19050), "source": "fingerprint",
         "equivalent_to": "g"},
    ]
    columns = [*COLUMNS, "sweep_r0_0.1", "sweep_r0_1", "sweep_r1_0.1"]
    meta = {"name": path.name, "space": {"name": "hand"}, "depth": 1, "constraints": {},
            "task": {"name": "convnet-cifar10"}, "protocol": protocol or {"preset": "cpu", "schedule": "halving"}}
    return write_table(path, rows, meta, columns)


# ----------------------------------------------------------------------------- the space
def test_the_small_depth_one_space_has_the_issues_numbers():
    rules = canonical_rules("small", 1)
    assert space_sizes((1,))["small"][1] == 8064
    assert len(rules) == 4320 == len({p.canonical_key for p in rules})
    assert sum(not p.stochastic for p in rules) == 2902 and sum(p.stochastic for p in rules) == 1418
    masker = Masker(get_space("small"), 1)
    assert all(not masker.violations(p) and get_space("small").contains(p) for p in rules)


def test_a_standin_table_has_one_row_per_canonical_rule(standin):
    table = bench.load(standin)
    keys = {p.canonical_key for p in canonical_rules("small", 1)}
    assert len(table) == 4320 and set(table.rows) == keys
    counts = table.meta["counts"]
    assert (counts["token_sequences"], counts["rules"], counts["deterministic"], counts["stochastic"]) == \
        (8064, 4320, 2902, 1418)
    sources = {r["source"] for r in table.rows.values()}
    assert sources == {"trained", "fingerprint", "screen"}
    assert sum(counts["sources"].values()) == 4320
    for row in table.rows.values():  # a fingerprint row names a twin that is a trained row with its score
        if row["source"] == "fingerprint" and row["equivalent_to"] in table.rows:
            twin = table.rows[row["equivalent_to"]]
            assert twin["source"] == "trained" and twin["reward"] == row["reward"]


def test_the_standin_rewards_are_the_live_evaluators(standin):
    """The table's reward of a rule is what the Evaluator gives it live (funnel included)."""
    table = bench.load(standin)
    rng = np.random.default_rng(0)
    keys = list(table.rows)
    chosen = [table.rows[keys[i]] for i in rng.choice(len(keys), 40, replace=False)]
    with Evaluator("rosenbrock", backend="serial", iterations=200) as ev:
        # a fingerprint row's score is its twin's: score the twin live, as the funnel did
        twins = [table.rows.get(r["equivalent_to"], r) if r["source"] == "fingerprint" else r for r in chosen]
        live = ev.evaluate([parse_tokens(r["tokens"]) for r in twins])
    assert [r.reward for r in live] == [r["reward"] for r in chosen]


def parse_tokens(text: str):
    from nos_gym.dsl import Program

    return Program(tuple(text.split()))


# ----------------------------------------------------------------------------- the file
def test_metadata_says_how_the_table_was_made(standin):
    meta = bench.load(standin).meta
    for field in ("schema", "name", "space", "depth", "constraints", "counts", "task", "semantics_version", "code",
                  "made", "cost", "columns", "rows", "sha256", "test"):
        assert field in meta, field
    assert meta["task"]["fingerprint"].startswith("rosenbrock-") and meta["task"]["options"] == {"iterations": 200}
    assert meta["semantics_version"] == nos_gym.tasks.base.SEMANTICS_VERSION
    assert meta["made"]["aten_kernels"] and meta["made"]["cpu"] and meta["made"]["sessions"]
    assert meta["cost"]["rules_trained"] == meta["counts"]["sources"]["trained"]
    test = meta["test"]
    assert test["name"] == "fast" and test["seeds"] == [0, 1, 2] and test["top"] == 20
    refs = test["references"]
    assert refs["adam"]["in_space"] and not refs["rmsprop"]["in_space"] and len(refs["rmsprop"]["per_seed"]) == 3


def test_test_columns_hold_the_best_rules_and_the_references_in_the_space(standin):
    table = bench.load(standin)
    with_test = {k for k, r in table.rows.items() if r["fast_mean"] is not None}
    assert {r["key"] for r in table.top(20)} <= with_test
    assert parse("ADAM").canonical_key in with_test and parse("g").canonical_key in with_test
    assert len(with_test) == table.meta["test"]["rows"]
    for key in with_test:
        r = table.rows[key]
        seeds = [r["fast_s0"], r["fast_s1"], r["fast_s2"]]
        assert r["fast_mean"] == pytest.approx(np.mean(seeds)) and r["fast_sd"] == pytest.approx(np.std(seeds, ddof=1))
    absent = next(r for r in table.rows.values() if r["key"] not in with_test)
    assert absent["fast_mean"] is None and absent["fast_sd"] is None


def test_floats_survive_the_file_bit_for_bit(tmp_path):
    x = 0.38600000739097595
    path = write_table(tmp_path / "t.csv.gz", [_row("g", x, lr=1e-4), _row("m", 1 / 3)], {"name": "t"}, list(COLUMNS))
    table = bench.load(path)
    assert table.rows["g"]["reward"] == x and table.rows["m"]["reward"] == 1 / 3 and table.rows["g"]["lr"] == 1e-4


def test_loading_by_name_and_the_default(tmp_path, monkeypatch, standin):
    monkeypatch.setattr(bench.table, "TABLES_DIR", tmp_path)
    assert bench.available() == []
    with pytest.raises(TableError, match=r"no NOS-Bench table 'small1-cifar10-cpu'.*nos-gym tabulate"):
        bench.load()
    (tmp_path / "small1-cifar10-cpu.csv.gz").write_bytes(standin.read_bytes())
    (tmp_path / "other.csv.gz").write_bytes(standin.read_bytes())
    assert bench.available() == ["other", "small1-cifar10-cpu"]
    assert bench.load().name == "small1-cifar10-cpu" and len(bench.load("other")) == 4320
    assert bench.load("small1-cifar10-cpu") is bench.load()  # loaded once


def test_rows_by_key_program_or_notation(standin):
    table = bench.load(standin)
    adam = table.rows[parse("ADAM").canonical_key]
    assert table["ADAM"] is adam and table[parse("m / sqrt|v|")] is adam and table[adam["key"]] is adam
    programs = Masker(get_space("small"), 1).sample_many(200, 3)
    rewards = table.rewards(programs)
    assert rewards.tolist() == [table.rows[p.canonical_key]["reward"] for p in programs]
    assert [r["key"] for r in table.lookup(programs)] == [p.canonical_key for p in programs]
    assert table.optimum() == max(r["reward"] for r in table.rows.values()) == table.top(1)[0]["reward"]


def test_a_rule_outside_the_table_names_the_table_and_its_space(standin):
    table = bench.load(standin)
    for rule in ("RMSProp", parse("g * exp(sign(g) * sign(m))"), "div(g,sqrt_abs(v))"):
        assert rule not in table
        with pytest.raises(RuleNotInTableError) as e:
            table.rewards(["g", rule])
        assert "small1-rosenbrock" in str(e.value) and "space 'small' at depth 1" in str(e.value)


def test_csv_export_is_plain(standin, tmp_path):
    table = bench.load(standin)
    out = table.to_csv(tmp_path / "small1.csv")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4320 and list(rows[0]) == list(table.columns)
    assert float(rows[0]["reward"]) == table.top(1)[0]["reward"]
    assert json.loads(out.with_suffix(".json").read_text())["sha256"] == table.meta["sha256"]
    assert cli(["bench", str(standin), "--csv", str(tmp_path / "again.csv")]) == 0
    assert (tmp_path / "again.csv").read_text() == out.read_text()


# ----------------------------------------------------------------------------- damage
def _damaged(tmp_path: Path, good: Path) -> dict[str, Path]:
    raw = good.read_bytes()
    text = gzip.decompress(raw).decode()
    head, body = text.split("\n", 1)
    lines = body.split("\n")
    out = {}

    def put(name, data: bytes):
        out[name] = tmp_path / f"{name}.csv.gz"
        out[name].write_bytes(data)

    put("truncated", raw[: len(raw) // 2])
    put("empty", b"")
    put("not-gzip", text.encode())
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    put("flipped-byte", bytes(flipped))
    changed = lines[1].replace(lines[1].split(",")[5], "0.999", 1)  # one reward changed: a valid gzip file
    put("changed-reward", gzip.compress((head + "\n" + "\n".join([lines[0], changed, *lines[2:]])).encode()))
    put("row-missing", gzip.compress((head + "\n" + "\n".join([lines[0], *lines[2:]])).encode()))
    put("no-metadata", gzip.compress(body.encode()))
    meta = json.loads(head.split(" ", 1)[1])
    put("newer-schema", gzip.compress((head.split(" ", 1)[0] + " " + json.dumps({**meta, "schema": 99}) + "\n"
                                       + body).encode()))
    put("bad-json", gzip.compress((head[:-10] + "\n" + body).encode()))
    return out


def test_a_damaged_or_truncated_table_is_one_line_naming_the_file(tmp_path):
    good = hand_table(tmp_path / "good.csv.gz")
    assert bench.load(good).reward("g") == 0.45
    for name, path in _damaged(tmp_path, good).items():
        with pytest.raises(TableError) as e:
            bench.load(path)
        message = str(e.value)
        assert str(path) in message and "\n" not in message, (name, message)
        with pytest.raises(TableError):  # the env never gets a reward from it
            gym.make("OptimizerSearch-Bench-v0", task_options={"table": str(path)})
    with pytest.raises(TableError, match="no NOS-Bench table file at"):
        bench.load(tmp_path / "missing.csv.gz")


def test_the_cli_reports_a_damaged_table_in_one_line(tmp_path):
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(gzip.compress(b"hello"))
    proc = subprocess.run([sys.executable, "-m", "nos_gym.cli", "bench", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- the hurdle
def test_a_hurdle_applied_to_the_table(tmp_path):
    table = bench.load(hand_table(tmp_path / "h.csv.gz"))
    rules = ["g", "m", "exp(g)", "neg(g)", "mul(g,one)"]
    assert table.rewards(rules).tolist() == [0.45, 0.40, 0.0, 0.096, 0.45]
    # below the hurdle a rule scores its sweep accuracy; all rates diverged: 0; screened: the screen's score
    assert table.rewards(rules, hurdle=0.3).tolist() == [0.45, 0.25, 0.0, 0.096, 0.45]
    assert table.rewards(rules, hurdle=0.36).tolist() == [0.35, 0.25, 0.0, 0.096, 0.35]
    assert table.rewards(rules, hurdle=0.0).tolist() == table.rewards(rules).tolist()
    assert [r["key"] for r in hurdle_cuts(table, 0.3)] == ["m"]
    assert table.optimum(0.36) == 0.35
    task = NOSBenchTask(table.path, hurdle=0.3)
    results = task.evaluate([parse("m"), parse("g")])
    assert results[0].reward == 0.25 and results[0].metrics["hurdled"] and results[0].metrics["hurdle"] == 0.3
    assert results[1].reward == 0.45 and not results[1].metrics["hurdled"]


def test_a_hurdle_the_table_cannot_answer_is_refused(tmp_path, standin):
    made_with = bench.load(hand_table(tmp_path / "h.csv.gz", protocol={"preset": "cpu", "hurdle": 0.3}))
    assert made_with.rewards(["m"], hurdle=0.35).tolist() == [0.25]
    with pytest.raises(ValueError, match="made with hurdle 0.3"):
        made_with.rewards(["m"], hurdle=0.2)
    with pytest.raises(ValueError, match="no sweep accuracies"):
        NOSBenchTask(standin, hurdle=0.2)


# ----------------------------------------------------------------------------- task and env
def test_the_task_serves_rewards_costs_and_test_scores(standin):
    table = bench.load(standin)
    task = make("nosbench", table=str(standin))
    assert task.fingerprint.startswith("nosbench-") and task.screen_score() is None and not task.supports_probe
    best = table.top(1)[0]
    (result,) = task.evaluate([parse_tokens(best["tokens"])])
    assert result.reward == best["reward"] and result.source == best["source"]
    assert result.metrics["fast"] == best["fast_mean"] and result.metrics["fast_sd"] == best["fast_sd"]
    assert "child_images" in result.metrics and result.metrics["train_seconds"] == best["train_seconds"]


def test_the_bench_env_reward_is_the_tables(standin):
    table = bench.load(standin)
    env = gym.make("OptimizerSearch-Bench-v0", task_options={"table": str(standin)})
    assert env.unwrapped.depth == nos_gym.ENV_IDS["OptimizerSearch-Bench-v0"]["depth"] == 1
    vocab = env.unwrapped.vocab
    for program in Masker(get_space("small"), 1).sample_many(30, 1):
        env.reset()
        for tok in program.tokens:
            _, reward, terminated, _, info = env.step(vocab.index(tok))
        row = table.rows[program.canonical_key]
        assert terminated and reward == row["reward"]
        assert info["source"] in (row["source"], "cache") and info["metrics"]["child_images"] == row["child_images"]
        assert info["metrics"]["fast"] == row["fast_mean"]
    gym_check_env(gym.make("OptimizerSearch-Bench-v0", task_options={"table": str(standin)}).unwrapped)
    sb3_check_env(gym.make("OptimizerSearch-Bench-v0", task_options={"table": str(standin)}))


def test_the_bench_env_with_a_hurdle_and_as_a_vector_env(tmp_path, standin):
    envs = gym.make_vec("OptimizerSearch-Bench-v0", num_envs=8, vectorization_mode="vector_entry_point",
                        task_options={"table": str(standin)})
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        _, rewards, terminated, _, info = envs.step(np.array([rng.choice(np.flatnonzero(m))
                                                              for m in envs.unwrapped.action_masks()]))
    table = bench.load(standin)
    assert terminated.all() and rewards.tolist() == [table.rows[k]["reward"] for k in info["canonical_key"]]


@pytest.mark.parametrize("settings", [{"space": "full", "depth": 1}, {"space": "small", "depth": 2},
                                      {"space": "small", "depth": 1, "no_final_addition": False}])
def test_a_rule_the_table_lacks_raises_and_never_scores_zero(standin, settings):
    env = gym.make("OptimizerSearch-v0", task="nosbench", task_options={"table": str(standin)}, **settings)
    outside = {"space": "noise g id id mul", "depth": "g m id id sub r1 g id id mul",
               "no_final_addition": "g m id id add"}
    key = "no_final_addition" if "no_final_addition" in settings else ("depth" if settings["depth"] == 2 else "space")
    env.reset()
    vocab = env.unwrapped.vocab
    tokens = outside[key].split()
    for tok in tokens[:-1]:
        env.step(vocab.index(tok))
    with pytest.raises(RuleNotInTableError, match=r"not in the NOS-Bench table 'small1-rosenbrock', which covers "
                                                  r"space 'small' at depth 1"):
        env.step(vocab.index(tokens[-1]))


def test_summary_names_the_distribution_the_best_rules_and_a_hurdles_cuts(tmp_path, standin, capsys):
    text = summary(bench.load(standin), top=5)
    assert "4,320 canonical rules" in text and "at chance" in text and "above ADAM" in text
    assert text.count("\n     ") >= 5 and "fast (mean, sd)" in text
    assert f"  file {standin}\n" in text  # a table of the user's: its path
    shipped = summary(bench.load("small1-cifar10-cpu"), top=1)
    assert "  file shipped with nos_gym (small1-cifar10-cpu.csv.gz)\n" in shipped  # no machine's path in a report
    hand = summary(bench.load(hand_table(tmp_path / "h.csv.gz")), hurdle=0.3)
    assert "hurdle 0.3: cuts 1 rules at the sweep; 1 of the 50 best by reward are among them" in hand
    assert cli(["bench", str(standin), "-k", "3"]) == 0 and "small1-rosenbrock" in capsys.readouterr().out


def test_the_plot_of_a_table(tmp_path, standin, capsys):
    out = tmp_path / "rewards.png"
    assert cli(["bench", str(hand_table(tmp_path / "h.csv.gz")), "--hurdle", "0.3", "--plot", str(out)]) == 0
    assert f"plot: {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plot(bench.load(standin), str(tmp_path / "s.png")) == str(tmp_path / "s.png")


def test_the_bench_package_and_the_bench_env_load_no_torch(standin):
    code = ("import sys, gymnasium as gym, nos_gym\n"
            f"env = gym.make('OptimizerSearch-Bench-v0', task_options={{'table': {str(standin)!r}}})\n"
            "env.reset(); [env.step(env.unwrapped.vocab.index(t)) for t in 'g m id id sub'.split()]\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- the example
def test_the_maskable_ppo_example_prints_its_regret(standin):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "nosbench_maskable_ppo.py"), "--table",
                           str(standin), "--rules", "200", "--num-envs", "8"], capture_output=True, text=True,
                          timeout=300, env={"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    optimum = bench.load(standin).optimum()
    assert f"optimum {optimum:.4f}" in proc.stdout
    regret = float(proc.stdout.split("regret after 200 rules")[1].split(":")[1].split()[0])
    assert 0 <= regret <= optimum
