"""The paper's child task: a small ConvNet on CIFAR-10, scored by held-out accuracy.

- ``protocol``: how a rule is scored (``Protocol``, ``PRESETS``, the multi-fidelity fields);
- ``network``: the child network, its flat weight layout, initial weights and minibatch order;
- ``native``: the C++ kernel of a batch norm + max-pool + ReLU block (``csrc/``);
- ``grouped``: many children trained as one grouped network (``train_children``);
- ``fidelity``: successive halving of the rate sweep and the hurdles;
- ``task``: ``ConvNetTask``, and ``train_child``, the plain one-network reference.

Each module uses only those above it in this list. The names below are importable from the
package, each loaded on first use: ``protocol`` needs no torch, so neither does reading
``nos_gym.tasks.convnet.Protocol``.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "protocol": ["PAPER_LRS", "PRESETS", "Protocol"],
    "network": ["CLASSES", "IMAGE", "ChildNet", "batch_order", "init_child", "layout"],
    "task": ["ChildResult", "ConvNetTask", "train_child"],
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
