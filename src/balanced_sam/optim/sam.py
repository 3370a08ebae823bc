r"""Sharpness-aware minimisation: the optimizer shared by SAM, BalancedSAM and ImbSAM.

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

This module is the optimizer in ``torch.optim``'s sense: the perturbation, ASAM, per-group rho,
interval reuse, the exact restore, ``first_step`` / ``second_step``, the closure step and the
state dict. The weighting of each pass is a :class:`~balanced_sam.optim.weighting.PassWeighting`;
the loop around the passes (micro-batches, AMP scaler, clipping, BatchNorm freeze, ImbSAM's
three passes) is :func:`~balanced_sam.optim.driver.sharpness_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from balanced_sam.bins import LabelBins
from balanced_sam.losses import check_mask, split_loss_output
from balanced_sam.optim.driver import sharpness_step, warn_if_lightning_bypassed
from balanced_sam.optim.norms import (
    NORM_EPS,
    check_max_norm,
    dual_norm_direction,
    finite_clipped_,
    global_max_abs,
    global_norm,
)
from balanced_sam.optim.reuse import GradientReuse, reuse_of
from balanced_sam.optim.weighting import PassWeighting

__all__ = ["SAM"]

# what the constructor took before and where it went (a clear error instead of a TypeError
# from the base optimizer)
_MOVED = {"model": "the step", "bn_second_pass": "the step", "max_grad_norm": "the step",
          "normalize": "weighting", "weight_kwargs": "weighting"}


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


def _check_rho(rho: Any) -> None:
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not math.isfinite(rho) \
            or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _perturbation(param_groups: list[dict[str, Any]], p: float
                  ) -> tuple[list[tuple[list[torch.Tensor], list[torch.Tensor], float]], str]:
    """``[(params, vectors, alpha)]`` with eps = alpha * vectors for the parameters with a
    gradient, and the gradient's status: ``"ok"``, ``"zero"`` (no perturbation) or
    ``"nonfinite"`` (skip the step). Per group: its ``rho`` and ``adaptive`` (ASAM)."""
    groups = [(g, [q for q in g["params"] if q.grad is not None]) for g in param_groups]
    if not any(ps for _, ps in groups):
        return [], "zero"
    if p == 2 and not any(g["adaptive"] for g, ps in groups if ps):
        # the common case, fused: theta += rho / ||g|| * g
        norm = float(global_norm([_grad(q) for _, ps in groups for q in ps], 2.0))
        if not math.isfinite(norm):
            return [], "nonfinite"
        if norm == 0:
            return [], "zero"
        return [(ps, [_grad(q) for q in ps], g["rho"] / (norm + NORM_EPS))
                for g, ps in groups if ps and g["rho"] != 0], "ok"
    scaled: list[torch.Tensor] = []
    for g, ps in groups:
        grads = [_grad(q) for q in ps]
        if ps and g["adaptive"]:
            grads = list(torch._foreach_mul(grads, torch._foreach_abs(ps)))
        scaled.extend(grads)
    direction, ok = dual_norm_direction(scaled, p)
    if not ok:
        return [], "zero" if bool(torch.isfinite(global_max_abs(scaled))) else "nonfinite"
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


class _ZeroGradLog:
    """What ``zero_grad`` did: how often it was called, and the gradients that
    ``set_to_none=False`` left as zeros (``id -> (grad, version)``). An object, so that
    Lightning's wrapper (which shares the optimizer's methods) updates the optimizer's record."""

    def __init__(self) -> None:
        self.calls = 0
        self.zeroed: dict[int, tuple[torch.Tensor, int]] = {}


def _save_into(buffers: dict[torch.Tensor, torch.Tensor], ps: list[torch.Tensor]
               ) -> list[torch.Tensor]:
    """Copy ``ps`` into ``buffers`` kept between steps (no allocation after the first step)."""
    saved = []
    for p in ps:
        buf = buffers.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty_like(p)
            buffers[p] = buf
        saved.append(buf)
    torch._foreach_copy_(saved, ps)
    return saved


