"""Blockwise 4-bit quantization (NF4, FP4, int4) on NumPy or CuPy, byte for byte with bitsandbytes.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") stores the frozen
base weights in 4-bit NormalFloat: the flattened weight is cut into blocks of ``blocksize`` values
(64 by default), each block is scaled by its largest magnitude (absmax) into [-1, 1], and every value
is replaced by the index of the nearest entry of a 16-value code book (``codebooks.NF4_CODE``). Two
indices share a byte. Dequantization is ``code[index] * absmax[block]``.

The steps follow bitsandbytes 0.50.2's CPU path exactly (``bitsandbytes.functional.quantize_4bit``):

1. absmax[b] = max |x| over block b, in float32;
2. full blocks are multiplied by float32(1 / absmax); the trailing partial block is divided by its
   absmax (both clamped below at 1e-38, so an all-zero block scales by 1e38 instead of dividing by 0);
3. nearest code by midpoints: index = number of midpoints strictly below the scaled value, which is
   ``searchsorted(midpoints, s, side='left')``: a value exactly on a midpoint takes the LOWER index;
4. byte k = index[2k] << 4 | index[2k+1] (even element in the high nibble); an odd count is padded
   with the index of 0.0.

Fast on the CPU without a compiled extension: the nearest-code search is 15 vectorised comparisons
(one per midpoint, over the code book, not over the data) summed into uint8, run on cache-sized tiles
of whole blocks; dequantization gathers two float32 values per byte from a 256-entry table. On CUDA,
dequantization is a kernel of minilora's own (``kernels.py``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from .. import backend, settings
from ..fast import parallel
from .codebooks import FP4_CODE, INT4_CODE, NF4_CODE
from .double_quant import NESTED_BLOCKSIZE, DoubleQuantState, double_quantize

__all__ = [
    "VALID_BLOCKSIZES", "QuantizedTensor4bit", "NF4Tensor",
    "quantize_blockwise_4bit", "quantize_nf4", "quantize_fp4", "quantize_int4",
    "dequantize_nf4", "dequantize_4bit", "pack_4bit", "unpack_4bit",
    "storage_bytes", "nf4_bits_per_parameter", "quantization_error",
]

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_ABSMAX_FLOOR = np.float32(1e-38)
# Values per NumPy tile: 64 Ki float32 = 256 KiB, small enough that the 15 comparison passes and
# the packing run in the CPU's L2 cache instead of streaming the whole matrix from memory 15 times.
_TILE_VALUES = 1 << 16


# ---------------------------------------------------------------- code-book tables
class _CodeTables(NamedTuple):
    code: np.ndarray        # (16,) float32, in index order
    midpoints: np.ndarray   # (15,) float32 boundaries between neighbours in ascending order
    order: np.ndarray | None  # (16,) uint8: ascending position -> index; None when already sorted
    pad_index: int          # the index 0.0 quantizes to (pads an odd count)
    pairs: np.ndarray       # (256,) uint64: the two float32 codes of every byte, even value first


@lru_cache(maxsize=16)
def _tables(code_bytes: bytes) -> _CodeTables:
    code = np.frombuffer(code_bytes, dtype=np.float32).copy()
    # Stable sort: FP4 holds +0 (index 0) and -0 (index 8); PyTorch's argsort, which bitsandbytes
    # uses, puts index 0 first, and so does a stable sort.
    order = np.argsort(code, kind="stable")
    ascending = code[order]
    midpoints = (ascending[:-1] + ascending[1:]) / np.float32(2)   # float32 sum, exact halving
    pad_position = int(np.count_nonzero(midpoints < np.float32(0)))
    pad_index = int(order[pad_position])
    byte = np.arange(256)
    pairs = np.stack([code[byte >> 4], code[byte & 0x0F]], axis=1)  # (256, 2): high, low nibble
    pairs = np.ascontiguousarray(pairs, dtype=np.float32).view(np.uint64).reshape(256)
    is_sorted = bool(np.all(order == np.arange(16)))
    return _CodeTables(code, midpoints, None if is_sorted else order.astype(np.uint8), pad_index,
                       pairs)


def _check_code(code) -> np.ndarray:
    code = np.ascontiguousarray(backend.to_numpy(code), dtype=np.float32).reshape(-1)
    if code.size != 16 or not np.all(np.isfinite(code)) or np.abs(code).max() > 1:
        raise ValueError(f"a 4-bit code book must hold 16 finite values in [-1, 1], got {code.size} "
                         "values; use codebooks.NF4_CODE, FP4_CODE or INT4_CODE")
    return code


# ---------------------------------------------------------------- input checks
def _check_blocksize(blocksize) -> int:
    if (isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer))
            or int(blocksize) not in VALID_BLOCKSIZES):
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}; "
                         "QLoRA uses 64")
    return int(blocksize)


def _as_float32_flat(w, who: str):
    """(flat float32 array on w's device, original shape), or a one-line ValueError."""
    if backend.get_xp(w) is np and not isinstance(w, np.ndarray):
        data = getattr(w, "data", None)                   # a minilora Tensor keeps its array in .data
        if isinstance(data, np.ndarray) or (data is not None and backend.get_xp(data) is not np):
            w = data
        else:
            w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"{who} needs a floating-point array, got dtype {w.dtype}; "
                         "convert it with .astype(np.float32)")
    if w.size == 0:
        raise ValueError(f"{who} cannot quantize an empty array (shape {tuple(w.shape)}); "
                         "pass at least one value")
    xp = backend.get_xp(w)
    return xp.asarray(w, dtype=xp.float32).reshape(-1), tuple(int(d) for d in w.shape)


