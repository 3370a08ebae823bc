"""IMDB-WIKI-DIR: CSV datasets, the split rebuilt from the .mat metadata, prepare."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _vision_fixtures import (  # noqa: F401
    _jpeg,
    make_age_root,
    matlab_datenum,
    write_imdb_mat,
)

from balanced_sam.data import imdb_wiki, prepare
from balanced_sam.data.images import CSVFormatError, DatasetNotFoundError, MissingImagesError


def test_splits_from_csv(tmp_path: Path) -> None:
    make_age_root(tmp_path, "imdb_wiki")
    splits = imdb_wiki.build_splits(tmp_path, img_size=12)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [14, 4, 5]
    img, age = splits["val"][3]
    assert img.shape == (3, 12, 12) and float(age) == 59.0
    assert splits["train"].paths[0].startswith("wiki_crop/00/")
    assert imdb_wiki.train_labels(tmp_path).shape == (14,)
    (tmp_path / "imdb_crop" / "01").rename(tmp_path / "imdb_crop" / "x")
    with pytest.raises(MissingImagesError, match="imdb_crop/01/"):
        imdb_wiki.build_splits(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="imdb_wiki.csv"):
        imdb_wiki.build_splits(tmp_path / "imdb_crop")


def test_matlab_age_matches_the_datetime_rule() -> None:
    rng = np.random.default_rng(0)
    dob = rng.uniform(matlab_datenum(dt.date(1900, 1, 1)), matlab_datenum(dt.date(2005, 12, 31)),
                      size=300)
    taken = rng.integers(1990, 2016, size=300)
    got = imdb_wiki.matlab_age(dob, taken)
    for d, t, g in zip(dob, taken, got):
        birth = dt.datetime.fromordinal(max(int(d) - 366, 1))
        assert g == (t - birth.year if birth.month < 7 else t - birth.year - 1)
    # born 1899-05-10 (in the IMDB file name of the docs), photo 1968 -> 69; born in July -> 68
    assert imdb_wiki.matlab_age([matlab_datenum(dt.date(1899, 5, 10))], [1968])[0] == 69
    assert imdb_wiki.matlab_age([matlab_datenum(dt.date(1899, 7, 1))], [1968])[0] == 68
    assert imdb_wiki.matlab_age([np.nan], [1968])[0] == -1


def _entries(db: str, n_by_age: dict[int, int]) -> list[dict]:
    out = []
    for age, n in n_by_age.items():
        for i in range(n):
            out.append({"path": f"{age:02d}/{db}_{age}_{i}.jpg", "dob": dt.date(1950, 3, 1),
                        "taken": 1950 + age, "face": 2.5, "second": np.nan})
    return out


def _write_mats(root: Path) -> None:
    imdb = _entries("imdb", {30: 10, 40: 4, 50: 2})
    imdb += [
        {"path": "99/noface.jpg", "dob": dt.date(1950, 3, 1), "taken": 1980, "face": -np.inf,
         "second": np.nan},
        {"path": "99/weak.jpg", "dob": dt.date(1950, 3, 1), "taken": 1980, "face": 0.9,
         "second": np.nan},
        {"path": "99/two.jpg", "dob": dt.date(1950, 3, 1), "taken": 1980, "face": 3.0,
         "second": 1.2},
        {"path": "99/neg.jpg", "dob": dt.date(1990, 3, 1), "taken": 1980, "face": 3.0,
         "second": np.nan},
        {"path": "99/second0.jpg", "dob": dt.date(1950, 9, 1), "taken": 2010, "face": 1.0,
         "second": 0.0},
    ]
    write_imdb_mat(root, "imdb", imdb)
    write_imdb_mat(root, "wiki", _entries("wiki", {30: 2, 150: 1}))


def test_split_from_mat_follows_the_dir_rule(tmp_path: Path) -> None:
    _write_mats(tmp_path)
    df = imdb_wiki.make_split_from_mat(tmp_path, max_per_age=3)
    assert list(df.columns) == ["age", "path", "split"]
    paths = set(df["path"])
    for dropped in ("noface", "weak", "two", "neg"):  # no face, score < 1, two faces, age < 0
        assert not any(dropped in p for p in paths)
    row = df[df["path"] == "imdb_crop/99/second0.jpg"]
    assert row["age"].item() == 59  # born in September 1950, photo 2010
    counts = df.groupby(["age", "split"]).size().unstack(fill_value=0)
    # age 30: 12 images -> min(12 // 3, 3) = 3 val, 3 test; age 40: 4 -> 1 and 1; age 50: 2 -> 0
    assert counts.loc[30].to_dict() == {"test": 3, "train": 6, "val": 3}
    assert counts.loc[40].to_dict() == {"test": 1, "train": 2, "val": 1}
    assert counts.loc[50, "train"] == 2 and counts.loc[50, ["val", "test"]].sum() == 0
    # ages above 120 stay in train (the paper's range is 0-186), never in val/test
    assert df[df["age"] == 150]["split"].tolist() == ["train"]
    assert df[df["path"].str.startswith("wiki_crop/")].shape[0] == 3
    again = imdb_wiki.make_split_from_mat(tmp_path, max_per_age=3)
    assert again.equals(df)  # fixed seed


def test_mat_without_fields(tmp_path: Path) -> None:
    from scipy.io import savemat

    (tmp_path / "imdb_crop").mkdir()
    savemat(tmp_path / "imdb_crop" / "imdb.mat", {"imdb": {"dob": np.ones((1, 2))}})
    with pytest.raises(CSVFormatError, match="lacks field"):
        imdb_wiki.read_mat_meta(tmp_path / "imdb_crop" / "imdb.mat", "imdb")


def test_prepare_builds_csv_from_mat_offline(tmp_path: Path, monkeypatch) -> None:
    _write_mats(tmp_path)
    rng = np.random.default_rng(1)
    df = imdb_wiki.make_split_from_mat(tmp_path)
    for rel in df["path"]:
        _jpeg(tmp_path / rel, rng, (10, 12))
    monkeypatch.setitem(prepare.URLS, "imdb_wiki.csv", "http://127.0.0.1:9/imdb_wiki.csv")
    lines: list[str] = []
    report = prepare.prepare_dataset("imdb-wiki", tmp_path, echo=lines.append)
    assert report["ok"]
    assert any("could not download http://127.0.0.1:9/imdb_wiki.csv" in n
               for n in report["notes"])
    assert any("from the .mat metadata" in b for b in report["built"])
    built = pd.read_csv(tmp_path / "imdb_wiki.csv")
    assert len(built) == len(df) == 20
    splits = imdb_wiki.build_splits(tmp_path, img_size=8)
    x, y = splits["train"][0]
    assert x.shape == (3, 8, 8) and y.dtype == torch.float32
    # a second run changes nothing
    before = (tmp_path / "imdb_wiki.csv").read_bytes()
    prepare.prepare_dataset("imdb-wiki", tmp_path, download=False, echo=lambda s: None)
    assert (tmp_path / "imdb_wiki.csv").read_bytes() == before


def test_prepare_offline_without_anything(tmp_path: Path, monkeypatch) -> None:
    for key in ("imdb_wiki.csv", "imdb_crop.tar", "wiki_crop.tar"):
        monkeypatch.setitem(prepare.URLS, key, f"http://127.0.0.1:9/{key}")
    with pytest.raises(prepare.DatasetNotReadyError) as err:
        prepare.prepare_dataset("imdb-wiki", tmp_path, echo=lambda s: None)
    msg = str(err.value)
    assert "imdb_wiki.csv" in msg and "imdb_crop/imdb.mat" in msg and "wiki_crop/wiki.mat" in msg
    assert list(tmp_path.iterdir()) == []


def test_prepare_unpacks_a_user_tar_and_keeps_it(tmp_path: Path, monkeypatch) -> None:
    import tarfile

    src = tmp_path / "src"
    _write_mats(src)
    rng = np.random.default_rng(2)
    df = imdb_wiki.make_split_from_mat(src)
    for rel in df["path"]:
        _jpeg(src / rel, rng, (10, 12))
    root = tmp_path / "root"
    root.mkdir()
    for db in ("imdb", "wiki"):
        with tarfile.open(root / f"{db}_crop.tar", "w") as tf:
            tf.add(src / f"{db}_crop", arcname=f"{db}_crop")
    monkeypatch.setattr(prepare, "fetch", lambda *a, **k: (_ for _ in ()).throw(OSError("off")))
    report = prepare.prepare_dataset("imdb-wiki", root, echo=lambda s: None)
    assert report["ok"]
    assert (root / "imdb_crop.tar").is_file() and (root / "wiki_crop.tar").is_file()
    assert (root / "imdb_crop" / "imdb.mat").is_file()
    assert len(pd.read_csv(root / "imdb_wiki.csv")) == len(df)
