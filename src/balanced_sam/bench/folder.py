"""A bench's folder: the project's mark on it (:func:`claim_bench_folder`: a manifest listing
what the bench wrote, :mod:`balanced_sam.outputs`), the setting it holds (``bench_config.json``;
another bench setting is refused, more methods or seeds are welcome), the header of its
``results.json``, and the runs finished in it, read back."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from balanced_sam.bench.plan import BenchPlan, RunKey
from balanced_sam.bench.report import fit_lines
from balanced_sam.bench.summary import DEFAULT_BASELINE
from balanced_sam.config import TrainConfig
from balanced_sam.data.registry import DataSplits
from balanced_sam.errors import spell
from balanced_sam.io import nan_for_null, read_json, to_json, write_json
from balanced_sam.outputs import RUN_OUTPUTS, FolderNotOursError, OwnedFolder, claim_folder
from balanced_sam.runtime import resolve_device
from balanced_sam.train import RunExistsError, load_checkpoint

__all__ = ["claim_bench_folder", "start_results", "read_back", "folder_runs", "bin_warnings",
           "BENCH_FILES"]

#: the files a bench writes at the top of its folder (its runs go to ``runs/<label>/``)
BENCH_FILES = ("bench_config.json", "results.json", "results.csv", "label_histogram.png",
               "per_bin_mae.png", "paired_differences.png", "rho_sweep.png")


def _legacy_bench(path: Path, verify: bool) -> dict[str, str] | None:
    """The entries of a bench folder written by the previous release (no manifest), else
    ``None``: it holds its ``bench_config.json`` (a JSON object), only :data:`BENCH_FILES` and
    ``runs/``, whose folders are all run labels holding only a run's outputs; no link anywhere
    on the way. Its runs are adopted as they are: a finished one is read back, an unfinished one
    is adopted by its own run folder on resume."""
    held = [n for n in os.listdir(path) if n not in (".bench.lock", ".DS_Store")]
    if "bench_config.json" not in held or not set(held) <= {*BENCH_FILES, "runs"} or any(
            (path / n).is_symlink() or (n != "runs") != (path / n).is_file() for n in held):
        return None
    labels = sorted(os.listdir(path / "runs")) if "runs" in held else []
    for label in labels:
        run = path / "runs" / label
        if run.is_symlink() or not run.is_dir() or not set(os.listdir(run)) <= {
                *RUN_OUTPUTS, "pretrain"} or any((run / n).is_symlink() for n in os.listdir(run)):
            return None
        try:
            RunKey.parse(label)
        except ValueError:
            return None
    if verify:
        try:
            if not isinstance(read_json(path / "bench_config.json"), dict):
                return None
        except (ValueError, UnicodeDecodeError):
            return None
    return {**{n: "file" for n in held if n != "runs"},
            **{f"runs/{label}": "folder" for label in labels}}


def _out_option() -> str:
    """How the user names the bench's folder here: ``--out`` on the command line."""
    spelled = spell("out", "DIR")
    return "out" if spelled == "out='DIR'" else spelled


def claim_bench_folder(plan: BenchPlan, log: Callable[[str], None]) -> OwnedFolder:
    """Make ``plan.out`` this bench's folder (:func:`balanced_sam.outputs.claim_folder`): an
    empty or new folder is marked as a bench's; one the project marked continues (finished runs
    are read back) or, with ``overwrite``, loses exactly what its manifest lists first; any other
    non-empty folder is refused, naming ``--out``. Every run folder of the plan is listed in the
    manifest before a run writes into it."""
    overwrite = plan.config.overwrite
    outputs = (*BENCH_FILES, *(f"runs/{k.label}" for k in plan.keys))
    owned = claim_folder(plan.out, "bench", overwrite=overwrite, resume=not overwrite,
                         option=_out_option(), outputs=outputs, legacy=_legacy_bench, log=log)
    if (plan.out / "runs").is_symlink():
        raise FolderNotOursError(f"{plan.out / 'runs'} is a symbolic link: bsam never writes "
                                 f"through one; remove it or choose another {_out_option()}")
    for key in plan.keys:
        owned.record(f"runs/{key.label}", "folder")
    return owned

#: what may differ between benches that share a folder: its runs are kept per method, rho and
#: seed, so a bench may add methods or seeds to a finished one and reads the common runs back
_MAY_GROW = ("methods", "seeds", "rho_by_method")


def _size(split: Any) -> int:
    if split is None:
        return 0
    return len(split[1]) if isinstance(split, (tuple, list)) else len(split)


def bin_warnings(data: DataSplits) -> list[str]:
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


