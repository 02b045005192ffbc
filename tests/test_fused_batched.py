"""BatchedRule's fused path (nos_gym.engine.fused_batched): today's executor's trajectories and draws, the fallback.

A cold compile of the opcode step costs tens of seconds on a loaded 2-core machine, so every
rule checked here runs in ONE batch -- the Table 1 rules, 64 random deterministic rules and
some stochastic ones -- which is one code shape (depth 3, all averages, noise and drop),
compiled twice per process: rows of 37 numbers (per-row tables) and rows of 2 (per-entry
tables, ``flat``). The trajectories are computed once per module (a fixture) and the tests
check parts of them.
"""

import warnings

import pytest
import torch
from numerics_helpers import max_rel_error as _rel

from nos_gym.dsl import Masker, get_space, parse
from nos_gym.engine import fused, fused_batched
from nos_gym.engine.rules import FUSED_FLAT_BELOW, BatchedRule
from nos_gym.optim import table1
from nos_gym.tasks.rosenbrock import RosenbrockTask

pytestmark = pytest.mark.numerics

STEPS = 100
N_RANDOM = 64
STOCHASTIC = ["noise", "drop(1, 0.3)", "drop(g, 0.5) + noise", "drop(m, 0.1) * exp(sign(g) * sign(noise))",
              "clip(drop(ADAM, 0.3), 1e-3) - 1e-2 * w"]


