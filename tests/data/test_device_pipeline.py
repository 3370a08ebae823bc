"""The image datasets' device path (uint8 pictures from a cache filled before training, augmented
per batch where the model runs), the ``auto`` precision and layout, and the loop that uses them.

Everything runs on the CPU with miniature JPEG data; the tests named ``cuda`` need a GPU."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from _vision_fixtures import make_age_root
from PIL import Image
from torchvision.transforms import functional as TF

from balanced_sam import LabelBins
from balanced_sam import device_pipeline as dp
from balanced_sam.config import TrainConfig
from balanced_sam.configs import CONFIG_DIR
from balanced_sam.data import agedb, imdb_wiki
from balanced_sam.data.gpu_augment import AugmentParams, BatchAugment
from balanced_sam.data.images import (
    CachedPictures,
    age_test_transform,
    centre_square_record,
    fill_cache,
    open_rgb,
)
from balanced_sam.data.loader import EpochLoader
from balanced_sam.errors import ConfigError
from balanced_sam.experiment import run_training
from balanced_sam.models import MLP, DepthResNet, ResNetRegressor, SmallCNN
from balanced_sam.train import fit, seed_everything

CUDA = torch.cuda.is_available()


# `root`: tests/data/conftest.py's AgeDB-DIR miniature


def _splits(root: Path, img_size: int = 16, augment: str = "device", **kw):
    return agedb.build_splits(root, img_size=img_size, augment=augment, **kw)


# ------------------------------------------------------------------------------ the cache
def test_training_cache_holds_whole_pictures_filled_up_front(root):
    train = _splits(root)["train"]
    cache = train.picture_cache()
    assert cache.num_filled == 0  # building the splits decodes nothing
    pics = train.pictures()
    assert pics.fill_report["filled"] == len(train) == cache.num_filled == len(pics)
    for i in (0, 5, 13):
        img = open_rgb(root / train.paths[i])
        item = pics[i]
        want = np.asarray(TF.resize(img, [18, 18]))  # S = round(16 * 256 / 224) = 18
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (18, 18, 3)
        assert np.array_equal(item["image"].numpy(), want)
        assert item["size"].tolist() == [img.size[1], img.size[0]]  # (height, width)
        assert float(item["target"]) == float(train.ages[i])
    again = _splits(root)["train"].pictures()
    assert again.fill_report["filled"] == 0  # reused, not decoded again
    # evaluation splits: the centre squares that `cache: true` stores (the same files)
    test = _splits(root)["test"]
    sq = test.pictures()[2]
    rec = centre_square_record(open_rgb(root / test.paths[2]), 18)["rgb"]
    assert np.array_equal(sq["image"].numpy(), rec) and sq["size"].tolist() == [18, 18]
    plain = agedb.build_splits(root, img_size=16, cache=True, augment="cpu")["test"]
    assert plain.cache.prefix == test.store.prefix


def test_an_unfilled_record_is_an_error_not_a_lazy_fill(root):
    train = _splits(root)["train"]
    view = CachedPictures(train.picture_cache(), train.ages)
    with pytest.raises(RuntimeError, match="never filled"):
        view[0]


def test_a_cache_being_filled_is_never_replaced(tmp_path, monkeypatch):
    """Two runs that start together both find no cache file and both create one: the second
    must not replace the file the first is already filling (its workers would read the empty
    one)."""
    from balanced_sam.data.images import ArrayCache

    fields = {"rgb": ((2, 2, 3), np.uint8)}
    first = ArrayCache(tmp_path / "c", 3, fields)
    first.put(1, {"rgb": np.full((2, 2, 3), 7, np.uint8)})
    monkeypatch.setattr(Path, "is_file", lambda self: False)  # the race: nothing seen yet
    second = ArrayCache(tmp_path / "c", 3, fields)
    monkeypatch.undo()
    assert second.num_filled == 1 and int(second.get(1)["rgb"][0, 0, 0]) == 7
    first.put(2, {"rgb": np.full((2, 2, 3), 9, np.uint8)})  # the first's map is the file
    assert int(ArrayCache(tmp_path / "c", 3, fields).get(2)["rgb"][1, 1, 2]) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.filled.npy", "c.rgb.npy"]


def test_fill_with_processes_writes_what_one_process_writes(root, tmp_path):
    one = _splits(root, cache=tmp_path / "c1")["train"].pictures(processes=1)
    two = _splits(root, cache=tmp_path / "c2")["train"].pictures(processes=2)
    assert two.fill_report["filled"] == len(two)
    for i in range(len(one)):
        assert torch.equal(one[i]["image"], two[i]["image"])
        assert torch.equal(one[i]["size"], two[i]["size"])


def test_fill_refuses_a_disk_without_room(root, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    train = _splits(root)["train"]
    with pytest.raises(OSError, match="data.cache=DIR"):
        train.pictures()
    # explicit device: the error stands; auto: the run augments on the CPU and says why
    with pytest.raises(OSError):
        dp.device_pipeline(train, torch.device("cpu"))
    lines = []
    auto = _splits(root, augment="auto")["train"]
    assert dp.device_pipeline(auto, torch.device("cuda"), log=lines.append) is None
    assert "auto -> cpu" in lines[0] and "GiB" in lines[0]
    with pytest.raises(ValueError, match="make_record|processes"):
        fill_cache(train.picture_cache(), train.picture_record, processes=0)


def test_augment_option_is_checked(root):
    with pytest.raises(ValueError, match="augment must be one of auto, device, cpu"):
        _splits(root, augment="gpu")
    with pytest.raises(ValueError, match="transform_train"):
        _splits(root, transform_train=lambda im: TF.to_tensor(im))
    custom = _splits(root, augment="auto", transform_train=lambda im: TF.to_tensor(im))
    assert custom["train"].augment == "cpu"
    assert _splits(root, augment="cpu")["train"].store is None
    imdb = root.parent / "imdb"
    make_age_root(imdb, "imdb_wiki")
    assert imdb_wiki.build_splits(imdb, img_size=16, augment="device")["train"].store.whole


# ------------------------------------------------------------------------------ the batches
def _smooth_picture(h: int, w: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * yy / (h - 1), 255 * xx / (w - 1),
                    128 + 100 * np.sin(yy / 7 + xx / 5)], -1)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def test_training_crops_come_from_the_whole_picture(tmp_path):
    """With the colour ops off, a device batch is torchvision's RandomResizedCrop + flip of the
    *original* picture with the same boxes (up to the double interpolation), and boxes read in
    the stored square's coordinates, or drawn from a centre square, are far off (controls)."""
    root = tmp_path / "tall"
    (root / "AgeDB").mkdir(parents=True)
    img = _smooth_picture(60, 36)  # portrait: Resize + CenterCrop would lose 40% of the rows
    img.save(root / "AgeDB" / "a.png")
    pd.DataFrame({"age": [30.0] * 8, "path": ["AgeDB/a.png"] * 8,
                  "split": ["train"] * 8}).to_csv(root / "agedb.csv", index=False)
    train = agedb.build_splits(root, img_size=32, augment="device")["train"]
    pipe = dp.device_pipeline(train, torch.device("cpu"), log=lambda s: None)
    pipe.augment = BatchAugment(32, brightness=0, contrast=0, saturation=0, hue=0, jitter_p=0,
                                grayscale_p=0, mean=(0, 0, 0), std=(1, 1, 1))
    batch = torch.utils.data.default_collate([pipe.train[i] for i in range(8)] * 8)
    x, y = pipe.train_batch(batch, epoch=3, step=1)
    assert x.shape == (64, 3, 32, 32) and y.tolist() == [30.0] * 64
    g = torch.Generator().manual_seed(dp.batch_seed(0, 3, 1))
    params = pipe.augment.sample(64, 37, 37, batch["size"], generator=g)
    ref = []
    for i in range(64):
        crop = TF.resized_crop(img, *params.boxes[i].tolist(), [32, 32])
        ref.append(TF.to_tensor(TF.hflip(crop) if params.flip[i] else crop))
    ref = torch.stack(ref)
    assert float((x - ref).abs().mean()) * 255 < 1.0  # measured 0.51 levels
    sq = torch.from_numpy(centre_square_record(img, 37)["rgb"]).permute(2, 0, 1)
    wrong = {"square cache": (sq.expand(64, 3, 37, 37), params),
             "sizes ignored": (batch["image"].permute(0, 3, 1, 2),
                               AugmentParams(**{**params.__dict__,
                                                "sizes": torch.full((64, 2), 37)}))}
    for name, (xs, p) in wrong.items():
        assert float((pipe.augment.apply(xs, p) - ref).abs().mean()) * 255 > 10, name


