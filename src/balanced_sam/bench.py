"""``bsam bench``: methods x seeds (x rho) on a registered dataset or a CSV table -> results,
table, paired comparisons, plots.

:func:`run_bench` loads the data once through the registry
(:func:`balanced_sam.data.registry.load_data`: splits, training-label bins, target scaling,
fingerprint) and trains every (method, rho, seed) with :func:`balanced_sam.train.fit`, in this
process (``jobs=1``) or in ``jobs`` worker processes (:mod:`balanced_sam.parallel`). Every run is
pinned to ``threads`` CPU threads (default 1) and its initial weights are built from its seed
alone (the same for every method of a seed), so a run's figures are bit-identical whatever
``jobs`` is and in whatever order the runs are scheduled. It writes into ``out``:

* ``results.json`` (schema below), ``results.csv`` (one row per run);
* ``label_histogram.png``, ``per_bin_mae.png``, ``paired_differences.png`` (each method minus
  the baseline, seed by seed, with its interval) and, for several rho values, ``rho_sweep.png``;
* ``runs/<method>[-rho<r>]-seed<s>/``: each run's ``best.pt``, ``log.csv`` and ``result.json``.

A bench that dies (or is stopped with Ctrl-C) can be run again with the same ``out``: finished
runs are read back from their ``result.json`` and an interrupted one resumes from its
``last.pt``, as long as the data have the same fingerprint; a run on data that changed since is
trained again.

**Diverged runs.** A run is marked ``diverged`` when its validation or test MAE is NaN/inf, when
the optimizer skipped steps for a non-finite gradient (``skipped_steps``; not counted under fp16
AMP, whose loss scaler skips steps by design), or when its test MAE exceeds ``diverge_factor``
(default 3) times the median test MAE of its method's seeds at the same rho (so it needs 3+
seeds to fire). A diverged run stays in ``runs`` with the reason, and is left out of the mean ±
std, of the choice of rho and of every paired comparison it belongs to (``n`` then counts the
pairs kept).

**Paired comparisons.** Every method is compared with ``baseline`` (default ``sqinv`` when it is
among the methods) seed by seed: the mean of the per-seed differences, a Student-t interval
(95% by default) and wins k of n, for MAE All / Many / Med. / Few, GM All and bMAE
(:func:`balanced_sam.stats.paired_comparisons`). Runs that share a seed share split, initial
weights and batch order, so this is how methods are told apart; the table's mean ± std is each
method's spread, not a test of a difference. :func:`compare_results` (``bsam compare``) redoes
the flags and the comparisons of a finished ``results.json``.

``results.json``::

    {"dataset": str, "config": {...}, "split": {"train": n, "val": n, "test": n, "bins": K,
     "regions": {"many": k, "medium": k, "few": k}, ...}, "bins": LabelBins.to_dict(),
     "fingerprint": {"digest", "files", "params"}, "warnings": [str],
     "methods": {NAME: {"runs": [{"seed", "rho", "best_epoch", "train_seconds",
                                  "skipped_steps", "val", "test", "test_per_bin",
                                  "data_fingerprint", "diverged", "diverged_reason"?,
                                  "stalled"}],
                        "mean": REPORT | null, "std": REPORT | null, "selected_rho": r,
                        "by_rho": {str(r): {"mean", "std", "val_mae", "n", "diverged"}}}},
     "divergence": {"factor": k, "rule": str, "diverged": {NAME: [{"seed", "rho", "reason"}]},
                    "stalled": {NAME: [seed]}, "stalled_rule": str},
     "comparisons": {NAME: {"mae_all": {"mean", "ci_low", "ci_high", "wins", "n"},
                            "mae_many", "mae_medium", "mae_few", "gm_all", "bmae_all"}},
     "comparisons_info": {"baseline": str | null, "confidence": 0.95, "split": "test",
                          "difference": str, "left_out": {NAME: {seed: why}}},
     "parallel": {"jobs", "threads_per_run", "start_method"}, "total_seconds": s}

``REPORT = {region: {metric: value}}`` (regions all/many/medium/few; metrics mae, mse, rmse, gm,
bmae, count); ``mean``/``std`` are over the kept (not diverged) seeds at ``selected_rho``, the
rho with the lowest mean validation MAE over its kept runs (for methods without rho, over all
runs). Empty regions are ``null``. ``config.train.balance`` says what bMAE averages over
(``label`` or ``bin``). ``comparisons`` is empty when there is no baseline among the methods.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from balanced_sam import parallel, stats
from balanced_sam.config import TrainConfig
from balanced_sam.data.base import BenchData
from balanced_sam.data.registry import DataSplits, default_bench_dataset, get_entry, load_data
from balanced_sam.errors import spell
from balanced_sam.experiment import train_config
from balanced_sam.io import FolderLock, nan_for_null, read_json, to_json, write_csv, write_json
from balanced_sam.methods import DEFAULT_METHODS, get_method, rho_for
from balanced_sam.metrics import aggregate_reports, format_table
from balanced_sam.train import (
    RunExistsError,
    fit,
    load_checkpoint,
    resolve_device,
    seed_everything,
)

__all__ = ["run_bench", "compare_results", "finish_results", "bench_defaults",
           "load_bench_data", "bench_data_spec", "bench_table", "comparison_text", "QUICK",
           "DEFAULT_BASELINE", "DIVERGE_FACTOR", "CONFIDENCE", "STALLED_RULE", "BenchInterrupted"]

#: what ``--quick`` changes unless the dataset's recipe says otherwise (``Recipe.bench["quick"]``)
QUICK = {"seeds": (0,), "epochs": 12}
#: seeds when neither the call nor the dataset's recipe names them
DEFAULT_SEEDS = 5
#: the method every other one is compared with, when it is among the methods
DEFAULT_BASELINE = "sqinv"
#: a run whose test MAE exceeds this many times its method's median over seeds has diverged
DIVERGE_FACTOR = 3.0
#: of the paired intervals
CONFIDENCE = 0.95
STALLED_RULE = ("not diverged, but the best validation epoch came in the first third of the "
                "epochs: training went wrong early and did not recover; kept in the means and "
                "pairs, marked ‡")
DIVERGENCE_RULE = ("NaN/inf validation or test MAE; or optimizer steps skipped for a non-finite "
                   "gradient (not counted under fp16 AMP); or test MAE above factor x the "
                   "median test MAE of the method's seeds at the same rho")


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the bench; the message says how to resume it."""


