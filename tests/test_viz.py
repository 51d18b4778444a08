"""minilora.viz draws the library's own numbers: shapes, counts, codes, module names and memory.

Each figure is checked through the artists that carry a ``gid``: the LoRA layer's boxes and labels
against a real ``LoraLinear`` and ``memory``'s counts, the graph's boxes against the tensors of the
expression (and its gradients against ``backward()``), NF4's lines against ``quant.NF4_CODE``, the
decoder block's highlighted boxes against ``target_modules`` and a real ``LlamaDecoderLayer``, and the
memory bars against ``memory.memory_breakdown``. Bad arguments give a one-line ValueError.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib", reason='needs matplotlib: pip install "minilora[notebooks]"')
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from minilora import Tensor, memory, nn, quant, viz  # noqa: E402
from minilora.lora import LoraLinear, merge  # noqa: E402
from minilora.models import LlamaConfig, LlamaDecoderLayer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def texts(fig) -> str:
    """Every string drawn on the figure (titles and labels included), joined."""
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def by_gid(fig, prefix: str) -> list:
    return [a for a in fig.findobj() if (a.get_gid() or "").startswith(prefix)]


def one_line_value_error(fn, *args, match: str, **kw):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the LoRA layer
def test_lora_layer_labels_carry_the_layers_own_counts_and_shapes():
    layer = LoraLinear(nn.Linear(64, 48), module_name="demo")
    layer.update_layer("default", r=8, lora_alpha=16)
    trainable = sum(p.size for p in layer.parameters() if p.requires_grad)
    frozen = sum(p.size for p in layer.parameters() if not p.requires_grad)
    assert trainable == memory.lora_linear_parameters(48, 64, 8)     # the layer and memory agree

    fig = viz.draw_lora_layer(64, 48, r=8, alpha=16)
    assert isinstance(fig, Figure)
    words = texts(fig)
    a, b = layer.lora_A["default"].weight.shape, layer.lora_B["default"].weight.shape   # (8, 64), (48, 8)
    assert f"{frozen:,} parameters" in words and f"{trainable:,} (A + B)" in words
    assert f"{a[0] * a[1]:,} parameters" in words and f"{b[0] * b[1]:,} parameters" in words
    assert f"{a[0]} × {a[1]}" in words and f"{b[0]} × {b[1]}" in words
    assert f"= {layer.scaling['default']:.4g}" in words

    # boxes to scale: one drawing unit per row and per column for all three matrices
    box = {g: by_gid(fig, g)[0] for g in ("W0", "A", "B")}
    unit = box["W0"].get_width() / 64
    for name, (rows, cols) in {"W0": (48, 64), "A": a, "B": b}.items():
        assert box[name].get_width() == pytest.approx(cols * unit)
        assert box[name].get_height() == pytest.approx(rows * unit)


def test_lora_layer_rslora_scaling_and_thin_sides_are_labelled():
    fig = viz.draw_lora_layer(4096, 4096, r=16, alpha=32, use_rslora=True)
    words = texts(fig)
    assert f"α/√r\n= {merge.scaling(32, 16, use_rslora=True):.4g}" in words
    assert "not to scale" in words                       # 16 of 4096 rows would be invisible


@pytest.mark.parametrize("kw, match", [(dict(r=0), "rank r"), (dict(r=2.5), "rank r"),
                                        (dict(alpha=0), "alpha"), (dict(in_features=0), "in_features")])
def test_lora_layer_bad_arguments(kw, match):
    args = dict(in_features=8, out_features=8, r=2, alpha=4) | kw
    one_line_value_error(viz.draw_lora_layer, match=match, **args)


# ---------------------------------------------------------------- the graph
def test_graph_has_one_box_per_node_and_backwards_gradients():
    a = Tensor(2.0, requires_grad=True)
    b = Tensor(-3.0, requires_grad=True)
    c = a * b
    d = c + a
    L = d * d
    fig = viz.draw_graph(L, names={"a": a, "b": b, "c": c, "d": d, "L": L})
    assert isinstance(fig, Figure)
    assert len(by_gid(fig, "node:")) == 5                     # a, b, c, d, L
    assert len(by_gid(fig, "edge")) == 5      # a->c, b->c, a->d, c->d, d->L (d*d draws one edge)
    assert a.grad is None and b.grad is None                  # drawing left the leaves untouched
    L.backward()                                              # ... and the graph usable
    words = texts(fig)
    assert f"a (leaf)\nshape ()\nvalue 2\ngrad {a.grad.item():.4g}" in words     # 2d(b+1) = 16
    assert f"b (leaf)\nshape ()\nvalue -3\ngrad {b.grad.item():.4g}" in words    # 2da = -16
    assert "L = *\nshape ()\nvalue 16\ngrad 1" in words


def test_graph_counts_constants_and_arrays():
    x = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    y = (x * 2.0).sum()                                      # x, the constant 2, x*2, sum
    fig = viz.draw_graph(y, names={"x": x})
    nodes = viz.graph_nodes(y)
    assert len(nodes) == 4 and len(by_gid(fig, "node:")) == 4
    assert "(constant)" in texts(fig) and "shape (2, 3)" in texts(fig)
    grads = viz.node_gradients(y)
    np.testing.assert_array_equal(grads[id(x)], np.full((2, 3), 2.0))
    assert x.grad is None


def test_graph_keeps_gradients_already_accumulated():
    w = Tensor([1.0, 2.0], requires_grad=True)
    (w * w).sum().backward()
    before = w.grad.copy()
    viz.draw_graph((w * 3.0).sum())
    np.testing.assert_array_equal(w.grad, before)


def test_graph_bad_input():
    a = Tensor(1.0, requires_grad=True)
    L = a * a
    L.backward()
    one_line_value_error(viz.draw_graph, L, match="freed by backward")
    one_line_value_error(viz.draw_graph, Tensor(1.0) * 2.0, match="records no graph")
    one_line_value_error(viz.draw_graph, np.ones(3), match="needs a minilora Tensor")


# ---------------------------------------------------------------- NF4
def _line_xs(fig, gid) -> np.ndarray:
    (lines,) = by_gid(fig, gid)
    return np.array([seg[0, 0] for seg in lines.get_segments()])


def test_nf4_bins_are_the_library_codes_and_midpoints():
    fig = viz.draw_nf4_bins()
    assert isinstance(fig, Figure)
    np.testing.assert_array_equal(_line_xs(fig, "nf4-code"), quant.NF4_CODE)
    np.testing.assert_array_equal(_line_xs(fig, "nf4-edge"), (quant.NF4_CODE[:-1] + quant.NF4_CODE[1:]) / 2)
    assert not by_gid(fig, "weights-")


def test_nf4_weights_are_normalized_by_the_stored_absmax():
    w = (0.02 * np.random.default_rng(0).standard_normal(200)).astype(np.float32)  # 3 blocks + 8
    fig = viz.draw_nf4_bins(w, blocksize=64)
    absmax = quant.quantize_nf4(w, blocksize=64).absmax
    (rug,) = by_gid(fig, "weights-rug")
    np.testing.assert_allclose(rug.get_xdata(), w[:64] / absmax[0], rtol=1e-6)
    (hist,) = by_gid(fig, "weights-hist")
    heights, edges, _ = hist.get_data()
    assert np.sum(heights * np.diff(edges)) == pytest.approx(1.0)   # a density over [-1, 1]
    assert "200 weights" in texts(fig)


def test_nf4_bad_input():
    one_line_value_error(viz.draw_nf4_bins, np.ones(64), blocksize=48, match="blocksize")
    one_line_value_error(viz.draw_nf4_bins, np.ones(0), match="empty")


# ---------------------------------------------------------------- the decoder block
def real_linear_names(config) -> set:
    layer = LlamaDecoderLayer(config, 0)
    return {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("k_proj", "o_proj", "down_proj"), "all-linear"])
def test_decoder_block_highlights_exactly_the_targets(targets):
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    fig = viz.draw_decoder_block(targets, config=config)
    assert isinstance(fig, Figure)
    highlighted = {a.get_gid().split(":", 1)[1] for a in by_gid(fig, "target:")}
    plain = {a.get_gid().split(":", 1)[1] for a in by_gid(fig, "module:")}
    wanted = {viz.block_module_names()[n] for n in memory.resolve_target_modules(targets)}
    assert highlighted == wanted
    assert highlighted | plain == real_linear_names(config) and not highlighted & plain
    words = texts(fig)
    for name, (out_f, in_f) in memory.linear_shapes(config).items():
        assert f"{name}\n{out_f} × {in_f}" in words             # k_proj is 32 × 64 under GQA


def test_decoder_block_default_is_the_shipped_base_and_counts_adapters():
    fig = viz.draw_decoder_block(r=8)
    per_module = memory.lora_parameter_breakdown(LlamaConfig(), 8, ("q_proj", "v_proj"))["per_module"]
    words = texts(fig)
    assert "hidden 128" in words
    for n, count in per_module.items():
        assert f"{n}\n128 × 128\n+ LoRA ({count:,})" in words


def test_decoder_block_bad_input():
    one_line_value_error(viz.draw_decoder_block, ("q_prj",), match="unknown target_modules")
    one_line_value_error(viz.draw_decoder_block, config="llama-9b", match="unknown preset")


# ---------------------------------------------------------------- memory
def test_memory_bars_are_memory_breakdown():
    fig = viz.draw_memory_bars("llama-7b", r=16, target_modules=("q_proj", "v_proj"))
    assert isinstance(fig, Figure)
    for method in memory.METHODS:
        mb = memory.memory_breakdown("llama-7b", method, r=16, target_modules=("q_proj", "v_proj"))
        for attr, _, _ in viz.MEMORY_PARTS:
            (bar,) = by_gid(fig, f"bar:{method}:{attr}")
            assert bar.get_height() == pytest.approx(mb.gb(attr), rel=1e-12)
        (total,) = by_gid(fig, f"total:{method}")
        assert total.get_text().startswith(f"{mb.gb():.1f} GB\n{mb.trainable_params:,} trainable")
    assert "activations not included" in texts(fig)


def test_memory_bars_bad_input():
    one_line_value_error(viz.draw_memory_bars, "llama-9b", match="unknown preset")
    one_line_value_error(viz.draw_memory_bars, r=0, match="rank r")


# ---------------------------------------------------------------- import and files
def test_matplotlib_is_imported_only_when_drawing():
    code = ("import sys, minilora, minilora.viz; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env=os.environ | {"PYTHONPATH": str(ROOT)})


def test_missing_matplotlib_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)   # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "minilora\[notebooks\]"') as info:
        viz.draw_nf4_bins()
    assert "\n" not in str(info.value)


def test_make_figures_writes_the_five_pngs(tmp_path):
    sys.path.insert(0, str(ROOT / "docs" / "figures"))
    try:
        import make_figures
    finally:
        sys.path.pop(0)
    written = make_figures.main(tmp_path, dpi=40)
    assert sorted(p.name for p in written) == sorted(p.name for p in (ROOT / "docs" / "figures").glob("*.png"))
    assert len(written) == 5
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
