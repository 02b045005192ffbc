"""``nos-gym tabulate``: score every canonical rule of a space once and write a NOS-Bench table.

The steps (``tabulate``):

1. **The space.** Every token string of (space, depth, constraints) is enumerated through the
   masks (``enumerate_programs``) and reduced to one program per canonical key, the first in
   mask order (``canonical_rules``). A space too large to tabulate is refused before anything
   runs, with one line giving its rule count and the estimated child-images
   (``check_size``).
2. **The scores.** All rules go to one ``Evaluator`` with a ``Store``, shortest canonical key
   first (so of two equivalent rules the simpler one is trained and the other shares its
   score), and come back through ``poll`` under a progress bar (tqdm, with an ETA). The evaluator's funnel
   decides what is trained: a rule already in the store is read back, a deterministic rule
   that behaves like one scored before shares its score, a degenerate one gets the screen's
   score, the rest are trained (on the process pool, or on Ray with ``address``). Every result
   is committed to the store as it arrives, so a tabulation stopped in any way (Ctrl-C,
   SIGKILL, a reboot) resumes where it stopped when the same command runs again.
3. **The table.** The rows are read back from the store (one per canonical key, the source
   recovered from the stored metrics: "trained", "fingerprint" or "screen") and written with
   ``nos_gym.bench.write_table``. A rule that failed (timeout, crash, error) leaves no row:
   the table is not written, and a rerun retries it.
4. **The test columns** (optional, ``test``): the best ``top`` rules by reward, and the
   references (Table 1, AddSign; those outside the space go to the metadata), scored again
   on a test protocol (e.g. ``{preset: fast}``) at several child seeds, each seed its own
   task fingerprint in the same store; the table gets ``{name}_mean``, ``{name}_sd``
   (sample sd) and ``{name}_s{seed}``.

Sessions: each run of ``tabulate`` names its evaluator run ``tabulate <date> <ATen kernel set>
<CPU>`` (of the machine that runs the command; on Ray the workers may be others); the store
keeps that name with every row it wrote, so the table's metadata lists the sessions that made
it, the kernel sets they ran on and their wall time (from the rows' timestamps: the first
trained rule's start to the last row of the session).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nos_gym.bench.table import COLUMNS, SUFFIX, write_table
from nos_gym.dsl import Constraints, Masker, Program, SearchSpace, get_space
from nos_gym.dsl.table1 import TABLE1
from nos_gym.dsl.vocabulary import SEMANTICS_VERSION
from nos_gym.evaluation.evaluator import Evaluator
from nos_gym.store import Record, Store
from nos_gym.tasks import Task, make

__all__ = ["MAX_CHILD_IMAGES", "MAX_RULES", "MAX_SEQUENCES", "REFERENCES", "SpacePlan", "TabulateError",
           "Tabulation", "TestSpec", "canonical_rules", "check_size", "enumerate_programs", "images_per_rule",
           "plan_space", "tabulate"]

#: spaces with more token strings than this are refused without being enumerated
MAX_SEQUENCES = 2_000_000
#: default limits of ``check_size``
MAX_RULES = 100_000
MAX_CHILD_IMAGES = 100_000_000
#: the reference rules of the test columns: Table 1 (with SGD, Momentum, Adam, RMSProp) and AddSign
REFERENCES: dict[str, str] = {**TABLE1, "addsign": "(1 + sign(g) * sign(m)) * g"}


class TabulateError(ValueError):
    """A tabulation that cannot start or finish (too large, failed rules); the message is one line."""


# ----------------------------------------------------------------------------- the space
def enumerate_programs(space: str | SearchSpace, depth: int, constraints: Constraints = Constraints()
                       ) -> Iterator[Program]:
    """Every token string of the space that obeys ``constraints``, in mask (token id) order."""
    masker = Masker(get_space(space), depth, constraints)
    tokens = masker.vocab.tokens
    length = masker.length
    prefix: list[int] = []

    def walk() -> Iterator[Program]:
        if len(prefix) == length:
            yield Program(tuple(tokens[i] for i in prefix))
            return
        for i in masker.mask(prefix).nonzero()[0].tolist():
            prefix.append(i)
            yield from walk()
            prefix.pop()

    yield from walk()


@dataclass
class SpacePlan:
    """A space's numbers: token strings, canonical rules (first spelling each), and the estimated cost."""

    space: SearchSpace
    depth: int
    constraints: Constraints
    sequences: int
    programs: list[Program] = field(repr=False)
    #: images one rule costs the child when trained (None: the task trains no child)
    images_per_rule: int | None = None

    @property
    def rules(self) -> int:
        return len(self.programs)

    @property
    def deterministic(self) -> int:
        return sum(not p.stochastic for p in self.programs)

    @property
    def stochastic(self) -> int:
        return self.rules - self.deterministic

    @property
    def child_images(self) -> int | None:
        """The estimated child-images of training every rule (before the funnel screens or shares any)."""
        return None if self.images_per_rule is None else self.rules * self.images_per_rule

    def describe(self) -> str:
        text = (f"space {self.space.name!r} at depth {self.depth}: {self.sequences:,} token sequences, "
                f"{self.rules:,} canonical rules ({self.deterministic:,} deterministic, {self.stochastic:,} stochastic)")
        if self.images_per_rule is not None:
            text += f", about {self.child_images:.3g} child-images ({self.images_per_rule:,} a rule, before the funnel)"
        return text


