"""Issue 8 (core items 1-3, 8, 12): loss shapes, one weighting path for every calling form
(one call, closure, two steps), opt.reduce, the regulariser pair, LR schedulers and hooks."""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
from _optim_helpers import (
    KINDS,
    data,
    flat_params,
    grad_of,
    make_optimizer,
    skewed_bins,
    tiny_model,
)

from balanced_sam import SAM, BalancedSAM, ImbSAM
from balanced_sam.losses import check_losses, check_mask, reduce_losses, weighted_mean
from balanced_sam.optim import BalancingNotAppliedWarning

# every test here runs in float64 (the fixture is in tests/optim/conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")

# SAM here carries the sqrt_inv update weighting, so that every kind has weights to apply
make = partial(make_optimizer, weighted_sam=True)


# ---------------------------------------------------------------------- 1. loss shapes
@pytest.mark.parametrize("kind", KINDS)
def test_column_losses_are_squeezed_and_weighted(kind):
    """(B, 1) losses for (B,) targets: once broadcast to mean(l) * mean(w) (BalancedSAM) or an
    expand error (ImbSAM); now the same step as (B,) losses."""
    bins = skewed_bins()
    x, y = data()
    m1, m2 = tiny_model(), tiny_model()
    o1, o2 = make(kind, m1, bins), make(kind, m2, bins)
    for _ in range(2):
        o1.step(lambda: (m1(x) - y[:, None]).abs(), y)
        o2.step(lambda: (m2(x).squeeze(-1) - y).abs(), y)
    assert torch.equal(flat_params(m1), flat_params(m2))


def test_bsam_column_losses_match_the_definition():
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.3)
    opt.step(lambda: (model(x) - y[:, None]).abs(), y)
    w = bins.sample_weights(y)
    theta = flat_params(ref)
    g = grad_of(ref, (w * (ref(x).squeeze(-1) - y).abs()).mean())
    torch.nn.utils.vector_to_parameters(theta + 0.1 * g / g.norm(), ref.parameters())
    g2 = grad_of(ref, (w * (ref(x).squeeze(-1) - y).abs()).mean())
    torch.testing.assert_close(flat_params(model), theta - 0.3 * g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["square", "row", "one"])
def test_broadcastable_loss_shapes_are_refused(kind, bad):
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    opt = make(kind, model, bins)
    shapes = {"square": lambda: (model(x) - y[None, :]).abs(),  # (B, B)
              "row": lambda: (model(x).reshape(1, -1) - y).abs(),  # (1, B)
              "one": lambda: (model(x)[:1, 0] - y[:1]).abs()}  # (1,)
    before = flat_params(model)
    with pytest.raises(ValueError, match=r"shape \(.*\) for targets of shape \(64,\)"):
        opt.step(shapes[bad], y)
    assert torch.equal(flat_params(model), before)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_shapes(kind):
    bins = skewed_bins()
    x, y = data()
    m1, m2 = tiny_model(), tiny_model()
    o1, o2 = make(kind, m1, bins), make(kind, m2, bins)
    mask = torch.arange(64) % 3 != 0
    o1.step(lambda: (m1(x).squeeze(-1) - y).abs(), y, mask=mask)
    o2.step(lambda: (m2(x).squeeze(-1) - y).abs(), y, mask=mask[:, None])  # (B, 1): squeezed
    assert torch.equal(flat_params(m1), flat_params(m2))
    with pytest.raises(ValueError, match=r"mask has shape \(64, 64\) but the targets have "
                                         r"shape \(64,\)"):
        o1.step(lambda: (m1(x).squeeze(-1) - y).abs(), y, mask=mask[:, None] & mask[None, :])
    with pytest.raises(ValueError, match=r"mask has shape \(1,\)"):
        o1.step(lambda: (m1(x).squeeze(-1) - y).abs(), y, mask=torch.ones(1, dtype=torch.bool))


