"""Neural-network functions (imported as ``F``): composites of the primitives, plus a few fused ops.

Most functions here are *composites*: written with Tensor operations from ``ops.py``, they get their
gradient for free, like tinygrad's. A few are *fused*: softmax, log_softmax, cross_entropy, rms_norm
and layer_norm have a hand-written backward because their composite form stores several full-size
intermediates and walks the data many times; each fused op is tested against its composite twin
(``tests/test_functional.py``) and against PyTorch.

Shapes follow PyTorch: Linear weights are (out, in), activations (batch, seq, hidden), attention
(batch, heads, seq, head_dim).
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from . import ops
from .ops import as_tensor, concatenate, embedding, erf, sigmoid, where  # noqa: F401  (re-exported)
from .tensor import Tensor

__all__ = ["relu", "gelu", "silu", "sigmoid", "softmax", "log_softmax", "cross_entropy", "rms_norm",
           "layer_norm", "dropout", "embedding", "linear", "scaled_dot_product_attention",
           "concatenate", "stack", "split", "where", "erf", "causal_mask"]


# ============================================================== activations (composites)
def relu(x: Tensor) -> Tensor:
    """max(x, 0): the gradient passes where x > 0."""
    return where(x.data > 0, x, 0.0)


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x) (a.k.a. swish), Llama's MLP activation."""
    return x * sigmoid(x)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """x * Phi(x). ``approximate="none"`` uses erf (as torch's default); ``"tanh"`` the GPT-2 form."""
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + ops.tanh(c * (x + 0.044715 * x * x * x)))
    if approximate != "none":
        raise ValueError(f"gelu approximate={approximate!r}; use 'none' or 'tanh'")
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ W^T (+ b), with W of shape (out, in) as in torch.nn.Linear."""
    y = x @ weight.T  # (..., in) @ (in, out) -> (..., out)
    return y + bias if bias is not None else y


# ============================================================== fused: softmax family
def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the max so exp never overflows.

    Backward: for s = softmax(x), dL/dx = s * (g - sum(g * s)) along the axis.
    """
    xpmod = backend.get_xp(x.data)
    e = xpmod.exp(x.data - x.data.max(axis=axis, keepdims=True))
    s = e / e.sum(axis=axis, keepdims=True)
    out = Tensor._result(s, (x,), "softmax")

    def _backward():
        if x.requires_grad:
            g = out.grad
            x._accum(s * (g - (g * s).sum(axis=axis, keepdims=True)), fresh=True)
    out._set_backward(_backward)
    return out


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """x - logsumexp(x). Backward: dL/dx = g - softmax(x) * sum(g)."""
    xpmod = backend.get_xp(x.data)
    z = x.data - x.data.max(axis=axis, keepdims=True)
    y = z - xpmod.log(xpmod.exp(z).sum(axis=axis, keepdims=True))
    out = Tensor._result(y, (x,), "log_softmax")

    def _backward():
        if x.requires_grad:
            g = out.grad
            x._accum(g - xpmod.exp(y) * g.sum(axis=axis, keepdims=True), fresh=True)
    out._set_backward(_backward)
    return out


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100,
                  reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer ``targets`` under ``softmax(logits)``, as in PyTorch.

    ``logits`` (..., C) and ``targets`` (...) of integer class ids; positions whose target equals
    ``ignore_index`` (padding, prompt tokens) count for nothing, and "mean" divides by the number of
    the others (NaN when there are none, as PyTorch gives). Backward: (softmax - onehot) / n.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; use 'mean' or 'sum'")
    targets = targets.data if isinstance(targets, Tensor) else targets
    xpmod = backend.get_xp(logits.data)
    targets = xpmod.asarray(targets)
    C = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets shape {targets.shape} must equal logits shape "
                         f"without the class axis {logits.shape[:-1]}")
    z = logits.data.reshape(-1, C)                           # (N, C)
    t = targets.reshape(-1)                                   # (N,)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= C))
    if bool(bad.any()):
        raise ValueError(f"cross_entropy: target id {int(t[bad][0])} is outside [0, {C}) and is not "
                         f"ignore_index={ignore_index}; check the labels or the vocab size")
    safe_t = xpmod.where(valid, t, 0)
    rows = xpmod.arange(z.shape[0])
    zmax = z.max(axis=1, keepdims=True)
    lse = xpmod.log(xpmod.exp(z - zmax).sum(axis=1, keepdims=True)) + zmax  # (N, 1) logsumexp
    nll = (lse[:, 0] - z[rows, safe_t]) * valid                # (N,)
    n_valid = valid.sum()
    denom = n_valid.astype(z.dtype) if reduction == "mean" else z.dtype.type(1)
    out = Tensor._result(nll.sum() / denom, (logits,), "cross_entropy")

    def _backward():
        if logits.requires_grad:
            p = xpmod.exp(z - lse)                             # (N, C) softmax
            p[rows, safe_t] -= 1.0                             # minus the one-hot target
            p *= (valid * (out.grad / denom)).astype(z.dtype)[:, None]
            logits._accum(p.reshape(logits.shape), fresh=True)
    out._set_backward(_backward)
    return out


