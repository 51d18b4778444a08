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
* ``linear_cross_entropy`` equals ``cross_entropy(linear(x, W), t)``, a language model's head and
  loss: the (N, V) logits are never held whole, rows in chunks on CPU threads, ignored rows skipped;
* ``rms_norm`` and ``layer_norm`` equal the norms written with ``mean``, ``sqrt`` and ``/``:
  ``layer_norm`` keeps the normalised x and 1/rms for the backward instead of each step's output,
  ``rms_norm`` only 1/rms (x r is formed again), splits its rows over CPU threads and has CUDA
  kernels;
* ``rotary_embedding`` equals ``x * cos + rotate_half(x) * sin``: nothing is stored but the
  tables, the backward is the inverse rotation, rows on CPU threads;
* ``swiglu`` equals ``silu(gate) * up``: one node instead of three, keeping sigmoid(gate) for the
  backward; rows on CPU threads.

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

import numpy as np

from .. import backend, settings
from ..tensor import Tensor, is_grad_enabled
from . import cuda_kernels, parallel

__all__ = ["linear", "softmax", "log_softmax", "cross_entropy", "linear_cross_entropy", "rms_norm",
           "layer_norm", "rotary_embedding", "swiglu"]


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
    with np.errstate(invalid="ignore", divide="ignore"):    # NumPy's 0/0 warning, as torch: NaN
        out = Tensor._result(nll.sum() / denom, (logits,), "cross_entropy")

    def _backward():
        if logits.requires_grad:
            p = xpmod.exp(z - lse)                             # (N, C) softmax
            p[rows, safe_t] -= 1.0                             # minus the one-hot target
            # with no target at all the loss is NaN but no logit affected it: gradient 0, as
            # PyTorch and the reference give (denom is >= 1 whenever a row is valid)
            p *= (valid * (out.grad / xpmod.maximum(denom, 1))).astype(z.dtype)[:, None]
            logits._accum(p.reshape(logits.shape), fresh=True)
    out._set_backward(_backward)
    return out


