"""The loop's robustness options (issue 9 item 4, issue 13): gradient clipping in every method,
skipped non-finite steps counted, the SAM interval as a config option and as a method name."""

from __future__ import annotations

import math

import pytest
import torch

from balanced_sam import LabelBins
from balanced_sam.config import TrainConfig
from balanced_sam.errors import ConfigError
from balanced_sam.methods import build_stepper, get_method
from balanced_sam.models import MLP
from balanced_sam.train import fit, seed_everything


def _data(n: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (torch.exp(0.8 * x[:, 0]) * 10 + x[:, 1]).clamp(0, 99)
    return (x[:200], y[:200]), (x[200:250], y[200:250]), (x[250:], y[250:])


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=50, lr=0.05, progress=False, rho=0.05, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_config_checks_the_new_options():
    assert TrainConfig.from_dict({"max_grad_norm": "1e-1"}).max_grad_norm == 0.1
    for bad, key in (({"max_grad_norm": 0}, "max_grad_norm"), ({"max_grad_norm": math.inf},
                     "max_grad_norm"), ({"interval": 0}, "interval"),
                     ({"interval": 2.5}, "interval")):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            TrainConfig.from_dict(bad)


def test_interval_methods_are_sam_family_names_with_a_suffix():
    m = get_method("bsam-i5")
    base = get_method("bsam")
    assert m.optimizer_options == {"interval": 5} and m.sharpness == base.sharpness
    assert (m.update_weighting, m.perturbation_weighting) == ("sqrt_inv", "sqrt_inv")
    assert get_method("imbsam-i10").optimizer_options["interval"] == 10
    with pytest.raises(ValueError, match="needs a SAM-family method"):
        get_method("sqinv-i5")
    with pytest.raises(ValueError, match="must be >= 1"):
        get_method("sam-i0")
    with pytest.raises(ValueError, match="unknown method 'nope-i5'"):
        get_method("nope-i5")
    bins = LabelBins.from_labels(torch.arange(100.0), bin_width=10)
    model = MLP(5, (4,))
    opt, step = build_stepper(get_method("sam-i3"), model.parameters(), bins,
                              _cfg(interval=7, max_grad_norm=1e-3, weight_decay=0.0))
    assert opt.interval == 3  # the method's interval wins
    x, y = torch.randn(20, 5), torch.arange(20.0)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    step(lambda: (model(x) - y).abs(), y)
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    assert 0 < moved.norm() <= 0.05 * 1e-3 * 1.01  # the step's max_grad_norm clipped it (lr 0.05)
    opt, _ = build_stepper(get_method("sam"), MLP(5, (4,)).parameters(), bins, _cfg(interval=7))
    assert opt.interval == 7


def _fit(method: str, **kw):
    tr, va, te = _data()
    bins = LabelBins.from_labels(tr[1], bin_width=10, lower=0, upper=100)
    seed_everything(0)
    model = MLP(5, (16,))
    res = fit(model, tr, va, bins, _cfg(method=method, **kw), test_data=te,
              log=lambda s: None)
    return res, [p.detach().clone() for p in model.parameters()]


@pytest.mark.e2e
def test_bsam_i5_is_bsam_with_train_interval_5():
    (a, pa), (b, pb), (_, pc) = _fit("bsam-i5"), _fit("bsam", interval=5), _fit("bsam")
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert a.test == b.test
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc))


def test_plain_step_clips_like_clip_grad_norm():
    tr, _, _ = _data()
    bins = LabelBins.from_labels(tr[1], bin_width=10, lower=0, upper=100)
    cfg = _cfg(method="sqinv", max_grad_norm=0.01, momentum=0.0, weight_decay=0.0)
    seed_everything(1)
    model = MLP(5, (8,))
    twin = MLP(5, (8,))
    twin.load_state_dict(model.state_dict())
    _, step = build_stepper(get_method("sqinv"), model.parameters(), bins, cfg)
    x, y = tr[0][:50], tr[1][:50]
    step(lambda: (model(x) - y).abs(), y)
    # by hand: the same weighted loss, clipped to norm 0.01, one SGD step
    w = bins.sample_weights(y, "sqrt_inv", "mean")
    ((twin(x) - y).abs() * w).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    assert norm > 0.01  # the clipping was active
    with torch.no_grad():
        for p in twin.parameters():
            p -= 0.05 * p.grad
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["vanilla", "sqinv", "sam", "bsam"])
def test_a_nonfinite_gradient_is_skipped_and_counted(method):
    tr, _, _ = _data()
    bins = LabelBins.from_labels(tr[1], bin_width=10, lower=0, upper=100)
    seed_everything(0)
    model = MLP(5, (8,))
    opt, step = build_stepper(get_method(method), model.parameters(), bins, _cfg())
    x, y = tr[0][:50], tr[1][:50]
    step(lambda: (model(x) - y).abs(), y)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state_dict()["state"].get(0, {}).items()
             if torch.is_tensor(v)}
    bad = x.clone()
    bad[3] = math.nan
    step(lambda: (model(bad) - y).abs(), y)
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = opt.state_dict()["state"].get(0, {})
    assert all(torch.equal(v, after[k]) for k, v in state.items())  # momentum untouched
    step(lambda: (model(x) - y).abs(), y)
    assert opt.skipped_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.e2e
def test_fit_reports_skipped_steps_per_epoch_and_in_all():
    tr, va, te = _data()
    x = tr[0].clone()
    x[7] = math.nan  # one poisoned row: one batch per epoch has a NaN gradient
    bins = LabelBins.from_labels(tr[1], bin_width=10, lower=0, upper=100)
    seed_everything(0)
    res = fit(MLP(5, (8,)), (x, tr[1]), va, bins, _cfg(method="bsam", epochs=3), test_data=te,
              log=lambda s: None)
    assert [r["skipped_steps"] for r in res.history] == [1, 1, 1]
    assert res.skipped_steps == 3
    assert math.isfinite(res.test["all"]["mae"])
