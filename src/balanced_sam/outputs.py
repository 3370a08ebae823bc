"""What a training run writes: its folder, its checkpoints and its logs.

Output folders that belong to the project
-----------------------------------------
A folder is the project's only if it carries a manifest, :data:`MANIFEST`
(``.bsam-manifest.json``): JSON with ``kind`` (``"run"`` or ``"bench"``), ``version`` and
``entries``, the paths (relative to the folder) of everything the project wrote there, each with
its type: ``"file"``; ``"tree"``, a folder whose whole content the project wrote (``tb/``); or
``"folder"``, a nested folder with a manifest of its own (a bench's ``runs/<label>``, RnC's
``pretrain``). The rules, applied by :func:`claim_folder` (which returns an :class:`OwnedFolder`):

* a folder that does not exist, or is empty (lock files and ``.DS_Store`` aside), is claimed: its
  manifest is written before anything else;
* a non-empty folder without a manifest is refused (:class:`FolderNotOursError`, naming the
  option, ``--out`` on the command line); so is a folder of another kind (a bench's for a run);
* a fresh start over a folder whose manifest lists files that exist is refused
  (:class:`RunExistsError`: "holds an earlier run; --resume / --overwrite");
* ``overwrite`` removes exactly the manifest's entries (and the temporary files of interrupted
  writes to them), never anything else: a symbolic link is unlinked as a link, its target never
  touched; a ``"tree"`` is removed without following the links inside it; a ``"folder"`` is
  cleared through its own manifest (and stays, still marked, when it holds files bsam did not
  write); a folder the manifest does not list is never removed recursively (empty parents of
  removed entries are removed);
* whatever the caller is about to write (``outputs``) must not exist unlisted (a user's ``tb/``
  is refused, not written into) and must not be a symbolic link (bsam never writes through one);
* ``resume`` needs the project's manifest.

Every writer records a path before writing it (:meth:`OwnedFolder.record`, or
:func:`output_path` for code that holds only a path), so a run killed mid-write leaves nothing
unlisted. Take the folder's :class:`~balanced_sam.io.FolderLock` before claiming it (a
:class:`RunFolder` does).

Folders of the previous release (no manifest): a folder holding only :data:`RUN_OUTPUTS` (and
RnC's ``pretrain``) whose ``last.pt`` (or, without one, ``best.pt``) loads as a bsam checkpoint
is adopted on ``resume``: its manifest is written, listing those files. A fresh run and
``overwrite`` refuse it (the message says to resume it, or to delete it yourself), since nothing
proves its ``tb/`` or ``log.csv`` were written by bsam.

The rest
--------
* :class:`RunFolder` is a run's output folder: it takes the folder's lock (a second run on the
  same folder is refused, a lock left by a dead process is taken over), claims the folder as
  above, and records every output it writes: ``last.pt``, ``best.pt``, ``log.csv``, ``tb/`` and
  (when :func:`~balanced_sam.train.fit` ends) ``result.json``, which its callers write next. Its
  ``overwrite`` (and a ``resume`` that finds no ``last.pt`` and starts from scratch) removes the
  listed files and trees, not nested folders: RnC's runner claims the folder first, clearing
  its ``pretrain/`` too.
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

import json
import math
import os
import re
import shutil
from collections import OrderedDict as _OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

import torch

from balanced_sam.errors import spell
from balanced_sam.io import FolderLock, append_csv_row, save_torch, write_json

__all__ = ["RunFolder", "RunExistsError", "Checkpointer", "EpochLogger", "CSVLogger",
           "TensorBoardLogger", "RUN_OUTPUTS", "load_checkpoint", "UntrustedCheckpointError",
           "CHECKPOINT_TYPES", "plain", "MANIFEST", "OwnedFolder", "FolderNotOursError",
           "claim_folder", "claim_run_folder", "output_path"]

#: what a run writes into its folder (``tb`` is a folder)
RUN_OUTPUTS = ("result.json", "best.pt", "last.pt", "log.csv", "tb")
#: the file that marks a folder as the project's
MANIFEST = ".bsam-manifest.json"
MANIFEST_VERSION = 1
KINDS = ("run", "bench")
ENTRY_TYPES = ("file", "tree", "folder")
#: what an "empty" folder may hold: lock files and the Finder's
_IGNORED = frozenset({".lock", ".bench.lock", ".DS_Store"})
#: the temporary name of an interrupted :func:`~balanced_sam.io.atomic_write`
_TMP = re.compile(r"^\.(?P<name>.+)\.\d+-[0-9a-f]{8}\.tmp[^/]*$")


class RunExistsError(FileExistsError):
    """The output directory already holds a run (and neither resume nor overwrite was asked)."""


class FolderNotOursError(FileExistsError):
    """A non-empty output folder the project did not mark as its own (or of another kind), or
    a path in it that the project is asked to write but did not write."""


def _rel(name: str | os.PathLike[str]) -> str:
    """A manifest entry: a relative path inside the folder, ``/``-separated, no ``..``."""
    p = PurePosixPath(os.fspath(name).replace(os.sep, "/"))
    if p.is_absolute() or not p.parts or any(part in ("..", ".") for part in p.parts):
        raise ValueError(f"a manifest entry must be a relative path inside the folder, got "
                         f"{os.fspath(name)!r}")
    return str(p)


def _exists(p: Path) -> bool:
    return os.path.lexists(p)  # a dangling link exists too


class OwnedFolder:
    """A folder carrying the project's manifest: ``kind`` and the ``entries`` it wrote.

    Build one with :func:`claim_folder` (or :meth:`read` an existing one); :meth:`record` a
    path before writing it; :meth:`clear` removes what is listed and nothing else.
    """

    def __init__(self, path: str | Path, kind: str,
                 entries: Mapping[str, str] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.entries: dict[str, str] = {}
        for name, typ in (entries or {}).items():
            if typ not in ENTRY_TYPES:
                raise ValueError(f"{self.manifest}: entry {name!r} has type {typ!r}; allowed: "
                                 f"{', '.join(ENTRY_TYPES)}")
            self.entries[_rel(name)] = typ

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @classmethod
    def read(cls, path: str | Path) -> OwnedFolder | None:
        """The folder's manifest, or ``None`` when it has none (a clear ``ValueError`` names a
        manifest that cannot be read)."""
        m = Path(path) / MANIFEST
        if not _exists(m):
            return None
        if m.is_symlink() or not m.is_file():
            raise ValueError(f"{m} is not a regular file (a link or a folder): delete it or "
                             "choose another output folder")
        try:
            data = json.loads(m.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
                raise ValueError("not a JSON object with 'entries'")
            return cls(path, str(data.get("kind")), data.get("entries") or {})
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{m} is not a bsam manifest ({exc}); delete it only if the folder "
                             "holds nothing you want to keep") from exc

    def save(self) -> None:
        """Write the manifest (atomically)."""
        write_json({"bsam": "output folder", "kind": self.kind, "version": MANIFEST_VERSION,
                    "entries": dict(sorted(self.entries.items()))}, self.manifest)

    def owns(self, name: str | os.PathLike[str]) -> bool:
        return _rel(name) in self.entries

    def record(self, name: str | os.PathLike[str], type: str = "file") -> Path:
        """List ``name`` (relative to the folder) as written by the project, before it is
        written; returns its path. A no-op when it is listed already."""
        if type not in ENTRY_TYPES:
            raise ValueError(f"type must be one of {ENTRY_TYPES}, got {type!r}")
        rel = _rel(name)
        if self.entries.get(rel) != type:
            self.entries[rel] = type
            self.save()
        return self.path / rel

    def existing(self, types: Sequence[str] = ("file", "tree")) -> list[str]:
        """The listed entries of ``types`` that are on disk."""
        return [n for n, t in self.entries.items() if t in types and _exists(self.path / n)]

    def clear(self, types: Sequence[str] = ENTRY_TYPES) -> list[Path]:
        """Remove the listed entries of ``types`` (and their interrupted temporary files), never
        anything else; returns what was removed. See the module docstring for the rules."""
        removed: list[Path] = []
        kept: set[str] = set()
        for name, typ in sorted(self.entries.items()):
            if typ not in types:
                continue
            p = self.path / name
            if p.is_symlink():
                p.unlink()  # the link, never its target
            elif typ == "file" and p.is_file():
                p.unlink()
            elif typ == "tree" and p.is_dir():
                _remove_tree(p)
            elif typ == "folder" and p.is_dir():
                nested = OwnedFolder.read(p)
                if nested is None:  # not (or no longer) ours: left as it is
                    continue
                removed += nested.clear()
                if [n for n in _contents(p) if n != MANIFEST]:
                    kept.add(name)  # it holds what bsam did not write: kept, still ours
                    continue
                nested.manifest.unlink()
                _prune(p, self.path)
            else:
                continue  # gone already, or no longer what we wrote (a file became a folder)
            removed.append(p)
            _prune(p.parent, self.path)
        files = {n for n, t in self.entries.items() if t == "file" and t in types}
        for sub in sorted({str(PurePosixPath(n).parent) for n in files}):
            where = self.path / sub
            if where.is_symlink() or not where.is_dir():
                continue
            for p in where.iterdir():
                m = _TMP.match(p.name)
                rel = str(PurePosixPath(sub) / m.group("name")) if m else ""
                if m and _rel(rel) in files and not p.is_dir():
                    p.unlink()
                    removed.append(p)
        self.entries = {n: t for n, t in self.entries.items() if t not in types or n in kept}
        self.save()
        return removed


def _remove_tree(p: Path) -> None:
    """Remove a folder the project wrote, never following a link inside it."""
    if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - old macOS Pythons
        for root, dirs, files in os.walk(p, topdown=False, followlinks=False):
            for f in files:
                os.unlink(os.path.join(root, f))
            for d in dirs:
                q = os.path.join(root, d)
                os.unlink(q) if os.path.islink(q) else os.rmdir(q)
        os.rmdir(p)
        return
    shutil.rmtree(p)


def _prune(p: Path, root: Path) -> None:
    """Remove the empty folders from ``p`` up to (not including) ``root``."""
    while p != root and root in p.parents:
        try:
            p.rmdir()
        except OSError:
            return
        p = p.parent


def _contents(path: Path) -> list[str]:
    """What a folder holds besides lock files and interrupted writes of its manifest."""
    return sorted(n for n in os.listdir(path) if n not in _IGNORED
                  and not ((m := _TMP.match(n)) and m.group("name") == MANIFEST))


def claim_folder(path: str | Path, kind: str = "run", *, overwrite: bool = False,
                 resume: bool = False, option: str = "--out", outputs: Sequence[str] = (),
                 conflicts: Sequence[str] = ("file", "tree"),
                 clear: Sequence[str] = ENTRY_TYPES,
                 legacy: Callable[[Path, bool], dict[str, str] | None] | None = None,
                 log: Callable[[str], None] = print) -> OwnedFolder:
    """Make ``path`` the project's folder of ``kind`` for a run or bench that is about to write
    ``outputs`` there (names relative to it), by the rules of the module docstring; returns it.

    ``resume``: continue what the folder holds (it must be ours, or empty). ``overwrite`` (and
    not ``resume``): first remove the manifest's entries of the ``clear`` types. Neither: the
    folder must hold none of its listed entries of the ``conflicts`` types
    (:class:`RunExistsError`). ``option``: how the user names the folder (``--out``), for the
    messages. ``legacy(path, verify)``: for a non-empty folder without a manifest, the entries
    to adopt on ``resume`` when the previous release wrote it, else ``None`` (``verify``: check
    the files' content too; done only when they are to be adopted).
    """
    path = Path(path)
    if _exists(path) and not path.is_dir():
        raise FolderNotOursError(f"{option} {path} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    owned = OwnedFolder.read(path)
    if owned is None:
        held = _contents(path)
        if not held:
            owned = OwnedFolder(path, kind)
            owned.save()
            return owned
        entries = legacy(path, resume) if legacy is not None else None
        if entries is None:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise FolderNotOursError(
                f"{option} {path} is not empty ({shown}) and was not written by bsam (no "
                f"{MANIFEST} in it); bsam writes only into an empty folder or one it made: "
                f"choose another {option}")
        if not resume:
            raise RunExistsError(
                f"{option} {path} holds a {kind} written by an earlier bsam release (no "
                f"{MANIFEST}), which bsam neither writes over nor removes; pass "
                f"{spell('resume')} to continue it (bsam then adopts its files), delete them "
                f"yourself to start again, or choose another {option}")
        owned = OwnedFolder(path, kind, entries)
        owned.save()
        log(f"{path}: a {kind} of an earlier bsam release, adopted ({MANIFEST} written)")
    if owned.kind != kind:
        raise FolderNotOursError(f"{option} {path} holds a bsam {owned.kind}, not a {kind}: "
                                 f"choose another {option}")
    for name in outputs:  # before anything is removed: a user's file is never written into
        p = path / _rel(name)
        if _exists(p) and not owned.owns(name):
            raise FolderNotOursError(
                f"{p} was not written by bsam (it is not listed in {owned.manifest}): move it "
                f"away or choose another {option}; bsam does not write into it")
    if overwrite and not resume:
        owned.clear(clear)
    elif not resume:
        held = owned.existing(conflicts)
        if held:
            raise RunExistsError(
                f"{path} already holds an earlier {kind} ({', '.join(sorted(held))}); pass "
                f"{spell('resume')} to continue it, {spell('overwrite')} to replace it, or "
                f"choose another {option}")
    for name in outputs:
        p = path / _rel(name)
        if p.is_symlink():
            raise FolderNotOursError(
                f"{p} is a symbolic link: bsam never writes through one; remove the link "
                f"({spell('overwrite')} unlinks it, never touching its target) or choose "
                f"another {option}")
    return owned


def output_path(path: str | Path, type: str = "file") -> Path:
    """Record ``path`` in the manifest of the folder it is in (which must carry one) and return
    it: for code that holds only a path, e.g. ``write_json(r, output_path(run_dir /
    "result.json"))``."""
    path = Path(path)
    owned = OwnedFolder.read(path.parent)
    if owned is None:
        raise FolderNotOursError(f"{path.parent} carries no {MANIFEST}: claim it first "
                                 "(claim_folder) before writing into it")
    return owned.record(path.name, type)


def _legacy_run(path: Path, verify: bool) -> dict[str, str] | None:
    """The entries of a run folder written by the previous release (no manifest), else
    ``None``: it holds only :data:`RUN_OUTPUTS` (and RnC's ``pretrain``, itself such a folder),
    no link, and (``verify``) its ``last.pt``, else its ``best.pt``, loads as a bsam checkpoint
    (else :class:`FolderNotOursError` says why). ``verify`` also writes the nested
    ``pretrain``'s manifest."""
    held = _contents(path)
    if not set(held) <= {*RUN_OUTPUTS, "pretrain"}:
        return None
    if any((path / n).is_symlink() for n in held):
        return None
    ck = next((path / n for n in ("last.pt", "best.pt") if (path / n).is_file()), None)
    if ck is None or not all((path / n).is_file() for n in held
                             if n not in ("tb", "pretrain")):
        return None
    if any((path / n).exists() and not (path / n).is_dir() for n in ("tb", "pretrain")):
        return None
    pre = path / "pretrain"
    if pre.is_dir() and OwnedFolder.read(pre) is None and _legacy_run(pre, False) is None:
        return None
    if verify:
        try:
            load_checkpoint(ck)
        except (ValueError, OSError) as exc:
            raise FolderNotOursError(
                f"{path} looks like a run of an earlier bsam release (no {MANIFEST}), but "
                f"bsam does not adopt it: {exc}; choose another {_out_option()}") from exc
        if pre.is_dir() and OwnedFolder.read(pre) is None:
            sub = _legacy_run(pre, True)
            if sub is None:
                return None
            OwnedFolder(pre, "run", sub).save()
    return {n: "tree" if n == "tb" else "folder" if n == "pretrain" else "file" for n in held}


def claim_run_folder(path: str | Path, *, resume: bool, overwrite: bool,
                     clear: Sequence[str] = ENTRY_TYPES,
                     log: Callable[[str], None] = print) -> OwnedFolder:
    """:func:`claim_folder` for a run: it writes :data:`RUN_OUTPUTS`; the previous release's
    folders are adopted on resume. ``clear``: the entry types ``overwrite`` removes (a
    :class:`RunFolder` keeps nested ``"folder"`` entries: RnC's pre-training folder is cleared by
    RnC's runner, which claims the folder first)."""
    return claim_folder(path, "run", resume=resume, overwrite=overwrite, option=_out_option(),
                        outputs=RUN_OUTPUTS, clear=clear, legacy=_legacy_run, log=log)


def _out_option() -> str:
    """How the user names a run's folder here: ``--out`` on the command line."""
    spelled = spell("out_dir", "DIR")
    return "out_dir" if spelled == "out_dir='DIR'" else spelled


class RunFolder:
    """The output folder of one run (``None``: a run that writes nothing).

    Only the process of rank 0 touches the folder; on other ranks every method is a no-op.
    """

    def __init__(self, out: str | Path | None, *, rank: int = 0,
                 log: Callable[[str], None] = print) -> None:
        self.path = Path(out) if out is not None else None
        self.writes = self.path is not None and rank == 0
        self.log = log
        self.owned: OwnedFolder | None = None
        self._lock = FolderLock(self.path, what="run") if self.writes and self.path else None

    @property
    def last(self) -> Path | None:
        return self.path / "last.pt" if self.path is not None else None

    @property
    def best(self) -> Path | None:
        return self.path / "best.pt" if self.path is not None else None

    def open(self, *, resume: bool, overwrite: bool, checkpoint: str = "all") -> bool:
        """Lock the folder, claim it (module docstring) and decide whether this run resumes
        (the return value)."""
        if not self.writes or self.path is None:
            return resume
        if _exists(self.path) and not self.path.is_dir():
            raise FolderNotOursError(f"{_out_option()} {self.path} is a file, not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        assert self._lock is not None
        self._lock.acquire()
        try:
            self.owned = claim_run_folder(self.path, resume=resume, overwrite=overwrite,
                                          clear=("file", "tree"), log=self.log)
            return self._decide(resume, checkpoint)
        except BaseException:
            self._lock.release()
            raise

    def _decide(self, resume: bool, checkpoint: str) -> bool:
        assert self.path is not None and self.last is not None and self.best is not None
        if resume and not self.last.exists():
            if self.best.exists() and checkpoint == "best":
                raise ValueError(f"{self.path} holds only best.pt (checkpoint=best): nothing to "
                                 "resume")
            self.log(f"resume: no checkpoint in {self.path}, starting from scratch")
            self.clear()  # an earlier attempt's outputs (ours) would mix with the new run's
            return False
        return resume

    def output(self, name: str, type: str = "file") -> Path | None:
        """Record ``name`` in the folder's manifest before it is written; its path (``None``
        when this process writes nothing)."""
        if not self.writes or self.owned is None:
            return None
        return self.owned.record(name, type)

    def clear(self) -> None:
        """Remove the outputs of an earlier run (what the manifest lists), nothing else."""
        if self.owned is not None:
            self.owned.clear(("file", "tree"))

    def finish(self) -> None:
        """The run ended: its callers write ``result.json`` next, so it is recorded now."""
        self.output("result.json")

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
        if self.folder.writes and self.policy != "none":
            path = self.folder.output("best.pt")
            if path is not None:
                save_torch(plain(dict(payload)), path)

    def save_last(self, payload: Mapping[str, Any]) -> None:
        if self.keeps_last:
            path = self.folder.output("last.pt")
            if path is not None:
                save_torch(plain(dict(payload)), path)

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
        csv_path = folder.output("log.csv")
        assert csv_path is not None
        loggers.append(CSVLogger(csv_path))
        if _has_tensorboard():
            tb_path = folder.output("tb", "tree")
            assert tb_path is not None
            loggers.append(TensorBoardLogger(tb_path))
    for lg in extra:
        if not isinstance(lg, EpochLogger):
            raise TypeError(f"loggers must have log_epoch(row) and close(), got {lg!r}")
        loggers.append(lg)
    return loggers


def _has_tensorboard() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True
