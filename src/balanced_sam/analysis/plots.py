"""Plots of loss landscapes: 1-D curves, 2-D contours, 3-D surfaces, and the paper's Figure 1.

matplotlib is imported inside the functions (it is an optional dependency), and figures are made
with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never through ``pyplot``, so
nothing here changes the user's matplotlib backend or leaks open figures. Every function that
takes ``path`` writes a PNG there (parent folders created) and returns the path; without ``path``
it returns the figure.

Figure 1 of the BSAM paper puts the landscape of the loss over all samples beside the landscape
over the few-shot samples; :func:`plot_region_comparison` does that for one or several
checkpoints (rows: methods, columns: regions), with the MAE at the landscape's minimum in every
subplot title and a shared scale per column so the methods can be compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from balanced_sam.analysis.landscape import Landscape

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_landscape_1d",
    "plot_landscape_contour",
    "plot_landscape_surface",
    "plot_region_comparison",
    "save_landscape_plots",
]

_REGION_NAMES = {"all": "all samples", "many": "many-shot", "medium": "medium-shot",
                 "few": "few-shot"}
_METRIC_NAMES = {"loss": "loss", "mae": "MAE"}


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: str | Path | None) -> Figure | Path:
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _metric_label(ls: Landscape, metric: str) -> str:
    if metric == "loss":
        name = str(ls.meta.get("loss") or "loss")
        return f"{name.upper() if len(name) <= 4 else name} loss"
    return _METRIC_NAMES.get(metric, metric)


def _region_label(ls: Landscape, region: str) -> str:
    return f"{_REGION_NAMES.get(region, region)} (n={ls.counts.get(region, 0)})"


def _min_text(ls: Landscape, region: str, metric: str) -> str:
    m = ls.minimum(region, metric)
    if m["index"] is None:
        return "no samples"
    where = f"a={m['alpha']:+.2f}" + ("" if m["beta"] is None else f", b={m['beta']:+.2f}")
    mae = m.get("mae", math.nan)
    return f"MAE at min {mae:.4g} ({where})"


def _check(ls: Landscape, regions: Sequence[str], metric: str) -> None:
    for r in regions:
        if r not in ls.values:
            raise KeyError(f"region {r!r} is not in the landscape (have {ls.regions})")
        if metric not in ls.values[r]:
            raise KeyError(f"metric {metric!r} is not in the landscape (have "
                           f"{sorted(ls.values[r])})")


# ---------------------------------------------------------------------------------- 1-D
def _draw_1d(ax: Axes, ls: Landscape, region: str, metric: str, label: str | None = None,
             color: Any = None, mark_min: bool = True) -> None:
    y = ls.values[region][metric]
    (line,) = ax.plot(ls.alphas, y, marker="o", markersize=3, color=color,
                      label=label or _region_label(ls, region))
    if mark_min and np.isfinite(y).any():
        m = ls.minimum(region, metric)
        ax.plot([m["alpha"]], [m[metric]], marker="*", markersize=13, color=line.get_color(),
                markeredgecolor="black", linestyle="none", clip_on=False, zorder=5)


def plot_landscape_1d(
    landscape: Landscape,
    path: str | Path | None = None,
    regions: Sequence[str] | None = None,
    metric: str = "loss",
    title: str | None = None,
) -> Figure | Path:
    """1-D slice: ``metric`` against alpha, one curve per region (star: the minimum; dashed line:
    the trained parameters). A second panel shows the MAE when ``metric`` is the loss and the
    loss is not L1 (for L1 the two coincide)."""
    if landscape.dim != 1:
        raise ValueError("plot_landscape_1d needs a 1-D landscape; use plot_landscape_contour")
    regions = list(regions or landscape.regions)
    _check(landscape, regions, metric)
    loss_is_l1 = str(landscape.meta.get("loss", "")).lower() in ("l1", "mae", "l1_loss",
                                                                   "l1_per_sample")
    panels = [metric] + (["mae"] if metric == "loss" and not loss_is_l1 else [])
    fig = _figure(5.2 * len(panels), 4.0)
    for i, met in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for r in regions:
            _draw_1d(ax, landscape, r, met)
        ax.axvline(0.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("alpha (filter-normalised direction)")
        ax.set_ylabel(_metric_label(landscape, met))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(_metric_label(landscape, met) + " along a random direction")
    if title or landscape.meta.get("label"):
        fig.suptitle(title or str(landscape.meta["label"]))
    fig.tight_layout()
    return _finish(fig, path)


# ---------------------------------------------------------------------------------- 2-D
def _draw_contour(fig: Figure, ax: Axes, ls: Landscape, region: str, metric: str,
                  levels: int = 30, vmin: float | None = None, vmax: float | None = None,
                  colorbar: bool = True) -> None:
    z = ls.values[region][metric]
    if not np.isfinite(z).any():
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    a, b = np.meshgrid(ls.alphas, ls.betas, indexing="ij")
    lo = np.nanmin(z) if vmin is None else vmin
    hi = np.nanmax(z) if vmax is None else vmax
    lv = np.linspace(lo, hi if hi > lo else lo + 1e-12, levels)
    cs = ax.contourf(a, b, z, levels=lv, cmap="viridis", extend="both")
    ax.contour(a, b, z, levels=lv[::3], colors="white", linewidths=0.4, alpha=0.6)
    if colorbar:
        from matplotlib.ticker import MaxNLocator

        cb = fig.colorbar(cs, ax=ax, ticks=MaxNLocator(7))
        cb.set_label(_metric_label(ls, metric))
    m = ls.minimum(region, metric)
    ax.plot([m["alpha"]], [m["beta"]], marker="*", color="red", markeredgecolor="black",
            markersize=13, linestyle="none", label="minimum", clip_on=False, zorder=5)
    ax.plot([0.0], [0.0], marker="X", color="white", markeredgecolor="black", markersize=9,
            linestyle="none", label="trained", zorder=5)
    ax.set_xlabel("alpha (direction 1)")
    ax.set_ylabel("beta (direction 2)")
    ax.legend(fontsize=7, loc="upper right")


def plot_landscape_contour(
    landscape: Landscape,
    region: str = "all",
    metric: str = "loss",
    path: str | Path | None = None,
    levels: int = 30,
    title: str | None = None,
) -> Figure | Path:
    """2-D slice as filled contours with a colour bar (star: minimum; cross: trained)."""
    if landscape.dim != 2:
        raise ValueError("plot_landscape_contour needs a 2-D landscape")
    _check(landscape, [region], metric)
    fig = _figure(5.6, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    _draw_contour(fig, ax, landscape, region, metric, levels)
    ax.set_title(title or f"{landscape.meta.get('label') or ''} {_region_label(landscape, region)}"
                 f"\n{_min_text(landscape, region, metric)}".strip())
    fig.tight_layout()
    return _finish(fig, path)


def _draw_surface(fig: Figure, ax: Any, ls: Landscape, region: str, metric: str,
                  vmin: float | None = None, vmax: float | None = None) -> None:
    z = ls.values[region][metric]
    if not np.isfinite(z).any():
        ax.text2D(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    a, b = np.meshgrid(ls.alphas, ls.betas, indexing="ij")
    surf = ax.plot_surface(a, b, z, cmap="viridis", linewidth=0, antialiased=True,
                           vmin=vmin, vmax=vmax)
    cb = fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.16)
    cb.set_label(_metric_label(ls, metric))
    ax.set_xlabel("alpha")
    ax.set_ylabel("beta")
    ax.set_zlabel(_metric_label(ls, metric))
    if vmin is not None and vmax is not None and vmax > vmin:
        ax.set_zlim(vmin, vmax)


def plot_landscape_surface(
    landscape: Landscape,
    region: str = "all",
    metric: str = "loss",
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure | Path:
    """2-D slice as a 3-D surface with a colour bar."""
    if landscape.dim != 2:
        raise ValueError("plot_landscape_surface needs a 2-D landscape")
    _check(landscape, [region], metric)
    fig = _figure(6.4, 5.0)
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    _draw_surface(fig, ax, landscape, region, metric)
    ax.set_title(title or f"{landscape.meta.get('label') or ''} {_region_label(landscape, region)}"
                 f"\n{_min_text(landscape, region, metric)}".strip())
    return _finish(fig, path)


# ---------------------------------------------------------------------------------- Figure 1
def _shared_limits(items: Sequence[tuple[str, Landscape]], region: str,
                   metric: str) -> tuple[float | None, float | None]:
    """The range of ``metric`` over every landscape's ``region`` (finite values only)."""
    vals = np.concatenate([np.ravel(ls.values[region][metric]) for _, ls in items])
    vals = vals[np.isfinite(vals)]
    return (float(vals.min()), float(vals.max())) if vals.size else (None, None)


