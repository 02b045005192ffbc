"""The ``nos-gym`` command.

    nos-gym search --agent trpo_lstm --task rosenbrock [agent flags ...]
    nos-gym search --config configs/paper.yaml
    nos-gym eval "g * exp(sign(g) * sign(m))" --task rosenbrock
    nos-gym top runs/trpo_lstm-rosenbrock-s1-...        # a run's leaderboard
    nos-gym top runs/store.sqlite                        # the store's, per task
    nos-gym plot runs/trpo_lstm-rosenbrock-s1-...       # reward vs sampled rules (Figure 4), PNG
    nos-gym export runs/store.sqlite copy.sqlite         # a consistent single-file copy (or .jsonl, .csv)

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
    """Figure 4 of the paper for runs: each sampled rule's reward, its moving average and the best so far.

    Returns the path written: ``out``, with ".png" added when its suffix is not an image
    format matplotlib writes (the suffix picks the format: png, pdf, svg, ...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from nos_gym.agents import ConfigError, read_log

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for d in run_dirs:
        records = read_log(d)
        if not records:
            raise ConfigError(f"{d} has no sampled rules yet")
        r = np.array([rec["reward"] for rec in records])
        x = np.arange(1, len(r) + 1)
        label = d.name
        ax.scatter(x, r, s=2, alpha=0.25)
        w = max(1, min(window, len(r)))
        moving = np.convolve(r, np.ones(w) / w, mode="valid")
        line, = ax.plot(x[w - 1:], moving, lw=1.5, label=f"{label}: moving average ({w})")
        ax.plot(x, np.maximum.accumulate(r), lw=1, ls="--", color=line.get_color(), label=f"{label}: best so far")
    ax.set_xlabel("Number of sampled optimizers")
    ax.set_ylabel("Controller reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("Controller reward as more optimizers are sampled")
    fig.tight_layout()
    fmt = Path(out).suffix.lower().lstrip(".")
    if fmt not in fig.canvas.get_supported_filetypes():
        out, fmt = Path(f"{out}.png"), "png"  # "-o out/x" writes out/x.png, and says so
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, format=fmt)
    plt.close(fig)
    return out


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
    from nos_gym.promotion import promote_store

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


# ------------------------------------------------------------------------------- main
COMMANDS = {"search": cmd_search, "eval": cmd_eval, "top": cmd_top, "plot": cmd_plot, "export": cmd_export,
            "promote": cmd_promote}


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
    from nos_gym.promotion import PromotionError

    try:
        return COMMANDS[command](rest)
    except (ConfigError, PromotionError, sqlite3.Error, OSError) as e:
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
