"""What an LSTM controller learns from besides its own batch: a priority queue, guided evolution.

Two options of the controller agents (``trpo_lstm``, ``reinforce_lstm``), both off in the
paper's setting (``--preset paper``):

- **Priority-queue training** (Abolafia et al. 2018, "Neural program synthesis with priority
  queue training"; dso's ``PQTPolicyOptimizer``, brain_coder's top-k buffer): the
  ``PriorityQueue`` keeps the best ``pqt_k`` *distinct* rules (by canonical key) sampled so
  far, with the token ids and masks they were written under. Every update adds
  ``pqt_weight * mean_q log p_theta(q)`` over the whole queue to the objective: a supervised
  term that pulls the controller towards the best rules it has found, so one lucky sample is
  not forgotten after the batch that found it. With ``pqt_policy_gradient: false`` the update
  learns from the queue (and the entropy bonus) alone, as dso does by default.
- **Neural-guided evolution** (Mundhenk et al. 2021, "Symbolic regression via neural-guided
  genetic programming population seeding"; dso's GP-meld): ``GuidedEvolution`` keeps an aging
  population (Real et al.'s regularized evolution) that every scored rule of a batch joins,
  the controller's samples included, so the controller seeds it. Of each batch of ``num_envs``
  rules, ``round(evolution_fraction * num_envs)`` are the population's tournament winners mutated
  (``nos_gym.agents.evolution.tournament_children``), the rest the controller's samples, all
  scored together; the controller's update runs on the whole batch (dso adds the GP's best to
  the risk-seeking batch in the same way), so it learns from the population's best, and with a
  queue also from the best of both. Children start once the population is full.

``with_fixed_rows`` is the actor that writes such a mixed batch through the env: the first
rows sampled by the controller with the env's masks, the last rows given token strings.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nos_gym.agents.rollout import Actor, Batch, rollout

__all__ = ["GuidedEvolution", "PriorityQueue", "guidance_state", "guidance_stats", "guided_rollout", "make_guidance",
           "with_fixed_rows"]


class PriorityQueue:
    """The best ``k`` distinct rules seen so far, by reward (ties: the one seen first stays).

    Each entry keeps the token ids ``(L,)`` and the masks ``(L, V)`` the rule was written under,
    so the controller can score its log-likelihood (``tensors``).
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"a priority queue holds at least one rule, got k={k!r}")
        self.k = int(k)
        self.entries: list[dict[str, Any]] = []  # best first: {"key", "reward", "tokens", "masks"}

    def __len__(self) -> int:
        return len(self.entries)

    def push(self, keys: Sequence[str], rewards: Sequence[float], tokens: np.ndarray, masks: np.ndarray) -> int:
        """Offer a batch of rules; returns how many new rules are in the queue afterwards.

        A rule already queued (same canonical key) keeps its entry and its first tokens; a
        higher reward for it (a stochastic rule) updates the reward. Non-finite rewards are skipped.
        """
        known = {e["key"]: e for e in self.entries}
        new_keys = set()
        for i, (key, reward) in enumerate(zip(keys, rewards)):
            reward = float(reward)
            if not np.isfinite(reward):
                continue
            if key in known:
                known[key]["reward"] = max(known[key]["reward"], reward)
                continue
            if len(self.entries) >= self.k and reward <= self.entries[-1]["reward"]:
                continue
            entry = {"key": key, "reward": reward, "tokens": np.array(tokens[i], dtype=np.int64),
                     "masks": np.array(masks[i], dtype=bool)}
            self.entries.append(entry)
            known[key] = entry
            new_keys.add(key)
            self.entries.sort(key=lambda e: -e["reward"])  # stable: of equal rewards the earlier stays ahead
            del self.entries[self.k:]
        self.entries.sort(key=lambda e: -e["reward"])
        return sum(e["key"] in new_keys for e in self.entries)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """``(tokens (K, L) long, masks (K, L, V) bool)`` of the queued rules, best first."""
        tokens = torch.from_numpy(np.stack([e["tokens"] for e in self.entries]))
        masks = torch.from_numpy(np.stack([e["masks"] for e in self.entries]))
        return tokens, masks

    def rewards(self) -> list[float]:
        return [e["reward"] for e in self.entries]

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "entries": [dict(e) for e in self.entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = [dict(e) for e in state["entries"]]


def with_fixed_rows(act: Actor, fixed: np.ndarray) -> Actor:
    """An actor for ``nos_gym.agents.rollout``: the first ``N - len(fixed)`` rows from ``act`` (which
    sees only their masks), the last ``len(fixed)`` rows the token strings ``fixed`` ``(M, L)``.
    With no fixed rows it is ``act`` itself."""
    fixed = np.asarray(fixed, dtype=np.int64)
    if len(fixed) == 0:
        return act

    def mixed(t: int, masks: np.ndarray) -> np.ndarray:
        n = len(masks) - len(fixed)
        out = np.empty(len(masks), dtype=np.int64)
        out[:n] = act(t, masks[:n])
        out[n:] = fixed[:, t]
        return out

    return mixed


class GuidedEvolution:
    """An aging population seeded by the controller's samples, making ``children`` rules per batch.

    Args:
        children: evolution's rules per batch (the controller writes the rest).
        population_size: rules alive at once (the newest).
        tournament_size: members drawn per tournament.
        mutations: token mutations per child.
        seed: the seed of its own random stream (tournaments, mutations).
    """

    def __init__(self, children: int, population_size: int = 100, tournament_size: int = 25, mutations: int = 1,
                 seed: int = 0):
        if tournament_size > population_size:
            raise ValueError(f"tournament_size ({tournament_size}) must be <= population_size ({population_size})")
        self.n_children = int(children)
        self.population_size = int(population_size)
        self.tournament_size = int(tournament_size)
        self.mutations = int(mutations)
        self.rng = np.random.default_rng(seed)
        self.population: deque[tuple[np.ndarray, float]] = deque()  # (token ids, reward), oldest first

    def children(self, masker: Any) -> np.ndarray:
        """``(M, L)`` children for the next batch: ``children`` of them once the population is full, else none."""
        from nos_gym.agents.evolution import tournament_children

        if self.n_children == 0 or len(self.population) < self.population_size:
            return np.zeros((0, masker.length), dtype=np.int64)
        return tournament_children(self.population, self.n_children, masker, self.rng, self.tournament_size,
                                   self.mutations)

    def add(self, tokens: np.ndarray, rewards: Sequence[float]) -> None:
        """Every scored rule of a batch joins; the oldest leave beyond ``population_size``."""
        for t, r in zip(np.asarray(tokens, dtype=np.int64), rewards):
            self.population.append((t, float(r)))
        while len(self.population) > self.population_size:
            self.population.popleft()

    def best(self) -> float:
        return max((r for _, r in self.population), default=float("nan"))

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "population": [(t.tolist(), r) for t, r in self.population]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.population = deque((np.asarray(t, dtype=np.int64), float(r)) for t, r in state["population"])


def make_guidance(args: Any) -> tuple[PriorityQueue | None, GuidedEvolution | None]:
    """The priority queue (``pqt_k > 0``) and the guided population (``evolution_fraction > 0``) of a
    run with ``ControllerArgs`` ``args``; None for each option that is off."""
    queue = PriorityQueue(args.pqt_k) if args.pqt_k > 0 else None
    guide = (GuidedEvolution(args.evolution_children, args.evolution_population, args.evolution_tournament,
                             args.evolution_mutations, seed=args.seed) if args.evolution_children > 0 else None)
    return queue, guide


def guidance_state(queue: PriorityQueue | None, guide: GuidedEvolution | None) -> dict[str, Any]:
    """The guidance objects that are on, by name, for ``Run.restore`` (empty when both are off)."""
    return {name: obj for name, obj in (("queue", queue), ("guide", guide)) if obj is not None}


def guided_rollout(envs: Any, policy: Any, generator: torch.Generator, num_envs: int, queue: PriorityQueue | None,
                   guide: GuidedEvolution | None) -> tuple[Batch, list[str], int]:
    """One batch of ``num_envs`` rules: the controller ``policy`` writes the first rows, guided evolution's
    children (when on) the last; the env scores them together, and the scored rules then join the
    population and the queue. Returns the batch, its canonical keys and how many rows were children."""
    children = guide.children(envs.mask_table.masker) if guide is not None else ()
    batch = rollout(envs, with_fixed_rows(policy.actor(num_envs - len(children), generator), children))
    keys = [info["canonical_key"] for info in batch.infos]
    if guide is not None:
        guide.add(batch.tokens, batch.rewards)
    if queue is not None:
        queue.push(keys, batch.rewards, batch.tokens, batch.masks)
    return batch, keys, len(children)


def guidance_stats(queue: PriorityQueue | None, guide: GuidedEvolution | None, children: int) -> dict[str, Any]:
    """What the queue and the population hold after a batch of which ``children`` rows were the
    population's, for ``updates.jsonl`` (empty when both are off)."""
    out: dict[str, Any] = {}
    if queue:
        out.update(queue_best=max(queue.rewards()), queue_worst=min(queue.rewards()), queue_size=len(queue))
    if guide is not None:
        out.update(children=children, population_best=guide.best())
    return out