def _setting(plan: BenchPlan) -> dict[str, Any]:
    """The ``config`` of ``results.json``: what the bench runs and on what."""
    data, cfg = plan.data, plan.cfg
    return {"dataset": data.name, "methods": plan.names, "seeds": plan.seeds,
            "rho": plan.sweep, "rho_by_method": {m.name: plan.rhos(m)[0] for m in plan.methods
                                                 if m.uses_rho},
            "train": cfg.to_dict(), "quick": plan.config.quick, "data": data.info,
            "bins": data.tables.bins if data.tables is not None else data.bins.to_dict(),
            "target_unit": data.unit, "standardize_target": not data.target_scaler.is_identity,
            "model": _model_text(plan)}


def start_results(plan: BenchPlan, owned: OwnedFolder, log: Callable[[str], None]
                  ) -> dict[str, Any]:
    """Check the folder holds this bench (or none), say what runs, start results.json. Its
    ``config`` is this bench's; ``record_config`` that of every bench the folder has held
    (methods, seeds and rho per method together)."""
    data, cfg = plan.data, plan.cfg
    config = _setting(plan)
    record = _same_bench(plan, owned, config)
    many, few = data.bins.thresholds()
    regions = data.bins.region_counts(many, few)
    split = {**{s: _size(getattr(data, s)) for s in ("train", "val", "test")},
             "bins": data.bins.num_bins, "regions": regions}
    split.update({k: data.info[k] for k in ("C", "cap", "train_fraction") if k in data.info})
    log(fit_lines(f"dataset {data.name}: train {split['train']}, val {split['val']}, test "
                  f"{split['test']}"))
    log(fit_lines(f"bins: {data.bins.num_bins} ({regions['many']} many / {regions['medium']} "
                  f"medium / {regions['few']} few with training samples)"))
    if data.info.get("summary"):  # what a loader chose by itself (images: the path column, ...)
        log(fit_lines(str(data.info["summary"])))
    warnings = bin_warnings(data)
    for w in warnings:
        log(fit_lines(f"warning: {w}"))
    if data.info.get("train_fraction") not in (None, 1, 1.0):
        log(f"training keeps {data.info['train_fraction']:.0%} of the rows left after the "
            "validation/test split, so that the tail has few-shot bins")
    quick = plan.config.quick
    log(fit_lines(f"recipe: {cfg.optimizer} lr {cfg.lr} wd {cfg.weight_decay}, batch "
                  f"{cfg.batch_size}, {cfg.epochs} epochs, {cfg.schedule} schedule; best epoch "
                  f"by val {cfg.select_by}"))
    log(fit_lines(f"rho: {_rho_text(plan)}"))
    log(fit_lines(f"seeds {', '.join(map(str, plan.seeds))}"
                  + (f" [--quick: {len(plan.seeds)} seed(s), {cfg.epochs} epochs]"
                     if quick else "") + f"; bMAE by {cfg.balance}"))
    sweep = data.recipe.bench.get("rho_sweep")
    if sweep and not data.recipe.rho_by_method and plan.config.rho is None and any(
            m.uses_rho for m in plan.methods):
        log(fit_lines(f"note: no rho was tuned for this data: the SAM-family methods run at rho "
                      f"{cfg.rho:g}, a starting point; sweep it, e.g. --rho "
                      f"{','.join(f'{r:g}' for r in sweep)}, and choose by validation MAE"))
    if plan.baseline is None and len(plan.methods) > 1:
        log(f"no paired comparisons: the default baseline {DEFAULT_BASELINE} is not among the "
            f"methods; name one of them with {spell('baseline', plan.names[0])}")
    return {"dataset": data.name, "config": config, "split": split,
            "bins": data.bins.to_dict(), "fingerprint": data.fingerprint, "warnings": warnings,
            "methods": {}, "record_config": {k: record[k] for k in _MAY_GROW}}


def _same_bench(plan: BenchPlan, owned: OwnedFolder, config: dict[str, Any]) -> dict[str, Any]:
    """A folder holds one bench setting (data, recipe, bins, model): refuse another one. Methods
    and seeds may be added (a method present in both must keep its rho); the data's content is
    not part of the setting (runs on changed data are trained again instead). Writes the
    setting with the methods, seeds and rho of every bench the folder held; returns it."""
    comparable = {k: v for k, v in config.items() if k not in ("train", "data")} | {
        "data_spec": plan.spec,
        "train": {k: v for k, v in plan.cfg.to_dict().items() if k not in _NOT_THE_SETTING}}
    path = plan.out / "bench_config.json"
    if path.exists():
        stored = _with_defaults(read_json(path))
        _keep_earlier_layout(plan, owned, stored)
        now = json.loads(json.dumps(to_json(comparable)))
        setting = {k: v for k, v in now.items() if k not in _MAY_GROW}
        old_rho, new_rho = stored.get("rho_by_method") or {}, now.get("rho_by_method") or {}
        if {k: v for k, v in stored.items() if k not in _MAY_GROW} != setting or any(
                old_rho[m] != new_rho[m] for m in set(old_rho) & set(new_rho)):
            raise RunExistsError(f"{plan.out} holds a bench with another configuration (data, "
                                 "recipe, bins, model or a method's rho; methods and seeds may "
                                 "be added); choose another output folder, or pass "
                                 f"{spell('overwrite')} to remove that bench's files first")
        comparable["methods"] = list(dict.fromkeys([*stored.get("methods", []),
                                                    *comparable["methods"]]))
        comparable["seeds"] = sorted({*stored.get("seeds", []), *comparable["seeds"]})
        comparable["rho_by_method"] = {**old_rho, **comparable["rho_by_method"]}
    write_json(comparable, owned.record(path.name))
    return comparable


