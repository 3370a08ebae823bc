"""Methods: which optimizer and which loss weighting, by the names used everywhere.

A *method* is what a row of the paper's tables names: ``vanilla`` (plain L1), ``sqinv`` (SQINV
re-weighted L1), ``sam`` (SAM perturbation, SQINV update), ``bsam`` (SQINV-BSAM, the paper's
method), and so on. Each is a :class:`Method` in :data:`METHODS`; a baseline plugs in with one
:func:`register_method` call. :func:`build_stepper` turns a method into an optimizer and a step
function with one signature for all of them::

    opt, step = build_stepper(METHODS["bsam"], model.parameters(), bins, cfg)
    loss = step(loss_fn, targets)          # loss_fn() -> unreduced per-sample losses
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from balanced_sam.bins import LabelBins
from balanced_sam.losses import weighted_mean
from balanced_sam.optim import SAM, BalancedSAM, ImbSAM

__all__ = ["Method", "METHODS", "register_method", "get_method", "build_stepper",
           "build_base_optimizer", "DEFAULT_METHODS", "StepFn"]

StepFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A training method.

    Attributes:
        name: the name used in the CLI, configs and results.
        optimizer: ``"base"`` (the base optimizer alone), ``"sam"``, ``"bsam"`` or ``"imbsam"``.
        weighting: the loss weighting of the update (``None``: unweighted).
        perturbation: BSAM's perturbation weighting (``"bsam"`` only).
        loss: per-sample loss name (``balanced_sam.losses``); ``None``: the config's loss.
        description: one line for ``bsam bench --help`` and the tables.
        paper: where the paper uses it.
    """

    name: str
    optimizer: str = "base"
    weighting: str | None = None
    perturbation: str | None = None
    loss: str | None = None
    description: str = ""
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_rho(self) -> bool:
        return self.optimizer != "base"


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (its name must be new)."""
    if method.optimizer not in ("base", "sam", "bsam", "imbsam"):
        raise ValueError(f"method optimizer must be base, sam, bsam or imbsam, "
                         f"got {method.optimizer!r}")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _m in (
    Method("vanilla", "base", None, description="plain L1 loss", paper="Tables 1-3"),
    Method("sqinv", "base", "sqrt_inv", description="L1 weighted by 1/sqrt(N_k)",
           paper="Tables 1-3"),
    Method("inv", "base", "inv", description="L1 weighted by 1/clip(N_k, 5, 1000)",
           paper="Table 7"),
    Method("lds", "base", "lds", description="SQINV after label-distribution smoothing (DIR)",
           paper="Tables 1-3"),
    Method("bmse", "base", None, loss="bmse", description="Balanced MSE (batch Monte-Carlo)",
           paper="Tables 1-2"),
    Method("sam", "sam", "sqrt_inv", description="SAM perturbation, SQINV update",
           paper="Tables 1-2, 6"),
    Method("vanilla-sam", "sam", None, description="plain SAM: unweighted perturbation and update",
           paper="Table 5"),
    Method("imbsam", "imbsam", "sqrt_inv", description="ImbSAM (tail: bins < eta), SQINV update",
           paper="Tables 1-2"),
    Method("bsam", "bsam", "sqrt_inv", "sqrt_inv",
           description="SQINV-BSAM: weighted perturbation and weighted update (ours)",
           paper="Tables 1-3"),
    Method("inv-bsam", "bsam", "inv", "inv", description="INV-weighted BSAM", paper="Table 7"),
    Method("vanilla-bsam", "bsam", None, "sqrt_inv",
           description="SQINV-weighted perturbation, unweighted L1 update", paper="Table 5"),
):
    register_method(_m)

#: what ``bsam bench`` runs when ``--methods`` is not given
DEFAULT_METHODS = ("vanilla", "sqinv", "inv", "lds", "sam", "imbsam", "bsam", "inv-bsam",
                   "vanilla-bsam")


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}") from None


def build_base_optimizer(name: str) -> type[Optimizer]:
    table = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"optimizer must be one of {sorted(table)}, got {name!r}") from None


def _base_kwargs(cfg: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer.lower() == "sgd":
        kw["momentum"] = cfg.momentum
    return kw


def build_stepper(
    method: Method,
    params: Iterable[torch.Tensor],
    bins: LabelBins,
    cfg: Any,
    model: nn.Module | None = None,
) -> tuple[Optimizer, StepFn]:
    """The optimizer for ``method`` and ``step(loss_fn, targets, mask=None, scaler=None,
    first_pass_context=None) -> loss``.

    ``cfg`` needs ``optimizer``, ``lr``, ``momentum``, ``weight_decay``, ``rho``, ``p``,
    ``normalize``, ``eta``, ``bn_second_pass`` and ``lds`` (kernel options) attributes, as
    :class:`balanced_sam.train.TrainConfig` has.
    """
    base = build_base_optimizer(cfg.optimizer)
    kw = _base_kwargs(cfg)
    wkw = dict(cfg.lds) if "lds" in (method.weighting, method.perturbation) else {}
    common = dict(normalize=cfg.normalize, weight_kwargs=wkw, model=model,
                  bn_second_pass=cfg.bn_second_pass)
    if method.optimizer == "base":
        opt = base(params, **kw)
        scheme = method.weighting
        if scheme is not None:  # validate now
            bins.weights(scheme, cfg.normalize, **wkw)

        def step(loss_fn: Callable[[], torch.Tensor], targets: torch.Tensor,
                 mask: torch.Tensor | None = None, scaler: Any = None,
                 first_pass_context: Any = None) -> torch.Tensor:
            w = None if scheme is None else bins.sample_weights(targets, scheme, cfg.normalize,
                                                                **wkw)
            opt.zero_grad(set_to_none=True)
            loss = weighted_mean(SAM._check_losses(loss_fn(), targets), w, mask)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
            else:
                loss.backward()
                opt.step()
            return loss.detach()

        return opt, step
    if method.optimizer == "sam":
        opt = SAM(params, base, rho=cfg.rho, p=cfg.p, bins=bins,
                  update_weighting=method.weighting, **common, **kw)
    elif method.optimizer == "bsam":
        opt = BalancedSAM(params, base, bins, scheme=method.perturbation or "sqrt_inv",
                          update_weighting="same" if method.weighting == method.perturbation
                          else method.weighting, rho=cfg.rho, p=cfg.p, **common, **kw)
    else:
        opt = ImbSAM(params, base, bins, eta=cfg.eta, rho=cfg.rho, p=cfg.p,
                     update_weighting=method.weighting, **common, **kw)

    def sam_step(loss_fn: Callable[[], torch.Tensor], targets: torch.Tensor,
                 mask: torch.Tensor | None = None, scaler: Any = None,
                 first_pass_context: Any = None) -> torch.Tensor:
        return opt.step(loss_fn, targets, mask=mask, scaler=scaler,
                        first_pass_context=first_pass_context)

    return opt, sam_step
