"""``bsam bench``'s options (grouped by concern) and the one place they become a
:class:`~balanced_sam.bench.BenchConfig`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from balanced_sam.cli_common import command, csv_list, number, seeds, train_overrides

__all__ = ["add_bench", "cmd_bench"]


def add_bench(sub: Any) -> None:
    from balanced_sam.data.registry import dataset_names, default_bench_dataset

    default = default_bench_dataset()
    b = command(sub, "bench", default=default)
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
    b.add_argument("--features", type=csv_list(), metavar="COL,COL",
                   help="the --csv feature columns (default: every column but the target)")
    b.add_argument("--categorical", type=csv_list(), metavar="COL,COL",
                   help="--csv columns to one-hot encode even if numeric")
    b.add_argument("--max-categories", type=int, metavar="N",
                   help="the most categories a --csv column may have (default 200)")
    b.add_argument("--max-features", type=int, metavar="N",
                   help="the most input features a --csv table may be encoded into (numeric "
                        "columns plus one-hot indicators; default 10000)")
    _bench_images(b)
    _bench_runs(b)
    b.add_argument("--bin-width", type=number, help="label bin width (default: the dataset's)")
    b.add_argument("--train-fraction", type=number,
                   help="fraction of the rows left after the val/test split kept for training "
                        "(diamonds default 0.2, so that the tail has few-shot bins)")
    b.add_argument("--cap", type=int, help="C: at most this many rows per bin in val and test")
    b.add_argument("--data-root", help="folder with the data files (MNIST IDX files; the root "
                                       "of a paper benchmark)")
    _bench_training(b)
    _bench_executor(b)
    _bench_output(b)


def _bench_images(b: argparse.ArgumentParser) -> None:
    """Your own images: a CSV of image paths and a target (docs/own-images.md)."""
    g = b.add_argument_group("your own images (--images FILE --target COL)")
    g.add_argument("--images", metavar="FILE",
                   help="a CSV with one row per image: its path and a continuous target "
                        "(--target); any Pillow format, RGB or grayscale; a DIR-style split "
                        "unless --split-col")
    g.add_argument("--root", metavar="DIR",
                   help="the folder the --images paths are relative to (default: the CSV's)")
    g.add_argument("--path-col", metavar="COL",
                   help="the column of image paths (default: the one column whose values "
                        "are image files that exist)")
    g.add_argument("--split-col", metavar="COL",
                   help="a column of train/val/test to use as the split (default: a DIR split "
                        "from the targets, seeded)")
    g.add_argument("--img-size", type=int, metavar="N",
                   help="network input side (default 224, or the images' median shorter side "
                        "when smaller)")
    g.add_argument("--pretrained", metavar="PATH",
                   help="fine-tune a ResNet-18 from these weights (a torchvision state dict), "
                        "or 'imagenet' for torchvision's cached ImageNet weights; default: "
                        "from scratch")
    g.add_argument("--allow-download", action="store_true",
                   help="let --pretrained imagenet download the weights when not cached")
    g.add_argument("--cache", metavar="DIR",
                   help="folder of the decoded-image cache (default ROOT/.bsam_cache; 'none' "
                        "for no cache)")


def _images_section(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``data`` section of ``bsam bench --images``, or ``None`` without it."""
    image_flags = [f for f, v in (("--root", args.root), ("--path-col", args.path_col),
                                  ("--split-col", args.split_col), ("--img-size", args.img_size),
                                  ("--pretrained", args.pretrained), ("--cache", args.cache),
                                  ("--allow-download", args.allow_download or None))
                   if v is not None]
    if args.images is None:
        if image_flags:
            raise ValueError(f"{image_flags[0]} is an option of --images FILE (your own images)")
        return None
    if args.csv_path is not None or args.dataset is not None:
        raise ValueError("--images replaces --dataset / --csv: give one of them")
    if args.target is None:
        raise ValueError("--images needs the target column (--target COL)")
    table_only = [f for f, v in (("--impute", args.impute), ("--features", args.features),
                                 ("--categorical", args.categorical),
                                 ("--max-categories", args.max_categories),
                                 ("--max-features", args.max_features),
                                 ("--train-fraction", args.train_fraction),
                                 ("--data-root", args.data_root)) if v is not None]
    if table_only:
        raise ValueError(f"{table_only[0]} is not an option of --images (see bsam bench --help, "
                         "'your own images')")
    section: dict[str, Any] = {"name": "images", "path": str(Path(args.images).resolve()),
                               "target": args.target}
    for key, value in (("root", args.root), ("path_col", args.path_col),
                       ("split_col", args.split_col), ("img_size", args.img_size),
                       ("bin_width", args.bin_width), ("cap", args.cap)):
        if value is not None:
            section[key] = str(Path(value).resolve()) if key == "root" else value
    if args.cache is not None:
        section["cache"] = False if args.cache.lower() == "none" else str(
            Path(args.cache).resolve())
    if args.pretrained is not None:
        section["pretrained"] = (args.pretrained if args.pretrained.lower() == "imagenet"
                                 else str(Path(args.pretrained).resolve()))
    if args.allow_download:
        section["allow_download"] = True
    if args.dropna:
        section["dropna"] = True
    return section


