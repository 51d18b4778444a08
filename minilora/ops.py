"""The primitive operations of the autograd engine, each with its forward and, right below, its backward.

Every function takes Tensors (or numbers/arrays, which become constants), computes the result on the
arrays with NumPy-style calls on whichever module holds them (NumPy or CuPy), and attaches a closure
that turns ``out.grad`` into the parents' gradients. The rules, as in micrograd:

* gradients are *added* into ``parent.grad`` (``parent._accum``), so reuse of a node sums up;
* broadcasting in the forward pass is undone in the backward pass by summing over the expanded axes
  (``unbroadcast``), which is the most common bug in hand-written backprop;
* a parent with ``requires_grad=False`` is skipped *before* any work is done for it.

Composite operations (softmax, norms, attention, ...) live in ``functional.py`` and are built from
these, so they need no backward of their own; the few composites here (``mean``, ``swapaxes``, a
matmul with a vector) call the primitives beside them. The Tensor operators (``+ - * / ** @``,
``sum``, ``reshape``, ...) are methods written in ``Tensor``'s class body (``tensor.py``), each
calling the function of the same meaning here.

This module imports only the graph machinery (``autograd.TensorBase``), never ``tensor.py``: results
are made by ``TensorBase._result`` and constants by ``TensorBase._constant``, which build plain
``minilora.Tensor`` objects (annotated ``TensorBase`` here). Inside this file ops call each other as
functions, not as Tensor methods, so the imports run autograd <- ops <- tensor with no cycle.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .autograd import TensorBase


def as_tensor(x, like: TensorBase | None = None) -> TensorBase:
    """Tensors pass through; numbers and arrays become constants in ``like``'s dtype and device."""
    if isinstance(x, TensorBase):
        return x
    if like is not None:
        xpmod = backend.get_xp(like.data)
        return TensorBase._constant(xpmod.asarray(x, dtype=like.data.dtype))
    return TensorBase._constant(x)


def unbroadcast(grad, shape: tuple):
    """Sum ``grad`` over the axes that broadcasting added or stretched, giving it ``shape`` again.

    Example: a (3, 1) tensor added to a (2, 3, 4) one gets a (2, 3, 4) gradient; summing over axis 0
    (added) and axis 2 (stretched from 1) gives back (3, 1).
    """
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


# ============================================================== elementwise, binary
def add(a, b) -> TensorBase:
    a = as_tensor(a, b if isinstance(b, TensorBase) else None)
    b = as_tensor(b, a)
    out = TensorBase._result(a.data + b.data, (a, b), "+")

    def _backward():
        if a.requires_grad:
            a._accum(unbroadcast(out.grad, a.shape))
        if b.requires_grad:
            b._accum(unbroadcast(out.grad, b.shape))
    out._set_backward(_backward)
    return out


def sub(a, b) -> TensorBase:
    a = as_tensor(a, b if isinstance(b, TensorBase) else None)
    b = as_tensor(b, a)
    out = TensorBase._result(a.data - b.data, (a, b), "-")

    def _backward():
        if a.requires_grad:
            a._accum(unbroadcast(out.grad, a.shape))
        if b.requires_grad:
            b._accum(unbroadcast(-out.grad, b.shape), fresh=True)
    out._set_backward(_backward)
    return out


def mul(a, b) -> TensorBase:
    a = as_tensor(a, b if isinstance(b, TensorBase) else None)
    b = as_tensor(b, a)
    out = TensorBase._result(a.data * b.data, (a, b), "*")

    def _backward():
        if a.requires_grad:
            a._accum(unbroadcast(out.grad * b.data, a.shape), fresh=True)
        if b.requires_grad:
            b._accum(unbroadcast(out.grad * a.data, b.shape), fresh=True)
    out._set_backward(_backward)
    return out


def div(a, b) -> TensorBase:
    a = as_tensor(a, b if isinstance(b, TensorBase) else None)
    b = as_tensor(b, a)
    out = TensorBase._result(a.data / b.data, (a, b), "/")

    def _backward():
        if a.requires_grad:  # d(a/b)/da = 1/b
            a._accum(unbroadcast(out.grad / b.data, a.shape), fresh=True)
        if b.requires_grad:  # d(a/b)/db = -a/b^2 = -out/b
            b._accum(unbroadcast(-out.grad * out.data / b.data, b.shape), fresh=True)
    out._set_backward(_backward)
    return out


