"""The ``nos-gym`` command.

    nos-gym search --agent trpo_lstm --task rosenbrock [agent flags ...]
    nos-gym search --config configs/paper.yaml
    nos-gym eval "g * exp(sign(g) * sign(m))" --task rosenbrock
    nos-gym top runs/trpo_lstm-rosenbrock-s1-...        # a run's leaderboard
    nos-gym top runs/store.sqlite                        # the store's, per task
    nos-gym plot runs/trpo_lstm-rosenbrock-s1-...       # reward vs sampled rules (Figure 4), PNG
    nos-gym export runs/store.sqlite copy.sqlite         # a consistent single-file copy (or .jsonl, .csv)
    nos-gym tabulate --space small --depth 1 --task-options "{preset: cpu, schedule: halving}" --name NAME
                                                         # every rule of a space scored once: a NOS-Bench table
    nos-gym bench small1-cifar10-cpu [--csv OUT.csv]     # a NOS-Bench table: provenance, rewards, best rules

``search`` hands every flag after the agent's name to the agent script
(``agents/NAME.py --help`` lists them); ``--agent`` may also be a path to your own
agent script that defines ``Args`` and ``main(argv)``.

A bad input (setting, rule, task option, a file that is not a store, an unwritable
folder) ends with one line on stderr and exit code 2; Ctrl-C that reaches here, 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


# ----------------------------------------------------------------------------- search
def cmd_search(argv: list[str]) -> int:
    from nos_gym.agents import AGENTS, ConfigError, load_agent, load_yaml

    p = argparse.ArgumentParser(prog="nos-gym search", add_help=False,
                                description="Run an agent; every other flag goes to the agent script.",
                                epilog="The agent's own flags: nos-gym search --agent NAME --help")
    p.add_argument("--agent", default=None, help=f"one of {list(AGENTS)} or a path to an agent script")
    p.add_argument("-h", "--help", action="store_true")
    known, rest = p.parse_known_args(argv)
    agent = known.agent
    config = _flag_value(rest, "--config")
    resume = _flag_value(rest, "--resume")
    source = config or (str(Path(resume) / "config.yaml") if resume else None)
    if agent is None and source is not None:
        agent = load_yaml(source).get("agent")
        if agent is None:
            raise ConfigError(f"{source} names no 'agent'; pass --agent, one of {list(AGENTS)}")
    if agent is None:
        if known.help:
            p.print_help()
            return 0
        raise ConfigError(f"nos-gym search: --agent is required (or a --config naming one); "
                          f"allowed values: {list(AGENTS)}")
    module = load_agent(agent)
    module.main(rest + (["--help"] if known.help else []))
    return 0


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


# ------------------------------------------------------------------------------- eval
def cmd_eval(argv: list[str]) -> int:
    import yaml

    from nos_gym.agents import ConfigError
    from nos_gym.dsl import ParseError
    from nos_gym.evaluation import Evaluator
    from nos_gym.optim import get_rule
    from nos_gym.tasks import available

    p = argparse.ArgumentParser(prog="nos-gym eval", description="Score one rule written in paper notation "
                                "(or a Table 1 name such as powersign) on a task.")
    p.add_argument("rule", nargs="+", help='e.g. "g * exp(sign(g) * sign(m))"; several rules are scored as one batch')
    p.add_argument("--task", default="rosenbrock", help=f"one of {available()}")
    p.add_argument("--task-options", type=yaml.safe_load, default={}, help='YAML/JSON mapping, e.g. "{preset: ci}"')
    p.add_argument("--store", default=None, help="read/write scores in this SQLite store")
    p.add_argument("--backend", default="serial", choices=["serial", "process", "ray"])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--draw", metavar="OUT.png", default=None,
                   help="also draw each rule's computation graph as a PNG: the first rule to OUT.png, "
                        "the next ones to OUT-2.png, OUT-3.png, ...")
    a = p.parse_args(argv)
    if a.task not in available():
        raise ConfigError(f"--task: unknown task {a.task!r}; allowed values: {available()}")
    if not isinstance(a.task_options, dict):
        raise ConfigError(f"--task-options must be a mapping, got {a.task_options!r}")
    programs = []
    for text in a.rule:
        try:
            programs.append(get_rule(text))
        except ParseError as e:
            shown = text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"
            print(f"nos-gym eval: cannot parse {shown!r}: {e}", file=sys.stderr)
            return 2
    task = _make_task(a.task, a.task_options)  # bad options fail here, before anything is written
    if a.draw:  # before scoring; stderr keeps --json's stdout pure JSON
        from nos_gym.envs.render import save_program_png

        draw = Path(a.draw)
        for i, prog in enumerate(programs):
            out = draw if i == 0 else draw.with_name(f"{draw.stem}-{i + 1}{draw.suffix}")
            print(f"drew {prog} -> {save_program_png(prog, out)}", file=sys.stderr)
    with Evaluator(task, backend=a.backend, store=a.store) as ev:
        results = ev.evaluate(programs)
        fingerprint = ev.fingerprint
    if a.json:
        print(json.dumps([{"rule": str(p), "tokens": list(p.tokens), "key": p.canonical_key, "reward": r.reward,
                           "metrics": r.metrics, "error": r.error, "cached": r.cached}
                          for p, r in zip(programs, results)], indent=1, default=str))
        return 0
    print(f"task {a.task} ({fingerprint})")
    for prog, r in zip(programs, results):
        extra = f"  error: {r.error}" if r.error else ""
        metrics = ", ".join(f"{k}={_short(v)}" for k, v in r.metrics.items() if not isinstance(v, dict))
        print(f"{r.reward:.4f}  {prog}{'  (cached)' if r.cached else ''}{extra}")
        print(f"        tokens: {' '.join(prog.tokens)}")
        if metrics:
            print(f"        {metrics}")
    return 0


def _short(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _make_task(name: str, options: dict):
    """The task, or a ConfigError naming the bad --task-options entry."""
    import inspect
    import re

    from nos_gym.agents import ConfigError
    from nos_gym.tasks import make, registry

    try:
        return make(name, **options)
    except TypeError as e:
        bad = re.search(r"unexpected keyword argument '([^']*)'", str(e))
        if bad is None:
            raise ConfigError(f"--task-options: task {name!r}: {e}") from e
        try:  # the factory is resolved by now: list what it takes
            params = inspect.signature(registry._FACTORIES[name]).parameters.values()
            names = [q.name for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
            allowed = f"; its options: {names}"
        except Exception:
            allowed = ""
        raise ConfigError(f"--task-options: task {name!r} has no option {bad.group(1)!r}{allowed}") from e
    except ValueError as e:
        raise ConfigError(f"--task-options: task {name!r}: {e}") from e


# -------------------------------------------------------------------------------- top
def cmd_top(argv: list[str]) -> int:
    from nos_gym.agents import ConfigError, format_top, read_log, top_rules

    p = argparse.ArgumentParser(prog="nos-gym top", description="Leaderboard of a run directory or a store.")
    p.add_argument("path", help="a run directory (with log.jsonl) or a SQLite store file")
    p.add_argument("-k", "--top", type=int, default=10)
    p.add_argument("--task", default=None, help="store only: a task name or fingerprint to show (default: all)")
    a = p.parse_args(argv)
    if a.top < 1:
        raise ConfigError(f"-k/--top must be at least 1, got {a.top}")
    path = Path(a.path)
    if path.is_dir():
        records = read_log(path)
        print(format_top(top_rules(records, a.top), title=f"{path}: {len(records)} sampled rules, "
                                                            f"{len({r['key'] for r in records})} distinct"))
        return 0
    if not path.is_file():
        print(f"nos-gym top: {path} is neither a run directory nor a store file", file=sys.stderr)
        return 2
    from nos_gym.store import Store, StoreError

    try:
        store = Store(path, readonly=True)  # a reader never writes: not even to a file that is no store
    except StoreError as e:
        print(f"nos-gym top: {e}; give a run directory (with log.jsonl) or a store file", file=sys.stderr)
        return 2
    with store:
        tasks = store.tasks()
        fingerprints = sorted({r.fingerprint for r in store.records()})
        if a.task is not None:
            fingerprints = [f for f in fingerprints if f == a.task or tasks.get(f, {}).get("name") == a.task]
            if not fingerprints:
                print(f"nos-gym top: no task {a.task!r} in {path}; tasks there: "
                      f"{sorted({t['name'] for t in tasks.values()})}", file=sys.stderr)
                return 2
        for fp in fingerprints:
            records = store.records(fp, status="ok")
            print(f"{fp} ({tasks.get(fp, {}).get('name', '?')}): {store.count(fp)} rules scored")
            print(f"{'rank':>4}  {'reward':>7}  rule")
            for i, r in enumerate(records[: a.top]):
                print(f"{i + 1:>4}  {r.reward:>7.4f}  {r.program}")
            print()
    return 0


# ------------------------------------------------------------------------------- plot
def cmd_plot(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nos-gym plot", description="Reward against sampled rules (Figure 4), as a PNG.")
    p.add_argument("run_dirs", nargs="+", help="one or more run directories")
    p.add_argument("-o", "--out", default=None,
                   help="image path (default: RUN_DIR/reward.png); its suffix picks the format (png, pdf, svg, ...), "
                        "and a path without such a suffix gets .png added; the path written is printed")
    p.add_argument("--window", type=int, default=100, help="moving-average window in rules")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.run_dirs[0]) / "reward.png"
    print(plot_runs([Path(d) for d in a.run_dirs], out, window=a.window))
    return 0


def plot_runs(run_dirs: Sequence[Path], out: Path, window: int = 100) -> Path:
    """Figure 4 of the paper for runs (``nos_gym.agents.figures.figure4``); returns the path written."""
    from nos_gym.agents import ConfigError, read_log
    from nos_gym.agents.figures import figure4

    series = {}
    for d in run_dirs:
        records = read_log(d)
        if not records:
            raise ConfigError(f"{d} has no sampled rules yet")
        series[d.name] = [rec["reward"] for rec in records]
    return figure4(series, out, window=window)


# ----------------------------------------------------------------------------- export
def cmd_export(argv: list[str]) -> int:
    from nos_gym.store import Store

    p = argparse.ArgumentParser(
        prog="nos-gym export",
        description="A consistent copy of a store, taken while it is in use or after a crash (the store is only "
                    "read). Copying the .sqlite file alone can miss the rows still in its -wal file beside it.",
    )
    p.add_argument("store", help="a SQLite store file")
    p.add_argument("out", help="OUT.jsonl: one JSON object per evaluation; OUT.csv: the same as a table; any other "
                               "name (OUT.sqlite): a single-file SQLite copy that nos-gym top and Store open")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    a = p.parse_args(argv)
    with Store(a.store, readonly=True) as store:
        out = store.export(a.out, overwrite=a.force)
        n = store.count()
    print(f"{out}: {n} evaluations from {a.store}")
    return 0


# ---------------------------------------------------------------------------- promote
def cmd_promote(argv: list[str]) -> int:
    """Re-score the best rules of a run or a store at a higher fidelity; print and save the new leaderboard."""
    import yaml

    from nos_gym.agents import ConfigError
    from nos_gym.agents.runs import promote_run
    from nos_gym.evaluation.promotion import promote_store

    p = argparse.ArgumentParser(
        prog="nos-gym promote",
        description="Re-score the best rules of a run (or a store) at a higher fidelity, e.g. rules found with "
                    "the cpu preset or a hurdle, re-trained under 'fast', as the paper re-trained its best rules "
                    "before the Wide ResNet. Prints the re-ranked leaderboard and saves it as promoted-LABEL.txt/"
                    ".json (in the run directory, or beside the store); the scores go into the store under the new "
                    "task's fingerprint, so promoting again re-uses them. A run can do this itself at its end: "
                    "the setting promote: {preset: fast, top: 10}.")
    p.add_argument("path", help="a run directory (with log.jsonl) or a SQLite store file")
    p.add_argument("--preset", default=None, help="the convnet protocol to re-score with, e.g. fast or paper")
    p.add_argument("-k", "--top", type=int, default=20, help="how many of the best distinct rules to re-score")
    p.add_argument("--seeds", type=int, nargs="+", default=[],
                   help="score each rule at these task seeds (the child's initial weights and minibatch order) and "
                        "rank by the mean, e.g. --seeds 0 1 2; one seed cannot separate rules closer than its "
                        "seed-to-seed spread")
    p.add_argument("--task", default=None, help="the task to re-score on (default: the run's task; for a store, "
                                                "convnet-cifar10)")
    p.add_argument("--task-options", type=yaml.safe_load, default={},
                   help="YAML/JSON mapping of task options (default: the run's own, with the protocol replaced by "
                        "--preset), e.g. \"{device: cuda}\"")
    p.add_argument("--from", dest="source", default=None,
                   help="store only: the task name or fingerprint whose scores pick the candidates")
    p.add_argument("--store", default=None, help="store the new scores go to (default: the run's store, or the "
                                                 "store given as PATH); '' for none")
    p.add_argument("--backend", default="auto", choices=["auto", "serial", "process", "ray"])
    p.add_argument("--out", default=None, help="folder for promoted-LABEL.txt/.json (default: the run directory, "
                                               "or the store's folder)")
    a = p.parse_args(argv)
    if a.top < 1:
        raise ConfigError(f"-k/--top must be at least 1, got {a.top}")
    if not isinstance(a.task_options, dict):
        raise ConfigError(f"--task-options must be a mapping, got {a.task_options!r}")
    if a.preset is None and not a.task_options:
        raise ConfigError("say which fidelity to promote to: --preset NAME (e.g. fast) and/or --task-options")
    path = Path(a.path)
    common = dict(preset=a.preset, top=a.top, task=a.task, task_options=a.task_options, seeds=a.seeds,
                  store=a.store, backend=a.backend, out=a.out)
    if path.is_dir():
        board = promote_run(path, **common)
    elif path.is_file():
        from nos_gym.store import Store, StoreError

        try:
            Store(path, readonly=True).close()  # a store? (a reader never writes, not even to a non-store)
        except StoreError as e:
            print(f"nos-gym promote: {e}; give a run directory (with log.jsonl) or a store file", file=sys.stderr)
            return 2
        board = promote_store(path, source_task=a.source, **common)
    else:
        print(f"nos-gym promote: {path} is neither a run directory nor a store file", file=sys.stderr)
        return 2
    print(board.text())
    print(f"saved {' and '.join(map(str, board.saved))}" + (f"; scores stored in {board.store}" if board.store else ""),
          file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- tabulate
def cmd_tabulate(argv: list[str]) -> int:
    """Score every canonical rule of a space on a task (resumable) and write a NOS-Bench table."""
    import yaml

    from nos_gym.agents import ConfigError
    from nos_gym.dsl import SPACES, Constraints, SearchSpace, get_space
    from nos_gym.evaluation import tabulate as tab

    p = argparse.ArgumentParser(
        prog="nos-gym tabulate",
        description="Score every canonical rule of a space once through the Evaluator (store, funnel, pool) and "
                    "write a NOS-Bench table. Stopped in any way, it resumes from the store: run the same command "
                    "again. Example: nos-gym tabulate --space small --depth 1 --task-options \"{preset: cpu, "
                    "schedule: halving}\" --name small1-cifar10-cpu --out nos_gym/bench/tables/small1-cifar10-cpu.csv.gz")
    p.add_argument("--space", default="small", help="a space name, or a YAML mapping {name, operands, unary, binary}")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--no-distinct-operands", action="store_true")
    p.add_argument("--allow-final-addition", action="store_true")
    p.add_argument("--no-reuse-result", action="store_true")
    p.add_argument("--task", default="convnet-cifar10")
    p.add_argument("--task-options", type=yaml.safe_load, default={}, help='YAML mapping, e.g. "{preset: cpu}"')
    p.add_argument("--name", default=None, help="the table's name (default: SPACE DEPTH-TASK)")
    p.add_argument("--out", default=None, help="the table file, NAME.csv.gz by default")
    p.add_argument("--store", default=None, help="the SQLite store (default runs/nosbench-NAME.sqlite)")
    p.add_argument("--backend", default="auto", choices=["auto", "serial", "process", "ray"])
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads-per-worker", type=int, default=None)
    p.add_argument("--ray-address", default=None, help="a Ray cluster's address (implies --backend ray)")
    p.add_argument("--job-size", type=int, default=None, help="rules per job (default: the Evaluator's)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one rule may take")
    p.add_argument("--max-rules", type=int, default=tab.MAX_RULES)
    p.add_argument("--max-child-images", type=float, default=tab.MAX_CHILD_IMAGES)
    p.add_argument("--test-options", type=yaml.safe_load, default=None,
                   help='add test columns: the task options of the test protocol, e.g. "{preset: fast}"')
    p.add_argument("--test-name", default="fast", help="the test columns' name (NAME_mean, NAME_sd, NAME_sSEED)")
    p.add_argument("--test-seeds", type=int, nargs="+", default=[0, 1, 2], help="child seeds of the test")
    p.add_argument("--test-top", type=int, default=100, help="the best rules by reward that get test columns")
    p.add_argument("--test-task", default=None, help="the test's task (default: --task)")
    p.add_argument("--dry-run", action="store_true", help="print the space's numbers and the cost estimate; run nothing")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for flag, value in (("--task-options", a.task_options), ("--test-options", a.test_options)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{flag} must be a YAML mapping, got {value!r}")
    space = a.space
    if space not in SPACES:
        spec = yaml.safe_load(space)
        if not isinstance(spec, dict):
            raise ConfigError(f"--space: {space!r} is neither a space name nor a YAML mapping")
        try:
            space = SearchSpace(str(spec.get("name", "custom")), *(tuple(spec.get(k) or ()) for k in
                                                                     ("operands", "unary", "binary")))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--space: {e}") from e
    constraints = Constraints(not a.no_distinct_operands, not a.allow_final_addition, not a.no_reuse_result)
    backend = "ray" if a.ray_address else a.backend
    if a.dry_run:
        task = _make_task(a.task, a.task_options)
        plan = tab.plan_space(get_space(space), a.depth, constraints, task)
        print(plan.describe())
        funnel = tab.funnel_preview(plan.programs) if getattr(task, "supports_probe", True) else {}
        trained = funnel.get("trained", plan.rules)
        if funnel:
            print(f"the funnel on an empty store: {trained:,} trained, {funnel.get('fingerprint', 0):,} share a "
                  f"twin's score, {funnel.get('screen', 0):,} screened")
        if plan.images_per_rule is not None:
            print(f"estimated cost: {trained * plan.images_per_rule:.3g} child-images at most "
                  f"({plan.images_per_rule:,} a trained rule; fewer where every rate diverges)")
        tab.check_size(plan, max_rules=a.max_rules, max_child_images=a.max_child_images)
        return 0
    test = None
    if a.test_options is not None:
        test = tab.TestSpec(a.test_name, a.test_options, tuple(a.test_seeds), a.test_top, a.test_task)
    try:
        tab.tabulate(a.task, a.task_options, space=space, depth=a.depth, constraints=constraints, out=a.out,
                     name=a.name, store=a.store, backend=backend, workers=a.workers,
                     threads_per_worker=a.threads_per_worker, address=a.ray_address, job_size=a.job_size,
                     timeout=a.timeout, max_rules=a.max_rules, max_child_images=a.max_child_images, test=test,
                     progress=not a.no_progress)
    except KeyboardInterrupt:
        print("nos-gym tabulate: interrupted; every finished rule is in the store: run the same command again to "
              "resume", file=sys.stderr)
        return 130
    return 0


# ------------------------------------------------------------------------------ bench
def cmd_bench(argv: list[str]) -> int:
    """Show a NOS-Bench table (how it was made, its rewards, its best rules) or export it as CSV."""
    from nos_gym import bench
    from nos_gym.bench.report import plot, summary

    p = argparse.ArgumentParser(prog="nos-gym bench", description="Show a NOS-Bench table, or export it as CSV.")
    p.add_argument("table", nargs="?", default=None, help=f"a table's name or file (default {bench.DEFAULT})")
    p.add_argument("-k", "--top", type=int, default=10)
    p.add_argument("--hurdle", type=float, default=None, help="also say which rules this sweep hurdle cuts")
    p.add_argument("--csv", default=None, metavar="OUT.csv", help="write the rows as a plain CSV (and OUT.json)")
    p.add_argument("--list", action="store_true", help="list the tables shipped with this installation")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="also plot the reward distribution and the sweep against the reward (with --hurdle)")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(bench.available()) or f"no tables in {bench.TABLES_DIR}")
        return 0
    table = bench.load(a.table)
    if a.csv:
        print(f"{table.to_csv(a.csv)}: {len(table):,} rows; metadata in {Path(a.csv).with_suffix('.json')}")
        return 0
    print(summary(table, a.top, a.hurdle))
    if a.plot:
        print(f"plot: {plot(table, a.plot, a.hurdle)}")
    return 0


# ------------------------------------------------------------------------------- main
COMMANDS = {"search": cmd_search, "eval": cmd_eval, "top": cmd_top, "plot": cmd_plot, "export": cmd_export,
            "promote": cmd_promote, "tabulate": cmd_tabulate, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}  (nos-gym COMMAND --help for each)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nos-gym: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import sqlite3

    from nos_gym.agents.config import ConfigError
    from nos_gym.bench.table import RuleNotInTableError, TableError
    from nos_gym.evaluation.promotion import PromotionError
    from nos_gym.evaluation.tabulate import TabulateError

    try:
        return COMMANDS[command](rest)
    except (ConfigError, PromotionError, TableError, TabulateError, RuleNotInTableError, sqlite3.Error, OSError) as e:
        # a bad setting, a file that is not a (usable) store, a missing or unwritable path:
        # one line, no traceback (StoreError is a sqlite3.Error and names its file)
        print(f"nos-gym {command}: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nos-gym {command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | FileExistsError):
        text = f"{type(e).__name__}: {text}"  # "PermissionError: [Errno 13] ..."
    return text


if __name__ == "__main__":
    sys.exit(main())
