"""The wheel and the sdist as a user gets them: what they hold, their metadata, and that the
installed package finds its configs from a folder outside the repository. The check that the
sdist's suite collects is slow (it imports every test module): `pytest -m slow`.

Builds with ``python -m build --no-isolation`` (the environment's setuptools, no download) from
a copy of the source tree, so the tree itself gets no build/ or egg-info. Skips when ``build``
or ``twine`` is not installed (``pip install 'balanced-sam[test]'``).
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from _repo_scripts import ROOT

pytestmark = pytest.mark.e2e  # every test here runs the application end to end

pytest.importorskip("build")
pytest.importorskip("twine")

SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "site", "*.egg-info",
                              "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("no pyproject.toml next to the tests (not a source tree)")
    src = tmp / "src-copy"
    shutil.copytree(ROOT, src, ignore=SKIP)
    out = tmp / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0], "tmp": tmp}


def test_wheel_holds_configs_typing_and_one_version(dists):
    import balanced_sam

    with zipfile.ZipFile(dists["wheel"]) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(
            z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    shipped = {p.name for p in (ROOT / "src" / "balanced_sam" / "configs").glob("*.yaml")}
    assert len(shipped) >= 19
    for name in shipped:
        assert f"balanced_sam/configs/{name}" in names, name
    assert "balanced_sam/configs/__init__.py" in names
    assert "balanced_sam/py.typed" in names
    assert not any(n.startswith(("tests/", "docs/")) for n in names)
    # one version string: the metadata's is balanced_sam.__version__
    assert meta["Version"] == balanced_sam.__version__
    assert dists["wheel"].name.startswith(f"balanced_sam-{balanced_sam.__version__}-")
    assert b"bsam = balanced_sam.cli:main" in entry
    # the package index's page and links
    assert meta["Description-Content-Type"] == "text/markdown"
    body = meta.get_payload()
    assert body.lstrip().startswith("# balanced-sam")
    assert "bootstrap" not in body[:1500]  # the repository's set-up is not the index's intro
    # no placeholder links: until the repository is published the index page says so instead
    assert not meta.get_all("Project-URL")
    assert "not yet published" in body
    # the [cli] extra does not bring plotnine (statsmodels and its formula stack) for one table
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("plotnine") and 'extra == "diamonds"' in r for r in requires)
    assert not any(r.startswith(("plotnine", "statsmodels")) and 'extra == "cli"' in r
                   for r in requires)
    extras = set(meta.get_all("Provides-Extra"))
    assert extras >= {"cli", "diamonds", "test", "docs", "lightning", "accelerate",
                      "torchmetrics", "wandb", "ray", "slurm", "all"}


def test_sdist_is_complete(dists):
    with tarfile.open(dists["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    need = ["LICENSE", "README.md", "pyproject.toml", "mkdocs.yml", "docs/pypi.md",
            "docs/index.md", "tests/conftest.py", "tests/_vision_fixtures.py",
            "tests/optim/conftest.py", "tests/optim/test_optim.py", "scripts/test_layout.py",
            "src/balanced_sam/configs/agedb_bsam.yaml",
            "src/balanced_sam/configs/__init__.py", "src/balanced_sam/py.typed"]
    for n in need:
        assert n in names, n
    tests_here = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")}
    assert tests_here <= names, sorted(tests_here - names)
    examples_here = {str(p.relative_to(ROOT)) for p in (ROOT / "examples").rglob("*.py")}
    assert examples_here <= names, sorted(examples_here - names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_twine_check_passes(dists):
    r = _run([sys.executable, "-m", "twine", "check", "--strict", str(dists["wheel"]),
              str(dists["sdist"])])
    assert r.stdout.count("PASSED") == 2, r.stdout


_OUTSIDE = """
import contextlib, io, sys
import balanced_sam
from balanced_sam.cli import main
from balanced_sam.configs import cli_main
print("FILE", balanced_sam.__file__)
assert cli_main([]) == 0
assert cli_main(["diamonds_bsam", "--copy", "mine"]) == 0
buf = io.StringIO()
with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
    main(["--version"])
print("VERSION", buf.getvalue().strip())
"""


def test_installed_wheel_finds_its_configs_outside_the_repository(dists):
    import balanced_sam

    site = dists["tmp"] / "site"
    with zipfile.ZipFile(dists["wheel"]) as z:
        z.extractall(site)
    work = dists["tmp"] / "elsewhere"
    work.mkdir()
    # one interpreter (importing torch once): the unpacked wheel first on the path
    r = _run([sys.executable, "-c", _OUTSIDE], cwd=work,
             env={**os.environ, "PYTHONPATH": str(site)})
    lines = r.stdout.splitlines()
    (file_line,) = [ln for ln in lines if ln.startswith("FILE ")]
    assert Path(file_line[5:]).is_relative_to(site)
    assert any(ln.strip().startswith("agedb_bsam ") for ln in lines)
    assert str(site) in r.stdout  # the listing names the installed folder
    assert (work / "mine" / "diamonds_bsam.yaml").is_file()
    assert f"VERSION balanced-sam {balanced_sam.__version__}" in lines


@pytest.mark.slow
def test_sdist_suite_collects(dists):
    """The suite from the sdist imports and collects (conftest and fixtures included)."""
    with tarfile.open(dists["sdist"]) as t:
        t.extractall(dists["tmp"] / "sd", filter="data")
    (top,) = (dists["tmp"] / "sd").iterdir()
    env = {**os.environ, "PYTHONPATH": str(top / "src"), "OMP_NUM_THREADS": "1"}
    r = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
              "-m", ""], cwd=top, env=env)
    n = int(r.stdout.strip().splitlines()[-1].split()[0])
    assert n >= 200, r.stdout[-500:]
