"""examples/accelerate_bsam.py: BalancedSAM through Accelerate's optimizer wrapper, with
gradient accumulation, matches ``step(loss_fn, targets)`` on the whole batch; the naive
``accelerator.accumulate()`` use does not. Skips without ``accelerate``."""

from __future__ import annotations

import warnings

import pytest
import torch
from _repo_scripts import load_repo_script

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from balanced_sam import BalancedSAM, LabelBins  # noqa: E402
from balanced_sam.optim import BalancingNotAppliedWarning  # noqa: E402

ex = load_repo_script("examples/accelerate_bsam.py", "accelerate_bsam_example")

N, MICRO, K, EPOCHS = 200, 10, 4, 2  # 20 micro-batches per epoch: 5 steps of 4


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g)
    y = (40 * torch.rand(N, generator=g) ** 3).round()
    return x, y, LabelBins.from_labels(y, bin_width=1.0, lower=0, upper=41)


def fresh(bins):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.05,
                      momentum=0.9)
    return model, opt


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def one_call_reference(x, y, bins, batch: int):
    """BalancedSAM.step(loss_fn, targets) over batches of ``batch`` rows, in order."""
    model, opt = fresh(bins)
    for _ in range(EPOCHS):
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=batch):
            opt.step(lambda xb=xb, yb=yb: ex.l1(model(xb), yb), yb)
    return state(model)


def assert_close_params(got, want, init):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(want[k], init[k]) for k in want), "nothing trained"


def test_accumulated_steps_equal_whole_batch_steps():
    x, y, bins = data()
    model, opt = fresh(bins)
    init = state(model)
    passes = []

    def counting_l1(pred, yb):
        passes.append(len(yb))
        return ex.l1(pred, yb)

    loader = DataLoader(TensorDataset(x, y), batch_size=MICRO)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BalancingNotAppliedWarning)
        out = ex.train(model, opt, loader, accumulate=K, epochs=EPOCHS,
                       accelerator=Accelerator(cpu=True), loss_fn=counting_l1)
    steps = EPOCHS * N // (MICRO * K)
    assert out["steps"] == steps
    # each step: two passes (theta, theta + eps), each over all K micro-batches
    assert len(passes) == steps * 2 * K and set(passes) == {MICRO}
    assert_close_params(state(model), one_call_reference(x, y, bins, MICRO * K), init)
    # not the same as stepping on every micro-batch
    per_micro = one_call_reference(x, y, bins, MICRO)
    assert any((state(model)[k] - per_micro[k]).abs().max() > 1e-3 for k in per_micro)


def test_accumulation_matches_core_accumulate_and_ragged_tail():
    """23 micro-batches with K=4: five full steps and one of the 3 left over."""
    x, y, bins = data()
    x, y = x[:115], y[:115]
    model, opt = fresh(bins)
    init = state(model)
    out = ex.train(model, opt, DataLoader(TensorDataset(x, y), batch_size=5), accumulate=K,
                   epochs=1, accelerator=Accelerator(cpu=True))
    assert out["steps"] == 6
    ref, ref_opt = fresh(bins)
    for start in range(0, 115, 20):
        xb, yb = x[start:start + 20], y[start:start + 20]
        k = len(yb) // 5
        # core's own accumulation: loss_fn(chunk) per micro-batch of the batch
        ref_opt.step(lambda c, xb=xb, yb=yb: ex.l1(ref(xb[c]), yb[c]), yb, accumulate=k)
    assert_close_params(state(model), state(ref), init)


def test_naive_accumulate_context_does_not_accumulate():
    """What the example explains: inside accelerator.accumulate(), AcceleratedOptimizer.step
    is a no-op on K-1 of K micro-batches, so the closure never sees them."""
    x, y, bins = data()
    model, bsam = fresh(bins)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=K)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        ex.train(model, bsam, DataLoader(TensorDataset(x, y), batch_size=MICRO),
                 accumulate=K, accelerator=accelerator)
    model, opt, loader = accelerator.prepare(model, bsam,
                                             DataLoader(TensorDataset(x, y), batch_size=MICRO))
    seen = []
    for xb, yb in loader:
        with accelerator.accumulate(model):
            def closure(xb=xb, yb=yb):
                seen.append(len(yb))
                bsam.zero_grad()
                loss = bsam.reduce(ex.l1(model(xb), yb), yb)
                accelerator.backward(loss)
                return loss
            opt.step(closure)
    assert len(seen) == 2 * (N // MICRO) // K  # only every K-th micro-batch, twice
    Accelerator(cpu=True, gradient_accumulation_steps=1)  # restore the shared state


@pytest.mark.e2e
def test_accelerate_example_runs_as_a_script(capsys):
    ex.main(["--accumulate", "2", "--epochs", "1"])
    assert "16 BalancedSAM steps of 2 micro-batches" in capsys.readouterr().out
