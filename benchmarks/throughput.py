"""Images per second of AgeDB-DIR-style BSAM training: end to end, loader alone, optimizer alone.

    python benchmarks/throughput.py --device cuda                 # the paper's setting on a GPU
    python benchmarks/throughput.py --device cpu --img-size 64 --batch-size 32 --workers 1
    python benchmarks/throughput.py --smoke                       # seconds on a CPU (tests)

Stand-in data: JPEGs of random smooth colour fields with texture (``--picture``, default 240 x 200
pixels, height x width, quality 90) written to a temporary folder (``--data-dir`` keeps them),
one per training row of the AgeDB-DIR split when ``--csv`` names it (default: the first of
``../shared/data/agedb.csv`` and ``../../shared/data/agedb.csv`` relative to the repository that
exists; 12,208 training rows), else of a synthetic long-tailed split of the same size (ages
``1 + floor(100 * Beta(2.5, 3.5))``); ``--limit N`` takes the first N rows. The label bins and
BSAM weights come from all the split's training labels.

Three input pipelines feed the same training step (ResNet-18 regressor from
``balanced_sam.models``, ``BalancedSAM`` over SGD with the AgeDB recipe: lr 0.2, momentum 0.9,
weight decay 1e-4, rho 0.2, raw 1/sqrt(N_k) weights, L1 loss):

(a) ``jpeg``: PIL decode + the recipe's torchvision transforms per image in DataLoader workers
    (built here from torchvision, identical to ``data.images.age_train_transform``), as
    ``bsam train`` does today with ``cache: false``;
(b) ``cache+cpu``: the same transforms on decoded images read from a memory-mapped uint8 cache of
    ``Resize(S)`` + ``CenterCrop(S)`` squares, ``S = round(img_size * 256 / 224)``; the cache's
    layout and per-record read (``np.array`` of one record, ``Image.fromarray``) are those of
    ``cache: true`` (``data.images.ArrayCache``);
(c) ``cache+device``: whole uint8 batches read from the same cache by the workers, copied to the
    device, and augmented there by ``balanced_sam.data.gpu_augment.BatchAugment``.

Printed (all measured here; warm-up batches excluded; one process times everything):
* per-image read costs in one process (best of three passes after a warm-up pass): JPEG decode,
  decode + resize (the cache build), one cache record, one record + ``Image.fromarray``, and
  sorted batches read from the cache;
* the optimizer alone: BalancedSAM steps on one pre-made batch on the device;
* for each pipeline the loader alone (batches delivered on the device, model-ready: after the
  host-to-device copy, and for (c) after the augmentation) and end to end (loader + step);
* the device augmentation alone, and the ratios between these figures.

The DataLoaders use pinned memory on CUDA, persistent workers and ``prefetch_factor`` 2; the
default warm-up (``2 * workers + 2`` batches) drains whatever the workers buffered during start-up,
so the timed batches run at the steady rate.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
AGEDB_TRAIN_ROWS = 12208
PARTS = ("reads", "optimizer", "augment", "loader", "end-to-end")
DEFAULT_CSVS = (REPO.parent / "shared" / "data" / "agedb.csv",
                REPO.parent.parent / "shared" / "data" / "agedb.csv")


# ----------------------------------------------------------------------------- stand-in data
def read_train_ages(csv_path: Path) -> np.ndarray:
    """The ``age`` column of the ``split == "train"`` rows of an ``age,path,split`` CSV."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"age", "split"} - set(reader.fieldnames or ())
        if missing:
            raise SystemExit(f"--csv {csv_path}: expected columns age,path,split, "
                             f"found {reader.fieldnames}")
        ages = [float(r["age"]) for r in reader if r["split"] == "train"]
    if not ages:
        raise SystemExit(f"--csv {csv_path} has no 'train' rows")
    return np.asarray(ages, dtype=np.float32)


def synthetic_ages(n: int, seed: int = 0) -> np.ndarray:
    """A long-tailed stand-in for AgeDB-DIR's training ages: 1 + floor(100 * Beta(2.5, 3.5))."""
    rng = np.random.default_rng(seed)
    return (1 + np.floor(100 * rng.beta(2.5, 3.5, size=n))).astype(np.float32)


