r"""Sharpness-aware minimisation: the two-pass machinery shared by SAM, BalancedSAM and ImbSAM.

One SAM step on parameters :math:`\theta` with gradient :math:`g = \nabla L(\theta)`:

1. perturb: :math:`\hat\epsilon = \rho\,\operatorname{sign}(g)\,|g|^{q-1} / \|g\|_q^{q/p}` with
   :math:`1/p + 1/q = 1` (Foret et al. 2021, Eq. 2; BSAM paper Eq. 4/10), so that
   :math:`\|\hat\epsilon\|_p = \rho`. ``p = 2`` gives :math:`\rho\, g / \|g\|_2`, ``p = inf`` gives
   :math:`\rho\,\operatorname{sign}(g)` and ``p = 1`` puts all of :math:`\rho` on the largest
   gradient entries;
2. update: :math:`\theta \leftarrow \text{base\_step}(\theta, \nabla L(\theta + \hat\epsilon))`.

The parameters are restored *exactly* before the base step (copied back from a saved copy, not
subtracted), so no drift accumulates. With ``adaptive=True`` the perturbation is taken in the
weight-scaled space of ASAM (Kwon et al. 2021): the gradient is multiplied by :math:`|\theta|`
before the dual-norm step and :math:`\hat\epsilon` by :math:`|\theta|` after it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from balanced_sam.bins import SCHEMES, LabelBins
from balanced_sam.losses import check_losses, check_mask, split_loss_output

__all__ = ["SAM", "BalancingNotAppliedWarning", "frozen_bn_stats", "dual_norm_direction"]

_NORM_EPS = 1e-16  # added to ||g||_2 as in the reference code


def _parse_p(p: float | int | str) -> float:
    if isinstance(p, str):
        if p.lower() in ("inf", "infinity"):
            return math.inf
        raise ValueError(f"p must be a number >= 1 or 'inf', got {p!r}")
    try:
        pf = float(p)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"p must be a number >= 1 or 'inf', got {p!r}") from exc
    if math.isnan(pf) or pf < 1:
        raise ValueError(f"p must be >= 1 (or inf), got {p!r}")
    return pf


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _global_max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    dev = tensors[0].device
    return torch.stack([n.to(dev) for n in torch._foreach_norm(tensors, math.inf)]).max()


def _global_norm(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """The ``ord``-norm of the concatenation of ``tensors`` (half precision summed in float32,
    so a finite fp16/bf16 gradient cannot overflow to an infinite norm)."""
    dev = tensors[0].device
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    norms = torch._foreach_norm(tensors, ord, dtype=torch.float32 if low else None)
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms]), ord)
    return total


def _user_stacklevel() -> int:
    """The ``stacklevel`` (for a warning issued by the caller of this function) that points at
    the first frame outside this package's optimizers and ``torch.optim``'s wrappers."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_WRAPPER_DIRS):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


_WRAPPER_DIRS = (os.path.dirname(os.path.abspath(__file__)),
                 os.path.dirname(os.path.abspath(torch.optim.__file__)))


def dual_norm_direction(grads: list[torch.Tensor], p: float) -> tuple[list[torch.Tensor], bool]:
    r"""Unit-:math:`\ell_p` direction maximising the first-order loss increase.

    Returns ``(d, ok)`` with :math:`d = \operatorname{sign}(g)|g|^{q-1}/\|g\|_q^{q/p}` (so
    :math:`\|d\|_p = 1` up to the ``1e-16`` of the ``p = 2`` case) over the concatenation of
    ``grads``; ``ok`` is false, and ``d`` empty, when the gradient is zero or not finite (the
    caller then skips the perturbation). ``ok`` costs one host synchronisation.
    """
    if not grads:
        return [], False
    if p == 2:
        norm = _global_norm(grads, 2.0)
        ok = bool(torch.isfinite(norm) & (norm > 0))
        return (list(torch._foreach_div(grads, norm + _NORM_EPS)) if ok else []), ok
    m = _global_max_abs(grads)
    ok = bool(torch.isfinite(m) & (m > 0))
    if not ok:
        return [], False
    if p == math.inf:
        return list(torch._foreach_sign(grads)), True
    if p == 1:
        # all of rho on the entries of largest magnitude, shared equally between ties
        hits = [(g.abs() == m.to(g.device)) for g in grads]
        count = torch.stack([h.sum().to(m.device) for h in hits]).sum()
        signs = torch._foreach_sign(grads)
        return [s * h / count.to(s.device) for s, h in zip(signs, hits)], True
    q = p / (p - 1.0)
    # scale by the largest entry first so |g|^(q-1) can neither overflow nor underflow
    u = torch._foreach_abs(torch._foreach_div(grads, m))
    total = torch.stack([t.to(m.device) for t in torch._foreach_norm(u, q)]).pow(q).sum()
    d = list(torch._foreach_pow(u, q - 1.0))
    torch._foreach_mul_(d, torch._foreach_sign(grads))
    torch._foreach_div_(d, total.pow(1.0 / p))
    return d, True


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module | None) -> Iterator[None]:
    """Run the body without changing any BatchNorm running statistics of ``model``.

    Sets every BatchNorm momentum to 0 (running stats then stay as they are, also for
    ``momentum=None`` cumulative averages) and restores momentum and ``num_batches_tracked``
    afterwards. Batch statistics are still used for normalisation in training mode.
    """
    if model is None:
        yield
        return
    saved = []
    for mod in model.modules():
        if isinstance(mod, _BATCHNORMS) and mod.track_running_stats:
            nbt = mod.num_batches_tracked
            saved.append((mod, mod.momentum, None if nbt is None else nbt.clone()))
            mod.momentum = 0.0
    try:
        yield
    finally:
        for mod, momentum, nbt in saved:
            mod.momentum = momentum
            if nbt is not None and mod.num_batches_tracked is not None:
                mod.num_batches_tracked.copy_(nbt)


