r"""The one-call step: the loop around a sharpness-aware optimizer, read top to bottom.

:func:`sharpness_step` is what ``opt.step(loss_fn, targets, ...)`` and ``opt.step(closure)`` run
for :class:`~balanced_sam.SAM`, :class:`~balanced_sam.BalancedSAM` and
:class:`~balanced_sam.ImbSAM`; :func:`plain_step` is the single-pass step of the methods without
a perturbation (:func:`balanced_sam.methods.build_stepper`). Both end in the same finite check and
clip (:func:`~balanced_sam.optim.norms.finite_clipped_`).

The loop's policy is given per call, as keyword options of the step (not as constructor
arguments and not as a policy object): ``model=`` with ``bn_second_pass="freeze"`` (BatchNorm
statistics of the first pass only), ``max_grad_norm=`` (clip the update gradient), ``mask=``,
``accumulate=``, ``scaler=`` and ``first_pass_context=``. Keywords keep the calling form the
users, examples and docs already have (``opt.step(loss_fn, targets, max_grad_norm=1.0)``); a loop
that fixes them once binds them with ``functools.partial(opt.step, model=..., ...)``, as
:func:`~balanced_sam.methods.build_stepper` does.

The driver needs only the public side of the optimizer, :class:`SharpnessOptimizer`: its
:class:`~balanced_sam.optim.weighting.PassWeighting` (which pass is in progress, the weights),
``perturbation_due`` / ``first_step`` / ``reuse_perturbation`` (move to
:math:`\theta + \hat\epsilon`), ``set_aside_grads`` (ImbSAM's head gradient) and ``finish_step``
(restore :math:`\theta`, check, clip, base step or skip).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim import Optimizer

from balanced_sam.losses import check_mask, reduce_losses
from balanced_sam.optim.norms import check_max_norm, finite_clipped_
from balanced_sam.optim.reuse import ReuseState
from balanced_sam.optim.weighting import PassWeighting, user_stacklevel

__all__ = ["sharpness_step", "plain_step", "frozen_bn_stats", "SharpnessOptimizer",
           "ContextFactory", "BN_SECOND_PASS", "pass_runner", "second_pass_context",
           "AccumulatedGradientWarning"]

#: a context manager factory wrapped around a pass, e.g. ``ddp_model.no_sync``
ContextFactory = Callable[[], contextlib.AbstractContextManager[Any]]
#: the choices of ``bn_second_pass``
BN_SECOND_PASS = ("update", "freeze")

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


class AccumulatedGradientWarning(UserWarning):
    """The first pass of a closure step added its gradient to gradients that were in ``.grad``
    before the step (the closure did not zero them): gradient accumulation outside the step,
    e.g. Lightning's ``Trainer(accumulate_grad_batches=K)``. The perturbation then comes from
    the earlier micro-batches plus this one, the update from this one alone."""


class SharpnessOptimizer(Protocol):
    """What :func:`sharpness_step` calls on the optimizer (all public on :class:`SAM`)."""

    weighting: PassWeighting
    param_groups: list[dict[str, Any]]
    reuse: ReuseState | None

    @property
    def skip_pending(self) -> bool: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def perturbation_due(self) -> bool: ...

    def first_step(self, zero_grad: bool = False) -> bool: ...

    def reuse_perturbation(self) -> bool: ...

    def set_aside_grads(self) -> None: ...

    def finish_step(self, scaler: Any = None, max_grad_norm: float | None = None) -> bool: ...


@dataclass
class _MicroBatch:
    index: slice | None  # what loss_fn is called with (None: called without argument)
    targets: torch.Tensor
    mask: torch.Tensor | None
    share: float  # the micro-batch's share of the batch (scales the regulariser)


def _micro_batches(targets: Any, mask: torch.Tensor | None, accumulate: Any
                   ) -> tuple[list[_MicroBatch], torch.Tensor | int | None]:
    """``accumulate`` near-equal parts of the batch along dimension 0, and the whole batch's
    normaliser (``None`` for one part: its own)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    mask = check_mask(mask, targets)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be an integer >= 1, got {accumulate!r}")
    if accumulate == 1:
        return [_MicroBatch(None, targets, mask, 1.0)], None
    n = targets.shape[0] if targets.dim() else 0
    if accumulate > n:
        raise ValueError(f"accumulate={accumulate} needs at least that many samples along the "
                         f"targets' first dimension, got targets of shape {tuple(targets.shape)}")
    denom: torch.Tensor | int = (max(targets.numel(), 1) if mask is None
                                 else mask.sum().clamp_min(1))
    parts, start = [], 0
    for i in range(accumulate):
        size = n // accumulate + (1 if i < n % accumulate else 0)
        sl = slice(start, start + size)
        parts.append(_MicroBatch(sl, targets[sl], None if mask is None else mask[sl], size / n))
        start += size
    return parts, denom


