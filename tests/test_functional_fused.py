"""Two paths, one meaning for ``functional``: each fast twin against its reference composite.

The references are the functions of ``minilora/functional.py`` run inside ``minilora.reference()``
(composites of primitives whose gradients are tested in tests/test_autograd.py); the twins are the
functions of ``minilora/fast/functional.py`` and ``fast/attention.py``, called directly so that the
comparison means something in either mode. Here:

* every twin equals its reference, output and every input's gradient, in float64 and float32, on
  hypothesis-drawn shapes (broadcast leading axes, grouped-query heads, KV-cache offsets, masks,
  several attention query blocks);
* every reference passes a float64 central-difference gradcheck;
* inside ``minilora.reference()`` ``F`` builds the composite graph and never calls a twin;
* the threaded CPU path gives results bit-identical to the single-threaded one, and the thread
  settings are read from ``minilora.settings``.

Tolerances, from float32 (and float64) rounding: u = 2^-24 (2^-53). Each output element of either
path is a chain of at most S = 10 rounded operations, one of which may be a sum of K terms (K the
longest reduction: the row length, the head dim, or the keys); in any order such a sum is off by at
most K u times the sum of the terms' magnitudes, and each other operation adds u relative. With
inputs of order one and well-conditioned ops, the terms are bounded by the largest entry of the
array they produce (or 1), so each path is within (K + S) u * scale of the exact value and the two
within twice that; a factor 4 covers the second-order terms: tol = 8 (K + S) u * scale, scale =
max(1, max |reference|). A wrong formula (a sign, a missing factor) is off by order one.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora
from minilora import Tensor, backend, settings
from minilora import functional as F
from minilora.fast import attention as fast_attention
from minilora.fast import functional as fast_functional
from minilora.fast import parallel
from minilora.testing import gradcheck

DTYPES = [np.float64, np.float32]
STAGES = 10
seeds = st.integers(0, 2**16)


def rand(*shape, seed=0, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def tolerance(dtype, K: int, reference) -> float:
    """8 (K + S) u * max(1, max|reference|): the bound derived in the module docstring."""
    u = 2.0 ** -53 if np.dtype(dtype) == np.float64 else 2.0 ** -24
    scale = max(1.0, float(np.nanmax(np.abs(reference))) if np.size(reference) else 1.0)
    return 8 * (K + STAGES) * u * scale


def op_name(t: Tensor) -> str:
    """The name of the op that made ``t`` (the graph printer's label)."""
    return t._op


def grads_of(fn, arrays, dtype, reference: bool, seed=0):
    """(output, [grad of each input]) of fn on leaves of ``dtype``, with a random upstream gradient,
    inside ``minilora.reference()`` when ``reference``."""
    ts = [Tensor(np.asarray(a, dtype=dtype).copy(), requires_grad=True) for a in arrays]
    with minilora.reference(reference):
        out = fn(*ts)
        up = np.random.default_rng(seed + 99).standard_normal(out.shape).astype(dtype)
        out.backward(up)
    assert out.dtype == dtype
    return out.data, [t.grad for t in ts]


def assert_twin_equals_reference(twin, reference, arrays, dtype, K):
    """The twin's output and gradients equal the reference's within ``tolerance``."""
    y1, g1 = grads_of(twin, arrays, dtype, reference=False)
    y2, g2 = grads_of(reference, arrays, dtype, reference=True)
    np.testing.assert_allclose(y1, y2, rtol=0, atol=tolerance(dtype, K, y2), err_msg="output")
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert a is not None and b is not None, f"input {i} got no gradient"
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance(dtype, K, b), err_msg=f"input {i}")


