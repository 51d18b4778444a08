"""Model answers to the exercises, written the way a learner would: plain NumPy, from the formulas.

These are the teacher's copy. They do NOT call the library's implementations (the checker's
references do), so ``tests/test_exercises.py`` checking them against the references is a real
second derivation of every formula. The solutions notebook (``notebooks/exercises/solutions.ipynb``)
is built from this file, and the student notebook's stubs from these signatures and docstrings; see
docs/teachers-guide.md for how to keep the two apart when handing them out.
"""
import numpy as np

from minilora.memory import count_parameters
from minilora.quant import DYNAMIC_MAP, NF4_CODE

__all__ = ["lora_forward", "count_lora_params", "lora_grads", "merge", "unmerge", "matmul_backward",
           "softmax_backward", "nf4_quantize_block", "pack_nibbles", "double_quantize_absmax",
           "memory_full_lora_qlora"]


def lora_forward(x, W0, A, B, alpha, r):
    """The LoRA layer's output h = W0·x + (α/r)·B·A·x, for row vectors x.

    x: (..., in), W0: (out, in), A: (r, in), B: (out, r), all float64; alpha, r: numbers.
    Returns h: float64 (..., out).
    """
    scaling = alpha / r
    base = x @ W0.T                        # (..., in) @ (in, out) -> (..., out)
    down = x @ A.T                         # (..., in) @ (in, r)   -> (..., r)
    up = down @ B.T                        # (..., r)  @ (r, out)  -> (..., out)
    return base + scaling * up


def count_lora_params(config, r, target_modules):
    """How many parameters a rank-r LoRA adapter trains on every layer of a Llama.

    config: a LlamaConfig (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads); target_modules: names among "q_proj", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj". Returns an int (not a float).
    """
    d = config.hidden_size
    head_dim = d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim            # k and v are narrower under GQA
    f = config.intermediate_size
    shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
              "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}   # (out, in)
    per_layer = 0
    for name in target_modules:
        out_f, in_f = shapes[name]
        per_layer += r * in_f + out_f * r                 # A (r, in) + B (out, r)
    return per_layer * config.num_hidden_layers


def lora_grads(x, A, B, grad_h, alpha, r):
    """dL/dA and dL/dB for the adapter path h = (α/r)·(x Aᵀ) Bᵀ, given grad_h = dL/dh.

    x: (..., in), A: (r, in), B: (out, r), grad_h: (..., out), all float64.
    Returns (dA float64 (r, in), dB float64 (out, r)).
    """
    s = alpha / r
    X = x.reshape(-1, x.shape[-1])                        # (N, in): every example one row
    G = grad_h.reshape(-1, grad_h.shape[-1])              # (N, out)
    u = X @ A.T                                           # (N, r): the input squeezed to r numbers
    dB = s * G.T @ u                                      # (out, N) @ (N, r) -> (out, r)
    dA = s * (G @ B).T @ X                                # (r, N) @ (N, in)  -> (r, in)
    return dA, dB


def merge(W0, A, B, alpha, r):
    """The merged weight W = W0 + (α/r)·B·A.

    W0: (out, in), A: (r, in), B: (out, r), all float64. Returns W: float64 (out, in).
    """
    return W0 + (alpha / r) * (B @ A)                     # (out, r) @ (r, in) -> (out, in)


def unmerge(W, A, B, alpha, r):
    """The base weight back from a merged one: W0 = W − (α/r)·B·A.

    W: (out, in), A: (r, in), B: (out, r), all float64. Returns W0: float64 (out, in).
    """
    return W - (alpha / r) * (B @ A)


def matmul_backward(a, b, grad_out):
    """Gradients of out = a @ b (NumPy's batched, broadcasting matmul).

    a: (..., n, k), b: (..., k, m), grad_out: (..., n, m) with the broadcast batch shape, all
    float64. Returns (da, db), float64, with the shapes of a and b.
    """
    da = grad_out @ np.swapaxes(b, -1, -2)                # (..., n, m) @ (..., m, k) -> (..., n, k)
    db = np.swapaxes(a, -1, -2) @ grad_out                # (..., k, n) @ (..., n, m) -> (..., k, m)

    def sum_to(g, shape):
        g = g.sum(axis=tuple(range(g.ndim - len(shape))))  # axes broadcasting added in front
        stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
        return g.sum(axis=stretched, keepdims=True)       # size-1 axes broadcasting stretched

    return sum_to(da, a.shape), sum_to(db, b.shape)


