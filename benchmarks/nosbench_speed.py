"""How fast a NOS-Bench table loads and answers: the goals are a load under 1 s and a lookup of
1,000 rules under 10 ms (issue 21); also the Bench env's episodes per second.

    python benchmarks/nosbench_speed.py                          # the shipped default table
    python benchmarks/nosbench_speed.py --table my-table.csv.gz  # any table file

Without a shipped table (before the real tabulation) it times a stand-in: the "small" space at
depth 1 tabulated on Rosenbrock (200 iterations) in a temporary folder, which has the real
table's rows but fewer columns, and says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nos_gym import bench
from nos_gym.bench import table as table_module
from nos_gym.dsl import Masker, get_space

LOAD_GOAL_S = 1.0
LOOKUP_GOAL_S = 0.010


def stand_in(folder: Path) -> Path:
    """The small depth-1 space tabulated on Rosenbrock: a table with the real one's rows."""
    from nos_gym.evaluation.tabulate import tabulate

    out = folder / "small1-rosenbrock.csv.gz"
    tabulate("rosenbrock", {"iterations": 200}, space="small", depth=1, out=out, store=folder / "s.sqlite",
             name="small1-rosenbrock", backend="serial", progress=False, log=None)
    return out


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", default=None, help="a table's name or file (default: the shipped default, else a stand-in)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--episodes", type=int, default=2048, help="episodes of the Bench env to time")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        source = a.table
        note = ""
        if source is None:
            if bench.DEFAULT in bench.available():
                source = bench.DEFAULT
            else:
                source = str(stand_in(Path(tmp)))
                note = " (a stand-in: no table is shipped yet)"
        path = bench.table_path(source)

        def cold_load():
            table_module._CACHE.clear()
            return bench.load(source)

        load_times = timed(cold_load, a.repeat)
        table = bench.load(source)
        space = table.meta.get("space", {})
        masker = Masker(get_space(space.get("name", "small")), int(table.meta.get("depth", 1)))
        programs = [p for p in masker.sample_many(4000, 0) if p in table][:1000]
        keys = [p.canonical_key for p in programs]
        by_key = timed(lambda: table.rewards(keys), a.repeat)
        by_program = timed(lambda: table.rewards(programs), a.repeat)
        rows = timed(lambda: table.lookup(keys), a.repeat)
        fresh = []
        for _ in range(a.repeat):  # Programs never seen: their canonical keys are computed in the lookup
            batch = [type(p)(p.tokens) for p in programs]
            t0 = time.perf_counter()
            table.rewards(batch)
            fresh.append(time.perf_counter() - t0)
        env_rate = env_episodes_per_second(source, a.episodes)
        size = path.stat().st_size

    med = statistics.median
    print(f"# NOS-Bench speed: {table.name}{note}, {len(table):,} rows, {len(table.columns)} columns, "
          f"{size / 1e6:.2f} MB; median of {a.repeat}")
    print("| what | median | goal |")
    print("|---|--:|--:|")
    print(f"| load (read, check, parse) | {med(load_times) * 1e3:.1f} ms | < {LOAD_GOAL_S * 1e3:.0f} ms |")
    print(f"| rewards of 1,000 rules by canonical key | {med(by_key) * 1e3:.2f} ms | < {LOOKUP_GOAL_S * 1e3:.0f} ms |")
    print(f"| rewards of 1,000 Programs (keys known) | {med(by_program) * 1e3:.2f} ms | < {LOOKUP_GOAL_S * 1e3:.0f} ms |")
    print(f"| rows of 1,000 rules by canonical key | {med(rows) * 1e3:.2f} ms | |")
    print(f"| rewards of 1,000 new Programs (keys computed) | {med(fresh) * 1e3:.2f} ms | |")
    print(f"| Bench env, 64 lockstep envs | {env_rate:,.0f} episodes/s | |")
    ok = med(load_times) < LOAD_GOAL_S and med(by_key) < LOOKUP_GOAL_S and med(by_program) < LOOKUP_GOAL_S
    print("goals met" if ok else "GOALS MISSED")
    return 0 if ok else 1


def env_episodes_per_second(table: str, episodes: int, num_envs: int = 64) -> float:
    """Episodes a second of the Bench env's vector form with random valid actions."""
    import gymnasium as gym

    import nos_gym  # noqa: F401

    env = gym.make_vec("OptimizerSearch-Bench-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                       task_options={"table": table})
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    done = 0
    t0 = time.perf_counter()
    while done < episodes:
        masks = env.unwrapped.action_masks() if hasattr(env.unwrapped, "action_masks") else None
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        _, _, terminated, _, _ = env.step(actions)
        done += int(terminated.sum())
        if terminated.all():
            env.reset()
    return done / (time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
