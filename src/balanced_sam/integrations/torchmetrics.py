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

from balanced_sam.bins import LabelBins, check_region
from balanced_sam.metrics import (
    BASE_METRICS,
    DEPTH_METRICS,
    Report,
    add_batch,
    check_options,
    flat_batch,
    merge_labels,
    report_from_sums,
    sum_names,
    used_balance,
)

__all__ = ["RegressionMetrics", "RegionMetric", "flatten_report"]

# compact the per-label lists once they hold this many batches
_COMPACT_EVERY = 32


class RegressionMetrics(Metric):
    """Streaming DIR metrics that sync across DDP ranks; ``compute()`` gives the report
    ``{region: {metric: value}}`` of :class:`balanced_sam.metrics.RegressionMetrics`.

    Args:
        bins: the :class:`~balanced_sam.LabelBins` of the *training* labels.
        many: region threshold on the training count (``> many``: many-shot); ``None``
            (default) takes the bins' own (``bins.many``).
        few: region threshold on the training count (``< few``: few-shot); ``None`` (default)
            takes the bins' own (``bins.few``).
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
        check_options(bins, balance, gm_eps)
        self.bins = bins
        self.many: float = bins.many if many is None else many
        self.few: float = bins.few if few is None else few
        #: ``"label"`` or ``"bin"``: how the last :meth:`compute` balanced ``bmae``
        self.balance_used: str | None = None
        self.depth = bool(depth)
        self.balance = balance
        self.gm_eps = float(gm_eps)
        self.min_depth = float(min_depth)
        self.clamp = clamp
        self._region_code = bins.region_index(self.many, self.few)
        k = bins.num_bins
        for name in sum_names(self.depth):
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

    def _sum_states(self) -> dict[str, torch.Tensor]:
        """The per-bin sum states by the names of :func:`balanced_sam.metrics.sum_names`."""
        return {name: getattr(self, f"sum_{name}") for name in sum_names(self.depth)}

    @torch.no_grad()
    def update(self, preds: torch.Tensor, targets: torch.Tensor,
               mask: torch.Tensor | None = None) -> None:
        """Add a batch: ``preds`` and ``targets`` of one shape (any); ``mask`` selects the
        elements that count."""
        p, t = flat_batch(preds, targets, mask, device=self.sum_n.device)
        if t.numel() == 0:
            return
        idx = self.bins.bin_index(t, clamp=self.clamp)
        ae = add_batch(self._sum_states(), idx, p, t, gm_eps=self.gm_eps, min_depth=self.min_depth)
        self.label_lo.scatter_reduce_(0, idx, t, "amin")
        self.label_hi.scatter_reduce_(0, idx, t, "amax")
        if self.balance == "label":
            v, n, a = merge_labels(t, torch.ones_like(t), ae)
            self.label_values.append(v)
            self.label_n.append(n)
            self.label_abs.append(a)
            if len(self.label_values) >= _COMPACT_EVERY:
                v, n, a = merge_labels(dim_zero_cat(self.label_values),
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
        return merge_labels(v, n, a)

    def compute(self) -> Report:
        """The report ``{region: {metric: value}}`` for region in all/many/medium/few (values
        are Python floats; ``count`` an int; an empty region reports NaN), computed by
        :func:`balanced_sam.metrics.report_from_sums` as the in-process class does."""
        self.balance_used = used_balance(self.balance, self.label_lo, self.label_hi)
        if self.balance != "label":
            return report_from_sums(self._sum_states(), self._region_code, gm_eps=self.gm_eps)
        labels = self._labels()
        return report_from_sums(self._sum_states(), self._region_code, gm_eps=self.gm_eps,
                                labels=labels,
                                label_bin=self.bins.bin_index(labels[0], clamp=self.clamp))


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
        check_region(region)
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
