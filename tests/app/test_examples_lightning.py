"""examples/lightning_bsam.py: BalancedSAM under Lightning matches the one-call
``step(loss_fn, targets)`` loop, counts its steps, writes checkpoints and resumes exactly.
Skips without ``lightning`` (``pip install 'balanced-sam[lightning]'``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _repo_scripts import load_repo_script

pytest.importorskip("lightning")
pytest.importorskip("torchmetrics")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from balanced_sam import BalancedSAM, LabelBins  # noqa: E402
from balanced_sam.optim import BalancingNotAppliedWarning  # noqa: E402

ex = load_repo_script("examples/lightning_bsam.py", "lightning_bsam_example")

BATCHES_PER_EPOCH = 8
pytestmark = [
    pytest.mark.e2e,  # trains with Lightning's Trainer
    pytest.mark.filterwarnings("ignore:.*val_dataloader.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*dirpath has changed.*"),
]


@pytest.fixture(scope="module")
def setup():
    x, y = ex.long_tailed_data(256)
    bins = LabelBins.from_labels(y, bin_width=2.0, lower=0, upper=62)
    return x, y, bins


def loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=len(y) // BATCHES_PER_EPOCH)


def one_call_reference(x, y, bins, epochs: int) -> dict[str, torch.Tensor]:
    """The plain loop: BalancedSAM.step(loss_fn, targets) on the same batches."""
    net = ex.make_net(seed=0)
    opt = BalancedSAM(net.parameters(), torch.optim.SGD, bins, rho=0.05, lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for xb, yb in loader(x, y):
            opt.step(lambda xb=xb, yb=yb: (net(xb).squeeze(-1) - yb).abs(), yb)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def params_of(model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for k, v in model.state_dict().items()
            if k.startswith("net.")}


def assert_same_params(got, want):
    assert got.keys() == want.keys()
    moved = False
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
        moved |= not torch.equal(want[k], ex.make_net(seed=0).state_dict()[k])
    assert moved, "the reference did not train"


def fit(model, out, epochs, x, y, ckpt_path=None):
    trainer = ex.make_trainer(out, epochs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(model, loader(x, y), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_matches_one_call_step_and_resumes(setup, tmp_path, manual):
    x, y, bins = setup
    # a BalancedSAM step that skipped the weighting would warn: make that an error here
    with warnings.catch_warnings():
        warnings.simplefilter("error", BalancingNotAppliedWarning)
        model = ex.BSAMRegressor(ex.make_net(seed=0), bins, manual=manual)
        trainer = fit(model, tmp_path / "ck", 2, x, y)
    assert trainer.global_step == 2 * BATCHES_PER_EPOCH
    assert_same_params(params_of(model), one_call_reference(x, y, bins, 2))

    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["epoch0.ckpt", "epoch1.ckpt", "last.ckpt"], names
    ck = torch.load(tmp_path / "ck" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 2 * BATCHES_PER_EPOCH
    assert LabelBins.from_dict(ck["label_bins"]) == bins
    (opt_state,) = ck["optimizer_states"]
    buffers = [s["momentum_buffer"] for s in _base_states(opt_state)]
    assert buffers and all(b.abs().sum() > 0 for b in buffers)  # the SGD momentum is saved

    # resume from the end of epoch 1 for one more epoch == three epochs unbroken
    resumed = ex.BSAMRegressor(ex.make_net(seed=7), bins, manual=manual)
    trainer = fit(resumed, tmp_path / "ck2", 3, x, y, ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert trainer.global_step == 3 * BATCHES_PER_EPOCH
    assert_same_params(params_of(resumed), one_call_reference(x, y, bins, 3))


def _base_states(state: dict) -> list[dict]:
    """Per-parameter states of the base optimizer inside a (wrapped) optimizer state dict."""
    found = []

    def walk(d):
        if isinstance(d, dict):
            if "momentum_buffer" in d:
                found.append(d)
                return
            for v in d.values():
                walk(v)

    walk(state)
    return found


def test_lightning_example_runs_as_a_script(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        ex.main(["--epochs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "global_step 12" in out  # 384 training rows / batch 32
    assert (tmp_path / "last.ckpt").is_file()