def rope_tables(T, d, seed=0):
    ang = np.random.default_rng(seed).uniform(-4, 4, (T, d // 2))
    ang = np.concatenate([ang, ang], axis=-1)          # HF layout: concat(c, c)
    return np.cos(ang), np.sin(ang)


lead_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


# ---------------------------------------------------------------- twin == reference
@pytest.mark.fast_path
@pytest.mark.parametrize("dtype", DTYPES)
@given(lead=lead_shapes, n_in=st.integers(1, 9), n_out=st.integers(1, 7), bias=st.booleans(),
       seed=seeds)
def test_linear_twin(dtype, lead, n_in, n_out, bias, seed):
    arrays = [rand(*lead, n_in, seed=seed), rand(n_out, n_in, seed=seed + 1)]
    if bias:
        arrays.append(rand(n_out, seed=seed + 2))
    assert_twin_equals_reference(fast_functional.linear, F.linear, arrays, dtype, K=n_in)


@pytest.mark.fast_path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@given(lead=lead_shapes, c=st.integers(1, 17), axis_last=st.booleans(), seed=seeds)
def test_softmax_family_twin(dtype, op, lead, c, axis_last, seed):
    x = rand(*lead, c, seed=seed, scale=4.0)
    axis = -1 if axis_last or not lead else 0
    K = x.shape[axis]
    assert_twin_equals_reference(lambda a: getattr(fast_functional, op)(a, axis),
                                 lambda a: getattr(F, op)(a, axis), [x], dtype, K=K)


@pytest.mark.fast_path
@pytest.mark.parametrize("dtype", DTYPES)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple), c=st.integers(1, 13),
       reduction=st.sampled_from(["mean", "sum"]), seed=seeds)
def test_cross_entropy_twin(dtype, lead, c, reduction, seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, c, size=lead)
    t.reshape(-1)[0] = -100                            # an ignored position
    if reduction == "mean" and (t != -100).sum() == 0:
        t.reshape(-1)[-1] = 0                          # a mean over no position is NaN: tested below
    x = rand(*lead, c, seed=seed, scale=3.0)
    xp_t = np.asarray(t)
    assert_twin_equals_reference(
        lambda z: fast_functional.cross_entropy(z, xp_t, -100, reduction),
        lambda z: F.cross_entropy(z, t, reduction=reduction), [x], dtype, K=max(c, t.size))


@pytest.mark.fast_path
@pytest.mark.parametrize("dtype", DTYPES)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple), c=st.integers(1, 9),
       v=st.integers(1, 13), chunk=st.integers(1, 5), ignored=st.integers(0, 3),
       reduction=st.sampled_from(["mean", "sum"]), seed=seeds)
