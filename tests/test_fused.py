"""The fused path (nos_gym.engine.fused): the same trajectories as the foreach path, the fallback, state_dict.

Compiling costs seconds per rule, so most rules are checked in two cheap ways: the generated
step of every rule run *eagerly* (the Python that inductor compiles) against the foreach path,
and many rules' generated steps compiled together as *one* program (one inductor build)
against the foreach path. ``NOSOptimizer(fused=True)`` end to end (its own compile per rule)
runs for a representative subset: a rule per operand family (m, v and y averages, ADAM, drop,
noise, weights) and the two sign classes with a decay schedule.
"""

import io
import warnings

import pytest
import torch
from numerics_helpers import max_rel_error as _rel

from nos_gym.dsl import Masker, get_space, parse
from nos_gym.engine import fused
from nos_gym.engine.rules import Draws, Hyper
from nos_gym.optim import AddSign, NOSOptimizer, PowerSign, get_rule, table1

pytestmark = pytest.mark.numerics

STEPS = 100
N_RANDOM = 64  # random rules of the 'full' space (deterministic and stochastic), depth 1 and 2


# --------------------------------------------------------------- quadratic trajectories
def _quadratic(n: int = 97, dtype=torch.float64):
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(n, generator=gen, dtype=dtype)
    target = torch.randn(n, generator=gen, dtype=dtype)
    return w0, target


def _foreach_run(program, w0, target, seed=3, lr=1e-3):
    w = torch.nn.Parameter(w0.clone())
    opt = NOSOptimizer([w], rule=program, lr=lr, seed=seed, fused=False)
    out = []
    for _ in range(STEPS):
        w.grad = (w.detach() - target) * 0.5
        opt.step()
        out.append(w.detach().clone())
    return out, opt.stream_seed


def _fused_inputs(fs, w, t, seed, lr, hyper, g):
    s = torch.tensor([lr, 1 - hyper.beta1 ** t, 1 - hyper.beta2 ** t, 1 - hyper.beta3 ** t], dtype=w.dtype)
    ints = torch.tensor([0, *fused.step_keys(seed, t, fs.drop_sites)]) if fs.drop_sites else None
    noise = [Draws(seed, t, [0]).noise(site, [g], hyper.noise_std)[0] for site in fs.noise_sites]
    return s, ints, noise


def _fused_runs(programs, w0, target, seeds, compiled: bool, lr=1e-3):
    """Every program's generated step, driven by hand; compiled: all of them as one program."""
    hyper = Hyper()
    steps = [fused.rule_step(p, hyper) for p in programs]
    fns = [fs.fn for fs in steps]

    def many(ws, gs, ms, vs, ys, ss, intss, noises):
        for i, fn in enumerate(fns):
            fn(ws[i], gs[i], ms[i], vs[i], ys[i], ss[i], intss[i], noises[i])

    run = torch.compile(many, dynamic=True, fullgraph=True) if compiled else many
    ws = [w0.clone() for _ in programs]
    ms, vs, ys = ([torch.zeros_like(w0) for _ in programs] for _ in range(3))
    traj = [[] for _ in programs]
    for t in range(1, STEPS + 1):
        gs = [(w - target) * 0.5 for w in ws]
        inputs = [_fused_inputs(fs, w, t, seed, lr, hyper, g) for fs, w, seed, g in zip(steps, ws, seeds, gs)]
        ss, intss, noises = (list(x) for x in zip(*inputs))
        with torch.no_grad():
            run(ws, gs, ms, vs, ys, ss, intss, noises)
        for i, w in enumerate(ws):
            traj[i].append(w.clone())
    return traj


