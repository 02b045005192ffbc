"""benchmarks/transfer.py (issue 24): the smoke run end to end, resuming, pairing by seed, and its statistics."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import transfer  # noqa: E402


def _runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs" / "smoke").rglob("*.json"))]


def test_smoke_runs_every_task_and_optimizer_then_resumes(tmp_path):
    out = tmp_path / "t"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "transfer.py"), "--smoke", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"smoke: {seconds:.1f} s")

    runs = _runs(out)
    rates, seeds = len(transfer.MODE_FACTORS["smoke"]), len(transfer.MODE_SEEDS["smoke"])
    assert len(runs) == len(transfer.TASKS) * len(transfer.OPTIMIZERS) * (rates + seeds)
    for task in transfer.TASKS:
        for opt in transfer.OPTIMIZERS:
            mine = [r for r in runs if r["identity"]["task"] == task and r["identity"]["optimizer"] == opt]
            select = [r for r in mine if r["identity"]["phase"] == "select"]
            final = [r for r in mine if r["identity"]["phase"] == "final"]
            assert sorted(r["identity"]["lr"] for r in select) == transfer.rate_grid(task, opt, (0.1, 1.0, 10.0))
            assert {r["identity"]["seed"] for r in select} == {transfer.SELECT_SEED}
            assert {r["identity"]["seed"] for r in final} == set(transfer.MODE_SEEDS["smoke"])
            assert len({r["identity"]["lr"] for r in final}) == 1  # all seeds at the one chosen rate
            assert all(r["test"] is None for r in select)  # the test data plays no part in choosing
            assert all(r["diverged"] or r["test"] is not None for r in final)
    # paired: at one seed every optimizer starts from the same weights and sees the same data
    for task in transfer.TASKS:
        for seed in transfer.MODE_SEEDS["smoke"]:
            same = {(r["init_sha"], r["order_sha"]) for r in runs
                    if r["identity"]["task"] == task and r["identity"]["seed"] == seed}
            assert len(same) == 1, (task, seed)

    table = (out / "smoke" / "table.md").read_text()
    for opt in transfer.OPTIMIZERS:
        assert table.count(f"| {opt} ") == len(transfer.TASKS)
    assert "Holm" in table and "Primary comparison" in table and "s/epoch" in table
    assert (out / "smoke" / "curves.png").stat().st_size > 10_000
    summary = json.loads((out / "smoke" / "summary.json").read_text())
    assert set(summary["tasks"]) == set(transfer.TASKS)

    # again: every run is found and skipped; nothing is rewritten
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    again = transfer.main(["--smoke", "--out", str(out), "--no-progress"])
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == before
    assert all(again["results"][task]["seeds"] == list(transfer.MODE_SEEDS["smoke"]) for task in transfer.TASKS)

    # a saved run made with other settings is a one-line error, not silently reused
    victim = next((out / "runs" / "smoke" / "child").rglob("select-*.json"))
    rec = json.loads(victim.read_text())
    rec["identity"]["epochs"] = 99
    victim.write_text(json.dumps(rec))
    with pytest.raises(SystemExit) as err:
        transfer.main(["--smoke", "--out", str(out), "--no-progress", "--tasks", "child"])
    assert "other settings (epochs differ)" in str(err.value) and "\n" not in str(err.value)


def test_one_line_errors(tmp_path):
    for argv, words in [(["--tasks", "mnist"], "unknown task mnist"),
                        (["--optimizers", "adam", "lion"], "unknown optimizer lion"),
                        (["--seeds", "0-4"], "seed 0 chooses the rates"),
                        (["--seeds", "x"], "--seeds x")]:
        with pytest.raises(SystemExit) as err:
            transfer.main(["--smoke", "--out", str(tmp_path), *argv])
        assert words in str(err.value) and "\n" not in str(err.value)


def test_plan_counts_runs_and_estimates_time(tmp_path, capsys):
    out = transfer.main(["--smoke", "--plan", "--out", str(tmp_path), "--tasks", "child", "charlstm",
                         "--optimizers", "adam", "droprmsprop_sign"])
    text = "\n".join(out["plan"])
    assert "| child " in text and "| charlstm " in text and "core-hours" in text and "wall" in text
    assert not (tmp_path / "runs").exists()  # a plan trains nothing


def test_choose_rate_prefers_val_then_smaller_rate_and_skips_diverged():
    def rec(val, diverged=False):
        return {"val": [0.1, val], "diverged": diverged}

    assert transfer.choose_rate("child", {1e-3: rec(0.5), 1e-2: rec(0.5), 1e-1: rec(0.4)}) == (1e-3, True)
    assert transfer.choose_rate("child", {1e-3: rec(0.4), 1e-2: rec(0.6), 1e-1: rec(0.9, True)}) == (1e-2, False)
    # bits per char: lower is better
    assert transfer.choose_rate("charlstm", {1e-3: rec(3.0), 1e-2: rec(2.5), 1e-1: rec(2.9)}) == (1e-2, False)
    both = {1e-3: {"val": [], "diverged": True}, 1e-2: {"val": [], "diverged": True}}
    assert transfer.choose_rate("child", both)[0] == 1e-3


def test_rate_grids_span_two_orders_with_the_same_number_of_rates():
    for task, centres in transfer.CENTRES.items():
        assert set(centres) == set(transfer.OPTIMIZERS)
        for opt in centres:
            grid = transfer.rate_grid(task, opt)
            assert len(grid) == len(transfer.FACTORS) and grid == sorted(grid)
            assert grid[-1] / grid[0] == pytest.approx(100, rel=1e-6)


def test_t_test_and_holm():
    for t, df in [(12.7062, 1), (4.302653, 2), (2.776445, 4), (2.570582, 5), (2.228139, 10)]:
        assert transfer.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-5)
    assert transfer.t_two_sided_p(1.0, 3) == pytest.approx(0.3910, abs=1e-4)
    assert transfer.t_two_sided_p(0.0, 4) == pytest.approx(1.0)
    adjusted = transfer.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan})
    assert adjusted["a"] == pytest.approx(0.03) and adjusted["c"] == pytest.approx(0.06)
    assert adjusted["b"] == pytest.approx(0.06) and math.isnan(adjusted["d"])


def test_augment_is_a_padded_crop_and_a_flip():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = transfer.augment(images, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    offsets = torch.randint(0, 9, (64, 2), generator=gen)
    flip = torch.rand(64, generator=gen) < 0.5
    assert 0 < int(flip.sum()) < 64
    padded = F.pad(images, (4, 4, 4, 4))
    for i in range(64):
        r, c = offsets[i].tolist()
        ref = padded[i, :, r:r + 32, c:c + 32]
        assert torch.equal(out[i], ref.flip(2) if flip[i] else ref)


def test_corpus_is_split_by_file_deterministically():
    files = transfer.stdlib_files()
    assert [f.name for f in files] == sorted(f.name for f in files)
    parts = {transfer.file_split(f.name) for f in files}
    assert parts == {"train", "val", "test"}
    assert transfer.file_split("os.py") == transfer.file_split("os.py")
    streams, fingerprint, counts = transfer.stdlib_corpus()
    assert sum(counts.values()) == len(files) and len(fingerprint) == 16
    assert len(streams["train"]) > len(streams["val"]) > 0 and len(streams["test"]) > 0
    x, y = transfer.chunks(streams["val"], 64)
    assert torch.equal(x[0, 1:], y[0, :-1]) and int(x.max()) < 256


def test_speed_times_the_optimizers_side_by_side(tmp_path):
    out = transfer.main(["--smoke", "--speed", "--out", str(tmp_path), "--optimizers", "adam", "droprmsprop_sign"])
    text = "\n".join(out["speed"])
    assert "(a) ResNet-20" in text and "interleaved" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith(("| adam ", "| droprmsprop_sign "))}
    assert set(rows) == {"adam", "droprmsprop_sign"}
    assert " 1.000x | " in rows["adam"] and " 1.000-1.000 |" in rows["adam"]  # Adam against itself, round by round
    assert (tmp_path / "smoke" / "speed.txt").read_text().splitlines()[0].startswith("# Training-step speed")
    assert not (tmp_path / "runs").exists()  # it trains no run
