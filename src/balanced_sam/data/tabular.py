"""Any table -> a deep-imbalanced-regression (DIR) benchmark.

The split follows the recipe of AgeDB-DIR (Yang et al., 2021): bin the target; in every bin shuffle
the rows with a fixed seed and put ``min(n // 3, C)`` of them into validation and as many into
test; the rest is training data. Validation and test are then (nearly) balanced over the bins while
training keeps the real long tail. Optionally a fixed random fraction of the remaining training rows
is kept (:func:`subsample`), which thins the tail further so that few-shot bins appear.

Features go through :class:`TablePreprocessor`: numeric columns are standardised with training
statistics, categorical columns are one-hot encoded with 0/1 values (never standardised, so that a
category unseen in training becomes all zeros instead of a huge input). It and the checks of the
feature columns live in :mod:`balanced_sam.data.table_features`; this module holds the binning,
the split and :func:`load_table`.

:func:`load_table` ties everything together and returns a
:class:`~balanced_sam.data.base.BenchData` for ``bsam bench --csv FILE --target COL``; the recipe
and the model of tables are the ``csv`` entry of :mod:`balanced_sam.data.registry`. pandas is
needed here (``pip install 'balanced-sam[cli]'``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from balanced_sam.bins import LabelBins
from balanced_sam.data.base import BenchData, file_digest
from balanced_sam.data.table_features import (
    MAX_FEATURES,
    TablePreprocessor,
    feature_columns,
    refuse_mixed,
)
from balanced_sam.errors import spell

__all__ = [
    "TablePreprocessor",
    "bin_range",
    "default_bin_width",
    "dir_split",
    "far_targets",
    "load_table",
    "subsample",
    "table_bins",
]

_NICE_STEPS = (1.0, 2.0, 2.5, 5.0, 10.0)
#: the share of targets at each end that the default bin width does not look at (outliers)
_TAIL = 0.005
#: with more bins than this many times max_bins, the range is cut at the quantiles (outliers)
_STRETCH = 4
#: a target farther than this many interquartile ranges from the median is refused
#: (:func:`far_targets`); diamond prices reach 3.8, a log-normal tail of sigma 1 about 60 and
#: one of sigma 2 (eight orders of magnitude) about 2,000 in 100,000 rows: only a value orders
#: of magnitude off the scale of the rest trips it
FAR_IQRS = 10_000.0


# ---------------------------------------------------------------------------------- binning
def default_bin_width(targets: Any, max_bins: int = 100) -> float:
    """The bin width used when none is given: the smallest "nice" number (1, 2, 2.5 or 5 times a
    power of ten) that is at least ``span / max_bins``, where ``span`` runs from the 0.5% to the
    99.5% quantile of the targets (the whole range when that is empty).

    So a target spans about ``max_bins`` bins, like the ~100 one-year bins of AgeDB-DIR; ages
    0-100 get width 1, diamond prices ($326-$18,823) get $200. The quantiles keep a few outliers
    (one price of 1e9) from stretching the width until every ordinary row shares one bin. A fixed
    bin count rather than a data-driven rule such as Freedman-Diaconis keeps the number of bins,
    and hence the size of the balanced validation and test sets, independent of the number of
    rows.
    """
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if y.size == 0:
        raise ValueError("targets is empty: cannot choose a bin width")
    if not np.isfinite(y).all():
        raise ValueError("targets holds NaN/inf values: cannot choose a bin width")
    if not (isinstance(max_bins, int) and max_bins >= 1):
        raise ValueError(f"max_bins must be a positive integer, got {max_bins!r}")
    lo, hi = np.quantile(y, [_TAIL, 1 - _TAIL])
    span = float(hi - lo)
    if span <= 0:
        span = float(y.max() - y.min())
    if span <= 0:
        raise ValueError(f"the target is constant ({y[0]:g}): there is nothing to bin")
    return _nice(span / max_bins)


def _nice(raw: float) -> float:
    power = 10.0 ** math.floor(math.log10(raw))
    for step in _NICE_STEPS:
        if step * power >= raw * (1 - 1e-12):
            return float(step * power)
    return float(10.0 * power)  # pragma: no cover - _NICE_STEPS ends at 10


def bin_range(targets: Any, bin_width: float, lower: float | None = None) -> tuple[float, float]:
    """``(lower, upper)`` of equal-width bins that hold every target.

    Without ``lower`` the range starts at ``floor(min / bin_width) * bin_width`` (as
    :meth:`LabelBins.from_labels` does); it ends at the first bin edge above the largest target.
    """
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    _check_bin_width(bin_width)
    lo = float(lower) if lower is not None else math.floor(float(y.min()) / bin_width) * bin_width
    if float(y.min()) < lo:
        raise ValueError(f"lower ({lo:g}) is above the smallest target ({float(y.min()):g})")
    hi = lo + (math.floor((float(y.max()) - lo) / bin_width) + 1) * bin_width
    while hi <= float(y.max()):  # guard against rounding in the division above
        hi += bin_width
    return lo, hi


def table_bins(targets: Any, bin_width: float | None = None, lower: float | None = None,
               max_bins: int = 100) -> dict[str, Any]:
    """The bins of a table's target, as ``LabelBins.from_labels`` keyword arguments.

    Equal bins of ``bin_width`` (default :func:`default_bin_width`) from ``lower`` over every
    target. When no width is given and outliers would stretch that range over more than
    ``4 * max_bins`` bins, the range is cut at the 0.5% / 99.5% quantiles instead and the bins
    ``clamp``: a target beyond them counts in the first or last bin (``clamp: True`` is then part
    of the result). Given widths are used as they are.
    """
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    chosen = bin_width is None
    width = default_bin_width(y, max_bins) if chosen else float(bin_width)  # type: ignore[arg-type]
    _check_bin_width(width)
    lo, hi = bin_range(y, width, lower)
    if chosen and lower is None and (hi - lo) / width > _STRETCH * max_bins:
        q_lo, q_hi = np.quantile(y, [_TAIL, 1 - _TAIL])
        lo, hi = bin_range(np.array([q_lo, q_hi]), width)
        return {"bin_width": width, "lower": lo, "upper": hi, "clamp": True}
    return {"bin_width": width, "lower": float(lo), "upper": float(hi)}


def _check_bin_width(bin_width: Any) -> None:
    if isinstance(bin_width, bool) or not isinstance(bin_width, (int, float)) or not (
        math.isfinite(bin_width) and bin_width > 0
    ):
        raise ValueError(f"bin_width must be a positive number, got {bin_width!r}")


def _split_bins(targets: np.ndarray, bin_width: float | None, edges: Any, lower: float | None,
                clamp: bool = False) -> np.ndarray:
    """Bin index of every target for the split, computed by :class:`LabelBins` so that the
    split's bins are exactly the ones the training loop rebuilds from ``BenchData.bins``."""
    if edges is not None:
        if bin_width is not None or lower is not None:
            raise ValueError("give either edges or bin_width/lower, not both")
        bins = LabelBins.from_labels(targets, edges=edges, clamp=clamp)
    else:
        bins = LabelBins.from_labels(targets, **table_bins(targets, bin_width, lower))
    return bins.bin_index(targets).numpy()