def test_linear_cross_entropy_twin(dtype, lead, c, v, chunk, ignored, reduction, seed):
    """The chunked head + loss equals cross_entropy(linear(x, W), t): loss, dL/dx (zero on ignored
    rows) and dL/dW, for any chunk size (one row, a part, more than all)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, v, size=lead)
    t.reshape(-1)[:ignored] = -100                      # ignored positions are skipped by the twin
    if reduction == "mean" and (t != -100).sum() == 0:
        t.reshape(-1)[-1] = 0                          # a mean over no position is NaN: tested below
    arrays = [rand(*lead, c, seed=seed), rand(v, c, seed=seed + 1)]
    # the longest sums: a logit (c terms), the softmax's normaliser (v), dW over the rows (t.size)
    assert_twin_equals_reference(
        lambda x, w: fast_functional.linear_cross_entropy(x, w, t, -100, reduction, chunk_rows=chunk),
        lambda x, w: F.linear_cross_entropy(x, w, t, reduction=reduction), arrays, dtype,
        K=max(c, v, t.size))


@pytest.mark.fast_path
def test_linear_cross_entropy_threads_frozen_weight_and_no_grad(monkeypatch):
    """Chunks shared among threads give the reference's values; a frozen W gets no gradient and
    costs no dW; under no_grad nothing is kept for a backward."""
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    monkeypatch.setattr(settings, "MIN_PARALLEL_ELEMENTS", 0)
    assert len(parallel.split_rows(7, 10**6, np)) == 2
    t = np.random.default_rng(1).integers(0, 11, size=(3, 7))
    t[1, 2] = -100
    x, w = rand(3, 7, 5, seed=2), rand(11, 5, seed=3)
    twin = lambda a, b: fast_functional.linear_cross_entropy(a, b, t, chunk_rows=3)  # noqa: E731
    assert_twin_equals_reference(twin, lambda a, b: F.linear_cross_entropy(a, b, t), [x, w],
                                 np.float32, K=21)
    xt, wt = Tensor(x.astype(np.float32), requires_grad=True), Tensor(w.astype(np.float32))
    twin(xt, wt).backward()
    assert wt.grad is None and xt.grad is not None and (xt.grad[1, 2] == 0).all()
    with minilora.no_grad():
        out = twin(Tensor(x, requires_grad=True), Tensor(w, requires_grad=True))
    assert not out.requires_grad and out._backward is None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 / 0: a mean over no position
def test_linear_cross_entropy_errors_and_mean_over_nothing():
    x, w = Tensor(rand(2, 3, 4), requires_grad=True), Tensor(rand(6, 4))
    for reference in (False, True):
        with minilora.reference(reference):
            assert np.isnan(F.linear_cross_entropy(x, w, np.full((2, 3), -100)).item())
            with pytest.raises(ValueError, match="outside \\[0, 6\\)"):
                F.linear_cross_entropy(x, w, np.full((2, 3), 6))
            with pytest.raises(ValueError, match="targets shape"):
                F.linear_cross_entropy(x, w, np.zeros((3, 2), dtype=int))
            with pytest.raises(ValueError, match="input has 4 features but the weight expects 5"):
                F.linear_cross_entropy(x, Tensor(rand(6, 5)), np.zeros((2, 3), dtype=int))


@pytest.mark.fast_path
@pytest.mark.parametrize("dtype", DTYPES)
@given(lead=lead_shapes, c=st.integers(1, 17), weight=st.booleans(), seed=seeds)
def test_rms_norm_twin(dtype, lead, c, weight, seed):
    arrays = [rand(*lead, c, seed=seed)] + ([rand(c, seed=seed + 1)] if weight else [])
    assert_twin_equals_reference(lambda x, *w: fast_functional.rms_norm(x, *w, eps=1e-5),
                                 lambda x, *w: F.rms_norm(x, *w, eps=1e-5), arrays, dtype, K=c)


@pytest.mark.fast_path
@pytest.mark.parametrize("dtype", DTYPES)
@given(lead=lead_shapes, c=st.integers(2, 17), affine=st.booleans(), seed=seeds)
def test_layer_norm_twin(dtype, lead, c, affine, seed):
    arrays = [rand(*lead, c, seed=seed)]
    if affine:
        arrays += [rand(c, seed=seed + 1), rand(c, seed=seed + 2)]
    assert_twin_equals_reference(lambda x, *wb: fast_functional.layer_norm(x, *wb, eps=1e-5),
                                 lambda x, *wb: F.layer_norm(x, *wb, eps=1e-5), arrays, dtype, K=c)


@pytest.mark.fast_path
@pytest.mark.parametrize("dtype", DTYPES)
@given(b=st.integers(1, 3), t=st.integers(1, 5), heads=st.lists(st.integers(1, 3), min_size=1,
                                                                   max_size=2).map(tuple),
       half=st.integers(1, 4), seed=seeds)
def test_rope_twin(dtype, b, t, heads, half, seed):
    d = 2 * half
    cos, sin = rope_tables(t, d, seed)
    table_axes = (slice(None),) + (None,) * len(heads) + (slice(None),)   # (T, 1, ..., d)
    cos, sin = cos[table_axes], sin[table_axes]
    x = rand(b, t, *heads, d, seed=seed + 1)
    assert_twin_equals_reference(lambda a: fast_functional.rotary_embedding(a, cos, sin),
                                 lambda a: F.rotary_embedding(a, cos, sin), [x], dtype, K=2)


@pytest.mark.fast_path
@pytest.mark.parametrize("dtype", DTYPES)
@given(lead=lead_shapes, d=st.integers(1, 9), seed=seeds)
def test_swiglu_twin(dtype, lead, d, seed):
    arrays = [rand(*lead, d, seed=seed, scale=3.0), rand(*lead, d, seed=seed + 1)]
    assert_twin_equals_reference(fast_functional.swiglu, F.swiglu, arrays, dtype, K=1)


@pytest.mark.fast_path
@pytest.mark.parametrize("dtype", DTYPES)
@given(b=st.integers(1, 2), g=st.integers(1, 2), r=st.integers(1, 3), tq=st.integers(1, 9),
       offset=st.integers(0, 3), d=st.integers(1, 5), causal=st.booleans(),
       mask=st.sampled_from([None, "bool", "additive"]), block=st.sampled_from([1, 2, 64]),
       seed=seeds)
def test_attention_twin(dtype, b, g, r, tq, offset, d, causal, mask, block, seed):
    """Grouped-query layout (k, v shared by r query heads), a KV-cache offset (Tk > Tq), padding
    masks, and query blocks as small as one row (settings.MIN_QUERY_BLOCK)."""
    tk = tq + offset
    q = rand(b, g, r, tq, d, seed=seed)
    k = rand(b, g, 1, tk, d, seed=seed + 1)
    v = rand(b, g, 1, tk, d, seed=seed + 2)
    attn_mask = None
    if mask is not None:
        keep = np.ones((b, 1, 1, 1, tk), dtype=bool)
        keep[0, ..., -1] = tk == 1      # hide the last key: every query still sees key 0
        attn_mask = keep if mask == "bool" else np.where(keep, 0.0, -1e9)
    old = settings.MIN_QUERY_BLOCK
    settings.MIN_QUERY_BLOCK = block
    try:
        assert_twin_equals_reference(
            lambda q, k, v: fast_attention.scaled_dot_product_attention(q, k, v, causal, attn_mask),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal, attn_mask),
            [q, k, v], dtype, K=max(tk, d) + tq * r)
    finally:
        settings.MIN_QUERY_BLOCK = old


@pytest.mark.fast_path
def test_query_blocks_follow_the_setting(monkeypatch):
    monkeypatch.setattr(settings, "MIN_QUERY_BLOCK", 2)
    assert len(fast_attention._query_blocks(8, 8, True)) == 4
    monkeypatch.setattr(settings, "MIN_QUERY_BLOCK", 64)
    assert len(fast_attention._query_blocks(8, 8, True)) == 1
    assert len(fast_attention._query_blocks(8, 8, False)) == 1   # no mask: nothing to skip


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 / 0: a mean over no position
def test_cross_entropy_mean_over_nothing_is_nan_on_both_paths():
    """As PyTorch: the loss is NaN (0 / 0) but no logit affected it, so the gradient is 0, on the
    reference, the fast twin and the fused head + loss alike."""
    z = rand(2, 3, 4)
    t = np.full((2, 3), -100)
    for reference in (False, True):
        zt = Tensor(z.copy(), requires_grad=True)
        x, w = Tensor(rand(2, 3, 5), requires_grad=True), Tensor(rand(4, 5), requires_grad=True)
        with minilora.reference(reference):
            loss = F.cross_entropy(zt, t)
            loss.backward()
            head_loss = F.linear_cross_entropy(x, w, t)
            head_loss.backward()
        assert np.isnan(loss.item()) and np.isnan(head_loss.item())
        assert (zt.grad == 0).all(), f"reference={reference}: {zt.grad}"
        assert (x.grad == 0).all() and (w.grad == 0).all(), f"reference={reference}"


# ---------------------------------------------------------------- the references, gradchecked
REFERENCE_CASES = {
    "linear": (lambda x, w, b: F.linear(x, w, b), [rand(2, 3, 5), rand(4, 5, seed=1), rand(4, seed=2)]),
    "relu": (F.relu, [rand(3, 4) + 0.05]),             # away from the kink at 0
    "silu": (F.silu, [rand(3, 4, scale=3.0)]),
    "gelu": (F.gelu, [rand(3, 4, scale=2.0)]),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), [rand(3, 4, scale=2.0)]),
    "softmax": (lambda x: F.softmax(x, axis=-1), [rand(2, 3, 5, scale=3.0)]),
    "softmax_axis0": (lambda x: F.softmax(x, axis=0), [rand(3, 4)]),
    "log_softmax": (lambda x: F.log_softmax(x, axis=-1), [rand(2, 3, 5, scale=3.0)]),
    "cross_entropy": (lambda z: F.cross_entropy(z, np.array([[1, -100, 4], [0, 2, 3]])),
                      [rand(2, 3, 5, scale=2.0)]),
    "cross_entropy_sum": (lambda z: F.cross_entropy(z, np.array([2, 0, -100]), reduction="sum"),
                          [rand(3, 4)]),
    "linear_cross_entropy": (lambda x, w: F.linear_cross_entropy(x, w, np.array([[1, -100, 4],
                                                                                 [0, 2, 3]])),
                             [rand(2, 3, 4), rand(5, 4, seed=1)]),
    "rms_norm": (lambda x, w: F.rms_norm(x, w, 1e-5), [rand(2, 3, 6), rand(6, seed=1)]),
    "rms_norm_no_weight": (lambda x: F.rms_norm(x, None, 1e-5), [rand(2, 6)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), [rand(2, 3, 6), rand(6, seed=1),
                                                           rand(6, seed=2)]),
    "rotary_embedding": (lambda x: F.rotary_embedding(x, *[t[:, None, :] for t in rope_tables(4, 6)]),
                         [rand(2, 4, 2, 6)]),
    "swiglu": (F.swiglu, [rand(3, 7, scale=3.0), rand(3, 7, seed=1)]),
    "attention_causal_gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                             [rand(1, 2, 2, 3, 4), rand(1, 2, 1, 5, 4, seed=1),
                              rand(1, 2, 1, 5, 4, seed=2)]),
    "attention_masked": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, causal=False, attn_mask=np.array([True, False, True])),
        [rand(2, 3, 4), rand(2, 3, 4, seed=1), rand(2, 3, 4, seed=2)]),
    "stack_split": (lambda a, b: F.stack([a, b], axis=1) * F.split(a, [1, 3], axis=-1)[1].sum(),
                    [rand(3, 4), rand(3, 4, seed=1)]),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_CASES))
def test_reference_gradcheck(name):
    fn, arrays = REFERENCE_CASES[name]
    with minilora.reference():
        gradcheck(fn, arrays)


# ---------------------------------------------------------------- reference mode builds composites
@pytest.mark.parametrize("op", ["rms_norm", "softmax", "cross_entropy", "attention"])
def test_reference_mode_builds_the_composite(monkeypatch, op):
    """Inside ``minilora.reference()`` no twin is called (they are replaced by functions that raise)
    and the result is a composite's last node, not the fused node; outside, the fused node."""
    x = Tensor(rand(2, 3, 4), requires_grad=True)
    calls = {
        "rms_norm": (lambda: F.rms_norm(x, None), "rms_norm"),
        "softmax": (lambda: F.softmax(x), "softmax"),
        "cross_entropy": (lambda: F.cross_entropy(x, np.array([[0, 1, 2], [3, -100, 1]])),
                          "cross_entropy"),
        "attention": (lambda: F.scaled_dot_product_attention(x, x, x), "sdpa"),
    }
    call, fused_op = calls[op]
    with minilora.reference(False):
        assert op_name(call()) == fused_op                       # the fast path: one fused node

    def twin_called(*args, **kwargs):
        raise AssertionError("a fast twin ran inside minilora.reference()")
    for module in (fast_functional, fast_attention):
        for name in module.__all__:
            monkeypatch.setattr(module, name, twin_called)
    with minilora.reference():
        out = call()
        out.backward(np.ones(out.shape))
    assert op_name(out) != fused_op and op_name(out) in ("/", "@")
    assert x.grad is not None and np.isfinite(x.grad).all()


