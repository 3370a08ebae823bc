r"""Per-sample losses and the weighted reduction of the BSAM paper (Eq. 11).

Every loss here returns *unreduced* values (one per sample, or per element for dense targets);
:func:`weighted_mean` turns them into :math:`L^w = \frac1B \sum_i w_i \ell_i`, the form the
optimizers use for both passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "check_losses",
    "check_mask",
    "split_loss_output",
    "reduce_losses",
    "weighted_mean",
    "l1_loss",
    "mse_loss",
    "huber_loss",
    "balanced_mse_loss",
    "get_loss",
    "LOSSES",
]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _gave(name: str) -> str:
    """How a message names where losses came from: ``"loss_fn returned"`` for a function the
    step called, ``"opt.reduce() was given"`` for a call (a name ending in ``()``)."""
    return f"{name} was given" if name.endswith("()") else f"{name} returned"


def check_losses(losses: Any, targets: torch.Tensor, *, name: str = "loss_fn") -> torch.Tensor:
    """Per-sample losses with the targets' shape, or a ``ValueError`` naming both shapes.

    The one exception to "same shape": a trailing dimension of size 1 is squeezed, so the
    ``(B, 1)`` output of a one-output regression head is accepted for ``(B,)`` targets. Anything
    else, including shapes that merely broadcast (``(B, B)``, ``(1,)``), is refused: a
    broadcast would multiply every loss by every weight and silently average the balancing away.
    ``name`` is the producer named in the messages: a function (``"loss_fn"``: "loss_fn
    returned ...") or a call (``"opt.reduce()"``: "opt.reduce() was given ...").
    """
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{_gave(name)} {type(losses).__name__}: it needs a tensor of "
                        "per-sample losses (or a pair (losses, regulariser))")
    if not (losses.is_floating_point() or losses.is_complex()):
        raise TypeError(f"{_gave(name)} losses of dtype {losses.dtype}; a floating dtype is "
                        "needed to differentiate them")
    want = _shape(targets)
    got = _shape(losses)
    if got == want:
        return losses
    if got == want + (1,):
        return losses.squeeze(-1)
    if losses.dim() == 0:
        raise ValueError(
            f"{_gave(name)} a scalar: the losses must be unreduced per-sample losses with the "
            f"targets' shape {want} (use reduction='none')")
    hint = ""
    if len(want) == 1 and got == (want[0], want[0]):
        hint = (f" (a ({want[0]}, 1) prediction minus ({want[0]},) targets broadcasts to "
                f"{got}: squeeze the prediction, pred.squeeze(-1))")
    raise ValueError(
        f"{_gave(name)} losses of shape {got} for targets of shape {want}: they must have the "
        "targets' shape (one unreduced loss per target; a trailing dimension of size 1 is "
        f"squeezed). Reshape the predictions to the targets' shape before the loss{hint}.")


def check_mask(mask: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor | None:
    """``mask`` as a boolean tensor of the targets' shape (trailing size-1 dimension squeezed),
    or a ``ValueError`` naming both shapes; ``None`` stays ``None``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    want = _shape(targets)
    got = _shape(mask)
    if got == want + (1,):
        mask = mask.squeeze(-1)
    elif got != want:
        raise ValueError(f"mask has shape {got} but the targets have shape {want}: the mask "
                         "must have the targets' shape (a trailing dimension of size 1 is "
                         "squeezed)")
    return mask if mask.dtype == torch.bool else mask != 0


def split_loss_output(output: Any, *, name: str = "loss_fn"
                      ) -> tuple[Any, torch.Tensor | None]:
    """``(per_sample_losses, regulariser)`` from what a loss function returned.

    A loss function returns either the per-sample losses, or a pair ``(losses, regulariser)``
    whose ``regulariser`` is a 0-dim tensor added *unweighted* to the weighted reduction (a
    feature regulariser such as RankSim or ConR); ``None`` as the regulariser means none.
    """
    if isinstance(output, (tuple, list)):
        if len(output) != 2:
            raise TypeError(f"{_gave(name)} a sequence of {len(output)} items; it needs the "
                            "per-sample losses or a pair (losses, regulariser)")
        losses, reg = output
        if reg is not None and not (isinstance(reg, torch.Tensor) and reg.dim() == 0):
            shape = _shape(reg) if isinstance(reg, torch.Tensor) else type(reg).__name__
            raise ValueError(f"the regulariser that {_gave(name)} must be a 0-dim tensor, "
                             f"got {shape}")
        return losses, reg
    return output, None


def reduce_losses(
    output: Any,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    name: str = "loss_fn",
) -> torch.Tensor:
    """The scalar a single-pass step minimises: checked losses, :func:`weighted_mean`, plus the
    regulariser when ``output`` is a pair ``(losses, regulariser)``."""
    losses, reg = split_loss_output(output, name=name)
    losses = check_losses(losses, targets, name=name)
    loss = weighted_mean(losses, weights, check_mask(mask, targets))
    return loss if reg is None else loss + reg


def weighted_mean(
    losses: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    denom: torch.Tensor | int | None = None,
) -> torch.Tensor:
    r""":math:`\frac1B\sum_i w_i \ell_i` over all elements (``weights=None``: all 1).

    Note the divisor is the number of elements ``B``, not :math:`\sum_i w_i` (the paper's
    Eq. 11 and the reference code): with raw weights the loss scale, and so the effective
    learning rate, follows the weights. With ``mask`` the sum and the count run over the masked
    elements only; an all-false mask gives 0 (not NaN). ``weights`` and ``mask`` must have the
    losses' shape (a ``ValueError`` otherwise: broadcasting would silently mix samples).

    ``denom`` replaces the divisor (the count of elements, or of masked elements): the
    optimizers divide a micro-batch's sum by the whole batch's count, and ImbSAM's head and tail
    parts (masks) by the batch's count. This is the one weighted mean of the package: the
    single-pass step and every pass of the sharpness-aware optimizers reduce through it.
    """
    if weights is not None:
        if _shape(weights) != _shape(losses):
            raise ValueError(f"weights have shape {_shape(weights)} but the losses have shape "
                             f"{_shape(losses)}; they must match")
        losses = losses * weights
    if mask is not None:
        if _shape(mask) != _shape(losses):
            raise ValueError(f"mask has shape {_shape(mask)} but the losses have shape "
                             f"{_shape(losses)}; they must match")
        mask = mask.to(dtype=torch.bool)
        if denom is None:
            denom = mask.sum().clamp_min(1)
        losses = torch.where(mask, losses, torch.zeros((), dtype=losses.dtype,
                                                       device=losses.device))
    elif denom is None:
        return losses.mean()
    return losses.sum() / denom


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
