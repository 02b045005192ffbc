"""An agent's run: the search wired to its run directory (``nos_gym.agents.rundir``).

Every agent opens one ``Run``. It opens the run directory for the agent's settings (a new
one, or the one of ``--resume``), builds the evaluator and the ``OptimizerSearch-v0``
vector env from those settings, logs every batch of scored rules, shows a progress bar,
writes the leaderboard and, with the setting ``promote``, re-scores the best rules at a
higher fidelity when the run is complete. What keeps the directory whole (the lock, the
log, checksummed checkpoints, the resume checks, Ctrl-C and SIGTERM) is ``RunDir``'s; what
is searched is this module's. A run directory::

    runs/trpo_lstm-rosenbrock-s1-20260101-120000/
      config.yaml     every setting (and the agent's name); ``--resume`` reads it back
      log.jsonl       one line per sampled rule: sample index, batch, tokens, paper notation,
                      canonical key, reward, whether the score was reused (cached), metrics
      updates.jsonl   one line per batch: what the agent's update did (KL, surrogate, loss ...)
      checkpoint.pt   the agent's state after the last finished batch (controller,
                      optimizer, baseline, RNG states) and the sha256 of the log lines it
                      covers; a ``torch.save`` file
      checkpoint.pt.sha256   the checkpoint's sha256 (JSON), so a damaged one is refused
      top.txt         the best distinct rules in paper notation (also top.json)
      run.lock        held (``flock``) by the process using the run

and every scored rule goes to the SQLite store (``args.store``, shared by runs), so a rule
scored once -- in this run, an earlier one, or before an interruption -- is never scored
again: the records a resume cuts back to the checkpoint are sampled again from the same
RNG states and their scores read from the store.

Budget on resume: ``--total-rules`` may extend a run (finished or not) or shorten the
rest of it, but not below the rules already sampled; resuming a finished run without a
larger budget is an error (nothing to do). config.yaml is rewritten only when a setting
changed.

Ctrl-C: the first press asks the run to stop after the batch in progress (the loop
checks ``run.stop_requested``), which then is logged and checkpointed as usual; a second
press stops at once, keeping the last checkpoint. Either way the top-k file is written,
the command to resume is printed and the process exits with status 130. SIGTERM does the
same and exits with 143.

Errors: a setting, a run directory in use, damaged or unwritable, a full disk, the result
store -- each stops with a ``ConfigError`` (``RunError`` for the run directory): one line
that names the file and what to do; the command line turns it into exit status 2. A new
run that fails before it logged anything leaves no directory behind.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nos_gym.agents.config import ConfigError, RunArgs
from nos_gym.agents.reference import comparison, env_key
from nos_gym.agents.rundir import (
    CONFIG_FILE,
    RunDir,
    RunDirError,
    io_message,
    jsonable,
    one_line,
    read_log,
    run_files,
)

__all__ = ["Run", "RunError", "read_log", "top_rules", "format_top", "promote_run"]

TOP_TXT = "top.txt"
TOP_JSON = "top.json"


class RunError(ConfigError, RunDirError):
    """A run directory that cannot be used as asked: in use, damaged, unwritable, a full disk.

    A ``ConfigError``, so the command line prints it as one line and exits with status 2.
    """


# ------------------------------------------------------------------------- reading
def top_rules(records: Sequence[dict[str, Any]], k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` best distinct rules (by canonical key) of log records, best first.

    Ties keep the rule found first. Each item: rank, reward, rule, key, tokens, sample
    (the index of the first sample of that rule) and count (how often it was sampled).
    """
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        key = r["key"]
        if key in best:
            best[key]["count"] += 1
            continue
        best[key] = {"reward": float(r["reward"]), "rule": r["rule"], "key": key,
                     "tokens": list(r["tokens"]), "sample": int(r["sample"]), "count": 1}
    ranked = sorted(best.values(), key=lambda d: (-d["reward"], d["sample"]))[:k]
    for i, d in enumerate(ranked):
        d["rank"] = i + 1
    return ranked


