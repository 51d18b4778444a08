"""Tensor: the array users and models compute with, its operators written out in one class body.

``Tensor`` is ``autograd.TensorBase`` (data, grad, the graph and ``backward()``: read that module for
how reverse-mode autodiff works here) plus the operators and methods a student writes with:
``+ - * / ** @`` with their reflected forms, unary ``-``, indexing, ``sum/mean/max``, ``reshape``,
``transpose``, ``swapaxes``, ``.T``, ``exp/log/sqrt/tanh/sigmoid`` and ``astype``. Each is a
one-line method that calls the primitive of the same meaning in ``ops.py``, where the forward and
the backward of every op are written side by side. NumPy's broadcasting rules apply throughout.

``ops.py`` never imports this module (it builds results through ``TensorBase``), so the imports run
autograd <- ops <- tensor, with no cycle.
"""
from __future__ import annotations

import numpy as np

from . import backend, ops
from .autograd import TensorBase, is_grad_enabled, no_grad

__all__ = ["Tensor", "no_grad", "is_grad_enabled"]


class Tensor(TensorBase, result_class=True):
    """An n-dimensional array (``.data``: NumPy or CuPy) with an optional gradient (``.grad``).

    ``Tensor(data, requires_grad=False, dtype=None)``: lists and Python numbers become arrays on the
    current device, floating point ones in float32. Every op on a Tensor returns a new Tensor.
    """

    __array_priority__ = 1000  # make `ndarray * Tensor` call Tensor.__rmul__, not NumPy's loop

    # ------------------------------------------------------------------ arithmetic
    def __add__(self, other) -> Tensor:
        return ops.add(self, other)

    def __radd__(self, other) -> Tensor:
        return ops.add(other, self)

    def __sub__(self, other) -> Tensor:
        return ops.sub(self, other)

    def __rsub__(self, other) -> Tensor:
        return ops.sub(other, self)

    def __mul__(self, other) -> Tensor:
        return ops.mul(self, other)

    def __rmul__(self, other) -> Tensor:
        return ops.mul(other, self)

    def __truediv__(self, other) -> Tensor:
        return ops.div(self, other)

    def __rtruediv__(self, other) -> Tensor:
        return ops.div(other, self)

    def __pow__(self, exponent) -> Tensor:
        return ops.pow(self, exponent)

    def __rpow__(self, base) -> Tensor:
        # `2 ** t`: the number is the base, made a constant so ops.pow takes the Tensor-exponent path
        return ops.pow(ops.as_tensor(base, self), self)

    def __matmul__(self, other) -> Tensor:
        return ops.matmul(self, other)

    def __rmatmul__(self, other) -> Tensor:
        return ops.matmul(other, self)

    def __neg__(self) -> Tensor:
        return ops.neg(self)

    def __getitem__(self, idx) -> Tensor:
        return ops.getitem(self, idx)

    # ------------------------------------------------------------------ reductions
    def sum(self, axis=None, keepdims: bool = False) -> Tensor:
        return ops.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims: bool = False) -> Tensor:
        return ops.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims: bool = False) -> Tensor:
        return ops.max(self, axis, keepdims)

    # ------------------------------------------------------------------ shape
    def reshape(self, *shape) -> Tensor:
        """``t.reshape(2, 3)`` or ``t.reshape((2, 3))``, like ``ndarray.reshape``."""
        return ops.reshape(self, *shape)

    def transpose(self, *axes) -> Tensor:
        """Permute axes like ``ndarray.transpose``; no axes reverses them."""
        return ops.transpose(self, *axes)

    def swapaxes(self, ax1: int, ax2: int) -> Tensor:
        return ops.swapaxes(self, ax1, ax2)

    @property
    def T(self) -> Tensor:  # noqa: N802  (NumPy's and PyTorch's name)
        """All axes reversed: the transpose of a matrix."""
        return ops.transpose(self)

    # ------------------------------------------------------------------ elementwise functions
    def exp(self) -> Tensor:
        return ops.exp(self)

    def log(self) -> Tensor:
        return ops.log(self)

    def sqrt(self) -> Tensor:
        return ops.sqrt(self)

    def tanh(self) -> Tensor:
        return ops.tanh(self)

    def sigmoid(self) -> Tensor:
        return ops.sigmoid(self)

    def astype(self, dtype) -> Tensor:
        """A cast that stays in the graph: the gradient is cast back to this tensor's dtype."""
        return ops.astype(self, dtype)

    # ------------------------------------------------------------------ conveniences
    def __len__(self) -> int:
        return len(self.data)

    def detach(self) -> Tensor:
        """The same data, cut from the graph (no gradient flows through it)."""
        return Tensor(self.data)

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU when it lives there)."""
        return backend.to_numpy(self.data)

    def item(self) -> float:
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def to(self, device: str) -> Tensor:
        """A new leaf on ``device`` ("cpu"/"cuda") with the same requires_grad; its data is copied
        across devices and shared when already there (``backend.to_device``)."""
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if flag and self.data.dtype.kind != "f":
            raise ValueError(f"only floating-point tensors can require grad, got {self.dtype}; "
                             "convert with .astype(np.float32) first")
        self.requires_grad = flag
        return self

    def __repr__(self) -> str:
        extra = ", requires_grad=True" if self.requires_grad else ""
        op = f", op={self._op!r}" if self._op else ""
        return f"Tensor({backend.to_numpy(self.data)!r}{extra}{op})"

    def __hash__(self):
        return id(self)  # tensors are graph nodes: hashed by identity, as torch.Tensor is