def bench_data_spec(dataset: str | None = None, *, csv_path: str | None = None,
                    target: str | None = None, bin_width: float | None = None,
                    train_fraction: float | None = None, cap: int | None = None,
                    data_root: str | None = None, split_seed: int = 0, dropna: bool = False,
                    **table_options: Any) -> dict[str, Any]:
    """The ``data`` section (see :func:`balanced_sam.data.registry.load_data`) that the bench's
    options describe: a registered dataset by name (``None``: the registry's default bench
    dataset, :data:`balanced_sam.data.registry.DEFAULT_BENCH_DATASET`), or a CSV table with its
    target column."""
    opts = {k: v for k, v in (("bin_width", bin_width), ("train_fraction", train_fraction),
                              ("cap", cap)) if v is not None}
    if csv_path is not None:
        if target is None:
            raise ValueError(f"a CSV table needs its target column ({spell('target', 'COL')})")
        table = {k: v for k, v in table_options.items() if v is not None}
        return {"name": "csv", "path": str(Path(csv_path).resolve()), "target": target,
                "dropna": dropna, **opts, **table, "split_seed": split_seed}
    if target is not None or table_options.get("features") is not None:
        raise ValueError(f"{spell('target', 'COL')} and the table options are only used with a "
                         f"CSV table ({spell('csv_path', 'FILE')})")
    spec: dict[str, Any] = {"name": dataset or default_bench_dataset(), **opts}
    if data_root is not None:
        spec["root" if _reads_root(spec["name"]) else "data_root"] = str(Path(data_root).resolve())
    if split_seed:
        spec["split_seed"] = split_seed
    return spec


def _reads_root(name: str) -> bool:
    return get_entry(name).needs_root


def load_bench_data(dataset: str | None = None, **options: Any) -> BenchData:
    """The benchmark's tensors: a registered table-like dataset by name, or any CSV table with
    a target (the options of :func:`bench_data_spec`)."""
    data = load_data(bench_data_spec(dataset, **options))
    if data.tables is None:
        raise ValueError(f"{data.name} is not a table of tensors; use load_data for it")
    return data.tables




def bench_defaults(dataset: str | None = None, csv_path: str | None = None,
                   quick: bool = False) -> dict[str, Any]:
    """What :func:`run_bench` runs on a dataset when not told: ``methods``, ``seeds``,
    ``epochs`` (``None``: the recipe's) and ``data`` options, from the dataset's
    ``Recipe.bench`` (``--quick``: its ``quick`` entry over :data:`QUICK`), else the bench's
    own (:data:`balanced_sam.methods.DEFAULT_METHODS`, :data:`DEFAULT_SEEDS` seeds)."""
    name = "csv" if csv_path is not None else (dataset or default_bench_dataset())
    bench = dict(get_entry(name).recipe.bench)
    out: dict[str, Any] = {"methods": tuple(bench.get("methods", DEFAULT_METHODS)),
                           "seeds": bench.get("seeds", DEFAULT_SEEDS), "epochs": None,
                           "data": {}}
    if quick:
        q = {**QUICK, **dict(bench.get("quick", {}))}
        out.update({k: q[k] for k in ("methods", "seeds", "epochs", "data") if k in q})
    seeds = out["seeds"]
    out["seeds"] = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    out["data"] = dict(out["data"])
    return out