def far_targets(targets: Any, iqrs: float = FAR_IQRS) -> tuple[np.ndarray, float, float]:
    """``(indices, median, scale)``: the targets farther than ``iqrs`` times ``scale`` from the
    median, where ``scale`` is the interquartile range (the 1%-99% range when half the targets
    share one value; no target is far when that is zero too).

    One such value (a price of 1e12 among prices up to 1e4, a typo or a missing-value code)
    makes the standardised target and equal-width bins meaningless: the standard deviation is
    the outlier's, every ordinary target lands within a hair of the mean. The rule is robust:
    the outlier itself moves neither the median nor the quartiles, and a genuinely long tail
    stays far below the threshold (see :data:`FAR_IQRS`)."""
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if y.size == 0:
        return np.zeros(0, dtype=np.int64), math.nan, math.nan
    q01, q1, med, q3, q99 = np.quantile(y, [0.01, 0.25, 0.5, 0.75, 0.99])
    scale = float(q3 - q1) if q3 > q1 else float(q99 - q01)
    if not scale > 0:
        return np.zeros(0, dtype=np.int64), float(med), 0.0
    far = np.flatnonzero(np.abs(y - med) > iqrs * scale)
    return far.astype(np.int64), float(med), scale


def _check_far_targets(y: np.ndarray, index: Any, target: str, source: str) -> None:
    far, med, scale = far_targets(y)
    if far.size == 0:
        return
    worst = int(far[np.argmax(np.abs(y[far] - med))])
    label = index[worst]
    where = (f"row {label} (line {int(label) + 2} of {source})" if source != "dataframe"
             and isinstance(label, (int, np.integer)) else f"row {label!r}")
    raise ValueError(
        f"target column {target!r}: {where} holds {y[worst]:.6g}, "
        f"{abs(y[worst] - med) / scale:.3g} interquartile ranges from the median {med:.6g} "
        f"({far.size} value(s) beyond {FAR_IQRS:g} of them); a value that far off the scale "
        "makes the bins and the standardised target meaningless: drop or fix that row (a typo, "
        "a missing-value code?), or, for a tail that long, predict log(target)")


