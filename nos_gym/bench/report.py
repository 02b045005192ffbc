"""A NOS-Bench table in words: how it was made, its reward distribution, its best rules, and what a hurdle cuts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nos_gym.bench.table import TABLES_DIR, BenchTable
from nos_gym.dsl import parse

__all__ = ["CHANCE", "REFERENCES", "hurdle_cuts", "plot", "summary"]

#: rewards below this count as "at chance" (CIFAR-10 has 10 classes; the pilot's line was 0.15)
CHANCE = 0.15
#: rules marked on the plots where the table has them
REFERENCES = ("ADAM", "g", "m", "RMSProp", "exp(sign(g) * sign(m)) * g", "(1 + sign(g) * sign(m)) * g")


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
    shipped = Path(table.path).resolve().parent == TABLES_DIR.resolve()
    # a shipped table is named, not located: the report reads the same on every installation
    where = f"shipped with nos_gym ({Path(table.path).name})" if shipped else str(table.path)
    lines = [f"{table.name}: {table.covers()}", f"  file {where}"]
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


def plot(table: BenchTable, path: str, hurdle: float | None = None) -> str:
    """Two panels saved to ``path``: the reward distribution of the table's rules (how they were
    scored: trained, or settled by the screen or a behaviour twin), and each trained rule's
    reward against its sweep accuracy, with ``hurdle`` (if given) as the line a sweep hurdle
    would cut at. The reference rules of ``REFERENCES`` that the table has are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table.rows.values())
    refs = [(rule if len(rule) < 14 else rule[:12] + "..", table.rows[key]) for rule in REFERENCES
            if (key := parse(rule).canonical_key) in table.rows]
    trained = [r for r in rows if r["source"] == "trained" and r["sweep_accuracy"] is not None]
    if trained:  # a task with a rate sweep (the ConvNet's): a second panel
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    else:
        fig, left = plt.subplots(figsize=(6.5, 4.5))
    bins = np.linspace(0.0, max(r["reward"] for r in rows) + 0.01, 50)
    groups = [("trained", [r["reward"] for r in rows if r["source"] == "trained"]),
              ("behaviour twin of a trained rule", [r["reward"] for r in rows if r["source"] == "fingerprint"]),
              ("screened", [r["reward"] for r in rows if r["source"] == "screen"])]
    other = [r["reward"] for r in rows if r["source"] not in ("trained", "fingerprint", "screen")]
    if other:
        groups.append(("other", other))
    left.hist([g for _, g in groups], bins=bins, stacked=True, label=[f"{n} ({len(g):,})" for n, g in groups])
    left.set_yscale("log")
    left.set_xlabel("reward")
    left.set_ylabel("rules")
    left.set_title(f"{table.name}: {len(table):,} canonical rules")
    for label, row in refs:
        left.axvline(row["reward"], color="black", lw=0.8, ls=":")
        left.annotate(label, (row["reward"], 1), rotation=90, fontsize=7, va="bottom", ha="right")
    left.legend(fontsize=8, loc="upper right")
    if trained:
        right.scatter([r["sweep_accuracy"] for r in trained], [r["reward"] for r in trained], s=4, alpha=0.4)
        right.set_xlabel("best sweep accuracy")
        right.set_ylabel("reward")
        right.set_title("trained rules: the sweep against the reward")
        for label, row in refs:
            if row["sweep_accuracy"] is not None:
                right.scatter([row["sweep_accuracy"]], [row["reward"]], color="black", s=14, marker="x")
                right.annotate(label, (row["sweep_accuracy"], row["reward"]), fontsize=7)
        if hurdle is not None:
            right.axvline(hurdle, color="red", lw=1, ls="--", label=f"hurdle {hurdle:g}")
            right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
