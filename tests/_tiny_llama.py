"""Small Llama models for tests: a random one built in memory, ids to feed it, and a saved base
checkpoint folder (config.json + model.safetensors) for the commands."""
from __future__ import annotations

import numpy as np

from minilora import backend
from minilora.models import LlamaConfig, LlamaForCausalLM

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=None, bos_token_id=None, eos_token_id=None)


def model_of(**kw):
    """A seeded random LlamaForCausalLM of the SMALL shape, with ``kw`` overriding config fields."""
    backend.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, **kw}))


def ids_of(B=2, T=7, V=61, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def save_tiny_base(directory):
    """A seeded random byte-vocabulary base (2 layers, hidden 32) saved in ``directory``."""
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128))
    model.save_pretrained(directory)
    return directory

