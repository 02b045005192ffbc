"""TRPO-LSTM: the controller of Neural Optimizer Search (Bello, Zoph, Vasudevan, Le, ICML 2017).

An LSTM writes update rules token by token in the paper's language (section 3.1); each
batch of rules is scored together by the ``OptimizerSearch-v0`` vector env; the
controller is trained to maximise the expected score with Trust Region Policy
Optimization (section 3.2):

- the network (section 4.2): a single-layer LSTM (the paper: hidden state 150, weights uniform
  in [-0.08, 0.08]), a separate softmax for each position (the operand bank grows), and the
  env's masks applied to the logits as -inf (section 4.1);
- the objective: J = E[R] plus an entropy bonus (the paper's "entropy penalty", 0.0015);
- the baseline: an exponential moving average of rewards (section 3.2), or, with
  ``--baseline risk_seeking``, dso's risk-seeking gradient (``nos_gym/agents/advantage.py``);
- beyond the paper (``nos_gym/agents/guidance.py``): priority-queue training (``--pqt-k K``:
  the best K distinct rules so far, their log-likelihood in every update's objective, weight
  ``--pqt-weight``) and neural-guided evolution (``--evolution-fraction F``: that fraction of
  each batch are children of a regularized-evolution population that the controller's samples
  seed; dso's hybrid);
- the update: TRPO -- the natural-gradient direction by conjugate gradient on the
  Fisher (the Hessian of the KL), scaled to the trust region ``max_kl``, then a
  backtracking line search that accepts the first step that improves the surrogate and
  keeps the KL within ``max_kl``.

The defaults are the setting the agents benchmark chose by its tuning protocol (``Args``), with
both additions on; ``--preset paper`` is the paper's controller (EMA baseline, LSTM of 150,
max_kl 0.01, neither addition).

Run it::

    python agents/trpo_lstm.py                       # Rosenbrock fast reward, 3,000 rules, ~10 s on one CPU core
    python agents/trpo_lstm.py --total-rules 20000 --space small --depth 1
    python agents/trpo_lstm.py --config configs/paper.yaml   # the paper's settings (CIFAR-10 child)
    python agents/trpo_lstm.py --preset paper        # the paper's controller settings, on any task
    python agents/trpo_lstm.py --preset pqt          # + priority-queue training
    python agents/trpo_lstm.py --preset hybrid       # + priority queue + neural-guided evolution
    python agents/trpo_lstm.py --resume runs/trpo_lstm-rosenbrock-s1-...

It writes a run directory (config, log of every rule, checkpoints, top rules) and
records every scored rule in the result store; Ctrl-C saves and stops. See
``nos_gym/agents/runs.py`` and ``nos_gym/agents/rundir.py``. Batch size vs the paper:
``configs/paper.yaml`` explains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from nos_gym.agents import (
    LSTMController,
    Run,
    masked_categorical_stats,
    masked_kl,
    parse_args,
    run_cli,
)
from nos_gym.agents.advantage import Advantages
from nos_gym.agents.config import CONTROLLER_PRESETS, ControllerArgs, check_range
from nos_gym.agents.guidance import guidance_state, guidance_stats, guided_rollout, make_guidance


# ------------------------------------------------------------------------------ arguments
@dataclass
class Args(ControllerArgs):
    """TRPO-LSTM settings. Shared ones (task, space, depth, constraints, budget, seed, paths) are
    in ``nos_gym.agents.config.RunArgs``, the controller's (network, entropy, baseline) in
    ``ControllerArgs``; ``--help`` lists them all.

    The defaults are the setting that the agents benchmark's tuning protocol chose on
    Rosenbrock (``benchmarks/bench_agents.py --tune``; docs/results.md): 50 rules per update,
    max_kl 0.1, the EMA baseline at decay 0.95, entropy 0.01, an LSTM of 64, priority-queue
    training (10 rules, weight 3) and neural-guided evolution on half of each batch. The
    paper's controller is ``--preset paper``."""

    # the tuned values of shared settings (their meaning: RunArgs, ControllerArgs)
    num_envs: int = 50
    """rules sampled per batch; the vector env scores them as one batch"""
    hidden_size: int = 64
    """LSTM hidden state size (section 4.2)"""
    entropy_coef: float = 0.01
    """weight of the entropy bonus in the objective (section 4.2's entropy penalty)"""
    baseline_decay: float = 0.95
    """EMA baseline: b <- decay * b + (1 - decay) * mean batch reward"""
    pqt_k: int = 10
    """priority-queue training (Abolafia et al. 2018): keep the best pqt_k distinct rules sampled so far
    and add pqt_weight * their mean log-likelihood to every update's objective; 0: off (the paper)"""
    pqt_weight: float = 3.0
    """weight of the queue's mean log-likelihood in the objective (pqt_k > 0)"""
    evolution_fraction: float = 0.5
    """neural-guided evolution (dso's hybrid): round(evolution_fraction * num_envs) rules of each batch are
    children of a regularized-evolution population that the controller's samples join; the controller
    trains on the whole batch (and, with pqt_k, on the best rules of both); 0: off (the paper)"""

    max_kl: float = 0.1
    """trust region: mean KL(old || new) of a rule's token distributions, summed over its positions"""
    cg_iters: int = 10
    """conjugate-gradient iterations for the natural-gradient direction"""
    cg_damping: float = 0.1
    """added to the Fisher-vector product (F + damping I) for a stable solve"""
    line_search_steps: int = 10
    """backtracking: try step fractions 1, shrink, shrink^2, ..."""
    line_search_shrink: float = 0.5
    accept_ratio: float = 0.1
    """accept a step whose surrogate gain is at least this fraction of the linear prediction"""
    normalize_advantages: bool = False
    """divide advantages by their batch std (off: the paper's plain R - baseline)"""

    #: ``--preset NAME``: paper (the paper's TRPO-LSTM: EMA baseline, max_kl 0.01, no queue, no guided
    #: evolution), pqt (+ priority-queue training, risk-seeking), hybrid (pqt + neural-guided evolution).
    #: A preset sets the controller's settings only; the task, the budget and num_envs stay as given.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {**CONTROLLER_PRESETS["paper"], "max_kl": 0.01, "cg_iters": 10, "cg_damping": 0.1,
                  "line_search_steps": 10, "line_search_shrink": 0.5, "accept_ratio": 0.1,
                  "normalize_advantages": False},
        "pqt": {**CONTROLLER_PRESETS["pqt"], "max_kl": 0.05},
        "hybrid": {**CONTROLLER_PRESETS["hybrid"], "max_kl": 0.05},
    }

    def validate(self) -> None:
        super().validate()
        check_range(self, "max_kl", 0.0, low_open=True)
        check_range(self, "cg_iters", 1)
        check_range(self, "cg_damping", 0.0)
        check_range(self, "line_search_steps", 1)
        check_range(self, "line_search_shrink", 0.0, 1.0, low_open=True)
        check_range(self, "accept_ratio", 0.0)


