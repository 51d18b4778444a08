"""QLoRA's frozen 4-bit Linear: weights stored in NF4, dequantized on the fly for every product.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3) keeps every
frozen base weight in 4-bit NormalFloat and computes in a wider type:

    Y = X · dequant(W_nf4)ᵀ  (+ b)                    the base path of every adapted layer
    dL/dX = dL/dY · dequant(W_nf4)                     the only gradient the base path needs

The weight is never trained, so there is no dL/dW, no gradient array and no optimizer state for it:
a 4-bit matrix costs 4.127 bits per parameter (blocksize 64, double quantization) and nothing else.
What is trained (LoRA's A and B) stays in float32 beside it (``lora/layer.py``).

``NF4Linear`` is that layer; ``quantize_model`` swaps every ``nn.Linear`` of a model for one (except
``lm_head``, which bitsandbytes and transformers keep in full precision: it is small next to the
decoder stack, reads the last hidden state directly, and its quantization error goes straight into
the logits). ``quantization_summary`` measures what the swap saved from the arrays actually stored.

Where the dequantized weight lives (the memory trade-off). The float32 copy of W is 8x the size of
its NF4 storage, so keeping one per layer would give QLoRA's saving straight back. Here every
``NF4Linear`` dequantizes into a *scratch buffer shared by all layers of the same shape and device*
(``workspace``): forward fills it and runs one GEMM, backward fills it again and runs the dX GEMM.
At any moment only one float32 matrix per distinct shape exists (a Llama has three or four shapes,
whatever its depth), at the price of dequantizing each weight twice per training step. Dequantizing
is one pass over the packed bytes, cheap next to the GEMMs it feeds (bitsandbytes makes the same
choice: it dequantizes in forward and again in backward). ``release_workspace()`` frees the buffers
(e.g. after training). Inference runs the same way. Each thread has its own set of buffers, so
threads that run forward passes at once (``data_parallel``'s micro-batches) never overwrite a weight
another is still using; that is one float32 matrix per shape *per thread*. (On CUDA, kernels and
GEMMs queue on one stream, so reuse is ordered.)

State and files. The quantized arrays are not Parameters (they are uint8 codes and constants that no
optimizer may touch), so ``named_parameters()`` and ``state_dict()`` do not list them: a quantized
model's ``state_dict`` holds only its float tensors (norms, embeddings, lm_head, LoRA factors).
``quantized_state_dict(model)`` gives every tensor including the NF4 ones, in the form
``quant.report.save_quantized`` writes and ``load_quantized`` reads (``save_quantized_model`` /
``load_quantized_model`` wrap the pair). ``NF4Linear.weight`` returns the dequantized weight as a
frozen Tensor for code that reads weights (merging, export), and ``to_linear()`` a float ``Linear``.

The interface LoRA relies on (kept small on purpose; ``lora/`` knows nothing else of quant/):
``lora_targetable = True``, ``in_features``, ``out_features``, ``bias``, ``weight`` (read-only), and

* ``dequantized_weight()`` -> a float32 array (out, in), a copy (merging reads W0 through it);
* ``replace_weight(W)`` -> re-quantize W in place, return the error that rounding added (merging
  into the 4-bit base, as PEFT does on bitsandbytes layers);
* ``to_linear()`` -> a float ``Linear`` with the dequantized weight (``merge_and_unload`` default);
* ``transient_weight()`` -> a frozen handle whose ``dequantize()`` call gives W in the shared
  buffer (LoRA's fused op calls it once in forward and once in backward);
* ``quantized_numel`` -> parameters stored in 4 bits (PEFT counts them in "all params").
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .. import backend, settings
from ..fast import parallel
from ..nn import Linear, Module, Parameter
from ..ops import as_tensor
from ..tensor import Tensor
from .nf4 import QuantizedTensor4bit, quantization_error, quantize_blockwise_4bit
from .codebooks import get_code

__all__ = ["NF4Linear", "TransientWeight", "nf4_linear", "quantize_model", "dequantize_model",
           "quantized_modules", "requantization_errors", "quantization_summary",
           "format_quantization_summary", "quantized_state_dict",
           "save_quantized_model", "load_quantized_model", "workspace_bytes", "release_workspace",
           "DEFAULT_SKIP_MODULES"]

# bitsandbytes / transformers keep the output head in full precision (llm_int8_skip_modules).
DEFAULT_SKIP_MODULES = ("lm_head",)
# Parts of a LoRA-wrapped model that are trained, never quantized (if quantize_model runs after
# injection, only the frozen base layers are touched).
_TRAINED_PARTS = ("lora_A", "lora_B", "modules_to_save")


# ================================================================ the shared dequantization buffers
# (thread, shape, device) -> float32 array, reused by every layer of that shape. One set per thread:
# data_parallel runs micro-batches in two threads at once, and a buffer that one thread is reading in
# a GEMM must not be overwritten by the other's next layer.
_workspace: dict = {}


def _scratch(shape: tuple, like):
    """This thread's float32 buffer of ``shape`` on ``like``'s device (allocated on first use)."""
    key = (threading.get_ident(), shape, backend.device_of(like))
    buf = _workspace.get(key)
    if buf is None:
        buf = _workspace[key] = backend.get_xp(like).empty(shape, dtype=np.float32)
    return buf


def workspace_bytes() -> int:
    """Bytes held by the dequantization buffers now (one float32 matrix per shape and thread)."""
    return int(sum(b.nbytes for b in _workspace.values()))


def release_workspace() -> None:
    """Free the shared buffers; the next forward pass allocates them again."""
    _workspace.clear()


def _dequantized(qweight: QuantizedTensor4bit, dtype):
    """W (out, in) in the shared buffer, as ``dtype`` (a float64 input gets a float64 copy).

    Valid only until the next layer of the same shape dequantizes: use it at once, never keep it.
    """
    w = qweight.dequantize(out=_scratch(qweight.shape, qweight.packed))
    return w if w.dtype == dtype else w.astype(dtype)


class TransientWeight:
    """A frozen 4-bit weight handed to a fused op (LoRA's ``lora.fused.lora_linear``), which asks
    for the float W with an explicit ``dequantize()`` exactly when a GEMM needs it (once in forward,
    once in backward): W never outlives one GEMM. It has no ``.data`` on purpose, so no code reads
    a weight-sized array by accident, and it never requires grad, so autograd never visits it.
    """

    requires_grad = False

    def __init__(self, qweight: QuantizedTensor4bit):
        self.qweight = qweight

    def dequantize(self):
        """W (out, in) float32 in this thread's shared buffer: use it at once (the next layer of the
        same shape overwrites it) and never keep it."""
        return _dequantized(self.qweight, np.float32)

    @property
    def shape(self) -> tuple:
        return self.qweight.shape

    @property
    def dtype(self):
        return np.dtype(np.float32)


# ================================================================ the op
def nf4_linear(x, qweight: QuantizedTensor4bit, bias=None) -> Tensor:
    """y = x · dequant(W)ᵀ (+ b) as one autograd node whose backward computes only dL/dx (and dL/db
    when a bias is trained). W is dequantized into the shared buffer in forward and again in backward,
    so no float copy of W outlives either GEMM (see the module docstring).

    Shapes: x (..., in), W (out, in), b (out,), y (..., out).
    """
    x = as_tensor(x)
    xd = x.data
    n_out, n_in = qweight.shape
    if xd.shape[-1] != n_in:
        raise ValueError(f"NF4Linear: input has {xd.shape[-1]} features but the weight expects {n_in} "
                         f"(weight shape {qweight.shape})")
    if backend.device_of(xd) != qweight.device:
        raise ValueError(f"NF4Linear: input is on {backend.device_of(xd)} but the 4-bit weight is on "
                         f"{qweight.device}; quantize the model after moving it (or layer.to(device))")
    if xd.dtype.kind != "f":
        raise ValueError(f"NF4Linear needs floating-point input, got {xd.dtype}")
    x2 = xd.reshape(-1, n_in)                                        # (N, in)
    w = _dequantized(qweight, xd.dtype)                              # (out, in), transient
    matmul = (lambda a, b: a @ b) if settings.reference_mode() else parallel.matmul  # threads: fast path only
    y = matmul(x2, w.T)                                     # (N, in) @ (in, out) -> (N, out)
    if bias is not None:
        y += bias.data
    parents = (x,) if bias is None else (x, bias)
    out = Tensor._result(y.reshape(*xd.shape[:-1], n_out), parents, "nf4_linear")  # (..., out)

    def _backward():
        g2 = out.grad.reshape(-1, n_out)                             # (N, out)
        if x.requires_grad:
            w_again = _dequantized(qweight, g2.dtype)                # the buffer may hold another W now
            gx = matmul(g2, w_again)                        # (N, out) @ (out, in) -> (N, in)
            x._accum(gx.reshape(xd.shape), fresh=True)
        if bias is not None and bias.requires_grad:
            bias._accum(g2.sum(axis=0), fresh=True)                  # (out,)
        # no dL/dW: the 4-bit weight is frozen by construction
    out._set_backward(_backward)
    return out


# ================================================================ the layer
class NF4Linear(Module):
    """A frozen Linear whose weight is stored as a 4-bit ``NF4Tensor`` (``qweight``).

    ``forward(x)`` = ``x · dequant(W)ᵀ + b``; gradients flow to x only. The bias, if any, is a float32
    Parameter created frozen (LoRA's ``bias="all"`` may unfreeze it, as PEFT does on 4-bit layers).
    Build one with ``NF4Linear.from_linear(linear)`` or ``quantize_model(model)``.
    """

    lora_targetable = True     # LoRA may wrap it (lora.layer.is_linear_like)

    def __init__(self, qweight: QuantizedTensor4bit, bias=None):
        super().__init__()
        if not isinstance(qweight, QuantizedTensor4bit) or len(qweight.shape) != 2:
            raise ValueError("NF4Linear needs a 2-D QuantizedTensor4bit weight (out, in) from "
                             "quantize_nf4; got " + (f"shape {qweight.shape}" if isinstance(
                                 qweight, QuantizedTensor4bit) else type(qweight).__name__))
        self.qweight = qweight                       # a plain attribute: not a Parameter
        self.out_features, self.in_features = qweight.shape
        self.requantization_error: dict | None = None   # set by replace_weight
        if bias is not None:
            b = bias.data if isinstance(bias, Tensor) else bias
            if tuple(b.shape) != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(b.shape)}, expected ({self.out_features},)")
            b = backend.to_device(backend.to_numpy(b).astype(np.float32), qweight.device)
            self.bias = Parameter(b, requires_grad=False)
        else:
            self.bias = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weight(cls, weight, bias=None, blocksize: int = 64, double_quant: bool = False,
                    quant_type: str = "nf4") -> "NF4Linear":
        """Quantize a float (out, in) array or Tensor (kept on its device) into a new layer."""
        w = weight.data if isinstance(weight, Tensor) else weight
        if getattr(w, "ndim", 0) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight (out, in), got shape {np.shape(w)}")
        q = quantize_blockwise_4bit(w, get_code(quant_type), blocksize, double_quant,
                                    quant_type=quant_type)
        return cls(q, bias)

    @classmethod
    def from_linear(cls, linear: Linear, blocksize: int = 64, double_quant: bool = False,
                    quant_type: str = "nf4") -> "NF4Linear":
        """The 4-bit version of ``linear`` (its weight quantized where it lives; bias kept float32)."""
        if not isinstance(linear, Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight.data, linear.bias, blocksize, double_quant, quant_type)

    # ------------------------------------------------------------------ compute
    def forward(self, x):
        return nf4_linear(x, self.qweight, self.bias)

    # ------------------------------------------------------------------ the interface LoRA uses
    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in) as a new frozen float32 Tensor (for reading, not training)."""
        return Tensor(self.dequantized_weight())

    def dequantized_weight(self):
        """A new float32 array (out, in): code[index] · absmax[block] (a copy, safe to keep)."""
        return self.qweight.dequantize()

    def replace_weight(self, weight) -> dict:
        """Re-quantize ``weight`` (float, (out, in)) with this layer's settings and store it.

        Used to merge a LoRA update into a 4-bit base: the merged float weight is rounded to NF4
        again, which adds a quantization error of its own. Returns (and keeps in
        ``requantization_error``) that error, ``quantization_error(weight, dequant(new))``.
        """
        w = weight.data if isinstance(weight, Tensor) else weight
        if tuple(w.shape) != tuple(self.qweight.shape):
            raise ValueError(f"replace_weight: got shape {tuple(w.shape)}, this layer stores "
                             f"{self.qweight.shape}")
        q = self.qweight
        w = backend.to_device(w, q.device)
        new = quantize_blockwise_4bit(w, q.code, q.blocksize, q.double_quant, quant_type=q.quant_type)
        self.qweight = new
        self.requantization_error = quantization_error(w, new.dequantize())
        return self.requantization_error

    def transient_weight(self) -> TransientWeight:
        """W for a fused op: a handle whose ``dequantize()`` fills the shared buffer (no lasting copy)."""
        return TransientWeight(self.qweight)

    @property
    def quantized_numel(self) -> int:
        """How many parameters this layer stores in 4 bits (out · in)."""
        return self.qweight.size

    # ------------------------------------------------------------------ storage and export
    @property
    def nbytes(self) -> int:
        """Bytes this layer stores: the 4-bit weight with its constants, plus the bias."""
        return self.qweight.nbytes + (int(self.bias.data.nbytes) if self.bias is not None else 0)

    def quantized_state(self) -> dict:
        """{"weight": the QuantizedTensor4bit, "bias": float32 array (if any)}: what files store."""
        state = {"weight": self.qweight}
        if self.bias is not None:
            state["bias"] = self.bias.data
        return state

    def to_linear(self) -> Linear:
        """A plain float32 ``Linear`` holding the dequantized weight (and the bias), frozen."""
        lin = Linear.__new__(Linear)
        Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight = Parameter(self.dequantized_weight(), requires_grad=False)
        lin.bias = Parameter(self.bias.data.copy(), requires_grad=False) \
            if self.bias is not None else None
        return lin

    def to(self, device: str) -> "NF4Linear":
        """Move the 4-bit arrays and the bias to ``device`` ("cpu" or "cuda"), in place."""
        self.qweight = self.qweight.to(device)
        return super().to(device)

    def extra_repr(self) -> str:
        q = self.qweight
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {q.quant_type}, blocksize={q.blocksize}"
                f"{', double_quant' if q.double_quant else ''}, {q.bits_per_parameter:.4f} bits/param")


