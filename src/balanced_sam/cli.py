"""The ``bsam`` command: a thin parser over one library call per command.

    bsam bench [--quick] [--dataset NAME | --csv FILE --target COL] [--methods ...] [--rho ...]
               [--baseline M] [--jobs N]           -> balanced_sam.bench.run_bench
    bsam compare RESULTS.json [--baseline M]       -> balanced_sam.bench.compare_results
    bsam train --config FILE.yaml [section.key=value ...] [--resume]
                                                   -> balanced_sam.experiment.run_training
    bsam eval --checkpoint PATH [--split test]     -> balanced_sam.experiment.evaluate_checkpoint
    bsam analyze --checkpoint PATH [PATH ...]      -> balanced_sam.experiment.analyze_checkpoints
    bsam data prepare NAME --root DIR              -> balanced_sam.data.prepare.prepare_dataset
    bsam list                                      -> the method and dataset registries

Errors from bad input print one line naming the flag or config key to change (``BSAM_DEBUG=1``
shows the traceback); a missing optional package prints the install command.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

#: what each command calls an option in its messages (see balanced_sam.errors.spell)
_SPELLINGS: dict[str, dict[str, str]] = {
    "bench": {"dropna": "--dropna", "impute": "--impute median",
              "features": "--features COL,COL,...", "max_categories": "--max-categories N",
              "max_features": "--max-features N", "categorical": "--categorical COL",
              "bin_width": "--bin-width W", "train_fraction": "--train-fraction F",
              "cap": "--cap C", "target": "--target COL", "csv_path": "--csv FILE",
              "device": "--device cpu", "baseline": "--baseline M", "methods": "--methods",
              "plugins": "--set train.plugins.NAME.KEY=VALUE", "out": "--out",
              "overwrite": "--overwrite", "resume": "the same --out without --overwrite"},
    "compare": {"baseline": "--baseline M"},
    "train": {"dropna": "data.dropna=true", "impute": "data.impute=median",
              "features": "data.features=[COL,...]", "max_categories": "data.max_categories=N",
              "max_features": "data.max_features=N", "categorical": "data.categorical=[COL]",
              "bin_width": "data.bin_width=W", "train_fraction": "data.train_fraction=F",
              "cap": "data.cap=C", "target": "data.target=COL", "csv_path": "data.path=FILE",
              "resume": "--resume", "overwrite": "--overwrite", "out_dir": "--out",
              "allow_data_change": "--allow-data-change", "device": "train.device=cpu",
              "trust": "--trust-checkpoint",
              "plugins": "train.plugins.NAME.KEY=VALUE"},
    "eval": {"allow_data_change": "--allow-data-change", "device": "--device cpu",
             "trust": "--trust-checkpoint"},
    "analyze": {"allow_data_change": "--allow-data-change", "device": "--device cpu",
                "trust": "--trust-checkpoint"},
}
#: optional packages and the extra that installs them
_EXTRAS = {"pandas": "cli", "matplotlib": "cli", "yaml": "cli", "tqdm": "cli",
           "plotnine": "diamonds", "PIL": "cli", "torchvision": "cli", "scipy": "cli",
           "wandb": "wandb",
           "torchmetrics": "torchmetrics", "lightning": "lightning", "accelerate": "accelerate"}


def _number(text: str) -> float:
    """A float option's value: any number but NaN (``--tol nan`` would pass every check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r} (NaN is not allowed)")
    return value


def _csv_list(kind: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(t) for t in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {exc}") from None

    return parse


def _seeds(text: str) -> list[int]:
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
    seeds = _csv_list(int)(text)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"seed(s) {repeated} repeated in {text!r}: each seed "
                                         "is one run")
    return seeds


