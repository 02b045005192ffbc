"""Every agent on the registered env ids, over many seeds: the benchmark of issue 22.

For each env id (``OptimizerSearch-Rosenbrock-v0``; ``OptimizerSearch-Bench-v0`` when a
NOS-Bench table is there), each agent and each seed it runs the agent once, to the largest
budget, and writes one JSON per finished run (``OUT/ENV_ID/AGENT/sSEED.json``: the reward of
every sampled rule, an id per distinct rule, the best rule, the wall time). A run whose JSON
exists is skipped, so an interrupted benchmark continues where it stopped (``--fresh`` starts
over). Then, per env and budget (each a prefix of the runs, as every agent's first B samples
do not depend on its total budget), it prints and saves a table over the seeds:

- the median and interquartile range of the best reward found, and of the regret (the
  optimum minus the best found; the optimum is the table's best reward on NOS-Bench, the
  reward's upper bound 1 on Rosenbrock, or ``--optimum``);
- the median (IQR) mean reward of the top 10 *distinct* rules;
- samples until the optimum: the median over the seeds that reached it, and how many did;
- the median wall time of a run (at a smaller budget, its share of the run's time);
- against regularized evolution: a two-sided Mann-Whitney U test of the top-10 means (on
  NOS-Bench, of the regrets) and a bootstrap 95% interval of the difference of medians;

and plots the median best reward (regret on NOS-Bench) against samples, with the IQR as a band.

Agents: ``agents_compare.VARIANTS`` (the bundled agents; TRPO-LSTM with the EMA baseline, the
risk-seeking one and the presets paper, pqt, hybrid; REINFORCE; random search; regularized
evolution; MaskablePPO) plus ``sb3_trpo``: sb3-contrib's TRPO, unmodified (default
hyper-parameters, no masks: the env projects invalid tokens), on ``gym.make(ENV_ID)``.
Every bundled agent runs through the same env id's settings (task, space, depth) in this
process, without a result store, so each run's wall time includes all of its scoring.

    python benchmarks/bench_agents.py                                  # 20 seeds, every agent, ~hours
    python benchmarks/bench_agents.py --agents evolution trpo_lstm_pqt --seeds 100-119 --jobs 2
    python benchmarks/bench_agents.py --smoke                          # everything tiny, < 1 minute
    python benchmarks/bench_agents.py --tune --tune-configs 20         # the tuning protocol (below)

The tuning protocol (``--tune``): TRPO-LSTM and regularized evolution each get the same number
of configurations (``--tune-configs``): the agent's default first, the rest drawn at random
(seed ``--tune-seed``) from ``TUNE_SPACES``. Every configuration runs on the tuning seeds
(``--tune-seeds``, 0-9) at the largest budget; the best by the median top-10 mean (NOS-Bench:
the median regret), ties broken by the median samples until the optimum, is then run on the
fresh seeds (``--seeds``, 100-119 with ``--tune``) and only those runs are reported, beside the
untuned agents on the same seeds. ``tune.json`` and ``tune.md`` record the protocol and every
configuration tried, with its per-seed scores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import agents_compare  # noqa: E402  (a sibling script: the agent variants, the machine line)
from _common import OUT_ROOT, format_seconds, markdown_table  # noqa: E402

ROSENBROCK = "OptimizerSearch-Rosenbrock-v0"
BENCH = "OptimizerSearch-Bench-v0"
#: the budgets (sampled rules) reported per env id when --budgets is not given (issue 22)
DEFAULT_BUDGETS = {ROSENBROCK: [3000], BENCH: [500, 2000]}
#: rules per batch (per controller update) per env id when --num-envs is not given: the agents' default
#: on Rosenbrock; on NOS-Bench, whose budgets are small, configs/cifar_cpu.yaml's 20
DEFAULT_NUM_ENVS = {ROSENBROCK: 100, BENCH: 20}
#: the sb3-contrib TRPO variant (not a bundled agent: run here through gym.make)
SB3_TRPO = "sb3_trpo"
#: the agents run when --agents is not given, in the tables' order
DEFAULT_AGENTS = ["trpo_lstm", "trpo_lstm_risk", "trpo_lstm_paper", "trpo_lstm_pqt", "trpo_lstm_hybrid",
                  "reinforce_lstm", "random_search", "evolution", "maskable_ppo", SB3_TRPO]
REFERENCE = "evolution"
TUNED = {"trpo_lstm": "tuned_trpo_lstm", "evolution": "tuned_evolution"}
#: the variants a finished agent run is set beside (--write-reference), with the names it prints
#: (tuned_trpo_lstm on Rosenbrock is agents/trpo_lstm.py's defaults, batch included; the trpo_lstm variant
#: runs those defaults at the env's batch, DEFAULT_NUM_ENVS)
REFERENCE_VARIANTS = {"tuned_evolution": "regularized evolution, tuned", "evolution": "regularized evolution",
                      "tuned_trpo_lstm": "TRPO-LSTM, tuned", "trpo_lstm_paper": "TRPO-LSTM, the paper's setting"}
REFERENCE_PATH = Path(__file__).resolve().parents[1] / "nos_gym" / "agents" / "reference_results.json"

#: the tuning protocol's search spaces: each configuration is one value per key, drawn uniformly
TUNE_SPACES: dict[str, dict[str, list[Any]]] = {
    "trpo_lstm": {
        "num_envs": [20, 50, 100], "max_kl": [0.01, 0.02, 0.05, 0.1, 0.2], "baseline": ["ema", "risk_seeking"],
        "baseline_decay": [0.8, 0.9, 0.95], "entropy_coef": [0.0, 0.0015, 0.005, 0.01],
        "risk_epsilon": [0.05, 0.1, 0.2], "hidden_size": [64, 150], "pqt_k": [0, 10, 20],
        "pqt_weight": [0.3, 1.0, 3.0], "evolution_fraction": [0.0, 0.25, 0.5],
    },
    "evolution": {
        "num_envs": [20, 50, 100], "population_size": [20, 50, 100, 200], "tournament_size": [2, 5, 10, 25, 50],
        "mutations": [1, 2, 3], "novel_children": [False, True],
    },
}


# ----------------------------------------------------------------------------- settings
@dataclass
class EnvSpec:
    """One env id as the agents see it: its task, space and depth, task options, optimum, budgets, batch."""

    env_id: str
    task: str
    space: str
    depth: int
    task_options: dict[str, Any]
    optimum: float
    optimum_source: str
    budgets: list[int]
    num_envs: int

    def agent_flags(self) -> list[str]:
        return ["--task", self.task, "--task-options", json.dumps(self.task_options), "--space", self.space,
                "--depth", str(self.depth), "--num-envs", str(self.num_envs)]


@dataclass
class RunSpec:
    """One (variant, seed) run: what is run and where its JSON goes."""

    variant: str
    agent: str
    flags: list[str]
    seed: int
    env: EnvSpec
    path: Path
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        return max(self.env.budgets)


def parse_seeds(text: Sequence[str]) -> list[int]:
    """Seeds from ``["0-9", "12"]``-style items (ranges inclusive)."""
    out: list[int] = []
    for item in text:
        for part in str(item).split(","):
            if "-" in part.strip("-"):
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    return list(dict.fromkeys(out))


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=None,
                   help=f"env ids (default: {ROSENBROCK}, and {BENCH} when a NOS-Bench table is shipped or --table)")
    p.add_argument("--agents", nargs="+", default=None, choices=[*agents_compare.VARIANTS, SB3_TRPO],
                   help="agent variants (default: every bundled agent, the presets and sb3_trpo)")
    p.add_argument("--seeds", nargs="+", default=None, help="seeds, e.g. 0-19 (default 0-19; with --tune 100-119)")
    p.add_argument("--budgets", nargs="+", type=int, default=None,
                   help="sampled rules reported (default: 3000 on Rosenbrock, 500 and 2000 on NOS-Bench)")
    p.add_argument("--num-envs", type=int, default=None, help="rules per batch (default: 100 Rosenbrock, 20 NOS-Bench)")
    p.add_argument("--task-options", type=json.loads, default=None,
                   help="JSON task options for every env (e.g. {\"iterations\": 1000}); NOS-Bench gets its table too")
    p.add_argument("--table", default=None, help="NOS-Bench table (name or file) for OptimizerSearch-Bench-v0")
    p.add_argument("--hurdle", type=float, default=None, help="NOS-Bench: the table's rewards under this hurdle")
    p.add_argument("--optimum", type=float, default=None, help="the reward counted as the optimum (all envs)")
    p.add_argument("--top", type=int, default=10, help="k of the top-k distinct mean")
    p.add_argument("--set", action="append", default=[], metavar="VARIANT.KEY=VALUE",
                   help="an extra setting for one variant, e.g. evolution.population_size=50 (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (processes); 1: in this process")
    p.add_argument("--out", type=Path, default=OUT_ROOT / "bench_agents")
    p.add_argument("--fresh", action="store_true", help="delete the finished runs' JSON under --out first")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="everything tiny: small Rosenbrock (100 iterations), 2 seeds, 60 rules, batches of 20")
    p.add_argument("--write-reference", nargs="?", type=Path, const=REFERENCE_PATH, default=None, metavar="FILE",
                   help="also write the reference medians that a finished agent run is set beside (default file: "
                        "nos_gym/agents/reference_results.json; an env already in it is replaced)")
    p.add_argument("--tune", action="store_true", help="run the tuning protocol (see above)")
    p.add_argument("--tune-configs", type=int, default=20, help="configurations per tuned agent")
    p.add_argument("--tune-seeds", nargs="+", default=["0-9"], help="the seeds configurations are tuned on")
    p.add_argument("--tune-seed", type=int, default=0, help="seed of the configurations' draw")
    a = p.parse_args(argv)
    if a.smoke:
        a.envs = a.envs or ["OptimizerSearch-RosenbrockSmall-v0"]
        a.seeds = a.seeds or ["0-1"]
        a.budgets = a.budgets or [40, 60]
        a.num_envs = a.num_envs or 20
        a.tune_configs = min(a.tune_configs, 2)
        a.tune_seeds = ["0-1"] if a.tune_seeds == ["0-9"] else a.tune_seeds
        a.set = ["evolution.population_size=10", "evolution.tournament_size=3", *a.set]
        if a.out == OUT_ROOT / "bench_agents":
            a.out = OUT_ROOT / "bench_agents-smoke"
    a.seeds = parse_seeds(a.seeds or (["100-119"] if a.tune else ["0-19"]))
    a.tune_seeds = parse_seeds(a.tune_seeds)
    a.agents = a.agents or list(DEFAULT_AGENTS)
    return a


def env_specs(a: argparse.Namespace) -> list[EnvSpec]:
    """The env ids to run, each with its agents' settings, optimum and budgets."""
    import nos_gym
    from nos_gym import bench

    ids = a.envs
    if ids is None:
        ids = [ROSENBROCK] + ([BENCH] if a.table is not None or bench.DEFAULT in bench.available() else [])
    specs = []
    for env_id in ids:
        if env_id not in nos_gym.ENV_IDS:
            raise SystemExit(f"unknown env id {env_id!r}; registered: {list(nos_gym.ENV_IDS)}")
        kw = {"task": "rosenbrock", "space": "full", "depth": 2, **nos_gym.ENV_IDS[env_id]}
        smoke = {"iterations": 100} if a.smoke and kw["task"] == "rosenbrock" else {}  # NOS-Bench takes no such option
        options = dict(a.task_options if a.task_options is not None else smoke)
        if kw["task"] == "nosbench":
            try:
                table = bench.load(a.table)  # the shipped default when --table is not given
            except bench.TableError as e:
                raise SystemExit(f"error: {e} (make one with nos-gym tabulate, or pass --table)") from None
            if a.table is not None:  # the default table is the task's own default: runs and reference name none
                options.setdefault("table", str(table.path))
            if a.hurdle is not None:
                options.setdefault("hurdle", a.hurdle)
            optimum, source = table.optimum(options.get("hurdle")), f"the best reward of table {table.name}"
        else:
            optimum, source = 1.0, "the reward's upper bound"
        if a.optimum is not None:
            optimum, source = a.optimum, "--optimum"
        budgets = sorted(a.budgets or DEFAULT_BUDGETS.get(env_id, [3000]))
        specs.append(EnvSpec(env_id, kw["task"], kw["space"], int(kw["depth"]), options, float(optimum), source,
                             budgets, a.num_envs or DEFAULT_NUM_ENVS.get(env_id, 100)))
    return specs


