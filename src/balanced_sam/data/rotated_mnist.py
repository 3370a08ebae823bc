"""Rotated MNIST / Fashion-MNIST: a CPU-scale imbalanced *vision* regression benchmark.

Each 28 x 28 image is rotated by an angle in ``[0, 180)`` degrees; the target is the angle.
Training angles follow a truncated exponential density ``p(a) ~ exp(-a / tau)`` (``tau`` = 30
degrees by default), so small angles are common and large ones rare; validation and test angles
are *balanced*: every angle bin gets the same number of images, with angles uniform inside the
bin. Bins are 5 degrees wide (36 bins): wide enough that the default training set fills every bin
and the few-shot bins still hold some images (the tail bin expects ~3), narrow enough that the
distribution spans the three DIR regions (Fashion-MNIST with the defaults, split seed 0: 14
many / 10 medium / 12 few bins, as ``bsam bench`` prints).

Images come from standard IDX files (``train-images-idx3-ubyte[.gz]`` etc.): a folder given as
``data_root``; for Fashion-MNIST the folder Debian's ``dataset-fashion-mnist`` package installs
(``/usr/share/datasets/fashion-mnist``) is used when present; otherwise torchvision's downloader
fetches them into ``~/.cache/balanced_sam`` (``$BSAM_DATA`` overrides it) when online. Training
and validation images are disjoint draws from the IDX *train* split, test images from the *test*
split. The rotation is done once at load time (bilinear, zero padding, about the image centre,
counter-clockwise for positive angles), vectorised over the whole set; nothing is written to disk.

Which images and angles are drawn depends on ``seed``. Digits are used whole by default; note that
for glyphs that are (nearly) symmetric under a half turn (0, 1, 8; bags in Fashion-MNIST) an angle
near 180 looks like one near 0, which the metrics of the last bins will show.

The recipe and the model (a small CNN) are the entries ``rotated-mnist`` and
``rotated-fashion-mnist`` of :mod:`balanced_sam.data.registry`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from balanced_sam.data.base import BenchData, file_digest
from balanced_sam.data.idx import IDX_SPLITS, find_idx_file, read_idx

__all__ = ["load", "load_fashion", "load_rotated", "rotate_images", "long_tailed_angles",
           "balanced_angles", "read_mnist_folder", "find_images", "DEBIAN_FASHION",
           "ImagesNotFoundError"]

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
ANGLE_RANGE = 180.0

class ImagesNotFoundError(FileNotFoundError):
    """Neither a local IDX folder nor torchvision's downloader gave the images."""


def _cache_root() -> Path:
    return Path(os.environ.get("BSAM_DATA", Path.home() / ".cache" / "balanced_sam"))


