"""Task registry: built-in tasks by name, and user tasks through ``register``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from nos_gym.tasks.base import Task

# Built-ins are named by import path so that importing nos_gym stays cheap.
_FACTORIES: dict[str, Callable[..., Task] | str] = {
    "rosenbrock": "nos_gym.tasks.rosenbrock:RosenbrockTask",
    "quadratic": "nos_gym.tasks.quadratic:QuadraticTask",
    "convnet-cifar10": "nos_gym.tasks.convnet:ConvNetTask",
    "nosbench": "nos_gym.tasks.nosbench:NOSBenchTask",
}


def register(name: str, factory: Callable[..., Task] | str, *, overwrite: bool = False) -> None:
    """Make ``nos_gym.tasks.make(name, **options)`` call ``factory(**options)``.

    ``factory`` is a callable returning a ``Task`` (a Task subclass works) or a
    ``"module:attribute"`` string imported on first use.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a task name is a non-empty string")
    if name in _FACTORIES and not overwrite:
        raise ValueError(f"task {name!r} is already registered; pass overwrite=True to replace it")
    _FACTORIES[name] = factory


def available() -> list[str]:
    return sorted(_FACTORIES)


def make(task: str | Task, **options: Any) -> Task:
    """A Task from a registered name (with options), or ``task`` itself if it is one."""
    if isinstance(task, Task):
        if options:
            raise ValueError(f"options {sorted(options)} given with a Task object; set them on the object")
        return task
    if task not in _FACTORIES:
        raise ValueError(f"unknown task {task!r}; registered tasks: {available()} "
                         f"(add your own with nos_gym.tasks.register(name, factory))")
    factory = _FACTORIES[task]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        _FACTORIES[task] = factory
    made = factory(**options)
    if not isinstance(made, Task):
        raise TypeError(f"the factory of task {task!r} returned {type(made).__name__}, not a nos_gym Task")
    return made
