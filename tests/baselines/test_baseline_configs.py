"""The shipped paper configs with the baselines: every one builds its experiment and its
method's plug-ins on a miniature copy of its benchmark, cites the paper, and one config of each
plug-in kind trains an epoch through ``bsam train`` (the dense ones on NYUD2-DIR)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from _vision_fixtures import make_age_root, make_nyud2_root

from balanced_sam.baselines.plugins import PLUGINS, MethodPlugin
from balanced_sam.cli import main
from balanced_sam.configs import CONFIG_DIR
from balanced_sam.data import prepare
from balanced_sam.experiment import apply_overrides, build_experiment, load_config
from balanced_sam.methods import get_method
from balanced_sam.train import load_checkpoint

PAPER = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")
               if p.stem.startswith(("agedb_", "imdb_wiki_", "nyud2_")))
SMALL = {"age": ["data.img_size=16", "train.batch_size=4", "train.eval_batch_size=8"],
         # the ResNet-18 encoder-decoder: the code path of the configs' ResNet-50, far faster
         "nyud2": ["data.img_size=24", "model.name=depth-resnet18", "model.pretrained=null",
                   "train.batch_size=2", "train.eval_batch_size=2"]}
COMMON = ["train.epochs=1", "train.num_workers=0", "train.progress=false", "train.device=cpu"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmarks")
    out = {}
    for kind, name in (("agedb", "agedb"), ("imdb_wiki", "imdb-wiki")):
        make_age_root(base / kind, kind=kind)
        assert prepare.prepare_dataset(name, base / kind, download=False,
                                       echo=lambda s: None)["ok"]
        out[kind] = base / kind
    make_nyud2_root(base / "nyud2", n_train=4, n_test=3)
    assert prepare.prepare_dataset("nyud2", base / "nyud2", download=False, echo=lambda s: None,
                                   img_size=24)["ok"]
    out["nyud2"] = base / "nyud2"
    return out


def _overrides(name, roots):
    kind = "nyud2" if name.startswith("nyud2") else "age"
    root = roots["nyud2" if kind == "nyud2" else name.split("_")[0] if name.startswith("agedb")
                 else "imdb_wiki"]
    return [f"data.root={root}", *SMALL[kind], *COMMON]


def test_every_plugin_kind_has_a_paper_config():
    methods = {load_config(CONFIG_DIR / f"{n}.yaml")["train"]["method"] for n in PAPER}
    used = {p for m in methods for p in get_method(m).plugins}
    assert used == set(PLUGINS)
    for row in ("conr+lds", "conr+fds", "bni+lds"):
        assert row in methods


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_builds_with_its_plugins_and_cites_the_paper(name, roots):
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    assert "DESIGN.md" not in text
    assert re.search(rf"^# Run:  bsam train --config {name} ", text, re.M)
    assert re.search(r"^# Paper: BSAM \(ICCV 2025\) ", text, re.M)
    # a row's figures are given with it; a quoted (*) row is explained
    if re.search(r'row "[^"]+":', text):
        assert re.search(r"^#   (MAE|RMSE) All", text, re.M)
    if re.search(r'row "[^"]+\*"', text):
        assert "`*`: quoted by the BSAM paper from the method's own publication" in text
    spec = apply_overrides(load_config(CONFIG_DIR / f"{name}.yaml"), _overrides(name, roots))
    if not name.startswith("nyud2"):
        assert spec["train"]["schedule"] == "cosine_ref"
    exp = build_experiment(spec)
    method = get_method(exp.cfg.method)
    plugin = MethodPlugin(method, exp.cfg, exp.model, exp.bins, exp.target_scaler,
                          torch.device("cpu"))
    for p in method.plugins:  # the config's options reach the plug-in
        assert plugin.options[p].items() >= (spec["train"].get("plugins") or {}).get(
            p, {}).items()


@pytest.mark.e2e
@pytest.mark.parametrize("name,extra", [
    ("agedb_ranksim", []),                                     # a feature regulariser
    ("imdb_wiki_bni", []),                                     # a loss with a learned sigma
    ("agedb_rnc", ["train.plugins.rnc.pretrain_epochs=1"]),  # the two-stage recipe
    ("nyud2_conr_fds", []),            # calibration of a dense map + a regulariser per image
    ("nyud2_bni_lds", []),                                     # a loss per pixel
    ("agedb_ccsam", []),                          # CC-SAM: 2 passes per region in the batch
])
def test_one_config_per_kind_trains_an_epoch(name, extra, roots, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", name, *_overrides(name, roots), *extra,
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    metric = "rmse" if name.startswith("nyud2") else "mae"
    assert np.isfinite(result["test"]["all"][metric])
    ck = load_checkpoint(out / "last.pt")
    assert ck["config"]["method"] == load_config(CONFIG_DIR / f"{name}.yaml")["train"]["method"]
    if name == "nyud2_conr_fds":
        assert int(ck["plugin"]["fds"]["last_epoch"]) == 0
        assert ck["plugin"]["fds"]["has_stats"].any()
    if name == "imdb_wiki_bni":
        assert ck["plugin"]["noise_sigma"].item() != 10.0  # learned from its start at 10
    if name == "agedb_rnc":
        assert (out / "pretrain" / "last.pt").exists()
