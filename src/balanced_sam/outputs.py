"""What a training run writes: its folder, its checkpoints and its logs.

* :class:`RunFolder` owns the output folder: it takes the folder's lock (a second run on the same
  folder is refused, a lock left by a dead process is taken over), refuses to start over a finished
  or broken run unless told to resume or overwrite, and on overwrite removes the old run's outputs
  (and only those, :data:`RUN_OUTPUTS`) before anything new is written.
* :class:`Checkpointer` writes ``last.pt`` (every epoch, everything needed to resume) and
  ``best.pt`` (the weights of the best epoch) atomically, and reads them back with clear errors.
  A checkpoint is data (:func:`plain` on the way in, ``weights_only`` on the way out): loading
  one never runs code, unless the user vouches for the file (``trust=True``).
* An :class:`EpochLogger` receives one row of figures per epoch. :class:`CSVLogger` (``log.csv``)
  and :class:`TensorBoardLogger` (``tb/``, when tensorboard is installed) are the built-in ones;
  anything with ``log_epoch(row)`` and ``close()`` (a Weights & Biases logger, say) plugs in
  through ``fit(..., loggers=[...])``.
"""

from __future__ import annotations

import math
import shutil
from collections import OrderedDict as _OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from balanced_sam.errors import spell
from balanced_sam.io import FolderLock, append_csv_row, save_torch

__all__ = ["RunFolder", "RunExistsError", "Checkpointer", "EpochLogger", "CSVLogger",
           "TensorBoardLogger", "RUN_OUTPUTS", "load_checkpoint", "UntrustedCheckpointError",
           "CHECKPOINT_TYPES", "plain"]

#: what a run writes into its folder; ``--overwrite`` removes exactly these
RUN_OUTPUTS = ("result.json", "best.pt", "last.pt", "log.csv", "tb")


class RunExistsError(FileExistsError):
    """The output directory already holds a run (and neither resume nor overwrite was asked)."""


class RunFolder:
    """The output folder of one run (``None``: a run that writes nothing).

    Only the process of rank 0 touches the folder; on other ranks every method is a no-op.
    """

    def __init__(self, out: str | Path | None, *, rank: int = 0,
                 log: Callable[[str], None] = print) -> None:
        self.path = Path(out) if out is not None else None
        self.writes = self.path is not None and rank == 0
        self.log = log
        self._lock = FolderLock(self.path, what="run") if self.writes and self.path else None

    @property
    def last(self) -> Path | None:
        return self.path / "last.pt" if self.path is not None else None

    @property
    def best(self) -> Path | None:
        return self.path / "best.pt" if self.path is not None else None

    def open(self, *, resume: bool, overwrite: bool, checkpoint: str = "all") -> bool:
        """Lock the folder and decide whether this run resumes (the return value)."""
        if not self.writes or self.path is None:
            return resume
        self.path.mkdir(parents=True, exist_ok=True)
        assert self._lock is not None
        self._lock.acquire()
        try:
            return self._decide(resume, overwrite, checkpoint)
        except BaseException:
            self._lock.release()
            raise

    def _decide(self, resume: bool, overwrite: bool, checkpoint: str) -> bool:
        assert self.path is not None and self.last is not None and self.best is not None
        holds_run = self.last.exists() or self.best.exists()
        if overwrite and not resume:
            self.clear()
            return False
        if holds_run and not resume:
            raise RunExistsError(
                f"{self.path} already holds a run (last.pt/best.pt); pass "
                f"{spell('resume')} to continue it, {spell('overwrite')} to replace it, or "
                "choose another output folder")
        if resume and not self.last.exists():
            if self.best.exists() and checkpoint == "best":
                raise ValueError(f"{self.path} holds only best.pt (checkpoint=best): nothing to "
                                 "resume")
            self.log(f"resume: no checkpoint in {self.path}, starting from scratch")
            return False
        return resume

    def clear(self) -> None:
        """Remove the outputs of an earlier run (:data:`RUN_OUTPUTS`), nothing else."""
        assert self.path is not None
        for name in RUN_OUTPUTS:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()


class UntrustedCheckpointError(ValueError):
    """A checkpoint that holds more than plain data, refused because unpickling it could run
    code (load it with ``trust=True`` / ``--trust-checkpoint`` only if you trust its source)."""


