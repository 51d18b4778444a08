"""The Llama model: names, init, forward and loss, replaceable projections, GQA, padding masks, the KV
cache and generation, checkpoint files and their errors, and the shipped base model."""
import json
import struct

import numpy as np
import pytest

from minilora import Tensor, nn
from minilora import functional as F
from minilora.models import (BASE_MODEL_DIR, CausalLMOutput, CheckpointError, KVCache,
                             LlamaForCausalLM, load_base_model, sample_next_token)

from _tiny_llama import ids_of, model_of  # noqa: E402


# ---------------------------------------------------------------- structure
def test_parameter_names_are_huggingface_names():
    m = model_of()
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
    expected = (["model.embed_tokens.weight"]
                + [f"model.layers.{i}.{n}" for i in range(2) for n in per_layer]
                + ["model.norm.weight", "lm_head.weight"])
    assert [n for n, _ in m.named_parameters()] == expected
    shapes = dict((n, p.shape) for n, p in m.named_parameters())
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 32)   # 2 KV heads x 8
    assert shapes["lm_head.weight"] == (61, 32)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(m.get_submodule(f"model.layers.1.self_attn.{name}"), nn.Linear)


def test_tied_head_shares_the_embedding():
    m = model_of(tie_word_embeddings=True)
    names = [n for n, _ in m.named_parameters()]
    assert "lm_head.weight" not in names
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_init_like_transformers():
    m = model_of(hidden_size=64, intermediate_size=128, pad_token_id=3, initializer_range=0.05)
    w = m.model.layers[0].mlp.up_proj.weight.data
    assert abs(w.std() - 0.05) < 0.005 and abs(w.mean()) < 0.005
    assert np.all(m.model.norm.weight.data == 1.0)
    assert np.all(m.model.embed_tokens.weight.data[3] == 0.0)
    assert all(p.dtype == np.float32 for p in m.parameters())


# ---------------------------------------------------------------- forward and loss
def test_forward_shapes_dtype_and_loss_shift():
    m = model_of()
    ids = ids_of()
    logits = m(ids)
    assert isinstance(logits, Tensor) and logits.shape == (2, 7, 61) and logits.dtype == np.float32
    labels = ids.copy()
    labels[0, 3] = -100
    out = m(ids, labels=labels)
    assert isinstance(out, CausalLMOutput)
    # the loss is the mean NLL of token t+1 given <= t, ignoring -100
    z = out.logits.data[:, :-1].astype(np.float64)
    t = labels[:, 1:]
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    valid = t != -100
    nll = -np.take_along_axis(logp, np.where(valid, t, 0)[..., None], -1)[..., 0]
    assert out.loss.item() == pytest.approx(nll[valid].mean(), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == np.float32 for p in m.parameters())


def test_bad_input_ids():
    m = model_of()
    with pytest.raises(ValueError, match="outside"):
        m(np.array([[1, 61]]))
    with pytest.raises(ValueError, match="integer"):
        m(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="labels shape"):
        m(ids_of(), labels=ids_of(T=5))


class ScaledBy(nn.Module):
    """Any module with forward(x) may replace a projection (as LoRA's wrapper does)."""

    def __init__(self, inner, scale):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.inner(x) * self.scale


def test_projections_replaceable_from_outside():
    m = model_of()
    ids = ids_of()
    base = m(ids).data
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        path = f"model.layers.0.self_attn.{name}"
        m.set_submodule(path, ScaledBy(m.get_submodule(path), 1.0))
    for name in ("gate_proj", "up_proj", "down_proj"):
        path = f"model.layers.1.mlp.{name}"
        m.set_submodule(path, ScaledBy(m.get_submodule(path), 1.0))
    np.testing.assert_allclose(m(ids).data, base, rtol=1e-6, atol=1e-6)
    m.set_submodule("model.layers.0.self_attn.v_proj",
                    ScaledBy(m.get_submodule("model.layers.0.self_attn.v_proj").inner, 2.0))
    assert not np.allclose(m(ids).data, base, atol=1e-4)
    assert "model.layers.0.self_attn.v_proj.inner.weight" in dict(m.named_parameters())


