"""Parameter and memory accounting for full fine-tuning, LoRA and QLoRA, from a model's shapes.

How many parameters does a Llama have, how many does a LoRA adapter add, and how many bytes does
training need? Each answer is one small function of a ``LlamaConfig`` (``models.config.PRESETS``
holds the published Llama shapes), and everything else (the article check, the notebooks, the
``minilora`` command) calls these functions instead of re-typing the arithmetic.

The formulas:
- a Llama decoder layer has seven bias-free Linear layers, q/k/v/o (attention) and gate/up/down
  (SwiGLU MLP), plus two RMSNorm weight vectors; with grouped-query attention k and v project to
  num_key_value_heads * head_dim features only;
- a LoRA adapter on a Linear of shape (out, in) adds A (r, in) and B (out, r): r·(in + out)
  parameters (Hu et al., 2021);
- training memory = weights + gradients + optimizer state (+ NF4 quantization constants for QLoRA,
  Dettmers et al., 2023); activations are NOT counted: they depend on batch size, sequence length and
  gradient checkpointing, and every figure here says so.

Units: bytes are exact integers; ``GB`` is 10^9 bytes (how the LoRA article and most papers write
"140 GB"), ``GiB`` is 2^30 bytes. GPU cards are sold by GiB: an "80GB" A100 has 81,920 MiB = 80 GiB,
so ``gpus_needed`` and ``fits_on`` read ``gpu_gb`` as the card's marketed size in GiB.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from minilora import quant as _quant
from minilora.lora import merge as _merge
from minilora.models.config import PRESETS, LlamaConfig

GB = 10**9
GiB = 2**30

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES

# Bytes of optimizer state per trainable parameter, not counting a master copy of the weights.
OPTIMIZER_STATE_BYTES = {
    "adamw": 8, "adam": 8,                  # first and second moments m, v in float32
    "paged_adamw": 8,                       # the same state, paged between GPU and host (QLoRA)
    "adamw_8bit": 2, "paged_adamw_8bit": 2,  # m, v quantized to 8 bits (bitsandbytes)
    "sgd_momentum": 4,                      # one float32 momentum buffer
    "sgd": 0,                               # no state
}
METHODS = ("full", "lora", "qlora")


def as_config(config) -> LlamaConfig:
    """``config`` as a LlamaConfig: a LlamaConfig itself, or a preset's name such as "llama-7b"."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; use one of {sorted(PRESETS)} or a LlamaConfig")
        return PRESETS[config]
    if not isinstance(config, LlamaConfig):
        raise ValueError(f"expected a LlamaConfig or a preset name, got {type(config).__name__}")
    return config


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    return r


