"""Build the two exercise notebooks from one source, so they can never drift apart.

    .venv/bin/python notebooks/_build/build_exercises.py          # writes both notebooks
    .venv/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/exercises/exercises.ipynb
    .venv/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/exercises/solutions.ipynb

- ``notebooks/exercises/exercises.ipynb``: for learners. Each task: the math, a stub whose signature
  and docstring come from ``minilora/teaching/exercises/solutions.py`` with ``raise NotImplementedError`` as
  the body, and a one-line check.
- ``notebooks/exercises/solutions.ipynb``: the same notebook with the bodies of
  ``minilora/teaching/exercises/solutions.py`` filled in. Hand it out separately (docs/teachers-guide.md).

Edit the task texts below, or the functions in solutions.py, then rebuild and re-execute both.
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from minilora.teaching.exercises import solutions, task_names  # noqa: E402

OUT_DIR = ROOT / "notebooks" / "exercises"

INTRO = """\
# LoRA and QLoRA exercises, checked as you go

Eleven small functions, each a piece of what minilora builds: the LoRA forward pass, its parameter
count and gradients, merging, the backward pass of a broadcasting matmul, NF4 quantization, packing,
double quantization and the memory bill of full fine-tuning vs LoRA vs QLoRA.

How to work:
- Each task has the math, a **stub** to fill in (replace `raise NotImplementedError`), and a **check**
  cell: `check("task_name", your_function)`.
- The check runs your function on a few fixed edge cases and on about 30 cases drawn by Hypothesis,
  compares with minilora's own implementation, and prints ✓, or the failing case (shapes, expected,
  got) with a hint that names the usual mistake.
- Write plain NumPy. Shapes follow PyTorch and PEFT: a weight is (out, in), LoRA's A is (r, in) and
  B is (out, r), activations are row vectors (..., features).
- The last cell checks everything you have written: `check_all(globals())`.
"""

SETUP = """\
import numpy as np

from minilora.teaching.exercises import check, check_all, list_tasks
from minilora.memory import count_parameters   # task 11: the base model's parameter counts
from minilora.models.config import PRESETS     # published Llama shapes, e.g. PRESETS["llama-7b"]
from minilora.quant import DYNAMIC_MAP, NF4_CODE  # tasks 8 and 10: the code books

np.set_printoptions(precision=4, suppress=True)
list_tasks()"""

TEXT = {
    "lora_forward": """\
## 1. The LoRA forward pass

A LoRA layer keeps the pretrained weight $W_0$ frozen and adds a low-rank path:

- $h = W_0 x + \\frac{\\alpha}{r} B A x$, with $A \\in \\mathbb{R}^{r \\times in}$, $B \\in \\mathbb{R}^{out \\times r}$.
- For a batch of row vectors $x$ of shape (..., in), as PyTorch writes it:
  $h = x W_0^\\top + \\frac{\\alpha}{r} (x A^\\top) B^\\top$.
- Never form $BA$ here: $x A^\\top$ squeezes each input to $r$ numbers first, which is the point of LoRA.
""",
    "count_lora_params": """\
## 2. How many parameters does LoRA train?

- A Linear of shape (out, in) gets $A$ (r, in) and $B$ (out, r): $r\\,(in + out)$ parameters.
- A Llama layer has `q_proj`, `o_proj` (hidden → hidden), `k_proj`, `v_proj` (hidden → kv_heads · head_dim,
  narrower under grouped-query attention), `gate_proj`, `up_proj` (hidden → intermediate) and
  `down_proj` (intermediate → hidden); head_dim = hidden / heads.
- Sum over `target_modules`, times `num_hidden_layers`. Llama-7B with r = 8 on q and v: 4,194,304.
""",
    "lora_grads": """\
## 3. Derive and implement dL/dA and dL/dB

The adapter path is $h = s\\,(x A^\\top) B^\\top$ with $s = \\alpha / r$. Write $u = x A^\\top$ (..., r).
Given $g = \\partial L / \\partial h$ (..., out):

- $\\partial L / \\partial B = s \\sum g^\\top u$ , shape (out, r);
- $\\partial L / \\partial u = s\\, g B$ , so $\\partial L / \\partial A = s \\sum (g B)^\\top x$ , shape (r, in);
- the sums run over every batch axis: flatten $x$ to (N, in) and $g$ to (N, out) first.

These two gradients are all LoRA trains: $W_0$ gets none.
""",
    "merge": """\
## 4. Merge the adapter into the weight

- $W = W_0 + \\frac{\\alpha}{r} B A$ : (out, r) @ (r, in) = (out, in), the shape of $W_0$.
- After merging, $x W^\\top$ equals the LoRA layer's output: inference costs nothing extra.
""",
    "unmerge": """\
## 5. ... and take it out again

- $W_0 = W - \\frac{\\alpha}{r} B A$ : exact up to float rounding, so adapters can be swapped.
""",
    "matmul_backward": """\
## 6. The backward pass of a broadcasting matmul

For $C = a\\,b$ with batch axes that broadcast (a: (..., n, k), b: (..., k, m)):

- $\\partial L/\\partial a = g\\, b^\\top$ and $\\partial L/\\partial b = a^\\top g$ , transposing the last two axes only;
- then **undo the broadcast**: sum over leading axes the input did not have, and (keeping them)
  over axes where it had size 1. A (2, 3, 4) @ (4, 5) product gives $b$ one gradient per batch
  element; they add up.
