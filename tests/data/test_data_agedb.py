"""AgeDB-DIR: the on-disk format, the recipe's samples, the cache, clear errors, prepare."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _repo_scripts import ROOT

from balanced_sam import LabelBins
from balanced_sam.data import agedb, prepare
from balanced_sam.data.images import (
    CorruptImageError,
    CSVFormatError,
    DatasetNotFoundError,
    MissingImagesError,
)

SHARED_CSV = ROOT.parent / "shared" / "data" / "agedb.csv"


# `root`: tests/data/conftest.py's AgeDB-DIR miniature


def test_splits_shapes_and_labels(root: Path) -> None:
    splits = agedb.build_splits(root, img_size=16)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [14, 4, 5]
    df = pd.read_csv(root / "agedb.csv")
    for split in ("train", "val", "test"):
        ds = splits[split]
        img, age = ds[0]
        assert img.shape == (3, 16, 16) and img.dtype == torch.float32
        assert age.shape == () and age.dtype == torch.float32
        assert float(age) == float(df[df["split"] == split]["age"].iloc[0])
        assert float(img.min()) >= -1.0 - 1e-6 and float(img.max()) <= 1.0 + 1e-6
    # evaluation is deterministic, training is augmented
    a, b = splits["test"][1][0], splits["test"][1][0]
    assert torch.equal(a, b)
    torch.manual_seed(0)
    draws = torch.stack([splits["train"][2][0] for _ in range(4)])
    assert float((draws - draws[0]).abs().max()) > 0.01


def test_train_labels_match_csv(root: Path) -> None:
    y = agedb.train_labels(root)
    assert y.dtype == torch.float32
    assert y.tolist() == [1, 5, 5, 20, 20, 20, 31, 31, 31, 31, 59, 60, 80, 101]


def test_cache_gives_same_eval_images_and_fills(root: Path, tmp_path_factory) -> None:
    cdir = tmp_path_factory.mktemp("cache")
    plain = agedb.build_splits(root, img_size=16)["test"]
    cached = agedb.build_splits(root, img_size=16, cache=cdir)["test"]
    assert cached.cache is not None and cached.cache.num_filled == 0
    first = [cached[i][0] for i in range(len(cached))]
    assert cached.cache.num_filled == len(cached)
    again = agedb.build_splits(root, img_size=16, cache=cdir)["test"]
    for i in range(len(again)):
        assert torch.equal(again[i][0], first[i])
        assert again[i][0].shape == plain[i][0].shape
    # what is stored: the shorter side resized to round(16 * 256 / 224) = 18, centre 18 x 18
    from torchvision.transforms import functional as TF

    from balanced_sam.data.images import open_rgb

    rec = again.cache.get(3)["rgb"]
    want = TF.center_crop(TF.resize(open_rgb(root / again.paths[3]), 18), [18, 18])
    assert rec.shape == (18, 18, 3) and np.array_equal(rec, np.asarray(want))
    # the cache travels to DataLoader workers (pickled without its memory maps)
    loader = torch.utils.data.DataLoader(again, batch_size=2, num_workers=2)
    batch = next(iter(loader))
    assert batch[0].shape == (2, 3, 16, 16)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist") as err:
        agedb.build_splits(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(FileNotFoundError, match="agedb.csv"):
        agedb.build_splits(tmp_path)  # root exists, CSV does not


def test_missing_images_named(root: Path) -> None:
    df = pd.read_csv(root / "agedb.csv")
    gone = df["path"].tolist()[:7]
    for rel in gone:
        (root / rel).unlink()
    with pytest.raises(MissingImagesError) as err:
        agedb.build_splits(root)
    msg = str(err.value)
    assert "7 AgeDB-DIR images" in msg and "(and 2 more)" in msg
    assert all(rel in msg for rel in gone[:5]) and gone[6] not in msg
    assert err.value.missing == gone
    assert "ibug.doc.ic.ac.uk" in msg


def test_corrupt_image_named(root: Path) -> None:
    df = pd.read_csv(root / "agedb.csv")
    bad = df[df["split"] == "test"]["path"].iloc[2]
    (root / bad).write_bytes(b"not a jpeg at all")
    with pytest.raises(CorruptImageError, match="cannot decode") as err:
        agedb.build_splits(root, verify="decode")
    assert bad in str(err.value)
    test = agedb.build_splits(root)["test"]  # existence check passes; reading fails clearly
    test[0]
    with pytest.raises(CorruptImageError) as err:
        test[2]
    assert str(root / bad) == err.value.path


def test_csv_columns_and_values(root: Path) -> None:
    df = pd.read_csv(root / "agedb.csv")
    df.rename(columns={"age": "label"}).to_csv(root / "agedb.csv", index=False)
    with pytest.raises(CSVFormatError) as err:
        agedb.build_splits(root)
    msg = str(err.value)
    assert "['age', 'path', 'split']" in msg and "['label', 'path', 'split']" in msg
    df.assign(split=df["split"].replace("val", "valid")).to_csv(root / "agedb.csv", index=False)
    with pytest.raises(CSVFormatError, match="valid"):
        agedb.build_splits(root)
    df.assign(age=df["age"].astype(object).where(df.index != 3, "old")).to_csv(
        root / "agedb.csv", index=False)
    with pytest.raises(CSVFormatError, match="row 5 has 'old'"):
        agedb.train_labels(root)


def test_real_split_csv_facts(tmp_path: Path) -> None:
    if not SHARED_CSV.is_file():
        pytest.skip(f"reference split CSV not present at {SHARED_CSV}")
    shutil.copy(SHARED_CSV, tmp_path / "agedb.csv")
    df = agedb.read_age_csv(tmp_path / "agedb.csv", "AgeDB-DIR CSV")
    assert df["split"].value_counts().to_dict() == {"train": 12208, "val": 2140, "test": 2140}
    assert df["path"].str.startswith("AgeDB/").all()
    y = agedb.train_labels(tmp_path)
    bins = LabelBins.from_labels(y, bin_width=1.0, lower=0.0, upper=121.0)
    assert bins.region_counts() == {"many": 51, "medium": 16, "few": 33}
    w = bins.sample_weights(y, "sqrt_inv", normalize="none")
    assert float(w.mean()) == pytest.approx(0.0765, abs=5e-5)
    # no images here: building the datasets names the missing ones
    with pytest.raises(MissingImagesError, match="16488 AgeDB-DIR images"):
        agedb.build_splits(tmp_path)


# ------------------------------------------------------------------------------ prepare
def test_prepare_offline_names_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(prepare.URLS, "agedb.csv", "http://127.0.0.1:9/agedb.csv")
    lines: list[str] = []
    with pytest.raises(prepare.DatasetNotReadyError) as err:
        prepare.prepare_dataset("agedb", tmp_path / "agedb", echo=lines.append)
    msg = str(err.value)
    assert str(tmp_path / "agedb" / "agedb.csv") in msg
    assert "get it from http://127.0.0.1:9/agedb.csv" in msg
    assert any("could not download http://127.0.0.1:9/agedb.csv" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "agedb").iterdir()) == []  # no partial file left
    with pytest.raises(prepare.DatasetNotReadyError):
        prepare.prepare_dataset("agedb", tmp_path / "agedb", download=False, echo=lambda s: None)


def test_prepare_fetches_checks_sha_and_reports_images(tmp_path: Path, monkeypatch) -> None:
    if not SHARED_CSV.is_file():
        pytest.skip(f"reference split CSV not present at {SHARED_CSV}")
    calls: list[str] = []

    def fake_fetch(url: str, dest: Path, timeout: float = 30.0) -> None:
        calls.append(url)
        shutil.copy(SHARED_CSV, dest)

    monkeypatch.setattr(prepare, "fetch", fake_fetch)
    with pytest.raises(prepare.DatasetNotReadyError) as err:
        prepare.prepare_dataset("agedb", tmp_path, echo=lambda s: None)
    assert calls == [prepare.URLS["agedb.csv"]]
    digest = hashlib.sha256((tmp_path / "agedb.csv").read_bytes()).hexdigest()
    assert digest == prepare.SHA256["agedb.csv"]
    msg = str(err.value)
    assert "16488 listed files missing" in msg and "AgeDB/11706_OliviaHussey_31_f.jpg" in msg
    assert "ibug.doc.ic.ac.uk/resources/agedb" in msg


def test_prepare_rejects_bad_checksum(tmp_path: Path, monkeypatch) -> None:
    def fake_fetch(url: str, dest: Path, timeout: float = 30.0) -> None:
        dest.write_text("age,path,split\n1,a.jpg,train\n")

    monkeypatch.setattr(prepare, "fetch", fake_fetch)
    lines: list[str] = []
    with pytest.raises(prepare.DatasetNotReadyError):
        prepare.prepare_dataset("agedb", tmp_path, echo=lines.append)
    assert not (tmp_path / "agedb.csv").exists()
    assert any("expected ab9f8d4c" in line for line in lines)


def test_prepare_keeps_user_files_and_succeeds(root: Path, monkeypatch) -> None:
    before = (root / "agedb.csv").read_bytes()
    monkeypatch.setattr(prepare, "fetch", lambda *a, **k: pytest.fail("must not download"))
    lines: list[str] = []
    report = prepare.prepare_dataset("agedb", root, echo=lines.append)
    assert report["ok"] and report["missing"] == []
    assert (root / "agedb.csv").read_bytes() == before
    assert any("differs from the released file" in n for n in report["notes"])
    assert any("23 AgeDB images" in p for p in report["present"])


def test_prepare_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="agedb, imdb-wiki, nyud2"):
        prepare.prepare_dataset("cifar", tmp_path)
