"""The bench's summary rules, over the runs of a ``results.json``: which runs diverged (left
out), which stalled (marked, kept), the rho each method is shown at, and the paired comparisons
with the baseline (:mod:`balanced_sam.stats`)."""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

from balanced_sam import stats
from balanced_sam.io import nan_for_null
from balanced_sam.metrics import aggregate_reports

__all__ = ["finish_results", "flag_divergence", "flag_stalled", "summarise", "DEFAULT_BASELINE",
           "DIVERGE_FACTOR", "CONFIDENCE", "STALLED_RULE", "DIVERGENCE_RULE"]

#: the method every other one is compared with, when it is among the methods
DEFAULT_BASELINE = "sqinv"
#: a run whose test MAE exceeds this many times its method's median over seeds has diverged
DIVERGE_FACTOR = 3.0
#: of the paired intervals
CONFIDENCE = 0.95
STALLED_RULE = ("not diverged, but the best validation epoch came in the first third of the "
                "epochs: training went wrong early and did not recover; kept in the means and "
                "pairs, marked ‡")
DIVERGENCE_RULE = ("NaN/inf predictions during training, or NaN/inf validation or test MAE; or "
                   "optimizer steps skipped for a non-finite gradient (not counted under fp16 "
                   "AMP); or test MAE above factor x the median test MAE of the method's seeds "
                   "at the same rho")


def finish_results(results: dict[str, Any], *, baseline: str | None = None,
                   factor: float = DIVERGE_FACTOR, confidence: float = CONFIDENCE,
                   unpaired: str = "error") -> dict[str, Any]:
    """Complete a ``results.json`` dictionary whose methods hold their ``runs``: mark the
    diverged runs, summarise every method over the kept ones (mean ± std at the rho chosen on
    validation) and compare every method with ``baseline`` seed by seed. In place; returns
    ``results``. ``baseline=None``: no comparisons. ``unpaired="skip"``: a method that ran other
    seeds than the baseline (a folder's record of several benches) is compared on the seeds
    they share, and left out of the comparisons when they share none."""
    train = (results.get("config") or {}).get("train", {})
    diverged: dict[str, list[dict[str, Any]]] = {}
    for name, entry in results["methods"].items():
        runs = entry["runs"]
        for run in runs:
            run["val"], run["test"] = nan_for_null(run.get("val") or {}), nan_for_null(run["test"])
        flag_divergence(runs, factor, count_skips=train.get("amp", "none") != "fp16")
        flag_stalled(runs, train.get("epochs"))
        entry.update(summarise(runs))
        gone = [{"seed": r["seed"], "rho": r["rho"], "reason": r["diverged_reason"]}
                for r in runs if r["diverged"]]
        if gone:
            diverged[name] = gone
    stalled = {name: [r["seed"] for r in entry["runs"] if r.get("stalled")]
               for name, entry in results["methods"].items()}
    results["divergence"] = {"factor": factor, "rule": DIVERGENCE_RULE, "diverged": diverged,
                             "stalled": {m: s for m, s in stalled.items() if s},
                             "stalled_rule": STALLED_RULE}
    info: dict[str, Any] = {"baseline": baseline, "confidence": confidence, "split": "test",
                            "difference": "method - baseline per paired seed (negative: lower "
                                          "error than the baseline)", "left_out": {}}
    comparisons: dict[str, Any] = {}
    if baseline is not None and len(results["methods"]) > 1:
        comparisons = _compare(results, baseline, confidence, unpaired)
        info["left_out"] = {m: {str(s): why for s, why in gone.items()}
                            for m, gone in stats.left_out_seeds(results, baseline).items()}
    results["comparisons"], results["comparisons_info"] = comparisons, info
    return results


def _compare(results: dict[str, Any], baseline: str, confidence: float, unpaired: str
             ) -> dict[str, Any]:
    if unpaired != "skip":
        return stats.paired_comparisons(results, baseline, confidence=confidence)
    out: dict[str, Any] = {}
    for name in results["methods"]:
        if name == baseline:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out.update(stats.paired_comparisons(results, baseline, methods=[name],
                                                    confidence=confidence, unpaired="skip"))
        except stats.UnpairedRunsError:
            continue  # no seed in common with the baseline: nothing to pair
    return out


def _by_rho(runs: list[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["rho"], []).append(run)
    return groups


def flag_divergence(runs: list[dict[str, Any]], factor: float, count_skips: bool) -> None:
    """Set ``diverged`` (and ``diverged_reason``) on every run: see :data:`DIVERGENCE_RULE`."""
    for group in _by_rho(runs).values():
        maes = [r["test"]["all"]["mae"] for r in group if stats.is_finite(r["test"]["all"]["mae"])]
        median = statistics.median(maes) if maes else math.nan
        for run in group:
            why = []
            mae, val = run["test"]["all"]["mae"], run["val"].get("all", {}).get("mae", 0.0)
            if not (stats.is_finite(mae) and stats.is_finite(val)):
                why.append(run.get("failure") or "NaN/inf metrics")
            elif median > 0 and mae > factor * median:
                why.append(f"test MAE {mae:.4g} > {factor:g} x the median {median:.4g} of its "
                           "seeds")
            skipped = int(run.get("skipped_steps") or 0)
            if count_skips and skipped:
                why.append(f"{skipped} step(s) skipped for a non-finite gradient")
            run["diverged"] = bool(why)
            if why:
                run["diverged_reason"] = "; ".join(why)
            else:
                run.pop("diverged_reason", None)


def flag_stalled(runs: list[dict[str, Any]], epochs: Any) -> None:
    """Set ``stalled`` on every run: not diverged, but its best validation epoch came in the
    first third of training (see :data:`STALLED_RULE`). A warning only: the run stays in."""
    for run in runs:
        best = run.get("best_epoch")
        run["stalled"] = bool(isinstance(epochs, int) and isinstance(best, int)
                              and not run.get("diverged") and best <= epochs // 3)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std per rho over the kept runs; the rho with the lowest mean validation MAE."""
    by_rho: dict[str, Any] = {}
    groups = _by_rho(runs)
    best_key, best_val = next(iter(groups)), math.inf
    for r, rs in groups.items():
        kept = [x for x in rs if not x["diverged"]]
        mean, std = aggregate_reports([x["test"] for x in kept]) if kept else (None, None)
        vals = [x["val"].get("all", {}).get("mae", math.nan) for x in kept]
        val_mae = statistics.fmean(vals) if vals else math.nan
        by_rho[str(r)] = {"mean": mean, "std": std, "val_mae": val_mae, "n": len(kept),
                          "diverged": len(rs) - len(kept)}
        if val_mae < best_val:
            best_key, best_val = r, val_mae
    sel = by_rho[str(best_key)]
    return {"runs": runs, "mean": sel["mean"], "std": sel["std"], "selected_rho": best_key,
            "by_rho": by_rho}
