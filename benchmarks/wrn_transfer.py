"""Section 5.2 / Figure 7 / Table 1 of Bello et al. (2017): the rules on a Wide ResNet, CIFAR-10. Needs a GPU.

    python benchmarks/wrn_transfer.py --preset gpu                     # WRN-28-10, 7 optimizers x 7 rates, 50 epochs
    python benchmarks/wrn_transfer.py --preset gpu --stop-after 100    # train 100 epochs (over all runs), then stop ...
    python benchmarks/wrn_transfer.py --preset gpu --resume            # ... and carry on where it stopped
    python benchmarks/wrn_transfer.py --preset paper                   # all 20 rows of Table 1, 300 epochs (GPU-weeks)
    python benchmarks/wrn_transfer.py --preset gpu --depth 16 --width 4   # a smaller WRN (the output says which)
    python benchmarks/wrn_transfer.py --preset smoke                   # WRN-10-1 on 64 images, CPU, seconds (tests)

A pre-activation Wide ResNet (Zagoruyko & Komodakis 2016; WRN-d-k: depth d = 6n + 4,
widths 16k, 32k, 64k) is trained on the 45,000-image training split with the standard
CIFAR augmentation through torchvision transforms (``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip``), batch 128, weight decay 5e-4 (added to every optimizer's
gradient, the same for all) and a cosine-annealed rate (the paper states neither its
schedule nor its decay; ``--schedule constant`` and ``--weight-decay 0`` switch them off).
Each optimizer runs at every rate of the grid (the paper: "seven learning rates on a
logarithmic scale"), one run after another, each from the same initial weights and
with the same minibatches and augmentation draws (seeded per epoch, so a resumed run
continues exactly as an uninterrupted one would); a run whose loss becomes non-finite
stops there (diverged).

Baselines are torch's own optimizers (``_common.TORCH_BASELINES``: SGD, SGD with momentum
0.9, Adam, RMSprop with TensorFlow's decay 0.9 and eps 1e-10); the discovered rules are
``nos_gym.optim.NOSOptimizer(rule=NAME)``. The table has Table 1's columns and the
paper's numbers beside them.

Progress is checkpointed after every epoch in ``--out`` (``state.json``: finished curves;
``checkpoint.pt``: the run in progress). ``--stop-after N`` stops after N epochs of
training in this invocation; ``--resume`` continues from ``--out`` (without it a run
starts afresh and replaces what ``--out`` held).

Outputs: ``figure7.png`` (test accuracy per epoch, the baselines with Optimizer 1 and with
Optimizer 2, as the paper's Figure 7), ``state.json`` and ``report.txt``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    FIGURE_BASELINES,
    FIGURE_OPTIMIZERS,
    PAPER_TABLE1,
    TORCH_BASELINES,
    CurveRun,
    Stopwatch,
    base_parser,
    baseline_panels,
    machine,
    markdown_table,
    pick_device,
    prepare_out,
    resolve_preset,
    save_figure,
    settings_lines,
    table1_rows,
    use_agg,
    write_report,
)
from torch import nn

from nos_gym.data import MEAN, STD, CIFAR10CorruptError, CIFAR10NotFoundError, Split, load_cifar10, normalize
from nos_gym.optim import NOSOptimizer, get_rule, table1
from nos_gym.tasks.convnet import PAPER_LRS

FIGURE7_RULES = [*FIGURE_BASELINES, *FIGURE_OPTIMIZERS]
PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU: WRN-10-1, 2 optimizers x 2 rates, 64 images, 2 epochs
    "smoke": {"depth": 10, "width": 1, "dropout": 0.0, "rules": ["sgd", "optimizer_1"], "lrs": [1e-2, 1e-1],
              "train_examples": 64, "val_examples": 32, "test_examples": 32, "epochs": 2, "batch_size": 32,
              "weight_decay": 5e-4, "schedule": "cosine", "loader_workers": 0, "seed": 0},
    # one GPU, hours: WRN-28-10, the four baselines and three top rules x 7 rates, 50 epochs
    "gpu": {"depth": 28, "width": 10, "dropout": 0.0, "rules": [*FIGURE7_RULES, "powersign"], "lrs": list(PAPER_LRS),
            "train_examples": 45_000, "val_examples": 5_000, "test_examples": 10_000, "epochs": 50,
            "batch_size": 128, "weight_decay": 5e-4, "schedule": "cosine", "loader_workers": 8, "seed": 0},
    # the paper's Table 1: all 20 rows x 7 rates, 300 epochs (GPU-weeks on one GPU: use --stop-after/--resume)
    "paper": {"depth": 28, "width": 10, "dropout": 0.0, "rules": "all", "lrs": list(PAPER_LRS),
              "train_examples": 45_000, "val_examples": 5_000, "test_examples": 10_000, "epochs": 300,
              "batch_size": 128, "weight_decay": 5e-4, "schedule": "cosine", "loader_workers": 8, "seed": 0},
}
#: settings that define the runs: a resumed state must agree on all of them
IDENTITY = ("depth", "width", "dropout", "lrs", "train_examples", "val_examples", "test_examples", "epochs",
            "batch_size", "weight_decay", "schedule", "seed")


# ------------------------------------------------------------------------------- model
class Block(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.dropout:
            o = F.dropout(o, self.dropout, self.training)
        return skip + self.conv2(o)


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 images (Zagoruyko & Komodakis 2016); ``depth = 6n + 4``."""

    def __init__(self, depth: int = 28, width: int = 10, classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a WRN's depth is 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for g, cout in enumerate(widths[1:]):
            for i in range(n):
                layers.append(Block(cin, cout, 2 if (g > 0 and i == 0) else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)
        self.name = f"WRN-{depth}-{width}"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# -------------------------------------------------------------------------------- data
class Augmented(torch.utils.data.Dataset):
    """A uint8 ``Split`` with torchvision's standard CIFAR augmentation, normalised, per image."""

    def __init__(self, split: Split):
        from torchvision.transforms import v2

        self.images, self.labels = split.images.cpu(), split.labels.cpu()
        self.transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) + 1) * 1_000_003 + int(epoch)


