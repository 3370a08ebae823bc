"""Step time against plain SGD: the sharpness-aware optimizers and every baseline, one process.

    python benchmarks/step_cost.py                 # both tables, all models (minutes)
    python benchmarks/step_cost.py --only baselines --models mlp,cnn
    python benchmarks/step_cost.py --smoke         # a few steps on small models, seconds
    python benchmarks/step_cost.py --only optimizers --models resnet \
        --optimizers sgd,sam,bsam,bsam-i5,bsam-l5  # the reuse variants against SGD, SAM, BSAM

Two tables per model, each timed round-robin (one step of each entry in turn, so a slow phase
of the machine hits all of them alike); each entry's cost is the mean time per step over
``--steps`` steps after ``--warmup`` (a multiple of 5 steps, so ``interval=5`` runs whole cycles
of one fresh perturbation and four reuses; its median would show only the cheap steps), the
median and its ratio printed beside it (steadier when the machine is shared).

* optimizers: plain SGD, SAM, BalancedSAM and ImbSAM, also with ``interval=5`` (``-i5``: the
  perturbation reused) and with LookSAM's gradient reuse every 5 steps (``-l5``:
  ``interval=GradientReuse(5)``), and CC-SAM (the three regions, no interval form), on a
  hand-written L1 step. CC-SAM takes 2 passes per region in the batch (6 here, against SAM's 2;
  the printout gives the batch's regions): a region's gradient at theta needs its own backward.
  Sharing one forward at theta with ``retain_graph`` would save about a tenth of that and break
  compiled models with donated buffers, so it is not done. Goals on the ResNet: BalancedSAM /
  SAM <= 1.03 and BalancedSAM / SGD <= 2.1 (issue 2); ``bsam-i5`` <= 1.3x SGD (issue 13);
  ``bsam-l5`` <= 1.3x SGD (issue 21).
* baselines: one training step of each method exactly as ``bsam`` runs it (the method's
  :class:`~balanced_sam.baselines.plugins.MethodPlugin` builds the batch's ``loss_fn`` and the
  parameter groups, :func:`~balanced_sam.methods.build_stepper` the step), against ``vanilla``
  (plain SGD on L1 through the same machinery). ``fds`` calibrates (statistics of a first
  epoch are in place) and collects every step; its once-per-epoch update is timed apart.
  ``rnc:pretrain`` is a step of RnC's contrastive stage (one view per sample, the loop's),
  ``rnc:head`` one of its linear-head stage (frozen encoder).

Labels are long-tailed integers 0..99 (about 60 distinct values in a batch of 256), so
ImbSAM's tail, RankSim's unique-label subset and ConR's pairs are realistic; the first 4 labels
of each batch are tail labels so that ImbSAM does its full step. Models: torchvision's
ResNet-18 with a one-output head at 32x32 (our ``ResNetRegressor``; the standard stem), the
rotated-MNIST SmallCNN (8 and 16 channels, hidden 64) at 28x28, and an MLP 30-256-256-1.

The figures are only as good as the machine is quiet: the script prints the load average (of
the whole machine, other jobs included) before and after each table, and the CPU count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from balanced_sam import CCSAM, SAM, BalancedSAM, ImbSAM, LabelBins
from balanced_sam.baselines.plugins import MethodPlugin
from balanced_sam.config import TrainConfig
from balanced_sam.data.scaling import TargetScaler
from balanced_sam.methods import build_stepper, get_method
from balanced_sam.models import MLP, ResNetRegressor, SmallCNN
from balanced_sam.optim.reuse import GradientReuse
from balanced_sam.train import _match

#: NAME-iK: interval K (the perturbation reused); NAME-lK: LookSAM's gradient reuse, period K
OPTIMIZERS = ["sgd", "sam", "bsam", "imbsam", "ccsam", "sam-i5", "bsam-i5", "imbsam-i5",
              "sam-l5", "bsam-l5", "imbsam-l5"]
BASELINES = ["vanilla", "focal-l1", "bmse", "bni", "gai", "ranksim", "conr", "ordinal-entropy",
             "fds", "conr+fds", "rnc:pretrain", "rnc:head", "ranksim+bsam", "ranksim+ccsam"]
KW = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)


def optimizer_step(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   bins: LabelBins) -> Callable[[], None]:
    """A hand-written L1 step with plain SGD or a sharpness-aware optimizer."""
    def loss_fn() -> torch.Tensor:
        return (model(x).reshape(-1) - y).abs()

    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), **KW)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn().mean().backward()
            opt.step()

        return step
    name, dash, suffix = kind.partition("-")
    if dash and (suffix[:1] not in ("i", "l") or not suffix[1:].isdigit()):
        raise ValueError(kind)
    interval: int | GradientReuse = 1
    if suffix:
        interval = int(suffix[1:]) if suffix[0] == "i" else GradientReuse(int(suffix[1:]))
    if name == "sam":
        sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, interval=interval, **KW)
    elif name == "bsam":
        sam = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=0.05,
                          interval=interval, **KW)
    elif name == "imbsam":
        sam = ImbSAM(model.parameters(), torch.optim.SGD, bins, rho=0.05, interval=interval,
                     **KW)
    elif name == "ccsam" and interval == 1:
        sam = CCSAM(model.parameters(), torch.optim.SGD, bins, rho=0.05, **KW)
    else:
        raise ValueError(kind)
    return lambda: sam.step(loss_fn, y)


def baseline_step(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  bins: LabelBins) -> tuple[Callable[[], None], MethodPlugin]:
    """One training step of a method as the loop runs it (``NAME`` or ``rnc:STAGE``)."""
    name, _, stage = kind.partition(":")
    cfg = TrainConfig(method=name, rho=0.05, device="cpu", progress=False,
                      plugins={"rnc": {"stage": stage}} if stage else {}, **KW)
    plugin = MethodPlugin(get_method(name), cfg, model, bins, TargetScaler(),
                          torch.device("cpu"))
    _, step = build_stepper(plugin.stepper_method, plugin.param_groups(), bins, cfg)
    first = plugin.first_pass_context(None)
    if plugin.fds is not None:  # statistics of a first epoch, so that calibration runs
        with torch.no_grad():
            plugin.fds.collect(model.forward_features(x), y, 0)
        plugin.end_epoch(0)
    count = [0]

    def run() -> None:
        fn = plugin.batch_loss(model, x, y, None, epoch=1, index=count[0],
                               autocast=contextlib.nullcontext, match=_match)
        count[0] += 1
        step(fn, y, first_pass_context=first)

    return run, plugin


def load_text() -> str:
    """The machine's load average (1 and 5 minutes) and CPU count: other jobs included."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def measure(title: str, kinds: list[str], make: Callable[[str], Callable[[], None]],
            steps: int, warmup: int, reference: str) -> dict[str, object]:
    steppers = {k: make(k) for k in kinds}
    load_before = load_text()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(warmup + steps):
        for k in kinds:
            t0 = time.perf_counter()
            steppers[k]()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[k].append(dt)
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    load_after = load_text()
    print(f"\n{title}: mean ms per step over {steps} steps (after {warmup} warm-up)")
    print(f"measured under: {load_before} before, {load_after} after")
    print(f"{'':<16}{'ms/step':>10}{'/ SGD':>8}{'median':>10}{'/ SGD':>8}")
    for k in kinds:
        print(f"{k:<16}{1e3 * mean[k]:>10.2f}{mean[k] / mean[reference]:>8.2f}"
              f"{1e3 * med[k]:>10.2f}{med[k] / med[reference]:>8.2f}")
    return {"mean": mean, "median": med, "load": [load_before, load_after]}