#: training options that do not make another bench: where it runs, and how the model is laid
#: out or compiled (they change the order of float sums, not what is learned; the layout the
#: bench's runs train in is its ``layout.json``, see :func:`balanced_sam.bench.run.decide_layout`)
_NOT_THE_SETTING = ("progress", "device", "channels_last", "compile")
LAYOUT_FILE = "layout.json"


def _keep_earlier_layout(plan: BenchPlan, owned: OwnedFolder, stored: dict[str, Any]) -> None:
    """A folder from before the layout was measured recorded it in its setting
    (``channels_last: false`` by default): its new runs train as its earlier ones did."""
    train = stored.get("train")
    earlier = train.pop("channels_last", None) if isinstance(train, dict) else None
    if isinstance(earlier, bool) and not owned.owns(LAYOUT_FILE):
        write_json({"channels_last": earlier, "requested": earlier, "reason": "bench",
                    "device": resolve_device(plan.cfg.device).type}, owned.record(LAYOUT_FILE))
    if isinstance(train, dict):
        train.pop("compile", None)


def _with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A training option the stored setting does not name ran with its default: a folder
    written before the package gained an option stays the same bench after an upgrade."""
    train = stored.get("train")
    if isinstance(train, dict):
        new = {f.name: f.default for f in fields(TrainConfig) if f.name not in train
               and f.name not in _NOT_THE_SETTING and f.default is not MISSING}
        stored["train"] = {**train, **to_json(new)}
    return stored


def _model_text(plan: BenchPlan) -> str:
    spec = dict(plan.data.recipe.model)
    name = spec.pop("name", "?")
    return f"{name}({', '.join(f'{k}={v}' for k, v in spec.items())})"


def _rho_text(plan: BenchPlan) -> str:
    shown = {m: plan.rho_by_method[m] for m in plan.names if m in plan.rho_by_method}
    if shown:
        return (", ".join(f"{m} {r:g}" for m, r in shown.items())
                + f" ({_source_text(plan.data.recipe.source)})")
    return ", ".join(f"{r:g}" for r in plan.sweep)


def _source_text(source: str) -> str:
    """Where the recipe's rho comes from, in words a wheel user can follow (the tuning scripts
    under benchmarks/ are in the repository only, not in the wheel)."""
    if not source:
        return "the recipe's, per method"
    if "benchmarks/" in source:
        return ("the recipe's, chosen on the validation split" if "validation" in source
                else "the recipe's")
    return f"the recipe's: {source}"


def folder_runs(plan: BenchPlan, owned: OwnedFolder) -> dict[str, list[dict[str, Any]]]:
    """Every run finished in the folder on these data (a ``result.json`` with the data's
    fingerprint, in a run folder of the manifest), by method, in label order."""
    found: dict[str, list[dict[str, Any]]] = {}
    runs = plan.out / "runs"
    if not runs.is_dir() or runs.is_symlink():
        return found
    for sub in sorted(runs.iterdir()):
        path = sub / "result.json"
        if sub.is_symlink() or not owned.owns(f"runs/{sub.name}") or path.is_symlink() \
                or not path.is_file():
            continue
        try:
            key = RunKey.parse(sub.name)
            run = read_json(path)
        except ValueError:
            continue  # not a run label, or not JSON: not a finished run
        if not isinstance(run, dict) or run.get("data_fingerprint") != plan.digest or not all(
                isinstance(run.get(k), dict) for k in ("val", "test")):
            continue
        run["val"], run["test"] = nan_for_null(run["val"]), nan_for_null(run["test"])
        found.setdefault(key.name, []).append(run)
    return found


def read_back(plan: BenchPlan, key: RunKey, log: Callable[[str], None]
              ) -> dict[str, Any] | bool:
    """A finished run on the same data, read back; else whether the run starts afresh
    (``True``: its folder holds a run on other data) or may resume from ``last.pt``."""
    label = key.label
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
