"""``bsam bench``: methods x seeds (x rho) on a built-in or user table -> results, table, plots.

:func:`run_bench` loads a :class:`~balanced_sam.data.base.BenchData`, builds the training
:class:`~balanced_sam.LabelBins` once, trains every (method, rho, seed) with
:func:`balanced_sam.train.fit` (the same initial weights for every method of a seed), and writes
into ``out``:

* ``results.json`` (schema below), ``results.csv`` (one row per run);
* ``label_histogram.png``, ``per_bin_mae.png`` and, for several rho values, ``rho_sweep.png``;
* ``runs/<method>[-rho<r>]-seed<s>/``: each run's ``best.pt``, ``log.csv`` and ``result.json``.

A bench that dies can be run again with the same ``--out``: finished runs are read back from
their ``result.json`` and an interrupted one resumes from its ``last.pt``.

``results.json``::

    {"dataset": str, "config": {...}, "split": {"train": n, "val": n, "test": n, "bins": K,
     "regions": {"many": k, "medium": k, "few": k}, ...}, "bins": LabelBins.to_dict(),
     "methods": {NAME: {"runs": [{"seed", "rho", "best_epoch", "train_seconds", "val", "test",
                                  "test_per_bin"}],
                        "mean": REPORT, "std": REPORT, "selected_rho": r,
                        "by_rho": {str(r): {"mean": REPORT, "std": REPORT, "val_mae": m}}}}}

``REPORT = {region: {metric: value}}`` (regions all/many/medium/few; metrics mae, mse, rmse, gm,
bmae, count); ``mean``/``std`` are over the seeds at ``selected_rho``, the rho with the lowest
mean validation MAE (for methods without rho, over all runs). Empty regions are ``null``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from balanced_sam._compat import region_thresholds
from balanced_sam.bins import LabelBins
from balanced_sam.data.base import BenchData, get_dataset
from balanced_sam.methods import DEFAULT_METHODS, get_method
from balanced_sam.metrics import aggregate_reports, format_table
from balanced_sam.train import RunExistsError, TrainConfig, fit, seed_everything

__all__ = ["run_bench", "load_bench_data", "QUICK", "bench_table"]

#: what ``--quick`` changes (said in the output)
QUICK = {"seeds": (0,), "epochs": 12}


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _none_to_nan(obj: Any) -> Any:
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: _none_to_nan(v) for k, v in obj.items()}
    return obj


def write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_nan_to_none(obj), indent=1, allow_nan=False))
    tmp.replace(path)


def load_bench_data(dataset: str | None = None, *, csv_path: str | None = None,
                    target: str | None = None, bin_width: float | None = None,
                    train_fraction: float | None = None, cap: int | None = None,
                    data_root: str | None = None, split_seed: int = 0,
                    dropna: bool = False) -> BenchData:
    """The benchmark's data: a registered dataset by name, or any CSV table with a target."""
    opts: dict[str, Any] = {}
    if bin_width is not None:
        opts["bin_width"] = bin_width
    if train_fraction is not None:
        opts["train_fraction"] = train_fraction
    if cap is not None:
        opts["cap"] = cap
    if csv_path is not None:
        if target is None:
            raise ValueError("--csv needs --target: the name of the column to predict")
        from balanced_sam.data.tabular import load_table

        return load_table(csv_path, target, seed=split_seed, dropna=dropna, **opts)
    if target is not None:
        raise ValueError("--target is only used with --csv FILE")
    if data_root is not None:
        opts["data_root"] = data_root
    return get_dataset(dataset or "diamonds", split_seed=split_seed, **opts)


def _balance(data: BenchData, bins: LabelBins) -> str:
    """bMAE over distinct labels when labels are discrete (no more distinct test labels than
    bins, as ages), over bins when they are continuous (prices, angles)."""
    distinct = torch.unique(data.y_test).numel()
    return "label" if distinct <= bins.num_bins else "bin"