# ---------------------------------------------------------------- packing
def _pack_even(idx):
    """Pack an even number of 4-bit indices (uint8, any shape, C order) into bytes."""
    xp = backend.get_xp(idx)
    # View each (even, odd) pair as one little-endian uint16: the even index in the low byte.
    pair = idx.reshape(-1).view(np.dtype("<u2"))          # (n/2,)
    # (pair << 4) puts the even index in bits 4..7; (pair >> 8) is the odd index; the uint8 cast
    # keeps bits 0..7, dropping the odd index's shifted copy in bits 12..15.
    return ((pair << 4) | (pair >> 8)).astype(xp.uint8)


def pack_4bit(idx, pad: int = 0):
    """Pack 4-bit indices (integers 0..15) two per byte, even element in the high nibble.

    An odd count is padded with ``pad``. Returns uint8 of ceil(n / 2) bytes on idx's device.
    """
    xp = backend.get_xp(idx)
    idx = xp.asarray(idx).reshape(-1)
    if idx.size and (not np.issubdtype(idx.dtype, np.integer) or int(idx.min()) < 0
                     or int(idx.max()) > 15):
        raise ValueError("pack_4bit needs integer indices in 0..15; quantize the values first")
    idx = idx.astype(xp.uint8)
    if idx.size % 2:
        idx = xp.concatenate([idx, xp.full(1, pad, dtype=xp.uint8)])
    return _pack_even(idx)


def unpack_4bit(packed, n: int):
    """The inverse of ``pack_4bit``: uint8 indices (n,) from packed bytes."""
    xp = backend.get_xp(packed)
    if not 0 <= n <= 2 * packed.size:
        raise ValueError(f"cannot unpack {n} indices from {packed.size} bytes; "
                         f"at most {2 * packed.size}")
    idx = xp.empty((packed.size, 2), dtype=xp.uint8)     # (n_bytes, 2): high, low nibble
    idx[:, 0] = packed >> 4
    idx[:, 1] = packed & 0x0F
    return idx.reshape(-1)[:n]


# ---------------------------------------------------------------- the nearest-code search
def _nearest_index(s, tables: _CodeTables):
    """uint8 index of the nearest code to every scaled value ``s`` (any shape).

    The number of midpoints strictly below s equals ``searchsorted(midpoints, s, side='left')``, so
    a value exactly on a midpoint takes the lower index, as in bitsandbytes. 15 comparisons summed in
    uint8 are several times faster in NumPy than a binary search per value. Values a rounding step
    beyond +-1 need no clipping: every midpoint lies strictly inside [-1, 1].
    """
    xp = backend.get_xp(s)
    idx = xp.zeros(s.shape, dtype=xp.uint8)
    above = xp.empty(s.shape, dtype=xp.bool_)
    for m in tables.midpoints:                            # 15 passes: over the code book
        xp.greater(s, m, out=above)
        idx += above.view(xp.uint8)
    if tables.order is not None:                          # FP4: ascending position -> bit pattern
        idx = xp.take(backend.to_device(tables.order, backend.device_of(s)), idx)
    return idx


