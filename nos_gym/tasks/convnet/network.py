"""The paper's child network, shared by the reference trainer (``convnet.py``) and the
grouped one (``grouped.py``): its layers (``ChildNet``), its weights as one flat vector
(``layout``), their seeded initial values (``init_child``) and the minibatch order
(``batch_order``). Every child -- every rule, every rate, alone or in a group -- starts
from the same weights and sees the same minibatches.

The network::

    conv3x3(3 -> 32, no bias) - BN - ReLU - maxpool 2x2      32x32 -> 16x16
    conv3x3(32 -> 32, no bias) - BN - ReLU - maxpool 2x2     16x16 -> 8x8
    flatten (32 * 8 * 8 = 2048) - linear(2048 -> 10)

(``convnet.py``'s docstring says why it pools and has no convolution bias.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASSES = 10
IMAGE = 32


def layout(filters: int = 32) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of one child, in ``ChildNet.parameters()`` order (the flat order)."""
    f = filters
    return [
        ("conv1.weight", (f, 3, 3, 3)),
        ("bn1.weight", (f,)),
        ("bn1.bias", (f,)),
        ("conv2.weight", (f, f, 3, 3)),
        ("bn2.weight", (f,)),
        ("bn2.bias", (f,)),
        ("fc.weight", (CLASSES, f * (IMAGE // 4) ** 2)),
        ("fc.bias", (CLASSES,)),
    ]


def init_child(seed: int = 0, filters: int = 32) -> Tensor:
    """The initial weights of a child as one flat float32 vector (CPU), drawn from ``seed``.

    PyTorch's defaults (uniform in +-1/sqrt(fan_in) for conv and linear weights and the
    linear bias; BN scale 1, shift 0), drawn here so that a whole group of children and a
    lone ``ChildNet`` get identical weights without building B modules.
    """
    gen = torch.Generator().manual_seed(int(seed))
    fc_in = filters * (IMAGE // 4) ** 2
    parts = []
    for name, shape in layout(filters):
        n = math.prod(shape)
        if name.startswith("bn"):
            parts.append(torch.full((n,), 1.0 if name.endswith("weight") else 0.0))
            continue
        fan_in = fc_in if name.startswith("fc") else math.prod(shape[1:])
        bound = 1.0 / math.sqrt(fan_in)
        parts.append(torch.rand(n, generator=gen) * (2 * bound) - bound)
    return torch.cat(parts)


class ChildNet(nn.Module):
    """One child network, as plain PyTorch modules (the reference the grouped trainer matches)."""

    def __init__(self, filters: int = 32):
        super().__init__()
        self.filters = filters
        self.conv1 = nn.Conv2d(3, filters, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters)
        self.conv2 = nn.Conv2d(filters, filters, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(filters)
        self.fc = nn.Linear(filters * (IMAGE // 4) ** 2, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        # relu(maxpool(x)) == maxpool(relu(x)); pooling first makes ReLU 4x cheaper
        x = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        return self.fc(x.flatten(1))

    @torch.no_grad()
    def load_flat(self, flat: Tensor) -> ChildNet:
        """Set the weights from a flat vector in ``layout`` order (e.g. ``init_child``)."""
        params = dict(self.named_parameters())
        offset = 0
        for name, shape in layout(self.filters):
            n = math.prod(shape)
            params[name].copy_(flat[offset:offset + n].view(shape))
            offset += n
        if offset != flat.numel():
            raise ValueError(f"a flat vector of {flat.numel()} values for {offset} weights")
        return self

    def flat(self) -> Tensor:
        """The weights as one flat vector in ``layout`` order."""
        params = dict(self.named_parameters())
        return torch.cat([params[name].detach().reshape(-1) for name, _ in layout(self.filters)])


def batch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[Tensor]:
    """Minibatch indices into the first ``n`` examples: a fresh seeded shuffle per epoch, last partial batch dropped."""
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        out += list(perm[: (n // batch_size) * batch_size].view(-1, batch_size))
    return out
