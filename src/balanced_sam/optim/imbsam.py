r"""ImbSAM (Zhou et al., ICCV 2023) for regression: sharpness-aware on the tail only."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from balanced_sam.bins import LabelBins
from balanced_sam.optim.sam import SAM
from balanced_sam.optim.weighting import PassWeighting, check_bins

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

    so with :math:`\rho = 0` it is the base optimizer on :math:`L_H + L_T`. A regulariser
    returned with the losses (``loss_fn() -> (losses, regulariser)``) is added to
    :math:`L_H` at :math:`\theta` only, so its gradient enters the update once.

    A batch with **no tail sample** takes a plain base-optimizer step on :math:`L_H` (one
    forward/backward pass; there is nothing to perturb). A batch with only tail samples is SAM
    on :math:`L_T`. Otherwise a step runs three forward/backward passes, each an ordinary
    ``backward()`` (so ``torch.compile``\ d models work, and no graph is retained): the head
    loss at :math:`\theta` (its gradient is kept aside), the tail loss at :math:`\theta` (sets
    :math:`\hat\epsilon_T`) and the tail loss at :math:`\theta + \hat\epsilon_T`. That is one
    forward pass more than sharing the forward pass at :math:`\theta`, which needs
    ``retain_graph`` and fails on compiled graphs with donated buffers. With ``model=`` given to
    the step,
    the second pass at :math:`\theta` leaves the BatchNorm running statistics alone, so they
    move as in a two-pass step; without it they are updated once more (the same batch
    statistics at the same :math:`\theta`, i.e. a slightly larger effective momentum).

    Calling forms:

    * ``step(loss_fn, targets, **options)``: as :class:`~balanced_sam.SAM` (``accumulate``,
      ``max_grad_norm``, ``model``... of :func:`~balanced_sam.optim.driver.sharpness_step`).
    * ``step(closure)``: the closure must compute its loss as ``opt.reduce(losses, targets)``,
      which returns the head part in the first call, and the tail part in the second (at
      :math:`\theta`) and third (at :math:`\theta + \hat\epsilon_T`) calls; the closure is
      called once when the batch has no tail sample. This gives the same parameters as the
      one-call form. Returns the sum of the first two calls' results (the loss at
      :math:`\theta`). A closure that does not use ``opt.reduce`` gets a plain SAM step and a
      :class:`~balanced_sam.optim.BalancingNotAppliedWarning`.
    * ``first_step()`` / ``second_step()`` with ``opt.reduce`` in both passes: in the first
      pass ``reduce`` takes the head gradient itself (``torch.autograd.grad`` with
      ``retain_graph=True`` on the shared forward graph, so not for compiled models with
      donated buffers, and not all-reduced by DDP) and returns the tail loss; the second
      pass's ``reduce`` returns the tail loss at :math:`\theta + \hat\epsilon_T`, and
      :meth:`second_step` adds the head gradient. Call ``reduce`` once per backward pass.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``/``adaptive``).
        base_optimizer: the optimizer class to wrap, e.g. ``torch.optim.SGD``.
        bins: :class:`~balanced_sam.LabelBins` of the training labels (defines the tail).
        eta: tail threshold on the training count of a label's bin (ImbSAM's default 20
            matches the few-shot boundary of DIR).
        rho: radius of the tail's perturbation ball, ``>= 0``.
        p: norm of the ball, ``>= 1`` or ``inf`` (default 2).
        update_weighting: ``None`` (default) or a scheme name for :math:`u_i`.
        normalize: ``"mean"`` (weights average 1 over the training samples) or ``"none"``.
        weight_kwargs: extra keyword arguments of :meth:`LabelBins.weights` (LDS kernel, clip).
        adaptive: ASAM's weight-scaled perturbation.
        interval: a fresh perturbation every ``interval`` steps, reused in between (default 1).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``...).

    The three passes are :func:`~balanced_sam.optim.driver.sharpness_step`'s, driven by the
    head/tail split of the step's :class:`~balanced_sam.optim.weighting.PassWeighting`
    (``tail_below=eta``); this class adds the split and the two-step form's :meth:`reduce`.
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
        *,
        normalize: str = "mean",
        weight_kwargs: dict[str, Any] | None = None,
        adaptive: bool = False,
        interval: int = 1,
        **base_kwargs: Any,
    ) -> None:
        check_bins(bins)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        self.eta = eta
        weighting = PassWeighting(bins, None, update_weighting, normalize=normalize,
                                  weight_kwargs=weight_kwargs, tail_below=eta)
        super().__init__(params, base_optimizer, rho, p, weighting=weighting, adaptive=adaptive,
                         interval=interval, **base_kwargs)

    def tail_mask(self, targets: torch.Tensor) -> torch.Tensor:
        """True for targets whose bin holds fewer than ``eta`` training samples."""
        return self.weighting.tail_mask(targets)

    def reduce(self, per_sample_losses: Any, targets: torch.Tensor,
               mask: torch.Tensor | None = None, *,
               regularizer: torch.Tensor | None = None) -> torch.Tensor:
        """The head or tail part of the pass in progress (see the class docstring). In the
        two-step form's first pass, also takes the head gradient from the shared graph and sets
        it aside for :meth:`second_step`, and returns the tail loss."""
        w = self.weighting
        if w.phase != "perturb":
            return super().reduce(per_sample_losses, targets, mask, regularizer=regularizer)
        w.begin("head")
        head = super().reduce(per_sample_losses, targets, mask, regularizer=regularizer)
        w.begin("perturb")
        tail = super().reduce(per_sample_losses, targets, mask, regularizer=regularizer)
        if head.requires_grad:
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            grads = torch.autograd.grad(head, params, retain_graph=True, allow_unused=True)
            self.set_aside_grads([(p, g) for p, g in zip(params, grads) if g is not None],
                                 scaled=False)
        return tail
