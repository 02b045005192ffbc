"""All agents on one task with one budget of sampled rules, over 3 seeds (issue: agents).

For each agent and seed it runs the agent script (``agents/NAME.py``'s ``main``) in this
process, then prints one table over the seeds:

- best reward found;
- samples to reach the threshold: the first sampled rule scoring at least the threshold
  (by default PowerSign's score on the same task), "-" if never reached;
- mean reward of the top 10 *distinct* rules (by canonical key, so a controller that
  samples one rule 10 times does not count it 10 times);
- seconds of wall time.

and saves a Figure-4-style plot (reward against the number of sampled rules: moving
average, and best so far) to ``--out``.

    python benchmarks/agents_compare.py                          # 3 seeds x 7 agents, Rosenbrock
    python benchmarks/agents_compare.py --agents trpo_lstm random_search --seeds 1 --total-rules 1000
    python benchmarks/agents_compare.py --set trpo_lstm.max_kl=0.05

Besides the five agents, ``trpo_lstm_risk`` and ``reinforce_lstm_risk`` are the LSTM agents
with the risk-seeking baseline (``--baseline risk_seeking``, epsilon 0.05), and
``trpo_lstm_paper``, ``trpo_lstm_pqt``, ``trpo_lstm_hybrid`` (and ``reinforce_lstm_pqt``) the
controller's presets (``--preset paper|pqt|hybrid``: the paper's setting, priority-queue
training, PQT with neural-guided evolution; ``nos_gym/agents/guidance.py``). The default
``--agents`` are the seven above; name the presets to run them.

Every agent gets the same task, space, depth, constraints, batch size and budget. Each
run has its own result store (so its seconds include all of its scoring); with
``--shared-store`` all runs share one and a rule is trained once per benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from nos_gym.agents import AGENTS, load_agent, read_log, top_rules
from nos_gym.dsl import parse
from nos_gym.tasks import make

REFERENCES = {"Momentum (m)": "m", "SGD (g)": "g", "Adam": "ADAM", "PowerSign": "g * exp(sign(g) * sign(m))"}

#: benchmark names -> (agent, extra flags): the agents, and the LSTM agents with the risk-seeking baseline
VARIANTS: dict[str, tuple[str, list[str]]] = {name: (name, []) for name in AGENTS} | {
    "trpo_lstm_risk": ("trpo_lstm", ["--baseline", "risk_seeking"]),
    "reinforce_lstm_risk": ("reinforce_lstm", ["--baseline", "risk_seeking"]),
    "trpo_lstm_paper": ("trpo_lstm", ["--preset", "paper"]),
    "trpo_lstm_pqt": ("trpo_lstm", ["--preset", "pqt"]),
    "trpo_lstm_hybrid": ("trpo_lstm", ["--preset", "hybrid"]),
    "reinforce_lstm_pqt": ("reinforce_lstm", ["--preset", "pqt"]),
}
#: what ``--agents`` runs when not given: the agents and the risk-seeking variants
DEFAULT_AGENTS = [*AGENTS, "trpo_lstm_risk", "reinforce_lstm_risk"]


def parse_cli(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", nargs="+", default=DEFAULT_AGENTS, choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--task", default="rosenbrock")
    p.add_argument("--task-options", type=yaml.safe_load, default={}, help="YAML/JSON mapping")
    p.add_argument("--space", default="full")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--total-rules", type=int, default=3000)
    p.add_argument("--num-envs", type=int, default=100)
    p.add_argument("--threshold", type=float, default=None,
                   help="reward for 'samples to threshold' (default: PowerSign's score on the task)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="AGENT.KEY=VALUE",
                   help="an agent-specific setting, e.g. trpo_lstm.max_kl=0.05 (repeatable)")
    p.add_argument("--out", default="benchmarks/out/agents_compare")
    p.add_argument("--shared-store", action="store_true", help="one result store for all runs")
    p.add_argument("--keep", action="store_true", help="keep earlier runs in --out (default: start fresh)")
    return p.parse_args(argv)


def samples_to(rewards: list[float], threshold: float) -> int | None:
    for i, r in enumerate(rewards):
        if r >= threshold:
            return i + 1
    return None


def summarize(run_dir: Path, threshold: float, k: int) -> dict:
    records = read_log(run_dir)
    rewards = [r["reward"] for r in records]
    top = top_rules(records, k)
    return {"rewards": rewards, "best": max(rewards), "to_threshold": samples_to(rewards, threshold),
            "top_mean": float(np.mean([t["reward"] for t in top])), "best_rule": top[0]["rule"],
            "distinct": len({r["key"] for r in records})}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPU cores visible"


def plot(results: dict, threshold: float, path: Path, title: str, window: int = 200) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for agent, runs in results.items():
        n = min(len(r["rewards"]) for r in runs.values())
        R = np.array([r["rewards"][:n] for r in runs.values()])
        x = np.arange(1, n + 1)
        w = max(1, min(window, n // 5))
        kernel = np.ones(w) / w
        moving = np.array([np.convolve(row, kernel, mode="valid") for row in R])
        line, = axes[0].plot(x[w - 1:], moving.mean(0), label=agent)
        best = np.maximum.accumulate(R, axis=1)
        axes[1].plot(x, best.mean(0), color=line.get_color(), label=agent)
        axes[1].fill_between(x, best.min(0), best.max(0), color=line.get_color(), alpha=0.15)
    axes[0].set_title(f"Controller reward (moving average of {w} rules, mean of seeds)")
    axes[1].set_title("Best reward so far (mean of seeds; band: min-max)")
    for ax in axes:
        ax.axhline(threshold, color="gray", ls="--", lw=1, label="threshold (PowerSign)")
        ax.set_xlabel("Number of sampled optimizers")
        ax.set_ylabel("Reward")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    a = parse_cli(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    if out.exists() and not a.keep:
        shutil.rmtree(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    extra: dict[str, list[str]] = {}
    for item in a.set:
        agent_key, _, value = item.partition("=")
        agent, _, key = agent_key.partition(".")
        if agent not in AGENTS or not key or not _:
            sys.exit(f"--set {item!r}: expected AGENT.KEY=VALUE with AGENT one of {list(AGENTS)}")
        flag = f"--{key.replace('_', '-')}"
        if value.lower() in ("true", "false"):  # a switch: --flag / --no-flag
            extra.setdefault(agent, []).append(flag if value.lower() == "true" else f"--no-{flag[2:]}")
        else:
            extra.setdefault(agent, []).extend([flag, value])

    task = make(a.task, **a.task_options)
    refs = {name: task.evaluate([parse(rule)])[0].reward for name, rule in REFERENCES.items()}
    threshold = refs["PowerSign"] if a.threshold is None else a.threshold
    common = ["--task", a.task, "--task-options", json.dumps(a.task_options), "--space", a.space,
              "--depth", str(a.depth), "--total-rules", str(a.total_rules), "--num-envs", str(a.num_envs),
              "--no-progress"]

    results: dict[str, dict[int, dict]] = {}
    for agent in a.agents:
        base, flags = VARIANTS[agent]
        module = load_agent(base)
        for seed in a.seeds:
            run_dir = out / "runs" / f"{agent}-s{seed}"
            t0 = time.time()
            print(f"[agents_compare] {agent} seed {seed} ...", file=sys.stderr, flush=True)
            store = out / ("store.sqlite" if a.shared_store else f"stores/{agent}-s{seed}.sqlite")
            with contextlib.redirect_stdout(io.StringIO()):  # each run's own top-10 is in its top.txt
                module.main(common + ["--seed", str(seed), "--run-dir", str(run_dir), "--store", str(store)]
                            + flags + extra.get(base, []))
            summary = summarize(run_dir, threshold, a.top)
            summary["seconds"] = time.time() - t0
            results.setdefault(agent, {})[seed] = summary
            print(f"[agents_compare] {agent} seed {seed}: best {summary['best']:.4f}, top-{a.top} mean "
                  f"{summary['top_mean']:.4f}, {summary['seconds']:.0f}s, best rule {summary['best_rule']}",
                  file=sys.stderr, flush=True)

    machine = _machine()
    header = (f"agents_compare: task {a.task} {a.task_options or ''}, space {a.space}, depth {a.depth}, "
              f"{a.total_rules} sampled rules per run, batches of {a.num_envs}, seeds {a.seeds}; "
              f"torch {torch.__version__}, {machine}, {torch.get_num_threads()} torch thread(s)")
    lines = [header, "reference rules on this task: " + ", ".join(f"{k} {v:.4f}" for k, v in refs.items()),
             f"threshold (samples to reach): {threshold:.4f}", "",
             f"| agent | best reward | samples to threshold | top-{a.top} mean (distinct) | distinct rules | seconds |",
             "|---|---|---|---|---|---|"]
    for agent, runs in results.items():
        reached = [r["to_threshold"] for r in runs.values() if r["to_threshold"] is not None]
        to_thr = (f"{statistics.median(reached):.0f} (median; {len(reached)}/{len(runs)} seeds)"
                  if reached else f"never (0/{len(runs)})")
        lines.append(f"| {agent} | {_mean_std([r['best'] for r in runs.values()])} | {to_thr} | "
                     f"{_mean_std([r['top_mean'] for r in runs.values()])} | "
                     f"{statistics.mean(r['distinct'] for r in runs.values()):.0f} | "
                     f"{statistics.mean(r['seconds'] for r in runs.values()):.0f} |")
    lines += ["", "per seed (best / top-mean / samples to threshold):"]
    for agent, runs in results.items():
        cells = [f"s{s}: {r['best']:.3f} / {r['top_mean']:.3f} / {r['to_threshold'] or '-'}" for s, r in runs.items()]
        lines.append(f"  {agent}: " + "; ".join(cells))
    lines += ["", "best rule per agent (over seeds):"]
    for agent, runs in results.items():
        r = max(runs.values(), key=lambda d: d["best"])
        lines.append(f"  {agent}: {r['best']:.4f}  {r['best_rule']}")
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(
        {agent: {str(s): {k: v for k, v in r.items() if k != "rewards"} for s, r in runs.items()}
         for agent, runs in results.items()} | {"_references": refs, "_threshold": threshold}, indent=1))
    plot(results, threshold, out / "figure4.png",
         f"{a.task}, space {a.space}, depth {a.depth}: {a.total_rules} rules x {len(a.seeds)} seeds")
    print(f"plot: {out / 'figure4.png'}")
    return results


if __name__ == "__main__":
    main()
