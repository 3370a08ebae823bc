r"""Hessian spectra of the loss restricted to a subset of samples (a label region, bins, a mask).

For a subset :math:`S` of the samples and parameters :math:`\theta` the analysed loss is

.. math:: L_S(\theta) = \frac{1}{|S|} \sum_{i \in S} \ell(f_\theta(x_i), y_i),
          \qquad H_S = \nabla^2_\theta L_S(\theta).

:math:`H_S` is never formed. Everything is built on the Hessian-vector product (HVP)
:math:`H_S v`, computed by double backward ("Pearlmutter's trick") one mini-batch :math:`B` at a
time: the first backward pass builds :math:`g_B = \nabla_\theta \sum_{i\in B} \ell_i` with
``create_graph=True``, and the second differentiates :math:`g_B` against ``grad_outputs=v``, which
is the vector-Jacobian product :math:`v^\top \nabla_\theta g_B = (\nabla^2_\theta \sum_{i\in B}
\ell_i)\,v`. The batch results are summed and divided by :math:`|S|`, i.e. each batch's mean HVP is
weighted by its share :math:`|B|/|S|`, so the result is exactly :math:`H_S v` (the model runs in
eval mode, so :math:`\ell_i` depends on sample :math:`i` only). The graph of one batch is alive at a
time, which bounds the memory by the batch size: 1,000 CIFAR-sized images on a ResNet-18 fit in a
few GB with ``batch_size=256``.

* :func:`hessian_top_eigenvalue`: the largest eigenvalue :math:`\lambda_{\max}` by power iteration
  (default, as PyHessian) or by Lanczos with full re-orthogonalisation.
* :func:`hessian_trace`: :math:`\mathrm{Tr}(H_S)` by Hutchinson's estimator with Rademacher probes,
  with its standard error.

Guarantees: the model is put in eval mode (BatchNorm uses its running statistics, dropout is off)
and its previous mode restored; no parameter, buffer or ``.grad`` is written (``.grad`` is never
touched because only :func:`torch.autograd.grad` is used; in-place writes to parameters or
buffers during the analysis raise ``RuntimeError``); random vectors come from a
:class:`torch.Generator` seeded with ``seed`` on the CPU (never the global RNG), so a result is
reproducible and does not depend on the device.

Cost: one HVP costs about one forward, one backward and one double backward over the subset
(roughly 4-5 forward passes); ``cache_graph=True`` keeps the first-order graphs so later products
cost only the double backward. The trace shares each batch's graph among ``probe_chunk`` probes.
On a CPU whose cores are shared with other jobs, PyTorch's default thread count can make these
kernels an order of magnitude slower (OpenMP threads wait on each other); ``torch.set_num_threads``
with the number of idle cores avoids that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, Unpack

import numpy as np
import torch
from torch import nn

from balanced_sam.analysis._common import (
    Data,
    LossFn,
    Subset,
    eval_mode,
    model_device_dtype,
    resolve_loss,
    sample_losses,
    select,
)
from balanced_sam.bins import LabelBins
from balanced_sam.io import json_float, progress_bar

__all__ = [
    "EigenResult",
    "TraceResult",
    "HessianOperator",
    "hessian_top_eigenvalue",
    "hessian_trace",
]

SOLVERS = ("power", "lanczos")
#: the one default of the library and ``bsam analyze``: Lanczos returns the largest *algebraic*
#: eigenvalue (the paper's lambda_max); power iteration the one of largest magnitude, which on an
#: L1 loss (an indefinite Hessian) can be a negative eigenvalue
DEFAULT_SOLVER = "lanczos"


class OperatorOptions(TypedDict, total=False):
    """Keyword options of :class:`HessianOperator` that :func:`hessian_top_eigenvalue` and
    :func:`hessian_trace` pass on unchanged (documented there)."""

    bins: LabelBins | None
    region: str | None
    bin_ids: Sequence[int] | torch.Tensor | None
    many: int | None
    few: int | None
    batch_size: int
    params: Iterable[torch.Tensor] | None
    progress: bool
    cache_graph: bool


@dataclass
class EigenResult:
    """Estimate of the top Hessian eigenvalue.

    Attributes:
        eigenvalue: the estimate (NaN when the subset is empty).
        iterations: Hessian-vector products (iterations) used.
        converged: whether the stopping test passed before ``iters`` ran out.
        residual: :math:`\\|H u - \\lambda u\\|_2` of the returned unit vector :math:`u`; some
            eigenvalue of :math:`H` lies within this distance of ``eigenvalue``.
        num_samples: size of the subset.
        solver: ``"power"`` or ``"lanczos"``.
        history: the estimate after every iteration.
        eigenvector: the unit eigenvector estimate, one tensor per parameter (only with
            ``return_eigenvector=True``).
    """

    eigenvalue: float
    iterations: int
    converged: bool
    residual: float
    num_samples: int
    solver: str
    history: list[float] = field(default_factory=list)
    eigenvector: list[torch.Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (NaN becomes ``None``; the eigenvector is left out)."""
        return {
            "eigenvalue": json_float(self.eigenvalue),
            "iterations": self.iterations,
            "converged": self.converged,
            "residual": json_float(self.residual),
            "num_samples": self.num_samples,
            "solver": self.solver,
            "history": [json_float(h) for h in self.history],
        }


