"""Reproducible rewards: a rule's score depends on the task and the rule only.

Not on the batch it came in, its position there, the batch size, the backend (serial,
process, Ray) or the rules in flight: a stochastic rule (drop, noise) draws from its own
stream, seeded by the task seed and the rule (``nos_gym.engine.random_streams``), and scores the
mean of the task's ``draws`` evaluations.
"""

from pathlib import Path

import pytest

from nos_gym.dsl import Masker, get_space, parse
from nos_gym.evaluation import Evaluator
from nos_gym.tasks import make

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STOCHASTIC = [parse(t) for t in ("drop(ADAM, 0.1)", "g + noise", "drop(g, 0.3) * exp(sign(g) * sign(m))")]
POSITIONS = (0, 31, 63)
# quadratic: two draws (its default is one) so that averaging runs there too
FAST = {"rosenbrock": {"iterations": 1000}, "quadratic": {"iterations": 150, "draws": 2}}
# the "ci" preset at half size, as tests/test_evaluation.py runs it
CI = dict(preset="ci", data_dir=str(SHARED), device="cpu", sweep_examples=500, train_examples=500, val_examples=250)
# the Evaluator's funnel off: these tests are about the task's own scores
PLAIN = dict(fingerprints=False, screen=False)


def _others(n: int) -> list:
    """n random rules of the full space, stochastic and not, none equivalent to STOCHASTIC's."""
    keys = {p.canonical_key for p in STOCHASTIC}
    pool = Masker(get_space("full"), 2).sample_many(3 * n, 11, distinct=True)
    return [p for p in pool if p.canonical_key not in keys][:n]


def _same(a, b) -> None:
    assert (a.reward, a.metrics["draw_rewards"]) == (b.reward, b.metrics["draw_rewards"])


@pytest.fixture(scope="module")
def others():
    return _others(61)


@pytest.mark.parametrize("name", ["rosenbrock", "quadratic"])
def test_a_stochastic_rule_scores_the_same_alone_and_anywhere_in_a_batch_of_64(name, others):
    task = make(name, **FAST[name])
    alone = {p.canonical_key: task.evaluate([p])[0] for p in STOCHASTIC}
    for r in alone.values():
        assert r.metrics["draws"] == task.draws == len(r.metrics["draw_rewards"])
    assert len(set(alone[STOCHASTIC[1].canonical_key].metrics["draw_rewards"])) > 1  # the draws differ
    for shift in range(3):  # each rule visits each position
        batch = list(others)
        placed = {}
        for k, pos in enumerate(POSITIONS):
            rule = STOCHASTIC[(k + shift) % 3]
            batch.insert(pos, rule)
            placed[pos] = rule
        assert len(batch) == 64
        results = task.evaluate(batch)
        for pos, rule in placed.items():
            assert batch[pos] is rule
            _same(results[pos], alone[rule.canonical_key])
    # a deterministic rule is run once
    det = task.evaluate([parse("ADAM")])[0]
    assert det.metrics["draws"] == 1 and det.metrics["draw_rewards"] == [det.reward]


def test_the_process_backend_scores_as_the_serial_one_whatever_the_job(others):
    task = make("rosenbrock", **FAST["rosenbrock"])
    alone = task.evaluate(STOCHASTIC)  # one batch of 3, serial, here
    batch = others[:20] + STOCHASTIC + others[20:40]
    with Evaluator(task, backend="process", workers=2, job_size=len(batch) // 2, **PLAIN) as ev:
        results = ev.evaluate(batch)  # two jobs: the rules in the middle of the first or the second
    for k in range(len(STOCHASTIC)):
        _same(results[20 + k], alone[k])
    with Evaluator(task, backend="process", workers=2, job_size=1, **PLAIN) as ev:  # one rule per job
        for got, expected in zip(ev.evaluate(STOCHASTIC), alone):
            _same(got, expected)


def test_ray_scores_as_serial(others):
    ray = pytest.importorskip("ray")
    task = make("quadratic", **FAST["quadratic"])
    batch = others[:6] + STOCHASTIC[:2]
    expected = task.evaluate(STOCHASTIC[:2])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with Evaluator(task, backend="ray", job_size=4, **PLAIN) as ev:
            results = ev.evaluate(batch)
    finally:
        ray.shutdown()
    for got, want in zip(results[6:], expected):
        _same(got, want)


def test_convnet_scores_a_stochastic_rule_the_same_alone_in_a_group_and_in_a_worker():
    rule = parse("drop(g, 0.3) * exp(sign(g) * sign(m))")
    group = [parse("ADAM"), parse("g + noise"), rule]
    alone = make("convnet-cifar10", rules_per_group=1, **CI).evaluate([rule])[0]
    grouped = make("convnet-cifar10", rules_per_group=3, **CI).evaluate(group)  # one group: 6 + 3 children
    _same(grouped[2], alone)
    assert alone.metrics["draws"] == 1  # the convnet task's default: see docs/guarantees.md
    with Evaluator("convnet-cifar10", backend="process", workers=1, job_size=2, rules_per_group=2,
                   **PLAIN, **CI) as ev:
        in_worker = ev.evaluate([rule, parse("m")])[0]  # first of its group now
    _same(in_worker, alone)


def test_the_same_command_logs_the_same_rules_and_rewards_whatever_the_store_holds(tmp_path):
    """Issue 12: a run's log must not depend on what other runs left in the store."""
    from nos_gym.agents import load_agent, read_log

    trpo, rand = load_agent("trpo_lstm"), load_agent("random_search")
    common = ["--task", "rosenbrock", "--task-options", "{iterations: 200}", "--no-progress", "--space", "small",
              "--depth", "2", "--num-envs", "50", "--total-rules", "200", "--seed", "7"]
    trpo.main(common + ["--run-dir", str(tmp_path / "alone"), "--store", str(tmp_path / "empty.sqlite")])
    shared = str(tmp_path / "shared.sqlite")
    rand.main(["--task", "rosenbrock", "--task-options", "{iterations: 200}", "--no-progress", "--space", "small",
               "--depth", "2", "--num-envs", "50", "--total-rules", "300", "--seed", "8",
               "--run-dir", str(tmp_path / "other"), "--store", shared])
    trpo.main(common + ["--run-dir", str(tmp_path / "after"), "--store", shared])

    def what(run: str) -> list[tuple]:
        return [(r["sample"], r["key"], r["reward"], r["error"]) for r in read_log(tmp_path / run)]

    alone, after = what("alone"), what("after")
    assert len(alone) == 200 and alone == after
    reused = [r for r in read_log(tmp_path / "after") if r["source"] == "store"]
    assert reused  # the second run really read scores the other run had stored
