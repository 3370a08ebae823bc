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

Where the parts live
--------------------
The functional parts (argument checks, the colour ops, :func:`sample_crops` /
:func:`sample_jitter` / :class:`AugmentParams`, :func:`crop_resize`, :func:`color_jitter`) are in
:mod:`balanced_sam.data.augment_ops`; this module holds the two batch transforms built from them
and re-exports those names, so ``from balanced_sam.data.gpu_augment import crop_resize`` works.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from balanced_sam.data.augment_ops import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    AugmentParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_jitter,
    as_interval,
    as_pair,
    check_generator,
    check_images,
    color_jitter,
    crop_resize,
    crop_theta,
    host_plan,
    jitter_plan,
    jitter_range,
    picture_sizes,
    resample,
    rgb_to_grayscale,
    sample_crops,
    sample_jitter,
    to_device,
)

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

_ALIAS_WARN = 2.0  # warn when a crop is shrunk by more than this factor (no antialiasing)


def _probability(p: float, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


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
        self.size = as_pair(size, "size")
        lo, hi = as_interval(scale, "scale")
        if hi > 1.0:
            raise ValueError(f"scale must lie in (0, 1], got {scale!r}")
        self.scale = (lo, hi)
        self.ratio = as_interval(ratio, "ratio")
        self.flip_p = _probability(flip_p, "flip_p")
        self.jitter_ranges = (jitter_range(brightness, "brightness"),
                              jitter_range(contrast, "contrast"),
                              jitter_range(saturation, "saturation"),
                              jitter_range(hue, "hue", hue=True))
        self.jitter_p = _probability(jitter_p, "jitter_p")
        self.grayscale_p = _probability(grayscale_p, "grayscale_p")
        self.mean, self.std = _norm_args(mean, std)
        self.dtype = _out_dtype(dtype)
        self.channels_last = bool(channels_last)
        check_generator(generator)
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
        check_generator(g)
        s = picture_sizes(sizes, n, (int(height), int(width)))
        boxes = sample_crops(s[:, 0], s[:, 1], self.scale, self.ratio, n=n, generator=g)
        u = torch.rand((n, 3), generator=g, dtype=torch.float64)
        order, factors = sample_jitter(n, *self.jitter_ranges, generator=g)
        return AugmentParams(boxes=boxes, sizes=s.clone(), flip=u[:, 0] < self.flip_p,
                             jitter=u[:, 1] < self.jitter_p, order=order, factors=factors,
                             grayscale=u[:, 2] < self.grayscale_p)

    def apply(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply drawn parameters to ``x``; no device synchronisation on CUDA."""
        check_images(x)
        n = x.shape[0]
        if len(params) != n:
            raise ValueError(f"params are for {len(params)} samples but x has {n}")
        theta = crop_theta(params.boxes, params.sizes, params.flip)
        shrink = self._max_shrink(params, x.shape[2], x.shape[3])
        if shrink > _ALIAS_WARN:
            warnings.warn(
                f"BatchAugment shrinks a crop by {shrink:.1f}x with bilinear sampling and no "
                "antialiasing, unlike PIL's resize: store pictures at about the output size "
                f"(shorter side {round(min(self.size) * 256 / 224)} for {self.size}) to match "
                "the recipe", stacklevel=2)
        blend_f, w_c, w_s, hue_at = jitter_plan(params.order, params.factors, params.jitter)
        counts = [len(i) for i in hue_at]
        # one host-to-device copy for all per-sample numbers
        per_sample = torch.cat([theta.reshape(n, 6), blend_f, w_c, w_s,
                                params.factors[:, HUE:], params.grayscale.reshape(n, 1).double()],
                               dim=1)
        flat = torch.cat([per_sample.reshape(-1), torch.tensor(self.mean, dtype=torch.float64),
                          1.0 / torch.tensor(self.std, dtype=torch.float64),
                          *(i.to(torch.float64) for i in hue_at)]).to(torch.float32)
        buf = to_device(flat, x.device)
        ps = buf[:n * 20].reshape(n, 20)
        mean, inv_std = buf[n * 20:n * 20 + 3], buf[n * 20 + 3:n * 20 + 6]
        idx = buf[n * 20 + 6:].to(torch.int64).split(counts)
        y = resample(x, ps[:, :6].reshape(n, 2, 3), self.size)
        ps = ps.to(y.dtype)
        y = apply_jitter(y, ps[:, 6:10], ps[:, 10:14], ps[:, 14:18], ps[:, 18], idx,
                         host_plan(w_c, w_s, hue_at))
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
        check_images(x)
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
        self.size = as_pair(size, "size")
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
        check_images(x)
        n, _, H, W = x.shape
        mean = torch.tensor(self.mean, dtype=torch.float32)
        inv_std = 1.0 / torch.tensor(self.std, dtype=torch.float32)
        if sizes is not None:
            s = picture_sizes(sizes, n, (H, W))
            theta = crop_theta(self.boxes(s), s, None)
            buf = to_device(torch.cat([theta.reshape(-1), mean.double(), inv_std.double()])
                            .to(torch.float32), x.device)
            y = resample(x, buf[:n * 6].reshape(n, 2, 3), self.size)
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
        mi = to_device(torch.cat([mean, inv_std]), x.device).to(y.dtype)
        return _finish(y, mi[:3], mi[3:], self.dtype, self.channels_last)