def linear_cross_entropy(x: Tensor, weight: Tensor, targets, ignore_index: int = -100,
                         reduction: str = "mean", chunk_rows: int | None = None) -> Tensor:
    """cross_entropy(x @ weight^T, targets) without ever holding the whole (N, V) logits: the
    language-model head and its loss as one node (the "fused linear cross-entropy" of Liger Kernel,
    Hsu et al. 2024; Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models").

    ``x`` (..., C) hidden states, ``weight`` (V, C) the head (Linear layout, no bias), ``targets``
    (...) integer ids already checked by ``functional.linear_cross_entropy`` (ids in [0, V) or
    ``ignore_index``). Equals the reference ``functional.cross_entropy(functional.linear(x, weight),
    targets)`` up to float32 rounding (tests/test_functional_fused.py,
    ``test_linear_cross_entropy_twin``).

    How: only the rows whose target is not ignored are computed at all (an ignored row adds nothing
    to the loss or to any gradient), in chunks of ``chunk_rows`` rows (default
    ``settings.LCE_CHUNK_ROWS``). For each chunk, z = x_c W^T (n, V); the loss terms
    lse(z) - z[t]; and, when a gradient will be wanted, at once the chunk's part of the backward
    with the upstream gradient taken as 1: dz = (softmax(z) - onehot(t)) / denom,
    dx_c = dz W (n, C) and dW += dz^T x_c (V, C). The backward then only scales what the forward
    kept by the loss's upstream gradient (so a loss computed with grad on and never backpropagated
    has paid for those GEMMs anyway: evaluate under ``no_grad()``, as ``train.evaluate`` does).
    Kept between forward and backward: dx (N, C) and, when the
    head trains, dW (V, C), instead of the (N, V) logits and the (N, V) softmax the two-op path
    holds. On the CPU the chunks are shared among threads (``fast/parallel.py``), each thread with
    single-threaded BLAS and its own dW, added in thread order at the end; so the exp and the
    reductions over (n, V) run on every core too.

    What it buys (docs/benchmarks.md, SmolLM2-135M, 1024 tokens x 49152 ids): the 200 MB logits and
    the same again for their gradient and softmax are never allocated.
    """
    xpmod = backend.get_xp(x.data)
    chunk_rows = settings.LCE_CHUNK_ROWS if chunk_rows is None else int(chunk_rows)
    V, C = weight.shape
    X2 = x.data.reshape(-1, C)                               # (..., C) -> (N, C)
    W = weight.data                                          # (V, C)
    t = targets.reshape(-1)                                   # (...) -> (N,)
    valid = t != ignore_index
    rows_kept = None if bool(valid.all()) else xpmod.nonzero(valid)[0]
    Xv = X2 if rows_kept is None else X2[rows_kept]         # (Nv, C): the rows that count
    tv = t if rows_kept is None else t[rows_kept]           # (Nv,)
    Nv = Xv.shape[0]
    dtype = X2.dtype
    denom = dtype.type(Nv) if reduction == "mean" else dtype.type(1)
    need_x = x.requires_grad and is_grad_enabled()
    need_w = weight.requires_grad and is_grad_enabled()
    nll = xpmod.empty(Nv, dtype=dtype)
    dxv = xpmod.empty((Nv, C), dtype=dtype) if need_x else None
    starts = list(range(0, Nv, max(1, chunk_rows)))
    groups = parallel.split_rows(len(starts), Nv * V, xpmod)   # runs of chunks, one per thread

    def work(group):
        dw = None
        for a in starts[group]:
            b = min(a + chunk_rows, Nv)
            xc, tc = Xv[a:b], tv[a:b]
            r = xpmod.arange(b - a)
            z = xc @ W.T                                      # (n, C) @ (C, V) -> (n, V)
            picked = z[r, tc]                                 # (n,) the targets' logits
            m = z.max(axis=1, keepdims=True)                  # (n, 1)
            z -= m
            xpmod.exp(z, out=z)                               # exp(z - m)
            s = z.sum(axis=1, keepdims=True)                  # (n, 1)
            nll[a:b] = (xpmod.log(s) + m)[:, 0] - picked      # lse - z[t]
            if not (need_x or need_w):
                continue
            z *= 1.0 / (s * denom)                            # softmax / denom
            z[r, tc] -= 1.0 / denom                           # minus onehot / denom: dL/dz
            if need_x:                                        # (n, V) @ (V, C) -> (n, C)
                parallel.matmul_into(z, W, dxv[a:b])
            if need_w:                                        # (V, n) @ (n, C) -> (V, C)
                if dw is None:
                    dw = z.T @ xc
                else:
                    dw += z.T @ xc
        return dw

    dws = parallel.run_chunks(work, groups, blas_one_thread=True)
    with np.errstate(invalid="ignore", divide="ignore"):    # NumPy's 0/0 warning, as torch: NaN
        loss = nll.sum(dtype=dtype) / denom                  # NaN for "mean" over no target
    out = Tensor._result(xpmod.asarray(loss, dtype=dtype), (x, weight), "linear_cross_entropy")

    def _backward():
        g = out.grad.astype(dtype)                            # the upstream scalar
        if need_x and x.requires_grad:
            if rows_kept is None:
                dx = dxv
            else:
                dx = xpmod.zeros_like(X2)                    # ignored rows get no gradient
                dx[rows_kept] = dxv
            dx *= g
            x._accum(dx.reshape(x.shape), fresh=True)
        if need_w and weight.requires_grad:
            parts = [d for d in dws if d is not None]
            dw = parts[0] if parts else xpmod.zeros_like(W)
            for d in parts[1:]:
                dw += d                                       # in thread order: fixed for a count
            dw *= g
            weight._accum(dw, fresh=True)
    out._set_backward(_backward)
    return out


