"""Promotion: re-score the best rules of a run (or a store) at a higher fidelity.

A search on a cheap reward (the "cpu" preset, a hurdle) ranks rules noisily; the paper
likewise re-trained its best rules on a bigger protocol (the Wide ResNet) before naming
winners. Promotion takes the ``top`` distinct rules, scores them with the same task at
another protocol (``preset``, e.g. "fast"), and writes the re-ranked leaderboard as
``promoted-LABEL.txt`` / ``.json``. The new scores go into the store under the new task's
fingerprint, so promoting again re-uses them.

Used by ``nos-gym promote`` and, with the run setting ``promote: {preset: fast, top: 10}``,
by every agent at the end of its run (``nos_gym.agents.runs.promote_run``). This module knows
tasks, the evaluator and the store, not runs or agents (they import it, not the reverse).

>>> board = promote(candidates, "convnet-cifar10", {"preset": "fast"}, title="...", source="...")
>>> print(board.text())
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Leaderboard", "PROMOTE_KEYS", "PromotionError", "promote", "promote_store", "promotion_label",
           "promotion_options"]

#: the keys of the run setting ``promote`` (an empty mapping: no promotion)
PROMOTE_KEYS = ("preset", "top", "seeds", "task_options", "backend")


class PromotionError(ValueError):
    """Nothing to promote, or a task that rejects the promotion's options (the command line prints it
    as one line and exits 2, like a ``ConfigError``)."""


@dataclass
class Leaderboard:
    """The promoted rules, best first: each row has rank, reward, previous_reward, previous_rank, rule,
    key, tokens, lr, fidelity, child_images, source, error, cached."""

    title: str
    source: str
    task: str
    options: dict[str, Any]
    fingerprint: str
    config: dict[str, Any]
    kendall_tau: float | None
    rows: list[dict[str, Any]]
    store: str | None = None
    """the store the new scores went to (None: none)"""
    saved: list[Path] = dataclasses.field(default_factory=list)
    """the files ``save`` wrote"""
    run_samples: int | None = None
    """a run's promotion: the rules the run had sampled"""
    seeds: list[int] = dataclasses.field(default_factory=list)
    """the task seeds each rule was scored with, its reward their mean ([]: the options' own seed)"""

    def text(self) -> str:
        tau = self.kendall_tau
        seeds = f", the mean over task seeds {self.seeds}" if self.seeds else ""
        lines = [self.title, f"promoted to {self.task} {self.options}{seeds} ({self.fingerprint})",
                 f"rank agreement with the previous scores (Kendall tau-b): "
                 f"{'-' if tau is None or tau != tau else f'{tau:.3f}'}",
                 f"{'rank':>4}  {'reward':>7}  {'sd' if self.seeds else '':>6}  {'was':>7}  {'rank':>4}  {'lr':>7}  rule"]
        for d in self.rows:
            lr = "-" if d["lr"] is None else f"{d['lr']:g}"
            sd = f"{d['seed_sd']:.4f}" if self.seeds else ""
            lines.append(f"{d['rank']:>4}  {d['reward']:>7.4f}  {sd:>6}  {d['previous_reward']:>7.4f}  "
                         f"{d['previous_rank']:>4}  {lr:>7}  {d['rule']}{'  error: ' + d['error'] if d['error'] else ''}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "task": self.task, "options": self.options, "fingerprint": self.fingerprint,
                "config": self.config, "kendall_tau": self.kendall_tau, "run_samples": self.run_samples,
                "seeds": self.seeds,
                "rules": self.rows}

    def save(self, out_dir: str | os.PathLike, label: str, stem: str = "") -> list[Path]:
        """Write ``{stem}promoted-{label}.txt`` and ``.json`` into ``out_dir``, each atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        saved = []
        for suffix, data in ((".txt", self.text() + "\n"),
                             (".json", json.dumps(self.to_json(), indent=1, default=str) + "\n")):
            target = out / f"{stem}promoted-{label}{suffix}"
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(data)
            os.replace(tmp, target)
            saved.append(target)
        self.saved = saved
        return saved


def _make(task: str, options: Mapping[str, Any]):
    """The task, or a PromotionError naming the options it rejects."""
    from nos_gym.tasks import available, make

    if task not in available():
        raise PromotionError(f"unknown task {task!r}; allowed values: {available()}")
    try:
        return make(task, **options)
    except (TypeError, ValueError) as e:  # the task's own check: a bad option name or value
        raise PromotionError(f"task {task!r} rejects the options {dict(options)!r}: "
                             f"{' '.join(str(e).split())}") from None


def promotion_options(task: str, base: Mapping[str, Any], preset: str | None,
                      overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The task options to promote with: ``base`` (the run's own), its protocol replaced by ``preset``
    (a convnet run's protocol fields, halving and hurdle included, go with its preset), then ``overrides``."""
    options = dict(base)
    if preset is not None:
        options.pop("preset", None)
        if task == "convnet-cifar10":
            from nos_gym.tasks.convnet import Protocol

            for f in dataclasses.fields(Protocol):
                options.pop(f.name, None)
        options["preset"] = preset
    options.update(overrides or {})
    return options


def promotion_label(preset: str | None, seeds: Sequence[int] = ()) -> str:
    """The LABEL of promoted-LABEL.txt/.json: the preset ("custom" without one), then the seeds."""
    return (preset or "custom") + (f"-seeds{'-'.join(str(s) for s in seeds)}" if seeds else "")


