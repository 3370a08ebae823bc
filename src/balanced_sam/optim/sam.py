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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from balanced_sam.bins import SCHEMES, LabelBins
from balanced_sam.losses import weighted_mean

__all__ = ["SAM", "frozen_bn_stats", "dual_norm_direction"]

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


def _global_max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    dev = tensors[0].device
    return torch.stack([n.to(dev) for n in torch._foreach_norm(tensors, math.inf)]).max()


def _global_norm(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    dev = tensors[0].device
    norms = torch._foreach_norm(tensors, ord)
    return torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms]), ord)


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
        return (torch._foreach_div(grads, norm + _NORM_EPS) if ok else []), ok
    m = _global_max_abs(grads)
    ok = bool(torch.isfinite(m) & (m > 0))
    if not ok:
        return [], False
    if p == math.inf:
        return torch._foreach_sign(grads), True
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
    d = torch._foreach_pow(u, q - 1.0)
    torch._foreach_mul_(d, torch._foreach_sign(grads))
    torch._foreach_div_(d, total.pow(1.0 / p))
    return d, True


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
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
            nbt = mod.num_batches_tracked
            saved.append((mod, mod.momentum, None if nbt is None else nbt.clone()))
            mod.momentum = 0.0
    try:
        yield
    finally:
        for mod, momentum, nbt in saved:
            mod.momentum = momentum
            if nbt is not None:
                mod.num_batches_tracked.copy_(nbt)


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
        model: the model, needed only for ``bn_second_pass="freeze"``.
        bn_second_pass: ``"update"`` (default, the reference behaviour: BatchNorm running
            statistics are updated in both passes) or ``"freeze"`` (the second, perturbed pass
            leaves them untouched).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``...).

    Zero or non-finite gradients: when the gradient used for the perturbation is all zero (e.g.
    every weight of the batch is 0) or holds inf/NaN, :math:`\hat\epsilon` is skipped (taken as 0)
    instead of dividing by a zero norm; ``last_step_perturbed`` tells whether the last step
    perturbed.

    Ways to call it:

    * ``loss = opt.step(loss_fn, targets)``: ``loss_fn()`` runs the forward pass and returns
      *unreduced* losses of the targets' shape (one per sample, or per element for dense
      targets); the optimizer reduces, weights, runs both backward passes and the base step, and
      returns the first pass's reduced loss (detached). Gradients are zeroed at the start.
    * ``opt.step(closure)`` with PyTorch closure semantics (the closure zeroes the gradients,
      computes the loss, calls ``backward`` and returns the loss): called twice, at
      :math:`\theta` and at :math:`\theta+\hat\epsilon`.
    * ``first_step()`` / ``second_step()`` around your own two backward passes.

    Mixed precision: pass ``scaler=`` (a ``torch.amp.GradScaler``) to :meth:`step`; it unscales
    the first-pass gradients before the norm, and on inf/NaN in either pass the parameters are
    restored and the base step is skipped (call ``scaler.update()`` after the step as usual).
    """

    #: perturbation weighting scheme; ``None`` for SAM, set by BalancedSAM
    perturbation_weighting: str | None = None

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
        self.bins = bins
        self.normalize = normalize
        self.weight_kwargs = dict(weight_kwargs or {})
        self.model = model
        self.bn_second_pass = bn_second_pass
        self.update_weighting = self._resolve_update_weighting(update_weighting)
        if bins is not None:  # validate scheme / normalize / kwargs now, not at the first step
            for scheme in {self.perturbation_weighting, self.update_weighting} - {None}:
                bins.weights(scheme, normalize, **self.weight_kwargs)
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

    # ------------------------------------------------------------------ the two steps
    def _params_with_grad(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        return [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        r"""Move to :math:`\theta + \hat\epsilon` using the gradients now in ``.grad``.

        Saves a copy of the parameters for :meth:`second_step`. Returns whether a perturbation
        was applied (False for a zero or non-finite gradient). ``zero_grad`` clears the
        gradients afterwards, ready for the second backward pass.
        """
        if self._backup is not None:
            raise RuntimeError("first_step() called twice without second_step()")
        groups = self._params_with_grad()
        all_params = [p for _, ps in groups for p in ps]
        self._backup = []
        self.last_step_perturbed = False
        if all_params and self.p == 2 and not any(g["adaptive"] for g, ps in groups if ps):
            # the common case in one fused pass per group: theta += rho / ||g|| * g
            norm = float(_global_norm([p.grad for p in all_params], 2.0))  # one host sync
            if math.isfinite(norm) and norm > 0:
                for g, ps in groups:
                    if ps and g["rho"] != 0:
                        self._save(ps)
                        torch._foreach_add_(ps, [p.grad for p in ps],
                                            alpha=g["rho"] / (norm + _NORM_EPS))
        elif all_params:
            scaled = []
            for g, ps in groups:
                grads = [p.grad for p in ps]
                if ps and g["adaptive"]:
                    grads = torch._foreach_mul(grads, torch._foreach_abs(ps))
                scaled.extend(grads)
            direction, ok = dual_norm_direction(scaled, self.p)
            if ok:
                start = 0
                for g, ps in groups:
                    if not ps:
                        continue
                    d = direction[start:start + len(ps)]
                    start += len(ps)
                    if g["rho"] == 0:
                        continue
                    torch._foreach_mul_(d, g["rho"])
                    if g["adaptive"]:
                        torch._foreach_mul_(d, torch._foreach_abs(ps))
                    self._save(ps)
                    torch._foreach_add_(ps, d)
        self.last_step_perturbed = bool(self._backup)
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return self.last_step_perturbed

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
        self._backup.append((ps, saved))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved parameters back (exactly); a no-op when nothing is perturbed."""
        if self._backup:
            for ps, saved in self._backup:
                torch._foreach_copy_(ps, saved)
        self._backup = None

    def second_step(self, zero_grad: bool = False, scaler: Any = None) -> None:
        """Restore :math:`\\theta` and take the base optimizer's step with the current gradients
        (those of the perturbed pass). With ``scaler`` the step goes through
        ``scaler.step(self.base_optimizer)``, which unscales and skips on inf/NaN."""
        if self._backup is None:
            raise RuntimeError("second_step() called without first_step()")
        self.restore()
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._opt_called = True  # tell LR schedulers an optimizer step happened
        if zero_grad:
            self.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ one call
    @staticmethod
    def _check_losses(losses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(losses).__name__}")
        if losses.dim() == 0 and targets.dim() > 0:
            raise ValueError(
                "loss_fn returned a scalar: it must return unreduced per-sample losses with the "
                f"targets' shape {tuple(targets.shape)} (use reduction='none')")
        try:
            torch.broadcast_shapes(losses.shape, targets.shape)
        except RuntimeError as exc:
            raise ValueError(f"loss_fn returned shape {tuple(losses.shape)}, which does not "
                             f"broadcast to the targets' shape {tuple(targets.shape)}") from exc
        return losses

    def _backward(self, loss: torch.Tensor, scaler: Any) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _found_inf(self, scaler: Any) -> bool:
        """Whether ``scaler.unscale_(self)`` found inf/NaN in the gradients (one sync)."""
        state = scaler._per_optimizer_states[id(self)]
        return bool(sum(v.item() for v in state["found_inf_per_device"].values()))

    def _second_pass_context(self) -> contextlib.AbstractContextManager:
        if self.bn_second_pass == "freeze":
            return frozen_bn_stats(self.model)
        return contextlib.nullcontext()

    def step(  # type: ignore[override]
        self,
        loss_fn: Callable[[], torch.Tensor] | None = None,
        targets: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        scaler: Any = None,
        first_pass_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> torch.Tensor | None:
        """Run both passes and the base step; see the class docstring.

        Args:
            loss_fn: with ``targets``: returns unreduced losses (``targets``' shape). Without
                ``targets``: a PyTorch closure (zero grads, forward, backward, return loss).
            targets: the batch's labels (used to look up the weights).
            mask: optional boolean mask of the elements that count (dense targets); the
                reduction is then the mean over the masked elements.
            scaler: a ``torch.amp.GradScaler`` for fp16 mixed precision.
            first_pass_context: a context manager factory wrapped around the first forward and
                backward pass, e.g. ``ddp_model.no_sync`` to perturb each replica with its own
                gradient (the "local" scope of the SAM paper).

        Returns the first pass's reduced loss (detached), or the closure's first return value.
        """
        if loss_fn is None:
            raise ValueError("SAM.step needs two passes: call step(loss_fn, targets), "
                             "step(closure), or first_step()/second_step() around your own passes")
        if targets is None:
            return self._step_closure(loss_fn, first_pass_context)
        ctx = first_pass_context or contextlib.nullcontext
        w_pert = self.perturbation_weights(targets)
        same = self.update_weighting == self.perturbation_weighting
        w_upd = w_pert if same else self.update_weights(targets)
        self.zero_grad(set_to_none=True)
        with torch.enable_grad(), ctx():
            loss = weighted_mean(self._check_losses(loss_fn(), targets), w_pert, mask)
            self._backward(loss, scaler)
        if scaler is not None:
            scaler.unscale_(self)
            if self._found_inf(scaler):  # skip the whole step; scaler.update() lowers the scale
                self.zero_grad(set_to_none=True)
                self.last_step_perturbed = False
                return loss.detach()
        self.first_step(zero_grad=True)
        with torch.enable_grad(), self._second_pass_context():
            loss2 = weighted_mean(self._check_losses(loss_fn(), targets), w_upd, mask)
            self._backward(loss2, scaler)
        self.second_step(scaler=scaler)
        return loss.detach()

    def _step_closure(self, closure: Callable[[], Any],
                      first_pass_context: Callable[[], contextlib.AbstractContextManager] | None
                      ) -> Any:
        ctx = first_pass_context or contextlib.nullcontext
        with torch.enable_grad(), ctx():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad(), self._second_pass_context():
            closure()
        self.second_step()
        return loss

    # ------------------------------------------------------------------ state
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's param groups plus ``"base_optimizer"``: the base optimizer's state."""
        if self._backup is not None:
            raise RuntimeError("state_dict() between first_step() and second_step(): the "
                               "parameters are perturbed; call second_step() (or restore()) first")
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        if "base_optimizer" not in sd:
            raise ValueError("state_dict has no 'base_optimizer' entry: it was not saved by "
                             f"{type(self).__name__}.state_dict()")
        base_sd = sd.pop("base_optimizer")
        super().load_state_dict(sd)
        self.base_optimizer.load_state_dict(base_sd)
        # both loads made new group dicts: share one list again
        self.base_optimizer.param_groups = self.param_groups
        for group in self.param_groups:
            self._check_rho(group["rho"])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rho={self.defaults['rho']}, p={self.p}, "
                f"perturbation_weighting={self.perturbation_weighting}, "
                f"update_weighting={self.update_weighting}, "
                f"base={type(self.base_optimizer).__name__})")
