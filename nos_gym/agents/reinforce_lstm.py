"""REINFORCE-LSTM: the same controller as ``trpo_lstm.py``, trained with vanilla policy gradient.

This is Zoph and Le's (2017) Neural Architecture Search update, which the paper replaces
with TRPO for sample efficiency (section 3.2): the gradient of
``mean[(R - b) * log p(rule)] + entropy_coef * mean[H]`` followed with Adam, where ``b``
is an exponential moving average of rewards. Network, masks, batching and everything
else are as in ``trpo_lstm.py``, so the two differ only in the update.

Run it::

    python agents/reinforce_lstm.py                   # Rosenbrock, same budget as trpo_lstm
    python agents/reinforce_lstm.py --learning-rate 1e-3 --total-rules 20000
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nos_gym.agents import LSTMController, Run, RunArgs, parse_args, rollout, run_cli
from nos_gym.agents.config import check_range


# ------------------------------------------------------------------------------ arguments
@dataclass
class Args(RunArgs):
    """REINFORCE settings (shared ones in ``nos_gym.agents.config.RunArgs``)."""

    total_rules: int = 3000
    num_envs: int = 100
    hidden_size: int = 150
    init_scale: float = 0.08
    learning_rate: float = 1e-3
    """Adam step size (the paper's 1e-5 is for 10^4+ updates; see configs/paper.yaml)"""
    entropy_coef: float = 0.0015
    baseline_decay: float = 0.9
    max_grad_norm: float = 0.0
    """clip the gradient norm to this (0: no clipping)"""

    def validate(self) -> None:
        super().validate()
        check_range(self, "hidden_size", 1)
        check_range(self, "init_scale", 0.0, low_open=True)
        check_range(self, "learning_rate", 0.0, low_open=True)
        check_range(self, "entropy_coef", 0.0)
        check_range(self, "baseline_decay", 0.0, 1.0)
        check_range(self, "max_grad_norm", 0.0)


# ----------------------------------------------------------------------------------- loop
def main(argv: Sequence[str] | None = None) -> Run:
    args, resume = parse_args(Args, argv, agent="reinforce_lstm", description=__doc__)
    with Run.open(args, "reinforce_lstm", resume) as run:
        envs = run.make_envs()
        policy = LSTMController(envs.single_action_space.n, envs.length, args.hidden_size, args.init_scale)
        optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
        generator = torch.Generator().manual_seed(args.seed)
        baseline: float | None = None
        if run.checkpoint is not None:
            state = run.checkpoint["state"]
            policy.load_state_dict(state["policy"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            baseline = state["baseline"]

        for b in run.batches():
            # 1. sample a batch of rules through the env (scored together)
            h = policy.initial_state(args.num_envs)

            def act(t: int, masks: np.ndarray) -> np.ndarray:
                nonlocal h
                actions, h = policy.step(h, t, torch.from_numpy(masks), generator)
                return actions.numpy()

            batch = rollout(envs, act)
            run.record(b, batch.infos, batch.rewards)

            # 2. advantages against the EMA baseline
            rewards = torch.as_tensor(batch.rewards, dtype=torch.float32)
            if baseline is None:
                baseline = rewards.mean().item()
            advantages = rewards - baseline
            baseline = args.baseline_decay * baseline + (1 - args.baseline_decay) * rewards.mean().item()

            # 3. the REINFORCE step
            logp, entropy, _ = policy.evaluate(torch.from_numpy(batch.tokens), torch.from_numpy(batch.masks))
            loss = -(advantages * logp).mean() - args.entropy_coef * entropy.mean()
            optimizer.zero_grad()
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            run.log_update(b, {"loss": loss.item(), "entropy": entropy.mean().item(), "baseline": baseline,
                               "reward_mean": rewards.mean().item()})
            run.save({"policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                      "generator": generator.get_state(), "baseline": baseline})
    return run


if __name__ == "__main__":
    run_cli(main)
