"""The graph rules of the autograd engine, each checked directly.

* a very deep graph backpropagates without hitting Python's recursion limit (iterative topo sort);
* leaf gradients accumulate across backward() calls, as in PyTorch;
* the graph is freed after backward(): a second backward raises unless retain_graph=True;
* a frozen leaf (requires_grad=False) gets no .grad, and the matmul that would give its weight
  gradient is never computed (counted with an ndarray subclass);
* nothing computed under no_grad() (or from frozen inputs only) records a graph;
* ``_accum`` copies or adopts a gradient array as its docstring says, so no two tensors ever share
  one;
* the operators are methods in Tensor's class body, an op on an nn.Parameter returns a plain Tensor,
  and the imports run autograd <- ops <- tensor with no cycle (read from the source with ast).
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


# ---------------------------------------------------------------- gradient accumulation (_accum)
def test_leaf_copies_a_shared_gradient_and_adopts_a_fresh_one():
    x = Tensor(np.zeros(3, dtype=np.float32), requires_grad=True)
    shared = np.ones(3, dtype=np.float32)
    x._accum(shared)                       # default fresh=False: the leaf keeps its own copy
    shared[:] = 7.0
    np.testing.assert_array_equal(x.grad, np.ones(3, dtype=np.float32))
    y = Tensor(np.zeros(3, dtype=np.float32), requires_grad=True)
    new = np.ones(3, dtype=np.float32)
    y._accum(new, fresh=True)              # the caller promised nobody else holds `new`
    assert y.grad is new
    y._accum(np.ones(3, dtype=np.float32))
    assert y.grad is new and new[0] == 2.0  # later contributions are added in place


def test_intermediate_keeps_a_shared_gradient_and_never_writes_into_it():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    h = x * 2.0                            # a node of a live graph, not a leaf
    shared = np.ones(3, dtype=np.float32)
    h._accum(shared)
    assert h.grad is shared                # no copy for a gradient only its backward will read
    h._accum(np.ones(3, dtype=np.float32))
    np.testing.assert_array_equal(shared, np.ones(3, dtype=np.float32))
    np.testing.assert_array_equal(h.grad, np.full(3, 2.0, dtype=np.float32))


def test_parents_of_one_add_do_not_share_a_gradient_array():
    """x + y hands the same out.grad to both parents: editing x.grad must leave y.grad alone."""
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    (x + y).sum().backward()
    x.grad *= 5.0                          # what gradient clipping does
    np.testing.assert_array_equal(y.grad, np.ones(3, dtype=np.float32))
    (x + y).sum().backward()               # a second contribution is added into x.grad only
    np.testing.assert_array_equal(x.grad, np.full(3, 6.0, dtype=np.float32))
    np.testing.assert_array_equal(y.grad, np.full(3, 2.0, dtype=np.float32))


# ---------------------------------------------------------------- where the operators live
OPERATORS = ["__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
             "__rtruediv__", "__pow__", "__rpow__", "__matmul__", "__rmatmul__", "__neg__",
             "__getitem__", "sum", "mean", "max", "reshape", "transpose", "swapaxes", "T", "exp",
             "log", "sqrt", "tanh", "sigmoid", "astype"]


@pytest.mark.parametrize("name", OPERATORS)
def test_operators_are_written_in_the_tensor_class_body(name):
    assert name in Tensor.__dict__, f"Tensor.{name} is not defined in Tensor's class body"
    attr = Tensor.__dict__[name]
    fn = attr.fget if isinstance(attr, property) else attr
    assert fn.__module__ == "minilora.tensor" and fn.__qualname__ == f"Tensor.{name}"


def test_an_op_on_a_parameter_returns_a_plain_tensor():
    from minilora.nn import Parameter
    p = Parameter(np.ones((2, 3), dtype=np.float32))
    results = [p + 1.0, 1.0 - p, p * p, p / 2.0, p ** 2, 2.0 ** p, p @ p.T, -p, p[0], p.sum(),
               p.mean(axis=0), p.reshape(3, 2), p.T, p.exp(), p.astype(np.float64)]
    for out in results:
        assert type(out) is Tensor, f"{out._op} returned {type(out).__name__}"
    (p * p).sum().backward()
    np.testing.assert_array_equal(p.grad, 2 * p.data)


def _imported_modules(path):
    """Every minilora module a top-level minilora file imports, at module level or inside functions
    (``from . import ops`` and ``from .ops import add`` both name ``minilora.ops``)."""
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(f"minilora.{node.module}")
            else:
                names.update(f"minilora.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minilora"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("minilora"))
    return names


def test_autograd_core_imports_run_one_way():
    """autograd <- ops <- tensor: ops.py never imports tensor.py, autograd.py neither of them."""
    from pathlib import Path
    src = Path(ml.__file__).parent
    ops_imports = _imported_modules(src / "ops.py")
    autograd_imports = _imported_modules(src / "autograd.py")
    assert "minilora.tensor" not in ops_imports, sorted(ops_imports)
    assert not {"minilora.tensor", "minilora.ops"} & autograd_imports, sorted(autograd_imports)
    assert "minilora.ops" in _imported_modules(src / "tensor.py")


def test_nothing_assigns_attributes_to_tensor_from_outside():
    """The operators are not bound onto the class after the fact (no `Tensor.__add__ = ...`)."""
    import ast
    from pathlib import Path
    src = Path(ml.__file__).parent
    classes = ("Tensor", "TensorBase")
    offenders = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text())
        inside = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name in classes
                  for n in ast.walk(c)}        # a class may set its own attributes in its body
        for node in ast.walk(tree):
            if id(node) in inside:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else []
            calls_setattr = (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                             and node.func.id == "setattr" and node.args
                             and isinstance(node.args[0], ast.Name)
                             and node.args[0].id in classes)
            if calls_setattr or any(isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                                    and t.value.id in classes
                                    for t in targets):
                offenders.append(f"{path.relative_to(src.parent)}:{node.lineno}")
    assert not offenders, offenders
