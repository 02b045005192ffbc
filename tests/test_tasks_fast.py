"""The fast tasks (Rosenbrock, quadratic) and the task registry."""

import math

import numpy as np
import pytest
import torch

from nos_gym.dsl import Masker, Program, get_space, parse
from nos_gym.optim import NOSOptimizer, get_rule
from nos_gym.tasks import Result, Task, available, make, register
from nos_gym.tasks.grid import log_progress
from nos_gym.tasks.quadratic import QuadraticTask
from nos_gym.tasks.rosenbrock import (
    LEARNING_RATES,
    START,
    X_RANGE,
    Y_RANGE,
    RosenbrockTask,
    rosenbrock,
    rosenbrock_grad,
)

# numbers that depend on float rounding: CI runs these again with the scalar CPU kernels
pytestmark = pytest.mark.numerics

FIGURE6 = ["powersign", "momentum", "adam", "rmsprop", "sgd"]


def _deterministic_programs(n: int, depth: int, space: str, seed: int) -> list[Program]:
    return Masker(get_space(space), depth).sample_many(n, seed, distinct=True, deterministic=True)


# ------------------------------------------------------------------------- Rosenbrock
def test_rosenbrock_function_gradient_and_start():
    assert rosenbrock(1.0, 1.0) == 0.0
    assert rosenbrock(-1.2, 1.0) == pytest.approx(24.2)
    x = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    rosenbrock(x, y).backward()
    gx, gy = rosenbrock_grad(0.3, -0.7)
    assert (gx, gy) == (pytest.approx(x.grad.item(), rel=1e-12), pytest.approx(y.grad.item(), rel=1e-12))
    assert X_RANGE[0] <= START[0] <= X_RANGE[1] and Y_RANGE[0] <= START[1] <= Y_RANGE[1]
    # irrational offsets to the optimum: not on any learning rate's lattice
    for lr in LEARNING_RATES:
        for offset in (1.0 - START[0], 1.0 - START[1]):
            assert abs(offset / lr - round(offset / lr)) > 1e-3


def test_score_map_is_monotone_with_documented_ends():
    task = RosenbrockTask()
    f0 = task.initial_loss
    assert f0 == pytest.approx(rosenbrock(*START))
    assert task.score(f0) == 0.0 and task.score(10 * f0) == 0.0
    assert task.score(1e-12) == 1.0 and task.score(0.0) == 1.0
    assert task.score(float("nan")) == 0.0 and task.score(float("inf")) == 0.0
    losses = [f0 / 2, 1.0, 1e-2, 1e-5, 1e-9, 1e-11]
    scores = [task.score(v) for v in losses]
    assert all(a < b for a, b in zip(scores, scores[1:]))
    assert task.score(1e-5) == pytest.approx(math.log10(f0 / 1e-5) / math.log10(f0 / 1e-12))
    assert log_progress(100.0, 1.0, 1e-2) == pytest.approx(0.5)


def test_figure6_rules_in_the_dsl_scored_by_the_task():
    """Real numbers, 4,000 iterations x 4 learning rates (docs/results.md, Figure 6, quotes them).

    The paper (Figure 6): PowerSign beats Adam, RMSProp and SGD and is close to Momentum.
    Here PowerSign beats RMSProp, SGD and Momentum by orders of magnitude, and ties with
    Adam (Adam's final loss is 9% lower). The DSL's Momentum is the bias-corrected
    average m, which at lr 1e-2 takes a first step of 1e-2 * |g| ~ 2 and diverges, so on
    this grid it only gets lr 1e-3 (about heavy-ball at 1e-4) and ends level with SGD.

    Only the losses that are the same under every CPU kernel set are pinned
    (``benchmarks/portability.py``; measured with ATEN_CPU_CAPABILITY=default, avx2 and
    avx512). RMSProp's best run (lr 1e-2) is chaotic: it ends at 8.0e-4 with AVX2/AVX-512
    kernels and at 1.2e-2 with the scalar ones, so it is only bounded.
    """
    task = make("rosenbrock")
    results = dict(zip(FIGURE6, task.evaluate([get_rule(n) for n in FIGURE6])))
    best = {n: r.metrics["best_loss"] for n, r in results.items()}
    # same to 4e-4 relative on all three kernel sets (PowerSign 9.6180e-06 with the scalar ones)
    expected = {"powersign": 9.6218e-06, "adam": 8.8106e-06, "momentum": 8.7900e-03, "sgd": 9.4133e-03}
    for name, value in expected.items():
        assert best[name] == pytest.approx(value, rel=1e-3), name
    assert 1e-4 < best["rmsprop"] < 5e-2 and best["rmsprop"] > 10 * best["powersign"]
    reward = {n: r.reward for n, r in results.items()}
    assert reward["powersign"] > reward["rmsprop"] + 0.1
    assert reward["powersign"] > reward["sgd"] + 0.2
    assert reward["powersign"] > reward["momentum"] + 0.2
    assert abs(reward["powersign"] - reward["adam"]) < 0.01
    assert results["powersign"].metrics["best_lr"] == 1e-3 and results["adam"].metrics["best_lr"] == 1e-2
    assert results["sgd"].metrics["final_losses"]["0.1"] is None  # SGD diverges at lr 0.1


