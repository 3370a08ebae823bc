"""Fixtures of the core tests (tests/core: bins, losses, metrics, stats)."""

from __future__ import annotations

import numpy as np
import pytest

from balanced_sam import LabelBins


@pytest.fixture
def bins():
    """Four bins of width 10, one per region: bin 0 holds 150 training samples (many), bin 1
    50 (medium), bin 2 5 (few), bin 3 none (few)."""
    return LabelBins(np.array([0.0, 10.0, 20.0, 30.0, 40.0]), [150, 50, 5, 0])
