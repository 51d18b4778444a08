"""The exercises: eleven small functions, from the LoRA forward pass to QLoRA's memory bill.

Each task below registers four things in ``registry.py``, where the checker (``checker.py``) finds
them:

* ``reference``: the answer, computed by minilora itself: ``lora.layer.LoraLinear`` and
  ``lora.merge`` for the adapter, the autograd engine (``Tensor.backward``) for gradients,
  ``quant`` for NF4, packing and double quantization, ``memory`` for parameter and byte counts.
  Nothing here re-types a formula the library already has;
* ``draw``: how Hypothesis builds a random case (shapes, ranks, configs, a seed for the values);
* ``edge_cases``: the cases that catch the usual mistakes for sure (α ≠ r, r = 1, square shapes
  where a transpose would go unnoticed, batch axes, exact ties, odd lengths, a negative absmax);
* ``mistakes``: wrong solutions a learner typically writes, each with the hint the verdict gives
  when the learner's output equals it. Their code is deliberately wrong; do not copy it.

Shapes follow PyTorch and PEFT (docs/architecture.md): W0 (out, in), lora_A (r, in), lora_B (out, r),
activations (..., features). Floating-point inputs are float64 so that a correct answer agrees with the
reference to ~1e-12 and any real mistake is far outside the tolerance; the NF4 tasks use float32,
as the format does.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ... import backend
from ... import functional as F
from ...lora import merge as lora_merge
from ...lora.layer import LoraLinear
from ...memory import LINEAR_MODULES, count_parameters, linear_shapes, lora_parameters, memory_breakdown
from ...models.config import PRESETS, LlamaConfig
from ...nn import Linear
from ...quant import (DYNAMIC_MAP, NF4_CODE, double_quantize, nf4_bits_per_parameter, pack_4bit,
                     quantize_nf4)
from ...quant.double_quant import NESTED_BLOCKSIZE
from ...tensor import Tensor
from .checker import compare
from .registry import Case, Mistake, Task, register

ALPHAS = (1, 2, 3, 4, 8, 16, 32, 0.5)


def _rng(d) -> np.random.Generator:
    """A NumPy generator seeded by a Hypothesis draw: Hypothesis picks shapes and the seed, NumPy
    fills the arrays with well-scaled normal values (no 1e300 or subnormal surprises)."""
    return np.random.default_rng(d.seed())


def _normal(g, *shape, scale=1.0):
    return g.standard_normal(shape) * scale


def _batch(d):
    return d.sampled_from([(), (1,), (2,), (3,), (2, 3), (1, 4)])


@contextlib.contextmanager
def _rng_untouched():
    """Building a LoraLinear draws its initial weights from minilora's generator; put the generator
    back afterwards so that checking an exercise never changes the random numbers a notebook sees."""
    g = backend.rng()
    state = g.bit_generator.state
    try:
        yield
    finally:
        g.bit_generator.state = state


def _lora_layer(W0, A, B, alpha, r) -> LoraLinear:
    """minilora's LoRA layer holding exactly these W0, A, B (float64), in eval mode."""
    out_f, in_f = W0.shape
    with _rng_untouched():
        base = Linear(in_f, out_f)
        base.weight.data = np.asarray(W0, dtype=np.float64)
        layer = LoraLinear(base)
        layer.update_layer("default", r, alpha, init_lora_weights=False)
    layer.lora_A["default"].weight.data = np.asarray(A, dtype=np.float64)   # (r, in)
    layer.lora_B["default"].weight.data = np.asarray(B, dtype=np.float64)   # (out, r)
    layer.set_adapter("default")
    layer.eval()
    return layer


# ============================================================== 1. the LoRA forward pass
def _ref_lora_forward(x, W0, A, B, alpha, r):
    return _lora_layer(W0, A, B, alpha, r)(Tensor(x)).numpy()


def _draw_lora(d, with_x=True):
    out_f, in_f, r = d.integers(1, 6), d.integers(1, 6), d.integers(1, 4)
    alpha = d.sampled_from(ALPHAS)
    batch = _batch(d) if with_x else ()
    g = _rng(d)
    args = {}
    if with_x:
        args["x"] = _normal(g, *batch, in_f)
    args.update(W0=_normal(g, out_f, in_f), A=_normal(g, r, in_f), B=_normal(g, out_f, r),
                alpha=alpha, r=r)
    return args


def _lora_case(seed, batch, out_f, in_f, r, alpha, label, with_x=True):
    g = np.random.default_rng(seed)
    args = {"x": _normal(g, *batch, in_f)} if with_x else {}
    args.update(W0=_normal(g, out_f, in_f), A=_normal(g, r, in_f), B=_normal(g, out_f, r),
                alpha=alpha, r=r)
    return Case(args, label)


def _edges_lora_forward():
    return [
        _lora_case(1, (), 2, 3, 1, 2, "r = 1, one input vector"),
        _lora_case(2, (2,), 3, 3, 3, 16, "square shapes, α ≠ r"),
        _lora_case(3, (2, 3), 3, 5, 2, 8, "two batch axes"),
        _lora_case(4, (4,), 4, 3, 2, 0.5, "α < r"),
    ]


def _fwd(scale_fn, base=True, adapter=True, delta_T=False):
    def f(x, W0, A, B, alpha, r):
        h = x @ W0.T if base else 0.0
        if adapter:
            s = scale_fn(alpha, r)
            h = h + s * (x @ (B @ A) if delta_T else (x @ A.T) @ B.T)
        return h
    return f


