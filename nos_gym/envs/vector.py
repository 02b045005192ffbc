"""The vector form of ``OptimizerSearchEnv``: N programs in lockstep, scored as ONE batch.

Episodes have a fixed length (5n tokens), so N sub-environments that start together
finish together; on the last step the N finished programs go to the evaluator in one
``evaluate`` call, so a batched task (Rosenbrock, quadratic) scores them in one
vectorised computation, and a pool backend can spread them over workers.

Two front ends:

- ``OptimizerSearchVectorEnv``: a ``gymnasium.vector.VectorEnv``, what
  ``gymnasium.make_vec("OptimizerSearch-v0", num_envs=N, vectorization_mode="vector_entry_point")``
  returns. Masks come as an ``(N, V)`` array (``action_masks()``, ``info["action_mask"]``).
- ``SB3VecEnv`` (``nos_gym/envs/sb3.py``, as ``nos_gym.envs.SB3VecEnv``): a
  ``stable_baselines3`` ``VecEnv`` over it, so SB3 and sb3-contrib (MaskablePPO reads
  ``env_method("action_masks")``) also score their N programs as one batch.

**Autoreset.** Gymnasium 1.x vector envs declare ``metadata["autoreset_mode"]``. The
default here is ``AutoresetMode.NEXT_STEP`` (Gymnasium's default): the step that finishes
the programs returns their final observations, rewards and infos; the *next* ``step``
resets every sub-env, ignores its actions and returns the first observation with reward
0. ``AutoresetMode.SAME_STEP`` resets in the finishing step itself: the observation
returned is already the new episode's, the finished ones are in ``info["final_obs"]``
and their infos in ``info["final_info"]``. ``AutoresetMode.DISABLED``: ``step`` after the
end raises until ``reset()``. SB3's ``VecEnv`` convention is same-step reset with the
final observation in ``infos[i]["terminal_observation"]``: ``SB3VecEnv`` does that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from nos_gym.dsl import Masker, Program, SearchSpace, get_space
from nos_gym.dsl.vocabulary import GROUP_SIZE
from nos_gym.envs.optimizer_search import (
    INVALID_ACTION_MODES,
    OBSERVATION_MODES,
    TERMINAL_KEYS,
    EvaluatorLike,
    InvalidActionError,
    MaskTable,
    action_index,
    check_program_args,
    close_evaluator,
    invalid_action_message,
    make_evaluator,
    observation_space,
    onehot,
    project_action,
    terminal_info,
)
from nos_gym.tasks.base import Task


class OptimizerSearchVectorEnv(VectorEnv):
    """N ``OptimizerSearchEnv`` sub-environments in lockstep, their programs scored as one batch.

    Arguments are those of ``OptimizerSearchEnv`` plus ``num_envs`` and ``autoreset_mode``
    (an ``AutoresetMode`` or its value, "NextStep", "SameStep", "Disabled"). All sub-envs
    share one evaluator (and so its cache); ``close()`` closes it if the env built it, not
    one passed in. Spaces: ``single_action_space`` is ``Discrete(V)``, ``action_space``
    ``MultiDiscrete([V] * N)``; observations are
    ``(N, 5n + 1)`` int64 arrays laid out as the single env's (or ``(N, D)`` float32 with
    ``observation="onehot"``). Infos are dicts of arrays
    with Gymnasium's ``_key`` masks: ``action_mask`` (N, V) int8 and ``projected`` (N,)
    every step; on the last step also ``tokens``, ``rule``, ``canonical_key``, ``metrics``,
    ``cached`` and ``error`` (object or bool arrays, one entry per sub-env).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, task: str | Task | None = None, depth: int = 2,
                 space: str | SearchSpace = "full", distinct_operands: bool = True,
                 no_final_addition: bool = True, reuse_result: bool = True, invalid_action: str = "project",
                 evaluator: EvaluatorLike | None = None, task_options: dict[str, Any] | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, render_mode: str | None = None,
                 max_episode_steps: int | None = None, observation: str = "tokens"):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        depth, constraints = check_program_args(depth, distinct_operands, no_final_addition, reuse_result)
        if invalid_action not in INVALID_ACTION_MODES:
            raise ValueError(f"invalid_action must be one of {INVALID_ACTION_MODES}, got {invalid_action!r}")
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(f"autoreset_mode must be one of {[m.value for m in AutoresetMode]}, "
                             f"got {autoreset_mode!r}") from None
        if observation not in OBSERVATION_MODES:
            raise ValueError(f"observation must be one of {OBSERVATION_MODES}, got {observation!r}")
        if render_mode is not None and render_mode not in type(self).metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {type(self).metadata['render_modes']}, "
                             f"got {render_mode!r}")
        self.num_envs = int(num_envs)
        self.depth = depth
        self.length = GROUP_SIZE * self.depth
        if max_episode_steps is not None and max_episode_steps < self.length:
            raise ValueError(f"episodes are exactly {self.length} steps (5 x depth); "
                             f"max_episode_steps={max_episode_steps} would cut them")
        self.space = get_space(space)
        self.constraints = constraints
        self.invalid_action = invalid_action
        self.render_mode = render_mode
        self.autoreset_mode = mode
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}
        self.evaluator = make_evaluator(task, evaluator, task_options)
        self._owns_evaluator = evaluator is None
        self.mask_table = MaskTable(Masker(self.space, self.depth, self.constraints))
        self.vocab = self.mask_table.vocab
        V = len(self.vocab)
        self.single_action_space = spaces.Discrete(V)
        self.observation = observation
        self.single_observation_space = observation_space(observation, self.length, V)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._ids = np.zeros((self.num_envs, self.length), dtype=np.int64)
        self._pos = 0
        self._mask = np.zeros((self.num_envs, V), dtype=bool)
        self._state = "unreset"  # "running", "finished" (a NEXT_STEP/DISABLED end), "unreset"
        self.last_programs: list[Program] = []

    # ------------------------------------------------------------------------- API
    def reset(self, *, seed: int | Sequence[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if isinstance(seed, (list, tuple)):
            seed = seed[0] if seed else None
        super().reset(seed=seed)
        return self._restart()

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        N = self.num_envs
        if self._state == "unreset":
            raise RuntimeError("call reset() before step()")
        if self._state == "finished":
            if self.autoreset_mode == AutoresetMode.DISABLED:
                raise RuntimeError("the programs are complete and autoreset_mode is DISABLED: call reset()")
            obs, info = self._restart()  # NEXT_STEP: this step only resets; its actions are ignored
            return obs, np.zeros(N), np.zeros(N, dtype=bool), np.zeros(N, dtype=bool), info
        acts, projected = self._valid_actions(actions)
        self._ids[:, self._pos] = acts
        self._pos += 1
        obs = self._observation()
        if self._pos < self.length:
            self._mask = self.mask_table.masks(self._ids[:, : self._pos])
            info = {"action_mask": self._mask.astype(np.int8), "projected": projected}
            return obs, np.zeros(N), np.zeros(N, dtype=bool), np.zeros(N, dtype=bool), self._with_masks(info)
        return self._finish(obs, projected)

    def _valid_actions(self, actions: Any) -> tuple[np.ndarray, np.ndarray]:
        """``actions`` as N valid token ids (invalid ones projected, or an error in "raise" mode)
        and which of them were projected."""
        N, V = self.num_envs, len(self.vocab)
        acts = np.asarray(actions)
        if acts.shape != (N,):
            acts = acts.reshape(-1)
            if acts.shape != (N,):
                raise ValueError(f"actions must be {N} token ids, one per sub-env; got shape {np.shape(actions)}")
        if not np.issubdtype(acts.dtype, np.integer):
            acts = np.array([action_index(a, V) for a in acts], dtype=np.int64)
        elif acts.min() < 0 or acts.max() >= V:
            bad = int(acts[(acts < 0) | (acts >= V)][0])
            raise ValueError(f"action {bad} is outside Discrete({V}): token ids are 0..{V - 1}")
        acts = acts.astype(np.int64, copy=True)
        invalid = ~self._mask[np.arange(N), acts]
        if invalid.any():
            if self.invalid_action == "raise":
                i = int(np.flatnonzero(invalid)[0])
                raise InvalidActionError(f"sub-env {i}: " + invalid_action_message(
                    self.vocab, self._pos, int(acts[i]), self._mask[i]))
            for i in np.flatnonzero(invalid):
                acts[i] = project_action(int(acts[i]), self._mask[i])
        return acts, invalid

    def _finish(self, obs: np.ndarray, projected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                      np.ndarray, dict[str, Any]]:
        """The last step: score the N complete programs as one batch; autoreset as configured."""
        N = self.num_envs
        programs = [Program.from_ids(row, self.vocab) for row in self._ids]
        self.last_programs = programs
        results = self.evaluator.evaluate(programs)
        if len(results) != N:
            raise RuntimeError(f"the evaluator returned {len(results)} results for {N} programs")
        rewards = np.array([float(r.reward) for r in results])
        per_env = [terminal_info(p, r) for p, r in zip(programs, results)]
        info: dict[str, Any] = {}
        for key in TERMINAL_KEYS:
            arr = np.zeros(N, dtype=bool) if key == "cached" else np.empty(N, dtype=object)
            for i, d in enumerate(per_env):
                arr[i] = d[key]
            info[key] = arr
        info["projected"] = projected
        terminated, truncated = np.ones(N, dtype=bool), np.zeros(N, dtype=bool)
        self._mask = np.zeros((N, len(self.vocab)), dtype=bool)
        info["action_mask"] = self._mask.astype(np.int8)
        if self.autoreset_mode != AutoresetMode.SAME_STEP:
            self._state = "finished"
            return obs, rewards, terminated, truncated, self._with_masks(info)
        final_info = self._with_masks(info)
        final_obs = np.empty(N, dtype=object)
        for i in range(N):
            final_obs[i] = obs[i].copy()
        obs, reset_info = self._restart()
        reset_info.update({"final_obs": final_obs, "_final_obs": np.ones(N, dtype=bool),
                           "final_info": final_info, "_final_info": np.ones(N, dtype=bool)})
        return obs, rewards, terminated, truncated, reset_info

    def action_masks(self) -> np.ndarray:
        """``(N, V)`` bool masks of the valid actions now (all False once the programs are complete)."""
        return self._mask.copy()

    def render(self) -> tuple[str, ...] | tuple[np.ndarray, ...] | None:
        """One entry per sub-env, as ``SyncVectorEnv`` gives: text ("ansi") or the
        ``(H, W, 3)`` uint8 picture of each rule so far ("rgb_array", see ``nos_gym.envs.render``)."""
        if self.render_mode == "rgb_array":
            from nos_gym.envs.render import draw_program

            return tuple(draw_program(row[: self._pos], self.vocab, self.depth) for row in self._ids)
        if self.render_mode != "ansi":
            return None
        tokens = self.vocab.tokens
        return tuple(f"[{' '.join(tokens[i] for i in row[: self._pos])}] {self._pos}/{self.length}"
                     for row in self._ids)

    def close_extras(self, **kwargs: Any) -> None:
        """Close the Evaluator this env built (``close()`` calls this once); one passed in stays open."""
        if getattr(self, "_owns_evaluator", False):
            close_evaluator(self.evaluator)

    # ---------------------------------------------------------------------- helpers
    def _restart(self) -> tuple[np.ndarray, dict[str, Any]]:
        self._ids[:] = 0
        self._pos = 0
        self._state = "running"
        self._mask = self.mask_table.masks(self._ids[:, :0])
        return self._observation(), self._with_masks({"action_mask": self._mask.astype(np.int8)})

    def _observation(self) -> np.ndarray:
        obs = np.zeros((self.num_envs, self.length + 1), dtype=np.int64)
        obs[:, : self._pos] = self._ids[:, : self._pos] + 1
        obs[:, self.length] = self._pos
        return obs if self.observation == "tokens" else onehot(obs, len(self.vocab))

    def _with_masks(self, info: dict[str, Any]) -> dict[str, Any]:
        for key in list(info):
            if not key.startswith("_"):
                info[f"_{key}"] = np.ones(self.num_envs, dtype=bool)
        return info


def make_vector_env(num_envs: int = 1, **kwargs: Any) -> OptimizerSearchVectorEnv:
    """The ``vector_entry_point`` of the registered ids (``gymnasium.make_vec``)."""
    return OptimizerSearchVectorEnv(num_envs=num_envs, **kwargs)


__all__ = ["OptimizerSearchVectorEnv", "make_vector_env"]