def _programs():
    t1 = [parse(t) for t in table1().values()]
    space = get_space("full")
    random = (Masker(space, 1).sample_many(N_RANDOM // 2, 21, distinct=True, deterministic=True)
              + Masker(space, 2).sample_many(N_RANDOM - N_RANDOM // 2, 22, distinct=True, deterministic=True))
    many = Masker(space, 2).sample_many(200, 23, distinct=True)
    stochastic = [parse(t) for t in STOCHASTIC] + [p for p in many if p.stochastic][:11]
    return {"table1": t1, "random": random, "stochastic": stochastic}


def _trajectory(rule: BatchedRule, w0: torch.Tensor, target: torch.Tensor, lr: float = 1e-3):
    """Each row minimises |w - target|^2 / 4; the weights and the direction at every step."""
    w = w0.clone()
    state = rule.init(w)
    ws, ds = [], []
    for _ in range(STEPS):
        d, state = rule.update(state, (w - target) * 0.5, w)
        w = w - lr * d
        ws.append(w)
        ds.append(d)
    return torch.stack(ws), torch.stack(ds)


@pytest.fixture(scope="module")
def runs():
    """Per width: (the programs by kind, their row ranges, fused and default trajectories)."""
    kinds = _programs()
    programs, ranges = [], {}
    for kind, ps in kinds.items():
        ranges[kind] = (len(programs), len(programs) + len(ps))
        programs += ps
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests (conftest): the thread count is part of dynamo's guards
    try:
        for width in (37, 2):  # per-row tables, per-entry tables (flat)
            gen = torch.Generator().manual_seed(width)
            w0 = torch.randn(len(programs), width, generator=gen, dtype=torch.float64)
            target = torch.randn(len(programs), width, generator=gen, dtype=torch.float64)
            fast = BatchedRule(programs, seed=5, fused=True)
            ref = BatchedRule(programs, seed=5, fused=False)
            a, b = _trajectory(fast, w0, target), _trajectory(ref, w0, target)
            assert fast.fused is True and ref.fused is False, "the fused path did not run"
            out[width] = (programs, ranges, a, b)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("width", [37, 2], ids=["rows-of-37", "rows-of-2-flat"])
@pytest.mark.parametrize("kind", ["table1", "random", "stochastic"])
def test_fused_trajectories_equal_todays_executor(runs, kind, width):
    programs, ranges, (wf, _), (wd, _) = runs[width]
    lo, hi = ranges[kind]
    assert hi - lo >= (20 if kind == "table1" else 16)
    for row in range(lo, hi):
        for step in range(STEPS):
            err = _rel(wf[step, row], wd[step, row])
            assert err < 1e-6, f"{programs[row]}: step {step}: relative difference {err:.2e}"


@pytest.mark.parametrize("width", [37, 2], ids=["rows-of-37", "rows-of-2-flat"])
def test_seeded_stochastic_rules_draw_the_same_numbers(runs, width):
    # "noise" and "drop(1, 0.3)": the direction IS the draw (the normals, the mask)
    programs, ranges, (_, df), (_, dd) = runs[width]
    lo = ranges["stochastic"][0]
    noise, mask = df[:, lo], df[:, lo + 1]
    assert torch.equal(noise, dd[:, lo]) and torch.equal(mask, dd[:, lo + 1])
    assert noise.std().item() == pytest.approx(0.01, rel=0.2)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask == 0).double().mean().item() == pytest.approx(0.3, abs=0.1)
    assert not torch.equal(noise[0], noise[1])  # fresh each step


def test_flat_layout_is_chosen_for_short_rows():
    assert 2 < FUSED_FLAT_BELOW <= 37


def test_fused_none_chooses_the_default_executor_for_small_batches():
    rule = BatchedRule([parse("g"), parse("ADAM")])  # fused=None by default
    w = torch.zeros(2, 8)
    rule.update(rule.init(w), torch.ones(2, 8), w)
    assert rule.fused_arg is None and rule.fused is False
    with pytest.raises(ValueError, match="fused"):
        BatchedRule([parse("g")], fused="yes")


def test_rosenbrock_fused_is_opt_in_and_has_its_own_fingerprint(runs):
    default = RosenbrockTask()
    assert default.fused is False and "fused" not in default.config()
    assert RosenbrockTask(fused=True).fingerprint != default.fingerprint
    # the fixture's programs again, as Rosenbrock rows of 2 (one code shape: no recompile)
    programs = runs[2][0]
    fast = RosenbrockTask(iterations=24, fused=True).final_losses(programs)
    slow = RosenbrockTask(iterations=24).final_losses(programs)
    both = torch.isfinite(torch.from_numpy(fast)) & torch.isfinite(torch.from_numpy(slow))
    assert torch.equal(torch.isfinite(torch.from_numpy(fast)), torch.isfinite(torch.from_numpy(slow)))
    assert torch.allclose(torch.from_numpy(fast)[both], torch.from_numpy(slow)[both], rtol=1e-6)


def test_select_keeps_the_fused_path(runs):
    programs = runs[37][0]
    rule = BatchedRule(programs, seed=5, fused=True)
    w = torch.randn(len(programs), 37, dtype=torch.float64)
    _, state = rule.update(rule.init(w), w, w)
    d, _ = rule.update(state, w, w)
    sub, sub_state = rule.select(list(range(0, len(programs), 2)), state)
    assert sub.fused_arg is True
    d2, _ = sub.update(sub_state, w[::2], w[::2])  # rows not contiguous: fine
    assert sub.fused is True
    # the kept rows go on with the same numbers (a row's arithmetic does not depend on the batch)
    assert torch.equal(d2.nan_to_num(), d[::2].nan_to_num()) and torch.equal(d2.isnan(), d[::2].isnan())


def test_fallback_when_compiling_fails_warns_once_and_matches(monkeypatch, compiling_fails):
    monkeypatch.setattr(fused_batched, "_codes", {})
    programs = [parse("g * exp(sign(g) * sign(m))"), parse("drop(g, 0.3) + noise"), parse("ADAM")]
    w0 = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = BatchedRule(programs, seed=2, fused=True)
        a = _trajectory(fast, w0, w0 * 0)
        b = _trajectory(BatchedRule(programs[:1], seed=2, fused=True), w0[:1], w0[:1] * 0)  # another code shape
    ours = [w for w in caught if issubclass(w.category, fused.FusedUnavailableWarning)]
    assert len(ours) == 1 and "no C++ compiler here" in str(ours[0].message)
    assert fast.fused is False and not fused.available()
    ref = _trajectory(BatchedRule(programs, seed=2, fused=False), w0, w0 * 0)
    assert torch.equal(a[0], ref[0]) and torch.equal(a[1], ref[1])
    assert torch.equal(b[0], ref[0][:, :1])


def test_small_fused_steps_run_on_one_thread_and_leave_the_thread_count(runs):
    programs = runs[37][0]
    w = torch.randn(len(programs), 37, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    one, _ = BatchedRule(programs, seed=5, fused=True).update(BatchedRule(programs).init(w), w, w)
    torch.set_num_threads(2)  # conftest's fixture restores it
    rule = BatchedRule(programs, seed=5, fused=True)
    two, _ = rule.update(rule.init(w), w, w)
    assert rule.fused is True and torch.get_num_threads() == 2
    assert torch.equal(one.nan_to_num(), two.nan_to_num())
