"""Neural-network functions (imported as ``F``), each written as its equation with Tensor operations.

This is the reference a student reads: every function here is a *composite* of the primitive ops of
``ops.py`` (``+ - * / @``, ``exp``, ``log``, ``sum``, ``max``, indexing, ...), so its gradient comes
for free from theirs, as in tinygrad or micrograd, and each line reads like a line of the paper it
names. ``tests/test_functional_fused.py`` gradchecks them in float64.

Several have a fast twin that computes the same thing as one autograd node with a hand-written
backward, on CPU threads or as CUDA kernels: ``fast/functional.py`` (linear, softmax, log_softmax,
cross_entropy, linear_cross_entropy, rms_norm, layer_norm, rotary_embedding, swiglu) and
``fast/attention.py`` (scaled_dot_product_attention). Such a function starts with two lines that hand the call to its twin
unless ``minilora.reference()`` is on (or ``MINILORA_REFERENCE=1``); below them is the reference.
The twins' docstrings say what they buy and ``tests/test_functional_fused.py`` checks each equal to
its reference, forward and backward, up to float32 rounding.

Shapes follow PyTorch: Linear weights are (out, in), activations (batch, seq, hidden), attention
(batch, heads, seq, head_dim).
"""
from __future__ import annotations

import math

import numpy as np

from . import backend, ops, settings
from .fast import attention as fast_attention
from .fast import functional as fast_functional
from .ops import as_tensor, concatenate, embedding, erf, sigmoid, where  # noqa: F401  (re-exported)
from .tensor import Tensor

__all__ = ["relu", "gelu", "silu", "sigmoid", "softmax", "log_softmax", "cross_entropy",
           "linear_cross_entropy", "rms_norm",
           "layer_norm", "dropout", "embedding", "linear", "scaled_dot_product_attention",
           "concatenate", "stack", "split", "where", "erf", "causal_mask", "rotary_embedding", "swiglu",
           "rotate_half"]


