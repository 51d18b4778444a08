"""Every switch and tuning constant of minilora, in one place, each with the reason for its value.

minilora computes every concept two ways (docs/architecture.md, "Two paths, one meaning"):

* the **reference** path: the plain composite that reads like the equation (``functional.py``,
  ``optim.py``, ``lora/layer.py``, ``train.py``), one thread, no kernels of minilora's own;
* the **fast** path: twins in ``minilora/fast/`` (fused backwards, CPU threads, CUDA kernels, the
  merged-weight LoRA op, data parallelism), each tested equal to its reference.

``with minilora.reference():`` (or ``MINILORA_REFERENCE=1`` in the environment) runs the reference
path only. The constants below tune the fast path; the reference path reads none of them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager


def _env_flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "no", "off")


# ------------------------------------------------------------------ reference mode
_reference = _env_flag("MINILORA_REFERENCE")


def reference_mode() -> bool:
    """True inside ``reference()`` (or with MINILORA_REFERENCE=1): only the plain composites run."""
    return _reference


@contextmanager
def reference(enabled: bool = True):
    """Run only the reference composites inside this block: one thread, no model replicas,
    module-form LoRA (``base(x) + lora_B(lora_A(dropout(x))) * scaling``), the three-line AdamW,
    the plain attention, no CUDA kernels of minilora's own. Results equal the fast path's up to
    float32 rounding (tests/test_reference_mode.py). The flag is process-wide, not per thread."""
    global _reference
    old, _reference = _reference, bool(enabled)
    try:
        yield
    finally:
        _reference = old


# ------------------------------------------------------------------ CPU threads (fast/parallel.py)
# Threads of minilora's own kernels; MINILORA_NUM_THREADS overrides. Two, because the CPUs this
# course targets (laptops, CI runners) give two fast cores, and a third thread only adds hand-offs.
DEFAULT_MAX_THREADS = 2
# Below this many elements an elementwise op is not split over threads: a thread hand-off
# (~20 µs) costs more than it saves.
MIN_PARALLEL_ELEMENTS = 1 << 16
# Multiply-adds below which a matmul is not split into row blocks (same reason, for GEMMs).
MIN_PARALLEL_MACS = 1 << 21

# ------------------------------------------------------------------ data parallelism (data_parallel.py)
# Below this many tokens per micro-batch the split does not pay: each thread's Python overhead and
# fixed costs (a replica, and for a 4-bit base its own dequantization of every weight) outweigh the
# halved arithmetic. Measured on the shipped base (2 threads, step time split / plain): LoRA 1.02x at
# 192 tokens per micro-batch, 0.90x at 256, 0.80x at 1024; QLoRA 1.21x at 192, 1.04x at 384,
# 0.96x at 512, 0.87x at 1024.
MIN_TOKENS_PER_MICRO_BATCH = 512

# ------------------------------------------------------------------ attention (fast/attention.py)
# Causal attention is cut into query blocks of at least this many rows, so that the masked upper
# triangle is skipped block by block (blocks of 32 and 128 measured 3% slower on the tiny config).
MIN_QUERY_BLOCK = 64

# ------------------------------------------------------------------ LoRA (lora/fused.py)
# The merged weight W0 + ΔW (out, in) is kept from forward for the backward when out <= this
# fraction of the rows N: then it is at most that fraction of the input x, which the layer keeps
# anyway. Larger ones are formed again in backward, so that a big model does not hold a
# weight-sized array per layer until then.
KEEP_MERGED_WEIGHT = 0.25

# ------------------------------------------------------------------ head + loss (fast/functional.py)
# linear_cross_entropy computes the logits of this many rows at a time (per thread): 256 rows of
# SmolLM2's 49152 ids are 50 MB, against 200 MB for all 1024 rows of a 4 x 256 batch (and as much
# again for their softmax in backward). Fewer rows cost time: every chunk reads the whole (V, C)
# head twice, so small chunks are bound by memory. Head + loss, forward and backward, at that shape
# (CPU seconds, 2 threads, frozen head): 64 rows 1.56, 128 1.19, 256 1.00, 512 0.92; the two-op
# path 0.95-0.97.
LCE_CHUNK_ROWS = 256

# ------------------------------------------------------------------ AdamW (fast/optim.py)
# AdamW updates big parameters in pieces of this many elements (512 KiB of float32), so the four
# arrays of one piece stay in L2 cache across the update's passes (17% faster at 1 thread).
ADAMW_CACHE_PIECE = 1 << 17

# ------------------------------------------------------------------ CUDA (fast/cuda_kernels.py)
# False runs the fused row ops on CuPy with generic array calls instead of minilora's CUDA kernels
# (benchmarks/gpu.py times one against the other).
USE_CUDA_KERNELS = True

# ------------------------------------------------------------------ host memory (backend.py)
# backend.keep_freed_host_memory(): buffers up to 256 MiB come from (and go back to) malloc's heap
# instead of fresh mmaps, and up to 1 GiB of freed heap is kept for reuse: a training step's
# buffers are then not page-faulted back in every step. Process-wide, so it is never set on import:
# the CLI, ``train`` and the benchmarks call it; library users opt in.
HOST_MMAP_THRESHOLD = 256 << 20
HOST_TRIM_THRESHOLD = 1 << 30

# ------------------------------------------------------------------ BPE tokenizer (data/bpe.py)
# Words whose merged token ids BPETokenizer remembers (Hugging Face's BPE cache holds as many);
# when full it stores no more. Text repeats its words: 200 KB of Python source is 43k words but
# 2.9k distinct ones, and encoding it with SmolLM2's vocabulary takes 93 ms from an empty cache
# against 360 ms without one (47 ms once the cache is warm).
BPE_CACHE_SIZE = 10_000


__all__ = ["reference", "reference_mode"]
