"""The run API: every ``bsam`` command is a thin parser over one of these calls, which work the
same from Python or a notebook.

* :func:`run_training` (``bsam train``): a config -> a trained run in a folder;
* :func:`evaluate_checkpoint` (``bsam eval``): a checkpoint -> its metrics on a split;
* :func:`analyze_checkpoints` (``bsam analyze``): checkpoints -> sharpness per region and loss
  landscapes (Table 8, Figure 1);
* :func:`balanced_sam.bench.run_bench` (``bsam bench``): methods x seeds -> a results table.

A config has four sections::

    data:  {name: agedb, root: data/agedb, img_size: 224, cache: false}   # or diamonds, csv...
    model: {name: resnet18}                                               # default: the recipe's
    bins:  {bin_width: 1, lower: 0, upper: 121}                           # default: the dataset's
    train: {method: bsam, lr: 0.2, rho: 0.2, epochs: 400, ...}            # TrainConfig fields
    out: runs/agedb_bsam

``data.name`` is any dataset of :mod:`balanced_sam.data.registry` (``bsam list``); the other
``data`` keys are that dataset's options. Missing ``train`` keys come from the dataset's recipe
(rho from its choice for the method). The spec is stored in every checkpoint, so ``bsam eval``
and ``bsam analyze`` rebuild the model and the data from the checkpoint alone, and refuse data
whose fingerprint differs from the one it was trained on (unless told to allow it).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from balanced_sam.analysis.hessian import DEFAULT_SOLVER
from balanced_sam.analysis.report import file_stem
from balanced_sam.bins import LabelBins, check_region
from balanced_sam.config import TrainConfig
from balanced_sam.data.registry import REGISTRY, DataSplits, dataset_names, load_data
from balanced_sam.data.scaling import TargetScaler
from balanced_sam.errors import ConfigError, spell
from balanced_sam.io import write_json, write_text
from balanced_sam.losses import get_loss
from balanced_sam.methods import rho_for
from balanced_sam.outputs import output_path
from balanced_sam.train import (
    FitResult,
    evaluate,
    fit,
    init_distributed,
    load_checkpoint,
    load_weights,
    resolve_device,
    seed_everything,
)

__all__ = ["Experiment", "build_experiment", "load_config", "apply_overrides", "run_training",
           "evaluate_checkpoint", "Evaluation", "load_experiment",
           "analyze_checkpoints", "train_config", "DIR_BENCHMARKS"]

#: the paper's benchmarks (read from ``data.root``): name -> registry entry
DIR_BENCHMARKS = {n: REGISTRY[n] for n in dataset_names(prepare=True)}
SECTIONS = ("data", "model", "bins", "train", "out", "paper")


@dataclass
class Experiment:
    """The data, the model and the training config of one run."""

    data: DataSplits
    model: nn.Module
    cfg: TrainConfig
    spec: dict[str, Any]

    train = property(lambda self: self.data.train)
    val = property(lambda self: self.data.val)
    test = property(lambda self: self.data.test)
    bins = property(lambda self: self.data.bins)
    depth = property(lambda self: self.data.dense)
    target_unit = property(lambda self: self.data.unit)

    @property
    def target_scaler(self) -> TargetScaler:
        """The training targets' standardiser (the identity when the data are not scaled)."""
        return self.data.target_scaler


# ---------------------------------------------------------------------------- configs
def _yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, except that a mapping that names a key twice is an error
    (PyYAML keeps the last silently: a second ``train:`` section would replace the first)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                first: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    try:
                        mark = first.setdefault(key, key_node.start_mark)
                    except TypeError:  # an unhashable key: PyYAML's own error follows
                        continue
                    if mark is not key_node.start_mark:
                        raise ConfigError(
                            f"{source}: duplicate key {key!r} (line "
                            f"{key_node.start_mark.line + 1}; first on line {mark.line + 1}); "
                            "give each key once")
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeys)  # noqa: S506 (a SafeLoader)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config: a file, or the name of a config shipped with the package (``bsam
    configs`` lists them); clear errors for a missing file, a file that is not UTF-8 text, bad
    YAML and a key given twice."""
    import yaml

    from balanced_sam.configs import config_path

    p = config_path(path)  # a file that exists, else a config shipped with the package
    try:
        spec = _yaml(p.read_text(encoding="utf-8"), f"config {p}")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {p} is not UTF-8 text (byte {exc.start}); a config is a "
                          "YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {p} is not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise ConfigError(f"config {p} must be a mapping with sections data/model/bins/train")
    return spec


def apply_overrides(spec: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML: ``2``, ``0.1``, ``true``,
    ``[1, 2]``); a key without a section goes to ``train``."""
    import yaml

    spec = copy.deepcopy(spec)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=2)")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        if len(path) == 1 and path[0] != "out":
            path = ["train", path[0]]
        node = spec
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[path[-1]] = _yaml(raw, f"override {item!r}") if raw != "" else None
        except yaml.YAMLError:
            node[path[-1]] = raw  # not YAML: the text itself (the type check judges it)
    return spec


