"""What every notebook builder shares: turning a list of cells into an .ipynb file, atomically.

After building, execute the notebook in place so its outputs are committed:
    .venv/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/<name>.ipynb
"""
from __future__ import annotations

import nbformat
from nbformat.v4 import new_notebook

from minilora.fileio import write_text_atomic


def write_notebook(cells, out) -> None:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    write_text_atomic(out, nbformat.writes(nb))
    print(f"wrote {out}")
