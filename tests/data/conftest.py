"""Fixtures of the data tests (tests/data)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _vision_fixtures import make_age_root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An AgeDB-DIR miniature (``make_age_root``, seed 0) in ``tmp_path/agedb``: the data root
    of this folder's AgeDB tests; a module about another dataset overrides it."""
    make_age_root(tmp_path / "agedb", "agedb")
    return tmp_path / "agedb"
