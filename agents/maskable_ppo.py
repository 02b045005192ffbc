"""MaskablePPO (sb3-contrib) on ``OptimizerSearch-v0``: the plug-in example for third-party RL.

The agent itself is ``nos_gym/agents/maskable_ppo.py`` (one readable file: arguments, network,
loop), so it also runs from an installed package as ``nos-gym search --agent maskable_ppo``.
This script runs it from a clone: ``python agents/maskable_ppo.py --help`` lists its settings.
"""

from nos_gym.agents import run_cli
from nos_gym.agents.maskable_ppo import Args, main  # noqa: F401  (Args: for readers and tools)

if __name__ == "__main__":
    run_cli(main)
