"""Hessian eigenvalue and trace against closed forms.

Tolerances (float64 models unless stated):
* power iteration, ``tol=1e-6`` on the relative change: relative error <= 1e-3 (the error is about
  change / (1 - (lambda_2/lambda_1)^2), far below 1e-3 for the spectra used here), and the
  returned residual must bound the error (a theorem for symmetric matrices);
* Lanczos: Krylov space exhausted after <= P iterations, so exact to 1e-9 relative;
* Hutchinson: within 3 standard errors of the exact trace (the seed is fixed, so the test is
  deterministic; 3 SE is the usual 99.7 % band), and the reported SE within 25 % of the
  theoretical sqrt(2 sum_{a != b} H_ab^2 / m); a diagonal Hessian is exact for every probe
  (1e-12 relative);
* HVPs: independent of the batch size and equal to the full autograd Hessian times v (1e-10).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from balanced_sam.analysis import (
    HessianOperator,
    hessian_top_eigenvalue,
    hessian_trace,
    select,
)
from balanced_sam.bins import LabelBins


def sq(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target) ** 2


def make_ls(n: int = 120, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([3.0, 2.0, 1.2, 0.8, 0.5, 0.3, 0.2][:d], dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    y = torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def linear(d: int, bias: bool) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(d, 1, bias=bias).double()


def ls_hessian(x: torch.Tensor, bias: bool) -> np.ndarray:
    a = x.numpy()
    if bias:
        a = np.c_[a, np.ones(len(a))]
    return 2.0 * a.T @ a / len(a)


@pytest.mark.parametrize("bias", [False, True])
def test_least_squares_top_eigenvalue_matches_numpy(bias: bool) -> None:
    x, y = make_ls()
    h = ls_hessian(x, bias)
    lam = np.linalg.eigvalsh(h)[-1]
    model = linear(x.shape[1], bias)
    res = hessian_top_eigenvalue(model, sq, x, y, tol=1e-6, iters=500, batch_size=32,
                                 solver="power")
    assert res.converged and res.num_samples == len(y)
    assert abs(res.eigenvalue - lam) <= 1e-3 * lam
    assert abs(res.eigenvalue - lam) <= res.residual + 1e-12  # residual bound (some eigenvalue)
    lan = hessian_top_eigenvalue(model, sq, x, y, tol=1e-10, solver="lanczos", batch_size=32)
    assert lan.converged and lan.iterations <= h.shape[0]
    assert abs(lan.eigenvalue - lam) <= 1e-9 * lam


@pytest.mark.parametrize("bias", [False, True])
def test_least_squares_trace_within_three_standard_errors(bias: bool) -> None:
    x, y = make_ls()
    h = ls_hessian(x, bias)
    model = linear(x.shape[1], bias)
    m = 400
    res = hessian_trace(model, sq, x, y, probes=m, seed=3, batch_size=50)
    assert res.probes == m and len(res.samples) == m
    assert abs(res.trace - np.trace(h)) <= 3 * res.std_error
    off = h - np.diag(np.diag(h))
    se_theory = math.sqrt(2 * (off**2).sum() / m)
    assert res.std_error == pytest.approx(se_theory, rel=0.25)


def test_diagonal_hessian_trace_is_exact_for_every_probe() -> None:
    # Orthogonal columns: X^T X is diagonal, so z^T H z = sum_a H_aa z_a^2 = Tr(H) for any signs.
    d = 4
    x = torch.cat([torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))] * 5)
    y = torch.randn(len(x), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = linear(d, bias=False)
    exact = np.trace(ls_hessian(x, bias=False))
    res = hessian_trace(model, sq, x, y, probes=7)
    assert max(abs(s - exact) for s in res.samples) <= 1e-12 * exact
    assert res.std_error <= 1e-12 * exact
    stopped = hessian_trace(model, sq, x, y, probes=50, tol=1e-6, min_probes=3, probe_chunk=3)
    assert stopped.converged and stopped.probes == 3


class Quadratic(nn.Module):
    """Every sample's "prediction" is 0.5 w^T A w, so with loss = pred the Hessian is A."""

    def __init__(self, a: torch.Tensor, w0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.w @ self.a @ self.w).expand(x.shape[0])


def identity_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return pred


