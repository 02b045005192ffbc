"""Score update rules on your own task: subclass ``Task``, register it, pass it by name.

The task here fits a small ill-conditioned least-squares problem (a fixed random 64 x 8
design whose columns span two orders of magnitude) with each rule for 100 steps at two
learning rates, all rules of a batch at once on stacked
parameters (``BatchedRule``), and scores the best final loss on [0, 1]. Then the env
searches rules on it with a random masked agent.

    python examples/custom_task.py
"""

import math

import gymnasium as gym
import numpy as np
import torch

import nos_gym  # noqa: F401  (registers OptimizerSearch-v0)
from nos_gym.dsl import parse
from nos_gym.engine.rules import BatchedRule
from nos_gym.tasks import Result, Task, register


class LeastSquaresTask(Task):
    name = "least-squares"
    version = 1  # bump when the scoring changes, so cached scores are not reused

    def __init__(self, steps: int = 100, learning_rates=(1e-2, 1e-1), seed: int = 0):
        self.steps, self.learning_rates, self.seed = steps, tuple(learning_rates), seed
        gen = torch.Generator().manual_seed(seed)
        scales = torch.logspace(0, -2, 8, dtype=torch.float64)  # ill-conditioned columns
        self.X = torch.randn(64, 8, generator=gen, dtype=torch.float64) * scales
        self.y = self.X @ torch.randn(8, generator=gen, dtype=torch.float64)

    def config(self):  # everything that changes the scores: the fingerprint hashes it
        return {"steps": self.steps, "learning_rates": list(self.learning_rates), "seed": self.seed}

    def loss(self, w):  # w: (R, 8) -> (R,)
        return ((w @ self.X.T - self.y) ** 2).mean(dim=1)

    def evaluate(self, programs):
        L = len(self.learning_rates)
        rows = [p for p in programs for _ in range(L)]  # every program at every learning rate
        rule = BatchedRule(rows, generator=torch.Generator().manual_seed(self.seed))
        w = torch.zeros(len(rows), 8, dtype=torch.float64)
        lr = torch.tensor(self.learning_rates, dtype=torch.float64).repeat(len(programs)).view(-1, 1)
        state = rule.init(w)
        for _ in range(self.steps):
            grad = 2 * (w @ self.X.T - self.y) @ self.X / len(self.y)
            d, state = rule.update(state, grad, w)
            w = w - lr * d
        final = self.loss(w).view(len(programs), L)
        start = self.loss(torch.zeros(1, 8, dtype=torch.float64)).item()
        results = []
        for row in final.tolist():
            best = min((v for v in row if math.isfinite(v)), default=math.inf)
            # reward: orders of magnitude gained over the start, 6 orders = 1 (non-finite -> 0;
            # Result clamps to [0, 1])
            reward = 0.0 if not math.isfinite(best) else math.log10(start / max(best, 1e-30)) / 6
            results.append(Result(reward, {"best_loss": best if math.isfinite(best) else None}))
        return results


register("least-squares", LeastSquaresTask)

# 1. the task alone
task = LeastSquaresTask()
for text in ["g", "ADAM", "g * exp(sign(g) * sign(m))", "exp(g^2)"]:
    print(f"{text:30s} reward {task.evaluate([parse(text)])[0].reward:.3f}")

# 2. the env, by registered name (options go to the task's constructor) ...
envs = gym.make_vec("OptimizerSearch-v0", num_envs=32, vectorization_mode="vector_entry_point",
                    task="least-squares", task_options={"steps": 50}, depth=1, space="small")
# ... or with a Task object: gym.make("OptimizerSearch-v0", task=LeastSquaresTask(), depth=1)
rng = np.random.default_rng(0)
_, info = envs.reset(seed=0)
for _ in range(5):
    mask = info["action_mask"].astype(bool)
    _, rewards, terminated, _, info = envs.step((rng.random(mask.shape) * mask).argmax(axis=1))
best = np.argsort(-rewards)[:3]
print("best of 32 random rules:", [(info["rule"][i], round(float(rewards[i]), 3)) for i in best])