# ---------------------------------------------------------------------------------- the split
def dir_split(
    targets: Any,
    bin_width: float | None = None,
    edges: Sequence[float] | np.ndarray | None = None,
    lower: float | None = None,
    cap: int = 50,
    seed: int = 0,
    min_per_bin: int = 3,
    *,
    clamp: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DIR-style split: per bin ``min(n // 3, cap)`` rows for validation, as many for test.

    Args:
        targets: one numeric label per row (finite).
        bin_width: width of equal bins starting at ``lower`` (default: ``floor(min / width) *
            width``); without ``bin_width`` and ``edges``, :func:`default_bin_width`.
        edges: explicit increasing bin edges covering every target (instead of ``bin_width``).
        lower: the first edge of equal-width bins.
        clamp: with ``edges``, count targets outside them in the first or last bin (else they
            are an error).
        cap: ``C``, the most rows one bin gives to validation (and to test). AgeDB-DIR used 30,
            IMDB-WIKI-DIR 150.
        seed: seed of the shuffle inside each bin; the same seed gives the same split.
        min_per_bin: bins with fewer rows give nothing to validation and test (all their rows go to
            training). At least 3, the smallest ``n`` for which ``n // 3 > 0``.

    Returns:
        ``(train_idx, val_idx, test_idx)``: sorted int64 row indices, disjoint, covering every row.

    The shuffle is vectorised: every row draws a random key, rows are sorted by (bin, key) and a
    row's rank inside its bin decides where it goes.
    """
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if y.size == 0:
        raise ValueError("targets is empty: a split needs at least one row")
    if not np.isfinite(y).all():
        n_bad = int((~np.isfinite(y)).sum())
        raise ValueError(f"targets holds {n_bad} NaN/inf value(s); drop or fix those rows first")
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
        raise ValueError(f"cap must be a positive integer (the C of the DIR split), got {cap!r}")
    if (isinstance(min_per_bin, bool) or not isinstance(min_per_bin, (int, np.integer))
            or min_per_bin < 3):
        raise ValueError(f"min_per_bin must be an integer >= 3, got {min_per_bin!r}")
    if bin_width is not None:
        _check_bin_width(bin_width)

    b = _split_bins(y, bin_width, edges, lower, clamp)
    counts = np.bincount(b)
    take = np.minimum(counts // 3, int(cap))
    take[counts < min_per_bin] = 0

    keys = np.random.default_rng(seed).random(y.size)
    order = np.lexsort((keys, b))  # by bin, random inside a bin
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    b_sorted = b[order]
    rank = np.arange(y.size) - starts[b_sorted]
    k = take[b_sorted]
    val = np.sort(order[rank < k])
    test = np.sort(order[(rank >= k) & (rank < 2 * k)])
    train = np.sort(order[rank >= 2 * k])
    return train.astype(np.int64), val.astype(np.int64), test.astype(np.int64)


def subsample(indices: Any, fraction: float, seed: int = 0) -> np.ndarray:
    """A fixed random ``fraction`` of ``indices`` (sorted): exactly ``round(fraction * n)`` of them.

    Used after :func:`dir_split` to keep part of the training rows (the diamonds benchmark keeps
    20%), which leaves the long tail with few-shot bins. ``fraction=1`` returns every index.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
        0 < fraction <= 1
    ):
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1:
        return np.sort(idx)
    n_keep = int(round(fraction * idx.size))
    # (seed, 1): a stream independent of dir_split's, which uses the plain seed
    chosen = np.random.default_rng([seed, 1]).permutation(idx.size)[:n_keep]
    return np.sort(idx[chosen])


# ---------------------------------------------------------------------------------- load_table
def _read_frame(source: Any) -> tuple[pd.DataFrame, str]:
    if isinstance(source, pd.DataFrame):
        return source, "dataframe"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"csv_path_or_dataframe: no such file: {path!r}")
        with open(path, "rb") as f:
            if b"\0" in f.read(1 << 16):
                raise ValueError(f"{path} is a binary file (it holds NUL bytes), not a CSV text "
                                 "table")
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError as exc:
            raise ValueError(f"csv_path_or_dataframe: {path!r} is empty") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not a UTF-8 text table ({exc.reason} at byte "
                             f"{exc.start} of a block): give a CSV file saved as UTF-8 (a "
                             "binary file, or one in another encoding, cannot be read)") from None
        except pd.errors.ParserError as exc:
            raise ValueError(f"{path} is not a readable CSV table: "
                             f"{str(exc).strip().splitlines()[0]}") from None
        return frame, path
    raise TypeError("csv_path_or_dataframe must be a CSV path or a pandas DataFrame, got "
                    f"{type(source).__name__}")


