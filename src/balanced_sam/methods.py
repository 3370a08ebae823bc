"""Methods: which sharpness-aware step and which two weightings, by the names used everywhere.

A *method* is what a row of the paper's tables names: ``vanilla`` (plain L1), ``sqinv`` (SQINV
re-weighted L1), ``sam`` (SAM perturbation, SQINV update), ``bsam`` (SQINV-BSAM, the paper's
method), and so on. Each is a :class:`Method` in :data:`METHODS`, described by three words of one
vocabulary (the optimizers use the same two weighting names):

* ``sharpness``: ``"none"`` (the base optimizer alone), ``"sam"``, ``"bsam"`` or ``"imbsam"``;
* ``perturbation_weighting``: the per-sample weights of the loss whose gradient sets the
  perturbation (BSAM's contribution; ``None``: unweighted);
* ``update_weighting``: the per-sample weights of the loss whose gradient updates the weights
  (``None``: unweighted).

A baseline plugs in with one :func:`register_method` call. :func:`build_stepper` turns a method
into an optimizer and a step function with one signature for all of them::

    opt, step = build_stepper(METHODS["bsam"], model.parameters(), bins, cfg)
    loss = step(loss_fn, targets)          # loss_fn() -> unreduced per-sample losses

Older spellings still work: ``Method(optimizer="base"|"sam"|..., weighting=..., perturbation=...,
extra=...)`` and the attributes ``method.optimizer``, ``.weighting``, ``.perturbation``,
``.extra``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from balanced_sam.bins import SCHEMES, LabelBins
from balanced_sam.losses import weighted_mean
from balanced_sam.optim import SAM, BalancedSAM, ImbSAM

__all__ = ["Method", "METHODS", "SHARPNESS", "register_method", "get_method", "base_method",
           "build_stepper",
           "build_base_optimizer", "DEFAULT_METHODS", "StepFn"]

StepFn = Callable[..., torch.Tensor]

#: the sharpness-aware steps a method can take ("none": the base optimizer's plain step)
SHARPNESS = ("none", "sam", "bsam", "imbsam")


@dataclass(frozen=True, init=False)
class Method:
    """A training method.

    Attributes:
        name: the name used in the CLI, configs and results.
        sharpness: ``"none"``, ``"sam"``, ``"bsam"`` or ``"imbsam"`` (old name ``optimizer``,
            where ``"base"`` meant ``"none"``).
        update_weighting: the weighting of the update loss (``None``: unweighted; old name
            ``weighting``).
        perturbation_weighting: the weighting of the perturbation loss, for ``"bsam"`` only
            (default there ``"sqrt_inv"``; old name ``perturbation``).
        loss: per-sample loss name (``balanced_sam.losses``); ``None``: the config's loss.
        description: one line for ``bsam list`` and the tables.
        paper: where the paper uses it.
        optimizer_options: keyword arguments for the optimizer that override the config's
            (e.g. ``{"eta": 10}`` for an ImbSAM variant); old name ``extra``.
    """

    name: str
    sharpness: str = "none"
    update_weighting: str | None = None
    perturbation_weighting: str | None = None
    loss: str | None = None
    description: str = ""
    paper: str = ""
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, name: str, sharpness: str = "none", update_weighting: str | None = None,
                 perturbation_weighting: str | None = None, loss: str | None = None,
                 description: str = "", paper: str = "",
                 optimizer_options: Mapping[str, Any] | None = None, *,
                 optimizer: str | None = None, weighting: str | None = None,
                 perturbation: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        sharpness = optimizer if optimizer is not None else sharpness
        values = {
            "name": name,
            "sharpness": "none" if sharpness == "base" else sharpness,
            "update_weighting": weighting if weighting is not None else update_weighting,
            "perturbation_weighting": (perturbation if perturbation is not None
                                       else perturbation_weighting),
            "loss": loss, "description": description, "paper": paper,
            "optimizer_options": dict(extra if extra is not None else optimizer_options or {}),
        }
        if values["sharpness"] not in SHARPNESS:
            raise ValueError(f"method {name!r}: sharpness must be one of {SHARPNESS} (or 'base' "
                             f"for 'none'), got {sharpness!r}")
        for key in ("update_weighting", "perturbation_weighting"):
            if values[key] not in (None, *SCHEMES):
                raise ValueError(f"method {name!r}: {key} must be None or one of {SCHEMES}, "
                                 f"got {values[key]!r}")
        if values["sharpness"] == "bsam" and values["perturbation_weighting"] is None:
            values["perturbation_weighting"] = "sqrt_inv"  # BSAM's defining choice (the paper's)
        if values["perturbation_weighting"] is not None and values["sharpness"] != "bsam":
            raise ValueError(f"method {name!r}: perturbation_weighting needs sharpness 'bsam' "
                             f"(SAM and ImbSAM perturb with the unweighted loss)")
        for k, v in values.items():
            object.__setattr__(self, k, v)

    @property
    def uses_rho(self) -> bool:
        return self.sharpness != "none"

    # the older names
    @property
    def optimizer(self) -> str:
        return "base" if self.sharpness == "none" else self.sharpness

    @property
    def weighting(self) -> str | None:
        return self.update_weighting

    @property
    def perturbation(self) -> str | None:
        return self.perturbation_weighting

    @property
    def extra(self) -> Mapping[str, Any]:
        return self.optimizer_options


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _m in (
    Method("vanilla", "none", None, description="plain L1 loss", paper="Tables 1-3"),
    Method("sqinv", "none", "sqrt_inv", description="L1 weighted by 1/sqrt(N_k)",
           paper="Tables 1-3"),
    Method("inv", "none", "inv", description="L1 weighted by 1/clip(N_k, 5, 1000)",
           paper="Table 7"),
    Method("lds", "none", "lds", description="SQINV after label-distribution smoothing (DIR)",
           paper="Tables 1-3"),
    Method("bmse", "none", None, loss="bmse", description="Balanced MSE (batch Monte-Carlo)",
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


#: ``NAME-iK``: a SAM-family method with a fresh perturbation every K steps (issue 13)
_INTERVAL = re.compile(r"^(?P<base>.+)-i(?P<k>[0-9]+)$")


def base_method(name: str) -> str:
    """The registered method a name derives from (``bsam-i5`` -> ``bsam``), else the name: a
    recipe's rho for ``bsam`` is also ``bsam-i5``'s."""
    m = _INTERVAL.match(str(name))
    return m["base"] if name not in METHODS and m and m["base"] in METHODS else name


def get_method(name: str) -> Method:
    """The registered method ``name``, or an interval variant of one: ``NAME-iK`` (e.g.
    ``bsam-i5``, ``sam-i10``) is the SAM-family method ``NAME`` computing a fresh perturbation
    only every ``K`` steps and reusing it in between (the optimizers' ``interval=K``; it wins
    over ``train.interval``). A bench can so compare ``bsam`` with ``bsam-i5`` side by side."""
    if name in METHODS:
        return METHODS[name]
    m = _INTERVAL.match(str(name))
    if m and m["base"] in METHODS:
        base, k = METHODS[m["base"]], int(m["k"])
        if not base.uses_rho:
            raise ValueError(f"method {name!r}: the -iK suffix (a perturbation every K steps) "
                             f"needs a SAM-family method, and {base.name!r} takes no "
                             "perturbation")
        if k < 1:
            raise ValueError(f"method {name!r}: the interval K in -iK must be >= 1")
        return Method(name, base.sharpness, base.update_weighting, base.perturbation_weighting,
                      base.loss, f"{base.description}; a fresh perturbation every {k} steps",
                      base.paper, {**base.optimizer_options, "interval": k})
    raise ValueError(f"unknown method {name!r}; choose from: {', '.join(METHODS)} (a "
                     "SAM-family name with -iK, e.g. bsam-i5, perturbs every K steps)")


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
    :class:`balanced_sam.train.TrainConfig` has (``interval`` and ``max_grad_norm`` too, when
    present); ``method.optimizer_options`` override them.

    Every optimizer returned counts the steps it skipped because a gradient was not finite in
    ``opt.skipped_steps`` (the SAM family's own counter; the plain step keeps one likewise):
    such a step leaves the parameters and the optimizer's state untouched.
    """
    base = build_base_optimizer(cfg.optimizer)
    kw = _base_kwargs(cfg)
    uses_lds = "lds" in (method.update_weighting, method.perturbation_weighting)
    wkw = dict(cfg.lds) if uses_lds else {}
    clip = getattr(cfg, "max_grad_norm", None)
    if method.sharpness == "none":
        return _plain_stepper(base(params, **kw, **method.optimizer_options), method, bins,
                              cfg.normalize, wkw, clip)
    common: dict[str, Any] = dict(rho=cfg.rho, p=cfg.p, normalize=cfg.normalize,
                                  weight_kwargs=wkw, model=model,
                                  bn_second_pass=cfg.bn_second_pass,
                                  interval=getattr(cfg, "interval", 1), max_grad_norm=clip, **kw)
    if method.sharpness == "sam":
        opt: SAM = SAM(params, base, bins=bins, update_weighting=method.update_weighting,
                       **{**common, **method.optimizer_options})
    elif method.sharpness == "bsam":
        same = method.update_weighting == method.perturbation_weighting
        opt = BalancedSAM(params, base, bins, scheme=method.perturbation_weighting,
                          update_weighting="same" if same else method.update_weighting,
                          **{**common, **method.optimizer_options})
    else:
        opt = ImbSAM(params, base, bins, update_weighting=method.update_weighting,
                     **{"eta": cfg.eta, **common, **method.optimizer_options})

    def sam_step(loss_fn: Callable[[], torch.Tensor], targets: torch.Tensor,
                 mask: torch.Tensor | None = None, scaler: Any = None,
                 first_pass_context: Any = None) -> torch.Tensor:
        return opt.step(loss_fn, targets, mask=mask, scaler=scaler,
                        first_pass_context=first_pass_context)

    return opt, sam_step


