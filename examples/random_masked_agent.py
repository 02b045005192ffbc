"""A random agent that samples only valid tokens, on the batched vector env.

Writes ``--episodes`` random rules (depth 2, the paper's full vocabulary, all three
constraints) through ``OptimizerSearch-v0``'s vector form, 64 rules per batch, each batch
scored by the Rosenbrock task as one vectorised computation, and prints the best rules.

    python examples/random_masked_agent.py
    python examples/random_masked_agent.py --episodes 2048 --space small --depth 1
"""

import argparse
import time

import gymnasium as gym
import numpy as np

import nos_gym  # noqa: F401  (registers OptimizerSearch-v0)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--episodes", type=int, default=512)
parser.add_argument("--num-envs", type=int, default=64)
parser.add_argument("--depth", type=int, default=2)
parser.add_argument("--space", default="full")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

envs = gym.make_vec("OptimizerSearch-v0", num_envs=args.num_envs, vectorization_mode="vector_entry_point",
                    task="rosenbrock", depth=args.depth, space=args.space)
rng = np.random.default_rng(args.seed)
found: dict[str, tuple[float, str]] = {}  # canonical key -> (reward, rule)
start = time.perf_counter()
for batch in range(-(-args.episodes // args.num_envs)):
    _, info = envs.reset(seed=args.seed + batch)
    terminated = np.zeros(args.num_envs, dtype=bool)
    while not terminated.all():
        mask = info["action_mask"].astype(bool)
        actions = (rng.random(mask.shape) * mask).argmax(axis=1)  # uniform among the valid tokens
        _, rewards, terminated, _, info = envs.step(actions)
    for key, rule, reward in zip(info["canonical_key"], info["rule"], rewards):
        found[key] = (float(reward), rule)
elapsed = time.perf_counter() - start

scores = np.array([r for r, _ in found.values()])
print(f"{len(found)} distinct rules in {elapsed:.1f} s; mean reward {scores.mean():.3f}, "
      f"{(scores > 0).mean():.0%} improve on the start")
print("best rules (Rosenbrock reward):")
for reward, rule in sorted(found.values(), reverse=True)[:10]:
    print(f"  {reward:.3f}  {rule}")