def _loader(dataset: Augmented, cfg: dict[str, Any], epoch: int, device: torch.device):
    """This epoch's minibatches: shuffle and augmentation draws depend only on (seed, epoch)."""
    torch.manual_seed(_epoch_seed(cfg["seed"], epoch))  # augmentation draws in this process (0 workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(_epoch_seed(cfg["seed"], epoch)),  # also seeds loader workers
        num_workers=cfg["loader_workers"], pin_memory=device.type == "cuda",
        persistent_workers=False)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, device: torch.device, batch: int = 1000) -> tuple[float, bool]:
    """Accuracy on a uint8 split (normalised, no augmentation) and whether the logits were finite."""
    model.eval()
    correct, finite = 0, True
    amp = device.type == "cuda"
    for s in range(0, len(split), batch):
        x = normalize(split.images[s:s + batch].to(device)).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x).float()
        finite &= bool(torch.isfinite(logits).all())
        correct += int((logits.argmax(1) == split.labels[s:s + batch].to(device)).sum())
    model.train()
    return correct / max(1, len(split)), finite


# ------------------------------------------------------------------------- optimizers
def make_optimizer(name: str, params, lr: float, seed: int) -> torch.optim.Optimizer:
    """Torch's own optimizer for the four baselines, NOSOptimizer for the discovered rules."""
    if name in TORCH_BASELINES:
        return TORCH_BASELINES[name][1](params, lr)
    return NOSOptimizer(params, rule=name, lr=lr, seed=seed)


def _parses(rule: str) -> bool:
    """Whether ``NOSOptimizer`` can run ``rule`` (``get_rule``: parsed, never evaluated)."""
    try:
        get_rule(rule)
    except ValueError:
        return False
    return True


def optimizer_label(name: str) -> str:
    """What ``make_optimizer`` builds for ``name``, as printed."""
    return TORCH_BASELINES[name][0] if name in TORCH_BASELINES else f"NOSOptimizer({table1().get(name, name)!r})"


def lr_factor(cfg: dict[str, Any], epoch: int) -> float:
    """Multiplier of the base rate during ``epoch`` (0-based)."""
    if cfg["schedule"] == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg["epochs"]))


# ------------------------------------------------------------------------ one run
class Stopped(Exception):
    """This invocation's epoch budget (``--stop-after``) is spent; the state is saved."""