register(Task(
    name="lora_forward",
    summary="h = W0·x + (α/r)·B·A·x for a batch of row vectors x",
    signature="lora_forward(x, W0, A, B, alpha, r) -> h   # x (..., in), W0 (out, in), A (r, in), "
              "B (out, r), all float64; h float64 (..., out)",
    reference=_ref_lora_forward,
    draw=_draw_lora,
    edge_cases=_edges_lora_forward,
    mistakes=(
        Mistake("alpha_not_alpha_over_r", "you scaled by alpha, not alpha/r: LoRA multiplies B·A·x by "
                "α/r (lora_alpha / r)", _fwd(lambda a, r: a)),
        Mistake("r_over_alpha", "you scaled by r/alpha; the scaling is α/r (lora_alpha / r)",
                _fwd(lambda a, r: r / a)),
        Mistake("no_scaling", "you forgot the scaling: the adapter's output is multiplied by α/r",
                _fwd(lambda a, r: 1.0)),
        Mistake("sqrt_r", "α/√r is rsLoRA's scaling; plain LoRA uses α/r",
                _fwd(lambda a, r: a / np.sqrt(r))),
        Mistake("forgot_base", "you returned only the adapter's part: add the frozen path, x @ W0.T",
                _fwd(lambda a, r: a / r, base=False)),
        Mistake("forgot_adapter", "you returned only the frozen path x @ W0.T: add (α/r)·(x @ A.T) @ B.T",
                _fwd(lambda a, r: a / r, adapter=False)),
        Mistake("delta_transposed", "A and B swapped or transposed: for row vectors x (..., in) the "
                "adapter is (x @ A.T) @ B.T, i.e. x @ (B @ A).T, not x @ (B @ A)",
                _fwd(lambda a, r: a / r, delta_T=True)),
        Mistake("W0_not_transposed", "W0 is (out, in): for row vectors x (..., in) the frozen path is "
                "x @ W0.T", lambda x, W0, A, B, alpha, r: x @ W0 + alpha / r * (x @ A.T) @ B.T),
    ),
    hint="h = x @ W0.T + (α/r) · (x @ A.T) @ B.T, with A (r, in) and B (out, r)",
    error_hint="check the shapes: x (..., in), W0 (out, in), A (r, in), B (out, r); x @ A.T is "
               "(..., r) and (x @ A.T) @ B.T is (..., out)",
    minutes=10,
))


# ============================================================== 2. counting LoRA parameters
def _draw_config(d) -> LlamaConfig:
    heads = d.sampled_from([1, 2, 4, 8])
    kv = d.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0])
    head_dim = d.sampled_from([2, 4, 8, 16])
    hidden = heads * head_dim
    return LlamaConfig(vocab_size=d.integers(8, 300), hidden_size=hidden,
                       intermediate_size=d.integers(hidden, 4 * hidden),
                       num_hidden_layers=d.integers(1, 4), num_attention_heads=heads,
                       num_key_value_heads=kv, tie_word_embeddings=d.booleans())


def _draw_targets(d) -> list:
    chosen = [m for m in LINEAR_MODULES if d.booleans()]
    return chosen or [d.sampled_from(LINEAR_MODULES)]


def _draw_count(d):
    return {"config": _draw_config(d), "r": d.sampled_from([1, 2, 4, 8, 16, 64]),
            "target_modules": _draw_targets(d)}


_SMALL_GQA = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=88, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1)


def _edges_count():
    return [
        Case({"config": PRESETS["llama-7b"], "r": 8, "target_modules": ["q_proj", "v_proj"]},
             "Llama-7B, r = 8 on q and v (the article's 4,194,304)"),
        Case({"config": _SMALL_GQA, "r": 4, "target_modules": ["k_proj"]},
             "grouped-query attention: k_proj is narrower"),
        Case({"config": _SMALL_GQA, "r": 2, "target_modules": ["up_proj", "down_proj"]},
             "the MLP: in ≠ out"),
        Case({"config": PRESETS["llama-70b"], "r": 16, "target_modules": list(LINEAR_MODULES)},
             "Llama-2-70B, all seven projections"),
    ]


def _count_variant(per_module, layers=True):
    """A wrong count built from one per-module formula (out, in, r, config) -> int."""
    def f(config, r, target_modules):
        shapes = linear_shapes(config)
        per_layer = sum(per_module(*shapes[m], r, config, m) for m in target_modules)
        return per_layer * (config.num_hidden_layers if layers else 1)
    return f


register(Task(
    name="count_lora_params",
    summary="trainable parameters of a LoRA adapter on a Llama config",
    signature="count_lora_params(config, r, target_modules) -> int   # config: LlamaConfig; an int, "
              "not a float",
    reference=lambda config, r, target_modules: lora_parameters(config, r, tuple(target_modules)),
    draw=_draw_count,
    edge_cases=_edges_count,
    mistakes=(
        Mistake("square_2rd", "you counted 2·r·d for every module, as if each Linear were d×d; a "
                "module (out, in) adds A (r, in) and B (out, r) = r·(in + out), and k_proj/v_proj "
                "(grouped-query attention) and the MLP projections are not square",
                _count_variant(lambda o, i, r, c, m: 2 * r * c.hidden_size)),
        Mistake("ignores_gqa", "with grouped-query attention k_proj and v_proj project to "
                "num_key_value_heads · head_dim features, not hidden_size",
                _count_variant(lambda o, i, r, c, m: r * (i + (c.hidden_size if m in ("k_proj", "v_proj")
                                                               else o)))),
        Mistake("one_layer", "that is one layer's worth: multiply by num_hidden_layers",
                _count_variant(lambda o, i, r, c, m: r * (i + o), layers=False)),
        Mistake("per_head", "LoRA adapts each projection matrix as a whole, not each attention head: "
                "one A and one B per Linear",
                _count_variant(lambda o, i, r, c, m: r * (i + o) * c.num_attention_heads)),
        Mistake("only_A", "you counted only A (r·in); B (out·r) is trained too",
                _count_variant(lambda o, i, r, c, m: r * i)),
        Mistake("only_B", "you counted only B (out·r); A (r·in) is trained too",
                _count_variant(lambda o, i, r, c, m: r * o)),
        Mistake("delta_size", "you counted the entries of ΔW = B·A (out·in); LoRA stores the factors, "
                "r·(in + out)", _count_variant(lambda o, i, r, c, m: o * i)),
    ),
    hint="each adapted Linear of shape (out, in) adds r·(in + out); sum over target_modules (k_proj and "
         "v_proj have out = num_key_value_heads·head_dim, the MLP uses intermediate_size) and "
         "multiply by num_hidden_layers",
    error_hint="config is a LlamaConfig: read config.hidden_size, config.intermediate_size, "
               "config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads",
    rtol=0.0, atol=0.0,
    minutes=10,
))


