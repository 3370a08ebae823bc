"""A Weights & Biases logger for the training loop's per-epoch rows (the ``wandb`` extra).

The loop hands each epoch's row (the same dict that goes to ``log.csv`` and TensorBoard) to
:meth:`WandbLogger.log_row` and calls :meth:`WandbLogger.close` at the end::

    from balanced_sam.integrations.wandb import WandbLogger

    logger = WandbLogger("agedb_bsam-seed0", config=spec, project="dir")
    for epoch in range(epochs):
        ...
        logger.log_row(epoch + 1, {"train_loss": 0.31, "val": {"all": {"mae": 7.9}}})
    logger.summary({"test": report})
    logger.close()

``wandb`` is imported when a logger is made, not when this module is: without it the
constructor raises :class:`ModuleNotFoundError` saying what to install. ``mode="offline"`` (or
the ``WANDB_MODE`` environment variable) logs without an account or a network.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["WandbLogger", "flatten_row"]

_HINT = ("the Weights & Biases logger needs the wandb package: "
         "pip install 'balanced-sam[wandb]'")


def _import_wandb() -> Any:
    try:
        import wandb
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(_HINT, name="wandb") from exc
    return wandb


def flatten_row(row: Mapping[str, Any], sep: str = "/") -> dict[str, float | int]:
    """The numbers of ``row`` as one flat dict: nested mappings (a report's
    ``{"val": {"few": {"mae": ...}}}``) become ``"val/few/mae"``; strings, ``None``, booleans and
    non-finite values are left out (as for TensorBoard)."""
    out: dict[str, float | int] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            for k, v in flatten_row(value, sep).items():
                out[f"{key}{sep}{k}"] = v
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            out[str(key)] = value
        elif isinstance(value, float) and math.isfinite(value):
            out[str(key)] = value
        elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-dim tensor
            v = value.item()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[str(key)] = v
    return out


class WandbLogger:
    """Send per-epoch rows to a W&B run.

    Args:
        name: the run's name (e.g. the config's name and seed).
        config: the run's settings, stored with it (a spec dict or a dataclass's ``asdict``).
        project: the W&B project (default ``$WANDB_PROJECT``, else ``"balanced-sam"``).
        dir: where W&B writes its files (e.g. the run's output folder).
        mode: ``"online"``, ``"offline"`` or ``"disabled"`` (default: W&B's, ``$WANDB_MODE``).
        **init_kwargs: passed to ``wandb.init`` (``entity``, ``tags``, ``group``, ``resume``...).
    """

    def __init__(self, name: str | None = None, config: Mapping[str, Any] | None = None, *,
                 project: str | None = None, dir: str | os.PathLike[str] | None = None,
                 mode: str | None = None, **init_kwargs: Any) -> None:
        if mode is not None and mode not in ("online", "offline", "disabled"):
            raise ValueError(f"mode must be 'online', 'offline' or 'disabled', got {mode!r}")
        wandb = _import_wandb()
        kwargs: dict[str, Any] = {
            "project": project or os.environ.get("WANDB_PROJECT") or "balanced-sam",
            "name": name,
            "config": dict(config) if config is not None else {},
        }
        if dir is not None:
            os.makedirs(dir, exist_ok=True)
            kwargs["dir"] = os.fspath(dir)
        if mode is not None:
            kwargs["mode"] = mode
        kwargs.update(init_kwargs)
        self.run = wandb.init(**kwargs)
        self._closed = False

    def log_row(self, epoch: int, row: Mapping[str, Any]) -> None:
        """Log one epoch's row at step ``epoch`` (its numbers; see :func:`flatten_row`)."""
        if self._closed:
            raise RuntimeError("log_row after close(): this W&B run is finished")
        data = flatten_row({k: v for k, v in row.items() if k != "epoch"})
        data["epoch"] = int(epoch)
        self.run.log(data, step=int(epoch))

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """The training loop's logger interface (``fit(..., loggers=[...])``): the row carries
        its ``epoch``."""
        self.log_row(int(row["epoch"]), row)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Store final figures (e.g. ``{"test": report}``) in the run's summary."""
        if self._closed:
            raise RuntimeError("summary after close(): this W&B run is finished")
        for k, v in flatten_row(values).items():
            self.run.summary[k] = v

    def close(self, exit_code: int = 0) -> None:
        """Finish the run (once; later calls do nothing)."""
        if not self._closed:
            self._closed = True
            self.run.finish(exit_code=exit_code)

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
