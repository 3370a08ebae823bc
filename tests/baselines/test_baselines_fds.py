"""FDS: per-bin running statistics, smoothing across bins, calibration, resume.

Expected values are worked out by hand on three bins and one or two feature dimensions, or by a
naive loop written here.
"""

from __future__ import annotations

import math

import pytest
import torch

from balanced_sam.baselines import FDS
from balanced_sam.bins import LabelBins
from balanced_sam.models import MLP

BINS = LabelBins([0.0, 1.0, 2.0, 3.0], [2, 3, 1])


def _fds(**kw) -> FDS:
    kw.setdefault("kernel", "triang")  # window [0.5, 1, 0.5] -> normalised [.25, .5, .25]
    kw.setdefault("ks", 3)
    return FDS(1, BINS, **kw)


def _epoch0(fds: FDS) -> None:
    # bin 0: 1, 3 (mean 2, var 2); bin 1: 4, 6, 8 (mean 6, var 4); bin 2: 10 (mean 10, var 0)
    feats = torch.tensor([[1.0], [4.0], [3.0], [6.0], [10.0], [8.0]])
    labels = torch.tensor([0.5, 1.5, 0.2, 1.1, 2.5, 1.9])
    fds.collect(feats[:3], labels[:3], epoch=0)   # two batches
    fds.collect(feats[3:], labels[3:], epoch=0)
    assert fds.end_epoch(0)


def test_running_and_smoothed_statistics_by_hand() -> None:
    fds = _fds()
    _epoch0(fds)
    assert fds.running_mean[:, 0].tolist() == pytest.approx([2.0, 6.0, 10.0])
    assert fds.running_var[:, 0].tolist() == pytest.approx([2.0, 4.0, 0.0])
    # reflected borders: bin 0 sees bin 1 on both sides, bin 2 likewise
    assert fds.smoothed_mean[:, 0].tolist() == pytest.approx([4.0, 6.0, 8.0])
    assert fds.smoothed_var[:, 0].tolist() == pytest.approx([3.0, 2.5, 2.0])
    assert fds.has_stats.tolist() == [True, True, True] and int(fds.last_epoch) == 0
    assert float(fds.epoch_count.sum()) == 0  # the epoch's sums were consumed


def test_calibration_by_hand_and_gradient() -> None:
    fds = _fds()
    _epoch0(fds)
    f = torch.tensor([[5.0], [7.0], [4.0]], requires_grad=True)
    y = torch.tensor([0.7, 1.3, 2.9])
    out = fds.calibrate(f, y)
    want = [(5 - 2) * math.sqrt(3 / 2) + 4, (7 - 6) * math.sqrt(2.5 / 4) + 6, 4.0]  # bin 2: var 0
    assert out[:, 0].tolist() == pytest.approx(want)
    out.sum().backward()
    assert f.grad[:, 0].tolist() == pytest.approx([math.sqrt(1.5), math.sqrt(0.625), 1.0])


def test_variance_ratio_is_clipped() -> None:
    fds = FDS(1, LabelBins([0.0, 1.0, 2.0], [2, 2]), kernel="triang", ks=3)
    # bin 0: var 0.02; bin 1: var 200 -> smoothed var of bin 0 = (.5 * .02 + .5 * 200) -> ratio>10
    fds.collect(torch.tensor([[0.0], [0.2], [0.0], [20.0]]), torch.tensor([0.5, 0.5, 1.5, 1.5]),
                0)
    fds.end_epoch(0)
    out = fds.calibrate(torch.tensor([[1.0]]), torch.tensor([0.5]))
    m2 = float(fds.smoothed_mean[0, 0])
    assert float(out) == pytest.approx((1.0 - 0.1) * math.sqrt(10.0) + m2)


def test_momentum_and_cumulative_updates() -> None:
    fds = _fds()
    _epoch0(fds)
    fds.collect(torch.tensor([[0.0], [2.0]]), torch.tensor([0.5, 0.5]), epoch=1)
    fds.end_epoch(1)
    # bin 0: 0.9 * old + 0.1 * new (mean 1, var 2); bins 1, 2 unseen this epoch: unchanged
    assert fds.running_mean[:, 0].tolist() == pytest.approx([0.9 * 2 + 0.1 * 1, 6.0, 10.0])
    assert fds.running_var[:, 0].tolist() == pytest.approx([2.0, 4.0, 0.0])
    cum = _fds(momentum=None)
    _epoch0(cum)
    cum.collect(torch.tensor([[0.0], [2.0]]), torch.tensor([0.5, 0.5]), epoch=1)
    cum.end_epoch(1)
    assert float(cum.running_mean[0, 0]) == pytest.approx((1 + 3 + 0 + 2) / 4)


def test_empty_bins_are_left_out_of_the_smoothing() -> None:
    fds = _fds()
    fds.collect(torch.tensor([[1.0], [3.0], [10.0]]), torch.tensor([0.5, 0.5, 2.5]), epoch=0)
    fds.end_epoch(0)
    assert fds.has_stats.tolist() == [True, False, True]
    # bin 0's window holds bin 1 (empty) on both sides: only itself remains
    assert fds.smoothed_mean[:, 0].tolist() == pytest.approx([2.0, 6.0, 10.0])
    f = torch.tensor([[4.0], [5.0]])
    out = fds.calibrate(f, torch.tensor([0.5, 1.5]))
    assert out[1, 0] == 5.0  # a bin without statistics passes unchanged
    assert float(out[0, 0]) == pytest.approx(4.0)  # own stats only: (4 - 2) * 1 + 2


