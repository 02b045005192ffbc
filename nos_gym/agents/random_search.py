"""Random search: every token drawn uniformly among the valid ones (the masked baseline).

Each batch writes ``num_envs`` rules through the ``OptimizerSearch-v0`` vector env, one
token per step chosen uniformly among the tokens the env's mask allows; the env scores
the batch together. No learning: this is the bar a search agent has to clear for the
same budget of sampled rules.

Run it::

    python agents/random_search.py                    # Rosenbrock, same budget as trpo_lstm
    python agents/random_search.py --total-rules 1000 --space small --depth 1

Same run directory, log, store, ``--resume`` and Ctrl-C behaviour as every agent
(``nos_gym/agents/runs.py``, on the run directory of ``nos_gym/agents/rundir.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nos_gym.agents import Run, RunArgs, parse_args, rollout, run_cli, uniform_actions


# ------------------------------------------------------------------------------ arguments
@dataclass
class Args(RunArgs):
    """Random-search settings: only the shared ones (``nos_gym.agents.config.RunArgs``)."""



# ----------------------------------------------------------------------------------- loop
def main(argv: Sequence[str] | None = None) -> Run:
    args, resume = parse_args(Args, argv, agent="random_search", description=__doc__)
    with Run.open(args, "random_search", resume) as run:
        envs = run.make_envs()
        rng = np.random.default_rng(args.seed)
        if run.checkpoint is not None:
            rng.bit_generator.state = run.checkpoint["state"]["rng"]
        act = uniform_actions(rng)
        for b in run.batches():
            batch = rollout(envs, act)  # uniform valid tokens; the env scores the batch together
            run.record(b, batch.infos, batch.rewards)
            run.save({"rng": rng.bit_generator.state})
    return run


if __name__ == "__main__":
    run_cli(main)