# ============================================================== fused: normalisation
def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich 2019; Llama's norm).

    With r = 1/sqrt(mean(x^2)+eps), xhat = x r, y = xhat * w:
    dL/dw = sum_rows(g * xhat);  dL/dx = r * (gw - xhat * mean(gw * xhat)),  gw = g * w.
    """
    xpmod = backend.get_xp(x.data)
    r = 1.0 / xpmod.sqrt((x.data * x.data).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = x.data * r
    parents = (x,) if weight is None else (x, weight)
    out = Tensor._result(xhat if weight is None else xhat * weight.data, parents, "rms_norm")

    def _backward():
        g = out.grad
        if weight is not None and weight.requires_grad:
            weight._accum((g * xhat).reshape(-1, x.shape[-1]).sum(axis=0), fresh=True)
        if x.requires_grad:
            gw = g if weight is None else g * weight.data
            x._accum(r * (gw - xhat * (gw * xhat).mean(axis=-1, keepdims=True)), fresh=True)
    out._set_backward(_backward)
    return out


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (Ba et al. 2016).

    dL/dx = r * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = g * w.
    """
    xpmod = backend.get_xp(x.data)
    mu = x.data.mean(axis=-1, keepdims=True)
    xc = x.data - mu
    r = 1.0 / xpmod.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * r
    y = xhat if weight is None else xhat * weight.data
    if bias is not None:
        y = y + bias.data
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    out = Tensor._result(y, parents, "layer_norm")

    def _backward():
        g = out.grad
        D = x.shape[-1]
        if bias is not None and bias.requires_grad:
            bias._accum(g.reshape(-1, D).sum(axis=0), fresh=True)
        if weight is not None and weight.requires_grad:
            weight._accum((g * xhat).reshape(-1, D).sum(axis=0), fresh=True)
        if x.requires_grad:
            gw = g if weight is None else g * weight.data
            x._accum(r * (gw - gw.mean(axis=-1, keepdims=True)
                          - xhat * (gw * xhat).mean(axis=-1, keepdims=True)), fresh=True)
    out._set_backward(_backward)
    return out


# ============================================================== regularisation
def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout), so
    that eval mode (no dropout) needs no rescaling. Identity when not training or p == 0."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    xpmod = backend.get_xp(x.data)
    keep = backend.random_uniform(x.shape, xpmod, x.data.dtype) >= p
    mask = keep.astype(x.data.dtype) * x.data.dtype.type(1.0 / (1.0 - p))
    return x * Tensor(xpmod.asarray(mask))


# ============================================================== attention
_mask_cache: dict = {}


def causal_mask(Tq: int, Tk: int, xpmod, dtype):
    """Additive mask (Tq, Tk): 0 where query i may see key j, -inf where j is in its future.

    Queries are the *last* Tq positions of the Tk keys (bottom-right alignment), which is what a
    KV cache needs: one new query at position Tk-1 sees every cached key.
    """
    key = (Tq, Tk, xpmod.__name__, np.dtype(dtype).name)
    if key not in _mask_cache:
        i = xpmod.arange(Tq)[:, None] + (Tk - Tq)
        j = xpmod.arange(Tk)[None, :]
        _mask_cache[key] = xpmod.where(j > i, -xpmod.inf, 0.0).astype(dtype)
    return _mask_cache[key]


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 attn_mask=None, scale: float | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017), built from primitives.

    q: (..., Tq, d), k and v: (..., Tk, d); leading axes broadcast (grouped-query attention passes
    k/v with a size-1 axis for the query heads that share them). ``attn_mask`` is a boolean array
    (True = may attend) or an additive float array, broadcastable to (..., Tq, Tk).
    """
    xpmod = backend.get_xp(q.data)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.swapaxes(-1, -2)) * scale      # (..., Tq, d) @ (..., d, Tk) -> (..., Tq, Tk)
    if causal:
        scores = scores + causal_mask(q.shape[-2], k.shape[-2], xpmod, scores.dtype)
    if attn_mask is not None:
        m = attn_mask.data if isinstance(attn_mask, Tensor) else xpmod.asarray(attn_mask)
        if m.dtype == bool:
            m = xpmod.where(m, 0.0, -xpmod.inf).astype(scores.dtype)
        scores = scores + m
    weights = softmax(scores, axis=-1)               # (..., Tq, Tk)
    return weights @ v                                # (..., Tq, Tk) @ (..., Tk, d) -> (..., Tq, d)


# ============================================================== joining and splitting
def stack(tensors, axis: int = 0) -> Tensor:
    """Join along a new axis: each input gets a size-1 axis, then they are concatenated."""
    tensors = [as_tensor(t) for t in tensors]
    ax = axis % (tensors[0].ndim + 1)
    expanded = [t.reshape(*t.shape[:ax], 1, *t.shape[ax:]) for t in tensors]
    return concatenate(expanded, axis=ax)


def split(x: Tensor, sections, axis: int = 0) -> list:
    """Split into equal parts (an int) or at the given sizes (a list of ints), like torch.split."""
    n = x.shape[axis]
    if isinstance(sections, int):
        if n % sections:
            raise ValueError(f"cannot split axis of size {n} into chunks of {sections}")
        sizes = [sections] * (n // sections)
    else:
        sizes = list(sections)
        if sum(sizes) != n:
            raise ValueError(f"split sizes {sizes} add up to {sum(sizes)}, not the axis size {n}")
    parts, start = [], 0
    for s in sizes:
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(start, start + s)
        parts.append(x[tuple(idx)])
        start += s
    return parts
