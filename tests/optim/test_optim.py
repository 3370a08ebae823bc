"""The optimizers against the mathematics they claim: eps by hand, norms, restores, equivalences."""

from __future__ import annotations

import copy
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from _optim_helpers import data as _data
from _optim_helpers import (
    flat_params,
    grad_of,
    skewed_bins,
)
from _optim_helpers import tiny_model as _tiny_model
from torch import nn

from balanced_sam import SAM, BalancedSAM, ImbSAM, LabelBins
from balanced_sam.optim import (
    BalancingNotAppliedWarning,
    PassWeighting,
    dual_norm_direction,
    frozen_bn_stats,
)

# float64: the hand computations compare at 1e-12 (the fixture is in tests/optim/conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")

# this module's defaults: 32 samples, 5 hidden units
data = partial(_data, n=32)
tiny_model = partial(_tiny_model, hidden=5)


def hand_eps(g: np.ndarray, rho: float, p: float) -> np.ndarray:
    """Eq. 4/10 written out in numpy."""
    if p == math.inf:
        return rho * np.sign(g)
    q = p / (p - 1)
    return rho * np.sign(g) * np.abs(g) ** (q - 1) / (np.sum(np.abs(g) ** q) ** (1 / p))


def perturbed_params(opt, model, loss):
    """Run first_step on ``loss``'s gradient and return eps = theta_perturbed - theta."""
    before = flat_params(model)
    opt.zero_grad()
    loss.backward()
    opt.first_step(zero_grad=True)
    eps = flat_params(model) - before
    opt.restore()
    return eps


@pytest.mark.parametrize("p", [2, 3, 1.5, math.inf])
def test_eps_matches_hand_computation(p):
    x, y = data()
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, p=p, lr=0.1)
    loss = (model(x).squeeze(-1) - y).abs().mean()
    g = grad_of(model, loss).numpy()
    eps = perturbed_params(opt, model, (model(x).squeeze(-1) - y).abs().mean())
    np.testing.assert_allclose(eps.numpy(), hand_eps(g, 0.3, p), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("p", [1, 1.2, 2, 3, 7, math.inf, "inf"])
def test_eps_has_p_norm_rho(p):
    x, y = data(seed=1)
    model = tiny_model(seed=1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.07, p=p, lr=0.1)
    eps = perturbed_params(opt, model, (model(x).squeeze(-1) - y).square().mean())
    pf = math.inf if p == "inf" else float(p)
    assert torch.linalg.vector_norm(eps, pf).item() == pytest.approx(0.07, rel=1e-9)


def test_p1_puts_rho_on_largest_entry():
    grads = [torch.tensor([0.5, -3.0]), torch.tensor([[1.0, 2.0]])]
    d, ok = dual_norm_direction(grads, 1.0)
    assert ok
    assert torch.equal(d[0], torch.tensor([0.0, -1.0])) and torch.equal(d[1], torch.zeros(1, 2))


def test_large_p_does_not_overflow():
    grads = [torch.tensor([1e30, -2e30, 3.0], dtype=torch.float32)]
    d, ok = dual_norm_direction(grads, 50.0)
    assert ok and torch.isfinite(d[0]).all()
    assert torch.linalg.vector_norm(d[0].double(), 50.0).item() == pytest.approx(1.0, rel=1e-5)


def test_restore_is_exact():
    """After a step with lr = 0 every parameter is bit-for-bit what it was."""
    x, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 500), nn.Tanh(), nn.Linear(500, 1))  # 3,001 parameters
    with torch.no_grad():  # magnitudes where add-then-subtract would round
        for prm in model.parameters():
            prm.mul_(1e3).add_(0.1234567)
    model = model.float()
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=5.0, lr=0.0)
    for _ in range(5):
        opt.step(lambda: (model(x.float()).squeeze(-1) - y.float()).abs(), y.float())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sam_step_equals_definition():
    x, y = data()
    model = tiny_model()
    ref = copy.deepcopy(model)
    rho, lr = 0.2, 0.05
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    loss = opt.step(lambda: (model(x).squeeze(-1) - y).abs(), y)

    theta = flat_params(ref)
    l0 = (ref(x).squeeze(-1) - y).abs().mean()
    g = grad_of(ref, l0)
    eps = rho * g / g.norm()
    torch.nn.utils.vector_to_parameters(theta + eps, ref.parameters())
    g2 = grad_of(ref, (ref(x).squeeze(-1) - y).abs().mean())
    expected = theta - lr * g2
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(l0.item()) and not loss.requires_grad


