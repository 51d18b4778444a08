"""Text generation for causal language models: a KV cache, the sampling filters and the decoding loop.

Decoding one token at a time would recompute every earlier position's keys and values at each step;
the KV cache keeps them (per layer, after RoPE), so each new token costs one position's worth of
projections and one row of attention. The next token is the argmax of the last logits (greedy), or
a draw from softmax(logits / temperature) restricted by top-k (Fan et al. 2018, "Hierarchical Neural
Story Generation") and then by top-p, nucleus sampling (Holtzman et al. 2019, "The Curious Case of
Neural Text Degeneration"), in transformers' order and with its rules.

``stream_generate`` is the one decoding loop: a generator that yields each step's new token ids as
soon as they are chosen (a chat prints them as they come); ``generate`` collects what it yields,
after the prompt, as transformers' ``generate`` returns. Both run under ``no_grad`` and in eval
mode, for a batch of prompts of equal length, and stop at any of the ``eos_token_id`` ids.

Each step's logits come from the model's own forward (``model(ids, past_key_values=cache)``), the
reference; a one-token step of a plain float Llama on the CPU runs instead through
``minilora/fast/decode.py``, its twin on bare arrays (same cache, same result up to float32
rounding; ``tests/test_generation.py`` checks both), unless ``minilora.reference()`` is on.
"""
from __future__ import annotations

import numpy as np

from .. import backend, nn, settings
from ..fast import decode as fast_decode
from ..tensor import Tensor, no_grad


class KVCache:
    """Keys and values of the positions seen so far, one buffer per layer: (B, n_kv, capacity, hd).

    Buffers are allocated once (``capacity`` positions, doubled if exceeded) and written in place;
    ``update`` returns views of the filled part, so no step copies the whole history.
    """

    def __init__(self, num_layers: int, capacity: int = 256):
        self.num_layers = num_layers
        self.capacity = capacity
        self._k = [None] * num_layers
        self._v = [None] * num_layers
        self._len = [0] * num_layers

    @property
    def seq_len(self) -> int:
        """Number of cached positions (as seen by layer 0, which is updated first)."""
        return self._len[0]

    def update(self, layer: int, k, v):
        """Append k, v (B, n_kv, T, hd) for ``layer``; return all cached (B, n_kv, length, hd)."""
        k = k.data if isinstance(k, Tensor) else k
        v = v.data if isinstance(v, Tensor) else v
        B, H, T, D = k.shape
        start, end = self._len[layer], self._len[layer] + T
        buf_k = self._k[layer]
        if buf_k is None or buf_k.shape[2] < end:
            xpmod = backend.get_xp(k)
            cap = max(end, self.capacity if buf_k is None else 2 * buf_k.shape[2])
            new_k = xpmod.empty((B, H, cap, D), dtype=k.dtype)
            new_v = xpmod.empty((B, H, cap, D), dtype=v.dtype)
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = self._v[layer][:, :, :start]
            self._k[layer], self._v[layer] = new_k, new_v
        self._k[layer][:, :, start:end] = k
        self._v[layer][:, :, start:end] = v
        self._len[layer] = end
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]


# ---------------------------------------------------------------- choosing the next token
def top_k_filter(logits, top_k: int) -> np.ndarray:
    """``logits`` (B, V) with all but the ``top_k`` largest of each row set to -inf (ties with the
    k-th largest are kept, as transformers' TopKLogitsWarper keeps them)."""
    check_sampling(1.0, top_k, None)
    z = np.asarray(logits)
    k = min(int(top_k), z.shape[-1])
    kth = np.partition(z, -k, axis=-1)[:, -k][:, None]               # (B, 1) k-th largest logit
    return np.where(z < kth, -np.inf, z)


def top_p_filter(logits, top_p: float) -> np.ndarray:
    """Nucleus filter (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability mass is at least ``top_p``, set the rest of each row of ``logits`` (B, V) to -inf.

    As transformers' TopPLogitsWarper: sort each row's probabilities ascending, drop the tokens
    whose cumulative mass is <= 1 - top_p, and always keep the most likely token."""
    check_sampling(1.0, None, top_p)
    z = np.asarray(logits)
    order = np.argsort(z, axis=-1, kind="stable")                     # (B, V) ascending
    sorted_z = np.take_along_axis(z, order, axis=-1)
    p = np.exp(sorted_z - sorted_z[:, -1:])                           # largest last, exp(0) = 1
    cum = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)       # (B, V) ascending mass
    drop_sorted = cum <= 1.0 - top_p
    drop_sorted[:, -1] = False                                        # at least one token
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)              # back to vocabulary order
    return np.where(drop, -np.inf, z)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError, in one line, for a sampling argument out of its range."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; "
                         "use do_sample=False for greedy decoding")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}; 1.0 keeps every token")