def test_frozen_model_only_trains_what_requires_grad():
    m = model_of()
    m.requires_grad_(False)
    m.model.layers[1].self_attn.q_proj.weight.requires_grad_(True)
    m(ids_of(), labels=ids_of()).loss.backward()
    with_grad = [n for n, p in m.named_parameters() if p.grad is not None]
    assert with_grad == ["model.layers.1.self_attn.q_proj.weight"]


def test_gqa_equals_repeated_kv_heads():
    """G KV heads shared by groups of query heads == MHA whose k/v weights repeat each head."""
    gqa = model_of(num_key_value_heads=2)
    mha = model_of(num_key_value_heads=4)
    sd = {k: v.copy() for k, v in gqa.state_dict().items()}
    D = 8
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            heads = sd[key].reshape(2, D, 32)                     # (G, D, C)
            sd[key] = np.repeat(heads, 2, axis=0).reshape(4 * D, 32)   # each KV head twice
    mha.load_state_dict(sd)
    ids = ids_of()
    np.testing.assert_allclose(gqa(ids).data, mha(ids).data, rtol=1e-5, atol=1e-5)


def test_attention_mask_left_and_right_padding():
    m = model_of()
    real = ids_of(B=1, T=5)
    ref = m(real).data[0]
    pad = 0
    right = np.concatenate([real, [[pad, pad]]], axis=1)
    out = m(right, attention_mask=np.array([[1] * 5 + [0] * 2])).data[0, :5]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    left = np.concatenate([[[pad, pad, pad]], real], axis=1)
    out = m(left, attention_mask=np.array([[0] * 3 + [1] * 5])).data[0, 3:]
    # RoPE is relative, so shifting every real token by 3 positions changes nothing
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert np.isfinite(m(left, attention_mask=np.array([[0] * 3 + [1] * 5])).data).all()
    with pytest.raises(ValueError, match="attention_mask"):
        m(left, attention_mask=np.ones((1, 3)))


# ---------------------------------------------------------------- cache and generation
def test_kv_cache_forward_equals_full_forward():
    m = model_of()
    ids = ids_of(T=9)
    full = m(ids).data
    cache = KVCache(m.config.num_hidden_layers, capacity=4)   # forces the buffers to grow
    part1 = m(ids[:, :5], past_key_values=cache).data
    part2 = m(ids[:, 5:8], past_key_values=cache).data
    part3 = m(ids[:, 8:], past_key_values=cache).data
    assert cache.seq_len == 9
    got = np.concatenate([part1, part2, part3], axis=1)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


def test_greedy_with_cache_equals_without_cache():
    m = model_of()
    prompt = ids_of(T=4)
    a = m.generate(prompt, max_new_tokens=12)
    b = m.generate(prompt, max_new_tokens=12, use_cache=False)
    assert a.shape == (2, 16)
    np.testing.assert_array_equal(a[:, :4], prompt)
    np.testing.assert_array_equal(a, b)
    assert m.training   # restored after generation


def test_generation_slides_its_window_past_the_context_length():
    m = model_of(max_position_embeddings=8)
    seen = []
    forward = m.forward

    def spy(ids, **kw):
        cache = kw.get("past_key_values")
        seen.append(ids.shape[1] + (cache.seq_len if cache is not None else 0))
        return forward(ids, **kw)
    m.forward = spy
    prompt = ids_of(B=1, T=11)                     # longer than the context already
    out = m.generate(prompt, max_new_tokens=20)
    assert out.shape == (1, 31) and max(seen) <= 8
    seen.clear()
    out2 = m.generate(prompt, max_new_tokens=20, use_cache=False)
    assert max(seen) <= 8
    # both see the same context until the cached one first restarts its window
    np.testing.assert_array_equal(out[:, :12], out2[:, :12])


def test_sampling_deterministic_with_seed_and_top_k1_is_greedy():
    m = model_of()
    prompt = ids_of(T=3)
    s1 = m.generate(prompt, 10, do_sample=True, temperature=1.5, seed=7)
    s2 = m.generate(prompt, 10, do_sample=True, temperature=1.5, seed=7)
    s3 = m.generate(prompt, 10, do_sample=True, temperature=1.5, seed=8)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, s3)
    np.testing.assert_array_equal(m.generate(prompt, 6, do_sample=True, top_k=1, seed=1),
                                  m.generate(prompt, 6))


