"""The training loop: fit / train one epoch / evaluate, for any model, loss and method.

Read it top to bottom:

* :class:`TrainConfig` holds every knob (method, optimizer, schedule, rho, seed, AMP, DDP scope).
* :func:`batches` yields the epoch's mini-batches: a seeded permutation per epoch, split across
  data-parallel replicas the way ``DistributedSampler`` does, so a run is reproducible and a
  resumed run sees exactly the batches an unbroken one would.
* :func:`train_one_epoch` runs the method's step over the batches.
* :func:`evaluate` streams the metrics (:class:`~balanced_sam.metrics.RegressionMetrics`).
* :func:`fit` ties them together: seeds, per-epoch LR schedule, best epoch by validation MAE (or
  bMAE), a checkpoint every epoch (``last.pt``; ``best.pt`` on improvement), ``resume=True`` to
  continue a killed run, a CSV log, TensorBoard when installed.

Targets are standardised for the loss when ``target_stats=(mean, std)`` is given; weights, bins
and metrics always use the original units.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from balanced_sam.bins import LabelBins
from balanced_sam.losses import get_loss
from balanced_sam.methods import build_stepper, get_method
from balanced_sam.metrics import RegressionMetrics

__all__ = ["TrainConfig", "FitResult", "fit", "evaluate", "train_one_epoch", "batches",
           "load_checkpoint", "seed_everything", "resolve_device", "init_distributed",
           "RunExistsError"]


class RunExistsError(FileExistsError):
    """The output directory already holds a run (and neither resume nor overwrite was asked)."""


@dataclass
class TrainConfig:
    """Everything that decides a training run. ``bsam train`` reads it from YAML (section
    ``train``) and ``key=value`` overrides; every field is validated by :meth:`validate`."""

    method: str = "bsam"
    loss: str = "l1"
    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | none
    lr_min_factor: float = 1e-3  # cosine ends at lr * lr_min_factor (reference: 0.1 ** 3)
    step_size: int = 5  # step schedule: multiply by gamma every step_size epochs
    gamma: float = 0.1
    warmup_epochs: int = 0
    rho: float = 0.05
    p: float = 2.0
    normalize: str = "mean"  # weights: mean 1 over training samples, or "none" (reference)
    eta: int = 20  # ImbSAM tail threshold
    lds: dict[str, Any] = field(default_factory=lambda: {"kernel": "gaussian", "ks": 5,
                                                         "sigma": 2.0})
    bn_second_pass: str = "update"
    select_by: str = "mae"  # mae | bmae | last
    many: int = 100
    few: int = 20
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    scope: str = "global"  # data-parallel perturbation scope: global | local
    num_workers: int = 0
    eval_batch_size: int = 1024
    progress: bool = True
    checkpoint: str = "all"  # all (last.pt every epoch + best.pt) | best | none
    balance: str = "label"  # what bMAE averages over: label | bin

    def validate(self) -> TrainConfig:
        get_method(self.method)
        get_loss(self.loss)
        checks: list[tuple[bool, str]] = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1,
             "batch_size must be an integer >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.rho >= 0 and math.isfinite(self.rho), "rho must be a finite number >= 0"),
            (self.p >= 1, "p must be >= 1 (or inf)"),
            (self.schedule in ("cosine", "step", "none"),
             "schedule must be one of cosine, step, none"),
            (0 < self.lr_min_factor <= 1, "lr_min_factor must be in (0, 1]"),
            (self.select_by in ("mae", "bmae", "last"), "select_by must be mae, bmae or last"),
            (self.amp in ("none", "bf16", "fp16"), "amp must be none, bf16 or fp16"),
            (self.scope in ("global", "local"), "scope must be global or local"),
            (self.normalize in ("mean", "none"), "normalize must be mean or none"),
            (self.bn_second_pass in ("update", "freeze"), "bn_second_pass must be update/freeze"),
            (self.checkpoint in ("all", "best", "none"), "checkpoint must be all, best or none"),
            (self.balance in ("label", "bin"), "balance must be label or bin"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"bad training config: {msg}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        return cls(**d).validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


# ---------------------------------------------------------------------------- set-up helpers
def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (user code may use the global RNG)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """``"auto"``: this process's GPU (``cuda:LOCAL_RANK`` under torchrun) or the CPU."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available; use cpu")
    return dev


def init_distributed() -> bool:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1 in the
    environment): NCCL on GPUs, gloo on CPUs. Returns whether this is a multi-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return True


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _is_tensor_data(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data)


def _num_samples(data: Any) -> int:
    return int(data[0].shape[0]) if _is_tensor_data(data) else len(data)


