"""The library's CPU training loop against a plain PyTorch loop doing the same work, on the
default bench's data and model (issue 21).

    python benchmarks/cpu_loop.py                       # sqinv and bsam, 3 epochs, 1 thread
    python benchmarks/cpu_loop.py --methods bsam --epochs 5 --threads 2
    python benchmarks/cpu_loop.py --compile             # also the library with train.compile
    python benchmarks/cpu_loop.py --smoke               # 512 images, 2 epochs: seconds (tests)

Data, model and training config are the default bench's, built by the bench's own code
(:func:`balanced_sam.bench.plan.make_plan` on the registry's default bench dataset, rotated
Fashion-MNIST: 6,000 training images of 28 x 28, the recipe's SmallCNN with 8 and 16 channels
and hidden 64, batch 128, SGD lr 0.1 momentum 0.9 weight decay 1e-4, warm-up then cosine); each
method at the recipe's rho (``bsam``: 0.01) and the initial weights of ``--seed`` as the bench
makes them. ``--epochs`` replaces the recipe's epoch count (the schedule follows it; the cost of
an epoch does not depend on it).

Rows, per method (``sqinv``: one pass, SQINV-weighted L1; ``bsam``: BalancedSAM's two passes):

* library: :func:`balanced_sam.train.fit` as a bench run calls it (the data's target scaler,
  a validation evaluation every epoch), without writing checkpoints (``out_dir=None``), with
  ``train.channels_last`` false (NCHW, the plain loop's layout: the cost of the library
  itself), true, and the config's default (printed with what the run resolved it to,
  ``FitResult.config["channels_last"]``); with ``--compile`` also ``train.compile: true`` in the
  default layout;
* plain: a hand-written loop with the same model (a copy of the same initial weights), the same
  batches' sizes (a ``torch.randperm`` of the training tensors, sliced), SQINV per-sample
  weights (``1 / sqrt(count of the sample's bin)``, mean 1 over the training set, looked up
  once), the weighted L1 on the standardised targets, ``torch.optim.SGD`` with the config's
  momentum and weight decay, the same warm-up + cosine per epoch through ``LambdaLR``, for
  ``bsam`` the two-pass step by hand (first pass backward, ``e = rho g / ||g||`` added to the
  weights, second pass backward, weights restored, base step), and every epoch a ``no_grad``
  MAE on the validation split in batches of ``eval_batch_size``; NCHW (``contiguous_format``)
  and ``channels_last`` (model and each batch).

Figures: an epoch's time is training plus validation (the library's ``history[i]["seconds"]``,
the same span timed in the plain loop); ``median epoch s`` is the median over the epochs after
the first (the first pays one-off costs; with one epoch, that one); ``total s`` the wall time of
the whole call (set-up and the library's final evaluation of the best weights included);
``ms/step`` the median epoch over its training steps (validation included); the ratio is to the
plain NCHW loop of the same method. ``val MAE`` (last epoch, degrees) shows that the loops train
alike; it is not a quality comparison. With ``--compile``: the compiled run's first epoch (it
pays the compilation), its steady epoch, and the epochs after which it has caught up with the
eager library row of the same layout.

The figures are only as good as the machine is quiet: the CPU count, the load average before
and after, the torch version and the thread count are printed. ``--threads`` defaults to 1, as
a bench job runs (2 jobs x 1 thread on 2 cores). Rows run one after another, each once: for
figures to quote, run it on a quiet machine and more than once. Before a method's rows, one
forward and backward pass in each layout on a throwaway copy of the model takes the process's
one-off costs (torch imports ``torch._dynamo`` when it builds its first optimizer), so that they
do not land on the first row's total.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from balanced_sam.bench.plan import BenchConfig, BenchPlan, RunKey, make_plan
from balanced_sam.config import TrainConfig
from balanced_sam.data.registry import default_bench_dataset
from balanced_sam.io import write_json
from balanced_sam.runtime import seed_everything
from balanced_sam.train import fit

METHODS = ("sqinv", "bsam")
#: the one- and two-pass methods the plain loop writes by hand: method -> passes per step
PLAIN_PASSES = {"sqinv": 1, "bsam": 2}
#: --smoke: a small variant of the bench's data (36 angle bins: 72 validation, 36 test images)
SMOKE_DATA = {"n_train": 512, "val_per_bin": 2, "test_per_bin": 1}
NORM_EPS = 1e-12


# ---------------------------------------------------------------------------- the machine
def load_average() -> list[float] | None:
    """The machine's load average (1, 5, 15 minutes), other jobs included."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def load_text(load: list[float] | None) -> str:
    if load is None:
        return "load average unknown"
    return f"load average {load[0]:.2f} (1 min), {load[1]:.2f} (5 min)"