# ================================================================ whole models
def _skipped(name: str, skip_modules) -> bool:
    parts = name.split(".")
    return (any(name == s or name.endswith("." + s) or s in parts for s in skip_modules)
            or any(p in _TRAINED_PARTS for p in parts))


def quantize_model(model: Module, blocksize: int = 64, double_quant: bool = True,
                   skip_modules=DEFAULT_SKIP_MODULES, quant_type: str = "nf4") -> Module:
    """Replace every ``nn.Linear`` of ``model`` by an ``NF4Linear``, in place; return the model.

    ``skip_modules``: names (the last part, e.g. "lm_head", or a full dotted path) left in full
    precision. LoRA factors (``lora_A`` / ``lora_B``) and ``modules_to_save`` copies are never
    quantized, and neither is a Linear whose weight is tied to another module (quantizing one name of
    a shared Parameter would split it in two). Each weight is quantized on the device it lives on, so
    move the model first (``model.to("cuda")``), then quantize.
    """
    if isinstance(skip_modules, str):
        skip_modules = (skip_modules,)
    skip_modules = tuple(skip_modules or ())
    owners: dict = {}
    for mod_name, mod in model.named_modules():
        for p in mod._parameters.values():
            owners.setdefault(id(p), set()).add(mod_name)
    targets = [n for n, m in model.named_modules()
               if n and isinstance(m, Linear) and not _skipped(n, skip_modules)
               and len(owners.get(id(m.weight), ())) == 1]
    for name in targets:
        # set_submodule keeps each entry's place among its siblings: parameter order, and with it
        # the order LoRA injected afterwards initialises its factors in (same seed, same A), stays
        # the float model's, so QLoRA and LoRA runs differ only in the base weights
        model.set_submodule(name, NF4Linear.from_linear(model.get_submodule(name), blocksize,
                                                        double_quant, quant_type))
    return model


