"""Drop-in optimizers: Figure 2's rules equal torch's optimizers, Table 1, PowerSign, AddSign."""

import copy
import io
import math

import pytest
import torch

from nos_gym.dsl import Program, parse
from nos_gym.engine.rules import Hyper
from nos_gym.optim import AddSign, NOSOptimizer, PowerSign, cosine_decay, linear_decay, restart_decay, table1

# numbers that depend on float rounding: CI runs these again with the scalar CPU kernels
pytestmark = pytest.mark.numerics


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


_X = torch.randn(128, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
_Y = _X @ torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).unsqueeze(1)  # a learnable target


def _trajectory(make_opt, steps: int = 100) -> tuple[list[torch.Tensor], list[float]]:
    model = _model()
    opt = make_opt(model.parameters())
    weights, losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(_X), _Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return weights, losses


def _assert_same_trajectory(a, b, rtol=1e-6):
    for step, (wa, wb) in enumerate(zip(a, b)):
        err = ((wa - wb).abs().max() / wb.abs().max()).item()
        assert err < rtol, f"step {step}: relative difference {err:.2e}"


ADAM_2_STEP = Program(("v", "g", "sqrt_abs", "id", "keep", "m", "r1", "id", "id", "div"))


@pytest.mark.parametrize(
    "rule, hyper, reference",
    [
        # SGD: the rule g.
        ("g", Hyper(), lambda p: torch.optim.SGD(p, lr=0.05)),
        # Adam: torch's Adam divides by sqrt(v_hat) + eps, exactly the language's x / (y + eps)
        # with the bias-corrected averages (m-hat, v-hat), betas (0.9, 0.999), eps 1e-8.
        ("m / sqrt|v|", Hyper(), lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8)),
        (ADAM_2_STEP, Hyper(), lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8)),
        ("ADAM", Hyper(), lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8)),
        # RMSProp: torch keeps an uncorrected average of g^2 with decay alpha; it matches the
        # language with bias_correction=False and beta2 = alpha (eps added after the sqrt).
        ("g / sqrt|v|", Hyper(beta2=0.99, bias_correction=False), lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, eps=1e-8)),
        ("RMSProp", Hyper(beta2=0.99, bias_correction=False), lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, eps=1e-8)),
    ],
)
def test_figure2_rules_reproduce_torch_optimizers_over_100_steps(rule, hyper, reference):
    ours, our_losses = _trajectory(lambda p: NOSOptimizer(p, rule=rule, lr=reference([torch.zeros(1)]).defaults["lr"], hyper=hyper))
    theirs, _ = _trajectory(reference)
    _assert_same_trajectory(ours, theirs)
    assert our_losses[-1] < our_losses[0]  # and they do train


def test_every_table1_rule_computes_the_same_numbers_from_its_name_and_its_formatted_string():
    assert list(table1())[:4] == ["sgd", "momentum", "adam", "rmsprop"]
    for name, text in table1().items():
        reformatted = parse(text).format()
        a, _ = _trajectory(lambda p, name=name: NOSOptimizer(p, rule=name, lr=1e-3, seed=3), steps=10)
        b, _ = _trajectory(lambda p, reformatted=reformatted: NOSOptimizer(p, rule=reformatted, lr=1e-3, seed=3), steps=10)
        for wa, wb in zip(a, b):
            assert torch.equal(wa, wb), name
        start = _trajectory(lambda p: torch.optim.SGD(p, lr=0.0), steps=1)[0][0]
        # exp(g) - exp(m) is 0 at step 1 (m-hat = g); with a full-batch gradient the weights
        # then never move, so m-hat stays equal to g: a fixed point of that rule. Exactly 0 with
        # AVX2/AVX-512 kernels; the scalar kernels round m-hat = 0.1 g / 0.1 off g by an ulp, so
        # the weights move by ~1e-18 (relative) there. Every other rule moves by more than 1e-5.
        moved = float((a[-1] - start).abs().max() / start.abs().max())
        assert (moved < 1e-12) == (name == "expg_minus_expm"), (name, moved)


