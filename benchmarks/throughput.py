"""Images per second of AgeDB-DIR BSAM training with ``bsam train`` itself: end to end, the loader
alone, the optimizer alone, and the ratios between them.

    PYTHONPATH=src python benchmarks/throughput.py                  # CUDA if present: the goal
    PYTHONPATH=src python benchmarks/throughput.py --device cpu --img-size 64 --batch-size 32
    PYTHONPATH=src python benchmarks/throughput.py --smoke          # seconds on a CPU (tests)

Stand-in data: an AgeDB-DIR root written to a temporary folder (``--data-dir`` keeps it): one JPEG
of a random smooth colour field with texture (``--picture``, default 240 x 200 pixels, height x
width, quality 90) at the path of each training row of the split, and ``agedb.csv`` listing those
rows. The split is ``--csv`` (default: the first of ``shared/data/agedb.csv``,
``../shared/data/agedb.csv`` and ``../../shared/data/agedb.csv`` relative to the repository that
exists: 12,208 training rows),
else a synthetic long-tailed split of the same size (ages ``1 + floor(100 * Beta(2.5, 3.5))``);
``--limit N`` keeps the first N training rows. Only training rows are written, so the timed
epochs train and do nothing else.

Every figure goes through the library, as ``bsam train --config agedb_bsam.yaml`` runs (the
registry's AgeDB-DIR recipe: ResNet-18, BSAM over SGD lr 0.2 / momentum 0.9 / wd 1e-4, rho 0.2,
raw 1/sqrt(N_k) weights, L1; ``train.amp`` / ``train.channels_last`` ``auto`` unless given, i.e.
bf16 on CUDA and the layout the run measures faster; ``--model small-cnn`` for the smoke test
only), for three input pipelines:

(device) ``data.augment: device``: the workers read ``uint8`` pictures from a cache filled before
    training; the loop augments each batch on the device (``DevicePipeline``, ``BatchAugment``);
(cache)  ``data.augment: cpu, data.cache: DIR``: the PIL transforms per image in the workers, on
    decoded centre squares cached during the first epoch;
(jpeg)   ``data.augment: cpu, data.cache: false``: JPEG decode + PIL transforms per image, the
    reference code's pipeline.

Printed (measured here, nothing else):
* the picture cache of the device path: size, and the time to fill it with ``--workers``
  processes (a fresh cache each run);
* per-image read costs in one process (best of three passes after a warm-up pass);
* the device augmentation alone (one loaded batch, on the device);
* the optimizer alone: ``fit`` on a batch-sized tensor dataset already on the device;
* per pipeline, the loader alone (the training loop with a step that does nothing: batches read,
  moved and, for (device), augmented) and end to end (``balanced_sam.experiment.run_training``,
  the library call of ``bsam train``), each in img/s over the epochs after the first (the first
  pays for worker start-up, CUDA kernels selection and, for (cache), the cache's filling);
* the ratios: loader / optimizer, end to end / optimizer, and each pipeline end to end against
  (jpeg). On CUDA, whether (device) reaches the issue's goal of 4,000 img/s end to end.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
AGEDB_TRAIN_ROWS = 12208
GOAL_IMG_S = 4000  # issue 13: AgeDB-DIR BSAM end to end in bf16 on one H100
PARTS = ("reads", "augment", "optimizer", "loader", "end-to-end")
PIPELINES = {
    "device": ("(device) uint8 cache + BatchAugment on the device", "device", True),
    "cache": ("(cache) cached squares + PIL transforms, workers", "cpu", True),
    "jpeg": ("(jpeg) JPEG + PIL transforms, workers", "cpu", False),
}
DEFAULT_CSVS = tuple(base / "shared" / "data" / "agedb.csv"
                     for base in (REPO, REPO.parent, REPO.parent.parent))


# ----------------------------------------------------------------------------- stand-in data
def read_split(csv_path: Path) -> tuple[np.ndarray, list[str]]:
    """Ages and paths of the ``split == "train"`` rows of an ``age,path,split`` CSV."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"age", "path", "split"} - set(reader.fieldnames or ())
        if missing:
            raise SystemExit(f"--csv {csv_path}: expected columns age,path,split, "
                             f"found {reader.fieldnames}")
        rows = [(float(r["age"]), r["path"]) for r in reader if r["split"] == "train"]
    if not rows:
        raise SystemExit(f"--csv {csv_path} has no 'train' rows")
    return np.asarray([a for a, _ in rows], dtype=np.float32), [p for _, p in rows]


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def _pool_map(fn: Callable[[Any], Any], jobs: Sequence[Any], processes: int) -> list[Any]:
    if processes <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(
            processes) as pool:
        return pool.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * processes)))


