r"""A one-dimensional Gaussian mixture fitted by expectation-maximisation (numpy only).

Balanced MSE's GAI form (Ren et al., CVPR 2022) needs the training label distribution as a
Gaussian mixture :math:`p(y) = \sum_k \pi_k \mathcal N(y; \mu_k, v_k)`; the authors fit it with
scikit-learn's ``GaussianMixture`` (k-means initialisation, ``reg_covar=1e-6``). This module fits
the same model without that dependency:

1. initial centres at the weighted quantiles ``(k + 0.5) / K`` of the labels, refined by a few
   weighted Lloyd (k-means) iterations; each component starts from its cluster's share, mean
   and variance;
2. EM in float64 and log space until the mean log-likelihood per sample improves by less than
   ``tol``.

Labels may come with ``counts`` (multiplicities): EM on ``(value, count)`` pairs equals EM on
the repeated values, so a large discrete label set (ages, depth bins) is fitted from its
histogram at the cost of its number of distinct values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GaussianMixture1D", "fit_gmm_1d"]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True, eq=False)
class GaussianMixture1D:
    """Mixture weights ``pi_k``, means ``mu_k`` and variances ``v_k`` (float64 arrays of shape
    ``(K,)``), plus how the fit went: the mean log-likelihood per sample after every EM
    iteration (``log_likelihoods``) and whether it met the tolerance (``converged``)."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    log_likelihoods: tuple[float, ...] = ()
    converged: bool = True

    def __post_init__(self) -> None:
        w, m, v = (np.asarray(a, dtype=np.float64).reshape(-1)
                   for a in (self.weights, self.means, self.variances))
        if not (w.size == m.size == v.size) or w.size == 0:
            raise ValueError("weights, means and variances must be non-empty and of one length, "
                             f"got {w.size}, {m.size}, {v.size}")
        if not (np.isfinite(w).all() and np.isfinite(m).all() and np.isfinite(v).all()):
            raise ValueError("mixture parameters must be finite")
        if (w < 0).any() or not w.sum() > 0:
            raise ValueError("mixture weights must be non-negative with a positive sum")
        if (v <= 0).any():
            raise ValueError("mixture variances must be > 0")
        object.__setattr__(self, "weights", w / w.sum())
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "variances", v)

    def __eq__(self, other: object) -> bool:
        """Same parameters (the fit's history is not compared)."""
        if not isinstance(other, GaussianMixture1D):
            return NotImplemented
        return all(np.array_equal(a, b) for a, b in (
            (self.weights, other.weights), (self.means, other.means),
            (self.variances, other.variances)))

    __hash__ = None  # type: ignore[assignment]

    @property
    def n_components(self) -> int:
        return int(self.weights.size)

    def log_pdf(self, x: Any) -> np.ndarray:
        """Log density of the mixture at ``x`` (any shape)."""
        x = np.asarray(x, dtype=np.float64)
        return _logsumexp(_component_log_pdf(x.reshape(-1), self), axis=1).reshape(x.shape)

    def to_dict(self) -> dict[str, list[float]]:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(),
                "variances": self.variances.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GaussianMixture1D:
        return cls(np.asarray(d["weights"]), np.asarray(d["means"]), np.asarray(d["variances"]))


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _component_log_pdf(x: np.ndarray, gmm: GaussianMixture1D) -> np.ndarray:
    """``log pi_k + log N(x_i; mu_k, v_k)``, shape ``(N, K)``."""
    d2 = (x[:, None] - gmm.means[None, :]) ** 2
    return (np.log(gmm.weights)[None, :] - 0.5 * (_LOG_2PI + np.log(gmm.variances)[None, :])
            - 0.5 * d2 / gmm.variances[None, :])