def pow(a, b) -> TensorBase:  # noqa: A001  (mirrors the ** operator)
    """a ** b. A number exponent is the common case (x ** 2); a Tensor exponent also works."""
    a = as_tensor(a, b if isinstance(b, TensorBase) else None)
    if not isinstance(b, TensorBase):
        p = float(b)
        out = TensorBase._result(a.data ** p, (a,), f"**{p:g}")

        def _backward():
            if a.requires_grad:  # d(a^p)/da = p a^(p-1)
                a._accum(out.grad * (p * a.data ** (p - 1)), fresh=True)
        out._set_backward(_backward)
        return out
    xpmod = backend.get_xp(a.data)
    out = TensorBase._result(a.data ** b.data, (a, b), "**")

    def _backward():
        if a.requires_grad:
            a._accum(unbroadcast(out.grad * b.data * a.data ** (b.data - 1), a.shape), fresh=True)
        if b.requires_grad:  # d(a^b)/db = a^b log a
            b._accum(unbroadcast(out.grad * out.data * xpmod.log(a.data), b.shape), fresh=True)
    out._set_backward(_backward)
    return out


def neg(a: TensorBase) -> TensorBase:
    out = TensorBase._result(-a.data, (a,), "neg")

    def _backward():
        if a.requires_grad:
            a._accum(-out.grad, fresh=True)
    out._set_backward(_backward)
    return out


# ============================================================== elementwise, unary
def exp(a: TensorBase) -> TensorBase:
    xpmod = backend.get_xp(a.data)
    out = TensorBase._result(xpmod.exp(a.data), (a,), "exp")

    def _backward():
        if a.requires_grad:  # d e^a = e^a
            a._accum(out.grad * out.data, fresh=True)
    out._set_backward(_backward)
    return out


def log(a: TensorBase) -> TensorBase:
    xpmod = backend.get_xp(a.data)
    out = TensorBase._result(xpmod.log(a.data), (a,), "log")

    def _backward():
        if a.requires_grad:
            a._accum(out.grad / a.data, fresh=True)
    out._set_backward(_backward)
    return out


def sqrt(a: TensorBase) -> TensorBase:
    xpmod = backend.get_xp(a.data)
    out = TensorBase._result(xpmod.sqrt(a.data), (a,), "sqrt")

    def _backward():
        if a.requires_grad:  # d sqrt(a) = 1 / (2 sqrt(a))
            a._accum(out.grad * 0.5 / out.data, fresh=True)
    out._set_backward(_backward)
    return out


def tanh(a: TensorBase) -> TensorBase:
    xpmod = backend.get_xp(a.data)
    out = TensorBase._result(xpmod.tanh(a.data), (a,), "tanh")

    def _backward():
        if a.requires_grad:  # d tanh = 1 - tanh^2
            a._accum(out.grad * (1 - out.data * out.data), fresh=True)
    out._set_backward(_backward)
    return out


def sigmoid(a: TensorBase) -> TensorBase:
    xpmod = backend.get_xp(a.data)
    # 1/(1+e^-x) overflows e^-x for x << 0; the tanh form is the same function and never overflows.
    out = TensorBase._result(0.5 * xpmod.tanh(0.5 * a.data) + 0.5, (a,), "sigmoid")

    def _backward():
        if a.requires_grad:  # d sigmoid = s (1 - s)
            a._accum(out.grad * out.data * (1 - out.data), fresh=True)
    out._set_backward(_backward)
    return out