def plot_region_comparison(
    landscapes: Landscape | Mapping[str, Landscape],
    path: str | Path | None = None,
    regions: Sequence[str] = ("all", "few"),
    metric: str = "loss",
    kind: str = "auto",
    share_scale: bool = True,
    title: str | None = None,
) -> Figure | Path:
    """The paper's Figure 1: the landscape over all samples beside the one over few-shot samples.

    Args:
        landscapes: one landscape, or method name -> landscape (rows, in the given order); all
            should come from the same seed so that the directions are drawn alike.
        path: PNG to write.
        regions: the columns.
        metric: ``"loss"`` or ``"mae"``.
        kind: ``"curve"`` (1-D), ``"contour"`` or ``"surface"`` (2-D); ``"auto"`` picks curve
            for 1-D landscapes and contour for 2-D ones.
        share_scale: same y-range (curves) or colour range (2-D) within each column, so the
            methods are comparable at a glance.
        title: figure title.

    Every subplot title names the method, the region with its sample count and the MAE at the
    grid point of minimum ``metric``.
    """
    if isinstance(landscapes, Landscape):
        landscapes = {str(landscapes.meta.get("label") or "model"): landscapes}
    if not landscapes:
        raise ValueError("landscapes is empty")
    items = list(landscapes.items())
    dims = {ls.dim for _, ls in items}
    if len(dims) != 1:
        raise ValueError("all landscapes must have the same dimension")
    dim = dims.pop()
    if kind == "auto":
        kind = "curve" if dim == 1 else "contour"
    if kind not in ("curve", "contour", "surface"):
        raise ValueError(f"kind must be 'auto', 'curve', 'contour' or 'surface', got {kind!r}")
    if (kind == "curve") != (dim == 1):
        raise ValueError(f"kind={kind!r} does not fit {dim}-D landscapes")
    regions = list(regions)
    for _, ls in items:
        _check(ls, regions, metric)

    limits = {r: _shared_limits(items, r, metric) if share_scale else (None, None)
              for r in regions}
    nrow, ncol = len(items), len(regions)
    w, h = (4.6, 3.6) if kind == "curve" else (5.4, 4.4)
    fig = _figure(w * ncol, h * nrow + 0.6)
    for i, (name, ls) in enumerate(items):
        for j, r in enumerate(regions):
            k = i * ncol + j + 1
            if kind == "surface":
                ax = fig.add_subplot(nrow, ncol, k, projection="3d")
                _draw_surface(fig, ax, ls, r, metric, *limits[r])
            else:
                ax = fig.add_subplot(nrow, ncol, k)
                if kind == "curve":
                    _draw_1d(ax, ls, r, metric, label=name)
                    ax.axvline(0.0, color="grey", linestyle="--", linewidth=0.8)
                    ax.set_xlabel("alpha (filter-normalised direction)")
                    ax.set_ylabel(_metric_label(ls, metric))
                    lo, hi = limits[r]
                    if lo is not None and hi is not None and hi > lo:
                        pad = 0.05 * (hi - lo)
                        ax.set_ylim(lo - pad, hi + pad)
                    ax.grid(alpha=0.3)
                    ax.legend(fontsize=8)
                else:
                    _draw_contour(fig, ax, ls, r, metric, 30, *limits[r])
            ax.set_title(f"{name}: {_region_label(ls, r)}\n{_min_text(ls, r, metric)}",
                         fontsize=10)
    fig.suptitle(title or f"Loss landscape ({_metric_label(items[0][1], metric)}): "
                          + " vs ".join(_REGION_NAMES.get(r, r) for r in regions))
    if kind != "surface":
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    return _finish(fig, path)


def save_landscape_plots(landscape: Landscape, out_dir: str | Path, prefix: str = "landscape",
                         regions: Sequence[str] | None = None) -> list[Path]:
    """Write the standard plots of one landscape into ``out_dir``: the 1-D curves, or for 2-D a
    contour and a surface per region and metric ``loss``; plus the all-vs-few comparison when
    both regions are present. Returns the paths written."""
    out = Path(out_dir)
    regions = list(regions or landscape.regions)
    paths: list[Path] = []
    if landscape.dim == 1:
        paths.append(Path(plot_landscape_1d(landscape, out / f"{prefix}_1d.png", regions)))
    else:
        for r in regions:
            paths.append(Path(plot_landscape_contour(landscape, r, "loss",
                                                     out / f"{prefix}_{r}_contour.png")))
            paths.append(Path(plot_landscape_surface(landscape, r, "loss",
                                                     out / f"{prefix}_{r}_surface.png")))
    pair = [r for r in ("all", "few") if r in landscape.values]
    if len(pair) == 2:
        paths.append(Path(plot_region_comparison(landscape, out / f"{prefix}_all_vs_few.png",
                                                 pair)))
    return paths