@dataclass
class _Plan:
    """A validated bench: the data, the base config, the runs, how they run and where they go."""

    data: DataSplits
    spec: dict[str, Any]
    cfg: TrainConfig
    methods: list[str]
    seeds: list[int]
    sweep: list[float]
    rho_by_method: dict[str, float]
    out: Path
    quick: bool
    baseline: str | None = None
    jobs: int = 1
    threads: int = 1
    device: str = "auto"
    status: bool = True
    jobs_used: int = 1  # at most jobs: no more workers than runs to train
    rho_given: bool = False  # rho came from the call, not from the recipe

    def rhos(self, method: str) -> list[float | None]:
        if not get_method(method).uses_rho:
            return [None]
        return [self.rho_by_method[method]] if method in self.rho_by_method else list(self.sweep)

    @property
    def digest(self) -> str:
        return self.data.fingerprint["digest"]


def run_bench(
    dataset: str | None = None,
    *,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    epochs: int | None = None,
    rho: float | Sequence[float] | None = None,
    bin_width: float | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    csv_path: str | None = None,
    target: str | None = None,
    train_fraction: float | None = None,
    cap: int | None = None,
    data_root: str | None = None,
    dropna: bool = False,
    select_by: str = "mae",
    quick: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
    plots: bool = True,
    log: Callable[[str], None] = print,
    baseline: str | None = None,
    jobs: int | None = 1,
    threads: int = 1,
    diverge_factor: float = DIVERGE_FACTOR,
    confidence: float = CONFIDENCE,
    status: bool = True,
    data: Mapping[str, Any] | None = None,
    **table_options: Any,
) -> dict[str, Any]:
    """Run the benchmark and write its files; returns the ``results.json`` dictionary.

    ``dataset``: a registered name (``None``: the registry's default bench dataset) unless
    ``csv_path`` names a table; ``methods`` / ``seeds`` default to the dataset recipe's bench
    choice. ``baseline``: the method the others are compared with seed by seed (default
    ``sqinv`` when among the methods; a named baseline must be one of them). ``jobs``: runs
    trained at once in worker processes (``None``: what the machine offers,
    :func:`balanced_sam.parallel.default_jobs`; 1: in this process), each on ``threads`` CPU
    threads (the figures do not depend on ``jobs``). ``diverge_factor``: see the module
    docstring. ``status``: the one progress line on stderr; ``progress``: a bar per epoch (only
    when the runs train in this process). ``overrides``: ``TrainConfig`` fields (e.g.
    ``{"max_grad_norm": 1.0, "interval": 5}``). ``table_options`` go to a CSV table's loader
    (``impute``, ``features``, ``categorical``, ``max_categories``). ``data``: a ``data``
    section as in a config (``{"name": "images", "path": ..., "target": ...}``) instead of
    ``dataset`` / ``csv_path`` and their options."""
    t_start = time.perf_counter()
    resolve_device(device)  # a bad device fails before any data is read
    plan = _make_plan(dict(locals()))
    with FolderLock(plan.out, name=".bench.lock", what="bench"):
        results = _header(plan, log)
        done = _run_all(plan, log)
        results["methods"] = {name: {"runs": [done[_run_name(name, r, s)]
                                              for r in plan.rhos(name) for s in plan.seeds]}
                              for name in plan.methods}
        finish_results(results, baseline=plan.baseline, factor=diverge_factor,
                       confidence=confidence)
        results["parallel"] = {"jobs": plan.jobs_used, "threads_per_run": plan.threads,
                               "start_method": "spawn" if plan.jobs_used > 1 else "in-process"}
        results["total_seconds"] = time.perf_counter() - t_start
        write_json(results, plan.out / "results.json")
        write_csv([_csv_row(name, run) for name, m in results["methods"].items()
                   for run in m["runs"]], plan.out / "results.csv")
    if plots:
        _plots(results, plan, log)
    log("")
    log(bench_table(results))
    log("")
    log(comparison_text(results))
    log(f"\nwrote {plan.out}/results.json, results.csv and plots "
        f"({results['total_seconds']:.0f}s in all)")
    return results


def _make_plan(a: dict[str, Any]) -> _Plan:
    """Check the bench's arguments (``run_bench``'s locals), load the data, build the plan."""
    section = a["data"]
    defaults = bench_defaults(a["dataset"] if section is None else section["name"],
                              a["csv_path"], a["quick"])
    methods = list(a["methods"]) if a["methods"] is not None else list(defaults["methods"])
    seeds = _checked_runs(methods, a["seeds"] if a["seeds"] is not None else defaults["seeds"])
    epochs = a["epochs"] if a["epochs"] is not None else defaults["epochs"]
    baseline = _checked_baseline(a["baseline"], methods)
    threads, factor, confidence = a["threads"], a["diverge_factor"], a["confidence"]
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if not (isinstance(factor, (int, float)) and factor > 1 and math.isfinite(factor)):
        raise ValueError(f"diverge_factor must be a finite number > 1, got {factor!r}")
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise ValueError(f"confidence must be a number strictly between 0 and 1, got "
                         f"{confidence!r}")
    jobs = _checked_jobs(a["jobs"], a["device"], threads)
    rhos = _checked_rhos(a["rho"])
    spec = dict(section) if section is not None else bench_data_spec(
        a["dataset"], csv_path=a["csv_path"], target=a["target"], bin_width=a["bin_width"],
        train_fraction=a["train_fraction"], cap=a["cap"], data_root=a["data_root"],
        dropna=a["dropna"], **a["table_options"])
    spec = {**defaults["data"], **spec}  # --quick's smaller variant, unless told otherwise
    data = load_data(spec)
    cfg = train_config(data, {"device": a["device"], "select_by": a["select_by"],
                              "progress": a["progress"],
                              **({"epochs": int(epochs)} if epochs is not None else {}),
                              **(a["overrides"] or {})})
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a["out"]) if a["out"] is not None else Path("runs") / f"bench-{stamp}"
    return _Plan(data, spec, cfg, methods, seeds, rhos or [cfg.rho],
                 {} if rhos else _recipe_rhos(data, methods), out, a["quick"], baseline,
                 jobs, threads, a["device"], a["status"], rho_given=bool(rhos))


