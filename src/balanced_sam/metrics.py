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
    "NonFinitePredictionsError",
    "resolve_balance",
    "balance_of",
    "BALANCES",
    "regression_report",
    "depth_report",
    "format_table",
    "REPORT_REGIONS",
    "BASE_METRICS",
    "DEPTH_METRICS",
    "report_from_sums",
    "add_batch",
    "flat_batch",
    "merge_labels",
    "used_balance",
    "check_options",
    "sum_names",
    "SUM_NAMES",
    "DEPTH_SUM_NAMES",
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


def balance_of(train_labels: Any, bins: LabelBins) -> str:
    """What bMAE averages over for a dataset, decided once from its training labels (the rule of
    :func:`resolve_balance`), so that validation, test, ``bsam train``, ``eval`` and ``bench``
    agree. ``"auto"`` when the labels are unknown (a dataset without ``targets``): the metrics
    then decide from the labels they see (:attr:`RegressionMetrics.balance_used`)."""
    if train_labels is None:
        return "auto"
    return resolve_balance(train_labels, bins, clamp=True)


# The running sums, one float64 tensor of shape (num_bins,) each: the sample count and the sums
# of |e|, e^2, log max(|e|, gm_eps) and of exact zeros; depth adds the delta hits, |e|/g and
# |log10 p - log10 g|. RegressionMetrics keeps them in a dict, the torchmetrics class as
# metric states; both fill them with add_batch and read them with report_from_sums.
SUM_NAMES = ("n", "abs", "sq", "log", "zero")
DEPTH_SUM_NAMES = ("d1", "d2", "d3", "rel", "l10")


def sum_names(depth: bool) -> tuple[str, ...]:
    """The names of the per-bin sums kept for plain (``depth=False``) or depth metrics."""
    return SUM_NAMES + (DEPTH_SUM_NAMES if depth else ())


def check_options(bins: Any, balance: str, gm_eps: float) -> None:
    """Raise for a ``bins`` that is not a :class:`LabelBins`, an unknown ``balance`` or a
    negative ``gm_eps`` (the checks of both metrics classes)."""
    if not isinstance(bins, LabelBins):
        raise TypeError(f"bins must be a LabelBins, got {type(bins).__name__}")
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if not gm_eps >= 0:
        raise ValueError(f"gm_eps must be >= 0, got {gm_eps!r}")


class NonFinitePredictionsError(ValueError):
    """Predictions hold NaN/inf values: the model diverged (or its input is bad)."""


