"""MkDocs hooks that put the executed notebooks into the book beside the pages of docs/ (mkdocs.yml).

The book's pages live in docs/, its notebooks in notebooks/, one folder up, and docs/ links to them
as ``../notebooks/NAME.ipynb`` so that the links also work where the repository is read as files.
MkDocs only knows files inside ``docs_dir``. A symlink docs/notebooks would not survive every
checkout (Windows, zip downloads), and a copy step would be one more thing to run before ``mkdocs``
and a second tree to keep in step; instead these hooks, which ``mkdocs build`` runs by itself:

- ``on_files``: add each notebooks/NN_*.ipynb to the build as the file ``notebooks/NN_*.ipynb``,
  read in place (mkdocs-jupyter then renders its stored outputs: nothing is executed);
- ``on_page_markdown``: rewrite a page's relative links that point into notebooks/ so they name
  that file (``../notebooks/03_x.ipynb`` from docs/index.md becomes ``notebooks/03_x.ipynb``), and
  MkDocs checks them like any other link (``mkdocs build --strict`` fails on a broken one, and on
  a link to a notebook the book leaves out);
- ``on_page_content``: point a notebook page's table of contents at its headings' real ids.
  mkdocs-jupyter slugs the contents from the heading text without its inline code, while the page's
  headings keep it (``## 7. Measuring on a real GPU: `benchmarks/gpu.py` `` is listed as
  ``#7-measuring-on-a-real-gpu`` but has the id ``7-measuring-on-a-real-gpu-benchmarksgpupy``).

The exercise notebooks (notebooks/exercises/) stay out of the book: the solutions are handed out
separately (docs/teachers-guide.md).
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = "notebooks"

# a Markdown inline link or image target: ](target) or ](target "title")
_LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?P<rest>[^)]*)\)")


def course_notebooks() -> list[str]:
    """The book's notebooks, as paths from the repository root: notebooks/NN_*.ipynb in order."""
    return [f"{NOTEBOOKS}/{p.name}" for p in sorted((ROOT / NOTEBOOKS).glob("[0-9][0-9]_*.ipynb"))]


# Before mkdocs-jupyter's own on_files (priority 0), which turns .ipynb files into pages.
@event_priority(50)
def on_files(files, config):
    for path in course_notebooks():
        files.append(File(path, src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    page_dir = posixpath.dirname(page.file.src_uri)     # the page's folder inside docs/

    def relink(match):
        target = match.group("target")
        if "://" in target or target.startswith(("/", "mailto:")):
            return match.group(0)
        # where the link points in the repository: resolved from the page's folder in docs/
        in_repo = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if not in_repo.startswith(NOTEBOOKS + "/"):
            return match.group(0)
        # the same file as the book names it (added by on_files), relative to the page
        new = posixpath.relpath(in_repo, page_dir or ".")
        return f"]({new}{match.group('rest')})"

    if page.file.src_uri.endswith(".md"):
        return _LINK.sub(relink, markdown)
    return markdown


_ID = re.compile(r'\sid="([^"]+)"')


def on_page_content(html, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    unused = _ID.findall(html)               # the page's ids, in document order

    def fix(anchors):
        for anchor in anchors:
            if anchor.id not in unused:
                # the first heading id that begins with the contents' shorter slug
                anchor.id = next((i for i in unused if i.startswith(anchor.id + "-")), anchor.id)
            if anchor.id in unused:
                unused.remove(anchor.id)
            fix(anchor.children)

    fix(page.toc)
    return html
