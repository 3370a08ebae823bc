"""NYUD2-DIR: depth decoding, the DIR pipeline's shapes, the balanced mask, bins, errors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _vision_fixtures import make_nyud2_root
from PIL import Image

from balanced_sam.data import nyud2, prepare
from balanced_sam.data.images import (
    CorruptImageError,
    CSVFormatError,
    DatasetNotFoundError,
    MissingImagesError,
    open_depth_png,
)

S = 24  # img_size of the miniature: 32 x 24 images, crops of 22 x 30, train depth 11 x 15


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("nyud2")
    make_nyud2_root(r)
    report = prepare.prepare_dataset("nyud2", r, download=False, echo=lambda s: None,
                                     img_size=S)
    assert report["ok"]
    return r


def test_geometry_is_the_papers_at_240() -> None:
    assert nyud2.geometry(240) == (240, 228, 304)
    assert nyud2.geometry(S) == (24, 22, 30)


def test_depth_png_conventions(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 51, 255]], dtype=np.uint8), mode="L").save(tmp_path / "t.png")
    Image.fromarray(np.array([[700, 2500, 10000]], dtype=np.uint16)).save(tmp_path / "s.png")
    code, scale = open_depth_png(tmp_path / "t.png")
    assert np.allclose(code * scale, [[0.0, 2.0, 10.0]])  # 8-bit train: code / 255 * 10 m
    code, scale = open_depth_png(tmp_path / "s.png")
    assert np.allclose(code * scale, [[0.7, 2.5, 10.0]])  # 16-bit test: millimetres
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(CorruptImageError, match="8-bit or 16-bit"):
        open_depth_png(tmp_path / "rgb.png")


def test_balanced_mask_built_by_prepare(root: Path) -> None:
    mask = np.load(root / nyud2.MASK_FILE)
    assert mask.shape == (4, 22, 30) and mask.dtype == np.uint8
    depth = nyud2.load_test_depths(root, S)
    bins = torch.clamp((depth * 10).long(), max=99)
    picked = bins[torch.from_numpy(mask.astype(bool))]
    counts = torch.bincount(picked, minlength=100)
    assert counts[:7].sum() == 0
    per_bin = counts[7:]
    assert bool((per_bin == per_bin[0]).all()) and int(per_bin[0]) > 0
    # the count is the smallest over bins 7..99 of all test pixels
    assert int(per_bin[0]) == int(torch.bincount(bins.reshape(-1), minlength=100)[7:].min())


def test_make_balanced_mask_is_seeded_and_checks_empty_bins() -> None:
    depth = torch.linspace(0.0, 10.2, 2000).reshape(2, 40, 25)
    a, b = nyud2.make_balanced_mask(depth, seed=3), nyud2.make_balanced_mask(depth, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, nyud2.make_balanced_mask(depth, seed=4))
    assert a.sum() == 93 * 19  # 2000 values over 102 bins of width 0.1: 19 or 20 per bin
    with pytest.raises(ValueError, match=r"bin\(s\) \[50"):
        nyud2.make_balanced_mask(torch.where((depth >= 5) & (depth < 5.1), 4.0, depth))


def test_train_and_test_samples(root: Path) -> None:
    splits = nyud2.build_splits(root, img_size=S)
    assert splits["val"] is None and len(splits["train"]) == 6 and len(splits["test"]) == 4
    torch.manual_seed(0)
    img, depth, mask = splits["train"][0]
    assert img.shape == (3, 22, 30) and img.dtype == torch.float32
    assert depth.shape == (1, 11, 15) and depth.dtype == torch.float32
    assert mask.shape == (1, 11, 15) and mask.dtype == torch.bool
    assert bool(torch.equal(mask, depth > 0))
    assert float(depth[mask].min()) >= 0.7 - 1e-5 and float(depth.max()) <= 10.0 + 1e-5
    img, depth, mask = splits["test"][1]
    assert img.shape == (3, 22, 30) and depth.shape == (1, 22, 30) and mask.shape == (1, 22, 30)
    assert torch.equal(mask[0], torch.from_numpy(np.load(root / nyud2.MASK_FILE)[1] > 0))
    raw = np.asarray(Image.open(root / "data/nyu2_test/00001_depth.png")).astype(np.float32)
    assert np.allclose(depth[0].numpy(), raw[1:23, 1:31] / 1000.0)  # 24x32 centre crop 22x30
    # normalised with ImageNet statistics
    rgb = np.asarray(Image.open(root / "data/nyu2_test/00001_colors.png")).astype(np.float32)
    want = (rgb[1:23, 1:31, 0] / 255.0 - 0.485) / 0.229
    assert np.allclose(img[0].numpy(), want, atol=1e-5)


def test_training_depth_geometry_without_augmentation(root: Path) -> None:
    ds = nyud2.build_splits(root, img_size=S, augment=False)["train"]
    _, depth, mask = ds[2]
    rel = ds.pairs[2][1]
    full = np.asarray(Image.open(root / rel)).astype(np.float32) / 255.0 * 10.0
    crop = full[1:23, 1:31]
    want = crop.reshape(11, 2, 15, 2).mean(axis=(1, 3))  # 2 x 2 average to half resolution
    assert np.allclose(depth[0].numpy(), want, atol=1e-5) and bool(mask.all())


def test_loader_batches_and_model_output_match(root: Path) -> None:
    from balanced_sam.models import DepthResNet

    splits = nyud2.build_splits(root, img_size=S)
    x, d, m = next(iter(torch.utils.data.DataLoader(splits["train"], batch_size=3)))
    assert x.shape == (3, 3, 22, 30) and d.shape == (3, 1, 11, 15) and m.dtype == torch.bool
    model = DepthResNet(encoder="resnet18").eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == d.shape
    xt, dt, mt = next(iter(torch.utils.data.DataLoader(splits["test"], batch_size=4)))
    with torch.no_grad():
        pred = nyud2.match_depth_size(model(xt), dt)
    assert pred.shape == dt.shape and torch.isfinite(pred[mt]).all()
    assert int(mt.sum()) == int(np.load(root / nyud2.MASK_FILE).sum())


def test_dir_bins_counts_and_cache(root: Path) -> None:
    bins = nyud2.dir_bins(root, img_size=S)
    assert bins.num_bins == 100 and bins.share_weight_below == 7 and bins.clamp
    assert bins.edges[0] == 0.0 and abs(float(bins.edges[-1]) - 10.0) < 1e-12
    assert bins.num_samples == 6 * 22 * 30  # every training pixel is valid (>= 0.7 m)
    assert int(bins.counts[:7].sum()) == 0
    cache = root / "data" / "bsam_train_depth_counts_22x30.npz"
    assert cache.is_file()
    w = bins.weights("sqrt_inv", normalize="none")
    assert torch.allclose(w[:7], w[7].expand(7))
    # the cached counts are reused (tampering with them shows) unless the CSV changes
    with np.load(cache) as z:
        digest = str(z["csv_sha256"])
    np.savez(cache, counts=np.arange(100), csv_sha256=np.array(digest))
    assert nyud2.dir_bins(root, img_size=S).counts.tolist() == list(range(100))
    np.savez(cache, counts=np.arange(100), csv_sha256=np.array("other"))
    assert nyud2.dir_bins(root, img_size=S) == bins


def test_cache_gives_identical_test_samples(root: Path, tmp_path: Path) -> None:
    plain = nyud2.build_splits(root, img_size=S)["test"]
    cached = nyud2.build_splits(root, img_size=S, cache=tmp_path)["test"]
    for i in range(len(plain)):
        for a, b in zip(plain[i], cached[i]):
            assert torch.equal(a, b)
    assert cached.cache.num_filled == len(cached)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        nyud2.build_splits(tmp_path / "absent")
    make_nyud2_root(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="test_balanced_mask.npy") as err:
        nyud2.build_splits(tmp_path, img_size=S)
    assert "bsam data prepare nyud2" in str(err.value)
    np.save(tmp_path / nyud2.MASK_FILE, np.zeros((4, 10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(4, 10, 10\), expected \(4, 22, 30\)"):
        nyud2.build_splits(tmp_path, img_size=S)
    np.save(tmp_path / nyud2.MASK_FILE, np.ones((4, 22, 30), np.uint8))
    (tmp_path / "data/nyu2_train/room_0000_out/2.jpg").unlink()
    with pytest.raises(MissingImagesError, match="2.jpg"):
        nyud2.build_splits(tmp_path, img_size=S)
    (tmp_path / "data/nyu2_train/room_0000_out/2.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(CorruptImageError, match="room_0000_out/2.jpg"):
        nyud2.build_splits(tmp_path, img_size=S, verify="decode")
    ds = nyud2.build_splits(tmp_path, img_size=S)["train"]
    with pytest.raises(CorruptImageError, match="2.jpg"):
        ds[2]
    (tmp_path / nyud2.TEST_CSV).write_text("a.png,b.png,c.png\n")
    with pytest.raises(CSVFormatError, match="must have 2 columns"):
        nyud2.build_splits(tmp_path, img_size=S)
    with pytest.raises(NotImplementedError, match="dir_bins"):
        nyud2.train_labels(tmp_path)


def test_prepare_offline_and_from_a_user_zip(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(prepare.URLS, "nyud2_data.zip", "http://127.0.0.1:9/data.zip")
    lines: list[str] = []
    with pytest.raises(prepare.DatasetNotReadyError) as err:
        prepare.prepare_dataset("nyud2", tmp_path / "empty", echo=lines.append)
    assert "nyu2_train.csv" in str(err.value) and "http://127.0.0.1:9/data.zip" in str(err.value)
    assert any("could not download" in line for line in lines)
    # the user's data.zip is unpacked and kept; the mask is built
    src = tmp_path / "src"
    make_nyud2_root(src, n_train=2, n_test=3)
    root = tmp_path / "root"
    root.mkdir()
    with zipfile.ZipFile(root / "data.zip", "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    report = prepare.prepare_dataset("nyud2", root, echo=lambda s: None)
    assert report["ok"] and (root / "data.zip").is_file()
    # 32 x 24 images at the default img_size=240 are upscaled to 320 x 240: mask at 228 x 304
    assert np.load(root / nyud2.MASK_FILE).shape == (3, 228, 304)
