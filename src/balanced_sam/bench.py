"""``bsam bench``: methods x seeds (x rho) on a registered dataset or a CSV table -> results,
table, plots.

:func:`run_bench` loads the data once through the registry
(:func:`balanced_sam.data.registry.load_data`: splits, training-label bins, target scaling,
fingerprint), trains every (method, rho, seed) with :func:`balanced_sam.train.fit` (the same
initial weights for every method of a seed), and writes into ``out``:

* ``results.json`` (schema below), ``results.csv`` (one row per run);
* ``label_histogram.png``, ``per_bin_mae.png`` and, for several rho values, ``rho_sweep.png``;
* ``runs/<method>[-rho<r>]-seed<s>/``: each run's ``best.pt``, ``log.csv`` and ``result.json``.

A bench that dies can be run again with the same ``--out``: finished runs are read back from
their ``result.json`` and an interrupted one resumes from its ``last.pt``, as long as the data
have the same fingerprint; a run on data that changed since is trained again.

``results.json``::

    {"dataset": str, "config": {...}, "split": {"train": n, "val": n, "test": n, "bins": K,
     "regions": {"many": k, "medium": k, "few": k}, ...}, "bins": LabelBins.to_dict(),
     "fingerprint": {"digest", "files", "params"}, "warnings": [str],
     "methods": {NAME: {"runs": [{"seed", "rho", "best_epoch", "train_seconds", "val", "test",
                                  "test_per_bin", "data_fingerprint"}],
                        "mean": REPORT, "std": REPORT, "selected_rho": r,
                        "by_rho": {str(r): {"mean": REPORT, "std": REPORT, "val_mae": m}}}}}

``REPORT = {region: {metric: value}}`` (regions all/many/medium/few; metrics mae, mse, rmse, gm,
bmae, count); ``mean``/``std`` are over the seeds at ``selected_rho``, the rho with the lowest
mean validation MAE (for methods without rho, over all runs). Empty regions are ``null``.
``config.train.balance`` says what bMAE averages over (``label`` or ``bin``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from balanced_sam.config import TrainConfig
from balanced_sam.data.base import BenchData
from balanced_sam.data.registry import DataSplits, load_data
from balanced_sam.errors import spell
from balanced_sam.experiment import train_config
from balanced_sam.io import FolderLock, nan_for_null, read_json, to_json, write_csv, write_json
from balanced_sam.methods import DEFAULT_METHODS, get_method, recipe_rhos
from balanced_sam.metrics import aggregate_reports, format_table
from balanced_sam.train import (
    RunExistsError,
    fit,
    load_checkpoint,
    resolve_device,
    seed_everything,
)

__all__ = ["run_bench", "load_bench_data", "bench_data_spec", "QUICK", "bench_table"]

#: what ``--quick`` changes (said in the output)
QUICK = {"seeds": (0,), "epochs": 12}


def bench_data_spec(dataset: str | None = None, *, csv_path: str | None = None,
                    target: str | None = None, bin_width: float | None = None,
                    train_fraction: float | None = None, cap: int | None = None,
                    data_root: str | None = None, split_seed: int = 0, dropna: bool = False,
                    **table_options: Any) -> dict[str, Any]:
    """The ``data`` section (see :func:`balanced_sam.data.registry.load_data`) that the bench's
    options describe: a registered dataset by name, or a CSV table with its target column."""
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
    spec: dict[str, Any] = {"name": dataset or "diamonds", **opts}
    if data_root is not None:
        spec["root" if _reads_root(spec["name"]) else "data_root"] = str(Path(data_root).resolve())
    if split_seed:
        spec["split_seed"] = split_seed
    return spec


def _reads_root(name: str) -> bool:
    from balanced_sam.data.registry import get_entry

    return get_entry(name).needs_root


def load_bench_data(dataset: str | None = None, **options: Any) -> BenchData:
    """The benchmark's tensors: a registered table-like dataset by name, or any CSV table with
    a target (the options of :func:`bench_data_spec`)."""
    data = load_data(bench_data_spec(dataset, **options))
    if data.tables is None:
        raise ValueError(f"{data.name} is not a table of tensors; use load_data for it")
    return data.tables


@dataclass
class _Plan:
    """A validated bench: the data, the base config, the runs and where they go."""

    data: DataSplits
    spec: dict[str, Any]
    cfg: TrainConfig
    methods: list[str]
    seeds: list[int]
    sweep: list[float]
    rho_by_method: dict[str, float]
    out: Path
    quick: bool

    def rhos(self, method: str) -> list[float | None]:
        if not get_method(method).uses_rho:
            return [None]
        return [self.rho_by_method[method]] if method in self.rho_by_method else list(self.sweep)

    @property
    def digest(self) -> str:
        return self.data.fingerprint["digest"]


def run_bench(
    dataset: str | None = "diamonds",
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
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
    **table_options: Any,
) -> dict[str, Any]:
    """Run the benchmark and write its files; returns the ``results.json`` dictionary.

    ``table_options`` go to a CSV table's loader (``impute``, ``features``, ``categorical``,
    ``max_categories``)."""
    t_start = time.perf_counter()
    resolve_device(device)  # a bad device fails before any data is read
    seeds, epochs = _checked_runs(methods, seeds, epochs, quick)
    rhos = _checked_rhos(rho)
    spec = bench_data_spec(dataset, csv_path=csv_path, target=target, bin_width=bin_width,
                           train_fraction=train_fraction, cap=cap, data_root=data_root,
                           dropna=dropna, **table_options)
    data = load_data(spec)
    cfg = train_config(data, {"device": device, "select_by": select_by, "progress": progress,
                              **({"epochs": int(epochs)} if epochs is not None else {}),
                              **(overrides or {})})
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    plan = _Plan(data, spec, cfg, list(methods), seeds, rhos or [cfg.rho],
                 {} if rhos else recipe_rhos(data.recipe.rho_by_method, methods),
                 Path(out) if out is not None else Path("runs") / f"bench-{stamp}", quick)
    with FolderLock(plan.out, name=".bench.lock", what="bench"):
        results = _header(plan, log)
        rows = []
        for name in plan.methods:
            runs = [_run(plan, name, r, s, log) for r in plan.rhos(name) for s in plan.seeds]
            rows += [_csv_row(name, run) for run in runs]
            results["methods"][name] = _summarise(runs)
        results["total_seconds"] = time.perf_counter() - t_start
        write_json(results, plan.out / "results.json")
        write_csv(rows, plan.out / "results.csv")
    if plots:
        _plots(results, plan, log)
    log("")
    log(bench_table(results))
    log(f"\nwrote {plan.out}/results.json, results.csv and plots "
        f"({results['total_seconds']:.0f}s in all)")
    return results


def _checked_runs(methods: Sequence[str], seeds: Sequence[int] | None, epochs: int | None,
                  quick: bool) -> tuple[list[int], int | None]:
    if not methods:
        raise ValueError("methods is empty: name at least one method")
    for m in methods:
        get_method(m)
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods names a method twice: {list(methods)}")
    if seeds is None:
        seeds = QUICK["seeds"] if quick else (0, 1, 2)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"seeds repeats seed(s) {repeated}: each seed is one run, and a "
                         "repeated one would count the same run twice")
    if quick and epochs is None:
        epochs = QUICK["epochs"]
    return seeds, epochs


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
        + (" [--quick: 1 seed, fewer epochs]" if plan.quick else ""))
    return {"dataset": data.name, "config": config, "split": split,
            "bins": data.bins.to_dict(), "fingerprint": data.fingerprint, "warnings": warnings,
            "methods": {}}


def _same_bench(plan: _Plan, config: dict[str, Any]) -> None:
    """A folder holds one bench: refuse another configuration (the data's content is not part
    of it: runs on changed data are trained again instead)."""
    comparable = {k: v for k, v in config.items() if k not in ("train", "data")} | {
        "data_spec": plan.spec,
        "train": {k: v for k, v in plan.cfg.to_dict().items() if k not in ("progress", "device")}}
    path = plan.out / "bench_config.json"
    if not path.exists():
        write_json(comparable, path)
    elif read_json(path) != json.loads(json.dumps(to_json(comparable))):
        raise RunExistsError(f"{plan.out} holds a bench with another configuration; choose "
                             "another output folder (or delete it yourself)")


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


def _run(plan: _Plan, name: str, rho: float | None, seed: int,
         log: Callable[[str], None]) -> dict[str, Any]:
    """One run: read back when finished on the same data, else trained (or resumed)."""
    label = _run_name(name, rho, seed)
    run_dir = plan.out / "runs" / label
    res_path = run_dir / "result.json"
    fresh = False
    if res_path.exists():
        run = read_json(res_path)
        if run.get("data_fingerprint") == plan.digest:
            run["val"], run["test"] = nan_for_null(run["val"]), nan_for_null(run["test"])
            log(f"{label}: done earlier, read back")
            return run
        log(f"{label}: the data changed since this run was trained (other fingerprint): "
            "training it again")
        fresh = True
    elif (run_dir / "last.pt").exists():
        fresh = load_checkpoint(run_dir / "last.pt").get("data_fingerprint") != plan.digest
    cfg = replace(plan.cfg, method=name, seed=seed, rho=rho if rho is not None else plan.cfg.rho)
    seed_everything(seed)  # same initial weights for every method of a seed
    model = plan.data.make_model()
    res = fit(model, plan.data.train, plan.data.val, plan.data.bins, cfg,
              test_data=plan.data.test, out_dir=run_dir, resume=not fresh, overwrite=fresh,
              target_scaler=plan.data.scaler, depth=plan.data.dense,
              meta={"dataset": plan.data.name, "bench_out": str(plan.out),
                    "spec": {"data": plan.spec, "train": cfg.to_dict()},
                    "data": plan.data.fingerprint},
              data_fingerprint=plan.digest, log=lambda s: None)
    run = {"seed": seed, "rho": rho, "best_epoch": res.best_epoch,
           "train_seconds": res.train_seconds, "val": res.val, "test": res.test,
           "test_per_bin": res.test_per_bin, "data_fingerprint": plan.digest}
    write_json(run, res_path)
    (run_dir / "last.pt").unlink(missing_ok=True)  # finished: best.pt suffices
    t = run["test"]
    log(f"{label}: test MAE {t['all']['mae']:.4g} (few {t['few']['mae']:.4g}), best epoch "
        f"{res.best_epoch}, {res.train_seconds:.1f}s")
    return run


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_rho: dict[str, Any] = {}
    groups: dict[Any, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["rho"], []).append(run)
    best_key, best_val = None, math.inf
    for r, rs in groups.items():
        mean, std = aggregate_reports([x["test"] for x in rs])
        val_mae = sum(x["val"]["all"]["mae"] for x in rs) / len(rs)
        by_rho[str(r)] = {"mean": mean, "std": std, "val_mae": val_mae}
        if val_mae < best_val:
            best_key, best_val = r, val_mae
    sel = by_rho[str(best_key)]
    return {"runs": runs, "mean": sel["mean"], "std": sel["std"], "selected_rho": best_key,
            "by_rho": by_rho}


def _csv_row(name: str, run: dict[str, Any]) -> dict[str, Any]:
    row = {"method": name, "rho": run["rho"], "seed": run["seed"],
           "best_epoch": run["best_epoch"], "train_seconds": round(run["train_seconds"], 2)}
    for split in ("val", "test"):
        for region, metrics in run[split].items():
            for m, v in metrics.items():
                row[f"{split}_{region}_{m}"] = v
    return row


def bench_table(results: dict[str, Any], digits: int | None = None) -> str:
    """The paper-style table (MAE and GM per region, bMAE) of a ``results.json`` dict:
    mean +- std over seeds at each method's selected rho."""
    reports = {}
    for name, m in results["methods"].items():
        rho = m.get("selected_rho")
        runs = [r for r in m["runs"] if r["rho"] == rho]
        label = name if rho is None else f"{name} (rho {rho:g})"
        reports[label] = [nan_for_null(r["test"]) for r in runs]
    if digits is None:
        scale = max((abs(v[0]["all"]["mae"]) for v in reports.values()), default=1.0)
        digits = 0 if scale >= 100 else 2
    unit = results.get("config", {}).get("target_unit", "")
    head = (f"{results['dataset']} test set, mean ± std over seeds"
            + (f" (errors in {unit})" if unit else ""))
    return head + "\n" + format_table(reports, digits=digits)


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
