"""A bench's report: the paper-style table, the paired comparisons as text, ``results.csv``
rows, the plots, and ``bsam compare`` (:func:`compare_results`) over a finished
``results.json``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from balanced_sam import stats
from balanced_sam.bench.summary import (
    CONFIDENCE,
    DEFAULT_BASELINE,
    DIVERGE_FACTOR,
    finish_results,
)
from balanced_sam.data.registry import DataSplits
from balanced_sam.errors import spell
from balanced_sam.io import nan_for_null, read_json, write_json
from balanced_sam.metrics import format_table

__all__ = ["bench_table", "comparison_text", "compare_results", "csv_row", "draw_plots"]


def csv_row(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """One run as a ``results.csv`` row."""
    row = {"method": name, "rho": run["rho"], "seed": run["seed"],
           "best_epoch": run["best_epoch"], "train_seconds": round(run["train_seconds"], 2),
           "skipped_steps": run.get("skipped_steps"), "diverged": run.get("diverged", False),
           "stalled": run.get("stalled", False)}
    for split in ("val", "test"):
        for region, metrics in run[split].items():
            for m, v in metrics.items():
                row[f"{split}_{region}_{m}"] = v
    return row


def _digits(results: Mapping[str, Any]) -> int:
    scale = max((abs(r["test"]["all"]["mae"]) for m in results["methods"].values()
                 for r in m["runs"] if stats.is_finite(r["test"]["all"]["mae"])), default=1.0)
    return 0 if scale >= 100 else 2


def _method_notes(name: str, runs: list[dict[str, Any]], kept: list[dict[str, Any]],
                  epochs: Any) -> tuple[str, list[str]]:
    """The marks after a method's row label (†, ‡) and their footnotes."""
    marks, notes = "", []
    if len(kept) < len(runs):
        marks += " †"
        shown = (f"left out: {len(kept)} of {len(runs)} seeds shown" if kept else
                 f"every run of {name} diverged: no figures to show")
        notes.append(f"† {name}: " + "; ".join(
            f"seed {r['seed']} diverged ({r.get('diverged_reason', '?')})" for r in runs
            if r.get("diverged")) + f"; {shown}")
    stalled = [r for r in kept if r.get("stalled")]
    if stalled:
        marks += " ‡"
        notes.append(f"‡ {name}: " + "; ".join(
            f"seed {r['seed']} stopped improving at epoch {r['best_epoch']} of {epochs} "
            f"(test MAE {r['test']['all']['mae']:.4g})" for r in stalled)
            + "; kept in the mean: read its spread with that in mind")
    return marks, notes


def bench_table(results: dict[str, Any], digits: int | None = None) -> str:
    """The paper-style table (MAE and GM per region, bMAE) of a ``results.json`` dict: mean ±
    std over the seeds at each method's selected rho, diverged runs left out (marked † with a
    footnote). The spread is no test of a difference: the paired comparisons are."""
    reports, notes = {}, []
    epochs = results.get("config", {}).get("train", {}).get("epochs")
    for name, m in results["methods"].items():
        rho = m.get("selected_rho")
        runs = [r for r in m["runs"] if r["rho"] == rho]
        kept = [r for r in runs if not r.get("diverged")]
        marks, more = _method_notes(name, runs, kept, epochs)
        notes += more
        label = (name if rho is None else f"{name} (rho {rho:g})") + marks
        reports[label] = [nan_for_null(r["test"]) for r in kept] or [
            {region: {k: math.nan for k in (v if isinstance(v, dict) else {})}
             for region, v in runs[0]["test"].items()}]
    digits = _digits(results) if digits is None else digits
    unit = results.get("config", {}).get("target_unit", "")
    after = ("differences between methods: see the paired comparisons below"
             if results.get("comparisons") else
             "compare methods seed by seed (bsam compare RESULTS.json --baseline M), not by "
             "these spreads")
    head = (f"{results['dataset']} test set, mean ± std over seeds"
            + (f" (errors in {unit})" if unit else "") + f"; {after}")
    return "\n".join([head, format_table(reports, digits=digits), *notes])


