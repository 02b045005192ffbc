"""The counter-based random streams: exact, uniform and normal, independent, position-free."""

import math

import pytest
import torch

from nos_gym.engine.random_streams import (
    hash64,
    mix64,
    normal,
    random_bits,
    site_keys,
    step_keys,
    stream_seed,
    uniform,
    uniform53,
)

N = 1_000_000


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


def _bits(key: int, n: int = N, start: int = 0) -> torch.Tensor:
    return random_bits(torch.tensor([key]), torch.arange(start, start + n))[0]


def test_tensor_hash_equals_the_integer_reference():
    # splitmix64's published first outputs from state 0 (Vigna's splitmix64.c): the finalizer is the one
    assert mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    assert [hash64(0, c) for c in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    seeds, sites = [0, -5, 2**62, -(2**63), 123456789], [0, 3, 7, 1 << 20, 2]
    keys = site_keys(seeds, sites)
    assert keys.tolist() == [_signed(hash64(s, site)) for s, site in zip(seeds, sites)]
    steps = torch.tensor([1, 2, 4000])
    st = step_keys(keys, steps)
    assert st.shape == (3, 5)
    assert st.tolist() == [[_signed(hash64(k, int(t))) for k in keys.tolist()] for t in steps]
    bits = random_bits(st, torch.arange(7))
    assert bits.shape == (3, 5, 7)
    assert bits[2, 3].tolist() == [_signed(hash64(int(st[2, 3]), i)) for i in range(7)]


@pytest.mark.parametrize("kind", ["uniform", "uniform53", "normal"])
def test_a_value_does_not_depend_on_the_tensor_it_is_computed_in(kind):
    # the same element alone, at the end of a long tensor (the scalar tail of a vector loop),
    # in a 2-D block: bit for bit the same (normal's log and cos are + - * / sqrt only)
    f = {"uniform": uniform, "uniform53": uniform53, "normal": normal}[kind]
    long = f(_bits(99, 1003))
    for i in (0, 1, 17, 1001, 1002):
        assert torch.equal(f(_bits(99, 1, start=i)), long[i: i + 1]), i
    block = f(random_bits(torch.tensor([[99, 7], [99, 8]]), torch.arange(1003)))
    assert torch.equal(block[0, 0], long) and torch.equal(block[1, 0], long)


def test_uniforms_are_uniform_on_their_grids():
    b = _bits(12345)
    u = uniform(b)
    assert u.dtype == torch.float32 and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, (u * 2**24).round())  # on the grid of 2^-24
    assert abs(float(u.double().mean()) - 0.5) < 5 * math.sqrt(1 / 12 / N)
    assert abs(float(u.double().var()) - 1 / 12) < 1e-3
    hist = torch.histc(u, bins=100, min=0.0, max=1.0)
    chi2 = float(((hist - N / 100) ** 2 / (N / 100)).sum())
    assert chi2 < 180  # 99 degrees of freedom: p ~ 1e-6
    u53 = uniform53(b)
    assert u53.dtype == torch.float64 and abs(float(u53.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / N)
    # the float32 uniform is the top 24 of the float64's 53 bits
    assert torch.equal(u.double(), torch.floor(u53 * 2**24) / 2**24)


def test_normals_are_standard_normal():
    z = normal(_bits(2024)).double()
    assert abs(float(z.mean())) < 5 / math.sqrt(N)
    assert abs(float(z.var()) - 1.0) < 5 * math.sqrt(2 / N)
    assert abs(float((z ** 3).mean())) < 0.02 and abs(float((z ** 4).mean()) - 3.0) < 0.05
    assert float(z.abs().max()) <= math.sqrt(2 * 24 * math.log(2)) + 1e-4  # u1 >= 2^-24
    # Kolmogorov-Smirnov against the normal CDF: 1.95 / sqrt(n) is the 0.1% critical value
    zs = z.sort().values
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    ks = max(float((torch.arange(1, N + 1) / N - cdf).max()), float((cdf - torch.arange(N) / N).max()))
    assert ks < 1.95 / math.sqrt(N)
    # the scale: noise = normal * std
    assert torch.equal(normal(_bits(2024, 10), 0.01), (normal(_bits(2024, 10)) * 0.01))


def test_streams_of_other_seeds_sites_steps_and_elements_are_unrelated():
    keys = site_keys([1, 2, 1], [0, 0, 1])          # seed 1 site 0, seed 2 site 0, seed 1 site 1
    u = uniform(random_bits(step_keys(keys, torch.tensor([1, 2])), torch.arange(200_000)))  # (steps, keys, n)
    flat = u.reshape(6, -1).double()
    corr = torch.corrcoef(flat)
    off = corr[~torch.eye(6, dtype=torch.bool)]
    assert float(off.abs().max()) < 0.015  # 200,000 pairs: |r| ~ 0.002
    assert float((flat[0] == flat[1]).double().mean()) < 1e-4  # no shared values beyond chance (2^-24)
    # neighbouring elements are unrelated too (the counter is the element index)
    assert abs(float(torch.corrcoef(torch.stack([flat[0, :-1], flat[0, 1:]]))[0, 1])) < 0.015


def test_stream_seeds_depend_on_task_seed_rule_and_draw_only():
    a = stream_seed(0, "add(g,noise)", 0)
    assert a == stream_seed(0, "add(g,noise)", 0)
    others = {stream_seed(1, "add(g,noise)", 0), stream_seed(0, "add(g,noise)", 1), stream_seed(0, "sub(g,noise)", 0)}
    assert a not in others and len(others) == 3
    assert all(-(2**63) <= s < 2**63 for s in others | {a})
    # pinned: the derivation is part of the semantics (a change needs a SEMANTICS_VERSION bump)
    assert a == _signed(hash64(hash64(hash64(0, 0), int.from_bytes(
        __import__("hashlib").sha256(b"add(g,noise)").digest()[:8], "little")), 0))


def test_a_block_of_many_rows_costs_a_fixed_number_of_kernels():
    # vectorised: one call for a (steps, rows, width) block; the rows are what one call per
    # row would give
    keys = site_keys(list(range(50)), [0] * 50)
    block = normal(random_bits(step_keys(keys, torch.arange(1, 4)), torch.arange(30)))
    assert block.shape == (3, 50, 30)
    one = normal(random_bits(step_keys(keys[17:18], torch.tensor([2])), torch.arange(30)))
    assert torch.equal(block[1, 17], one[0, 0])
