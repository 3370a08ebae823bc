"""What a training run does on its device besides the model: the ``auto`` precision and memory
layout, and the image pipeline that augments whole batches where the model runs.

* :func:`auto_settings` decides ``train.amp: auto`` (bf16 on a CUDA device that supports it,
  none elsewhere): ``auto`` rather than a bf16 default, because a CPU run refuses bf16
  autocast. Its ``channels_last`` rule (on for CUDA, off elsewhere) is only the guess of tools
  that have no model to time (``benchmarks/throughput.py``'s printout); a training run decides
  ``train.channels_last: auto`` by measuring both layouts (:mod:`balanced_sam.layout`).
* :func:`augment_mode` decides ``data.augment: auto`` of the image datasets: ``device`` on a CUDA
  device, ``cpu`` elsewhere. On a CPU the batch augmentation would run in the training process,
  in series with the model, where the PIL transforms run in parallel DataLoader workers; the
  model's step dominates there anyway, and the PIL path is the recipe itself.
* :class:`DevicePipeline` is that device path: the DataLoader workers read ``uint8`` pictures from
  a cache filled before training (:class:`~balanced_sam.data.images.CachedPictures`); after the
  copy to the device, :meth:`DevicePipeline.train_batch` applies
  :class:`~balanced_sam.data.gpu_augment.BatchAugment` once per batch, drawing its parameters
  from a generator seeded by ``(seed, epoch, step, rank)`` (:func:`batch_seed`): a resumed run
  sees the same augmentations as an unbroken one, whatever the number of workers.
  :meth:`DevicePipeline.eval_batch` is the test transform (``Resize`` + ``CenterCrop``, an exact
  slice of the cached centre squares).

:func:`device_pipeline` builds it for a run's training data, or returns ``None`` when the data
have no device path (tables, NYUD2-DIR, a custom dataset) or the run augments on the CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from balanced_sam.data.gpu_augment import BatchAugment, BatchEvalTransform
from balanced_sam.data.images import AUGMENT_MODES

__all__ = ["auto_settings", "augment_mode", "batch_seed", "DevicePipeline", "device_pipeline",
           "AUGMENT_MODES"]


def auto_settings(amp: str, channels_last: bool | str, device: str | torch.device,
                  *, bf16_supported: bool | None = None) -> tuple[str, bool]:
    """``(amp, channels_last)`` with ``auto`` decided for ``device``: ``bf16`` and ``True`` on a
    CUDA device (``none`` when it has no bf16 support), ``none`` and ``False`` elsewhere. Other
    values pass through."""
    cuda = torch.device(device).type == "cuda"
    if amp == "auto":
        if bf16_supported is None:
            bf16_supported = cuda and torch.cuda.is_bf16_supported()
        amp = "bf16" if cuda and bf16_supported else "none"
    if channels_last == "auto":
        channels_last = cuda
    return amp, bool(channels_last)


def augment_mode(mode: str, device: str | torch.device) -> str:
    """``device`` or ``cpu``: where a run on ``device`` augments images for ``data.augment:
    mode`` (``auto`` is ``device`` on CUDA, ``cpu`` elsewhere)."""
    if mode not in AUGMENT_MODES:
        raise ValueError(f"data.augment must be one of {', '.join(AUGMENT_MODES)}, got {mode!r}")
    if mode == "auto":
        return "device" if torch.device(device).type == "cuda" else "cpu"
    return mode


def batch_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The seed of the augmentation generator of one batch: a 63-bit hash of ``(seed, epoch,
    step, rank)``, so batches, epochs and data-parallel replicas draw independent streams and a
    resumed run draws what an unbroken run would."""
    key = f"bsam-augment/{int(seed)}/{int(epoch)}/{int(step)}/{int(rank)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


