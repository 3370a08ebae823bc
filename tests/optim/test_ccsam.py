"""CC-SAM (issue 23): the step against a hand computation, its groups and radii, the special
cases (rho 0 is the base step, one group with flat_ratio 1 is SAM / BalancedSAM), the calling
forms and the errors. The generic checks (state dict, closure form, non-finite gradients) run on
its rows of tests/test_optim_db.py. The hand computation is /work/wt/_notes/ccsam.md Part D."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _optim_helpers import (
    data,
    flat_params,
    skewed_bins,
    tiny_model,
)
from torch import nn

from balanced_sam import CCSAM, SAM, BalancedSAM, LabelBins
from balanced_sam.optim import BalancingNotAppliedWarning
from balanced_sam.optim.ccsam import bin_groups

pytestmark = pytest.mark.usefixtures("float64_default")  # this module runs in float64

COUNTS = [170, 150, 12, 60, 40, 30, 8, 0]
X = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=torch.float64)
Y = torch.tensor([0.5, 1.5, 6.0, 2.97], dtype=torch.float64)


def example_bins() -> LabelBins:
    return LabelBins.from_counts(COUNTS, torch.arange(9.0))


def line(w: float = 1.0, b: float = 0.0) -> nn.Linear:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(w)
        model.bias.fill_(b)
    return model


def theta(model: nn.Linear) -> tuple[float, float]:
    return float(model.weight.detach()), float(model.bias.detach())


def recording_loss(model: nn.Linear, seen: list[tuple[float, float]]):
    def loss_fn():
        seen.append(theta(model))
        return (model(X.unsqueeze(-1)).squeeze(-1) - Y).abs()
    return loss_fn


def by_hand(u: torch.Tensor, rho: float = 0.05, beta: float = 0.5, lr: float = 0.1):
    """The CC-SAM step of the example, from its definition: per group present (many: samples
    0, 1; few: 2, 3) the gradient of (1/4) sum u_i |w x_i + b - y_i| at theta, its radius
    rho * (160 / n_g)^(1/4), the gradient at theta + eps_g; the SGD update."""
    def grad(w, b, idx):
        r = w * X[idx] + b - Y[idx]
        s = torch.sign(r) * u[idx] / 4
        return torch.stack([(s * X[idx]).sum(), s.sum()])

    th = torch.tensor([1.0, 0.0])
    n = {"many": 160.0, "few": 10.0}
    total, points = torch.zeros(2), []
    for name, idx in (("many", [0, 1]), ("few", [2, 3])):
        g = grad(*th, idx)
        eps = rho * (160.0 / n[name]) ** 0.25 * g / g.norm()
        points.append(tuple((th + eps).tolist()))
        total += (1 - beta) * g + beta * grad(*(th + eps), idx)
    loss = (u * (X * th[0] + th[1] - Y).abs()).sum() / 4
    return tuple((th - lr * total).tolist()), points, float(loss)


# ---------------------------------------------------------------------- groups and radii
def test_regions_their_counts_and_radii():
    opt = CCSAM(line().parameters(), torch.optim.SGD, example_bins(), lr=0.1)
    assert opt.group_of_bin.tolist() == [0, 0, 2, 1, 1, 1, 2, 2]  # many / medium / few
    assert opt.num_groups == 3
    # the mean count of the populated bins: bin 7 (empty) is left out of the few region
    torch.testing.assert_close(opt.group_counts, torch.tensor([160.0, 130 / 3, 10.0]))
    torch.testing.assert_close(opt.group_radius_factor,
                               torch.tensor([1.0, (160 / (130 / 3)) ** 0.25, 2.0]))
    assert opt.group_radius_factor[1].item() == pytest.approx(1.38620, abs=1e-5)


@pytest.mark.parametrize("k, groups, counts", [
    (1, [0] * 8, [470 / 7]),
    (2, [0, 1, 1, 1, 1, 1, 1, 1], [170.0, 50.0]),
    (3, [0, 1, 2, 2, 2, 2, 2, 2], [170.0, 150.0, 30.0]),
])
def test_quantile_groups_by_the_median_sample_of_each_bin(k, groups, counts):
    got, num = bin_groups(example_bins(), k)
    assert got.tolist() == groups and num == k
    opt = CCSAM(line().parameters(), torch.optim.SGD, example_bins(), groups=k, lr=0.1)
    torch.testing.assert_close(opt.group_counts, torch.tensor(counts))


def test_a_quantile_group_without_bins_has_no_count_and_no_radius():
    # bin 0 holds 90% of the samples (its median sample is in quantile group 2): groups 0, 1
    # and 3 get no bin
    bins = LabelBins.from_counts([900, 50, 50], torch.arange(4.0))
    opt = CCSAM(line().parameters(), torch.optim.SGD, bins, groups=5, lr=0.1)
    assert opt.group_of_bin.tolist() == [2, 4, 4]
    counts = opt.group_counts.tolist()
    assert math.isnan(counts[0]) and math.isnan(counts[1]) and math.isnan(counts[3])
    assert counts[2] == 900 and counts[4] == 50
    assert opt.group_radius_factor[4].item() == pytest.approx(18 ** 0.25)


# ---------------------------------------------------------------------- the hand computation
def test_step_matches_the_hand_computation():
    """Part D: medium is absent (4 passes); the few group's own direction flips sample 4 across
    its kink, so the update (-0.25, 0.25) differs from SGD's and SAM's (0.5, 0.5)."""
    model = line()
    opt = CCSAM(model.parameters(), torch.optim.SGD, example_bins(), rho=0.05, lr=0.1)
    seen: list[tuple[float, float]] = []
    loss = opt.step(recording_loss(model, seen), Y)
    assert len(seen) == 4
    assert seen[0] == seen[2] == (1.0, 0.0)  # every group's pass at theta starts from theta
    assert seen[1] == pytest.approx((1.0416025, 0.0277350), abs=1e-7)  # theta + eps_many
    assert seen[3] == pytest.approx((0.9, 0.0), abs=1e-12)  # theta + eps_few, radius 2 * rho
    assert theta(model) == pytest.approx((1.025, -0.025), abs=1e-12)
    assert loss.item() == pytest.approx(0.7575, abs=1e-12)
    want, points, want_loss = by_hand(torch.ones(4))
    assert theta(model) == pytest.approx(want, abs=1e-12)
    assert seen[1] == pytest.approx(points[0], abs=1e-12)
    assert seen[3] == pytest.approx(points[1], abs=1e-12)
    assert loss.item() == pytest.approx(want_loss, abs=1e-12)
    # contrast: SAM on the same batch is SGD's step here (no kink crossed)
    sam_model = line()
    SAM(sam_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1).step(
        recording_loss(sam_model, []), Y)
    assert theta(sam_model) == pytest.approx((0.95, -0.05), abs=1e-12)


def test_step_matches_the_hand_computation_with_raw_sqinv_weights():
    model = line()
    opt = CCSAM(model.parameters(), torch.optim.SGD, example_bins(), rho=0.05, lr=0.1,
                update_weighting="sqrt_inv", normalize="none")
    loss = opt.step(recording_loss(model, []), Y)
    assert theta(model) == pytest.approx((1.0293554, 0.0048802), abs=1e-7)
    assert loss.item() == pytest.approx(0.1987350, abs=1e-7)
    u = 1 / torch.tensor([170.0, 150.0, 8.0, 12.0]).sqrt()
    want, _, want_loss = by_hand(u)
    assert theta(model) == pytest.approx(want, abs=1e-12)
    assert loss.item() == pytest.approx(want_loss, abs=1e-12)


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_flat_ratio_mixes_the_gradient_at_theta(beta):
    model = line()
    opt = CCSAM(model.parameters(), torch.optim.SGD, example_bins(), rho=0.05, lr=0.1,
                flat_ratio=beta)
    opt.step(recording_loss(model, []), Y)
    assert theta(model) == pytest.approx(by_hand(torch.ones(4), beta=beta)[0], abs=1e-12)


def test_closure_form_calls_group_by_group_and_matches():
    m1, m2 = line(), line()
    o1 = CCSAM(m1.parameters(), torch.optim.SGD, example_bins(), lr=0.1)
    o2 = CCSAM(m2.parameters(), torch.optim.SGD, example_bins(), lr=0.1)
    l1 = o1.step(recording_loss(m1, []), Y)
    seen: list[tuple[float, float]] = []

    def closure():
        o2.zero_grad()
        seen.append(theta(m2))
        loss = o2.reduce((m2(X.unsqueeze(-1)).squeeze(-1) - Y).abs(), Y)
        loss.backward()
        return loss

    l2 = o2.step(closure)
    assert len(seen) == 4 and seen[0] == seen[2] == (1.0, 0.0)
    assert theta(m2) == theta(m1) and l2.item() == pytest.approx(l1.item(), abs=1e-15)


# ---------------------------------------------------------------------- special cases
def ranksim_like(model, x, y):
    """Per-sample L1 and a regulariser (a smooth function of the predictions)."""
    def loss_fn(chunk=slice(None)):
        pred = model(x[chunk]).squeeze(-1)
        return (pred - y[chunk]).abs(), 0.1 * pred.pow(2).mean()
    return loss_fn


@pytest.mark.parametrize("beta", [0.5, 1.0])
@pytest.mark.parametrize("weighting", [None, "sqrt_inv"])
def test_rho_zero_is_the_base_step_on_the_weighted_loss_and_regulariser(beta, weighting):
    bins = skewed_bins()
    m1, m2 = tiny_model(), tiny_model()
    opt = CCSAM(m1.parameters(), torch.optim.SGD, bins, rho=0.0, flat_ratio=beta, lr=0.05,
                momentum=0.9, update_weighting=weighting)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    for x, y in (data(seed=s) for s in range(3)):
        loss = opt.step(ranksim_like(m1, x, y), y)
        sgd.zero_grad()
        losses, reg = ranksim_like(m2, x, y)()
        u = torch.ones_like(y) if weighting is None else bins.sample_weights(y, weighting)
        ref = (u * losses).mean() + reg
        ref.backward()
        sgd.step()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(flat_params(m1), flat_params(m2), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("weighting", [None, "sqrt_inv"])
def test_one_group_with_flat_ratio_one_is_sam_bit_for_bit(weighting):
    """groups=1, flat_ratio=1: SAM (unweighted), or BalancedSAM perturbing with the update's
    weights (CC-SAM's direction is the update-weighted loss of the group)."""
    bins = skewed_bins()
    m1, m2 = tiny_model(), tiny_model()
    kw = dict(rho=0.1, lr=0.05, momentum=0.9)
    o1 = CCSAM(m1.parameters(), torch.optim.SGD, bins, groups=1, flat_ratio=1.0,
               update_weighting=weighting, **kw)
    o2 = (SAM(m2.parameters(), torch.optim.SGD, **kw) if weighting is None else
          BalancedSAM(m2.parameters(), torch.optim.SGD, bins, scheme=weighting,
                      update_weighting="same", **kw))
    for x, y in (data(seed=s) for s in range(4)):
        calls = []
        for m, o in ((m1, o1), (m2, o2)):
            def loss_fn(m=m, x=x, y=y, calls=calls):
                calls.append(1)
                return (m(x).squeeze(-1) - y).abs()
            o.step(loss_fn, y)
        assert len(calls) == 4
    assert torch.equal(flat_params(m1), flat_params(m2))
    assert not torch.equal(flat_params(m1), flat_params(tiny_model()))


def test_a_group_without_perturbation_reuses_its_gradient_unless_there_is_a_regulariser():
    x, y = data(seed=1)
    for reg, passes in ((False, 3), (True, 6)):
        model = tiny_model()
        opt = CCSAM(model.parameters(), torch.optim.SGD, skewed_bins(), rho=0.0, lr=0.05)
        calls = []

        def loss_fn(model=model, calls=calls, reg=reg):
            calls.append(1)
            out = (model(x).squeeze(-1) - y).abs()
            return (out, model(x).pow(2).mean()) if reg else out

        opt.step(loss_fn, y)
        assert len(calls) == passes  # 3 regions present


def test_masked_elements_count_for_no_group_and_an_all_masked_batch_still_steps():
    model = line()
    opt = CCSAM(model.parameters(), torch.optim.SGD, example_bins(), lr=0.1)
    seen: list[tuple[float, float]] = []
    # only the two "many" samples count: one group, 2 passes
    opt.step(recording_loss(model, seen), Y, mask=torch.tensor([True, True, False, False]))
    assert len(seen) == 2
    # many's gradient over the B = 2 counted elements, (1.5, 1.0); no kink crossed at theta+eps
    g = torch.tensor([3.0, 2.0]) / 2
    assert theta(model) == pytest.approx(tuple((torch.tensor([1.0, 0.0]) - 0.1 * g).tolist()),
                                         abs=1e-12)
    model2 = line()
    opt2 = CCSAM(model2.parameters(), torch.optim.SGD, example_bins(), lr=0.1)
    seen2: list[tuple[float, float]] = []

    def loss_fn():
        seen2.append(theta(model2))
        pred = model2(X.unsqueeze(-1)).squeeze(-1)
        return (pred - Y).abs(), pred.sum()

    loss = opt2.step(loss_fn, Y, mask=torch.zeros(4, dtype=torch.bool))
    assert len(seen2) == 1  # one ordinary pass: the regulariser alone
    assert loss.item() == pytest.approx(10.0, abs=1e-12)  # the sum of the predictions
    assert theta(model2) == pytest.approx((1.0 - 0.1 * 10, -0.1 * 4), abs=1e-12)


def test_accumulate_gives_the_whole_batch_step():
    x, y = data(seed=3)
    m1, m2 = tiny_model(), tiny_model()
    o1 = CCSAM(m1.parameters(), torch.optim.SGD, skewed_bins(), rho=0.1, lr=0.05,
               update_weighting="sqrt_inv")
    o2 = CCSAM(m2.parameters(), torch.optim.SGD, skewed_bins(), rho=0.1, lr=0.05,
               update_weighting="sqrt_inv")
    l1 = o1.step(ranksim_like(m1, x, y), y)
    l2 = o2.step(ranksim_like(m2, x, y), y, accumulate=3)
    torch.testing.assert_close(flat_params(m1), flat_params(m2), rtol=1e-12, atol=1e-13)
    assert l2.item() == pytest.approx(l1.item(), rel=1e-12)


def test_state_dict_round_trip_continues_identically():
    model = tiny_model()
    opt = CCSAM(model.parameters(), torch.optim.SGD, skewed_bins(), groups=4, lr=0.05,
                momentum=0.9)
    step = lambda m, o, x, y: o.step(lambda: (m(x).squeeze(-1) - y).abs(), y)  # noqa: E731
    for s in range(2):
        step(model, opt, *data(seed=s))
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for s in range(2, 4):
        step(model, opt, *data(seed=s))
    model2 = tiny_model(seed=5)
    model2.load_state_dict(saved[0])
    opt2 = CCSAM(model2.parameters(), torch.optim.SGD, skewed_bins(), groups=4, lr=0.05,
                 momentum=0.9)
    opt2.load_state_dict(saved[1])
    for s in range(2, 4):
        step(model2, opt2, *data(seed=s))
    assert torch.equal(flat_params(model2), flat_params(model))


def test_a_closure_without_reduce_warns_and_takes_a_sam_step():
    m1, m2 = tiny_model(), tiny_model()
    x, y = data(seed=2)
    o1 = CCSAM(m1.parameters(), torch.optim.SGD, skewed_bins(), rho=0.1, lr=0.05)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.05)

    def closure():
        o1.zero_grad()
        loss = (m1(x).squeeze(-1) - y).abs().mean()
        loss.backward()
        return loss

    with pytest.warns(BalancingNotAppliedWarning, match="CCSAM"):
        o1.step(closure)
    o2.step(lambda: (m2(x).squeeze(-1) - y).abs(), y)
    torch.testing.assert_close(flat_params(m1), flat_params(m2), rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------- errors
def test_unsupported_forms_and_bad_arguments_say_what_to_do():
    bins = example_bins()
    params = list(line().parameters())
    opt = CCSAM(params, torch.optim.SGD, bins, lr=0.1)
    with pytest.raises(RuntimeError, match=r"2 passes per group.*step\(loss_fn, targets\)"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="2 passes per group"):
        opt.second_step()
    with pytest.raises(ValueError, match="2 passes per group"):
        opt.step()
    with pytest.raises(ValueError, match="interval.*not supported.*interval=1"):
        CCSAM(params, torch.optim.SGD, bins, interval=2, lr=0.1)
    for bad in (0, 0.0, 1.5, -0.2, True, "half"):
        with pytest.raises(ValueError, match=r"flat_ratio must be a number in \(0, 1\]"):
            CCSAM(params, torch.optim.SGD, bins, flat_ratio=bad, lr=0.1)
    for bad in (0, -1, True, "bins", 2.5):
        with pytest.raises(ValueError, match="groups must be 'regions' or an integer >= 1"):
            CCSAM(params, torch.optim.SGD, bins, groups=bad, lr=0.1)
    with pytest.raises(TypeError, match="LabelBins"):
        CCSAM(params, torch.optim.SGD, [1, 2], lr=0.1)
    assert "CCSAM(groups='regions'" in repr(opt)


# ---------------------------------------------------------------------- the method
def test_the_ccsam_method_composes_with_plugins_and_refuses_an_interval():
    from balanced_sam.config import TrainConfig
    from balanced_sam.methods import OPTIMIZER_PARTS, build_stepper, describe_methods, get_method

    assert "ccsam" in OPTIMIZER_PARTS and "ccsam" in describe_methods()
    m = get_method("ranksim+ccsam")
    assert (m.sharpness, m.update_weighting, m.plugins) == ("ccsam", "sqrt_inv", ("ranksim",))
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False, rho=0.05)
    model = tiny_model()
    opt, step = build_stepper(m, model.parameters(), skewed_bins(), cfg, model=model)
    assert isinstance(opt, CCSAM) and opt.update_weighting == "sqrt_inv"
    x, y = data(seed=4)
    calls = []

    def loss_fn():
        calls.append(1)
        return ranksim_like(model, x, y)()

    before = flat_params(model)
    loss = step(loss_fn, y)
    assert len(calls) == 6 and torch.isfinite(loss)  # 3 regions, 2 passes each
    assert not torch.equal(flat_params(model), before)
    for name in ("ccsam-i5", "ccsam-l5"):
        with pytest.raises(ValueError, match="CC-SAM takes no -iK / -lK variant"):
            get_method(name)
    with pytest.raises(ValueError, match="CCSAM takes no interval"):
        build_stepper(get_method("ccsam"), tiny_model().parameters(), skewed_bins(),
                      TrainConfig(epochs=1, lr=0.05, progress=False, interval=3))


