"""The course as a book: mkdocs.yml builds docs/ and the executed notebooks into a static site.

The site is built once per run, into a temporary folder, with ``mkdocs build --strict`` (any warning
fails: a broken link between pages, a page left out of the nav, a missing anchor). Then the built
HTML is read back: every page of the nav exists, each notebook page carries its stored outputs, and
every link and image of every page points at a file of the site. When a Chromium is installed, one
page is also opened headless and must render. Needs the ``docs`` extra (mkdocs, mkdocs-jupyter).
"""
from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytest.importorskip("mkdocs", reason='the book needs MkDocs: pip install -e ".[docs]"')
pytest.importorskip("mkdocs_jupyter", reason='the book needs mkdocs-jupyter: pip install -e ".[docs]"')
yaml = pytest.importorskip("yaml", reason='mkdocs.yml is read with PyYAML: pip install -e ".[docs]"')

ROOT = Path(__file__).resolve().parents[1]
# an output area in the page's markup (the class name alone also appears in the inlined CSS)
OUTPUT_CELL = re.compile(r'class="[^"]*\bjp-OutputArea-output\b')
CHROMIUMS = ["chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "google-chrome-stable"]

# The build renders every notebook: about half a minute on 2 cores, so the tests that need it are slow.
slow = pytest.mark.slow


def nav_sources(nav) -> list[tuple[str, str]]:
    """(title, source path) of every page in mkdocs.yml's nav, sections flattened, in order."""
    out = []
    for entry in nav:
        for title, value in entry.items():
            out.extend(nav_sources(value) if isinstance(value, list) else [(title, value)])
    return out


def built_page(site: Path, source: str) -> Path:
    """Where MkDocs writes a source page with directory URLs: x.md and x.ipynb -> x/index.html."""
    stem = posixpath.splitext(source)[0]
    return site / ("index.html" if stem == "index" else f"{stem}/index.html")


class _Links(HTMLParser):
    """Every href and src of a page, and the ids its anchors can point at."""

    def __init__(self):
        super().__init__()
        self.targets, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.targets.append(value)
            elif name == "id" and value:
                self.ids.add(value)


def broken_links(site: Path) -> list[str]:
    """'page -> link' for each link of the site that points at no file (or at no id of its page)."""
    site = site.resolve()                         # pages are keyed as the links resolve
    pages = {p: _Links() for p in site.rglob("*.html")}
    for page, parser in pages.items():
        parser.feed(page.read_text(encoding="utf-8"))
    broken = []
    for page, parser in pages.items():
        for link in parser.targets:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:      # another site (MathJax, highlight.js): not ours
                continue
            path = unquote(parts.path)
            if path.startswith("/"):              # 404.html's links start from the site's root
                target = (site / path.lstrip("/")).resolve()
            else:
                target = (page.parent / path).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(site)} -> {link}")
            elif parts.fragment and target in pages and parts.fragment not in pages[target].ids:
                broken.append(f"{page.relative_to(site)} -> {link} (no such anchor)")
    return broken


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The book built with --strict into a temporary folder (run from there: nothing lands in the repository)."""
    out = tmp_path_factory.mktemp("book") / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
                         cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"mkdocs build --strict failed (fix what it reports):\n{run.stderr[-4000:]}"
    return out


@slow
def test_every_page_of_the_nav_is_built(site):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    sources = [src for _, src in nav_sources(config["nav"])]
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    notebooks = sorted(f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(s for s in sources if s.endswith(".md")) == docs, "every docs/*.md in the nav, once"
    assert [s for s in sources if s.endswith(".ipynb")] == notebooks, "every notebook in the nav, in order"
    missing = [s for s in sources if not built_page(site, s).is_file()]
    assert not missing, f"pages in the nav but not in the site: {missing}"


@slow
def test_notebook_pages_show_their_stored_outputs(site):
    """Rendered, not executed: a notebook's page holds the outputs committed in its .ipynb."""
    for ipynb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        html = built_page(site, f"notebooks/{ipynb.name}").read_text(encoding="utf-8")
        assert OUTPUT_CELL.search(html), (
            f"{ipynb.name}: its page shows no outputs: execute it with "
            f"`jupyter nbconvert --to notebook --execute --inplace notebooks/{ipynb.name}`")
    plots = built_page(site, "notebooks/03_the_lora_layer.ipynb").read_text(encoding="utf-8")
    assert 'src="data:image/png;base64,' in plots, "03's plots are missing from its page"


@slow
def test_links_between_pages_resolve(site):
    # docs/index.md links each notebook as ../notebooks/NAME.ipynb: in the site, its page
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="notebooks/03_the_lora_layer/"' in index
    broken = broken_links(site)
    assert not broken, "links to nothing in the built site:\n" + "\n".join(broken)


def test_the_link_checker_finds_a_broken_link(tmp_path):
    """The checker above is not vacuous: a link to a missing page and a missing anchor are reported."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.html").write_text('<h1 id="top">A</h1><a href="#top">ok</a>')
    (tmp_path / "index.html").write_text(
        '<a href="a/">ok</a><a href="b/">missing</a><a href="a/#nowhere">no anchor</a>'
        '<a href="https://example.org/">elsewhere</a>')
    assert broken_links(tmp_path) == ["index.html -> b/", "index.html -> a/#nowhere (no such anchor)"]


@pytest.fixture
def chromium() -> str:
    """The path of a Chromium binary; skips (before the site is built) when none is installed."""
    found = next((shutil.which(name) for name in CHROMIUMS if shutil.which(name)), None)
    if found is None:
        pytest.skip(f"no Chromium installed (looked for {', '.join(CHROMIUMS)}): the rendering check needs one")
    return found


@slow
def test_a_page_renders_in_headless_chromium(chromium, site, tmp_path):
    page = built_page(site, "notebooks/03_the_lora_layer.ipynb").as_uri()
    headless = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"]
    shot = tmp_path / "page.png"
    subprocess.run([*headless, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 1000, "Chromium wrote no screenshot of the page"
    dom = subprocess.run([*headless, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert "03 · The LoRA layer" in dom and OUTPUT_CELL.search(dom), "the page did not render"
