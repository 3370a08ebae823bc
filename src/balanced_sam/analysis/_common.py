"""Shared plumbing of the analysis tools: loss names, subsets, mini-batches, model state.

Everything here is private to :mod:`balanced_sam.analysis`; :func:`select` is re-exported.

Data
    The analysis takes either tensors ``inputs`` (first dimension = samples) with ``targets``
    (one label per sample, in original units), or ``targets=None`` and an iterable of
    ``(x, y)`` batches (a ``DataLoader``; extra items after ``y`` are ignored). An iterable is
    read once per pass, so it must yield the same samples in the same order every time (no
    shuffling, no random augmentation), otherwise the estimates are not those of one loss.

Losses
    ``loss_fn(pred, target)`` returns one loss per sample (shape ``(n,)``; extra trailing
    dimensions are averaged). The loss of a subset ``S`` is the mean ``(1/|S|) sum_{i in S} l_i``;
    because the model runs in eval mode, ``l_i`` depends on sample ``i`` only, so summing over
    mini-batches and dividing by ``|S|`` at the end is exact. Losses that couple the samples of a
    batch (the batch form of Balanced MSE) are not separable and are not supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from balanced_sam.bins import LabelBins, check_region
from balanced_sam.losses import LOSSES, get_loss, l1_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: the analysis' own spellings of the library's loss names
_LOSS_ALIASES = {"mae": "l1", "l2": "mse"}


def resolve_loss(loss_fn: LossFn | str | None) -> tuple[LossFn, str]:
    """The per-sample loss and a name for it.

    ``None`` means L1. A string names a loss of :func:`balanced_sam.losses.get_loss` (``"mae"``
    and ``"l2"`` are accepted for ``"l1"`` and ``"mse"``); the batch form of Balanced MSE is
    refused (its per-sample values depend on the rest of the batch).
    """
    if loss_fn is None:
        return l1_loss, "l1"
    if isinstance(loss_fn, str):
        name = loss_fn.lower()
        if name in ("bmse", "balanced_mse"):
            raise ValueError("loss_fn: the batch form of Balanced MSE couples the samples of a "
                             "batch, so a subset's loss is not a sum of per-sample losses; "
                             "analyse with 'l1' or 'mse'")
        try:
            return get_loss(_LOSS_ALIASES.get(name, name)), name
        except ValueError:
            raise ValueError(f"loss_fn: unknown loss name {loss_fn!r}; give a callable "
                             f"(pred, target) -> per-sample losses or one of "
                             f"{sorted(set(LOSSES) - {'bmse'} | set(_LOSS_ALIASES))}") from None
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, a loss name or None, got {type(loss_fn)}")
    return loss_fn, getattr(loss_fn, "__name__", type(loss_fn).__name__)


def align(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reshape ``pred`` to ``target``'s shape when they hold the same number of values
    (a ``(n, 1)`` head output against ``(n,)`` labels)."""
    if pred.shape != target.shape and pred.numel() == target.numel():
        return pred.reshape(target.shape)
    return pred


def per_sample(values: torch.Tensor, n: int, what: str = "loss_fn") -> torch.Tensor:
    """Reduce per-element values to one per sample: shape ``(n,)`` (mean over trailing dims)."""
    if values.dim() == 0 or values.shape[0] != n:
        raise ValueError(f"{what} must return one value per sample (first dimension {n}), got "
                         f"shape {tuple(values.shape)}; use an unreduced (per-sample) loss")
    if values.dim() > 1:
        values = values.reshape(n, -1).mean(dim=1)
    return values