# ---------------------------------------------------------------------------- the plan
def bench_plan(args: argparse.Namespace) -> BenchPlan:
    """The default bench's plan (data, config, runs) for the chosen methods and seed."""
    data: dict[str, Any] = {"name": default_bench_dataset()}
    if args.smoke:
        data.update(SMOKE_DATA)
    if args.n_train is not None:
        data["n_train"] = args.n_train
    if args.data_root is not None:
        data["data_root"] = args.data_root
    return make_plan(BenchConfig(data=data, methods=args.methods, seeds=[args.seed],
                                 epochs=args.epochs, device="cpu", jobs=1,
                                 threads=args.threads, plots=False, status=False))


def run_config(plan: BenchPlan, key: RunKey) -> TrainConfig:
    """The config of one bench run, as :func:`balanced_sam.bench.run.train_task` makes it."""
    return dataclasses.replace(plan.cfg, method=key.name, seed=key.seed,
                               rho=key.rho if key.rho is not None else plan.cfg.rho,
                               progress=False)


def initial_model(plan: BenchPlan, key: RunKey) -> nn.Module:
    """The run's initial weights, from its seed alone (as the bench's ``make_task``)."""
    seed_everything(key.seed)
    return plan.data.make_model()


def steady(seconds: list[float]) -> float:
    """The median epoch after the first (the first pays one-off costs); one epoch: that one."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


# ---------------------------------------------------------------------------- the library
def library_run(plan: BenchPlan, key: RunKey, model: nn.Module, **fields: Any
                ) -> dict[str, Any]:
    """``fit`` as a bench run calls it (no checkpoints), with ``fields`` over the config."""
    cfg = dataclasses.replace(run_config(plan, key), **fields)
    d = plan.data
    t0 = time.perf_counter()
    res = fit(model, d.train, d.val, d.bins, cfg, target_scaler=d.target_scaler,
              out_dir=None, log=lambda s: None)
    total = time.perf_counter() - t0
    seconds = [float(r["seconds"]) for r in res.history]
    resolved = (res.config or {}).get("channels_last")
    return {"epochs": seconds, "total": total, "val_mae": float(res.history[-1]["val_mae"]),
            "channels_last": resolved}


# ---------------------------------------------------------------------------- the plain loop
def sqinv_weights(plan: BenchPlan, normalize: str) -> torch.Tensor:
    """Every training sample's SQINV weight: ``1 / sqrt(N_k)`` of its bin ``k``, scaled to mean
    1 over the training set (``normalize="mean"``, the library's default)."""
    bins = plan.data.bins
    y = plan.data.train[1]
    counts = bins.counts.to(torch.float64)
    w = (1.0 / counts.clamp_min(1).sqrt())[bins.bin_index(y)]
    if normalize == "mean":
        w = w / w.mean()
    return w.to(torch.float32)


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Per epoch: linear warm-up over ``warmup_epochs``, then a cosine to ``lr_min_factor``."""
    warm, n_cos = cfg.warmup_epochs, max(1, cfg.epochs - cfg.warmup_epochs)

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / warm
        cos = (1 + math.cos(math.pi * min(epoch - warm, n_cos) / n_cos)) / 2
        return cfg.lr_min_factor + (1 - cfg.lr_min_factor) * cos

    return factor


def plain_run(plan: BenchPlan, key: RunKey, model: nn.Module, *, channels_last: bool
              ) -> dict[str, Any]:
    """The hand-written loop of ``key``'s method (one pass, or BalancedSAM's two)."""
    t_start = time.perf_counter()
    cfg = run_config(plan, key)
    if cfg.loss != "l1" or cfg.optimizer != "sgd" or cfg.schedule != "cosine":
        raise ValueError(f"the plain loop writes L1, SGD and a cosine by hand; the bench's "
                         f"config has loss {cfg.loss}, optimizer {cfg.optimizer}, schedule "
                         f"{cfg.schedule}")
    two_pass = PLAIN_PASSES[key.name] == 2
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x_train, y_train = plan.data.train[0], plan.data.train[1]
    x_val, y_val = plan.data.val[0], plan.data.val[1]
    scaler = plan.data.target_scaler
    mean, std = float(scaler.mean), float(scaler.std)
    y_scaled = (y_train.float() - mean) / std
    weights = sqinv_weights(plan, cfg.normalize)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n, bs, ebs = len(y_train), cfg.batch_size, cfg.eval_batch_size
    seconds: list[float] = []
    mae = math.nan
    for _ in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            x = x_train[idx].contiguous(memory_format=fmt)
            y, w = y_scaled[idx], weights[idx]
            opt.zero_grad(set_to_none=True)
            (w * (model(x).reshape(-1) - y).abs()).mean().backward()
            if two_pass:
                with torch.no_grad():
                    grads = [p.grad for p in params]
                    norm = torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                    scale = cfg.rho / (norm + NORM_EPS)
                    eps = [g * scale for g in grads]
                    for p, e in zip(params, eps):
                        p.add_(e)
                opt.zero_grad(set_to_none=True)
                (w * (model(x).reshape(-1) - y).abs()).mean().backward()
                with torch.no_grad():
                    for p, e in zip(params, eps):
                        p.sub_(e)
            opt.step()
        sched.step()
        model.eval()
        err = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for j in range(0, len(y_val), ebs):
                xb = x_val[j:j + ebs].contiguous(memory_format=fmt)
                pred = model(xb).reshape(-1) * std + mean
                err += (pred - y_val[j:j + ebs]).abs().sum().double()
        mae = float(err) / len(y_val)
        seconds.append(time.perf_counter() - t0)
    return {"epochs": seconds, "total": time.perf_counter() - t_start, "val_mae": mae,
            "channels_last": channels_last}


# ---------------------------------------------------------------------------- the rows
def row(variant: str, layout: str, run: dict[str, Any], steps: int) -> dict[str, Any]:
    med = steady(run["epochs"])
    return {"variant": variant, "layout": layout, "median_epoch_s": med,
            "total_s": run["total"], "ms_per_step": 1e3 * med / steps,
            "epoch_s": run["epochs"], "val_mae": run["val_mae"],
            "channels_last": run["channels_last"]}


def layout_name(channels_last: Any) -> str:
    return "channels_last" if channels_last is True else (
        "NCHW" if channels_last is False else str(channels_last))


def warm_up(model: nn.Module, x: torch.Tensor) -> None:
    """A forward and backward pass and an SGD step in each layout on a throwaway copy, so that
    the process's one-off costs (kernel selection, allocator growth, and torch's import of
    ``torch._dynamo`` at the first optimizer it builds: seconds) do not land on the first
    row."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        m = copy.deepcopy(model).to(memory_format=fmt).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        m(x.contiguous(memory_format=fmt)).sum().backward()
        opt.step()


