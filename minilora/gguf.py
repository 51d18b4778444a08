"""GGUF files (llama.cpp's model format, version 3), read with NumPy alone.

A GGUF file is, in order (all little-endian):

1. the header: magic ``b"GGUF"``, version (u32, 2 or 3), tensor count (u64), metadata count (u64);
2. the metadata: key (string) -> typed value; a string is a u64 byte length and UTF-8 bytes, an
   array is an element type (u32), a count (u64) and the elements;
3. one info per tensor: name (string), number of dims (u32), the dims (u64 each, **innermost
   first**: ggml's dims[0] varies fastest), the ggml type (u32), and the offset (u64) of its bytes
   from the start of the data section;
4. padding up to ``general.alignment`` (a u32 key, 32 when absent), then the data section.

``GGUFFile(path)`` maps the file into memory (nothing is copied until a tensor is asked for) and
parses 1-4. Tensor shapes are given in NumPy order (the dims reversed), so a weight stored with
dims [in, out] is an (out, in) array, as Hugging Face stores it. ``dequantize(name)`` turns a
tensor's blocks into float32 for the types below, each written from its block layout and computed
for all blocks at once (NumPy over a (n_blocks, bytes_per_block) view, no loop over blocks):

    F32, F16, BF16   one value per element (4, 2, 2 bytes)
    Q8_0             blocks of 32: d (f16), qs[32] (i8);          x[j] = qs[j] * d
    Q4_0             blocks of 32: d (f16), qs[16] (u8);          x[j] = (lo(qs[j]) - 8) * d,
                                                                  x[j + 16] = (hi(qs[j]) - 8) * d
    Q4_1             blocks of 32: d (f16), m (f16), qs[16] (u8); x[j] = lo(qs[j]) * d + m,
                                                                  x[j + 16] = hi(qs[j]) * d + m

(lo/hi: the low and high nibble of a byte; the low nibbles are the first half of a block, unlike
NF4's packing in ``minilora.quant``, which puts element 2i in the high nibble of byte i.) Other ggml
types (K-quants, Q5_*, ...) are recognised by name and refused. The results equal the ``gguf``
package's ``gguf.quants.dequantize`` bit for bit (tests/test_gguf.py).

Every malformed part (magic, version, a count or length that runs past the end of the file, an
unknown metadata type, a repeated key or tensor name, a tensor whose bytes lie past the end) raises
``GGUFError``, a one-line ``ValueError`` naming the file, the part and what was expected.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml tensor types: id -> (name, values per block, bytes per block). All are listed so that a
# refusal can name the type and the end of every tensor can be checked against the file size.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# metadata value types: id -> (name, struct format of one scalar; None for STRING and ARRAY)
_VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7


class GGUFError(ValueError):
    """A GGUF file that cannot be read (one line: the file, the part, what was expected)."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lies in the file and what it holds.

    ``shape`` is in NumPy order (GGUF's dims reversed); ``offset`` is the absolute byte position of
    its first block in the file (the data section's start plus the offset the info records)."""
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type, (f"unknown type {self.type}",))[0]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)     # Python ints: a damaged file's dims cannot overflow

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data (whole blocks of its type)."""
        _, block, size = GGML_TYPES[self.type]
        return -(-self.n_elements // block) * size


class _Cursor:
    """Reads little-endian scalars and strings from a buffer, refusing to run past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF file: {n} bytes needed at offset {start} "
                            f"but the file has {len(self.buf)}; re-download or re-convert it")
        self.pos += n
        return start

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.buf, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: a string at offset {start} is not UTF-8; the file is "
                            "corrupt, re-download it") from None

    def value(self, vtype: int, key: str):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype == _ARRAY:     # each element is itself a typed, counted array
                return [self.value(_ARRAY, key) for _ in range(count)]
            fmt = self._format(etype, key)
            width = struct.calcsize(fmt)
            start = self.take(width * count)
            # numeric arrays (token types, scores) are read in one go, not element by element
            return np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=start).tolist()
        return self.scalar(self._format(vtype, key))

    def _format(self, vtype: int, key: str) -> str:
        if vtype not in _VALUE_TYPES or _VALUE_TYPES[vtype][1] is None:
            raise GGUFError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}; "
                            "the file is corrupt or newer than this reader (GGUF v3 types 0-12)")
        return _VALUE_TYPES[vtype][1]


