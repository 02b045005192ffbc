"""Multi-fidelity scoring of the convnet task: successive halving over the rates, the hurdle,
``nos-gym promote`` and the new Protocol fields (real CIFAR-10, tiny protocols)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from nos_gym.cli import main
from nos_gym.data import load_cifar10
from nos_gym.dsl import parse
from nos_gym.store import Store
from nos_gym.tasks import Result, make
from nos_gym.tasks.convnet import PRESETS, ConvNetTask, Protocol
from nos_gym.tasks.convnet.fidelity import Hurdle, kendall_tau, run_sweep
from nos_gym.tasks.convnet.grouped import train_children
from nos_gym.tasks.convnet.protocol import rung_plan

pytestmark = pytest.mark.numerics  # accuracies depend on float rounding

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ADAM, SGD = parse("ADAM"), parse("g")
WEIGHT_DECAY = parse("1e-4 * w")  # shrinks the weights a little: learns nothing, diverges nowhere
EXPLODING = parse("exp(g / v)")
FIVE_RATES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# 5 rates x 1,000 images, 1 epoch of 1,000 at the best, batch 50: seconds on one core
TINY = dict(lrs=FIVE_RATES, sweep_examples=1_000, train_examples=1_000, train_epochs=1, val_examples=500,
            batch_size=50)


def task(**fields) -> ConvNetTask:
    return ConvNetTask("ci", data_dir=SHARED, device="cpu", precision="fp32", **fields)


# ----------------------------------------------------------------------------- the protocol
def test_fixed_presets_keep_their_dicts_and_fingerprints():
    old_fields = {"lrs", "sweep_examples", "sweep_epochs", "train_examples", "train_epochs", "val_examples",
                  "batch_size", "filters", "seed", "split_seed"}
    for name, p in PRESETS.items():
        assert set(p.to_dict()) == old_fields, name  # the new fields stay out until set
        assert not p.multi_fidelity
    mf = Protocol.preset("ci", schedule="halving", lrs=FIVE_RATES)
    assert mf.to_dict()["schedule"] == "halving" and mf.to_dict()["hurdle"] is None
    assert Protocol.from_dict(mf.to_dict()) == mf
    fps = {task().fingerprint, task(hurdle=0.3).fingerprint, task(hurdle=0.4).fingerprint,
           task(hurdle_quantile=0.75).fingerprint, task(**TINY).fingerprint, task(**TINY, schedule="halving").fingerprint}
    assert len(fps) == 6


@pytest.mark.parametrize("bad, match", [
    ({"schedule": "hyperband"}, "schedule"),
    ({"schedule": "halving", "eta": 1}, "eta"),
    ({"schedule": "halving", "rungs": 0}, "rungs"),
    ({"rungs": 2}, "halving"),
    ({"hurdle": 1.5}, "hurdle"),
    ({"hurdle": "high"}, "hurdle"),
    ({"hurdle_quantile": -0.1}, "hurdle_quantile"),
    ({"hurdle": 0.3, "hurdle_quantile": 0.75}, "not both"),
    ({"hurdle_warmup": -1, "hurdle_quantile": 0.5}, "hurdle_warmup"),
    ({"schedule": "halving", "rungs": 6, "lrs": FIVE_RATES}, "too short"),  # 20 minibatches cannot make 6 rungs
])
def test_bad_fidelity_fields_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        Protocol.preset("ci", **bad)


def test_rung_plan():
    assert rung_plan(5, 20, "halving", 3) == [(5, 7), (2, 20)]
    assert rung_plan(7, 100, "halving", 3) == [(7, 34), (3, 100)]
    assert rung_plan(7, 100, "halving", 2) == [(7, 25), (4, 50), (2, 100)]
    assert rung_plan(7, 90, "halving", 3, rungs=3) == [(7, 10), (3, 30), (1, 90)]
    assert rung_plan(2, 20, "halving", 3) == [(2, 20)]  # too few rates to halve
    assert rung_plan(7, 100, "fixed") == [(7, 100)]


def test_hurdle_fixed_and_rolling():
    fixed = Hurdle(threshold=0.3)
    assert fixed.passes(0.3) and not fixed.passes(0.29)
    rolling = Hurdle(quantile=0.5, warmup=3)
    for acc in (0.1, 0.5):
        assert rolling.passes(0.0)  # warming up: everyone passes
        rolling.observe(acc)
    rolling.observe(0.3)
    assert rolling.current() == pytest.approx(0.3) and rolling.passes(0.3) and not rolling.passes(0.2)
    assert Hurdle().current() is None and not Hurdle().active


# ----------------------------------------------------------------------------- successive halving
def test_resumed_training_continues_exactly():
    """Steps (0, a), then (a, b) for some children, resumed == steps (0, b) for them."""
    ds = load_cifar10(SHARED)
    progs, lrs = [ADAM, SGD, parse("g * exp(sign(g) * sign(m))")], [1e-3, 0.1, 0.1]
    kw = dict(epochs=1, batch_size=50)
    whole = train_children(progs, lrs, ds.train.take(500), ds.val.take(200), **kw)
    first = train_children(progs, lrs, ds.train.take(500), ds.val.take(200), steps=(0, 4), **kw)
    rest = train_children(progs[1:], lrs[1:], ds.train.take(500), ds.val.take(200), steps=(4, 10),
                          resume=first.select([1, 2]), **kw)
    assert first.steps == 4 and rest.steps == 6 and rest.child_images == 2 * 6 * 50
    torch.testing.assert_close(rest.net.flat.detach(), whole.net.flat.detach()[1:], rtol=1e-4, atol=1e-5)
    assert torch.allclose(rest.accuracy, whole.accuracy[1:], atol=0.011)


@pytest.fixture(scope="module")
def halving_vs_fixed():
    # a module fixture runs before conftest's one_thread: one thread here too (two stall a busy 2-core box)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        halving = task(**TINY, schedule="halving")
        fixed = task(**TINY)
        # one rule per group, as ConvNetTask does on a CPU (a group of 10 children is slower there than 2 of 5)
        return halving.evaluate([ADAM, SGD]), run_sweep(fixed, [ADAM]) + run_sweep(fixed, [SGD]), halving.protocol
    finally:
        torch.set_num_threads(threads)


def test_halving_trains_fewer_images_and_picks_the_fixed_sweeps_rate(halving_vs_fixed):
    results, fixed_sweeps, p = halving_vs_fixed
    adam, sgd = results
    # Adam's 1e-3 is clear; SGD's 0.01 and 0.1 lie 1-4 images apart on 500 validation images, and the
    # kernel set decides (convnet v2: 0.270 vs 0.278 with AVX-512, 0.266 vs 0.264 with AVX2)
    assert adam.metrics["lr"] == 1e-3 and sgd.metrics["lr"] in (0.01, 0.1)
    for r, f in zip(results, fixed_sweeps):
        assert r.metrics["lr"] == f.lr
        assert r.metrics["sweep_accuracy"] == pytest.approx(f.accuracy, abs=0.011)  # the same child, continued
        assert r.metrics["fidelity"] == "full" and r.reward > 0.25
        # rung 1: all 5 rates for 7 of the 20 minibatches; rung 2: the best 2 for the other 13
        assert [len(rung["rates"]) for rung in r.metrics["rungs"]] == [5, 2]
        sweep = 5 * 7 * 50 + 2 * 13 * 50
        assert r.metrics["child_images"] == sweep + p.final_images
        assert f.child_images == 5 * 20 * 50 > sweep


# ----------------------------------------------------------------------------- the hurdle
def test_the_hurdle_marks_fidelity_and_cost():
    t = task(hurdle=0.2)
    adam, decay, boom = t.evaluate([ADAM, WEIGHT_DECAY, EXPLODING])
    p = t.protocol
    sweep_images = len(p.lrs) * p.sweep_examples
    assert adam.metrics["fidelity"] == "full" and adam.metrics["sweep_accuracy"] >= 0.2
    assert adam.metrics["child_images"] == p.child_images and adam.metrics["hurdle"] == 0.2
    assert decay.metrics["fidelity"] == "sweep" and decay.metrics["hurdled"] is True
    assert decay.reward == decay.metrics["sweep_accuracy"] < 0.2
    assert decay.metrics["child_images"] == sweep_images
    assert boom.reward == 0.0 and boom.metrics["diverged"] is True and boom.metrics["hurdled"] is False
    # passing rules score what the fixed protocol gives
    (plain,) = task().evaluate([ADAM])
    assert adam.reward == pytest.approx(plain.reward, abs=1e-6) and adam.metrics["lr"] == plain.metrics["lr"]


# ----------------------------------------------------------------------------- promotion
def _fake_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory as a search leaves it: config.yaml, log.jsonl (rewards of a cheaper protocol)."""
    run, store = tmp_path / "run", tmp_path / "store.sqlite"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "agent": "random_search", "task": "convnet-cifar10", "store": str(store),
        "task_options": {"preset": "ci", "hurdle": 0.9, "data_dir": str(SHARED), "device": "cpu"}}))
    lines = []
    for i, (prog, reward) in enumerate([(WEIGHT_DECAY, 0.31), (SGD, 0.30), (ADAM, 0.29), (EXPLODING, 0.0)]):
        lines.append(json.dumps({"sample": i, "batch": 0, "tokens": list(prog.tokens), "rule": str(prog),
                                 "key": prog.canonical_key, "reward": reward, "cached": False}))
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    return run, store