def _check_sections(spec: Mapping[str, Any]) -> None:
    unknown = set(spec) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; use data, model, bins, "
                          "train, out (and paper for notes)")
    for section in ("data", "model", "bins", "train"):
        if spec.get(section) is not None and not isinstance(spec[section], Mapping):
            raise ConfigError(f"config section {section} must be a mapping, got "
                              f"{spec[section]!r}")
    if "data" not in spec or "name" not in (spec.get("data") or {}):
        raise ConfigError(f"config needs data.name ({', '.join(REGISTRY)})")


def train_config(data: DataSplits, train: Mapping[str, Any] | None = None,
                 model: Mapping[str, Any] | None = None) -> TrainConfig:
    """The ``TrainConfig`` of ``data``'s recipe changed by ``train`` (a config's section): a
    ``train`` that names a method and no rho gets the recipe's rho for that method; plug-in
    options (``plugins``) change the recipe's key by key; ``balance: auto`` becomes the
    data's. A model (``model``, a config's section, else the recipe's) that starts from
    ``pretrained`` weights trains with the recipe's ``finetune`` values under ``train``."""
    train = dict(train or {})
    spec = dict(model or {}) if (model or {}).get("name") else {**data.recipe.model,
                                                                **(model or {})}
    tune = data.recipe.finetune if spec.get("pretrained") else {}
    values = {**data.recipe.train, **tune, **train}
    if "plugins" in train and data.recipe.train.get("plugins"):  # per plug-in, key by key
        mine, recipe = train["plugins"] or {}, data.recipe.train["plugins"]
        if isinstance(mine, dict):  # (a value that is not a mapping: the check names it)
            values["plugins"] = {p: {**(recipe.get(p) or {}), **(mine.get(p) or {})}
                                 if isinstance(mine.get(p) or {}, Mapping) else mine[p]
                                 for p in dict.fromkeys([*recipe, *mine])}
    # a composed or interval method (ranksim+bsam, bsam-i5) takes its optimizer part's rho
    rho = rho_for(train["method"], data.recipe.rho_by_method) if "method" in train else None
    if "rho" not in train and rho is not None:
        values["rho"] = rho
    cfg = TrainConfig.from_dict(values)
    if cfg.balance == "auto":
        cfg.balance = data.balance
    return cfg


def build_experiment(spec: Mapping[str, Any], *, bins: LabelBins | Mapping[str, Any] | None = None
                     ) -> Experiment:
    """Data, model and config from ``spec``; ``bins`` (e.g. a checkpoint's) are used instead of
    being computed from the training labels."""
    _check_sections(spec)
    train = dict(spec.get("train") or {})
    data = load_data(spec["data"], bins=spec.get("bins"), stored_bins=bins,
                     many=train.get("many"), few=train.get("few"))
    cfg = train_config(data, train, spec.get("model"))
    seed_everything(cfg.seed)  # the initial weights of seed s: the same as in bsam bench
    model = data.make_model(spec.get("model"))
    return Experiment(data, model, cfg, dict(spec))


