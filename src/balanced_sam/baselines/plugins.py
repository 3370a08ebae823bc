r"""The baselines as plug-ins of the training loop: what each needs from the loop, in one place.

A method (:class:`balanced_sam.methods.Method`) names its plug-ins; :class:`MethodPlugin` turns
them into the parts the loop asks for, so the loop itself knows no baseline:

==================  =============  ==============================================================
plug-in             kind           what the loop gets
==================  =============  ==============================================================
``focal-l1``        loss           the per-sample loss (focal-R on the L1 error)
``bni``, ``gai``    loss           Balanced MSE's per-sample loss; its learned noise scale
                                   :math:`\sigma` as an extra parameter group
``ranksim``,        regulariser    ``loss_fn()`` asks the model for its features and returns
``conr``,                          ``(per_sample_losses, regulariser)``: the optimizers weight the
``ordinal-entropy``                first part and add the second, unweighted, in every pass
``fds``             calibration    a forward pass with the features calibrated before the head;
                                   the statistics collected once per batch, folded in after every
                                   epoch (:meth:`MethodPlugin.end_epoch`), kept in checkpoints
``rnc``             recipe         two stages (:func:`fit_stages`): contrastive pre-training of
                                   the encoder, then a linear head on the frozen encoder
==================  =============  ==============================================================

Hyper-parameters: :data:`PLUGINS` holds each plug-in's defaults (with their source); a run
changes them in ``train.plugins.NAME.KEY`` (checked by :func:`check_options`). Both live in
:mod:`balanced_sam.baselines.specs` (which :mod:`balanced_sam.methods` reads) and are
re-exported here.

Units: the loss plug-ins work in the loop's loss units (the targets as the
:class:`~balanced_sam.data.scaling.TargetScaler` scales them: label units for images, standardised
targets for tables), so Balanced MSE's label prior is scaled the same way. The feature
regularisers and FDS see labels (and ConR's predictions) in label units, as the bins do.
Dense targets (depth maps): FDS works per pixel of the feature map (targets resized to it,
masked pixels left out of the statistics); the regularisers work per image on the flattened
feature map with the image's mean valid depth and mean prediction, as the ConR NYUD2 code does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from balanced_sam.baselines.fds import FDS
from balanced_sam.baselines.gmm import fit_gmm_1d
from balanced_sam.baselines.losses import bni_loss, focal_l1_loss, gai_loss
from balanced_sam.baselines.regularizers import ConR, OrdinalEntropy, RankSim
from balanced_sam.baselines.rnc import rnc_loss
from balanced_sam.baselines.specs import (
    PLUGIN_KINDS,
    PLUGINS,
    RNC_STAGES,
    PluginSpec,
    check_combination,
    check_options,
    plugin_options,
)
from balanced_sam.bins import LabelBins, lds_kernel, lds_smooth
from balanced_sam.losses import balanced_mse_loss, get_loss
from balanced_sam.methods import Method

__all__ = ["PluginSpec", "PLUGINS", "PLUGIN_KINDS", "check_options", "plugin_options",
           "check_combination", "MethodPlugin", "is_staged", "fit_stages", "RNC_STAGES"]


# ---------------------------------------------------------------------------- the plug-in
def _dense_to_images(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-image mean of a dense map ``(B, ...)`` over the valid pixels."""
    flat = t.reshape(t.shape[0], -1)
    if mask is None:
        return flat.mean(1)
    m = mask.reshape(mask.shape[0], -1).to(flat.dtype)
    return (flat * m).sum(1) / m.sum(1).clamp_min(1)


