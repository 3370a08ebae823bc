r"""Loss-type baselines: focal-R (``focal-l1``) and Balanced MSE's BNI and GAI forms.

Every function returns *unreduced* losses of the targets' shape (one per sample, or per pixel
for dense targets), so the optimizers' weighting (SQINV, LDS, the BSAM perturbation weights)
applies on top, exactly as for :func:`balanced_sam.losses.l1_loss`.

Balanced MSE (Ren et al., "Balanced MSE for Imbalanced Visual Regression", CVPR 2022) replaces
the likelihood :math:`\mathcal N(y; p, \sigma^2)` of the MSE by the *balanced* likelihood, which
divides out the training label prior :math:`p_{tr}`:

.. math::
    \ell(p, y) = -\log \mathcal N(y; p, \sigma^2)
        + \log \int \mathcal N(y'; p, \sigma^2)\, p_{tr}(y')\, dy'

and multiplies the result by :math:`2\sigma^2` (detached) so that its gradient in :math:`p`
has the scale of the MSE's. The integral is what the three forms approximate:

* batch Monte-Carlo (BMC): the batch's labels as samples of :math:`p_{tr}`; already in
  :func:`balanced_sam.losses.balanced_mse_loss` (not repeated here);
* bin-based numerical integration (BNI): :math:`p_{tr}` as a histogram,
  :math:`\sum_k \pi_k \mathcal N(c_k; p, \sigma^2)` over bin values :math:`c_k` with training
  frequencies :math:`\pi_k` (:func:`bni_loss`, :class:`BNILoss`);
* Gaussian-mixture (GAI): :math:`p_{tr}` as a GMM, for which the integral is closed-form,
  :math:`\sum_k \pi_k \mathcal N(p; \mu_k, v_k + \sigma^2)` (:func:`gai_loss`,
  :class:`GAILoss`; the mixture comes from :func:`~balanced_sam.baselines.gmm.fit_gmm_1d`).

Constants that do not depend on :math:`p` or :math:`\sigma` are dropped, as in the authors' code.
The noise variance :math:`\sigma^2` is ``noise_sigma ** 2``; the modules hold ``noise_sigma`` as
a parameter (learned jointly, as in the paper, with its own learning rate: the authors use
``1e-2`` and an initial value of 1) or as a fixed buffer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from balanced_sam.baselines.gmm import GaussianMixture1D, fit_gmm_1d
from balanced_sam.bins import LabelBins, lds_kernel, lds_smooth

__all__ = [
    "focal_l1_loss",
    "bni_loss",
    "gai_loss",
    "BNILoss",
    "GAILoss",
    "FOCAL_ACTIVATIONS",
]

FOCAL_ACTIVATIONS = ("sigmoid", "tanh")


# ------------------------------------------------------------------------------------ focal-R
def focal_l1_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 0.2,
                  gamma: float = 1.0, activation: str = "sigmoid") -> torch.Tensor:
    r"""Focal-R with the L1 error (Yang et al., "Delving into Deep Imbalanced Regression", ICML
    2021), per element: :math:`|e|\, m(|e|)^\gamma` with :math:`e = p - y` and the modulating
    factor

    * ``activation="sigmoid"`` (default): :math:`m = 2\,\mathrm{sigmoid}(\beta |e|) - 1`,
    * ``activation="tanh"``: :math:`m = \tanh(\beta |e|)`.

    We follow the authors' released code (``weighted_focal_l1_loss`` of the DIR repository,
    defaults ``beta=0.2``, ``gamma=1``, sigmoid). Its factor maps an error of 0 to 0 and grows to
    1, so well-fitted samples count less, the focal-loss idea; the paper's text writes the factor
    as a plain sigmoid of the error, which would start at 1/2 instead of 0. Note
    :math:`2\,\mathrm{sigmoid}(x) - 1 = \tanh(x / 2)`: the two activations differ only by a
    factor 2 in ``beta``.
    """
    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if not (isinstance(gamma, (int, float)) and gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
    if activation not in FOCAL_ACTIVATIONS:
        raise ValueError(f"activation must be one of {FOCAL_ACTIVATIONS}, got {activation!r}")
    err = (pred - target).abs()
    if activation == "sigmoid":
        factor = 2.0 * torch.sigmoid(beta * err) - 1.0
    else:
        factor = torch.tanh(beta * err)
    return err * factor.pow(gamma)


# ------------------------------------------------------------------------------------ helpers
def _noise_var(noise_var: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The noise variance as a 0-dim tensor. A number is checked to be > 0; a tensor (a learned
    scale) only for its size, to keep the step free of host synchronisation."""
    if not isinstance(noise_var, torch.Tensor):
        if not (isinstance(noise_var, (int, float)) and noise_var > 0
                and math.isfinite(noise_var)):
            raise ValueError(f"noise_var must be a positive number, got {noise_var!r}")
    v = torch.as_tensor(noise_var, dtype=like.dtype, device=like.device)
    if v.numel() != 1:
        raise ValueError(f"noise_var must be a scalar, got shape {tuple(v.shape)}")
    return v.reshape(())


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")