# ---------------------------------------------------------------------------- train
def run_training(spec: Mapping[str, Any], *, out: str | Path | None = None,
                 resume: bool = False, overwrite: bool = False,
                 allow_data_change: bool = False, log: Callable[[str], None] = print,
                 loggers: Sequence[Any] = (), trust_checkpoint: bool = False) -> FitResult:
    """Train the run ``spec`` describes into ``out`` (default: the spec's ``out``, else
    ``runs/run``); writes ``last.pt``, ``best.pt``, ``log.csv`` and ``result.json`` there.
    ``trust_checkpoint``: resume from a ``last.pt`` that needs full unpickling (see
    :func:`~balanced_sam.outputs.load_checkpoint`; only for a file you trust).
    Under ``torchrun`` every process calls it; rank 0 writes and logs."""
    distributed = init_distributed()
    rank = torch.distributed.get_rank() if distributed else 0
    folder = Path(out or spec.get("out") or Path("runs") / "run")
    exp = build_experiment(spec)
    if rank == 0:
        log(f"{exp.cfg.method} on {exp.data.name}: {exp.bins}")
        if exp.data.info.get("summary"):
            log(str(exp.data.info["summary"]))
    res = fit(exp.model, exp.train, exp.val, exp.bins, exp.cfg, test_data=exp.test,
              out_dir=folder, resume=resume, overwrite=overwrite, target_scaler=exp.target_scaler,
              depth=exp.depth, meta={"spec": dict(spec), "data": exp.data.fingerprint},
              data_fingerprint=exp.data.fingerprint["digest"],
              allow_data_change=allow_data_change, loggers=loggers,
              trust_checkpoint=trust_checkpoint, log=log if rank == 0 else (lambda s: None))
    if rank == 0:
        write_json({"best_epoch": res.best_epoch, "val": res.val, "test": res.test,
                    "test_per_bin": res.test_per_bin, "train_seconds": res.train_seconds,
                    "skipped_steps": res.skipped_steps, "layout": res.layout,
                    "config": res.config or exp.cfg.to_dict(), "balance": exp.cfg.balance,
                    "data_fingerprint": exp.data.fingerprint},
                   output_path(folder / "result.json"))
    return res


# ---------------------------------------------------------------------------- eval
@dataclass
class Evaluation:
    """What :func:`evaluate_checkpoint` returns."""

    report: dict[str, dict[str, float]]
    method: str
    epoch: int
    split: str
    depth: bool
    checkpoint: str


def load_experiment(checkpoint: str | Path | Mapping[str, Any], overrides: Sequence[str] = (),
                    device: str | torch.device = "cpu", *,
                    allow_data_change: bool = False, source: str | None = None,
                    trust: bool = False) -> Experiment:
    """Rebuild the experiment of a checkpoint written by ``bsam train`` / ``bsam bench`` and load
    its weights (``overrides``: e.g. ``data.root=/elsewhere``). Data whose fingerprint differs
    from the checkpoint's are refused unless ``allow_data_change``. The file is read as data
    (``weights_only``); ``trust=True`` unpickles one that needs more, for a file you trust
    (:func:`~balanced_sam.outputs.load_checkpoint`)."""
    if source is None:
        source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "the checkpoint"
    ck = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint,
                                                                            trust=trust)
    spec = (ck.get("meta") or {}).get("spec")
    if not spec:
        raise ValueError(f"{source} carries no experiment spec (meta.spec): it was not written "
                         "by bsam train or bsam bench")
    exp = build_experiment(apply_overrides(spec, overrides), bins=ck["bins"])
    saved, now = ck.get("data_fingerprint"), exp.data.fingerprint["digest"]
    if saved is not None and saved != now and not allow_data_change:
        raise ValueError(
            f"{source} was trained on other data (fingerprint {saved[:12]}, the data now give "
            f"{now[:12]}: the table or split file, or a split parameter, changed). Evaluate on "
            f"the data it was trained on, or pass {spell('allow_data_change')} to score it on "
            "the new data anyway")
    load_weights(exp.model, ck["model"], source)
    exp.model.to(device).eval()
    # checkpoints hold ``target_scaler`` ({"mean", "std"}); those written before it hold only
    # ``target_stats`` ((mean, std), or None for unscaled targets): the one old form still read
    stored = ck.get("target_scaler") or ck.get("target_stats")
    if stored is not None:
        exp.data.target_scaler = TargetScaler.from_stats(stored)
    if ck.get("config", {}).get("balance") in ("label", "bin"):
        exp.cfg.balance = ck["config"]["balance"]
    return exp


