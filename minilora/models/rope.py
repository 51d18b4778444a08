"""Rotary position embedding tables (RoPE, Su et al. 2021, "RoFormer"), with Llama's scalings.

RoPE encodes a token's position by rotating its query and key vectors: feature pair i (feature i of
the first half of a head and feature i of the second half, the "rotate-half" convention of Hugging
Face's Llama) is turned by the angle ``position * theta_i`` with ``theta_i = rope_theta^(-2i/d)``.
Because a rotation by a followed by the inverse of a rotation by b is a rotation by a - b, the
attention score q_m . k_n depends only on the distance m - n.

Three ways of choosing the frequencies theta_i (transformers' ``rope_type``) are implemented:

* ``default``: theta_i as above;
* ``linear`` (position interpolation, Chen et al. 2023): every theta_i divided by ``factor``, which
  is the same as dividing every position by it;
* ``llama3`` (Llama 3.1/3.2): long wavelengths (2 pi / theta_i above
  ``original_max_position_embeddings / low_freq_factor``) are divided by ``factor``, short ones
  (below ``original_max_position_embeddings / high_freq_factor``) are kept, and those in between
  are blended linearly in ``original_max_position_embeddings / wavelength``.

Any other type is refused. This module holds the frequencies and the tables of cos and sin of the
angles; the rotation itself is ``functional.rotary_embedding`` (fused twin: fast/functional.py). Everything is computed
the way transformers does (``_compute_linear_scaling_rope_parameters``, ``_compute_llama3_parameters``:
float32 arrays, Python scalars rounded to float32, ``a / x`` as ``a * (1 / x)``), so that both
libraries get the same bits (tests/test_config_rope.py).
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend

ROPE_TYPES = ("default", "linear", "llama3")
# the parameters each type reads (besides rope_theta); all are required
ROPE_PARAMETERS = {"default": (), "linear": ("factor",),
                   "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                              "original_max_position_embeddings")}


def normalize_rope_scaling(scaling: dict | None, max_position_embeddings: int) -> dict | None:
    """transformers' ``rope_scaling`` (4.x) or ``rope_parameters`` (5.x) -> None for plain RoPE, or
    ``{"rope_type": ..., <its parameters>}``; ``rope_theta`` is not part of it (LlamaConfig keeps it).

    ``type`` is read as ``rope_type`` (older configs). llama3's ``original_max_position_embeddings``
    defaults to ``max_position_embeddings``, as in transformers. A type not in ROPE_TYPES, a missing
    parameter, ``partial_rotary_factor`` other than 1, or a key the type does not read is refused
    with a one-line ValueError: a RoPE setting is never ignored.
    """
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict like {{'rope_type': 'linear', 'factor': 2.0}}, "
                         f"got {scaling!r}")
    s = dict(scaling)
    s.pop("rope_theta", None)
    kind = s.pop("rope_type", None)
    alias = s.pop("type", None)
    if kind is not None and alias is not None and kind != alias:
        raise ValueError(f"rope_scaling says rope_type {kind!r} and type {alias!r}; keep one of them")
    kind = kind or alias or "default"
    if kind not in ROPE_TYPES:
        raise ValueError(f"RoPE type {kind!r} is not supported; minilora implements "
                         f"{', '.join(ROPE_TYPES)}")
    if float(s.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor {scaling['partial_rotary_factor']} is not supported; "
                         "minilora rotates the whole head (1.0)")
    if kind == "llama3":
        s.setdefault("original_max_position_embeddings", max_position_embeddings)
    wanted = ROPE_PARAMETERS[kind]
    missing = [k for k in wanted if k not in s]
    extra = sorted(k for k in s if k not in wanted)
    if missing or extra:
        raise ValueError(f"RoPE type {kind!r} takes {list(wanted) or 'no parameters'}; got "
                         f"{'missing ' + str(missing) if missing else ''}"
                         f"{' ' if missing and extra else ''}{'unused ' + str(extra) if extra else ''}")
    if kind == "default":
        return None
    out = {"rope_type": kind}
    for k in wanted:
        v = s[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"RoPE parameter {k} must be a positive number, got {v!r}")
        out[k] = int(v) if k == "original_max_position_embeddings" else float(v)
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"llama3 RoPE needs high_freq_factor > low_freq_factor, got "
                         f"{out['high_freq_factor']} and {out['low_freq_factor']}")
    return out


def rope_inverse_frequencies(head_dim: int, theta: float = 10000.0,
                             scaling: dict | None = None) -> np.ndarray:
    """theta_i = 1 / theta^(2i / d) for i = 0 .. d/2 - 1, then scaled as ``scaling`` says (None:
    plain RoPE; else a dict from ``normalize_rope_scaling``); float32, transformers' arithmetic."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; pick hidden_size and "
                         "num_attention_heads so that hidden_size // heads is even")
    f32 = np.float32
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)   # (d/2,)
    # theta^exponent in float64, rounded once to float32: the correctly rounded power, which is what
    # torch's pow gives transformers in all but rare last-bit cases (NumPy's float32 power is off
    # by one bit for about one frequency in ten)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(f32)
    inv_freq = f32(1.0) / power                                       # (d/2,)
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / f32(scaling["factor"])                      # = positions / factor
    if kind == "llama3":
        return _llama3_inverse_frequencies(inv_freq, scaling)
    raise ValueError(f"RoPE type {kind!r} is not supported; minilora implements "
                     f"{', '.join(ROPE_TYPES)}")


def _llama3_inverse_frequencies(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1's frequency scaling (transformers' ``_compute_llama3_parameters``), in float32.

    ``c / x`` for an array x is written ``(1 / x) * c``, which is how torch evaluates a scalar
    divided by a tensor; both then round the same way."""
    f32 = np.float32
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_freq_wavelen = f32(old_context / low)        # wavelengths longer than this: divide by factor
    high_freq_wavelen = f32(old_context / high)      # shorter than this: keep
    wavelen = (f32(1.0) / inv_freq) * f32(2 * math.pi)                              # (d/2,)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)  # (d/2,)
    # in between: blend 1/factor and 1 by smooth = (old_context / wavelen - low) / (high - low)
    smooth = ((f32(1.0) / wavelen) * f32(old_context) - f32(low)) / f32(high - low)
    smoothed = (f32(1.0) - smooth) * scaled / f32(factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


class RotaryTables:
    """cos/sin of ``position * theta_i`` for positions [offset, offset + T), cached.

    One table per (array module, dtype) covering positions 0..n-1 is kept and grown (doubling) when a
    longer sequence or a later offset (a KV cache) asks for more; a request is then a slice (a view),
    so training (same T, offset 0) and token-by-token generation both cost no recomputation.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        self.head_dim = head_dim
        self.theta = float(theta)
        self.scaling = scaling
        self.inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)   # (d/2,)
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