def format_top(top: Sequence[dict[str, Any]], title: str = "") -> str:
    """A leaderboard as plain text: rank, reward, first sample, rule in paper notation."""
    lines = [title] if title else []
    lines.append(f"{'rank':>4}  {'reward':>7}  {'sample':>7}  rule")
    for d in top:
        lines.append(f"{d['rank']:>4}  {d['reward']:>7.4f}  {d['sample']:>7}  {d['rule']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Run
class Run:
    """One agent run: its directory (``self.dir``, a ``RunDir``), evaluator, envs, progress bar
    and leaderboard (see the module doc).

    Use as a context manager::

        with Run.open(args, "trpo_lstm", resume) as run:
            envs = run.make_envs()
            state = run.checkpoint          # None for a new run (or one rebuilt from its log)
            for batch in run.batches():     # resumes at the right batch, progress bar
                ... sample through envs, run.record(batch, infos, rewards), update ...
                run.save({...agent state...})
                if run.stop_requested: break
    """

    def __init__(self, path: Path, args: RunArgs, agent: str, resumed: bool, batches_per_checkpoint: int = 1):
        self.args = args
        self.agent = agent
        self.dir = RunDir(path, writer=agent, seed=args.seed, batch_size=args.num_envs,
                          batches_per_checkpoint=batches_per_checkpoint, resumed=resumed,
                          record_keys=("key", "reward"), error=RunError,
                          new_run_note=" (rules scored before come from the store, none is trained again)")
        self.path = self.dir.path
        self.name = self.path.name
        self.resumed = resumed
        #: batches between two checkpoints (1 for agents that save after every batch)
        self.batches_per_checkpoint = self.dir.batches_per_checkpoint
        self.log_path = self.dir.log_path
        self.checkpoint_path = self.dir.checkpoint_path
        self._evaluator = None
        self._envs = None
        self._bar = None

    # ------------------------------------------------------------------ the directory's state
    @property
    def checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint (saved, or accepted on resume; its agent state is ``["state"]``); None before one."""
        return self.dir.checkpoint

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record of the log so far, in order."""
        return self.dir.records

    @property
    def rebuilt(self) -> bool:
        """True when ``--rebuild`` continued the run from its log (the agent's state restarted)."""
        return self.dir.rebuilt

    @property
    def stop_requested(self) -> bool:
        """Set by the first Ctrl-C or SIGTERM: stop after the batch in progress."""
        return self.dir.stop_requested

    @property
    def interrupted(self) -> bool:
        """True when a signal stopped (or is stopping) the run."""
        return self.dir.interrupted

    @interrupted.setter
    def interrupted(self, value: bool) -> None:
        self.dir.interrupted = value

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, args: RunArgs, agent: str, resume: str | os.PathLike | None = None, *,
             rebuild: bool | None = None, batches_per_checkpoint: int = 1) -> Run:
        """A new run directory for ``args``, or the run in ``resume`` made ready to continue.

        ``args`` are validated first (so nothing is created for a bad setting). A new run
        seeds Python's, NumPy's and torch's global generators from ``args.seed``; a resumed
        one restores them from its checkpoint (agents keep their own generators in the
        checkpoint's ``state``). ``rebuild`` (default: ``resume.rebuild``, set by
        ``--rebuild``) continues a run whose checkpoint is missing or damaged from its log.
        ``batches_per_checkpoint``: how many batches the agent runs between two ``save``
        calls (how far the log may be ahead of the checkpoint after a kill).

        Raises ``ConfigError`` for a bad setting and ``RunError`` for a run directory that
        is in use, damaged or cannot be written.
        """
        args.validate()
        if rebuild is None:
            rebuild = bool(getattr(resume, "rebuild", False))
        if rebuild and resume is None:
            raise ConfigError("--rebuild continues a run from its log: it goes with --resume RUN_DIR")
        torch.set_num_threads(args.torch_threads)
        if resume is None:
            return cls._open_new(args, agent, batches_per_checkpoint)
        return cls._open_resumed(Path(resume), args, agent, rebuild, batches_per_checkpoint)

    @classmethod
    def _open_new(cls, args: RunArgs, agent: str, every: int) -> Run:
        path = Path(args.run_dir) if args.run_dir else _fresh_dir(Path(args.runs_root), agent, args)
        _refuse_a_run_there(path)
        run = cls(path, args, agent, resumed=False, batches_per_checkpoint=every)
        run.dir.make()
        args.run_dir = str(path)
        try:
            run.dir.lock()
            _refuse_a_run_there(path)  # another process may have started one there meanwhile
            run.dir.seed_globals()
            run._write_config()
            run.dir.open_log()
        except BaseException:
            run.dir.discard()
            raise
        return run

    @classmethod
    def _open_resumed(cls, path: Path, args: RunArgs, agent: str, rebuild: bool, every: int) -> Run:
        run = cls(path, args, agent, resumed=True, batches_per_checkpoint=every)
        try:
            run.dir.lock()
            run.dir.check_resume(rebuild)  # refuses a damaged directory, changing nothing
            run._check_budget()
            run.dir.resume()               # cuts the log back to the checkpoint, restores the RNG states
            run._write_config(only_if_changed=True)
            run.dir.open_log()
        except BaseException:
            run.dir.close()
            raise
        return run

    def _write_config(self, only_if_changed: bool = False) -> None:
        self.dir.write_config({"agent": self.agent, **asdict(self.args)}, only_if_changed=only_if_changed)

    def _check_budget(self) -> None:
        """A resumed run must have something to do, and cannot shrink below what it sampled."""
        if self.num_batches > self.batch_index:
            return
        done, total = self.samples, self.args.total_rules
        more = self.batch_index * self.args.num_envs
        if total < done:
            raise RunError(f"cannot resume {self.path} with --total-rules {total}: it has already sampled {done} "
                           f"rules and a run cannot shrink; pass --total-rules N with N > {more} to extend it")
        raise RunError(f"{self.path} is finished: {done} rules sampled, its budget is {total}; nothing to do. "
                       f"To extend it, pass --total-rules N with N > {more}")

    # ------------------------------------------------------------------ progress
    @property
    def samples(self) -> int:
        """Rules logged so far (including before a resume)."""
        return self.dir.samples

    @property
    def num_batches(self) -> int:
        """Batches in the whole budget: ceil(total_rules / num_envs)."""
        return math.ceil(self.args.total_rules / self.args.num_envs)

    @property
    def batch_index(self) -> int:
        """Batches finished (checkpointed) so far."""
        return self.dir.batch_index

    @property
    def next_batch(self) -> int:
        """The index of the batch the next ``record`` call logs (batches before it are in the log)."""
        return self.dir.next_batch

    def batch_index_after_save(self) -> int:
        """Batches finished once the batch just logged is counted (a batch is ``num_envs`` records)."""
        return self.dir.next_batch

    @property
    def finished(self) -> bool:
        return self.batch_index >= self.num_batches

    def batches(self) -> Iterator[int]:
        """Indices of the batches still to run, with a progress bar; stops early on Ctrl-C."""
        self.start_progress()
        try:
            for b in range(self.batch_index, self.num_batches):
                if self.stop_requested:
                    break
                yield b
        finally:
            self.close_progress()

    def start_progress(self) -> None:
        """Open the tqdm bar over the budget (``batches()`` does it; agents with their own loop call it)."""
        from tqdm.auto import tqdm

        total = self.num_batches * self.args.num_envs
        self._bar = tqdm(total=total, initial=min(self.samples, total), unit="rule", dynamic_ncols=True,
                         desc=f"{self.agent} {self.args.task}", disable=not self.args.progress,
                         file=sys.stderr)
        if self.records:
            self._bar.set_postfix(best=f"{max(r['reward'] for r in self.records):.3f}", refresh=False)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ the env
    @property
    def evaluator(self):
        """The evaluator every rule is scored through (store-backed, shared by the envs)."""
        if self._evaluator is None:
            from nos_gym.evaluation import Evaluator

            a = self.args
            store = a.store or None
            try:
                if store is not None and store != ":memory:":
                    Path(store).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
                self._evaluator = Evaluator(a.task, backend=a.backend, store=store, run=self.name,
                                            timeout=a.eval_timeout, address=a.ray_address or None,
                                            fingerprints=a.fingerprints, screen=a.screen, **a.task_options)
            except ConnectionError as e:
                raise RunError(f"backend {a.backend!r}: cannot connect to {a.ray_address or '$RAY_ADDRESS'}: "
                               f"{one_line(e)}; check --ray-address{self.dir.then_hint()}") from None
            except OSError as e:
                raise RunError(io_message(e, "open the result store", Path(str(store)),
                                          advice="choose a writable --store (or --store '' for none)",
                                          then=self.dir.then_hint())) from None
            except sqlite3.Error as e:
                raise self._store_error(e) from None
        return self._evaluator

    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``OptimizerSearch-v0`` that match this run's settings."""
        a = self.args
        return dict(evaluator=self.evaluator, depth=a.depth, space=a.space,
                    distinct_operands=a.distinct_operands, no_final_addition=a.no_final_addition,
                    reuse_result=a.reuse_result)

    def make_envs(self, invalid_action: str = "raise"):
        """The vector env of ``num_envs`` lockstep sub-envs (one batch of rules scored together).

        ``invalid_action="raise"``: our agents always sample with the masks, so an invalid
        token is a bug that must not be silently projected.
        """
        if self._envs is None:
            import gymnasium as gym

            import nos_gym  # noqa: F401  (registers the env ids)

            self._envs = gym.make_vec("OptimizerSearch-v0", num_envs=self.args.num_envs,
                                      vectorization_mode="vector_entry_point", invalid_action=invalid_action,
                                      **self.env_kwargs())
        return self._envs

    # ------------------------------------------------------------------ recording
    def record(self, batch: int, infos: Sequence[dict[str, Any]], rewards: Sequence[float]) -> list[dict[str, Any]]:
        """Log one batch of finished rules (terminal env infos and rewards); returns the records."""
        new = self.dir.append(batch, [
            {"reward": float(reward), "rule": info["rule"], "key": info["canonical_key"],
             "tokens": list(info["tokens"]), "cached": bool(info.get("cached", False)),
             "source": info.get("source", "trained"), "error": info.get("error"),
             "metrics": jsonable(info.get("metrics", {}))}
            for info, reward in zip(infos, rewards)])
        if self._bar is not None and new:
            best = max(r["reward"] for r in self.records)
            self._bar.set_postfix(best=f"{best:.3f}", batch_mean=f"{float(np.mean([r['reward'] for r in new])):.3f}",
                                  refresh=False)
            self._bar.update(len(new))
        return new

    def restore_global_rng(self) -> None:
        """Set Python's, NumPy's and torch's global generators back to the checkpoint's states."""
        self.dir.restore_global_rng()

    def log_update(self, batch: int, stats: dict[str, Any]) -> None:
        """Append what the agent's update after ``batch`` did to ``updates.jsonl``."""
        self.dir.append_update(batch, stats)

    def restore(self, **objects: Any) -> bool:
        """On ``--resume``, load each object's saved state from the checkpoint: ``name=obj`` for
        an object saved as ``state[name]``, through its ``load_state_dict`` (a module, an
        optimizer, a baseline) or ``set_state`` (a ``torch.Generator``). False (nothing loaded)
        for a new run."""
        if self.checkpoint is None:
            return False
        state = self.checkpoint["state"]
        for name, obj in objects.items():
            (obj.set_state if isinstance(obj, torch.Generator) else obj.load_state_dict)(state[name])
        return True

    def save(self, state: dict[str, Any]) -> None:
        """Checkpoint the agent's ``state`` (plus the run's counters and global RNG states), atomically
        (``RunDir.save``: a kill at any point leaves a checkpoint that verifies)."""
        self.dir.save(state)

    def top(self, k: int | None = None) -> list[dict[str, Any]]:
        return top_rules(self.records, k or self.args.top_k)

    def write_top(self) -> str:
        """Write top.txt and top.json (each atomically) and return the text."""
        top = self.top()
        text = format_top(top, title=f"top {len(top)} rules of {self.name} ({self.samples} sampled rules, "
                                     f"task {self.args.task})")
        self.dir.write_atomic(TOP_TXT, (text + "\n").encode())
        self.dir.write_atomic(TOP_JSON, (json.dumps(top, indent=1) + "\n").encode())
        return text

    def versus_benchmark(self) -> str | None:
        """This finished run beside the agents benchmark's medians on the same env and budget
        (``nos_gym.agents.reference``); None where the benchmark has no such env and budget."""
        records = self.records[: self.args.total_rules]
        try:
            return comparison(env_key(self.args), [r["reward"] for r in records], [r["key"] for r in records])
        except ValueError as e:  # a damaged reference file costs the comparison, never the run
            return f"(no comparison with the agents benchmark: {e})"

    # ------------------------------------------------------------------ errors
    def _store_error(self, e: sqlite3.Error) -> RunError:
        text = one_line(e)
        then = self.dir.then_hint()
        if type(e).__name__ == "StoreError":  # nos_gym.store's own message names the file and what to do
            return RunError(f"{text}{then}")
        low = text.lower()
        if "full" in low:
            advice = "free some disk space"
        elif "readonly" in low or "read-only" in low or "unable to open" in low:
            advice = "choose a writable --store (or --store '' for none)"
        else:
            advice = "check the store file, or choose another --store"
        return RunError(f"the result store {self.args.store}: {text}; {advice}{then}")

    def _as_run_error(self, exc: BaseException | None) -> BaseException | None:
        """The one-line error an exception ending the run becomes (None: let it through as it is)."""
        if exc is None or isinstance(exc, ConfigError):
            return exc
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
            name = exc.filename if exc.filename is not None else "a file"
            return RunError(io_message(exc, "use", Path(str(name)), then=self.dir.then_hint()))
        if isinstance(exc, sqlite3.Error):
            return self._store_error(exc)
        return exc

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> Run:
        # Ctrl-C and SIGTERM: finish the batch in flight, save, and exit 128 + the signal (130, 143)
        self.dir.catch_stop_signals()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.dir.release_stop_signals()
        hard_stop = exc_type is KeyboardInterrupt
        if hard_stop:
            self.interrupted = True
        failed = exc_type is not None and issubclass(exc_type, Exception)
        error = self._as_run_error(exc) if failed else None
        completed = exc_type is None and not self.interrupted and self.finished  # ran its whole budget
        try:
            self.close()
            if failed and not self.resumed and not self.records:
                self.dir.discard()  # a new run that failed before logging a rule leaves nothing behind
            elif self.records:
                try:
                    text = self.write_top()
                except RunError as e:
                    if error is None:
                        error = e
                else:
                    if error is None and (exc_type is None or hard_stop):
                        print(text)
                    if error is None and completed:
                        versus = self.versus_benchmark()
                        if versus:
                            print(versus)
            if error is None and completed and self.args.promote:
                error = self._promote_at_end()
            if self.interrupted and error is None:
                print(f"[nos-gym] stopped after {self.samples} rules ({self.batch_index} batches checkpointed); "
                      f"continue with:  --resume {self.path}", file=sys.stderr, flush=True)
        finally:
            self.dir.unlock()
        if error is not None and error is not exc:
            raise error from exc
        if error is None and (hard_stop or (self.interrupted and exc_type is None)):
            raise SystemExit(128 + int(self.dir.stop_signal))  # stopped by a signal: not a finished run (130, 143)
        return False

    def _promote_at_end(self) -> RunError | None:
        """The setting ``promote``: re-score the best rules at a higher fidelity (``nos_gym.evaluation.promotion``);
        skipped when the run's current leaderboard was promoted before (a finished run resumed)."""
        from nos_gym.evaluation.promotion import promotion_label

        s = self.args.promote
        label = promotion_label(s.get("preset"), s.get("seeds", ()))
        done = self.path / f"promoted-{label}.json"
        try:
            if json.loads(done.read_text()).get("run_samples") == self.samples:
                return None
        except (OSError, ValueError):
            pass
        again = (f"nos-gym promote {self.path} {'--preset ' + s['preset'] if s.get('preset') else ''} "
                 f"--top {s.get('top', 10)}{' --seeds ' + ' '.join(map(str, s['seeds'])) if s.get('seeds') else ''}")
        print(f"[nos-gym] the run is complete; promoting its best {s.get('top', 10)} rules to {label}",
              file=sys.stderr, flush=True)
        try:
            board = promote_run(self.path, preset=s.get("preset"), top=s.get("top", 10), seeds=s.get("seeds", ()),
                                task_options=s.get("task_options"), store=self.args.store or "",
                                backend=s.get("backend", self.args.backend))
        except KeyboardInterrupt:
            print(f"[nos-gym] promotion interrupted; the run is complete: promote with  {again}", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as e:  # noqa: BLE001 - the run's own results are safe: say how to promote again
            return RunError(f"the run is complete, but promoting its best rules failed: {' '.join(str(e).split())}; "
                            f"promote with  {again}")
        print(board.text())
        print(f"[nos-gym] saved {' and '.join(map(str, board.saved))}", file=sys.stderr, flush=True)
        return None

    def close(self) -> None:
        """Close the progress bar, the log, the envs and the evaluator (the lock is released by ``__exit__``)."""
        self.close_progress()
        self.dir.close_log()
        if self._envs is not None:
            self._envs.close()
            self._envs = None
        if self._evaluator is not None:
            close = getattr(self._evaluator, "close", None)
            if close is not None:
                close()
            self._evaluator = None


# ------------------------------------------------------------------------- promotion
def promote_run(run_dir: str | os.PathLike, *, preset: str | None, top: int = 10, task: str | None = None,
                task_options: dict[str, Any] | None = None, seeds: Sequence[int] = (), store: str | None = None,
                backend: str = "auto", out: str | os.PathLike | None = None, quiet: bool = False):
    """Re-score a run's best ``top`` distinct rules at a higher fidelity (``nos_gym.evaluation.promotion``) and save
    ``promoted-LABEL.txt/.json`` in ``out`` (default: the run directory). ``task``: the run's own by
    default, with its options' protocol replaced by ``preset``; ``seeds``: score each rule at these task
    seeds and rank by the mean; ``store``: the run's store by default ('' for none). Returns the
    ``Leaderboard``."""
    from nos_gym.agents.config import load_yaml
    from nos_gym.evaluation.promotion import promote, promotion_label, promotion_options

    path = Path(run_dir)
    config = load_yaml(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
    task_name = task or config.get("task") or "convnet-cifar10"
    base = dict(config.get("task_options") or {}) if task_name == config.get("task") else {}
    records = read_log(path)
    candidates = [{"rule": d["rule"], "key": d["key"], "tokens": d["tokens"], "reward": d["reward"]}
                  for d in top_rules(records, top)]
    title = f"{path}: the best {len(candidates)} of {len({r['key'] for r in records})} distinct rules"
    board = promote(candidates, task_name, promotion_options(task_name, base, preset, task_options), title=title,
                    source=str(path), seeds=seeds, store=config.get("store", "") if store is None else store,
                    backend=backend, quiet=quiet)
    board.run_samples = len(records)  # a resumed run that sampled more is promoted afresh
    board.save(out if out is not None else path, promotion_label(preset, seeds))
    return board


# ------------------------------------------------------------------------- helpers
def _refuse_a_run_there(path: Path) -> None:
    """A new run never goes where a run (or what is left of one) already is."""
    found = run_files(path)
    if CONFIG_FILE in found:
        raise ConfigError(f"config key 'run_dir': {path} already holds a run; continue it with "
                          f"--resume {path}, or choose another run_dir")
    if found:
        raise ConfigError(f"config key 'run_dir': {path} holds {', '.join(found)} of a run but no {CONFIG_FILE}; "
                          f"choose another run_dir (a new run would mix its log with that one)")


def _fresh_dir(root: Path, agent: str, args: RunArgs) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / f"{agent}-{args.task}-s{args.seed}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path