def test_bsam_eps_is_weighted_gradient_direction():
    bins = skewed_bins()
    x, y = data(n=64)
    model = tiny_model()
    rho = 0.15
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=rho, lr=0.1)
    w = bins.sample_weights(y, "sqrt_inv", "mean")
    theta = flat_params(model)
    g_w = grad_of(model, (w * (model(x).squeeze(-1) - y).abs()).mean())
    seen = []

    def loss_fn():
        seen.append(flat_params(model))
        return (model(x).squeeze(-1) - y).abs()

    opt.step(loss_fn, y)
    eps = seen[1] - seen[0]
    torch.testing.assert_close(seen[0], theta)
    torch.testing.assert_close(eps, rho * g_w / g_w.norm(), rtol=1e-10, atol=1e-12)
    # and it is not the unweighted direction
    g = grad_of(model, (model(x).squeeze(-1) - y).abs().mean())
    assert (eps - rho * g / g.norm()).abs().max() > 1e-3


def test_bsam_update_weightings():
    """'same' updates with the weighted loss, None with the plain mean (Table 5)."""
    bins = skewed_bins()
    x, y = data(n=64)
    w = bins.sample_weights(y, "sqrt_inv", "none")
    for update, uw in (("same", w), (None, torch.ones_like(w))):
        model = tiny_model()
        ref = copy.deepcopy(model)
        opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, normalize="none",
                          update_weighting=update, rho=0.1, lr=0.3)
        opt.step(lambda m=model: (m(x).squeeze(-1) - y).abs(), y)
        theta = flat_params(ref)
        g_w = grad_of(ref, (w * (ref(x).squeeze(-1) - y).abs()).mean())
        torch.nn.utils.vector_to_parameters(theta + 0.1 * g_w / g_w.norm(), ref.parameters())
        g2 = grad_of(ref, (uw * (ref(x).squeeze(-1) - y).abs()).mean())
        torch.testing.assert_close(flat_params(model), theta - 0.3 * g2)


def test_bsam_with_uniform_weights_equals_sam():
    labels = torch.arange(10.0).repeat(30)  # every bin holds 30 samples: uniform weights
    bins = LabelBins.from_labels(labels, bin_width=1)
    x, y = data(n=48)
    m1, m2 = tiny_model(), tiny_model()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    o2 = BalancedSAM(m2.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.05, momentum=0.9)
    assert torch.allclose(bins.sample_weights(y), torch.ones_like(y))
    for _ in range(6):
        o1.step(lambda: (m1(x).squeeze(-1) - y).abs(), y)
        o2.step(lambda: (m2(x).squeeze(-1) - y).abs(), y)
    torch.testing.assert_close(flat_params(m1), flat_params(m2), rtol=1e-12, atol=1e-12)


def test_sam_update_weighting_is_sqinv_plus_sam():
    """SAM(update_weighting='sqrt_inv'): unweighted eps, weighted update (Table 6)."""
    bins = skewed_bins()
    x, y = data(n=64)
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, bins=bins,
              update_weighting="sqrt_inv", lr=0.2)
    opt.step(lambda: (model(x).squeeze(-1) - y).abs(), y)
    w = bins.sample_weights(y)
    theta = flat_params(ref)
    g = grad_of(ref, (ref(x).squeeze(-1) - y).abs().mean())
    torch.nn.utils.vector_to_parameters(theta + 0.1 * g / g.norm(), ref.parameters())
    g2 = grad_of(ref, (w * (ref(x).squeeze(-1) - y).abs()).mean())
    torch.testing.assert_close(flat_params(model), theta - 0.2 * g2)


def test_zero_gradient_gives_no_nan_and_skips_perturbation():
    x, y = data()
    for p in (1, 2, 3, math.inf):
        model = tiny_model()
        before = flat_params(model)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, p=p, lr=0.1)
        opt.step(lambda m=model: 0.0 * (m(x).squeeze(-1) - y).abs(), y)
        after = flat_params(model)
        assert torch.isfinite(after).all()
        assert torch.equal(after, before)
        assert opt.last_step_perturbed is False