def test_promote_rescores_a_runs_best_rules_at_the_new_fidelity(tmp_path, capsys):
    run, store = _fake_run(tmp_path)
    assert main(["promote", str(run), "--preset", "ci", "--top", "3", "--backend", "serial"]) == 0
    out = capsys.readouterr().out
    board = json.loads((run / "promoted-ci.json").read_text())
    assert (run / "promoted-ci.txt").read_text().strip() == out.strip()
    target = make("convnet-cifar10", preset="ci", data_dir=SHARED, device="cpu")  # the run's hurdle is gone
    assert board["fingerprint"] == target.fingerprint and board["options"]["preset"] == "ci"
    rules = board["rules"]
    assert rules[-1]["rule"] == str(WEIGHT_DECAY) and rules[-1]["previous_rank"] == 1  # first to last
    assert {d["rule"] for d in rules} == {str(WEIGHT_DECAY), str(SGD), str(ADAM)}
    # trained at the new fidelity (or screened by the Evaluator's probe, as weight decay is: it ignores g)
    assert all(d["fidelity"] == "full" or d["source"] == "screen" for d in rules)
    assert [d["rank"] for d in rules] == [1, 2, 3]
    assert rules[0]["reward"] >= rules[1]["reward"] >= rules[2]["reward"]
    with Store(store, readonly=True) as s:  # the new scores are stored under the new fingerprint
        assert {r.key for r in s.records(target.fingerprint)} >= {str(ADAM.canonical_key), SGD.canonical_key}

    # a store as the source: the best rules of its other setup; known scores are reused, not retrained
    with Store(store) as s:
        s.register_task("convnet-cifar10-cheap", "convnet-cifar10", {"protocol": "cheaper"})
        for prog, reward in [(ADAM, 0.5), (SGD, 0.1)]:
            s.put("convnet-cifar10-cheap", prog, Result(reward, {"fidelity": "sweep"}))
    assert main(["promote", str(store), "--preset", "ci", "--top", "1", "--backend", "serial",
                 "--task-options", f"{{data_dir: {SHARED}, device: cpu}}"]) == 0
    board = json.loads((tmp_path / "store-promoted-ci.json").read_text())
    assert [d["rule"] for d in board["rules"]] == [str(ADAM)] and board["rules"][0]["cached"] is True
    assert board["fingerprint"] == target.fingerprint


def test_promote_refuses_bad_input(tmp_path, capsys):
    run, _ = _fake_run(tmp_path)
    assert main(["promote", str(run)]) == 2
    assert "--preset" in capsys.readouterr().err
    assert main(["promote", str(tmp_path / "nothing"), "--preset", "ci"]) == 2
    assert main(["promote", str(run), "--preset", "huge", "--backend", "serial"]) == 2
    assert "huge" in capsys.readouterr().err


def test_kendall_tau():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(2 / 3)
