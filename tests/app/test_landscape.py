"""Loss landscapes: directions after Li et al. (2018), closed forms, exact restoration.

Tolerances: float64 closed forms to 1e-10 relative (only rounding separates them); the origin
against a direct float32 evaluation to 1e-6 relative (summation order differs); filter norms to
1e-6 relative (the 1e-10 guard in the denominator); restoration and the origin's parameters are
compared bit for bit (torch.equal).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from balanced_sam.analysis import Landscape, loss_landscape, random_direction, select
from balanced_sam.bins import LabelBins


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.head = nn.Linear(3, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.fc(h.flatten(1))))


def trained_convnet() -> ConvNet:
    torch.manual_seed(0)
    net = ConvNet()
    net.train()
    net(torch.randn(16, 2, 4, 4))  # non-trivial running statistics
    return net


def data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g)
    y = (torch.rand(n, generator=g) ** 3 * 10).floor()
    return x, y


def test_filter_normalisation_and_zeroed_bias_bn_directions() -> None:
    net = trained_convnet()
    d = random_direction(net, seed=3)
    for (name, p), di in zip(net.named_parameters(), d):
        assert di.shape == p.shape and di.dtype == p.dtype
        if p.dim() <= 1:  # conv/fc biases, BN weight and bias
            assert torch.count_nonzero(di) == 0, name
        else:
            wn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            dn = di.reshape(di.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-6, atol=0)
    # layer normalisation: whole tensors; ignore=None: 1-D directions are the weights (Li's code)
    d2 = random_direction(net, seed=3, norm="layer", ignore=None)
    for p, di in zip(net.parameters(), d2):
        if p.dim() <= 1:
            assert torch.equal(di, p.detach())
        else:
            assert float(di.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-6)
    # seeded: same seed same direction, another seed another one
    assert all(torch.equal(a, b) for a, b in zip(d, random_direction(net, seed=3)))
    assert not torch.equal(d[0], random_direction(net, seed=4)[0])


def test_origin_equals_loss_at_trained_parameters_and_params_restored() -> None:
    net = trained_convnet()
    x, y = data()
    bins = LabelBins.from_labels(y, bin_width=1.0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ls = loss_landscape(net, x, y, bins, regions=("all", "few", "many"), dim=2, steps=5,
                        batch_size=10)
    assert net.training  # mode restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k  # parameters copied back bit for bit, buffers untouched
    net.eval()
    with torch.no_grad():
        err = (net(x).squeeze(-1) - y).abs().double()
    for region in ("all", "few", "many"):
        m = select(y, bins, region)
        expected = float(err[m].mean()) if m.any() else math.nan
        assert ls.counts[region] == int(m.sum())
        assert ls.values[region]["loss"].shape == (5, 5)
        for got in (ls.values[region]["loss"][2, 2], ls.origin[region]["loss"],
                    ls.values[region]["mae"][2, 2]):
            if math.isnan(expected):
                assert math.isnan(got)
            else:
                assert got == pytest.approx(expected, rel=1e-6)


class QuadraticRow(nn.Module):
    """Prediction 0.5 w A w^T for a (1, d) weight: one filter, so the direction is rescaled to
    ||w||; with loss = pred the landscape is the quadratic itself."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.reshape(1, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.w @ self.a @ self.w.T).reshape(()).expand(x.shape[0])


def test_slices_of_a_quadratic_match_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(4, 4, generator=g, dtype=torch.float64)
    a = b @ b.T + torch.eye(4, dtype=torch.float64)
    w = torch.randn(4, generator=g, dtype=torch.float64)
    model = QuadraticRow(a, w)
    x, y = torch.zeros(6, 1), torch.zeros(6)
    alphas = np.linspace(-2, 2, 9)

    def f(v: torch.Tensor) -> float:
        return float(0.5 * v @ a @ v)

    ls = loss_landscape(model, x, y, loss_fn=lambda p, t: p, alphas=alphas, seed=7)
    d = random_direction(model, seed=7)[0].reshape(-1)  # the first draw of the same generator
    assert float(d.norm()) == pytest.approx(float(w.norm()), rel=1e-9)  # 1e-10 guard
    expected = [f(w + t * d) for t in alphas]
    np.testing.assert_allclose(ls.values["all"]["loss"], expected, rtol=1e-10)
    # 2-D with explicit directions
    d1, d2 = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    betas = [-1.0, 0.0, 0.5]
    ls2 = loss_landscape(model, x, y, loss_fn=lambda p, t: p, alphas=alphas, betas=betas,
                         directions=[[d1], [d2]])
    expected2 = [[f(w + s * d1[0] + t * d2[0]) for t in betas] for s in alphas]
    np.testing.assert_allclose(ls2.values["all"]["loss"], expected2, rtol=1e-10)
    assert ls2.dim == 2 and ls2.minimum()["loss"] == pytest.approx(np.min(expected2), rel=1e-10)


