"""Run directories: config, a log of every sampled rule, checkpoints, top-k, the store.

Every agent run writes one directory::

    runs/trpo_lstm-rosenbrock-s1-20260101-120000/
      config.yaml     every setting (and the agent's name); ``--resume`` reads it back
      log.jsonl       one line per sampled rule: sample index, batch, tokens, paper notation,
                      canonical key, reward, whether the score was reused (cached), metrics
      updates.jsonl   one line per batch: what the agent's update did (KL, surrogate, loss ...)
      checkpoint.pt   the agent's state after the last finished batch (controller,
                      optimizer, baseline, RNG states), written atomically
      top.txt         the best distinct rules in paper notation (also top.json)

and records every scored rule in the SQLite store (``args.store``, shared by runs), so a
rule scored once -- in this run, an earlier one, or before an interruption -- is never
scored again.

Resuming: the checkpoint says how many rules had been logged when it was written; the
log is cut back to that many lines (a batch logged but not checkpointed is re-sampled
with the restored RNG state, and its scores come back from the store), then the run
continues appending.

Ctrl-C: the first press asks the run to stop after the batch in progress (the loop
checks ``run.stop_requested``), which then is logged and checkpointed as usual; a second
press stops at once, keeping the last checkpoint. Either way the top-k file is written
and the command to resume is printed.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import yaml

from nos_gym.agents.config import ConfigError, RunArgs

__all__ = ["Run", "read_log", "top_rules", "format_top"]

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
UPDATES_FILE = "updates.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
TOP_TXT = "top.txt"
TOP_JSON = "top.json"


# ------------------------------------------------------------------------- reading
def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl`` (a half-written last line is ignored)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a run directory?")
    out = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # killed mid-write: everything before it is whole
    return out


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
    """One agent run's directory, log, checkpoints and env/evaluator (see the module doc).

    Use as a context manager::

        with Run.open(args, "trpo_lstm", resume) as run:
            envs = run.make_envs()
            state = run.checkpoint          # None for a new run
            for batch in run.batches():     # resumes at the right batch, progress bar
                ... sample through envs, run.record(batch, infos, rewards), update ...
                run.save({...agent state...})
                if run.stop_requested: break
    """

    def __init__(self, path: Path, args: RunArgs, agent: str, resumed: bool):
        self.path = path
        self.args = args
        self.agent = agent
        self.resumed = resumed
        self.name = path.name
        self.log_path = path / LOG_FILE
        self.checkpoint_path = path / CHECKPOINT_FILE
        self.checkpoint: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        self.stop_requested = False
        self.interrupted = False
        self._t0 = time.time()
        self._elapsed_before = 0.0
        self._evaluator = None
        self._envs = None
        self._log_file = None
        self._old_handler: Any = None
        self._bar = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, args: RunArgs, agent: str, resume: str | None = None) -> "Run":
        """A new run directory for ``args``, or the run in ``resume`` made ready to continue.

        A new run seeds Python's, NumPy's and torch's global generators from ``args.seed``;
        a resumed one restores them from its checkpoint (agents keep their own generators
        in the checkpoint's ``state``).
        """
        torch.set_num_threads(args.torch_threads)
        if resume is not None:
            path = Path(resume)
            run = cls(path, args, agent, resumed=True)
            run._load_for_resume()
        else:
            path = Path(args.run_dir) if args.run_dir else _fresh_dir(Path(args.runs_root), agent, args)
            if (path / CONFIG_FILE).exists():
                raise ConfigError(f"config key 'run_dir': {path} already holds a run; continue it with "
                                  f"--resume {path}, or choose another run_dir")
            path.mkdir(parents=True, exist_ok=True)
            args.run_dir = str(path)
            run = cls(path, args, agent, resumed=False)
        if run.checkpoint is None:  # a new run (or one stopped before its first checkpoint)
            random.seed(args.seed)
            np.random.seed(args.seed % 2**32)
            torch.manual_seed(args.seed)
        run._write_config()
        run._log_file = run.log_path.open("a")
        return run

    def _write_config(self) -> None:
        data = {"agent": self.agent, **asdict(self.args)}
        tmp = self.path / (CONFIG_FILE + ".tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, self.path / CONFIG_FILE)

    def _load_for_resume(self) -> None:
        if not self.checkpoint_path.is_file():
            # stopped before its first batch finished: start it over in the same directory
            self.records = []
            for name in (LOG_FILE, UPDATES_FILE):
                if (self.path / name).exists():
                    (self.path / name).unlink()
            return
        self.checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        n = int(self.checkpoint["samples"])
        records = read_log(self.path) if self.log_path.exists() else []
        if len(records) < n:
            raise RuntimeError(f"{self.log_path} has {len(records)} records but the checkpoint expects {n}; "
                               f"the run directory is damaged")
        self.records = records[:n]
        if len(records) != n or not _ends_clean(self.log_path):
            # cut back to the checkpoint: the rest is re-sampled and read from the store
            tmp = self.path / (LOG_FILE + ".tmp")
            with tmp.open("w") as f:
                for r in self.records:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, self.log_path)
        updates = self.path / UPDATES_FILE
        if updates.exists():
            batch = int(self.checkpoint["batch"])
            keep = [line for line in updates.read_text().splitlines()
                    if line.strip() and _batch_of(line) is not None and _batch_of(line) < batch]
            updates.write_text("".join(line + "\n" for line in keep))
        self._elapsed_before = float(self.checkpoint.get("elapsed", 0.0))
        _set_global_rng_states(self.checkpoint["global_rng"])

    # ------------------------------------------------------------------ progress
    @property
    def samples(self) -> int:
        """Rules logged so far (including before a resume)."""
        return len(self.records)

    @property
    def num_batches(self) -> int:
        """Batches in the whole budget: ceil(total_rules / num_envs)."""
        return math.ceil(self.args.total_rules / self.args.num_envs)

    @property
    def batch_index(self) -> int:
        """Batches finished so far."""
        return 0 if self.checkpoint is None else int(self.checkpoint["batch"])

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

            store = self.args.store or None
            if store is not None and store != ":memory:":
                Path(store).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            self._evaluator = Evaluator(self.args.task, backend=self.args.backend, store=store, run=self.name,
                                        **self.args.task_options)
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
        now = self._elapsed_before + time.time() - self._t0
        new = []
        for info, reward in zip(infos, rewards):
            rec = {"sample": len(self.records), "batch": int(batch), "reward": float(reward),
                   "rule": info["rule"], "key": info["canonical_key"], "tokens": list(info["tokens"]),
                   "cached": bool(info.get("cached", False)), "error": info.get("error"),
                   "metrics": _jsonable(info.get("metrics", {})), "time": round(now, 3)}
            self.records.append(rec)
            new.append(rec)
        for rec in new:
            self._log_file.write(json.dumps(rec) + "\n")
        self._log_file.flush()
        if self._bar is not None and new:
            best = max(r["reward"] for r in self.records)
            self._bar.set_postfix(best=f"{best:.3f}", batch_mean=f"{float(np.mean([r['reward'] for r in new])):.3f}",
                                  refresh=False)
            self._bar.update(len(new))
        return new

    def restore_global_rng(self) -> None:
        """Set Python's, NumPy's and torch's global generators back to the checkpoint's states."""
        if self.checkpoint is not None:
            _set_global_rng_states(self.checkpoint["global_rng"])

    def log_update(self, batch: int, stats: dict[str, Any]) -> None:
        """Append what the agent's update after ``batch`` did to ``updates.jsonl``."""
        with (self.path / UPDATES_FILE).open("a") as f:
            f.write(json.dumps({"batch": int(batch), **_jsonable(stats)}) + "\n")

    def save(self, state: dict[str, Any]) -> None:
        """Checkpoint the agent's ``state`` (plus the run's counters and global RNG states), atomically."""
        os.fsync(self._log_file.fileno())
        ckpt = {
            "agent": self.agent,
            "batch": self.batch_index_after_save(),
            "samples": self.samples,
            "elapsed": self._elapsed_before + time.time() - self._t0,
            "global_rng": _global_rng_states(),
            "state": state,
        }
        tmp = self.path / (CHECKPOINT_FILE + ".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, self.checkpoint_path)
        self.checkpoint = ckpt

    def batch_index_after_save(self) -> int:
        """Batches finished once the batch just logged is counted (a batch is ``num_envs`` records)."""
        return math.ceil(self.samples / self.args.num_envs)

    def top(self, k: int | None = None) -> list[dict[str, Any]]:
        return top_rules(self.records, k or self.args.top_k)

    def write_top(self) -> str:
        top = self.top()
        text = format_top(top, title=f"top {len(top)} rules of {self.name} ({self.samples} sampled rules, "
                                     f"task {self.args.task})")
        (self.path / TOP_TXT).write_text(text + "\n")
        (self.path / TOP_JSON).write_text(json.dumps(top, indent=1) + "\n")
        return text

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> "Run":
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.interrupted = True
        print("\n[nos-gym] Ctrl-C: stopping after this batch and saving (press Ctrl-C again to stop now, "
              "keeping the last checkpoint)", file=sys.stderr, flush=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if self._old_handler is not None:
            signal.signal(signal.SIGINT, self._old_handler)
            self._old_handler = None
        hard_stop = exc_type is KeyboardInterrupt
        if hard_stop:
            self.interrupted = True
        self.close()
        if self.records:
            text = self.write_top()
            if exc_type is None or hard_stop:
                print(text)
        if self.interrupted:
            print(f"[nos-gym] stopped after {self.samples} rules ({self.batch_index} batches checkpointed); "
                  f"continue with:  --resume {self.path}", file=sys.stderr, flush=True)
        if hard_stop:
            raise SystemExit(130)
        return False

    def close(self) -> None:
        self.close_progress()
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.flush()
            self._log_file.close()
        if self._envs is not None:
            self._envs.close()
            self._envs = None
        if self._evaluator is not None:
            close = getattr(self._evaluator, "close", None)
            if close is not None:
                close()
            self._evaluator = None

    @property
    def finished(self) -> bool:
        return self.batch_index >= self.num_batches


# ------------------------------------------------------------------------- helpers
def _fresh_dir(root: Path, agent: str, args: RunArgs) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / f"{agent}-{args.task}-s{args.seed}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _batch_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["batch"])
    except (ValueError, KeyError, TypeError):
        return None


def _ends_clean(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _global_rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_global_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _jsonable(obj: Any) -> Any:
    """Metrics as JSON (non-finite floats as None, unknown objects as strings)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return str(obj)
