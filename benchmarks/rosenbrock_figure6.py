"""Figure 6 of Bello et al. (2017), section 5.1: PowerSign against the usual optimizers on Rosenbrock.

    python benchmarks/rosenbrock_figure6.py                 # the paper's setting ("cpu" = "paper"): seconds
    python benchmarks/rosenbrock_figure6.py --preset smoke  # 300 iterations, for tests

Each optimizer minimises f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from
``nos_gym.tasks.rosenbrock.START`` for ``ITERATIONS`` (4,000) steps at each rate of the
4-point log grid ``LEARNING_RATES`` (1e-4 .. 1e-1); the best final loss over the grid is
reported, as in the paper ("4000 iterations with 4 different learning rates on a
logarithmic scale and the best performance is plotted"). Adam's eps is swept over
1e-3 .. 1e-8 on top of the rates (paper: "tune the value of eps in Adam in a log scale
between 1e-3 and 1e-8").

The optimizers are torch's own, with TensorFlow's defaults where the paper used TensorFlow:

- PowerSign ``g * exp(sign(g) * sign(m))``: ``nos_gym.optim.PowerSign`` (beta 0.9, base e);
- Adam: ``torch.optim.Adam`` (betas 0.9, 0.999; eps swept);
- SGD: ``torch.optim.SGD``;
- RMSProp: ``torch.optim.RMSprop(alpha=0.9, eps=1e-10)`` (TF's decay 0.9, eps 1e-10);
- Momentum: ``torch.optim.SGD(momentum=0.9)`` (TF's MomentumOptimizer, heavy ball).

A second table runs the same five as rules of the language through ``RosenbrockTask``
(what ``OptimizerSearch-v0`` scores: ``g``, ``m``, ``ADAM``, ``RMSProp``, PowerSign) and
prints the environment's reward for each; its PowerSign must equal the torch one.

Outputs (``--out``, default ``benchmarks/out/rosenbrock_figure6``): ``figure6.png`` (one
panel per optimizer: contour lines of f and the path at the best rate; black dot: the
optimum), ``loss_curves.png`` (loss per iteration at each best rate) and ``report.txt``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from _common import (
    TORCH_BASELINES,
    Stopwatch,
    base_parser,
    fmt_loss,
    machine,
    markdown_table,
    prepare_out,
    resolve_preset,
    save_figure,
    settings_lines,
    use_agg,
    write_report,
)

from nos_gym.optim import PowerSign, get_rule, table1
from nos_gym.tasks.rosenbrock import (
    ITERATIONS,
    LEARNING_RATES,
    START,
    X_RANGE,
    Y_RANGE,
    RosenbrockTask,
    rosenbrock,
    rosenbrock_grad,
)

ADAM_EPS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"iterations": 300, "learning_rates": list(LEARNING_RATES), "adam_eps": [1e-3, 1e-8]},
    # the paper's setting; it takes seconds on a CPU, so "cpu" and "paper" are the same run
    "cpu": {"iterations": ITERATIONS, "learning_rates": list(LEARNING_RATES), "adam_eps": list(ADAM_EPS)},
    "paper": {"iterations": ITERATIONS, "learning_rates": list(LEARNING_RATES), "adam_eps": list(ADAM_EPS)},
}

# name -> (torch optimizer factory over param groups, implementation as printed, Table 1 name of the language twin)
OPTIMIZERS: dict[str, tuple[Callable[[list[dict]], torch.optim.Optimizer], str, str]] = {
    "PowerSign": (lambda groups: PowerSign(groups, lr=1.0), "nos_gym.optim.PowerSign(beta=0.9, base=e)", "powersign"),
    **{label: ((lambda groups, f=TORCH_BASELINES[key][1]: f(groups, 1.0)),
               TORCH_BASELINES[key][0] + (" (eps swept)" if key == "adam" else ""), key)
       for label, key in (("Adam", "adam"), ("SGD", "sgd"), ("RMSProp", "rmsprop"), ("Momentum", "momentum"))},
}
#: panel order of the figure (the paper's four, then the discovered rule)
PANELS = ("Adam", "Momentum", "RMSProp", "SGD", "PowerSign")


def run_torch(factory: Callable[[list[dict]], torch.optim.Optimizer], configs: Sequence[dict],
              iterations: int) -> np.ndarray:
    """Iterates ``(iterations + 1, C, 2)`` of one torch optimizer, one 2-D point per config.

    Each config (``lr`` and optionally ``eps``) is its own parameter group of one optimizer,
    so all run in one ``step()``; the gradient is Rosenbrock's exact gradient. A point that
    becomes non-finite stays NaN (its own group only).
    """
    params = [torch.tensor(START, dtype=torch.float64, requires_grad=True) for _ in configs]
    grads = torch.zeros(len(configs), 2, dtype=torch.float64)
    for p, g in zip(params, grads):
        p.grad = g  # a view: refreshed in place every step
    opt = factory([{"params": [p], **cfg} for p, cfg in zip(params, configs)])
    trace = np.empty((iterations + 1, len(configs), 2))
    with torch.no_grad():
        w = torch.stack(params)
        trace[0] = w.numpy()
        for t in range(iterations):
            gx, gy = rosenbrock_grad(w[:, 0], w[:, 1])
            grads[:, 0], grads[:, 1] = gx, gy
            opt.step()
            w = torch.stack(params)
            trace[t + 1] = w.numpy()
    return trace


def losses_along(trace: np.ndarray) -> np.ndarray:
    """f at every iterate, ``(T + 1, C)``; NaN where the point is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        f = rosenbrock(trace[..., 0], trace[..., 1])
    return np.where(np.isfinite(f), f, np.nan)


