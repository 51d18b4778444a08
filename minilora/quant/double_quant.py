"""Double quantization: quantize the quantization constants (QLoRA, Dettmers et al., 2023, sec. 3).

Blockwise NF4 with blocksize 64 stores one float32 absmax per 64 weights: 32/64 = 0.5 extra bits per
parameter. QLoRA quantizes those constants a second time:

1. subtract their mean (``offset``; absmax values are all positive, so centring them lets the
   symmetric 8-bit map use both signs),
2. quantize the centred values blockwise (256 per block) to 8 bits with the signed dynamic map,
   keeping one float32 ``nested_absmax`` per 256 constants,

which costs 8/64 + 32/(64*256) = 0.127 bits per parameter instead of 0.5. Reconstruction is
``absmax' = float32(float32(map[q] * nested_absmax[i // 256]) + offset)``.

Rounding: this module rounds each centred constant to the exactly nearest map value (ties to the
lower index). bitsandbytes' CPU kernel (``quantize_cpu``) finds the neighbour through a lookup-table
binary search and only compares the two values around the slot it lands in, so for values near a
midpoint it sometimes keeps the farther code: for normal weights about 0.17% of its 8-bit codes
(899 of 542,304 over six matrices up to 2048x8192) differ from exact nearest by one index, and ours
is never the farther one (``tests/test_nf4.py`` measures this on every run). The 4-bit data are unaffected: they
come from the exact float32 absmax, so packed bytes are identical with or without double quant.
Its mean is taken in float64 and rounded once; PyTorch's float32 mean can differ by one ulp.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .. import backend
from .codebooks import DYNAMIC_MAP

__all__ = ["NESTED_BLOCKSIZE", "DoubleQuantState", "double_quantize",
           "quantize_blockwise_8bit", "dequantize_blockwise_8bit"]

NESTED_BLOCKSIZE = 256           # QLoRA's blocksize for the second quantization
_ABSMAX_FLOOR = np.float32(1e-38)  # an all-zero block divides by this instead of by 0


@lru_cache(maxsize=8)
def _midpoints(code_bytes: bytes) -> np.ndarray:
    code = np.frombuffer(code_bytes, dtype=np.float32)
    return (code[:-1] + code[1:]) / np.float32(2)        # (255,) float32 decision boundaries


def _check_map(code) -> np.ndarray:
    code = np.ascontiguousarray(backend.to_numpy(code), dtype=np.float32).reshape(-1)
    if code.size != 256 or not np.all(np.diff(code) >= 0):
        raise ValueError(f"an 8-bit map must hold 256 ascending float32 values, got {code.size}; "
                         "use codebooks.DYNAMIC_MAP")
    return code


def quantize_blockwise_8bit(x, code=DYNAMIC_MAP, blocksize: int = NESTED_BLOCKSIZE):
    """8-bit blockwise absmax quantization of a 1-D float32 array (numpy or cupy).

    Returns ``(q, absmax)``: ``q`` uint8 (n,), the index of the nearest map value to
    ``x / absmax[block]`` (ties to the lower index), and ``absmax`` float32 (ceil(n / blocksize),).
    Like bitsandbytes' 8-bit kernel it divides by the absmax (the 4-bit path multiplies by its
    reciprocal) and stores the unclamped block maximum.
    """
    if not isinstance(blocksize, (int, np.integer)) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    code = _check_map(code)
    xp = backend.get_xp(x)
    x = xp.asarray(x, dtype=xp.float32).reshape(-1)
    n = x.size
    n_blocks = -(-n // blocksize)
    padded = xp.zeros(n_blocks * blocksize, dtype=xp.float32)
    padded[:n] = x                                        # zero padding changes no block's maximum
    blocks = padded.reshape(n_blocks, blocksize)          # (n_blocks, blocksize)
    absmax = xp.abs(blocks).max(axis=1)                   # (n_blocks,)
    scaled = blocks / xp.maximum(absmax, _ABSMAX_FLOOR)[:, None]   # (n_blocks, blocksize) in [-1, 1]
    midpoints = backend.to_device(_midpoints(code.tobytes()), backend.device_of(x))
    q = xp.searchsorted(midpoints, scaled.reshape(-1)[:n], side="left").astype(xp.uint8)  # (n,)
    return q, absmax


def dequantize_blockwise_8bit(q, absmax, code=DYNAMIC_MAP, blocksize: int = NESTED_BLOCKSIZE):
    """float32 ``code[q] * absmax[i // blocksize]`` (n,) for 8-bit codes ``q``."""
    xp = backend.get_xp(q, absmax)
    code = backend.to_device(_check_map(code), backend.device_of(q))
    scale = xp.repeat(absmax, blocksize)[: q.size]       # (n,): each block's absmax, per value
    return code[q] * scale


@dataclass(frozen=True, eq=False)
class DoubleQuantState:
    """The stored form of double-quantized absmax constants.

    ``q`` uint8 (n_blocks,): one 8-bit code per 4-bit block; ``nested_absmax`` float32
    (ceil(n_blocks / 256),); ``offset`` float32 (1,): the mean of the original absmax. The 256-entry
    ``DYNAMIC_MAP`` is a constant of the format, shared by every tensor, and not stored here.
    """

    q: Any
    nested_absmax: Any
    offset: Any
    blocksize: int = NESTED_BLOCKSIZE

    def dequantize(self):
        """The reconstructed float32 absmax (n_blocks,), on the arrays' device."""
        xp = backend.get_xp(self.q)
        if xp is not np:
            from .kernels import reconstruct_absmax_cuda
            dmap = backend.to_device(DYNAMIC_MAP, "cuda")
            return reconstruct_absmax_cuda(self.q, self.nested_absmax, dmap, self.offset,
                                           self.blocksize)
        scaled = dequantize_blockwise_8bit(self.q, self.nested_absmax, DYNAMIC_MAP, self.blocksize)
        return scaled + self.offset                       # float32 + float32: the second rounding

    def stored_arrays(self) -> dict:
        """Every array this state keeps, by name (what ``nbytes`` counts and files store)."""
        return {"absmax_q": self.q, "nested_absmax": self.nested_absmax, "offset": self.offset}

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.stored_arrays().values()))

    def to(self, device: str) -> "DoubleQuantState":
        return DoubleQuantState(backend.to_device(self.q, device),
                                backend.to_device(self.nested_absmax, device),
                                backend.to_device(self.offset, device), self.blocksize)


def double_quantize(absmax, blocksize: int = NESTED_BLOCKSIZE) -> DoubleQuantState:
    """Quantize float32 absmax constants to 8 bits (mean offset + blockwise dynamic map)."""
    xp = backend.get_xp(absmax)
    absmax = xp.asarray(absmax, dtype=xp.float32).reshape(-1)
    if absmax.size == 0:
        raise ValueError("double_quantize needs at least one absmax value, got an empty array")
    # Mean in float64, rounded once to float32 (PyTorch's float32 mean may land one ulp away).
    offset = xp.asarray(absmax.mean(dtype=xp.float64), dtype=xp.float32).reshape(1)   # (1,)
    q, nested_absmax = quantize_blockwise_8bit(absmax - offset, DYNAMIC_MAP, blocksize)
    return DoubleQuantState(q=q, nested_absmax=nested_absmax, offset=offset, blocksize=blocksize)
