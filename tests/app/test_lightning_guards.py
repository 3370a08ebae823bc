"""The Lightning pitfalls that used to fail silently: gradient accumulation by the Trainer, a
step of the inner optimizer that bypasses Lightning's wrapper, and which pass's loss is logged.
Skips without ``lightning``."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("lightning")

import lightning as L  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from balanced_sam import BalancedSAM, LabelBins  # noqa: E402
from balanced_sam.optim import AccumulatedGradientWarning  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*(num_workers|does not have many workers).*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]
STEPS = 4
BATCH = 16


def data() -> tuple[torch.Tensor, torch.Tensor, LabelBins]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH, 4, generator=g)
    y = (10 * torch.sigmoid(2 * x[:, 0]) ** 2).clamp(0, 10)
    return x, y, LabelBins.from_labels(y, bin_width=1.0, lower=0, upper=11)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


class Tiny(L.LightningModule):
    """``mode``: "automatic" (the closure; ``log_first`` logs only in the first pass), "manual"
    (the one-call step through the wrapper) or "bypass" (the inner optimizer's step)."""

    def __init__(self, bins: LabelBins, mode: str, log_first: bool = True) -> None:
        super().__init__()
        self.net, self.bins, self.mode, self.log_first = net(), bins, mode, log_first
        self.automatic_optimization = mode == "automatic"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        wrapper = self.optimizers()
        bsam = wrapper.optimizer
        if self.mode == "automatic":
            loss = bsam.reduce((self(x) - y).abs(), y)
            if bsam.first_pass or not self.log_first:
                self.log("train_loss", loss)
            return loss
        step = wrapper.step if self.mode == "manual" else bsam.step
        loss = step(closure=lambda: (self(x) - y).abs(), targets=y)
        self.log("train_loss", loss)
        return None

    def configure_optimizers(self):
        return BalancedSAM(self.parameters(), torch.optim.SGD, self.bins, rho=0.05, lr=0.05)


class Logged(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics["train_loss"]))


def fit(model: Tiny, steps: int = STEPS, **kwargs) -> tuple[L.Trainer, Logged]:
    x, y, _ = data()
    logged = Logged()
    trainer = L.Trainer(max_steps=steps, max_epochs=1, enable_checkpointing=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, callbacks=[logged], **kwargs)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=BATCH))
    return trainer, logged


def reference_losses() -> tuple[list[float], list[float]]:
    """Each step's loss at theta and at theta + eps, from a plain step(closure) loop."""
    x, y, bins = data()
    model = net()
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=0.05, lr=0.05)
    first, second = [], []
    for xb, yb in DataLoader(TensorDataset(x, y), batch_size=BATCH):
        seen = []

        def closure(xb=xb, yb=yb, seen=seen):
            opt.zero_grad()
            loss = opt.reduce((model(xb).squeeze(-1) - yb).abs(), yb)
            loss.backward()
            seen.append(float(loss.detach()))
            return loss

        returned = opt.step(closure)
        assert len(seen) == 2 and float(returned.detach()) == seen[0]
        first.append(seen[0])
        second.append(seen[1])
    assert first != second
    return first, second


@pytest.mark.e2e  # trains with Lightning's Trainer
def test_trainer_accumulation_warns_and_names_the_alternative():
    _, _, bins = data()
    with pytest.warns(AccumulatedGradientWarning, match=r"accumulate_grad_batches.*"
                      r"accumulate=K.*manual optimization"):
        fit(Tiny(bins, "automatic"), steps=2, accumulate_grad_batches=2)


@pytest.mark.e2e  # trains with Lightning's Trainer
def test_inner_optimizer_step_warns_that_lightning_does_not_count_it():
    _, _, bins = data()
    with pytest.warns(UserWarning, match=r"optimizers\(\)\.optimizer\.step.*global_step stays "
                      r"0.*self\.optimizers\(\)\.step\(closure=loss_fn, targets=y\)"):
        trainer, logged = fit(Tiny(bins, "bypass"), steps=2)  # (one epoch: max_steps is
    assert trainer.global_step == 0 and len(logged.values) == STEPS  # never reached)


@pytest.mark.e2e  # trains with Lightning's Trainer
@pytest.mark.parametrize("mode", ["automatic", "manual"])
def test_the_documented_forms_warn_nothing_and_log_the_first_pass(mode):
    _, _, bins = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccumulatedGradientWarning)
        warnings.filterwarnings("error", message=".*Lightning does not count.*")
        trainer, logged = fit(Tiny(bins, mode))
    assert trainer.global_step == STEPS
    first, _ = reference_losses()
    assert logged.values == pytest.approx(first, rel=1e-6, abs=1e-7)


@pytest.mark.e2e  # trains with Lightning's Trainer
def test_unguarded_log_in_automatic_optimization_is_the_second_pass():
    # what lightning.md says: training_step runs twice, the last self.log wins
    _, _, bins = data()
    _, logged = fit(Tiny(bins, "automatic", log_first=False))
    _, second = reference_losses()
    assert logged.values == pytest.approx(second, rel=1e-6, abs=1e-7)


def test_plain_closure_loops_do_not_warn():
    x, y, bins = data()
    model = net()
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=0.05, lr=0.05)

    def closure(zero):
        if zero == "opt":
            opt.zero_grad()
        elif zero == "model":
            model.zero_grad()
        loss = opt.reduce((model(x).squeeze(-1) - y).abs(), y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error", AccumulatedGradientWarning)
        for zero in ("opt", "model", "opt", "outside"):
            if zero == "outside":  # zeroed in place before the step, a closure that does not
                opt.zero_grad(set_to_none=False)
            opt.step(lambda zero=zero: closure(zero))
    # a closure that does not zero, after a step that left its gradients: warned
    with pytest.warns(AccumulatedGradientWarning, match="did not zero the gradients"):
        opt.step(lambda: closure("none"))


def test_shape_error_names_the_call_that_was_made():
    x, y, bins = data()
    model = net()
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins)
    n = len(y)
    # the trap next to lightning.md's snippet: a (B, 1) head minus (B,) targets is (B, B)
    with pytest.raises(ValueError, match=rf"^opt\.reduce\(\) was given losses of shape \({n}, "
                       rf"{n}\).*squeeze the prediction"):
        opt.reduce((model(x) - y).abs(), y)
    with pytest.raises(ValueError, match=rf"^loss_fn returned losses of shape \({n}, {n}\)"):
        opt.step(lambda: (model(x) - y).abs(), y)
