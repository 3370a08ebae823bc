"""Fixtures of the baseline tests (tests/baselines: losses, regularisers, FDS, RnC, LDS)."""

from __future__ import annotations

import pytest
from _tables import long_tail_ints

from balanced_sam import LabelBins


@pytest.fixture
def int_batch():
    """64 rows of ``long_tail_ints`` (seed 0, integer labels 0..39) and their bins of width 1
    over [0, 40]: one batch with repeated labels and a long tail."""
    x, y = long_tail_ints(64)
    return x, y, LabelBins.from_labels(y, bin_width=1, lower=0, upper=40)
