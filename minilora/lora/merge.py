"""The LoRA formula, written once: scaling, the delta weight, merge and unmerge, and a step-by-step trace.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a pretrained
weight W0 and learns a low-rank update ΔW = B·A, scaled by α/r:

    h = W0·x + (α/r)·B·(A·x)            (what a LoRA layer computes, "unmerged")
    W = W0 + (α/r)·B·A                  (the same map folded into one matrix, "merged")

Shapes follow PyTorch, Hugging Face and PEFT: a Linear weight is
(out_features, in_features), ``lora_A`` is (r, in_features) and ``lora_B`` is (out_features, r), so
B @ A is (out, in) like W0. The LoRA paper writes W0 ∈ R^{d×k}, B ∈ R^{d×r}, A ∈ R^{r×k}: the same
thing with d = out and k = in. rsLoRA (Kalajdzievski, 2023) replaces α/r by α/√r.

Everything here works on plain arrays (NumPy or CuPy, whichever the inputs live in), with no autograd:
the LoRA layer, the merge of a whole model, the notebooks and the article check all call these
functions, so the formula exists in exactly one place. ``scaling`` is computed once per adapter
(``LoraLinear.update_layer`` keeps it in ``scaling[name]``); the ``*_scaled`` forms take that number
as it is, so the layer's forward, its fused twin (``lora/fused.py``) and its merge all use one scale. Low-precision inputs (float16, bfloat16) are
upcast to float32 for the delta, as PEFT does, and a float16 weight gets the delta added in float32
and is rounded once.

DoRA's merge, W' = (m / ‖W0 + ΔW‖)·(W0 + ΔW) row by row, builds on ``merge_weight_scaled`` here and
lives with the rest of DoRA in ``lora/dora.py`` (``merged_weight``, ``unmerged_weight``, ``dora_trace``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from minilora.backend import get_xp, to_numpy

CONVENTION = "minilora uses PEFT's convention A: (r, in), B: (out, r)"


# ---------------------------------------------------------------- the scale factor
def scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor that multiplies B·A: α/r, or α/√r with rsLoRA.

    α/r keeps the size of the update roughly independent of r when α is held fixed; rsLoRA's α/√r is
    the choice that keeps it stable as r grows large (Kalajdzievski, 2023).
    """
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float, np.integer, np.floating)) \
            or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)


# ---------------------------------------------------------------- shapes and dtypes
def _where(name: str | None) -> str:
    return f" in {name}" if name else ""


def check_lora_shapes(A_shape, B_shape, W_shape=None, r: int | None = None,
                      name: str | None = None) -> tuple[int, int, int]:
    """Check lora_A (r, in), lora_B (out, r) and optionally W0 (out, in); return (out, r, in).

    Works on shapes alone, so the article check can ask what a product of 8192×16 matrices would be
    without allocating it.
    """
    A_shape, B_shape = tuple(int(n) for n in A_shape), tuple(int(n) for n in B_shape)
    if len(A_shape) != 2:
        raise ValueError(f"lora_A{_where(name)} must be 2-D (r, in_features), got shape {A_shape}; "
                         f"{CONVENTION}")
    if len(B_shape) != 2:
        raise ValueError(f"lora_B{_where(name)} must be 2-D (out_features, r), got shape {B_shape}; "
                         f"{CONVENTION}")
    if W_shape is not None:
        W_shape = tuple(int(n) for n in W_shape)
        if len(W_shape) != 2:
            raise ValueError(f"the base weight{_where(name)} must be 2-D (out_features, in_features), "
                             f"got shape {W_shape}")
    rank = r if r is not None else A_shape[0]
    out = W_shape[0] if W_shape is not None else B_shape[0]
    inn = W_shape[1] if W_shape is not None else A_shape[1]
    if A_shape != (rank, inn):
        raise ValueError(f"lora_A{_where(name)} has shape (r, in)={A_shape}, expected {(rank, inn)}; "
                         f"{CONVENTION}")
    if B_shape != (out, rank):
        raise ValueError(f"lora_B{_where(name)} has shape (out, r)={B_shape}, expected {(out, rank)}; "
                         f"{CONVENTION}")
    return out, rank, inn


def lora_factor_shapes(out_features: int, in_features: int, r: int) -> tuple[tuple, tuple]:
    """The shapes LoRA gives a Linear (out, in): lora_A (r, in) and lora_B (out, r)."""
    scaling(1, r)  # validates r
    return (r, int(in_features)), (int(out_features), r)


def delta_shape(A_shape, B_shape) -> tuple[int, int]:
    """The shape of B @ A, (out, in), after checking that the two factors share one r."""
    out, _, inn = check_lora_shapes(A_shape, B_shape)
    return out, inn


def _as_float_array(a, what: str, xp):
    a = xp.asarray(a)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        if a.dtype.kind in "iub":  # integer literals typed in a notebook: treat as float64 numbers
            return a.astype(np.float64)
        raise ValueError(f"{what} must hold floating-point numbers, got dtype {a.dtype}")
    return a


