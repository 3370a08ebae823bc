"""The paper's other baselines, as plug-ins of their own kind.

* losses (per-sample, unreduced; the optimizers' weighting applies on top):
  :func:`focal_l1_loss` (focal-R), :class:`BNILoss` / :func:`bni_loss` and :class:`GAILoss` /
  :func:`gai_loss` (Balanced MSE's histogram and Gaussian-mixture forms; its batch Monte-Carlo
  form is :func:`balanced_sam.losses.balanced_mse_loss`), with :func:`fit_gmm_1d`;
* feature regularisers (a scalar from features and targets, added to the reduced loss):
  :class:`RankSim`, :class:`ConR`, :class:`OrdinalEntropy`;
* a feature-calibration module updated once per epoch: :class:`FDS`;
* a two-stage recipe (the loop runs its stages): :func:`rnc_loss`, :class:`RnCLoss`.

The feature-space methods take the features of ``model(x, return_features=True)``.
"""

from balanced_sam.baselines.fds import FDS
from balanced_sam.baselines.gmm import GaussianMixture1D, fit_gmm_1d
from balanced_sam.baselines.losses import BNILoss, GAILoss, bni_loss, focal_l1_loss, gai_loss
from balanced_sam.baselines.regularizers import (
    ConR,
    OrdinalEntropy,
    RankSim,
    blackbox_rank,
    conr_loss,
    ordinal_entropy,
    ranksim_loss,
    unique_label_subset,
)
from balanced_sam.baselines.rnc import RnCLoss, rnc_loss

__all__ = [
    "FDS",
    "GaussianMixture1D",
    "fit_gmm_1d",
    "BNILoss",
    "GAILoss",
    "bni_loss",
    "gai_loss",
    "focal_l1_loss",
    "RankSim",
    "ConR",
    "OrdinalEntropy",
    "blackbox_rank",
    "ranksim_loss",
    "conr_loss",
    "ordinal_entropy",
    "unique_label_subset",
    "RnCLoss",
    "rnc_loss",
]
