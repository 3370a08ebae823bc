"""The suite's own layout (issue 18): every test module in its layer's folder as
scripts/test_layout.py's rule says, a conftest.py per folder, no test module importing another
(shared code lives in tests/_*.py), repository paths from ``_repo_scripts.ROOT``. A test file
added later at tests/ root fails here; ``python scripts/test_layout.py`` moves it."""

from __future__ import annotations

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
    ("test_other_sam.py", "optim"), ("test_bench_executors.py", "app"),
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


def test_no_test_file_has_a_problem_of_the_folders():
    """No test module imports another (shared code goes into a tests/_*.py helper), counts a
    path up from its own place, or imports the float64 fixture (see ``layout.problems``)."""
    found = {str(p.relative_to(ROOT)): layout.problems(p) for p in layout.test_files(TESTS)}
    assert not {k: v for k, v in found.items() if v}


def test_the_problems_are_found(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("from pathlib import Path\nimport test_train\nfrom test_bench import x\n"
                   "from _optim_helpers import data, float64_default\n"
                   "ROOT = Path(__file__).resolve()" ".parents[1]\n")  # split: not this file's
    got = layout.problems(bad)
    assert len(got) == 4, got
    assert got[0].startswith("line 2: imports the test module test_train")
    assert got[1].startswith("line 3: imports the test module test_bench")
    assert "usefixtures" in got[2] and "_repo_scripts" in got[3]
    good = tmp_path / "test_good.py"
    good.write_text("import testing_tools\nfrom _tables import abc_csv\n"
                    "from _repo_scripts import ROOT\n")
    assert layout.problems(good) == []
    merged = tmp_path / "test_merged.py"
    merged.write_text("def f():\n<<<<<<< HEAD\n    return 1\n")
    (told,) = layout.problems(merged)  # the parser's words vary with the Python version
    assert told.startswith("line 2: does not parse (") and told.endswith("resolve it, then rerun")


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
