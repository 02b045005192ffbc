"""sb3-contrib MaskablePPO searching update rules on the Rosenbrock env; prints the best found.

``SB3VecEnv`` presents ``OptimizerSearch-v0``'s vector form as a stable-baselines3
``VecEnv``: MaskablePPO reads the masks through ``action_masks()``, and the ``--num-envs``
rules of each lockstep episode are scored by the Rosenbrock task as one batch.

    python examples/maskable_ppo_rosenbrock.py                       # depth 1, "small" space, 1-2 min
    python examples/maskable_ppo_rosenbrock.py --depth 2 --space full --timesteps 100000
"""

import argparse

import numpy as np
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecMonitor

from nos_gym.envs import SB3VecEnv

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--timesteps", type=int, default=20_000)
parser.add_argument("--num-envs", type=int, default=32)
parser.add_argument("--depth", type=int, default=1)
parser.add_argument("--space", default="small")
parser.add_argument("--iterations", type=int, default=4000, help="Rosenbrock steps per learning rate")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.set_num_threads(1)


class BestRules(BaseCallback):
    """Collects every finished rule and its reward from the env infos."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, tuple[float, str]] = {}
        self.rewards: list[float] = []

    def _on_step(self) -> bool:
        for info, reward in zip(self.locals["infos"], self.locals["rewards"]):
            if "rule" in info:  # a finished episode
                self.found[info["canonical_key"]] = (float(reward), info["rule"])
                self.rewards.append(float(reward))
        return True


venv = VecMonitor(SB3VecEnv(num_envs=args.num_envs, task="rosenbrock", depth=args.depth, space=args.space,
                            task_options={"iterations": args.iterations}))
model = MaskablePPO("MlpPolicy", venv, n_steps=4 * 5 * args.depth, batch_size=4 * 5 * args.depth * args.num_envs,
                    n_epochs=4, learning_rate=1e-3, seed=args.seed, verbose=0)
callback = BestRules()
model.learn(args.timesteps, callback=callback)

rewards = np.array(callback.rewards)
chunk = max(1, len(rewards) // 5)
print(f"{len(rewards)} episodes, {len(callback.found)} distinct rules")
print("mean reward by fifth of training:", " ".join(f"{rewards[i:i + chunk].mean():.3f}"
                                                     for i in range(0, chunk * 5, chunk)))
print("best rules found (Rosenbrock reward):")
for reward, rule in sorted(callback.found.values(), reverse=True)[:10]:
    print(f"  {reward:.3f}  {rule}")
