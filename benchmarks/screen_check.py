"""The evaluator's funnel measured: what the behaviour fingerprint merges, what the screen
rejects, and whether it rejects anything good (issue 12, parts 2 and 3).

(a) merge: rules sampled by the env's masked uniform sampler (the random agent's, full
    space, depth 2; or the rules of a run's ``log.jsonl``): of the canonically distinct
    rules, how many the fingerprint merges further (deterministic and stochastic apart),
    what the screen catches by reason, the probe's speed. Each merged group is then
    trained on Rosenbrock with the funnel off, to see whether its members really score alike.
(b) false rejections: Table 1 and 500 random rules (distinct canonical keys, full space,
    depth 2), every one scored with the funnel off; a screened rule scoring above the
    task's floor (``screen_score()``) would be a false rejection.
    rosenbrock: the paper's 4,000-iteration score, floor 0 (also on the rules of (a)).
    convnet: the "ci" preset on this CPU -- not the paper's protocol: 520 trainings of
    295,000 child-images are hours of GPU -- floor = the untrained child's accuracy. A
    screened rule counts as a false rejection above floor + margin, margin = 2 standard
    errors of an accuracy near the floor on the validation images (2 sqrt(p(1-p)/n):
    0.026 for n = 500); counts at margin 0 are printed too.

    python benchmarks/screen_check.py                             # (a) and (b), ~15-20 min on one core
    python benchmarks/screen_check.py --parts merge rosenbrock    # the cheap parts, ~1 min
    python benchmarks/screen_check.py --log runs/RUN/log.jsonl    # (a) on an agent's rules
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from nos_gym.dsl import Masker, Program, get_space
from nos_gym.dsl.table1 import TABLE1, get_rule
from nos_gym.evaluation.probe import PER_ROW_SEEDS, SCREENS, probe
from nos_gym.tasks import make

OUT = Path(__file__).resolve().parent / "out"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _distinct(programs: list[Program]) -> list[Program]:
    seen: dict[str, Program] = {}
    for p in programs:
        seen.setdefault(p.canonical_key, p)
    return list(seen.values())


def _pct(a: int, b: int) -> str:
    return f"{a:>5} / {b:<5} ({100 * a / b:5.1f}%)" if b else f"{a:>5} / {b:<5}"


def _table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print("  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def _save(name: str, obj: object) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"screen_check-{name}.json").write_text(json.dumps(obj, indent=1, default=str))


# ----------------------------------------------------------------------------- (a)
def merge_part(programs: list[Program], source: str) -> dict[str, float]:
    distinct = _distinct(programs)
    t0 = time.perf_counter()
    results = probe(distinct)
    seconds = time.perf_counter() - t0
    rows, screens = [], {}
    groups: dict[str, list[Program]] = defaultdict(list)
    for kind, stochastic in (("deterministic", False), ("stochastic", True)):
        sel = [(p, r) for p, r in zip(distinct, results) if p.stochastic == stochastic]
        by_fp: dict[str, list[Program]] = defaultdict(list)
        for p, r in sel:
            by_fp[r.fingerprint].append(p)
            if len(by_fp[r.fingerprint]) == 2:
                groups[r.fingerprint] = by_fp[r.fingerprint]
        merged = len(sel) - len(by_fp)
        screened = Counter(r.screen for _, r in sel if r.screen)
        screens[kind] = screened
        rows.append([kind, len(sel), len(by_fp), _pct(merged, len(sel)), _pct(sum(screened.values()), len(sel)),
                     ", ".join(f"{k} {v}" for k, v in screened.most_common())])
    _table(f"(a) fingerprint merges and screens: {len(programs)} rules ({source}), {len(distinct)} canonically "
           f"distinct; probe {len(distinct) / seconds:,.0f} rules/s ({seconds:.2f} s, per-row seeds: {PER_ROW_SEEDS})",
           ["rules", "canonical keys", "fingerprints", "merged further", "screened", "screened, by reason"], rows)
    big = sorted(groups.values(), key=len, reverse=True)[:8]
    print("\n  largest merged groups:")
    for g in big:
        print(f"    {len(g):>3}  " + "  |  ".join(str(p) for p in g[:3]) + ("  | ..." if len(g) > 3 else ""))
    _save("merge", {"source": source, "rules": len(programs), "distinct": len(distinct), "seconds": seconds,
                    "groups": [[str(p) for p in g] for g in groups.values()],
                    "screens": {k: dict(v) for k, v in screens.items()}})
    return {"groups": groups, "distinct": distinct, "probe": results}


def group_agreement(groups: dict[str, list[Program]]) -> None:
    """Train every member of every merged group on Rosenbrock (funnel off): do they score alike?"""
    task = make("rosenbrock")
    members = [p for g in groups.values() for p in g]
    if not members:
        return
    scores = {p.canonical_key: r.reward for p, r in zip(members, task.evaluate(members))}
    rows = []
    for stochastic in (False, True):
        spreads = [max(scores[p.canonical_key] for p in g) - min(scores[p.canonical_key] for p in g)
                   for g in groups.values() if g[0].stochastic == stochastic]
        if spreads:
            rows.append(["stochastic" if stochastic else "deterministic", len(spreads),
                         sum(s == 0 for s in spreads), sum(s > 1e-6 for s in spreads), f"{max(spreads):.2e}"])
    _table("(a') merged groups trained on Rosenbrock with the funnel off: score spread within a group",
           ["groups", "count", "spread 0", "spread > 1e-6", "max spread"], rows)


# ----------------------------------------------------------------------------- (b)
def check_set(n_random: int, seed: int) -> list[tuple[str, Program]]:
    named = [(f"table1:{name}", get_rule(name)) for name in TABLE1]
    keys = {p.canonical_key for _, p in named}
    rand = [p for p in Masker(get_space("full"), 2).sample_many(n_random + len(named), seed, distinct=True)
            if p.canonical_key not in keys][:n_random]
    return named + [("random", p) for p in rand]


def rejection_table(task_name: str, rules: list[tuple[str, Program]], scores: list[float], floor: float,
                    margin: float, seconds: float) -> dict[str, object]:
    verdicts = probe([p for _, p in rules])
    screened = [(name, p, s, v.screen) for (name, p), s, v in zip(rules, scores, verdicts) if v.screen]
    above = [x for x in screened if x[2] > floor]
    above_margin = [x for x in screened if x[2] > floor + margin]
    kept = [s for (_, _), s, v in zip(rules, scores, verdicts) if not v.screen]
    rows = []
    for code in SCREENS:
        mine = [x for x in screened if x[3] == code]
        if mine:
            s = [x[2] for x in mine]
            rows.append([code, len(mine), f"{min(s):.4f}", f"{max(s):.4f}", sum(x > floor for x in s),
                         sum(x > floor + margin for x in s)])
    table1_screened = [x for x in screened if x[0].startswith("table1")]
    n_table1 = sum(name.startswith("table1") for name, _ in rules)
    _table(f"(b) {task_name}: {len(rules)} rules (Table 1: {n_table1}) scored with the funnel off in {seconds:.0f} s; "
           f"floor {floor:.4f}, margin {margin:.4f}; screened {len(screened)}, of them Table 1: {len(table1_screened)}",
           ["screen", "rules", "min score", "max score", "> floor", "> floor + margin"], rows)
    best_screened = max((x[2] for x in screened), default=floor)
    print(f"  false rejections: {len(above_margin)} above floor + margin, {len(above)} above the floor "
          f"(not screened: {len(kept)} rules, {sum(s > floor + margin for s in kept)} above floor + margin, "
          f"{sum(s > best_screened for s in kept)} above the best screened one, best {max(kept):.4f})")
    for _, p, s, code in sorted(above, key=lambda x: -x[2])[:12]:
        print(f"    {s:.4f}  {code:17s} {p}")
    return {"floor": floor, "margin": margin, "screened": len(screened), "above_floor": len(above),
            "above_margin": len(above_margin), "rules": [(n, str(p), s, v.screen) for (n, p), s, v in
                                                         zip(rules, scores, verdicts)]}


def rosenbrock_part(rules: list[tuple[str, Program]], extra: list[Program]) -> None:
    task = make("rosenbrock")
    t0 = time.perf_counter()
    scores = [r.reward for r in task.evaluate([p for _, p in rules])]
    out = rejection_table("rosenbrock", rules, scores, task.screen_score(), 0.0, time.perf_counter() - t0)
    if extra:
        t0 = time.perf_counter()
        more = [("sampled", p) for p in extra]
        more_scores = [r.reward for r in task.evaluate(extra)]
        out["sampled"] = rejection_table("rosenbrock, the rules of (a)", more, more_scores, 0.0, 0.0,
                                         time.perf_counter() - t0)
    _save("rosenbrock", out)


def convnet_part(rules: list[tuple[str, Program]], data: Path, chunk: int = 10) -> None:
    task = make("convnet-cifar10", preset="ci", data_dir=str(data), device="cpu")
    t0 = time.perf_counter()
    floor = task.screen_score()
    print(f"\n  convnet ci: floor (untrained child, settled batch norm) {floor:.4f} in {time.perf_counter() - t0:.1f} s")
    n_val = task.protocol.val_examples
    margin = 2 * math.sqrt(floor * (1 - floor) / n_val)
    scores: list[float] = []
    t0 = time.perf_counter()
    for start in range(0, len(rules), chunk):
        scores += [r.reward for r in task.evaluate([p for _, p in rules[start:start + chunk]])]
        done = len(scores)
        print(f"  ... {done}/{len(rules)} trained, {time.perf_counter() - t0:.0f} s", flush=True)
    out = rejection_table("convnet-cifar10, preset ci (CPU)", rules, scores, floor, margin, time.perf_counter() - t0)
    _save("convnet", out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["merge", "rosenbrock", "convnet"],
                    choices=["merge", "rosenbrock", "convnet"])
    ap.add_argument("--rules", type=int, default=3000, help="rules sampled for (a)")
    ap.add_argument("--random", type=int, default=500, help="random rules beside Table 1 for (b)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", type=Path, help="take (a)'s rules from a run's log.jsonl instead of sampling")
    ap.add_argument("--data", type=Path, default=DATA, help="folder holding cifar-10-batches-py")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"screen_check: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), python {sys.version.split()[0]}")
    t_all = time.perf_counter()
    sampled: list[Program] = []
    if "merge" in args.parts or "rosenbrock" in args.parts:
        if args.log:
            rows = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
            programs, source = [Program(tuple(r["tokens"])) for r in rows], f"from {args.log}"
        else:
            programs = Masker(get_space("full"), 2).sample_many(args.rules, args.seed)
            source = f"sampled uniformly under the masks, full space, depth 2, seed {args.seed}"
        sampled = _distinct(programs)
        if "merge" in args.parts:
            found = merge_part(programs, source)
            group_agreement(found["groups"])
    rules = check_set(args.random, args.seed + 1)
    if "rosenbrock" in args.parts:
        rosenbrock_part(rules, sampled)
    if "convnet" in args.parts:
        convnet_part(rules, args.data)
    print(f"\nwall time {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