# ============================================================== 3. dL/dA and dL/dB
def _ref_lora_grads(x, A, B, grad_h, alpha, r):
    W0 = np.zeros((B.shape[0], A.shape[1]))                # the base plays no part in dA, dB
    layer = _lora_layer(W0, A, B, alpha, r)
    h = layer(Tensor(x))                                   # (..., out)
    h.backward(grad_h)
    return layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def _draw_grads(d):
    args = _draw_lora(d)
    g = _rng(d)
    return {"x": args["x"], "A": args["A"], "B": args["B"],
            "grad_h": _normal(g, *args["x"].shape[:-1], args["W0"].shape[0]),
            "alpha": args["alpha"], "r": args["r"]}


def _grads_case(seed, batch, out_f, in_f, r, alpha, label):
    g = np.random.default_rng(seed)
    return Case({"x": _normal(g, *batch, in_f), "A": _normal(g, r, in_f), "B": _normal(g, out_f, r),
                 "grad_h": _normal(g, *batch, out_f), "alpha": alpha, "r": r}, label)


def _edges_grads():
    return [
        _grads_case(11, (), 2, 3, 1, 4, "one input vector, r = 1"),
        _grads_case(12, (4,), 3, 3, 3, 16, "square shapes, α ≠ r"),
        _grads_case(13, (2, 3), 4, 5, 2, 8, "two batch axes"),
    ]


def _grads_variant(scale=lambda a, r: a / r, reduce="sum", transpose=False, swap=False):
    def f(x, A, B, grad_h, alpha, r):
        s = scale(alpha, r)
        X = x.reshape(-1, x.shape[-1])                     # (N, in)
        G = grad_h.reshape(-1, grad_h.shape[-1])           # (N, out)
        U = X @ A.T                                        # (N, r)
        if reduce == "none":                               # one gradient per example
            dA = s * np.einsum("nr,ni->nri", G @ B, X).reshape(*x.shape[:-1], *A.shape)
            dB = s * np.einsum("no,nr->nor", G, U).reshape(*x.shape[:-1], *B.shape)
        else:
            dA, dB = s * (G @ B).T @ X, s * G.T @ U
            if reduce == "mean":
                dA, dB = dA / X.shape[0], dB / X.shape[0]
        if transpose:
            dA, dB = dA.T, dB.T
        return (dB, dA) if swap else (dA, dB)
    return f


register(Task(
    name="lora_grads",
    summary="dL/dA and dL/dB for h = (α/r)·(x Aᵀ) Bᵀ, given dL/dh",
    signature="lora_grads(x, A, B, grad_h, alpha, r) -> (dA, dB)   # x (..., in), grad_h (..., out), "
              "float64; dA float64 (r, in), dB float64 (out, r)",
    reference=_ref_lora_grads,
    draw=_draw_grads,
    edge_cases=_edges_grads,
    mistakes=(
        Mistake("no_scaling", "you dropped the scaling: both gradients carry the factor s = α/r "
                "from h = s·(x Aᵀ) Bᵀ", _grads_variant(scale=lambda a, r: 1.0)),
        Mistake("alpha_scaling", "you scaled by alpha, not alpha/r", _grads_variant(scale=lambda a, r: a)),
        Mistake("not_summed", "sum over the batch axes: every example adds to dA and dB, so they keep "
                "the shapes of A (r, in) and B (out, r)", _grads_variant(reduce="none")),
        Mistake("mean_not_sum", "sum over the batch, don't average: grad_h already carries however "
                "the loss weights the examples", _grads_variant(reduce="mean")),
        Mistake("transposed", "dA must have A's shape (r, in) and dB B's shape (out, r); you returned "
                "their transposes", _grads_variant(transpose=True)),
        Mistake("swapped", "return (dA, dB) in that order", _grads_variant(swap=True)),
    ),
    hint="with u = x Aᵀ (..., r): dB = s·Σ grad_hᵀ u (out, r) and dA = s·Σ (grad_h B)ᵀ x (r, in), "
         "s = α/r, the sums running over every batch axis (flatten x and grad_h to 2-D first)",
    error_hint="flatten the batch axes first: X = x.reshape(-1, in) (N, in), G = grad_h.reshape(-1, out) "
               "(N, out); then dB = s·Gᵀ(X Aᵀ) and dA = s·(G B)ᵀ X",
    output_names=("dA", "dB"),
    minutes=20,
))


# ============================================================== 4. merge and 5. unmerge
def _draw_merge(d):
    return _draw_lora(d, with_x=False)


def _edges_merge():
    return [
        _lora_case(21, (), 2, 3, 1, 2, "r = 1", with_x=False),
        _lora_case(22, (), 4, 4, 2, 16, "square W0, α ≠ r", with_x=False),
        _lora_case(23, (), 3, 5, 4, 1, "α < r", with_x=False),
    ]


def _delta(A, B, s, transposed=False):
    d = B @ A                                              # (out, r) @ (r, in) -> (out, in)
    return s * (d.T if transposed else d)


def _merge_variant(scale=lambda a, r: a / r, sign=+1, base=True, transposed=False):
    def f(W0, A, B, alpha, r):
        return (W0 if base else 0.0) + sign * _delta(A, B, scale(alpha, r), transposed)
    return f