def read_mnist_folder(folder: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images uint8 (n, 28, 28), labels uint8 (n,)), "test": ...}`` from a folder
    of IDX files (raw or ``.gz``, also in a ``raw/`` sub-folder). Raises ``FileNotFoundError``
    naming the files it looked for, ``ValueError`` for inconsistent files."""
    found = {stem: find_idx_file(folder, stem) for pair in IDX_SPLITS.values() for stem in pair}
    lacking = [stem for stem, p in found.items() if p is None]
    if lacking:
        raise FileNotFoundError(f"{folder} lacks the IDX file(s) {lacking} (raw or .gz)")
    out = {}
    for split, (img_stem, lab_stem) in IDX_SPLITS.items():
        img_p, lab_p = found[img_stem], found[lab_stem]
        assert img_p is not None and lab_p is not None
        images, labels = read_idx(img_p), read_idx(lab_p)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{img_p} {images.shape} and {lab_p} {labels.shape} are not an "
                             "(n, H, W) image file and its (n,) label file")
        out[split] = (images, labels)
    return out


def find_images(kind: str, data_root: str | os.PathLike[str] | None = None,
                download: bool = True) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """The images and where they came from: ``data_root`` if given; else (Fashion-MNIST) the
    Debian folder when present; else torchvision's ``MNIST`` / ``FashionMNIST`` files, fetched
    when absent and ``download``. Raises :class:`ImagesNotFoundError` naming every option."""
    if kind not in ("mnist", "fashion-mnist"):
        raise ValueError(f"kind must be 'mnist' or 'fashion-mnist', got {kind!r}")
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise ImagesNotFoundError(f"data_root {str(root)!r} is not a directory of IDX files")
        return read_mnist_folder(root), str(root)
    if kind == "fashion-mnist" and DEBIAN_FASHION.is_dir():
        try:
            return read_mnist_folder(DEBIAN_FASHION), str(DEBIAN_FASHION)
        except FileNotFoundError:
            pass
    tv_name = "MNIST" if kind == "mnist" else "FashionMNIST"
    folder = _cache_root() / tv_name
    try:
        return read_mnist_folder(folder), str(folder)
    except FileNotFoundError:
        pass
    why = "download=False"
    if download:
        try:
            _torchvision_download(tv_name, _cache_root())
            return read_mnist_folder(folder), str(folder)
        except Exception as exc:  # offline, refused, checksum, ...
            why = f"torchvision could not download it ({type(exc).__name__}: {exc})"
    debian = (f"; or install Debian's dataset-fashion-mnist package (files in {DEBIAN_FASHION}) "
              "and use the rotated-fashion-mnist dataset" if kind == "mnist" else
              f"; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in "
              f"{DEBIAN_FASHION}")
    raise ImagesNotFoundError(
        f"{tv_name} images not found: {why}. Either pass --data-root DIR (data_root=) with the "
        "standard IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, raw or .gz), or go online so that "
        f"torchvision's downloader can fetch them into {folder}" + debian)


def _torchvision_download(tv_name: str, root: Path) -> None:
    import torchvision

    getattr(torchvision.datasets, tv_name)(str(root), train=True, download=True)
    getattr(torchvision.datasets, tv_name)(str(root), train=False, download=True)


def long_tailed_angles(n: int, tau: float, gen: torch.Generator,
                       high: float = ANGLE_RANGE) -> torch.Tensor:
    """``n`` angles in ``[0, high)`` from the density ``exp(-a / tau)`` truncated to the range
    (inverse-CDF sampling), float32."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    a = -tau * torch.log1p(-u * (1.0 - math.exp(-high / tau)))
    return a.clamp_(0.0, math.nextafter(high, 0.0)).float()


def balanced_angles(per_bin: int, bin_width: float, gen: torch.Generator,
                    high: float = ANGLE_RANGE) -> torch.Tensor:
    """``per_bin`` angles uniform inside every bin of ``[0, high)`` (so every bin has exactly
    ``per_bin``), float32, bin-major order."""
    k = int(round(high / bin_width))
    lo = torch.arange(k, dtype=torch.float64).repeat_interleave(per_bin) * bin_width
    a = lo + torch.rand(k * per_bin, generator=gen, dtype=torch.float64) * bin_width
    return a.clamp_(0.0, math.nextafter(high, 0.0)).float()


