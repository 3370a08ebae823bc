r"""The numerical kernels of the sharpness-aware step: global norms over a list of gradients, the
dual-norm direction of the perturbation, and the finite check (with clipping) before a base step.

:func:`dual_norm_direction` is Eq. 2 of Foret et al. (2021) (BSAM paper Eq. 4/10) for any
:math:`p \ge 1`; :func:`finite_clipped_` is the one finite check and clip shared by every method's
step (the SAM family's second step and the single-pass step of :mod:`balanced_sam.methods`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["NORM_EPS", "global_norm", "global_max_abs", "dual_norm_direction", "finite_clipped_",
           "check_max_norm"]

NORM_EPS = 1e-16  # added to ||g||_2 as in the reference code


def global_max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The largest absolute entry over all of ``tensors`` (a 0-dim tensor)."""
    dev = tensors[0].device
    return torch.stack([n.to(dev) for n in torch._foreach_norm(tensors, math.inf)]).max()


def global_norm(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """The ``ord``-norm of the concatenation of ``tensors`` (half precision summed in float32,
    so a finite fp16/bf16 gradient cannot overflow to an infinite norm)."""
    dev = tensors[0].device
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    norms = torch._foreach_norm(tensors, ord, dtype=torch.float32 if low else None)
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms]), ord)
    return total


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
        norm = global_norm(grads, 2.0)
        ok = bool(torch.isfinite(norm) & (norm > 0))
        return (list(torch._foreach_div(grads, norm + NORM_EPS)) if ok else []), ok
    m = global_max_abs(grads)
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


@torch.no_grad()
def finite_clipped_(grads: list[torch.Tensor], max_norm: float | None) -> bool:
    """Whether every gradient in ``grads`` is finite (one host synchronisation); if so and their
    global 2-norm exceeds ``max_norm``, they are scaled in place to ``max_norm`` (the factor
    ``max_norm / (norm + 1e-6)`` of ``torch.nn.utils.clip_grad_norm_``). No gradients: True."""
    if not grads:
        return True
    norm = float(global_norm(grads, 2.0))
    if not math.isfinite(norm):
        return False
    if max_norm is not None and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return True


def check_max_norm(value: object, name: str = "max_grad_norm") -> float | None:
    """``value`` as a clipping norm: ``None`` (no clipping) or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
    return float(value)
