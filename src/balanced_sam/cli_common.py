"""What every ``bsam`` command shares: how each calls an option in its messages, the optional
packages and their extras, the command texts, and the argument types."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["SPELLINGS", "EXTRAS", "ABOUT", "command", "number", "csv_list", "seeds",
           "train_overrides"]

#: what each command calls an option in its messages (see balanced_sam.errors.spell)
SPELLINGS: dict[str, dict[str, str]] = {
    "bench": {"dropna": "--dropna", "impute": "--impute median",
              "features": "--features COL,COL,...", "max_categories": "--max-categories N",
              "max_features": "--max-features N", "categorical": "--categorical COL",
              "bin_width": "--bin-width W", "train_fraction": "--train-fraction F",
              "cap": "--cap C", "target": "--target COL", "csv_path": "--csv FILE",
              "device": "--device cpu", "baseline": "--baseline M", "methods": "--methods",
              "plugins": "--set train.plugins.NAME.KEY=VALUE", "out": "--out",
              "overwrite": "--overwrite", "resume": "the same --out without --overwrite",
              "executor": "--executor", "devices": "--devices", "jobs": "--jobs",
              "gpus_per_run": "--gpus-per-run", "cpus_per_run": "--cpus-per-run",
              "retries": "--retries", "slurm_time": "--slurm-time",
              "slurm_cluster": "--slurm-cluster", "slurm_options": "--slurm-option",
              "images": "--images FILE", "root": "--root DIR", "path_col": "--path-col COL",
              "split_col": "--split-col COL", "img_size": "--img-size N",
              "pretrained": "--pretrained PATH", "allow_download": "--allow-download",
              "cache": "--cache DIR", "trust": "--trust-checkpoint"},
    "compare": {"baseline": "--baseline M"},
    "train": {"dropna": "data.dropna=true", "impute": "data.impute=median",
              "features": "data.features=[COL,...]", "max_categories": "data.max_categories=N",
              "max_features": "data.max_features=N", "categorical": "data.categorical=[COL]",
              "bin_width": "data.bin_width=W", "train_fraction": "data.train_fraction=F",
              "cap": "data.cap=C", "target": "data.target=COL", "csv_path": "data.path=FILE",
              "resume": "--resume", "overwrite": "--overwrite", "out_dir": "--out",
              "allow_data_change": "--allow-data-change", "device": "train.device=cpu",
              "trust": "--trust-checkpoint",
              "plugins": "train.plugins.NAME.KEY=VALUE", **{
                  "images": "data.path=FILE", "root": "data.root=DIR",
                  "path_col": "data.path_col=COL", "split_col": "data.split_col=COL",
                  "img_size": "data.img_size=N", "pretrained": "model.pretrained=PATH",
                  "allow_download": "model.allow_download=true", "cache": "data.cache=DIR"}},
    "eval": {"allow_data_change": "--allow-data-change", "device": "--device cpu",
             "trust": "--trust-checkpoint"},
    "analyze": {"allow_data_change": "--allow-data-change", "device": "--device cpu",
                "trust": "--trust-checkpoint"},
}
#: optional packages and the extra that installs them
EXTRAS = {"pandas": "cli", "matplotlib": "cli", "yaml": "cli", "tqdm": "cli",
           "plotnine": "diamonds", "PIL": "cli", "torchvision": "cli", "scipy": "cli",
           "wandb": "wandb", "torchmetrics": "torchmetrics", "lightning": "lightning",
           "accelerate": "accelerate", "ray": "ray", "submitit": "slurm"}


def number(text: str) -> float:
    """A float option's value: any number but NaN (``--tol nan`` would pass every check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r} (NaN is not allowed)")
    return value


def csv_list(kind: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(t) for t in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {exc}") from None

    return parse


def seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``0,5,7`` means those seeds (each once)."""
    if "," not in text:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--seeds takes a count or a list, got {text!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError("--seeds must be >= 1")
        return list(range(n))
    seeds = csv_list(int)(text)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"seed(s) {repeated} repeated in {text!r}: each seed "
                                         "is one run")
    return seeds


# ---------------------------------------------------------------------------- the parser
#: each command's one-line help and its description
ABOUT = {
    "bench": ("run the methods over seeds; a paper-style table and paired comparisons",
              "Train every method over several seeds on a benchmark (default: {default}; "
              "--dataset NAME or --csv FILE for others) and print the paper's Table-1-style "
              "results: MAE and GM for All / Many / Medium / Few, plus bMAE, as mean ± std over "
              "seeds, then every method against --baseline seed by seed (mean difference, 95% "
              "Student-t interval, wins), saying where an interval includes 0. Runs train "
              "--jobs at a time in worker processes, one CPU thread each (--threads), with the "
              "same figures for any --jobs. A run that diverges (NaN/inf predictions or metrics, "
              "steps skipped for a non-finite gradient, or test MAE above --diverge-factor times "
              "its method's median) is marked † and left out of the means and comparisons, and "
              "the bench goes on. Writes results.json, results.csv and plots "
              "(paired_differences.png among them) into --out, a new or empty folder or one a "
              "bench made. Re-running with the same --out reuses finished runs (and trains again "
              "those whose data changed); its results.json keeps every finished method, however "
              "few --methods name; --overwrite removes the earlier bench's files first. Ctrl-C "
              "stops cleanly and says how to resume."),
    "compare": ("paired comparisons of a finished bench, recomputed",
                "Read a bench's results.json, mark diverged runs and compare every method with "
                "--baseline seed by seed (mean difference, Student-t interval, wins); print "
                "the table and the comparisons. --write updates results.json, --plot redraws "
                "paired_differences.png beside it."),
    "train": ("train one model from a YAML config",
              "Train one model from a YAML config (sections data, model, bins, train, out): a file "
              "or the name of a shipped config (`bsam configs` lists them). Overrides: "
              "section.key=value, e.g. train.epochs=2 data.root=/data/agedb "
              "(a bare key goes to train). Writes last.pt every epoch, best.pt, log.csv and "
              "result.json into the output folder."),
    "eval": ("evaluate a checkpoint on its test (or val) split",
             "Rebuild model and data from a checkpoint written by bsam train or bsam bench and "
             "print its metrics per region."),
    "analyze": ("sharpness per label region: Hessian spectrum and loss landscapes",
                "Hessian top eigenvalue and trace per label region (Table 8) and loss landscapes "
                "along filter-normalised directions (Figure 1) of one or more checkpoints."),
    "data": ("prepare the paper's benchmark data", "Data tools for the paper's benchmarks."),
    "prepare": ("check / fetch / build a benchmark's files under --root",
                "Check what is under --root, fetch what is public (split CSVs, IMDB-WIKI tars, "
                "NYUD2-DIR data.zip) when online, verify checksums, build the IMDB-WIKI split or "
                "the NYUD2 balanced test mask when absent, and print exactly what is still "
                "missing and where to get it. Never deletes or overwrites your files."),
    "list": ("list methods and datasets", "List the methods and datasets bsam knows."),
}


def command(sub: Any, name: str, **fill: str) -> argparse.ArgumentParser:
    help_, description = ABOUT[name]
    return sub.add_parser(name, help=help_, description=description.format(**fill) if fill
                          else description)


def train_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` (or ``train.KEY=VALUE``) -> TrainConfig fields."""
    from balanced_sam.experiment import apply_overrides

    spec = apply_overrides({}, items)
    other = sorted(set(spec) - {"train"})
    if other:
        raise ValueError(f"--set takes training options (KEY=VALUE or train.KEY=VALUE), not "
                         f"{other[0]}.*; the bench's data options have their own flags")
    return dict(spec.get("train") or {})


