"""Tasks: what an update rule is scored on (``make``, ``register``, ``Task``, ``Result``)."""

from nos_gym.tasks.base import Result, Task
from nos_gym.tasks.registry import available, make, register

__all__ = ["Result", "Task", "available", "make", "register"]
