"""The graph rules of the autograd engine, each checked directly.

* a very deep graph backpropagates without hitting Python's recursion limit (iterative topo sort);
* leaf gradients accumulate across backward() calls, as in PyTorch;
* the graph is freed after backward(): a second backward raises unless retain_graph=True;
* a frozen leaf (requires_grad=False) gets no .grad, and the matmul that would give its weight
  gradient is never computed (counted with an ndarray subclass);
* nothing computed under no_grad() (or from frozen inputs only) records a graph.
"""
import numpy as np
import pytest

import minilora as ml
from minilora import Tensor, no_grad


def test_deep_graph_backward_no_recursion_error():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = x
    for _ in range(20000):
        y = y + 1.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones(3, dtype=np.float32))


def test_backward_twice_accumulates_like_torch():
    torch = pytest.importorskip("torch")
    a = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    x = Tensor(a, requires_grad=True)
    xt = torch.tensor(a, requires_grad=True)
    for _ in range(2):  # two separate graphs, same leaf: gradients add up
        (x * x).sum().backward()
        (xt * xt).sum().backward()
    np.testing.assert_allclose(x.grad, xt.grad.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(x.grad, 4 * a)


def test_graph_freed_after_backward():
    x = Tensor(np.arange(4, dtype=np.float32), requires_grad=True)
    y = (x * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_retain_graph_allows_second_backward():
    x = Tensor(np.arange(4, dtype=np.float32), requires_grad=True)
    h = x * 3.0
    y = (h * h).sum()
    y.backward(retain_graph=True)
    first = x.grad.copy()
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * first)


def test_intermediate_grads_released():
    x = Tensor(np.ones(4, dtype=np.float32), requires_grad=True)
    h = x * 2.0
    (h * h).sum().backward()
    assert h.grad is None and x.grad is not None


class CountingArray(np.ndarray):
    """An ndarray that counts every matrix product it takes part in (left or right operand)."""

    calls = 0

    def __matmul__(self, other):
        CountingArray.calls += 1
        return np.asarray(self) @ np.asarray(other)

    def __rmatmul__(self, other):
        CountingArray.calls += 1
        return np.asarray(other) @ np.asarray(self)


def test_frozen_weight_gradient_matmul_never_computed():
    rng = np.random.default_rng(0)
    B, T, d, r = 2, 3, 5, 2
    x_data = rng.standard_normal((B, T, d)).astype(np.float32).view(CountingArray)
    x = Tensor(x_data)                                                  # input: no grad
    W0 = Tensor(rng.standard_normal((d, d)).astype(np.float32))          # frozen base weight
    A = Tensor(rng.standard_normal((r, d)).astype(np.float32), requires_grad=True)
    Bm = Tensor(rng.standard_normal((d, r)).astype(np.float32), requires_grad=True)
    CountingArray.calls = 0
    y = x @ W0.T + (x @ A.T) @ Bm.T        # (B, T, d)
    assert CountingArray.calls == 2        # forward: x @ W0^T and x @ A^T
    y.sum().backward()
    # backward: only dL/dA = (g B)^T-ish @ x involves x; dL/dW0 = g^T x would be a 4th product
    assert CountingArray.calls == 3
    assert W0.grad is None and x.grad is None
    assert A.grad is not None and Bm.grad is not None
    # the frozen branch left no graph at all
    assert not (x @ W0.T).requires_grad


def test_no_grad_records_no_graph():
    w = Tensor(np.ones((3, 3), dtype=np.float32), requires_grad=True)
    with no_grad():
        y = (w @ w).sum() * 2.0
        assert not ml.is_grad_enabled()
    assert ml.is_grad_enabled()
    assert not y.requires_grad and y._prev == () and y._backward is None
    with pytest.raises(RuntimeError):
        y.backward()


def test_frozen_inputs_only_record_no_graph():
    a = Tensor(np.ones(3, dtype=np.float32))
    b = (a * 2.0 + 1.0).exp()
    assert not b.requires_grad and b._prev == ()
