"""The shape every table-like benchmark takes before it reaches the training loop, and the
content digests that fingerprint a dataset's files."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from balanced_sam.io import sha256_file

__all__ = ["BenchData", "file_digest"]


@dataclass
class BenchData:
    """Train / validation / test tensors of one benchmark, ready for ``balanced_sam.train``.

    ``y_*`` hold targets in their original units (dollars, degrees, years) as float32 of shape
    ``(n,)``; the training loop standardises them itself when ``standardize_target`` is true and
    reports every metric in the original units. ``x_*`` are model inputs (already preprocessed:
    standardised features, image tensors, ...). ``bins`` describes how the labels are binned
    (keyword arguments of ``LabelBins.from_labels``, e.g. ``{"bin_width": 250.0, "lower": 0.0}``).
    ``info`` is recorded verbatim in ``results.json`` (split cap C, train fraction, source of the
    data, ...); its ``files`` (name -> SHA-256) and ``split_params`` make the data's fingerprint.

    The recipe and the model of a dataset come from its entry in
    :mod:`balanced_sam.data.registry` (:func:`~balanced_sam.data.registry.table_loader` turns a
    function returning ``BenchData`` into an entry's loader).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    bins: dict[str, Any]
    # never set any more (the recipe's model spec builds the model); read only by bench.py's
    # _model_text, and removed with it by the bench split
    make_model: Callable[[], nn.Module] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    standardize_target: bool = True
    target_unit: str = ""


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's content, remembered per (path, size, modification time) so that a
    process hashes each data file once."""
    p = os.path.realpath(path)
    st = os.stat(p)
    key = (p, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(p)
    return _DIGESTS[key]