def evaluate_checkpoint(checkpoint: str | Path, *, split: str = "test",
                        overrides: Sequence[str] = (), device: str = "auto",
                        allow_data_change: bool = False, trust: bool = False) -> Evaluation:
    """The metrics of a checkpoint on a split of the data it was trained on (``trust``: see
    :func:`load_experiment`)."""
    dev = resolve_device(device)
    ck = load_checkpoint(checkpoint, trust=trust)
    exp = load_experiment(ck, overrides, dev, allow_data_change=allow_data_change,
                          source=str(checkpoint))
    rep = evaluate(exp.model, exp.data.split(split), exp.bins, device=dev,
                   target_scaler=exp.target_scaler, depth=exp.depth, balance=exp.cfg.balance,
                   batch_size=exp.cfg.eval_batch_size,  # on CUDA in the training's precision
                   amp=exp.cfg.amp if dev.type == "cuda" else "none")
    return Evaluation(rep, str(ck.get("config", {}).get("method", "?")),
                      int(ck.get("epoch", -1)) + 1, split, exp.depth, str(checkpoint))


# ---------------------------------------------------------------------------- analyze
def analyze_checkpoints(
    checkpoints: Mapping[str, str | Path] | Sequence[str | Path | tuple[str, str | Path]],
    *,
    regions: Sequence[str] = ("all", "few"),
    split: str = "train",
    samples: int = 1000,
    hessian: bool = True,
    landscape: bool = True,
    iters: int = 30,
    solver: str = DEFAULT_SOLVER,
    probes: int = 30,
    tol: float = 1e-3,
    grid: int = 21,
    span: float = 1.0,
    dim: int = 1,
    seed: int = 0,
    cache_graph: bool = False,
    device: str = "auto",
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    allow_data_change: bool = False,
    trust: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Table 8 (Hessian top eigenvalue and trace of the training loss per region) and Figure 1
    (loss landscapes along the same filter-normalised directions) for checkpoints.

    ``checkpoints``: paths, ``(name, path)`` pairs or a ``{name: path}`` mapping (a row is
    named after its method when no name is given). For every region at most ``samples``
    samples of ``split`` are drawn (seeded; ``all`` keeps the split's label mix). The loss is
    the one the model was trained with, in its training units. Writes ``analysis.json``,
    ``sharpness_table.md``, one ``<name>_landscape.npz`` per checkpoint and ``landscapes.png``
    into ``out`` (default: beside the first checkpoint); returns ``{name: {"regions": {region:
    {...}}, "checkpoint", "split", "method"}}``. ``trust``: see :func:`load_experiment`.
    """
    items = _named(checkpoints)
    _check_analysis(regions, samples)
    dev = resolve_device(device)
    folder = Path(out) if out is not None else Path(items[0][1]).parent / "analysis"
    folder.mkdir(parents=True, exist_ok=True)
    settings = dict(iters=iters, solver=solver, probes=probes, tol=tol, grid=grid, span=span,
                    landscape_dim=dim, seed=seed, cache_graph=cache_graph, hessian=hessian,
                    landscape=landscape)
    results: dict[str, Any] = {}
    landscapes: dict[str, Any] = {}
    for name, path in items:
        exp = load_experiment(path, overrides, dev, allow_data_change=allow_data_change,
                              trust=trust)
        name = _unique(name or exp.cfg.method, results, path)
        log(f"{name}: {path} ({split} split)")
        results[name], merged = _analyze_one(exp, name, split, regions, samples, settings, log)
        results[name]["checkpoint"] = str(path)
        if merged is not None:
            landscapes[name] = merged
            merged.save_npz(folder / f"{file_stem(name)}_landscape.npz")
    _write_analysis(results, landscapes, folder, regions, split, samples, hessian, log)
    return results


def _named(checkpoints: Any) -> list[tuple[str, Path]]:
    if isinstance(checkpoints, Mapping):
        items = [(str(k), Path(v)) for k, v in checkpoints.items()]
    else:
        items = [(str(c[0]), Path(c[1])) if isinstance(c, tuple) else ("", Path(c))
                 for c in checkpoints]
    if not items:
        raise ValueError("checkpoints is empty: name at least one checkpoint")
    return items


def _check_analysis(regions: Sequence[str], samples: int) -> None:
    for region in regions:
        check_region(region)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")


def _unique(name: str, taken: Mapping[str, Any], path: Path) -> str:
    return f"{name} ({path.parent.name})" if name in taken else name


def _training_loss(name: str, target_scaler: TargetScaler
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-sample training loss, fed predictions and targets in label units."""
    if name == "bmse":
        raise ValueError("bsam analyze needs a per-sample loss; the batch form of Balanced MSE "
                         "couples the samples of a batch")
    elem = get_loss(name)

    def fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return elem(target_scaler.scale(pred), target_scaler.scale(target))

    fn.__name__ = f"training {name.upper()}"  # the plots' axis label
    return fn


def _region_sample(labels: torch.Tensor, bins: LabelBins, region: str, n: int, seed: int
                   ) -> torch.Tensor:
    """At most ``n`` indices of the samples of ``region`` (seeded, sorted)."""
    if region == "all":
        pool = torch.arange(len(labels))
    else:
        many, few = bins.thresholds()
        pool = torch.nonzero(bins.region_mask(labels, region, many, few, clamp=True)).reshape(-1)
    if len(pool) > n:
        g = torch.Generator().manual_seed(seed)
        pool = pool[torch.randperm(len(pool), generator=g)[:n]].sort().values
    return pool


def _analyze_one(exp: Experiment, name: str, split: str, regions: Sequence[str], samples: int,
                 settings: dict[str, Any], log: Callable[[str], None]) -> tuple[dict, Any]:
    """One checkpoint, region by region (each on its own samples); the regions' landscapes
    merged in memory."""
    from balanced_sam.analysis import Landscape, analyze_model

    if exp.depth:
        raise ValueError("bsam analyze does not support dense depth targets")
    labels = exp.data.labels(split)
    if labels is None:
        raise ValueError(f"{name}: the {split} split exposes no per-sample labels")
    model = exp.target_scaler.wrap(exp.model).eval()
    loss = _training_loss(exp.cfg.loss, exp.target_scaler)
    merged: dict[str, Any] = {"regions": {}, "split": split, "method": exp.cfg.method}
    parts: list[Landscape] = []
    for region in regions:
        idx = _region_sample(labels, exp.bins, region, samples, settings["seed"])
        if len(idx) == 0:
            log(f"  {region}: no sample in the {split} split")
            merged["regions"][region] = {"count": 0}
            continue
        x, y = exp.data.take(split, idx)
        res = analyze_model(model, x, y, exp.bins, loss, regions=(region,), out_dir=None,
                            progress=sys.stderr.isatty(), name=f"{name} [{region}]",
                            plots=False, **settings)
        merged["regions"][region] = r = res["regions"][region]
        if res.get("landscape"):
            parts.append(Landscape.from_dict(res["landscape"]["data"]))
        log(f"  {region}: n={r.get('count')}  lambda_max={_fmt(r.get('lambda_max'))}  "
            f"trace={_fmt(r.get('trace'))}")
    return merged, (_merge(parts, name) if parts else None)


def _merge(parts: list[Any], name: str) -> Any:
    """One landscape holding every region's curves (same grid and directions)."""
    from balanced_sam.analysis import Landscape

    first = parts[0]
    for p in parts[1:]:
        if not (torch.equal(torch.as_tensor(p.alphas), torch.as_tensor(first.alphas))
                and (p.betas is None) == (first.betas is None)):
            raise RuntimeError("landscape grids differ between regions")
    values, counts, origin = {}, {}, {}
    for p in parts:
        values.update(p.values)
        counts.update(p.counts)
        origin.update(p.origin)
    return Landscape(first.alphas, first.betas, values, counts, origin,
                     {**first.meta, "label": name})


def _write_analysis(results: dict[str, Any], landscapes: dict[str, Any], folder: Path,
                    regions: Sequence[str], split: str, samples: int, hessian: bool,
                    log: Callable[[str], None]) -> None:
    from balanced_sam.analysis import format_sharpness_table

    write_json(results, folder / "analysis.json")
    if hessian:
        table = format_sharpness_table(results, regions=list(regions))
        log(f"\nHessian of the training loss per region ({split} split, up to {samples} "
            f"samples per region; Table 8 style)")
        log(table)
        write_text(folder / "sharpness_table.md", table + "\n")
    if landscapes:
        from balanced_sam.analysis.plots import plot_region_comparison

        cols = [r for r in ("all", "few") if r in regions] or list(regions)
        fig = plot_region_comparison(landscapes, folder / "landscapes.png", regions=cols,
                                     metric="loss",
                                     title=f"Loss landscape ({split} split), all vs few")
        log(f"wrote {fig}")
    log(f"wrote {folder}/analysis.json")


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"
