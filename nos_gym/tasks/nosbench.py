"""The task ``"nosbench"``: a rule's reward read from a NOS-Bench table, at no cost.

``NOSBenchTask(table="small1-cifar10-cpu")`` scores a rule with its row of the table
(``nos_gym.bench``): the reward the child task gave it when the table was made. It trains
nothing, so the Evaluator runs it in-process, and it opts out of the probe: the table's
rows already record how the funnel settled each rule, and ``Result.source`` repeats it
("trained", "fingerprint", "screen"), as ``info["source"]`` is live.

``metrics`` carry the row's cost and test score: ``child_images`` and ``train_seconds``
(what scoring the rule by training cost when the table was made; a screened rule 0, a
fingerprint row its twin's), ``lr``, ``sweep_accuracy``, ``fidelity``, and the test
score where the table has one (``fast`` and ``fast_sd``, named after the table's test),
plus ``table``.

``hurdle``: the ConvNet task's fixed hurdle applied to the table (``BenchTable``): the
reward is what the live task with ``hurdle=h`` returns -- below the hurdle a rule scores
its sweep accuracy (``metrics["hurdled"]``), a rule that diverged at every rate 0.

A rule the table lacks (another space, depth or constraints) raises
``RuleNotInTableError`` naming the table and the space it covers: from ``evaluate``
and, through ``check_programs``, from the Evaluator (and so from the env's ``step``)
before anything is scored; it never scores 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from nos_gym.bench import DEFAULT, BenchTable, load
from nos_gym.dsl import Program
from nos_gym.tasks.base import Result, Task

__all__ = ["NOSBenchTask"]


class NOSBenchTask(Task):
    """Rewards from a NOS-Bench table (see the module doc).

    Args:
        table: a shipped table's name (``nos_gym.bench.available()``) or the path of a table file.
        hurdle: a fixed sweep-accuracy hurdle applied to the table (None: the table's own rewards).
    """

    name = "nosbench"
    version = 1
    supports_probe = False  # every rule of the space has its row: nothing to screen or share
    parallel = False

    def __init__(self, table: str | os.PathLike | BenchTable = DEFAULT, hurdle: float | None = None):
        self.table = table if isinstance(table, BenchTable) else load(table)
        if hurdle is not None:
            self.table.check_hurdle(hurdle)
            hurdle = float(hurdle)
        self.hurdle = hurdle
        test = self.table.test_name
        self._test_columns = (f"{test}_mean", f"{test}_sd") if test else None

    def __getstate__(self) -> dict[str, Any]:  # a worker process loads the table from its file
        state = dict(self.__dict__)
        state["table"] = str(self.table.path)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["table"] = load(state["table"])
        self.__dict__.update(state)

    def screen_score(self) -> float | None:
        return None

    def config(self) -> dict[str, Any]:
        return {"table": self.table.name, "sha256": self.table.meta["sha256"], "hurdle": self.hurdle}

    def check_programs(self, programs: Sequence[Program]) -> None:
        """Raise ``RuleNotInTableError`` for the first program outside the table."""
        self.table.index(programs)

    def evaluate(self, programs: Sequence[Program]) -> list[Result]:
        programs = list(programs)
        rows = self.table.lookup(programs)
        rewards = self.table.rewards(programs, self.hurdle)
        out = []
        for row, reward in zip(rows, rewards.tolist()):
            metrics: dict[str, Any] = {"table": self.table.name, "child_images": row["child_images"],
                                       "train_seconds": row["train_seconds"], "lr": row["lr"],
                                       "sweep_accuracy": row["sweep_accuracy"], "fidelity": row["fidelity"]}
            if self._test_columns is not None:
                mean, sd = self._test_columns
                metrics[mean[: -len("_mean")]] = row[mean]
                metrics[sd] = row[sd]
            if self.hurdle is not None:
                metrics["hurdle"] = self.hurdle
                metrics["hurdled"] = (row["source"] != "screen" and row["lr"] is not None
                                      and row["sweep_accuracy"] is not None and row["sweep_accuracy"] < self.hurdle)
            if row["source"] == "fingerprint":
                metrics["equivalent_key"] = row["equivalent_to"]
            if row["source"] == "screen":
                metrics["screen"] = row["screen"]
            out.append(Result(reward, metrics, row["error"], source=row["source"]))
        return out

    def __repr__(self) -> str:
        return f"NOSBenchTask({self.table.name!r}, hurdle={self.hurdle})"
