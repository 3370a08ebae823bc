"""Gradient reuse (LookSAM, issue 21): the mathematics against a hand computation in float64,
the weights of each pass, the state dict in mid-period, and the limits (k = 1 is the optimizer
without reuse; alpha = 0 makes an in-between step the base step on the update loss).

The hand computations evaluate every gradient on a copy of the tiny model at a given flat
parameter vector; the optimizers are plain SGD (no momentum) so a step is theta - lr * G.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _optim_helpers import (
    data,
    flat_params,
    grad_of,
    skewed_bins,
    tiny_model,
)

from balanced_sam import SAM, BalancedSAM, ImbSAM
from balanced_sam.config import TrainConfig
from balanced_sam.errors import ConfigError
from balanced_sam.methods import METHODS, build_stepper, describe_methods, get_method, rho_for
from balanced_sam.optim.reuse import DEFAULT_ALPHA, GradientReuse, ReuseState

LR, RHO = 0.1, 0.2

pytestmark = pytest.mark.usefixtures("float64_default")  # this module runs in float64


# ---------------------------------------------------------------------- the hand computation
def grad_at(model, theta, x, y, weights=None, keep=None):
    """The gradient of sum_{keep} w_i |f(x_i) - y_i| / B at the flat parameters ``theta``."""
    m = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, m.parameters())
    losses = (m(x).squeeze(-1) - y).abs()
    if weights is not None:
        losses = losses * weights
    if keep is not None:
        losses = losses * keep
    return grad_of(m, losses.sum() / y.numel())


def orth_unit(gs, g):
    """The unit component of ``gs`` orthogonal to ``g`` (the stored direction)."""
    v = gs - (gs @ g) / (g @ g) * g
    return v / v.norm()


def stored(opt):
    return torch.cat([opt.state[p][ReuseState.KEY].reshape(-1)
                      for g in opt.param_groups for p in g["params"]])


def one_call(opt, model, x, y, calls=None):
    def loss_fn():
        if calls is not None:
            calls.append(1)
        return (model(x).squeeze(-1) - y).abs()
    return opt.step(loss_fn, y)


def sqinv(bins, y):
    return bins.sample_weights(y, "sqrt_inv", "mean")


def test_balanced_sam_full_and_in_between_steps_by_hand():
    """BSAM (SQINV perturbation and update): a full step stores the unit component of the
    update pass's gradient orthogonal to the perturbation pass's (the same weighting, so the
    update loss's gradient at theta); an in-between step is one pass, g + alpha ||g|| g_v."""
    bins, alpha = skewed_bins(), 0.5
    model = tiny_model()
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=RHO, lr=LR,
                      interval=GradientReuse(3, alpha))
    batches = [data(seed=s) for s in range(5)]
    theta = flat_params(model)
    for i, (x, y) in enumerate(batches):
        w = sqinv(bins, y)
        g = grad_at(model, theta, x, y, w)
        calls = []
        one_call(opt, model, x, y, calls)
        if i % 3 == 0:  # a full step: SAM's update, the direction stored
            gs = grad_at(model, theta + RHO * g / (g.norm() + 1e-16), x, y, w)
            theta = theta - LR * gs
            d = orth_unit(gs, g)
            assert len(calls) == 2
            torch.testing.assert_close(stored(opt), d, rtol=1e-10, atol=1e-12)
            assert abs(float(stored(opt) @ g)) < 1e-10 * float(g.norm())
            assert float(stored(opt).norm()) == pytest.approx(1.0, rel=1e-12)
        else:  # one pass at theta with the update weights, the stored direction added
            theta = theta - LR * (g + alpha * g.norm() * d)
            assert len(calls) == 1
        torch.testing.assert_close(flat_params(model), theta, rtol=1e-10, atol=1e-12)
    assert opt.skipped_steps == 0


