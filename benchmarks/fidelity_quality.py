"""Does multi-fidelity scoring rank rules as the fixed protocol does, and at what cost? (issue 12)

Two studies, each resumable: every score is appended to a JSONL cache as soon as it is
computed (one line per rule and protocol), so a killed run continues where it stopped, and
the table is printed from the cache (``--report`` prints it without training anything).

``--part preset`` (choosing the "cpu" preset): ~30 deterministic rules (the 13 deterministic
rows of Table 1, then single-token mutants of Table 1 rules) scored under "fast" (the
reference, 65,000 child-images per rule) and under candidate CPU protocols; for each
candidate, Kendall tau-b and top-10 overlap with "fast", child-images per rule and seconds.

``--part quality`` (the default): ~200 rules -- Table 1 (SGD, Momentum, Adam, RMSProp and
the 16 discovered rules), single-token mutants of Table 1 rules, random rules of the "full"
space (depth 1 and 2, most of them deterministic), in a seeded shuffled order -- scored under
the fixed protocol of ``--preset`` (default "cpu") and under its multi-fidelity version:
successive halving over the rates (``schedule="halving"``, eta 3), then the final training
only for rules whose sweep accuracy reaches the hurdle. Reported: Kendall tau-b and top-10
overlap between the two rankings, and the mean child-images per rule of each.

How the multi-fidelity scores are obtained: for every rule this script runs the halving
sweep (``nos_gym.tasks.convnet.fidelity.run_sweep``, what the task runs) and, when the rate it picks
differs from the fixed protocol's, the final training at that rate (``run_final``); the
hurdle only decides whether that final training counts, so a rule's multi-fidelity score
under any hurdle is either its final-training accuracy (passed) or its sweep accuracy (not),
and its cost the sweep's images plus the final's when passed. That lets one pass score
every hurdle (fixed thresholds and the rolling quantile) exactly; ``--verify N`` re-scores N
rules end to end through ``ConvNetTask`` with the chosen hurdle and checks they agree.

The final hurdle (``Protocol.final_hurdle``/``final_rung``: the final training stops at a
checkpoint for rules whose validation accuracy there is below a fixed threshold). For every rule
with a sweep rate, the final training at the halving sweep's rate is run to each checkpoint of
``--final-rungs`` (images), validated there, and -- for rules whose sweep accuracy reaches the
lowest sweep hurdle reported -- resumed to the end, as ``run_final`` does; its end accuracy must
equal the cached final one exactly (checked, counted in the report). A variant (sweep hurdle,
checkpoint, final hurdle) is then composed from these parts like the sweep hurdle's. Both
thresholds come from the first ``--calibration`` rules only: the sweep hurdle a quantile of their
sweep accuracies, the final hurdle (``--final-quantiles``) a quantile of the checkpoint
accuracies of those of them that pass the sweep hurdle. Wall seconds are the halving sweep's
(cached) plus the final training's as the protocol runs it (measured here, one checkpoint
validation and the end's; the validation passes at the other checkpoints are measured and taken
out). ``--verify-final N`` scores N rules end to end through ``ConvNetTask`` with the first
variant and compares.

    python benchmarks/fidelity_quality.py --part preset                 # ~35 min on one core
    nohup python benchmarks/fidelity_quality.py > benchmarks/out/fidelity/quality.log 2>&1 &
    python benchmarks/fidelity_quality.py --report                      # the table from the cache
    python benchmarks/fidelity_quality.py --quantiles 0.5 0.75 0.85 0.9 \
        --final-rungs 1750 1000 3200 5300 --verify-final 10              # + final hurdle (~21 min)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nos_gym.tasks.convnet.fidelity import kendall_tau  # Kendall's tau-b

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_ROOT, format_seconds, machine, markdown_table  # noqa: E402

OUT = OUT_ROOT / "fidelity"

#: the CPU protocols measured against "fast" by ``--part preset`` (the chosen one became PRESETS["cpu"])
def _candidate(sweep: int, train: int, epochs: int, val: int = 2_000, **more: Any) -> dict[str, Any]:
    """fast's five rates with ``sweep`` sweep images, ``epochs`` of ``train`` at the best, batch 50."""
    return {"preset": "fast", "sweep_examples": sweep, "train_examples": train, "train_epochs": epochs,
            "val_examples": val, "batch_size": 50, **more}


CANDIDATES: dict[str, dict[str, Any]] = {
    "cpu-a": _candidate(2_000, 8_000, 2, val=1_000),  # 2 epochs of 8,000: 26,000 child-images
    "cpu-b": _candidate(2_000, 8_000, 2),  # the same with 2,000 validation images (less noisy)
    "cpu-c": _candidate(1_000, 10_000, 1),  # cheaper: one epoch of 10,000 (15,000)
    "cpu-f": _candidate(1_000, 16_000, 1),  # one pass over more distinct images (21,000)
    "cpu-g": _candidate(2_000, 20_000, 1),  # fast's first epoch, 400 steps of 50 (30,000)
    "cpu-h": _candidate(2_000, 12_000, 2),  # 2 epochs of 12,000, 480 steps (34,000)
    # cpu-f with other initial weights and minibatches: how much of the disagreement is seed noise
    "cpu-f-s1": _candidate(1_000, 16_000, 1, seed=1),
}


# ----------------------------------------------------------------------------- rules
def mutants(program, masker) -> list:
    """Every rule one token away from ``program`` that the masks of ``masker`` allow."""
    from nos_gym.dsl import Program

    vocab = masker.vocab
    ids = program.ids(vocab)
    out = []
    for i in range(len(ids)):
        for tok in np.flatnonzero(masker.mask(ids[:i])):
            if tok == ids[i]:
                continue
            new = ids[:i] + [int(tok)] + ids[i + 1:]
            if all(masker.mask(new[:j])[new[j]] for j in range(i + 1, len(new))):
                out.append(Program.from_ids(new, vocab))
    return out