def settings_flags(values: dict[str, Any]) -> list[str]:
    """``{"max_kl": 0.05, "novel_children": True}`` -> ``["--max-kl", "0.05", "--novel-children"]``."""
    flags: list[str] = []
    for key, value in values.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        else:
            flags.extend([flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)])
    return flags


def extra_settings(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--set VARIANT.KEY=VALUE`` items as ``{variant: {key: value}}`` (values read as YAML)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        lhs, eq, value = item.partition("=")
        variant, dot, key = lhs.partition(".")
        if not (eq and dot and key):
            raise SystemExit(f"--set {item!r}: expected VARIANT.KEY=VALUE")
        out.setdefault(variant, {})[key] = yaml.safe_load(value)
    return out


def variant_spec(variant: str, extra: dict[str, dict[str, Any]]) -> tuple[str, list[str], dict[str, Any]]:
    """``(agent, flags, settings)`` of a benchmark variant; ``extra`` settings apply to the variant and
    to every variant of the same agent (``--set evolution.population_size=10`` reaches ``tuned_evolution``)."""
    if variant == SB3_TRPO:
        return SB3_TRPO, [], {}
    agent, flags = agents_compare.VARIANTS[variant]
    settings = {**extra.get(agent, {}), **extra.get(variant, {})}
    return agent, [*flags, *settings_flags(settings)], settings


# --------------------------------------------------------------------------------- runs
def run_path(out: Path, env_id: str, variant: str, seed: int) -> Path:
    return out / env_id / variant / f"s{seed}.json"


def run_agent(spec: RunSpec) -> dict[str, Any]:
    """Run one (variant, seed) to its budget; returns the run's record (also written to ``spec.path``)."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if spec.agent == SB3_TRPO:
        rewards, keys, rules = _run_sb3_trpo(spec)
    else:
        from nos_gym.agents import load_agent, read_log

        module = load_agent(spec.agent)
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-{spec.variant}-s{spec.seed}-"))
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the run's own top-10 print
                module.main(spec.env.agent_flags() + ["--total-rules", str(spec.budget), "--seed", str(spec.seed),
                                                      "--run-dir", str(tmp / "run"), "--store", "", "--no-progress"]
                            + spec.flags)
            records = read_log(tmp / "run")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rewards = [r["reward"] for r in records]
        keys = [r["key"] for r in records]
        rules = [r["rule"] for r in records]
    seconds = time.perf_counter() - t0
    ids: dict[str, int] = {}
    key_ids = [ids.setdefault(k, len(ids)) for k in keys]
    best = int(np.argmax(rewards))
    record = {"variant": spec.variant, "agent": spec.agent, "flags": spec.flags, "config": spec.config,
              "seed": spec.seed, "env_id": spec.env.env_id, "task_options": spec.env.task_options,
              "num_envs": spec.env.num_envs, "budget": spec.budget, "seconds": round(seconds, 3),
              "settings": resolved_settings(spec), "best_rule": rules[best], "rewards": [round(float(r), 6) for r in rewards], "key_ids": key_ids}
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = spec.path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(record))
    os.replace(tmp_path, spec.path)  # whole or absent: a killed run is run again
    return record


def _run_sb3_trpo(spec: RunSpec) -> tuple[list[float], list[str], list[str]]:
    """sb3-contrib TRPO with its defaults on ``gym.make(env_id)``: the first ``budget`` finished rules."""
    import gymnasium as gym
    from sb3_contrib import TRPO
    from stable_baselines3.common.callbacks import BaseCallback

    import nos_gym  # noqa: F401  (registers the env ids)

    budget = spec.budget
    rewards: list[float] = []
    keys: list[str] = []
    rules: list[str] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            for info, reward in zip(self.locals["infos"], self.locals["rewards"]):
                if "canonical_key" in info and len(rewards) < budget:
                    rewards.append(float(reward))
                    keys.append(info["canonical_key"])
                    rules.append(info["rule"])
            return len(rewards) < budget

    env = gym.make(spec.env.env_id, task_options=spec.env.task_options)
    try:
        model = TRPO("MlpPolicy", env, seed=spec.seed, device="cpu")
        model.learn(total_timesteps=10 * budget * 5 * spec.env.depth, callback=Record())
    finally:
        env.close()
    return rewards, keys, rules


def run_all(specs: Sequence[RunSpec], jobs: int) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every run's record: read from its JSON when finished with the same budget and settings, else run."""
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    todo = []
    for spec in specs:
        record = _finished(spec)
        if record is not None:
            done[(spec.env.env_id, spec.variant, spec.seed)] = record
        else:
            todo.append(spec)
    if todo:
        print(f"[bench_agents] {len(done)} runs finished before, {len(todo)} to run", file=sys.stderr, flush=True)
    t0 = time.perf_counter()

    def report(spec: RunSpec, record: dict[str, Any], i: int) -> None:
        done[(spec.env.env_id, spec.variant, spec.seed)] = record
        print(f"[bench_agents] {i}/{len(todo)} {spec.env.env_id} {spec.variant} seed {spec.seed}: best "
              f"{max(record['rewards']):.4f}, {record['seconds']:.1f} s (elapsed {format_seconds(time.perf_counter() - t0)})",
              file=sys.stderr, flush=True)

    if jobs <= 1:
        for i, spec in enumerate(todo, 1):
            report(spec, run_agent(spec), i)
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_agent, spec): spec for spec in todo}
            for i, future in enumerate(futures, 1):
                report(futures[future], future.result(), i)
    return done