# ============================================================== activations
def relu(x: Tensor) -> Tensor:
    """max(x, 0): the gradient passes where x > 0."""
    return where(x.data > 0, x, 0.0)


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x), the SiLU or swish (Elfwing et al. 2017; Ramachandran et al. 2017), Llama's
    MLP activation. ``sigmoid`` is the primitive ``ops.sigmoid``, written with tanh so that it never
    overflows."""
    return x * sigmoid(x)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """x * Phi(x), Phi the standard normal CDF (Hendrycks & Gimpel 2016). ``approximate="none"``
    uses erf, Phi(x) = (1 + erf(x / sqrt(2))) / 2 (torch's default); ``"tanh"`` the GPT-2 form
    Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2."""
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + ops.tanh(c * (x + 0.044715 * x * x * x)))
    if approximate != "none":
        raise ValueError(f"gelu approximate={approximate!r}; use 'none' or 'tanh'")
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


# ============================================================== the Linear layer
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x W^T + b, with W of shape (out, in) as in torch.nn.Linear; x (..., in) -> y (..., out)."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features but the weight expects "
                         f"{weight.shape[-1]} (weight shape {tuple(weight.shape)}); check in_features")
    if not settings.reference_mode():
        return fast_functional.linear(x, weight, bias)   # GEMMs on threads: fast/functional.py
    y = x @ weight.T                                     # (..., in) @ (in, out) -> (..., out)
    return y + bias if bias is not None else y


# ============================================================== softmax family
def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m) along ``axis``, m = max_j x_j.

    Subtracting the max changes nothing (it cancels between numerator and denominator) but keeps
    exp from overflowing; m is therefore a constant here, and no gradient flows through it.
    """
    if not settings.reference_mode():
        return fast_functional.softmax(x, axis)          # fused backward (+ CUDA): fast/functional.py
    e = (x - x.data.max(axis=axis, keepdims=True)).exp()
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """log softmax(x) = z - log(sum(exp(z))) with z = x - max(x): the log-probabilities, computed
    without ever taking the log of an underflowed softmax."""
    if not settings.reference_mode():
        return fast_functional.log_softmax(x, axis)      # fused backward (+ CUDA): fast/functional.py
    z = x - x.data.max(axis=axis, keepdims=True)         # the shift is a constant, as in softmax
    return z - z.exp().sum(axis=axis, keepdims=True).log()


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100,
                  reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer ``targets`` under ``softmax(logits)``, as in PyTorch.

    ``logits`` (..., C) and ``targets`` (...) of integer class ids. Per position,
    loss = -log_softmax(logits)[target]; positions whose target equals ``ignore_index`` (padding,
    prompt tokens) count for nothing, and "mean" divides the sum by the number of the others (NaN
    when there are none, as PyTorch gives); "sum" returns the sum.
    """
    xpmod = backend.get_xp(logits.data)
    C = logits.shape[-1]
    targets = _checked_targets(targets, logits.shape[:-1], C, ignore_index, reduction, xpmod,
                               "cross_entropy", "logits shape without the class axis")
    t = targets.reshape(-1)                                   # (...) -> (N,)
    valid = t != ignore_index
    if not settings.reference_mode():
        return fast_functional.cross_entropy(logits, targets,   # fused backward (+ CUDA):
                                             ignore_index, reduction)  # fast/functional.py
    logp = log_softmax(logits.reshape(-1, C))                 # (..., C) -> (N, C)
    rows = xpmod.arange(t.shape[0])
    picked = logp[rows, xpmod.where(valid, t, 0)]             # (N,) log p(target); ignored rows read 0
    nll = where(valid, -picked, 0.0)                          # ... and count for nothing
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / valid.sum().astype(logits.data.dtype)


def _checked_targets(targets, shape: tuple, C: int, ignore_index: int, reduction: str, xpmod,
                     who: str, what: str):
    """``targets`` as an integer array on the inputs' device, after checking that its shape is
    ``shape`` and that every id not equal to ``ignore_index`` lies in [0, C)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{who}: reduction={reduction!r}; use 'mean' or 'sum'")
    targets = xpmod.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if targets.shape != tuple(shape):
        raise ValueError(f"{who}: targets shape {targets.shape} must equal the {what} "
                         f"{tuple(shape)}")
    t = targets.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= C))
    if bool(bad.any()):
        raise ValueError(f"{who}: target id {int(t[bad][0])} is outside [0, {C}) and is not "
                         f"ignore_index={ignore_index}; check the labels or the vocab size")
    return targets


def linear_cross_entropy(x: Tensor, weight: Tensor, targets, ignore_index: int = -100,
                         reduction: str = "mean") -> Tensor:
    """``cross_entropy(linear(x, weight), targets)``: a language model's output head and its loss.

    x (..., C) hidden states, weight (V, C) the head's weight (a Linear's layout), targets (...)
    integer ids; the logits x W^T are (..., V). Written as the two calls it is; the fast twin
    (``fast/functional.py``) never holds all the (N, V) logits at once: with a vocabulary of 49152
    and 1024 tokens they alone are 200 MB in float32.
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear_cross_entropy: input has {x.shape[-1]} features but the weight "
                         f"expects {weight.shape[-1]} (weight shape {tuple(weight.shape)})")
    xpmod = backend.get_xp(x.data)
    targets = _checked_targets(targets, x.shape[:-1], weight.shape[0], ignore_index, reduction,
                               xpmod, "linear_cross_entropy", "input shape without the feature axis")
    if not settings.reference_mode():
        return fast_functional.linear_cross_entropy(x, weight, targets,  # chunked rows, no (N, V)
                                                    ignore_index, reduction)  # logits: fast/functional.py
    return cross_entropy(linear(x, weight), targets, ignore_index, reduction)


# ============================================================== normalisation
def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019), Llama's norm: y = x / sqrt(mean(x^2) + eps) * weight, over
    the last axis. Unlike LayerNorm it does not subtract the mean."""
    if not settings.reference_mode():
        return fast_functional.rms_norm(x, weight, eps)  # fused, threads (+ CUDA): fast/functional.py
    rms = ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt()   # (..., 1)
    y = x / rms
    return y * weight if weight is not None else y


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """LayerNorm (Ba et al. 2016): y = (x - mean) / sqrt(var + eps) * weight + bias over the last
    axis, var the biased variance mean((x - mean)^2), as PyTorch."""
    if not settings.reference_mode():
        return fast_functional.layer_norm(x, weight, bias, eps)   # fused backward: fast/functional.py
    xc = x - x.mean(axis=-1, keepdims=True)                    # (..., D) centred
    y = xc / ((xc * xc).mean(axis=-1, keepdims=True) + eps).sqrt()
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