def make_root(root: Path, ages: np.ndarray, paths: list[str], h: int, w: int,
              processes: int) -> tuple[float, float]:
    """Write the stand-in AgeDB-DIR root (JPEGs already there are reused) and its
    ``agedb.csv`` (training rows only); returns the mean JPEG size in KB and the seconds."""
    t0 = time.perf_counter()
    jobs = [(str(root / p), h, w, i) for i, p in enumerate(paths)]
    _pool_map(_write_jpeg, [j for j in jobs if not os.path.exists(j[0])], processes)
    with open(root / "agedb.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["age", "path", "split"])
        out.writerows([f"{a:g}", p, "train"] for a, p in zip(ages.tolist(), paths))
    kb = float(np.mean([os.path.getsize(j[0]) for j in jobs])) / 1024
    return kb, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the runs
def spec_for(args: argparse.Namespace, root: Path, cache: Path, pipeline: str
             ) -> dict[str, Any]:
    """The ``bsam train`` config of one pipeline (the recipe's, sized by the arguments)."""
    _, augment, cached = PIPELINES[pipeline]
    model = ({"name": "small-cnn", "in_channels": 3, "channels": [8], "hidden": 16,
              "input_size": args.img_size} if args.model == "small-cnn" else {"name": args.model})
    return {
        "model": model,
        "data": {"name": "agedb", "root": str(root), "img_size": args.img_size,
                 "cache": str(cache) if cached else False, "augment": augment,
                 "verify": "none"},
        "train": {"method": "bsam", "epochs": args.epochs, "batch_size": args.batch_size,
                  "eval_batch_size": args.batch_size, "num_workers": args.workers,
                  "prefetch_factor": args.prefetch, "amp": args.amp,
                  "channels_last": args.channels_last, "device": str(args.device),
                  "seed": args.seed, "progress": False, "checkpoint": "none"},
    }


def _rate(seconds: Sequence[float], images: int) -> float:
    """img/s over the epochs after the first (all of them when there is one)."""
    timed = list(seconds[1:]) or list(seconds)
    return images * len(timed) / sum(timed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(spec: dict[str, Any], out: Path, lines: list[str]) -> dict[str, Any]:
    """``run_training`` (what ``bsam train`` calls); img/s of the training epochs."""
    from balanced_sam.experiment import run_training

    res = run_training(spec, out=out, overwrite=True, log=lines.append)
    n = _train_size(spec)
    secs = [row["seconds"] for row in res.history]
    return {"epoch_seconds": secs, "end_to_end_img_s": _rate(secs, n),
            "last_loss": float(res.history[-1]["train_loss"]), "config": res.config}


def _train_size(spec: dict[str, Any]) -> int:
    with open(Path(spec["data"]["root"]) / "agedb.csv") as f:
        return sum(1 for _ in f) - 1


def loader_alone(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The training loop's data path without the model: ``train_one_epoch`` with a step that
    does nothing, over the loader and device pipeline ``fit`` builds for this config."""
    from balanced_sam.data.loader import EpochLoader
    from balanced_sam.device_pipeline import device_pipeline
    from balanced_sam.experiment import build_experiment
    from balanced_sam.train import train_one_epoch

    exp = build_experiment(spec)
    cfg = exp.cfg
    amp, channels_last = _decided(spec, device)
    pipe = device_pipeline(exp.train, device, seed=cfg.seed, amp=amp,
                           channels_last=channels_last, processes=max(1, cfg.num_workers),
                           log=lambda s: None)
    data = pipe.train if pipe is not None else exp.train
    loader = EpochLoader(data, cfg.batch_size, shuffle=True, seed=cfg.seed,
                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                         prefetch_factor=cfg.prefetch_factor)
    zero = torch.zeros((), device=device)
    seen: list[torch.Tensor] = []

    def step(loss_fn: Any, y: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen[:] = [y]
        return zero

    secs = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        train_one_epoch(exp.model, data, step, cfg, epoch=epoch, device=device, loader=loader,
                        batch_transform=None if pipe is None else pipe.train_batch)
        sync(device)
        secs.append(time.perf_counter() - t0)
    assert seen and seen[0].device.type == device.type
    return {"loader_epoch_seconds": secs, "loader_img_s": _rate(secs, len(data))}


def _decided(spec: dict[str, Any], device: torch.device) -> tuple[str, bool]:
    """``(amp, channels_last)`` for the loader-only figures: ``amp`` as ``fit`` decides it;
    ``channels_last: auto`` by the static guess (on for CUDA), since ``fit`` measures the layout
    on its model (the end-to-end rows, and 'bsam train decided', say what it chose)."""
    from balanced_sam.device_pipeline import auto_settings

    return auto_settings(spec["train"]["amp"], spec["train"]["channels_last"], device)


def optimizer_alone(spec: dict[str, Any], args: argparse.Namespace, device: torch.device
                    ) -> dict[str, Any]:
    """``fit`` on ``--opt-batches`` pre-made batches (tensors already on the device): the
    model, BSAM and the loop, without reading data."""
    from balanced_sam.experiment import build_experiment
    from balanced_sam.train import fit

    exp = build_experiment(spec)
    n = args.batch_size * args.opt_batches
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n, 3, args.img_size, args.img_size, generator=g)
    idx = torch.randint(0, len(exp.train), (n,), generator=g)
    y = exp.train.targets[idx]
    res = fit(exp.model, (x.to(device), y.to(device)), None, exp.bins, exp.cfg,
              target_scaler=exp.target_scaler, log=lambda s: None)
    secs = [row["seconds"] for row in res.history]
    return {"optimizer_epoch_seconds": secs, "optimizer_img_s": _rate(secs, n),
            "optimizer_s_per_step": sum(secs[1:] or secs) / (len(secs[1:] or secs)
                                                           * args.opt_batches),
            "optimizer_loss": float(res.history[-1]["train_loss"])}


def augment_alone(spec: dict[str, Any], args: argparse.Namespace, device: torch.device
                  ) -> float:
    """img/s of ``DevicePipeline.train_batch`` on one loaded batch (the copy included)."""
    from balanced_sam.device_pipeline import device_pipeline
    from balanced_sam.experiment import build_experiment

    exp = build_experiment(spec)
    amp, channels_last = _decided(spec, device)
    pipe = device_pipeline(exp.train, device, amp=amp, channels_last=channels_last,
                           log=lambda s: None)
    assert pipe is not None
    batch = torch.utils.data.default_collate([pipe.train[i] for i in range(args.batch_size)])
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    for step in range(2):
        pipe.train_batch(batch, epoch=0, step=step)
    sync(device)
    t0 = time.perf_counter()
    for step in range(args.aug_steps):
        x, _ = pipe.train_batch(batch, epoch=1, step=step)
    sync(device)
    assert x.shape == (args.batch_size, 3, args.img_size, args.img_size)
    return args.aug_steps * args.batch_size / (time.perf_counter() - t0)


def per_image_reads(root: Path, cache: Path, args: argparse.Namespace) -> dict[str, float]:
    """Images per second of each read path in this process, over ``--reads`` images: the best
    of three passes after a warm-up pass (the one least disturbed by other work)."""
    from balanced_sam.data import agedb
    from balanced_sam.data.images import open_rgb

    dev = agedb.build_splits(root, img_size=args.img_size, cache=cache, augment="device",
                             verify="none")["train"]
    pics = dev.pictures(max(1, args.workers))
    jpeg = agedb.build_splits(root, img_size=args.img_size, augment="cpu",
                              verify="none")["train"]
    cached = agedb.build_splits(root, img_size=args.img_size, cache=cache, augment="cpu",
                                verify="none")["train"]
    idx = np.random.default_rng(args.seed).permutation(len(dev))[:args.reads].tolist()
    for i in idx:
        cached.load_image(i)  # fill the squares these reads use

    def rate(fn: Callable[[int], Any]) -> float:
        for i in idx:
            fn(i)
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for i in idx:
                fn(i)
            best = min(best, time.perf_counter() - t0)
        return len(idx) / best

    torch.manual_seed(args.seed)
    return {
        "jpeg_decode": rate(lambda i: open_rgb(root / dev.paths[i])),
        "jpeg_decode_resize": rate(dev.picture_record),
        "device_cached_picture": rate(lambda i: pics[i]),
        "cpu_jpeg_sample": rate(lambda i: jpeg[i]),
        "cpu_cached_sample": rate(lambda i: cached[i]),
    }


# ----------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    ap.add_argument("--csv", default=None, help="AgeDB-DIR split CSV (age,path,split); default: "
                    "shared/data/agedb.csv (or ../, ../../) relative to the repository, if "
                    "present")
    ap.add_argument("--limit", type=int, default=None, help="use the first N training rows")
    ap.add_argument("--picture", default=None, help="stand-in JPEG size HxW (240x200)")
    ap.add_argument("--data-dir", default=None, help="keep the JPEGs here (default: temp)")
    ap.add_argument("--batch-size", type=int, default=None, help="batch size (256)")
    ap.add_argument("--img-size", type=int, default=None, help="network input side (224)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers and cache-filling processes (default: CPU cores "
                    "- 2, at most 14)")
    ap.add_argument("--prefetch", type=int, default=2, help="DataLoader prefetch_factor")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs per figure; the first is not timed (3)")
    ap.add_argument("--opt-batches", type=int, default=None,
                    help="batches per epoch of the optimizer alone (8)")
    ap.add_argument("--aug-steps", type=int, default=None,
                    help="timed batches of the augmentation alone (20)")
    ap.add_argument("--amp", choices=["auto", "none", "bf16"], default="auto",
                    help="train.amp (auto: bf16 on CUDA, none on CPU)")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                    help="train.channels_last (auto: the run times both, keeps the faster)")
    ap.add_argument("--model", choices=["resnet18", "small-cnn"], default=None,
                    help="the recipe's resnet18 (default), or a small CNN (--smoke)")
    ap.add_argument("--pipelines", default=",".join(PIPELINES),
                    help=f"input pipelines, comma-separated from {','.join(PIPELINES)}")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"what to measure, comma-separated from {','.join(PARTS)} (default: all)")
    ap.add_argument("--reads", type=int, default=None,
                    help="images for the per-image read costs (300)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU run for the tests (seconds): 24 pictures 24x20, 16 px, batch "
                    "4, 2 epochs, no workers, a small CNN, unless given")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = ap.parse_args(argv)
    defaults = dict(picture="240x200", batch_size=256, img_size=224, epochs=3, opt_batches=8,
                    aug_steps=20, reads=300, model="resnet18")
    if args.smoke:
        defaults.update(device="cpu", limit=24, picture="24x20", batch_size=4, img_size=16,
                        epochs=2, opt_batches=2, aug_steps=2, workers=0, reads=8,
                        model="small-cnn")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.workers is None:
        args.workers = max(0, min(14, (os.cpu_count() or 1) - 2))
    try:
        h, w = (int(v) for v in args.picture.lower().split("x"))
    except ValueError:
        ap.error(f"--picture must be HxW, e.g. 240x200, got {args.picture!r}")
    if h < 1 or w < 1:
        ap.error("--picture sides must be positive")
    args.picture_hw = (h, w)
    for name in ("batch_size", "img_size", "epochs", "prefetch", "reads", "opt_batches",
                 "aug_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        ap.error("--workers must be >= 0")
    args.channels_last = {"auto": "auto", "on": True, "off": False}[args.channels_last]
    for what, known in (("parts", PARTS), ("pipelines", tuple(PIPELINES))):
        chosen = [p.strip() for p in getattr(args, what).split(",") if p.strip()]
        unknown = sorted(set(chosen) - set(known))
        if unknown or not chosen:
            ap.error(f"--{what} must name some of {','.join(known)}, got {unknown or 'nothing'}")
        setattr(args, what, chosen)
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
    if args.threads:
        torch.set_num_threads(args.threads)
    csv_path = find_csv(args.csv)
    if csv_path is not None:
        ages, paths = read_split(csv_path)
    else:
        ages = synthetic_ages(AGEDB_TRAIN_ROWS)
        paths = [f"AgeDB/{i:06d}_stand_in.jpg" for i in range(len(ages))]
    n = len(ages) if args.limit is None else min(args.limit, len(ages))
    if n < args.batch_size:
        raise SystemExit(f"only {n} training images for a batch of {args.batch_size}")
    tmp = None
    root = Path(args.data_dir) if args.data_dir else Path(tmp := tempfile.mkdtemp(prefix="bsam-"))
    try:
        return run(args, device, root, ages[:n].copy(), paths[:n], csv_path)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, device: torch.device, root: Path, ages: np.ndarray,
        paths: list[str], csv_path: Path | None) -> dict[str, Any]:
    import PIL.Image  # noqa: F401  (imports before any timing)
    import torchvision.transforms.functional  # noqa: F401

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    n, bsz = len(ages), args.batch_size
    h, w = args.picture_hw
    side = round(args.img_size * 256 / 224)
    print(f"device {device} ({name}), torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} torch threads")
    print(f"model {args.model}, batch {bsz}, {args.img_size} px, amp {args.amp}, channels_last "
          f"{args.channels_last}, workers {args.workers}, prefetch {args.prefetch}, "
          f"{args.epochs} epochs per figure (the first untimed)")
    split = (f"the training rows of {csv_path}" if csv_path else
             f"a synthetic long-tailed split of {AGEDB_TRAIN_ROWS} training labels")
    print(f"labels: {split}; images: {n}")
    kb, t_jpeg = make_root(root, ages, paths, h, w, max(1, args.workers))
    print(f"stand-in AgeDB-DIR root: {n} JPEGs {h}x{w} (mean {kb:.1f} KB) ready in "
          f"{t_jpeg:.1f} s")
    cache = root / "bsam-cache"
    shutil.rmtree(cache, ignore_errors=True)  # every run measures the fill
    res: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "picture_hw"},
        "device_name": name, "torch": torch.__version__, "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "split_csv": str(csv_path) if csv_path else None, "images": n, "cache_side": side,
        "jpeg_kb": kb, "pipelines": {},
    }
    specs = {p: spec_for(args, root, cache, p) for p in args.pipelines}
    dev_spec = specs.get("device") or spec_for(args, root, cache, "device")

    # the picture cache of the device path, filled up front by --workers processes
    from balanced_sam.data import agedb

    train = agedb.build_splits(root, img_size=args.img_size, cache=cache, augment="device",
                               verify="none")["train"]
    fill = train.pictures(max(1, args.workers)).fill_report
    mib = n * train.store.record_bytes / 2**20
    res["cache_fill"] = {**fill, "img_s": n / fill["seconds"], "mib": mib,
                         "processes": min(max(1, args.workers), n)}
    print(f"picture cache (device path): {n} x {side}x{side}x3 uint8 + sizes ({mib:.0f} MiB) "
          f"filled in {fill['seconds']:.1f} s = {res['cache_fill']['img_s']:.0f} img/s with "
          f"{res['cache_fill']['processes']} process(es)")

    if "reads" in args.parts:
        reads = per_image_reads(root, cache, args)
        res["reads_img_s"] = reads
        print("\nper-image reads, one process (img/s):")
        for k, label in [("jpeg_decode", f"JPEG {h}x{w} decode"),
                         ("jpeg_decode_resize", f"JPEG decode + resize to {side} (cache fill)"),
                         ("device_cached_picture", "device path: one cached uint8 picture"),
                         ("cpu_jpeg_sample", "cpu path: JPEG + PIL transforms"),
                         ("cpu_cached_sample", "cpu path: cached square + PIL transforms")]:
            print(f"  {label:<52}{reads[k]:>10.0f}")
    if "augment" in args.parts:
        res["device_aug_img_s"] = augment_alone(dev_spec, args, device)
        print(f"\ndevice augmentation alone (DevicePipeline.train_batch on {device}, uint8 "
              f"{side} px -> {args.img_size} px): {res['device_aug_img_s']:.0f} img/s")
    opt = None
    if "optimizer" in args.parts:
        res.update(optimizer_alone(dev_spec, args, device))
        opt = res["optimizer_img_s"]
        print(f"\noptimizer alone (fit on {args.opt_batches} batches already on {device}): "
              f"{opt:.0f} img/s ({1000 * res['optimizer_s_per_step']:.1f} ms/step)")

    for p in args.pipelines:
        fig: dict[str, Any] = {}
        if "loader" in args.parts:
            fig.update(loader_alone(specs[p], device))
        if "end-to-end" in args.parts:
            lines: list[str] = []
            fig.update(end_to_end(specs[p], root / f"run-{p}", lines))
            fig["log"] = [ln for ln in lines if ln.startswith("augment")]
        if opt:
            for key, ratio in (("loader_img_s", "loader_over_optimizer"),
                               ("end_to_end_img_s", "end_to_end_over_optimizer")):
                if key in fig:
                    fig[ratio] = fig[key] / opt
        res["pipelines"][p] = fig
    _report(res, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return res


def _report(res: dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
    figs = res["pipelines"]
    if not figs or not any(figs.values()):
        return

    def cell(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    decided = next((f["config"] for f in figs.values() if "config" in f), None)
    if decided:
        print(f"\nbsam train decided: amp {decided['amp']}, channels_last "
              f"{decided['channels_last']}")
    print(f"\n{'pipeline':<52}{'loader':>9}{'end to end':>12}{'loader/opt':>12}{'e2e/opt':>9}")
    print(f"{'':<52}{'img/s':>9}{'img/s':>12}")
    for p, fig in figs.items():
        print(f"{PIPELINES[p][0]:<52}{cell(fig.get('loader_img_s'), '.0f'):>9}"
              f"{cell(fig.get('end_to_end_img_s'), '.0f'):>12}"
              f"{cell(fig.get('loader_over_optimizer'), '.2f'):>12}"
              f"{cell(fig.get('end_to_end_over_optimizer'), '.2f'):>9}")
    for key, what in (("end_to_end_img_s", "end to end"), ("loader_img_s", "loader")):
        base = figs.get("jpeg", {}).get(key)
        ratios = {p: f[key] / base for p, f in figs.items()
                  if base and key in f and p != "jpeg"}
        if ratios:
            res[f"speedup_{key.replace('_img_s', '')}"] = ratios
            print(f"{what} against (jpeg): " + ", ".join(f"({p}) {r:.2f}x"
                                                         for p, r in ratios.items()))
    e2e = figs.get("device", {}).get("end_to_end_img_s")
    if device.type == "cuda" and e2e is not None:
        met = e2e >= GOAL_IMG_S
        res["goal_met"] = met
        print(f"goal (issue 13): (device) end to end >= {GOAL_IMG_S} img/s: {e2e:.0f} -> "
              f"{'met' if met else 'NOT met'}")
    if device.type == "cpu":
        print("(CPU figures: the loader's workers, the augmentation and the model share the "
              "CPU's cores)")


if __name__ == "__main__":
    main()
    sys.exit(0)
