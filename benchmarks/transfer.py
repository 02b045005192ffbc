"""Issue 24: does the discovered family transfer? Eight optimizers on three models that are not the child.

    nice -n 19 python benchmarks/transfer.py --plan        # runs to do and their estimated time (a timing probe)
    nohup nice -n 19 python benchmarks/transfer.py > transfer.log 2>&1 &   # the CPU sizes; resumable
    python benchmarks/transfer.py --tasks child --optimizers adam droprmsprop_sign --seeds 1-5
    python benchmarks/transfer.py --report-only           # the table and the plots from the runs saved so far
    python benchmarks/transfer.py --speed                 # the optimizers' step times on ResNet-20, interleaved
    python benchmarks/transfer.py --full --device cuda    # the GPU sizes
    python benchmarks/transfer.py --smoke --out /tmp/t    # every task and optimizer for a few steps (< 1 min)

Optimizers (``OPTIMIZERS``): torch's Adam and SGD with momentum 0.9 (``_common.TORCH_BASELINES``),
the package's ``PowerSign`` and ``AddSign`` (defaults: base e / alpha 1, beta 0.9, no sign
decay), and through ``NOSOptimizer`` the family the searches found, ``drop(RMSProp, 0.3) +
sign(m)`` and ``RMSProp + sign(m)`` (docs/results.md), and the two rules the searches
promoted (docs/results.md, "More child seeds for the two candidates").

Tasks (``TASKS``; the sizes are ``SIZES[mode][task]``; ``docs/transfer.md`` states them):

- ``resnet20``, (a): ResNet-20 (pre-activation, ``wrn_transfer.WideResNet(22, 1)``: 3 x 3 basic
  blocks of 16/32/64 channels, BatchNorm, 1x1 projection shortcuts at the two downsamplings,
  0.27M weights) on CIFAR-10 with RandomCrop(32, padding=4) + horizontal flip, batched and
  seeded; test accuracy on the 10,000 test images.
- ``charlstm``, (b): a character-level (byte) 2-layer LSTM language model on the source files
  of this Python's standard library (``Lib/*.py``, sorted by name, split by a hash of the file
  name: 10% validation, 10% test, 80% training); test bits per character.
- ``child``, (c): the paper's child (``nos_gym.tasks.convnet.ChildNet``, its seeded initial
  weights and minibatch order) on all 45,000 training images for 10 epochs; test accuracy.

Protocol, per task and optimizer:

1. **Rate selection** (phase ``select``, seed ``SELECT_SEED`` = 0): every rate of a log grid
   of ``len(FACTORS)`` rates centred on the optimizer's ``CENTRES[task]`` (factors 0.1 ... 10:
   two orders of magnitude), trained ``select_epochs`` epochs; the rate with the best final
   validation metric is chosen (ties: the smaller rate; diverged runs only if all diverged).
   The validation data is held apart from the test data. A choice at an edge of the grid
   is flagged in the table: recentre that optimizer's grid on the edge rate (its centre
   times 10 or 0.1, so three of the five rates are reused) and run again.
2. **Final runs** (phase ``final``, seeds ``--seeds``, default 1-5): the chosen rate, ``epochs``
   epochs, the validation metric after every epoch (the learning curves) and the test
   metric at the end. Seed s fixes the initial weights, the minibatch order, the
   augmentation draws and the draws of ``drop``: the same for every optimizer (paired).

Each finished run is one JSON, ``OUT/runs/MODE/TASK/OPTIMIZER/PHASE-lrLR-sSEED.json``, written
atomically; a run whose JSON exists (with the same settings) is not run again, so a killed
job continues where it stopped. The table (``OUT/MODE/table.md``), the learning curves
(``OUT/MODE/curves.png``), ``report.txt`` and ``summary.json`` are written after the runs.

Statistics: per task and optimizer the mean and sd of the test metric over the seeds; against
Adam, seed by seed, the mean paired difference, its standard error, at how many seeds it was
better, and a two-sided paired t-test, Holm-corrected over all the table's comparisons with
Adam. The primary comparison, declared before any run: ``droprmsprop_sign`` against Adam on
each task (Holm over the tasks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    OUT_ROOT,
    PAPER_TABLE1,
    TORCH_BASELINES,
    Stopwatch,
    format_seconds,
    machine,
    markdown_table,
    pick_device,
    prepare_out,
    save_figure,
    use_agg,
    write_report,
)
from bench_agents import parse_seeds  # noqa: E402
from seed_compare import compare  # noqa: E402
from wrn_transfer import WideResNet, accuracy  # noqa: E402

from nos_gym.data import CIFAR10CorruptError, CIFAR10NotFoundError, Split, dataset_id, load_cifar10  # noqa: E402
from nos_gym.data import normalize as normalize_images  # noqa: E402
from nos_gym.optim import AddSign, NOSOptimizer, PowerSign  # noqa: E402
from nos_gym.tasks.convnet import ChildNet, batch_order, init_child  # noqa: E402

#: bump when a change alters what a run computes: runs saved under another version are not reused
PROTOCOL_VERSION = 1
SELECT_SEED = 0
DEFAULT_SEEDS = (1, 2, 3, 4, 5)
#: the rate grid of every optimizer: its centre times these (two orders of magnitude, 5 rates)
FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
#: the primary comparison (declared before any run): this optimizer against Adam, on each task
PRIMARY = "droprmsprop_sign"
REFERENCE = "adam"

#: the rule strings of the NOSOptimizer entries (the language's notation, parsed, never eval'd)
RULES: dict[str, str] = {
    "droprmsprop_sign": "drop(RMSProp, 0.3) + sign(m)",
    "rmsprop_sign": "RMSProp + sign(m)",
    # the two rules the searches promoted (TRPO-LSTM seed 2; TRPO-LSTM max_kl 0.03), both of the family
    "promoted_s2": "drop(RMSProp, 0.3) - sign(clip(sign(m), 1e-3) / log|y|)",
    "promoted_kl003": "drop(1e-3 * w, 0.3) - drop(-sign(m) - drop(RMSProp, 0.3), 0.1)",
}
#: name -> what is built, as printed
OPTIMIZERS: dict[str, str] = {
    "adam": TORCH_BASELINES["adam"][0],
    "momentum": TORCH_BASELINES["momentum"][0],
    "powersign": "nos_gym.optim.PowerSign",
    "addsign": "nos_gym.optim.AddSign",
    **{name: f"NOSOptimizer({rule!r})" for name, rule in RULES.items()},
}
#: the centre of each optimizer's rate grid per task, fixed before any transfer run (from the
#: child's sweeps and common practice); an edge choice in the table says to recentre that grid on it
CENTRES: dict[str, dict[str, float]] = {
    "resnet20": {"adam": 1e-3, "momentum": 0.1, "powersign": 0.1, "addsign": 0.1, "droprmsprop_sign": 3e-4,
                 "rmsprop_sign": 3e-4, "promoted_s2": 3e-4, "promoted_kl003": 3e-4},
    # momentum, addsign and promoted_kl003 recentred on their first grids' top edges (centres were 0.3, 1.0, 1e-3)
    "charlstm": {"adam": 3e-3, "momentum": 3.0, "powersign": 1.0, "addsign": 10.0, "droprmsprop_sign": 1e-3,
                 "rmsprop_sign": 1e-3, "promoted_s2": 1e-3, "promoted_kl003": 1e-2},
    "child": {"adam": 1e-3, "momentum": 3e-3, "powersign": 1e-2, "addsign": 1e-2, "droprmsprop_sign": 3e-4,
              "rmsprop_sign": 3e-4, "promoted_s2": 3e-4, "promoted_kl003": 3e-4},
}


@dataclass(frozen=True)
class TaskInfo:
    title: str
    metric: str  # what the table reports
    higher_better: bool
    failure: float  # the metric of a final run that diverged: chance accuracy, a uniform byte model's bits
    fmt: str  # format of the metric's mean and differences


TASKS: dict[str, TaskInfo] = {
    "resnet20": TaskInfo("(a) ResNet-20 on CIFAR-10, crop + flip", "test accuracy (%)", True, 0.1, "pct"),
    "charlstm": TaskInfo("(b) 2-layer char-LSTM on the Python standard library", "test bits per char", False, 8.0,
                         "bpc"),
    "child": TaskInfo("(c) the paper's child, trained long", "test accuracy (%)", True, 0.1, "pct"),
}

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    # about 4 h of 2 cores in all (--plan measures it): see docs/transfer.md for the reasons
    "cpu": {
        "resnet20": {"depth": 22, "width": 1, "train_examples": 10_000, "val_examples": 2_000,
                     "test_examples": 10_000, "batch_size": 128, "epochs": 5, "select_epochs": 2,
                     "schedule": "cosine", "weight_decay": 0.0, "augment": True},
        "charlstm": {"embed": 64, "hidden": 128, "layers": 2, "seq_len": 128, "batch_size": 32,
                     "train_chunks": 6_400, "val_chars": 200_000, "test_chars": None, "epochs": 5,
                     "select_epochs": 2, "schedule": "cosine", "clip_norm": 1.0},
        "child": {"filters": 32, "train_examples": 45_000, "val_examples": 5_000, "test_examples": 10_000,
                  "batch_size": 100, "epochs": 10, "select_epochs": 1, "schedule": "constant",
                  "weight_decay": 0.0, "augment": False},
    },
    # one GPU
    "full": {
        "resnet20": {"depth": 22, "width": 1, "train_examples": 45_000, "val_examples": 5_000,
                     "test_examples": 10_000, "batch_size": 128, "epochs": 50, "select_epochs": 15,
                     "schedule": "cosine", "weight_decay": 5e-4, "augment": True},
        "charlstm": {"embed": 128, "hidden": 512, "layers": 2, "seq_len": 256, "batch_size": 64,
                     "train_chunks": None, "val_chars": None, "test_chars": None, "epochs": 20,
                     "select_epochs": 5, "schedule": "cosine", "clip_norm": 1.0},
        "child": {"filters": 32, "train_examples": 45_000, "val_examples": 5_000, "test_examples": 10_000,
                  "batch_size": 100, "epochs": 50, "select_epochs": 5, "schedule": "constant",
                  "weight_decay": 0.0, "augment": False},
    },
    # the pipeline only, seconds: every task and optimizer for a few steps
    "smoke": {
        "resnet20": {"depth": 10, "width": 1, "train_examples": 16, "val_examples": 16, "test_examples": 16,
                     "batch_size": 8, "epochs": 2, "select_epochs": 1, "schedule": "cosine",
                     "weight_decay": 5e-4, "augment": True},
        "charlstm": {"embed": 8, "hidden": 16, "layers": 2, "seq_len": 16, "batch_size": 4, "train_chunks": 8,
                     "val_chars": 256, "test_chars": 256, "epochs": 2, "select_epochs": 1, "schedule": "cosine",
                     "clip_norm": 1.0},
        "child": {"filters": 8, "train_examples": 16, "val_examples": 16, "test_examples": 16, "batch_size": 8,
                  "epochs": 2, "select_epochs": 1, "schedule": "constant", "weight_decay": 0.0, "augment": False},
    },
}
#: per mode: the rate factors and the default final seeds (smoke: fewer, to stay fast)
MODE_FACTORS = {"cpu": FACTORS, "full": FACTORS, "smoke": (0.1, 1.0, 10.0)}
MODE_SEEDS = {"cpu": DEFAULT_SEEDS, "full": DEFAULT_SEEDS, "smoke": (1, 2)}


class TransferError(Exception):
    """A mistake of the caller (a name, a mismatched saved run): printed as one line, no traceback."""


def rate_grid(task: str, optimizer: str, factors: Sequence[float] = FACTORS) -> list[float]:
    """The rates tried for ``optimizer`` on ``task``: its centre times ``factors``, 3 significant digits."""
    centre = CENTRES[task][optimizer]
    return [float(f"{centre * f:.3g}") for f in factors]


def make_optimizer(name: str, params, lr: float, seed: int) -> torch.optim.Optimizer:
    """The optimizer ``name`` of ``OPTIMIZERS`` at rate ``lr``; ``seed`` seeds a rule's ``drop`` draws."""
    if name in TORCH_BASELINES:
        return TORCH_BASELINES[name][1](params, lr)
    if name == "powersign":
        return PowerSign(params, lr=lr)
    if name == "addsign":
        return AddSign(params, lr=lr)
    return NOSOptimizer(params, rule=RULES[name], lr=lr, seed=seed)


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:16]