def _plain_stepper(opt: Optimizer, method: Method, bins: LabelBins, normalize: str,
                   wkw: dict[str, Any], max_grad_norm: float | None = None
                   ) -> tuple[Optimizer, StepFn]:
    """One forward/backward per step with the update weighting (no perturbation); the gradient
    clipped to ``max_grad_norm`` (``torch.nn.utils.clip_grad_norm_``), a non-finite one
    skipped and counted in ``opt.skipped_steps``."""
    scheme = method.update_weighting
    if scheme is not None:  # validate now, not at the first step
        bins.weights(scheme, normalize, **wkw)
    opt.skipped_steps = 0  # type: ignore[attr-defined]
    params = [p for g in opt.param_groups for p in g["params"]]

    def step(loss_fn: Callable[[], torch.Tensor], targets: torch.Tensor,
             mask: torch.Tensor | None = None, scaler: Any = None,
             first_pass_context: Any = None) -> torch.Tensor:
        w = None if scheme is None else bins.sample_weights(targets, scheme, normalize, **wkw)
        opt.zero_grad(set_to_none=True)
        loss = weighted_mean(SAM._check_losses(loss_fn(), targets), w, mask)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        if _finite_clipped(params, max_grad_norm):
            scaler.step(opt) if scaler is not None else opt.step()
        else:  # the parameters and the optimizer's state stay as they were
            opt.skipped_steps += 1  # type: ignore[attr-defined]
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.step(opt)  # finds the inf itself and skips; update() lowers the scale
        return loss.detach()

    return opt, step


def _finite_clipped(params: list[torch.Tensor], max_grad_norm: float | None) -> bool:
    """Whether the gradients are finite (one host sync); clipped to ``max_grad_norm`` if so."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    if max_grad_norm is None:
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return math.isfinite(float(norm))
