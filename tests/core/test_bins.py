"""LabelBins: binning, weights, regions, and the facts of the real AgeDB-DIR split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _repo_scripts import ROOT

from balanced_sam import LabelBins, lds_kernel

AGEDB = ROOT.parent / "shared" / "data" / "agedb.csv"


@pytest.fixture(scope="module")
def agedb():
    if not AGEDB.exists():
        pytest.skip(f"reference data {AGEDB} not present")
    import csv

    with AGEDB.open() as f:
        rows = list(csv.DictReader(f))
    ages = {s: np.array([float(r["age"]) for r in rows if r["split"] == s])
            for s in ("train", "val", "test")}
    return ages


def test_agedb_regions_and_raw_weights(agedb):
    train = agedb["train"]
    assert len(train) == 12208 and len(agedb["val"]) == 2140 and len(agedb["test"]) == 2140
    bins = LabelBins.from_labels(train, bin_width=1, lower=0, upper=121)
    assert bins.num_bins == 121
    assert bins.region_counts() == {"many": 51, "medium": 16, "few": 33}
    assert int((bins.counts == 0).sum()) == 21
    # raw sqrt_inv weights are 1/sqrt(N_k) of the sample's age
    counts = np.bincount(train.astype(int), minlength=121)
    w = bins.sample_weights(torch.tensor(train), "sqrt_inv", "none").numpy()
    np.testing.assert_allclose(w, 1 / np.sqrt(counts[train.astype(int)]), rtol=1e-12)
    assert w.mean() == pytest.approx(0.0765, abs=5e-5)
    wm = bins.sample_weights(torch.tensor(train), "sqrt_inv", "mean")
    assert wm.mean().item() == pytest.approx(1.0, abs=1e-9)
    # test labels: 92 distinct, 51 / 16 / 25 by region; samples 1530 / 448 / 162
    test = torch.tensor(agedb["test"])
    labels = torch.unique(test)
    assert labels.numel() == 92
    reg = bins.region_of(labels)
    assert torch.bincount(reg, minlength=3).tolist() == [51, 16, 25]
    assert torch.bincount(bins.region_of(test), minlength=3).tolist() == [1530, 448, 162]


def test_bin_edges_and_index():
    bins = LabelBins.from_labels([0.0, 0.4, 1.0, 2.49], bin_width=0.5)
    assert bins.edges.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert bins.counts.tolist() == [2, 0, 1, 0, 1]
    idx = bins.bin_index(torch.tensor([0.0, 0.49999, 0.5, 2.5]))
    assert idx.tolist() == [0, 0, 1, 4]  # left-closed; the top edge belongs to the last bin
    # default: integer labels get width-1 bins starting at floor(min)
    b2 = LabelBins.from_labels(torch.tensor([3, 5, 5, 9]))
    assert b2.lower == 3 and b2.upper == 10 and b2.counts.tolist() == [1, 0, 2, 0, 0, 0, 1]
    b3 = LabelBins.from_labels(torch.rand(50))
    assert b3.num_bins == 100 and b3.num_samples == 50
    b4 = LabelBins.from_labels([1.0, 2.0], edges=[0, 1.5, 3])
    assert b4.counts.tolist() == [1, 1]
    b5 = LabelBins.from_labels([0.0, 2.0], bin_width=1, lower=0, upper=2.5)
    assert b5.edges.tolist() == [0.0, 1.0, 2.0, 2.5]


def test_out_of_range_and_bad_values():
    bins = LabelBins.from_labels([1.0, 2.0, 3.0], bin_width=1, lower=0, upper=5)
    with pytest.raises(ValueError, match="outside the bin range"):
        bins.bin_index(torch.tensor([6.0]))
    assert bins.bin_index(torch.tensor([-3.0, 7.0]), clamp=True).tolist() == [0, 4]
    with pytest.raises(ValueError, match="NaN"):
        bins.sample_weights(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="NaN"):
        LabelBins.from_labels([1.0, math.inf])
    with pytest.raises(ValueError, match="empty"):
        LabelBins.from_labels([])
    with pytest.raises(ValueError, match="outside"):
        LabelBins.from_labels([1.0, 9.0], bin_width=1, lower=0, upper=5)
    with pytest.raises(ValueError, match="bin_width"):
        LabelBins.from_labels([1.0], bin_width=-1)
    with pytest.raises(ValueError, match="scheme"):
        bins.weights("sqinv")
    with pytest.raises(ValueError, match="normalize"):
        bins.weights("inv", "sum")
    with pytest.raises(ValueError, match="strictly increasing"):
        LabelBins([0, 2, 1], [1, 1])
    with pytest.raises(TypeError, match="numeric"):
        LabelBins.from_labels(["a", "b"])


def test_weight_schemes():
    counts = np.array([1000, 2000, 100, 9, 1, 0])
    bins = LabelBins(np.arange(7.0), counts)
    n = counts.astype(float)
    np.testing.assert_allclose(bins.weights("none", "none").numpy(), np.ones(6))
    sq = bins.weights("sqrt_inv", "none").numpy()
    np.testing.assert_allclose(sq[:5], 1 / np.sqrt(n[:5]))
    assert sq[5] == 1.0  # empty bin: the weight of a single-sample bin, finite
    inv = bins.weights("inv", "none").numpy()
    np.testing.assert_allclose(inv, 1 / np.clip(n, 5, 1000))
    inv2 = bins.weights("inv", "none", clip=(1, 5000)).numpy()
    np.testing.assert_allclose(inv2[:5], 1 / n[:5])
    for scheme in ("sqrt_inv", "inv", "lds", "none"):
        w = bins.weights(scheme, "mean")
        assert torch.isfinite(w).all()
        assert (w * bins.counts).sum().item() / bins.num_samples == pytest.approx(1.0)


def test_lds_matches_dir_recipe():
    """LDS = (sqrt or clipped) counts convolved with the kernel window, then inverted."""
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 300, size=40)
    counts[[5, 6, 30]] = 0
    bins = LabelBins(np.arange(41.0), counts)
    for kernel, ks, sigma in (("gaussian", 5, 2.0), ("gaussian", 9, 1.0), ("triang", 5, 2.0),
                              ("laplace", 7, 3.0)):
        half = (ks - 1) // 2
        if kernel == "gaussian":
            base = np.zeros(ks)
            base[half] = 1.0
            win = scipy_ndimage.gaussian_filter1d(base, sigma=sigma)
        elif kernel == "triang":
            win = signal.windows.triang(ks)
        else:
            win = np.exp(-np.abs(np.arange(-half, half + 1)) / sigma) / (2 * sigma)
        win = win / win.max()
        np.testing.assert_allclose(lds_kernel(kernel, ks, sigma), win, rtol=1e-12)
        smoothed = scipy_ndimage.convolve1d(np.sqrt(counts.astype(float)), win, mode="constant")
        got = bins.weights("lds", "none", kernel=kernel, ks=ks, sigma=sigma).numpy()
        nz = smoothed > 0
        np.testing.assert_allclose(got[nz], 1 / smoothed[nz], rtol=1e-12)
        clipped = scipy_ndimage.convolve1d(np.clip(counts, 5, 1000).astype(float), win,
                                           mode="constant")
        got_inv = bins.weights("lds", "none", lds_base="inv", kernel=kernel, ks=ks,
                               sigma=sigma).numpy()
        np.testing.assert_allclose(got_inv, 1 / clipped, rtol=1e-12)
    with pytest.raises(ValueError, match="kernel"):
        bins.weights("lds", kernel="box")
    with pytest.raises(ValueError, match="odd"):
        bins.weights("lds", ks=4)


def test_share_weight_below():
    bins = LabelBins(np.arange(7.0), [0, 1, 3, 50, 40, 30], share_weight_below=3)
    w = bins.weights("sqrt_inv", "none")
    assert w[:3].tolist() == [w[3].item()] * 3


def test_sample_weights_dense_device_dtype_and_cache():
    bins = LabelBins.from_labels(torch.randint(0, 10, (500,)).float(), bin_width=1)
    t = torch.randint(0, 10, (2, 1, 4, 5)).float()
    w = bins.sample_weights(t)
    assert w.shape == t.shape and w.dtype == torch.float32 and w.device == t.device
    table = bins.weights("sqrt_inv", "mean").float()
    assert torch.equal(w, table[t.long()])
    assert bins.sample_weights(t.long()).dtype == torch.float32
    assert bins.sample_weights(t.double()).dtype == torch.float64
    assert bins.sample_weights(t) is not w and len(bins._table_cache) == 2


def test_regions_thresholds():
    counts = [0, 5, 19, 20, 100, 101, 5000]
    bins = LabelBins(np.arange(8.0), counts)
    assert bins.regions() == ["few", "few", "few", "medium", "medium", "many", "many"]
    assert bins.regions(many=10, few=5) == ["few", "medium", "many", "many", "many", "many",
                                            "many"]
    assert bins.region_counts() == {"many": 2, "medium": 2, "few": 2}
    assert bins.region_counts(nonempty=False)["few"] == 3
    mask = bins.region_mask(torch.tensor([0.5, 3.5, 6.5]), "few")
    assert mask.tolist() == [True, False, False]
    assert bins.region_mask(torch.tensor([0.5, 3.5]), "all").all()
    with pytest.raises(ValueError, match="region"):
        bins.region_mask(torch.tensor([0.5]), "tail")


def test_round_trip_dict():
    bins = LabelBins.from_labels(torch.randn(100), bin_width=0.25, share_weight_below=2)
    again = LabelBins.from_dict(bins.to_dict())
    assert again == bins
    import json

    assert LabelBins.from_dict(json.loads(json.dumps(bins.to_dict()))) == bins


def test_too_many_bins_fails_fast_with_a_suggested_width():
    """Issue 8 item 6: whole-number labels over a wide range (or a tiny width) used to build
    millions of bins; now a clear error, raised before anything is allocated."""
    import resource
    import time

    wide = torch.tensor([0.0, 3.0, 1e9])  # integers: the default width is 1
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak so far, KiB
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"max_bins=100,000.*bin_width=1e\+07 gives 101 bins") \
            as err:
        LabelBins.from_labels(wide)
    assert time.perf_counter() - t0 < 1.0
    # 1e9 float64 edges would have raised the peak by 8 GB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000
    assert "bin_width=1 gives 1e+09 bins over the label range [0, 1e+09]" in str(err.value)
    with pytest.raises(ValueError, match=r"use a wider bin \(e.g. bin_width=0.1 gives 7\d bins\)"):
        LabelBins.from_labels([0.0, 7.3], bin_width=1e-6)
    with pytest.raises(ValueError, match="max_bins"):
        LabelBins.from_labels([0.0, 1.0], bin_width=1e-300)  # the count overflows to inf
    with pytest.raises(ValueError, match="num_bins=200000"):
        LabelBins.from_labels([0.0, 1.0], num_bins=200_000)
    with pytest.raises(ValueError, match="edges gives 5 bins"):
        LabelBins.from_labels([0.5], edges=np.arange(6.0), max_bins=4)
    assert LabelBins.from_labels(wide, bin_width=1e7).num_bins == 101
    assert LabelBins.from_labels([0.0, 1.0], bin_width=1e-6, max_bins=2_000_000).num_bins \
        == 1_000_001
    with pytest.raises(ValueError, match="max_bins must be"):
        LabelBins.from_labels([0.0], max_bins=0)


def test_region_thresholds_travel_with_the_bins():
    """Contract 2: many/few live on LabelBins, default every region helper, survive to_dict."""
    counts = [0, 5, 15, 50, 80, 150, 300]
    bins = LabelBins(np.arange(8.0), counts, many=60, few=10)
    assert (bins.many, bins.few) == (60, 10)
    assert bins.regions() == ["few", "few", "medium", "medium", "many", "many", "many"]
    assert bins.regions(many=100, few=20) == ["few", "few", "few", "medium", "medium", "many",
                                              "many"]
    assert bins.region_counts() == {"many": 3, "medium": 2, "few": 1}
    assert bins.region_mask(torch.tensor([4.5, 2.5]), "many").tolist() == [True, False]
    assert bins.region_of(torch.tensor([1.5])).tolist() == [2]
    d = bins.to_dict()
    assert d["many"] == 60 and d["few"] == 10
    again = LabelBins.from_dict(d)
    assert again == bins and again.regions() == bins.regions()
    old = {k: v for k, v in d.items() if k not in ("many", "few")}  # saved before this field
    assert (LabelBins.from_dict(old).many, LabelBins.from_dict(old).few) == (100, 20)
    assert LabelBins.from_dict(old) != bins
    lb = LabelBins.from_labels([1.0, 2.0, 2.0], bin_width=1, many=1, few=0)
    assert lb.regions() == ["medium", "many"] and lb.to_dict()["many"] == 1
    with pytest.raises(ValueError, match="few"):
        LabelBins(np.arange(3.0), [1, 2], many=5, few=10)
    with pytest.raises(ValueError, match="many must be"):
        LabelBins(np.arange(3.0), [1, 2], many=-1)
    with pytest.raises(ValueError, match="few"):
        bins.regions(many=5, few=30)
