"""The ``bsam`` command: a thin parser over one library call per command.

    bsam bench [--quick] [--dataset NAME | --csv FILE --target COL] [--methods ...] [--rho ...]
               [--baseline M] [--jobs N] [--executor local|ray|slurm]
                                                   -> balanced_sam.bench.run_bench
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
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balanced_sam.cli_bench import add_bench, cmd_bench
from balanced_sam.cli_common import (
    EXTRAS,
    SPELLINGS,
    command,
    csv_list,
    number,
)

__all__ = ["main", "build_parser"]



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
    for add in (add_bench, _add_compare, _add_train, _add_eval, _add_analyze, _add_data,
                _add_list):
        add(sub)
    from balanced_sam.configs import add_parser as add_configs_parser

    add_configs_parser(sub)
    return p


def _add_compare(sub: Any) -> None:
    c = command(sub, "compare")
    c.add_argument("results", metavar="RESULTS.json", help="a bench's results.json")
    c.add_argument("--baseline", metavar="M", default=None,
                   help="the method the others are compared with (default: the bench's "
                        "baseline, else sqinv)")
    c.add_argument("--confidence", type=number, default=None,
                   help="level of the intervals (default: the bench's, else 0.95)")
    c.add_argument("--diverge-factor", type=number, default=None, metavar="K",
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
    t = command(sub, "train")
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
    e = command(sub, "eval")
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

    a = command(sub, "analyze")
    a.add_argument("--checkpoint", nargs="+", required=True,
                   help="one or more checkpoints; NAME=PATH sets the row name")
    a.add_argument("--regions", type=csv_list(), default=["all", "few"],
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
    a.add_argument("--tol", type=number, default=1e-3, help="relative tolerance")
    a.add_argument("--grid", type=int, default=21, help="landscape points per axis")
    a.add_argument("--span", type=number, default=1.0, help="landscape range [-span, span]")
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

    d = command(sub, "data")
    dp = command(d.add_subparsers(dest="data_command", metavar="ACTION"), "prepare")
    dp.add_argument("name", choices=dataset_names(prepare=True))
    dp.add_argument("--root", required=True, help="folder for this benchmark's files")
    dp.add_argument("--no-download", action="store_true", help="only check and build")
    dp.add_argument("--seed", type=int, default=0, help="seed of built splits / masks")


def _add_list(sub: Any) -> None:
    command(sub, "list")


# ---------------------------------------------------------------------------- the commands
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


COMMANDS = {"bench": cmd_bench, "compare": _cmd_compare, "train": _cmd_train, "eval": _cmd_eval,
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
    from balanced_sam.bench.executors import RunsFailedError
    from balanced_sam.errors import option_spellings

    try:
        with option_spellings(SPELLINGS.get(args.command, {})):
            return COMMANDS[args.command](args)
    except ModuleNotFoundError as exc:
        if os.environ.get("BSAM_DEBUG"):
            raise
        top = (exc.name or "").split(".")[0]
        hint = (f"; install it with: pip install 'balanced-sam[{EXTRAS[top]}]'"
                if top in EXTRAS and "pip install" not in str(exc) else "")
        print(f"bsam {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, FileExistsError,
            NotImplementedError) as exc:
        # bad input: a clear one-line message, no traceback (set BSAM_DEBUG=1 for one)
        if os.environ.get("BSAM_DEBUG"):
            raise
        print(f"bsam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunsFailedError as exc:  # the other runs finished; each failed one is named
        print(f"bsam {args.command}: error: {exc}", file=sys.stderr)
        return 1
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
