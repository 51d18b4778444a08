"""Damage generators for the file fuzz tests, and the child process that loads damaged files.

Generators take the bytes (or JSON) of a real, loadable file and yield (label, damaged bytes):
truncations at many offsets, byte flips in the header, JSON mutations of every field (type swaps,
NaN, negatives, zero, huge sizes), and lies in a safetensors header (dtype relabelled, offsets
shifted or overlapping, shapes changed). Every generator is deterministic for a given seed.

``python tests/_damage.py`` is the child: it reads cases (loader kind, path) as JSON from stdin,
caps its own address space (``resource.setrlimit(RLIMIT_AS)``), loads each case and prints one JSON
line per case: {"i", "outcome", "message"}, where outcome is "refused" (the family's error, one line,
naming the path), "loaded" (the damage left a valid file) or "wrong" (any other exception, or a
message without the path). Before each case it prints {"start": i}, so that the parent can name the
case a hang or a crash happened in.
"""
from __future__ import annotations

import json
import random
import struct
import sys

# ------------------------------------------------------------------ generators
HUGE = [10**6, 10**9, 10**18]
JSON_SWAPS = [None, True, "false", "1", [], {}, 0, -1, 1.5, float("nan"), float("inf"), -1e300]


def truncations(data: bytes, count: int, seed: int):
    """``count`` prefixes of ``data``: the first bytes, the 8-byte length field's edges, and
    random cut points (never the whole file)."""
    rnd = random.Random(seed)
    cuts = {0, 1, 7, 8, 9, len(data) - 1}
    while len(cuts) < min(count, len(data)):
        cuts.add(rnd.randrange(1, len(data)))
    for cut in sorted(cuts)[:count]:
        yield f"truncate@{cut}", data[:cut]


def byte_flips(data: bytes, count: int, seed: int, region: int):
    """``count`` copies of ``data`` with one byte of the first ``region`` bytes changed."""
    rnd = random.Random(seed)
    for _ in range(count):
        i = rnd.randrange(min(region, len(data)))
        value = rnd.choice([0x00, 0xFF, 0x7F, 0x80, data[i] ^ (1 << rnd.randrange(8))])
        yield f"flip@{i}={value:#x}", data[:i] + bytes([value]) + data[i + 1:]


def json_mutations(obj: dict, seed: int, values=JSON_SWAPS + HUGE):
    """Each top-level field of ``obj`` set to each of ``values``, each field removed, plus the
    whole document replaced by a list, a string, a number and deep nesting."""
    for key in sorted(obj):
        for v in values:
            yield f"{key}={v!r}", json.dumps({**obj, key: v}).encode()
        yield f"drop {key}", json.dumps({k: v for k, v in obj.items() if k != key}).encode()
    yield "a list", b"[1, 2, 3]"
    yield "a string", b'"config"'
    yield "a number", b"42"
    yield "deep nesting", b"[" * 100_000 + b"]" * 100_000
    yield "not UTF-8", b'{"hidden_size": "\xff\xfe"}'


def safetensors_lies(data: bytes, seed: int):
    """Copies of a safetensors file whose header lies: each entry's dtype relabelled, offsets moved
    (negative, past the end, overlapping the previous tensor), shape grown or made a string, the
    header length field set past the end, and an extra entry pointing at the header bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    rnd = random.Random(seed)

    def pack(h):
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + body

    for name in rnd.sample(names, min(4, len(names))):
        info = header[name]
        lo, hi = info["data_offsets"]
        for label, change in [
                ("dtype BF16", {"dtype": "BF16"}), ("dtype F64", {"dtype": "F64"}),
                ("dtype I64", {"dtype": "I64"}), ("dtype junk", {"dtype": 7}),
                ("offsets negative", {"data_offsets": [-8, hi]}),
                ("offsets past end", {"data_offsets": [lo, len(body) + 64]}),
                ("offsets reversed", {"data_offsets": [hi, lo]}),
                ("offsets overlap", {"data_offsets": [max(lo - 4, 0), hi - 4]}),
                ("offsets huge", {"data_offsets": [lo, 2**70]}),
                ("shape doubled", {"shape": [2 * d for d in info["shape"]]}),
                ("shape huge", {"shape": [10**9] * len(info["shape"])}),
                ("shape string", {"shape": "12"}), ("shape negative", {"shape": [-1]}),
                ("entry a list", None)]:
            h = json.loads(json.dumps(header))
            h[name] = [1, 2] if change is None else {**info, **change}
            yield f"{name}: {label}", pack(h)
    yield "header length past end", struct.pack("<Q", len(data)) + data[8:]
    yield "header length huge", struct.pack("<Q", 2**63) + data[8:]
    h = json.loads(json.dumps(header))
    h["extra"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    yield "extra entry over the first tensor", pack(h)
    yield "metadata not strings", pack({**header, "__metadata__": {"format": 1}})


# ------------------------------------------------------------------ the child
def _load(kind: str, path: str):
    if kind in ("model", "gguf"):    # a checkpoint folder, or a .gguf file
        from minilora.models import LlamaForCausalLM
        LlamaForCausalLM.from_pretrained(path)
    elif kind == "gguf-reader":
        from minilora.gguf import GGUFFile
        f = GGUFFile(path)
        for name in f.tensors:
            f.dequantize(name)
    elif kind == "adapter":
        from minilora.lora import PeftModel
        from minilora.models import LlamaForCausalLM
        base = LlamaForCausalLM.from_pretrained(path + ".base")
        PeftModel.from_pretrained(base, path)
    elif kind == "tokenizer":
        from minilora.data import BPETokenizer
        tok = BPETokenizer.from_pretrained(path)
        tok.decode(tok.encode("Hello, world 123"))
    else:
        raise AssertionError(kind)


def _family(kind: str):
    from minilora.gguf import GGUFError
    from minilora.lora import AdapterError
    from minilora.models import CheckpointError
    if kind == "model":
        return CheckpointError
    if kind in ("gguf", "gguf-reader"):
        return GGUFError
    if kind == "adapter":
        return AdapterError
    from minilora.data.bpe import TokenizerError
    return TokenizerError


def main() -> None:
    import resource
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 2 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cases = json.load(sys.stdin)
    for i, (kind, path) in enumerate(cases):
        print(json.dumps({"start": i}), flush=True)
        family = _family(kind)
        try:
            _load(kind, path)
            outcome, message = "loaded", ""
        except family as e:
            message = str(e)
            ok = path in message and "\n" not in message
            outcome = "refused" if ok else "wrong"
        except BaseException as e:   # another type, MemoryError included: the case fails
            outcome, message = "wrong", f"{type(e).__name__}: {e}"[:500]
        print(json.dumps({"i": i, "outcome": outcome, "message": message[:500]}), flush=True)


if __name__ == "__main__":
    main()

__all__ = ["truncations", "byte_flips", "json_mutations", "safetensors_lies"]