#: settings that say where a run writes or how it reports, not what it searches
RUN_ONLY_SETTINGS = frozenset({"seed", "run_dir", "runs_root", "store", "progress", "total_rules", "top_k",
                               "torch_threads", "eval_timeout", "ray_address", "backend", "promote"})


@functools.cache
def _settings(agent: str, argv: tuple[str, ...]) -> str:
    from nos_gym.agents import load_agent
    from nos_gym.agents.config import parse_args

    with contextlib.redirect_stdout(io.StringIO()):
        args, _ = parse_args(load_agent(agent).Args, list(argv), agent=agent)
    values = {k: v for k, v in dataclasses.asdict(args).items() if k not in RUN_ONLY_SETTINGS}
    return json.dumps(values, sort_keys=True, default=str)


def resolved_settings(spec: RunSpec) -> dict[str, Any] | None:
    """What a bundled agent's run searches with: its settings after defaults, preset and flags (the run's
    directory and reporting left out); None for sb3_trpo. A finished run is reused only if these are the
    same, so a change of an agent's defaults reruns the variants that rely on them."""
    if spec.agent == SB3_TRPO:
        return None
    return json.loads(_settings(spec.agent, tuple(spec.env.agent_flags() + spec.flags)))


def _finished(spec: RunSpec) -> dict[str, Any] | None:
    if not spec.path.is_file():
        return None
    try:
        record = json.loads(spec.path.read_text())
    except (OSError, ValueError):
        return None
    same = (record.get("budget", 0) >= spec.budget and record.get("flags") == spec.flags
            and record.get("task_options") == spec.env.task_options and record.get("num_envs") == spec.env.num_envs
            and record.get("settings") == resolved_settings(spec))
    return record if same else None