def rotate_images(images: torch.Tensor, angles_deg: torch.Tensor,
                  chunk: int = 8192) -> torch.Tensor:
    """Rotate ``(n, C, H, W)`` float images by per-image angles (degrees, counter-clockwise as
    displayed, about the centre; bilinear, zeros outside), in chunks of ``chunk`` images."""
    if images.ndim != 4 or angles_deg.shape != (images.shape[0],):
        raise ValueError("images must be (n, C, H, W) and angles_deg (n,)")
    out = torch.empty_like(images)
    for s in range(0, images.shape[0], chunk):
        x, a = images[s:s + chunk], torch.deg2rad(angles_deg[s:s + chunk].double())
        c, si = torch.cos(a), torch.sin(a)
        zero = torch.zeros_like(c)
        # output pixel (x, y) (normalised, y down) samples the input at R(-angle) (x, y)
        theta = torch.stack([torch.stack([c, -si, zero], 1), torch.stack([si, c, zero], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        out[s:s + chunk] = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                         align_corners=False)
    return out


def load_rotated(
    kind: str = "mnist",
    seed: int = 0,
    data_root: str | os.PathLike[str] | None = None,
    *,
    n_train: int = 6000,
    val_per_bin: int = 25,
    test_per_bin: int = 50,
    bin_width: float = 5.0,
    tau: float = 30.0,
    classes: list[int] | tuple[int, ...] | None = None,
    download: bool = True,
    image_size: int = 28,
) -> BenchData:
    """Build the rotated benchmark (see the module docstring).

    Args:
        kind: ``"mnist"`` (digits) or ``"fashion-mnist"`` (clothes).
        seed: draws the images and the angles.
        data_root: a folder with the IDX files (``--data-root``).
        n_train: training images (long-tailed angles).
        val_per_bin / test_per_bin: images per angle bin in validation / test.
        bin_width: angle bin width in degrees (must divide 180).
        tau: decay of the training angle density, degrees.
        classes: keep only these class labels (default: all).
        download: allow torchvision's downloader.
        image_size: side of the images the network sees: each image is rotated at full
            resolution, then area-averaged down to ``image_size`` x ``image_size`` (a cheaper
            variant of the benchmark; the default 28 keeps the originals). The model's input
            size follows the data (:func:`balanced_sam.data.registry.build_model`).
    """
    from balanced_sam.bins import LabelBins

    k = 180.0 / bin_width
    if not bin_width > 0 or abs(k - round(k)) > 1e-9:
        raise ValueError(f"bin_width must divide 180, got {bin_width}")
    for name, v in (("n_train", n_train), ("val_per_bin", val_per_bin),
                    ("test_per_bin", test_per_bin)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    data, source = find_images(kind, data_root, download)
    side = _checked_size(image_size, int(data["train"][0].shape[-1]))
    gen = torch.Generator().manual_seed(int(seed))
    nbins = int(round(k))
    sizes = {"train": n_train, "val": val_per_bin * nbins, "test": test_per_bin * nbins}
    picks = _pick_images(data, classes, sizes, gen, source)
    angles = (long_tailed_angles(n_train, tau, gen), balanced_angles(val_per_bin, bin_width, gen),
              balanced_angles(test_per_bin, bin_width, gen))

    xs = [_rotated(imgs, a, image_size) for imgs, a in zip(picks, angles)]
    mean, std = float(xs[0].mean()), float(xs[0].std())
    x_tr, x_va, x_te = ((x - mean) / std for x in xs)
    bins = {"bin_width": float(bin_width), "lower": 0.0, "upper": ANGLE_RANGE}
    lb = LabelBins.from_labels(angles[0], **bins)
    kept = None if classes is None else sorted(set(int(c) for c in classes))
    params = {"kind": kind, "seed": int(seed), "n_train": n_train, "val_per_bin": val_per_bin,
              "test_per_bin": test_per_bin, "bin_width": float(bin_width), "tau": float(tau),
              "classes": kept, **({"image_size": image_size} if image_size != side else {})}
    info = {
        "source": source, "kind": kind, "target": "rotation angle (degrees, counter-clockwise)",
        "split": "train: truncated exponential angles; val/test: balanced, uniform in each bin",
        "tau": float(tau), "bin_width": float(bin_width), "num_bins": nbins, "classes": kept,
        "sizes": sizes, "val_per_bin": val_per_bin, "test_per_bin": test_per_bin,
        "regions": lb.region_counts(), "empty_train_bins": int((lb.counts == 0).sum()),
        "pixel_mean": mean, "pixel_std": std, "seed": int(seed), "image_size": image_size,
        "files": {stem: file_digest(find_idx_file(source, stem))  # type: ignore[arg-type]
                  for pair in IDX_SPLITS.values() for stem in pair},
        "split_params": params,
    }
    return BenchData(name="rotated-mnist" if kind == "mnist" else "rotated-fashion-mnist",
                     x_train=x_tr.contiguous(), y_train=angles[0], x_val=x_va.contiguous(),
                     y_val=angles[1], x_test=x_te.contiguous(), y_test=angles[2], bins=bins,
                     info=info, standardize_target=True, target_unit="deg")


def _checked_size(image_size: Any, side: int) -> int:
    """``side`` (of the stored images) after checking that ``image_size`` fits in it."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
            or not 1 <= image_size <= side:
        raise ValueError(f"image_size must be an integer in [1, {side}] (the images are "
                         f"{side} x {side}), got {image_size!r}")
    return side


def _rotated(images: np.ndarray, angles: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images rotated at full resolution, then area-averaged to ``size`` x ``size``."""
    x = rotate_images(torch.from_numpy(images.astype(np.float32) / 255.0)[:, None], angles)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def _pick_images(data: dict[str, tuple[np.ndarray, np.ndarray]],
                 classes: Sequence[int] | None, sizes: dict[str, int], gen: torch.Generator,
                 source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train / validation images from the IDX train split, test images from the test
    split, of the kept classes, drawn with ``gen``."""
    (tr_img, tr_lab), (te_img, te_lab) = data["train"], data["test"]
    tr_idx, te_idx = np.arange(len(tr_img)), np.arange(len(te_img))
    if classes is not None:
        keep = np.asarray(sorted(set(int(c) for c in classes)))
        tr_idx, te_idx = tr_idx[np.isin(tr_lab, keep)], te_idx[np.isin(te_lab, keep)]
    n_train, n_val, n_test = sizes["train"], sizes["val"], sizes["test"]
    if len(tr_idx) < n_train + n_val:
        raise ValueError(f"{source} holds {len(tr_idx)} usable training images; n_train + "
                         f"validation need {n_train} + {n_val}")
    if len(te_idx) < n_test:
        raise ValueError(f"{source} holds {len(te_idx)} usable test images; the test set needs "
                         f"{n_test}")
    perm = torch.randperm(len(tr_idx), generator=gen).numpy()
    pick_tr, pick_va = tr_idx[perm[:n_train]], tr_idx[perm[n_train:n_train + n_val]]
    pick_te = te_idx[torch.randperm(len(te_idx), generator=gen).numpy()[:n_test]]
    return tr_img[pick_tr], tr_img[pick_va], te_img[pick_te]


def load(seed: int = 0, data_root: str | os.PathLike[str] | None = None,
         **options: Any) -> BenchData:
    """Rotated MNIST digits (``bsam bench --dataset rotated-mnist``).

    Options are those of :func:`load_rotated`; ``split_seed`` (what ``bsam bench`` passes, fixed
    across training seeds) replaces ``seed`` for the data when given; ``cap`` sets both
    ``val_per_bin`` and ``test_per_bin``; other options are ignored."""
    seed, opts = _known(seed, options)
    return load_rotated("mnist", seed, data_root, **opts)


def load_fashion(seed: int = 0, data_root: str | os.PathLike[str] | None = None,
                 **options: Any) -> BenchData:
    """Rotated Fashion-MNIST clothes (``bsam bench --dataset rotated-fashion-mnist``); options
    as :func:`load`."""
    seed, opts = _known(seed, options)
    return load_rotated("fashion-mnist", seed, data_root, **opts)


_OPTIONS = ("n_train", "val_per_bin", "test_per_bin", "bin_width", "tau", "classes", "download",
            "image_size")


def _known(seed: int, options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    opts = {k: v for k, v in options.items() if k in _OPTIONS}
    if options.get("cap") is not None:
        opts.setdefault("val_per_bin", int(options["cap"]))
        opts.setdefault("test_per_bin", int(options["cap"]))
    split_seed = options.get("split_seed")
    return (int(split_seed) if split_seed is not None else int(seed)), opts
