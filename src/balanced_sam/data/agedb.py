"""AgeDB-DIR (Yang et al., "Delving into Deep Imbalanced Regression", ICML 2021).

On disk: ``root/agedb.csv`` with columns ``age,path,split`` (``split`` in ``train|val|test``;
``path`` relative to ``root``, e.g. ``AgeDB/11706_OliviaHussey_31_f.jpg``); the released file has
16,488 rows, 12,208 / 2,140 / 2,140 per split, built per age by drawing ``min(n // 3, 30)`` images
into val and as many into test. The images come from the AgeDB authors
(https://ibug.doc.ic.ac.uk/resources/agedb/, password on request).

Samples are ``(image[3, H, W] float32, age float32 scalar tensor)`` with the recipe of the BSAM /
Rank-N-Contrast code (see :mod:`balanced_sam.data.images`): train ``RandomResizedCrop`` + flip +
colour jitter + grayscale, test ``Resize(img_size * 256 / 224)`` + ``CenterCrop(img_size)``, both
normalised with mean = std = 0.5.

``augment`` says where a training run applies that recipe: ``cpu`` (per image with PIL in the
DataLoader workers, the samples above), ``device`` (the training loop reads ``uint8`` pictures
from a cache filled before training, :meth:`AgeImageDataset.pictures`, and augments whole
batches on the training device with :class:`~balanced_sam.data.gpu_augment.BatchAugment`) or
``auto`` (``device`` on a CUDA device, ``cpu`` elsewhere; decided by the loop, which knows the
device). Indexing a dataset always gives the ``cpu`` samples, whatever ``augment`` says.

The module also holds :class:`AgeImageDataset` and :func:`build_age_splits`, shared with
:mod:`balanced_sam.data.imdb_wiki`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from balanced_sam.data.images import (
    AUGMENT_MODES,
    ArrayCache,
    CachedPictures,
    CSVFormatError,
    PictureStore,
    age_test_transform,
    age_train_transform,
    check_files_exist,
    check_images_decode,
    list_digest,
    open_rgb,
    read_split_csv,
    require_root,
)

__all__ = [
    "AgeImageDataset",
    "build_splits",
    "train_labels",
    "read_age_csv",
    "build_age_splits",
    "age_train_labels",
    "CSV_NAME",
    "HINT",
    "SPLITS",
]

CSV_NAME = "agedb.csv"
SPLITS = ("train", "val", "test")
AGE_COLUMNS = ("age", "path", "split")
HINT = ("AgeDB images come from the AgeDB authors (password on request at "
        "https://ibug.doc.ic.ac.uk/resources/agedb/); run `bsam data prepare agedb --root DIR` "
        "to fetch the split CSV and see what is missing")


class AgeImageDataset(Dataset):
    """Face images with an age label: ``(image[3, H, W] float32, age float32 scalar)``.

    ``paths`` are relative to ``root``; ``transform`` maps an RGB ``PIL.Image`` to a tensor.
    With ``cache`` (an :class:`~balanced_sam.data.images.ArrayCache` with an ``rgb`` field of shape
    ``(S, S, 3)``) each image is decoded once, resized so that its shorter side is ``S`` and
    centre-cropped to ``S x S``; the stored array is what ``transform`` sees from then on (the
    random crop of the training recipe then draws from that square, not from the full picture).

    ``augment`` (``auto``, ``device`` or ``cpu``, see the module docstring) and ``store`` (a
    :class:`~balanced_sam.data.images.PictureStore`) serve the device path: :meth:`pictures`
    gives the split as ``uint8`` pictures from a filled cache.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        paths: Sequence[str],
        ages: Sequence[float] | np.ndarray,
        transform: Callable[[Any], torch.Tensor],
        cache: ArrayCache | None = None,
        *,
        augment: str = "cpu",
        store: PictureStore | None = None,
    ) -> None:
        if augment not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got "
                             f"{augment!r}")
        if augment == "device" and store is None:
            raise ValueError("augment='device' needs a picture store (store=PictureStore(...))")
        self.augment = augment
        self.store = store
        self.root = Path(root)
        self.paths = [str(p) for p in paths]
        self.ages = torch.tensor(np.array(ages, dtype=np.float32))
        if self.ages.shape != (len(self.paths),):
            raise ValueError(f"got {len(self.paths)} paths but {tuple(self.ages.shape)} ages")
        self.transform = transform
        self.cache = cache
        self._cache_size = cache.fields["rgb"][0][0] if cache is not None else 0

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def targets(self) -> torch.Tensor:
        """All labels (float32, shape ``(n,)``) without decoding an image."""
        return self.ages

    def load_image(self, i: int) -> Any:
        """The RGB ``PIL.Image`` of sample ``i`` (from the cache when it holds it)."""
        from PIL import Image

        if self.cache is None:
            return open_rgb(self.root / self.paths[i])
        rec = self.cache.get(i)
        if rec is not None:
            return Image.fromarray(rec["rgb"])
        from torchvision.transforms import functional as TF

        s = self._cache_size
        img = TF.center_crop(TF.resize(open_rgb(self.root / self.paths[i]), s), [s, s])
        self.cache.put(i, {"rgb": np.asarray(img, dtype=np.uint8)})
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.load_image(i)), self.ages[i]

    # -- the device path: uint8 pictures from a cache filled before training
    def picture_cache(self) -> ArrayCache:
        """The :class:`~balanced_sam.data.images.ArrayCache` of :attr:`store` (opened or
        created; not filled)."""
        if self.store is None:
            raise ValueError("this dataset has no picture store (build it with augment='auto' "
                             "or 'device')")
        return self.store.open(len(self))

    def picture_record(self, i: int) -> dict[str, np.ndarray]:
        """Decode sample ``i`` into the store's layout."""
        assert self.store is not None
        return self.store.record(open_rgb(self.root / self.paths[i]))

    def pictures(self, processes: int = 1, progress: bool = False) -> CachedPictures:
        """The split as ``uint8`` pictures (:class:`~balanced_sam.data.images.CachedPictures`),
        after filling whatever the cache lacks with ``processes`` processes."""
        from balanced_sam.data.images import fill_cache

        cache = self.picture_cache()
        assert self.store is not None
        report = fill_cache(cache, self.picture_record, processes=processes,
                            record_bytes=self.store.record_bytes, progress=progress,
                            desc=f"caching {cache.prefix.name}")
        return CachedPictures(cache, self.ages, fill_report=report)