def rule_set(n: int = 200, seed: int = 0) -> list[tuple[str, Any]]:
    """(origin, Program) for ``n`` distinct rules: Table 1, mutants of it, random rules; shuffled (seeded).

    Origins: "table1:NAME", "mutant:NAME", "random:d1"/"random:d2".
    """
    from nos_gym.dsl import Masker, get_space
    from nos_gym.optim import get_rule, table1

    rng = np.random.default_rng(seed)
    chosen: dict[str, tuple[str, Any]] = {}
    for name in table1():
        p = get_rule(name)
        chosen.setdefault(p.canonical_key, (f"table1:{name}", p))
    space = get_space("full")
    rest = max(0, n - len(chosen))
    n_mut = rest // 2
    pool = []
    for name in table1():
        p = get_rule(name)
        pool += [(f"mutant:{name}", q) for q in mutants(p, Masker(space, p.depth))]
    for i in rng.permutation(len(pool)):
        if sum(o.startswith("mutant") for o, _ in chosen.values()) >= n_mut:
            break
        origin, q = pool[int(i)]
        chosen.setdefault(q.canonical_key, (origin, q))
    n_rand = n - len(chosen)
    for depth, k in ((1, n_rand // 2), (2, n_rand - n_rand // 2)):
        masker = Masker(space, depth)
        det = masker.sample_many(4 * k, seed=rng, distinct=True, deterministic=True)
        sto = [q for q in masker.sample_many(8 * k, seed=rng, distinct=True) if q.stochastic]
        n_sto = k // 5  # one in five random rules draws random numbers
        added = 0
        for q in sto[:n_sto] + det:
            if added >= k:
                break
            if q.canonical_key not in chosen:
                chosen[q.canonical_key] = (f"random:d{depth}", q)
                added += 1
    items = list(chosen.values())[:n]
    order = rng.permutation(len(items))
    return [items[int(i)] for i in order]


def preset_rules(n: int = 30) -> list[tuple[str, Any]]:
    """The deterministic rules of Table 1, then deterministic mutants in ``rule_set`` order: ``n`` in all."""
    from nos_gym.optim import get_rule, table1

    out = [(f"table1:{name}", get_rule(name)) for name in table1() if not get_rule(name).stochastic]
    keys = {p.canonical_key for _, p in out}
    for origin, p in rule_set(200):
        if len(out) >= n:
            break
        if origin.startswith("mutant") and not p.stochastic and p.canonical_key not in keys:
            out.append((origin, p))
            keys.add(p.canonical_key)
    return out[:n]


# ----------------------------------------------------------------------------- cache
class Cache:
    """One JSON object per line: {"label", "key", ...}; the last line for (label, key) wins."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                self.rows[(row["label"], row["key"])] = row

    def get(self, label: str, key: str) -> dict[str, Any] | None:
        return self.rows.get((label, key))

    def put(self, row: dict[str, Any]) -> None:
        self.rows[(row["label"], row["key"])] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- ranks
def top_overlap(keys: Sequence[str], x: Sequence[float], y: Sequence[float], k: int = 10) -> int:
    """How many of the ``k`` best by ``x`` are among the ``k`` best by ``y`` (ties: the earlier rule)."""
    def top(v):
        return {keys[i] for i in sorted(range(len(keys)), key=lambda i: (-v[i], i))[:k]}
    return len(top(x) & top(y))


# ----------------------------------------------------------------------------- scoring
def make_task(protocol: dict[str, Any], data_dir: Path | None):
    from nos_gym.tasks.convnet import ConvNetTask

    return ConvNetTask(dict(protocol), data_dir=data_dir, device="cpu", precision="fp32")


def score_fixed(cache: Cache, label: str, task, items: Sequence[tuple[str, Any]], *, log: Callable[[str], None],
                deadline: float) -> None:
    """Score each rule with ``task`` (one rule per call: the CPU default), caching every score."""
    for i, (origin, p) in enumerate(items):
        if cache.get(label, p.canonical_key) is not None:
            continue
        if time.time() > deadline:
            log(f"{label}: time is up after {i} rules")
            return
        t0 = time.perf_counter()
        (r,) = task.evaluate([p])
        seconds = time.perf_counter() - t0
        cache.put({"label": label, "key": p.canonical_key, "rule": str(p), "tokens": list(p.tokens),
                   "origin": origin, "stochastic": p.stochastic, "reward": r.reward, "lr": r.metrics.get("lr"),
                   "child_images": r.metrics.get("child_images"), "seconds": seconds,
                   "protocol": task.protocol.to_dict()})
        log(f"{label} {i + 1}/{len(items)}  {r.reward:.4f}  lr={r.metrics.get('lr')}  {seconds:.1f}s  {p}")


# ----------------------------------------------------------------------------- part: preset
def part_preset(a: argparse.Namespace, log: Callable[[str], None]) -> list[str]:
    from nos_gym.tasks.convnet import PRESETS, Protocol

    cache = Cache(a.cache)
    items = preset_rules(a.rules)
    deadline = time.time() + a.minutes * 60
    labels = {"fast": PRESETS["fast"].to_dict(), **{k: Protocol.from_dict(v).to_dict() for k, v in CANDIDATES.items()}}
    if "cpu" in PRESETS:
        labels["cpu"] = PRESETS["cpu"].to_dict()
    if not a.report:
        for label, proto in labels.items():
            if a.only and label not in a.only:
                continue
            score_fixed(cache, label, make_task(proto, a.data_dir), items, log=log, deadline=deadline)
    keys = [p.canonical_key for _, p in items]
    ref = [cache.get("fast", k) for k in keys]
    lines = [f"preset agreement with 'fast' on {len(items)} deterministic rules "
             f"(13 of Table 1, the rest mutants of Table 1 rules)"]
    rows = []
    for label, proto in labels.items():
        got = [cache.get(label, k) for k in keys]
        both = [i for i in range(len(keys)) if got[i] is not None and ref[i] is not None]
        if not both:
            continue
        x = [ref[i]["reward"] for i in both]
        y = [got[i]["reward"] for i in both]
        learn = [j for j, i in enumerate(both) if ref[i]["reward"] > 0.2]
        same_lr = sum(got[i]["lr"] == ref[i]["lr"] for i in both)
        p = Protocol.from_dict(proto)
        rows.append([label, len(both), f"{kendall_tau(x, y):.3f}",
                     f"{kendall_tau([x[j] for j in learn], [y[j] for j in learn]):.3f}",
                     f"{top_overlap([keys[i] for i in both], x, y, 10)}/10", f"{top_overlap([keys[i] for i in both], x, y, 5)}/5",
                     f"{same_lr}/{len(both)}", f"{p.child_images:,}",
                     f"{np.mean([got[i]['seconds'] for i in both]):.1f}",
                     f"{np.mean(y):.3f}"])
    lines.append(markdown_table(["protocol", "rules", "tau-b", "tau-b (fast > 0.2)", "top-10", "top-5", "same lr",
                                 "child-images/rule", "s/rule", "mean reward"], rows))
    for label in labels:  # seed noise: a protocol against itself with another seed
        base = label[:-3] if label.endswith("-s1") else None
        if base in labels:
            both = [k for k in keys if cache.get(label, k) and cache.get(base, k)]
            x, y = [cache.get(base, k)["reward"] for k in both], [cache.get(label, k)["reward"] for k in both]
            lines.append(f"seed noise: {base} seed 0 vs seed 1 on {len(both)} rules: tau-b {kendall_tau(x, y):.3f}, "
                         f"top-10 {top_overlap(both, x, y, 10)}/10")
    lines.append("")
    lines += [f"  {label}: {json.dumps(proto)}" for label, proto in labels.items()]
    return lines


# ----------------------------------------------------------------------------- part: quality
def part_quality(a: argparse.Namespace, log: Callable[[str], None]) -> list[str]:
    from nos_gym.tasks.convnet import Protocol, fidelity

    cache = Cache(a.cache)
    items = rule_set(a.rules, seed=a.seed)
    fixed_proto = Protocol.preset(a.preset)
    mf_proto = Protocol.from_dict({**fixed_proto.to_dict(), "schedule": "halving", "eta": a.eta, "rungs": a.rungs})
    fixed_label = f"{a.preset}:fixed"
    mf_label = f"{a.preset}:halving-eta{a.eta}" + (f"-r{a.rungs}" if a.rungs else "")
    deadline = time.time() + a.minutes * 60
    if not a.report:
        fixed_task, mf_task = make_task(fixed_proto.to_dict(), a.data_dir), make_task(mf_proto.to_dict(), a.data_dir)
        for i, (origin, p) in enumerate(items):
            key = p.canonical_key
            if time.time() > deadline:
                log(f"time is up after {i} rules")
                break
            if cache.get(fixed_label, key) is None:
                score_fixed(cache, fixed_label, fixed_task, [(origin, p)], log=log, deadline=deadline)
            if cache.get(mf_label, key) is None:
                fixed = cache.get(fixed_label, key)
                t0 = time.perf_counter()
                (sweep,) = fidelity.run_sweep(mf_task, [p])
                row = {"label": mf_label, "key": key, "rule": str(p), "origin": origin, "stochastic": p.stochastic,
                       "sweep_accuracy": sweep.accuracy, "lr": sweep.lr, "sweep_images": sweep.child_images,
                       "sweep_seconds": time.perf_counter() - t0, "final": None, "final_images": 0,
                       "final_from": None, "protocol": mf_task.protocol.to_dict()}
                if sweep.lr is not None:
                    if sweep.lr == fixed["lr"]:
                        # the same rate: the final training is the fixed protocol's, from the same weights
                        # and minibatches (the fixed protocol's final accuracy is exactly what it gives)
                        row.update(final=fixed["reward"], final_from="fixed",
                                   final_images=fixed_proto.final_images)
                    else:
                        (fin,) = fidelity.run_final(mf_task, [p], [sweep.lr])
                        row.update(final=fin.reward, final_from="trained", final_images=fin.child_images)
                row["seconds"] = time.perf_counter() - t0
                cache.put(row)
                log(f"{mf_label} {i + 1}/{len(items)}  sweep {sweep.accuracy:.4f} lr={sweep.lr} "
                    f"(fixed lr={fixed['lr']})  final={row['final']}  {row['seconds']:.1f}s")
        if a.verify:
            verify(cache, items, mf_proto, fixed_label, mf_label, a, log)
        if a.timing:
            timing(cache, items, fixed_proto, mf_proto, a, log)
        if a.final_rungs:
            measure_final_rungs(cache, items, mf_task, mf_label, a, log, deadline)
            if a.verify_final:
                verify_final(cache, items, mf_proto, fixed_label, mf_label, a, log)
    lines = quality_report(cache, items, fixed_proto, mf_proto, fixed_label, mf_label, a)
    if a.final_rungs:
        lines += [""] + final_hurdle_report(cache, items, fixed_proto, mf_proto, fixed_label, mf_label, a)
    return lines


# ----------------------------------------------------------------------------- the final hurdle
def _sweep_hurdles(mf_rows: Sequence[dict[str, Any]], a: argparse.Namespace) -> list[tuple[float, float]]:
    """(quantile, threshold) of each sweep hurdle of the final-hurdle rows, from the first rules only."""
    acc = [m["sweep_accuracy"] if m["lr"] is not None else 0.0 for m in mf_rows]
    calib = acc[: a.calibration] if a.calibration else acc
    return [(q, float(np.quantile(calib, q))) for q in a.final_sweep_quantiles]


def measure_final_rungs(cache: Cache, items, mf_task, mf_label: str, a: argparse.Namespace,
                        log: Callable[[str], None], deadline: float) -> None:
    """The final training of each rule at its halving rate: validated at each checkpoint of
    ``a.final_rungs`` and (for rules that can pass a sweep hurdle) resumed to the end."""
    from nos_gym.tasks.convnet.fidelity import _common
    from nos_gym.tasks.convnet.grouped import evaluate_children, train_children

    p = mf_task.protocol
    label = f"{mf_label}:final-rungs"
    keys = [q.canonical_key for _, q in items]
    mf_rows = [cache.get(mf_label, k) for k in keys]
    if any(m is None for m in mf_rows):
        log("final rungs: score every rule's halving sweep first")
        return
    go_on = min(t for _, t in _sweep_hurdles(mf_rows, a))  # resume to the end from this sweep accuracy
    total = (p.train_examples // p.batch_size) * p.train_epochs
    stops = sorted({c // p.batch_size for c in a.final_rungs})
    if not stops or stops[0] < 1 or stops[-1] >= total:
        raise SystemExit(f"--final-rungs must lie within the final training's {total * p.batch_size} images")
    data = mf_task.data
    train, val = data.train.take(p.train_examples), data.val.take(p.val_examples)
    common = _common(mf_task)
    for i, ((_origin, prog), m) in enumerate(zip(items, mf_rows)):
        if m["lr"] is None or cache.get(label, prog.canonical_key) is not None:
            continue
        if time.time() > deadline:
            log(f"final rungs: time is up after {i} rules")
            return
        seeds = mf_task.stream_seeds([prog])
        group, start, rungs = None, 0, []
        for stop in stops:
            t0 = time.perf_counter()
            group = train_children([prog], [m["lr"]], train, val, epochs=p.train_epochs, steps=(start, stop),
                                   resume=None if group is None else group.select([0]),
                                   **({"stream_seeds": seeds} if group is None else {}), **common)
            dead = bool(group.diverged[0])
            rungs.append({"images": stop * p.batch_size, "trained": group.steps * p.batch_size,
                          "accuracy": None if dead else round(float(group.accuracy[0]), 6),
                          "seconds": time.perf_counter() - t0})
            start = stop
            if dead:
                break
        t0 = time.perf_counter()
        evaluate_children(group.net, val, p.batch_size, common["precision"])
        eval_seconds = time.perf_counter() - t0
        row = {"label": label, "key": prog.canonical_key, "rule": str(prog), "lr": m["lr"], "rungs": rungs,
               "eval_seconds": eval_seconds, "final": None, "rest_seconds": None, "rest_images": None,
               "matches_cached_final": None}
        if rungs[-1]["accuracy"] is not None and m["sweep_accuracy"] >= go_on:
            t0 = time.perf_counter()
            rest = train_children([prog], [m["lr"]], train, val, epochs=p.train_epochs, steps=(start, total),
                                  resume=group.select([0]), **common)
            final = 0.0 if bool(rest.diverged[0]) else float(rest.accuracy[0])
            row.update(final=final, rest_seconds=time.perf_counter() - t0, rest_images=rest.steps * p.batch_size,
                       matches_cached_final=final == m["final"])
        cache.put(row)
        log(f"final rungs {i + 1}/{len(items)}  " + " ".join(f"{r['images']}:{r['accuracy']}" for r in rungs)
            + f"  final {row['final']} (cached {m['final']})  {prog}")


def compose_final(f: dict[str, Any], m: dict[str, Any], fr: dict[str, Any] | None, sweep_thr: float,
                  rung: int, final_thr: float) -> tuple[float, int, str, float | None]:
    """A rule's (reward, child-images, fidelity, final-training wall seconds) under the halving sweep,
    a sweep hurdle, and a final hurdle at checkpoint ``rung`` (images)."""
    if m["lr"] is None:
        return 0.0, m["sweep_images"], "sweep", 0.0
    if m["sweep_accuracy"] < sweep_thr:
        return m["sweep_accuracy"], m["sweep_images"], "sweep", 0.0
    rungs = fr["rungs"]
    upto = [r for r in rungs if r["images"] <= rung]
    at = upto[-1]
    trained = sum(r["trained"] for r in upto)
    # the protocol validates once at the checkpoint: take out the passes at earlier checkpoints
    seconds = sum(r["seconds"] for r in upto) - (len(upto) - 1) * fr["eval_seconds"]
    if at["images"] < rung or at["accuracy"] is None:  # diverged before or at the checkpoint: 0, stopped
        return 0.0, m["sweep_images"] + trained, "final-rung", seconds
    if at["accuracy"] < final_thr:
        return at["accuracy"], m["sweep_images"] + trained, "final-rung", seconds
    if fr["final"] is None and rungs[-1]["accuracy"] is None:  # passed, then diverged: 0, as without the hurdle
        if m["final"] != 0.0:
            raise ValueError(f"{fr['rule']}: diverged after the checkpoint, but its cached final is {m['final']}")
        seconds = sum(r["seconds"] for r in rungs) - (len(rungs) - 1) * fr["eval_seconds"]
        return 0.0, m["sweep_images"] + sum(r["trained"] for r in rungs), "full", seconds
    if fr["final"] is None:
        raise ValueError(f"{fr['rule']}: not resumed to the end; lower --final-sweep-quantiles' minimum")
    seconds = sum(r["seconds"] for r in rungs) + fr["rest_seconds"] - (len(rungs) - 1) * fr["eval_seconds"]
    return fr["final"], m["sweep_images"] + m["final_images"], "full", seconds


def final_hurdle_report(cache: Cache, items, fixed_proto, mf_proto, fixed_label: str, mf_label: str,
                        a: argparse.Namespace) -> list[str]:
    label = f"{mf_label}:final-rungs"
    keys = [p.canonical_key for _, p in items]
    done = [i for i, k in enumerate(keys) if cache.get(fixed_label, k) and cache.get(mf_label, k)]
    fixed = [cache.get(fixed_label, keys[i]) for i in done]
    mf = [cache.get(mf_label, keys[i]) for i in done]
    fr = [cache.get(label, keys[i]) for i in done]
    missing = sum(m["lr"] is not None and r is None for m, r in zip(mf, fr))
    n = len(done)
    lines = [f"sweep hurdle + final hurdle (halving sweep; the final training validated at a checkpoint and "
             f"stopped there below the final hurdle): {n} rules"]
    if missing:
        return lines + [f"  {missing} rules still lack their final-training checkpoints (run without --report)"]
    ks = [keys[i] for i in done]
    fixed_reward = [r["reward"] for r in fixed]
    fixed_images = float(np.mean([r["child_images"] for r in fixed]))
    det = [j for j in range(n) if not fixed[j]["stochastic"]]
    resumed = [r for r in fr if r is not None and r["final"] is not None]
    same = sum(bool(r["matches_cached_final"]) for r in resumed)
    rows = []

    def plain_seconds(m, r):  # the final training as without a final hurdle: no checkpoint validation
        if r is None or r["final"] is None:
            return 0.0
        return sum(x["seconds"] for x in r["rungs"]) + r["rest_seconds"] - len(r["rungs"]) * r["eval_seconds"]

    for sq, sthr in _sweep_hurdles(mf, a):  # the sweep hurdle alone, timed the same way
        comp = [compose(f, m, m["lr"] is not None and m["sweep_accuracy"] >= sthr) for f, m in zip(fixed, mf)]
        reward = [c[0] for c in comp]
        images = float(np.mean([c[1] for c in comp]))
        seconds = float(np.mean([m["sweep_seconds"] + (plain_seconds(m, r) if c[2] == "full" else 0.0)
                                 for m, r, c in zip(mf, fr, comp)]))
        past = sum(c[2] == "full" for c in comp)
        rows.append([f"sweep {sthr:.3f} (q{sq:g}), no final hurdle",
                     f"{past}/{n}", f"{past}/{n}", f"{kendall_tau(fixed_reward, reward):.3f}",
                     f"{kendall_tau([fixed_reward[j] for j in det], [reward[j] for j in det]):.3f}",
                     f"{top_overlap(ks, fixed_reward, reward, 10)}/10", f"{images:,.0f}",
                     f"{100 * images / fixed_images:.1f}%", f"{seconds:.2f}"])
    for sq, sthr in _sweep_hurdles(mf, a):
        for rung in a.final_rungs:
            # the final hurdle: a quantile of the checkpoint accuracies of the first rules past the sweep hurdle
            first = [j for j in range(min(n, a.calibration or n)) if mf[j]["lr"] is not None
                     and mf[j]["sweep_accuracy"] >= sthr]
            calib = []
            for j in first:
                at = [r for r in fr[j]["rungs"] if r["images"] <= rung][-1]
                calib.append(at["accuracy"] if at["images"] == rung and at["accuracy"] is not None else 0.0)
            for fq in a.final_quantiles:
                fthr = float(np.quantile(calib, fq)) if calib else 0.0
                comp = [compose_final(f, m, r, sthr, rung, fthr) for f, m, r in zip(fixed, mf, fr)]
                reward = [c[0] for c in comp]
                images = float(np.mean([c[1] for c in comp]))
                full = sum(c[2] == "full" for c in comp)
                past_sweep = sum(m["lr"] is not None and m["sweep_accuracy"] >= sthr for m in mf)
                seconds = float(np.mean([m["sweep_seconds"] + c[3] for m, c in zip(mf, comp)]))
                rows.append([f"sweep {sthr:.3f} (q{sq:g}) + final {fthr:.3f} at {rung:,} (q{fq:g} of {len(calib)})",
                             f"{past_sweep}/{n}", f"{full}/{n}",
                             f"{kendall_tau(fixed_reward, reward):.3f}",
                             f"{kendall_tau([fixed_reward[j] for j in det], [reward[j] for j in det]):.3f}",
                             f"{top_overlap(ks, fixed_reward, reward, 10)}/10", f"{images:,.0f}",
                             f"{100 * images / fixed_images:.1f}%", f"{seconds:.2f}"])
    # halving only, timed the same way: every rule with a rate trained to the end, one validation
    no_hurdle = []
    for m, r in zip(mf, fr):
        t = m["sweep_seconds"]
        if r is not None and r["final"] is not None:
            t += sum(x["seconds"] for x in r["rungs"]) + r["rest_seconds"] - len(r["rungs"]) * r["eval_seconds"]
        no_hurdle.append(t)
    timed = [t for t, r in zip(no_hurdle, fr) if r is not None and r["final"] is not None]
    lines.append(markdown_table(["sweep hurdle + final hurdle at checkpoint (images)", "past the sweep",
                                 "final trained to the end", "tau-b all", "tau-b determ.", "top-10",
                                 "child-images/rule", "of fixed", "wall s/rule"], rows))
    evals = [r["eval_seconds"] for r in fr if r is not None]
    checks = [r for (lab, _), r in cache.rows.items() if lab == "verify-final"]
    lines += ["", f"resumed from the checkpoints to the end: {len(resumed)} rules, {same} of them with exactly the "
              f"cached final accuracy (the same trajectory as without the final hurdle)"]
    lines += [f"end to end through ConvNetTask (sweep hurdle, final hurdle, checkpoint images: "
              f"{', '.join(f'{float(x):.4g}' for x in r['key'].split(':'))}): {r['agree']}/"
              f"{r['of']} rules score exactly as composed (reward, fidelity, child-images)" for r in checks]
    lines += [
              f"one validation pass at a checkpoint ({fixed_proto.val_examples:,} images, not child-images): "
              f"{np.mean(evals):.2f} s on average; a rule past the sweep hurdle pays one, on top of the end's",
              f"wall s/rule: the halving sweep's seconds (cached) + the final training's as the protocol runs it "
              f"(measured in this run on a shared 2-core machine, one torch thread); the final training of a rule "
              f"trained to the end without checkpoint: {np.mean([r['rest_seconds'] + sum(x['seconds'] for x in r['rungs']) - len(r['rungs']) * r['eval_seconds'] for r in resumed]) if resumed else float('nan'):.2f} s "
              f"on average ({len(timed)} rules)",
              f"checkpoints measured: {a.final_rungs} images of {mf_proto.final_images:,} (the Protocol default, "
              f"final images / eta: {default_rung(mf_proto):,})"]
    return lines


def default_rung(p) -> int:
    from nos_gym.tasks.convnet import Protocol

    return Protocol.from_dict({**p.to_dict(), "final_hurdle": 0.5}).final_rung_images


def verify_final(cache: Cache, items, mf_proto, fixed_label: str, mf_label: str, a: argparse.Namespace,
                 log: Callable[[str], None]) -> None:
    """Score ``a.verify_final`` rules end to end through ConvNetTask with the first final-hurdle variant
    (its thresholds from the first rules, as in the report) and compare with the composed scores."""
    from nos_gym.tasks.convnet import Protocol

    label = f"{mf_label}:final-rungs"
    keys = [p.canonical_key for _, p in items]
    mf = [cache.get(mf_label, k) for k in keys]
    fr = [cache.get(label, k) for k in keys]
    (_, sthr), rung = _sweep_hurdles(mf, a)[0], a.final_rungs[0]
    first = [j for j in range(a.calibration) if mf[j]["lr"] is not None and mf[j]["sweep_accuracy"] >= sthr]
    calib = []
    for j in first:
        at = [r for r in fr[j]["rungs"] if r["images"] <= rung][-1]
        calib.append(at["accuracy"] if at["images"] == rung and at["accuracy"] is not None else 0.0)
    fthr = float(np.quantile(calib, a.final_quantiles[0]))
    proto = Protocol.from_dict({**mf_proto.to_dict(), "hurdle": sthr, "final_hurdle": fthr, "final_rung": rung})
    task = make_task(proto.to_dict(), a.data_dir)
    # the rules that reach the checkpoint first (the others are the sweep hurdle's, verified by --verify)
    picked = [j for j in range(len(items)) if mf[j]["lr"] is not None and mf[j]["sweep_accuracy"] >= sthr]
    picked = picked[: a.verify_final]
    agree = 0
    for j in picked:
        _, p = items[j]
        (r,) = task.evaluate([p])
        want, images, fid, _ = compose_final(cache.get(fixed_label, keys[j]), mf[j], fr[j], sthr, rung, fthr)
        ok = r.reward == want and r.metrics["fidelity"] == fid and r.metrics["child_images"] == images
        agree += ok
        log(f"verify final {'ok ' if ok else 'DIFF'} task {r.reward:.4f} {r.metrics['fidelity']} "
            f"{r.metrics['child_images']}  composed {want:.4f} {fid} {images}  {p}")
    log(f"verify final: {agree}/{len(picked)} end-to-end scores agree with the composed ones "
        f"(sweep hurdle {sthr:.4f}, final hurdle {fthr:.4f} at {rung} images)")
    cache.put({"label": "verify-final", "key": f"{sthr}:{fthr}:{rung}", "agree": agree, "of": len(picked)})


def timing(cache: Cache, items, fixed_proto, mf_proto, a: argparse.Namespace, log: Callable[[str], None]) -> None:
    """Wall seconds of each stage on the first ``a.timing`` rules: the fixed sweep, the halving sweep,
    the final training (child-images leave out the validation passes, which each rung adds)."""
    from nos_gym.tasks.convnet import fidelity

    fixed_task, mf_task = make_task(fixed_proto.to_dict(), a.data_dir), make_task(mf_proto.to_dict(), a.data_dir)
    fixed_task.data  # noqa: B018  (a property: load before timing)
    for _, p in items[: a.timing]:
        if cache.get("timing", p.canonical_key):
            continue
        t0 = time.perf_counter()
        (fs,) = fidelity.run_sweep(fixed_task, [p])
        t1 = time.perf_counter()
        (hs,) = fidelity.run_sweep(mf_task, [p])
        t2 = time.perf_counter()
        final = None
        if hs.lr is not None:
            fidelity.run_final(mf_task, [p], [hs.lr])
            final = time.perf_counter() - t2
        cache.put({"label": "timing", "key": p.canonical_key, "rule": str(p), "fixed_sweep": t1 - t0,
                   "halving_sweep": t2 - t1, "final": final})
        log(f"timing: fixed sweep {t1 - t0:.1f}s, halving sweep {t2 - t1:.1f}s, final {final}  {p}")


def compose(fixed: dict[str, Any], mf: dict[str, Any], passed: bool) -> tuple[float, int, str]:
    """A rule's multi-fidelity (reward, child-images, fidelity) from its cached sweep/final parts."""
    if mf["lr"] is None:  # diverged at every rate: 0, decided by the sweep
        return 0.0, mf["sweep_images"], "sweep"
    if passed:
        return mf["final"], mf["sweep_images"] + mf["final_images"], "full"
    return mf["sweep_accuracy"], mf["sweep_images"], "sweep"


def hurdle_outcomes(rows: Sequence[dict[str, Any]], mode: str, value: float, warmup: int) -> list[bool]:
    """Whether each rule (in scoring order) passes: mode "fixed" (sweep accuracy >= value) or
    "quantile" (>= the ``value`` quantile of the sweep accuracies of the rules before it,
    everyone passing during the first ``warmup`` rules), as ``nos_gym.tasks.convnet.fidelity.Hurdle``."""
    from nos_gym.tasks.convnet.fidelity import Hurdle

    h = Hurdle(threshold=value if mode == "fixed" else None, quantile=value if mode == "quantile" else None,
               warmup=warmup)
    out = []
    for r in rows:
        acc = r["sweep_accuracy"] if r["lr"] is not None else 0.0
        out.append(h.passes(acc))
        h.observe(acc)
    return out


def quality_report(cache: Cache, items, fixed_proto, mf_proto, fixed_label: str, mf_label: str,
                   a: argparse.Namespace) -> list[str]:
    keys = [p.canonical_key for _, p in items]
    done = [i for i, k in enumerate(keys) if cache.get(fixed_label, k) and cache.get(mf_label, k)]
    fixed = [cache.get(fixed_label, keys[i]) for i in done]
    mf = [cache.get(mf_label, keys[i]) for i in done]
    n = len(done)
    lines = [f"{n} of {len(items)} rules scored under both protocols of preset {a.preset!r} "
             f"(fixed: {fixed_proto.child_images:,} child-images per rule)",
             f"  fixed:          {json.dumps(fixed_proto.to_dict())}",
             f"  multi-fidelity: {json.dumps(mf_proto.to_dict())}  + the hurdle of each row", ""]
    if n < 2:
        return lines
    fixed_reward = [r["reward"] for r in fixed]
    fixed_images = float(np.mean([r["child_images"] for r in fixed]))
    fixed_seconds = float(np.mean([r["seconds"] for r in fixed]))
    det = [j for j in range(n) if not fixed[j]["stochastic"]]
    learn = [j for j in range(n) if fixed[j]["reward"] > 0.2]
    same_lr = sum(m["lr"] == f["lr"] for m, f in zip(mf, fixed))
    sweep_acc = [m["sweep_accuracy"] if m["lr"] is not None else 0.0 for m in mf]
    untrained = 0.1
    variants: list[tuple[str, str, float, int]] = [("none (halving only)", "fixed", -1.0, 0)]
    for q in a.quantiles:
        thr = float(np.quantile(sweep_acc[: a.calibration] if a.calibration else sweep_acc, q))
        variants.append((f"fixed {thr:.3f} (q{q:g} of the first {a.calibration or n})", "fixed", thr, 0))
    for q in a.quantiles:
        variants.append((f"rolling q{q:g}, warm-up {a.warmup}", "quantile", q, a.warmup))
    rows = []
    for name, mode, value, warmup in variants:
        passed = hurdle_outcomes(mf, mode, value, warmup)
        comp = [compose(f, m, ok) for f, m, ok in zip(fixed, mf, passed)]
        reward = [c[0] for c in comp]
        images = float(np.mean([c[1] for c in comp]))
        ks = [keys[i] for i in done]

        def tau(sub, reward=reward):
            return kendall_tau([fixed_reward[j] for j in sub], [reward[j] for j in sub])

        rows.append([name, f"{sum(passed)}/{n}", f"{tau(range(n)):.3f}", f"{tau(det):.3f}", f"{tau(learn):.3f}",
                     f"{top_overlap(ks, fixed_reward, reward, 10)}/10",
                     f"{top_overlap([ks[j] for j in det], [fixed_reward[j] for j in det], [reward[j] for j in det], 10)}/10",
                     f"{images:,.0f}", f"{100 * images / fixed_images:.1f}%"])
    lines.append(markdown_table(["hurdle", "final trained", "tau-b all", "tau-b determ.", "tau-b fixed>0.2",
                                 "top-10", "top-10 determ.", "child-images/rule", "of fixed"], rows))
    lines += ["", f"fixed protocol: {fixed_images:,.0f} child-images per rule, {fixed_seconds:.1f} s per rule; "
              f"{len(det)} deterministic rules, {len(learn)} with fixed reward > 0.2 (chance {untrained})",
              f"halving sweep: {np.mean([m['sweep_images'] for m in mf]):,.0f} child-images per rule "
              f"(the fixed sweep: {fixed_proto.child_images - fixed_proto.final_images:,}); it picked the fixed "
              f"protocol's rate for {same_lr}/{n} rules; sweep seconds per rule "
              f"{np.mean([m['sweep_seconds'] for m in mf]):.1f}",
              f"sweep accuracy vs fixed reward: tau-b {kendall_tau(fixed_reward, sweep_acc):.3f}"]
    timed = [cache.get("timing", keys[i]) for i in done if cache.get("timing", keys[i])]
    if timed:
        finals = [t["final"] for t in timed if t["final"] is not None]
        lines.append(f"wall seconds on {len(timed)} rules (one core, shared machine): fixed sweep "
                     f"{np.mean([t['fixed_sweep'] for t in timed]):.2f}, halving sweep "
                     f"{np.mean([t['halving_sweep'] for t in timed]):.2f}, final training "
                     f"{np.mean(finals) if finals else float('nan'):.2f} (validation passes are not child-images: "
                     f"each rung evaluates its children)")
    origins: dict[str, list[int]] = {}
    for j, r in enumerate(fixed):
        origins.setdefault(r["origin"].split(":")[0], []).append(j)
    lines.append("rules by origin: " + ", ".join(
        f"{o} {len(js)} (mean fixed reward {np.mean([fixed_reward[j] for j in js]):.3f})" for o, js in origins.items()))
    ranked = sorted(range(n), key=lambda j: (-fixed_reward[j], j))[:10]
    lines += ["", "top 10 under the fixed protocol:"]
    lines += [f"  {fixed_reward[j]:.4f}  sweep {sweep_acc[j]:.4f}  {fixed[j]['rule']}" for j in ranked]
    return lines


def verify(cache: Cache, items, mf_proto, fixed_label: str, mf_label: str, a: argparse.Namespace,
           log: Callable[[str], None]) -> None:
    """Score the first ``a.verify`` rules end to end through ConvNetTask with a fixed hurdle; compare."""
    from nos_gym.tasks.convnet import Protocol

    rows = [(p, cache.get(mf_label, p.canonical_key), cache.get(fixed_label, p.canonical_key)) for _, p in items]
    rows = [r for r in rows if r[1] is not None][: a.verify]
    accs = sorted(r[1]["sweep_accuracy"] for r in rows if r[1]["lr"] is not None)
    thr = accs[len(accs) // 2] if accs else 0.5  # half pass, half do not
    task = make_task(Protocol.from_dict({**mf_proto.to_dict(), "hurdle": thr}).to_dict(), a.data_dir)
    agree = 0
    for p, m, f in rows:
        (r,) = task.evaluate([p])
        want, images, fid = compose(f, m, m["lr"] is not None and m["sweep_accuracy"] >= thr)
        ok = abs(r.reward - want) < 1e-9 and r.metrics["fidelity"] == fid and r.metrics["child_images"] == images
        agree += ok
        log(f"verify {'ok ' if ok else 'DIFF'} task {r.reward:.4f} {r.metrics['fidelity']} {r.metrics['child_images']}"
            f"  composed {want:.4f} {fid} {images}  {p}")
    log(f"verify: {agree}/{len(rows)} end-to-end scores agree with the composed ones (hurdle {thr:.4f})")


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["quality", "preset"], default="quality")
    ap.add_argument("--rules", type=int, default=None, help="rules to score (quality: 200, preset: 30)")
    ap.add_argument("--preset", default="cpu", help="quality: the preset whose fixed and multi-fidelity forms are compared")
    ap.add_argument("--eta", type=int, default=3, help="quality: successive halving's eta")
    ap.add_argument("--rungs", type=int, default=None, help="quality: successive halving's rungs (default: auto)")
    ap.add_argument("--quantiles", type=float, nargs="+", default=[0.5, 0.75],
                    help="quality: hurdles to report, as quantiles of the sweep accuracies")
    ap.add_argument("--calibration", type=int, default=50,
                    help="quality: a fixed hurdle is the quantile of the sweep accuracies of the first N rules "
                         "(0: all)")
    ap.add_argument("--warmup", type=int, default=20, help="quality: the rolling hurdle's warm-up (rules)")
    ap.add_argument("--verify", type=int, default=0, help="quality: re-score N rules end to end and compare")
    ap.add_argument("--timing", type=int, default=0, help="quality: time the stages on N rules (wall seconds)")
    ap.add_argument("--final-rungs", type=int, nargs="*", default=[],
                    help="quality: final-hurdle checkpoints to measure (images of the final training), e.g. "
                         "1000 1750 3200 5300; none: no final-hurdle rows")
    ap.add_argument("--final-quantiles", type=float, nargs="+", default=[0.5, 0.75],
                    help="quality: final hurdles, as quantiles of the checkpoint accuracies of the first "
                         "--calibration rules past the sweep hurdle")
    ap.add_argument("--final-sweep-quantiles", type=float, nargs="+", default=[0.75, 0.5],
                    help="quality: the sweep hurdles (quantiles of the first rules' sweep accuracies) of the "
                         "final-hurdle rows; rules from the lowest on are trained to the end")
    ap.add_argument("--verify-final", type=int, default=0,
                    help="quality: score N rules end to end with the first final-hurdle variant and compare")
    ap.add_argument("--seed", type=int, default=0, help="the rule set's seed")
    ap.add_argument("--only", nargs="*", default=None, help="preset: score these labels only")
    ap.add_argument("--minutes", type=float, default=600.0, help="stop starting new rules after this long")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--data-dir", type=Path, default=None, help="where CIFAR-10 is (default: searched)")
    ap.add_argument("--cache", type=Path, default=None, help="the JSONL cache (default benchmarks/out/fidelity/PART.jsonl)")
    ap.add_argument("--report", action="store_true", help="print the table from the cache; train nothing")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    a.rules = a.rules or (30 if a.part == "preset" else 200)
    a.cache = a.cache or OUT / f"{a.part}.jsonl"
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{format_seconds(time.perf_counter() - t0)}] {msg}", flush=True)

    lines = (part_preset if a.part == "preset" else part_quality)(a, log)
    lines += ["", f"machine: {machine('cpu')}; this invocation took {format_seconds(time.perf_counter() - t0)}; "
                  f"cache {a.cache}"]
    text = "\n".join(lines)
    print(text)
    (OUT / f"{a.part}.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
