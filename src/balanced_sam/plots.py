"""Figures of ``bsam bench``: label histograms, per-bin test error, the rho sweep.

matplotlib is imported inside the functions (``import balanced_sam`` does not need it) and only
its object-oriented API is used: figures are drawn on an Agg canvas and written to PNG (or any
format matplotlib infers from the file name) without touching pyplot's global state or backend.

The result-reading functions take the ``results.json`` dictionary of ``bsam bench``::

    {"dataset": ..., "config": {...}, "split": {...}, "bins": LabelBins.to_dict(),
     "methods": {NAME: {"runs": [{"seed": s, "rho": r, "test": REPORT,
                                  "test_per_bin": {"mae": [...], "count": [...]}, ...}],
                        "mean": REPORT, "std": REPORT}}}

with ``REPORT = {region: {metric: value}}``. Runs are grouped by ``(method, rho)``, so one method
swept over several rho values gives one curve point per rho.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from balanced_sam.bins import LabelBins
from balanced_sam.metrics import mean_std as _mean_std

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_label_histogram", "plot_per_bin_mae", "plot_rho_sweep", "group_runs"]

DPI = 120
REGION_COLORS = {"many": "#dbe9f6", "medium": "#fdebd0", "few": "#f9d6d5"}
REGION_NAMES = ("many", "medium", "few")


# ---------------------------------------------------------------------------------- helpers
def _new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1,
                **kwargs: Any) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    return out


def _as_bins(bins: LabelBins | Mapping[str, Any]) -> LabelBins:
    if isinstance(bins, LabelBins):
        return bins
    if isinstance(bins, Mapping):
        return LabelBins.from_dict(dict(bins))
    raise TypeError(f"bins must be a LabelBins or its to_dict() form, got {type(bins).__name__}")


def _unit_label(what: str, unit: str) -> str:
    return f"{what} ({unit})" if unit else what


def _shade_regions(ax: Axes, bins: LabelBins, many: int, few: int) -> None:
    """Shade the background of every run of consecutive bins of the same region."""
    code = bins.region_index(many, few).numpy()
    edges = bins.edges.numpy()
    change = np.flatnonzero(np.diff(code)) + 1
    starts = np.concatenate(([0], change))
    stops = np.concatenate((change, [code.size]))
    for a, b in zip(starts, stops):
        region = REGION_NAMES[int(code[a])]
        ax.axvspan(edges[a], edges[b], color=REGION_COLORS[region], zorder=0, lw=0)


def _region_handles(many: int, few: int) -> list[Any]:
    from matplotlib.patches import Patch

    labels = {"many": f"many-shot (> {many})", "medium": f"medium-shot ({few}-{many})",
              "few": f"few-shot (< {few})"}
    return [Patch(facecolor=REGION_COLORS[r], label=labels[r]) for r in REGION_NAMES]


def _results_unit(results: Mapping[str, Any], unit: str | None) -> str:
    if unit is not None:
        return unit
    for holder in (results, results.get("config") or {}):
        for key in ("target_unit", "unit"):
            if isinstance(holder.get(key), str):
                return holder[key]
    return ""


def _check_results(results: Any) -> Mapping[str, Any]:
    if not isinstance(results, Mapping) or not isinstance(results.get("methods"), Mapping):
        raise ValueError("results must be a results.json dictionary with a 'methods' mapping")
    if not results["methods"]:
        raise ValueError("results['methods'] is empty: nothing to plot")
    return results["methods"]


def _rho_key(rho: Any) -> float | None:
    if rho is None:
        return None
    r = float(rho)
    return None if math.isnan(r) else r


def group_runs(results: Mapping[str, Any]) -> dict[tuple[str, float | None], list[dict]]:
    """Runs of a results dictionary grouped by ``(method, rho)`` (rho ``None`` when absent),
    in the order they first appear; runs marked ``diverged`` are left out (as from the bench's
    means), a group of diverged runs only is absent."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for method, entry in _check_results(results).items():
        for run in entry.get("runs", []):
            if not run.get("diverged"):
                groups.setdefault((method, _rho_key(run.get("rho"))), []).append(run)
    return groups