def test_all_zero_weights_give_no_nan():
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=0.5, lr=0.1)
    before = flat_params(model)
    opt.zero_grad()
    (0.0 * bins.sample_weights(y) * (model(x).squeeze(-1) - y).abs()).mean().backward()
    assert opt.first_step(zero_grad=True) is False
    (model(x).squeeze(-1) * 0).sum().backward()
    with pytest.warns(BalancingNotAppliedWarning):  # weighted by hand, not through reduce()
        opt.second_step()
    assert torch.equal(flat_params(model), before)


def test_nonfinite_gradient_skips_perturbation():
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    before = flat_params(model)
    for prm in model.parameters():
        prm.grad = torch.full_like(prm, math.nan)
    assert opt.first_step() is False
    assert torch.equal(flat_params(model), before)


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9,
                                                              weight_decay=1e-3)),
                                     (torch.optim.Adam, dict(lr=1e-2))])
@pytest.mark.parametrize("cls", ["sam", "bsam", "imbsam"])
def test_state_dict_round_trip_continues_identically(base, kw, cls):
    bins = skewed_bins()
    x, y = data(n=64)

    def make(model):
        if cls == "sam":
            opt = SAM(model.parameters(), base, rho=0.1, **kw)
        elif cls == "bsam":
            opt = BalancedSAM(model.parameters(), base, bins, rho=0.1, **kw)
        else:
            opt = ImbSAM(model.parameters(), base, bins, eta=20, rho=0.1, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return opt, sched

    def run(model, opt, sched, steps):
        for _ in range(steps):
            opt.step(lambda: (model(x).squeeze(-1) - y).abs(), y)
            sched.step()

    model = tiny_model()
    opt, sched = make(model)
    run(model, opt, sched, 3)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
             copy.deepcopy(sched.state_dict()))
    run(model, opt, sched, 4)
    unbroken = flat_params(model)

    model2 = tiny_model(seed=123)
    model2.load_state_dict(saved[0])
    opt2, sched2 = make(model2)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    assert len(opt2.base_optimizer.state) == len(opt.base_optimizer.state) > 0
    run(model2, opt2, sched2, 4)
    assert torch.equal(flat_params(model2), unbroken)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_lr_scheduler_attaches_to_wrapper_without_warning():
    x, y = data()
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(lambda: (model(x).squeeze(-1) - y).abs(), y)
            sched.step()
        opt.zero_grad()
        (model(x).squeeze(-1) - y).abs().mean().backward()
        opt.first_step(zero_grad=True)
        (model(x).squeeze(-1) - y).abs().mean().backward()
        opt.second_step(zero_grad=True)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.5**4)


def test_per_group_rho():
    x, y = data()
    model = tiny_model()
    first, second = model[0], model[2]
    opt = SAM([{"params": first.parameters(), "rho": 0.0},
               {"params": second.parameters()}], torch.optim.SGD, rho=0.2, lr=0.1)
    b0, b2 = flat_params(first), flat_params(second)
    opt.zero_grad()
    (model(x).squeeze(-1) - y).abs().mean().backward()
    opt.first_step()
    assert torch.equal(flat_params(first), b0)
    assert not torch.equal(flat_params(second), b2)
    opt.restore()


def test_closure_form_equals_loss_fn_form():
    x, y = data()
    m1, m2 = tiny_model(), tiny_model()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)

    def closure():
        o2.zero_grad()
        loss = (m2(x).squeeze(-1) - y).abs().mean()
        loss.backward()
        return loss

    for _ in range(3):
        l1 = o1.step(lambda: (m1(x).squeeze(-1) - y).abs(), y)
        l2 = o2.step(closure)
    torch.testing.assert_close(flat_params(m1), flat_params(m2))
    assert l1.item() == pytest.approx(l2.item())


def test_imbsam_equals_its_definition():
    bins = skewed_bins()
    x, y = data(n=64)
    assert (bins.counts[y.long()] < 20).any() and (bins.counts[y.long()] >= 20).any()
    model = tiny_model()
    ref = copy.deepcopy(model)
    rho, lr = 0.3, 0.1
    opt = ImbSAM(model.parameters(), torch.optim.SGD, bins, eta=20, rho=rho, lr=lr)
    opt.step(lambda: (model(x).squeeze(-1) - y).abs(), y)

    tail = bins.counts[y.long()] < 20
    theta = flat_params(ref)
    per = (ref(x).squeeze(-1) - y).abs()
    g_head = grad_of(ref, per[~tail].sum() / len(y))
    g_tail = grad_of(ref, (ref(x).squeeze(-1) - y).abs()[tail].sum() / len(y))
    torch.nn.utils.vector_to_parameters(theta + rho * g_tail / g_tail.norm(), ref.parameters())
    g_tail2 = grad_of(ref, (ref(x).squeeze(-1) - y).abs()[tail].sum() / len(y))
    torch.testing.assert_close(flat_params(model), theta - lr * (g_head + g_tail2))


