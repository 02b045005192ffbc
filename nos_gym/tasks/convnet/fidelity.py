"""Multi-fidelity scoring for the convnet task: successive halving over the rate sweep and a
hurdle before the final training (issue 12). Chosen by ``Protocol`` fields, all off by default.

Successive halving (``schedule="halving"``, ``eta``, ``rungs``). The fixed sweep trains each
of a rule's ``n`` rates for the whole sweep (``S`` minibatches), ``n * S`` in all. Halving
trains all ``n`` rates for ``S / eta^(K-1)`` minibatches, keeps the best ``ceil(n / eta)`` of
each rule (ties: the smaller rate; diverged rates never), trains those on to
``S / eta^(K-2)``, ... and the last of the ``K`` rungs ends at ``S``: rung ``k`` keeps
``ceil(n / eta^k)`` rates and trains them to ``ceil(S / eta^(K-1-k))`` minibatches. A kept rate
is trained further from where it stopped (weights, batch-norm statistics, rule state;
``train_children(resume=...)``) on the next minibatches of the same order, so a rate that
reaches the last rung ends exactly where the fixed sweep's child at that rate ends: the
halving sweep picks the fixed protocol's rate whenever the best rate survives the early rungs,
and the final training (from the initial weights, at that rate) is then the fixed protocol's,
with the same reward. Each rung trains all its children -- every rule of the group, each with
its kept rates -- as one grouped network. With the defaults (``rungs=None``) the rungs stop
while at least 2 rates remain: 5 rates, eta 3 give rungs of 5 rates for S/3 and 2 rates for
S, 3S minibatches instead of 5S; 7 rates give 7 for S/3 and 3 for S (13S/3 instead of 7S).
More rungs make the first ones a few minibatches long, which favours rates that start fast,
so ``rungs`` above the default needs a longer sweep (measured in docs/results.md,
"Successive halving's rungs and the sweep hurdle").

The hurdle (``hurdle``, or ``hurdle_quantile`` with ``hurdle_warmup``). The final training
dominates the cost (5 x 45,000 of the paper's 295,000 child-images), so most of the saving
must come from not giving it to rules that will not win. A rule whose best sweep accuracy is
below the hurdle is not trained further: it scores its sweep accuracy, and its metrics say so
(``fidelity: "sweep"``, ``hurdled: True``, ``hurdle``: the threshold). Its score is a lower
fidelity one that ``nos-gym promote`` re-scores at a higher fidelity later, as the paper
re-trained its best rules before the Wide ResNet.

Reproducibility: the environment's contract is that a score depends only on the task
(its fingerprint) and the rule, never on the batch or the order it came in (scores are cached
and stored by that key). AutoML-Zero's hurdle is a rolling quantile of the fitnesses seen so
far: order-dependent by construction, and with several worker processes each would hold its
own history. We resolve it this way:

- ``hurdle`` (the default way): a fixed accuracy, part of the protocol and so of the
  fingerprint. A score is then a function of (task, rule): the same on every backend,
  worker count, batch order and resume. The number is calibrated once per preset from a
  quantile of the sweep accuracies of a reference rule set (``benchmarks/fidelity_quality.py``
  measures it and what it costs in rank agreement; the "cpu" preset's value, 0.277, and its
  cost are in docs/convnet.md and docs/results.md). As the searcher improves, more rules pass
  and the saving shrinks, but no score changes. A hurdle set too high cuts Adam-like rules
  first, as their sweep accuracy trails their final one.
- ``hurdle_quantile`` (opt-in): AutoML-Zero's rolling quantile, after ``hurdle_warmup`` rules
  let through. The history lives in the task object, so with the process backend every worker
  keeps its own (each sees an interleaved share of the same stream, so their quantiles
  estimate the same thing; sharing them would make a score depend on worker timing as well,
  which is worse, so they are not shared). Such a score depends on what was scored before;
  every result records the threshold it met (``metrics["hurdle"]``), the rolling setting
  changes the fingerprint, and ``nos-gym promote`` re-scores the leaders at a fixed
  fidelity, so nothing order-dependent reaches a final leaderboard.

Both kinds never change a score that had the final training: a rule that passes scores what
the fixed protocol with the same rate gives. Hurdled and full scores share one scale
(validation accuracy); a hurdled score is lower than the same rule would get from the final
training in practice, which is what makes a hurdle rank-preserving at the top.

The final hurdle (``final_hurdle``, ``final_rung``): successive halving of the final training,
per rule, with a fixed threshold. The final training of a group stops at a checkpoint
(``Protocol.final_rung_images``, by default the final training's images over ``eta``) and
validates; a rule below ``final_hurdle`` there (or diverged) stops and scores that accuracy
(``fidelity: "final-rung"``, ``final_hurdled: True``; ``child_images`` counts the sweep and the
images to the checkpoint). The others train on from the checkpoint (``train_children(resume=
group.select(rows))``): the same weights, batch-norm statistics, rule state and minibatch order,
so with one rule per group (the CPU default) a survivor scores exactly what it scores without
the final hurdle; in a larger group the survivors go on as a smaller group, which changes scores
only by float rounding, as grouping does. The threshold is a fixed number, so a score depends on
the task and the rule only. Results of rules that reached the final training carry
``final_rung_accuracy``; all carry ``final_hurdle`` and ``final_rung_images``. Validating at the
checkpoint costs a validation pass (not child-images, but wall time):
``benchmarks/fidelity_quality.py --final-rungs`` measures both. An early checkpoint favours
rules that start fast over slow starters such as the sign rules; the "cpu" preset's
thresholds and what they cost in ranking are in docs/convnet.md ("What multi-fidelity buys").

``metrics["child_images"]`` is what a rule actually cost (rungs it reached, final training
or not); ``metrics["rungs"]`` lists each rung's rates and accuracies.
"""