def read_age_csv(csv_path: str | os.PathLike[str], what: str) -> Any:
    """Read an ``age,path,split`` CSV and validate it (numeric finite ages >= 0, known splits)."""
    import pandas as pd

    df = read_split_csv(csv_path, AGE_COLUMNS, what=what)
    ages = pd.to_numeric(df["age"], errors="coerce")
    bad = ~np.isfinite(ages.to_numpy(dtype=np.float64)) | (ages.to_numpy() < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CSVFormatError(f"{what} {csv_path}: column 'age' must hold finite ages >= 0; row "
                             f"{i + 2} has {df['age'].iloc[i]!r} ({int(bad.sum())} bad rows)")
    from balanced_sam.data.tabular import FAR_IQRS, far_targets

    far, med, _ = far_targets(ages.to_numpy(dtype=np.float64))
    if far.size:
        i = int(far[0])
        raise CSVFormatError(f"{what} {csv_path}: row {i + 2} has age {df['age'].iloc[i]!r}, "
                             f"more than {FAR_IQRS:g} interquartile ranges from the median "
                             f"{med:g} ({far.size} such rows): fix or drop it")
    df["age"] = ages.astype(np.float32)
    unknown = sorted(set(df["split"].astype(str)) - set(SPLITS))
    if unknown:
        raise CSVFormatError(f"{what} {csv_path}: column 'split' must hold {list(SPLITS)}, "
                             f"found {unknown[:5]}")
    return df


def build_age_splits(
    root: str | os.PathLike[str],
    csv_name: str,
    what: str,
    hint: str,
    img_size: int = 224,
    cache: bool | str | os.PathLike[str] = False,
    *,
    csv: str | os.PathLike[str] | None = None,
    verify: str = "exists",
    transform_train: Callable[[Any], torch.Tensor] | None = None,
    transform_test: Callable[[Any], torch.Tensor] | None = None,
    augment: str = "auto",
) -> dict[str, AgeImageDataset | None]:
    """Shared body of the age benchmarks' ``build_splits`` (see :func:`build_splits`)."""
    if verify not in ("none", "exists", "decode"):
        raise ValueError(f"verify must be 'none', 'exists' or 'decode', got {verify!r}")
    if augment not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)} (where a training "
                         f"run applies the recipe's augmentation), got {augment!r}")
    if transform_train is not None or transform_test is not None:
        if augment == "device":
            raise ValueError("augment='device' applies the recipe's augmentation on the device; "
                             "custom transform_train / transform_test need augment='cpu'")
        augment = "cpu"
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    r = require_root(root, what, hint)
    csv_path = Path(csv) if csv is not None else r / csv_name
    df = read_age_csv(csv_path, f"{what} split CSV")
    if verify != "none":
        check_files_exist(r, df["path"].tolist(), f"{what} images", hint)
    if verify == "decode":
        check_images_decode(r / p for p in df["path"])
    tf_train = transform_train or age_train_transform(img_size)
    tf_test = transform_test or age_test_transform(img_size)
    cache_dir: Path | None = None
    if cache:
        cache_dir = Path(cache) if not isinstance(cache, bool) else r / ".bsam_cache"
    # the device path always reads a filled cache: data.cache's folder, else root/.bsam_cache
    picture_dir = cache_dir or r / ".bsam_cache"
    size = round(img_size * 256 / 224)
    out: dict[str, AgeImageDataset | None] = {}
    for split in SPLITS:
        part = df[df["split"] == split]
        if len(part) == 0:
            out[split] = None
            continue
        paths = part["path"].tolist()
        square = f"{Path(csv_name).stem}-{split}-{size}-{list_digest(paths, size)}"
        arrays = None
        if cache_dir is not None:
            arrays = ArrayCache(cache_dir / square, len(paths),
                                {"rgb": ((size, size, 3), np.uint8)})
        pictures = None
        if augment != "cpu":  # training: whole pictures; evaluation: the squares above
            name = (f"{Path(csv_name).stem}-{split}-{size}-whole-"
                    f"{list_digest(paths, size, 'whole')}") if split == "train" else square
            pictures = PictureStore(picture_dir / name, size, split == "train", img_size)
        out[split] = AgeImageDataset(r, paths, part["age"].to_numpy(np.float32),
                                     tf_train if split == "train" else tf_test, arrays,
                                     augment=augment, store=pictures)
    if out["train"] is None:
        raise CSVFormatError(f"{what} split CSV {csv_path} has no 'train' rows")
    return out


