"""The reproduction benchmarks (benchmarks/): smoke presets end to end, their tables, figures and numbers."""

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import convnet_transfer  # noqa: E402
import rosenbrock_figure6  # noqa: E402
import wrn_transfer  # noqa: E402

from nos_gym.data import load_cifar10  # noqa: E402
from nos_gym.dsl import parse  # noqa: E402
from nos_gym.optim import table1  # noqa: E402
from nos_gym.tasks.convnet.grouped import train_children  # noqa: E402
from nos_gym.tasks.rosenbrock import START, rosenbrock, rosenbrock_grad  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def assert_png(path: Path, min_side: int = 200) -> None:
    """A real image: readable, big enough, not one flat colour."""
    assert path.exists() and path.stat().st_size > 5_000
    img = mpimg.imread(path)
    assert img.shape[0] >= min_side and img.shape[1] >= min_side
    assert float(img[..., :3].std()) > 0.02


# ------------------------------------------------------------------- Table 1 bookkeeping
def test_table1_metrics_follow_the_papers_definitions():
    run = _common.CurveRun("x", 0.1)
    for epoch, val, test in [(1, 0.50, 0.40), (2, 0.70, 0.61), (3, 0.70, 0.66), (4, 0.65, 0.64)]:
        run.add(epoch, val, test)
    m = _common.table1_metrics(run)
    assert (m.final_val, m.final_test) == (0.65, 0.64)
    # best val 0.70 first reached at epoch 2: Best Test is the test accuracy *there*, not the best test
    assert (m.best_val, m.best_test, m.best_epoch) == (0.70, 0.61, 2)


def test_select_run_picks_best_val_and_skips_diverged_runs():
    def run(lr, vals, diverged=False):
        r = _common.CurveRun("x", lr, diverged=diverged)
        for k, v in enumerate(vals):
            r.add(k + 1, v, v - 0.01)
        return r

    a, b, c = run(1e-3, [0.5, 0.6]), run(1e-2, [0.7, 0.55]), run(1e-1, [0.9], diverged=True)
    assert _common.select_run([a, b, c]).lr == 1e-2  # best val 0.70; the diverged 0.9 is not eligible
    assert _common.select_run([a, b, c], select="final").lr == 1e-3  # final val 0.60 > 0.55
    assert _common.select_run([c]).lr == 1e-1  # all diverged: still a row
    tie = run(1e-4, [0.7, 0.55])
    assert _common.select_run([b, tie]).lr == 1e-4  # equal numbers: the smaller rate


# ---------------------------------------------------------------------------- Rosenbrock
def test_rosenbrock_smoke_end_to_end(tmp_path):
    out = rosenbrock_figure6.main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress"])
    cfg, res = out["config"], out["results"]
    assert set(res) == {"PowerSign", "Adam", "SGD", "RMSProp", "Momentum"}
    f0 = rosenbrock(*START)
    for name, r in res.items():
        assert math.isfinite(r["best_loss"]) and r["best_loss"] < f0 / 5, name  # every one makes progress
        assert r["best_loss"] == min(v for v in r["final"].values() if math.isfinite(v))
    # Adam: every (eps, rate) pair was run
    assert len(res["Adam"]["final"]) == len(cfg["adam_eps"]) * len(cfg["learning_rates"])
    # the torch PowerSign and the language's rule (what the environment scores) agree
    assert out["powersign_rel_diff"] < 1e-9 and out["powersign_same_divergence"]

    main_table, eps_table, env_table = out["tables"]
    for name in res:
        assert f"| {name}" in main_table
    assert len(eps_table.splitlines()) == 2 + len(cfg["adam_eps"])
    assert len(env_table.splitlines()) == 2 + 5
    assert "wall time" in out["text"] and "preset: smoke" in out["text"]

    fig6 = out["figures"]["figure6"]
    assert len(fig6.axes) == 5
    for ax, name in zip(fig6.axes, rosenbrock_figure6.PANELS):
        assert ax.get_title().startswith(name)
        path = [ln for ln in ax.get_lines() if ln.get_label() == "path"]
        assert len(path) == 1 and len(path[0].get_xdata()) == cfg["iterations"] + 1
        assert ax.collections, "contour lines missing"
    curves = out["figures"]["loss_curves"]
    assert len(curves.axes) == 1 and len(curves.axes[0].get_lines()) == 5
    for key in ("figure6", "loss_curves"):
        assert_png(out["paths"][key])
    assert (tmp_path / "report.txt").read_text().startswith("Rosenbrock")