def test_auto_alpha_reuses_the_proportion_the_full_step_measured():
    """alpha="auto": the stored direction is g_v / ||g_s|| (norm: the sine of the angle between
    g_s and g), and an in-between step adds ||g|| times it."""
    bins = skewed_bins()
    model = tiny_model()
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=RHO, lr=LR,
                      interval=GradientReuse(2, "auto"))
    theta = flat_params(model)
    for i, (x, y) in enumerate(data(seed=s) for s in range(4)):
        w = sqinv(bins, y)
        g = grad_at(model, theta, x, y, w)
        one_call(opt, model, x, y)
        if i % 2 == 0:
            gs = grad_at(model, theta + RHO * g / (g.norm() + 1e-16), x, y, w)
            theta = theta - LR * gs
            v = gs - (gs @ g) / (g @ g) * g
            d = v / gs.norm()
            torch.testing.assert_close(stored(opt), d, rtol=1e-10, atol=1e-12)
            sine = (1 - float(gs @ g) ** 2 / float(gs @ gs) / float(g @ g)) ** 0.5
            assert float(stored(opt).norm()) == pytest.approx(sine, rel=1e-8)
            assert 0 < sine < 0.5
        else:
            theta = theta - LR * (g + g.norm() * d)
        torch.testing.assert_close(flat_params(model), theta, rtol=1e-10, atol=1e-12)


def test_sam_with_a_weighted_update_takes_g_from_an_update_weighted_pass():
    """The ``sam`` method perturbs with the unweighted loss and updates with SQINV: the
    reference g of a full step is the SQINV loss's gradient at theta (a third pass), so the
    stored direction is not the difference of the two weightings; in between, one SQINV pass."""
    bins, alpha = skewed_bins(), 0.7
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, bins=bins,
              update_weighting="sqrt_inv", interval=GradientReuse(2, alpha))
    theta = flat_params(model)
    for i, (x, y) in enumerate(data(seed=s) for s in range(4)):
        w = sqinv(bins, y)
        g_plain, g_u = grad_at(model, theta, x, y), grad_at(model, theta, x, y, w)
        calls = []
        one_call(opt, model, x, y, calls)
        if i % 2 == 0:
            gs = grad_at(model, theta + RHO * g_plain / (g_plain.norm() + 1e-16), x, y, w)
            theta = theta - LR * gs
            d = orth_unit(gs, g_u)
            assert len(calls) == 3
            torch.testing.assert_close(stored(opt), d, rtol=1e-10, atol=1e-12)
            wrong = orth_unit(gs, g_plain)  # against the perturbation pass's gradient
            assert float((stored(opt) - wrong).norm()) > 1e-3
        else:
            theta = theta - LR * (g_u + alpha * g_u.norm() * d)
            assert len(calls) == 1
        torch.testing.assert_close(flat_params(model), theta, rtol=1e-10, atol=1e-12)


def test_imbsam_stores_the_tails_direction_and_reuses_it_on_the_whole_batch():
    """ImbSAM: the full step is head(theta) + tail(theta + eps_T), the stored direction the tail
    update's component orthogonal to the tail gradient at theta; an in-between step is one pass
    over the whole batch (update weights) at theta plus alpha ||g|| g_v."""
    bins, alpha = skewed_bins(), 0.6
    model = tiny_model()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, bins, eta=20, rho=RHO, lr=LR,
                 update_weighting="sqrt_inv", interval=GradientReuse(3, alpha))
    tail_of = opt.tail_mask
    theta = flat_params(model)
    for i, (x, y) in enumerate(data(seed=s) for s in range(4)):
        w, tail = sqinv(bins, y), tail_of(y).to(torch.float64)
        assert 0 < float(tail.sum()) < y.numel()  # head and tail in every batch
        g_h = grad_at(model, theta, x, y, w, 1 - tail)
        g_t = grad_at(model, theta, x, y, w, tail)
        calls = []
        one_call(opt, model, x, y, calls)
        if i % 3 == 0:
            g_ts = grad_at(model, theta + RHO * g_t / (g_t.norm() + 1e-16), x, y, w, tail)
            theta = theta - LR * (g_h + g_ts)
            d = orth_unit(g_ts, g_t)
            assert len(calls) == 3
            torch.testing.assert_close(stored(opt), d, rtol=1e-10, atol=1e-12)
        else:
            g = grad_at(model, theta, x, y, w)
            torch.testing.assert_close(g, g_h + g_t, rtol=1e-10, atol=1e-12)
            theta = theta - LR * (g + alpha * g.norm() * d)
            assert len(calls) == 1
        torch.testing.assert_close(flat_params(model), theta, rtol=1e-10, atol=1e-12)


