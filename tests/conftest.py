"""Set-up shared by every test folder. Each layer's folder (optim, core, data, baselines, app;
scripts/test_layout.py) has its own conftest.py with the fixtures its tests share; the helper
modules beside this file (_tables, _optim_helpers, _vision_fixtures, _repo_scripts) import from
any folder (pyproject's ``pythonpath``)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def layout_cache(tmp_path_factory):
    """The layouts measured by ``channels_last: auto`` (balanced_sam.layout) are remembered in a
    file of this session, not in the user's ~/.cache (subprocesses inherit it)."""
    old = os.environ.get("BSAM_LAYOUT_CACHE")
    os.environ["BSAM_LAYOUT_CACHE"] = str(tmp_path_factory.mktemp("layout") / "layouts.json")
    yield
    if old is None:
        os.environ.pop("BSAM_LAYOUT_CACHE", None)
    else:
        os.environ["BSAM_LAYOUT_CACHE"] = old


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test on one intra-op thread: the tensors here are tiny, and with two OpenMP
    threads on a busy 2-core machine a small CNN step can be 15x slower (spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
