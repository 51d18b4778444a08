"""The fast twin of the LoRA layer: h = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ as ONE autograd node.

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models", equation (3), computed with
a hand-written backward. It equals the module form of ``LoraLinear.forward`` (``lora/layer.py``, the
reference: ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``) up to float32 rounding;
tests/test_lora_layer.py checks forward and the gradients of x, A and B against it (with and
without dropout, with the merged weight kept and recomputed, on a float and a 4-bit base), in
float64 by central differences and in float32 against a rounding bound. ``LoraLinear`` calls it
outside ``minilora.reference()`` when one adapter is active on a plain or 4-bit Linear.

What it buys, and how:

* **activation memory**: the module form keeps three (N, out) arrays per layer alive until backward
  (B's output, the scaled copy and the sum); this op keeps its output and the (N, r) product
  u = dropout(x)·Aᵀ only (tests/test_lora_layer.py counts the bytes). Without it LoRA training used
  *more* activation memory than full fine-tuning of a small model.
* **the merged-weight trick**: unlike the reference, this op DOES form the (out, in) matrix B·A
  when that is cheaper. Without dropout and with N = batch·seq >= max(in, out) rows, as in any
  training batch, it computes h = x·(W0 + ΔW)ᵀ in one GEMM: forming ΔW = s·B·A costs out·in·r
  multiply-adds, less than the side path's extra (N, out) work. The backward needs W0 + ΔW again
  for dL/dx: it is kept from forward when out <= ``settings.KEEP_MERGED_WEIGHT``·N (then it is at
  most that fraction of the input x the layer keeps anyway) and formed again otherwise (for a 4-bit
  base, that means dequantizing again). Keeping it measured, docs/benchmarks.md, tiny config, one
  thread, 25 A/B pairs: LoRA step 74.7 -> 73.3 ms (-1.8%), QLoRA step 94.3 -> 89.0 ms (-5.6%).
* otherwise (dropout, or few rows) the side path, x·W0ᵀ + s·(x·Aᵀ)·Bᵀ: two thin GEMMs.

The scale s is the number the layer keeps in ``scaling[name]`` (``lora.merge.scaling`` computed it
once), passed in as it is: this op never recomputes it from r and α, so it cannot disagree with the
module form.
"""
from __future__ import annotations

from .. import backend, settings
from ..fast.parallel import blas_single_thread, matmul  # matmul: rows split across CPU threads
from ..ops import as_tensor
from ..tensor import Tensor, is_grad_enabled
from . import merge as merge_math


def _weight_array(weight):
    """W0 (out, in) as a float array: a Tensor's ``.data``, or a frozen 4-bit base's weight
    dequantized now by an explicit ``weight.dequantize()`` (``quant.TransientWeight``: the array
    lives in a shared buffer, so it is used at once and never kept)."""
    return weight.data if isinstance(weight, Tensor) else weight.dequantize()


