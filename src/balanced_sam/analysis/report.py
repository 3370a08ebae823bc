r"""One call per checkpoint: sharpness per label region and loss landscapes, as JSON-ready dicts.

:func:`analyze_model` measures, for every requested region (``"all"``, ``"many"``,
``"medium"``, ``"few"``), the top Hessian eigenvalue :math:`\lambda_{\max}` and the trace
:math:`\mathrm{Tr}(H)` of the region's mean loss (:mod:`balanced_sam.analysis.hessian`), and one
loss landscape along random filter-normalised directions shared by all regions
(:mod:`balanced_sam.analysis.landscape`).
:func:`format_sharpness_table` renders the results of several checkpoints as the paper's Table 8
(rows: methods; columns: :math:`\lambda_{\max}` and :math:`\mathrm{Tr}(H)` per region).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from balanced_sam.analysis._common import LossFn, checked_regions, resolve_loss
from balanced_sam.analysis.hessian import DEFAULT_SOLVER, hessian_top_eigenvalue, hessian_trace
from balanced_sam.analysis.landscape import Landscape, loss_landscape
from balanced_sam.bins import LabelBins
from balanced_sam.io import json_float, to_json, write_json

__all__ = ["analyze_model", "format_sharpness_table", "file_stem"]


def file_stem(name: str) -> str:
    """``name`` as the stem of the files written for it (``<stem>_analysis.json``,
    ``<stem>_landscape.npz``): runs of other characters than letters, digits, ``_ . -`` become
    ``_``; ``"model"`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def analyze_model(
    model: nn.Module, inputs: Any, targets: Any, bins: LabelBins | None,
    loss_fn: LossFn | str | None = None, regions: Sequence[str] = ("all", "few"),
    hessian: bool = True, landscape: bool = True, out_dir: str | Path | None = None, *,
    iters: int = 20, tol: float = 1e-3, solver: str = DEFAULT_SOLVER, probes: int = 20,
    trace_tol: float | None = None, grid: int | Sequence[float] = 21, span: float = 1.0,
    landscape_dim: int = 1, seed: int = 0, batch_size: int = 256, progress: bool = True,
    many: int | None = None, few: int | None = None, name: str | None = None,
    plots: bool = True, cache_graph: bool = False,
) -> dict[str, Any]:
    r"""Sharpness per region and a loss landscape for one model (left unchanged; in eval mode
    during the analysis).

    ``inputs``, ``targets``: samples (tensors, targets in label units) or an iterable of
    ``(x, y)`` batches with ``targets=None``. ``bins`` define the regions (``None``: only
    ``"all"``; thresholds ``many`` / ``few``, default the bins'). ``loss_fn``: per-sample loss
    or its name (default L1). ``hessian``: :math:`\lambda_{\max}` (``iters``, ``tol``,
    ``solver``) and the Hutchinson trace (``probes``, ``trace_tol``) per region; ``landscape``:
    one ``landscape_dim``-D landscape over ``grid`` (points per axis over ``[-span, span]``, or
    explicit alphas) for all regions. ``seed`` seeds the start vector, probes and directions;
    ``batch_size`` samples per pass; ``cache_graph`` keeps first-order graphs between
    Hessian-vector products (:class:`~balanced_sam.analysis.HessianOperator`). With ``out_dir``,
    ``<name>_landscape.npz`` / ``.json``, the plots (``plots``) and ``<name>_analysis.json`` are
    written there; without, the landscape's data stay in the result.

    Returns a JSON-ready dict::

        {"name", "loss", "num_parameters", "num_trainable_parameters", "num_samples",
         "regions": {region: {"count", "loss", "mae",                  # at the trained weights
                              "lambda_max", "lambda_max_iterations", "lambda_max_converged",
                              "lambda_max_residual", "trace", "trace_std_error",
                              "trace_probes"}},
         "landscape": None | {"dim", "npz", "json", "plots", "minimum": {region: {...}},
                              "data": <Landscape.to_dict()> (only without out_dir)},
         "settings": {...}, "seconds": {...}, "files": {"analysis_json": path or None}}

    A region without samples has ``count`` 0 and ``None`` for every estimate.
    """
    t_start = time.perf_counter()
    regions = checked_regions(regions, bins)
    loss, loss_name = resolve_loss(loss_fn)
    if bins is not None:  # without bins there are no regions to name
        many, few = bins.thresholds(many, few)
    label = name or "model"
    settings = {"iters": iters, "tol": tol, "solver": solver, "probes": probes,
                "trace_tol": trace_tol, "grid": grid if isinstance(grid, int) else
                [float(a) for a in grid], "span": span, "landscape_dim": landscape_dim,
                "seed": seed, "batch_size": batch_size, "many": many, "few": few,
                "hessian": hessian, "landscape": landscape, "cache_graph": cache_graph,
                "bn": "eval mode (running statistics)"}
    seconds: dict[str, float] = {"lambda_max": 0.0, "trace": 0.0, "landscape": 0.0}
    # Landscape first: its origin gives every region's count, loss and MAE in one pass (without
    # a landscape, a one-point "landscape" at the origin does just that).
    t0 = time.perf_counter()
    ls = loss_landscape(model, inputs, targets, bins, regions, loss, seed=seed, many=many,
                        few=few, batch_size=batch_size, progress=progress and landscape,
                        label=label, **_grid_options(landscape, grid, span, landscape_dim))
    ls.meta["loss"] = loss_name
    seconds["landscape"] = time.perf_counter() - t0 if landscape else 0.0
    per_region = {r: {"count": int(ls.counts[r]), "loss": json_float(ls.origin[r]["loss"]),
                      "mae": json_float(ls.origin[r]["mae"])} for r in regions}
    sub = {"bins": bins, "many": many, "few": few, "batch_size": batch_size,
           "progress": progress, "cache_graph": cache_graph}
    for r in regions if hessian else ():
        per_region[r].update(_sharpness(model, loss, inputs, targets, r, settings, sub, seconds))
    out = Path(out_dir) if out_dir is not None else None
    land = _landscape_files(ls, regions, out, file_stem(label), plots) if landscape else None
    seconds["total"] = time.perf_counter() - t_start
    return _result(model, label, loss_name, ls, per_region, land, settings, seconds, out)


def _result(model: nn.Module, label: str, loss_name: str, ls: Landscape,
            per_region: dict[str, Any], land: dict[str, Any] | None,
            settings: dict[str, Any], seconds: dict[str, float], out: Path | None
            ) -> dict[str, Any]:
    """The result dict (written to ``out/<name>_analysis.json`` when there is an ``out``)."""
    result: dict[str, Any] = {
        "name": label,
        "loss": loss_name,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "num_trainable_parameters": int(sum(p.numel() for p in model.parameters()
                                            if p.requires_grad)),
        "num_samples": int(ls.counts["all"]) if "all" in ls.counts else None,
        "regions": per_region,
        "landscape": land,
        "settings": settings,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "files": {"analysis_json": None},
    }
    if out is not None:
        path = out / f"{file_stem(label)}_analysis.json"
        result["files"]["analysis_json"] = str(path)
        out.mkdir(parents=True, exist_ok=True)
        write_json(result, path)
    return result


def _grid_options(landscape: bool, grid: int | Sequence[float], span: float,
                  dim: int) -> dict[str, Any]:
    """loss_landscape's grid keywords; a one-point grid at the origin without a landscape."""
    if not landscape:
        return {"dim": 1, "alphas": [0.0]}
    if isinstance(grid, int):
        return {"dim": dim, "steps": grid, "span": span}
    g = [float(a) for a in grid]
    return {"dim": dim, "alphas": g, "betas": g if dim == 2 else None}


def _sharpness(model: nn.Module, loss: LossFn, inputs: Any, targets: Any, region: str,
               settings: dict[str, Any], sub: dict[str, Any],
               seconds: dict[str, float]) -> dict[str, Any]:
    """lambda_max and the Hutchinson trace of one region's mean loss (timings added up)."""
    t0 = time.perf_counter()
    eig = hessian_top_eigenvalue(model, loss, inputs, targets, region=region,
                                 iters=settings["iters"], tol=settings["tol"],
                                 solver=settings["solver"], seed=settings["seed"], **sub)
    seconds["lambda_max"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    tr = hessian_trace(model, loss, inputs, targets, region=region, probes=settings["probes"],
                       tol=settings["trace_tol"], seed=settings["seed"], **sub)
    seconds["trace"] += time.perf_counter() - t0
    return {"lambda_max": json_float(eig.eigenvalue), "lambda_max_iterations": eig.iterations,
            "lambda_max_converged": eig.converged, "lambda_max_residual": json_float(eig.residual),
            "trace": json_float(tr.trace), "trace_std_error": json_float(tr.std_error),
            "trace_probes": tr.probes}


def _landscape_files(ls: Landscape, regions: list[str], out: Path | None, prefix: str,
                     plots: bool) -> dict[str, Any]:
    """The landscape's summary: files (and plots) under ``out``, or its data in memory."""
    land: dict[str, Any] = {"dim": ls.dim, "npz": None, "json": None, "plots": [],
                            "minimum": {r: to_json(ls.minimum(r)) for r in regions}}
    if out is None:
        land["data"] = ls.to_dict()
        return land
    land["npz"] = str(ls.save_npz(out / f"{prefix}_landscape.npz"))
    land["json"] = str(ls.save_json(out / f"{prefix}_landscape.json"))
    if plots:
        from balanced_sam.analysis.plots import save_landscape_plots

        written = save_landscape_plots(ls, out, f"{prefix}_landscape", regions)
        land["plots"] = [str(p) for p in written]
    return land


def _fmt(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{float(x):.{digits}g}"


def format_sharpness_table(
    results: Mapping[str, Mapping[str, Any]],
    regions: Sequence[str] | None = None,
    digits: int = 4,
    std_error: bool = True,
) -> str:
    r"""Markdown table like the paper's Table 8: one row per method, :math:`\lambda_{\max}` and
    :math:`\mathrm{Tr}(H)` (with ``± standard error``) per region.

    Args:
        results: method name -> the dict :func:`analyze_model` returned (only ``"regions"`` is
            read; a bare ``{region: {...}}`` mapping works too).
        regions: the column groups (default: every region seen, in order of appearance).
        digits: significant digits.
        std_error: append the trace's standard error.

    Missing or empty regions print ``n/a``; the header carries each region's sample count when
    all methods agree on it.
    """
    if not results:
        raise ValueError("results is empty")
    per: dict[str, Mapping[str, Any]] = {
        m: (r["regions"] if "regions" in r else r) for m, r in results.items()
    }
    if regions is None:
        regions = list(dict.fromkeys(reg for d in per.values() for reg in d))
    header = ["method"]
    for reg in regions:
        counts = {d.get(reg, {}).get("count") for d in per.values()}
        tag = f"{reg}, n={counts.pop()}" if len(counts) == 1 and None not in counts else reg
        header += [f"λ_max ({tag})", f"Tr(H) ({tag})"]
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    for method, d in per.items():
        row = [str(method)]
        for reg in regions:
            e = d.get(reg, {})
            row.append(_fmt(e.get("lambda_max"), digits))
            tr = _fmt(e.get("trace"), digits)
            se = e.get("trace_std_error")
            if std_error and tr != "n/a" and se is not None and math.isfinite(float(se)):
                tr += f" ± {float(se):.2g}"
            row.append(tr)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