def test_eval_batches_are_the_recipe_test_transform(root):
    """At the paper's 224 px, the evaluation crop sliced from the cached 256 squares equals
    Resize(256) + CenterCrop(224) + Normalize of the JPEG."""
    splits = _splits(root, img_size=224)
    pipe = dp.device_pipeline(splits["train"], torch.device("cpu"), log=lambda s: None)
    view, transform = pipe.view(splits["test"])
    assert transform == pipe.eval_batch and pipe.view(splits["test"])[0] is view
    assert view[0].dtype == torch.uint8 and view[0].shape == (5, 256, 256, 3)
    x, y = transform(view)
    tf = age_test_transform(224)
    want = torch.stack([tf(open_rgb(root / p)) for p in splits["test"].paths])
    assert x.shape == want.shape == (5, 3, 224, 224)
    assert float((x - want).abs().max()) < 1e-6
    assert torch.equal(y, splits["test"].ages)
    assert pipe.view((x, y))[1] is None  # tensor data: no device path


def test_augmentation_depends_on_seed_epoch_step_and_rank_only(root):
    train = _splits(root)["train"]
    pipes = {r: dp.device_pipeline(train, torch.device("cpu"), seed=5, rank=r,
                                   log=lambda s: None) for r in (0, 1)}
    loaders = [EpochLoader(pipes[0].train, 4, shuffle=True, seed=5, num_workers=w)
               for w in (0, 2)]
    b0, b2 = (list(ld.epoch(1)) for ld in loaders)
    assert len(b0) == len(b2) == 4
    for a, b in zip(b0, b2):  # the loaded uint8 batches do not depend on the workers
        assert all(torch.equal(a[k], b[k]) for k in ("image", "size", "target"))
    batch = b0[0]
    first = pipes[0].train_batch(batch, epoch=1, step=0)[0]
    assert torch.equal(first, pipes[0].train_batch(batch, epoch=1, step=0)[0])
    for other in (pipes[0].train_batch(batch, epoch=1, step=1)[0],
                  pipes[0].train_batch(batch, epoch=2, step=0)[0],
                  pipes[1].train_batch(batch, epoch=1, step=0)[0]):
        assert float((other - first).abs().max()) > 0.1
    assert len({dp.batch_seed(s, e, k, r) for s in range(3) for e in range(3)
                for k in range(3) for r in range(2)}) == 54
    assert 0 <= dp.batch_seed(2**40, 10**6, 10**6, 7) < 2**63