# ---------------------------------------------------------------- parameter counts
def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} for the seven Linear layers of one decoder layer.

    Every layer of a Llama has the same shapes. With grouped-query attention (num_key_value_heads <
    num_attention_heads) k_proj and v_proj are narrower: out = num_key_value_heads * head_dim.
    """
    c = as_config(config)
    d, kv = c.hidden_size, c.num_key_value_heads * c.head_dim
    return {
        "q_proj": (d, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, d),
        "gate_proj": (c.intermediate_size, d),
        "up_proj": (c.intermediate_size, d),
        "down_proj": (d, c.intermediate_size),
    }


def linear_weight_parameters(out_features: int, in_features: int) -> int:
    """Parameters of a bias-free Linear weight (out, in): out·in (8192×8192 = 67,108,864)."""
    return int(out_features) * int(in_features)


def lora_linear_parameters(out_features: int, in_features: int, r: int) -> int:
    """Parameters LoRA adds to one Linear (out, in): A is (r, in), B is (out, r), so r·(in + out).

    For a square d×d weight this is the familiar 2·r·d; for k_proj under GQA or the MLP it is not.
    """
    _check_rank(r)
    a_shape, b_shape = _merge.lora_factor_shapes(out_features, in_features, r)
    return math.prod(a_shape) + math.prod(b_shape)


def count_parameters(config) -> dict:
    """Every parameter of ``LlamaForCausalLM(config)``, by part.

    Keys: "embed_tokens", "layer" (one decoder layer: each Linear, "self_attn", "mlp", the two norms
    and "total"), "layers" (all decoder layers), "norm", "lm_head" (0 when tied to the embedding),
    "linear" (all decoder Linear weights: what QLoRA stores in NF4) and "total".
    """
    c = as_config(config)
    shapes = linear_shapes(c)
    layer = {name: linear_weight_parameters(out, inn) for name, (out, inn) in shapes.items()}
    layer["self_attn"] = sum(layer[n] for n in ATTENTION_MODULES)
    layer["mlp"] = sum(layer[n] for n in MLP_MODULES)
    layer["input_layernorm"] = c.hidden_size           # RMSNorm has one weight vector, no bias
    layer["post_attention_layernorm"] = c.hidden_size
    layer["total"] = (layer["self_attn"] + layer["mlp"] + layer["input_layernorm"]
                      + layer["post_attention_layernorm"])
    embed = c.vocab_size * c.hidden_size
    counts = {
        "embed_tokens": embed,
        "layer": layer,
        "layers": c.num_hidden_layers * layer["total"],
        "norm": c.hidden_size,
        "lm_head": 0 if c.tie_word_embeddings else embed,
        "linear": c.num_hidden_layers * (layer["self_attn"] + layer["mlp"]),
    }
    counts["total"] = counts["embed_tokens"] + counts["layers"] + counts["norm"] + counts["lm_head"]
    return counts


def resolve_target_modules(target_modules) -> tuple[str, ...]:
    """PEFT-style target_modules as a tuple of Llama module names; "all-linear" means all seven."""
    if isinstance(target_modules, str):
        target_modules = LINEAR_MODULES if target_modules == "all-linear" else (target_modules,)
    names = tuple(dict.fromkeys(target_modules))  # keep order, drop repeats
    unknown = [n for n in names if n not in LINEAR_MODULES]
    if unknown or not names:
        raise ValueError(f"unknown target_modules {unknown or names!r}; use names from {LINEAR_MODULES} "
                         "or 'all-linear'")
    return names


def _resolve_layers(layers, n_layers: int) -> tuple[int, ...]:
    """PEFT's layers_to_transform: None (every layer), one index, or a list of indices."""
    if layers is None:
        return tuple(range(n_layers))
    idx = (layers,) if isinstance(layers, int) else tuple(layers)
    bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
    if bad or not idx:
        raise ValueError(f"layers {layers!r} must be indices in [0, {n_layers}); got bad entries {bad}")
    return tuple(sorted(set(idx)))


def lora_parameter_breakdown(config, r: int, target_modules=("q_proj", "v_proj"), layers=None) -> dict:
    """LoRA parameters by module and layer: {"per_module": {name: r·(in+out)}, "per_layer",
    "layers" (indices adapted), "total"}."""
    c = as_config(config)
    names = resolve_target_modules(target_modules)
    idx = _resolve_layers(layers, c.num_hidden_layers)
    shapes = linear_shapes(c)
    per_module = {n: lora_linear_parameters(*shapes[n], r) for n in names}
    per_layer = sum(per_module.values())
    return {"per_module": per_module, "per_layer": per_layer, "layers": idx,
            "total": per_layer * len(idx)}


def lora_parameters(config, r: int, target_modules=("q_proj", "v_proj"), layers=None) -> int:
    """Trainable parameters of a LoRA adapter with rank r on ``target_modules`` (PEFT's default for
    Llama: q_proj and v_proj) in ``layers`` (default: all)."""
    return lora_parameter_breakdown(config, r, target_modules, layers)["total"]


def adapter_file_bytes(config, r: int, target_modules=("q_proj", "v_proj"), dtype_bytes: int = 4,
                       layers=None) -> int:
    """Bytes of tensor data in ``adapter_model.safetensors``: one A and one B per adapted Linear.

    PEFT keeps adapter weights in float32 by default (it upcasts float16/bfloat16 adapters), hence
    ``dtype_bytes=4``; pass 2 for an adapter saved in 16-bit. The JSON header adds about 150 bytes
    per tensor on top.
    """
    if dtype_bytes not in (1, 2, 4, 8):
        raise ValueError(f"dtype_bytes must be 1, 2, 4 or 8, got {dtype_bytes!r}")
    return lora_parameters(config, r, target_modules, layers) * dtype_bytes


# ---------------------------------------------------------------- bytes per parameter
@dataclass(frozen=True)
class ParamBytes:
    """What one parameter costs during training, in bytes, by kind of memory."""
    weights: float
    gradients: float = 0.0
    optimizer: float = 0.0        # optimizer state, including an fp32 master copy if there is one
    quant_constants: float = 0.0  # NF4 absmax scales (and their double-quantization constants)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.quant_constants


def _optimizer_bytes(optimizer) -> float:
    if isinstance(optimizer, (int, float)) and not isinstance(optimizer, bool):
        if optimizer < 0:
            raise ValueError(f"optimizer state bytes must be >= 0, got {optimizer}")
        return float(optimizer)
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(OPTIMIZER_STATE_BYTES)} "
                         "or a number of state bytes per parameter")
    return float(OPTIMIZER_STATE_BYTES[optimizer])