# ---------------------------------------------------------------- the fused ops' own properties
def test_linear_frozen_weight_gets_no_grad():
    x = Tensor(rand(2, 5), requires_grad=True)
    w = Tensor(rand(3, 5))
    F.linear(x, w).sum().backward()
    assert w.grad is None and x.grad is not None


@pytest.mark.parametrize("reference", [False, True])
def test_linear_shape_error(reference):
    with minilora.reference(reference), pytest.raises(ValueError, match="features"):
        F.linear(Tensor(rand(2, 4)), Tensor(rand(3, 5)))


def test_fused_gradchecks():
    """The twins' hand-written backwards against central differences (float64)."""
    x, w = rand(2, 3, 6, seed=1), rand(6, seed=2)
    gradcheck(lambda x, w: fast_functional.rms_norm(x, w, 1e-5), [x, w])
    gradcheck(lambda x, w, b: fast_functional.layer_norm(x, w, b), [x, w, rand(6, seed=3)])
    gradcheck(lambda g, u: fast_functional.swiglu(g, u), [rand(3, 7, seed=1) * 3, rand(3, 7, seed=2)])
    gradcheck(lambda a, b: fast_functional.linear(a, b), [x, rand(4, 6, seed=4)])
    q, k, v = rand(1, 2, 3, 4, seed=1), rand(1, 2, 3, 4, seed=2), rand(1, 2, 3, 4, seed=3)
    gradcheck(lambda q, k, v: fast_attention.scaled_dot_product_attention(q, k, v), [q, k, v])