def _group_label(method: str, rho: float | None, several: bool) -> str:
    return f"{method} (rho={rho:g})" if several and rho is not None else method


# ---------------------------------------------------------------------------------- figures
def plot_label_histogram(
    bins: LabelBins | Mapping[str, Any],
    y_train: Any,
    y_test: Any,
    path: str | os.PathLike,
    many: int = 100,
    few: int = 20,
    unit: str = "",
    title: str | None = None,
    log: bool = False,
) -> Path:
    """Training and test label histograms over ``bins``, background shaded by region.

    Two stacked panels share the label axis: training counts (the long tail that defines the
    regions) and test counts (nearly flat for a DIR split). ``log`` puts the count axes on a
    log scale. Returns the written path.
    """
    lb = _as_bins(bins)
    edges = lb.edges.numpy()
    widths = np.diff(edges)
    fig, axes = _new_figure(8.0, 5.5, 2, 1, sharex=True)
    for ax, y, what, color in ((axes[0, 0], y_train, "train", "#1f4e79"),
                               (axes[1, 0], y_test, "test", "#7f2704")):
        t = torch.as_tensor(np.asarray(y, dtype=np.float64)).reshape(-1)
        counts = np.bincount(lb.bin_index(t, _name=f"y_{what}").numpy(), minlength=lb.num_bins)
        _shade_regions(ax, lb, many, few)
        ax.bar(edges[:-1], counts, width=widths, align="edge", color=color, alpha=0.85,
               edgecolor="white", linewidth=0.3, zorder=2, label=f"{what} ({int(t.numel()):,})")
        ax.set_ylabel(f"{what} samples per bin")
        top = max(int(counts.max()), 1)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(0.8, top * 20.0)  # headroom for the legend
        else:
            ax.set_ylim(0, top * 1.45)
        ax.grid(axis="y", alpha=0.3, zorder=1)
        ax.set_xlim(edges[0], edges[-1])
        ax.legend(handles=[*ax.get_legend_handles_labels()[0], *_region_handles(many, few)],
                  loc="upper right", fontsize=8, framealpha=0.9, ncol=2)
    axes[1, 0].set_xlabel(_unit_label("label", unit))
    axes[0, 0].set_title(title or "Label distribution: train (long-tailed) vs test (balanced); "
                         "regions by training count per bin", fontsize=10)
    return _save(fig, path)


def plot_per_bin_mae(
    results: Mapping[str, Any],
    bins: LabelBins | Mapping[str, Any] | None,
    path: str | os.PathLike,
    many: int = 100,
    few: int = 20,
    unit: str | None = None,
    title: str | None = None,
) -> Path:
    """Per-bin test MAE of every method (mean over seeds) against the bin centre.

    Each run needs ``"test_per_bin": {"mae": [K values, None for bins without test labels],
    "count": [K ints]}``. With several rho values for one method (a sweep), each rho is its own
    curve. ``bins`` defaults to ``results["bins"]``; ``unit`` to the results' target unit.
    """
    if bins is None:
        if "bins" not in results:
            raise ValueError("bins not given and results has no 'bins' entry")
        bins = results["bins"]
    lb = _as_bins(bins)
    unit = _results_unit(results, unit)
    groups = group_runs(results)
    rhos_per_method: dict[str, set] = {}
    for method, rho in groups:
        rhos_per_method.setdefault(method, set()).add(rho)
    centers = lb.centers.numpy()

    fig, axes = _new_figure(8.5, 4.5)
    ax = axes[0, 0]
    _shade_regions(ax, lb, many, few)
    plotted = 0
    for (method, rho), runs in groups.items():
        rows = []
        for run in runs:
            per_bin = run.get("test_per_bin")
            if not per_bin or "mae" not in per_bin:
                continue
            mae = np.array([np.nan if v is None else float(v) for v in per_bin["mae"]])
            if mae.size != lb.num_bins:
                raise ValueError(f"method {method!r}: test_per_bin['mae'] has {mae.size} values "
                                 f"but the bins have {lb.num_bins}")
            rows.append(mae)
        if not rows:
            continue
        stacked = np.vstack(rows)
        seen = np.isfinite(stacked).any(axis=0)
        mean = np.full(lb.num_bins, np.nan)
        mean[seen] = np.nanmean(stacked[:, seen], axis=0)
        label = _group_label(method, rho, len(rhos_per_method[method]) > 1)
        ax.plot(centers, mean, marker="o", markersize=2.5, linewidth=1.2, zorder=3,
                label=f"{label} (n={len(rows)})")
        plotted += 1
    if plotted == 0:
        raise ValueError("no run carries 'test_per_bin' with 'mae': nothing to plot")
    ax.set_xlim(float(lb.edges[0]), float(lb.edges[-1]))
    ax.set_xlabel(_unit_label("label (bin centre)", unit))
    ax.set_ylabel(_unit_label("test MAE per bin", unit))
    ax.grid(alpha=0.3, zorder=1)
    dataset = results.get("dataset")
    ax.set_title(title or f"Per-bin test MAE{f' on {dataset}' if dataset else ''} "
                 "(mean over seeds)", fontsize=10)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=[*handles, *_region_handles(many, few)], fontsize=8, loc="upper left",
              framealpha=0.9, ncol=2)
    return _save(fig, path)


