"""The training configuration: every knob of a run, typed and validated.

:class:`TrainConfig` is the ``train`` section of a config file. :meth:`TrainConfig.validate`
checks every value's type against the field's annotation, then its range, and names the key
(``train.lr: expected a number, got 'abc' (str)``); :meth:`TrainConfig.from_dict` also refuses
unknown keys and suggests the closest one.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from balanced_sam.baselines.specs import check_options as check_plugin_options
from balanced_sam.bins import KERNELS
from balanced_sam.errors import ConfigError
from balanced_sam.losses import get_loss
from balanced_sam.methods import get_method
from balanced_sam.optim.reuse import DEFAULT_ALPHA

__all__ = ["TrainConfig", "SAFE_TO_CHANGE", "SCHEDULES", "DEVICES"]

SCHEDULES = ("cosine", "cosine_ref", "step", "none")
#: the keys of ``train.lds`` (:meth:`balanced_sam.bins.LabelBins.weights`'s LDS options)
LDS_KEYS = ("kernel", "ks", "sigma", "lds_base", "clip")
#: settings a resumed run may change: they decide where and how fast it runs, not what it learns
#: (``epochs`` may change too: the schedule is re-planned, see :meth:`LRPlan.extended`)
SAFE_TO_CHANGE = frozenset({"device", "num_workers", "progress", "eval_batch_size",
                            "prefetch_factor", "checkpoint", "channels_last", "compile"})
DEVICES = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps(:\d+)?)$")


@dataclass
class TrainConfig:
    """Everything that decides a training run. ``bsam train`` reads it from YAML (section
    ``train``) and ``key=value`` overrides; every field is validated by :meth:`validate`.

    ``schedule``: ``cosine`` (per epoch ``e = 0..E-1``: ``lr_min + (lr - lr_min) (1 + cos(pi e /
    E)) / 2``, with ``lr_min = lr * lr_min_factor``), ``cosine_ref`` (the reference code's
    per-epoch cosine: epochs ``1..E``, so the first epoch is already below ``lr`` and the last one
    runs exactly at ``lr_min``), ``step`` (times ``gamma`` every ``step_size`` epochs) or
    ``none``; ``warmup_epochs`` ramp up linearly first. ``many`` / ``few``: region thresholds on a
    bin's training count (``None``: those of the bins, 100 / 20 by default). ``balance``: what
    bMAE averages over, ``label``, ``bin`` or ``auto`` (decided once from the training labels,
    see :func:`balanced_sam.metrics.balance_of`). ``plugins``: options of the method's baseline
    plug-ins, ``{name: {key: value}}`` (e.g. ``{"ranksim": {"gamma": 100}}``; defaults and keys
    in :data:`balanced_sam.baselines.specs.PLUGINS`).

    ``interval``: the SAM-family optimizers compute a fresh perturbation only every ``interval``
    steps and reuse the stored one in between (one forward/backward at the old perturbation:
    ``interval=5`` costs about 1.2 plain steps instead of 2; a method's own ``interval``, as in
    ``bsam-i5``, wins over this). ``reuse_alpha``: the strength of LookSAM's reused direction
    for the ``NAME-lK`` methods (``bsam-l5``; default ``auto``, the strength the last full step
    measured; 0.7 is LookSAM's constant, which swamped rho 0.01's correction on the default bench;
    :mod:`balanced_sam.optim.reuse`). ``max_grad_norm``: clip the update
    gradient to this global 2-norm before the base step, in every method (the SAM family clips
    the gradient at the perturbed point; the perturbation itself keeps norm ``rho``). A step
    whose gradient is not finite is skipped in every method and counted
    (``FitResult.skipped_steps``).
    ``amp``: ``none``, ``bf16``, ``fp16`` (CUDA only) or ``auto`` (bf16 on a CUDA device that
    supports it, none elsewhere); ``channels_last``: the model's memory layout, ``true``,
    ``false`` or ``auto`` (the default: both layouts timed on the run's model, batch and device
    before training, ``channels_last`` kept when 1.1x faster; :mod:`balanced_sam.layout`). A
    run records what it decided (its resolved config, its checkpoints' ``layout``).
    ``compile``: ``torch.compile`` the model for training (off by default: on the default
    bench's CPU runs the compilation cost more than it saved; ``benchmarks/cpu_loop.py``
    measures the break-even); evaluation runs the model uncompiled.
    """

    method: str = "bsam"
    loss: str = "l1"
    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | cosine_ref | step | none
    lr_min_factor: float = 1e-3  # cosine ends at lr * lr_min_factor (reference: 0.1 ** 3)
    step_size: int = 5  # step schedule: multiply by gamma every step_size epochs
    gamma: float = 0.1
    warmup_epochs: int = 0
    rho: float = 0.05
    p: float = 2.0
    interval: int = 1  # SAM family: a fresh perturbation every `interval` steps, reused between
    reuse_alpha: float | str = DEFAULT_ALPHA  # NAME-lK (LookSAM): the reused direction's strength
    max_grad_norm: float | None = None  # clip the update gradient to this 2-norm (None: never)
    normalize: str = "mean"  # weights: mean 1 over training samples, or "none" (reference)
    eta: int = 20  # ImbSAM tail threshold
    lds: dict[str, Any] = field(default_factory=lambda: {"kernel": "gaussian", "ks": 5,
                                                         "sigma": 2.0})
    bn_second_pass: str = "update"
    select_by: str = "mae"  # mae | bmae | last
    many: int | None = None
    few: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16 (CUDA only) | auto (bf16 on CUDA, else none)
    channels_last: bool | str = "auto"  # true | false | auto (measured: balanced_sam.layout)
    compile: bool = False  # torch.compile the model for training
    scope: str = "global"  # data-parallel perturbation scope: global | local
    num_workers: int = 0
    prefetch_factor: int = 2  # batches each DataLoader worker prepares ahead
    eval_batch_size: int = 1024
    progress: bool = True
    checkpoint: str = "all"  # all (last.pt every epoch + best.pt) | best | none
    balance: str = "auto"  # what bMAE averages over: label | bin | auto
    # options of the baseline plug-ins, {name: {key: value}} (balanced_sam.baselines.plugins)
    plugins: dict[str, Any] = field(default_factory=dict)

    def validate(self, section: str = "train") -> TrainConfig:
        """Check every value's type, then its range; errors name ``section.key``."""
        _check_types(self, section)
        get_method(self.method)
        get_loss(self.loss)
        check_plugin_options(self.plugins, f"{section}.plugins")
        _check_lds(self.lds, f"{section}.lds")
        for ok, key, allowed in self._ranges():
            if not ok:
                raise ConfigError(f"{section}.{key} = {getattr(self, key)!r}: {allowed}")
        return self

    def _ranges(self) -> list[tuple[bool, str, str]]:
        return [
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "must be a finite number > 0"),
            (0 <= self.momentum and math.isfinite(self.momentum), "momentum",
             "must be a finite number >= 0 (SGD's momentum; 0.9 is usual)"),
            (self.gamma > 0 and math.isfinite(self.gamma), "gamma",
             "must be a finite number > 0 (the step schedule's factor)"),
            (self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight_decay",
             "must be a finite number >= 0"),
            (self.rho >= 0 and math.isfinite(self.rho), "rho", "must be a finite number >= 0"),
            (self.p >= 1, "p", "must be >= 1 (or inf)"),
            (self.interval >= 1, "interval", "must be an integer >= 1 (1: a fresh perturbation "
             "every step)"),
            (self.reuse_alpha == "auto" or (not isinstance(self.reuse_alpha, str)
                                            and self.reuse_alpha >= 0
                                            and math.isfinite(self.reuse_alpha)), "reuse_alpha",
             "must be a finite number >= 0 or auto (the default; LookSAM's constant is 0.7)"),
            (self.max_grad_norm is None or (self.max_grad_norm > 0
                                            and math.isfinite(self.max_grad_norm)),
             "max_grad_norm", "must be a finite number > 0, or null for no clipping"),
            (self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}"),
            (0 < self.lr_min_factor <= 1, "lr_min_factor", "must be in (0, 1]"),
            (self.step_size >= 1, "step_size", "must be >= 1"),
            (self.select_by in ("mae", "bmae", "last"), "select_by", "must be mae, bmae or last"),
            (self.amp in ("none", "bf16", "fp16", "auto"), "amp",
             "must be none, bf16, fp16 or auto"),
            (self.channels_last in (True, False, "auto"), "channels_last",
             "must be true, false or auto"),
            (self.scope in ("global", "local"), "scope", "must be global or local"),
            (self.normalize in ("mean", "none"), "normalize", "must be mean or none"),
            (self.bn_second_pass in ("update", "freeze"), "bn_second_pass",
             "must be update or freeze"),
            (self.checkpoint in ("all", "best", "none"), "checkpoint",
             "must be all, best or none"),
            (self.balance in ("label", "bin", "auto"), "balance", "must be label, bin or auto"),
            (self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0"),
            (self.num_workers >= 0, "num_workers", "must be >= 0"),
            (self.prefetch_factor >= 1, "prefetch_factor", "must be >= 1"),
            (bool(DEVICES.match(self.device)), "device",
             "must be auto, cpu, cuda, cuda:N or mps (this library runs on no other device)"),
            (self.few is None or self.few >= 0, "few", "must be >= 0"),
            (self.many is None or self.many >= (self.few or 0), "many", "must be >= few"),
        ]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], section: str = "train") -> TrainConfig:
        names = [f.name for f in fields(cls)]
        if not isinstance(d, Mapping):
            raise ConfigError(f"{section}: expected a mapping of training options, got {d!r} "
                              f"({type(d).__name__})")
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"{section}.{key} is not a training option{hint} (known: "
                                  f"{', '.join(names)})")
        return cls(**{k: _coerce_number(cls, k, v) for k, v in d.items()}).validate(section)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce_number(cls: type, key: str, value: Any) -> Any:
    """YAML reads ``1e-4`` (no dot) as a string: a float field takes a string that parses as a
    number; everything else is left for :func:`_check_types` to judge."""
    want = _field_types(cls).get(key)
    if isinstance(value, str) and (want is float or float in typing.get_args(want)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_types(cfg: Any, section: str) -> None:
    """Raise :class:`ConfigError` naming the key, the expected type and the value given."""
    for f in fields(cfg):
        want = _field_types(type(cfg))[f.name]
        value = getattr(cfg, f.name)
        options = typing.get_args(want) if typing.get_origin(want) is not None else (want,)
        if typing.get_origin(want) is dict:
            options = (dict,)
        if not any(_is_a(value, t) for t in options):
            names = " or ".join(_type_name(t) for t in options)
            raise ConfigError(f"{section}.{f.name}: expected {names}, got {value!r} "
                              f"({type(value).__name__})")
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{section}.{f.name}: expected a number, got NaN")


def _check_lds(lds: Mapping[str, Any], section: str) -> None:
    """``train.lds``: known keys, and values :meth:`LabelBins.weights` accepts."""
    for key in lds:
        if key not in LDS_KEYS:
            close = difflib.get_close_matches(str(key), LDS_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r} in {section}{hint}; it takes: "
                              f"{', '.join(LDS_KEYS)}")
    kernel, ks, sigma = lds.get("kernel", "gaussian"), lds.get("ks", 5), lds.get("sigma", 2.0)
    if kernel not in KERNELS:
        raise ConfigError(f"{section}.kernel = {kernel!r}: must be one of {', '.join(KERNELS)}")
    if isinstance(ks, bool) or not isinstance(ks, int) or ks < 1 or ks % 2 == 0:
        raise ConfigError(f"{section}.ks = {ks!r}: must be an odd integer >= 1 (the window size)")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (
            sigma > 0 and math.isfinite(sigma)):
        raise ConfigError(f"{section}.sigma = {sigma!r}: must be a finite number > 0")
    if lds.get("lds_base", "sqrt_inv") not in ("sqrt_inv", "inv"):
        raise ConfigError(f"{section}.lds_base = {lds['lds_base']!r}: must be sqrt_inv or inv")


def _is_a(value: Any, t: Any) -> bool:
    if t is type(None):
        return value is None
    if t is float:  # an integer is a number too; a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is dict:
        return isinstance(value, Mapping)
    return isinstance(value, t)


def _type_name(t: Any) -> str:
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string",
            dict: "a mapping", type(None): "null"}.get(t, getattr(t, "__name__", str(t)))
