"""CUDA kernels of minilora's own for 4-bit dequantization (QLoRA's hot path on the GPU).

QLoRA dequantizes every frozen NF4 weight on each forward pass, so on CUDA this is one pass over the
output with one thread per value: read the byte, pick the nibble, look the code up, scale by the
block's absmax. The kernels are CuPy ``ElementwiseKernel`` objects created through
``minilora.backend`` (the only module that imports CuPy) and compiled once, on first use.

Both kernels produce the same float32 bits as the NumPy path in ``nf4.py`` / ``double_quant.py``:
``__fmul_rn`` and ``__fadd_rn`` are IEEE round-to-nearest operations that the compiler may never
fuse into a fused multiply-add (an FMA rounds once instead of twice and would change the last bit).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .. import backend

__all__ = ["DEQUANTIZE_4BIT_SOURCE", "RECONSTRUCT_ABSMAX_SOURCE",
           "dequantize_4bit_kernel", "reconstruct_absmax_kernel",
           "dequantize_4bit_cuda", "reconstruct_absmax_cuda"]

# One thread per output value i (ElementwiseKernel's loop index). Value i lives in byte i/2: the even
# value in the high nibble, the odd one in the low nibble (bitsandbytes' layout).
DEQUANTIZE_4BIT_SOURCE = r"""
const unsigned char two_values = packed[i >> 1];
const int index = (i & 1) ? (two_values & 0x0F) : (two_values >> 4);
y = __fmul_rn(code[index], absmax[i / blocksize]);
"""

# Double quantization's inverse, one thread per 4-bit block i:
# absmax[i] = float32(float32(map[q[i]] * nested_absmax[i / 256]) + offset), two roundings as in NumPy.
RECONSTRUCT_ABSMAX_SOURCE = r"""
absmax = __fadd_rn(__fmul_rn(dynamic_map[q], nested_absmax[i / nested_blocksize]), offset[0]);
"""


@lru_cache(maxsize=None)
def dequantize_4bit_kernel():
    """The compiled 4-bit dequantization kernel: (packed, absmax, code, blocksize) -> y."""
    return backend.elementwise_kernel(
        "raw uint8 packed, raw float32 absmax, raw float32 code, int64 blocksize",
        "float32 y",
        DEQUANTIZE_4BIT_SOURCE,
        "minilora_dequantize_4bit",
    )


@lru_cache(maxsize=None)
def reconstruct_absmax_kernel():
    """The compiled kernel that turns double-quantized constants back into float32 absmax."""
    return backend.elementwise_kernel(
        "uint8 q, raw float32 nested_absmax, raw float32 dynamic_map, raw float32 offset, "
        "int64 nested_blocksize",
        "float32 absmax",
        RECONSTRUCT_ABSMAX_SOURCE,
        "minilora_reconstruct_absmax",
    )


def dequantize_4bit_cuda(packed, absmax, code, blocksize: int, n: int, out=None):
    """float32 values (n,) from packed 4-bit indices on the GPU; all inputs are CuPy arrays.
    ``out``: an optional contiguous float32 CuPy array of n values to write into."""
    xp = backend.get_xp(packed)
    y = xp.empty(n, dtype=xp.float32) if out is None else out   # (n,): the launch size is y's size
    dequantize_4bit_kernel()(packed, absmax, code, np.int64(blocksize), y)
    return y


def reconstruct_absmax_cuda(q, nested_absmax, dynamic_map, offset, nested_blocksize: int):
    """float32 absmax (n_blocks,) from 8-bit codes, nested absmax and offset, on the GPU."""
    xp = backend.get_xp(q)
    out = xp.empty(q.shape, dtype=xp.float32)            # (n_blocks,)
    reconstruct_absmax_kernel()(q, nested_absmax, dynamic_map, offset, np.int64(nested_blocksize),
                                out)
    return out
