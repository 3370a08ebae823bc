r"""Per-sample losses and the weighted reduction of the BSAM paper (Eq. 11).

Every loss here returns *unreduced* values (one per sample, or per element for dense targets);
:func:`weighted_mean` turns them into :math:`L^w = \frac1B \sum_i w_i \ell_i`, the form the
optimizers use for both passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "weighted_mean",
    "l1_loss",
    "mse_loss",
    "huber_loss",
    "balanced_mse_loss",
    "get_loss",
    "LOSSES",
]


def weighted_mean(
    losses: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":math:`\frac1B\sum_i w_i \ell_i` over all elements (``weights=None``: all 1).

    Note the divisor is the number of elements ``B``, not :math:`\sum_i w_i` (the paper's
    Eq. 11 and the reference code): with raw weights the loss scale, and so the effective
    learning rate, follows the weights. With ``mask`` the sum and the count run over the masked
    elements only; an all-false mask gives 0 (not NaN).
    """
    if weights is not None:
        losses = losses * weights
    if mask is None:
        return losses.mean()
    mask = mask.to(dtype=torch.bool)
    losses = torch.broadcast_to(losses, torch.broadcast_shapes(losses.shape, mask.shape))
    count = mask.expand_as(losses).sum().clamp_min(1)
    return torch.where(mask, losses, torch.zeros((), dtype=losses.dtype,
                                                 device=losses.device)).sum() / count


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Absolute error per element (the paper's training loss)."""
    return (pred - target).abs()


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error per element (the NYUD2-DIR training loss)."""
    return (pred - target).square()


def huber_loss(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Huber loss per element."""
    return F.huber_loss(pred, target, reduction="none", delta=delta)


def balanced_mse_loss(pred: torch.Tensor, target: torch.Tensor,
                      noise_var: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Balanced MSE, batch Monte-Carlo form (Ren et al., CVPR 2022), per sample.

    :math:`\ell_i = -\log \frac{\exp(-(p_i - y_i)^2 / 2\sigma^2)}
    {\sum_j \exp(-(p_i - y_j)^2 / 2\sigma^2)} \cdot 2\sigma^2`: a cross-entropy that treats the
    batch's labels as the classes, which removes the training label prior from the prediction.
    ``noise_var`` is :math:`\sigma^2` (a tensor lets it be learned, as in the paper). For scalar
    targets of shape ``(B,)``.
    """
    p = pred.reshape(-1, 1)
    y = target.reshape(1, -1).to(p.dtype)
    logits = -(p - y).square() / (2 * noise_var)
    idx = torch.arange(p.shape[0], device=p.device)
    ce = F.cross_entropy(logits, idx, reduction="none")
    scale = 2 * (noise_var.detach() if isinstance(noise_var, torch.Tensor) else noise_var)
    return (ce * scale).reshape(pred.shape)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "l1": l1_loss,
    "mse": mse_loss,
    "huber": huber_loss,
    "bmse": balanced_mse_loss,
}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """A per-element loss by name: one of ``l1``, ``mse``, ``huber``, ``bmse``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
