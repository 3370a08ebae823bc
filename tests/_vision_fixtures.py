"""Miniature copies of the image benchmarks' on-disk formats, written into a temporary folder.

* AgeDB-DIR / IMDB-WIKI-DIR: tiny RGB JPEGs and an ``age,path,split`` CSV;
* IMDB-WIKI metadata: ``{db}_crop/{db}.mat`` structs as the ETH release lays them out;
* NYUD2-DIR: RGB JPEG + 8-bit depth PNG (train), RGB PNG + 16-bit depth PNG in mm (test),
  ``data/nyu2_train.csv`` / ``data/nyu2_test.csv`` without header;
* MNIST-format IDX folders.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from PIL import Image

from balanced_sam.data.idx import write_idx


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (16, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def make_age_root(root: Path, kind: str = "agedb", ages: dict[str, list[int]] | None = None,
                  seed: int = 0) -> Path:
    """An AgeDB-DIR (``kind="agedb"``) or IMDB-WIKI-DIR (``"imdb_wiki"``) miniature: one JPEG per
    row, sizes between 12 and 20 pixels; returns the CSV path."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    ages = ages or {"train": [1, 5, 5, 20, 20, 20, 31, 31, 31, 31, 59, 60, 80, 101],
                    "val": [5, 20, 31, 59], "test": [5, 20, 31, 60, 80]}
    rows = []
    for split, values in ages.items():
        for i, a in enumerate(values):
            if kind == "agedb":
                rel = f"AgeDB/{len(rows):05d}_Person{split}{i}_{a}_f.jpg"
            else:
                db = "imdb_crop" if len(rows) % 2 else "wiki_crop"
                rel = f"{db}/{len(rows) % 100:02d}/nm{len(rows):07d}_rm1_1970-1-1_{1970 + a}.jpg"
            size = (int(rng.integers(12, 21)), int(rng.integers(12, 21)))
            _jpeg(root / rel, rng, size)
            rows.append({"age": a, "path": rel, "split": split})
    csv = root / ("agedb.csv" if kind == "agedb" else "imdb_wiki.csv")
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def matlab_datenum(d: dt.date) -> float:
    """MATLAB serial date number of a date (``toordinal + 366``)."""
    return float(d.toordinal() + 366)


def write_imdb_mat(root: Path, db: str, entries: list[dict]) -> Path:
    """``root/{db}_crop/{db}.mat`` with a 1x1 struct ``db`` holding the release's fields; each
    entry gives ``path``, ``dob`` (date), ``taken`` (year), ``face``, ``second``."""
    from scipy.io import savemat

    folder = root / f"{db}_crop"
    folder.mkdir(parents=True, exist_ok=True)
    n = len(entries)
    paths = np.empty((1, n), dtype=object)
    for i, e in enumerate(entries):
        paths[0, i] = np.array([e["path"]])
    struct = {
        "full_path": paths,
        "dob": np.array([[matlab_datenum(e["dob"]) for e in entries]]),
        "photo_taken": np.array([[e["taken"] for e in entries]], dtype=np.uint16),
        "face_score": np.array([[e["face"] for e in entries]], dtype=np.float64),
        "second_face_score": np.array([[e["second"] for e in entries]], dtype=np.float64),
        "gender": np.ones((1, n)),
    }
    out = folder / f"{db}.mat"
    savemat(out, {db: struct})
    return out


def nyu_test_depth_mm(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A 16-bit depth map in mm whose pixels sweep 0.70-10.5 m (every 0.1 m bin 7..99 appears,
    also inside the centre crop)."""
    vals = np.linspace(700, 10500, h * w)
    rng.shuffle(vals)
    return vals.reshape(h, w).astype(np.uint16)


def make_nyud2_root(root: Path, n_train: int = 6, n_test: int = 4, size: tuple[int, int] = (32, 24),
                    seed: int = 0) -> dict[str, Path]:
    """A NYUD2-DIR miniature with ``size = (W, H)`` images; train depth 8-bit (``code / 255 * 10``
    m), test depth 16-bit mm. No mask file. Returns the CSV paths."""
    rng = np.random.default_rng(seed)
    w, h = size
    data = root / "data"
    train_rows, test_rows = [], []
    for i in range(n_train):
        scene = f"data/nyu2_train/room_{i % 2:04d}_out"
        (root / scene).mkdir(parents=True, exist_ok=True)
        _jpeg(root / f"{scene}/{i}.jpg", rng, size)
        depth = rng.integers(18, 256, size=(h, w), dtype=np.uint8)  # 0.7 - 10 m
        Image.fromarray(depth, mode="L").save(root / f"{scene}/{i}.png")
        train_rows.append(f"{scene}/{i}.jpg,{scene}/{i}.png")
    (data / "nyu2_test").mkdir(parents=True, exist_ok=True)
    for i in range(n_test):
        stem = f"data/nyu2_test/{i:05d}"
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{stem}_colors.png")
        Image.fromarray(nyu_test_depth_mm(rng, h, w)).save(root / f"{stem}_depth.png")
        test_rows.append(f"{stem}_colors.png,{stem}_depth.png")
    (data / "nyu2_train.csv").write_text("\n".join(train_rows) + "\n")
    (data / "nyu2_test.csv").write_text("\n".join(test_rows) + "\n")
    return {"train": data / "nyu2_train.csv", "test": data / "nyu2_test.csv"}


def make_mnist_folder(folder: Path, n_train: int = 400, n_test: int = 200, gz: bool = True,
                      seed: int = 0) -> Path:
    """An MNIST-format folder of ``n_train`` / ``n_test`` random 28 x 28 "glyphs" (a bright
    off-centre bar, so that rotations are visible) with labels 0..9."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for stem_i, stem_l, n in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte", n_train),
                              ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", n_test)):
        imgs = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        imgs[:, 4:14, 12:16] = 255
        write_idx(folder / f"{stem_i}{suffix}", imgs)
        write_idx(folder / f"{stem_l}{suffix}", rng.integers(0, 10, size=n, dtype=np.uint8))
    return folder