def measure_method(plan: BenchPlan, key: RunKey, args: argparse.Namespace
                   ) -> dict[str, Any]:
    """Every row of one method, each from a copy of the same initial weights."""
    init = initial_model(plan, key)
    warm_up(init, plan.data.train[0][:plan.cfg.batch_size])
    steps = math.ceil(len(plan.data.train[1]) / plan.cfg.batch_size)
    fresh = lambda: copy.deepcopy(init)  # noqa: E731
    rows: list[dict[str, Any]] = []
    rows.append(row("library", "NCHW", library_run(plan, key, fresh(), channels_last=False),
                    steps))
    rows.append(row("library", "channels_last",
                    library_run(plan, key, fresh(), channels_last=True), steps))
    default = plan.cfg.channels_last
    run = library_run(plan, key, fresh())
    rows.append(row("library (default)",
                    f"{default} -> {layout_name(run['channels_last'])}", run, steps))
    rows.append(row("plain", "NCHW", plain_run(plan, key, fresh(), channels_last=False), steps))
    rows.append(row("plain", "channels_last",
                    plain_run(plan, key, fresh(), channels_last=True), steps))
    out: dict[str, Any] = {"rho": key.rho, "steps_per_epoch": steps, "rows": rows}
    if args.compile:
        run = library_run(plan, key, fresh(), compile=True)
        rows.append(row("library compile",
                        f"{default} -> {layout_name(run['channels_last'])}", run, steps))
        out["compile"] = compile_figures(rows, run)
    reference = rows[3]["median_epoch_s"]  # the plain NCHW loop
    for r in rows:
        r["ratio"] = r["median_epoch_s"] / reference
    out["headline"] = rows[2]["ratio"]
    return out


