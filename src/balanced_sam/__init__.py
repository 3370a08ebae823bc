"""balanced-sam: Balanced Sharpness-Aware Minimization for deep imbalanced regression."""

from balanced_sam.bins import LabelBins

__version__ = "0.1.0"

__all__ = ["LabelBins", "__version__"]