def test_rope_gradcheck_and_backward_is_inverse_rotation():
    cos, sin = rope_tables(4, 6)
    cos, sin = cos[:, None, :], sin[:, None, :]
    x = rand(2, 4, 2, 6)
    gradcheck(lambda x: fast_functional.rotary_embedding(x, cos, sin), [x])
    # the backward applied to the output gives back the input: rotation by -theta undoes +theta
    t = Tensor(x.copy(), requires_grad=True)
    y = fast_functional.rotary_embedding(t, cos, sin)
    y.backward(y.data)
    np.testing.assert_allclose(t.grad, x, atol=1e-12)


@pytest.mark.parametrize("reference", [False, True])
def test_rope_keeps_norm_of_each_pair(reference):
    cos, sin = rope_tables(3, 4)
    x = rand(1, 3, 1, 4)
    with minilora.reference(reference):
        y = F.rotary_embedding(Tensor(x), cos[:, None, :], sin[:, None, :]).data
    pair = lambda a: a[..., :2] ** 2 + a[..., 2:] ** 2  # noqa: E731
    np.testing.assert_allclose(pair(y), pair(x), atol=1e-12)


@pytest.mark.parametrize("reference", [False, True])
def test_swiglu_no_overflow_for_large_negative_gate(reference):
    g = Tensor(np.array([-1000.0, -80.0, 0.0, 80.0], dtype=np.float32), requires_grad=True)
    with minilora.reference(reference):
        y = F.swiglu(g, Tensor(np.ones(4, dtype=np.float32)))
        y.sum().backward()
    assert np.isfinite(y.data).all() and np.isfinite(g.grad).all()


