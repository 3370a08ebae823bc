"""The YAML recipes shipped inside the package: the paper's benchmarks and the quick ones.

They are package data, so they are there after ``pip install balanced-sam`` wherever the
command runs from::

    >>> from balanced_sam.configs import list_configs, config_path, copy_config
    >>> "diamonds_bsam" in list_configs()
    True
    >>> config_path("diamonds_bsam").name        # a shipped name, with or without .yaml
    'diamonds_bsam.yaml'

:func:`config_path` is what ``bsam train --config`` resolves its argument with: a file that
exists wins; otherwise the argument names a shipped config. The command line's side is
``bsam configs`` (list), ``bsam configs NAME`` (print one), ``bsam configs NAME --copy DIR``
(write one out to edit); :func:`add_parser` and :func:`run` implement it, :func:`cli_main`
runs it on its own.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["list_configs", "config_path", "copy_config", "describe", "add_parser", "run",
           "cli_main", "CONFIG_DIR"]

#: The folder that holds the shipped ``*.yaml`` files.
CONFIG_DIR = Path(__file__).resolve().parent
_SUFFIXES = (".yaml", ".yml")


def list_configs() -> list[str]:
    """Names of the shipped configs (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.iterdir()
                  if p.suffix in _SUFFIXES and p.is_file())


def _stem(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _unknown(name: str) -> FileNotFoundError:
    names = list_configs()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    # a prefix such as "agedb" is a likely typo too
    close += [n for n in names if n.startswith(name) and n not in close][:5]
    hint = (f"close names: {', '.join(close)}" if close
            else f"shipped configs: {', '.join(names)}")
    return FileNotFoundError(
        f"no config file {name!r} and no shipped config of that name ({hint}; "
        "`bsam configs` lists them)")


def config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The path of a config given as a file path or as the name of a shipped config.

    Resolution, in this order:

    1. a file that exists at ``name_or_path`` (relative to the working folder) wins;
    2. a bare name (no folder part), with or without ``.yaml``, names a shipped config;
    3. ``configs/NAME.yaml``, the repository's layout before the configs became package
       data, names the shipped config ``NAME`` too, so older commands keep working.

    Anything else raises :class:`FileNotFoundError` that lists the closest shipped names.
    A folder raises :class:`ValueError`.
    """
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ValueError("config name is empty: give a YAML file or a shipped config name "
                         "(`bsam configs` lists them)")
    p = Path(text).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ValueError(f"config {text!r} is a folder, not a file; give a YAML file or a shipped "
                                "config name (`bsam configs` lists them)")
    stem = _stem(p.name)
    shipped = CONFIG_DIR / f"{stem}.yaml"
    bare = p.parent == Path(".")
    old_layout = p.parent.name == "configs" and p.suffix in _SUFFIXES
    if (bare or old_layout) and shipped.is_file():
        return shipped
    if not bare:
        also = (f"; a shipped config of that name exists: --config {stem}"
                if shipped.is_file() else "")
        raise FileNotFoundError(f"config file {text} does not exist{also}")
    raise _unknown(stem)


def describe(name: str) -> str:
    """The first comment line of a shipped config (its one-line description)."""
    for line in config_path(name).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            break
    return ""


def copy_config(name: str, dest_dir: str | os.PathLike[str], *,
                overwrite: bool = False) -> Path:
    """Write the shipped config ``name`` into the folder ``dest_dir`` (created if missing) and
    return the new file's path.

    An existing file of the same name raises :class:`FileExistsError` unless
    ``overwrite=True``, and so does a ``dest_dir`` that is an existing file. A symbolic link
    in the new file's place (even a dangling one) is always refused, with or without
    ``overwrite``: the copy never writes through a link to somewhere outside ``dest_dir``.
    """
    stem = _stem(os.fspath(name))
    if stem not in list_configs():
        raise _unknown(stem)
    src = CONFIG_DIR / f"{stem}.yaml"
    dest = Path(dest_dir).expanduser()
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"copy destination {dest} is a file; --copy takes a folder")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / src.name
    if target.is_symlink():
        raise FileExistsError(
            f"{target} is a symbolic link (to {os.readlink(target)}); bsam configs --copy never "
            "writes through a link, with or without --force: remove the link or copy into "
            "another folder")
    if target.is_dir():
        raise FileExistsError(f"{target} is a folder; remove it or copy into another folder")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; remove it or pass --force to replace it")
    data = src.read_bytes()
    if not target.exists():
        # O_EXCL | O_NOFOLLOW: a link (or file) that appeared since the check is not followed
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            raise FileExistsError(f"{target} appeared while copying; run the copy again") \
                from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return target
    # --force over a regular file: write beside it and rename over it (a rename replaces the
    # directory entry itself, so even a link put there meanwhile is replaced, not followed)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


# ---------------------------------------------------------------- the `bsam configs` command
_HELP = "list, show or copy the shipped YAML configs"
_DESCRIPTION = (
    "The YAML recipes shipped with balanced-sam. Without NAME: list them with their one-line "
    "descriptions. With NAME: print that config. With NAME --copy DIR: write it into DIR to "
    "edit, then run `bsam train --config DIR/NAME.yaml`. `bsam train --config NAME` runs a "
    "shipped config as it is.")


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("name", nargs="?", help="a shipped config (with or without .yaml)")
    p.add_argument("--copy", metavar="DIR", help="write the config into folder DIR")
    p.add_argument("--force", action="store_true",
                   help="with --copy: replace an existing file of the same name")
    p.add_argument("--path", action="store_true",
                   help="print the config's installed path instead of its contents")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``configs`` command to a parser's subparsers; handle it with :func:`run`."""
    return _configure(subparsers.add_parser("configs", help=_HELP, description=_DESCRIPTION))


def run(args: argparse.Namespace) -> int:
    """Carry out ``bsam configs`` for parsed ``args``; 0 on success. Bad names raise
    :class:`FileNotFoundError`, a refused overwrite :class:`FileExistsError`."""
    if args.name is None:
        if args.copy or args.force or args.path:
            raise ValueError("--copy, --force and --path need a config NAME "
                             "(`bsam configs` lists them)")
        names = list_configs()
        width = max(len(n) for n in names)
        print(f"shipped configs ({CONFIG_DIR}):")
        for n in names:
            print(f"  {n:<{width}}  {describe(n)}")
        print("\nrun one: bsam train --config NAME; edit one: bsam configs NAME --copy DIR")
        return 0
    stem = _stem(args.name)
    if stem not in list_configs():
        raise _unknown(stem)
    if args.copy:
        print(copy_config(stem, args.copy, overwrite=args.force))
        return 0
    if args.force:
        raise ValueError("--force goes with --copy DIR")
    path = config_path(stem)
    if args.path:
        print(path)
    else:
        sys.stdout.write(path.read_text(encoding="utf-8"))
    return 0


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``bsam configs`` as a program of its own (``python -m balanced_sam.configs``)."""
    parser = _configure(argparse.ArgumentParser(prog="bsam configs", description=_DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"bsam configs: error: {exc}", file=sys.stderr)
        return 2
