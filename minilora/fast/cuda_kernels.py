"""CUDA kernels of minilora's own for the fused row ops: softmax, log-softmax, cross-entropy, RMSNorm.

A fast twin, one level below ``fast/functional.py``: the kernels compute what the references
``functional.softmax``, ``log_softmax``, ``cross_entropy`` and ``rms_norm`` compute (softmax shifted by
the row max so exp never overflows, cross-entropy through logsumexp, RMSNorm as in Zhang & Sennrich
(2019)), with the hand-derived backwards of ``fast/functional.py``. ``tests/test_cuda_kernels.py``
checks them against float64 references within float32 error bounds. What they buy on a GPU has not
been measured yet: ``benchmarks/gpu.py`` times each against the generic CuPy code and the composite.

On the GPU, the generic array spelling of a softmax (max, subtract, exp, sum, divide) is five kernel
launches, each reading and writing a full (N, C) array. Here each fused op is one
kernel per direction that keeps a whole row inside one thread block: the block reads the row, reduces
it (max, sum) in registers and shared memory, and writes the result once. The reductions are the
standard two-level tree: a warp sums its 32 values with register shuffles (``__shfl_xor_sync``), the
per-warp totals meet in 32 floats of shared memory, and one more shuffle round gives every thread the
row's total (the "block reduce" of NVIDIA's CUDA samples and of Apex / PyTorch's softmax kernels).

Conventions shared by every kernel here:

* input rows are C-contiguous float32, (N, C); the grid is (N,) blocks, one per row; the block has
  ``block_threads(C)`` threads, a power of two from 32 to ``MAX_THREADS``. Thread ``t`` visits the
  row's columns t, t + blockDim, t + 2 blockDim, ... (< C), so any C >= 1 works, including C smaller
  than a warp (the idle lanes contribute the reduction's identity) and C larger than the block;
* shared memory is a static ``__shared__ float partial[32]`` (one slot per warp of a block of at most
  1024 threads), so launches pass no dynamic shared memory;
* the math is the precise CUDA library's (no fast-math): ``expf`` (at most 2 ulp off), ``logf``
  (1 ulp), ``sqrtf`` and ``/`` (correctly rounded, as NumPy's). The fast intrinsics would gain
  nothing measurable in kernels limited by memory bandwidth: ``rsqrtf`` (2 ulp) runs once per row,
  and ``__expf`` is several ulp off, more for large arguments;
* results match NumPy's float32 path up to float32 rounding, not bit for bit: the row sums are added
  in a different order (per thread, then as a tree), the compiler fuses a*b+c into FMAs, and CuPy
  compiles every kernel with ``-ftz=true`` (results below 2^-126, float32's smallest normal number,
  are flushed to zero).

The kernel sources are module constants (``tests/test_cuda_kernels.py`` compiles each one with
``nvcc``), compiled once by CuPy's ``RawKernel`` through ``minilora.backend`` (the only module that
imports CuPy) on first use. The ``*_cuda`` functions take and return CuPy arrays;
``fast/functional.py`` calls them where ``applies`` says so (float32 CuPy inputs,
``settings.USE_CUDA_KERNELS`` on, outside ``minilora.reference()``) and builds the autograd graph
around them.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .. import backend, settings

__all__ = ["MAX_THREADS", "SOURCES", "applies", "block_threads", "kernel",
           "softmax_forward_cuda", "softmax_backward_cuda",
           "log_softmax_forward_cuda", "log_softmax_backward_cuda",
           "cross_entropy_forward_cuda", "cross_entropy_backward_cuda",
           "rms_norm_forward_cuda", "rms_norm_backward_cuda"]

WARP = 32
MAX_THREADS = 256    # threads per block (per row); a power of two, at most 1024 (32 warps)
_MAX_COLUMNS = 2**31 - 1 - 1024   # the kernels index columns with int: j + blockDim must not overflow


def applies(*arrays) -> bool:
    """True when a row op on these arrays should run as minilora's CUDA kernels: the switch
    ``settings.USE_CUDA_KERNELS`` is on (read at each call), ``minilora.reference()`` is off, and all
    the arrays are non-empty float32 CuPy arrays. The caller checks that the op reduces over the
    last axis."""
    return (settings.USE_CUDA_KERNELS and not settings.reference_mode()
            and all(backend.get_xp(a) is not np and a.dtype == np.float32 and a.size > 0
                    and a.ndim > 0 for a in arrays))


def block_threads(C: int) -> int:
    """Threads per block for rows of C values: the power of two >= C, clipped to [32, MAX_THREADS]
    (at least one full warp, since the warp shuffles name all 32 lanes)."""
    return min(MAX_THREADS, max(WARP, 1 << (int(C) - 1).bit_length()))


# ------------------------------------------------------------------ CUDA sources
# Helpers prepended to every kernel source (each source is a complete translation unit, as
# RawKernel compiles it: NVRTC, no headers, so only built-ins; -inf is spelled with __int_as_float).
_ROW_REDUCE = r"""
#define MINILORA_NEG_INF (-__int_as_float(0x7f800000))

