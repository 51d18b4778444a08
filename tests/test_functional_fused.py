"""The fused ops of the Llama block against their composite twins: same values, same gradients.

Each fused op (linear, rms_norm, rotary_embedding, swiglu, scaled_dot_product_attention) has a
hand-written backward; its composite twin is built from primitives whose gradients are tested
elsewhere. Here: equality of outputs and gradients in float64 (to ~1e-12), a central-difference
gradcheck of the fused op, and the multi-threaded CPU path (``minilora.fast.parallel``) giving results
bit-identical to the single-threaded one.
"""
import numpy as np
import pytest

from minilora import Tensor, backend
from minilora.fast import parallel
from minilora import functional as F
from minilora.testing import gradcheck


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def grads_of(fn, arrays, seed=0):
    """(output, [grad of each input]) of fn on float64 leaves, with a random upstream gradient."""
    ts = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*ts)
    up = np.random.default_rng(seed + 99).standard_normal(out.shape)
    out.backward(up)
    return out.data, [t.grad for t in ts]


def assert_same(fused, composite, arrays, atol=1e-11):
    y1, g1 = grads_of(fused, arrays)
    y2, g2 = grads_of(composite, arrays)
    np.testing.assert_allclose(y1, y2, rtol=1e-10, atol=atol)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=atol)


def rope_tables(T, d, seed=0):
    ang = np.random.default_rng(seed).uniform(-4, 4, (T, d // 2))
    ang = np.concatenate([ang, ang], axis=-1)          # HF layout: concat(c, c)
    return np.cos(ang), np.sin(ang)


# ---------------------------------------------------------------- linear
def test_linear_matches_composite_and_gradcheck():
    x, w, b = rand(2, 3, 5, seed=1), rand(4, 5, seed=2), rand(4, seed=3)
    assert_same(lambda x, w, b: F.linear(x, w, b), lambda x, w, b: x @ w.T + b, [x, w, b])
    gradcheck(lambda x, w: F.linear(x, w), [x, w])


def test_linear_frozen_weight_gets_no_grad():
    x = Tensor(rand(2, 5), requires_grad=True)
    w = Tensor(rand(3, 5))
    F.linear(x, w).sum().backward()
    assert w.grad is None and x.grad is not None


def test_linear_shape_error():
    with pytest.raises(ValueError, match="features"):
        F.linear(Tensor(rand(2, 4)), Tensor(rand(3, 5)))


# ---------------------------------------------------------------- rms_norm
def rms_norm_composite(x, w, eps):
    return x / ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt() * w


def test_rms_norm_matches_composite_and_gradcheck():
    x, w = rand(2, 3, 6, seed=1), rand(6, seed=2)
    assert_same(lambda x, w: F.rms_norm(x, w, 1e-5), lambda x, w: rms_norm_composite(x, w, 1e-5),
                [x, w])
    gradcheck(lambda x, w: F.rms_norm(x, w, 1e-5), [x, w])
    gradcheck(lambda x: F.rms_norm(x, None, 1e-5), [x])


# ---------------------------------------------------------------- RoPE
@pytest.mark.parametrize("shape,table_axes", [((2, 5, 3, 8), (slice(None), None, slice(None))),
                                              ((2, 5, 2, 3, 4), (slice(None), None, None, slice(None)))])
def test_rope_matches_composite(shape, table_axes):
    cos, sin = rope_tables(shape[1], shape[-1])
    cos, sin = cos[table_axes], sin[table_axes]
    x = rand(*shape)
    assert_same(lambda x: F.rotary_embedding(x, cos, sin),
                lambda x: F.rotary_embedding_composite(x, cos, sin), [x])


def test_rope_gradcheck_and_backward_is_inverse_rotation():
    cos, sin = rope_tables(4, 6)
    cos, sin = cos[:, None, :], sin[:, None, :]
    x = rand(2, 4, 2, 6)
    gradcheck(lambda x: F.rotary_embedding(x, cos, sin), [x])
    # the backward applied to the output gives back the input: rotation by -theta undoes +theta
    t = Tensor(x.copy(), requires_grad=True)
    y = F.rotary_embedding(t, cos, sin)
    y.backward(y.data)
    np.testing.assert_allclose(t.grad, x, atol=1e-12)


def test_rope_keeps_norm_of_each_pair():
    cos, sin = rope_tables(3, 4)
    x = rand(1, 3, 1, 4)
    y = F.rotary_embedding(Tensor(x), cos[:, None, :], sin[:, None, :]).data
    pair = lambda a: a[..., :2] ** 2 + a[..., 2:] ** 2  # noqa: E731
    np.testing.assert_allclose(pair(y), pair(x), atol=1e-12)


# ---------------------------------------------------------------- SwiGLU
def test_swiglu_matches_composite_and_gradcheck():
    g, u = rand(3, 7, seed=1) * 3, rand(3, 7, seed=2)
    assert_same(lambda g, u: F.swiglu(g, u), lambda g, u: F.silu(g) * u, [g, u])
    gradcheck(lambda g, u: F.swiglu(g, u), [g, u])


def test_swiglu_no_overflow_for_large_negative_gate():
    g = Tensor(np.array([-1000.0, -80.0, 0.0, 80.0], dtype=np.float32), requires_grad=True)
    y = F.swiglu(g, Tensor(np.ones(4, dtype=np.float32)))
    y.sum().backward()
    assert np.isfinite(y.data).all() and np.isfinite(g.grad).all()


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_composite_gqa(causal):
    q = rand(2, 2, 3, 5, 4, seed=1)          # (B, G, R, T, D)
    k = rand(2, 2, 1, 5, 4, seed=2)          # shared by the R heads of a group
    v = rand(2, 2, 1, 5, 4, seed=3)
    assert_same(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal),
                lambda q, k, v: F.scaled_dot_product_attention_composite(q, k, v, causal=causal),
                [q, k, v])


def test_sdpa_kv_cache_alignment_and_masks():
    q = rand(2, 3, 2, 4, seed=1)             # 2 new queries ...
    k = rand(2, 3, 6, 4, seed=2)             # ... after 4 cached positions
    v = rand(2, 3, 6, 4, seed=3)
    keep = np.ones((2, 1, 1, 6), dtype=bool)
    keep[0, ..., :2] = False                 # left padding in batch row 0
    additive = np.where(keep, 0.0, -1e9)
    for mask in (keep, additive):
        assert_same(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                    lambda q, k, v: F.scaled_dot_product_attention_composite(q, k, v, attn_mask=mask),
                    [q, k, v])


@pytest.mark.parametrize("Tq,Tk", [(7, 7), (5, 9), (8, 8)])
def test_sdpa_causal_query_blocks_match_composite(monkeypatch, Tq, Tk):
    import minilora.functional as Fmod
    monkeypatch.setattr(Fmod, "MIN_QUERY_BLOCK", 2)
    assert len(Fmod._query_blocks(Tq, Tk, True)) > 1
    q = rand(2, 2, 2, Tq, 4, seed=1)         # GQA layout, with a KV-cache offset when Tk > Tq
    k = rand(2, 2, 1, Tk, 4, seed=2)
    v = rand(2, 2, 1, Tk, 4, seed=3)
    keep = np.ones((2, 1, 1, 1, Tk), dtype=bool)
    keep[1, ..., 1] = False                  # no query loses all its keys (that row would be NaN)
    for mask in (None, keep):
        assert_same(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                    lambda q, k, v: F.scaled_dot_product_attention_composite(q, k, v, attn_mask=mask),
                    [q, k, v])


def test_sdpa_gradcheck():
    q, k, v = rand(1, 2, 3, 4, seed=1), rand(1, 2, 3, 4, seed=2), rand(1, 2, 3, 4, seed=3)
    gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [q, k, v])


