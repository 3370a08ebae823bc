"""BalancedSAM in PyTorch Lightning, in automatic and in manual optimization.

Automatic optimization: Lightning's ``optimizer_step`` calls ``optimizer.step(closure=...)``,
and BalancedSAM runs that closure twice, at theta and at theta + eps. The closure is Lightning's
``training_step`` + ``backward``; ``training_step`` returns the weighted loss of the pass in
progress, ``opt.reduce(per_sample_losses, targets)``, which uses the perturbation weights
before ``first_step`` and the update weights after it; it logs only in the first pass
(``opt.first_pass``), so ``train_loss`` is the loss at theta in both modes.

Manual optimization: ``training_step`` calls the one-call form through Lightning's optimizer
wrapper, ``self.optimizers().step(closure=loss_fn, targets=y)``, where ``loss_fn()`` returns
per-sample losses; BalancedSAM weights, backpropagates and steps.

Either way the step goes through Lightning's ``LightningOptimizer.step``, so ``global_step``
advances, ``ModelCheckpoint`` writes checkpoints (the optimizer's ``state_dict`` holds the base
optimizer's momentum), and ``trainer.fit(..., ckpt_path=...)`` resumes exactly.

Do not combine it with ``Trainer(accumulate_grad_batches=K)``: Lightning would run the
closure's backward on K-1 micro-batches without a step, and SAM's two passes would see only the
last one (BalancedSAM warns: ``AccumulatedGradientWarning``). Use a larger batch, or
``BalancedSAM.step(loss_fn, targets, accumulate=K)`` in manual optimization.

Run it (CPU, a few seconds)::

    python examples/lightning_bsam.py                 # automatic optimization
    python examples/lightning_bsam.py --manual --epochs 4 --out runs/lightning
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from balanced_sam import BalancedSAM, LabelBins
from balanced_sam.integrations.torchmetrics import RegionMetric


def long_tailed_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy regression table whose targets (0-60) are long-tailed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (60 * torch.sigmoid(1.5 * x[:, 0] - 1.0) ** 2 + x[:, 1]).clamp(0, 60)
    return x, y


def make_net(in_dim: int = 8, hidden: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class BSAMRegressor(L.LightningModule):
    """A regressor trained with BalancedSAM (SGD base) on per-sample L1 losses.

    Args:
        net: the network (``(B, D) -> (B, 1)``).
        bins: the :class:`LabelBins` of the training labels (saved in the checkpoint).
        manual: manual optimization (the one-call step) instead of automatic (the closure).
        rho, lr, momentum: BalancedSAM's radius and the SGD settings.
    """

    def __init__(self, net: nn.Module, bins: LabelBins, manual: bool = False, rho: float = 0.05,
                 lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.net = net
        self.bins = bins
        self.automatic_optimization = not manual
        self.rho, self.lr, self.momentum = rho, lr, momentum
        # a torchmetrics Metric: self.log(...) computes it at the epoch's end, synced over ranks
        self.val_few_mae = RegionMetric(bins, region="few", metric="mae")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        bsam = self.optimizers()  # Lightning's wrapper; .optimizer is the BalancedSAM
        if self.automatic_optimization:
            # runs at theta, then at theta + eps: reduce() applies the weights of that pass
            loss = bsam.optimizer.reduce((self(x) - y).abs(), y)
            if bsam.optimizer.first_pass:  # log the loss at theta (the last log would win)
                self.log("train_loss", loss)
            return loss
        loss = bsam.step(closure=lambda: (self(x) - y).abs(), targets=y)
        self.log("train_loss", loss)  # the step returns the loss at theta
        return None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_few_mae.update(self(x), y)
        self.log("val_few_mae", self.val_few_mae)

    def configure_optimizers(self) -> BalancedSAM:
        return BalancedSAM(self.parameters(), torch.optim.SGD, self.bins, rho=self.rho,
                           lr=self.lr, momentum=self.momentum)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["label_bins"] = self.bins.to_dict()


def make_trainer(out: str | Path | None, max_epochs: int, **kwargs: Any) -> L.Trainer:
    """A CPU trainer writing ``last.ckpt`` and one checkpoint per epoch into ``out``."""
    callbacks = []
    if out is not None:
        callbacks.append(ModelCheckpoint(dirpath=out, filename="epoch{epoch}",
                                         auto_insert_metric_name=False, save_top_k=-1,
                                         every_n_epochs=1, save_last=True))
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                     callbacks=callbacks, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=out is not None,
                     num_sanity_val_steps=0, **kwargs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manual", action="store_true", help="manual optimization")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=None, help="checkpoint folder (default: none written)")
    ap.add_argument("--resume", default=None, help="a checkpoint to resume from")
    args = ap.parse_args(argv)
    x, y = long_tailed_data()
    bins = LabelBins.from_labels(y[:384], bin_width=2.0, lower=0, upper=62)
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=32)
    val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=64)
    model = BSAMRegressor(make_net(), bins, manual=args.manual)
    trainer = make_trainer(args.out, args.epochs)
    trainer.fit(model, train, val, ckpt_path=args.resume)
    print(f"global_step {trainer.global_step}, "
          f"val few-shot MAE {float(trainer.callback_metrics['val_few_mae']):.3f}")


if __name__ == "__main__":
    main()
