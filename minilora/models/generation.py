"""Text generation for causal language models: a KV cache and the decoding loop.

Decoding one token at a time would recompute every earlier position's keys and values at each step;
the KV cache keeps them (per layer, after RoPE), so each new token costs one position's worth of
projections and one row of attention. ``generate`` does greedy decoding (argmax) or sampling with a
temperature and an optional top-k filter (Fan et al. 2018), stopping at ``eos_token_id``. It runs
under ``no_grad`` and in eval mode, for a batch of prompts of equal length.
"""
from __future__ import annotations

import numpy as np

from .. import backend
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


def sample_next_token(logits, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Next token ids (B,) from last-position logits (B, V): argmax, or a draw from
    softmax(logits / temperature) restricted to the ``top_k`` most likely tokens. Host NumPy."""
    z = backend.to_numpy(logits).astype(np.float64)                 # (B, V)
    if not do_sample:
        return z.argmax(axis=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; "
                         "use do_sample=False for greedy decoding")
    z = z / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(int(top_k), z.shape[-1])
        kth = np.partition(z, -k, axis=-1)[:, -k][:, None]          # (B, 1) k-th largest logit
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)                                     # (B, V) unnormalised CDF
    u = (rng if rng is not None else backend.rng()).random(z.shape[0])[:, None] * cdf[:, -1:]
    # inverse-CDF draw: the first index whose cumulative mass exceeds u (never a -inf token,
    # whose zero mass leaves the CDF flat, so u cannot land on it)
    return np.minimum((cdf <= u).sum(axis=-1), z.shape[-1] - 1)


def generate(model, input_ids, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, do_sample: bool = False, eos_token_id: int | None = None,
             seed: int | None = None, use_cache: bool = True, pad_token_id: int | None = None):
    """Continue each prompt of ``input_ids`` (B, T) by up to ``max_new_tokens`` tokens.

    ``model(ids, past_key_values=cache)`` must return logits (B, T, V) (``LlamaForCausalLM`` does).
    Returns a host int64 array (B, T + n): the prompts followed by what was generated. Once a row
    has produced ``eos_token_id`` it is filled with ``pad_token_id`` (default: the eos id); generation
    stops early when every row has. ``seed`` fixes the sampling draws (default: minilora's generator).

    The model attends to at most ``config.max_position_embeddings`` tokens (the context it was
    trained on): a longer prompt is cut to its end, and when the cache fills up it is rebuilt from
    the most recent half window (without a cache, the last full window is fed at every step).
    """
    ids = backend.to_numpy(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be a non-empty (batch, seq) integer array, got shape "
                         f"{ids.shape} dtype {ids.dtype}; encode the prompt with the tokenizer first")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    rng = np.random.default_rng(seed) if seed is not None else backend.rng()
    fill = eos_token_id if pad_token_id is None else pad_token_id
    ids = ids.astype(np.int64)
    window = getattr(model.config, "max_position_embeddings", None) or None
    out = [ids]
    finished = np.zeros(ids.shape[0], dtype=bool)
    was_training = model.training
    model.eval()

    def new_cache():
        cap = min(ids.shape[1] + max_new_tokens, window or ids.shape[1] + max_new_tokens)
        return KVCache(model.config.num_hidden_layers, capacity=cap) if use_cache else None

    try:
        with no_grad():
            cache = new_cache()
            step_input = ids if window is None else ids[:, -window:]
            for _ in range(max_new_tokens):
                logits = model(backend.to_device(step_input), past_key_values=cache)  # (B, t, V)
                nxt = sample_next_token(logits.data[:, -1, :], do_sample, temperature, top_k, rng)
                if eos_token_id is not None:
                    nxt = np.where(finished, fill, nxt)
                    finished |= nxt == eos_token_id
                out.append(nxt[:, None].astype(np.int64))
                if eos_token_id is not None and finished.all():
                    break
                if not use_cache:
                    seq = np.concatenate(out, axis=1)
                    step_input = seq if window is None else seq[:, -window:]
                elif window is not None and cache.seq_len + 1 > window:
                    # the context is full: restart the cache from the most recent half window
                    # (positions beyond the trained length would make RoPE extrapolate)
                    cache = new_cache()
                    step_input = np.concatenate(out, axis=1)[:, -(window // 2):]
                else:
                    step_input = out[-1]
    finally:
        model.train(was_training)
    return np.concatenate(out, axis=1)
