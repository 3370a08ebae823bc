"""Non-finite gradients (issue 8 item 9), interval=k (issue 13), accumulate=K and
max_grad_norm (issue 12) for SAM, BalancedSAM and ImbSAM."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _optim_helpers import (
    KINDS,
    data,
    flat_params,
    grad_of,
    skewed_bins,
    tiny_model,
)
from _optim_helpers import make_optimizer as make
from torch import nn

from balanced_sam import SAM, BalancedSAM, ImbSAM

# every test here runs in float64 (the fixture is in tests/optim/conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")


def losses_of(model, x, y):
    return (model(x).squeeze(-1) - y).abs()


# ---------------------------------------------------------------------- non-finite gradients
def poisoned(model, x, y, bad_call, value=math.nan):
    """loss_fn whose ``bad_call``-th call (1-based) returns a NaN/inf loss."""
    calls = []

    def loss_fn():
        calls.append(1)
        out = losses_of(model, x, y)
        return out * value if len(calls) == bad_call else out

    return loss_fn, calls


def base_state(opt):
    return copy.deepcopy(opt.base_optimizer.state_dict()["state"])


@pytest.mark.parametrize("kind,bad_call", [("sam", 1), ("sam", 2), ("bsam", 1), ("bsam", 2),
                                           ("imbsam", 1), ("imbsam", 2), ("imbsam", 3)])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_gradient_skips_the_whole_step(kind, bad_call, value):
    """Call 1 is the first pass (ImbSAM: the head pass), the last the update pass."""
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    ref = tiny_model()
    opt = make(kind, model, bins, momentum=0.9)
    ref_opt = make(kind, ref, bins, momentum=0.9)
    for m, o in ((model, opt), (ref, ref_opt)):  # a first good step: momentum buffers exist
        o.step(lambda m=m: losses_of(m, x, y), y)
    before, state = flat_params(model), base_state(opt)
    loss_fn, calls = poisoned(model, x, y, bad_call, value)
    opt.step(loss_fn, y)
    assert len(calls) >= bad_call
    assert torch.equal(flat_params(model), before)  # no NaN written, perturbation undone
    after = base_state(opt)
    assert all(torch.equal(after[k]["momentum_buffer"], state[k]["momentum_buffer"])
               for k in state)
    assert opt.skipped_steps == 1 and opt.last_step_perturbed is False
    assert all(p.grad is None for p in model.parameters())
    # and the run goes on as if the bad batch never came
    x2, y2 = data(seed=1)
    opt.step(lambda: losses_of(model, x2, y2), y2)
    ref_opt.step(lambda: losses_of(ref, x2, y2), y2)
    assert torch.equal(flat_params(model), flat_params(ref))
    assert opt.state_dict()["sam"]["skipped_steps"] == 1


def test_nonfinite_in_two_step_and_closure_forms():
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.1)
    before = flat_params(model)
    opt.reduce(losses_of(model, x, y) * math.nan, y).backward()
    assert opt.first_step(zero_grad=True) is False
    opt.reduce(losses_of(model, x, y), y).backward()
    opt.second_step()
    assert torch.equal(flat_params(model), before) and opt.skipped_steps == 1
    opt.reduce(losses_of(model, x, y), y).backward()
    assert opt.first_step(zero_grad=True) is True
    opt.reduce(losses_of(model, x, y) * math.inf, y).backward()
    opt.second_step()
    assert torch.equal(flat_params(model), before) and opt.skipped_steps == 2
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = opt.reduce(losses_of(model, x, y) * (math.nan if len(calls) == 2 else 1), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.equal(flat_params(model), before) and opt.skipped_steps == 3
    opt.step(lambda: losses_of(model, x, y), y)
    assert opt.skipped_steps == 3 and not torch.equal(flat_params(model), before)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_scaler_skips_are_counted(kind):
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    opt = make(kind, model, bins)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for bad_call in (1, 2):
        before = flat_params(model)
        loss_fn, _ = poisoned(model, x, y, bad_call, math.inf)
        opt.step(loss_fn, y, scaler=scaler)
        assert torch.equal(flat_params(model), before)
        scale = scaler.get_scale()
        scaler.update()
        assert scaler.get_scale() < scale
    assert opt.skipped_steps == 2
    opt.step(lambda: losses_of(model, x, y), y, scaler=scaler)
    scaler.update()
    assert opt.skipped_steps == 2 and not torch.equal(flat_params(model), before)


def test_zero_gradient_still_steps_without_perturbation():
    x, y = data()
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, weight_decay=0.1)
    before = flat_params(model)
    opt.step(lambda: 0.0 * losses_of(model, x, y), y)
    assert opt.skipped_steps == 0 and opt.last_step_perturbed is False
    torch.testing.assert_close(flat_params(model), before * (1 - 0.1 * 0.1))  # weight decay only


# ---------------------------------------------------------------------- interval
def test_interval_reuses_the_last_perturbation():
    """interval=3 by hand: fresh eps at steps 0, 3, 6; theta + eps_old in between."""
    x, y = data()
    model = tiny_model()
    ref = copy.deepcopy(model)
    rho, lr, k = 0.2, 0.1, 3
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, interval=k)
    calls = []
    eps = None
    for t in range(7):
        x, y = data(seed=t)
        n0 = len(calls)

        def loss_fn(x=x, y=y):
            calls.append(1)
            return losses_of(model, x, y)

        opt.step(loss_fn, y)
        assert len(calls) - n0 == (2 if t % k == 0 else 1)
        assert opt.last_step_perturbed
        theta = flat_params(ref)
        if t % k == 0:
            g = grad_of(ref, losses_of(ref, x, y).mean())
            eps = rho * g / g.norm()
        torch.nn.utils.vector_to_parameters(theta + eps, ref.parameters())
        g2 = grad_of(ref, losses_of(ref, x, y).mean())
        torch.nn.utils.vector_to_parameters(theta - lr * g2, ref.parameters())
        torch.testing.assert_close(flat_params(model), flat_params(ref), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_interval_closure_and_one_call_agree(kind):
    bins = skewed_bins()
    m1, m2 = tiny_model(), tiny_model()
    o1 = make(kind, m1, bins, momentum=0.9, interval=2)
    o2 = make(kind, m2, bins, momentum=0.9, interval=2)
    counts = []
    for t in range(5):
        x, y = data(seed=t)
        o1.step(lambda x=x, y=y: losses_of(m1, x, y), y)
        n = []

        def closure(x=x, y=y, n=n):
            n.append(1)
            o2.zero_grad()
            loss = o2.reduce(losses_of(m2, x, y), y)
            loss.backward()
            return loss

        o2.step(closure)
        counts.append(len(n))
    assert torch.equal(flat_params(m1), flat_params(m2))
    full = 3 if kind == "imbsam" else 2
    assert counts == [full, full - 1, full, full - 1, full]


@pytest.mark.parametrize("kind", KINDS)
def test_interval_state_dict_round_trip(kind):
    bins = skewed_bins()

    def run(model, opt, seeds):
        for s in seeds:
            x, y = data(seed=s)
            opt.step(lambda x=x, y=y: losses_of(model, x, y), y)

    model = tiny_model()
    opt = make(kind, model, bins, base=torch.optim.Adam, lr=1e-2, interval=3)
    run(model, opt, range(4))  # mid-interval: the next step reuses the stored eps
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved[1]["sam"]["step"] == 4 and saved[1]["sam"]["eps_valid"]
    assert sum("eps" in st for st in saved[1]["state"].values()) == 4
    run(model, opt, range(4, 9))
    model2 = tiny_model(seed=5)
    model2.load_state_dict(saved[0])
    opt2 = make(kind, model2, bins, base=torch.optim.Adam, lr=1e-2, interval=3)
    opt2.load_state_dict(saved[1])
    run(model2, opt2, range(4, 9))
    assert torch.equal(flat_params(model2), flat_params(model))
    # an old state dict (no "sam" entry, no stored eps) loads and refreshes at once
    old = copy.deepcopy(saved[1])
    del old["sam"]
    old["state"] = {}
    opt2.load_state_dict(old)
    assert opt2.perturbation_due()


def test_interval_validation():
    model = tiny_model()
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="interval"):
            SAM(model.parameters(), torch.optim.SGD, lr=0.1, interval=bad)


# ---------------------------------------------------------------------- accumulate
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
def test_accumulated_step_equals_full_batch_step(kind, masked):
    bins = skewed_bins()
    m1, m2 = tiny_model(), tiny_model()
    o1, o2 = make(kind, m1, bins, momentum=0.9), make(kind, m2, bins, momentum=0.9)
    chunks_seen = []
    for t in range(3):
        x, y = data(seed=t)
        mask = (torch.arange(64) % 4 != t) if masked else None

        def reg(m):
            return 0.05 * m[0].weight.square().sum()

        l1 = o1.step(lambda x=x, y=y: (losses_of(m1, x, y), reg(m1)), y, mask=mask)

        def loss_fn(chunk, x=x, y=y):
            chunks_seen.append((chunk.start, chunk.stop))
            return losses_of(m2, x[chunk], y[chunk]), reg(m2)

        l2 = o2.step(loss_fn, y, mask=mask, accumulate=3)
        assert l2.item() == pytest.approx(l1.item(), rel=1e-12)
    torch.testing.assert_close(flat_params(m1), flat_params(m2), rtol=1e-12, atol=1e-13)
    assert chunks_seen[:3] == [(0, 22), (22, 43), (43, 64)]


def test_accumulate_with_scaler_and_errors():
    bins = skewed_bins()
    x, y = data()
    m1, m2 = tiny_model(), tiny_model()
    o1 = BalancedSAM(m1.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.1)
    o2 = BalancedSAM(m2.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    o1.step(lambda: losses_of(m1, x, y), y)
    o2.step(lambda c: losses_of(m2, x[c], y[c]), y, accumulate=4, scaler=scaler)
    scaler.update()
    torch.testing.assert_close(flat_params(m1), flat_params(m2), rtol=1e-12, atol=1e-13)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="accumulate must be"):
            o2.step(lambda c: losses_of(m2, x[c], y[c]), y, accumulate=bad)
    with pytest.raises(ValueError, match="accumulate=65"):
        o2.step(lambda c: losses_of(m2, x[c], y[c]), y, accumulate=65)
    with pytest.raises(ValueError, match=r"shape \(64,\) for targets of shape \(16,\)"):
        o2.step(lambda c: losses_of(m2, x, y), y, accumulate=4)  # forgot to slice


# ---------------------------------------------------------------------- max_grad_norm
@pytest.mark.parametrize("form", ["one_call", "two_step"])
def test_max_grad_norm_clips_the_update_gradient(form):
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    ref = copy.deepcopy(model)
    rho, lr, c = 0.1, 0.5, 0.05
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=rho, lr=lr)
    if form == "one_call":
        opt.step(lambda: losses_of(model, x, y), y, max_grad_norm=c)
    else:
        opt.reduce(losses_of(model, x, y), y).backward()
        opt.first_step(zero_grad=True)
        opt.reduce(losses_of(model, x, y), y).backward()
        opt.second_step(max_grad_norm=c)
    w = bins.sample_weights(y)
    theta = flat_params(ref)
    g = grad_of(ref, (w * losses_of(ref, x, y)).mean())
    torch.nn.utils.vector_to_parameters(theta + rho * g / g.norm(), ref.parameters())
    g2 = grad_of(ref, (w * losses_of(ref, x, y)).mean())
    assert g2.norm() > c  # the clip is active
    expected = theta - lr * g2 * (c / (g2.norm() + 1e-6))
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-10, atol=1e-12)


def test_max_grad_norm_after_unscaling_and_validation():
    bins = skewed_bins()
    x, y = data()
    m1, m2 = tiny_model(), tiny_model()
    o1 = ImbSAM(m1.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.5)
    o2 = ImbSAM(m2.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    o1.step(lambda: losses_of(m1, x, y), y, max_grad_norm=0.05)
    o2.step(lambda: losses_of(m2, x, y), y, scaler=scaler, max_grad_norm=0.05)
    torch.testing.assert_close(flat_params(m1), flat_params(m2), rtol=1e-12, atol=1e-13)
    m3 = tiny_model()
    o3 = ImbSAM(m3.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.5)
    o3.step(lambda: losses_of(m3, x, y), y)
    assert not torch.allclose(flat_params(m1), flat_params(m3))  # the clip changed the step
    before = flat_params(m1)
    for bad in (0, -1.0, math.nan, math.inf, "1"):
        with pytest.raises(ValueError, match="max_grad_norm"):
            o1.step(lambda: losses_of(m1, x, y), y, max_grad_norm=bad)
    assert torch.equal(flat_params(m1), before)


# ---------------------------------------------------------------------- ImbSAM BatchNorm
def test_imbsam_repeated_pass_at_theta_leaves_batchnorm_alone_with_model():
    bins = skewed_bins()
    x, y = data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))
    probe = copy.deepcopy(net)
    with torch.no_grad():
        probe(x)  # what one forward at theta does to the statistics
    for model_arg, tracked in ((net, 2), (None, 3)):
        m = copy.deepcopy(net)
        opt = ImbSAM(m.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.1)
        opt.step(lambda m=m: losses_of(m, x, y), y, model=m if model_arg is not None else None,
                 bn_second_pass="freeze" if model_arg is not None else "update")
        assert int(m[1].num_batches_tracked) == (1 if model_arg is not None else tracked)
        if model_arg is not None:  # frozen in the repeated and the perturbed pass
            torch.testing.assert_close(m[1].running_mean, probe[1].running_mean)
