r"""The DIR metrics as :class:`torchmetrics.Metric` subclasses (the ``torchmetrics`` extra).

:class:`RegressionMetrics` here computes the same report as
:class:`balanced_sam.metrics.RegressionMetrics` (MAE, MSE, RMSE, GM, bMAE and the depth
metrics, overall and per many / medium / few region) but keeps its running sums as metric
states, so that under DDP every rank's sums are added before ``compute()``
(``dist_reduce_fx="sum"``) and ``self.log`` / ``MetricCollection`` in Lightning work::

    from balanced_sam.integrations.torchmetrics import RegionMetric, RegressionMetrics

    val_few_mae = RegionMetric(bins, region="few", metric="mae")   # a scalar: self.log(...)
    report = RegressionMetrics(bins)                                # the whole report
    report.update(preds, targets)
    report.compute()["few"]["gm"]

State: per bin of the :class:`~balanced_sam.LabelBins`, the sample count and the sums of
:math:`|e|`, :math:`e^2`, :math:`\log\max(|e|, \epsilon)` and of exact zeros (plus the depth
sums), float64 tensors of shape ``(K,)`` reduced by sum, and the smallest and largest test
label seen per bin (reduced by min and max) for ``balance="auto"``, which balances per label
when no bin holds two distinct labels and per bin otherwise (then per-bin and per-label MAE
coincide). The balanced MAE over distinct labels (``balance="label"``) needs the set of labels
seen, which differs between ranks: it is kept as three concatenated states (distinct label
values, their counts, their absolute-error sums), compacted within a rank as batches arrive and
merged by label after the gather, so every rank computes the same bMAE as one process that saw
all the data.
"""

from __future__ import annotations

import math
from typing import Any

import torch

try:
    from torchmetrics import Metric
    from torchmetrics.utilities import dim_zero_cat
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError(
        "balanced_sam.integrations.torchmetrics needs the torchmetrics package: "
        "pip install 'balanced-sam[torchmetrics]'", name=exc.name) from exc

from balanced_sam.bins import REGIONS, LabelBins
from balanced_sam.metrics import BASE_METRICS, DEPTH_METRICS, REPORT_REGIONS

__all__ = ["RegressionMetrics", "RegionMetric", "flatten_report"]

BALANCES = ("auto", "label", "bin")

Report = dict[str, dict[str, float]]

_SUMS = ("n", "abs", "sq", "log", "zero")
_DEPTH_SUMS = ("d1", "d2", "d3", "rel", "l10")
# compact the per-label lists once they hold this many batches
_COMPACT_EVERY = 32


