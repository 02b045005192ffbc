"""Comparisons shared by the numerics tests (imported by test modules; pytest puts tests/ on sys.path)."""

import torch


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over the finite entries, relative to b's largest magnitude; the non-finite
    entries (NaN, inf) must sit in the same places with the same values."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb), "non-finite entries differ"
    assert torch.equal(a[~fa].nan_to_num(), b[~fb].nan_to_num()), "non-finite entries differ"
    if not fa.any():
        return 0.0
    return ((a[fa] - b[fb]).abs().max() / b[fb].abs().max().clamp_min(1e-30)).item()