def _recipe_rhos(data: DataSplits, methods: Sequence[str]) -> dict[str, float]:
    """The recipe's rho of each method (an interval variant, ``bsam-i5``, takes its base's; a
    composed one, ``ranksim+bsam``, its optimizer part's)."""
    chosen = data.recipe.rho_by_method
    rhos = {m: rho_for(m, chosen) for m in methods}
    return {m: r for m, r in rhos.items() if r is not None}


def _checked_runs(methods: Sequence[str], seeds: Sequence[int]) -> list[int]:
    if not methods:
        raise ValueError("methods is empty: name at least one method")
    for m in methods:
        get_method(m)
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods names a method twice: {list(methods)}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"seeds repeats seed(s) {repeated}: each seed is one run, and a "
                         "repeated one would count the same run twice")
    return seeds


def _checked_baseline(baseline: str | None, methods: Sequence[str]) -> str | None:
    """The baseline of the paired comparisons: a named one must be among the methods (it is
    not run implicitly: say so in ``methods``); by default ``sqinv`` when it is there."""
    if baseline is None:
        return DEFAULT_BASELINE if DEFAULT_BASELINE in methods and len(methods) > 1 else None
    get_method(baseline)
    if baseline not in methods:
        raise ValueError(f"the baseline {baseline!r} is not among the methods "
                         f"({', '.join(methods)}): add it to {spell('methods', list(methods))} "
                         f"or compare with one of them ({spell('baseline', methods[0])})")
    return baseline


def _checked_jobs(jobs: int | None, device: str, threads: int) -> int:
    if jobs is None:
        return parallel.default_jobs(device, threads)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1 (or None: what the machine offers), "
                         f"got {jobs!r}")
    return jobs


def _checked_rhos(rho: float | Sequence[float] | None) -> list[float] | None:
    if rho is None:
        return None
    rhos = [float(rho)] if isinstance(rho, (int, float)) else [float(r) for r in rho]
    for r in rhos:
        if not (math.isfinite(r) and r >= 0):
            raise ValueError(f"rho values must be finite numbers >= 0, got {r}")
    return rhos


def _size(split: Any) -> int:
    if split is None:
        return 0
    return len(split[1]) if isinstance(split, (tuple, list)) else len(split)


def _bin_warnings(data: DataSplits) -> list[str]:
    """What makes the bins useless for balancing: one bin, mostly empty bins, outliers."""
    bins, out = data.bins, []
    k = bins.num_bins
    empty = int((bins.counts == 0).sum())
    hint = f"set the bin width yourself ({spell('bin_width', 1.0)})"
    if k == 1:
        out.append(f"a single label bin: every sample gets the same weight and region, so no "
                   f"method can balance anything; {hint}")
    elif empty > k / 2:
        out.append(f"{empty} of {k} label bins hold no training sample: the bins are too narrow "
                   f"for the data, or outliers stretch the range; {hint}")
    outside = int(data.info.get("outside_bins", 0))
    if outside:
        out.append(f"{outside} target(s) lie beyond the default bins (outliers past the 0.5% / "
                   "99.5% quantiles) and are counted in the first or last bin")
    return out


