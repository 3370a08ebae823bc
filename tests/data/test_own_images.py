"""Your own images (``bsam bench --images``, ``data.name: images``): a generated folder of small
pictures (PNG, JPEG, grayscale, 16-bit TIFF) with a long-tailed continuous target in a CSV that
has no split column and whose path column is not called ``path``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from balanced_sam.cli import main
from balanced_sam.data import folder_recipe
from balanced_sam.data.folder_images import (
    UnreadableImagesError,
    build_splits,
    default_img_size,
    read_rgb,
)
from balanced_sam.data.folder_recipe import FINETUNE_TRAIN, SCRATCH_TRAIN
from balanced_sam.data.images import CSVFormatError, MissingImagesError
from balanced_sam.data.registry import load_data
from balanced_sam.data.tabular import load_table
from balanced_sam.experiment import build_experiment, train_config


def make_folder(root: Path, n: int = 48, seed: int = 0, size: int = 16) -> Path:
    """``root/labels.csv`` (columns subject, file, score) and ``root/pics/``: one picture per
    row, by turns an RGB PNG, an RGB JPEG, a grayscale PNG and (every 8th) a 16-bit TIFF; the
    score is exponential (a long tail of high scores) and sets the brightness."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = float(np.round(rng.exponential(8.0), 2))
        level = min(255.0, 20.0 + 8.0 * y)
        arr = np.clip(rng.normal(level, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
        kind = i % 4 if i % 8 != 7 else 4
        ext = {0: "png", 1: "jpg", 2: "png", 3: "jpeg", 4: "tif"}[kind]
        rel = f"pics/im{i:03d}.{ext}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(arr)
        if kind == 2:
            img = img.convert("L")
        if kind == 4:
            img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
        img.save(root / rel)
        rows.append({"subject": f"s{i}", "file": rel, "score": y})
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_bench_on_a_folder_writes_results(folder: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    rc, text, err = _cli(capsys, "bench", "--images", str(folder), "--target", "score",
                         "--methods", "sqinv,bsam", "--seeds", "1", "--epochs", "1",
                         "--img-size", "16", "--jobs", "1", "--no-plots", "--out", str(out))
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"sqinv", "bsam"}
    for m in results["methods"].values():
        (run,) = m["runs"]
        assert np.isfinite(run["test"]["all"]["mae"])
    data = results["config"]["data"]
    assert data["path_col"] == "file" and data["split"] == "dir" and data["img_size"] == 16
    sizes = data["sizes"]
    assert sizes["train"] + sizes["val"] + sizes["test"] == 48 and sizes["val"] > 0
    assert results["fingerprint"]["params"]["split_seed"] == 0
    flat = " ".join(text.split())  # the bench wraps its lines at 100 columns
    assert (f"images: 48 pictures of labels.csv under {folder.parent}, path column 'file' "
            "(found), DIR split (C 50, seed 0), input 16 x 16, decoded-image cache "
            f"{folder.parent / '.bsam_cache'}") in flat
    assert "no rho was tuned for this data" in flat
    assert "--rho 0.01,0.02,0.05,0.1,0.2" in flat
    assert f"lr {SCRATCH_TRAIN['lr']}" in flat


@pytest.mark.e2e
def test_train_eval_analyze_on_an_images_config(folder: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"data: {{name: images, path: {folder}, target: score, img_size: 16}}\n"
                   "train: {method: bsam, epochs: 1, batch_size: 16}\n")
    run = tmp_path / "run"
    rc, text, err = _cli(capsys, "train", "--config", str(cfg), "--out", str(run))
    assert rc == 0, err
    assert (run / "best.pt").is_file() and "test set, best epoch 1" in text
    assert "input 16 x 16, decoded" in text  # the config's size, not "(default)"
    trained = json.loads((run / "result.json").read_text())
    rc, text, err = _cli(capsys, "eval", "--checkpoint", str(run / "best.pt"))
    assert rc == 0, err
    assert "bsam (epoch 1)" in text
    mae = float(text.split("| bsam (epoch 1) |")[1].split("|")[0])
    assert mae == pytest.approx(trained["test"]["all"]["mae"], rel=1e-3)
    rc, text, err = _cli(capsys, "analyze", "--checkpoint", str(run / "best.pt"), "--hessian",
                         "--iters", "2", "--probes", "1", "--samples", "8", "--regions", "all",
                         "--out", str(tmp_path / "an"))
    assert rc == 0, err
    report = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert "lambda_max" in json.dumps(report)
    # the paper's augmentation per batch on the training device (CUDA's default; forced here)
    rc, text, err = _cli(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "dev"),
                         "data.augment=device")
    assert rc == 0, err
    assert "augment: per batch on cpu (BatchAugment); 42 training pictures 18x18" in text


def test_the_cache_is_filled_once_and_follows_the_images(folder: Path) -> None:
    spec = {"name": "images", "path": str(folder), "target": "score"}
    first = load_data(spec)
    prefix = first.train.cache.prefix
    again = load_data(spec)
    assert again.train.cache.prefix == prefix and again.train.cache.num_filled == len(again.train)
    x0 = again.train.load_image(0)
    changed = folder.parent / again.train.paths[0]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(changed)  # the same name, new pixels
    fresh = load_data(spec)
    assert fresh.train.cache.prefix != prefix
    assert np.asarray(fresh.train.load_image(0)).max() == 0 != np.asarray(x0).max()


# ---------------------------------------------------------------------------- the pieces
def test_pictures_of_any_kind_become_rgb(folder: Path) -> None:
    data = build_splits(folder, "score", img_size=16, cache=False)
    gray = folder.parent / "pics" / "im002.png"
    tiff = folder.parent / "pics" / "im007.tif"
    assert Image.open(gray).mode == "L" and Image.open(tiff).mode.startswith("I;16")
    for p in (gray, tiff):
        rgb = np.asarray(read_rgb(p))
        assert rgb.shape == (16, 16, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    raw = np.asarray(Image.open(tiff), dtype=np.float64)
    assert np.abs(np.asarray(read_rgb(tiff))[..., 0] - raw / 257).max() <= 0.5
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.ndim == 0


def test_default_img_size_rule() -> None:
    assert default_img_size([(640, 480)] * 3) == 224
    assert default_img_size([(16, 16), (16, 20), (40, 12)]) == 16
    assert default_img_size([(4, 4)]) == 8
    assert default_img_size([]) == 224


def test_dir_split_is_seeded_and_in_the_fingerprint(folder: Path) -> None:
    a = load_data({"name": "images", "path": str(folder), "target": "score"})
    b = load_data({"name": "images", "path": str(folder), "target": "score"})
    c = load_data({"name": "images", "path": str(folder), "target": "score", "split_seed": 1})
    assert a.train.paths == b.train.paths and a.fingerprint == b.fingerprint
    assert a.train.paths != c.train.paths
    assert a.fingerprint["digest"] != c.fingerprint["digest"]
    counts = a.bins.counts  # the bins come from the training labels
    assert int(counts.sum()) == len(a.train)
    assert not a.target_scaler.is_identity  # targets are standardised for training
    assert a.train.cache is not None and a.train.cache.num_filled == len(a.train)  # decoded once


def test_a_split_column_is_used_as_it_is(tmp_path: Path) -> None:
    csv = make_folder(tmp_path / "d", n=20)
    frame = pd.read_csv(csv)
    frame["part"] = ["train"] * 12 + ["valid"] * 4 + ["test"] * 4
    frame.to_csv(csv, index=False)
    data = build_splits(csv, "score", split_col="part", cache=False)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 4, 4)
    assert data.test.paths == frame["file"].tolist()[16:]
    assert data.info["split"] == "column"


def test_path_column_found_or_named(tmp_path: Path) -> None:
    csv = make_folder(tmp_path / "d", n=20)
    frame = pd.read_csv(csv)
    frame["copy"] = frame["file"]
    frame.to_csv(csv, index=False)
    with pytest.raises(CSVFormatError, match=r"columns \['file', 'copy'\] all name image files"):
        build_splits(csv, "score", cache=False)
    named = build_splits(csv, "score", path_col="copy", bin_width=5.0, cache=False)
    assert named.info["path_col"] == "copy"
    frame.drop(columns=["file", "copy"]).to_csv(csv, index=False)
    with pytest.raises(CSVFormatError, match="no column names image files"):
        build_splits(csv, "score", cache=False)


# ---------------------------------------------------------------------------- errors
def test_missing_images_name_the_row_and_the_count(folder: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pics = folder.parent / "pics"
    (pics / "im005.jpg").unlink()
    (pics / "im009.jpg").unlink()
    with pytest.raises(MissingImagesError) as info:
        build_splits(folder, "score", cache=False)
    msg = str(info.value)
    assert "row 5 (line 7 of labels.csv)" in msg and str(pics / "im005.jpg") in msg
    assert "1 other image(s) are missing" in msg and "row 9" in msg
    rc, _, err = _cli(capsys, "bench", "--images", str(folder), "--target", "score")
    assert rc == 2 and err.count("\n") == 1 and "row 5" in err and "--root DIR" in err


def test_unreadable_images_name_the_row_and_the_count(folder: Path, tmp_path: Path) -> None:
    pics = folder.parent / "pics"
    (pics / "im004.png").write_bytes(b"not a picture at all")
    (pics / "im013.jpg").write_bytes(b"\xff\xd8\xff garbage")
    for processes in (1, 2):  # decoded in this process, or in workers: the same message
        with pytest.raises(UnreadableImagesError) as info:
            build_splits(folder, "score", processes=processes, cache=tmp_path / f"c{processes}")
        msg = str(info.value)
        assert "row 4 (line 6 of labels.csv) cannot be read" in msg
        assert str(pics / "im004.png") in msg and "1 other image(s) failed too (rows 13)" in msg
    # the workers filled the cache of every good picture (shared memory maps)
    data = build_splits(folder, "score", processes=2, cache=tmp_path / "c3", verify="exists")
    with pytest.raises(UnreadableImagesError):
        build_splits(folder, "score", processes=2, cache=tmp_path / "c3")
    good = [i for i, p in enumerate(data.train.paths) if p not in ("pics/im004.png",
                                                                   "pics/im013.jpg")]
    assert sorted(set(range(len(data.train))) - set(data.train.cache.missing().tolist())) == good


@pytest.mark.parametrize("bad", ["nan", "inf", "strings", "far"])
def test_bad_targets_get_the_csv_messages(tmp_path: Path, bad: str) -> None:
    csv = make_folder(tmp_path / "d", n=12)
    frame = pd.read_csv(csv)
    frame["score"] = frame["score"].astype(object)
    frame.loc[3, "score"] = {"nan": np.nan, "inf": np.inf, "strings": "high", "far": 1e12}[bad]
    frame.to_csv(csv, index=False)
    with pytest.raises(ValueError) as as_table:
        load_table(csv, "score", features=["subject"])
    with pytest.raises(ValueError) as as_images:
        build_splits(csv, "score", cache=False)
    assert str(as_images.value) == str(as_table.value)
    assert "target column 'score'" in str(as_images.value)


def test_too_few_images_for_a_dir_split(tmp_path: Path) -> None:
    csv = make_folder(tmp_path / "d", n=5)
    with pytest.raises(ValueError, match=r"too few images for a DIR split: 5 images in \d+ bins "
                                         r"of width [\d.]+, the largest holding 1; .* at least 3"):
        build_splits(csv, "score", cache=False)
    csv = make_folder(tmp_path / "e", n=20)  # 59 bins of 0.5: a wider width would do
    with pytest.raises(ValueError, match=r"20 images in 59 bins of width 0.5, the largest "
                                         r"holding 2; .* wider bins \(bin_width=[\d.]+\)") as e:
        build_splits(csv, "score", cache=False)
    wider = float(str(e.value).split("bin_width=")[1].split(")")[0])
    assert len(build_splits(csv, "score", bin_width=wider, cache=False).val) > 0


# ---------------------------------------------------------------------------- pretrained
def _weights_file(path: Path) -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    return state


@pytest.mark.e2e
def test_fine_tune_from_a_local_weights_file(folder: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    state = _weights_file(tmp_path / "r18.pth")
    spec = {"data": {"name": "images", "path": str(folder), "target": "score", "img_size": 16},
            "model": {"pretrained": str(tmp_path / "r18.pth")}, "train": {"epochs": 1}}
    exp = build_experiment(spec)  # model.pretrained in a config
    body = exp.model.state_dict()
    loaded = [k for k in state if not k.startswith("fc.")]  # the head is new
    assert len(loaded) > 100 and all(torch.equal(state[k], body["backbone." + k])
                                     for k in loaded)
    assert exp.cfg.lr == FINETUNE_TRAIN["lr"] and exp.cfg.epochs == 1
    scratch = build_experiment({**spec, "model": None})
    assert scratch.cfg.lr == SCRATCH_TRAIN["lr"]
    conv = "backbone.conv1.weight"
    assert not torch.equal(scratch.model.state_dict()[conv], state["conv1.weight"])
    # bsam bench --pretrained PATH: the recipe's fine-tuning values and the weights file
    data = load_data({**spec["data"], "pretrained": str(tmp_path / "r18.pth")})
    assert train_config(data).lr == FINETUNE_TRAIN["lr"]
    assert torch.equal(data.make_model().state_dict()[conv], state["conv1.weight"])
    rc, text, err = _cli(capsys, "bench", "--images", str(folder), "--target", "score",
                         "--methods", "sqinv", "--seeds", "1", "--epochs", "1", "--img-size",
                         "16", "--jobs", "1", "--no-plots", "--out", str(tmp_path / "b"),
                         "--pretrained", str(tmp_path / "r18.pth"))
    assert rc == 0, err
    assert f"lr {FINETUNE_TRAIN['lr']}" in text
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert "pretrained=" + str(tmp_path / "r18.pth") in results["config"]["model"]


def test_pretrained_errors(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pth"
    torch.save([1, 2, 3], bad)
    base = ["bench", "--images", str(folder), "--target", "score", "--out", str(tmp_path / "o")]
    rc, _, err = _cli(capsys, *base, "--pretrained", str(tmp_path / "nope.pth"))
    assert rc == 2 and "pretrained weights file not found" in err and "--pretrained PATH" in err
    rc, _, err = _cli(capsys, *base, "--pretrained", str(bad))
    assert rc == 2 and f"pretrained weights file {bad} is not a state dict of tensors" in err
    assert not (tmp_path / "o").exists()  # refused before anything is written
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "no-hub"))
    rc, _, err = _cli(capsys, *base, "--pretrained", "imagenet")
    assert rc == 2 and "not in torchvision's cache" in err and "--allow-download" in err
    with pytest.raises(FileNotFoundError):
        folder_recipe.resolve_pretrained("imagenet")


def test_root_cache_and_flag_checks(folder: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "tables" / "mine.csv"  # the CSV away from the pictures
    elsewhere.parent.mkdir()
    elsewhere.write_text(folder.read_text())
    with pytest.raises(CSVFormatError, match="no column names image files under"):
        load_data({"name": "images", "path": str(elsewhere), "target": "score"})
    data = load_data({"name": "images", "path": str(elsewhere), "target": "score",
                      "root": str(folder.parent), "cache": str(tmp_path / "cache")})
    assert data.train.root == folder.parent and data.info["root"] == str(folder.parent)
    assert data.train.cache.prefix.parent == tmp_path / "cache"
    assert not (folder.parent / ".bsam_cache").exists()  # nothing written beside the pictures
    for argv, want in ((["--images", str(folder), "--csv", str(folder)], "--images replaces"),
                       (["--dataset", "diamonds", "--path-col", "file"],
                        "--path-col is an option of --images"),
                       (["--images", str(folder)], "--images needs the target column"),
                       (["--images", str(folder), "--target", "score", "--features", "a"],
                        "--features is not an option of --images")):
        rc, _, err = _cli(capsys, "bench", *argv)
        assert rc == 2 and want in err, err
