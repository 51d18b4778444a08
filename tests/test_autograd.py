"""Every autograd op, gradient-checked by central differences in float64 on hypothesis-drawn shapes.

Values come from a NumPy generator seeded by hypothesis (fast and shrinkable); shapes come from
hypothesis directly, broadcasting pairs included. Upstream gradients are random (see gradcheck).
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

import minilora as ml
from minilora import functional as F
from minilora import backend
from minilora.testing import GradcheckError, gradcheck

small_shapes = array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4)
seeds = st.integers(0, 2**16)


def rand(shape, seed, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape)


def positive(shape, seed):
    return rand(shape, seed, 0.5, 3.0)


# ---------------------------------------------------------------- binary ops, broadcasting
binary = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": lambda a, b: a ** b,
    "maximum": lambda a, b: ml.ops.maximum(a, b),
}


@pytest.mark.parametrize("op", list(binary))
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=3), seed=seeds)
def test_binary_ops_broadcast(op, shapes, seed):
    sa, sb = shapes.input_shapes
    a = positive(sa, seed) if op in ("pow",) else rand(sa, seed)
    b = positive(sb, seed + 1) if op in ("div",) else rand(sb, seed + 1)
    # maximum's kink at a == b has probability ~0 for continuous random values
    gradcheck(binary[op], [a, b])


def test_broadcast_both_ways_example():
    """(5,1,4,1) with (3,1,6) give (5,3,4,6): both inputs are stretched along their size-1 axes, and
    the second also gets a new leading axis, so unbroadcast must sum over both kinds."""
    gradcheck(lambda a, b: a * b + a, [rand((5, 1, 4, 1), 1), rand((3, 1, 6), 2)])


def test_node_reuse_accumulates():
    gradcheck(lambda x: (x + x) * x, [rand((3, 4), 0)])
    x = ml.Tensor(np.array([2.0, 3.0]), requires_grad=True)
    ((x + x) * x).sum().backward()
    np.testing.assert_allclose(x.grad, 4 * np.array([2.0, 3.0]))  # d(2x^2)/dx = 4x


@pytest.mark.parametrize("scalar", [2.0, 3, 0.5, -1.0])
def test_pow_scalar(scalar):
    gradcheck(lambda a: a ** scalar, [positive((3, 2), 0)])


def test_scalars_on_either_side():
    gradcheck(lambda a: 2.0 - a * 3 + 1 / a, [positive((4,), 0)])
    gradcheck(lambda a: 2.0 ** a, [rand((4,), 0)])


# ---------------------------------------------------------------- unary ops
unary = {
    "neg": (lambda a: -a, rand),
    "exp": (lambda a: a.exp(), rand),
    "log": (lambda a: a.log(), positive),
    "sqrt": (lambda a: a.sqrt(), positive),
    "tanh": (lambda a: a.tanh(), rand),
    "sigmoid": (lambda a: a.sigmoid(), rand),
    "erf": (lambda a: F.erf(a), rand),
    "silu": (lambda a: F.silu(a), rand),
    "gelu": (lambda a: F.gelu(a), rand),
    "gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), rand),
    "relu": (lambda a: F.relu(a), rand),
}


@pytest.mark.parametrize("op", list(unary))
@given(shape=small_shapes, seed=seeds)
def test_unary_ops(op, shape, seed):
    fn, gen = unary[op]
    x = gen(shape, seed)
    if op == "relu":
        x = np.where(np.abs(x) < 1e-2, 0.5, x)  # away from the kink
    # erf's A&S approximation is 1.5e-7 from the true erf, its derivative is exact: allow for that
    atol = 1e-5 if op not in ("erf", "gelu") else 5e-4
    gradcheck(fn, [x], atol=atol)


# ---------------------------------------------------------------- matmul
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3),
       m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 4), seed=seeds)
def test_matmul_batched_broadcast(shapes, m, k, n, seed):
    ba, bb = shapes.input_shapes
    gradcheck(lambda a, b: a @ b, [rand(ba + (m, k), seed), rand(bb + (k, n), seed + 1)])


@given(batch=array_shapes(min_dims=1, max_dims=3, max_side=3), k=st.integers(1, 4),
       n=st.integers(1, 4), seed=seeds)
def test_matmul_shared_weight(batch, k, n, seed):
    """(..., k) @ (k, n): the one-big-GEMM path of every Linear layer."""
    gradcheck(lambda x, w: x @ w, [rand(batch + (k,), seed), rand((k, n), seed + 1)])
    gradcheck(lambda x, w: F.linear(x, w), [rand(batch + (k,), seed), rand((n, k), seed + 1)])


def test_matmul_vectors():
    gradcheck(lambda a, b: a @ b, [rand((4,), 0), rand((4,), 1)])
    gradcheck(lambda a, b: a @ b, [rand((4,), 0), rand((2, 4, 3), 1)])
    gradcheck(lambda a, b: a @ b, [rand((2, 3, 4), 0), rand((4,), 1)])


# ---------------------------------------------------------------- reductions
axis_choices = st.one_of(st.none(), st.integers(-4, 3), st.lists(st.integers(0, 3), min_size=1,
                                                                  max_size=2, unique=True))


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@given(shape=array_shapes(min_dims=1, max_dims=4, max_side=4), axis=axis_choices,
       keepdims=st.booleans(), seed=seeds)
def test_reductions(op, shape, axis, keepdims, seed):
    nd = len(shape)
    if isinstance(axis, int):
        axis = axis % nd
    elif isinstance(axis, list):
        axis = tuple(sorted({a % nd for a in axis}))
    x = rand(shape, seed)
    gradcheck(lambda a: getattr(a, op)(axis=axis, keepdims=keepdims), [x])


def test_max_ties_share_gradient():
    x = ml.Tensor(np.array([1.0, 3.0, 3.0]), requires_grad=True)
    x.max().backward()
    np.testing.assert_allclose(x.grad, [0.0, 0.5, 0.5])


# ---------------------------------------------------------------- shapes and indexing
@given(shape=array_shapes(min_dims=1, max_dims=4, max_side=4), seed=seeds, data=st.data())
def test_reshape_transpose(shape, seed, data):
    perm = data.draw(st.permutations(range(len(shape))))
    gradcheck(lambda a: a.transpose(*perm).reshape(-1) * 2, [rand(shape, seed)])
    gradcheck(lambda a: a.T, [rand(shape, seed)])
    if len(shape) >= 2:
        gradcheck(lambda a: a.swapaxes(-1, -2), [rand(shape, seed)])


@given(shape=array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=5), seed=seeds, data=st.data())
def test_getitem(shape, seed, data):
    x = rand(shape, seed)
    n = shape[0]
    start = data.draw(st.integers(0, n - 1))
    gradcheck(lambda a: a[start:], [x])                                 # slice
    gradcheck(lambda a: a[..., ::2], [x])                               # strided, Ellipsis
    gradcheck(lambda a: a[start], [x])                                  # integer
    ids = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=6)))
    gradcheck(lambda a: a[ids], [x])                                    # repeats accumulate
    mask = rand(shape, seed + 1) > 0
    gradcheck(lambda a: a[mask] * 3, [x])                                # boolean mask
    gradcheck(lambda a: a[None, 0:1], [x])                               # new axis


@given(shapes=st.lists(st.integers(1, 3), min_size=1, max_size=3), rest=array_shapes(max_dims=2,
       max_side=3), axis=st.integers(0, 2), seed=seeds)
def test_concatenate_stack_split(shapes, rest, axis, seed):
    axis = axis % (len(rest) + 1)
    parts = [rand(rest[:axis] + (n,) + rest[axis:], seed + i) for i, n in enumerate(shapes)]
    gradcheck(lambda *ts: F.concatenate(ts, axis=axis), parts)
    same = [rand(rest, seed + i) for i in range(len(shapes))]
    gradcheck(lambda *ts: F.stack(ts, axis=axis), same)
    whole = rand(rest[:axis] + (sum(shapes),) + rest[axis:], seed)
    gradcheck(lambda a: F.stack([p.sum() * (i + 1) for i, p in enumerate(F.split(a, shapes, axis))]),
              [whole])


@given(cond_shape=array_shapes(max_dims=3, max_side=3), seed=seeds)
def test_where(cond_shape, seed):
    cond = rand(cond_shape, seed) > 0
    gradcheck(lambda a, b: F.where(cond, a, b), [rand(cond_shape, seed + 1), rand(cond_shape[-1:], 2)])


@given(vocab=st.integers(1, 6), dim=st.integers(1, 4), ids_shape=array_shapes(max_dims=2, max_side=5),
       seed=seeds)
def test_embedding(vocab, dim, ids_shape, seed):
    ids = np.random.default_rng(seed).integers(0, vocab, size=ids_shape)
    gradcheck(lambda w: F.embedding(ids, w), [rand((vocab, dim), seed)])


# ---------------------------------------------------------------- fused ops
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=5), seed=seeds, axis=st.integers(-1, 0))
def test_softmax_family(shape, seed, axis):
    x = rand(shape, seed, -4, 4)
    gradcheck(lambda a: F.softmax(a, axis=axis), [x])
    gradcheck(lambda a: F.log_softmax(a, axis=axis), [x])


@given(n=st.integers(1, 6), c=st.integers(1, 5), seed=seeds, reduction=st.sampled_from(["mean", "sum"]))
def test_cross_entropy(n, c, seed, reduction):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, c, size=(2, n))
    t[0, 0] = -100  # an ignored position
    if n > 1 or reduction == "sum":
        gradcheck(lambda z: F.cross_entropy(z, t, reduction=reduction), [rand((2, n, c), seed, -3, 3)])


@given(shape=array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5), seed=seeds)
def test_norms(shape, seed):
    x, w, b = rand(shape, seed), rand(shape[-1:], seed + 1), rand(shape[-1:], seed + 2)
    gradcheck(lambda a, w: F.rms_norm(a, w, eps=1e-5), [x, w])
    gradcheck(lambda a: F.rms_norm(a), [x])
    if shape[-1] > 1:  # a one-element layer norm is constant (x - mean(x) = 0)
        gradcheck(lambda a, w, b: F.layer_norm(a, w, b), [x, w, b])


def test_dropout_gradient_is_the_mask():
    def fn(a):
        backend.manual_seed(3)  # the same mask on every call of fn
        return F.dropout(a, p=0.3, training=True)
    gradcheck(fn, [rand((4, 5), 0)])
    x = ml.Tensor(np.ones((200, 50)))
    backend.manual_seed(1)
    y = F.dropout(x, p=0.3).data
    assert set(np.unique(y)) <= {0.0, np.float64(1 / 0.7)}
    assert abs((y == 0).mean() - 0.3) < 0.02
    assert F.dropout(x, p=0.3, training=False) is x


@given(b=st.integers(1, 2), h_kv=st.integers(1, 2), rep=st.integers(1, 2), tq=st.integers(1, 4),
       extra=st.integers(0, 2), d=st.integers(1, 3), causal=st.booleans(), seed=seeds)
def test_attention(b, h_kv, rep, tq, extra, d, causal, seed):
    tk = tq + extra
    q = rand((b, h_kv, rep, tq, d), seed)         # grouped-query: rep query heads per k/v head
    k = rand((b, h_kv, 1, tk, d), seed + 1)
    v = rand((b, h_kv, 1, tk, d), seed + 2)
    gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal), [q, k, v])
    keep = np.ones((b, 1, 1, 1, tk), dtype=bool)
    keep[..., 0] = tk == 1  # mask out the first key unless it is the only one
    gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=False, attn_mask=keep),
              [q, k, v])


# ---------------------------------------------------------------- gradcheck itself
def test_gradcheck_names_the_failure():
    def wrong_square(a):  # forward a^2, backward claims 3a
        out = ml.Tensor._result(a.data ** 2, (a,), "bad")
        out._set_backward(lambda: a._accum(3 * a.data * out.grad, fresh=True))
        return out
    with pytest.raises(GradcheckError, match=r"input 0 \(shape \(3,\)\) at index \(0,\): analytic"):
        gradcheck(wrong_square, [np.array([1.0, 2.0, 3.0])])
