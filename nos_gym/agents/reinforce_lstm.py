"""REINFORCE-LSTM: the same controller as ``trpo_lstm.py``, trained with vanilla policy gradient.

This is Zoph and Le's (2017) Neural Architecture Search update, which the paper replaces
with TRPO for sample efficiency (section 3.2): the gradient of
``mean[(R - b) * log p(rule)] + entropy_coef * mean[H]`` followed with Adam, where ``b``
is an exponential moving average of rewards. Network, masks, batching and everything
else are as in ``trpo_lstm.py``, so the two differ only in the update; the options beyond
the paper are the same too (``--pqt-k``: ``- pqt_weight * mean log p(queued rule)`` joins
the loss; ``--evolution-fraction``; ``--preset paper|pqt|hybrid``; ``nos_gym/agents/guidance.py``).

Run it::

    python agents/reinforce_lstm.py                   # Rosenbrock, same budget as trpo_lstm
    python agents/reinforce_lstm.py --learning-rate 1e-3 --total-rules 20000
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from nos_gym.agents import LSTMController, Run, parse_args, run_cli
from nos_gym.agents.advantage import Advantages
from nos_gym.agents.config import CONTROLLER_PRESETS, ControllerArgs, check_range
from nos_gym.agents.guidance import guidance_state, guidance_stats, guided_rollout, make_guidance


# ------------------------------------------------------------------------------ arguments
@dataclass
class Args(ControllerArgs):
    """REINFORCE settings (shared ones in ``RunArgs``, the controller's in ``ControllerArgs``)."""

    learning_rate: float = 1e-3
    """Adam step size (the paper's 1e-5 is for 10^4+ updates; see configs/paper.yaml)"""
    max_grad_norm: float = 0.0
    """clip the gradient norm to this (0: no clipping)"""

    #: ``--preset NAME``: paper (Adam at the paper's 1e-5, configs/paper_reinforce.yaml), pqt, hybrid
    #: (``CONTROLLER_PRESETS``, at this agent's default step size); the controller's settings only
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {**CONTROLLER_PRESETS["paper"], "learning_rate": 1e-5, "max_grad_norm": 0.0},
        "pqt": {**CONTROLLER_PRESETS["pqt"], "learning_rate": 1e-3},
        "hybrid": {**CONTROLLER_PRESETS["hybrid"], "learning_rate": 1e-3},
    }

    def validate(self) -> None:
        super().validate()
        check_range(self, "learning_rate", 0.0, low_open=True)
        check_range(self, "max_grad_norm", 0.0)


# ----------------------------------------------------------------------------------- loop
def main(argv: Sequence[str] | None = None) -> Run:
    args, resume = parse_args(Args, argv, agent="reinforce_lstm", description=__doc__)
    with Run.open(args, "reinforce_lstm", resume) as run:
        envs = run.make_envs()
        policy = LSTMController(envs.single_action_space.n, envs.length, args.hidden_size, args.init_scale)
        optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
        generator = torch.Generator().manual_seed(args.seed)
        baseline = Advantages(args.baseline, args.baseline_decay, args.risk_epsilon)
        queue, guide = make_guidance(args)  # beyond the paper: priority queue, guided population (None: off)
        run.restore(policy=policy, optimizer=optimizer, generator=generator, baseline=baseline,
                    **guidance_state(queue, guide))

        for b in run.batches():
            # 1. sample a batch of rules through the env (scored together); with guided evolution
            #    the last rows are the population's children
            batch, keys, children = guided_rollout(envs, policy, generator, args.num_envs, queue, guide)
            run.record(b, batch.infos, batch.rewards)

            # 2. advantages: EMA baseline (every rule), or risk-seeking (the batch's top epsilon)
            adv = baseline.compute(batch.rewards, keys if args.distinct_in_batch else None)
            keep = adv.keep

            # 3. the REINFORCE step, on the rules that count (and the queue's log-likelihood, with PQT)
            logp, entropy, _ = policy.evaluate(torch.from_numpy(batch.tokens)[keep], torch.from_numpy(batch.masks)[keep])
            pg = (adv.advantages[keep] * logp).mean() if queue is None or args.pqt_policy_gradient else 0.0
            loss = -pg - args.entropy_coef * entropy.mean()
            if queue:
                q_logp = policy.evaluate(*queue.tensors())[0]
                loss = loss - args.pqt_weight * q_logp.mean()
            optimizer.zero_grad()
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            run.log_update(b, {"loss": loss.item(), "entropy": entropy.mean().item(), "baseline": adv.baseline,
                               "kept": int(keep.sum()), "reward_mean": float(batch.rewards.mean()),
                               **guidance_stats(queue, guide, children)})
            run.save({"policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                      "generator": generator.get_state(), "baseline": baseline.state_dict(),
                      **{name: obj.state_dict() for name, obj in (("queue", queue), ("guide", guide))
                         if obj is not None}})
    return run


if __name__ == "__main__":
    run_cli(main)
