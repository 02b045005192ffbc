"""B child networks trained at once as one grouped network, each with its own rule and rate.

A child of the paper's task is tiny (30k weights, 32 filters): trained alone it leaves a
GPU idle and a CPU core waiting on small kernels. Here B children are one network:

- conv1 is one convolution with B*32 output channels (every child reads the same images);
- conv2 is one convolution with ``groups=B``: child i's 32 channels only see child i's;
- batch norm over B*32 channels is per child already (statistics are per channel);
- the B linear heads are one ``baddbmm`` over (B, N, 2048) x (B, 2048, 10).

All weights live in one (B, P) tensor, row i holding child i in ``ChildNet`` order, so
the B update rules run as one ``BatchedRule`` call per step and the learning rates are a
(B,) vector. The loss is the sum of the children's mean losses, so each row's gradient
is exactly its own child's gradient. Every child sees the same minibatches.

On a CPU the network runs child by child instead (``GroupedConvNet._per_child``): B
one-child passes, each child's activations small enough to stay in cache, beat one
grouped convolution there; the weights, the rule's update and the loss stay one (B, P)
tensor and one call. Each batch norm + max-pool + ReLU block is one native kernel on a
CPU (``nos_gym.tasks.convnet.native``), torch's operators on CUDA.

A child whose loss or weights become non-finite is frozen (its row is zeroed and no
longer updated) without a host sync; the group stops early once every child is frozen.
Activations are channels_last by default. ``precision="bf16"`` runs the forward and
backward under bf16 autocast (the convolutions and matmuls in bfloat16), while weights,
gradients, batch-norm statistics and the rules stay in fp32: the same code on CPU and CUDA.

In fp32 the grouped network computes what B separate ``ChildNet`` s trained with
``NOSOptimizer`` compute, up to float rounding (tests/test_convnet.py checks B=4).
Rules with ``drop``/``noise`` draw from their own streams (``nos_gym.engine.random_streams``):
child i's draws depend on its stream seed (``stream_seeds[i]``) and not on the group, and
a lone ``ChildNet`` trained by ``NOSOptimizer`` with that rule, seed and draw draws the same
numbers (its parameters laid end to end are the row's layout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nos_gym.data import Split, normalize
from nos_gym.dsl import Program
from nos_gym.engine.rules import BatchedRule, Hyper, RuleState
from nos_gym.tasks.convnet.native import bn_relu_pool, native_applies
from nos_gym.tasks.convnet.network import batch_order, init_child, layout

BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # nn.BatchNorm2d's defaults, as in ChildNet


class GroupedConvNet(nn.Module):
    """``B`` ChildNets as one network; ``forward(x)`` gives logits of shape (B, N, 10)."""

    def __init__(self, children: int, init: Tensor, filters: int = 32, channels_last: bool = False,
                 native: bool | None = None):
        super().__init__()
        if children < 1:
            raise ValueError(f"a group needs at least one child, got {children}")
        self.children_count, self.filters, self.channels_last = children, filters, channels_last
        #: batch norm + pool + ReLU by the native kernel: None where it applies, False never (``child_native``)
        self.native = native
        self._slices: dict[str, tuple[slice, tuple[int, ...]]] = {}
        offset = 0
        for name, shape in layout(filters):
            n = math.prod(shape)
            self._slices[name] = (slice(offset, offset + n), shape)
            offset += n
        self._sizes = [sl.stop - sl.start for sl, _ in self._slices.values()]
        init = init.float()
        if init.dim() == 1:
            init = init.unsqueeze(0).expand(children, -1)
        if tuple(init.shape) != (children, offset):
            raise ValueError(f"init must have shape ({offset},) or ({children}, {offset}), got {tuple(init.shape)}")
        self.flat = nn.Parameter(init.clone().contiguous())
        c = children * filters
        for k in (1, 2):
            self.register_buffer(f"running_mean{k}", torch.zeros(c, device=init.device))
            self.register_buffer(f"running_var{k}", torch.ones(c, device=init.device))

    def select(self, rows: Sequence[int] | Tensor) -> GroupedConvNet:
        """The children ``rows`` only (in that order) as a new group: their weights and
        batch-norm statistics, in this group's mode (e.g. to drop diverged children, with
        ``BatchedRule.select`` for their rules)."""
        device = self.flat.device
        index = torch.as_tensor(rows, dtype=torch.long, device=device)
        small = GroupedConvNet(len(index), self.flat.detach()[index], self.filters, self.channels_last,
                               self.native).to(device)
        small.train(self.training)
        with torch.no_grad():
            for name, buf in small.named_buffers():
                buf.copy_(getattr(self, name).view(-1, self.filters)[index].reshape(-1))
        return small

    def params(self) -> dict[str, Tensor]:
        """Every weight of every child, shaped (B, *shape), from one split of the flat rows: its
        backward writes each gradient once, where a slice per weight zero-fills the whole rows."""
        parts = torch.split(self.flat, self._sizes, dim=1)
        return {name: part.reshape(self.children_count, *shape)
                for (name, (_, shape)), part in zip(self._slices.items(), parts)}

    def _conv(self, x: Tensor, w: Tensor, groups: int) -> Tensor:
        w = w.reshape(-1, *w.shape[2:])  # (B*filters, in, 3, 3)
        if self.channels_last:
            w = w.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, w, padding=1, groups=groups)

    def _block(self, x: Tensor, k: int, w: dict[str, Tensor]) -> Tensor:
        """relu(max_pool2d(batch_norm(x))) of block ``k`` (one native kernel on CPU: ``child_native``)."""
        return bn_relu_pool(x, w[f"bn{k}.weight"].reshape(-1), w[f"bn{k}.bias"].reshape(-1),
                            getattr(self, f"running_mean{k}"), getattr(self, f"running_var{k}"),
                            training=self.training, momentum=BN_MOMENTUM, eps=BN_EPS, native=self.native)

    def forward(self, x: Tensor) -> Tensor:
        b = self.children_count
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = self.params()
        if self.channels_last and (self.native if self.native is not None else native_applies(x)):
            feats = self._per_child(x, w)
        else:
            h = self._block(self._conv(x, w["conv1.weight"], 1), 1, w)
            h = self._block(self._conv(h, w["conv2.weight"], b), 2, w)
            feats = h.reshape(h.shape[0], b, -1).transpose(0, 1)  # (B, N, filters*8*8), ChildNet's flatten order
        fc, bias = w["fc.weight"], w["fc.bias"]  # (B, 10, in), (B, 10)
        return torch.baddbmm(bias.unsqueeze(1).to(feats.dtype), feats, fc.transpose(1, 2).to(feats.dtype))

    def _per_child(self, x: Tensor, w: dict[str, Tensor]) -> Tensor:
        """The convolutions and blocks child by child (the CPU's way: B one-child passes keep each
        child's activations in cache, and beat one grouped convolution). Returns the flattened
        features (B, N, filters*8*8)."""
        f, cl = self.filters, torch.channels_last
        # unbind, not indexing: its backward stacks the B gradients once, where B selects would each
        # zero-fill a gradient of the whole tensor
        params = [w[name].unbind(0) for name in ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight",
                                                 "bn2.weight", "bn2.bias")]
        stats = [getattr(self, name).view(-1, f) for name in ("running_mean1", "running_var1", "running_mean2",
                                                              "running_var2")]
        kw = dict(training=self.training, momentum=BN_MOMENTUM, eps=BN_EPS, native=True)
        feats = []
        for (w1, g1, b1, w2, g2, b2), (m1, v1, m2, v2) in zip(zip(*params), zip(*stats), strict=True):
            h = bn_relu_pool(F.conv2d(x, w1.contiguous(memory_format=cl), padding=1), g1, b1, m1, v1, **kw)
            h = bn_relu_pool(F.conv2d(h, w2.contiguous(memory_format=cl), padding=1), g2, b2, m2, v2, **kw)
            feats.append(h.flatten(1))  # ChildNet's flatten order (channel, row, column)
        return torch.stack(feats)


class GroupResult(NamedTuple):
    """Per child (CPU tensors of shape (B,)): validation accuracy, diverged, last training loss.

    ``rule``, ``state`` and ``alive`` (B, 1) are where training stopped: with ``net`` they let
    ``train_children(..., resume=result.select(rows))`` continue some of the children
    (successive halving, ``nos_gym.tasks.convnet.fidelity``).
    """

    accuracy: Tensor
    diverged: Tensor
    loss: Tensor
    steps: int
    child_images: int
    net: GroupedConvNet
    rule: BatchedRule | None = None
    state: RuleState | None = None
    alive: Tensor | None = None

    def select(self, rows: Sequence[int]) -> GroupResult:
        """Children ``rows`` only (in that order), ready to be trained further with ``resume=``."""
        rows = [int(i) for i in rows]
        if self.rule is None or self.state is None or self.alive is None:
            raise ValueError("this GroupResult holds no rule state to continue from")
        rule, state = self.rule.select(rows, self.state)
        index = torch.tensor(rows, dtype=torch.long)
        return GroupResult(self.accuracy[index], self.diverged[index], self.loss[index], self.steps,
                           self.child_images, self.net.select(rows), rule, state,
                           self.alive[index.to(self.alive.device)].clone())


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return nullcontext()


def input_dtype(precision: str) -> torch.dtype:
    """The dtype of the network's input under ``precision``: bfloat16 for "bf16", else float32
    (``_autocast`` rejects an unknown precision)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def input_batch(split: Split, idx: Tensor | slice, channels_last: bool, precision: str = "fp32") -> Tensor:
    """The network's input for examples ``idx`` (an index tensor or a slice) of ``split``: a gather from
    ``split.inputs`` where it holds them in this layout and dtype (``Split.with_inputs``), else
    ``_batch`` of the uint8 images. Both give the same numbers."""
    x = split.inputs
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if x is None or x.dtype != input_dtype(precision) or not x.is_contiguous(memory_format=fmt):
        return _batch(split.images[idx], channels_last, precision)
    if isinstance(idx, slice):
        return x[idx]
    if channels_last:  # gather rows of the (N, H, W, C) storage: indexing the NCHW view is several times slower
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return x.index_select(0, idx)


def _batch(images: Tensor, channels_last: bool, precision: str = "fp32") -> Tensor:
    """A uint8 minibatch as the network's normalised float input; channels-last before the conversion
    (a copy of the bytes, not of the floats), which the elementwise normalisation keeps. In bf16 the
    input is cast here, once, as autocast would round it: otherwise autocast casts it again for every
    child's first convolution."""
    x = normalize(images.contiguous(memory_format=torch.channels_last) if channels_last else images)
    return x.to(input_dtype(precision))


def per_child_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each child: logits (B, N, 10), labels (N,) -> (B,), in fp32."""
    b, n, c = logits.shape
    losses = F.cross_entropy(logits.float().reshape(b * n, c), labels.repeat(b), reduction="none")
    return losses.view(b, n).mean(1)


def train_step(net: GroupedConvNet, rule: BatchedRule, state: RuleState, lr: Tensor, alive: Tensor,
               x: Tensor, y: Tensor, precision: str = "fp32") -> tuple[RuleState, Tensor]:
    """One step of every child on the minibatch ``(x, y)``: forward, per-child loss, backward,
    ``w <- w - lr * rule(...)``. ``alive`` (B, 1) is updated in place: a child whose loss or
    weights turn non-finite is frozen at all-zero weights (finite, so it cannot disturb the
    others) and skipped from then on. Returns the new rule state and the per-child losses."""
    with _autocast(x.device, precision):
        logits = net(x)
    losses = per_child_loss(logits, y)
    alive &= torch.isfinite(losses).view(-1, 1)
    flat = net.flat
    flat.grad = None
    torch.where(alive.view(-1), losses, 0.0).sum().backward()
    with torch.no_grad():
        d, state = rule.update(state, flat.grad, flat)
        new = flat - torch.where(alive, lr * d, 0.0)
        alive &= torch.isfinite(new).all(1, keepdim=True)
        flat.copy_(torch.where(alive, new, 0.0))
    return state, losses.detach()


def train_children(programs: Sequence[Program], lrs: Sequence[float] | Tensor, train: Split, val: Split, *,
                   epochs: int, batch_size: int, seed: int = 0, filters: int = 32, precision: str = "fp32",
                   hyper: Hyper = Hyper(), init: Tensor | None = None, channels_last: bool = True,
                   check_every: int = 20, steps: tuple[int, int] | None = None,
                   resume: GroupResult | None = None, stream_seeds: Sequence[int] | None = None) -> GroupResult:
    """Train child i with ``programs[i]`` at ``lrs[i]`` on all of ``train``; all children at once.

    Every child starts from ``init`` (default ``init_child(seed)``) and sees the same
    minibatches (``batch_order(len(train), batch_size, epochs, seed)``); the result holds
    each child's accuracy on ``val`` (0 for a diverged child). Child i's ``drop``/``noise``
    draw from stream seed ``stream_seeds[i]`` (default: ``stream_seed(seed, key, 0)``, draw
    0 of its rule, as ``train_child`` with the same seed).

    ``steps=(start, stop)`` trains minibatches ``start`` to ``stop - 1`` of that order only;
    ``resume`` (an earlier result, or ``result.select(rows)`` of one, for these ``programs``)
    continues its children -- weights, batch-norm statistics, rule state, frozen children --
    instead of starting from ``init``. Training steps ``(0, a)`` and then, resumed,
    ``(a, b)`` computes what ``(0, b)`` does (successive halving, ``nos_gym.tasks.convnet.fidelity``).
    """
    b = len(programs)
    if b == 0:
        raise ValueError("train_children needs at least one program")
    if len(lrs) != b:
        raise ValueError(f"{b} programs but {len(lrs)} learning rates")
    device = train.images.device
    lr = torch.as_tensor(lrs, dtype=torch.float32, device=device).view(b, 1)
    if resume is None:
        init = (init if init is not None else init_child(seed, filters)).to(device)
        net = GroupedConvNet(b, init, filters, channels_last).to(device).train()
        # fused=False: the fused path rounds exp/log differently (1 ulp), and scores are stored by task fingerprint
        rule = BatchedRule(programs, hyper=hyper, device=device, seed=int(seed), seeds=stream_seeds, fused=False)
        state = rule.init(net.flat.detach())
        alive = torch.ones(b, 1, dtype=torch.bool, device=device)
    else:  # continue where an earlier call stopped (successive halving)
        if resume.rule is None or len(resume.rule) != b or list(resume.rule.programs) != list(programs):
            raise ValueError("resume must be a GroupResult (or .select of one) of these programs, in this order")
        net, rule, state = resume.net.train(), resume.rule, resume.state
        alive = resume.alive.to(device).view(b, 1).clone()
    last_loss = torch.full((b,), float("nan"), device=device)
    # all minibatch indices in one copy: a host-to-GPU copy per step would stall the GPU's queue
    order = torch.stack(batch_order(len(train), batch_size, epochs, seed))
    if steps is not None:
        order = order[steps[0]:steps[1]]
    order = order.to(device)
    steps = 0
    for idx in order:
        # rules blow up early: look after steps 1, 2, 4, 8, ... and then every check_every steps
        # (each look is a host sync, which a GPU pays for)
        if steps and (steps & (steps - 1) == 0 or steps % check_every == 0) and not bool(alive.any()):
            break  # every child has diverged: stop early
        state, last_loss = train_step(net, rule, state, lr, alive, input_batch(train, idx, channels_last, precision),
                                      train.labels[idx], precision)
        steps += 1
    if bool(alive.any()):
        acc, finite = evaluate_children(net, val, batch_size, precision)
    else:  # nothing to validate
        acc, finite = torch.zeros(b, device=device), torch.zeros(b, dtype=torch.bool, device=device)
    diverged = ~(alive.view(b) & finite)
    acc = torch.where(diverged, 0.0, acc)
    return GroupResult(acc.cpu(), diverged.cpu(), last_loss.cpu(), steps, steps * batch_size * b, net, rule, state,
                       alive)


@torch.no_grad()
def evaluate_children(net: GroupedConvNet, val: Split, batch_size: int, precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """Each child's accuracy on ``val`` (batch-norm running statistics) and whether its logits were finite."""
    was_training = net.training
    net.eval()
    device = val.images.device
    b = net.children_count
    correct = torch.zeros(b, device=device)
    finite = torch.ones(b, dtype=torch.bool, device=device)
    for start in range(0, len(val), batch_size):
        x, y = input_batch(val, slice(start, start + batch_size), net.channels_last, precision), val.labels[start:start + batch_size]
        with _autocast(device, precision):
            logits = net(x).float()
        finite &= torch.isfinite(logits).flatten(1).all(1)
        correct += (logits.argmax(2) == y.unsqueeze(0)).sum(1)
    net.train(was_training)
    return correct / len(val), finite
