"""IMDB-WIKI-DIR (Yang et al., ICML 2021) on the IMDB-WIKI faces of Rothe et al. (ETH Zurich).

On disk: ``root/imdb_wiki.csv`` with columns ``age,path,split`` (paths relative to ``root``, e.g.
``imdb_crop/01/nm0000001_rm124825600_1899-5-10_1968.jpg`` or ``wiki_crop/...``); the released
file has 191,509 / 11,022 / 11,022 rows per split. Samples and transforms are those of
:mod:`balanced_sam.data.agedb` (the paper trains both age benchmarks with the same recipe).

Without the CSV, :func:`make_split_from_mat` rebuilds the split from the ``imdb.mat`` /
``wiki.mat`` metadata the way the DIR code (``imdb-wiki-dir/data/create_imdb_wiki.py`` and
``preprocess_imdb_wiki.py``) does:

* keep faces with ``face_score >= min_score`` (1.0; a missing face has score ``-inf``) and no
  second face (``second_face_score`` NaN or ``<= 0``);
* age = ``photo_taken - birth year``, minus one more year when the birthday falls in July or
  later (the photo is assumed to be taken mid-year); the birth date is the MATLAB datenum ``dob``
  (``datetime.fromordinal(int(dob) - 366)``); keep ages in ``[0, 200]``. The CSV is not clipped:
  the DIR paper reports a target range of 0-186; only the ages 0..120 enter val and test.
* per age ``a`` in 0..120: shuffle that age's images with a fixed seed and put
  ``min(n_a // 3, 150)`` into val and as many into test; the rest is train.

The selection uses numpy's generator (seed 666 as the DIR script), not Python's ``random``, so a
rebuilt CSV has the same sizes per age as the released one but not the same images: use the
released CSV to compare with published numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from balanced_sam.data.agedb import AgeImageDataset, age_train_labels, build_age_splits
from balanced_sam.data.images import CSVFormatError, DatasetNotFoundError, require_root

__all__ = ["build_splits", "train_labels", "make_split_from_mat", "read_mat_meta", "matlab_age",
           "CSV_NAME", "HINT"]

CSV_NAME = "imdb_wiki.csv"
HINT = ("IMDB-WIKI faces: imdb_crop.tar and wiki_crop.tar from "
        "https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/; run `bsam data prepare imdb-wiki "
        "--root DIR` to fetch them and the split CSV")
_MATLAB_EPOCH_OFFSET = 366  # MATLAB datenum 367 is 0001-01-01, Python ordinal 1


def build_splits(
    root: str | os.PathLike[str],
    img_size: int = 224,
    cache: bool | str | os.PathLike[str] = False,
    **options: Any,
) -> dict[str, AgeImageDataset | None]:
    """IMDB-WIKI-DIR train / val / test datasets from ``root/imdb_wiki.csv``.

    Same options, samples and errors as :func:`balanced_sam.data.agedb.build_splits`
    (``csv``, ``verify``, ``transform_train``, ``transform_test``).
    """
    return build_age_splits(root, CSV_NAME, "IMDB-WIKI-DIR", HINT, img_size, cache, **options)


def train_labels(root: str | os.PathLike[str], **options: Any) -> torch.Tensor:
    """The training ages of IMDB-WIKI-DIR (float32, shape ``(n_train,)``) from the CSV alone."""
    return age_train_labels(root, CSV_NAME, "IMDB-WIKI-DIR", HINT, options.get("csv"))


def matlab_age(dob: np.ndarray, photo_taken: np.ndarray) -> np.ndarray:
    """Age at the photo (int64) from MATLAB datenums of birth and the year the photo was taken.

    Vectorised form of the DIR rule: ``birth = fromordinal(max(int(dob) - 366, 1))``; age =
    ``photo_taken - birth.year``, one less when ``birth.month >= 7``. Non-finite ``dob`` gives
    ``-1`` (dropped by the age filter).
    """
    dob = np.asarray(dob, dtype=np.float64)
    taken = np.asarray(photo_taken, dtype=np.int64)
    finite = np.isfinite(dob)
    ordinal = np.maximum(np.trunc(np.where(finite, dob, 367.0)).astype(np.int64)
                         - _MATLAB_EPOCH_OFFSET, 1)
    unix_day = ordinal - 719163  # date(1970, 1, 1).toordinal()
    days = unix_day.astype("datetime64[D]")
    year = days.astype("datetime64[Y]").astype(np.int64) + 1970
    month = days.astype("datetime64[M]").astype(np.int64) % 12 + 1
    age = taken - year - (month >= 7).astype(np.int64)
    return np.where(finite, age, -1)


def read_mat_meta(mat_path: str | os.PathLike[str], db: str) -> dict[str, np.ndarray]:
    """The fields of ``imdb.mat`` / ``wiki.mat`` the split needs, as flat numpy arrays:
    ``full_path`` (str), ``dob``, ``photo_taken``, ``face_score``, ``second_face_score``."""
    from scipy.io import loadmat

    p = Path(mat_path)
    if not p.is_file():
        raise DatasetNotFoundError(f"IMDB-WIKI metadata not found: {p}; {HINT}")
    try:
        meta = loadmat(p, squeeze_me=True, struct_as_record=True)
    except Exception as exc:
        raise CSVFormatError(f"cannot read MATLAB file {p}: {exc}") from exc
    if db not in meta:
        found = sorted(k for k in meta if not k.startswith("__"))
        raise CSVFormatError(f"{p} has no struct {db!r} (found {found})")
    rec = meta[db]
    needed = ("full_path", "dob", "photo_taken", "face_score", "second_face_score")
    names = rec.dtype.names or ()
    lacking = [f for f in needed if f not in names]
    if lacking:
        raise CSVFormatError(f"{p}: struct {db!r} lacks field(s) {lacking}; expected "
                             f"{list(needed)}, found {list(names)}")
    rec = rec.item() if rec.shape == () else rec[0]
    out = {f: np.atleast_1d(np.asarray(rec[names.index(f)])) for f in needed}
    out["full_path"] = np.array([str(np.ravel(x)[0]) if np.ndim(x) else str(x)
                                 for x in out["full_path"]], dtype=object)
    n = len(out["full_path"])
    for f in needed[1:]:
        out[f] = out[f].astype(np.float64)
        if len(out[f]) != n:
            raise CSVFormatError(f"{p}: field {f!r} has {len(out[f])} entries, full_path has {n}")
    return out


def make_split_from_mat(
    root: str | os.PathLike[str],
    *,
    dbs: tuple[str, ...] = ("imdb", "wiki"),
    min_score: float = 1.0,
    max_age: int = 200,
    max_per_age: int = 150,
    split_ages: int = 121,
    seed: int = 666,
) -> Any:
    """The IMDB-WIKI-DIR split rebuilt from ``root/{db}_crop/{db}.mat`` (see the module docstring).

    Returns a DataFrame with columns ``age,path,split`` (paths prefixed ``{db}_crop/``); writing
    it is left to the caller (:func:`balanced_sam.data.prepare.prepare_dataset` writes
    ``root/imdb_wiki.csv`` only when absent).
    """
    import pandas as pd

    r = require_root(root, "IMDB-WIKI-DIR", HINT)
    frames = []
    for db in dbs:
        m = read_mat_meta(r / f"{db}_crop" / f"{db}.mat", db)
        age = matlab_age(m["dob"], m["photo_taken"])
        face = m["face_score"]
        second = m["second_face_score"]
        keep = (np.isfinite(face) & (face >= min_score)
                & ~(np.isfinite(second) & (second > 0.0))
                & (age >= 0) & (age <= max_age))
        frames.append(pd.DataFrame({
            "age": age[keep].astype(np.int64),
            "path": [f"{db}_crop/{p}" for p in m["full_path"][keep]],
        }))
    df = pd.concat(frames, ignore_index=True)
    if len(df) == 0:
        raise CSVFormatError(f"no IMDB-WIKI face passes the filters (face_score >= {min_score}, "
                             f"one face, age in range) under {r}")
    rng = np.random.default_rng(seed)
    split = np.full(len(df), "train", dtype=object)
    ages = df["age"].to_numpy()
    for a in range(split_ages):  # one draw per age value, not per image
        idx = np.flatnonzero(ages == a)
        if len(idx) == 0:
            continue
        idx = rng.permutation(idx)
        k = min(len(idx) // 3, max_per_age)
        split[idx[:k]] = "val"
        split[idx[k:2 * k]] = "test"
    df["split"] = split
    return df
