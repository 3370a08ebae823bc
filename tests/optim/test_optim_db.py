"""One table of optimizer settings that generic checks iterate over (in the spirit of torch's
``optim_db``): SAM, BalancedSAM and ImbSAM x p in {2, inf} x ASAM x interval x accumulate, and
CC-SAM (regions, SQINV update) x p x ASAM x accumulate (no interval, no two-step form), and
the gradient reuse rows (LookSAM, ``interval=GradientReuse(2, 0.5)``): the three optimizers x p
x accumulate.

Every check runs every setting: the state dict round-trip continues bit for bit, the closure
form and the two-step form give the one-call form's parameters, and a non-finite gradient in
the first or the last call of a step skips it. The module also pins the size of the optimizer
(class SAM at most 350 lines, its constructor at most 9 named arguments) that the structural
step of issue 18 set.
"""

from __future__ import annotations

import ast
import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _optim_helpers import (
    data,
    flat_params,
    make_optimizer,
    skewed_bins,
    tiny_model,
)

import balanced_sam.optim.sam as sam_module
from balanced_sam import SAM
from balanced_sam.optim.reuse import GradientReuse

# every test here runs in float64 (the fixture is in tests/optim/conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer setting of the table."""

    kind: str  # "sam" (with the sqrt_inv update weighting), "bsam", "imbsam" or "ccsam"
    p: float
    adaptive: bool
    interval: int
    accumulate: int
    reuse: bool = False  # LookSAM's gradient reuse with period `interval` (alpha 0.5)

    @property
    def id(self) -> str:
        p = "inf" if self.p == math.inf else f"{self.p:g}"
        return (f"{self.kind}-p{p}{'-asam' if self.adaptive else ''}"
                f"-{'l' if self.reuse else 'i'}{self.interval}-acc{self.accumulate}")

    def make(self, model: torch.nn.Module) -> SAM:
        interval = GradientReuse(self.interval, 0.5) if self.reuse else self.interval
        return make_optimizer(self.kind, model, skewed_bins(), weighted_sam=True, p=self.p,
                              adaptive=self.adaptive, interval=interval, momentum=0.9,
                              lr=0.05, rho=0.1)

    def passes(self, refresh: bool) -> int:
        """Forward/backward passes of one step (every batch here has head and tail samples, and
        samples of all three regions: CC-SAM takes 2 passes per region): with reuse, one in
        between; SAM's full step (unweighted perturbation, SQINV update) adds the reference
        pass."""
        if self.kind == "ccsam":
            return 6
        if self.reuse:
            return 1 if not refresh else 2 + (self.kind in ("imbsam", "sam"))
        return (2 if refresh else 1) + (self.kind == "imbsam")

    def first_checked_call(self, refresh: bool) -> int:
        """The first call whose NaN skips the step: a NaN in the reference pass only (SAM
        with reuse) keeps the last stored direction and takes the step (tests/test_reuse.py)."""
        return 2 if self.reuse and refresh and self.kind == "sam" else 1

    def step(self, opt: SAM, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             loss_fn=None):
        """The one-call form, in micro-batches when ``accumulate > 1``."""
        if loss_fn is None:
            def loss_fn(chunk=slice(None)):
                return (model(x[chunk]).squeeze(-1) - y[chunk]).abs()
        if self.accumulate == 1:
            return opt.step(lambda: loss_fn(), y)
        return opt.step(loss_fn, y, accumulate=self.accumulate)

    def exact(self) -> bool:
        """Whether another form must match bit for bit (micro-batches round differently)."""
        return self.accumulate == 1


OPTIM_DB = [OptimInfo(k, p, a, i, acc) for k, p, a, i, acc in itertools.product(
    ("sam", "bsam", "imbsam"), (2.0, math.inf), (False, True), (1, 2), (1, 2))] + [
    OptimInfo("ccsam", p, a, 1, acc) for p, a, acc in itertools.product(
        (2.0, math.inf), (False, True), (1, 2))] + [
    OptimInfo(k, p, False, 2, acc, reuse=True) for k, p, acc in itertools.product(
        ("sam", "bsam", "imbsam"), (2.0, math.inf), (1, 2))]


#: the decorator that runs a check over every setting of the table
settings = pytest.mark.parametrize("info", OPTIM_DB, ids=[i.id for i in OPTIM_DB])


def assert_same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def batches(n: int, start: int = 0):
    return [data(seed=s) for s in range(start, start + n)]


def test_the_table_covers_every_combination():
    assert len(OPTIM_DB) == 68 and len({i.id for i in OPTIM_DB}) == 68
    for info in OPTIM_DB:  # and every setting builds what it names
        opt = info.make(tiny_model())
        assert opt.p == info.p and opt.interval == info.interval
        assert (opt.reuse is not None) == info.reuse
        assert all(g["adaptive"] is info.adaptive for g in opt.param_groups)


# ---------------------------------------------------------------------- state dict
@settings
def test_state_dict_round_trip_continues_identically(info):
    model = tiny_model()
    opt = info.make(model)
    for x, y in batches(3):  # interval 2: mid-interval, the next step reuses the stored eps
        info.step(opt, model, x, y)
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in batches(3, start=3):
        info.step(opt, model, x, y)
    model2 = tiny_model(seed=7)
    model2.load_state_dict(saved[0])
    opt2 = info.make(model2)
    opt2.load_state_dict(saved[1])
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    for x, y in batches(3, start=3):
        info.step(opt2, model2, x, y)
    assert torch.equal(flat_params(model2), flat_params(model))
    assert opt2.state_dict()["sam"] == opt.state_dict()["sam"]


