"""A griffe extension for the documentation build: the package's docstrings are written for
Sphinx (reStructuredText roles, ``.. math::`` blocks, ``::`` literal blocks) but rendered by
mkdocstrings as Markdown. This rewrites the RST constructs the package uses into their Markdown
(and pymdownx.arithmatex) equivalents before rendering, so the source stays as it is.

- ``:class:`~a.b.C``` (and func, meth, mod, attr, data, obj, exc) -> a code span ``C``;
- ``:math:`x``` -> ``$x$``; a ``.. math::`` block -> a ``$$ ... $$`` block (``aligned`` when it
  holds ``&`` or ``\\\\``);
- a dollar before a digit (``$250``) -> an escaped dollar, so it is not read as math;
- a paragraph ending in ``::`` -> ``:`` (the indented block after it is already a code block
  in Markdown);
- a grouped entry of an ``Args:`` section (``many, few: region thresholds``, which Sphinx's
  napoleon reads but griffe's Google parser does not) -> one entry per name with the same
  description; a name list that wraps onto the next line is joined first;
- a documented ``**name`` whose signature spells the var-keyword parameter differently (e.g.
  ``**base_kwargs`` for ``**kwargs``) -> the signature's spelling.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")


def _role(m: re.Match[str]) -> str:
    kind, tilde, target = m.groups()
    text = target.split(".")[-1] if tilde else target
    if kind in ("func", "meth") and not text.endswith(")"):
        text += "()"
    return f"`{text}`"


def _math_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)\.\. math::\s*(.*)$", line)
        if not m:
            out.append(line)
            i += 1
            continue
        indent, first = m.groups()
        body = [first] if first.strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        tex = "\n".join(b for b in body if b)
        if "&" in tex or "\\\\" in tex:
            tex = "\\begin{aligned}\n" + tex + "\n\\end{aligned}"
        out += ["", f"{indent}$$", *[indent + t for t in tex.splitlines()], f"{indent}$$", ""]
    return "\n".join(out)


_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_NAMES_ONLY = re.compile(r"^[\w*]+(?:\s*,\s*[\w*]+)*\s*,$")
_GROUPED = re.compile(r"^([\w*]+(?:\s*,\s*[\w*]+)+)\s*:\s?(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_grouped_args(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        head = _SECTION.match(lines[i])
        i += 1
        if not head:
            continue
        base = len(head.group(1))
        item = None
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            line = lines[i]
            if not line.strip():
                out.append(line)
                i += 1
                continue
            if item is None:
                item = _indent(line)
            body = line.strip()
            if _indent(line) == item and _NAMES_ONLY.match(body) and i + 1 < len(lines):
                i += 1
                body = body + " " + lines[i].strip()
            m = _GROUPED.match(body) if _indent(line) == item else None
            if not m:
                out.append(line)
                i += 1
                continue
            i += 1
            more = []
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > item:
                more.append(lines[i])
                i += 1
            for name in (n.strip() for n in m.group(1).split(",")):
                out.append(" " * item + f"{name}: {m.group(2)}")
                out.extend(more)
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    """The docstring ``text`` with its reStructuredText constructs in Markdown."""
    text = re.sub(r"(?<!\\)\$(?=\d)", r"\\$", text)  # money ($250), not math
    text = _split_grouped_args(text)
    text = _math_blocks(text)
    text = _MATH.sub(lambda m: f"${m.group(1).strip()}$", text)
    text = _ROLE.sub(_role, text)
    # "text::" closing a paragraph introduces a literal block: keep one colon
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.MULTILINE)
    return text


def _var_keyword(obj: griffe.Object) -> str | None:
    func = obj.members.get("__init__") if obj.is_class else obj
    if func is None or not getattr(func, "is_function", False):
        return None
    for param in func.parameters:
        if param.kind is griffe.ParameterKind.var_keyword:
            return param.name
    return None


class RstDocstrings(griffe.Extension):
    """Rewrite every docstring once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = rst_to_markdown(obj.docstring.value)
        name = _var_keyword(obj)
        if name is not None:
            text = re.sub(r"^(\s*)\*\*(?!" + re.escape(name) + r"\b)\w+:", rf"\1**{name}:",
                          text, flags=re.MULTILINE)
        obj.docstring.value = text

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        # the top-level package is not among the objects on_object sees
        self.on_object(obj=pkg)
