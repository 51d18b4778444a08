"""Draw the five pictures in docs/figures/ with ``minilora.viz``, from the library's own objects.

    python docs/figures/make_figures.py            # rewrites the five PNGs beside this file

- ``lora_layer.png``: the LoRA layer on the shipped base model's q_proj shape, r = 8, α = 16;
- ``graph.png``: the graph of L = (a·b + a)², notebook 01's example, with each node's gradient;
- ``nf4_bins.png``: NF4's 16 codes over the normal density, with the base model's layer-0 q_proj
  weights normalized by their block's absmax;
- ``decoder_block.png``: one decoder block of the base model, LoRA on q_proj and v_proj at r = 8;
- ``memory_bars.png``: training memory of Llama-7B, full fine-tuning vs LoRA vs QLoRA.

tests/test_viz.py runs ``main`` into a temporary folder, so the script keeps working.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")   # files only, no window

HERE = Path(__file__).resolve().parent


def figures() -> dict:
    """{file name: function that draws it}."""
    from minilora import Tensor, memory, viz
    from minilora.models import load_base_model

    def lora_layer():
        base = load_base_model()
        out_f, in_f = memory.linear_shapes(base.config)["q_proj"]
        return viz.draw_lora_layer(in_f, out_f, r=8, alpha=16)

    def graph():
        a = Tensor(2.0, requires_grad=True)
        b = Tensor(-3.0, requires_grad=True)
        c = a * b
        d = c + a
        L = d * d
        return viz.draw_graph(L, names={"a": a, "b": b, "c": c, "d": d, "L": L})

    def nf4_bins():
        weight = load_base_model().model.layers[0].self_attn.q_proj.weight
        return viz.draw_nf4_bins(weight, blocksize=64)

    return {"lora_layer.png": lora_layer, "graph.png": graph, "nf4_bins.png": nf4_bins,
            "decoder_block.png": lambda: viz.draw_decoder_block(("q_proj", "v_proj"), r=8),
            "memory_bars.png": viz.draw_memory_bars}


def main(out_dir=HERE, dpi: int = 100) -> list[Path]:
    """Draw every figure into ``out_dir``; returns the paths written."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    for name, draw in figures().items():
        fig = draw()
        fig.savefig(out_dir / name, dpi=dpi)
        plt.close(fig)
        written.append(out_dir / name)
    return written


if __name__ == "__main__":
    for path in main(*sys.argv[1:2]):
        print(f"wrote {path}")