def test_sdpa_only_v_requires_grad():
    q, k = Tensor(rand(1, 2, 3, 4, seed=1)), Tensor(rand(1, 2, 3, 4, seed=2))
    v = Tensor(rand(1, 2, 3, 4, seed=3), requires_grad=True)
    F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert v.grad is not None and q.grad is None and k.grad is None


# ---------------------------------------------------------------- threads
def _all_fused(arrays):
    x, w, g, u, q, k, v, cos, sin = arrays
    leaf = lambda a: Tensor(a.copy(), requires_grad=True)  # noqa: E731
    cases = [(F.rms_norm, [leaf(x), leaf(w)], {"eps": 1e-5}), (F.swiglu, [leaf(g), leaf(u)], {}),
             (lambda a: F.rotary_embedding(a, cos, sin), [leaf(q)], {}),
             (F.scaled_dot_product_attention, [leaf(q), leaf(k), leaf(v)], {})]
    res = []
    for fn, inputs, kw in cases:
        o = fn(*inputs, **kw)
        o.backward(np.ones(o.shape, dtype=np.float32))
        res.append(o.data)
        res.extend(t.grad for t in inputs)
    assert all(r is not None for r in res)
    return res


def test_threaded_kernels_are_bit_identical(monkeypatch):
    if backend.get_device() != "cpu":
        pytest.skip("the thread split is a CPU path")
    r = np.random.default_rng(0)
    f32 = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    cos, sin = rope_tables(6, 8)
    arrays = [f32(4, 6, 16), f32(16), f32(4, 6, 16), f32(4, 6, 16), f32(4, 2, 6, 8), f32(4, 2, 6, 8),
              f32(4, 2, 6, 8), cos[:, :].astype(np.float32), sin.astype(np.float32)]
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMENTS", 0)
    monkeypatch.setenv("MINILORA_NUM_THREADS", "1")
    single = _all_fused(arrays)
    monkeypatch.setenv("MINILORA_NUM_THREADS", "3")
    assert len(parallel.split_rows(4, 10**6, np)) == 3
    threaded = _all_fused(arrays)
    for a, b in zip(single, threaded):
        np.testing.assert_array_equal(a, b)


def test_num_threads_env(monkeypatch):
    monkeypatch.setenv("MINILORA_NUM_THREADS", "x")
    with pytest.raises(ValueError, match="MINILORA_NUM_THREADS"):
        parallel.num_threads()


def test_parallel_matmul_matches_numpy(monkeypatch):
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    monkeypatch.setattr(parallel, "MIN_PARALLEL_MACS", 0)
    r = np.random.default_rng(0)
    a = r.standard_normal((37, 20)).astype(np.float32)
    b = r.standard_normal((20, 11)).astype(np.float32)
    np.testing.assert_allclose(parallel.matmul(a, b), a @ b, rtol=1e-5, atol=1e-5)
    g = r.standard_normal((37, 11)).astype(np.float32)
    np.testing.assert_allclose(parallel.matmul(g.T, a), g.T @ a, rtol=1e-5, atol=1e-5)  # strided rows
    out = np.empty((37, 11), dtype=np.float32)
    assert parallel.matmul(a, b, out=out) is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)


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
