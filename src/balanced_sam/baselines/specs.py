"""The catalogue of the baseline plug-ins: each plug-in's kind, description, paper rows and
hyper-parameters (:data:`PLUGINS`), and the checks of a method's plug-ins and of a run's
``train.plugins`` options.

It stands apart from :mod:`balanced_sam.baselines.plugins` (what the training loop runs) so
that :mod:`balanced_sam.methods`, which parses method names against it, and the loop's
plug-in, which follows a :class:`~balanced_sam.methods.Method`, import in one direction only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from balanced_sam.baselines.losses import FOCAL_ACTIVATIONS
from balanced_sam.baselines.regularizers import PUSHING
from balanced_sam.errors import ConfigError, spell

__all__ = ["PluginSpec", "PLUGINS", "PLUGIN_KINDS", "RNC_STAGES", "check_options",
           "plugin_options", "check_combination"]

PLUGIN_KINDS = ("loss", "regularizer", "calibration", "recipe")
RNC_STAGES = ("both", "pretrain", "head")


@dataclass(frozen=True)
class PluginSpec:
    """One plug-in: its kind, a line for ``bsam list``, the paper's rows it serves, its
    hyper-parameters (defaults) and where those come from. ``balances``: the plug-in balances
    the labels by itself (Balanced MSE), so a sharpness-aware optimizer added to it keeps the
    update unweighted unless a weighting is named."""

    name: str
    kind: str
    description: str
    paper: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    balances: bool = False
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)


PLUGINS: dict[str, PluginSpec] = {s.name: s for s in (
    PluginSpec("focal-l1", "loss", "focal-R: the L1 error times (2 sigmoid(beta |e|) - 1)^gamma",
               "no row (Yang et al., ICML 2021)",
               {"beta": 0.2, "gamma": 1.0, "activation": "sigmoid"},
               "the DIR code's weighted_focal_l1_loss defaults",
               choices={"activation": FOCAL_ACTIVATIONS}),
    PluginSpec("bni", "loss", "Balanced MSE, bin-based numerical integration (label prior = "
               "the training histogram)", "Table 3 (Balanced MSE (BNI) *)",
               {"init_noise_sigma": None, "learn_noise": False, "noise_lr": 1e-2,
                "bin_value": "center"},
               "the Balanced MSE code: sigma learned with its own lr 1e-2 (not scheduled) under "
               "Adam, or fixed (its NYUD2 command); sigma starts at 1 label unit there (a year, a "
               "metre), here at one bin width unless given (label units). Fixed by default: "
               "learned under SGD it ran away (see the notes)",
               balances=True, choices={"bin_value": ("center", "lower")}),
    PluginSpec("gai", "loss", "Balanced MSE, Gaussian-mixture form (label prior = a GMM fitted "
               "to the training histogram)", "no row (Ren et al., CVPR 2022)",
               {"n_components": 8, "init_noise_sigma": None, "learn_noise": False,
                "noise_lr": 1e-2, "bin_value": "center"},
               "the Balanced MSE code: 8 components (IMDB-WIKI), its lr 1e-2; sigma as bni",
               balances=True, choices={"bin_value": ("center", "lower")}),
    PluginSpec("ranksim", "regularizer", "RankSim: feature-similarity ranks follow label "
               "ranks", "Tables 1-2 (RankSim *, run with SQINV: ranksim+sqinv)",
               {"gamma": 100.0, "lambda_val": 2.0, "unique_labels": True},
               "the RankSim README's commands (gamma 100, lambda 2)"),
    PluginSpec("conr", "regularizer", "ConR: contrastive regulariser, label-window positives, "
               "confused negatives pushed by label distance", "Tables 1-3 (ConR + LDS *, ConR + "
               "FDS *)",
               {"beta": 4.0, "omega": None, "tau": 0.07, "e": None, "pushing": "exp",
                "weight_anchors": False},
               "the ConR AgeDB code (beta 4, w 1 year, tau 0.07, e 0.01, exp pushing); omega "
               "and e default to one bin width and 0.01 per bin width",
               choices={"pushing": PUSHING}),
    PluginSpec("ordinal-entropy", "regularizer", "Ordinal Entropy: spread feature centres "
               "by label distance, tighten each group", "Tables 1-2 (Ordinal Entropy)",
               {"lambda_d": 1.0, "lambda_t": 1.0, "group": "bin"},
               "the Ordinal Entropy age code (both terms unweighted); groups = label bins",
               choices={"group": ("bin", "label")}),
    PluginSpec("fds", "calibration", "feature distribution smoothing: per-bin feature "
               "statistics, smoothed over bins, calibrate the features", "Tables 1-3 (FDS *)",
               {"kernel": "gaussian", "ks": 5, "sigma": 2.0, "momentum": 0.9, "start_update": 0,
                "start_smooth": 1, "clip": [0.1, 10.0]},
               "the DIR README's reported FDS runs (gaussian, 5, 2; momentum 0.9; start 0 / 1)"),
    PluginSpec("rnc", "recipe", "Rank-N-Contrast: contrastive pre-training of the encoder, "
               "then a linear head on the frozen encoder", "Tables 1-2 (RnC)",
               {"temperature": 2.0, "pretrain_epochs": None, "pretrain_lr": None,
                "pretrain_weight_decay": None, "pretrain_batch_size": None,
                "pretrain_lr_min_factor": None, "head_lr": None, "head_weight_decay": None,
                "stage": "both"},
               "the RnC code (temperature 2); pretrain_* / head_* null = the train section's "
               "value (the train section describes the head stage unless head_* is given)",
               choices={"stage": RNC_STAGES}),
)}


# ---------------------------------------------------------------------------- options
def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _type_ok(value: Any, default: Any) -> bool:
    """``value`` has the type of ``default`` (an integer counts as a number; ``None`` as a
    default means "a number or null")."""
    if default is None:
        return value is None or _number(value)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return _number(value)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return (isinstance(value, (list, tuple)) and len(value) == len(default)
                and all(_number(v) for v in value))
    return True


def check_options(options: Any, section: str = "train.plugins") -> None:
    """Check a ``train.plugins`` mapping: plug-in names, their keys, types and choices. Options
    of a plug-in the run's method does not use are allowed (one config can serve a bench of
    several methods) and ignored."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"{section} must be a mapping of plug-in name to its options, got "
                          f"{options!r}")
    try:
        _check_each(options, section)
    except ConfigError as exc:
        hint = spell("plugins")  # the command's own spelling, when it has one
        raise ConfigError(str(exc) if hint.startswith("plugins=") else
                          f"{exc} (set with {hint})") from None