@torch.no_grad()
def _add_into_grads(aside: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add set-aside gradients to ``.grad`` (taking their place where ``.grad`` is None)."""
    both = [(prm.grad, g) for prm, g in aside if prm.grad is not None]
    if both:
        torch._foreach_add_([a for a, _ in both], [b for _, b in both])
    for prm, g in aside:
        if prm.grad is None:
            prm.grad = g


def _refuse_moved(owner: str, kwargs: dict[str, Any]) -> None:
    """A clear error for the constructor arguments that moved to the step or the weighting."""
    for key in sorted(set(kwargs) & set(_MOVED)):
        where = (f"an option of the step: opt.step(loss_fn, targets, {key}=...)"
                 if _MOVED[key] == "the step" else
                 f"an option of the weighting: weighting=PassWeighting(bins, ..., {key}=...)")
        raise TypeError(f"{owner}: {key} is {where}")


class SAM(Optimizer):
    r"""Sharpness-Aware Minimisation around any ``torch.optim`` optimizer.

    One :meth:`step`, for parameters :math:`\theta`, base optimizer ``base`` and per-sample
    losses :math:`\ell_i`:

    .. math::
        g &= \nabla_\theta \tfrac1B \textstyle\sum_i \ell_i(\theta) \\
        \hat\epsilon &= \rho\, \operatorname{sign}(g)\, |g|^{q-1} / \|g\|_q^{q/p},
            \qquad 1/p + 1/q = 1 \\
        \theta &\leftarrow \text{base}\big(\theta,\;
            \nabla_\theta \tfrac1B \textstyle\sum_i u_i\, \ell_i(\theta + \hat\epsilon)\big)

    with :math:`u_i = 1` (plain SAM) or :math:`u_i` the ``update_weighting`` scheme's weight of
    sample ``i``'s label bin (the paper's "SQINV + SAM": unweighted perturbation, SQINV update).

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``/``adaptive``).
        base_optimizer: the optimizer *class* (or factory) to wrap, e.g. ``torch.optim.SGD``;
            it is built on the same parameter groups, so ``param_groups`` are shared and LR
            schedulers attach to this wrapper directly.
        rho: radius of the perturbation ball, ``>= 0`` (``0``: the base step at twice the cost).
        p: norm of the ball, ``>= 1`` or ``inf`` (2 by default, the only value of the reference).
        bins: :class:`~balanced_sam.LabelBins` of the training labels, for a weighted update.
        update_weighting: ``None`` (unweighted update) or a scheme (``"sqrt_inv"``, ``"inv"``,
            ``"lds"``) for the update loss; ``"same"``: the perturbation's (unweighted here).
        weighting: the whole weighting as a :class:`~balanced_sam.optim.PassWeighting` (with
            ``normalize`` and ``weight_kwargs``); instead of ``bins`` / ``update_weighting``.
        adaptive: ASAM's weight-scaled perturbation.
        interval: a fresh perturbation only every ``interval`` steps, the last
            :math:`\hat\epsilon` reused in between (default 1). A reusing step costs one
            forward/backward pass at :math:`\theta + \hat\epsilon_{old}`. Applies to
            :meth:`step`; :meth:`first_step` always perturbs afresh. A
            :class:`~balanced_sam.optim.reuse.GradientReuse` ``(k, alpha)`` instead: LookSAM's
            gradient reuse (a full step every ``k`` steps; in between one pass at
            :math:`\theta`, the stored direction added; :mod:`balanced_sam.optim.reuse`).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``...).

    Calling forms (all weight through :meth:`reduce`): ``loss = opt.step(loss_fn, targets,
    **options)`` (``loss_fn()`` returns *unreduced* losses of the targets' shape, or ``(losses,
    regulariser)``; the options are :func:`~balanced_sam.optim.driver.sharpness_step`'s);
    ``opt.step(closure)`` with PyTorch's closure semantics, the closure computing its loss as
    ``opt.reduce(per_sample_losses, targets)`` (called at :math:`\theta` and at
    :math:`\theta + \hat\epsilon`); ``first_step()`` / ``second_step()`` around your own
    passes, with ``opt.reduce`` (after :meth:`first_step` a bare ``opt.step()`` finishes the
    step like :meth:`second_step`).

    A weighted step whose losses never went through :meth:`reduce` warns once
    (:class:`~balanced_sam.optim.BalancingNotAppliedWarning`). A NaN/inf gradient in either
    pass skips the whole step (parameters and base state untouched, gradients cleared; counted
    in ``skipped_steps``). A zero first-pass gradient means no perturbation
    (``last_step_perturbed``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Callable[..., Optimizer],
        rho: float = 0.05,
        p: float | int | str = 2,
        *,
        bins: LabelBins | None = None,
        update_weighting: str | None = None,
        weighting: PassWeighting | None = None,
        adaptive: bool = False,
        interval: int | GradientReuse = 1,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(base_optimizer, Optimizer):
            raise TypeError("base_optimizer must be an optimizer class such as torch.optim.SGD "
                            "(with its arguments as keyword arguments), not an instance")
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer must be an optimizer class, got {base_optimizer!r}")
        _refuse_moved(type(self).__name__, base_kwargs)
        _check_rho(rho)
        self.p = _parse_p(p)
        #: the period of fresh perturbations; gradient reuse (LookSAM): its state, else None
        self.interval, self.reuse = reuse_of(interval)
        if weighting is not None and (bins is not None or update_weighting is not None):
            raise ValueError("give weighting=PassWeighting(...) or bins= / update_weighting=, "
                             "not both")
        #: the weighting of each pass (and the pass in progress)
        self.weighting = weighting if weighting is not None else PassWeighting(
            bins, None, update_weighting)
        super().__init__(params, dict(rho=rho, adaptive=bool(adaptive), **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            _check_rho(group["rho"])
        self._backup: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        # parameter -> its saved copy at theta: one parameter-sized buffer, reused every step
        self._theta: dict[torch.Tensor, torch.Tensor] = {}
        self.last_step_perturbed: bool = False
        #: steps skipped because a gradient held NaN/inf
        self.skipped_steps: int = 0
        self._sam_step = 0  # base steps taken (the interval counts these)
        self._eps_valid = False  # a perturbation (reuse: a direction) is stored (interval > 1)
        self._skip_pending = False  # the first pass's gradient was not finite
        self._aside: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, grad) set aside
        self._aside_scaled = True  # the set-aside gradient is scaled like .grad
        self._zeroing = _ZeroGradLog()  # for the closure step's accumulation check

    @property
    def perturbation_weighting(self) -> str | None:
        """The scheme of the perturbation loss (``None``: unweighted)."""
        return self.weighting.perturbation

    @property
    def update_weighting(self) -> str | None:
        """The scheme of the update loss (``None``: unweighted)."""
        return self.weighting.update

    @property
    def first_pass(self) -> bool:
        """True until the first pass of the step in progress has ended: the pass at
        :math:`\\theta` (a reusing step's only pass). A ``training_step`` that a closure step
        runs twice logs its loss when this is True (see the Lightning page)."""
        return self.weighting.first_pass

    @property
    def skip_pending(self) -> bool:
        """The first pass's gradient was not finite: the step in progress will be skipped."""
        return self._skip_pending

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
        losses, reg = split_loss_output(per_sample_losses, name="opt.reduce()")
        if regularizer is not None:
            if reg is not None:
                raise ValueError("reduce() got a regulariser twice: in the pair and as "
                                 "regularizer=")
            _, reg = split_loss_output((losses, regularizer), name="opt.reduce()")
        return self.weighting.reduce((losses, reg), targets, check_mask(mask, targets),
                                     name="opt.reduce()")

    # ------------------------------------------------------------------ the perturbation
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
        self.weighting.end_pass()
        terms, status = _perturbation(self.param_groups, self.p)
        self._backup = []
        self._skip_pending = status == "nonfinite"
        if self.reuse is not None and not self._skip_pending:
            self.reuse.keep_reference(self)  # g of LookSAM (unless a reference pass gave it)
        keep = self.interval > 1 and self.reuse is None and not self._skip_pending
        if keep:  # the fresh perturbation replaces the stored one (none stored: eps = 0)
            for st in self.state.values():
                st.pop("eps", None)
            self._eps_valid = True
        for ps, vecs, alpha in terms:
            self._save(ps)
            if keep:
                for prm, e in zip(ps, torch._foreach_mul(vecs, alpha)):
                    self.state[prm]["eps"] = e
            torch._foreach_add_(ps, vecs, alpha=alpha)
        self.last_step_perturbed = bool(self._backup)
        self.weighting.begin("update")
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return self.last_step_perturbed

    def perturbation_due(self) -> bool:
        """Whether :meth:`step` computes a fresh perturbation now (else it reuses the stored one:
        ``interval > 1`` between refreshes)."""
        return self.interval == 1 or not self._eps_valid or self._sam_step % self.interval == 0

    @torch.no_grad()
    def reuse_perturbation(self) -> bool:
        r"""Move to :math:`\theta + \hat\epsilon_{old}`, the perturbation of the last refresh;
        returns whether one was stored. With gradient reuse: stay at :math:`\theta` for the
        in-between pass (weights of the ``"plain"`` pass); :meth:`finish_step` adds the stored
        direction."""
        if self._backup is not None:
            raise RuntimeError("reuse_perturbation() while a perturbation is applied")
        self._backup = []
        if self.reuse is not None:
            self.reuse.between, self.last_step_perturbed = True, False
            self.weighting.begin("plain")
            return False
        for g in self.param_groups:
            ps = [prm for prm in g["params"] if prm in self.state and "eps" in self.state[prm]]
            if ps:
                self._save(ps)
                torch._foreach_add_(ps, [self.state[prm]["eps"] for prm in ps])
        self.last_step_perturbed = bool(self._backup)
        self.weighting.begin("update")
        return self.last_step_perturbed

    def _save(self, ps: list[torch.Tensor]) -> None:
        assert self._backup is not None
        self._backup.append((ps, _save_into(self._theta, ps)))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved parameters back (exactly); a no-op when nothing is perturbed."""
        if self._backup:
            for ps, saved in self._backup:
                torch._foreach_copy_(ps, saved)
        self._backup = None

    # ------------------------------------------------------------------ finishing a step
    def set_aside_grads(self, pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None, *,
                        scaled: bool = True) -> None:
        """Keep gradients aside until :meth:`finish_step` adds them to ``.grad`` (ImbSAM's head
        gradient); ``pairs=None`` moves every ``.grad`` aside (no copy). ``scaled``: scaled like
        ``.grad`` under an AMP scaler (added before unscaling, else after). Calls add up."""
        if pairs is None:
            pairs = []
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        pairs.append((p, p.grad))
                        p.grad = None
        if self._aside and self._aside_scaled == scaled:
            have = {id(p): g for p, g in self._aside}
            for p, g in pairs:
                if id(p) in have:
                    have[id(p)].add_(g)
                else:
                    self._aside.append((p, g))
            return
        self._aside, self._aside_scaled = pairs, scaled

    def _add_aside(self, scaled: bool) -> None:
        if self._aside and self._aside_scaled == scaled:
            _add_into_grads(self._aside)
            self._aside = []

    def finish_step(self, scaler: Any = None, max_grad_norm: float | None = None) -> bool:
        """Restore :math:`\\theta`, add the set-aside gradients, unscale (``scaler``), check that
        every gradient is finite, clip to ``max_grad_norm``, take the base step or skip it
        (counted in ``skipped_steps``, gradients cleared); returns whether it stepped."""
        ok = not self._skip_pending
        if ok:  # (after a non-finite first pass the step forms run no second pass)
            self.weighting.end_pass()
        self.last_step_perturbed = bool(self._backup)
        self.restore()
        if ok:
            if self.reuse is not None:  # a full step: g_v from the update pass alone
                self.reuse.take_direction(self)
            self._add_aside(scaled=True)
            if scaler is not None:
                scaler.unscale_(self.base_optimizer)
            self._add_aside(scaled=False)
            if self.reuse is not None:  # an in-between step: g + alpha ||g|| g_v
                self.reuse.add_direction(self)
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            ok = finite_clipped_(grads, max_grad_norm)
        _base_step(self, ok, scaler)
        self._aside, self._skip_pending = [], False
        if self.reuse is not None:
            self._eps_valid = self.reuse.end_step(self, ok) or self._eps_valid
        self.weighting.end_step(type(self).__name__)
        return ok

    def second_step(self, zero_grad: bool = False, scaler: Any = None,
                    max_grad_norm: float | None = None) -> None:
        """Restore :math:`\\theta` and take the base step with the perturbed pass's gradients
        (:meth:`finish_step`), through :meth:`step`: schedulers and hooks see one step."""
        if self._backup is None:
            raise RuntimeError("second_step() called without first_step()")
        self.step(scaler=scaler, max_grad_norm=max_grad_norm)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[..., Any] | None = None,
             targets: torch.Tensor | None = None, **options: Any) -> Any:
        """Run both passes and the base step (:func:`~balanced_sam.optim.driver.sharpness_step`
        with ``options``); see the class docstring. After :meth:`first_step`, ``step()``
        without a closure finishes the step (as :meth:`second_step`) and returns None."""
        warn_if_lightning_bypassed(self)
        if closure is not None:
            if self._backup is not None:
                raise RuntimeError("first_step() is pending: finish it with second_step() (or "
                                   "a bare step()) before a new step")
            return sharpness_step(self, closure, targets, **options)
        _check_bare_step(self, targets, options)
        self.finish_step(options.get("scaler"), check_max_norm(options.get("max_grad_norm")))
        return None

    # ------------------------------------------------------------------ state
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        log = self._zeroing
        log.calls += 1
        log.zeroed = {} if set_to_none else {
            id(p.grad): (p.grad, p.grad._version) for g in self.param_groups
            for p in g["params"] if p.grad is not None}

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
            _check_rho(group["rho"])
        self._sam_step = int(counters.get("step", 0))
        self._eps_valid = bool(counters.get("eps_valid", False))
        self.skipped_steps = int(counters.get("skipped_steps", 0))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rho={self.defaults['rho']}, p={self.p}, "
                f"perturbation_weighting={self.perturbation_weighting}, "
                f"update_weighting={self.update_weighting}, "
                f"interval={self.reuse or self.interval}, "
                f"base={type(self.base_optimizer).__name__})")


def _check_bare_step(opt: SAM, targets: torch.Tensor | None, options: dict[str, Any]) -> None:
    """A ``step()`` without a closure must finish a pending :meth:`SAM.first_step`."""
    if targets is not None:
        raise ValueError("step() got targets but no loss_fn: call step(loss_fn, targets)")
    if opt._backup is None:
        raise ValueError(f"{type(opt).__name__}.step needs two passes: call "
                         "step(loss_fn, targets), step(closure), or first_step() / "
                         "second_step() around your own passes")
    unknown = set(options) - {"scaler", "max_grad_norm"}
    if unknown:
        raise TypeError(f"step() finishing first_step() takes scaler= and max_grad_norm=, "
                        f"got {sorted(unknown)}")


def _base_step(opt: SAM, ok: bool, scaler: Any) -> None:
    """The base optimizer's step on finite gradients; else the step is skipped and counted."""
    if ok:
        if scaler is not None:
            scaler.step(opt.base_optimizer)
        else:
            opt.base_optimizer.step()
        opt._sam_step += 1
    else:
        opt.skipped_steps += 1
        opt.last_step_perturbed = False
        opt.zero_grad(set_to_none=True)
