"""Tensor: an array that remembers how it was made, and walks that record backwards for gradients.

This is reverse-mode automatic differentiation in the style of Karpathy's micrograd, on whole arrays
instead of scalars: every operation (in ``ops.py`` and ``functional.py``) returns a new Tensor that
keeps its parents and a ``_backward`` closure which, given ``out.grad``, adds each parent's share of
the gradient into ``parent.grad`` (``+=``: a tensor used twice gets both contributions).

``Tensor.backward()`` sorts the graph topologically (iteratively, so deep graphs never hit Python's
recursion limit) and runs the closures from the output back to the leaves. Three rules make LoRA
cheap, and are tested:

* a tensor with ``requires_grad=False`` (a frozen weight) never receives a gradient, and every
  closure checks ``parent.requires_grad`` before computing that parent's share: the matmul that would
  produce dL/dW0 is simply never run;
* results computed from frozen inputs only (or under ``no_grad()``) record no graph at all;
* after ``backward()`` the graph is freed (closures and parents dropped, intermediate gradients
  released) unless ``retain_graph=True``. Leaf gradients accumulate across calls, as in PyTorch;
  zero them with ``p.grad = None`` or an optimizer's ``zero_grad()``.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from . import backend

_grad_enabled = True


@contextmanager
def no_grad():
    """Record no graph inside this block (inference, optimizer updates). Also a decorator."""
    global _grad_enabled
    old, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = old


def is_grad_enabled() -> bool:
    return _grad_enabled


def _as_array(data, dtype=None):
    """Turn data (list, scalar, NumPy or CuPy array) into an array; floats default to float32."""
    if isinstance(data, Tensor):
        data = data.data
    xpmod = backend.get_xp(data)
    if xpmod is np and not isinstance(data, np.ndarray):
        xpmod = backend.xp()
        data = xpmod.asarray(data)
        if dtype is None and data.dtype.kind == "f":
            dtype = backend.default_float()
    if dtype is not None and data.dtype != dtype:
        data = data.astype(dtype)
    return data


class Tensor:
    """An n-dimensional array (``.data``: NumPy or CuPy) with an optional gradient (``.grad``)."""

    __array_priority__ = 1000  # make `ndarray * Tensor` call Tensor.__rmul__, not NumPy's loop

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        self.data = _as_array(data, dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise ValueError(f"only floating-point tensors can require grad, got {self.data.dtype}; "
                             "convert with .astype(np.float32) first")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._grad_owned = False   # True once .grad is an array we may update in place
        self._prev: tuple = ()      # the tensors this one was computed from
        self._backward = None       # closure that pushes self.grad into the parents' .grad
        self._op = ""               # name of the op that made it (for printing graphs)
        self._freed = False         # set when backward() has released this node's graph

    # ------------------------------------------------------------------ graph bookkeeping
    @classmethod
    def _result(cls, data, parents: tuple, op: str) -> "Tensor":
        """The output of an op: it joins the graph only if grad is on and a parent needs grad."""
        out = Tensor.__new__(Tensor)
        out.data = data
        out.requires_grad = _grad_enabled and any(p.requires_grad for p in parents)
        out.grad = None
        out._grad_owned = False
        out._prev = parents if out.requires_grad else ()
        out._backward = None
        out._op = op
        out._freed = False
        return out

    def _set_backward(self, fn) -> None:
        """Attach an op's backward closure, only when this tensor is part of a graph."""
        if self.requires_grad:
            self._backward = fn

    @property
    def is_leaf(self) -> bool:
        return not self._prev and self._backward is None and not self._freed

    def _accum(self, g, fresh: bool = False) -> None:
        """self.grad += g. ``fresh`` says g is a new array nobody else holds, so we may keep it.

        The first gradient is stored without a copy when we can (a leaf copies a shared array,
        so that ``p.grad *= c`` in user code can never change another tensor's gradient); later
        ones are added in place once the stored array is ours.
        """
        if g.dtype != self.data.dtype:
            g = g.astype(self.data.dtype)
            fresh = True
        if self.grad is None:
            if self.is_leaf and not fresh:
                g, fresh = g.copy(), True
            self.grad, self._grad_owned = g, fresh
        elif self._grad_owned:
            self.grad += g
        else:
            self.grad = self.grad + g
            self._grad_owned = True

    def _topological_order(self) -> list:
        """Every tensor that needs a gradient, parents before children (iterative DFS)."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, children_done = stack.pop()
            if children_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for parent in node._prev:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
        return order

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Compute d(self)/d(leaf) for every leaf that requires grad, adding into ``leaf.grad``.

        ``grad`` is the upstream gradient (dL/dself); it defaults to 1 for a scalar.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of "
                               "this computation has requires_grad=True (or it ran under no_grad)")
        if self._freed:
            raise RuntimeError("backward() through a graph that an earlier backward() already freed;"
                               " pass retain_graph=True to the first call")
        xpmod = backend.get_xp(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar, got shape "
                                   f"{self.shape}; pass grad= with that shape")
            grad = xpmod.ones_like(self.data)
        else:
            grad = xpmod.asarray(_as_array(grad), dtype=self.data.dtype)
            if grad.shape != self.data.shape:
                raise ValueError(f"backward(grad=...) has shape {grad.shape}, expected {self.shape}")
        order = self._topological_order()
        self._accum(grad)
        for node in reversed(order):
            if node._freed:
                raise RuntimeError("backward() reached a graph freed by an earlier backward(); pass"
                                   " retain_graph=True to the first call")
            if node._backward is None or node.grad is None:
                continue
            node._backward()
            node.grad = None  # intermediate gradients are not kept (as in PyTorch), so a second
            # backward(retain_graph=True) pass starts from zero instead of stale sums
            if not retain_graph:
                node._backward, node._prev, node._freed = None, (), True

    # ------------------------------------------------------------------ conveniences
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def detach(self) -> "Tensor":
        """The same data, cut from the graph (no gradient flows through it)."""
        return Tensor(self.data)

    def numpy(self) -> np.ndarray:
        return backend.to_numpy(self.data)

    def item(self) -> float:
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def to(self, device: str) -> "Tensor":
        """A copy on ``device`` ("cpu"/"cuda") as a new leaf with the same requires_grad."""
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if flag and self.data.dtype.kind != "f":
            raise ValueError(f"only floating-point tensors can require grad, got {self.dtype}")
        self.requires_grad = flag
        return self

    def __repr__(self) -> str:
        extra = f", requires_grad=True" if self.requires_grad else ""
        op = f", op={self._op!r}" if self._op else ""
        return f"Tensor({backend.to_numpy(self.data)!r}{extra}{op})"

    def __hash__(self):
        return id(self)
