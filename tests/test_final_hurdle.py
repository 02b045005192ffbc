"""The final hurdle: successive halving of the final training, per rule, with a fixed threshold
(``Protocol.final_hurdle`` / ``final_rung``; ``nos_gym.tasks.convnet.fidelity.run_final``). Real CIFAR-10,
the "ci" preset (its final training: 2 epochs of 1,000 images, batch 50, 40 minibatches)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from nos_gym.dsl import parse
from nos_gym.tasks.convnet import PRESETS, ConvNetTask, Protocol
from nos_gym.tasks.convnet.grouped import train_children

pytestmark = pytest.mark.numerics  # accuracies depend on float rounding

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ADAM, SGD = parse("ADAM"), parse("g")
WEIGHT_DECAY = parse("1e-4 * w")  # shrinks the weights a little: learns nothing (chance, ~0.1), diverges nowhere
EXPLODING = parse("exp(g / v)")  # diverges at every rate: never reaches the final training
RULES = [ADAM, WEIGHT_DECAY, SGD, EXPLODING]
HURDLE = 0.2  # ADAM and SGD are well above it at the checkpoint on "ci", the weight decay at chance


def task(**fields) -> ConvNetTask:
    return ConvNetTask("ci", data_dir=SHARED, device="cpu", precision="fp32", **fields)


@pytest.fixture(scope="module")
def scored():
    """The same rules under "ci" with and without the final hurdle, and with a hurdle no rule passes."""
    threads = torch.get_num_threads()  # a module fixture runs before conftest's one_thread
    torch.set_num_threads(1)
    try:
        with_hurdle, plain, stop_all = task(final_hurdle=HURDLE), task(), task(final_hurdle=1.0)
        return (with_hurdle, with_hurdle.evaluate(RULES), plain.evaluate(RULES), stop_all.evaluate(RULES))
    finally:
        torch.set_num_threads(threads)


def checkpoint_accuracy(t: ConvNetTask, program, lr: float) -> float:
    """The final training of ``program`` at ``lr`` to the checkpoint, trained directly."""
    p, data = t.protocol, t.data
    res = train_children([program], [lr], data.train.take(p.train_examples), data.val.take(p.val_examples),
                         epochs=p.train_epochs, batch_size=p.batch_size, seed=p.seed, filters=p.filters,
                         steps=(0, p.final_rung_images // p.batch_size))
    assert res.steps * p.batch_size == p.final_rung_images
    return round(float(res.accuracy[0]), 6)


# ----------------------------------------------------------------------------- scores
def test_survivors_score_exactly_what_they_score_without_the_final_hurdle(scored):
    t, results, plain, _ = scored
    survivors = [(r, q) for r, q in zip(results, plain) if r.metrics["fidelity"] == "full"]
    assert results[0].metrics["fidelity"] == "full"  # ADAM passes
    for r, q in survivors:
        assert r.reward == q.reward  # the same trajectory, continued from the checkpoint: identical
        assert r.metrics["lr"] == q.metrics["lr"] and r.metrics["train_loss"] == q.metrics["train_loss"]
        assert r.metrics["final_rung_accuracy"] >= HURDLE and r.metrics["final_hurdled"] is False
        assert r.metrics["child_images"] == t.protocol.child_images == q.metrics["child_images"]


def test_stopped_rules_score_their_checkpoint_accuracy_and_are_marked(scored):
    t, results, _, stop_all = scored
    decay = results[1]
    assert decay.metrics["fidelity"] == "final-rung" and decay.metrics["final_hurdled"] is True
    assert decay.reward == decay.metrics["final_rung_accuracy"] == decay.metrics["val_accuracy"] < HURDLE
    assert decay.reward == checkpoint_accuracy(t, WEIGHT_DECAY, decay.metrics["lr"])
    assert decay.metrics["hurdled"] is False and decay.metrics["final_hurdle"] == HURDLE
    # a hurdle of 1.0 stops every rule that reaches the final training, at the same checkpoint accuracies
    for r, s in zip(results[:3], stop_all[:3]):
        assert s.metrics["fidelity"] == "final-rung" and s.metrics["final_hurdled"] is True
        assert s.reward == s.metrics["final_rung_accuracy"] == r.metrics["final_rung_accuracy"]
        assert s.metrics["lr"] == r.metrics["lr"]


def test_child_images_count_what_was_trained(scored):
    t, results, _, stop_all = scored
    p = t.protocol
    assert p.final_rung_images == 650  # the default: 2,000 final images / eta 3, whole minibatches of 50
    sweep = len(p.lrs) * p.sweep_examples
    for r in results[:3] + stop_all[:3]:
        assert r.metrics["final_rung_images"] == 650
        want = sweep + (p.final_images if r.metrics["fidelity"] == "full" else 650)
        assert r.metrics["child_images"] == want
    boom = results[3]  # every rate diverged: no final training, no checkpoint
    assert boom.reward == 0.0 and boom.metrics["fidelity"] == "sweep" and boom.metrics["diverged"] is True
    assert boom.metrics["final_rung_accuracy"] is None and boom.metrics["child_images"] <= sweep


def test_a_group_goes_on_with_its_survivors_only(scored):
    """Four rules as one group: the stopped rule leaves it at the checkpoint, the others go on together
    (a smaller group: the same scores up to float rounding, as grouping itself)."""
    _, alone, _, _ = scored
    together = task(final_hurdle=HURDLE, rules_per_group=len(RULES)).evaluate(RULES)
    for r, q in zip(together, alone):
        assert r.metrics["fidelity"] == q.metrics["fidelity"] and r.metrics["lr"] == q.metrics["lr"]
        if q.metrics["lr"] is not None:  # (a rule diverged at every rate stops early only alone)
            assert r.metrics["child_images"] == q.metrics["child_images"]
        assert r.reward == pytest.approx(q.reward, abs=0.011)
    assert together[1].metrics["fidelity"] == "final-rung" and together[0].metrics["fidelity"] == "full"


def test_rules_the_sweep_hurdle_stops_never_reach_the_checkpoint():
    (decay,) = task(hurdle=HURDLE, final_hurdle=HURDLE).evaluate([WEIGHT_DECAY])
    assert decay.metrics["fidelity"] == "sweep" and decay.metrics["hurdled"] is True
    assert decay.metrics["final_rung_accuracy"] is None and decay.metrics["final_hurdled"] is False
    assert decay.metrics["child_images"] == 2 * 1_000


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("bad, match", [
    ({"final_hurdle": 1.5}, "final_hurdle must be a number in"),
    ({"final_hurdle": -0.1}, "final_hurdle must be a number in"),
    ({"final_hurdle": "high"}, "final_hurdle must be a number in"),
    ({"final_hurdle": True}, "final_hurdle must be a number in"),
    ({"final_rung": 500}, "applies with final_hurdle only"),
    ({"final_hurdle": 0.3, "final_rung": 0}, "multiple of batch_size 50"),
    ({"final_hurdle": 0.3, "final_rung": 125}, "multiple of batch_size 50"),
    ({"final_hurdle": 0.3, "final_rung": 500.0}, "multiple of batch_size 50"),
    ({"final_hurdle": 0.3, "final_rung": 2_000}, "fewer images than the final training's 2,000"),
    ({"final_hurdle": 0.3, "train_examples": 50, "train_epochs": 1}, "the default"),  # 1 minibatch: no room
])
def test_bad_final_hurdle_options_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        Protocol.preset("ci", **bad)


def test_draws_are_refused_with_the_final_hurdle():
    with pytest.raises(ValueError, match="draws > 1"):
        task(final_hurdle=0.3, draws=2)
    task(draws=2)  # the fixed protocol still takes them


def digest(p: Protocol) -> str:
    return hashlib.sha256(json.dumps(p.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def test_protocols_without_the_final_hurdle_keep_their_dicts_and_fingerprints():
    # the protocol dicts (what the fingerprint hashes) of these protocols before final_hurdle existed
    before = {("ci", ()): "f9b5be34e9109bcc", ("cpu", ()): "98d0b92e3e6e9192",
              ("ci", (("schedule", "halving"), ("hurdle", 0.277))): "b86d7e7c052d9cd2",
              ("cpu", (("schedule", "halving"), ("hurdle", 0.277))): "fa42d23dbdaa5290",
              ("cpu", (("schedule", "halving"),)): "83a0e95b6ae2d589"}
    for (name, kw), want in before.items():
        p = Protocol.preset(name, **dict(kw))
        assert "final_hurdle" not in p.to_dict() and "final_rung" not in p.to_dict()
        assert digest(p) == want, (name, kw)
        assert digest(Protocol.preset(name, **dict(kw), final_hurdle=None)) == want
    for p in PRESETS.values():
        assert not p.multi_fidelity and p.final_rung_images is None
    on = Protocol.preset("cpu", final_hurdle=0.3)
    assert on.multi_fidelity and on.to_dict()["final_hurdle"] == 0.3 and on.to_dict()["final_rung"] is None
    assert on.final_rung_images == 5_300  # 16,000 / 3, whole minibatches of 50
    assert Protocol.from_dict(on.to_dict()) == on
    fps = {task().fingerprint, task(final_hurdle=0.3).fingerprint, task(final_hurdle=0.4).fingerprint,
           task(final_hurdle=0.3, final_rung=500).fingerprint, task(hurdle=0.3).fingerprint}
    assert len(fps) == 5