def _bench_executor(b: argparse.ArgumentParser) -> None:
    """Where the runs train: this machine (its devices), a Ray cluster, a Slurm cluster."""
    g = b.add_argument_group("where the runs train (docs/cluster.md)")
    g.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                   help="local (default): this machine, --jobs processes; ray: one task per "
                        "run on a Ray cluster; slurm: one Slurm job per run (submitit). The "
                        "figures are the same whichever trains a run")
    g.add_argument("--devices", type=csv_list(), metavar="DEV,DEV",
                   help="local: one run per device at a time, e.g. cuda:0,cuda:1 (a device "
                        "named twice takes two runs), or auto (every visible GPU)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="the Ray cluster (default: auto when one runs here, else a local one "
                        "the bench starts and stops)")
    g.add_argument("--gpus-per-run", type=float, metavar="G",
                   help="GPUs each ray/slurm run asks for (default 1 on a CUDA machine, else 0)")
    g.add_argument("--cpus-per-run", type=int, metavar="C",
                   help="CPUs each ray/slurm run asks for (default --threads)")
    g.add_argument("--retries", type=int, default=2, metavar="N",
                   help="ray/slurm: start a run whose worker died again up to N times, from "
                        "its last.pt (default 2); a run that raised an error is not retried")
    g.add_argument("--slurm-partition", metavar="P", help="the Slurm partition")
    g.add_argument("--slurm-time", default="24:00:00", metavar="T",
                   help="each job's time limit: MINUTES, HH:MM:SS or D-HH:MM:SS (default "
                        "24:00:00); a job that runs out is requeued and resumes")
    g.add_argument("--slurm-option", dest="slurm_options", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="another sbatch option, e.g. --slurm-option account=lab (repeatable)")
    g.add_argument("--slurm-cluster", choices=["slurm", "local"], default="slurm",
                   help="local: submitit's local executor (a process per job here) to try the "
                        "slurm executor without Slurm")


def _bench_runs(b: argparse.ArgumentParser) -> None:
    """Which runs: methods, seeds, epochs, rho, and the baseline of the comparisons."""
    from balanced_sam.bench import DEFAULT_BASELINE
    from balanced_sam.methods import DEFAULT_METHODS

    b.add_argument("--methods", type=csv_list(), default=None,
                   help="comma-separated methods (default: the dataset's choice, else "
                        f"{','.join(DEFAULT_METHODS)}); NAME-iK, e.g. bsam-i5, is a SAM-family "
                        "method with a fresh perturbation every K steps, NAME-lK (bsam-l5) "
                        "one with LookSAM's gradient reuse (--set reuse_alpha=A, default "
                        "auto); the baselines and "
                        "composed names too, e.g. ranksim,conr+lds,ranksim+bsam (bsam list)")
    b.add_argument("--seeds", type=seeds, default=None,
                   help="a count (3 = seeds 0,1,2) or a comma-separated list (default: the "
                        "dataset's choice, else 3)")
    b.add_argument("--epochs", type=int, help="epochs per run (default: the dataset's recipe)")
    b.add_argument("--rho", type=csv_list(number),
                   help="SAM radius; a comma-separated list runs the rho sweep (Figure 2) and "
                        "plots it")
    b.add_argument("--baseline", metavar="M", default=None,
                   help=f"the method every other one is compared with, seed by seed (default "
                        f"{DEFAULT_BASELINE} when among --methods; it must be one of them)")
    b.add_argument("--confidence", type=number, default=0.95,
                   help="level of the paired intervals (default 0.95)")
    b.add_argument("--effect", default="5%", metavar="E",
                   help="the effect of interest of the power figures: a share of the "
                        "baseline's error (default 5%%, the paper's size) or a number in the "
                        "target's units")
    b.add_argument("--quick", action="store_true",
                   help="the dataset's short variant (rotated-fashion-mnist: 4 methods, 3 seeds, "
                        "5 epochs on 2,000 images; others: 1 seed, 12 epochs): a smoke test "
                        "of the table, not evidence (rotated-fashion-mnist: 20 s on 2 CPU cores, "
                        "measured quiet)")


def _bench_training(b: argparse.ArgumentParser) -> None:
    """How each run trains: selection, lr, batch, clipping, device, parallel runs."""
    b.add_argument("--select-by", choices=["mae", "bmae"], default="mae",
                   help="validation metric that picks the best epoch (default mae, as the "
                        "paper's code)")
    b.add_argument("--lr", type=number, help="learning rate (default: the dataset's recipe)")
    b.add_argument("--batch-size", type=int, help="batch size (default: the dataset's recipe)")
    b.add_argument("--max-grad-norm", type=number, metavar="G",
                   help="clip every update gradient to this 2-norm (default: no clipping)")
    b.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="any training option, e.g. --set warmup_epochs=1 --set interval=5 "
                        "(train.KEY=VALUE also works; repeatable)")
    b.add_argument("--diverge-factor", type=number, default=3.0, metavar="K",
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
    b.add_argument("--trust-checkpoint", action="store_true",
                   help="resume runs whose last.pt needs unpickling (a previous release's): "
                        "only for files you wrote or trust, since unpickling can run code")
    b.add_argument("--progress", action="store_true",
                   help="a progress bar per epoch (runs trained in one process only, --jobs 1)")


def cmd_bench(args: argparse.Namespace) -> int:
    from balanced_sam.bench import run_bench

    run_bench(_bench_config(args))
    return 0


def _bench_config(args: argparse.Namespace) -> Any:
    """``bsam bench``'s options -> the :class:`balanced_sam.bench.BenchConfig` (one field per
    option; the training flags join ``--set``'s overrides)."""
    from balanced_sam.bench import BenchConfig

    overrides = train_overrides(args.overrides)
    overrides.update({k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size),
                                        ("max_grad_norm", args.max_grad_norm)) if v is not None})
    same = ("dataset", "methods", "seeds", "epochs", "rho", "bin_width", "device", "out",
            "csv_path", "target", "train_fraction", "cap", "data_root", "dropna", "select_by",
            "quick", "progress", "baseline", "jobs", "threads", "diverge_factor", "confidence",
            "effect",
            "impute", "features", "categorical", "max_categories", "max_features", "overwrite",
            "trust_checkpoint")
    return BenchConfig(**{k: getattr(args, k) for k in same}, overrides=overrides,
                       plots=not args.no_plots, data=_images_section(args),
                       executor=_executor_config(args))


def _executor_config(args: argparse.Namespace) -> Any:
    from balanced_sam.bench import ExecutorConfig

    options = {}
    for item in args.slurm_options:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--slurm-option takes KEY=VALUE (an sbatch option without its "
                             f"dashes, e.g. account=lab), got {item!r}")
        options[key.strip().lstrip("-")] = value
    return ExecutorConfig(args.executor, devices=args.devices, ray_address=args.ray_address,
                          gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
                          retries=args.retries, slurm_partition=args.slurm_partition,
                          slurm_time=args.slurm_time, slurm_options=options or None,
                          slurm_cluster=args.slurm_cluster)


