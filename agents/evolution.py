"""Regularized (aging) evolution (Real et al., AAAI 2019) over update rules.

The agent itself is ``nos_gym/agents/evolution.py`` (one readable file: arguments, network,
loop), so it also runs from an installed package as ``nos-gym search --agent evolution``.
This script runs it from a clone: ``python agents/evolution.py --help`` lists its settings.
"""

from nos_gym.agents import run_cli
from nos_gym.agents.evolution import Args, main  # noqa: F401  (Args: for readers and tools)

if __name__ == "__main__":
    run_cli(main)
