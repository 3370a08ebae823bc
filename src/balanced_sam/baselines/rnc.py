r"""Rank-N-Contrast (RnC; Zha, Cao, Son, Beery and Katabi, "Rank-N-Contrast: Learning Continuous
Representations for Regression", NeurIPS 2023).

RnC learns the encoder first, with a contrastive loss that orders samples in feature space by
their label distances, and then fits a linear regressor on the frozen features:

* **stage 1**: the encoder is trained with :func:`rnc_loss` only (the regression head is unused).
  Reference recipe for AgeDB-DIR: ResNet-18, SGD lr 0.5, momentum 0.9, weight decay 1e-4, batch
  256, 400 epochs, a per-epoch cosine schedule down to lr x 1e-3, temperature 2, two augmented
  views per batch (random resized crop, flip, colour jitter and grayscale).
* **stage 2**: the encoder is frozen (evaluation mode: BatchNorm statistics and dropout fixed,
  features without gradient) and a linear head is trained on its features with the L1 loss.
  Reference recipe: SGD lr 0.05, momentum 0.9, no weight decay, batch 64, 100 epochs, cosine
  down to lr x 0.008, a freshly initialised head.

The training loop runs both stages (method ``rnc``, ``train.plugins.rnc.stage``; see
:func:`balanced_sam.baselines.plugins.fit_stages`), with its data, schedules and checkpoints;
this module holds the loss. ``rnc_loss`` takes a second view (``features2``) for a loop of one's
own that feeds two augmentations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["rnc_loss", "RnCLoss"]


def rnc_loss(features: torch.Tensor, targets: torch.Tensor,
             features2: torch.Tensor | None = None, temperature: float = 2.0) -> torch.Tensor:
    r"""The Rank-N-Contrast loss.

    Over the ``N`` samples (``features`` and, when given, the second view ``features2``
    concatenated after it, the labels repeated), with feature similarity
    :math:`s_{ij} = -\|v_i - v_j\|_2` (features are *not* normalised) and label distance
    :math:`d_{ij} = |y_i - y_j|` (L1, summed over label dimensions):

    .. math::
        L_{RnC} = -\frac{1}{N(N-1)} \sum_i \sum_{j \ne i} \log
            \frac{\exp(s_{ij} / \tau)}{\sum_{k \ne i,\ d_{ik} \ge d_{ij}} \exp(s_{ik} / \tau)}

    For anchor ``i`` and positive ``j``, the negatives are the samples at least as far from
    ``i`` in label as ``j`` is (``j`` itself included), as in the paper and its code.
    ``temperature`` is :math:`\tau` (2 in the reference). Computed with one sort per row and a
    reversed cumulative sum, in :math:`O(N^2 \log N)` time and :math:`O(N^2)` memory.
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0
            and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if features.dim() < 2:
        raise ValueError(f"features must be (batch, dim, ...), got {tuple(features.shape)}")
    v = features.reshape(features.shape[0], -1)
    b = v.shape[0]
    if targets.shape[:1] != (b,) or targets.dim() > 2:
        raise ValueError(f"targets must have shape ({b},) or ({b}, k), got "
                         f"{tuple(targets.shape)}")
    y = targets.reshape(b, -1)
    if features2 is not None:
        v2 = features2.reshape(features2.shape[0], -1)
        if v2.shape != v.shape:
            raise ValueError(f"features2 must have the shape of features {tuple(v.shape)}, got "
                             f"{tuple(v2.shape)}")
        v = torch.cat([v, v2])
        y = torch.cat([y, y])
    n = v.shape[0]
    if n < 2:
        raise ValueError("rnc_loss needs at least two samples (or two views)")
    logits = -torch.cdist(v, v) / temperature
    label_dist = (y[:, None, :] - y[None, :, :]).abs().sum(-1).to(logits.dtype)
    off = ~torch.eye(n, dtype=torch.bool, device=v.device)
    logits = logits[off].reshape(n, n - 1)
    label_dist = label_dist[off].reshape(n, n - 1)
    # sort each row by label distance; suffix[p] = sum_{q >= p} exp(sorted logit[q] - row max),
    # in float64 so that no suffix underflows for any realistic feature distance (this is
    # several times faster than a log-space cumulative sum)
    dist_sorted, order = torch.sort(label_dist, dim=1)
    row_max = logits.detach().amax(1, keepdim=True)
    shifted = (logits.gather(1, order) - row_max).double().exp()
    suffix = shifted.flip(1).cumsum(1).flip(1)
    # the first sorted position whose distance is >= d_ij: every tie of d_ij is a negative too
    first = torch.searchsorted(dist_sorted, label_dist.contiguous(), side="left")
    log_denom = suffix.gather(1, first).log().to(logits.dtype) + row_max
    return -(logits - log_denom).mean()


class RnCLoss(nn.Module):
    """:func:`rnc_loss` as a module (``temperature`` 2 as the reference)."""

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, features: torch.Tensor, targets: torch.Tensor,
                features2: torch.Tensor | None = None) -> torch.Tensor:
        return rnc_loss(features, targets, features2, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"
