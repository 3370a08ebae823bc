"""Step time of plain SGD, SAM, BalancedSAM and ImbSAM (also with interval=5), one process.

    python benchmarks/step_cost.py            # ResNet-18 at 32x32 (batch 64) and MLP (batch 256)
    python benchmarks/step_cost.py --smoke    # a few steps on tiny models, seconds

The optimizers are timed round-robin (one step of each in turn), so a slow phase of the machine
hits all of them alike. Each optimizer's cost is the mean time per step over ``--steps`` steps
after ``--warmup`` steps (a multiple of 5 steps, so ``interval=5`` runs whole cycles of one
fresh perturbation and four reuses; its median would show only the cheap steps); the median
is printed beside it. The ResNet is torchvision's resnet18 with a one-output head at 32x32
input (its standard stem). Goals: BalancedSAM / SAM <= 1.03 and BalancedSAM / SGD <= 2.1
(issue 2); BalancedSAM with interval=5 <= 1.3x SGD (issue 13), on the ResNet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from balanced_sam import SAM, BalancedSAM, ImbSAM, LabelBins
from balanced_sam.models import MLP


def make_resnet(small: bool) -> nn.Module:
    import torchvision

    if small:
        return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock,
                                                [1, 1, 1, 1], num_classes=1)
    return torchvision.models.resnet18(num_classes=1)


def make_step(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              bins: LabelBins) -> Callable[[], None]:
    kw = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)

    def loss_fn() -> torch.Tensor:
        return (model(x).reshape(-1) - y).abs()

    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), **kw)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn().mean().backward()
            opt.step()

        return step
    name, _, k = kind.partition("-k")
    interval = int(k) if k else 1
    if name == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, interval=interval, **kw)
    elif name == "bsam":
        opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=0.05,
                          interval=interval, **kw)
    elif name == "imbsam":
        opt = ImbSAM(model.parameters(), torch.optim.SGD, bins, rho=0.05, interval=interval,
                     **kw)
    else:
        raise ValueError(kind)
    return lambda: opt.step(loss_fn, y)


def measure(name: str, build_model: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
            bins: LabelBins, steps: int, warmup: int) -> dict[str, float]:
    kinds = ["sgd", "sam", "bsam", "imbsam", "sam-k5", "bsam-k5", "imbsam-k5"]
    steppers = {}
    for k in kinds:
        torch.manual_seed(0)
        model = build_model()
        model.train()
        steppers[k] = make_step(k, model, x, y, bins)
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
    print(f"\n{name}: mean seconds per step over {steps} steps (after {warmup} warm-up)")
    print(f"{'optimizer':<12}{'s/step':>10}{'/ SGD':>9}{'/ SAM':>9}{'median':>10}")
    for k in kinds:
        print(f"{k:<12}{mean[k]:>10.4f}{mean[k] / mean['sgd']:>9.3f}"
              f"{mean[k] / mean['sam']:>9.3f}{med[k]:>10.4f}")
    return {"mean": mean, "median": med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, few steps")
    ap.add_argument("--json", help="also write the medians to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 5), 1
    if args.steps % 5:
        ap.error("--steps must be a multiple of 5 (whole interval=5 cycles)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    g = torch.Generator().manual_seed(0)
    # long-tailed integer labels 0..99 so ImbSAM's tail is non-empty in most batches
    train_labels = (torch.distributions.Exponential(0.05).sample((20000,)).clamp(max=99)).floor()
    bins = LabelBins.from_labels(train_labels, bin_width=1, lower=0, upper=100)

    tail_label = float(torch.nonzero(bins.counts < 20).reshape(-1)[0])

    def batch_labels(n: int) -> torch.Tensor:
        # labels of the training distribution, plus 4 tail labels so that ImbSAM does its
        # full two-pass step (a batch without tail samples is a plain step for ImbSAM)
        y = train_labels[torch.randint(0, 20000, (n,), generator=g)]
        y[:4] = tail_label
        return y

    res = {}
    batch = 16 if args.smoke else 64
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = batch_labels(batch)
    res["resnet18_32px"] = measure(
        f"ResNet-18{' (small)' if args.smoke else ''}, 32x32, batch {batch}",
        lambda: make_resnet(args.smoke), x, y, bins, args.steps, args.warmup)

    batch = 64 if args.smoke else 256
    x = torch.randn(batch, 30, generator=g)
    y = batch_labels(batch)
    res["mlp_256x256"] = measure(f"MLP 30-256-256-1, batch {batch}",
                                 lambda: MLP(30, (256, 256)), x, y, bins, args.steps,
                                 args.warmup)
    r = res["resnet18_32px"]["mean"]
    print(f"\nResNet: BalancedSAM / SAM = {r['bsam'] / r['sam']:.3f} (goal <= 1.03), "
          f"BalancedSAM / SGD = {r['bsam'] / r['sgd']:.3f} (goal <= 2.1), "
          f"BalancedSAM interval=5 / SGD = {r['bsam-k5'] / r['sgd']:.3f} (goal <= 1.3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