# ------------------------------------------------------------------------------ metrics
def summarize(record: dict[str, Any], budget: int, optimum: float, k: int = 10, tol: float = 1e-6) -> dict[str, Any]:
    """One run's numbers over its first ``budget`` samples (``nos_gym.agents.reference.search_metrics``:
    best, regret, top-k distinct mean, samples until the optimum, distinct rules) and its seconds."""
    from nos_gym.agents.reference import search_metrics

    numbers = search_metrics(record["rewards"][:budget], record["key_ids"][:budget], optimum, k, tol)
    numbers["seconds"] = float(record["seconds"]) * min(1.0, budget / max(1, len(record["rewards"])))
    return numbers


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    q = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test of x against y: ``(U of x, p)``, the normal approximation with the
    tie correction (no continuity correction); p is 1 when every value ties."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n1, n2 = len(x), len(y)
    both = np.concatenate([x, y])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    i = 0
    ties = 0.0
    while i < len(both):
        j = i
        while j + 1 < len(both) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    u = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return u, 1.0
    z = (u - n1 * n2 / 2) / math.sqrt(var)
    return u, float(math.erfc(abs(z) / math.sqrt(2)))


def bootstrap_median_diff(x: Sequence[float], y: Sequence[float], n: int = 2000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of median(x) - median(y), resampling each group independently."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    diffs = (np.median(x[rng.integers(0, len(x), (n, len(x)))], axis=1)
             - np.median(y[rng.integers(0, len(y), (n, len(y)))], axis=1))
    lo, hi = np.percentile(diffs, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def best_curves(records: Sequence[dict[str, Any]], budget: int) -> np.ndarray:
    """(seeds, budget) best reward so far of each run."""
    return np.array([np.maximum.accumulate(np.asarray(r["rewards"][:budget], dtype=float)) for r in records])


# ------------------------------------------------------------------------------ reports
def _fmt_q(values: Sequence[float], digits: int = 3) -> str:
    lo, mid, hi = quartiles(values)
    return f"{mid:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def report(env: EnvSpec, variants: Sequence[str], seeds: Sequence[int],
           done: dict[tuple[str, str, int], dict[str, Any]], k: int,
           reference: str = REFERENCE) -> tuple[list[str], dict[str, Any]]:
    """The table lines for one env and the numbers behind them (per budget, per variant); every variant
    is compared with ``reference``."""
    bench = env.task == "nosbench"
    lines: list[str] = []
    numbers: dict[str, Any] = {}
    for budget in env.budgets:
        rows = []
        per: dict[str, list[dict[str, Any]]] = {}
        for v in variants:
            recs = [done[(env.env_id, v, s)] for s in seeds if (env.env_id, v, s) in done]
            per[v] = [summarize(r, budget, env.optimum, k) for r in recs]
        ref_name = reference
        ref = per.get(reference)
        metric = "regret" if bench else "top_mean"
        for v in variants:
            runs = per[v]
            if not runs:
                continue
            reached = [r["to_optimum"] for r in runs if r["to_optimum"] is not None]
            to_opt = f"{statistics.median(reached):.0f} ({len(reached)}/{len(runs)})" if reached else f"- (0/{len(runs)})"
            versus = "-"
            if ref and v != ref_name:
                xs, ys = [r[metric] for r in runs], [r[metric] for r in ref]
                _, p = mann_whitney(xs, ys)
                lo, hi = bootstrap_median_diff(xs, ys)
                versus = f"{statistics.median(xs) - statistics.median(ys):+.3f} [{lo:+.3f}, {hi:+.3f}], p={p:.3g}"
            rows.append([v, len(runs), _fmt_q([r["best"] for r in runs]), _fmt_q([r["regret"] for r in runs]),
                         _fmt_q([r["top_mean"] for r in runs]), to_opt,
                         f"{statistics.median(r['distinct'] for r in runs):.0f}",
                         f"{statistics.median(r['seconds'] for r in runs):.1f}", versus])
            numbers.setdefault(str(budget), {})[v] = runs
        metric_name = "regret" if bench else f"top-{k} mean"
        lines += [f"### {env.env_id}, {budget} sampled rules", "",
                  markdown_table(["agent", "seeds", "best: median [IQR]", "regret", f"top-{k} distinct mean",
                                  "samples to optimum (reached)", "distinct rules", "s/run",
                                  f"{metric_name} vs {ref_name}: median diff [95% bootstrap], Mann-Whitney p"],
                                 rows), ""]
    return lines, numbers