def test_imbsam_without_tail_is_plain_step():
    bins = skewed_bins()
    x, _ = data(n=16)
    y = torch.zeros(16)  # bin 0: 200 samples, head
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, bins, rho=0.3, lr=0.1)
    opt.step(lambda: (model(x).squeeze(-1) - y).abs(), y)
    g = grad_of(ref, (ref(x).squeeze(-1) - y).abs().mean())
    torch.testing.assert_close(flat_params(model), flat_params(ref) - 0.1 * g)
    assert opt.last_step_perturbed is False


def test_imbsam_with_zero_rho_is_base_optimizer():
    bins = skewed_bins()
    x, y = data(n=64)
    m1, m2 = tiny_model(), tiny_model()
    o1 = ImbSAM(m1.parameters(), torch.optim.SGD, bins, rho=0.0, lr=0.1, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        o1.step(lambda: (m1(x).squeeze(-1) - y).abs(), y)
        o2.zero_grad()
        (m2(x).squeeze(-1) - y).abs().mean().backward()
        o2.step()
    torch.testing.assert_close(flat_params(m1), flat_params(m2))


def test_bn_second_pass_freeze():
    torch.manual_seed(0)
    x, y = data(n=32)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))
    probe = copy.deepcopy(model)
    probe(x)  # one training-mode forward at theta: what the first pass does to the stats
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    opt.step(lambda: (model(x).squeeze(-1) - y).abs(), y, model=model, bn_second_pass="freeze")
    bn, pbn = model[1], probe[1]
    torch.testing.assert_close(bn.running_mean, pbn.running_mean)
    torch.testing.assert_close(bn.running_var, pbn.running_var)
    assert int(bn.num_batches_tracked) == 1 and bn.momentum == 0.1

    model2 = copy.deepcopy(probe)
    model2[1].reset_running_stats()
    opt2 = SAM(model2.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)  # default: both update
    opt2.step(lambda: (model2(x).squeeze(-1) - y).abs(), y)
    assert int(model2[1].num_batches_tracked) == 2


def test_frozen_bn_stats_with_cumulative_average():
    bn = nn.BatchNorm1d(3, momentum=None)
    bn(torch.randn(8, 3))
    mean, n = bn.running_mean.clone(), int(bn.num_batches_tracked)
    with frozen_bn_stats(bn):
        bn(torch.randn(8, 3) + 5)
    assert torch.equal(bn.running_mean, mean) and int(bn.num_batches_tracked) == n
    assert bn.momentum is None


def test_grad_scaler_path_on_cpu():
    """fp16-style loop logic: same result as without scaler when finite; inf skips the step."""
    x, y = data()
    m1, m2 = tiny_model(), tiny_model()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    o1.step(lambda: (m1(x).squeeze(-1) - y).abs(), y)
    o2.step(lambda: (m2(x).squeeze(-1) - y).abs(), y, scaler=scaler)
    scaler.update()
    torch.testing.assert_close(flat_params(m1), flat_params(m2))

    before = flat_params(m2)
    calls = []

    def second_pass_overflows():
        calls.append(1)
        out = (m2(x).squeeze(-1) - y).abs()
        return out * math.inf if len(calls) == 2 else out

    o2.step(second_pass_overflows, y, scaler=scaler)
    assert torch.equal(flat_params(m2), before)  # perturbation undone, step skipped
    scaler.update()
    assert scaler.get_scale() < 2.0**8

    calls.clear()
    before = flat_params(m2)
    o2.step(lambda: (m2(x).squeeze(-1) - y).abs() * math.inf, y, scaler=scaler)
    assert torch.equal(flat_params(m2), before) and o2.last_step_perturbed is False


