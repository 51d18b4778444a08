"""One decoding step of a Llama on plain NumPy arrays: the fast twin of the model's cached forward.

Twin of ``LlamaForCausalLM.forward(ids, past_key_values=cache)`` (``models/llama.py``) for the case
that dominates generation: one new token per row, B rows, a KV cache holding every earlier
position. It computes what the reference computes, in the same order (RMSNorm, q/k/v projections,
RoPE in Hugging Face's rotate-half layout, grouped-query attention over the cache, o_proj, residual,
RMSNorm, SwiGLU MLP, residual; final norm and the head), and returns the logits (B, V) of the new
position. ``tests/test_generation.py`` (``test_fast_decode_step_equals_the_model_forward``) checks
its logits against the reference forward's at every step of a run, up to float32 rounding, and that
greedy generation picks the same tokens both ways.

What it buys. At one token a step every weight matrix is read once for a matrix-vector product:
decoding is bound by memory bandwidth, and the reference path spends its time elsewhere:

* the products can use BLAS's own threads (the default) or split each product's rows between
  ``parallel``'s threads with one-thread BLAS each (``n_threads=2``). One token's 211 products
  (538 MB of SmolLM2's weights) on an idle two-core machine: 2-thread BLAS gemv 27 ms (19.9 GB/s),
  rows split 50 ms (10.8 GB/s). On a busy machine the order flips, because BLAS's threads spin-wait
  for a core that another process holds: 0.7 GB/s against 11.2 GB/s at a load average of 17
  (``benchmarks/bench_generate.py --matvec``; docs/benchmarks.md, "Generation");
* with the rows split, the three products q, k, v are one hand-off to the threads, gate and up
  (with SwiGLU on each thread's own rows) another, so a layer costs four hand-offs;
* matrix-vector products (``W @ x``, BLAS's gemv) instead of one-row GEMMs, and no autograd
  Tensors or graph bookkeeping per op.

docs/benchmarks.md ("Generation") also gives SmolLM2's tokens/s against transformers and against
the memory bound. The model's weights are read, not copied (``DecodeArrays`` holds references), so
the twin costs no memory and always sees the current weights.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from . import parallel


@dataclass
class LayerArrays:
    """One decoder layer's weights as arrays, in the reference's layout (Linear weights (out, in))."""
    input_norm: np.ndarray      # (C,)
    q: np.ndarray               # (H*D, C)
    k: np.ndarray               # (G*D, C)
    v: np.ndarray               # (G*D, C)
    o: np.ndarray               # (C, H*D)
    post_norm: np.ndarray       # (C,)
    gate: np.ndarray            # (I, C)
    up: np.ndarray              # (I, C)
    down: np.ndarray            # (C, I)


@dataclass
class DecodeArrays:
    """A whole Llama as arrays: the embedding (V, C), the layers, the final norm and the head
    (V, C; the embedding itself when tied), with the shapes and the norm's epsilon."""
    embed: np.ndarray
    layers: list
    norm: np.ndarray
    head: np.ndarray
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float