def _numeric_target(frame: pd.DataFrame, target: str, dropna: bool,
                    source: str = "dataframe") -> tuple[pd.DataFrame, int]:
    """The rows with a usable target, and how many were dropped for a missing one; a target
    orders of magnitude off the others' scale is refused (:func:`far_targets`)."""
    raw = frame[target]
    if pd.api.types.is_bool_dtype(raw.dtype):
        raise ValueError(f"target column {target!r} is boolean; a regression target must be a "
                         "number")
    y = pd.to_numeric(raw, errors="coerce")
    unparsable = y.isna() & raw.notna()
    if unparsable.any():
        bad = pd.unique(raw[unparsable])[:5].tolist()
        raise ValueError(f"target column {target!r} must be numeric: {int(unparsable.sum())} "
                         f"value(s) cannot be parsed as numbers, e.g. {bad}")
    y = y.astype(np.float64)
    inf = np.isinf(y.to_numpy())
    if inf.any():
        raise ValueError(f"target column {target!r} holds {int(inf.sum())} infinite value(s)")
    nan = y.isna().to_numpy()
    if nan.any():
        if not dropna:
            raise ValueError(f"target column {target!r} has {int(nan.sum())} missing (NaN) "
                             f"value(s) out of {len(y)}; pass {spell('dropna')} to drop those "
                             "rows")
        frame = frame.loc[~nan]
        y = y.loc[~nan]
    _check_far_targets(y.to_numpy(), frame.index, target, source)
    frame = frame.copy()
    frame[target] = y
    return frame.reset_index(drop=True), int(nan.sum())


