"""Fixtures of the application tests (tests/app: loop, runs, bench, CLI, integrations)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _tables import write_long_tail_csv


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """The generated long-tailed table (600 rows, seed 0; ``_tables.write_long_tail_csv``) as
    a CSV with target column ``target``: small and fast for ``bsam bench``."""
    path = tmp_path_factory.mktemp("tbl") / "table.csv"
    write_long_tail_csv(path, n=600)
    return path
