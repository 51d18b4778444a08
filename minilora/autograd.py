"""The autograd graph: an array that remembers how it was made, and walks that record backwards.

This is reverse-mode automatic differentiation in the style of Karpathy's micrograd, on whole arrays
instead of scalars: every operation (in ``ops.py`` and ``functional.py``) returns a new Tensor that
keeps its parents and a ``_backward`` closure which, given ``out.grad``, adds each parent's share of
the gradient into ``parent.grad`` (``_accum``: a tensor used twice gets both contributions).

``backward()`` sorts the graph topologically (iteratively, so deep graphs never hit Python's
recursion limit) and runs the closures from the output back to the leaves. Three rules make LoRA
cheap, and are tested (tests/test_graph.py):

* a tensor with ``requires_grad=False`` (a frozen weight) never receives a gradient, and every
  closure checks ``parent.requires_grad`` before computing that parent's share: the matmul that would
  produce dL/dW0 is simply never run;
* results computed from frozen inputs only (or under ``no_grad()``) record no graph at all;
* after ``backward()`` the graph is freed (closures and parents dropped, intermediate gradients
  released) unless ``retain_graph=True``. Leaf gradients accumulate across calls, as in PyTorch;
  zero them with ``p.grad = None`` or an optimizer's ``zero_grad()``.

This module is the graph machinery only: ``TensorBase`` holds data, grad and requires_grad, makes op
results, accumulates gradients and runs ``backward()``; it has no operators. ``minilora.tensor.Tensor``
subclasses it and writes the operators (``+ - * / ** @``, ``sum``, ``reshape``, ...) in its class
body, each delegating to a primitive in ``ops.py`` (PyTorch splits the same way: ``torch.Tensor`` is a
Python subclass of the C++ ``torch._C.TensorBase``). Imports therefore run one way only:
``ops.py`` imports this module, ``tensor.py`` imports ``ops.py``.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from . import backend

# Grad mode is per thread, as in PyTorch: data_parallel runs micro-batches in threads, and a
# ``no_grad()`` block in one of them (checkpoint.py's forward) must not switch off another's graph.
# A new thread starts with grad on.
_grad_mode = threading.local()


def _set_grad_enabled(enabled: bool) -> bool:
    """Set this thread's grad mode; return the old one."""
    old = getattr(_grad_mode, "enabled", True)
    _grad_mode.enabled = enabled
    return old


@contextmanager
def no_grad():
    """Record no graph inside this block (inference, optimizer updates), in this thread. Also a
    decorator."""
    old = _set_grad_enabled(False)
    try:
        yield
    finally:
        _set_grad_enabled(old)


@contextmanager
def enable_grad():
    """Record the graph inside this block even within ``no_grad()`` (in this thread): checkpoint.py
    recomputes a block with its graph during ``backward()``."""
    old = _set_grad_enabled(True)
    try:
        yield
    finally:
        _set_grad_enabled(old)


def is_grad_enabled() -> bool:
    """False inside ``no_grad()`` (in this thread): op results then record no parents and no
    backward closure."""
    return getattr(_grad_mode, "enabled", True)


def _as_array(data, dtype=None):
    """Turn data (list, scalar, NumPy or CuPy array) into an array; floats default to float32."""
    if isinstance(data, TensorBase):
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


class TensorBase:
    """An n-dimensional array (``.data``: NumPy or CuPy) with an optional gradient (``.grad``) and the
    record of the op that made it. Create ``minilora.Tensor``, the subclass with the operators."""

    # The class every op result and every constant is made of: the subclass declared as
    # `class Tensor(TensorBase, result_class=True)` in tensor.py. Ops reach it through this base, so
    # ops.py never imports tensor.py, and an op on an nn.Parameter returns a plain Tensor (a
    # Parameter result would be registered as a weight when a Module stores it).
    _result_class: type | None = None

    def __init_subclass__(cls, result_class: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        if result_class:
            TensorBase._result_class = cls

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        if type(self) is TensorBase:
            raise TypeError("TensorBase has no operators; create a minilora.Tensor instead")
        self.data = _as_array(data, dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise ValueError(f"only floating-point tensors can require grad, got {self.data.dtype}; "
                             "convert with .astype(np.float32) first")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._grad_owned = False   # True once .grad is an array we may update in place (see _accum)
        self._prev: tuple = ()      # the tensors this one was computed from
        self._backward = None       # closure that pushes self.grad into the parents' .grad
        self._op = ""               # name of the op that made it (for printing graphs)
        self._freed = False         # set when backward() has released this node's graph

    # ------------------------------------------------------------------ making tensors in ops
    @staticmethod
    def _result(data, parents: tuple, op: str) -> "TensorBase":
        """The output of an op, always a plain Tensor (also when a parent is an nn.Parameter).

        It joins the graph (keeps ``parents``, accepts a backward closure) only if grad is on and a
        parent requires grad.
        """
        out = object.__new__(TensorBase._result_class)
        out.data = data
        out.requires_grad = is_grad_enabled() and any(p.requires_grad for p in parents)
        out.grad = None
        out._grad_owned = False
        out._prev = parents if out.requires_grad else ()
        out._backward = None
        out._op = op
        out._freed = False
        return out

    @staticmethod
    def _constant(data, dtype=None) -> "TensorBase":
        """A plain Tensor leaf that needs no gradient (a number or array an op was given)."""
        return TensorBase._result_class(data, dtype=dtype)

    def _set_backward(self, fn) -> None:
        """Attach an op's backward closure, only when this tensor is part of a graph."""
        if self.requires_grad:
            self._backward = fn

    @property
    def is_leaf(self) -> bool:
        """True for a tensor made by the user (a weight, an input), not by an op of a live graph."""
        return not self._prev and self._backward is None and not self._freed

    # ------------------------------------------------------------------ gradients
    def _accum(self, g, fresh: bool = False) -> None:
        """Add the gradient contribution ``g`` (an array of this tensor's shape) into ``self.grad``.

        ``fresh=True`` is the caller's promise that ``g`` is a new array that nothing else holds or
        will touch: the result of arithmetic done for this call (``out.grad * b.data``, a matmul,
        ``astype``, a ``zeros_like`` filled in), passed to no other ``_accum``. ``_accum`` may then
        adopt ``g`` itself as ``.grad`` and later add into it in place, saving a copy and an
        allocation per parameter per step. Pass the default ``False`` whenever ``g`` may be shared:
        ``out.grad`` itself or a view of it (``reshape``, ``transpose``, slicing, ``broadcast_to``,
        and ``unbroadcast`` when the shapes already match) or any array another tensor also gets.
        A false promise corrupts gradients silently: ``x + y`` hands the same ``out.grad`` to both
        parents, so if both adopted it, a later contribution added in place into ``x.grad`` would
        change ``y.grad`` as well (and ``p.grad *= c`` in user code, such as gradient clipping,
        would change another tensor's gradient); a read-only ``broadcast_to`` view would make that
        in-place add raise instead. With ``False`` a leaf copies ``g`` once, and any other tensor
        keeps it until its next contribution, which then allocates a new sum instead of writing
        into ``g``: always correct, at most one extra copy.
        """
        if g.dtype != self.data.dtype:
            g = g.astype(self.data.dtype)  # the cast is a new array: ours to keep
            fresh = True
        if self.grad is None:
            if self.is_leaf and not fresh:
                g, fresh = g.copy(), True  # leaf gradients are user-visible and may be edited
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

    # ------------------------------------------------------------------ what ops read
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