def spd(eigs: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    lam = torch.tensor(eigs, dtype=torch.float64)
    return q @ torch.diag(lam) @ q.T, q


def test_quadratic_with_known_eigenvalues() -> None:
    eigs = [10.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    a, q = spd(eigs)
    model = Quadratic(a, torch.ones(len(eigs), dtype=torch.float64))
    x, y = torch.zeros(8, 1), torch.zeros(8)
    res = hessian_top_eigenvalue(model, identity_loss, x, y, tol=1e-8, iters=300, solver="power",
                                 return_eigenvector=True)
    assert res.eigenvalue == pytest.approx(10.0, rel=1e-3)
    u = res.eigenvector[0]
    assert abs(float(u @ q[:, 0])) >= 1 - 1e-3  # the top eigenvector, up to sign
    lan = hessian_top_eigenvalue(model, identity_loss, x, y, solver="lanczos", tol=1e-12,
                                 return_eigenvector=True)
    assert lan.eigenvalue == pytest.approx(10.0, rel=1e-9)
    assert abs(float(lan.eigenvector[0] @ q[:, 0])) == pytest.approx(1.0, abs=1e-8)
    tr = hessian_trace(model, identity_loss, x, y, probes=300, seed=1)
    assert abs(tr.trace - sum(eigs)) <= 3 * tr.std_error


def test_power_finds_dominant_magnitude_lanczos_largest_algebraic() -> None:
    a, _ = spd([-8.0, 3.0, 1.0])
    model = Quadratic(a, torch.zeros(3, dtype=torch.float64))
    x, y = torch.zeros(2, 1), torch.zeros(2)
    power = hessian_top_eigenvalue(model, identity_loss, x, y, tol=1e-9, iters=500,
                                   solver="power")
    lan = hessian_top_eigenvalue(model, identity_loss, x, y, tol=1e-12, solver="lanczos")
    assert power.eigenvalue == pytest.approx(-8.0, rel=1e-3)
    assert lan.eigenvalue == pytest.approx(3.0, rel=1e-9)


def skewed_targets(n: int = 150, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 10).floor()


def test_subset_restriction_region_bins_and_mask() -> None:
    x, _ = make_ls(n=150)
    y = skewed_targets()
    bins = LabelBins.from_labels(y, bin_width=1.0)
    few = select(y, bins, "few", few=20)
    assert 0 < int(few.sum()) < len(y)
    h_few = ls_hessian(x[few], bias=True)
    model = linear(x.shape[1], bias=True)
    res = hessian_top_eigenvalue(model, sq, x, y, bins=bins, region="few", solver="lanczos",
                                 tol=1e-12, batch_size=16)
    assert res.num_samples == int(few.sum())
    assert res.eigenvalue == pytest.approx(np.linalg.eigvalsh(h_few)[-1], rel=1e-9)
    # the same subset through a mask and through the list of its bins
    few_bins = [k for k, r in enumerate(bins.regions(few=20)) if r == "few"]
    v = torch.randn(x.shape[1] + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = torch.from_numpy(h_few) @ v
    for kw in ({"mask": few}, {"bins": bins, "bin_ids": few_bins},
               {"bins": bins, "region": "few", "batch_size": 1000}):
        op = HessianOperator(model, sq, x, y, **kw)
        assert op.num_samples == int(few.sum())
        torch.testing.assert_close(op.matvec(v), expected, rtol=1e-10, atol=1e-12)


def test_hvp_matches_autograd_hessian_of_nonlinear_model_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    model.train()
    model(torch.randn(32, 3, dtype=torch.float64))  # non-trivial running statistics
    model.eval()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randn(40, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (c.view(s) for c, s in zip(flat.split([s.numel() for s in shapes]),
                                                            shapes))))
        pred = torch.func.functional_call(model, parts, (x,)).squeeze(-1)
        return ((pred - y) ** 2).mean()

    full = torch.autograd.functional.hessian(loss_of, flat0)
    v = torch.randn(flat0.numel(), dtype=torch.float64)
    model.train()  # the operator must switch to eval mode itself
    for bs in (7, 40):
        hv = HessianOperator(model, sq, x, y, batch_size=bs).matvec(v)
        torch.testing.assert_close(hv, full @ v, rtol=1e-10, atol=1e-10)
    assert model.training


def test_deterministic_given_seed_and_model_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 1))
    model.train()
    x, y = torch.randn(60, 4), torch.randn(60)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {"batch_size": 25}
    a = hessian_top_eigenvalue(model, None, x, y, iters=15, seed=4, **kw)
    b = hessian_top_eigenvalue(model, None, x, y, iters=15, seed=4, **kw)
    assert a.history == b.history
    t1 = hessian_trace(model, None, x, y, probes=6, seed=4, **kw)
    t2 = hessian_trace(model, None, x, y, probes=6, seed=4, probe_chunk=4, **kw)
    t3 = hessian_trace(model, None, x, y, probes=6, seed=5, **kw)
    assert t1.samples == pytest.approx(t2.samples, rel=1e-5)  # chunking keeps the probe sequence
    assert t1.samples != t3.samples
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # parameters and BN buffers unchanged
    assert all(p.grad is None for p in model.parameters())


