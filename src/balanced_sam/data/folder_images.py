"""Your own images: a folder of pictures and a CSV with a continuous target, as a DIR benchmark.

``bsam bench --images LABELS.csv --target COL`` (or ``data: {name: images, path: LABELS.csv,
target: COL}`` in a config) reads:

* **the CSV**: one row per image; the target column (numeric: NaN / inf / text get the same
  messages as ``--csv``); the path column, relative to ``root`` (default: the CSV's folder),
  found by itself (:func:`find_path_column`: the one column whose values name image files that
  exist) unless named with ``path_col``; optionally a split column (``split_col``: ``train`` /
  ``val`` / ``test``, also ``valid`` / ``validation``), used as it is.
* **the images**: whatever Pillow opens (JPEG, PNG, TIFF, BMP, WebP, ...), RGB or grayscale
  (:func:`read_rgb`: grayscale is repeated over 3 channels; 16-bit pictures are scaled by 1/257).

Without a split column the rows are split as ``--csv`` tables are
(:func:`balanced_sam.data.tabular.dir_split`): equal-width bins over the targets (the robust
default width of :func:`balanced_sam.data.tabular.table_bins` unless ``bin_width``), per bin
``min(n // 3, cap)`` images for validation and as many for test, shuffled with ``split_seed``;
the rest is training data. The split's parameters are part of the data's fingerprint. The bins,
regions and weights of a run come from its training labels.

The images go through the age recipe of the BSAM / Rank-N-Contrast code
(:mod:`balanced_sam.data.images`): training ``RandomResizedCrop(img_size, scale=(0.2, 1))``,
horizontal flip, colour jitter, random grayscale; evaluation ``Resize(img_size * 256 / 224)`` +
``CenterCrop(img_size)``; both normalised with mean = std = 0.5. On a CUDA device the training
augmentation runs per batch on the GPU (``augment: auto``). ``img_size`` defaults to
:func:`default_img_size`: 224, or the images' median shorter side when that is smaller.

Every image is decoded once when the data are loaded (``verify: decode``): into a cache of
decoded, resized squares (``cache``: default ``<root>/.bsam_cache``; a folder; ``false`` for
none), which later loads and epochs read instead of the files, and so that a missing or
unreadable image is reported before training, naming its row, its path and how many others
failed. The targets are standardised for training; metrics are in the target's units.

The model and its training, from scratch or fine-tuned from ``pretrained`` weights, are in
:mod:`balanced_sam.data.folder_recipe`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from balanced_sam.bins import LabelBins
from balanced_sam.data.agedb import AgeImageDataset
from balanced_sam.data.base import file_digest
from balanced_sam.data.images import (
    AUGMENT_MODES,
    ArrayCache,
    CorruptImageError,
    CSVFormatError,
    DatasetNotFoundError,
    MissingImagesError,
    PictureStore,
    age_test_transform,
    age_train_transform,
    list_digest,
)
from balanced_sam.errors import ConfigError, spell

__all__ = ["FolderImageDataset", "ImageFolderData", "UnreadableImagesError", "build_splits",
           "default_img_size", "find_path_column", "read_rgb", "image_extensions",
           "DEFAULT_IMG_SIZE", "MIN_IMG_SIZE", "OPTIONS"]

#: the network input side for photos; smaller pictures keep their own size (default_img_size)
DEFAULT_IMG_SIZE = 224
#: the smallest input side a ResNet-18 is given (its stride is 32; adaptive pooling copes)
MIN_IMG_SIZE = 8
#: how many images' headers default_img_size and find_path_column read
_SAMPLE = 200
_SHOW = 5
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

#: the options of the ``images`` dataset (``data.KEY``)
OPTIONS = ("path", "target", "root", "path_col", "split_col", "img_size", "cache", "augment",
           "verify", "bin_width", "cap", "split_seed", "min_per_bin", "lower", "dropna",
           "pretrained", "allow_download")


class UnreadableImagesError(CorruptImageError):
    """Images that exist but do not decode (the message names the first, its row and the
    count of the others)."""

    def __init__(self, message: str, failures: Sequence[tuple[int, str, str]] = ()) -> None:
        ValueError.__init__(self, message)
        self.path = failures[0][1] if failures else ""
        self.failures = list(failures)


# --------------------------------------------------------------------------- decoding
def image_extensions() -> frozenset[str]:
    """The file extensions Pillow opens here (``.jpg``, ``.png``, ``.tif``, ...), lower case."""
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


def read_rgb(path: str | os.PathLike[str]) -> Any:
    """Decode any picture Pillow reads as an RGB ``PIL.Image``.

    Grayscale (``L``, ``1``, ``LA``) is repeated over 3 channels; 16-bit grayscale (``I;16``,
    TIFF / PNG) is scaled by 1/257, which maps 0-65535 onto 0-255; 32-bit integer and float
    pictures are taken as they are when their values lie in 0-255, scaled by 1/257 when in
    0-65535, and refused otherwise; palette and alpha pictures are composited as Pillow's
    ``convert("RGB")`` does. Raises :class:`DatasetNotFoundError` or :class:`CorruptImageError`
    naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                top = float(arr.max(initial=0.0))
                if not np.isfinite(arr).all() or float(arr.min(initial=0.0)) < 0 or top > 65535:
                    raise CorruptImageError(path, f"{im.mode} values outside 0-65535; convert "
                                                  "it to 8- or 16-bit first")
                if im.mode.startswith("I;16") or top > 255:
                    arr = arr / 257.0
                gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
                return gray.convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"image not found: {path}") from exc
    except CorruptImageError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise CorruptImageError(path, str(exc) or type(exc).__name__) from exc


