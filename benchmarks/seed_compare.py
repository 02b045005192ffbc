"""Is a candidate better than a reference? Rules scored at several child seeds, compared seed by seed.

A promotion ranks rules by the mean over 3 child seeds, and on the "fast" preset a rule's
score moves by 0.012-0.028 (sd) from one seed to the next: two 3-seed means closer than
~0.015 are not told apart. But a child seed fixes the child's initialisation and its batch
order for *every* rule, so much of that spread is shared between rules at one seed. This
script reads ``nos-gym eval --json`` outputs, one file per child seed (the same rules in
each), and prints per rule: the mean and sd over seeds, and against the reference rule
the **paired** difference (mean, its standard error, a one-sided sign count: at how many
seeds the rule scored higher) next to the unpaired standard error for comparison.

    for s in 0 1 2 3 4 5 6 7; do nos-gym eval RULE... --task convnet-cifar10 \\
        --task-options "{preset: fast, seed: $s}" --json > DIR/fast-s$s.json; done
    python benchmarks/seed_compare.py DIR --reference ADAM
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np


def load(directory: Path, pattern: str = "*-s*.json") -> tuple[list[int], dict[str, list[float]]]:
    """The seeds (from the file names ``...-sSEED.json``) and each rule's rewards in seed order."""
    files = sorted(directory.glob(pattern), key=lambda f: int(re.search(r"-s(\d+)\.json$", f.name).group(1)))
    if not files:
        raise SystemExit(f"no {pattern} files in {directory}: write one `nos-gym eval ... --json` output per seed")
    seeds, rewards = [], {}
    for f in files:
        seeds.append(int(re.search(r"-s(\d+)\.json$", f.name).group(1)))
        for d in json.loads(f.read_text()):
            rewards.setdefault(d["rule"], []).append(float(d["reward"]))
    short = [rule for rule, r in rewards.items() if len(r) != len(seeds)]
    if short:
        raise SystemExit(f"rules missing at some seeds: {short}")
    return seeds, rewards


def compare(rewards: dict[str, list[float]], reference: str) -> list[dict]:
    """Per rule: mean, sd, and against ``reference`` the paired difference (mean, se, wins)
    and the unpaired se of the difference of means."""
    if reference not in rewards:
        raise SystemExit(f"reference {reference!r} is not among the rules: {list(rewards)}")
    ref = np.array(rewards[reference])
    n = len(ref)
    rows = []
    for rule, r in rewards.items():
        r = np.array(r)
        d = r - ref
        rows.append({"rule": rule, "mean": float(r.mean()), "sd": float(r.std(ddof=1)) if n > 1 else 0.0,
                     "diff": float(d.mean()), "paired_se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
                     "unpaired_se": float(math.sqrt((r.var(ddof=1) + ref.var(ddof=1)) / n)) if n > 1 else 0.0,
                     "wins": int((d > 0).sum()), "seeds": n})
    return sorted(rows, key=lambda row: -row["mean"])


def sign_test_p(wins: int, n: int) -> float:
    """One-sided sign test: P(at least ``wins`` of ``n`` fair coin flips)."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--reference", default="ADAM", help="the rule (as written in the files) to compare with")
    p.add_argument("--pattern", default="*-s*.json")
    a = p.parse_args(argv)
    seeds, rewards = load(a.directory, a.pattern)
    rows = compare(rewards, a.reference)
    print(f"{len(rewards)} rules at child seeds {seeds}; differences against {a.reference!r}, paired by seed")
    print(f"| rule | mean | sd | diff vs {a.reference} (paired) | paired se | unpaired se | higher at | sign test p |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["rule"] == a.reference:
            print(f"| `{r['rule']}` (reference) | {r['mean']:.4f} | {r['sd']:.4f} | - | - | - | - | - |")
            continue
        print(f"| `{r['rule']}` | {r['mean']:.4f} | {r['sd']:.4f} | {r['diff']:+.4f} | {r['paired_se']:.4f} | "
              f"{r['unpaired_se']:.4f} | {r['wins']}/{r['seeds']} | {sign_test_p(r['wins'], r['seeds']):.3f} |")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
