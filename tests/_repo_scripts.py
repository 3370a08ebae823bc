"""Load a file of the repository that is not part of the package (an example, the docs
extension) as a module, for the tests that exercise it; skip the calling test module when the
file is absent (e.g. a copy of the tests without examples/ or docs/ beside them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_repo_script(relpath: str, name: str) -> ModuleType:
    """Import ``ROOT/relpath`` under the module name ``name`` (call at module level)."""
    path = ROOT / relpath
    if not path.is_file():
        folder = Path(relpath).parts[0]
        pytest.skip(f"{folder}/ is not next to the tests", allow_module_level=True)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
