r"""Balanced Sharpness-Aware Minimization (BSAM; Liu, Wang, Duan, Li, ICCV 2025).

What BSAM changes in SAM is one thing: the loss whose gradient sets the perturbation is the
importance-weighted loss, so :math:`\hat\epsilon` points where the *rare* labels' loss rises
fastest. In code that is the ``perturbation`` scheme of the step's
:class:`~balanced_sam.optim.weighting.PassWeighting`; the passes, the perturbation and the base
step are SAM's (:mod:`balanced_sam.optim.sam`, :mod:`balanced_sam.optim.driver`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from balanced_sam.bins import SCHEMES, LabelBins
from balanced_sam.optim.sam import SAM
from balanced_sam.optim.weighting import PassWeighting, check_bins

__all__ = ["BalancedSAM"]


class BalancedSAM(SAM):
    r"""SAM whose perturbation is driven by the importance-weighted loss.

    For a batch with labels :math:`y_i` in bins :math:`k(y_i)` and per-sample losses
    :math:`\ell_i`, with importance weights :math:`w(k) = P_{test}(k)/P_{train}(k)` under a
    uniform test distribution (``scheme="sqrt_inv"``: :math:`w(k) \propto 1/\sqrt{N_k}`):

    .. math::
        L^w(\theta) &= \tfrac1B \textstyle\sum_i w(k(y_i))\, \ell_i(\theta)
            \qquad\text{(Eq. 11)} \\
        \hat\epsilon &= \rho\, \operatorname{sign}(\nabla L^w)\, |\nabla L^w|^{q-1}
            / \|\nabla L^w\|_q^{q/p} \qquad\text{(Eq. 10; } p=2:\
            \rho\,\nabla L^w / \|\nabla L^w\|_2) \\
        \theta &\leftarrow \text{base}\big(\theta,\ \nabla_\theta L^u(\theta + \hat\epsilon)\big)

    where :math:`L^u` is the update loss: the same weighted loss (``update_weighting="same"``,
    the reference code and the paper's main tables), the unweighted mean (``None``, the paper's
    Table 5 "Vanilla + Ours") or another scheme. The weighting costs one table look-up per step;
    everything else is SAM (two forward/backward passes). A zero weighted gradient (e.g. every
    weight 0) skips the perturbation instead of producing NaN.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``/``adaptive``).
        base_optimizer: the optimizer class to wrap, e.g. ``torch.optim.SGD``.
        bins: :class:`~balanced_sam.LabelBins` built from the *training* labels.
        scheme: perturbation weighting, one of ``"sqrt_inv"`` (the default, also for
            ``None``), ``"inv"``, ``"lds"``, or ``"none"`` (unweighted: then it is plain SAM).
        normalize: ``"mean"`` (weights average 1 over training samples; default) or ``"none"``
            (raw :math:`1/\sqrt{N_k}`, the reference code: mean 0.0765 on AgeDB-DIR, which is
            why its recipe uses lr 0.2). Rescaling the weights does not change
            :math:`\hat\epsilon` but does change the update's effective learning rate.
        update_weighting: ``"same"`` (default), ``None`` or a scheme name.
        rho: radius of the perturbation ball, ``>= 0``.
        p: norm of the ball, ``>= 1`` or ``inf`` (default 2).
        perturbation_weighting: ``scheme`` under the name that pairs with ``update_weighting``
            (give one of the two; both with different values is an error).
        weight_kwargs: extra keyword arguments of :meth:`LabelBins.weights` (LDS kernel, clip).
        adaptive: ASAM's weight-scaled perturbation.
        interval: a fresh perturbation every ``interval`` steps, reused in between (default 1).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``...).

    Calling forms: ``step(loss_fn, targets, **options)``, ``step(closure)`` and
    ``first_step()`` / ``second_step()``, the last two with ``opt.reduce(losses, targets)``
    computing the loss of each pass (else the step is plain SAM and a
    :class:`~balanced_sam.optim.BalancingNotAppliedWarning` says so); see :class:`SAM`. The
    options of the step, not of the constructor, are those of
    :func:`~balanced_sam.optim.driver.sharpness_step`: ``max_grad_norm`` (clip the update
    gradient), ``accumulate`` (micro-batches), ``mask``, ``scaler`` (AMP), ``model`` with
    ``bn_second_pass`` (BatchNorm statistics of the second pass) and ``first_pass_context``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Callable[..., Optimizer],
        bins: LabelBins,
        scheme: str | None = None,
        normalize: str = "mean",
        update_weighting: str | None = "same",
        rho: float = 0.05,
        p: float | int | str = 2,
        *,
        perturbation_weighting: str | None = None,
        weight_kwargs: dict[str, Any] | None = None,
        adaptive: bool = False,
        interval: int = 1,
        **base_kwargs: Any,
    ) -> None:
        check_bins(bins)
        if scheme is not None and perturbation_weighting is not None \
                and scheme != perturbation_weighting:
            raise ValueError(f"scheme={scheme!r} and perturbation_weighting="
                             f"{perturbation_weighting!r} name the same setting; give one")
        scheme = scheme if scheme is not None else perturbation_weighting
        scheme = "sqrt_inv" if scheme is None else scheme
        if scheme not in SCHEMES:
            raise ValueError(f"scheme (perturbation_weighting) must be one of {SCHEMES}, "
                             f"got {scheme!r}")
        # the one difference from SAM: the perturbation pass is weighted
        weighting = PassWeighting(bins, scheme, update_weighting, normalize=normalize,
                                  weight_kwargs=weight_kwargs)
        super().__init__(params, base_optimizer, rho, p, weighting=weighting, adaptive=adaptive,
                         interval=interval, **base_kwargs)