def quantized_modules(model: Module) -> list:
    """(dotted name, layer) for every 4-bit layer in ``model`` (inside LoRA wrappers too)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]


def requantization_errors(model: Module) -> dict:
    """{name: quantization_error dict} of every 4-bit layer re-quantized by ``replace_weight`` (e.g.
    after merging a LoRA adapter into a 4-bit base): the error rounding the merged weight to NF4
    again added, against the float merged weight."""
    return {n: m.requantization_error for n, m in quantized_modules(model)
            if m.requantization_error is not None}


def dequantize_model(model: Module) -> Module:
    """Replace every ``NF4Linear`` by a float ``Linear`` holding its dequantized weight, in place."""
    for name, layer in quantized_modules(model):
        model.set_submodule(name, layer.to_linear())
    return model


# ================================================================ what it costs
def quantization_summary(model: Module) -> dict:
    """Storage of ``model`` measured from the arrays it holds, against the same model in float32.

    Keys: ``quantized_parameters`` (values in 4 bits), ``quantized_bytes`` (their packed codes plus
    every quantization constant), ``bits_per_parameter`` (8 · quantized_bytes / quantized_parameters:
    4.127 for blocksize 64 with double quantization on large matrices), ``float_parameters`` and
    ``float_bytes`` (every Parameter: norms, embeddings, lm_head, biases, LoRA factors),
    ``trainable_parameters`` / ``trainable_bytes``, ``total_bytes`` (quantized + float),
    ``float32_bytes`` (the same model with every parameter in float32) and ``ratio``
    (float32_bytes / total_bytes). Activations and optimizer state are not counted.
    """
    layers = quantized_modules(model)
    n_q = sum(m.qweight.size for _, m in layers)
    bytes_q = sum(m.qweight.nbytes for _, m in layers)
    params = [p for _, p in model.named_parameters()]
    n_f = sum(p.size for p in params)
    bytes_f = sum(int(p.data.nbytes) for p in params)
    n_t = sum(p.size for p in params if p.requires_grad)
    bytes_t = sum(int(p.data.nbytes) for p in params if p.requires_grad)
    total = bytes_q + bytes_f
    f32 = 4 * (n_q + n_f)
    return {"quantized_layers": len(layers), "quantized_parameters": int(n_q),
            "quantized_bytes": int(bytes_q),
            "bits_per_parameter": 8 * bytes_q / n_q if n_q else 0.0,
            "float_parameters": int(n_f), "float_bytes": int(bytes_f),
            "trainable_parameters": int(n_t), "trainable_bytes": int(bytes_t),
            "total_bytes": int(total), "float32_bytes": int(f32),
            "ratio": f32 / total if total else float("nan")}


def format_quantization_summary(summary: dict) -> str:
    """A few lines for humans: 4-bit share, bits per parameter, total bytes vs float32."""
    s = summary
    kib = 1024
    return "\n".join([
        f"4-bit weights : {s['quantized_parameters']:>12,} params in {s['quantized_layers']} layers, "
        f"{s['quantized_bytes'] / kib:,.1f} KiB = {s['bits_per_parameter']:.4f} bits/param",
        f"float weights : {s['float_parameters']:>12,} params, {s['float_bytes'] / kib:,.1f} KiB "
        f"({s['trainable_parameters']:,} trainable)",
        f"total         : {s['total_bytes'] / kib:,.1f} KiB vs {s['float32_bytes'] / kib:,.1f} KiB "
        f"in float32 ({s['ratio']:.2f}x smaller)"])


# ================================================================ files
def quantized_state_dict(model: Module) -> "OrderedDict[str, object]":
    """Every tensor of ``model`` by name: ``name.weight`` -> QuantizedTensor4bit for 4-bit layers,
    arrays for everything else (what ``quant.report.save_quantized`` writes)."""
    out = OrderedDict()
    for name, layer in quantized_modules(model):
        out[f"{name}.weight"] = layer.qweight
    for name, p in model.named_parameters():
        out[name] = p.data
    return out


def save_quantized_model(model: Module, out_dir):
    """Write ``quantized_state_dict(model)`` to ``out_dir/model.nf4.safetensors`` (atomically)."""
    from .report import save_quantized
    return save_quantized(quantized_state_dict(model), out_dir)


def load_quantized_model(model: Module, path) -> Module:
    """Load ``save_quantized_model``'s file into ``model`` (a float model of the same config, or an
    already quantized one): its 4-bit entries become ``NF4Linear`` layers, the rest is copied into
    the parameters by name (strictly: every parameter must be in the file). Returns the model."""
    from .report import load_quantized
    loaded = load_quantized(path)
    arrays = {}
    for key, value in loaded.items():
        if isinstance(value, QuantizedTensor4bit):
            name = key[:-len(".weight")] if key.endswith(".weight") else key
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{path}: 4-bit tensor {key!r} names no module of the model; was it "
                                 "saved from a different model?") from None
            if not isinstance(old, (Linear, NF4Linear)) or (old.out_features, old.in_features) \
                    != tuple(value.shape):
                raise ValueError(f"{path}: {key} has shape {value.shape} but {name} is "
                                 f"{type(old).__name__} ({old.out_features}, {old.in_features})")
            device = backend.device_of(old.qweight.packed) if isinstance(old, NF4Linear) \
                else backend.device_of(old.weight.data)
            bias = loaded.get(f"{name}.bias")
            model.set_submodule(name, NF4Linear(value.to(device), bias))
        else:
            arrays[key] = value
    model.load_state_dict(arrays, strict=True)   # a missing or unknown name is an error
    return model
