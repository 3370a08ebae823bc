"""The training loop: fit / train one epoch / evaluate, for any model, loss and method.

Read it top to bottom:

* :class:`~balanced_sam.config.TrainConfig` holds every knob (method, optimizer, schedule, rho,
  seed, AMP, DDP scope); :meth:`TrainConfig.validate` checks each value's type and range.
* :class:`LRPlan` is the per-epoch learning-rate multiplier (warm-up, then cosine, the reference
  code's cosine, steps or constant); a resumed run with a new epoch count re-plans it from where
  it stands, so the learning rate never jumps back up. It lives in
  :mod:`balanced_sam.train_state` with the checks a checkpoint passes before a run resumes from
  it; the device, the process group and the seeds are set up by :mod:`balanced_sam.runtime`
  (``from balanced_sam.train import ...`` keeps working for the names in ``__all__``).
* :class:`~balanced_sam.data.loader.EpochLoader` yields the epoch's mini-batches: a seeded
  permutation per epoch, split across data-parallel replicas the way ``DistributedSampler``
  does, so a run is reproducible and a resumed run sees exactly the batches an unbroken one
  would.
* :func:`train_one_epoch` runs the method's step over the batches.
* :func:`evaluate` streams the metrics (:class:`~balanced_sam.metrics.RegressionMetrics`).
* :func:`fit` ties them together: open the output folder, build the optimizer, restore a killed
  run, then per epoch train, validate, keep the best epoch, write the checkpoints and the logs;
  at the end evaluate the best weights.

Targets are scaled for the loss by a :class:`~balanced_sam.data.scaling.TargetScaler`; weights,
bins and metrics always use the label units.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from balanced_sam.baselines.plugins import MethodPlugin, fit_stages, is_staged
from balanced_sam.bins import LabelBins
from balanced_sam.config import SAFE_TO_CHANGE, TrainConfig
from balanced_sam.data.loader import EpochLoader, batches, is_tensor_data
from balanced_sam.data.scaling import TargetScaler
from balanced_sam.device_pipeline import DevicePipeline, auto_settings, device_pipeline
from balanced_sam.io import progress_bar
from balanced_sam.layout import LayoutChoice, resumed_layout, set_up_layout
from balanced_sam.losses import get_loss
from balanced_sam.methods import build_stepper, get_method
from balanced_sam.metrics import RegressionMetrics, balance_of
from balanced_sam.outputs import (
    Checkpointer,
    EpochLogger,
    RunExistsError,
    RunFolder,
    load_checkpoint,
    run_loggers,
)
from balanced_sam.runtime import (
    init_distributed,
    rank_and_world,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from balanced_sam.train_state import (
    LRPlan,
    check_optimizer_state,
    check_same_config,
    check_same_data,
    load_weights,
    lr_lambdas,
)

__all__ = ["TrainConfig", "FitResult", "LRPlan", "fit", "evaluate", "predict",
           "train_one_epoch", "batches", "EpochLoader", "load_checkpoint", "load_weights",
           "check_optimizer_state",
           "seed_everything", "resolve_device", "init_distributed", "RunExistsError",
           "SAFE_TO_CHANGE"]

@dataclass
class FitResult:
    """What :func:`fit` returns (and ``bsam`` records per run)."""

    best_epoch: int
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]] | None
    test_per_bin: dict[str, list[Any]] | None
    history: list[dict[str, float]]
    train_seconds: float
    out_dir: str | None
    config: dict[str, Any] | None = None  # the run's TrainConfig (balance resolved)
    skipped_steps: int = 0  # steps skipped for a non-finite gradient (optimizer's count)
    layout: dict[str, Any] | None = None  # the memory layout and why (LayoutChoice.to_dict)


def _unpack(batch: Sequence[torch.Tensor], device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if len(batch) == 2:
        x, y = batch
        mask = None
    elif len(batch) == 3:
        x, y, mask = batch
    else:
        raise ValueError(f"a batch must be (inputs, targets) or (inputs, targets, mask), "
                         f"got {len(batch)} items")
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True).float()
    if mask is not None:
        mask = mask.to(device, non_blocking=True).bool()
    return x, y, mask


def _match(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bring the prediction to the target's shape (dense outputs are upsampled)."""
    if pred.shape == y.shape:
        return pred
    if pred.dim() == 4 and y.dim() == 4 and pred.shape[:2] == y.shape[:2]:
        return F.interpolate(pred, size=y.shape[-2:], mode="bilinear", align_corners=True)
    if pred.numel() == y.numel():
        return pred.reshape(y.shape)
    raise ValueError(f"model output shape {tuple(pred.shape)} does not match the targets' "
                     f"shape {tuple(y.shape)}")


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    amp = auto_settings(amp, False, device)[0]
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ---------------------------------------------------------------------------- epoch and eval
def train_one_epoch(
    model: nn.Module,
    data: Any,
    step: Callable[..., torch.Tensor],
    cfg: TrainConfig,
    *,
    epoch: int,
    device: torch.device,
    amp_scaler: Any = None,
    first_pass_context: Any = None,
    desc: str = "",
    target_scaler: TargetScaler | None = None,
    loader: EpochLoader | None = None,
    batch_transform: Callable[..., Sequence[torch.Tensor]] | None = None,
    plugin: MethodPlugin | None = None,
) -> float:
    """One pass over the training data; returns the mean first-pass loss.

    ``amp_scaler`` is the AMP ``GradScaler`` (fp16); ``target_scaler`` standardises the targets
    for the loss (``None``: unscaled); ``loader`` is the run's :class:`EpochLoader`;
    ``batch_transform(batch, epoch=, step=)`` turns each loaded batch into ``(inputs, targets)``
    on the device (the image augmentation of :class:`~balanced_sam.device_pipeline.DevicePipeline`);
    ``plugin`` (the method's :class:`~balanced_sam.baselines.plugins.MethodPlugin`) builds each
    batch's ``loss_fn`` (features, regularisers, FDS) instead of the plain loss.
    """
    loss_elem = get_loss(cfg.loss)
    target_scaler = target_scaler or TargetScaler()
    rank, world = rank_and_world()
    model.train()
    if loader is None:
        loader = EpochLoader(data, cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank,
                             world_size=world, num_workers=cfg.num_workers)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    bar = progress_bar(loader.epoch(epoch), enabled=cfg.progress and rank == 0,
                       total=len(loader), desc=desc, leave=False, dynamic_ncols=True,
                       disable=not sys.stderr.isatty())
    for i, batch in enumerate(bar):
        if batch_transform is not None:
            batch = batch_transform(batch, epoch=epoch, step=i)
        x, y, mask = _unpack(batch, device)
        y_scaled = target_scaler.scale(y)

        if plugin is not None:
            loss_fn = plugin.batch_loss(model, x, y, mask, epoch=epoch, index=count,
                                        autocast=lambda: _autocast(device, cfg.amp),
                                        match=_match)
        else:
            def loss_fn(x: torch.Tensor = x, y_scaled: torch.Tensor = y_scaled) -> torch.Tensor:
                with _autocast(device, cfg.amp):
                    pred = model(x)
                return loss_elem(_match(pred.float(), y_scaled), y_scaled)

        # (the step's keyword for the GradScaler is ``scaler=``, the optimizers' public form)
        loss = step(loss_fn, y, mask=mask, scaler=amp_scaler,
                    first_pass_context=first_pass_context)
        if amp_scaler is not None:
            amp_scaler.update()
        total += loss.detach().double()
        count += 1
        if count % 20 == 0:
            bar.set_postfix(loss=f"{(total / count).item():.4f}")
    return (total / max(count, 1)).item()


