"""What a run found, measured as the agents benchmark measures it, and set beside the benchmark.

``search_metrics`` is the one definition of a search's numbers that ``benchmarks/bench_agents.py``
reports (best reward, regret, top-k distinct mean, samples until the optimum, distinct rules).

``reference_results.json`` (beside this module, package data) holds the benchmark's medians for
the envs and budgets it measured, with the command, commit, date and machine that made them;
``bench_agents.py --write-reference`` writes it. At the end of a finished run,
``comparison(env_key(args), rewards, keys)`` gives the lines that set the run beside those
medians, when the run searched the same env (task, options, space, depth, constraints) with the
same budget; None otherwise. A run is one seed: the benchmark's interquartile range says how far one seed strays.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from nos_gym.dsl import Constraints

__all__ = ["REFERENCE_FILE", "comparison", "env_key", "load_reference", "search_metrics"]

#: the shipped medians of ``benchmarks/bench_agents.py`` (written by its ``--write-reference``)
REFERENCE_FILE = Path(__file__).with_name("reference_results.json")


def search_metrics(rewards: Sequence[float], keys: Sequence[Any], optimum: float, k: int = 10,
                   tol: float = 1e-6) -> dict[str, Any]:
    """A search's numbers over the samples given: ``best`` reward, ``regret`` (optimum - best, at
    least 0), ``top_mean`` (mean of the ``k`` best distinct rules, by ``keys``), ``to_optimum``
    (the 1-based sample that first came within ``tol`` of ``optimum``; None: never) and
    ``distinct`` (distinct keys)."""
    if not len(rewards):
        raise ValueError("search_metrics: no samples")
    values = np.asarray(rewards, dtype=float)
    best_of: dict[Any, float] = {}
    for key, r in zip(keys, values):
        best_of[key] = max(best_of.get(key, -math.inf), float(r))
    top = sorted(best_of.values(), reverse=True)[:k]
    hit = np.flatnonzero(values >= optimum - tol)
    best = float(values.max())
    return {"best": best, "regret": max(0.0, optimum - best), "top_mean": float(np.mean(top)),
            "to_optimum": int(hit[0]) + 1 if len(hit) else None, "distinct": len(best_of)}


def env_key(args: Any) -> str:
    """The env a search with settings ``args`` (a ``RunArgs``) ran on: its task, task options, space,
    depth and constraints, as one comparable string (JSON with sorted keys)."""
    constraints = {f.name: getattr(args, f.name) for f in dataclasses.fields(Constraints)}
    return json.dumps({"task": args.task, "task_options": dict(args.task_options or {}), "space": args.space,
                       "depth": int(args.depth), "constraints": constraints}, sort_keys=True)


@lru_cache(maxsize=4)
def _load(path: str, stamp: tuple[int, int]) -> Any:  # stamp: a changed file is read again
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_reference(path: str | Path | None = None) -> dict[str, Any]:
    """The reference file's content ({} if there is none); ``ValueError`` naming the file if it is damaged."""
    path = Path(path) if path is not None else REFERENCE_FILE
    if not path.is_file():
        return {}
    try:
        stat = path.stat()
        data = _load(str(path), (stat.st_mtime_ns, stat.st_size))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable reference file ({type(e).__name__}); reinstall nos-gym or "
                         f"rewrite it with benchmarks/bench_agents.py --write-reference") from None
    if not isinstance(data, dict) or not isinstance(data.get("envs"), list):
        raise ValueError(f"{path}: not a reference file (no 'envs' list); rewrite it with "
                         f"benchmarks/bench_agents.py --write-reference")
    return data


def _median_iqr(entry: Mapping[str, Any], name: str) -> str:
    q = entry[name]
    return f"{q[1]:.3f} [IQR {q[0]:.3f}-{q[2]:.3f}]"


def comparison(key: str, rewards: Sequence[float], rule_keys: Sequence[Any], *,
               path: str | Path | None = None) -> str | None:
    """Lines that set a finished run (its ``rewards`` and canonical ``rule_keys``, in sample order,
    on the env ``key`` of ``env_key``) beside the reference medians for the same env and budget;
    None when the reference has no such env and budget."""
    data = load_reference(path)
    budget = len(rewards)
    for env in data.get("envs", []):
        if env.get("env_key") != key or str(budget) not in env.get("budgets", {}):
            continue
        k = int(env.get("top_k", 10))
        mine = search_metrics(rewards, rule_keys, float(env["optimum"]), k)
        found = "not reached" if mine["to_optimum"] is None else f"reached after {mine['to_optimum']:,} samples"
        lines = [f"against the agents benchmark on {env['env_id']} at the same budget ({budget:,} rules; medians "
                 f"over {env['seeds']}; {env['made']}):",
                 f"  {'this run':<31} top-{k} distinct mean {mine['top_mean']:.3f}; optimum ({env['optimum']:.4f}) "
                 f"{found}"]
        for name, a in env["budgets"][str(budget)].items():
            reached = a["to_optimum_reached"]
            to_opt = (f"after {a['to_optimum_median']:,.0f} samples ({reached} of {a['runs']} seeds reached it)"
                      if reached else f"not reached (0 of {a['runs']} seeds)")
            lines.append(f"  {name:<31} top-{k} distinct mean {_median_iqr(a, 'top_mean')}; optimum {to_opt}")
        lines.append(f"  (the table and its command: {env['source']})")
        return "\n".join(lines)
    return None
