"""The paper's child task: a small ConvNet on CIFAR-10, scored by held-out accuracy.

Section 4.2: "a small two layer 3x3 ConvNet [with] 32 filters with ReLU activations and
batch normalization applied after each convolutional layer", trained on CIFAR-10. A rule
is scored by (section 4.2, "Experimental details"):

1. a learning-rate sweep, 10^i for i = -5..1, each rate for 1 epoch on 10,000 training
   examples, from the same initial weights;
2. the best rate by validation accuracy (ties go to the smaller rate);
3. 5 epochs on the 45,000-image training split at that rate, again from the initial
   weights, batch size 100;
4. the reward: accuracy on the 5,000 held-out validation images.

That is 7 x 10,000 + 5 x 45,000 = 295,000 child-images per candidate. A rule whose loss
or weights become NaN/inf is frozen at once, stops when all its children have, and
scores 0 at that rate; a rule that diverges at every rate scores 0.

The network (``ChildNet``)::

    conv3x3(3 -> 32, no bias) - BN - ReLU - maxpool 2x2      32x32 -> 16x16
    conv3x3(32 -> 32, no bias) - BN - ReLU - maxpool 2x2     16x16 -> 8x8
    flatten (32 * 8 * 8 = 2048) - linear(2048 -> 10)

Pooling is not in the paper; we halve the resolution after each block with 2x2 max
pooling, as the small CIFAR ConvNets of the time did. It keeps the classifier at 2048
inputs (20k weights, not 330k) and cuts the cost of the second convolution by 4. The
code pools before the ReLU: the two commute, and ReLU then touches 4x fewer values. The
convolutions have no bias since batch norm's shift follows.
Weights start from PyTorch's default uniform init, drawn from ``Protocol.seed``: every
child -- every rule, every rate -- starts from the same weights and sees the same
minibatches, so a reward depends on the rule alone (and on drop/noise draws).

``ConvNetTask.evaluate`` trains its rules as one grouped network (``nos_gym.tasks.grouped``):
the sweep of B rules is one group of 7B children, the final training one group of B.
``train_child`` here is the plain one-network-at-a-time PyTorch reference (and the naive
baseline of ``benchmarks/child_throughput.py``); the tests check the two agree in fp32.
The network, its flat weight layout and initial weights, and the minibatch order live in
``nos_gym.tasks.child`` (both trainers use them) and are importable from here too.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nos_gym.data import CIFAR10, Split, dataset_id, load_cifar10, normalize
from nos_gym.dsl import Program
from nos_gym.optim import NOSOptimizer
from nos_gym.rules import Hyper
from nos_gym.tasks.base import Result, Task
from nos_gym.tasks.child import CLASSES, IMAGE, ChildNet, batch_order, init_child, layout
from nos_gym.tasks.grouped import train_children

# the child network's names, importable from here as before (they live in child.py)
__all__ = ["CLASSES", "IMAGE", "PAPER_LRS", "PRESETS", "ChildNet", "ChildResult", "ConvNetTask", "Protocol",
           "batch_order", "init_child", "layout", "train_child"]


# ------------------------------------------------------------------------- protocol
PAPER_LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass(frozen=True)
class Protocol:
    """How a rule is scored. The defaults are the paper's (section 4.2); see ``PRESETS``.

    Attributes:
        lrs: the learning rates of the sweep.
        sweep_examples: training examples each rate is tried on.
        sweep_epochs: epochs over them per rate.
        train_examples: training examples of the final run at the best rate (45,000 = all).
        train_epochs: epochs of the final run.
        val_examples: held-out validation images for rate selection and the reward.
        batch_size: minibatch size of every run.
        filters: filters of both convolutions.
        seed: initial weights, minibatch order and drop/noise draws.
        split_seed: the seed of the 45k/5k train/validation split.
    """

    lrs: tuple[float, ...] = PAPER_LRS
    sweep_examples: int = 10_000
    sweep_epochs: int = 1
    train_examples: int = 45_000
    train_epochs: int = 5
    val_examples: int = 5_000
    batch_size: int = 100
    filters: int = 32
    seed: int = 0
    split_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", tuple(float(x) for x in self.lrs))
        if not self.lrs or any(not (math.isfinite(x) and x > 0) for x in self.lrs):
            raise ValueError(f"lrs must be a non-empty list of positive numbers, got {self.lrs}")
        for name in ("sweep_examples", "sweep_epochs", "train_examples", "train_epochs",
                     "val_examples", "batch_size", "filters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size > min(self.sweep_examples, self.train_examples):
            raise ValueError(f"batch_size {self.batch_size} is larger than the training sets "
                             f"({self.sweep_examples} sweep / {self.train_examples} final examples)")
        if self.train_examples > 45_000 or self.sweep_examples > 45_000:
            raise ValueError("the training split has 45,000 images: sweep_examples and train_examples must not exceed it")
        if self.val_examples > 5_000:
            raise ValueError("the validation split has 5,000 images: val_examples must not exceed it")

    @property
    def child_images(self) -> int:
        """Images one candidate's children are trained on (whole minibatches): 295,000 for "paper"."""
        def run(n: int, epochs: int) -> int:
            return (n // self.batch_size) * self.batch_size * epochs
        return len(self.lrs) * run(self.sweep_examples, self.sweep_epochs) + run(self.train_examples, self.train_epochs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lrs"] = list(self.lrs)
        return d

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Protocol":
        """A named preset ("paper", "fast", "ci") with some fields changed."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name].to_dict(), **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Protocol":
        """From a mapping of field values; a ``"preset"`` key names the preset the others change."""
        d = dict(d)
        base = d.pop("preset", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown protocol fields {unknown}; the fields are {sorted(known)}")
        if base is not None:
            return cls.preset(base, **d)
        return cls(**d)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> "Protocol":
        """From a YAML file (or YAML text) holding a mapping, e.g. ``{preset: fast, train_epochs: 3}``."""
        import yaml

        path = Path(str(source))
        is_file = path.suffix in (".yaml", ".yml") or ("\n" not in str(source) and path.is_file())
        text = path.read_text() if is_file else str(source)
        d = yaml.safe_load(text)
        if not isinstance(d, Mapping):
            raise ValueError(f"a protocol in YAML is a mapping of fields, got {type(d).__name__}")
        return cls.from_dict(d)


PRESETS: dict[str, Protocol] = {
    # section 4.2 exactly: 295,000 child-images per candidate
    "paper": Protocol(),
    # one GPU in minutes: 5 rates on 5,000 examples, 2 epochs on 20,000 (65,000 child-images)
    "fast": Protocol(lrs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), sweep_examples=5_000, train_examples=20_000,
                     train_epochs=2),
    # seconds on a CPU: 2 rates on 1,000 examples, 2 epochs of 1,000 at the best, 500 for validation
    "ci": Protocol(lrs=(1e-3, 1e-1), sweep_examples=1_000, train_examples=1_000, train_epochs=2,
                   val_examples=500, batch_size=50),
}


# --------------------------------------------------------------------- reference path
class ChildResult(NamedTuple):
    """What training one child gave: validation accuracy, whether it diverged, last training loss."""

    accuracy: float
    diverged: bool
    loss: float
    steps: int


def train_child(program: Program, lr: float, train: Split, val: Split, *, epochs: int, batch_size: int,
                seed: int = 0, filters: int = 32, hyper: Hyper = Hyper(),
                init: Tensor | None = None) -> tuple[ChildResult, ChildNet]:
    """Train one ``ChildNet`` with ``program`` at ``lr`` on all of ``train``; the reference path.

    A plain PyTorch loop with ``NOSOptimizer``: the same initial weights (``init_child(seed)``)
    and minibatches as the grouped trainer, stopped at the first non-finite loss.
    """
    device = train.images.device
    net = ChildNet(filters).to(device).load_flat((init if init is not None else init_child(seed, filters)).to(device))
    opt = NOSOptimizer(net.parameters(), rule=program, lr=lr, hyper=hyper, seed=seed)
    net.train()
    loss = torch.tensor(float("nan"))
    steps, diverged = 0, False
    for idx in batch_order(len(train), batch_size, epochs, seed):
        idx = idx.to(device)
        x, y = normalize(train.images[idx]), train.labels[idx]
        loss = F.cross_entropy(net(x), y)
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    acc = 0.0
    if not diverged:
        acc, finite = _accuracy(net, val, batch_size)
        diverged = not finite
    return ChildResult(0.0 if diverged else acc, diverged, float(loss.detach()), steps), net


@torch.no_grad()
def _accuracy(net: ChildNet, val: Split, batch_size: int) -> tuple[float, bool]:
    net.eval()
    correct, finite = 0, True
    for start in range(0, len(val), batch_size):
        logits = net(normalize(val.images[start:start + batch_size]))
        finite &= bool(torch.isfinite(logits).all())
        correct += int((logits.argmax(1) == val.labels[start:start + batch_size]).sum())
    net.train()
    return correct / len(val), finite


# ----------------------------------------------------------------------------- task
def _resolve_protocol(preset: str | Protocol | Mapping[str, Any] | os.PathLike, overrides: Mapping[str, Any]) -> Protocol:
    if isinstance(preset, Protocol):
        base = preset
    elif isinstance(preset, Mapping):
        base = Protocol.from_dict(preset)
    elif isinstance(preset, (str, os.PathLike)) and Path(str(preset)).suffix in (".yaml", ".yml"):
        base = Protocol.from_yaml(preset)
    elif isinstance(preset, str):
        base = Protocol.preset(preset)
    else:
        raise TypeError(f"preset must be a preset name, a Protocol, a dict or a YAML path; got {type(preset).__name__}")
    return Protocol.from_dict({**base.to_dict(), **overrides}) if overrides else base


class ConvNetTask(Task):
    """The paper's reward: CIFAR-10 validation accuracy of a small ConvNet trained with the rule.

    Args:
        preset: "paper" (section 4.2 exactly), "fast" (one GPU, minutes) or "ci" (CPU,
            seconds); or a ``Protocol``, a dict of its fields, or a YAML file of them.
        data_dir: where CIFAR-10 is (see ``nos_gym.data.load_cifar10``); None searches.
        device: "cpu", "cuda", ...; None picks CUDA when there is one.
        precision: "fp32", "bf16" (autocast; weights and rules stay fp32), or "auto": bf16 on CUDA,
            fp32 elsewhere. Part of the fingerprint, since it changes the scores slightly.
        rules_per_group: rules trained together as one grouped network (a sweep group
            holds ``len(lrs)`` times as many children). None: 128 on CUDA; 1 on CPU, where
            a group of B*7 children outgrows the caches and is no faster per child (see
            benchmarks/child_throughput.py). Grouping changes scores only by float
            rounding, so it is not fingerprinted.
        download: let ``load_cifar10`` fetch the data with torchvision if it is missing.
        **overrides: protocol fields to change, e.g. ``train_epochs=2``.
    """

    name = "convnet-cifar10"
    version = 1
    #: tells the Evaluator's "auto" backend that this task is worth worker processes
    parallel = True

    def __init__(self, preset: str | Protocol | Mapping[str, Any] | os.PathLike = "paper", data_dir: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, precision: str = "auto",
                 rules_per_group: int | None = None, download: bool = False, **overrides: Any):
        self.protocol = _resolve_protocol(preset, overrides)
        self.preset = preset if isinstance(preset, str) else None
        self.data_dir = None if data_dir is None else str(data_dir)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        if rules_per_group is not None and rules_per_group < 1:
            raise ValueError(f"rules_per_group must be >= 1, got {rules_per_group}")
        self.rules_per_group = rules_per_group or (128 if self.device.type == "cuda" else 1)
        self.download = download
        self._data: CIFAR10 | None = None
        self._dataset_id: str | None = None

    # Workers rebuild the data from disk (cached per process) instead of receiving it pickled.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = None
        return state

    @property
    def preferred_batch(self) -> int:
        """How many rules one ``evaluate`` call should get to fill a group."""
        return self.rules_per_group

    @property
    def data(self) -> CIFAR10:
        if self._data is None:
            self._data = load_cifar10(self.data_dir, download=self.download, device=self.device,
                                      seed=self.protocol.split_seed)
        return self._data

    def config(self) -> dict[str, Any]:
        if self._dataset_id is None:
            if self.download:
                self.data  # fetch it first, then identify the copy we got
            self._dataset_id = dataset_id(self.data_dir)
        return {"protocol": self.protocol.to_dict(), "precision": self.precision, "data": self._dataset_id}

    def evaluate(self, programs: Sequence[Program]) -> list[Result]:
        """One Result per program: reward = validation accuracy after the section-4.2 protocol."""
        for p in programs:
            if not isinstance(p, Program):
                raise TypeError(f"ConvNetTask.evaluate takes Programs (nos_gym.dsl.parse makes them), got {type(p).__name__}")
        out: list[Result] = []
        for start in range(0, len(programs), self.rules_per_group):
            out += self._evaluate_group(list(programs[start:start + self.rules_per_group]))
        return out

    def _evaluate_group(self, programs: list[Program]) -> list[Result]:
        t0 = time.perf_counter()
        p, data = self.protocol, self.data
        val = data.val.take(p.val_examples)
        common = dict(batch_size=p.batch_size, seed=p.seed, filters=p.filters, precision=self.precision)
        n_rates = len(p.lrs)
        sweep = train_children([q for q in programs for _ in p.lrs], list(p.lrs) * len(programs),
                               data.train.take(p.sweep_examples), val, epochs=p.sweep_epochs, **common)
        acc = sweep.accuracy.view(len(programs), n_rates)
        dead = sweep.diverged.view(len(programs), n_rates)
        best = acc.masked_fill(dead, -1.0).argmax(1)  # argmax takes the first of ties: the smaller rate
        alive = [i for i in range(len(programs)) if not bool(dead[i].all())]
        final = None
        if alive:
            final = train_children([programs[i] for i in alive], [p.lrs[int(best[i])] for i in alive],
                                   data.train.take(p.train_examples), val, epochs=p.train_epochs, **common)
        seconds = (time.perf_counter() - t0) / len(programs)
        results = []
        for i, prog in enumerate(programs):
            sweep_acc = {f"{lr:g}": (None if dead[i, k] else round(float(acc[i, k]), 6)) for k, lr in enumerate(p.lrs)}
            metrics: dict[str, Any] = {"sweep": sweep_acc, "seconds": seconds, "child_images": p.child_images}
            if i not in alive:
                results.append(Result(0.0, {**metrics, "diverged": True, "lr": None}))
                continue
            j = alive.index(i)
            diverged = bool(final.diverged[j])
            reward = 0.0 if diverged else float(final.accuracy[j])
            results.append(Result(reward, {**metrics, "diverged": diverged, "lr": p.lrs[int(best[i])],
                                           "val_accuracy": reward, "train_loss": float(final.loss[j])}))
        return results

    def __repr__(self) -> str:
        return (f"ConvNetTask(preset={self.preset!r}, device={str(self.device)!r}, precision={self.precision!r}, "
                f"rules_per_group={self.rules_per_group}, protocol={self.protocol})")
