"""``bsam data prepare``: check a benchmark folder, fetch what is public, build what can be built,
and say exactly what is still missing.

Rules: nothing under ``root`` is ever deleted or overwritten. Downloads go to a temporary name next
to the target and are moved into place only when the target is still absent (a hard link, which
fails rather than replaces); archives are unpacked member by member, skipping members that exist.
A downloaded archive is removed after unpacking (it is ours); an archive the user put there is
kept. Known checksums are verified (``agedb.csv``); a file already present with another checksum is
kept and reported.

Sources: the split CSVs from github.com/YyzHarry/imbalanced-regression (MIT),
the IMDB-WIKI tars from the ETH Zurich project page, the NYUD2-DIR ``data.zip`` from the Google
Drive file that ``nyud2-dir/download_nyud2.py`` of the same repository fetches. AgeDB images need a
password from the AgeDB authors and are never fetched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from balanced_sam.data import agedb, imdb_wiki, nyud2
from balanced_sam.data.images import (
    DatasetNotFoundError,
    MissingImagesError,
    check_files_exist,
    read_split_csv,
)
from balanced_sam.data.registry import dataset_names

__all__ = ["prepare_dataset", "DatasetNotReadyError", "URLS", "SHA256", "NAMES", "fetch"]

NAMES = tuple(dataset_names(prepare=True))  # the registry says which datasets it prepares
_RAW = "https://raw.githubusercontent.com/YyzHarry/imbalanced-regression/main"
URLS: dict[str, str] = {
    "agedb.csv": f"{_RAW}/agedb-dir/data/agedb.csv",
    "imdb_wiki.csv": f"{_RAW}/imdb-wiki-dir/data/imdb_wiki.csv",
    "imdb_crop.tar": "https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/static/imdb_crop.tar",
    "wiki_crop.tar": "https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/static/wiki_crop.tar",
    # The Google Drive id in nyud2-dir/download_nyud2.py; `confirm=t` skips the large-file page.
    "nyud2_data.zip": ("https://drive.usercontent.google.com/download?"
                       "id=1WoOZOBpOWfmwe7bknWS5PMUCLBPFKTOw&export=download&confirm=t"),
}
SHA256: dict[str, str] = {
    "agedb.csv": "ab9f8d4c7099a9d74ec5094c42b6fe9f1927a166a48d2ab800a88b2fd6081252",
}
_SHOW = 5


class DatasetNotReadyError(DatasetNotFoundError):
    """``prepare_dataset`` could not complete; the message lists what is missing and where to get
    it (``missing`` holds the same lines)."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Download ``url`` to ``dest`` (a new file); raises ``OSError`` (``URLError`` included) when
    offline or refused. Replace this module attribute to use another downloader."""
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "xb") as out:
        shutil.copyfileobj(resp, out, length=1 << 20)


def _place(tmp: Path, target: Path) -> bool:
    """Move ``tmp`` to ``target`` only if ``target`` is absent; ``False`` (and ``tmp`` removed)
    when it appeared meanwhile."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        return False
    except OSError:  # no hard links on this file system
        if target.exists():
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, target)
        return True
    tmp.unlink(missing_ok=True)
    return True


def _download(key: str, target: Path, echo: Callable[[str], Any],
              sha256: str | None = None) -> str | None:
    """Fetch ``URLS[key]`` into ``target`` (absent); returns ``None`` on success or a reason."""
    url = URLS[key]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    echo(f"downloading {url} -> {target}")
    try:
        fetch(url, tmp)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        return f"could not download {url}: {reason}"
    if sha256 is not None:
        got = _sha256(tmp)
        if got != sha256:
            tmp.unlink(missing_ok=True)
            return f"{url} has sha256 {got}, expected {sha256}; not used"
    if not _place(tmp, target):
        echo(f"{target} appeared during the download; kept it")
    return None


def _safe_members(names: list[str], dest: Path) -> None:
    base = dest.resolve()
    for n in names:
        p = (dest / n).resolve()
        if p != base and base not in p.parents:
            raise ValueError(f"archive member {n!r} would unpack outside {dest}")