def fds_end_epoch_ms(factory: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                     bins: LabelBins) -> float:
    """FDS's once-per-epoch update after an epoch's worth (20 batches) of statistics."""
    from balanced_sam.baselines import FDS

    torch.manual_seed(0)
    model = factory()
    fds = FDS(model.feature_dim, bins)
    with torch.no_grad():
        feats = model.forward_features(x)
    for _ in range(20):
        fds.collect(feats, y, 0)
    t0 = time.perf_counter()
    fds.end_epoch(0)
    return 1e3 * (time.perf_counter() - t0)


def run_model(label: str, factory: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
              bins: LabelBins, args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}

    def fresh(make: Callable[..., object]) -> Callable[[str], Callable[[], None]]:
        def build(kind: str) -> Callable[[], None]:
            torch.manual_seed(0)  # the same initial weights for every entry
            model = factory().train()
            made = make(kind, model, x, y, bins)
            return made[0] if isinstance(made, tuple) else made  # type: ignore[return-value]
        return build

    if args.only in ("all", "optimizers"):
        out["optimizers"] = measure(f"{label}, optimizers", args.optimizers,
                                    fresh(optimizer_step), args.steps, args.warmup, "sgd")
    if args.only in ("all", "baselines"):
        out["baselines"] = measure(f"{label}, baselines (as the loop runs them)", BASELINES,
                                   fresh(baseline_step), args.steps, args.warmup, "vanilla")
        ms = fds_end_epoch_ms(factory, x, y, bins)
        print(f"{'(fds end_epoch)':<16}{ms:>10.2f}   once per epoch")
        out["fds_end_epoch_ms"] = ms
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", choices=["all", "optimizers", "baselines"], default="all")
    ap.add_argument("--models", default="resnet,cnn,mlp",
                    help="comma-separated: resnet, cnn, mlp (default all three)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help=f"comma-separated optimizer entries, sgd first (default: all: "
                         f"{','.join(OPTIMIZERS)})")
    ap.add_argument("--smoke", action="store_true", help="small batches, few steps")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 5), 1
    if args.steps % 5:
        ap.error("--steps must be a multiple of 5 (whole interval=5 cycles)")
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not args.optimizers or args.optimizers[0] != "sgd" \
            or set(args.optimizers) - set(OPTIMIZERS):
        ap.error(f"--optimizers takes a comma-separated list starting with sgd, from "
                 f"{', '.join(OPTIMIZERS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"resnet", "cnn", "mlp"}:
        ap.error("--models takes a comma-separated list of resnet, cnn, mlp")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    g = torch.Generator().manual_seed(0)
    train_labels = (torch.distributions.Exponential(0.05).sample((20000,)).clamp(max=99)).floor()
    bins = LabelBins.from_labels(train_labels, bin_width=1, lower=0, upper=100)
    tail_label = float(torch.nonzero(bins.counts < 20).reshape(-1)[0])

    def batch_labels(n: int) -> torch.Tensor:
        yb = train_labels[torch.randint(0, 20000, (n,), generator=g)]
        yb[:4] = tail_label  # ImbSAM takes its full step only when the batch has tail samples
        return yb

    specs = {
        "resnet": ("ResNet-18, 32x32", 16 if args.smoke else 64,
                   lambda b: torch.randn(b, 3, 32, 32, generator=g), ResNetRegressor),
        "cnn": ("SmallCNN (8, 16 channels), 28x28", 32 if args.smoke else 128,
                lambda b: torch.randn(b, 1, 28, 28, generator=g),
                lambda: SmallCNN(channels=(8, 16), hidden=64)),
        "mlp": ("MLP 30-256-256-1", 64 if args.smoke else 256,
                lambda b: torch.randn(b, 30, generator=g), lambda: MLP(30, (256, 256))),
    }
    res: dict[str, object] = {}
    for m in models:
        title, batch, inputs, factory = specs[m]
        y = batch_labels(batch)
        present = {bins.regions()[k] for k in bins.bin_index(y).tolist()}
        regions = [r for r in ("many", "medium", "few") if r in present]
        print(f"\n== {title}, batch {batch} ({int(torch.unique(y).numel())} distinct labels; "
              f"regions {'/'.join(regions)}: CC-SAM takes {2 * len(regions)} passes)")
        res[m] = run_model(f"{title}, batch {batch}", factory, inputs(batch), y, bins, args)
    if "resnet" in res and "optimizers" in res["resnet"]:
        r = res["resnet"]["optimizers"]["mean"]  # type: ignore[index]
        goals = [("BalancedSAM / SAM", "bsam", "sam", 1.03),
                 ("BalancedSAM / SGD", "bsam", "sgd", 2.1),
                 ("bsam-i5 / SGD", "bsam-i5", "sgd", 1.3),
                 ("bsam-l5 / SGD", "bsam-l5", "sgd", 1.3)]
        shown = [f"{text} = {r[a] / r[b]:.3f} (goal <= {goal})" for text, a, b, goal in goals
                 if a in r and b in r]
        if "ccsam" in r and "sam" in r:
            shown.append(f"CC-SAM / SAM = {r['ccsam'] / r['sam']:.3f}")
        if shown:
            print("\nResNet: " + ", ".join(shown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