register(Task(
    name="merge",
    summary="fold the adapter into the weight: W = W0 + (α/r)·B·A",
    signature="merge(W0, A, B, alpha, r) -> W   # W0 (out, in), A (r, in), B (out, r), float64; "
              "W float64 (out, in)",
    reference=lambda W0, A, B, alpha, r: lora_merge.merge_weight(W0, A, B, alpha, r),
    draw=_draw_merge,
    edge_cases=_edges_merge,
    mistakes=(
        Mistake("no_scaling", "you forgot the scaling: ΔW = (α/r)·B·A", _merge_variant(lambda a, r: 1.0)),
        Mistake("alpha_scaling", "you scaled by alpha, not alpha/r", _merge_variant(lambda a, r: a)),
        Mistake("r_over_alpha", "you scaled by r/alpha; the scaling is α/r",
                _merge_variant(lambda a, r: r / a)),
        Mistake("subtracted", "merging adds ΔW: W = W0 + (α/r)·B·A (unmerging subtracts it)",
                _merge_variant(sign=-1)),
        Mistake("transposed_delta", "A and B swapped or transposed: B (out, r) @ A (r, in) is the "
                "(out, in) update; A.T @ B.T is its transpose", _merge_variant(transposed=True)),
        Mistake("forgot_W0", "you returned ΔW alone: add it to W0", _merge_variant(base=False)),
    ),
    hint="W = W0 + (α/r) · B @ A, where B @ A is (out, r) @ (r, in) = (out, in)",
    error_hint="B @ A multiplies (out, r) by (r, in); A @ B does not fit",
    minutes=5,
))


def _draw_unmerge(d):
    args = _draw_lora(d, with_x=False)
    return {"W": args.pop("W0"), **args}


def _edges_unmerge():
    cases = []
    for c in _edges_merge():
        a = dict(c.args)
        cases.append(Case({"W": a.pop("W0"), **a}, c.label.replace("W0", "W")))
    return cases


register(Task(
    name="unmerge",
    summary="take the adapter back out: W0 = W − (α/r)·B·A",
    signature="unmerge(W, A, B, alpha, r) -> W0   # W (out, in) a merged weight, float64; W0 float64 "
              "(out, in)",
    reference=lambda W, A, B, alpha, r: lora_merge.unmerge_weight(W, A, B, alpha, r),
    draw=_draw_unmerge,
    edge_cases=_edges_unmerge,
    mistakes=(
        Mistake("added", "unmerging subtracts ΔW: W0 = W − (α/r)·B·A", _merge_variant(sign=+1)),
        Mistake("no_scaling", "you forgot the scaling: ΔW = (α/r)·B·A",
                _merge_variant(lambda a, r: 1.0, sign=-1)),
        Mistake("alpha_scaling", "you scaled by alpha, not alpha/r",
                _merge_variant(lambda a, r: a, sign=-1)),
        Mistake("transposed_delta", "A and B swapped or transposed: ΔW = (α/r)·B @ A is (out, in)",
                _merge_variant(sign=-1, transposed=True)),
    ),
    hint="W0 = W − (α/r) · B @ A: exactly what merge added",
    error_hint="B @ A multiplies (out, r) by (r, in); A @ B does not fit",
    minutes=5,
))


# ============================================================== 6. matmul backward with broadcasting
def _ref_matmul_backward(a, b, grad_out):
    ta, tb = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    (ta @ tb).backward(grad_out)
    return ta.grad, tb.grad


def _draw_matmul(d):
    batch = [d.integers(1, 3) for _ in range(d.integers(0, 3))]

    def view():  # drop some leading axes and shrink some others to 1: broadcasting at work
        kept = batch[d.integers(0, len(batch)):]
        return tuple(1 if d.integers(0, 3) == 0 else n for n in kept)
    a_batch, b_batch = view(), view()
    n, k, m = d.integers(1, 4), d.integers(1, 4), d.integers(1, 4)
    g = _rng(d)
    out_batch = np.broadcast_shapes(a_batch, b_batch)
    return {"a": _normal(g, *a_batch, n, k), "b": _normal(g, *b_batch, k, m),
            "grad_out": _normal(g, *out_batch, n, m)}


def _mm_case(seed, a_shape, b_shape, label):
    g = np.random.default_rng(seed)
    a, b = _normal(g, *a_shape), _normal(g, *b_shape)
    out = np.broadcast_shapes(a_shape[:-2], b_shape[:-2]) + (a_shape[-2], b_shape[-1])
    return Case({"a": a, "b": b, "grad_out": _normal(g, *out)}, label)


def _edges_matmul():
    return [
        _mm_case(31, (2, 3), (3, 4), "plain 2-D"),
        _mm_case(32, (2, 3, 4), (4, 5), "a batch of rows times one weight (b broadcast)"),
        _mm_case(33, (3, 4), (2, 4, 5), "a broadcast over b's batch"),
        _mm_case(34, (2, 1, 3, 4), (5, 4, 2), "size-1 axis stretched, missing axis added"),
        _mm_case(35, (2, 3, 3), (1, 3, 3), "square matrices"),
    ]


def _sum_to(g, shape, stretched=True, reduce=np.sum):
    """Reduce g to ``shape``: over added leading axes and (if ``stretched``) stretched size-1 axes."""
    extra = g.ndim - len(shape)
    if extra > 0:
        g = reduce(g, axis=tuple(range(extra)))
    if stretched:
        axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
        if axes:
            g = reduce(g, axis=axes, keepdims=True)
    return g


def _mm_variant(reduce="sum", transposes=True):
    def f(a, b, grad_out):
        if transposes:
            da, db = grad_out @ np.swapaxes(b, -1, -2), np.swapaxes(a, -1, -2) @ grad_out
        else:
            da, db = grad_out @ b, a @ grad_out
        if reduce == "none":
            return da, db
        if reduce == "leading":
            return _sum_to(da, a.shape, stretched=False), _sum_to(db, b.shape, stretched=False)
        red = np.mean if reduce == "mean" else np.sum
        return _sum_to(da, a.shape, reduce=red), _sum_to(db, b.shape, reduce=red)
    return f