def lora_linear(x: Tensor, weight, bias, lora_A: Tensor, lora_B: Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """h = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with s = ``scaling``, as one autograd node.

    Shapes: x (..., in) viewed as (N, in) with N the product of the leading axes, W0 (out, in),
    A (r, in), B (out, r), b (out,) or None, h (..., out). ``weight`` is a Tensor, or a frozen 4-bit
    weight handle with ``dequantize()`` (never given a gradient). Dropout draws its mask exactly as
    ``functional.dropout`` does (same generator, same order), so under the same seed both forms drop
    the same inputs.

    Backward, with g = dL/dh (N, out) and u = dropout(x)·Aᵀ (N, r):
      dL/dB = s·gᵀu            (out, r)     dL/dA = (s·g·B)ᵀ·dropout(x)   (r, in)
      dL/dx = g·W0 + mask ⊙ (s·g·B)·A   (side path)   or   g·(W0 + ΔW)   (merged weight)
      dL/dW0 = gᵀx, dL/db = Σ g: computed only when they require grad, i.e. never for a frozen base.
    """
    x = as_tensor(x, lora_A)                                   # an array x: A's dtype and device
    xpmod = backend.get_xp(x.data)
    X = x.data
    out_f, in_f = weight.shape
    X2 = X.reshape(-1, in_f)                                   # (..., in) -> (N, in)
    N = X2.shape[0]
    s = X2.dtype.type(scaling)
    keep = None
    Xd = X2
    if training and dropout_p > 0.0:
        keep = backend.random_uniform(X2.shape, xpmod, X2.dtype) >= dropout_p  # (N, in) bool
        Xd = X2 * (keep * X2.dtype.type(1.0 / (1.0 - dropout_p)))             # inverted dropout
    use_merged = keep is None and N >= max(in_f, out_f)
    keep_merged = use_merged and out_f <= settings.KEEP_MERGED_WEIGHT * N

    def merged_weight():                                       # W0 + s·B·A, (out, in)
        # a small product: one BLAS thread, so that no BLAS threads are left spinning next to
        # parallel.matmul's workers
        with blas_single_thread():
            return merge_math.merge_weight_scaled(_weight_array(weight), lora_A.data, lora_B.data,
                                                  scaling)

    u = w_kept = None
    if use_merged:
        w_merged = merged_weight()                             # (out, in)
        h = matmul(X2, w_merged.T)                             # (N, in) @ (in, out) -> (N, out)
        w_kept = w_merged if keep_merged else None
        if lora_B.requires_grad and is_grad_enabled():
            u = matmul(X2, lora_A.data.T)                      # (N, in) @ (in, r): kept for dL/dB
    else:
        u = matmul(Xd, lora_A.data.T)                          # (N, in) @ (in, r) -> (N, r)
        h = matmul(X2, _weight_array(weight).T)                # (N, in) @ (in, out) -> (N, out)
        h += matmul(u * s, lora_B.data.T)                      # (N, r) @ (r, out): the low-rank path
    if bias is not None:
        h += bias.data
    # a 4-bit weight handle is not a Tensor and never needs a gradient: it stays out of the graph
    parents = (x, lora_A, lora_B) + ((weight,) if isinstance(weight, Tensor) else ()) \
        + ((bias,) if bias is not None else ())
    out = Tensor._result(h.reshape(*X.shape[:-1], out_f), parents, "lora_linear")  # (..., out)

    def _backward():
        g = out.grad.reshape(-1, out_f)                        # (N, out)
        gu = matmul(g, lora_B.data) * s                        # (N, out) @ (out, r) -> (N, r)
        if lora_B.requires_grad:
            lora_B._accum(matmul(g.T, u) * s, fresh=True)      # (out, N) @ (N, r) -> (out, r)
        if lora_A.requires_grad:
            lora_A._accum(matmul(gu.T, Xd), fresh=True)        # (r, N) @ (N, in) -> (r, in)
        if x.requires_grad:
            if use_merged:   # (N, out) @ (out, in) -> (N, in)
                gx = matmul(g, w_kept if w_kept is not None else merged_weight())
            else:
                gx = matmul(gu, lora_A.data)                   # (N, r) @ (r, in) -> (N, in)
                if keep is not None:
                    gx *= keep * X2.dtype.type(1.0 / (1.0 - dropout_p))
                gx += matmul(g, _weight_array(weight))         # (N, out) @ (out, in) -> (N, in)
            x._accum(gx.reshape(X.shape), fresh=True)
        if isinstance(weight, Tensor) and weight.requires_grad:  # skipped for a frozen W0
            weight._accum(matmul(g.T, X2), fresh=True)         # (out, N) @ (N, in) -> (out, in)
        if bias is not None and bias.requires_grad:
            bias._accum(g.sum(axis=0), fresh=True)
    out._set_backward(_backward)
    return out


__all__ = ["lora_linear"]