def plot(env: EnvSpec, variants: Sequence[str], seeds: Sequence[int],
         done: dict[tuple[str, str, int], dict[str, Any]], path: Path) -> None:
    """Median best reward (regret on NOS-Bench) against samples, IQR band, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = env.task == "nosbench"
    budget = max(env.budgets)
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10").colors  # then dashed lines: no two variants look alike
    for i, v in enumerate(variants):
        recs = [done[(env.env_id, v, s)] for s in seeds if (env.env_id, v, s) in done]
        if not recs:
            continue
        curves = best_curves(recs, budget)
        if bench:
            curves = np.maximum(env.optimum - curves, 1e-6)
        lo, mid, hi = np.percentile(curves, [25, 50, 75], axis=0)
        x = np.arange(1, curves.shape[1] + 1)
        line, = ax.plot(x, mid, label=v, lw=2 if v in (REFERENCE, *TUNED.values()) else 1.3,
                        color=colors[i % len(colors)], ls="-" if i < len(colors) else "--")
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("sampled rules")
    if bench:
        ax.set_yscale("log")
        ax.set_ylabel(f"regret (optimum {env.optimum:.4f} minus best found)")
    else:
        ax.set_ylabel("best reward found")
    ax.set_title(f"{env.env_id}: median over {len(seeds)} seeds, band: interquartile range", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- tuning
def draw_configs(agent: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct configurations of ``agent``: ``{}`` (its defaults) first, then random draws from
    ``TUNE_SPACES[agent]`` (tournament_size <= population_size for evolution)."""
    space = TUNE_SPACES[agent]
    rng = random.Random(f"{agent}-{seed}")
    configs: list[dict[str, Any]] = [{}]
    seen: set[str] = set()
    tries = 0
    while len(configs) < n and tries < 1000 * n:
        tries += 1
        config = {key: rng.choice(values) for key, values in space.items()}
        if agent == "evolution" and config["tournament_size"] > config["population_size"]:
            continue
        text = json.dumps(config, sort_keys=True)
        if text not in seen:
            seen.add(text)
            configs.append(config)
    return configs