@torch.no_grad()
def predict(model: nn.Module, data: Any, device: torch.device, *, batch_size: int = 1024,
            amp: str = "none", num_workers: int = 0,
            target_scaler: TargetScaler | None = None,
            batch_transform: Callable[[Any], Sequence[torch.Tensor]] | None = None,
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yield ``(prediction, target, mask)`` per batch, predictions in label units
    (``batch_transform(batch)``: each loaded batch to ``(inputs, targets)`` first)."""
    target_scaler = target_scaler or TargetScaler()
    was_training = model.training
    model.eval()
    try:
        for batch in batches(data, batch_size, shuffle=False, num_workers=num_workers,
                             pin_memory=device.type == "cuda"):
            if batch_transform is not None:
                batch = batch_transform(batch)
            x, y, mask = _unpack(batch, device)
            with _autocast(device, amp):
                pred = model(x)
            yield target_scaler.unscale(_match(pred.float(), y)), y, mask
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, data: Any, bins: LabelBins, *, device: torch.device | str = "cpu",
             batch_size: int = 1024, many: int | None = None, few: int | None = None,
             depth: bool = False, balance: str = "label", amp: str = "none", num_workers: int = 0,
             per_bin: bool = False, clamp: bool | None = None,
             target_scaler: TargetScaler | None = None,
             batch_transform: Callable[[Any], Sequence[torch.Tensor]] | None = None) -> Any:
    """The metrics report of ``model`` on ``data`` (and the per-bin MAE when ``per_bin``);
    regions by the bins' thresholds unless ``many`` / ``few`` are given."""
    device = torch.device(device)
    m, f = bins.thresholds(many, few)
    metrics = RegressionMetrics(bins, m, f, depth=depth, balance=balance, clamp=clamp)
    for pred, y, mask in predict(model, data, device, batch_size=batch_size,
                                 amp=amp, num_workers=num_workers,
                                 target_scaler=target_scaler, batch_transform=batch_transform):
        metrics.update(pred, y, mask)
    report = metrics.compute()
    return (report, metrics.per_bin()) if per_bin else report


# ---------------------------------------------------------------------------- fit
@dataclass(kw_only=True)
class _Run:
    """What :func:`fit` builds once: device, optimizer and step, schedule, loader, and what the
    checkpoints carry (built by keyword: twenty fields are too many to read by position)."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    model: nn.Module
    net: nn.Module  # the model, wrapped in DDP for several processes
    opt: torch.optim.Optimizer
    step: Callable[..., torch.Tensor]
    plan: LRPlan
    sched: torch.optim.lr_scheduler.LambdaLR
    amp_scaler: Any
    first_ctx: Any
    loader: EpochLoader
    bins: LabelBins
    target_scaler: TargetScaler
    depth: bool
    meta: dict[str, Any]
    fingerprint: str | None
    pipeline: DevicePipeline | None = None  # images augmented on the device, per batch
    plugin: MethodPlugin | None = None  # the method's baseline parts (features, FDS, ...)
    layout: LayoutChoice | None = None  # the model's memory layout (channels_last) and why


@dataclass
class _State:
    """What changes from epoch to epoch (and ``last.pt`` keeps)."""

    start_epoch: int = 0
    best_metric: float = math.inf
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0


def fit(
    model: nn.Module,
    train_data: Any,
    val_data: Any,
    bins: LabelBins,
    cfg: TrainConfig,
    *,
    test_data: Any = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    target_scaler: TargetScaler | None = None,
    depth: bool = False,
    meta: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
    allow_data_change: bool = False,
    trust_checkpoint: bool = False,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    loggers: Iterable[EpochLogger] = (),
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train ``model`` with ``cfg.method``; returns the best epoch's results.

    ``train_data``, ``val_data``, ``test_data``: tuples of tensors ``(x, y[, mask])`` or
    ``Dataset`` s of such tuples (``val_data=None``: the last epoch is kept). ``bins``: the
    training labels' :class:`LabelBins`. ``out_dir``: where ``last.pt`` (every epoch),
    ``best.pt``, ``log.csv`` and TensorBoard files go, under a lock (``None``: nothing is
    written). ``resume`` continues ``out_dir/last.pt`` as an unbroken run would; only
    :data:`SAFE_TO_CHANGE` and ``epochs`` (re-planned, :meth:`LRPlan.extended`) may differ, and
    data of another ``data_fingerprint`` are refused unless ``allow_data_change``. Without
    ``resume`` a folder holding a run raises :class:`RunExistsError` unless ``overwrite``, which
    removes that run's outputs first. ``target_scaler`` standardises the targets for the
    loss (``None``: unscaled); ``depth`` adds the depth metrics; ``meta`` goes into the
    checkpoints; ``on_epoch_end(epoch, row)`` runs after each epoch's checkpoint; ``loggers``
    receive every epoch's row. ``trust_checkpoint``: see :func:`load_checkpoint`.

    Under ``torchrun`` the model is wrapped in DDP; ``cfg.scope="global"`` all-reduces the first
    pass's weighted gradient (the perturbation of the single-process run with the global batch),
    ``"local"`` perturbs each replica with its own. Only rank 0 evaluates and writes. A
    two-stage method (``rnc``) runs as :func:`~balanced_sam.baselines.plugins.fit_stages`.
    """
    if is_staged(get_method(cfg.method), cfg):
        return fit_stages(fit, model, train_data, val_data, bins, cfg, test_data=test_data,
                          out_dir=out_dir, resume=resume, overwrite=overwrite, log=log,
                          target_scaler=target_scaler, depth=depth, meta=meta, loggers=loggers,
                          data_fingerprint=data_fingerprint, allow_data_change=allow_data_change,
                          on_epoch_end=on_epoch_end, trust_checkpoint=trust_checkpoint)
    cfg = _resolved(cfg, bins, train_data)
    rank, world = rank_and_world()
    folder = RunFolder(out_dir, rank=rank, log=log)
    resume = _agree(folder.open(resume=resume, overwrite=overwrite, checkpoint=cfg.checkpoint),
                    world)
    sinks: list[EpochLogger] = []
    try:
        seed_everything(cfg.seed)
        run = _build_run(model, train_data, bins, cfg, target_scaler or TargetScaler(), depth,
                         meta or {}, data_fingerprint, log)
        if run.pipeline is not None and rank == 0:
            run.pipeline.prepare(val_data, test_data)  # fill their caches now
        ckpt = Checkpointer(folder, cfg.checkpoint)
        state = _restore(run, ckpt, allow_data_change, log, trust_checkpoint) if resume else \
            _State()
        sinks = run_loggers(folder, loggers) if rank == 0 else []
        for epoch in range(state.start_epoch, cfg.epochs):
            row = _train_epoch(run, epoch)
            state.train_seconds += row["seconds"]
            if rank == 0:
                improved, val = _validate(run, state, row, val_data)
                _write_epoch(run, state, ckpt, row, improved, val, sinks, log)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, row)
            if world > 1:
                torch.distributed.barrier()
        result = _final_evaluation(run, state, val_data, test_data, folder)
        folder.finish()  # records result.json, which the callers write next
        return result
    finally:
        for sink in sinks:
            sink.close()
        folder.close()