def test_top_k_respects_k_and_temperature_sharpens():
    logits = np.log(np.array([[0.05, 0.3, 0.1, 0.25, 0.2, 0.1]] * 4000))
    rng = np.random.default_rng(0)
    draws = sample_next_token(logits, do_sample=True, top_k=3, rng=rng)
    assert set(np.unique(draws)) == {1, 3, 4}
    # within the top 3, frequencies follow the renormalised probabilities .3/.75, .25/.75, .2/.75
    freq = np.bincount(draws, minlength=6)[[1, 3, 4]] / len(draws)
    np.testing.assert_allclose(freq, [0.4, 1 / 3, 0.8 / 3], atol=0.03)
    cold = sample_next_token(logits, do_sample=True, temperature=0.05, rng=rng)
    assert (cold == 1).mean() > 0.95
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(logits, do_sample=True, top_k=0)


def test_generate_stops_at_eos_and_fills():
    m = model_of()
    prompt = ids_of(B=1, T=3)
    free = m.generate(prompt, 8)
    eos = int(free[0, 5])                   # the token greedy decoding produces at step 3
    out = m.generate(prompt, 8, eos_token_id=eos)
    assert out.shape[1] <= 3 + 8 and out[0, -1] == eos
    assert eos in out[0, 3:]
    with pytest.raises(ValueError, match="input_ids"):
        m.generate(np.zeros((1, 0), dtype=np.int64), 3)


# ---------------------------------------------------------------- files
def test_save_and_load_round_trip(tmp_path):
    m = model_of()
    m.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    m2 = LlamaForCausalLM.from_pretrained(tmp_path / "ck")
    assert m2.config == m.config
    ids = ids_of()
    np.testing.assert_array_equal(m2(ids).data, m(ids).data)
    m.save_pretrained(tmp_path / "half", dtype=np.float16)
    m3 = LlamaForCausalLM.from_pretrained(tmp_path / "half")
    assert m3.model.norm.weight.dtype == np.float32
    np.testing.assert_allclose(m3(ids).data, m(ids).data, atol=5e-3)
    assert not list((tmp_path / "ck").glob("*.tmp"))   # atomic writes leave no temp files


def test_tied_checkpoint_stores_embedding_once(tmp_path):
    from safetensors.numpy import load_file
    m = model_of(tie_word_embeddings=True)
    m.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    m2 = LlamaForCausalLM.from_pretrained(tmp_path)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    np.testing.assert_array_equal(m2(ids_of()).data, m(ids_of()).data)


def write_bf16_safetensors(path, tensors: dict):
    """A safetensors file with BF16 tensors, written by hand (NumPy has no bfloat16)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        bits = (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
        raw = bits.tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_bfloat16_checkpoint_loads(tmp_path):
    m = model_of()
    m.save_pretrained(tmp_path)
    write_bf16_safetensors(tmp_path / "model.safetensors", m.state_dict())
    m2 = LlamaForCausalLM.from_pretrained(tmp_path)
    w, w2 = m.lm_head.weight.data, m2.lm_head.weight.data
    assert w2.dtype == np.float32
    np.testing.assert_allclose(w2, w, rtol=2 ** -7)       # bf16 keeps 8 significant bits
    np.testing.assert_array_equal(w2.view(np.uint32) & 0xFFFF, 0)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlamaForCausalLM.from_pretrained(tmp_path / "nowhere")
    m = model_of()
    m.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight has shape"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="missing keys"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_to_device_cpu():
    m = model_of().to("cpu")
    assert m(ids_of()).device == "cpu"


# ---------------------------------------------------------------- the shipped base model
def test_base_model_loads_and_writes_printable_ascii():
    assert (BASE_MODEL_DIR / "model.safetensors").is_file(), "the base model asset is missing"
    assert (BASE_MODEL_DIR / "README.md").is_file()
    m = load_base_model()
    assert m.config.vocab_size == 259
    from minilora.data import ByteTokenizer
    tok = ByteTokenizer()
    prompt = np.array([tok.encode("Return the ")])
    out = m.generate(prompt, max_new_tokens=60)
    text = bytes(int(t) for t in out[0] if t < 256).decode("ascii", errors="replace")
    assert all(c.isprintable() or c in "\n\t" for c in text), text
    words = text.split()
    assert len(words) >= 8 and sum(w.isalpha() for w in words) >= len(words) // 2, text
