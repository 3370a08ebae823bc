"""Rank-N-Contrast: the loss against a hand value and a naive loop (the loop's two stages are
tested with the training loop, tests/baselines/test_baselines_loop.py)."""

from __future__ import annotations

import math

import pytest
import torch

from balanced_sam.baselines import RnCLoss, rnc_loss


def _naive_rnc(v: list[list[float]], y: list[float], tau: float) -> float:
    """The paper's L_RnC with explicit loops."""
    n = len(y)

    def s(i: int, j: int) -> float:
        return -math.dist(v[i], v[j]) / tau

    total = 0.0
    for i in range(n):
        for j in range(n):
            if j == i:
                continue
            negs = [k for k in range(n) if k != i and abs(y[i] - y[k]) >= abs(y[i] - y[j])]
            total += -math.log(math.exp(s(i, j)) / sum(math.exp(s(i, k)) for k in negs))
    return total / (n * (n - 1))


def test_rnc_hand_value() -> None:
    v = torch.tensor([[0.0], [1.0], [3.0]], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 2.0])
    loss = rnc_loss(v, y, temperature=1.0)
    e = math.exp
    logs = [
        math.log(e(-1) / (e(-1) + e(-3))), 0.0,                     # anchor 0: j = 1, j = 2
        math.log(e(-1) / (e(-1) + e(-2))), math.log(e(-2) / (e(-1) + e(-2))),  # anchor 1
        0.0, math.log(e(-2) / (e(-3) + e(-2))),                     # anchor 2: j = 0, j = 1
    ]
    assert loss.item() == pytest.approx(-sum(logs) / 6, rel=1e-6)
    loss.backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_rnc_two_views_match_the_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        f1 = torch.randn(4, 3, generator=g, dtype=torch.float64)
        f2 = torch.randn(4, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (4,), generator=g).double()   # repeated labels: ties
        got = rnc_loss(f1, y, f2, temperature=2.0)
        want = _naive_rnc(torch.cat([f1, f2]).tolist(), y.tolist() * 2, 2.0)
        assert got.item() == pytest.approx(want, rel=1e-10)
    assert RnCLoss(0.5)(f1, y, f2).item() == pytest.approx(rnc_loss(f1, y, f2, 0.5).item())


def test_rnc_far_apart_features_stay_finite() -> None:
    g = torch.Generator().manual_seed(3)
    f = torch.randn(5, 3, generator=g) * 200  # logits down to about -500 / tau
    y = torch.tensor([0.0, 1.0, 3.0, 4.0, 9.0])
    got = rnc_loss(f, y, temperature=1.0)
    assert got.item() == pytest.approx(_naive_rnc(f.double().tolist(), y.tolist(), 1.0),
                                       rel=1e-4)


def test_rnc_identical_views_keep_a_finite_gradient() -> None:
    f = torch.randn(3, 2, requires_grad=True)
    loss = rnc_loss(f, torch.tensor([1.0, 2.0, 4.0]), f)  # zero distance between the views
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_rnc_errors() -> None:
    with pytest.raises(ValueError, match="temperature"):
        rnc_loss(torch.randn(3, 2), torch.zeros(3), temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        rnc_loss(torch.randn(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="features2"):
        rnc_loss(torch.randn(3, 2), torch.zeros(3), torch.randn(2, 2))
    with pytest.raises(ValueError, match="two samples"):
        rnc_loss(torch.randn(1, 2), torch.zeros(1))