# ---------------------------------------------------------------------------- the parser
#: each command's one-line help and its description
_ABOUT = {
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


def _command(sub: Any, name: str, **fill: str) -> argparse.ArgumentParser:
    help_, description = _ABOUT[name]
    return sub.add_parser(name, help=help_, description=description.format(**fill) if fill
                          else description)


def build_parser() -> argparse.ArgumentParser:
    from balanced_sam import __version__

    p = argparse.ArgumentParser(
        prog="bsam",
        description="Balanced Sharpness-Aware Minimization (BSAM) for deep imbalanced "
                    "regression: benchmarks, training, evaluation and sharpness analysis.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `bsam COMMAND --help` for the options of a command.")
    p.add_argument("--version", action="version", version=f"balanced-sam {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_bench, _add_compare, _add_train, _add_eval, _add_analyze, _add_data,
                _add_list):
        add(sub)
    from balanced_sam.configs import add_parser as add_configs_parser

    add_configs_parser(sub)
    return p


def _add_bench(sub: Any) -> None:
    from balanced_sam.data.registry import dataset_names, default_bench_dataset

    default = default_bench_dataset()
    b = _command(sub, "bench", default=default)
    b.add_argument("--dataset", default=None,
                   help=f"a registered dataset: {', '.join(dataset_names())} (default "
                        f"{default}; see `bsam list`)")
    b.add_argument("--csv", dest="csv_path", metavar="FILE",
                   help="any CSV table instead of a built-in dataset (needs --target); numeric "
                        "and categorical features, DIR-style split built from it")
    b.add_argument("--target", metavar="COL", help="target column of --csv")
    b.add_argument("--dropna", action="store_true",
                   help="drop --csv rows whose target is missing (default: error)")
    b.add_argument("--impute", choices=["median"],
                   help="fill missing numeric --csv features with the training median")
    b.add_argument("--features", type=_csv_list(), metavar="COL,COL",
                   help="the --csv feature columns (default: every column but the target)")
    b.add_argument("--categorical", type=_csv_list(), metavar="COL,COL",
                   help="--csv columns to one-hot encode even if numeric")
    b.add_argument("--max-categories", type=int, metavar="N",
                   help="the most categories a --csv column may have (default 200)")
    b.add_argument("--max-features", type=int, metavar="N",
                   help="the most input features a --csv table may be encoded into (numeric "
                        "columns plus one-hot indicators; default 10000)")
    _bench_runs(b)
    b.add_argument("--bin-width", type=_number, help="label bin width (default: the dataset's)")
    b.add_argument("--train-fraction", type=_number,
                   help="fraction of the rows left after the val/test split kept for training "
                        "(diamonds default 0.2, so that the tail has few-shot bins)")
    b.add_argument("--cap", type=int, help="C: at most this many rows per bin in val and test")
    b.add_argument("--data-root", help="folder with the data files (MNIST IDX files; the root "
                                       "of a paper benchmark)")
    _bench_training(b)
    _bench_output(b)


def _bench_runs(b: argparse.ArgumentParser) -> None:
    """Which runs: methods, seeds, epochs, rho, and the baseline of the comparisons."""
    from balanced_sam.bench import DEFAULT_BASELINE
    from balanced_sam.methods import DEFAULT_METHODS

    b.add_argument("--methods", type=_csv_list(), default=None,
                   help="comma-separated methods (default: the dataset's choice, else "
                        f"{','.join(DEFAULT_METHODS)}); NAME-iK, e.g. bsam-i5, is a SAM-family "
                        "method with a fresh perturbation every K steps, NAME-lK (bsam-l5) "
                        "one with LookSAM's gradient reuse (--set reuse_alpha=A, default "
                        "0.7); the baselines and "
                        "composed names too, e.g. ranksim,conr+lds,ranksim+bsam (bsam list)")
    b.add_argument("--seeds", type=_seeds, default=None,
                   help="a count (3 = seeds 0,1,2) or a comma-separated list (default: the "
                        "dataset's choice, else 3)")
    b.add_argument("--epochs", type=int, help="epochs per run (default: the dataset's recipe)")
    b.add_argument("--rho", type=_csv_list(_number),
                   help="SAM radius; a comma-separated list runs the rho sweep (Figure 2) and "
                        "plots it")
    b.add_argument("--baseline", metavar="M", default=None,
                   help=f"the method every other one is compared with, seed by seed (default "
                        f"{DEFAULT_BASELINE} when among --methods; it must be one of them)")
    b.add_argument("--confidence", type=_number, default=0.95,
                   help="level of the paired intervals (default 0.95)")
    b.add_argument("--effect", default="5%", metavar="E",
                   help="the effect of interest of the power figures: a share of the "
                        "baseline's error (default 5%%, the paper's size) or a number in the "
                        "target's units")
    b.add_argument("--quick", action="store_true",
                   help="the dataset's short variant (rotated-fashion-mnist: 4 methods, 3 seeds, "
                        "5 epochs on 2,000 images; others: 1 seed, 12 epochs): a smoke test "
                        "of the table in about a minute, not evidence")


def _bench_training(b: argparse.ArgumentParser) -> None:
    """How each run trains: selection, lr, batch, clipping, device, parallel runs."""
    b.add_argument("--select-by", choices=["mae", "bmae"], default="mae",
                   help="validation metric that picks the best epoch (default mae, as the "
                        "paper's code)")
    b.add_argument("--lr", type=_number, help="learning rate (default: the dataset's recipe)")
    b.add_argument("--batch-size", type=int, help="batch size (default: the dataset's recipe)")
    b.add_argument("--max-grad-norm", type=_number, metavar="G",
                   help="clip every update gradient to this 2-norm (default: no clipping)")
    b.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="any training option, e.g. --set warmup_epochs=1 --set interval=5 "
                        "(train.KEY=VALUE also works; repeatable)")
    b.add_argument("--diverge-factor", type=_number, default=3.0, metavar="K",
                   help="a run whose test MAE exceeds K times its method's median over seeds "
                        "is marked diverged and left out (default 3; needs 3+ seeds)")
    b.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    b.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="runs trained at once, each in its own process (default: what the "
                        "machine offers: one per CPU core / --threads, or one per GPU on CUDA; "
                        "several runs share a GPU only when asked). The figures are the same "
                        "for any N")
    b.add_argument("--threads", type=int, default=1, metavar="T",
                   help="CPU threads per run (default 1; the figures depend on T, not on "
                        "--jobs)")


