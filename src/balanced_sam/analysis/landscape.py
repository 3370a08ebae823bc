r"""Loss landscapes along random filter-normalised directions (Li et al., NeurIPS 2018).

For trained parameters :math:`\theta^*` and directions :math:`\delta, \eta` the slices are

.. math:: f(\alpha) = L(\theta^* + \alpha\delta), \qquad
          f(\alpha, \beta) = L(\theta^* + \alpha\delta + \beta\eta).

Directions ("Visualizing the Loss Landscape of Neural Nets", Sec. 4, and its ``ignore='biasbn'``
setting): every entry is drawn from :math:`N(0, 1)` by a seeded CPU :class:`torch.Generator`;
for each parameter tensor with two or more dimensions (conv / linear weights) every *filter* --
each slice :math:`d_j` along dim 0 -- is rescaled to the norm of the matching filter of the
weights, :math:`d_j \leftarrow d_j \, \|w_j\| / (\|d_j\| + 10^{-10})`; parameters with one
dimension or none (biases, BatchNorm/LayerNorm weights and biases) get a zero direction, so they
stay at their trained values. ``norm="layer"`` rescales whole tensors instead and ``norm="none"``
keeps the raw Gaussian; ``ignore=None`` uses the weights themselves as the direction of 1-D
parameters (as the paper's code does).

Evaluation: the model runs in eval mode, so BatchNorm uses its running statistics, which are not
recomputed at the perturbed points (as in Li et al.); buffers are never touched. At each grid point
the parameters are set by copying :math:`\theta^*` back and adding the scaled directions
(:math:`\theta^* + 0\cdot\delta` is :math:`\theta^*` bit for bit), every sample is forwarded once,
and the per-sample loss and absolute error are reduced over the mask of every requested region,
so the regions share the directions, the grid and the forward passes. The parameters are copied
back exactly at the end, also when an error interrupts the sweep.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from balanced_sam.analysis._common import (
    Data,
    LossFn,
    Subset,
    checked_regions,
    eval_mode,
    resolve_loss,
    sample_losses,
)
from balanced_sam.bins import LabelBins
from balanced_sam.io import progress_bar, read_json, to_json, write_json

__all__ = [
    "Landscape",
    "random_direction",
    "normalize_direction",
    "loss_landscape",
    "METRICS",
]

METRICS = ("loss", "mae")
NORMS = ("filter", "layer", "none")


# ---------------------------------------------------------------------------------- directions
def normalize_direction(direction: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                        norm: str = "filter", ignore: str | None = "biasbn") -> None:
    """Rescale ``direction`` in place, tensor by tensor, against ``weights`` (see module doc).

    ``norm``: ``"filter"`` (each slice along dim 0 gets its weight slice's norm), ``"layer"`` (each
    tensor gets its weight tensor's norm) or ``"none"``. ``ignore="biasbn"`` zeroes the direction of
    tensors with fewer than two dimensions; ``ignore=None`` sets it to the weights.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if ignore not in ("biasbn", None):
        raise ValueError(f"ignore must be 'biasbn' or None, got {ignore!r}")
    if len(direction) != len(weights):
        raise ValueError("direction and weights must hold the same number of tensors")
    with torch.no_grad():
        for d, w in zip(direction, weights):  # per tensor: the filters of one tensor at once
            if d.shape != w.shape:
                raise ValueError(f"direction shape {tuple(d.shape)} != weight {tuple(w.shape)}")
            if w.dim() <= 1:
                if ignore == "biasbn":
                    d.zero_()
                else:
                    d.copy_(w)
            elif norm == "filter":
                wn = w.detach().reshape(w.shape[0], -1).norm(dim=1)
                dn = d.reshape(d.shape[0], -1).norm(dim=1)
                d.mul_((wn / (dn + 1e-10)).reshape(-1, *([1] * (d.dim() - 1))))
            elif norm == "layer":
                d.mul_(w.detach().norm() / (d.norm() + 1e-10))


def random_direction(model: nn.Module | Sequence[torch.Tensor], seed: int | torch.Generator = 0,
                     norm: str = "filter", ignore: str | None = "biasbn") -> list[torch.Tensor]:
    """A random Gaussian direction over all parameters of ``model`` (or a list of tensors),
    normalised by :func:`normalize_direction`; one tensor per parameter, on its device and dtype.

    The entries are drawn in float64 on the CPU from ``torch.Generator().manual_seed(seed)``
    (or the generator given), in parameter order, so the direction does not depend on the device.
    """
    weights = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    total = sum(w.numel() for w in weights)
    flat = torch.randn(total, generator=gen, dtype=torch.float64)
    direction = [c.view(w.shape).to(device=w.device, dtype=w.dtype)
                 for c, w in zip(flat.split([w.numel() for w in weights]), weights)]
    normalize_direction(direction, [w.detach() for w in weights], norm, ignore)
    return direction


# ---------------------------------------------------------------------------------- result
@dataclass
class Landscape:
    """Loss and MAE on a 1-D or 2-D grid, per region.

    Attributes:
        alphas: grid along the first direction, shape ``(A,)``.
        betas: grid along the second direction, shape ``(B,)``; ``None`` for a 1-D slice.
        values: ``values[region][metric]`` with metric ``"loss"`` (the subset-mean loss) or
            ``"mae"`` (mean absolute error in the targets' units): shape ``(A,)`` or ``(A, B)``
            (index ``[i, j]`` is ``alphas[i], betas[j]``); NaN for a region without samples.
        counts: samples per region.
        origin: ``origin[region][metric]`` at the trained parameters.
        meta: settings (seed, norm, ignore, loss name, number of parameters, label, ...).
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    values: dict[str, dict[str, np.ndarray]]
    counts: dict[str, int]
    origin: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return 1 if self.betas is None else 2

    @property
    def regions(self) -> list[str]:
        return list(self.values)

    def minimum(self, region: str = "all", metric: str = "loss") -> dict[str, Any]:
        """The grid point where ``metric`` is smallest for ``region``: its coordinates and every
        metric there (``{"alpha", "beta", "index", "loss", "mae"}``; NaN values for an empty
        region)."""
        if region not in self.values:
            raise KeyError(f"no region {region!r} in this landscape (have {self.regions})")
        arr = self.values[region][metric]
        if not np.isfinite(arr).any():
            return {"alpha": math.nan, "beta": None if self.dim == 1 else math.nan, "index": None,
                    **{m: math.nan for m in self.values[region]}}
        idx = np.unravel_index(int(np.nanargmin(arr)), arr.shape)
        out: dict[str, Any] = {"alpha": float(self.alphas[idx[0]]),
                               "beta": None if self.betas is None else float(self.betas[idx[1]]),
                               "index": [int(i) for i in idx]}
        out.update({m: float(v[idx]) for m, v in self.values[region].items()})
        return out

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form; NaN becomes ``None`` (valid JSON)."""
        return {
            "alphas": self.alphas.tolist(),
            "betas": None if self.betas is None else self.betas.tolist(),
            "values": to_json({r: {m: np.asarray(v, dtype=np.float64) for m, v in d.items()}
                               for r, d in self.values.items()}),
            "counts": dict(self.counts),
            "origin": to_json(self.origin),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Landscape:
        def arr(x: Any) -> np.ndarray:  # numpy reads None as NaN in a float array
            return np.asarray(x, dtype=np.float64)

        return cls(
            alphas=np.asarray(d["alphas"], dtype=np.float64),
            betas=None if d.get("betas") is None else np.asarray(d["betas"], dtype=np.float64),
            values={r: {m: arr(v) for m, v in mv.items()} for r, mv in d["values"].items()},
            counts={r: int(c) for r, c in d["counts"].items()},
            origin={r: {m: math.nan if v is None else float(v) for m, v in mv.items()}
                    for r, mv in d.get("origin", {}).items()},
            meta=dict(d.get("meta", {})),
        )

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json(self.to_dict(), path)

    @classmethod
    def load_json(cls, path: str | Path) -> Landscape:
        return cls.from_dict(read_json(path))

    def save_npz(self, path: str | Path) -> Path:
        """Arrays as ``alphas``, ``betas`` (empty for 1-D), ``values/<region>/<metric>``; counts,
        origin and meta as a JSON string under ``info``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "alphas": self.alphas,
            "betas": np.zeros(0) if self.betas is None else self.betas,
        }
        for r, mv in self.values.items():
            for m, v in mv.items():
                arrays[f"values/{r}/{m}"] = np.asarray(v)
        info = {"dim": self.dim, "counts": self.counts,
                "origin": self.to_dict()["origin"], "meta": self.meta,
                "regions": list(self.values)}
        arrays["info"] = np.asarray(json.dumps(info))
        with path.open("wb") as fh:  # a file handle keeps numpy from appending ".npz"
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> Landscape:
        with np.load(Path(path), allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            values: dict[str, dict[str, np.ndarray]] = {r: {} for r in info["regions"]}
            for key in z.files:
                if key.startswith("values/"):
                    _, r, m = key.split("/", 2)
                    values.setdefault(r, {})[m] = z[key]
            return cls(
                alphas=z["alphas"],
                betas=None if info["dim"] == 1 else z["betas"],
                values=values,
                counts={r: int(c) for r, c in info["counts"].items()},
                origin={r: {m: math.nan if v is None else float(v) for m, v in mv.items()}
                        for r, mv in info["origin"].items()},
                meta=info["meta"],
            )

    @classmethod
    def load(cls, path: str | Path) -> Landscape:
        """Load a ``.npz`` or ``.json`` file written by :meth:`save_npz` / :meth:`save_json`."""
        return cls.load_json(path) if str(path).endswith(".json") else cls.load_npz(path)


# ---------------------------------------------------------------------------------- sweep
def _grid(values: Sequence[float] | np.ndarray | None, steps: int, span: float, name: str
          ) -> np.ndarray:
    if values is None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not span > 0:
            raise ValueError(f"span must be > 0, got {span!r}")
        g = np.linspace(-span, span, steps)
        g[np.abs(g) < 1e-12 * span] = 0.0  # make the origin exact
    else:
        g = np.asarray(values, dtype=np.float64).reshape(-1)
        if g.size == 0 or not np.isfinite(g).all():
            raise ValueError(f"{name} must be a non-empty sequence of finite numbers")
    return g


def loss_landscape(
    model: nn.Module,
    inputs: Any,
    targets: Any = None,
    bins: LabelBins | None = None,
    regions: Sequence[str] = ("all",),
    loss_fn: LossFn | str | None = None,
    *,
    dim: int = 1,
    steps: int = 21,
    span: float = 1.0,
    alphas: Sequence[float] | np.ndarray | None = None,
    betas: Sequence[float] | np.ndarray | None = None,
    directions: Sequence[Sequence[torch.Tensor]] | None = None,
    seed: int = 0,
    norm: str = "filter",
    ignore: str | None = "biasbn",
    masks: Mapping[str, Any] | None = None,
    many: int | None = None,
    few: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
    label: str | None = None,
) -> Landscape:
    r"""Loss and MAE of ``model`` along one or two random filter-normalised directions.

    Args:
        model: the trained network (parameters restored exactly afterwards, eval mode inside).
        inputs, targets: tensors, or an iterable of ``(x, y)`` batches with ``targets=None``.
        bins: the training-label bins, needed for regions other than ``"all"``.
        regions: region names (``"all"``, ``"many"``, ``"medium"``, ``"few"``).
        loss_fn: per-sample loss (default L1).
        dim: 1 (:math:`f(\alpha)`) or 2 (:math:`f(\alpha, \beta)`).
        steps, span: default grid ``linspace(-span, span, steps)`` per axis (0 included exactly
            when ``steps`` is odd).
        alphas, betas: explicit grids (override ``steps``/``span``).
        directions: ``dim`` directions (each one tensor per parameter) to use instead of random
            ones, taken as they are (not normalised).
        seed: seed of the random directions (the second one continues the same generator).
        norm, ignore: see :func:`normalize_direction`.
        masks: extra subsets, name -> boolean mask over the samples (evaluated alongside).
        many, few: region thresholds (training counts per bin; ``None``: the bins' own).
        batch_size: samples per forward pass (tensor inputs).
        progress: a tqdm bar over the grid points.
        label: stored in ``meta["label"]`` (e.g. the method name), used by the plots.

    Returns:
        :class:`Landscape`.
    """
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 or 2, got {dim!r}")
    if betas is not None and dim == 1:
        dim = 2
    regions = checked_regions(regions, bins)
    loss, loss_name = resolve_loss(loss_fn)
    data = Data(inputs, targets, batch_size)
    ag = _grid(alphas, steps, span, "alphas")
    bg = _grid(betas, steps, span, "betas") if dim == 2 else None

    params = list(model.parameters())
    dirs = _directions(params, directions, dim, seed, norm, ignore)

    subsets: dict[str, Subset] = {r: Subset(bins, r, many=many, few=few) for r in regions}
    for name, m in (masks or {}).items():
        subsets[name] = Subset(mask=m)
    names = list(subsets)
    shape = (ag.size,) if bg is None else (ag.size, bg.size)
    points = [(a, None) for a in ag] if bg is None else [(a, b) for a in ag for b in bg]
    sums, origin_sums, counts = _sweep(model, params, dirs, points, loss, data, names, subsets,
                                       progress, dim)
    values, origin = _summaries(sums, origin_sums, counts, names, points, shape)
    if bins is not None:  # without bins there are no regions to name
        many, few = bins.thresholds(many, few)
    meta = {"seed": seed if directions is None else None, "norm": norm, "ignore": ignore,
            "loss": loss_name, "num_parameters": int(sum(p.numel() for p in params)),
            "random_directions": directions is None, "many": many, "few": few, "label": label,
            "bn": "eval mode (running statistics, not recomputed)"}
    return Landscape(ag, bg, values, {n: int(c) for n, c in zip(names, counts)}, origin, meta)


def _directions(params: list[torch.Tensor], directions: Sequence[Sequence[torch.Tensor]] | None,
                dim: int, seed: int, norm: str, ignore: str | None) -> list[list[torch.Tensor]]:
    """``dim`` random filter-normalised directions, or the given ones checked and moved."""
    if directions is None:
        gen = torch.Generator().manual_seed(int(seed))
        return [random_direction(params, gen, norm, ignore) for _ in range(dim)]
    if len(directions) != dim:
        raise ValueError(f"directions must hold {dim} direction(s), got {len(directions)}")
    dirs = []
    for d in directions:
        d = list(d)
        if len(d) != len(params) or any(a.shape != p.shape for a, p in zip(d, params)):
            raise ValueError("each direction must hold one tensor per parameter, same shapes")
        dirs.append([a.detach().to(p.device, p.dtype) for a, p in zip(d, params)])
    return dirs


def _sweep(model: nn.Module, params: list[torch.Tensor], dirs: list[list[torch.Tensor]],
           points: list[tuple[float, float | None]], loss: Any, data: Data, names: list[str],
           subsets: dict[str, Subset], progress: bool, dim: int
           ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Loss and MAE sums per grid point and subset (and at the origin when the grid misses it);
    the trained parameters are restored exactly afterwards, even after an error."""
    sums = np.zeros((len(points), len(names), 2))
    counts = np.zeros(len(names), dtype=np.int64)
    device = params[0].device if params else torch.device("cpu")
    with torch.no_grad():
        trained = [p.detach().clone() for p in params]
    origin_sums: np.ndarray | None = None
    try:
        with eval_mode(model, check_unchanged=False), torch.no_grad():
            bar = progress_bar(enumerate(points), enabled=progress, total=len(points),
                               desc=f"landscape {dim}-D")
            for k, (a, b) in bar:
                torch._foreach_copy_(params, trained)
                if a != 0.0:
                    torch._foreach_add_(params, dirs[0], alpha=float(a))
                if b is not None and b != 0.0:
                    torch._foreach_add_(params, dirs[1], alpha=float(b))
                sums[k], counts = _evaluate(model, loss, data, device, names, subsets)
            if not any(a == 0.0 and (b is None or b == 0.0) for a, b in points):
                torch._foreach_copy_(params, trained)
                origin_sums, counts = _evaluate(model, loss, data, device, names, subsets)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, trained)
    return sums, origin_sums, counts


def _summaries(sums: np.ndarray, origin_sums: np.ndarray | None, counts: np.ndarray,
               names: list[str], points: list[tuple[float, float | None]],
               shape: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Means per subset and metric on the grid, and at the origin."""
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / np.where(counts > 0, counts, np.nan)[None, :, None]
    values = {n: {m: means[:, i, j].reshape(shape) for j, m in enumerate(METRICS)}
              for i, n in enumerate(names)}
    if origin_sums is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            o = origin_sums / np.where(counts > 0, counts, np.nan)[:, None]
    else:
        k0 = next(k for k, (a, b) in enumerate(points) if a == 0.0 and (b is None or b == 0.0))
        o = means[k0]
    origin = {n: {m: float(o[i, j]) for j, m in enumerate(METRICS)} for i, n in enumerate(names)}
    return values, origin


def _evaluate(model: nn.Module, loss: LossFn, data: Data, device: torch.device,
              names: list[str], subsets: Mapping[str, Subset]) -> tuple[np.ndarray, np.ndarray]:
    """One pass: per subset, the sums of the per-sample loss and absolute error, and the counts."""
    sums = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    counts = torch.zeros(len(names), dtype=torch.int64, device=device)
    for x, y, offset in data.batches(device):
        losses, pred = sample_losses(model, loss, x, y)
        err = (pred - y).abs()
        err = err.reshape(err.shape[0], -1).mean(dim=1) if err.dim() > 1 else err
        per = torch.stack([losses, err], dim=1).to(torch.float64)          # (n, 2)
        sel = torch.stack([subsets[nm](y, offset).to(device) for nm in names])  # (R, n)
        # where() rather than a 0/1 matmul: a NaN/inf outside a region must not leak into it
        sums += torch.where(sel[:, :, None], per[None], 0.0).sum(dim=1)
        counts += sel.sum(dim=1)
    return sums.cpu().numpy(), counts.cpu().numpy()