def test_rosenbrock_harness_matches_a_hand_written_gradient_descent():
    w = np.array(START)
    for _ in range(300):
        w = w - 1e-3 * np.array(rosenbrock_grad(w[0], w[1]))
    trace = rosenbrock_figure6.run_torch(rosenbrock_figure6.OPTIMIZERS["SGD"][0], [{"lr": 1e-3}], 300)
    np.testing.assert_allclose(trace[-1, 0], w, rtol=1e-12)


# -------------------------------------------------------------------------------- ConvNet
def test_convnet_smoke_end_to_end(tmp_path):
    out = convnet_transfer.main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress"])
    cfg, runs = out["config"], out["runs"]
    assert list(runs) == convnet_transfer.FIGURE5_RULES
    for rs in runs.values():
        assert [r.lr for r in rs] == cfg["lrs"]
        for r in rs:
            if not r.diverged:  # 1 epoch, 2 evaluations: at half an epoch and at the end
                assert r.epochs == [0.5, 1.0]
            assert all(0.0 <= v <= 1.0 for v in r.val + r.test)
    # some child learned something: above chance on 50 validation images
    assert max(max(r.val) for rs in runs.values() for r in rs if r.val) > 0.12
    table_lines = out["table"].splitlines()
    assert len(table_lines) == 2 + len(runs)
    for name, r in out["chosen"].items():
        m = _common.table1_metrics(r)
        row = next(line for line in table_lines if line.startswith(f"| {name} "))
        assert f"{100 * m.best_val:.1f}" in row and f"{100 * m.final_test:.1f}" in row
    assert len(out["lr_table"].splitlines()) == 2 + len(runs)

    fig5 = out["figures"]["figure5"]
    assert len(fig5.axes) == 2
    for ax, opt in zip(fig5.axes, ("optimizer_1", "optimizer_2")):
        labels = [ln.get_label().split(" ")[0] for ln in ax.get_lines()]
        assert sorted(labels) == sorted(["adam", "mom", "rmsprop", "sgd", opt])
    assert len(out["figures"]["all_rules"].axes[0].get_lines()) == len(runs)
    for key in ("figure5", "all_rules"):
        assert_png(out["paths"][key])
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert sum(len(v) for v in saved["runs"].values()) == len(runs) * len(cfg["lrs"])
    assert "device cpu" in out["text"] and "100 training images" in out["text"]


def test_convnet_curves_trainer_matches_the_grouped_trainer():
    """train_curves (with accuracy curves, dropping diverged children) == train_children at the end."""
    ds = load_cifar10(SHARED)
    train, val = ds.train.take(200), ds.val.take(100)
    exploding = parse("exp(g / v)")  # inf at the first step: dropped from the group at once
    programs = [parse("ADAM"), exploding, parse(table1()["powersign"]), parse("g")]
    lrs = [1e-3, 1e-2, 1e-2, 1e-1]
    ref = train_children(programs, lrs, train, val, epochs=2, batch_size=50)
    curves = convnet_transfer.train_curves(programs, lrs, train, val, ds.test.take(100), epochs=2, batch_size=50,
                                           evals_per_epoch=1, check_every=1)
    assert [c["diverged"] for c in curves] == ref.diverged.tolist() == [False, True, False, False]
    assert curves[1]["val"] == []
    for i in (0, 2, 3):
        assert curves[i]["epochs"] == [1.0, 2.0]
        # equal up to float rounding (a smaller group may pick other conv kernels): at most one image of 100
        assert curves[i]["val"][-1] == pytest.approx(float(ref.accuracy[i]), abs=0.0101)


