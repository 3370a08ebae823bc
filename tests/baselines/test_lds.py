"""LDS for any number of bins (issue 17, item 12): the smoothing is the DIR code's
``scipy.ndimage.convolve1d(values, weights=window, mode="constant")``, one value per bin, also
with fewer bins than the kernel has taps (where ``np.convolve(..., mode="same")`` returned
``max(K, ks)`` values and every LDS user broke)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import convolve1d

from balanced_sam import LabelBins, lds_kernel
from balanced_sam.baselines import BNILoss
from balanced_sam.bins import lds_smooth

SIZES = [1, 2, 3, 4, 5, 8]


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("ks", [5, 9])
@pytest.mark.parametrize("kernel", ["gaussian", "triang", "laplace"])
def test_lds_smooth_is_the_reference_convolve1d(k, ks, kernel):
    values = np.random.default_rng(k * 100 + ks).uniform(0, 50, size=k)
    window = lds_kernel(kernel, ks, 2.0)
    got = lds_smooth(values, window)
    want = convolve1d(values, weights=window, mode="constant")
    assert got.shape == (k,)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def _counts_of(k):
    """Integer labels 0..k-1 with counts 1..k (a long tail toward 0)."""
    return np.repeat(np.arange(k, dtype=np.float64), np.arange(1, k + 1))


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("ks", [5, 9])
@pytest.mark.parametrize("base", ["sqrt_inv", "inv"])
def test_lds_weights_for_any_number_of_bins(k, ks, base):
    labels = _counts_of(k)
    bins = LabelBins.from_labels(labels, bin_width=1, lower=0, upper=k)
    assert bins.num_bins == k
    w = bins.weights("lds", lds_base=base, ks=ks, normalize="none")
    n = bins.counts.double().numpy()
    eff = np.sqrt(n) if base == "sqrt_inv" else np.clip(n, 5, 1000)
    want = 1.0 / convolve1d(eff, weights=lds_kernel("gaussian", ks, 2.0), mode="constant")
    assert w.shape == (k,)
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-13)
    # the per-sample form and the normalised weights work too
    sw = bins.sample_weights(torch.as_tensor(labels), scheme="lds", ks=ks)
    assert sw.shape == (len(labels),) and float(sw.mean()) == pytest.approx(1.0)


def test_the_issues_example():
    b = LabelBins.from_labels([0, 1, 1, 2, 2, 2], bin_width=1)
    w = b.weights("lds", ks=5)
    assert w.shape == (b.num_bins,) and torch.isfinite(w).all()
    window = lds_kernel("gaussian", 5, 2.0)
    eff = convolve1d(np.sqrt(b.counts.double().numpy()), weights=window, mode="constant")
    raw = 1.0 / eff
    n = b.counts.double().numpy()
    np.testing.assert_allclose(w.numpy(), raw * n.sum() / (n * raw).sum(), rtol=1e-13)
    loss = BNILoss.from_bins(b, lds=True, ks=5)
    counts = b.counts.double().numpy()
    smooth = convolve1d(counts, weights=window, mode="constant")
    np.testing.assert_allclose(loss.probs.double().numpy(), smooth / smooth.sum(), rtol=1e-6)
    pred = torch.tensor([0.5, 1.5]).reshape(-1, 1)
    assert torch.isfinite(loss(pred, torch.tensor([0.0, 2.0]).reshape(-1, 1))).all()


@pytest.mark.parametrize("k", [2, 3, 8])
def test_balanced_mse_lds_prior_for_few_bins(k):
    """The Balanced MSE (BNI) plug-in's LDS prior: the third smoothing site."""
    from balanced_sam.baselines.plugins import MethodPlugin
    from balanced_sam.data.scaling import TargetScaler
    from balanced_sam.methods import get_method
    from balanced_sam.models import MLP
    from balanced_sam.train import TrainConfig

    labels = torch.as_tensor(_counts_of(k))
    bins = LabelBins.from_labels(labels, bin_width=1, lower=0, upper=k)
    cfg = TrainConfig(method="bni+lds", lds={"kernel": "gaussian", "ks": 9, "sigma": 2.0})
    cfg.validate()
    plugin = MethodPlugin(get_method("bni+lds"), cfg, MLP(3, (4,)), bins,
                          TargetScaler.fit(bins.centers), torch.device("cpu"))
    _, counts = plugin._prior_values(plugin.options["bni"])
    want = convolve1d(bins.counts.double().numpy(), weights=lds_kernel("gaussian", 9, 2.0),
                      mode="constant")
    np.testing.assert_allclose(counts.numpy(), want, rtol=1e-13)