def test_state_dict_round_trip_resumes_exactly():
    rule = "drop(g, 0.3) * exp(sign(g) * sign(m))"  # uses the running average and the generator
    full, _ = _trajectory(lambda p: NOSOptimizer(p, rule=rule, lr=0.01, seed=5), steps=10)

    model = _model()
    opt = NOSOptimizer(model.parameters(), rule=rule, lr=0.01, seed=5)

    def step(m, o):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(_X), _Y).backward()
        o.step()

    for _ in range(5):
        step(model, opt)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model2 = _model()
    model2.load_state_dict(saved_model)
    opt2 = NOSOptimizer(model2.parameters(), rule=rule, lr=0.01, seed=999)
    opt2.load_state_dict(saved_opt)
    for _ in range(5):
        step(model2, opt2)
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in model2.parameters()]), full[-1], rtol=0, atol=0)


def test_state_dict_keeps_the_stream_and_reads_old_checkpoints():
    model = _model()
    opt = NOSOptimizer(model.parameters(), rule="g + noise", lr=0.01, seed=5, draw=2)
    sd = opt.state_dict()
    assert sd["stream"] == {"seed": 5, "draw": 2}
    other = NOSOptimizer(_model().parameters(), rule="g + noise", lr=0.01)
    other.load_state_dict(sd)
    assert other.stream_seed == opt.stream_seed
    old = dict(sd)
    del old["stream"]
    old["generator_states"] = {"cpu": torch.Generator().get_state()}  # semantics version 2's checkpoints
    other.load_state_dict(old)


@pytest.mark.parametrize("rule", ["drop(g, 0.3) * exp(sign(g) * sign(m))", "g + noise", "drop(ADAM, 0.1)"])
def test_a_model_draws_as_its_parameters_laid_end_to_end_in_one_batched_row(rule):
    """NOSOptimizer's element index is the entry's offset over all parameters in order: the
    parameters of several tensors draw what one flat BatchedRule row draws (the convention
    that makes train_child and the grouped train_children agree)."""
    from nos_gym.engine.rules import BatchedRule

    model = _model()
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = NOSOptimizer(model.parameters(), rule=rule, lr=0.01, seed=3, draw=1)
    batched = BatchedRule([parse(rule)], seeds=[opt.stream_seed])
    w, state = flat0.clone().view(1, -1), None
    state = batched.init(w)
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(_X), _Y).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()]).view(1, -1)
        d, state = batched.update(state, grad, w)
        # the same gradients: the flat row follows the model's own weights
        w = torch.cat([p.detach().flatten() for p in model.parameters()]).view(1, -1)
        opt.step()
        expected = w - 0.01 * d
        got = torch.cat([p.detach().flatten() for p in model.parameters()]).view(1, -1)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
        w = got


def test_nos_powersign_string_equals_the_powersign_optimizer():
    a, _ = _trajectory(lambda p: NOSOptimizer(p, rule="g * exp(sign(g) * sign(m))", lr=0.01))
    b, _ = _trajectory(lambda p: PowerSign(p, lr=0.01))
    _assert_same_trajectory(a, b, rtol=1e-12)


def test_powersign_and_addsign_match_a_hand_computed_step():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    grads = [torch.tensor([0.5, 0.2, -1.0], dtype=torch.float64), torch.tensor([0.1, -0.4, 0.3], dtype=torch.float64)]
    for cls, kwargs, mult in [
        (PowerSign, dict(base=2.0), lambda s, d: 2.0 ** (d * s)),
        (AddSign, dict(alpha=1.5), lambda s, d: 1.5 + d * s),
    ]:
        p = torch.nn.Parameter(w.detach().clone())
        opt = cls([p], lr=0.1, beta=0.9, sign_decay="linear", decay_steps=4, **kwargs)
        expected = w.detach().clone()
        m = torch.zeros(3, dtype=torch.float64)
        for t, g in enumerate(grads):
            p.grad = g.clone()
            opt.step()
            m = 0.9 * m + 0.1 * g
            decay = (4 - t) / 4  # linear decay at the 0-based step t
            expected = expected - 0.1 * mult(torch.sign(g) * torch.sign(m), decay) * g
        torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=0)


