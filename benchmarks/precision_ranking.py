"""Does bf16 rank rules as fp32 does? The same rules scored under both precisions, compared.

Rules: SGD, Adam and PowerSign, then the seeded mix of ``fidelity_quality.rule_set`` (Table
1, single-token mutants of it, random rules of the full space: rules of every quality, from
chance to the best) up to ``--rules``. Each is scored by ``ConvNetTask`` on the search and
NOS-Bench protocol ``{preset: cpu, schedule: halving}`` (child seed 0), once in fp32 and
once with ``precision="bf16"``, directly (no Evaluator: no probe screens a rule out, so
every rule is really trained twice). Reported: Kendall tau-b between the two rankings, the
top-10 overlap, the largest score differences, and the order of SGD, Adam and PowerSign.

``--from-table N`` takes another set instead: the three anchors and N rules drawn uniformly
at random (seed 0) from the shipped NOS-Bench table's trained rows, whose rewards were made
on the same protocol in fp32. The fresh fp32 scores are then also checked against the
table's (the same fingerprint must give the same numbers), and tau-b gets a bootstrap 95%
interval over the rules. Its scores go to ``OUT/table-sample/``.

``--seed-ceiling`` also scores every rule in fp32 at child seed 1 (other initial weights and
minibatches): tau-b between two fp32 seeds is how far the reward itself reorders rules, the
most any perturbation of the training -- bf16's rounding included -- could be asked to agree.
``--rounding-ceiling`` scores them in fp32 once more with torch's and oneDNN's kernels capped at
AVX2 (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``): the same seed and the same
training, only the convolutions' rounding differs, as it does between CPUs.

Resumable: every score is appended to ``OUT/scores.jsonl`` as soon as it exists.

    python benchmarks/precision_ranking.py                 # 40 rules, ~6 min on 2 cores
    python benchmarks/precision_ranking.py --from-table 100   # 103 rules, ~10 min on 2 cores
    python benchmarks/precision_ranking.py --from-table 100 --seed-ceiling   # + fp32 at seed 1, ~6 min more
    python benchmarks/precision_ranking.py --from-table 100 --rounding-ceiling   # + fp32 on AVX2 kernels
    python benchmarks/precision_ranking.py --report        # the table from the scores file
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_quality import rule_set, top_overlap  # noqa: E402

from nos_gym.dsl import parse  # noqa: E402
from nos_gym.tasks.convnet.fidelity import kendall_tau  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "precision"
PROTOCOL = {"schedule": "halving"}
ANCHORS = {"SGD": "g", "Adam": "ADAM", "PowerSign": "g * exp(sign(g) * sign(m))"}

_tasks: dict = {}


SEED1, AVX2 = "fp32 seed 1", "fp32 avx2"
#: what each score column is: precision, child seed, and the environment its workers start with
#: (AVX2: torch's and oneDNN's kernels capped at AVX2, so the convolutions round otherwise)
VARIANTS = {"fp32": ("fp32", 0, {}), "bf16": ("bf16", 0, {}), SEED1: ("fp32", 1, {}),
            AVX2: ("fp32", 0, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})}


def _score(text: str, variant: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from nos_gym.tasks.convnet import ConvNetTask

    task = _tasks.get(variant)
    if task is None:
        precision, seed, env = VARIANTS[variant]
        for key, value in env.items():  # set by the parent before this worker started: check it
            if os.environ.get(key) != value:
                raise RuntimeError(f"variant {variant!r} needs {key}={value} in its worker's environment")
        task = _tasks[variant] = ConvNetTask("cpu", device="cpu", precision=precision, seed=seed, **PROTOCOL)
    t0 = time.perf_counter()
    res = task.evaluate([parse(text)])[0]
    return {"rule": text, "precision": variant, "kernels": torch.backends.cpu.get_cpu_capability(),
            "reward": res.reward, "lr": res.metrics.get("lr"),
            "seconds": time.perf_counter() - t0, "fingerprint": task.fingerprint}


def distinct(texts: list[str], n: int | None = None) -> list[str]:
    """The first ``n`` (default all) of ``texts`` with distinct canonical keys, as parsed text."""
    out, keys = [], set()
    for text in texts:
        if len(out) == n:
            break
        p = parse(text)
        if p.canonical_key not in keys:
            keys.add(p.canonical_key)
            out.append(str(p))
    return out


def rules(n: int) -> list[str]:
    """The anchors, then ``rule_set``'s seeded mix, ``n`` distinct rules (as parsed text)."""
    return distinct([*ANCHORS.values(), *(str(p) for _, p in rule_set(max(4 * n, 200), seed=0))], n)