def _backward(loss: torch.Tensor, scaler: Any) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


_Pass = Callable[[Iterable[ContextFactory | None]], Any]


def _loss_fn_pass(weighting: PassWeighting, loss_fn: Callable[..., Any], targets: Any,
                  mask: torch.Tensor | None, accumulate: Any, scaler: Any) -> _Pass:
    """A pass of the one-call form: forward, reduce and backward over every micro-batch; its
    summed reduced loss (detached)."""
    parts, denom = _micro_batches(targets, mask, accumulate)

    def run(contexts: Iterable[ContextFactory | None]) -> torch.Tensor:
        total: torch.Tensor | None = None
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for ctx in contexts:
                if ctx is not None:
                    stack.enter_context(ctx())
            for b in parts:
                out = loss_fn() if b.index is None else loss_fn(b.index)
                loss = weighting.reduce(out, b.targets, b.mask, denom=denom, share=b.share)
                _backward(loss, scaler)
                total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        return total

    return run


_ACCUMULATION_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()


def _held_grads(opt: SharpnessOptimizer, log: Any) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """``(param, grad, version)`` of the gradients in ``.grad`` now, except those that the
    optimizer's ``zero_grad(set_to_none=False)`` left as zeros (``log``: its record)."""
    held = []
    for group in opt.param_groups:
        for prm in group["params"]:
            g = prm.grad
            if g is None:
                continue
            hit = log.zeroed.get(id(g))
            if hit is None or hit[0] is not g or hit[1] != g._version:
                held.append((prm, g, g._version))
    return held