def test_imbsam_in_between_pass_counts_the_regulariser_once_and_every_sample():
    bins = skewed_bins()
    model = tiny_model()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, bins, rho=RHO, lr=LR,
                 interval=GradientReuse(2, 0.0))
    (x, y), (x2, y2) = data(seed=0), data(seed=1)
    one_call(opt, model, x, y)
    theta = flat_params(model)
    reg_w = 0.3

    def loss_fn():
        out = model(x2).squeeze(-1)
        return (out - y2).abs(), reg_w * (out ** 2).mean()

    opt.step(loss_fn, y2)
    m = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, m.parameters())
    out = m(x2).squeeze(-1)
    g = grad_of(m, (out - y2).abs().mean() + reg_w * (out ** 2).mean())
    torch.testing.assert_close(flat_params(model), theta - LR * g, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- the limits
@pytest.mark.parametrize("kind", ["sam", "bsam", "imbsam"])
def test_k1_is_the_optimizer_without_reuse(kind):
    def make(model, interval):
        bins = skewed_bins()
        if kind == "sam":
            return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9,
                       bins=bins, update_weighting="sqrt_inv", interval=interval)
        cls = BalancedSAM if kind == "bsam" else ImbSAM
        return cls(model.parameters(), torch.optim.SGD, bins, rho=RHO, lr=LR, momentum=0.9,
                   interval=interval)

    m1, m2 = tiny_model(), tiny_model()
    o1, o2 = make(m1, 1), make(m2, GradientReuse(1, 0.7))
    assert o2.reuse is None and o2.interval == 1
    for x, y in (data(seed=s) for s in range(4)):
        one_call(o1, m1, x, y)
        one_call(o2, m2, x, y)
    assert torch.equal(flat_params(m1), flat_params(m2))
    assert not o2.state or all(ReuseState.KEY not in st for st in o2.state.values())


@pytest.mark.parametrize("kind", ["sam", "bsam", "imbsam"])
def test_a_full_step_is_the_optimizers_own_step(kind):
    """Every K-th step is the optimizer's ordinary step from the same state, bit for bit:
    the reuse only reads the gradients of a full step (and adds the reference pass of
    ``sam``, which leaves the parameters alone)."""
    bins = skewed_bins()

    def make(model, interval):
        if kind == "sam":
            return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9,
                       bins=bins, update_weighting="sqrt_inv", interval=interval)
        cls = BalancedSAM if kind == "bsam" else ImbSAM
        return cls(model.parameters(), torch.optim.SGD, bins, rho=RHO, lr=LR, momentum=0.9,
                   interval=interval)

    model = tiny_model()
    opt = make(model, GradientReuse(2, 0.7))
    batches = [data(seed=s) for s in range(3)]
    for x, y in batches[:2]:
        one_call(opt, model, x, y)
    ref = copy.deepcopy(model)
    ref_opt = make(ref, 1)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (a copy: loading aliases)
    assert opt.perturbation_due()
    one_call(opt, model, *batches[2])
    one_call(ref_opt, ref, *batches[2])
    assert torch.equal(flat_params(model), flat_params(ref))


def test_alpha_zero_in_between_is_the_base_step_on_the_update_loss():
    bins = skewed_bins()
    model = tiny_model()
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=RHO, lr=LR,
                      update_weighting=None, interval=GradientReuse(4, 0.0))
    one_call(opt, model, *data(seed=0))
    for s in (1, 2, 3):  # three in-between steps: plain SGD on the (unweighted) update loss
        x, y = data(seed=s)
        sgd_model = copy.deepcopy(model)
        sgd = torch.optim.SGD(sgd_model.parameters(), lr=LR)
        sgd.zero_grad()
        (sgd_model(x).squeeze(-1) - y).abs().mean().backward()
        sgd.step()
        one_call(opt, model, x, y)
        assert torch.equal(flat_params(model), flat_params(sgd_model))