def test_sdpa_only_v_requires_grad():
    q, k = Tensor(rand(1, 2, 3, 4, seed=1)), Tensor(rand(1, 2, 3, 4, seed=2))
    v = Tensor(rand(1, 2, 3, 4, seed=3), requires_grad=True)
    F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert v.grad is not None and q.grad is None and k.grad is None


# ---------------------------------------------------------------- PyTorch, both paths
@pytest.mark.parametrize("reference", [False, True])
def test_both_paths_match_pytorch(reference):
    """RoPE (Hugging Face's apply_rotary_pos_emb written in torch), SwiGLU and RMSNorm, float64."""
    torch = pytest.importorskip("torch", reason="the interop extra (torch) is not installed")
    TF = torch.nn.functional
    cos, sin = rope_tables(4, 6)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def torch_rope(x):
        h = x.shape[-1] // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
        return x * torch.tensor(cos) + rot * torch.tensor(sin)
    cases = [(lambda x: F.rotary_embedding(x, cos, sin), torch_rope, [rand(2, 4, 3, 6)]),
             (F.swiglu, lambda g, u: TF.silu(g) * u, [rand(3, 5, scale=3.0), rand(3, 5, seed=1)]),
             (lambda x, w: F.rms_norm(x, w, 1e-5), lambda x, w: TF.rms_norm(x, (6,), w, eps=1e-5),
              [rand(2, 3, 6), rand(6, seed=1)])]
    for ml_fn, torch_fn, arrays in cases:
        y, grads = grads_of(ml_fn, arrays, np.float64, reference)
        tt = [torch.tensor(a, requires_grad=True) for a in arrays]
        out = torch_fn(*tt)
        out.backward(torch.tensor(np.random.default_rng(99).standard_normal(out.shape)))
        np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-12, atol=1e-12)
        for a, t in zip(grads, tt):
            np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------- threads
def _all_fused(arrays):
    x, w, g, u, q, k, v, cos, sin = arrays
    leaf = lambda a: Tensor(a.copy(), requires_grad=True)  # noqa: E731
    cases = [(fast_functional.rms_norm, [leaf(x), leaf(w)], {"eps": 1e-5}),
             (fast_functional.swiglu, [leaf(g), leaf(u)], {}),
             (lambda a: fast_functional.rotary_embedding(a, cos, sin), [leaf(q)], {}),
             (fast_attention.scaled_dot_product_attention, [leaf(q), leaf(k), leaf(v)], {})]
    res = []
    for fn, inputs, kw in cases:
        o = fn(*inputs, **kw)
        o.backward(np.ones(o.shape, dtype=np.float32))
        res.append(o.data)
        res.extend(t.grad for t in inputs)
    assert all(r is not None for r in res)
    return res


