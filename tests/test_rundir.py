"""The run directory alone (``nos_gym.agents.rundir.RunDir``): no agent, task, evaluator or env.

The lock (another process, another file descriptor, a killed holder), the log (records,
a torn last line), checkpoints (round trip, the checksum, writes that fail half-way), the
checks before a resume, Ctrl-C / SIGTERM, and a directory written by nos-gym before
``Run`` was split (``tests/data/run_before_rundir``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nos_gym.agents import rundir as rundir_module
from nos_gym.agents.rundir import RunDir, RunDirError, jsonable, read_log, run_files

OLD_RUN = Path(__file__).resolve().parent / "data" / "run_before_rundir"
SIZE = 4  # records per batch


def items(n=SIZE, reward=0.5):
    return [{"key": f"k{i}", "reward": reward, "tokens": ["g"]} for i in range(n)]


def new_dir(path, **kw):
    """A new run, opened the way ``Run`` opens one."""
    d = RunDir(path, writer="w", seed=7, batch_size=SIZE, record_keys=("key", "reward"), **kw)
    d.make()
    d.lock()
    d.seed_globals()
    d.write_config({"agent": "w", "seed": 7})
    d.open_log()
    return d


def run_batches(d, n):
    """``n`` batches, each logged and then checkpointed."""
    for _ in range(n):
        b = d.next_batch
        d.append(b, items())
        d.append_update(b, {"loss": 1.0 / (b + 1)})
        d.save({"batch_seen": b, "weights": torch.arange(4.0) * b})


def reopen(path, rebuild=False, writer="w", **kw):
    """The run resumed, the way ``Run`` resumes one."""
    d = RunDir(path, writer=writer, seed=7, batch_size=SIZE, resumed=True, record_keys=("key", "reward"), **kw)
    d.lock()
    try:
        d.check_resume(rebuild)
        d.resume()
        d.open_log()
    except BaseException:
        d.close()
        raise
    return d


def finished(tmp_path, batches=3):
    d = new_dir(tmp_path / "r")
    run_batches(d, batches)
    d.close()
    return tmp_path / "r"


def snapshot(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.is_file() and p.name != "run.lock"}


def refused(path, words, **kw):
    """Resuming ``path`` is refused with one line holding ``words``, and nothing changes."""
    before = snapshot(path)
    with pytest.raises(RunDirError) as e:
        reopen(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and words in msg, msg
    assert snapshot(path) == before
    free = RunDir(path, writer="w", seed=7, batch_size=SIZE)
    free.lock()  # the lock was released
    free.unlock()
    return msg


# ------------------------------------------------------------------------------ the lock
HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"pid {os.getpid()} on here since now\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_lock_held_by_another_process_is_refused_in_one_line_and_dropped_when_it_is_killed(tmp_path):
    path = finished(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        d = RunDir(path, writer="w", seed=7, batch_size=SIZE, resumed=True)
        with pytest.raises(RunDirError) as e:
            d.lock()
        msg = str(e.value)
        assert "\n" not in msg
        assert f"{path} is in use by another process (pid {holder.pid} on here since now)" in msg
        assert f"--resume {path}" in msg
    finally:
        holder.kill()  # SIGKILL: no handler runs, the kernel releases the flock
        holder.wait()
    d.lock()
    assert f"pid {os.getpid()}" in (path / "run.lock").read_text()
    d.unlock()
    assert (path / "run.lock").read_text() == ""  # no stale note once the run is free


def test_a_second_file_descriptor_in_the_same_process_is_refused(tmp_path):
    first = new_dir(tmp_path / "r")
    second = RunDir(tmp_path / "r", writer="w", seed=7, batch_size=SIZE)
    with pytest.raises(RunDirError, match="in use by another process"):
        second.lock()
    first.close()
    second.lock()
    second.unlock()


def test_the_error_class_is_the_owners():
    class OwnError(RunDirError):
        pass

    d = RunDir("/proc/no-such-dir/run", writer="w", seed=1, batch_size=SIZE, error=OwnError)
    with pytest.raises(OwnError, match="cannot open the lock file /proc/no-such-dir/run/run.lock"):
        d.lock()


# ------------------------------------------------------------------------------ the log
def test_records_are_numbered_batched_and_timed_and_read_back(tmp_path):
    d = new_dir(tmp_path / "r")
    first = d.append(0, items())
    d.append(1, items(2, reward=0.25))
    assert [list(r) for r in first] == [["sample", "batch", "key", "reward", "tokens", "time"]] * SIZE
    assert [(r["sample"], r["batch"]) for r in d.records] == [(i, 0) for i in range(4)] + [(4, 1), (5, 1)]
    assert d.samples == 6 and d.next_batch == math.ceil(6 / SIZE)
    assert (tmp_path / "r" / "log.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in d.records)
    assert read_log(tmp_path / "r") == d.records
    d.close()


def test_read_log_ignores_a_torn_last_line(tmp_path):
    d = new_dir(tmp_path / "r")
    d.append(0, items())
    d.close()
    with (tmp_path / "r" / "log.jsonl").open("a") as f:
        f.write('{"sample": 4, "bat')  # killed mid-write
    assert [r["sample"] for r in read_log(tmp_path / "r")] == [0, 1, 2, 3]
    with pytest.raises(FileNotFoundError, match="a run directory"):
        read_log(tmp_path / "nowhere")


def test_updates_and_metrics_as_json(tmp_path):
    d = new_dir(tmp_path / "r")
    d.append_update(3, {"kl": np.float32(0.5), "n": np.int64(2), "bad": float("nan"), "obj": object, "xs": (1, 2)})
    row = json.loads((tmp_path / "r" / "updates.jsonl").read_text())
    assert row == {"batch": 3, "kl": 0.5, "n": 2, "bad": None, "obj": str(object), "xs": [1, 2]}
    assert jsonable({1: [np.inf, True]}) == {"1": [None, True]}
    d.close()


# ------------------------------------------------------------------------------ checkpoints
def test_a_checkpoint_round_trips_with_its_counters_rng_states_and_checksum(tmp_path):
    path = finished(tmp_path, batches=2)
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))  # after the last save
    ckpt = torch.load(path / "checkpoint.pt", weights_only=False)
    assert list(ckpt) == ["format", "agent", "batch", "samples", "log_sha256", "elapsed", "global_rng", "state"]
    assert (ckpt["format"], ckpt["agent"], ckpt["batch"], ckpt["samples"]) == (2, "w", 2, 8)
    assert ckpt["log_sha256"] == hashlib.sha256((path / "log.jsonl").read_bytes()).hexdigest()
    sums = json.loads((path / "checkpoint.pt.sha256").read_text())
    assert list(sums) == ["sha256", "previous", "file", "bytes", "samples"]
    data = (path / "checkpoint.pt").read_bytes()
    assert sums["sha256"] == hashlib.sha256(data).hexdigest() and sums["bytes"] == len(data)
    assert sums["previous"] and sums["file"] == "checkpoint.pt" and sums["samples"] == 8

    random.seed(0)
    d = reopen(path)
    assert d.checkpoint["state"]["batch_seen"] == 1
    assert torch.equal(d.checkpoint["state"]["weights"], torch.arange(4.0))
    assert (d.samples, d.batch_index, d.next_batch) == (8, 2, 2)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws  # the global RNGs continue
    assert d.elapsed >= ckpt["elapsed"]
    run_batches(d, 1)
    assert d.records[-1]["sample"] == 11 and d.checkpoint["batch"] == 3
    assert json.loads((path / "checkpoint.pt.sha256").read_text())["previous"] == sums["sha256"]
    d.close()


def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage, words", [
    (lambda p: _flip(p / "checkpoint.pt"), "checkpoint.pt is damaged: its sha256 is not the one recorded"),
    (lambda p: os.truncate(p / "checkpoint.pt", 100), "checkpoint.pt is damaged"),
    (lambda p: (p / "checkpoint.pt.sha256").unlink(), "checkpoint.pt.sha256 is missing"),
    (lambda p: (p / "checkpoint.pt.sha256").write_text("{oops"), "checkpoint.pt.sha256 is damaged"),
])
def test_a_checksum_mismatch_is_refused_and_changes_nothing(tmp_path, damage, words):
    path = finished(tmp_path)
    damage(path)
    msg = refused(path, words)
    assert "Nothing was changed (its 12 records are in log.jsonl)" in msg
    assert f"--resume {path} --rebuild" in msg and f"--config {path / 'config.yaml'} --run-dir NEW_DIR" in msg


def test_a_checkpoint_of_an_older_format_without_checksum_is_accepted(tmp_path, capsys):
    path = finished(tmp_path)
    ckpt = torch.load(path / "checkpoint.pt", weights_only=False)
    del ckpt["format"]
    torch.save(ckpt, path / "checkpoint.pt")
    (path / "checkpoint.pt.sha256").unlink()
    d = reopen(path)
    assert d.samples == 12 and "carries no checksum" in capsys.readouterr().err
    d.close()


# ------------------------------------------------------------------------------ atomic writes
def _no_space(path, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    d = new_dir(tmp_path / "r")
    d.write_atomic("top.txt", b"the old leaderboard\n")
    monkeypatch.setattr(rundir_module, "_write_synced", _no_space)
    with pytest.raises(RunDirError) as e:
        d.write_atomic("top.txt", b"the new one\n")
    assert "cannot write" in str(e.value) and "top.txt: No space left on device; free some disk space" in str(e.value)
    assert (tmp_path / "r" / "top.txt").read_bytes() == b"the old leaderboard\n"
    assert not list((tmp_path / "r").glob("*.tmp"))
    d.close()


def test_a_save_that_fails_or_is_killed_before_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "r"
    d = new_dir(path)
    run_batches(d, 2)
    good = (path / "checkpoint.pt").read_bytes()
    d.append(2, items())
    real_replace = os.replace

    def killed_before_rename(src, dst):  # the sidecar has landed, naming the new digest and the previous one
        if Path(dst).name == "checkpoint.pt":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_rename)
    with pytest.raises(RunDirError, match="cannot write .*checkpoint.pt: Input/output error"):
        d.save({"batch_seen": 2, "weights": torch.zeros(4)})
    monkeypatch.undo()
    d.close()
    assert (path / "checkpoint.pt").read_bytes() == good and not list(path.glob("*.tmp"))
    assert json.loads((path / "checkpoint.pt.sha256").read_text())["previous"] == hashlib.sha256(good).hexdigest()
    d = reopen(path)  # the previous checkpoint verifies; the batch past it is cut
    assert d.samples == 8 and d.checkpoint["state"]["batch_seen"] == 1
    assert len((path / "log.jsonl").read_text().splitlines()) == 8
    d.close()


# ------------------------------------------------------------------------------ resume checks
def test_resume_cuts_a_batch_past_the_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "r"
    d = new_dir(path)
    run_batches(d, 2)
    kept = (path / "log.jsonl").read_bytes()
    d.append(2, items())  # logged, then killed before its checkpoint ...
    d.append_update(2, {"loss": 0.0})
    d.close()
    with (path / "log.jsonl").open("a") as f:
        f.write('{"sample": 12, "ba')  # ... or in the middle of the next line
    d = reopen(path)
    assert (path / "log.jsonl").read_bytes() == kept and d.samples == 8 and d.batch_index == 2
    assert [json.loads(x)["batch"] for x in (path / "updates.jsonl").read_text().splitlines()] == [0, 1]
    assert d.append(d.next_batch, items())[0]["sample"] == 8
    d.close()


def test_a_kill_before_the_first_checkpoint_starts_over_from_the_seed(tmp_path):
    path = tmp_path / "r"
    d = new_dir(path)
    d.append(0, items())
    d.close()
    random.seed(123)
    d = reopen(path)
    assert d.samples == 0 and d.checkpoint is None and (path / "log.jsonl").read_bytes() == b""
    draw = random.random()
    random.seed(7)
    assert draw == random.random()  # seeded from the run's seed again
    d.close()


def _lose(p):
    (p / "log.jsonl").write_text("".join((p / "log.jsonl").read_text().splitlines(keepends=True)[:5]))


def _edit(p):
    (p / "log.jsonl").write_text((p / "log.jsonl").read_text().replace('"reward": 0.5', '"reward": 0.75', 1))


def _extra_batches(p):
    lines = (p / "log.jsonl").read_text().splitlines(keepends=True)
    more = [json.dumps({**json.loads(x), "sample": 12 + i, "batch": 3 + i // SIZE}) + "\n"
            for i, x in enumerate(lines[:2 * SIZE])]
    (p / "log.jsonl").write_text("".join(lines + more))


def _no_checkpoint(p):
    (p / "checkpoint.pt").unlink()
    (p / "checkpoint.pt.sha256").unlink()


def _not_a_record(p):
    lines = (p / "log.jsonl").read_text().splitlines(keepends=True)
    lines[2] = json.dumps({"sample": 2, "batch": 0, "key": "k2"}) + "\n"  # no reward
    (p / "log.jsonl").write_text("".join(lines))


def _out_of_order(p):
    lines = (p / "log.jsonl").read_text().splitlines(keepends=True)
    (p / "log.jsonl").write_text("".join(lines[:3] + lines[4:]))


@pytest.mark.parametrize("damage, words, kw", [
    (_lose, "log.jsonl holds 5 records but the checkpoint was written after 12 (records were lost)", {}),
    (_edit, "the first 12 records of log.jsonl are not the ones the checkpoint was written after", {}),
    (_extra_batches, "log.jsonl holds 8 records past the checkpoint (a kill leaves at most 4", {}),
    (_no_checkpoint, "checkpoint.pt is missing, but log.jsonl holds 12 records (a kill before the first", {}),
    (_not_a_record, "log.jsonl line 3 is not a whole record", {}),
    (_out_of_order, "log.jsonl line 4 holds sample 4, expected 3 (records are missing or repeated)", {}),
    (lambda p: None, "checkpoint.pt was written by the 'w' agent, not by 'other'", {"writer": "other"}),
])
def test_a_directory_that_cannot_continue_is_refused_and_changes_nothing(tmp_path, damage, words, kw):
    path = finished(tmp_path)
    damage(path)
    refused(path, words, **kw)


def test_rebuild_continues_from_the_log_and_keeps_the_damaged_checkpoint(tmp_path, capsys):
    path = finished(tmp_path)
    _flip(path / "checkpoint.pt")
    bad = (path / "checkpoint.pt").read_bytes()
    log = (path / "log.jsonl").read_bytes()
    d = reopen(path, rebuild=True)
    assert d.rebuilt and d.checkpoint is None and d.samples == 12 and d.batch_index == 3
    assert (path / "log.jsonl").read_bytes() == log
    aside = list(path.glob("checkpoint.pt.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad and not (path / "checkpoint.pt").exists()
    assert "rebuilding" in capsys.readouterr().err
    run_batches(d, 1)
    d.close()
    d = reopen(path)  # a normal run again
    assert d.samples == 16
    d.close()
    refused(path, "intact and agrees with its log", rebuild=True)  # a healthy run is not rebuilt


def test_resume_comes_after_its_checks(tmp_path):
    d = RunDir(finished(tmp_path), writer="w", seed=7, batch_size=SIZE, resumed=True)
    with pytest.raises(RuntimeError, match="after check_resume"):
        d.resume()


def test_a_directory_written_before_the_split_resumes(tmp_path):
    """tests/data/run_before_rundir: 16 rules of an evolution run (seed 5, batches of 8), written by
    nos-gym before ``Run`` was split into ``RunDir`` and ``Run``; read here without the agent."""
    path = tmp_path / "old"
    shutil.copytree(OLD_RUN, path)
    assert run_files(path) == ["config.yaml", "log.jsonl", "checkpoint.pt", "updates.jsonl"]
    d = RunDir(path, writer="evolution", seed=5, batch_size=8, resumed=True, record_keys=("key", "reward"))
    d.lock()
    d.check_resume()
    assert (d.samples, d.batch_index, d.checkpoint["format"], d.checkpoint["agent"]) == (16, 2, 2, "evolution")
    assert set(d.checkpoint["state"]) >= {"rng", "population"}
    d.resume()
    d.open_log()
    d.append(2, [{"key": "k", "reward": 0.0}] * 8)
    d.save({"rng": None})
    d.close()
    assert [r["sample"] for r in read_log(path)] == list(range(24))
    d = RunDir(path, writer="evolution", seed=5, batch_size=8, resumed=True, record_keys=("key", "reward"))
    d.lock()
    d.check_resume()
    assert d.samples == 24 and d.checkpoint["batch"] == 3
    d.close()


# ------------------------------------------------------------------------------ new runs
def test_discard_leaves_no_directory_behind(tmp_path):
    d = new_dir(tmp_path / "a" / "r")
    (tmp_path / "a" / "r" / "checkpoint.pt.tmp").write_bytes(b"half")  # as a kill mid-save leaves it
    assert run_files(tmp_path / "a" / "r") == ["config.yaml", "log.jsonl"]
    d.discard()
    assert not (tmp_path / "a" / "r").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("kept")
    d = new_dir(tmp_path / "b")  # a directory that was there: emptied of the run, not removed
    d.discard()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["mine.txt"]


def test_config_is_rewritten_only_when_it_changed(tmp_path):
    path = finished(tmp_path)
    d = RunDir(path, writer="w", seed=7, batch_size=SIZE, resumed=True)
    before = (path / "config.yaml").stat().st_mtime_ns
    time.sleep(0.01)
    d.write_config({"agent": "w", "seed": 7}, only_if_changed=True)
    assert (path / "config.yaml").stat().st_mtime_ns == before
    d.write_config({"agent": "w", "seed": 8}, only_if_changed=True)
    assert "seed: 8" in (path / "config.yaml").read_text()


# ------------------------------------------------------------------------------ signals
def test_the_first_stop_signal_asks_to_stop_and_the_second_stops_at_once(tmp_path, capsys):
    d = RunDir(tmp_path, writer="w", seed=7, batch_size=SIZE)
    before = signal.getsignal(signal.SIGTERM)
    d.catch_stop_signals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 10
        while not d.stop_requested and time.time() < deadline:
            time.sleep(0.01)
        assert d.stop_requested and d.interrupted and d.stop_signal == signal.SIGTERM
        assert "SIGTERM: stopping after this batch" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
    finally:
        d.release_stop_signals()
    assert signal.getsignal(signal.SIGTERM) is before
