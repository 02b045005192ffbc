"""Shared pieces of the reproduction benchmarks: presets, run headers, tables, Table 1 bookkeeping.

Used by ``rosenbrock_figure6.py``, ``convnet_transfer.py`` and ``wrn_transfer.py`` (run them
from the repository root as ``python benchmarks/NAME.py``; this directory is then on
``sys.path``). Nothing here trains anything.

Table 1 (Bello et al. 2017) defines, for one optimizer:

- Final Val / Final Test: validation / test accuracy after the last epoch;
- Best Val: the best validation accuracy over the epochs;
- Best Test: the test accuracy *at the epoch where the validation accuracy was highest*;
- each reported for the best of the learning-rate grid "according to the validation
  accuracy". We read that as the highest Best Val (ties: the higher Final Val, then the
  smaller rate); a run that diverged (non-finite loss or weights) is not eligible unless
  every rate diverged. ``select="final"`` chooses by Final Val instead.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: default root of benchmark outputs (git-ignored)
OUT_ROOT = Path(__file__).resolve().parent / "out"

#: Table 1 of the paper (Wide ResNet on CIFAR-10, 300 epochs): name -> (Final Val, Final Test,
#: Best Val, Best Test), in percent, keyed like ``nos_gym.optim.table1()``.
PAPER_TABLE1: dict[str, tuple[float, float, float, float]] = {
    "sgd": (92.0, 91.8, 92.9, 91.9),
    "momentum": (92.7, 92.1, 93.1, 92.3),
    "adam": (90.4, 90.1, 91.8, 90.7),
    "rmsprop": (90.7, 90.3, 91.4, 90.3),
    "optimizer_1": (92.5, 92.4, 93.8, 93.1),
    "clipm_expv": (93.5, 92.5, 93.8, 92.7),
    "m_expv": (93.1, 92.4, 93.8, 92.6),
    "powersign": (93.1, 92.8, 93.8, 92.8),
    "dropg03_powersign": (92.7, 92.2, 93.6, 92.7),
    "m_expg2": (93.1, 92.5, 93.6, 92.4),
    "dropm01_div_expg2": (92.6, 92.4, 93.5, 93.0),
    "dropg01_powersign": (92.8, 92.4, 93.5, 92.2),
    "cliprmsprop_plus_dropm03": (90.8, 90.8, 91.4, 90.9),
    "adam_powersign": (92.6, 92.0, 93.4, 92.0),
    "adam_expm": (92.9, 92.8, 93.3, 92.7),
    "g_plus_dropm03": (93.4, 92.9, 93.7, 92.9),
    "dropm01_expg3": (92.8, 92.7, 93.7, 92.8),
    "g_minus_clipg2": (93.4, 92.8, 93.7, 92.8),
    "expg_minus_expm": (93.2, 92.5, 93.5, 93.1),
    "optimizer_2": (93.2, 93.0, 93.5, 93.2),
}

#: Figure 5 / Figure 7: the four baselines and the two discovered optimizers they plot
FIGURE_BASELINES = ("adam", "momentum", "rmsprop", "sgd")
FIGURE_OPTIMIZERS = ("optimizer_1", "optimizer_2")


#: torch's own optimizers for the baselines, with TensorFlow's defaults where the paper used
#: TensorFlow (RMSProp decay 0.9 and eps 1e-10; Momentum 0.9, heavy ball): name ->
#: (what is printed, factory(params or param groups, lr)).
TORCH_BASELINES: dict[str, tuple[str, Any]] = {
    "sgd": ("torch.optim.SGD", lambda params, lr: _torch().optim.SGD(params, lr=lr)),
    "momentum": ("torch.optim.SGD(momentum=0.9)", lambda params, lr: _torch().optim.SGD(params, lr=lr, momentum=0.9)),
    "adam": ("torch.optim.Adam", lambda params, lr: _torch().optim.Adam(params, lr=lr)),
    "rmsprop": ("torch.optim.RMSprop(alpha=0.9, eps=1e-10)",
                lambda params, lr: _torch().optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-10)),
}


def _torch():
    import torch

    return torch


# ----------------------------------------------------------------------------- presets
def resolve_preset(presets: Mapping[str, Mapping[str, Any]], name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``presets[name]`` with the non-None ``overrides`` applied; unknown names are errors."""
    if name not in presets:
        raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(presets)}")
    cfg = dict(presets[name])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in cfg:
            raise ValueError(f"{key!r} is not a setting of preset {name!r} (settings: {sorted(cfg)})")
        cfg[key] = value
    cfg["preset"] = name
    return cfg


