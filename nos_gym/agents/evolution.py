"""Regularized (aging) evolution (Real et al., AAAI 2019) over update rules.

A population of ``population_size`` rules starts from masked random samples. Each
batch makes ``num_envs`` children: for each, ``tournament_size`` members are drawn at
random and the best one is mutated. All children are scored together through the
vector env, join the population, and as many of the *oldest* members leave (aging, not
the worst: the "regularized" part).

A mutation respects the masks: it picks a position where more than one token is valid,
replaces its token by another valid one, and then repairs the rest of the string: each
later token that the new prefix makes invalid (a distinct-operand or reuse-result
constraint, say) is redrawn uniformly among the valid ones. So every child is a string
the env accepts in ``invalid_action="raise"`` mode.

Run it::

    python agents/evolution.py                        # Rosenbrock, same budget as trpo_lstm
    python agents/evolution.py --population-size 200 --tournament-size 50
    python agents/evolution.py --novel-children       # every child a rule not yet sampled
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nos_gym.agents import Run, RunArgs, parse_args, play, read_log, rollout, run_cli, uniform_actions
from nos_gym.agents.config import ConfigError, check_range
from nos_gym.dsl import Masker, Program


# ------------------------------------------------------------------------------ arguments
@dataclass
class Args(RunArgs):
    """Evolution settings (shared ones in ``nos_gym.agents.config.RunArgs``)."""

    population_size: int = 100
    """rules alive at once; the first ones are masked random samples"""
    tournament_size: int = 25
    """members drawn per tournament; the best is the parent"""
    mutations: int = 1
    """token mutations per child"""
    novel_children: bool = False
    """mutate again (up to ``novel_tries`` times) while a child is a rule this run already
    sampled (same canonical key): every sample is then a rule the task has not scored in
    this run, so evolution's budget of samples is one of trained rules, as an RL agent's
    is. Off by default (Real et al.'s algorithm: a re-sampled rule just re-joins the
    population, at no cost where results are cached)"""
    novel_tries: int = 20
    """mutation attempts per child with ``novel_children`` before a known rule is accepted"""

    def validate(self) -> None:
        super().validate()
        check_range(self, "population_size", 2)
        check_range(self, "tournament_size", 1)
        check_range(self, "mutations", 1)
        check_range(self, "novel_tries", 1)
        if self.tournament_size > self.population_size:
            raise ConfigError(f"config key 'tournament_size' ({self.tournament_size}) must be <= "
                              f"population_size ({self.population_size})")


# ------------------------------------------------------------------------------ mutation
def make_child(parent: np.ndarray, masker: Masker, rng: np.random.Generator, mutations: int,
               seen: set | None = None, tries: int = 1) -> np.ndarray:
    """``parent`` mutated ``mutations`` times; with ``seen`` (canonical keys), mutated afresh
    up to ``tries`` times while the child's rule is in it (the last attempt is kept)."""
    for _ in range(tries if seen is not None else 1):
        child = parent
        for _ in range(mutations):
            child = mutate(child, masker, rng)
        if seen is None or Program.from_ids(child, masker.vocab).canonical_key not in seen:
            break
    return child


def tournament_children(population: Sequence[tuple[np.ndarray, float]], n: int, masker: Masker,
                        rng: np.random.Generator, tournament_size: int, mutations: int,
                        seen: set | None = None, tries: int = 1) -> np.ndarray:
    """``(n, L)`` children of ``population`` (``(token ids, reward)`` pairs): for each, the best of
    ``tournament_size`` members drawn without replacement, mutated by ``make_child``; with ``seen``,
    each child's canonical key is added to it (so no rule is made twice in one call)."""
    children = []
    for _ in range(n):
        picks = rng.choice(len(population), size=tournament_size, replace=False)
        parent = max(picks, key=lambda k: population[k][1])
        child = make_child(population[parent][0], masker, rng, mutations, seen, tries)
        if seen is not None:
            seen.add(Program.from_ids(child, masker.vocab).canonical_key)
        children.append(child)
    return np.stack(children) if children else np.zeros((0, masker.length), dtype=np.int64)


def mutate(tokens: np.ndarray, masker: Masker, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``tokens`` with one position changed to another valid token, the rest repaired."""
    child = np.array(tokens, dtype=np.int64)
    choices = [i for i in range(len(child)) if masker.mask(child[:i]).sum() > 1]
    i = int(rng.choice(choices))
    valid = np.flatnonzero(masker.mask(child[:i]))
    child[i] = rng.choice(valid[valid != child[i]])
    for j in range(i + 1, len(child)):  # repair: later tokens the new prefix forbids are redrawn
        mask = masker.mask(child[:j])
        if not mask[child[j]]:
            child[j] = rng.choice(np.flatnonzero(mask))
    return child


# ----------------------------------------------------------------------------------- loop
def main(argv: Sequence[str] | None = None) -> Run:
    args, resume = parse_args(Args, argv, agent="evolution", description=__doc__)
    with Run.open(args, "evolution", resume) as run:
        envs = run.make_envs()
        masker = envs.mask_table.masker  # the env's own masks: mutations stay in its space and constraints
        rng = np.random.default_rng(args.seed)
        population: deque[tuple[np.ndarray, float]] = deque()  # (token ids, reward), oldest first
        # canonical keys of the rules sampled so far (novel_children); kept as the log's keys
        seen: set | None = None
        if args.novel_children:
            seen = {r["key"] for r in read_log(run.path)} if run.log_path.is_file() else set()
        if run.checkpoint is not None:
            state = run.checkpoint["state"]
            rng.bit_generator.state = state["rng"]
            population.extend((np.asarray(t, dtype=np.int64), float(r)) for t, r in state["population"])

        for b in run.batches():
            if len(population) < args.population_size:
                # 1a. the first generation: masked random rules
                batch = rollout(envs, uniform_actions(rng))
            else:
                # 1b. tournament selection, then a mask-respecting mutation of each winner
                children = tournament_children(population, args.num_envs, masker, rng, args.tournament_size,
                                               args.mutations, seen, args.novel_tries)
                batch = play(envs, children)  # the env scores the children together
            run.record(b, batch.infos, batch.rewards)
            if seen is not None:
                seen.update(Program.from_ids(t, masker.vocab).canonical_key for t in batch.tokens)

            # 2. aging: the newest join, the oldest leave
            population.extend(zip(batch.tokens, batch.rewards.tolist()))
            while len(population) > args.population_size:
                population.popleft()
            run.log_update(b, {"population_best": max(r for _, r in population),
                               "population_mean": float(np.mean([r for _, r in population]))})
            run.save({"rng": rng.bit_generator.state,
                      "population": [(t.tolist(), r) for t, r in population]})
    return run


if __name__ == "__main__":
    run_cli(main)
