"""MkDocs hooks that make the site work without internet: math and code colour from packages.

* Math: ``pymdownx.arithmatex`` (generic mode) leaves ``\\( ... \\)`` and ``\\[ ... \\]`` in
  ``arithmatex`` spans and divs, which a browser shows as raw TeX unless a script from a CDN
  typesets them. :func:`on_page_content` converts each one to MathML at build time with the
  ``latex2mathml`` package (pure Python); every current browser renders MathML natively, so a
  page needs no script. A formula that does not convert fails the build, naming the page.
* Code: ``pymdownx.highlight`` colours code with Pygments' classes; :func:`on_post_build`
  writes the matching stylesheet (``css/pygments.css``) from the installed Pygments, and the
  theme's own highlight.js (fetched from a CDN) is switched off in ``mkdocs.yml``.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from latex2mathml.converter import convert
from pygments.formatters import HtmlFormatter

_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])'
    r"\s*</(?P=tag)>", re.S)
# environments latex2mathml knows under another name
_ENVIRONMENTS = {"aligned": "align*", "align": "align*", "gathered": "gather*"}
_LEFTOVER = re.compile(r"<m[io]>(\\[A-Za-z]+|&amp;|&)</m[io]>")
PYGMENTS_STYLE = "friendly"


def to_mathml(tex: str, display: bool) -> str:
    """One formula as MathML; raises ``ValueError`` when latex2mathml cannot render it."""
    for old, new in _ENVIRONMENTS.items():
        tex = tex.replace(f"\\begin{{{old}}}", f"\\begin{{{new}}}")
        tex = tex.replace(f"\\end{{{old}}}", f"\\end{{{new}}}")
    try:
        out = convert(tex.strip(), display="block" if display else "inline")
    except Exception as exc:  # latex2mathml raises its own exception types
        raise ValueError(f"cannot convert {tex!r} to MathML: {exc}") from exc
    bad = _LEFTOVER.search(out)
    if bad:
        raise ValueError(f"cannot convert {tex!r} to MathML: {bad.group(1)!r} left as text")
    return out


def on_page_content(html_text: str, page: Any, **_: Any) -> str:
    def one(m: re.Match[str]) -> str:
        display = m.group("block") is not None
        tex = html.unescape(m.group("block") if display else m.group("inline"))
        try:
            return to_mathml(tex, display)
        except ValueError as exc:
            raise ValueError(f"{page.file.src_path}: {exc}") from None

    return _MATH.sub(one, html_text)


def on_post_build(config: Any, **_: Any) -> None:
    css = Path(config["site_dir"]) / "css" / "pygments.css"
    css.parent.mkdir(parents=True, exist_ok=True)
    css.write_text(HtmlFormatter(style=PYGMENTS_STYLE).get_style_defs(".highlight") + "\n")