def _tensor_sha(tensors: Sequence[Tensor]) -> str:
    return _sha(*(t.detach().cpu().contiguous().numpy().tobytes() for t in tensors))


# ------------------------------------------------------------------------------ data
@lru_cache(maxsize=2)
def _cifar(device: str) -> tuple[Split, Split, Split, str]:
    ds = load_cifar10(device=device)
    return ds.train, ds.val, ds.test, dataset_id()


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip on a uint8 batch, drawn from ``gen``."""
    n, dev = images.shape[0], images.device
    offsets = torch.randint(0, 9, (n, 2), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    ar = torch.arange(32)
    rows = (offsets[:, :1] + ar).to(dev)
    cols = offsets[:, 1:] + ar
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(dev)  # a flipped crop reads its columns backwards
    padded = F.pad(images, (4, 4, 4, 4))
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def stdlib_files() -> list[Path]:
    """This Python's standard-library modules ``Lib/*.py``, sorted by name (present wherever Python is)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda p: p.name)
    if not files:
        raise TransferError(f"no *.py files in {root}: the standard library's sources are not installed here")
    return files


def file_split(name: str) -> str:
    """A file's part of the corpus, from a hash of its name: test 10%, val 10%, train 80%."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


@lru_cache(maxsize=1)
def stdlib_corpus() -> tuple[dict[str, Tensor], str, dict[str, int]]:
    """``{"train", "val", "test"}`` byte streams (int64), the corpus's fingerprint, files per part."""
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    counts = dict.fromkeys(parts, 0)
    h = hashlib.sha256()
    for f in stdlib_files():
        data = f.read_bytes()
        part = file_split(f.name)
        parts[part].append(data)
        counts[part] += 1
        h.update(f.name.encode() + b"\0" + data)
    streams = {k: torch.frombuffer(bytearray(b"".join(v)), dtype=torch.uint8).long() for k, v in parts.items()}
    return streams, h.hexdigest()[:16], counts