@dataclass
class TraceResult:
    """Hutchinson estimate of the Hessian trace.

    Attributes:
        trace: the mean of the probe values :math:`z_j^\\top H z_j` (NaN for an empty subset).
        std_error: sample standard deviation of the probe values / sqrt(probes) (NaN with a
            single probe).
        probes: number of probes used.
        converged: whether the early-stopping test (``tol``) passed; ``False`` when no ``tol``.
        num_samples: size of the subset.
        samples: the probe values :math:`z_j^\\top H z_j`.
    """

    trace: float
    std_error: float
    probes: int
    converged: bool
    num_samples: int
    samples: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (NaN becomes ``None``)."""
        return {
            "trace": json_float(self.trace),
            "std_error": json_float(self.std_error),
            "probes": self.probes,
            "converged": self.converged,
            "num_samples": self.num_samples,
            "samples": [json_float(s) for s in self.samples],
        }


class HessianOperator:
    r"""The linear map :math:`v \mapsto H_S v` for a model, a per-sample loss and a subset.

    Vectors are flat tensors of length :attr:`numel` (the parameters concatenated in order, on
    the parameters' device and dtype); :meth:`views` and :meth:`unflatten` convert.

    Args:
        model: the network; put in eval mode during every product, its mode restored after.
        loss_fn: per-sample loss ``(pred, target) -> (n,)``, a loss name, or ``None`` for L1.
        inputs, targets: tensors (first dimension = samples), or ``inputs`` an iterable of
            ``(x, y)`` batches and ``targets=None`` (it must yield the same samples in the same
            order on every pass).
        mask, bins, region, bin_ids, many, few: the subset, see :func:`select`.
        batch_size: samples per double-backward pass (tensor inputs).
        params: the parameters to differentiate against (default: every parameter of the model
            that requires grad), all on one device with one dtype.
        progress: show a tqdm bar over the mini-batches of each pass.
        cache_graph: keep every mini-batch's first-order graph after the first pass, so later
            products cost only the double backward (about 2-3x faster for ResNets) at the price
            of holding the autograd graph of the whole subset in memory (about the memory of a
            training step on the whole subset at once); :meth:`clear_cache` frees it.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | str | None = None,
        inputs: Any = None,
        targets: Any = None,
        mask: Any = None,
        *,
        bins: LabelBins | None = None,
        region: str | None = None,
        bin_ids: Sequence[int] | torch.Tensor | None = None,
        many: int | None = None,
        few: int | None = None,
        batch_size: int = 256,
        params: Iterable[torch.Tensor] | None = None,
        progress: bool = False,
        cache_graph: bool = False,
    ) -> None:
        if inputs is None:
            raise TypeError("inputs is required")
        self.model = model
        self.loss_fn, self.loss_name = resolve_loss(loss_fn)
        self.data = Data(inputs, targets, batch_size)
        self.params: list[torch.Tensor] = (
            [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        )
        if any(not p.requires_grad for p in self.params):
            raise ValueError("params must all require grad")
        self.device, self.dtype = model_device_dtype(self.params)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.numel = int(sum(self.numels))
        self.progress = progress
        self.cache_graph = bool(cache_graph)
        self._cache: list[tuple[list[torch.Tensor], list[int]]] | None = None
        self._indices: torch.Tensor | None = None
        self._subset: Subset | None = None
        self.num_samples: int | None
        if self.data.is_tensor:
            sel = select(self.data.targets, bins, region, bin_ids, mask, many=many, few=few)
            self.num_samples = int(sel.sum())
            if self.num_samples < len(self.data):
                self._indices = sel.nonzero().reshape(-1)
        else:
            self._subset = Subset(bins, region, bin_ids, mask, many, few)
            self.num_samples = None  # known after the first pass

    # ------------------------------------------------------------------ vectors
    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like the parameters (no copy)."""
        return [c.view(s) for c, s in zip(flat.split(self.numels), self.shapes)]

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Copies of a flat vector's pieces, shaped like the parameters."""
        return [v.clone() for v in self.views(flat)]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors shaped like the parameters into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors]).to(self.device, self.dtype)

    # ------------------------------------------------------------------ passes
    def _batches(self) -> Any:
        total = self.data.num_batches(None if self._indices is None else self.num_samples)
        bar = progress_bar(total=total, enabled=self.progress, leave=False, desc="batches")
        count = 0
        try:
            for x, y, offset in self.data.batches(self.device, self._indices):
                if self._subset is not None and not self._subset.is_all:
                    keep = self._subset(y, offset)
                    x, y = x[keep.to(x.device)], y[keep.to(y.device)]
                bar.update(1)
                if y.shape[0] == 0:
                    continue
                count += int(y.shape[0])
                yield x, y
        finally:
            bar.close()
        if self.num_samples is None:
            self.num_samples = count
        elif count != self.num_samples:
            raise RuntimeError(f"a pass over the data gave {count} samples of the subset, an "
                               f"earlier one {self.num_samples}: the data must not change")

    def _first_order(self, x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[int]]:
        """Gradient of the batch's loss sum, with its graph; only the pieces that depend on the
        parameters (a gradient constant in theta has a zero Hessian block row)."""
        losses, _ = sample_losses(self.model, self.loss_fn, x, y)
        grads = torch.autograd.grad(losses.sum(), self.params, create_graph=True,
                                    allow_unused=True, materialize_grads=True)
        keep = [i for i, g in enumerate(grads) if g.requires_grad]
        return [grads[i] for i in keep], keep

    def _graphs(self) -> Iterator[tuple[list[torch.Tensor], list[int]]]:
        """The first-order gradient pieces (with graph) of every mini-batch of the subset,
        rebuilt on each pass or, with ``cache_graph``, built once and kept."""
        if self._cache is not None:
            yield from self._cache
            return
        cache: list[tuple[list[torch.Tensor], list[int]]] = []
        for x, y in self._batches():
            grads, keep = self._first_order(x, y)
            if not grads:
                continue
            if self.cache_graph:
                cache.append((grads, keep))
            yield grads, keep
        if self.cache_graph:
            self._cache = cache

    def clear_cache(self) -> None:
        """Free the cached graphs (``cache_graph=True``)."""
        self._cache = None

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`H_S v` for a flat vector ``v`` (zeros for an empty subset)."""
        if v.shape != (self.numel,):
            raise ValueError(f"v must be a flat vector of {self.numel} values, "
                             f"got {tuple(v.shape)}")
        v = v.to(self.device, self.dtype)
        v_views = self.views(v)
        out = torch.zeros(self.numel, device=self.device, dtype=self.dtype)
        out_views = self.views(out)
        with eval_mode(self.model), torch.enable_grad():
            for grads, keep in self._graphs():
                hv = torch.autograd.grad(grads, self.params,
                                         grad_outputs=[v_views[i] for i in keep],
                                         retain_graph=self.cache_graph, allow_unused=True,
                                         materialize_grads=True)
                torch._foreach_add_(out_views, [h.detach() for h in hv])
        if self.num_samples:
            out.div_(self.num_samples)
        return out

    def quadratic_forms(self, probes: torch.Tensor) -> torch.Tensor:
        r""":math:`z_j^\top H_S z_j` for every row :math:`z_j` of ``probes`` (shape ``(k, numel)``).

        One first-order graph per mini-batch serves all ``k`` probes (``retain_graph``), so ``k``
        probes cost one forward/backward and ``k`` double-backward passes per batch rather than
        ``k`` of each. Returns float64 values, shape ``(k,)``.
        """
        if probes.dim() != 2 or probes.shape[1] != self.numel:
            raise ValueError(f"probes must have shape (k, {self.numel}), got {tuple(probes.shape)}")
        k = probes.shape[0]
        acc = torch.zeros(k, dtype=torch.float64, device=self.device)
        buf = torch.empty(self.numel, device=self.device, dtype=self.dtype)
        buf_views = self.views(buf)
        with eval_mode(self.model), torch.enable_grad():
            for grads, keep in self._graphs():
                for j in range(k):
                    z = probes[j].to(self.device, self.dtype)
                    z_views = self.views(z)
                    hv = torch.autograd.grad(grads, self.params,
                                             grad_outputs=[z_views[i] for i in keep],
                                             retain_graph=self.cache_graph or j < k - 1,
                                             allow_unused=True, materialize_grads=True)
                    torch._foreach_copy_(buf_views, [h.detach() for h in hv])
                    acc[j] += torch.dot(buf, z).to(torch.float64)
        if self.num_samples:
            acc.div_(self.num_samples)
        return acc.cpu()

    def ensure_count(self) -> int:
        """Size of the subset (for an iterable this costs one forward pass without gradients)."""
        if self.num_samples is None:
            with eval_mode(self.model), torch.no_grad():
                for _ in self._batches():
                    pass
        assert self.num_samples is not None
        return self.num_samples


# ---------------------------------------------------------------------------------- eigenvalue
def hessian_top_eigenvalue(
    model: nn.Module, loss_fn: LossFn | str | None = None, inputs: Any = None,
    targets: Any = None, mask: Any = None, *,
    iters: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    solver: Literal["power", "lanczos"] = DEFAULT_SOLVER,
    return_eigenvector: bool = False,
    **options: Unpack[OperatorOptions],
) -> EigenResult:
    r"""Top eigenvalue of the Hessian of the subset-mean loss, :math:`\lambda_{\max}(H_S)`.

    ``solver="power"`` (the PyHessian recipe): start from a seeded Gaussian unit vector
    :math:`v_0`; repeat :math:`w = H v_k`, :math:`\lambda_k = v_k^\top w`,
    :math:`v_{k+1} = w / \|w\|`, and stop when :math:`|\lambda_k - \lambda_{k-1}| \le
    \mathrm{tol}\,|\lambda_{k-1}|`. One HVP per iteration and two vectors of memory. It converges
    to the eigenvalue of largest *magnitude* (the dominant one; near a minimum that is the largest
    positive one), at the rate :math:`(\lambda_2/\lambda_1)^{2k}` for :math:`\lambda_k`; with a
    small gap the relative change can pass ``tol`` before the error does, see ``residual``.

    ``solver="lanczos"`` (default, :data:`DEFAULT_SOLVER`): Lanczos with full
    re-orthogonalisation builds the tridiagonal :math:`T_k = Q_k^\top H Q_k`
    (:math:`\alpha_j = q_j^\top H q_j`, :math:`\beta_j = \|r_j\|`) and returns its largest
    eigenvalue :math:`\theta` (the largest *algebraic* eigenvalue), stopping when the residual
    :math:`\beta_k |s_k| = \|H y - \theta y\|` of the Ritz
    pair is at most :math:`\mathrm{tol}\,|\theta|` (a bound: some eigenvalue lies within it) or
    the Krylov space is invariant. It needs far fewer HVPs than power iteration for a small
    spectral gap but keeps one vector per iteration (``iters * numel`` values).

    Args:
        model, loss_fn, inputs, targets, mask: as in :class:`HessianOperator`.
        **options: the subset and reading options of :class:`HessianOperator` (``bins``,
            ``region``, ``bin_ids``, ``many``, ``few``, ``batch_size``, ``params``,
            ``progress``: also tqdm bars over the iterations, ``cache_graph``).
        iters: maximum number of HVPs (iterations).
        tol: relative tolerance of the stopping test (see above).
        seed: seed of the starting vector.
        solver: ``"power"`` or ``"lanczos"``.
        return_eigenvector: attach the unit eigenvector (one tensor per parameter).

    Returns:
        :class:`EigenResult`; for an empty subset the eigenvalue is NaN and ``num_samples`` 0.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    op = HessianOperator(model, loss_fn, inputs, targets, mask, **options)
    progress = bool(options.get("progress", False))
    if op.ensure_count() == 0:
        return EigenResult(math.nan, 0, False, math.nan, 0, solver)
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(op.numel, generator=gen, dtype=torch.float64)
    v0 = (v0 / v0.norm()).to(op.device, op.dtype)
    with eval_mode(model):  # one mode switch for the whole run; also checks nothing changed
        if solver == "power":
            return _power(op, v0, iters, tol, return_eigenvector, progress)
        return _lanczos(op, v0, iters, tol, return_eigenvector, progress)