def _check_finite(absmax) -> None:
    # A NaN or infinity anywhere makes its block's absmax non-finite (max propagates NaN).
    if not bool(backend.get_xp(absmax).isfinite(absmax).all()):
        raise ValueError("cannot quantize values that are NaN or infinite (a whole block would be "
                         "lost); check the weights with np.isfinite first")


def _quantize_full_blocks(blocks, tables: _CodeTables):
    """Quantize whole blocks (n_blocks, blocksize) -> (absmax (n_blocks,), packed (n_blocks, bs/2))."""
    xp = backend.get_xp(blocks)
    absmax = xp.abs(blocks).max(axis=1)                                   # (n_blocks,)
    _check_finite(absmax)
    inv = xp.reciprocal(xp.maximum(absmax, _ABSMAX_FLOOR))                # float32(1 / absmax)
    scaled = blocks * inv[:, None]                                        # (n_blocks, blocksize)
    idx = _nearest_index(scaled, tables)                                  # (n_blocks, blocksize)
    return absmax, _pack_even(idx).reshape(blocks.shape[0], -1)


# ---------------------------------------------------------------- storage formula
def storage_bytes(n: int, blocksize: int = 64, double_quant: bool = False) -> dict:
    """Bytes of every array a 4-bit tensor of ``n`` values stores, by name.

    The one storage formula: ``QuantizedTensor4bit.nbytes`` (which sums the arrays it actually holds)
    equals its sum, and ``nf4_bits_per_parameter`` is derived from it. Code books (the 16-entry
    4-bit code, the 256-entry dynamic map) are format constants shared by every tensor and are not
    counted (bitsandbytes writes a copy of each into checkpoints: 64 + 1024 bytes per tensor).
    """
    blocksize = _check_blocksize(blocksize)
    n_blocks = -(-n // blocksize)
    sizes = {"packed": (n + 1) // 2}                                      # two 4-bit values per byte
    if double_quant:
        sizes["absmax_q"] = n_blocks                                      # uint8 per block
        sizes["nested_absmax"] = 4 * -(-n_blocks // NESTED_BLOCKSIZE)     # float32 per 256 blocks
        sizes["offset"] = 4                                               # one float32 per tensor
    else:
        sizes["absmax"] = 4 * n_blocks                                    # float32 per block
    return sizes


def nf4_bits_per_parameter(blocksize: int = 64, double_quant: bool = False, n: int | None = None
                           ) -> float:
    """Bits stored per weight: 4 for the index plus the quantization constants' share.

    With ``n`` given: the exact figure for a tensor of ``n`` values (per-tensor constants included).
    Without: the figure for a large tensor, measured from ``storage_bytes`` as the cost of ``N`` more
    values, N = blocksize * 256 * 2 (whole nested blocks), so the one-off ``offset`` cancels out.
    Blocksize 64 gives 4.5 without double quantization and 4 + 8/64 + 32/(64*256) = 4.126953 with it.
    """
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be a positive number of values, got {n}")
        return 8 * sum(storage_bytes(n, blocksize, double_quant).values()) / n
    big = _check_blocksize(blocksize) * NESTED_BLOCKSIZE * 2
    grown = sum(storage_bytes(2 * big, blocksize, double_quant).values())
    base = sum(storage_bytes(big, blocksize, double_quant).values())
    return 8 * (grown - base) / big


# ---------------------------------------------------------------- the quantized tensor
class QuantizedTensor4bit:
    """A blockwise 4-bit tensor: packed indices plus per-block absmax (or its double quantization).

    ``packed`` uint8 (ceil(n/2),) and the constants live on the device of the original array.
    ``absmax`` is always float32 (n_blocks,): the stored array, or, with double quantization, the
    float32 values reconstructed from the stored 8-bit codes (computed on access; that is what
    dequantization uses). ``nbytes`` sums the arrays actually stored (``stored_arrays()``).
    """

    def __init__(self, packed, shape, blocksize: int, code, quant_type: str = "custom",
                 absmax=None, double_quant: DoubleQuantState | None = None):
        if (absmax is None) == (double_quant is None):
            raise ValueError("pass exactly one of absmax (float32 per block) or double_quant")
        self.packed = packed
        self.shape = tuple(int(d) for d in shape)
        self.blocksize = _check_blocksize(blocksize)
        self.code = _check_code(code)                     # host float32 (16,), a format constant
        self.quant_type = quant_type
        self._absmax = absmax
        self.double_quant_state = double_quant
        n = self.size
        if packed.dtype != np.uint8 or packed.size != (n + 1) // 2:
            raise ValueError(f"packed must be uint8 with {(n + 1) // 2} bytes for shape {self.shape}, "
                             f"got {packed.dtype} with {packed.size}")
        n_blocks = self.n_blocks
        got = absmax.size if absmax is not None else double_quant.q.size
        if got != n_blocks:
            raise ValueError(f"expected {n_blocks} absmax values for {n} values in blocks of "
                             f"{self.blocksize}, got {got}")

    # -- sizes
    @property
    def size(self) -> int:
        """Number of quantized values (the product of ``shape``)."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.double_quant_state is not None

    @property
    def device(self) -> str:
        return backend.device_of(self.packed)

    @property
    def absmax(self):
        """float32 (n_blocks,): the per-block scales dequantization multiplies by."""
        if self.double_quant_state is not None:
            return self.double_quant_state.dequantize()
        return self._absmax

    def stored_arrays(self) -> dict:
        """Every array this tensor keeps, by name (what ``nbytes`` counts and files store)."""
        arrays = {"packed": self.packed}
        if self.double_quant_state is not None:
            arrays.update(self.double_quant_state.stored_arrays())
        else:
            arrays["absmax"] = self._absmax
        return arrays

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed indices plus quantization constants."""
        return int(sum(a.nbytes for a in self.stored_arrays().values()))

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes / self.size

    # -- values
    def dequantize(self, out=None):
        """float32 array of ``shape`` on the tensor's device: ``code[index] * absmax[block]``.

        ``out``: an optional C-contiguous float32 array of ``size`` values on the same device to
        write into, so that a layer dequantizing its weight every step can reuse one buffer.
        """
        absmax = self.absmax
        n = self.size
        xp = backend.get_xp(self.packed)
        if out is not None:
            if (backend.get_xp(out) is not xp or out.dtype != np.float32 or out.size != n
                    or not out.flags.c_contiguous):
                raise ValueError(f"out must be a C-contiguous float32 array of {n} values on "
                                 f"{self.device}; allocate it with empty({self.shape}, float32)")
            flat = out.reshape(-1)                        # a view: out is C-contiguous
        else:
            flat = xp.empty(n, dtype=xp.float32)
        if xp is not np:
            from .kernels import dequantize_4bit_cuda
            code = backend.to_device(self.code, "cuda")
            dequantize_4bit_cuda(self.packed, absmax, code, self.blocksize, n, out=flat)
        else:
            _dequantize_numpy(self.packed, absmax, _tables(self.code.tobytes()).pairs,
                              self.blocksize, n, flat)
        return flat.reshape(self.shape)

    def indices(self):
        """The 4-bit indices (uint8, ``shape``): for teaching and tests."""
        return unpack_4bit(self.packed, self.size).reshape(self.shape)

    def to(self, device: str) -> "QuantizedTensor4bit":
        """A copy with every array on ``device`` ("cpu" or "cuda")."""
        dq = self.double_quant_state.to(device) if self.double_quant_state is not None else None
        absmax = backend.to_device(self._absmax, device) if self._absmax is not None else None
        return type(self)(backend.to_device(self.packed, device), self.shape, self.blocksize,
                          self.code, self.quant_type, absmax=absmax, double_quant=dq)

    @classmethod
    def from_arrays(cls, arrays: dict, shape, blocksize: int, quant_type: str = "nf4", code=None):
        """Rebuild a tensor from ``stored_arrays()`` (e.g. read back from a safetensors file)."""
        from .codebooks import get_code
        code = get_code(quant_type) if code is None else code
        if "absmax_q" in arrays:
            missing = {"nested_absmax", "offset"} - set(arrays)
            if missing:
                raise ValueError(f"double-quantized arrays lack {sorted(missing)}; "
                                 "store every array of stored_arrays()")
            dq = DoubleQuantState(arrays["absmax_q"], arrays["nested_absmax"],
                                  arrays["offset"].reshape(1))
            return cls(arrays["packed"], shape, blocksize, code, quant_type, double_quant=dq)
        if "absmax" not in arrays:
            raise ValueError("arrays lack 'absmax' (or 'absmax_q' for double quantization)")
        return cls(arrays["packed"], shape, blocksize, code, quant_type, absmax=arrays["absmax"])

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"{type(self).__name__}(shape={self.shape}, blocksize={self.blocksize}{dq}, "
                f"type={self.quant_type}, {self.nbytes} bytes, {self.bits_per_parameter:.4f} bits/param"
                f", device={self.device})")


class NF4Tensor(QuantizedTensor4bit):
    """A weight in 4-bit NormalFloat: see ``QuantizedTensor4bit`` for the fields."""

    def __init__(self, packed, shape, blocksize: int, code=NF4_CODE, quant_type: str = "nf4",
                 absmax=None, double_quant: DoubleQuantState | None = None):
        super().__init__(packed, shape, blocksize, code, quant_type, absmax=absmax,
                         double_quant=double_quant)


def _dequantize_numpy(packed, absmax, pairs, blocksize: int, n: int, out):
    """NumPy dequantization into ``out`` (n,): one 8-byte gather per packed byte (the two float32
    codes of that byte, from the 256-entry ``pairs`` table), then a per-block multiply. Cache-sized
    tiles of whole blocks, shared among CPU threads (``minilora.fast.parallel``; NumPy releases the GIL
    in both calls, and every tile is independent, so the result is the same bits on any count)."""
    n_full, rem = divmod(n, blocksize)
    half = blocksize // 2                                 # bytes per block
    full = out[: n_full * blocksize]
    full_pairs = full.view(np.uint64)                     # (n_full * half,): two float32 per byte
    full_blocks = full.reshape(n_full, blocksize)         # (n_full, blocksize)

    def tiles(blocks: slice):
        first, last, _ = blocks.indices(n_full)
        tile = max(1, _TILE_VALUES // blocksize)
        for start in range(first, last, tile):
            stop = min(start + tile, last)
            # A byte never exceeds 255, the table's last index, so mode="clip" changes nothing; it
            # skips NumPy's raise-on-error index path, which makes the gather about 3x faster.
            np.take(pairs, packed[start * half: stop * half],
                    out=full_pairs[start * half: stop * half], mode="clip")
            full_blocks[start:stop] *= absmax[start:stop, None]
    if settings.reference_mode():                       # one thread, all blocks in order
        tiles(slice(0, n_full))
    else:                                               # tiles of blocks shared among CPU threads
        parallel.run_chunks(tiles, parallel.split_rows(n_full, n_full * blocksize, np))
    if rem:                                               # the partial last block (maybe odd)
        tail = np.take(pairs, packed[n_full * half:], mode="clip").view(np.float32)[:rem]  # (rem,)
        np.multiply(tail, absmax[n_full], out=out[n_full * blocksize:])
    return out


# ---------------------------------------------------------------- quantizers
def quantize_blockwise_4bit(w, code, blocksize: int = 64, double_quant: bool = False, *,
                            quant_type: str = "custom") -> QuantizedTensor4bit:
    """Blockwise absmax 4-bit quantization of ``w`` (numpy or cupy) with any 16-value code book.

    ``code`` lists the value of each 4-bit index (any order; FP4's is bit-pattern order). Returns a
    ``QuantizedTensor4bit`` (an ``NF4Tensor`` when ``quant_type == "nf4"``) on w's device.
    """
    x, shape = _as_float32_flat(w, "quantize")
    blocksize = _check_blocksize(blocksize)
    tables = _tables(_check_code(code).tobytes())
    xp = backend.get_xp(x)
    n = x.size
    n_full, rem = divmod(n, blocksize)
    absmax = xp.empty(n_full + (rem > 0), dtype=xp.float32)        # (n_blocks,)
    packed = xp.empty((n + 1) // 2, dtype=xp.uint8)                # (ceil(n/2),)
    if n_full:
        blocks = x[: n_full * blocksize].reshape(n_full, blocksize)             # (n_full, bs)
        packed_blocks = packed[: n_full * blocksize // 2].reshape(n_full, -1)   # (n_full, bs/2)
        # NumPy: cache-sized tiles of whole blocks; CuPy: all blocks at once.
        tile = max(1, _TILE_VALUES // blocksize) if xp is np else n_full
        for start in range(0, n_full, tile):
            stop = min(start + tile, n_full)
            absmax[start:stop], packed_blocks[start:stop] = _quantize_full_blocks(
                blocks[start:stop], tables)
    if rem:                                   # the trailing partial block divides by its absmax
        tail = x[n_full * blocksize:]                                           # (rem,)
        tail_absmax = xp.maximum(xp.abs(tail).max(), _ABSMAX_FLOOR)
        _check_finite(tail_absmax)
        idx = _nearest_index(tail / tail_absmax, tables)                        # (rem,)
        if rem % 2:
            idx = xp.concatenate([idx, xp.full(1, tables.pad_index, dtype=xp.uint8)])
        packed[n_full * blocksize // 2:] = _pack_even(idx)
        absmax[n_full] = tail_absmax
    cls = NF4Tensor if quant_type == "nf4" else QuantizedTensor4bit
    if double_quant:
        return cls(packed, shape, blocksize, tables.code, quant_type,
                   double_quant=double_quantize(absmax))
    return cls(packed, shape, blocksize, tables.code, quant_type, absmax=absmax)


def quantize_nf4(w, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """QLoRA's 4-bit NormalFloat quantization of ``w`` (numpy or cupy; kept on its device)."""
    return quantize_blockwise_4bit(w, NF4_CODE, blocksize, double_quant, quant_type="nf4")


def quantize_fp4(w, blocksize: int = 64, double_quant: bool = False) -> QuantizedTensor4bit:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), for comparison with NF4."""
    return quantize_blockwise_4bit(w, FP4_CODE, blocksize, double_quant, quant_type="fp4")


def quantize_int4(w, blocksize: int = 64, double_quant: bool = False) -> QuantizedTensor4bit:
    """Symmetric absmax int4 (levels k/7), for comparison with NF4."""
    return quantize_blockwise_4bit(w, INT4_CODE, blocksize, double_quant, quant_type="int4")


def dequantize_4bit(q: QuantizedTensor4bit):
    """float32 values of any 4-bit tensor, shaped like the original."""
    if not isinstance(q, QuantizedTensor4bit):
        raise ValueError(f"expected a QuantizedTensor4bit from quantize_nf4, got {type(q).__name__}")
    return q.dequantize()


def dequantize_nf4(q: NF4Tensor):
    """float32 values of an ``NF4Tensor``, shaped like the original (same as ``q.dequantize()``)."""
    return dequantize_4bit(q)


def quantization_error(w, w_hat) -> dict:
    """Mean absolute, max absolute and root-mean-square error of ``w_hat`` against ``w``.

    The difference is taken in float32 (relative rounding 6e-8, far below what these statistics
    are quoted to) and summed in float64. Returns plain Python floats.
    """
    xp = backend.get_xp(w, w_hat)
    diff = (xp.asarray(w, dtype=xp.float32) - xp.asarray(w_hat, dtype=xp.float32)).reshape(-1)
    if diff.size == 0:
        raise ValueError("quantization_error needs at least one value")
    absdiff = xp.abs(diff, out=diff)
    mean_abs = float(absdiff.sum(dtype=xp.float64)) / diff.size
    max_abs = float(absdiff.max())
    rmse = float(xp.sqrt(xp.square(absdiff).sum(dtype=xp.float64) / diff.size))
    return {"mean_abs_error": mean_abs, "max_abs_error": max_abs, "rmse": rmse}