class DevicePipeline:
    """The device path of an image dataset with a picture store (see the module docstring).

    ``train``: the training split as ``uint8`` pictures (a filled
    :class:`~balanced_sam.data.images.CachedPictures`); ``img_size`` / ``side``: the network
    input and the stored square side; ``dtype`` / ``channels_last``: of the batches handed to
    the model; ``processes``: for filling the evaluation splits' caches.
    """

    def __init__(self, train: Any, device: torch.device, *, img_size: int, side: int,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 seed: int = 0, rank: int = 0, processes: int = 1, progress: bool = False
                 ) -> None:
        self.train = train
        self.device = torch.device(device)
        self.img_size, self.side = int(img_size), int(side)
        self.seed, self.rank = int(seed), int(rank)
        self.processes, self.progress = max(1, int(processes)), bool(progress)
        self.augment = BatchAugment(img_size, dtype=dtype, channels_last=channels_last)
        self.evaluation = BatchEvalTransform(img_size, side, dtype=dtype,
                                             channels_last=channels_last)
        self._views: dict[int, Any] = {}

    def set_channels_last(self, channels_last: bool) -> None:
        """The memory layout of the batches handed to the model (the run's decision)."""
        self.augment.channels_last = self.evaluation.channels_last = bool(channels_last)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.train)} training pictures on {self.device}, "
                f"{self.augment})")

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        # (B, S, S, 3) -> (B, 3, S, S): a view, channels_last in memory
        return images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)

    def train_batch(self, batch: Mapping[str, torch.Tensor], *, epoch: int, step: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of a training batch: augmented on the device with the
        generator of ``(seed, epoch, step, rank)``."""
        g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, step, self.rank))
        x = self.augment(self._images(batch["image"]), sizes=batch["size"], generator=g)
        return x, batch["target"]

    def eval_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of an evaluation batch, ``(pictures, targets)`` or a
        :class:`~balanced_sam.data.images.CachedPictures` batch (centre squares -> the test
        crop, an exact slice)."""
        images, targets = ((batch["image"], batch["target"]) if isinstance(batch, Mapping)
                           else batch)
        return self.evaluation(self._images(images)), targets

    def view(self, data: Any) -> tuple[Any, Callable[[Any], Any] | None]:
        """``((pictures, targets), eval_batch)`` for an evaluation split with a picture store of
        this geometry, its cache filled on first use; the pictures are one tensor on the cache's
        memory map, sliced in order without DataLoader workers (none to start per evaluation).
        Other data: ``(data, None)``."""
        store = getattr(data, "store", None)
        if (store is None or not hasattr(data, "pictures") or store.whole
                or (store.img_size, store.side) != (self.img_size, self.side)):
            return data, None
        key = id(data)
        if key not in self._views:
            pictures = data.pictures(self.processes, self.progress)
            self._views[key] = (data, pictures.as_tensors())
        return self._views[key][1], self.eval_batch

    def prepare(self, *datasets: Any) -> None:
        """Fill the evaluation splits' caches now rather than at the first evaluation."""
        for data in datasets:
            if data is not None:
                self.view(data)


def device_pipeline(train_data: Any, device: torch.device, *, seed: int = 0, rank: int = 0,
                    world: int = 1, amp: str = "none", channels_last: bool = False,
                    processes: int = 1, progress: bool = False,
                    log: Callable[[str], None] = print) -> DevicePipeline | None:
    """The :class:`DevicePipeline` of a run's training data, or ``None`` (no device path, or
    ``data.augment`` decides ``cpu`` for ``device``).

    Rank 0 fills the training split's cache (``processes`` processes) before the other replicas
    read it. With ``augment: auto``, a cache that cannot be written (no room, no permission)
    falls back to the CPU path with a log line; with ``augment: device`` it is an error.
    """
    mode = getattr(train_data, "augment", None)
    store = getattr(train_data, "store", None)
    if mode is None or store is None or augment_mode(mode, device) != "device":
        return None
    try:
        pictures = train_data.pictures(processes, progress) if rank == 0 else None
    except OSError as exc:
        if mode == "device":
            raise
        log(f"augment: auto -> cpu (the picture cache cannot be written: {exc})")
        return None
    if world > 1:
        torch.distributed.barrier()
    if pictures is None:  # another replica: rank 0 filled the cache
        pictures = train_data.pictures(1)
    report = pictures.fill_report or {}
    if rank == 0:
        done = report.get("filled", 0.0)
        secs = report.get("seconds", 0.0)
        how = (f"{done:.0f} decoded now in {secs:.1f} s = {done / max(secs, 1e-9):.0f} img/s "
               f"with {min(processes, max(1, int(done)))} processes" if done
               else "already filled")
        log(f"augment: per batch on {device} (BatchAugment); {len(pictures)} training pictures "
            f"{store.side}x{store.side} in {store.prefix.parent} ({how})")
    return DevicePipeline(pictures, device, img_size=store.img_size, side=store.side,
                          dtype=torch.bfloat16 if amp == "bf16" else torch.float32,
                          channels_last=channels_last, seed=seed, rank=rank,
                          processes=processes, progress=progress)
