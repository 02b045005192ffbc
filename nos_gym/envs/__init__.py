"""The Gymnasium environment of Neural Optimizer Search and its vector forms.

- ``OptimizerSearchEnv``: one program, token by token (``gymnasium.make("OptimizerSearch-v0")``).
- ``OptimizerSearchVectorEnv``: N programs in lockstep, scored as one batch
  (``gymnasium.make_vec("OptimizerSearch-v0", num_envs=N, vectorization_mode="vector_entry_point")``).
- ``SB3VecEnv``: the same as a stable-baselines3 ``VecEnv`` (imported on first use).
"""

from typing import Any

from nos_gym.envs.optimizer_search import InvalidActionError, MaskTable, OptimizerSearchEnv, project_action
from nos_gym.envs.vector import OptimizerSearchVectorEnv, make_vector_env


def __getattr__(name: str) -> Any:
    if name == "SB3VecEnv":
        from nos_gym.envs.sb3 import SB3VecEnv  # stable_baselines3 imports torch: only on first use

        return SB3VecEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["InvalidActionError", "MaskTable", "OptimizerSearchEnv", "OptimizerSearchVectorEnv", "SB3VecEnv",
           "make_vector_env", "project_action"]
