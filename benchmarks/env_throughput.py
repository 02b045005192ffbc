"""Speed of the environment and of the Rosenbrock fast reward, side by side in one run (issue 3).

(a) env steps per second, excluding the reward: the task scores nothing (a zero task),
    the actions replay pre-sampled valid programs, so what is timed is the env itself:
    the single env raw and through ``gymnasium.make``'s wrappers, and the vector env.
    Goal: >= 20,000 steps/s on one core.
(b) Rosenbrock candidates scored per second: 1,024 random depth-2 rules (paper's full
    space, all constraints) x 4 learning rates x 4,000 steps as one batched computation
    (``BatchedRule``; also the batch split over 2 worker processes), against scoring each candidate with a per-step
    ``NOSOptimizer`` loop (autograd gradient, ``opt.step()``, 4 LRs x 4,000 steps).
    The loop is timed on a sample of candidates at full length and extrapolated linearly
    to 1,024 (each candidate costs the same there, so the extrapolation is a product,
    not a guess about scaling); the table says so. Goal: >= 500 candidates/s on 2 CPU
    cores and >= 100x the per-candidate loop. Also the same batch through the task's other
    executors: ``BatchedRule``'s fused path (``executor="fused"``: one compiled opcode kernel
    per step; its compile is done before timing) and the native kernel (``executor="native"``,
    ``nos_gym.engine.native``: the whole run in one C++ call; 1 process, 2 processes, and 1 process
    with 2 kernel threads), with how many rewards each gives differently from ``BatchedRule``.
    Goal (issue 14): >= 5,000 candidates/s on 2 cores.

    python benchmarks/env_throughput.py             # full sizes (about 1-2 minutes)
    python benchmarks/env_throughput.py --quick     # small sizes, seconds
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import gymnasium as gym
import numpy as np
import torch

import nos_gym  # noqa: F401  (registers the ids)
from nos_gym.dsl import Masker, Program, get_space
from nos_gym.engine import native
from nos_gym.envs import OptimizerSearchEnv, OptimizerSearchVectorEnv
from nos_gym.optim import NOSOptimizer
from nos_gym.tasks import Result, Task
from nos_gym.tasks.rosenbrock import START, RosenbrockTask, rosenbrock


class ZeroTask(Task):
    """Scores nothing, so the env is timed without its reward."""

    name = "zero"

    def evaluate(self, programs):
        return [Result(0.0) for _ in programs]


def random_programs(n: int, depth: int, space: str = "full", seed: int = 0) -> list[Program]:
    return Masker(get_space(space), depth).sample_many(n, seed)


# ------------------------------------------------------------------------------ (a)
def env_steps(episodes: int, depth: int, num_envs: int) -> list[tuple[str, float]]:
    programs = random_programs(max(episodes, num_envs), depth)
    vocab_ids = [p.ids() for p in programs]
    rows = []

    def run_single(env) -> float:
        gc.collect()  # a full collection once landed inside a 50 ms timed window
        start = time.perf_counter()
        steps = 0
        for ids in vocab_ids[:episodes]:
            env.reset()
            for a in ids:
                env.step(a)
            steps += len(ids)
        return steps / (time.perf_counter() - start)

    raw = OptimizerSearchEnv(task=ZeroTask(), depth=depth)
    run_single(raw)  # warm the mask memo
    rows.append((f"OptimizerSearchEnv, depth {depth} (raw)", max(run_single(raw) for _ in range(3))))
    wrapped = gym.make("OptimizerSearch-v0", task=ZeroTask(), depth=depth)
    run_single(wrapped)
    rows.append((f"gymnasium.make('OptimizerSearch-v0'), depth {depth}", max(run_single(wrapped) for _ in range(3))))

    venv = OptimizerSearchVectorEnv(num_envs=num_envs, task=ZeroTask(), depth=depth)
    ids = np.array([vocab_ids[i % len(vocab_ids)] for i in range(num_envs)])

    def run_vector() -> float:
        rounds = max(1, episodes // num_envs)
        gc.collect()
        start = time.perf_counter()
        for _ in range(rounds):
            venv.reset()
            for t in range(ids.shape[1]):
                venv.step(ids[:, t])
        return rounds * num_envs * ids.shape[1] / (time.perf_counter() - start)

    run_vector()
    rows.append((f"OptimizerSearchVectorEnv, {num_envs} envs (sub-env steps/s)", max(run_vector() for _ in range(3))))
    return rows


# ------------------------------------------------------------------------------ (b)
def _score(programs: list[Program], iterations: int, executor: str = "batched",
           threads: int = 1, collect: bool = True) -> tuple[list[float], float, float]:
    """Rewards, and the wall and CPU seconds this process spent on them (``threads``: the
    native kernel's). Both clocks start after the garbage collection (``collect``; a forked
    worker skips it: it would walk the parent's whole heap inside the parent's timing)."""
    torch.set_num_threads(1)
    task = RosenbrockTask(iterations=iterations, executor=executor, threads=threads)
    if collect:
        gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    rewards = [r.reward for r in task.evaluate(programs)]
    return rewards, time.perf_counter() - start, time.process_time() - cpu


def batched_seconds(programs: list[Program], iterations: int, executor: str = "batched",
                    threads: int = 1) -> tuple[float, float, list[float]]:
    rewards, wall, cpu = _score(programs, iterations, executor, threads)
    return wall, cpu, rewards


def parallel_seconds(programs: list[Program], iterations: int, workers: int,
                     executor: str = "batched") -> tuple[float, float, list[float]]:
    chunks = [programs[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        # warm up (the fused path: its compile, or inductor's cached build, in every worker)
        list(pool.map(_score, [programs[:64] if executor == "fused" else [programs[0]]] * workers, [10] * workers,
                      [executor] * workers))
        gc.collect()
        start = time.perf_counter()
        parts = list(pool.map(_score, chunks, [iterations] * workers, [executor] * workers, [1] * workers,
                              [False] * workers))
        elapsed = time.perf_counter() - start  # the pool's round trip included
    rewards = [0.0] * len(programs)
    for i, (part, _, _) in enumerate(parts):
        rewards[i::workers] = part
    return elapsed, max(cpu for _, _, cpu in parts), rewards


def per_candidate_seconds(program: Program, iterations: int, learning_rates) -> tuple[float, float]:
    """One candidate the ordinary way, a torch optimizer loop per learning rate: (wall, CPU) s."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    for lr in learning_rates:
        w = torch.tensor(START, dtype=torch.float64, requires_grad=True)
        opt = NOSOptimizer([w], rule=program, lr=lr)
        for _ in range(iterations):
            opt.zero_grad()
            rosenbrock(w[0], w[1]).backward()
            opt.step()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--candidates", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=4000)
    parser.add_argument("--loop-sample", type=int, default=4, help="candidates timed with the per-step loop")
    parser.add_argument("--workers", type=int, default=2, help="processes for the split batch (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each batched row; the fastest is shown")
    parser.add_argument("--no-fused", action="store_true", help="without the fused-path rows")
    parser.add_argument("--skip-env", action="store_true", help="part (b) only")
    args = parser.parse_args()
    if args.quick:
        args.candidates, args.iterations, args.loop_sample, args.repeats = 128, 200, 2, 1
    torch.set_num_threads(1)
    start = time.perf_counter()
    native.available()  # build (or load) the native kernel before anything is timed
    native_build_s = time.perf_counter() - start
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, 1 torch thread per process, "
          f"torch {torch.__version__}")

    episodes = 400 if args.quick else 4000
    if not args.skip_env:
        print(f"\n(a) env steps per second, reward excluded (zero task), {episodes} episodes of depth 2")
        print(f"{'env':<62} {'steps/s':>10}")
        for name, rate in env_steps(episodes, depth=2, num_envs=64):
            print(f"{name:<62} {rate:>10,.0f}")
        print("goal: >= 20,000 steps/s on one core")

    programs = random_programs(args.candidates, depth=2, seed=1)
    lrs = RosenbrockTask().learning_rates
    print(f"\n(b) Rosenbrock: {args.candidates} random depth-2 rules x {len(lrs)} LRs x {args.iterations} steps")
    print(f"{'scoring':<58} {'wall s':>8} {'cand/s':>8} {'CPU s':>8} {'cand/CPU-s':>10} {'x loop':>7}")
    loop_times = [per_candidate_seconds(p, args.iterations, lrs) for p in programs[: args.loop_sample]]
    loop_wall = statistics.mean(t for t, _ in loop_times) * args.candidates
    loop_cpu = statistics.mean(c for _, c in loop_times) * args.candidates
    # the batched rows are repeated, interleaved, and the fastest run of each is kept (as
    # timeit does): on a shared machine a slow run measures the neighbours, not the code
    runs: dict[str, list[tuple[float, float]]] = {}
    rewards: dict[str, list[float]] = {}
    executors = ["batched"] + ([] if args.no_fused else ["fused"]) + (["native"] if native.available() else [])
    if "fused" in executors:  # the compile (or inductor's cached build), before any timing
        start = time.perf_counter()
        batched_seconds(programs[:64], 10, "fused")
        print(f"fused path: first use (compile, or load from inductor's disk cache) {time.perf_counter() - start:.1f} s")
    if "native" in executors:
        print(f"native kernel: built or loaded in {native_build_s:.1f} s")
    labels = {"batched": "one batch (BatchedRule)", "fused": "one batch, fused (executor='fused')",
              "native": "native kernel (executor='native')"}
    for _ in range(args.repeats):
        for ex in executors:
            sec, cpu, rw = batched_seconds(programs, args.iterations, ex)
            runs.setdefault(f"{labels[ex]}, 1 process", []).append((sec, cpu))
            rewards[ex] = rw
            if args.workers > 1:
                par_s, par_c, _ = parallel_seconds(programs, args.iterations, args.workers, ex)
                runs.setdefault(f"{labels[ex]}, {args.workers} processes (CPU s: slowest)", []).append((par_s, par_c))
            if ex == "native" and args.workers > 1:
                sec, cpu, _ = batched_seconds(programs, args.iterations, ex, threads=args.workers)
                runs.setdefault(f"{labels[ex]}, 1 process, {args.workers} kernel threads", []).append((sec, cpu))
    results = [(name, *min(times)) for name, times in runs.items()]
    n = args.candidates
    for name, sec, cpu in results:
        print(f"{name:<58} {sec:>8.2f} {n / sec:>8.1f} {cpu:>8.2f} {n / cpu:>10.1f} {loop_wall / sec:>6.0f}x")
    print(f"{'per-candidate NOSOptimizer loop (extrapolated, see below)':<58} {loop_wall:>8.0f} "
          f"{n / loop_wall:>8.2f} {loop_cpu:>8.0f} {n / loop_cpu:>10.2f} {1:>6.0f}x")
    print(f"batched rows: the fastest of {args.repeats} interleaved runs "
          f"(all runs, wall s: {'; '.join(', '.join(f'{t:.2f}' for t, _ in v) for v in runs.values())})")
    print(f"the per-candidate loop was timed on {args.loop_sample} candidates at full length "
          f"({loop_wall / n:.2f} s each, {len(lrs)} LRs x {args.iterations} steps) and multiplied by {n}.\n"
          "CPU s is this process's CPU time: on a shared machine wall time also counts other people's work.")
    for ex in executors[1:]:
        diff = np.abs(np.array(rewards[ex]) - np.array(rewards["batched"]))
        print(f"rewards, {ex} vs batched: {int((diff <= 1e-6).sum())} of {n} within 1e-6, "
              f"{int((diff > 0.01).sum())} differ by more than 0.01 (max {diff.max():.3f})")
    print("goal: >= 500 candidates/s on 2 CPU cores, >= 100x the per-candidate loop; "
          "issue 14: >= 5,000 candidates/s on 2 cores")


if __name__ == "__main__":
    main()
