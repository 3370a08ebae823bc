r"""ImbSAM (Zhou et al., ICCV 2023) for regression: sharpness-aware on the tail only."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from balanced_sam.bins import LabelBins
from balanced_sam.optim.sam import SAM, _Ctx, _Plan, frozen_bn_stats

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
    ``retain_graph`` and fails on compiled graphs with donated buffers. With ``model=`` given,
    the second pass at :math:`\theta` leaves the BatchNorm running statistics alone, so they
    move as in a two-pass step; without it they are updated once more (the same batch
    statistics at the same :math:`\theta`, i.e. a slightly larger effective momentum).

    Calling forms:

    * ``step(loss_fn, targets)`` (optionally ``accumulate=K``, ``max_grad_norm=``,
      ``interval=`` at construction): as :class:`~balanced_sam.SAM`.
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
        params, base_optimizer, rho, p, **kwargs: as :class:`~balanced_sam.SAM` (including
            ``interval``, ``max_grad_norm``, ``model``).
        bins: :class:`~balanced_sam.LabelBins` of the training labels (defines the tail).
        eta: tail threshold on the training count of a label's bin (ImbSAM's default 20
            matches the few-shot boundary of DIR).
        update_weighting: ``None`` (default) or a scheme name for :math:`u_i`.
    """

    _splits_head_tail = True

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
        self._saw_tail = False
        self._track_tail = False  # closure form: reduce() records whether a tail sample came

    def tail_mask(self, targets: torch.Tensor) -> torch.Tensor:
        """True for targets whose bin holds fewer than ``eta`` training samples."""
        assert self.bins is not None
        idx = self.bins.bin_index(targets)
        return (self.bins.counts.to(idx.device) < self.eta)[idx]

    # ------------------------------------------------------------------ the reduction
    def _weighted_terms(self, losses: torch.Tensor, targets: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
        u = self._cached(f"w:{self.update_weighting}", targets,
                         lambda t: self._weights(self.update_weighting, t))
        tail = self._cached("tail", targets, self.tail_mask)
        assert tail is not None
        terms = losses if u is None else losses * u
        part = ~tail if self._phase == "head" else tail
        if mask is not None:
            part = part & mask
        if self._phase == "head" and self._track_tail:
            self._saw_tail = self._saw_tail or bool((tail if mask is None else tail & mask).any())
        return torch.where(part, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))

    def _regularizer_applies(self) -> bool:
        return self._phase == "head"

    def _needs_reduce(self, phase: str) -> bool:
        return True

    def _reduce(self, output: Any, targets: torch.Tensor, mask: torch.Tensor | None,
                denom: torch.Tensor | int | None, reg_scale: float) -> torch.Tensor:
        if self._phase != "perturb":
            return super()._reduce(output, targets, mask, denom, reg_scale)
        # two-step form, first pass: take the head gradient now from the shared graph
        self._phase = "head"
        head = super()._reduce(output, targets, mask, denom, reg_scale)
        self._phase = "perturb"
        tail = super()._reduce(output, targets, mask, denom, reg_scale)
        if head.requires_grad:
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            grads = torch.autograd.grad(head, params, retain_graph=True, allow_unused=True)
            self._keep_aside([(p, g) for p, g in zip(params, grads) if g is not None],
                             scaled=False)
        return tail

    def _keep_aside(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], scaled: bool) -> None:
        if self._stash and self._stash_scaled == scaled:  # several reduce() calls: accumulate
            have = {id(p): g for p, g in self._stash}
            for p, g in pairs:
                if id(p) in have:
                    have[id(p)].add_(g)
                else:
                    self._stash.append((p, g))
            return
        self._stash, self._stash_scaled = pairs, scaled

    def _stash_grads(self) -> None:
        """Move the head gradient out of ``.grad`` (no copy) until the base step."""
        pairs = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    pairs.append((p, p.grad))
                    p.grad = None
        self._keep_aside(pairs, scaled=True)

    # ------------------------------------------------------------------ the step forms
    def _tail_contexts(self, first_pass_context: _Ctx | None) -> tuple[_Ctx | None, ...]:
        return (first_pass_context, lambda: frozen_bn_stats(self.model))

    def _step_loss_fn(self, loss_fn: Callable[..., Any], plan: _Plan, scaler: Any,
                      first_pass_context: _Ctx | None, clip: float | None) -> torch.Tensor:
        self.zero_grad(set_to_none=True)
        has_tail = any(bool(self._tail_of(c.targets, c.mask).any()) for c in plan.chunks)
        self._phase = "head"
        self._ran.add("head")
        loss = self._run_pass(loss_fn, plan, scaler)
        if has_tail:
            self._stash_grads()
            self._phase = "tail"
            loss_t, go_on = self._perturbation_pass(
                lambda: self._run_pass(loss_fn, plan, scaler,
                                       self._tail_contexts(first_pass_context)), scaler)
            if go_on:
                loss_u = self._run_pass(loss_fn, plan, scaler, (self._second_pass_context,))
                loss_t = loss_u if loss_t is None else loss_t
            loss = loss + loss_t
        else:
            self.last_step_perturbed = False
        self._finish(scaler, clip)
        return loss

    def _tail_of(self, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        tail = self._cached("tail", targets, self.tail_mask)
        assert tail is not None
        return tail if mask is None else tail & mask

    def _step_closure(self, closure: Callable[[], Any], scaler: Any,
                      first_pass_context: _Ctx | None, clip: float | None) -> Any:
        self._phase = "head"
        self._saw_tail, self._track_tail = False, True
        try:
            with torch.enable_grad():
                loss_h = closure()
        finally:
            self._track_tail = False
        self._ran.add("head")
        if "head" not in self._reduced:  # no opt.reduce: no split possible, a plain SAM step
            self._phase = "perturb"
            if scaler is not None:
                scaler.unscale_(self)
            self.first_step(zero_grad=True)
            return self._closure_update(closure, loss_h, not self._skip_pending, scaler, clip)
        self._stash_grads()
        if not self._saw_tail:
            self.last_step_perturbed = False
            self._finish(scaler, clip)
            return loss_h
        self._phase = "tail"

        def tail_at_theta() -> Any:
            with torch.enable_grad(), contextlib.ExitStack() as stack:
                for ctx in self._tail_contexts(first_pass_context):
                    if ctx is not None:
                        stack.enter_context(ctx())
                return closure()

        loss_t, go_on = self._perturbation_pass(tail_at_theta, scaler)
        loss_u = self._closure_update(closure, None, go_on, scaler, clip)
        second = loss_t if loss_t is not None else loss_u
        if isinstance(loss_h, torch.Tensor) and isinstance(second, torch.Tensor):
            return loss_h + second
        return loss_h
