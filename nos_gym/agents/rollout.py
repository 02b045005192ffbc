"""One batch of rules written through the vector env and scored together.

The agents do not build programs themselves: they pick a token per step for each of the
N lockstep sub-envs of ``OptimizerSearch-v0``'s vector form, from the ``(N, V)`` masks the
env gives; on the last step the env scores the N finished rules as one batch and returns
their rewards and terminal infos (tokens, paper notation, canonical key, metrics, cached).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from nos_gym.envs.optimizer_search import TERMINAL_KEYS

__all__ = ["Batch", "rollout", "play", "uniform_actions"]

#: ``act(t, masks)`` -> actions: position t (0-based) and the (N, V) bool masks -> (N,) token ids
Actor = Callable[[int, np.ndarray], np.ndarray]


@dataclass
class Batch:
    """A scored batch: token ids and the masks they were chosen under, rewards, infos."""

    tokens: np.ndarray    # (N, L) int64
    masks: np.ndarray     # (N, L, V) bool: the valid tokens at each position
    rewards: np.ndarray   # (N,) float
    infos: list[dict[str, Any]]  # one terminal info per rule (tokens, rule, canonical_key, metrics, cached, error)

    def __len__(self) -> int:
        return len(self.rewards)


def rollout(envs: Any, act: Actor) -> Batch:
    """Write one rule per sub-env of ``envs`` with ``act`` and return the scored batch.

    ``envs`` is an ``OptimizerSearchVectorEnv`` (``gymnasium.make_vec("OptimizerSearch-v0",
    vectorization_mode="vector_entry_point", ...)``); it is reset first, so any autoreset
    mode works.
    """
    _, info = envs.reset()
    n = envs.num_envs
    length = envs.length
    tokens = np.zeros((n, length), dtype=np.int64)
    masks = np.zeros((n, length, envs.single_action_space.n), dtype=bool)
    rewards = terminated = None
    for t in range(length):
        m = np.asarray(info["action_mask"]).astype(bool)
        masks[:, t] = m
        actions = np.asarray(act(t, m), dtype=np.int64).reshape(n)
        tokens[:, t] = actions
        _, rewards, terminated, _, info = envs.step(actions)
    if not np.all(terminated):
        raise RuntimeError(f"the env did not finish its programs after {length} steps")
    infos = [{key: info[key][i] for key in TERMINAL_KEYS}
             for i in range(n)]
    return Batch(tokens, masks, np.asarray(rewards, dtype=float), infos)


def play(envs: Any, token_ids: np.ndarray) -> Batch:
    """Score given token strings ``(N, L)`` through ``envs`` (for agents that edit whole rules)."""
    token_ids = np.asarray(token_ids, dtype=np.int64)

    def act(t: int, masks: np.ndarray) -> np.ndarray:
        return token_ids[:, t]

    return rollout(envs, act)


def uniform_actions(rng: np.random.Generator) -> Actor:
    """An actor choosing uniformly among the valid tokens of each row (masked random search)."""

    def act(t: int, masks: np.ndarray) -> np.ndarray:
        # uniform over the True entries of each row: argmax of masked uniform noise
        noise = rng.random(masks.shape)
        return np.where(masks, noise, -1.0).argmax(-1)

    return act