def test_regions_share_directions_and_mae_is_reported_for_any_loss() -> None:
    net = trained_convnet()
    x, y = data()
    bins = LabelBins.from_labels(y, bin_width=1.0)
    mse = lambda p, t: (p - t) ** 2  # noqa: E731
    both = loss_landscape(net, x, y, bins, ("all", "few"), mse, steps=5, seed=1)
    few = loss_landscape(net, x, y, bins, ("few",), mse, steps=5, seed=1)
    np.testing.assert_allclose(both.values["few"]["loss"], few.values["few"]["loss"], rtol=1e-12)
    # at one grid point, the region means are those of a manual evaluation
    d = random_direction(net, seed=1)
    with torch.no_grad():
        for p, di in zip(net.parameters(), d):
            p.add_(di, alpha=0.5)
        net.eval()
        pred = net(x).squeeze(-1)
    m = select(y, bins, "few")
    r = pred[m] - y[m]
    assert both.values["few"]["loss"][3] == pytest.approx(float((r**2).mean()), rel=1e-5)
    assert both.values["few"]["mae"][3] == pytest.approx(float(r.abs().mean()), rel=1e-5)


def test_restored_after_an_error_and_deterministic() -> None:
    net = trained_convnet()
    x, y = data()
    before = [p.detach().clone() for p in net.parameters()]
    calls = {"n": 0}

    def flaky(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return (p - t).abs()

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape(net, x, y, loss_fn=flaky, steps=7, batch_size=32)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    a = loss_landscape(net, x, y, steps=5, seed=2)
    b = loss_landscape(net, x, y, steps=5, seed=2)
    c = loss_landscape(net, x, y, steps=5, seed=3)
    np.testing.assert_array_equal(a.values["all"]["loss"], b.values["all"]["loss"])
    assert not np.array_equal(a.values["all"]["loss"], c.values["all"]["loss"])


def test_iterable_input_and_extra_masks() -> None:
    net = trained_convnet()
    x, y = data()
    bins = LabelBins.from_labels(y, bin_width=1.0)
    loader = [(x[i:i + 24], y[i:i + 24]) for i in range(0, len(y), 24)]
    mask = torch.arange(len(y)) % 3 == 0
    a = loss_landscape(net, x, y, bins, ("all", "few"), steps=3, masks={"thirds": mask})
    b = loss_landscape(net, loader, None, bins, ("all", "few"), steps=3, masks={"thirds": mask})
    for r in ("all", "few", "thirds"):
        np.testing.assert_allclose(b.values[r]["loss"], a.values[r]["loss"], rtol=1e-6)
    assert a.counts["thirds"] == int(mask.sum())


def test_save_and_load_npz_json_with_an_empty_region(tmp_path) -> None:
    net = trained_convnet()
    x, y = data()
    bins = LabelBins(np.arange(11.0), [5] * 10)  # every bin few-shot: many/medium hold nobody
    ls = loss_landscape(net, x, y, bins, ("all", "few", "many", "medium"), dim=2, steps=3)
    empty = [r for r in ("few", "many", "medium") if ls.counts[r] == 0]
    assert empty == ["many", "medium"], ls.counts
    assert np.isnan(ls.values[empty[0]]["loss"]).all()
    assert ls.minimum(empty[0])["index"] is None
    for path in (tmp_path / "l.npz", tmp_path / "l.json"):
        (ls.save_json if path.suffix == ".json" else ls.save_npz)(path)
        back = Landscape.load(path)
        assert back.dim == 2 and back.counts == ls.counts and back.meta["seed"] == 0
        np.testing.assert_array_equal(back.alphas, ls.alphas)
        np.testing.assert_array_equal(back.betas, ls.betas)
        for r in ls.values:
            for m in ("loss", "mae"):
                np.testing.assert_array_equal(back.values[r][m], ls.values[r][m])
    json.loads((tmp_path / "l.json").read_text())  # strict JSON (NaN written as null)
    assert "NaN" not in (tmp_path / "l.json").read_text()


def test_bad_arguments() -> None:
    net = trained_convnet()
    x, y = data(8)
    with pytest.raises(ValueError, match="needs bins"):
        loss_landscape(net, x, y, regions=("few",))
    with pytest.raises(ValueError, match="dim"):
        loss_landscape(net, x, y, dim=3)
    with pytest.raises(ValueError, match="norm"):
        random_direction(net, norm="weight")
    with pytest.raises(ValueError, match="direction"):
        loss_landscape(net, x, y, directions=[random_direction(net)[:2]])
