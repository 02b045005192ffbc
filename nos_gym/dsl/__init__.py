"""The paper's update-rule language: vocabulary, programs, notation, canonical form, spaces.

>>> from nos_gym.dsl import parse
>>> p = parse("g * exp(sign(g) * sign(m))")
>>> p.tokens
('sign_g', 'sign_m', 'id', 'id', 'mul', 'g', 'r1', 'id', 'exp', 'mul')
"""

from nos_gym.dsl.canonical import canonicalize, tree_key
from nos_gym.dsl.notation import ParseError, RuleTooLongError, format_tree, parse, parse_tree, tree_to_program
from nos_gym.dsl.program import InvalidProgramError, Program
from nos_gym.dsl.spaces import SPACES, Constraints, Masker, SearchSpace, get_space
from nos_gym.dsl.vocabulary import BASE_OPERANDS, BINARY, UNARY, Vocabulary


def space_sizes(depths: tuple[int, ...] = (1, 2, 3), constraints: Constraints = Constraints()) -> dict[str, dict[int, int]]:
    """Number of rules in each named space at each depth (the paper quotes 1e6 to 1e10)."""
    return {name: {d: space.size(d, constraints) for d in depths} for name, space in SPACES.items()}


__all__ = [
    "BASE_OPERANDS", "BINARY", "UNARY", "Constraints", "InvalidProgramError", "Masker",
    "ParseError", "Program", "RuleTooLongError", "SPACES", "SearchSpace", "Vocabulary", "canonicalize",
    "format_tree", "get_space", "parse", "parse_tree", "space_sizes", "tree_key",
    "tree_to_program",
]