def flat_batch(preds: Any, targets: Any, mask: Any = None,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``preds`` and ``targets`` of the elements that count (``mask``), flattened to float64 on
    ``device``. Predictions of another shape but as many elements are reshaped; otherwise, and
    for NaN/inf predictions, ``ValueError``."""
    preds = torch.as_tensor(preds)
    targets = torch.as_tensor(targets)
    if preds.shape != targets.shape:
        if preds.numel() == targets.numel():
            preds = preds.reshape(targets.shape)
        else:
            raise ValueError(f"preds shape {tuple(preds.shape)} does not match targets "
                             f"shape {tuple(targets.shape)}")
    p = preds.detach().reshape(-1).to(device, torch.float64)
    t = targets.detach().reshape(-1).to(device, torch.float64)
    if mask is not None:
        m = torch.as_tensor(mask).detach().to(device, torch.bool)
        m = m.expand(targets.shape).reshape(-1)
        p, t = p[m], t[m]
    if t.numel() and not bool(torch.isfinite(p).all()):
        raise NonFinitePredictionsError("preds hold NaN/inf values: the model diverged or the "
                                        "input is bad")
    return p, t


def add_batch(sums: Mapping[str, torch.Tensor], idx: torch.Tensor, p: torch.Tensor,
              t: torch.Tensor, *, gm_eps: float, min_depth: float) -> torch.Tensor:
    """Add a batch (flat float64 predictions ``p``, targets ``t`` and their bin indices
    ``idx``) to the per-bin ``sums`` in place (the depth sums when ``sums`` holds them).
    Returns the absolute errors, for per-label bookkeeping."""
    err = p - t
    ae = err.abs()
    sums["n"].add_(torch.bincount(idx, minlength=sums["n"].numel()).to(torch.float64))
    sums["abs"].index_add_(0, idx, ae)
    sums["sq"].index_add_(0, idx, err.square())
    zero = ae == 0
    sums["zero"].index_add_(0, idx, zero.to(torch.float64))
    if gm_eps > 0:
        sums["log"].index_add_(0, idx, ae.clamp_min(gm_eps).log())
    else:
        sums["log"].index_add_(0, idx, torch.where(zero, 0.0, ae.log()))
    if "d1" in sums:
        pd = p.clamp_min(min_depth)
        ratio = torch.maximum(pd / t, t / pd)
        for k in (1, 2, 3):
            sums[f"d{k}"].index_add_(0, idx, (ratio < 1.25**k).to(torch.float64))
        sums["rel"].index_add_(0, idx, ae / t)
        sums["l10"].index_add_(0, idx, (pd.log10() - t.log10()).abs())
    return ae


def merge_labels(values: torch.Tensor, n: torch.Tensor, a: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-label bookkeeping: the distinct ``values`` (sorted) with the summed counts ``n`` and
    absolute errors ``a`` of the entries holding each."""
    uniq, inv = torch.unique(values, return_inverse=True)
    nn = torch.zeros(uniq.numel(), dtype=torch.float64, device=values.device)
    aa = torch.zeros(uniq.numel(), dtype=torch.float64, device=values.device)
    nn.index_add_(0, inv, n)
    aa.index_add_(0, inv, a)
    return uniq, nn, aa


def used_balance(balance: str, label_lo: torch.Tensor, label_hi: torch.Tensor) -> str:
    """``"label"`` or ``"bin"``: what ``balance`` means given the smallest and largest test
    label seen per bin. ``"auto"`` is ``"label"`` when no bin holds two distinct labels (then
    per-bin MAE is per-label MAE), else ``"bin"``."""
    if balance != "auto":
        return balance
    return "bin" if bool((label_hi > label_lo).any()) else "label"


def report_from_sums(
    sums: Mapping[str, torch.Tensor],
    region_code: torch.Tensor,
    *,
    gm_eps: float,
    labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    label_bin: torch.Tensor | None = None,
) -> Report:
    """The report ``{region: {metric: value}}`` from the per-bin ``sums`` (depth metrics when
    they hold the depth sums); ``region_code`` is the per-bin region (0 many, 1 medium, 2 few,
    :meth:`LabelBins.region_index`). ``bmae`` averages the per-bin MAE of the bins holding test
    samples, or, given ``labels`` (distinct values, counts, absolute-error sums: the
    ``balance="label"`` bookkeeping) and ``label_bin`` (each value's bin), the per-label MAE."""
    s = {name: v.to("cpu", torch.float64) for name, v in sums.items()}
    depth = "d1" in s
    lab_mae = None
    if labels is not None:
        if label_bin is None:
            raise ValueError("label_bin is needed with labels")
        lab_mae = labels[2].to("cpu", torch.float64) / labels[1].to("cpu", torch.float64)
        label_bin = label_bin.to("cpu")
    region_code = region_code.to("cpu")
    out: Report = {}
    for region in REPORT_REGIONS:
        if region == "all":
            sel = torch.ones_like(region_code, dtype=torch.bool)
        else:
            sel = region_code == REGIONS.index(region)
        n = float(s["n"][sel].sum())
        r: dict[str, float] = {"count": int(n)}
        if n == 0:
            for m in BASE_METRICS + (DEPTH_METRICS if depth else ()):
                if m != "count":
                    r[m] = math.nan
            out[region] = r
            continue
        r["mae"] = float(s["abs"][sel].sum()) / n
        r["mse"] = float(s["sq"][sel].sum()) / n
        r["rmse"] = math.sqrt(r["mse"])
        if gm_eps == 0 and float(s["zero"][sel].sum()) > 0:
            r["gm"] = 0.0
        else:
            r["gm"] = math.exp(float(s["log"][sel].sum()) / n)
        if lab_mae is not None and label_bin is not None:
            r["bmae"] = float(lab_mae[sel[label_bin]].mean())
        else:
            nb = s["n"][sel]
            r["bmae"] = float((s["abs"][sel][nb > 0] / nb[nb > 0]).mean())
        if depth:
            for k in (1, 2, 3):
                r[f"delta{k}"] = float(s[f"d{k}"][sel].sum()) / n
            r["abs_rel"] = float(s["rel"][sel].sum()) / n
            r["log10"] = float(s["l10"][sel].sum()) / n
        out[region] = r
    return out


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
        check_options(bins, balance, gm_eps)
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

    def reset(self) -> None:
        """Forget every batch added so far."""
        k = self.bins.num_bins
        self._sums = {n: torch.zeros(k, dtype=torch.float64) for n in sum_names(self.depth)}
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
        p, t = flat_batch(preds, targets, mask)
        if t.numel() == 0:
            return
        idx = self.bins.bin_index(t, clamp=self.clamp)
        ae = add_batch(self._sums, idx, p, t, gm_eps=self.gm_eps, min_depth=self.min_depth)
        self._lab_lo.scatter_reduce_(0, idx, t, "amin")
        self._lab_hi.scatter_reduce_(0, idx, t, "amax")
        if self.balance == "label":
            self._labels, self._label_n, self._label_abs = merge_labels(
                torch.cat([self._labels, t]), torch.cat([self._label_n, torch.ones_like(t)]),
                torch.cat([self._label_abs, ae]))

    def compute(self) -> Report:
        """The report ``{region: {metric: value}}`` for region in all/many/medium/few (every
        value a number; how ``bmae`` was balanced is :attr:`balance_used`)."""
        self.balance_used = used_balance(self.balance, self._lab_lo, self._lab_hi)
        if self.balance != "label":
            return report_from_sums(self._sums, self.region_code, gm_eps=self.gm_eps)
        return report_from_sums(
            self._sums, self.region_code, gm_eps=self.gm_eps,
            labels=(self._labels, self._label_n, self._label_abs),
            label_bin=self.bins.bin_index(self._labels, clamp=self.clamp))

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