from __future__ import annotations

import bisect
import math
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nos_gym.dsl import Program
from nos_gym.tasks.base import Result
from nos_gym.tasks.convnet.grouped import train_children
from nos_gym.tasks.convnet.protocol import Protocol, rung_plan

__all__ = ["FidelityTask", "Final", "Hurdle", "Sweep", "evaluate_group", "kendall_tau", "run_final", "run_sweep"]


class FidelityTask(typing.Protocol):
    """What the stages here need of a task (``ConvNetTask`` has it): its protocol, its data (the
    splits the protocol uses, ``child_data``), its precision and each program's random stream seed."""

    protocol: Protocol
    child_data: Any
    precision: str

    def stream_seeds(self, programs: Sequence[Program], draws: Sequence[int] | None = None) -> list[int]: ...


# ----------------------------------------------------------------------------- hurdle
class Hurdle:
    """Whether a rule's sweep accuracy earns it the final training.

    ``threshold``: a fixed accuracy (deterministic). ``quantile``: the rolling ``quantile`` of
    the accuracies ``observe``d so far (linear interpolation, as ``numpy.quantile``), applied
    once ``warmup`` were seen. Neither: everyone passes.
    """

    def __init__(self, threshold: float | None = None, quantile: float | None = None, warmup: int = 0):
        self.threshold, self.quantile, self.warmup = threshold, quantile, warmup
        self.history: list[float] = []  # sorted

    @classmethod
    def of(cls, p: Protocol) -> Hurdle:
        return cls(p.hurdle, p.hurdle_quantile, p.hurdle_warmup)

    @property
    def active(self) -> bool:
        return self.threshold is not None or self.quantile is not None

    def current(self) -> float | None:
        """The accuracy a rule needs now; None: everyone passes."""
        if self.threshold is not None:
            return self.threshold
        if self.quantile is None or len(self.history) < max(1, self.warmup):
            return None
        h = self.history
        pos = self.quantile * (len(h) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(h) - 1)
        return h[lo] + (h[hi] - h[lo]) * (pos - lo)

    def passes(self, accuracy: float) -> bool:
        t = self.current()
        return t is None or accuracy >= t

    def observe(self, accuracy: float) -> None:
        if self.quantile is not None:
            bisect.insort(self.history, float(accuracy))


# ----------------------------------------------------------------------------- stages
@dataclass
class Sweep:
    """One rule's rate sweep: the chosen rate (None: every rate diverged) and its accuracy,
    the accuracy each rate had when it left the sweep (None: diverged), the images spent."""

    lr: float | None
    accuracy: float
    rates: dict[str, float | None]
    child_images: int
    rungs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Final:
    """One rule's final training: validation accuracy (0 if diverged), last loss, images trained;
    with a final hurdle, where it ended ("full", or "final-rung": stopped at the checkpoint) and
    its validation accuracy and images at the checkpoint."""

    reward: float
    diverged: bool
    loss: float
    child_images: int
    fidelity: str = "full"
    rung_accuracy: float | None = None
    rung_images: int | None = None