def _bench_output(b: argparse.ArgumentParser) -> None:
    b.add_argument("--out", help="output folder (default runs/bench-<timestamp>): new, empty or "
                                 "one a bench made; the same --out resumes a stopped bench or "
                                 "adds methods and seeds to it")
    b.add_argument("--overwrite", action="store_true",
                   help="first remove what an earlier bench wrote into --out (exactly the "
                        "files its manifest lists, nothing else) and start afresh")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--progress", action="store_true",
                   help="a progress bar per epoch (runs trained in one process only, --jobs 1)")


def _add_compare(sub: Any) -> None:
    c = _command(sub, "compare")
    c.add_argument("results", metavar="RESULTS.json", help="a bench's results.json")
    c.add_argument("--baseline", metavar="M", default=None,
                   help="the method the others are compared with (default: the bench's "
                        "baseline, else sqinv)")
    c.add_argument("--confidence", type=_number, default=None,
                   help="level of the intervals (default: the bench's, else 0.95)")
    c.add_argument("--diverge-factor", type=_number, default=None, metavar="K",
                   help="divergence threshold over the method's median test MAE (default: "
                        "the bench's, else 3)")
    c.add_argument("--power", action="store_true",
                   help="under every comparison, the smallest effect its seeds detect with 80%% "
                        "power (two-sided 5%%, noncentral t) and the seeds --effect needs")
    c.add_argument("--effect", default=None, metavar="E",
                   help="the effect of interest: a share of the baseline's error (5%%, the "
                        "paper's size, by default) or a number in the target's units (1.0)")
    c.add_argument("--write", action="store_true",
                   help="write the recomputed comparisons (and flags) into RESULTS.json")
    c.add_argument("--plot", action="store_true",
                   help="(re)draw paired_differences.png beside RESULTS.json")