def sample_next_token(logits, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Next token ids (B,) from last-position logits (B, V): argmax, or a draw from
    softmax(logits / temperature) after ``top_k_filter`` and then ``top_p_filter`` (transformers'
    order). Host NumPy, float64."""
    z = backend.to_numpy(logits).astype(np.float64)                 # (B, V)
    if not do_sample:
        return z.argmax(axis=-1)
    check_sampling(temperature, top_k, top_p)
    z = z / temperature
    if top_k is not None:
        z = top_k_filter(z, top_k)
    if top_p is not None and top_p != 1.0:      # 1.0 keeps everything (checked like any other)
        z = top_p_filter(z, top_p)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)                                     # (B, V) unnormalised CDF
    u = (rng if rng is not None else backend.rng()).random(z.shape[0])[:, None] * cdf[:, -1:]
    # inverse-CDF draw: the first index whose cumulative mass exceeds u (never a -inf token,
    # whose zero mass leaves the CDF flat, so u cannot land on it)
    return np.minimum((cdf <= u).sum(axis=-1), z.shape[-1] - 1)


# ---------------------------------------------------------------- one step: reference or twin
def decode_arrays(model) -> fast_decode.DecodeArrays | None:
    """The model's weights as ``fast.decode.DecodeArrays`` (references, no copies) when the fast
    decode step can stand in for its forward: a plain Llama (every projection and the head a plain
    ``nn.Linear`` without bias, the norms ``nn.RMSNorm``) with NumPy arrays, outside
    ``minilora.reference()``. None otherwise (a LoRA-wrapped or 4-bit Linear, a GPU, another
    model): its own forward then runs every step."""
    if settings.reference_mode():
        return None
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    head = getattr(model, "lm_head", None)
    if layers is None or head is None or not hasattr(inner, "embed_tokens"):
        return None

    def plain(mod):
        return type(mod) is nn.Linear and mod.bias is None and isinstance(mod.weight.data, np.ndarray)

    out = []
    for layer in layers:
        at, mlp = layer.self_attn, layer.mlp
        projections = (at.q_proj, at.k_proj, at.v_proj, at.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(plain(p) for p in projections) or \
                not all(type(n) is nn.RMSNorm for n in norms):
            return None
        out.append(fast_decode.LayerArrays(
            layer.input_layernorm.weight.data, at.q_proj.weight.data, at.k_proj.weight.data,
            at.v_proj.weight.data, at.o_proj.weight.data, layer.post_attention_layernorm.weight.data,
            mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data))
    embed = inner.embed_tokens.weight.data
    if not plain(head) or type(inner.norm) is not nn.RMSNorm or not isinstance(embed, np.ndarray):
        return None
    if len({layer.input_layernorm.eps for layer in layers} | {inner.norm.eps}) != 1:
        return None
    at0 = layers[0].self_attn
    return fast_decode.DecodeArrays(embed, out, inner.norm.weight.data, head.weight.data,
                                    at0.num_heads, at0.num_kv_heads, at0.head_dim, inner.norm.eps)


def _step_function(model):
    """step(ids (B, t) host ints, cache) -> last-position logits (B, V) on the host.

    The reference: the model's forward. A one-token step with a cache goes to the fast twin when
    ``decode_arrays`` finds the model plain (prompts and window restarts, t > 1, use the forward)."""
    arrays = decode_arrays(model)

    def step(ids, cache):
        if arrays is not None and cache is not None and ids.shape[1] == 1:
            cos, sin = model.model.rotary(1, cache.seq_len, np, arrays.embed.dtype)  # (1, D) each
            return fast_decode.decode_step(arrays, ids[:, 0], cache, cos[0], sin[0])
        logits = model(backend.to_device(ids), past_key_values=cache)           # (B, t, V)
        return backend.to_numpy(logits.data[:, -1, :])                           # (B, V)
    return step


# ---------------------------------------------------------------- the decoding loop
def _eos_ids(eos_token_id) -> np.ndarray | None:
    if eos_token_id is None:
        return None
    ids = np.atleast_1d(np.asarray(eos_token_id))
    if ids.size == 0 or ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return ids.astype(np.int64)


def stream_generate(model, input_ids, max_new_tokens: int, do_sample: bool = False,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    eos_token_id=None, seed: int | None = None, use_cache: bool = True,
                    pad_token_id: int | None = None):
    """Yield the new token ids of each step as soon as they are chosen: an int for a 1-D prompt
    (T,), a host int64 array (B,) for a batch (B, T).

    ``model(ids, past_key_values=cache)`` must return logits (B, T, V) (``LlamaForCausalLM`` does).
    Greedy by default; ``do_sample=True`` draws from softmax(logits / temperature) after the
    ``top_k`` and ``top_p`` filters (``sample_next_token``). ``eos_token_id`` is an id or a list of
    ids (a chat model's end-of-turn as well as its end-of-text): a row that produced one of them is
    filled with ``pad_token_id`` (default: the first eos id) afterwards, and the stream ends when
    every row has (the eos token itself is yielded). ``seed`` fixes the draws (default: minilora's
    generator). The model is in eval mode from the first step until the stream ends or is closed.

    The model attends to at most ``config.max_position_embeddings`` tokens (the context it was
    trained on): a longer prompt is cut to its end, and when the cache fills up it is rebuilt from
    the most recent half window (without a cache, the last full window is fed at every step).
    """
    ids = backend.to_numpy(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
    ids = np.asarray(ids)
    single = ids.ndim == 1
    if single:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be a non-empty (batch, seq) integer array, got shape "
                         f"{ids.shape} dtype {ids.dtype}; encode the prompt with the tokenizer first")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample:
        check_sampling(temperature, top_k, top_p)       # before the first (slow) forward
    eos = _eos_ids(eos_token_id)
    rng = np.random.default_rng(seed) if seed is not None else backend.rng()
    fill = (int(eos[0]) if eos is not None else None) if pad_token_id is None else pad_token_id
    ids = ids.astype(np.int64)
    window = getattr(model.config, "max_position_embeddings", None) or None
    finished = np.zeros(ids.shape[0], dtype=bool)
    step = _step_function(model)

    def new_cache():
        cap = min(ids.shape[1] + max_new_tokens, window or ids.shape[1] + max_new_tokens)
        return KVCache(model.config.num_hidden_layers, capacity=cap) if use_cache else None

    if max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()
    try:
        cache = new_cache()
        seq = ids                                            # (B, T + steps so far), for restarts
        step_input = ids if window is None else ids[:, -window:]
        for _ in range(max_new_tokens):
            with no_grad():                                  # only around the model: between
                logits = step(step_input, cache)             # yields the caller's grad mode holds
            nxt = sample_next_token(logits, do_sample, temperature, top_k, top_p, rng)
            if eos is not None:
                nxt = np.where(finished, fill, nxt)
                finished |= np.isin(nxt, eos)
            nxt = nxt.astype(np.int64)
            yield int(nxt[0]) if single else nxt
            if eos is not None and finished.all():
                break
            seq = np.concatenate([seq, nxt[:, None]], axis=1)
            if not use_cache:
                step_input = seq if window is None else seq[:, -window:]
            elif window is not None and cache.seq_len + 1 > window:
                # the context is full: restart the cache from the most recent half window
                # (positions beyond the trained length would make RoPE extrapolate)
                cache = new_cache()
                step_input = seq[:, -(window // 2):]
            else:
                step_input = nxt[:, None]
    finally:
        model.train(was_training)


def generate(model, input_ids, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id=None, seed: int | None = None, use_cache: bool = True,
             pad_token_id: int | None = None):
    """Continue each prompt of ``input_ids`` (B, T) (or one prompt (T,)) by up to
    ``max_new_tokens`` tokens: everything ``stream_generate`` yields, after the prompt.

    Returns a host int64 array (B, T + n), as transformers' ``generate``; see ``stream_generate``
    for the arguments, eos and padding, and the context window."""
    ids = backend.to_numpy(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
    ids = np.asarray(ids)
    ids = ids[None, :] if ids.ndim == 1 else ids
    new = [t[:, None] for t in stream_generate(
        model, ids, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_token_id=eos_token_id, seed=seed, use_cache=use_cache,
        pad_token_id=pad_token_id)]
    return np.concatenate([ids.astype(np.int64)] + new, axis=1)