def plot_rho_sweep(
    results: Mapping[str, Any],
    path: str | os.PathLike,
    metric: str = "mae",
    regions: Sequence[str] = ("all", "few"),
    unit: str | None = None,
    title: str | None = None,
) -> Path:
    """Test ``metric`` against rho per method, one panel per region (the paper's Figure 2).

    Points are the mean over seeds of ``run["test"][region][metric]`` for each ``(method, rho)``
    with sample standard deviations (ddof=1) as error bars; the rho axis is logarithmic. Methods
    without rho (vanilla, sqinv, ...), or run at rho <= 0, are drawn as a horizontal line at their
    mean (its std in the legend), for reference. Points of different methods at the same rho are
    shifted slightly sideways so that their error bars do not overlap.
    """
    if isinstance(regions, str):
        regions = (regions,)
    if not regions:
        raise ValueError("regions must name at least one of all, many, medium, few")
    unit = _results_unit(results, unit)
    groups = group_runs(results)

    curves: dict[str, list[tuple[float, float, float, int]]] = {}
    flat: dict[str, tuple[list[float], list[float]]] = {}
    for region in regions:
        for (method, rho), runs in groups.items():
            vals = []
            for run in runs:
                try:
                    value = run["test"][region][metric]
                    vals.append(math.nan if value is None else float(value))
                except (KeyError, TypeError) as exc:
                    raise ValueError(
                        f"method {method!r}: a run lacks test[{region!r}][{metric!r}]; regions "
                        "are all/many/medium/few and metrics mae/mse/rmse/gm/bmae") from exc
            m, s = _mean_std(vals)
            if rho is not None and rho > 0:
                curves.setdefault(f"{method}\0{region}", []).append((rho, m, s, len(vals)))
            else:
                means, stds = flat.setdefault(f"{method}\0{region}", ([], []))
                means.append(m)
                stds.append(s)
    if not curves:
        raise ValueError("no run has a positive rho: a rho sweep needs runs of a SAM-type "
                         "method at one or more rho values")

    methods = list(dict.fromkeys(method for method, _ in groups))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    # methods swept over the same rho values are dodged slightly so their error bars stay apart
    swept = [m for m in methods if any(f"{m}\0{r}" in curves for r in regions)]
    dodge = {m: 10.0 ** (0.025 * (i - (len(swept) - 1) / 2)) for i, m in enumerate(swept)}
    fig, axes = _new_figure(4.6 * len(regions), 4.0, 1, len(regions))
    for j, region in enumerate(regions):
        ax = axes[0, j]
        for method in methods:
            pts = curves.get(f"{method}\0{region}")
            if pts:
                pts = sorted(pts)
                x = [p[0] * dodge[method] for p in pts]
                ax.errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            markersize=4, capsize=3, linewidth=1.3, color=colors[method],
                            label=method)
            base = flat.get(f"{method}\0{region}")
            if base:
                m, s = float(np.mean(base[0])), float(np.mean(base[1]))
                ax.axhline(m, color=colors[method], linestyle="--", linewidth=1.1,
                           label=f"{method} (no rho): {m:.4g} +- {s:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("rho (perturbation radius, log scale)")
        ax.set_ylabel(_unit_label(f"test {metric.upper()}", unit))
        ax.set_title(f"{region} labels", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if j == 0:
            ax.legend(fontsize=8, framealpha=0.9, loc="best")
    dataset = results.get("dataset")
    fig.suptitle(title or f"Test {metric.upper()} vs rho{f' on {dataset}' if dataset else ''} "
                 "(mean +- std over seeds)", fontsize=11)
    return _save(fig, path)


def plot_paired_differences(
    comparisons: Mapping[str, Mapping[str, Mapping[str, Any] | None]],
    path: str | os.PathLike,
    baseline: str = "sqinv",
    unit: str = "",
    title: str | None = None,
    confidence: float = 0.95,
) -> Path:
    """The paired differences against ``baseline`` with their intervals: one panel per metric
    (MAE All / Many / Med. / Few, GM, bMAE), one row per method, the mean difference as a dot,
    its confidence interval as a bar and a line at 0 (left of it: lower error than the
    baseline). ``comparisons`` is :func:`balanced_sam.stats.paired_comparisons`' output; an
    entry that is ``None`` (empty region) is marked n/a, one with ``n = 1`` is drawn without
    a bar. Each row's label gives the wins, e.g. ``bsam (6/8)``. A grey band around 0 spans
    +-``mde``, the smallest effect the seeds detect with 80% power: a true difference inside
    it would likely have been missed.
    """
    if not isinstance(comparisons, Mapping) or not comparisons:
        raise ValueError("comparisons must be a non-empty {method: {metric: ...}} mapping, "
                         "as balanced_sam.stats.paired_comparisons returns")
    methods = list(comparisons)
    keys = list(dict.fromkeys(k for cmp in comparisons.values() for k in cmp))
    if not keys:
        raise ValueError("comparisons hold no metric to plot")
    labels = {"mae": "MAE", "gm": "GM", "bmae": "bMAE", "all": "All", "many": "Many",
              "medium": "Med.", "few": "Few"}
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = _new_figure(4.2 * ncols, 0.45 * len(methods) * nrows + 1.6 * nrows, nrows,
                            ncols)
    y = np.arange(len(methods))[::-1]
    for i, key in enumerate(keys):
        ax = axes[i // ncols, i % ncols]
        metric, _, region = key.partition("_")
        ax.axvline(0.0, color="0.3", linewidth=1.0, zorder=1)
        ticks = []
        for j, method in enumerate(methods):
            c = comparisons[method].get(key)
            color = f"C{j % 10}"
            if c is None or c.get("mean") is None:  # empty region / no pair left
                ax.text(0.0, y[j], " n/a", va="center", fontsize=8, color="0.4")
                ticks.append(method)
                continue
            if c.get("mde") is not None:  # effects inside the band: likely missed
                ax.fill_betweenx([y[j] - 0.32, y[j] + 0.32], -c["mde"], c["mde"],
                                 color="0.85", linewidth=0, zorder=0)
            if c.get("ci_low") is not None:
                lo, hi = c["mean"] - c["ci_low"], c["ci_high"] - c["mean"]
                ax.errorbar([c["mean"]], [y[j]], xerr=[[lo], [hi]], fmt="o", color=color,
                            capsize=4, markersize=5, linewidth=1.5, zorder=3)
            else:
                ax.plot([c["mean"]], [y[j]], "o", color=color, markersize=5, zorder=3)
            ticks.append(f"{method} ({c['wins']}/{c['n']})")
        ax.set_yticks(y)
        ax.set_yticklabels(ticks, fontsize=8)
        ax.set_ylim(-0.7, len(methods) - 0.3)
        ax.set_title(f"{labels.get(metric, metric)} {labels.get(region, region)}", fontsize=10)
        ax.set_xlabel(_unit_label(f"method - {baseline}", unit), fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    for i in range(len(keys), nrows * ncols):
        axes[i // ncols, i % ncols].set_visible(False)
    fig.suptitle(title or f"Paired differences against {baseline} (mean and "
                 f"{confidence * 100:g}% interval over seeds; wins in brackets; grey: "
                 "smaller than the seeds could detect)", fontsize=11)
    return _save(fig, path)