def _check_accumulated(opt: SharpnessOptimizer, log: Any, calls: int,
                       held: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
    """Warn (once per optimizer) when the first pass added into gradients held before it and
    the closure did not call the optimizer's ``zero_grad``."""
    if not held or log.calls != calls or opt in _ACCUMULATION_WARNED:
        return
    if any(prm.grad is g and g._version != v for prm, g, v in held):
        _ACCUMULATION_WARNED.add(opt)
        warnings.warn(
            f"{type(opt).__name__}.step(closure): the closure did not zero the gradients, and "
            ".grad held gradients from before the step (accumulated micro-batches?): they went "
            "into the perturbation, while the second pass saw only this batch. A two-pass step "
            "cannot accumulate outside itself: do not use Lightning's "
            "Trainer(accumulate_grad_batches>1) or accelerate's accumulate(); use "
            "opt.step(loss_fn, targets, accumulate=K) (in Lightning: manual optimization), a "
            "closure that loops over the micro-batches, or a larger batch. (Warned once.)",
            AccumulatedGradientWarning, stacklevel=user_stacklevel())


def _closure_pass(opt: SharpnessOptimizer | None, closure: Callable[[], Any]) -> _Pass:
    """A pass of the closure form: the closure zeroes, computes (with ``opt.reduce``) and calls
    ``backward`` itself. The step's first pass checks that it did not add into gradients held
    from before the step."""
    log: Any = getattr(opt, "_zeroing", None)  # SAM's record of its zero_grad calls
    first = [log is not None]

    def run(contexts: Iterable[ContextFactory | None]) -> Any:
        check, first[0] = first[0], False
        if check:
            assert opt is not None
            held, calls = _held_grads(opt, log), log.calls
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for ctx in contexts:
                if ctx is not None:
                    stack.enter_context(ctx())
            out = closure()
        if check:
            assert opt is not None
            _check_accumulated(opt, log, calls, held)
        return out

    return run


def _lightning_code() -> tuple[set[Any], tuple[str, ...]]:
    """The code of ``LightningOptimizer.step`` and the folders of Lightning's training loops,
    for the Lightning packages that are imported (none imported: nothing)."""
    steps, loops = set(), []
    for pkg in ("lightning.pytorch", "pytorch_lightning"):
        core = sys.modules.get(f"{pkg}.core.optimizer")
        loop_file = getattr(sys.modules.get(f"{pkg}.loops"), "__file__", None)
        if core is not None and isinstance(loop_file, str):
            steps.add(core.LightningOptimizer.step.__code__)
            loops.append(os.path.dirname(os.path.abspath(loop_file)) + os.sep)
    return steps, tuple(loops)


_BYPASS_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()


def warn_if_lightning_bypassed(opt: Any) -> None:
    """Warn (once per optimizer) when ``opt.step`` runs inside a Lightning training loop but not
    through Lightning's optimizer wrapper (``self.optimizers().optimizer.step(...)``): Lightning
    does not count such a step. Costs nothing unless Lightning is imported."""
    if "lightning.pytorch" not in sys.modules and "pytorch_lightning" not in sys.modules:
        return
    steps, loops = _lightning_code()
    if not steps or opt in _BYPASS_WARNED:
        return
    frame: Any = sys._getframe(1)
    in_loop = False
    while frame is not None:
        if frame.f_code in steps:
            return
        in_loop = in_loop or frame.f_code.co_filename.startswith(loops)
        frame = frame.f_back
    if in_loop:
        _BYPASS_WARNED.add(opt)
        warnings.warn(
            f"{type(opt).__name__}.step was called on the optimizer inside Lightning's wrapper "
            "(self.optimizers().optimizer.step(...)): Lightning does not count this step, so "
            "global_step stays 0, ModelCheckpoint writes nothing and step-wise schedulers do "
            "not advance. Call the wrapper: self.optimizers().step(closure=loss_fn, "
            "targets=y). (Warned once.)", UserWarning, stacklevel=user_stacklevel())


def _second_pass_context(model: nn.Module | None, bn_second_pass: str) -> ContextFactory | None:
    if bn_second_pass not in BN_SECOND_PASS:
        raise ValueError(f"bn_second_pass must be 'update' or 'freeze', got {bn_second_pass!r}")
    if bn_second_pass == "freeze":
        if model is None:
            raise ValueError("bn_second_pass='freeze' needs the model: pass model=...")
        return lambda: frozen_bn_stats(model)
    return None


def _runner(opt: SharpnessOptimizer, loss_fn: Callable[..., Any], targets: Any,
            mask: torch.Tensor | None, accumulate: Any, scaler: Any) -> _Pass:
    """The pass of the calling form: the closure's, or the one-call form's (gradients zeroed)."""
    if targets is None and (accumulate != 1 or mask is not None):
        raise ValueError("accumulate= and mask= need the one-call form step(loss_fn, targets)")
    if targets is None:
        return _closure_pass(opt, loss_fn)
    run = _loss_fn_pass(opt.weighting, loss_fn, targets, mask, accumulate, scaler)
    opt.zero_grad(set_to_none=True)
    return run


def _gradient_reuse(opt: SharpnessOptimizer, run: _Pass, model: nn.Module | None, scaler: Any,
                    clip: float | None) -> tuple[Any, ...]:
    r"""Gradient reuse's part of a step (:mod:`~balanced_sam.optim.reuse`). An in-between
    step: one pass at :math:`\theta` (``"plain"``: update weights, every sample),
    ``finish_step`` adding the stored direction; returns ``(its loss,)``, the step is done.
    A full step whose perturbation weighting differs from the update's: first that pass for
    the reference gradient :math:`g` (``model``'s BatchNorm statistics left alone); returns
    ``()``, the step goes on."""
    reuse, w = opt.reuse, opt.weighting
    assert reuse is not None
    if not opt.perturbation_due():  # LookSAM's in-between step: one pass at theta
        opt.reuse_perturbation()
        single = run(())
        opt.finish_step(scaler, clip)
        return (single,)
    if reuse.needs_reference_pass(w):  # g: the update weighting's gradient at theta
        w.begin("plain")
        run((lambda: frozen_bn_stats(model),))
        w.end_pass()
        reuse.keep_reference(opt)  # type: ignore[arg-type]
        opt.zero_grad(set_to_none=True)
        w.begin("perturb")
    return ()


def sharpness_step(opt: SharpnessOptimizer, loss_fn: Callable[..., Any],
                   targets: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                   scaler: Any = None, first_pass_context: ContextFactory | None = None,
                   accumulate: int = 1, model: nn.Module | None = None,
                   bn_second_pass: str = "update", max_grad_norm: float | None = None) -> Any:
    r"""One sharpness-aware step; call it as ``opt.step(loss_fn, targets, ...)`` or
    ``opt.step(closure)`` (so LR schedulers and step hooks see one optimizer step):

    0. (gradient reuse) an in-between step is one pass at :math:`\theta`, and done; a full
       step may first run a reference pass (:func:`_gradient_reuse`).
    1. (ImbSAM) the head pass at :math:`\theta`, its gradient set aside; no tail: base step.
    2. the perturbation pass at :math:`\theta` (in ``first_pass_context``; ImbSAM's repeated
       pass keeps ``model``'s BatchNorm statistics), then :math:`\theta + \hat\epsilon`, or
       :math:`\theta + \hat\epsilon_{old}` on a step that reuses it (``interval > 1``).
    3. unless that gradient was not finite: the update pass at :math:`\theta + \hat\epsilon`
       (BatchNorm statistics frozen with ``bn_second_pass="freeze"``).
    4. ``finish_step``: back to :math:`\theta`, the set-aside gradient added, unscaled,
       checked (a non-finite gradient skips the step), clipped to ``max_grad_norm``, base step.

    Args:
        loss_fn: with ``targets``: returns unreduced losses of ``targets``' shape, or
            ``(losses, regulariser)``; called as ``loss_fn(chunk)`` with ``chunk`` a ``slice``
            of the batch when ``accumulate > 1``. Without ``targets``: a PyTorch closure (zero
            grads, forward, ``opt.reduce``, backward, return the loss).
        targets: the batch's labels (used to look up the weights).
        mask: boolean mask of the targets' shape: the elements that count (one-call form).
        scaler: a ``torch.amp.GradScaler`` (call ``scaler.update()`` after the step).
        first_pass_context: a context manager factory around the perturbation pass, e.g.
            ``ddp_model.no_sync`` for a per-replica perturbation.
        accumulate: micro-batches (one-call form); each one's weighted sum is divided by the
            whole batch's normaliser, so the gradient is the whole batch's.
        model: the model, for ``bn_second_pass="freeze"`` and ImbSAM's repeated pass.
        bn_second_pass: ``"update"`` (default, the reference: BatchNorm statistics move in both
            passes) or ``"freeze"`` (the perturbed pass leaves them alone).
        max_grad_norm: clip the update gradient to this global 2-norm (``None``: no clipping).

    Returns the first pass's loss (detached; a reusing step's at :math:`\theta+\hat\epsilon`;
    ImbSAM's head plus tail), or the closure's.
    """
    clip = check_max_norm(max_grad_norm)
    second_context = _second_pass_context(model, bn_second_pass)
    w = opt.weighting
    run = _runner(opt, loss_fn, targets, mask, accumulate, scaler)
    if opt.reuse is not None and (between := _gradient_reuse(opt, run, model, scaler, clip)):
        return between[0]
    head: Any = None  # ImbSAM: the head loss at theta
    loss: Any = None  # the loss of the pass that sets the perturbation
    first_done = False  # that pass already ran (ImbSAM's closure without opt.reduce)
    first_contexts: tuple[ContextFactory | None, ...] = (first_pass_context,)
    if w.splits:
        w.begin("head")
        head = run(())
        w.end_pass()
        if not w.reduced("head"):  # a closure without opt.reduce: no split, a SAM step on it
            head, loss, first_done = None, head, True
            w.begin("perturb")
        else:
            opt.set_aside_grads()
            if not w.tail_seen():  # nothing to perturb: the base step on the head loss
                opt.finish_step(scaler, clip)
                return head
            w.begin("tail")
            first_contexts = (first_pass_context, lambda: frozen_bn_stats(model))
    if first_done or opt.perturbation_due():
        loss = loss if first_done else run(first_contexts)
        if scaler is not None:
            scaler.unscale_(opt)
        opt.first_step(zero_grad=True)
    else:
        opt.reuse_perturbation()
    if not opt.skip_pending:
        update_loss = run((second_context,))
        loss = update_loss if loss is None else loss
    opt.finish_step(scaler, clip)
    if head is None:
        return loss
    return head + loss if isinstance(head, torch.Tensor) and isinstance(loss, torch.Tensor) \
        else head


def plain_step(opt: Optimizer, loss_fn: Callable[[], Any], targets: torch.Tensor, *,
               weighting: PassWeighting, mask: torch.Tensor | None = None, scaler: Any = None,
               first_pass_context: ContextFactory | None = None,
               max_grad_norm: float | None = None) -> torch.Tensor:
    """One forward/backward pass with ``weighting``'s update weights, and the base step of any
    ``torch.optim`` optimizer: the step of the methods without a perturbation.

    The gradient is unscaled (``scaler``), checked and clipped to ``max_grad_norm`` by the same
    :func:`~balanced_sam.optim.norms.finite_clipped_` as the sharpness-aware step; a non-finite
    one skips the step (parameters and optimizer state untouched) and is counted in
    ``opt.skipped_steps``. ``first_pass_context`` is accepted for the common signature and
    not used (there is no perturbation pass). Returns the reduced loss (detached).
    """
    clip = check_max_norm(max_grad_norm)
    opt.zero_grad(set_to_none=True)
    loss = reduce_losses(loss_fn(), targets, weighting.weights(targets, "update"), mask)
    _backward(loss, scaler)
    if scaler is not None:
        scaler.unscale_(opt)
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if finite_clipped_(grads, clip):
        scaler.step(opt) if scaler is not None else opt.step()
    else:  # the parameters and the optimizer's state stay as they were
        opt.skipped_steps = getattr(opt, "skipped_steps", 0) + 1  # type: ignore[attr-defined]
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.step(opt)  # finds the inf itself and skips; update() lowers the scale
    weighting.end_step(type(opt).__name__)  # forget the batch's cached weights
    return loss.detach()


def pass_runner(weighting: PassWeighting, loss_fn: Callable[..., Any],
                targets: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                accumulate: int = 1, scaler: Any = None,
                opt: SharpnessOptimizer | None = None) -> _Pass:
    """One pass of a step as a function of its contexts (the form of :func:`sharpness_step`):
    with ``targets``, ``loss_fn``'s losses reduced by ``weighting`` over every micro-batch and
    backpropagated, their sum returned (detached); without, the closure's own pass. For
    optimizers with their own sequence of passes (:class:`~balanced_sam.optim.CCSAM`); with
    ``opt``, a closure's first pass is checked for gradients held from before the step."""
    if targets is None:
        return _closure_pass(opt, loss_fn)
    return _loss_fn_pass(weighting, loss_fn, targets, mask, accumulate, scaler)


def second_pass_context(model: nn.Module | None, bn_second_pass: str) -> ContextFactory | None:
    """The context of a perturbed pass for ``bn_second_pass`` (``"freeze"``: ``model``'s
    BatchNorm statistics frozen; checked)."""
    return _second_pass_context(model, bn_second_pass)
