"""User-facing errors: one way to name an option in a message, wherever the user stands.

The library raises errors that tell the user what to change. The same option is spelled
``dropna=True`` in Python, ``--dropna`` on ``bsam bench`` and ``data.dropna=true`` in a config, so
messages call :func:`spell` instead of writing a spelling out; the ``bsam`` command sets the
spellings of the command being run with :func:`option_spellings`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

__all__ = ["spell", "option_spellings", "ConfigError"]

_SPELLINGS: ContextVar[Mapping[str, str] | None] = ContextVar("option_spellings", default=None)


class ConfigError(ValueError):
    """A configuration value of the wrong type or out of range (the message names the key)."""


def spell(option: str, value: Any = True) -> str:
    """How the user sets ``option`` to ``value`` here: the current command's spelling (a CLI flag
    or a config key) when one is set, else the Python keyword ``option=value``."""
    table = _SPELLINGS.get()
    if table is not None and option in table:
        return table[option]
    return f"{option}={value!r}"


@contextlib.contextmanager
def option_spellings(table: Mapping[str, str]) -> Iterator[None]:
    """Within the block, :func:`spell` uses ``table`` (option name -> what to type)."""
    token = _SPELLINGS.set(dict(table))
    try:
        yield
    finally:
        _SPELLINGS.reset(token)