def _add_train(sub: Any) -> None:
    t = _command(sub, "train")
    t.add_argument("--config", required=True,
                   help="YAML config file, or the name of a shipped config (bsam configs)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, anywhere on the line (e.g. train.epochs=2)")
    t.add_argument("--out", help="output folder (default: the config's out, else "
                                 "runs/<config name>)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in the output folder from its last.pt; only device, "
                        "num_workers, progress, eval_batch_size, prefetch_factor, checkpoint and "
                        "epochs may change (a longer run continues the cosine from where it "
                        "stands, down to its floor at the new end)")
    t.add_argument("--overwrite", action="store_true",
                   help="remove the run in the output folder (exactly the files its "
                        ".bsam-manifest.json lists: result.json, best.pt, last.pt, log.csv, "
                        "tb/) and start again")
    _allow_data_change(t, "resume on")
    t.add_argument("--wandb", metavar="PROJECT",
                   help="also log every epoch to this Weights & Biases project (needs the "
                        "wandb extra; WANDB_MODE=offline logs without an account)")


def _add_eval(sub: Any) -> None:
    e = _command(sub, "eval")
    e.add_argument("--checkpoint", required=True, help="best.pt or last.pt")
    e.add_argument("--split", choices=["test", "val", "train"], default="test")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="spec overrides, e.g. data.root=/elsewhere")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", help="also write the report to this JSON file")
    _allow_data_change(e, "evaluate on")


def _allow_data_change(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--allow-data-change", action="store_true",
                   help=f"{what} data whose fingerprint (content of the table or split file, "
                        "split parameters) differs from the checkpoint's")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle a checkpoint that holds more than tensors, numbers, strings, "
                        "lists and dicts (e.g. an older last.pt, whose random state held numpy "
                        "arrays); without it such a file is refused, since unpickling can run "
                        "any code: pass it only for a file you trust")


def _add_analyze(sub: Any) -> None:
    from balanced_sam.analysis.hessian import DEFAULT_SOLVER, SOLVERS

    a = _command(sub, "analyze")
    a.add_argument("--checkpoint", nargs="+", required=True,
                   help="one or more checkpoints; NAME=PATH sets the row name")
    a.add_argument("--regions", type=_csv_list(), default=["all", "few"],
                   help="comma-separated regions: all, many, medium, few (default all,few)")
    a.add_argument("--split", choices=["train", "val", "test"], default="train",
                   help="which samples define the loss (default train: the minimum the "
                        "optimizer found)")
    a.add_argument("--samples", type=int, default=1000,
                   help="at most this many samples per region (default 1000)")
    a.add_argument("--hessian", action="store_true", help="top eigenvalue and trace")
    a.add_argument("--landscape", action="store_true", help="1-D and 2-D loss landscapes")
    a.add_argument("--iters", type=int, default=30,
                   help="eigenvalue iterations (default 30; Lanczos keeps one parameter-sized "
                        "vector per iteration)")
    a.add_argument("--solver", choices=list(SOLVERS), default=DEFAULT_SOLVER,
                   help="lanczos (default): the largest eigenvalue lambda_max; power: the "
                        "eigenvalue of largest magnitude (PyHessian's; it can be negative for "
                        "an L1 loss, whose Hessian is indefinite)")
    a.add_argument("--probes", type=int, default=30, help="Hutchinson probes (default 30)")
    a.add_argument("--tol", type=_number, default=1e-3, help="relative tolerance")
    a.add_argument("--grid", type=int, default=21, help="landscape points per axis")
    a.add_argument("--span", type=_number, default=1.0, help="landscape range [-span, span]")
    a.add_argument("--dim", type=int, choices=[1, 2], default=1,
                   help="1-D curves (default) or 2-D surfaces (grid x grid forward passes)")
    a.add_argument("--seed", type=int, default=0, help="sample draw and directions")
    a.add_argument("--threads", type=int,
                   help="torch threads (1 is often fastest for Hessian-vector products on a "
                        "busy CPU)")
    a.add_argument("--cache-graph", action="store_true",
                   help="keep the first-order graph between HVPs (faster, more memory)")
    a.add_argument("--device", default="auto")
    a.add_argument("--out", help="output folder (default: beside the first checkpoint)")
    a.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="spec override, e.g. --set data.root=/elsewhere "
                                             "(repeatable)")
    _allow_data_change(a, "analyze on")


