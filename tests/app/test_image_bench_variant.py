"""A cheaper variant of the rotated benchmark for the default image bench: smaller images
(data option ``image_size``), the model's widths in the recipe's model spec, its input size
from the data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _vision_fixtures import make_mnist_folder

from balanced_sam.bench import BenchConfig, run_bench
from balanced_sam.data import registry, rotated_mnist

SMALL = {"n_train": 60, "val_per_bin": 1, "test_per_bin": 2, "bin_width": 20.0}


@pytest.fixture
def mini(tmp_path: Path) -> Path:
    return make_mnist_folder(tmp_path / "idx", n_train=100, n_test=40)


def test_image_size_averages_the_rotated_full_resolution_images(mini: Path) -> None:
    full = rotated_mnist.load(seed=3, data_root=mini, **SMALL)
    small = rotated_mnist.load(seed=3, data_root=mini, image_size=14, **SMALL)
    assert small.x_train.shape == (60, 1, 14, 14) and small.x_test.shape == (18, 1, 14, 14)
    assert torch.equal(small.y_train, full.y_train) and torch.equal(small.y_test, full.y_test)
    # the same images rotated at 28 x 28, then 2 x 2 averaged (before standardisation)
    raw_full = full.x_test * full.info["pixel_std"] + full.info["pixel_mean"]
    raw_small = small.x_test * small.info["pixel_std"] + small.info["pixel_mean"]
    assert torch.allclose(F.avg_pool2d(raw_full, 2), raw_small, atol=1e-5)
    assert small.info["image_size"] == 14 and full.info["image_size"] == 28
    # another variant of the data: another fingerprint; the full size keeps the old one
    assert small.info["split_params"]["image_size"] == 14
    assert "image_size" not in full.info["split_params"]


@pytest.mark.parametrize("bad", [0, 29, 14.0, "14", True])
def test_image_size_must_fit_the_images(mini: Path, bad) -> None:
    with pytest.raises(ValueError, match=r"image_size must be an integer in \[1, 28\]"):
        rotated_mnist.load(data_root=mini, image_size=bad, **SMALL)


@pytest.mark.e2e
def test_the_recipe_carries_the_variant_and_the_model_follows_the_data(mini: Path, tmp_path,
                                                                       monkeypatch) -> None:
    entry = registry.get_entry("rotated-fashion-mnist")
    recipe = replace(entry.recipe, data={"image_size": 7, **SMALL},
                     model={"name": "small-cnn", "channels": [4], "hidden": 8},
                     train={**entry.recipe.train, "epochs": 1, "batch_size": 30},
                     bench={"methods": ("sqinv", "bsam"), "seeds": 1})
    monkeypatch.setitem(registry.REGISTRY, "rotated-fashion-mnist", replace(entry, recipe=recipe))
    data = registry.load_data({"name": "rotated-fashion-mnist", "data_root": str(mini)})
    assert data.train[0].shape[-2:] == (7, 7)  # the recipe's data option, unless told
    model = data.make_model()
    assert model.features[0].out_channels == 4 and model.head.in_features == 8
    assert model(data.train[0][:3]).shape == (3,)  # input size 7 from the data
    told = registry.load_data({"name": "rotated-fashion-mnist", "data_root": str(mini),
                               "image_size": 14})
    assert told.train[0].shape[-2:] == (14, 14) and told.make_model()(told.val[0]).ndim == 1
    assert told.fingerprint["digest"] != data.fingerprint["digest"]
    # the bench runs it: the recipe's methods and seeds
    res = run_bench(BenchConfig(dataset="rotated-fashion-mnist", data_root=str(mini),
                                out=tmp_path / "b", plots=False), log=lambda s: None)
    assert list(res["methods"]) == ["sqinv", "bsam"] and len(res["methods"]["bsam"]["runs"]) == 1
    assert res["config"]["model"] == "small-cnn(channels=[4], hidden=8)"
