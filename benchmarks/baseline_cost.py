"""Median training-step time of every issue-11 baseline against plain L1, in one process.

    python benchmarks/baseline_cost.py            # MLP (batch 256) and SmallCNN 28x28 (batch 256)
    python benchmarks/baseline_cost.py --smoke    # a few steps on small batches, seconds

One step = forward, loss (and regulariser), backward, SGD step, on one model per method (same
initial weights). Methods are timed round-robin (one step of each in turn) so a slow phase of
the machine hits all alike; each figure is the median over ``--steps`` steps after
``--warmup``. Labels are long-tailed integers 0..99 (about 60 distinct values in a batch of
256), so RankSim's unique-label subset and ConR's pairs are realistic. ``fds`` includes the
per-batch calibration and statistics collection; its once-per-epoch update is timed apart.
``rnc`` is a stage-1 step: two views through the encoder and the RnC loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from balanced_sam import LabelBins
from balanced_sam.baselines import (
    FDS,
    BNILoss,
    ConR,
    GAILoss,
    OrdinalEntropy,
    RankSim,
    focal_l1_loss,
    rnc_loss,
)
from balanced_sam.losses import balanced_mse_loss
from balanced_sam.models import MLP, SmallCNN

METHODS = ["l1", "focal-l1", "bmc", "bni", "gai", "ranksim", "conr", "ordinal-entropy", "fds",
           "rnc"]


def make_step(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              bins: LabelBins, train_labels: torch.Tensor) -> Callable[[], None]:
    params = list(model.parameters())
    extra: dict[str, nn.Module] = {}
    if method == "bni":
        extra["loss"] = BNILoss.from_bins(bins, value="lower")
    elif method == "gai":
        extra["loss"] = GAILoss.from_labels(train_labels, n_components=8)
    elif method == "bmc":
        extra["sigma"] = nn.ParameterList([nn.Parameter(torch.tensor(1.0))])
    elif method == "ranksim":
        extra["reg"] = RankSim()
    elif method == "conr":
        extra["reg"] = ConR()
    elif method == "ordinal-entropy":
        extra["reg"] = OrdinalEntropy()
    elif method == "fds":
        fds = FDS(model.feature_dim, bins)
        with torch.no_grad():  # statistics of a first epoch, so that calibration runs
            fds.collect(model.forward_features(x), y, 0)
        fds.end_epoch(0)
        extra["fds"] = fds
    for m in extra.values():
        params += list(m.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x2 = x + 0.01 * torch.randn_like(x)  # a second "view" for RnC

    def loss() -> torch.Tensor:
        if method == "rnc":
            f1, f2 = model.forward_features(torch.cat([x, x2])).split(x.shape[0])
            return rnc_loss(f1, y, f2)
        if method == "fds":
            pred, _ = extra["fds"].model_forward(model, x, y, epoch=1, collect=True)
            return (pred - y).abs().mean()
        if method in ("ranksim", "conr", "ordinal-entropy"):
            pred, feats = model(x, return_features=True)
            base = (pred - y).abs().mean()
            if method == "conr":
                return base + extra["reg"](feats, y, pred)
            return base + extra["reg"](feats, y)
        pred = model(x)
        if method == "l1":
            return (pred - y).abs().mean()
        if method == "focal-l1":
            return focal_l1_loss(pred, y).mean()
        if method == "bmc":
            return balanced_mse_loss(pred, y, extra["sigma"][0].square()).mean()
        return extra["loss"](pred, y).mean()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return step


def measure(name: str, factory: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
            bins: LabelBins, train_labels: torch.Tensor, steps: int, warmup: int
            ) -> dict[str, float]:
    steppers = {}
    for k in METHODS:
        torch.manual_seed(0)
        model = factory().train()
        steppers[k] = make_step(k, model, x, y, bins, train_labels)
    times: dict[str, list[float]] = {k: [] for k in METHODS}
    for i in range(warmup + steps):
        for k in METHODS:
            t0 = time.perf_counter()
            steppers[k]()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    # FDS's once-per-epoch update: fold in an epoch's worth (20 batches) of statistics
    torch.manual_seed(0)
    model = factory()
    fds = FDS(model.feature_dim, bins)
    with torch.no_grad():
        feats = model.forward_features(x)
    for _ in range(20):
        fds.collect(feats, y, 0)
    t0 = time.perf_counter()
    fds.end_epoch(0)
    med["fds_end_epoch"] = time.perf_counter() - t0
    print(f"\n{name}: median ms per step over {steps} steps (after {warmup} warm-up)")
    print(f"{'method':<17}{'ms/step':>9}{'/ L1':>8}")
    for k in METHODS:
        print(f"{k:<17}{1e3 * med[k]:>9.2f}{med[k] / med['l1']:>8.2f}")
    print(f"{'(fds end_epoch)':<17}{1e3 * med['fds_end_epoch']:>9.2f}   once per epoch")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="small batches, few steps")
    ap.add_argument("--json", help="also write the medians to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 3), 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    g = torch.Generator().manual_seed(0)
    train_labels = (torch.distributions.Exponential(0.05).sample((20000,)).clamp(max=99)).floor()
    bins = LabelBins.from_labels(train_labels, bin_width=1, lower=0, upper=100)
    batch = 64 if args.smoke else 256
    y = train_labels[torch.randint(0, 20000, (batch,), generator=g)]
    print(f"labels: long-tailed integers 0..99, {int(torch.unique(y).numel())} distinct in a "
          f"batch of {batch}")
    res = {}
    x = torch.randn(batch, 30, generator=g)
    res["mlp_256x256"] = measure(f"MLP 30-256-256-1, batch {batch}",
                                 lambda: MLP(30, (256, 256)), x, y, bins, train_labels,
                                 args.steps, args.warmup)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    res["small_cnn_28px"] = measure(f"SmallCNN 28x28, batch {batch}", SmallCNN, x, y, bins,
                                    train_labels, args.steps, args.warmup)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