# ------------------------------------------------------------------------------------ BNI
def bni_loss(pred: torch.Tensor, target: torch.Tensor, noise_var: float | torch.Tensor,
             centers: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    r"""Balanced MSE, bin-based numerical integration (BNI), per element:

    .. math::
        \ell = 2\sigma^2_{sg} \Big[ \frac{(p - y)^2}{2\sigma^2}
            + \log \sum_k \pi_k \exp\Big(-\frac{(p - c_k)^2}{2\sigma^2}\Big) \Big]

    with bin values ``centers`` :math:`c_k` and training label frequencies ``probs``
    :math:`\pi_k` (normalised here; zero entries are allowed), and :math:`\sigma^2_{sg}` the
    noise variance with its gradient stopped. ``noise_var`` may be a tensor that requires grad.
    """
    _check_pair(pred, target)
    var = _noise_var(noise_var, pred)
    c = torch.as_tensor(centers, dtype=pred.dtype, device=pred.device).reshape(-1)
    pi = torch.as_tensor(probs, dtype=pred.dtype, device=pred.device).reshape(-1)
    if c.numel() != pi.numel() or c.numel() == 0:
        raise ValueError(f"centers and probs must be non-empty and of one length, got "
                         f"{c.numel()} and {pi.numel()}")
    log_pi = torch.log(pi / pi.sum())
    mse_term = (pred - target).square() / (2 * var)
    logits = log_pi - (pred.unsqueeze(-1) - c).square() / (2 * var)
    balancing = torch.logsumexp(logits, dim=-1)
    return (mse_term + balancing) * (2 * var.detach())


# ------------------------------------------------------------------------------------ GAI
def gai_loss(pred: torch.Tensor, target: torch.Tensor, noise_var: float | torch.Tensor,
             weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor
             ) -> torch.Tensor:
    r"""Balanced MSE, Gaussian-mixture form (GAI), per element:

    .. math::
        \ell = 2\sigma^2_{sg} \Big[ \frac{(p - y)^2}{2\sigma^2} + \tfrac12 \log \sigma^2
            + \log \sum_k \pi_k (v_k + \sigma^2)^{-1/2}
              \exp\Big(-\frac{(p - \mu_k)^2}{2 (v_k + \sigma^2)}\Big) \Big]

    for a training label mixture with weights :math:`\pi_k`, means :math:`\mu_k` and variances
    :math:`v_k`. As every :math:`v_k \to 0` it becomes :func:`bni_loss` with
    :math:`c_k = \mu_k`.
    """
    _check_pair(pred, target)
    var = _noise_var(noise_var, pred)
    pi = torch.as_tensor(weights, dtype=pred.dtype, device=pred.device).reshape(-1)
    mu = torch.as_tensor(means, dtype=pred.dtype, device=pred.device).reshape(-1)
    v = torch.as_tensor(variances, dtype=pred.dtype, device=pred.device).reshape(-1)
    if not (pi.numel() == mu.numel() == v.numel()) or pi.numel() == 0:
        raise ValueError("weights, means and variances must be non-empty and of one length")
    total = v + var
    mse_term = (pred - target).square() / (2 * var) + 0.5 * torch.log(var)
    logits = (torch.log(pi / pi.sum()) - 0.5 * torch.log(total)
              - 0.5 * (pred.unsqueeze(-1) - mu).square() / total)
    balancing = torch.logsumexp(logits, dim=-1)
    return (mse_term + balancing) * (2 * var.detach())


# ------------------------------------------------------------------------------------ modules
class _NoiseModule(nn.Module):
    """Holds ``noise_sigma`` (:math:`\\sigma`; the noise variance is its square)."""

    def __init__(self, init_noise_sigma: float, learn_noise: bool) -> None:
        super().__init__()
        if not (isinstance(init_noise_sigma, (int, float)) and init_noise_sigma > 0
                and math.isfinite(init_noise_sigma)):
            raise ValueError(f"init_noise_sigma must be a positive number, got "
                             f"{init_noise_sigma!r}")
        sigma = torch.tensor(float(init_noise_sigma))
        if learn_noise:
            self.noise_sigma = nn.Parameter(sigma)
        else:
            self.register_buffer("noise_sigma", sigma)
        self.learn_noise = bool(learn_noise)

    @property
    def noise_var(self) -> torch.Tensor:
        return self.noise_sigma.square()


def _bin_values(bins: LabelBins, value: str) -> torch.Tensor:
    if value == "center":
        return bins.centers
    if value == "lower":
        return bins.edges[:-1]
    raise ValueError(f"value must be 'center' or 'lower', got {value!r}")


class BNILoss(_NoiseModule):
    """Balanced MSE (BNI) as a module with a learnable (or fixed) noise scale; ``forward(pred,
    target)`` gives :func:`bni_loss` per element.

    Build it from the training labels: :meth:`from_labels` (one bin per distinct value, the
    reference's histogram of integer ages) or :meth:`from_bins` (a :class:`LabelBins`, optionally
    with label-distribution smoothing of the counts: the paper's "Balanced MSE + LDS" row).
    Bins without training samples are dropped (they add nothing to the sum).

    Args:
        centers: the value of each bin.
        counts: training samples (or any non-negative mass) per bin.
        init_noise_sigma: initial :math:`\\sigma` (1.0 in the authors' code).
        learn_noise: make ``noise_sigma`` a parameter (add it to the optimizer, e.g. with
            ``lr=1e-2`` as the authors do) or keep it fixed.
    """

    def __init__(self, centers: Any, counts: Any, init_noise_sigma: float = 1.0,
                 learn_noise: bool = True) -> None:
        super().__init__(init_noise_sigma, learn_noise)
        c = torch.as_tensor(np.asarray(centers, dtype=np.float64)).reshape(-1)
        n = torch.as_tensor(np.asarray(counts, dtype=np.float64)).reshape(-1)
        if c.numel() != n.numel():
            raise ValueError(f"centers and counts must be of one length, got {c.numel()} and "
                             f"{n.numel()}")
        if not bool(torch.isfinite(c).all()) or not bool(torch.isfinite(n).all()):
            raise ValueError("centers and counts must be finite")
        if bool((n < 0).any()) or not float(n.sum()) > 0:
            raise ValueError("counts must be non-negative with a positive sum")
        keep = n > 0
        self.register_buffer("centers", c[keep].to(torch.float32))
        self.register_buffer("probs", (n[keep] / n.sum()).to(torch.float32))

    @classmethod
    def from_labels(cls, train_targets: Any, **kwargs: Any) -> BNILoss:
        """One bin per distinct training label value, its frequency as the prior."""
        t = np.asarray(torch.as_tensor(train_targets).detach().cpu(), dtype=np.float64)
        t = t.reshape(-1)
        if t.size == 0 or not np.isfinite(t).all():
            raise ValueError("train_targets must be non-empty and finite")
        values, counts = np.unique(t, return_counts=True)
        return cls(values, counts, **kwargs)

    @classmethod
    def from_bins(cls, bins: LabelBins, value: str = "center", *, lds: bool = False,
                  kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0,
                  **kwargs: Any) -> BNILoss:
        """The prior from a :class:`LabelBins` histogram.

        ``value`` is ``"center"`` (bin midpoints) or ``"lower"`` (left edges: for integer labels
        in unit bins ``[a, a + 1)`` this is the label ``a`` itself, as the reference uses). With
        ``lds`` the counts are first convolved with :func:`~balanced_sam.lds_kernel` (zero
        beyond the range), as the Balanced MSE code does for "+LDS". Bins below
        ``bins.share_weight_below`` take that bin's count, as the NYUD2 code does for the depth
        bins below 0.7 m (it gives them bin 7's count).
        """
        if not isinstance(bins, LabelBins):
            raise TypeError(f"bins must be a LabelBins, got {type(bins).__name__}")
        counts = bins.counts.to(torch.float64).numpy().copy()
        if bins.share_weight_below is not None:
            counts[: bins.share_weight_below] = counts[bins.share_weight_below]
        if lds:
            counts = lds_smooth(counts, lds_kernel(kernel, ks, sigma))
        return cls(_bin_values(bins, value), counts, **kwargs)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bni_loss(pred, target, self.noise_var, self.centers, self.probs)

    def extra_repr(self) -> str:
        return f"bins={self.centers.numel()}, learn_noise={self.learn_noise}"


class GAILoss(_NoiseModule):
    """Balanced MSE (GAI) as a module: ``forward(pred, target)`` gives :func:`gai_loss` per
    element for the mixture ``gmm`` (a :class:`GaussianMixture1D`, or :meth:`from_labels` to fit
    one with :func:`fit_gmm_1d`). Arguments as in :class:`BNILoss`."""

    def __init__(self, gmm: GaussianMixture1D, init_noise_sigma: float = 1.0,
                 learn_noise: bool = True) -> None:
        super().__init__(init_noise_sigma, learn_noise)
        if not isinstance(gmm, GaussianMixture1D):
            raise TypeError(f"gmm must be a GaussianMixture1D, got {type(gmm).__name__}")
        self.register_buffer("gmm_weights", torch.as_tensor(gmm.weights, dtype=torch.float32))
        self.register_buffer("gmm_means", torch.as_tensor(gmm.means, dtype=torch.float32))
        self.register_buffer("gmm_variances",
                             torch.as_tensor(gmm.variances, dtype=torch.float32))

    @classmethod
    def from_labels(cls, train_targets: Any, n_components: int = 8, *,
                    gmm_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> GAILoss:
        """Fit a ``n_components`` mixture to the training labels (8 as the authors' IMDB-WIKI
        code, 16 for their NYUD2 code) and build the loss."""
        t = np.asarray(torch.as_tensor(train_targets).detach().cpu(), dtype=np.float64)
        values, counts = np.unique(t.reshape(-1), return_counts=True)
        gmm = fit_gmm_1d(values, n_components, counts=counts, **(gmm_kwargs or {}))
        return cls(gmm, **kwargs)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return gai_loss(pred, target, self.noise_var, self.gmm_weights, self.gmm_means,
                        self.gmm_variances)

    def extra_repr(self) -> str:
        return f"components={self.gmm_weights.numel()}, learn_noise={self.learn_noise}"
