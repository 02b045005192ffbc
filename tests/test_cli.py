"""The nos-gym command and the README's `python agents/trpo_lstm.py`."""

from __future__ import annotations

import json
import shutil
import sqlite3
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


def _one_line_error(capsys, command: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(f"nos-gym {command}: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_top_never_writes_to_what_it_reads(tmp_path, capsys):
    files = [tmp_path / "log.jsonl", tmp_path / "notes.txt", tmp_path / "junk.sqlite", tmp_path / "other.db"]
    files[0].write_bytes(b"")  # a run's empty log
    files[1].write_text("hello\n")
    files[2].write_bytes(bytes(range(256)) * 20)
    con = sqlite3.connect(files[3])  # another program's database
    con.execute("CREATE TABLE songs (title TEXT)")
    con.commit()
    con.close()
    before = {p: p.read_bytes() for p in files}
    for path in files:
        assert main(["top", str(path)]) == 2
        err = _one_line_error(capsys, "top")
        assert str(path) in err and "not a" in err and "nos-gym store" in err
        assert path.read_bytes() == before[path]
    assert sorted(tmp_path.iterdir()) == sorted(files)  # no -wal, -shm or journal beside them


def test_top_and_plot_arguments(searched, tmp_path, capsys):
    run_dir, store = searched
    for k in ("-1", "0"):
        assert main(["top", str(run_dir), "-k", k]) == 2
        assert "-k/--top must be at least 1" in _one_line_error(capsys, "top")
    assert main(["top", str(store), "-k", "1"]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("1 ")]) >= 1
    # plot: a path without an image suffix gets .png, and the path printed is the one written
    assert main(["plot", str(run_dir), "-o", str(tmp_path / "out" / "x")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "x.png")
    assert (tmp_path / "out" / "x.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "out" / "x").exists()
    assert main(["plot", str(run_dir), "-o", str(tmp_path / "fig.svg")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "fig.svg") and b"<svg" in (tmp_path / "fig.svg").read_bytes()
    assert main(["plot", str(tmp_path / "no-run")]) == 2
    assert "does not exist" in _one_line_error(capsys, "plot")


def test_eval_misuse_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    assert main(["eval", " + ".join(["g"] * 500)]) == 2
    assert "rule too long: 499 nested operations, at most 100" in _one_line_error(capsys, "eval")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\x00garbage" * 500)
    folder = tmp_path / "folder"
    folder.mkdir()
    for store, expected in [(junk, "not a usable nos-gym store"), (folder, "is a directory"),
                            (tmp_path / "no" / "s.sqlite", "does not exist")]:
        assert main(["eval", "g", "--task-options", "{iterations: 10}", "--store", str(store)]) == 2
        err = _one_line_error(capsys, "eval")
        assert expected in err and str(store) in err
    assert junk.read_bytes() == b"\x00garbage" * 500

    import nos_gym.store as store_module

    def unwritable(target, **kwargs):  # what SQLite says in a folder we may not write to
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(store_module, "_connect", unwritable)
    assert main(["eval", "g", "--task-options", "{iterations: 10}", "--store", str(tmp_path / "s.sqlite")]) == 2
    err = _one_line_error(capsys, "eval")
    assert str(tmp_path / "s.sqlite") in err and "writable" in err
    monkeypatch.undo()

    assert main(["eval", "g", "--task-options", "{bogus: 1}"]) == 2
    err = _one_line_error(capsys, "eval")
    assert "task 'rosenbrock' has no option 'bogus'" in err and "iterations" in err
    assert main(["eval", "g", "--task-options", "{iterations: 0}"]) == 2
    assert "iterations must be >= 1, got 0" in _one_line_error(capsys, "eval")


def test_eval_reads_the_papers_division_with_eps(capsys):
    assert main(["eval", "drop(m, 0.1) / (exp(g^2) + eps)", "--task-options", "{iterations: 50}", "--json"]) == 0
    (out,) = json.loads(capsys.readouterr().out)
    assert out["rule"] == "drop(m, 0.1) / exp(g^2)" and out["tokens"] == list(parse("drop(m, 0.1) / exp(g^2)").tokens)


def test_export_copies_a_store_and_refuses_to_overwrite(searched, tmp_path, capsys):
    _, store = searched
    with Store(store, readonly=True) as s:
        n = s.count()
    assert main(["export", str(store), str(tmp_path / "copy.sqlite")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'copy.sqlite'}: {n} evaluations")
    with Store(tmp_path / "copy.sqlite", readonly=True) as c:
        assert c.count() == n
    assert main(["export", str(store), str(tmp_path / "copy.sqlite")]) == 2
    assert "exists" in _one_line_error(capsys, "export")
    assert main(["export", str(store), str(tmp_path / "copy.jsonl")]) == 0
    assert len((tmp_path / "copy.jsonl").read_text().splitlines()) == n
    assert main(["export", str(store), str(store), "--force"]) == 2
    assert "onto itself" in _one_line_error(capsys, "export")


def test_interrupt_exits_130_and_store_errors_exit_2(monkeypatch, capsys):
    import nos_gym.cli as cli
    from nos_gym.store import StoreError

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "top", interrupted)
    assert main(["top", "x"]) == 130
    assert "interrupted" in capsys.readouterr().err

    def broken(argv):
        raise StoreError("cannot write to the store s.sqlite: disk I/O error")

    monkeypatch.setitem(cli.COMMANDS, "top", broken)
    assert main(["top", "x"]) == 2
    assert "disk I/O error" in _one_line_error(capsys, "top")


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
