r"""Balanced Sharpness-Aware Minimization (BSAM; Liu, Wang, Duan, Li, ICCV 2025)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from balanced_sam.bins import SCHEMES, LabelBins
from balanced_sam.optim.sam import SAM

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
    everything else is SAM (two forward/backward passes).

    Args:
        params, base_optimizer, rho, p, **base_kwargs: as :class:`~balanced_sam.SAM`.
        bins: :class:`~balanced_sam.LabelBins` built from the *training* labels.
        scheme: perturbation weighting, one of ``"sqrt_inv"`` (default), ``"inv"``, ``"lds"``,
            ``"none"`` (``"none"`` makes it plain SAM).
        perturbation_weighting: the same as ``scheme`` under the name that pairs with
            ``update_weighting`` (give one of the two; both with different values is an error).
        normalize: ``"mean"`` (weights average 1 over training samples; default) or ``"none"``
            (raw :math:`1/\sqrt{N_k}`, the reference code: mean 0.0765 on AgeDB-DIR, which is
            why its recipe uses lr 0.2). Rescaling the weights does not change
            :math:`\hat\epsilon` but does change the update's effective learning rate.
        update_weighting: ``"same"`` (default), ``None`` or a scheme name.

    All other keyword arguments (``adaptive``, ``model``, ``bn_second_pass``, ``weight_kwargs``,
    ``interval``, ``max_grad_norm``) are those of :class:`~balanced_sam.SAM`, and so are the
    calling forms: ``step(loss_fn, targets)``, ``step(closure)`` and ``first_step()`` /
    ``second_step()``, the last two with ``opt.reduce(losses, targets)`` computing the loss of
    each pass (else the step is plain SAM and a
    :class:`~balanced_sam.optim.BalancingNotAppliedWarning` says so). A zero weighted gradient
    (e.g. every weight 0) skips the perturbation instead of producing NaN.
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
        **kwargs: Any,
    ) -> None:
        if not isinstance(bins, LabelBins):
            raise TypeError("bins must be a balanced_sam.LabelBins built from the training "
                            f"labels, got {type(bins).__name__}")
        if scheme is not None and perturbation_weighting is not None \
                and scheme != perturbation_weighting:
            raise ValueError(f"scheme={scheme!r} and perturbation_weighting="
                             f"{perturbation_weighting!r} name the same setting; give one")
        scheme = scheme if scheme is not None else perturbation_weighting
        if scheme is None:
            scheme = "sqrt_inv"
        if scheme not in SCHEMES:
            raise ValueError(f"scheme (perturbation_weighting) must be one of {SCHEMES}, "
                             f"got {scheme!r}")
        self.perturbation_weighting = None if scheme == "none" else scheme
        super().__init__(params, base_optimizer, rho=rho, p=p, bins=bins,
                         update_weighting=update_weighting, normalize=normalize, **kwargs)