class MethodPlugin:
    """The method-specific parts of a run, built once from the method and the config.

    The loop asks it for: :meth:`param_groups` (what the optimizer trains), :attr:`stepper_method`
    (the method its step follows), :meth:`batch_loss` (a batch's ``loss_fn``),
    :meth:`first_pass_context` (wrapped around the perturbation pass), :meth:`end_epoch`, and
    :meth:`state_dict` / :meth:`load_state_dict` (what ``last.pt`` keeps beyond the model and
    the optimizer). A method with no plug-in gets the plain loop: ``model(x)`` and the loss.
    """

    def __init__(self, method: Method, cfg: Any, model: nn.Module, bins: LabelBins,
                 target_scaler: Any, device: torch.device, *, world: int = 1) -> None:
        self.method, self.cfg, self.model, self.bins = method, cfg, model, bins
        self.target_scaler, self.device = target_scaler, device
        where = f"method {method.name!r}"
        self.options = {p: plugin_options(p, cfg.plugins, method.plugin_options)
                        for p in method.plugins}
        self.stage = self.options["rnc"]["stage"] if "rnc" in self.options else None
        if world > 1 and ({"fds", "rnc"} & set(self.options)):
            raise ValueError(f"{where} does not support distributed training (FDS statistics "
                             "and the RnC stages are per process); run it in one process")
        needs = {"fds", "rnc", "ranksim", "conr", "ordinal-entropy"} & set(self.options)
        if needs and not all(hasattr(model, a) for a in ("forward_features", "forward_head")):
            raise ValueError(f"{where} needs the model's features: a built-in model "
                             "(forward_features / forward_head), got "
                             f"{type(model).__name__}")
        self._perturbing = False
        self.noise_sigma: nn.Parameter | None = None
        self.elem = self._loss()
        self.regularizers = self._regularizers()
        self.fds = self._fds()
        wkw = dict(cfg.lds) if method.update_weighting == "lds" else {}
        self._weights = (None if method.update_weighting is None else functools.partial(
            bins.sample_weights, scheme=method.update_weighting, normalize=cfg.normalize, **wkw))

    # ------------------------------------------------------------------ building
    def _loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The per-sample loss: a loss plug-in's, else the method's own, else the config's."""
        if self.stage == "pretrain":
            return lambda pred, y: torch.zeros_like(y)
        builders = {"focal-l1": self._focal_l1, "bni": self._bni, "gai": self._gai}
        for name, build in builders.items():
            if name in self.options:
                return build(self.options[name])
        name = self.method.loss or self.cfg.loss
        if name == "bmse":  # batch Monte-Carlo Balanced MSE: fixed sigma, one bin width
            var = (self._bin_width() / float(getattr(self.target_scaler, "std", 1.0))) ** 2
            return functools.partial(balanced_mse_loss, noise_var=var)
        return get_loss(name)

    def _focal_l1(self, o: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
        focal_l1_loss(torch.zeros(1), torch.zeros(1), o["beta"], o["gamma"], o["activation"])
        return functools.partial(focal_l1_loss, beta=o["beta"], gamma=o["gamma"],
                                 activation=o["activation"])

    def _prior_values(self, o: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The bins' values and counts (bins below ``share_weight_below`` take that bin's
        count, as the NYUD2 code); with ``lds`` the counts are smoothed (Balanced MSE + LDS)."""
        b = self.bins
        values = b.centers if o["bin_value"] == "center" else b.edges[:-1]
        counts = b.counts.to(torch.float64).clone()
        if b.share_weight_below is not None:
            counts[: b.share_weight_below] = counts[b.share_weight_below]
        if o.get("lds"):
            lds = self.cfg.lds
            window = lds_kernel(lds.get("kernel", "gaussian"), lds.get("ks", 5),
                                lds.get("sigma", 2.0))
            counts = torch.from_numpy(lds_smooth(counts.numpy(), window))
        return values.to(torch.float64), counts

    def _bin_width(self) -> float:
        return float((self.bins.edges[1:] - self.bins.edges[:-1]).mean())

    def _noise(self, o: Mapping[str, Any]) -> torch.Tensor:
        """sigma in the loss units: ``init_noise_sigma`` is in label units (default: one bin
        width), divided by the target scaler's std. With standardised targets a sigma of 1 in
        loss units would be the whole label spread, where Balanced MSE's balancing term no
        longer depends on the prediction's neighbourhood and pushes predictions off the range."""
        init = self._bin_width() if o["init_noise_sigma"] is None else o["init_noise_sigma"]
        if not init > 0:
            raise ValueError(f"train.plugins: init_noise_sigma must be > 0, got {init!r}")
        scale = float(getattr(self.target_scaler, "std", 1.0))
        sigma = torch.tensor(float(init) / scale, device=self.device)
        if o["learn_noise"]:
            if not o["noise_lr"] > 0:
                raise ValueError(f"train.plugins: noise_lr must be > 0, got {o['noise_lr']!r}")
            self.noise_sigma = nn.Parameter(sigma)
            return self.noise_sigma
        return sigma

    def _noise_var(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma^2; detached in the perturbation pass, so sigma does not enter its gradient."""
        return (sigma.detach() if self._perturbing else sigma).square()

    def _bni(self, o: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
        values, counts = self._prior_values(o)
        keep = counts > 0
        centers = self.target_scaler.scale(values[keep]).to(self.device, torch.float32)
        probs = (counts[keep] / counts.sum()).to(self.device, torch.float32)
        sigma = self._noise(o)
        return lambda pred, y: bni_loss(pred, y, self._noise_var(sigma), centers, probs)

    def _gai(self, o: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
        values, counts = self._prior_values(o)
        filled = int((counts > 0).sum())
        if o["n_components"] > filled:
            raise ValueError(f"gai fits its mixture to the training histogram: "
                             f"train.plugins.gai.n_components={o['n_components']} exceeds its "
                             f"{filled} non-empty label bins; lower it or use narrower bins")
        gmm = fit_gmm_1d(values.numpy(), o["n_components"], counts=counts.numpy())
        std = float(getattr(self.target_scaler, "std", 1.0))
        w = torch.as_tensor(gmm.weights, dtype=torch.float32, device=self.device)
        mu = self.target_scaler.scale(torch.as_tensor(gmm.means)).to(self.device, torch.float32)
        var = torch.as_tensor(gmm.variances / std**2, dtype=torch.float32, device=self.device)
        sigma = self._noise(o)
        return lambda pred, y: gai_loss(pred, y, self._noise_var(sigma), w, mu, var)

    def _regularizers(self) -> list[Callable[..., torch.Tensor]]:
        out: list[Callable[..., torch.Tensor]] = []
        width = self._bin_width()
        if "ranksim" in self.options:
            o = self.options["ranksim"]
            rs = RankSim(o["gamma"], o["lambda_val"], o["unique_labels"])
            out.append(lambda f, y, p, w, g: rs(f, y, generator=g))
        if "conr" in self.options:
            o = self.options["conr"]
            conr = ConR(o["beta"], width if o["omega"] is None else o["omega"], o["tau"],
                        0.01 / width if o["e"] is None else o["e"], o["pushing"],
                        o["weight_anchors"])
            out.append(lambda f, y, p, w, g: conr(f, y, p, weights=w))
        if "ordinal-entropy" in self.options:
            o = self.options["ordinal-entropy"]
            oe = OrdinalEntropy(o["lambda_d"], o["lambda_t"])
            by_bin = o["group"] == "bin"
            out.append(lambda f, y, p, w, g: oe(f, self._bin_centers(y) if by_bin else y))
        return out

    def _bin_centers(self, y: torch.Tensor) -> torch.Tensor:
        return self.bins.centers.to(y.device, y.dtype)[self.bins.bin_index(y, clamp=True)]

    def _fds(self) -> FDS | None:
        if "fds" not in self.options:
            return None
        o = self.options["fds"]
        dim = int(getattr(self.model, "feature_dim", 0))
        fds = FDS(dim, self.bins, kernel=o["kernel"], ks=o["ks"], sigma=o["sigma"],
                  momentum=o["momentum"], start_update=o["start_update"],
                  start_smooth=o["start_smooth"], clip=tuple(o["clip"]))
        return fds.to(self.device)

    # ------------------------------------------------------------------ what the loop asks
    @property
    def stepper_method(self) -> Method:
        """The method the optimizer follows: RnC's pre-training is a plain step on its
        contrastive loss; every other stage follows the method."""
        if self.stage == "pretrain":
            return Method(f"{self.method.name} (pre-training)", "none")
        return self.method

    def param_groups(self) -> list[dict[str, Any]]:
        """The model's parameters (RnC: the encoder's in pre-training, the head's after), plus
        Balanced MSE's learned noise scale in a group of its own: lr ``noise_lr``, no weight
        decay, ``rho`` 0 (never perturbed) and not scheduled (the authors keep its lr fixed)."""
        params = list(self.model.parameters())
        if self.stage in ("pretrain", "head"):
            head = {id(p) for p in self.model.head.parameters()}  # type: ignore[union-attr]
            params = [p for p in params if (id(p) in head) == (self.stage == "head")]
        groups: list[dict[str, Any]] = [{"params": params}]
        if self.noise_sigma is not None:
            o = self.options["bni" if "bni" in self.options else "gai"]
            groups.append({"params": [self.noise_sigma], "lr": float(o["noise_lr"]),
                           "weight_decay": 0.0, "rho": 0.0, "scheduled": False})
        return groups

    def first_pass_context(self, outer: Callable[[], Any] | None) -> Callable[[], Any] | None:
        """The perturbation pass's context: ``outer`` (e.g. DDP's ``no_sync``) and, with a
        learned noise scale, the flag that detaches it there."""
        if self.noise_sigma is None:
            return outer

        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            self._perturbing = True
            try:
                with outer() if outer is not None else contextlib.nullcontext():
                    yield
            finally:
                self._perturbing = False

        return ctx

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   mask: torch.Tensor | None, *, epoch: int, index: int,
                   autocast: Callable[[], Any],
                   match: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> Callable[[], Any]:
        """The batch's ``loss_fn()``: per-sample losses, or ``(losses, regulariser)``. FDS
        collects the features in its first call only (one pass per batch); RankSim draws the
        same random subset in every call (a generator seeded by seed, epoch and batch)."""
        y_scaled = self.target_scaler.scale(y)
        calls = [0]
        seed = ((int(self.cfg.seed) * 1_000_003 + epoch) * 1_000_003 + index) % (2**62)

        def loss_fn() -> Any:
            first = calls[0] == 0
            calls[0] += 1
            with autocast():
                pred, feats = self._forward(model, x, y, mask, epoch, first)
            if self.stage == "pretrain":
                if y.dim() > 1 and y[0].numel() > 1:
                    raise ValueError("rnc contrasts samples by one label each; dense targets "
                                     f"(shape {tuple(y.shape)}) are not supported")
                losses = self.elem(y_scaled, y_scaled)
                return losses, rnc_loss(feats.float(), y, temperature=float(
                    self.options["rnc"]["temperature"]))
            pred = match(pred.float(), y_scaled)
            losses = self.elem(pred, y_scaled)
            if not self.regularizers:
                return losses
            return losses, self._regularizer(feats.float(), y, pred.detach(), mask, seed)

        return loss_fn

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 mask: torch.Tensor | None, epoch: int, first: bool
                 ) -> tuple[Any, Any]:
        inner: Any = getattr(model, "module", model)  # a DDP wrapper's model
        if self.stage == "head":  # the frozen encoder, in eval mode
            with torch.no_grad():
                was = inner.training
                inner.eval()
                feats = inner.forward_features(x)
                inner.train(was)
            return inner.forward_head(feats), None
        if self.stage == "pretrain":
            return None, inner.forward_features(x)
        if self.fds is not None:
            feats = inner.forward_features(x)
            yf = self._fds_targets(y, feats)
            if first:
                self._collect(feats, yf, mask, epoch)
            return inner.forward_head(self.fds(feats, yf, epoch)), feats
        if self.regularizers:
            return model(x, return_features=True)
        return model(x), None

    def _fds_targets(self, y: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 4:
            return y
        t = y if y.dim() == 4 else y.reshape(y.shape[0], 1, *y.shape[-2:])
        return F.interpolate(t.float(), size=feats.shape[-2:], mode="nearest")[:, 0]

    def _collect(self, feats: torch.Tensor, yf: torch.Tensor, mask: torch.Tensor | None,
                 epoch: int) -> None:
        assert self.fds is not None
        if feats.dim() == 4:  # pixels of the feature map, the valid ones only
            rows = feats.detach().permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
            keep = (yf.reshape(-1) > 0) if mask is None else F.interpolate(
                mask.reshape(yf.shape[0], 1, *mask.shape[-2:]).float(), size=yf.shape[-2:],
                mode="nearest").reshape(-1) > 0
            self.fds.collect(rows[keep], yf.reshape(-1)[keep], epoch)
        else:
            self.fds.collect(feats, yf, epoch)

    def _regularizer(self, feats: torch.Tensor, y: torch.Tensor, pred: torch.Tensor,
                     mask: torch.Tensor | None, seed: int) -> torch.Tensor:
        """The regularisers' sum on the batch (label units; dense maps per image)."""
        p = self.target_scaler.unscale(pred)
        w = None if self._weights is None else self._weights(y)
        if y.dim() > 1 and y[0].numel() > 1:  # dense targets: one row per image
            y, p = _dense_to_images(y, mask), _dense_to_images(p, mask)
            w = None if w is None else _dense_to_images(w, mask)
            feats = feats.reshape(feats.shape[0], -1)
        gen = torch.Generator(device=y.device).manual_seed(seed)
        total = None
        for reg in self.regularizers:
            term = reg(feats, y.reshape(-1), p.reshape(-1), w, gen)
            total = term if total is None else total + term
        assert total is not None
        return total

    def end_epoch(self, epoch: int) -> None:
        """After every training epoch: FDS folds the epoch's statistics in."""
        if self.fds is not None:
            self.fds.end_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the model and the optimizer."""
        out: dict[str, Any] = {}
        if self.fds is not None:
            out["fds"] = self.fds.state_dict()
        if self.noise_sigma is not None:
            out["noise_sigma"] = self.noise_sigma.detach().clone()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.fds is not None:
            if "fds" not in state:
                raise ValueError("the checkpoint holds no FDS statistics; it was not written "
                                 "by a run of this method")
            self.fds.load_state_dict(state["fds"])
        if self.noise_sigma is not None and "noise_sigma" in state:
            with torch.no_grad():
                self.noise_sigma.copy_(state["noise_sigma"])


# ---------------------------------------------------------------------------- RnC's stages
def is_staged(method: Method, cfg: Any) -> bool:
    """Whether a run is a whole two-stage recipe (``rnc`` with ``stage: both``)."""
    return "rnc" in method.plugins and plugin_options(
        "rnc", cfg.plugins, method.plugin_options)["stage"] == "both"


def _stage_configs(cfg: Any) -> tuple[Any, Any]:
    o = plugin_options("rnc", cfg.plugins)

    def pick(key: str, current: Any) -> Any:
        return current if o[f"pretrain_{key}"] is None else o[f"pretrain_{key}"]

    def staged(stage: str) -> dict[str, Any]:
        return {**cfg.plugins, "rnc": {**(cfg.plugins.get("rnc") or {}), "stage": stage}}

    pre = replace(cfg, epochs=int(pick("epochs", cfg.epochs)), lr=float(pick("lr", cfg.lr)),
                  weight_decay=float(pick("weight_decay", cfg.weight_decay)),
                  batch_size=int(pick("batch_size", cfg.batch_size)),
                  lr_min_factor=float(pick("lr_min_factor", cfg.lr_min_factor)),
                  select_by="last", plugins=staged("pretrain"))
    head = replace(cfg, lr=float(cfg.lr if o["head_lr"] is None else o["head_lr"]),
                   weight_decay=float(cfg.weight_decay if o["head_weight_decay"] is None
                                      else o["head_weight_decay"]), plugins=staged("head"))
    return pre, head


def fit_stages(fit: Callable[..., Any], model: nn.Module, train_data: Any, val_data: Any,
               bins: LabelBins, cfg: Any, *, test_data: Any, out_dir: Any, resume: bool,
               overwrite: bool, log: Callable[[str], None], **common: Any) -> Any:
    """RnC's two stages as two runs of ``fit``: the encoder's contrastive pre-training (into
    ``OUT/pretrain``; no validation, the last epoch kept) and the linear head on the frozen
    encoder (into ``OUT``, validated and tested as any run). Resuming continues the stage that
    was interrupted: a run whose head stage has a ``last.pt`` skips the pre-training (its
    weights are in that checkpoint). ``on_epoch_end`` sees the epochs of both stages (the
    pre-training's rows marked ``stage: pretrain``); ``loggers`` the head stage's. The result
    is the head stage's, with the pre-training's epochs first in ``history`` (marked) and its
    seconds added."""
    from balanced_sam.io import FolderLock
    from balanced_sam.outputs import claim_run_folder

    out = Path(out_dir) if out_dir is not None else None
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if out is not None and rank0:  # the folder first: refused, or cleared (pretrain/ too)
        with FolderLock(out, what="run"):
            claim_run_folder(out, resume=resume, overwrite=overwrite, log=log).record(
                "pretrain", "folder")
    pre_cfg, head_cfg = _stage_configs(cfg)
    first = None
    if not (out is not None and resume and (out / "last.pt").exists()):
        log(f"rnc stage 1/2: contrastive pre-training of the encoder, {pre_cfg.epochs} epochs")
        hook = common.get("on_epoch_end")
        pre_common = {k: v for k, v in common.items() if k not in ("on_epoch_end", "loggers")}
        first = fit(model, train_data, None, bins, pre_cfg, test_data=None,
                    out_dir=None if out is None else out / "pretrain", resume=resume,
                    overwrite=overwrite, log=log, **pre_common,
                    on_epoch_end=None if hook is None else (
                        lambda epoch, row: hook(epoch, {**row, "stage": "pretrain"})))
    log(f"rnc stage 2/2: linear head on the frozen encoder, {head_cfg.epochs} epochs")
    res = fit(model, train_data, val_data, bins, head_cfg, test_data=test_data, out_dir=out,
              resume=resume, overwrite=overwrite, log=log, **common)
    if first is not None:
        res.history = [{**r, "stage": "pretrain"} for r in first.history] + res.history
        res.train_seconds += first.train_seconds
    return res