def _random_programs():
    space = get_space("full")
    return (Masker(space, 1).sample_many(N_RANDOM // 2, seed=11)
            + Masker(space, 2).sample_many(N_RANDOM - N_RANDOM // 2, seed=12))


def _check_many(programs, compiled):
    w0, target = _quadratic()
    refs = [_foreach_run(p, w0, target) for p in programs]
    trajs = _fused_runs(programs, w0, target, [seed for _, seed in refs], compiled)
    for p, (ref, _), traj in zip(programs, refs, trajs):
        for step, (a, b) in enumerate(zip(traj, ref)):
            err = _rel(a, b)
            assert err < 1e-6, f"{p}: step {step}: relative difference {err:.2e}"


def test_generated_steps_of_table1_and_random_rules_equal_the_foreach_path_eagerly():
    programs = [parse(t) for t in table1().values()] + _random_programs()
    assert sum(p.stochastic for p in programs) >= 10  # drop and noise are covered
    _check_many(programs, compiled=False)


def test_table1_rules_compiled_as_one_program_equal_the_foreach_path():
    _check_many([parse(t) for t in table1().values()], compiled=True)


def test_random_rules_compiled_as_one_program_equal_the_foreach_path():
    _check_many(_random_programs(), compiled=True)


# ------------------------------------------------------------------ through the optimizer
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


_X = torch.randn(128, 6, generator=torch.Generator().manual_seed(1))
_Y = _X @ torch.linspace(-1.0, 1.0, 18).view(6, 3)


def _trajectory(make_opt, steps: int = STEPS):
    model = _model()
    opt = make_opt(model.parameters())
    weights = []
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(_X), _Y).backward()
        opt.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return weights, opt


def _assert_close(a, b, what, rtol=1e-6):
    for step, (wa, wb) in enumerate(zip(a, b)):
        err = _rel(wa, wb)
        assert err < rtol, f"{what}: step {step}: relative difference {err:.2e}"


@pytest.mark.parametrize("rule", ["powersign", "optimizer_2", "adam", "dropm01_expg3", "g * noise"])
def test_nos_optimizer_fused_equals_foreach(rule):
    a, opt = _trajectory(lambda p: NOSOptimizer(p, rule=rule, lr=1e-2, seed=7, fused=True))
    assert opt.fused is True
    b, ref = _trajectory(lambda p: NOSOptimizer(p, rule=rule, lr=1e-2, seed=7, fused=False))
    assert ref.fused is False
    _assert_close(a, b, rule)


@pytest.mark.parametrize("cls, kwargs", [
    (PowerSign, dict(sign_decay="cosine", decay_steps=80)),
    (AddSign, dict(alpha=0.5, sign_decay="linear", decay_steps=60)),
    (PowerSign, dict(base=2.0)),
])
def test_sign_classes_fused_equal_foreach_with_their_schedules(cls, kwargs):
    a, opt = _trajectory(lambda p: cls(p, lr=1e-2, fused=True, **kwargs))
    assert opt.fused is True
    b, _ = _trajectory(lambda p: cls(p, lr=1e-2, fused=False, **kwargs))
    _assert_close(a, b, f"{cls.__name__}{kwargs}")


def test_fused_none_chooses_by_size():
    small = NOSOptimizer(_model().parameters(), rule="powersign", fused=None)
    for p in small.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    small.step()
    assert small.fused is False  # below FUSED_MIN_NUMEL: foreach
    assert fused.use_fused(None, [torch.zeros(fused.FUSED_MIN_NUMEL)]) is fused.available()


def test_fallback_when_compiling_fails_warns_once_and_matches_foreach(monkeypatch, compiling_fails):
    monkeypatch.setattr(fused, "_cache", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, opt = _trajectory(lambda p: NOSOptimizer(p, rule="optimizer_2", lr=1e-2, seed=7, fused=True), steps=20)
        c, sign = _trajectory(lambda p: PowerSign(p, lr=1e-2, fused=True), steps=20)
    ours = [w for w in caught if issubclass(w.category, fused.FusedUnavailableWarning)]
    assert len(ours) == 1 and "no C++ compiler here" in str(ours[0].message)
    assert opt.fused is False and sign.fused is False and not fused.available()
    b, _ = _trajectory(lambda p: NOSOptimizer(p, rule="optimizer_2", lr=1e-2, seed=7, fused=False), steps=20)
    d, _ = _trajectory(lambda p: PowerSign(p, lr=1e-2, fused=False), steps=20)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(c, d))


# --------------------------------------------------------------------------- state_dict
def test_state_dict_knows_its_rule_and_round_trips():
    model = _model()
    opt = NOSOptimizer(model.parameters(), rule="optimizer_2", lr=1e-2, seed=4, draw=1,
                       hyper=Hyper(beta1=0.8), fused=False)

    def steps(o, m, n):
        for _ in range(n):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(_X), _Y).backward()
            o.step()

    steps(opt, model, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()
    assert sd["rule"]["notation"] == "drop(m, 0.3) * exp(1e-3 * w)"
    assert tuple(sd["rule"]["tokens"]) == get_rule("optimizer_2").tokens
    assert sd["param_groups"][0]["betas"][0] == 0.8 and sd["stream"] == {"seed": 4, "draw": 1}

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _model()
    model2.load_state_dict(saved["model"])
    opt2 = NOSOptimizer(model2.parameters(), rule="drop(m, 0.3) * exp(1e-3 * w)", lr=1e-2, fused=False)
    opt2.load_state_dict(saved["opt"])
    assert opt2.hyper == Hyper(beta1=0.8) and opt2.stream_seed == opt.stream_seed
    steps(opt, model, 5)
    steps(opt2, model2, 5)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_loading_the_state_of_another_rule_raises():
    opt = NOSOptimizer(_model().parameters(), rule="powersign", fused=False)
    other = NOSOptimizer(_model().parameters(), rule="optimizer_2", fused=False)
    with pytest.raises(ValueError, match=r"drop\(m, 0\.3\) \* exp\(1e-3 \* w\).*g \* exp\(sign\(g\) \* sign\(m\)\)"):
        opt.load_state_dict(other.state_dict())
    # an equivalent string of the same rule loads
    NOSOptimizer(_model().parameters(), rule="exp(sign(m) * sign(g)) * g", fused=False).load_state_dict(opt.state_dict())