def test_batch_of_programs_scores_each_as_alone_and_repeats_exactly():
    task = RosenbrockTask(iterations=300)
    programs = _deterministic_programs(12, 2, "small", seed=5) + [get_rule("adam"), parse("g")]
    batch = task.evaluate(programs)
    again = task.evaluate(programs)
    alone = [task.evaluate([p])[0] for p in programs[:4]]
    assert [r.reward for r in batch] == [r.reward for r in again]
    assert [r.reward for r in batch[:4]] == pytest.approx([r.reward for r in alone], rel=1e-12, abs=1e-15)
    assert len({round(r.reward, 9) for r in batch}) >= 5


def test_batch_matches_a_per_candidate_nos_optimizer_loop():
    task = RosenbrockTask(iterations=200, learning_rates=(1e-3, 1e-2))
    rule = "g * exp(sign(g) * sign(m))"
    losses = task.final_losses([get_rule(rule)])[0]
    for lr, loss in zip(task.learning_rates, losses):
        w = torch.tensor(START, dtype=torch.float64, requires_grad=True)
        opt = NOSOptimizer([w], rule=rule, lr=lr)
        for _ in range(200):
            opt.zero_grad()
            rosenbrock(w[0], w[1]).backward()
            opt.step()
        expected = rosenbrock(w[0], w[1]).item()
        if math.isfinite(expected):
            assert loss == pytest.approx(expected, rel=1e-9)
        else:  # both diverge at the larger learning rate
            assert math.isnan(loss)
    assert math.isfinite(losses[0])


def test_mixed_depths_in_one_batch_score_as_alone():
    programs = [parse("g"), parse("ADAM"), get_rule("powersign"), _deterministic_programs(1, 3, "full", 9)[0]]
    together = RosenbrockTask(iterations=200).final_losses(programs)
    alone = np.concatenate([RosenbrockTask(iterations=200).final_losses([p]) for p in programs])
    np.testing.assert_allclose(together, alone, rtol=1e-12)


def test_a_rule_that_blows_up_scores_zero_with_a_reason():
    task = RosenbrockTask(iterations=100)
    bad, good = task.evaluate([parse("exp(g^2)"), parse("g")])
    assert bad.reward == 0.0 and "diverged" in bad.error
    assert bad.metrics["best_loss"] is None and set(bad.metrics["final_losses"].values()) == {None}
    assert good.reward > 0 and good.error is None


def test_path_follows_the_rule_from_the_start():
    task = RosenbrockTask()
    path = task.path("powersign", lr=1e-3)
    assert path.shape == (4001, 2)
    np.testing.assert_allclose(path[0], START)
    final = task.final_losses([get_rule("powersign")])[0][1]
    assert rosenbrock(path[-1, 0], path[-1, 1]) == pytest.approx(final, rel=1e-12)
    assert np.linalg.norm(path[-1] - [1.0, 1.0]) < 0.01
    assert np.all((path[:, 0] >= X_RANGE[0]) & (path[:, 0] <= X_RANGE[1]))  # stays in Figure 6's frame
    short_task = RosenbrockTask(iterations=300)
    short = short_task.path("sgd")  # at the best learning rate of the grid
    assert short.shape == (301, 2)
    assert rosenbrock(*short[-1]) == pytest.approx(np.nanmin(short_task.final_losses([parse("g")])), rel=1e-12)


