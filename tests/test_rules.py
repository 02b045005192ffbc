"""The rule compiler: batched rules equal rules applied alone; operand and function semantics."""

import math

import pytest
import torch

from nos_gym.dsl import Masker, Program, get_space, parse
from nos_gym.engine.rules import BatchedRule, Hyper, RuleState
from nos_gym.engine.step_plan import BankLayout, GroupPlan, Plan, Run, build_plan

# numbers that depend on float rounding: CI runs these again with the scalar CPU kernels
pytestmark = pytest.mark.numerics


def _random_deterministic_programs(n: int, depth: int, seed: int) -> list[Program]:
    """Distinct random valid programs without drop/noise."""
    return Masker(get_space("extended"), depth).sample_many(n, seed, distinct=True, deterministic=True)


def _random_stochastic_programs(n: int, depth: int, seed: int) -> list[Program]:
    """Distinct random valid programs that draw (drop or noise)."""
    many = Masker(get_space("extended"), depth).sample_many(8 * n, seed, distinct=True)
    return [p for p in many if p.stochastic][:n]


def _train(rule: BatchedRule, w0: torch.Tensor, steps: int = 25, lr: float = 1e-2) -> torch.Tensor:
    """A small nonconvex problem per row: f(w) = sum(w^2 - 0.5 cos(3w)) + 0.1 * w.w_shifted."""
    w = w0.clone()
    state = rule.init(w)
    for _ in range(steps):
        grad = 2 * w + 1.5 * torch.sin(3 * w) + 0.1 * torch.roll(w, 1, dims=-1)
        d, state = rule.update(state, grad, w)
        w = w - lr * d
    return w


@pytest.mark.parametrize("shape", [(3, 5), (2,), (4,)], ids=["rows-of-15", "rows-of-2", "rows-of-4"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_batch_of_64_different_rules_equals_each_rule_alone(depth, shape):
    # rows of 2 and 4 numbers take the executor's wide-row gathers (two floats as one complex)
    programs = _random_deterministic_programs(64, depth, seed=depth)
    assert len({p.canonical_key for p in programs}) == 64
    torch.manual_seed(0)
    w0 = torch.randn(64, *shape, dtype=torch.float64)
    batched = _train(BatchedRule(programs), w0)
    alone = torch.cat([_train(BatchedRule([p]), w0[i : i + 1]) for i, p in enumerate(programs)])
    same = torch.isclose(batched, alone, rtol=1e-12, atol=1e-300, equal_nan=True)
    assert same.all(), [programs[i].format() for i in torch.nonzero(~same.flatten(1).all(1)).flatten().tolist()]
    # the rules really differ: rows end in many different places
    finite = batched[torch.isfinite(batched).flatten(1).all(1)]
    assert len({tuple(r.flatten().tolist()) for r in finite}) > 40


def test_operands_follow_section_4_definitions():
    g = torch.tensor([[0.5, -2.0, 1e-3]], dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0, -3.0]], dtype=torch.float64)
    h = Hyper()
    expect = {
        "g^2": g**2,
        "g^3": g**3,
        "m": g,  # after one step the bias-corrected average is the gradient itself
        "v": g**2,
        "y": g**3,
        "sign(m)": torch.sign(g),
        "1e-2 * w": 1e-2 * w,
        "ADAM": g / (g.abs() + h.eps),
        "RMSProp": g / (g.abs() + h.eps),
        "exp(g)": torch.exp(g),
        "log|g|": torch.log(g.abs()),
        "clip(g, 1e-3)": g.clamp(-1e-3, 1e-3),
        "g / m": g / (g + h.eps),
        "g - -g": 2 * g,
    }
    for text, value in expect.items():
        rule = BatchedRule([parse(text)])
        d, _ = rule.update(rule.init(w), g, w)
        torch.testing.assert_close(d, value, rtol=1e-12, atol=1e-15, msg=text)


def test_running_averages_are_bias_corrected_with_the_papers_betas():
    rule = BatchedRule([parse("m + v")])  # add is fine as a test rule
    w = torch.zeros(1, 1, dtype=torch.float64)
    state = rule.init(w)
    grads = [1.0, -2.0, 0.5]
    for g in grads:
        d, state = rule.update(state, torch.tensor([[g]], dtype=torch.float64), w)
    t = len(grads)
    m = sum((1 - 0.9) * 0.9 ** (t - 1 - i) * g for i, g in enumerate(grads)) / (1 - 0.9**t)
    v = sum((1 - 0.999) * 0.999 ** (t - 1 - i) * g * g for i, g in enumerate(grads)) / (1 - 0.999**t)
    assert d.item() == pytest.approx(m + v, rel=1e-12)
    assert state.step == 3 and sorted(state.averages) == ["m", "v"]