def test_convnet_table_covers_all_twenty_rows_with_the_cpu_preset_grid():
    cfg = convnet_transfer.PRESETS["cpu"]
    assert cfg["rules"] == "all" and len(table1()) == 20
    assert cfg["lrs"] == [10.0 ** i for i in range(-5, 2)]  # 7 rates on a log grid, as the paper


# ------------------------------------------------------------------------------------ WRN
def test_wrn_architecture():
    assert sum(p.numel() for p in wrn_transfer.WideResNet(28, 10).parameters()) == pytest.approx(36.5e6, rel=0.01)
    assert wrn_transfer.WideResNet(16, 4).name == "WRN-16-4"
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wrn_transfer.WideResNet(27, 10)


def test_wrn_smoke_stop_and_resume(tmp_path):
    full = wrn_transfer.main(["--preset", "smoke", "--out", str(tmp_path / "full"), "--no-progress"])
    cfg = full["config"]
    assert full["complete"] and full["architecture"] == "WRN-10-1" and "WRN-10-1" in full["text"]
    n_runs = len(cfg["rules"]) * len(cfg["lrs"])
    assert sum(len(v) for v in full["runs"].values()) == n_runs
    for rs in full["runs"].values():
        for r in rs:
            assert r.diverged or r.epochs == [1.0, 2.0]
    assert len(full["table"].splitlines()) == 2 + len(cfg["rules"])
    assert "92.0" in full["table"]  # the paper's SGD Final Val beside ours
    fig = full["figures"]["figure7"]
    assert len(fig.axes) == 2
    # smoke trains sgd and optimizer_1: panel 1 has both curves, panel 2 (optimizer_2) only sgd
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 1]
    assert_png(full["paths"]["figure7"])

    # 3 epochs: the first run (2 epochs) and half of the second, then stop ...
    part = tmp_path / "part"
    stopped = wrn_transfer.main(["--preset", "smoke", "--out", str(part), "--no-progress", "--stop-after", "3"])
    assert not stopped["complete"] and (part / "checkpoint.pt").exists()
    assert sum(len(v) for v in stopped["runs"].values()) == 1 and "--resume" in stopped["text"]
    # ... and resume: the same curves as the uninterrupted invocation, to the last digit
    resumed = wrn_transfer.main(["--preset", "smoke", "--out", str(part), "--no-progress", "--resume"])
    assert resumed["complete"] and not (part / "checkpoint.pt").exists()
    for name, rs in full["runs"].items():
        assert [r.to_dict() for r in resumed["runs"][name]] == [r.to_dict() for r in rs]


def test_env_throughput_pieces_measure_real_work():
    import env_throughput

    rows = env_throughput.env_steps(episodes=40, depth=2, num_envs=8)
    assert len(rows) == 3 and all(rate > 100 for _, rate in rows)
    programs = env_throughput.random_programs(16, depth=2, seed=1)
    _, _, one = env_throughput.batched_seconds(programs, iterations=60)
    _, _, split = env_throughput.parallel_seconds(programs, iterations=60, workers=2)
    deterministic = [i for i, p in enumerate(programs) if not p.stochastic]
    assert len(deterministic) >= 3
    # splitting the batch over processes does not change a deterministic rule's score
    assert [split[i] for i in deterministic] == [one[i] for i in deterministic]
    assert len(set(one)) > 3


def test_device_check_passes_its_dry_run_on_cpu(capsys):
    import device_check

    assert device_check.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "3 of 3 checks passed" in out