class BalancingNotAppliedWarning(UserWarning):
    """A weighted optimizer took a step whose losses never went through :meth:`SAM.reduce`, so
    the weighting (or ImbSAM's head/tail split) of that pass was not applied."""


_Ctx = Callable[[], contextlib.AbstractContextManager[Any]]
_PASS_NAMES = {"perturb": "perturbation (first)", "head": "head (at theta)",
               "tail": "tail (at theta)", "update": "update (second)"}


@dataclass
class _Chunk:
    index: slice | None  # what loss_fn is called with (None: called without argument)
    targets: torch.Tensor
    mask: torch.Tensor | None
    frac: float  # the chunk's share of the batch (scales the regulariser)


@dataclass
class _Plan:
    chunks: list[_Chunk]
    denom: torch.Tensor | int | None  # the full batch's normaliser (None: the chunk's own)


def _plan(targets: torch.Tensor, mask: torch.Tensor | None, accumulate: Any) -> _Plan:
    """Split a batch into ``accumulate`` micro-batches along dimension 0."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    mask = check_mask(mask, targets)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be an integer >= 1, got {accumulate!r}")
    if accumulate == 1:
        return _Plan([_Chunk(None, targets, mask, 1.0)], None)
    n = targets.shape[0] if targets.dim() else 0
    if accumulate > n:
        raise ValueError(f"accumulate={accumulate} needs at least that many samples along the "
                         f"targets' first dimension, got targets of shape {tuple(targets.shape)}")
    denom: torch.Tensor | int = (max(targets.numel(), 1) if mask is None
                                 else mask.sum().clamp_min(1))
    chunks, start = [], 0
    for i in range(accumulate):
        size = n // accumulate + (1 if i < n % accumulate else 0)
        sl = slice(start, start + size)
        chunks.append(_Chunk(sl, targets[sl], None if mask is None else mask[sl], size / n))
        start += size
    return _Plan(chunks, denom)


def _check_positive(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


class SAM(Optimizer):
    r"""Sharpness-Aware Minimisation around any ``torch.optim`` optimizer.

    Algorithm (one :meth:`step`), for parameters :math:`\theta`, base optimizer ``base`` and
    per-sample losses :math:`\ell_i`:

    .. math::
        g &= \nabla_\theta \tfrac1B \textstyle\sum_i \ell_i(\theta) \\
        \hat\epsilon &= \rho\, \operatorname{sign}(g)\, |g|^{q-1} / \|g\|_q^{q/p},
            \qquad 1/p + 1/q = 1 \\
        \theta &\leftarrow \text{base}\big(\theta,\;
            \nabla_\theta \tfrac1B \textstyle\sum_i u_i\, \ell_i(\theta + \hat\epsilon)\big)

    with :math:`u_i = 1` (plain SAM) or :math:`u_i` the ``update_weighting`` scheme's weight of
    sample ``i``'s label bin (the paper's "SQINV + SAM": unweighted perturbation, SQINV update).

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``).
        base_optimizer: the optimizer *class* (or factory) to wrap, e.g. ``torch.optim.SGD``;
            it is built on the same parameter groups, so ``param_groups`` are shared and LR
            schedulers can be attached to this wrapper directly.
        rho: radius of the perturbation ball, ``>= 0`` (``0`` gives the base optimizer's step at
            twice the cost).
        p: norm of the ball, ``>= 1`` or ``inf`` (2 by default, the only value of the reference).
        bins: :class:`~balanced_sam.LabelBins` of the training labels; needed for a weighted
            update.
        update_weighting: ``None`` / ``"none"`` (unweighted update), or a weighting scheme
            (``"sqrt_inv"``, ``"inv"``, ``"lds"``) for the update loss. ``"same"`` means the
            perturbation's weighting (unweighted for SAM).
        normalize: ``"mean"`` (weights average 1 over the training samples) or ``"none"`` (raw
            ``1/sqrt(N_k)``, as the reference code; changes the effective learning rate).
        weight_kwargs: extra keyword arguments of :meth:`LabelBins.weights` (LDS kernel, clip).
        adaptive: ASAM's weight-scaled perturbation.
        model: the model; needed for ``bn_second_pass="freeze"`` (and used by ImbSAM to keep
            the BatchNorm statistics out of its repeated pass at :math:`\theta`).
        bn_second_pass: ``"update"`` (default, the reference behaviour: BatchNorm running
            statistics are updated in both passes) or ``"freeze"`` (the second, perturbed pass
            leaves them untouched).
        interval: compute a fresh perturbation only every ``interval`` steps and reuse the last
            :math:`\hat\epsilon` in between (default 1: every step). A reusing step costs one
            forward/backward pass at :math:`\theta + \hat\epsilon_{old}`, so ``interval=k`` costs
            about :math:`(k+1)/k` passes per step instead of 2. Applies to :meth:`step`; the
            two-step form perturbs afresh at every :meth:`first_step`.
        max_grad_norm: clip the update gradient to this global 2-norm before the base step
            (after unscaling with a ``scaler``); ``None`` (default) does not clip. The
            perturbation needs no clipping: :math:`\hat\epsilon` has norm :math:`\rho` whatever
            the gradient's size.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``...).

    Ways to call it (all share one weighting path, :meth:`reduce`):

    * ``loss = opt.step(loss_fn, targets)``: ``loss_fn()`` runs the forward pass and returns
      *unreduced* losses of the targets' shape (one per sample, or per element for dense
      targets; a trailing dimension of size 1 is squeezed, any other shape is an error), or a
      pair ``(losses, regulariser)`` whose 0-dim ``regulariser`` is added, unweighted, to the
      reduced loss of every pass. The optimizer reduces and weights, runs both backward passes
      and the base step, and returns the first pass's reduced loss (detached; on a step that
      reuses :math:`\hat\epsilon` the loss at :math:`\theta+\hat\epsilon`). Gradients are zeroed
      at the start. Options: ``mask=`` (elements that count), ``scaler=`` (a
      ``torch.amp.GradScaler``), ``first_pass_context=`` (e.g. ``ddp_model.no_sync``),
      ``accumulate=K`` and ``max_grad_norm=``.
    * ``opt.step(closure)`` (also ``step(closure=closure)``), PyTorch closure semantics: the
      closure zeroes the gradients, computes the loss, calls ``backward`` and returns the loss;
      it is called at :math:`\theta` and at :math:`\theta+\hat\epsilon`. To get the weighting,
      compute the loss as ``opt.reduce(per_sample_losses, targets)``: it applies the
      perturbation weights in the first call and the update weights in the second. With a
      ``scaler`` the closure scales the loss itself (``scaler.scale(loss).backward()``).
    * ``first_step()`` / ``second_step()`` around your own two backward passes, again with
      ``opt.reduce`` for the weights (before :meth:`first_step` it weights for the
      perturbation, after it for the update). After :meth:`first_step`, a bare ``opt.step()``
      finishes the step like :meth:`second_step` (useful where a trainer counts ``step()``
      calls).

    A :class:`BalancedSAM` or :class:`ImbSAM` step whose losses never went through
    :meth:`reduce` in a pass that needs weights warns once (:class:`BalancingNotAppliedWarning`).

    Gradient accumulation (``accumulate=K > 1``, one-call form): ``loss_fn`` is called as
    ``loss_fn(chunk)`` with ``chunk`` a ``slice`` of the batch along dimension 0 (``K``
    near-equal parts) and returns that micro-batch's losses. Each micro-batch's weighted sum is
    divided by the *full* batch's normaliser (its element count, or the mask's count), so the
    accumulated gradient equals the full batch's (exactly, up to float rounding, for models
    without batch statistics; BatchNorm sees micro-batch statistics). A micro-batch's
    regulariser is scaled by the micro-batch's share of the batch.

    Non-finite gradients: a NaN/inf gradient in either pass skips the whole step (parameters
    and base-optimizer state untouched, gradients cleared) and is counted in
    ``skipped_steps``; with a ``scaler`` the same holds and ``scaler.update()`` lowers the scale
    as usual. A zero gradient in the first pass (e.g. every weight of the batch is 0) means no
    perturbation (:math:`\hat\epsilon = 0`); ``last_step_perturbed`` tells whether the last
    step perturbed.
    """

    #: perturbation weighting scheme; ``None`` for SAM, set by BalancedSAM
    perturbation_weighting: str | None = None
    _splits_head_tail = False  # ImbSAM

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Callable[..., Optimizer],
        rho: float = 0.05,
        p: float | int | str = 2,
        *,
        bins: LabelBins | None = None,
        update_weighting: str | None = None,
        normalize: str = "mean",
        weight_kwargs: dict[str, Any] | None = None,
        adaptive: bool = False,
        model: nn.Module | None = None,
        bn_second_pass: str = "update",
        interval: int = 1,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(base_optimizer, Optimizer):
            raise TypeError("base_optimizer must be an optimizer class such as torch.optim.SGD "
                            "(with its arguments as keyword arguments), not an instance")
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer must be an optimizer class, got {base_optimizer!r}")
        self._check_rho(rho)
        self.p = _parse_p(p)
        if bn_second_pass not in ("update", "freeze"):
            raise ValueError(f"bn_second_pass must be 'update' or 'freeze', got {bn_second_pass!r}")
        if bn_second_pass == "freeze" and model is None:
            raise ValueError("bn_second_pass='freeze' needs the model: pass model=...")
        if bins is not None and not isinstance(bins, LabelBins):
            raise TypeError(f"bins must be a balanced_sam.LabelBins, got {type(bins).__name__}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        self.interval = interval
        self.max_grad_norm = _check_positive(max_grad_norm, "max_grad_norm", allow_none=True)
        self.bins = bins
        self.normalize = normalize
        self.weight_kwargs = dict(weight_kwargs or {})
        self.model = model
        self.bn_second_pass = bn_second_pass
        self.update_weighting = self._resolve_update_weighting(update_weighting)
        if bins is not None:  # validate scheme / normalize / kwargs now, not at the first step
            for scheme in {self.perturbation_weighting, self.update_weighting} - {None}:
                bins.weights(scheme, normalize, **self.weight_kwargs)  # type: ignore[arg-type]
        elif self.update_weighting is not None:
            raise ValueError(f"update_weighting={self.update_weighting!r} needs bins=LabelBins")

        defaults = dict(rho=rho, adaptive=bool(adaptive), **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            self._check_rho(group["rho"])
        self._backup: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        # parameter -> its saved copy at theta: one parameter-sized buffer, reused every step
        self._theta: dict[torch.Tensor, torch.Tensor] = {}
        self.last_step_perturbed: bool = False
        #: steps skipped because a gradient held NaN/inf
        self.skipped_steps: int = 0
        self._sam_step = 0  # base steps taken (the interval counts these)
        self._eps_valid = False  # a perturbation is stored for reuse (interval > 1)
        self._phase = "perturb"  # the pass in progress: what reduce() weights for
        self._ran: set[str] = set()  # passes of the step in progress
        self._reduced: set[str] = set()  # passes whose losses went through reduce()
        self._skip_pending = False  # the first pass's gradient was not finite
        self._stash: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, grad) kept aside
        self._stash_scaled = True  # the stash is scaled like .grad (added before unscaling)
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._balance_warned = False

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_rho(rho: Any) -> None:
        if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not math.isfinite(rho) \
                or rho < 0:
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")

    def _resolve_update_weighting(self, update_weighting: str | None) -> str | None:
        if update_weighting in (None, "none"):
            return None
        if update_weighting == "same":
            return self.perturbation_weighting
        if update_weighting not in SCHEMES:
            raise ValueError(f"update_weighting must be None, 'same' or one of {SCHEMES}, "
                             f"got {update_weighting!r}")
        return update_weighting

    @staticmethod
    def _check_losses(losses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Kept for callers of the old private name: :func:`balanced_sam.losses.check_losses`."""
        return check_losses(losses, targets)

    # ------------------------------------------------------------------ weights
    def _weights(self, scheme: str | None, targets: torch.Tensor) -> torch.Tensor | None:
        if scheme is None or scheme == "none":
            return None
        if self.bins is None:
            raise ValueError(f"weighting scheme {scheme!r} needs bins=LabelBins")
        return self.bins.sample_weights(targets, scheme, self.normalize, **self.weight_kwargs)

    def perturbation_weights(self, targets: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights of the loss whose gradient sets the perturbation (None: all 1)."""
        return self._weights(self.perturbation_weighting, targets)

    def update_weights(self, targets: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights of the loss whose gradient updates the parameters (None: all 1)."""
        return self._weights(self.update_weighting, targets)

    def _cached(self, key: str, targets: torch.Tensor,
                make: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor | None:
        """``make(targets)``, computed once per targets tensor and step (both passes share it)."""
        hit = self._cache.get((id(targets), key))
        if hit is not None and hit[0] is targets:
            return hit[1]
        if len(self._cache) > 64:  # reduce() called outside steps, e.g. for validation
            self._cache.clear()
        value = make(targets)
        self._cache[(id(targets), key)] = (targets, value)  # holding targets pins the id
        return value

    # ------------------------------------------------------------------ the weighted reduction
    def reduce(self, per_sample_losses: Any, targets: torch.Tensor,
               mask: torch.Tensor | None = None, *,
               regularizer: torch.Tensor | None = None) -> torch.Tensor:
        r"""The weighted scalar loss of the pass in progress, for closures and two-step loops.

        :math:`\frac1B \sum_i w_i \ell_i` (over the masked elements with ``mask``) with the
        perturbation weights before :meth:`first_step` and the update weights after it, plus
        ``regularizer`` (a 0-dim tensor, unweighted). ``per_sample_losses`` has the targets'
        shape (a trailing size-1 dimension is squeezed) and may also be the pair
        ``(losses, regulariser)`` that a loss function returns. ImbSAM returns the head or tail
        part of the pass (see :class:`ImbSAM`).
        """
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        losses, reg = split_loss_output(per_sample_losses, name="reduce()")
        if regularizer is not None:
            if reg is not None:
                raise ValueError("reduce() got a regulariser twice: in the pair and as "
                                 "regularizer=")
            _, reg = split_loss_output((losses, regularizer), name="reduce()")
        return self._reduce((losses, reg), targets, check_mask(mask, targets), None, 1.0)

    def _reduce(self, output: Any, targets: torch.Tensor, mask: torch.Tensor | None,
                denom: torch.Tensor | int | None, reg_scale: float) -> torch.Tensor:
        losses, reg = split_loss_output(output)
        losses = check_losses(losses, targets)
        terms = self._weighted_terms(losses, targets, mask)
        if denom is None:
            denom = max(targets.numel(), 1) if mask is None else mask.sum().clamp_min(1)
        loss = terms.sum() / denom
        if reg is not None and self._regularizer_applies():
            loss = loss + (reg if reg_scale == 1.0 else reg * reg_scale)
        self._reduced.add(self._phase)
        return loss

    def _weighted_terms(self, losses: torch.Tensor, targets: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
        """Per-element weighted losses of the pass in progress, 0 where not counted."""
        scheme = self.update_weighting if self._phase == "update" else self.perturbation_weighting
        w = self._cached(f"w:{scheme}", targets, lambda t: self._weights(scheme, t))
        terms = losses if w is None else losses * w
        if mask is not None:
            terms = torch.where(mask, terms, torch.zeros((), dtype=terms.dtype,
                                                         device=terms.device))
        return terms

    def _regularizer_applies(self) -> bool:
        return True

    def _needs_reduce(self, phase: str) -> bool:
        scheme = self.update_weighting if phase == "update" else self.perturbation_weighting
        return scheme is not None

    # ------------------------------------------------------------------ the two steps
    def _params_with_grad(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        return [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]

    def _eps_terms(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]
                   ) -> tuple[list[tuple[list[torch.Tensor], list[torch.Tensor], float]], str]:
        """``[(params, vectors, alpha)]`` with eps = alpha * vectors, and the gradient's status:
        ``"ok"``, ``"zero"`` (no perturbation) or ``"nonfinite"`` (skip the step)."""
        all_params = [p for _, ps in groups for p in ps]
        if not all_params:
            return [], "zero"
        if self.p == 2 and not any(g["adaptive"] for g, ps in groups if ps):
            # the common case, fused: theta += rho / ||g|| * g
            norm = float(_global_norm([_grad(p) for p in all_params], 2.0))  # one host sync
            if not math.isfinite(norm):
                return [], "nonfinite"
            if norm == 0:
                return [], "zero"
            return [(ps, [_grad(p) for p in ps], g["rho"] / (norm + _NORM_EPS))
                    for g, ps in groups if ps and g["rho"] != 0], "ok"
        scaled: list[torch.Tensor] = []
        for g, ps in groups:
            grads = [_grad(p) for p in ps]
            if ps and g["adaptive"]:
                grads = list(torch._foreach_mul(grads, torch._foreach_abs(ps)))
            scaled.extend(grads)
        direction, ok = dual_norm_direction(scaled, self.p)
        if not ok:
            return [], "zero" if bool(torch.isfinite(_global_max_abs(scaled))) else "nonfinite"
        terms, start = [], 0
        for g, ps in groups:
            d = direction[start:start + len(ps)]
            start += len(ps)
            if not ps or g["rho"] == 0:
                continue
            if g["adaptive"]:
                torch._foreach_mul_(d, torch._foreach_abs(ps))
            terms.append((ps, d, float(g["rho"])))
        return terms, "ok"

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        r"""Move to :math:`\theta + \hat\epsilon` using the gradients now in ``.grad``.

        Saves a copy of the parameters for :meth:`second_step`. Returns whether a perturbation
        was applied (False for a zero or non-finite gradient; a non-finite one also makes the
        step's :meth:`second_step` skip the base step). ``zero_grad`` clears the gradients
        afterwards, ready for the second backward pass.
        """
        if self._backup is not None:
            raise RuntimeError("first_step() called twice without second_step()")
        self._ran.add(self._phase)
        terms, status = self._eps_terms(self._params_with_grad())
        self._backup = []
        self._skip_pending = status == "nonfinite"
        keep = self.interval > 1 and not self._skip_pending
        if keep:  # the fresh perturbation replaces the stored one (none stored: eps = 0)
            self._clear_stored_eps()
            self._eps_valid = True
        for ps, vecs, alpha in terms:
            self._save(ps)
            if keep:
                for prm, e in zip(ps, torch._foreach_mul(vecs, alpha)):
                    self.state[prm]["eps"] = e
            torch._foreach_add_(ps, vecs, alpha=alpha)
        self.last_step_perturbed = bool(self._backup)
        self._phase = "update"
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return self.last_step_perturbed

    def _clear_stored_eps(self) -> None:
        for g in self.param_groups:
            for prm in g["params"]:
                if prm in self.state:
                    self.state[prm].pop("eps", None)

    @torch.no_grad()
    def _apply_stored_eps(self) -> None:
        r"""Move to :math:`\theta + \hat\epsilon_{old}` (the perturbation of the last refresh)."""
        self._backup = []
        for g in self.param_groups:
            ps = [prm for prm in g["params"] if prm in self.state and "eps" in self.state[prm]]
            if ps:
                self._save(ps)
                torch._foreach_add_(ps, [self.state[prm]["eps"] for prm in ps])
        self.last_step_perturbed = bool(self._backup)
        self._phase = "update"

    def _refresh_due(self) -> bool:
        return self.interval == 1 or not self._eps_valid or self._sam_step % self.interval == 0

    def _save(self, ps: list[torch.Tensor]) -> None:
        """Copy ``ps`` into buffers kept between steps (no allocation after the first step)."""
        saved = []
        for p in ps:
            buf = self._theta.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype \
                    or buf.device != p.device:
                buf = torch.empty_like(p)
                self._theta[p] = buf
            saved.append(buf)
        torch._foreach_copy_(saved, ps)
        assert self._backup is not None
        self._backup.append((ps, saved))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved parameters back (exactly); a no-op when nothing is perturbed."""
        if self._backup:
            for ps, saved in self._backup:
                torch._foreach_copy_(ps, saved)
        self._backup = None

    def second_step(self, zero_grad: bool = False, scaler: Any = None,
                    max_grad_norm: float | None = None) -> None:
        """Restore :math:`\\theta` and take the base optimizer's step with the current gradients
        (those of the perturbed pass).

        With ``scaler`` the gradients are unscaled and the step goes through
        ``scaler.step(self.base_optimizer)``. A NaN/inf gradient (in this pass or the first)
        skips the base step (see ``skipped_steps``). ``max_grad_norm`` overrides the
        constructor's clipping for this step. The step runs through :meth:`step` (a bare
        ``step()`` after :meth:`first_step` finishes the step), so LR schedulers and optimizer
        step hooks see one optimizer step.
        """
        if self._backup is None:
            raise RuntimeError("second_step() called without first_step()")
        self.step(scaler=scaler, max_grad_norm=max_grad_norm)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ finishing a step
    @torch.no_grad()
    def _add_stash(self, scaled: bool) -> None:
        """Add the gradient kept aside (ImbSAM's head gradient) to ``.grad``."""
        if not self._stash or self._stash_scaled != scaled:
            return
        both = [(prm.grad, g) for prm, g in self._stash if prm.grad is not None]
        if both:
            torch._foreach_add_([a for a, _ in both], [b for _, b in both])
        for prm, g in self._stash:
            if prm.grad is None:
                prm.grad = g
        self._stash = []

    @torch.no_grad()
    def _grads_ok(self, max_grad_norm: float | None) -> bool:
        """Whether every gradient is finite (one host sync); clips them when asked."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        norm = float(_global_norm(grads, 2.0))
        if not math.isfinite(norm):
            return False
        if max_grad_norm is not None and norm > max_grad_norm:
            torch._foreach_mul_(grads, max_grad_norm / (norm + 1e-6))
        return True

    def _finish(self, scaler: Any, max_grad_norm: float | None) -> bool:
        """Restore theta, add any stashed gradient, unscale, check, clip, base step (or skip)."""
        ok = not self._skip_pending
        if ok:  # (after a non-finite first pass the step forms run no second pass)
            self._ran.add(self._phase)
        self.restore()
        if ok:
            self._add_stash(scaled=True)
            if scaler is not None:
                scaler.unscale_(self.base_optimizer)
            self._add_stash(scaled=False)
            ok = self._grads_ok(max_grad_norm)
        if ok:
            if scaler is not None:
                scaler.step(self.base_optimizer)
            else:
                self.base_optimizer.step()
            self._sam_step += 1
        else:
            self.skipped_steps += 1
            self.last_step_perturbed = False
            self.zero_grad(set_to_none=True)
        self._end_step()
        return ok

    def _end_step(self) -> None:
        missing = [ph for ph in _PASS_NAMES if ph in self._ran and self._needs_reduce(ph)
                   and ph not in self._reduced]
        if missing and not self._balance_warned:
            self._balance_warned = True
            warnings.warn(
                f"{type(self).__name__}: the losses of the "
                f"{' and '.join(_PASS_NAMES[ph] for ph in missing)} "
                f"{'pass' if len(missing) == 1 else 'passes'} did not go through "
                "opt.reduce(per_sample_losses, targets), so the loss weighting"
                f"{' and the head/tail split' if self._splits_head_tail else ''} "
                f"{'were' if self._splits_head_tail else 'was'} not applied. Compute "
                "the loss of every pass with opt.reduce(...) (closure and first_step/second_step "
                "forms), or call opt.step(loss_fn, targets). (Warned once per optimizer.)",
                BalancingNotAppliedWarning, stacklevel=_user_stacklevel())
        self._phase = "perturb"
        self._ran.clear()
        self._reduced.clear()
        self._cache.clear()
        self._stash = []
        self._skip_pending = False

    # ------------------------------------------------------------------ one call
    def _backward(self, loss: torch.Tensor, scaler: Any) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _second_pass_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.bn_second_pass == "freeze":
            return frozen_bn_stats(self.model)
        return contextlib.nullcontext()

    def _run_pass(self, loss_fn: Callable[..., Any], plan: _Plan, scaler: Any,
                  contexts: Iterable[_Ctx | None] = ()) -> torch.Tensor:
        """Forward and backward over every micro-batch of ``plan``; the summed loss (detached)."""
        total: torch.Tensor | None = None
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for ctx in contexts:
                if ctx is not None:
                    stack.enter_context(ctx())
            for c in plan.chunks:
                out = loss_fn() if c.index is None else loss_fn(c.index)
                loss = self._reduce(out, c.targets, c.mask, plan.denom, c.frac)
                self._backward(loss, scaler)
                total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        return total

    def _perturbation_pass(self, run: Callable[[], Any], scaler: Any) -> tuple[Any, bool]:
        """A fresh perturbation from ``run()``'s gradients when one is due (returns
        ``(run's result, whether the step goes on)``), else the stored one (``(None, True)``)."""
        if not self._refresh_due():
            self._apply_stored_eps()
            return None, True
        out = run()
        if scaler is not None:
            scaler.unscale_(self)
        self.first_step(zero_grad=True)
        return out, not self._skip_pending

    def step(
        self,
        closure: Callable[..., Any] | None = None,
        targets: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        scaler: Any = None,
        first_pass_context: _Ctx | None = None,
        accumulate: int = 1,
        max_grad_norm: float | None = None,
    ) -> Any:
        """Run both passes and the base step; see the class docstring.

        Args:
            closure: with ``targets`` (the "loss_fn"): returns unreduced losses of
                ``targets``' shape, or ``(losses, regulariser)``. Without ``targets``: a PyTorch
                closure (zero grads, forward, backward, return the loss).
            targets: the batch's labels (used to look up the weights).
            mask: optional boolean mask of the targets' shape: the elements that count (dense
                targets); the reduction is then the mean over the masked elements.
            scaler: a ``torch.amp.GradScaler`` for fp16 mixed precision (call
                ``scaler.update()`` after the step as usual).
            first_pass_context: a context manager factory wrapped around the perturbation
                pass, e.g. ``ddp_model.no_sync`` to perturb each replica with its own gradient
                (the "local" scope of the SAM paper).
            accumulate: number of micro-batches (one-call form only; see the class docstring).
            max_grad_norm: clip the update gradient to this norm (overrides the constructor).

        Returns the first pass's reduced loss (detached), or the closure's first return value.
        After :meth:`first_step`, ``step()`` without a closure finishes the step (as
        :meth:`second_step`) and returns None.
        """
        clip = (self.max_grad_norm if max_grad_norm is None
                else _check_positive(max_grad_norm, "max_grad_norm"))
        if closure is None:
            if targets is not None:
                raise ValueError("step() got targets but no loss_fn: call "
                                 "step(loss_fn, targets)")
            if self._backup is not None:  # finishing the two-step form
                self._finish(scaler, clip)
                return None
            raise ValueError(f"{type(self).__name__}.step needs two passes: call "
                             "step(loss_fn, targets), step(closure), or first_step() / "
                             "second_step() around your own passes")
        if self._backup is not None:
            raise RuntimeError("first_step() is pending: finish it with second_step() (or a "
                               "bare step()) before a new step")
        if targets is None:
            if accumulate != 1 or mask is not None:
                raise ValueError("accumulate= and mask= need the one-call form "
                                 "step(loss_fn, targets); a closure handles them itself")
            return self._step_closure(closure, scaler, first_pass_context, clip)
        plan = _plan(targets, mask, accumulate)
        return self._step_loss_fn(closure, plan, scaler, first_pass_context, clip)

    def _step_loss_fn(self, loss_fn: Callable[..., Any], plan: _Plan, scaler: Any,
                      first_pass_context: _Ctx | None, clip: float | None) -> torch.Tensor:
        self.zero_grad(set_to_none=True)
        self._phase = "perturb"
        loss, go_on = self._perturbation_pass(
            lambda: self._run_pass(loss_fn, plan, scaler, (first_pass_context,)), scaler)
        if go_on:
            loss2 = self._run_pass(loss_fn, plan, scaler, (self._second_pass_context,))
            loss = loss2 if loss is None else loss
        self._finish(scaler, clip)
        assert isinstance(loss, torch.Tensor)
        return loss

    def _step_closure(self, closure: Callable[[], Any], scaler: Any,
                      first_pass_context: _Ctx | None, clip: float | None) -> Any:
        self._phase = "perturb"

        def first() -> Any:
            with torch.enable_grad(), (first_pass_context or contextlib.nullcontext)():
                return closure()

        loss, go_on = self._perturbation_pass(first, scaler)
        return self._closure_update(closure, loss, go_on, scaler, clip)

    def _closure_update(self, closure: Callable[[], Any], loss: Any, go_on: bool,
                        scaler: Any, clip: float | None) -> Any:
        """The closure's call at theta + eps (when the step goes on) and the base step."""
        if go_on:
            with torch.enable_grad(), self._second_pass_context():
                loss2 = closure()
            loss = loss2 if loss is None else loss
        self._finish(scaler, clip)
        return loss

    # ------------------------------------------------------------------ state
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's param groups and state (the stored perturbation of ``interval > 1``),
        ``"base_optimizer"``: the base optimizer's state, and ``"sam"``: the step counter."""
        if self._backup is not None:
            raise RuntimeError("state_dict() between first_step() and second_step(): the "
                               "parameters are perturbed; call second_step() (or restore()) first")
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd["sam"] = {"step": self._sam_step, "eps_valid": self._eps_valid,
                     "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        if "base_optimizer" not in sd:
            raise ValueError("state_dict has no 'base_optimizer' entry: it was not saved by "
                             f"{type(self).__name__}.state_dict()")
        base_sd = sd.pop("base_optimizer")
        counters = sd.pop("sam", {})  # absent in state dicts of older versions
        super().load_state_dict(sd)
        self.base_optimizer.load_state_dict(base_sd)
        # both loads made new group dicts: share one list again
        self.base_optimizer.param_groups = self.param_groups
        for group in self.param_groups:
            self._check_rho(group["rho"])
        self._sam_step = int(counters.get("step", 0))
        self._eps_valid = bool(counters.get("eps_valid", False))
        self.skipped_steps = int(counters.get("skipped_steps", 0))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rho={self.defaults['rho']}, p={self.p}, "
                f"perturbation_weighting={self.perturbation_weighting}, "
                f"update_weighting={self.update_weighting}, interval={self.interval}, "
                f"base={type(self.base_optimizer).__name__})")