def chunks(stream: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-byte targets, (n, seq_len) each: every byte but the first is predicted once."""
    n = (len(stream) - 1) // seq_len
    return stream[:n * seq_len].view(n, seq_len), stream[1:n * seq_len + 1].view(n, seq_len)


class CharLSTM(nn.Module):
    """Byte embedding -> ``layers``-layer LSTM -> logits over the 256 byte values."""

    def __init__(self, embed: int, hidden: int, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(256, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, 256)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(x))[0])


@torch.no_grad()
def bits_per_char(model: nn.Module, data: tuple[Tensor, Tensor], device: torch.device,
                  batch: int = 64) -> tuple[float, bool]:
    """Mean bits per predicted byte over ``chunks`` (the state starts at zero in every chunk)."""
    model.eval()
    x_all, y_all = data
    total, count = 0.0, 0
    for s in range(0, len(x_all), batch):
        x, y = x_all[s:s + batch].to(device), y_all[s:s + batch].to(device)
        total += float(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    model.train()
    bpc = total / max(1, count) / math.log(2)
    return bpc, math.isfinite(bpc)


# ------------------------------------------------------------------------------ tasks
class Task:
    """One task at one size: its data, its seeded model, its minibatches, its metric."""

    def __init__(self, name: str, size: dict[str, Any], device: torch.device):
        self.name, self.size, self.device, self.info = name, size, device, TASKS[name]

    def fingerprint(self) -> str:
        raise NotImplementedError

    def build(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def batches(self, seed: int, epochs: int):
        """Per epoch, an iterator of (inputs, targets): the same for every optimizer at ``seed``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> tuple[float, bool]:
        """The metric on ``"val"`` or ``"test"`` and whether it was finite."""
        raise NotImplementedError

    def eval_size(self, split: str) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        """The data, in one line, for the report."""
        raise NotImplementedError


class ImageTask(Task):
    """``resnet20`` and ``child``: CIFAR-10, the 45k/5k split of ``nos_gym.data``, test on the test set."""

    def data(self) -> tuple[Split, Split, Split]:
        train, val, test, _ = _cifar(str(self.device))
        s = self.size
        return train.take(s["train_examples"]), val.take(s["val_examples"]), test.take(s["test_examples"])

    def fingerprint(self) -> str:
        return _cifar(str(self.device))[3]

    def build(self, seed: int) -> nn.Module:
        if self.name == "child":  # the child's own seeded initial weights (those of the search's child seed)
            return ChildNet(self.size["filters"]).load_flat(init_child(seed, self.size["filters"])).to(self.device)
        torch.manual_seed(seed)
        model = WideResNet(self.size["depth"], self.size["width"])
        return model.to(self.device, memory_format=torch.channels_last)

    def steps_per_epoch(self) -> int:
        return self.size["train_examples"] // self.size["batch_size"]

    def batches(self, seed: int, epochs: int):
        train = self.data()[0]
        order = batch_order(len(train), self.size["batch_size"], epochs, seed)
        per = len(order) // epochs
        for e in range(epochs):
            gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + e)  # this epoch's augmentation draws
            yield self._epoch(train, order[e * per:(e + 1) * per], gen)

    def _epoch(self, train: Split, order: list[Tensor], gen: torch.Generator):
        for idx in order:
            idx = idx.to(self.device)
            images = train.images[idx]
            if self.size["augment"]:
                images = augment(images, gen)
            yield normalize_images(images).contiguous(memory_format=torch.channels_last), train.labels[idx]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x).float(), y)

    def evaluate(self, model: nn.Module, split: str) -> tuple[float, bool]:
        _, val, test = self.data()
        return accuracy(model, val if split == "val" else test, self.device)

    def eval_size(self, split: str) -> int:
        _, val, test = self.data()
        return len(val if split == "val" else test)

    def describe(self) -> str:
        train, val, test = self.data()
        aug = "RandomCrop(32, padding=4) + RandomHorizontalFlip" if self.size["augment"] else "no augmentation"
        return (f"CIFAR-10 (nos_gym.data, copy {self.fingerprint()}): the first {len(train):,} images of the "
                f"45,000-image training split ({aug}), {len(val):,} of the 5,000 held-out validation images, "
                f"{len(test):,} test images")


@lru_cache(maxsize=4)
def train_chunks(seq_len: int, n: int | None) -> tuple[Tensor, Tensor]:
    """The training chunks: all of them, or a fixed subset of ``n`` spread over every training file (the same
    for every seed)."""
    x, y = chunks(stdlib_corpus()[0]["train"], seq_len)
    if n is not None and n < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n].sort().values
        x, y = x[keep], y[keep]
    return x, y


@lru_cache(maxsize=8)
def eval_chunks(split: str, seq_len: int, cap: int | None) -> tuple[Tensor, Tensor]:
    """The chunks of the first ``cap`` bytes (None: all) of the validation or test files."""
    stream = stdlib_corpus()[0][split]
    return chunks(stream if cap is None else stream[:cap + 1], seq_len)


