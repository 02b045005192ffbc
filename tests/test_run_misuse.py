"""Runs that cannot be lost or corrupted by misuse (issue 10, part 3).

- one process per run directory (a lock the kernel drops when the process ends);
- a missing, truncated, garbage or altered checkpoint, or a log that disagrees with it:
  resume refuses, changes nothing, never deletes a record, and says how to recover
  (``--rebuild`` from the log, or a new run directory), and ``--rebuild`` works;
- the budget on resume: no shrinking, no silent "nothing to do";
- bad settings (non-finite floats, bool/int/str confusion, depth and seed bounds, task
  options the task rejects): one line, exit status 2, no traceback, no run directory;
- I/O failures (read-only places, a full disk): one line naming the file and what to do,
  exit status 2, no truncated file, no leftover run directory.

How the file-system failures are simulated (the tests run as root, so ``chmod`` stops
nothing): a read-only place is ``os.mkdir`` / ``os.open`` raising ``OSError(EROFS)``
(monkeypatched, in this process or in a wrapper around the agent script); a full disk is
the kernel's own ENOSPC from writing to ``/dev/full``, which the run's log file or its
temporary files are pointed at.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nos_gym.agents import ConfigError, RunError, load_agent, read_log
from nos_gym.agents import rundir as rundir_module
from nos_gym.agents.rundir import RunDir
from nos_gym.agents.runs import Run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--task", "rosenbrock", "--task-options", "{iterations: 200}", "--no-progress", "--num-envs", "8"]
SCRIPT = str(ROOT / "agents" / "random_search.py")


@pytest.fixture(scope="module")
def rs():
    return load_agent("random_search")


@pytest.fixture(scope="module")
def trpo():
    return load_agent("trpo_lstm")


def samples(run_dir):
    return [r["sample"] for r in read_log(run_dir)]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(run_dir):
    """Every file of a run directory and its sha256 (what 'nothing was changed' means)."""
    return {p.name: digest(p) for p in sorted(Path(run_dir).iterdir()) if p.is_file() and p.name != "run.lock"}


def one_line_error(proc):
    """The process failed with exit status 2 and exactly one line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def run_script(args, cwd, script=SCRIPT, timeout=120):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(rs, tmp_path_factory):
    """A finished random-search run of 48 rules (6 batches of 8) and its store; tests copy it."""
    base = tmp_path_factory.mktemp("finished")
    rs.main(FAST + ["--total-rules", "48", "--seed", "7", "--run-dir", str(base / "run"),
                    "--store", str(base / "store.sqlite")])
    return base / "run"


@pytest.fixture
def copy_of(finished_run, tmp_path):
    def make(name="run"):
        dst = tmp_path / name
        shutil.copytree(finished_run, dst)
        shutil.copy(finished_run.parent / "store.sqlite", tmp_path / "store.sqlite")
        config = dst / "config.yaml"  # point the copy's config at its own directory and store
        text = config.read_text().replace(str(finished_run.parent / "store.sqlite"), str(tmp_path / "store.sqlite"))
        config.write_text(text.replace(str(finished_run), str(dst)))
        return dst
    return make


