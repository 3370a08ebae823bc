"""Where a run runs: its device, its place in a ``torchrun`` process group, its random generators.

* :func:`resolve_device`: ``"auto"`` (this process's GPU, or the CPU) or a device checked to be
  available.
* :func:`init_distributed` joins the process group ``torchrun`` describes;
  :func:`rank_and_world` is this process's ``(rank, world size)`` (``(0, 1)`` alone).
* :func:`seed_everything` seeds Python, numpy and torch; :func:`rng_state` /
  :func:`set_rng_state` save and restore the generators' states as plain data (a checkpoint
  holds no numpy array), so a resumed run draws what an unbroken one would.

:mod:`balanced_sam.train` re-exports ``seed_everything``, ``resolve_device`` and
``init_distributed``.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from balanced_sam.config import DEVICES
from balanced_sam.errors import spell

__all__ = ["seed_everything", "rng_state", "set_rng_state", "resolve_device", "init_distributed",
           "rank_and_world"]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (user code may use the global RNG)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: this process's GPU (``cuda:LOCAL_RANK`` under torchrun) or the CPU; else one
    of ``cpu``, ``cuda``, ``cuda:N``, ``mps``, checked to be available."""
    if isinstance(device, torch.device):
        device = str(device)
    if not DEVICES.match(str(device)):
        raise ValueError(f"device {device!r} is not one this library runs on; use "
                         f"{spell('device', 'cpu')} (or auto, cuda, cuda:N, mps)")
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available; use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available; use cpu")
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


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process in the initialised process group; ``(0, 1)``
    without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rng_state() -> dict[str, Any]:
    """The random generators' states as plain data (a checkpoint holds no numpy array)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    st = {"python": random.getstate(),
          "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore the generators' states that :func:`rng_state` returned."""
    random.setstate(tuple(st["python"]))
    name, keys, *rest = st["numpy"]  # keys: a tensor (an older, trusted checkpoint: an array)
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), *rest))  # noqa: NPY002
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
