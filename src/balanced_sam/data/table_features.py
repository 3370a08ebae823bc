"""A table's feature columns: which columns are features, and how they are encoded.

* :func:`feature_columns`: the feature columns (every column but the target, or the ones named)
  and the ones forced categorical, checked against the table.
* :func:`refuse_mixed`: a text column of mostly numbers with a few strings (``"n/a"``, ``"?"``)
  is an error naming the column and some of those strings.
* :class:`TablePreprocessor`: numeric columns are standardised with training statistics,
  categorical columns are one-hot encoded with 0/1 values (never standardised, so that a
  category unseen in training becomes all zeros instead of a huge input).

:func:`balanced_sam.data.tabular.load_table` uses them (``balanced_sam.data.tabular`` re-exports
``TablePreprocessor`` and :data:`MAX_FEATURES`). pandas is needed here (``pip install
'balanced-sam[cli]'``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from balanced_sam.errors import spell

__all__ = ["MAX_FEATURES", "TablePreprocessor", "feature_columns", "refuse_mixed"]


# ---------------------------------------------------------------------------------- encoding
#: the most input features the encoded table may have (numeric columns plus one-hot indicators)
MAX_FEATURES = 10_000
#: a text column whose values are at least this share numbers is "mostly numeric"
_MOSTLY_NUMERIC = 0.5


def refuse_mixed(frame: pd.DataFrame, categorical: Sequence[Any]) -> None:
    """A text column whose values are mostly numbers, with a few that are not (``"n/a"``,
    ``"?"``, a typo), is an error naming the column and some of those values: one-hot encoding
    it would make every distinct number a category, dropping it would lose the feature."""
    for col in frame.columns:
        s = frame[col]
        if col in categorical or not _is_categorical_dtype(s) or pd.api.types.is_bool_dtype(
                s.dtype) or isinstance(s.dtype, pd.CategoricalDtype):
            continue
        values = s.dropna()
        if len(values) == 0:
            continue
        numbers = pd.to_numeric(values, errors="coerce").notna()
        n_num = int(numbers.sum())
        if n_num == len(values) or n_num < _MOSTLY_NUMERIC * len(values):
            continue
        bad = pd.unique(values[~numbers].astype(str))
        raise ValueError(
            f"column {col!r} is mostly numbers ({n_num} of {len(values)} values) but holds "
            f"{len(values) - n_num} that are not, e.g. {bad[:5].tolist()}: fix them or leave "
            "them blank (blanks can be filled with "
            f"{spell('impute', 'median')}), leave the column out "
            f"({spell('features', ['...'])}), or, if its values are codes, declare it "
            f"categorical ({spell('categorical', [str(col)])})")


def _is_categorical_dtype(s: pd.Series) -> bool:
    """Bool, object, string and category columns are categorical; numbers are numeric."""
    dt = s.dtype
    if pd.api.types.is_bool_dtype(dt):
        return True
    return not pd.api.types.is_numeric_dtype(dt)


class TablePreprocessor:
    """Standardise numeric columns and one-hot encode categorical ones (fit on training rows only).

    * Numeric columns: ``(x - mean) / std`` with the training mean and (population) standard
      deviation; a constant column gets ``std = 1``. Missing values raise a ``ValueError`` naming
      the column, unless ``impute="median"``, which fills them with the training median.
    * Categorical columns (bool, object, string or category dtype, plus any named in
      ``categorical``): one 0/1 indicator per category seen in training, in sorted order. These are
      not standardised. A category unseen in training, or a missing value, gives all zeros.
      Columns with more than ``max_categories`` categories are refused (likely an ID or free text).
    * A text column that is mostly numbers with a few strings (``"n/a"``, ``"?"``) is an error
      naming the column and some of those strings, unless it is named in ``categorical``.
    * More than ``max_features`` encoded features in all is an error naming the widest columns.

    Args:
        categorical: columns to treat as categorical even if numeric (e.g. integer codes).
        impute: ``None`` (missing numeric values are an error) or ``"median"``.
        max_categories: the most categories one column may have.
        max_features: the most encoded features (numeric columns plus one-hot indicators).
    """

    def __init__(
        self,
        categorical: Sequence[str] | None = None,
        impute: str | None = None,
        max_categories: int = 200,
        max_features: int = MAX_FEATURES,
    ) -> None:
        if impute not in (None, "median"):
            raise ValueError(f"impute must be None or 'median', got {impute!r}")
        for key, v in (("max_categories", max_categories), ("max_features", max_features)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")
        self.max_features = int(max_features)
        if isinstance(categorical, str):
            categorical = [categorical]
        self.categorical_names: list[str] = list(categorical or [])
        self.impute = impute
        self.max_categories = int(max_categories)
        self.columns_: list[Any] = []
        self.numeric_: list[Any] = []
        self.categorical_: list[Any] = []
        self.mean_: dict[Any, float] = {}
        self.std_: dict[Any, float] = {}
        self.median_: dict[Any, float] = {}
        self.categories_: dict[Any, list[Any]] = {}

    @property
    def fitted(self) -> bool:
        return bool(self.columns_)

    def fit(self, frame: pd.DataFrame) -> TablePreprocessor:
        """Learn column kinds, means, standard deviations and categories from training rows."""
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"fit expects a pandas DataFrame, got {type(frame).__name__}")
        if frame.shape[1] == 0:
            raise ValueError("no feature columns: the table holds only the target")
        if len(frame) == 0:
            raise ValueError("cannot fit on an empty table (no training rows)")
        unknown = [c for c in self.categorical_names if c not in frame.columns]
        if unknown:
            raise ValueError(f"categorical names column(s) {unknown} that are not features; "
                             f"features are {list(frame.columns)}")
        refuse_mixed(frame, self.categorical_names)
        self.columns_ = list(frame.columns)
        self.numeric_, self.categorical_ = [], []
        self.mean_, self.std_, self.median_, self.categories_ = {}, {}, {}, {}
        for col in frame.columns:
            s = frame[col]
            if col in self.categorical_names or _is_categorical_dtype(s):
                if pd.api.types.is_datetime64_any_dtype(s.dtype):
                    raise ValueError(f"feature column {col!r} holds dates; convert it to numbers "
                                     "(e.g. days since a reference date) or leave it out")
                cats = sorted(pd.unique(s.dropna()).tolist(), key=lambda v: (str(type(v)), v))
                if len(cats) > self.max_categories:
                    raise ValueError(
                        f"categorical column {col!r} has {len(cats)} distinct values (more than "
                        f"max_categories={self.max_categories}); it looks like an ID or free text: "
                        f"leave it out ({spell('features', ['...'])}) or raise the limit "
                        f"({spell('max_categories', 1000)})")
                self.categorical_.append(col)
                self.categories_[col] = cats
            else:
                x = s.to_numpy(dtype=np.float64, na_value=np.nan)
                missing = ~np.isfinite(x)
                if missing.any():
                    if self.impute is None:
                        raise ValueError(
                            f"numeric column {col!r} has {int(missing.sum())} missing/inf "
                            "value(s) in the training rows; drop those rows, leave the column "
                            f"out, or pass {spell('impute', 'median')}")
                    if missing.all():
                        raise ValueError(f"numeric column {col!r} has no training value to "
                                         "impute from")
                med = float(np.median(x[~missing]))
                x = np.where(missing, med, x)
                std = float(x.std())
                self.numeric_.append(col)
                self.mean_[col] = float(x.mean())
                self.std_[col] = std if std > 0 and math.isfinite(std) else 1.0
                self.median_[col] = med
        self._check_width()
        return self

    def _check_width(self) -> None:
        width = self.num_features
        if width <= self.max_features:
            return
        widest = sorted(self.categorical_, key=lambda c: -len(self.categories_[c]))[:3]
        shown = ", ".join(f"{c!r} ({len(self.categories_[c])})" for c in widest)
        raise ValueError(
            f"the table would be encoded into {width} features ({len(self.numeric_)} numeric, "
            f"{width - len(self.numeric_)} one-hot indicators of {len(self.categorical_)} "
            f"categorical columns; the widest: {shown}), more than "
            f"max_features={self.max_features}: leave wide columns out "
            f"({spell('features', ['...'])}) or raise the limit "
            f"({spell('max_features', width)})")

    @property
    def feature_names(self) -> list[str]:
        """Names of the output columns: numeric columns, then ``column=category`` indicators."""
        names = list(self.numeric_)
        for col in self.categorical_:
            names += [f"{col}={c}" for c in self.categories_[col]]
        return names

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def transform(self, frame: pd.DataFrame) -> torch.Tensor:
        """Encode rows with the fitted statistics: a float32 tensor ``(rows, num_features)``."""
        if not self.fitted:
            raise RuntimeError("TablePreprocessor.transform called before fit")
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"transform expects a pandas DataFrame, got {type(frame).__name__}")
        missing_cols = [c for c in self.columns_ if c not in frame.columns]
        if missing_cols:
            raise ValueError(f"columns {missing_cols} seen in fit are missing; "
                             f"got {list(frame.columns)}")
        n = len(frame)
        out = np.zeros((n, self.num_features), dtype=np.float32)
        j = 0
        for col in self.numeric_:
            x = frame[col].to_numpy(dtype=np.float64, na_value=np.nan)
            missing = ~np.isfinite(x)
            if missing.any():
                if self.impute is None:
                    raise ValueError(f"numeric column {col!r} has {int(missing.sum())} "
                                     f"missing/inf value(s); pass {spell('impute', 'median')} "
                                     "to fill them with the training median")
                x = np.where(missing, self.median_[col], x)
            out[:, j] = (x - self.mean_[col]) / self.std_[col]
            j += 1
        for col in self.categorical_:
            cats = self.categories_[col]
            # -1 marks a category unseen in training, or a missing value
            codes = pd.Index(cats, dtype=object).get_indexer(frame[col].to_numpy(dtype=object))
            rows = np.flatnonzero(codes >= 0)
            out[rows, j + codes[rows]] = 1.0
            j += len(cats)
        return torch.from_numpy(out)

    def fit_transform(self, frame: pd.DataFrame) -> torch.Tensor:
        return self.fit(frame).transform(frame)


# ---------------------------------------------------------------------------------- columns
def feature_columns(frame: pd.DataFrame, target: str, features: Sequence[str] | None,
                    categorical: Sequence[str] | None) -> tuple[list[Any], list[Any] | None]:
    """The feature columns and the forced-categorical ones, checked against the table."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a column name (str), got {type(target).__name__}")
    columns = [str(c) for c in frame.columns]
    if target not in frame.columns:
        raise ValueError(f"target column {target!r} not found; the table has columns {columns}")
    if features is None:
        feats = [c for c in frame.columns if c != target]
    else:
        feats = [features] if isinstance(features, str) else list(features)
        unknown = [c for c in feats if c not in frame.columns]
        if unknown:
            raise ValueError(f"features names column(s) {unknown} that are not in the table; "
                             f"columns are {columns}")
        if target in feats:
            raise ValueError(f"features must not include the target column {target!r}")
    if not feats:
        raise ValueError(f"no feature columns: the table has only the target {target!r}; "
                         "a regressor needs at least one feature column")
    if categorical is not None:
        categorical = [categorical] if isinstance(categorical, str) else list(categorical)
        not_feat = [c for c in categorical if c not in feats]
        if not_feat:
            raise ValueError(f"categorical names column(s) {not_feat} that are not feature "
                             f"columns; features are {[str(c) for c in feats]}")
    if len(frame) == 0:
        raise ValueError("csv_path_or_dataframe holds no rows")
    return feats, categorical
