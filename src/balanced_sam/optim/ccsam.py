r"""CC-SAM (Zhou et al., CVPR 2023, class-conditional SAM) for regression: one perturbation per
group of label bins, its radius growing as the group's bins get rarer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.optim import Optimizer

from balanced_sam.bins import LabelBins
from balanced_sam.losses import check_losses, check_mask, split_loss_output
from balanced_sam.optim.driver import frozen_bn_stats, pass_runner, second_pass_context
from balanced_sam.optim.norms import check_max_norm
from balanced_sam.optim.sam import SAM
from balanced_sam.optim.weighting import PassWeighting, check_bins

__all__ = ["CCSAM", "GroupWeighting", "bin_groups"]

_PASSES = ("CCSAM needs 2 passes per group present in the batch: call step(loss_fn, targets) "
           "or step(closure), not first_step() / second_step()")


def bin_groups(bins: LabelBins, groups: str | int) -> tuple[torch.Tensor, int]:
    r"""``(group_of_bin, num_groups)``: the group (int64) of every bin.

    ``"regions"``: the bins' many / medium / few region (0, 1, 2). An int ``K``: quantile groups
    of the training labels, bin ``k`` in
    :math:`q(k) = \min(K-1, \lfloor K (C_{k-1} + N_k/2) / N \rfloor)`, the quantile group of the
    bin's median training sample (:math:`C_{k-1}` the training samples below bin ``k``): groups
    are contiguous label ranges, and a bin with more than :math:`N/K` samples can leave a group
    without bins (it is never present; groups are not renumbered).
    """
    if groups == "regions":
        return bins.region_index().clone(), 3
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be 'regions' or an integer >= 1, got {groups!r}")
    n = bins.counts.to(torch.float64)
    below = torch.cumsum(n, 0) - n
    q = torch.floor(groups * (below + n / 2) / n.sum().clamp_min(1))
    return q.clamp(max=groups - 1).to(torch.int64), groups


class GroupWeighting(PassWeighting):
    r"""The weighting of CC-SAM's passes: every pass weights with ``update`` and counts only the
    elements of the group in progress (:attr:`group`).

    A pass at :math:`\theta` (phase ``"perturb"``) returns :math:`\bar L_g(\theta) =
    \frac1B\sum_{i\in g} u_i \ell_i(\theta)`, no regulariser; a perturbed pass (``"update"``)
    returns :math:`\beta \bar L_g(\theta+\epsilon_g) + R / K_b` with :math:`K_b` the groups
    present. :attr:`groups` (the groups present, ascending) is set by :meth:`start`: by the step
    in the one-call form, by the first :meth:`reduce` of the step in the closure form. With no
    group present (everything masked) the pass counts the masked elements (none) and ``R``.
    """

    def __init__(self, bins: LabelBins, update: str | None, group_of_bin: torch.Tensor,
                 flat_ratio: float, *, normalize: str = "mean",
                 weight_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(bins, None, update, normalize=normalize, weight_kwargs=weight_kwargs)
        self.group_of_bin = group_of_bin
        self.flat_ratio = flat_ratio
        #: more than one group holds bins (else a group is the whole batch: no mask)
        self.split = bool((group_of_bin != group_of_bin[:1]).any())
        #: the groups present in the step's batch (``None``: not known yet)
        self.groups: list[int] | None = None
        #: the group of the pass in progress (``None``: every counted element)
        self.group: int | None = None
        #: a pass of the step returned a regulariser
        self.saw_regularizer = False
        #: the regulariser's share added by the perturbed passes so far (detached)
        self.reg_total: torch.Tensor | None = None

    def scheme_of(self, phase: str) -> str | None:
        return self.update

    def needs_reduce(self, phase: str) -> bool:
        return True  # the group split needs it

    def group_index(self, targets: torch.Tensor) -> torch.Tensor:
        """The group of every target (by its bin)."""
        bins = self.bins
        assert bins is not None

        def make(t: torch.Tensor) -> torch.Tensor:
            idx = bins.bin_index(t)
            return self.group_of_bin.to(idx.device)[idx]

        out = self._cached("group", targets, make)
        assert out is not None
        return out

    def start(self, targets: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
        """Find the groups present among the counted elements (one host sync); the first is
        the group in progress."""
        gi = self.group_index(targets)
        self.groups = [int(g) for g in torch.unique(gi if mask is None else gi[mask]).tolist()]
        self.group = self.groups[0] if self.groups else None
        return self.groups

    def reduce(self, output: Any, targets: torch.Tensor, mask: torch.Tensor | None = None, *,
               denom: torch.Tensor | int | None = None, share: float = 1.0,
               phase: str | None = None, name: str = "loss_fn") -> torch.Tensor:
        phase = self.phase if phase is None else phase
        losses, reg = split_loss_output(output, name=name)
        losses = check_losses(losses, targets, name=name)
        if self.groups is None:
            self.start(targets, mask)
        assert self.groups is not None
        if denom is None:
            denom = max(targets.numel(), 1) if mask is None else mask.sum().clamp_min(1)
        keep = mask
        if self.group is not None and self.split:
            part = self.group_index(targets) == self.group
            keep = part if mask is None else part & mask
        loss = super().reduce(losses, targets, keep, denom=denom, phase=phase, name=name)
        if phase == "update" and self.flat_ratio != 1.0:
            loss = loss * self.flat_ratio
        if reg is not None:
            self.saw_regularizer = True
            if self.group is None:  # nothing counted: the regulariser alone
                loss = loss + reg * share
            elif phase == "update":
                r = reg * (share / len(self.groups))
                loss = loss + r
                self.reg_total = r.detach() if self.reg_total is None \
                    else self.reg_total + r.detach()
        return loss

    def end_step(self, owner: str) -> None:
        self.groups, self.group, self.saw_regularizer, self.reg_total = None, None, False, None
        super().end_step(owner)


class CCSAM(SAM):
    r"""Class-conditional SAM with groups of label bins as the classes.

    The batch's elements fall into groups :math:`g` of label bins (default the many / medium /
    few regions; ``groups=K``: K quantile groups of the training labels, :func:`bin_groups`).
    With :math:`u_i` the update weights (1 by default; ``"sqrt_inv"`` for the ``ccsam`` method),
    :math:`B` the batch's element count, :math:`G_b` the groups present and
    :math:`K_b = |G_b|`:

    .. math::
        \bar L_g(\theta) &= \tfrac1B \textstyle\sum_{i \in g} u_i\, \ell_i(\theta), \qquad
        n_g = \frac{\sum_{k \in g} N_k}{|\{k \in g: N_k > 0\}|}, \qquad
        \rho_g = \rho\, (\max_h n_h / n_g)^{1/4} \\
        \epsilon_g &= \rho_g\, \operatorname{sign}(\nabla \bar L_g)\,|\nabla \bar L_g|^{q-1}
            / \|\nabla \bar L_g\|_q^{q/p} \\
        \theta &\leftarrow \text{base}\Big(\theta,\ \textstyle\sum_{g \in G_b}
            (1-\beta)\nabla \bar L_g(\theta) + \beta \nabla \bar L_g(\theta + \epsilon_g)
            + \tfrac1{K_b} \nabla R(\theta + \epsilon_g)\Big)

    with :math:`\beta` = ``flat_ratio`` and :math:`R` the regulariser of a ``(losses,
    regulariser)`` pair (RankSim, ConR...), averaged over the perturbed points. Every
    :math:`\epsilon_g` starts from :math:`\theta` (restored exactly in between): they never add
    up. :math:`n_g` is the mean training count of the group's populated bins (a bin plays the
    class), so the most populated group gets :math:`\rho` and rarer ones more.

    **Cost: 2·K_b forward/backward passes per step** (6 with the three regions present, 3x SAM),
    not the "K+1" of issue 23: a group's gradient at :math:`\theta` needs its own backward (it
    cannot be separated from a summed one), then one pass at each :math:`\theta + \epsilon_g`.
    Sharing the forward at :math:`\theta` (``retain_graph``, K_b backward calls) would save about
    a tenth and breaks compiled models with donated buffers. Empty groups cost nothing; a group
    whose gradient is zero (or whose radius is 0) gets :math:`\epsilon_g = 0` and reuses its
    gradient at :math:`\theta` (no second pass, unless there is a regulariser). Memory: the
    saved :math:`\theta`, the summed gradient and ``.grad``.

    Checks: ``rho=0`` is the base step on :math:`L^u + R`; one group with ``flat_ratio=1`` is
    SAM (unweighted) or BalancedSAM with ``scheme=update_weighting`` (the direction is the
    update-weighted group loss).

    Source: the official code ``github.com/zzpustc/CC-SAM`` at commit 651d3df (stage 1 of
    ``train_cifar.py``: per-class mean-loss gradients, radius :math:`\propto (n_c-1)^{-1/4}`,
    the loss :math:`(1-\beta)\,\text{ERM}(\theta) + \beta\sum_c \text{loss}_c(\theta+\epsilon_c)`
    with ``flat_ratio`` 0.3 / 0.5). The paper's equations were not checked against it (only
    its abstract was available). Adapted for regression:

    1. classes -> groups of label bins (per-bin CC-SAM would cost 2 passes per bin present);
    2. the class count -> :math:`n_g`, the mean count of the group's populated bins (the group
       total would make quantile groups all alike);
    3. radius :math:`\rho(n_{max}/n_g)^{1/4}`: the code's exponent, without its
       :math:`\|\theta\|^{1/2}\|\hat g\|^{-1/2} D^{1/4}/\sqrt2` factors and its :math:`n-1`;
    4. every parameter is perturbed, with one global norm, any ``p`` and ASAM (the code: the
       classifier only, per tensor; ``rho=0`` on a parameter group leaves it unperturbed);
    5. any per-sample loss (L1) instead of (mixup) cross-entropy, and an optional update
       weighting, which also enters the directions (the code has none in stage 1);
    6. the regulariser averaged over the perturbed points;
    7. BatchNorm: the first pass at :math:`\theta` updates the running statistics, the others
       at :math:`\theta` leave them alone when the step gets ``model=``; the perturbed passes
       follow ``bn_second_pass`` (the code's backbone runs once per step);
    8. not built: stage 2 (frozen backbone, class-balanced sampling, feature perturbation) and
       the code's schedule (mixup, 200 + 30 epochs, warm-up).

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``/``adaptive``).
        base_optimizer: the optimizer class to wrap, e.g. ``torch.optim.SGD``.
        bins: :class:`~balanced_sam.LabelBins` of the training labels.
        groups: ``"regions"`` (default) or an int ``K >= 1`` (quantile groups).
        rho: the radius of the most populated group, ``>= 0``.
        p: norm of the ball, ``>= 1`` or ``inf`` (default 2).
        flat_ratio: :math:`\beta \in (0, 1]`, the share of the perturbed losses in the update
            (default 0.5, the code's CIFAR-100 value; 1: the SAM-like variant, no ERM term).
        update_weighting: ``None`` (default) or a scheme name for :math:`u_i`.
        normalize, weight_kwargs: of the weights (:class:`PassWeighting`).
        adaptive: ASAM's weight-scaled perturbation.
        interval: must be 1 (a stored perturbation per group is not supported).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``...).

    Calling forms: ``step(loss_fn, targets, **options)`` with the options of
    :func:`~balanced_sam.optim.driver.sharpness_step` (``first_pass_context`` wraps the passes
    at :math:`\theta`, whose gradients also enter the update: not DDP's ``no_sync``); or
    ``step(closure)``, the closure computing its loss as ``opt.reduce(losses, targets)``; it is
    called 2·K_b times (group by group: at :math:`\theta`, then at :math:`\theta+\epsilon_g`).
    A closure that never calls ``opt.reduce`` gets a SAM step and a
    :class:`~balanced_sam.optim.BalancingNotAppliedWarning`. Returns the loss at
    :math:`\theta` (:math:`L^u`, detached) plus the mean regulariser of the perturbed passes.
    """

    weighting: GroupWeighting

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Callable[..., Optimizer],
        bins: LabelBins,
        groups: str | int = "regions",
        rho: float = 0.05,
        p: float | int | str = 2,
        flat_ratio: float = 0.5,
        update_weighting: str | None = None,
        *,
        normalize: str = "mean",
        weight_kwargs: dict[str, Any] | None = None,
        adaptive: bool = False,
        interval: int = 1,
        **base_kwargs: Any,
    ) -> None:
        check_bins(bins)
        if isinstance(flat_ratio, bool) or not isinstance(flat_ratio, (int, float)) \
                or not 0 < flat_ratio <= 1:
            raise ValueError(f"flat_ratio must be a number in (0, 1], got {flat_ratio!r} "
                             "(0 would be the base optimizer at the cost of the group passes)")
        if interval != 1:
            raise ValueError(f"CCSAM takes no interval (got {interval!r}): a stored "
                             "perturbation per group is not supported; use interval=1, or "
                             "SAM / BalancedSAM with interval=K")
        self.group_of_bin, self.num_groups = bin_groups(bins, groups)
        self.groups = groups
        self.flat_ratio = float(flat_ratio)
        n = bins.counts.to(torch.float64)
        populated = torch.zeros(self.num_groups, dtype=torch.float64).index_add_(
            0, self.group_of_bin, (n > 0).to(torch.float64))
        total = torch.zeros(self.num_groups, dtype=torch.float64).index_add_(
            0, self.group_of_bin, n)
        #: n_g: the mean training count of each group's populated bins (NaN: none populated)
        self.group_counts = torch.where(populated > 0, total / populated.clamp_min(1),
                                        torch.tensor(math.nan, dtype=torch.float64))
        n_ref = float(self.group_counts.nan_to_num(0).max())
        #: r_g = (n_max / n_g)^(1/4): the radius of group g is rho * r_g (NaN: no training
        #: sample; a target there, e.g. of bins not built from the training labels, gets the
        #: largest radius)
        self.group_radius_factor = (n_ref / self.group_counts) ** 0.25
        self._factor = self.group_radius_factor.nan_to_num(
            float(self.group_radius_factor.nan_to_num(1.0).max())).tolist()
        weighting = GroupWeighting(bins, update_weighting, self.group_of_bin, self.flat_ratio,
                                   normalize=normalize, weight_kwargs=weight_kwargs)
        super().__init__(params, base_optimizer, rho, p, weighting=weighting, adaptive=adaptive,
                         **base_kwargs)

    # ------------------------------------------------------------------ the calling forms
    def first_step(self, zero_grad: bool = False) -> bool:
        raise RuntimeError(_PASSES)

    def second_step(self, zero_grad: bool = False, scaler: Any = None,
                    max_grad_norm: float | None = None) -> None:
        raise RuntimeError(_PASSES)

    def step(self, closure: Callable[..., Any] | None = None,
             targets: torch.Tensor | None = None, **options: Any) -> Any:
        """All the groups' passes and the base step; see the class docstring."""
        if closure is None:
            raise ValueError(_PASSES)
        return self._grouped_step(closure, targets, **options)

    @contextlib.contextmanager
    def _radius(self, factor: float) -> Iterator[None]:
        """Every parameter group's rho times ``factor`` (the group's radius) in the body."""
        saved = [g["rho"] for g in self.param_groups]
        for g in self.param_groups:
            g["rho"] = g["rho"] * factor
        try:
            yield
        finally:
            for g, rho in zip(self.param_groups, saved):
                g["rho"] = rho

    def _grouped_step(self, loss_fn: Callable[..., Any], targets: torch.Tensor | None = None,
                      *, mask: torch.Tensor | None = None, scaler: Any = None,
                      first_pass_context: Any = None, accumulate: int = 1,
                      model: torch.nn.Module | None = None, bn_second_pass: str = "update",
                      max_grad_norm: float | None = None) -> Any:
        clip = check_max_norm(max_grad_norm)
        update_context = second_pass_context(model, bn_second_pass)
        w = self.weighting
        if targets is None and (accumulate != 1 or mask is not None):
            raise ValueError("accumulate= and mask= need the one-call form step(loss_fn, targets)")
        run = pass_runner(w, loss_fn, targets, mask=mask, accumulate=accumulate, scaler=scaler)
        if targets is not None:
            self.zero_grad(set_to_none=True)
            w.start(targets, check_mask(mask, targets))
        theta_loss: Any = None
        i = 0
        while True:
            w.begin("perturb")  # the pass at theta of group i
            if w.groups:
                w.group = w.groups[i]
            frozen = (lambda: frozen_bn_stats(model)) if i else None
            out = run((first_pass_context, frozen))
            theta_loss = out if theta_loss is None else theta_loss + out
            if not w.reduced("perturb"):  # a closure without opt.reduce: a SAM step on it
                return self._sam_step_on(run, out, scaler, clip, update_context)
            if not w.groups:  # nothing counted: the base step on the regulariser alone
                self.finish_step(scaler, clip)
                return theta_loss
            with self._radius(self._factor[w.groups[i]]):
                perturbed = super().first_step()
            if self.skip_pending:  # a non-finite gradient: skip the whole step
                self.restore()
                if scaler is not None:
                    scaler.unscale_(self.base_optimizer)  # records the inf for scaler.update()
                self.finish_step(scaler, clip)
                return theta_loss
            if perturbed or w.saw_regularizer:
                grads = [q.grad for g in self.param_groups for q in g["params"]
                         if q.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, 1.0 - self.flat_ratio)
                self.set_aside_grads()  # (1 - beta) * grad L_g(theta)
                w.begin("update")
                w.group = w.groups[i]
                run((update_context,))
                w.end_pass()
            self.restore()
            self.set_aside_grads()  # + beta * grad L_g(theta + eps_g) (or the gradient at theta)
            i += 1
            if i == len(w.groups):
                break
        reg = w.reg_total
        w.begin("perturb")  # (every pass that ran is recorded: finish_step records this one)
        self.finish_step(scaler, clip)
        return theta_loss if reg is None else theta_loss + reg

    def _sam_step_on(self, run: Callable[..., Any], loss: Any, scaler: Any,
                     clip: float | None, update_context: Any) -> Any:
        """The step of a closure that never called ``opt.reduce``: SAM on its loss."""
        if scaler is not None:
            scaler.unscale_(self)
        super().first_step(zero_grad=True)
        if not self.skip_pending:
            run((update_context,))
        self.finish_step(scaler, clip)
        return loss

    def __repr__(self) -> str:
        return (f"CCSAM(groups={self.groups!r}, rho={self.defaults['rho']}, p={self.p}, "
                f"flat_ratio={self.flat_ratio}, update_weighting={self.update_weighting}, "
                f"base={type(self.base_optimizer).__name__})")
