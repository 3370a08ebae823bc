"""BalancedSAM with Hugging Face Accelerate, gradient accumulation included.

``accelerator.prepare(opt)`` wraps BalancedSAM in an ``AcceleratedOptimizer`` whose
``step(closure)`` passes the closure on; BalancedSAM runs it at theta and at theta + eps, and
the closure weights its losses with ``bsam.reduce(per_sample_losses, targets)`` (perturbation
weights in the first pass, update weights in the second).

Gradient accumulation: why not ``with accelerator.accumulate(model)``. That context manager
counts micro-batches; on K-1 of every K it turns ``AcceleratedOptimizer.step()`` and
``zero_grad()`` into no-ops (and skips DDP's all-reduce), and ``accelerator.backward`` divides
each loss by K, so K backward passes add up to the gradient of the whole batch before the one
real step. That suits optimizers that need one gradient per step. SAM needs two, both of the
whole batch: eps from the gradient of all K micro-batches at theta, then the update gradient of
all K micro-batches at theta + eps. Calling ``opt.step(closure)`` per micro-batch inside
``accumulate()`` drops the closure on K-1 micro-batches and steps on the K-th alone; calling
the inner optimizer's step to get around the no-op (the usual workaround) takes a full SAM step
on every micro-batch, i.e. no accumulation at all.

Done right (:func:`accumulation_closure`): keep the K micro-batches of a step, and hand
``step`` one closure that loops over all of them in each pass, every micro-batch's weighted
loss scaled by its share of the batch, with ``accelerator.no_sync(model)`` on all but the last
backward of a pass so that DDP all-reduces once per pass. The result equals one
``bsam.step(loss_fn, targets)`` on the whole batch (up to float rounding, for models without
batch statistics). Build the ``Accelerator`` with ``gradient_accumulation_steps=1`` (the
default) so that ``step`` is never turned into a no-op. fp16 mixed precision is not available
this way (``GradScaler.step`` refuses closures); use bf16 or fp32.

Run it (CPU, a few seconds)::

    python examples/accelerate_bsam.py --accumulate 4
    accelerate launch --num_processes 2 examples/accelerate_bsam.py --accumulate 4
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from balanced_sam import BalancedSAM, LabelBins

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l1(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 loss of a ``(B, 1)`` head against ``(B,)`` targets."""
    return (pred.squeeze(-1) - y).abs()


def accumulation_closure(accelerator: Accelerator, model: nn.Module, bsam: BalancedSAM,
                         micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         loss_fn: LossFn = l1, record: list[float] | None = None
                         ) -> Callable[[], torch.Tensor]:
    """A closure for ``AcceleratedOptimizer.step`` that runs one pass over all micro-batches.

    Each micro-batch's weighted loss ``bsam.reduce(losses, y)`` (a mean over the micro-batch)
    is multiplied by its share of the batch's elements, so the summed gradient is that of the
    whole batch's weighted mean. The closure zeroes the gradients first (PyTorch's closure
    semantics) and returns the batch's weighted loss, also appended to ``record`` if given
    (``AcceleratedOptimizer.step`` does not pass the closure's return value on).
    """
    total = sum(y.numel() for _, y in micro_batches)
    last = len(micro_batches) - 1

    def closure() -> torch.Tensor:
        bsam.zero_grad(set_to_none=True)
        batch_loss = torch.zeros(())
        for i, (x, y) in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == last else accelerator.no_sync(model)
            with sync:
                loss = bsam.reduce(loss_fn(model(x), y), y) * (y.numel() / total)
                accelerator.backward(loss)
            batch_loss = batch_loss + loss.detach().cpu()
        if record is not None:
            record.append(float(batch_loss))
        return batch_loss

    return closure


def train(model: nn.Module, bsam: BalancedSAM, loader: DataLoader, *, accumulate: int = 1,
          epochs: int = 1, accelerator: Accelerator | None = None,
          loss_fn: LossFn = l1) -> dict[str, Any]:
    """Train with one BalancedSAM step per ``accumulate`` micro-batches (a shorter step at the
    end of an epoch takes what is left). Returns the step count and the last step's loss at
    theta (weighted for the perturbation)."""
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    accelerator = accelerator or Accelerator(cpu=True)
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("build the Accelerator with gradient_accumulation_steps=1: this loop "
                         "accumulates itself (see the module docstring)")
    model, opt, loader = accelerator.prepare(model, bsam, loader)
    model.train()
    steps, losses = 0, []  # losses: both passes of every step
    for _ in range(epochs):
        micro: list[tuple[torch.Tensor, torch.Tensor]] = []
        for x, y in loader:
            micro.append((x, y))
            if len(micro) == accumulate:
                opt.step(accumulation_closure(accelerator, model, bsam, micro, loss_fn, losses))
                steps, micro = steps + 1, []
        if micro:
            opt.step(accumulation_closure(accelerator, model, bsam, micro, loss_fn, losses))
            steps += 1
    # the first pass's loss of the last step (at theta, perturbation weights)
    return {"steps": steps, "loss": losses[-2] if len(losses) >= 2 else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accumulate", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (60 * torch.sigmoid(1.5 * x[:, 0] - 1.0) ** 2 + x[:, 1]).clamp(0, 60)
    bins = LabelBins.from_labels(y, bin_width=2.0, lower=0, upper=62)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    bsam = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=0.05, lr=0.05,
                       momentum=0.9)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    loader = DataLoader(TensorDataset(x, y), batch_size=args.micro_batch, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    out = train(model, bsam, loader, accumulate=args.accumulate, epochs=args.epochs,
                accelerator=accelerator)
    accelerator.print(f"{out['steps']} BalancedSAM steps of {args.accumulate} micro-batches; "
                      f"last weighted loss {out['loss']:.4f}")


if __name__ == "__main__":
    main()
