"""LoRA initialisations that start from the base weight W0: PiSSA, OLoRA and LoftQ (PEFT's names).

Plain LoRA (``lora/layer.py``) starts from B = 0: ΔW = 0 and W0 is left alone. The inits here read W0
instead, put a rank-r piece of it into the adapter, and CHANGE THE BASE WEIGHT so that the layer
starts out computing what it computed before (or, for LoftQ, something close to it). With s the
adapter's scaling (α/r, or α/√r with rsLoRA) and W0 of shape (out, in):

* **PiSSA** (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
  Large Language Models"), ``init_lora_weights="pissa"``. With the SVD W0 = U·diag(S)·Vᵀ, the top r
  singular triplets go into the adapter, split evenly between the factors:
  B = U_r·diag(√(S_r/s)), A = diag(√(S_r/s))·V_rᵀ, so s·B·A = U_r·diag(S_r)·V_rᵀ, the best rank-r
  approximation of W0 (Eckart-Young). The base becomes the residual W0 − s·B·A: training moves the
  principal directions and leaves the rest frozen. ``"pissa_niter_K"`` finds the triplets with a
  randomized SVD (``svd_lowrank``: Halko, Martinsson and Tropp 2011, K subspace iterations),
  approximate but cheaper than the full SVD for a large W0.
* **OLoRA** (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"),
  ``"olora"``: the QR decomposition W0 = Q·R; B = Q[:, :r] (orthonormal columns), A = R[:r]; the base
  becomes the residual W0 − s·B·A.
* **LoftQ** (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models"),
  ``"loftq"`` with ``loftq_config={"loftq_bits": 4, "loftq_iter": N}``: N alternations of
  Q_t = dequant(NF4(W0 − s·B_{t-1}·A_{t-1})) (with B_0·A_0 = 0) and s·B_t·A_t = SVD_r(W0 − Q_t), so
  that Q + s·B·A is closer to W0 than NF4 alone. The base becomes Q, float values that NF4 holds
  exactly, which is what PEFT stores in a float model's weight (the model is then quantized, losing
  nothing more). PEFT 0.21 leaves s out of the split (its B·A is SVD_r, not SVD_r / s); the two
  agree when lora_alpha = r, and here s·B·A is the SVD_r for every α, as the paper's identity asks.

The functions ``pissa``, ``olora``, ``loftq_iterations`` are the equations on arrays (numpy or cupy,
computed in float32 as PEFT does, or in float64 for a float64 weight); ``init_from_base`` applies
one to a layer (``LoraLinear.update_layer`` calls it). A trained PiSSA/OLoRA adapter only fits its
residual base; ``to_plain_lora`` turns it back into a plain LoRA of rank 2r on the original W0
(PEFT's ``path_initial_model_for_weight_conversion``, used by ``PeftModel.save_pretrained``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from ..quant import dequantize_nf4, quantize_nf4

# The inits of this module, as ``init_lora_weights`` names them ("pissa_niter_K": K >= 1 iterations).
INIT_FROM_BASE = ("pissa", "pissa_niter_K", "olora", "loftq")
# LoftQ's NF4 blocks: PEFT quantizes with bitsandbytes' Params4bit, whose blocksize is 64 (QLoRA's),
# and without double quantization (compress_statistics=False): the same bytes as quantize_nf4 here.
LOFTQ_BLOCKSIZE = 64
# PEFT's LoftQConfig defaults; minilora quantizes to NF4 only, so 4 is the one accepted bit width.
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}


# ------------------------------------------------------------------ names
def parse_init(init) -> tuple[str, int | None] | None:
    """("pissa", None), ("pissa", K), ("olora", None) or ("loftq", None) for an init of this module;
    None for anything else (True, False, "gaussian", unknown names: the caller decides)."""
    if not isinstance(init, str):
        return None
    if init in ("pissa", "olora", "loftq"):
        return init, None
    head, sep, k = init.partition("_niter_")
    if head == "pissa" and sep and k.isdigit() and k.isascii() and int(k) > 0:
        return "pissa", int(k)
    return None


def check_loftq_config(loftq_config) -> dict:
    """The config as PEFT writes it ({"loftq_bits": 4, "loftq_iter": N}, defaults filled in), or a
    one-line ValueError."""
    if not isinstance(loftq_config, dict) or not loftq_config:
        raise ValueError("init_lora_weights='loftq' needs loftq_config={'loftq_bits': 4, "
                         f"'loftq_iter': N}}, got {loftq_config!r}")
    unknown = sorted(set(loftq_config) - set(LOFTQ_DEFAULTS))
    if unknown:
        raise ValueError(f"loftq_config has keys {unknown}; it takes only {sorted(LOFTQ_DEFAULTS)}")
    cfg = {**LOFTQ_DEFAULTS, **loftq_config}
    if cfg["loftq_bits"] != 4 or isinstance(cfg["loftq_bits"], bool):
        raise ValueError(f"loftq_config loftq_bits={cfg['loftq_bits']!r}; minilora quantizes to NF4 only: "
                         "use loftq_bits=4")
    it = cfg["loftq_iter"]
    if isinstance(it, bool) or not isinstance(it, int) or it <= 0:
        raise ValueError(f"loftq_config loftq_iter={it!r}; expected a positive int (alternations of "
                         "quantization and SVD)")
    return cfg


# ------------------------------------------------------------------ the equations
def _working(W):
    """W in the precision the inits compute in: float64 stays float64, anything else float32."""
    xp = backend.get_xp(W)
    return W.astype(xp.float64 if W.dtype == np.float64 else xp.float32)


def _split(U, S, Vh, scaling: float):
    """(A, B) with s·B·A = U·diag(S)·Vh, the singular values shared evenly: √(S/s) on each side."""
    root = (S / scaling) ** 0.5                   # (r,)
    B = U * root                                  # (out, r): column j scaled by √(S_j/s)
    A = root[:, None] * Vh                        # (r, in): row j scaled by √(S_j/s)
    return A, B


def _check_scaling(scaling: float, who: str) -> None:
    if not scaling > 0:
        raise ValueError(f"{who} splits √(S/s) between A and B and needs a positive scaling s = "
                         f"lora_alpha / r, got {scaling!r}: use lora_alpha > 0")


def svd_lowrank(W, r: int, niter: int, generator: np.random.Generator | None = None):
    """U (m, r), S (r,), V (n, r) with U·diag(S)·Vᵀ ≈ the rank-r truncated SVD of W (m, n).

    Halko, Martinsson and Tropp (2011), Algorithm 4.4 (randomized subspace iteration) and 5.1 (the
    SVD of the small projection), as ``torch.svd_lowrank(W, q=r, niter=niter)`` (PEFT's call for
    "pissa_niter_K"). The Gaussian test matrix is drawn from ``generator`` (default: minilora's
    seeded host generator) and moved to W's device. Each of the ``niter`` iterations multiplies by
    W·Wᵀ once more, which raises the singular values to a higher power and so sharpens the basis
    toward the top r singular vectors.
    """
    xp = backend.get_xp(W)
    m, n = W.shape
    M = W if m >= n else W.T                                    # (m', n'), m' >= n': tall, as torch
    gen = backend.rng() if generator is None else generator
    G = backend.to_device(gen.standard_normal((M.shape[1], r)), backend.device_of(W))  # (n', r)
    Q, _ = xp.linalg.qr(M @ G.astype(M.dtype))                  # (m', n') @ (n', r) -> (m', r)
    for _ in range(niter):
        Q, _ = xp.linalg.qr(M.T @ Q)                            # (n', m') @ (m', r) -> (n', r)
        Q, _ = xp.linalg.qr(M @ Q)                              # (m', n') @ (n', r) -> (m', r)
    U_small, S, Vh = xp.linalg.svd(Q.T @ M, full_matrices=False)  # (r, n') -> (r, r) (r,) (r, n')
    U = Q @ U_small                                             # (m', r) @ (r, r) -> (m', r)
    V = Vh.T                                                    # (n', r)
    return (U, S, V) if m >= n else (V, S, U)


def pissa(W, r: int, scaling: float, niter: int | None = None, generator=None):
    """PiSSA: (A (r, in), B (out, r), residual (out, in)) with s·B·A = W's top-r SVD part and
    residual = W − s·B·A. ``niter=None``: the full SVD; an int: ``svd_lowrank`` with that many
    subspace iterations."""
    _check_scaling(scaling, "PiSSA")
    W = _working(W)
    xp = backend.get_xp(W)
    if niter is None:
        U, S, Vh = xp.linalg.svd(W, full_matrices=False)        # (out, k) (k,) (k, in), k = min
        U, S, Vh = U[:, :r], S[:r], Vh[:r]                      # (out, r) (r,) (r, in)
    else:
        U, S, V = svd_lowrank(W, r, niter, generator)           # (out, r) (r,) (in, r)
        Vh = V.T                                                # (r, in)
    A, B = _split(U, S, Vh, scaling)
    return A, B, W - scaling * (B @ A)                          # (out, r) @ (r, in) -> (out, in)


def olora(W, r: int, scaling: float):
    """OLoRA: (A (r, in), B (out, r), residual (out, in)) with W = Q·R, B = Q[:, :r] (orthonormal
    columns), A = R[:r] and residual = W − s·B·A."""
    W = _working(W)
    xp = backend.get_xp(W)
    Q, R = xp.linalg.qr(W)                                      # (out, k) (k, in), k = min(out, in)
    B, A = Q[:, :r], R[:r]                                      # (out, r) (r, in)
    return A, B, W - scaling * (B @ A)                          # (out, r) @ (r, in) -> (out, in)


def loftq_iterations(W, r: int, scaling: float, num_iter: int, blocksize: int = LOFTQ_BLOCKSIZE):
    """LoftQ, one alternation at a time: yields (A (r, in), B (out, r), Q (out, in)) after each of
    ``num_iter`` steps Q = dequant(NF4(W − s·B·A)), then s·B·A = SVD_r(W − Q) (B·A = 0 before the
    first). Q is in W's working precision and holds only values NF4 represents exactly."""
    _check_scaling(scaling, "LoftQ")
    W = _working(W)
    xp = backend.get_xp(W)
    low_rank = xp.zeros_like(W)                                 # s·B·A, (out, in)
    for _ in range(num_iter):
        Q = dequantize_nf4(quantize_nf4(W - low_rank, blocksize)).astype(W.dtype)  # (out, in)
        U, S, Vh = xp.linalg.svd(W - Q, full_matrices=False)    # (out, k) (k,) (k, in)
        A, B = _split(U[:, :r], S[:r], Vh[:r], scaling)         # (r, in), (out, r)
        low_rank = scaling * (B @ A)                            # (out, r) @ (r, in) -> (out, in)
        yield A, B, Q


