"""docs/_ext/rst_docstrings.py: the reStructuredText of the docstrings rewritten for
mkdocstrings (the build itself runs in CI: mkdocs build --strict)."""

from __future__ import annotations

import pytest
from _repo_scripts import load_repo_script

pytest.importorskip("griffe")
ext = load_repo_script("docs/_ext/rst_docstrings.py", "rst_docstrings")
convert = ext.rst_to_markdown


def test_roles_become_code_spans():
    assert convert("see :class:`~balanced_sam.LabelBins` and :meth:`LabelBins.regions`") == \
        "see `LabelBins` and `LabelBins.regions()`"
    assert convert(":func:`balanced_sam.metrics.format_table`") == \
        "`balanced_sam.metrics.format_table()`"
    assert convert(":mod:`balanced_sam.metrics`") == "`balanced_sam.metrics`"


def test_math_inline_and_blocks():
    assert convert(r"weight :math:`1/\sqrt{N_k}` per bin") == r"weight $1/\sqrt{N_k}$ per bin"
    text = "Intro:\n\n.. math::\n    a &= b \\\\\n    c &= d\n\nAfter."
    out = convert(text)
    assert "$$\n\\begin{aligned}\na &= b \\\\\nc &= d\n\\end{aligned}\n$$" in out
    assert out.endswith("After.") and ".. math::" not in out
    one = convert(".. math:: f(x) = x^2\n\nnext")
    assert "$$\nf(x) = x^2\n$$" in one and "aligned" not in one


def test_money_and_literal_blocks():
    assert convert("bins of $250 up to $19,000") == r"bins of \$250 up to \$19,000"
    assert convert("Example::\n\n    code") == "Example:\n\n    code"


def test_grouped_args_are_split():
    text = ("Args:\n    many, few: region thresholds\n        on the count.\n"
            "    model, loss_fn, inputs,\n        targets: as before.\n    depth: flag.")
    assert convert(text) == (
        "Args:\n    many: region thresholds\n        on the count.\n"
        "    few: region thresholds\n        on the count.\n"
        "    model: as before.\n    loss_fn: as before.\n    inputs: as before.\n"
        "    targets: as before.\n    depth: flag.")