def softmax_backward(x, grad_y):
    """dL/dx for y = softmax(x) along the last axis, given grad_y = dL/dy.

    x, grad_y: float64, the same shape. Returns dx: float64, the shape of x.
    """
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    return y * (grad_y - (grad_y * y).sum(axis=-1, keepdims=True))


def nf4_quantize_block(block):
    """Quantize one block (float32, at most 64 values) to 4-bit NormalFloat.

    Returns (indices, absmax): indices uint8 (n,) into NF4_CODE, absmax float32 = max |block|
    (at least 1e-38). A value exactly halfway between two codes takes the lower index.
    """
    block = np.asarray(block, dtype=np.float32)
    absmax = np.float32(np.abs(block).max())
    x = block / max(absmax, np.float32(1e-38))            # into [-1, 1]
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2        # (15,) float32 boundaries
    indices = np.searchsorted(midpoints, x, side="left")  # ties go to the lower index
    return indices.astype(np.uint8), absmax


def pack_nibbles(indices):
    """Pack 4-bit indices two per byte: byte k = idx[2k] << 4 | idx[2k+1].

    indices: uint8 (n,), each in 0..15. An odd count is padded with 7 (the index of 0.0 in
    NF4_CODE). Returns packed: uint8 (ceil(n/2),), not int64.
    """
    idx = np.asarray(indices, dtype=np.uint8)
    if idx.size % 2 == 1:
        idx = np.append(idx, np.uint8(7))
    high, low = idx[0::2], idx[1::2]
    return ((high << 4) | low).astype(np.uint8)


def double_quantize_absmax(absmax):
    """Quantize the absmax constants to 8 bits (QLoRA's double quantization).

    offset = mean(absmax); c = absmax − offset; c is cut into blocks of 256, each scaled by its own
    max |c| (nested_absmax, at least 1e-38) and rounded to the nearest DYNAMIC_MAP entry (ties to the
    lower index). Returns (codes uint8 (n,), nested_absmax float32 (ceil(n/256),), offset float32).
    """
    absmax = np.asarray(absmax, dtype=np.float32)
    offset = np.float32(absmax.mean())
    c = absmax - offset
    n = c.size
    n_blocks = (n + 255) // 256
    padded = np.zeros(n_blocks * 256, dtype=np.float32)
    padded[:n] = c
    blocks = padded.reshape(n_blocks, 256)                # (n_blocks, 256)
    nested_absmax = np.abs(blocks).max(axis=1)            # (n_blocks,)
    scaled = blocks / np.maximum(nested_absmax, np.float32(1e-38))[:, None]
    midpoints = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / 2  # (255,) float32
    codes = np.searchsorted(midpoints, scaled.reshape(-1)[:n], side="left")
    return codes.astype(np.uint8), nested_absmax, offset


def memory_full_lora_qlora(config, r, target_modules):
    """Training memory in bytes (activations not counted) for full fine-tuning, LoRA and QLoRA.

    A trainable parameter costs 16 bytes: 2 (16-bit weight) + 2 (gradient) + 4 (float32 master copy)
    + 8 (AdamW's m and v in float32). A frozen parameter costs 2 bytes, except that QLoRA stores the
    decoder's Linear weights in NF4: 4 bits + 8/64 + 32/(64·256) bits of double-quantized constants.
    Returns {"full": int, "lora": int, "qlora": int} (ints, not floats: round them).
    """
    counts = count_parameters(config)                     # {"total": ..., "linear": ..., ...}
    n, n_linear = counts["total"], counts["linear"]
    n_lora = count_lora_params(config, r, target_modules)
    nf4_bytes = (4 + 8 / 64 + 32 / (64 * 256)) / 8
    full = 16 * n
    lora = 2 * n + 16 * n_lora
    qlora = nf4_bytes * n_linear + 2 * (n - n_linear) + 16 * n_lora
    return {"full": round(full), "lora": round(lora), "qlora": round(qlora)}