# ============================================================== the Llama block's other ops
def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis: a quarter turn of every feature pair
    (x1_i, x2_i), Hugging Face's "rotate-half" layout of RoPE."""
    h = x.shape[-1] // 2
    return concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rotary_embedding(x: Tensor, cos, sin) -> Tensor:
    """Rotary position embedding, RoPE (Su et al. 2021, "RoFormer"), as Hugging Face's Llama writes it:

        out = x * cos + rotate_half(x) * sin,

    x (..., d); cos, sin: full-width tables (..., d) = concat(c, c), concat(s, s) with c, s =
    cos, sin(position * theta_i) (``models/rope.py``), broadcastable against x. Feature i of the
    first half and feature i of the second half form a pair turned by the angle position * theta_i:
    out1 = x1 c - x2 s, out2 = x2 c + x1 s.
    """
    if not settings.reference_mode():
        return fast_functional.rotary_embedding(x, cos, sin)   # fused, threads: fast/functional.py
    return x * as_tensor(cos, x) + rotate_half(x) * as_tensor(sin, x)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"), the gated unit of Llama's MLP:
    silu(gate) * up, with gate = x W_gate^T and up = x W_up^T computed by the caller."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {gate.shape} and up {up.shape} must have the same shape; "
                         "pass gate_proj(x) and up_proj(x)")
    if not settings.reference_mode():
        return fast_functional.swiglu(gate, up)          # fused, CPU threads: fast/functional.py
    return silu(gate) * up


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
        i = xpmod.arange(Tq)[:, None] + (Tk - Tq)            # (Tq, 1) each query's position
        j = xpmod.arange(Tk)[None, :]                        # (1, Tk)
        _mask_cache[key] = xpmod.where(j > i, -xpmod.inf, 0.0).astype(dtype)
    return _mask_cache[key]


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 attn_mask=None, scale: float | None = None) -> Tensor:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + mask) V (Vaswani et al. 2017, eq. 1).

    q: (..., Tq, d), k and v: (..., Tk, d); leading axes broadcast, so grouped-query attention
    (Ainslie et al. 2023) passes k and v with a size-1 axis for the query heads that share them.
    ``causal`` hides future keys (``causal_mask``: queries are the last Tq of the Tk positions, as
    with a KV cache); ``attn_mask`` is a boolean array (True = may attend) or an additive float
    array, broadcastable to (..., Tq, Tk). ``scale`` defaults to 1 / sqrt(d).
    """
    if not settings.reference_mode():
        return fast_attention.scaled_dot_product_attention(   # query blocks: fast/attention.py
            q, k, v, causal=causal, attn_mask=attn_mask, scale=scale)
    xpmod = backend.get_xp(q.data)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.swapaxes(-1, -2)) * scale      # (..., Tq, d) @ (..., d, Tk) -> (..., Tq, Tk)
    if causal:
        scores = scores + causal_mask(q.shape[-2], k.shape[-2], xpmod, scores.dtype)
    if attn_mask is not None:
        m = attn_mask.data if isinstance(attn_mask, Tensor) else xpmod.asarray(attn_mask)
        if m.dtype == bool:                        # True = may attend -> 0, False -> -inf
            m = xpmod.where(m, 0.0, -xpmod.inf)
        scores = scores + m.astype(scores.dtype, copy=False)
    weights = softmax(scores, axis=-1)             # (..., Tq, Tk), each row sums to 1
    return weights @ v                             # (..., Tq, Tk) @ (..., Tk, d) -> (..., Tq, d)


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
