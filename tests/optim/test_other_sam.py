"""docs/other-sam.md's recipe: BalancedSAM(update_weighting="same") is any SAM on the
SQINV-weighted loss. The other SAM is a plain two-step SAM written here (first_step at theta,
second_step back to theta and the base step), not this package's."""

from __future__ import annotations

import torch
from torch import nn

from balanced_sam import BalancedSAM, LabelBins


class PlainSAM:
    """SAM as the papers write it: eps = rho g / (||g|| + 1e-16), base step with the gradient at
    theta + eps."""

    def __init__(self, params, base, rho: float, **kwargs) -> None:
        self.params = [p for p in params]
        self.base = base(self.params, **kwargs)
        self.rho = rho
        self.eps: list[torch.Tensor] = []

    @torch.no_grad()
    def first_step(self) -> None:
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in self.params))
        self.eps = [self.rho * p.grad / (norm + 1e-16) for p in self.params]
        for p, e in zip(self.params, self.eps):
            p.add_(e)
        self.base.zero_grad()

    @torch.no_grad()
    def second_step(self) -> None:
        for p, e in zip(self.params, self.eps):
            p.sub_(e)
        self.base.step()
        self.base.zero_grad()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))


def test_balanced_sam_is_any_sam_on_the_sqinv_weighted_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, 6, generator=g)
    y = (20 * torch.sigmoid(1.5 * x[..., 0] - 1) ** 2).clamp(0, 20)  # long-tailed labels
    bins = LabelBins.from_labels(y.flatten(), bin_width=1.0, lower=0, upper=21)
    ours, theirs = mlp(), mlp()
    bsam = BalancedSAM(ours.parameters(), torch.optim.SGD, bins, rho=0.05, lr=0.05,
                       momentum=0.9)
    other = PlainSAM(theirs.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)

    def weighted_loss(pred, yb):  # the recipe, as docs/other-sam.md writes it
        w = bins.sample_weights(yb, "sqrt_inv", "mean")
        return (w * (pred.squeeze(-1) - yb).abs()).mean()

    start = [p.detach().clone() for p in ours.parameters()]
    for xb, yb in zip(x, y):
        bsam.step(lambda xb=xb, yb=yb: (ours(xb).squeeze(-1) - yb).abs(), yb)
        weighted_loss(theirs(xb), yb).backward()
        other.first_step()
        weighted_loss(theirs(xb), yb).backward()
        other.second_step()
    for a, b, s in zip(ours.parameters(), theirs.parameters(), start):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.equal(a, s)  # it trained
    # and the weights matter: the unweighted loss takes another path
    plain = mlp()
    sam = PlainSAM(plain.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    for xb, yb in zip(x, y):
        for step in (sam.first_step, sam.second_step):
            (plain(xb).squeeze(-1) - yb).abs().mean().backward()
            step()
    with torch.no_grad():
        apart = max(float((a - b).abs().max()) for a, b in zip(ours.parameters(),
                                                                plain.parameters()))
    assert apart > 1e-4
