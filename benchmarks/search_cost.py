"""What a search on the child reward costs per sampled rule, and what each mechanism saves (issue 12).

One search (the paper's TRPO-LSTM controller by default, through the env's vector form and
the Evaluator, as ``nos-gym search`` runs it) on the convnet task under a multi-fidelity
protocol of ``--preset`` (successive halving over the rates, then the hurdle), with the
Evaluator's whole funnel on. Then, for the rules it sampled, one table beside the fixed
protocol (every sample trained at ``C`` = the preset's child-images per rule):

    canonical cache   a rule whose canonical key was scored before (this run or the store): C
    fingerprint       scored as an equivalent rule (same behaviour on the probe): C
    screen            degenerate on the probe, given the task's screen score untrained: C
    successive halving  the fixed sweep's images minus the halving plan's
    diverged          every rate diverged in the sweep: its final training (the fixed protocol skips it too)
    hurdle            the final training of a rule below the hurdle
    final hurdle      the rest of the final training of a rule below the final hurdle at its checkpoint
    early stops       children that diverged stop early (a rule whose children all diverged stops)
    trained           what was spent

Where a score came from is read from each sampled rule's record: ``source`` ("cache",
"store", "fingerprint", "screen", "trained": ``Result.source``, the env's ``info["source"]``)
when the run log has it, else from its metrics (``equivalent_to``: fingerprint; ``screen``:
screen) and ``cached``; the costs from the metrics the task writes (``fidelity``,
``child_images``, ``sweep_images``, ``hurdled``).

    python benchmarks/search_cost.py --preset cpu --rules 200 --hurdle 0.45      # ~1 h on one core
    python benchmarks/search_cost.py --preset ci --rules 16 --num-envs 8 --backend serial --hurdle 0.3  # a minute
    python benchmarks/search_cost.py --report benchmarks/out/search_cost/RUN   # the table of a finished run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_ROOT, format_seconds, machine, markdown_table  # noqa: E402

OUT = OUT_ROOT / "search_cost"


def source_of(record: dict[str, Any]) -> str:
    """Where a sampled rule's score came from: cache, store, fingerprint, screen or trained."""
    m = record.get("metrics") or {}
    src = record.get("source") or m.get("source")
    if src:
        return "cache" if src == "store" else src
    if "screen" in m:
        return "screen"
    if "equivalent_to" in m:
        return "fingerprint"
    return "cache" if record.get("cached") else "trained"


