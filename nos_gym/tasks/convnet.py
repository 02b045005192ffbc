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
scores 0 at that rate; a rule that diverges at every rate scores 0. A rule the
Evaluator's probe screens out as degenerate is not trained: it scores the untrained
child's validation accuracy, batch norm's statistics settled as training leaves them for
unchanged weights (``ConvNetTask.screen_score``): what doing nothing earns.

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
minibatches, so a reward depends on the rule alone. A stochastic rule (drop, noise)
draws from its own stream (``nos_gym.random_streams``; the same numbers in any group, on
any backend), and its reward is the mean of ``draws`` runs of the whole protocol, run j
with stream seed ``stream_seed(Protocol.seed, canonical key, j)`` (default ``DRAWS``: see
the README for the measurement behind it).

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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nos_gym.data import CIFAR10, Split, dataset_id, load_cifar10, normalize
from nos_gym.dsl import Program
from nos_gym.optim import NOSOptimizer
from nos_gym.random_streams import stream_seed
from nos_gym.rules import Hyper
from nos_gym.tasks import child_native
from nos_gym.tasks.base import Result, Task, check_draws, evaluate_draws
from nos_gym.tasks.child import CLASSES, IMAGE, ChildNet, batch_order, init_child, layout
from nos_gym.tasks.grouped import train_children

# the child network's names, importable from here as before (they live in child.py)
__all__ = ["CLASSES", "IMAGE", "PAPER_LRS", "PRESETS", "ChildNet", "ChildResult", "ConvNetTask", "Protocol",
           "batch_order", "init_child", "layout", "train_child"]


