"""The shipped configs as package data: listing, look-up by name or path, copying, the command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from balanced_sam.configs import (
    CONFIG_DIR,
    cli_main,
    config_path,
    copy_config,
    describe,
    list_configs,
)

PAPER = [f"{d}_{m}" for d in ("agedb", "imdb_wiki") for m in
         ("vanilla", "sqinv", "sam", "imbsam", "bsam")] + [
    "nyud2_vanilla", "nyud2_sqinv", "nyud2_bsam"]


def test_configs_live_inside_the_package():
    import balanced_sam

    assert CONFIG_DIR.parent == Path(balanced_sam.__file__).resolve().parent
    names = list_configs()
    assert names == sorted(names)
    for n in PAPER + ["diamonds_bsam", "rotated_fashion_mnist_bsam"]:
        assert n in names, n
    for n in names:
        spec = yaml.safe_load(config_path(n).read_text())
        assert isinstance(spec, dict) and "train" in spec, n
        assert describe(n), f"{n} has no one-line description"


def test_config_path_by_name_with_or_without_suffix():
    a = config_path("agedb_bsam")
    assert a == CONFIG_DIR / "agedb_bsam.yaml" and a.is_file()
    assert config_path("agedb_bsam.yaml") == a
    # the repository's layout before the move keeps working (README commands, old scripts)
    assert config_path("configs/agedb_bsam.yaml") == a


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "agedb_bsam.yaml").write_text("train: {epochs: 1}\n")
    assert config_path("agedb_bsam.yaml").resolve() == (tmp_path / "agedb_bsam.yaml").resolve()
    # the bare name still means the shipped one (no file called "agedb_bsam" here)
    assert config_path("agedb_bsam") == CONFIG_DIR / "agedb_bsam.yaml"
    local = tmp_path / "sub" / "mine.yaml"
    local.parent.mkdir()
    local.write_text("train: {}\n")
    assert config_path(local) == local
    assert config_path(str(local)) == local


def test_unknown_names_list_close_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="agedb_bsam") as info:
        config_path("agedb_bsm")
    assert "close names" in str(info.value)
    with pytest.raises(FileNotFoundError, match="shipped configs: agedb_bni, agedb_bsam"):
        config_path("zzzzzzzz")
    # a path in another folder is never replaced by the shipped file of the same name
    with pytest.raises(FileNotFoundError, match="--config agedb_bsam") as info:
        config_path("elsewhere/agedb_bsam.yaml")
    assert "does not exist" in str(info.value)
    with pytest.raises(ValueError, match="folder"):
        config_path(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        config_path("")


def test_copy_config_never_overwrites_silently(tmp_path):
    dest = tmp_path / "new" / "folder"
    out = copy_config("diamonds_bsam.yaml", dest)
    assert out == dest / "diamonds_bsam.yaml"
    assert out.read_bytes() == (CONFIG_DIR / "diamonds_bsam.yaml").read_bytes()
    out.write_text("edited\n")
    with pytest.raises(FileExistsError, match="--force"):
        copy_config("diamonds_bsam", dest)
    assert out.read_text() == "edited\n"
    copy_config("diamonds_bsam", dest, overwrite=True)
    assert out.read_bytes() == (CONFIG_DIR / "diamonds_bsam.yaml").read_bytes()
    with pytest.raises(FileExistsError, match="folder"):
        copy_config("diamonds_bsam", out)
    with pytest.raises(FileNotFoundError, match="diamonds_bsam"):
        copy_config("diamond_bsam", tmp_path)


def test_cli_lists_shows_and_copies(tmp_path, capsys):
    assert cli_main([]) == 0
    out = capsys.readouterr().out
    for n in list_configs():
        assert n in out
    assert "AgeDB-DIR: SQINV + BSAM" in out
    assert cli_main(["nyud2_bsam"]) == 0
    assert capsys.readouterr().out == (CONFIG_DIR / "nyud2_bsam.yaml").read_text()
    assert cli_main(["nyud2_bsam", "--path"]) == 0
    assert capsys.readouterr().out.strip() == str(CONFIG_DIR / "nyud2_bsam.yaml")
    assert cli_main(["nyud2_bsam", "--copy", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "nyud2_bsam.yaml")
    assert cli_main(["nyud2_bsam", "--copy", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(["nyud2_bsm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bsam configs: error:") and "nyud2_bsam" in err
    assert cli_main(["--copy", str(tmp_path)]) == 2
    assert "need a config NAME" in capsys.readouterr().err


@pytest.mark.e2e
def test_module_runs_from_a_folder_outside_the_repository(tmp_path):
    r = subprocess.run([sys.executable, "-m", "balanced_sam.configs", "agedb_sam", "--copy",
                        "here"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "here" / "agedb_sam.yaml").is_file()