def base_parser(description: str, presets: Mapping[str, Any], default: str, name: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark has: --preset, --out, --device."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=default, choices=list(presets),
                    help=f"settings to start from (default {default})")
    ap.add_argument("--out", type=Path, default=OUT_ROOT / name,
                    help=f"where figures and the table go (default benchmarks/out/{name})")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def pick_device(name: str | None):
    import torch

    return torch.device(name if name is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def machine(device=None) -> str:
    """One line naming the machine: CPU, cores, torch threads, GPU (when used), torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    text = f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return f"{text}; torch {torch.__version__}; device {device}"


class Stopwatch:
    """Wall time since construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def __str__(self) -> str:
        return format_seconds(self.seconds)


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min ({s:.0f} s)"
    return f"{s / 3600:.2f} h ({s:.0f} s)"


def settings_lines(cfg: Mapping[str, Any]) -> list[str]:
    """``key: value`` lines of a configuration (the preset first)."""
    keys = ["preset"] + sorted(k for k in cfg if k != "preset")
    return [f"  {k}: {_short(cfg[k])}" for k in keys if k in cfg]


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# ------------------------------------------------------------------------------ tables
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table (pasteable into docs/), columns padded for the terminal.

    ``align``: one of "l"/"r" per column (default: first column left, the others right).
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells for {len(headers)} headers")
    align = list(align) if align is not None else ["l"] + ["r"] * (len(headers) - 1)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def fmt_loss(x: float | None) -> str:
    return "diverged" if x is None or not math.isfinite(x) else f"{x:.2e}"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


# ------------------------------------------------------------------ Table 1 bookkeeping
@dataclass
class CurveRun:
    """Accuracy curves of one (optimizer, learning rate) run, one entry per evaluation point.

    ``epochs[k]`` is the (possibly fractional) epoch of evaluation ``k``; ``val[k]`` and
    ``test[k]`` the accuracies there (fractions in [0, 1]). A run that diverged stops
    having points at the evaluation where that was seen.
    """

    name: str
    lr: float
    epochs: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    diverged: bool = False

    def add(self, epoch: float, val: float, test: float) -> None:
        self.epochs.append(float(epoch))
        self.val.append(float(val))
        self.test.append(float(test))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "epochs": self.epochs, "val": self.val, "test": self.test,
                "diverged": self.diverged}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CurveRun:
        return cls(d["name"], float(d["lr"]), list(d["epochs"]), list(d["val"]), list(d["test"]), bool(d["diverged"]))


@dataclass(frozen=True)
class Table1Metrics:
    """One Table 1 row: the four accuracies and where they came from."""

    final_val: float
    final_test: float
    best_val: float
    best_test: float
    best_epoch: float


def table1_metrics(run: CurveRun) -> Table1Metrics | None:
    """Final Val, Final Test, Best Val, Best Test (test at the first epoch of highest val); None if no points."""
    if not run.val:
        return None
    k = int(np.argmax(run.val))  # the first of ties
    return Table1Metrics(run.val[-1], run.test[-1], run.val[k], run.test[k], run.epochs[k])