def _resolved(cfg: TrainConfig, bins: LabelBins, train_data: Any) -> TrainConfig:
    """The config validated, ``balance: auto`` decided from the training labels, the region
    thresholds set on the bins."""
    cfg.validate()
    amp, _ = auto_settings(cfg.amp, False, resolve_device(cfg.device))
    cfg = replace(cfg, amp=amp)  # "auto" decided for the device (channels_last: by _build_run)
    if cfg.balance == "auto":
        cfg = replace(cfg, balance=balance_of(_labels_of(train_data), bins))
    bins.set_thresholds(cfg.many, cfg.few)
    return cfg


def _agree(resume: bool, world: int) -> bool:
    """Rank 0 decided whether to resume; every rank follows."""
    if world > 1:
        flag = torch.tensor([int(resume)])
        torch.distributed.broadcast(flag, 0)
        resume = bool(flag.item())
    return resume


def _labels_of(data: Any) -> torch.Tensor | None:
    """Per-sample labels of tensor data or of a dataset with ``targets``; else ``None``."""
    if is_tensor_data(data):
        return data[1]
    targets = getattr(data, "targets", None)
    return torch.as_tensor(targets) if targets is not None else None


def _on(data: Any, device: torch.device) -> Any:
    """Tensor data go to a CUDA device once (the batches are then sliced there)."""
    if device.type == "cuda" and is_tensor_data(data):
        return tuple(t.to(device) for t in data)
    return data


