"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in every test: deterministic kernels, and the 2-core CI box is shared
    (two threads on a busy 2-core machine stall far more than they gain)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compiling_fails(monkeypatch):
    """torch.compile made unavailable, as on a machine without a C++ compiler: nos_gym.engine.fused's
    compile step raises, and its "already warned" flag is reset so that the warning is seen."""
    from nos_gym.engine import fused

    def broken(fn):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(fused, "_unavailable", None)
    monkeypatch.setattr(fused, "_compile", broken)

