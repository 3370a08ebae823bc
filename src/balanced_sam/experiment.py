"""From a config (YAML or dict) to what :func:`balanced_sam.train.fit` needs.

A config has four sections::

    data:  {name: agedb, root: data/agedb, img_size: 224, cache: false}   # or diamonds, csv...
    model: {name: resnet18}                                               # optional for tables
    bins:  {bin_width: 1, lower: 0, upper: 121}                           # LabelBins.from_labels
    train: {method: bsam, lr: 0.2, rho: 0.2, epochs: 400, ...}            # TrainConfig fields
    out: runs/agedb_bsam

``data.name`` is one of the paper's benchmarks (``agedb``, ``imdb-wiki``, ``nyud2``: datasets
read from ``data.root``), a built-in table benchmark (``diamonds``, ``rotated-mnist``, ... any
name in :data:`balanced_sam.data.DATASETS`) or ``csv`` (``path``, ``target`` and the options of
:func:`balanced_sam.data.tabular.load_table`). The same spec is stored in every checkpoint, so
``bsam eval`` and ``bsam analyze`` rebuild the model and data from the checkpoint alone.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from balanced_sam.bins import LabelBins
from balanced_sam.train import TrainConfig, seed_everything

__all__ = ["Experiment", "build_experiment", "load_config", "apply_overrides", "DIR_BENCHMARKS"]

#: the paper's benchmarks: name -> (module, default bins, whether targets are dense)
DIR_BENCHMARKS: dict[str, tuple[str, dict[str, Any] | None, bool]] = {
    "agedb": ("balanced_sam.data.agedb", {"bin_width": 1, "lower": 0, "upper": 121}, False),
    "imdb-wiki": ("balanced_sam.data.imdb_wiki", {"bin_width": 1, "lower": 0, "upper": 121},
                  False),
    "nyud2": ("balanced_sam.data.nyud2", None, True),
}


@dataclass
class Experiment:
    """Model, data splits, bins and the training config of one run."""

    model: nn.Module
    train: Any
    val: Any
    test: Any
    bins: LabelBins
    cfg: TrainConfig
    target_stats: tuple[float, float] | None = None
    depth: bool = False
    spec: dict[str, Any] = field(default_factory=dict)
    target_unit: str = ""


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (clear errors for a missing file or bad YAML)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"config {p} is not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise ValueError(f"config {p} must be a mapping with sections data/model/bins/train")
    return spec


def apply_overrides(spec: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML: ``2``, ``0.1``, ``true``,
    ``[1, 2]``); a key without a section goes to ``train``."""
    import yaml

    spec = copy.deepcopy(spec)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. train.epochs=2)")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        if len(path) == 1 and path[0] != "out":
            path = ["train", path[0]]
        node = spec
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else None
    return spec


def _known_sections(spec: dict[str, Any]) -> None:
    unknown = set(spec) - {"data", "model", "bins", "train", "out", "paper"}
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; use data, model, bins, "
                         "train, out (and paper for notes)")
    if "data" not in spec or "name" not in (spec.get("data") or {}):
        raise ValueError("config needs data.name (agedb, imdb-wiki, nyud2, diamonds, "
                         "rotated-mnist, csv, ...)")


def build_experiment(spec: dict[str, Any], *, bins: LabelBins | None = None) -> Experiment:
    """Build model, data, bins and config from ``spec``; ``bins`` (e.g. from a checkpoint)
    skips computing them from the training labels."""
    _known_sections(spec)
    data_spec = dict(spec["data"])
    name = str(data_spec.pop("name")).lower()
    model_spec = dict(spec.get("model") or {})
    train_spec = dict(spec.get("train") or {})
    bins_spec = spec.get("bins")
    if name in DIR_BENCHMARKS:
        module_name, default_bins, dense = DIR_BENCHMARKS[name]
        module = importlib.import_module(module_name)
        root = data_spec.pop("root", None)
        if root is None:
            raise ValueError(f"data.root is needed for {name}: the folder that "
                             f"`bsam data prepare {name} --root DIR` set up")
        splits = module.build_splits(root, **data_spec)
        if bins is None:
            if dense:
                bins = module.dir_bins(root, **{k: v for k, v in data_spec.items()
                                                if k in ("img_size",)})
            else:
                labels = module.train_labels(root, **{k: v for k, v in data_spec.items()
                                                      if k == "csv"})
                bins = LabelBins.from_labels(labels, **(bins_spec or default_bins))
        if "name" not in model_spec:
            raise ValueError(f"model.name is needed for {name} (e.g. resnet18, resnet50, "
                             "depth-resnet50)")
        from balanced_sam.models import build_model

        mname = model_spec.pop("name")
        cfg = TrainConfig.from_dict(train_spec)
        seed_everything(cfg.seed)
        model = build_model(mname, **model_spec)
        return Experiment(model, splits["train"], splits.get("val"), splits["test"], bins, cfg,
                          None, dense, spec, "m" if dense else "years")

    from balanced_sam.bench import load_bench_data

    if name == "csv":
        path = data_spec.pop("path", None)
        target = data_spec.pop("target", None)
        if path is None or target is None:
            raise ValueError("data.name csv needs data.path (the CSV file) and data.target")
        from balanced_sam.data.tabular import load_table

        data = load_table(path, target, **data_spec)
    else:
        data = load_bench_data(name, **data_spec)
    if bins is None:
        bins = LabelBins.from_labels(data.y_train, **(bins_spec or data.bins))
    d = {k: v for k, v in data.defaults.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig.from_dict({**d, **train_spec})
    seed_everything(cfg.seed)  # the initial weights of seed s are those bsam bench uses
    if "name" in model_spec:
        from balanced_sam.models import build_model

        mname = model_spec.pop("name")
        if mname == "mlp":
            model_spec.setdefault("in_features", int(data.x_train.shape[1]))
        model = build_model(mname, **model_spec)
    else:
        model = data.make_model()
    stats = None
    if data.standardize_target:
        stats = (data.y_train.mean().item(), data.y_train.std().item())
    return Experiment(model, (data.x_train, data.y_train), (data.x_val, data.y_val),
                      (data.x_test, data.y_test), bins, cfg, stats, False, spec,
                      data.target_unit)


def model_from_checkpoint(ck: dict[str, Any], overrides: list[str] | None = None,
                          device: str | torch.device = "cpu") -> Experiment:
    """Rebuild the experiment of a checkpoint written by ``bsam train``/``bsam bench`` and load
    its weights (``overrides``: e.g. ``data.root=/elsewhere``)."""
    spec = (ck.get("meta") or {}).get("spec")
    if not spec:
        raise ValueError("this checkpoint carries no experiment spec (meta.spec): it was not "
                         "written by bsam train or bsam bench")
    spec = apply_overrides(spec, overrides or [])
    exp = build_experiment(spec, bins=LabelBins.from_dict(ck["bins"]))
    exp.model.load_state_dict(ck["model"])
    exp.model.to(device).eval()
    if ck.get("target_stats") is not None:
        exp.target_stats = tuple(ck["target_stats"])
    return exp