def _add_data(sub: Any) -> None:
    from balanced_sam.data.registry import dataset_names

    d = _command(sub, "data")
    dp = _command(d.add_subparsers(dest="data_command", metavar="ACTION"), "prepare")
    dp.add_argument("name", choices=dataset_names(prepare=True))
    dp.add_argument("--root", required=True, help="folder for this benchmark's files")
    dp.add_argument("--no-download", action="store_true", help="only check and build")
    dp.add_argument("--seed", type=int, default=0, help="seed of built splits / masks")


def _add_list(sub: Any) -> None:
    _command(sub, "list")


# ---------------------------------------------------------------------------- the commands
def _cmd_bench(args: argparse.Namespace) -> int:
    from balanced_sam.bench import run_bench

    run_bench(_bench_config(args))
    return 0


def _bench_config(args: argparse.Namespace) -> Any:
    """``bsam bench``'s options -> the :class:`balanced_sam.bench.BenchConfig` (one field per
    option; the training flags join ``--set``'s overrides)."""
    from balanced_sam.bench import BenchConfig

    overrides = _train_overrides(args.overrides)
    overrides.update({k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size),
                                        ("max_grad_norm", args.max_grad_norm)) if v is not None})
    same = ("dataset", "methods", "seeds", "epochs", "rho", "bin_width", "device", "out",
            "csv_path", "target", "train_fraction", "cap", "data_root", "dropna", "select_by",
            "quick", "progress", "baseline", "jobs", "threads", "diverge_factor", "confidence",
            "effect",
            "impute", "features", "categorical", "max_categories", "max_features", "overwrite")
    return BenchConfig(**{k: getattr(args, k) for k in same}, overrides=overrides,
                       plots=not args.no_plots)


