"""The script that chose the default image bench's recipe still runs one validation-only
training run against the library as it is (on a miniature IDX folder)."""

from __future__ import annotations

import json
import math

import pytest
from _repo_scripts import load_repo_script
from _vision_fixtures import make_mnist_folder

from balanced_sam.data import rotated_mnist

pytestmark = pytest.mark.e2e  # every test here runs the application end to end

tune = load_repo_script("benchmarks/tune_image_bench.py", "tune_image_bench")


def test_one_validation_run_trains_the_recipes_model_and_never_touches_test(tmp_path,
                                                                             monkeypatch):
    root = make_mnist_folder(tmp_path / "idx", n_train=200, n_test=60)
    small = {"val_per_bin": 1, "test_per_bin": 1, "bin_width": 20.0}

    def mini(key: str):
        return rotated_mnist.load_rotated("mnist", 0, root, **{**json.loads(key), **small})

    monkeypatch.setattr(tune, "_data", mini)
    task = {"cand": "mini", "data": {"n_train": 120}, "method": "bsam", "rho": 0.01, "seed": 0,
            "train": {**tune.COMMON, "epochs": 3, "lr": 0.05, "warmup_epochs": 1}}
    res = tune._train(task)
    assert math.isfinite(res["val"]["all"]["mae"]) and "test" not in res
    assert len(res["val_mae_by_epoch"]) == 3 and len(res["spread_by_epoch"]) == 3
    assert 1 <= res["best_epoch"] <= 3
    # the flags read what the run recorded
    assert tune.collapsed({**res, "pred_spread": 0.01})
    assert tune.unstable({**res, "best_epoch": 1})
