r"""Feature distribution smoothing (FDS; Yang et al., "Delving into Deep Imbalanced Regression",
ICML 2021).

FDS keeps, for every label bin ``b``, running statistics of the features of the training
samples in that bin (mean :math:`\mu_b` and per-dimension variance :math:`\sigma^2_b`), smooths
them across neighbouring bins with a kernel (:math:`\tilde\mu_b`, :math:`\tilde\sigma^2_b`), and
during training *calibrates* each sample's features with its bin's statistics:

.. math::
    \tilde z = (z - \mu_b)\, \sqrt{\mathrm{clip}(\tilde\sigma^2_b / \sigma^2_b,\ 0.1,\ 10)}
        + \tilde\mu_b ,

i.e. whitening with the bin's own statistics and re-colouring with the smoothed ones (the
paper's :math:`\tilde\Sigma_b^{1/2} \Sigma_b^{-1/2}` with diagonal covariances, as in the
authors' code, which also clips the ratio). Only training uses the calibration; evaluation uses
the raw features.

Per epoch (the paper's momentum update):

1. during the epoch, :meth:`FDS.collect` accumulates per-bin sums of the (uncalibrated,
   detached) features;
2. :meth:`FDS.end_epoch` turns them into the epoch's per-bin mean and unbiased variance and
   updates :math:`\mu_b \leftarrow m \mu_b + (1 - m) \mu_b^{epoch}` (same for
   :math:`\sigma^2_b`; a bin's first statistics are taken as they are), then recomputes the
   smoothed statistics, which stay fixed for the next epoch;
3. from epoch ``start_smooth`` on, :meth:`FDS.forward` calibrates.

Smoothing: the kernel of :func:`balanced_sam.lds_kernel` normalised to sum 1, applied along the
bin axis with reflected borders (as the reference's ``F.pad(..., mode="reflect")``). Bins that
never held a training sample carry no statistics: they are left out of the sum and the kernel
is renormalised over the bins that do (with every bin populated this is exactly the reference's
convolution); the reference instead mixes in their initial values (mean 0, variance 1).

Differences from the reference code (``fds.py`` of the DIR repository), where we follow the
paper: (a) there the statistics used in epoch ``e`` are the smoothed statistics accumulated up to
epoch ``e - 2`` paired with raw ones up to ``e - 1`` (its "last epoch" buffers alias the running
ones); here both come from the epochs up to ``e - 1``; (b) its momentum blend starts from the
initial (0, 1) for a bin first seen after ``start_update``; (c) it gathers the epoch's features
in an extra pass over the training set after the epoch (still in training mode), while
:meth:`FDS.collect` can be fed from the training passes themselves or from such an extra pass;
the training loop chooses. Labels outside the bins' range fall in the end bins (the reference
pools ages below ``bucket_start`` into the first bucket the same way).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from balanced_sam.bins import LabelBins, lds_kernel

__all__ = ["FDS"]


class FDS(nn.Module):
    """Per-bin feature statistics, smoothed across bins, used to calibrate training features.

    Args:
        feature_dim: ``D``, the features' size (``model.feature_dim``); features are
            ``(batch, D)`` or feature maps ``(batch, D, H, W)`` with per-pixel targets.
        bins: the training :class:`~balanced_sam.LabelBins` (its edges define the FDS bins; the
            reference uses one bin per year of age and 0.1 m depth bins).
        kernel, ks, sigma: the smoothing window (:func:`~balanced_sam.lds_kernel`); defaults
            ``gaussian``, 5, 2 are what the DIR README's commands use for its reported FDS
            runs (its ``train.py`` defaults to ``ks=9, sigma=1``).
        momentum: :math:`m` of the running statistics (0.9); ``None`` keeps the cumulative mean
            over epochs instead (the reference's other option).
        start_update: first epoch whose features are collected (0).
        start_smooth: first epoch that calibrates (1).
        clip: bounds of the variance ratio (0.1, 10).

    The statistics are buffers: ``state_dict()`` / ``load_state_dict()`` carry them (and the
    partial sums of an unfinished epoch) so a resumed run calibrates as the original would.
    """

    def __init__(
        self,
        feature_dim: int,
        bins: LabelBins,
        *,
        kernel: str = "gaussian",
        ks: int = 5,
        sigma: float = 2.0,
        momentum: float | None = 0.9,
        start_update: int = 0,
        start_smooth: int = 1,
        clip: tuple[float, float] = (0.1, 10.0),
    ) -> None:
        super().__init__()
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive integer, got {feature_dim!r}")
        if not isinstance(bins, LabelBins):
            raise TypeError(f"bins must be a LabelBins, got {type(bins).__name__}")
        if momentum is not None and not (isinstance(momentum, (int, float))
                                         and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1) or None, got {momentum!r}")
        lo, hi = (float(v) for v in clip)
        if not 0 < lo <= hi or not math.isfinite(hi):
            raise ValueError(f"clip must be (low, high) with 0 < low <= high, got {clip!r}")
        for name, v in (("start_update", start_update), ("start_smooth", start_smooth)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        window = torch.from_numpy(lds_kernel(kernel, ks, sigma))
        k, d = bins.num_bins, feature_dim
        self.feature_dim = d
        self.num_bins = k
        self.momentum = momentum
        self.start_update = start_update
        self.start_smooth = start_smooth
        self.clip = (lo, hi)
        self.kernel_spec = (kernel, ks, float(sigma))
        self.register_buffer("inner_edges", bins.edges[1:-1].to(torch.float64).clone())
        self.register_buffer("window", (window / window.sum()).to(torch.float64))
        self.register_buffer("running_mean", torch.zeros(k, d))
        self.register_buffer("running_var", torch.ones(k, d))
        self.register_buffer("smoothed_mean", torch.zeros(k, d))
        self.register_buffer("smoothed_var", torch.ones(k, d))
        self.register_buffer("has_stats", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("num_samples_tracked", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("last_epoch", torch.tensor(-1, dtype=torch.long))
        # the epoch in progress: sums of features and squares, and counts, per bin
        self.register_buffer("epoch_sum", torch.zeros(k, d, dtype=torch.float64))
        self.register_buffer("epoch_sumsq", torch.zeros(k, d, dtype=torch.float64))
        self.register_buffer("epoch_count", torch.zeros(k, dtype=torch.float64))
        self._ready = False  # a host-side copy of last_epoch >= 0: no device sync per step

    # ------------------------------------------------------------------ shapes
    def bin_of(self, targets: torch.Tensor) -> torch.Tensor:
        """Bin index of every target (out-of-range targets fall in the end bins)."""
        edges = self.inner_edges.to(targets.device)
        return torch.bucketize(targets.to(torch.float64), edges, right=True)

    def _flatten(self, features: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """``(N, D)`` features, ``(N,)`` targets and the inverse reshape of the features."""
        if features.dim() == 2:
            if features.shape[1] != self.feature_dim:
                raise ValueError(f"features must have {self.feature_dim} columns, got "
                                 f"{tuple(features.shape)}")
            t = targets.reshape(-1)
            if t.shape[0] != features.shape[0]:
                raise ValueError(f"targets must hold one label per sample ({features.shape[0]}),"
                                 f" got shape {tuple(targets.shape)}")
            return features, t, lambda f: f
        if features.dim() == 4:
            b, c, h, w = features.shape
            if c != self.feature_dim:
                raise ValueError(f"feature maps must have {self.feature_dim} channels, got "
                                 f"{tuple(features.shape)}")
            if targets.numel() != b * h * w or targets.shape[0] != b:
                raise ValueError(f"dense targets must hold one label per feature-map pixel "
                                 f"({b} x {h} x {w}), got shape {tuple(targets.shape)}; resize "
                                 "the targets to the feature map first")
            flat = features.permute(0, 2, 3, 1).reshape(-1, c)
            return flat, targets.reshape(-1), lambda f: f.reshape(b, h, w, c).permute(0, 3, 1, 2)
        raise ValueError(f"features must be (batch, D) or (batch, D, H, W), got "
                         f"{tuple(features.shape)}")

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def collect(self, features: torch.Tensor, targets: torch.Tensor, epoch: int) -> None:
        """Add a batch's (uncalibrated) features to the epoch's per-bin sums; ignored before
        ``start_update``."""
        if epoch < self.start_update:
            return
        f, t, _ = self._flatten(features, targets)
        f = f.detach().to(self.epoch_sum.device, torch.float64)
        idx = self.bin_of(t).to(self.epoch_sum.device)
        self.epoch_sum.index_add_(0, idx, f)
        self.epoch_sumsq.index_add_(0, idx, f.square())
        self.epoch_count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> bool:
        """Fold the epoch's features into the running statistics and re-smooth them. Returns
        whether anything was collected (if not, nothing changes)."""
        n = self.epoch_count
        seen = n > 0
        if not bool(seen.any()):
            return False
        mean = self.epoch_sum / n.clamp_min(1)[:, None]
        var = (self.epoch_sumsq - n[:, None] * mean.square()) / (n - 1).clamp_min(1)[:, None]
        var = var.clamp_min(0.0)  # n = 1 gives 0, as the reference's biased variance of one
        self.num_samples_tracked += n
        if self.momentum is None:
            keep = 1.0 - n / self.num_samples_tracked.clamp_min(1)
        else:
            keep = torch.full_like(n, float(self.momentum))
        keep = torch.where(self.has_stats, keep, torch.zeros_like(keep))[:, None]
        new_mean = keep * self.running_mean.double() + (1 - keep) * mean
        new_var = keep * self.running_var.double() + (1 - keep) * var
        self.running_mean.copy_(torch.where(seen[:, None], new_mean, self.running_mean.double()))
        self.running_var.copy_(torch.where(seen[:, None], new_var, self.running_var.double()))
        self.has_stats |= seen
        self._smooth()
        self.epoch_sum.zero_()
        self.epoch_sumsq.zero_()
        self.epoch_count.zero_()
        self.last_epoch.fill_(int(epoch))
        self._ready = True
        return True

    def _smooth(self) -> None:
        k = self.num_bins
        half = (self.window.numel() - 1) // 2
        pos = (torch.arange(k, device=self.window.device)[:, None]
               + torch.arange(-half, half + 1, device=self.window.device)[None, :])
        if k == 1:
            src = torch.zeros_like(pos)
        else:  # reflect without repeating the edge: ... 2 1 | 0 1 2 ... k-1 | k-2 ...
            period = 2 * (k - 1)
            src = torch.remainder(pos, period)
            src = torch.where(src >= k, period - src, src)
        w = self.window[None, :] * self.has_stats[src].to(torch.float64)   # (K, ks)
        den = w.sum(1, keepdim=True)
        ok = den > 0
        w = w / den.clamp_min(1e-300)
        for raw, out in ((self.running_mean, self.smoothed_mean),
                         (self.running_var, self.smoothed_var)):
            sm = torch.einsum("kt,ktd->kd", w, raw.double()[src])
            out.copy_(torch.where(ok, sm, raw.double()))

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every statistic (as a fresh module)."""
        for buf in (self.running_mean, self.smoothed_mean, self.epoch_sum, self.epoch_sumsq,
                    self.epoch_count, self.num_samples_tracked):
            buf.zero_()
        self.running_var.fill_(1.0)
        self.smoothed_var.fill_(1.0)
        self.has_stats.zero_()
        self.last_epoch.fill_(-1)
        self._ready = False

    # ------------------------------------------------------------------ calibration
    def calibrate(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The calibrated features (same shape), whatever the mode and epoch. Samples whose bin
        has no statistics, and dimensions with zero variance in the bin, pass unchanged."""
        f, t, restore = self._flatten(features, targets)
        idx = self.bin_of(t).to(self.running_mean.device)
        dt = f.dtype
        m1 = self.running_mean[idx].to(f.device, dt)
        v1 = self.running_var[idx].to(f.device, dt)
        m2 = self.smoothed_mean[idx].to(f.device, dt)
        v2 = self.smoothed_var[idx].to(f.device, dt)
        ok = (v1 > 0) & self.has_stats[idx].to(f.device)[:, None]
        ratio = (v2 / torch.where(ok, v1, torch.ones_like(v1))).clamp(*self.clip)
        out = torch.where(ok, (f - m1) * ratio.sqrt() + m2, f)
        return restore(out)

    def forward(self, features: torch.Tensor, targets: torch.Tensor, epoch: int
                ) -> torch.Tensor:
        """Calibrated features in training mode from epoch ``start_smooth`` on, once statistics
        exist; the features unchanged otherwise (evaluation, early epochs)."""
        if not self.training or epoch < self.start_smooth or not self._ready:
            return features
        return self.calibrate(features, targets)

    def model_forward(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                      epoch: int, collect: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass of a built-in model with FDS between its features and its head:
        returns ``(prediction, raw_features)``. With ``collect`` the raw features also feed
        :meth:`collect` (do it in one pass per batch only, e.g. not in SAM's second pass)."""
        feats = model.forward_features(x)
        if collect:
            self.collect(feats, targets, epoch)
        return model.forward_head(self(feats, targets, epoch)), feats

    def extra_repr(self) -> str:
        kernel, ks, sigma = self.kernel_spec
        return (f"feature_dim={self.feature_dim}, bins={self.num_bins}, kernel={kernel!r}, "
                f"ks={ks}, sigma={sigma:g}, momentum={self.momentum}, "
                f"start_update={self.start_update}, start_smooth={self.start_smooth}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        edges = state_dict.get(prefix + "inner_edges")
        if edges is not None and (edges.shape != self.inner_edges.shape
                                  or not torch.equal(edges.to(self.inner_edges), self.inner_edges)):
            raise ValueError("FDS state was saved with other label bins; build the FDS with the "
                             "bins of the run being resumed")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = int(self.last_epoch) >= 0
