"""scripts/bootstrap.sh: reuses a complete .venv without installing anything, and rebuilds
when pyproject.toml changes (checked with a stand-in .venv whose pip only records its calls)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time

import pytest
from _repo_scripts import ROOT

pytestmark = pytest.mark.e2e  # every test here runs the application end to end

SCRIPT = ROOT / "scripts" / "bootstrap.sh"
if not SCRIPT.is_file() or shutil.which("sh") is None:
    pytest.skip("no scripts/bootstrap.sh or no sh", allow_module_level=True)


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "bootstrap.sh")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    # the stand-in interpreter: `-m pip ...` is recorded, anything else runs for real
    fake = bin_ / "python"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> "{tmp_path}/pip.log"; exit 0; fi
exec "{sys.executable}" "$@"
""")
    fake.chmod(0o755)
    return tmp_path


def run(tree):
    t0 = time.perf_counter()
    r = subprocess.run(["sh", "scripts/bootstrap.sh"], cwd=tree, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    return r, time.perf_counter() - t0


def pip_calls(tree):
    log = tree / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def test_complete_venv_is_reused_and_a_changed_pyproject_rebuilds(tree):
    digest = hashlib.sha256((tree / "pyproject.toml").read_bytes()).hexdigest()
    (tree / ".venv" / ".bsam-complete").write_text(digest + "\n")
    r, seconds = run(tree)
    assert pip_calls(tree) == [] and r.stderr == ""
    assert seconds < 5  # nothing imported but importlib (torch is only looked up)

    (tree / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "2"\n')
    r, _ = run(tree)
    calls = pip_calls(tree)
    assert any("torch==" in c for c in calls)
    assert calls[-1].endswith("install -q -e .[dev]")
    assert "setting up .venv" in r.stderr
    new = hashlib.sha256((tree / "pyproject.toml").read_bytes()).hexdigest()
    assert (tree / ".venv" / ".bsam-complete").read_text().strip() == new

    n = len(calls)
    run(tree)  # complete again: no more installs
    assert len(pip_calls(tree)) == n