def _unpack(archive: Path, dest: Path, echo: Callable[[str], Any]) -> int:
    """Unpack members of a tar / zip into ``dest`` that do not exist there yet; returns how many
    files were written."""
    echo(f"unpacking {archive} into {dest} (existing files are kept)")
    written = 0
    with _members(archive) as members:
        _safe_members([name for name, _, _ in members], dest)
        for name, kind, open_member in members:
            target = dest / name
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            if kind != "file" or target.exists():
                continue
            src = open_member()
            if src is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with src, open(target, "xb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            written += 1
    return written


@contextlib.contextmanager
def _members(archive: Path) -> Iterator[list[tuple[str, str, Callable[[], Any]]]]:
    """``(name, "dir" | "file" | "other", open)`` of every member of a zip or tar archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield [(i.filename, "dir" if i.is_dir() else "file",
                    lambda i=i: zf.open(i)) for i in zf.infolist()]
        return
    with tarfile.open(archive) as tf:
        yield [(m.name, "dir" if m.isdir() else "file" if m.isfile() else "other",
                lambda m=m: tf.extractfile(m)) for m in tf.getmembers()]


def _missing_images(root: Path, relpaths: list[str]) -> list[str]:
    try:
        check_files_exist(root, relpaths)
    except MissingImagesError as exc:
        return exc.missing
    return []


def _describe_missing(files: list[str], root: Path) -> str:
    shown = ", ".join(str(root / f) for f in files[:_SHOW])
    more = f" (and {len(files) - _SHOW} more)" if len(files) > _SHOW else ""
    return f"{len(files)} listed files missing: {shown}{more}"


class _Report:
    def __init__(self, name: str, root: Path, echo: Callable[[str], Any]) -> None:
        self.d: dict[str, Any] = {"name": name, "root": str(root), "present": [], "fetched": [],
                                  "built": [], "missing": [], "notes": [], "ok": False}
        self.echo = echo

    def add(self, key: str, text: str) -> None:
        self.d[key].append(text)
        prefix = {"present": "ok", "fetched": "fetched", "built": "built", "missing": "MISSING",
                  "notes": "note"}[key]
        self.echo(f"[{prefix}] {text}")

    def finish(self) -> dict[str, Any]:
        if self.d["missing"]:
            lines = "\n  ".join(self.d["missing"])
            raise DatasetNotReadyError(
                f"{self.d['name']} under {self.d['root']} is not complete:\n  {lines}",
                list(self.d["missing"]))
        self.d["ok"] = True
        self.echo(f"{self.d['name']} is ready under {self.d['root']}")
        return self.d


def _split_csv(rep: _Report, root: Path, fname: str, download: bool,
               sha: str | None) -> bool:
    """Make sure ``root/fname`` exists (fetching it); returns whether it is there."""
    target = root / fname
    if target.is_file():
        if sha is not None and _sha256(target) != sha:
            rep.add("notes", f"{target} differs from the released file (sha256 {sha[:12]}...); "
                             "kept as is: results may not match the paper")
        rep.add("present", str(target))
        return True
    if download:
        why = _download(fname, target, rep.echo, sha)
        if why is None:
            rep.add("fetched", str(target))
            return True
        rep.add("notes", why)
    return False


def _prepare_agedb(root: Path, download: bool, rep: _Report) -> None:
    if not _split_csv(rep, root, agedb.CSV_NAME, download, SHA256["agedb.csv"]):
        rep.add("missing", f"{root / agedb.CSV_NAME}: the AgeDB-DIR split; get it from "
                           f"{URLS['agedb.csv']} (MIT licence)")
        if not (root / "AgeDB").is_dir():
            rep.add("missing", f"{root / 'AgeDB'}: the AgeDB images; request the password from "
                               "the AgeDB authors at https://ibug.doc.ic.ac.uk/resources/agedb/ "
                               f"and unpack the images into {root}")
        return
    df = read_split_csv(root / agedb.CSV_NAME, ("age", "path", "split"), what="AgeDB-DIR CSV")
    missing = _missing_images(root, df["path"].tolist())
    if missing:
        archive = root / "AgeDB.zip"
        how = (f"unpack {archive} with the password the AgeDB authors sent "
               f"(`unzip {archive} -d {root}`)" if archive.is_file() else
               "request the password from the AgeDB authors at "
               "https://ibug.doc.ic.ac.uk/resources/agedb/ and unpack the images")
        rep.add("missing", f"AgeDB images: {_describe_missing(missing, root)}; {how} so that "
                           f"{root / 'AgeDB'}/<id>_<name>_<age>_<gender>.jpg exist")
    else:
        rep.add("present", f"{len(df)} AgeDB images under {root / 'AgeDB'}")


def _fetch_and_unpack(key: str, archive: Path, root: Path, download: bool,
                      rep: _Report) -> None:
    """Unpack ``archive`` into ``root`` (fetching ``URLS[key]`` first when it is absent and
    downloads are allowed); an archive we fetched is removed afterwards, the user's is kept."""
    ours = False
    if not archive.is_file() and download:
        why = _download(key, archive, rep.echo)
        if why is not None:
            rep.add("notes", why)
        else:
            ours = True
            rep.add("fetched", str(archive))
    if archive.is_file():
        n = _unpack(archive, root, rep.echo)
        rep.add("built", f"{n} files unpacked from {archive}")
        if ours:
            archive.unlink()


def _prepare_imdb_wiki(root: Path, download: bool, rep: _Report) -> None:
    csv = root / imdb_wiki.CSV_NAME
    have_csv = _split_csv(rep, root, imdb_wiki.CSV_NAME, download, None)
    # faces: unpack a tar that is there (the user's or ours) when its folder is missing
    for db in ("imdb", "wiki"):
        folder, tar = root / f"{db}_crop", root / f"{db}_crop.tar"
        if (folder / f"{db}.mat").is_file():
            continue
        if (not tar.is_file() and download and have_csv
                and not _missing_images(root, _paths_of(csv, db))):
            continue  # images present, only the .mat is absent: no need for 7 GB
        _fetch_and_unpack(f"{db}_crop.tar", tar, root, download, rep)
    if not have_csv:
        mats = [root / f"{db}_crop" / f"{db}.mat" for db in ("imdb", "wiki")]
        if all(m.is_file() for m in mats):
            df = imdb_wiki.make_split_from_mat(root)
            tmp = csv.with_name(csv.name + f".tmp{os.getpid()}")
            df.to_csv(tmp, index=False)
            _place(tmp, csv)
            counts = df["split"].value_counts().to_dict()
            rep.add("built", f"{csv} from the .mat metadata ({counts.get('train', 0)} train / "
                             f"{counts.get('val', 0)} val / {counts.get('test', 0)} test; same "
                             "rule as the DIR scripts, not the same draw as the released CSV)")
            have_csv = True
        else:
            absent = [str(m) for m in mats if not m.is_file()]
            rep.add("missing", f"{csv}: the IMDB-WIKI-DIR split; get it from "
                               f"{URLS['imdb_wiki.csv']}, or put the IMDB-WIKI metadata "
                               f"({', '.join(absent)}) in place to rebuild it")
    if have_csv:
        df = read_split_csv(csv, ("age", "path", "split"), what="IMDB-WIKI-DIR CSV")
        missing = _missing_images(root, df["path"].tolist())
        if missing:
            rep.add("missing", f"IMDB-WIKI faces: {_describe_missing(missing, root)}; download "
                               f"{URLS['imdb_crop.tar']} and {URLS['wiki_crop.tar']} and unpack "
                               f"them in {root}")
        else:
            rep.add("present", f"{len(df)} IMDB-WIKI faces under {root}")


def _paths_of(csv: Path, db: str) -> list[str]:
    df = read_split_csv(csv, ("age", "path", "split"), what="IMDB-WIKI-DIR CSV")
    paths = df["path"].astype(str)
    return paths[paths.str.startswith(f"{db}_crop/")].tolist()


def _prepare_nyud2(root: Path, download: bool, rep: _Report, seed: int, img_size: int) -> None:
    train_csv, test_csv = root / nyud2.TRAIN_CSV, root / nyud2.TEST_CSV
    if not (train_csv.is_file() and test_csv.is_file()):
        _fetch_and_unpack("nyud2_data.zip", root / "data.zip", root, download, rep)
    lacking = [p for p in (train_csv, test_csv) if not p.is_file()]
    if lacking:
        rep.add("missing", f"{', '.join(map(str, lacking))}: the NYUD2-DIR data; get data.zip "
                           f"from {URLS['nyud2_data.zip']} (the file nyud2-dir/download_nyud2.py "
                           f"fetches) and unpack it in {root}")
        return
    ok = True
    for csv, what in ((train_csv, "train"), (test_csv, "test")):
        df = read_split_csv(csv, ("rgb", "depth"), header=False, what=f"NYUD2-DIR {what} CSV")
        files = df["rgb"].tolist() + df["depth"].tolist()
        missing = _missing_images(root, files)
        if missing:
            ok = False
            rep.add("missing", f"NYUD2-DIR {what} images: {_describe_missing(missing, root)}; "
                               f"unpack data.zip ({URLS['nyud2_data.zip']}) in {root}")
        else:
            rep.add("present", f"{len(df)} NYUD2-DIR {what} pairs")
    mask_path = root / nyud2.MASK_FILE
    if mask_path.is_file():
        rep.add("present", str(mask_path))
    elif ok:
        depth = nyud2.load_test_depths(root, img_size)
        mask = nyud2.make_balanced_mask(depth, seed=seed)
        tmp = mask_path.with_name(f".{mask_path.stem}.tmp{os.getpid()}.npy")
        np.save(tmp, mask)
        _place(tmp, mask_path)
        per_bin = int(mask.sum()) // (nyud2.NUM_BINS - nyud2.FIRST_BALANCED_BIN)
        rep.add("built", f"{mask_path}: balanced test mask {mask.shape}, {per_bin} pixels in "
                         f"each depth bin {nyud2.FIRST_BALANCED_BIN}..{nyud2.NUM_BINS - 1} "
                         f"(seed {seed})")


def prepare_dataset(
    name: str,
    root: str | os.PathLike[str],
    download: bool = True,
    echo: Callable[[str], Any] = print,
    *,
    seed: int = 0,
    img_size: int = 240,
) -> dict[str, Any]:
    """Check, fetch and build benchmark ``name`` (``"agedb"``, ``"imdb-wiki"``, ``"nyud2"``) under
    ``root`` (created when absent).

    Returns a report: ``{"name", "root", "present", "fetched", "built", "missing", "notes",
    "ok"}`` (lists of human-readable lines; ``echo`` prints each as it happens). With
    ``download=False`` nothing is fetched. Builds the IMDB-WIKI-DIR split from the ``.mat``
    metadata when no CSV can be had, and the NYUD2-DIR balanced test mask when absent (pixels
    drawn with ``seed``, at the test depth resolution of ``img_size``: 228 x 304 for the paper's
    240; the mask must be built with the ``img_size`` used for training).

    Raises :class:`DatasetNotReadyError` (a ``FileNotFoundError``) listing what is missing and where
    to get it when the benchmark cannot be completed, ``ValueError`` for an unknown ``name``.
    """
    key = name.lower().replace("_", "-")
    if key not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(NAMES)}")
    r = Path(root).expanduser()
    if r.exists() and not r.is_dir():
        raise DatasetNotReadyError(f"{r} exists and is not a directory", [str(r)])
    r.mkdir(parents=True, exist_ok=True)
    rep = _Report(key, r, echo)
    if key == "agedb":
        _prepare_agedb(r, download, rep)
    elif key == "imdb-wiki":
        _prepare_imdb_wiki(r, download, rep)
    else:
        _prepare_nyud2(r, download, rep, seed, img_size)
    return rep.finish()
