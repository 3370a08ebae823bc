"""The generated long-tailed tables that tests in several folders train on (one definition each;
the conftest fixtures build on them). The numbers are those the tests were written against: the
same generators, seeds and shapes.

* ``long_tail``: 5 features, ``y = exp(0.8 x0) * 10 + x1 + 0.3 noise`` clamped to [0, 99]
  (a torch generator); ``write_long_tail_csv`` writes it with a categorical ``kind`` column;
* ``long_tail_ints``: the baselines' labels 0..39 (integers by default);
* ``abc_csv``: 3 features ``a, b, c`` and ``y`` from numpy's generator, the CLI tests' table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def long_tail(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A long-tailed regression table as tensors: y is exp-like in the first feature."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (torch.exp(0.8 * x[:, 0]) * 10 + x[:, 1] + 0.3 * torch.randn(n, generator=g)).clamp(0, 99)
    return x, y


def long_tail_ints(n: int = 240, seed: int = 0, integer: bool = True):
    """5 features and long-tailed labels 0..39, ``exp(0.9 x0) * 6 + 2 x1`` (``integer``:
    floored, so labels repeat and RankSim's subset is random)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (torch.exp(0.9 * x[:, 0]) * 6 + 2 * x[:, 1]).clamp(0, 39)
    y = y.floor() if integer else y
    return x, y


def thirds(x: torch.Tensor, y: torch.Tensor):
    """Train / val / test as the first half, the next quarter and the last quarter."""
    n = len(y)
    return (x[: n // 2], y[: n // 2]), (x[n // 2: 3 * n // 4], y[n // 2: 3 * n // 4]), \
        (x[3 * n // 4:], y[3 * n // 4:])


def write_long_tail_csv(path: Path, n: int = 900, seed: int = 0):
    """``long_tail(n, seed)`` as a CSV: f0..f4, ``kind`` (a / b from x2) and ``target`` (2
    decimals); returns the DataFrame written."""
    import pandas as pd

    x, y = long_tail(n, seed)
    df = pd.DataFrame(x.numpy(), columns=[f"f{i}" for i in range(5)])
    df["kind"] = np.where(x[:, 2].numpy() > 0, "a", "b")
    df["target"] = y.numpy().round(2)
    df.to_csv(path, index=False)
    return df


def abc_csv(path: Path, n: int = 300, seed: int = 0, *, shift: float = 0.0,
            integer: bool = False, outlier: float | None = None, noise: bool = False) -> Path:
    """Columns a, b, c ~ N(0, 1) (``a`` moved by ``shift``) and ``y = exp(0.8 a) * 10 + b``
    clipped to [0, 99]; ``noise``: ``+ N(0, 0.3)`` noise instead of ``+ b``; ``integer``: y
    floored, else rounded to 2 decimals; ``outlier``: one more row (0, 0, 0, outlier)."""
    import pandas as pd

    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 3))
    second = g.normal(scale=0.3, size=n) if noise else x[:, 1]
    y = np.clip(np.exp(0.8 * x[:, 0]) * 10 + second, 0, 99)
    df = pd.DataFrame({"a": x[:, 0] + shift, "b": x[:, 1], "c": x[:, 2],
                       "y": np.floor(y) if integer else y.round(2)})
    if outlier is not None:
        df.loc[len(df)] = {"a": 0.0, "b": 0.0, "c": 0.0, "y": outlier}
    df.to_csv(path, index=False)
    return path
