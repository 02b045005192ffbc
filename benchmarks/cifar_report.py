"""Report of the search on the child reward (issue 13): Figure 4, the leaderboards, the cost.

Reads what ``benchmarks/cifar_search.sh ROOT RULES SEED`` wrote under ROOT (one run directory
per agent, ``AGENT-sSEED``, each with its promotion to "fast", and the classics scored on both
protocols) and writes, into ``--out`` (default ``benchmarks/out/cifar_search``):

- ``figure4.png``: the reward of each sampled rule against the number sampled, per agent
  (a moving average and the best so far), with the classics' rewards on the same protocol;
- ``report.md``: the tables docs/results.md quotes (cost, rewards over the run, the promoted top
  10 of each agent in paper notation beside the classics, the paper's families found);
- ``runs/AGENT-sSEED/``: each run's config, log (gzipped), top and promotion files, so the
  numbers can be checked without the run directories.

Nothing is trained here: every number is read from the runs' logs.

    python benchmarks/cifar_report.py /work/runs/cifar [--seed 1] [--out benchmarks/out/cifar_search]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nos_gym.agents import figures, read_log, top_rules  # noqa: E402

AGENTS = ("trpo_lstm", "random_search", "evolution")
SEEDS = (0, 1, 2)  # the child seeds of the promotion, as cifar_search.sh runs it
PROMOTED = "promoted-fast-seeds0-1-2.json"
CLASSICS = {"g": "SGD", "m": "Momentum", "ADAM": "Adam", "RMSProp": "RMSProp",
            "g * exp(sign(g) * sign(m))": "PowerSign", "(1 + sign(g) * sign(m)) * g": "AddSign"}

#: the paper's families (section 5, Table 1), as patterns on canonical keys; sign(g*m) == sign(g)*sign(m)
SIGN_AGREE = r"(?:mul\(sign_g,sign_m\)|sign\(mul\(g,m\)\))"
FAMILIES = {
    "e^{sign(g)*sign(m)} (PowerSign)": re.compile(rf"exp\({SIGN_AGREE}\)"),
    "1 + sign(g)*sign(m) (AddSign)": re.compile(rf"add\({SIGN_AGREE},one\)"),
    "drop(m, p)": re.compile(r"drop0\.\d+\(m\)"),
    "e^{10^-3 w}": re.compile(r"exp\(w1e-3\)"),
}


def families(key: str) -> list[str]:
    return [name for name, pattern in FAMILIES.items() if pattern.search(key)]


def load_run(path: Path) -> dict[str, Any]:
    records = read_log(path)
    trained = [r for r in records if r["source"] == "trained"]
    images = sum(int(r["metrics"].get("child_images", 0)) for r in trained)
    promoted = path / PROMOTED
    return {"path": path, "records": records, "trained": trained, "child_images": images,
            "seconds": max((r["time"] for r in records), default=0.0),
            "promoted": json.loads(promoted.read_text()) if promoted.is_file() else None}


def classics(root: Path, preset: str) -> dict[str, dict[str, Any]]:
    """The classics' scores on ``preset``: on "cpu" seed 0's; on "fast" the mean over ``SEEDS`` (with each)."""
    seeds = SEEDS if preset == "fast" else (0,)
    files = [root / f"classics-{preset}-s{s}.json" for s in seeds]
    if not all(f.is_file() for f in files):
        return {}
    per_seed = [{CLASSICS.get(d["rule"], d["rule"]): d for d in json.loads(f.read_text())} for f in files]
    out = {}
    for name, d in per_seed[0].items():
        rewards = [run[name]["reward"] for run in per_seed]
        out[name] = {**d, "reward": float(np.mean(rewards)), "rewards": rewards,
                     "seed_sd": float(np.std(rewards, ddof=1)) if len(rewards) > 1 else 0.0}
    return out


def figure4(runs: dict[str, dict[str, Any]], cpu: dict[str, dict[str, Any]], out: Path, window: int = 100) -> Path:
    return figures.figure4({name: [rec["reward"] for rec in run["records"]] for name, run in runs.items()}, out,
                           window=window, dots=False, references={k: d["reward"] for k, d in cpu.items()},
                           title="Figure 4 on CIFAR-10: the reward of sampled rules (cpu protocol, multi-fidelity)",
                           ylabel="Reward (validation accuracy of the child, cpu protocol)", ylim=(0.0, 0.75),
                           figsize=(9, 5))


def archive(run: dict[str, Any], dest: Path) -> None:
    """The run's small files, and its log gzipped, under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    src = run["path"]
    for name in ("config.yaml", "top.txt", PROMOTED.replace(".json", ".txt"), PROMOTED, "updates.jsonl"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    with open(src / "log.jsonl", "rb") as f, gzip.open(dest / "log.jsonl.gz", "wb") as g:
        shutil.copyfileobj(f, g)


def report(root: Path, seed: int, out: Path, agents: tuple[str, ...] = AGENTS) -> str:
    runs = {a: load_run(root / f"{a}-s{seed}") for a in agents if (root / f"{a}-s{seed}" / "log.jsonl").is_file()}
    runs = {a: run for a, run in runs.items() if run["records"]}  # a run that has not logged a batch yet
    if not runs:
        raise SystemExit(f"no runs under {root} (expected {', '.join(f'{a}-s{seed}' for a in agents)})")
    cpu, fast = classics(root, "cpu"), classics(root, "fast")
    lines = [f"# The search on CIFAR-10 (runs under {root}, seed {seed})", ""]

    lines += ["## Cost and rewards over the run", "",
              "| agent | rules sampled | distinct | trained | settled without training | child-images | "
              "per sampled rule | wall (h) | mean reward, first 100 | mean, last 100 | best | top-10 mean (distinct) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        recs = run["records"]
        r = np.array([x["reward"] for x in recs])
        top10 = top_rules(recs, 10)
        settled = len(recs) - len(run["trained"])
        lines.append(f"| {name} | {len(recs):,} | {len({x['key'] for x in recs}):,} | {len(run['trained']):,} | "
                     f"{settled:,} | {run['child_images']:,} | {run['child_images'] / len(recs):,.0f} | "
                     f"{run['seconds'] / 3600:.2f} | {r[:100].mean():.3f} | {r[-100:].mean():.3f} | {r.max():.3f} | "
                     f"{np.mean([d['reward'] for d in top10]):.3f} |")
    lines += ["", "Settled without training: the canonical cache, the store, fingerprints (an equivalent rule's "
              "score) and screens (a degenerate rule's floor score). Child-images count only trained rules.", ""]
    budget = min(len(run["records"]) for run in runs.values())
    if len(runs) > 1:  # a run's first N samples are what a run of budget N samples: compare there
        lines += [f"### At the same budget: the first {budget:,} sampled rules of each agent", "",
                  "| agent | best | top-10 mean (distinct) | mean reward | rules > 0.5 | child-images |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, run in runs.items():
            recs = run["records"][:budget]
            r = np.array([x["reward"] for x in recs])
            images = sum(int(x["metrics"].get("child_images", 0)) for x in recs if x["source"] == "trained")
            lines.append(f"| {name} | {r.max():.4f} | {np.mean([d['reward'] for d in top_rules(recs, 10)]):.4f} | "
                         f"{r.mean():.3f} | {int((r > 0.5).sum())} | {images:,} |")
        lines.append("")
    if cpu:
        lines += ["The classics on the search's protocol (cpu preset, halving, hurdle 0.277): " +
                  ", ".join(f"{k} {v['reward']:.3f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]["reward"])),
                  ""]

    lines += ["## The paper's families among the sampled rules", "",
              "| agent | " + " | ".join(FAMILIES) + " |", "|---|" + "---:|" * len(FAMILIES)]
    for name, run in runs.items():
        keys = {x["key"] for x in run["records"]}
        top = {d["key"] for d in top_rules(run["records"], 10)}
        cells = []
        for fam in FAMILIES:
            n = sum(fam in families(k) for k in keys)
            t = sum(fam in families(k) for k in top)
            cells.append(f"{n} distinct ({t} in top 10)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += ["## The top 10 of each agent, promoted to the \"fast\" preset (65,000 child-images per rule), "
              f"the mean over child seeds {list(SEEDS)}", ""]
    if fast:
        lines += ["| classic | fast (mean) | sd over seeds | per seed |", "|---|---:|---:|---|"]
        for k, v in sorted(fast.items(), key=lambda kv: -kv[1]["reward"]):
            lines.append(f"| {k} | {v['reward']:.4f} | {v['seed_sd']:.4f} | "
                         f"{', '.join(f'{x:.4f}' for x in v['rewards'])} |")
        lines.append("")
    adam_fast = fast.get("Adam", {}).get("reward")
    for name, run in runs.items():
        board = run["promoted"]
        if board is None:
            lines += [f"{name}: not promoted yet", ""]
            continue
        lines += [f"### {name} (Kendall tau-b of the cpu and fast rankings: "
                  f"{board['kendall_tau'] if board['kendall_tau'] is None else round(board['kendall_tau'], 3)})", "",
                  "| rank | fast (mean) | sd over seeds | cpu (search) | lr (seed 0) | rule | families |",
                  "|---:|---:|---:|---:|---:|---|---|"]
        for d in board["rules"]:
            mark = " **> Adam**" if adam_fast is not None and d["reward"] > adam_fast else ""
            lr = "-" if d["lr"] is None else f"{d['lr']:g}"
            lines.append(f"| {d['rank']} | {d['reward']:.4f}{mark} | {d.get('seed_sd', 0.0):.4f} | "
                         f"{d['previous_reward']:.4f} | {lr} | `{d['rule']}` | {', '.join(families(d['key'])) or '-'} |")
        lines.append("")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text + "\n")
    figure4(runs, cpu, out / "figure4.png")
    for name, run in runs.items():
        archive(run, out / "runs" / f"{name}-s{seed}")
    for f in root.glob("classics-*.json"):
        shutil.copyfile(f, out / f.name)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="the ROOT given to benchmarks/cifar_search.sh")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "cifar_search")
    p.add_argument("--agents", nargs="+", default=list(AGENTS),
                   help="run names: ROOT/NAME-sSEED for each (default: cifar_search.sh's three agents)")
    a = p.parse_args(argv)
    print(report(a.root, a.seed, a.out, tuple(a.agents)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