def erf(a: TensorBase) -> TensorBase:
    """The error function (NumPy has none): Abramowitz & Stegun 7.1.26, |error| < 1.5e-7, which is
    float32 rounding. The backward uses the exact derivative 2/sqrt(pi) exp(-x^2)."""
    xpmod = backend.get_xp(a.data)
    x = a.data
    t = 1.0 / (1.0 + 0.3275911 * xpmod.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    y = xpmod.sign(x) * (1.0 - poly * xpmod.exp(-x * x))
    out = TensorBase._result(y.astype(x.dtype, copy=False), (a,), "erf")

    def _backward():
        if a.requires_grad:
            a._accum(out.grad * (2.0 / np.sqrt(np.pi)) * xpmod.exp(-x * x), fresh=True)
    out._set_backward(_backward)
    return out


def maximum(a, b) -> TensorBase:
    """Elementwise max; where a == b the gradient is split evenly (as torch.maximum does)."""
    a = as_tensor(a, b if isinstance(b, TensorBase) else None)
    b = as_tensor(b, a)
    xpmod = backend.get_xp(a.data, b.data)
    out = TensorBase._result(xpmod.maximum(a.data, b.data), (a, b), "maximum")

    def _backward():
        share_a = (a.data > b.data) + 0.5 * (a.data == b.data)
        if a.requires_grad:
            a._accum(unbroadcast(out.grad * share_a, a.shape), fresh=True)
        if b.requires_grad:
            b._accum(unbroadcast(out.grad * (1 - share_a), b.shape), fresh=True)
    out._set_backward(_backward)
    return out


def astype(a: TensorBase, dtype) -> TensorBase:
    """Cast (e.g. float16 <-> float32); the gradient is cast back to the input's dtype."""
    out = TensorBase._result(a.data.astype(dtype), (a,), f"astype({np.dtype(dtype).name})")

    def _backward():
        if a.requires_grad:
            a._accum(out.grad.astype(a.data.dtype), fresh=True)
    out._set_backward(_backward)
    return out


def where(cond, a, b) -> TensorBase:
    """Pick from a where cond is true, else from b (cond is a boolean array; no gradient)."""
    cond = cond.data if isinstance(cond, TensorBase) else cond
    like = a if isinstance(a, TensorBase) else b if isinstance(b, TensorBase) else None
    a, b = as_tensor(a, like), as_tensor(b, like)
    xpmod = backend.get_xp(a.data, b.data)
    out = TensorBase._result(xpmod.where(cond, a.data, b.data), (a, b), "where")

    def _backward():
        zero = xpmod.zeros((), dtype=out.grad.dtype)
        if a.requires_grad:
            a._accum(unbroadcast(xpmod.where(cond, out.grad, zero), a.shape), fresh=True)
        if b.requires_grad:
            b._accum(unbroadcast(xpmod.where(cond, zero, out.grad), b.shape), fresh=True)
    out._set_backward(_backward)
    return out


# ============================================================== matrix product
def matmul(a, b) -> TensorBase:
    """a @ b with NumPy's rules: batched over leading axes, which broadcast.

    When b is a 2-D weight shared by a batch of rows (x @ W.T in every Linear), the forward pass and
    both gradients are single large GEMMs on (batch*seq, features) views instead of a loop of small
    ones, and dL/db sums over the batch inside that GEMM.
    """
    a = as_tensor(a, b if isinstance(b, TensorBase) else None)
    b = as_tensor(b, a)
    if a.ndim == 1 or b.ndim == 1:  # vectors: promote to matrices, then drop the added axis
        a2 = reshape(a, 1, -1) if a.ndim == 1 else a    # (k,) -> (1, k)
        b2 = reshape(b, -1, 1) if b.ndim == 1 else b    # (k,) -> (k, 1)
        out = matmul(a2, b2)
        shape = out.shape[:-2] + (() if a.ndim == 1 else out.shape[-2:-1]) \
            + (() if b.ndim == 1 else out.shape[-1:])
        return reshape(out, *shape)                     # the size-1 axis of each vector dropped

    shared_weight = b.ndim == 2 and a.ndim > 2
    if shared_weight:
        k, n = b.shape
        y = (a.data.reshape(-1, k) @ b.data).reshape(*a.shape[:-1], n)  # (..., n) one GEMM
    else:
        y = a.data @ b.data
    out = TensorBase._result(y, (a, b), "@")

    def _backward():
        g = out.grad
        if a.requires_grad:  # dL/da = g @ b^T, summed over axes a was broadcast along
            if shared_weight:
                ga = (g.reshape(-1, n) @ b.data.T).reshape(a.shape)  # (..., k)
            else:
                ga = unbroadcast(g @ b.data.swapaxes(-1, -2), a.shape)
            a._accum(ga, fresh=True)
        if b.requires_grad:  # dL/db = a^T @ g
            if shared_weight:
                gb = a.data.reshape(-1, k).T @ g.reshape(-1, n)  # (k, n), batch summed in the GEMM
            else:
                gb = unbroadcast(a.data.swapaxes(-1, -2) @ g, b.shape)
            b._accum(gb, fresh=True)
    out._set_backward(_backward)
    return out


# ============================================================== reductions
def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(ax % ndim for ax in axes))


def sum(a: TensorBase, axis=None, keepdims: bool = False) -> TensorBase:  # noqa: A001
    axes = _norm_axes(axis, a.ndim)
    out = TensorBase._result(a.data.sum(axis=axes, keepdims=keepdims), (a,), "sum")

    def _backward():
        if a.requires_grad:  # every summed element gets the same gradient: broadcast it back
            xpmod = backend.get_xp(out.grad)
            g = out.grad if keepdims else xpmod.expand_dims(out.grad, axes)
            a._accum(xpmod.broadcast_to(g, a.shape))
    out._set_backward(_backward)
    return out


