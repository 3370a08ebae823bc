r"""ImbSAM (Zhou et al., ICCV 2023) for regression: sharpness-aware on the tail only."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from balanced_sam.bins import LabelBins
from balanced_sam.optim.sam import SAM

__all__ = ["ImbSAM"]


class ImbSAM(SAM):
    r"""Imbalanced SAM: flatten the loss of the tail samples, plain descent on the head.

    A sample is in the *tail* when its label's bin has fewer than ``eta`` training samples.
    With :math:`u_i` the update weights (1 by default; ``update_weighting="sqrt_inv"`` for the
    BSAM paper's "ImbSAM" baseline) and :math:`B` the batch size:

    .. math::
        L_H(\theta) &= \tfrac1B \textstyle\sum_{i \in \text{head}} u_i\, \ell_i(\theta), \qquad
        L_T(\theta) = \tfrac1B \textstyle\sum_{i \in \text{tail}} u_i\, \ell_i(\theta) \\
        \hat\epsilon_T &= \rho\, \operatorname{sign}(\nabla L_T)\,|\nabla L_T|^{q-1}
            / \|\nabla L_T\|_q^{q/p} \\
        \theta &\leftarrow \text{base}\big(\theta,\
            \nabla L_H(\theta) + \nabla L_T(\theta + \hat\epsilon_T)\big)

    so with :math:`\rho = 0` it is the base optimizer on :math:`L_H + L_T`.

    A batch with **no tail sample** takes a plain base-optimizer step on :math:`L_H` (one
    forward/backward pass; there is nothing to perturb). A batch with only tail samples is SAM
    on :math:`L_T`. Cost otherwise: two forward and three backward passes (head and tail
    gradients at :math:`\theta` are taken separately from one forward pass).

    Args:
        params, base_optimizer, rho, p, **kwargs: as :class:`~balanced_sam.SAM`.
        bins: :class:`~balanced_sam.LabelBins` of the training labels (defines the tail).
        eta: tail threshold on the training count of a label's bin (ImbSAM's default 20
            matches the few-shot boundary of DIR).
        update_weighting: ``None`` (default) or a scheme name for :math:`u_i`.

    The one-call :meth:`step` is the supported interface (the head gradient must be kept
    aside); ``first_step``/``second_step`` work as in SAM for users who do that themselves.
    Distributed data parallel is not supported by :meth:`step` (the head gradient is taken with
    ``torch.autograd.grad``, which DDP does not all-reduce).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Callable[..., Optimizer],
        bins: LabelBins,
        eta: int = 20,
        rho: float = 0.05,
        p: float | int | str = 2,
        update_weighting: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(bins, LabelBins):
            raise TypeError("bins must be a balanced_sam.LabelBins built from the training "
                            f"labels, got {type(bins).__name__}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        self.eta = eta
        super().__init__(params, base_optimizer, rho=rho, p=p, bins=bins,
                         update_weighting=update_weighting, **kwargs)

    def tail_mask(self, targets: torch.Tensor) -> torch.Tensor:
        """True for targets whose bin holds fewer than ``eta`` training samples."""
        idx = self.bins.bin_index(targets)
        return (self.bins.counts.to(idx.device) < self.eta)[idx]

    def step(  # type: ignore[override]
        self,
        loss_fn: Callable[[], torch.Tensor] | None = None,
        targets: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        scaler: Any = None,
        first_pass_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> torch.Tensor:
        """One ImbSAM step; ``loss_fn()`` returns unreduced losses of the targets' shape.

        Returns the full first-pass loss :math:`L_H + L_T` at :math:`\\theta` (detached).
        """
        if loss_fn is None or targets is None:
            raise ValueError("ImbSAM.step needs loss_fn (unreduced losses) and targets: "
                             "the head/tail split is made from the targets")
        ctx = first_pass_context or contextlib.nullcontext
        tail = self.tail_mask(targets)
        valid = torch.ones_like(tail) if mask is None else mask.to(torch.bool).expand_as(tail)
        tail = tail & valid
        head = valid & ~tail
        count = valid.sum().clamp_min(1)
        u = self.update_weights(targets)
        has_tail = bool(tail.any())
        self.zero_grad(set_to_none=True)
        self.last_step_perturbed = False

        def split(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            losses = self._check_losses(losses, targets)
            if u is not None:
                losses = losses * u
            losses = torch.broadcast_to(losses, tail.shape)
            zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
            return (torch.where(head, losses, zero).sum() / count,
                    torch.where(tail, losses, zero).sum() / count)

        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        with torch.enable_grad(), ctx():
            head_loss, tail_loss = split(loss_fn())
            if not has_tail:
                self._backward(head_loss, scaler)
        if not has_tail:
            if scaler is not None:
                scaler.step(self.base_optimizer)
            else:
                self.base_optimizer.step()
            self._opt_called = True
            return head_loss.detach()

        with torch.enable_grad():
            scaled_head = scaler.scale(head_loss) if scaler is not None else head_loss
            head_grads = torch.autograd.grad(scaled_head, params, retain_graph=True,
                                             allow_unused=True)
            self._backward(tail_loss, scaler)
        if scaler is not None:
            scaler.unscale_(self)
            if self._found_inf(scaler):
                self.zero_grad(set_to_none=True)
                return (head_loss + tail_loss).detach()
        self.first_step(zero_grad=True)
        with torch.enable_grad(), self._second_pass_context():
            _, tail_loss2 = split(loss_fn())
            self._backward(tail_loss2, scaler)
        # add the head gradient at theta (scaled alike when a GradScaler is in use)
        with torch.no_grad():
            pairs = [(prm, hg) for prm, hg in zip(params, head_grads) if hg is not None]
            both = [(prm.grad, hg) for prm, hg in pairs if prm.grad is not None]
            if both:
                torch._foreach_add_([g for g, _ in both], [h for _, h in both])
            for prm, hg in pairs:
                if prm.grad is None:  # used by the head only
                    prm.grad = hg
        self.second_step(scaler=scaler)
        return (head_loss + tail_loss).detach()