def _weighted_quantiles(x: np.ndarray, c: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``x`` sorted, ``c`` its weights: the values at cumulative weight fractions ``q``."""
    cum = np.cumsum(c) / c.sum()
    return x[np.minimum(np.searchsorted(cum, q, side="left"), x.size - 1)]


def fit_gmm_1d(
    values: Any,
    n_components: int = 8,
    *,
    counts: Any = None,
    max_iter: int = 500,
    tol: float = 1e-8,
    reg_covar: float = 1e-6,
    kmeans_iter: int = 20,
) -> GaussianMixture1D:
    """Fit a ``n_components``-component Gaussian mixture to one-dimensional ``values``.

    Args:
        values: the labels (any shape, flattened), finite.
        n_components: ``K``; at most the number of distinct values. The Balanced MSE code uses
            8 for IMDB-WIKI-DIR and 16 for NYUD2-DIR.
        counts: optional non-negative multiplicity of each value (same size as ``values``).
        max_iter: EM iterations at most.
        tol: stop when the mean log-likelihood per sample improves by less than this.
        reg_covar: added to every variance (as scikit-learn's ``reg_covar``), so a component
            sitting on one repeated value keeps a finite density.
        kmeans_iter: Lloyd iterations of the initialisation.
    """
    x, c = _checked_values(values, counts)
    if not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
    if not reg_covar >= 0 or not tol >= 0:
        raise ValueError(f"reg_covar and tol must be >= 0, got {reg_covar!r}, {tol!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    # merge repeated values: EM on (value, count) pairs equals EM on the repeated values
    keep = c > 0
    x, inverse = np.unique(x[keep], return_inverse=True)
    c = np.bincount(inverse, weights=c[keep])
    k = int(n_components)
    if k > x.size:
        raise ValueError(f"n_components={k} exceeds the {x.size} distinct label value(s)")
    gmm = _initial_mixture(x, c, k, reg_covar, kmeans_iter)
    return _expectation_maximisation(x, c, gmm, max_iter, tol, reg_covar)


def _checked_values(values: Any, counts: Any) -> tuple[np.ndarray, np.ndarray]:
    """The values flattened to float64 and their counts (1 each when ``counts`` is None)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("values is empty: a mixture needs at least one label")
    if not np.isfinite(x).all():
        raise ValueError(f"values holds {int((~np.isfinite(x)).sum())} NaN/inf value(s)")
    if counts is None:
        return x, np.ones_like(x)
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if c.size != x.size:
        raise ValueError(f"counts must have one entry per value ({x.size}), got {c.size}")
    if not np.isfinite(c).all() or (c < 0).any() or not c.sum() > 0:
        raise ValueError("counts must be finite, non-negative and not all zero")
    return x, c


def _initial_mixture(x: np.ndarray, c: np.ndarray, k: int, reg_covar: float,
                     kmeans_iter: int) -> GaussianMixture1D:
    """Centres at the weighted quantiles, refined by weighted Lloyd iterations; each component
    starts from its cluster's share, mean and variance. ``x`` is sorted and distinct."""
    centres = _weighted_quantiles(x, c, (np.arange(k) + 0.5) / k).astype(np.float64)
    centres = np.unique(centres)
    if centres.size < k:  # quantiles collided on heavy values: add the farthest distinct ones
        rest = np.setdiff1d(x, centres)
        while centres.size < k:
            far = rest[np.argmax(np.abs(rest[:, None] - centres[None, :]).min(axis=1))]
            centres = np.sort(np.append(centres, far))
            rest = rest[rest != far]
    for _ in range(kmeans_iter):
        assign = np.abs(x[:, None] - centres[None, :]).argmin(axis=1)
        mass = np.bincount(assign, weights=c, minlength=k)
        sums = np.bincount(assign, weights=c * x, minlength=k)
        new = np.where(mass > 0, sums / np.maximum(mass, 1e-300), centres)
        if np.allclose(new, centres, rtol=0, atol=1e-12):
            break
        centres = new
    assign = np.abs(x[:, None] - centres[None, :]).argmin(axis=1)
    mass = np.bincount(assign, weights=c, minlength=k)
    sq = np.bincount(assign, weights=c * (x - centres[assign]) ** 2, minlength=k)
    spread = float(np.average((x - np.average(x, weights=c)) ** 2, weights=c))
    var0 = np.where(mass > 0, sq / np.maximum(mass, 1e-300), spread) + reg_covar
    var0 = np.maximum(var0, max(reg_covar, 1e-12))
    return GaussianMixture1D(np.maximum(mass, 1e-12), centres, var0)


def _expectation_maximisation(x: np.ndarray, c: np.ndarray, gmm: GaussianMixture1D,
                              max_iter: int, tol: float, reg_covar: float
                              ) -> GaussianMixture1D:
    """EM from ``gmm`` until the mean log-likelihood per sample improves by less than ``tol``
    (or ``max_iter`` iterations); the result carries the likelihood history."""
    total = c.sum()
    history: list[float] = []
    converged = False
    tiny = 10.0 * np.finfo(np.float64).eps
    for _ in range(max_iter):
        logp = _component_log_pdf(x, gmm)
        norm = _logsumexp(logp, axis=1)
        history.append(float((c * norm).sum() / total))
        if len(history) > 1 and history[-1] - history[-2] < tol:
            converged = True
            break
        resp = np.exp(logp - norm[:, None]) * c[:, None]           # (N, K), weighted
        nk = resp.sum(axis=0) + tiny
        means = (resp * x[:, None]).sum(axis=0) / nk
        variances = (resp * (x[:, None] - means[None, :]) ** 2).sum(axis=0) / nk + reg_covar
        gmm = GaussianMixture1D(nk, means, np.maximum(variances, 1e-300))
    else:
        logp = _component_log_pdf(x, gmm)
        history.append(float((c * _logsumexp(logp, axis=1)).sum() / total))
        converged = len(history) > 1 and history[-1] - history[-2] < tol
    return GaussianMixture1D(gmm.weights, gmm.means, gmm.variances,
                             log_likelihoods=tuple(history), converged=converged)