def test_imbsam_grad_scaler_matches_plain():
    bins = skewed_bins()
    x, y = data(n=64)
    m1, m2 = tiny_model(), tiny_model()
    o1 = ImbSAM(m1.parameters(), torch.optim.SGD, bins, rho=0.2, lr=0.1)
    o2 = ImbSAM(m2.parameters(), torch.optim.SGD, bins, rho=0.2, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    o1.step(lambda: (m1(x).squeeze(-1) - y).abs(), y)
    o2.step(lambda: (m2(x).squeeze(-1) - y).abs(), y, scaler=scaler)
    torch.testing.assert_close(flat_params(m1), flat_params(m2))


def test_dense_targets_and_mask():
    """Per-pixel losses: weights per element; the mask restricts the mean."""
    bins = skewed_bins()
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    ref = copy.deepcopy(conv)
    img = torch.randn(2, 1, 6, 6)
    depth = torch.randint(0, 10, (2, 1, 6, 6)).double()
    mask = torch.rand(2, 1, 6, 6) > 0.3
    opt = BalancedSAM(conv.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.1)
    opt.step(lambda: (conv(img) - depth).square(), depth, mask=mask)
    w = bins.sample_weights(depth)
    assert w.shape == depth.shape

    def loss(m):
        return (w * (m(img) - depth).square())[mask].mean()

    theta = flat_params(ref)
    g = grad_of(ref, loss(ref))
    torch.nn.utils.vector_to_parameters(theta + 0.1 * g / g.norm(), ref.parameters())
    torch.testing.assert_close(flat_params(conv), theta - 0.1 * grad_of(ref, loss(ref)))


def test_adaptive_perturbation_scales_by_weights():
    x, y = data()
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, adaptive=True)
    theta = flat_params(model)
    g = grad_of(model, (model(x).squeeze(-1) - y).abs().mean())
    eps = perturbed_params(opt, model, (model(x).squeeze(-1) - y).abs().mean())
    t = theta.abs()
    torch.testing.assert_close(eps, 0.1 * t * (t * g) / (t * g).norm())


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=-0.1), "rho"),
    (dict(rho=math.nan), "rho"),
    (dict(p=0.5), "p must be"),
    (dict(p="two"), "p must be"),
    (dict(update_weighting="sqrt"), "update_weighting"),
    (dict(update_weighting="sqrt_inv"), "needs bins"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bn_second_pass="freeze"), "needs the model"),
    (dict(bn_second_pass="sometimes"), "bn_second_pass"),
])
def test_bad_step_options_raise_clear_errors(kwargs, match):
    x, y = data()
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = flat_params(model)
    with pytest.raises(ValueError, match=match):
        opt.step(lambda: (model(x).squeeze(-1) - y).abs(), y, **kwargs)
    assert torch.equal(flat_params(model), before)


@pytest.mark.parametrize("key", ["model", "bn_second_pass", "max_grad_norm"])
def test_loop_options_are_step_options_not_constructor_arguments(key):
    model = tiny_model()
    with pytest.raises(TypeError, match=rf"{key} is an option of the step: opt.step\(loss_fn"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, **{key: None})
    with pytest.raises(TypeError, match=rf"{key} is an option of the step"):
        BalancedSAM(model.parameters(), torch.optim.SGD, skewed_bins(), lr=0.1, **{key: None})


def test_sam_takes_normalize_through_its_weighting():
    model = tiny_model()
    with pytest.raises(TypeError, match="normalize is an option of the weighting"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, normalize="none")
    with pytest.raises(ValueError, match="not both"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, bins=skewed_bins(),
            weighting=PassWeighting(skewed_bins(), update="sqrt_inv"))


def test_bad_arguments_bsam_imbsam():
    model = tiny_model()
    bins = skewed_bins()
    with pytest.raises(TypeError, match="class"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="scheme"):
        BalancedSAM(model.parameters(), torch.optim.SGD, bins, scheme="sqinv", lr=0.1)
    with pytest.raises(ValueError, match="normalize"):
        BalancedSAM(model.parameters(), torch.optim.SGD, bins, normalize="sum", lr=0.1)
    with pytest.raises(TypeError, match="LabelBins"):
        BalancedSAM(model.parameters(), torch.optim.SGD, [1, 2, 3], lr=0.1)
    with pytest.raises(ValueError, match="eta"):
        ImbSAM(model.parameters(), torch.optim.SGD, bins, eta=-1, lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data()
    with pytest.raises(ValueError, match="unreduced"):
        opt.step(lambda: (model(x).squeeze(-1) - y).abs().mean(), y)
    with pytest.raises(ValueError, match="two passes"):
        opt.step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