# ------------------------------------------------------------------- portability (issue 10)
def test_portability_scores_are_repeatable_and_compared_per_kernel_set(capsys):
    import portability

    first, again = portability.score(4, 0), portability.score(4, 0)
    assert first == again  # one kernel set: bit-identical
    assert set(first) == {"rosenbrock", "rosenbrock-native", "quadratic"} and len(first["rosenbrock"]) >= 4 + 8
    assert all(0.0 <= r <= 1.0 for r in first["rosenbrock"].values())
    assert first["rosenbrock-native"].keys() == first["rosenbrock"].keys()
    # the native kernel built for SSE2 only and for AVX2 scores exactly as the host's build
    builds = portability.native_builds(6, 0)
    assert set(builds) == set(portability.NATIVE_ARCHS)
    assert builds["x86-64"] == builds["x86-64-v3"] == builds["native"] and len(builds["native"]) == 6
    c = portability.compare(first["rosenbrock"], {k: v + (0.05 if i == 0 else 0.0)
                                                  for i, (k, v) in enumerate(first["rosenbrock"].items())})
    assert (c["identical"], c["over_1e-2"], round(c["max"], 9)) == (c["rules"] - 1, 1, 0.05)
    assert "default" in portability.available_capabilities()


# --------------------------------------------------------------- agents_compare (issue 13)
def test_agents_compare_runs_variants_and_reports_each(tmp_path, capsys):
    import agents_compare

    out = tmp_path / "cmp"
    results = agents_compare.main(["--agents", "random_search", "trpo_lstm_risk", "--seeds", "1",
                                   "--total-rules", "40", "--num-envs", "20", "--depth", "1", "--space", "small",
                                   "--task-options", "{iterations: 100}", "--out", str(out)])
    assert set(results) == {"random_search", "trpo_lstm_risk"}
    for runs in results.values():
        assert len(runs[1]["rewards"]) == 40 and 0 <= runs[1]["top_mean"] <= runs[1]["best"] <= 1
    updates = (out / "runs" / "trpo_lstm_risk-s1" / "updates.jsonl").read_text().splitlines()
    assert all(json.loads(u)["kept"] < 20 for u in updates)  # the risk-seeking variant really ran
    table = (out / "table.md").read_text()
    assert "| trpo_lstm_risk |" in table and "threshold (samples to reach)" in table
    assert (out / "figure4.png").stat().st_size > 1000


# --------------------------------------------------------------- controller_study (session 5)
def test_controller_study_reports_each_setting_with_its_policy_trace(tmp_path, capsys):
    import controller_study

    assert controller_study.learning([0.0] * 5 + [1.0] * 5) == 1.0
    rows = controller_study.main(["--max-kl", "0.01", "0.3", "--baselines", "ema", "--seeds", "1", "--total-rules",
                                  "80", "--task-options", "{iterations: 100}", "--out", str(tmp_path)])
    assert list(rows) == ["ema max_kl 0.01", "ema max_kl 0.3", "random search"]
    small, large = rows["ema max_kl 0.01"], rows["ema max_kl 0.3"]
    assert small["accepted"][0] > 0 and large["accepted"][0] > 0
    # the trust region is what it says: a larger max_kl takes larger accepted steps, and moves the policy more
    assert small["kl"][0] <= 0.01 + 1e-6 < large["kl"][0]
    assert large["entropy_first"][0] - large["entropy_last"][0] > abs(small["entropy_first"][0] - small["entropy_last"][0])
    assert "kl" not in rows["random search"]
    assert (tmp_path / "reward_curves.png").stat().st_size > 10_000
    assert "| ema max_kl 0.3 |" in (tmp_path / "table.md").read_text()