def _fit_age(root: Path, out: Path, *, epochs: int, resume: bool = False, kill_after=None,
             augment: str = "device"):
    splits = _splits(root, augment=augment)
    seed_everything(0)
    model = SmallCNN(3, (4,), 8, input_size=16)
    bins = LabelBins.from_labels(splits["train"].targets, bin_width=1, lower=0, upper=121)
    cfg = TrainConfig(method="bsam", epochs=epochs, batch_size=4, lr=0.01, rho=0.05,
                      progress=False, device="cpu", amp="auto", channels_last="auto")

    def killer(epoch, row):
        if kill_after is not None and epoch == kill_after:
            raise KeyboardInterrupt

    res = fit(model, splits["train"], splits["val"], bins, cfg, test_data=splits["test"],
              out_dir=out, resume=resume, on_epoch_end=killer, log=lambda s: None)
    return res, model


@pytest.mark.e2e
def test_resumed_run_sees_the_augmentations_of_an_unbroken_one(root, tmp_path, monkeypatch):
    unbroken, m1 = _fit_age(root, tmp_path / "a", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        _fit_age(root, tmp_path / "b", epochs=3, kill_after=0)
    resumed, m2 = _fit_age(root, tmp_path / "b", epochs=3, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(),
                                                 m2.state_dict().values()))
    assert resumed.test == unbroken.test
    # channels_last auto: measured once on this machine, then remembered (the layout cache), so
    # both runs trained in one layout; the resumed run kept its checkpoint's decision
    assert unbroken.config["amp"] == "none"
    assert unbroken.config["channels_last"] is resumed.config["channels_last"]
    assert unbroken.layout["reason"] in ("measured", "cached")
    assert resumed.layout["reason"] == "resumed"
    # control: had the resumed epochs drawn other augmentations, the weights would differ
    with pytest.raises(KeyboardInterrupt):
        _fit_age(root, tmp_path / "c", epochs=3, kill_after=0)
    seed = dp.batch_seed
    monkeypatch.setattr(dp, "batch_seed", lambda s, e, k, r=0: seed(s + 1, e, k, r))
    _, m3 = _fit_age(root, tmp_path / "c", epochs=3, resume=True)
    assert not all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(),
                                                     m3.state_dict().values()))
    # and the CPU path (PIL per image) trains on other augmentations than the device path
    _, m4 = _fit_age(root, tmp_path / "d", epochs=3, augment="cpu")
    assert not torch.equal(m1.features[0].weight, m4.features[0].weight)


