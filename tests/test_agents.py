"""Agents: the LSTM controller, masked sampling, the TRPO step, and every agent end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from nos_gym.agents import AGENTS, LSTMController, load_agent, masked_kl, read_log
from nos_gym.agents.policy import masked_categorical_stats
from nos_gym.dsl import Constraints, Masker, Program, get_space, parse
from nos_gym.store import Store

# a cheap reward: Rosenbrock with 200 instead of 4,000 iterations
FAST = ["--task", "rosenbrock", "--task-options", "{iterations: 200}", "--no-progress"]


@pytest.fixture(scope="module")
def trpo():
    return load_agent("trpo_lstm")


def fixed_batch(n: int = 40, seed: int = 0, space: str = "full", depth: int = 2):
    """A controller and a batch of strings it sampled (with their masks), reproducibly."""
    torch.manual_seed(seed)
    masker = Masker(get_space(space), depth)
    policy = LSTMController(len(masker.vocab), masker.length)
    tokens, masks = policy.sample(masker, n, torch.Generator().manual_seed(seed))
    return policy, masker, tokens, masks


# ------------------------------------------------------------------------- controller
def test_controller_is_the_papers_network():
    masker = Masker(get_space("full"), 3)
    policy = LSTMController(len(masker.vocab), masker.length)
    assert policy.cell.hidden_size == 150
    assert isinstance(policy.cell, torch.nn.LSTMCell)  # single layer
    # a separate softmax for each of the 15 positions
    assert policy.head_weight.shape == (15, 150, len(masker.vocab))
    for p in policy.parameters():
        assert p.min() >= -0.08 and p.max() <= 0.08
        assert p.max() > 0.07 and p.min() < -0.07  # really spread over the interval


def test_masked_tokens_are_never_sampled():
    """Even when the logits strongly favour forbidden tokens, -inf masking keeps them out."""
    masker = Masker(get_space("small"), 2, Constraints())
    policy = LSTMController(len(masker.vocab), masker.length)
    with torch.no_grad():
        allowed_anywhere = torch.zeros(len(masker.vocab), dtype=torch.bool)
        for t in range(masker.length):
            allowed_anywhere |= torch.as_tensor(masker._base[t])
        policy.head_bias[:, ~allowed_anywhere] = 50.0  # tokens outside the space: hugely favoured
        policy.head_bias[:, masker.vocab.index("add")] = 50.0  # forbidden as the final binary
    tokens, masks = policy.sample(masker, 300, torch.Generator().manual_seed(1))
    for row in tokens.tolist():
        for t in range(masker.length):
            assert masker.mask(row[:t])[row[t]], (t, row)
        program = Program.from_ids(row, masker.vocab)
        assert masker.violations(program) == []
        assert get_space("small").contains(program)
    # and the log-probabilities of what was sampled are finite; masked entries carry no mass
    logp, ent, logits = policy.evaluate(tokens, masks)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert torch.isinf(logits[~masks]).all()
    assert torch.softmax(logits, -1)[~masks].max() == 0


def test_masked_stats_match_a_plain_categorical():
    policy, masker, tokens, masks = fixed_batch(12)
    with torch.no_grad():
        logits = policy(tokens, masks)
        logp, ent = masked_categorical_stats(logits, masks, tokens)
        for i in range(3):
            for t in range(masker.length):
                valid = masks[i, t]
                dist = torch.distributions.Categorical(logits=logits[i, t, valid])
                idx = int(valid[: tokens[i, t]].sum())  # position of the token among the valid ones
                assert logp[i, t].item() == pytest.approx(dist.log_prob(torch.tensor(idx)).item(), abs=1e-5)
                assert ent[i, t].item() == pytest.approx(dist.entropy().item(), abs=1e-5)


# --------------------------------------------------------------------------------- TRPO
def test_conjugate_gradient_solves_spd_system(trpo):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20, 20, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    x = trpo.conjugate_gradient(lambda v: A @ v, b, iters=60)
    assert torch.allclose(A @ x, b, atol=1e-6)


@pytest.mark.parametrize("max_kl", [0.001, 0.01, 0.5])
def test_trpo_accepted_step_keeps_kl_within_max_kl(trpo, max_kl):
    policy, masker, tokens, masks = fixed_batch(40)
    advantages = torch.randn(40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        old_logits = policy(tokens, masks)
    args = trpo.Args(max_kl=max_kl)
    stats = trpo.trpo_step(policy, tokens, masks, advantages, args)
    assert stats["accepted"]
    with torch.no_grad():
        kl = masked_kl(old_logits, policy(tokens, masks), masks).mean().item()
    assert kl == pytest.approx(stats["kl"], rel=1e-4)
    assert 0 < kl <= max_kl
    # the step is not timid: the trust region is used (within a backtracking factor)
    assert kl > 0.05 * max_kl * stats["step_fraction"] ** 2


def test_trpo_improves_the_surrogate_on_a_fixed_batch(trpo):
    policy, masker, tokens, masks = fixed_batch(40)
    advantages = torch.randn(40, generator=torch.Generator().manual_seed(4))
    args = trpo.Args(max_kl=0.02)
    with torch.no_grad():
        old_logits = policy(tokens, masks)
        logp_old = masked_categorical_stats(old_logits, masks, tokens)[0].sum(-1)
        before = trpo.surrogate(old_logits, tokens, masks, logp_old, advantages, args.entropy_coef).item()
    stats = trpo.trpo_step(policy, tokens, masks, advantages, args)
    with torch.no_grad():
        after = trpo.surrogate(policy(tokens, masks), tokens, masks, logp_old, advantages, args.entropy_coef).item()
    assert stats["accepted"]
    assert after > before + 1e-4
    assert after == pytest.approx(stats["surrogate_after"], rel=1e-5)
    assert stats["surrogate_before"] == pytest.approx(before, rel=1e-5)
    # the gain is at least accept_ratio of the linear prediction of the step taken
    assert after - before >= args.accept_ratio * stats["expected"] * stats["step_fraction"]


def test_trpo_makes_rewarded_rules_more_likely(trpo):
    policy, masker, tokens, masks = fixed_batch(30)
    advantages = torch.full((30,), -0.1)
    advantages[:5] = 1.0  # the first five rules were good
    with torch.no_grad():
        before = policy.evaluate(tokens, masks)[0]
    for _ in range(3):
        assert trpo.trpo_step(policy, tokens, masks, advantages, trpo.Args(entropy_coef=0.0))["accepted"]
    with torch.no_grad():
        after = policy.evaluate(tokens, masks)[0]
    assert (after[:5] - before[:5]).mean() > 0.5
    assert (after[5:] - before[5:]).mean() < 0


def test_trpo_keeps_parameters_when_there_is_nothing_to_learn(trpo):
    policy, masker, tokens, masks = fixed_batch(10)
    before = [p.detach().clone() for p in policy.parameters()]
    stats = trpo.trpo_step(policy, tokens, masks, torch.zeros(10), trpo.Args(entropy_coef=0.0))
    assert not stats["accepted"]
    for p, q in zip(policy.parameters(), before):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- evolution
def test_evolution_mutations_respect_the_masks():
    evo = load_agent("evolution")
    masker = Masker(get_space("full"), 3, Constraints())
    rng = np.random.default_rng(0)
    changed_positions = set()
    for _ in range(300):
        parent = np.array(masker.sample(rng).ids(masker.vocab))
        child = evo.mutate(parent, masker, rng)
        diff = np.flatnonzero(child != parent)
        assert len(diff) >= 1
        changed_positions.add(int(diff[0]))
        for t in range(masker.length):
            assert masker.mask(child[:t])[child[t]]
        assert masker.violations(Program.from_ids(child, masker.vocab)) == []
    assert len(changed_positions) >= 12  # every kind of position gets mutated


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("agent", AGENTS)
def test_each_agent_runs_end_to_end(agent, tmp_path):
    module = load_agent(agent)
    run_dir = tmp_path / "run"
    store_path = tmp_path / "store.sqlite"
    task = ["--task", "quadratic", "--task-options", "{iterations: 30, dim: 10}"] if agent == "maskable_ppo" else FAST[:4]
    extra = {"evolution": ["--population-size", "8", "--tournament-size", "3"],
             "maskable_ppo": ["--batch-size", "40"]}.get(agent, [])
    run = module.main(task + ["--no-progress", "--depth", "2", "--space", "small", "--num-envs", "8",
                              "--total-rules", "32", "--seed", "5", "--run-dir", str(run_dir),
                              "--store", str(store_path)] + extra)
    records = read_log(run_dir)
    assert [r["sample"] for r in records] == list(range(32))
    assert [r["batch"] for r in records] == [i // 8 for i in range(32)]
    space = get_space("small")
    for r in records:
        program = Program(tuple(r["tokens"]))
        assert space.contains(program, Constraints())
        assert parse(r["rule"]).canonical_key == r["key"] == program.canonical_key
        assert 0.0 <= r["reward"] <= 1.0
    assert max(r["reward"] for r in records) > 0
    # every rule is in the store with the reward the log has
    with Store(store_path) as store:
        fps = list(store.tasks())
        assert len(fps) == 1
        stored = {rec.key: rec.reward for rec in store.records(fps[0])}
    assert {r["key"] for r in records} <= set(stored)
    for r in records:
        assert stored[r["key"]] == pytest.approx(r["reward"])
    # each distinct rule was settled once (trained, or by the funnel: an equivalent rule's score
    # or the screen's floor); later samples of it are cache hits
    first: dict[str, dict] = {}
    for r in records:
        first.setdefault(r["key"], r)
    assert all(r["source"] in ("trained", "fingerprint", "screen") for r in first.values())
    assert all(r["cached"] and r["source"] == "cache" for r in records if r is not first[r["key"]])
    trained = [r["key"] for r in records if r["source"] == "trained"]
    assert len(trained) == len(set(trained)) > 0
    # checkpoint and top-k
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["samples"] == 32 and ckpt["batch"] == 4 and ckpt["agent"] == agent
    top = json.loads((run_dir / "top.json").read_text())
    assert top[0]["reward"] == max(r["reward"] for r in records)
    assert len({t["key"] for t in top}) == len(top) == min(10, len({r["key"] for r in records}))
    assert run.samples == 32


# ---------------------------------------------------------------- baselines (issue 13)
def test_ema_baseline_is_the_papers():
    from nos_gym.agents.advantage import Advantages

    base = Advantages("ema", decay=0.9)
    first = base.compute(torch.tensor([0.2, 0.4, 0.6]))
    assert first.keep.all() and first.baseline == pytest.approx(0.4)  # starts at the first batch's mean
    assert torch.allclose(first.advantages, torch.tensor([-0.2, 0.0, 0.2]))
    second = base.compute(torch.tensor([1.0, 1.0, 1.0]))
    assert second.baseline == pytest.approx(0.4) and base.ema == pytest.approx(0.9 * 0.4 + 0.1 * 1.0)
    restored = Advantages("ema")
    restored.load_state_dict(base.state_dict())
    assert restored.ema == base.ema
    restored.load_state_dict(0.25)  # a bare EMA value: checkpoints written before the baseline option
    assert restored.ema == 0.25


def test_risk_seeking_keeps_the_top_epsilon_against_its_quantile():
    from nos_gym.agents.advantage import Advantages

    rewards = torch.arange(100, dtype=torch.float32) / 100  # 0.00 .. 0.99
    out = Advantages("risk_seeking", epsilon=0.05).compute(rewards)
    assert out.keep.nonzero().flatten().tolist() == [95, 96, 97, 98, 99]
    assert out.baseline == pytest.approx(0.95)
    assert torch.allclose(out.advantages[out.keep], torch.tensor([0.0, 0.01, 0.02, 0.03, 0.04]), atol=1e-6)
    assert (out.advantages[~out.keep] == 0).all()
    # ties with the quantile are kept; a batch of equal rewards keeps everything at advantage 0
    tied = Advantages("risk_seeking", epsilon=0.05).compute(torch.tensor([0.1] * 10 + [0.5] * 10))
    assert tied.keep.sum() == 10 and tied.baseline == pytest.approx(0.5)
    with pytest.raises(ValueError, match="risk_epsilon"):
        Advantages("risk_seeking", epsilon=0.0)


@pytest.mark.parametrize("agent", ["trpo_lstm", "reinforce_lstm"])
def test_risk_seeking_agents_learn_from_the_top_of_each_batch(agent, tmp_path):
    module = load_agent(agent)
    module.main(FAST[:4] + ["--no-progress", "--depth", "1", "--space", "small", "--num-envs", "20",
                            "--total-rules", "60", "--seed", "3", "--run-dir", str(tmp_path / "run"),
                            "--store", str(tmp_path / "store.sqlite"), "--baseline", "risk_seeking",
                            "--risk-epsilon", "0.1"])
    records = read_log(tmp_path / "run")
    updates = [json.loads(line) for line in (tmp_path / "run" / "updates.jsonl").read_text().splitlines()]
    assert len(records) == 60 and len(updates) == 3
    for b, update in enumerate(updates):
        rewards = sorted((r["reward"] for r in records if r["batch"] == b), reverse=True)
        # the baseline is the batch's 0.9 quantile: a reward of the batch, with the top 2 (and ties) kept
        assert update["baseline"] == pytest.approx(rewards[1], abs=1e-6)
        assert update["kept"] == sum(r >= update["baseline"] - 1e-7 for r in rewards) >= 2


def test_distinct_in_batch_counts_each_rule_once():
    from nos_gym.agents.advantage import Advantages, first_occurrences

    assert first_occurrences(["a", "b", "a", "c", "b"]).tolist() == [True, True, False, True, False]
    out = Advantages("risk_seeking", epsilon=0.5).compute(torch.tensor([0.9, 0.9, 0.9, 0.1]), ["a", "a", "b", "c"])
    assert out.keep.tolist() == [True, False, True, False]  # the quantile's ties, each distinct rule once


def test_evolution_novel_children_samples_each_rule_once(tmp_path):
    """With --novel-children every sampled rule after the first generation is new to the run
    (the plain algorithm re-samples its population's rules); and it resumes with what it saw."""
    evo = load_agent("evolution")
    common = FAST[:4] + ["--no-progress", "--depth", "2", "--space", "small", "--num-envs", "8",
                         "--population-size", "8", "--tournament-size", "4", "--seed", "3"]
    plain_dir, novel_dir = tmp_path / "plain", tmp_path / "novel"
    evo.main(common + ["--total-rules", "96", "--run-dir", str(plain_dir), "--store", str(tmp_path / "a.sqlite")])
    evo.main(common + ["--total-rules", "64", "--run-dir", str(novel_dir), "--store", str(tmp_path / "b.sqlite"),
                       "--novel-children"])
    evo.main(common + ["--total-rules", "96", "--resume", str(novel_dir), "--novel-children"])
    plain, novel = read_log(plain_dir), read_log(novel_dir)
    assert len(novel) == 96
    children = [r["key"] for r in novel[8:]]  # after the random first generation
    first_gen = {r["key"] for r in novel[:8]}
    assert len(set(children)) == len(children) and not set(children) & first_gen
    plain_children = [r["key"] for r in plain[8:]]
    assert len(set(plain_children)) < len(plain_children)  # what the option is for: the plain run re-samples


# ------------------------------------------------------ beyond the paper (issue 22): PQT, guided evolution
def test_priority_queue_keeps_the_best_distinct_rules():
    from nos_gym.agents.guidance import PriorityQueue

    q = PriorityQueue(3)
    tokens = np.arange(5 * 2).reshape(5, 2)
    masks = np.ones((5, 2, 4), dtype=bool)
    assert q.push(["a", "b", "a", "c", "d"], [0.5, 0.9, 0.7, 0.1, float("nan")], tokens, masks) == 3
    # one entry per rule (its first tokens, its best reward), best first; NaN never enters
    assert [e["key"] for e in q.entries] == ["b", "a", "c"] and q.rewards() == [0.9, 0.7, 0.1]
    assert q.entries[1]["tokens"].tolist() == [0, 1]
    assert q.push(["e", "f"], [0.05, 0.8], tokens[:2], masks[:2]) == 1  # e is below the queue, f enters
    assert [e["key"] for e in q.entries] == ["b", "f", "a"]
    assert q.push(["g"], [0.7], tokens[:1], masks[:1]) == 0  # a tie with the last entry: the earlier stays
    t, m = q.tensors()
    assert t.shape == (3, 2) and m.shape == (3, 2, 4) and m.dtype == torch.bool
    restored = PriorityQueue(3)
    restored.load_state_dict(q.state_dict())
    assert [e["key"] for e in restored.entries] == ["b", "f", "a"]


def test_pqt_step_makes_the_queued_rules_more_likely(trpo):
    """With the policy-gradient term off, a TRPO step learns from the queue alone: the queued rules'
    log-likelihood rises, within the trust region measured over batch and queue."""
    policy, masker, tokens, masks = fixed_batch(n=30, seed=4)
    queue = (tokens[:3].clone(), masks[:3].clone())
    args = trpo.Args(max_kl=0.05, entropy_coef=0.0, pqt_k=3, pqt_policy_gradient=False)
    with torch.no_grad():
        before = policy.evaluate(*queue)[0]
        old_all = policy(torch.cat([tokens, queue[0]]), torch.cat([masks, queue[1]]))
    stats = trpo.trpo_step(policy, tokens, masks, torch.randn(30), args, queue)
    assert stats["accepted"]
    with torch.no_grad():
        after = policy.evaluate(*queue)[0]
        kl = masked_kl(old_all, policy(torch.cat([tokens, queue[0]]), torch.cat([masks, queue[1]])),
                       torch.cat([masks, queue[1]])).mean().item()
    assert (after > before).all()
    assert kl == pytest.approx(stats["kl"], rel=1e-4) and kl <= 0.05 + 1e-6


def test_trpo_without_a_queue_is_the_papers_step(trpo):
    """An empty queue, or none, leaves the step exactly the paper's."""
    results = []
    for queue in (None, (torch.zeros((0, 10), dtype=torch.long), torch.zeros((0, 10, 34), dtype=torch.bool))):
        policy, _, tokens, masks = fixed_batch(n=20, seed=2)
        trpo.trpo_step(policy, tokens, masks, torch.linspace(-1, 1, 20), trpo.Args(), queue)
        results.append(torch.cat([p.flatten() for p in policy.parameters()]))
    assert torch.equal(results[0], results[1])


def test_with_fixed_rows_writes_the_given_strings_last():
    from nos_gym.agents.guidance import with_fixed_rows

    seen = []

    def act(t, masks):
        seen.append(len(masks))
        return np.full(len(masks), 7)

    fixed = np.array([[1, 2], [3, 4]])
    mixed = with_fixed_rows(act, fixed)
    assert mixed(1, np.ones((5, 9), dtype=bool)).tolist() == [7, 7, 7, 2, 4] and seen == [3]
    assert with_fixed_rows(act, np.zeros((0, 2))) is act


def test_guided_evolution_children_come_from_the_population():
    from nos_gym.agents.guidance import GuidedEvolution

    masker = Masker(get_space("small"), 2, Constraints())
    rng = np.random.default_rng(0)
    guide = GuidedEvolution(children=4, population_size=6, tournament_size=2, seed=1)
    assert len(guide.children(masker)) == 0  # not before the population is full
    tokens = np.array([masker.sample(rng).ids(masker.vocab) for _ in range(8)])
    guide.add(tokens, np.linspace(0, 1, 8))
    assert len(guide.population) == 6 and guide.best() == 1.0  # the oldest two left
    children = guide.children(masker)
    assert children.shape == (4, masker.length)
    for child in children:
        assert masker.violations(Program.from_ids(child, masker.vocab)) == []
        # one mutation away from a member of the population
        assert min(int((child != t).sum()) for t, _ in guide.population) >= 1
    again = GuidedEvolution(children=4, population_size=6, tournament_size=2, seed=1)
    again.load_state_dict(GuidedEvolution(4, 6, 2, seed=1).state_dict())
    again.add(tokens, np.linspace(0, 1, 8))
    assert np.array_equal(again.children(masker), children)  # its own seeded stream


def test_trpo_lstm_defaults_are_the_setting_the_tuning_protocol_chose():
    """agents/trpo_lstm.py's defaults are the configuration benchmarks/bench_agents.py --tune chose on
    Rosenbrock (its committed tune.json); a retuning must move them together."""
    from pathlib import Path

    from nos_gym.agents.trpo_lstm import Args

    tune = json.loads((Path(__file__).parents[1] / "benchmarks/out/bench_agents/tune.json").read_text())
    chosen = tune["envs"]["OptimizerSearch-Rosenbrock-v0"]["tuning"]["trpo_lstm"]["config"]
    assert chosen and {k: getattr(Args(), k) for k in chosen} == chosen


def test_presets_set_the_controller_and_lose_to_flags(tmp_path):
    from nos_gym.agents.config import ConfigError, parse_args
    from nos_gym.agents.trpo_lstm import Args

    defaults = dataclasses.asdict(Args())
    paper, _ = parse_args(Args, ["--preset", "paper"])
    assert (paper.max_kl, paper.baseline, paper.pqt_k, paper.evolution_fraction, paper.entropy_coef) == \
        (0.01, "ema", 0, 0.0, 0.0015)
    assert paper.num_envs == Args().num_envs  # a preset leaves the batch and the budget alone
    pqt, _ = parse_args(Args, ["--preset", "pqt", "--pqt-k", "5"])
    assert pqt.pqt_k == 5 and pqt.baseline == "risk_seeking" and pqt.preset == "pqt"
    config = tmp_path / "c.yaml"
    config.write_text("preset: hybrid\nmax_kl: 0.3\n")
    hybrid, _ = parse_args(Args, ["--config", str(config)])
    assert hybrid.evolution_fraction == 0.5 and hybrid.max_kl == 0.3 and hybrid.pqt_k == 10
    assert dataclasses.asdict(Args()) == defaults and Args().preset == ""  # the presets left the defaults alone
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        parse_args(Args, ["--preset", "fast"])
    with pytest.raises(ConfigError, match="evolution_fraction"):
        parse_args(Args, ["--evolution-fraction", "0.99", "--num-envs", "20"])
    with pytest.raises(ConfigError, match="pqt_policy_gradient"):
        parse_args(Args, ["--no-pqt-policy-gradient", "--pqt-k", "0"])


@pytest.mark.parametrize("agent", ["trpo_lstm", "reinforce_lstm"])
def test_pqt_and_guided_evolution_run_end_to_end_and_resume(agent, tmp_path):
    """The hybrid preset on both LSTM agents: the queue holds the run's best distinct rules, the last
    rows of each batch after the first generation are children, and a resumed run continues the same."""
    module = load_agent(agent)
    common = FAST[:4] + ["--no-progress", "--depth", "2", "--space", "small", "--num-envs", "10", "--seed", "2",
                         "--preset", "hybrid", "--evolution-population", "10", "--evolution-tournament", "3",
                         "--pqt-k", "4", "--store", str(tmp_path / "s.sqlite")]
    module.main(common + ["--total-rules", "40", "--run-dir", str(tmp_path / "full")])
    module.main(common + ["--total-rules", "20", "--run-dir", str(tmp_path / "half")])
    module.main(FAST[2:4] + ["--no-progress", "--total-rules", "40", "--resume", str(tmp_path / "half")])
    full, half = read_log(tmp_path / "full"), read_log(tmp_path / "half")
    assert [r["key"] for r in full] == [r["key"] for r in half]  # the queue and population were restored
    updates = [json.loads(line) for line in (tmp_path / "full" / "updates.jsonl").read_text().splitlines()]
    assert [u["children"] for u in updates] == [0, 5, 5, 5]
    best4 = sorted({r["key"]: r["reward"] for r in full}.values(), reverse=True)[:4]
    assert updates[-1]["queue_best"] == pytest.approx(best4[0]) and updates[-1]["queue_worst"] == pytest.approx(best4[3])
    assert updates[-1]["queue_size"] == 4