def canonical_rules(space: str | SearchSpace, depth: int, constraints: Constraints = Constraints()) -> list[Program]:
    """One program per canonical key of the space: the first in mask order."""
    out: dict[str, Program] = {}
    for p in enumerate_programs(space, depth, constraints):
        out.setdefault(p.canonical_key, p)
    return list(out.values())


def images_per_rule(task: Task) -> int | None:
    """The child-images one rule costs ``task`` when trained to the end (the ConvNet task's protocol:
    its sweep, by rungs under successive halving, and the final training); None for other tasks."""
    p = getattr(task, "protocol", None)
    if p is None or not hasattr(p, "lrs"):
        return None
    from nos_gym.tasks.convnet.protocol import rung_plan

    steps = (p.sweep_examples // p.batch_size) * p.sweep_epochs
    sweep, start = 0, 0
    for keep, stop in rung_plan(len(p.lrs), steps, p.schedule, p.eta, p.rungs):
        sweep += keep * (stop - start) * p.batch_size
        start = stop
    return sweep + p.final_images


def plan_space(space: str | SearchSpace, depth: int, constraints: Constraints = Constraints(),
               task: Task | None = None, *, max_sequences: int = MAX_SEQUENCES) -> SpacePlan:
    """The space's numbers (``SpacePlan``); ``TabulateError`` if it has over ``max_sequences`` token strings."""
    space = get_space(space)
    sequences = space.size(depth, constraints)
    per_rule = images_per_rule(task) if task is not None else None
    if sequences > max_sequences:
        bound = "" if per_rule is None else f", up to {sequences * per_rule:.3g} child-images ({per_rule:,} a rule)"
        raise TabulateError(f"space {space.name!r} at depth {depth} has {sequences:,} token sequences (at most as "
                            f"many canonical rules{bound}): too many to tabulate (limit {max_sequences:,} sequences); "
                            f"choose a smaller space or depth")
    return SpacePlan(space, depth, constraints, sequences, canonical_rules(space, depth, constraints), per_rule)


def check_size(plan: SpacePlan, *, max_rules: int = MAX_RULES, max_child_images: int | float = MAX_CHILD_IMAGES) -> None:
    """``TabulateError`` (one line: the rule count and the estimated child-images) for a space over the limits."""
    images = plan.child_images
    over = []
    if plan.rules > max_rules:
        over.append(f"--max-rules {max_rules:,}")
    if images is not None and images > max_child_images:
        over.append(f"--max-child-images {max_child_images:.3g}")
    if over:
        raise TabulateError(f"refusing to tabulate {plan.describe()}: over {' and '.join(over)}; choose a smaller "
                            f"space, depth or protocol, or raise the limit")


def funnel_preview(programs: Sequence[Program]) -> Counter:
    """What the evaluator's funnel would do with ``programs`` on an empty store: counts of
    "trained", "fingerprint" (shares an earlier rule's score) and "screen"."""
    from nos_gym.evaluation.probe import probe

    counts: Counter = Counter()
    seen: set[str] = set()
    for p, pr in zip(programs, probe(list(programs))):
        if not p.stochastic and pr.fingerprint in seen:
            counts["fingerprint"] += 1
        elif pr.screen is not None:
            counts["screen"] += 1
        else:
            counts["trained"] += 1
            if not p.stochastic:
                seen.add(pr.fingerprint)
    return counts


# ----------------------------------------------------------------------------- the run
@dataclass
class TestSpec:
    """The test columns: ``options`` of ``task`` (None: the tabulated task's name) at each child seed of
    ``seeds`` (the task option ``seed``), for the ``top`` best rules and the ``REFERENCES``."""

    __test__ = False  # not a pytest class, whatever its name

    name: str = "fast"
    options: dict[str, Any] = field(default_factory=lambda: {"preset": "fast"})
    seeds: tuple[int, ...] = (0, 1, 2)
    top: int = 100
    task: str | None = None


@dataclass
class Tabulation:
    """What ``tabulate`` did: the table written, its rows' sources, and this session's counts."""

    path: Path
    rules: int
    sources: dict[str, int]
    session: dict[str, int]
    seconds: float
    meta: dict[str, Any]


def _host() -> dict[str, Any]:
    """The CPU, cores and ATen kernel set of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "aten_kernels": torch.backends.cpu.get_cpu_capability(),
            "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _code() -> dict[str, Any]:
    """The nos-gym version and, in a git checkout, the commit and whether nos_gym/ has uncommitted changes."""
    from nos_gym import __version__
    from nos_gym.evaluation.provenance import git_commit

    commit, dirty = git_commit(("nos_gym",))
    return {"version": __version__, "commit": commit, "dirty": dirty}


def _source(rec: Record) -> str:
    """How the funnel settled a stored rule: "fingerprint", "screen" or "trained"."""
    if "equivalent_key" in rec.metrics:
        return "fingerprint"
    if "screen" in rec.metrics:
        return "screen"
    return "trained"


def _row(program: Program, rec: Record, twin: Record | None) -> dict[str, Any]:
    """The table row of ``program`` from its stored record (and, for a fingerprint row, its twin's)."""
    m = rec.metrics
    source = _source(rec)
    lr = m.get("lr", m.get("best_lr"))
    sweep = m.get("sweep") if isinstance(m.get("sweep"), dict) else {}
    sweep_accuracy = m.get("sweep_accuracy")
    if sweep_accuracy is None and lr is not None and sweep:
        sweep_accuracy = sweep.get(f"{lr:g}")
    cost_of = twin if (source == "fingerprint" and twin is not None) else rec
    images = 0 if source == "screen" else m.get("child_images", cost_of.metrics.get("child_images"))
    if source == "screen":
        seconds = 0.0
    else:
        seconds = m.get("seconds", cost_of.seconds if cost_of is not rec or source == "trained" else None)
    row: dict[str, Any] = {
        "key": program.canonical_key, "rule": program.format(), "tokens": " ".join(program.tokens),
        "stochastic": program.stochastic, "source": source, "reward": rec.reward, "lr": lr,
        "sweep_accuracy": sweep_accuracy, "diverged": m.get("diverged"), "fidelity": m.get("fidelity"),
        "child_images": images, "train_seconds": seconds, "equivalent_to": m.get("equivalent_key"),
        "screen": m.get("screen"), "error": rec.error,
    }
    rungs = m.get("rungs") if isinstance(m.get("rungs"), list) else ([{"rates": sweep}] if sweep else [])
    for k, rung in enumerate(rungs):
        for rate, acc in (rung.get("rates") or {}).items():
            row[f"sweep_r{k}_{rate}"] = float("nan") if acc is None else acc
    return row


def _sweep_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    found: set[tuple[int, float, str]] = set()
    for r in rows:
        for c in r:
            if c.startswith("sweep_r") and c not in COLUMNS:
                rung, _, rate = c[len("sweep_r"):].partition("_")
                found.add((int(rung), float(rate), c))
    return [c for _, _, c in sorted(found)]


def _sessions(store: Store, fingerprint: str, keys: set[str]) -> list[dict[str, Any]]:
    """The sessions that wrote the rows of ``keys``: run name, rows, first start, last row, wall seconds."""
    by_run: dict[str, list[Record]] = {}
    for rec in store.records(fingerprint, status="ok"):
        if rec.key in keys:
            by_run.setdefault(rec.run or "?", []).append(rec)
    out = []
    for run, recs in by_run.items():
        first = min(r.created - (r.seconds or 0.0) for r in recs)
        last = max(r.created for r in recs)
        out.append({"run": run, "rows": len(recs), "trained": sum(_source(r) == "trained" for r in recs),
                    "start": _iso(first), "wall_seconds": round(last - first, 1)})
    return sorted(out, key=lambda s: s["start"])


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds")


def _run_all(ev: Evaluator, programs: Sequence[Program], desc: str, progress: bool,
             on_result: Callable[[str], None] | None = None) -> list[Any]:
    """Submit ``programs`` to ``ev`` and collect their Results under a progress bar; returns them in order.

    The bar's rate and ETA count only what completes after the first poll (the store's rows, the
    screen's and known twins' settle at once)."""
    from tqdm import tqdm

    tickets = ev.submit(programs)
    where = {t: i for i, t in enumerate(tickets)}
    results: list[Any] = [None] * len(programs)
    remaining = len(programs)
    counts: Counter = Counter()

    def take(done: list) -> None:
        nonlocal remaining
        for c in done:
            results[where[c.ticket]] = c.result
            counts[c.result.source] += 1
            if on_result is not None:
                on_result(c.result.source)
        remaining -= len(done)

    first = ev.poll(0.0)
    take(first)
    # into a log file (nohup) a line every 30 s, not every second
    interval = 1.0 if sys.stderr.isatty() else 30.0
    with tqdm(total=len(programs), initial=len(first), desc=desc, unit="rule", smoothing=0.0, dynamic_ncols=True,
              disable=not progress, mininterval=interval) as bar:
        while remaining > 0:
            done = ev.poll(1.0)
            take(done)
            if done:
                bar.set_postfix({k: counts[k] for k in ("store", "trained", "fingerprint", "screen") if counts[k]},
                                refresh=False)
                bar.update(len(done))
    return results


def tabulate(task: str | Task = "convnet-cifar10", task_options: Mapping[str, Any] | None = None, *,
             space: str | SearchSpace = "small", depth: int = 1, constraints: Constraints = Constraints(),
             out: str | os.PathLike | None = None, name: str | None = None, store: str | os.PathLike | None = None,
             backend: str = "auto", workers: int | None = None, threads_per_worker: int | None = None,
             address: str | None = None, job_size: int | None = None, timeout: float | None = 3600.0,
             max_rules: int = MAX_RULES, max_child_images: int | float = MAX_CHILD_IMAGES,
             test: TestSpec | None = None, progress: bool = True,
             log: Callable[[str], None] | None = print) -> Tabulation:
    """Score every canonical rule of (``space``, ``depth``, ``constraints``) on ``task`` and write the table.

    ``task``/``task_options``: the task and its options (``nos_gym.tasks.make``). ``out``: the
    table file (default ``NAME.csv.gz``); ``name``: the table's name (default from the space,
    depth and task); ``store``: the SQLite store the scores go to and resume from (default
    ``runs/nosbench-NAME.sqlite``). ``backend``, ``workers``, ``threads_per_worker``,
    ``address`` (Ray), ``job_size``, ``timeout``: the ``Evaluator``'s. ``max_rules`` and
    ``max_child_images``: the refusal limits (``check_size``). ``test``: the test columns
    (``TestSpec``), None for none. ``log``: where the one-line reports go (None: nowhere).
    """
    t0 = time.perf_counter()
    say = log or (lambda _: None)
    if address is not None and backend == "auto":
        backend = "ray"
    task_obj = make(task, **dict(task_options or {}))
    space = get_space(space)
    name = name or f"{space.name}{depth}-{task_obj.name}"
    out = Path(out) if out is not None else Path(f"{name}{SUFFIX}")
    if not out.name.endswith(SUFFIX):
        raise TabulateError(f"the table file's name must end with {SUFFIX}, got {out}")
    store_path = Path(store) if store is not None else Path("runs") / f"nosbench-{name}.sqlite"
    plan = plan_space(space, depth, constraints, task_obj)
    check_size(plan, max_rules=max_rules, max_child_images=max_child_images)
    say(plan.describe())
    store_path.parent.mkdir(parents=True, exist_ok=True)
    host = _host()
    run = f"tabulate {_iso(time.time())} {host['aten_kernels']} {host['cpu']}"
    programs = sorted(plan.programs, key=lambda p: (len(p.canonical_key), p.canonical_key))  # simplest first
    keys = [p.canonical_key for p in programs]
    session: Counter = Counter()
    with Store(store_path) as db:
        with Evaluator(task_obj, backend, store=db, workers=workers, threads_per_worker=threads_per_worker,
                       address=address, job_size=job_size, timeout=timeout, run=run) as ev:
            fingerprint = ev.fingerprint
            say(f"task {task_obj.name} ({fingerprint}); store {store_path}; backend {ev.backend_name}")
            _run_all(ev, programs, name, progress, lambda s: session.update([s]))
        rows = _rows(db, fingerprint, programs)
        test_meta = None
        if test is not None:
            test_meta = _test_columns(rows, programs, test, task_obj, db, backend=backend, workers=workers,
                                      threads_per_worker=threads_per_worker, address=address, job_size=job_size,
                                      timeout=timeout, run=run, progress=progress, say=say)
        sessions = _sessions(db, fingerprint, set(keys))
    rows.sort(key=lambda r: (-r["reward"], r["key"]))
    sources = Counter(r["source"] for r in rows)
    trained = [r for r in rows if r["source"] == "trained"]
    columns = [*COLUMNS, *_sweep_columns(rows)]
    if test is not None:
        columns += [f"{test.name}_mean", f"{test.name}_sd", *(f"{test.name}_s{s}" for s in test.seeds)]
    meta: dict[str, Any] = {
        "name": name,
        "space": {"name": space.name, "operands": list(space.operands), "unary": list(space.unary),
                  "binary": list(space.binary)},
        "depth": depth, "constraints": asdict(constraints),
        "counts": {"token_sequences": plan.sequences, "rules": plan.rules, "deterministic": plan.deterministic,
                   "stochastic": plan.stochastic, "sources": dict(sorted(sources.items()))},
        "task": {"name": task_obj.name, "fingerprint": fingerprint, "config": task_obj.config(),
                 "options": dict(task_options or {})},
        "protocol": task_obj.protocol.to_dict() if hasattr(task_obj, "protocol") else None,
        "semantics_version": SEMANTICS_VERSION,
        "probe_version": _probe_version(),
        "code": _code(),
        "made": {"date": _iso(time.time()), **host, "sessions": sessions,
                 "aten_kernels_of_sessions": sorted({s["run"].split(" ")[2] for s in sessions
                                                     if s["run"].startswith("tabulate ")})},
        "cost": {"rules_trained": len(trained),
                 "child_images": int(sum(r["child_images"] or 0 for r in trained)),
                 "train_seconds": round(sum(r["train_seconds"] or 0.0 for r in trained), 1),
                 "wall_seconds": round(sum(s["wall_seconds"] for s in sessions), 1)},
        "test": test_meta,
    }
    path = write_table(out, rows, meta, columns)
    seconds = time.perf_counter() - t0
    say(f"wrote {path}: {len(rows):,} rules ({', '.join(f'{k} {v:,}' for k, v in sorted(sources.items()))}); "
        f"{meta['cost']['child_images']:,} child-images; this session {dict(session)} in {seconds:.0f} s")
    return Tabulation(path, len(rows), dict(sources), dict(session), seconds, meta)


def _probe_version() -> int:
    from nos_gym.evaluation.probe import PROBE_VERSION

    return PROBE_VERSION


def _rows(db: Store, fingerprint: str, programs: Sequence[Program]) -> list[dict[str, Any]]:
    """One row per program from the store; ``TabulateError`` if some rule has no ok record (it failed)."""
    keys = [p.canonical_key for p in programs]
    records = db.get_many(fingerprint, keys)
    missing = [p for p, k in zip(programs, keys) if k not in records]
    if missing:
        failed = db.get_many(fingerprint, [p.canonical_key for p in missing],
                             statuses=("timeout", "crashed", "error"))
        first = missing[0]
        why = failed.get(first.canonical_key)
        cause = f"{why.status}: {' '.join((why.error or '').split())[-160:]}" if why else "no record"
        raise TabulateError(f"{len(missing):,} of {len(programs):,} rules have no score (first: {first.format()!r}, "
                            f"{cause}); run the same command again to retry them: the others are in the store")
    twins = db.get_many(fingerprint, [r.metrics["equivalent_key"] for r in records.values()
                                      if "equivalent_key" in r.metrics], statuses=("ok",))
    return [_row(p, records[k], twins.get(records[k].metrics.get("equivalent_key", ""))) for p, k in
            zip(programs, keys)]


def _test_columns(rows: list[dict[str, Any]], programs: Sequence[Program], test: TestSpec, task: Task, db: Store,
                  *, backend: str, run: str, progress: bool, say: Callable[[str], None],
                  **evaluator: Any) -> dict[str, Any]:
    """Score the ``test.top`` best rows and the references at each of ``test.seeds``; fill the test columns of
    ``rows`` (in place) and return the test's metadata."""
    from nos_gym.dsl import parse

    by_key = {r["key"]: r for r in rows}
    program_of = {p.canonical_key: p for p in programs}
    ranked = sorted(rows, key=lambda r: (-r["reward"], r["key"]))
    chosen = [r["key"] for r in ranked[: test.top]]
    references: dict[str, dict[str, Any]] = {}
    outside: dict[str, Program] = {}
    for ref, text in REFERENCES.items():
        p = parse(text)
        key = p.canonical_key
        references[ref] = {"rule": p.format(), "key": key, "in_space": key in by_key}
        if key in by_key:
            if key not in chosen:
                chosen.append(key)
        else:
            outside.setdefault(key, p)
    todo = [program_of[k] for k in chosen] + list(outside.values())
    task_name = test.task or task.name
    scores: dict[str, list[float]] = {p.canonical_key: [] for p in todo}
    fingerprints: dict[str, str] = {}
    images, wall = 0, 0.0
    for seed in test.seeds:
        seed_task = make(task_name, **{**test.options, "seed": seed})
        with Evaluator(seed_task, backend, store=db, run=run, **evaluator) as ev:
            fingerprints[str(seed)] = ev.fingerprint
            say(f"test {test.name}, seed {seed}: {len(todo)} rules on {task_name} {test.options} ({ev.fingerprint})")
            results = _run_all(ev, todo, f"{test.name} s{seed}", progress)
        failed = [p.format() for p, r in zip(todo, results) if r.metrics.get("status") in ("timeout", "crashed",
                                                                                             "error")]
        if failed:
            raise TabulateError(f"test {test.name}, seed {seed}: {len(failed)} rules failed (first: {failed[0]!r}); "
                                f"run the same command again to retry them")
        for p, r in zip(todo, results):
            scores[p.canonical_key].append(float(r.reward))
            trained = r.source in ("trained", "store") and not ({"equivalent_key", "screen"} & set(r.metrics))
            if trained:  # in this session or an earlier one
                images += int(r.metrics.get("child_images") or 0)
        wall += sum(s["wall_seconds"] for s in _sessions(db, fingerprints[str(seed)], set(scores)))
    for key, values in scores.items():
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else None
        cells = {f"{test.name}_mean": mean, f"{test.name}_sd": sd,
                 **{f"{test.name}_s{s}": v for s, v in zip(test.seeds, values)}}
        if key in by_key:
            by_key[key].update(cells)
        for ref in references.values():
            if ref["key"] == key:
                ref.update(mean=mean, sd=sd, per_seed=values)
    return {"name": test.name, "task": task_name, "options": dict(test.options), "seeds": list(test.seeds),
            "fingerprints": fingerprints, "top": test.top, "rows": len(chosen),
            "rows_are": f"the {test.top} best rules by reward and the references that lie in the space",
            "references": references, "child_images": images, "wall_seconds": round(wall, 1),
            "sd": "sample standard deviation over the seeds"}