def test_shape_helpers_for_the_base_step():
    y = torch.zeros(5)
    assert check_losses(torch.ones(5, 1), y).shape == (5,)
    for bad in (torch.ones(5, 5), torch.ones(1, 5), torch.ones(5, 2), torch.ones(1)):
        with pytest.raises(ValueError, match=r"\(5,\)"):
            check_losses(bad, y)
    with pytest.raises(ValueError, match="unreduced"):
        check_losses(torch.ones(()), y)
    with pytest.raises(TypeError, match="tensor"):
        check_losses([1.0] * 5, y)
    assert check_mask(torch.ones(5, 1, dtype=torch.int64), y).dtype == torch.bool
    w = torch.arange(5.0)
    assert reduce_losses(torch.ones(5, 1), y, w).item() == pytest.approx(2.0)
    assert reduce_losses((torch.ones(5), torch.tensor(3.0)), y).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="weights have shape"):
        weighted_mean(torch.ones(5, 1), w)
    with pytest.raises(ValueError, match="0-dim"):
        reduce_losses((torch.ones(5), torch.ones(2)), y)


# ---------------------------------------------------------------------- 2. calling forms
def closure_for(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = opt.reduce((model(x).squeeze(-1) - y).abs(), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("kind,base,kw", [
    ("sam", torch.optim.SGD, dict(momentum=0.9)),
    ("bsam", torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-3)),
    ("bsam", torch.optim.Adam, dict(lr=1e-2)),
    ("imbsam", torch.optim.SGD, dict(momentum=0.9)),
])
def test_closure_with_reduce_equals_one_call(kind, base, kw):
    bins = skewed_bins()
    m1, m2 = tiny_model(), tiny_model()
    o1, o2 = make(kind, m1, bins, base, **kw), make(kind, m2, bins, base, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(5):
            x, y = data(seed=i)
            l1 = o1.step(lambda x=x, y=y: (m1(x).squeeze(-1) - y).abs(), y)
            l2 = o2.step(closure=closure_for(o2, m2, x, y))  # the keyword, as Lightning calls it
            assert l2.item() == pytest.approx(l1.item(), rel=1e-12)
    assert torch.equal(flat_params(m1), flat_params(m2))
    assert not torch.equal(flat_params(m1), flat_params(tiny_model()))


@pytest.mark.parametrize("kind", KINDS)
def test_two_step_form_with_reduce_equals_one_call(kind):
    bins = skewed_bins()
    m1, m2 = tiny_model(), tiny_model()
    o1, o2 = make(kind, m1, bins, momentum=0.9), make(kind, m2, bins, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(4):
            x, y = data(seed=i)
            o1.step(lambda x=x, y=y: (m1(x).squeeze(-1) - y).abs(), y)
            o2.zero_grad()
            o2.reduce((m2(x).squeeze(-1) - y).abs(), y).backward()
            o2.first_step(zero_grad=True)
            o2.reduce((m2(x).squeeze(-1) - y).abs(), y).backward()
            if i % 2:
                o2.second_step(zero_grad=True)
            else:
                o2.step()  # a bare step() after first_step() finishes the step too
    torch.testing.assert_close(flat_params(m1), flat_params(m2), rtol=1e-12, atol=1e-14)


def test_reduce_uses_the_weights_of_the_pass_in_progress():
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, update_weighting=None,
                      rho=0.1, lr=0.1)
    losses = (model(x).squeeze(-1) - y).abs()
    w = bins.sample_weights(y)
    assert opt.reduce(losses, y).item() == pytest.approx((w * losses).mean().item())
    opt.reduce(losses, y).backward()
    opt.first_step(zero_grad=True)
    assert opt.reduce(losses.detach(), y).item() == pytest.approx(losses.mean().item())
    opt.reduce((model(x).squeeze(-1) - y).abs(), y).backward()
    opt.second_step(zero_grad=True)
    assert opt.reduce(losses, y).item() == pytest.approx((w * losses).mean().item())
    mask = torch.arange(64) < 10
    assert opt.reduce(losses, y, mask).item() == pytest.approx(
        (w * losses)[:10].mean().item())
    with pytest.raises(ValueError, match="shape"):
        opt.reduce(losses[None, :], y)


@pytest.mark.parametrize("kind", ["bsam", "imbsam"])
@pytest.mark.parametrize("form", ["closure", "two_step"])
def test_weighting_bypassed_warns_once(kind, form):
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    opt = make(kind, model, bins)

    def plain():
        opt.zero_grad()
        loss = (model(x).squeeze(-1) - y).abs().mean()
        loss.backward()
        return loss

    def one_step():
        if form == "closure":
            opt.step(plain)
        else:
            plain()
            opt.first_step(zero_grad=True)
            plain()
            opt.second_step()

    with pytest.warns(BalancingNotAppliedWarning, match="opt.reduce") as rec:
        one_step()
    assert rec[0].filename == __file__  # points at the user's line, not into the library
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step()  # once per optimizer


def test_bypassed_bsam_is_plain_sam():
    """Without reduce the step is SAM's (what the warning says), not something in between."""
    bins = skewed_bins()
    x, y = data()
    m1, m2 = tiny_model(), tiny_model()
    o1 = BalancedSAM(m1.parameters(), torch.optim.SGD, bins, rho=0.1, lr=0.1)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for o, m in ((o1, m1), (o2, m2)):
        def closure(o=o, m=m):
            o.zero_grad()
            loss = (m(x).squeeze(-1) - y).abs().mean()
            loss.backward()
            return loss
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o.step(closure)
    assert torch.equal(flat_params(m1), flat_params(m2))


def test_plain_sam_closure_does_not_warn():
    x, y = data()
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (model(x).squeeze(-1) - y).abs().mean()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure=closure)
        closure()
        opt.first_step(zero_grad=True)
        closure()
        opt.second_step()


def test_imbsam_closure_calls():
    """Three calls with a tail sample (head, tail at theta, tail at theta + eps), one
    without; the head call's reduce is the head part, the others the tail part."""
    bins = skewed_bins()
    x, _ = data()
    model = tiny_model()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, bins, eta=20, rho=0.1, lr=0.1)
    for y, n_calls in ((torch.zeros(64), 1), (torch.arange(64.0) % 10, 3)):
        seen = []

        def closure(y=y, seen=seen):
            opt.zero_grad()
            losses = (model(x).squeeze(-1) - y).abs()
            loss = opt.reduce(losses, y)
            seen.append((loss.item(), losses.detach()))
            loss.backward()
            return loss

        total = opt.step(closure)
        assert len(seen) == n_calls
        tail = bins.counts[y.long()] < 20
        assert seen[0][0] == pytest.approx(seen[0][1][~tail].sum().item() / 64)
        if n_calls == 3:
            assert seen[1][0] == pytest.approx(seen[1][1][tail].sum().item() / 64)
            assert total.item() == pytest.approx(seen[0][1].mean().item())


