"""Target scaling: the one place where targets are standardised for the loss and predictions are
brought back to label units.

The loss of a regressor trained on raw prices (thousands of dollars) or angles would be far from
the unit scale the recipes' learning rates assume, so tabular and rotated benchmarks train on
``(y - mean) / std`` of the training targets. Everything else stays in label units: the bins, the
importance weights (looked up from the raw targets), the metrics and the analysis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TargetScaler", "InLabelUnits"]


@dataclass(frozen=True)
class TargetScaler:
    """``scale(y) = (y - mean) / std`` for the loss, ``unscale(p) = p * std + mean`` for the
    predictions. The default (``mean=0, std=1``) changes nothing."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"TargetScaler needs a finite mean and a finite std > 0, got "
                             f"mean={self.mean}, std={self.std}")

    @classmethod
    def fit(cls, train_targets: torch.Tensor) -> TargetScaler:
        """Mean and (unbiased) standard deviation of the training targets; a constant target
        keeps ``std = 1``."""
        y = torch.as_tensor(train_targets)
        if y.numel() == 0:
            raise ValueError("TargetScaler.fit: no training targets")
        mean = y.mean().item()
        std = y.std().item() if y.numel() > 1 else 0.0
        return cls(float(mean), float(std) if std > 0 and math.isfinite(std) else 1.0)

    @classmethod
    def from_stats(cls, stats: TargetScaler | Sequence[float] | Mapping[str, float] | None
                   ) -> TargetScaler:
        """From a scaler, a ``to_dict()`` mapping, a ``(mean, std)`` pair (the ``target_stats``
        of checkpoints written before ``target_scaler``), or ``None`` (no scaling)."""
        if stats is None:
            return cls()
        if isinstance(stats, TargetScaler):
            return stats
        if isinstance(stats, Mapping):
            return cls(float(stats["mean"]), float(stats["std"]))
        mean, std = stats
        return cls(float(mean), float(std))

    @property
    def is_identity(self) -> bool:
        return self.mean == 0.0 and self.std == 1.0

    def scale(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets as the loss sees them."""
        return (targets - self.mean) / self.std

    def unscale(self, predictions: torch.Tensor) -> torch.Tensor:
        """Predictions in label units."""
        return predictions * self.std + self.mean

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` with its outputs in label units (for tools that call the model directly)."""
        return model if self.is_identity else InLabelUnits(model, self)

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}


class InLabelUnits(nn.Module):
    """A model that predicts scaled targets, seen in label units."""

    def __init__(self, model: nn.Module, target_scaler: TargetScaler) -> None:
        super().__init__()
        self.model = model
        self.target_scaler = target_scaler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_scaler.unscale(self.model(x))