// The sum / max of v over the 32 lanes of a warp, returned to every lane (butterfly shuffles).
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The sum / max of v over the whole block, returned to every thread. blockDim.x is a multiple of
// 32 and at most 1024, so there are at most 32 warp totals; partial is __shared__ float[32].
__device__ __forceinline__ float block_sum(float v, float* partial) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();                      // a previous reduction may still be reading partial
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = (lane < (int)(blockDim.x >> 5)) ? partial[lane] : 0.0f;
    return warp_sum(v);                   // every warp adds up the warp totals itself: no broadcast
}

__device__ __forceinline__ float block_max(float v, float* partial) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = (lane < (int)(blockDim.x >> 5)) ? partial[lane] : MINILORA_NEG_INF;
    return warp_max(v);
}
"""

# s = exp(x - max) / sum(exp(x - max)) per row. exp is recomputed in the last pass rather than stored
# and re-read: three reads of x (the later ones mostly from cache) and one write of s.
SOFTMAX_FORWARD_SOURCE = _ROW_REDUCE + r"""
extern "C" __global__ void minilora_softmax_forward(const float* __restrict__ x,
                                                    float* __restrict__ s, const int C) {
    __shared__ float partial[32];
    const long long offset = (long long)blockIdx.x * C;     // row start; N * C may exceed 2^31
    const float* xr = x + offset;
    float* sr = s + offset;
    float m = MINILORA_NEG_INF;
    for (int j = threadIdx.x; j < C; j += blockDim.x) m = fmaxf(m, xr[j]);
    m = block_max(m, partial);                               // shift: exp never overflows
    float z = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) z += expf(xr[j] - m);
    z = block_sum(z, partial);
    for (int j = threadIdx.x; j < C; j += blockDim.x) sr[j] = expf(xr[j] - m) / z;
}
"""

# dx = s * (g - sum(g * s)) per row (the Jacobian-vector product of softmax).
SOFTMAX_BACKWARD_SOURCE = _ROW_REDUCE + r"""
extern "C" __global__ void minilora_softmax_backward(const float* __restrict__ s,
                                                     const float* __restrict__ g,
                                                     float* __restrict__ dx, const int C) {
    __shared__ float partial[32];
    const long long offset = (long long)blockIdx.x * C;
    const float* sr = s + offset;
    const float* gr = g + offset;
    float* dxr = dx + offset;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) dot += gr[j] * sr[j];
    dot = block_sum(dot, partial);
    for (int j = threadIdx.x; j < C; j += blockDim.x) dxr[j] = sr[j] * (gr[j] - dot);
}
"""

# y = (x - max) - log(sum(exp(x - max))) per row, in NumPy's order of operations.
LOG_SOFTMAX_FORWARD_SOURCE = _ROW_REDUCE + r"""
extern "C" __global__ void minilora_log_softmax_forward(const float* __restrict__ x,
                                                        float* __restrict__ y, const int C) {
    __shared__ float partial[32];
    const long long offset = (long long)blockIdx.x * C;
    const float* xr = x + offset;
    float* yr = y + offset;
    float m = MINILORA_NEG_INF;
    for (int j = threadIdx.x; j < C; j += blockDim.x) m = fmaxf(m, xr[j]);
    m = block_max(m, partial);
    float z = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) z += expf(xr[j] - m);
    const float log_z = logf(block_sum(z, partial));
    for (int j = threadIdx.x; j < C; j += blockDim.x) yr[j] = (xr[j] - m) - log_z;
}
"""

# dx = g - exp(y) * sum(g) per row, y = log_softmax(x) (so exp(y) is the softmax).
LOG_SOFTMAX_BACKWARD_SOURCE = _ROW_REDUCE + r"""
extern "C" __global__ void minilora_log_softmax_backward(const float* __restrict__ y,
                                                         const float* __restrict__ g,
                                                         float* __restrict__ dx, const int C) {
    __shared__ float partial[32];
    const long long offset = (long long)blockIdx.x * C;
    const float* yr = y + offset;
    const float* gr = g + offset;
    float* dxr = dx + offset;
    float total = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) total += gr[j];
    total = block_sum(total, partial);
    for (int j = threadIdx.x; j < C; j += blockDim.x) dxr[j] = gr[j] - expf(yr[j]) * total;
}
"""

# Per row: lse = log(sum(exp(z - max))) + max and nll = (lse - z[t]) * valid, valid = t != ignore,
# exactly the formula of fast/functional.py's cross_entropy (an ignored row reads column 0 and is multiplied by 0).
# The target is bounds-checked on the host first; safe_t keeps even a bad one inside the row.
CROSS_ENTROPY_FORWARD_SOURCE = _ROW_REDUCE + r"""
extern "C" __global__ void minilora_cross_entropy_forward(const float* __restrict__ z,
                                                          const long long* __restrict__ targets,
                                                          const long long ignore_index,
                                                          float* __restrict__ lse,
                                                          float* __restrict__ nll, const int C) {
    __shared__ float partial[32];
    const long long row = blockIdx.x;
    const float* zr = z + row * C;
    float m = MINILORA_NEG_INF;
    for (int j = threadIdx.x; j < C; j += blockDim.x) m = fmaxf(m, zr[j]);
    m = block_max(m, partial);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) sum += expf(zr[j] - m);
    sum = block_sum(sum, partial);
    if (threadIdx.x == 0) {
        const float row_lse = logf(sum) + m;
        const long long t = targets[row];
        const bool valid = t != ignore_index;
        const long long safe_t = (valid && t >= 0 && t < C) ? t : 0;
        lse[row] = row_lse;
        nll[row] = (row_lse - zr[safe_t]) * (valid ? 1.0f : 0.0f);
    }
}
"""

# dz = (exp(z - lse) - onehot(t)) * (valid * scale) per row; scale = upstream grad / n_valid (or 1
# for "sum"), read from device memory so the host never waits for it. valid * scale, not a branch,
# so that a NaN scale (mean over no valid rows) gives NaN gradients as the NumPy path does.
CROSS_ENTROPY_BACKWARD_SOURCE = r"""
extern "C" __global__ void minilora_cross_entropy_backward(const float* __restrict__ z,
                                                           const long long* __restrict__ targets,
                                                           const long long ignore_index,
                                                           const float* __restrict__ lse,
                                                           const float* __restrict__ scale,
                                                           float* __restrict__ dz, const int C) {
    const long long row = blockIdx.x;
    const float* zr = z + row * C;
    float* dzr = dz + row * C;
    const long long t = targets[row];
    const bool valid = t != ignore_index;
    const long long safe_t = (valid && t >= 0 && t < C) ? t : 0;
    const float row_scale = (valid ? 1.0f : 0.0f) * scale[0];
    const float row_lse = lse[row];
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        const float p = expf(zr[j] - row_lse);                  // softmax, from the saved lse
        dzr[j] = (j == safe_t ? p - 1.0f : p) * row_scale;
    }
}
"""

# r = 1 / sqrt(mean(x^2) + eps), y = (x * r) * w per row (Zhang & Sennrich 2019). sqrtf and the
# division are correctly rounded, as NumPy's; rsqrtf (2 ulp) would save one instruction per row.
RMS_NORM_FORWARD_SOURCE = _ROW_REDUCE + r"""
extern "C" __global__ void minilora_rms_norm_forward(const float* __restrict__ x,
                                                     const float* __restrict__ w, const float eps,
                                                     float* __restrict__ y,
                                                     float* __restrict__ r, const int C) {
    __shared__ float partial[32];
    const long long row = blockIdx.x;
    const float* xr = x + row * C;
    float* yr = y + row * C;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss, partial);
    const float row_r = 1.0f / sqrtf(ss / (float)C + eps);
    if (threadIdx.x == 0) r[row] = row_r;
    for (int j = threadIdx.x; j < C; j += blockDim.x) yr[j] = (xr[j] * row_r) * w[j];
}
"""

# dx = r * (gw - xhat * mean(gw * xhat)) per row, gw = g * w, xhat = x * r (recomputed from x and
# the saved r, so the forward keeps no (N, C) xhat for the backward).
RMS_NORM_BACKWARD_SOURCE = _ROW_REDUCE + r"""
extern "C" __global__ void minilora_rms_norm_backward(const float* __restrict__ x,
                                                      const float* __restrict__ w,
                                                      const float* __restrict__ r,
                                                      const float* __restrict__ g,
                                                      float* __restrict__ dx, const int C) {
    __shared__ float partial[32];
    const long long row = blockIdx.x;
    const float* xr = x + row * C;
    const float* gr = g + row * C;
    float* dxr = dx + row * C;
    const float row_r = r[row];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) dot += (gr[j] * w[j]) * (xr[j] * row_r);
    dot = block_sum(dot, partial) / (float)C;                  // mean(gw * xhat)
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        const float gw = gr[j] * w[j];
        const float xhat = xr[j] * row_r;
        dxr[j] = row_r * (gw - xhat * dot);
    }
}
"""

# kernel name -> its source: what the compile test and the getters below use.
SOURCES = {
    "minilora_softmax_forward": SOFTMAX_FORWARD_SOURCE,
    "minilora_softmax_backward": SOFTMAX_BACKWARD_SOURCE,
    "minilora_log_softmax_forward": LOG_SOFTMAX_FORWARD_SOURCE,
    "minilora_log_softmax_backward": LOG_SOFTMAX_BACKWARD_SOURCE,
    "minilora_cross_entropy_forward": CROSS_ENTROPY_FORWARD_SOURCE,
    "minilora_cross_entropy_backward": CROSS_ENTROPY_BACKWARD_SOURCE,
    "minilora_rms_norm_forward": RMS_NORM_FORWARD_SOURCE,
    "minilora_rms_norm_backward": RMS_NORM_BACKWARD_SOURCE,
}


@lru_cache(maxsize=None)
def kernel(name: str):
    """The compiled kernel ``name`` (a key of ``SOURCES``), built on first use."""
    return backend.raw_kernel(SOURCES[name], name)


# ------------------------------------------------------------------ launches
def _rows(a, what: str):
    """``a`` as C-contiguous float32 rows (N, C) on the GPU (a copy only when it is not already)."""
    if a.ndim != 2 or a.dtype != np.float32:
        raise ValueError(f"{what}: the CUDA row kernels take float32 (N, C) arrays, got "
                         f"{a.dtype} {a.shape}; reshape to (-1, C) and cast to float32")
    if a.shape[1] > _MAX_COLUMNS:
        raise ValueError(f"{what}: rows of {a.shape[1]} values are too long for the CUDA row "
                         f"kernels (at most {_MAX_COLUMNS}); use the generic path")
    return backend.get_xp(a).ascontiguousarray(a)


def _pair(a, b, what: str):
    """Two row arrays of one shape (the kernels index both with the same row and column)."""
    a, b = _rows(a, what), _rows(b, what)
    if a.shape != b.shape:
        raise ValueError(f"{what}: arrays of shapes {a.shape} and {b.shape}; they must match")
    return a, b


def _vector(a, n: int, what: str, xp):
    """``a`` (an array of ``xp`` or a host value) as a C-contiguous float32 vector of n values."""
    a = xp.ascontiguousarray(xp.asarray(a, dtype=xp.float32)).reshape(-1)
    if a.size != n:
        raise ValueError(f"{what}: expected {n} values, got {a.size}")
    return a


def _launch(name: str, N: int, C: int, *args) -> None:
    """One block of block_threads(C) threads per row; every kernel takes C (int) last."""
    if N > 0 and C > 0:                  # a grid of zero blocks is a launch error in CUDA
        kernel(name)((N,), (block_threads(C),), (*args, np.int32(C)))


def softmax_forward_cuda(x):
    """Softmax of each row of ``x`` (N, C) -> s (N, C)."""
    x = _rows(x, "softmax")
    s = backend.get_xp(x).empty_like(x)                        # (N, C)
    _launch("minilora_softmax_forward", *x.shape, x, s)
    return s


def softmax_backward_cuda(s, g):
    """dx (N, C) from the softmax output s and the upstream gradient g, both (N, C)."""
    s, g = _pair(s, g, "softmax backward")
    dx = backend.get_xp(s).empty_like(s)
    _launch("minilora_softmax_backward", *s.shape, s, g, dx)
    return dx


def log_softmax_forward_cuda(x):
    """Log-softmax of each row of ``x`` (N, C) -> y (N, C)."""
    x = _rows(x, "log_softmax")
    y = backend.get_xp(x).empty_like(x)
    _launch("minilora_log_softmax_forward", *x.shape, x, y)
    return y


def log_softmax_backward_cuda(y, g):
    """dx (N, C) from the log-softmax output y and the upstream gradient g, both (N, C)."""
    y, g = _pair(y, g, "log_softmax backward")
    dx = backend.get_xp(y).empty_like(y)
    _launch("minilora_log_softmax_backward", *y.shape, y, g, dx)
    return dx


def _targets(t, N: int, xp):
    """The targets as N contiguous int64 values (the kernels' long long)."""
    t = xp.ascontiguousarray(xp.asarray(t, dtype=xp.int64)).reshape(-1)    # (N,)
    if t.size != N:
        raise ValueError(f"cross_entropy: {t.size} targets for {N} rows of logits")
    return t


def cross_entropy_forward_cuda(z, targets, ignore_index: int):
    """Per-row logsumexp and negative log-likelihood of integer ``targets`` (N,) under the logits
    ``z`` (N, C): (lse (N,), nll (N,)), nll 0 where the target is ``ignore_index``. The targets must
    already be checked to lie in [0, C) (``functional.cross_entropy`` does)."""
    z = _rows(z, "cross_entropy")
    N, C = z.shape
    xp = backend.get_xp(z)
    t = _targets(targets, N, xp)
    lse = xp.empty(N, dtype=xp.float32)
    nll = xp.empty(N, dtype=xp.float32)
    _launch("minilora_cross_entropy_forward", N, C, z, t, np.int64(ignore_index), lse, nll)
    return lse, nll


def cross_entropy_backward_cuda(z, targets, ignore_index: int, lse, scale):
    """dz (N, C) = (softmax(z) - onehot(targets)) * scale on rows whose target is not ignore_index,
    0 on the others. ``lse`` (N,) from the forward; ``scale`` a 1-value array (or scalar): the
    upstream gradient over the mean's denominator."""
    z = _rows(z, "cross_entropy backward")
    N, C = z.shape
    xp = backend.get_xp(z)
    t = _targets(targets, N, xp)
    lse = _vector(lse, N, "cross_entropy backward (lse)", xp)
    scale = _vector(scale, 1, "cross_entropy backward (scale)", xp)
    dz = xp.empty_like(z)
    _launch("minilora_cross_entropy_backward", N, C, z, t, np.int64(ignore_index), lse, scale, dz)
    return dz


def _weight(w, C: int, xp):
    """The RMSNorm weight as C float32 values; ones when there is none (x * r * 1 is exact)."""
    return xp.ones(C, dtype=xp.float32) if w is None else _vector(w, C, "rms_norm (weight)", xp)


def rms_norm_forward_cuda(x, w, eps: float):
    """RMSNorm of each row of ``x`` (N, C) with weight ``w`` (C,) or None: (y (N, C), r (N,)),
    r = 1 / sqrt(mean(x^2) + eps)."""
    x = _rows(x, "rms_norm")
    N, C = x.shape
    xp = backend.get_xp(x)
    y = xp.empty_like(x)
    r = xp.empty(N, dtype=xp.float32)
    _launch("minilora_rms_norm_forward", N, C, x, _weight(w, C, xp), np.float32(eps), y, r)
    return y, r


def rms_norm_backward_cuda(x, w, r, g):
    """dx (N, C) of RMSNorm from the input x (N, C), weight w (C,) or None, the forward's r (N,) and
    the upstream gradient g (N, C). (dw = sum over rows of g * x * r is left to the caller: a column
    sum across rows does not fit one block per row; ``fast/functional.py``'s ``rms_norm`` uses CuPy's einsum.)"""
    x, g = _pair(x, g, "rms_norm backward")
    N, C = x.shape
    xp = backend.get_xp(x)
    dx = xp.empty_like(x)
    _launch("minilora_rms_norm_backward", N, C, x, _weight(w, C, xp),
            _vector(r, N, "rms_norm backward (r)", xp), g, dx)
    return dx
