"""Metric values on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from balanced_sam import LabelBins, RegressionMetrics, format_table, regression_report
from balanced_sam.metrics import aggregate_reports, depth_report, resolve_balance

# `bins`: tests/core/conftest.py's four bins, one per region (150, 50, 5 and 0 samples)


def test_hand_made_report(bins):
    targets = torch.tensor([1.0, 1.0, 5.0, 12.0, 12.0, 25.0, 35.0])
    errors = torch.tensor([1.0, 3.0, 2.0, -4.0, 2.0, 8.0, -0.5])
    rep = regression_report(targets + errors, targets, bins, balance="label")
    a = errors.abs().double()
    assert rep["all"]["count"] == 7
    assert rep["all"]["mae"] == pytest.approx(a.mean().item())
    assert rep["all"]["mse"] == pytest.approx((a**2).mean().item())
    assert rep["all"]["rmse"] == pytest.approx(math.sqrt((a**2).mean().item()))
    assert rep["all"]["gm"] == pytest.approx(math.exp(a.log().mean().item()))
    # many: labels 1 (errors 1, 3) and 5 (error 2): bMAE = mean(2, 2) = 2, MAE = 2
    assert rep["many"]["count"] == 3
    assert rep["many"]["mae"] == pytest.approx(2.0)
    assert rep["many"]["bmae"] == pytest.approx(2.0)
    assert rep["many"]["gm"] == pytest.approx(6 ** (1 / 3))
    # medium: label 12 twice, errors 4 and 2
    assert rep["medium"]["mae"] == pytest.approx(3.0) and rep["medium"]["count"] == 2
    # few: label 25 (8) and label 35 (0.5, empty training bin -> few)
    assert rep["few"]["count"] == 2
    assert rep["few"]["mae"] == pytest.approx(4.25) and rep["few"]["bmae"] == pytest.approx(4.25)
    # overall bMAE: labels 1, 5, 12, 25, 35 -> (2 + 2 + 3 + 8 + 0.5) / 5
    assert rep["all"]["bmae"] == pytest.approx(15.5 / 5)


def test_bmae_label_vs_bin(bins):
    targets = torch.tensor([1.0, 1.0, 1.0, 5.0])
    errors = torch.tensor([1.0, 1.0, 1.0, 5.0])
    by_label = regression_report(targets + errors, targets, bins, balance="label")["many"]["bmae"]
    by_bin = regression_report(targets + errors, targets, bins, balance="bin")["many"]["bmae"]
    assert by_label == pytest.approx(3.0)  # mean(1, 5)
    assert by_bin == pytest.approx(2.0)  # one bin: its MAE


def test_bmae_auto_balances_per_bin_for_continuous_labels(bins):
    """Issue 8 item 7: on a continuous target, per-label bMAE is just MAE; auto uses bins."""
    g = torch.Generator().manual_seed(0)
    t = torch.rand(300, generator=g) * 40  # every label distinct
    p = t + torch.randn(300, generator=g) * (1 + t / 5)  # error grows with the label
    m_label = RegressionMetrics(bins, balance="label")
    m_label.update(p, t)
    by_label = m_label.compute()
    assert by_label["all"]["bmae"] == pytest.approx(by_label["all"]["mae"])  # the old defect
    m = RegressionMetrics(bins)  # default: auto
    m.update(p, t)
    rep = m.compute()
    assert m.balance_used == "bin" and m_label.balance_used == "label"
    idx = bins.bin_index(t)
    per_bin = [(p - t).abs()[idx == k].double().mean().item() for k in range(4)
               if (idx == k).any()]
    assert rep["all"]["bmae"] == pytest.approx(sum(per_bin) / len(per_bin), rel=1e-12)
    assert rep["all"]["bmae"] != pytest.approx(rep["all"]["mae"], rel=1e-3)
    assert all(isinstance(v, (int, float)) for r in rep.values() for v in r.values())


def test_bmae_auto_is_per_label_for_discrete_labels():
    """Ages in 1-year bins: auto says "label" and equals the per-label definition."""
    bins = LabelBins.from_labels(torch.arange(10.0).repeat_interleave(torch.arange(1, 11)))
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 10, (200,), generator=g).double()
    p = t + torch.randn(200, generator=g, dtype=torch.float64) * (1 + t)
    auto = RegressionMetrics(bins)
    auto.update(p[:70], t[:70])
    auto.update(p[70:], t[70:])  # streamed
    label = regression_report(p, t, bins, balance="label")
    rep = auto.compute()
    assert auto.balance_used == "label"
    for region in rep:
        a, b = rep[region]["bmae"], label[region]["bmae"]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12), region
    # one bin with two distinct labels switches auto to bins
    auto.update(torch.tensor([3.5]), torch.tensor([3.5]))
    auto.compute()
    assert auto.balance_used == "bin"
    assert resolve_balance(t, bins) == "label"
    assert resolve_balance(torch.cat([t, torch.tensor([2.5])]), bins) == "bin"
    with pytest.raises(ValueError, match="balance"):
        RegressionMetrics(bins, balance="labels")


def test_region_thresholds_come_from_the_bins():
    """Contract 2: LabelBins(many=, few=) are the metrics' defaults; explicit ones win."""
    edges = np.array([0.0, 10.0, 20.0, 30.0])
    t = torch.tensor([5.0, 15.0, 25.0])
    default = regression_report(t + 1, t, LabelBins(edges, [150, 50, 5]))
    assert [default[r]["count"] for r in ("many", "medium", "few")] == [1, 1, 1]
    own = LabelBins(edges, [150, 50, 5], many=40, few=10)
    rep = regression_report(t + 1, t, own)
    assert [rep[r]["count"] for r in ("many", "medium", "few")] == [2, 0, 1]
    assert RegressionMetrics(own).many == 40 and RegressionMetrics(own).few == 10
    rep2 = regression_report(t + 1, t, own, many=100, few=20)
    assert [rep2[r]["count"] for r in ("many", "medium", "few")] == [1, 1, 1]