class CharTask(Task):
    """``charlstm``: next-byte prediction on the standard library's sources, split by file."""

    def fingerprint(self) -> str:
        return stdlib_corpus()[1]

    def _train_chunks(self) -> tuple[Tensor, Tensor]:
        return train_chunks(self.size["seq_len"], self.size["train_chunks"])

    def _eval_chunks(self, split: str) -> tuple[Tensor, Tensor]:
        return eval_chunks(split, self.size["seq_len"], self.size[f"{split}_chars"])

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharLSTM(self.size["embed"], self.size["hidden"], self.size["layers"]).to(self.device)

    def steps_per_epoch(self) -> int:
        return len(self._train_chunks()[0]) // self.size["batch_size"]

    def batches(self, seed: int, epochs: int):
        x, y = self._train_chunks()
        order = batch_order(len(x), self.size["batch_size"], epochs, seed)
        per = len(order) // epochs
        for e in range(epochs):
            yield ((x[idx].to(self.device), y[idx].to(self.device)) for idx in order[e * per:(e + 1) * per])

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())

    def evaluate(self, model: nn.Module, split: str) -> tuple[float, bool]:
        return bits_per_char(model, self._eval_chunks(split), self.device)

    def eval_size(self, split: str) -> int:
        return self._eval_chunks(split)[1].numel()

    def describe(self) -> str:
        streams, fingerprint, counts = stdlib_corpus()
        x = self._train_chunks()[0]
        return (f"Python {sys.version.split()[0]} Lib/*.py (fingerprint {fingerprint}): {counts['train']} training "
                f"files ({len(streams['train']):,} bytes; {x.numel():,} bytes per epoch in {len(x):,} chunks of "
                f"{self.size['seq_len']}), {counts['val']} validation files ({self.eval_size('val'):,} bytes "
                f"scored), {counts['test']} test files ({self.eval_size('test'):,} bytes scored)")


def make_task(name: str, mode: str, device: torch.device) -> Task:
    return (CharTask if name == "charlstm" else ImageTask)(name, SIZES[mode][name], device)


# ------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class RunSpec:
    task: str
    optimizer: str
    lr: float
    seed: int
    phase: str  # "select" or "final"
    mode: str
    out: str  # the runs' root folder
    device: str

    @property
    def path(self) -> Path:
        return (Path(self.out) / "runs" / self.mode / self.task / self.optimizer
                / f"{self.phase}-lr{self.lr:g}-s{self.seed}.json")

    def epochs(self) -> int:
        size = SIZES[self.mode][self.task]
        return size["select_epochs"] if self.phase == "select" else size["epochs"]


def identity(spec: RunSpec, fingerprint: str) -> dict[str, Any]:
    """What defines a run: a saved run is reused only if this is equal."""
    return {"version": PROTOCOL_VERSION, "task": spec.task, "optimizer": spec.optimizer,
            "built": OPTIMIZERS[spec.optimizer], "lr": spec.lr, "seed": spec.seed, "phase": spec.phase,
            "epochs": spec.epochs(), "size": SIZES[spec.mode][spec.task], "data": fingerprint}


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the rate at 0-based ``step`` of ``total``: constant, or cosine annealing to 0."""
    return 1.0 if schedule == "constant" else 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_run(spec: RunSpec) -> dict[str, Any]:
    """Train one (task, optimizer, rate, seed); write its JSON (atomically) and return the record."""
    clock = Stopwatch()
    device = torch.device(spec.device)
    task = make_task(spec.task, spec.mode, device)
    size, epochs = task.size, spec.epochs()
    model = task.build(spec.seed)
    init_sha = _tensor_sha(list(model.state_dict().values()))
    params = [p for p in model.parameters()]
    opt = make_optimizer(spec.optimizer, params, spec.lr, spec.seed)
    total = task.steps_per_epoch() * epochs
    amp = device.type == "cuda" and isinstance(task, ImageTask)  # bf16 autocast for the convnets on a GPU
    rec: dict[str, Any] = {"identity": identity(spec, task.fingerprint()), "epoch": [], "train_loss": [], "val": [],
                           "epoch_seconds": [], "test": None, "diverged": False, "init_sha": init_sha}
    order_h, step = hashlib.sha256(), 0
    for e, batches in enumerate(task.batches(spec.seed, epochs)):
        t0, losses = time.perf_counter(), []
        for x, y in batches:
            for group in opt.param_groups:
                group["lr"] = spec.lr * lr_factor(size["schedule"], step, total)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = task.loss(model, x, y)
            value = loss.detach().item()
            if not math.isfinite(value):
                rec["diverged"] = True
                break
            losses.append(value)
            if e == 0 and step < 4:  # the first minibatches, as trained on: the same data for every optimizer
                order_h.update(x.detach().cpu().numpy().tobytes() + y.cpu().numpy().tobytes())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if size.get("weight_decay"):  # L2 in the gradient, the same for every optimizer (as wrn_transfer)
                torch._foreach_add_([p.grad for p in params], params, alpha=size["weight_decay"])
            if size.get("clip_norm"):
                torch.nn.utils.clip_grad_norm_(params, size["clip_norm"])
            opt.step()
            step += 1
        seconds = time.perf_counter() - t0
        if not rec["diverged"]:
            val, finite = task.evaluate(model, "val")
            rec["diverged"] = not finite
        if rec["diverged"]:
            rec["diverged_in_epoch"] = e + 1
            break
        rec["epoch"].append(e + 1)
        rec["train_loss"].append(float(np.mean(losses)) if losses else math.nan)
        rec["val"].append(val)
        rec["epoch_seconds"].append(round(seconds, 3))
    if spec.phase == "final" and not rec["diverged"]:
        rec["test"], finite = task.evaluate(model, "test")
        if not finite:
            rec["diverged"], rec["test"] = True, None
    rec["order_sha"] = order_h.hexdigest()[:16]
    rec["wall_seconds"] = round(clock.seconds, 3)
    rec["machine"] = machine(device)
    rec["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = spec.path.with_name(spec.path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, spec.path)  # whole or absent: a killed run is run again
    return rec


def load_run(spec: RunSpec, fingerprint: str) -> dict[str, Any] | None:
    """The saved record of ``spec``, or None; a record made with other settings is an error."""
    if not spec.path.exists():
        return None
    try:
        rec = json.loads(spec.path.read_text())
    except json.JSONDecodeError:
        raise TransferError(f"{spec.path} is not valid JSON: delete it to run it again") from None
    want = identity(spec, fingerprint)
    if rec.get("identity") != want:
        got = rec.get("identity") or {}
        diff = [k for k in want if got.get(k) != want[k]]
        raise TransferError(f"{spec.path} was made with other settings ({', '.join(diff)} differ): "
                            "move it away or use another --out")
    return rec


def choose_rate(task: str, records: dict[float, dict[str, Any]]) -> tuple[float, bool]:
    """The rate with the best final validation metric (ties: the smaller) and whether it is a grid edge."""
    sign = 1.0 if TASKS[task].higher_better else -1.0
    lrs = sorted(records)
    alive = [lr for lr in lrs if not records[lr]["diverged"] and records[lr]["val"]]
    pool = alive or lrs
    best = max(pool, key=lambda lr: (sign * records[lr]["val"][-1] if records[lr]["val"] else -math.inf, -lr))
    return best, best in (lrs[0], lrs[-1])


class _Inline:
    """An executor that runs each job at once in this process (``--jobs 1``: tests, smoke, GPU)."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