def table_sample(n: int, seed: int = 0) -> tuple[list[str], dict[str, float]]:
    """The anchors and ``n`` rules drawn uniformly (``seed``) from the shipped NOS-Bench table's
    trained rows (as parsed text), and the table's fp32 reward of each drawn rule."""
    import numpy as np

    from nos_gym.bench import table as bench_table

    table = bench_table.load()
    trained = sorted(k for k, row in table.rows.items() if row["source"] == "trained")
    if n > len(trained):
        raise SystemExit(f"--from-table {n}: the table has only {len(trained)} trained rows")
    drawn = [table.rows[trained[int(i)]] for i in np.random.default_rng(seed).choice(len(trained), n, replace=False)]
    reward = {str(parse(row["rule"])): float(row["reward"]) for row in drawn}
    out = distinct([*ANCHORS.values(), *reward])
    return out, {t: reward[t] for t in out[len(ANCHORS):]}  # a drawn anchor counts as the anchor


def bootstrap_tau(x: list[float], y: list[float], reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile interval of Kendall tau-b, resampling the rules with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(reps):
        i = rng.integers(0, len(x), len(x))
        t = kendall_tau([x[k] for k in i], [y[k] for k in i])
        if t == t:  # not NaN
            taus.append(t)
    return float(np.percentile(taus, 2.5)), float(np.percentile(taus, 97.5))


def order_text(rewards: dict[str, float]) -> str:
    """Names best first, ``>`` between different rewards and ``=`` between equal ones."""
    names = sorted(rewards, key=lambda n: -rewards[n])
    return names[0] + "".join(f" {'=' if rewards[a] == rewards[b] else '>'} {b}" for a, b in zip(names, names[1:]))


def load(path: Path) -> dict[tuple[str, str], dict]:
    scores = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                scores[(row["rule"], row["precision"])] = row
    return scores


def report(texts: list[str], scores: dict[tuple[str, str], dict], shipped: dict[str, float] | None = None) -> str:
    both = [t for t in texts if (t, "fp32") in scores and (t, "bf16") in scores]
    x = [scores[(t, "fp32")]["reward"] for t in both]
    y = [scores[(t, "bf16")]["reward"] for t in both]
    lines = [f"{len(both)} rules scored in fp32 and bf16 on {{preset: cpu, schedule: halving}}, child seed 0"]
    if shipped is not None:
        lines[0] += " (the anchors and rules drawn from the shipped NOS-Bench table, seed 0)"
        checked = [t for t in both if t in shipped]
        same = sum(scores[(t, "fp32")]["reward"] == shipped[t] for t in checked)
        lines.append(f"fresh fp32 scores equal to the shipped table's: {same}/{len(checked)}")
        low, high = bootstrap_tau(x, y)
        lines.append(f"Kendall tau-b, bootstrap 95% interval over the rules: [{low:.3f}, {high:.3f}]")
    lines += [f"Kendall tau-b (fp32 vs bf16): {kendall_tau(x, y):.3f}; top-10 overlap: "
             f"{top_overlap(both, x, y, 10)}/10; rules above 0.3 in fp32: {sum(v > 0.3 for v in x)}, "
             f"at chance (< 0.15): {sum(v < 0.15 for v in x)}"]
    working = [i for i, v in enumerate(x) if v > 0.15]
    lines.append(f"among the {len(working)} rules above 0.15 in fp32: Kendall tau-b "
                 f"{kendall_tau([x[i] for i in working], [y[i] for i in working]):.3f}")
    for variant, what in ((AVX2, "fp32 on AVX2 kernels (other rounding, same seed)"),
                          (SEED1, "fp32 at child seed 1 (other weights and minibatches)")):
        if all((t, variant) in scores for t in both):
            z = [scores[(t, variant)]["reward"] for t in both]
            low, high = bootstrap_tau(x, z)
            lines.append(f"fp32 vs {what}: Kendall tau-b {kendall_tau(x, z):.3f} (bootstrap 95% [{low:.3f}, "
                         f"{high:.3f}]), among the rules above 0.15: "
                         f"{kendall_tau([x[i] for i in working], [z[i] for i in working]):.3f}; top-10 overlap "
                         f"{top_overlap(both, x, z, 10)}/10; equal scores {sum(a == b for a, b in zip(x, z))}/{len(x)}")
    seconds = {p: sum(scores[(t, p)]["seconds"] for t in both) for p in ("fp32", "bf16")}
    lines.append(f"training seconds, all rules: fp32 {seconds['fp32']:.0f}, bf16 {seconds['bf16']:.0f} "
                 f"({seconds['fp32'] / max(seconds['bf16'], 1e-9):.2f}x)")
    lines.append("\n| rule | fp32 | bf16 | bf16 - fp32 | lr fp32 | lr bf16 |\n|---|---:|---:|---:|---:|---:|")
    order = sorted(both, key=lambda t: -scores[(t, "fp32")]["reward"])
    for t in order:
        a, b = scores[(t, "fp32")], scores[(t, "bf16")]
        lines.append(f"| `{t}` | {a['reward']:.4f} | {b['reward']:.4f} | {b['reward'] - a['reward']:+.4f} | "
                     f"{a['lr']} | {b['lr']} |")
    anchors = {}
    for name, text in ANCHORS.items():
        t = str(parse(text))
        if (t, "fp32") in scores and (t, "bf16") in scores:
            anchors[name] = (scores[(t, "fp32")]["reward"], scores[(t, "bf16")]["reward"])
    if len(anchors) == len(ANCHORS):
        by = {p: order_text({n: v[i] for n, v in anchors.items()}) for i, p in enumerate(("fp32", "bf16"))}
        same = by["fp32"] == by["bf16"]
        lines.append(f"\nSGD / Adam / PowerSign order: fp32 {by['fp32']}, bf16 {by['bf16']}"
                     f" ({'the same' if same else 'DIFFERENT'})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", type=int, default=40, help="rules to score (at least 30 for the issue's check)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--from-table", type=int, metavar="N", help="the anchors and N rules drawn from the shipped "
                    "NOS-Bench table instead (scores under OUT/table-sample/)")
    ap.add_argument("--seed-ceiling", action="store_true", help="also score every rule in fp32 at child seed 1 "
                    "(the reward's own seed-to-seed agreement)")
    ap.add_argument("--rounding-ceiling", action="store_true", help="also score every rule in fp32 with torch's "
                    "and oneDNN's kernels capped at AVX2 (the same training, rounded otherwise)")
    ap.add_argument("--report", action="store_true", help="print the table from the scores file only")
    a = ap.parse_args()
    shipped = None
    if a.from_table is not None:
        a.out = a.out / "table-sample"
        texts, shipped = table_sample(a.from_table)
    else:
        texts = rules(a.rules)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "scores.jsonl"
    scores = load(path)
    variants = ("fp32", "bf16", *((SEED1,) if a.seed_ceiling else ()), *((AVX2,) if a.rounding_ceiling else ()))
    todo = [(t, v) for t in texts for v in variants if (t, v) not in scores]
    if todo and not a.report:
        print(f"{len(todo)} scores to compute ({len(scores)} in {path}); {a.workers} workers", flush=True)
        t0, done = time.time(), 0
        envs = {json.dumps(VARIANTS[v][2], sort_keys=True) for _, v in todo}
        for env_json in sorted(envs):  # one pool per worker environment
            env, saved = json.loads(env_json), dict(os.environ)
            os.environ.update(env)  # spawned workers start with it
            try:
                # spawn: a forked child of a process that has started torch's thread pool can hang
                with ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn")) as pool, \
                        path.open("a") as f:
                    futures = [pool.submit(_score, t, v) for t, v in todo if VARIANTS[v][2] == env]
                    for fut in as_completed(futures):
                        if fut.exception() is not None:
                            pool.shutdown(wait=False, cancel_futures=True)
                            raise fut.exception()
                        row = fut.result()
                        f.write(json.dumps(row) + "\n")
                        f.flush()
                        scores[(row["rule"], row["precision"])] = row
                        done += 1
                        print(f"  {done}/{len(todo)} {row['precision']} {row['reward']:.4f} {row['rule']}", flush=True)
            finally:
                os.environ.clear()
                os.environ.update(saved)
        print(f"wall {time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}; {platform.machine()}")
    text = report(texts, scores, shipped)
    print(text)
    (a.out / "report.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
