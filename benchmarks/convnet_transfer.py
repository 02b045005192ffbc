"""Figure 5 and Table 1 of Bello et al. (2017) on the paper's small ConvNet (CIFAR-10).

    python benchmarks/convnet_transfer.py --preset cpu    # 20 rows x 7 rates, fewer epochs/images (2 CPU cores)
    python benchmarks/convnet_transfer.py --preset gpu    # full data, 50 epochs, 140 children as one grouped network
    python benchmarks/convnet_transfer.py --preset paper  # full data, 300 epochs (Figure 5's length)
    python benchmarks/convnet_transfer.py --preset smoke  # the 6 rules of Figure 5, tiny data: seconds (tests)

Every optimizer of Table 1 -- SGD, Momentum, Adam, RMSProp and the 16 discovered rules,
written in the rule language (``nos_gym.optim.table1()``) -- trains the paper's child
network (``nos_gym.tasks.convnet.ChildNet``: two 3x3 conv layers of 32 filters with batch
norm and ReLU, section 4.2) at every rate of a log grid (the paper's ``10^i, i = -5..1``).
All children start from the same weights and see the same minibatches (batch 100); they
are trained ``group_size`` at a time as one grouped network (``nos_gym.tasks.convnet.grouped``;
on a GPU all 140 at once, on a CPU one by one in ``workers`` processes, which is faster
there), with no data augmentation and a constant rate.
A child whose loss or weights become non-finite is dropped from its group (diverged).

Validation (held-out 5,000 of the training set) and test accuracy are measured
``evals_per_epoch`` times per epoch. The table reports Final Val, Final Test, Best Val and
Best Test as Table 1 defines them, for the rate with the best validation accuracy (see
``benchmarks/_common.py``); a second table shows Best Val at every rate. The baselines
are the language's own: SGD ``g``, Momentum ``m`` (a bias-corrected moving average: heavy
ball rescaled by 1 - beta1), Adam ``ADAM`` (== torch.optim.Adam) and RMSProp ``RMSProp``
(``g / sqrt(v-hat)``, beta2 = 0.999).

Outputs (``--out``, default ``benchmarks/out/convnet_transfer``): ``figure5.png`` (test
accuracy per epoch: the four baselines with Optimizer 1, and with Optimizer 2, as the
paper's two panels), ``all_rules.png`` (test curves of all rules), ``runs.json`` (every
curve) and ``report.txt``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from _common import (
    FIGURE_BASELINES,
    FIGURE_OPTIMIZERS,
    CurveRun,
    Stopwatch,
    base_parser,
    baseline_panels,
    fmt_pct,
    machine,
    markdown_table,
    pick_device,
    prepare_out,
    resolve_preset,
    save_figure,
    settings_lines,
    table1_metrics,
    table1_rows,
    use_agg,
    write_report,
)

from nos_gym.data import CIFAR10CorruptError, CIFAR10NotFoundError, Split, load_cifar10, normalize
from nos_gym.engine.rules import BatchedRule, RuleState
from nos_gym.optim import get_rule, table1
from nos_gym.tasks.convnet import PAPER_LRS, batch_order, init_child
from nos_gym.tasks.convnet.grouped import GroupedConvNet, evaluate_children, train_step

FIGURE5_RULES = [*FIGURE_BASELINES, *FIGURE_OPTIMIZERS]  # adam, momentum, rmsprop, sgd, optimizer_1, optimizer_2
PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU: Figure 5's six optimizers, 2 rates, 100 images, 1 epoch (2 evaluations)
    "smoke": {"rules": FIGURE5_RULES, "lrs": [1e-2, 1e-1], "train_examples": 100, "val_examples": 50,
              "test_examples": 50, "epochs": 1, "evals_per_epoch": 2, "batch_size": 25, "group_size": 12,
              "workers": 1, "seed": 0},
    # all 20 rows x 7 rates on 2 CPU cores in < 30 min (27 min measured on 2 cores shared with
    # other jobs): 4,000 training images, 2 epochs, 1,000 validation and 1,000 test images,
    # 2 evaluations per epoch; one child at a time per worker process (grouping does not pay on a CPU)
    "cpu": {"rules": "all", "lrs": list(PAPER_LRS), "train_examples": 4_000, "val_examples": 1_000,
            "test_examples": 1_000, "epochs": 2, "evals_per_epoch": 2, "batch_size": 100, "group_size": 1,
            "workers": None, "seed": 0},
    # one GPU: the whole data, 50 epochs, all 140 children in one grouped network
    "gpu": {"rules": "all", "lrs": list(PAPER_LRS), "train_examples": 45_000, "val_examples": 5_000,
            "test_examples": 10_000, "epochs": 50, "evals_per_epoch": 1, "batch_size": 100, "group_size": 140,
            "workers": 1, "seed": 0},
    # Figure 5's length: 300 epochs of the whole training split
    "paper": {"rules": "all", "lrs": list(PAPER_LRS), "train_examples": 45_000, "val_examples": 5_000,
              "test_examples": 10_000, "epochs": 300, "evals_per_epoch": 1, "batch_size": 100, "group_size": 140,
              "workers": 1, "seed": 0},
}


# ------------------------------------------------------------------------------ trainer
def _compact(net: GroupedConvNet, rule: BatchedRule, state: RuleState, lr: torch.Tensor, keep: torch.Tensor):
    """The group restricted to rows ``keep``: weights, batch-norm statistics, rule state, rates."""
    small_rule, small_state = rule.select(keep, state)
    return net.select(keep).train(), small_rule, small_state, lr[keep]


def train_curves(programs: Sequence, lrs: Sequence[float], train: Split, val: Split, test: Split, *, epochs: int,
                 batch_size: int, evals_per_epoch: int, seed: int = 0, filters: int = 32, precision: str = "fp32",
                 check_every: int | None = None, eval_batch: int = 500,
                 tick: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Train child i with ``programs[i]`` at ``lrs[i]``, all as one grouped network, with accuracy curves.

    Every child starts from ``init_child(seed)`` and sees ``batch_order(len(train), ...)``.
    Returns per child ``{"epochs", "val", "test", "diverged"}``: the accuracies at each
    evaluation (``evals_per_epoch`` per epoch), up to the one where it diverged. Diverged
    children leave the group (checked every ``check_every`` steps), so they cost nothing
    afterwards. ``tick(children, steps)`` reports progress in child-steps.
    """
    b = len(programs)
    device = train.images.device
    steps_per_epoch = len(train) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train)} training examples do not fill one batch of {batch_size}")
    total = steps_per_epoch * epochs
    n_evals = max(1, evals_per_epoch) * epochs
    eval_at = {max(1, round(total * k / n_evals)) for k in range(1, n_evals + 1)}
    check_every = check_every or (50 if device.type == "cuda" else 5)

    net = GroupedConvNet(b, init_child(seed, filters).to(device), filters, channels_last=True).to(device).train()
    rule = BatchedRule(list(programs), generator=torch.Generator(device=device).manual_seed(int(seed)), device=device)
    state = rule.init(net.flat.detach())
    lr = torch.as_tensor(list(lrs), dtype=torch.float32, device=device).view(b, 1)
    alive = torch.ones(b, 1, dtype=torch.bool, device=device)
    rows = torch.arange(b)  # original child of each row of the current group
    out = [{"epochs": [], "val": [], "test": [], "diverged": False} for _ in range(b)]
    for step, idx in enumerate(batch_order(len(train), batch_size, epochs, seed), start=1):
        idx = idx.to(device, non_blocking=True)
        state, _ = train_step(net, rule, state, lr, alive, normalize(train.images[idx]), train.labels[idx], precision)
        if step in eval_at:
            accs = []
            for split in (val, test):
                acc, finite = evaluate_children(net, split, eval_batch, precision)
                alive &= finite.view(-1, 1)
                accs.append(acc.cpu())
            ok = alive.view(-1).cpu()
            for j, i in enumerate(rows.tolist()):
                if ok[j]:
                    out[i]["epochs"].append(step / steps_per_epoch)
                    out[i]["val"].append(float(accs[0][j]))
                    out[i]["test"].append(float(accs[1][j]))
        if tick:
            tick(len(rows), 1)
        if step < total and (step % check_every == 0 or step in eval_at) and not bool(alive.all()):
            ok = alive.view(-1).cpu()
            for j in torch.nonzero(~ok).view(-1).tolist():
                out[int(rows[j])]["diverged"] = True
            keep = torch.nonzero(ok).view(-1)
            if tick:
                tick(len(rows) - len(keep), total - step)  # the dropped children's remaining steps
            if len(keep) == 0:
                break
            net, rule, state, lr = _compact(net, rule, state, lr, keep.to(device))
            alive = torch.ones(len(keep), 1, dtype=torch.bool, device=device)
            rows = rows[keep]
    ok = alive.view(-1).cpu()
    for j in torch.nonzero(~ok).view(-1).tolist():
        out[int(rows[j])]["diverged"] = True
    return out