def _rel_change(new: float, old: float) -> float:
    if new == old:
        return 0.0
    return abs(new - old) / max(abs(old), 1e-30)


def _power(op: HessianOperator, v: torch.Tensor, iters: int, tol: float, want_vec: bool,
           progress: bool) -> EigenResult:
    history: list[float] = []
    converged = False
    residual = math.nan
    bar = progress_bar(range(iters), enabled=progress, desc="lambda_max (power)")
    try:
        for _ in bar:
            hv = op.matvec(v)
            lam = float(torch.dot(v, hv))
            residual = float(torch.linalg.vector_norm(hv - lam * v))
            history.append(lam)
            bar.set_postfix(lam=f"{lam:.5g}")
            if len(history) > 1 and _rel_change(lam, history[-2]) <= tol:
                converged = True
                break
            norm = float(torch.linalg.vector_norm(hv))
            if norm == 0.0:  # v is in the null space; with a zero Hessian the answer is 0
                converged = True
                break
            v = hv / norm
    finally:
        bar.close()
    return EigenResult(history[-1], len(history), converged, residual, int(op.num_samples or 0),
                       "power", history, op.unflatten(v) if want_vec else None)


def _lanczos(op: HessianOperator, q: torch.Tensor, iters: int, tol: float, want_vec: bool,
             progress: bool) -> EigenResult:
    basis: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    converged = False
    theta, residual, s = math.nan, math.nan, np.ones(1)
    bar = progress_bar(range(min(iters, op.numel)), enabled=progress, desc="lambda_max (lanczos)")
    try:
        for _ in bar:
            basis.append(q)
            w = op.matvec(q)
            alpha = float(torch.dot(q, w))
            alphas.append(alpha)
            # Full re-orthogonalisation (classical Gram-Schmidt, twice) against the whole basis;
            # it subsumes the three-term recurrence w -= alpha q_k + beta q_{k-1}.
            for _pass in range(2):
                coeffs = torch.stack([torch.dot(b, w) for b in basis])
                for c, b in zip(coeffs, basis):
                    w.sub_(b, alpha=float(c))
            beta = float(torch.linalg.vector_norm(w))
            k = len(alphas)
            t = np.diag(np.asarray(alphas)) + np.diag(np.asarray(betas), 1) + np.diag(
                np.asarray(betas), -1)
            evals, evecs = np.linalg.eigh(t)
            theta, s = float(evals[-1]), evecs[:, -1]
            residual = abs(beta * float(s[-1]))
            history.append(theta)
            bar.set_postfix(lam=f"{theta:.5g}", res=f"{residual:.2g}")
            invariant = beta <= 1e-12 * max(abs(theta), 1e-30) or k == op.numel
            if residual <= tol * abs(theta) or invariant:
                converged = True
                break
            betas.append(beta)
            q = w / beta
    finally:
        bar.close()
    vec = None
    if want_vec:
        y = torch.zeros(op.numel, device=op.device, dtype=op.dtype)
        for coef, b in zip(s.tolist(), basis):
            y.add_(b, alpha=coef)
        vec = op.unflatten(y / torch.linalg.vector_norm(y))
    return EigenResult(theta, len(history), converged, residual, int(op.num_samples or 0),
                       "lanczos", history, vec)


