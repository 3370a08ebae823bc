r"""Rank-N-Contrast (RnC; Zha, Cao, Son, Beery and Katabi, "Rank-N-Contrast: Learning Continuous
Representations for Regression", NeurIPS 2023).

RnC learns the encoder first, with a contrastive loss that orders samples in feature space by
their label distances, and then fits a linear regressor on the frozen features:

* **stage 1** (:func:`rnc_pretrain`): every batch is seen in two augmented views; the encoder is
  trained with :func:`rnc_loss` only (the regression head is unused). Reference recipe for
  AgeDB-DIR: ResNet-18, SGD lr 0.5, momentum 0.9, weight decay 1e-4, batch 256, 400 epochs, a
  per-epoch cosine schedule down to lr x 1e-3, temperature 2, augmentations random resized crop,
  flip, colour jitter and grayscale.
* **stage 2** (:func:`fit_linear_head`): the encoder is frozen (evaluation mode: BatchNorm
  statistics and dropout fixed, features without gradient) and a linear head is trained on its
  features with the L1 loss. Reference recipe: SGD lr 0.05, momentum 0.9, no weight decay,
  batch 64, 100 epochs, cosine down to lr x 0.008, a freshly initialised head.

Both stages are plain loops over given batches, independent of the package's training loop, so
the loop can call them with its own data, schedulers and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from balanced_sam.losses import l1_loss, weighted_mean

__all__ = ["rnc_loss", "RnCLoss", "rnc_pretrain", "fit_linear_head"]


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


# ------------------------------------------------------------------------------ the recipe
def _encoder_of(model: nn.Module | Callable[[torch.Tensor], torch.Tensor]
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = getattr(model, "forward_features", None)
    if fn is not None:
        return fn
    if callable(model):
        return model
    raise TypeError("model must have forward_features(x) (the built-in models do) or be a "
                    "callable returning features")


def _check_reiterable(batches: Iterable[Any], epochs: int) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if epochs > 1 and iter(batches) is batches:
        raise ValueError("batches is a one-shot iterator but epochs > 1: pass something that "
                         "can be iterated again (a DataLoader or a list)")


def _to(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return t if device is None else t.to(device, non_blocking=True)


def _run_epochs(
    batches: Iterable[Sequence[torch.Tensor]],
    epochs: int,
    scheduler: Any,
    step: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, int]],
    start_epoch: Callable[[], Any],
) -> list[float]:
    """The loop of both stages: per epoch ``start_epoch()`` (the model's mode), ``step(batch)``
    on every batch (it trains and returns the batch's loss and size), ``scheduler.step()``;
    returns each epoch's mean loss, weighted by batch size (summed on the loss's device, so
    no host sync per step)."""
    history: list[float] = []
    for _ in range(epochs):
        start_epoch()
        total: torch.Tensor | float = 0.0
        count = 0
        for batch in batches:
            loss, n = step(batch)
            total = total + loss.detach() * n
            count += n
        if scheduler is not None:
            scheduler.step()
        history.append(float(total) / max(count, 1))
    return history


def rnc_pretrain(
    model: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 1,
    temperature: float = 2.0,
    scheduler: Any = None,
    device: torch.device | str | None = None,
) -> list[float]:
    """Stage 1 of RnC: train the encoder with :func:`rnc_loss`.

    Args:
        model: a built-in model (its ``forward_features`` is the encoder) or any module that
            returns features.
        batches: yields ``(view1, view2, labels)``: two augmentations of the same samples and
            their labels; iterated once per epoch.
        optimizer: over the encoder's parameters (e.g. SGD lr 0.5, momentum 0.9, weight decay
            1e-4 as the reference).
        epochs: passes over ``batches``.
        temperature: :math:`\\tau` of the loss.
        scheduler: optional; its ``step()`` is called after every epoch (the reference's
            per-epoch cosine).
        device: where to move each batch (``None``: leave it).

    Both views go through the encoder in one forward pass (one set of BatchNorm batch
    statistics), as in the reference. Returns the mean loss of every epoch.
    """
    _check_reiterable(batches, epochs)
    encode = _encoder_of(model)

    def train_mode() -> None:
        if isinstance(model, nn.Module):
            model.train()

    def step(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
        if len(batch) != 3:
            raise ValueError("each batch must be (view1, view2, labels)")
        x1, x2, y = (_to(t, device) for t in batch)
        if x1.shape != x2.shape:
            raise ValueError(f"the two views must have one shape, got {tuple(x1.shape)} and "
                             f"{tuple(x2.shape)}")
        feats = encode(torch.cat([x1, x2]))
        f1, f2 = feats.split(x1.shape[0])
        loss = rnc_loss(f1, y, f2, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, x1.shape[0]

    return _run_epochs(batches, epochs, scheduler, step, train_mode)


def fit_linear_head(
    model: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 1,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = l1_loss,
    weights_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reset_head: bool = True,
    scheduler: Any = None,
    device: torch.device | str | None = None,
) -> list[float]:
    """Stage 2 of RnC: a linear regressor on the frozen encoder's features.

    Args:
        model: a built-in model; ``model.forward_features`` is the frozen encoder and
            ``model.head`` the layer trained (``model.forward_head`` maps features to the
            prediction, so the trained model is used as any other afterwards).
        batches: yields ``(inputs, labels)``; iterated once per epoch.
        optimizer: over ``model.head.parameters()`` (reference: SGD lr 0.05, momentum 0.9, no
            weight decay). A SAM-family optimizer of this package (``SAM``, ``BalancedSAM``,
            ``ImbSAM``) works too: it gets ``step(loss_fn, targets)`` and applies its own
            weights, so ``weights_fn`` must then be ``None``.
        loss_fn: per-sample loss ``(pred, target) -> losses`` (L1 as the reference).
        weights_fn: optional per-sample weights ``targets -> weights`` (e.g. SQINV via
            ``bins.sample_weights``) for a plain optimizer.
        reset_head: re-initialise the head first (the reference trains a new ``nn.Linear``).
        scheduler: optional, stepped after every epoch.
        device: where to move each batch.

    The encoder runs in evaluation mode under ``no_grad`` (BatchNorm statistics and dropout
    fixed), as the reference's linear stage. Returns the mean (weighted) loss of every epoch.
    """
    from balanced_sam.optim import SAM

    _check_reiterable(batches, epochs)
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module) or not hasattr(model, "forward_features"):
        raise TypeError("model must be a built-in model with forward_features, forward_head and "
                        "head (see balanced_sam.models)")
    sam = isinstance(optimizer, SAM)
    if sam and weights_fn is not None:
        raise ValueError("a SAM-family optimizer weights the losses itself: leave weights_fn "
                         "None and configure its weighting instead")
    if reset_head and hasattr(head, "reset_parameters"):
        head.reset_parameters()

    def step(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
        if len(batch) != 2:
            raise ValueError("each batch must be (inputs, labels)")
        x, y = (_to(t, device) for t in batch)
        with torch.no_grad():
            feats = model.forward_features(x)

        def losses(feats: torch.Tensor = feats, y: torch.Tensor = y) -> torch.Tensor:
            return loss_fn(model.forward_head(feats), y)

        if sam:
            loss = optimizer.step(losses, y)
        else:
            loss = weighted_mean(losses(), None if weights_fn is None else weights_fn(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss, y.shape[0]

    return _run_epochs(batches, epochs, scheduler, step, model.eval)
