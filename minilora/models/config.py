"""LlamaConfig: the hyperparameters of a Llama-style decoder, with Hugging Face's field names.

The fields and their defaults mirror ``transformers.LlamaConfig`` so that a ``config.json`` written
by either library is read by the other. The defaults here describe minilora's tiny shipped model, not
Llama-7B; presets for the real sizes live in ``PRESETS`` (used by the memory accounting).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


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
    tie_word_embeddings: bool = False      # share embed_tokens.weight with lm_head.weight
    initializer_range: float = 0.02        # std of the normal init of Linear and Embedding weights
    bos_token_id: int | None = 256
    eos_token_id: int | None = 257
    pad_token_id: int | None = 258

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}; pick a head count that divides it")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}; GQA needs whole groups")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """The fields as Hugging Face's config.json writes them (plus model_type/architectures)."""
        d = asdict(self)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                 attention_bias=False, mlp_bias=False, head_dim=self.head_dim, torch_dtype="float32")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Read a Hugging Face Llama config dict; unknown keys are ignored, unsupported ones refused."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"config has model_type {d.get('model_type')!r}; minilora loads 'llama' only")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported; Llama uses 'silu'")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("attention_bias/mlp_bias=True is not supported; Llama has no Linear biases")
        if d.get("rope_scaling"):
            raise ValueError("rope_scaling is not supported; use a checkpoint without RoPE scaling")
        hd = d.get("head_dim")
        if hd is not None and hd != d["hidden_size"] // d["num_attention_heads"]:
            raise ValueError(f"head_dim {hd} != hidden_size // num_attention_heads; not supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


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