def _write_jpeg(job: tuple[str, int, int, int]) -> int:
    """One stand-in picture: a smooth random colour field with fine texture, as a JPEG."""
    from PIL import Image

    path, h, w, seed = job
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
    field += rng.normal(0.0, 6.0, size=field.shape)
    Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def _resize_square(path: str, side: int) -> np.ndarray:
    """Decode a JPEG, ``Resize(side)`` of the shorter side and ``CenterCrop(side)``, as the
    ``cache: true`` path stores it; ``(side, side, 3)`` uint8."""
    from torchvision.transforms import functional as TF

    img = _open_rgb(path)
    return np.asarray(TF.center_crop(TF.resize(img, side), [side, side]), dtype=np.uint8)


def _cache_job(job: tuple[str, str, int, int, int]) -> None:
    cache_path, jpeg_dir, side, start, stop = job
    mm = np.load(cache_path, mmap_mode="r+")
    for i in range(start, stop):
        mm[i] = _resize_square(os.path.join(jpeg_dir, f"{i:06d}.jpg"), side)
    mm.flush()


def _open_rgb(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _pool_map(fn: Callable[[Any], Any], jobs: Sequence[Any], processes: int) -> list[Any]:
    if processes <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(
            processes) as pool:
        return pool.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * processes)))


def make_jpegs(folder: Path, n: int, h: int, w: int, processes: int) -> tuple[float, float]:
    """Write ``n`` stand-in JPEGs (reusing a complete set already there); returns the mean file
    size in KB and the seconds spent."""
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(str(folder / f"{i:06d}.jpg"), h, w, i) for i in range(n)]
    todo = [j for j in jobs if not os.path.exists(j[0])]
    _pool_map(_write_jpeg, todo, processes)
    sizes = [os.path.getsize(j[0]) for j in jobs]
    return float(np.mean(sizes)) / 1024, time.perf_counter() - t0


def build_cache(path: Path, jpeg_dir: Path, n: int, side: int, processes: int) -> float:
    """Decode + resize every JPEG into a ``(n, side, side, 3)`` uint8 ``.npy`` memory map (the
    layout of ``data.images.ArrayCache``); returns the seconds spent."""
    t0 = time.perf_counter()
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
    del mm
    chunk = max(1, math.ceil(n / max(1, 4 * processes)))
    jobs = [(str(path), str(jpeg_dir), side, s, min(n, s + chunk)) for s in range(0, n, chunk)]
    _pool_map(_cache_job, jobs, processes)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- datasets
def age_train_transform(img_size: int) -> Callable[[Any], torch.Tensor]:
    """The recipe's training transform (same as ``data.images.age_train_transform``)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


class JpegDataset(torch.utils.data.Dataset):
    """(a): decode the JPEG, then the PIL transforms."""

    def __init__(self, folder: Path, ages: np.ndarray, img_size: int) -> None:
        self.folder, self.ages = str(folder), torch.from_numpy(ages)
        self.transform = age_train_transform(img_size)

    def __len__(self) -> int:
        return len(self.ages)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = _open_rgb(os.path.join(self.folder, f"{i:06d}.jpg"))
        return self.transform(img), self.ages[i]


class _CacheReader:
    """Opens the memory map lazily, so that each DataLoader worker maps the file itself."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._mm: np.ndarray | None = None

    @property
    def mm(self) -> np.ndarray:
        if self._mm is None:
            self._mm = np.load(self.path, mmap_mode="r")
        return self._mm

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_mm": None}


class CachePilDataset(torch.utils.data.Dataset):
    """(b): one cached record (a copy, as ``ArrayCache.get``), ``Image.fromarray``, PIL
    transforms."""

    def __init__(self, cache: Path, ages: np.ndarray, img_size: int) -> None:
        self.reader, self.ages = _CacheReader(cache), torch.from_numpy(ages)
        self.transform = age_train_transform(img_size)

    def __len__(self) -> int:
        return len(self.ages)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        return self.transform(Image.fromarray(np.array(self.reader.mm[i]))), self.ages[i]


