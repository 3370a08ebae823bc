r"""The metrics of deep imbalanced regression, overall and per region (many / medium / few).

A test sample's region is that of its label's bin, judged by the *training* count of the bin
(:meth:`LabelBins.regions`). Per region the report holds:

* ``mae``, ``mse``, ``rmse``;
* ``gm``: geometric mean of the absolute errors, :math:`\exp(\frac1n\sum_i \log |e_i|)`. An exact
  zero error would make it 0 (as in the reference code, whatever the other errors are); here
  every absolute error is floored at ``gm_eps`` (default ``1e-8`` target units) before the log,
  so one exact prediction moves the GM by a bounded amount. ``gm_eps=0`` gives the reference
  behaviour (GM 0 as soon as one error is exactly 0);
* ``bmae``: balanced MAE, the mean of the per-label MAE over the distinct test labels
  (``balance="label"``) or of the per-bin MAE over the bins holding test samples
  (``balance="bin"``). The default, ``balance="auto"``, balances per label when the test labels
  are discrete at the bins' resolution (no bin holds two distinct test labels, as ages in
  1-year bins) and per bin otherwise (prices, angles, depths: per label, a continuous target
  would make bMAE equal to MAE). When no bin holds two distinct labels the two definitions
  give the same number, so ``"auto"`` needs no per-label bookkeeping; which one applied is in
  :attr:`RegressionMetrics.balance_used` (and :func:`resolve_balance` answers it for a set of
  test labels), to be recorded beside the report as ``"bmae_balance"``;
* ``count``: the number of test samples (elements, for dense targets).

Depth (dense) targets add ``delta1``, ``delta2``, ``delta3`` (share with
:math:`\max(p/g, g/p) < 1.25^k`), ``abs_rel`` (:math:`|p-g|/g`) and ``log10``
(:math:`|\log_{10} p - \log_{10} g|`); predictions are floored at ``min_depth`` for those.

An empty region reports ``count`` 0 and NaN for every other metric. Everything is accumulated
per bin (and per label), so :class:`RegressionMetrics` streams over test sets of any size:
``update()`` per batch, ``compute()`` at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from balanced_sam.bins import REGIONS, LabelBins

__all__ = [
    "RegressionMetrics",
    "resolve_balance",
    "BALANCES",
    "regression_report",
    "depth_report",
    "format_table",
    "REPORT_REGIONS",
    "BASE_METRICS",
    "DEPTH_METRICS",
]

REPORT_REGIONS = ("all",) + REGIONS
BASE_METRICS = ("mae", "mse", "rmse", "gm", "bmae", "count")
DEPTH_METRICS = ("delta1", "delta2", "delta3", "abs_rel", "log10")

Report = dict[str, dict[str, float]]
BALANCES = ("auto", "label", "bin")


def resolve_balance(targets: Any, bins: LabelBins, clamp: bool | None = None) -> str:
    """``"label"`` when no bin holds two distinct values of ``targets`` (labels discrete at the
    bins' resolution), else ``"bin"``: what ``balance="auto"`` uses for these test labels."""
    t = torch.as_tensor(targets).detach().reshape(-1).to("cpu", torch.float64)
    if t.numel() == 0:
        return "label"
    idx = bins.bin_index(t, clamp=clamp)
    lo = torch.full((bins.num_bins,), math.inf, dtype=torch.float64).scatter_reduce(
        0, idx, t, "amin")
    hi = torch.full((bins.num_bins,), -math.inf, dtype=torch.float64).scatter_reduce(
        0, idx, t, "amax")
    return "bin" if bool((hi > lo).any()) else "label"


class RegressionMetrics:
    """Streaming DIR metrics: ``update(preds, targets[, mask])`` then ``compute()``.

    Args:
        bins: the :class:`LabelBins` of the *training* labels.
        many, few: region thresholds on the training count (``> many``: many; ``< few``: few);
            ``None`` (default) takes the bins' own (``bins.many``, ``bins.few``).
        depth: add the depth metrics (delta1-3, abs_rel, log10).
        balance: ``"auto"`` (default), ``"label"`` or ``"bin"``: what ``bmae`` averages over
            (see the module docstring); after :meth:`compute`, :attr:`balance_used` says which
            one applied.
        gm_eps: floor of the absolute error inside the GM's log (``0``: reference behaviour).
        min_depth: floor of the prediction for the depth ratio metrics.
        clamp: map test labels outside the bin range to the end bins instead of raising.
    """

    def __init__(
        self,
        bins: LabelBins,
        many: float | None = None,
        few: float | None = None,
        *,
        depth: bool = False,
        balance: str = "auto",
        gm_eps: float = 1e-8,
        min_depth: float = 1e-3,
        clamp: bool | None = None,
    ) -> None:
        if not isinstance(bins, LabelBins):
            raise TypeError(f"bins must be a LabelBins, got {type(bins).__name__}")
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        if not gm_eps >= 0:
            raise ValueError(f"gm_eps must be >= 0, got {gm_eps!r}")
        self.bins = bins
        self.many = bins.many if many is None else many
        self.few = bins.few if few is None else few
        self.region_code = bins.region_index(self.many, self.few)
        self.depth = depth
        self.balance = balance
        #: ``"label"`` or ``"bin"``: how the last :meth:`compute` balanced ``bmae``
        self.balance_used: str | None = None
        self.gm_eps = float(gm_eps)
        self.min_depth = float(min_depth)
        self.clamp = clamp
        self.reset()

    _SUMS = ("n", "abs", "sq", "log", "zero")
    _DEPTH_SUMS = ("d1", "d2", "d3", "rel", "l10")

    def reset(self) -> None:
        k = self.bins.num_bins
        names = self._SUMS + (self._DEPTH_SUMS if self.depth else ())
        self._sums = {n: torch.zeros(k, dtype=torch.float64) for n in names}
        self._labels = torch.zeros(0, dtype=torch.float64)
        self._label_n = torch.zeros(0, dtype=torch.float64)
        self._label_abs = torch.zeros(0, dtype=torch.float64)
        self._lab_lo = torch.full((k,), math.inf, dtype=torch.float64)
        self._lab_hi = torch.full((k,), -math.inf, dtype=torch.float64)
        self.balance_used = None

    @torch.no_grad()
    def update(self, preds: torch.Tensor, targets: torch.Tensor,
               mask: torch.Tensor | None = None) -> None:
        """Add a batch. ``preds`` and ``targets`` have the same shape (any); ``mask`` selects
        the elements that count (e.g. the balanced depth test mask)."""
        preds = torch.as_tensor(preds)
        targets = torch.as_tensor(targets)
        if preds.shape != targets.shape:
            if preds.numel() == targets.numel():
                preds = preds.reshape(targets.shape)
            else:
                raise ValueError(f"preds shape {tuple(preds.shape)} does not match targets "
                                 f"shape {tuple(targets.shape)}")
        p = preds.detach().reshape(-1).to("cpu", torch.float64)
        t = targets.detach().reshape(-1).to("cpu", torch.float64)
        if mask is not None:
            m = torch.as_tensor(mask).detach().to("cpu", torch.bool)
            m = m.expand(targets.shape).reshape(-1)
            p, t = p[m], t[m]
        if t.numel() == 0:
            return
        if not bool(torch.isfinite(p).all()):
            raise ValueError("preds hold NaN/inf values: the model diverged or the input is bad")
        idx = self.bins.bin_index(t, clamp=self.clamp)
        err = p - t
        ae = err.abs()
        s = self._sums
        s["n"] += torch.bincount(idx, minlength=self.bins.num_bins).to(torch.float64)
        s["abs"].index_add_(0, idx, ae)
        s["sq"].index_add_(0, idx, err.square())
        zero = ae == 0
        s["zero"].index_add_(0, idx, zero.to(torch.float64))
        if self.gm_eps > 0:
            s["log"].index_add_(0, idx, ae.clamp_min(self.gm_eps).log())
        else:
            s["log"].index_add_(0, idx, torch.where(zero, 0.0, ae.log()))
        if self.depth:
            pd = p.clamp_min(self.min_depth)
            ratio = torch.maximum(pd / t, t / pd)
            for k, name in enumerate(("d1", "d2", "d3"), start=1):
                s[name].index_add_(0, idx, (ratio < 1.25**k).to(torch.float64))
            s["rel"].index_add_(0, idx, ae / t)
            s["l10"].index_add_(0, idx, (pd.log10() - t.log10()).abs())
        self._lab_lo.scatter_reduce_(0, idx, t, "amin")
        self._lab_hi.scatter_reduce_(0, idx, t, "amax")
        if self.balance == "label":
            labels = torch.cat([self._labels, t])
            uniq, inv = torch.unique(labels, return_inverse=True)
            n = torch.zeros(uniq.numel(), dtype=torch.float64)
            a = torch.zeros(uniq.numel(), dtype=torch.float64)
            old = inv[: self._labels.numel()]
            new = inv[self._labels.numel():]
            n.index_add_(0, old, self._label_n)
            a.index_add_(0, old, self._label_abs)
            n.index_add_(0, new, torch.ones_like(t))
            a.index_add_(0, new, ae)
            self._labels, self._label_n, self._label_abs = uniq, n, a

    def _region_bins(self, region: str) -> torch.Tensor:
        if region == "all":
            return torch.ones(self.bins.num_bins, dtype=torch.bool)
        return self.region_code == REGIONS.index(region)

    def compute(self) -> Report:
        """The report ``{region: {metric: value}}`` for region in all/many/medium/few (every
        value a number; how ``bmae`` was balanced is :attr:`balance_used`)."""
        s = self._sums
        if self.balance == "auto":
            # discrete labels: one label per bin, so per-bin MAE is per-label MAE
            self.balance_used = "bin" if bool((self._lab_hi > self._lab_lo).any()) else "label"
        else:
            self.balance_used = self.balance
        per_label = self.balance == "label"
        if per_label and self._labels.numel():
            lab_bin = self.bins.bin_index(self._labels, clamp=self.clamp)
            lab_mae = self._label_abs / self._label_n
        out: Report = {}
        for region in REPORT_REGIONS:
            sel = self._region_bins(region)
            n = float(s["n"][sel].sum())
            r: dict[str, float] = {"count": int(n)}
            if n == 0:
                for m in BASE_METRICS + (DEPTH_METRICS if self.depth else ()):
                    if m != "count":
                        r[m] = math.nan
                out[region] = r
                continue
            r["mae"] = float(s["abs"][sel].sum()) / n
            r["mse"] = float(s["sq"][sel].sum()) / n
            r["rmse"] = math.sqrt(r["mse"])
            if self.gm_eps == 0 and float(s["zero"][sel].sum()) > 0:
                r["gm"] = 0.0
            else:
                r["gm"] = math.exp(float(s["log"][sel].sum()) / n)
            if per_label:
                in_region = sel[lab_bin]
                r["bmae"] = float(lab_mae[in_region].mean())
            else:
                nb = s["n"][sel]
                r["bmae"] = float((s["abs"][sel][nb > 0] / nb[nb > 0]).mean())
            if self.depth:
                for k in (1, 2, 3):
                    r[f"delta{k}"] = float(s[f"d{k}"][sel].sum()) / n
                r["abs_rel"] = float(s["rel"][sel].sum()) / n
                r["log10"] = float(s["l10"][sel].sum()) / n
            out[region] = r
        return out

    def per_bin(self) -> dict[str, list[Any]]:
        """Per-bin ``count`` and ``mae`` (None where the bin has no test sample)."""
        n = self._sums["n"]
        mae = self._sums["abs"] / n.clamp_min(1)
        return {
            "count": [int(v) for v in n.tolist()],
            "mae": [None if c == 0 else float(m) for c, m in zip(n.tolist(), mae.tolist())],
        }


def regression_report(
    preds: torch.Tensor,
    targets: torch.Tensor,
    bins: LabelBins,
    many: float | None = None,
    few: float | None = None,
    *,
    mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> Report:
    """``report[region][metric]`` for region in all/many/medium/few and metric in mae, mse,
    rmse, gm, bmae, count; see :class:`RegressionMetrics` for the options."""
    m = RegressionMetrics(bins, many, few, **kwargs)
    m.update(preds, targets, mask)
    return m.compute()


def depth_report(preds: torch.Tensor, targets: torch.Tensor, bins: LabelBins,
                 many: float | None = None, few: float | None = None, *,
                 mask: torch.Tensor | None = None,
                 **kwargs: Any) -> Report:
    """:func:`regression_report` with the depth metrics (delta1-3, abs_rel, log10) added."""
    return regression_report(preds, targets, bins, many, few, mask=mask, depth=True, **kwargs)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value), NaN/None left out."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def aggregate_reports(reports: Sequence[Report]) -> tuple[Report, Report]:
    """Mean and sample standard deviation of several reports (e.g. over seeds); NaN entries
    (empty regions) are left out of the mean."""
    if not reports:
        raise ValueError("reports is empty")
    mean: Report = {}
    std: Report = {}
    for region, metrics in reports[0].items():
        mean[region], std[region] = {}, {}
        for metric in metrics:
            m, s = mean_std([r[region][metric] for r in reports])
            mean[region][metric], std[region][metric] = m, s
    return mean, std


_REGION_LABEL = {"all": "All", "many": "Many", "medium": "Med.", "few": "Few"}
_METRIC_LABEL = {"mae": "MAE", "mse": "MSE", "rmse": "RMSE", "gm": "GM", "bmae": "bMAE",
                 "delta1": "δ1", "delta2": "δ2", "delta3": "δ3", "abs_rel": "AbsRel",
                 "log10": "log10", "count": "n"}


def format_table(
    reports: Mapping[str, Report | Sequence[Report]],
    metrics: Iterable[str] = ("mae", "gm"),
    regions: Iterable[str] = REPORT_REGIONS,
    extra: Iterable[str] = ("bmae",),
    digits: int = 2,
    style: str = "markdown",
    std: bool = True,
) -> str:
    """Render reports as a paper-style table: one row per name, columns ``metric/region``.

    A value of ``reports`` is one report or a list of them (seeds): lists print as
    ``mean ± std`` (sample standard deviation over the list).
    ``extra`` metrics are shown for the "all" region only. ``style`` is ``"markdown"`` or
    ``"text"`` (aligned plain text).
    """
    if style not in ("markdown", "text"):
        raise ValueError(f"style must be 'markdown' or 'text', got {style!r}")
    metrics, regions, extra = list(metrics), list(regions), list(extra)
    cols = [(m, r) for m in metrics for r in regions] + [(m, "all") for m in extra]
    header = ["Method"]
    header += [f"{_METRIC_LABEL.get(m, m)} {_REGION_LABEL.get(r, r)}" for m in metrics
               for r in regions]
    header += [_METRIC_LABEL.get(m, m) for m in extra]
    rows = []
    for name, rep in reports.items():
        reps = [rep] if isinstance(rep, Mapping) else list(rep)
        mean, sd = aggregate_reports(reps)
        row = [name]
        for m, r in cols:
            v = mean.get(r, {}).get(m, math.nan)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                row.append("-")
                continue
            cell = f"{v:.{digits}f}"
            if std and len(reps) > 1:
                cell += f" ± {sd[r][m]:.{digits}f}"
            row.append(cell)
        rows.append(row)
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)
