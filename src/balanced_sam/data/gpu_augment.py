r"""The age recipe's image augmentations applied to a whole batch on any device, one call per batch.

The training transform of the AgeDB-DIR / IMDB-WIKI-DIR recipe (see
:func:`balanced_sam.data.images.age_train_transform`) runs per image on the CPU in DataLoader
workers: PIL decode, ``RandomResizedCrop(224, scale=(0.2, 1))``, ``RandomHorizontalFlip``,
``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``, ``RandomGrayscale(0.2)``, ``ToTensor``,
``Normalize(0.5, 0.5)``. :class:`BatchAugment` does the same to a batch of decoded ``uint8``
images ``(N, 3, H, W)`` where the batch lives (the GPU after the host-to-device copy), with
independent random parameters per sample::

    aug = BatchAugment(224, channels_last=True)          # the recipe's defaults
    x = aug(x_uint8.to(device, non_blocking=True))       # float32 (N, 3, 224, 224), normalised

and :class:`BatchEvalTransform` is the test transform (``Resize(256)`` + ``CenterCrop(224)`` +
``Normalize``) for such batches.

How each step matches torchvision
---------------------------------
* **Crop parameters** (:func:`sample_crops`): ``RandomResizedCrop.get_params`` vectorised over the
  batch: 10 attempts per sample of ``area ~ U(scale) * H * W`` and ``log(aspect) ~
  U(log ratio)``, ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area / aspect))`` (round
  half to even, like Python's ``round``); the first attempt with ``0 < w <= W`` and ``0 < h <= H``
  wins and its offsets are uniform integers; a sample with no valid attempt gets torchvision's
  central fallback (the whole image, or the largest central crop whose aspect is clamped into
  ``ratio``). torchvision stops drawing at the first success; we always draw 10 attempts, which
  changes nothing in distribution because the attempts are independent.
* **Crop + resize + flip** (:func:`crop_resize`): one ``F.affine_grid`` + ``F.grid_sample``
  (bilinear, ``align_corners=False``, border padding) for the whole batch; the flip is the sign of
  the grid's x scale. Output pixel centres map to the same source coordinates as torchvision's
  crop-then-resize (``(u + 0.5) * w / size - 0.5`` inside the box); only the outermost output
  pixels differ slightly, because we interpolate with the picture's pixels just outside the box
  where torchvision repeats the box's edge pixel. *Antialiasing*: ``grid_sample`` does none, while
  PIL's bilinear resize (the recipe's path) low-pass filters when it shrinks. With the cache this
  module is meant for (shorter side ``round(size * 256 / 224)``, i.e. 256 for 224) a crop is at
  most 256 / 224 = 1.14 times the output, where the difference is negligible; most crops are
  enlarged (scale >= 0.2 of a 256 square is >= 114 px). :class:`BatchAugment` warns when a batch
  shrinks a crop by more than 2x (feed it pictures resized for the output size).
* **ColorJitter** (:func:`color_jitter`): torchvision's tensor formulas on floats in [0, 1]:
  brightness ``clamp(f x)`` (blend with black), contrast ``clamp(f x + (1 - f) mean(gray(x)))``
  (blend with the mean of the grayscale image), saturation ``clamp(f x + (1 - f) gray(x))``, hue a
  rotation of the HSV hue by ``f`` turns, with ``gray = 0.2989 R + 0.587 G + 0.114 B``. Factors
  are ``U(max(0, 1 - 0.4), 1 + 0.4)`` and ``U(-0.1, 0.1)`` for hue. *Random order*: each sample
  draws its own permutation of the four ops (the ``argsort`` of four uniform keys, a uniform random
  permutation). We loop over the four *positions*: at position ``j`` every sample whose op there is
  brightness, contrast or saturation gets one fused blend ``clamp(f x + (1 - f) D)`` with its own
  factor and its own ``D`` (0, the grey mean or the grey image; factor 1, an exact identity, for
  the others), and the samples whose op there is hue get the hue rotation (their indices are known
  on the host, so selecting them costs no device synchronisation).
* **RandomApply(p=0.8)**, **flip (0.5)**, **RandomGrayscale(0.2)**: independent per-sample
  Bernoulli draws; the grayscale output replicates ``gray(x)`` in the three channels.
* **ToTensor + Normalize**: ``uint8 / 255``, then ``(x - mean) / std``.

Differences from the recipe that remain (all small, and statistical tests in
``tests/data/test_gpu_augment.py`` compare the two pipelines): the recipe applies the colour ops to
8-bit PIL images, rounding to 1/255 after each op and rotating hue in 8-bit HSV (its hue shift is
``int(f * 255) / 255`` of a turn); we compute in float32 without intermediate rounding, as
torchvision does for float tensors.

Randomness
----------
All random parameters are drawn on the CPU from a ``torch.Generator`` (the one given to the call,
else the one given to the constructor, else PyTorch's global generator, like torchvision), so a
seed gives the same augmentation on every device. The parameters of one batch (~20 numbers per
sample) travel to the device in one small copy from pinned memory.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AugmentParams",
    "BatchAugment",
    "BatchEvalTransform",
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
_ALIAS_WARN = 2.0  # warn when a crop is shrunk by more than this factor (no antialiasing)


# --------------------------------------------------------------------------- argument checks
def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
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


def _interval(value: Sequence[float], name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not (0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"{name} must satisfy 0 < min <= max < inf, got {value!r}")
    return lo, hi


def _jitter_range(value: float | Sequence[float], name: str, hue: bool = False
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


def _probability(p: float, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (parameters are drawn on "
                             f"the CPU), got one on {generator.device}")


def _check_images(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, 3, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W) (RGB), got {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"{name} must be uint8 (0-255) or floating point (0-1), got {x.dtype}")


def _sizes(sizes: torch.Tensor | Sequence[Sequence[int]] | None, n: int,
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
    t = _to_device(t, x.device) if t.device.type == "cpu" else t.to(x.device)
    return t.reshape(-1, 1, 1, 1)


def _float_images(x: torch.Tensor, name: str = "x") -> None:
    _check_images(x, name)
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
    _check_generator(generator)
    lo, hi = _interval(scale, "scale")
    if hi > 1.0:
        raise ValueError(f"scale must lie in (0, 1], got {scale!r}")
    rlo, rhi = _interval(ratio, "ratio")
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
    _check_generator(generator)
    ranges = [_jitter_range(brightness, "brightness"), _jitter_range(contrast, "contrast"),
              _jitter_range(saturation, "saturation"), _jitter_range(hue, "hue", hue=True)]
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
def _theta(boxes: torch.Tensor, sizes: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
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


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without synchronising a CUDA stream (pinned source,
    asynchronous copy)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _resample(x: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
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
    _check_images(x)
    out_hw = _pair(size, "size")
    n = x.shape[0]
    b = torch.as_tensor(boxes).detach().cpu()
    if b.shape != (n, 4):
        raise ValueError(f"boxes must have shape ({n}, 4), got {tuple(b.shape)}")
    s = _sizes(sizes, n, (x.shape[2], x.shape[3]))
    if flip is not None:
        flip = torch.as_tensor(flip).detach().cpu().to(torch.bool).reshape(n)
    theta = _theta(b, s, flip).to(torch.float32)
    return _resample(x, _to_device(theta, x.device), out_hw)


def _jitter_plan(order: torch.Tensor, factors: torch.Tensor, active: torch.Tensor
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


def _apply_jitter(x: torch.Tensor, blend_f: torch.Tensor, w_c: torch.Tensor, w_s: torch.Tensor,
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


def _host_plan(w_c: torch.Tensor, w_s: torch.Tensor, hue_at: Sequence[torch.Tensor]
               ) -> list[tuple[bool, bool, int]]:
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
    blend_f, w_c, w_s, hue_at = _jitter_plan(order, factors, act)
    hue_f = factors[:, HUE]
    if bool((hue_f.abs() > 0.5).any()):
        raise ValueError("hue factors must lie in [-0.5, 0.5]")
    dev, dt = x.device, x.dtype
    return _apply_jitter(x.clone(),
                         *(_to_device(t.to(dt), dev) for t in (blend_f, w_c, w_s, hue_f)),
                         [_to_device(i, dev) for i in hue_at], _host_plan(w_c, w_s, hue_at))


def _finish(y: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor, dtype: torch.dtype,
            channels_last: bool) -> torch.Tensor:
    y = (y - mean.reshape(1, 3, 1, 1)) * inv_std.reshape(1, 3, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return y.to(dtype=dtype, memory_format=fmt)


def _norm_args(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    try:
        m = tuple(float(v) for v in mean)
        s = tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ValueError(f"mean and std must be 3 numbers each, got {mean!r}, {std!r}") from None
    if len(m) != 3 or len(s) != 3:
        raise ValueError(f"mean and std must be 3 numbers each, got {mean!r}, {std!r}")
    if not all(v > 0 and math.isfinite(v) for v in s):
        raise ValueError(f"std must be positive, got {std!r}")
    return m, s


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (float32, bfloat16, float16), "
                         f"got {dtype!r}")
    return dtype


class BatchAugment:
    """The age recipe's training augmentation for a batch, with per-sample random parameters.

    ``aug(x)`` with ``x`` ``(N, 3, H, W)`` uint8 (0-255) or float (0-1), on any device, returns
    ``(N, 3, *size)`` normalised images of ``dtype`` on ``x``'s device (``channels_last`` memory
    format when asked). Equivalent in distribution to ``Compose([RandomResizedCrop(size, scale,
    ratio), RandomHorizontalFlip(flip_p), RandomApply([ColorJitter(brightness, contrast,
    saturation, hue)], jitter_p), RandomGrayscale(grayscale_p), ToTensor(), Normalize(mean,
    std)])`` applied to each picture; see the module docstring for how each step matches.

    ``sizes`` (``(N, 2)`` ``(height, width)``) says that ``x[i]`` holds a picture of that size
    stretched to ``H x W`` (a fixed-shape cache of non-square pictures): crops are then drawn
    as torchvision draws them on the picture itself. Without it every picture is ``H x W``.

    Randomness comes from ``generator`` (a CPU ``torch.Generator``; per call, else the one given
    here, else PyTorch's global generator). :meth:`sample` and :meth:`apply` split a call into
    drawing the parameters and applying them.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        *,
        flip_p: float = 0.5,
        brightness: float | Sequence[float] = 0.4,
        contrast: float | Sequence[float] = 0.4,
        saturation: float | Sequence[float] = 0.4,
        hue: float | Sequence[float] = 0.1,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _pair(size, "size")
        lo, hi = _interval(scale, "scale")
        if hi > 1.0:
            raise ValueError(f"scale must lie in (0, 1], got {scale!r}")
        self.scale = (lo, hi)
        self.ratio = _interval(ratio, "ratio")
        self.flip_p = _probability(flip_p, "flip_p")
        self.jitter_ranges = (_jitter_range(brightness, "brightness"),
                              _jitter_range(contrast, "contrast"),
                              _jitter_range(saturation, "saturation"),
                              _jitter_range(hue, "hue", hue=True))
        self.jitter_p = _probability(jitter_p, "jitter_p")
        self.grayscale_p = _probability(grayscale_p, "grayscale_p")
        self.mean, self.std = _norm_args(mean, std)
        self.dtype = _out_dtype(dtype)
        self.channels_last = bool(channels_last)
        _check_generator(generator)
        self.generator = generator

    def __repr__(self) -> str:
        b, c, s, h = self.jitter_ranges
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, "
                f"ratio=({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), flip_p={self.flip_p}, "
                f"jitter={b}, {c}, {s}, {h} with p={self.jitter_p}, "
                f"grayscale_p={self.grayscale_p}, mean={self.mean}, std={self.std}, "
                f"dtype={self.dtype}, channels_last={self.channels_last})")

    def sample(self, n: int, height: int, width: int,
               sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
               generator: torch.Generator | None = None) -> AugmentParams:
        """Draw the parameters for ``n`` pictures of ``height x width`` (or of ``sizes``)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        g = generator if generator is not None else self.generator
        _check_generator(g)
        s = _sizes(sizes, n, (int(height), int(width)))
        boxes = sample_crops(s[:, 0], s[:, 1], self.scale, self.ratio, n=n, generator=g)
        u = torch.rand((n, 3), generator=g, dtype=torch.float64)
        order, factors = sample_jitter(n, *self.jitter_ranges, generator=g)
        return AugmentParams(boxes=boxes, sizes=s.clone(), flip=u[:, 0] < self.flip_p,
                             jitter=u[:, 1] < self.jitter_p, order=order, factors=factors,
                             grayscale=u[:, 2] < self.grayscale_p)

    def apply(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply drawn parameters to ``x``; no device synchronisation on CUDA."""
        _check_images(x)
        n = x.shape[0]
        if len(params) != n:
            raise ValueError(f"params are for {len(params)} samples but x has {n}")
        theta = _theta(params.boxes, params.sizes, params.flip)
        shrink = self._max_shrink(params, x.shape[2], x.shape[3])
        if shrink > _ALIAS_WARN:
            warnings.warn(
                f"BatchAugment shrinks a crop by {shrink:.1f}x with bilinear sampling and no "
                "antialiasing, unlike PIL's resize: store pictures at about the output size "
                f"(shorter side {round(min(self.size) * 256 / 224)} for {self.size}) to match "
                "the recipe", stacklevel=2)
        blend_f, w_c, w_s, hue_at = _jitter_plan(params.order, params.factors, params.jitter)
        counts = [len(i) for i in hue_at]
        # one host-to-device copy for all per-sample numbers
        per_sample = torch.cat([theta.reshape(n, 6), blend_f, w_c, w_s,
                                params.factors[:, HUE:], params.grayscale.reshape(n, 1).double()],
                               dim=1)
        flat = torch.cat([per_sample.reshape(-1), torch.tensor(self.mean, dtype=torch.float64),
                          1.0 / torch.tensor(self.std, dtype=torch.float64),
                          *(i.to(torch.float64) for i in hue_at)]).to(torch.float32)
        buf = _to_device(flat, x.device)
        ps = buf[:n * 20].reshape(n, 20)
        mean, inv_std = buf[n * 20:n * 20 + 3], buf[n * 20 + 3:n * 20 + 6]
        idx = buf[n * 20 + 6:].to(torch.int64).split(counts)
        y = _resample(x, ps[:, :6].reshape(n, 2, 3), self.size)
        ps = ps.to(y.dtype)
        y = _apply_jitter(y, ps[:, 6:10], ps[:, 10:14], ps[:, 14:18], ps[:, 18], idx,
                          _host_plan(w_c, w_s, hue_at))
        if bool(params.grayscale.any()):
            y = torch.where(ps[:, 19].reshape(-1, 1, 1, 1) > 0.5, rgb_to_grayscale(y), y)
        return _finish(y, mean.to(y.dtype), inv_std.to(y.dtype), self.dtype, self.channels_last)

    def _max_shrink(self, params: AugmentParams, height: int, width: int) -> float:
        if len(params) == 0:
            return 0.0
        b, s = params.boxes.to(torch.float64), params.sizes.to(torch.float64)
        fy = b[:, 2] * (height / s[:, 0]) / self.size[0]
        fx = b[:, 3] * (width / s[:, 1]) / self.size[1]
        return float(torch.maximum(fy, fx).max())

    def __call__(self, x: torch.Tensor,
                 sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(x)
        return self.apply(x, self.sample(x.shape[0], x.shape[2], x.shape[3], sizes, generator))


class BatchEvalTransform:
    """The age recipe's test transform for a batch: ``Resize(resize)`` of the shorter side,
    ``CenterCrop(size)``, ``ToTensor``, ``Normalize(mean, std)``.

    ``x`` ``(N, 3, H, W)`` uint8 or float on any device. Without ``sizes`` this is torchvision's
    tensor path: a batch whose shorter side already equals ``resize`` (the cache's squares) is
    only sliced, which gives exactly ``CenterCrop(size)`` of ``Resize(resize)`` of the picture
    the cache was made from; otherwise the batch is resized first (bilinear, antialiased, float,
    longer side ``int(resize * long / short)``). With ``sizes`` (pictures stretched to ``H x W``)
    the same box, mapped back to each picture, is resampled bilinearly in one ``grid_sample``
    (equal up to interpolation, not bit for bit).
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        resize: int = 256,
        *,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        self.size = _pair(size, "size")
        if isinstance(resize, bool) or not isinstance(resize, numbers.Integral) or resize < 1:
            raise ValueError(f"resize must be a positive int (the shorter side), got {resize!r}")
        if resize < max(self.size):
            raise ValueError(f"resize ({resize}) must be >= the crop size {self.size} (torchvision "
                             "would pad with zeros; the recipe never does)")
        self.resize = int(resize)
        self.mean, self.std = _norm_args(mean, std)
        self.dtype = _out_dtype(dtype)
        self.channels_last = bool(channels_last)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, resize={self.resize}, mean={self.mean}, "
                f"std={self.std}, dtype={self.dtype}, channels_last={self.channels_last})")

    def boxes(self, sizes: torch.Tensor) -> torch.Tensor:
        """``(N, 4)`` float64 ``(top, left, height, width)`` of the centre crop in each picture's
        own coordinates (``sizes`` ``(N, 2)``)."""
        s = sizes.to(torch.float64)
        short = s.min(dim=1).values
        # the resized picture: shorter side = resize, longer side truncated like torchvision
        rh = torch.where(s[:, 0] <= s[:, 1], torch.full_like(short, self.resize),
                         torch.floor(self.resize * s[:, 0] / short))
        rw = torch.where(s[:, 0] <= s[:, 1], torch.floor(self.resize * s[:, 1] / short),
                         torch.full_like(short, self.resize))
        ch, cw = self.size
        top = torch.round((rh - ch) / 2)
        left = torch.round((rw - cw) / 2)
        # map back: the resized picture is the picture scaled by rh / h, rw / w
        sy, sx = rh / s[:, 0], rw / s[:, 1]
        return torch.stack([top / sy, left / sx, ch / sy, cw / sx], dim=1)

    def __call__(self, x: torch.Tensor,
                 sizes: torch.Tensor | Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        _check_images(x)
        n, _, H, W = x.shape
        mean = torch.tensor(self.mean, dtype=torch.float32)
        inv_std = 1.0 / torch.tensor(self.std, dtype=torch.float32)
        if sizes is not None:
            s = _sizes(sizes, n, (H, W))
            theta = _theta(self.boxes(s), s, None)
            buf = _to_device(torch.cat([theta.reshape(-1), mean.double(), inv_std.double()])
                             .to(torch.float32), x.device)
            y = _resample(x, buf[:n * 6].reshape(n, 2, 3), self.size)
            return _finish(y, buf[n * 6:n * 6 + 3].to(y.dtype), buf[n * 6 + 3:].to(y.dtype),
                           self.dtype, self.channels_last)
        y = x
        short, long = min(H, W), max(H, W)
        if short != self.resize:
            new_long = int(self.resize * long / short)
            hw = (self.resize, new_long) if H < W else (new_long, self.resize)
            y = y if y.is_floating_point() else y.to(torch.float32).div_(255.0)
            y = F.interpolate(y, size=hw, mode="bilinear", align_corners=False, antialias=True)
        ch, cw = self.size
        top = int(round((y.shape[2] - ch) / 2.0))
        left = int(round((y.shape[3] - cw) / 2.0))
        y = y[:, :, top:top + ch, left:left + cw]  # slice before converting a uint8 batch
        if not y.is_floating_point():
            y = y.to(torch.float32).div_(255.0)
        mi = _to_device(torch.cat([mean, inv_std]), x.device).to(y.dtype)
        return _finish(y, mi[:3], mi[3:], self.dtype, self.channels_last)