# ------------------------------------------------------------------------------ the lock
def test_a_second_process_on_a_live_run_stops_and_the_first_finishes_intact(tmp_path):
    run_dir = tmp_path / "r"
    first = subprocess.Popen([sys.executable, SCRIPT, *FAST, "--total-rules", "800", "--run-dir", str(run_dir),
                              "--store", str(tmp_path / "s.sqlite")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 90
        while not ((run_dir / "log.jsonl").exists() and (run_dir / "log.jsonl").stat().st_size > 0):
            assert time.time() < deadline and first.poll() is None, "the first run logged nothing"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # hold it mid-run (still holding its lock) while the second one tries
        try:
            second = run_script(["--resume", str(run_dir), "--total-rules", "1600"], cwd=tmp_path)
            line = one_line_error(second)
            assert "is in use by another process" in line and f"pid {first.pid}" in line
            assert "--resume" in line
            third = subprocess.run([sys.executable, "-m", "nos_gym.cli", "search", "--resume", str(run_dir)],
                                   capture_output=True, text=True, cwd=tmp_path, timeout=120)
            assert "is in use by another process" in one_line_error(third)
        finally:
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert samples(run_dir) == list(range(800))  # every sample once: no duplicates, no gap


def test_the_lock_is_dropped_when_the_process_is_killed(rs, tmp_path):
    run_dir = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, SCRIPT, *FAST, "--total-rules", "100000", "--run-dir", str(run_dir),
                             "--store", str(tmp_path / "s.sqlite")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.time() + 90
        while not (run_dir / "checkpoint.pt").exists():
            assert time.time() < deadline and proc.poll() is None, "no checkpoint in 90 s"
            time.sleep(0.02)
        time.sleep(0.2)
    finally:
        proc.kill()  # SIGKILL: no handler runs, the kernel releases the flock
        proc.wait()
    n = len(read_log(run_dir))
    run = rs.main(["--resume", str(run_dir), "--total-rules", str(n + 16)])
    assert samples(run_dir) == list(range(run.samples)) and run.samples >= n


def test_two_runs_in_one_process_on_one_directory(rs, tmp_path):
    args, _ = rs.parse_args(rs.Args, FAST + ["--total-rules", "16", "--run-dir", str(tmp_path / "r"),
                                             "--store", str(tmp_path / "s.sqlite")])
    with Run.open(args, "random_search"):
        again, resume = rs.parse_args(rs.Args, ["--resume", str(tmp_path / "r")])
        with pytest.raises(RunError, match="in use by another process"):
            Run.open(again, "random_search", resume)
    # released on exit: the run (stopped before its first batch) can be resumed
    rs.main(["--resume", str(tmp_path / "r")])
    assert samples(tmp_path / "r") == list(range(16))


# ------------------------------------------------------------------------------ damaged
def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


DAMAGE = {
    "missing checkpoint": (lambda d: (d / "checkpoint.pt").unlink(), "checkpoint.pt is missing"),
    "truncated checkpoint": (lambda d: os.truncate(d / "checkpoint.pt", 1000), "checkpoint.pt is damaged"),
    "garbage checkpoint": (lambda d: (d / "checkpoint.pt").write_bytes(os.urandom(4096)), "checkpoint.pt is damaged"),
    "flipped byte": (lambda d: _flip(d / "checkpoint.pt"), "checkpoint.pt is damaged"),
    "missing checksum": (lambda d: (d / "checkpoint.pt.sha256").unlink(), "cannot be verified"),
    "damaged checksum": (lambda d: (d / "checkpoint.pt.sha256").write_text("{oops"), "cannot be verified"),
    "log lost records": (lambda d: (d / "log.jsonl").write_text(
        "".join((d / "log.jsonl").read_text().splitlines(keepends=True)[:30])), "records were lost"),
    "log edited": (lambda d: (d / "log.jsonl").write_text((d / "log.jsonl").read_text().replace(
        '"sample": 3, "batch": 0, "reward": ', '"sample": 3, "batch": 0, "reward": 1', 1)), "edited or replaced"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_of_a_damaged_run_changes_nothing_and_says_how_to_recover(rs, copy_of, case):
    run_dir = copy_of()
    damage, words = DAMAGE[case]
    damage(run_dir)
    before = snapshot(run_dir)
    n = len(read_log(run_dir))
    with pytest.raises(RunError) as e:
        rs.main(["--resume", str(run_dir), "--total-rules", "64"])
    msg = str(e.value)
    assert "\n" not in msg and words in msg, msg
    assert "Nothing was changed" in msg and f"--resume {run_dir} --rebuild" in msg
    assert f"--config {run_dir / 'config.yaml'} --run-dir NEW_DIR" in msg
    assert snapshot(run_dir) == before and len(read_log(run_dir)) == n  # not one record deleted


def test_rebuild_continues_from_the_log_keeping_every_record(rs, copy_of):
    run_dir = copy_of()
    _flip(run_dir / "checkpoint.pt")
    log_before = (run_dir / "log.jsonl").read_bytes()
    bad = digest(run_dir / "checkpoint.pt")
    run = rs.main(["--resume", str(run_dir), "--rebuild", "--total-rules", "64"])
    assert run.rebuilt and run.samples == 64
    assert (run_dir / "log.jsonl").read_bytes().startswith(log_before)  # the 48 records, byte for byte
    assert samples(run_dir) == list(range(64))
    kept = list(run_dir.glob("checkpoint.pt.bad-*"))
    assert len(kept) == 1 and digest(kept[0]) == bad  # the damaged checkpoint is kept aside, not deleted
    # the rebuilt run is a normal run again: it resumes and extends
    rs.main(["--resume", str(run_dir), "--total-rules", "72"])
    assert samples(run_dir) == list(range(72))
    # --rebuild of a healthy run is refused (it would throw the agent's state away)
    with pytest.raises(RunError, match="intact and agrees with its log"):
        rs.main(["--resume", str(run_dir), "--rebuild", "--total-rules", "80"])


def test_a_damaged_checkpoint_from_the_command_line(copy_of, tmp_path):
    run_dir = copy_of()
    os.truncate(run_dir / "checkpoint.pt", 10)
    line = one_line_error(run_script(["--resume", str(run_dir), "--total-rules", "64"], cwd=tmp_path))
    assert "checkpoint.pt is damaged" in line and "--rebuild" in line and len(read_log(run_dir)) == 48


def test_a_kill_before_the_first_checkpoint_starts_over_in_place(rs, copy_of):
    """Not damage: the first batch was logged, the process died before checkpointing it."""
    run_dir = copy_of()
    first = (run_dir / "log.jsonl").read_text().splitlines(keepends=True)[:8]
    (run_dir / "log.jsonl").write_text("".join(first) + '{"sample": 8, "ba')
    for name in ("checkpoint.pt", "checkpoint.pt.sha256", "updates.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    rs.main(["--resume", str(run_dir), "--total-rules", "16"])

    def rules(records):
        return [(r["sample"], r["tokens"], r["reward"]) for r in records]

    assert rules(read_log(run_dir)[:8]) == rules(map(json.loads, first))  # the same rules came back
    assert samples(run_dir) == list(range(16))


def test_a_kill_between_the_checksum_and_the_checkpoint_rename_resumes(rs, copy_of):
    """save() writes the sidecar (new digest + previous) before renaming the checkpoint into place."""
    run_dir = copy_of()
    sums = run_dir / "checkpoint.pt.sha256"
    current = json.loads(sums.read_text())["sha256"]
    sums.write_text(json.dumps({"sha256": "0" * 64, "previous": current}))  # the new checkpoint never landed
    rs.main(["--resume", str(run_dir), "--total-rules", "56"])
    assert samples(run_dir) == list(range(56))


# ------------------------------------------------------------------------------ budget
def test_resume_cannot_shrink_a_run_or_do_nothing(rs, copy_of, tmp_path):
    run_dir = copy_of()
    config = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(RunError, match="already sampled 48 rules.*cannot shrink.*N > 48"):
        rs.main(["--resume", str(run_dir), "--total-rules", "16"])
    with pytest.raises(RunError, match="is finished: 48 rules.*nothing to do.*N > 48"):
        rs.main(["--resume", str(run_dir)])
    assert (run_dir / "config.yaml").read_bytes() == config  # never rewritten for a change that does nothing
    line = one_line_error(subprocess.run([sys.executable, "-m", "nos_gym.cli", "search", "--resume", str(run_dir),
                                          "--total-rules", "40"], capture_output=True, text=True, cwd=tmp_path,
                                         timeout=120))
    assert "cannot shrink" in line
    # extending a finished run is what --total-rules on resume is for
    rs.main(["--resume", str(run_dir), "--total-rules", "56"])
    assert samples(run_dir) == list(range(56))
    assert "total_rules: 56" in (run_dir / "config.yaml").read_text()


# ------------------------------------------------------------------------------ settings
BAD_FLAGS = [
    ("trpo_lstm", ["--max-kl", "nan"], ["'max_kl'", "finite", "nan"]),
    ("trpo_lstm", ["--entropy-coef", "inf"], ["'entropy_coef'", "finite", "inf"]),
    ("random_search", ["--depth", "1000"], ["'depth'", "1000", "[1, 10]"]),
    ("random_search", ["--seed", str(2**70)], ["'seed'", str(2**70), "2**32"]),
    ("random_search", ["--seed", "-1"], ["'seed'", "-1"]),
    ("random_search", ["--task-options", "{bogus: 1}"], ["'task_options'", "bogus", "'iterations'"]),
    ("random_search", ["--task-options", "{iterations: 0}"], ["'task_options'", "iterations", "0"]),
    ("random_search", ["--task", "quadratic", "--task-options", "{dim: -3}"], ["'task_options'", "dim"]),
    ("random_search", ["--eval-timeout", "0"], ["'eval_timeout'", "> 0"]),
    ("random_search", ["--eval-timeout", "nan"], ["'eval_timeout'", "finite"]),
    ("random_search", ["--ray-address", "auto"], ["'ray_address'", "backend"]),
    ("evolution", ["--population-size", "8", "--tournament-size", "3", "--mutations", "0"], ["'mutations'"]),
    ("random_search", ["--promote", "{top: 5}"], ["'promote'", "which fidelity", "preset: fast"]),
    ("random_search", ["--promote", "{preset: fast, tops: 5}"], ["'promote'", "tops", "allowed keys"]),
    ("random_search", ["--promote", "{preset: fast, top: 0}"], ["'promote'", "top", ">= 1", "0"]),
    ("random_search", ["--promote", "{task_options: {iterations: -1}}"], ["'task_options'", "iterations"]),
    ("random_search", ["--promote", "[fast]"], ["'promote'", "mapping"]),
    ("random_search", ["--promote", "{preset: fast, seeds: [0, 0]}"], ["'promote'", "seeds", "distinct"]),
]

BAD_YAML = [
    ("depth: true\n", ["'depth'", "bool", "True", "whole numbers"]),
    ('distinct_operands: "no"\n', ["'distinct_operands'", "'no'", "true, false"]),
    ("reuse_result: 1\n", ["'reuse_result'", "int", "true, false"]),
    ("num_envs: 8.0\n", ["'num_envs'", "float", "whole numbers"]),
    ("max_kl: .nan\n", ["'max_kl'", "finite"]),
    ("entropy_coef: -.inf\n", ["'entropy_coef'", "finite"]),
    ("eval_timeout: .inf\n", ["'eval_timeout'", "finite"]),
    ("task_options: {learning_rates: [0.1, -1]}\n", ["'task_options'", "learning_rates"]),
]


@pytest.mark.parametrize("agent, flags, words", BAD_FLAGS)
def test_bad_flags_stop_before_a_run_dir_exists(agent, flags, words, tmp_path):
    module = load_agent(agent)
    with pytest.raises(ConfigError) as e:
        module.main(FAST + flags + ["--runs-root", str(tmp_path / "runs"), "--store", str(tmp_path / "s.sqlite")])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert list(tmp_path.iterdir()) == []  # no run directory, no store


@pytest.mark.parametrize("text, words", BAD_YAML)
def test_bad_yaml_stops_before_a_run_dir_exists(trpo, text, words, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        trpo.main(["--config", str(cfg), "--runs-root", str(tmp_path / "runs"), "--store", str(tmp_path / "s.sqlite")])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.parametrize("bad", [{"depth": True}, {"distinct_operands": "no"}, {"max_kl": float("nan")},
                                 {"seed": 2**70}, {"task_options": {"bogus": 1}}])
def test_settings_built_in_python_are_checked_too(trpo, bad, tmp_path):
    args = trpo.Args(runs_root=str(tmp_path / "runs"), store=str(tmp_path / "s.sqlite"), **bad)
    with pytest.raises(ConfigError, match=repr(next(iter(bad)))):
        Run.open(args, "trpo_lstm")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    [SCRIPT.replace("random_search", "trpo_lstm"), "--max-kl", "nan"],
    [SCRIPT, "--task-options", "{bogus: 1}"],
    [SCRIPT, "--seed", str(2**70)],
    ["-m", "nos_gym.cli", "search", "--agent", "random_search", "--task-options", "{iterations: 0}"],
])
def test_bad_settings_from_the_command_line(argv, tmp_path):
    proc = subprocess.run([sys.executable, *argv, "--runs-root", str(tmp_path / "runs"),
                           "--store", str(tmp_path / "s.sqlite")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    line = one_line_error(proc)
    assert "config key" in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ I/O failures
def _erofs(name):
    return OSError(errno.EROFS, os.strerror(errno.EROFS), name)


def test_read_only_runs_root(rs, tmp_path, monkeypatch):
    real_mkdir = os.mkdir

    def mkdir(path, *a, **k):
        if "runs" in str(path):
            raise _erofs(str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(RunError) as e:
        rs.main(FAST + ["--runs-root", str(tmp_path / "runs"), "--store", str(tmp_path / "s.sqlite")])
    msg = str(e.value)
    assert "\n" not in msg and "Read-only file system" in msg and "--runs-root" in msg
    assert str(tmp_path / "runs") in msg
    assert not (tmp_path / "runs").exists()


def test_read_only_run_dir_on_resume(rs, copy_of, monkeypatch):
    run_dir = copy_of()
    before = snapshot(run_dir)
    real_open = os.open

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(run_dir) in str(path):
            raise _erofs(str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    with pytest.raises(RunError) as e:
        rs.main(["--resume", str(run_dir), "--total-rules", "64"])
    msg = str(e.value)
    assert "\n" not in msg and "Read-only file system" in msg and "run.lock" in msg and "writable" in msg
    monkeypatch.undo()
    assert snapshot(run_dir) == before


def test_read_only_place_from_the_command_line(tmp_path):
    wrapper = (
        "import errno, os, runpy, sys\n"
        "real = os.mkdir\n"
        "def mkdir(p, *a, **k):\n"
        "    if 'runs' in str(p): raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))\n"
        "    return real(p, *a, **k)\n"
        "os.mkdir = mkdir\n"
        f"sys.argv = [{SCRIPT!r}] + sys.argv[1:]\n"
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *FAST, "--runs-root", str(tmp_path / "runs"),
                           "--store", str(tmp_path / "s.sqlite")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    line = one_line_error(proc)
    assert "Read-only file system" in line and str(tmp_path / "runs") in line
    assert not (tmp_path / "runs").exists()


def _log_to_dev_full(monkeypatch):
    """The run's log file is /dev/full: the kernel answers each flush with ENOSPC."""
    def open_log(self):
        self._log_file = open("/dev/full", "ab")
    monkeypatch.setattr(RunDir, "open_log", open_log)


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


@needs_dev_full
def test_disk_full_while_logging_a_resumed_run(rs, copy_of, monkeypatch):
    run_dir = copy_of()
    top_before = (run_dir / "top.txt").read_bytes()
    _log_to_dev_full(monkeypatch)
    with pytest.raises(RunError) as e:
        rs.main(["--resume", str(run_dir), "--total-rules", "64"])
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and str(run_dir / "log.jsonl") in msg
    assert "free some disk space" in msg and f"--resume {run_dir}" in msg
    monkeypatch.undo()
    assert samples(run_dir) == list(range(48)) and (run_dir / "top.txt").read_bytes() == top_before
    assert not list(run_dir.glob("*.tmp"))
    rs.main(["--resume", str(run_dir), "--total-rules", "64"])  # space freed: it continues
    assert samples(run_dir) == list(range(64))


@needs_dev_full
def test_disk_full_while_writing_top_leaves_the_old_file_whole(rs, copy_of, monkeypatch):
    run_dir = copy_of()
    top_before = (run_dir / "top.txt").read_bytes()
    assert top_before.strip()
    real = rundir_module._write_synced

    def write_synced(path, data):
        if Path(path).name.startswith("top."):
            return real(Path("/dev/full"), data)
        return real(path, data)

    monkeypatch.setattr(rundir_module, "_write_synced", write_synced)
    with pytest.raises(RunError, match="cannot write .*top.txt: No space left on device"):
        rs.main(["--resume", str(run_dir), "--total-rules", "56"])
    assert (run_dir / "top.txt").read_bytes() == top_before  # not truncated to 0 bytes
    assert not list(run_dir.glob("*.tmp"))
    assert samples(run_dir) == list(range(56))  # the batch itself was logged and checkpointed


@needs_dev_full
def test_disk_full_on_a_new_run_leaves_no_directory(rs, tmp_path, monkeypatch):
    _log_to_dev_full(monkeypatch)
    with pytest.raises(RunError, match="No space left on device.*run the command again"):
        rs.main(FAST + ["--total-rules", "16", "--runs-root", str(tmp_path / "runs"),
                        "--store", str(tmp_path / "s.sqlite")])
    assert list((tmp_path / "runs").iterdir()) == []


@needs_dev_full
def test_disk_full_from_the_command_line(copy_of, tmp_path):
    run_dir = copy_of()
    wrapper = (
        "import runpy, sys\n"
        "from nos_gym.agents.rundir import RunDir\n"
        "def open_log(self): self._log_file = open('/dev/full', 'ab')\n"
        "RunDir.open_log = open_log\n"
        f"sys.argv = [{SCRIPT!r}] + sys.argv[1:]\n"
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, "--resume", str(run_dir), "--total-rules", "64"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    line = one_line_error(proc)
    assert "No space left on device" in line and "log.jsonl" in line and "--resume" in line
    assert samples(run_dir) == list(range(48))


# ------------------------------------------------------------------------------ evaluator settings
def test_eval_timeout_and_ray_address_reach_the_evaluator(rs, tmp_path, monkeypatch):
    import nos_gym.evaluation

    seen = {}

    class FakeEvaluator:
        def __init__(self, task, **kwargs):
            seen.update(kwargs, task=task)

    monkeypatch.setattr(nos_gym.evaluation, "Evaluator", FakeEvaluator)
    common = FAST + ["--store", "", "--runs-root", str(tmp_path / "runs")]
    args, _ = rs.parse_args(rs.Args, common + ["--eval-timeout", "90"])
    with Run.open(args, "random_search") as run:
        _ = run.evaluator  # builds the evaluator with the run's settings
    assert seen["timeout"] == 90.0 and seen["address"] is None
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval_timeout: null\n")
    args, _ = rs.parse_args(rs.Args, ["--config", str(cfg)] + common)
    assert args.eval_timeout is None
    args, _ = rs.parse_args(rs.Args, common + ["--eval-timeout", "none"])
    assert args.eval_timeout is None
    pytest.importorskip("ray")
    args, _ = rs.parse_args(rs.Args, common + ["--backend", "ray", "--ray-address", "ray://head:10001"])
    with Run.open(args, "random_search") as run:
        _ = run.evaluator  # builds the evaluator with the run's settings
    assert seen["address"] == "ray://head:10001" and seen["backend"] == "ray" and seen["timeout"] == 3600.0
