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
draws from its own stream (``nos_gym.engine.random_streams``; the same numbers in any group, on
any backend), and its reward is the mean of ``draws`` runs of the whole protocol, run j
with stream seed ``stream_seed(Protocol.seed, canonical key, j)`` (default ``DRAWS``: the
measurement behind it is in docs/guarantees.md).

``ConvNetTask.evaluate`` trains its rules as one grouped network (``nos_gym.tasks.convnet.grouped``):
the sweep of B rules is one group of 7B children, the final training one group of B.
``train_child`` here is the plain one-network-at-a-time PyTorch reference (and the naive
baseline of ``benchmarks/child_throughput.py``); the tests check the two agree in fp32.
The network, its flat weight layout and initial weights, and the minibatch order live in
``nos_gym.tasks.convnet.network`` (both trainers use them); the protocol in ``nos_gym.tasks.convnet.protocol``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nos_gym.data import CIFAR10, Split, dataset_id, load_cifar10, normalize
from nos_gym.dsl import Program
from nos_gym.engine.random_streams import stream_seed
from nos_gym.engine.rules import Hyper
from nos_gym.optim import NOSOptimizer
from nos_gym.tasks.base import Result, Task, check_draws, evaluate_draws
from nos_gym.tasks.convnet import native as child_native
from nos_gym.tasks.convnet.fidelity import evaluate_group
from nos_gym.tasks.convnet.grouped import input_dtype, train_children
from nos_gym.tasks.convnet.network import ChildNet, batch_order, init_child
from nos_gym.tasks.convnet.protocol import DRAWS, Protocol, resolve_protocol

__all__ = ["ChildResult", "ConvNetTask", "train_child"]


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
        self.protocol = resolve_protocol(preset, overrides)
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
        state.pop("_child_data", None)
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

    @property
    def child_data(self) -> CIFAR10:
        """The examples the protocol trains and validates on, their images normalised once as the
        children read them (``Split.with_inputs``: channels-last, in the task's precision), so a
        minibatch is a gather, not a conversion. Made once per task object, i.e. per worker process
        (``max(sweep_examples, train_examples) + val_examples`` images: 0.2 GB in fp32 for "cpu",
        0.6 GB for "paper"). The test split is left as it is."""
        cached = self.__dict__.get("_child_data")
        if cached is None:
            p, data = self.protocol, self.data
            dtype = input_dtype(self.precision)
            train = data.train.take(max(p.sweep_examples, p.train_examples)).with_inputs(dtype=dtype)
            cached = self.__dict__["_child_data"] = CIFAR10(train, data.val.take(p.val_examples).with_inputs(dtype=dtype),
                                                            data.test)
        return cached

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
        ``nos_gym.tasks.convnet.native``) or "torch" (its operators: CUDA, or no C++ compiler).
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
        if self.protocol.multi_fidelity:  # successive halving and/or a hurdle: nos_gym.tasks.convnet.fidelity
            return evaluate_group(self, programs)  # draw 0 of each rule (draws > 1 refused in __init__)
        t0 = time.perf_counter()
        p, data = self.protocol, self.child_data
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