#: what a checkpoint may hold: loaded with ``torch.load(weights_only=True)``, which rebuilds
#: these and nothing else (no class of any module is ever imported or called)
CHECKPOINT_TYPES = "tensors, numbers, strings, lists, tuples and dicts"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by :func:`balanced_sam.train.fit` (a dict).

    A checkpoint is data: it is read with ``torch.load(weights_only=True)``, so only
    :data:`CHECKPOINT_TYPES` come back and no code the file names can run. A file that needs
    full unpickling (a class, a numpy array, the ``last.pt`` of a bsam older than this check,
    whose random state held numpy arrays) raises :class:`UntrustedCheckpointError` naming the
    file, unless ``trust=True`` (``--trust-checkpoint`` on the command line): pass it only for
    a file you wrote yourself or whose source you trust, since unpickling can run any code."""
    import pickle

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if trust or "weights only" not in str(exc).lower():
            raise ValueError(f"could not read checkpoint {path}: {_first_line(exc)}") from exc
        raise UntrustedCheckpointError(
            f"checkpoint {path} holds more than {CHECKPOINT_TYPES}{_unsafe_global(exc)}: "
            "refused, since unpickling it could run code; if you wrote it yourself or trust "
            f"its source, pass {spell('trust')}") from None
    except Exception as exc:  # corrupt or foreign file
        raise ValueError(f"could not read checkpoint {path}: {exc}") from exc
    if not isinstance(ck, dict) or "model" not in ck:
        raise ValueError(f"{path} is not a checkpoint written by bsam (no model weights in it)")
    return ck


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _unsafe_global(exc: BaseException) -> str:
    """``" (it asks for module.name)"``: what the refused file wanted to import, when torch
    says."""
    import re

    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f" (it asks for {m.group(1)})" if m else ""


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as what :func:`load_checkpoint` reads back without unpickling
    (:data:`CHECKPOINT_TYPES`): paths become strings, numpy scalars numbers, numpy arrays
    tensors, sets sorted lists; anything else raises :class:`TypeError` naming where it sits
    (so a checkpoint that could not be read back is never written). A container whose items
    are all plain already is returned as it is (a ``state_dict`` keeps its ``_metadata``)."""
    import os

    import numpy as np

    if isinstance(obj, np.generic):  # before float: np.float64 is a float
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype,
                                       torch.device, torch.Size)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        items = [(plain(k, where), plain(v, f"{where}.{k}")) for k, v in obj.items()]
        if type(obj) in (dict, _OrderedDict) and all(
                k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, obj.items())):
            return obj
        return (_OrderedDict if isinstance(obj, _OrderedDict) else dict)(items)
    if isinstance(obj, (list, tuple)):
        vals = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if type(obj) in (list, tuple) and all(v is v0 for v, v0 in zip(vals, obj)):
            return obj
        return tuple(vals) if isinstance(obj, tuple) else vals
    if isinstance(obj, (set, frozenset)):
        return sorted(plain(v, where) for v in obj)
    raise TypeError(f"{where} holds a {type(obj).__name__}; a checkpoint holds only "
                    f"{CHECKPOINT_TYPES} (convert it, e.g. to a dict or a string)")


class Checkpointer:
    """``last.pt`` and ``best.pt`` of a run folder, by the ``checkpoint`` policy:
    ``"all"`` (both), ``"best"`` (only ``best.pt``) or ``"none"``."""

    def __init__(self, folder: RunFolder, policy: str = "all") -> None:
        self.folder = folder
        self.policy = policy

    @property
    def keeps_last(self) -> bool:
        return self.folder.writes and self.policy == "all"

    def save_best(self, payload: Mapping[str, Any]) -> None:
        if self.folder.writes and self.policy != "none" and self.folder.best is not None:
            save_torch(plain(dict(payload)), self.folder.best)

    def save_last(self, payload: Mapping[str, Any]) -> None:
        if self.keeps_last and self.folder.last is not None:
            save_torch(plain(dict(payload)), self.folder.last)

    def load_last(self, map_location: str | torch.device = "cpu", *,
                  trust: bool = False) -> dict[str, Any]:
        assert self.folder.last is not None
        return load_checkpoint(self.folder.last, map_location, trust=trust)


# ---------------------------------------------------------------------------- loggers
@runtime_checkable
class EpochLogger(Protocol):
    """Receives one row per epoch (``epoch``, ``lr``, ``train_loss``, validation figures,
    ``seconds``); ``close()`` at the end of the run."""

    def log_epoch(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class CSVLogger:
    """``log.csv``: one row per epoch; a resumed run replaces the rows of the epochs it redoes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        append_csv_row(self.path, row, key="epoch")

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars under ``tb/`` (every finite number of the row, by epoch)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    @classmethod
    def maybe(cls, log_dir: str | Path) -> TensorBoardLogger | None:
        """A logger, or ``None`` when tensorboard is not installed."""
        try:
            return cls(log_dir)
        except ImportError:
            return None

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, float) and math.isfinite(v):
                self.writer.add_scalar(k, v, row["epoch"])

    def close(self) -> None:
        self.writer.close()


def run_loggers(folder: RunFolder, extra: Iterable[EpochLogger] = ()) -> list[EpochLogger]:
    """The folder's CSV and TensorBoard loggers (rank 0 with a folder) plus ``extra``."""
    loggers: list[EpochLogger] = []
    if folder.writes and folder.path is not None:
        loggers.append(CSVLogger(folder.path / "log.csv"))
        tb = TensorBoardLogger.maybe(folder.path / "tb")
        if tb is not None:
            loggers.append(tb)
    for lg in extra:
        if not isinstance(lg, EpochLogger):
            raise TypeError(f"loggers must have log_epoch(row) and close(), got {lg!r}")
        loggers.append(lg)
    return loggers