def test_iterable_of_batches_equals_tensors() -> None:
    x, _ = make_ls(n=90)
    y = skewed_targets(90)
    bins = LabelBins.from_labels(y, bin_width=1.0)
    model = linear(x.shape[1], bias=True)
    loader = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 90, 20)]
    kw = {"bins": bins, "region": "few", "seed": 2}
    a = hessian_trace(model, sq, x, y, probes=5, **kw)
    b = hessian_trace(model, sq, loader, None, probes=5, **kw)
    assert a.num_samples == b.num_samples
    assert b.samples == pytest.approx(a.samples, rel=1e-10)
    mask = select(y, bins, "few")
    c = hessian_top_eigenvalue(model, sq, loader, None, mask=mask, solver="lanczos", tol=1e-12)
    d = hessian_top_eigenvalue(model, sq, x, y, mask=mask, solver="lanczos", tol=1e-12)
    assert c.eigenvalue == pytest.approx(d.eigenvalue, rel=1e-10)


def test_empty_subset_gives_nan_and_zero_count() -> None:
    x, y = make_ls(n=20)
    model = linear(x.shape[1], bias=True)
    none = torch.zeros(20, dtype=torch.bool)
    e = hessian_top_eigenvalue(model, sq, x, y, mask=none)
    t = hessian_trace(model, sq, x, y, mask=none)
    assert e.num_samples == 0 and math.isnan(e.eigenvalue) and e.to_dict()["eigenvalue"] is None
    assert t.num_samples == 0 and math.isnan(t.trace) and t.to_dict()["trace"] is None


def test_in_place_change_during_analysis_is_reported() -> None:
    class Sneaky(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.bias.add_(0.0)
            return super().forward(x)

    model = Sneaky(3, 1)
    with pytest.raises(RuntimeError, match="modified in place"):
        hessian_trace(model, None, torch.randn(5, 3), torch.randn(5), probes=1)


def test_bad_arguments() -> None:
    x, y = make_ls(n=10)
    model = linear(x.shape[1], bias=True)
    with pytest.raises(ValueError, match="solver"):
        hessian_top_eigenvalue(model, sq, x, y, solver="arnoldi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs bins"):
        hessian_trace(model, sq, x, y, region="few")
    with pytest.raises(ValueError, match="samples"):
        hessian_trace(model, sq, x, y[:5])
    with pytest.raises(ValueError, match="per-sample"):
        hessian_trace(model, lambda p, t: ((p - t) ** 2).mean(), x, y, probes=1)


def test_cached_graph_gives_the_same_products() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(50, 4, dtype=torch.float64)
    y = torch.randn(50, dtype=torch.float64)
    kw = {"batch_size": 16, "seed": 1}
    a = hessian_top_eigenvalue(model, sq, x, y, iters=10, tol=0.0, **kw)
    b = hessian_top_eigenvalue(model, sq, x, y, iters=10, tol=0.0, cache_graph=True, **kw)
    assert b.history == pytest.approx(a.history, rel=1e-12)
    t1 = hessian_trace(model, sq, x, y, probes=6, probe_chunk=2, **kw)
    t2 = hessian_trace(model, sq, x, y, probes=6, probe_chunk=2, cache_graph=True, **kw)
    assert t2.samples == pytest.approx(t1.samples, rel=1e-12)
    op = HessianOperator(model, sq, x, y, cache_graph=True)
    v = torch.randn(op.numel, dtype=torch.float64)
    first = op.matvec(v)
    assert op._cache is not None
    torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)
    op.clear_cache()
    assert op._cache is None
