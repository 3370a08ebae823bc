"""The documentation site works offline: every page loads its scripts and stylesheets from the
site itself, math is MathML (no TeX left for a CDN script to typeset), and code is coloured
with a stylesheet that the build writes."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from _repo_scripts import ROOT, load_repo_script

pytest.importorskip("mkdocs")
pytest.importorskip("latex2mathml")
hook = load_repo_script("docs/_ext/offline_assets.py", "offline_assets")


class _Assets(HTMLParser):
    """Collects what a page loads: script sources and stylesheet links (not plain links)."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.loads.append(a["src"] or "")
        if tag == "link" and "stylesheet" in (a.get("rel") or "") and a.get("href"):
            self.loads.append(a["href"] or "")
        if tag in ("img", "iframe") and a.get("src"):
            self.loads.append(a["src"] or "")


def _remote(url: str) -> bool:
    return bool(re.match(r"^([a-z][a-z0-9+.-]*:)?//", url, re.I))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                          "-d", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


@pytest.mark.e2e
def test_no_page_loads_anything_from_another_host(site: Path) -> None:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    remote = {}
    for page in pages:
        parser = _Assets()
        parser.feed(page.read_text(encoding="utf-8"))
        bad = [u for u in parser.loads if _remote(u)]
        if bad:
            remote[str(page.relative_to(site))] = bad
    assert not remote, f"pages that load from another host: {remote}"


@pytest.mark.e2e
def test_math_is_mathml_and_code_is_coloured(site: Path) -> None:
    page = (site / "index.html").read_text(encoding="utf-8")
    api = (site / "api" / "optim" / "index.html").read_text(encoding="utf-8")
    for text in (page, api):
        assert "<math" in text
        assert 'class="arithmatex"' not in text and "\\(" not in text
    # a display block with aligned rows becomes a MathML table, not raw TeX
    assert "<mtable" in api
    code = (site / "own-loop" / "index.html").read_text(encoding="utf-8")
    assert re.search(r'<div class="highlight">\s*<pre>.*?<span class="k">', code, re.S)
    css = (site / "css" / "pygments.css").read_text()
    assert ".highlight .k " in css  # keywords have a colour
    assert "css/pygments.css" in code


def test_a_formula_that_does_not_convert_fails_loudly() -> None:
    assert "<mfrac>" in hook.to_mathml(r"\frac{1}{\sqrt{N_k}}", display=False)
    assert "<mtable" in hook.to_mathml(r"\begin{aligned} a &= b \\ c &= d \end{aligned}", True)
    with pytest.raises(ValueError, match="cannot convert"):
        hook.to_mathml(r"a &= b", display=False)  # an alignment outside any environment


def test_hosted_build_needs_what_the_docs_extra_lists() -> None:
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["docs"]
    lines = [ln.strip() for ln in (ROOT / "docs" / "requirements.txt").read_text().splitlines()]
    assert sorted(ln for ln in lines if ln and not ln.startswith("#")) == sorted(extra)
    rtd = (ROOT / ".readthedocs.yaml").read_text()
    assert "docs/requirements.txt" in rtd and "mkdocs.yml" in rtd