def _common(task: FidelityTask) -> dict[str, Any]:
    p = task.protocol
    return dict(batch_size=p.batch_size, seed=p.seed, filters=p.filters, precision=task.precision)


def run_sweep(task: FidelityTask, programs: Sequence[Program], draws: Sequence[int] | None = None) -> list[Sweep]:
    """The rate sweep of ``task.protocol`` (fixed or by successive halving) for ``programs``, as one group
    per rung; ``draws``: the draw index of each program's random stream (default 0)."""
    p, data = task.protocol, task.child_data
    if not programs:
        return []
    seeds = task.stream_seeds(programs, draws)  # as the fixed protocol uses them
    val = data.val.take(p.val_examples)
    train = data.train.take(p.sweep_examples)
    steps = (p.sweep_examples // p.batch_size) * p.sweep_epochs
    plan = rung_plan(len(p.lrs), steps, p.schedule, p.eta, p.rungs)
    children = [(i, k) for i in range(len(programs)) for k in range(len(p.lrs))]  # (rule, rate index)
    acc: dict[tuple[int, int], float | None] = {}
    reached: dict[tuple[int, int], int] = {}
    images = [0] * len(programs)
    rungs: list[list[dict[str, Any]]] = [[] for _ in programs]
    group = None
    start = 0
    for r, (keep, stop) in enumerate(plan):
        if r:  # keep each rule's best `keep` live rates (ties: the smaller rate), in rate order
            rows = []
            for i in range(len(programs)):
                mine = [j for j, c in enumerate(children) if c[0] == i and acc[c] is not None]
                mine.sort(key=lambda j: (-acc[children[j]], children[j][1]))
                rows += sorted(mine[:keep], key=lambda j: children[j][1])
            if not rows:
                break
            group, children = group.select(rows), [children[j] for j in rows]
        fresh = {} if group is not None else {"stream_seeds": [seeds[i] for i, _ in children]}
        group = train_children([programs[i] for i, _ in children], [p.lrs[k] for _, k in children], train, val,
                               epochs=p.sweep_epochs, steps=(start, stop), resume=group, **fresh, **_common(task))
        for j, c in enumerate(children):
            acc[c] = None if bool(group.diverged[j]) else round(float(group.accuracy[j]), 6)
            reached[c] = r
            images[c[0]] += group.steps * p.batch_size
        for i in range(len(programs)):
            rates = {f"{p.lrs[k]:g}": acc[(i2, k)] for i2, k in children if i2 == i}
            if rates:
                rungs[i].append({"images": stop * p.batch_size, "rates": rates})
        start = stop
    out = []
    for i in range(len(programs)):
        tried = [(i, k) for k in range(len(p.lrs)) if (i, k) in acc]
        live = [c for c in tried if acc[c] is not None]
        # the deepest rung first (a rate pruned early has a shorter, incomparable run), then accuracy
        best = min(live, key=lambda c: (-reached[c], -acc[c], c[1]), default=None)
        out.append(Sweep(lr=None if best is None else p.lrs[best[1]],
                         accuracy=0.0 if best is None else acc[best],
                         rates={f"{p.lrs[k]:g}": acc[(i, k)] for _, k in tried},
                         child_images=images[i], rungs=rungs[i] if p.schedule != "fixed" else []))
    return out


def run_final(task: FidelityTask, programs: Sequence[Program], lrs: Sequence[float],
              draws: Sequence[int] | None = None) -> list[Final]:
    """The final training of ``programs`` at ``lrs`` (from the initial weights), as one group.

    With ``final_hurdle``: the group trains to the checkpoint (``final_rung_images``) and validates;
    the rules at or above the hurdle there (and not diverged) train on to the end, resumed, as one
    smaller group; the others stop and score their checkpoint accuracy (``fidelity="final-rung"``).
    """
    if not programs:
        return []
    p, data = task.protocol, task.child_data
    train, val = data.train.take(p.train_examples), data.val.take(p.val_examples)
    kw = dict(epochs=p.train_epochs, stream_seeds=task.stream_seeds(programs, draws), **_common(task))
    if p.final_hurdle is None:
        res = train_children(list(programs), list(lrs), train, val, **kw)
        return [Final(0.0 if bool(res.diverged[j]) else float(res.accuracy[j]), bool(res.diverged[j]),
                      float(res.loss[j]), res.steps * p.batch_size) for j in range(len(programs))]
    rung = p.final_rung_images // p.batch_size
    total = (p.train_examples // p.batch_size) * p.train_epochs
    first = train_children(list(programs), list(lrs), train, val, steps=(0, rung), **kw)
    rung_images = first.steps * p.batch_size
    rung_acc = [None if bool(first.diverged[j]) else round(float(first.accuracy[j]), 6) for j in range(len(programs))]
    go = [j for j, a in enumerate(rung_acc) if a is not None and a >= p.final_hurdle]
    out = [Final(0.0 if a is None else a, a is None, float(first.loss[j]), rung_images, "final-rung",
                 0.0 if a is None else a, rung_images) for j, a in enumerate(rung_acc)]
    if go:  # on from the checkpoint: the same trajectory as without the hurdle (stream seeds travel in the state)
        kw.pop("stream_seeds", None)
        rest = train_children([programs[j] for j in go], [lrs[j] for j in go], train, val, steps=(rung, total),
                              resume=first.select(go), **kw)
        for k, j in enumerate(go):
            dead = bool(rest.diverged[k])
            out[j] = Final(0.0 if dead else float(rest.accuracy[k]), dead, float(rest.loss[k]),
                           rung_images + rest.steps * p.batch_size, "full", rung_acc[j], rung_images)
    return out


def evaluate_group(task: FidelityTask, programs: list[Program], draws: Sequence[int] | None = None) -> list[Result]:
    """``ConvNetTask._evaluate_group`` for a multi-fidelity protocol: sweep, hurdle, final training (with
    the final hurdle at its checkpoint, if set)."""
    t0 = time.perf_counter()
    p = task.protocol
    sweeps = run_sweep(task, programs, draws)
    hurdle = task.__dict__.get("_hurdle")
    if hurdle is None:  # the rolling history lives in the task object (each worker process has its own)
        hurdle = task.__dict__["_hurdle"] = Hurdle.of(p)
    threshold = hurdle.current()  # one threshold for the whole group
    go = [i for i, s in enumerate(sweeps) if s.lr is not None and (threshold is None or s.accuracy >= threshold)]
    for s in sweeps:
        hurdle.observe(s.accuracy)
    finals = dict(zip(go, run_final(task, [programs[i] for i in go], [sweeps[i].lr for i in go],
                                    None if draws is None else [draws[i] for i in go])))
    seconds = (time.perf_counter() - t0) / len(programs)
    results = []
    for i, s in enumerate(sweeps):
        metrics: dict[str, Any] = {"sweep": s.rates, "seconds": seconds, "schedule": p.schedule, "lr": s.lr,
                                   "sweep_accuracy": s.accuracy, "sweep_images": s.child_images}
        if s.rungs:
            metrics["rungs"] = s.rungs
        if hurdle.active:
            metrics["hurdle"] = threshold
        if p.final_hurdle is not None:
            f = finals.get(i)
            metrics.update(final_hurdle=p.final_hurdle, final_rung_images=p.final_rung_images,
                           final_rung_accuracy=None if f is None else f.rung_accuracy,
                           final_hurdled=f is not None and f.fidelity == "final-rung")
        if s.lr is None:  # every rate diverged: 0, as under the fixed protocol
            results.append(Result(0.0, {**metrics, "diverged": True, "fidelity": "sweep", "hurdled": False,
                                        "child_images": s.child_images}))
        elif i not in finals:  # below the hurdle: its sweep accuracy, a lower-fidelity score
            results.append(Result(s.accuracy, {**metrics, "diverged": False, "fidelity": "sweep", "hurdled": True,
                                               "val_accuracy": s.accuracy, "child_images": s.child_images}))
        else:
            f = finals[i]
            results.append(Result(f.reward, {**metrics, "diverged": f.diverged, "fidelity": f.fidelity, "hurdled": False,
                                             "val_accuracy": f.reward, "train_loss": f.loss,
                                             "child_images": s.child_images + f.child_images}))
    return results


# ----------------------------------------------------------------------------- comparing fidelities
def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two scorings of the same rules (ties as ``scipy.stats.kendalltau``); NaN if undefined."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} and {len(y)} scores")
    n = len(x)
    concordant = tied_x = tied_y = pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
            concordant += dx * dy
            tied_x += dx == 0
            tied_y += dy == 0
            pairs += 1
    denom = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return concordant / denom if denom else float("nan")
