"""Output folders that belong to the project: the manifest, claiming a folder, recording writes.

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

Folders of the previous release (no manifest): a folder holding only a run's outputs (and
RnC's ``pretrain``) whose ``last.pt`` (or, without one, ``best.pt``) loads as a bsam checkpoint
is adopted on ``resume``: its manifest is written, listing those files. A fresh run and
``overwrite`` refuse it (the message says to resume it, or to delete it yourself), since nothing
proves its ``tb/`` or ``log.csv`` were written by bsam.

:mod:`balanced_sam.outputs` builds a run's folder on this
(:class:`~balanced_sam.outputs.RunFolder`, which adopts such old folders); the bench claims its
own folder the same way (kind ``"bench"``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from balanced_sam.errors import spell
from balanced_sam.io import write_json

__all__ = ["MANIFEST", "MANIFEST_VERSION", "KINDS", "ENTRY_TYPES", "RunExistsError",
           "FolderNotOursError", "OwnedFolder", "claim_folder", "output_path", "folder_contents",
           "path_exists"]

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


def path_exists(p: Path) -> bool:
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
        if not path_exists(m):
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
        return [n for n, t in self.entries.items() if t in types and path_exists(self.path / n)]

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
                if [n for n in folder_contents(p) if n != MANIFEST]:
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


def folder_contents(path: Path) -> list[str]:
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
    if path_exists(path) and not path.is_dir():
        raise FolderNotOursError(f"{option} {path} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    owned = OwnedFolder.read(path)
    if owned is None:
        held = folder_contents(path)
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
        if path_exists(p) and not owned.owns(name):
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