def tune_score(runs: Sequence[dict[str, Any]], bench: bool, budget: int) -> tuple[float, float]:
    """A configuration's score over the tuning seeds, larger is better: (median top-k mean, or minus the
    median regret on NOS-Bench; minus the median samples until the optimum, unreached counted as budget + 1)."""
    primary = -statistics.median(r["regret"] for r in runs) if bench else statistics.median(r["top_mean"] for r in runs)
    to_opt = statistics.median(r["to_optimum"] if r["to_optimum"] is not None else budget + 1 for r in runs)
    return float(primary), -float(to_opt)


def tune(a: argparse.Namespace, env: EnvSpec, extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Run the tuning protocol on ``env``; returns ``{agent: {"config", "flags", "tried": [...]}}``."""
    chosen: dict[str, dict[str, Any]] = {}
    budget = max(env.budgets)
    for agent in TUNED:
        configs = draw_configs(agent, a.tune_configs, a.tune_seed)
        specs = []
        for i, config in enumerate(configs):
            settings = {**extra.get(agent, {}), **config}
            flags = settings_flags(settings)
            env_i = env
            if "num_envs" in config:  # the batch is a knob of the configuration
                env_i = EnvSpec(**{**env.__dict__, "num_envs": int(config["num_envs"])})
                flags = settings_flags({k: v for k, v in settings.items() if k != "num_envs"})
            for seed in a.tune_seeds:
                specs.append(RunSpec(f"tune-{agent}-c{i:02d}", agent, flags, seed, env_i,
                                     run_path(a.out / "tune", env.env_id, f"{agent}-c{i:02d}", seed), config))
        done = run_all(specs, a.jobs)
        tried = []
        for i, config in enumerate(configs):
            runs = [summarize(done[(s.env.env_id, s.variant, s.seed)], budget, env.optimum, a.top)
                    for s in specs if s.variant == f"tune-{agent}-c{i:02d}"]
            tried.append({"index": i, "config": config, "score": tune_score(runs, env.task == "nosbench", budget),
                          "per_seed": {str(s): r for s, r in zip(a.tune_seeds, runs)}})
        best = max(tried, key=lambda t: t["score"])
        chosen[agent] = {"config": best["config"], "index": best["index"], "tried": tried}
    return chosen


def tune_lines(env: EnvSpec, chosen: dict[str, dict[str, Any]], a: argparse.Namespace) -> list[str]:
    lines = [f"### tuning on {env.env_id}: {a.tune_configs} configurations per agent, seeds {a.tune_seeds}, "
             f"{max(env.budgets)} rules", ""]
    for agent, c in chosen.items():
        rows = [[t["index"], json.dumps(t["config"]) if t["config"] else "(defaults)", f"{t['score'][0]:.4f}",
                 f"{-t['score'][1]:.0f}", "chosen" if t["index"] == c["index"] else ""] for t in c["tried"]]
        lines += [f"{agent}:", "", markdown_table(["#", "configuration", "score (median)", "median samples to optimum",
                                                   ""], rows, align=["r", "l", "r", "r", "l"]), ""]
    return lines


# ---------------------------------------------------------------------------- reference
def _commit() -> str:
    """The short commit, with "+ uncommitted changes" when the code differs from it (the outputs of
    benchmarks, and the reference file this writes, not counted)."""
    from nos_gym.evaluation.provenance import ROOT, git_commit

    commit, dirty = git_commit(("nos_gym", "benchmarks", "agents"),
                               exclude=("benchmarks/out", str(REFERENCE_PATH.relative_to(ROOT))))
    if commit is None:
        return "unknown commit"
    return f"{commit[:7]} + uncommitted changes" if dirty else commit[:7]


def reference_entry(env: EnvSpec, numbers: dict[str, Any], seeds: Sequence[int], k: int,
                    argv: Sequence[str]) -> dict[str, Any]:
    """One env's entry of the reference file: per budget, per reference variant that ran, the quartiles
    of the top-k distinct mean and the median samples until the optimum, with where they come from."""
    from nos_gym.agents.config import RunArgs
    from nos_gym.agents.reference import env_key

    budgets: dict[str, Any] = {}
    for budget, per in numbers.items():
        for variant, label in REFERENCE_VARIANTS.items():
            runs = per.get(variant)
            if not runs:
                continue
            reached = [r["to_optimum"] for r in runs if r["to_optimum"] is not None]
            budgets.setdefault(budget, {})[label] = {
                "variant": variant, "runs": len(runs), "top_mean": list(quartiles([r["top_mean"] for r in runs])),
                "to_optimum_median": statistics.median(reached) if reached else None,
                "to_optimum_reached": len(reached)}
    span = f"{len(seeds)} seeds, {min(seeds)}-{max(seeds)}" if seeds else "no seeds"
    return {"env_id": env.env_id,
            # the agents ran with the default constraints (EnvSpec.agent_flags sets none)
            "env_key": env_key(RunArgs(task=env.task, task_options=env.task_options, space=env.space,
                                       depth=env.depth)),
            "optimum": env.optimum, "top_k": k, "seeds": span,
            "made": f"{time.strftime('%Y-%m-%d')}, commit {_commit()}, {agents_compare._machine()}",
            "source": "docs/results.md; python benchmarks/bench_agents.py " + " ".join(argv),
            "budgets": budgets}


def write_reference(path: Path, entries: Sequence[dict[str, Any]]) -> Path:
    """Merge ``entries`` into the reference file at ``path`` (an env already there is replaced), atomically."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    keep = [e for e in old.get("envs", []) if e.get("env_key") not in {n["env_key"] for n in entries}]
    data = {"about": "medians of benchmarks/bench_agents.py that a finished agent run is set beside "
                     "(nos_gym/agents/reference.py)", "envs": [*keep, *entries]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = parse_cli(argv)
    if a.fresh and a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True, exist_ok=True)
    extra = extra_settings(a.set)
    envs = env_specs(a)
    results: dict[str, Any] = {}
    references: list[dict[str, Any]] = []
    lines = [f"bench_agents: seeds {a.seeds[0]}..{a.seeds[-1]} ({len(a.seeds)}), agents {a.agents}; "
             f"{agents_compare._machine()}; {a.jobs} job(s)", ""]
    t0 = time.perf_counter()
    for env in envs:
        lines.append(f"## {env.env_id}: task {env.task} {env.task_options or ''}, space {env.space}, depth {env.depth}, "
                     f"batches of {env.num_envs}; optimum {env.optimum:.4f} ({env.optimum_source})")
        lines.append("")
        variants = list(a.agents)
        specs_extra: dict[str, tuple[str, list[str], dict[str, Any], EnvSpec]] = {}
        chosen = None
        if a.tune:
            chosen = tune(a, env, extra)
            lines += tune_lines(env, chosen, a)
            for agent, c in chosen.items():
                config = dict(c["config"])
                env_v = EnvSpec(**{**env.__dict__, "num_envs": int(config.pop("num_envs", env.num_envs))})
                settings = {**extra.get(agent, {}), **config}
                specs_extra[TUNED[agent]] = (agent, settings_flags(settings), c["config"], env_v)
                variants.append(TUNED[agent])
        specs = []
        for v in variants:
            if v in specs_extra:
                agent, flags, config, env_v = specs_extra[v]
            else:
                (agent, flags, config), env_v = variant_spec(v, extra), env
            for seed in a.seeds:
                specs.append(RunSpec(v, agent, flags, seed, env_v, run_path(a.out, env.env_id, v, seed), config))
        done = run_all(specs, a.jobs)
        env_lines, numbers = report(env, variants, a.seeds, done, a.top, TUNED["evolution"] if a.tune else REFERENCE)
        lines += env_lines
        results[env.env_id] = {"numbers": numbers, "optimum": env.optimum, "budgets": env.budgets,
                               "tuning": chosen}
        if a.write_reference is not None:
            references.append(reference_entry(env, numbers, a.seeds, a.top, sys.argv[1:] if argv is None else argv))
        if not a.no_plot:
            slug = env.env_id.replace("/", "_")
            plot(env, variants, a.seeds, done, a.out / f"{slug}.png")
            lines.append(f"plot: {a.out / f'{slug}.png'}")
            lines.append("")
    if references:
        written = write_reference(a.write_reference, references).resolve()
        root = REFERENCE_PATH.parents[2]
        lines.append(f"reference medians written to {written.relative_to(root) if written.is_relative_to(root) else written}")
    lines.append(f"wall time of this invocation: {format_seconds(time.perf_counter() - t0)}")
    text = "\n".join(lines)
    print(text)
    (a.out / ("tune.md" if a.tune else "table.md")).write_text(text + "\n")
    (a.out / ("tune.json" if a.tune else "results.json")).write_text(json.dumps(
        {"protocol": {"seeds": a.seeds, "tune_seeds": a.tune_seeds if a.tune else None,
                      "tune_configs": a.tune_configs if a.tune else None, "tune_spaces": TUNE_SPACES if a.tune else None,
                      "agents": a.agents, "set": a.set},
         "envs": results}, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
