"""Fixtures of the optimizer tests (tests/optim): float64 for the hand computations, the skewed
label bins. The factories they build on (data, tiny_model, make_optimizer...) are in
tests/_optim_helpers.py, for the tests that call them with their own sizes and seeds."""

from __future__ import annotations

import pytest
import torch
from _optim_helpers import skewed_bins as _skewed_bins


@pytest.fixture(scope="module")
def float64_default():
    """Run the module in float64: its hand computations compare at 1e-12. A module asks for it
    with ``pytestmark = pytest.mark.usefixtures("float64_default")``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def skewed_bins():
    """Bins 0..9 with training counts from 200 down to 1 (``_optim_helpers.skewed_bins()``)."""
    return _skewed_bins()