def load_table(
    csv_path_or_dataframe: str | os.PathLike | pd.DataFrame, target: str,
    bin_width: float | None = None, cap: int = 50, train_fraction: float = 1.0, seed: int = 0,
    features: Sequence[str] | None = None, categorical: Sequence[str] | None = None,
    name: str | None = None, *, dropna: bool = False, impute: str | None = None,
    lower: float | None = None, min_per_bin: int = 3, target_unit: str = "",
    max_categories: int = 200, max_features: int = MAX_FEATURES,
) -> BenchData:
    """Read a table and build a DIR benchmark from it (``bsam bench --csv FILE --target COL``).

    Args:
        csv_path_or_dataframe: path of a CSV file, or a pandas DataFrame.
        target: the numeric column to predict.
        bin_width: width of the target bins (default: :func:`table_bins`: about 100 bins over
            the targets, robust to outliers).
        cap: ``C`` of the split (:func:`dir_split`).
        train_fraction: fraction of the remaining training rows to keep, in ``(0, 1]``.
        seed: the split seed (rows for validation/test and the kept training fraction). It is not
            a training seed: every training seed should see the same split.
        features: the feature columns (default: every column but the target).
        categorical: columns to one-hot encode even if numeric; bool/object/string/category
            columns are categorical anyway.
        name: dataset name recorded in results (default: the file's stem, or ``"table"``).
        dropna: drop rows whose target is missing instead of raising.
        impute: ``"median"`` to fill missing numeric features with the training median.
        lower: first bin edge (default ``floor(min / bin_width) * bin_width``).
        min_per_bin: see :func:`dir_split`.
        target_unit: unit of the target for tables and plots (e.g. ``"$"``).
        max_categories: the most categories a categorical column may have.
        max_features: the most encoded input features (see :class:`TablePreprocessor`).

    The returned ``BenchData.bins`` is ``{"bin_width", "lower", "upper"}`` covering every row
    (plus ``"clamp": True`` when outliers were left beyond the default bins, see
    :func:`table_bins`), so ``LabelBins.from_labels(y_train, **bins)`` gives exactly the split's
    bins, and validation / test labels always fall in them. ``info["files"]`` and
    ``info["split_params"]`` make the data's fingerprint. Targets stay in their units
    (float32); the training loop standardises them (``standardize_target=True``).
    """
    frame, source = _read_frame(csv_path_or_dataframe)
    feats, categorical = feature_columns(frame, target, features, categorical)
    frame, n_dropped = _numeric_target(frame, target, dropna, source)
    if len(frame) == 0:
        raise ValueError(f"no rows left: every value of target column {target!r} is missing")
    # Bin the float32 targets the model and the training loop will see, so that the bins the
    # loop rebuilds from y_train put every row in the same bin as the split did.
    y32 = frame[target].to_numpy(dtype=np.float32)
    if bin_width is not None:
        _check_bin_width(bin_width)
    bins = table_bins(y32.astype(np.float64), bin_width, lower)
    train_all, val, test, train = _split_rows(y32.astype(np.float64), bins, cap, seed,
                                              min_per_bin, train_fraction)

    x_frame = frame[feats]
    refuse_mixed(x_frame, categorical or [])  # every row's values, not only the training rows'
    pre = TablePreprocessor(categorical=categorical, impute=impute,
                            max_categories=max_categories, max_features=max_features)
    pre.fit(x_frame.iloc[train])

    def take(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return pre.transform(x_frame.iloc[rows]), torch.from_numpy(y32[rows].copy())

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = take(train), take(val), take(test)
    if name is None:
        name = (os.path.splitext(os.path.basename(source))[0] if source != "dataframe"
                else "table")
    split = {"cap": int(cap), "seed": int(seed), "train_fraction": float(train_fraction),
             "min_per_bin": int(min_per_bin), "dropna": dropna, "impute": impute,
             "max_categories": max_categories, "categorical": sorted(map(str, categorical or []))}
    info = _table_info(csv_path_or_dataframe, source, name, target, y32, y_tr, bins, split, pre,
                       feats, {"rows": int(len(frame) + n_dropped), "dropped_nan_target":
                               n_dropped, "train_before_fraction": int(train_all.size),
                               "train": int(train.size), "val": int(val.size),
                               "test": int(test.size)})
    return BenchData(name=name, x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va, x_test=x_te,
                     y_test=y_te, bins=bins, info=info,
                     standardize_target=True, target_unit=target_unit)


def _table_info(raw: Any, source: str, name: str, target: str, y: np.ndarray,
                y_train: torch.Tensor, bins: dict[str, Any], split: dict[str, Any],
                pre: TablePreprocessor, feats: list[Any], sizes: dict[str, int]
                ) -> dict[str, Any]:
    """What ``results.json`` records about a table, its split and its fingerprint."""
    return {
        "source": source,
        "target": target,
        "split": "dir",
        "C": split["cap"],
        "train_fraction": split["train_fraction"],
        "split_seed": split["seed"],
        "bin_width": float(bins["bin_width"]),
        "lower": float(bins["lower"]),
        "upper": float(bins["upper"]),
        "num_bins": LabelBins.from_labels(y_train, **bins).num_bins,
        "min_per_bin": split["min_per_bin"],
        "outside_bins": int(((y < bins["lower"]) | (y >= bins["upper"])).sum()),
        "sizes": sizes,
        "features": {"numeric": [str(c) for c in pre.numeric_],
                     "categorical": [str(c) for c in pre.categorical_],
                     "encoded": pre.num_features},
        "files": {name if source == "dataframe" else os.path.basename(source):
                  _frame_digest(raw)},
        "split_params": {"target": target, **bins, **split, "features": [str(c) for c in feats]},
    }


def _split_rows(y: np.ndarray, bins: dict[str, Any], cap: int, seed: int, min_per_bin: int,
                train_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train before the fraction, val, test, train)`` row indices, with clear errors when a
    part would be empty."""
    edges = LabelBins.from_labels(y, **bins).edges.numpy()
    clamp = bool(bins.get("clamp", False))
    train_all, val, test = dir_split(y, edges=edges, cap=cap, seed=seed,
                                     min_per_bin=min_per_bin, clamp=clamp)
    if val.size == 0:
        largest = int(np.bincount(_split_bins(y, None, edges, None, clamp)).max())
        raise ValueError(
            f"too few rows for a DIR split: every bin of width {bins['bin_width']:g} holds fewer "
            f"than {min_per_bin} rows (largest bin: {largest} of {len(y)} rows), so validation "
            f"and test would be empty; use a wider bin width ({spell('bin_width', 10.0)}) or more "
            "rows")
    train = subsample(train_all, train_fraction, seed=seed)
    if train.size == 0:
        raise ValueError(
            f"too few rows for a DIR split: the training set is empty ({train_all.size} rows "
            f"left after validation/test, {spell('train_fraction', train_fraction)}); use more "
            f"rows, a larger train fraction or a smaller cap ({spell('cap', 10)})")
    return train_all, val, test, train


def _frame_digest(source: Any) -> str:
    """SHA-256 of a CSV file's bytes, or of a DataFrame's content."""
    if isinstance(source, pd.DataFrame):
        values = pd.util.hash_pandas_object(source, index=True).to_numpy()
        cols = ",".join(map(str, source.columns)).encode()
        return hashlib.sha256(values.tobytes() + cols).hexdigest()
    return file_digest(source)


def numeric_target(frame: pd.DataFrame, target: str, *, dropna: bool = False,
                   source: str = "dataframe") -> tuple[pd.DataFrame, int]:
    """``(rows, dropped)``: the rows of ``frame`` whose ``target`` is a usable number (the
    column converted to float64, the index reset) and how many were dropped for a missing one
    (``dropna``). The checks and messages of :func:`load_table` (``--csv``): a boolean or
    text target, infinite values, a value orders of magnitude off the others' scale
    (:func:`far_targets`; ``source`` names the file in that message) and, without ``dropna``,
    missing ones are errors naming the column; other loaders of a CSV with a target (the
    ``images`` dataset) share them."""
    return _numeric_target(frame, target, dropna, source)
