"""REINFORCE-LSTM: the same controller as ``trpo_lstm.py``, trained with vanilla policy gradient.

The agent itself is ``nos_gym/agents/reinforce_lstm.py`` (one readable file: arguments, network,
loop), so it also runs from an installed package as ``nos-gym search --agent reinforce_lstm``.
This script runs it from a clone: ``python agents/reinforce_lstm.py --help`` lists its settings.
"""

from nos_gym.agents import run_cli
from nos_gym.agents.reinforce_lstm import Args, main  # noqa: F401  (Args: for readers and tools)

if __name__ == "__main__":
    run_cli(main)