def _build_run(model: nn.Module, train_data: Any, bins: LabelBins, cfg: TrainConfig,
               target_scaler: TargetScaler, depth: bool, meta: dict[str, Any],
               fingerprint: str | None, log: Callable[[str], None] = print) -> _Run:
    """Device, DDP wrapper, optimizer and step, schedule, AMP scaler, the loader and the device
    pipeline of image data augmented per batch on the device."""
    method = get_method(cfg.method)
    device = resolve_device(cfg.device)
    if cfg.amp != "none" and device.type != "cuda":
        raise ValueError(f"amp={cfg.amp!r} needs a CUDA device (got {device}); use amp=none")
    rank, world = rank_and_world()
    if world > 1 and method.sharpness == "imbsam":
        raise ValueError("method imbsam does not support distributed training (its head "
                         "gradient is not all-reduced); run it in one process")
    if world > 1 and method.sharpness == "ccsam" and cfg.scope == "local":
        raise ValueError("method ccsam needs scope=global under DDP (its gradients at theta "
                         "enter the update, so they must be all-reduced)")
    if world > 1 and cfg.scope == "local" and "reuse" in method.optimizer_options:
        raise ValueError(f"method {method.name!r} (gradient reuse) needs scope=global under "
                         "DDP: with scope=local each replica would store its own direction "
                         "and the replicas' weights would drift apart")
    # (the picture cache is filled, by forked processes, before the model goes to the GPU)
    pipeline = device_pipeline(train_data, device, seed=cfg.seed, rank=rank, world=world,
                               amp=cfg.amp, channels_last=cfg.channels_last is True,
                               processes=max(1, cfg.num_workers), progress=cfg.progress,
                               log=log if rank == 0 else (lambda s: None))
    model.to(device)
    layout = set_up_layout(cfg.channels_last, model, train_data, pipeline, cfg.batch_size,
                           device, cfg.amp, world, log=log if rank == 0 else None)
    cfg = replace(cfg, channels_last=layout.channels_last)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    first_ctx_of = net
    if cfg.compile:
        net = torch.compile(net)  # training only: evaluation runs ``model`` uncompiled
    plugin = MethodPlugin(method, cfg, model, bins, target_scaler, device, world=world)
    opt, step = build_stepper(plugin.stepper_method, plugin.param_groups(), bins, cfg,
                              model=model if cfg.bn_second_pass == "freeze" else None)
    plan = LRPlan.of(cfg)
    loader = EpochLoader(pipeline.train if pipeline is not None else _on(train_data, device),
                         cfg.batch_size, shuffle=True, seed=cfg.seed,
                         rank=rank, world_size=world, num_workers=cfg.num_workers,
                         pin_memory=device.type == "cuda", prefetch_factor=cfg.prefetch_factor)
    return _Run(
        cfg=cfg, device=device, rank=rank, world=world, model=model, net=net, opt=opt,
        step=step, plan=plan, sched=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(opt, plan)),
        amp_scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None,
        first_ctx=plugin.first_pass_context(first_ctx_of.no_sync  # type: ignore[arg-type]
                                            if (world > 1 and cfg.scope == "local") else None),
        loader=loader, bins=bins, target_scaler=target_scaler, depth=depth, meta=meta,
        fingerprint=fingerprint, pipeline=pipeline, plugin=plugin, layout=layout)


