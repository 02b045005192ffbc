"""How far a reward moves between machines: the same rules scored under each of torch's CPU
kernel sets, side by side in one run (issue 10).

torch picks its CPU kernels at start-up by the processor's vector width (``default``: no
vectorisation, ``avx2``, ``avx512``); ``ATEN_CPU_CAPABILITY`` forces a narrower set. The
kernels round differently (``exp``, ``log``, reductions in another order), and a
chaotic trajectory (Rosenbrock at lr 1e-3 for 4,000 steps) can turn a last-bit difference
into a different final loss. This script scores one fixed batch of rules (random
depth-2 rules of the paper's full space, deterministic ones only, plus the paper's
Table 1) on the Rosenbrock and quadratic tasks in one subprocess per kernel set, then
prints, for each pair, how many rewards are bit-identical and how far the others move.

    python benchmarks/portability.py             # 320 random rules + Table 1, ~1-3 minutes
    python benchmarks/portability.py --rules 40  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

CAPABILITIES = ("default", "avx2", "avx512")


def available_capabilities() -> list[str]:
    """The kernel sets this CPU can run (``avx512`` needs avx512f/bw/vl/dq, as torch asks)."""
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    caps = ["default"]
    if " avx2" in flags:
        caps.append("avx2")
    if all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        caps.append("avx512")
    return caps


def score(rules: int, seed: int) -> dict[str, dict[str, float]]:
    """Rewards (and Rosenbrock's best losses) of the fixed batch, in this process's kernel set."""
    import torch

    from nos_gym.dsl import Masker, get_space, parse
    from nos_gym.optim import table1
    from nos_gym.tasks import make

    torch.set_num_threads(1)
    programs = Masker(get_space("full"), 2).sample_many(rules, seed, distinct=True, deterministic=True)
    programs += [parse(text) for text in table1().values() if not parse(text).stochastic]
    keys = [p.canonical_key for p in programs]
    out: dict[str, dict[str, float]] = {}
    for task_name, (name, options) in TASKS.items():
        results = make(name, **options).evaluate(programs)
        out[task_name] = {str(k): float(r.reward) for k, r in zip(keys, results)}
    return out


#: the tasks compared: Rosenbrock through torch's executor and through the native kernel
#: (``nos_gym.engine.native``, the default where it builds), and the quadratic
TASKS = {"rosenbrock": ("rosenbrock", {"executor": "batched"}), "rosenbrock-native": ("rosenbrock", {"executor": "native"}),
         "quadratic": ("quadratic", {})}
#: the native kernel compiled for: SSE2 only, AVX2 (x86-64-v3), and the host's own CPU
NATIVE_ARCHS = ("x86-64", "x86-64-v3", "native")


def native_builds(rules: int, seed: int) -> dict[str, dict[str, float]]:
    """Rewards of the batch (stochastic rules included) from the native kernel built for each of
    ``NATIVE_ARCHS``: what a machine with narrower vector units computes, on this one."""
    import torch

    from nos_gym.dsl import Masker, get_space
    from nos_gym.tasks.rosenbrock import RosenbrockTask

    torch.set_num_threads(1)
    programs = Masker(get_space("full"), 2).sample_many(rules, seed, distinct=True)
    keys = [str(p.canonical_key) for p in programs]
    out = {}
    for arch in NATIVE_ARCHS:
        task = RosenbrockTask(executor="native")
        task.native_arch = arch
        out[arch] = dict(zip(keys, (float(r.reward) for r in task.evaluate(programs))))
    return out


def compare(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    x = np.array([a[k] for k in sorted(a)])
    y = np.array([b[k] for k in sorted(a)])
    diff = np.abs(x - y)
    return {"rules": len(x), "identical": int((diff == 0).sum()), "over_1e-3": int((diff > 1e-3).sum()),
            "over_1e-2": int((diff > 1e-2).sum()), "max": float(diff.max())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", type=int, default=320, help="random deterministic depth-2 rules (plus Table 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: score in this process
    a = p.parse_args(argv)
    if a.child:
        json.dump(score(a.rules, a.seed), sys.stdout)
        return {}
    caps = available_capabilities()
    scores = {}
    for cap in caps:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        proc = subprocess.run([sys.executable, __file__, "--rules", str(a.rules), "--seed", str(a.seed),
                               "--child", cap], env=env, capture_output=True, text=True, check=True)
        scores[cap] = json.loads(proc.stdout)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; kernel sets: {', '.join(caps)}")
    print(f"# {a.rules} random deterministic depth-2 rules (full space, seed {a.seed}) + Table 1's deterministic rules")
    print(f"{'task':<17} {'pair':<17} {'rules':>5} {'identical':>9} {'|d|>1e-3':>8} {'|d|>1e-2':>8} {'max |d|':>9}")
    table = {}
    for task_name in TASKS:
        for x, y in combinations(caps, 2):
            c = compare(scores[x][task_name], scores[y][task_name])
            table[f"{task_name}:{x}-{y}"] = c
            print(f"{task_name:<17} {x + ' vs ' + y:<17} {c['rules']:>5} {c['identical']:>9} {c['over_1e-3']:>8} "
                  f"{c['over_1e-2']:>8} {c['max']:>9.4f}")
    if platform.machine() in ("x86_64", "AMD64"):
        builds = native_builds(a.rules, a.seed)
        print(f"# the native kernel built for {', '.join(NATIVE_ARCHS)}: {a.rules} random depth-2 rules "
              "(full space, stochastic ones included), 4 draws each")
        for x, y in combinations(NATIVE_ARCHS, 2):
            c = compare(builds[x], builds[y])
            table[f"native:{x}-{y}"] = c
            print(f"{'rosenbrock-native':<17} {x + ' vs ' + y:<17} {c['rules']:>5} {c['identical']:>9} {c['over_1e-3']:>8} "
                  f"{c['over_1e-2']:>8} {c['max']:>9.4f}")
    return table


if __name__ == "__main__":
    main()
