"""Scoring pools: ``Evaluator`` runs a task over batches of programs, with a cache."""

from nos_gym.evaluation.evaluator import Evaluator

__all__ = ["Evaluator"]
