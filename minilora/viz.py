"""Pictures of the ideas, drawn by minilora itself: the LoRA layer, a computation graph, NF4's bins,
a Llama decoder block with its adapted projections, and training memory for full fine-tuning, LoRA
and QLoRA.

Every number drawn comes from the library, never typed in: the LoRA layer's shapes from
``lora.merge.lora_factor_shapes`` and its parameter counts from ``memory`` (Hu et al., 2021,
Figure 1); the graph from the ``_prev`` and ``_op`` records of ``autograd.py``, with gradients from
``backward()`` itself (Karpathy's micrograd ``draw_dot``, drawn with matplotlib only, no graphviz);
NF4's 16 values from ``quant.NF4_CODE`` and a real block's absmax from ``quant.quantize_nf4``
(Dettmers et al., 2023, QLoRA); the decoder block's module names and shapes from
``memory.linear_shapes`` (the same names as ``models.llama``'s submodules); memory from
``memory.memory_breakdown``.

Each function returns a ``matplotlib.figure.Figure``. matplotlib is imported only when a function
runs, so ``import minilora`` stays free of it; it comes with ``pip install "minilora[notebooks]"``.
Every drawn element a test checks carries a ``gid`` (``"node:3"``, ``"nf4-code"``, ...).
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

from minilora import backend, memory, quant
from minilora.autograd import TensorBase
from minilora.lora import merge
from minilora.models import BASE_MODEL_DIR, read_config
from minilora.quant import codebooks

FROZEN_COLOR = "#c9d3de"      # frozen weights: grey-blue
TRAINABLE_COLOR = "#f4a259"   # trainable (LoRA) weights: orange
OP_COLOR = "#fdf1c7"          # intermediate results and fixed operations: pale yellow
LEAF_COLOR = "#bde0c3"        # leaves that require grad: green
CONST_COLOR = "#eeeeee"       # constants (no gradient): light grey

MAX_GRAPH_NODES = 60          # a graph drawing stays readable up to about this many boxes


def _pyplot():
    """matplotlib.pyplot, or a one-line error saying how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('minilora.viz needs matplotlib; install it with '
                          'pip install "minilora[notebooks]"') from None
    return plt


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------- 1. the LoRA layer
def draw_lora_layer(in_features: int, out_features: int, r: int, alpha: float,
                    use_rslora: bool = False):
    """The LoRA layer h = W0 x + s·B A x (Hu et al., 2021, Figure 1), drawn as boxes to scale.

    W0 (out, in) is the frozen box; beside it the adapter path x → A (r, in) → B (out, r) → × s,
    summed into h. Each box's width is its number of columns and its height its number of rows, in
    one unit for all three, except that a side thinner than 3% of the largest side is drawn at 3% so
    that it stays visible (the label then says "not to scale"). The labels carry the shapes from
    ``lora.merge.lora_factor_shapes``, the parameter counts from ``memory.linear_weight_parameters``
    and ``memory.lora_linear_parameters``, and s from ``lora.merge.scaling`` (α/r, or α/√r with
    ``use_rslora``).
    """
    in_features = _positive_int("in_features", in_features)
    out_features = _positive_int("out_features", out_features)
    n_lora = memory.lora_linear_parameters(out_features, in_features, r)  # checks r > 0 first
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    plt = _pyplot()
    from matplotlib.patches import FancyBboxPatch, Rectangle

    a_shape, b_shape = merge.lora_factor_shapes(out_features, in_features, r)   # (r, in), (out, r)
    n_frozen = memory.linear_weight_parameters(out_features, in_features)
    s = merge.scaling(alpha, r, use_rslora=use_rslora)
    unit = 4.0 / max(in_features, out_features)     # drawing units per row or column
    thin = 0.03 * 4.0                               # thinnest side drawn

    def side(n):
        return max(n * unit, thin)

    def to_scale(shape):
        return all(n * unit >= thin for n in shape)

    fig, ax = plt.subplots(figsize=(9.5, 6.2))
    gap = 1.0
    # frozen path on top: x -> W0 -> (+)
    w_w, w_h = side(in_features), side(out_features)
    a_w, a_h = side(a_shape[1]), side(a_shape[0])
    b_w, b_h = side(b_shape[1]), side(b_shape[0])
    y_lora = 0.0
    y_frozen = max(a_h, b_h) + 1.6
    x0 = 1.5
    sum_x = x0 + max(w_w, a_w + gap + b_w + 1.4) + 1.2
    sum_y = (y_frozen + w_h / 2 + y_lora + b_h / 2) / 2

    boxes = [("W0", x0, y_frozen, w_w, w_h, FROZEN_COLOR, (out_features, in_features),
              f"W0 (frozen)\n{out_features} × {in_features}\n{n_frozen:,} parameters"),
             ("A", x0, y_lora + (b_h - a_h) / 2, a_w, a_h, TRAINABLE_COLOR, a_shape,
              f"A (trainable)\n{a_shape[0]} × {a_shape[1]}\n{a_shape[0] * a_shape[1]:,} parameters"),
             ("B", x0 + a_w + gap, y_lora, b_w, b_h, TRAINABLE_COLOR, b_shape,
              f"B (trainable)\n{b_shape[0]} × {b_shape[1]}\n{b_shape[0] * b_shape[1]:,} parameters")]
    centers = {}
    for gid, x, y, w, h, color, shape, label in boxes:
        ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="k", lw=1.2, gid=gid))
        centers[gid] = (x, y, w, h)
        note = "" if to_scale(shape) else "\n(thin side not to scale)"
        # labels sit beside thin boxes and inside big ones, so they never cover a box's edges
        if w > 2.2 and h > 1.2:
            ax.text(x + w / 2, y + h / 2, label + note, ha="center", va="center", fontsize=9, gid=f"label:{gid}")
        else:
            ax.text(x + w / 2, y - 0.15, label + note, ha="center", va="top", fontsize=8.5,
                    gid=f"label:{gid}")

    def arrow(x1, y1, x2, y2, text=None, **kw):
        ax.annotate("", xy=(x2, y2), xytext=(x1, y1),
                    arrowprops=dict(arrowstyle="-|>", lw=1.2, color="k", shrinkA=0, shrinkB=0, **kw))
        if text:   # on a white patch, so that a diagonal arrow does not run through the words
            ax.text((x1 + x2) / 2, (y1 + y2) / 2 + 0.12, text, ha="center", va="bottom", fontsize=8.5,
                    bbox=dict(facecolor="white", edgecolor="none", pad=1))

    # x enters on the left, splits into the two paths
    x_in = 0.2
    ax.text(x_in - 0.1, sum_y, f"x\n({in_features})", ha="right", va="center", fontsize=10)
    wx, wy, ww, wh = centers["W0"]
    a_x, ay, aw, ah = centers["A"]
    bx, by, bw, bh = centers["B"]
    arrow(x_in, sum_y, wx, wy + wh / 2)
    arrow(x_in, sum_y, a_x, ay + ah / 2)
    arrow(a_x + aw, ay + ah / 2, bx, by + bh / 2, text=f"A x\n({a_shape[0]})")
    scale_x = bx + bw + 0.7
    ax.add_patch(FancyBboxPatch((scale_x - 0.45, by + bh / 2 - 0.25), 0.9, 0.5,
                                boxstyle="round,pad=0.05", facecolor=OP_COLOR, edgecolor="k"))
    scale_text = f"× α/√r\n= {s:.4g}" if use_rslora else f"× α/r\n= {s:.4g}"
    ax.text(scale_x, by + bh / 2, scale_text, ha="center", va="center", fontsize=8.5, gid="scaling")
    arrow(bx + bw, by + bh / 2, scale_x - 0.5, by + bh / 2)
    arrow(scale_x + 0.5, by + bh / 2, sum_x - 0.25, sum_y)
    arrow(wx + ww, wy + wh / 2, sum_x - 0.25, sum_y, text=f"W0 x ({out_features})")
    ax.add_patch(plt.Circle((sum_x, sum_y), 0.25, facecolor="white", edgecolor="k", lw=1.2))
    ax.text(sum_x, sum_y, "+", ha="center", va="center", fontsize=14)
    arrow(sum_x + 0.25, sum_y, sum_x + 1.2, sum_y)
    ax.text(sum_x + 1.3, sum_y, f"h\n({out_features})", ha="left", va="center", fontsize=10)

    share = n_lora / n_frozen
    ax.set_title(f"LoRA on a {out_features} × {in_features} Linear, r = {r}, α = {alpha:g}: "
                 f"trainable {n_lora:,} (A + B) vs frozen {n_frozen:,} ({share:.2%})",
                 fontsize=10, gid="title")
    ax.set_xlim(x_in - 1.0, sum_x + 2.2)
    ax.set_ylim(y_lora - 1.6, y_frozen + w_h + 0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 2. the computation graph
def graph_nodes(tensor) -> list:
    """Every tensor of ``tensor``'s recorded graph (constants included), parents before children."""
    order, seen, stack = [], set(), [(tensor, False)]
    while stack:                                   # iterative DFS, as TensorBase._topological_order
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in reversed(node._prev) if id(p) not in seen)
    return order


