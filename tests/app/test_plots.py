"""The bench figures render to non-empty PNGs from a small synthetic results dictionary."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from balanced_sam.bins import LabelBins

pytest.importorskip("matplotlib")

from balanced_sam.plots import (  # noqa: E402
    group_runs,
    plot_label_histogram,
    plot_per_bin_mae,
    plot_rho_sweep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REGIONS = ("all", "many", "medium", "few")
METRICS = ("mae", "mse", "rmse", "gm", "bmae", "count")


def _report(rng: np.random.Generator, scale: float) -> dict:
    out = {}
    for region in REGIONS:
        mae = scale * (1.0 + rng.random())
        out[region] = {"mae": mae, "mse": mae**2, "rmse": mae, "gm": 0.7 * mae,
                       "bmae": 1.1 * mae, "count": 100}
    return out


def _results() -> tuple[dict, LabelBins, np.ndarray]:
    rng = np.random.default_rng(0)
    y_train = np.concatenate([np.minimum(rng.exponential(300.0, 2000) + 250.0, 2300.0),
                              [2400.0]])
    bins = LabelBins.from_labels(y_train, bin_width=250.0, lower=250.0, upper=2500.0)
    k = bins.num_bins
    methods: dict = {}
    for name, rhos in (("vanilla", [None]), ("sqinv", [None]), ("sam", [0.05, 0.1]),
                       ("bsam", [0.01, 0.05, 0.2])):
        runs = []
        for rho in rhos:
            for seed in range(3):
                mae = list(100.0 + 50.0 * np.arange(k) + 10.0 * rng.random(k))
                mae[-2] = None  # a bin without test labels
                runs.append({
                    "seed": seed, "rho": rho, "best_epoch": 3, "train_seconds": 1.0,
                    "val": _report(rng, 300.0), "test": _report(rng, 300.0),
                    "test_per_bin": {"mae": mae, "count": [10] * (k - 2) + [0, 10]},
                })
        methods[name] = {"runs": runs, "mean": runs[0]["test"], "std": runs[0]["test"]}
    return {"dataset": "synthetic", "config": {"target_unit": "$"},
            "split": {"train": 2001, "val": 100, "test": 100, "bins": k,
                      "regions": bins.region_counts()},
            "bins": bins.to_dict(), "methods": methods}, bins, y_train


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 5000 and data.startswith(PNG_MAGIC)


@pytest.mark.e2e
def test_importing_the_package_does_not_import_matplotlib() -> None:
    import subprocess

    code = ("import sys, balanced_sam.plots, balanced_sam.data.tabular; "
            "sys.exit(int('matplotlib' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_label_histogram(tmp_path) -> None:
    results, bins, y_train = _results()
    y_test = np.repeat(bins.centers.numpy(), 5)
    out = plot_label_histogram(bins, y_train, y_test, tmp_path / "sub" / "hist.png", unit="$")
    assert out.exists() and _is_png(out)
    out_log = plot_label_histogram(results["bins"], y_train, y_test, tmp_path / "log.png",
                                   log=True)
    assert _is_png(out_log)


def test_label_histogram_rejects_out_of_range_labels(tmp_path) -> None:
    _, bins, y_train = _results()
    with pytest.raises(ValueError, match="y_test"):
        plot_label_histogram(bins, y_train, [99999.0], tmp_path / "bad.png")


def test_per_bin_mae(tmp_path) -> None:
    results, bins, _ = _results()
    out = plot_per_bin_mae(results, bins, tmp_path / "per_bin.png")
    assert _is_png(out)
    assert _is_png(plot_per_bin_mae(results, None, tmp_path / "per_bin2.png"))  # results["bins"]


def test_per_bin_mae_errors(tmp_path) -> None:
    results, bins, _ = _results()
    short = LabelBins.from_labels([300.0, 600.0], bin_width=250.0)
    with pytest.raises(ValueError, match="test_per_bin"):
        plot_per_bin_mae(results, short, tmp_path / "x.png")
    for entry in results["methods"].values():
        for run in entry["runs"]:
            del run["test_per_bin"]
    with pytest.raises(ValueError, match="test_per_bin"):
        plot_per_bin_mae(results, bins, tmp_path / "y.png")
    with pytest.raises(ValueError, match="methods"):
        plot_per_bin_mae({"runs": []}, bins, tmp_path / "z.png")


def test_rho_sweep(tmp_path) -> None:
    results, _, _ = _results()
    groups = group_runs(results)
    assert len(groups[("bsam", 0.05)]) == 3 and ("vanilla", None) in groups
    out = plot_rho_sweep(results, tmp_path / "rho.png")
    assert _is_png(out)
    out2 = plot_rho_sweep(results, tmp_path / "rho_gm.png", metric="gm",
                          regions=("all", "many", "medium", "few"))
    assert _is_png(out2)
    results["methods"]["bsam"]["runs"][0]["test"]["few"]["mae"] = None  # missing value tolerated
    assert _is_png(plot_rho_sweep(results, tmp_path / "rho3.png", regions="few"))


def test_rho_sweep_errors(tmp_path) -> None:
    results, _, _ = _results()
    with pytest.raises(ValueError, match="'medium_rare'"):
        plot_rho_sweep(results, tmp_path / "a.png", regions=("medium_rare",))
    with pytest.raises(ValueError, match="'nope'"):
        plot_rho_sweep(results, tmp_path / "b.png", metric="nope")
    no_rho = {"methods": {k: v for k, v in results["methods"].items()
                          if k in ("vanilla", "sqinv")}}
    with pytest.raises(ValueError, match="positive rho"):
        plot_rho_sweep(no_rho, tmp_path / "c.png")