def batches(data: Any, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
            rank: int = 0, world_size: int = 1, num_workers: int = 0,
            drop_last: bool = False) -> Iterator[Sequence[torch.Tensor]]:
    """Mini-batches of ``data`` for one epoch.

    ``data`` is a tuple of tensors (sliced directly: fast for tables and small images) or a
    ``Dataset`` (read through a ``DataLoader``). The order is a permutation drawn from a
    generator seeded with ``seed + epoch`` and split over replicas as ``DistributedSampler``
    does (``indices[rank::world_size]``, padded to equal length), so replica ``r`` of a
    ``world_size``-process run gets, batch by batch, its share of what a single process with
    ``world_size`` times the batch size gets.
    """
    n = _num_samples(data)
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if world_size > 1:
        per = math.ceil(n / world_size)
        pad = per * world_size - n
        if pad:
            order = torch.cat([order, order[:pad]])
        order = order[rank::world_size]
    if _is_tensor_data(data):
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for i in range(0, stop, batch_size):
            idx = order[i:i + batch_size]
            yield tuple(t[idx] for t in data)
        return
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, sampler=order.tolist(), num_workers=num_workers,
        drop_last=drop_last, pin_memory=False,
        generator=torch.Generator().manual_seed(seed * 7919 + epoch),
        persistent_workers=False)
    yield from loader


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
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Per-epoch LR multiplier: warm-up, then cosine to ``lr_min_factor`` / step / constant."""

    def factor(epoch: int) -> float:
        if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
            return (epoch + 1) / cfg.warmup_epochs
        if cfg.schedule == "cosine":
            e = epoch - cfg.warmup_epochs
            span = max(1, cfg.epochs - cfg.warmup_epochs)
            cos = (1 + math.cos(math.pi * e / span)) / 2
            return cfg.lr_min_factor + (1 - cfg.lr_min_factor) * cos
        if cfg.schedule == "step":
            return cfg.gamma ** (epoch // cfg.step_size)
        return 1.0

    return factor


# ---------------------------------------------------------------------------- epoch and eval
def train_one_epoch(
    model: nn.Module,
    data: Any,
    step: Callable[..., torch.Tensor],
    cfg: TrainConfig,
    *,
    epoch: int,
    device: torch.device,
    target_stats: tuple[float, float] | None = None,
    scaler: Any = None,
    first_pass_context: Any = None,
    desc: str = "",
) -> float:
    """One pass over the training data; returns the mean first-pass loss."""
    loss_elem = get_loss(cfg.loss)
    rank, world = _dist()
    model.train()
    mean, std = target_stats if target_stats else (0.0, 1.0)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    n = _num_samples(data)
    steps = math.ceil(math.ceil(n / world) / cfg.batch_size)
    it = batches(data, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, rank=rank,
                 world_size=world, num_workers=cfg.num_workers)
    bar = _progress(it, total=steps, desc=desc, enabled=cfg.progress and rank == 0)
    for batch in bar:
        x, y, mask = _unpack(batch, device)
        y_std = (y - mean) / std

        def loss_fn(x: torch.Tensor = x, y_std: torch.Tensor = y_std) -> torch.Tensor:
            with _autocast(device, cfg.amp):
                pred = model(x)
            return loss_elem(_match(pred.float(), y_std), y_std)

        loss = step(loss_fn, y, mask=mask, scaler=scaler, first_pass_context=first_pass_context)
        if scaler is not None:
            scaler.update()
        total += loss.detach().double()
        count += 1
        if count % 20 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{(total / count).item():.4f}")
    return (total / max(count, 1)).item()


@torch.no_grad()
def predict(model: nn.Module, data: Any, device: torch.device, *, batch_size: int = 1024,
            target_stats: tuple[float, float] | None = None, amp: str = "none",
            num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor,
                                                    torch.Tensor | None]]:
    """Yield ``(prediction, target, mask)`` per batch, predictions in target units."""
    was_training = model.training
    model.eval()
    mean, std = target_stats if target_stats else (0.0, 1.0)
    try:
        for batch in batches(data, batch_size, shuffle=False, num_workers=num_workers):
            x, y, mask = _unpack(batch, device)
            with _autocast(device, amp):
                pred = model(x)
            yield _match(pred.float(), y) * std + mean, y, mask
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, data: Any, bins: LabelBins, *, device: torch.device | str = "cpu",
             batch_size: int = 1024, target_stats: tuple[float, float] | None = None,
             many: int = 100, few: int = 20, depth: bool = False, balance: str = "label",
             amp: str = "none", num_workers: int = 0, per_bin: bool = False,
             clamp: bool | None = None) -> Any:
    """The metrics report of ``model`` on ``data`` (and the per-bin MAE when ``per_bin``)."""
    device = torch.device(device)
    metrics = RegressionMetrics(bins, many, few, depth=depth, balance=balance, clamp=clamp)
    for pred, y, mask in predict(model, data, device, batch_size=batch_size,
                                 target_stats=target_stats, amp=amp, num_workers=num_workers):
        metrics.update(pred, y, mask)
    report = metrics.compute()
    return (report, metrics.per_bin()) if per_bin else report


def _progress(it: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


# ---------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])  # noqa: NPY002
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`fit` (a dict; see ``fit`` for its keys)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # corrupt or foreign file
        raise ValueError(f"could not read checkpoint {path}: {exc}") from exc


# ---------------------------------------------------------------------------- fit
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
    target_stats: tuple[float, float] | None = None,
    depth: bool = False,
    meta: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train ``model`` with ``cfg.method`` and return the best epoch's results.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to predictions of the targets' shape.
        train_data, val_data, test_data: tuples of tensors ``(x, y[, mask])`` or ``Dataset``s
            yielding such tuples. ``val_data=None`` selects the last epoch.
        bins: :class:`LabelBins` of the training labels (weights, regions, metrics).
        out_dir: where ``last.pt`` (every epoch), ``best.pt``, ``log.csv`` and TensorBoard
            files go; ``None`` keeps the best weights in memory only.
        resume: continue from ``out_dir/last.pt`` (same config): the result equals that of an
            unbroken run. Without it, an ``out_dir`` that already holds a run raises
            :class:`RunExistsError` unless ``overwrite``.
        target_stats: ``(mean, std)`` to standardise targets for the loss.
        depth: dense depth targets: report the depth metrics too.
        meta: stored in the checkpoints (model and data description, for ``bsam eval``).
        on_epoch_end: called as ``on_epoch_end(epoch, row)`` after each epoch's checkpoint.

    Under ``torchrun`` (torch.distributed initialised by the caller) the model is wrapped in
    DDP; ``cfg.scope="global"`` all-reduces the first pass's weighted gradient (the
    perturbation equals the single-process one for the same global batch), ``"local"`` lets each
    replica perturb with its own gradient. Only rank 0 evaluates, logs and writes files.
    """
    cfg.validate()
    method = get_method(cfg.method)
    device = resolve_device(cfg.device)
    if cfg.amp != "none" and device.type != "cuda":
        raise ValueError(f"amp={cfg.amp!r} needs a CUDA device (got {device}); use amp=none")
    rank, world = _dist()
    if world > 1 and method.optimizer == "imbsam":
        raise ValueError("method imbsam does not support distributed training (its head "
                         "gradient is not all-reduced); run it in one process")
    out = Path(out_dir) if out_dir is not None else None
    last_path = out / "last.pt" if out else None
    if out and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        holds_run = (out / "last.pt").exists() or (out / "best.pt").exists()
        if holds_run and not (resume or overwrite):
            raise RunExistsError(f"{out} already holds a run (last.pt/best.pt); pass resume to "
                                 "continue it, overwrite to replace it, or choose another out")
        if resume and not (out / "last.pt").exists():
            if (out / "best.pt").exists() and cfg.checkpoint == "best":
                raise ValueError(f"{out} holds only best.pt (checkpoint=best): nothing to resume")
            log(f"resume: no checkpoint in {out}, starting from scratch")
            resume = False
    if world > 1:
        flag = torch.tensor([int(resume)])
        torch.distributed.broadcast(flag, 0)
        resume = bool(flag.item())

    seed_everything(cfg.seed)
    model.to(device)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt, step = build_stepper(method, model.parameters(), bins, cfg,
                              model=model if cfg.bn_second_pass == "freeze" else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    first_ctx = net.no_sync if (world > 1 and cfg.scope == "local") else None

    best_metric, best_epoch, start_epoch = math.inf, -1, 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    train_seconds = 0.0
    if resume:
        ck = load_checkpoint(last_path, map_location=device)
        _check_same_config(ck.get("config", {}), cfg)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        best_metric, best_epoch = ck["best_metric"], ck["best_epoch"]
        history, train_seconds = ck["history"], ck["train_seconds"]
        start_epoch = ck["epoch"] + 1
        if ck.get("best_state") is not None:
            best_state = ck["best_state"]
        _set_rng_state(ck["rng"])
        if rank == 0:
            log(f"resumed from {last_path} at epoch {start_epoch}/{cfg.epochs}")

    writer = _tensorboard(out) if (out and rank == 0) else None
    csv_path = out / "log.csv" if (out and rank == 0) else None

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        train_loss = train_one_epoch(
            net, train_data, step, cfg, epoch=epoch, device=device, target_stats=target_stats,
            scaler=scaler, first_pass_context=first_ctx,
            desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}")
        sched.step()
        train_seconds += time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss}
        if rank == 0:
            if val_data is not None:
                rep = evaluate(model, val_data, bins, device=device,
                               batch_size=cfg.eval_batch_size, target_stats=target_stats,
                               many=cfg.many, few=cfg.few, depth=depth, balance=cfg.balance,
                               amp=cfg.amp, num_workers=cfg.num_workers)
                row.update({f"val_{m}": rep["all"][m] for m in ("mae", "bmae", "gm", "rmse")})
                row["val_few_mae"] = rep["few"]["mae"]
                metric = rep["all"][cfg.select_by] if cfg.select_by != "last" else -epoch
            else:
                metric = -epoch
            improved = metric < best_metric
            if improved:
                best_metric, best_epoch = metric, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            log(_log_line(row, improved))
            if csv_path:
                _append_csv(csv_path, row)
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, float) and math.isfinite(v):
                        writer.add_scalar(k, v, epoch + 1)
            if out and cfg.checkpoint != "none":
                ck = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                      "scheduler": sched.state_dict(),
                      "scaler": scaler.state_dict() if scaler is not None else None,
                      "epoch": epoch, "best_metric": best_metric, "best_epoch": best_epoch,
                      "history": history, "train_seconds": train_seconds, "rng": _rng_state(),
                      "config": cfg.to_dict(), "bins": bins.to_dict(),
                      "target_stats": target_stats, "meta": meta or {},
                      "best_state": best_state if cfg.checkpoint == "all" else None}
                if improved:
                    _atomic_save({"model": model.state_dict(), "epoch": epoch,
                                  "config": cfg.to_dict(), "bins": bins.to_dict(),
                                  "target_stats": target_stats, "meta": meta or {},
                                  "val": rep if val_data is not None else None}, out / "best.pt")
                if cfg.checkpoint == "all":
                    _atomic_save(ck, last_path)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
        if world > 1:
            torch.distributed.barrier()
    if writer is not None:
        writer.close()

    result_test, per_bin = None, None
    val_rep = None
    if rank == 0:
        if best_state is not None:
            model.load_state_dict(best_state)
        if val_data is not None:
            val_rep = evaluate(model, val_data, bins, device=device,
                               batch_size=cfg.eval_batch_size, target_stats=target_stats,
                               many=cfg.many, few=cfg.few, depth=depth, balance=cfg.balance,
                               amp=cfg.amp, num_workers=cfg.num_workers)
        if test_data is not None:
            result_test, per_bin = evaluate(
                model, test_data, bins, device=device, batch_size=cfg.eval_batch_size,
                target_stats=target_stats, many=cfg.many, few=cfg.few, depth=depth,
                balance=cfg.balance, amp=cfg.amp, num_workers=cfg.num_workers, per_bin=True)
    return FitResult(best_epoch=best_epoch, val=val_rep or {}, test=result_test,
                     test_per_bin=per_bin, history=history, train_seconds=train_seconds,
                     out_dir=str(out) if out else None)


def _check_same_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    ignore = {"progress", "num_workers", "device", "eval_batch_size", "epochs"}
    diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items()
            if k not in ignore and k in saved and saved[k] != v}
    if diff:
        detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume: the checkpoint was trained with another config "
                         f"({detail})")


def _log_line(row: dict[str, Any], improved: bool) -> str:
    parts = [f"epoch {row['epoch']:>3}", f"lr {row['lr']:.3g}", f"loss {row['train_loss']:.4f}"]
    for k in ("val_mae", "val_bmae", "val_gm", "val_few_mae"):
        if k in row and row[k] is not None and math.isfinite(row[k]):
            parts.append(f"{k} {row[k]:.4g}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts) + ("  *" if improved else "")


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    if not new:  # a resumed run: drop rows at or after this epoch (the killed run's tail)
        with path.open() as f:
            old = list(csv.DictReader(f))
        kept = [r for r in old if int(r["epoch"]) < row["epoch"]]
        if len(kept) != len(old):
            _write_csv(path, kept, list(row))
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def _write_csv(path: Path, rows: list[dict[str, Any]], header: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(log_dir=str(out / "tb"))
