"""MaskablePPO (sb3-contrib) on ``OptimizerSearch-v0``: the plug-in example for third-party RL.

Nothing here knows about update rules. The env is a standard Gymnasium vector env;
``SB3VecEnv`` presents it as a stable-baselines3 ``VecEnv`` whose ``action_masks()`` are
the env's masks, so sb3-contrib's ``MaskablePPO`` samples only valid tokens, and the N
lockstep episodes finish together and are scored as one batch. A callback copies each
finished rule into the run log and checkpoints the model; that is all the glue a
third-party algorithm needs. To plug in another one, swap the model (``stable_baselines3.PPO``,
``A2C``, ``DQN`` or ``sb3_contrib.RecurrentPPO`` run unchanged on the same env; without
masks the env projects invalid actions onto valid tokens).

The policy is an MLP on the observation (the tokens written so far and the position,
one-hot encoded by SB3); it is memoryless, unlike the paper's LSTM.

Run it::

    python agents/maskable_ppo.py                     # Rosenbrock, same budget as trpo_lstm
    python agents/maskable_ppo.py --learning-rate 1e-3 --ent-coef 0.01
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

from nos_gym.agents import Run, RunArgs, parse_args, run_cli
from nos_gym.agents.config import check_range


# ------------------------------------------------------------------------------ arguments
@dataclass
class Args(RunArgs):
    """MaskablePPO settings (shared ones in ``nos_gym.agents.config.RunArgs``): each PPO rollout is
    rollout_episodes rules per sub-env (num_envs lockstep sub-envs)."""

    rollout_episodes: int = 1
    """episodes (rules) per sub-env per PPO rollout: n_steps = rollout_episodes * 5 * depth"""
    learning_rate: float = 3e-4
    batch_size: int = 100
    """PPO minibatch size in steps"""
    n_epochs: int = 4
    gamma: float = 1.0
    """no discount: the only reward is the terminal score"""
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    """hidden layer sizes of the policy and value MLPs"""

    def validate(self) -> None:
        super().validate()
        check_range(self, "rollout_episodes", 1)
        check_range(self, "learning_rate", 0.0, low_open=True)
        check_range(self, "batch_size", 1)
        check_range(self, "n_epochs", 1)
        check_range(self, "gamma", 0.0, 1.0)
        check_range(self, "gae_lambda", 0.0, 1.0)
        check_range(self, "clip_range", 0.0, low_open=True)
        check_range(self, "ent_coef", 0.0)


# ----------------------------------------------------------------------------------- loop
def main(argv: Sequence[str] | None = None) -> Run:
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import BaseCallback

    from nos_gym.envs import SB3VecEnv

    args, resume = parse_args(Args, argv, agent="maskable_ppo", description=__doc__)
    # one PPO rollout (rollout_episodes batches) per checkpoint: a kill may leave that many batches logged past it
    with Run.open(args, "maskable_ppo", resume, batches_per_checkpoint=args.rollout_episodes) as run:
        envs = run.make_envs()
        venv = SB3VecEnv(envs)  # the env as SB3 sees it: masks via action_masks()
        length = envs.length  # tokens per rule

        class RecordRules(BaseCallback):
            """Log every finished batch of rules; checkpoint after each PPO update; stop on Ctrl-C."""

            def _on_step(self) -> bool:
                dones = self.locals["dones"]
                if dones.all():  # lockstep: every sub-env finished its rule in this step
                    run.record(run.next_batch, self.locals["infos"], self.locals["rewards"])
                return not run.stop_requested

            def _on_rollout_start(self) -> None:
                if self.model.num_timesteps > start_steps:  # the model was just updated
                    save()

            def _on_training_end(self) -> None:
                save()

        def save() -> None:
            buf = io.BytesIO()
            model.save(buf)
            run.save({"model": buf.getvalue()})

        if run.checkpoint is not None:
            model = MaskablePPO.load(io.BytesIO(run.checkpoint["state"]["model"]), env=venv, device="cpu")
            run.restore_global_rng()  # load() reseeds; continue the saved random streams instead
        else:
            model = MaskablePPO("MlpPolicy", venv, learning_rate=args.learning_rate,
                                n_steps=args.rollout_episodes * length, batch_size=args.batch_size,
                                n_epochs=args.n_epochs, gamma=args.gamma, gae_lambda=args.gae_lambda,
                                clip_range=args.clip_range, ent_coef=args.ent_coef,
                                policy_kwargs={"net_arch": list(args.net_arch)}, seed=args.seed, device="cpu")
        start_steps = model.num_timesteps
        remaining = (run.num_batches - run.batch_index) * args.num_envs * length
        if remaining > 0:
            run.start_progress()
            try:
                model.learn(total_timesteps=remaining, callback=RecordRules(), reset_num_timesteps=False)
            finally:
                run.close_progress()
    return run


if __name__ == "__main__":
    run_cli(main)