def _header(plan: _Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Check the folder holds this bench (or none), say what runs, start results.json."""
    data, cfg = plan.data, plan.cfg
    config = {"dataset": data.name, "methods": plan.methods, "seeds": plan.seeds,
              "rho": plan.sweep, "rho_by_method": {m: plan.rhos(m)[0] for m in plan.methods
                                                   if get_method(m).uses_rho},
              "train": cfg.to_dict(), "quick": plan.quick, "data": data.info,
              "bins": data.tables.bins if data.tables is not None else data.bins.to_dict(),
              "target_unit": data.unit, "standardize_target": not data.scaler.is_identity,
              "model": _model_text(plan)}
    _same_bench(plan, config)
    many, few = data.bins.thresholds()
    regions = data.bins.region_counts(many, few)
    split = {**{s: _size(getattr(data, s)) for s in ("train", "val", "test")},
             "bins": data.bins.num_bins, "regions": regions}
    split.update({k: data.info[k] for k in ("C", "cap", "train_fraction") if k in data.info})
    log(f"dataset {data.name}: train {split['train']}, val {split['val']}, test {split['test']}; "
        f"{data.bins.num_bins} bins ({regions['many']} many / {regions['medium']} medium / "
        f"{regions['few']} few with training samples)")
    warnings = _bin_warnings(data)
    for w in warnings:
        log(f"warning: {w}")
    if data.info.get("train_fraction") not in (None, 1, 1.0):
        log(f"training keeps {data.info['train_fraction']:.0%} of the rows left after the "
            "validation/test split, so that the tail has few-shot bins")
    log(f"recipe: {cfg.optimizer} lr {cfg.lr} wd {cfg.weight_decay}, batch {cfg.batch_size}, "
        f"{cfg.epochs} epochs, {cfg.schedule} schedule, rho {_rho_text(plan)}; seeds "
        f"{plan.seeds}; best epoch by val {cfg.select_by}; bMAE by {cfg.balance}"
        + (f" [--quick: {len(plan.seeds)} seed(s), {cfg.epochs} epochs]" if plan.quick else ""))
    sweep = data.recipe.bench.get("rho_sweep")
    if sweep and not data.recipe.rho_by_method and not plan.rho_given and any(
            get_method(m).uses_rho for m in plan.methods):
        log(f"note: no rho was tuned for this data: the SAM-family methods run at rho "
            f"{cfg.rho:g}, a starting point; sweep it, e.g. --rho "
            f"{','.join(f'{r:g}' for r in sweep)}, and choose by validation MAE")
    if plan.baseline is None and len(plan.methods) > 1:
        log(f"no paired comparisons: the default baseline {DEFAULT_BASELINE} is not among the "
            f"methods; name one of them with {spell('baseline', plan.methods[0])}")
    return {"dataset": data.name, "config": config, "split": split,
            "bins": data.bins.to_dict(), "fingerprint": data.fingerprint, "warnings": warnings,
            "methods": {}}


#: what may differ between benches that share a folder: its runs are kept per method, rho and
#: seed, so a bench may add methods or seeds to a finished one and reads the common runs back
_MAY_GROW = ("methods", "seeds", "rho_by_method")


def _same_bench(plan: _Plan, config: dict[str, Any]) -> None:
    """A folder holds one bench setting (data, recipe, bins, model): refuse another one. Methods
    and seeds may be added (a method present in both must keep its rho); the data's content is
    not part of the setting (runs on changed data are trained again instead)."""
    comparable = {k: v for k, v in config.items() if k not in ("train", "data")} | {
        "data_spec": plan.spec,
        "train": {k: v for k, v in plan.cfg.to_dict().items() if k not in ("progress", "device")}}
    path = plan.out / "bench_config.json"
    if path.exists():
        stored = _with_new_defaults(read_json(path))
        now = json.loads(json.dumps(to_json(comparable)))
        setting = {k: v for k, v in now.items() if k not in _MAY_GROW}
        old_rho, new_rho = stored.get("rho_by_method") or {}, now.get("rho_by_method") or {}
        if {k: v for k, v in stored.items() if k not in _MAY_GROW} != setting or any(
                old_rho[m] != new_rho[m] for m in set(old_rho) & set(new_rho)):
            raise RunExistsError(f"{plan.out} holds a bench with another configuration (data, "
                                 "recipe, bins, model or a method's rho; methods and seeds may "
                                 "be added); choose another output folder (or delete it "
                                 "yourself)")
    write_json(comparable, path)


def _with_new_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A bench folder written before a training option existed ran with its default."""
    train = stored.get("train")
    if isinstance(train, dict):
        new = {f.name: f.default for f in fields(TrainConfig) if f.name not in train
               and f.name not in ("progress", "device") and f.default is not MISSING}
        stored["train"] = {**train, **to_json(new)}
    return stored


def _model_text(plan: _Plan) -> str:
    spec = dict(plan.data.recipe.model)
    if plan.data.tables is not None and plan.data.tables.make_model is not None:
        return type(plan.data.tables.make_model()).__name__
    name = spec.pop("name", "?")
    return f"{name}({', '.join(f'{k}={v}' for k, v in spec.items())})"


def _rho_text(plan: _Plan) -> str:
    shown = {m: plan.rho_by_method[m] for m in plan.methods if m in plan.rho_by_method}
    if shown:
        return (", ".join(f"{m} {r:g}" for m, r in shown.items())
                + f" (the recipe's: {plan.data.recipe.source or 'per method'})")
    return ", ".join(f"{r:g}" for r in plan.sweep)


def _run_name(method: str, rho: float | None, seed: int) -> str:
    return f"{method}{'' if rho is None else f'-rho{rho:g}'}-seed{seed}"




# ---------------------------------------------------------------------------- the runs
@dataclass
class _Context:
    """What every run of a bench shares; sent once to each worker process (tensors through
    shared memory)."""

    train: Any
    val: Any
    test: Any
    bins: Any
    scaler: Any
    dense: bool
    name: str
    fingerprint: dict[str, Any]
    spec: dict[str, Any]
    cfg: TrainConfig
    out: str


@dataclass
class _Task:
    """One run to train: its place, and its initial weights (a module in this process, its
    ``torch.save`` bytes for a worker)."""

    label: str
    method: str
    rho: float | None
    seed: int
    fresh: bool
    model: nn.Module | bytes


def _read_back(plan: _Plan, label: str, log: Callable[[str], None]) -> dict[str, Any] | bool:
    """A finished run on the same data, read back; else whether the run starts afresh
    (``True``: its folder holds a run on other data) or may resume from ``last.pt``."""
    run_dir = plan.out / "runs" / label
    res_path = run_dir / "result.json"
    if res_path.exists():
        run = read_json(res_path)
        if run.get("data_fingerprint") == plan.digest:
            run["val"], run["test"] = nan_for_null(run["val"]), nan_for_null(run["test"])
            log(f"{label}: done earlier, read back")
            return dict(run)
        log(f"{label}: the data changed since this run was trained (other fingerprint): "
            "training it again")
        return True
    if (run_dir / "last.pt").exists():
        return load_checkpoint(run_dir / "last.pt").get("data_fingerprint") != plan.digest
    return False


def _task(plan: _Plan, label: str, fresh: bool, *, portable: bool) -> _Task:
    """The run's task with its initial weights, built from its seed alone (the same for every
    method of a seed, whatever ran before); ``portable``: as bytes for a worker process."""
    name, rho, seed = _parse_name(plan, label)
    seed_everything(seed)
    model: nn.Module | bytes = plan.data.make_model()
    if portable:
        buf = io.BytesIO()
        torch.save(model, buf)
        model = buf.getvalue()
    return _Task(label, name, rho, seed, fresh, model)


def _parse_name(plan: _Plan, label: str) -> tuple[str, float | None, int]:
    for name in plan.methods:
        for r in plan.rhos(name):
            for s in plan.seeds:
                if _run_name(name, r, s) == label:
                    return name, r, s
    raise KeyError(label)


def _train_task(ctx: _Context, task: _Task, device: str | None) -> dict[str, Any]:
    """Train one run (here or in a worker process) and write its ``result.json``."""
    cfg = replace(ctx.cfg, method=task.method, seed=task.seed,
                  rho=task.rho if task.rho is not None else ctx.cfg.rho,
                  **({"device": device} if device is not None else {}))
    model = task.model if isinstance(task.model, nn.Module) else torch.load(
        io.BytesIO(task.model), weights_only=False)
    run_dir = Path(ctx.out) / "runs" / task.label
    res = fit(model, ctx.train, ctx.val, ctx.bins, cfg, test_data=ctx.test, out_dir=run_dir,
              resume=not task.fresh, overwrite=task.fresh, target_scaler=ctx.scaler,
              depth=ctx.dense,
              meta={"dataset": ctx.name, "bench_out": ctx.out,
                    "spec": {"data": ctx.spec, "train": cfg.to_dict()}, "data": ctx.fingerprint},
              data_fingerprint=ctx.fingerprint["digest"], log=lambda s: None)
    run = {"seed": task.seed, "rho": task.rho, "best_epoch": res.best_epoch,
           "train_seconds": res.train_seconds, "skipped_steps": res.skipped_steps,
           "val": res.val, "test": res.test, "test_per_bin": res.test_per_bin,
           "data_fingerprint": ctx.fingerprint["digest"]}
    write_json(run, run_dir / "result.json")
    (run_dir / "last.pt").unlink(missing_ok=True)  # finished: best.pt suffices
    return run


def _run_all(plan: _Plan, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Every run of the plan by label: read back, or trained here or in worker processes."""
    done: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, bool]] = []
    for name in plan.methods:
        for r in plan.rhos(name):
            for s in plan.seeds:
                label = _run_name(name, r, s)
                got = _read_back(plan, label, log)
                if isinstance(got, dict):
                    done[label] = got
                else:
                    todo.append((label, got))
    jobs = plan.jobs_used = max(1, min(plan.jobs, len(todo)))
    if plan.cfg.progress and jobs > 1:
        log("(a progress bar per epoch needs the runs in one process, jobs=1; the bench's "
            "own line counts the runs)")
    d = plan.data
    ctx = _Context(d.train, d.val, d.test, d.bins, d.scaler, d.dense, d.name, d.fingerprint,
                   plan.spec, replace(plan.cfg, progress=plan.cfg.progress and jobs <= 1),
                   str(plan.out))
    status = _Status([_parse_name(plan, k)[0] for k, _ in todo], len(done), jobs, plan, log)

    def finished(label: str, run: dict[str, Any], seconds: float) -> None:
        done[label] = run
        status.finished(label, _parse_name(plan, label)[0], run, seconds)

    try:
        if jobs <= 1:
            with parallel.pinned_threads(plan.threads):
                for label, fresh in todo:
                    status.started(label)
                    t0 = time.perf_counter()
                    run = _train_task(ctx, _task(plan, label, fresh, portable=False), None)
                    finished(label, run, time.perf_counter() - t0)
        else:
            def handed_out(label: str, fresh: bool) -> _Task:
                status.started(label)
                return _task(plan, label, fresh, portable=True)

            parallel.run_tasks(_train_task, ctx, todo, jobs=jobs, threads=plan.threads,
                               devices=_worker_devices(plan.device), prepare=handed_out,
                               on_done=finished)
    except KeyboardInterrupt:
        status.close()
        raise BenchInterrupted(
            f"bench interrupted: {len(done)} of {status.total} runs finished and kept in "
            f"{plan.out}. To resume, run the same bench again into that folder (bsam bench ... "
            f"--out {plan.out}): finished runs are read back and an interrupted one continues "
            "from its last.pt") from None
    status.close()
    return done


def _worker_devices(device: str) -> list[str | None] | None:
    """Spread the workers over the visible GPUs when the device names none in particular."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return None


def _method_of(label: str, methods: Mapping[str, Any]) -> str:
    """The method of a run label (``bsam-rho0.05-seed1`` -> ``bsam``)."""
    return max((m for m in methods if label.startswith(f"{m}-")), key=len, default=label)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class _Status:
    """The bench's one progress line on stderr: runs done / total, time left (each method's
    mean run time so far, spread over the workers), the run that finished last. Rewritten in
    place on a terminal, one line per finished run otherwise; ``plan.status`` False sends the
    finished runs to ``log`` instead."""

    def __init__(self, methods: list[str], read_back: int, jobs: int, plan: _Plan,
                 log: Callable[[str], None]) -> None:
        self.pending = Counter(methods)
        self.total, self.done, self.jobs = len(methods) + read_back, read_back, max(1, jobs)
        self.seconds: dict[str, list[float]] = {}
        self.running: dict[str, float] = {}  # label -> when it was handed out
        self.enabled, self.log, self.stream = plan.status, log, sys.stderr
        self.tty = self.enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.wrote = False
        if self.enabled and methods:
            self._write(f"bench: {self.done}/{self.total} runs done; {len(methods)} to train, "
                        f"{self.jobs} at a time, {plan.threads} CPU thread(s) each")

    def started(self, label: str) -> None:
        self.running[label] = time.perf_counter()

    def finished(self, label: str, method: str, run: dict[str, Any], seconds: float) -> None:
        self.done += 1
        self.pending[method] -= 1
        self.running.pop(label, None)
        self.seconds.setdefault(method, []).append(seconds)
        t = run["test"]["all"]["mae"]
        what = f"{label}: test MAE {t:.4g} (few {run['test']['few']['mae']:.4g}), best epoch " \
               f"{run['best_epoch']}, {seconds:.1f}s"
        if not self.enabled:
            self.log(what)
            return
        self._write(f"bench: {self.done}/{self.total} runs done, {self._left()} | {what}")

    def _left(self) -> str:
        remaining = sum(self.pending.values())
        if not remaining:
            return "all trained"
        every = statistics.fmean(x for v in self.seconds.values() for x in v)

        def cost(method: str) -> float:
            return statistics.fmean(self.seconds[method]) if method in self.seconds else every

        # the runs under way have done part of their work already
        now = time.perf_counter()
        work = sum(n * cost(m) for m, n in self.pending.items() if n > 0)
        work -= sum(min(now - t0, cost(_method_of(label, self.pending)))
                    for label, t0 in self.running.items())
        return f"about {_duration(max(0.0, work) / min(self.jobs, remaining))} left"

    def _write(self, line: str) -> None:
        self.stream.write(("\r\x1b[K" + line) if self.tty else line + "\n")
        self.stream.flush()
        self.wrote = True

    def close(self) -> None:
        if self.tty and self.wrote:
            self.stream.write("\n")
            self.stream.flush()
            self.tty = False


# ---------------------------------------------------------------------------- summaries
def finish_results(results: dict[str, Any], *, baseline: str | None = None,
                   factor: float = DIVERGE_FACTOR, confidence: float = CONFIDENCE
                   ) -> dict[str, Any]:
    """Complete a ``results.json`` dictionary whose methods hold their ``runs``: mark the
    diverged runs, summarise every method over the kept ones (mean ± std at the rho chosen on
    validation) and compare every method with ``baseline`` seed by seed. In place; returns
    ``results``. ``baseline=None``: no comparisons."""
    amp = (results.get("config") or {}).get("train", {}).get("amp", "none")
    diverged: dict[str, list[dict[str, Any]]] = {}
    for name, entry in results["methods"].items():
        runs = entry["runs"]
        for run in runs:
            run["val"], run["test"] = nan_for_null(run.get("val") or {}), nan_for_null(run["test"])
        _flag_divergence(runs, factor, count_skips=amp != "fp16")
        _flag_stalled(runs, (results.get("config") or {}).get("train", {}).get("epochs"))
        entry.update(_summarise(runs))
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
        comparisons = stats.paired_comparisons(results, baseline, confidence=confidence)
        info["left_out"] = {m: {str(s): why for s, why in gone.items()}
                            for m, gone in stats.left_out_seeds(results, baseline).items()}
    results["comparisons"], results["comparisons_info"] = comparisons, info
    return results


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _flag_divergence(runs: list[dict[str, Any]], factor: float, count_skips: bool) -> None:
    """Set ``diverged`` (and ``diverged_reason``) on every run; see the module docstring."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["rho"], []).append(run)
    for group in groups.values():
        maes = [r["test"]["all"]["mae"] for r in group if _finite(r["test"]["all"]["mae"])]
        median = statistics.median(maes) if maes else math.nan
        for run in group:
            why = []
            mae, val = run["test"]["all"]["mae"], run["val"].get("all", {}).get("mae", 0.0)
            if not (_finite(mae) and _finite(val)):
                why.append("NaN/inf metrics")
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


def _flag_stalled(runs: list[dict[str, Any]], epochs: Any) -> None:
    """Set ``stalled`` on every run: not diverged, but its best validation epoch came in the
    first third of training (see :data:`STALLED_RULE`). A warning only: the run stays in."""
    for run in runs:
        best = run.get("best_epoch")
        run["stalled"] = bool(isinstance(epochs, int) and isinstance(best, int)
                              and not run.get("diverged") and best <= epochs // 3)


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std per rho over the kept runs; the rho with the lowest mean validation MAE."""
    by_rho: dict[str, Any] = {}
    groups: dict[Any, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["rho"], []).append(run)
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
        results = read_json(path)
    assert isinstance(results, dict)
    if not isinstance(results.get("methods"), dict) or not results["methods"]:
        raise ValueError("not a bench results.json: it has no methods")
    info = results.get("comparisons_info") or {}
    baseline = baseline or info.get("baseline") or DEFAULT_BASELINE
    if baseline not in results["methods"]:
        raise ValueError(f"the baseline {baseline!r} is not among the results' methods "
                         f"({', '.join(results['methods'])}); choose one with "
                         f"{spell('baseline', next(iter(results['methods'])))}")
    factor = diverge_factor or (results.get("divergence") or {}).get("factor", DIVERGE_FACTOR)
    finish_results(results, baseline=baseline, factor=factor,
                   confidence=confidence or info.get("confidence") or CONFIDENCE)
    log(bench_table(results))
    log("")
    log(comparison_text(results))
    if write and path is not None:
        write_json(results, path)
    if plot and path is not None and results["comparisons"]:
        _plot_paired(results, path.parent / "paired_differences.png", log)
    return results


# ---------------------------------------------------------------------------- output
def _csv_row(name: str, run: dict[str, Any]) -> dict[str, Any]:
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
                 for r in m["runs"] if _finite(r["test"]["all"]["mae"])), default=1.0)
    return 0 if scale >= 100 else 2