def test_empty_region_is_nan_not_error(bins):
    rep = regression_report(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0]), bins)
    assert rep["few"]["count"] == 0
    assert all(math.isnan(v) for k, v in rep["few"].items() if k != "count")
    assert rep["many"]["mae"] == pytest.approx(1.0)


def test_gm_with_zero_error(bins):
    t = torch.tensor([1.0, 2.0, 3.0])
    p = torch.tensor([1.0, 4.0, 7.0])  # errors 0, 2, 4
    ref = regression_report(p, t, bins, gm_eps=0.0)["all"]["gm"]
    assert ref == 0.0  # reference behaviour: one exact prediction zeroes the GM
    ours = regression_report(p, t, bins)["all"]["gm"]
    assert ours == pytest.approx((1e-8 * 2 * 4) ** (1 / 3))
    floored = regression_report(p, t, bins, gm_eps=0.5)["all"]["gm"]
    assert floored == pytest.approx((0.5 * 2 * 4) ** (1 / 3))
    with pytest.raises(ValueError, match="gm_eps"):
        RegressionMetrics(bins, gm_eps=-1)


def test_streaming_equals_one_shot(bins):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(1000, generator=g) * 40
    p = t + torch.randn(1000, generator=g) * 3
    t = t.round()  # repeated labels exercise the per-label merge
    one = regression_report(p, t, bins)
    m = RegressionMetrics(bins)
    for i in range(0, 1000, 137):
        m.update(p[i:i + 137], t[i:i + 137])
    two = m.compute()
    for region in one:
        for k in one[region]:
            assert one[region][k] == pytest.approx(two[region][k], rel=1e-12), (region, k)
    m.reset()
    m.update(p[:10], t[:10])
    assert m.compute()["all"]["count"] == 10


def test_mask_and_shapes(bins):
    t = torch.tensor([[1.0, 12.0], [25.0, 3.0]])
    p = t + torch.tensor([[1.0, 100.0], [2.0, 3.0]])
    mask = torch.tensor([[True, False], [True, True]])
    rep = regression_report(p, t, bins, mask=mask)
    assert rep["all"]["count"] == 3 and rep["all"]["mae"] == pytest.approx(2.0)
    assert rep["medium"]["count"] == 0
    with pytest.raises(ValueError, match="shape"):
        regression_report(torch.zeros(3), torch.zeros(4), bins)
    with pytest.raises(ValueError, match="NaN"):
        regression_report(torch.tensor([math.nan]), torch.tensor([1.0]), bins)
    with pytest.raises(ValueError, match="outside"):
        regression_report(torch.tensor([1.0]), torch.tensor([50.0]), bins)


def test_depth_metrics():
    bins = LabelBins(np.array([0.0, 1.0, 2.0, 3.0]), [500, 50, 1])
    g = torch.tensor([0.5, 1.5, 2.5, 2.0])
    p = torch.tensor([0.5, 2.0, 1.0, 2.4])
    rep = depth_report(p, g, bins)
    ratio = torch.maximum(p / g, g / p)
    for k in (1, 2, 3):
        assert rep["all"][f"delta{k}"] == pytest.approx((ratio < 1.25**k).double().mean().item())
    assert rep["all"]["abs_rel"] == pytest.approx(((p - g).abs() / g).mean().item())
    assert rep["all"]["log10"] == pytest.approx((p.log10() - g.log10()).abs().mean().item())
    assert rep["all"]["rmse"] == pytest.approx(((p - g) ** 2).mean().sqrt().item())
    assert rep["many"]["delta1"] == 1.0 and rep["medium"]["delta1"] == 0.0
    assert rep["few"]["count"] == 2 and rep["few"]["delta1"] == 0.5


def test_per_bin(bins):
    m = RegressionMetrics(bins)
    m.update(torch.tensor([2.0, 4.0, 11.0]), torch.tensor([1.0, 1.0, 12.0]))
    pb = m.per_bin()
    assert pb["count"] == [2, 1, 0, 0]
    assert pb["mae"][:2] == [2.0, 1.0] and pb["mae"][2] is None


def test_aggregate_and_table(bins):
    t = torch.tensor([1.0, 12.0, 25.0])
    r1 = regression_report(t + 1, t, bins)
    r2 = regression_report(t + 3, t, bins)
    mean, std = aggregate_reports([r1, r2])
    assert mean["all"]["mae"] == pytest.approx(2.0)
    assert std["all"]["mae"] == pytest.approx(math.sqrt(2.0))
    table = format_table({"vanilla": [r1, r2], "bsam": r1})
    lines = table.splitlines()
    assert lines[0].startswith("| Method | MAE All | MAE Many | MAE Med. | MAE Few | GM All")
    assert "| vanilla | 2.00 ± 1.41 |" in table
    assert "| bsam | 1.00 |" in table
    text = format_table({"a": r1}, metrics=["mae"], regions=["all", "few"], extra=(),
                        style="text")
    assert text.splitlines()[0].split() == ["Method", "MAE", "All", "MAE", "Few"]
    with pytest.raises(ValueError, match="style"):
        format_table({"a": r1}, style="latex")
