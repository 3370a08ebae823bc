"""Rotated (Fashion-)MNIST: IDX reading, rotation, long-tailed / balanced angles, the loader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from _vision_fixtures import make_mnist_folder

from balanced_sam import LabelBins
from balanced_sam.data import build_model, get_entry, rotated_mnist
from balanced_sam.data.idx import find_idx_file, read_idx, write_idx

SMALL = {"n_train": 150, "val_per_bin": 2, "test_per_bin": 3, "bin_width": 10.0}


@pytest.fixture
def mini(tmp_path: Path) -> Path:
    return make_mnist_folder(tmp_path / "idx", n_train=200, n_test=80)


def test_idx_round_trip_and_errors(tmp_path: Path) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        write_idx(tmp_path / name, a)
        b = read_idx(tmp_path / name)
        assert b.dtype == np.uint8 and np.array_equal(a, b)
    f = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    write_idx(tmp_path / "f", f)
    assert np.array_equal(read_idx(tmp_path / "f"), f)
    raw = (tmp_path / "x-idx3-ubyte").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + raw[4:])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "g.gz", "wb") as fh:
        fh.write(raw[:3])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "g.gz")
    # torchvision's layout (raw/) and the dotted names of some mirrors are found too
    (tmp_path / "tv" / "raw").mkdir(parents=True)
    write_idx(tmp_path / "tv" / "raw" / "train-images.idx3-ubyte", a)
    assert find_idx_file(tmp_path / "tv", "train-images-idx3-ubyte").name == \
        "train-images.idx3-ubyte"
    assert find_idx_file(tmp_path / "tv", "t10k-images-idx3-ubyte") is None


def test_rotation_matches_quarter_turns() -> None:
    x = torch.rand(3, 1, 28, 28)
    r = rotated_mnist.rotate_images(x, torch.tensor([90.0, 180.0, 0.0]))
    assert torch.allclose(r[0], torch.rot90(x[0], 1, dims=(-2, -1)), atol=1e-5)  # CCW
    assert torch.allclose(r[1], torch.rot90(x[1], 2, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(r[2], x[2], atol=1e-5)
    # chunking does not change the result
    y = rotated_mnist.rotate_images(x, torch.tensor([33.0, 91.0, 170.0]), chunk=2)
    z = rotated_mnist.rotate_images(x, torch.tensor([33.0, 91.0, 170.0]))
    assert torch.equal(y, z)


def test_angle_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    a = rotated_mnist.long_tailed_angles(20000, 30.0, g)
    assert a.dtype == torch.float32 and float(a.min()) >= 0 and float(a.max()) < 180
    counts = LabelBins.from_labels(a, bin_width=5.0, lower=0.0, upper=180.0).counts
    # truncated exponential: bin k holds ~ n (1 - e^{-1/6}) e^{-k/6} / (1 - e^{-6})
    expect = 20000 * (1 - np.exp(-5 / 30)) * np.exp(-5 * np.arange(36) / 30) / (1 - np.exp(-6))
    assert np.allclose(counts[:6].numpy(), expect[:6], rtol=0.1)
    assert counts[0] > 10 * counts[18] > 0
    b = rotated_mnist.balanced_angles(4, 5.0, g)
    bc = LabelBins.from_labels(b, bin_width=5.0, lower=0.0, upper=180.0).counts
    assert bc.tolist() == [4] * 36
    with pytest.raises(ValueError, match="tau"):
        rotated_mnist.long_tailed_angles(3, 0.0, g)


def test_loader_on_a_local_idx_folder(mini: Path) -> None:
    d = rotated_mnist.load(seed=0, data_root=mini, **SMALL, train_fraction=0.5)  # extra ignored
    assert d.name == "rotated-mnist" and d.target_unit == "deg"
    assert d.x_train.shape == (150, 1, 28, 28) and d.y_train.shape == (150,)
    assert d.x_val.shape == (36, 1, 28, 28) and d.x_test.shape == (54, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_test.dtype == torch.float32
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-3
    for y in (d.y_train, d.y_val, d.y_test):
        assert float(y.min()) >= 0.0 and float(y.max()) < 180.0
    bins = LabelBins.from_labels(d.y_train, **d.bins)
    assert bins.num_bins == 18
    assert bins.counts.sum() == 150 and bins.counts[0] > bins.counts[-1]
    # validation and test are balanced over the angle bins
    assert torch.bincount(bins.bin_index(d.y_test), minlength=18).tolist() == [3] * 18
    assert torch.bincount(bins.bin_index(d.y_val), minlength=18).tolist() == [2] * 18
    assert d.info["sizes"] == {"train": 150, "val": 36, "test": 54}
    assert d.info["source"] == str(mini)
    assert "timing_note" not in d.info  # results hold no timing of one machine
    # recipe and model come from the registry; the data module names neither
    entry = get_entry("rotated-mnist")
    assert {"epochs", "lr", "batch_size", "optimizer", "rho"} <= set(entry.recipe.train)
    model = build_model(d, entry.recipe.model)
    assert model(d.x_test[:4]).shape == (4,)
    again = rotated_mnist.load(seed=0, data_root=mini, **SMALL)
    other = rotated_mnist.load(seed=1, data_root=mini, **SMALL)
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)
    assert not torch.equal(other.y_train, d.y_train)


def test_registered_and_class_filter(mini: Path) -> None:
    d = rotated_mnist.load_fashion(seed=2, data_root=mini, classes=[1, 2, 3], n_train=40,
                                   val_per_bin=1, test_per_bin=1, bin_width=20.0)
    assert d.name == "rotated-fashion-mnist" and d.info["classes"] == [1, 2, 3]
    assert d.x_test.shape[0] == 9
    # what `bsam bench` passes: split_seed fixes the data, cap sets the per-bin val/test counts
    a = get_entry("rotated-mnist").load({"seed": 5, "split_seed": 1, "cap": 2,
                                         "data_root": mini, "n_train": 40, "bin_width": 20.0},
                                        None, None).tables
    b = rotated_mnist.load(seed=1, data_root=mini, n_train=40, bin_width=20.0, val_per_bin=2,
                           test_per_bin=2)
    assert torch.equal(a.y_train, b.y_train) and a.x_test.shape[0] == 18
    with pytest.raises(ValueError, match="usable training images"):
        rotated_mnist.load(data_root=mini, n_train=195)
    with pytest.raises(ValueError, match="divide 180"):
        rotated_mnist.load(data_root=mini, bin_width=7.0)


def test_clear_error_without_images(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(rotated_mnist, "_torchvision_download", offline)
    monkeypatch.setenv("BSAM_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(rotated_mnist, "DEBIAN_FASHION", tmp_path / "no-debian")
    with pytest.raises(rotated_mnist.ImagesNotFoundError) as err:
        rotated_mnist.load()
    msg = str(err.value)
    assert "--data-root" in msg and "network is unreachable" in msg
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "cache" / "MNIST") in msg
    assert "dataset-fashion-mnist" in msg
    with pytest.raises(rotated_mnist.ImagesNotFoundError, match="apt-get install"):
        rotated_mnist.load_fashion()
    with pytest.raises(rotated_mnist.ImagesNotFoundError, match="not a directory"):
        rotated_mnist.load(data_root=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        rotated_mnist.load(data_root=empty)


def test_real_fashion_mnist_default_split() -> None:
    folder = rotated_mnist.DEBIAN_FASHION
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST IDX files not installed at {folder} "
                    "(apt-get install dataset-fashion-mnist)")
    d = rotated_mnist.load_fashion(seed=0)
    assert d.info["source"] == str(folder)
    assert d.info["sizes"] == {"train": 6000, "val": 900, "test": 1800}
    bins = LabelBins.from_labels(d.y_train, **d.bins)
    regions = bins.region_counts(nonempty=False)
    assert sum(regions.values()) == 36
    assert regions["many"] >= 10 and regions["medium"] >= 8 and regions["few"] >= 8
    assert d.info["regions"] == bins.region_counts()
    assert torch.bincount(bins.bin_index(d.y_test), minlength=36).tolist() == [50] * 36
