"""Label bins: the training label distribution, importance weights and many/medium/few regions.

Deep imbalanced regression (DIR) discretises the label range into ``K`` bins, counts the training
samples ``N_k`` in each and derives everything else from those counts:

* importance weights ``w(k) = P_test(k) / P_train(k)`` with a uniform test distribution, i.e.
  ``1 / N_k`` (``"inv"``) or ``1 / sqrt(N_k)`` (``"sqrt_inv"``, the BSAM paper's default), or the
  same after label-distribution smoothing (``"lds"``, Yang et al. 2021);
* regions (shots): a bin is *many* when ``N_k > many`` (default 100), *few* when ``N_k < few``
  (default 20) and *medium* otherwise; empty bins are *few*. The thresholds are stored on the
  bins (``LabelBins(..., many=, few=)``) and used wherever regions are needed.

Only ``torch`` and ``numpy`` are needed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["LabelBins", "lds_kernel", "lds_smooth", "SCHEMES", "REGIONS", "check_region"]

SCHEMES = ("none", "inv", "sqrt_inv", "lds")
NORMALIZE = ("mean", "none")
REGIONS = ("many", "medium", "few")
KERNELS = ("gaussian", "triang", "laplace")

Scheme = Literal["none", "inv", "sqrt_inv", "lds"]
Normalize = Literal["mean", "none"]


def check_region(region: str) -> str:
    """``region`` when it names one (``"all"`` or one of :data:`REGIONS`); else a
    ``ValueError`` listing them. The one check of a region name (metrics, analysis, CLI)."""
    if region != "all" and region not in REGIONS:
        raise ValueError(f"region must be one of all, {', '.join(REGIONS)}; got {region!r}")
    return region


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be numeric (a tensor, array or list of numbers)") from exc
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n = int(bad.sum())
            first = t.reshape(-1)[bad.reshape(-1)][0].item()
            raise ValueError(f"{name} holds {n} NaN/inf value(s) (first: {first}); "
                             "remove or impute them before binning")


DEFAULT_MAX_BINS = 100_000


def _check_thresholds(many: Any, few: Any) -> tuple[float, float]:
    for name, v in (("many", many), ("few", few)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not few <= many:
        raise ValueError(f"few ({few}) must be <= many ({many})")
    return many, few


def _nice_width(span: float, target_bins: int = 100) -> float:
    """The round bin width (1, 2 or 5 times a power of ten) nearest to ``span / target_bins``."""
    raw = span / target_bins
    if not raw > 0 or not math.isfinite(raw):
        return 1.0
    exp = math.floor(math.log10(raw))
    candidates = [m * 10.0**e for e in (exp, exp + 1) for m in (1, 2, 5)]
    return min(candidates, key=lambda w: abs(math.log(w / raw)))


def _too_many_bins(k: float, max_bins: int, lo: float, hi: float, what: str) -> ValueError:
    width = _nice_width(hi - lo)
    return ValueError(
        f"{what} gives {k:.4g} bins over the label range [{lo:g}, {hi:g}], more than "
        f"max_bins={max_bins:,}; use a wider bin (e.g. bin_width={width:g} gives "
        f"{math.ceil((hi - lo) / width - 1e-9)} bins), num_bins=, or raise max_bins if you "
        "really want that many")


def _finite_number(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (a bool is not a number here)."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _make_edges(t64: torch.Tensor, bin_width: float | None, num_bins: int | None,
                lower: float | None, upper: float | None, max_bins: int) -> torch.Tensor:
    """Equal-width edges for :meth:`LabelBins.from_labels` (see there); the bin count is checked
    against ``max_bins`` before the edges are allocated."""
    for name, value in (("lower", lower), ("upper", upper)):
        if value is not None and not _finite_number(value):
            raise ValueError(f"{name} must be a finite number (or None: from the labels), got "
                             f"{value!r}")
    lo_t, hi_t = float(t64.min()), float(t64.max())
    if bin_width is None and num_bins is None:
        if bool((t64 == t64.round()).all()):
            bin_width = 1.0
        else:
            num_bins = 100
    if bin_width is not None:
        if num_bins is not None:
            raise ValueError("give bin_width or num_bins, not both")
        if not (isinstance(bin_width, (int, float)) and math.isfinite(bin_width)
                and bin_width > 0):
            raise ValueError(f"bin_width must be a positive number, got {bin_width!r}")
        lo = float(lower) if lower is not None else math.floor(lo_t / bin_width) * bin_width
        if upper is not None:
            hi = float(upper)
        else:
            hi = lo + (math.floor((hi_t - lo) / bin_width) + 1) * bin_width
        if not hi > lo:
            raise ValueError(f"upper ({hi}) must be greater than lower ({lo})")
        kf = (hi - lo) / bin_width
        if not kf <= max_bins:  # also catches an overflow to inf
            raise _too_many_bins(kf, max_bins, lo, hi, f"bin_width={bin_width:g}")
        k = max(1, math.ceil(kf - 1e-9))
        e = lo + bin_width * torch.arange(k + 1, dtype=torch.float64)
        e[-1] = hi  # a range that is not a multiple of the width ends in a narrower bin
        return e
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    if num_bins > max_bins:
        raise _too_many_bins(num_bins, max_bins, lo_t, hi_t, f"num_bins={num_bins}")
    lo = float(lower) if lower is not None else lo_t
    hi = float(upper) if upper is not None else hi_t
    if not hi > lo:
        hi = lo + 1.0
    return torch.linspace(lo, hi, num_bins + 1, dtype=torch.float64)


def lds_kernel(kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0) -> np.ndarray:
    """The label-distribution-smoothing window of Yang et al. (2021), peak value 1.

    ``kernel`` is ``"gaussian"`` (a unit impulse filtered by a Gaussian of width ``sigma`` with
    reflecting borders and a radius of ``4 sigma``, as ``scipy.ndimage.gaussian_filter1d`` does in
    the DIR code), ``"triang"`` (``1 - |n| / ((ks + 1) / 2)``) or ``"laplace"``
    (``exp(-|n| / sigma)``); ``ks`` is the odd window size.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not isinstance(ks, int) or ks < 1 or ks % 2 == 0:
        raise ValueError(f"ks must be an odd positive integer, got {ks!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    half = (ks - 1) // 2
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    if kernel == "gaussian":
        radius = int(4.0 * sigma + 0.5)
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps /= taps.sum()
        impulse = np.zeros(ks)
        impulse[half] = 1.0
        # 'symmetric' padding is scipy's 'reflect' mode (d c b a | a b c d | d c b a).
        padded = np.pad(impulse, radius, mode="symmetric")
        window = np.correlate(padded, taps, mode="valid")
    elif kernel == "triang":
        window = 1.0 - np.abs(offsets) / ((ks + 1) / 2.0)
    else:
        window = np.exp(-np.abs(offsets) / sigma) / (2.0 * sigma)
    peak: np.ndarray = window / window.max()
    return peak


def lds_smooth(values: np.ndarray, window: np.ndarray) -> np.ndarray:
    """``values`` (one per bin) convolved with the odd, symmetric ``window``, zero beyond the
    first and last bin: one value per bin whatever the number of bins, as the DIR code's
    ``scipy.ndimage.convolve1d(values, weights=window, mode="constant")``. (``np.convolve(...,
    mode="same")`` agrees when there are at least as many bins as taps, but returns
    ``max(K, ks)`` values when there are fewer.)"""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(window, dtype=np.float64)
    if v.ndim != 1 or w.ndim != 1 or len(w) % 2 == 0:
        raise ValueError(f"lds_smooth takes 1-D values and an odd 1-D window, got shapes "
                         f"{v.shape} and {w.shape}")
    half = (len(w) - 1) // 2
    out: np.ndarray = np.convolve(v, w, mode="full")[half: half + len(v)]
    return out


class LabelBins:
    """Equal- or custom-width bins over the label range, with the training counts per bin.

    Build it once from the training labels (:meth:`from_labels`) or from counts you streamed
    yourself (:meth:`from_counts`); everything else (per-sample weights, regions, metrics per
    region) is derived from it. Bin ``k`` is ``[edges[k], edges[k+1])``; the last bin also holds
    ``edges[-1]``. Targets outside ``[edges[0], edges[-1]]`` raise ``ValueError`` unless the bins
    were built with ``clamp=True`` (or a call passes ``clamp=True``), which maps them to the first /
    last bin.

    Args:
        edges: increasing bin edges, ``K + 1`` values.
        counts: training samples per bin, ``K`` non-negative integers.
        clamp: map out-of-range targets to the nearest end bin instead of raising.
        share_weight_below: bins with index below this take that bin's weight (NYUD2-DIR gives the
            nearly empty depth bins below 0.7 m the weight of bin 7); ``None`` for no sharing.
        many, few: the region thresholds on a bin's training count (many: ``> many``, few:
            ``< few``; DIR's 100 and 20). They travel with the bins (:meth:`to_dict`) and are
            the defaults of :meth:`regions`, :meth:`region_mask`, ... and of
            :class:`~balanced_sam.RegressionMetrics`.
    """

    def __init__(
        self,
        edges: Sequence[float] | torch.Tensor | np.ndarray,
        counts: Sequence[int] | torch.Tensor | np.ndarray,
        *,
        clamp: bool = False,
        share_weight_below: int | None = None,
        many: float = 100,
        few: float = 20,
    ) -> None:
        self.many, self.few = _check_thresholds(many, few)
        e = _as_tensor(edges, "edges").to(torch.float64).reshape(-1)
        c = _as_tensor(counts, "counts").reshape(-1)
        _check_finite(e, "edges")
        if e.numel() < 2:
            raise ValueError("edges must hold at least 2 values (one bin)")
        if not bool((e[1:] > e[:-1]).all()):
            raise ValueError("edges must be strictly increasing")
        if c.numel() != e.numel() - 1:
            raise ValueError(f"counts must hold len(edges) - 1 = {e.numel() - 1} values, "
                             f"got {c.numel()}")
        _check_finite(c.to(torch.float64), "counts")
        if bool((c < 0).any()) or bool((c != c.round()).any()):
            raise ValueError("counts must be non-negative integers")
        if share_weight_below is not None and not 0 <= share_weight_below < c.numel():
            raise ValueError(f"share_weight_below must be in [0, {c.numel() - 1}], "
                             f"got {share_weight_below}")
        self.edges: torch.Tensor = e
        self.counts: torch.Tensor = c.to(torch.int64)
        self.clamp = bool(clamp)
        self.share_weight_below = share_weight_below
        self._table_cache: dict[tuple[Any, ...], torch.Tensor] = {}
        self._inner_cache: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_labels(
        cls,
        train_targets: Any,
        bin_width: float | None = None,
        edges: Sequence[float] | torch.Tensor | np.ndarray | None = None,
        lower: float | None = None,
        upper: float | None = None,
        *,
        num_bins: int | None = None,
        clamp: bool = False,
        share_weight_below: int | None = None,
        max_bins: int = DEFAULT_MAX_BINS,
        many: float = 100,
        few: float = 20,
    ) -> LabelBins:
        """Bin the training targets (any shape: one label per sample or one per pixel).

        Give either ``edges`` or a ``bin_width`` (or ``num_bins``) with optional ``lower`` /
        ``upper``. Without ``lower`` the range starts at ``floor(min / width) * width``; without
        ``upper`` it ends at the first edge above the largest training target. With neither
        ``bin_width`` nor ``num_bins`` nor ``edges``, integer-valued targets get bins of width 1 and
        other targets 100 equal bins.

        Raises ``ValueError`` for an empty training set, NaN/inf targets, training targets
        outside ``[lower, upper]`` (unless ``clamp``), or more than ``max_bins`` bins (checked
        before anything is allocated; the message suggests a bin width for the label range).
        ``many`` / ``few`` are the region thresholds (see the class).
        """
        if isinstance(max_bins, bool) or not isinstance(max_bins, int) or max_bins < 1:
            raise ValueError(f"max_bins must be a positive integer, got {max_bins!r}")
        _check_thresholds(many, few)
        t = _as_tensor(train_targets, "train_targets").reshape(-1)
        if t.numel() == 0:
            raise ValueError("train_targets is empty: LabelBins needs at least one training label")
        _check_finite(t, "train_targets")
        t64 = t.to(torch.float64).cpu()
        if edges is not None:
            if bin_width is not None or num_bins is not None:
                raise ValueError("give either edges or bin_width/num_bins, not both")
            e = _as_tensor(edges, "edges").to(torch.float64).reshape(-1)
            if e.numel() - 1 > max_bins:
                raise _too_many_bins(e.numel() - 1, max_bins, float(e[0]), float(e[-1]),
                                     "edges")
        else:
            e = _make_edges(t64, bin_width, num_bins, lower, upper, max_bins)
        bins = cls(e, torch.zeros(e.numel() - 1, dtype=torch.int64), clamp=clamp,
                   share_weight_below=share_weight_below, many=many, few=few)
        idx = bins.bin_index(t64, clamp=clamp, _name="train_targets")
        bins.counts = torch.bincount(idx, minlength=bins.num_bins).to(torch.int64)
        return bins

    @classmethod
    def from_counts(cls, counts: Any, edges: Any, **kwargs: Any) -> LabelBins:
        """Bins with counts you computed yourself (e.g. streamed over a large depth dataset)."""
        return cls(edges, counts, **kwargs)

    # ------------------------------------------------------------------ basic facts
    @property
    def num_bins(self) -> int:
        return int(self.counts.numel())

    @property
    def lower(self) -> float:
        return float(self.edges[0])

    @property
    def upper(self) -> float:
        return float(self.edges[-1])

    @property
    def centers(self) -> torch.Tensor:
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def __repr__(self) -> str:
        reg = self.regions()
        return (f"LabelBins(num_bins={self.num_bins}, range=[{self.lower:g}, {self.upper:g}], "
                f"samples={self.num_samples}, many/medium/few="
                f"{reg.count('many')}/{reg.count('medium')}/{reg.count('few')})")

    # ------------------------------------------------------------------ lookup
    def _inner_edges(self, device: torch.device) -> torch.Tensor:
        inner = self._inner_cache.get(device)
        if inner is None:
            inner = self.edges[1:-1].to(device=device)
            self._inner_cache[device] = inner
        return inner

    def bin_index(self, targets: Any, clamp: bool | None = None, *, _name: str = "targets"
                  ) -> torch.Tensor:
        """Bin index (int64, same shape and device as ``targets``) of every target.

        Raises ``ValueError`` for NaN/inf targets and, unless clamping, for targets outside
        ``[edges[0], edges[-1]]``.
        """
        t = _as_tensor(targets, _name)
        clamp = self.clamp if clamp is None else clamp
        tf = t.to(torch.float64)
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        # one check (one host sync) covers NaN/inf and, unless clamping, the range
        ok = torch.isfinite(tf) if clamp else (tf >= lo) & (tf <= hi)
        if not bool(ok.all()):
            _check_finite(t, _name)
            out = ~ok
            bad = tf.reshape(-1)[out.reshape(-1)]
            raise ValueError(
                f"{_name}: {int(out.sum())} value(s) outside the bin range [{lo:g}, {hi:g}] "
                f"(e.g. {bad[0].item():g}); widen the bins (lower/upper) or pass clamp=True"
            )
        inner = self._inner_edges(tf.device)
        return torch.bucketize(tf, inner, right=True)

    # ------------------------------------------------------------------ weights
    def weights(
        self,
        scheme: Scheme | str = "sqrt_inv",
        normalize: Normalize | str = "mean",
        *,
        clip: tuple[float, float] = (5.0, 1000.0),
        lds_base: str = "sqrt_inv",
        kernel: str = "gaussian",
        ks: int = 5,
        sigma: float = 2.0,
    ) -> torch.Tensor:
        """Per-bin importance weights (float64, shape ``(K,)``).

        * ``"none"``: 1 for every bin.
        * ``"sqrt_inv"``: ``1 / sqrt(N_k)`` (the BSAM paper's SQINV).
        * ``"inv"``: ``1 / clip(N_k, *clip)``; the DIR code clips to ``[5, 1000]``.
        * ``"lds"``: label-distribution smoothing as in the DIR code: take ``sqrt(N_k)``
          (``lds_base="sqrt_inv"``) or ``clip(N_k)`` (``lds_base="inv"``), convolve it with
          :func:`lds_kernel` (``kernel``, ``ks``, ``sigma``; zero beyond the label range), invert.

        Bins whose effective count is zero (empty bins, far from any sample) get the weight a bin
        with a single sample would get, so every weight is finite; they hold no training sample,
        so this never changes a training weight or the normalisation. With ``normalize="mean"``
        the weights are scaled so that their mean over the *training samples* is 1; ``"none"``
        keeps the raw values (the reference code's ``1 / sqrt(N_k)``).
        """
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        lo_c, hi_c = (float(v) for v in clip)
        if not 0 < lo_c <= hi_c:
            raise ValueError(f"clip must be (low, high) with 0 < low <= high, got {clip!r}")
        n = self.counts.to(torch.float64)
        if scheme == "none":
            w = torch.ones_like(n)
        else:
            base = lds_base if scheme == "lds" else scheme
            if base not in ("sqrt_inv", "inv"):
                raise ValueError(f"lds_base must be 'sqrt_inv' or 'inv', got {lds_base!r}")
            if base == "sqrt_inv":
                eff, single = n.sqrt(), 1.0
            else:
                eff, single = n.clamp(lo_c, hi_c), max(lo_c, min(1.0, hi_c))
            if scheme == "lds":
                window = torch.from_numpy(lds_kernel(kernel, ks, sigma))
                eff = torch.from_numpy(lds_smooth(eff.numpy(), window.numpy()))
            eff = torch.where(eff > 0, eff, torch.full_like(eff, single))
            w = 1.0 / eff
        if self.share_weight_below is not None:
            w = w.clone()
            w[: self.share_weight_below] = w[self.share_weight_below]
        if normalize == "mean":
            total = float((n * w).sum())
            if total > 0:
                w = w * (float(n.sum()) / total)
        return w

    def _table(self, scheme: str, normalize: str, device: torch.device, dtype: torch.dtype,
               kw: dict[str, Any]) -> torch.Tensor:
        key = (scheme, normalize, device, dtype, tuple(sorted(kw.items())))
        table = self._table_cache.get(key)
        if table is None:
            table = self.weights(scheme, normalize, **kw).to(device=device, dtype=dtype)
            self._table_cache[key] = table
        return table

    def sample_weights(
        self,
        targets: Any,
        scheme: Scheme | str = "sqrt_inv",
        normalize: Normalize | str = "mean",
        *,
        clamp: bool | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Weight of every target: a table look-up, same shape and device as ``targets``.

        ``dtype`` defaults to the targets' floating dtype (float32 for integer targets). Extra
        keyword arguments go to :meth:`weights`. The per-bin table is cached per device.
        """
        t = _as_tensor(targets, "targets")
        if dtype is None:
            dtype = t.dtype if t.is_floating_point() else torch.float32
        idx = self.bin_index(t, clamp=clamp)
        return self._table(scheme, normalize, idx.device, dtype, kwargs)[idx]

    # ------------------------------------------------------------------ regions
    def thresholds(self, many: float | None = None, few: float | None = None
                   ) -> tuple[float, float]:
        """``(many, few)``: the values given, else the bins' own; validated."""
        return _check_thresholds(self.many if many is None else many,
                                 self.few if few is None else few)

    def set_thresholds(self, many: float | None = None, few: float | None = None) -> LabelBins:
        """Store new region thresholds (``None`` keeps the current one); returns ``self``."""
        self.many, self.few = self.thresholds(many, few)
        return self

    def regions(self, many: float | None = None, few: float | None = None) -> list[str]:
        """One of ``"many" | "medium" | "few"`` per bin: many when the training count is
        ``> many``, few when ``< few`` (empty bins included), medium otherwise. ``None``
        thresholds are the bins' own (:attr:`many`, :attr:`few`)."""
        return [REGIONS[i] for i in self.region_index(many, few).tolist()]

    def region_index(self, many: float | None = None, few: float | None = None) -> torch.Tensor:
        """Per-bin region code (int64): 0 many, 1 medium, 2 few."""
        many, few = self.thresholds(many, few)
        c = self.counts
        code = torch.ones_like(c)
        code[c > many] = 0
        code[c < few] = 2
        return code

    def region_of(self, targets: Any, many: float | None = None, few: float | None = None,
                  clamp: bool | None = None) -> torch.Tensor:
        """Region code (0 many, 1 medium, 2 few) of every target, on the targets' device."""
        idx = self.bin_index(targets, clamp=clamp)
        return self.region_index(many, few).to(idx.device)[idx]

    def region_mask(self, targets: Any, region: str, many: float | None = None,
                    few: float | None = None, clamp: bool | None = None) -> torch.Tensor:
        """Boolean mask of the targets that fall in ``region`` (``"all"`` selects every one)."""
        if region == "all":
            t = _as_tensor(targets, "targets")
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        check_region(region)
        return self.region_of(targets, many, few, clamp) == REGIONS.index(region)

    def region_counts(self, many: float | None = None, few: float | None = None,
                      nonempty: bool = True) -> dict[str, int]:
        """Number of bins per region (only bins holding training samples when ``nonempty``)."""
        code = self.region_index(many, few)
        if nonempty:
            code = code[self.counts > 0]
        return {r: int((code == i).sum()) for i, r in enumerate(REGIONS)}

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (for checkpoints and JSON); :meth:`from_dict` inverts it."""
        return {
            "edges": self.edges.tolist(),
            "counts": self.counts.tolist(),
            "clamp": self.clamp,
            "share_weight_below": self.share_weight_below,
            "many": self.many,
            "few": self.few,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelBins:
        """Inverse of :meth:`to_dict`; dicts saved before the thresholds were stored load with
        the defaults (many 100, few 20)."""
        return cls(d["edges"], d["counts"], clamp=d.get("clamp", False),
                   share_weight_below=d.get("share_weight_below"),
                   many=d.get("many", 100), few=d.get("few", 20))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelBins):
            return NotImplemented
        return (torch.equal(self.edges, other.edges) and torch.equal(self.counts, other.counts)
                and self.clamp == other.clamp
                and self.share_weight_below == other.share_weight_below
                and self.many == other.many and self.few == other.few)

    __hash__ = None  # type: ignore[assignment]
