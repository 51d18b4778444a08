"""The fast twin of attention: ``functional.scaled_dot_product_attention`` in query blocks, one node.

Reference: the composite in ``functional.scaled_dot_product_attention`` (softmax(Q K^T / sqrt(d) +
mask) V, Vaswani et al. 2017, every step a graph node), which runs inside ``minilora.reference()``.
This twin computes the same up to float32 rounding; ``tests/test_functional_fused.py`` checks the two
equal in forward and gradients (grouped-query heads, KV-cache offsets, boolean and additive masks,
several query blocks, float64 and float32); ``tests/test_autograd_torch.py`` compares it with
PyTorch's ``scaled_dot_product_attention``.

What it buys, measured (docs/benchmarks.md): attention takes 3.6-3.9 ms per layer, forward and
backward, at the tiny config's shapes, against 3.4-3.5 ms for PyTorch's fused flash kernel; it is
about 20% of a tiny training step at one thread. It has not been timed against the composite.
Where the time goes is listed in ``scaled_dot_product_attention``'s docstring: key-major scores, the
FlashAttention identity for the backward, query blocks of at least ``settings.MIN_QUERY_BLOCK`` rows
that skip the masked triangle (blocks of 32 and 128 measured 3% slower on the tiny config), batch
chunks on CPU threads (``fast/parallel.py``).
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend, ops, settings
from ..tensor import Tensor
from . import parallel

__all__ = ["scaled_dot_product_attention"]

_bias_cache: dict = {}


def _causal_bias(Tq: int, Tk: int, xpmod, dtype):
    """Additive mask (Tq, Tk): 0 where query i may see key j, -inf where j > i + (Tk - Tq) (queries
    are the last Tq of the Tk positions, as with a KV cache). The same array as
    ``functional.causal_mask``, built here because a twin does not call its reference; cached."""
    key = (Tq, Tk, xpmod.__name__, np.dtype(dtype).name)
    if key not in _bias_cache:
        i = xpmod.arange(Tq)[:, None] + (Tk - Tq)            # (Tq, 1) each query's position
        j = xpmod.arange(Tk)[None, :]                        # (1, Tk)
        _bias_cache[key] = xpmod.where(j > i, -xpmod.inf, 0.0).astype(dtype)
    return _bias_cache[key]


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


def _batch_slices(xpmod, shapes, n_scores: int) -> list:
    """Slices of axis 0 (the batch) shared by arrays of ``shapes``, for ``parallel.run_chunks``;
    one slice(None) when they do not all have the same size there (broadcast batch axis)."""
    sizes = {shape[0] for shape in shapes}
    if len(sizes) != 1 or any(len(s) < 3 for s in shapes):
        return [slice(None)]
    return parallel.split_rows(sizes.pop(), n_scores, xpmod)


def _query_blocks(Tq: int, Tk: int, causal: bool) -> list:
    """[(a, b, kend)]: query rows [a, b) and the keys [0, kend) they may see.

    Causal attention lets query i see keys up to i + (Tk - Tq) only, so the scores above the
    diagonal are wasted work. Cutting the queries into n blocks and giving each block only the keys
    it can see computes (n + 1) / 2n of the full Tq x Tk scores: 3/4 for 2 blocks, 5/8 for 4.
    """
    n = max(1, min(4, Tq // settings.MIN_QUERY_BLOCK)) if causal and Tk >= Tq else 1
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
            st[..., kend - (b - a):, :] += _causal_bias(b - a, b - a, xpmod, st.dtype).T
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

    Same result as ``functional.scaled_dot_product_attention``'s composite, faster because:

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
        biases.append(_causal_bias(Tq, Tk, xpmod, dt).T)   # -inf where key j > query i
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
