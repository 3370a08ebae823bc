"""The one list of datasets that ``bench``, ``train``, ``eval``, ``analyze``, ``data prepare`` and
``bsam list`` read.

Every dataset is a :class:`DatasetEntry` with one protocol:

* ``name`` and ``description`` (for the CLI and the results);
* ``load(options, bins_spec, stored_bins) -> Loaded``: the splits, the training-label bins and
  ``info`` (which lists the files it read and the split's parameters: the fingerprint);
* ``recipe``: the default training (``TrainConfig`` fields), rho per method and the model spec;
* the model factory: :func:`build_model` builds ``recipe.model`` (or the config's ``model``
  section) for the loaded data;
* ``unit`` of the targets and ``kind`` (``table``, ``image``, ``dense``); ``options`` lists
  what the loader accepts (a ``data.KEY`` it does not know is an error, not ignored).

:func:`load_data` turns a config's ``data`` section into :class:`DataSplits`: the splits plus
everything a run needs from the data: bins with region thresholds, target scaling, the bMAE
balance, the fingerprint and the recipe. A new dataset plugs in with one :func:`register` call;
a method's rho for a dataset lives in that dataset's recipe (data modules name no method).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from balanced_sam.bins import LabelBins
from balanced_sam.data.base import BenchData, file_digest
from balanced_sam.data.folder_images import OPTIONS as IMAGE_OPTIONS
from balanced_sam.data.recipes import (
    DIAMONDS_RECIPE,
    IMAGE_BENCH_RECIPE,
    IMAGES_RECIPE,
    NYUD2_RECIPE,
    ROTATED_RECIPE,
    TABLE_RECIPE,
    Recipe,
    age_recipe,
)
from balanced_sam.data.scaling import TargetScaler
from balanced_sam.errors import ConfigError
from balanced_sam.metrics import balance_of

__all__ = ["Recipe", "DatasetEntry", "Loaded", "DataSplits", "REGISTRY", "register",
           "table_loader", "get_entry", "dataset_names", "load_data", "build_model",
           "MODEL_NAMES", "fingerprint", "DEFAULT_BENCH_DATASET", "IMAGE_BENCH_RECIPE",
           "default_bench_dataset"]


@dataclass
class Loaded:
    """What a loader hands the registry."""

    train: Any
    val: Any
    test: Any
    bins: LabelBins
    info: dict[str, Any]
    standardize: bool = False
    tables: BenchData | None = None
    recipe: Recipe | None = None  # this load's recipe (its options chose it), else the entry's


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the registry (see the module docstring)."""

    name: str
    load: Callable[[dict[str, Any], Mapping[str, Any] | None, LabelBins | None], Loaded]
    recipe: Recipe
    unit: str
    description: str
    kind: str = "table"  # table | image | dense
    options: tuple[str, ...] | None = None  # None: any
    needs_root: bool = False  # read from data.root (the paper benchmarks)
    prepare: bool = False  # `bsam data prepare NAME` knows it

    def check_options(self, options: Mapping[str, Any]) -> None:
        if self.options is None:
            return
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ConfigError(f"data.{unknown[0]} is not an option of dataset {self.name!r}; "
                              f"it takes: {', '.join(self.options) or 'no options'}")


REGISTRY: dict[str, DatasetEntry] = {}


KINDS = ("table", "image", "dense")


def register(entry: DatasetEntry) -> DatasetEntry:
    """Add a dataset: a new name (lower case, ``-`` between words) of a known kind."""
    if entry.name != _canonical(entry.name) or entry.name in REGISTRY:
        raise ValueError(f"dataset {entry.name!r}: a name must be new and spelled "
                         f"{_canonical(entry.name)!r} (registered: {', '.join(REGISTRY)})")
    if entry.kind not in KINDS:
        raise ValueError(f"dataset {entry.name!r}: kind must be one of {KINDS}, got "
                         f"{entry.kind!r}")
    entry.check_options(entry.recipe.data)  # the recipe's data variant must be a valid one
    return REGISTRY.setdefault(entry.name, entry)


