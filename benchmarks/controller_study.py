"""Does TRPO-LSTM learn at the child search's batch size? Its trust region, side by side.

The CIFAR-10 search (configs/cifar_cpu.yaml) updates the controller every 20 rules with
``max_kl`` 0.01 and the risk-seeking baseline at epsilon 0.1 (2 rules of each batch carry
the gradient). There its policy entropy barely moved (20.9 -> 20.6 over 75 updates), and
the child reward is too dear to find out why on it. The Rosenbrock reward (native kernel:
~3,000 rules/s on one core) is cheap enough to run the same controller settings many
times: this script runs TRPO-LSTM at the CIFAR search's batch size and budget for each
``--max-kl`` and ``--baselines`` value and ``--seeds``, random search beside them, and
prints per setting:

- top-10 mean (distinct rules) and best reward, over seeds (mean and sd);
- learning: the mean reward of the last 20% of sampled rules minus that of the first 20%
  (random search's is its noise level);
- the policy: entropy at the first and the last update, the fraction of updates the line
  search accepted, and the mean KL of the accepted steps.

It saves a Figure-4-style plot (reward moving average over sampled rules, mean over seeds)
and the table under ``--out``.

    python benchmarks/controller_study.py                  # 3 max_kl x 2 baselines x 3 seeds + random, ~10 min
    python benchmarks/controller_study.py --max-kl 0.01 0.1 --seeds 1 --total-rules 400   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import agents_compare  # noqa: E402  (a sibling script)


def parse_cli(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-kl", nargs="+", type=float, default=[0.01, 0.03, 0.1])
    p.add_argument("--baselines", nargs="+", default=["risk_seeking", "ema"], choices=["risk_seeking", "ema"])
    p.add_argument("--risk-epsilon", type=float, default=0.1, help="as configs/cifar_cpu.yaml")
    p.add_argument("--num-envs", type=int, default=20, help="rules per update (configs/cifar_cpu.yaml: 20)")
    p.add_argument("--total-rules", type=int, default=1500, help="sampled rules per run (the CIFAR campaign's)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--task", default="rosenbrock")
    p.add_argument("--task-options", default="{}", help="YAML/JSON mapping")
    p.add_argument("--out", default="benchmarks/out/controller_study")
    return p.parse_args(argv)


def policy_trace(run_dir: Path) -> dict:
    """Entropy at the first and last update, accepted fraction and mean accepted KL (updates.jsonl)."""
    updates = [json.loads(line) for line in (run_dir / "updates.jsonl").read_text().splitlines() if line.strip()]
    accepted = [u for u in updates if u.get("accepted")]
    return {"entropy_first": updates[0]["entropy"], "entropy_last": updates[-1]["entropy"],
            "accepted": len(accepted) / len(updates),
            "kl": statistics.mean(u["kl"] for u in accepted) if accepted else 0.0}


def learning(rewards: list[float]) -> float:
    """Mean reward of the last 20% of sampled rules minus the first 20%'s."""
    k = max(1, len(rewards) // 5)
    return float(np.mean(rewards[-k:]) - np.mean(rewards[:k]))


def main(argv=None) -> dict:
    a = parse_cli(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--task", a.task, "--task-options", a.task_options, "--total-rules", str(a.total_rules),
              "--num-envs", str(a.num_envs), "--seeds", *map(str, a.seeds)]
    settings: dict[str, tuple[list[str], bool]] = {}  # label -> (agents_compare args, is a controller)
    for baseline in a.baselines:
        variant = "trpo_lstm_risk" if baseline == "risk_seeking" else "trpo_lstm"
        for kl in a.max_kl:
            sets = ["--set", f"trpo_lstm.max_kl={kl}"]
            if baseline == "risk_seeking":
                sets += ["--set", f"trpo_lstm.risk_epsilon={a.risk_epsilon}"]
            label = f"{baseline} max_kl {kl:g}" + (f" (eps {a.risk_epsilon:g})" if baseline == "risk_seeking" else "")
            settings[label] = (["--agents", variant, *sets], True)
    settings["random search"] = (["--agents", "random_search"], False)

    ms = agents_compare._mean_std  # "mean ± sd" over seeds, as the agents' table prints it
    rows: dict[str, dict] = {}
    curves: dict[str, np.ndarray] = {}
    for i, (label, (args, controller)) in enumerate(settings.items()):
        sub = out / f"setting{i}"
        print(f"[controller_study] {label}", file=sys.stderr, flush=True)
        results = agents_compare.main(common + args + ["--out", str(sub)])
        runs = next(iter(results.values()))
        row = {"top_mean": [r["top_mean"] for r in runs.values()], "best": [r["best"] for r in runs.values()],
               "learning": [learning(r["rewards"]) for r in runs.values()],
               "seconds": [r["seconds"] for r in runs.values()]}
        if controller:
            name = next(iter(results))
            traces = [policy_trace(sub / "runs" / f"{name}-s{seed}") for seed in runs]
            for key in ("entropy_first", "entropy_last", "accepted", "kl"):
                row[key] = [t[key] for t in traces]
        rows[label] = row
        n = min(len(r["rewards"]) for r in runs.values())
        curves[label] = np.mean([np.asarray(r["rewards"][:n]) for r in runs.values()], axis=0)

    lines = [f"controller_study: task {a.task} {a.task_options}, {a.total_rules} rules per run, batches of "
             f"{a.num_envs}, seeds {a.seeds}", "",
             "| setting | top-10 mean | best | learning (last 20% - first 20%) | entropy first -> last | "
             "accepted | mean KL | s/run |", "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        policy = (f"{statistics.mean(r['entropy_first']):.2f} -> {statistics.mean(r['entropy_last']):.2f} | "
                  f"{statistics.mean(r['accepted']):.2f} | {statistics.mean(r['kl']):.4f}"
                  if "kl" in r else "- | - | -")
        lines.append(f"| {label} | {ms(r['top_mean'])} | {ms(r['best'])} | {ms(r['learning'])} | {policy} | "
                     f"{statistics.mean(r['seconds']):.0f} |")
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    _plot(curves, out / "reward_curves.png", f"{a.task}: TRPO-LSTM at batches of {a.num_envs}, mean of "
                                             f"{len(a.seeds)} seeds (moving average of 100 rules)")
    return rows


def _plot(curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, rewards in curves.items():
        w = min(100, len(rewards))
        ma = np.convolve(rewards, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(rewards) + 1), ma, label=label, lw=1.5 if "random" not in label else 2.5,
                ls="--" if "random" in label else "-")
    ax.set_xlabel("sampled rules")
    ax.set_ylabel("reward (moving average)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