# ---------------------------------------------------------------------- the calling forms
@settings
def test_closure_form_equals_one_call_form(info):
    m1, m2 = tiny_model(), tiny_model()
    o1, o2 = info.make(m1), info.make(m2)
    for x, y in batches(4):
        l1 = info.step(o1, m1, x, y)

        def closure(x=x, y=y):
            o2.zero_grad()
            loss = o2.reduce((m2(x).squeeze(-1) - y).abs(), y)
            loss.backward()
            return loss

        l2 = o2.step(closure)
        assert l2.item() == pytest.approx(l1.item(), rel=1e-12)
    assert_same(flat_params(m1), flat_params(m2), info.exact())
    assert not torch.equal(flat_params(m1), flat_params(tiny_model()))


@settings
def test_two_step_form_equals_one_call_form(info):
    if info.kind == "ccsam":
        pytest.skip("CC-SAM has no two-step form (2 passes per group; tests/test_ccsam.py "
                    "checks that it says so)")
    if info.kind == "imbsam" and info.interval > 1 and not info.reuse:
        pytest.skip("ImbSAM's two-step form takes the head gradient in its first pass; a step "
                    "that reuses the perturbation has no first pass to take it from")
    if info.kind == "sam" and info.reuse:
        pytest.skip("with gradient reuse the two-step form takes the perturbation pass's "
                    "gradient as LookSAM's g; the one-call form runs a reference pass with the "
                    "update weighting (optim/reuse.py)")
    m1, m2 = tiny_model(), tiny_model()
    o1, o2 = info.make(m1), info.make(m2)
    for x, y in batches(4):
        info.step(o1, m1, x, y)
        o2.zero_grad()
        if o2.perturbation_due():  # the interval, with the public methods of the optimizer
            o2.reduce((m2(x).squeeze(-1) - y).abs(), y).backward()
            o2.first_step(zero_grad=True)
        else:
            o2.reuse_perturbation()
        o2.reduce((m2(x).squeeze(-1) - y).abs(), y).backward()
        o2.second_step(zero_grad=True)
    torch.testing.assert_close(flat_params(m1), flat_params(m2), rtol=1e-12, atol=1e-13)
    assert o1.state_dict()["sam"] == o2.state_dict()["sam"]


# ---------------------------------------------------------------------- non-finite gradients
@settings
@pytest.mark.parametrize("bad", ["first", "last"])
def test_nonfinite_gradient_skips_the_step(info, bad):
    """A NaN in the first or the last loss_fn call of a step (a fresh one, or one that reuses
    the perturbation with interval 2) leaves parameters and momentum as they were, and the run
    goes on as if the batch never came."""
    model, ref = tiny_model(), tiny_model()
    opt, ref_opt = info.make(model), info.make(ref)
    (x, y), (x2, y2) = batches(2)
    for m, o in ((model, opt), (ref, ref_opt)):  # a good step: momentum buffers, stored eps
        info.step(o, m, x, y)
    refresh = opt.perturbation_due()
    n_calls = info.passes(refresh) * info.accumulate
    poisoned_call = info.first_checked_call(refresh) if bad == "first" else n_calls
    calls = []

    def loss_fn(chunk=slice(None)):
        calls.append(1)
        out = (model(x2[chunk]).squeeze(-1) - y2[chunk]).abs()
        return out * math.nan if len(calls) == poisoned_call else out

    before = flat_params(model)
    state = copy.deepcopy(opt.base_optimizer.state_dict()["state"])
    info.step(opt, model, x2, y2, loss_fn)
    assert len(calls) >= poisoned_call
    assert torch.equal(flat_params(model), before)
    after = opt.base_optimizer.state_dict()["state"]
    assert all(torch.equal(after[k]["momentum_buffer"], v["momentum_buffer"])
               for k, v in state.items())
    assert opt.skipped_steps == 1 and opt.last_step_perturbed is False
    assert all(p.grad is None for p in model.parameters())
    x3, y3 = data(seed=9)
    info.step(opt, model, x3, y3)
    info.step(ref_opt, ref, x3, y3)
    assert torch.equal(flat_params(model), flat_params(ref))


# ---------------------------------------------------------------------- the optimizer's size
def test_sam_is_an_optimizer_not_a_trainer():
    """Issue 18: class SAM at most 350 lines, at most 9 named constructor arguments, and the
    loop's policy (model, BatchNorm freeze, clipping) not among them."""
    tree = ast.parse(Path(sam_module.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SAM")
    assert cls.end_lineno - cls.lineno + 1 <= 350
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    a = init.args
    named = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self"]
    assert len(named) <= 9, named
    assert not {"model", "bn_second_pass", "max_grad_norm"} & set(named)


def test_no_private_name_crosses_a_module_of_the_optimizers():
    """ImbSAM used to import _Ctx and _Plan from sam.py: optim/, methods.py and losses.py import
    only public names of the package."""
    import balanced_sam.losses
    import balanced_sam.methods

    paths = [*Path(sam_module.__file__).parent.glob("*.py"), Path(balanced_sam.losses.__file__),
             Path(balanced_sam.methods.__file__)]
    crossing = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("balanced_sam"):
                crossing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_")]
    assert len(paths) >= 8 and not crossing