def node_gradients(tensor) -> dict:
    """{id(node): dL/dnode as a NumPy array} for every node of a scalar ``tensor``'s graph that
    receives a gradient, computed by ``tensor.backward(retain_graph=True)`` itself.

    ``backward()`` releases intermediate gradients as it goes (as PyTorch does), so each node's
    backward closure is wrapped to copy its ``.grad`` just before it runs; leaves are read after.
    Every ``.grad`` and closure is restored afterwards: the graph and any gradients already
    accumulated in the leaves are left as they were.
    """
    nodes = graph_nodes(tensor)
    saved = [(n, n.grad, n._grad_owned, n._backward) for n in nodes]
    grads = {}
    try:
        for n in nodes:
            n.grad, n._grad_owned = None, False
            if n._backward is not None:
                def recorded(n=n, run=n._backward):
                    grads[id(n)] = backend.to_numpy(n.grad).copy()
                    run()
                n._backward = recorded
        tensor.backward(retain_graph=True)
        for n in nodes:
            if n.grad is not None and id(n) not in grads:
                grads[id(n)] = backend.to_numpy(n.grad).copy()
    finally:
        for n, grad, owned, closure in saved:
            n.grad, n._grad_owned, n._backward = grad, owned, closure
    return grads


def _short(a) -> str:
    """A few characters for an array: the number itself, up to four numbers, or its mean and max."""
    a = np.asarray(backend.to_numpy(a), dtype=np.float64)
    if a.size == 1:
        return f"{a.item():.4g}"
    if a.size <= 4:
        return "[" + ", ".join(f"{v:.3g}" for v in a.ravel()) + "]"
    return f"mean {a.mean():.3g}, max|·| {np.abs(a).max():.3g}"


