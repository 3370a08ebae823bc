"""Factories shared by the optimizer tests (tests/optim): a tiny model, random data, long-tailed
label bins, flat parameter and gradient vectors, one optimizer of each kind. Their sizes and
seeds are arguments, so a test states the numbers it is written against. The float64 default
dtype of the hand computations is the ``float64_default`` fixture of tests/optim/conftest.py."""

from __future__ import annotations

import torch
from torch import nn

from balanced_sam import CCSAM, SAM, BalancedSAM, ImbSAM, LabelBins

KINDS = ["sam", "bsam", "imbsam"]  # make_optimizer also builds "ccsam" (tests/test_ccsam.py)


def __getattr__(name: str):
    if name == "float64_default":  # an autouse fixture that applied only where it was imported
        raise ImportError("float64_default is a fixture of tests/optim/conftest.py now: mark the "
                          "module with pytestmark = pytest.mark.usefixtures(\"float64_default\")")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def data(n=64, d=4, seed=0):
    """``n`` inputs of ``d`` features and integer labels 0..9 (default dtype)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 10, (n,), generator=g).to(torch.get_default_dtype())
    return x, y


def tiny_model(d=4, hidden=6, seed=0):
    """Linear(d, hidden) - Tanh - Linear(hidden, 1), initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def skewed_bins():
    """Bins 0..9 with training counts from 200 down to 1: real imbalance, some tail bins."""
    counts = [200, 150, 100, 60, 30, 19, 10, 5, 2, 1]
    labels = torch.cat([torch.full((c,), float(k)) for k, c in enumerate(counts)])
    return LabelBins.from_labels(labels, bin_width=1, lower=0, upper=10)


def flat_params(model):
    """The model's parameters as one detached vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def grad_of(model, loss):
    """The gradient of ``loss`` with respect to the model's parameters, as one vector."""
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def make_optimizer(kind, model, bins, base=torch.optim.SGD, *, weighted_sam=False, **kw):
    """SAM, BalancedSAM, ImbSAM (eta 20) or CCSAM (regions, SQINV update) over ``model`` with
    lr 0.1 and rho 0.2 unless ``kw`` says otherwise; ``weighted_sam``: SAM with the sqrt_inv
    update weighting."""
    kw = {"lr": 0.1, "rho": 0.2, **kw}
    if kind == "sam":
        if weighted_sam:
            kw.update(bins=bins, update_weighting="sqrt_inv")
        return SAM(model.parameters(), base, **kw)
    if kind == "bsam":
        return BalancedSAM(model.parameters(), base, bins, **kw)
    if kind == "imbsam":
        return ImbSAM(model.parameters(), base, bins, eta=20, **kw)
    if kind == "ccsam":
        return CCSAM(model.parameters(), base, bins, update_weighting="sqrt_inv", **kw)
    raise ValueError(f"kind must be one of {KINDS} or 'ccsam', got {kind!r}")