# --------------------------------------------------------------- seed_compare (session 5)
def test_seed_compare_pairs_rules_by_child_seed(tmp_path, capsys):
    import seed_compare

    # a rule 0.01 above the reference at every seed, under a seed effect of +-0.05 shared by both
    shift = [0.05, -0.05, 0.03, -0.02]
    for s, e in enumerate(shift):
        (tmp_path / f"fast-s{s}.json").write_text(json.dumps(
            [{"rule": "ADAM", "reward": 0.58 + e}, {"rule": "cand", "reward": 0.59 + e}]))
    rows = {r["rule"]: r for r in seed_compare.main([str(tmp_path)])}
    cand = rows["cand"]
    assert cand["wins"] == 4 and abs(cand["diff"] - 0.01) < 1e-12
    assert cand["paired_se"] < 1e-9 < cand["unpaired_se"]  # the seed effect cancels only when paired
    assert abs(seed_compare.sign_test_p(4, 4) - 1 / 16) < 1e-12
    assert "| `cand` | 0.5925 |" in capsys.readouterr().out
    (tmp_path / "fast-s9.json").write_text(json.dumps([{"rule": "ADAM", "reward": 0.5}]))
    with pytest.raises(SystemExit, match="missing"):
        seed_compare.main([str(tmp_path)])


def test_bench_agents_without_a_table_says_so_in_one_line(tmp_path):
    import bench_agents

    with pytest.raises(SystemExit, match=r"^error: no NOS-Bench table file at .*missing\.csv\.gz .*nos-gym tabulate"):
        bench_agents.main(["--envs", "OptimizerSearch-Bench-v0", "--table", str(tmp_path / "missing.csv.gz"),
                           "--out", str(tmp_path / "out")])