def draw_graph(tensor, names: dict | None = None):
    """The computation graph that produced ``tensor``: one box per node with its op, shape, value and
    gradient, arrows from parents to children (micrograd's ``draw_dot``, in matplotlib only).

    Nodes are every tensor reached through the ``_prev`` records (``autograd.py``), constants that
    an op was given included; each sits in the column of its depth (the longest path from a leaf),
    so the leaves are on the left and ``tensor`` on the right. ``names`` maps labels to tensors
    (``{"a": a, "b": b}``) to name the boxes. When ``tensor`` is a scalar that requires grad, the
    gradients dL/dnode come from ``node_gradients`` (one ``backward(retain_graph=True)`` whose
    results are read and then undone); otherwise no gradient is shown. Call it before ``backward()``
    without ``retain_graph``, which frees the graph.
    """
    if not isinstance(tensor, TensorBase):
        raise ValueError(f"draw_graph needs a minilora Tensor, got {type(tensor).__name__}")
    if tensor._freed:
        raise ValueError("this tensor's graph was freed by backward(); call draw_graph before "
                         "backward(), or pass retain_graph=True to backward()")
    if not tensor.requires_grad:
        raise ValueError("this tensor records no graph (no input requires grad, or it ran under "
                         "no_grad()); create the inputs with requires_grad=True")
    nodes = graph_nodes(tensor)
    if len(nodes) > MAX_GRAPH_NODES:
        raise ValueError(f"the graph has {len(nodes)} nodes, more than the {MAX_GRAPH_NODES} a drawing "
                         "can show; draw a smaller expression")
    plt = _pyplot()
    label_of = {id(t): name for name, t in (names or {}).items() if isinstance(t, TensorBase)}
    grads = node_gradients(tensor) if tensor.data.size == 1 else {}

    depth = {}
    for n in nodes:                                # parents come first, so their depth is known
        depth[id(n)] = 1 + max((depth[id(p)] for p in n._prev), default=-1)
    columns: dict[int, list] = {}
    for n in nodes:
        columns.setdefault(depth[id(n)], []).append(n)
    n_cols, n_rows = len(columns), max(len(c) for c in columns.values())
    fig, ax = plt.subplots(figsize=(max(4.0, 2.3 * n_cols), max(2.4, 1.45 * n_rows)))
    ax.set_xlim(-0.6, n_cols - 0.4)
    ax.set_ylim(-0.6, n_rows - 0.4)
    ax.axis("off")

    text_of = {}
    for col, members in columns.items():
        offset = (n_rows - len(members)) / 2       # centre each column vertically
        for row, n in enumerate(members):
            i = nodes.index(n)
            if n._prev:
                title, color = f"{label_of.get(id(n), f'n{i}')} = {n._op}", OP_COLOR
            elif n.requires_grad:
                title, color = f"{label_of.get(id(n), f'n{i}')} (leaf)", LEAF_COLOR
            else:
                title, color = f"{label_of.get(id(n), f'n{i}')} (constant)", CONST_COLOR
            lines = [title, f"shape {tuple(n.shape)}", f"value {_short(n.data)}"]
            if id(n) in grads:
                lines.append(f"grad {_short(grads[id(n)])}")
            elif not n.requires_grad:
                lines.append("no grad")
            edge = "crimson" if n is tensor else "k"
            text_of[id(n)] = ax.text(col, n_rows - 1 - (offset + row), "\n".join(lines), ha="center",
                                     va="center", multialignment="left", fontsize=8,
                                     family="monospace", gid=f"node:{i}",
                                     bbox=dict(boxstyle="round,pad=0.4", facecolor=color, edgecolor=edge))
    fig.canvas.draw()                              # sizes the boxes, so arrows can stop at their edges
    edges = {(id(p), id(n)) for n in nodes for p in n._prev}
    for parent_id, child_id in sorted(edges):
        a, b = text_of[parent_id], text_of[child_id]
        ax.annotate("", xy=b.get_position(), xytext=a.get_position(), gid="edge",
                    arrowprops=dict(arrowstyle="-|>", color="0.35", lw=1.0,
                                    patchA=a.get_bbox_patch(), patchB=b.get_bbox_patch()))
    ax.set_title("computation graph: leaves on the left, the output on the right"
                 + ("; grad = dL/dnode from backward()" if grads else ""), fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 3. NF4's bins
def _normal_scale() -> float:
    """Φ⁻¹(p_max) = 1.848: the normal quantile that NF4's ±1 stand for (codebooks.NF4_OFFSET)."""
    return NormalDist().inv_cdf(codebooks.NF4_OFFSET)


def draw_nf4_bins(weights=None, blocksize: int = 64):
    """NF4's 16 code values (``quant.NF4_CODE``) as bins over the normal density they were built from,
    and, when ``weights`` are given, those weights normalized block by block by their absmax.

    The x axis is a block's value divided by its absmax, in [-1, 1]. The curve is N(0, 1) seen on that
    axis: NF4's ±1 stand for ±Φ⁻¹(p_max) = ±1.848 standard deviations, so the density is
    1.848·φ(1.848·x). Each code is a vertical line; the bin edges are the 15 midpoints between
    neighbouring codes, where quantization switches index. ``weights`` (any shape) are quantized with
    ``quant.quantize_nf4(weights, blocksize)``; every block is divided by the absmax it stored, and
    the values are shown as a histogram (64 bins), with the first block as a rug of ticks.
    """
    code = quant.NF4_CODE                                           # (16,) float32, sorted
    edges = (code[:-1] + code[1:]) / np.float32(2)                  # (15,) the midpoints
    normalized = None
    if weights is not None:
        w = weights.data if isinstance(weights, TensorBase) else weights
        w = np.asarray(backend.to_numpy(w), dtype=np.float32).ravel()              # (n,)
        if w.size == 0:
            raise ValueError("weights is empty; pass an array of weights, or None for the bins alone")
        q = quant.quantize_nf4(w, blocksize=blocksize)              # checks the blocksize
        absmax = backend.to_numpy(q.absmax)                         # (n_blocks,) one per block
        per_weight = np.repeat(absmax, blocksize)[: w.size]         # (n,) each weight's block absmax
        normalized = w / per_weight                                 # (n,) in [-1, 1]
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(12, 4.2))
    scale = _normal_scale()
    x = np.linspace(-1.05, 1.05, 600)
    density = scale * np.exp(-(scale * x) ** 2 / 2) / np.sqrt(2 * np.pi)
    bounds = np.concatenate([[-1.05], edges, [1.05]])
    for i in range(16):                            # shade each code's bin under the density
        inside = (x >= bounds[i]) & (x <= bounds[i + 1])
        ax.fill_between(x[inside], density[inside], color=f"C{i % 2}", alpha=0.25, lw=0)
    top = density.max()
    if normalized is not None:
        heights, hist_edges = np.histogram(normalized, bins=64, range=(-1, 1), density=True)  # (64,), (65,)
        ax.stairs(heights, hist_edges, fill=True, color="tab:blue", alpha=0.35, gid="weights-hist",
                  label=f"{normalized.size:,} weights / their block's absmax")
        top = max(top, heights.max())
    top *= 1.08
    ax.plot(x, density, color="k", lw=1.5, label="N(0, 1) on the normalized axis")
    ax.vlines(edges, 0, top, colors="0.5", linestyles=":", lw=1, gid="nf4-edge")
    ax.vlines(code, 0, top, colors="crimson", lw=1.4, gid="nf4-code", label="the 16 NF4 codes")
    for i, c in enumerate(code):
        ax.text(c, top, str(i), ha="center", va="bottom", fontsize=7, color="crimson")
    if normalized is not None:
        first = normalized[:blocksize]
        ax.plot(first, np.full(first.size, -0.04 * top), "|", color="tab:blue", ms=12,
                label=f"block 0 ({first.size} weights)", gid="weights-rug")
    ax.set_xlim(-1.08, 1.08)
    ax.set_ylim(-0.08 * top, top * 1.08)
    ax.set_xlabel("value / block absmax (dotted: bin edges, the midpoints between codes)")
    ax.set_ylabel("density")
    ax.set_title(f"NF4: 16 codes at normal quantiles (index above each line), blocksize {blocksize}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: the codes fill the axes
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 4. the decoder block
def block_module_names() -> dict[str, str]:
    """{short name: dotted name inside a decoder layer} of its seven Linear layers
    (``"q_proj": "self_attn.q_proj"``), as ``models.llama.LlamaDecoderLayer`` names them."""
    return {n: ("self_attn." if n in memory.ATTENTION_MODULES else "mlp.") + n
            for n in memory.LINEAR_MODULES}


def draw_decoder_block(target_modules=("q_proj", "v_proj"), config=None, r: int | None = None):
    """One Llama decoder block, bottom to top: input_layernorm (RMSNorm) → self_attn (q_proj,
    k_proj, v_proj, RoPE and causal attention, o_proj) → residual add → post_attention_layernorm →
    mlp (gate_proj, up_proj, silu(gate)·up, down_proj) → residual add.

    Boxes carry the submodules' own names and the weight shapes (out × in) of ``config`` from
    ``memory.linear_shapes`` (None: the shipped base model's config; or a preset name such as
    "llama-7b"). The projections named by ``target_modules`` (PEFT's names, or "all-linear", checked
    by ``memory.resolve_target_modules``) are highlighted in orange as LoRA-adapted; with ``r`` their
    labels add the adapter's parameters per module from ``memory.lora_parameter_breakdown``.
    """
    targets = memory.resolve_target_modules(target_modules)        # one-line ValueError if unknown
    cfg = read_config(BASE_MODEL_DIR) if config is None else memory.as_config(config)
    shapes = memory.linear_shapes(cfg)                             # {name: (out, in)}
    extra = memory.lora_parameter_breakdown(cfg, r, targets)["per_module"] if r is not None else {}
    dotted = block_module_names()
    plt = _pyplot()
    from matplotlib.patches import FancyBboxPatch

    fig, ax = plt.subplots(figsize=(8.6, 9.4))
    ax.set_xlim(-3.2, 4.6)
    ax.set_ylim(-0.9, 12.0)
    ax.axis("off")

    def box(cx, cy, text, color, gid, w=2.0, h=0.62, fontsize=8.5):
        ax.add_patch(FancyBboxPatch((cx - w / 2, cy - h / 2), w, h, boxstyle="round,pad=0.05",
                                    facecolor=color, edgecolor="k", lw=1.1, gid=gid))
        ax.text(cx, cy, text, ha="center", va="center", fontsize=fontsize)

    def arrow(x1, y1, x2, y2, **kw):
        ax.annotate("", xy=(x2, y2), xytext=(x1, y1),
                    arrowprops=dict(arrowstyle="-|>", color="k", lw=1.0, shrinkA=0, shrinkB=0, **kw))

    def projection(name, cx, cy, w=1.9):
        out_f, in_f = shapes[name]
        target = name in targets
        text = f"{name}\n{out_f} × {in_f}"
        if target:
            text += f"\n+ LoRA ({extra[name]:,})" if name in extra else "\n+ LoRA"
        h = 0.8 if target else 0.62
        box(cx, cy, text, TRAINABLE_COLOR if target else FROZEN_COLOR,
            ("target:" if target else "module:") + dotted[name], w=w, h=h)
        return cy + h / 2 + 0.05                   # the top of the box, where its output leaves

    def residual(y_from, y_to, x_side):
        ax.plot([0, x_side, x_side], [y_from, y_from, y_to], color="0.3", lw=1.2)
        arrow(x_side, y_to, -0.25, y_to)

    ax.text(0, -0.6, f"x  (batch, seq, {cfg.hidden_size})", ha="center", va="center", fontsize=9)
    arrow(0, -0.4, 0, 0.2)
    box(0, 0.5, "input_layernorm\nRMSNorm", OP_COLOR, "norm:input_layernorm", w=2.4)
    ax.add_patch(FancyBboxPatch((-2.1, 1.35), 6.3, 3.75, boxstyle="round,pad=0.05", facecolor="none",
                                edgecolor="0.4", ls="--", gid="group:self_attn"))
    ax.text(4.1, 4.95, "self_attn", ha="right", va="top", fontsize=9, style="italic")
    for name, cx in (("q_proj", -1.05), ("k_proj", 1.0), ("v_proj", 3.05)):
        arrow(0, 0.81, cx, 1.55)
        arrow(cx, projection(name, cx, 2.0), cx, 3.02)
    box(1.0, 3.3, f"RoPE on q, k; softmax(q kᵀ/√{cfg.head_dim} + causal mask) v", OP_COLOR,
        "op:attention", w=5.6, h=0.55, fontsize=8)
    arrow(1.0, 3.58, 1.0, 3.95)
    arrow(1.0, projection("o_proj", 1.0, 4.35), 0.2, 5.55)
    ax.add_patch(plt.Circle((0, 5.7), 0.22, facecolor="white", edgecolor="k", gid="residual:1"))
    ax.text(0, 5.7, "+", ha="center", va="center", fontsize=13)
    residual(-0.25, 5.7, -2.5)
    arrow(0, 5.92, 0, 6.3)
    box(0, 6.6, "post_attention_layernorm\nRMSNorm", OP_COLOR, "norm:post_attention_layernorm", w=3.1)
    ax.add_patch(FancyBboxPatch((-2.1, 7.4), 6.3, 3.4, boxstyle="round,pad=0.05", facecolor="none",
                                edgecolor="0.4", ls="--", gid="group:mlp"))
    ax.text(4.1, 10.65, "mlp", ha="right", va="top", fontsize=9, style="italic")
    for name, cx in (("gate_proj", -0.6), ("up_proj", 2.2)):
        arrow(0, 6.91, cx, 7.65)
        arrow(cx, projection(name, cx, 8.05, w=2.2), 0.8, 8.95)
    box(0.8, 9.2, "silu(gate) ⊙ up", OP_COLOR, "op:swiglu", w=2.4, h=0.5)
    arrow(0.8, 9.45, 0.8, 9.7)
    arrow(0.8, projection("down_proj", 0.8, 10.1, w=2.2), 0.2, 11.05)
    ax.add_patch(plt.Circle((0, 11.2), 0.22, facecolor="white", edgecolor="k", gid="residual:2"))
    ax.text(0, 11.2, "+", ha="center", va="center", fontsize=13)
    residual(6.05, 11.2, -2.85)
    arrow(0, 11.42, 0, 11.85)
    ax.set_title(f"one decoder block (hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}): "
                 f"LoRA on {', '.join(targets)}", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 5. training memory
MEMORY_PARTS = (("weights", "base weights (16-bit, or NF4 codes)", "tab:gray"),
                ("quant_constants", "NF4 constants", "tab:purple"),
                ("adapter", "adapter weights", "tab:green"),
                ("gradients", "gradients", "tab:orange"),
                ("optimizer", "optimizer state + fp32 master", "tab:red"))


def draw_memory_bars(config="llama-7b", r: int = 16,
                     target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), optimizer="adamw",
                     cards=(24, 80)):
    """Training memory of full fine-tuning, LoRA and QLoRA for ``config`` (a LlamaConfig or a preset
    name; default Llama-7B with the article's adapter, r = 16 on q, k, v, o), as stacked bars.

    Each bar is one ``memory.memory_breakdown(config, method, r=r, target_modules=...,
    optimizer=...)``, split into base weights, NF4 constants, adapter weights, gradients and optimizer
    state, in GB (10^9 bytes). Activations are not drawn: ``memory`` does not count them (they depend
    on batch size, sequence length and checkpointing), and the axis says so. ``cards`` are GPU sizes
    in GiB (as cards are sold) drawn as dashed lines.
    """
    runs = [memory.memory_breakdown(config, m, r=r, target_modules=target_modules, optimizer=optimizer)
            for m in memory.METHODS]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    bottom = np.zeros(len(runs))
    for attr, label, color in MEMORY_PARTS:
        heights = np.array([mb.gb(attr) for mb in runs])
        bars = ax.bar(range(len(runs)), heights, bottom=bottom, color=color, label=label, width=0.6)
        for method, bar in zip(memory.METHODS, bars):
            bar.set_gid(f"bar:{method}:{attr}")
        bottom += heights
    for i, mb in enumerate(runs):
        ax.text(i, bottom[i], f"{mb.gb():.1f} GB\n{mb.trainable_params:,} trainable", ha="center",
                va="bottom", fontsize=8, gid=f"total:{mb.method}")
    for j, gib in enumerate(cards):
        gb = gib * memory.GiB / memory.GB
        ax.axhline(gb, color=f"C{j + 4}", ls="--", lw=1)
        ax.text(len(runs) - 0.55, gb, f"{gib} GiB card", color=f"C{j + 4}", va="bottom", ha="right",
                fontsize=8)
    ax.set_xticks(range(len(runs)), ["full fine-tuning", "LoRA", "QLoRA"])
    ax.set_ylim(0, bottom.max() * 1.22)
    ax.set_ylabel("training memory, GB (activations not included)")
    where = config if isinstance(config, str) else \
        f"LlamaConfig (hidden {config.hidden_size}, {config.num_hidden_layers} layers)"
    ax.set_title(f"{where}: {runs[0].total_params / 1e9:.2f}B parameters; adapter r = {r} on "
                 f"{', '.join(memory.resolve_target_modules(target_modules))}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