def train_run(name: str, lr: float, cfg: dict[str, Any], data: tuple[Split, Split, Split], device: torch.device,
              folder: Path, budget: list[int | None], bar=None) -> CurveRun:
    """Train one (optimizer, rate) for ``cfg["epochs"]``, resuming from ``checkpoint.pt`` when it is this run's."""
    train, val, test = data
    torch.manual_seed(cfg["seed"])  # the same initial weights for every run
    model = WideResNet(cfg["depth"], cfg["width"], dropout=cfg["dropout"]).to(device, memory_format=torch.channels_last)
    opt = make_optimizer(name, model.parameters(), lr, cfg["seed"])
    run, start = CurveRun(name, lr), 0
    ckpt_path = folder / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["name"] == name and ckpt["lr"] == lr:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            run, start = CurveRun.from_dict(ckpt["run"]), ckpt["epoch"]
            if bar is not None:
                bar.update(start)
    dataset = Augmented(train)
    params = [p for p in model.parameters()]
    amp = device.type == "cuda"
    for epoch in range(start, cfg["epochs"]):
        if budget[0] is not None and budget[0] <= 0:
            raise Stopped
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(cfg, epoch)
        diverged = False
        for x, y in _loader(dataset, cfg, epoch, device):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x).float(), y)
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["weight_decay"]:
                grads = [p.grad for p in params if p.grad is not None]
                torch._foreach_add_(grads, [p for p in params if p.grad is not None], alpha=cfg["weight_decay"])
            opt.step()
        if not diverged:
            va, vf = accuracy(model, val, device)
            ta, tf = accuracy(model, test, device)
            diverged = not (vf and tf)
        if diverged:
            run.diverged = True
            if bar is not None:
                bar.update(cfg["epochs"] - epoch)
            break
        run.add(epoch + 1, va, ta)
        if budget[0] is not None:
            budget[0] -= 1
        torch.save({"name": name, "lr": lr, "epoch": epoch + 1, "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "run": run.to_dict()}, ckpt_path)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{name} lr {lr:g}: val {100 * va:.1f}%")
    ckpt_path.unlink(missing_ok=True)
    return run


# ------------------------------------------------------------------------------- state
def load_state(folder: Path, cfg: dict[str, Any], resume: bool) -> dict[str, Any]:
    """Finished runs from ``state.json`` (``--resume``), after checking they were made with the same settings."""
    path = folder / "state.json"
    if not resume:
        path.unlink(missing_ok=True)
        (folder / "checkpoint.pt").unlink(missing_ok=True)
        return {"config": {k: cfg[k] for k in IDENTITY}, "runs": {}}
    if not path.exists():
        raise SystemExit(f"--resume: no {path} to resume from (run without --resume first)")
    state = json.loads(path.read_text())
    differ = {k: (state["config"].get(k), cfg[k]) for k in IDENTITY if state["config"].get(k) != cfg[k]}
    if differ:
        raise SystemExit(f"--resume: {path} was made with other settings: "
                         + ", ".join(f"{k} {a} (now {b})" for k, (a, b) in differ.items()))
    return state


def save_state(folder: Path, state: dict[str, Any]) -> None:
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / "state.json")


def run_key(name: str, lr: float) -> str:
    return f"{name}@{lr:g}"