def _row_slices(n_rows: int, n: int) -> list:
    """``n`` near-equal slices of range(n_rows) (fewer when there are fewer rows)."""
    n = max(1, min(n, n_rows))
    bounds = [(i * n_rows + n // 2) // n for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _matvec_rows(w, x, out, rows) -> None:
    """out[:, rows] = x @ w[rows].T: the gemv ``w[rows] @ x[0]`` for one row of x, else a GEMM."""
    if x.shape[0] == 1:
        np.matmul(w[rows], x[0], out=out[0, rows])           # (r, in) @ (in,) -> (r,)
    else:
        np.matmul(x, w[rows].T, out=out[:, rows])            # (B, in) @ (in, r) -> (B, r)


def _products(jobs, n_threads: int) -> None:
    """Run every (w, x, out) product of ``jobs`` with the rows of each w split over the threads:
    thread i computes part i of every product, so the whole list is one hand-off."""
    parts = [_row_slices(w.shape[0], n_threads) for w, _, _ in jobs]

    def work(i):
        for (w, x, out), slices in zip(jobs, parts):
            if i < len(slices):
                _matvec_rows(w, x, out, slices[i])
    parallel.run_chunks(work, list(range(n_threads)))


def _rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (``functional.rms_norm``)."""
    ms = np.einsum("bc,bc->b", x, x)[:, None] / x.shape[-1]   # (B, 1) mean of squares
    return x * (1.0 / np.sqrt(ms + eps)).astype(x.dtype) * weight


def _rope(x, cos, sin):
    """RoPE at one position, rotate-half layout (``functional.rotary_embedding``): with x = (x1, x2)
    the two halves of the last axis, out = (x1 c - x2 s, x2 c + x1 s). x (B, heads, D); cos, sin (D,)."""
    h = x.shape[-1] // 2
    c, s = cos[:h], sin[:h]                                   # the tables repeat c, s in both halves
    x1, x2 = x[..., :h], x[..., h:]
    out = np.empty_like(x)
    out[..., :h] = x1 * c - x2 * s
    out[..., h:] = x2 * c + x1 * s
    return out


def decode_step(arrays: DecodeArrays, ids, cache, cos, sin, n_threads: int | None = None):
    """Logits (B, V) for one new token per row, ``ids`` (B,), appending its keys and values to
    ``cache`` (anything with ``update(layer, k, v) -> (k_all, v_all)``, k (B, G, 1, D) in and
    (B, G, Tk, D) out, as ``models.generation.KVCache``). ``cos``, ``sin``: the RoPE tables (D,)
    of the new position. ``n_threads=None`` (the default) leaves each product to BLAS's own
    threads; a number splits each product's rows over that many of ``parallel``'s threads, with
    one-thread BLAS in each (see the module docstring for when which is faster)."""
    a = arrays
    n = 1 if n_threads is None else n_threads
    blas_threads = contextlib.nullcontext() if n_threads is None else parallel.blas_single_thread()
    H, G, D = a.num_heads, a.num_kv_heads, a.head_dim
    R = H // G
    scale = 1.0 / math.sqrt(D)
    x = a.embed[ids]                                          # (B, C)
    B = x.shape[0]
    dt = x.dtype
    with blas_threads:
        for i, L in enumerate(a.layers):
            h = _rms_norm(x, L.input_norm, a.eps)             # (B, C)
            q = np.empty((B, H * D), dt)
            k = np.empty((B, G * D), dt)
            v = np.empty((B, G * D), dt)
            _products([(L.q, h, q), (L.k, h, k), (L.v, h, v)], n)
            q = _rope(q.reshape(B, H, D), cos, sin)           # (B, H*D) -> (B, H, D)
            k = _rope(k.reshape(B, G, D), cos, sin)           # (B, G*D) -> (B, G, D)
            k_all, v_all = cache.update(i, k[:, :, None, :],            # (B, G, 1, D) in,
                                        v.reshape(B, G, 1, D))          # (B, G, Tk, D) out
            qg = q.reshape(B, G, R, D)                        # the R query heads of each kv group
            s = np.matmul(qg, k_all.transpose(0, 1, 3, 2))    # (B,G,R,D) @ (B,G,D,Tk) -> (B,G,R,Tk)
            s *= scale
            s -= s.max(axis=-1, keepdims=True)                # softmax over the keys
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            y = np.matmul(s, v_all).reshape(B, H * D)         # (B,G,R,Tk) @ (B,G,Tk,D) -> (B, H*D)
            o = np.empty((B, L.o.shape[0]), dt)
            _products([(L.o, y, o)], n)
            x = x + o                                         # residual
            h = _rms_norm(x, L.post_norm, a.eps)
            act = np.empty((B, L.gate.shape[0]), dt)          # (B, I) silu(gate) * up
            gate_parts = _row_slices(L.gate.shape[0], n)

            def mlp_in(j, L=L, h=h, act=act, gate_parts=gate_parts):
                if j >= len(gate_parts):
                    return
                r = gate_parts[j]
                g = np.empty((B, r.stop - r.start), dt)
                u = np.empty_like(g)
                _matvec_rows(L.gate[r], h, g, slice(None))            # (B, r) this thread's rows
                _matvec_rows(L.up[r], h, u, slice(None))
                # silu(g) * u with sigmoid(g) = (1 + tanh(g / 2)) / 2, which never overflows
                sig = np.tanh(g * 0.5)
                sig *= 0.5
                sig += 0.5
                act[:, r] = g * sig * u
            parallel.run_chunks(mlp_in, list(range(n)))
            d = np.empty((B, L.down.shape[0]), dt)
            _products([(L.down, act, d)], n)
            x = x + d                                         # residual
        h = _rms_norm(x, a.norm, a.eps)
        logits = np.empty((B, a.head.shape[0]), dt)           # (B, V)
        _products([(a.head, h, logits)], n)
    return logits