def test_sign_decays_follow_tensorflows_schedules():
    lin, cos, rst = linear_decay(100), cosine_decay(100), restart_decay(100, num_periods=2)
    assert [lin(t) for t in (0, 50, 100, 150)] == [1.0, 0.5, 0.0, 0.0]
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0, abs=1e-15)
    # restart: two cosine periods over 100 steps, restarting at step 50
    assert rst(0) == 1.0 and rst(25) == pytest.approx(0.5) and rst(50) == 1.0
    assert cosine_decay(100, zero_after=0.25)(60) == 0.0


@pytest.mark.parametrize("cls", [PowerSign, AddSign])
@pytest.mark.parametrize("decay", [None, "linear", "cosine", "restart"])
def test_powersign_and_addsign_train_a_small_mlp(cls, decay):
    _, losses = _trajectory(lambda p: cls(p, lr=0.05, sign_decay=decay, decay_steps=100 if decay else None))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert all(math.isfinite(x) for x in losses)


def test_bad_arguments_say_what_is_wrong():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="decay_steps"):
        PowerSign(params, sign_decay="cosine")
    with pytest.raises(ValueError, match="unknown sign_decay"):
        AddSign(params, sign_decay="exp", decay_steps=10)
    with pytest.raises(ValueError, match="learning rate"):
        NOSOptimizer(params, rule="g", lr=-1.0)
    with pytest.raises(ValueError, match="position"):
        NOSOptimizer(params, rule="g *")


# ------------------------------------------------- torch.optim conventions: groups, weight decay, maximize
def _steps(model, opt, n, sign=1.0):
    for _ in range(n):
        opt.zero_grad()
        (sign * torch.nn.functional.mse_loss(model(_X), _Y)).backward()
        opt.step()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _two_groups(model, **second):
    first, *rest = list(model.parameters())
    return [{"params": [first]}, {"params": rest, **second}]


TWO_GROUPS = [
    # the second group sets its own value of every option the optimizer has
    (NOSOptimizer, dict(rule="drop(ADAM, 0.1) + noise", lr=0.01, seed=5),
     dict(lr=0.003, betas=(0.8, 0.99, 0.95), eps=1e-6, bias_correction=False, noise_std=0.05, weight_decay=0.1)),
    (PowerSign, dict(lr=0.05, sign_decay="cosine", decay_steps=20),
     dict(lr=0.02, base=2.0, beta=0.7, sign_decay="linear", decay_steps=12, weight_decay=0.2)),
    (AddSign, dict(lr=0.05), dict(alpha=0.5, beta=0.5, sign_decay="restart", decay_steps=6, weight_decay=0.05)),
]


