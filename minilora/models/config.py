"""LlamaConfig: the hyperparameters of a Llama-style decoder, with Hugging Face's field names.

The fields and their defaults mirror ``transformers.LlamaConfig`` so that a ``config.json`` written
by either library is read by the other. The defaults here describe minilora's tiny shipped model, not
Llama-7B; presets for the real sizes live in ``PRESETS`` (used by the memory accounting).

RoPE settings come in two formats: transformers 4.x writes ``rope_theta`` and ``rope_scaling``
(``{"rope_type": "llama3", "factor": 8.0, ...}`` or null), transformers 5.x writes one dict,
``rope_parameters`` (``{"rope_theta": 500000.0, "rope_type": "llama3", ...}``). ``from_dict`` reads
both and ``to_dict`` writes both, consistently, so either version reads back the same RoPE. Every
key that changes the model's arithmetic is implemented or refused with a one-line error.

Every field is checked for its type and range when a config is made (``check_fields``): sizes are
integers >= 1 (not floats, not booleans), ``rms_norm_eps`` and ``rope_theta`` finite and positive,
``tie_word_embeddings`` a real boolean (JSON's ``"false"`` is a string, and a non-empty string is
true in Python). Nothing is allocated from a config that fails, and ``models/hf_io.py`` compares the
sizes with the tensor shapes in the weights file's header before any weight is read.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields

import numpy as np

from .rope import normalize_rope_scaling


@dataclass
class LlamaConfig:
    vocab_size: int = 259                  # 256 byte ids + <bos>, <eos>, <pad> (minilora.data.ByteTokenizer)
    hidden_size: int = 128                 # d_model: width of the residual stream
    intermediate_size: int = 344           # SwiGLU width; Llama uses ~8/3 * hidden rounded up
    num_hidden_layers: int = 4             # number of decoder blocks
    num_attention_heads: int = 4           # query heads; head_dim = hidden_size // num_attention_heads
    num_key_value_heads: int | None = None  # < num_attention_heads turns on grouped-query attention
    max_position_embeddings: int = 256     # longest sequence RoPE and the KV cache are sized for
    rms_norm_eps: float = 1e-5             # added inside the RMSNorm square root, for stability
    rope_theta: float = 10000.0            # RoPE base: larger = slower-rotating, longer-range frequencies
    # None = plain RoPE; else {"rope_type": "linear" | "llama3", <its parameters>} (models/rope.py)
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False      # share embed_tokens.weight with lm_head.weight
    initializer_range: float = 0.02        # std of the normal init of Linear and Embedding weights
    bos_token_id: int | None = 256
    eos_token_id: int | None = 257
    pad_token_id: int | None = 258

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_fields(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}; pick a head count that divides it")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}; GQA needs whole groups")
        self.rope_theta = float(self.rope_theta)
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_parameters(self) -> dict:
        """RoPE as transformers 5.x writes it: ``{"rope_theta": ..., "rope_type": ..., ...}``."""
        return {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}

    def to_dict(self) -> dict:
        """The fields as Hugging Face's config.json writes them (plus model_type/architectures).

        RoPE is written in both formats (``rope_theta`` + ``rope_scaling`` for transformers 4.x,
        ``rope_parameters`` for 5.x), which say the same thing."""
        d = asdict(self)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                 attention_bias=False, mlp_bias=False, attention_dropout=0.0, head_dim=self.head_dim,
                 torch_dtype="float32", rope_parameters=self.rope_parameters)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Read a Hugging Face Llama config dict (transformers 4.x or 5.x).

        Keys that do not change the arithmetic (use_cache, torch_dtype, pretraining_tp, which only
        splits the same matmuls into slices, ...) are ignored; every one that does is read or
        refused with a one-line ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"the config is a JSON {type(d).__name__}; expected an object of "
                             "Llama hyperparameters")
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"config has model_type {d.get('model_type')!r}; minilora loads 'llama' only")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported; Llama uses 'silu'")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("attention_bias/mlp_bias=True is not supported; Llama has no Linear biases")
        if d.get("attention_dropout"):
            raise ValueError(f"attention_dropout {d['attention_dropout']} is not supported (minilora's "
                             "attention has no dropout); set it to 0.0")
        if d.get("quantization_config"):
            raise ValueError("the config has a quantization_config; minilora loads unquantized "
                             "checkpoints (float32/16, bfloat16) or a .gguf file")
        names = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling"}
        kw = {k: v for k, v in d.items() if k in names}
        for name in ("rope_theta", "max_position_embeddings", "partial_rotary_factor",
                     "original_max_position_embeddings"):   # read by _rope_from_dict: check first
            v = d.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                                  or not math.isfinite(v) or v <= 0):
                raise ValueError(f"{name} is {v!r}; expected a finite number > 0")
        kw["rope_theta"], kw["rope_scaling"] = _rope_from_dict(d)
        config = cls(**kw)
        hd = d.get("head_dim")
        if hd is not None and hd != config.head_dim:
            raise ValueError(f"head_dim is {hd!r}; expected hidden_size // num_attention_heads = "
                             f"{config.head_dim} (other head sizes are not supported)")
        return config

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings")
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_fields(config: "LlamaConfig") -> None:
    """Refuse a field of the wrong type or out of range with a ValueError naming it and what was
    expected, before anything is built from the config."""
    for name in _SIZES:
        v = getattr(config, name)
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} is {v!r}; expected an integer >= 1")
    for name in _POSITIVE_FLOATS:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} is {v!r}; expected a finite number > 0")
    v = config.initializer_range
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
        raise ValueError(f"initializer_range is {v!r}; expected a finite number >= 0")
    if not isinstance(config.tie_word_embeddings, (bool, np.bool_)):
        raise ValueError(f"tie_word_embeddings is {config.tie_word_embeddings!r}; expected true or "
                         "false (a JSON boolean, not a string)")
    config.tie_word_embeddings = bool(config.tie_word_embeddings)
    for name in _TOKEN_IDS:
        v = getattr(config, name)
        if v is None or (_is_int(v) and v >= 0):
            continue
        raise ValueError(f"{name} is {v!r}; expected null or an integer >= 0")


def _rope_from_dict(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a config dict in transformers 4.x or 5.x form.

    As in transformers, a non-empty ``rope_scaling`` takes precedence over ``rope_parameters``, and
    a theta inside the dict over the top-level ``rope_theta``; where two places give different
    values the config is refused, rather than one of them silently winning."""
    scaling, params = d.get("rope_scaling") or None, d.get("rope_parameters") or None
    for name, v in (("rope_scaling", scaling), ("rope_parameters", params)):
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"{name} must be a dict (or null), got {v!r}")
        if v is not None and any(isinstance(x, dict) for x in v.values()):
            raise ValueError(f"{name} holds one dict per layer type; Llama has a single RoPE, give "
                             "one flat dict")
    rope = dict(scaling or params or {})
    thetas = {float(x["rope_theta"]) for x in (scaling, params) if x and "rope_theta" in x}
    if d.get("rope_theta") is not None:
        thetas.add(float(d["rope_theta"]))
    if len(thetas) > 1:
        raise ValueError(f"the config gives different RoPE bases {sorted(thetas)} (rope_theta, "
                         "rope_parameters, rope_scaling); keep one")
    if scaling and params:
        a = normalize_rope_scaling(scaling, d.get("max_position_embeddings", 256))
        b = normalize_rope_scaling(params, d.get("max_position_embeddings", 256))
        if a != b:
            raise ValueError(f"rope_scaling {scaling} and rope_parameters {params} disagree; keep one")
    if d.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    if d.get("original_max_position_embeddings") is not None and rope.get(
            "rope_type", rope.get("type")) == "llama3":
        # transformers gives a top-level original_max_position_embeddings priority
        rope["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    theta = thetas.pop() if thetas else 10000.0
    return theta, (rope or None)


# Published Llama shapes, for parameter and memory accounting (no weights are ever built for these).
PRESETS = {
    "llama-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                            max_position_embeddings=4096),
    "llama-13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                             num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                             max_position_embeddings=4096),
    "llama-70b": LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                             num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                             max_position_embeddings=4096),
    "llama3-70b": LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                              max_position_embeddings=8192, rope_theta=500000.0),
    # Llama 3 8B: the same width and head count as Llama-7B, but grouped-query attention (8 KV heads).
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=8192, rope_theta=500000.0),
    # LLaMA-1 65B (Touvron et al., 2023), the model QLoRA fine-tuned on one 48 GB GPU.
    "llama-65b": LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                             num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64,
                             max_position_embeddings=2048),
}