def comparison_text(results: Mapping[str, Any], digits: int | None = None) -> str:
    """The paired comparisons of a ``results.json`` dict as text (see
    :func:`balanced_sam.stats.format_comparisons`)."""
    info = results.get("comparisons_info") or {}
    if not results.get("comparisons"):
        return "paired comparisons: none (no baseline among the methods, or a single method)"
    left = {m: {int(s): why for s, why in g.items()} for m, g in info.get("left_out", {}).items()}
    return stats.format_comparisons(
        results["comparisons"], info.get("baseline", DEFAULT_BASELINE),
        unit=results.get("config", {}).get("target_unit", ""),
        digits=_digits(results) if digits is None else digits,
        confidence=info.get("confidence", CONFIDENCE), left_out=left)


def compare_results(results: str | Path | dict[str, Any], *, baseline: str | None = None,
                    confidence: float | None = None, diverge_factor: float | None = None,
                    write: bool = False, plot: bool = False,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """``bsam compare``: the paired comparisons (and divergence flags, means) of a finished
    bench, recomputed from its runs; prints the table and the comparisons.

    ``results``: a ``results.json`` path or its dictionary (completed in place).
    ``baseline`` (default: the one it was compared with, else ``sqinv``) must be one of its
    methods; ``confidence`` and ``diverge_factor`` default to the stored ones. ``write``:
    rewrite ``results.json``; ``plot``: (re)draw ``paired_differences.png`` beside it (both
    need a path)."""
    path = None if isinstance(results, dict) else Path(results)
    if (write or plot) and path is None:
        raise ValueError("write / plot need the results.json path, not a dictionary")
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (a bench's results.json)")
        try:
            results = read_json(path)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not a bench's results.json: not UTF-8 text "
                             f"({exc.reason} at byte {exc.start})") from None
    results = _checked_results(results, str(path) if path is not None else "results")
    info = results.get("comparisons_info") or {}
    baseline = baseline or info.get("baseline") or DEFAULT_BASELINE
    if baseline not in results["methods"]:
        raise ValueError(f"the baseline {baseline!r} is not among the results' methods "
                         f"({', '.join(results['methods'])}); choose one with "
                         f"{spell('baseline', next(iter(results['methods'])))}")
    factor = diverge_factor or (results.get("divergence") or {}).get("factor", DIVERGE_FACTOR)
    # a folder's record of several benches may hold methods run on other seeds: those are
    # compared on the seeds they share; a single bench's methods must pair up
    record = bool((results.get("config") or {}).get("this_bench"))
    finish_results(results, baseline=baseline, factor=factor,
                   confidence=confidence or info.get("confidence") or CONFIDENCE,
                   unpaired="skip" if record else "error")
    log(bench_table(results))
    log("")
    log(comparison_text(results))
    if write and path is not None:
        write_json(results, path)
    if plot and path is not None and results["comparisons"]:
        _plot_paired(results, path.parent / "paired_differences.png", log)
    return results


def _checked_results(results: Any, where: str) -> dict[str, Any]:
    """``results`` when it has the shape of a bench's ``results.json`` (what :func:`compare_results`
    reads: methods, their runs, each run's seed, rho and val/test reports), else a one-line
    ``ValueError`` naming ``where`` and what is wrong."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{where} is not a bench's results.json: {what}")

    if not isinstance(results, dict):
        raise bad(f"expected a JSON object with 'methods', got a {type(results).__name__}")
    methods = results.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise bad("it has no methods (a 'methods' object naming each method's runs)")
    for key in ("config", "comparisons_info", "divergence"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            raise bad(f"'{key}' must be an object, got {results[key]!r:.60}")
    info = results.get("comparisons_info") or {}
    if info.get("confidence") is not None and not (
            isinstance(info["confidence"], float) and 0 < info["confidence"] < 1):
        raise bad(f"comparisons_info.confidence must be a number in (0, 1), got "
                  f"{info['confidence']!r:.60}")
    factor = (results.get("divergence") or {}).get("factor")
    if factor is not None and not (stats.is_finite(factor) and factor > 1):
        raise bad(f"divergence.factor must be a finite number > 1, got {factor!r:.60}")
    for name, entry in methods.items():
        runs = entry.get("runs") if isinstance(entry, dict) else None
        if not isinstance(runs, list) or not runs:
            raise bad(f"methods.{name} has no 'runs' list")
        for i, run in enumerate(runs):
            _check_run(run, f"methods.{name}.runs[{i}]", bad)
    return results


def _check_run(run: Any, at: str, bad: Callable[[str], ValueError]) -> None:
    if not isinstance(run, dict):
        raise bad(f"{at} must be an object, got {run!r:.60}")
    if isinstance(run.get("seed"), bool) or not isinstance(run.get("seed"), int):
        raise bad(f"{at}.seed must be an integer, got {run.get('seed')!r:.60}")
    if "rho" not in run or not (run["rho"] is None or stats.is_finite(run["rho"])):
        raise bad(f"{at}.rho must be a number or null, got {run.get('rho', 'nothing')!r:.60}")
    for split in ("test", "val"):
        report = run.get(split)
        if report is None and split == "val":
            continue
        if not isinstance(report, dict) or not isinstance(report.get("all"), dict):
            raise bad(f"{at}.{split} must be a report with an 'all' region, got "
                      f"{report!r:.60}")
        for region, metrics in report.items():
            if metrics is not None and not isinstance(metrics, dict):
                raise bad(f"{at}.{split}.{region} must be an object of metrics or null, got "
                          f"{metrics!r:.60}")
            for metric, v in (metrics or {}).items():
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise bad(f"{at}.{split}.{region}.{metric} must be a number or null, got "
                              f"{v!r:.60}")
        if "mae" not in report["all"]:
            raise bad(f"{at}.{split}.all has no 'mae'")


# ---------------------------------------------------------------------------- plots
def _plot_paired(results: Mapping[str, Any], path: Path, log: Callable[[str], None]) -> None:
    try:
        from balanced_sam import plots
    except ImportError as exc:  # matplotlib missing
        log(f"plot skipped: {exc}")
        return
    info = results["comparisons_info"]
    plots.plot_paired_differences(results["comparisons"], path, baseline=info["baseline"],
                                  unit=results.get("config", {}).get("target_unit", ""),
                                  confidence=info["confidence"])


def draw_plots(results: dict[str, Any], data: DataSplits, path: Callable[[str], Path],
               log: Callable[[str], None]) -> None:
    """The bench's PNGs: label histogram, per-bin MAE, rho sweep (several rho), paired
    differences (with a baseline); ``path(name)`` gives (and records) each file's path."""
    try:
        from balanced_sam import plots
    except ImportError as exc:  # matplotlib missing
        log(f"plots skipped: {exc}")
        return
    many, few = data.bins.thresholds()
    y_train, y_test = data.labels("train"), data.labels("test")
    if y_train is not None and y_test is not None:
        plots.plot_label_histogram(data.bins, y_train, y_test, path("label_histogram.png"),
                                   many=many, few=few, unit=data.unit)
    if any(r.get("test_per_bin") for m in results["methods"].values() for r in m["runs"]):
        plots.plot_per_bin_mae(results, data.bins, path("per_bin_mae.png"), many=many, few=few,
                               unit=data.unit)
    if len(results["config"]["rho"]) > 1:  # a sweep
        plots.plot_rho_sweep(results, path("rho_sweep.png"), unit=data.unit)
    if results["comparisons"]:
        _plot_paired(results, path("paired_differences.png"), log)
