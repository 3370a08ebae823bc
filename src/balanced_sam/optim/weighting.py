r"""The weighting of each pass of a sharpness-aware step, as one small object.

A step of SAM, BalancedSAM or ImbSAM runs passes over the same batch. Each pass reduces the
per-sample losses :math:`\ell_i` to :math:`\frac1B \sum_i w_i \ell_i` over the samples it counts,
with the weights :math:`w_i` of its scheme (:func:`balanced_sam.losses.weighted_mean`, the one
weighted mean of the package):

========== ======================================== =========================== ==============
pass       where                                    weights                     samples
========== ======================================== =========================== ==============
perturb    :math:`\theta` (sets :math:`\hat\epsilon`) ``perturbation``          all (tail)
update     :math:`\theta + \hat\epsilon`            ``update``                  all (tail)
head       :math:`\theta` (ImbSAM only)             ``update``                  head
tail       :math:`\theta` (ImbSAM's perturb pass)    ``update``                  tail
plain      :math:`\theta` (gradient reuse)           ``update``                  all
========== ======================================== =========================== ==============

``plain`` is the pass of gradient reuse (:mod:`balanced_sam.optim.reuse`): the one pass of an
in-between step, and the reference pass of a full step whose perturbation weighting differs
from the update's; it counts every sample, also with a head/tail split (the regulariser too).

With ``tail_below`` (ImbSAM) every pass weights with ``update`` and counts only its part of the
batch: the head (bins with at least ``tail_below`` training samples) or the tail; the
regulariser of a ``(losses, regulariser)`` pair goes into the head pass only. ``None`` is the
one word for "unweighted" (the string ``"none"`` is accepted by the constructor and turned
into ``None``; ``update="same"`` means the perturbation's scheme).

:class:`PassWeighting` also keeps what a step needs to say that a weighting was not applied:
the passes that ran and those whose losses went through :meth:`PassWeighting.reduce`. A step
that ran a pass needing weights without :meth:`~PassWeighting.reduce` warns once
(:class:`BalancingNotAppliedWarning`).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from balanced_sam.bins import SCHEMES, LabelBins
from balanced_sam.losses import check_losses, split_loss_output, weighted_mean

__all__ = ["PassWeighting", "BalancingNotAppliedWarning", "PASSES", "check_bins"]

#: the passes of a step and how the warning names them
PASSES = {"perturb": "perturbation (first)", "head": "head (at theta)",
          "tail": "tail (at theta)", "update": "update (second)",
          "plain": "plain (at theta, update weights)"}


class BalancingNotAppliedWarning(UserWarning):
    """A weighted optimizer took a step whose losses never went through ``opt.reduce``, so
    the weighting (or ImbSAM's head/tail split) of that pass was not applied."""


_WRAPPER_DIRS = (os.path.dirname(os.path.abspath(__file__)),
                 os.path.dirname(os.path.abspath(torch.optim.__file__)))


def user_stacklevel() -> int:
    """The ``stacklevel`` (for a warning issued by the caller of this function) that points at
    the first frame outside this package's optimizers and ``torch.optim``'s wrappers."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_WRAPPER_DIRS):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def _scheme(value: Any, name: str, *, same: str | None = None,
            allow_same: bool = False) -> str | None:
    if value is None or value == "none":
        return None
    if allow_same and value == "same":
        return same
    if value not in SCHEMES:
        extra = ", 'same'" if allow_same else ""
        raise ValueError(f"{name} must be None{extra} or one of {SCHEMES}, got {value!r}")
    return str(value)


def check_bins(bins: Any) -> LabelBins:
    """``bins`` when it is a :class:`~balanced_sam.LabelBins` (of the training labels), else a
    ``TypeError`` saying so: the one check every weighted optimizer makes."""
    if not isinstance(bins, LabelBins):
        raise TypeError("bins must be a balanced_sam.LabelBins built from the training labels, "
                        f"got {type(bins).__name__}")
    return bins


class PassWeighting:
    """Which per-sample weights each pass of a step uses, on which samples, and the reduction.

    Args:
        bins: :class:`~balanced_sam.LabelBins` of the training labels; needed by any scheme and
            by ``tail_below``.
        perturbation: the scheme of the perturbation pass (``None``: unweighted; ``"sqrt_inv"``,
            ``"inv"``, ``"lds"``).
        update: the scheme of the update pass (``None``, ``"same"``: the perturbation's, or a
            scheme name).
        normalize: ``"mean"`` (weights average 1 over the training samples) or ``"none"`` (raw
            ``1/sqrt(N_k)``, as the reference code).
        weight_kwargs: extra keyword arguments of :meth:`LabelBins.weights` (LDS kernel, clip).
        tail_below: ImbSAM's split: a sample whose bin holds fewer training samples is in the
            tail (``None``: no split).

    The schemes and options are checked against ``bins`` here, not at the first step.
    """

    def __init__(self, bins: LabelBins | None = None, perturbation: str | None = None,
                 update: str | None = None, *, normalize: str = "mean",
                 weight_kwargs: dict[str, Any] | None = None,
                 tail_below: float | None = None) -> None:
        if bins is not None:
            check_bins(bins)
        self.bins = bins
        self.perturbation = _scheme(perturbation, "perturbation_weighting")
        self.update = _scheme(update, "update_weighting", same=self.perturbation,
                              allow_same=True)
        self.normalize = normalize
        self.weight_kwargs = dict(weight_kwargs or {})
        self.tail_below = tail_below
        for scheme in {self.perturbation, self.update} - {None}:
            if bins is None:
                raise ValueError(f"weighting scheme {scheme!r} needs bins=LabelBins")
            bins.weights(scheme, normalize, **self.weight_kwargs)  # type: ignore[arg-type]
        if tail_below is not None and bins is None:
            raise ValueError("a head/tail split (tail_below) needs bins=LabelBins")
        #: the pass in progress: what :meth:`reduce` weights for
        self.phase = "perturb"
        self._ran: set[str] = set()
        self._reduced: set[str] = set()
        self._tail_any: torch.Tensor | None = None
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._warned = False

    @property
    def splits(self) -> bool:
        """Whether the step splits the batch into head and tail (ImbSAM)."""
        return self.tail_below is not None

    def scheme_of(self, phase: str) -> str | None:
        """The scheme of a pass (with a split, every pass weights with ``update``)."""
        return self.update if self.splits or phase in ("update", "plain") else self.perturbation

    def needs_reduce(self, phase: str) -> bool:
        """Whether a pass is wrong unless its losses go through :meth:`reduce`."""
        return (self.splits and phase != "plain") or self.scheme_of(phase) is not None

    # ------------------------------------------------------------------ the weights
    def weights(self, targets: torch.Tensor, phase: str | None = None) -> torch.Tensor | None:
        """Per-sample weights of ``targets`` in a pass (the one in progress by default);
        ``None`` when the pass is unweighted. Computed once per targets tensor and step."""
        scheme = self.scheme_of(self.phase if phase is None else phase)
        if scheme is None:
            return None
        bins = self.bins
        assert bins is not None  # checked in the constructor
        return self._cached(f"w:{scheme}", targets, lambda t: bins.sample_weights(
            t, scheme, self.normalize, **self.weight_kwargs))

    def tail_mask(self, targets: torch.Tensor) -> torch.Tensor:
        """True for targets whose bin holds fewer than ``tail_below`` training samples."""
        if self.bins is None or self.tail_below is None:
            raise ValueError("tail_mask needs bins and tail_below")
        idx = self.bins.bin_index(targets)
        return (self.bins.counts.to(idx.device) < self.tail_below)[idx]

    def _cached(self, key: str, targets: torch.Tensor,
                make: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor | None:
        hit = self._cache.get((id(targets), key))
        if hit is not None and hit[0] is targets:
            return hit[1]
        if len(self._cache) > 64:  # reduce() called outside steps, e.g. for validation
            self._cache.clear()
        value = make(targets)
        self._cache[(id(targets), key)] = (targets, value)  # holding targets pins the id
        return value

    # ------------------------------------------------------------------ the reduction
    def reduce(self, output: Any, targets: torch.Tensor, mask: torch.Tensor | None = None, *,
               denom: torch.Tensor | int | None = None, share: float = 1.0,
               phase: str | None = None, name: str = "loss_fn") -> torch.Tensor:
        r"""The weighted scalar loss of a pass (the one in progress by default).

        ``output`` is the per-sample losses (the targets' shape; a trailing size-1 dimension is
        squeezed) or a pair ``(losses, regulariser)``; ``mask`` a boolean tensor of the targets'
        shape. The weighted sum over the counted samples is divided by ``denom`` (default: the
        count of elements, or of masked elements); the regulariser, times ``share`` (a
        micro-batch's share of the batch), is added unweighted.
        """
        phase = self.phase if phase is None else phase
        losses, reg = split_loss_output(output, name=name)
        losses = check_losses(losses, targets, name=name)
        keep = mask
        if self.splits and phase != "plain":
            tail = self._cached("tail", targets, self.tail_mask)
            assert tail is not None
            if phase == "head":  # what the step asks after the head pass (no host sync here)
                seen = (tail if mask is None else tail & mask).any()
                self._tail_any = seen if self._tail_any is None else self._tail_any | seen
            part = ~tail if phase == "head" else tail
            keep = part if mask is None else part & mask
        if denom is None:
            denom = max(targets.numel(), 1) if mask is None else mask.sum().clamp_min(1)
        loss = weighted_mean(losses, self.weights(targets, phase), keep, denom=denom)
        if reg is not None and (not self.splits or phase in ("head", "plain")):
            loss = loss + (reg if share == 1.0 else reg * share)
        self._reduced.add(phase)
        return loss

    # ------------------------------------------------------------------ the passes of a step
    def begin(self, phase: str) -> None:
        """Start a pass (one of :data:`PASSES`): :meth:`reduce` weights for it from now on."""
        self.phase = phase

    def end_pass(self) -> None:
        """Record that the pass in progress ran (for the not-applied warning)."""
        self._ran.add(self.phase)

    @property
    def first_pass(self) -> bool:
        """True until the first pass of the step in progress has ended."""
        return not self._ran

    def reduced(self, phase: str) -> bool:
        """Whether a pass of the step in progress went through :meth:`reduce`."""
        return phase in self._reduced

    def tail_seen(self) -> bool:
        """Whether the head pass of the step in progress met a (counted) tail sample."""
        return self._tail_any is not None and bool(self._tail_any)

    def end_step(self, owner: str) -> None:
        """Warn (once) when a pass that ran needed :meth:`reduce` and did not get it; then
        forget the step (its passes, cached weights, tail flag)."""
        missing = [ph for ph in PASSES if ph in self._ran and self.needs_reduce(ph)
                   and ph not in self._reduced]
        if missing and not self._warned:
            self._warned = True
            split = self.splits
            warnings.warn(
                f"{owner}: the losses of the "
                f"{' and '.join(PASSES[ph] for ph in missing)} "
                f"{'pass' if len(missing) == 1 else 'passes'} did not go through "
                "opt.reduce(per_sample_losses, targets), so the loss weighting"
                f"{' and the head/tail split' if split else ''} "
                f"{'were' if split else 'was'} not applied. Compute "
                "the loss of every pass with opt.reduce(...) (closure and first_step/second_step "
                "forms), or call opt.step(loss_fn, targets). (Warned once per optimizer.)",
                BalancingNotAppliedWarning, stacklevel=user_stacklevel())
        self.phase = "perturb"
        self._ran.clear()
        self._reduced.clear()
        self._cache.clear()
        self._tail_any = None