register(Task(
    name="matmul_backward",
    summary="da and db for out = a @ b with broadcast batch axes",
    signature="matmul_backward(a, b, grad_out) -> (da, db)   # a (..., n, k), b (..., k, m), "
              "grad_out (..., n, m), float64; da like a, db like b (shape and float64)",
    reference=_ref_matmul_backward,
    draw=_draw_matmul,
    edge_cases=_edges_matmul,
    mistakes=(
        Mistake("not_reduced", "the gradient was not reduced over broadcast axes: sum da over the "
                "batch axes a was broadcast along (leading axes it lacks, and its size-1 axes), so "
                "that da has a's shape; the same for db", _mm_variant("none")),
        Mistake("leading_only", "you summed over the added leading axes but not over the size-1 "
                "axes that were stretched: sum those too, with keepdims=True", _mm_variant("leading")),
        Mistake("mean_not_sum", "sum over broadcast axes, don't average: each copy of a (or b) "
                "contributed to the output", _mm_variant("mean")),
        Mistake("no_transpose", "da = grad_out @ bᵀ and db = aᵀ @ grad_out, transposing the last two "
                "axes (np.swapaxes(b, -1, -2))", _mm_variant("sum", transposes=False)),
    ),
    hint="da = grad_out @ swapaxes(b, -1, -2) and db = swapaxes(a, -1, -2) @ grad_out, each then "
         "summed back to its input's shape over broadcast axes",
    error_hint="transpose only the last two axes (np.swapaxes(x, -1, -2)); .T reverses every axis of "
               "a batched array",
    output_names=("da", "db"),
    minutes=20,
))


# ============================================================== 7. softmax backward
def _ref_softmax_backward(x, grad_y):
    t = Tensor(x, requires_grad=True)
    F.softmax(t, axis=-1).backward(grad_y)
    return t.grad


def _draw_softmax(d):
    shape = d.sampled_from([(4,), (2, 3), (3, 1), (2, 2, 5), (1, 6)])
    g = _rng(d)
    return {"x": _normal(g, *shape, scale=d.sampled_from([0.5, 1.0, 3.0])),
            "grad_y": _normal(g, *shape)}


def _edges_softmax():
    g = np.random.default_rng(41)
    return [Case({"x": _normal(g, 3), "grad_y": _normal(g, 3)}, "one row"),
            Case({"x": _normal(g, 3, 3), "grad_y": _normal(g, 3, 3)}, "square: rows vs columns"),
            Case({"x": _normal(g, 2, 4, 5) * 3, "grad_y": _normal(g, 2, 4, 5)}, "batch of rows")]


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sm_variant(kind):
    def f(x, grad_y):
        y = _softmax(x)
        if kind == "diagonal":
            return grad_y * y * (1 - y)
        if kind == "no_y":
            return grad_y - (grad_y * y).sum(axis=-1, keepdims=True)
        axis = 0 if kind == "axis0" else None
        return y * (grad_y - (grad_y * y).sum(axis=axis, keepdims=True))
    return f


register(Task(
    name="softmax_backward",
    summary="dL/dx for y = softmax(x) along the last axis",
    signature="softmax_backward(x, grad_y) -> dx   # x, grad_y float64; dx float64 of x's shape; "
              "softmax over the last axis",
    reference=_ref_softmax_backward,
    draw=_draw_softmax,
    edge_cases=_edges_softmax,
    mistakes=(
        Mistake("diagonal_only", "softmax mixes a whole row: ∂y_i/∂x_j = y_i(δ_ij − y_j); y(1 − y) keeps "
                "only the diagonal. dx = y ⊙ (g − Σ_j g_j y_j)", _sm_variant("diagonal")),
        Mistake("forgot_y", "multiply by y: dx = y ⊙ (g − Σ_j g_j y_j)", _sm_variant("no_y")),
        Mistake("wrong_axis", "the sum Σ_j g_j y_j runs along the softmax axis (the last one), row by row:"
                " .sum(axis=-1, keepdims=True)", _sm_variant("axis0")),
        Mistake("summed_everything", "the sum Σ_j g_j y_j is per row, along the last axis, not over the "
                "whole array: .sum(axis=-1, keepdims=True)", _sm_variant("all")),
    ),
    hint="with y = softmax(x): dx = y ⊙ (g − Σ_j g_j y_j), the sum along the last axis with keepdims",
    error_hint="keep the reduced axis (keepdims=True) so the row sums broadcast back over the row",
    minutes=10,
))


# ============================================================== 8. quantize one block to NF4
_NF4_MID = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)   # (15,) float32 midpoints, ascending


def _ref_nf4_block(block):
    q = quantize_nf4(np.asarray(block, dtype=np.float32), blocksize=64)   # one block: n <= 64
    return q.indices().reshape(-1), np.float32(q.absmax[0])


def _draw_nf4(d):
    n = d.sampled_from([64, 64, 64, 63, 32, 17, 5, 2, 1])
    g = _rng(d)
    return {"block": (_normal(g, n) * d.sampled_from([0.02, 0.5, 1.0, 7.0])).astype(np.float32)}


def _edges_nf4():
    g = np.random.default_rng(51)
    ties = np.concatenate([[1.0], _NF4_MID, -_NF4_MID[:7]]).astype(np.float32)  # exact midpoints
    neg = (_normal(g, 64) * 0.5).astype(np.float32)
    neg[10] = -3.0                                          # the largest magnitude is negative
    return [
        Case({"block": (_normal(g, 64) * 0.1).astype(np.float32)}, "a 64-value block"),
        Case({"block": ties}, "values exactly halfway between two codes",
             "a value exactly on a midpoint between two codes takes the LOWER index"),
        Case({"block": neg}, "the largest |value| is negative"),
        Case({"block": np.zeros(8, np.float32)}, "an all-zero block",
             "an all-zero block has absmax 0: divide by max(absmax, 1e-38) as bitsandbytes does, so "
             "every value maps to the code 0.0 (index 7) instead of NaN"),
        Case({"block": np.array([0.3, -0.2, 0.05], np.float32)}, "a short block"),
    ]