def test_rho_zero_stores_a_zero_direction():
    """With rho = 0 the update pass's gradient is g itself: nothing orthogonal to store, and an
    in-between step is the base step."""
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=LR,
              interval=GradientReuse(3, 0.9))
    one_call(opt, model, *data(seed=0))
    assert float(stored(opt).abs().max()) == 0.0
    x, y = data(seed=1)
    theta = flat_params(model)
    one_call(opt, model, x, y)
    torch.testing.assert_close(flat_params(model), theta - LR * grad_at(model, theta, x, y),
                               rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- the state dict
@pytest.mark.parametrize("kind", ["sam", "bsam", "imbsam"])
def test_state_dict_round_trip_in_mid_period(kind):
    bins = skewed_bins()

    def make(model):
        kw = dict(rho=RHO, lr=LR, momentum=0.9, interval=GradientReuse(3, 0.7))
        if kind == "sam":
            return SAM(model.parameters(), torch.optim.SGD, bins=bins,
                       update_weighting="sqrt_inv", **kw)
        return (BalancedSAM if kind == "bsam" else ImbSAM)(model.parameters(),
                                                           torch.optim.SGD, bins, **kw)

    model = tiny_model()
    opt = make(model)
    for x, y in (data(seed=s) for s in range(2)):  # step 0 full, step 1 in between
        one_call(opt, model, x, y)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["sam"]["step"] == 2 and sd["sam"]["eps_valid"] is True
    assert all(ReuseState.KEY in st for st in sd["state"].values())
    saved_model = copy.deepcopy(model.state_dict())
    later = [data(seed=s) for s in range(2, 7)]  # in between, full, 2 in between, full
    for x, y in later:
        one_call(opt, model, x, y)
    model2 = tiny_model(seed=5)
    model2.load_state_dict(saved_model)
    opt2 = make(model2)
    opt2.load_state_dict(sd)
    assert not opt2.perturbation_due()  # the reused direction is there: step 2 reuses it
    for x, y in later:
        one_call(opt2, model2, x, y)
    assert torch.equal(flat_params(model2), flat_params(model))
    assert torch.equal(stored(opt2), stored(opt))
    # without the stored direction step 2 would be a full step: the direction matters
    model3 = tiny_model(seed=5)
    model3.load_state_dict(saved_model)
    opt3 = make(model3)
    for x, y in later:
        one_call(opt3, model3, x, y)
    assert not torch.equal(flat_params(model3), flat_params(model))


def test_a_skipped_full_step_stores_nothing():
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR,
              interval=GradientReuse(2, 0.7))
    x, y = data(seed=0)
    opt.step(lambda: (model(x).squeeze(-1) - y).abs() * float("nan"), y)
    assert opt.skipped_steps == 1 and opt.perturbation_due()
    assert all(ReuseState.KEY not in st for st in opt.state.values())


def test_a_nan_in_the_reference_pass_alone_keeps_the_last_direction():
    bins = skewed_bins()
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, bins=bins,
              update_weighting="sqrt_inv", interval=GradientReuse(2, 0.7))
    one_call(opt, model, *data(seed=0))
    one_call(opt, model, *data(seed=1))
    before = stored(opt).clone()
    x, y = data(seed=2)
    calls = []

    def loss_fn():
        calls.append(1)
        out = (model(x).squeeze(-1) - y).abs()
        return out * float("nan") if len(calls) == 1 else out

    theta = flat_params(model)
    opt.step(loss_fn, y)
    assert len(calls) == 3 and opt.skipped_steps == 0
    assert not torch.equal(flat_params(model), theta)  # the step was taken
    assert torch.equal(stored(opt), before)


