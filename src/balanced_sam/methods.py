"""Methods: which sharpness-aware step and which two weightings, by the names used everywhere.

A *method* is what a row of the paper's tables names: ``vanilla`` (plain L1), ``sqinv`` (SQINV
re-weighted L1), ``sam`` (SAM perturbation, SQINV update), ``bsam`` (SQINV-BSAM, the paper's
method), and so on. Each is a :class:`Method` in :data:`METHODS`, described by three words of one
vocabulary (the optimizers use the same two weighting names):

* ``sharpness``: ``"none"`` (the base optimizer alone), ``"sam"``, ``"bsam"``, ``"imbsam"``
  or ``"ccsam"``;
* ``perturbation_weighting``: the per-sample weights of the loss whose gradient sets the
  perturbation (BSAM's contribution; ``None``: unweighted);
* ``update_weighting``: the per-sample weights of the loss whose gradient updates the weights
  (``None``: unweighted).

The baselines of issue 11 are *plug-ins* (:mod:`balanced_sam.baselines.plugins`: losses,
feature regularisers, FDS, RnC's two stages) that a method names in ``plugins``; any plug-in
composes with a weighting and an optimizer by name, ``PLUGIN[+PLUGIN...][+WEIGHTING][+OPTIMIZER]``
(``ranksim+bsam``, ``conr+lds``, ``fds+sqinv+imbsam``), built on demand by :func:`get_method`
(:func:`parse_method` says what each part means); ``bsam list`` shows the parts.

A method plugs in with one :func:`register_method` call. :func:`build_stepper` turns a method
into an optimizer and a step function with one signature for all of them::

    opt, step = build_stepper(METHODS["bsam"], model.parameters(), bins, cfg)
    loss = step(loss_fn, targets)          # loss_fn() -> per-sample losses [, regulariser]

Unweighted is ``None`` everywhere in the library; the composed names' ``vanilla`` part is parsed
into it (:data:`WEIGHTING_PARTS`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from balanced_sam.baselines.specs import PLUGINS, check_combination
from balanced_sam.bins import SCHEMES, LabelBins
from balanced_sam.optim import CCSAM, SAM, BalancedSAM, ImbSAM, PassWeighting, plain_step
from balanced_sam.optim.reuse import DEFAULT_ALPHA, GradientReuse

__all__ = ["Method", "METHODS", "SHARPNESS", "register_method", "get_method", "base_method",
           "build_stepper", "build_base_optimizer", "DEFAULT_METHODS", "StepFn", "parse_method",
           "rho_for", "describe_methods", "BASELINE_METHODS", "WEIGHTING_PARTS",
           "OPTIMIZER_PARTS", "GRAMMAR", "WEIGHTINGS"]

StepFn = Callable[..., torch.Tensor]

#: the sharpness-aware steps a method can take ("none": the base optimizer's plain step)
SHARPNESS = ("none", "sam", "bsam", "imbsam", "ccsam")
#: the weighting schemes a method names; unweighted is ``None`` (never the string "none",
#: which :class:`LabelBins` also accepts)
WEIGHTINGS = tuple(s for s in SCHEMES if s != "none")


@dataclass(frozen=True)
class Method:
    """A training method.

    Attributes:
        name: the name used in the CLI, configs and results.
        sharpness: ``"none"`` (the base optimizer's plain step), ``"sam"``, ``"bsam"``,
            ``"imbsam"`` or ``"ccsam"``.
        update_weighting: the weighting of the update loss (``None``: unweighted; else one of
            :data:`WEIGHTINGS`).
        perturbation_weighting: the weighting of the perturbation loss, for ``"bsam"`` only
            (default there ``"sqrt_inv"``).
        loss: per-sample loss name (``balanced_sam.losses``); ``None``: the config's loss.
        description: one line for ``bsam list`` and the tables.
        paper: where the paper uses it.
        optimizer_options: keyword arguments for the optimizer that override the config's
            (e.g. ``{"eta": 10}`` for an ImbSAM variant).
        plugins: the baseline plug-ins the training loop runs with this method (see
            :mod:`balanced_sam.baselines.plugins`): ``("ranksim",)``, ``("conr", "fds")``...
        plugin_options: options the method fixes for its plug-ins, over the config's
            ``train.plugins`` (``bni+lds``: ``{"bni": {"lds": True}}``, the smoothed prior).
    """

    name: str
    sharpness: str = "none"
    update_weighting: str | None = None
    perturbation_weighting: str | None = None
    loss: str | None = None
    description: str = ""
    paper: str = ""
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = field(default=(), kw_only=True)
    plugin_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, kw_only=True)

    def __post_init__(self) -> None:
        name = self.name
        object.__setattr__(self, "optimizer_options", dict(self.optimizer_options or {}))
        object.__setattr__(self, "plugins", tuple(self.plugins))
        object.__setattr__(self, "plugin_options",
                           {k: dict(v) for k, v in (self.plugin_options or {}).items()})
        check_combination(self.plugins, f"method {name!r}")
        if self.sharpness not in SHARPNESS:
            raise ValueError(f"method {name!r}: sharpness must be one of {SHARPNESS}, got "
                             f"{self.sharpness!r}")
        for key in ("update_weighting", "perturbation_weighting"):
            value = getattr(self, key)
            if value not in (None, *WEIGHTINGS):
                raise ValueError(f"method {name!r}: {key} must be None (unweighted) or one of "
                                 f"{WEIGHTINGS}, got {value!r}")
        if self.sharpness == "bsam" and self.perturbation_weighting is None:
            # BSAM's defining choice (the paper's)
            object.__setattr__(self, "perturbation_weighting", "sqrt_inv")
        if self.perturbation_weighting is not None and self.sharpness != "bsam":
            raise ValueError(f"method {name!r}: perturbation_weighting needs sharpness 'bsam' "
                             f"(SAM and ImbSAM perturb with the unweighted loss)")

    @property
    def uses_rho(self) -> bool:
        return self.sharpness != "none"


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
    Method("ccsam", "ccsam", "sqrt_inv",
           description="CC-SAM (a perturbation per region, radius ~ n^-1/4), SQINV update",
           paper="no row (Zhou et al., CVPR 2023; the paper's discussion)"),
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


# ---------------------------------------------------------------------------- composed methods
#: the weighting part of a composed name -> the weighting scheme (``vanilla``: unweighted)
WEIGHTING_PARTS: dict[str, str | None] = {"vanilla": None, "sqinv": "sqrt_inv", "inv": "inv",
                                          "lds": "lds"}
#: the optimizer part of a composed name (the sharpness-aware step)
OPTIMIZER_PARTS = ("sam", "bsam", "imbsam", "ccsam")
GRAMMAR = "PLUGIN[+PLUGIN...][+WEIGHTING][+OPTIMIZER]"
#: ``NAME-iK``: a SAM-family method with a fresh perturbation every K steps (issue 13)
_INTERVAL = re.compile(r"^(?P<base>.+)-i(?P<k>[0-9]+)$")
#: ``NAME-lK``: a SAM-family method with LookSAM's gradient reuse, a full step every K steps
#: (issue 21; strength ``train.reuse_alpha``)
_REUSE = re.compile(r"^(?P<base>.+)-l(?P<k>[0-9]+)$")
#: the suffixes of the derived methods: regex, optimizer option, what the suffix does
_SUFFIXES = ((_INTERVAL, "interval", "-iK", "a fresh perturbation every {k} steps"),
             (_REUSE, "reuse", "-lK", "gradient reuse (LookSAM), a full step every {k} steps"))
_DERIVED: dict[str, Method] = {}  # composed and interval methods, built once


def _parts_of(name: str) -> tuple[list[str], str | None, str | None]:
    """Split a composed name into plug-ins, weighting part and optimizer part (in that order)."""
    plugins: list[str] = []
    weighting: str | None = None
    optimizer: str | None = None
    for part in name.split("+"):
        if part in PLUGINS and weighting is None and optimizer is None:
            plugins.append(part)
        elif part in WEIGHTING_PARTS and weighting is None and optimizer is None and plugins:
            weighting = part
        elif part in OPTIMIZER_PARTS and optimizer is None and plugins:
            optimizer = part
        else:
            known = part in PLUGINS or part in WEIGHTING_PARTS or part in OPTIMIZER_PARTS
            why = (f"{part!r} is out of place (the order is {GRAMMAR}, each part once)" if known
                   else f"unknown part {part!r}")
            raise ValueError(
                f"method {name!r}: {why}; a composed method is {GRAMMAR} with plug-ins "
                f"{', '.join(PLUGINS)}; weightings {', '.join(WEIGHTING_PARTS)}; optimizers "
                f"{', '.join(OPTIMIZER_PARTS)}; or one of the registered methods "
                f"{', '.join(METHODS)}")
    return plugins, weighting, optimizer


def parse_method(name: str, description: str = "", paper: str = "") -> Method:
    """The :class:`Method` a composed name describes (``bsam list`` shows the parts):

    * ``PLUGIN[+PLUGIN...]``: the baseline plug-ins (at most one loss and one calibration;
      ``rnc`` alone), on the config's loss (L1) unless a loss plug-in replaces it;
    * ``+WEIGHTING`` (``vanilla``, ``sqinv``, ``inv``, ``lds``): the per-sample weights of the
      update loss. Without it the update is unweighted, the plug-in on the plain loss of its
      own publication; with an optimizer part it is SQINV, as in the paper's SAM, ImbSAM and
      BSAM rows, except for Balanced MSE (``bni``, ``gai``), which balances by itself.
      For ``bni``/``gai``, ``+lds`` smooths the loss's label prior instead (the Balanced MSE
      code's "+ LDS") and weights no sample;
    * ``+OPTIMIZER`` (``sam``, ``bsam``, ``imbsam``, ``ccsam``): the sharpness-aware step; ``bsam``
      perturbs with the named weighting, SQINV when none is named (BSAM's defining choice).

    So ``ranksim`` is plain L1 + RankSim; ``ranksim+sqinv`` is the RankSim paper's SQINV +
    RankSim; ``ranksim+bsam`` is the BSAM paper's method (SQINV-weighted perturbation and
    update) with the RankSim regulariser added in both passes.
    """
    plugins, weighting, optimizer = _parts_of(name)
    balances = any(PLUGINS[p].balances for p in plugins)
    options: dict[str, dict[str, Any]] = {}
    if weighting == "lds" and balances:
        options = {p: {"lds": True} for p in plugins if PLUGINS[p].balances}
        update = None
    elif weighting is not None:
        update = WEIGHTING_PARTS[weighting]
    else:
        update = "sqrt_inv" if optimizer is not None and not balances else None
    perturbation = None
    if optimizer == "bsam":
        perturbation = (WEIGHTING_PARTS[weighting] if weighting not in (None, "vanilla")
                        else "sqrt_inv")
    kinds = ", ".join(f"{p} ({PLUGINS[p].kind})" for p in plugins)
    return Method(name, optimizer or "none", update, perturbation,
                  description=description or _composed_text(kinds, update, optimizer),
                  paper=paper, plugins=plugins, plugin_options=options)


def _composed_text(kinds: str, update: str | None, optimizer: str | None) -> str:
    step = {"sam": "SAM", "bsam": "BSAM", "imbsam": "ImbSAM", "ccsam": "CC-SAM",
            None: "plain step"}[optimizer]
    return f"{kinds}; update weighting {update or 'none'}; {step}"


def base_method(name: str) -> str:
    """The registered method a name derives from (``bsam-i5`` -> ``bsam``), else the name: a
    recipe's rho for ``bsam`` is also ``bsam-i5``'s (:func:`rho_for` also covers composed
    names)."""
    for regex, *_ in _SUFFIXES:
        m = _suffix_match(regex, str(name))
        if name not in METHODS and m and m["base"] in METHODS:
            return str(m["base"])
    return name


def _suffix_match(regex: re.Pattern[str], name: str) -> re.Match[str] | None:
    """``regex``'s match of a derived name, unless the name ends in a plug-in (``focal-l1``
    reads as a plug-in, not as ``focal`` with ``-l1``)."""
    if name.split("+")[-1] in PLUGINS:
        return None
    return regex.match(name)


def get_method(name: str) -> Method:
    """A registered method, or one derived from a name, built on demand (once):

    * ``NAME-iK`` (e.g. ``bsam-i5``, ``ranksim+bsam-i5``): the SAM-family method ``NAME``
      computing a fresh perturbation only every ``K`` steps and reusing it in between (the
      optimizers' ``interval=K``; it wins over ``train.interval``);
    * ``NAME-lK`` (e.g. ``bsam-l5``, ``ranksim+bsam-l5``): ``NAME`` with LookSAM's gradient
      reuse, a full two-pass step every ``K`` steps and one pass in between (the optimizers'
      ``interval=GradientReuse(K, train.reuse_alpha)``, :mod:`balanced_sam.optim.reuse`; it
      wins over ``train.interval``);
    * a composed name ``PLUGIN[+PLUGIN...][+WEIGHTING][+OPTIMIZER]`` (:func:`parse_method`).
    """
    if name in METHODS:
        return METHODS[name]
    if not isinstance(name, str) or not name:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    if name not in _DERIVED:
        _DERIVED[name] = _derived(name)
    return _DERIVED[name]


def _composed(name: str) -> bool:
    return "+" in name or name in PLUGINS


def _derived(name: str) -> Method:
    for regex, option, suffix, text in _SUFFIXES:
        m = _suffix_match(regex, name)
        if not (m and (m["base"] in METHODS or _composed(m["base"]))):
            continue
        base, k = get_method(m["base"]), int(m["k"])
        if not base.uses_rho:
            raise ValueError(f"method {name!r}: the {suffix} suffix ({text.format(k='K')}) "
                             f"needs a SAM-family method, and {base.name!r} takes no "
                             "perturbation")
        if k < 1:
            raise ValueError(f"method {name!r}: K in {suffix} must be >= 1")
        if base.sharpness == "ccsam":
            raise ValueError(f"method {name!r}: CC-SAM takes no -iK / -lK variant (a stored "
                             f"perturbation per group is not supported); use {base.name!r}, "
                             "or a variant of sam/bsam/imbsam")
        if {"interval", "reuse"} & set(base.optimizer_options):
            raise ValueError(f"method {name!r}: {base.name!r} already sets its interval; give "
                             "one of -iK and -lK")
        return Method(name, base.sharpness, base.update_weighting, base.perturbation_weighting,
                      base.loss, f"{base.description}; {text.format(k=k)}",
                      base.paper, {**base.optimizer_options, option: k},
                      plugins=base.plugins, plugin_options=base.plugin_options)
    if _composed(name):
        return parse_method(name)
    raise ValueError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}; compose "
                     f"{GRAMMAR} (bsam list shows the parts); or add -iK to a SAM-family "
                     "name (e.g. bsam-i5) to perturb every K steps, or -lK (e.g. bsam-l5) "
                     "for LookSAM's gradient reuse")


def rho_for(name: str, table: Mapping[str, float]) -> float | None:
    """A method's rho from a recipe's ``rho_by_method``: its own entry; for a composed method,
    that of the registered plain method with the same step and weightings (``ranksim+bsam``
    takes ``bsam``'s), else of its optimizer part; ``None`` when there is none."""
    if name in table:
        return table[name]
    m = get_method(name)
    if not m.uses_rho:
        return None
    key = (m.sharpness, m.update_weighting, m.perturbation_weighting)
    for other in METHODS.values():
        if not other.plugins and other.name in table and (
                other.sharpness, other.update_weighting, other.perturbation_weighting) == key:
            return table[other.name]
    return table.get(m.sharpness)


def describe_methods() -> str:
    """What ``bsam list`` prints about methods: the registered ones, the composition grammar
    and its building blocks."""
    lines = ["methods (registered):"]
    lines += [f"  {m.name:<16} {m.description}  [{m.paper}]" for m in METHODS.values()]
    lines += ["", f"composed methods ({GRAMMAR}; e.g. ranksim+bsam, conr+lds+sam, "
              "focal-l1+sqinv):", "  plug-ins:"]
    lines += [f"    {s.name:<16} {s.kind:<12} {s.description}" for s in PLUGINS.values()]
    lines += ["  weightings: vanilla (none), sqinv (1/sqrt(N_k)), inv (1/N_k, clipped), lds "
              "(1 / LDS-smoothed sqrt(N_k), the DIR code's; for bni/gai: the smoothed label prior)",
              "  optimizers: sam (SAM perturbation), bsam (weighted perturbation), imbsam "
              "(SAM on the tail), ccsam (a perturbation per region: 2 passes per region in the "
              "batch);",
              "              NAME-iK (e.g. bsam-i5, ranksim+bsam-i5) perturbs every K steps;",
              "              NAME-lK (e.g. bsam-l5) reuses LookSAM's direction between full "
              f"steps every K (strength train.reuse_alpha, default {DEFAULT_ALPHA}; not ccsam)",
              "  defaults: no weighting part = unweighted update, SQINV with an optimizer part "
              "(bni/gai: unweighted); bsam perturbs with the named weighting, else SQINV;",
              "            options per plug-in: train.plugins.NAME.KEY in a config"]
    return "\n".join(lines)


# the baselines of issue 11, on their own (plain L1 unless they bring their loss) and the
# paper's combinations; any other combination is composed on demand (get_method)
_BASELINE_ROWS = (
    ("fds", "FDS on plain L1 (DIR)", "Tables 1-3 (FDS *)"),
    ("ranksim", "RankSim on plain L1", "Tables 1-2 (RankSim *: SQINV + RankSim, ranksim+sqinv)"),
    ("conr", "ConR on plain L1 (contrastive, label-window positives)",
     "Tables 1-3 only combined (conr+lds, conr+fds)"),
    ("rnc", "Rank-N-Contrast: contrastive pre-training, then a linear L1 head",
     "Tables 1-2 (RnC)"),
    ("ordinal-entropy", "Ordinal Entropy on plain L1", "Tables 1-2 (Ordinal Entropy)"),
    ("bni", "Balanced MSE, bin-based numerical integration", "Table 3 (Balanced MSE (BNI) *)"),
    ("gai", "Balanced MSE, Gaussian-mixture prior", "no row (Ren et al., CVPR 2022)"),
    ("focal-l1", "focal-R on the L1 error", "no row (Yang et al., ICML 2021)"),
    ("conr+lds", "ConR + LDS-weighted L1 (ConR's density weights: the LDS weights)",
     "Tables 1-3 (ConR + LDS *)"),
    ("conr+fds", "ConR + FDS on plain L1", "Tables 1-3 (ConR + FDS *)"),
    ("bni+lds", "BNI with the LDS-smoothed label prior", "Table 3 (Balanced MSE (BNI) + LDS *)"),
)
for _name, _text, _paper in _BASELINE_ROWS:
    register_method(parse_method(_name, _text, _paper))

#: the baselines of issue 11 (plug-ins alone and the paper's combinations)
BASELINE_METHODS = tuple(n for n, _, _ in _BASELINE_ROWS)



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
    :class:`balanced_sam.train.TrainConfig` has (``interval``, ``reuse_alpha`` and
    ``max_grad_norm`` too, when present); ``method.optimizer_options`` override them (a
    ``-lK`` method's ``reuse: K`` becomes ``interval=GradientReuse(K, cfg.reuse_alpha)``).
    The loop's policy (``model``, ``cfg.bn_second_pass``, ``cfg.max_grad_norm``) goes to
    every call of the step, not to the optimizer: :func:`~balanced_sam.optim.sharpness_step`
    for the SAM family, :func:`~balanced_sam.optim.plain_step` (the same finite check and
    clip) for the others.

    Every optimizer returned counts the steps it skipped because a gradient was not finite in
    ``opt.skipped_steps`` (the SAM family's own counter; the plain step keeps one likewise):
    such a step leaves the parameters and the optimizer's state untouched.
    """
    base = build_base_optimizer(cfg.optimizer)
    kw = _base_kwargs(cfg)
    uses_lds = "lds" in (method.update_weighting, method.perturbation_weighting)
    weights: dict[str, Any] = dict(normalize=cfg.normalize,
                                   weight_kwargs=dict(cfg.lds) if uses_lds else {})
    clip = getattr(cfg, "max_grad_norm", None)
    if method.sharpness == "none":
        plain = base(params, **kw, **method.optimizer_options)
        plain.skipped_steps = 0  # type: ignore[attr-defined]
        weighting = PassWeighting(bins, None, method.update_weighting, **weights)

        def plain_stepper(loss_fn: Callable[[], torch.Tensor], targets: torch.Tensor,
                          mask: torch.Tensor | None = None, scaler: Any = None,
                          first_pass_context: Any = None) -> torch.Tensor:
            return plain_step(plain, loss_fn, targets, weighting=weighting, mask=mask,
                              scaler=scaler, max_grad_norm=clip)

        return plain, plain_stepper
    if cfg.bn_second_pass == "freeze" and model is None:
        raise ValueError("bn_second_pass='freeze' needs the model: pass model=...")
    common: dict[str, Any] = dict(rho=cfg.rho, p=cfg.p, interval=getattr(cfg, "interval", 1),
                                  **kw)
    options = dict(method.optimizer_options)
    if "reuse" in options:  # NAME-lK: LookSAM's gradient reuse
        options["interval"] = GradientReuse(int(options.pop("reuse")),
                                            getattr(cfg, "reuse_alpha", DEFAULT_ALPHA))
    if method.sharpness == "sam":
        opt: SAM = SAM(params, base, weighting=PassWeighting(bins, None, method.update_weighting,
                                                             **weights),
                       **{**common, **options})
    elif method.sharpness == "bsam":
        same = method.update_weighting == method.perturbation_weighting
        opt = BalancedSAM(params, base, bins, scheme=method.perturbation_weighting,
                          update_weighting="same" if same else method.update_weighting,
                          **{**common, **weights, **options})
    elif method.sharpness == "imbsam":
        opt = ImbSAM(params, base, bins, update_weighting=method.update_weighting,
                     **{"eta": cfg.eta, **common, **weights, **options})
    else:
        opt = CCSAM(params, base, bins, update_weighting=method.update_weighting,
                    **{**common, **weights, **options})

    def sam_step(loss_fn: Callable[[], torch.Tensor], targets: torch.Tensor,
                 mask: torch.Tensor | None = None, scaler: Any = None,
                 first_pass_context: Any = None) -> torch.Tensor:
        return opt.step(loss_fn, targets, mask=mask, scaler=scaler,
                        first_pass_context=first_pass_context, model=model,
                        bn_second_pass=cfg.bn_second_pass, max_grad_norm=clip)

    return opt, sam_step