def _canonical(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def get_entry(name: str) -> DatasetEntry:
    key = _canonical(name)
    if key not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[key]


def default_bench_dataset() -> str:
    """The dataset ``bsam bench`` runs when none is named (:data:`DEFAULT_BENCH_DATASET`)."""
    return DEFAULT_BENCH_DATASET


def dataset_names(kind: str | None = None, *, prepare: bool | None = None) -> list[str]:
    """Registered names, optionally only of one ``kind`` / only those ``data prepare`` knows."""
    return [n for n, e in REGISTRY.items()
            if (kind is None or e.kind == kind) and (prepare is None or e.prepare == prepare)]


# ---------------------------------------------------------------------------- loaded data
@dataclass
class DataSplits:
    """A dataset ready for a run: splits, bins, scaling, balance, fingerprint and recipe."""

    entry: DatasetEntry
    name: str
    train: Any
    val: Any
    test: Any
    bins: LabelBins
    target_scaler: TargetScaler
    balance: str
    info: dict[str, Any]
    fingerprint: dict[str, Any]
    recipe: Recipe
    tables: BenchData | None = None

    @property
    def unit(self) -> str:
        return self.entry.unit if self.tables is None else (self.tables.target_unit
                                                            or self.entry.unit)

    @property
    def dense(self) -> bool:
        return self.entry.kind == "dense"

    def split(self, name: str) -> Any:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {name!r}")
        data = getattr(self, name)
        if data is None:
            raise ValueError(f"dataset {self.name!r} has no {name} split")
        return data

    def labels(self, name: str) -> torch.Tensor | None:
        """The per-sample labels of a split (``None`` for dense targets)."""
        data = self.split(name)
        if isinstance(data, (tuple, list)):
            return data[1]
        targets = getattr(data, "targets", None)
        return None if targets is None else torch.as_tensor(targets).float()

    def take(self, name: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of some samples of a split."""
        data = self.split(name)
        if isinstance(data, (tuple, list)):
            return data[0][index], data[1][index]
        items = [data[int(i)] for i in index]
        return (torch.stack([it[0] for it in items]),
                torch.stack([torch.as_tensor(it[1]) for it in items]).float())

    def make_model(self, spec: Mapping[str, Any] | None = None) -> nn.Module:
        """A fresh model: ``spec`` (a config's ``model`` section) or the recipe's."""
        return build_model(self, spec)


def load_data(data: Mapping[str, Any], *, bins: Mapping[str, Any] | None = None,
              stored_bins: LabelBins | Mapping[str, Any] | None = None,
              many: int | None = None, few: int | None = None) -> DataSplits:
    """Load the dataset a config's ``data`` section names (``{"name": ..., options}``).

    ``bins``: a config's ``bins`` section (``LabelBins.from_labels`` keywords) instead of the
    dataset's; ``stored_bins``: the bins of a checkpoint (not recomputed); ``many`` / ``few``:
    region thresholds (else those of the stored bins, else 100 / 20).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"data: expected a mapping with the dataset's name, got {data!r}")
    if bins is not None:
        check_bins_section(bins)
    options = dict(data)
    if "name" not in options:
        raise ConfigError("data.name is missing: name a dataset (" + ", ".join(REGISTRY) + ")")
    entry = get_entry(options.pop("name"))
    entry.check_options(options)
    options = {**entry.recipe.data, **options}  # the recipe's variant of the data, unless told
    if isinstance(stored_bins, Mapping):
        stored = LabelBins.from_dict(dict(stored_bins))
        stored.set_thresholds(stored_bins.get("many"), stored_bins.get("few"))
        stored_bins = stored
    loaded = entry.load(options, bins, stored_bins)
    loaded.bins.set_thresholds(many, few)
    tables = loaded.tables
    labels = loaded.train[1] if isinstance(loaded.train, (tuple, list)) else getattr(
        loaded.train, "targets", None)
    scaler = TargetScaler.fit(labels) if loaded.standardize else TargetScaler()
    return DataSplits(entry, tables.name if tables is not None else entry.name, loaded.train,
                      loaded.val, loaded.test, loaded.bins, scaler,
                      balance_of(labels, loaded.bins), loaded.info,
                      fingerprint(loaded.info), loaded.recipe or entry.recipe, tables)


#: a config's ``bins`` keys (``LabelBins.from_labels`` keywords) and what each takes
BINS_KEYS: dict[str, str] = {
    "bin_width": "number", "edges": "numbers", "lower": "number", "upper": "number",
    "num_bins": "integer", "clamp": "bool", "share_weight_below": "integer",
    "max_bins": "integer", "many": "number", "few": "number"}


def check_bins_section(bins: Any, section: str = "bins") -> None:
    """A config's ``bins`` section: known keys (a close one suggested) and a value of the
    right kind for each (finite numbers; ``null`` leaves a key to the labels)."""
    if not isinstance(bins, Mapping):
        raise ConfigError(f"{section}: expected a mapping of LabelBins options, got {bins!r}")
    for key, value in bins.items():
        if key not in BINS_KEYS:
            close = difflib.get_close_matches(str(key), list(BINS_KEYS), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r} in {section}{hint}; it takes: "
                              f"{', '.join(BINS_KEYS)}")
        if value is None:
            continue
        kind = BINS_KEYS[key]
        ok = {"number": _finite, "integer": lambda v: isinstance(v, int)
              and not isinstance(v, bool), "bool": lambda v: isinstance(v, bool),
              "numbers": lambda v: isinstance(v, (list, tuple)) and all(map(_finite, v))}[kind]
        if not ok(value):
            want = {"number": "a finite number", "integer": "an integer", "bool": "true or false",
                    "numbers": "a list of finite numbers"}[kind]
            raise ConfigError(f"{section}.{key}: expected {want}, got {value!r} "
                              f"({type(value).__name__})")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fingerprint(info: Mapping[str, Any]) -> dict[str, Any]:
    """``{"digest", "files", "params"}``: the SHA-256 of the data files' digests and the split
    parameters, as a loader listed them in ``info["files"]`` / ``info["split_params"]``."""
    files = dict(info.get("files") or {})
    params = dict(info.get("split_params") or {})
    blob = json.dumps({"files": files, "params": params}, sort_keys=True, default=str)
    return {"digest": hashlib.sha256(blob.encode()).hexdigest(), "files": files,
            "params": params}


# ---------------------------------------------------------------------------- models
#: the model names :func:`build_model` knows
MODEL_NAMES = ("mlp", "small-cnn", "resnet18", "resnet34", "resnet50", "depth-resnet18",
               "depth-resnet34", "depth-resnet50")


def build_model(data: DataSplits | BenchData | None, spec: Mapping[str, Any] | None = None
                ) -> nn.Module:
    """The model factory: a fresh regressor from ``spec`` (``{"name": ..., **kwargs}``), or from
    the dataset's recipe when ``spec`` names none. An MLP gets ``in_features`` from the data."""
    tables = data.tables if isinstance(data, DataSplits) else data
    spec = dict(spec or {})
    if "name" not in spec:
        recipe = data.recipe.model if isinstance(data, DataSplits) else {}
        spec = {**recipe, **spec}
    if "name" not in spec:
        raise ConfigError("model.name is needed for this dataset (one of "
                          f"{', '.join(MODEL_NAMES)})")
    from balanced_sam import models

    name = _canonical(spec.pop("name"))
    if name == "mlp":
        if tables is not None:
            spec.setdefault("in_features", int(tables.x_train.shape[1]))
        return _construct(models.MLP, name, spec)
    if name == "small-cnn":
        if tables is not None:  # the images' size and channels, unless the spec says
            spec.setdefault("input_size", int(tables.x_train.shape[-1]))
            spec.setdefault("in_channels", int(tables.x_train.shape[1]))
        return _construct(models.SmallCNN, name, spec)
    if name in ("resnet18", "resnet34", "resnet50"):
        return _construct(models.ResNetRegressor, name, spec, arch=name)
    if name.startswith("depth-") and name[6:] in ("resnet18", "resnet34", "resnet50"):
        return _construct(models.DepthResNet, name, spec, encoder=name[6:])
    raise ConfigError(f"model.name {name!r} is not known; choose one of {', '.join(MODEL_NAMES)}")


def _construct(cls: type[nn.Module], name: str, spec: dict[str, Any], **fixed: Any) -> nn.Module:
    """``cls(**fixed, **spec)``; a key the model does not take, or a value it refuses, is a
    :class:`ConfigError` that names the ``model`` section."""
    import inspect

    params = inspect.signature(cls).parameters
    takes = [p for p in params if p not in fixed and params[p].kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in spec:
            if key not in takes:
                close = difflib.get_close_matches(str(key), takes, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown key {key!r} in model ({name}){hint}; it takes: "
                                  f"{', '.join(takes)}")
    try:
        return cls(**fixed, **spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model ({name}): {exc}") from exc


# ---------------------------------------------------------------------------- loaders
def table_loader(load: Callable[..., BenchData]) -> Callable[..., Loaded]:
    """A registry loader (``DatasetEntry.load``) from a function returning :class:`BenchData`
    (called with the config's data options); the bins come from ``BenchData.bins`` unless a
    config's ``bins`` section or a checkpoint's stored bins are given."""

    def loader(options: dict[str, Any], bins_spec: Mapping[str, Any] | None,
               stored: LabelBins | None) -> Loaded:
        bd = load(**options)
        bins = stored if stored is not None else LabelBins.from_labels(
            bd.y_train, **(bins_spec or bd.bins))
        return Loaded((bd.x_train, bd.y_train), (bd.x_val, bd.y_val), (bd.x_test, bd.y_test),
                      bins, bd.info, bd.standardize_target, bd)

    return loader


def _load_diamonds(**options: Any) -> BenchData:
    from balanced_sam.data import diamonds

    return diamonds.load(**options)


def _load_csv(**options: Any) -> BenchData:
    from balanced_sam.data.tabular import load_table

    path, target = options.pop("path", None), options.pop("target", None)
    if path is None or target is None:
        raise ConfigError("the csv dataset needs a file and its target column (data.path and "
                          "data.target; on bsam bench: --csv FILE --target COL)")
    import pandas as pd

    _check_kind("data.path", path, "a file path", lambda v: isinstance(v, (str, os.PathLike,
                                                                          pd.DataFrame)))
    _check_kind("data.target", target, "a column name", lambda v: isinstance(v, str))
    for key in ("features", "categorical"):
        if options.get(key) is not None:
            _check_kind(f"data.{key}", options[key], "a list of column names", lambda v: (
                isinstance(v, str) or isinstance(v, (list, tuple))
                and all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in v)))
    if "split_seed" in options:
        options["seed"] = options.pop("split_seed")
    return load_table(path, target, **options)


def _check_kind(key: str, value: Any, want: str, ok: Callable[[Any], bool]) -> None:
    if not ok(value):
        raise ConfigError(f"{key}: expected {want}, got {value!r} ({type(value).__name__})")


def _rotated(kind: str) -> Callable[..., BenchData]:
    def load(**options: Any) -> BenchData:
        from balanced_sam.data import rotated_mnist

        fn = rotated_mnist.load if kind == "mnist" else rotated_mnist.load_fashion
        return fn(**options)

    return load


def _paper(module_name: str, default_bins: Mapping[str, Any] | None,
           csv_names: Callable[[Path, dict[str, Any]], list[Path]]) -> Callable[..., Loaded]:
    """A registry loader for the image benchmarks read from ``data.root``."""

    def loader(options: dict[str, Any], bins_spec: Mapping[str, Any] | None,
               stored: LabelBins | None) -> Loaded:
        module = importlib.import_module(module_name)
        opts = dict(options)
        root = opts.pop("root", None)
        if root is None:
            name = module_name.rsplit(".", 1)[1].replace("_", "-")
            raise ConfigError(f"data.root is needed for {name}: the folder that "
                              f"`bsam data prepare {name} --root DIR` set up")
        splits = module.build_splits(root, **opts)
        if stored is not None:
            bins = stored
        elif default_bins is None:  # dense targets: pixel counts per depth bin
            bins = module.dir_bins(root, **{k: v for k, v in opts.items() if k == "img_size"})
        else:
            bins = LabelBins.from_labels(splits["train"].targets, **(bins_spec or default_bins))
        files = {p.name: file_digest(p) for p in csv_names(Path(root), opts) if p.is_file()}
        params = {k: v for k, v in opts.items() if k in ("img_size", "csv", "train_csv",
                                                         "test_csv", "mask_file")}
        info = {"root": str(Path(root).resolve()), "files": files, "split_params": params,
                "sizes": {k: (len(v) if v is not None else 0) for k, v in splits.items()}}
        return Loaded(splits["train"], splits.get("val"), splits["test"], bins, info)

    return loader


def _age_csv(default: str) -> Callable[[Path, dict[str, Any]], list[Path]]:
    return lambda root, o: [Path(o["csv"]) if o.get("csv") else root / default]


def _nyud2_files(root: Path, o: dict[str, Any]) -> list[Path]:
    from balanced_sam.data import nyud2

    return [root / o.get("train_csv", nyud2.TRAIN_CSV), root / o.get("test_csv", nyud2.TEST_CSV),
            root / o.get("mask_file", nyud2.MASK_FILE)]


def _load_images(options: dict[str, Any], bins_spec: Mapping[str, Any] | None,
                 stored: LabelBins | None) -> Loaded:
    from balanced_sam.data import folder_recipe

    data, bins, model = folder_recipe.load(options, bins_spec, stored)
    return Loaded(data.train, data.val, data.test, bins, data.info, standardize=True,
                  recipe=replace(IMAGES_RECIPE, model=model))


#: what ``bsam bench`` runs without ``--dataset`` / ``--csv``; ``--dataset diamonds`` is the
#: tabular regime, one option away.
DEFAULT_BENCH_DATASET = "rotated-fashion-mnist"

_TABLE_SPLIT = ("bin_width", "cap", "train_fraction", "split_seed")
_ROTATED = ("data_root", "split_seed", "seed", "cap", "n_train", "val_per_bin", "test_per_bin",
            "bin_width", "tau", "classes", "download", "image_size")
_AGE = ("root", "img_size", "cache", "csv", "verify", "augment")

for _entry in (
    DatasetEntry("diamonds", table_loader(_load_diamonds), DIAMONDS_RECIPE, "$",
                 "diamond prices (plotnine's table, no download); the tabular regime",
                 options=(*_TABLE_SPLIT, "seed")),
    DatasetEntry("rotated-mnist", table_loader(_rotated("mnist")), ROTATED_RECIPE, "deg",
                 "MNIST digits rotated by long-tailed angles; target: the angle", "image",
                 options=_ROTATED),
    DatasetEntry("rotated-fashion-mnist", table_loader(_rotated("fashion")), IMAGE_BENCH_RECIPE,
                 "deg",
                 "Fashion-MNIST rotated by long-tailed angles; target: the angle", "image",
                 options=_ROTATED),
    DatasetEntry("csv", table_loader(_load_csv), TABLE_RECIPE, "",
                 "any CSV table (--csv FILE --target COL)",
                 options=("path", "target", *_TABLE_SPLIT, "dropna", "impute", "features",
                          "categorical", "max_categories", "max_features", "lower",
                          "min_per_bin", "target_unit", "name")),
    DatasetEntry("images", _load_images, IMAGES_RECIPE, "",
                 "your own images: a CSV of image paths and a continuous target "
                 "(--images FILE --target COL)", "image", options=IMAGE_OPTIONS),
    DatasetEntry("agedb", _paper("balanced_sam.data.agedb", {"bin_width": 1, "lower": 0,
                                                              "upper": 121},
                                 _age_csv("agedb.csv")),
                 age_recipe(0.2), "years", "AgeDB-DIR: age from a face (12,208 training images)",
                 "image", options=_AGE, needs_root=True, prepare=True),
    DatasetEntry("imdb-wiki", _paper("balanced_sam.data.imdb_wiki", {"bin_width": 1, "lower": 0,
                                                                      "upper": 121},
                                     _age_csv("imdb_wiki.csv")),
                 age_recipe(0.05), "years",
                 "IMDB-WIKI-DIR: age from a face (191,509 training images)", "image",
                 options=_AGE, needs_root=True, prepare=True),
    DatasetEntry("nyud2", _paper("balanced_sam.data.nyud2", None, _nyud2_files), NYUD2_RECIPE,
                 "m", "NYUD2-DIR: depth per pixel (50,688 training pairs)", "dense",
                 options=("root", "img_size", "cache", "verify", "train_csv", "test_csv",
                          "mask_file", "augment"), needs_root=True, prepare=True),
):
    register(_entry)