def account(records: Sequence[dict[str, Any]], protocol, searched) -> dict[str, Any]:
    """Child-images of the sampled rules: spent, and avoided by each mechanism, against the fixed
    ``protocol``; ``searched`` is the multi-fidelity protocol the search ran (its halving plan)."""
    from nos_gym.tasks.convnet.protocol import rung_plan

    fixed = protocol.child_images
    final = protocol.final_images
    sweep_fixed = fixed - final
    steps = (searched.sweep_examples // searched.batch_size) * searched.sweep_epochs
    plan = rung_plan(len(searched.lrs), steps, searched.schedule, searched.eta, searched.rungs)
    sweep_plan = sum(keep * (stop - start) for (keep, stop), start in zip(plan, [0] + [s for _, s in plan]))
    sweep_plan *= searched.batch_size
    rows = {k: {"samples": 0, "images": 0} for k in
            ("canonical cache", "fingerprint", "screen", "successive halving", "diverged", "hurdle", "final hurdle",
             "early stops", "trained")}
    unknown = 0
    for r in records:
        src = source_of(r)
        m = r.get("metrics") or {}
        if src in ("cache", "fingerprint", "screen"):
            name = "canonical cache" if src == "cache" else src
            rows[name]["samples"] += 1
            rows[name]["images"] += fixed
            continue
        spent = m.get("child_images")
        if spent is None:  # a failed evaluation (timeout, error): nothing to account
            unknown += 1
            continue
        rows["trained"]["samples"] += 1
        rows["trained"]["images"] += int(spent)
        sweep = int(m.get("sweep_images", spent if m.get("fidelity") == "sweep" else spent - final))
        stopped = 0  # children that diverged stop early (a group whose children all diverged stops)
        if sweep_plan < sweep_fixed:
            rows["successive halving"]["samples"] += 1
            rows["successive halving"]["images"] += sweep_fixed - sweep_plan
        stopped += max(0, min(sweep_plan, sweep_fixed) - sweep)
        if m.get("lr") is None and m.get("fidelity") == "sweep":
            rows["diverged"]["samples"] += 1
            rows["diverged"]["images"] += final
        elif m.get("hurdled"):
            rows["hurdle"]["samples"] += 1
            rows["hurdle"]["images"] += final
        elif m.get("final_hurdled"):  # stopped at the final training's checkpoint: the rest is saved
            rows["final hurdle"]["samples"] += 1
            rows["final hurdle"]["images"] += final - (spent - sweep)
        else:
            stopped += max(0, final - (spent - sweep))
        if stopped:
            rows["early stops"]["samples"] += 1
            rows["early stops"]["images"] += stopped
    return {"rows": rows, "fixed": fixed, "samples": len(records), "unknown": unknown}


def table(acc: dict[str, Any]) -> list[str]:
    n, fixed = acc["samples"], acc["fixed"]
    total = n * fixed
    out = []
    for name, row in acc["rows"].items():
        share = row["images"] / total if total else 0.0
        out.append([name, row["samples"], f"{row['images']:,}", f"{row['images'] / max(n, 1):,.0f}", f"{100 * share:.1f}%"])
    check = sum(r["images"] for r in acc["rows"].values())
    lines = [markdown_table(["", "samples", "child-images", "per sampled rule", "of the fixed protocol's"], out), "",
             f"{n} sampled rules; the fixed protocol trains {fixed:,} child-images per sampled rule "
             f"({total:,} in all); this search spent {acc['rows']['trained']['images'] / max(n, 1):,.0f} per sampled "
             f"rule ({100 * acc['rows']['trained']['images'] / max(total, 1):.1f}%)",
             f"accounted: {check:,} of {total:,} child-images"
             + (f"; {acc['unknown']} failed evaluations left out" if acc["unknown"] else "")]
    return lines


def run_search(a: argparse.Namespace, run_dir: Path) -> None:
    from nos_gym.agents import load_agent

    options = {"preset": a.preset, "schedule": "halving", "eta": a.eta, "device": "cpu"}
    if a.hurdle is not None:
        options["hurdle"] = a.hurdle
    if a.hurdle_quantile is not None:
        options.update(hurdle_quantile=a.hurdle_quantile, hurdle_warmup=a.warmup)
    if a.final_hurdle is not None:
        options["final_hurdle"] = a.final_hurdle
        if a.final_rung is not None:
            options["final_rung"] = a.final_rung
    if a.data_dir:
        options["data_dir"] = str(a.data_dir)
    argv = ["--task", "convnet-cifar10", "--task-options", json.dumps(options), "--total-rules", str(a.rules),
            "--num-envs", str(a.num_envs), "--depth", str(a.depth), "--space", a.space, "--seed", str(a.seed),
            "--backend", a.backend, "--run-dir", str(run_dir), "--store", str(run_dir / "store.sqlite"),
            "--no-progress"]
    if (run_dir / "checkpoint.pt").exists():
        argv = ["--resume", str(run_dir), "--no-progress"]
    load_agent(a.agent).main(argv)


def report(run_dir: Path) -> list[str]:
    from nos_gym.agents import load_yaml, read_log
    from nos_gym.tasks.convnet import Protocol

    config = load_yaml(run_dir / "config.yaml")
    opts = dict(config["task_options"])
    proto = Protocol.from_dict({k: v for k, v in opts.items() if k not in ("device", "data_dir")})
    fixed = Protocol.preset(opts["preset"])
    records = read_log(run_dir)
    acc = account(records, fixed, proto)
    best = sorted(records, key=lambda r: -r["reward"])[:5]
    lines = [f"search: {config.get('agent')} on convnet-cifar10 {json.dumps(opts)}; depth {config.get('depth')}, "
             f"space {config.get('space')}, {config.get('num_envs')} rules per batch, seed {config.get('seed')}",
             f"protocol: {json.dumps(proto.to_dict())}", f"fixed protocol: {json.dumps(fixed.to_dict())}", ""]
    lines += table(acc)
    fid = {}
    for r in records:
        if source_of(r) == "trained":
            f = (r.get("metrics") or {}).get("fidelity")
            fid[f] = fid.get(f, 0) + 1
    lines += [f"trained rules by fidelity: {fid}", "best sampled rules:"]
    lines += [f"  {r['reward']:.4f}  {source_of(r):>11}  {(r.get('metrics') or {}).get('fidelity')}  {r['rule']}"
              for r in best]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", help="the convnet preset whose multi-fidelity form is searched with")
    ap.add_argument("--agent", default="trpo_lstm")
    ap.add_argument("--rules", type=int, default=200, help="rules the search samples")
    ap.add_argument("--num-envs", type=int, default=20, help="rules per batch (per controller update)")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--space", default="full")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--hurdle", type=float, default=None, help="a fixed hurdle (sweep accuracy)")
    ap.add_argument("--hurdle-quantile", type=float, default=None, help="a rolling hurdle instead")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--final-hurdle", type=float, default=None,
                    help="a fixed hurdle inside the final training (validation accuracy at --final-rung images)")
    ap.add_argument("--final-rung", type=int, default=None, help="images of the final training at its checkpoint")
    ap.add_argument("--backend", default="auto", choices=["auto", "serial", "process"])
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="the run directory (default benchmarks/out/search_cost/"
                                                          "PRESET-AGENT-sSEED); an existing one is resumed")
    ap.add_argument("--report", type=Path, default=None, help="print the table of this run directory; train nothing")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    run_dir = a.report or a.out or OUT / f"{a.preset}-{a.agent}-s{a.seed}"
    if a.report is None:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_search(a, run_dir)
    lines = report(run_dir)
    lines += ["", f"machine: {machine('cpu')}; this invocation took {format_seconds(time.perf_counter() - t0)}; "
                  f"run {run_dir}"]
    text = "\n".join(lines)
    print(text)
    (run_dir / "search_cost.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