class FolderImageDataset(AgeImageDataset):
    """:class:`~balanced_sam.data.agedb.AgeImageDataset` over a user's folder: pictures decoded
    by :func:`read_rgb` (any Pillow format, grayscale to RGB); ``rows`` are the CSV rows of its
    samples, named by a decoding error."""

    def __init__(self, *args: Any, rows: Sequence[int], csv_name: str = "the CSV",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows = [int(r) for r in rows]
        self.csv_name = csv_name

    def decode(self, i: int) -> Any:
        """The RGB picture of sample ``i``, read from its file; an error names its CSV row."""
        path = self.root / self.paths[i]
        try:
            return read_rgb(path)
        except DatasetNotFoundError as exc:
            raise DatasetNotFoundError(f"{_row_text(self.rows[i], self.csv_name)}: {exc}") \
                from exc
        except CorruptImageError as exc:
            raise UnreadableImagesError(f"{_row_text(self.rows[i], self.csv_name)}: {exc}",
                                        [(self.rows[i], str(path), str(exc))]) from exc

    def load_image(self, i: int) -> Any:
        from PIL import Image

        if self.cache is None:
            return self.decode(i)
        rec = self.cache.get(i)
        if rec is not None:
            return Image.fromarray(rec["rgb"])
        from torchvision.transforms import functional as TF

        s = self._cache_size
        img = TF.center_crop(TF.resize(self.decode(i), s), [s, s])
        self.cache.put(i, {"rgb": np.asarray(img, dtype=np.uint8)})
        return img

    def picture_record(self, i: int) -> dict[str, np.ndarray]:
        assert self.store is not None
        return self.store.record(self.decode(i))


def _row_text(row: int, csv_name: str) -> str:
    return f"row {row} (line {row + 2} of {csv_name})"


# --------------------------------------------------------------------------- the CSV
def find_path_column(frame: Any, root: Path, *, exclude: Sequence[str] = (),
                     path_col: str | None = None, source: str = "the CSV") -> str:
    """The column of ``frame`` whose values name image files under ``root``.

    ``path_col`` is checked and returned. Otherwise a column qualifies when its first
    values (up to 200) are text and at least half of them are files under ``root`` with an
    extension Pillow opens (or, without one, a file Pillow identifies). Exactly one column
    must qualify: none, or several, is an error naming the columns looked at."""
    columns = [str(c) for c in frame.columns]
    if path_col is not None:
        if path_col not in columns:
            raise CSVFormatError(f"{source} has no column {path_col!r} "
                                 f"({spell('path_col', 'COL')}); its columns are {columns}")
        return path_col
    exts = image_extensions()
    found, looked = [], []
    for col in frame.columns:
        if str(col) in exclude:
            continue
        values = frame[col].dropna()
        if len(values) == 0 or not all(isinstance(v, str) for v in values.iloc[:_SAMPLE]):
            continue
        sample = [str(v) for v in values.iloc[:_SAMPLE]]
        files = [v for v in sample if (root / v).is_file()]
        looked.append((str(col), sample[0], len(files), len(sample)))
        images = all(Path(v).suffix.lower() in exts for v in files)
        if 2 * len(files) >= len(sample) and files and (images or _pillow_opens(root / files[0])):
            found.append(str(col))
    if len(found) == 1:
        return found[0]
    if found:
        raise CSVFormatError(f"{source}: columns {found} all name image files under {root}; "
                             f"say which holds the images ({spell('path_col', found[0])})")
    seen = "; ".join(f"column {c!r} (e.g. {v!r}): {k} of the first {n} are files"
                     for c, v, k, n in looked) or "no column holds text"
    raise CSVFormatError(f"{source}: no column names image files under {root} ({seen}); give "
                         f"the folder the paths are relative to ({spell('root', 'DIR')}) or "
                         f"the column ({spell('path_col', 'COL')})")


def _pillow_opens(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except Exception:
        return False


def _read_csv(path: str | os.PathLike[str]) -> Any:
    import pandas as pd

    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetNotFoundError(f"images CSV not found: {p} ({spell('images', 'FILE')})")
    try:
        frame = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CSVFormatError(f"images CSV {p} cannot be read as CSV: {exc}") from exc
    if len(frame) == 0:
        raise CSVFormatError(f"images CSV {p} holds no rows")
    return frame


def _split_column(frame: Any, split_col: str, source: str) -> np.ndarray:
    """The split of each row (``train`` / ``val`` / ``test``) from a given column."""
    if split_col not in frame.columns:
        raise CSVFormatError(f"{source} has no column {split_col!r} "
                             f"({spell('split_col', 'COL')}); its columns are "
                             f"{[str(c) for c in frame.columns]}")
    raw = frame[split_col].astype(str).str.strip().str.lower()
    bad = ~raw.isin(list(_SPLITS))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise CSVFormatError(f"{source}: column {split_col!r} must hold train, val or test; "
                             f"{_row_text(i, source)} has {frame[split_col].iloc[i]!r} "
                             f"({int(bad.sum())} such rows)")
    split = raw.map(_SPLITS).to_numpy()
    for name in ("train", "val", "test"):
        if not (split == name).any():
            raise CSVFormatError(f"{source}: column {split_col!r} has no {name!r} rows; a run "
                                 "needs train, val and test images (leave the column out for a "
                                 "DIR split built from the targets)")
    return split


# --------------------------------------------------------------------------- sizes and split
def default_img_size(sizes: Sequence[tuple[int, int]]) -> int:
    """The network input side for pictures of ``sizes`` (``(width, height)`` each): 224 for
    photos, else the median shorter side when that is smaller (16 x 16 pictures are trained
    at 16, never blown up to 224), and at least 8."""
    if not sizes:
        return DEFAULT_IMG_SIZE
    short = float(np.median([min(w, h) for w, h in sizes]))
    return int(max(MIN_IMG_SIZE, min(DEFAULT_IMG_SIZE, math.floor(short))))


def _image_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    from PIL import Image

    out = []
    for p in paths[:_SAMPLE]:
        try:
            with Image.open(p) as im:
                out.append(tuple(im.size))
        except Exception:  # reported by the decoding pass with its row
            continue
    return out  # type: ignore[return-value]


def _dir_split(y: np.ndarray, bin_width: float | None, lower: float | None, cap: int, seed: int,
               min_per_bin: int) -> tuple[dict[str, Any], np.ndarray]:
    """``(bins, split per row)`` of the DIR split; too few images is an error with the
    numbers."""
    from balanced_sam.data.tabular import dir_split, table_bins

    bins = table_bins(y, bin_width, lower)
    labelled = LabelBins.from_labels(y, **bins)
    train, val, test = dir_split(y, edges=labelled.edges.numpy(), cap=cap, seed=seed,
                                 min_per_bin=min_per_bin, clamp=bool(bins.get("clamp", False)))
    if val.size == 0:
        counts = np.bincount(labelled.bin_index(y).numpy(), minlength=labelled.num_bins)
        wider = _wider_width(y, float(bins["bin_width"]), min_per_bin)
        raise ValueError(
            f"too few images for a DIR split: {y.size} images in {labelled.num_bins} bins of "
            f"width {bins['bin_width']:g}, the largest holding {int(counts.max())}; a bin gives "
            f"images to validation and test only when it holds at least {min_per_bin}, so both "
            f"would be empty. Use wider bins"
            + (f" ({spell('bin_width', wider)})" if wider else "")
            + f", more images, or a split column ({spell('split_col', 'COL')})")
    split = np.empty(y.size, dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    return bins, split


def _wider_width(y: np.ndarray, width: float, min_per_bin: int) -> float | None:
    """The narrowest default-style width (about 50, 20, 10 or 5 bins) above ``width`` whose
    fullest bin holds ``min_per_bin`` targets, if one does."""
    from balanced_sam.data.tabular import default_bin_width, table_bins

    for max_bins in (50, 20, 10, 5):
        w = default_bin_width(y, max_bins)
        if w <= width:
            continue
        b = LabelBins.from_labels(y, **table_bins(y, w))
        if int(np.bincount(b.bin_index(y).numpy()).max()) >= min_per_bin:
            return w
    return None


# --------------------------------------------------------------------------- the splits
@dataclass
class ImageFolderData:
    """The three splits, the bins' keyword arguments (``LabelBins.from_labels``) and ``info``
    (sizes, split, files and split parameters: the fingerprint)."""

    train: FolderImageDataset
    val: FolderImageDataset
    test: FolderImageDataset
    bins: dict[str, Any]
    info: dict[str, Any]


def build_splits(
    path: str | os.PathLike[str], target: str, *, root: str | os.PathLike[str] | None = None,
    path_col: str | None = None, split_col: str | None = None, img_size: int | None = None,
    cache: bool | str | os.PathLike[str] = True, augment: str = "auto", verify: str = "decode",
    bin_width: float | None = None, cap: int = 50, split_seed: int = 0, min_per_bin: int = 3,
    lower: float | None = None, dropna: bool = False, progress: bool = True,
    processes: int | None = None,
) -> ImageFolderData:
    """Train / val / test datasets of a CSV of images (see the module docstring).

    ``verify``: ``decode`` (default) decodes every image once now (into the cache when there is
    one), with ``processes`` worker processes (default: up to 8 when there are more than 512 to
    decode); ``exists`` only checks that the files exist."""
    _check_options(augment, verify, img_size)
    t = _read_rows(path, target, root, path_col, split_col, dropna)
    if split_col is not None:
        from balanced_sam.data.tabular import table_bins

        split = _split_column(t.frame, split_col, t.csv.name)
        bins = table_bins(t.y, bin_width, lower)
    else:
        bins, split = _dir_split(t.y, bin_width, lower, int(cap), int(split_seed), min_per_bin)
    size = img_size or default_img_size(_image_sizes([t.base / p for p in t.paths]))
    cache_dir = _cache_dir(cache, t.base)
    out = {name: _dataset(t, np.flatnonzero(split == name), name, size, cache_dir, augment)
           for name in ("train", "val", "test")}
    if verify == "decode":
        _decode_all(list(out.values()), t.csv.name, progress, processes)
    split_params = {"target": target, "path_col": t.col, "split_col": split_col,
                    "split": "column" if split_col else "dir", **bins, "img_size": size,
                    "dropna": bool(dropna)}
    if split_col is None:
        split_params.update(cap=int(cap), split_seed=int(split_seed),
                            min_per_bin=int(min_per_bin))
    info = {"source": str(t.csv), "root": str(t.base), "target": target, "path_col": t.col,
            "split": split_params["split"], "split_col": split_col, "img_size": size,
            "C": int(cap) if split_col is None else None,
            "split_seed": int(split_seed) if split_col is None else None,
            "num_bins": LabelBins.from_labels(out["train"].targets.numpy(), **bins).num_bins,
            "outside_bins": int(((t.y < bins["lower"]) | (t.y >= bins["upper"])).sum()),
            "cache": str(cache_dir) if cache_dir is not None else None,
            "sizes": {"rows": int(len(t.frame) + t.dropped), "dropped_nan_target": t.dropped,
                      **{k: len(v) for k, v in out.items()}},
            "files": {t.csv.name: file_digest(t.csv), "images": _listing_digest(t.base, t.paths)},
            "split_params": split_params}
    how = (f"split column {split_col!r}" if split_col else
           f"DIR split (C {int(cap)}, seed {int(split_seed)})")
    info["summary"] = (f"images: {len(t.paths)} pictures of {t.csv.name} under {t.base}, path "
                       f"column {t.col!r}{'' if path_col else ' (found)'}, {how}, input "
                       f"{size} x {size}{'' if img_size else ' (default)'}, decoded-image "
                       f"cache {cache_dir or 'none'}")
    return ImageFolderData(out["train"], out["val"], out["test"], bins, info)


def _check_options(augment: str, verify: str, img_size: Any) -> None:
    if augment not in AUGMENT_MODES:
        raise ConfigError(f"data.augment must be one of {', '.join(AUGMENT_MODES)}, got "
                          f"{augment!r}")
    if verify not in ("decode", "exists"):
        raise ConfigError(f"data.verify must be 'decode' or 'exists', got {verify!r}")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int)
                                 or img_size < MIN_IMG_SIZE):
        raise ConfigError(f"img_size must be an integer >= {MIN_IMG_SIZE} "
                          f"({spell('img_size', 224)}), got {img_size!r}")


@dataclass
class _Rows:
    """The usable rows of the CSV: where they are, their paths, targets and CSV row numbers."""

    csv: Path
    base: Path
    frame: Any
    col: str
    paths: list[str]
    rows: np.ndarray
    y: np.ndarray
    dropped: int
    stamps: list[str]  # path, size and modification time of each image: names its cache


def _read_rows(path: str | os.PathLike[str], target: str, root: str | os.PathLike[str] | None,
               path_col: str | None, split_col: str | None, dropna: bool) -> _Rows:
    """Read the CSV, find the path column, check the target (as ``--csv`` does) and that every
    image exists."""
    from balanced_sam.data.tabular import numeric_target

    csv = Path(path).expanduser().resolve()
    frame = _read_csv(csv)
    base = Path(root).expanduser().resolve() if root is not None else csv.parent
    if not base.is_dir():
        raise DatasetNotFoundError(f"image root {base} is not a folder ({spell('root', 'DIR')})")
    if not isinstance(target, str) or target not in frame.columns:
        raise CSVFormatError(f"{csv.name} has no target column {target!r} "
                             f"({spell('target', 'COL')}); its columns are "
                             f"{[str(c) for c in frame.columns]}")
    col = find_path_column(frame, base, exclude=[target, *([split_col] if split_col else [])],
                           path_col=path_col, source=csv.name)
    frame = frame.reset_index(drop=True)
    frame["_row"] = np.arange(len(frame))
    frame, dropped = numeric_target(frame, target, dropna=dropna, source=str(csv))
    rows = frame["_row"].to_numpy()
    if frame[col].isna().any():
        i = int(np.flatnonzero(frame[col].isna().to_numpy())[0])
        raise CSVFormatError(f"{csv.name}: {_row_text(int(rows[i]), csv.name)} has no image "
                             f"path in column {col!r}")
    paths = frame[col].astype(str).tolist()
    _check_exist(base, paths, rows, csv.name)
    y = frame[target].to_numpy(dtype=np.float32).astype(np.float64)
    stats = [(base / p).stat() for p in paths]
    stamps = [f"{p}\t{st.st_size}\t{st.st_mtime_ns}" for p, st in zip(paths, stats)]
    return _Rows(csv, base, frame, col, paths, rows, y, dropped, stamps)


def _dataset(t: _Rows, idx: np.ndarray, name: str, size: int, cache_dir: Path | None,
             augment: str) -> FolderImageDataset:
    """One split: its cache of decoded squares and, for the device path, its picture store."""
    side = round(size * 256 / 224)
    part = [t.paths[i] for i in idx]
    key = [t.stamps[i] for i in idx]  # another root, or a changed image: another cache
    square = f"images-{t.csv.stem}-{name}-{side}-{list_digest(key, side, str(t.base))}"
    arrays = (ArrayCache(cache_dir / square, len(part), {"rgb": ((side, side, 3), np.uint8)})
              if cache_dir is not None else None)
    store = None
    if augment != "cpu":  # training: whole pictures; evaluation: the squares above
        whole = (f"images-{t.csv.stem}-{name}-{side}-whole-"
                 f"{list_digest(key, side, str(t.base), 'whole')}")
        store = PictureStore((cache_dir or t.base / ".bsam_cache")
                             / (whole if name == "train" else square), side, name == "train",
                             size)
    tf = age_train_transform(size) if name == "train" else age_test_transform(size)
    return FolderImageDataset(t.base, part, t.y[idx].astype(np.float32), tf, arrays,
                              augment=augment, store=store, rows=t.rows[idx],
                              csv_name=t.csv.name)


def _check_exist(base: Path, paths: Sequence[str], rows: np.ndarray, source: str) -> None:
    missing = [(int(r), p) for r, p in zip(rows, paths) if not (base / p).is_file()]
    if missing:
        (r, p), more = missing[0], len(missing) - 1
        others = (f"; {more} other image(s) are missing too, e.g. "
                  + ", ".join(f"row {rr}: {pp}" for rr, pp in missing[1:1 + _SHOW])
                  if more else "")
        raise MissingImagesError(f"image of {_row_text(r, source)} not found: {base / p}"
                                 f"{others} (paths are relative to {base}; "
                                 f"{spell('root', 'DIR')} sets that folder)",
                                 [p for _, p in missing])


def _cache_dir(cache: bool | str | os.PathLike[str], base: Path) -> Path | None:
    if cache is False or cache is None:
        return None
    folder = base / ".bsam_cache" if cache is True else Path(cache).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"the decoded-image cache {folder} cannot be created ({exc.strerror}); "
                      f"put it elsewhere ({spell('cache', 'DIR')}) or go without one "
                      f"({spell('cache', False)})") from None
    return folder


