"""Sharpness analysis: Hessian spectra per label region and loss landscapes.

* :func:`hessian_top_eigenvalue`, :func:`hessian_trace`, :class:`HessianOperator`: the top
  eigenvalue (power iteration or Lanczos) and the Hutchinson trace of the Hessian of the loss
  restricted to a subset of samples (a region, bins or a mask; see :func:`select`).
* :func:`loss_landscape`, :class:`Landscape`, :func:`random_direction`: 1-D / 2-D slices along
  random filter-normalised directions (Li et al. 2018), all regions on the same directions.
* :func:`analyze_model`, :func:`format_sharpness_table`: one call per checkpoint, and the paper's
  Table 8 for several.
* :mod:`balanced_sam.analysis.plots` (needs matplotlib, imported lazily): curves, contours,
  surfaces and the paper's Figure 1 (:func:`~balanced_sam.analysis.plots.plot_region_comparison`).

Only ``torch`` and ``numpy`` are needed to import this package; ``tqdm`` (progress bars) and
``matplotlib`` (plots) are used when present.
"""

from balanced_sam.analysis._common import select
from balanced_sam.analysis.hessian import (
    EigenResult,
    HessianOperator,
    TraceResult,
    hessian_top_eigenvalue,
    hessian_trace,
)
from balanced_sam.analysis.landscape import (
    Landscape,
    loss_landscape,
    normalize_direction,
    random_direction,
)
from balanced_sam.analysis.report import analyze_model, format_sharpness_table
from balanced_sam.losses import l1_loss as l1_per_sample  # the names this package exported
from balanced_sam.losses import mse_loss as mse_per_sample

__all__ = [
    "EigenResult",
    "HessianOperator",
    "Landscape",
    "TraceResult",
    "analyze_model",
    "format_sharpness_table",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "l1_per_sample",
    "loss_landscape",
    "mse_per_sample",
    "normalize_direction",
    "random_direction",
    "select",
]