""",
    "softmax_backward": """\
## 7. The backward pass of softmax

With $y = \\mathrm{softmax}(x)$ along the last axis and $g = \\partial L / \\partial y$:

- $\\partial y_i / \\partial x_j = y_i (\\delta_{ij} - y_j)$ : every output depends on every input of its row;
- so $\\partial L / \\partial x = y \\odot \\big(g - \\sum_j g_j y_j\\big)$ , the sum taken per row.
""",
    "nf4_quantize_block": """\
## 8. Quantize one block to NF4

QLoRA stores each block of 64 weights as one float32 scale and sixteen-level codes:

- $\\text{absmax} = \\max_i |w_i|$ (at least $10^{-38}$, so an all-zero block works);
- $x_i = w_i / \\text{absmax} \\in [-1, 1]$;
- index $=$ the nearest entry of `NF4_CODE` (16 values, ascending): count the midpoints
  $m_j = (c_j + c_{j+1})/2$ strictly below $x_i$, i.e. `np.searchsorted(midpoints, x, side="left")`;
  a value exactly on a midpoint takes the **lower** index, as bitsandbytes does.
""",
    "pack_nibbles": """\
## 9. Pack two 4-bit codes per byte

- byte $k$ = `idx[2k] << 4 | idx[2k+1]` : the even element in the **high** nibble (bitsandbytes' layout);
- an odd count is padded with index 7, the code of 0.0, so the padding dequantizes to exactly zero;
- n indices take $\\lceil n/2 \\rceil$ bytes.
""",
    "double_quantize_absmax": """\
## 10. Double quantization of the absmax constants

One float32 absmax per 64 weights costs 32/64 = 0.5 bits per weight. QLoRA quantizes them again:

- offset $= \\text{mean}(\\text{absmax})$ , $c = \\text{absmax} - \\text{offset}$ (centred: both signs used);
- blocks of 256: nested_absmax $= \\max |c|$ per block (at least $10^{-38}$);
- code $=$ nearest entry of the 256-value `DYNAMIC_MAP` to $c / \\text{nested\\_absmax}$, ties to the lower index;
- reconstruction: $\\text{absmax}' = \\text{map}[\\text{code}] \\cdot \\text{nested\\_absmax} + \\text{offset}$ ;
  cost $8/64 + 32/(64 \\cdot 256) \\approx 0.127$ bits per weight.
""",
    "memory_full_lora_qlora": """\
## 11. Memory: full fine-tuning vs LoRA vs QLoRA

Bytes to train, activations not counted:

- a **trainable** parameter: 2 (16-bit weight) + 2 (gradient) + 4 (float32 master copy) + 8 (AdamW's
  $m$ and $v$) = 16 bytes; full fine-tuning trains all of them, LoRA only the adapter;
- a **frozen** parameter: 2 bytes; QLoRA stores the decoder's Linear weights in NF4 instead:
  $4 + 8/64 + 32/(64 \\cdot 256)$ bits each; embeddings, norms and `lm_head` stay 16-bit;
- `count_parameters(config)` gives `"total"` and `"linear"`; your `count_lora_params` gives the adapter.
""",
}

OUTRO = """\
## Everything at once

`check_all(globals())` checks every task function defined in this notebook.
"""


def _stub(fn) -> str:
    """The function's def line and docstring, with `raise NotImplementedError` as its body."""
    src = inspect.getsource(fn)
    doc = inspect.getdoc(fn)
    header = src[: src.index(":\n") + 1]                    # "def name(args):"
    lines = doc.splitlines()
    if len(lines) == 1:
        body = f'    """{doc}"""\n'
    else:
        body = "".join(f"    {ln}".rstrip() + "\n" for ln in ['"""' + lines[0], *lines[1:], '"""'])
    return f"{header}\n{body}    raise NotImplementedError  # your code here"


def _solution(fn) -> str:
    return inspect.getsource(fn).rstrip()


def build(with_solutions: bool):
    intro = INTRO.replace("checked as you go", "solutions (teacher's copy)") if with_solutions \
        else INTRO
    cells = [new_markdown_cell(intro.rstrip())]
    if with_solutions:
        cells.append(new_markdown_cell(
            "> **Teacher's copy**: every function below is filled in and every check passes. "
            "Keep this notebook apart from the student one (see docs/teachers-guide.md)."))
    cells.append(new_code_cell(SETUP))
    for name in task_names():
        fn = getattr(solutions, name)
        cells.append(new_markdown_cell(TEXT[name].rstrip()))
        cells.append(new_code_cell(_solution(fn) if with_solutions else _stub(fn)))
        cells.append(new_code_cell(f'check("{name}", {name})'))
    cells.append(new_markdown_cell(OUTRO.rstrip()))
    cells.append(new_code_cell("results = check_all(globals())"))
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:02d}"        # stable ids: a rebuild changes only what changed
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def write_atomic(nb, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".ipynb")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        nbformat.write(nb, f)
    os.replace(tmp, path)


def main():
    missing = [n for n in task_names() if n not in TEXT]
    if missing:
        raise SystemExit(f"no notebook text for tasks {missing}; add them to TEXT")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_atomic(build(False), OUT_DIR / "exercises.ipynb")
    write_atomic(build(True), OUT_DIR / "solutions.ipynb")
    print(f"wrote {OUT_DIR / 'exercises.ipynb'} and {OUT_DIR / 'solutions.ipynb'}")


if __name__ == "__main__":
    main()
