"""Runs: config loading and its errors, resume, Ctrl-C, the log and the top-k."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nos_gym.agents import ConfigError, load_agent, parse_args, read_log, top_rules
from nos_gym.agents.runs import format_top

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--task", "rosenbrock", "--task-options", "{iterations: 200}", "--no-progress", "--num-envs", "8"]


@pytest.fixture(scope="module")
def trpo():
    return load_agent("trpo_lstm")


def strings(records):
    return [(r["sample"], r["batch"], tuple(r["tokens"]), r["reward"]) for r in records]


# ------------------------------------------------------------------------------ config
def test_the_papers_controller_is_one_flag_away(trpo):
    args, resume = parse_args(trpo.Args, [], agent="trpo_lstm")
    assert resume is None and args.task == "rosenbrock"
    assert (args.hidden_size, args.pqt_k, args.evolution_fraction) == (64, 10, 0.5)  # the tuned defaults
    paper, _ = parse_args(trpo.Args, ["--preset", "paper"], agent="trpo_lstm")
    assert (paper.hidden_size, paper.init_scale, paper.entropy_coef, paper.baseline, paper.max_kl) == \
        (150, 0.08, 0.0015, "ema", 0.01)
    assert (paper.pqt_k, paper.evolution_fraction) == (0, 0.0)


def test_config_file_then_flags(trpo, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("agent: trpo_lstm\nmax_kl: 0.05\nnum_envs: 12\ntask_options: {iterations: 100}\n")
    args, _ = parse_args(trpo.Args, ["--config", str(cfg), "--num-envs", "7"], agent="trpo_lstm")
    assert args.max_kl == 0.05 and args.num_envs == 7 and args.task_options == {"iterations": 100}
    args, _ = parse_args(trpo.Args, ["--config", str(cfg), "--no-reuse-result", "--max_kl", "1e-3"], agent="trpo_lstm")
    assert args.reuse_result is False and args.max_kl == 0.001 and args.num_envs == 12


def test_paper_config_loads(trpo):
    args, _ = parse_args(trpo.Args, ["--config", str(ROOT / "configs" / "paper.yaml")], agent="trpo_lstm")
    assert args.num_envs == 5                   # the paper's minibatch of 5 rules
    assert args.entropy_coef == 0.0015 and args.hidden_size == 150 and args.init_scale == 0.08
    assert args.task == "convnet-cifar10" and args.task_options["preset"] == "paper"


@pytest.mark.parametrize("text, words", [
    ("max_kll: 0.1\n", ["'max_kll'", "did you mean 'max_kl'", "allowed keys", "entropy_coef"]),
    ("total_rules: many\n", ["'total_rules'", "expects int", "str"]),
    ("entropy_coef: true\n", ["'entropy_coef'", "expects float", "bool"]),
    ("task: cifar\n", ["'task'", "'cifar'", "rosenbrock", "quadratic", "convnet-cifar10"]),
    ("space: huge\n", ["'space'", "'huge'", "full", "small"]),
    ("agent: alphazero\n", ["'agent'", "'alphazero'", "trpo_lstm", "random_search"]),
    ("agent: evolution\n", ["'agent'", "'evolution'", "trpo_lstm"]),
    ("max_kl: -1\n", ["'max_kl'", "-1"]),
    ("task_options: 3\n", ["'task_options'", "expects dict"]),
    ("- a list\n", ["mapping"]),
])
def test_bad_config_names_the_key_and_the_allowed_values(trpo, tmp_path, text, words):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_args(trpo.Args, ["--config", str(cfg)], agent="trpo_lstm")
    for w in words:
        assert w in str(e.value)


def test_bad_flag_stops_with_a_usage_message(trpo, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(trpo.Args, ["--max-kl", "big"], agent="trpo_lstm")
    assert e.value.code == 2
    assert "--max-kl" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'task'.*allowed values"):
        parse_args(trpo.Args, ["--task", "mnist"], agent="trpo_lstm")


def test_bad_config_stops_the_script_at_once(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rate: 0.1\n")  # a REINFORCE setting, not TRPO's
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "agents" / "trpo_lstm.py"), "--config", str(cfg),
                           "--runs-root", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'learning_rate'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started
    assert time.time() - t0 < 60


def test_run_dir_that_holds_a_run_is_not_overwritten(trpo, tmp_path):
    run_dir = tmp_path / "r"
    args = FAST + ["--total-rules", "8", "--run-dir", str(run_dir), "--store", str(tmp_path / "s.sqlite")]
    trpo.main(args)
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        trpo.main(args)


# ------------------------------------------------------------------------------ resume
def test_resume_continues_the_log_and_scores_no_rule_twice(trpo, tmp_path):
    # reference: one uninterrupted run of 5 batches
    full = tmp_path / "full"
    trpo.main(FAST + ["--total-rules", "40", "--seed", "3", "--run-dir", str(full),
                      "--store", str(tmp_path / "full.sqlite")])
    # the same run stopped after 2 batches ...
    part = tmp_path / "part"
    store = str(tmp_path / "part.sqlite")
    trpo.main(FAST + ["--total-rules", "16", "--seed", "3", "--run-dir", str(part), "--store", store])
    assert len(read_log(part)) == 16
    # ... whose log got one batch ahead of its checkpoint and a half-written line (a kill mid-batch)
    with (part / "log.jsonl").open("a") as f:
        for r in read_log(part)[-8:]:
            f.write(json.dumps({**r, "sample": r["sample"] + 8, "batch": 2}) + "\n")
        f.write('{"sample": 24, "bat')
    # ... resumed to the full budget
    run = trpo.main(["--resume", str(part), "--total-rules", "40"])
    assert run.resumed
    resumed = read_log(part)
    reference = read_log(full)
    assert strings(resumed) == strings(reference)      # continues exactly where it stopped
    fresh = [r["key"] for r in resumed if not r["cached"]]
    assert len(fresh) == len(set(fresh))               # no rule scored twice, across the resume
    assert set(fresh) == {r["key"] for r in resumed}
    ckpt = torch.load(part / "checkpoint.pt", weights_only=False)
    assert ckpt["batch"] == 5 and ckpt["samples"] == 40
    assert [json.loads(x)["batch"] for x in (part / "updates.jsonl").read_text().splitlines()] == list(range(5))


def test_resume_refuses_to_change_the_search(trpo, tmp_path):
    run_dir = tmp_path / "r"
    trpo.main(FAST + ["--total-rules", "8", "--run-dir", str(run_dir), "--store", str(tmp_path / "s.sqlite")])
    with pytest.raises(ConfigError, match="cannot change \\['max_kl'\\]"):
        trpo.main(["--resume", str(run_dir), "--max-kl", "0.5"])
    with pytest.raises(ConfigError, match="no config.yaml"):
        trpo.main(["--resume", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_and_exits_128_plus_the_signal(trpo, tmp_path, sig, code):
    run_dir = tmp_path / "r"
    store = str(tmp_path / "s.sqlite")
    cmd = [sys.executable, str(ROOT / "agents" / "trpo_lstm.py")] + FAST + [
        "--total-rules", "100000", "--run-dir", str(run_dir), "--store", store]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            log = run_dir / "log.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= 16:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run logged nothing in 90 s")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err  # stopped by a signal is not a finished run (issue 10): 128 + it, saved
    assert "Traceback" not in err
    assert f"--resume {run_dir}" in err
    records = read_log(run_dir)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["samples"] == len(records) >= 16 and len(records) % 8 == 0  # stopped after a whole batch
    assert "rank" in out and (run_dir / "top.txt").read_text().strip()
    # and it continues from there
    n = len(records)
    run = trpo.main(["--resume", str(run_dir), "--total-rules", str(n + 8)])
    records = read_log(run_dir)
    assert [r["sample"] for r in records] == list(range(n + 8)) and run.samples == n + 8
    fresh = [r["key"] for r in records if not r["cached"]]
    assert len(fresh) == len(set(fresh))


def test_a_run_written_before_the_run_directory_split_resumes(tmp_path):
    """tests/data/run_before_rundir: 16 rules of an evolution run written by nos-gym before ``Run`` was
    split into ``RunDir`` (the directory) and ``Run`` (the search). Killed mid-line, then resumed to 32
    rules, it continues as the same run started afresh does."""
    evolution = load_agent("evolution")
    old = tmp_path / "old"
    shutil.copytree(ROOT / "tests" / "data" / "run_before_rundir", old)
    config = old / "config.yaml"
    config.write_text(config.read_text().replace("/tmp/nos-gym-before-split/store.sqlite", str(tmp_path / "old.sqlite"))
                      .replace("/tmp/nos-gym-before-split/run", str(old)))
    before = (old / "log.jsonl").read_bytes()
    with (old / "log.jsonl").open("a") as f:
        f.write('{"sample": 16, "bat')
    run = evolution.main(["--resume", str(old), "--total-rules", "32"])
    assert run.resumed and run.samples == 32
    assert (old / "log.jsonl").read_bytes().startswith(before)  # its 16 records, byte for byte
    fresh = tmp_path / "fresh"
    evolution.main(FAST + ["--space", "small", "--seed", "5", "--population-size", "8", "--tournament-size", "3",
                           "--total-rules", "32", "--run-dir", str(fresh), "--store", str(tmp_path / "fresh.sqlite")])
    resumed, reference = read_log(old), read_log(fresh)
    assert [(r["sample"], r["batch"], r["tokens"]) for r in resumed] == [(r["sample"], r["batch"], r["tokens"])
                                                                         for r in reference]
    assert [r["reward"] for r in resumed] == pytest.approx([r["reward"] for r in reference], rel=1e-6)
    assert [json.loads(x)["batch"] for x in (old / "updates.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    ckpt = torch.load(old / "checkpoint.pt", weights_only=False)
    assert (ckpt["format"], ckpt["batch"], ckpt["samples"]) == (2, 4, 32)


# ------------------------------------------------------------------------- log, top-k
def test_top_rules_are_distinct_and_ranked():
    recs = [{"sample": i, "key": k, "reward": r, "rule": k.upper(), "tokens": [k]}
            for i, (k, r) in enumerate([("a", 0.5), ("b", 0.9), ("a", 0.5), ("c", 0.9), ("d", 0.1)])]
    top = top_rules(recs, 3)
    assert [(t["key"], t["rank"], t["count"]) for t in top] == [("b", 1, 1), ("c", 2, 1), ("a", 3, 2)]
    text = format_top(top)
    assert text.splitlines()[1].split() == ["1", "0.9000", "1", "B"]


def test_run_directory_contents(trpo, tmp_path):
    run_dir = tmp_path / "r"
    trpo.main(FAST + ["--total-rules", "16", "--run-dir", str(run_dir), "--store", str(tmp_path / "s.sqlite")])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["agent"] == "trpo_lstm" and saved["num_envs"] == 8 and saved["task_options"] == {"iterations": 200}
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert set(ckpt["state"]) == {"policy", "generator", "baseline", "queue", "guide"}  # the tuned defaults: PQT, guided evolution
    assert set(ckpt["global_rng"]) == {"python", "numpy", "torch"}
    top = json.loads((run_dir / "top.json").read_text())
    txt = (run_dir / "top.txt").read_text()
    assert top[0]["rule"] in txt
    assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())


@pytest.mark.parametrize("agent", ["random_search", "reinforce_lstm", "evolution", "maskable_ppo"])
def test_every_agent_resumes_where_it_stopped(agent, tmp_path):
    module = load_agent(agent)
    extra = {"evolution": ["--population-size", "8", "--tournament-size", "3"],
             "maskable_ppo": ["--batch-size", "40"]}.get(agent, [])
    common = FAST + ["--space", "small", "--seed", "4"] + extra
    module.main(common + ["--total-rules", "40", "--run-dir", str(tmp_path / "full"),
                          "--store", str(tmp_path / "full.sqlite")])
    module.main(common + ["--total-rules", "16", "--run-dir", str(tmp_path / "part"),
                          "--store", str(tmp_path / "part.sqlite")])
    module.main(["--resume", str(tmp_path / "part"), "--total-rules", "40"])
    resumed, reference = read_log(tmp_path / "part"), read_log(tmp_path / "full")
    assert strings(resumed) == strings(reference)
    # each distinct rule settled once (trained or by the evaluator's funnel), then read back
    settled = [r["key"] for r in resumed if r["source"] in ("trained", "fingerprint", "screen")]
    assert len(settled) == len(set(settled)) == len({r["key"] for r in resumed})


def test_rosenbrock_config_is_the_default_run(trpo):
    from_file, _ = parse_args(trpo.Args, ["--config", str(ROOT / "configs" / "rosenbrock.yaml")], agent="trpo_lstm")
    assert from_file == trpo.Args()


def test_paper_reinforce_config_loads():
    reinforce = load_agent("reinforce_lstm")
    args, _ = parse_args(reinforce.Args, ["--config", str(ROOT / "configs" / "paper_reinforce.yaml")],
                         agent="reinforce_lstm")
    assert (args.learning_rate, args.num_envs, args.entropy_coef) == (1e-5, 5, 0.0015)


def test_cifar_configs_load_and_a_tiny_cifar_cpu_search_runs_and_promotes(trpo, tmp_path, capsys):
    """configs/cifar_cpu.yaml as written, then the same run shrunk to the "ci" preset and 20 rules
    (still halving and a hurdle), then `nos-gym promote` of its best rules."""
    from nos_gym.cli import main as cli

    cpu, _ = parse_args(trpo.Args, ["--config", str(ROOT / "configs" / "cifar_cpu.yaml")], agent="trpo_lstm")
    assert cpu.task == "convnet-cifar10" and cpu.backend == "process" and cpu.num_envs == 20
    # its controller is the setting the tuning protocol chose on NOS-Bench (benchmarks/out/bench_agents/tune.json)
    tune = json.loads((ROOT / "benchmarks/out/bench_agents/tune.json").read_text())
    chosen = {**dataclasses.asdict(trpo.Args()), **tune["envs"]["OptimizerSearch-Bench-v0"]["tuning"]["trpo_lstm"]["config"]}
    knobs = ("max_kl", "baseline", "baseline_decay", "entropy_coef", "hidden_size", "pqt_k", "pqt_weight",
             "evolution_fraction", "init_scale")
    assert {k: getattr(cpu, k) for k in knobs} == {k: chosen[k] for k in knobs}
    assert cpu.task_options == {"preset": "cpu", "schedule": "halving", "hurdle": 0.277}
    gpu = yaml.safe_load((ROOT / "configs" / "cifar_gpu.yaml").read_text())
    assert gpu["task_options"]["preset"] == "paper" and gpu["agent"] == "trpo_lstm"

    assert cpu.promote == {"preset": "fast", "top": 10, "seeds": [0, 1, 2]}

    run_dir = tmp_path / "run"
    trpo.main(["--config", str(ROOT / "configs" / "cifar_cpu.yaml"), "--no-progress",
               "--task-options", "{preset: ci, schedule: halving, hurdle: 0.15}", "--backend", "serial",
               "--total-rules", "20", "--num-envs", "10", "--run-dir", str(run_dir),
               "--store", str(tmp_path / "store.sqlite"), "--promote", "{preset: ci, top: 3, backend: serial}"])
    records = read_log(run_dir)
    assert len(records) == 20 and all(0.0 <= r["reward"] <= 1.0 for r in records)
    fidelities = {r["metrics"].get("fidelity") for r in records if r["source"] == "trained"}
    assert fidelities <= {"sweep", "full"} and fidelities
    # the run promoted its best 3 distinct rules to "ci" (no hurdle, no halving) at its end
    promoted = json.loads((run_dir / "promoted-ci.json").read_text())
    assert promoted["options"] == {"preset": "ci"} and promoted["run_samples"] == 20
    best3 = [d["key"] for d in top_rules(records, 3)]
    assert sorted(d["key"] for d in promoted["rules"]) == sorted(best3)
    assert [d["rank"] for d in promoted["rules"]] == [1, 2, 3]
    assert all(d["fidelity"] == "full" and 0.0 <= d["reward"] <= 1.0 for d in promoted["rules"])
    assert "promoted to convnet-cifar10" in capsys.readouterr().out
    # the CLI re-uses the stored scores of the same promotion: the same leaderboard, nothing trained
    assert cli(["promote", str(run_dir), "--preset", "ci", "--top", "3", "--backend", "serial"]) == 0
    again = json.loads((run_dir / "promoted-ci.json").read_text())
    assert [d["reward"] for d in again["rules"]] == [d["reward"] for d in promoted["rules"]]
    assert all(d["cached"] for d in again["rules"])