def loftq(W, r: int, scaling: float, num_iter: int = 1, blocksize: int = LOFTQ_BLOCKSIZE):
    """LoftQ after ``num_iter`` alternations: (A (r, in), B (out, r), Q (out, in))."""
    for A, B, Q in loftq_iterations(W, r, scaling, num_iter, blocksize):
        pass
    return A, B, Q


# ------------------------------------------------------------------ on a layer
def init_from_base(base_layer, quantized: bool, init: str, r: int, scaling: float,
                   loftq_config=None, where: str = ""):
    """Initialise an adapter from ``base_layer``'s weight by ``init`` ("pissa", "pissa_niter_K",
    "olora" or "loftq"): returns (A (r, in), B (out, r)) and REPLACES the base weight (the residual,
    or LoftQ's Q), so that base + s·B·A starts out equal (LoftQ: close) to the old base.

    ``quantized``: the base is a 4-bit Linear (read with ``dequantized_weight()``, written with
    ``replace_weight``, which rounds to 4 bits again). Only OLoRA runs on it, as in PEFT: PiSSA and
    LoftQ need the float weight (initialise them on the float model; LoftQ rounds it to NF4 values
    itself).
    """
    parsed = parse_init(init)
    name = where or "this layer"
    if parsed is None:
        raise ValueError(f"init_lora_weights={init!r} is not one of {INIT_FROM_BASE}")
    kind, niter = parsed
    out_f, in_f = base_layer.out_features, base_layer.in_features
    if r > min(out_f, in_f):
        raise ValueError(f"{init} on {name}: r={r} is larger than min(out, in) = {min(out_f, in_f)}; "
                         "use a smaller r (rank_pattern) or leave this module out")
    if quantized and kind != "olora":
        raise ValueError(f"{init} on {name} needs the float base weight, which a 4-bit base has lost; "
                         "initialise on the float model (get_peft_model without quantize=)")
    if kind == "loftq":
        cfg = check_loftq_config(loftq_config)
    W = base_layer.dequantized_weight() if quantized else base_layer.weight.data    # (out, in)
    if kind == "pissa":
        A, B, new_base = pissa(W, r, scaling, niter)
    elif kind == "olora":
        A, B, new_base = olora(W, r, scaling)
    else:
        A, B, new_base = loftq(W, r, scaling, cfg["loftq_iter"])
    if quantized:
        base_layer.replace_weight(new_base)
    else:
        base_layer.weight.data = new_base.astype(W.dtype)
    return A, B


