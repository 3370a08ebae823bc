"""Shared pieces of the image benchmarks: clear errors, CSV and file checks, image decoding, the
age-estimation transforms and an optional cache of decoded, resized images.

Errors (all carry the offending path in their message):

* :class:`DatasetNotFoundError` (a ``FileNotFoundError``): the root, a split file or listed images
  are missing; :class:`MissingImagesError` names the first few missing images and their count.
* :class:`CSVFormatError` (a ``ValueError``): a split CSV without the expected columns (the message
  lists the columns expected and found) or with bad values.
* :class:`CorruptImageError` (a ``ValueError``): an image that does not decode.

The cache (:class:`ArrayCache`) keeps one fixed-shape record per sample (e.g. an RGB ``uint8``
array after the deterministic resize) in memory-mapped ``.npy`` files next to a ``filled`` flag per
sample. Records are written the first time a sample is read, so the first epoch decodes JPEGs and
later epochs read arrays; DataLoader workers share the files (each opens its own memory map).

For augmentation on the training device (:mod:`balanced_sam.data.gpu_augment`) a split is read as
``uint8`` pictures from a cache filled *before* training (:func:`fill_cache`, several processes)
through :class:`CachedPictures`. :class:`PictureStore` says where and in which layout:
:func:`whole_picture_record` (training: the whole picture stretched to ``S x S`` plus its size, so
random crops are drawn from the whole picture in its own coordinates) or
:func:`centre_square_record` (evaluation: ``Resize(S)`` + ``CenterCrop(S)``, the layout of
``cache: true``, from which the test crop is an exact slice).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DatasetNotFoundError",
    "MissingImagesError",
    "CSVFormatError",
    "CorruptImageError",
    "require_root",
    "read_split_csv",
    "check_files_exist",
    "check_images_decode",
    "open_rgb",
    "open_depth_png",
    "age_train_transform",
    "age_test_transform",
    "ArrayCache",
    "PictureStore",
    "CachedPictures",
    "whole_picture_record",
    "centre_square_record",
    "fill_cache",
    "AUGMENT_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

#: where a training run applies an image dataset's augmentation (``data.augment``): see
#: :func:`balanced_sam.device_pipeline.augment_mode`
AUGMENT_MODES = ("auto", "device", "cpu")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SHOW = 5  # how many missing / bad files an error message names


class DatasetNotFoundError(FileNotFoundError):
    """A benchmark root, split file or listed file is missing."""


class MissingImagesError(DatasetNotFoundError):
    """Files listed in a split CSV are absent from the root (the message names the first few)."""

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing = list(missing)


class CSVFormatError(ValueError):
    """A split CSV lacks the expected columns or holds values that cannot be used."""


class CorruptImageError(ValueError):
    """An image file exists but does not decode."""

    def __init__(self, path: str | os.PathLike[str], reason: str = "") -> None:
        self.path = str(path)
        msg = f"cannot decode image {self.path}"
        super().__init__(f"{msg}: {reason}" if reason else msg)


# --------------------------------------------------------------------------- files and CSVs
def require_root(root: str | os.PathLike[str] | None, what: str, hint: str = "") -> Path:
    """``root`` as a ``Path``; raises :class:`DatasetNotFoundError` naming it when it is not an
    existing directory (``what`` names the benchmark, ``hint`` says how to get the data)."""
    if root is None:
        raise DatasetNotFoundError(f"{what}: no data root given" + (f"; {hint}" if hint else ""))
    p = Path(root).expanduser()
    if not p.is_dir():
        state = "is not a directory" if p.exists() else "does not exist"
        raise DatasetNotFoundError(f"{what} root {str(p)!r} {state}"
                                   + (f"; {hint}" if hint else ""))
    return p


def read_split_csv(
    path: str | os.PathLike[str],
    columns: Sequence[str],
    *,
    header: bool = True,
    what: str = "split CSV",
    hint: str = "",
) -> Any:
    """Read a split CSV into a pandas DataFrame and check its columns.

    With ``header=True`` the file must have (at least) ``columns``; with ``header=False`` it must
    have exactly ``len(columns)`` columns, which are then given those names. Raises
    :class:`DatasetNotFoundError` for a missing file and :class:`CSVFormatError` naming the
    columns expected and found otherwise.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DatasetNotFoundError(f"{what} not found: {p}" + (f"; {hint}" if hint else ""))
    try:
        if header:
            df = pd.read_csv(p, dtype={"path": str, "split": str})
        else:
            df = pd.read_csv(p, header=None, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CSVFormatError(f"{what} {p} cannot be parsed as CSV: {exc}") from exc
    if header:
        found = [str(c) for c in df.columns]
        lacking = [c for c in columns if c not in found]
        if lacking:
            raise CSVFormatError(
                f"{what} {p} lacks column(s) {lacking}: expected columns {list(columns)}, "
                f"found {found}"
            )
    else:
        if df.shape[1] != len(columns):
            raise CSVFormatError(
                f"{what} {p} must have {len(columns)} columns without a header "
                f"({', '.join(columns)}), found {df.shape[1]}"
            )
        df.columns = list(columns)
    if len(df) == 0:
        raise CSVFormatError(f"{what} {p} holds no rows")
    return df


def check_files_exist(root: Path, relpaths: Iterable[str], what: str = "images",
                      hint: str = "") -> None:
    """Raise :class:`MissingImagesError` when any ``root / relpath`` is not a file, naming the
    first few and the count."""
    missing = [r for r in relpaths if not (root / r).is_file()]
    if missing:
        shown = ", ".join(str(root / m) for m in missing[:_SHOW])
        more = f" (and {len(missing) - _SHOW} more)" if len(missing) > _SHOW else ""
        raise MissingImagesError(
            f"{len(missing)} {what} listed in the split are missing under {root}: {shown}{more}"
            + (f"; {hint}" if hint else ""),
            missing,
        )


def check_images_decode(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Fully decode every image (slow: one pass over the data); raise
    :class:`CorruptImageError` naming the first file that fails."""
    from PIL import Image

    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
        except FileNotFoundError:
            raise
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise CorruptImageError(p, str(exc)) from exc


def open_rgb(path: str | os.PathLike[str]) -> Any:
    """Decode an image as an RGB ``PIL.Image``; :class:`CorruptImageError` names a bad file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"image not found: {path}") from exc
    except Exception as exc:
        raise CorruptImageError(path, str(exc)) from exc


def open_depth_png(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode a NYUD2-DIR depth PNG into ``(raw_codes, metres_per_code)``.

    The DIR data (from Hu et al. 2019) stores *training* depth as 8-bit PNGs scaled to [0, 10] m
    (``metres = code / 255 * 10``) and *test* depth as 16-bit PNGs in millimetres
    (``metres = code / 1000``); the reference ``ToTensor`` applies ``* 10`` to the 8-bit train
    maps and ``/ 1000`` to the 16-bit test maps. We decide by the PNG's bit depth, which gives the
    same numbers on that data. Other modes raise :class:`CorruptImageError`.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"depth map not found: {path}") from exc
    except Exception as exc:
        raise CorruptImageError(path, str(exc)) from exc
    if mode == "L":
        return arr.astype(np.uint16), 10.0 / 255.0
    if mode.startswith("I;16") or mode == "I":
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise CorruptImageError(path, "16-bit depth values out of range")
        return arr.astype(np.uint16), 1.0 / 1000.0
    raise CorruptImageError(path, f"a depth PNG must be 8-bit or 16-bit single-channel, "
                                  f"got PIL mode {mode!r}")


# --------------------------------------------------------------------------- transforms
def age_test_transform(img_size: int = 224) -> Callable[[Any], Any]:
    """Evaluation transform of the age recipe (RnC / BSAM code): ``Resize(img_size * 256 / 224)``
    of the shorter side, ``CenterCrop(img_size)``, ``ToTensor``, ``Normalize(0.5, 0.5)``."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(round(img_size * 256 / 224)),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


def age_train_transform(img_size: int = 224) -> Callable[[Any], Any]:
    """Training transform of the age recipe: ``RandomResizedCrop(img_size, scale=(0.2, 1))``,
    horizontal flip, ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with probability 0.8,
    ``RandomGrayscale(0.2)``, ``ToTensor``, ``Normalize(0.5, 0.5)``."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


# --------------------------------------------------------------------------- cache
def list_digest(items: Iterable[str], *extra: Any) -> str:
    """Short hex digest of a list of strings (and extra values): names a cache for one split."""
    h = hashlib.sha1()
    for it in items:
        h.update(str(it).encode())
        h.update(b"\0")
    for e in extra:
        h.update(repr(e).encode())
    return h.hexdigest()[:12]


def _new_npy(path: Path, dtype: Any, shape: tuple[int, ...]) -> None:
    """An ``.npy`` file of zeros, written through a memory map (nothing held in memory)."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    mm.flush()
    del mm


def _create_once(path: Path, dtype: Any, shape: tuple[int, ...]) -> None:
    """Create a zero-filled ``.npy`` at ``path`` unless it exists: written beside it, then
    hard-linked into place, which fails rather than replaces when another process created it
    first (that process may already be filling its memory map; a replaced file would take its
    records away from its DataLoader workers)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npy")
    try:
        _new_npy(tmp, dtype, shape)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ArrayCache:
    """Fixed-shape records per sample in memory-mapped ``.npy`` files, filled on first read.

    ``fields`` maps a field name to ``(shape, dtype)`` of one record; the files are
    ``{prefix}.{field}.npy`` of shape ``(n, *shape)`` plus ``{prefix}.filled.npy`` (one ``uint8``
    flag per sample). Files are created by the constructor (in the main process) and reused when
    they exist with the same shapes, so a cache built once serves every later run; a different
    split or image size gets a different ``prefix`` (see :func:`list_digest`). Pickling drops the
    open maps, so the object travels to DataLoader workers and each reopens the files.
    """

    def __init__(self, prefix: str | os.PathLike[str], n: int,
                 fields: dict[str, tuple[tuple[int, ...], Any]]) -> None:
        self.prefix = Path(prefix)
        self.n = int(n)
        self.fields = {k: (tuple(int(s) for s in shape), np.dtype(dt))
                       for k, (shape, dt) in fields.items()}
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._maps: dict[str, np.ndarray] | None = None
        for name, (shape, dt) in [*self.fields.items(), ("filled", ((), np.dtype(np.uint8)))]:
            path = self._path(name)
            if path.is_file():
                try:
                    mm = np.load(path, mmap_mode="r")
                    ok = mm.shape == (self.n, *shape) and mm.dtype == dt
                    del mm
                except (OSError, ValueError):
                    ok = False
                if ok:
                    continue
                raise ValueError(f"cache file {path} does not match this dataset "
                                 f"(expected shape {(self.n, *shape)}, dtype {dt}); delete it "
                                 "or choose another cache_dir")
            _create_once(path, dt, (self.n, *shape))

    def _path(self, name: str) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.{name}.npy")

    def _open(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            self._maps = {name: np.load(self._path(name), mmap_mode="r+")
                          for name in [*self.fields, "filled"]}
        return self._maps

    def get(self, i: int) -> dict[str, np.ndarray] | None:
        """The record of sample ``i`` (copies), or ``None`` when it was never stored."""
        maps = self._open()
        if not maps["filled"][i]:
            return None
        return {k: np.array(maps[k][i]) for k in self.fields}

    def put(self, i: int, record: dict[str, Any]) -> bool:
        """Store the record of sample ``i``; returns ``False`` (stores nothing) when a field's shape
        differs from the cache's."""
        maps = self._open()
        for k, (shape, _) in self.fields.items():
            if np.shape(record[k]) != shape:
                return False
        for k in self.fields:
            maps[k][i] = record[k]
        maps["filled"][i] = 1
        return True

    @property
    def num_filled(self) -> int:
        return int(self._open()["filled"].sum())

    def missing(self) -> np.ndarray:
        """The indices of the samples never stored (int64, sorted)."""
        return np.flatnonzero(self._open()["filled"] == 0).astype(np.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None
        return state


# --------------------------------------------------------------------------- decoded pictures
def whole_picture_record(img: Any, side: int) -> dict[str, np.ndarray]:
    """The whole RGB ``PIL.Image`` resized (bilinear, antialiased, like ``Resize``) to ``side x
    side`` regardless of its aspect, plus its size ``hw = (height, width)``: a random crop drawn
    in the picture's own coordinates maps to this square (``BatchAugment(..., sizes=hw)``)."""
    from torchvision.transforms import functional as TF

    w, h = img.size
    rgb = np.array(TF.resize(img, [side, side]), dtype=np.uint8)
    return {"rgb": rgb, "hw": np.array([h, w], dtype=np.int32)}


def centre_square_record(img: Any, side: int) -> dict[str, np.ndarray]:
    """``Resize(side)`` of the shorter side and ``CenterCrop(side)`` (what ``cache: true``
    stores); the evaluation crop ``CenterCrop(size)`` of ``Resize(side)`` is a slice of it."""
    from torchvision.transforms import functional as TF

    sq = TF.center_crop(TF.resize(img, side), [side, side])
    return {"rgb": np.array(sq, dtype=np.uint8)}


@dataclass(frozen=True)
class PictureStore:
    """Where the ``uint8`` pictures of one split live for augmentation on the device.

    ``prefix``: the :class:`ArrayCache` files; ``side``: the stored square side ``S``;
    ``whole``: the layout, :func:`whole_picture_record` (training) or
    :func:`centre_square_record` (evaluation); ``img_size``: the network input side.
    """

    prefix: Path
    side: int
    whole: bool
    img_size: int

    def fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        out: dict[str, tuple[tuple[int, ...], Any]] = {
            "rgb": ((self.side, self.side, 3), np.uint8)}
        if self.whole:
            out["hw"] = ((2,), np.int32)
        return out

    def open(self, n: int) -> ArrayCache:
        return ArrayCache(self.prefix, n, self.fields())

    def record(self, img: Any) -> dict[str, np.ndarray]:
        maker = whole_picture_record if self.whole else centre_square_record
        return maker(img, self.side)

    @property
    def record_bytes(self) -> int:
        return self.side * self.side * 3 + (8 if self.whole else 0) + 1


class CachedPictures(torch.utils.data.Dataset):
    """The pictures of a *filled* :class:`ArrayCache` as ``uint8``, for batch augmentation on
    the training device. Item ``i``: ``{"image": (S, S, 3) uint8, "size": (2,) int64 (height,
    width) of the picture, "target": float32 scalar}`` (``size`` is ``(S, S)`` for the centre-
    square layout). A record that was never filled raises: fill the cache first
    (:func:`fill_cache`), never lazily in the first epoch."""

    def __init__(self, cache: ArrayCache, targets: torch.Tensor, *,
                 fill_report: dict[str, float] | None = None) -> None:
        self.fill_report = fill_report  # what filling it took (see fill_cache)
        if "rgb" not in cache.fields:
            raise ValueError(f"cache {cache.prefix} has no 'rgb' field")
        self.cache = cache
        self.ages = torch.as_tensor(targets, dtype=torch.float32).reshape(-1)
        if len(self.ages) != cache.n:
            raise ValueError(f"{len(self.ages)} targets for a cache of {cache.n} records")
        side = cache.fields["rgb"][0][0]
        self._square = torch.tensor([side, side], dtype=torch.int64)

    def __len__(self) -> int:
        return self.cache.n

    @property
    def targets(self) -> torch.Tensor:
        return self.ages

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pictures (n, S, S, 3) uint8, targets (n,))``: the pictures as one tensor on the
        cache's memory map (nothing is copied until a batch is sliced), for evaluation splits
        read in order without DataLoader workers."""
        maps = self.cache._open()
        if int(maps["filled"].sum()) != self.cache.n:
            raise RuntimeError(f"the picture cache {self.cache.prefix} is not filled: fill it "
                               "first (images.fill_cache)")
        return torch.from_numpy(maps["rgb"]), self.ages

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rec = self.cache.get(i)
        if rec is None:
            raise RuntimeError(f"record {i} of the picture cache {self.cache.prefix} was never "
                               "filled: fill it before training (images.fill_cache)")
        size = (torch.from_numpy(rec["hw"]).to(torch.int64) if "hw" in rec
                else self._square.clone())
        return {"image": torch.from_numpy(rec["rgb"]), "size": size, "target": self.ages[i]}


def _fill_chunk(job: tuple[ArrayCache, Callable[[int], dict[str, Any]], np.ndarray]) -> int:
    cache, make, idx = job
    for i in idx.tolist():
        rec = make(i)
        if not cache.put(i, rec):
            shapes = {k: np.shape(v) for k, v in rec.items()}
            raise ValueError(f"record {i} has shapes {shapes}, the cache {cache.prefix} holds "
                             f"{ {k: s for k, (s, _) in cache.fields.items()} }")
    return len(idx)


def fill_cache(cache: ArrayCache, make_record: Callable[[int], dict[str, Any]], *,
               processes: int = 1, record_bytes: int | None = None, progress: bool = False,
               desc: str = "decoding") -> dict[str, float]:
    """Write every record the cache lacks, now, with ``processes`` worker processes.

    ``make_record(i)`` decodes sample ``i`` (picklable when ``processes > 1``: a module-level
    function or a dataset's bound method). Refuses to start when the disk lacks room for the
    missing records (``record_bytes`` each). Returns ``{"records", "filled", "seconds"}``: how
    many records the cache holds, how many this call wrote and how long it took.
    """
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ValueError(f"processes must be an int >= 1, got {processes!r}")
    t0 = time.perf_counter()
    todo = np.flatnonzero(cache._open()["filled"] == 0)
    if len(todo) and record_bytes:
        need = len(todo) * int(record_bytes)
        free = shutil.disk_usage(cache.prefix.parent).free
        if free < need:
            raise OSError(f"the picture cache {cache.prefix} needs {need / 2**30:.1f} GiB for "
                          f"{len(todo)} pictures but {cache.prefix.parent} has "
                          f"{free / 2**30:.1f} GiB free: put it elsewhere with data.cache=DIR, "
                          "or use data.augment=cpu")
    if len(todo):
        from balanced_sam.io import progress_bar

        procs = min(processes, len(todo))
        chunks = np.array_split(todo, min(len(todo), procs * 8 if procs > 1 else 1))
        jobs = [(cache, make_record, c) for c in chunks]
        bar = progress_bar(total=len(todo), enabled=progress, desc=desc, leave=False,
                           disable=not sys.stderr.isatty())
        if procs == 1:
            for job in jobs:
                bar.update(_fill_chunk(job))
        else:
            from balanced_sam.parallel import fork_pool

            with fork_pool(procs) as pool:
                for done in pool.imap_unordered(_fill_chunk, jobs):
                    bar.update(done)
        bar.close()
    filled = cache.num_filled
    if filled != cache.n:
        raise RuntimeError(f"the picture cache {cache.prefix} holds {filled} of {cache.n} "
                           "records after filling")
    return {"records": float(cache.n), "filled": float(len(todo)),
            "seconds": time.perf_counter() - t0}