def _train_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` (or ``train.KEY=VALUE``) -> TrainConfig fields."""
    from balanced_sam.experiment import apply_overrides

    spec = apply_overrides({}, items)
    other = sorted(set(spec) - {"train"})
    if other:
        raise ValueError(f"--set takes training options (KEY=VALUE or train.KEY=VALUE), not "
                         f"{other[0]}.*; the bench's data options have their own flags")
    return dict(spec.get("train") or {})


def _cmd_compare(args: argparse.Namespace) -> int:
    from balanced_sam.bench import compare_results

    compare_results(args.results, baseline=args.baseline, confidence=args.confidence,
                    diverge_factor=args.diverge_factor, write=args.write, plot=args.plot,
                    power=args.power, effect=args.effect)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from balanced_sam.experiment import apply_overrides, load_config, run_training
    from balanced_sam.metrics import format_table

    spec = apply_overrides(load_config(args.config), args.overrides)
    out = Path(args.out or spec.get("out") or Path("runs") / Path(args.config).stem)  # a name too
    loggers = []
    if args.wandb and int(os.environ.get("RANK", "0")) == 0:  # rank 0 logs, as for log.csv
        from balanced_sam.integrations.wandb import WandbLogger

        loggers.append(WandbLogger(out.name, config=spec, project=args.wandb))
    res = run_training(spec, out=out, resume=args.resume, overwrite=args.overwrite,
                       allow_data_change=args.allow_data_change, loggers=loggers,
                       trust_checkpoint=args.trust_checkpoint)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    if res.test is not None:
        depth = "delta1" in res.test["all"]
        print(f"\ntest set, best epoch {res.best_epoch}:")
        print(format_table({(res.config or {}).get("method", "model"): res.test},
                           metrics=("rmse", "delta1") if depth else ("mae", "gm"),
                           extra=() if depth else ("bmae",)))
    print(f"wrote {out}/best.pt, last.pt, log.csv, result.json")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from balanced_sam.experiment import evaluate_checkpoint
    from balanced_sam.io import write_json
    from balanced_sam.metrics import format_table

    ev = evaluate_checkpoint(args.checkpoint, split=args.split, overrides=args.overrides,
                             device=args.device, allow_data_change=args.allow_data_change,
                             trust=args.trust_checkpoint)
    print(f"{args.split} set of {args.checkpoint}:")
    print(format_table({f"{ev.method} (epoch {ev.epoch})": ev.report},
                       metrics=("rmse", "delta1") if ev.depth else ("mae", "gm"),
                       extra=() if ev.depth else ("bmae",)))
    if args.json:
        write_json(ev.report, Path(args.json))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    from balanced_sam.experiment import analyze_checkpoints

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1 (torch threads for the analysis), got "
                             f"{args.threads}")
        torch.set_num_threads(args.threads)
    named = [tuple(spec.split("=", 1)) if "=" in spec else ("", spec)
             for spec in args.checkpoint]
    both = not (args.hessian or args.landscape)  # neither flag: both analyses
    analyze_checkpoints(
        named, regions=args.regions, split=args.split, samples=args.samples,
        hessian=args.hessian or both, landscape=args.landscape or both, iters=args.iters,
        solver=args.solver, probes=args.probes, tol=args.tol, grid=args.grid, span=args.span,
        dim=args.dim, seed=args.seed, cache_graph=args.cache_graph, device=args.device,
        out=args.out, overrides=args.overrides, allow_data_change=args.allow_data_change,
        trust=args.trust_checkpoint)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command != "prepare":
        print("usage: bsam data prepare NAME --root DIR", file=sys.stderr)
        return 2
    from balanced_sam.data.prepare import prepare_dataset

    rep = prepare_dataset(args.name, args.root, download=not args.no_download, seed=args.seed)
    return 0 if rep.get("ok") else 1


def _cmd_list(args: argparse.Namespace) -> int:
    from balanced_sam.data.registry import REGISTRY
    from balanced_sam.methods import describe_methods

    print(describe_methods())
    for title, paper in (("datasets (bsam bench --dataset NAME, or data.name in a config)",
                          False), ("paper benchmarks (bsam data prepare NAME --root DIR; "
                                   "bsam train --config NAME; bsam configs lists them)", True)):
        print(f"\n{title}:")
        for e in REGISTRY.values():
            if e.prepare == paper:
                print(f"  {e.name:<22} {e.description}")
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from balanced_sam.configs import run

    return run(args)


COMMANDS = {"bench": _cmd_bench, "compare": _cmd_compare, "train": _cmd_train, "eval": _cmd_eval,
            "analyze": _cmd_analyze, "data": _cmd_data, "list": _cmd_list,
            "configs": _cmd_configs}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may stand anywhere after the options of train / eval
    if args.command in ("train", "eval"):
        bad = [t for t in extra if t.startswith("-") or "=" not in t]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from balanced_sam.errors import option_spellings

    try:
        with option_spellings(_SPELLINGS.get(args.command, {})):
            return COMMANDS[args.command](args)
    except ModuleNotFoundError as exc:
        if os.environ.get("BSAM_DEBUG"):
            raise
        top = (exc.name or "").split(".")[0]
        hint = (f"; install it with: pip install 'balanced-sam[{_EXTRAS[top]}]'"
                if top in _EXTRAS and "pip install" not in str(exc) else "")
        print(f"bsam {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, FileExistsError,
            NotImplementedError) as exc:
        # bad input: a clear one-line message, no traceback (set BSAM_DEBUG=1 for one)
        if os.environ.get("BSAM_DEBUG"):
            raise
        print(f"bsam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`bsam configs | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a folder that cannot be written (read-only, full disk): one line
        from balanced_sam.io import write_error

        line = write_error(exc)
        if line is None or os.environ.get("BSAM_DEBUG"):
            raise
        print(f"bsam {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\n{exc}" if str(exc) else "\ninterrupted; run the same command with --resume "
              "(train) or the same --out (bench) to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