def _decode_all(splits: Sequence[FolderImageDataset], source: str, progress: bool,
                processes: int | None = None) -> None:
    """Decode every image not in the cache yet (and store it there), in ``processes`` worker
    processes (default: up to 8 for more than 512 images); one error names the first image
    that failed, its row and how many others failed."""
    jobs = []
    for ds in splits:
        todo = ds.cache.missing() if ds.cache is not None else np.arange(len(ds))
        jobs += [(ds, chunk) for chunk in np.array_split(todo, max(1, len(todo) // 256))
                 if len(chunk)]
    total = sum(len(c) for _, c in jobs)
    if not total:
        return
    import multiprocessing as mp
    import sys

    if processes is None:
        processes = min(8, os.cpu_count() or 1) if total > 512 else 1
    if mp.current_process().daemon:  # a bench's worker may not start processes of its own
        processes = 1

    from balanced_sam.io import progress_bar

    bar = progress_bar(total=total, enabled=progress, desc="decoding images", leave=False,
                       disable=not sys.stderr.isatty())
    failures: list[tuple[int, str, str]] = []
    if processes <= 1:
        for job in jobs:
            failures += _decode_chunk(job)
            bar.update(len(job[1]))
    else:
        from balanced_sam.parallel import fork_pool

        with fork_pool(min(processes, len(jobs))) as pool:
            for (_, chunk), failed in zip(jobs, pool.imap(_decode_chunk, jobs)):
                failures += failed
                bar.update(len(chunk))
    bar.close()
    if failures:
        failures.sort()
        row, path, reason = failures[0]
        reason = reason.removeprefix(f"cannot decode image {path}: ")
        more = len(failures) - 1
        others = (f"; {more} other image(s) failed too (rows "
                  + ", ".join(str(r) for r, _, _ in failures[1:1 + _SHOW])
                  + (", ..." if more > _SHOW else "") + ")" if more else "")
        raise UnreadableImagesError(f"image of {_row_text(row, source)} cannot be read: {path} "
                                    f"({reason}){others}; fix or remove those rows", failures)


def _decode_chunk(job: tuple[FolderImageDataset, np.ndarray]) -> list[tuple[int, str, str]]:
    """Decode (and cache) some samples of a split; ``(row, path, reason)`` of each failure."""
    ds, idx = job
    failures = []
    for i in idx.tolist():
        try:
            ds.load_image(i)
        except (CorruptImageError, DatasetNotFoundError) as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            failures.append((ds.rows[i], str(ds.root / ds.paths[i]), str(cause)))
    return failures


def _listing_digest(base: Path, paths: Sequence[str]) -> str:
    """A digest of the image files' names and sizes (cheap: no image is read)."""
    return list_digest([f"{p}\t{(base / p).stat().st_size}" for p in paths])