def test_rosenbrock_rejects_bad_options_clearly():
    with pytest.raises(ValueError, match="learning_rates"):
        RosenbrockTask(learning_rates=(0.1, -1.0))
    with pytest.raises(ValueError, match="iterations"):
        RosenbrockTask(iterations=0)
    with pytest.raises(ValueError, match="dtype"):
        RosenbrockTask(dtype="float16")


def test_a_stochastic_rule_scores_the_mean_of_its_draws():
    task = RosenbrockTask(iterations=300, draws=3)
    rule = parse("drop(ADAM, 0.1)")
    (r,) = task.evaluate([rule])
    assert r.metrics["draws"] == 3 and len(r.metrics["draw_rewards"]) == 3
    assert r.reward == pytest.approx(sum(r.metrics["draw_rewards"]) / 3, rel=1e-15)
    # draw j is the rule run with stream seed stream_seed(seed, key, j), whoever asks
    by_hand = task._evaluate_draws([rule] * 3, [0, 1, 2])
    assert [x.reward for x in by_hand] == r.metrics["draw_rewards"]
    assert r.metrics["best_loss"] == by_hand[0].metrics["best_loss"]  # the metrics are draw 0's
    assert len(set(r.metrics["draw_rewards"])) == 3
    # the first draws do not change with the number of draws
    assert RosenbrockTask(iterations=300, draws=1).evaluate([rule])[0].reward == r.metrics["draw_rewards"][0]
    # a deterministic rule is run once; another task seed gives other draws
    assert task.evaluate([parse("ADAM")])[0].metrics["draw_rewards"] == [task.evaluate([parse("ADAM")])[0].reward]
    assert RosenbrockTask(iterations=300, draws=3, seed=1).evaluate([rule])[0].metrics["draw_rewards"] != \
        r.metrics["draw_rewards"]


def test_draws_is_a_fingerprinted_option():
    assert RosenbrockTask(draws=2).fingerprint != RosenbrockTask(draws=3).fingerprint
    assert QuadraticTask(draws=2).fingerprint != QuadraticTask(draws=1).fingerprint
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="draws"):
            RosenbrockTask(draws=bad)


# -------------------------------------------------------------------------- quadratic
def test_quadratic_scores_learning_rules_and_is_batch_independent():
    task = QuadraticTask()
    names = ["sgd", "adam", "powersign"]
    programs = [get_rule(n) for n in names] + [parse("1e-1 * w"), parse("noise")]
    results = task.evaluate(programs)
    for r in results[:3]:
        assert 0.3 < r.reward < 0.6 and r.metrics["best_loss"] < task.initial_loss / 100
    assert results[3].reward == 0.0  # weight decay alone walks away from w* = N(0, I), not to it
    assert results[4].reward < 0.05
    alone = task.evaluate([programs[1]])[0]
    assert alone.reward == results[1].reward  # gradient noise is shared by all rows
    assert task.fingerprint != QuadraticTask(noise_std=0.0).fingerprint


# --------------------------------------------------------------------------- registry
class ConstantTask(Task):
    name = "constant"

    def __init__(self, value: float = 0.5):
        self.value = value

    def config(self):
        return {"value": self.value}

    def evaluate(self, programs):
        return [Result(self.value, {"length": len(p.tokens)}) for p in programs]


def test_registry_makes_builtins_by_name_with_options_and_user_tasks():
    assert {"rosenbrock", "quadratic"} <= set(available())
    task = make("rosenbrock", iterations=10)
    assert isinstance(task, RosenbrockTask) and task.iterations == 10
    assert task.fingerprint != make("rosenbrock").fingerprint
    assert make(task) is task
    with pytest.raises(ValueError, match="options"):
        make(task, iterations=5)
    with pytest.raises(ValueError, match="registered tasks"):
        make("no-such-task")
    register("constant-test", ConstantTask, overwrite=True)
    made = make("constant-test", value=0.25)
    assert [r.reward for r in made.evaluate([parse("g")])] == [0.25]
    with pytest.raises(ValueError, match="already registered"):
        register("constant-test", ConstantTask)
    assert Result(float("nan")).reward == 0.0 and Result(3.0).reward == 1.0


def test_fingerprint_follows_the_languages_semantics_version(monkeypatch):
    import nos_gym.tasks.base as base

    before = RosenbrockTask().fingerprint
    monkeypatch.setattr(base, "SEMANTICS_VERSION", base.SEMANTICS_VERSION + 1)
    assert RosenbrockTask().fingerprint != before  # cached scores of other semantics are not reused
