"""Figure 4 of the paper: the reward of each sampled rule against the number of rules sampled.

One function for every caller (``nos-gym plot``, ``benchmarks/cifar_report.py``): per series
its moving average and its best so far (and, if asked, every sampled reward as a dot), with
reference rewards (the classics, say) as dotted lines named in one box.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["figure4"]


def figure4(series: Mapping[str, Sequence[float]], out: Path | str, *, window: int = 100, dots: bool = True,
            references: Mapping[str, float] | None = None, title: str = "Controller reward as more optimizers are sampled",
            ylabel: str = "Controller reward", ylim: tuple[float, float] = (-0.02, 1.02),
            figsize: tuple[float, float] = (8, 4.5)) -> Path:
    """Write the figure for ``series`` (name -> rewards in sampling order) to ``out`` and return the path.

    The suffix of ``out`` picks the format (png, pdf, svg, ...); a path without one that matplotlib
    writes gets ".png" added.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    for name, rewards in series.items():
        r = np.asarray(rewards, dtype=float)
        x = np.arange(1, len(r) + 1)
        if dots:
            ax.scatter(x, r, s=2, alpha=0.25)
        w = max(1, min(window, len(r)))
        line, = ax.plot(x[w - 1:], np.convolve(r, np.ones(w) / w, mode="valid"), lw=1.5,
                        label=f"{name}: mean of the last {w} sampled")
        ax.plot(x, np.maximum.accumulate(r), lw=1, ls="--", color=line.get_color(), label=f"{name}: best so far")
    if references:  # grey dotted lines, named in one box (their values often lie too close for labels)
        for value in references.values():
            ax.axhline(value, lw=0.8, ls=":", color="grey")
        ax.text(0.99, 0.34, "dotted: the classics on this reward\n" + "\n".join(
                    f"{label} {value:.3f}" for label, value in sorted(references.items(), key=lambda kv: -kv[1])),
                transform=ax.transAxes, fontsize=7, ha="right", va="bottom", color="dimgrey",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "lightgrey"})
    ax.set_xlabel("Number of sampled optimizers")
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in fig.canvas.get_supported_filetypes():
        out, fmt = Path(f"{out}.png"), "png"  # "-o out/x" writes out/x.png, and says so
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, format=fmt)
    plt.close(fig)
    return out
