"""The tabular benchmark of ``bsam bench``: diamond prices (53,940 rows), no download needed.

The table is the ``diamonds.csv`` that the PyPI package ``plotnine`` (MIT) bundles; it is read
from the installed package, never copied into this repository. Target: ``price`` in dollars,
strongly right-skewed. Features: ``carat, depth, table, x, y, z`` (standardised) and
``cut, color, clarity`` (one-hot, 0/1).

Protocol: bins of $250 starting at $250 (the first multiple of 250 below the
cheapest diamond, $326; a lower edge of 0 only adds an empty bin); per bin ``min(n // 3, 50)`` rows
for validation and as many for test; then a fixed random 20% of the remaining rows for training,
so that the expensive tail has few-shot bins. The split uses ``split_seed`` (default 0) and is the
same for every training seed.

Facts of the default split (checked by the tests): 75 bins ($250-$19,000), 3,457 validation and
3,457 test rows, 47,026 rows left, of which exactly ``round(0.2 * 47,026) = 9,405`` train; training
bins: 24 many / 22 medium / 29 few (every bin holds a training row). An earlier prototype
reported 9,499 training rows and 24 / 20 / 30 bins: it kept each row with probability 0.2 (a coin
flip per row gives 9,405 +- 87 rows; ``np.random.RandomState(1).rand(47026) < 0.2`` gives exactly
9,499), and it counts 74 bins, so one bin got no training row (probably the last, whose 9
remaining rows give 1.8 expected training rows). Which rows are drawn moves a few bins across the
20 and 100 thresholds; it does not change the protocol.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any

from balanced_sam.data.base import BenchData

__all__ = ["load", "diamonds_csv", "NUMERIC", "CATEGORICAL", "TARGET"]

TARGET = "price"
NUMERIC = ("carat", "depth", "table", "x", "y", "z")
CATEGORICAL = ("cut", "color", "clarity")


def diamonds_csv() -> Path:
    """Path of the diamonds CSV inside the installed ``plotnine`` package.

    The package directory is located without importing plotnine (whose data module reads every
    bundled table on import); ``importlib.resources`` is the fallback for unusual installs.
    """
    hint = ("the diamonds benchmark reads the table bundled with plotnine; install it with "
            "`pip install 'balanced-sam[diamonds]'` (or `pip install plotnine`)")
    spec = importlib.util.find_spec("plotnine")
    if spec is None:
        raise ModuleNotFoundError(f"plotnine is not installed: {hint}", name="plotnine")
    for location in spec.submodule_search_locations or []:
        candidate = Path(location) / "data" / "diamonds.csv"
        if candidate.is_file():
            return candidate
    resource = importlib.resources.files("plotnine.data") / "diamonds.csv"
    if not resource.is_file():
        raise FileNotFoundError(f"plotnine is installed but holds no data/diamonds.csv: {hint}")
    return Path(str(resource))


def load(
    seed: int = 0,
    train_fraction: float = 0.2,
    cap: int = 50,
    bin_width: float = 250.0,
    split_seed: int = 0,
    **ignored: Any,
) -> BenchData:
    """The diamonds DIR benchmark.

    Args:
        seed: the training seed; it does not change the split (accepted for the loader protocol).
        train_fraction: fraction of the rows left after validation/test that training keeps.
        cap: ``C``, the most rows per bin in validation (and in test).
        bin_width: price bin width in dollars.
        split_seed: seed of the split and of the kept training fraction.
        **ignored: options meant for other datasets (``data_root`` ...).
    """
    from balanced_sam.data.tabular import load_table

    del seed, ignored  # the split must not depend on the training seed
    data = load_table(
        diamonds_csv(),
        target=TARGET,
        bin_width=bin_width,
        cap=cap,
        train_fraction=train_fraction,
        seed=split_seed,
        features=list(NUMERIC + CATEGORICAL),
        categorical=list(CATEGORICAL),
        name="diamonds",
        target_unit="$",
    )
    data.info["source"] = "plotnine/data/diamonds.csv (ggplot2's diamonds, MIT)"
    return data