# --------------------------------------------------------------------------- scheduling
def _data(cfg: dict[str, Any], device: torch.device) -> tuple[Split, Split, Split]:
    ds = load_cifar10(cfg.get("data"), device=device)
    return ds.train.take(cfg["train_examples"]), ds.val.take(cfg["val_examples"]), ds.test.take(cfg["test_examples"])


def _chunk(cfg: dict[str, Any], pairs: Sequence[tuple[str, float]], device: torch.device, precision: str,
           tick: Callable[[int, int], None] | None = None) -> dict[tuple[str, float], dict]:
    """Train the (rule name, rate) ``pairs`` as one grouped network; a curve per pair."""
    train, val, test = _data(cfg, device)
    curves = train_curves([get_rule(n) for n, _ in pairs], [lr for _, lr in pairs], train, val, test,
                          epochs=cfg["epochs"], batch_size=cfg["batch_size"], evals_per_epoch=cfg["evals_per_epoch"],
                          seed=cfg["seed"], precision=precision, eval_batch=1000 if device.type == "cuda" else 500,
                          tick=tick)
    return dict(zip(pairs, curves))


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _chunk_job(cfg: dict[str, Any], pairs: Sequence[tuple[str, float]]) -> dict[tuple[str, float], dict]:
    return _chunk(cfg, pairs, torch.device("cpu"), "fp32")