@pytest.mark.e2e
def test_bsam_train_on_the_device_path_logs_it_and_evaluates(root, tmp_path):
    lines: list[str] = []
    spec = {"data": {"name": "agedb", "root": str(root), "img_size": 16, "augment": "device"},
            "model": {"name": "small-cnn", "in_channels": 3, "channels": [4], "hidden": 8,
                      "input_size": 16},
            "train": {"method": "bsam", "epochs": 1, "batch_size": 4, "progress": False,
                      "amp": "auto", "channels_last": "auto", "device": "cpu"}}
    res = run_training(spec, out=tmp_path / "run", log=lines.append)
    assert any(line.startswith("augment: per batch on cpu") and "14 training pictures" in line
               for line in lines)
    assert res.test["all"]["count"] == 5 and np.isfinite(res.test["all"]["mae"])
    result = yaml.safe_load((tmp_path / "run" / "result.json").read_text())
    assert result["config"]["amp"] == "none"
    assert result["config"]["channels_last"] is result["layout"]["channels_last"]
    assert result["layout"]["requested"] == "auto" and result["layout"]["device"] == "cpu"


# ------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("make,x", [
    (lambda: SmallCNN(3, (4,), 8, input_size=16), torch.rand(8, 3, 16, 16)),
    (lambda: MLP(5, (16,)), torch.rand(8, 5)),
    (lambda: ResNetRegressor("resnet18"), torch.rand(4, 3, 32, 32)),
    (lambda: DepthResNet("resnet18", pretrained=None), torch.rand(2, 3, 32, 40)),
])
def test_heads_run_in_float32_under_bf16_autocast(make, x):
    """A bf16 output has 8 significant bits (steps of 0.25 for ages of 32-64): an exact-zero
    error becomes common and the GM drops; so the head runs in float32, the body in bf16."""
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():  # predictions at the scale of ages, so the bf16 grid is coarse
        model.head.bias.fill_(45.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, feats = model(x, return_features=True)
        assert feats.dtype == torch.bfloat16  # the body in the autocast dtype
        assert out.dtype == torch.float32
        assert torch.equal(out, model.forward_head(feats))
        control = model.head(feats)  # (no dropout in these models)
    assert control.dtype == torch.bfloat16  # what the head gives when autocast reaches it
    off_grid = out != out.bfloat16().float()
    assert float(off_grid.float().mean()) > 0.9
    out.float().sum().backward()  # gradients flow through the cast
    assert model.head.weight.grad is not None and torch.isfinite(model.head.weight.grad).all()
    fp32 = model(x).detach()  # the same model in float32: close (bf16 body), not equal
    assert float((fp32 - out.detach()).abs().mean() / fp32.abs().mean()) < 0.1


# ------------------------------------------------------------------------------ auto settings
def test_auto_settings_per_device():
    assert dp.auto_settings("auto", "auto", "cpu") == ("none", False)
    assert dp.auto_settings("auto", "auto", "cuda:1", bf16_supported=True) == ("bf16", True)
    assert dp.auto_settings("auto", "auto", "cuda", bf16_supported=False) == ("none", True)
    assert dp.auto_settings("fp16", True, "cpu") == ("fp16", True)  # given values pass
    assert dp.auto_settings("none", False, "cuda", bf16_supported=True) == ("none", False)
    assert dp.augment_mode("auto", "cuda:0") == "device"
    assert dp.augment_mode("auto", "cpu") == "cpu" and dp.augment_mode("auto", "mps") == "cpu"
    assert dp.augment_mode("device", "cpu") == "device"
    with pytest.raises(ValueError, match="data.augment"):
        dp.augment_mode("gpu", "cpu")


def test_config_takes_auto_and_names_bad_values():
    TrainConfig(amp="auto", channels_last="auto").validate()
    TrainConfig.from_dict({"amp": "bf16", "channels_last": True})
    with pytest.raises(ConfigError, match="train.amp .* none, bf16, fp16 or auto"):
        TrainConfig(amp="bf15").validate()
    with pytest.raises(ConfigError, match="train.channels_last .* true, false or auto"):
        TrainConfig(channels_last="yes").validate()
    with pytest.raises(ConfigError, match="train.channels_last: expected"):
        TrainConfig(channels_last=1).validate()


@pytest.mark.e2e
def test_channels_last_on_the_cpu_trains_and_may_change_on_resume(root, tmp_path):
    x = torch.randn(64, 3, 16, 16)
    y = torch.rand(64) * 50
    bins = LabelBins.from_labels(y, bin_width=5, lower=0, upper=50)
    cfg = dict(method="bsam", epochs=2, batch_size=16, progress=False, device="cpu")
    seed_everything(0)
    a = SmallCNN(3, (4,), 8, input_size=16)
    ra = fit(a, (x, y), None, bins, TrainConfig(**cfg, channels_last=True), log=lambda s: None,
             out_dir=tmp_path / "cl")
    assert a.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    seed_everything(0)
    b = SmallCNN(3, (4,), 8, input_size=16)
    fit(b, (x, y), None, bins, TrainConfig(**cfg), log=lambda s: None)
    assert not b.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    # the same learning, up to float rounding in another layout
    assert torch.allclose(a.features[0].weight, b.features[0].weight, atol=1e-4)
    assert np.isfinite(ra.history[-1]["train_loss"])
    fit(SmallCNN(3, (4,), 8, input_size=16), (x, y), None, bins,
        TrainConfig(**{**cfg, "epochs": 3}), out_dir=tmp_path / "cl", resume=True,
        log=lambda s: None)


def test_paper_configs_use_the_device_defaults():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        paper = spec["data"]["name"] in ("agedb", "imdb-wiki", "nyud2")
        if not paper:
            continue
        assert spec["train"]["amp"] == "auto" and spec["train"]["channels_last"] == "auto", path
        if spec["data"]["name"] != "nyud2":
            assert spec["data"]["augment"] == "auto", path


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.e2e
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_bsam_train_takes_the_device_path_in_bf16_channels_last(root, tmp_path):
    lines: list[str] = []
    spec = {"data": {"name": "agedb", "root": str(root), "img_size": 32},  # augment: auto
            "train": {"method": "bsam", "epochs": 2, "batch_size": 4, "progress": False,
                      "amp": "auto", "channels_last": "auto", "device": "cuda",
                      "num_workers": 2}}
    res = run_training(spec, out=tmp_path / "run", log=lines.append)
    assert any(line.startswith("augment: per batch on cuda") for line in lines), lines
    assert res.config["amp"] == "bf16" and res.config["channels_last"] is True
    assert np.isfinite(res.test["all"]["mae"])


@pytest.mark.e2e
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_nyud2_trains_in_bf16_channels_last(tmp_path):
    from _vision_fixtures import make_nyud2_root

    from balanced_sam.data import prepare

    root = tmp_path / "nyud2"
    make_nyud2_root(root, n_train=4, n_test=3)
    prepare.prepare_dataset("nyud2", root, download=False, echo=lambda s: None, img_size=24)
    spec = yaml.safe_load((CONFIG_DIR / "nyud2_bsam.yaml").read_text())
    spec["data"].update(root=str(root), img_size=24)
    spec["model"]["pretrained"] = None
    spec["train"].update(epochs=1, batch_size=2, num_workers=0, eval_batch_size=2,
                         progress=False, device="cuda")
    res = run_training(spec, out=tmp_path / "run", log=lambda s: None)
    assert res.config["amp"] == "bf16" and res.config["channels_last"] is True
    assert np.isfinite(res.test["all"]["rmse"])