def _check_bytes(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
    return value


def bytes_per_parameter(method: str = "full", *, weight_bytes: float = 2, grad_bytes: float | None = None,
                        adapter_bytes: float | None = None, optimizer="adamw",
                        master_weights: bool | None = None, nf4_blocksize: int = 64,
                        double_quant: bool = True, include_quant_constants: bool = True
                        ) -> dict[str, ParamBytes]:
    """Bytes per parameter for each role a parameter can play in ``method``:

    - "trainable": its weight (``weight_bytes`` for full fine-tuning, ``adapter_bytes`` for LoRA
      factors, default the same), its gradient (``grad_bytes``, default the weight's width), optimizer
      state (AdamW: m and v in float32, 8 bytes) and, when the weight is narrower than float32 and
      ``master_weights`` is not False, a 4-byte float32 master copy (mixed precision).
      So full fine-tuning with AdamW costs 2 + 2 + 4 + 8 = 16 bytes (or 4 + 4 + 8 = 16 in pure fp32).
    - "frozen": a frozen base weight: ``weight_bytes``, or for "qlora" the NF4 code (4 bits) plus its
      constants, nf4_bits_per_parameter(blocksize, double_quant) − 4 bits.
    - "frozen_unquantized": a frozen weight QLoRA leaves in 16-bit (embeddings, norms, lm_head).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    weight_bytes = _check_bytes("weight_bytes", weight_bytes)
    train_w = weight_bytes if method == "full" or adapter_bytes is None else \
        _check_bytes("adapter_bytes", adapter_bytes)
    grad = train_w if grad_bytes is None else _check_bytes("grad_bytes", grad_bytes)
    master = (train_w < 4) if master_weights is None else bool(master_weights)
    trainable = ParamBytes(weights=train_w, gradients=grad,
                           optimizer=_optimizer_bytes(optimizer) + (4.0 if master else 0.0))
    plain = ParamBytes(weights=weight_bytes)
    if method == "qlora":
        bits = _quant.nf4_bits_per_parameter(nf4_blocksize, double_quant)  # 4 data bits + constants
        frozen = ParamBytes(weights=4 / 8,
                            quant_constants=(bits - 4) / 8 if include_quant_constants else 0.0)
    else:
        frozen = plain
    return {"trainable": trainable, "frozen": frozen, "frozen_unquantized": plain}


# ---------------------------------------------------------------- memory for a training run
@dataclass(frozen=True)
class MemoryBreakdown:
    """Training memory in bytes, by kind. Activations are not included (see the module docstring)."""
    method: str
    total_params: int          # parameters of the base model
    trainable_params: int      # what the optimizer updates (all of them for "full")
    quantized_params: int      # base parameters stored in NF4 ("qlora" only)
    weights: int               # the base model's weights (16-bit, or NF4 codes for "qlora")
    adapter: int               # the LoRA factors' weights (0 for "full")
    gradients: int
    optimizer: int             # optimizer state and master weights
    quant_constants: int       # NF4 absmax constants (double-quantized or not)
    assumptions: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.quant_constants

    @property
    def base(self) -> int:
        """The frozen base model as stored: weights plus quantization constants."""
        return self.weights + self.quant_constants

    def gb(self, what: str = "total") -> float:
        """``what`` ("total", "base", "weights", "adapter", "gradients", "optimizer",
        "quant_constants") in GB (10^9 bytes)."""
        return getattr(self, what) / GB

    def gib(self, what: str = "total") -> float:
        """``what`` in GiB (2^30 bytes)."""
        return getattr(self, what) / GiB

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d

    def __str__(self) -> str:
        rows = [("base weights", self.weights), ("adapter", self.adapter), ("gradients", self.gradients),
                ("optimizer state", self.optimizer), ("quant constants", self.quant_constants),
                ("total", self.total)]
        lines = [f"{self.method}: {self.total_params:,} parameters, {self.trainable_params:,} trainable"]
        lines += [f"  {name:<16}{b / GB:>10.2f} GB {b / GiB:>10.2f} GiB" for name, b in rows]
        lines += [f"  ({a})" for a in self.assumptions]
        return "\n".join(lines)


def _as_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n <= 0 or n != int(n):
        raise ValueError(f"n_params must be a positive whole number (e.g. 70e9), got {n!r}")
    return int(n)


def memory_breakdown(model, method: str = "full", *, r: int = 16,
                     target_modules=("q_proj", "v_proj"), layers=None, lora_params: int | None = None,
                     weight_bytes: float = 2, grad_bytes: float | None = None,
                     adapter_bytes: float | None = None, optimizer="adamw",
                     master_weights: bool | None = None, nf4_blocksize: int = 64,
                     double_quant: bool = True, include_quant_constants: bool = True,
                     quantize_all: bool = False) -> MemoryBreakdown:
    """Bytes to train ``model`` (a LlamaConfig, a preset name, or a parameter count like 70e9).

    method "full": every parameter is trainable. "lora": the base is frozen at ``weight_bytes``, the
    adapter (rank r on target_modules; or ``lora_params`` given directly) is trainable. "qlora": as
    "lora" but the decoder's Linear weights are stored in NF4 (4 bits + constants, from
    ``minilora.quant.nf4_bits_per_parameter``); embeddings, norms and lm_head stay at ``weight_bytes``
    as in bitsandbytes/PEFT, unless ``quantize_all=True`` (the idealised "every parameter in 4 bits").
    Given a bare count, "qlora" quantizes all of it. Per-parameter costs: ``bytes_per_parameter``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    cost = bytes_per_parameter(method, weight_bytes=weight_bytes, grad_bytes=grad_bytes,
                               adapter_bytes=adapter_bytes, optimizer=optimizer,
                               master_weights=master_weights, nf4_blocksize=nf4_blocksize,
                               double_quant=double_quant,
                               include_quant_constants=include_quant_constants)
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        n = _as_count(model)
        linear = n  # no structure known: treat every parameter as a Linear weight
        if method != "full" and lora_params is None:
            raise ValueError(f"memory_breakdown({model!r}, {method!r}) needs the adapter size: pass a "
                             "LlamaConfig (or preset name) or lora_params=...")
    else:
        counts = count_parameters(model)
        n, linear = counts["total"], counts["linear"]
    if method == "full":
        n_train = n
    elif lora_params is not None:
        n_train = _as_count(lora_params)
    else:
        n_train = lora_parameters(model, r, target_modules, layers)

    notes = ["activations not included"]
    if method == "full":
        base_roles, n_quant = [(n, cost["trainable"])], 0
        adapter_roles = []
    else:
        n_quant = (n if quantize_all else linear) if method == "qlora" else 0
        base_roles = [(n_quant, cost["frozen"]), (n - n_quant, cost["frozen_unquantized"])]
        adapter_roles = [(n_train, cost["trainable"])]
    t = cost["trainable"]
    notes.append(f"trainable: {t.weights:g} B weight + {t.gradients:g} B grad + {t.optimizer:g} B "
                 f"optimizer/master = {t.total:g} B per parameter")
    if method == "qlora":
        q = cost["frozen"]
        notes.append(f"NF4 blocksize {nf4_blocksize}, double_quant={double_quant}: {q.total * 8:.6g} "
                     f"bits per quantized parameter"
                     + ("" if include_quant_constants else " (constants left out)"))
        notes.append(f"{n - n_quant:,} parameters kept at {weight_bytes:g} B (embeddings, norms, lm_head)"
                     if n - n_quant else "every base parameter quantized")

    def total(roles, kind):
        return round(sum(count * getattr(c, kind) for count, c in roles))

    every = base_roles + adapter_roles
    return MemoryBreakdown(method=method, total_params=n, trainable_params=n_train,
                           quantized_params=n_quant, weights=total(base_roles, "weights"),
                           adapter=total(adapter_roles, "weights"), gradients=total(every, "gradients"),
                           optimizer=total(every, "optimizer"),
                           quant_constants=total(every, "quant_constants"), assumptions=tuple(notes))


# ---------------------------------------------------------------- GPUs
def _check_gpu(gpu_gb):
    if isinstance(gpu_gb, bool) or not isinstance(gpu_gb, (int, float)) or gpu_gb <= 0:
        raise ValueError(f"gpu_gb must be a positive card size such as 24, 48 or 80, got {gpu_gb!r}")
    return gpu_gb * GiB


def gpus_needed(total_bytes: float, gpu_gb: float = 80) -> int:
    """How many cards of ``gpu_gb`` (the marketed size, which is GiB) hold ``total_bytes``, if the
    memory could be split perfectly (real sharding needs some headroom on top)."""
    cap = _check_gpu(gpu_gb)
    if total_bytes < 0:
        raise ValueError(f"total_bytes must be >= 0, got {total_bytes}")
    return math.ceil(total_bytes / cap)


def fits_on(total_bytes: float, gpu_gb: float, n_gpus: int = 1) -> bool:
    """True when ``total_bytes`` fit in ``n_gpus`` cards of ``gpu_gb`` GiB each."""
    return total_bytes <= n_gpus * _check_gpu(gpu_gb)