def run_all(cfg: dict[str, Any], device: torch.device, folder: Path, resume: bool, stop_after: int | None,
            progress: bool = True) -> tuple[dict[str, list[CurveRun]], bool]:
    """Every (rule, rate) in turn; ``({name: [finished Runs]}, finished everything)``."""
    from tqdm.auto import tqdm

    state = load_state(folder, cfg, resume)
    ds = load_cifar10(cfg.get("data"), device="cpu")
    data = (ds.train.take(cfg["train_examples"]), ds.val.take(cfg["val_examples"]), ds.test.take(cfg["test_examples"]))
    pairs = [(n, float(lr)) for n in cfg["rules"] for lr in cfg["lrs"]]
    budget = [stop_after]
    todo_epochs = cfg["epochs"] * sum(run_key(*p) not in state["runs"] for p in pairs)
    bar = tqdm(total=todo_epochs, desc="epochs", unit="epoch", disable=not progress)
    complete = True
    try:
        for name, lr in pairs:
            if run_key(name, lr) in state["runs"]:
                continue
            run = train_run(name, lr, cfg, data, device, folder, budget, bar)
            state["runs"][run_key(name, lr)] = run.to_dict()
            save_state(folder, state)
    except Stopped:
        complete = False
        save_state(folder, state)
    bar.close()
    runs: dict[str, list[CurveRun]] = {}
    for name, lr in pairs:
        d = state["runs"].get(run_key(name, lr))
        if d is not None:
            runs.setdefault(name, []).append(CurveRun.from_dict(d))
    return runs, complete


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = base_parser(__doc__, PRESETS, "gpu", "wrn_transfer")
    ap.add_argument("--depth", type=int, help="WRN depth, 6n + 4 (default 28)")
    ap.add_argument("--width", type=int, help="WRN widening factor k (default 10)")
    ap.add_argument("--dropout", type=float)
    ap.add_argument("--rules", nargs="+", help="Table 1 names (nos_gym.optim.table1()), rules in the paper's "
                    "notation (e.g. 'drop(RMSProp, 0.3) + sign(m)'), or 'all'")
    ap.add_argument("--lrs", type=float, nargs="+")
    ap.add_argument("--epochs", type=int, help="epochs of every run")
    ap.add_argument("--train-examples", type=int, dest="train_examples")
    ap.add_argument("--val-examples", type=int, dest="val_examples")
    ap.add_argument("--test-examples", type=int, dest="test_examples")
    ap.add_argument("--batch-size", type=int, dest="batch_size")
    ap.add_argument("--weight-decay", type=float, dest="weight_decay")
    ap.add_argument("--schedule", choices=("cosine", "constant"))
    ap.add_argument("--loader-workers", type=int, dest="loader_workers", help="DataLoader worker processes")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--data", default=None, help="directory holding cifar-10-batches-py/ (default: searched)")
    ap.add_argument("--stop-after", type=int, dest="stop_after",
                    help="train this many epochs (counted over all runs), then save and stop")
    ap.add_argument("--resume", action="store_true", help="continue the runs saved in --out")
    ap.add_argument("--select", choices=("best", "final"), default="best")
    args = ap.parse_args(argv)
    rules = args.rules if args.rules is None or args.rules != ["all"] else "all"
    cfg = resolve_preset(PRESETS, args.preset, {k: getattr(args, k) for k in (
        "depth", "width", "dropout", "lrs", "epochs", "train_examples", "val_examples", "test_examples",
        "batch_size", "weight_decay", "schedule", "loader_workers", "seed")} | {"rules": rules})
    all_rules = list(table1())
    cfg["rules"] = all_rules if cfg["rules"] == "all" else list(cfg["rules"])
    unknown = [n for n in cfg["rules"] if n not in all_rules and not _parses(n)]
    if unknown:
        raise SystemExit(f"unknown rules {unknown}: neither a Table 1 name ({', '.join(all_rules)}) nor a rule "
                         f"in the paper's notation")
    cfg["lrs"] = [float(x) for x in cfg["lrs"]]
    WideResNet(cfg["depth"], cfg["width"])  # a bad depth/width fails here, before any data is read
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg["data"] = args.data
    use_agg()

    clock = Stopwatch()
    folder = prepare_out(args.out)
    try:
        runs, complete = run_all(cfg, device, folder, args.resume, args.stop_after, progress=not args.no_progress)
    except (CIFAR10NotFoundError, CIFAR10CorruptError) as e:  # say where we looked, no traceback
        raise SystemExit(str(e)) from None
    arch = WideResNet(cfg["depth"], cfg["width"], dropout=cfg["dropout"])
    n_params = sum(p.numel() for p in arch.parameters())
    lines = [
        f"Wide ResNet on CIFAR-10 (paper section 5.2, Figure 7, Table 1): {arch.name}, "
        f"{n_params / 1e6:.2f}M parameters",
        f"machine: {machine(device)}; precision {'bf16 autocast' if device.type == 'cuda' else 'fp32'}",
        "settings:", *settings_lines({k: v for k, v in cfg.items() if k != "rules"}),
        f"  rules: {', '.join(cfg['rules'])}",
        f"  optimizers: {'; '.join(optimizer_label(n) for n in cfg['rules'])}",
        f"data: {cfg['train_examples']:,} training images (45k split) with RandomCrop(32, padding=4) + "
        f"RandomHorizontalFlip, {cfg['val_examples']:,} validation, {cfg['test_examples']:,} test; "
        f"{cfg['epochs']} epochs per run, batch {cfg['batch_size']}",
        *(["NOTE: a CPU run of a tiny WRN: a smoke test of the pipeline, not a result. Real numbers need a GPU."]
          if device.type != "cuda" else []),
        *([f"NOTE: stopped after {args.stop_after} epochs (--stop-after); "
           f"{sum(len(v) for v in runs.values())}/{len(cfg['rules']) * len(cfg['lrs'])} runs finished. "
           "Continue with --resume."] if not complete else []),
        "",
    ]
    out: dict[str, Any] = {"config": cfg, "runs": runs, "complete": complete, "architecture": arch.name}
    if runs:
        headers, rows, chosen = table1_rows(runs, args.select, paper=PAPER_TABLE1)
        table = markdown_table(headers, rows, ["l", "l"] + ["r"] * (len(headers) - 2))
        fig = baseline_panels(chosen, f"Test accuracy, {arch.name}",
                              f"{arch.name}, {cfg['epochs']} epochs on {cfg['train_examples']:,} images")
        path = save_figure(fig, folder / "figure7.png")
        lines += [f"Table 1 columns (%), rate chosen by {'Best' if args.select == 'best' else 'Final'} Val over "
                  f"the finished runs of {len(cfg['lrs'])} rates; paper: WRN (Table 1), 300 epochs:", table, "",
                  f"figure: {path}"]
        out.update(table=table, chosen=chosen, figures={"figure7": fig}, paths={"figure7": path})
    else:
        lines.append("no run finished yet: no table")
    lines.append(f"wall time (this invocation): {clock}")
    print("\n".join(lines))
    write_report(folder / "report.txt", lines)
    out.update(text="\n".join(lines), wall_s=clock.seconds)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
