"""DoRA: a LoRA update split into a magnitude and a direction, W' = m · (W0 + s·B·A) / ‖W0 + s·B·A‖.

Liu et al. (2024), "DoRA: Weight-Decomposed Low-Rank Adaptation", equation (5). A weight is a
magnitude times a direction. DoRA keeps LoRA's low-rank update s·B·A (A: (r, in), B: (out, r),
s = ``scaling``) for the direction, and learns the magnitude separately: one number per output row,
the vector m of shape (out,) (``lora_magnitude_vector`` in PEFT's names and files):

    V  = W0 + s·B·A                 (out, in)   the LoRA-adapted weight, used as a direction
    ‖V‖ = sqrt(Σ_j V[:, j]²)        (out,)      its norm per output row: over in_features
    W' = (m / ‖V‖)[:, None] · V     (out, in)   each row rescaled to length m

The paper writes W0 ∈ R^{d×k} and takes the norm of each column ("‖·‖_c"); in PyTorch's
(out, in) layout a column of the paper's matrix is a row here, so the norm runs over axis 1, as in
PEFT's ``DoraLinearLayer.get_weight_norm`` (``torch.linalg.norm(weight, dim=1)``).

At the start m = ‖W0 + s·B·A‖ (and B = 0), so W' = W0 and a fresh adapter changes nothing.

The norm is DETACHED: it is a constant for backward, a plain array computed from the current A and
B (``weight_norm``), not a Tensor in the graph. The paper's section 4.3 does this to save memory:
the gradient through ‖V‖ would need the (out, in) matrix V kept for backward, and dropping it changes
the gradient only slightly; PEFT does the same. The gradient then reaches m, A and B through the two
terms below, but never through the norm.

The forward (``dora_forward``) never forms W'. Like PEFT's ``DoraLinearLayer.forward`` it writes
W'·x as the base output plus a correction, with f = m / ‖V‖ (out,):

    W'·x = f·(W0·x) + f·s·B·(A·x)  =  W0·x + (f − 1)·(W0·x) + f·s·B·(A·x)

so ``LoraLinear`` adds ``(f − 1)·base_without_bias(x) + f·s·B(A(x))`` to the base layer's output.
Merging folds f into the weight: ``merged_weight``; unmerging divides it out again with the norm
kept from the merge: ``unmerged_weight``. Both use ``magnitude_scale`` for f and ``lora.merge`` for
W0 + s·B·A, the formula's one home. ``dora_trace`` lists every intermediate for notebooks.

Everything except ``dora_forward`` works on plain arrays (NumPy or CuPy), with no autograd.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..backend import get_xp
from ..tensor import Tensor
from . import merge as merge_math


# ---------------------------------------------------------------- the magnitude and the direction
def weight_norm(W0, A, B, scale: float):
    """‖W0 + scale·B·A‖ per output row: an (out,) array (PEFT's ``get_weight_norm``, dim=1).

    W0 (out, in), A (r, in), B (out, r). The result is a plain array, not a Tensor: the norm is a
    constant for backward (the module docstring says why). It costs the (out, in) product B·A,
    out·in·r multiply-adds, every time it is called: PEFT pays the same every training step.
    """
    V = merge_math.merge_weight_scaled(W0, A, B, scale)        # (out, in): W0 + s·B·A
    xp = get_xp(V)
    wide = V.astype(merge_math.compute_dtype(V), copy=False)    # never square in float16
    return xp.sqrt((wide * wide).sum(axis=1))                   # (out, in) -> (out,): over in_features


def magnitude_scale(magnitude, norm):
    """f = m / ‖W0 + s·B·A‖, (out,): how much DoRA stretches each output row of the direction.

    The one factor that forward (as a Tensor, m trainable), merge and unmerge all use."""
    return magnitude / norm                                     # (out,) / (out,) -> (out,)


# ---------------------------------------------------------------- merging
def merged_weight(W, A, B, scale: float, magnitude, norm):
    """W' = f[:, None] · (W + scale·B·A), f = ``magnitude_scale(magnitude, norm)``: an (out, in)
    array of W's dtype, W itself untouched.

    ``norm`` is ``weight_norm`` of the *unmerged* base weight (PEFT computes it the same way even
    when other adapters are already merged into W), and must be kept for ``unmerged_weight``.
    """
    xp = get_xp(W, A, B)
    f = xp.asarray(magnitude_scale(xp.asarray(magnitude), xp.asarray(norm)))   # (out,)
    V = merge_math.merge_weight_scaled(W, A, B, scale)                          # (out, in)
    return (f.astype(V.dtype, copy=False)[:, None] * V).astype(W.dtype, copy=False)  # rows scaled


def unmerged_weight(W, A, B, scale: float, magnitude, norm):
    """The inverse of ``merged_weight``: W / f[:, None] − scale·B·A, with the ``norm`` the merge used
    (the weight it divides no longer holds the unmerged norm, so it cannot be recomputed)."""
    xp = get_xp(W, A, B)
    f = xp.asarray(magnitude_scale(xp.asarray(magnitude), xp.asarray(norm)))   # (out,)
    divided = (W / f.astype(W.dtype, copy=False)[:, None]).astype(W.dtype, copy=False)  # (out, in)
    return merge_math.unmerge_weight_scaled(divided, A, B, scale)


# ---------------------------------------------------------------- the forward term, with autograd
def dora_forward(x: Tensor, weight, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scale: float,
                 norm, base_result: Tensor | None = None) -> Tensor:
    """What DoRA adds to the base layer's output: (f − 1)·W0·x + f·s·B·(A·x), f = m / norm.

    x (..., in), weight W0 (out, in) as a Tensor (a frozen Parameter) or an array (a dequantized
    4-bit base: a constant), lora_A (r, in), lora_B (out, r), magnitude m (out,), ``norm`` the
    detached ``weight_norm`` (an array), result (..., out). ``base_result`` is W0·x without bias when
    the caller has it (PEFT passes the layer's output so far, bias removed); None computes W0·x from
    this x (PEFT does that when dropout changed x, so that both terms see the same input).
    """
    W0 = weight if isinstance(weight, Tensor) else Tensor(weight)    # (out, in)
    f = magnitude_scale(magnitude, Tensor(norm))                     # (out,): the norm is a constant
    lora_result = F.linear(F.linear(x, lora_A), lora_B)   # (..., in) -> (..., r) -> (..., out)
    if base_result is None:
        base_result = F.linear(x, W0)                     # (..., in) @ (in, out) -> (..., out)
    return (f - 1.0) * base_result + f * lora_result * scale          # (out,) broadcasts over rows


# ---------------------------------------------------------------- the trace, for notebooks
def dora_trace(W0, A, B, magnitude, lora_alpha: float, r: int, x=None,
               use_rslora: bool = False) -> merge_math.MergeTrace:
    """Every intermediate of DoRA's merge, magnitude and direction (and, given x, of its forward).

    Keys, in order: "scaling", "delta_W", "V", "norm", "magnitude", "scale_f", "direction",
    "W_merged", "W_unmerged", and with x: "W0x", "dora_term", "h_unmerged", "h_merged", "max_diff".
    The values come from the functions above (``weight_norm``, ``merged_weight``,
    ``unmerged_weight``), so the trace shows what the library computes; ``print`` lists it.
    """
    xp = get_xp(W0, A, B)
    out, rank, inn = merge_math.check_lora_shapes(xp.asarray(A).shape, xp.asarray(B).shape,
                                                  xp.asarray(W0).shape, r=r)
    m = xp.asarray(magnitude)
    if m.shape != (out,):
        raise ValueError(f"magnitude has shape {m.shape}; DoRA keeps one number per output row: "
                         f"expected ({out},)")
    s = merge_math.scaling(lora_alpha, r, use_rslora)
    dw = merge_math.delta_weight_scaled(A, B, s)                 # (out, in)
    V = merge_math.merge_weight_scaled(W0, A, B, s)              # (out, in)
    norm = weight_norm(W0, A, B, s)                              # (out,)
    f = magnitude_scale(m, norm)                                 # (out,)
    W = merged_weight(W0, A, B, s, m, norm)                      # (out, in)
    back = unmerged_weight(W, A, B, s, m, norm)                  # (out, in)
    steps = [
        ("scaling", "s = α/r" if not use_rslora else "s = α/√r", s, "how strongly B·A speaks"),
        ("delta_W", "ΔW = s·B·A", dw, f"LoRA's rank-{rank} update (out, in)=({out}, {inn})"),
        ("V", "V = W0 + ΔW", V, "the LoRA-adapted weight: DoRA uses it as a direction"),
        ("norm", "‖V‖ per row", norm, "the length of each output row (over in_features); "
                                      "detached: a constant for backward"),
        ("magnitude", "m", m, "the trained length of each output row (starts equal to ‖V‖)"),
        ("scale_f", "f = m / ‖V‖", f, "how much each row is stretched"),
        ("direction", "V / ‖V‖", V / norm[:, None], "unit-length rows: the direction alone"),
        ("W_merged", "W' = f·V", W, "the merged weight: each row of V rescaled to length m"),
        ("W_unmerged", "W'/f − ΔW", back, "unmerging with the kept norm gives W0 back"),
    ]
    if x is not None:
        x = xp.asarray(x, dtype=np.result_type(W.dtype, np.float32))
        if x.ndim == 0 or x.shape[-1] != inn:
            raise ValueError(f"x has shape {x.shape}; its last axis must be in_features={inn}")
        h0 = x @ xp.asarray(W0).T                                # (..., in) @ (in, out) -> (..., out)
        term = dora_forward(Tensor(x), W0, Tensor(A), Tensor(B), Tensor(m), s, norm).data  # (..., out)
        h_merged = x @ W.T                                       # (..., in) @ (in, out) -> (..., out)
        steps += [
            ("W0x", "W0·x", h0, "the frozen layer's output"),
            ("dora_term", "(f − 1)·W0·x + f·s·B·(A·x)", term, "what the DoRA layer adds to W0·x"),
            ("h_unmerged", "h = W0·x + DoRA term", h0 + term, "the DoRA layer's output, unmerged"),
            ("h_merged", "h = W'·x", h_merged, "the same output from the merged weight"),
            ("max_diff", "max |h merged − h unmerged|", float(xp.abs(h_merged - h0 - term).max()),
             "only rounding: merging does not change what the layer computes"),
        ]
    return merge_math.MergeTrace((k, merge_math.TraceStep(label, v, tuple(getattr(v, "shape", ())), why))
                                 for k, label, v, why in steps)


__all__ = ["weight_norm", "magnitude_scale", "merged_weight", "unmerged_weight", "dora_forward",
           "dora_trace"]