def _naive_smooth(values: list[float], has: list[bool], window: list[float]) -> list[float]:
    k, half = len(values), len(window) // 2
    out = []
    for b in range(k):
        num = den = 0.0
        for t in range(-half, half + 1):
            i = b + t
            while i < 0 or i >= k:  # reflect without repeating the edge
                i = -i if i < 0 else 2 * (k - 1) - i
            if has[i]:
                num += window[t + half] * values[i]
                den += window[t + half]
        out.append(num / den if den else values[b])
    return out


def test_smoothing_matches_a_naive_loop_with_a_gaussian_window() -> None:
    from balanced_sam import lds_kernel

    g = torch.Generator().manual_seed(0)
    bins = LabelBins(torch.arange(7.0), [1] * 6)
    fds = FDS(2, bins)  # gaussian, ks 5, sigma 2
    labels = torch.tensor([0.5, 0.5, 1.5, 3.5, 3.2, 4.5, 5.5, 5.1])  # bin 2 stays empty
    fds.collect(torch.randn(8, 2, generator=g), labels, 0)
    fds.end_epoch(0)
    window = lds_kernel("gaussian", 5, 2.0).tolist()
    has = fds.has_stats.tolist()
    for d in range(2):
        want = _naive_smooth(fds.running_mean[:, d].tolist(), has, window)
        assert fds.smoothed_mean[:, d].tolist() == pytest.approx(want, rel=1e-6)
    tiny = FDS(1, LabelBins([0.0, 1.0, 2.0], [1, 1]), ks=5)  # window wider than the bins
    tiny.collect(torch.tensor([[1.0], [3.0]]), torch.tensor([0.5, 1.5]), 0)
    tiny.end_epoch(0)
    want = _naive_smooth([1.0, 3.0], [True, True], lds_kernel("gaussian", 5, 2.0).tolist())
    assert tiny.smoothed_mean[:, 0].tolist() == pytest.approx(want)


def test_forward_gating() -> None:
    fds = _fds(start_smooth=1)
    f, y = torch.tensor([[5.0]]), torch.tensor([0.5])
    assert fds(f, y, epoch=3) is f              # no statistics yet
    _epoch0(fds)
    assert fds(f, y, epoch=0) is f              # before start_smooth
    fds.eval()
    assert fds(f, y, epoch=3) is f              # evaluation uses raw features
    fds.train()
    assert float(fds(f, y, epoch=1)) == pytest.approx(3 * math.sqrt(1.5) + 4)
    late = _fds(start_update=2)
    late.collect(torch.tensor([[1.0]]), torch.tensor([0.5]), epoch=1)  # before start_update
    assert not late.end_epoch(1) and not late.has_stats.any()


def test_state_dict_round_trip_resumes_identically() -> None:
    a = _fds()
    _epoch0(a)
    a.collect(torch.tensor([[0.0], [9.0]]), torch.tensor([0.5, 2.5]), epoch=1)  # mid-epoch
    b = _fds()
    b.load_state_dict(a.state_dict())
    f, y = torch.tensor([[5.0], [7.0]]), torch.tensor([0.5, 1.5])
    assert torch.equal(a(f, y, 1), b(f, y, 1))  # b calibrates right after loading
    a.end_epoch(1)
    b.end_epoch(1)
    for name, buf in a.state_dict().items():
        assert torch.equal(buf, b.state_dict()[name]), name
    other = FDS(1, LabelBins([0.0, 0.5, 2.0, 3.0], [1, 1, 1]), kernel="triang", ks=3)
    with pytest.raises(ValueError, match="other label bins"):
        other.load_state_dict(a.state_dict())


def test_dense_feature_maps() -> None:
    g = torch.Generator().manual_seed(1)
    fds = FDS(3, BINS, kernel="triang", ks=3)
    feats = torch.randn(2, 3, 2, 2, generator=g)
    depth = torch.rand(2, 1, 2, 2, generator=g) * 3
    fds.collect(feats, depth, 0)
    fds.end_epoch(0)
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 3)
    ref = FDS(3, BINS, kernel="triang", ks=3)
    ref.collect(flat, depth.reshape(-1), 0)
    ref.end_epoch(0)
    torch.testing.assert_close(fds.running_mean, ref.running_mean)
    out = fds.calibrate(feats, depth)
    assert out.shape == feats.shape
    want = ref.calibrate(flat, depth.reshape(-1)).reshape(2, 2, 2, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="resize"):
        fds.calibrate(feats, torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="3 columns"):
        fds.calibrate(torch.randn(4, 2), torch.rand(4))


def test_model_forward_puts_fds_between_features_and_head() -> None:
    torch.manual_seed(0)
    model = MLP(2, hidden=(4,))
    fds = FDS(model.feature_dim, BINS)
    x, y = torch.randn(6, 2), torch.tensor([0.5, 0.5, 1.5, 1.5, 2.5, 2.5])
    pred, feats = fds.model_forward(model, x, y, epoch=0, collect=True)
    assert torch.equal(pred, model(x)) and float(fds.epoch_count.sum()) == 6
    fds.end_epoch(0)
    pred, feats = fds.model_forward(model, x, y, epoch=1)
    assert torch.equal(feats, model.forward_features(x))
    torch.testing.assert_close(pred, model.forward_head(fds.calibrate(feats, y)))
    assert not torch.allclose(pred, model(x))
    with pytest.raises(ValueError, match="momentum"):
        FDS(4, BINS, momentum=1.0)
    with pytest.raises(TypeError, match="LabelBins"):
        FDS(4, [0, 1, 2])