def _restore(run: _Run, ckpt: Checkpointer, allow_data_change: bool,
             log: Callable[[str], None], trust: bool = False) -> _State:
    """Load ``last.pt`` into the run after checking it is the same run on the same data."""
    ck = ckpt.load_last(run.device, trust=trust)
    if run.layout is not None:  # auto: the checkpoint's decision, on the same kind of device
        kept = resumed_layout(run.layout, ck.get("layout"), run.model, run.pipeline)
        run.layout, run.cfg = kept, replace(run.cfg, channels_last=kept.channels_last)
    cfg = run.cfg
    check_same_config(ck.get("config", {}), cfg)
    check_same_data(ck.get("data_fingerprint"), run.fingerprint, allow_data_change)
    load_weights(run.model, ck["model"], str(ckpt.folder.last))
    check_optimizer_state(run.opt, ck["optimizer"], run.model, str(ckpt.folder.last))
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    if run.amp_scaler is not None and ck.get("amp_scaler"):
        run.amp_scaler.load_state_dict(ck["amp_scaler"])
    start = ck["epoch"] + 1
    saved = LRPlan(**ck["lr_plan"]) if ck.get("lr_plan") else LRPlan.of(
        TrainConfig.from_dict(ck["config"]))
    run.plan = saved.extended(cfg.epochs, start)
    run.sched.lr_lambdas = lr_lambdas(run.opt, run.plan)
    for group, base, lam in zip(run.opt.param_groups, run.sched.base_lrs, run.sched.lr_lambdas):
        group["lr"] = base * lam(start)  # the LR of the next epoch under the (new) plan
    if run.plan != saved and run.rank == 0:
        log(f"resume: {saved.epochs} -> {cfg.epochs} epochs; the {cfg.schedule} schedule "
            f"continues from lr {run.opt.param_groups[0]['lr']:.3g} at epoch {start + 1}")
    if run.plugin is not None:
        run.plugin.load_state_dict(ck.get("plugin") or {})
    set_rng_state(ck["rng"])
    if run.rank == 0:
        log(f"resumed from {ckpt.folder.last} at epoch {start}/{cfg.epochs}")
    return _State(start_epoch=start, best_metric=ck["best_metric"], best_epoch=ck["best_epoch"],
                  best_state=ck.get("best_state"), history=ck["history"],
                  train_seconds=ck["train_seconds"])