def max(a: TensorBase, axis=None, keepdims: bool = False) -> TensorBase:  # noqa: A001
    """Maximum over axes; tied maxima share the gradient equally (like torch.amax)."""
    axes = _norm_axes(axis, a.ndim)
    m = a.data.max(axis=axes, keepdims=True)
    out = TensorBase._result(m if keepdims else m.reshape([n for i, n in enumerate(m.shape)
                                                       if i not in axes]), (a,), "max")

    def _backward():
        if a.requires_grad:
            xpmod = backend.get_xp(out.grad)
            g = out.grad if keepdims else xpmod.expand_dims(out.grad, axes)
            winners = (a.data == m).astype(a.data.dtype)
            a._accum(winners * (g / winners.sum(axis=axes, keepdims=True)), fresh=True)
    out._set_backward(_backward)
    return out


# ============================================================== shape and indexing
def reshape(a: TensorBase, *shape) -> TensorBase:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    out = TensorBase._result(a.data.reshape(shape), (a,), "reshape")

    def _backward():
        if a.requires_grad:
            a._accum(out.grad.reshape(a.shape))
    out._set_backward(_backward)
    return out


def transpose(a: TensorBase, *axes) -> TensorBase:
    """Permute axes like ``ndarray.transpose``; no axes reverses them (``.T``)."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    axes = tuple(ax % a.ndim for ax in axes) if axes else tuple(reversed(range(a.ndim)))
    out = TensorBase._result(a.data.transpose(axes), (a,), "transpose")

    def _backward():
        if a.requires_grad:  # apply the inverse permutation
            a._accum(out.grad.transpose(np.argsort(axes)))
    out._set_backward(_backward)
    return out


def swapaxes(a: TensorBase, ax1: int, ax2: int) -> TensorBase:
    """Exchange two axes, e.g. ``k.swapaxes(-1, -2)`` for k transposed (built on transpose)."""
    perm = list(range(a.ndim))
    perm[ax1], perm[ax2] = perm[ax2], perm[ax1]
    return transpose(a, *perm)


def _is_basic_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(isinstance(i, (int, np.integer, slice)) or i is None or i is Ellipsis for i in items)


def getitem(a: TensorBase, idx) -> TensorBase:
    """Indexing with ints, slices, None, Ellipsis, boolean or integer arrays (NumPy semantics)."""
    if isinstance(idx, TensorBase):
        idx = idx.data
    elif isinstance(idx, tuple):
        idx = tuple(i.data if isinstance(i, TensorBase) else i for i in idx)
    out = TensorBase._result(a.data[idx], (a,), "getitem")

    def _backward():
        if a.requires_grad:
            xpmod = backend.get_xp(out.grad)
            g = xpmod.zeros_like(a.data)
            if _is_basic_index(idx):
                g[idx] = out.grad           # a view: every element picked at most once
            else:
                backend.scatter_add(g, idx, out.grad)  # an index may repeat: add, don't overwrite
            a._accum(g, fresh=True)
    out._set_backward(_backward)
    return out


def concatenate(tensors, axis: int = 0) -> TensorBase:
    tensors = [as_tensor(t) for t in tensors]
    xpmod = backend.get_xp(*[t.data for t in tensors])
    out = TensorBase._result(xpmod.concatenate([t.data for t in tensors], axis=axis), tuple(tensors),
                         "concatenate")

    def _backward():
        start = 0
        for t in tensors:  # each input gets back its own slice of the gradient
            n = t.shape[axis]
            if t.requires_grad:
                sl = [slice(None)] * out.ndim
                sl[axis] = slice(start, start + n)
                t._accum(out.grad[tuple(sl)])
            start += n
    out._set_backward(_backward)
    return out


def embedding(ids, weight: TensorBase) -> TensorBase:
    """weight[ids]: look up rows of a (vocab, dim) table for an integer array of ids.

    The backward adds each position's gradient into its token's row; a token that occurs many times
    collects all of them (a scatter-add, ``backend.scatter_add``).
    """
    ids = ids.data if isinstance(ids, TensorBase) else ids
    out = TensorBase._result(weight.data[ids], (weight,), "embedding")  # (*ids.shape, dim)

    def _backward():
        if weight.requires_grad:
            xpmod = backend.get_xp(out.grad)
            g = xpmod.zeros_like(weight.data)
            backend.scatter_add(g, ids.reshape(-1), out.grad.reshape(-1, weight.shape[-1]))
            weight._accum(g, fresh=True)
    out._set_backward(_backward)
    return out


# ============================================================== composite
def mean(a: TensorBase, axis=None, keepdims: bool = False) -> TensorBase:
    """Composite: the sum divided by the number of elements reduced."""
    n = int(np.prod([a.shape[ax] for ax in _norm_axes(axis, a.ndim)]))
    return mul(sum(a, axis, keepdims), 1.0 / n)