@pytest.mark.parametrize("cls, kwargs, second", TWO_GROUPS, ids=["NOSOptimizer", "PowerSign", "AddSign"])
def test_a_state_dict_of_two_groups_with_their_own_options_resumes_bit_identically(cls, kwargs, second):
    model = _model()
    opt = cls(_two_groups(model, **second), **kwargs)
    _steps(model, opt, 10)
    full = _flat(model)

    model = _model()
    opt = cls(_two_groups(model, **second), **kwargs)
    _steps(model, opt, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _model()
    model2.load_state_dict(saved["model"])
    # built with defaults only: every option of both groups comes from the state_dict
    opt2 = cls(_two_groups(model2), **({"rule": kwargs["rule"]} if "rule" in kwargs else {}))
    opt2.load_state_dict(saved["opt"])
    assert {k: opt2.param_groups[1][k] for k in second} == second
    _steps(model2, opt2, 5)
    assert torch.equal(_flat(model2), full)


@pytest.mark.parametrize("cls, kwargs, second", TWO_GROUPS, ids=["NOSOptimizer", "PowerSign", "AddSign"])
def test_each_group_steps_with_its_own_options(cls, kwargs, second):
    """Two groups in one optimizer == one optimizer per group, each with that group's options."""
    model = _model()
    opt = cls(_two_groups(model, **second), **kwargs)
    _steps(model, opt, 10)

    model2 = _model()
    first, *rest = list(model2.parameters())
    alone = cls([first], **kwargs)
    # NOSOptimizer: a placeholder without gradients keeps the rest's element index (the draws) where it was
    placeholder = [{"params": [torch.nn.Parameter(torch.zeros_like(first))]}] if cls is NOSOptimizer else []
    other = cls([*placeholder, {"params": rest}], **{**kwargs, **second})
    for _ in range(10):
        alone.zero_grad(), other.zero_grad()
        torch.nn.functional.mse_loss(model2(_X), _Y).backward()
        alone.step(), other.step()
    assert torch.equal(_flat(model), _flat(model2))
    # and the second group's options do change the numbers
    model3 = _model()
    _steps(model3, cls(model3.parameters(), **kwargs), 10)
    assert not torch.equal(_flat(model), _flat(model3))


@pytest.mark.parametrize("make", [
    lambda p, **k: NOSOptimizer(p, rule="drop(g, 0.3) * exp(sign(g) * sign(m))", lr=0.01, seed=2, **k),
    lambda p, **k: NOSOptimizer(p, rule="ADAM", lr=0.01, weight_decay=0.1, **k),
    lambda p, **k: PowerSign(p, lr=0.05, sign_decay="cosine", decay_steps=50, **k),
    lambda p, **k: AddSign(p, lr=0.05, weight_decay=0.01, **k),
], ids=["nos-drop", "nos-adam-wd", "powersign-cosine", "addsign-wd"])
def test_maximize_takes_the_steps_of_minimizing_the_negated_loss(make):
    up, down = _model(), _model()
    _steps(up, make(up.parameters(), maximize=True), 20, sign=-1.0)
    _steps(down, make(down.parameters()), 20)
    assert torch.equal(_flat(up), _flat(down))
    assert not torch.equal(_flat(up), _flat(_model()))


def test_nos_adam_with_weight_decay_is_torchs_adamw():
    ours, _ = _trajectory(lambda p: NOSOptimizer(p, rule="ADAM", lr=0.01, weight_decay=0.5))
    theirs, _ = _trajectory(lambda p: torch.optim.AdamW(p, lr=0.01, eps=1e-8, weight_decay=0.5))
    _assert_same_trajectory(ours, theirs)
    plain, _ = _trajectory(lambda p: NOSOptimizer(p, rule="ADAM", lr=0.01))
    assert not torch.allclose(ours[-1], plain[-1], rtol=1e-3)


def test_weight_decay_matches_a_hand_computed_step():
    """Decoupled: the weights shrink by 1 - lr * weight_decay first; a rule reading w reads the shrunk weights."""
    w0 = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    g = torch.tensor([0.5, 0.2, -1.0], dtype=torch.float64)
    lr, wd = 0.1, 0.3
    for make, direction in [
        (lambda p: NOSOptimizer(p, rule="g + 1e-1 * w", lr=lr, weight_decay=wd), lambda w: g + 0.1 * w),
        (lambda p: PowerSign(p, lr=lr, base=2.0, weight_decay=wd), lambda w: 2.0 ** (torch.sign(g) ** 2) * g),
        (lambda p: AddSign(p, lr=lr, alpha=1.5, weight_decay=wd), lambda w: (1.5 + torch.sign(g) ** 2) * g),
    ]:
        p = torch.nn.Parameter(w0.clone())
        p.grad = g.clone()
        make([p]).step()
        shrunk = w0 * (1.0 - lr * wd)
        torch.testing.assert_close(p.detach(), shrunk - lr * direction(shrunk), rtol=1e-15, atol=0)


def test_steps_are_counted_per_parameter():
    """A parameter that missed a step has its own step count: its decay is that of its own steps."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    b_alone = torch.nn.Parameter(torch.ones(3))
    opt = PowerSign([a, b], lr=0.1, sign_decay="linear", decay_steps=4)
    ref = PowerSign([b_alone], lr=0.1, sign_decay="linear", decay_steps=4)
    for t in range(4):
        a.grad = torch.full((3,), 0.5)
        b.grad = None if t == 0 else torch.tensor([0.5, -0.2, 0.1]) * t
        opt.step()
        if t > 0:
            b_alone.grad = b.grad.clone()
            ref.step()
    assert opt.state[a]["step"] == 4 and opt.state[b]["step"] == 3
    assert torch.equal(b.detach(), b_alone.detach())


def test_every_option_is_a_param_group_default():
    params = [torch.nn.Parameter(torch.zeros(2))]
    nos = NOSOptimizer(params, rule="g", hyper=Hyper(beta1=0.8), eps=1e-6, betas=None)
    assert nos.defaults == dict(lr=1e-3, betas=(0.8, 0.999, 0.999), eps=1e-6, bias_correction=True,
                                noise_std=0.01, weight_decay=0.0, maximize=False)
    assert NOSOptimizer(params, rule="g", betas=(0.5, 0.6)).defaults["betas"] == (0.5, 0.6, 0.999)
    assert set(PowerSign(params).defaults) == {"lr", "base", "beta", "sign_decay", "decay_steps", "weight_decay",
                                               "maximize"}
    assert AddSign(params, alpha=2.0).param_groups[0]["alpha"] == 2.0


def test_state_dicts_written_before_the_options_were_per_group_still_load():
    opt = NOSOptimizer(_model().parameters(), rule="ADAM", lr=0.01)
    old = opt.state_dict()
    old["param_groups"] = [{"lr": g["lr"], "params": g["params"]} for g in old["param_groups"]]
    old["hyper"] = {"beta1": 0.8, "beta2": 0.99, "beta3": 0.9, "eps": 1e-6, "bias_correction": False,
                    "noise_std": 0.1}
    other = NOSOptimizer(_model().parameters(), rule="ADAM", lr=0.01)
    other.load_state_dict(old)
    assert other.hyper == Hyper(0.8, 0.99, 0.9, 1e-6, False, 0.1)
    assert other.param_groups[0]["weight_decay"] == 0.0 and other.param_groups[0]["maximize"] is False
    sign = PowerSign(_model().parameters(), base=2.0)
    old = sign.state_dict()
    old["param_groups"] = [{"lr": g["lr"], "beta": g["beta"], "params": g["params"]} for g in old["param_groups"]]
    sign.load_state_dict(old)
    assert sign.param_groups[0]["base"] == 2.0 and sign.param_groups[0]["sign_decay"] is None


@pytest.mark.parametrize("make, match", [
    (lambda p: NOSOptimizer(p, rule="g", weight_decay=-0.1), "weight_decay"),
    (lambda p: NOSOptimizer(p, rule="g", betas=(0.9, 1.0)), "beta2"),
    (lambda p: NOSOptimizer(p, rule="g", betas=(0.9,)), "betas must be"),
    (lambda p: NOSOptimizer([{"params": p, "eps": -1.0}], rule="g"), "eps"),
    (lambda p: PowerSign([{"params": p, "base": 0.0}]), "base"),
    (lambda p: AddSign([{"params": p, "beta": 1.0}]), "beta"),
    (lambda p: AddSign([{"params": p, "sign_decay": "cosine"}]), "decay_steps"),
])
def test_bad_group_options_say_what_is_wrong(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make([torch.nn.Parameter(torch.zeros(2))])
    assert "\n" not in str(err.value)