def _train_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """Train one epoch and step the schedule; the row of figures starts here."""
    t0 = time.perf_counter()
    lr = run.opt.param_groups[0]["lr"]
    skipped = getattr(run.opt, "skipped_steps", 0)
    loss = train_one_epoch(run.net, run.loader.data, run.step, run.cfg, epoch=epoch,
                           device=run.device, amp_scaler=run.amp_scaler,
                           first_pass_context=run.first_ctx, target_scaler=run.target_scaler,
                           loader=run.loader, batch_transform=None if run.pipeline is None
                           else run.pipeline.train_batch, plugin=run.plugin,
                           desc=f"{run.cfg.method} epoch {epoch + 1}/{run.cfg.epochs}")
    if run.plugin is not None:
        run.plugin.end_epoch(epoch)
    run.sched.step()
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss,
            "skipped_steps": getattr(run.opt, "skipped_steps", 0) - skipped,
            "seconds": time.perf_counter() - t0}


def _evaluate(run: _Run, data: Any, per_bin: bool = False) -> Any:
    cfg = run.cfg
    data, transform = run.pipeline.view(data) if run.pipeline is not None else (data, None)
    return evaluate(run.model, data, run.bins, device=run.device,
                    batch_size=cfg.eval_batch_size, target_scaler=run.target_scaler,
                    depth=run.depth, balance=cfg.balance, amp=cfg.amp, num_workers=cfg.num_workers,
                    per_bin=per_bin, batch_transform=transform)