# ---------------------------------------------------------------------- 3. the regulariser
@pytest.mark.parametrize("kind", ["sam", "bsam"])
def test_regulariser_pair_is_added_unweighted_in_every_pass(kind):
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = make(kind, model, bins, rho=0.1, lr=0.2)

    def reg_of(m):
        return 0.3 * m[0].weight.square().sum()

    loss = opt.step(lambda: ((model(x).squeeze(-1) - y).abs(), reg_of(model)), y)
    w = bins.sample_weights(y)
    wp = w if kind == "bsam" else torch.ones_like(w)
    theta = flat_params(ref)
    l0 = (wp * (ref(x).squeeze(-1) - y).abs()).mean() + reg_of(ref)
    assert loss.item() == pytest.approx(l0.item())
    g = grad_of(ref, l0)
    torch.nn.utils.vector_to_parameters(theta + 0.1 * g / g.norm(), ref.parameters())
    g2 = grad_of(ref, (w * (ref(x).squeeze(-1) - y).abs()).mean() + reg_of(ref))
    torch.testing.assert_close(flat_params(model), theta - 0.2 * g2, rtol=1e-10, atol=1e-12)


def test_imbsam_regulariser_goes_to_the_head_loss_at_theta():
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, bins, eta=20, rho=0.3, lr=0.1)

    def reg_of(m):
        return 0.5 * m[2].weight.abs().sum()

    opt.step(lambda: ((model(x).squeeze(-1) - y).abs(), reg_of(model)), y)
    tail = bins.counts[y.long()] < 20
    theta = flat_params(ref)
    per = (ref(x).squeeze(-1) - y).abs()
    g_head = grad_of(ref, per[~tail].sum() / 64 + reg_of(ref))
    g_tail = grad_of(ref, (ref(x).squeeze(-1) - y).abs()[tail].sum() / 64)
    torch.nn.utils.vector_to_parameters(theta + 0.3 * g_tail / g_tail.norm(), ref.parameters())
    g_tail2 = grad_of(ref, (ref(x).squeeze(-1) - y).abs()[tail].sum() / 64)
    torch.testing.assert_close(flat_params(model), theta - 0.1 * (g_head + g_tail2))


