"""Sharpness-aware optimizers: SAM, BalancedSAM (BSAM) and ImbSAM."""

from balanced_sam.optim.balanced import BalancedSAM
from balanced_sam.optim.imbsam import ImbSAM
from balanced_sam.optim.sam import (
    SAM,
    BalancingNotAppliedWarning,
    dual_norm_direction,
    frozen_bn_stats,
)

__all__ = ["SAM", "BalancedSAM", "ImbSAM", "BalancingNotAppliedWarning", "frozen_bn_stats",
           "dual_norm_direction"]
