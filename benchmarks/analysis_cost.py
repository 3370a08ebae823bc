"""Cost of the sharpness analysis (issue 5): ResNet-18 at 32x32 on 1,000 samples, on the CPU.

    python benchmarks/analysis_cost.py              # the issue's setting (minutes on 2 cores)
    python benchmarks/analysis_cost.py --smoke      # tiny model and data, seconds
    python benchmarks/analysis_cost.py --stem cifar # 3x3 stride-1 stem without max-pool

Model: :class:`balanced_sam.models.ResNetRegressor` (torchvision's resnet18, Kaiming init, one
output) with its standard stem, as the other benchmarks use at 32x32 (``--stem cifar`` swaps in
the CIFAR stem, which keeps 32x32 feature maps in the first stage and costs ~16x more). Data:
Gaussian images with long-tailed integer labels in [0, 100); the bins come from 5,000 training
labels of the same law, so the few-shot region is the sparse tail (labels above ~50, ~8 %).

Parts timed, each for regions ``all`` and ``few`` (the paper's Table 8 columns):
* ``lambda_max``: power iteration, exactly ``--iters`` Hessian-vector products (``tol=0``);
* ``trace``: Hutchinson with ``--probes`` Rademacher probes;
* ``landscape``: a 1-D landscape with ``--points`` points, all regions in the same passes.
The cost is set by the model and the data, not by the weights, so the untrained model is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
from torch import nn

from balanced_sam.analysis import (
    HessianOperator,
    hessian_top_eigenvalue,
    hessian_trace,
    loss_landscape,
    select,
)
from balanced_sam.bins import LabelBins


def make_model(stem: str, smoke: bool) -> nn.Module:
    if smoke:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))
    from balanced_sam.models import ResNetRegressor

    torch.manual_seed(0)
    model = ResNetRegressor("resnet18")
    if stem == "cifar":
        conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        model.backbone.conv1 = conv
        model.backbone.maxpool = nn.Identity()
    return model


def long_tailed(n: int, gen: torch.Generator) -> torch.Tensor:
    """Exponential labels (scale 20) floored to integers in [0, 99]."""
    u = torch.rand(n, generator=gen).clamp_min(1e-12)
    return (-20.0 * u.log()).floor().clamp_max(99)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--points", type=int, default=21)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--stem", choices=("torchvision", "cifar"), default="torchvision")
    ap.add_argument("--cache-graph", action="store_true",
                    help="keep the first-order graphs between Hessian-vector products")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 64 samples, 3 of each")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.samples, args.iters, args.probes, args.points = 64, 3, 3, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 3, 32, 32, generator=gen)
    y = long_tailed(args.samples, gen)
    bins = LabelBins.from_labels(long_tailed(5_000, gen), bin_width=1.0, lower=0, upper=100)
    model = make_model(args.stem, args.smoke)
    counts = {r: int(select(y, bins, r).sum()) for r in ("all", "few")}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {'smoke CNN' if args.smoke else 'ResNet-18 (' + args.stem + ' stem)'}, "
          f"{n_params:,} parameters; samples: {counts}; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}, cache_graph {args.cache_graph}",
          flush=True)

    common = {"bins": bins, "batch_size": args.batch_size, "seed": 0,
              "cache_graph": args.cache_graph}
    seconds: dict[str, float] = {}

    def record(part: str, t0: float) -> None:
        seconds[part] = time.perf_counter() - t0
        print(f"  {part}: {seconds[part]:.1f} s", flush=True)

    # one HVP over all samples, for scale (after a warm-up HVP)
    op = HessianOperator(model, None, x, y, batch_size=args.batch_size)
    v = torch.randn(op.numel, generator=gen)
    op.matvec(v)
    t0 = time.perf_counter()
    op.matvec(v)
    record("one HVP (all samples)", t0)
    del op

    for region in ("all", "few"):
        t0 = time.perf_counter()
        eig = hessian_top_eigenvalue(model, None, x, y, region=region, iters=args.iters, tol=0.0,
                                     **common)
        record(f"lambda_max {region} ({eig.iterations} iters)", t0)
        t0 = time.perf_counter()
        tr = hessian_trace(model, None, x, y, region=region, probes=args.probes, **common)
        record(f"trace {region} ({tr.probes} probes)", t0)
        print(f"  {region}: lambda_max {eig.eigenvalue:.4g}, trace {tr.trace:.4g} "
              f"+- {tr.std_error:.2g}", flush=True)
    t0 = time.perf_counter()
    loss_landscape(model, x, y, bins, ("all", "few"), steps=args.points,
                   batch_size=args.batch_size)
    record(f"landscape 1-D ({args.points} points, all+few)", t0)
    total = sum(v for k, v in seconds.items() if not k.startswith("one HVP"))
    seconds["total (analysis parts)"] = total
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    width = max(map(len, seconds))
    print(f"{'part':<{width}}  seconds")
    for k, val in seconds.items():
        print(f"{k:<{width}}  {val:8.1f}")
    print(f"peak resident memory: {peak_gb:.2f} GB")
    out = {"seconds": seconds, "counts": counts, "parameters": n_params, "stem": args.stem,
           "cache_graph": args.cache_graph, "load_after": os.getloadavg()[0],
           "samples": args.samples, "threads": torch.get_num_threads(),
           "peak_rss_gb": peak_gb, "smoke": args.smoke}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