def _validate(run: _Run, state: _State, row: dict[str, Any], val_data: Any
              ) -> tuple[bool, Any]:
    """Validation figures into ``row``; keep the weights when the epoch is the best so far.
    Returns whether it is, and the validation report."""
    epoch, cfg = row["epoch"] - 1, run.cfg
    rep = None
    if val_data is not None:
        t0 = time.perf_counter()
        rep = _evaluate(run, val_data)
        row.update({f"val_{m}": rep["all"][m] for m in ("mae", "bmae", "gm", "rmse")})
        row["val_few_mae"] = rep["few"]["mae"]
        row["seconds"] += time.perf_counter() - t0
        metric = rep["all"][cfg.select_by] if cfg.select_by != "last" else -epoch
    else:
        metric = -epoch
    improved = metric < state.best_metric
    if improved:
        state.best_metric, state.best_epoch = metric, epoch + 1
        state.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    return improved, rep


def _write_epoch(run: _Run, state: _State, ckpt: Checkpointer, row: dict[str, Any],
                 improved: bool, val: Any, sinks: list[EpochLogger],
                 log: Callable[[str], None]) -> None:
    """Log the row, write ``best.pt`` on improvement and ``last.pt`` every epoch."""
    state.history.append(row)
    log(_log_line(row, improved))
    for sink in sinks:
        sink.log_epoch(row)
    many, few = run.bins.thresholds()
    common = {"config": run.cfg.to_dict(),
              "bins": {**run.bins.to_dict(), "many": many, "few": few},
              "target_scaler": run.target_scaler.to_dict(),
              "data_fingerprint": run.fingerprint, "meta": run.meta,
              "model": run.model.state_dict(), "epoch": row["epoch"] - 1,
              "layout": run.layout.to_dict() if run.layout is not None else None}
    if improved:
        ckpt.save_best({**common, "val": val})
    if ckpt.keeps_last:
        ckpt.save_last({
            **common, "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
            "lr_plan": run.plan.to_dict(),
            "amp_scaler": run.amp_scaler.state_dict() if run.amp_scaler is not None else None,
            "best_metric": state.best_metric, "best_epoch": state.best_epoch,
            "history": state.history, "train_seconds": state.train_seconds,
            "rng": rng_state(), "best_state": state.best_state,
            "plugin": run.plugin.state_dict() if run.plugin is not None else {}})


def _final_evaluation(run: _Run, state: _State, val_data: Any, test_data: Any,
                      folder: RunFolder) -> FitResult:
    """Back to the best epoch's weights; its validation and test reports (rank 0)."""
    val_rep, test_rep, per_bin = None, None, None
    if run.rank == 0:
        if state.best_state is not None:
            run.model.load_state_dict(state.best_state)
        if val_data is not None:
            val_rep = _evaluate(run, val_data)
        if test_data is not None:
            test_rep, per_bin = _evaluate(run, test_data, per_bin=True)
    return FitResult(best_epoch=state.best_epoch, val=val_rep or {}, test=test_rep,
                     test_per_bin=per_bin, history=state.history,
                     train_seconds=state.train_seconds,
                     out_dir=str(folder.path) if folder.path is not None else None,
                     config=run.cfg.to_dict(),
                     skipped_steps=sum(int(r.get("skipped_steps") or 0) for r in state.history),
                     layout=run.layout.to_dict() if run.layout is not None else None)


def _log_line(row: dict[str, Any], improved: bool) -> str:
    parts = [f"epoch {row['epoch']:>3}", f"lr {row['lr']:.3g}", f"loss {row['train_loss']:.4f}"]
    for k in ("val_mae", "val_bmae", "val_gm", "val_few_mae"):
        if k in row and row[k] is not None and math.isfinite(row[k]):
            parts.append(f"{k} {row[k]:.4g}")
    if row.get("skipped_steps"):
        parts.append(f"skipped {row['skipped_steps']} step(s): non-finite gradient")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts) + ("  *" if improved else "")