class Plan:
    """The runs of (tasks x optimizers): rate selection, then the finals at the chosen rate."""

    def __init__(self, tasks: Sequence[str], optimizers: Sequence[str], seeds: Sequence[int], mode: str,
                 out: Path, device: torch.device):
        self.tasks, self.optimizers, self.seeds, self.mode = list(tasks), list(optimizers), list(seeds), mode
        self.out, self.device = Path(out), device
        self.factors = MODE_FACTORS[mode]
        self.prints: dict[str, str] = {}
        self.records: dict[RunSpec, dict[str, Any]] = {}

    def spec(self, task: str, opt: str, lr: float, seed: int, phase: str) -> RunSpec:
        return RunSpec(task, opt, lr, seed, phase, self.mode, str(self.out), str(self.device))

    def select_specs(self, task: str, opt: str) -> list[RunSpec]:
        return [self.spec(task, opt, lr, SELECT_SEED, "select") for lr in rate_grid(task, opt, self.factors)]

    def final_specs(self, task: str, opt: str, lr: float) -> list[RunSpec]:
        return [self.spec(task, opt, lr, s, "final") for s in self.seeds]

    def load(self) -> None:
        """Fingerprint the data (a clear error if it is missing) and read the finished runs."""
        for task in self.tasks:
            self.prints[task] = make_task(task, self.mode, self.device).fingerprint()
            for opt in self.optimizers:
                for spec in self.select_specs(task, opt):
                    self._read(spec)
                choice = self.choice(task, opt)
                if choice is not None:
                    for spec in self.final_specs(task, opt, choice[0]):
                        self._read(spec)

    def _read(self, spec: RunSpec) -> None:
        rec = load_run(spec, self.prints[spec.task])
        if rec is not None:
            self.records[spec] = rec

    def choice(self, task: str, opt: str) -> tuple[float, bool] | None:
        """(chosen rate, at an edge) once every rate of the grid has run; else None."""
        done = {s.lr: self.records.get(s) for s in self.select_specs(task, opt)}
        if any(r is None for r in done.values()):
            return None
        return choose_rate(task, done)

    def todo(self) -> tuple[list[RunSpec], int]:
        """The runs to do now (selection, and finals whose rate is chosen) and the finals still waiting on one."""
        now, waiting = [], 0
        for task in self.tasks:
            for opt in self.optimizers:
                now += [s for s in self.select_specs(task, opt) if s not in self.records]
                choice = self.choice(task, opt)
                if choice is None:
                    waiting += len(self.seeds)
                else:
                    now += [s for s in self.final_specs(task, opt, choice[0]) if s not in self.records]
        return now, waiting

    def _priority(self, spec: RunSpec) -> tuple:
        return (self.tasks.index(spec.task), spec.phase != "select", self.optimizers.index(spec.optimizer),
                spec.lr, spec.seed)

    def run(self, jobs: int, progress: bool = True) -> None:
        """Every run still to do, ``jobs`` at a time (worker processes of cores/jobs threads each when > 1)."""
        from tqdm.auto import tqdm

        ready, waiting = self.todo()
        if not ready:
            return
        bar = tqdm(total=len(ready) + waiting, desc="transfer runs", unit="run", disable=not progress,
                   dynamic_ncols=True)
        if jobs > 1:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            import multiprocessing as mp

            ex: Any = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                          initargs=(threads,))
        else:
            ex = _Inline()
        ready.sort(key=self._priority)
        inflight: dict[Future, RunSpec] = {}
        try:
            while ready or inflight:
                while ready and len(inflight) < jobs:
                    spec = ready.pop(0)
                    bar.set_postfix_str(f"{spec.task} {spec.optimizer} lr {spec.lr:g} s{spec.seed}")
                    inflight[ex.submit(train_run, spec)] = spec
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    spec = inflight.pop(fut)
                    self.records[spec] = fut.result()
                    bar.update(1)
                    if spec.phase == "select":
                        choice = self.choice(spec.task, spec.optimizer)
                        if choice is not None:  # the grid is complete: its finals can start
                            ready += [s for s in self.final_specs(spec.task, spec.optimizer, choice[0])
                                      if s not in self.records]
                            ready.sort(key=self._priority)
        finally:
            ex.shutdown(cancel_futures=True)
            bar.close()


# ------------------------------------------------------------------------------ statistics
def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p of Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4; no scipy here)."""
    if not math.isfinite(t):
        return 0.0 if not math.isnan(t) else math.nan
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi)(theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, series = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):
            series += term
            term *= c2 * (2 * j) / (2 * j + 1)
        a = 2.0 / math.pi * (theta + s * series)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, series = 1.0, 0.0
        for j in range(1, df // 2 + 1):
            series += term
            term *= c2 * (2 * j - 1) / (2 * j)
        a = s * series
    return min(1.0, max(0.0, 1.0 - a))


def holm(pvalues: dict[Any, float]) -> dict[Any, float]:
    """Holm's step-down adjustment of a family of p-values (NaN entries are left out)."""
    keys = sorted((k for k, p in pvalues.items() if not math.isnan(p)), key=lambda k: pvalues[k])
    m, out, running = len(keys), {}, 0.0
    for i, k in enumerate(keys):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = running
    return {k: out.get(k, math.nan) for k in pvalues}


