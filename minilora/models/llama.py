"""A Llama decoder (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models").

The architecture, block by block, with Hugging Face transformers' module and parameter names, so
that a checkpoint moves between the two libraries unchanged:

    LlamaForCausalLM
      model: LlamaModel
        embed_tokens          Embedding (vocab, C)
        layers.{i}: LlamaDecoderLayer           x = x + attn(rms_norm(x)); x = x + mlp(rms_norm(x))
          input_layernorm     RMSNorm (Zhang & Sennrich 2019), pre-norm
          self_attn           q/k/v/o_proj Linear; RoPE on q and k (Su et al. 2021); causal
                              attention with grouped-query heads (Ainslie et al. 2023)
          post_attention_layernorm
          mlp                 down_proj(silu(gate_proj(x)) * up_proj(x)): SwiGLU (Shazeer 2020)
        norm                  RMSNorm
      lm_head                 Linear (C -> vocab), or the embedding matrix itself when tied

Every projection is a ``minilora.nn.Linear`` reached by its dotted name (``model.layers.0.self_attn.
q_proj``), and the blocks only ever *call* them; LoRA (``minilora.lora``) swaps them for wrappers with
``set_submodule`` from outside, and the model does not know.

Shapes: B batch, T sequence, C hidden, H query heads, G = num_key_value_heads (KV groups), R = H / G
query heads per group, D = C / H head dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import backend, settings
from .. import functional as F
from .. import nn
from ..checkpoint import checkpoint
from ..tensor import Tensor, is_grad_enabled, no_grad
from .config import LlamaConfig
from .generation import KVCache, generate as _generate, stream_generate as _stream_generate
from .gguf_io import load_gguf
from .hf_io import CheckpointError, load_pretrained, no_random_init, save_pretrained
from .rope import RotaryTables


@dataclass
class CausalLMOutput:
    """What ``model(input_ids, labels=...)`` returns: the mean next-token loss and the logits."""
    loss: Tensor | None
    logits: Tensor
    past_key_values: KVCache | None = None


def _normal_linear(in_features: int, out_features: int, std: float) -> nn.Linear:
    """A bias-free Linear with Hugging Face's Llama init: weight ~ N(0, initializer_range^2)."""
    lin = nn.Linear(in_features, out_features, bias=False)
    lin.weight = nn.Parameter(backend.to_device(nn.init_normal((out_features, in_features), std)))
    return lin


