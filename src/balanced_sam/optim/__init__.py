"""Sharpness-aware optimizers: SAM, BalancedSAM (BSAM), ImbSAM and CC-SAM.

The parts, bottom up:

* :mod:`~balanced_sam.optim.norms`: the dual-norm direction, the finite check and clip;
* :mod:`~balanced_sam.optim.weighting`: the weighting of each pass (:class:`PassWeighting`);
* :mod:`~balanced_sam.optim.reuse`: gradient reuse between steps (LookSAM, :class:`GradientReuse`);
* :mod:`~balanced_sam.optim.driver`: the one-call step and the single-pass step;
* :mod:`~balanced_sam.optim.sam`: the optimizer; :mod:`~balanced_sam.optim.balanced` and
  :mod:`~balanced_sam.optim.imbsam`, :mod:`~balanced_sam.optim.ccsam`: what BSAM, ImbSAM
  and CC-SAM change in it.
"""

from balanced_sam.optim.balanced import BalancedSAM
from balanced_sam.optim.ccsam import CCSAM
from balanced_sam.optim.driver import (
    AccumulatedGradientWarning,
    frozen_bn_stats,
    plain_step,
    sharpness_step,
)
from balanced_sam.optim.imbsam import ImbSAM
from balanced_sam.optim.norms import dual_norm_direction
from balanced_sam.optim.reuse import GradientReuse
from balanced_sam.optim.sam import SAM
from balanced_sam.optim.weighting import BalancingNotAppliedWarning, PassWeighting

__all__ = ["SAM", "BalancedSAM", "ImbSAM", "CCSAM", "BalancingNotAppliedWarning", "PassWeighting",
           "GradientReuse", "frozen_bn_stats", "dual_norm_direction", "sharpness_step",
           "plain_step", "AccumulatedGradientWarning"]
