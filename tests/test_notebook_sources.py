"""Each course notebook's editable source (a jupytext percent-format .py) says what its .ipynb says.

The course notebooks (notebooks/NN_*.ipynb) are kept twice: ``NAME.py``, the source a teacher
edits and diffs (``# %%`` code cells, ``# %% [markdown]`` cells), and ``NAME.ipynb``, the same cells
executed, with their outputs (notebooks/README.md). Jupytext pairs the two through the notebook's metadata
(``jupytext: formats: ipynb,py:percent``); these tests check that the pairs agree cell by cell
(type and source; outputs and metadata are the .ipynb's alone) and that no notebook lacks its
source or source its notebook. The exercise notebooks (notebooks/exercises/) are built from
``notebooks/_build/build_exercises.py`` instead and are not paired. Nothing is executed here.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

jupytext = pytest.importorskip(
    "jupytext", reason="jupytext reads the notebook sources: pip install jupytext (in the dev extra)")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PAIRED_FORMATS = "ipynb,py:percent"


def paired_notebooks() -> list[Path]:
    """Every .ipynb directly under notebooks/: the exercises' subfolder and checkpoints excluded."""
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def cells_of(path: Path) -> list[tuple[str, str]]:
    """(cell type, source) of each cell of a notebook or of its percent-format .py, in order."""
    nb = jupytext.read(path) if path.suffix == ".py" else nbformat.read(path, as_version=4)
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def first_difference(ipynb: Path, source: Path) -> str | None:
    """A one-line description of where ``source`` and ``ipynb`` first disagree, or None if they agree."""
    a, b = cells_of(ipynb), cells_of(source)
    for k, (cell_nb, cell_py) in enumerate(zip(a, b)):
        if cell_nb != cell_py:
            head = next(iter((cell_py[1] or cell_nb[1]).splitlines()), "")
            return f"cell {k} ({cell_nb[0]} in the .ipynb, {cell_py[0]} in the .py) differs, near {head!r}"
    if len(a) != len(b):
        return f"the .ipynb has {len(a)} cells, the .py {len(b)}"
    return None


def sync_hint(ipynb: Path) -> str:
    rel = ipynb.relative_to(ROOT).as_posix()
    return (f"run `jupytext --sync {rel}` (the newer of the two wins), then re-execute it with "
            f"`jupyter nbconvert --to notebook --execute --inplace {rel}`")


def test_the_course_notebooks_are_found():
    """The glob finds the course (00-08 at least), so the tests below cannot pass on an empty list."""
    names = [p.stem for p in paired_notebooks()]
    assert len(names) >= 9 and names[0].startswith("00_"), names


@pytest.mark.parametrize("ipynb", paired_notebooks(), ids=lambda p: p.stem)
def test_notebook_has_its_source_and_pairing(ipynb):
    source = ipynb.with_suffix(".py")
    assert source.is_file(), (f"{ipynb.name} has no source {source.name}: create it with "
                              f"`jupytext --set-formats {PAIRED_FORMATS} notebooks/{ipynb.name}`")
    formats = nbformat.read(ipynb, as_version=4).metadata.get("jupytext", {}).get("formats")
    assert formats == PAIRED_FORMATS, (
        f"{ipynb.name} is not paired with its .py (jupytext formats {formats!r}): run "
        f"`jupytext --set-formats {PAIRED_FORMATS} notebooks/{ipynb.name}`")


@pytest.mark.parametrize("ipynb", paired_notebooks(), ids=lambda p: p.stem)
def test_source_and_notebook_have_the_same_cells(ipynb):
    source = ipynb.with_suffix(".py")
    if not source.is_file():
        pytest.fail(f"{ipynb.name} has no source {source.name} (see the test above)")
    problem = first_difference(ipynb, source)
    assert problem is None, f"{source.name} and {ipynb.name} disagree: {problem}; {sync_hint(ipynb)}"


def is_notebook_source(path: Path) -> bool:
    """A jupytext source opens with its YAML header (``# ---`` then ``# jupyter:``); conftest.py does not."""
    return path.read_text(encoding="utf-8").startswith("# ---\n# jupyter:")


def test_every_source_has_its_notebook():
    """A notebook source in notebooks/ without its .ipynb was never synced (or its notebook was deleted)."""
    sources = [p for p in sorted(NOTEBOOKS.glob("*.py")) if is_notebook_source(p)]
    assert len(sources) >= 9, f"only {len(sources)} notebook sources found in notebooks/"
    orphans = [p.name for p in sources if not p.with_suffix(".ipynb").is_file()]
    assert not orphans, (f"notebook sources without a notebook: {orphans}; create each with "
                         f"`jupytext --sync notebooks/NAME.py`, then execute it")


def test_a_changed_source_is_caught(tmp_path):
    """The comparison itself: a pair that agrees passes, an edited cell or an extra cell is reported."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Title\n\nSome $x$."),
                                         nbformat.v4.new_code_cell("x = 1\nprint(x)")])
    nb.metadata["jupytext"] = {"formats": PAIRED_FORMATS}
    ipynb, source = tmp_path / "nb.ipynb", tmp_path / "nb.py"
    nbformat.write(nb, ipynb)
    jupytext.write(nb, source, fmt="py:percent")
    assert first_difference(ipynb, source) is None

    source.write_text(source.read_text().replace("x = 1", "x = 2"))
    assert "cell 1" in first_difference(ipynb, source)

    source.write_text(source.read_text().replace("x = 2", "x = 1") + "\n# %%\ny = 3\n")
    assert "2 cells" in first_difference(ipynb, source)