def test_grad_scaler_gives_the_same_step_and_an_overflow_skips_it():
    x, y = data(seed=5)
    m1, m2 = tiny_model(), tiny_model()
    o1 = CCSAM(m1.parameters(), torch.optim.SGD, skewed_bins(), rho=0.1, lr=0.05)
    o2 = CCSAM(m2.parameters(), torch.optim.SGD, skewed_bins(), rho=0.1, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    o1.step(lambda: (m1(x).squeeze(-1) - y).abs(), y)
    o2.step(lambda: (m2(x).squeeze(-1) - y).abs(), y, scaler=scaler)
    scaler.update()
    torch.testing.assert_close(flat_params(m1), flat_params(m2), rtol=1e-12, atol=1e-13)
    # an overflow at theta stops the step at once (its perturbation would be non-finite); one
    # in a perturbed pass is found in the summed gradient, after the last pass
    for bad_call, n_calls in ((1, 1), (3, 3), (4, 6), (6, 6)):
        calls = []

        def overflows(calls=calls, bad_call=bad_call):  # 3 regions: 6 passes
            calls.append(1)
            out = (m2(x).squeeze(-1) - y).abs()
            return out * math.inf if len(calls) == bad_call else out

        before, scale = flat_params(m2), scaler.get_scale()
        o2.step(overflows, y, scaler=scaler)
        assert torch.equal(flat_params(m2), before) and len(calls) == n_calls
        scaler.update()
        assert scaler.get_scale() < scale
    assert o2.skipped_steps == 4


def test_batchnorm_statistics_move_once_with_the_model_and_freeze():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))
    ref = copy.deepcopy(model)
    x, y = data(seed=6)
    opt = CCSAM(model.parameters(), torch.optim.SGD, skewed_bins(), rho=0.1, lr=0.05)
    calls = []

    def loss_fn():
        calls.append(1)
        return (model(x).squeeze(-1) - y).abs()

    opt.step(loss_fn, y, model=model, bn_second_pass="freeze")
    ref(x)  # one forward at theta: the first pass's statistics
    assert len(calls) == 6
    bn, bn_ref = model[1], ref[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)


def test_a_target_in_a_group_without_training_samples_gets_the_largest_radius():
    # regions of counts (500, 0, 50): many, few (only the empty bin), medium
    bins = LabelBins.from_counts([500, 0, 50], torch.arange(4.0))
    model = line()
    opt = CCSAM(model.parameters(), torch.optim.SGD, bins, lr=0.1)
    assert opt.group_of_bin.tolist() == [0, 2, 1] and math.isnan(opt.group_counts[2])
    assert math.isnan(opt.group_radius_factor[2])
    yy = torch.tensor([1.5], dtype=torch.float64)  # in the empty bin
    seen: list[tuple[float, float]] = []

    def loss_fn():
        seen.append(theta(model))
        return (model(torch.ones(1, 1, dtype=torch.float64)).squeeze(-1) - yy).abs()

    opt.step(loss_fn, yy)
    assert len(seen) == 2 and all(math.isfinite(v) for v in theta(model))
    assert math.dist(seen[1], seen[0]) == pytest.approx(0.05 * 10 ** 0.25)  # medium's radius