def bench_table(results: dict[str, Any], digits: int | None = None) -> str:
    """The paper-style table (MAE and GM per region, bMAE) of a ``results.json`` dict: mean ±
    std over the seeds at each method's selected rho, diverged runs left out (marked † with a
    footnote). The spread is no test of a difference: the paired comparisons are."""
    reports, notes = {}, []
    for name, m in results["methods"].items():
        rho = m.get("selected_rho")
        runs = [r for r in m["runs"] if r["rho"] == rho]
        kept = [r for r in runs if not r.get("diverged")]
        label = name if rho is None else f"{name} (rho {rho:g})"
        if len(kept) < len(runs):
            label += " †"
            notes.append(f"† {name}: " + "; ".join(
                f"seed {r['seed']} diverged ({r.get('diverged_reason', '?')})" for r in runs
                if r.get("diverged")) + f"; left out: {len(kept)} of {len(runs)} seeds shown")
        stalled = [r for r in kept if r.get("stalled")]
        if stalled:
            label += " ‡"
            epochs = results.get("config", {}).get("train", {}).get("epochs")
            notes.append(f"‡ {name}: " + "; ".join(
                f"seed {r['seed']} stopped improving at epoch {r['best_epoch']} of {epochs} "
                f"(test MAE {r['test']['all']['mae']:.4g})" for r in stalled)
                + "; kept in the mean: read its spread with that in mind")
        reports[label] = [nan_for_null(r["test"]) for r in kept] or [
            {region: {k: math.nan for k in v} for region, v in runs[0]["test"].items()}]
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


def _plots(results: dict[str, Any], plan: _Plan, log: Callable[[str], None]) -> None:
    try:
        from balanced_sam import plots
    except ImportError as exc:  # matplotlib missing
        log(f"plots skipped: {exc}")
        return
    data, out = plan.data, plan.out
    many, few = data.bins.thresholds()
    y_train, y_test = data.labels("train"), data.labels("test")
    if y_train is not None and y_test is not None:
        plots.plot_label_histogram(data.bins, y_train, y_test, out / "label_histogram.png",
                                   many=many, few=few, unit=data.unit)
    plots.plot_per_bin_mae(results, data.bins, out / "per_bin_mae.png", many=many, few=few,
                           unit=data.unit)
    if len(results["config"]["rho"]) > 1:  # a sweep
        plots.plot_rho_sweep(results, out / "rho_sweep.png", unit=data.unit)
    if results["comparisons"]:
        _plot_paired(results, out / "paired_differences.png", log)
