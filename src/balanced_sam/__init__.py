"""balanced-sam: Balanced Sharpness-Aware Minimization for deep imbalanced regression.

The optimizers (:class:`BalancedSAM`, :class:`SAM`, :class:`ImbSAM`, :class:`CCSAM`), the
label-distribution tools (:class:`LabelBins`) and the metrics (:mod:`balanced_sam.metrics`) need
only torch and numpy; the training loop, data, benchmarks and the ``bsam`` command need the
``cli`` extra.
"""

from balanced_sam.bins import LabelBins, lds_kernel
from balanced_sam.losses import weighted_mean
from balanced_sam.metrics import RegressionMetrics, format_table, regression_report
from balanced_sam.optim import CCSAM, SAM, BalancedSAM, ImbSAM, frozen_bn_stats

__version__ = "0.1.0"

__all__ = [
    "BalancedSAM",
    "SAM",
    "ImbSAM",
    "CCSAM",
    "LabelBins",
    "RegressionMetrics",
    "format_table",
    "frozen_bn_stats",
    "lds_kernel",
    "regression_report",
    "weighted_mean",
    "__version__",
]
