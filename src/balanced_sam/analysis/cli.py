"""``bsam analyze``: Table 8 (sharpness per region) and Figure 1 (landscapes) for checkpoints.

For every checkpoint (written by ``bsam train`` or ``bsam bench``) the model and its data are
rebuilt from the checkpoint; for every requested region, at most ``--samples`` samples of the
chosen split are drawn (a fixed seed; ``all`` is a uniform draw, so it keeps the split's label
mix) and :func:`~balanced_sam.analysis.analyze_model` measures the Hessian's top eigenvalue and
trace of the region's mean *training* loss, and a loss landscape along directions that are the
same for every region and every checkpoint of the same architecture (same seed).

The loss is the one the model was trained with, in the units it was trained in: a model that
learned standardised targets is analysed on the standardised loss (its outputs are mapped back
to the label units only for the MAE shown in the landscapes).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from balanced_sam._compat import region_thresholds

__all__ = ["run_analyze", "OriginalUnits"]


class OriginalUnits(nn.Module):
    """Wrap a model that predicts standardised targets so it predicts in label units."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.std + self.mean


def _loss_in_training_units(loss: str, std: float) -> Callable[[torch.Tensor, torch.Tensor],
                                                                torch.Tensor]:
    """Per-sample training loss computed from predictions and targets in label units."""
    if loss not in ("l1", "mse"):
        raise ValueError(f"bsam analyze supports models trained with the l1 or mse loss, not "
                         f"{loss!r} (a batch-coupled loss has no per-sample Hessian)")

    def fn(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = (p - t) / std
        return e.abs() if loss == "l1" else e.square()

    fn.__name__ = f"training {loss.upper()}"  # the plots' axis label
    return fn


def _labels_of(data: Any) -> torch.Tensor:
    if isinstance(data, (tuple, list)):
        return data[1]
    for attr in ("ages", "targets", "labels"):
        if hasattr(data, attr):
            return torch.as_tensor(getattr(data, attr)).float()
    raise ValueError("bsam analyze needs per-sample labels; this dataset does not expose them "
                     "(dense depth targets are not supported by the analysis)")


def _take(data: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)):
        return data[0][idx], data[1][idx]
    items = [data[int(i)] for i in idx]
    return torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1])
                                                             for it in items]).float()


def _subset(labels: torch.Tensor, bins: Any, region: str, n: int, seed: int, many: int,
            few: int) -> torch.Tensor:
    if region == "all":
        pool = torch.arange(len(labels))
    else:
        pool = torch.nonzero(bins.region_mask(labels, region, many, few, clamp=True)).reshape(-1)
    g = torch.Generator().manual_seed(seed)
    if len(pool) > n:
        pool = pool[torch.randperm(len(pool), generator=g)[:n]].sort().values
    return pool


def run_analyze(args: argparse.Namespace) -> int:
    from balanced_sam.analysis import Landscape, analyze_model, format_sharpness_table
    from balanced_sam.analysis.report import _slug
    from balanced_sam.bench import write_json
    from balanced_sam.experiment import model_from_checkpoint
    from balanced_sam.train import load_checkpoint, resolve_device

    if not (args.hessian or args.landscape):
        args.hessian = args.landscape = True
    bad = sorted(set(args.regions) - {"all", "many", "medium", "few"})
    if bad:
        raise ValueError(f"--regions: unknown region(s) {bad}; use all, many, medium, few")
    if args.samples < 1:
        raise ValueError("--samples must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    items = []
    for spec in args.checkpoint:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        items.append((name, Path(path)))
    out = Path(args.out) if args.out else items[0][1].parent / "analysis"
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {}
    landscapes: dict[str, Landscape] = {}
    for name, path in items:
        ck = load_checkpoint(path, map_location="cpu")
        cfg = ck.get("config", {})
        exp = model_from_checkpoint(ck, args.overrides, device)
        if exp.depth:
            raise ValueError(f"{path}: dense depth targets are not supported by bsam analyze")
        name = name or cfg.get("method", path.stem)
        if name in results:
            name = f"{name} ({path.parent.name})"
        data = {"train": exp.train, "val": exp.val, "test": exp.test}[args.split]
        if data is None:
            raise ValueError(f"{path}: this benchmark has no {args.split} split")
        labels = _labels_of(data)
        mean, std = exp.target_stats if exp.target_stats else (0.0, 1.0)
        model = OriginalUnits(exp.model, mean, std).to(device).eval()
        loss_fn = _loss_in_training_units(cfg.get("loss", "l1"), std)
        many, few = region_thresholds(exp.bins, cfg.get("many"), cfg.get("few"))
        merged: dict[str, Any] = {"regions": {}, "checkpoint": str(path),
                                  "split": args.split, "method": cfg.get("method")}
        parts: list[Landscape] = []
        print(f"{name}: {path} ({args.split} split)")
        for region in args.regions:
            idx = _subset(labels, exp.bins, region, args.samples, args.seed, many, few)
            if len(idx) == 0:
                print(f"  {region}: no sample in the {args.split} split")
                merged["regions"][region] = {"count": 0}
                continue
            x, y = _take(data, idx)
            res = analyze_model(
                model, x, y, exp.bins, loss_fn, regions=(region,), hessian=args.hessian,
                landscape=args.landscape, out_dir=out / _slug(name) / region, iters=args.iters,
                tol=args.tol, method=args.method, probes=args.probes, grid=args.grid,
                span=args.span, landscape_dim=args.dim, seed=args.seed,
                progress=sys.stderr.isatty(), many=many, few=few,
                name=f"{name} [{region}]", plots=False, cache_graph=args.cache_graph)
            merged["regions"][region] = res["regions"][region]
            if args.landscape and res.get("landscape", {}).get("npz"):
                parts.append(Landscape.load(res["landscape"]["npz"]))
            r = res["regions"][region]
            print(f"  {region}: n={r.get('count')}  lambda_max={_fmt(r.get('lambda_max'))}  "
                  f"trace={_fmt(r.get('trace'))}")
        if parts:
            landscapes[name] = _merge(parts, name)
            landscapes[name].save_npz(out / f"{_slug(name)}_landscape.npz")
        results[name] = merged

    write_json(results, out / "analysis.json")
    if args.hessian:
        table = format_sharpness_table(results, regions=args.regions)
        print(f"\nHessian of the training loss per region ({args.split} split, up to "
              f"{args.samples} samples per region; Table 8 style)")
        print(table)
        (out / "sharpness_table.md").write_text(table + "\n")
    if landscapes:
        from balanced_sam.analysis.plots import plot_region_comparison

        cols = [r for r in ("all", "few") if r in args.regions] or list(args.regions)
        fig = plot_region_comparison(landscapes, out / "landscapes.png", regions=cols,
                                     metric="loss",
                                     title=f"Loss landscape ({args.split} split), all vs few")
        print(f"wrote {fig}")
    print(f"wrote {out}/analysis.json")
    return 0


def _merge(parts: list[Any], name: str) -> Any:
    from balanced_sam.analysis import Landscape

    first = parts[0]
    for p in parts[1:]:
        if not (np.array_equal(p.alphas, first.alphas)
                and (p.betas is None) == (first.betas is None)):
            raise RuntimeError("landscape grids differ between regions")
    values, counts, origin = {}, {}, {}
    for p in parts:
        values.update(p.values)
        counts.update(p.counts)
        origin.update(p.origin)
    return Landscape(first.alphas, first.betas, values, counts, origin,
                     {**first.meta, "label": name})


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"
