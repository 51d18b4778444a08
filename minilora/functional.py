"""Neural-network functions (imported as ``F``): composites of the primitives, plus a few fused ops.

Most functions here are *composites*: written with Tensor operations from ``ops.py``, they get their
gradient for free, like tinygrad's. A few are *fused*: softmax, log_softmax, cross_entropy, rms_norm
and layer_norm have a hand-written backward because their composite form stores several full-size
intermediates and walks the data many times; each fused op is tested against its composite twin
(``tests/test_functional_fused.py``) and against PyTorch. On CUDA, softmax, log_softmax, cross_entropy and
rms_norm of float32 arrays run as kernels of minilora's own (``cuda_kernels.py``: one thread block per
row); everywhere else (NumPy, float64 gradient checks) the array code below runs.

Shapes follow PyTorch: Linear weights are (out, in), activations (batch, seq, hidden), attention
(batch, heads, seq, head_dim).
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .fast import cuda_kernels
from . import ops
from .fast import parallel
from .ops import as_tensor, concatenate, embedding, erf, sigmoid, where  # noqa: F401  (re-exported)
from .tensor import Tensor

__all__ = ["relu", "gelu", "silu", "sigmoid", "softmax", "log_softmax", "cross_entropy", "rms_norm",
           "layer_norm", "dropout", "embedding", "linear", "scaled_dot_product_attention",
           "concatenate", "stack", "split", "where", "erf", "causal_mask", "rotary_embedding", "swiglu",
           "rotate_half", "rotary_embedding_composite", "scaled_dot_product_attention_composite"]


# Set to False to run the fused ops on CuPy with generic array calls instead of minilora's CUDA
# kernels (benchmarks/gpu.py times one against the other).
USE_CUDA_KERNELS = True


def _cuda_rows(*arrays) -> bool:
    """True when a fused row op on these arrays runs as a CUDA kernel (``cuda_kernels``): all are
    non-empty float32 CuPy arrays. The caller checks that the op reduces over the last axis."""
    return (USE_CUDA_KERNELS and all(backend.get_xp(a) is not np and a.dtype == np.float32
                                     and a.size > 0 and a.ndim > 0 for a in arrays))


def _last_axis(x: Tensor, axis: int) -> bool:
    return axis in (-1, x.ndim - 1)


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
    """y = x @ W^T (+ b), with W of shape (out, in) as in torch.nn.Linear; one graph node.

    All three products are single 2-D GEMMs over the (batch * seq, features) rows, and each
    gradient is computed only for an input that requires it (a frozen W costs no dW GEMM):
        y = x W^T,   dx = g W,   dW = g^T x  (out, in: the weight's own layout, no transpose copy).
    On the CPU each GEMM's rows are split across threads (``parallel.matmul``).
    """
    xd, w = x.data, weight.data
    n_out, n_in = w.shape
    if xd.shape[-1] != n_in:
        raise ValueError(f"linear: input has {xd.shape[-1]} features but the weight expects {n_in} "
                         f"(weight shape {w.shape})")
    x2 = xd.reshape(-1, n_in)                                   # (N, in)
    y = parallel.matmul(x2, w.T).reshape(*xd.shape[:-1], n_out)  # (N, in) @ (in, out) -> (..., out)
    out = Tensor._result(y, (x, weight), "linear")

    def _backward():
        g2 = out.grad.reshape(-1, n_out)                        # (N, out)
        if x.requires_grad:                                     # (N, out) @ (out, in) -> (..., in)
            x._accum(parallel.matmul(g2, w).reshape(xd.shape), fresh=True)
        if weight.requires_grad:                                # (out, N) @ (N, in) -> (out, in)
            weight._accum(parallel.matmul(g2.T, x2), fresh=True)
    out._set_backward(_backward)
    return out + bias if bias is not None else out


# ============================================================== fused: softmax family
def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the max so exp never overflows.

    Backward: for s = softmax(x), dL/dx = s * (g - sum(g * s)) along the axis.
    """
    if _cuda_rows(x.data) and _last_axis(x, axis):
        return _softmax_cuda(x)
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
    if _cuda_rows(x.data) and _last_axis(x, axis):
        return _log_softmax_cuda(x)
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
    n_valid = valid.sum()
    denom = n_valid.astype(z.dtype) if reduction == "mean" else z.dtype.type(1)
    if _cuda_rows(z):
        return _cross_entropy_cuda(logits, z, t, ignore_index, denom)
    safe_t = xpmod.where(valid, t, 0)
    rows = xpmod.arange(z.shape[0])
    zmax = z.max(axis=1, keepdims=True)
    lse = xpmod.log(xpmod.exp(z - zmax).sum(axis=1, keepdims=True)) + zmax  # (N, 1) logsumexp
    nll = (lse[:, 0] - z[rows, safe_t]) * valid                # (N,)
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
    Row dot products use einsum (multiply and sum in one pass, no temporary); on the CPU the rows
    are split across threads (``minilora.fast.parallel``).
    """
    if _cuda_rows(x.data) and (weight is None or (_cuda_rows(weight.data)
                                                   and weight.shape == x.shape[-1:])):
        return _rms_norm_cuda(x, weight, eps)
    xpmod = backend.get_xp(x.data)
    C = x.shape[-1]
    x2 = x.data.reshape(-1, C)                                  # (N, C)
    N = x2.shape[0]
    w = weight.data if weight is not None else None
    r = xpmod.empty((N, 1), dtype=x2.dtype)                     # 1 / rms, per row
    xhat = xpmod.empty_like(x2)
    y = xpmod.empty_like(x2) if w is not None else xhat

    def fwd(rows):
        xr = x2[rows]
        ms = xpmod.einsum("ni,ni->n", xr, xr)[:, None]          # (n, 1) sum of squares
        ms *= 1.0 / C
        ms += eps
        xpmod.sqrt(ms, out=ms)
        xpmod.divide(1.0, ms, out=r[rows])
        xpmod.multiply(xr, r[rows], out=xhat[rows])
        if w is not None:
            xpmod.multiply(xhat[rows], w, out=y[rows])
    parallel.for_rows(fwd, N, x2.size, xpmod)
    parents = (x,) if weight is None else (x, weight)
    out = Tensor._result(y.reshape(x.shape), parents, "rms_norm")

    def _backward():
        g2 = out.grad.reshape(-1, C)
        if weight is not None and weight.requires_grad:
            weight._accum(xpmod.einsum("ni,ni->i", g2, xhat), fresh=True)
        if x.requires_grad:
            gx = xpmod.empty_like(x2)

            def bwd(rows):
                gw = g2[rows] * w if w is not None else g2[rows].copy()
                xh = xhat[rows]
                dot = xpmod.einsum("ni,ni->n", gw, xh)[:, None]  # (n, 1)
                dot *= 1.0 / C
                t = xpmod.multiply(xh, dot, out=gx[rows])
                xpmod.subtract(gw, t, out=t)
                t *= r[rows]
            parallel.for_rows(bwd, N, x2.size, xpmod)
            x._accum(gx.reshape(x.shape), fresh=True)
    out._set_backward(_backward)
    return out


# -------------------------------------------------------------- the same four ops as CUDA kernels
# The kernels (cuda_kernels.py) work on float32 rows (N, C); these functions reshape, launch, and
# attach the backward, with the same formulas as the array code above.
def _rowwise_cuda(x: Tensor, forward, backward, op: str) -> Tensor:
    """A row op whose backward needs only its output y: softmax (dx from s) and log_softmax."""
    C = x.shape[-1]
    y = forward(x.data.reshape(-1, C))                                 # (N, C)
    out = Tensor._result(y.reshape(x.shape), (x,), op)

    def _backward():
        if x.requires_grad:
            dx = backward(y, out.grad.reshape(-1, C))                  # (N, C)
            x._accum(dx.reshape(x.shape), fresh=True)
    out._set_backward(_backward)
    return out


def _softmax_cuda(x: Tensor) -> Tensor:
    return _rowwise_cuda(x, cuda_kernels.softmax_forward_cuda, cuda_kernels.softmax_backward_cuda,
                         "softmax")


def _log_softmax_cuda(x: Tensor) -> Tensor:
    return _rowwise_cuda(x, cuda_kernels.log_softmax_forward_cuda,
                         cuda_kernels.log_softmax_backward_cuda, "log_softmax")


def _cross_entropy_cuda(logits: Tensor, z, t, ignore_index: int, denom) -> Tensor:
    """z (N, C) float32 logits, t (N,) targets already checked; denom n_valid (mean) or 1 (sum)."""
    lse, nll = cuda_kernels.cross_entropy_forward_cuda(z, t, ignore_index)   # (N,), (N,)
    out = Tensor._result(nll.sum() / denom, (logits,), "cross_entropy")

    def _backward():
        if logits.requires_grad:
            scale = out.grad / denom            # a 0-d device array: the host never waits for it
            dz = cuda_kernels.cross_entropy_backward_cuda(z, t, ignore_index, lse, scale)
            logits._accum(dz.reshape(logits.shape), fresh=True)
    out._set_backward(_backward)
    return out


def _rms_norm_cuda(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    xpmod = backend.get_xp(x.data)
    C = x.shape[-1]
    x2 = xpmod.ascontiguousarray(x.data.reshape(-1, C))         # (N, C), kept for the backward
    w = weight.data if weight is not None else None
    y, r = cuda_kernels.rms_norm_forward_cuda(x2, w, eps)       # (N, C), (N,)
    parents = (x,) if weight is None else (x, weight)
    out = Tensor._result(y.reshape(x.shape), parents, "rms_norm")

    def _backward():
        g2 = out.grad.reshape(-1, C)                            # (N, C)
        if weight is not None and weight.requires_grad:
            # dw = sum over rows of g * xhat: a column sum across blocks, which one block per row
            # cannot produce without atomics; CuPy's reduction does it in one pass (and with LoRA
            # the norm weights are frozen, so this never runs in fine-tuning).
            weight._accum(xpmod.einsum("ni,ni->i", g2, x2 * r[:, None]), fresh=True)
        if x.requires_grad:
            dx = cuda_kernels.rms_norm_backward_cuda(x2, w, r, g2)  # (N, C)
            x._accum(dx.reshape(x.shape), fresh=True)
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


# ============================================================== fused: the Llama block's other ops
def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis (composite; for the reference RoPE)."""
    h = x.shape[-1] // 2
    return concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rotary_embedding_composite(x: Tensor, cos, sin) -> Tensor:
    """RoPE as Hugging Face writes it: x * cos + rotate_half(x) * sin, with full-width tables
    cos/sin (..., d) = concat(c, c). The readable reference for ``rotary_embedding``."""
    return x * as_tensor(cos, x) + rotate_half(x) * as_tensor(sin, x)


def _swap_halves(a, xpmod):
    """[a1, a2] -> [a2, a1] on the last axis, as a new C-contiguous array (one copy)."""
    h = a.shape[-1] // 2
    return xpmod.ascontiguousarray(a.reshape(*a.shape[:-1], 2, h)[..., ::-1, :]).reshape(a.shape)


def rotary_embedding(x: Tensor, cos, sin) -> Tensor:
    """Rotary position embedding (Su et al. 2021), "rotate-half" convention, as one fused op.

    x: (..., d); cos, sin: Hugging Face's full-width tables (..., d) = concat(c, c), concat(s, s)
    with c, s = cos, sin(position * theta_i), broadcastable against x. Feature i of the first half
    and feature i of the second half form a pair rotated by the angle position * theta_i:

        out1 = x1 c - x2 s,    out2 = x2 c + x1 s,   i.e.  out = x * cos + swap(x) * [-s, s].

    A rotation's Jacobian is the rotation itself, so the backward is the rotation by *minus* the
    angle (its transpose): dx = g * cos + swap(g) * [s, -s]. Nothing is stored but the tables.
    The tables are expanded to x's trailing shape once per call, so that every multiply runs over
    contiguous memory with the leading (batch) axis as the only broadcast, split across threads.
    """
    xpmod = backend.get_xp(x.data)
    xd = x.data
    h = xd.shape[-1] // 2
    cos = xpmod.asarray(cos, dtype=xd.dtype)
    sin = xpmod.asarray(sin, dtype=xd.dtype)
    k = max(cos.ndim, sin.ndim)
    if k >= xd.ndim:
        raise ValueError(f"rotary_embedding: tables of {k} dims for x of shape {xd.shape}; the "
                         "tables must broadcast against x's trailing axes (e.g. (T, 1, d))")
    trailing = xd.shape[xd.ndim - k:]
    cos_t = xpmod.ascontiguousarray(xpmod.broadcast_to(cos, trailing))
    sin_t = xpmod.empty(trailing, dtype=xd.dtype)             # [-s, s]: the sign of rotate_half
    xpmod.negative(xpmod.broadcast_to(sin[..., :h], trailing[:-1] + (h,)), out=sin_t[..., :h])
    sin_t[..., h:] = xpmod.broadcast_to(sin[..., h:], trailing[:-1] + (h,))

    def rotate(a, sin_signed):
        """a * cos + swap(a) * sin_signed, a (lead, *trailing), rows of the leading axes in parallel."""
        lead = a.shape[:a.ndim - k]
        a2 = a.reshape(-1, *trailing)                            # (L, *trailing)
        res = xpmod.empty(a2.shape, dtype=a.dtype)

        def work(rows):
            sw = _swap_halves(a2[rows], xpmod)
            sw *= sin_signed
            xpmod.multiply(a2[rows], cos_t, out=res[rows])
            res[rows] += sw
        parallel.for_rows(work, a2.shape[0], a2.size, xpmod)
        return res.reshape(*lead, *trailing)

    out = Tensor._result(rotate(xd, sin_t), (x,), "rope")

    def _backward():
        if x.requires_grad:
            x._accum(rotate(out.grad, -sin_t), fresh=True)
    out._set_backward(_backward)
    return out


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, the gated linear unit of Llama's MLP (Shazeer 2020), as one fused op.

    With s = sigmoid(gate) and a = silu(gate) = gate * s:  out = a * up;
    d/dup = a;   d/dgate = up * (s + a (1 - s))   (the derivative of silu).
    The composite ``silu(gate) * up`` stores five full-size intermediates; this stores s and a.
    On the CPU the rows are split across threads (``minilora.fast.parallel``).
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {gate.shape} and up {up.shape} must have the same shape")
    xpmod = backend.get_xp(gate.data)
    D = gate.shape[-1]
    g, u = gate.data.reshape(-1, D), up.data.reshape(-1, D)     # (N, D)
    s, a, y = (xpmod.empty_like(g) for _ in range(3))

    def fwd(rows):
        sr = xpmod.multiply(g[rows], 0.5, out=s[rows])
        xpmod.tanh(sr, out=sr)                  # sigmoid(g) = (1 + tanh(g / 2)) / 2: never overflows
        sr *= 0.5
        sr += 0.5
        xpmod.multiply(g[rows], sr, out=a[rows])  # silu(gate)
        xpmod.multiply(a[rows], u[rows], out=y[rows])
    parallel.for_rows(fwd, g.shape[0], g.size, xpmod)
    out = Tensor._result(y.reshape(gate.shape), (gate, up), "swiglu")

    def _backward():
        go = out.grad.reshape(-1, D)
        du = xpmod.empty_like(g) if up.requires_grad else None
        dg = xpmod.empty_like(g) if gate.requires_grad else None

        def bwd(rows):
            if du is not None:
                xpmod.multiply(a[rows], go[rows], out=du[rows])
            if dg is not None:
                d = xpmod.subtract(1.0, s[rows], out=dg[rows])
                d *= a[rows]
                d += s[rows]                    # silu'(g) = s + a (1 - s)
                d *= u[rows]
                d *= go[rows]
        parallel.for_rows(bwd, g.shape[0], g.size, xpmod)
        if du is not None:
            up._accum(du.reshape(up.shape), fresh=True)
        if dg is not None:
            gate._accum(dg.reshape(gate.shape), fresh=True)
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


def _attention_mask_keymajor(attn_mask, xpmod, dtype):
    """An attention mask (boolean True = may attend, or additive float), broadcastable to
    (..., Tq, Tk), as an additive float array with its last two axes swapped: (..., Tk, Tq)."""
    m = attn_mask.data if isinstance(attn_mask, Tensor) else xpmod.asarray(attn_mask)
    if m.dtype == bool:
        m = xpmod.where(m, 0.0, -xpmod.inf)
    m = m.astype(dtype, copy=False)
    if m.ndim < 2:
        m = m.reshape((1,) * (2 - m.ndim) + m.shape)
    return m.swapaxes(-1, -2)


# -------------------------------------------------------------- attention kernels
def _batch_slices(xpmod, shapes, n_scores: int) -> list:
    """Slices of axis 0 (the batch) shared by arrays of ``shapes``, for ``parallel.run_chunks``;
    one slice(None) when they do not all have the same size there (broadcast batch axis)."""
    sizes = {shape[0] for shape in shapes}
    if len(sizes) != 1 or any(len(s) < 3 for s in shapes):
        return [slice(None)]
    return parallel.split_rows(sizes.pop(), n_scores, xpmod)


MIN_QUERY_BLOCK = 64   # causal attention is cut into query blocks of at least this many rows


def _query_blocks(Tq: int, Tk: int, causal: bool) -> list:
    """[(a, b, kend)]: query rows [a, b) and the keys [0, kend) they may see.

    Causal attention lets query i see keys up to i + (Tk - Tq) only, so the scores above the
    diagonal are wasted work. Cutting the queries into n blocks and giving each block only the keys
    it can see computes (n + 1) / 2n of the full Tq x Tk scores: 3/4 for 2 blocks, 5/8 for 4.
    """
    n = max(1, min(4, Tq // MIN_QUERY_BLOCK)) if causal and Tk >= Tq else 1
    bounds = np.linspace(0, Tq, n + 1).round().astype(int)
    return [(int(a), int(b), Tk - Tq + int(b) if causal else Tk)
            for a, b in zip(bounds[:-1], bounds[1:])]


def _bias_block(b, kend: int, qa: int, qb: int):
    """The part of a key-major additive bias (..., Tk or 1, Tq or 1) for keys < kend, queries [qa, qb)."""
    rows = slice(None) if b.shape[-2] == 1 else slice(0, kend)
    cols = slice(None) if b.shape[-1] == 1 else slice(qa, qb)
    return b[..., rows, cols]


def _sdpa_forward(qs, k, v, biases, blocks, causal: bool):
    """Per query block, the unnormalised attention weights E = exp(S - max), key-major ((..., kend,
    b - a)), with 1/rowsum (..., 1, b - a); and the output (..., Tq, d). Softmax is taken over the
    keys, axis -2 here; its division is applied to the output (b - a x d numbers) instead of to E."""
    xpmod = backend.get_xp(qs)
    lead = np.broadcast_shapes(qs.shape[:-2], k.shape[:-2], v.shape[:-2])
    y = xpmod.empty(lead + (qs.shape[-2], v.shape[-1]), dtype=qs.dtype)   # (..., Tq, d)
    saved = []
    for a, b, kend in blocks:
        st = k[..., :kend, :] @ qs[..., a:b, :].swapaxes(-1, -2)  # (..., kend, d) @ (..., d, b-a)
        if causal:    # only the last b - a keys can be in a query's future: mask that square only
            st[..., kend - (b - a):, :] += causal_mask(b - a, b - a, xpmod, st.dtype).T
        for bias in biases:                               # padding masks, additive
            bb = _bias_block(bias, kend, a, b)
            if np.broadcast_shapes(st.shape, bb.shape) == st.shape:
                st += bb
            else:                                         # the mask adds leading (batch) axes
                st = st + bb
        st -= st.max(axis=-2, keepdims=True)              # softmax over keys (axis -2), in place
        xpmod.exp(st, out=st)                             # E, (..., kend, b-a)
        inv_l = 1.0 / st.sum(axis=-2, keepdims=True)      # 1 / rowsum, (..., 1, b-a)
        yb = y[..., a:b, :]
        parallel.matmul_into(st.swapaxes(-1, -2), v[..., :kend, :], yb)  # (..., b-a, kend) @ (..., kend, d)
        yb *= inv_l.swapaxes(-1, -2)                      # normalise: P V = (E V) / rowsum
        saved.append((st, inv_l))
    return saved, y


def _sdpa_backward(g, y, saved, qs, k, v, blocks, scale, need_q: bool, need_k: bool, need_v: bool):
    """(dq, dk, dv) of one batch chunk (None when not needed). dq has the broadcast leading shape;
    dk and dv are already summed to k's and v's (GQA shares them across query heads).

    With P = E / l (l the row sums), every term has P next to G: dV = P^T G = E^T (G / l) and
    dS = P * (dP - rowsum(G * O)) = E * (V (G / l)^T - rowsum((G / l) * O)), so dividing G's rows by
    l (a (b - a) x d array) replaces normalising E."""
    xpmod = backend.get_xp(g)
    dq = xpmod.empty(g.shape[:-2] + qs.shape[-2:], dtype=g.dtype) if need_q else None
    dk = xpmod.zeros(k.shape, dtype=g.dtype) if need_k else None
    dv = xpmod.zeros(v.shape, dtype=g.dtype) if need_v else None
    for (a, b, kend), (et, inv_l) in zip(blocks, saved):
        gb = g[..., a:b, :] * inv_l.swapaxes(-1, -2)      # G / l, (..., b-a, d)
        if need_v:                                        # (..., kend, b-a) @ (..., b-a, d)
            dv[..., :kend, :] += ops.unbroadcast(et @ gb, v.shape[:-2] + (kend, v.shape[-1]))
        if need_q or need_k:
            dst = v[..., :kend, :] @ gb.swapaxes(-1, -2)  # (..., kend, d) @ (..., d, b-a)
            dst -= (gb * y[..., a:b, :]).sum(axis=-1)[..., None, :]  # minus rowsum(G/l * O): (..., 1, b-a)
            dst *= et                                     # dS^T (zero wherever the mask hid a key)
            if need_q:                                    # (..., b-a, kend) @ (..., kend, d)
                dq[..., a:b, :] = dst.swapaxes(-1, -2) @ k[..., :kend, :]
            if need_k:                                    # (..., kend, b-a) @ (..., b-a, d)
                dk[..., :kend, :] += ops.unbroadcast(dst @ qs[..., a:b, :],
                                                     k.shape[:-2] + (kend, k.shape[-1]))
    if need_q:
        dq *= dq.dtype.type(scale)
    return dq, dk, dv


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 attn_mask=None, scale: float | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017), fused: one graph node.

    q: (..., Tq, d), k and v: (..., Tk, d); leading axes broadcast, so grouped-query attention passes
    q as (B, n_kv, n_rep, Tq, d) and k, v as (B, n_kv, 1, Tk, d): the n_rep query heads of a group
    share one key/value head without copying it. ``causal`` hides future keys, aligned bottom-right
    (queries are the last Tq of the Tk positions, as with a KV cache); ``attn_mask`` is a boolean
    array (True = may attend) or an additive float array, broadcastable to (..., Tq, Tk).

    Same result as ``scaled_dot_product_attention_composite``, faster because:

    * the scores are held *key-major*, st[..., j, i] = k_j . q_i, so the softmax reductions run over
      axis -2, which NumPy vectorises across contiguous rows (reducing the last axis is several
      times slower); the matmuls absorb the transposes for free;
    * q is scaled once (Tq x d numbers) instead of the Tq x Tk scores; mask, max-shift and exp are
      done in place on one buffer, which the backward then reuses; the division by the row sums is
      applied to the (Tq, d) output instead of the (Tk, Tq) weights (and in the backward to G);
    * backward needs no second softmax pass: with P = softmax(S), O = P V and upstream G,
          dV = P^T G,   dP = G V^T,   dS = P * (dP - rowsum(G * O)),   dQ = dS K s,   dK = dS^T (Q s),
      where rowsum(dP * P) = rowsum(G * O) is a (Tq, d) product instead of a (Tq, Tk) one
      (the identity FlashAttention uses, Dao et al. 2022);
    * causal attention skips most of the scores above the diagonal (``_query_blocks``), and only the
      diagonal square of each query block gets the causal mask added;
    * q (scaled), k and v are made C-contiguous once, and kept for the backward: the model passes
      head-major views of its projections, and the batched matmuls run measurably faster on
      contiguous operands (about 7% of the op, forward plus backward, at the tiny config's shapes),
      for one extra copy of k and v per layer held until backward;
    * on the CPU, batch chunks run in parallel threads (``minilora.fast.parallel``), each with
      single-threaded BLAS: many small matmuls parallelise better across chunks than inside BLAS.
    """
    xpmod = backend.get_xp(q.data)
    dt = q.data.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qs = (np.multiply(q.data, dt.type(scale), order="C") if xpmod is np      # (..., Tq, d),
          else xpmod.ascontiguousarray(q.data * dt.type(scale)))            # C-contiguous
    kd, vd = xpmod.ascontiguousarray(k.data), xpmod.ascontiguousarray(v.data)
    Tq, Tk = q.shape[-2], k.shape[-2]
    biases = []                                           # additive, key-major: (..., Tk, Tq)
    causal_square = causal and Tk >= Tq                   # the blocks add the causal mask themselves
    if causal and not causal_square:
        biases.append(causal_mask(Tq, Tk, xpmod, dt).T)   # -inf where key j > query i
    if attn_mask is not None:
        biases.append(_attention_mask_keymajor(attn_mask, xpmod, dt))
    nd = max(q.ndim, k.ndim, v.ndim)
    biases = [b.reshape((1,) * (nd - b.ndim) + b.shape) for b in biases]
    n_scores = int(np.prod(np.broadcast_shapes(qs.shape[:-2], k.shape[:-2]))) * Tq * Tk
    chunks = _batch_slices(xpmod, [qs.shape, k.shape, v.shape], n_scores)
    if len(chunks) > 1 and any(b.shape[0] not in (1, qs.shape[0]) for b in biases):
        chunks = [slice(None)]
    blocks = _query_blocks(Tq, Tk, causal)

    def chunk_bias(sl):
        return [b if b.shape[0] == 1 else b[sl] for b in biases]

    results = parallel.run_chunks(
        lambda sl: _sdpa_forward(qs[sl], kd[sl], vd[sl], chunk_bias(sl), blocks, causal_square),
        chunks,
        blas_one_thread=True)
    saved = [r[0] for r in results]                       # per chunk and block, for the backward
    y = results[0][1] if len(results) == 1 else xpmod.concatenate([r[1] for r in results])
    out = Tensor._result(y, (q, k, v), "sdpa")

    def _backward():
        g = out.grad                                      # (..., Tq, d)
        need = (q.requires_grad, k.requires_grad, v.requires_grad)
        grads = parallel.run_chunks(
            lambda i: _sdpa_backward(g[chunks[i]], y[chunks[i]], saved[i], qs[chunks[i]],
                                     kd[chunks[i]], vd[chunks[i]], blocks, scale, *need),
            list(range(len(chunks))), blas_one_thread=True)
        for j, t in enumerate((q, k, v)):
            if not need[j]:
                continue
            parts = [ops.unbroadcast(gr[j], t.data[sl].shape) for gr, sl in zip(grads, chunks)]
            t._accum(parts[0] if len(parts) == 1 else xpmod.concatenate(parts), fresh=True)
    out._set_backward(_backward)
    return out


def scaled_dot_product_attention_composite(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 attn_mask=None, scale: float | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017), built from primitives.

    The readable reference for ``scaled_dot_product_attention`` (the fused op below, which the models
    use): the same mathematics, with every step a graph node. Tests check one against the other.

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