class GGUFFile:
    """A GGUF file mapped into memory: ``version``, ``metadata`` (key -> value; arrays as lists),
    ``tensors`` (name -> GGUFTensorInfo, in file order), ``alignment`` and ``data_offset``.

    The file stays mapped while this object lives; ``raw(name)`` is a view of a tensor's bytes and
    ``dequantize(name)`` a new float32 array. Any malformed part (magic, version, a read past the
    end, a tensor whose data lies past the end, an unknown metadata type) raises a one-line
    ``GGUFError`` naming the file.
    """

    def __init__(self, path):
        try:
            self._parse(path)
        except (struct.error, OverflowError, TypeError, RecursionError, MemoryError) as e:
            raise GGUFError(f"{path}: the GGUF file is malformed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); re-download or "
                            "re-convert it") from None

    def _parse(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {str(self.path)!r} does not exist; pass the path of a "
                                    ".gguf file")
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            if size < 24:   # magic, version, two counts
                raise GGUFError(f"{self.path}: truncated GGUF file ({size} bytes, the header alone "
                                "is 24); re-download or re-convert it")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)   # a view of the mapping, no copy
        cur = _Cursor(self._mmap, self.path)

        magic = bytes(self._mmap[0:4])
        cur.take(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF'); "
                            "pass a .gguf file written by llama.cpp or the gguf package")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported; this "
                            "reader knows versions 2 and 3")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")

        self.metadata: dict = {}
        for _ in range(n_kv):
            key = cur.string()
            if key in self.metadata:
                raise GGUFError(f"{self.path}: metadata key {key!r} appears twice; expected each "
                                "key once (the file is corrupt)")
            self.metadata[key] = cur.value(cur.scalar("<I"), key)

        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            ttype, rel = cur.scalar("<I"), cur.scalar("<Q")
            infos.append((name, tuple(reversed(dims)), ttype, rel))   # dims innermost-first

        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(self.alignment, bool) or not isinstance(self.alignment, int) \
                or self.alignment <= 0:
            raise GGUFError(f"{self.path}: general.alignment is {self.alignment!r}; expected a positive integer")
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment   # round up to alignment

        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ttype, rel in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice; expected each name "
                                "once (the file is corrupt)")
            info = GGUFTensorInfo(name, shape, ttype, self.data_offset + rel)
            if rel % self.alignment:
                raise GGUFError(f"{self.path}: tensor {name!r} has offset {rel}, not a multiple of "
                                f"the alignment {self.alignment}; the file is corrupt")
            end = info.offset + (info.nbytes if ttype in GGML_TYPES else 0)
            if end > size:
                raise GGUFError(f"{self.path}: tensor {name!r} ends at byte {end} but the file has "
                                f"{size}; the file is truncated, re-download it")
            self.tensors[name] = info

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, "
                f"{len(self.metadata)} metadata keys, {len(self.tensors)} tensors)")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view of the mapped file (no copy)."""
        info = self._info(name)
        return self._bytes[info.offset:info.offset + info.nbytes]

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array of its NumPy shape."""
        info = self._info(name)
        if info.type_name not in SUPPORTED_TYPES:
            raise GGUFError(f"{self.path}: tensor {name!r} has ggml type {info.type_name}, which "
                            f"minilora does not dequantize; use a file quantized as one of "
                            f"{', '.join(SUPPORTED_TYPES)}")
        _, block, _ = GGML_TYPES[info.type]
        if info.n_elements % block:
            raise GGUFError(f"{self.path}: tensor {name!r} has {info.n_elements} elements, not a "
                            f"whole number of {info.type_name} blocks of {block}; the file is corrupt")
        return dequantize_blocks(self.raw(name), info.type_name).reshape(info.shape)

    def _info(self, name: str) -> GGUFTensorInfo:
        if name not in self.tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}; its tensors are listed in .tensors")
        return self.tensors[name]


def dequantize_blocks(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Flat float32 values of ``raw`` (uint8 bytes, whole blocks) of ggml type ``type_name``."""
    if type_name == "F32":
        return raw.view("<f4").astype(np.float32)
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32)
    if type_name == "BF16":
        bits = raw.view("<u2").astype(np.uint32) << 16              # bf16 = top half of a float32
        return bits.view(np.float32)
    if type_name == "Q8_0":
        blocks = raw.reshape(-1, 34)                                # (n_blocks, 2 + 32)
        d = _f16(blocks[:, 0:2])                                    # (n_blocks, 1)
        qs = blocks[:, 2:].view(np.int8).astype(np.float32)         # (n_blocks, 32)
        return (qs * d).reshape(-1)
    if type_name == "Q4_0":
        blocks = raw.reshape(-1, 18)                                # (n_blocks, 2 + 16)
        d = _f16(blocks[:, 0:2])                                    # (n_blocks, 1)
        q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)    # (n_blocks, 32), in -8..7
        return (q.astype(np.float32) * d).reshape(-1)
    if type_name == "Q4_1":
        blocks = raw.reshape(-1, 20)                                # (n_blocks, 2 + 2 + 16)
        d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])           # (n_blocks, 1) each
        q = _nibbles(blocks[:, 4:]).astype(np.float32)              # (n_blocks, 32), in 0..15
        return (q * d + m).reshape(-1)
    raise GGUFError(f"ggml type {type_name} is not dequantized here; supported: "
                    f"{', '.join(SUPPORTED_TYPES)}")


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """(n_blocks, 2) uint8 holding a little-endian float16 -> (n_blocks, 1) float32."""
    return np.ascontiguousarray(two_bytes).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n_blocks, 16) bytes -> (n_blocks, 32) 4-bit values: the 16 low nibbles, then the 16 high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)              # (n_blocks, 16 + 16)


def read_gguf(path) -> tuple[dict, dict]:
    """(metadata, tensors) of a GGUF file: the key/value dict and name -> GGUFTensorInfo."""
    f = GGUFFile(path)
    return f.metadata, f.tensors


__all__ = ["GGUFError", "GGUFFile", "GGUFTensorInfo", "GGML_TYPES", "SUPPORTED_TYPES", "dequantize_blocks",
           "read_gguf"]
