"""NYUD2-DIR (Yang et al., ICML 2021): per-pixel depth on NYU Depth v2 as prepared by Hu et al.
(2019, "Revisiting Single Image Depth Estimation"), with a depth-balanced test mask.

On disk (what the DIR ``data.zip`` unpacks to), relative to ``root``:

* ``data/nyu2_train.csv``, ``data/nyu2_test.csv``: two columns, no header: RGB path, depth path,
  both relative to ``root`` (``data/nyu2_train/<scene>_out/<k>.jpg`` + ``.png``; test
  ``data/nyu2_test/<k>_colors.png`` + ``<k>_depth.png``). 50,688 train and 654 test pairs.
* training depth: 8-bit PNGs, ``metres = code / 255 * 10``; test depth: 16-bit PNGs in mm,
  ``metres = code / 1000`` (the DIR/Hu ``ToTensor``; see :func:`~balanced_sam.data.images.
  open_depth_png`). RGB is 640 x 480.
* ``data/test_balanced_mask.npy``: ``uint8`` of shape ``(654, 228, 304)``: for each depth bin
  7..99 of 0.1 m the same number of test pixels (9,357 per bin in the DIR release; not checked),
  at the resolution of the test depth after the test pipeline below.

Pipeline (DIR ``loaddata.py`` / ``nyu_transform.py``, from Hu et al.), for ``img_size = s``
(240 in the paper): resize so that the shorter side is ``s`` (RGB bilinear, depth nearest); train
only: horizontal flip (p 0.5), rotation by U(-5, 5) degrees; centre crop to
``(2 * round(114 s / 240), 2 * round(152 s / 240))`` = 228 x 304 at 240; train depth is then
resized to half (114 x 152), test depth stays at the crop size; RGB to [0, 1]; train only: PCA
lighting noise (AlexNet-style, std 0.1, ImageNet eigen-vectors) and a colour jitter of brightness,
contrast and saturation (each 0.4, in random order, Hu et al.'s blend formulas); normalise with
ImageNet mean / std.

Where we differ (stated, deliberate): rotation uses bilinear resampling for RGB and nearest for
depth (the reference uses a 2nd-order spline on both, which invents depths across edges); the
train depth is halved by 2 x 2 averaging and a pixel is valid only when its four source pixels
are (the reference resizes with PIL's default filter); pixels whose depth is 0 (the corners the
rotation leaves empty) are *masked out* of the training mask, while the reference trains on them
as depth 0. Samples are ``(image[3, H, W], depth[1, h, w] float32 metres, mask[1, h, w] bool)``
with the balanced mask for test and ``depth > 0`` for train. There is no validation split in the
DIR code: ``"val"`` is ``None`` (the reference picks the best epoch on the test set; pick a fixed
epoch or hold out scenes yourself).

The model predicts at half the input resolution: upsample to the test depth with
:func:`match_depth_size` (bilinear, ``align_corners=True``, as the DIR test code) before scoring.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from balanced_sam.bins import LabelBins
from balanced_sam.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArrayCache,
    CSVFormatError,
    DatasetNotFoundError,
    check_files_exist,
    check_images_decode,
    list_digest,
    open_depth_png,
    open_rgb,
    read_split_csv,
    require_root,
)
from balanced_sam.io import atomic_write, progress_bar

__all__ = [
    "NYUDepthDataset",
    "build_splits",
    "train_labels",
    "dir_bins",
    "train_depth_counts",
    "make_balanced_mask",
    "load_test_depths",
    "match_depth_size",
    "geometry",
    "TRAIN_CSV",
    "TEST_CSV",
    "MASK_FILE",
    "HINT",
    "NUM_BINS",
    "BIN_WIDTH",
    "FIRST_BALANCED_BIN",
]

TRAIN_CSV = "data/nyu2_train.csv"
TEST_CSV = "data/nyu2_test.csv"
MASK_FILE = "data/test_balanced_mask.npy"
NUM_BINS = 100
BIN_WIDTH = 0.1
FIRST_BALANCED_BIN = 7  # DIR: bins below 0.7 m hold (almost) no pixel; they take bin 7's weight
HINT = ("run `bsam data prepare nyud2 --root DIR` to fetch the NYUD2-DIR data.zip (the file that "
        "nyud2-dir/download_nyud2.py in github.com/YyzHarry/imbalanced-regression downloads) and "
        "build the balanced test mask")

# AlexNet-style PCA lighting on ImageNet RGB statistics, as in the DIR / Hu et al. code.
_PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = torch.tensor([
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
])
_GRAY = torch.tensor([0.299, 0.587, 0.114])


def geometry(img_size: int = 240) -> tuple[int, int, int]:
    """``(short_side, crop_h, crop_w)`` of the pipeline: 240 -> (240, 228, 304)."""
    if not isinstance(img_size, int) or img_size < 4:
        raise ValueError(f"img_size must be an integer >= 4, got {img_size!r}")
    return img_size, 2 * round(114 * img_size / 240), 2 * round(152 * img_size / 240)


def match_depth_size(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize predictions ``(B, 1, h, w)`` to the target's spatial size (a no-op when
    they match), with ``align_corners=True`` as the DIR test code."""
    if pred.shape[-2:] == target.shape[-2:]:
        return pred
    return F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=True)