def test_only_the_averages_a_rule_reads_are_kept():
    w = torch.zeros(4, 3)
    assert BatchedRule([parse("g")]).init(w[:1]).averages == {}
    assert sorted(BatchedRule([parse("ADAM")]).init(w[:1]).averages) == ["m", "v"]
    assert sorted(BatchedRule([parse(s) for s in ["g", "y", "sign(m)", "v"]]).init(w).averages) == ["m", "v", "y"]


def test_drop_zeroes_the_documented_fraction_reproducibly():
    w = torch.zeros(3, 20_000)
    g = torch.ones(3, 20_000)
    rule = BatchedRule([parse("drop(g, 0.1)"), parse("drop(g, 0.3)"), parse("drop(g, 0.5)")], seed=7)
    d, _ = rule.update(rule.init(w), g, w)
    zero_fraction = (d == 0).float().mean(dim=1)
    torch.testing.assert_close(zero_fraction, torch.tensor([0.1, 0.3, 0.5]), atol=0.015, rtol=0)
    assert set(d.unique().tolist()) == {0.0, 1.0}  # no rescaling of kept entries
    again = BatchedRule(rule.programs, seed=7)
    d2, _ = again.update(again.init(w), g, w)
    assert torch.equal(d, d2)
    # the old interface: a generator stands for its seed
    old = BatchedRule(rule.programs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(old.update(old.init(w), g, w)[0], d)
    other = BatchedRule(rule.programs, seed=8)
    assert not torch.equal(other.update(other.init(w), g, w)[0], d)


def test_noise_is_a_small_fresh_gaussian():
    rule = BatchedRule([parse("noise")], seed=0)
    w = torch.zeros(1, 50_000)
    state = rule.init(w)
    d1, state = rule.update(state, w, w)
    d2, _ = rule.update(state, w, w)
    assert abs(d1.std().item() - Hyper().noise_std) < 2e-4
    assert abs(d1.mean().item()) < 2e-4
    assert not torch.equal(d1, d2)


def test_non_finite_values_are_returned_not_raised():
    rule = BatchedRule([parse("log|g|"), parse("exp(1e-1 * w) * exp(exp(g))")])
    w = torch.tensor([[0.0], [1e4]])
    g = torch.tensor([[0.0], [100.0]])
    d, _ = rule.update(rule.init(w), g, w)
    assert d[0, 0].item() == -math.inf
    assert math.isinf(d[1, 0].item())


def test_rules_of_different_depths_batch_together():
    programs = [parse("g"), parse("g * exp(sign(g) * sign(m))"), parse("(exp(sign(g) * sign(m)) + clip(g, 1e-4)) * g")]
    assert [p.depth for p in programs] == [1, 2, 3]
    torch.manual_seed(1)
    w0 = torch.randn(3, 4, dtype=torch.float64)
    batched = _train(BatchedRule(programs), w0)
    alone = torch.cat([_train(BatchedRule([p]), w0[i : i + 1]) for i, p in enumerate(programs)])
    torch.testing.assert_close(batched, alone, rtol=1e-12, atol=0)
    assert not torch.allclose(batched[0], batched[1])


def test_each_read_of_noise_is_a_fresh_draw_as_in_the_optimizer():
    # noise - noise is not 0: the batched executor draws per read, like apply_rule does
    w = torch.zeros(3, 1000)
    rule = BatchedRule([parse("noise - noise"), parse("g"), parse("noise")], seed=0)
    d, _ = rule.update(rule.init(w), torch.ones_like(w), w)
    assert abs(d[0].std().item() - math.sqrt(2) * Hyper().noise_std) < 1e-3
    assert torch.equal(d[1], torch.ones(1000))
    assert abs(d[2].std().item() - Hyper().noise_std) < 1e-3


def test_drop_zeroes_entries_even_infinite_ones_in_both_executors():
    from nos_gym.optim import NOSOptimizer

    g = torch.full((1, 4000), math.inf)
    rule = BatchedRule([parse("drop(g, 0.5)")], seed=0)
    d, _ = rule.update(rule.init(g), g, torch.zeros_like(g))
    assert set(d.unique().tolist()) == {0.0, math.inf}
    w = torch.zeros(4000, requires_grad=True)
    w.grad = torch.full((4000,), math.inf)
    NOSOptimizer([w], rule="drop(g, 0.5)", lr=1.0).step()
    assert set(w.detach().unique().tolist()) == {0.0, -math.inf}  # never NaN


def test_clip_levels_and_drop_rates_share_one_call_per_family_with_per_row_constants():
    programs = [parse(t) for t in ["clip(g, 1e-5)", "clip(g, 1e-3)", "clip(g, 1e-4)", "g", "clip(g, 1e-5) + clip(v, 1e-3)"]]
    g = torch.tensor([[1.0, -1.0]] * 5, dtype=torch.float64)
    rule = BatchedRule(programs)
    d, _ = rule.update(rule.init(g), g, torch.zeros_like(g))
    torch.testing.assert_close(d[:, 0], torch.tensor([1e-5, 1e-3, 1e-4, 1.0, 1e-5 + 1e-3], dtype=torch.float64))
    torch.testing.assert_close(d[:3, 1], -d[:3, 0])


def test_batched_executor_equals_the_optimizer_executor_on_random_rules():
    # the two executors (BatchedRule's step plan, apply_rule via NOSOptimizer) share the
    # primitives but not the plumbing: 64 random rules, both ways, the same numbers
    from nos_gym.optim import NOSOptimizer

    programs = _random_deterministic_programs(64, 2, seed=11)
    torch.manual_seed(3)
    w0 = torch.randn(64, 2, dtype=torch.float64)
    batched = _train(BatchedRule(programs), w0, steps=20)
    for i, p in enumerate(programs):
        w = w0[i].clone().requires_grad_(True)
        opt = NOSOptimizer([w], rule=p, lr=1e-2)
        for _ in range(20):
            with torch.no_grad():
                w.grad = 2 * w + 1.5 * torch.sin(3 * w) + 0.1 * torch.roll(w, 1, dims=-1)
            opt.step()
        assert torch.allclose(w.detach(), batched[i], rtol=1e-9, atol=1e-300, equal_nan=True), p.format()


# --------------------------------------------------------------------- random draws
def _trajectory_alone(program: Program, w0: torch.Tensor, seed: int, steps: int = 25, lr: float = 1e-2):
    """``program`` run by NOSOptimizer on one tensor, as ``_train`` runs a BatchedRule row."""
    from nos_gym.optim import NOSOptimizer

    w = w0.clone().requires_grad_(True)
    opt = NOSOptimizer([w], rule=program, lr=lr, seed=seed)
    for _ in range(steps):
        with torch.no_grad():
            w.grad = 2 * w + 1.5 * torch.sin(3 * w) + 0.1 * torch.roll(w, 1, dims=-1)
        opt.step()
    return w.detach()


@pytest.mark.parametrize("text", ["drop(g, 0.3) * exp(sign(g) * sign(m))", "g + noise", "drop(ADAM, 0.1)",
                                  "noise - noise", "drop(noise, 0.5) + drop(g, 0.1)", "g * drop(g, 0.3)"])
def test_both_executors_draw_the_same_numbers_for_a_stochastic_rule(text):
    # same trajectory (to rounding: the optimizer applies lr * d as one fused add); a
    # different draw would move the weights by about the noise or the dropped updates
    torch.manual_seed(5)
    w0 = torch.randn(1, 301, dtype=torch.float64)
    program = parse(text)
    from nos_gym.engine.random_streams import stream_seed

    batched = _train(BatchedRule([program], seeds=[stream_seed(9, program.canonical_key)]), w0)
    alone = _trajectory_alone(program, w0[0], seed=9)
    torch.testing.assert_close(alone, batched[0], rtol=1e-12, atol=1e-14)
    other = _trajectory_alone(program, w0[0], seed=10)
    assert (other - batched[0]).abs().max() > 1e-6  # the seed matters


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN equal to NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def test_a_stochastic_rule_draws_the_same_in_any_batch_and_position():
    programs = _random_stochastic_programs(40, 2, seed=3)
    assert len(programs) == 40
    torch.manual_seed(6)
    w0 = torch.randn(1, 7, dtype=torch.float64).expand(40, 7)
    batched = _train(BatchedRule(programs, seed=4), w0)
    shuffled = list(reversed(programs))
    reversed_batch = _train(BatchedRule(shuffled, seed=4), w0).flip(0)
    alone = torch.cat([_train(BatchedRule([p], seed=4), w0[:1]) for p in programs[:8]])
    assert _identical(batched, reversed_batch)
    assert _identical(batched[:8], alone)
    # and dropping rows (BatchedRule.select) keeps each row's stream
    full = BatchedRule(programs, seed=4)
    state, w = full.init(w0.clone()), w0.clone()
    d_full, state = full.update(state, w, w)
    part, part_state = full.select([5, 2], state)
    assert part.seeds == (full.seeds[5], full.seeds[2])
    d_part, _ = part.update(part_state, w[[5, 2]], w[[5, 2]])
    d_next, _ = full.update(state, w, w)
    assert torch.equal(d_part, d_next[[5, 2]])


def test_equivalent_programs_draw_the_same_numbers():
    # one canonical key, other token orders: the draw sites are numbered on the canonical form
    pairs = [("drop(g, 0.3) * exp(sign(g) * sign(m))", "exp(sign(m) * sign(g)) * drop(g, 0.3)"),
             ("g + noise", "noise + g"),
             ("drop(m, 0.1) * drop(g, 0.5)", "drop(g, 0.5) * drop(m, 0.1)")]
    torch.manual_seed(7)
    w0 = torch.randn(2, 50, dtype=torch.float64)
    for a, b in pairs:
        pa, pb = parse(a), parse(b)
        assert pa.canonical_key == pb.canonical_key and pa.tokens != pb.tokens
        ra, rb = _train(BatchedRule([pa, pa], seed=1), w0), _train(BatchedRule([pb, pb], seed=1), w0)
        torch.testing.assert_close(ra, rb, rtol=1e-12, atol=1e-14, msg=a)


def test_draw_sites_are_numbered_on_the_canonical_form():
    from nos_gym.dsl.canonical import canonicalize
    from nos_gym.engine.step_plan import UNUSED_SITE, _tagged_tree, draw_sites

    assert draw_sites(parse("g + noise")) == {1: 0}
    assert draw_sites(parse("noise + g")) == {0: 0}
    assert draw_sites(parse("noise - noise")) == {0: 0, 1: 1}
    # drop(m) sorts before drop(g)... by the canonical key: "drop0.1(m)" < "drop0.5(g)"
    assert draw_sites(parse("drop(g, 0.5) * drop(m, 0.1)")) == {2: 1, 3: 0}
    keep = Program(("noise", "g", "drop0.3", "drop0.1", "keep"))  # the right side is never read
    assert draw_sites(keep) == {0: 1, 2: 0, 3: UNUSED_SITE + 3}
    # the tagged canonical form is canonical.py's, tags aside, on thousands of random programs
    for depth in (1, 2, 3):
        for p in Masker(get_space("extended"), depth).sample_many(2000, depth):
            assert _untagged(canonicalize(_tagged_tree(p))) == p.canonical_tree, p.format()


# ------------------------------------------------------------------------ the step plan
def test_plan_of_three_programs_field_by_field():
    # PowerSign (depth 2), two clips added, noise minus m: the two depth-1 programs are
    # padded with keep(r1, 1); both groups have a binary, so every group has 2 x 3 slots
    programs = [parse("g * exp(sign(g) * sign(m))"), parse("clip(g, 1e-5) + clip(v, 1e-3)"), parse("noise - m")]
    plan = build_plan(programs)
    assert isinstance(plan, Plan)
    assert (plan.rows, plan.depth, plan.averages) == (3, 2, ("m", "v"))
    # the bank: "1" (rows 0-2), the operands computed from g and the averages (3 rows each,
    # sorted), one row for the one read of noise, then r1 (read by group 2)
    assert plan.bank == BankLayout(rows=3, constant=("one",), powers=(), computed=("g", "m", "sign_g", "sign_m", "v"),
                                   scaled_w=(), noise_rows=1, results=(("r1", 19),))
    assert (plan.bank.computed_start, plan.bank.noise_start, plan.bank.size) == (3, 18, 22)
    assert [plan.bank.entry(t) for t in ("one", "g", "m", "sign_g", "sign_m", "v", "r1")] == [0, 3, 6, 9, 12, 15, 19]
    first, second = plan.groups
    # group 1, slots (row, side) in unary order: the clips first (one call for both levels),
    # then the identities: (1, right) v, (1, left) g, (0, left) sign_g, (2, left) noise,
    # (0, right) sign_m, (2, right) m
    assert first == GroupPlan(
        reads=(15 + 1, 3 + 1, 9 + 0, 18, 12 + 0, 6 + 2),
        unary_runs=(Run("clip", 0, 2, (1e-3, 1e-5)),),
        row_order=(1, 0, 2),                         # add (row 1), mul (row 0), sub (row 2)
        sides_order=(1, 2, 3, 0, 4, 5),              # left sides of rows 1, 0, 2, then their right sides
        binary_runs=(Run("add", 0, 1), Run("mul", 1, 2), Run("sub", 2, 3)),
        result_row=19,                               # r1, rows in row_order: row 1 at 19, row 0 at 20
    )
    # group 2: row 0 is g * exp(r1); rows 1 and 2 pass r1 through (keep: no call)
    assert second == GroupPlan(
        reads=(20, 3, 19, 21, 1, 2),                 # (0, right) r1 [exp], then g, r1, r1, 1, 1
        unary_runs=(Run("exp", 0, 1),),
        row_order=(1, 2, 0),                         # keep, keep, mul
        sides_order=(2, 3, 1, 4, 5, 0),
        binary_runs=(Run("mul", 2, 3),),
        result_row=None,                             # the last group's output is the update
    )
    assert plan.output_index == (2, 0, 1)            # program 0's update is row 2 of the output


def test_plan_without_a_binary_computes_left_sides_only():
    plan = build_plan([parse("clip(g, 1e-4)"), parse("m"), parse("noise")])
    assert plan.bank == BankLayout(3, (), (), ("g", "m"), (), 1, ())
    assert plan.averages == ("m",)
    (group,) = plan.groups
    assert group == GroupPlan(reads=(0, 3 + 1, 6), unary_runs=(Run("clip", 0, 1, (1e-4,)),), row_order=(0, 1, 2),
                              sides_order=None, binary_runs=(), result_row=None)
    assert plan.output_index is None


def test_plan_keeps_g_cubed_for_y_and_a_bank_row_per_noise_read():
    plan = build_plan([parse("y"), parse("noise - noise"), parse("1e-2 * w")])
    assert plan.bank.powers == ("g2", "g3")         # y's average shares g^3 with the operands
    assert plan.bank.scaled_w == ("w1e-2",)
    assert plan.bank.noise_rows == 2
    assert plan.averages == ("y",)


def test_update_leaves_the_callers_state_as_it_was():
    rule = BatchedRule([parse("ADAM"), parse("y * g^3"), parse("g")])
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0], [2.0, 2.0]], dtype=torch.float64)
    state = rule.init(w)
    g = torch.tensor([[0.1, -0.2], [0.3, 0.4], [-1.0, 2.0]], dtype=torch.float64)
    _, state = rule.update(state, g, w)
    before = RuleState(state.step, {k: v.clone() for k, v in state.averages.items()})
    d1, after = rule.update(state, 2 * g, w)
    assert state.step == before.step and after.step == state.step + 1
    for k, v in state.averages.items():
        assert torch.equal(v, before.averages[k]), k
        assert not torch.equal(after.averages[k], v), k
    d2, again = rule.update(state, 2 * g, w)  # the same state gives the same step
    assert torch.equal(d1, d2)
    assert all(torch.equal(again.averages[k], after.averages[k]) for k in after.averages)


def test_select_drops_rows_and_the_rest_go_on_unchanged():
    programs = _random_deterministic_programs(12, 2, seed=4)
    torch.manual_seed(2)
    w = torch.randn(12, 3, dtype=torch.float64)
    full = BatchedRule(programs)
    state = full.init(w)
    keep = [0, 3, 4, 9, 11]
    rule, small = None, None
    for t in range(8):
        grad = 2 * w + torch.sin(3 * w)
        d, state = full.update(state, grad, w)
        if t == 4:
            rule, small = full.select(torch.tensor(keep), state)
            assert small.step == state.step
            assert set(small.averages) == set(rule.plan.averages) <= set(state.averages)
            w_small = w[keep].clone()
        if t > 4:
            d_small, small = rule.update(small, grad[keep], w_small)
            assert torch.equal(d_small, d[keep])
            w_small = w_small - 1e-2 * d_small
        w = w - 1e-2 * d
    assert [p.tokens for p in rule.programs] == [programs[i].tokens for i in keep]


def _untagged(node: tuple) -> tuple:
    if node[0] == "op":
        return node[:2]
    if node[0] == "u":
        return ("u", node[1], _untagged(node[2]))
    return (node[0], node[1], *(_untagged(c) for c in node[2:]))
