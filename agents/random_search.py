"""Random search: every token drawn uniformly among the valid ones (the masked baseline).

The agent itself is ``nos_gym/agents/random_search.py`` (one readable file: arguments, network,
loop), so it also runs from an installed package as ``nos-gym search --agent random_search``.
This script runs it from a clone: ``python agents/random_search.py --help`` lists its settings.
"""

from nos_gym.agents import run_cli
from nos_gym.agents.random_search import Args, main  # noqa: F401  (Args: for readers and tools)

if __name__ == "__main__":
    run_cli(main)