def _check_each(options: Mapping[str, Any], section: str) -> None:
    for name, opts in options.items():
        if name not in PLUGINS:
            raise ConfigError(f"{section}.{name} is not a baseline plug-in; known: "
                              f"{', '.join(PLUGINS)}")
        if opts is None:
            continue
        if not isinstance(opts, Mapping):
            raise ConfigError(f"{section}.{name} must be a mapping of options, got {opts!r}")
        spec = PLUGINS[name]
        for key, value in opts.items():
            where = f"{section}.{name}.{key}"
            if key not in spec.defaults:
                raise ConfigError(f"{where} is not an option of {name}; it takes: "
                                  f"{', '.join(spec.defaults)}")
            default = spec.defaults[key]
            if not _type_ok(value, default):
                kind = "a number" if default is None or isinstance(default, float) else (
                    type(default).__name__)
                raise ConfigError(f"{where}: expected {kind}"
                                  f"{' or null' if default is None else ''}, got {value!r}")
            allowed = spec.choices.get(key)
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{where} = {value!r}: must be one of {', '.join(allowed)}")


def plugin_options(name: str, cfg_options: Mapping[str, Any] | None,
                   method_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A plug-in's options: its defaults, changed by the run's ``train.plugins.NAME`` and
    then by what the method itself fixes (e.g. ``bni+lds`` smooths the prior)."""
    out = dict(PLUGINS[name].defaults)
    out.update((cfg_options or {}).get(name) or {})
    out.update((method_options or {}).get(name) or {})
    return out


def check_combination(plugins: tuple[str, ...], where: str) -> None:
    """One loss, one calibration, and ``rnc`` alone (its second stage trains only a linear
    head on a frozen encoder, where a feature regulariser or FDS would do nothing)."""
    unknown = [p for p in plugins if p not in PLUGINS]
    if unknown:
        raise ValueError(f"{where}: unknown plug-in(s) {unknown}; known: {', '.join(PLUGINS)}")
    if len(set(plugins)) != len(plugins):
        raise ValueError(f"{where}: a plug-in is named twice in {'+'.join(plugins)}")
    kinds = [PLUGINS[p].kind for p in plugins]
    for kind in ("loss", "calibration"):
        if kinds.count(kind) > 1:
            names = [p for p in plugins if PLUGINS[p].kind == kind]
            raise ValueError(f"{where}: at most one {kind} plug-in, got {' and '.join(names)}")
    if "rnc" in plugins and len(plugins) > 1:
        raise ValueError(f"{where}: rnc is a two-stage recipe and combines with no other "
                         "plug-in (only with a weighting and an optimizer, e.g. rnc+sqinv+bsam)")