class CacheBatchDataset(torch.utils.data.Dataset):
    """(c): a whole batch of cached uint8 records per item, ``(B, S, S, 3)`` (NHWC)."""

    def __init__(self, cache: Path, ages: np.ndarray) -> None:
        self.reader, self.ages = _CacheReader(cache), torch.from_numpy(ages)

    def __len__(self) -> int:
        return len(self.ages)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.sort(np.asarray(idx))  # sequential reads from the map
        return torch.from_numpy(self.reader.mm[order]), self.ages[torch.from_numpy(order)]


class RandomBatches(torch.utils.data.Sampler):
    """``count`` batches of ``batch`` random indices (without replacement within an epoch)."""

    def __init__(self, n: int, batch: int, count: int, seed: int) -> None:
        self.n, self.batch, self.count, self.seed = n, batch, count, seed

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        perm: list[int] = []
        for _ in range(self.count):
            while len(perm) < self.batch:
                perm += torch.randperm(self.n, generator=g).tolist()
            yield perm[:self.batch]
            perm = perm[self.batch:]


def make_loader(kind: str, data: dict[str, Any], args: argparse.Namespace, count: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    n = len(data["ages"])
    sampler = RandomBatches(n, args.batch_size, count, seed=args.seed)
    common: dict[str, Any] = dict(num_workers=args.workers, pin_memory=device.type == "cuda")
    if args.workers > 0:
        common.update(persistent_workers=True, prefetch_factor=args.prefetch)
    if kind == "jpeg":
        ds: Any = JpegDataset(data["jpeg_dir"], data["ages"], args.img_size)
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, **common)
    if kind == "cache+cpu":
        ds = CachePilDataset(data["cache"], data["ages"], args.img_size)
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, **common)
    ds = CacheBatchDataset(data["cache"], data["ages"])
    return torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None, **common)


# ----------------------------------------------------------------------------- training step
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(args: argparse.Namespace, train_ages: np.ndarray, device: torch.device
              ) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.nn.Module]:
    from balanced_sam import BalancedSAM, LabelBins
    from balanced_sam.models import ResNetRegressor

    torch.manual_seed(args.seed)
    model = ResNetRegressor("resnet18").to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    bins = LabelBins.from_labels(torch.from_numpy(train_ages), bin_width=1, lower=0, upper=121)
    opt = BalancedSAM(model.parameters(), torch.optim.SGD, bins, rho=0.2, normalize="none",
                      lr=0.2, momentum=0.9, weight_decay=1e-4)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16"
           else contextlib.nullcontext())

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def loss_fn() -> torch.Tensor:
            with amp:
                pred = model(x)
            return (pred.float() - y).abs()

        return opt.step(loss_fn, y)

    return step, model


def to_model_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------- timing
def timed_batches(batches: Iterator[Any], warmup: int, steps: int, work: Callable[[Any], Any],
                  device: torch.device) -> tuple[float, Any]:
    """Seconds for ``steps`` batches of ``work`` after ``warmup`` untimed ones."""
    out = None
    for _ in range(warmup):
        out = work(next(batches))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = work(next(batches))
    sync(device)
    return time.perf_counter() - t0, out