def test_provenance_names_the_commit_and_sees_an_uncommitted_change(tmp_path, monkeypatch):
    import subprocess

    from nos_gym.evaluation import provenance

    repo = tmp_path / "repo"
    (repo / "nos_gym").mkdir(parents=True)
    (repo / "nos_gym" / "a.py").write_text("x = 1\n")
    (repo / "benchmarks" / "out").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    for argv in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run(git + argv, check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(provenance, "ROOT", repo)
    assert provenance.git_commit() == (head, False)
    (repo / "benchmarks" / "out" / "t.md").write_text("output\n")  # an output, excluded below
    assert provenance.git_commit(("nos_gym", "benchmarks"), exclude=("benchmarks/out",)) == (head, False)
    (repo / "nos_gym" / "a.py").write_text("x = 2\n")
    assert provenance.git_commit() == (head, True)
    monkeypatch.setattr(provenance, "ROOT", tmp_path / "not-a-checkout")
    assert provenance.git_commit() == (None, None)
    # an installed package in a venv inside the checkout: git would answer for the enclosing clone
    site = repo / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(provenance, "ROOT", site)
    assert provenance.git_commit() == (None, None)


# --------------------------------------------------------------- bench_agents (issue 22)
def test_bench_agents_statistics_are_the_textbook_ones():
    import bench_agents

    # Mann-Whitney: no overlap at n = 5 + 5 gives U = 0 (x below y), z = -2.611, p = 0.0090
    u, p = bench_agents.mann_whitney([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert u == 0 and p == pytest.approx(0.00903, abs=1e-4)
    assert bench_agents.mann_whitney([1.0] * 4, [1.0] * 4) == (8.0, 1.0)  # all tied: nothing to tell
    lo, hi = bench_agents.bootstrap_median_diff([2.0] * 10, [1.0] * 10)
    assert lo == hi == 1.0
    assert bench_agents.parse_seeds(["0-2", "7", "100-101"]) == [0, 1, 2, 7, 100, 101]
    record = {"rewards": [0.1, 0.5, 0.5, 1.0, 0.2], "key_ids": [0, 1, 1, 2, 3], "seconds": 10.0}
    s = bench_agents.summarize(record, 3, optimum=1.0, k=2)  # the first 3 samples: two distinct rules
    assert (s["best"], s["regret"], s["top_mean"], s["to_optimum"], s["distinct"]) == (0.5, 0.5, 0.3, None, 2)
    assert bench_agents.summarize(record, 5, optimum=1.0, k=2)["to_optimum"] == 4
    configs = bench_agents.draw_configs("evolution", 6, seed=0)
    assert configs[0] == {} and len({json.dumps(c, sort_keys=True) for c in configs}) == 6
    assert all(c["tournament_size"] <= c["population_size"] for c in configs[1:])
    assert bench_agents.draw_configs("evolution", 6, seed=0) == configs  # the draw is reproducible


def test_bench_agents_smoke_runs_every_agent_and_resumes(tmp_path, capsys):
    import bench_agents

    out = tmp_path / "bench"
    results = bench_agents.main(["--smoke", "--out", str(out)])
    env = "OptimizerSearch-RosenbrockSmall-v0"
    numbers = results[env]["numbers"]
    assert set(numbers) == {"40", "60"} and set(numbers["60"]) == set(bench_agents.DEFAULT_AGENTS)
    for runs in numbers["60"].values():
        assert len(runs) == 2 and all(0 <= r["top_mean"] <= r["best"] <= 1 and r["distinct"] <= 60 for r in runs)
    record = json.loads((out / env / "trpo_lstm_pqt" / "s1.json").read_text())
    assert record["flags"] == ["--preset", "pqt"] and len(record["rewards"]) == 60 and record["budget"] == 60
    table = (out / "table.md").read_text()
    assert "| trpo_lstm_hybrid " in table and "| sb3_trpo " in table and "Mann-Whitney p" in table
    assert_png(out / f"{env}.png")
    # resumable per (agent, seed): a finished run is not run again, a missing one is
    stamp = (out / env / "evolution" / "s0.json").stat().st_mtime_ns
    (out / env / "random_search" / "s1.json").unlink()
    capsys.readouterr()
    bench_agents.main(["--smoke", "--out", str(out), "--agents", "evolution", "random_search", "--no-plot"])
    assert (out / env / "evolution" / "s0.json").stat().st_mtime_ns == stamp
    assert "0 runs finished before" not in capsys.readouterr().err
    assert (out / env / "random_search" / "s1.json").exists()
    # a run made with other settings (an agent's defaults changed since) is run again
    path = out / env / "evolution" / "s1.json"
    record = json.loads(path.read_text())
    assert record["settings"]["population_size"] == 10  # the smoke setting, resolved
    record["settings"]["population_size"] = 11
    path.write_text(json.dumps(record))
    bench_agents.main(["--smoke", "--out", str(out), "--agents", "evolution", "--no-plot"])
    assert json.loads(path.read_text())["settings"]["population_size"] == 10
    assert (out / env / "evolution" / "s0.json").stat().st_mtime_ns == stamp


def test_bench_agents_tuning_protocol_reports_only_fresh_seeds(tmp_path):
    import bench_agents

    out = tmp_path / "tune"
    ref = tmp_path / "reference.json"
    results = bench_agents.main(["--smoke", "--tune", "--agents", "evolution", "--seeds", "100-101",
                                 "--out", str(out), "--no-plot", "--write-reference", str(ref)])
    env = results["OptimizerSearch-RosenbrockSmall-v0"]
    for agent in ("trpo_lstm", "evolution"):
        tried = env["tuning"][agent]["tried"]
        assert len(tried) == 2 and tried[0]["config"] == {}  # the same number of configurations for both
        assert all(set(t["per_seed"]) == {"0", "1"} for t in tried)  # tuned on seeds 0-1 (smoke)
    assert set(env["numbers"]["60"]) == {"evolution", "tuned_trpo_lstm", "tuned_evolution"}
    runs = sorted(p.name for p in (out / "OptimizerSearch-RosenbrockSmall-v0" / "tuned_evolution").iterdir())
    assert runs == ["s100.json", "s101.json"]  # reported on the fresh seeds only
    text = (out / "tune.md").read_text()
    assert "### tuning on" in text and "vs tuned_evolution" in text
    assert json.loads((out / "tune.json").read_text())["protocol"]["tune_seeds"] == [0, 1]
    # the reference medians a finished run is set beside: the tuned agents and evolution, per budget
    entry = json.loads(ref.read_text())["envs"][0]
    assert entry["env_id"] == "OptimizerSearch-RosenbrockSmall-v0" and entry["seeds"] == "2 seeds, 100-101"
    assert set(entry["budgets"]["60"]) == {"regularized evolution, tuned", "regularized evolution",
                                           "TRPO-LSTM, tuned"}
    tuned = entry["budgets"]["60"]["regularized evolution, tuned"]
    assert tuned["runs"] == 2 and tuned["top_mean"][0] <= tuned["top_mean"][1] <= tuned["top_mean"][2]


def test_bench_agents_on_a_nosbench_table_reports_regret_to_its_optimum(tmp_path):
    """OptimizerSearch-Bench-v0 on a stand-in table (the small space at depth 1 tabulated on a short
    Rosenbrock): the optimum is the table's best reward, and the regret is measured against it."""
    import bench_agents

    from nos_gym import bench
    from nos_gym.evaluation.tabulate import tabulate

    table = tmp_path / "small1-standin.csv.gz"
    tabulate("rosenbrock", {"iterations": 50}, space="small", depth=1, out=table, store=tmp_path / "s.sqlite",
             name="small1-standin", backend="serial", progress=False, log=None)
    optimum = bench.load(table).optimum()
    results = bench_agents.main(["--envs", "OptimizerSearch-Bench-v0", "--table", str(table), "--agents",
                                 "evolution", "trpo_lstm_pqt", "random_search", "--seeds", "0-1", "--budgets", "40",
                                 "--num-envs", "20", "--out", str(tmp_path / "out"), "--no-plot",
                                 "--set", "evolution.population_size=10", "--set", "evolution.tournament_size=3"])
    env = results["OptimizerSearch-Bench-v0"]
    assert env["optimum"] == pytest.approx(optimum)
    for runs in env["numbers"]["40"].values():
        for r in runs:
            assert r["regret"] == pytest.approx(optimum - r["best"], abs=1e-6) and r["regret"] >= 0
    text = (tmp_path / "out" / "table.md").read_text()
    assert "regret vs evolution" in text and "the best reward of table small1-standin" in text


def test_wrn_takes_a_rule_in_the_papers_notation(tmp_path):
    out = wrn_transfer.main(["--preset", "smoke", "--out", str(tmp_path / "w"), "--no-progress",
                             "--rules", "drop(RMSProp, 0.3) + sign(m)", "--epochs", "1"])
    assert out["complete"] and set(out["runs"]) == {"drop(RMSProp, 0.3) + sign(m)"}
    assert "NOSOptimizer('drop(RMSProp, 0.3) + sign(m)')" == wrn_transfer.optimizer_label("drop(RMSProp, 0.3) + sign(m)")
    with pytest.raises(SystemExit, match="neither a Table 1 name"):
        wrn_transfer.main(["--preset", "smoke", "--out", str(tmp_path / "x"), "--rules", "bogus("])


def test_bench_agents_smoke_shrinks_rosenbrock_only(tmp_path):
    import bench_agents
    from test_bench import hand_table

    table = hand_table(tmp_path / "hand.csv.gz")
    a = bench_agents.parse_cli(["--smoke", "--envs", "OptimizerSearch-RosenbrockSmall-v0", "OptimizerSearch-Bench-v0",
                                "--table", str(table)])
    rosenbrock, nosbench = bench_agents.env_specs(a)
    assert rosenbrock.task_options == {"iterations": 100}
    assert nosbench.task_options == {"table": str(table)}  # the table task takes no iterations
    assert nosbench.optimum == 0.45


def test_precision_ranking_draws_its_table_sample_reproducibly_with_the_tables_rewards():
    import precision_ranking

    from nos_gym.bench import table as bench_table

    texts, shipped = precision_ranking.table_sample(12)
    assert texts[:3] == [str(parse(t)) for t in precision_ranking.ANCHORS.values()]
    assert len(texts) == 15 and len({parse(t).canonical_key for t in texts}) == 15
    assert (texts, shipped) == precision_ranking.table_sample(12)  # seeded
    assert texts != precision_ranking.table_sample(12, seed=1)[0]
    table = bench_table.load()
    for text, reward in shipped.items():
        assert table[text]["source"] == "trained" and table[text]["reward"] == reward
    with pytest.raises(SystemExit, match="trained rows"):
        precision_ranking.table_sample(10 ** 6)


def test_precision_ranking_bootstrap_interval_brackets_tau():
    import precision_ranking

    from nos_gym.tasks.convnet.fidelity import kendall_tau

    x = list(range(30))
    y = [v + (3 if v % 4 == 0 else 0) for v in x]  # a few swaps: tau below 1
    low, high = precision_ranking.bootstrap_tau(x, y, reps=300)
    assert low <= kendall_tau(x, y) <= high < 1.0 + 1e-12 and low > 0.5
    assert precision_ranking.bootstrap_tau(x, x, reps=50) == (1.0, 1.0)


def test_precision_ranking_report_compares_each_ceiling_with_fp32():
    import precision_ranking as pr

    texts = [f"g * {k}" for k in range(1, 9)]
    base = [0.1, 0.1, 0.12, 0.3, 0.4, 0.5, 0.55, 0.6]
    columns = {"fp32": base, "bf16": base, pr.SEED1: base[::-1], pr.AVX2: base}  # seed 1: every pair reversed
    scores = {(t, v): {"reward": col[i], "lr": 0.01, "seconds": 1.0} for v, col in columns.items()
              for i, t in enumerate(texts)}
    out = pr.report(texts, scores)
    assert "fp32 vs fp32 on AVX2 kernels (other rounding, same seed): Kendall tau-b 1.000" in out
    from nos_gym.tasks.convnet.fidelity import kendall_tau

    reversed_tau = kendall_tau(base, base[::-1])
    assert reversed_tau < -0.9
    assert f"fp32 vs fp32 at child seed 1 (other weights and minibatches): Kendall tau-b {reversed_tau:.3f}" in out
    assert "equal scores 8/8" in out
    del scores[(texts[0], pr.AVX2)]  # a ceiling is reported only once every rule has its score
    assert "AVX2 kernels" not in pr.report(texts, scores)
    assert pr.VARIANTS[pr.AVX2][2] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert pr.order_text({"SGD": 0.49, "Adam": 0.5735, "PowerSign": 0.5735}) == "Adam = PowerSign > SGD"


def test_child_throughput_block_part_times_both_blocks_in_both_storages(capsys):
    import child_throughput

    from nos_gym.tasks.convnet.native import available

    assert available(), "the native block must build on the test machines (a C++ compiler is a dev requirement)"
    child_throughput.block_table(rounds=1, reps=1, batch=4, channels=8)
    out = capsys.readouterr().out
    for block in ("block 1 (32x32)", "block 2 (16x16)"):
        assert f"{block}  float32" in out and f"{block}  bfloat16" in out and f"{block}: bf16 is" in out


def test_child_throughput_unpacks_an_older_commit_into_a_new_folder(tmp_path):
    import child_throughput

    code = child_throughput.baseline_code("HEAD", tmp_path / "also" / "deeper")  # --also's folder need not exist
    assert (code / "nos_gym" / "tasks" / "convnet" / "grouped.py").is_file()
    with pytest.raises(SystemExit, match="cannot read commit"):
        child_throughput.baseline_code("no-such-rev", tmp_path / "x")