def select_run(runs: Sequence[CurveRun], select: str = "best") -> CurveRun:
    """The run of the grid Table 1 reports: highest Best Val (``select="final"``: Final Val).

    Ties go to the other validation number, then to the smaller learning rate. Diverged
    runs compete only when every run diverged.
    """
    if not runs:
        raise ValueError("no runs to choose from")
    if select not in ("best", "final"):
        raise ValueError(f"select must be 'best' or 'final', got {select!r}")
    pool = [r for r in runs if not r.diverged and r.val] or [r for r in runs if r.val] or list(runs)

    def key(r: CurveRun):
        m = table1_metrics(r)
        if m is None:
            return (-1.0, -1.0, -r.lr)
        first, second = (m.best_val, m.final_val) if select == "best" else (m.final_val, m.best_val)
        return (first, second, -r.lr)

    return max(pool, key=key)


def table1_rows(runs_by_name: Mapping[str, Sequence[CurveRun]], select: str = "best",
                paper: Mapping[str, tuple[float, ...]] | None = None
                ) -> tuple[list[str], list[list[str]], dict[str, CurveRun]]:
    """Headers, rows and the chosen run per optimizer, in the mapping's order.

    Columns: optimizer, rule, chosen lr, Final Val, Final Test, Best Val, Best Test (%),
    epoch of the best val, rates that diverged; with ``paper`` also the paper's four numbers.
    """
    from nos_gym.optim import table1

    rules = table1()
    headers = ["optimizer", "rule", "lr", "Final Val", "Final Test", "Best Val", "Best Test", "best at epoch",
               "diverged lrs"]
    if paper is not None:
        headers += ["paper FV", "paper FT", "paper BV", "paper BT"]
    rows, chosen = [], {}
    for name, runs in runs_by_name.items():
        run = chosen[name] = select_run(runs, select)
        m = table1_metrics(run)
        dead = sum(r.diverged for r in runs)
        row = [name, f"`{rules.get(name, name)}`", f"{run.lr:g}"]
        if m is None or (run.diverged and dead == len(runs) and not run.val):
            row += ["diverged"] * 4 + ["-"]
        else:
            row += [fmt_pct(m.final_val), fmt_pct(m.final_test), fmt_pct(m.best_val), fmt_pct(m.best_test),
                    f"{m.best_epoch:g}"]
        row.append(f"{dead}/{len(runs)}")
        if paper is not None:
            row += [f"{x:.1f}" for x in paper.get(name, (math.nan,) * 4)]
        rows.append(row)
    return headers, rows, chosen


# ------------------------------------------------------------------------------ output
def baseline_panels(chosen: Mapping[str, CurveRun], title: str, suptitle: str, metric: str = "test"):
    """Figure 5 / Figure 7 of the paper: one panel per discovered optimizer (``FIGURE_OPTIMIZERS``),
    each with the four baselines' and its own ``metric`` accuracy per epoch at the chosen rates."""
    import matplotlib.pyplot as plt

    labels = {"adam": "adam", "momentum": "mom", "rmsprop": "rmsprop", "sgd": "sgd"}
    fig, axes = plt.subplots(1, len(FIGURE_OPTIMIZERS), figsize=(6.5 * len(FIGURE_OPTIMIZERS), 4.3), sharey=True)
    for ax, opt in zip(axes, FIGURE_OPTIMIZERS):
        for name in [*FIGURE_BASELINES, opt]:
            run = chosen.get(name)
            ys = getattr(run, metric) if run is not None else []
            if ys:
                ax.plot(run.epochs, ys, marker="." if len(ys) < 30 else None,
                        label=f"{labels.get(name, name)} (lr {run.lr:g})")
        ax.set_title(f"{title}: baselines vs {opt}", fontsize=10)
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # none of this panel's optimizers was run
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} accuracy")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def prepare_out(path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG (Agg) and return the path."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return Path(path)


def use_agg() -> None:
    """Select matplotlib's file-only backend (call before pyplot is imported)."""
    import matplotlib

    matplotlib.use("Agg")


def write_report(path: Path, lines: Sequence[str]) -> Path:
    """The printed report, also saved as text beside the figures."""
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