class LlamaAttention(nn.Module):
    """Causal self-attention with RoPE and grouped-query attention (G key/value heads for H queries).

    The R = H / G query heads of a group share one key/value head. Instead of repeating k and v R
    times (transformers' ``repeat_kv`` copies), q is viewed as (B, G, R, T, D) and k, v as
    (B, G, 1, T, D): broadcasting in the attention matmuls does the sharing, and the backward sums
    the R query heads' contributions into the shared k/v gradient.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        C, H, G, D = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                      config.head_dim)
        std = config.initializer_range
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, D
        self.q_proj = _normal_linear(C, H * D, std)
        self.k_proj = _normal_linear(C, G * D, std)
        self.v_proj = _normal_linear(C, G * D, std)
        self.o_proj = _normal_linear(H * D, C, std)

    def forward(self, x: Tensor, cos, sin, attn_mask=None, cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        H, G, D = self.num_heads, self.num_kv_heads, self.head_dim
        R = H // G
        # projections, split into heads; RoPE is applied in this (contiguous) layout
        q = self.q_proj(x).reshape(B, T, G, R, D)            # (B, T, C) -> (B, T, G, R, D)
        k = self.k_proj(x).reshape(B, T, G, D)               # (B, T, G*D) -> (B, T, G, D)
        v = self.v_proj(x).reshape(B, T, G, D)               # (B, T, G*D) -> (B, T, G, D)
        q = F.rotary_embedding(q, cos[:, None, None, :], sin[:, None, None, :])  # cos: (T, 1, 1, D)
        k = F.rotary_embedding(k, cos[:, None, :], sin[:, None, :])              # cos: (T, 1, D)
        q = q.transpose(0, 2, 3, 1, 4)                       # (B, T, G, R, D) -> (B, G, R, T, D) view
        k = k.transpose(0, 2, 1, 3)                          # (B, T, G, D) -> (B, G, T, D) view
        v = v.transpose(0, 2, 1, 3)                          # (B, T, G, D) -> (B, G, T, D) view
        if cache is not None:                                # generation: no graph, plain arrays
            k_all, v_all = cache.update(self.layer_idx, k, v)  # (B, G, Tk, D), Tk = past + T
            k, v = Tensor(k_all), Tensor(v_all)
        Tk = k.shape[2]
        k = k.reshape(B, G, 1, Tk, D)                        # (B, G, Tk, D) -> (B, G, 1, Tk, D)
        v = v.reshape(B, G, 1, Tk, D)                        # shared by the R heads of the group
        y = F.scaled_dot_product_attention(q, k, v, causal=True, attn_mask=attn_mask)  # (B, G, R, T, D)
        y = y.transpose(0, 3, 1, 2, 4).reshape(B, T, H * D)  # (B, G, R, T, D) -> (B, T, G, R, D) -> (B, T, C)
        return self.o_proj(y)                                # (B, T, C)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)), C -> I -> C."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, I, std = config.hidden_size, config.intermediate_size, config.initializer_range
        self.gate_proj = _normal_linear(C, I, std)
        self.up_proj = _normal_linear(C, I, std)
        self.down_proj = _normal_linear(I, C, std)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))  # (B, T, I) -> (B, T, C)


class LlamaDecoderLayer(nn.Module):
    """One pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: Tensor, cos, sin, attn_mask=None, cache=None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the output head: token ids (B, T) -> hidden states (B, T, C).

    With ``gradient_checkpointing`` on (``LlamaForCausalLM.gradient_checkpointing_enable()``), a
    training forward with grad on and no KV cache runs each decoder layer through
    ``minilora.checkpoint.checkpoint``: the graph keeps each layer's input (B, T, C) instead of its
    activations, and backward recomputes them one layer at a time (Chen et al. 2016).
    """

    gradient_checkpointing = False   # a plain flag: DataParallel's replicas share it

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         std=config.initializer_range)
        if config.pad_token_id is not None and 0 <= config.pad_token_id < config.vocab_size:
            self.embed_tokens.weight.data[config.pad_token_id] = 0  # as transformers' init
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryTables(config.head_dim, config.rope_theta,   # tables, not parameters
                                   config.rope_scaling)

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None) -> Tensor:
        B, T = input_ids.shape
        offset = cache.seq_len if cache is not None else 0
        x = self.embed_tokens(input_ids)                          # (B, T, C)
        cos, sin = self.rotary(T, offset, backend.get_xp(x.data), x.dtype)  # (T, D) each
        mask = None
        if attention_mask is not None:
            mask = _padding_mask(attention_mask, offset + T, x.data.dtype)
        recompute = self.gradient_checkpointing and self.training and cache is None \
            and is_grad_enabled()                                 # never in eval or generation
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask)          # keeps x (B, T, C) only
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


def _padding_mask(attention_mask, Tk: int, dtype):
    """Hugging Face's attention_mask (B, Tk) of 1 (real token) / 0 (padding) as an additive mask
    (B, 1, 1, 1, Tk) over the keys, or None when nothing is padded. Padding gets the most negative
    finite float rather than -inf (as transformers' eager attention), so that a query with no real
    key at all (left padding) gives finite, ignorable outputs instead of NaN."""
    m = attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask
    xpmod = backend.get_xp(m)
    m = xpmod.asarray(m)
    if m.ndim != 2 or m.shape[1] != Tk:
        raise ValueError(f"attention_mask must be (batch, {Tk}) covering past and new tokens, got "
                         f"shape {tuple(m.shape)}")
    if bool((m != 0).all()):
        return None
    neg = np.finfo(np.dtype(dtype)).min
    add = xpmod.where(m != 0, 0.0, neg).astype(dtype)             # (B, Tk)
    return add[:, None, None, None, :]                            # (B, 1, 1, 1, Tk)


class LlamaForCausalLM(nn.Module):
    """Llama with a language-modelling head: ``model(ids)`` -> logits (B, T, V).

    ``model(ids, labels=labels)`` returns ``CausalLMOutput(loss, logits)`` where the loss is the mean
    cross-entropy of predicting token t+1 from positions <= t (labels are shifted inside, as in
    transformers; -100 marks positions to ignore). ``generate``, ``save_pretrained`` and
    ``from_pretrained`` mirror transformers' methods of the same names.
    """

    def __init__(self, config: LlamaConfig | None = None):
        super().__init__()
        self.config = config if config is not None else LlamaConfig()
        self.model = LlamaModel(self.config)
        self.lm_head = _normal_linear(self.config.hidden_size, self.config.vocab_size,
                                      self.config.initializer_range)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight   # one Parameter, two names

    # ------------------------------------------------------------------ forward
    def _check_ids(self, input_ids):
        ids = input_ids.data if isinstance(input_ids, Tensor) else input_ids
        xpmod = backend.get_xp(ids)
        ids = xpmod.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids must be a (batch, seq) integer array, got shape "
                             f"{tuple(ids.shape)} dtype {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids hold ids outside [0, {self.config.vocab_size}) (min "
                             f"{int(ids.min())}, max {int(ids.max())}); check the tokenizer's vocab")
        return ids

    def forward(self, input_ids, labels=None, attention_mask=None,
                past_key_values: KVCache | None = None):
        """Logits (B, T, V) as a Tensor; with ``labels``, a ``CausalLMOutput`` with .loss too.

        ``past_key_values`` is a ``KVCache`` extended in place (generation); ``attention_mask``
        (B, past + T) of 1/0 masks padded keys, as in transformers.
        """
        ids = self._check_ids(input_ids)
        h = self.model(ids, attention_mask=attention_mask, cache=past_key_values)  # (B, T, C)
        if labels is not None and _head_fuses(self.lm_head):   # fast twin: no (B, T, V) logits
            return _FusedHeadOutput(causal_lm_head_loss(h, self.lm_head.weight, labels), h,
                                    self.lm_head, past_key_values)
        logits = self.lm_head(h)                                                   # (B, T, V)
        if labels is None:
            return logits
        return CausalLMOutput(loss=causal_lm_loss(logits, labels), logits=logits,
                              past_key_values=past_key_values)

    # ------------------------------------------------------------------ gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer's activations in backward instead of keeping them
        (transformers' method of the same name; ``minilora.checkpoint``). Applies to training
        forwards with grad on; eval, ``no_grad()`` and generation run as before.
        ``gradient_checkpointing_kwargs`` is accepted for transformers' signature: its one known key,
        ``use_reentrant``, changes nothing here (the checkpoint node lists the layer's trained
        parameters as parents, so a frozen input never hides their gradients)."""
        unknown = set(gradient_checkpointing_kwargs or {}) - {"use_reentrant"}
        if unknown:
            raise ValueError(f"gradient_checkpointing_kwargs has unknown keys {sorted(unknown)}; "
                             "minilora's checkpoint takes none (use_reentrant is accepted and ignored)")
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Keep every activation for backward again (the default)."""
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        """True after ``gradient_checkpointing_enable()``, as in transformers."""
        return self.model.gradient_checkpointing

    # ------------------------------------------------------------------ generation and files
    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id=None, seed: int | None = None, use_cache: bool = True,
                 adapter_names=None):
        """Greedy (default) or sampled continuation with a KV cache; see ``generation.generate``.
        ``eos_token_id`` is an id or a list of ids. Returns a host int64 array (B, T + new tokens).
        ``adapter_names`` (one adapter per row) is PEFT's argument: only a model with adapters, a
        ``PeftModel``, takes it; here it must stay None."""
        if adapter_names is not None:
            raise ValueError("adapter_names needs a model with LoRA adapters: wrap this model with "
                             "get_peft_model() or PeftModel.from_pretrained() and call its generate()")
        return _generate(self, input_ids, max_new_tokens, do_sample=do_sample,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_token_id=eos_token_id, seed=seed, use_cache=use_cache,
                         pad_token_id=self.config.pad_token_id if eos_token_id is not None else None)

    def stream_generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False,
                        temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, eos_token_id=None, seed: int | None = None):
        """Yield each step's new token id(s) as soon as chosen; see ``generation.stream_generate``."""
        return _stream_generate(self, input_ids, max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                eos_token_id=eos_token_id, seed=seed,
                                pad_token_id=self.config.pad_token_id
                                if eos_token_id is not None else None)

    def save_pretrained(self, save_directory, dtype=np.float32) -> None:
        """Write Hugging Face's ``config.json`` + ``model.safetensors`` (float32 or float16)."""
        save_pretrained(self, save_directory, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, device: str | None = None,
                        allow_nonfinite: bool = False) -> "LlamaForCausalLM":
        """Load a Hugging Face Llama checkpoint folder (config.json + model.safetensors, or shards
        listed in model.safetensors.index.json; float32/float16/bfloat16) or a llama.cpp ``.gguf``
        file (models/gguf_io.py), in float32. The files are checked before anything is allocated
        and the model is built without random initialisation (``hf_io.no_random_init``); weights
        holding NaN or infinity are refused unless ``allow_nonfinite`` (for forensics)."""
        if Path(path).suffix.lower() == ".gguf":
            config, weights = load_gguf(path, allow_nonfinite=allow_nonfinite)
            source, what = Path(path), "its own metadata"
        else:
            config, weights, source = load_pretrained(path, allow_nonfinite=allow_nonfinite)
            what = "config.json"
        with no_random_init():   # every weight is replaced by the file's just below
            model = cls(config)
        try:
            model.load_state_dict(weights, strict=True)   # a tied head is embed_tokens' Parameter
        except KeyError as e:
            raise CheckpointError(f"{source} does not match {what}: {e.args[0]}") from None
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
        if device is not None:
            model.to(device)
        return model

    def extra_repr(self) -> str:
        c = self.config
        return (f"vocab={c.vocab_size}, hidden={c.hidden_size}, layers={c.num_hidden_layers}, "
                f"heads={c.num_attention_heads}/{c.num_key_value_heads}, "
                f"params={self.num_parameters():,}")


def causal_lm_loss(logits: Tensor, labels, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + 1] (transformers' shift).

    Instead of slicing the (B, T, V) logits (a copy, and another in the backward), the labels are
    shifted left and padded with ``ignore_index``: position T-1 then has no target, exactly as
    ``logits[:, :-1]`` vs ``labels[:, 1:]``.
    """
    shifted = _shifted_labels(labels, logits.shape[:-1], ignore_index, backend.get_xp(logits.data))
    return F.cross_entropy(logits, shifted, ignore_index=ignore_index)


def _shifted_labels(labels, shape: tuple, ignore_index: int, xpmod):
    """labels (B, T) shifted left by one and padded with ``ignore_index``: the target of position t
    is the token at t + 1, and position T-1 has none."""
    lab = xpmod.asarray(labels.data if isinstance(labels, Tensor) else labels)
    if lab.ndim == 1:
        lab = lab[None, :]
    if lab.shape != tuple(shape):
        raise ValueError(f"labels shape {tuple(lab.shape)} must match input_ids {tuple(shape)}")
    shifted = xpmod.full(lab.shape, ignore_index, dtype=xpmod.int64)   # (B, T)
    shifted[:, :-1] = lab[:, 1:]
    return shifted


def causal_lm_head_loss(h: Tensor, weight: Tensor, labels, ignore_index: int = -100) -> Tensor:
    """``causal_lm_loss(F.linear(h, weight), labels)`` from the final hidden states h (B, T, C) and
    the head's weight (V, C), through ``F.linear_cross_entropy``, whose fast twin never holds the
    (B, T, V) logits (for SmolLM2's 49152 ids and 4 x 256 tokens they are 200 MB in float32)."""
    shifted = _shifted_labels(labels, h.shape[:-1], ignore_index, backend.get_xp(h.data))
    return F.linear_cross_entropy(h, weight, shifted, ignore_index=ignore_index)


def _head_fuses(head) -> bool:
    """True when the output head and the loss may run as one op: a plain bias-free Linear (not one
    LoRA or a 4-bit base wraps) and the fast path on."""
    return type(head) is nn.Linear and head.bias is None and not settings.reference_mode()


class _FusedHeadOutput(CausalLMOutput):
    """The ``CausalLMOutput`` of the fused head and loss (``causal_lm_head_loss``): the loss as
    always; the logits are computed from the final hidden states only when first read,
    ``lm_head(h)`` under ``no_grad()`` with the head's weight at that moment (the loss is what
    trains; a training step that never reads the logits never builds them)."""

    def __init__(self, loss: Tensor, hidden: Tensor, head, past_key_values=None):
        self.loss, self.past_key_values = loss, past_key_values
        self._hidden, self._head, self._logits = hidden.detach(), head, None

    @property
    def logits(self) -> Tensor:
        if self._logits is None:
            with no_grad():
                self._logits = self._head(self._hidden)                   # (B, T, V)
        return self._logits
