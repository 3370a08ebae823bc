"""Loss baselines: focal-R, Balanced MSE's BNI and GAI forms, and the 1-D Gaussian-mixture EM.

Expected values are computed here by hand (plain ``math`` loops over the tiny inputs), never by
calling the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from balanced_sam.baselines import (
    BNILoss,
    GAILoss,
    GaussianMixture1D,
    bni_loss,
    fit_gmm_1d,
    focal_l1_loss,
    gai_loss,
)
from balanced_sam.bins import LabelBins


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------ focal-R
def test_focal_l1_hand_values() -> None:
    pred = torch.tensor([3.0, 0.5, 1.0])
    target = torch.tensor([1.0, 1.0, 1.0])
    out = focal_l1_loss(pred, target)  # beta 0.2, gamma 1, sigmoid (the DIR code's defaults)
    want = [2.0 * (2 * _sigmoid(0.2 * 2.0) - 1), 0.5 * (2 * _sigmoid(0.2 * 0.5) - 1), 0.0]
    assert out.shape == target.shape
    assert out.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
    out = focal_l1_loss(pred, target, beta=0.5, gamma=2.0, activation="tanh")
    want = [2.0 * math.tanh(1.0) ** 2, 0.5 * math.tanh(0.25) ** 2, 0.0]
    assert out.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
    # gamma = 0 is plain L1; a small error is discounted far more than a large one
    assert torch.equal(focal_l1_loss(pred, target, gamma=0.0), (pred - target).abs())
    ratio = focal_l1_loss(pred, target) / (pred - target).abs().clamp_min(1e-12)
    assert ratio[1] < ratio[0] < 1


def test_focal_l1_sigmoid_is_tanh_at_half_beta_and_dense_shapes() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 1, 3, 4) * 5, torch.randn(2, 1, 3, 4) * 5
    a = focal_l1_loss(pred, target, beta=0.3, activation="sigmoid")
    b = focal_l1_loss(pred, target, beta=0.15, activation="tanh")
    assert a.shape == pred.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_focal_l1_gradient_and_errors() -> None:
    pred = torch.tensor([1.0, 4.0], requires_grad=True)
    focal_l1_loss(pred, torch.tensor([1.0, 1.0])).sum().backward()
    # d/de [e (2 sigmoid(b e) - 1)] = (2 s - 1) + 2 b e s (1 - s), at e = 3 and at e = 0
    s = _sigmoid(0.6)
    assert pred.grad.tolist() == pytest.approx([0.0, (2 * s - 1) + 2 * 0.2 * 3 * s * (1 - s)])
    with pytest.raises(ValueError, match="beta"):
        focal_l1_loss(pred, pred, beta=0.0)
    with pytest.raises(ValueError, match="gamma"):
        focal_l1_loss(pred, pred, gamma=-1.0)
    with pytest.raises(ValueError, match="activation"):
        focal_l1_loss(pred, pred, activation="relu")


# ------------------------------------------------------------------------------------ BNI
def _bni_by_hand(p: float, y: float, var: float, centers, probs) -> float:
    total = sum(probs)
    lse = math.log(sum(pk / total * math.exp(-(p - c) ** 2 / (2 * var))
                       for c, pk in zip(centers, probs)))
    return 2 * var * ((p - y) ** 2 / (2 * var) + lse)


def test_bni_hand_values_and_gradient() -> None:
    centers, counts, var = [0.0, 2.0, 4.0], [1.0, 2.0, 1.0], 0.5
    pred = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([2.0, 2.5], dtype=torch.float64)
    out = bni_loss(pred, target, var, torch.tensor(centers, dtype=torch.float64),
                   torch.tensor(counts, dtype=torch.float64))
    assert out.shape == (2,)
    want = [_bni_by_hand(p, y, var, centers, counts) for p, y in ((1.0, 2.0), (3.0, 2.5))]
    assert out.tolist() == pytest.approx(want, rel=1e-12)
    out.sum().backward()
    # d/dp = 2 (p - y) - 2 sum_k r_k (p - c_k), r = softmax_k(log pi_k - (p - c_k)^2 / 2 var)
    for i, (p, y) in enumerate(((1.0, 2.0), (3.0, 2.5))):
        a = [c / 4 * math.exp(-(p - ck) ** 2 / (2 * var)) for ck, c in zip(centers, counts)]
        r = [v / sum(a) for v in a]
        g = 2 * (p - y) - 2 * sum(rk * (p - ck) for rk, ck in zip(r, centers))
        assert float(pred.grad[i]) == pytest.approx(g, rel=1e-10)


def test_bni_limits() -> None:
    # one bin: the gradient is 2 (c - y) whatever the prediction (the prior pulls to its mode)
    pred = torch.tensor([-3.0, 0.0, 5.0], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 1.0])
    bni_loss(pred, y, 1.0, torch.tensor([4.0]), torch.tensor([7.0])).sum().backward()
    assert pred.grad.tolist() == pytest.approx([6.0, 6.0, 6.0], rel=1e-5)
    # a flat prior over a wide fine grid: the balancing term is flat, so BNI acts as the MSE
    pred = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    grid = torch.linspace(-50, 50, 10001, dtype=torch.float64)
    bni_loss(pred, y, 1.0, grid, torch.ones_like(grid)).sum().backward()
    torch.testing.assert_close(pred.grad, 2 * (pred.detach() - y), atol=1e-6, rtol=0)


def test_bni_dense_shape_and_learnable_noise() -> None:
    torch.manual_seed(0)
    pred, target = torch.rand(2, 1, 3, 4) * 4, torch.rand(2, 1, 3, 4) * 4
    sigma = torch.tensor(0.7, requires_grad=True)
    out = bni_loss(pred, target, sigma ** 2, torch.tensor([0.5, 1.5, 2.5, 3.5]),
                   torch.tensor([5.0, 3.0, 1.0, 1.0]))
    assert out.shape == pred.shape
    out.mean().backward()
    assert sigma.grad is not None and torch.isfinite(sigma.grad) and float(sigma.grad) != 0
    with pytest.raises(ValueError, match="noise_var"):
        bni_loss(pred, target, 0.0, torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same shape"):
        bni_loss(pred, target[:1], 1.0, torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="one length"):
        bni_loss(pred, target, 1.0, torch.tensor([1.0, 2.0]), torch.tensor([1.0]))


def test_bni_module_builders() -> None:
    labels = torch.tensor([20, 20, 21, 25])
    loss = BNILoss.from_labels(labels)
    assert loss.centers.tolist() == [20.0, 21.0, 25.0]
    assert loss.probs.tolist() == pytest.approx([0.5, 0.25, 0.25])
    assert isinstance(loss.noise_sigma, torch.nn.Parameter) and loss.noise_sigma.item() == 1.0
    bins = LabelBins.from_labels(labels, bin_width=1.0)  # [20, 21), ..., [25, 26)
    lower = BNILoss.from_bins(bins, value="lower")
    assert lower.centers.tolist() == [20.0, 21.0, 25.0]   # empty bins dropped
    assert BNILoss.from_bins(bins).centers.tolist() == [20.5, 21.5, 25.5]
    # LDS on the counts [2, 1, 0, 0, 0, 1] with the triangular window [0.5, 1, 0.5]
    smooth = BNILoss.from_bins(bins, value="lower", lds=True, kernel="triang", ks=3)
    assert smooth.centers.tolist() == [20.0, 21.0, 22.0, 24.0, 25.0]
    want = np.array([2.5, 2.0, 0.5, 0.5, 1.0])
    assert smooth.probs.tolist() == pytest.approx((want / want.sum()).tolist(), rel=1e-6)
    # the module is the function with sigma^2, and the noise scale learns
    pred = torch.tensor([20.3, 24.0], requires_grad=True)
    y = torch.tensor([21.0, 25.0])
    out = loss(pred, y)
    torch.testing.assert_close(out, bni_loss(pred, y, 1.0, loss.centers, loss.probs))
    out.sum().backward()
    assert loss.noise_sigma.grad is not None and float(loss.noise_sigma.grad) != 0
    fixed = BNILoss.from_labels(labels, init_noise_sigma=2.0, learn_noise=False)
    assert not list(fixed.parameters()) and float(fixed.noise_var) == 4.0
    assert "noise_sigma" in fixed.state_dict()
    # NYUD2-style sharing: the bins below index 2 take bin 2's count
    shared = LabelBins([0.0, 0.1, 0.2, 0.3, 0.4], [0, 1, 6, 2], share_weight_below=2)
    nyu = BNILoss.from_bins(shared)
    assert nyu.centers.tolist() == pytest.approx([0.05, 0.15, 0.25, 0.35])
    assert nyu.probs.tolist() == pytest.approx([6 / 20, 6 / 20, 6 / 20, 2 / 20])
    with pytest.raises(ValueError, match="init_noise_sigma"):
        BNILoss([1.0], [1.0], init_noise_sigma=0.0)
    with pytest.raises(ValueError, match="counts"):
        BNILoss([1.0, 2.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="value"):
        BNILoss.from_bins(bins, value="upper")


# ------------------------------------------------------------------------------------ GAI
def test_gai_hand_values() -> None:
    w, mu, v, var = [0.3, 0.7], [0.0, 3.0], [1.0, 0.5], 0.8
    pred = torch.tensor([0.5, 2.0], dtype=torch.float64)
    target = torch.tensor([1.0, 4.0], dtype=torch.float64)
    f64 = dict(dtype=torch.float64)
    out = gai_loss(pred, target, var, torch.tensor(w, **f64), torch.tensor(mu, **f64),
                   torch.tensor(v, **f64))
    for i, (p, y) in enumerate(((0.5, 1.0), (2.0, 4.0))):
        bal = math.log(sum(wk * (vk + var) ** -0.5 * math.exp(-(p - mk) ** 2 / (2 * (vk + var)))
                           for wk, mk, vk in zip(w, mu, v)))
        want = 2 * var * ((p - y) ** 2 / (2 * var) + 0.5 * math.log(var) + bal)
        assert float(out[i]) == pytest.approx(want, rel=1e-12)


def test_gai_with_point_components_is_bni() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(6, dtype=torch.float64) * 2, torch.randn(6, dtype=torch.float64)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    mu = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    gai = gai_loss(pred, target, 0.6, w, mu, torch.full((3,), 1e-12, dtype=torch.float64))
    torch.testing.assert_close(gai, bni_loss(pred, target, 0.6, mu, w), rtol=0, atol=1e-9)


def test_gai_module_from_labels() -> None:
    rng = np.random.default_rng(0)
    labels = np.concatenate([rng.normal(20, 2, 300), rng.normal(50, 3, 100)])
    loss = GAILoss.from_labels(torch.tensor(labels), n_components=2)
    assert sorted(loss.gmm_means.tolist()) == pytest.approx([20, 50], abs=0.6)
    pred = torch.tensor([25.0, 45.0], requires_grad=True)
    out = loss(pred, torch.tensor([22.0, 48.0]))
    assert out.shape == (2,) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(pred.grad).all() and loss.noise_sigma.grad is not None
    with pytest.raises(TypeError, match="GaussianMixture1D"):
        GAILoss({"means": [0.0]})


# ------------------------------------------------------------------------------------ EM
def test_gmm_recovers_known_components() -> None:
    rng = np.random.default_rng(1)
    true_w, true_mu, true_sd = [0.5, 0.3, 0.2], [20.0, 45.0, 70.0], [4.0, 6.0, 3.0]
    n = 30000
    comp = rng.choice(3, size=n, p=true_w)
    x = rng.normal(np.take(true_mu, comp), np.take(true_sd, comp))
    gmm = fit_gmm_1d(x, 3)
    order = np.argsort(gmm.means)
    assert gmm.converged
    assert gmm.weights[order] == pytest.approx(true_w, abs=0.015)
    assert gmm.means[order] == pytest.approx(true_mu, abs=0.3)
    assert np.sqrt(gmm.variances[order]) == pytest.approx(true_sd, abs=0.3)
    # EM never lowers the likelihood
    assert np.all(np.diff(gmm.log_likelihoods) >= -1e-10)
    assert gmm.log_pdf([20.0, 45.0]).shape == (2,)


def test_gmm_one_component_is_the_sample_mean_and_variance() -> None:
    x = np.array([1.0, 2.0, 4.0, 9.0])
    gmm = fit_gmm_1d(x, 1, reg_covar=0.0)
    assert gmm.weights.tolist() == [1.0]
    assert gmm.means[0] == pytest.approx(4.0)
    assert gmm.variances[0] == pytest.approx(((1 - 4) ** 2 + (2 - 4) ** 2 + 0 + 25) / 4)


def test_gmm_counts_equal_repeated_values() -> None:
    values = np.array([10.0, 11.0, 12.0, 30.0, 31.0, 33.0])
    counts = np.array([5, 9, 4, 2, 6, 3])
    a = fit_gmm_1d(values, 2, counts=counts)
    b = fit_gmm_1d(np.repeat(values, counts), 2)
    for u, v in ((a.weights, b.weights), (a.means, b.means), (a.variances, b.variances)):
        np.testing.assert_allclose(u, v, rtol=1e-9)
    # log density by hand at one point
    x = 12.5
    dens = sum(w * math.exp(-(x - m) ** 2 / (2 * v)) / math.sqrt(2 * math.pi * v)
               for w, m, v in zip(a.weights, a.means, a.variances))
    assert float(a.log_pdf(x)) == pytest.approx(math.log(dens), rel=1e-10)


def test_gmm_errors_and_round_trip() -> None:
    with pytest.raises(ValueError, match="distinct"):
        fit_gmm_1d([1.0, 1.0, 2.0], 3)
    with pytest.raises(ValueError, match="NaN"):
        fit_gmm_1d([1.0, float("nan")], 1)
    with pytest.raises(ValueError, match="counts"):
        fit_gmm_1d([1.0, 2.0], 1, counts=[1, -1])
    with pytest.raises(ValueError, match="n_components"):
        fit_gmm_1d([1.0, 2.0], 0)
    g = fit_gmm_1d([1.0, 2.0, 5.0, 6.0], 2)
    assert GaussianMixture1D.from_dict(g.to_dict()) == g