def _nearest(s, code=NF4_CODE):
    mid = (code[:-1] + code[1:]) / np.float32(2)
    return np.searchsorted(mid, s, side="left").astype(np.uint8)


def _compare_nf4(expected, got, args):
    """absmax first (a wrong scale explains wrong indices), then the indices, which may differ where
    dividing by absmax and multiplying by float32(1/absmax) (bitsandbytes' way for a full block)
    land on different sides of a midpoint: both are correct ways to scale."""
    d = compare(expected, got, _NF4_TASK)
    if d is None or not isinstance(got, (tuple, list)) or len(got) != 2:
        return d
    d_absmax = compare(expected[1], got[1], _NF4_TASK, "absmax")
    if d_absmax is not None or d.part != "indices" or d.kind != "values":
        return d_absmax or d
    idx = np.asarray(got[0])
    block = np.asarray(args["block"], dtype=np.float32)
    am = np.maximum(np.abs(block).max(), np.float32(1e-38))
    ok = (idx == _nearest(block / am)) | (idx == _nearest(block * (np.float32(1) / am)))
    return None if ok.all() else d


def _nf4_variant(kind):
    def f(block):
        block = np.asarray(block, dtype=np.float32)
        absmax = np.float32(block.max() if kind == "max" else np.abs(block).max())
        s = block if kind == "raw" else block / max(absmax, np.float32(1e-38))
        s = np.clip(s, -1, 1)
        if kind == "upper":
            idx = np.searchsorted(_NF4_MID, s, side="right")
        elif kind == "argmin":
            idx = np.argmin(np.abs(s[:, None] - NF4_CODE[None, :]), axis=1)   # (n, 16) distances
        elif kind == "uniform":
            idx = np.round((s + 1) * 7.5)
        else:
            idx = _nearest(s)
        return idx.astype(np.uint8), absmax
    return f


_NF4_TASK = register(Task(
    name="nf4_quantize_block",
    summary="quantize one block of weights to 4-bit NormalFloat indices and its absmax",
    signature="nf4_quantize_block(block) -> (indices, absmax)   # block float32 (n,), n <= 64; "
              "indices uint8 (n,) in 0..15, absmax float32",
    reference=_ref_nf4_block,
    draw=_draw_nf4,
    edge_cases=_edges_nf4,
    mistakes=(
        Mistake("ties_upper", "a value exactly halfway between two codes must take the LOWER index: "
                "np.searchsorted(midpoints, x, side='left'), not side='right'", _nf4_variant("upper")),
        Mistake("argmin_distance", "argmin |x − code| sends a value that lies exactly on a midpoint "
                "to whichever code float rounding favours (often the upper one); NF4 sends ties to the "
                "LOWER index: np.searchsorted(midpoints, x, side='left'), midpoints = "
                "(NF4_CODE[:-1] + NF4_CODE[1:]) / 2", _nf4_variant("argmin")),
        Mistake("not_normalised", "divide the block by its absmax first, so the values lie in [-1, 1] "
                "where the code book lives", _nf4_variant("raw")),
        Mistake("max_not_absmax", "absmax is the largest |value| (np.abs(block).max()), not the largest "
                "value: a block whose biggest magnitude is negative gets the wrong scale",
                _nf4_variant("max")),
        Mistake("uniform_levels", "NF4's 16 levels are not evenly spaced: pick the nearest entry of "
                "NF4_CODE, not round((x + 1)·7.5)", _nf4_variant("uniform")),
    ),
    hint="absmax = max|block|; x = block / absmax; index = np.searchsorted(midpoints, x, side='left') "
         "with midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2 in float32",
    error_hint="NF4_CODE (from minilora.quant) holds the 16 float32 codes in ascending order",
    output_names=("indices", "absmax"),
    compare=lambda e, g, a: _compare_nf4(e, g, a),
    minutes=15,
))


# ============================================================== 9. pack two 4-bit codes per byte
_NF4_ZERO_INDEX = int(np.flatnonzero(NF4_CODE == 0)[0])    # 7: padding must dequantize to 0.0


def _draw_pack(d):
    g = _rng(d)
    return {"indices": g.integers(0, 16, size=d.integers(1, 40)).astype(np.uint8)}


def _edges_pack():
    return [
        Case({"indices": np.array([1, 2], np.uint8)}, "two indices, one byte"),
        Case({"indices": np.array([15, 0, 9], np.uint8)}, "an odd count",
             "an odd count needs one padding nibble (the index 7 of 0.0), so the output has "
             "ceil(n / 2) bytes"),
        Case({"indices": np.array([12], np.uint8)}, "a single index",
             "a single index goes in the HIGH nibble and the padding 7 after it, in the low one: "
             "[12] packs to 12 << 4 | 7 = 199"),
        Case({"indices": np.arange(16, dtype=np.uint8)}, "every index 0..15"),
    ]


def _pack_variant(kind):
    def f(indices):
        idx = np.asarray(indices).astype(np.uint8)
        if kind == "one_per_byte":
            return idx
        if idx.size % 2:
            if kind == "no_pad":
                idx = idx[:-1]
            else:
                idx = np.append(idx, np.uint8(0 if kind == "pad_zero" else _NF4_ZERO_INDEX))
        hi, lo = idx[0::2], idx[1::2]
        if kind == "swapped":
            hi, lo = lo, hi
        return ((hi + lo) if kind == "no_shift" else (hi << 4) | lo).astype(np.uint8)
    return f