# ------------------------------------------------------------------------- protocol
PAPER_LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: runs of the protocol a stochastic rule's reward averages (chosen by measurement: see README)
DRAWS = 1


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

    Multi-fidelity (``nos_gym.tasks.fidelity``; all off by default, and then absent from
    ``to_dict()``, so the fixed protocols keep their fingerprints):

        schedule: "fixed" (every rate for the whole sweep, the paper's) or "halving":
            successive halving over the rates -- all rates briefly, the best ``1/eta`` of a
            rule's rates trained on, ..., the last rung ending at the full sweep.
        eta: the fraction kept at each rung (``ceil(n / eta)`` of ``n`` rates) and the ratio
            of successive rung lengths.
        rungs: sweep rungs of "halving"; None: as many as keep at least 2 rates in the last.
        hurdle: the sweep accuracy a rule needs to get the final training; a rule below it
            scores its sweep accuracy (``metrics["fidelity"] == "sweep"``). A fixed number,
            so a score depends on the task and the rule only. None: no fixed hurdle.
        hurdle_quantile: a rolling hurdle instead (AutoML-Zero's): this quantile of the sweep
            accuracies of the rules this task object scored before. Order-dependent: a
            rule's score then depends on what was scored before it (see ``fidelity``).
        hurdle_warmup: rules the rolling hurdle lets through before it applies.
        final_hurdle: successive halving of the final training, per rule, with a fixed
            threshold: the final training stops at a checkpoint (``final_rung``) and
            validates; a rule whose validation accuracy there is below ``final_hurdle`` (or
            that diverged) stops and scores that accuracy (``metrics["fidelity"] ==
            "final-rung"``, ``child_images`` counting only what it trained). A rule at or
            above it trains on from the checkpoint on the same trajectory (weights, batch
            norm, rule state, minibatches), so it scores exactly what it scores without
            ``final_hurdle`` (with one rule per group, the CPU default; in a larger group the
            survivors go on as a smaller one, which changes scores only by float rounding).
            A fixed number, so a score depends on the task and the rule only. None
            (default): no checkpoint.
        final_rung: images of the final training at the checkpoint (counted over all its
            epochs, a whole number of minibatches, fewer than the final training's); None:
            the final training's images divided by ``eta``, rounded down to whole minibatches.
            Only with ``final_hurdle``.
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
    schedule: str = "fixed"
    eta: int = 3
    rungs: int | None = None
    hurdle: float | None = None
    hurdle_quantile: float | None = None
    hurdle_warmup: int = 20
    final_hurdle: float | None = None
    final_rung: int | None = None

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
        from nos_gym.tasks.fidelity import check_fidelity

        check_fidelity(self)  # the multi-fidelity fields; raises ValueError

    @property
    def child_images(self) -> int:
        """Images one candidate's children are trained on (whole minibatches): 295,000 for "paper"."""
        def run(n: int, epochs: int) -> int:
            return (n // self.batch_size) * self.batch_size * epochs
        return len(self.lrs) * run(self.sweep_examples, self.sweep_epochs) + run(self.train_examples, self.train_epochs)

    @property
    def final_images(self) -> int:
        """Images of the final training at the best rate (whole minibatches): 225,000 for "paper"."""
        return (self.train_examples // self.batch_size) * self.batch_size * self.train_epochs

    @property
    def final_rung_images(self) -> int | None:
        """Images of the final training at its checkpoint (``final_rung`` or its default); None without
        ``final_hurdle``."""
        if self.final_hurdle is None:
            return None
        if self.final_rung is not None:
            return self.final_rung
        return max(1, self.final_images // self.eta // self.batch_size) * self.batch_size

    @property
    def multi_fidelity(self) -> bool:
        """Whether a multi-fidelity field is set (halving, a hurdle): scored by ``nos_gym.tasks.fidelity``."""
        return any(getattr(self, k) != v for k, v in {**_FIDELITY_DEFAULTS, **_FINAL_HURDLE_DEFAULTS}.items())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lrs"] = list(self.lrs)
        if not any(getattr(self, k) != v for k, v in _FIDELITY_DEFAULTS.items()):
            for k in _FIDELITY_DEFAULTS:  # the fixed protocols' dicts (and fingerprints) as before these fields
                del d[k]
        if self.final_hurdle is None:  # every dict (and fingerprint) as before the final hurdle
            for k in _FINAL_HURDLE_DEFAULTS:
                del d[k]
        return d

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Protocol:
        """A named preset ("paper", "fast", "ci") with some fields changed."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name].to_dict(), **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Protocol:
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
    def from_yaml(cls, source: str | os.PathLike) -> Protocol:
        """From a YAML file (or YAML text) holding a mapping, e.g. ``{preset: fast, train_epochs: 3}``."""
        import yaml

        path = Path(str(source))
        is_file = path.suffix in (".yaml", ".yml") or ("\n" not in str(source) and path.is_file())
        text = path.read_text() if is_file else str(source)
        d = yaml.safe_load(text)
        if not isinstance(d, Mapping):
            raise ValueError(f"a protocol in YAML is a mapping of fields, got {type(d).__name__}")
        return cls.from_dict(d)


_FIDELITY_DEFAULTS = {f.name: f.default for f in fields(Protocol)
                      if f.name in ("schedule", "eta", "rungs", "hurdle", "hurdle_quantile", "hurdle_warmup")}
# added later: left out of every dict while off, so no earlier protocol's fingerprint changes
_FINAL_HURDLE_DEFAULTS = {f.name: f.default for f in fields(Protocol) if f.name in ("final_hurdle", "final_rung")}

PRESETS: dict[str, Protocol] = {
    # section 4.2 exactly: 295,000 child-images per candidate
    "paper": Protocol(),
    # one GPU in minutes: 5 rates on 5,000 examples, 2 epochs on 20,000 (65,000 child-images)
    "fast": Protocol(lrs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), sweep_examples=5_000, train_examples=20_000,
                     train_epochs=2),
    # two CPU cores: fast's 5 rates on 1,000 examples, ONE epoch of 16,000 at the best, 2,000 for
    # validation, batch 50: 21,000 child-images (a third of "fast"), ~6 s a rule on one core (~600 rules an
    # hour). Chosen by measurement (benchmarks/fidelity_quality.py --part preset: 30 deterministic rules,
    # the 13 of Table 1 and 17 one-token mutants, against "fast"): Kendall tau-b 0.84, top-10 9/10, top-5
    # 2/5 (the best candidate; 26,000-34,000-image variants with 2 epochs on 8,000-12,000 or 1 on 20,000:
    # tau 0.72-0.78, top-10 6-8/10; 15,000 images: 0.71, 8/10). One pass over more distinct images ranks
    # like fast better than more epochs over fewer, which favour Adam-like rules over the sign rules. Seed
    # noise bounds what any of them can show: the same protocol with seed 1 agrees with its seed-0 self at
    # tau 0.71 (top-10 6/10) and with fast at 0.66, as the good rules lie within 0.02 of each other. So
    # "cpu" separates working rules from the rest reliably and orders near-equals by chance; promote its
    # leaders to "fast" (nos-gym promote RUN --preset fast). Multi-fidelity form for searches:
    # {preset: cpu, schedule: halving, hurdle: 0.277}, about a third of the child-images (nos_gym.tasks.fidelity).
    "cpu": Protocol(lrs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), sweep_examples=1_000, train_examples=16_000, train_epochs=1,
                    val_examples=2_000, batch_size=50),
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
                init: Tensor | None = None, draw: int = 0) -> tuple[ChildResult, ChildNet]:
    """Train one ``ChildNet`` with ``program`` at ``lr`` on all of ``train``; the reference path.

    A plain PyTorch loop with ``NOSOptimizer``: the same initial weights (``init_child(seed)``)
    and minibatches as the grouped trainer, stopped at the first non-finite loss. ``drop``
    and ``noise`` draw the rule's draw ``draw`` under ``seed`` (what ``train_children`` draws
    with ``stream_seeds=[stream_seed(seed, program.canonical_key, draw)]``).
    """
    device = train.images.device
    net = ChildNet(filters).to(device).load_flat((init if init is not None else init_child(seed, filters)).to(device))
    opt = NOSOptimizer(net.parameters(), rule=program, lr=lr, hyper=hyper, seed=seed, draw=draw)
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
        preset: "paper" (section 4.2 exactly), "fast" (one GPU, minutes), "cpu" (two CPU cores,
            seconds a rule) or "ci" (tests); or a ``Protocol``, a dict of its fields, or a YAML file of them.
        data_dir: where CIFAR-10 is (see ``nos_gym.data.load_cifar10``); None searches.
        device: "cpu", "cuda", ...; None picks CUDA when there is one.
        precision: "fp32", "bf16" (autocast: the network's convolutions and matmuls in bfloat16; the
            weights, the batch-norm statistics, the rule's update and its running averages stay
            fp32), or "auto": bf16 on CUDA, fp32 elsewhere. Part of the fingerprint, since it changes
            the scores slightly. On a CPU, bf16 pays only where the cores have bf16 units
            (AVX512-BF16 or AMX); elsewhere it is emulated, slower than fp32, and warns once
            (``child_native.warn_if_no_bf16_units``).
        rules_per_group: rules trained together as one grouped network (a sweep group
            holds ``len(lrs)`` times as many children). None: 128 on CUDA; 1 on CPU, where
            a group of B*7 children outgrows the caches and is no faster per child (see
            benchmarks/child_throughput.py). Grouping changes scores only by float
            rounding, so it is not fingerprinted.
        download: let ``load_cifar10`` fetch the data with torchvision if it is missing.
        draws: runs of the protocol a stochastic rule's reward is the mean of (run j with
            stream seed ``stream_seed(protocol.seed, key, j)``); part of the fingerprint.
        **overrides: protocol fields to change, e.g. ``train_epochs=2``.
    """

    name = "convnet-cifar10"
    #: 2: batch norm + max-pool + ReLU by the native CPU kernel (``child_native``), which rounds
    #: differently from torch's operators; the fingerprint also names the block's kernel
    version = 2
    #: tells the Evaluator's "auto" backend that this task is worth worker processes
    parallel = True

    def __init__(self, preset: str | Protocol | Mapping[str, Any] | os.PathLike = "paper", data_dir: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, precision: str = "auto",
                 rules_per_group: int | None = None, download: bool = False, draws: int = DRAWS,
                 **overrides: Any):
        self.protocol = _resolve_protocol(preset, overrides)
        self.draws = check_draws(draws)
        if self.draws > 1 and self.protocol.multi_fidelity:
            raise ValueError("draws > 1 is not supported with a multi-fidelity protocol yet "
                             "(halving, hurdle, final_hurdle)")
        self.preset = preset if isinstance(preset, str) else None
        self.data_dir = None if data_dir is None else str(data_dir)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        if self.precision == "bf16" and self.device.type == "cpu":
            child_native.warn_if_no_bf16_units()
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
                self.data  # noqa: B018  (a property: fetch the data first, then identify the copy we got)
            self._dataset_id = dataset_id(self.data_dir)
        return {"protocol": self.protocol.to_dict(), "precision": self.precision, "data": self._dataset_id,
                "draws": self.draws, "block": self.block_kernel}

    @property
    def block_kernel(self) -> str:
        """What runs the child's batch norm + pool + ReLU: "native" (the CPU kernel of
        ``nos_gym.tasks.child_native``) or "torch" (its operators: CUDA, or no C++ compiler).
        They round differently, so it is part of the fingerprint."""
        return "native" if self.device.type == "cpu" and child_native.available() else "torch"

    def screen_score(self) -> float:
        """The score of a rule the Evaluator's probe screens out (NaN/inf, zero, ignoring the
        gradient, never descending): the untrained child's accuracy on the validation images
        the reward uses, what the protocol gives a rule that never moves the weights.

        The ``init_child(seed)`` weights, with batch norm's running statistics as the final
        training run leaves them for unchanged weights: its last 100 minibatches (in the
        protocol's order) go forward in training mode (earlier ones weigh less than 0.9^100),
        then one pass over the validation images (fp32). With batch norm's initial statistics
        instead the accuracy is higher than such a rule's ("ci": 0.128 against the 0.096 that
        ``g * log|1|``, a zero update, scores trained), so screened rules would outscore weak
        real ones. Computed once per task object (one to a few seconds on a CPU).
        """
        cached = self.__dict__.get("_untrained_accuracy")
        if cached is None:
            p, data = self.protocol, self.data
            train = data.train.take(p.train_examples)
            net = ChildNet(p.filters).to(self.device).load_flat(init_child(p.seed, p.filters).to(self.device))
            with torch.no_grad():
                net.train()
                for idx in batch_order(len(train), p.batch_size, p.train_epochs, p.seed)[-100:]:
                    net(normalize(train.images[idx.to(self.device)]))
            acc, finite = _accuracy(net.eval(), data.val.take(p.val_examples), p.batch_size)
            cached = self.__dict__["_untrained_accuracy"] = acc if finite else 0.0
        return cached

    def evaluate(self, programs: Sequence[Program]) -> list[Result]:
        """One Result per program: reward = validation accuracy after the section-4.2 protocol."""
        for p in programs:
            if not isinstance(p, Program):
                raise TypeError(f"ConvNetTask.evaluate takes Programs (nos_gym.dsl.parse makes them), got {type(p).__name__}")
        return evaluate_draws(programs, self.draws, self._evaluate_draws)

    def _evaluate_draws(self, programs: list[Program], draws: list[int]) -> list[Result]:
        """One Result per (program, draw index), ``rules_per_group`` of them per group."""
        out: list[Result] = []
        for start in range(0, len(programs), self.rules_per_group):
            stop = start + self.rules_per_group
            out += self._evaluate_group(programs[start:stop], draws[start:stop])
        return out

    def stream_seeds(self, programs: Sequence[Program], draws: Sequence[int] | None = None) -> list[int]:
        """The stream seed of each program's draw (0 for a deterministic program, which draws nothing)."""
        draws = [0] * len(programs) if draws is None else draws
        return [stream_seed(self.protocol.seed, q.canonical_key, j) if q.stochastic else 0
                for q, j in zip(programs, draws)]

    def _evaluate_group(self, programs: list[Program], draws: Sequence[int] | None = None) -> list[Result]:
        if self.protocol.multi_fidelity:  # successive halving and/or a hurdle: nos_gym.tasks.fidelity
            from nos_gym.tasks.fidelity import evaluate_group

            return evaluate_group(self, programs)  # draw 0 of each rule (draws > 1 refused in __init__)
        t0 = time.perf_counter()
        p, data = self.protocol, self.data
        val = data.val.take(p.val_examples)
        common = dict(batch_size=p.batch_size, seed=p.seed, filters=p.filters, precision=self.precision)
        n_rates = len(p.lrs)
        seeds = self.stream_seeds(programs, draws)
        sweep = train_children([q for q in programs for _ in p.lrs], list(p.lrs) * len(programs),
                               data.train.take(p.sweep_examples), val, epochs=p.sweep_epochs,
                               stream_seeds=[s for s in seeds for _ in p.lrs], **common)
        acc = sweep.accuracy.view(len(programs), n_rates)
        dead = sweep.diverged.view(len(programs), n_rates)
        best = acc.masked_fill(dead, -1.0).argmax(1)  # argmax takes the first of ties: the smaller rate
        alive = [i for i in range(len(programs)) if not bool(dead[i].all())]
        final = None
        if alive:
            final = train_children([programs[i] for i in alive], [p.lrs[int(best[i])] for i in alive],
                                   data.train.take(p.train_examples), val, epochs=p.train_epochs,
                                   stream_seeds=[seeds[i] for i in alive], **common)
        seconds = (time.perf_counter() - t0) / len(programs)
        results = []
        for i in range(len(programs)):
            sweep_acc = {f"{lr:g}": (None if dead[i, k] else round(float(acc[i, k]), 6)) for k, lr in enumerate(p.lrs)}
            # child_images: what was trained (no final training for a rule that diverged at every rate)
            spent = p.child_images - (0 if i in alive else p.final_images)
            metrics: dict[str, Any] = {"sweep": sweep_acc, "seconds": seconds, "child_images": spent,
                                       "fidelity": "full"}
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