@pytest.mark.fast_path
def test_threaded_kernels_are_bit_identical(monkeypatch):
    if backend.get_device() != "cpu":
        pytest.skip("the thread split is a CPU path")
    r = np.random.default_rng(0)
    f32 = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    cos, sin = rope_tables(6, 8)
    arrays = [f32(4, 6, 16), f32(16), f32(4, 6, 16), f32(4, 6, 16), f32(4, 2, 6, 8), f32(4, 2, 6, 8),
              f32(4, 2, 6, 8), cos.astype(np.float32), sin.astype(np.float32)]
    monkeypatch.setattr(settings, "MIN_PARALLEL_ELEMENTS", 0)
    monkeypatch.setenv("MINILORA_NUM_THREADS", "1")
    single = _all_fused(arrays)
    monkeypatch.setenv("MINILORA_NUM_THREADS", "3")
    assert len(parallel.split_rows(4, 10**6, np)) == 3
    threaded = _all_fused(arrays)
    for a, b in zip(single, threaded):
        np.testing.assert_array_equal(a, b)


def test_num_threads_env(monkeypatch):
    monkeypatch.setenv("MINILORA_NUM_THREADS", "x")
    with minilora.reference(False), pytest.raises(ValueError, match="MINILORA_NUM_THREADS"):
        parallel.num_threads()


def test_num_threads_reads_settings_and_is_one_in_reference_mode(monkeypatch):
    monkeypatch.delenv("MINILORA_NUM_THREADS", raising=False)
    monkeypatch.setattr(parallel, "_CPU_COUNT", 8)
    monkeypatch.setattr(settings, "DEFAULT_MAX_THREADS", 3)
    with minilora.reference(False):
        assert parallel.num_threads() == 3
    monkeypatch.setenv("MINILORA_NUM_THREADS", "4")
    with minilora.reference():
        assert parallel.num_threads() == 1
        assert parallel.split_rows(100, 10**9, np) == [slice(None)]


@pytest.mark.fast_path
def test_parallel_matmul_matches_numpy(monkeypatch):
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    monkeypatch.setattr(settings, "MIN_PARALLEL_MACS", 0)
    assert len(parallel.split_rows(37, 1, np, settings.MIN_PARALLEL_MACS)) == 2
    r = np.random.default_rng(0)
    a = r.standard_normal((37, 20)).astype(np.float32)
    b = r.standard_normal((20, 11)).astype(np.float32)
    # each row of a @ b is a 20-term sum: tol 8 (K + S) u of the largest |term sum| (module docstring)
    tol = tolerance(np.float32, 20, np.abs(a) @ np.abs(b))
    np.testing.assert_allclose(parallel.matmul(a, b), a @ b, rtol=0, atol=tol)
    g = r.standard_normal((37, 11)).astype(np.float32)
    tol_t = tolerance(np.float32, 37, np.abs(g.T) @ np.abs(a))
    np.testing.assert_allclose(parallel.matmul(g.T, a), g.T @ a, rtol=0, atol=tol_t)  # strided rows
    out = np.empty((37, 11), dtype=np.float32)
    assert parallel.matmul(a, b, out=out) is out
    np.testing.assert_allclose(out, a @ b, rtol=0, atol=tol)


def test_blas_hold_inside_another_costs_no_library_call(monkeypatch):
    """BLAS's thread count is process-wide: a block opened (in any thread) while another is open
    finds it at one already and must neither query, set nor restore it; the outer block restores it."""
    import threading
    libs = parallel._blas_libs()
    if not libs:
        pytest.skip("threadpoolctl found no BLAS to hold")
    queries = []
    monkeypatch.setattr(parallel, "_blas_libs", lambda: queries.append(1) or libs)
    before = [lib.num_threads for lib in libs]
    calls = []
    for lib in libs:
        orig = lib.set_num_threads
        lib.set_num_threads = lambda n, orig=orig: (calls.append(n), orig(n))[1]
    try:
        with parallel.blas_single_thread():
            assert all(lib.num_threads == 1 for lib in libs)
            n_calls = len(calls)
            seen = []

            def other_thread():
                with parallel.blas_single_thread():
                    seen.append([lib.num_threads for lib in libs])
            t = threading.Thread(target=other_thread)
            t.start()
            t.join(5)
            with parallel.blas_single_thread():
                seen.append([lib.num_threads for lib in libs])
            assert seen == [[1] * len(libs)] * 2
            assert calls[n_calls:] == [] and len(queries) == 1   # the inner blocks left BLAS alone
        assert calls[n_calls:] == [n for n in before if n != 1]   # restored once, by the outer block
    finally:
        for lib in libs:
            del lib.set_num_threads
    assert [lib.num_threads for lib in libs] == before
    assert parallel._blas_holds == 0