def promote(candidates: Sequence[Mapping[str, Any]], task: str, options: Mapping[str, Any], *, title: str,
            source: str, seeds: Sequence[int] = (), store: str | None = None, backend: str = "auto",
            quiet: bool = False) -> Leaderboard:
    """Score ``candidates`` (dicts with rule, key, tokens, reward; best first) on ``task`` with ``options``
    as one batch, and rank them by the new reward (ties: the previous rank).

    ``seeds``: score each rule once per task seed (the child's initial weights and minibatch order)
    and rank by the mean -- one child seed cannot separate rules closer than its seed-to-seed
    spread (about 1.5 points of accuracy on "fast"); each row then has ``rewards`` and ``seed_sd``.
    """
    from nos_gym.dsl import Program
    from nos_gym.evaluation import Evaluator
    from nos_gym.tasks.convnet.fidelity import kendall_tau

    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise PromotionError(f"seeds must be distinct, got {seeds}")
    settings = [{**options, "seed": s} for s in seeds] or [dict(options)]
    scorers = [_make(task, o) for o in settings]  # bad options fail here, before anything is trained
    if not candidates:
        raise PromotionError(f"{source} holds no scored rules to promote")
    programs = [Program(tuple(d["tokens"])) for d in candidates]
    if store:
        Path(store).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    runs, fingerprints = [], []
    for o, scorer in zip(settings, scorers):
        if not quiet:
            print(f"re-scoring {len(programs)} rules on {task} {o} ...", file=sys.stderr, flush=True)
        with Evaluator(scorer, backend=backend, store=store or None) as ev:
            runs.append(ev.evaluate(programs))
            fingerprints.append(ev.fingerprint)
    config = scorers[0].config()
    rows = []
    for old_rank, d in enumerate(candidates, 1):
        results = [run[old_rank - 1] for run in runs]
        r, m = results[0], results[0].metrics
        rewards = [x.reward for x in results]
        rows.append({"reward": float(sum(rewards) / len(rewards)), "previous_reward": d["reward"],
                     "previous_rank": old_rank, "rule": d["rule"], "key": d["key"], "tokens": list(d["tokens"]),
                     "lr": m.get("lr"), "fidelity": m.get("fidelity"),
                     "child_images": sum(x.metrics.get("child_images") or 0 for x in results) or None,
                     "source": getattr(r, "source", None), "error": next((x.error for x in results if x.error), None),
                     "cached": all(x.cached for x in results)})
        if seeds:
            mean = rows[-1]["reward"]
            rows[-1].update(rewards=rewards, lrs=[x.metrics.get("lr") for x in results],
                            seed_sd=(sum((x - mean) ** 2 for x in rewards) / max(1, len(rewards) - 1)) ** 0.5)
    rows.sort(key=lambda d: (-d["reward"], d["previous_rank"]))
    for i, d in enumerate(rows, 1):
        d["rank"] = i
    tau = kendall_tau([d["previous_reward"] for d in rows], [d["reward"] for d in rows]) if len(rows) > 1 else None
    return Leaderboard(title, source, task, dict(options), ", ".join(fingerprints), config, tau, rows,
                       store=store or None, seeds=seeds)


def promote_store(store_path: str | os.PathLike, *, preset: str | None, top: int = 10, task: str | None = None,
                  task_options: Mapping[str, Any] | None = None, seeds: Sequence[int] = (),
                  source_task: str | None = None,
                  store: str | None = None, backend: str = "auto", out: str | os.PathLike | None = None,
                  quiet: bool = False) -> Leaderboard:
    """Promote the best ``top`` rules a store holds for one task setup (``source_task``: its name or
    fingerprint; default: the only setup of ``task``) and save ``STORE-promoted-LABEL.txt/.json``."""
    from nos_gym.store import Store

    path = Path(store_path)
    task_name = task or "convnet-cifar10"
    options = promotion_options(task_name, {}, preset, task_options)
    new_fingerprints = {_make(task_name, {**options, **({"seed": x} if seeds else {})}).fingerprint
                        for x in (seeds or [None])}
    with Store(path, readonly=True) as held:  # the new setup's own scores are never candidates
        tasks = held.tasks()
        fps = sorted({r.fingerprint for r in held.records(status="ok")} - new_fingerprints)
        wanted = source_task or task_name
        fps = [f for f in fps if f == wanted or tasks.get(f, {}).get("name") == wanted]
        if len(fps) > 1:
            raise PromotionError(f"{path} holds scores of {len(fps)} {wanted} setups; pick one with --from "
                                f"FINGERPRINT: {', '.join(fps)}")
        records = held.records(fps[0], status="ok") if fps else []  # best first
    candidates = [{"rule": r.program, "key": r.key, "tokens": list(r.tokens), "reward": r.reward}
                  for r in records[:top]]
    title = f"{path}: the best {len(candidates)} of {len(records)} rules scored under {fps[0] if fps else '-'}"
    board = promote(candidates, task_name, options, title=title, source=str(path), seeds=seeds,
                    store=str(path) if store is None else store, backend=backend, quiet=quiet)
    board.save(out if out is not None else path.parent, promotion_label(preset, seeds), stem=f"{path.stem}-")
    return board
