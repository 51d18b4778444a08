"""The fast twins of ``functional``'s ops: fused forward, hand-written backward, CPU threads, CUDA.

Each function here computes what the reference composite of the same name in ``minilora/functional.py``
computes, up to float32 rounding, as one autograd node with a backward derived by hand instead of a
chain of primitive nodes. ``functional`` calls these outside ``minilora.reference()``; a twin never
calls its reference.

* ``linear`` equals ``x @ weight.T + bias``: one node whose three GEMMs are 2-D, their rows split
  over CPU threads (``parallel.matmul``); a frozen weight costs no dW GEMM;
* ``softmax`` and ``log_softmax`` equal the max-shifted ``exp / sum`` and ``z - log(sum(exp(z)))``:
  only the output is kept for the backward, not each step's; CUDA kernels on a GPU;
* ``cross_entropy`` equals ``log_softmax`` then the target's log-probability: the (N, C)
  log-probabilities are never stored, the backward rebuilds the softmax from the (N, 1)
  logsumexp; CUDA kernels on a GPU;
* ``rms_norm`` and ``layer_norm`` equal the norms written with ``mean``, ``sqrt`` and ``/``: the
  normalised x and 1/rms are kept for the backward instead of each step's output; ``rms_norm``
  splits its rows over CPU threads and has CUDA kernels;
* ``rotary_embedding`` equals ``x * cos + rotate_half(x) * sin``: nothing is stored but the
  tables, the backward is the inverse rotation, rows on CPU threads;
* ``swiglu`` equals ``silu(gate) * up``: one node instead of three, keeping sigmoid(gate) and
  silu(gate) for the backward; rows on CPU threads.

``tests/test_functional_fused.py`` checks every twin equal to its reference, outputs and gradients,
in float64 and float32 on hypothesis-drawn shapes; ``tests/test_autograd_torch.py`` compares them
with PyTorch; ``tests/test_cuda_kernels.py`` checks the CUDA branch.

What that buys has been measured only as each op's share of a training step (docs/benchmarks.md,
tiny config, one thread): SwiGLU ~12%, RMSNorm ~7%, RoPE ~5%, cross-entropy among the remaining
~8%; the Linear GEMMs are 45-50% of the step. No twin here has been timed against its composite
yet, on the CPU or on a GPU (``benchmarks/gpu.py`` times the CUDA kernels against the generic CuPy
code and the composite).

On the CPU the row ops split their rows over threads (``fast/parallel.py``); each thread computes
whole rows, so the result is bit-identical to the single-threaded one. On a GPU, softmax,
log_softmax, cross_entropy and rms_norm of float32 arrays run as minilora's own CUDA kernels
(``fast/cuda_kernels.py``, one thread block per row) when ``cuda_kernels.applies`` says so (it reads
``settings.USE_CUDA_KERNELS`` at each call); everywhere else (NumPy, float64 gradient checks, another
axis) the array code below runs.
"""
from __future__ import annotations

from .. import backend
from ..tensor import Tensor
from . import cuda_kernels, parallel

__all__ = ["linear", "softmax", "log_softmax", "cross_entropy", "rms_norm", "layer_norm",
           "rotary_embedding", "swiglu"]


def _last_axis(x: Tensor, axis: int) -> bool:
    return axis in (-1, x.ndim - 1)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ W^T (+ b), with W of shape (out, in) as in torch.nn.Linear; one graph node (the bias
    add, when there is one, is a second).

    All three products are single 2-D GEMMs over the (batch * seq, features) rows, and each
    gradient is computed only for an input that requires it (a frozen W costs no dW GEMM):
        y = x W^T,   dx = g W,   dW = g^T x  (out, in: the weight's own layout, no transpose copy).
    On the CPU each GEMM's rows are split across threads (``parallel.matmul``). The shapes are
    checked by ``functional.linear``.
    """
    xd, w = x.data, weight.data
    n_out, n_in = w.shape
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


# ============================================================== softmax family
def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the max so exp never overflows.

    Backward: for s = softmax(x), dL/dx = s * (g - sum(g * s)) along the axis.
    """
    if cuda_kernels.applies(x.data) and _last_axis(x, axis):
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
    if cuda_kernels.applies(x.data) and _last_axis(x, axis):
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
    """Negative log-likelihood of integer ``targets`` under ``softmax(logits)``, as one node.

    ``logits`` (..., C); ``targets`` an integer array of shape (...) on the logits' device, already
    checked by ``functional.cross_entropy`` (shape, ids in [0, C) or ``ignore_index``, reduction
    "mean" or "sum"). Per row, nll = logsumexp(z) - z[t]; ignored rows count for nothing, and
    "mean" divides by the number of the others (NaN when there are none, as PyTorch gives).
    Backward: (softmax(z) - onehot(t)) * upstream / n, with the softmax rebuilt from z and the
    (N, 1) logsumexp: the (N, C) log-probabilities are never stored.
    """
    xpmod = backend.get_xp(logits.data)
    C = logits.shape[-1]
    z = logits.data.reshape(-1, C)                           # (..., C) -> (N, C)
    t = targets.reshape(-1)                                   # (...) -> (N,)
    valid = t != ignore_index
    n_valid = valid.sum()
    denom = n_valid.astype(z.dtype) if reduction == "mean" else z.dtype.type(1)
    if cuda_kernels.applies(z):
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


# ============================================================== normalisation
def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich 2019; Llama's norm).

    With r = 1/sqrt(mean(x^2)+eps), xhat = x r, y = xhat * w:
    dL/dw = sum_rows(g * xhat);  dL/dx = r * (gw - xhat * mean(gw * xhat)),  gw = g * w.
    Row dot products use einsum (multiply and sum in one pass, no temporary); on the CPU the rows
    are split across threads (``minilora.fast.parallel``).
    """
    if cuda_kernels.applies(x.data) and (weight is None or (cuda_kernels.applies(weight.data)
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


# ============================================================== the Llama block's other ops
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
    The composite ``silu(gate) * up`` is three graph nodes (sigmoid, two products), each with its
    own full-size output and backward temporaries; this one node keeps s and a for the backward.
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
