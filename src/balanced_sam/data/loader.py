"""Mini-batches for the training loop, epoch after epoch.

Tensor data are sliced directly. A ``Dataset`` is read through one ``DataLoader`` kept for the
whole run (persistent workers, prefetching, pinned memory on CUDA); every sample is read with
torch's generator seeded by ``(seed, epoch, index)``, so a random augmentation depends on
nothing else: not on the worker that reads it, the number of workers, or whether the run was
resumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["EpochLoader", "batches", "is_tensor_data"]


def is_tensor_data(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data)


def _num_samples(data: Any) -> int:
    return int(data[0].shape[0]) if is_tensor_data(data) else len(data)


def _epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int,
                 world_size: int) -> torch.Tensor:
    """The sample order of one epoch for one replica (``DistributedSampler``'s split)."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(n)
    if world_size > 1:
        per = math.ceil(n / world_size)
        pad = per * world_size - n
        if pad:
            order = torch.cat([order, order[:pad]])
        order = order[rank::world_size]
    return order


class _Order(torch.utils.data.Sampler):
    """The epoch's order as ``(index, seed)`` pairs; :meth:`set_epoch` moves to another epoch
    (the loader, and with it persistent workers, stays)."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = _epoch_order(self.n, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                             rank=self.rank, world_size=self.world_size)
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        return iter([(i, base + i) for i in order.tolist()])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)


class _Seeded(torch.utils.data.Dataset):
    """Reads sample ``i`` with torch's generator seeded by ``(seed, epoch, i)``: a random
    augmentation depends on nothing else (not on the worker, the number of workers, or whether
    the run was resumed), and the main process's generator is left untouched."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.data[index]


class EpochLoader:
    """Mini-batches of ``data`` epoch after epoch (see :func:`batches`).

    Tensor data are sliced directly. A ``Dataset`` is read through one ``DataLoader`` kept for the
    whole run: with workers they persist across epochs and prefetch ``prefetch_factor`` batches
    each; with ``pin_memory`` (on by default for a CUDA device) batches come in page-locked
    memory so the copy to the GPU overlaps computation.
    """

    def __init__(self, data: Any, batch_size: int, *, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 drop_last: bool = False, pin_memory: bool = False,
                 prefetch_factor: int = 2) -> None:
        self.data, self.batch_size, self.drop_last = data, batch_size, drop_last
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.tensors = is_tensor_data(data)
        self.loader: torch.utils.data.DataLoader | None = None
        if not self.tensors:
            self.order = _Order(len(data), shuffle, seed, rank, world_size)
            workers = num_workers > 0
            self.loader = torch.utils.data.DataLoader(
                _Seeded(data), batch_size=batch_size, sampler=self.order,
                num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
                persistent_workers=workers, prefetch_factor=prefetch_factor if workers else None,
                generator=torch.Generator().manual_seed(seed))  # leaves the global RNG alone

    def __len__(self) -> int:
        per = math.ceil(_num_samples(self.data) / self.world_size)
        return per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Sequence[torch.Tensor]]:
        if self.loader is not None:
            self.order.set_epoch(epoch)
            yield from self.loader
            return
        order = _epoch_order(_num_samples(self.data), shuffle=self.shuffle, seed=self.seed,
                             epoch=epoch, rank=self.rank, world_size=self.world_size)
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for i in range(0, stop, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield tuple(t[idx] for t in self.data)


def batches(data: Any, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
            rank: int = 0, world_size: int = 1, num_workers: int = 0,
            drop_last: bool = False, pin_memory: bool = False,
            prefetch_factor: int = 2) -> Iterator[Sequence[torch.Tensor]]:
    """Mini-batches of ``data`` for one epoch.

    ``data`` is a tuple of tensors (sliced directly: fast for tables and small images) or a
    ``Dataset`` (read through a ``DataLoader``). The order is a permutation drawn from a
    generator seeded with ``seed + epoch`` and split over replicas as ``DistributedSampler``
    does (``indices[rank::world_size]``, padded to equal length), so replica ``r`` of a
    ``world_size``-process run gets, batch by batch, its share of what a single process with
    ``world_size`` times the batch size gets. For many epochs use :class:`EpochLoader`, which
    keeps one loader (and its workers).
    """
    yield from EpochLoader(data, batch_size, shuffle=shuffle, seed=seed, rank=rank,
                           world_size=world_size, num_workers=num_workers, drop_last=drop_last,
                           pin_memory=pin_memory, prefetch_factor=prefetch_factor).epoch(epoch)
