"""The nos-gym command and the README's `python agents/trpo_lstm.py`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nos_gym.agents import read_log, top_rules
from nos_gym.cli import main
from nos_gym.dsl import parse
from nos_gym.store import Store
from nos_gym.tasks import make

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--task", "rosenbrock", "--task-options", "{iterations: 200}", "--no-progress", "--num-envs", "8"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One small search through `nos-gym search`, shared by the top/plot tests."""
    tmp = tmp_path_factory.mktemp("cli")
    run_dir, store = tmp / "run", tmp / "store.sqlite"
    code = main(["search", "--agent", "random_search"] + FAST + ["--total-rules", "24", "--seed", "2",
                                                                 "--run-dir", str(run_dir), "--store", str(store)])
    assert code == 0
    return run_dir, store


def test_search_runs_the_named_agent(searched):
    run_dir, store = searched
    records = read_log(run_dir)
    assert len(records) == 24
    assert (run_dir / "config.yaml").read_text().startswith("agent: random_search")


def test_search_with_a_config_naming_the_agent(tmp_path):
    cfg = tmp_path / "evo.yaml"
    cfg.write_text("agent: evolution\npopulation_size: 8\ntournament_size: 2\ntotal_rules: 24\nnum_envs: 8\n"
                   "task_options: {iterations: 200}\nprogress: false\n")
    assert main(["search", "--config", str(cfg), "--run-dir", str(tmp_path / "r"),
                 "--store", str(tmp_path / "s.sqlite")]) == 0
    assert len(read_log(tmp_path / "r")) == 24


def test_search_rejects_an_unknown_agent(capsys):
    assert main(["search", "--agent", "alphazero"]) == 2
    err = capsys.readouterr().err
    assert "'alphazero'" in err and "trpo_lstm" in err and "maskable_ppo" in err


def test_eval_scores_a_rule_in_paper_notation(capsys, tmp_path):
    rule = "g * exp(sign(g) * sign(m))"
    store = tmp_path / "s.sqlite"
    assert main(["eval", rule, "m", "--task", "rosenbrock", "--task-options", "{iterations: 500}",
                 "--store", str(store), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    task = make("rosenbrock", iterations=500)
    expected = [r.reward for r in task.evaluate([parse(rule), parse("m")])]
    assert [o["reward"] for o in out] == pytest.approx(expected)
    assert out[0]["rule"] == rule and out[0]["tokens"] == list(parse(rule).tokens)
    # the second time the scores come from the store
    assert main(["eval", rule, "--task", "rosenbrock", "--task-options", "{iterations: 500}",
                 "--store", str(store)]) == 0
    text = capsys.readouterr().out
    assert f"{expected[0]:.4f}  {rule}  (cached)" in text


def test_eval_rejects_bad_input(capsys):
    assert main(["eval", "g * * m"]) == 2
    assert "cannot parse" in capsys.readouterr().err
    assert main(["eval", "g", "--task", "mnist"]) == 2
    assert "allowed values" in capsys.readouterr().err


def test_top_of_a_run_and_of_a_store(searched, capsys):
    run_dir, store = searched
    assert main(["top", str(run_dir), "-k", "5"]) == 0
    out = capsys.readouterr().out
    best = top_rules(read_log(run_dir), 5)
    lines = out.splitlines()
    assert "24 sampled rules" in lines[0]
    assert [ln.split(None, 3)[3] for ln in lines[2:]] == [b["rule"] for b in best]
    assert main(["top", str(store), "-k", "3"]) == 0
    out = capsys.readouterr().out
    with Store(store) as s:
        recs = s.records(status="ok")
    assert "rosenbrock" in out and recs[0].program in out
    assert main(["top", str(run_dir / "missing")]) == 2


def test_plot_writes_a_png(searched, tmp_path):
    run_dir, _ = searched
    out = tmp_path / "fig.png"
    assert main(["plot", str(run_dir), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_console_script_is_installed():
    exe = shutil.which("nos-gym") or str(Path(sys.executable).parent / "nos-gym")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "nos-gym search" in proc.stdout


def test_readme_command_runs(tmp_path):
    """`python agents/trpo_lstm.py` (here with a tiny budget) ends printing rules in paper notation."""
    proc = subprocess.run([sys.executable, str(ROOT / "agents" / "trpo_lstm.py"), "--total-rules", "20",
                           "--num-envs", "10", "--task-options", "{iterations: 300}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("top 10 rules of trpo_lstm-rosenbrock-s1-")
    rules = [ln.split(None, 3)[3] for ln in lines[2:]]
    assert len(rules) == 10
    for rule in rules:
        parse(rule)  # paper notation that parses back
    assert "trpo_lstm rosenbrock: 100%" in proc.stderr and "20/20" in proc.stderr  # the tqdm bar
    runs = list((tmp_path / "runs").iterdir())
    assert len([p for p in runs if p.is_dir()]) == 1 and (tmp_path / "runs" / "store.sqlite").exists()
