r"""Gradient reuse between sharpness-aware steps: LookSAM (Liu et al., CVPR 2022).

With period :math:`k`, strength :math:`\alpha` and :math:`g = \nabla L^u(\theta)` the gradient of
the *update* loss at :math:`\theta` (the update weighting's; see below):

* a **full step** (every :math:`k`-th, and the first) is the optimizer's ordinary two-pass step,
  updating with :math:`g_s = \nabla L^u(\theta + \hat\epsilon)`, and it stores the normalised
  component of :math:`g_s` orthogonal to :math:`g`:

  .. math::
      g_v = g_s - \frac{\langle g_s, g\rangle}{\langle g, g\rangle}\, g, \qquad
      \hat g_v = g_v / \|g_v\|_2

  (:math:`\hat g_v = 0` when :math:`g_v = 0`, e.g. with ``rho = 0``; :math:`g_v = g_s` when
  :math:`g = 0`);
* an **in-between step** runs one forward/backward pass at :math:`\theta` with the update
  weighting and updates with

  .. math:: g + \alpha\, \|g\|_2\, \hat g_v
      \;=\; g + \alpha\, \frac{\|g\|_2}{\|g_v\|_2}\, g_v \qquad\text{(the paper's form).}

The added term has norm :math:`\alpha\|g\|` whatever ``rho``: with a small ``rho`` the true
orthogonal part of :math:`g_s` is much smaller than that (on the default bench, ``rho = 0.01``,
``alpha = 0.7`` turns every in-between step by about 35 degrees). ``alpha="auto"`` (not in the
paper) takes the strength the last full step measured, :math:`\alpha = \|g_v\| / \|g_s\|`
(the sine of the angle between :math:`g_s` and :math:`g`), so an in-between step adds the
sharpness component in the proportion SAM's own update had:
:math:`g + \|g\|_2\, g_v^{full} / \|g_s^{full}\|_2`.

The decomposition is over the whole parameter vector (every parameter with a gradient, across
the parameter groups), as in the paper's equations; public implementations do it per tensor.
The gradients are those of the optimizer's passes after the AMP scaler's unscaling (the
direction does not depend on the scale) and before clipping: an in-between step clips
:math:`g + \alpha\|g\|\hat g_v`, the gradient it updates with.

**Which gradient is** :math:`g` **on a full step.** The stored direction is reused by an
in-between pass that weights with the *update* scheme, so :math:`g` is the update loss's
gradient at :math:`\theta` and :math:`g_s` the update pass's gradient (its weighting as
configured):

* SAM, BalancedSAM: when the perturbation and the update weightings coincide (``bsam``:
  SQINV both; ``vanilla-sam``: none both) :math:`g` is the perturbation pass's gradient,
  which is :math:`\nabla L^u(\theta)`: a full step costs two passes, as without reuse. When
  they differ (``sam``: unweighted perturbation, SQINV update; ``vanilla-bsam``) the
  perturbation pass's gradient :math:`\nabla L^w(\theta)` is not :math:`g`, and its
  orthogonal complement would store the difference of the two weightings as if it were
  sharpness; the one-call and closure forms then run one more pass at :math:`\theta` with the
  update weighting (BatchNorm statistics left alone) to get :math:`g`: three passes on a full
  step. The two-step form (``first_step`` / ``second_step``) takes the perturbation pass's
  gradient as :math:`g` (exact when the two weightings coincide);
* ImbSAM: the full step is ImbSAM's three passes; :math:`g` is the tail loss's gradient at
  :math:`\theta` and :math:`g_s` the tail's at :math:`\theta + \hat\epsilon_T` (both with the
  update weights), so :math:`\hat g_v` is the tail's sharpness direction and the head gradient
  takes no part in it. An in-between step is one pass over the whole batch (head and tail,
  update weights, the regulariser once) at :math:`\theta`: :math:`g = \nabla L_H + \nabla
  L_T`, scaled by its norm. A full step whose batch has no tail sample stores nothing (the
  last direction stays).

A full step that is skipped (a non-finite gradient in its perturbation or update pass) stores
nothing. A non-finite reference gradient alone (e.g. an fp16 overflow of the reference pass)
stores nothing either, and the step, decided by its own two passes, is taken: the last
direction stays.

``k = 1`` is the optimizer without reuse (nothing is stored). The stored direction lives in the
optimizer's state (``state[p]["reuse_dir"]``), so ``state_dict`` round-trips it mid-period; the
step counter is the optimizer's (``state_dict()["sam"]["step"]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from balanced_sam.optim.norms import global_norm
from balanced_sam.optim.weighting import PassWeighting

__all__ = ["GradientReuse", "ReuseState", "DEFAULT_ALPHA", "AUTO", "LOOKSAM_ALPHA", "reuse_of"]

#: the strength measured at the last full step (``||g_v|| / ||g_s||``) instead of a constant
AUTO = "auto"
#: LookSAM's constant strength, the value of the public implementations (e.g. pytorch_optimizer)
LOOKSAM_ALPHA = 0.7
#: the default strength: ``"auto"``. On the default bench (rho 0.01, 10 paired seeds) bsam-l5
#: at LookSAM's 0.7 was +20.41 [+17.46, +23.36] deg MAE All against bsam (every seed stopped
#: improving by epoch 5: the constant term swamps a small rho's correction), at "auto"
#: -0.41 [-0.97, +0.15]; pass ``alpha=LOOKSAM_ALPHA`` for the paper's form
DEFAULT_ALPHA: float | str = AUTO


@dataclass(frozen=True)
class GradientReuse:
    """LookSAM-style gradient reuse: a full step every ``k`` steps, ``alpha`` the strength of
    the reused direction, a number >= 0 or ``"auto"`` (see the module docstring). Give it as
    ``interval=`` of :class:`~balanced_sam.SAM`, :class:`~balanced_sam.BalancedSAM` or
    :class:`~balanced_sam.ImbSAM`: ``interval=GradientReuse(5)``."""

    k: int
    alpha: float | str = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"GradientReuse: k must be an integer >= 1, got {self.k!r}")
        a = self.alpha
        if a != AUTO and (isinstance(a, bool) or not isinstance(a, (int, float))
                          or not math.isfinite(a) or a < 0):
            raise ValueError(f"GradientReuse: alpha must be a finite number >= 0 or 'auto', "
                             f"got {a!r}")

    @property
    def factor(self) -> float:
        r"""What :math:`\|g\|` times the stored direction is multiplied by in between (the
        stored direction has norm 1, or :math:`\|g_v\|/\|g_s\|` with ``alpha="auto"``)."""
        return 1.0 if self.alpha == AUTO else float(self.alpha)


def _with_grad(opt: Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"] if p.grad is not None]


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The inner product of two lists of tensors as one vector (one host synchronisation;
    half precision summed in float32)."""
    if not a:
        return 0.0
    dev = b[0].device
    low = (torch.float16, torch.bfloat16)
    terms = [(torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) if x.dtype in low
              else torch.dot(x.reshape(-1), y.reshape(-1))).to(dev, torch.float64)
             for x, y in zip(a, b)]
    return float(torch.stack(terms).sum())


