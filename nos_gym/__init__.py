"""nos-gym: Neural Optimizer Search (Bello, Zoph, Vasudevan, Le, ICML 2017) as a Gymnasium env.

Importing the package registers the environment ids with Gymnasium (and nothing heavier:
torch is imported only when a task that needs it is made):

- ``OptimizerSearch-v0``: every argument open (default: Rosenbrock task, full space, depth 2);
- ``OptimizerSearch-Rosenbrock-v0``: Rosenbrock, full space, depth 2 (paper section 5.1);
- ``OptimizerSearch-RosenbrockSmall-v0``: Rosenbrock, "small" space, depth 1;
- ``OptimizerSearch-Quadratic-v0``: noisy ill-conditioned quadratic, full space, depth 2;
- ``OptimizerSearch-Bench-v0``: the NOS-Bench table (``nos_gym.bench``), "small" space, depth 1,
  the paper's constraints: the CIFAR-10 child's reward, read from a table at no cost.

>>> import gymnasium as gym, nos_gym
>>> env = gym.make("OptimizerSearch-v0", task="rosenbrock", depth=2, space="small")
>>> envs = gym.make_vec("OptimizerSearch-v0", num_envs=64, vectorization_mode="vector_entry_point")
"""

__version__ = "0.1.0"

ENV_IDS: dict[str, dict] = {
    "OptimizerSearch-v0": {},
    "OptimizerSearch-Rosenbrock-v0": {"task": "rosenbrock", "space": "full", "depth": 2},
    "OptimizerSearch-RosenbrockSmall-v0": {"task": "rosenbrock", "space": "small", "depth": 1},
    "OptimizerSearch-Quadratic-v0": {"task": "quadratic", "space": "full", "depth": 2},
    "OptimizerSearch-Bench-v0": {"task": "nosbench", "space": "small", "depth": 1},
}


def _register_envs() -> None:
    from gymnasium.envs.registration import register, registry

    for env_id, kwargs in ENV_IDS.items():
        if env_id in registry:
            continue
        register(
            id=env_id,
            entry_point="nos_gym.envs.optimizer_search:OptimizerSearchEnv",
            vector_entry_point="nos_gym.envs.vector:make_vector_env",
            # observations follow from the actions alone, and the built-in tasks are seeded
            nondeterministic=False,
            kwargs=dict(kwargs),
        )


_register_envs()