def build_splits(
    root: str | os.PathLike[str],
    img_size: int = 224,
    cache: bool | str | os.PathLike[str] = False,
    **options: Any,
) -> dict[str, AgeImageDataset | None]:
    """AgeDB-DIR train / val / test datasets from ``root/agedb.csv``.

    Args:
        root: folder holding ``agedb.csv`` and the ``AgeDB/`` images.
        img_size: side of the square network input (224 in the paper).
        cache: ``True`` to keep decoded, resized images in memory-mapped files under
            ``root/.bsam_cache``; a path to put them elsewhere; ``False`` to decode every time
            (on the ``cpu`` path; the device path always reads a cache, in this folder when one
            is given, else under ``root/.bsam_cache``).
        augment: ``auto`` (default), ``device`` or ``cpu``: where a training run applies the
            recipe's augmentation (see the module docstring).
        csv: another split CSV (same columns) instead of ``root/agedb.csv``.
        verify: ``"exists"`` (default) checks that every listed image exists; ``"decode"`` also
            decodes each (slow); ``"none"`` checks nothing up front.
        transform_train / transform_test: replace the recipe's transforms.

    Raises ``DatasetNotFoundError`` (missing root or CSV), ``MissingImagesError`` (names the
    first few missing images), ``CSVFormatError`` (columns expected vs found, bad ages or splits)
    and ``CorruptImageError`` (names the file) with ``verify="decode"`` or when a bad image is read.
    """
    return build_age_splits(root, CSV_NAME, "AgeDB-DIR", HINT, img_size, cache, **options)


def age_train_labels(root: str | os.PathLike[str], csv_name: str, what: str, hint: str,
                     csv: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """The training ages of an ``age,path,split`` benchmark from its CSV alone (float32,
    ``(n_train,)``); shared by AgeDB-DIR and IMDB-WIKI-DIR."""
    r = require_root(root, what, hint)
    df = read_age_csv(Path(csv) if csv is not None else r / csv_name, f"{what} split CSV")
    return torch.from_numpy(df.loc[df["split"] == "train", "age"].to_numpy(np.float32, copy=True))


def train_labels(root: str | os.PathLike[str], **options: Any) -> torch.Tensor:
    """The training ages of AgeDB-DIR (float32, shape ``(n_train,)``) from the CSV alone."""
    return age_train_labels(root, CSV_NAME, "AgeDB-DIR", HINT, options.get("csv"))
