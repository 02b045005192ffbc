"""A NOS-Bench table in words: how it was made, its reward distribution, its best rules, and what a hurdle cuts."""

from __future__ import annotations

from typing import Any

import numpy as np

from nos_gym.bench.table import BenchTable
from nos_gym.dsl import parse

__all__ = ["CHANCE", "hurdle_cuts", "summary"]

#: rewards below this count as "at chance" (CIFAR-10 has 10 classes; the pilot's line was 0.15)
CHANCE = 0.15


def hurdle_cuts(table: BenchTable, hurdle: float) -> list[dict[str, Any]]:
    """The rows a sweep hurdle would stop before the final training (best reward first)."""
    table.check_hurdle(hurdle)
    return [r for r in table.top(len(table)) if r["source"] != "screen" and r["lr"] is not None
            and r["sweep_accuracy"] is not None and r["sweep_accuracy"] < hurdle]


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def summary(table: BenchTable, top: int = 10, hurdle: float | None = None, reference: str = "ADAM") -> str:
    """The table's provenance, counts by source, reward distribution and ``top`` best rules; with
    ``hurdle``, which rules it cuts and how many of the 50 best are among them."""
    m = table.meta
    rewards = np.array([r["reward"] for r in table.rows.values()])
    lines = [f"{table.name}: {table.covers()}", f"  file {table.path}"]
    task = m.get("task") or {}
    lines.append(f"  task {task.get('name')} ({task.get('fingerprint')}), options {task.get('options')}")
    made = m.get("made") or {}
    code = m.get("code") or {}
    lines.append(f"  made {made.get('date')} on {made.get('cpu')} ({made.get('aten_kernels')}), commit "
                 f"{(code.get('commit') or '?')[:12]}{' (with uncommitted changes)' if code.get('dirty') else ''}, "
                 f"SEMANTICS_VERSION {m.get('semantics_version')}, schema {m.get('schema')}")
    cost = m.get("cost") or {}
    lines.append(f"  cost {cost.get('rules_trained', 0):,} rules trained, {cost.get('child_images', 0):,} child-images, "
                 f"{cost.get('wall_seconds', 0) / 3600:.2f} h wall")
    sources = m.get("counts", {}).get("sources", {})
    lines.append("  sources " + ", ".join(f"{k} {v:,}" for k, v in sources.items()))
    ref_key = parse(reference).canonical_key
    ref = table.rows.get(ref_key)
    dist = f"  rewards: {int((rewards < CHANCE).sum()):,} below {CHANCE} (at chance), {sources.get('screen', 0):,} screened"
    if ref is not None:
        dist += f", {int((rewards > ref['reward']).sum()):,} above {reference} ({ref['reward']:.4f})"
    lines.append(dist + f"; best {rewards.max():.4f}")
    test = table.test_name
    head = f"  {'rank':>4}  {'reward':>7}  " + (f"{test + ' (mean, sd)':>18}  " if test else "") + "rule"
    lines += ["", head]
    for i, r in enumerate(table.top(top)):
        t = f"{_fmt(r[test + '_mean']):>8} {_fmt(r[test + '_sd']):>8}  " if test else ""
        lines.append(f"  {i + 1:>4}  {r['reward']:>7.4f}  {t}{r['rule']}")
    if hurdle is not None:
        cut = hurdle_cuts(table, hurdle)
        best50 = {r["key"] for r in table.top(50)}
        cut50 = [r for r in cut if r["key"] in best50]
        lines += ["", f"  hurdle {hurdle}: cuts {len(cut):,} rules at the sweep; {len(cut50)} of the 50 best by "
                      f"reward are among them" + (":" if cut50 else "")]
        lines += [f"        {r['reward']:.4f} (sweep {r['sweep_accuracy']:.4f})  {r['rule']}" for r in cut50]
    return "\n".join(lines)
