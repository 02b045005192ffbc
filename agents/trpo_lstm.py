"""TRPO-LSTM: the controller of Neural Optimizer Search (Bello, Zoph, Vasudevan, Le, ICML 2017).

The agent itself is ``nos_gym/agents/trpo_lstm.py`` (one readable file: arguments, network,
loop), so it also runs from an installed package as ``nos-gym search --agent trpo_lstm``.
This script runs it from a clone: ``python agents/trpo_lstm.py --help`` lists its settings.
"""

from nos_gym.agents import run_cli
from nos_gym.agents.trpo_lstm import Args, main  # noqa: F401  (Args: for readers and tools)

if __name__ == "__main__":
    run_cli(main)
