"""The baselines in the training loop: the method grammar, the plug-in parts the loop asks for,
the balanced perturbation of a composed method, FDS and RnC checkpoints, and every baseline
through ``bsam bench`` (tables) and ``fit`` (images)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from _repo_scripts import ROOT
from _tables import long_tail_ints as _data
from _tables import thirds, write_long_tail_csv
from _vision_fixtures import make_mnist_folder

from balanced_sam import LabelBins
from balanced_sam.baselines.plugins import PLUGINS, MethodPlugin, check_options
from balanced_sam.cli import main
from balanced_sam.config import TrainConfig
from balanced_sam.data import load_data
from balanced_sam.data.scaling import TargetScaler
from balanced_sam.errors import ConfigError
from balanced_sam.methods import (
    BASELINE_METHODS,
    METHODS,
    build_stepper,
    get_method,
    rho_for,
)
from balanced_sam.models import MLP
from balanced_sam.train import _match, fit, seed_everything, train_one_epoch


def _cfg(**kw):
    base = dict(epochs=1, batch_size=32, lr=0.05, progress=False, rho=0.05, momentum=0.0,
                weight_decay=0.0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------- the grammar
@pytest.mark.parametrize("name,sharpness,update,perturbation,plugins,options", [
    ("ranksim", "none", None, None, ("ranksim",), {}),
    ("ranksim+sqinv", "none", "sqrt_inv", None, ("ranksim",), {}),
    ("ranksim+bsam", "bsam", "sqrt_inv", "sqrt_inv", ("ranksim",), {}),
    ("ranksim+vanilla+bsam", "bsam", None, "sqrt_inv", ("ranksim",), {}),
    ("conr+fds+lds+sam", "sam", "lds", None, ("conr", "fds"), {}),
    ("rnc+inv+imbsam", "imbsam", "inv", None, ("rnc",), {}),
    ("focal-l1+lds+bsam", "bsam", "lds", "lds", ("focal-l1",), {}),
    ("bni+lds", "none", None, None, ("bni",), {"bni": {"lds": True}}),
    ("bni+bsam", "bsam", None, "sqrt_inv", ("bni",), {}),  # BNI balances: update unweighted
    ("gai+sqinv+sam", "sam", "sqrt_inv", None, ("gai",), {}),
])
def test_composed_names_build_the_method_they_say(name, sharpness, update, perturbation,
                                                   plugins, options):
    m = get_method(name)
    assert (m.sharpness, m.update_weighting, m.perturbation_weighting) == (
        sharpness, update, perturbation)
    assert m.plugins == plugins and dict(m.plugin_options) == options
    assert get_method(name) is m  # built once


def test_interval_variants_compose_with_plugins():
    m = get_method("ranksim+bsam-i5")
    assert m.plugins == ("ranksim",) and m.sharpness == "bsam"
    assert m.optimizer_options["interval"] == 5
    assert rho_for("ranksim+bsam-i5", {"bsam": 0.01}) == 0.01
    with pytest.raises(ValueError, match="needs a SAM-family method"):
        get_method("ranksim-i5")


@pytest.mark.parametrize("name,message", [
    ("ranksim+sharp", "unknown part 'sharp'"),
    ("ranksim+bsam+sqinv", "'sqinv' is out of place"),
    ("sqinv+ranksim", "'sqinv' is out of place"),
    ("bni+gai", "at most one loss plug-in"),
    ("fds+conr+fds", "named twice"),
    ("rnc+ranksim", "rnc is a two-stage recipe"),
    ("rankism", "unknown method 'rankism'"),
])
def test_bad_names_say_what_is_allowed(name, message):
    with pytest.raises(ValueError, match=message) as err:
        get_method(name)
    if "part" in message or "place" in message:
        assert "plug-ins focal-l1" in str(err.value) and "optimizers sam" in str(err.value)


def test_list_shows_the_blocks_and_the_registered_baselines(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (*PLUGINS, "conr+lds", "conr+fds", "bni+lds", "PLUGIN[+PLUGIN...]"):
        assert name in out
    assert set(BASELINE_METHODS) <= set(METHODS)
    assert "ranksim+bsam" not in METHODS  # composed on demand, not registered


def test_composed_methods_take_their_optimizer_parts_rho():
    table = {"sam": 0.02, "bsam": 0.01, "vanilla-bsam": 0.05}
    assert rho_for("ranksim+bsam", table) == 0.01
    assert rho_for("ranksim+vanilla+bsam", table) == 0.05  # same step as vanilla-bsam
    assert rho_for("conr+lds+sam", table) == 0.02
    assert rho_for("ranksim", table) is None
    assert rho_for("fds+bsam", table) == 0.01 and rho_for("fds", table) is None


def test_plugin_options_are_checked_by_name_key_and_type():
    check_options({"ranksim": {"gamma": 10}, "conr": {"omega": None}, "fds": None})
    with pytest.raises(ConfigError, match="train.plugins.ranksm is not a baseline plug-in"):
        check_options({"ranksm": {}})
    with pytest.raises(ConfigError, match="ranksim.gama is not an option of ranksim; it takes: "
                                          "gamma, lambda_val"):
        check_options({"ranksim": {"gama": 1}})
    with pytest.raises(ConfigError, match="expected a number"):
        check_options({"ranksim": {"gamma": "big"}})
    with pytest.raises(ConfigError, match="must be one of exp, linear"):
        check_options({"conr": {"pushing": "cubic"}})
    with pytest.raises(ConfigError, match="train.plugins.bni.lds is not an option"):
        TrainConfig(plugins={"bni": {"lds": True}}).validate()  # the method name decides it


# ---------------------------------------------------------------------------- the perturbation
def _plugin(method, model, bins, cfg):
    return MethodPlugin(get_method(method), cfg, model, bins, TargetScaler.fit(bins.centers),
                        torch.device("cpu"))


def _grads(loss, params, keep=False):
    return torch.autograd.grad(loss, params, retain_graph=keep)


def test_ranksim_bsam_perturbs_with_the_balanced_weights_plus_the_regulariser(int_batch):
    x, y, bins = int_batch
    # gamma 0.1: the regulariser and the weighted L1 both shape the gradient (at the default
    # 100 RankSim's term dominates this small MLP's gradient)
    cfg = _cfg(rho=0.5, lr=0.1, plugins={"ranksim": {"gamma": 0.1}})
    seed_everything(0)
    model = MLP(5, (16, 8))
    start = [p.detach().clone() for p in model.parameters()]
    plugin = _plugin("ranksim+bsam", model, bins, cfg)
    opt, step = build_stepper(plugin.stepper_method, plugin.param_groups(), bins, cfg)

    def loss_fn_for(m):
        return plugin.batch_loss(m, x, y, None, epoch=0, index=3,
                                 autocast=contextlib.nullcontext, match=_match)

    # by hand: g = grad[(1/B) sum_i w_i l_i + RankSim], eps = rho g / ||g||, then
    # theta <- theta - lr grad[(1/B) sum_i w_i l_i + RankSim](theta + eps)
    params = list(model.parameters())
    w = bins.sample_weights(y, "sqrt_inv", "mean")
    losses, reg = loss_fn_for(model)()
    assert reg.item() > 0 and losses.shape == y.shape
    g = _grads((w * losses).mean() + reg, params, keep=True)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    eps = [0.5 * t / (norm + 1e-16) for t in g]
    # controls, far beyond the tolerance below: without the weights (SAM's perturbation) or
    # without the regulariser the perturbation points elsewhere
    for other in ((losses.mean() + reg), (w * losses).mean()):
        g_other = _grads(other, params, keep=True)
        n_other = torch.sqrt(sum((t**2).sum() for t in g_other))
        assert max(float((0.5 * (a / n_other) - e).abs().max())
                   for a, e in zip(g_other, eps)) > 1e-3
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    losses2, reg2 = loss_fn_for(model)()
    g2 = _grads((w * losses2).mean() + reg2, params)
    expected = [s - 0.1 * t for s, t in zip(start, g2)]

    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    seen = []
    inner = loss_fn_for(model)

    def recording():
        seen.append([p.detach().clone() for p in model.parameters()])
        return inner()

    step(recording, y)
    assert len(seen) == 2  # the perturbation pass, then the update pass at theta + eps
    for at, s, e in zip(seen[1], start, eps):
        torch.testing.assert_close(at, s + e, rtol=1e-5, atol=1e-6)
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def test_ranksim_draws_the_same_subset_in_both_passes(int_batch):
    x, y, bins = int_batch
    seed_everything(0)
    model = MLP(5, (16,))
    plugin = _plugin("ranksim", model, bins, _cfg())
    fn = plugin.batch_loss(model, x, y, None, epoch=0, index=0,
                           autocast=contextlib.nullcontext, match=_match)
    assert len(torch.unique(y)) < len(y)  # repeated labels: the subset is a random draw
    assert fn()[1].item() == fn()[1].item()
    other = plugin.batch_loss(model, x, y, None, epoch=0, index=1,
                              autocast=contextlib.nullcontext, match=_match)
    regs = {other()[1].item()} | {plugin.batch_loss(
        model, x, y, None, epoch=e, index=0, autocast=contextlib.nullcontext,
        match=_match)()[1].item() for e in range(1, 6)}
    assert len(regs) > 1  # another batch or epoch draws another subset


@pytest.mark.e2e
def test_balanced_mse_sigma_has_its_own_group_is_never_perturbed_and_keeps_its_lr():
    x, y = _data(128, integer=False)
    tr, va, te = thirds(x, y)
    bins = LabelBins.from_labels(tr[1], bin_width=4, lower=0, upper=40)
    cfg = _cfg(rho=0.5, plugins={"bni": {"learn_noise": True}})
    seed_everything(0)
    model = MLP(5, (16,))
    assert _plugin("bni", model, bins, _cfg()).noise_sigma is None  # fixed unless asked
    plugin = _plugin("bni+bsam", model, bins, cfg)
    groups = plugin.param_groups()
    assert len(groups) == 2 and groups[1]["params"] == [plugin.noise_sigma]
    # sigma starts at one bin width (label units), expressed in the standardised loss units
    assert plugin.noise_sigma.item() == pytest.approx(4.0 / plugin.target_scaler.std)
    given = _plugin("bni", model, bins, _cfg(plugins={"bni": {"init_noise_sigma": 10.0,
                                                                 "learn_noise": True}}))
    assert given.noise_sigma.item() == pytest.approx(10.0 / plugin.target_scaler.std)
    assert {k: groups[1][k] for k in ("lr", "weight_decay", "rho", "scheduled")} == {
        "lr": 1e-2, "weight_decay": 0.0, "rho": 0.0, "scheduled": False}
    opt, step = build_stepper(plugin.stepper_method, groups, bins, cfg)
    ctx = plugin.first_pass_context(None)
    fn = plugin.batch_loss(model, tr[0][:32], tr[1][:32], None, epoch=0, index=0,
                           autocast=contextlib.nullcontext, match=_match)
    # by hand: the perturbation comes from the model's gradient alone (sigma detached)
    params = list(model.parameters())
    w = bins.sample_weights(tr[1][:32], "sqrt_inv", "mean")
    g = _grads((w * fn()).mean(), params)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    sigma0 = plugin.noise_sigma.detach().clone()
    seen = []

    def recording():
        seen.append(([p.detach().clone() for p in params], plugin.noise_sigma.detach().clone()))
        return fn()

    start = [p.detach().clone() for p in params]
    opt.step(recording, tr[1][:32], first_pass_context=ctx)
    (perturbed, sigma_then) = seen[1]
    assert torch.equal(sigma_then, sigma0)  # rho 0: sigma is not perturbed
    for at, s, t in zip(perturbed, start, g):
        torch.testing.assert_close(at, s + 0.5 * t / norm, rtol=1e-5, atol=1e-6)
    assert plugin.noise_sigma.item() != sigma0.item()  # but it is learned
    # through fit: a cosine schedule decays the model's lr, not sigma's
    seed_everything(0)
    res = fit(MLP(5, (16,)), tr, va, bins, _cfg(method="bni+bsam", epochs=3, schedule="cosine",
                                                 plugins={"bni": {"learn_noise": True}}),
              test_data=te, log=lambda s: None)
    assert np.isfinite(res.test["all"]["mae"])
    assert [r["lr"] for r in res.history][-1] < 0.05


def test_the_bmse_method_trains_with_its_own_loss():
    x, y = _data(64, integer=False)
    bins = LabelBins.from_labels(y, bin_width=4, lower=0, upper=40)
    seed_everything(0)
    model = MLP(5, (16,))
    plugin = _plugin("bmse", model, bins, _cfg(loss="l1"))
    fn = plugin.batch_loss(model, x, y, None, epoch=0, index=0,
                           autocast=contextlib.nullcontext, match=_match)
    from balanced_sam.losses import balanced_mse_loss

    y_s = plugin.target_scaler.scale(y)
    # sigma: one bin width in label units (4), in the loss's standardised units
    var = (4.0 / plugin.target_scaler.std) ** 2
    torch.testing.assert_close(fn(), balanced_mse_loss(model(x), y_s, noise_var=var))
    assert not torch.allclose(fn(), balanced_mse_loss(model(x), y_s, noise_var=1.0))


# ---------------------------------------------------------------------------- FDS
def test_fds_collects_once_per_batch_under_a_two_pass_optimizer():
    x, y = _data(96)
    bins = LabelBins.from_labels(y, bin_width=1, lower=0, upper=40)
    cfg = _cfg(method="fds+bsam", batch_size=16)
    seed_everything(0)
    model = MLP(5, (16,))
    plugin = _plugin("fds+bsam", model, bins, cfg)
    _, step = build_stepper(plugin.stepper_method, plugin.param_groups(), bins, cfg)
    train_one_epoch(model, (x, y), step, cfg, epoch=0, device=torch.device("cpu"),
                    target_scaler=plugin.target_scaler, plugin=plugin)
    assert plugin.fds.epoch_count.sum().item() == len(y)  # not 2 x (two passes per step)
    plugin.end_epoch(0)
    assert plugin.fds.num_samples_tracked.sum().item() == len(y)
    assert plugin.fds.epoch_count.sum().item() == 0


@pytest.mark.e2e
def test_fds_resumed_run_equals_the_unbroken_one(tmp_path):
    x, y = _data(240)
    tr, va, te = thirds(x, y)
    bins = LabelBins.from_labels(tr[1], bin_width=2, lower=0, upper=40)
    cfg = _cfg(method="fds", epochs=4, seed=1, plugins={"fds": {"ks": 3, "sigma": 1.0}})

    def run(out, kill_after=None, resume=False):
        seed_everything(1)
        model = MLP(5, (16,))

        def killer(epoch, row):
            if kill_after is not None and epoch == kill_after:
                raise KeyboardInterrupt

        res = fit(model, tr, va, bins, cfg, test_data=te, out_dir=out, resume=resume,
                  on_epoch_end=killer, log=lambda s: None)
        return res, [p.detach().clone() for p in model.parameters()]

    unbroken, p1 = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_after=1)
    ck = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert int(ck["plugin"]["fds"]["last_epoch"]) == 1
    assert ck["plugin"]["fds"]["has_stats"].any()
    resumed, p2 = run(tmp_path / "b", resume=True)
    assert resumed.test == unbroken.test
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    # the control: without the FDS state the resumed run calibrates differently
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "c", kill_after=1)
    original = MethodPlugin.load_state_dict
    try:
        MethodPlugin.load_state_dict = lambda self, state: None
        _, p3 = run(tmp_path / "c", resume=True)
    finally:
        MethodPlugin.load_state_dict = original
    assert any(not torch.equal(a, b) for a, b in zip(p1, p3))


# ---------------------------------------------------------------------------- RnC
@pytest.mark.e2e
def test_rnc_trains_the_encoder_then_only_the_head_and_resumes_either_stage(tmp_path):
    x, y = _data(200, integer=False)
    tr, va, te = thirds(x, y)
    bins = LabelBins.from_labels(tr[1], bin_width=4, lower=0, upper=40)
    cfg = _cfg(method="rnc+sqinv", epochs=2, seed=2,
               plugins={"rnc": {"pretrain_epochs": 2, "pretrain_lr": 0.02, "head_lr": 0.03}})

    def run(out, kill_at=None, resume=False):
        seed_everything(2)
        model = MLP(5, (16,))
        calls = []

        def killer(epoch, row):
            calls.append((row.get("stage", "head"), epoch))
            if (row.get("stage", "head"), epoch) == kill_at:
                raise KeyboardInterrupt

        res = fit(model, tr, va, bins, cfg, test_data=te, out_dir=out, resume=resume,
                  on_epoch_end=killer, log=lambda s: None)
        return res, model, calls

    seed_everything(2)
    init = MLP(5, (16,))
    res, model, calls = run(tmp_path / "a")
    assert [r.get("stage") for r in res.history] == ["pretrain", "pretrain", None, None]
    assert calls == [("pretrain", 0), ("pretrain", 1), ("head", 0), ("head", 1)]
    pre = torch.load(tmp_path / "a" / "pretrain" / "last.pt", weights_only=False)
    assert pre["config"]["lr"] == 0.02 and pre["config"]["plugins"]["rnc"]["stage"] == \
        "pretrain"
    head_ck = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    assert head_ck["config"]["lr"] == 0.03 and head_ck["config"]["weight_decay"] == 0.0
    # stage 1 moved the encoder, not the head; stage 2 moved the head, not the encoder
    enc = [k for k in pre["model"] if not k.startswith("net.2")]
    assert all(torch.equal(pre["model"][k], init.state_dict()[k]) for k in ("net.2.weight",
                                                                             "net.2.bias"))
    assert any(not torch.equal(pre["model"][k], init.state_dict()[k]) for k in enc)
    final = model.state_dict()
    assert all(torch.equal(final[k], pre["model"][k]) for k in enc)
    assert not torch.equal(final["net.2.weight"], pre["model"]["net.2.weight"])
    # killed in either stage, then resumed: the same run (a head-stage resume does not run
    # the pre-training again)
    for folder, kill_at, after in (("b", ("head", 0), [("head", 1)]),
                                   ("c", ("pretrain", 0), [("pretrain", 1), ("head", 0),
                                                           ("head", 1)])):
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / folder, kill_at=kill_at)
        resumed, m2, calls = run(tmp_path / folder, resume=True)
        assert calls == after
        assert resumed.test == res.test
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     m2.state_dict().values()))
    # a folder holding a run is refused before any training
    from balanced_sam.outputs import RunExistsError

    with pytest.raises(RunExistsError):
        run(tmp_path / "a")


# ---------------------------------------------------------------------------- every baseline
COMPOSED = ("ranksim+bsam", "conr+lds+sam", "fds+sqinv+imbsam", "rnc+sqinv+bsam", "gai+bsam")


@pytest.mark.e2e
def test_every_baseline_runs_in_bsam_bench_on_a_table(tmp_path, capsys):
    csv = tmp_path / "table.csv"
    write_long_tail_csv(csv, n=500)
    methods = [*BASELINE_METHODS, *COMPOSED]
    out = tmp_path / "bench"
    assert main(["bench", "--csv", str(csv), "--target", "target", "--methods",
                 ",".join(methods), "--seeds", "1", "--epochs", "1", "--bin-width", "4",
                 "--cap", "10", "--out", str(out), "--no-plots",
                 "--set", "train.plugins.conr.beta=2", "--set", "train.plugins.fds.ks=3"]) == 0
    res = json.loads((out / "results.json").read_text())
    plugins = res["config"]["train"]["plugins"]  # the table recipe's, changed key by key
    assert plugins["conr"] == {"beta": 2} and plugins["fds"] == {"ks": 3}
    assert plugins["ranksim"] == {"gamma": 0.001}
    assert list(res["methods"]) == methods
    for name, m in res["methods"].items():
        assert np.isfinite(m["mean"]["all"]["mae"]), name
    assert main(["bench", "--csv", str(csv), "--target", "target", "--methods", "conr",
                 "--set", "train.plugins.conr.bta=2", "--out", str(tmp_path / "bad")]) == 2
    assert "conr.bta is not an option of conr" in capsys.readouterr().err
    # composed SAM-family methods take their optimizer part's rho from the recipe (0.05)
    assert res["methods"]["ranksim+bsam"]["runs"][0]["rho"] == 0.05
    assert res["methods"]["ranksim"]["runs"][0]["rho"] is None


@pytest.mark.e2e
def test_every_baseline_trains_on_the_image_benchmark(tmp_path):
    root = make_mnist_folder(tmp_path / "idx", n_train=200, n_test=80)
    data = load_data({"name": "rotated-fashion-mnist", "data_root": str(root), "n_train": 120,
                      "val_per_bin": 1, "test_per_bin": 2, "bin_width": 10.0})
    for name in (*BASELINE_METHODS, "ranksim+bsam"):
        seed_everything(0)
        model = data.make_model()
        before = [p.detach().clone() for p in model.parameters()]
        cfg = _cfg(method=name, batch_size=40, lr=0.02)
        res = fit(model, data.train, data.val, data.bins, cfg, test_data=data.test,
                  target_scaler=data.target_scaler, log=lambda s: None)
        assert np.isfinite(res.test["all"]["mae"]), name
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name


def test_step_cost_times_every_baseline_as_the_loop_runs_it(tmp_path, capsys):
    import importlib.util

    path = ROOT / "benchmarks" / "step_cost.py"
    spec = importlib.util.spec_from_file_location("step_cost_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--smoke", "--only", "baselines", "--models", "mlp", "--json",
                    str(tmp_path / "r.json")])
    mean = res["mlp"]["baselines"]["mean"]
    assert set(mean) == set(mod.BASELINES)
    assert {m.partition(":")[0] for m in mod.BASELINES} >= set(PLUGINS) | {"vanilla"}
    assert all(np.isfinite(v) and v > 0 for v in mean.values())
    assert "ranksim+bsam" in capsys.readouterr().out


def test_plugin_options_change_the_recipes_key_by_key(tmp_path):
    from dataclasses import replace

    from balanced_sam.experiment import train_config

    csv = tmp_path / "t.csv"
    write_long_tail_csv(csv, n=300)
    data = load_data({"name": "csv", "path": str(csv), "target": "target"})
    data.recipe = replace(data.recipe, train={**data.recipe.train, "plugins": {
        "ranksim": {"gamma": 0.1}, "conr": {"beta": 0.4}}})
    assert train_config(data, {}).plugins == {"ranksim": {"gamma": 0.1}, "conr": {"beta": 0.4}}
    cfg = train_config(data, {"plugins": {"conr": {"tau": 0.2}, "fds": {"ks": 3}}})
    assert cfg.plugins == {"ranksim": {"gamma": 0.1}, "conr": {"beta": 0.4, "tau": 0.2},
                             "fds": {"ks": 3}}