register(Task(
    name="pack_nibbles",
    summary="pack 4-bit indices two per byte, even element in the high nibble",
    signature="pack_nibbles(indices) -> packed   # indices uint8 (n,) in 0..15; packed uint8 "
              "(ceil(n/2),), not int64",
    reference=lambda indices: pack_4bit(indices, pad=_NF4_ZERO_INDEX),
    draw=_draw_pack,
    edge_cases=_edges_pack,
    mistakes=(
        Mistake("low_high_swapped", "the EVEN element goes in the HIGH nibble: byte k = idx[2k] << 4 | "
                "idx[2k+1] (bitsandbytes' layout)", _pack_variant("swapped")),
        Mistake("not_padded", "an odd count needs a padding nibble: append index 7 (the code 0.0) so "
                "the last index is not lost and the output has ceil(n/2) bytes", _pack_variant("no_pad")),
        Mistake("pad_zero", "pad with index 7, the code of 0.0 (index 0 is −1.0): padding must "
                "dequantize to exactly zero", _pack_variant("pad_zero")),
        Mistake("no_shift", "shift the high nibble by 4 bits (idx << 4, i.e. ×16) before OR-ing in "
                "the low one", _pack_variant("no_shift")),
        Mistake("one_per_byte", "two 4-bit indices share each byte: the output has ceil(n/2) bytes",
                _pack_variant("one_per_byte")),
    ),
    hint="pad an odd count with 7, then byte k = (idx[2k] << 4) | idx[2k+1], as uint8",
    error_hint="work in uint8 (or int) arrays: idx[0::2] are the even elements, idx[1::2] the odd ones",
    minutes=10,
))


# ============================================================== 10. double-quantize absmax
def _ref_double_quant(absmax):
    state = double_quantize(np.asarray(absmax, dtype=np.float32))
    return state.q, state.nested_absmax, np.float32(state.offset[0])


_DQ_MID = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / np.float32(2)   # (255,) float32


def _draw_dq(d):
    n = d.sampled_from([1, 2, 7, 64, 255, 256, 257, 300, 600])
    g = _rng(d)
    scale = d.sampled_from([0.01, 0.1, 1.0, 4.0])
    absmax = np.abs(2.5 + 0.4 * _normal(g, n)) * scale      # like max|w| over 64 normal weights
    return {"absmax": absmax.astype(np.float32)}


def _edges_dq():
    g = np.random.default_rng(61)
    return [
        Case({"absmax": (np.abs(2.5 + 0.4 * _normal(g, 300)) * 0.02).astype(np.float32)},
             "300 constants: two nested blocks of 256"),
        Case({"absmax": np.array([0.5, 0.75, 1.25, 2.0], np.float32)}, "a few constants"),
        Case({"absmax": np.full(5, 0.125, np.float32)}, "all constants equal",
             "when every constant equals the mean, c = absmax − mean is all zeros: divide by "
             "max(nested_absmax, 1e-38) so 0/0 does not give NaN"),
    ]


def _compare_dq(expected, got, args):
    """offset, then nested_absmax (either being wrong explains wrong codes), then the codes, which
    may differ where the learner's own offset and nested absmax (each within float32 rounding of the
    reference) put a value on the other side of a midpoint."""
    d = compare(expected, got, _DQ_TASK)
    if d is None or not isinstance(got, (tuple, list)) or len(got) != 3:
        return d
    for i in (2, 1):
        d_i = compare(expected[i], got[i], _DQ_TASK, _DQ_TASK.output_names[i])
        if d_i is not None:
            return d_i
    if d.part != "codes" or d.kind != "values":        # a wrong shape or dtype is wrong however rounded
        return d
    codes, nested, offset = (np.asarray(v) for v in got)
    a = np.asarray(args["absmax"], dtype=np.float32)
    ok = np.zeros(codes.shape, bool)
    for dt in (np.float32, np.float64):                     # centred in float32 or in float64
        c = a.astype(dt) - dt(offset.reshape(-1)[0])
        scale = np.repeat(np.maximum(nested.astype(dt), dt(1e-38)), NESTED_BLOCKSIZE)[: c.size]
        ok |= codes == np.searchsorted(_DQ_MID, (c / scale).astype(np.float32), side="left")
    return None if ok.all() else d