def per_image_reads(data: dict[str, Any], count: int, batch: int, seed: int) -> dict[str, float]:
    """Images per second of each read path in this process, over ``count`` images in random
    order: the best of three passes after a warm-up pass (the least disturbed by other work)."""
    from PIL import Image

    n = len(data["ages"])
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)[:min(n, count)].tolist()
    mm = np.load(data["cache"], mmap_mode="r")
    folder, side = str(data["jpeg_dir"]), data["side"]

    def rate(fn: Callable[[Any], Any], items: Sequence[Any], per_item: int = 1) -> float:
        for it in items:  # warm-up: first touch of files and pages
            fn(it)
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for it in items:
                fn(it)
            best = min(best, time.perf_counter() - t0)
        return len(items) * per_item / best

    def jpeg(i: int) -> str:
        return os.path.join(folder, f"{i:06d}.jpg")

    out = {
        "jpeg_decode": rate(lambda i: _open_rgb(jpeg(i)), idx),
        "jpeg_decode_resize": rate(lambda i: _resize_square(jpeg(i), side), idx),
        "cache_record": rate(lambda i: np.array(mm[i]), idx),
        "cache_record_pil": rate(lambda i: Image.fromarray(np.array(mm[i])), idx),
    }
    b = min(batch, n)
    order = rng.permutation(n)
    batches = [np.sort(order[k:k + b]) for k in range(0, n - b + 1, b)][:max(2, count // b)]
    out["cache_batch"] = rate(lambda o: mm[o], batches, per_item=b)
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    ap.add_argument("--csv", default=None, help="AgeDB-DIR split CSV (age,path,split); default: "
                    "../shared/data/agedb.csv (or ../../) relative to the repository, if present")
    ap.add_argument("--limit", type=int, default=None, help="use the first N training rows")
    ap.add_argument("--picture", default=None, help="stand-in JPEG size HxW (240x200)")
    ap.add_argument("--data-dir", default=None, help="keep JPEGs and cache here (default: temp)")
    ap.add_argument("--batch-size", type=int, default=None, help="batch size (256)")
    ap.add_argument("--img-size", type=int, default=None, help="network input side (224)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers (default: CPU cores - 2, at most 14)")
    ap.add_argument("--prefetch", type=int, default=2, help="DataLoader prefetch_factor")
    ap.add_argument("--amp", choices=["none", "bf16"], default=None,
                    help="bf16 autocast (default: bf16 on CUDA, none on CPU)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="channels_last model and inputs (default: on for CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed batches per figure (30)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed batches first (default: 2 * workers + 2)")
    ap.add_argument("--reads", type=int, default=None,
                    help="images for the per-image read costs (500)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"what to measure, comma-separated from {','.join(PARTS)} (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU run for the tests (seconds): 24 pictures 24x20, 16 px, batch "
                    "4, 2 timed batches, no workers, unless given")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = ap.parse_args(argv)
    defaults = dict(picture="240x200", batch_size=256, img_size=224, steps=30, reads=500)
    if args.smoke:
        defaults.update(device="cpu", limit=24, picture="24x20", batch_size=4, img_size=16,
                        steps=2, workers=0, warmup=1, reads=16)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.workers is None:
        args.workers = max(0, min(14, (os.cpu_count() or 1) - 2))
    if args.warmup is None:
        args.warmup = 2 * args.workers + 2
    try:
        h, w = (int(v) for v in args.picture.lower().split("x"))
    except ValueError:
        ap.error(f"--picture must be HxW, e.g. 240x200, got {args.picture!r}")
    if h < 1 or w < 1:
        ap.error("--picture sides must be positive")
    args.picture_hw = (h, w)
    for name in ("batch_size", "img_size", "steps", "prefetch", "reads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0 or args.warmup < 0:
        ap.error("--workers and --warmup must be >= 0")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        ap.error(f"--parts must name some of {','.join(PARTS)}, got {unknown or 'nothing'}")
    if args.limit is not None and args.limit < args.batch_size:
        ap.error(f"--limit ({args.limit}) must be at least --batch-size ({args.batch_size})")
    return args


def find_csv(arg: str | None) -> Path | None:
    if arg is not None:
        p = Path(arg)
        if not p.is_file():
            raise SystemExit(f"--csv {arg}: no such file")
        return p
    return next((p for p in DEFAULT_CSVS if p.is_file()), None)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" else "none"
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    csv_path = find_csv(args.csv)
    train_ages = read_train_ages(csv_path) if csv_path else synthetic_ages(AGEDB_TRAIN_ROWS)
    n = len(train_ages) if args.limit is None else min(args.limit, len(train_ages))
    if n < args.batch_size:
        raise SystemExit(f"only {n} training images for a batch of {args.batch_size}")
    ages = train_ages[:n].copy()
    side = round(args.img_size * 256 / 224)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({gpu_name}), torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} torch threads")
    print(f"batch {args.batch_size}, {args.img_size} px, amp {args.amp}, channels_last "
          f"{args.channels_last}, workers {args.workers}, prefetch {args.prefetch}, "
          f"{args.warmup} warm-up + {args.steps} timed batches per figure")
    split = (f"the training labels of {csv_path}" if csv_path else
             f"a synthetic long-tailed split of {AGEDB_TRAIN_ROWS} training labels")
    print(f"labels: {split} ({len(train_ages)} rows, bins from all of them); images: {n}")

    tmp = None
    root = Path(args.data_dir) if args.data_dir else Path(tmp := tempfile.mkdtemp(prefix="bsam-"))
    try:
        return run(args, device, root, ages, train_ages, side, gpu_name, csv_path)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, device: torch.device, root: Path, ages: np.ndarray,
        train_ages: np.ndarray, side: int, gpu_name: str, csv_path: Path | None
        ) -> dict[str, Any]:
    import PIL.Image  # noqa: F401  (imports before any timing)
    import torchvision.transforms.functional  # noqa: F401

    from balanced_sam.data.gpu_augment import BatchAugment

    n, bsz, parts = len(ages), args.batch_size, args.parts
    h, w = args.picture_hw
    procs = max(1, args.workers)
    jpeg_dir = root / f"jpeg-{h}x{w}"
    kb, t_jpeg = make_jpegs(jpeg_dir, n, h, w, procs)
    cache = root / f"cache-{h}x{w}-{n}-{side}.npy"
    t_cache = build_cache(cache, jpeg_dir, n, side, procs)
    print(f"stand-in data: {n} JPEGs {h}x{w} (mean {kb:.1f} KB) ready in {t_jpeg:.1f} s; "
          f"cache {n} x {side}x{side}x3 uint8 ({n * side * side * 3 / 2**20:.0f} MiB) built in "
          f"{t_cache:.1f} s with {procs} process(es) = {n / t_cache:.0f} img/s")
    data = {"ages": ages, "jpeg_dir": jpeg_dir, "cache": cache, "side": side}
    res: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "picture_hw"},
        "device_name": gpu_name, "torch": torch.__version__, "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "split_csv": str(csv_path) if csv_path else None, "images": n, "cache_side": side,
        "jpeg_kb": kb, "cache_build_img_s": n / t_cache, "cache_build_processes": procs,
    }

    if "reads" in parts:
        reads = per_image_reads(data, args.reads, bsz, args.seed)
        res["reads_img_s"] = reads
        print("\nper-image reads, one process (img/s):")
        for k, label in [("jpeg_decode", f"JPEG {h}x{w} decode"),
                         ("jpeg_decode_resize", f"JPEG decode + resize to {side} (cache build)"),
                         ("cache_record", "cache: one record (np.array of the memory map)"),
                         ("cache_record_pil", "cache: one record + Image.fromarray"),
                         ("cache_batch", f"cache: sorted batch of {min(bsz, n)} records")]:
            print(f"  {label:<50}{reads[k]:>10.0f}")
        print(f"  vs JPEG decode: one record {reads['cache_record'] / reads['jpeg_decode']:.0f}x, "
              f"record + Image.fromarray {reads['cache_record_pil'] / reads['jpeg_decode']:.0f}x, "
              f"batch {reads['cache_batch'] / reads['jpeg_decode']:.0f}x as many img/s")

    aug_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    aug = BatchAugment(args.img_size, dtype=aug_dtype, channels_last=args.channels_last,
                       generator=torch.Generator().manual_seed(args.seed))
    if "augment" in parts:
        # the device augmentation alone, on a uint8 batch already on the device
        xa = torch.from_numpy(np.load(cache, mmap_mode="r")[:bsz].copy()).to(device)
        xa = xa.permute(0, 3, 1, 2)
        secs, out = timed_batches(iter(lambda: xa, None), 2, args.steps, aug, device)
        res["device_aug_img_s"] = args.steps * bsz / secs
        assert out.shape == (bsz, 3, args.img_size, args.img_size) and out.dtype == aug_dtype
        print(f"\ndevice augmentation alone (BatchAugment on {device}, uint8 {side}px -> "
              f"{args.img_size}px {str(aug_dtype).replace('torch.', '')}): "
              f"{res['device_aug_img_s']:.0f} img/s")

    step = None
    if "optimizer" in parts or "end-to-end" in parts:
        step, _ = make_step(args, train_ages, device)
    opt_rate = None
    if "optimizer" in parts:
        assert step is not None
        gen = torch.Generator().manual_seed(args.seed)
        x0 = torch.randn(bsz, 3, args.img_size, args.img_size, generator=gen)
        y0 = torch.from_numpy(ages[torch.randint(0, n, (bsz,), generator=gen).numpy()])
        x0 = to_model_input(x0, device, args.channels_last).to(aug_dtype)
        y0 = y0.to(device)
        secs, loss = timed_batches(iter(lambda: (x0, y0), None), max(1, args.warmup // 4),
                                   args.steps, lambda b: step(*b), device)
        opt_rate = args.steps * bsz / secs
        res["optimizer_img_s"] = opt_rate
        res["optimizer_s_per_step"] = secs / args.steps
        res["optimizer_loss"] = float(loss)
        print(f"\noptimizer alone (BalancedSAM step, ResNet-18, pre-made batch on {device}): "
              f"{opt_rate:.0f} img/s ({1000 * secs / args.steps:.1f} ms/step)")

    def prepare(kind: str) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
        if kind == "cache+device":
            def fn(b: Any) -> tuple[torch.Tensor, torch.Tensor]:
                xb = b[0].to(device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC -> NCHW view
                return aug(xb), b[1].to(device, non_blocking=True)
            return fn
        return lambda b: (to_model_input(b[0], device, args.channels_last),
                          b[1].to(device, non_blocking=True))

    pipelines = [("jpeg", "(a) JPEG + PIL transforms, workers"),
                 ("cache+cpu", "(b) uint8 cache + PIL transforms, workers"),
                 ("cache+device", "(c) uint8 cache + BatchAugment on device")]
    count = args.warmup + args.steps
    res["pipelines"] = {}
    for kind, _ in pipelines if ("loader" in parts or "end-to-end" in parts) else []:
        prep = prepare(kind)
        p: dict[str, float] = {}
        if "loader" in parts:
            loader = make_loader(kind, data, args, count, device)
            secs, (xb, yb) = timed_batches(iter(loader), args.warmup, args.steps, prep, device)
            del loader
            assert xb.shape == (bsz, 3, args.img_size, args.img_size) and yb.shape == (bsz,)
            p["loader_img_s"] = args.steps * bsz / secs
            if opt_rate:
                p["loader_over_optimizer"] = p["loader_img_s"] / opt_rate
        if "end-to-end" in parts:
            assert step is not None
            loader = make_loader(kind, data, args, count, device)
            secs, loss = timed_batches(iter(loader), args.warmup, args.steps,
                                       lambda b, prep=prep: step(*prep(b)), device)
            del loader
            p["end_to_end_img_s"] = args.steps * bsz / secs
            p["last_loss"] = float(loss)
            if opt_rate:
                p["end_to_end_over_optimizer"] = p["end_to_end_img_s"] / opt_rate
        res["pipelines"][kind] = p

    if res["pipelines"]:
        def cell(v: float | None, fmt: str) -> str:
            return format(v, fmt) if v is not None else "-"

        print(f"\n{'pipeline':<44}{'loader':>9}{'end to end':>12}{'loader/opt':>12}"
              f"{'e2e/opt':>9}")
        print(f"{'':<44}{'img/s':>9}{'img/s':>12}")
        for kind, label in pipelines:
            p = res["pipelines"][kind]
            print(f"{label:<44}{cell(p.get('loader_img_s'), '.0f'):>9}"
                  f"{cell(p.get('end_to_end_img_s'), '.0f'):>12}"
                  f"{cell(p.get('loader_over_optimizer'), '.2f'):>12}"
                  f"{cell(p.get('end_to_end_over_optimizer'), '.2f'):>9}")
        for key, what in [("end_to_end_img_s", "end to end"), ("loader_img_s", "loader")]:
            v = {k: d[key] for k, d in res["pipelines"].items() if key in d}
            if len(v) == 3:
                r = {"cache+cpu/jpeg": v["cache+cpu"] / v["jpeg"],
                     "cache+device/jpeg": v["cache+device"] / v["jpeg"],
                     "cache+device/cache+cpu": v["cache+device"] / v["cache+cpu"]}
                res[f"speedup_{key.replace('_img_s', '')}"] = r
                print(f"{what}: (b)/(a) = {r['cache+cpu/jpeg']:.2f}x, (c)/(a) = "
                      f"{r['cache+device/jpeg']:.2f}x, (c)/(b) = "
                      f"{r['cache+device/cache+cpu']:.2f}x")
    if device.type == "cpu":
        print("(CPU figures: the loader's workers, the augmentation and the model share the CPU's "
              "cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