# ---------------------------------------------------------------------------------- trace
def hessian_trace(
    model: nn.Module, loss_fn: LossFn | str | None = None, inputs: Any = None,
    targets: Any = None, mask: Any = None, *,
    probes: int = 100,
    tol: float | None = None,
    min_probes: int = 10,
    probe_chunk: int = 32,
    seed: int = 0,
    **options: Unpack[OperatorOptions],
) -> TraceResult:
    r"""Hutchinson estimate of :math:`\mathrm{Tr}(H_S)` with Rademacher probes.

    For probes :math:`z_j \in \{-1, +1\}^P` with independent fair signs,
    :math:`E[z^\top H z] = \mathrm{Tr}(H)`; the estimate is the mean of :math:`m` values
    :math:`z_j^\top H z_j` and its standard error the sample standard deviation (``ddof=1``) over
    :math:`\sqrt{m}`. The variance is :math:`2 \sum_{a \ne b} H_{ab}^2` per probe, so a diagonal
    Hessian is estimated exactly by a single probe.

    Probes are processed ``probe_chunk`` at a time: per mini-batch one forward/backward builds the
    first-order graph and one double backward per probe reuses it (see
    :meth:`HessianOperator.quadratic_forms`). With ``tol`` the run stops after the first chunk
    (and at least ``min_probes`` probes) at which ``std_error <= tol * |trace|``; the probes are
    drawn one by one from the seeded generator, so a stopped run used exactly the first probes of
    the full run.

    Args:
        model, loss_fn, inputs, targets, mask: as in :class:`HessianOperator`.
        **options: as for :func:`hessian_top_eigenvalue` (for the trace ``cache_graph`` only
            helps when ``probes > probe_chunk``; ``progress`` also shows a bar over the probes).
        probes: maximum number of probes.
        tol: relative standard error at which to stop early (``None``: use all probes).
        min_probes: fewest probes before the early-stopping test applies.
        probe_chunk: probes per pass over the data (memory: one int8 vector each).
        seed: seed of the probes.

    Returns:
        :class:`TraceResult`; for an empty subset the trace is NaN and ``num_samples`` 0.
    """
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0 or None, got {tol!r}")
    if not isinstance(probe_chunk, int) or probe_chunk < 1:
        raise ValueError(f"probe_chunk must be a positive integer, got {probe_chunk!r}")
    op = HessianOperator(model, loss_fn, inputs, targets, mask, **options)
    progress = bool(options.get("progress", False))
    if op.ensure_count() == 0:
        return TraceResult(math.nan, math.nan, 0, False, 0)
    gen = torch.Generator().manual_seed(seed)
    values: list[float] = []
    converged = False
    bar = progress_bar(total=probes, enabled=progress, desc="trace (Hutchinson)")
    try:
        with eval_mode(model):
            while len(values) < probes:
                k = min(probe_chunk, probes - len(values))
                z = torch.stack([torch.randint(0, 2, (op.numel,), generator=gen, dtype=torch.int8)
                                 for _ in range(k)])
                z.mul_(2).sub_(1)
                values.extend(op.quadratic_forms(z).tolist())
                bar.update(k)
                est, se = _mean_se(values)
                bar.set_postfix(trace=f"{est:.5g}", se=f"{se:.2g}")
                if (tol is not None and len(values) >= min_probes and len(values) > 1
                        and se <= tol * abs(est)):
                    converged = True
                    break
    finally:
        bar.close()
    est, se = _mean_se(values)
    return TraceResult(est, se, len(values), converged, int(op.num_samples or 0), values)


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    if a.size == 1:
        return float(a[0]), math.nan
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size))
