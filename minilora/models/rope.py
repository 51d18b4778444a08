"""Rotary position embedding tables (RoPE, Su et al. 2021, "RoFormer").

RoPE encodes a token's position by rotating its query and key vectors: feature pair i (feature i of
the first half of a head and feature i of the second half, the "rotate-half" convention of Hugging
Face's Llama) is turned by the angle ``position * theta_i`` with ``theta_i = rope_theta^(-2i/d)``.
Because a rotation by a followed by the inverse of a rotation by b is a rotation by a - b, the
attention score q_m . k_n depends only on the distance m - n.

This module holds the tables of cos and sin of those angles; the rotation itself is the fused op
``functional.rotary_embedding``. Angles are computed the way transformers does (float32 inverse
frequencies, float32 product with the position), so that both libraries round identically.
"""
from __future__ import annotations

import numpy as np

from .. import backend


def rope_inverse_frequencies(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """theta_i = 1 / theta^(2i / d) for i = 0 .. d/2 - 1, in float32 (transformers' arithmetic)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; pick hidden_size and "
                         "num_attention_heads so that hidden_size // heads is even")
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)   # (d/2,)


class RotaryTables:
    """cos/sin of ``position * theta_i`` for positions [offset, offset + T), cached.

    One table per (array module, dtype) covering positions 0..n-1 is kept and grown (doubling) when a
    longer sequence or a later offset (a KV cache) asks for more; a request is then a slice (a view),
    so training (same T, offset 0) and token-by-token generation both cost no recomputation.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        self.head_dim = head_dim
        self.theta = float(theta)
        self.inv_freq = rope_inverse_frequencies(head_dim, theta)      # (d/2,)
        self._tables: dict = {}

    def __call__(self, T: int, offset: int = 0, xpmod=None, dtype=np.float32):
        """(cos, sin), each (T, head_dim), for positions offset .. offset + T - 1.

        Full width, as transformers builds them: cos = concat(c, c), sin = concat(s, s), where
        c, s (T, head_dim / 2) are the cos and sin of position * theta_i."""
        xpmod = xpmod or backend.xp()
        key = (xpmod.__name__, np.dtype(dtype).name)
        need = offset + T
        have = self._tables.get(key)
        if have is None or have[0].shape[0] < need:
            n = max(need, 2 * have[0].shape[0]) if have is not None else max(need, 256)
            pos = np.arange(n, dtype=np.int64).astype(np.float32)
            angles = pos[:, None] * self.inv_freq[None, :]                # (n, d/2), float32
            angles = np.concatenate([angles, angles], axis=-1)             # (n, d)
            have = (xpmod.asarray(np.cos(angles).astype(dtype)),
                    xpmod.asarray(np.sin(angles).astype(dtype)))
            self._tables[key] = have
        return have[0][offset:need], have[1][offset:need]
