"""The autograd engine against PyTorch: the same graphs, forward values and every input's gradient.

Each case builds one small graph twice, once with minilora and once with torch, from the same NumPy
inputs, backpropagates the same random upstream gradient, and compares. In float64 both libraries
agree to rounding (~1e-12); in float32 the tolerance is a few hundred ulps (rtol 1e-4), because sums
of different orders differ by about sqrt(n) * eps32 ~ 1e-6 relative and cancellations amplify that.
"""
import numpy as np
import pytest

import minilora as ml
from minilora import Tensor
from minilora import functional as F

torch = pytest.importorskip("torch", reason="the interop extra (torch) is not installed")
TF = torch.nn.functional

pytestmark = pytest.mark.interop

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}


def _compare(ml_fn, torch_fn, arrays, dtype, requires=None, extra=(), seed=0, tol=None):
    """Run both graphs on float ``arrays`` (+ non-differentiable ``extra``); compare out and grads."""
    tol = tol or TOL[dtype]
    requires = requires or [True] * len(arrays)
    arrays = [np.asarray(a, dtype=dtype) for a in arrays]
    mt = [Tensor(a.copy(), requires_grad=r) for a, r in zip(arrays, requires)]
    tt = [torch.tensor(a.copy(), requires_grad=r) for a, r in zip(arrays, requires)]
    out_m = ml_fn(*mt, *extra)
    out_t = torch_fn(*tt, *extra)
    assert out_m.dtype == dtype, f"minilora output is {out_m.dtype}, expected {dtype}"
    np.testing.assert_allclose(out_m.numpy(), out_t.detach().numpy(), **tol)
    up = np.random.default_rng(seed).standard_normal(out_m.shape).astype(dtype)
    out_m.backward(up)
    out_t.backward(torch.tensor(up))
    for i, (m, t, r) in enumerate(zip(mt, tt, requires)):
        if not r:
            assert m.grad is None
            continue
        assert m.grad is not None, f"input {i} got no gradient"
        assert m.grad.dtype == dtype
        np.testing.assert_allclose(m.grad, t.grad.numpy(), err_msg=f"input {i}", **tol)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_binary_broadcast(dtype, op):
    a, b = rand(2, 1, 4, 3, seed=1), rand(5, 1, 3, seed=2)
    if op == "div":
        b = np.abs(b) + 0.5
    f = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y,
         "mul": lambda x, y: x * y, "div": lambda x, y: x / y}[op]
    _compare(f, f, [a, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_pow_unary(dtype):
    a = np.abs(rand(3, 4)) + 0.2
    _compare(lambda x: ((x ** 3) * x.exp() + x.log() * x.sqrt()).tanh(),
             lambda x: ((x ** 3) * x.exp() + x.log() * x.sqrt()).tanh(), [a], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_batched_and_shared_weight(dtype):
    a, b, w = rand(2, 3, 4, 5, seed=1), rand(3, 5, 6, seed=2), rand(7, 6, seed=3)
    _compare(lambda x, y, z: (x @ y) @ z.T, lambda x, y, z: (x @ y) @ z.T, [a, b, w], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions(dtype):
    a = rand(3, 4, 5)
    _compare(lambda x: x.sum(axis=1) * x.mean(axis=(0, 1), keepdims=True)[0] + x.max(axis=1),
             lambda x: x.sum(dim=1) * x.mean(dim=(0, 1), keepdim=True)[0] + x.amax(dim=1),
             [a], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_log_softmax(dtype):
    a = rand(4, 7) * 3
    _compare(lambda x: F.softmax(x, axis=-1) * F.log_softmax(x, axis=0),
             lambda x: TF.softmax(x, dim=-1) * TF.log_softmax(x, dim=0), [a], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_ignore_index(dtype):
    logits = rand(2, 5, 11) * 2
    targets = np.array([[1, 4, -100, 10, 0], [-100, 3, 3, 7, -100]])
    _compare(lambda z, t: F.cross_entropy(z, t),
             lambda z, t: TF.cross_entropy(z.reshape(-1, 11), torch.tensor(t).reshape(-1),
                                           ignore_index=-100),
             [logits], dtype, extra=(targets,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_layer_norm(dtype):
    x, w, b = rand(2, 3, 8, seed=1), rand(8, seed=2), rand(8, seed=3)
    _compare(lambda x, w, b: F.rms_norm(x, w, eps=1e-5) + F.layer_norm(x, w, b, eps=1e-5),
             lambda x, w, b: TF.rms_norm(x, (8,), w, eps=1e-5) + TF.layer_norm(x, (8,), w, b, 1e-5),
             [x, w, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_silu(dtype):
    x = rand(4, 6) * 2
    # minilora's erf is Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7): float32-exact, not float64
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float64 else None
    _compare(lambda x: F.gelu(x) + F.gelu(x, approximate="tanh") * F.silu(x),
             lambda x: TF.gelu(x) + TF.gelu(x, approximate="tanh") * TF.silu(x), [x], dtype, tol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_causal_gqa(dtype):
    q = rand(2, 2, 3, 5, 4, seed=1)   # (B, n_kv, n_rep, T, hd)
    k = rand(2, 2, 1, 5, 4, seed=2)   # shared by the n_rep query heads of a group
    v = rand(2, 2, 1, 5, 4, seed=3)

    def torch_sdpa(q, k, v):
        return TF.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q), is_causal=True)
    _compare(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True), torch_sdpa,
             [q, k, v], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_and_getitem(dtype):
    w = rand(6, 3)
    ids = np.array([[0, 5, 5], [2, 0, 5]])
    _compare(lambda w, i: F.embedding(i, w)[:, 1:, ::2] * w[np.array([1, 1, 3])].sum(),
             lambda w, i: TF.embedding(torch.tensor(i), w)[:, 1:, ::2] * w[[1, 1, 3]].sum(),
             [w], dtype, extra=(ids,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_input_gets_no_grad(dtype):
    a, b = rand(3, 4, seed=1), rand(4, 2, seed=2)
    _compare(lambda x, y: x @ y, lambda x, y: x @ y, [a, b], dtype, requires=[False, True])
