"""prepare -> train -> eval for each of the paper's benchmarks, on miniature on-disk copies.

The shipped configs (package data, balanced_sam/configs/) are used as they are, with overrides
that shrink the images, the model input and the epochs; so these tests also check that every
shipped config builds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _vision_fixtures import make_age_root, make_nyud2_root

from balanced_sam.cli import main
from balanced_sam.configs import CONFIG_DIR
from balanced_sam.data import prepare
from balanced_sam.experiment import build_experiment, load_config
from balanced_sam.train import load_checkpoint

CONFIGS = CONFIG_DIR  # the installed package's configs, wherever the tests run from
SMALL_AGE = ["data.img_size=16", "train.epochs=2", "train.batch_size=4", "train.num_workers=0",
             "train.eval_batch_size=8", "train.progress=false"]


def _run(args: list[str], capsys) -> str:
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.mark.e2e
@pytest.mark.parametrize("kind,config", [("agedb", "agedb_bsam.yaml"),
                                         ("imdb_wiki", "imdb_wiki_imbsam.yaml")])
def test_age_benchmark_end_to_end(tmp_path, capsys, kind, config):
    root = tmp_path / kind
    make_age_root(root, kind=kind)
    name = "agedb" if kind == "agedb" else "imdb-wiki"
    rep = prepare.prepare_dataset(name, root, download=False, echo=lambda s: None)
    assert rep["ok"], rep
    out = tmp_path / "run"
    text = _run(["train", "--config", str(CONFIGS / config), f"data.root={root}",
                 "--out", str(out), *SMALL_AGE], capsys)
    result = json.loads((out / "result.json").read_text())
    test = result["test"]
    assert test["all"]["count"] == 5  # the miniature's test split
    assert sum(test[r]["count"] for r in ("many", "medium", "few")) == 5
    assert np.isfinite(test["all"]["mae"]) and np.isfinite(test["all"]["gm"])
    # regions come from the training counts: every miniature bin has < 20 samples
    assert test["few"]["count"] == 5
    ck = load_checkpoint(out / "best.pt")
    assert ck["config"]["normalize"] == "none" and ck["config"]["lr"] == 0.2
    assert ck["bins"]["edges"][0] == 0 and ck["bins"]["edges"][-1] == 121
    assert "| " in text
    ev = tmp_path / "ev.json"
    _run(["eval", "--checkpoint", str(out / "best.pt"), "--json", str(ev)], capsys)
    assert json.loads(ev.read_text())["all"]["mae"] == pytest.approx(test["all"]["mae"])


@pytest.mark.e2e
def test_nyud2_end_to_end(tmp_path, capsys):
    root = tmp_path / "nyud2"
    make_nyud2_root(root, n_train=4, n_test=3)
    rep = prepare.prepare_dataset("nyud2", root, download=False, echo=lambda s: None,
                                  img_size=24)
    assert rep["ok"], rep
    mask = np.load(root / "data" / "test_balanced_mask.npy")
    out = tmp_path / "run"
    _run(["train", "--config", str(CONFIGS / "nyud2_bsam.yaml"), f"data.root={root}",
          "data.img_size=24", "model.pretrained=null", "train.epochs=1", "train.batch_size=2",
          "train.num_workers=0", "train.eval_batch_size=2", "train.progress=false",
          "--out", str(out)], capsys)
    result = json.loads((out / "result.json").read_text())
    test = result["test"]
    # only the balanced mask's pixels are evaluated
    assert test["all"]["count"] == int(mask.sum())
    for m in ("rmse", "delta1", "delta2", "delta3", "abs_rel", "log10"):
        assert np.isfinite(test["all"][m]), m
    assert 0 <= test["all"]["delta1"] <= 1
    ck = load_checkpoint(out / "last.pt")
    assert ck["bins"]["share_weight_below"] == 7 and len(ck["bins"]["counts"]) == 100
    ev = tmp_path / "ev.json"
    _run(["eval", "--checkpoint", str(out / "best.pt"), "--json", str(ev)], capsys)
    assert json.loads(ev.read_text())["all"]["rmse"] == pytest.approx(test["all"]["rmse"])


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_is_valid(config):
    """Each shipped config parses and names a known method, model and dataset."""
    spec = load_config(CONFIGS / config)
    from balanced_sam.experiment import DIR_BENCHMARKS
    from balanced_sam.models import MODEL_NAMES
    from balanced_sam.train import TrainConfig

    TrainConfig.from_dict(spec["train"])
    assert spec["data"]["name"] in DIR_BENCHMARKS or spec["data"]["name"] == "diamonds" \
        or spec["data"]["name"].startswith("rotated")
    if "model" in spec:
        assert spec["model"]["name"] in MODEL_NAMES
    text = (CONFIGS / config).read_text()
    assert "Paper" in text or "paper" in text


@pytest.mark.e2e
def test_missing_root_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--config", str(CONFIGS / "agedb_vanilla.yaml"),
                 f"data.root={tmp_path / 'nowhere'}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err
    spec = load_config(CONFIGS / "agedb_vanilla.yaml")
    spec["data"].pop("root")
    with pytest.raises(ValueError, match="data.root"):
        build_experiment(spec)
