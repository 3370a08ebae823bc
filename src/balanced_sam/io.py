"""File input and output in one place: atomic writes, JSON with NaN <-> null, CSV, checksums,
progress bars and the lock that keeps two runs out of one folder.

* :func:`atomic_write` writes through a uniquely named temporary file beside the target and renames
  it into place, so a reader (or a run killed half-way) never sees half a file, and two writers
  never share a temporary name. :func:`write_text`, :func:`write_json`, :func:`write_csv` and
  :func:`save_torch` are built on it.
* JSON cannot hold NaN or infinity: :func:`to_json` turns them into ``null`` (and numpy scalars,
  tuples and paths into plain JSON values); :func:`nan_for_null` turns ``null`` back into NaN in a
  metrics report read from disk.
* :func:`append_csv_row` appends one row of a per-epoch log; when a resumed run writes an epoch the
  killed run had already logged, the older rows from that epoch on are dropped first.
* :func:`progress_bar` is a tqdm bar when asked for and tqdm is installed, else a silent stand-in.
* :class:`FolderLock` is a lock file (pid and host inside) that refuses a second process; a lock
  left by a dead process on this host is detected and taken over.
* A write that fails for want of room or permission (a read-only folder, a full disk, torch's
  checkpoint writer failing) raises :class:`WriteError`, an ``OSError`` whose message names the
  file meant (never the temporary one) and the reason; :func:`write_error` turns any such
  ``OSError`` into that one line. The file that was there before stays as it was.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_write",
    "write_text",
    "write_json",
    "read_json",
    "to_json",
    "json_float",
    "nan_for_null",
    "write_csv",
    "append_csv_row",
    "save_torch",
    "sha256_file",
    "progress_bar",
    "FolderLock",
    "FolderLockedError",
    "WriteError",
    "write_error",
]


# ---------------------------------------------------------------------------- write errors
#: errno values that mean "this place cannot be written": permission, read-only, no room
WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                          errno.EFBIG})


class WriteError(OSError):
    """A file could not be written (read-only folder, full disk, ...); ``filename`` is the file
    meant and the message is one line: ``cannot write PATH: REASON``."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def write_error(exc: BaseException) -> str | None:
    """The one-line message for a :class:`WriteError`, or for an ``OSError`` of permission or
    room (:data:`WRITE_ERRNOS`; ``PATH: REASON``, since it may come from a read), else
    ``None``."""
    if isinstance(exc, WriteError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return None


def _as_write_error(exc: BaseException, target: Path) -> WriteError | None:
    """``exc`` raised while writing ``target`` as a :class:`WriteError`, when it is one."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return WriteError(exc.errno, exc.strerror or str(exc), os.fspath(target))
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("inline_container" in text
                                          or "PytorchStreamWriter" in text):
        # torch's zip writer: "open file failed with strerror: Read-only file system", or
        # "unexpected pos 576 vs 534" when the disk filled up mid-write
        reason = (text.split("strerror:", 1)[1].strip() if "strerror:" in text else
                  "the checkpoint writer failed (" + text.strip().splitlines()[0] + "); "
                  "is the disk full?")
        return WriteError(errno.EIO, reason, os.fspath(target))
    return None


# ---------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any],
                 suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``.

    ``suffix`` ends the temporary name (``".npy"``, ``".npz"``: numpy appends its extension
    otherwise). The temporary file is removed when ``write`` raises.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # (a read-only folder: nothing was created)
        failed = _as_write_error(exc, target)
        if failed is not None and failed is not exc:
            raise failed from exc
        raise
    return target


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_torch(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` atomically (a checkpoint is never half written)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------------- JSON
def json_float(x: Any) -> float | None:
    """``float(x)``, or ``None`` for NaN / infinity / ``None`` (what JSON can hold)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def to_json(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts: non-finite floats
    become ``None``; numpy scalars and arrays, tuples and paths become plain values."""
    if isinstance(obj, (float, np.floating)):
        return json_float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def nan_for_null(report: Any) -> Any:
    """Inverse of :func:`to_json` for a metrics report: ``None`` values become NaN (nested
    dictionaries are followed; lists are kept as they are)."""
    if report is None:
        return math.nan
    if isinstance(report, Mapping):
        return {k: nan_for_null(v) for k, v in report.items()}
    return report


def write_json(obj: Any, path: str | os.PathLike[str], indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON atomically, NaN and infinity as ``null``."""
    return write_text(path, json.dumps(to_json(obj), indent=indent, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a clear ``ValueError`` names a file that is not JSON."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON ({exc}); delete it or fix it") from exc


# ---------------------------------------------------------------------------- CSV
def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
              header: Sequence[str] | None = None) -> Path | None:
    """Write ``rows`` (dicts) as CSV atomically; the header is ``header`` or the first row's
    keys. Nothing is written for no rows and no header."""
    if header is None:
        if not rows:
            return None
        header = list(rows[0])

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(header), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


def append_csv_row(path: str | os.PathLike[str], row: Mapping[str, Any],
                   key: str = "epoch") -> None:
    """Append ``row`` to a CSV log (writing the header first for a new file). Rows already in the
    file whose ``key`` is at or after ``row[key]`` (left by a killed run that is now resumed) are
    dropped first, so every epoch appears once."""
    p = Path(path)
    if p.exists():
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            old, header = list(reader), reader.fieldnames or list(row)
        kept = [r for r in old if float(r[key]) < float(row[key])]
        if len(kept) != len(old):
            write_csv(kept, p, header)
    else:
        header = list(row)
        write_csv([], p, header)
    with p.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(header), extrasaction="ignore").writerow(row)


# ---------------------------------------------------------------------------- checksums
def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- progress
def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True,
                 **kwargs: Any) -> Any:
    """A ``tqdm`` bar over ``iterable`` when ``enabled`` and tqdm is installed (keyword arguments
    go to tqdm), else a silent stand-in with the same ``update`` / ``set_postfix`` / ``close``."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional
            pass
        else:
            return tqdm(iterable, **kwargs)
    return _NoBar(iterable)


class _NoBar:
    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# ---------------------------------------------------------------------------- lock
class FolderLockedError(FileExistsError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on a folder: the file ``folder/name`` holds ``pid host``.

    ``acquire()`` creates it (``O_EXCL``) or raises :class:`FolderLockedError` naming the
    holder; a lock whose process is gone (same host, pid not running) is stale and is taken
    over. A lock from another host cannot be checked and is respected. ``release()`` removes it;
    the object is also a context manager.
    """

    def __init__(self, folder: str | os.PathLike[str], name: str = ".lock",
                 what: str = "run") -> None:
        self.path = Path(folder) / name
        self.what = what
        self.held = False

    @staticmethod
    def _me() -> tuple[int, str]:
        return os.getpid(), socket.gethostname()

    def _holder(self) -> tuple[int, str] | None:
        try:
            pid, host = self.path.read_text().split(maxsplit=1)
            return int(pid), host.strip()
        except (OSError, ValueError):
            return None  # vanished or unreadable (being written): treated as held below

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as exc:
                if not isinstance(exc, FileExistsError):
                    failed = _as_write_error(exc, self.path)
                    if failed is not None:
                        raise failed from exc
                    raise
                holder = self._holder()
                if holder is not None and _is_stale(*holder):
                    self.path.unlink(missing_ok=True)
                    continue
                who = (f"process {holder[0]} on {holder[1]}" if holder else "another process")
                raise FolderLockedError(
                    f"{self.path.parent} is in use by {who} (lock file {self.path}); wait for "
                    f"that {self.what} to finish or choose another output folder. If no such "
                    "process is running, delete the lock file.") from None
            with os.fdopen(fd, "w") as f:
                pid, host = self._me()
                f.write(f"{pid} {host}\n")
            self.held = True
            return self
        raise FolderLockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            if self._holder() == self._me():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_stale(pid: int, host: str) -> bool:
    """A lock is stale when it was taken on this host by a process that no longer runs."""
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return False  # this very process holds it (e.g. a second fit in the same folder)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a live process of another user
        return False
    return False
