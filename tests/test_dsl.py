"""The update-rule language: notation, parsing, canonical form, spaces, masks."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nos_gym.dsl import (
    Constraints,
    InvalidProgramError,
    Masker,
    ParseError,
    Program,
    SearchSpace,
    Vocabulary,
    get_space,
    parse,
    space_sizes,
)
from nos_gym.optim import table1


# ------------------------------------------------------------------------ notation
@pytest.mark.parametrize(
    "text, tokens",
    [
        ("g * exp(sign(g) * sign(m))", ("sign_g", "sign_m", "id", "id", "mul", "g", "r1", "id", "exp", "mul")),
        ("drop(m, 0.3) * exp(1e-3 * w)", ("m", "w1e-3", "drop0.3", "exp", "mul")),
        ("m / sqrt|v|", ("m", "v", "id", "sqrt_abs", "div")),
        ("clip(m, 1e-4) * exp(v)", ("m", "v", "clip1e-4", "exp", "mul")),
    ],
)
def test_parse_lays_out_the_papers_groups(text, tokens):
    assert parse(text).tokens == tokens


def test_paper_bracket_notation_and_aliases_parse_to_the_same_rule():
    a = parse("[exp(sign(g)*sign(m)) + clip(g, 1e-4)] * g")
    b = parse("(e^{sign(g) * sign(m)} + clip(g, 0.0001)) * g")
    assert a.tokens == b.tokens
    assert a.depth == 3
    assert str(a) == "(exp(sign(g) * sign(m)) + clip(g, 1e-4)) * g"
    assert parse("m̂ * e^{v̂}").tokens == parse("m * exp(v)").tokens
    assert parse("drop(m_hat, 0.1) / e^{g²}").tokens == parse("drop(m, 0.1) / exp(g^2)").tokens


def test_every_table1_rule_formats_and_parses_back_to_the_same_key():
    rows = table1()
    assert len(rows) == 20
    for name, text in rows.items():
        program = parse(text)
        again = parse(program.format())
        assert again.tokens == program.tokens, name
        assert again.canonical_key == program.canonical_key, name


@pytest.mark.parametrize(
    "text, position, expected",
    [
        ("g * ", 4, "an operand"),
        ("g + + m", 4, "an operand"),
        ("clip(g, 0.5)", 8, "a clip level"),
        ("drop(g, 0.2)", 8, "a drop rate"),
        ("exp(g", 5, "')'"),
        ("g m", 2, "an operator"),
        ("2 * g", 0, "the constant 1"),
        ("w", 0, "a scale before w"),
        ("g^4", 2, "a power of g"),
        ("g $ m", 2, "an operand, a function"),
        ("", 0, "a rule"),
    ],
)
def test_parse_error_names_the_position_and_what_was_expected(text, position, expected):
    with pytest.raises(ParseError) as info:
        parse(text)
    assert info.value.position == position
    assert expected in info.value.expected
    assert f"at position {position}" in str(info.value)


def test_deep_nesting_is_a_parse_error_not_a_recursion_error():
    with pytest.raises(ParseError, match="levels of nesting"):
        parse("(" * 500 + "g" + ")" * 500)
    with pytest.raises(ParseError):
        parse("-" * 5000 + "g")
    with pytest.raises(ParseError, match="levels of nesting"):
        parse("e^" * 3000 + "g")


def test_a_long_chain_is_a_clear_parse_error_and_depth_10_rules_still_parse():
    from nos_gym.dsl import RuleTooLongError

    with pytest.raises(RuleTooLongError, match=r"^rule too long: 499 nested operations, at most 100") as info:
        parse(" + ".join(["g"] * 500))
    assert isinstance(info.value, ParseError) and "\n" not in str(info.value)
    assert parse(" + ".join(["g"] * 101)).depth == 100  # the bound itself parses (and its key is computed)
    assert parse(" * ".join(["g"] * 60) + " - " + " / ".join(["m"] * 41)).canonical_key
    # a depth-10 program that reuses each result on both sides formats to ~32,000 characters
    tokens = ("w1e-4", "w1e-3", "clip1e-5", "clip1e-4", "sub")
    for k in range(1, 10):
        tokens += (f"r{k}", f"r{k}", "clip1e-5", "log_abs", "sub")
    wide = Program(tokens)
    assert parse(wide.format()).canonical_key == wide.canonical_key
    # and random depth-10 programs round-trip
    masker, rng = Masker(get_space("full"), 10), np.random.default_rng(0)
    for _ in range(50):
        program = masker.sample(rng)
        assert parse(program.format()).canonical_key == program.canonical_key


@pytest.mark.parametrize("literal, plain", [
    ("drop(m, 0.1) / (exp(g^2) + eps)", "drop(m, 0.1) / exp(g^2)"),   # the paper's own spelling
    ("g / (sqrt|v| + ε)", "g / sqrt|v|"),
    ("m / [v + epsilon] * g", "m / v * g"),
    ("g / (m + v + eps)", "g / (m + v)"),
    ("exp(g / (m + eps))", "exp(g / m)"),
])
def test_the_papers_division_with_eps_is_the_languages_division(literal, plain):
    assert parse(literal) == parse(plain)
    assert parse(literal).tokens == parse(plain).tokens
    assert str(parse(literal)) == plain  # formatting keeps the canonical x / y form


@pytest.mark.parametrize("text", ["exp(g^2) + eps", "g / (eps)", "g / (eps + m)", "eps * g", "g / m + eps"])
def test_eps_outside_a_divisor_is_a_parse_error_that_says_where_it_belongs(text):
    with pytest.raises(ParseError, match=r"x / \(y \+ eps\)"):
        parse(text)


# ----------------------------------------------------------------------- canonical
@pytest.mark.parametrize(
    "a, b",
    [
        ("g * m", "m * g"),                                   # commutative *
        ("g + v + m", "m + (v + g)"),                         # associative, commutative +
        ("--g", "g"),                                         # double negation
        ("sign(sign(g))", "sign(g)"),
        ("ADAM", "m / sqrt|v|"),                              # Adam operand = 1-step Adam
        ("RMSProp", "g / sqrt(v)"),
    ],
)
def test_equivalent_strings_share_a_canonical_key(a, b):
    assert parse(a).canonical_key == parse(b).canonical_key


def test_figure2_adam_one_and_two_step_strings_share_a_key():
    one_step = Program(("m", "v", "id", "sqrt_abs", "div"))
    two_step = Program(("v", "g", "sqrt_abs", "id", "keep", "m", "r1", "id", "id", "div"))
    assert one_step.canonical_key == two_step.canonical_key == parse("ADAM").canonical_key


def test_keep_left_and_identity_do_not_change_the_key():
    assert Program(("g", "m", "id", "exp", "keep")).canonical_key == parse("g").canonical_key
    assert Program(("g", "m", "id", "id", "mul")).canonical_key == Program(("m", "g", "id", "id", "mul")).canonical_key


def test_different_rules_have_different_keys():
    keys = {parse(t).canonical_key for t in table1().values()}
    assert len(keys) == 20
    assert parse("g - m").canonical_key != parse("m - g").canonical_key
    assert parse("g / m").canonical_key != parse("m / g").canonical_key


# ---------------------------------------------------------------------- programs
def test_invalid_token_strings_are_rejected_with_the_reason():
    with pytest.raises(InvalidProgramError, match="5n tokens"):
        Program(("g", "m", "id", "id"))
    with pytest.raises(InvalidProgramError, match="not computed yet"):
        Program(("r1", "m", "id", "id", "add"))
    with pytest.raises(InvalidProgramError, match="must be a unary"):
        Program(("g", "m", "mul", "id", "add"))


def test_ids_round_trip_through_the_vocabulary():
    p = parse("(exp(sign(g) * sign(m)) + clip(g, 1e-4)) * g")
    vocab = Vocabulary(3)
    assert Program.from_ids(p.ids(vocab), vocab) == p
    assert len(vocab) == 16 + 2 + 12 + 5


# -------------------------------------------------------------------- spaces/masks
def test_space_sizes_span_the_papers_range():
    sizes = space_sizes()
    # the full section-4.1 space at depth 1: 16*15 operand pairs, 11^2 unaries, 4 binaries
    assert sizes["full"][1] == 16 * 15 * 11 * 11 * 4
    assert sizes["small"][2] > 1e6 and sizes["full"][2] > 1e9
    no_constraints = Constraints(False, False, False)
    assert get_space("full").size(1, no_constraints) == 16 * 16 * 11 * 11 * 5


def test_space_size_matches_brute_force_count():
    space = SearchSpace("tiny", ("g", "m", "one"), ("id", "exp"), ("add", "mul", "keep"))
    for constraints in (Constraints(), Constraints(False, False, False), Constraints(True, False, True)):
        masker = Masker(space, 2, constraints)
        count = 0

        def walk(prefix, masker=masker):
            nonlocal count
            if len(prefix) == masker.length:
                count += 1
                return
            for t in np.flatnonzero(masker.mask(prefix)):
                walk(prefix + [int(t)], masker)

        walk([])
        assert count == space.size(2, constraints)


def test_unknown_space_names_the_choices():
    with pytest.raises(ValueError, match="full"):
        get_space("nope")


# ---------------------------------------------------------------- property tests
def _program_strategy(constraints: Constraints = Constraints(False, False, False), space: str = "extended"):
    @st.composite
    def draw(draw_value):
        depth = draw_value(st.integers(1, 3))
        masker = Masker(get_space(space), depth, constraints)
        prefix: list[int] = []
        for _ in range(masker.length):
            choices = np.flatnonzero(masker.mask(prefix))
            prefix.append(int(choices[draw_value(st.integers(0, len(choices) - 1))]))
        return Program.from_ids(prefix, masker.vocab)

    return draw()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_program_strategy())
def test_random_programs_round_trip_format_parse_canonical(program):
    text = program.format()
    again = parse(text)
    assert again.canonical_key == program.canonical_key, text
    # formatting the parsed program reproduces the text exactly
    assert again.format() == text


_GRAMMAR_CHARS = "gmvyw1e-+*/^()[]|, .0123456789"
_WORDS = ["exp", "log", "clip", "drop", "sign", "sqrt", "noise", "ADAM", "RMSProp", "1e-4", "0.3", "g^2"]


@settings(max_examples=500, deadline=2000)
@given(st.one_of(st.text(max_size=60),
                 st.text(alphabet=_GRAMMAR_CHARS, max_size=60),
                 st.lists(st.sampled_from(_WORDS + list("()+*,|-")), max_size=20).map(" ".join)))
def test_garbage_raises_parse_error_or_parses(text):
    try:
        program = parse(text)
    except ParseError as err:
        assert 0 <= err.position <= len(text)
    else:
        assert isinstance(program, Program)
        assert parse(program.format()).canonical_key == program.canonical_key


def test_stochastic_rules_are_those_that_draw_and_sample_many_filters_them():
    from nos_gym.dsl import Masker, get_space

    assert parse("drop(g, 0.3)").stochastic and parse("noise * g").stochastic
    assert not parse("g * exp(sign(g) * sign(m))").stochastic
    # keep-left's right branch is never computed, so noise there draws nothing
    assert not Program(("g", "noise", "id", "id", "keep")).stochastic
    masker = Masker(get_space("full"), 2)
    drawn = masker.sample_many(40, seed=3)
    assert drawn == masker.sample_many(40, seed=3) and any(p.stochastic for p in drawn)
    clean = masker.sample_many(40, seed=3, distinct=True, deterministic=True)
    assert not any(p.stochastic for p in clean) and len({p.canonical_key for p in clean}) == 40
    with pytest.raises(ValueError, match="too few"):
        Masker(get_space("sign"), 1).sample_many(2_000, distinct=True)