def task_results(plan: Plan, task: str) -> dict[str, Any]:
    """Per optimizer: the sweep, the chosen rate, the final metric per seed; and the paired comparisons with Adam."""
    info = TASKS[task]
    rows: dict[str, dict[str, Any]] = {}
    for opt in plan.optimizers:
        sweep = {s.lr: plan.records.get(s) for s in plan.select_specs(task, opt)}
        row: dict[str, Any] = {"grid": sorted(sweep), "sweep_val": {lr: (r["val"][-1] if r and r["val"] else None)
                                                                    for lr, r in sweep.items()},
                               "sweep_diverged": sum(bool(r and r["diverged"]) for r in sweep.values()),
                               "lr": None, "edge": False, "per_seed": {}, "curves": {}, "diverged": 0}
        choice = plan.choice(task, opt)
        if choice is not None:
            row["lr"], row["edge"] = choice
            for spec in plan.final_specs(task, opt, choice[0]):
                rec = plan.records.get(spec)
                if rec is None:
                    continue
                row["per_seed"][spec.seed] = info.failure if rec["diverged"] else rec["test"]
                row["diverged"] += bool(rec["diverged"])
                row["curves"][spec.seed] = {k: rec[k] for k in ("epoch", "val", "train_loss", "epoch_seconds")}
        secs = [np.mean(c["epoch_seconds"]) for c in row["curves"].values() if c["epoch_seconds"]]
        row["s_per_epoch"] = float(np.median(secs)) if secs else None
        rows[opt] = row
    # the paired comparison over the seeds every optimizer finished
    common = [s for s in plan.seeds if all(s in r["per_seed"] for r in rows.values())]
    stats: dict[str, dict[str, Any]] = {}
    if REFERENCE in rows and len(common) >= 2:
        sign = 1.0 if info.higher_better else -1.0  # compare() counts "higher" as better: flip lower-is-better metrics
        values = {opt: [sign * r["per_seed"][s] for s in common] for opt, r in rows.items()}
        for c in compare(values, REFERENCE):
            d_se = c["paired_se"]
            t = c["diff"] / d_se if d_se > 0 else (math.inf if c["diff"] else math.nan)
            stats[c["rule"]] = {"mean": sign * c["mean"], "sd": c["sd"], "diff": sign * c["diff"], "se": d_se,
                                "better": c["wins"], "n": c["seeds"],
                                "p": t_two_sided_p(t, c["seeds"] - 1) if c["rule"] != REFERENCE else math.nan}
    return {"rows": rows, "seeds": common, "stats": stats}