def run(cfg: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run every optimizer over the grid; the per-optimizer results, tables and figures (not yet saved)."""
    from tqdm.auto import tqdm

    lrs = [float(x) for x in cfg["learning_rates"]]
    results: dict[str, dict[str, Any]] = {}
    for name in tqdm(OPTIMIZERS, desc="rosenbrock", disable=not progress):
        factory, impl, _ = OPTIMIZERS[name]
        eps = [float(e) for e in cfg["adam_eps"]] if name == "Adam" else [None]
        configs = [{"lr": lr, **({} if e is None else {"eps": e})} for e in eps for lr in lrs]
        trace = run_torch(factory, configs, int(cfg["iterations"]))
        f = losses_along(trace)
        final = f[-1]
        finite = np.isfinite(final)
        best = int(np.argmin(np.where(finite, final, np.inf))) if finite.any() else None
        # per learning rate: the best over eps (Adam) or the single run
        per_lr, eps_at_lr = {}, {}
        for i, lr in enumerate(lrs):
            cols = [k * len(lrs) + i for k in range(len(eps))]
            vals = np.where(np.isfinite(final[cols]), final[cols], np.inf)
            j = int(np.argmin(vals))
            per_lr[lr] = float(final[cols[j]]) if np.isfinite(vals[j]) else math.nan
            eps_at_lr[lr] = eps[j]
        results[name] = {
            "implementation": impl, "per_lr": per_lr, "eps_at_lr": eps_at_lr,
            "final": {(c["lr"], c.get("eps")): float(final[k]) for k, c in enumerate(configs)},
            "best_lr": None if best is None else configs[best]["lr"],
            "best_eps": None if best is None else configs[best].get("eps"),
            "best_loss": math.nan if best is None else float(final[best]),
            "path": None if best is None else trace[:, best, :],
            "curve": None if best is None else f[:, best],
        }

    # the same five as rules of the language, scored by the environment's task
    task = RosenbrockTask(iterations=int(cfg["iterations"]), learning_rates=lrs)
    names = [OPTIMIZERS[n][2] for n in PANELS]
    programs = [get_rule(n) for n in names]
    env_results = dict(zip(names, task.evaluate(programs)))
    ps_task = np.array([env_results["powersign"].metrics["final_losses"][f"{lr:g}"] or math.nan for lr in lrs])
    ps_torch = np.array([results["PowerSign"]["per_lr"][lr] for lr in lrs])
    both = np.isfinite(ps_task) & np.isfinite(ps_torch)
    agreement = float(np.max(np.abs(ps_task[both] - ps_torch[both]) / np.maximum(np.abs(ps_torch[both]), 1e-300))) \
        if both.any() else math.nan
    return {"config": cfg, "lrs": lrs, "results": results, "env": env_results, "task": task,
            "powersign_rel_diff": agreement, "powersign_same_divergence": bool(np.array_equal(np.isfinite(ps_task),
                                                                                             np.isfinite(ps_torch)))}


def tables(out: dict[str, Any]) -> tuple[str, str, str]:
    """(main table, Adam's eps sweep, the environment's view) as markdown."""
    lrs, res = out["lrs"], out["results"]
    order = sorted(res, key=lambda n: (not math.isfinite(res[n]["best_loss"]), res[n]["best_loss"]))
    headers = ["optimizer", "implementation"] + [f"lr {lr:g}" for lr in lrs] + ["best lr", "best final loss"]
    rows = []
    for n in order:
        r = res[n]
        cells = []
        for lr in lrs:
            cell = fmt_loss(r["per_lr"][lr])
            if n == "Adam" and math.isfinite(r["per_lr"][lr]):
                cell += f" (eps {r['eps_at_lr'][lr]:g})"
            cells.append(cell)
        best_lr = "-" if r["best_lr"] is None else f"{r['best_lr']:g}" + (
            f", eps {r['best_eps']:g}" if r["best_eps"] is not None else "")
        rows.append([n, r["implementation"], *cells, best_lr, fmt_loss(r["best_loss"])])
    main = markdown_table(headers, rows, ["l", "l"] + ["r"] * (len(headers) - 2))

    adam = res["Adam"]
    eps_values = sorted({k[1] for k in adam["final"]}, reverse=True)
    eps_rows = [[f"{e:g}"] + [fmt_loss(adam["final"][(lr, e)]) for lr in lrs] for e in eps_values]
    eps_table = markdown_table(["Adam eps"] + [f"lr {lr:g}" for lr in lrs], eps_rows)

    rules = table1()
    env_rows = []
    for name, result in out["env"].items():
        m = result.metrics
        env_rows.append([name, f"`{rules[name]}`", "-" if m["best_lr"] is None else f"{m['best_lr']:g}",
                         fmt_loss(m["best_loss"]), f"{result.reward:.3f}"])
    env_table = markdown_table(["rule", "in the language", "best lr", "best final loss", "env reward"], env_rows,
                               ["l", "l", "r", "r", "r"])
    return main, eps_table, env_table


def figures(out: dict[str, Any]):
    """(Figure-6-like paths, loss curves) as matplotlib figures."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    res = out["results"]
    xs = np.linspace(*X_RANGE, 300)
    ys = np.linspace(*Y_RANGE, 300)
    X, Y = np.meshgrid(xs, ys)
    Z = rosenbrock(X, Y)
    levels = np.logspace(-1, 3.5, 14)
    fig6, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 4.2), sharex=True, sharey=True)
    for ax, name in zip(axes, PANELS):
        r = res[name]
        ax.contour(X, Y, Z, levels=levels, norm=LogNorm(), cmap="viridis", linewidths=0.7)
        if r["path"] is not None:
            p = r["path"][np.isfinite(r["path"]).all(1)]
            ax.plot(p[:, 0], p[:, 1], "-", color="tab:red", lw=1.2, label="path")
        ax.plot(*START, "o", color="tab:blue", ms=5)
        ax.plot(1.0, 1.0, "o", color="black", ms=6)
        lr = "-" if r["best_lr"] is None else f"{r['best_lr']:g}"
        ax.set_title(f"{name}\nlr {lr}, final loss {fmt_loss(r['best_loss'])}", fontsize=10)
        ax.set_xlim(*X_RANGE)
        ax.set_ylim(*Y_RANGE)
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")
    fig6.suptitle(f"Rosenbrock, {out['config']['iterations']} iterations, best of {len(out['lrs'])} rates "
                  "(black dot: optimum; blue: start)", fontsize=11)
    fig6.tight_layout()

    figc, ax = plt.subplots(figsize=(7, 4.5))
    for name in PANELS:
        r = res[name]
        if r["curve"] is not None:
            ax.plot(np.arange(len(r["curve"])), np.maximum(r["curve"], 1e-300),
                    label=f"{name} (lr {r['best_lr']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("f(x, y)")
    ax.set_title("Rosenbrock loss at each optimizer's best rate")
    ax.legend(fontsize=8)
    figc.tight_layout()
    return fig6, figc


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = base_parser(__doc__, PRESETS, "cpu", "rosenbrock_figure6")
    ap.add_argument("--iterations", type=int, help="steps per run (preset: 4,000)")
    ap.add_argument("--learning-rates", type=float, nargs="+", dest="learning_rates")
    ap.add_argument("--adam-eps", type=float, nargs="+", dest="adam_eps")
    args = ap.parse_args(argv)
    cfg = resolve_preset(PRESETS, args.preset, {"iterations": args.iterations, "learning_rates": args.learning_rates,
                                                "adam_eps": args.adam_eps})
    use_agg()
    clock = Stopwatch()
    out = run(cfg, progress=not args.no_progress)
    main_table, eps_table, env_table = tables(out)
    fig6, figc = figures(out)
    folder = prepare_out(args.out)
    paths = {"figure6": save_figure(fig6, folder / "figure6.png"),
             "loss_curves": save_figure(figc, folder / "loss_curves.png")}
    res = out["results"]
    ps = res["PowerSign"]["best_loss"]
    verdicts = []
    for other in ("Adam", "RMSProp", "SGD", "Momentum"):
        o = res[other]["best_loss"]
        vs = f"{fmt_loss(ps)} vs {fmt_loss(o)}"
        if not math.isfinite(o) or (math.isfinite(ps) and ps < o):
            verdict = f"PowerSign beats {other} ({vs}, {o / ps if math.isfinite(o) else math.inf:.3g}x lower)"
        else:
            verdict = f"PowerSign does not beat {other} ({vs}, {ps / o:.3g}x higher)"
        a, b = res["PowerSign"]["curve"], res[other]["curve"]
        if a is not None and b is not None:  # the final loss is one snapshot: how the whole runs compare
            below = np.nan_to_num(a, nan=np.inf) < np.nan_to_num(b, nan=np.inf)
            verdict += f"; PowerSign's loss is the lower at {100 * below.mean():.1f}% of the iterations"
        verdicts.append(verdict)
    lines = [
        "Rosenbrock (paper section 5.1, Figure 6)",
        f"machine: {machine('cpu')}",
        "settings:", *settings_lines(cfg),
        f"  start: ({START[0]:.5f}, {START[1]:.5f})  (nos_gym.tasks.rosenbrock.START)",
        "",
        "Final loss after the last iteration (best over Adam's eps per rate); sorted by best final loss:",
        main_table,
        "",
        "Adam's eps sweep (final loss):",
        eps_table,
        "",
        "The same optimizers as rules of the language, scored by RosenbrockTask (the environment's reward):",
        env_table,
        f"PowerSign torch optimizer vs the language rule: max relative difference of final losses "
        f"{out['powersign_rel_diff']:.2g}, same divergence pattern: {out['powersign_same_divergence']}",
        "",
        *verdicts,
        "",
        f"figures: {paths['figure6']}, {paths['loss_curves']}",
        f"wall time: {clock}",
    ]
    print("\n".join(lines))
    write_report(folder / "report.txt", lines)
    out.update(tables=(main_table, eps_table, env_table), figures={"figure6": fig6, "loss_curves": figc},
               paths=paths, text="\n".join(lines), wall_s=clock.seconds)
    return out  # the figures stay open for the caller (tests inspect them); plt.close("all") frees them


if __name__ == "__main__":
    main(sys.argv[1:])