def _dq_variant(kind):
    def f(absmax):
        a = np.asarray(absmax, dtype=np.float32)
        offset = np.float32(0) if kind == "no_offset" else np.float32(a.mean(dtype=np.float64))
        c = a - offset
        bs = c.size if kind == "one_block" else NESTED_BLOCKSIZE
        n_blocks = -(-c.size // bs)
        padded = np.zeros(n_blocks * bs, np.float32)
        padded[: c.size] = c
        blocks = padded.reshape(n_blocks, bs)                # (n_blocks, 256)
        nested = blocks.max(axis=1) if kind == "max" else np.abs(blocks).max(axis=1)
        s = (blocks / np.maximum(nested, np.float32(1e-38))[:, None]).reshape(-1)[: c.size]
        if kind == "uniform":
            codes = np.round((np.clip(s, -1, 1) + 1) * 127.5)
        else:
            codes = np.searchsorted(_DQ_MID, s, side="left")
        return (codes.astype(np.uint8), nested.astype(np.float32),
                np.float32(0) if kind == "offset_not_returned" else offset)
    return f


_DQ_TASK = register(Task(
    name="double_quantize_absmax",
    summary="QLoRA's double quantization: the absmax constants to 8 bits, minus their mean",
    signature="double_quantize_absmax(absmax) -> (codes, nested_absmax, offset)   # absmax float32 "
              "(n,); codes uint8 (n,), nested_absmax float32 (ceil(n/256),), offset float32",
    reference=_ref_double_quant,
    draw=_draw_dq,
    edge_cases=_edges_dq,
    mistakes=(
        Mistake("no_offset", "subtract the mean first: c = absmax − mean(absmax), and return that "
                "mean as offset. absmax values are all positive, so without centring only the positive "
                "half of the signed 8-bit map is used", _dq_variant("no_offset")),
        Mistake("offset_not_returned", "return the offset you subtracted (the mean of absmax): "
                "the reconstruction map[code]·nested_absmax + offset needs it",
                _dq_variant("offset_not_returned")),
        Mistake("one_block", "quantize the centred constants in blocks of 256, each with its own "
                "nested absmax: ceil(n / 256) of them", _dq_variant("one_block")),
        Mistake("max_not_absmax", "the nested absmax is the largest |c| in each block of 256 (c has "
                "both signs after centring), not the largest c", _dq_variant("max")),
        Mistake("uniform_levels", "use the nearest entry of the dynamic map DYNAMIC_MAP (ties to the "
                "lower index), not 256 evenly spaced levels", _dq_variant("uniform")),
    ),
    hint="offset = mean(absmax); c = absmax − offset; per block of 256: nested = max|c|, code = "
         "np.searchsorted(midpoints, c / nested, side='left') with midpoints of DYNAMIC_MAP",
    error_hint="DYNAMIC_MAP (from minilora.quant) holds the 256 float32 values in ascending order; pad "
               "c with zeros to a multiple of 256 to reshape it into blocks",
    output_names=("codes", "nested_absmax", "offset"),
    rtol=1e-6, atol=0.0,
    compare=lambda e, g, a: _compare_dq(e, g, a),
    minutes=15,
))


# ============================================================== 11. memory: full vs LoRA vs QLoRA
def _ref_memory(config, r, target_modules):
    tm = tuple(target_modules)
    return {m: memory_breakdown(config, m, r=r, target_modules=tm).total
            for m in ("full", "lora", "qlora")}


def _draw_memory(d):
    config = d.sampled_from([None, None, "llama-7b", "llama-13b", "llama-70b", "llama-65b"])
    return {"config": _draw_config(d) if config is None else PRESETS[config],
            "r": d.sampled_from([4, 8, 16, 64]), "target_modules": _draw_targets(d)}


def _edges_memory():
    return [
        Case({"config": PRESETS["llama-7b"], "r": 8, "target_modules": ["q_proj", "v_proj"]},
             "Llama-7B, r = 8 on q and v"),
        Case({"config": PRESETS["llama-65b"], "r": 64, "target_modules": list(LINEAR_MODULES)},
             "LLaMA-65B, r = 64 on every projection (the QLoRA paper's setting)"),
        Case({"config": LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=40,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    tie_word_embeddings=True),
              "r": 4, "target_modules": ["q_proj", "k_proj"]}, "a tiny model with tied embeddings"),
    ]


_NF4_DQ_BITS = nf4_bits_per_parameter(64, double_quant=True)   # 4 + 8/64 + 32/(64*256)


def _memory_variant(trainable=16, frozen=2, nf4_bits=_NF4_DQ_BITS, quantize_all=False):
    def f(config, r, target_modules):
        counts = count_parameters(config)
        n, linear = counts["total"], counts["linear"]
        n_lora = lora_parameters(config, r, tuple(target_modules))
        n_quant = n if quantize_all else linear
        return {"full": round(n * trainable),
                "lora": round(n * frozen + n_lora * trainable),
                "qlora": round(n_quant * nf4_bits / 8 + (n - n_quant) * 2 + n_lora * trainable)}
    return f


register(Task(
    name="memory_full_lora_qlora",
    summary="training memory in bytes: full fine-tuning vs LoRA vs QLoRA (no activations)",
    signature="memory_full_lora_qlora(config, r, target_modules) -> {'full': bytes, 'lora': bytes, "
              "'qlora': bytes}   # each an int",
    reference=_ref_memory,
    draw=_draw_memory,
    edge_cases=_edges_memory,
    mistakes=(
        Mistake("qlora_16bit_base", "QLoRA stores the frozen Linear weights in NF4: 4 bits plus "
                "0.127 bits of constants per weight, not 2 bytes", _memory_variant(nf4_bits=16)),
        Mistake("no_optimizer_state", "AdamW keeps two float32 moments (m and v) for every trainable "
                "parameter: 8 bytes more each", _memory_variant(trainable=8)),
        Mistake("no_master_weights", "mixed-precision training keeps a float32 master copy of every "
                "trainable weight: 4 bytes more each (2 + 2 + 4 + 8 = 16)", _memory_variant(trainable=12)),
        Mistake("quantized_everything", "embeddings, norms and lm_head stay in 16-bit under QLoRA: only "
                "the decoder's Linear weights (count_parameters(config)['linear']) are NF4",
                _memory_variant(quantize_all=True)),
        Mistake("no_quant_constants", "add the quantization constants: with blocksize 64 and double "
                "quantization they cost 8/64 + 32/(64·256) ≈ 0.127 bits per weight",
                _memory_variant(nf4_bits=4)),
        Mistake("single_quant_constants", "QLoRA double-quantizes the constants: 8/64 + 32/(64·256) ≈ "
                "0.127 bits per weight, not the 32/64 = 0.5 bits of float32 absmax",
                _memory_variant(nf4_bits=4.5)),
        Mistake("frozen_has_gradients", "the frozen base gets no gradient and no optimizer state: 2 "
                "bytes per base parameter", _memory_variant(frozen=4)),
    ),
    hint="trainable parameter: 16 bytes (2 weight + 2 gradient + 4 fp32 master + 8 AdamW); frozen: 2 "
         "bytes, or for QLoRA's Linear weights (4 + 8/64 + 32/(64·256)) / 8 bytes",
    error_hint="minilora.memory.count_parameters(config) gives 'total' and 'linear'; your "
               "count_lora_params gives the adapter",
    rtol=0.0, atol=2.0,   # whole bytes; the reference rounds each kind of memory separately
    minutes=15,
))