# ------------------------------------------------------------------------------ output
def _fmt(task: str, x: float | None, diff: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if TASKS[task].fmt == "pct":
        return f"{100 * x:+.2f}" if diff else f"{100 * x:.2f}"
    return f"{x:+.4f}" if diff else f"{x:.4f}"


def report(plan: Plan) -> tuple[list[str], dict[str, Any]]:
    """The tables (markdown) and the summary of every task, with Holm over all comparisons with Adam."""
    results = {task: task_results(plan, task) for task in plan.tasks}
    family = {(task, opt): s["p"] for task, r in results.items() for opt, s in r["stats"].items() if opt != REFERENCE}
    adjusted = holm(family)
    primary = holm({task: r["stats"][PRIMARY]["p"] for task, r in results.items() if PRIMARY in r["stats"]})
    lines = []
    for task, res in results.items():
        info, rows, stats = TASKS[task], res["rows"], res["stats"]
        ref_s = rows.get(REFERENCE, {}).get("s_per_epoch")
        table = []
        for opt, row in rows.items():
            st = stats.get(opt, {})
            per_seed = row["per_seed"]
            mean = st.get("mean", float(np.mean(list(per_seed.values()))) if per_seed else None)
            sd = st.get("sd", float(np.std(list(per_seed.values()), ddof=1)) if len(per_seed) > 1 else None)
            scale = 100 if info.fmt == "pct" else 1
            is_ref = opt == REFERENCE
            table.append([
                opt, f"`{OPTIMIZERS[opt]}`", f"{row['grid'][0]:g}-{row['grid'][-1]:g}",
                "-" if row["lr"] is None else f"{row['lr']:g}" + (" (edge)" if row["edge"] else ""),
                f"{row['sweep_diverged']}/{len(row['grid'])}", f"{len(per_seed)}/{len(plan.seeds)}",
                _fmt(task, mean), "-" if sd is None else f"{scale * sd:.{2 if scale == 100 else 4}f}",
                "-" if is_ref or "diff" not in st else _fmt(task, st["diff"], diff=True),
                "-" if is_ref or "se" not in st else f"{scale * st['se']:.{2 if scale == 100 else 4}f}",
                "-" if is_ref or "better" not in st else f"{st['better']}/{st['n']}",
                "-" if is_ref or "p" not in st else f"{st['p']:.3f}",
                "-" if is_ref or (task, opt) not in adjusted else f"{adjusted[(task, opt)]:.3f}",
                str(row["diverged"]),
                "-" if row["s_per_epoch"] is None else f"{row['s_per_epoch']:.1f}",
                "-" if row["s_per_epoch"] is None or not ref_s else f"{row['s_per_epoch'] / ref_s:.2f}x",
            ])
        headers = ["optimizer", "built as", "rates tried", "chosen lr", "sweep diverged", "seeds",
                   info.metric, "sd", "vs Adam (paired)", "se", "better at", "p (t)", "p Holm", "final diverged",
                   "s/epoch", "vs Adam"]
        size = SIZES[plan.mode][task]
        lines += [f"## {info.title}", "",
                  f"settings ({plan.mode}): " + ", ".join(f"{k} {v}" for k, v in size.items()),
                  f"data: {make_task(task, plan.mode, plan.device).describe()}",
                  f"rate selection on seed {SELECT_SEED}, "
                  f"{size['select_epochs']} epoch(s), final validation metric; finals at seeds {plan.seeds}, "
                  f"{size['epochs']} epochs; paired over seeds {res['seeds']}", "",
                  markdown_table(headers, table, ["l", "l"] + ["r"] * (len(headers) - 2)), ""]
        if task == "resnet20":
            paper = ", ".join(f"{n} {PAPER_TABLE1[n][1]:.1f}" for n in ("adam", "momentum", "powersign"))
            lines += [f"The paper's Table 1 (WRN-28-10, 300 epochs), Final Test %: {paper}.", ""]
    if primary:
        lines += ["Primary comparison (declared before any run): "
                  + "; ".join(f"{task}: {PRIMARY} - adam {_fmt(task, results[task]['stats'][PRIMARY]['diff'], True)}"
                              f", p {results[task]['stats'][PRIMARY]['p']:.3f}, Holm over {len(primary)} tasks "
                              f"{p:.3f}" for task, p in primary.items()), ""]
    lines += ["vs Adam: the optimizer's test metric minus Adam's, seed by seed, averaged (accuracy: positive is "
              "better; bits per char: negative is better); se: its standard error; better at: the seeds where it beat "
              f"Adam. p (t): two-sided paired t-test; p Holm: Holm over all {len(family)} comparisons with Adam in "
              "these tables. A diverged final run counts as chance accuracy (10%) or 8 bits per char.",
              "s/epoch: median over the final seeds of the training seconds per epoch (evaluation excluded); "
              "runs shared the machine with each other (--jobs), so the ratios are rough."]
    summary = {"mode": plan.mode, "seeds": plan.seeds, "tasks": {
        task: {"rows": {opt: {k: v for k, v in row.items() if k != "curves"} for opt, row in r["rows"].items()},
               "stats": r["stats"], "paired_seeds": r["seeds"]} for task, r in results.items()},
        "holm": {f"{t}:{o}": p for (t, o), p in adjusted.items()}, "primary_holm": primary}
    return lines, {"summary": summary, "results": results}


def curves_figure(plan: Plan, results: dict[str, Any]):
    """Per task: the validation metric and the training loss per epoch, mean over the final seeds (band: sd)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(plan.tasks), figsize=(5.2 * len(plan.tasks), 7.5), squeeze=False)
    colors = plt.cm.tab10(range(10))
    for j, task in enumerate(plan.tasks):
        info = TASKS[task]
        for k, (opt, row) in enumerate(results[task]["rows"].items()):
            curves = [c for c in row["curves"].values() if c["epoch"]]
            if not curves:
                continue
            n = min(len(c["epoch"]) for c in curves)
            epochs = curves[0]["epoch"][:n]
            for i, key in enumerate(("val", "train_loss")):
                ys = np.array([c[key][:n] for c in curves], dtype=float)
                if key == "val" and info.fmt == "pct":
                    ys = 100 * ys
                mean, sd = ys.mean(0), ys.std(0)
                ax = axes[i, j]
                ax.plot(epochs, mean, marker=".", color=colors[k % 10], lw=1.2,
                        ls="-" if opt in (REFERENCE, PRIMARY) else "--", label=f"{opt} ({row['lr']:g})")
                if len(curves) > 1:
                    ax.fill_between(epochs, mean - sd, mean + sd, color=colors[k % 10], alpha=0.12)
        axes[0, j].set_title(info.title, fontsize=9)
        axes[0, j].set_ylabel("validation accuracy (%)" if info.fmt == "pct" else "validation bits per char")
        axes[1, j].set_ylabel("training loss (nats)")
        for i in range(2):
            axes[i, j].set_xlabel("epoch")
            axes[i, j].grid(alpha=0.3)
        if axes[0, j].get_legend_handles_labels()[0]:
            axes[0, j].legend(fontsize=6)
    fig.suptitle(f"transfer ({plan.mode} sizes): mean over final seeds {plan.seeds} at the chosen rates, band = sd",
                 fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ --plan
def _cycle(task: Task):
    """Epoch 0's minibatches of seed 0, over and over."""
    while True:
        yield from next(iter(task.batches(0, 1)))


def timed_steps(task: Task, model: nn.Module, opt: torch.optim.Optimizer, batches, steps: int) -> tuple[list[float], list[float]]:
    """Seconds of each of ``steps`` training steps (forward, backward, update) and of its update alone."""
    total, update = [], []
    # a GPU runs asynchronously: wait for its work before each clock reading
    sync = torch.cuda.synchronize if task.device.type == "cuda" else (lambda: None)
    for _, (x, y) in zip(range(steps), batches):
        sync()
        t0 = time.perf_counter()
        loss = task.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        total.append(t2 - t0)
        update.append(t2 - t1)
    return total, update


def probe(task: Task, optimizers: Sequence[str], steps: int = 4) -> dict[str, float]:
    """Seconds per training step of each optimizer (after one warm-up step), and per evaluated example."""
    out = {}
    for opt_name in optimizers:
        model = task.build(0)
        opt = make_optimizer(opt_name, list(model.parameters()), 1e-4, 0)
        batches = _cycle(task)
        timed_steps(task, model, opt, batches, 1)  # warm-up
        out[opt_name] = float(np.median(timed_steps(task, model, opt, batches, steps)[0]))
    t0 = time.perf_counter()
    task.evaluate(model, "val")
    out["eval_per_example"] = (time.perf_counter() - t0) / max(1, task.eval_size("val"))
    return out


def speed_lines(plan: Plan, rounds: int = 5, steps: int = 10, threads: int = 1) -> list[str]:
    """The optimizers' seconds per training step on each task, interleaved: in each of ``rounds``
    rounds every optimizer trains ``steps`` steps of its own model on the same minibatches (the
    order of the optimizers rotates from round to round); ``threads`` threads, as a worker has."""
    torch.set_num_threads(threads)
    lines = [f"# Training-step speed ({plan.mode} sizes): {rounds} interleaved rounds of {steps} steps per "
             f"optimizer, {threads} thread(s); machine: {machine(plan.device)}", ""]
    for name in plan.tasks:
        task = make_task(name, plan.mode, plan.device)
        runs = {}
        for o in plan.optimizers:
            model = task.build(0)
            opt = make_optimizer(o, list(model.parameters()), CENTRES[name][o], 0)
            runs[o] = (model, opt, _cycle(task))
            timed_steps(task, *runs[o], 2)  # warm-up
        per_round: dict[str, list[tuple[float, float]]] = {o: [] for o in runs}
        order = list(runs)
        for r in range(rounds):
            for o in order[r % len(order):] + order[: r % len(order)]:
                total, update = timed_steps(task, *runs[o], steps)
                per_round[o].append((float(np.median(total)), float(np.median(update))))
        ref = np.array([x[0] for x in per_round[REFERENCE]]) if REFERENCE in per_round else None
        rows = []
        for o, rs in per_round.items():
            t, u = np.array(rs).T
            ratio = None if ref is None else t / ref  # round by round, against Adam's
            rows.append([o, f"{1e3 * t.min():.1f}", f"{1e3 * np.median(t):.1f}", f"{1e3 * np.median(u):.2f}",
                         f"{100 * np.median(u / t):.1f}%", f"{np.median(t) * task.steps_per_epoch():.1f}",
                         "-" if ratio is None else f"{np.median(ratio):.3f}x",
                         "-" if ratio is None else f"{ratio.min():.3f}-{ratio.max():.3f}"])
        lines += [f"## {TASKS[name].title}", "",
                  markdown_table(["optimizer", "ms/step (min)", "ms/step (median)", "update ms (median)",
                                  "update share", "s/epoch (median x steps)", f"x {REFERENCE} (median)",
                                  f"x {REFERENCE} (range over rounds)"], rows), ""]
    lines.append("A step is forward, backward and the optimizer's update at one thread; the update column is "
                 "opt.step() alone. x adam: the step's time over Adam's in the same round.")
    return lines


def plan_lines(plan: Plan, jobs: int) -> list[str]:
    """Runs to do per task and phase, and their time from a short timing probe (threads as the workers have)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    now, _ = plan.todo()
    headers = ["task", "select runs to do", "final runs to do", "s per step (adam / nos / powersign)",
               "est. s per select run", "est. s per final run", "est. core-hours", f"est. wall ({jobs} jobs)"]
    rows, total = [], 0.0
    for name in plan.tasks:
        task = make_task(name, plan.mode, plan.device)
        times = probe(task, [o for o in ("adam", PRIMARY, "powersign") if o in OPTIMIZERS])
        step = float(np.mean([times[o] for o in ("adam", PRIMARY, "powersign")]))
        size = task.size
        per_val = times["eval_per_example"] * task.eval_size("val")
        per_test = times["eval_per_example"] * task.eval_size("test")
        sel_s = task.steps_per_epoch() * size["select_epochs"] * step + size["select_epochs"] * per_val
        fin_s = task.steps_per_epoch() * size["epochs"] * step + size["epochs"] * per_val + per_test
        n_sel = sum(s.task == name and s.phase == "select" for s in now)
        # finals: all but those saved (their rates may not be chosen yet)
        n_fin = len(plan.optimizers) * len(plan.seeds) - sum(s.task == name and s.phase == "final"
                                                             for s in plan.records)
        secs = n_sel * sel_s + n_fin * fin_s
        total += secs
        rows.append([name, n_sel, n_fin, " / ".join(f"{times[o]:.3f}" for o in ("adam", PRIMARY, "powersign")),
                     f"{sel_s:.0f}", f"{fin_s:.0f}", f"{secs / 3600:.2f}", format_seconds(secs / jobs)])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return [f"transfer plan ({plan.mode} sizes): {len(plan.tasks)} tasks x {len(plan.optimizers)} optimizers; "
            f"{len(plan.factors)} rates each (selection, seed {SELECT_SEED}) + {len(plan.seeds)} seeds at the "
            f"chosen rate",
            f"machine: {machine(plan.device)}; load average {load:.2f} during the probe "
            "(a busy machine inflates every estimate)",
            markdown_table(headers, rows),
            f"total: {total / 3600:.2f} core-hours of {max(1, (os.cpu_count() or 1) // jobs)}-thread workers; "
            f"about {format_seconds(total / jobs)} of wall time with --jobs {jobs} (+ a few s per run to start)"]


# ------------------------------------------------------------------------------ main
def _names(given: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    if not given:
        return list(known)
    items = [x for g in given for x in g.split(",") if x]
    bad = [x for x in items if x not in known]
    if bad:
        raise TransferError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(items))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the GPU sizes (default: the CPU sizes)")
    size.add_argument("--smoke", action="store_true", help="every task and optimizer for a few steps (< 1 min)")
    ap.add_argument("--tasks", nargs="+", help=f"of {', '.join(TASKS)} (default: all)")
    ap.add_argument("--optimizers", nargs="+", help=f"of {', '.join(OPTIMIZERS)} (default: all)")
    ap.add_argument("--seeds", nargs="+", help="final seeds, e.g. 1-5 or 1 2 3 (default 1-5; smoke 1-2)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="runs at a time, each in a worker process with cores/jobs threads (default: one per core "
                         "on a CPU, 1 on a GPU or with --smoke)")
    ap.add_argument("--out", type=Path, default=OUT_ROOT / "transfer",
                    help="root of the runs and the outputs (default benchmarks/out/transfer)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    ap.add_argument("--plan", action="store_true", help="print the runs to do and their estimated time, run nothing")
    ap.add_argument("--report-only", action="store_true", help="tabulate and plot the saved runs, run nothing")
    ap.add_argument("--speed", action="store_true",
                    help="time the optimizers' training steps side by side, interleaved (default task: resnet20); "
                         "writes OUT/MODE/speed.txt; run it on a quiet machine")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        return _main(args)
    except TransferError as e:
        raise SystemExit(f"transfer.py: error: {e}") from None
    except (CIFAR10NotFoundError, CIFAR10CorruptError) as e:  # one line: what is missing and where we looked
        raise SystemExit("transfer.py: error: " + " ".join(str(e).split())) from None


def _main(args: argparse.Namespace) -> dict[str, Any]:
    mode = "full" if args.full else "smoke" if args.smoke else "cpu"
    tasks = ["resnet20"] if args.speed and not args.tasks else _names(args.tasks, list(TASKS), "task")
    optimizers = _names(args.optimizers, list(OPTIMIZERS), "optimizer")
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else list(MODE_SEEDS[mode])
    except ValueError:
        raise TransferError(f"--seeds {' '.join(args.seeds)}: give seeds as 1-5 or 1 2 3") from None
    if SELECT_SEED in seeds:
        raise TransferError(f"seed {SELECT_SEED} chooses the rates; the final seeds must be others")
    device = pick_device(args.device)
    jobs = args.jobs or (1 if device.type == "cuda" or mode == "smoke" else (os.cpu_count() or 1))
    if jobs < 1:
        raise TransferError("--jobs must be >= 1")
    plan = Plan(tasks, optimizers, seeds, mode, args.out, device)
    if args.speed:  # reads no saved runs
        lines = speed_lines(plan, rounds=2 if mode == "smoke" else 5, steps=2 if mode == "smoke" else 10)
        write_report(prepare_out(Path(args.out) / mode) / "speed.txt", lines)
        print("\n".join(lines))
        return {"speed": lines}
    plan.load()
    if args.plan:
        lines = plan_lines(plan, jobs)
        print("\n".join(lines))
        return {"plan": lines}
    clock = Stopwatch()
    if not args.report_only:
        plan.run(jobs, progress=not args.no_progress)
    use_agg()
    lines, out = report(plan)
    folder = prepare_out(Path(args.out) / mode)
    head = [f"# Transfer ({mode} sizes): {', '.join(tasks)}", "",
            f"machine: {machine(device)}; {jobs} job(s); wall time of this invocation {clock}", ""]
    (folder / "table.md").write_text("\n".join(head + lines) + "\n")
    write_report(folder / "report.txt", head + lines)
    (folder / "summary.json").write_text(json.dumps(out["summary"], indent=1, default=str))
    fig = curves_figure(plan, out["results"])
    path = save_figure(fig, folder / "curves.png")
    print("\n".join(head + lines + ["", f"table: {folder / 'table.md'}; curves: {path}"]))
    return {"lines": lines, "plan": plan, "figure": fig, "paths": {"table": folder / "table.md", "curves": path},
            **out}


if __name__ == "__main__":
    main(sys.argv[1:])