def compile_figures(rows: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """The compiled run's first and steady epochs, and when it catches up with the eager
    library row of the same layout (``None``: its steady epoch is not faster)."""
    layout = layout_name(run["channels_last"])
    same = [r for r in rows if r["variant"] == "library" and r["layout"] == layout]
    # a layout other than the two: the eager run of the same config (the default row)
    eager = same[0] if same else next(r for r in rows if r["variant"] == "library (default)")
    first, steady_c = run["epochs"][0], steady(run["epochs"])
    e_first, e_steady = eager["epoch_s"][0], eager["median_epoch_s"]
    gain = e_steady - steady_c
    # n epochs cost first + (n - 1) steady: level when n = 1 + (first - e_first) / gain
    even = None if gain <= 0 else max(1, math.ceil(1 + (first - e_first) / gain - 1e-9))
    return {"layout": layout, "first_epoch_s": first, "steady_epoch_s": steady_c,
            "eager_first_epoch_s": e_first, "eager_steady_epoch_s": e_steady,
            "break_even_epochs": even}


# ---------------------------------------------------------------------------- the report
def print_table(method: str, res: dict[str, Any]) -> None:
    rho = "" if res["rho"] is None else f", rho {res['rho']:g}"
    print(f"\n{method}{rho}: {res['steps_per_epoch']} steps per epoch")
    print(f"{'variant':<20}{'layout':<22}{'median epoch s':>15}{'total s':>10}{'ms/step':>10}"
          f"{'/ plain NCHW':>14}{'val MAE':>10}")
    for r in res["rows"]:
        print(f"{r['variant']:<20}{r['layout']:<22}{r['median_epoch_s']:>15.3f}"
              f"{r['total_s']:>10.2f}{r['ms_per_step']:>10.2f}{r['ratio']:>13.2f}x"
              f"{r['val_mae']:>10.2f}")
    c = res.get("compile")
    if c is not None:
        even = "never (not faster per epoch)" if c["break_even_epochs"] is None else \
            f"{c['break_even_epochs']} epochs"
        print(f"compile ({c['layout']}): first epoch {c['first_epoch_s']:.2f} s (eager "
              f"{c['eager_first_epoch_s']:.2f} s), steady {c['steady_epoch_s']:.3f} s (eager "
              f"{c['eager_steady_epoch_s']:.3f} s); break-even after {even}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, from {', '.join(PLAIN_PASSES)} (default: both)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per row (default 3)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: a bench job's)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (initial weights)")
    ap.add_argument("--compile", action="store_true",
                    help="also the library with train.compile true")
    ap.add_argument("--n-train", type=int, default=None,
                    help="training images (default: the recipe's 6,000)")
    ap.add_argument("--data-root", default=None,
                    help="a folder of Fashion-MNIST IDX files (default: the registry's search)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"the data option(s) {SMOKE_DATA}, 2 epochs: seconds")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(PLAIN_PASSES) or len(set(methods)) != len(methods):
        ap.error(f"--methods takes a comma-separated list of {', '.join(PLAIN_PASSES)}, each "
                 f"once; got {args.methods!r}")
    args.methods = methods
    if args.smoke:
        args.epochs = min(args.epochs, 2)
    if args.epochs < 1 or args.threads < 1:
        ap.error("--epochs and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    plan = bench_plan(args)
    load_before = load_average()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"data: {plan.data.name}, {len(plan.data.train[1])} training images "
          f"{tuple(plan.data.train[0].shape[1:])}, {len(plan.data.val[1])} validation; model "
          f"{type(initial_model(plan, plan.keys[0])).__name__}; batch {plan.cfg.batch_size}, "
          f"{args.epochs} epoch(s) per row")
    print(f"measured under: {load_text(load_before)} before")
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                       "threads": torch.get_num_threads(),
                                       "load_before": load_before},
                           "epochs": args.epochs, "n_train": len(plan.data.train[1]),
                           "batch_size": plan.cfg.batch_size, "methods": {}}
    for key in plan.keys:
        res["methods"][key.name] = measure_method(plan, key, args)
        print_table(key.name, res["methods"][key.name])
    load_after = load_average()
    res["machine"]["load_after"] = load_after
    print(f"\nmeasured under: {load_text(load_before)} before, {load_text(load_after)} after, "
          f"on {os.cpu_count()} CPUs")
    for name, m in res["methods"].items():
        print(f"{name}: library (default layout) / plain NCHW = {m['headline']:.2f}x")
    if args.json:
        write_json(res, args.json, indent=2)
    return res


if __name__ == "__main__":
    main()
