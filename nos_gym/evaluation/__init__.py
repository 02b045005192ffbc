"""Scoring pools: ``Evaluator`` runs a task over programs (serial, local processes or Ray), with a cache and a store.

>>> from nos_gym.evaluation import Evaluator
>>> with Evaluator("convnet-cifar10", preset="ci", store="runs/nos.sqlite") as ev:
...     rewards = [r.reward for r in ev.evaluate(programs)]        # batch
...     tickets = ev.submit(more); done = ev.poll(timeout=1.0)     # async (paper section 3.3)
"""

from nos_gym.evaluation.backends import Backend, Job, Outcome, RuleFailure, SerialBackend, run_job
from nos_gym.evaluation.evaluator import BACKENDS, Completed, Evaluator

__all__ = ["BACKENDS", "Backend", "Completed", "Evaluator", "Job", "Outcome", "RuleFailure", "SerialBackend",
           "run_job"]
