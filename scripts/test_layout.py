"""Where each test file lives: tests/<layer>/test_*.py, one folder per layer of the package.

    python scripts/test_layout.py            # git mv every misplaced test file into its folder
    python scripts/test_layout.py --check    # list the misplaced files, exit 1 if any (no moves)

The rule (``folder_for``) is an explicit table of names, then prefixes, then ``app``:

* ``optim``     the optimizers (SAM, BalancedSAM, ImbSAM, their driver and weighting);
* ``core``      the rest of the core layer under them: bins, losses, metrics, stats;
* ``data``      datasets, loaders, augmentation, the device pipeline;
* ``baselines`` the baseline plug-ins (losses, regularisers, FDS, RnC, LDS);
* ``app``       everything above: models, loop, runs, bench, CLI, integrations, docs, packaging.

Moving is idempotent (a file already in its folder is left alone), prints each move, and refuses
to overwrite: if the destination exists it stops before moving anything. Untracked files are
renamed without git. Both forms then list what in a test file breaks in folders, with the fix
(``problems``: an import of another test module, a path counted up from the file's own place,
the float64 fixture imported from _optim_helpers). tests/app/test_layout.py fails when a test
file is not where this rule puts it or has one of those problems, so a file added later at
tests/ root is caught by the suite; rerun this script to move it.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
FOLDERS = ("optim", "core", "data", "baselines", "app")
DEFAULT = "app"

#: exact module names (without ``.py``), checked first
EXACT = {
    "test_other_sam": "optim",  # BalancedSAM(update_weighting="same") against a plain SAM
    "test_lds": "baselines",
    "test_tabular": "data",
    "test_rotated_mnist": "data",
    "test_gpu_augment": "data",
    "test_device_pipeline": "data",
}
#: name prefixes, checked in order after EXACT
PREFIXES = (
    ("test_optim", "optim"),
    ("test_reuse", "optim"),
    ("test_ccsam", "optim"),
    ("test_bins", "core"),
    ("test_losses", "core"),
    ("test_metrics", "core"),
    ("test_stats", "core"),
    ("test_data_", "data"),
    ("test_own_images", "data"),
    ("test_baseline", "baselines"),  # test_baselines_*, test_baseline_configs
)
_TEST_FILE = re.compile(r"test_\w*\.py")


def folder_for(filename: str) -> str:
    """The folder (one of FOLDERS) that the test file ``filename`` (a base name) belongs in."""
    if not _TEST_FILE.fullmatch(filename):
        raise ValueError(f"filename must be a test module name test_*.py, got {filename!r}")
    stem = filename[:-3]
    if stem in EXACT:
        return EXACT[stem]
    for prefix, folder in PREFIXES:
        if stem.startswith(prefix):
            return folder
    return DEFAULT


def test_files(tests: Path = TESTS) -> list[Path]:
    """Every test module at ``tests`` root or one folder below it."""
    found = [*tests.glob("test_*.py"), *tests.glob("*/test_*.py")]
    return sorted(p for p in found if p.is_file())


def misplaced(tests: Path = TESTS) -> list[tuple[Path, Path]]:
    """(where it is, where the rule puts it) for each test module that is not in its folder."""
    moves = []
    for path in test_files(tests):
        dest = tests / folder_for(path.name) / path.name
        if path != dest:
            moves.append((path, dest))
    return moves


_COUNTED_UP = re.compile(r"Path\(__file__\)(\.resolve\(\))?\.parents\b")


def problems(path: Path) -> list[str]:
    """What in the test module ``path`` breaks when test files live in folders, each with its
    fix: importing another test module (it resolves only while both share a folder, and then by
    collection order), a path counted up from the file's own place, and the float64 fixture
    imported from _optim_helpers (it is a tests/optim/conftest.py fixture, asked for by name)."""
    found = []
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as e:  # e.g. a merge's conflict markers: the rest can wait
        return [f"line {e.lineno}: does not parse ({e.msg}); resolve it, then rerun"]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [(node.module, [a.name for a in node.names])]
        else:
            continue
        for module, names in modules:
            top = module.split(".")[0]
            if top.startswith("test_") or top == "conftest":
                found.append(f"line {node.lineno}: imports the test module {module}; move what "
                             "it shares into a tests/_*.py helper module")
            if top == "_optim_helpers" and "float64_default" in names:
                found.append(f"line {node.lineno}: imports float64_default; write pytestmark = "
                             "pytest.mark.usefixtures(\"float64_default\") instead")
    if _COUNTED_UP.search(path.read_text()):
        found.append("Path(__file__).parents: use ROOT from _repo_scripts (the repository root)")
    return found


def _tracked(path: Path, root: Path) -> bool:
    done = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=root,
                          capture_output=True)
    return done.returncode == 0


def apply(moves: list[tuple[Path, Path]], root: Path = ROOT) -> None:
    """Move each file (git mv when tracked in the repository at ``root``); refuse before moving
    anything if a destination exists or two files would land on the same path."""
    dests = [d for _, d in moves]
    clashes = sorted({str(d.relative_to(root)) for d in dests if d.exists() or dests.count(d) > 1})
    if clashes:
        raise SystemExit("test_layout: refusing to overwrite " + ", ".join(clashes)
                         + " (merge the two files by hand, then rerun)")
    for src, dest in moves:
        dest.parent.mkdir(exist_ok=True)
        if _tracked(src, root):
            subprocess.run(["git", "mv", str(src), str(dest)], cwd=root, check=True)
        else:
            src.rename(dest)
        print(f"moved {src.relative_to(root)} -> {dest.relative_to(root)}")


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only list the misplaced test files; exit 1 if there are any")
    args = parser.parse_args(argv)
    moves = misplaced(root / "tests")
    if args.check:
        for src, dest in moves:
            print(f"misplaced {src.relative_to(root)} (belongs in {dest.relative_to(root)})")
    else:
        apply(moves, root)
    if not moves:
        print("test_layout: every test file is in its folder")
    for path in test_files(root / "tests"):
        for problem in problems(path):
            print(f"fix {path.relative_to(root)}: {problem}")
    return 1 if args.check and moves else 0


if __name__ == "__main__":
    sys.exit(main())