# ------------------------------------------------------------------ back to plain LoRA
def to_plain_lora(config, state: dict, initial_state: dict, where: str = "the initial adapter"):
    """(config, {file key: array}) of the plain LoRA on the ORIGINAL W0 equal to a trained
    PiSSA/OLoRA adapter on its residual base (PEFT's ``subtract_mutated_init``).

    With the residual W_res = W0 − s·B0·A0 (``initial_state``: the adapter saved right after init)
    and the trained adapter B, A (``state``): W_res + s·B·A = W0 + s·(B·A − B0·A0) = W0 + s·B'·A' with
    A' = [A; A0] (2r, in) and B' = [B, −B0] (out, 2r). The config doubles r (and every rank_pattern
    value) and lora_alpha (α·√2 with rsLoRA) so that s stays the same, and says init_lora_weights=True:
    the file loads as a plain LoRA, with no change to the base. Keys other than lora_A / lora_B
    (modules_to_save, biases) are kept as they are.
    """
    if config.init_lora_weights == "loftq":
        raise ValueError("a LoftQ adapter cannot be converted to plain LoRA: its base is NF4-rounded, "
                         "not W0 − ΔW; share it with its quantized base instead")
    if getattr(config, "use_dora", False):
        raise ValueError("a DoRA adapter cannot be converted to plain LoRA: its magnitude was measured "
                         "on the residual base; save it without path_initial_model_for_weight_conversion")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("converting to plain LoRA cannot keep the scaling with use_rslora and "
                         "rank_pattern/alpha_pattern together (as in PEFT); train without one of them")
    out = dict(state)
    for key, value in state.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue
        init_value = initial_state.get(key)
        if init_value is None:
            raise ValueError(f"{where} has no {key!r}; pass the folder saved right after this "
                             "adapter's initialisation")
        if tuple(init_value.shape) != tuple(value.shape):
            raise ValueError(f"{where}: {key} has shape {tuple(init_value.shape)} but the trained "
                             f"adapter's is {tuple(value.shape)}; it belongs to another adapter")
        xp = backend.get_xp(value)
        init_value = xp.asarray(backend.to_device(init_value, backend.device_of(value)),
                                dtype=value.dtype)
        if key.endswith(".lora_A.weight"):
            out[key] = xp.concatenate([value, init_value], axis=0)      # (r, in) + (r, in) -> (2r, in)
        else:
            out[key] = xp.concatenate([value, -init_value], axis=1)     # (out, r) + (out, r) -> (out, 2r)
    alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    new_config = dataclasses.replace(
        config, r=2 * config.r, lora_alpha=alpha, init_lora_weights=True, loftq_config={},
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})
    return new_config, out
