"""Shared test set-up."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test on one intra-op thread: the tensors here are tiny, and with two OpenMP
    threads on a busy 2-core machine a small CNN step can be 15x slower (spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
