"""Tables -> DIR benchmarks: the split, the preprocessor, load_table's errors, diamonds facts."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch

from balanced_sam.bins import LabelBins
from balanced_sam.data.base import BenchData
from balanced_sam.data.registry import TABLE_RECIPE, build_model
from balanced_sam.data.tabular import (
    TablePreprocessor,
    default_bin_width,
    dir_split,
    load_table,
    subsample,
    table_bins,
)


def _long_tail(n: int = 3000, seed: int = 0) -> np.ndarray:
    """Integer labels 0..59 with an exponential tail (many rows at 0, a handful near 60)."""
    rng = np.random.default_rng(seed)
    return np.minimum(rng.exponential(10.0, n), 59.999).astype(np.int64).astype(np.float64)


def _frame(n: int = 1200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.normal(5.0, 2.0, n)
    color = rng.choice(["red", "green", "blue"], n)
    flag = rng.random(n) < 0.3
    y = np.round(np.exp(a / 3.0) * 10 + (color == "red") * 5, 1)
    return pd.DataFrame({"a": a, "b": rng.integers(0, 10, n), "color": color, "flag": flag,
                         "y": y})


# ---------------------------------------------------------------------------------- dir_split
def test_split_balanced_disjoint_covering_and_deterministic() -> None:
    y = _long_tail()
    cap = 25
    train, val, test = dir_split(y, bin_width=1.0, cap=cap, seed=3)
    n = y.size
    assert train.dtype == val.dtype == test.dtype == np.int64
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(n))
    bins = LabelBins.from_labels(y, bin_width=1.0)
    b = bins.bin_index(y).numpy()
    per_bin = np.bincount(b, minlength=bins.num_bins)
    want = np.minimum(per_bin // 3, cap)
    assert np.array_equal(np.bincount(b[val], minlength=bins.num_bins), want)
    assert np.array_equal(np.bincount(b[test], minlength=bins.num_bins), want)
    assert np.array_equal(np.bincount(b[train], minlength=bins.num_bins), per_bin - 2 * want)
    assert want.max() == cap and want.min() < cap  # the cap binds at the head, not in the tail

    again = dir_split(y, bin_width=1.0, cap=cap, seed=3)
    for x1, x2 in zip((train, val, test), again):
        assert np.array_equal(x1, x2)
    other = dir_split(y, bin_width=1.0, cap=cap, seed=4)
    assert not np.array_equal(val, other[1])


def test_split_min_per_bin_edges_and_lower() -> None:
    y = np.array([0.5] * 9 + [1.5] * 4 + [2.5] * 2)
    train, val, test = dir_split(y, bin_width=1.0, cap=50)
    assert val.size == test.size == 3 + 1 and train.size == 15 - 8
    train, val, test = dir_split(y, bin_width=1.0, cap=50, min_per_bin=5)
    assert val.size == 3  # the bin of 4 rows now gives everything to training
    tr2, va2, te2 = dir_split(y, edges=[0.0, 1.0, 2.0, 3.0], cap=50, min_per_bin=5)
    assert np.array_equal(va2, val) and np.array_equal(te2, test)
    # a lower edge of -0.5 shifts the bins: [-0.5, 0.5) is empty, 0.5 lands in [0.5, 1.5)
    _, val3, _ = dir_split(y, bin_width=1.0, lower=-0.5)
    assert val3.size == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cap": 0}, "cap"),
        ({"cap": 2.5}, "cap"),
        ({"min_per_bin": 2}, "min_per_bin"),
        ({"bin_width": -1.0}, "bin_width"),
        ({"bin_width": 1.0, "edges": [0, 1, 2]}, "edges"),
    ],
)
def test_split_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dir_split(np.arange(30.0), **kwargs)


def test_split_rejects_nan_and_empty() -> None:
    with pytest.raises(ValueError, match="NaN"):
        dir_split([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="empty"):
        dir_split([])


def test_subsample_keeps_a_fixed_fraction() -> None:
    idx = np.arange(100, 1100)
    kept = subsample(idx, 0.2, seed=1)
    assert kept.size == 200 and np.all(np.isin(kept, idx)) and np.all(np.diff(kept) > 0)
    assert np.array_equal(kept, subsample(idx, 0.2, seed=1))
    assert not np.array_equal(kept, subsample(idx, 0.2, seed=2))
    assert subsample(np.arange(7), 0.5).size == 4  # round(3.5) = 4 (numpy rounds half to even)
    assert np.array_equal(subsample(idx[::-1], 1.0), idx)
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="train_fraction"):
            subsample(idx, bad)


def test_default_bin_width_is_a_nice_number() -> None:
    assert default_bin_width(np.arange(0, 101)) == 1.0
    assert default_bin_width([326.0, 18823.0]) == 200.0
    assert default_bin_width([0.0, 0.7]) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="constant"):
        default_bin_width([3.0, 3.0])
    # one outlier among many rows does not stretch the width (quantiles, not the extremes)
    ages = np.concatenate([np.arange(0, 101, dtype=float).repeat(3), [1e9]])
    assert default_bin_width(ages) == 1.0
    spec = table_bins(ages)  # the range is cut at the quantiles; the outlier is clamped
    assert spec["clamp"] is True and spec["upper"] <= 101 and spec["bin_width"] == 1.0
    bins = LabelBins.from_labels(ages, **spec)
    assert bins.num_bins <= 101 and bins.counts[-1] >= 1
    assert "clamp" not in table_bins(np.arange(0, 101, dtype=float))  # ordinary data: all kept


# ---------------------------------------------------------------------------------- preprocessor
def test_preprocessor_standardises_with_training_statistics_only() -> None:
    train = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "k": [7.0, 7.0, 7.0, 7.0],
                          "c": ["x", "y", "x", "z"]})
    test = pd.DataFrame({"a": [100.0, 2.5], "k": [8.0, 7.0], "c": ["w", "y"]})
    pre = TablePreprocessor().fit(train)
    xt = pre.transform(train)
    assert xt.dtype == torch.float32 and xt.shape == (4, 2 + 3)
    assert pre.feature_names == ["a", "k", "c=x", "c=y", "c=z"]
    assert torch.allclose(xt[:, 0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(xt[:, 0].std(unbiased=False), torch.tensor(1.0), atol=1e-6)
    assert pre.std_["k"] == 1.0  # constant column: std 0 -> 1
    x = pre.transform(test)
    mean, std = 2.5, float(np.std([1.0, 2.0, 3.0, 4.0]))
    assert x[0, 0].item() == pytest.approx((100.0 - mean) / std, rel=1e-6)  # no refit on test
    assert x[0, 1].item() == pytest.approx(1.0)
    # one-hot stays 0/1, an unseen category is all zeros
    assert torch.equal(x[0, 2:], torch.zeros(3))
    assert torch.equal(x[1, 2:], torch.tensor([0.0, 1.0, 0.0]))
    assert set(xt[:, 2:].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(xt[:, 2:].sum(1), torch.ones(4))


def test_preprocessor_column_kinds() -> None:
    frame = pd.DataFrame({
        "code": [1, 2, 1, 3],
        "flag": [True, False, True, True],
        "cat": pd.Categorical(["b", "a", "b", "b"], categories=["a", "b", "c"]),
        "num": [0.5, 1.5, 2.5, 3.5],
    })
    pre = TablePreprocessor(categorical=["code"]).fit(frame)
    assert pre.numeric_ == ["num"]
    assert pre.categorical_ == ["code", "flag", "cat"]
    assert pre.categories_["cat"] == ["a", "b"]  # only categories seen in training
    assert pre.feature_names == ["num", "code=1", "code=2", "code=3", "flag=False", "flag=True",
                                 "cat=a", "cat=b"]
    new = frame.copy()
    new["cat"] = pd.Categorical(["c", "a", "a", "b"], categories=["a", "b", "c"])
    x = pre.transform(new)
    assert torch.equal(x[:, -2:], torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="ghost"):
        TablePreprocessor(categorical=["ghost"]).fit(frame)
    with pytest.raises(ValueError, match="num"):
        pre.transform(frame.drop(columns="num"))
    with pytest.raises(ValueError, match="'ids'.*max_categories"):
        TablePreprocessor(max_categories=3).fit(pd.DataFrame({"ids": list("abcde")}))


def test_preprocessor_missing_numeric_values() -> None:
    train = pd.DataFrame({"a": [1.0, np.nan, 3.0, 10.0], "c": ["x", None, "y", "x"]})
    with pytest.raises(ValueError, match="'a'.*1 missing.*impute='median'"):
        TablePreprocessor().fit(train)
    pre = TablePreprocessor(impute="median").fit(train)
    assert pre.median_["a"] == 3.0
    x = pre.transform(pd.DataFrame({"a": [np.nan], "c": [None]}))
    assert x[0, 0].item() == pytest.approx((3.0 - pre.mean_["a"]) / pre.std_["a"])
    assert torch.equal(x[0, 1:], torch.zeros(2))  # a missing category is all zeros
    clean = TablePreprocessor().fit(train.dropna())
    with pytest.raises(ValueError, match="'a'"):
        clean.transform(train)
    with pytest.raises(ValueError, match="impute"):
        TablePreprocessor(impute="mean")


# ---------------------------------------------------------------------------------- load_table
def test_load_table_from_dataframe_and_csv(tmp_path) -> None:
    frame = _frame()
    data = load_table(frame, "y", bin_width=2.0, cap=10, train_fraction=0.5, seed=1)
    assert isinstance(data, BenchData) and data.name == "table"
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.float32
    assert data.x_train.shape[1] == 2 + 3 + 2  # a, b, color x3, flag x2
    info = data.info
    assert info["C"] == 10 and info["train_fraction"] == 0.5 and info["split_seed"] == 1
    sizes = info["sizes"]
    assert sizes["train"] == round(0.5 * sizes["train_before_fraction"])
    assert sizes["train_before_fraction"] + sizes["val"] + sizes["test"] == len(frame)
    assert (data.y_val.numel(), data.y_test.numel()) == (sizes["val"], sizes["test"])
    assert data.standardize_target
    # the bins rebuilt from the training labels are the split's bins and hold val/test labels
    bins = LabelBins.from_labels(data.y_train, **data.bins)
    assert bins.num_bins == info["num_bins"]
    b_val = bins.bin_index(data.y_val)
    b_test = bins.bin_index(data.y_test)
    assert torch.equal(torch.bincount(b_val, minlength=bins.num_bins),
                       torch.bincount(b_test, minlength=bins.num_bins))
    # the registry's model factory builds the tables' MLP for these features
    model = build_model(data, TABLE_RECIPE.model)
    assert model(data.x_val[:5]).shape == (5,)
    assert build_model(data, TABLE_RECIPE.model) is not model

    path = tmp_path / "houses.csv"
    frame.to_csv(path, index=False)
    from_csv = load_table(path, "y", bin_width=2.0, cap=10, train_fraction=0.5, seed=1)
    assert from_csv.name == "houses"
    assert torch.equal(from_csv.y_test, data.y_test)
    assert torch.allclose(from_csv.x_test, data.x_test, atol=1e-5)


def test_load_table_default_bins_cover_every_row() -> None:
    frame = _frame(seed=2)
    data = load_table(frame, "y", features=["a", "color"], categorical=None)
    assert data.x_train.shape[1] == 1 + 3
    bins = LabelBins.from_labels(data.y_train, **data.bins)
    y_all = torch.cat([data.y_train, data.y_val, data.y_test])
    bins.bin_index(y_all)  # raises if a label falls outside
    assert bins.num_bins <= 101
    assert data.info["bin_width"] == default_bin_width(frame["y"].to_numpy())


def test_load_table_dropna() -> None:
    frame = _frame()
    frame.loc[[3, 50, 70], "y"] = np.nan
    with pytest.raises(ValueError, match="'y'.*3 missing.*dropna=True"):
        load_table(frame, "y")
    data = load_table(frame, "y", dropna=True)
    assert data.info["sizes"]["dropped_nan_target"] == 3
    assert data.info["sizes"]["rows"] == len(frame)


@pytest.mark.parametrize(
    ("mutate", "kwargs", "error", "match"),
    [
        (None, {"target": "price"}, ValueError, r"'price' not found.*\['a', 'b'"),
        (lambda f: f.assign(y=f["y"].astype(str).where(f.index % 7 > 0, "n/a")), {},
         ValueError, r"'y' must be numeric.*'n/a'"),
        (lambda f: f.assign(y=f.index % 2 == 0), {}, ValueError, "'y' is boolean"),
        (lambda f: f.assign(y=f["y"].where(f.index > 0, np.inf)), {}, ValueError, "infinite"),
        (lambda f: f[["y"]], {}, ValueError, "no feature columns"),
        (None, {"features": ["a", "zzz"]}, ValueError, "'zzz'"),
        (None, {"features": []}, ValueError, "no feature columns"),
        (None, {"features": ["a", "y"]}, ValueError, "features must not include"),
        (None, {"categorical": ["nope"]}, ValueError, "'nope'"),
        (None, {"bin_width": 0}, ValueError, "bin_width"),
        (None, {"cap": 0}, ValueError, "cap"),
        (None, {"train_fraction": 0.0}, ValueError, "train_fraction"),
        (lambda f: f.head(0), {}, ValueError, "no rows"),
        (lambda f: f.assign(a=f["a"].where(f.index % 5 > 0)), {}, ValueError, "'a'.*impute"),
        (lambda f: f.assign(y=np.nan), {"dropna": True}, ValueError, "no rows left"),
    ],
)
def test_load_table_bad_input(mutate, kwargs: dict, error: type, match: str) -> None:
    frame = _frame(300)
    if mutate is not None:
        frame = mutate(frame)
    kwargs = {"target": "y", **kwargs}
    with pytest.raises(error, match=match):
        load_table(frame, **kwargs)


def test_load_table_missing_file_and_bad_source(tmp_path) -> None:
    missing = tmp_path / "nowhere.csv"
    with pytest.raises(FileNotFoundError, match="csv_path_or_dataframe.*nowhere.csv"):
        load_table(missing, "y")
    with pytest.raises(TypeError, match="csv_path_or_dataframe"):
        load_table(42, "y")  # type: ignore[arg-type]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_table(empty, "y")


def test_load_table_too_few_rows() -> None:
    # every bin holds 1-2 rows: validation and test would be empty
    frame = pd.DataFrame({"x": np.arange(12.0), "y": np.repeat(np.arange(6.0), 2)})
    with pytest.raises(ValueError, match="too few rows.*bin_width"):
        load_table(frame, "y", bin_width=1.0)
    # a wider bin works
    assert load_table(frame, "y", bin_width=3.0).info["sizes"]["val"] == 4
    # three rows in one bin: one each for train, val and test; a tiny fraction empties training
    tiny = pd.DataFrame({"x": [0.0, 1.0, 2.0], "y": [1.0, 1.0, 1.0]})
    data = load_table(tiny, "y", bin_width=1.0)
    assert (data.y_train.numel(), data.y_val.numel(), data.y_test.numel()) == (1, 1, 1)
    with pytest.raises(ValueError, match="training set is empty.*train_fraction"):
        load_table(tiny, "y", bin_width=1.0, train_fraction=0.4)


# ---------------------------------------------------------------------------------- diamonds
needs_plotnine = pytest.mark.skipif(importlib.util.find_spec("plotnine") is None,
                                    reason="plotnine (which bundles diamonds.csv) is not installed")


@needs_plotnine
def test_diamonds_split_facts() -> None:
    from balanced_sam.data import diamonds

    data = diamonds.load(seed=0)
    info = data.info
    # Val/test sizes as the protocol says; training keeps round(0.2 * 47,026) = 9,405 rows
    # (a per-row coin flip would give 9,499 with one seed, see the module docstring).
    assert info["sizes"]["rows"] == 53_940
    assert (info["sizes"]["val"], info["sizes"]["test"]) == (3_457, 3_457)
    assert info["sizes"]["train_before_fraction"] == 47_026
    assert info["sizes"]["train"] == 9_405
    assert info["C"] == 50 and info["train_fraction"] == 0.2
    assert data.bins == {"bin_width": 250.0, "lower": 250.0, "upper": 19_000.0}
    assert data.x_train.shape == (9_405, 6 + 5 + 7 + 8)
    assert data.target_unit == "$"
    bins = LabelBins.from_labels(data.y_train, **data.bins)
    assert bins.num_bins == 75
    regions = bins.region_counts()
    assert sum(regions.values()) == 75
    assert regions == {"many": 24, "medium": 22, "few": 29}
    # one-hot columns are exactly 0/1, three groups -> three ones per row
    onehot = data.x_test[:, 6:]
    assert set(onehot.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(onehot.sum(1), torch.full((onehot.shape[0],), 3.0))
    # the training seed does not move the split
    other = diamonds.load(seed=5)
    assert torch.equal(other.y_test, data.y_test) and torch.equal(other.x_train, data.x_train)