# ============================================================== normalisation
def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich 2019; Llama's norm).

    With r = 1/sqrt(mean(x^2)+eps), xhat = x r, y = xhat * w:
    dL/dw = sum_rows(g * xhat);  dL/dx = r * (gw - xhat * mean(gw * xhat)),  gw = g * w.
    Only r (one number per row) is kept for the backward: x is kept by the graph anyway (it is this
    node's input), and xhat = x r is formed again there, the same product with the same bits. An
    (N, C) array less per norm: 2.4 MB per norm at SmolLM2's 1024 x 576, 140 MB over its 60 norms.
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
    y = xpmod.empty_like(x2)                                    # xhat * w, or xhat

    def fwd(rows):
        xr = x2[rows]
        ms = xpmod.einsum("ni,ni->n", xr, xr)[:, None]          # (n, 1) sum of squares
        ms *= 1.0 / C
        ms += eps
        xpmod.sqrt(ms, out=ms)
        xpmod.divide(1.0, ms, out=r[rows])
        xpmod.multiply(xr, r[rows], out=y[rows])                # xhat
        if w is not None:
            y[rows] *= w
    parallel.for_rows(fwd, N, x2.size, xpmod)
    parents = (x,) if weight is None else (x, weight)
    out = Tensor._result(y.reshape(x.shape), parents, "rms_norm")

    def _backward():
        g2 = out.grad.reshape(-1, C)
        if weight is not None and weight.requires_grad:         # xhat again, (N, C), transient
            weight._accum(xpmod.einsum("ni,ni->i", g2, x2 * r), fresh=True)
        if x.requires_grad:
            gx = xpmod.empty_like(x2)

            def bwd(rows):
                gw = g2[rows] * w if w is not None else g2[rows].copy()
                xh = y[rows] if w is None else x2[rows] * r[rows]  # xhat, as in forward
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
            # a 0-d device array: the host never waits for it; max(denom, 1): no target, gradient 0
            scale = out.grad / backend.get_xp(z).maximum(denom, 1)
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
    own full-size output and backward temporaries; this one node keeps s for the backward and forms
    a = gate * s again there (the same product, the same bits; gate is kept by the graph anyway, as
    this node's input): an (N, D) array less per MLP, 6.3 MB at SmolLM2's 1024 x 1536, 190 MB over
    its 30 layers, for one multiply.
    On the CPU the rows are split across threads (``minilora.fast.parallel``).
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {gate.shape} and up {up.shape} must have the same shape")
    xpmod = backend.get_xp(gate.data)
    D = gate.shape[-1]
    g, u = gate.data.reshape(-1, D), up.data.reshape(-1, D)     # (N, D)
    s, y = xpmod.empty_like(g), xpmod.empty_like(g)

    def fwd(rows):
        sr = xpmod.multiply(g[rows], 0.5, out=s[rows])
        xpmod.tanh(sr, out=sr)                  # sigmoid(g) = (1 + tanh(g / 2)) / 2: never overflows
        sr *= 0.5
        sr += 0.5
        yr = xpmod.multiply(g[rows], sr, out=y[rows])   # a = silu(gate)
        yr *= u[rows]                                   # a * up
    parallel.for_rows(fwd, g.shape[0], g.size, xpmod)
    out = Tensor._result(y.reshape(gate.shape), (gate, up), "swiglu")

    def _backward():
        go = out.grad.reshape(-1, D)
        du = xpmod.empty_like(g) if up.requires_grad else None
        dg = xpmod.empty_like(g) if gate.requires_grad else None

        def bwd(rows):
            ar = g[rows] * s[rows]                      # a = silu(gate), as in forward
            if du is not None:
                xpmod.multiply(ar, go[rows], out=du[rows])
            if dg is not None:
                d = xpmod.subtract(1.0, s[rows], out=dg[rows])
                d *= ar
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
