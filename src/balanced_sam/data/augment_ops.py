r"""The functional parts of the batched augmentations: argument checks, colour ops, random
parameters and the batched steps that :class:`~balanced_sam.data.gpu_augment.BatchAugment` and
:class:`~balanced_sam.data.gpu_augment.BatchEvalTransform` are built from.

* Argument checks: :func:`as_pair`, :func:`as_interval`, :func:`jitter_range` (``ColorJitter``'s
  reading of an argument), :func:`check_generator`, :func:`check_images`, :func:`picture_sizes`.
* Colour ops on float images in [0, 1]: :func:`rgb_to_grayscale`, :func:`adjust_brightness`,
  :func:`adjust_contrast`, :func:`adjust_saturation`, :func:`adjust_hue`.
* Random parameters, drawn on the CPU: :func:`sample_crops` (``RandomResizedCrop.get_params``
  for a batch), :func:`sample_jitter` (``ColorJitter.get_params``), :class:`AugmentParams` (one
  batch's parameters).
* Batched steps: :func:`crop_resize` (crop + resize + flip in one ``grid_sample``: built on
  :func:`crop_theta`, :func:`to_device` and :func:`resample`) and :func:`color_jitter` (ColorJitter
  with a per-sample order: :func:`jitter_plan`, :func:`host_plan`, :func:`apply_jitter`).

How each step matches torchvision, and where the randomness comes from, is told in
:mod:`balanced_sam.data.gpu_augment`, which re-exports the public names of this module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AugmentParams",
    "sample_crops",
    "sample_jitter",
    "crop_resize",
    "color_jitter",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "BRIGHTNESS",
    "CONTRAST",
    "SATURATION",
    "HUE",
]

# op ids in torchvision's ColorJitter order
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


# --------------------------------------------------------------------------- argument checks
def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An output size: a positive int ``s`` means ``(s, s)``; else a ``(height, width)`` pair."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        out = (int(value), int(value))
    elif (isinstance(value, Sequence) and len(value) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        out = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be a positive int or an (height, width) pair of ints, "
                         f"got {value!r}")
    if min(out) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out


def as_interval(value: Sequence[float], name: str) -> tuple[float, float]:
    """A ``(min, max)`` pair with ``0 < min <= max < inf`` (a crop's scale or ratio range)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not (0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"{name} must satisfy 0 < min <= max < inf, got {value!r}")
    return lo, hi


def jitter_range(value: float | Sequence[float], name: str, hue: bool = False
                 ) -> tuple[float, float]:
    """``ColorJitter``'s reading of an argument: ``v`` means ``[max(0, 1 - v), 1 + v]``
    (``[-v, v]`` for hue); a pair is used as it is."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number >= 0 or a (min, max) pair, "
                             f"got {value!r}")
        lo, hi = (-v, v) if hue else (max(0.0, 1.0 - v), 1.0 + v)
    else:
        try:
            lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number >= 0 or a (min, max) pair, "
                             f"got {value!r}") from None
        if not lo <= hi:
            raise ValueError(f"{name} must have min <= max, got {value!r}")
    if hue and not (-0.5 <= lo and hi <= 0.5):
        raise ValueError(f"{name} must lie in [-0.5, 0.5], got {value!r}")
    if not hue and lo < 0:
        raise ValueError(f"{name} factors must be >= 0, got {value!r}")
    return lo, hi


def check_generator(generator: torch.Generator | None) -> None:
    """``None`` or a CPU ``torch.Generator`` (the parameters are drawn on the CPU)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (parameters are drawn on "
                             f"the CPU), got one on {generator.device}")


def check_images(x: torch.Tensor, name: str = "x") -> None:
    """``x`` is an RGB batch ``(N, 3, H, W)``, uint8 (0-255) or floating point (0-1)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, 3, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W) (RGB), got {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"{name} must be uint8 (0-255) or floating point (0-1), got {x.dtype}")


def picture_sizes(sizes: torch.Tensor | Sequence[Sequence[int]] | None, n: int,
                  default: tuple[int, int]) -> torch.Tensor:
    """``(n, 2)`` int64 CPU tensor of picture sizes (height, width)."""
    if sizes is None:
        return torch.tensor(default, dtype=torch.int64).expand(n, 2)
    s = torch.as_tensor(sizes).detach().to("cpu")
    if s.shape != (n, 2) or s.is_floating_point() or s.is_complex() or s.dtype == torch.bool:
        raise ValueError(f"sizes must be an integer (N, 2) tensor of (height, width) with N = {n}, "
                         f"got shape {tuple(s.shape)} and dtype {s.dtype}")
    if bool((s < 1).any()):
        raise ValueError("sizes must be positive (height, width) pairs")
    return s.to(torch.int64)


def _factor(f: float | torch.Tensor, x: torch.Tensor, name: str, lo: float,
            hi: float = math.inf) -> torch.Tensor:
    """A per-sample factor in ``[lo, hi]`` as a tensor ``(N, 1, 1, 1)`` on ``x``'s device (a
    CPU tensor travels pinned and asynchronously; a device tensor is checked with one sync)."""
    t = torch.as_tensor(f).detach().to(x.dtype)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} factors must be a number or a tensor of shape "
                         f"({x.shape[0]},), got shape {tuple(t.shape)}")
    if not bool(((t >= lo) & (t <= hi)).all()):
        raise ValueError(f"{name} factors must lie in [{lo}, {hi}]")
    t = to_device(t, x.device) if t.device.type == "cpu" else t.to(x.device)
    return t.reshape(-1, 1, 1, 1)


def _float_images(x: torch.Tensor, name: str = "x") -> None:
    check_images(x, name)
    if not x.is_floating_point():
        raise ValueError(f"{name} must hold floats in [0, 1] for the colour ops, got {x.dtype}")


# --------------------------------------------------------------------------- colour ops
def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """``0.2989 R + 0.587 G + 0.114 B`` of float images ``(N, 3, H, W)`` -> ``(N, 1, H, W)``
    (torchvision's weights)."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, f: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    """``clamp(f x + (1 - f) other, 0, 1)`` (``other=None``: black) as one ``lerp``, which is
    exactly ``x`` at ``f = 1``."""
    out = x * f if other is None else torch.lerp(other, x, f)
    return out.clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Blend with black: ``clamp(f x, 0, 1)``; ``factor`` a number or one per sample."""
    _float_images(x)
    return _blend(x, _factor(factor, x, "brightness", 0.0), None)


def adjust_contrast(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Blend with the mean of each image's grayscale: ``clamp(f x + (1 - f) mean(gray))``."""
    _float_images(x)
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, _factor(factor, x, "contrast", 0.0), mean)


def adjust_saturation(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Blend with each image's grayscale: ``clamp(f x + (1 - f) gray(x))``."""
    _float_images(x)
    return _blend(x, _factor(factor, x, "saturation", 0.0), rgb_to_grayscale(x))


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of float RGB images in [0, 1] by ``turns`` ``(N, 1, 1, 1)``.

    Value ``V = max`` and chroma ``C = max - min`` do not change under a hue rotation, so the
    output is ``V - C * clamp(min(k, 4 - k), 0, 1)`` per channel with ``k = (n + 6 h') mod 6``
    and ``n = 5, 3, 1`` for R, G, B, where ``h'`` is the rotated hue in turns. Grey pixels
    (``C = 0``) come back unchanged.
    """
    r, g, b = x.unbind(1)
    vmax = x.amax(dim=1)
    chroma = vmax - x.amin(dim=1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # hue in sixths of a turn; ties resolved as R before G before B
    h = torch.where(vmax == r, (g - b) / safe,
                    torch.where(vmax == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.remainder(h + 6.0 * turns.reshape(-1, 1, 1), 6.0)
    n = 5.0 - 2.0 * torch.arange(3, device=x.device, dtype=x.dtype).reshape(1, 3, 1, 1)
    k = torch.remainder(n + h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return vmax.unsqueeze(1) - chroma.unsqueeze(1) * ramp


def adjust_hue(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Rotate the hue (HSV) by ``factor`` turns, ``factor`` in [-0.5, 0.5] (one per sample or a
    number), as ``torchvision.transforms.functional.adjust_hue`` does on float tensors."""
    _float_images(x)
    return _rotate_hue(x, _factor(factor, x, "hue", -0.5, 0.5))


# --------------------------------------------------------------------------- random parameters
def sample_crops(
    heights: torch.Tensor | int,
    widths: torch.Tensor | int,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    *,
    n: int | None = None,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` for a batch: ``(N, 4)`` int64 ``(top, left, height,
    width)`` boxes, one per picture of size ``heights[i] x widths[i]`` (ints, or ``(N,)``
    tensors; give ``n`` when both are ints). See the module docstring for the semantics."""
    check_generator(generator)
    lo, hi = as_interval(scale, "scale")
    if hi > 1.0:
        raise ValueError(f"scale must lie in (0, 1], got {scale!r}")
    rlo, rhi = as_interval(ratio, "ratio")
    if not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be a positive int, got {attempts!r}")
    H = torch.as_tensor(heights, dtype=torch.float64).reshape(-1).cpu()
    W = torch.as_tensor(widths, dtype=torch.float64).reshape(-1).cpu()
    if n is None:
        n = max(H.numel(), W.numel())
    if H.numel() not in (1, n) or W.numel() not in (1, n):
        raise ValueError(f"heights and widths must be ints or tensors of {n} values, got "
                         f"{H.numel()} and {W.numel()}")
    H, W = H.expand(n), W.expand(n)
    if bool((H < 1).any() | (W < 1).any()):
        raise ValueError("picture heights and widths must be >= 1")
    u = torch.rand((n, attempts, 2), generator=generator, dtype=torch.float64)
    area = (H * W).unsqueeze(1) * (lo + (hi - lo) * u[..., 0])
    aspect = torch.exp(math.log(rlo) + (math.log(rhi) - math.log(rlo)) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= W.unsqueeze(1)) & (h > 0) & (h <= H.unsqueeze(1))
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid attempt (0 if none)
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # torchvision's fallback: a central crop whose aspect is clamped into ratio
    in_ratio = W / H
    fw = torch.where(in_ratio > rhi, torch.round(H * rhi), W)
    fh = torch.where(in_ratio < rlo, torch.round(W / rlo), H)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    off = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(off[:, 0] * (H - h + 1)), torch.floor((H - h) / 2))
    left = torch.where(found, torch.floor(off[:, 1] * (W - w + 1)), torch.floor((W - w) / 2))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def sample_jitter(
    n: int,
    brightness: float | Sequence[float] = 0.4,
    contrast: float | Sequence[float] = 0.4,
    saturation: float | Sequence[float] = 0.4,
    hue: float | Sequence[float] = 0.1,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ColorJitter.get_params`` for ``n`` samples: ``(order, factors)`` with ``order`` an
    ``(n, 4)`` int64 random permutation of the op ids per sample (``order[i, j]`` is the op
    sample ``i`` applies ``j``-th) and ``factors`` ``(n, 4)`` float64 (brightness, contrast,
    saturation, hue) drawn uniformly from ColorJitter's ranges."""
    check_generator(generator)
    ranges = [jitter_range(brightness, "brightness"), jitter_range(contrast, "contrast"),
              jitter_range(saturation, "saturation"), jitter_range(hue, "hue", hue=True)]
    order = torch.rand((n, 4), generator=generator, dtype=torch.float64).argsort(dim=1)
    u = torch.rand((n, 4), generator=generator, dtype=torch.float64)
    lo = torch.tensor([r[0] for r in ranges], dtype=torch.float64)
    hi = torch.tensor([r[1] for r in ranges], dtype=torch.float64)
    return order, lo + (hi - lo) * u


@dataclass(frozen=True)
class AugmentParams:
    """The random parameters of one batch (CPU tensors, ``N`` samples).

    ``boxes`` ``(N, 4)`` int64 crop boxes ``(top, left, height, width)`` in the coordinates of
    pictures of size ``sizes`` ``(N, 2)``; ``flip``, ``jitter``, ``grayscale`` ``(N,)`` bool;
    ``order`` ``(N, 4)`` op ids per position and ``factors`` ``(N, 4)`` (brightness, contrast,
    saturation, hue) of the colour jitter, used where ``jitter`` is true.
    """

    boxes: torch.Tensor
    sizes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    grayscale: torch.Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


# --------------------------------------------------------------------------- batched steps
def crop_theta(boxes: torch.Tensor, sizes: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """``(N, 2, 3)`` float64 affine maps from output to input grid coordinates
    (``align_corners=False``) that sample box ``(top, left, h, w)`` of a picture of ``sizes``,
    whatever the stored tensor's resolution (it holds the picture stretched to its full extent)."""
    b = boxes.to(torch.float64)
    hp, wp = sizes[:, 0].to(torch.float64), sizes[:, 1].to(torch.float64)
    top, left, h, w = b.unbind(1)
    sx = w / wp
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros((b.shape[0], 2, 3), dtype=torch.float64)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + w) / wp - 1
    theta[:, 1, 1] = h / hp
    theta[:, 1, 2] = (2 * top + h) / hp - 1
    return theta


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without synchronising a CUDA stream (pinned source,
    asynchronous copy)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def resample(x: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of ``x`` (uint8 or float) along per-sample affine grids; returns
    float32 (or ``x``'s float dtype) in [0, 1]."""
    n = x.shape[0]
    xf = x if x.is_floating_point() else x.to(torch.float32)
    if n == 0:  # affine_grid refuses an empty batch
        return xf.new_zeros((0, 3, *out_hw))
    # the affine maps have no shear, so the grid is an outer sum (cheaper than affine_grid's bmm)
    oh, ow = out_hw
    dt, dev = xf.dtype, xf.device
    xo = (2 * torch.arange(ow, device=dev, dtype=dt) + 1) / ow - 1  # output pixel centres
    yo = (2 * torch.arange(oh, device=dev, dtype=dt) + 1) / oh - 1
    th = theta.to(dt)
    gx = th[:, 0, 0, None] * xo + th[:, 0, 2, None]  # (N, ow)
    gy = th[:, 1, 1, None] * yo + th[:, 1, 2, None]  # (N, oh)
    grid = torch.stack([gx[:, None, :].expand(n, oh, ow), gy[:, :, None].expand(n, oh, ow)], -1)
    y = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if not x.is_floating_point():
        y = y.div_(255.0)  # as ToTensor: 255 / 255 is exactly 1
    return y


def crop_resize(
    x: torch.Tensor,
    boxes: torch.Tensor,
    size: int | Sequence[int],
    *,
    flip: torch.Tensor | None = None,
    sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Crop box ``i`` of picture ``i`` and resize it to ``size`` (bilinear), flipping it
    horizontally where ``flip`` is true, for the whole batch in one ``grid_sample``.

    ``x``: ``(N, 3, H, W)`` uint8 (scaled by 1/255) or float. ``boxes``: ``(N, 4)`` integer
    ``(top, left, height, width)`` in the coordinates of pictures of size ``sizes`` (``(N, 2)``
    ``(height, width)``; default ``(H, W)``): ``x`` may hold each picture stretched to ``H x W``
    (a fixed-shape cache) and the box is mapped accordingly. Returns float ``(N, 3, *size)``.
    """
    check_images(x)
    out_hw = as_pair(size, "size")
    n = x.shape[0]
    b = torch.as_tensor(boxes).detach().cpu()
    if b.shape != (n, 4):
        raise ValueError(f"boxes must have shape ({n}, 4), got {tuple(b.shape)}")
    s = picture_sizes(sizes, n, (x.shape[2], x.shape[3]))
    if flip is not None:
        flip = torch.as_tensor(flip).detach().cpu().to(torch.bool).reshape(n)
    theta = crop_theta(b, s, flip).to(torch.float32)
    return resample(x, to_device(theta, x.device), out_hw)


def jitter_plan(order: torch.Tensor, factors: torch.Tensor, active: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Per-position blend factors and weights for :func:`color_jitter` (CPU tensors).

    Returns ``blend_f``, ``w_contrast``, ``w_saturation`` (each ``(N, 4)``: at position ``j``,
    the blend factor (1 = identity) and whether ``D`` is the grey mean or the grey image), and
    for each position the indices of the samples that rotate their hue there.
    """
    order = order.to(torch.int64)
    f = factors.to(torch.float64).gather(1, order)  # factor of the op at each position
    act = active.reshape(-1, 1)
    blend = act & (order != HUE)
    blend_f = torch.where(blend, f, torch.ones_like(f))
    w_c = (act & (order == CONTRAST)).to(torch.float64)
    w_s = (act & (order == SATURATION)).to(torch.float64)
    hue_at = [torch.nonzero(act[:, 0] & (order[:, j] == HUE)).reshape(-1) for j in range(4)]
    return blend_f, w_c, w_s, hue_at


def apply_jitter(x: torch.Tensor, blend_f: torch.Tensor, w_c: torch.Tensor, w_s: torch.Tensor,
                 hue_f: torch.Tensor, hue_at: Sequence[torch.Tensor],
                 plan: Sequence[tuple[bool, bool, int]]) -> torch.Tensor:
    """The jitter loop on device tensors (``blend_f`` etc. ``(N, 4)``, ``hue_f`` ``(N,)``).
    ``plan[j]`` holds host facts about position ``j`` (any contrast, any saturation, number of
    hue samples), so that work nobody needs is skipped without a device synchronisation."""
    shape = (-1, 1, 1, 1)
    for j, (any_c, any_s, n_hue) in enumerate(plan):
        d = None
        if any_c or any_s:
            gray = rgb_to_grayscale(x)
            d = w_s[:, j].reshape(shape) * gray
            if any_c:
                d = torch.addcmul(d, w_c[:, j].reshape(shape), gray.mean(dim=(1, 2, 3),
                                                                          keepdim=True))
        x = _blend(x, blend_f[:, j].reshape(shape), d)
        if n_hue:
            idx = hue_at[j]
            x.index_copy_(0, idx, _rotate_hue(x.index_select(0, idx), hue_f.index_select(0, idx)))
    return x


def host_plan(w_c: torch.Tensor, w_s: torch.Tensor, hue_at: Sequence[torch.Tensor]
              ) -> list[tuple[bool, bool, int]]:
    """Per position of :func:`jitter_plan`'s result: (any contrast, any saturation, number of
    hue samples), the host facts :func:`apply_jitter` needs."""
    return [(bool(w_c[:, j].any()), bool(w_s[:, j].any()), len(hue_at[j])) for j in range(4)]


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor,
                 active: torch.Tensor | None = None) -> torch.Tensor:
    """ColorJitter with a per-sample op order and factors (see :func:`sample_jitter`) on float
    images in [0, 1]; samples where ``active`` is false are left unchanged."""
    _float_images(x)
    n = x.shape[0]
    order = torch.as_tensor(order).detach().cpu()
    factors = torch.as_tensor(factors).detach().cpu()
    if order.shape != (n, 4) or factors.shape != (n, 4):
        raise ValueError(f"order and factors must have shape ({n}, 4), got "
                         f"{tuple(order.shape)} and {tuple(factors.shape)}")
    if not bool((order.sort(dim=1).values == torch.arange(4)).all()):
        raise ValueError("each row of order must be a permutation of 0, 1, 2, 3")
    act = (torch.ones(n, dtype=torch.bool) if active is None
           else torch.as_tensor(active).detach().cpu().to(torch.bool).reshape(n))
    blend_f, w_c, w_s, hue_at = jitter_plan(order, factors, act)
    hue_f = factors[:, HUE]
    if bool((hue_f.abs() > 0.5).any()):
        raise ValueError("hue factors must lie in [-0.5, 0.5]")
    dev, dt = x.device, x.dtype
    return apply_jitter(x.clone(),
                        *(to_device(t.to(dt), dev) for t in (blend_f, w_c, w_s, hue_f)),
                        [to_device(i, dev) for i in hue_at], host_plan(w_c, w_s, hue_at))