def run(cfg: dict[str, Any], device: torch.device, progress: bool = True) -> dict[str, list[CurveRun]]:
    """Every rule x rate of ``cfg``: ``{name: [CurveRun per rate]}`` in ``cfg["rules"]`` order.

    The rule x rate children are trained ``group_size`` at a time as one grouped network
    (on a GPU, all of them: one group; on a CPU a group of one is fastest per child, see
    ``benchmarks/child_throughput.py``), by ``workers`` processes on a CPU.
    """
    from tqdm.auto import tqdm

    names = list(cfg["rules"])
    lrs = [float(x) for x in cfg["lrs"]]
    pairs = [(n, lr) for n in names for lr in lrs]
    size = max(1, int(cfg["group_size"]))
    chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    precision = "bf16" if device.type == "cuda" else "fp32"
    _data(cfg, device)  # load (and check) the data here first: a clear error before any worker starts
    steps = (cfg["train_examples"] // cfg["batch_size"]) * cfg["epochs"]
    curves: dict[tuple[str, float], dict] = {}
    workers = min(int(cfg["workers"]), len(chunks))
    if workers > 1 and device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // workers)
        bar = tqdm(total=len(pairs), desc=f"children ({workers} workers)", unit="child", disable=not progress)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as ex:
            futures = [ex.submit(_chunk_job, cfg, c) for c in chunks]
            for fut in futures:
                got = fut.result()
                curves.update(got)
                bar.update(len(got))
        bar.close()
    else:
        bar = tqdm(total=steps * len(pairs), desc="child steps", unit="step", unit_scale=True, disable=not progress)
        for c in chunks:
            curves.update(_chunk(cfg, c, device, precision, tick=lambda n, k: bar.update(n * k)))
        bar.close()
    runs: dict[str, list[CurveRun]] = {}
    for name in names:
        runs[name] = []
        for lr in lrs:
            c = curves[(name, lr)]
            r = CurveRun(name, lr, diverged=c["diverged"])
            for e, v, t in zip(c["epochs"], c["val"], c["test"]):
                r.add(e, v, t)
            runs[name].append(r)
    return runs


# ------------------------------------------------------------------------------ output
def lr_table(runs: dict[str, list[CurveRun]]) -> str:
    """Best Val (%) of every rule at every rate ("div": diverged)."""
    lrs = [r.lr for r in next(iter(runs.values()))]
    rows = []
    for name, rs in runs.items():
        cells = []
        for r in rs:
            m = table1_metrics(r)
            cells.append("div" if r.diverged else (fmt_pct(m.best_val) if m else "-"))
        rows.append([name, *cells])
    return markdown_table(["optimizer", *[f"{lr:g}" for lr in lrs]], rows)


def figures(runs: dict[str, list[CurveRun]], chosen: dict[str, CurveRun], cfg: dict[str, Any]):
    """(Figure-5-like two panels, all rules) as matplotlib figures: test accuracy per epoch at the chosen rates."""
    import matplotlib.pyplot as plt

    fig5 = baseline_panels(chosen, "Test accuracy, small ConvNet",
                           f"preset {cfg['preset']}: {cfg['epochs']} epochs on {cfg['train_examples']:,} images, "
                           f"test on {cfg['test_examples']:,}")
    figall, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.cm.tab20(range(20))
    for k, (name, r) in enumerate(chosen.items()):
        if r.test:
            style = "-" if name in FIGURE5_RULES else "--"
            ax.plot(r.epochs, r.test, style, lw=1.0, color=colors[k % 20], label=f"{name} (lr {r.lr:g})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title("Small ConvNet: every optimizer at its chosen rate")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    figall.tight_layout()
    return fig5, figall


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = base_parser(__doc__, PRESETS, "cpu", "convnet_transfer")
    ap.add_argument("--rules", nargs="+", help="Table 1 names (nos_gym.optim.table1()) or 'all'")
    ap.add_argument("--lrs", type=float, nargs="+", help="learning-rate grid (preset: 1e-5 .. 10)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--train-examples", type=int, dest="train_examples")
    ap.add_argument("--val-examples", type=int, dest="val_examples")
    ap.add_argument("--test-examples", type=int, dest="test_examples")
    ap.add_argument("--evals-per-epoch", type=int, dest="evals_per_epoch")
    ap.add_argument("--batch-size", type=int, dest="batch_size")
    ap.add_argument("--group-size", type=int, dest="group_size", help="children (rule x rate) per grouped network")
    ap.add_argument("--workers", type=int, help="CPU worker processes of one thread, one group each at a time (default: one per core)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--data", default=None, help="directory holding cifar-10-batches-py/ (default: searched, "
                                                 "see nos_gym.data.load_cifar10)")
    ap.add_argument("--select", choices=("best", "final"), default="best",
                    help="choose the rate by Best Val (default) or Final Val")
    args = ap.parse_args(argv)
    rules = args.rules if args.rules is None or args.rules != ["all"] else "all"
    cfg = resolve_preset(PRESETS, args.preset, {k: getattr(args, k) for k in (
        "lrs", "epochs", "train_examples", "val_examples", "test_examples", "evals_per_epoch", "batch_size",
        "group_size", "workers", "seed")} | {"rules": rules})
    all_rules = list(table1())
    cfg["rules"] = all_rules if cfg["rules"] == "all" else list(cfg["rules"])
    unknown = [n for n in cfg["rules"] if n not in all_rules]
    if unknown:
        raise SystemExit(f"unknown rules {unknown}; the Table 1 names are {all_rules}")
    device = pick_device(args.device)
    if cfg["workers"] is None:
        cfg["workers"] = 1 if device.type == "cuda" else (os.cpu_count() or 1)
    cfg["data"] = args.data
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    use_agg()

    clock = Stopwatch()
    try:
        runs = run(cfg, device, progress=not args.no_progress)
    except (CIFAR10NotFoundError, CIFAR10CorruptError) as e:  # say where we looked, no traceback
        raise SystemExit(str(e)) from None
    headers, rows, chosen = table1_rows(runs, args.select)
    table = markdown_table(headers, rows, ["l", "l"] + ["r"] * (len(headers) - 2))
    grid = lr_table(runs)
    fig5, figall = figures(runs, chosen, cfg)
    folder = prepare_out(args.out)
    paths = {"figure5": save_figure(fig5, folder / "figure5.png"),
             "all_rules": save_figure(figall, folder / "all_rules.png")}
    (folder / "runs.json").write_text(json.dumps({"config": {k: v for k, v in cfg.items()},
                                                  "runs": {n: [r.to_dict() for r in rs] for n, rs in runs.items()}}))
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    short = cfg["train_examples"] < 45_000 or cfg["epochs"] < 300
    lines = [
        "Small ConvNet on CIFAR-10 (paper Figure 5; Table 1's columns)",
        f"machine: {machine(device)}; precision {precision}; "
        f"{cfg['workers']} worker process(es)" + (f" x {max(1, (os.cpu_count() or 1) // cfg['workers'])} thread(s)"
                                                   if cfg["workers"] > 1 and device.type == "cpu" else ""),
        "settings:", *settings_lines({k: v for k, v in cfg.items() if k != "rules"}),
        f"  rules: {len(cfg['rules'])} ({'all of Table 1' if len(cfg['rules']) == 20 else ', '.join(cfg['rules'])})",
        f"data: {cfg['train_examples']:,} training images (of the 45,000 split), {cfg['val_examples']:,} validation "
        f"(held out of the training batches), {cfg['test_examples']:,} test; {cfg['epochs']} epochs, batch "
        f"{cfg['batch_size']}, evaluated {cfg['evals_per_epoch']}x per epoch",
        *(["NOTE: shorter than the paper (300 epochs on 45,000 images); accuracies are far below Figure 5's ~0.66."]
          if short else []),
        "",
        f"Table 1 columns (%), rate chosen by {'Best' if args.select == 'best' else 'Final'} Val over "
        f"{len(cfg['lrs'])} rates; 'best at epoch': where Best Val/Best Test were read:",
        table,
        "",
        "Best Val (%) at every rate ('div': diverged, dropped from training):",
        grid,
        "",
        f"figures: {paths['figure5']}, {paths['all_rules']}; curves: {folder / 'runs.json'}",
        f"wall time: {clock}",
    ]
    print("\n".join(lines))
    write_report(folder / "report.txt", lines)
    return {"config": cfg, "runs": runs, "chosen": chosen, "table": table, "lr_table": grid,
            "figures": {"figure5": fig5, "all_rules": figall}, "paths": paths, "text": "\n".join(lines),
            "wall_s": clock.seconds}


if __name__ == "__main__":
    main(sys.argv[1:])