def _run_name(method: str, rho: float | None, seed: int) -> str:
    return f"{method}{'' if rho is None else f'-rho{rho:g}'}-seed{seed}"


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
) -> dict[str, Any]:
    """Run the benchmark and write its files; returns the ``results.json`` dictionary."""
    t_start = time.perf_counter()
    for m in methods:
        get_method(m)
    if not methods:
        raise ValueError("methods is empty: name at least one method")
    if seeds is None:
        seeds = QUICK["seeds"] if quick else (0, 1, 2)
    if quick and epochs is None:
        epochs = QUICK["epochs"]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    rhos: list[float] | None
    if rho is None:
        rhos = None
    elif isinstance(rho, (int, float)):
        rhos = [float(rho)]
    else:
        rhos = [float(r) for r in rho]
    for r in rhos or []:
        if not (math.isfinite(r) and r >= 0):
            raise ValueError(f"--rho values must be finite numbers >= 0, got {r}")

    data = load_bench_data(dataset, csv_path=csv_path, target=target, bin_width=bin_width,
                           train_fraction=train_fraction, cap=cap, data_root=data_root,
                           dropna=dropna)
    # how to rebuild this data (stored in every checkpoint, for bsam eval / analyze)
    opts = {k: v for k, v in (("bin_width", bin_width), ("train_fraction", train_fraction),
                              ("cap", cap)) if v is not None}
    if csv_path is not None:
        data_spec = {"name": "csv", "path": str(Path(csv_path).resolve()), "target": target,
                     "dropna": dropna, **opts}
    else:
        data_spec = {"name": dataset or "diamonds", **opts}
        if data_root is not None:
            data_spec["data_root"] = str(Path(data_root).resolve())
    bins = LabelBins.from_labels(data.y_train, **data.bins)
    d = dict(data.defaults)
    schedule = d.pop("schedule", "cosine")
    cfg_fields = {f for f in TrainConfig.__dataclass_fields__}
    base_cfg = TrainConfig(**{k: v for k, v in d.items() if k in cfg_fields},
                           schedule=schedule, device=device, select_by=select_by,
                           progress=progress, balance=_balance(data, bins))
    if epochs is not None:
        base_cfg.epochs = int(epochs)
    if overrides:
        base_cfg = replace(base_cfg, **overrides)
    base_cfg.validate()
    # rho: the user's list for every SAM-family method, else the dataset's choice per method
    rho_by_method = {} if rhos else dict(data.defaults.get("rho_by_method", {}))
    sweep = rhos or [base_cfg.rho]

    def method_rhos(name: str) -> list[float | None]:
        if not get_method(name).uses_rho:
            return [None]
        return [rho_by_method[name]] if name in rho_by_method else list(sweep)

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out) if out is not None else Path("runs") / f"bench-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"dataset": data.name, "methods": list(methods), "seeds": seeds, "rho": sweep,
              "rho_by_method": {m: method_rhos(m)[0] for m in methods
                                if get_method(m).uses_rho},
              "train": base_cfg.to_dict(), "quick": quick, "data": data.info,
              "bins": data.bins, "target_unit": data.target_unit,
              "standardize_target": data.standardize_target,
              "model": data.info.get("model", type(data.make_model()).__name__)}
    cfg_path = out_dir / "bench_config.json"
    comparable = {k: v for k, v in config.items() if k != "train"} | {
        "train": {k: v for k, v in base_cfg.to_dict().items() if k not in ("progress", "device")}}
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old != json.loads(json.dumps(_nan_to_none(comparable))):
            raise RunExistsError(f"{out_dir} holds a bench with another configuration; choose "
                                 "another --out (or delete it yourself)")
    else:
        write_json(comparable, cfg_path)

    y_all = torch.cat([data.y_train, data.y_val, data.y_test])
    mean, std = data.y_train.mean().item(), data.y_train.std().item()
    target_stats = (mean, std) if data.standardize_target else None
    regions = bins.region_counts(*region_thresholds(bins, base_cfg.many, base_cfg.few))
    split = {"train": len(data.y_train), "val": len(data.y_val), "test": len(data.y_test),
             "bins": bins.num_bins, "regions": regions}
    for k in ("C", "cap", "train_fraction"):
        if k in data.info:
            split[k] = data.info[k]
    log(f"dataset {data.name}: train {split['train']}, val {split['val']}, test {split['test']}; "
        f"{bins.num_bins} bins ({regions['many']} many / {regions['medium']} medium / "
        f"{regions['few']} few with training samples)")
    if data.info.get("train_fraction") not in (None, 1, 1.0):
        log(f"training keeps {data.info['train_fraction']:.0%} of the rows left after the "
            "validation/test split, so that the tail has few-shot bins")
    log(f"recipe: {base_cfg.optimizer} lr {base_cfg.lr} wd {base_cfg.weight_decay}, batch "
        f"{base_cfg.batch_size}, {base_cfg.epochs} epochs, {base_cfg.schedule} schedule, "
        f"rho {_rho_text(rho_by_method, sweep, methods)}; seeds {seeds}; best epoch by val "
        f"{base_cfg.select_by}" + (" [--quick: 1 seed, fewer epochs]" if quick else ""))

    results: dict[str, Any] = {"dataset": data.name, "config": config, "split": split,
                               "bins": bins.to_dict(), "methods": {}}
    csv_rows = []
    for name in methods:
        runs = []
        for r in method_rhos(name):
            for seed in seeds:
                run_dir = out_dir / "runs" / _run_name(name, r, seed)
                res_path = run_dir / "result.json"
                if res_path.exists():
                    run = json.loads(res_path.read_text())
                    run["val"], run["test"] = _none_to_nan(run["val"]), _none_to_nan(run["test"])
                    log(f"{_run_name(name, r, seed)}: done earlier, read back")
                else:
                    cfg = replace(base_cfg, method=name, seed=seed,
                                  rho=r if r is not None else base_cfg.rho)
                    seed_everything(seed)  # same initial weights for every method of a seed
                    model = data.make_model()
                    res = fit(model, (data.x_train, data.y_train), (data.x_val, data.y_val),
                              bins, cfg, test_data=(data.x_test, data.y_test), out_dir=run_dir,
                              resume=True, target_stats=target_stats,
                              meta={"dataset": data.name, "bench_out": str(out_dir),
                                    "spec": {"data": data_spec, "train": cfg.to_dict()}},
                              log=lambda s: None)
                    run = {"seed": seed, "rho": r, "best_epoch": res.best_epoch,
                           "train_seconds": res.train_seconds, "val": res.val,
                           "test": res.test, "test_per_bin": res.test_per_bin}
                    write_json(run, res_path)
                    (run_dir / "last.pt").unlink(missing_ok=True)  # finished: best.pt suffices
                    t = run["test"]["all"]
                    log(f"{_run_name(name, r, seed)}: test MAE {t['mae']:.4g} (few "
                        f"{run['test']['few']['mae']:.4g}), best epoch {res.best_epoch}, "
                        f"{res.train_seconds:.1f}s")
                runs.append(run)
                csv_rows.append(_csv_row(name, run))
        results["methods"][name] = _summarise(runs)
    results["total_seconds"] = time.perf_counter() - t_start
    write_json(results, out_dir / "results.json")
    _write_csv(csv_rows, out_dir / "results.csv")
    if plots:
        _plots(results, data, bins, y_all, out_dir, base_cfg, log)
    log("")
    log(bench_table(results))
    log(f"\nwrote {out_dir}/results.json, results.csv and plots "
        f"({results['total_seconds']:.0f}s in all)")
    return results