# ---------------------------------------------------------------------- the options
def test_gradient_reuse_checks_its_arguments():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            GradientReuse(bad)
    for bad in (-0.1, float("nan"), float("inf"), "0.7", "Auto"):
        with pytest.raises(ValueError, match="alpha must be a finite number >= 0 or 'auto'"):
            GradientReuse(5, bad)
    with pytest.raises(ValueError, match="interval must be an integer >= 1 or a GradientReuse"):
        SAM(tiny_model().parameters(), torch.optim.SGD, lr=0.1, interval="5")
    assert GradientReuse(5).alpha == DEFAULT_ALPHA == "auto"  # LookSAM's 0.7 hurt (reuse.py)
    opt = SAM(tiny_model().parameters(), torch.optim.SGD, lr=0.1, interval=GradientReuse(5))
    assert opt.interval == 5 and "GradientReuse(k=5, alpha=auto)" in repr(opt)


def test_lk_methods_parse_and_build():
    for name, base in (("bsam-l5", "bsam"), ("sam-l5", "sam"), ("imbsam-l5", "imbsam"),
                       ("vanilla-bsam-l3", "vanilla-bsam")):
        m, b = get_method(name), METHODS[base]
        assert (m.sharpness, m.update_weighting, m.perturbation_weighting) == (
            b.sharpness, b.update_weighting, b.perturbation_weighting)
        assert m.optimizer_options["reuse"] == int(name.rsplit("-l", 1)[1])
        assert rho_for(name, {base: 0.123}) == 0.123
    composed = get_method("ranksim+bsam-l5")
    assert composed.plugins == ("ranksim",) and composed.optimizer_options == {"reuse": 5}
    assert get_method("focal-l1").optimizer_options == {}  # a plug-in, not focal with -l1
    with pytest.raises(ValueError, match="-lK suffix .* needs a SAM-family method"):
        get_method("sqinv-l5")
    with pytest.raises(ValueError, match="K in -lK must be >= 1"):
        get_method("bsam-l0")
    assert "NAME-lK" in describe_methods() and "bsam-l5" in describe_methods()
    cfg = TrainConfig(method="bsam-l5", reuse_alpha=0.25, interval=7, device="cpu").validate()
    opt, _ = build_stepper(get_method("bsam-l5"), tiny_model().parameters(), skewed_bins(), cfg)
    assert isinstance(opt, BalancedSAM) and opt.interval == 5  # the method's K wins
    assert opt.reuse is not None and opt.reuse.spec == GradientReuse(5, 0.25)
    opt, _ = build_stepper(get_method("bsam-i5"), tiny_model().parameters(), skewed_bins(), cfg)
    assert opt.reuse is None and opt.interval == 5
    with pytest.raises(ConfigError, match="reuse_alpha"):
        TrainConfig(reuse_alpha=-1.0).validate()
    with pytest.raises(ConfigError, match="reuse_alpha"):
        TrainConfig(reuse_alpha="sometimes").validate()
    cfg = TrainConfig.from_dict({"method": "bsam-l5", "reuse_alpha": "auto"}).validate()
    opt, _ = build_stepper(get_method("bsam-l5"), tiny_model().parameters(), skewed_bins(), cfg)
    assert opt.reuse.spec == GradientReuse(5, "auto")


def test_bsam_l5_costs_one_pass_between_full_steps():
    """10 steps of bsam-l5: 2 full steps (2 passes) and 8 in-between (1 pass); sam-l5 adds the
    reference pass on its full steps; imbsam-l5's full steps are ImbSAM's 3 passes."""
    bins = skewed_bins()
    cfg = TrainConfig(method="bsam-l5", device="cpu").validate()
    expected = {"bsam-l5": 2 * 2 + 8, "sam-l5": 2 * 3 + 8, "imbsam-l5": 2 * 3 + 8,
                "bsam-i5": 2 * 2 + 8}
    for name, n in expected.items():
        model = tiny_model()
        _, step = build_stepper(get_method(name), model.parameters(), bins, cfg, model)
        calls = []
        for s in range(10):
            x, y = data(seed=s)

            def loss_fn(x=x, y=y, model=model, calls=calls):
                calls.append(1)
                return (model(x).squeeze(-1) - y).abs()

            step(loss_fn, y)
        assert len(calls) == n, name
