"""The memory layout of a run's model, chosen by measurement (``train.channels_last: auto``).

Whether ``torch.channels_last`` pays depends on the model, the input size and the device, not
on the device alone: on this project's 2-core CPU the default bench's SmallCNN (8 and 16
channels, 28 x 28, batch 128) ran an SGD step in about 0.6x the time in ``channels_last``
(``benchmarks/cpu_loop.py``), while a ResNet-18's forward and backward were about 8% slower
in it (one thread: 259 vs 239 ms at 32 px, batch 64; 555 vs 517 ms at 112 px, batch 16). So
``auto`` times both layouts on the run's own model, device, batch size and input shape before
training (:func:`measure_layout`) and keeps the faster one.

* The probe trains copies of the model (a forward and a backward of a random batch of the
  training batch's shape, under the run's autocast), alternating the two layouts round by round
  so that a slow phase of the machine hits both alike, and compares the medians. The run's own
  model, its optimizer and every random stream are left untouched (the probe runs inside
  :func:`torch.random.fork_rng` on a generator of its own), so the training that follows is the
  one an explicit ``channels_last: true`` or ``false`` gives.
* ``channels_last`` is kept only when it is at least :data:`MARGIN` faster: near a tie the
  decision would follow the noise of the machine, and the layout moves the last digits of the
  figures (the two layouts sum in different orders), so near a tie the run stays in the layout
  its inputs arrive in.
* A model without a 2-d convolution, or inputs that are not ``(C, H, W)`` images, are not probed
  (the layout changes nothing there): ``false``.
* A measurement is remembered for the machine (:func:`cache_path`: a JSON file of decisions
  keyed by the torch version, the processor or GPU, the thread count, the model's parameter
  shapes, the input shape, the batch size and the precision), so that the same run started
  twice on one machine takes the same layout, and so the same digits; ``BSAM_LAYOUT_CACHE=off``
  measures every time, ``BSAM_LAYOUT_CACHE=FILE`` keeps them elsewhere. The file is a cache: one
  that cannot be read is measured again, one that cannot be written is left as it is.
* The decision is recorded: in the run's resolved config (``channels_last: true/false``), in
  its checkpoints (``layout``) and in :class:`~balanced_sam.train.FitResult`. A resumed run
  with ``auto`` keeps the decision of its checkpoint when it resumes on the same kind of device,
  so that it continues as the unbroken run would; a bench decides once for all its runs
  (:mod:`balanced_sam.bench.run`) and keeps that decision when resumed.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["MARGIN", "LayoutChoice", "choose_layout", "measure_layout", "input_shape",
           "has_conv2d", "cache_path", "probe_key", "run_layout", "apply_layout",
           "resumed_layout", "set_up_layout"]

#: ``channels_last`` is chosen only when its median step is at least this much faster
MARGIN = 1.10
#: timed rounds per layout (after one warm-up step each); fewer when a step is slow
ROUNDS = 5
#: a probe stops adding rounds once it has spent this many seconds (at least 2 rounds)
BUDGET_S = 20.0


@dataclass(frozen=True)
class LayoutChoice:
    """What a run decided for ``channels_last`` and why. ``requested``: the config's value;
    ``reason``: ``given`` (true/false in the config), ``measured``, ``resumed`` (a checkpoint's
    decision kept), ``bench`` (the bench's decision for its runs), ``no-conv2d`` /
    ``not-images`` (nothing to gain, not probed); ``nchw_ms`` / ``channels_last_ms``: the
    probe's median step times; ``device``: the device type it was decided on."""

    channels_last: bool
    requested: bool | str
    reason: str
    device: str
    nchw_ms: float | None = None
    channels_last_ms: float | None = None
    rounds: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayoutChoice:
        if not isinstance(d["channels_last"], bool):  # ("false" would read as True)
            raise ValueError(f"channels_last must be true or false, got {d['channels_last']!r}")
        return cls(channels_last=d["channels_last"], requested=d.get("requested", "auto"),
                   reason=str(d.get("reason", "measured")), device=str(d.get("device", "cpu")),
                   nchw_ms=d.get("nchw_ms"), channels_last_ms=d.get("channels_last_ms"),
                   rounds=int(d.get("rounds") or 0))

    def describe(self) -> str:
        """One line for a log: the layout and, when measured, the two times."""
        name = "channels_last" if self.channels_last else "NCHW"
        if self.nchw_ms is not None and self.channels_last_ms is not None:
            when = "measured" if self.reason == "measured" else f"{self.reason}, measured"
            return (f"layout {name} ({when} on {self.device}: NCHW {self.nchw_ms:.1f} ms, "
                    f"channels_last {self.channels_last_ms:.1f} ms per step; channels_last is "
                    f"kept when >= {MARGIN:.2f}x faster)")
        why = {"given": "as configured", "bench": "the layout of this folder's earlier runs",
               "resumed": "the checkpoint's", "no-conv2d": "no 2-d convolution",
               "not-images": "the inputs are not images"}.get(self.reason, self.reason)
        return f"layout {name} ({why})"


def has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def input_shape(data: Any, pipeline: Any = None) -> tuple[int, ...] | None:
    """The shape of one training input, ``(C, H, W)`` for images: of the device pipeline's
    batches, of tensor data ``(x, y[, mask])``, or of a dataset's first sample; ``None`` when it
    cannot be told."""
    if pipeline is not None:
        return (3, pipeline.img_size, pipeline.img_size)
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        return tuple(data[0].shape[1:])
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:  # (a random augmentation of the sample must not move the run's random streams)
        with torch.random.fork_rng():
            sample = data[0]
    except Exception:  # noqa: BLE001 - any dataset that cannot be indexed: not probed
        return None
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    if isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], torch.Tensor):
        return tuple(sample[0].shape)
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _total(out: Any) -> torch.Tensor:
    """A scalar of a model's output (a tensor, or the tensors of a tuple / mapping)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    items = list(out.values()) if isinstance(out, Mapping) else list(out)
    parts = [_total(o) for o in items if isinstance(o, (torch.Tensor, Mapping, tuple, list))]
    if not parts:
        raise TypeError(f"the model returned {type(out).__name__} without a tensor")
    return torch.stack(parts).sum()


def measure_layout(model: nn.Module, shape: tuple[int, ...], batch_size: int,
                   device: torch.device | str, *,
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   rounds: int = ROUNDS, budget_s: float = BUDGET_S,
                   clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, int]:
    """Median milliseconds of a forward and backward step of copies of ``model`` on a random
    ``(batch_size, *shape)`` batch on ``device``: ``(nchw_ms, channels_last_ms, rounds)``.
    ``model`` and the random streams are left as they were."""
    device = torch.device(device)
    autocast = autocast or contextlib.nullcontext
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        g = torch.Generator().manual_seed(0)
        x = torch.randn((batch_size, *shape), generator=g).to(device)
        variants = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            m = copy.deepcopy(model).to(device).to(memory_format=fmt)
            m.train()
            variants.append((m, x.contiguous(memory_format=fmt)))

        def step(m: nn.Module, inp: torch.Tensor) -> float:
            _sync(device)
            t0 = clock()
            with autocast():
                loss = _total(m(inp))
            loss.backward()
            _sync(device)
            m.zero_grad(set_to_none=True)
            return clock() - t0

        t_start = clock()
        for m, inp in variants:  # warm-up: kernels chosen, memory allocated
            step(m, inp)
        times: list[list[float]] = [[], []]
        done = 0
        while done < max(2, rounds):
            order = (0, 1) if done % 2 == 0 else (1, 0)
            for i in order:
                times[i].append(step(*variants[i]))
            done += 1
            if done >= 2 and clock() - t_start > budget_s:
                break
    return (1000 * statistics.median(times[0]), 1000 * statistics.median(times[1]), done)


def cache_path() -> Path | None:
    """Where measured decisions are remembered: ``$BSAM_LAYOUT_CACHE`` (``off``: nowhere), else
    ``$XDG_CACHE_HOME/balanced-sam/layouts.json`` (``~/.cache`` without it)."""
    env = os.environ.get("BSAM_LAYOUT_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "balanced-sam" / "layouts.json"


def _processor(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def probe_key(model: nn.Module, shape: tuple[int, ...], batch_size: int,
              device: torch.device | str, amp: str = "none") -> str:
    """What a measurement depends on, hashed: torch, the processor, threads, the model's
    parameter and buffer shapes, the input, the batch and the precision."""
    device = torch.device(device)
    what = {"torch": torch.__version__, "device": device.type, "processor": _processor(device),
            "threads": torch.get_num_threads(), "model": type(model).__name__,
            "tensors": [[n, list(t.shape)] for n, t in (*model.named_parameters(),
                                                        *model.named_buffers())],
            "shape": list(shape), "batch": int(batch_size), "amp": amp}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(path: Path, key: str, choice: LayoutChoice) -> None:
    from balanced_sam.io import write_json  # (io imports nothing of this module)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.is_symlink() or path.is_symlink():
            return  # a cache is not written through a link
        write_json({**_read_cache(path), key: choice.to_dict()}, path)
    except OSError:
        pass  # a read-only or full home: the next run measures again


def choose_layout(requested: bool | str, model: nn.Module, shape: tuple[int, ...] | None,
                  batch_size: int, device: torch.device | str, *, amp: str = "none",
                  measure: Callable[..., tuple[float, float, int]] | None = None,
                  cache: Path | None | bool = True) -> LayoutChoice:
    """The layout of a run: ``requested`` ``True`` / ``False`` as given; ``auto`` measured
    (:func:`measure_layout`) where it can matter, ``channels_last`` kept when :data:`MARGIN`
    faster. ``amp``: the run's precision (``none``, ``bf16``, ``fp16``), the probe's autocast.
    ``cache``: ``True`` for :func:`cache_path`, a path, or ``None`` / ``False`` (not
    remembered)."""
    kind = torch.device(device).type
    if requested is not True and requested is not False and requested != "auto":
        raise ValueError(f"train.channels_last must be true, false or auto, got {requested!r}")
    if requested != "auto":
        return LayoutChoice(bool(requested), requested, "given", kind)
    if not has_conv2d(model):
        return LayoutChoice(False, requested, "no-conv2d", kind)
    if shape is None or len(shape) != 3:
        return LayoutChoice(False, requested, "not-images", kind)
    path = cache_path() if cache is True else (cache or None)
    key = probe_key(model, shape, batch_size, device, amp) if path is not None else ""
    if path is not None:
        known = _read_cache(path).get(key)
        if isinstance(known, dict):
            try:
                return replace(LayoutChoice.from_dict(known), reason="cached")
            except (KeyError, TypeError, ValueError):
                pass  # not a record of ours: measured again
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if amp in ("bf16", "fp16"):
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(kind, dtype=dtype)

    nchw, cl, rounds = (measure or measure_layout)(model, shape, batch_size, device,
                                                   autocast=autocast)
    choice = LayoutChoice(cl * MARGIN <= nchw, requested, "measured", kind, round(nchw, 3),
                          round(cl, 3), rounds)
    if path is not None:
        _remember(path, key, choice)
    return choice


def run_layout(requested: bool | str, model: nn.Module, shape: tuple[int, ...] | None,
               batch_size: int, device: torch.device, amp: str, world: int = 1) -> LayoutChoice:
    """A training run's layout (:func:`choose_layout`); under DDP (``world`` > 1) rank 0
    measures and every rank follows, so that the replicas sum in the same order."""
    distributed = world > 1 and requested == "auto"
    rank = torch.distributed.get_rank() if distributed else 0
    if distributed and rank != 0:
        choice = LayoutChoice(False, "auto", "measured", device.type)
    else:
        choice = choose_layout(requested, model, shape, batch_size, device, amp=amp)
    if distributed:
        flag = torch.tensor([int(choice.channels_last)],
                            device=device if device.type == "cuda" else "cpu")
        torch.distributed.broadcast(flag, 0)
        choice = replace(choice, channels_last=bool(flag.item()))
    return choice


def apply_layout(model: nn.Module, pipeline: Any, channels_last: bool) -> None:
    """Put ``model`` (and the batches of a device ``pipeline``) in the chosen layout."""
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if pipeline is not None:
        pipeline.set_channels_last(channels_last)


def resumed_layout(now: LayoutChoice, saved: Any, model: nn.Module, pipeline: Any = None
                   ) -> LayoutChoice:
    """The layout a resumed run trains on in: with ``auto``, its checkpoint's ``saved``
    decision when it was taken on the same kind of device (the resumed run then sums in the
    order the unbroken one did), ``model`` moved into it; else ``now``."""
    if now.requested != "auto" or not isinstance(saved, Mapping):
        return now
    try:
        before = LayoutChoice.from_dict(saved)
    except (KeyError, TypeError, ValueError):
        return now  # not a layout record of ours: the new measurement stands
    if before.device != now.device:
        return now
    if before.channels_last != now.channels_last:
        apply_layout(model, pipeline, before.channels_last)
    return replace(before, reason="resumed")


def set_up_layout(requested: bool | str, model: nn.Module, data: Any, pipeline: Any,
                  batch_size: int, device: torch.device, amp: str, world: int = 1,
                  log: Callable[[str], None] | None = None) -> LayoutChoice:
    """What ``fit`` does: decide the layout of a run on ``data`` (:func:`run_layout`), say
    what was measured (``log``), put the model and the pipeline's batches in it."""
    shape = input_shape(data, pipeline) if requested == "auto" else None
    choice = run_layout(requested, model, shape, batch_size, device, amp, world)
    if log is not None and choice.reason in ("measured", "cached"):
        log(choice.describe())
    apply_layout(model, pipeline, choice.channels_last)
    return choice