def _rho_text(by_method: dict[str, float], sweep: list[float], methods: Sequence[str]) -> str:
    shown = {m: by_method[m] for m in methods if m in by_method}
    if shown:
        return ", ".join(f"{m} {r:g}" for m, r in shown.items()) + " (chosen on validation)"
    return ", ".join(f"{r:g}" for r in sweep)


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


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    header = list(rows[0])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def bench_table(results: dict[str, Any], digits: int | None = None) -> str:
    """The paper-style table (MAE and GM per region, bMAE) of a ``results.json`` dict:
    mean +- std over seeds at each method's selected rho."""
    reports = {}
    for name, m in results["methods"].items():
        rho = m.get("selected_rho")
        runs = [r for r in m["runs"] if r["rho"] == rho]
        label = name if rho is None else f"{name} (rho {rho:g})"
        reports[label] = [_none_to_nan(r["test"]) for r in runs]
    if digits is None:
        scale = max((abs(v[0]["all"]["mae"]) for v in reports.values()), default=1.0)
        digits = 0 if scale >= 100 else 2
    unit = results.get("config", {}).get("target_unit", "")
    head = (f"{results['dataset']} test set, mean ± std over seeds"
            + (f" (errors in {unit})" if unit else ""))
    return head + "\n" + format_table(reports, digits=digits)


def _plots(results: dict[str, Any], data: BenchData, bins: LabelBins, y_all: torch.Tensor,
           out_dir: Path, cfg: TrainConfig, log: Callable[[str], None]) -> None:
    try:
        from balanced_sam import plots
    except ImportError as exc:  # matplotlib missing
        log(f"plots skipped: {exc}")
        return
    unit = data.target_unit
    many, few = region_thresholds(bins, cfg.many, cfg.few)
    plots.plot_label_histogram(bins, data.y_train, data.y_test, out_dir / "label_histogram.png",
                               many=many, few=few, unit=unit)
    plots.plot_per_bin_mae(results, bins, out_dir / "per_bin_mae.png", many=many,
                           few=few, unit=unit)
    if len(results["config"]["rho"]) > 1:  # a sweep
        plots.plot_rho_sweep(results, out_dir / "rho_sweep.png", unit=unit)