@pytest.mark.parametrize("kind", KINDS)
def test_regulariser_in_closure_and_two_step_forms(kind):
    bins = skewed_bins()
    x, y = data()
    m1, m2, m3 = tiny_model(), tiny_model(), tiny_model()
    o1, o2, o3 = (make(kind, m, bins) for m in (m1, m2, m3))

    def out(m):
        return (m(x).squeeze(-1) - y).abs(), 0.1 * m[0].bias.square().sum()

    o1.step(lambda: out(m1), y)

    def closure():
        o2.zero_grad()
        losses, reg = out(m2)
        loss = o2.reduce(losses, y, regularizer=reg)
        loss.backward()
        return loss

    o2.step(closure)
    o3.reduce(out(m3), y).backward()  # the pair itself
    o3.first_step(zero_grad=True)
    o3.reduce(out(m3), y).backward()
    o3.second_step()
    assert torch.equal(flat_params(m1), flat_params(m2))
    torch.testing.assert_close(flat_params(m1), flat_params(m3), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="twice"):
        o2.reduce(out(m2), y, regularizer=torch.tensor(1.0))


# ---------------------------------------------------------------------- 8. schedulers, hooks
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["one_call", "closure", "two_step"])
def test_lr_scheduler_sees_every_form_as_an_optimizer_step(kind, form):
    """No "lr_scheduler.step() before optimizer.step()" warning, without private attributes:
    every form goes through the (scheduler-wrapped) step()."""
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    opt = make(kind, model, bins, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    posts = []
    opt.register_step_post_hook(lambda *a: posts.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            if form == "one_call":
                opt.step(lambda: (model(x).squeeze(-1) - y).abs(), y)
            elif form == "closure":
                opt.step(closure_for(opt, model, x, y))
            else:
                opt.reduce((model(x).squeeze(-1) - y).abs(), y).backward()
                opt.first_step(zero_grad=True)
                opt.reduce((model(x).squeeze(-1) - y).abs(), y).backward()
                opt.second_step(zero_grad=True)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    assert len(posts) == 2  # step hooks: one optimizer step per step, in every form


def test_no_private_torch_attributes_in_the_optimizers():
    from pathlib import Path

    import balanced_sam.optim as optim_pkg
    src = "".join(p.read_text() for p in Path(optim_pkg.__file__).parent.glob("*.py"))
    assert "_per_optimizer_states" not in src and "_opt_called" not in src


# ---------------------------------------------------------------------- 12. vocabulary
def test_perturbation_weighting_alias():
    bins = skewed_bins()
    model = tiny_model()
    a = BalancedSAM(model.parameters(), torch.optim.SGD, bins, perturbation_weighting="inv",
                    lr=0.1)
    assert a.perturbation_weighting == "inv" and a.update_weighting == "inv"
    b = BalancedSAM(model.parameters(), torch.optim.SGD, bins, scheme="inv",
                    perturbation_weighting="inv", lr=0.1)
    assert b.perturbation_weighting == "inv"
    assert BalancedSAM(model.parameters(), torch.optim.SGD, bins,
                       lr=0.1).perturbation_weighting == "sqrt_inv"
    with pytest.raises(ValueError, match="same setting"):
        BalancedSAM(model.parameters(), torch.optim.SGD, bins, scheme="inv",
                    perturbation_weighting="sqrt_inv", lr=0.1)
    with pytest.raises(ValueError, match="perturbation_weighting"):
        BalancedSAM(model.parameters(), torch.optim.SGD, bins, perturbation_weighting="sqinv",
                    lr=0.1)


def test_step_argument_errors():
    bins = skewed_bins()
    x, y = data()
    model = tiny_model()
    opt = make("bsam", model, bins)
    with pytest.raises(ValueError, match="targets but no loss_fn"):
        opt.step(targets=y)
    with pytest.raises(ValueError, match="one-call form"):
        opt.step(closure_for(opt, model, x, y), accumulate=2)
    opt.reduce((model(x).squeeze(-1) - y).abs(), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="pending"):
        opt.step(lambda: (model(x).squeeze(-1) - y).abs(), y)
    opt.reduce((model(x).squeeze(-1) - y).abs(), y).backward()
    opt.second_step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