def compute_dtype(*arrays) -> np.dtype:
    """float32, or float64 when any input is float64: never narrower than float32, because float16
    and bfloat16 lose the small products that B·A is made of."""
    wide = any(np.dtype(a.dtype).itemsize >= 8 and np.dtype(a.dtype).kind == "f" for a in arrays)
    return np.dtype(np.float64 if wide else np.float32)


# ---------------------------------------------------------------- the delta weight
def _product(A, B, name=None):
    """B @ A in the compute dtype, unscaled: (out, r) @ (r, in) -> (out, in)."""
    xp = get_xp(A, B)
    A = _as_float_array(A, "lora_A", xp)
    B = _as_float_array(B, "lora_B", xp)
    check_lora_shapes(A.shape, B.shape, name=name)
    ct = compute_dtype(A, B)
    return B.astype(ct, copy=False) @ A.astype(ct, copy=False)  # (out, r) @ (r, in) -> (out, in)


def delta_weight_scaled(A, B, scale: float, name: str | None = None):
    """ΔW = (B @ A) · scale, shape (out, in), in float32 (float64 if an input is float64).

    THE function merge and unmerge both call, and the LoRA layer too, so the formula lives here only.
    ``scale`` is the adapter's ``scaling`` (see ``scaling``), passed as it is.
    """
    ba = _product(A, B, name)     # a new array: scale it in place
    ba *= ba.dtype.type(scale)    # in the compute dtype (a Python float would not widen it)
    return ba


def delta_weight(A, B, lora_alpha: float, r: int, use_rslora: bool = False, name: str | None = None):
    """ΔW = (B @ A) · scaling(α, r), shape (out, in): ``delta_weight_scaled`` with the scale
    computed from α and r (after checking that A and B have rank r)."""
    s = scaling(lora_alpha, r, use_rslora)
    xp = get_xp(A, B)
    check_lora_shapes(xp.asarray(A).shape, xp.asarray(B).shape, r=r, name=name)
    return delta_weight_scaled(A, B, s, name)


def _check_weight(W, what, xp):
    W = _as_float_array(W, what, xp)
    if W.ndim != 2:
        raise ValueError(f"{what} must be 2-D (out_features, in_features), got shape {W.shape}")
    return W


def _apply_delta(W, A, B, scale, sign, safe_merge, name, what, r=None):
    xp = get_xp(W, A, B)
    W = _check_weight(W, what, xp)
    A, B = xp.asarray(A), xp.asarray(B)
    check_lora_shapes(A.shape, B.shape, W.shape, r=r, name=name)
    delta = delta_weight_scaled(A, B, scale, name)  # (out, in)
    ct = np.promote_types(compute_dtype(W), delta.dtype)
    # add in the wide dtype, round to W's dtype once (float16 weights would lose the delta otherwise)
    wide = W.astype(ct, copy=False)
    out = (wide + delta if sign > 0 else wide - delta).astype(W.dtype, copy=False)
    if safe_merge:
        bad = int((~xp.isfinite(out)).sum())
        if bad:
            raise ValueError(f"safe_merge refused{_where(name)}: the merged weight has {bad} NaN/Inf "
                             f"entries; check lora_A/lora_B for NaN/Inf or use a wider weight dtype")
    return out


def merge_weight(W0, A, B, lora_alpha: float, r: int, use_rslora: bool = False,
                 safe_merge: bool = False, name: str | None = None):
    """W = W0 + ΔW as a new array of W0's dtype (W0 itself is not modified).

    ``safe_merge=True`` checks the result and raises ValueError when it has NaN/Inf (PEFT's
    safe_merge); ``name`` (e.g. "model.layers.0.self_attn.q_proj") goes into error messages.
    """
    return _apply_delta(W0, A, B, scaling(lora_alpha, r, use_rslora), +1, safe_merge, name, "W0",
                        r=r)


def unmerge_weight(W, A, B, lora_alpha: float, r: int, use_rslora: bool = False,
                   name: str | None = None):
    """W0 = W − ΔW: the inverse of ``merge_weight`` (exact up to rounding in W's dtype)."""
    return _apply_delta(W, A, B, scaling(lora_alpha, r, use_rslora), -1, False, name, "W", r=r)


def merge_weight_scaled(W0, A, B, scale: float, safe_merge: bool = False, name: str | None = None):
    """W = W0 + scale·B·A as a new array of W0's dtype: ``merge_weight`` with the adapter's scaling
    given as a number (what ``LoraLinear`` keeps in ``scaling[name]``)."""
    return _apply_delta(W0, A, B, scale, +1, safe_merge, name, "W0")


def unmerge_weight_scaled(W, A, B, scale: float, name: str | None = None):
    """W0 = W − scale·B·A: the inverse of ``merge_weight_scaled``."""
    return _apply_delta(W, A, B, scale, -1, False, name, "W")


# ---------------------------------------------------------------- the trace, for notebooks
@dataclass(frozen=True)
class TraceStep:
    """One intermediate of the LoRA computation: a label, the array, its shape, what it is."""
    name: str
    value: object          # an xp array, or a float for the scaling
    shape: tuple
    explanation: str


