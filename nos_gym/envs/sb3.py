"""``SB3VecEnv``: the vector env as a stable-baselines3 ``VecEnv`` (imports torch via SB3).

Imported on first access through ``nos_gym.envs.SB3VecEnv``, so
that the env modules themselves stay light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv

from nos_gym.envs.vector import OptimizerSearchVectorEnv

__all__ = ["SB3VecEnv"]


class SB3VecEnv(VecEnv):
    """An SB3 ``VecEnv`` over an ``OptimizerSearchVectorEnv`` (given, or made from ``kwargs``).

    Same-step reset as SB3 expects (``infos[i]["terminal_observation"]``), ``infos`` as a
    list of dicts, and ``action_masks()`` / ``env_method("action_masks")`` returning the
    ``(N, V)`` masks, so sb3-contrib's MaskablePPO samples valid programs and the N
    programs of each lockstep episode are scored as one batch:

    >>> venv = SB3VecEnv(num_envs=16, task="rosenbrock", depth=1, space="small")
    >>> model = MaskablePPO("MlpPolicy", VecMonitor(venv)).learn(10_000)
    """

    def __init__(self, env: OptimizerSearchVectorEnv | None = None, **kwargs: Any):
        if env is None:
            env = OptimizerSearchVectorEnv(**kwargs)
        elif kwargs:
            raise ValueError(f"pass either an OptimizerSearchVectorEnv or its arguments, not both "
                             f"({sorted(kwargs)})")
        if not isinstance(env, OptimizerSearchVectorEnv):
            raise TypeError(f"SB3VecEnv wraps an OptimizerSearchVectorEnv, got {type(env).__name__}")
        env.autoreset_mode = AutoresetMode.DISABLED  # this class resets in the same step itself
        env.metadata = {**env.metadata, "autoreset_mode": AutoresetMode.DISABLED}
        self.venv_gym = env
        self._actions: np.ndarray | None = None
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    # -- VecEnv -----------------------------------------------------------------------
    def reset(self) -> np.ndarray:
        seed = self._seeds[0] if self._seeds and self._seeds[0] is not None else None
        obs, info = self.venv_gym.reset(seed=seed)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        obs, rewards, terminated, truncated, info = self.venv_gym.step(self._actions)
        N = self.num_envs
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(N)]
        for key, value in info.items():
            if key.startswith("_") or key == "action_mask":
                continue
            present = info.get(f"_{key}", np.ones(N, dtype=bool))
            for i in range(N):
                if present[i]:
                    infos[i][key] = value[i]
        if dones.all():
            for i in range(N):
                infos[i]["terminal_observation"] = obs[i]
                infos[i]["TimeLimit.truncated"] = False
            obs, _ = self.venv_gym.reset()
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv_gym.close()

    def action_masks(self) -> np.ndarray:
        return self.venv_gym.action_masks()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self.venv_gym, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.venv_gym, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        idx = list(self._get_indices(indices))
        if method_name == "action_masks":
            masks = self.venv_gym.action_masks()
            return [masks[i] for i in idx]
        result = getattr(self.venv_gym, method_name)(*method_args, **method_kwargs)
        return [result for _ in idx]

    def env_is_wrapped(self, wrapper_class: type, indices=None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        if self.venv_gym.render_mode == "rgb_array":
            return list(self.venv_gym.render())
        return [None for _ in range(self.num_envs)]

