"""``train.channels_last: auto``: both layouts timed on the run's model, the faster kept with a
margin, the decision remembered for the machine, kept on resume, decided once per bench; and
``train.compile``."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _vision_fixtures import make_mnist_folder
from torch import nn

from balanced_sam import layout as lay
from balanced_sam.bench import BenchConfig, run_bench
from balanced_sam.bins import LabelBins
from balanced_sam.config import TrainConfig
from balanced_sam.data import registry
from balanced_sam.models import SmallCNN
from balanced_sam.train import fit, load_checkpoint, seed_everything

SHAPE = (1, 12, 12)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(1, (4,), 8, input_size=12)


class FakeClock:
    """A measurement that says what the test wants: (nchw_ms, channels_last_ms) and a count."""

    def __init__(self, nchw: float, cl: float) -> None:
        self.nchw, self.cl, self.calls = nchw, cl, 0

    def __call__(self, model, shape, batch, device, autocast=None):
        self.calls += 1
        return self.nchw, self.cl, 5


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache" / "layouts.json"
    monkeypatch.setenv("BSAM_LAYOUT_CACHE", str(path))
    return path


# ---------------------------------------------------------------------------- the decision
@pytest.mark.parametrize("nchw,cl,want", [(10.0, 5.0, True), (10.0, 9.5, False),
                                          (11.0, 9.99, True), (5.0, 10.0, False)])
def test_auto_keeps_channels_last_only_when_it_is_clearly_faster(nchw, cl, want):
    clock = FakeClock(nchw, cl)
    c = lay.choose_layout("auto", _cnn(), SHAPE, 8, "cpu", measure=clock, cache=None)
    assert (c.channels_last, c.reason, c.nchw_ms, c.channels_last_ms) == (want, "measured",
                                                                          nchw, cl)
    assert clock.calls == 1 and c.requested == "auto" and c.device == "cpu"
    assert ("channels_last" if want else "NCHW") in c.describe().split(" (")[0]


def test_given_layouts_and_models_without_images_are_not_measured():
    clock = FakeClock(10.0, 1.0)
    for value in (True, False):
        c = lay.choose_layout(value, _cnn(), SHAPE, 8, "cpu", measure=clock, cache=None)
        assert (c.channels_last, c.reason) == (value, "given")
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    assert lay.choose_layout("auto", mlp, (3,), 8, "cpu", measure=clock, cache=None).reason \
        == "no-conv2d"
    for shape in (None, (144,), (1, 1, 12, 12)):
        c = lay.choose_layout("auto", _cnn(), shape, 8, "cpu", measure=clock, cache=None)
        assert (c.channels_last, c.reason) == (False, "not-images")
    assert clock.calls == 0
    with pytest.raises(ValueError, match="channels_last must be true, false or auto"):
        lay.choose_layout("yes", _cnn(), SHAPE, 8, "cpu", measure=clock, cache=None)


def test_a_measurement_is_remembered_for_the_same_model_input_and_batch(cache):
    clock = FakeClock(10.0, 5.0)
    first = lay.choose_layout("auto", _cnn(), SHAPE, 8, "cpu", measure=clock)
    assert first.reason == "measured" and cache.is_file()
    again = lay.choose_layout("auto", _cnn(), SHAPE, 8, "cpu", measure=FakeClock(5.0, 10.0))
    assert (again.channels_last, again.reason, again.nchw_ms) == (True, "cached", 10.0)
    assert "cached, measured on cpu" in again.describe()
    # another batch size, input or model is another measurement
    for args in ((SHAPE, 16), ((1, 14, 14), 8)):
        other = lay.choose_layout("auto", _cnn(), *args, "cpu", measure=FakeClock(5.0, 10.0))
        assert (other.channels_last, other.reason) == (False, "measured")
    wider = SmallCNN(1, (6,), 8, input_size=12)
    assert lay.choose_layout("auto", wider, SHAPE, 8, "cpu",
                             measure=FakeClock(5.0, 10.0)).reason == "measured"
    assert len(json.loads(cache.read_text())) == 4


def test_the_cache_can_be_turned_off_and_a_broken_one_is_measured_again(cache, monkeypatch):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    clock = FakeClock(10.0, 5.0)
    assert lay.choose_layout("auto", _cnn(), SHAPE, 8, "cpu", measure=clock).reason == \
        "measured"
    assert json.loads(cache.read_text())  # replaced by a readable one
    # an entry whose decision is not a boolean ("false" would read as true) is measured again
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: {"channels_last": "false", "device": "cpu"}}))
    assert lay.choose_layout("auto", _cnn(), SHAPE, 8, "cpu", measure=clock).reason == \
        "measured"
    assert json.loads(cache.read_text())[key]["channels_last"] is True
    monkeypatch.setenv("BSAM_LAYOUT_CACHE", "off")
    assert lay.cache_path() is None
    for _ in range(2):
        assert lay.choose_layout("auto", _cnn(), SHAPE, 8, "cpu", measure=clock).reason == \
            "measured"
    assert clock.calls == 4


def test_the_cache_is_not_written_through_a_link(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    link = tmp_path / "layouts.json"
    link.symlink_to(target)
    monkeypatch.setenv("BSAM_LAYOUT_CACHE", str(link))
    lay.choose_layout("auto", _cnn(), SHAPE, 8, "cpu", measure=FakeClock(10.0, 5.0))
    assert target.read_text() == "{}" and link.is_symlink()


def test_the_probe_leaves_the_model_and_the_random_streams_as_they_were():
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    nchw, cl, rounds = lay.measure_layout(model, SHAPE, 8, "cpu", rounds=3)
    assert nchw > 0 and cl > 0 and rounds == 3
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.features[0].weight.is_contiguous() and model.features[0].weight.grad is None


def test_the_input_shape_of_a_dataset_leaves_the_random_streams_alone():
    import random

    import numpy as np

    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):  # an augmentation drawing from every global stream
            random.random()
            np.random.rand()  # noqa: NPY002
            return torch.rand(3, 8, 8), torch.tensor(1.0)

    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())  # noqa: NPY002
    assert lay.input_shape(Augmented()) == (3, 8, 8)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2][1])  # noqa: NPY002
    assert lay.input_shape((torch.zeros(5, 1, 6, 6), torch.zeros(5))) == (1, 6, 6)
    assert lay.input_shape(object()) is None


# ---------------------------------------------------------------------------- fit
def _channels_last(model: nn.Module) -> bool:
    """The first convolution's weight (out, 1, 3, 3) is stored channels-last (its channel
    stride 1; NCHW: 9); with one input channel ``is_contiguous`` cannot tell the two apart."""
    return model.features[0].weight.stride()[1] == 1


def _images(n: int = 48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *SHAPE, generator=g)
    y = (x.mean(dim=(1, 2, 3)) * 20 + 50).round()
    return x, y


def _fit(out, *, clock, epochs=3, kill_after=None, resume=False, **kw):
    x, y = _images()
    bins = LabelBins.from_labels(y, bin_width=5, lower=0, upper=100)
    seed_everything(0)
    model = SmallCNN(1, (4,), 8, input_size=12)
    cfg = TrainConfig(method="bsam", epochs=epochs, batch_size=16, lr=0.01, rho=0.05,
                      progress=False, device="cpu", **kw)

    def killer(epoch, row):
        if kill_after is not None and epoch == kill_after:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lay, "measure_layout", clock)
        res = fit(model, (x, y), (x[:16], y[:16]), bins, cfg, out_dir=out, resume=resume,
                  on_epoch_end=killer, log=lambda s: None)
    return res, model


def test_fit_trains_in_the_measured_layout_and_records_it(tmp_path, cache):
    res, model = _fit(tmp_path / "a", clock=FakeClock(10.0, 5.0), epochs=1)
    assert _channels_last(model)
    assert res.config["channels_last"] is True
    assert res.layout["reason"] == "measured" and res.layout["nchw_ms"] == 10.0
    ck = load_checkpoint(tmp_path / "a" / "last.pt")
    assert ck["layout"]["channels_last"] is True and ck["config"]["channels_last"] is True
    # the same run again on this machine: the remembered decision, no new measurement
    clock = FakeClock(5.0, 10.0)
    res2, model2 = _fit(tmp_path / "b", clock=clock, epochs=1)
    assert clock.calls == 0 and res2.layout["reason"] == "cached"
    assert res2.config["channels_last"] is True and res2.val == res.val


def test_a_resumed_auto_run_keeps_the_layout_of_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("BSAM_LAYOUT_CACHE", "off")
    unbroken, m1 = _fit(tmp_path / "a", clock=FakeClock(5.0, 10.0))  # NCHW faster
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "b", clock=FakeClock(5.0, 10.0), kill_after=0)
    # the machine now measures channels_last faster: the resumed run keeps NCHW all the same
    resumed, m2 = _fit(tmp_path / "b", clock=FakeClock(10.0, 5.0), resume=True)
    assert resumed.layout["reason"] == "resumed" and resumed.config["channels_last"] is False
    assert not _channels_last(m2)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(),
                                                 m2.state_dict().values()))
    # a layout given on resume is a safe change: it trains on in that layout
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "c", clock=FakeClock(5.0, 10.0), kill_after=0)
    given, m3 = _fit(tmp_path / "c", clock=FakeClock(5.0, 10.0), resume=True,
                     channels_last=True)
    assert given.layout["reason"] == "given" and given.config["channels_last"] is True
    assert _channels_last(m3)


def test_compile_trains_the_same_model_and_saves_plain_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("BSAM_LAYOUT_CACHE", "off")
    eager, m1 = _fit(tmp_path / "a", clock=FakeClock(5.0, 10.0), epochs=1)
    compiled, m2 = _fit(tmp_path / "b", clock=FakeClock(5.0, 10.0), epochs=1, compile=True)
    assert compiled.config["compile"] is True
    for (k1, a), (k2, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.allclose(a, b, rtol=1e-4, atol=1e-5), k1
    ck = load_checkpoint(tmp_path / "b" / "best.pt")
    assert set(ck["model"]) == set(m1.state_dict())  # no torch.compile wrapper in the keys
    assert type(m2) is SmallCNN  # the caller's module is not replaced


# ---------------------------------------------------------------------------- the bench
def _mini_image_bench(tmp_path, monkeypatch) -> Path:
    """The rotated bench on 60 images of 7 x 7 and a 4-channel CNN, 1 epoch."""
    mini = make_mnist_folder(tmp_path / "idx", n_train=100, n_test=40)
    entry = registry.get_entry("rotated-fashion-mnist")
    recipe = replace(entry.recipe,
                     data={"image_size": 7, "n_train": 60, "val_per_bin": 1, "test_per_bin": 2,
                           "bin_width": 20.0},
                     model={"name": "small-cnn", "channels": [4], "hidden": 8},
                     train={**entry.recipe.train, "epochs": 1, "batch_size": 30},
                     bench={"methods": ("sqinv", "bsam"), "seeds": 1})
    monkeypatch.setitem(registry.REGISTRY, "rotated-fashion-mnist", replace(entry, recipe=recipe))
    return mini


def test_a_bench_decides_the_layout_once_and_keeps_it_when_resumed(tmp_path, monkeypatch,
                                                                   cache):
    mini = _mini_image_bench(tmp_path, monkeypatch)
    clock = FakeClock(10.0, 5.0)
    monkeypatch.setattr(lay, "measure_layout", clock)
    logs: list[str] = []
    res = run_bench(BenchConfig(dataset="rotated-fashion-mnist", data_root=str(mini),
                                out=tmp_path / "b", plots=False), log=logs.append)
    assert clock.calls == 1  # once for the bench, not once per run
    assert res["layout"]["channels_last"] is True and res["layout"]["reason"] == "measured"
    assert any("layout channels_last (measured on cpu" in line for line in logs)
    assert json.loads((tmp_path / "b" / "layout.json").read_text())["channels_last"] is True
    assert res["config"]["train"]["channels_last"] == "auto"  # what was asked
    manifest = json.loads((tmp_path / "b" / ".bsam-manifest.json").read_text())
    assert "layout.json" in json.dumps(manifest)
    # more seeds into the same folder, with the cache gone and the machine saying otherwise:
    # the folder's decision stands, and the new runs train in it
    os.remove(cache)
    clock2 = FakeClock(5.0, 10.0)
    monkeypatch.setattr(lay, "measure_layout", clock2)
    res2 = run_bench(BenchConfig(dataset="rotated-fashion-mnist", data_root=str(mini),
                                 seeds=[0, 1], out=tmp_path / "b", plots=False),
                     log=lambda s: None)
    assert clock2.calls == 0
    assert res2["layout"]["channels_last"] is True and res2["layout"]["reason"] == "bench"
    assert res2["methods"]["bsam"]["runs"][0] == res["methods"]["bsam"]["runs"][0]


def test_a_bench_folder_from_before_the_measurement_keeps_its_layout(tmp_path, monkeypatch,
                                                                     cache):
    """A folder of the release before: no layout.json, ``channels_last: false`` in its setting
    (that release's default). Extending it trains the new runs in NCHW as its old ones."""
    mini = _mini_image_bench(tmp_path, monkeypatch)
    out = tmp_path / "b"
    monkeypatch.setattr(lay, "measure_layout", FakeClock(10.0, 5.0))
    first = run_bench(BenchConfig(dataset="rotated-fashion-mnist", data_root=str(mini),
                                  out=out, plots=False), log=lambda s: None)
    # make it a folder of the release before (which trained it in NCHW)
    (out / "layout.json").unlink()
    manifest = json.loads((out / ".bsam-manifest.json").read_text())
    del manifest["entries"]["layout.json"]
    (out / ".bsam-manifest.json").write_text(json.dumps(manifest))
    setting = json.loads((out / "bench_config.json").read_text())
    setting["train"]["channels_last"] = False
    (out / "bench_config.json").write_text(json.dumps(setting))
    clock = FakeClock(10.0, 5.0)
    monkeypatch.setattr(lay, "measure_layout", clock)
    logs: list[str] = []
    res = run_bench(BenchConfig(dataset="rotated-fashion-mnist", data_root=str(mini),
                                seeds=[0, 1], out=out, plots=False), log=logs.append)
    assert clock.calls == 0  # not another bench, not measured: its earlier runs' layout
    assert res["layout"]["channels_last"] is False and res["layout"]["reason"] == "bench"
    assert any("layout NCHW (the layout of this folder's earlier runs)" in line
               for line in logs)
    assert res["methods"]["bsam"]["runs"][0] == first["methods"]["bsam"]["runs"][0]
    assert json.loads((out / "layout.json").read_text())["channels_last"] is False


def test_a_bench_over_devices_of_one_kind_decides_once_for_all(tmp_path, monkeypatch, cache):
    from balanced_sam.bench import ExecutorConfig

    mini = _mini_image_bench(tmp_path, monkeypatch)
    clock = FakeClock(10.0, 5.0)
    monkeypatch.setattr(lay, "measure_layout", clock)
    res = run_bench(BenchConfig(dataset="rotated-fashion-mnist", data_root=str(mini),
                                out=tmp_path / "b", plots=False, jobs=1,
                                executor=ExecutorConfig(devices=["cpu"])), log=lambda s: None)
    assert clock.calls == 1 and res["layout"]["channels_last"] is True
    assert res["executor"]["devices"] == ["cpu"]