class ReuseState:
    """What an optimizer with gradient reuse keeps within a step: the reference gradient
    :math:`g` of a full step, the candidate direction (stored when the step is taken) and
    whether the step in progress is an in-between one. The stored direction itself is in the
    optimizer's state, under :data:`KEY`."""

    KEY = "reuse_dir"

    def __init__(self, spec: GradientReuse) -> None:
        self.spec = spec
        #: the step in progress is an in-between step (one pass, the direction added)
        self.between = False
        self._ref: dict[torch.Tensor, torch.Tensor] = {}  # param -> buffer (reused)
        self._kept: list[torch.Tensor] = []  # the params whose reference this step holds
        self._have_ref = False
        self._candidate: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def needs_reference_pass(self, weighting: PassWeighting) -> bool:
        """Whether a full step needs a pass of its own for :math:`g`: the perturbation pass
        weights differently from the update (and there is no head/tail split)."""
        return not weighting.splits and \
            weighting.scheme_of("perturb") != weighting.scheme_of("update")

    @torch.no_grad()
    def keep_reference(self, opt: Optimizer) -> None:
        """Copy the gradients now in ``.grad`` as :math:`g` (once per step: a reference pass
        before the perturbation pass wins over the perturbation pass's gradient)."""
        if self._have_ref:
            return
        ps = _with_grad(opt)
        bufs = []
        for p in ps:
            buf, g = self._ref.get(p), _grad(p)
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype \
                    or buf.device != g.device:
                buf = torch.empty_like(g)
                self._ref[p] = buf
            bufs.append(buf)
        if ps:
            torch._foreach_copy_(bufs, [_grad(p) for p in ps])
        self._kept, self._have_ref = ps, True

    @torch.no_grad()
    def take_direction(self, opt: Optimizer) -> None:
        r"""On a full step, with :math:`g_s` in ``.grad`` (before ImbSAM's head gradient is
        added): the candidate :math:`\hat g_v`, stored by :meth:`end_step` if the step is
        taken. Computed in the reference's buffers (no allocation after the first step)."""
        if not self._have_ref:
            return
        ps = _with_grad(opt)
        ref = [self._ref[p] for p in self._kept]
        kept = set(self._kept)
        paired = [p for p in ps if p in kept]
        paired_set = set(paired)
        if not ps:
            return
        rr = _dot(ref, ref)
        c = _dot([_grad(p) for p in paired], [self._ref[p] for p in paired]) / rr if rr > 0 \
            else 0.0
        out = []
        for p in ps:
            buf = self._ref.get(p)
            if p not in paired_set or buf is None:
                buf = _grad(p).clone()
                self._ref[p] = buf
            else:  # g_v = g_s - c g, in place of g
                buf.mul_(-c).add_(_grad(p))
            out.append(buf)
        norm = float(global_norm(out, 2.0))
        if not math.isfinite(norm):
            return  # (a scaled reference that overflowed: keep the last direction)
        if self.spec.alpha == AUTO:  # g_v / ||g_s||: ||g_v|| / ||g_s|| = sin(g_s, g), which
            # the AMP scale of either gradient leaves alone
            norm = float(global_norm([_grad(p) for p in ps], 2.0))
        if norm > 0:
            torch._foreach_div_(out, norm)
        self._candidate = list(zip(ps, out))

    @torch.no_grad()
    def add_direction(self, opt: Optimizer) -> None:
        r"""On an in-between step, with :math:`g` in ``.grad`` (unscaled):
        ``.grad`` :math:`\leftarrow g + \alpha \|g\|_2 \hat g_v`."""
        if not self.between or self.spec.factor == 0:
            return
        ps = [p for p in _with_grad(opt) if self.KEY in opt.state.get(p, {})]
        if not ps:
            return
        scale = global_norm([_grad(p) for p in _with_grad(opt)], 2.0) * self.spec.factor
        dirs = [opt.state[p][self.KEY] for p in ps]
        if scale.device.type == "cpu":  # one fused pass, no temporary (the host has the norm)
            torch._foreach_add_([_grad(p) for p in ps], dirs, alpha=float(scale))
        else:  # no host synchronisation on an accelerator
            step = torch._foreach_mul(dirs, scale.to(dirs[0].dtype))
            torch._foreach_add_([_grad(p) for p in ps], list(step))

    def end_step(self, opt: Optimizer, taken: bool) -> bool:
        """Store the candidate direction if the step was taken; forget the step. Returns
        whether a new direction was stored."""
        stored = False
        if taken and self._candidate is not None:
            keep = {p for p, _ in self._candidate}
            for p, st in opt.state.items():
                if p not in keep:
                    st.pop(self.KEY, None)
            for p, d in self._candidate:
                old = opt.state[p].get(self.KEY)
                # the candidate sits in the reference's buffer: swap it with the stored one
                opt.state[p][self.KEY] = d
                if old is not None and old.shape == d.shape and old.dtype == d.dtype:
                    self._ref[p] = old
                else:
                    self._ref.pop(p, None)
            stored = True
        self.between, self._have_ref, self._kept, self._candidate = False, False, [], None
        return stored

    def __repr__(self) -> str:
        return f"GradientReuse(k={self.spec.k}, alpha={self.spec.alpha})"


def reuse_of(interval: Any) -> tuple[int, ReuseState | None]:
    """``interval`` of the optimizers (an integer, or a :class:`GradientReuse`) as the period
    of fresh perturbations and the reuse state (``None``: no gradient reuse, also for k = 1)."""
    if isinstance(interval, GradientReuse):
        return interval.k, (ReuseState(interval) if interval.k > 1 else None)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an integer >= 1 or a GradientReuse(k, alpha), got "
                         f"{interval!r}")
    return interval, None