def sample_losses(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one batch; per-sample losses ``(n,)`` and the aligned predictions."""
    pred = align(model(x), y)
    return per_sample(loss_fn(pred, y), y.shape[0]), pred


# ---------------------------------------------------------------------------------- subsets
def checked_regions(regions: Sequence[str], bins: LabelBins | None) -> list[str]:
    """The regions of an analysis, each once in the order given, each a region name; all but
    ``"all"`` need ``bins``."""
    out = list(dict.fromkeys(regions))
    for r in out:
        if check_region(r) != "all" and bins is None:
            raise ValueError(f"region {r!r} needs bins (a LabelBins of the training labels)")
    return out


def _as_1d_targets(targets: Any) -> torch.Tensor:
    t = targets if isinstance(targets, torch.Tensor) else torch.as_tensor(np.asarray(targets))
    if t.dim() > 1 and t[0].numel() == 1:
        t = t.reshape(-1)
    return t


def select(
    targets: Any,
    bins: LabelBins | None = None,
    region: str | None = None,
    bin_ids: Sequence[int] | torch.Tensor | None = None,
    mask: Any = None,
    *,
    many: int | None = None,
    few: int | None = None,
) -> torch.Tensor:
    """Boolean mask (shape ``(n,)``, on the targets' device) of the samples in a subset.

    The subset is the intersection of the criteria given: ``region`` (``"all"``, ``"many"``,
    ``"medium"`` or ``"few"``, by the training count of each target's bin, thresholds ``many`` /
    ``few`` as in :meth:`LabelBins.region_mask`; ``None``: the bins' own), ``bin_ids`` (the
    targets whose bin index is in the list) and ``mask`` (a boolean mask over the samples). With
    none of them every sample is selected. ``region`` (other than ``"all"``) and ``bin_ids``
    need ``bins``.
    """
    t = _as_1d_targets(targets)
    n = t.shape[0] if t.dim() > 0 else 1
    out = torch.ones(n, dtype=torch.bool, device=t.device)
    if region is not None and check_region(region) != "all":
        if bins is None:
            raise ValueError(f"region={region!r} needs bins (a LabelBins of the training labels)")
        m, f = bins.thresholds(many, few)
        out &= bins.region_mask(t, region, many=m, few=f).reshape(n)
    if bin_ids is not None:
        if bins is None:
            raise ValueError("bin_ids needs bins (a LabelBins of the training labels)")
        ids = torch.as_tensor(bin_ids, dtype=torch.int64).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= bins.num_bins):
            raise ValueError(f"bin_ids must lie in [0, {bins.num_bins - 1}], got {ids.tolist()}")
        idx = bins.bin_index(t).reshape(n)
        out &= torch.isin(idx, ids.to(idx.device))
    if mask is not None:
        m = torch.as_tensor(mask, device=t.device)
        if m.dtype != torch.bool:
            raise TypeError(f"mask must be boolean, got dtype {m.dtype}")
        if m.reshape(-1).shape[0] != n:
            raise ValueError(f"mask must have one entry per sample ({n}), got {tuple(m.shape)}")
        out &= m.reshape(-1)
    return out


class Subset:
    """A subset specification evaluated batch by batch (for iterables of batches).

    ``region`` / ``bin_ids`` depend only on each target, so they are evaluated per batch; a global
    ``mask`` is sliced at the batch's offset in the pass.
    """

    def __init__(self, bins: LabelBins | None = None, region: str | None = None,
                 bin_ids: Sequence[int] | torch.Tensor | None = None, mask: Any = None,
                 many: int | None = None, few: int | None = None) -> None:
        if region is not None:
            check_region(region)
        if (region not in (None, "all") or bin_ids is not None) and bins is None:
            raise ValueError("region/bin_ids need bins (a LabelBins of the training labels)")
        self.bins, self.region, self.bin_ids = bins, region, bin_ids
        self.mask = None if mask is None else torch.as_tensor(mask).reshape(-1)
        if self.mask is not None and self.mask.dtype != torch.bool:
            raise TypeError(f"mask must be boolean, got dtype {self.mask.dtype}")
        self.many, self.few = many, few

    @property
    def is_all(self) -> bool:
        return self.region in (None, "all") and self.bin_ids is None and self.mask is None

    def __call__(self, y: torch.Tensor, offset: int) -> torch.Tensor:
        n = y.shape[0]
        m = None
        if self.mask is not None:
            if offset + n > self.mask.shape[0]:
                raise ValueError(f"mask has {self.mask.shape[0]} entries but the data holds more "
                                 "samples")
            m = self.mask[offset:offset + n]
        return select(y.detach(), self.bins, self.region, self.bin_ids, m,
                      many=self.many, few=self.few)


# ---------------------------------------------------------------------------------- data
class Data:
    """Tensors ``(inputs, targets)`` or an iterable of ``(x, y)`` batches, read in mini-batches."""

    def __init__(self, inputs: Any, targets: Any = None, batch_size: int = 256) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        if targets is None:
            if isinstance(inputs, torch.Tensor) or not isinstance(inputs, Iterable):
                raise TypeError("targets is None, so inputs must be an iterable of (x, y) "
                                "batches (e.g. a DataLoader); give targets with tensor inputs")
            self.inputs, self.targets = inputs, None
        else:
            x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)
            y = _as_1d_targets(targets)
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"inputs hold {x.shape[0]} samples but targets {y.shape[0]}")
            self.inputs, self.targets = x, y

    @property
    def is_tensor(self) -> bool:
        return self.targets is not None

    def __len__(self) -> int:
        """Number of samples (tensor data only)."""
        if self.targets is None:
            raise TypeError("the number of samples of an iterable is known only after a pass")
        return int(self.targets.shape[0])

    def num_batches(self, subset_size: int | None = None) -> int | None:
        if self.is_tensor:
            n = len(self) if subset_size is None else subset_size
            return -(-n // self.batch_size)
        try:
            return len(self.inputs)  # type: ignore[arg-type]
        except TypeError:
            return None

    def batches(self, device: torch.device, indices: torch.Tensor | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Yield ``(x, y, offset)`` on ``device``; ``indices`` restricts tensor data to those
        samples (in order); ``offset`` is the position of the batch's first sample in the pass."""
        if self.is_tensor:
            n = len(self) if indices is None else int(indices.numel())
            for start in range(0, n, self.batch_size):
                if indices is None:
                    x = self.inputs[start:start + self.batch_size]
                    y = self.targets[start:start + self.batch_size]
                else:
                    idx = indices[start:start + self.batch_size]
                    x = self.inputs.index_select(0, idx.to(self.inputs.device))
                    y = self.targets.index_select(0, idx.to(self.targets.device))
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), start
            return
        offset = 0
        for batch in self.inputs:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError("each batch of the iterable must be an (x, y) pair")
            x, y = batch[0], _as_1d_targets(batch[1])
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), offset
            offset += int(y.shape[0])


# ---------------------------------------------------------------------------------- model state
def model_device_dtype(params: Sequence[torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    if not params:
        raise ValueError("the model has no parameters to analyse")
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) > 1:
        raise ValueError("all parameters must live on one device, found "
                         f"{sorted(map(str, devices))}")
    if len(dtypes) > 1:
        raise ValueError(f"all parameters must share one dtype, found {sorted(map(str, dtypes))}")
    return next(iter(devices)), next(iter(dtypes))


@contextlib.contextmanager
def eval_mode(model: nn.Module, check_unchanged: bool = True) -> Iterator[None]:
    """Run the body with ``model.eval()``, restore the previous mode afterwards, and (with
    ``check_unchanged``) raise if any parameter or buffer was modified in place meanwhile
    (compared through the tensors' autograd version counters, at no cost)."""
    was_training = model.training
    tensors = [*model.parameters(), *model.buffers()]
    versions = [t._version for t in tensors]
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
    if check_unchanged:
        changed = [i for i, (t, v) in enumerate(zip(tensors, versions)) if t._version != v]
        if changed:
            raise RuntimeError(f"{len(changed)} parameter/buffer tensor(s) were modified in place "
                               "during the analysis; the model or loss_fn must not change them")
