"""Seams for what the core package is adding to :class:`~balanced_sam.bins.LabelBins` and
:class:`~balanced_sam.metrics.RegressionMetrics`, so the application layer has one place to read
them from today. Once LabelBins carries ``many`` / ``few`` (in ``to_dict`` too) and the metrics
default to them, :func:`region_thresholds` reduces to reading the attributes and
:func:`with_thresholds` to passing them to the constructor.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DEFAULT_MANY", "DEFAULT_FEW", "region_thresholds", "with_thresholds",
           "choose_balance"]

#: the DIR papers' region thresholds on a bin's training count (many > 100, few < 20)
DEFAULT_MANY = 100
DEFAULT_FEW = 20


def region_thresholds(bins: Any, many: int | None = None, few: int | None = None
                      ) -> tuple[int, int]:
    """``(many, few)``: the values given, else the bins' own thresholds, else 100 / 20."""
    m = many if many is not None else getattr(bins, "many", None)
    f = few if few is not None else getattr(bins, "few", None)
    return (int(m) if m is not None else DEFAULT_MANY, int(f) if f is not None else DEFAULT_FEW)


def with_thresholds(bins: Any, many: int | None, few: int | None) -> Any:
    """Store region thresholds on ``bins`` (``None`` keeps what the bins hold) and return it."""
    m, f = region_thresholds(bins, many, few)
    if not (isinstance(m, int) and isinstance(f, int) and 0 <= f <= m):
        raise ValueError(f"region thresholds need integers 0 <= few <= many, got many={m}, "
                         f"few={f}")
    bins.many, bins.few = m, f
    return bins


def choose_balance(bins: Any, train_labels: torch.Tensor | None) -> str:
    """What bMAE averages over, decided once per dataset from its training labels.

    ``"label"`` (the DIR papers' bMAE: the mean over the distinct labels of each label's MAE)
    when the labels are whole numbers with no more distinct values than bins (ages: labels
    repeat, each is a class); ``"bin"`` (the mean over bins) otherwise: continuous targets
    (prices, angles, depths per pixel), where nearly every label is distinct and a per-label mean
    would be the plain MAE again.
    """
    if train_labels is None:
        return "bin"
    y = torch.as_tensor(train_labels).reshape(-1).double()
    if y.numel() == 0 or not bool((y == y.round()).all()):
        return "bin"
    return "label" if torch.unique(y).numel() <= bins.num_bins else "bin"