class MergeTrace(dict):
    """An ordered ``{key: TraceStep}``; ``print(trace)`` shows every step with its shape."""

    def __str__(self) -> str:
        return format_trace(self)

    def values_of(self) -> dict:
        """``{key: array}`` without the labels."""
        return {k: s.value for k, s in self.items()}


def _apply(W, x):
    """W·x for a column vector x (in,), or a batch of row vectors (..., in) as PyTorch writes it."""
    return x @ W.T  # (..., in) @ (in, out) -> (..., out)


def merge_trace(W0, A, B, lora_alpha: float, r: int, x=None, use_rslora: bool = False) -> MergeTrace:
    """Every intermediate of merging (and, given x, of the forward pass), one step at a time.

    Keys, in order: "BA", "scaling", "delta_W", "W0", "W_merged", and with x: "W0x", "Ax", "BAx",
    "scaled", "h_unmerged", "h_merged", "max_diff". The merged weight comes from ``merge_weight`` and
    ΔW from ``delta_weight``, so the trace shows what the library really computes.
    """
    xp = get_xp(W0, A, B, *(() if x is None else (x,)))
    W0 = _check_weight(W0, "W0", xp)
    A = _as_float_array(A, "lora_A", xp)
    B = _as_float_array(B, "lora_B", xp)
    out, rank, inn = check_lora_shapes(A.shape, B.shape, W0.shape, r=r)
    s = scaling(lora_alpha, r, use_rslora)
    rule = f"α/√r = {lora_alpha}/√{r}" if use_rslora else f"α/r = {lora_alpha}/{r}"
    ba = _product(A, B)                                            # (out, in)
    dw = delta_weight(A, B, lora_alpha, r, use_rslora)             # (out, in)
    W = merge_weight(W0, A, B, lora_alpha, r, use_rslora)          # (out, in)
    steps = [
        ("BA", "B·A", ba, f"lora_B (out, r)=({out}, {rank}) times lora_A (r, in)=({rank}, {inn}): "
                          f"a rank-{rank} (out, in) matrix"),
        ("scaling", "scaling", s, f"{rule}: how strongly the adapter speaks"),
        ("delta_W", "ΔW = B·A·scaling", dw, "the update LoRA adds to W0 (same shape as W0)"),
        ("W0", "W0", W0, "the frozen pretrained weight (out, in)"),
        ("W_merged", "W = W0 + ΔW", W, "the merged weight: one matrix, no adapter at inference"),
    ]
    if x is not None:
        x = _as_float_array(x, "x", xp)
        if x.ndim == 0 or x.shape[-1] != inn:
            raise ValueError(f"x has shape {x.shape}; its last axis must be in_features={inn}")
        ct = np.promote_types(compute_dtype(W0), dw.dtype)
        xc, W0c = x.astype(ct, copy=False), W0.astype(ct, copy=False)
        h0 = _apply(W0c, xc)                                       # (..., out)
        ax = _apply(A.astype(ct, copy=False), xc)                  # (..., r): x squeezed to r numbers
        bax = _apply(B.astype(ct, copy=False), ax)                 # (..., out)
        scaled = bax * ct.type(s)
        h_unmerged = h0 + scaled
        h_merged = _apply(W.astype(ct, copy=False), xc)            # (..., out)
        diff = float(xp.abs(h_merged - h_unmerged).max())
        steps += [
            ("W0x", "W0·x", h0, "the frozen layer's output h_base"),
            ("Ax", "A·x", ax, f"the input projected down to r={rank} numbers"),
            ("BAx", "B·(A·x)", bax, "projected back up to out features (this order never forms the (out, in) B·A)"),
            ("scaled", "B·(A·x)·scaling", scaled, "the adapter's contribution to h"),
            ("h_unmerged", "h = W0·x + B·(A·x)·scaling", h_unmerged, "the LoRA layer's output, unmerged"),
            ("h_merged", "h = (W0 + ΔW)·x", h_merged, "the same output from the merged weight"),
            ("max_diff", "max |h merged − h unmerged|", diff,
             "only rounding: merging does not change what the layer computes"),
        ]
    return MergeTrace((k, TraceStep(label, v, tuple(getattr(v, "shape", ())), why))
                      for k, label, v, why in steps)


def format_trace(trace: MergeTrace, decimals: int = 4) -> str:
    """A readable listing of a ``merge_trace``: step, shape, explanation, then the rounded numbers."""
    lines = []
    for i, (key, step) in enumerate(trace.items(), 1):
        shape = "scalar" if step.shape == () else "×".join(str(n) for n in step.shape)
        lines.append(f"[{i}] {step.name}   ({shape})   {step.explanation}")
        if np.ndim(to_numpy(step.value)) == 0:
            v = float(to_numpy(step.value))
            lines.append(f"    {v:.{decimals}g}" if key == "max_diff" else f"    {round(v, decimals)}")
        else:
            text = np.array2string(to_numpy(step.value).astype(np.float64), precision=decimals,
                                   suppress_small=True, threshold=64, edgeitems=3, max_line_width=100)
            lines.extend("    " + ln for ln in text.splitlines())
    return "\n".join(lines)