def _scaled_size(h: int, w: int, short: int) -> tuple[int, int]:
    # Hu et al.'s Scale: the shorter side becomes `short`, the other int(short * long / short).
    if w < h:
        return int(short * h / w), short
    return short, int(short * w / h)


def _resize_nearest(a: np.ndarray, oh: int, ow: int) -> np.ndarray:
    h, w = a.shape[:2]
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return a[rows[:, None], cols[None, :]]


def _center_crop(t: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    if h < ch or w < cw:
        raise ValueError(f"image of {h}x{w} after resizing is smaller than the {ch}x{cw} crop")
    y = int(round((h - ch) / 2.0))
    x = int(round((w - cw) / 2.0))
    return t[..., y:y + ch, x:x + cw]


def _jitter(img: torch.Tensor, strength: float = 0.4) -> torch.Tensor:
    """Hu et al.'s colour jitter: brightness, contrast, saturation blends in random order."""
    for k in torch.randperm(3).tolist():
        a = float(torch.empty(()).uniform_(-strength, strength))
        gray = (img * _GRAY.view(3, 1, 1)).sum(0, keepdim=True)
        if k == 0:  # brightness: blend towards black
            img = img * (1.0 - a)
        elif k == 1:  # contrast: blend towards the mean grey level
            img = torch.lerp(img, gray.mean().expand_as(img), a)
        else:  # saturation: blend towards the grey image
            img = torch.lerp(img, gray.expand_as(img), a)
    return img


class NYUDepthDataset(Dataset):
    """RGB + depth pairs of NYUD2-DIR with the DIR pipeline (see the module docstring).

    Args:
        root: the folder holding ``data/``.
        pairs: ``(rgb_path, depth_path)`` relative to ``root``.
        train: training pipeline (augmentation, half-resolution depth, mask ``depth > 0``) or test.
        mask: for test, a ``bool``/``uint8`` array ``(n, crop_h, crop_w)`` (the balanced mask);
            ``None`` gives ``depth > 0``.
        img_size: shorter side after the first resize (240 in the paper).
        cache: an :class:`~balanced_sam.data.images.ArrayCache` with fields ``rgb``
            ``(H, W, 3) uint8``, ``depth`` ``(H, W) uint16`` and ``scale`` ``() float32`` holding
            each pair after the first resize (exact: later steps run on the cached arrays).
        augment: set to ``False`` to run the training geometry without randomness.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        pairs: list[tuple[str, str]],
        train: bool,
        mask: np.ndarray | None = None,
        img_size: int = 240,
        cache: ArrayCache | None = None,
        augment: bool = True,
    ) -> None:
        self.root = Path(root)
        self.pairs = [(str(a), str(b)) for a, b in pairs]
        self.train = bool(train)
        self.short, self.crop_h, self.crop_w = geometry(img_size)
        if mask is not None:
            expect = (len(self.pairs), self.crop_h, self.crop_w)
            if tuple(mask.shape) != expect:
                raise ValueError(
                    f"balanced mask has shape {tuple(mask.shape)}, expected {expect} "
                    f"(pairs, crop height, crop width at img_size={img_size})")
        self.mask = mask
        self.cache = cache
        self.augment = augment
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    # -- decoding + deterministic resize (what the cache stores)
    def load_scaled(self, i: int, with_rgb: bool = True) -> dict[str, Any]:
        """Sample ``i`` after the first resize: ``rgb (H, W, 3) uint8`` (when ``with_rgb``),
        ``depth (H, W) uint16`` codes and ``scale`` (metres per code)."""
        if self.cache is not None:
            rec = self.cache.get(i)
            if rec is not None:
                return rec
        rgb_rel, depth_rel = self.pairs[i]
        code, scale = open_depth_png(self.root / depth_rel)
        oh, ow = _scaled_size(code.shape[0], code.shape[1], self.short)
        rec: dict[str, Any] = {"depth": _resize_nearest(code, oh, ow),
                               "scale": np.float32(scale)}
        if with_rgb or self.cache is not None:
            img = open_rgb(self.root / rgb_rel)
            if img.size != (code.shape[1], code.shape[0]):
                raise ValueError(
                    f"RGB {self.root / rgb_rel} is {img.size[0]}x{img.size[1]} but depth "
                    f"{self.root / depth_rel} is {code.shape[1]}x{code.shape[0]}")
            from PIL import Image

            rec["rgb"] = np.array(img.resize((ow, oh), Image.BILINEAR), dtype=np.uint8)
            if self.cache is not None:
                self.cache.put(i, rec)
        return rec

    def depth_only(self, i: int) -> torch.Tensor:
        """Depth in metres ``(crop_h, crop_w)`` after resize + centre crop, no augmentation (what
        the bin counts and the balanced mask are computed on)."""
        rec = self.load_scaled(i, with_rgb=False)
        d = torch.from_numpy(rec["depth"].astype(np.float32)) * float(rec["scale"])
        return _center_crop(d, self.crop_h, self.crop_w)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        rec = self.load_scaled(i)
        img = torch.from_numpy(np.ascontiguousarray(rec["rgb"])).permute(2, 0, 1).float() / 255.0
        depth = torch.from_numpy(rec["depth"].astype(np.float32))[None] * float(rec["scale"])
        if self.train and self.augment:
            if bool(torch.rand(()) < 0.5):
                img, depth = img.flip(-1), depth.flip(-1)
            angle = float(torch.empty(()).uniform_(-5.0, 5.0))
            img = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR)
            depth = TF.rotate(depth, angle, interpolation=InterpolationMode.NEAREST)
        img = _center_crop(img, self.crop_h, self.crop_w)
        depth = _center_crop(depth, self.crop_h, self.crop_w)
        if self.train:
            valid = (depth > 0).float()
            summed = F.avg_pool2d((depth * valid)[None], 2)[0]
            frac = F.avg_pool2d(valid[None], 2)[0]
            mask = frac >= 1.0
            depth = torch.where(mask, summed / frac.clamp_min(1e-6), torch.zeros_like(summed))
            if self.augment:
                alpha = torch.randn(3) * 0.1
                img = img + (_PCA_EIGVEC * (alpha * _PCA_EIGVAL)).sum(1).view(3, 1, 1)
                img = _jitter(img)
        elif self.mask is not None:
            mask = torch.from_numpy(np.array(self.mask[i], dtype=bool))[None]
        else:
            mask = depth > 0
        img = (img - self.mean) / self.std
        return img.contiguous(), depth.contiguous(), mask.contiguous()


# --------------------------------------------------------------------------- splits
def _read_pairs(root: Path, rel: str | os.PathLike[str], what: str) -> list[tuple[str, str]]:
    df = read_split_csv(root / rel, ("rgb", "depth"), header=False, what=what, hint=HINT)
    return list(zip(df["rgb"].tolist(), df["depth"].tolist()))


def _check(root: Path, pairs: list[tuple[str, str]], verify: str, what: str) -> None:
    if verify == "none":
        return
    check_files_exist(root, [p for pair in pairs for p in pair], what, HINT)
    if verify == "decode":
        check_images_decode(root / p for pair in pairs for p in pair)


def _cache_for(root: Path, cache: bool | str | os.PathLike[str], split: str,
               ds: NYUDepthDataset) -> ArrayCache | None:
    if not cache:
        return None
    cdir = Path(cache) if not isinstance(cache, bool) else root / ".bsam_cache"
    first = ds.load_scaled(0)
    h, w = first["depth"].shape
    prefix = cdir / f"nyud2-{split}-{ds.short}-{list_digest([p for pr in ds.pairs for p in pr])}"
    store = ArrayCache(prefix, len(ds), {"rgb": ((h, w, 3), np.uint8),
                                         "depth": ((h, w), np.uint16),
                                         "scale": ((), np.float32)})
    store.put(0, first)
    return store


def build_splits(
    root: str | os.PathLike[str],
    img_size: int = 240,
    cache: bool | str | os.PathLike[str] = False,
    **options: Any,
) -> dict[str, NYUDepthDataset | None]:
    """NYUD2-DIR ``{"train", "val": None, "test"}`` datasets.

    Args:
        root: folder holding ``data/nyu2_train.csv``, ``data/nyu2_test.csv``, the images and
            ``data/test_balanced_mask.npy``.
        img_size: shorter side after the first resize (240 in the paper; gives 228 x 304 crops).
        cache: ``True`` keeps the resized pairs in memory-mapped files under
            ``root/.bsam_cache`` (a path puts them elsewhere).
        train_csv / test_csv / mask_file: other files, relative to ``root`` or absolute.
        verify: ``"exists"`` (default), ``"decode"`` or ``"none"``, as for the age benchmarks.
        augment: ``False`` turns the training augmentation off.

    Raises ``DatasetNotFoundError`` (root, CSV or mask missing; ``bsam data prepare nyud2`` builds
    the mask), ``MissingImagesError``, ``CSVFormatError`` and ``CorruptImageError``.
    """
    verify = options.pop("verify", "exists")
    if verify not in ("none", "exists", "decode"):
        raise ValueError(f"verify must be 'none', 'exists' or 'decode', got {verify!r}")
    train_csv = options.pop("train_csv", TRAIN_CSV)
    test_csv = options.pop("test_csv", TEST_CSV)
    mask_file = options.pop("mask_file", MASK_FILE)
    augment = bool(options.pop("augment", True))
    if options:
        raise TypeError(f"unknown option(s) for nyud2.build_splits: {sorted(options)}")
    r = require_root(root, "NYUD2-DIR", HINT)
    geometry(img_size)
    train_pairs = _read_pairs(r, train_csv, "NYUD2-DIR train CSV")
    test_pairs = _read_pairs(r, test_csv, "NYUD2-DIR test CSV")
    _check(r, train_pairs, verify, "NYUD2-DIR train files")
    _check(r, test_pairs, verify, "NYUD2-DIR test files")
    mpath = r / mask_file
    if not mpath.is_file():
        raise DatasetNotFoundError(f"NYUD2-DIR balanced test mask not found: {mpath}; {HINT}")
    try:
        mask = np.load(mpath, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CSVFormatError(f"cannot read the balanced test mask {mpath}: {exc}") from exc
    train = NYUDepthDataset(r, train_pairs, True, None, img_size, None, augment)
    test = NYUDepthDataset(r, test_pairs, False, mask, img_size, None)
    train.cache = _cache_for(r, cache, "train", train)
    test.cache = _cache_for(r, cache, "test", test)
    return {"train": train, "val": None, "test": test}


def train_labels(root: str | os.PathLike[str], **options: Any) -> torch.Tensor:
    """Not defined per sample for a dense task: use :func:`dir_bins` (per-pixel bin counts).

    Raises ``NotImplementedError`` with that advice.
    """
    raise NotImplementedError("NYUD2-DIR labels are per pixel; build the bins with "
                              "balanced_sam.data.nyud2.dir_bins(root) instead of train_labels")


class _DepthOnly(Dataset):
    def __init__(self, ds: NYUDepthDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ds.depth_only(i)


def _depth_bin(depth: torch.Tensor) -> torch.Tensor:
    # DIR's get_bin_idx: min(int(d * 10), 99) with float32 arithmetic
    return (depth * np.float32(1.0 / BIN_WIDTH)).to(torch.int64).clamp_(0, NUM_BINS - 1)


def train_depth_counts(
    root: str | os.PathLike[str],
    img_size: int = 240,
    *,
    train_csv: str = TRAIN_CSV,
    num_workers: int = 0,
    batch_size: int = 16,
    use_cache: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Training pixels per 0.1 m depth bin (int64, 100 bins over [0, 10] m, depths >= 10 m in the
    last bin), counted over every train depth map after the deterministic part of the pipeline
    (resize + centre crop at full crop resolution, 228 x 304 at 240) and only over ``depth > 0``.

    This is what the DIR code's hard-coded ``TRAIN_BUCKET_NUM`` counts: on the released data its
    total is 3,513,286,656 = 50,688 x 228 x 304 pixels and bins 0..6 are empty. Streaming 50k PNGs
    takes minutes, so the result is cached in ``root/data/bsam_train_depth_counts_{h}x{w}.npz``
    (keyed by a hash of the train CSV); a stale or foreign file is recomputed, and an unwritable
    root just skips the cache.
    """
    r = require_root(root, "NYUD2-DIR", HINT)
    _, ch, cw = geometry(img_size)
    csv_path = r / train_csv
    if not csv_path.is_file():
        raise DatasetNotFoundError(f"NYUD2-DIR train CSV not found: {csv_path}; {HINT}")
    digest = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    cache_file = r / "data" / f"bsam_train_depth_counts_{ch}x{cw}.npz"
    if use_cache and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                if str(z["csv_sha256"]) == digest and z["counts"].shape == (NUM_BINS,):
                    return z["counts"].astype(np.int64)
        except (OSError, ValueError, KeyError):
            pass
    pairs = _read_pairs(r, train_csv, "NYUD2-DIR train CSV")
    check_files_exist(r, [d for _, d in pairs], "NYUD2-DIR train depth maps", HINT)
    ds = NYUDepthDataset(r, pairs, True, None, img_size, None, augment=False)
    loader = DataLoader(_DepthOnly(ds), batch_size=batch_size, num_workers=num_workers)
    counts = torch.zeros(NUM_BINS, dtype=torch.int64)
    for depth in progress_bar(loader, enabled=progress, desc="counting train depth pixels"):
        d = depth[depth > 0]
        counts += torch.bincount(_depth_bin(d), minlength=NUM_BINS)
    out = counts.numpy()
    if use_cache:
        try:
            atomic_write(cache_file, lambda tmp: np.savez(tmp, counts=out,
                                                          csv_sha256=np.array(digest)),
                         suffix=".npz")
        except OSError:
            pass
    return out


def dir_bins(root: str | os.PathLike[str], img_size: int = 240, **options: Any) -> LabelBins:
    """The NYUD2-DIR label bins: 100 bins of 0.1 m over [0, 10] m with the training pixel counts
    of :func:`train_depth_counts`, ``share_weight_below=7`` (bins below 0.7 m take bin 7's
    weight, as the DIR code) and ``clamp=True`` (depths beyond 10 m go to the last bin, as the
    DIR ``min(int(10 d), 99)``). Options go to :func:`train_depth_counts`."""
    counts = train_depth_counts(root, img_size, **options)
    edges = torch.linspace(0.0, NUM_BINS * BIN_WIDTH, NUM_BINS + 1, dtype=torch.float64)
    return LabelBins.from_counts(counts, edges, clamp=True, share_weight_below=FIRST_BALANCED_BIN)


def load_test_depths(
    root: str | os.PathLike[str],
    img_size: int = 240,
    *,
    test_csv: str = TEST_CSV,
    num_workers: int = 0,
) -> torch.Tensor:
    """All test depth maps in metres, ``(n, crop_h, crop_w)`` float32, after the test pipeline
    (what the balanced mask indexes)."""
    r = require_root(root, "NYUD2-DIR", HINT)
    pairs = _read_pairs(r, test_csv, "NYUD2-DIR test CSV")
    check_files_exist(r, [d for _, d in pairs], "NYUD2-DIR test depth maps", HINT)
    ds = NYUDepthDataset(r, pairs, False, None, img_size, None)
    loader = DataLoader(_DepthOnly(ds), batch_size=16, num_workers=num_workers)
    return torch.cat(list(loader), 0)


def make_balanced_mask(
    test_depth: torch.Tensor | np.ndarray,
    *,
    first_bin: int = FIRST_BALANCED_BIN,
    seed: int = 0,
) -> np.ndarray:
    """The balanced test mask (``uint8``, same shape as ``test_depth``): for every 0.1 m bin
    ``first_bin..99`` the same number of pixels, drawn without replacement with a fixed seed; that
    number is the smallest count over those bins.

    Follows DIR's ``preprocess_nyud2.py`` (bin = ``min(int(10 d), 99)``) except that the
    reference takes the minimum over *all* non-empty bins 0..99; on its data bins 0..6 are empty
    in the test set, so both give the same number. Raises ``ValueError`` naming the empty bins when
    a bin ``first_bin..99`` holds no test pixel.
    """
    d = torch.as_tensor(np.asarray(test_depth), dtype=torch.float32)
    flat = d.reshape(-1)
    bins = _depth_bin(flat)
    bins[flat <= 0] = -1  # missing depth is never selected
    counts = torch.bincount(bins[bins >= 0], minlength=NUM_BINS)
    wanted = counts[first_bin:]
    if bool((wanted == 0).any()):
        empty = (torch.nonzero(wanted == 0).reshape(-1) + first_bin).tolist()
        raise ValueError(f"cannot balance the test set: depth bin(s) {empty[:10]} "
                         f"({len(empty)} of {NUM_BINS - first_bin}; bin k is "
                         f"[{BIN_WIDTH:g} k, {BIN_WIDTH:g} (k+1)) m) hold no test pixel")
    per_bin = int(wanted.min())
    rng = np.random.default_rng(seed)
    order = torch.argsort(bins, stable=True).numpy()
    starts = np.concatenate([[0], np.cumsum(torch.bincount(bins + 1, minlength=NUM_BINS + 1)
                                            .numpy())])
    mask = np.zeros(flat.numel(), dtype=np.uint8)
    for k in range(first_bin, NUM_BINS):  # one draw per bin
        members = order[starts[k + 1]:starts[k + 2]]
        mask[rng.choice(members, size=per_bin, replace=False)] = 1
    return mask.reshape(tuple(d.shape))
