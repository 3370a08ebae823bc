"""The suite's own layout (issue 18): every test module in its layer's folder as
scripts/test_layout.py's rule says, a conftest.py per folder, no test module importing another
(shared code lives in tests/_*.py), repository paths from ``_repo_scripts.ROOT``. A test file
added later at tests/ root fails here; ``python scripts/test_layout.py`` moves it."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess

import pytest
from _repo_scripts import ROOT, load_repo_script

layout = load_repo_script("scripts/test_layout.py", "test_layout_script")
TESTS = ROOT / "tests"


def test_every_test_file_is_in_its_folder():
    assert layout.test_files(TESTS), "no test files found"
    wrong = [f"{src.relative_to(ROOT)} -> {dest.relative_to(ROOT)}"
             for src, dest in layout.misplaced(TESTS)]
    assert not wrong, ("test files outside their folder; run `python scripts/test_layout.py`: "
                       + ", ".join(wrong))
    assert not list(TESTS.glob("test_*.py"))


def test_every_folder_has_a_conftest_and_only_the_layers_are_folders():
    for folder in layout.FOLDERS:
        assert (TESTS / folder / "conftest.py").is_file(), folder
    holding_tests = {p.parent.name for p in TESTS.glob("*/test_*.py")}
    assert holding_tests <= set(layout.FOLDERS), holding_tests


@pytest.mark.parametrize("name,folder", [
    ("test_optim_db.py", "optim"), ("test_reuse.py", "optim"), ("test_ccsam.py", "optim"),
    ("test_bins.py", "core"), ("test_losses.py", "core"), ("test_metrics.py", "core"),
    ("test_stats.py", "core"), ("test_data_agedb.py", "data"), ("test_tabular.py", "data"),
    ("test_own_images_cli.py", "data"), ("test_device_pipeline.py", "data"),
    ("test_baselines_fds.py", "baselines"), ("test_baseline_configs.py", "baselines"),
    ("test_lds.py", "baselines"), ("test_bench.py", "app"), ("test_executors.py", "app"),
    ("test_integrations_torchmetrics.py", "app"),  # not core: "metrics" is not its prefix
])
def test_the_rule(name, folder):
    assert layout.folder_for(name) == folder


@pytest.mark.parametrize("bad", ["conftest.py", "_tables.py", "test_x.txt", "tests/test_x.py"])
def test_the_rule_takes_only_test_module_names(bad):
    with pytest.raises(ValueError, match="filename must be a test module name"):
        layout.folder_for(bad)


def _modules():
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in layout.test_files(TESTS)]


def test_no_test_module_imports_another():
    """``from test_train import ...`` works only while both files share a folder (and then only
    by the order pytest collects them); shared code goes into a tests/_*.py helper module."""
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                      if n.split(".")[0].startswith("test_") or n.split(".")[0] == "conftest"]
    assert not found, found


def test_repository_paths_come_from_root():
    """A path counted up from the file's own place breaks when the file moves to another
    folder: use ``_repo_scripts.ROOT``."""
    pattern = re.compile(r"Path\(__file__\)(\.resolve\(\))?\.parents\b")
    found = [str(p.relative_to(ROOT)) for p in layout.test_files(TESTS)
             if pattern.search(p.read_text())]
    assert not found, found


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_script_moves_once_and_never_overwrites(tmp_path, capsys):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    tests = tmp_path / "tests"
    (tests / "optim").mkdir(parents=True)
    (tests / "test_optim_new.py").write_text("A = 1\n")      # tracked, at the root
    (tests / "test_cli_new.py").write_text("B = 2\n")        # untracked, at the root
    (tests / "optim" / "test_bench_x.py").write_text("C = 3\n")  # tracked, in the wrong folder
    (tests / "optim" / "test_optim.py").write_text("D = 4\n")    # in place
    git("init", "-q")
    git("add", "tests/test_optim_new.py", "tests/optim")
    git("commit", "-qm", "x")

    assert layout.main(["--check"], root=tmp_path) == 1
    assert "misplaced tests/test_cli_new.py (belongs in tests/app/test_cli_new.py)" \
        in capsys.readouterr().out
    assert layout.main([], root=tmp_path) == 0
    out = capsys.readouterr().out
    assert "moved tests/test_optim_new.py -> tests/optim/test_optim_new.py" in out
    assert "moved tests/optim/test_bench_x.py -> tests/app/test_bench_x.py" in out
    assert (tests / "app" / "test_cli_new.py").read_text() == "B = 2\n"
    assert (tests / "optim" / "test_optim.py").read_text() == "D = 4\n"
    assert not list(tests.glob("test_*.py"))
    staged = subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, text=True,
                            capture_output=True, check=True).stdout
    assert "R  tests/test_optim_new.py -> tests/optim/test_optim_new.py" in staged  # a git mv

    assert layout.main([], root=tmp_path) == 0  # idempotent
    assert "every test file is in its folder" in capsys.readouterr().out
    assert layout.main(["--check"], root=tmp_path) == 0

    (tests / "test_optim_new.py").write_text("mine\n")  # a second file of the same name
    with pytest.raises(SystemExit, match="refusing to overwrite tests/optim/test_optim_new.py"):
        layout.main([], root=tmp_path)
    assert (tests / "test_optim_new.py").read_text() == "mine\n"
    assert (tests / "optim" / "test_optim_new.py").read_text() == "A = 1\n"
