"""The shape every benchmark dataset takes before it reaches the training loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["BenchData", "DATASETS", "register_dataset", "get_dataset"]


@dataclass
class BenchData:
    """Train / validation / test tensors of one benchmark, ready for ``balanced_sam.train``.

    ``y_*`` hold targets in their original units (dollars, degrees, years) as float32 of shape
    ``(n,)``; the training loop standardises them itself when ``standardize_target`` is true and
    reports every metric in the original units. ``x_*`` are model inputs (already preprocessed:
    standardised features, image tensors, ...). ``bins`` describes how the labels are binned
    (keyword arguments of ``LabelBins.from_labels``, e.g. ``{"bin_width": 250.0, "lower": 0.0}``).
    ``make_model()`` builds a fresh, randomly initialised regressor with one output.
    ``defaults`` holds the recipe chosen for this dataset (``epochs``, ``lr``, ``batch_size``,
    ``optimizer``, ``weight_decay``, ``momentum``, ``rho``, ...). ``info`` is recorded verbatim in
    ``results.json`` (split cap C, train fraction, source of the data, ...).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    bins: dict[str, Any]
    make_model: Callable[[], nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    standardize_target: bool = True
    target_unit: str = ""


# name -> loader(**options) -> BenchData. Loaders take keyword options such as seed, data_root,
# train_fraction; each ignores what it does not use.
DATASETS: dict[str, Callable[..., BenchData]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., BenchData]], Callable[..., BenchData]]:
    """Decorator: make ``loader`` available as ``bsam bench --dataset NAME``."""

    def deco(loader: Callable[..., BenchData]) -> Callable[..., BenchData]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = loader
        return loader

    return deco


def get_dataset(name: str, **options: Any) -> BenchData:
    """Load a registered benchmark dataset by name."""
    _load_builtin()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**options)


def _load_builtin() -> None:
    # Importing the modules registers their datasets; done lazily so that importing
    # balanced_sam.data does not import pandas or torchvision.
    import importlib

    for mod in ("diamonds", "rotated_mnist"):
        try:
            importlib.import_module(f"balanced_sam.data.{mod}")
        except ModuleNotFoundError as exc:  # a module not written yet, or an optional dependency
            if exc.name and exc.name.startswith("balanced_sam"):
                continue
            raise