# ----------------------------------------------------------------------------------- TRPO
def surrogate(logits: Tensor, tokens: Tensor, masks: Tensor, logp_old: Tensor, advantages: Tensor,
              entropy_coef: float) -> Tensor:
    """L(theta) = mean[ p_theta(rule) / p_old(rule) * A ] + entropy_coef * mean[ H_theta ].

    A rule is one action of the paper's policy: its log-probability and entropy are
    sums over its positions.
    """
    logp_tok, ent_tok = masked_categorical_stats(logits, masks, tokens)
    ratio = torch.exp(logp_tok.sum(-1) - logp_old)
    return (ratio * advantages).mean() + entropy_coef * ent_tok.sum(-1).mean()


def conjugate_gradient(Avp: Callable[[Tensor], Tensor], b: Tensor, iters: int, tol: float = 1e-10) -> Tensor:
    """Solve A x = b for symmetric positive-definite A given only products A v."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        Ap = Avp(p)
        alpha = rr / (p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_new = r @ r
        if rr_new < tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def trpo_step(policy: LSTMController, tokens: Tensor, masks: Tensor, advantages: Tensor, args: Args,
              queue: tuple[Tensor, Tensor] | None = None) -> dict:
    """One TRPO update of ``policy`` on a batch of rules; returns what happened.

    ``queue``: the priority queue's ``(tokens, masks)`` (``PriorityQueue.tensors``): the objective
    gains ``pqt_weight * mean log p(queued rule)``, and the trust region covers the queued
    strings' distributions too (the KL is the mean over the batch's and the queue's strings).
    With ``pqt_policy_gradient`` false the batch's advantages are left out (the batch still sets
    the entropy bonus). Without a queue the step is the paper's.

    Keys: ``accepted`` (bool), ``kl`` (of the accepted step, else 0), ``surrogate_before``,
    ``surrogate_after``, ``expected`` (the linear prediction of the full step's gain),
    ``step_fraction`` (of the full step taken) and ``entropy`` (mean per rule, before).
    """
    params = [p for p in policy.parameters()]
    n = len(tokens)
    batch_tokens, batch_masks = tokens, masks
    if queue is not None and len(queue[0]) > 0:
        q_tokens, q_masks = queue
        if not args.pqt_policy_gradient:
            advantages = torch.zeros_like(advantages)
        tokens, masks = torch.cat([tokens, q_tokens]), torch.cat([masks, q_masks])  # the trust region's strings
    else:
        queue = None
    with torch.no_grad():
        old_logits = policy(tokens, masks)
        logp_old = masked_categorical_stats(old_logits[:n], batch_masks, batch_tokens)[0].sum(-1)

    def objective(logits: Tensor) -> Tensor:
        value = surrogate(logits[:n], batch_tokens, batch_masks, logp_old, advantages, args.entropy_coef)
        if queue is not None:
            value = value + args.pqt_weight * masked_categorical_stats(logits[n:], q_masks, q_tokens)[0].sum(-1).mean()
        return value

    logits = policy(tokens, masks)
    loss_before = objective(logits)
    entropy = masked_categorical_stats(logits[:n], batch_masks, batch_tokens)[1].sum(-1).mean().item()
    g = parameters_to_vector(torch.autograd.grad(loss_before, params, retain_graph=True))
    stats = {"accepted": False, "kl": 0.0, "surrogate_before": loss_before.item(),
             "surrogate_after": loss_before.item(), "expected": 0.0, "step_fraction": 0.0, "entropy": entropy}
    if not torch.isfinite(g).all() or g.abs().max() == 0:
        return stats

    # Fisher-vector products: the Hessian of the mean KL at theta_old, times v
    kl = masked_kl(old_logits, logits, masks).mean()
    grad_kl = parameters_to_vector(torch.autograd.grad(kl, params, create_graph=True))

    def fisher_vector(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(grad_kl @ v, params, retain_graph=True)
        return parameters_to_vector(hv) + args.cg_damping * v

    direction = conjugate_gradient(fisher_vector, g, args.cg_iters)      # ~ F^-1 g
    quad = 0.5 * (direction @ fisher_vector(direction))                  # 1/2 x^T F x
    if not torch.isfinite(quad) or quad <= 0:
        return stats
    full_step = direction * torch.sqrt(args.max_kl / quad)              # 1/2 s^T F s = max_kl
    expected = (g @ full_step).item()
    stats["expected"] = expected

    old_params = parameters_to_vector(params).detach().clone()
    frac = 1.0
    with torch.no_grad():
        for _ in range(args.line_search_steps):
            vector_to_parameters(old_params + frac * full_step, params)
            new_logits = policy(tokens, masks)
            new_loss = objective(new_logits).item()
            new_kl = masked_kl(old_logits, new_logits, masks).mean().item()
            gain = new_loss - stats["surrogate_before"]
            if (math.isfinite(new_loss) and new_kl <= args.max_kl and gain > 0
                    and gain >= args.accept_ratio * expected * frac):
                stats.update(accepted=True, kl=new_kl, surrogate_after=new_loss, step_fraction=frac)
                return stats
            frac *= args.line_search_shrink
        vector_to_parameters(old_params, params)                          # no step passed: keep theta_old
    return stats


# ----------------------------------------------------------------------------------- loop
def main(argv: Sequence[str] | None = None) -> Run:
    args, resume = parse_args(Args, argv, agent="trpo_lstm", description=__doc__)
    with Run.open(args, "trpo_lstm", resume) as run:
        envs = run.make_envs()          # num_envs lockstep sub-envs; their rules are scored as one batch
        policy = LSTMController(envs.single_action_space.n, envs.length, args.hidden_size, args.init_scale)
        generator = torch.Generator().manual_seed(args.seed)
        baseline = Advantages(args.baseline, args.baseline_decay, args.risk_epsilon)
        # beyond the paper (both None in its setting): the priority queue, the guided population
        queue, guide = make_guidance(args)
        run.restore(policy=policy, generator=generator, baseline=baseline,  # --resume: where it left off
                    **guidance_state(queue, guide))

        for b in run.batches():
            # 1. sample one rule per sub-env, token by token, with the env's masks (with guided
            #    evolution, the last rows are the population's children); the env scores the batch together
            batch, keys, children = guided_rollout(envs, policy, generator, args.num_envs, queue, guide)
            run.record(b, batch.infos, batch.rewards)

            # 2. advantages: against the EMA of rewards (the paper), or only the top epsilon of
            #    the batch against its quantile (risk-seeking)
            adv = baseline.compute(batch.rewards, keys if args.distinct_in_batch else None)
            keep = adv.keep
            advantages = adv.advantages[keep]
            if args.normalize_advantages:
                advantages = advantages / (advantages.std() + 1e-8)

            # 3. the TRPO update, on the rules that count (and the queue's, with PQT)
            stats = trpo_step(policy, torch.from_numpy(batch.tokens)[keep], torch.from_numpy(batch.masks)[keep],
                              advantages, args, queue.tensors() if queue else None)
            run.log_update(b, {**stats, "baseline": adv.baseline, "kept": int(keep.sum()),
                               "reward_mean": float(batch.rewards.mean()), **guidance_stats(queue, guide, children)})
            run.save({"policy": policy.state_dict(), "generator": generator.get_state(),
                      "baseline": baseline.state_dict(),
                      **{name: obj.state_dict() for name, obj in (("queue", queue), ("guide", guide))
                         if obj is not None}})
    return run



if __name__ == "__main__":
    run_cli(main)