def _merge_labels(values: torch.Tensor, n: torch.Tensor, a: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum the counts and absolute errors of equal label values."""
    uniq, inv = torch.unique(values, return_inverse=True)
    nn = torch.zeros(uniq.numel(), dtype=torch.float64, device=values.device)
    aa = torch.zeros(uniq.numel(), dtype=torch.float64, device=values.device)
    nn.index_add_(0, inv, n)
    aa.index_add_(0, inv, a)
    return uniq, nn, aa


class RegressionMetrics(Metric):
    """Streaming DIR metrics that sync across DDP ranks; ``compute()`` gives the report
    ``{region: {metric: value}}`` of :class:`balanced_sam.metrics.RegressionMetrics`.

    Args:
        bins: the :class:`~balanced_sam.LabelBins` of the *training* labels.
        many: region threshold on the training count (``> many``: many-shot); ``None``
            (default) takes the bins' own (``bins.many``, 100 where the bins have none).
        few: region threshold on the training count (``< few``: few-shot); ``None`` (default)
            takes ``bins.few`` (else 20).
        depth: add the depth metrics (delta1-3, abs_rel, log10).
        balance: ``"auto"`` (default), ``"label"`` (bMAE over distinct test labels) or
            ``"bin"`` (over test bins); after :meth:`compute`, :attr:`balance_used` says which
            one applied.
        gm_eps: floor of the absolute error inside the GM's log (``0``: reference behaviour).
        min_depth: floor of the prediction for the depth ratio metrics.
        clamp: map test labels outside the bin range to the end bins instead of raising.
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``,
            ``process_group``, ...).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better: bool | None = False

    # the states (add_state sets them); the list states become tensors during a DDP sync
    sum_n: torch.Tensor
    label_lo: torch.Tensor
    label_hi: torch.Tensor
    label_values: list[torch.Tensor]
    label_n: list[torch.Tensor]
    label_abs: list[torch.Tensor]

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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(bins, LabelBins):
            raise TypeError(f"bins must be a LabelBins, got {type(bins).__name__}")
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        if not gm_eps >= 0:
            raise ValueError(f"gm_eps must be >= 0, got {gm_eps!r}")
        self.bins = bins
        self.many: float = getattr(bins, "many", 100) if many is None else many
        self.few: float = getattr(bins, "few", 20) if few is None else few
        #: ``"label"`` or ``"bin"``: how the last :meth:`compute` balanced ``bmae``
        self.balance_used: str | None = None
        self.depth = bool(depth)
        self.balance = balance
        self.gm_eps = float(gm_eps)
        self.min_depth = float(min_depth)
        self.clamp = clamp
        self._region_code = bins.region_index(self.many, self.few)  # type: ignore[arg-type]
        k = bins.num_bins
        for name in _SUMS + (_DEPTH_SUMS if self.depth else ()):
            self.add_state(f"sum_{name}", default=torch.zeros(k, dtype=torch.float64),
                           dist_reduce_fx="sum")
        self.add_state("label_lo", default=torch.full((k,), math.inf, dtype=torch.float64),
                       dist_reduce_fx="min")
        self.add_state("label_hi", default=torch.full((k,), -math.inf, dtype=torch.float64),
                       dist_reduce_fx="max")
        if balance == "label":
            for name in ("label_values", "label_n", "label_abs"):
                self.add_state(name, default=[], dist_reduce_fx="cat")
        # float64 is the dtype of every state; torchmetrics uses it for the empty tensor it
        # gathers from a rank that saw no data
        self.set_dtype(torch.float64)

    def _sum(self, name: str) -> torch.Tensor:
        state: torch.Tensor = getattr(self, f"sum_{name}")
        return state

    @torch.no_grad()
    def update(self, preds: torch.Tensor, targets: torch.Tensor,
               mask: torch.Tensor | None = None) -> None:
        """Add a batch: ``preds`` and ``targets`` of one shape (any); ``mask`` selects the
        elements that count."""
        preds = torch.as_tensor(preds)
        targets = torch.as_tensor(targets)
        if preds.shape != targets.shape:
            if preds.numel() == targets.numel():
                preds = preds.reshape(targets.shape)
            else:
                raise ValueError(f"preds shape {tuple(preds.shape)} does not match targets "
                                 f"shape {tuple(targets.shape)}")
        dev = self.sum_n.device
        p = preds.detach().reshape(-1).to(dev, torch.float64)
        t = targets.detach().reshape(-1).to(dev, torch.float64)
        if mask is not None:
            m = torch.as_tensor(mask).detach().to(dev, torch.bool)
            m = m.expand(targets.shape).reshape(-1)
            p, t = p[m], t[m]
        if t.numel() == 0:
            return
        if not bool(torch.isfinite(p).all()):
            raise ValueError("preds hold NaN/inf values: the model diverged or the input is bad")
        idx = self.bins.bin_index(t, clamp=self.clamp)
        err = p - t
        ae = err.abs()
        zero = ae == 0
        self.sum_n += torch.bincount(idx, minlength=self.bins.num_bins).to(torch.float64)
        self._sum("abs").index_add_(0, idx, ae)
        self._sum("sq").index_add_(0, idx, err.square())
        self._sum("zero").index_add_(0, idx, zero.to(torch.float64))
        if self.gm_eps > 0:
            self._sum("log").index_add_(0, idx, ae.clamp_min(self.gm_eps).log())
        else:
            self._sum("log").index_add_(0, idx, torch.where(zero, 0.0, ae.log()))
        if self.depth:
            pd = p.clamp_min(self.min_depth)
            ratio = torch.maximum(pd / t, t / pd)
            for k in (1, 2, 3):
                self._sum(f"d{k}").index_add_(0, idx, (ratio < 1.25**k).to(torch.float64))
            self._sum("rel").index_add_(0, idx, ae / t)
            self._sum("l10").index_add_(0, idx, (pd.log10() - t.log10()).abs())
        self.label_lo.scatter_reduce_(0, idx, t, "amin")
        self.label_hi.scatter_reduce_(0, idx, t, "amax")
        if self.balance == "label":
            v, n, a = _merge_labels(t, torch.ones_like(t), ae)
            self.label_values.append(v)
            self.label_n.append(n)
            self.label_abs.append(a)
            if len(self.label_values) >= _COMPACT_EVERY:
                v, n, a = _merge_labels(dim_zero_cat(self.label_values),
                                        dim_zero_cat(self.label_n), dim_zero_cat(self.label_abs))
                self.label_values[:] = [v]
                self.label_n[:] = [n]
                self.label_abs[:] = [a]

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another instance's (or a state dict's) sums and labels to this one's, as the
        DDP sync does; a cached ``compute()`` result is dropped."""
        super().merge_state(incoming_state)
        self._computed = None

    def _labels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = [self.label_values, self.label_n, self.label_abs]
        if any(isinstance(x, list) and not x for x in parts):
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty, empty
        v, n, a = (dim_zero_cat(x).to("cpu", torch.float64) for x in parts)
        return _merge_labels(v, n, a)

    def compute(self) -> Report:
        """The report ``{region: {metric: value}}`` for region in all/many/medium/few (values
        are Python floats; ``count`` an int; an empty region reports NaN)."""
        s = {name: self._sum(name).to("cpu", torch.float64)
             for name in _SUMS + (_DEPTH_SUMS if self.depth else ())}
        if self.balance == "auto":
            # discrete labels (one per bin): per-bin MAE is per-label MAE
            self.balance_used = "bin" if bool((self.label_hi > self.label_lo).any()) else "label"
        else:
            self.balance_used = self.balance
        per_label = self.balance == "label"
        if per_label:
            labels, label_n, label_abs = self._labels()
            lab_bin = self.bins.bin_index(labels, clamp=self.clamp)
            lab_mae = label_abs / label_n
        out: Report = {}
        for region in REPORT_REGIONS:
            if region == "all":
                sel = torch.ones(self.bins.num_bins, dtype=torch.bool)
            else:
                sel = self._region_code == REGIONS.index(region)
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
                r["bmae"] = float(lab_mae[sel[lab_bin]].mean())
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


class RegionMetric(RegressionMetrics):
    """One figure of the report as a scalar tensor, for ``self.log(name, metric)`` in
    Lightning: e.g. ``RegionMetric(bins, region="few", metric="mae")``.

    Args:
        bins: the :class:`~balanced_sam.LabelBins` of the training labels.
        metric: one of mae, mse, rmse, gm, bmae, count (and delta1-3, abs_rel, log10 with
            ``depth=True``).
        region: all, many, medium or few.
        **kwargs: as :class:`RegressionMetrics` (``many``, ``few``, ``balance``, ...).
    """

    def __init__(self, bins: LabelBins, metric: str = "mae", region: str = "all",
                 **kwargs: Any) -> None:
        super().__init__(bins, **kwargs)
        allowed = BASE_METRICS + (DEPTH_METRICS if self.depth else ())
        if metric not in allowed:
            raise ValueError(f"metric must be one of {', '.join(allowed)}, got {metric!r}")
        if region not in REPORT_REGIONS:
            raise ValueError(f"region must be one of {', '.join(REPORT_REGIONS)}, "
                             f"got {region!r}")
        self.metric, self.region = metric, region

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        """True for the delta (accuracy) metrics, False for the errors."""
        return self.metric.startswith("delta")

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        """The chosen figure as a 0-dim float64 tensor (NaN for an empty region)."""
        return torch.tensor(super().compute()[self.region][self.metric], dtype=torch.float64)


def flatten_report(report: Report, prefix: str = "") -> dict[str, float]:
    """``{"{prefix}{region}/{metric}": value}``: a report as one flat dict for loggers
    (``self.log_dict`` in Lightning, ``wandb.log``)."""
    return {f"{prefix}{region}/{metric}": value
            for region, metrics in report.items() for metric, value in metrics.items()}
