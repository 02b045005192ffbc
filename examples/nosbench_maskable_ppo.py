"""sb3-contrib MaskablePPO on NOS-Bench (OptimizerSearch-Bench-v0) for 2,000 rules; prints the regret.

``OptimizerSearch-Bench-v0`` is the "small" space at depth 1 with the paper's constraints, its
reward the CIFAR-10 child's, read from the NOS-Bench table (``nos_gym.bench``): a search of
2,000 rules takes seconds instead of a day. The regret is the table's best reward minus the
best reward found so far; the simulated cost adds the child-images of each distinct rule the
first time it is sampled (what a live search with the evaluator's store would have trained).

    python examples/nosbench_maskable_ppo.py                       # the shipped table, 2,000 rules
    python examples/nosbench_maskable_ppo.py --table my-table.csv.gz --rules 500 --hurdle 0.277
"""

import argparse

import gymnasium as gym
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback

import nos_gym  # noqa: F401  (registers OptimizerSearch-Bench-v0)
from nos_gym import bench
from nos_gym.envs import SB3VecEnv

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--table", default=bench.DEFAULT, help="a NOS-Bench table's name or file")
parser.add_argument("--rules", type=int, default=2000, help="rules (episodes) to sample")
parser.add_argument("--num-envs", type=int, default=16)
parser.add_argument("--hurdle", type=float, default=None, help="score as the live task with this sweep hurdle")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.set_num_threads(1)

table = bench.load(args.table)
optimum = table.optimum(args.hurdle)


class Regret(BaseCallback):
    """Records each finished rule; stops after ``--rules`` of them."""

    def __init__(self, rules: int):
        super().__init__()
        self.rules = rules
        self.rewards: list[float] = []
        self.images: list[int] = []  # simulated child-images after each rule
        self.seen: dict[str, tuple[float, str]] = {}

    def _on_step(self) -> bool:
        for info, reward in zip(self.locals["infos"], self.locals["rewards"]):
            if "rule" not in info or len(self.rewards) >= self.rules:
                continue
            key = info["canonical_key"]
            cost = 0 if key in self.seen else int(info["metrics"].get("child_images") or 0)
            self.seen.setdefault(key, (float(reward), info["rule"]))
            self.rewards.append(float(reward))
            self.images.append((self.images[-1] if self.images else 0) + cost)
        return len(self.rewards) < self.rules


venv = gym.make_vec("OptimizerSearch-Bench-v0", num_envs=args.num_envs, vectorization_mode="vector_entry_point",
                    task_options={"table": args.table, "hurdle": args.hurdle})
model = MaskablePPO("MlpPolicy", SB3VecEnv(venv), n_steps=4 * 5, batch_size=4 * 5 * args.num_envs, n_epochs=4,
                    learning_rate=1e-3, seed=args.seed, verbose=0)
callback = Regret(args.rules)
model.learn(total_timesteps=5 * (args.rules + 4 * args.num_envs), callback=callback)

print(f"table {table.name}: {table.covers()}; optimum {optimum:.4f}"
      + (f" (hurdle {args.hurdle})" if args.hurdle is not None else ""))
print(f"{'rules':>6}  {'best':>7}  {'regret':>7}  {'child-images':>13}")
best = 0.0
marks = sorted({m for m in (100, 250, 500, 1000, 2000, len(callback.rewards)) if m <= len(callback.rewards)})
for i, r in enumerate(callback.rewards, 1):
    best = max(best, r)
    if i in marks:
        print(f"{i:>6}  {best:>7.4f}  {optimum - best:>7.4f}  {callback.images[i - 1]:>13,}")
print(f"regret after {len(callback.rewards):,} rules ({len(callback.seen):,} distinct): {optimum - best:.4f}")
print("best rules found (table reward):")
for reward, rule in sorted(callback.seen.values(), reverse=True)[:5]:
    print(f"  {reward:.3f}  {rule}")
