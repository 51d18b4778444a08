"""LlamaConfig's RoPE settings: both config.json formats, the three RoPE types, and refusals.

Unit tests (no oracle): the 4.x (rope_theta + rope_scaling) and 5.x (rope_parameters) dicts give
the same config; to_dict -> from_dict is the identity; every unsupported setting is refused in one
line; the scaled frequencies obey their definitions. Interop tests: random small transformers
models of each RoPE type, saved by transformers in either format, load here with transformers'
inverse frequencies bit for bit and its logits; what minilora saves loads in transformers with the
same RoPE.
"""
import json

import numpy as np
import pytest

from minilora import backend
from minilora.models import LlamaConfig, LlamaForCausalLM, rope_inverse_frequencies
from minilora.models.hf_io import CheckpointError

BASE = dict(vocab_size=50, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
# head_dim 16: wavelengths 2·pi·theta^(2i/16) = 6.3, 19.9, 62.8, 199, ... for theta = 10000; with
# original 64 positions, low_freq_factor 1 and high_freq_factor 4, i = 0 is kept, i = 1, 2 are
# blended and i >= 3 divided by the factor: every branch of llama3 is exercised.
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def v4_dict(kind, theta=10000.0):
    """A transformers 4.x config.json: rope_theta at the top, rope_scaling beside it."""
    return {**BASE, "model_type": "llama", "rope_theta": theta, "rope_scaling": ROPES[kind]}


def v5_dict(kind, theta=10000.0):
    """A transformers 5.x config.json: one rope_parameters dict."""
    return {**BASE, "model_type": "llama",
            "rope_parameters": {"rope_theta": theta, "rope_type": "default", **(ROPES[kind] or {})}}


# ---------------------------------------------------------------- formats
@pytest.mark.parametrize("kind", list(ROPES))
def test_both_formats_give_the_same_config(kind):
    a, b = LlamaConfig.from_dict(v4_dict(kind, 5e5)), LlamaConfig.from_dict(v5_dict(kind, 5e5))
    assert a == b
    assert a.rope_theta == 5e5 and a.rope_scaling == ROPES[kind]


def test_rope_parameters_theta_is_not_ignored():
    # the bug this guards against: a 5.x config read as if rope_theta were the default 10000
    assert LlamaConfig.from_dict(v5_dict("default", 100000.0)).rope_theta == 100000.0


@pytest.mark.parametrize("kind", list(ROPES))
def test_to_dict_round_trips_and_writes_both_formats(kind):
    c = LlamaConfig(**BASE, rope_theta=12345.0, rope_scaling=ROPES[kind])
    d = json.loads(c.to_json_string())
    assert LlamaConfig.from_dict(d) == c
    assert d["rope_theta"] == 12345.0 and d["rope_scaling"] == ROPES[kind]
    assert d["rope_parameters"] == {"rope_theta": 12345.0, "rope_type": kind, **(ROPES[kind] or {})}


def test_old_type_key_and_llama3_defaults():
    c = LlamaConfig.from_dict({**BASE, "rope_scaling": {"type": "linear", "factor": 2}})
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    c = LlamaConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                          "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0}})
    assert c.rope_scaling["original_max_position_embeddings"] == BASE["max_position_embeddings"]


@pytest.mark.parametrize("extra, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "longrope"}}, "'longrope'"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"missing \['factor'\]"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}}, "unused"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "positive"),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}}, "different RoPE bases"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
      "rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 3.0}}, "disagree"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e4}}}, "one dict per layer type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "bias"),
    ({"mlp_bias": True}, "bias"),
    ({"head_dim": 32}, "head_dim"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_settings_that_change_the_math_are_refused(extra, message):
    with pytest.raises(ValueError, match=message) as e:
        LlamaConfig.from_dict({**BASE, **extra})
    assert "\n" not in str(e.value)


def test_a_refused_config_json_names_its_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(v4_dict("default") | {
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(CheckpointError, match="config.json: RoPE type 'yarn'"):
        LlamaForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------- the frequencies
def test_linear_divides_every_frequency_by_the_factor():
    plain = rope_inverse_frequencies(16, 10000.0)
    np.testing.assert_array_equal(rope_inverse_frequencies(16, 10000.0, ROPES["linear"]),
                                  plain / np.float32(4.0))


def test_llama3_keeps_high_divides_low_and_blends_between():
    plain = rope_inverse_frequencies(16, 10000.0)
    s = ROPES["llama3"]
    got = rope_inverse_frequencies(16, 10000.0, s)
    wavelen = 2 * np.pi / plain.astype(np.float64)
    high = wavelen < s["original_max_position_embeddings"] / s["high_freq_factor"]
    low = wavelen > s["original_max_position_embeddings"] / s["low_freq_factor"]
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_array_equal(got[high], plain[high])
    np.testing.assert_array_equal(got[low], plain[low] / np.float32(s["factor"]))
    mid = ~high & ~low      # strictly between the two: divided by something in (1, factor)
    assert np.all(got[mid] < plain[mid]) and np.all(got[mid] > plain[mid] / s["factor"])


def test_the_model_uses_the_configured_rope():
    backend.manual_seed(0)
    c = LlamaConfig(**BASE, rope_scaling=ROPES["llama3"])
    m = LlamaForCausalLM(c)
    np.testing.assert_array_equal(m.model.rotary.inv_freq,
                                  rope_inverse_frequencies(16, 10000.0, ROPES["llama3"]))


# ---------------------------------------------------------------- against transformers
def _transformers():
    pytest.importorskip("torch", reason="the interop extra is not installed: "
                        "pip install 'minilora[interop]'")
    return pytest.importorskip("transformers", reason="the interop extra is not installed: "
                               "pip install 'minilora[interop]'")


def hf_model(kind, theta, seed=0):
    import torch
    transformers = _transformers()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**BASE, rope_parameters={"rope_theta": theta,
                                                            "rope_type": "default",
                                                            **(ROPES[kind] or {})},
                                   attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


# Logits of these tiny random models are O(0.1-1); both libraries compute in float32 in different
# summation orders over K <= 64 terms, so they agree to a few float32 ulps of O(1) values (~1e-6);
# 1e-5 leaves room and still fails for a wrong RoPE (ignoring the scaling moves these logits by ~5e-3).
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.interop
@pytest.mark.parametrize("style", ["4.x", "5.x"])
@pytest.mark.parametrize("kind", list(ROPES))
def test_transformers_checkpoint_of_each_rope_loads_with_same_logits(tmp_path, kind, style):
    hf = hf_model(kind, theta=5000.0)
    hf.save_pretrained(tmp_path)
    if style == "4.x":        # rewrite config.json as transformers 4.x wrote it
        d = json.loads((tmp_path / "config.json").read_text())
        d.pop("rope_parameters")
        d.update(rope_theta=5000.0, rope_scaling=ROPES[kind])
        (tmp_path / "config.json").write_text(json.dumps(d))
        transformers = _transformers()
        reread = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
        np.testing.assert_array_equal(reread.model.rotary_emb.inv_freq.numpy(),
                                      hf.model.rotary_emb.inv_freq.numpy())
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_theta == 5000.0 and ours.config.rope_scaling == ROPES[kind]
    np.testing.assert_array_equal(ours.model.rotary.inv_freq, hf.model.rotary_emb.inv_freq.numpy())
    ids = np.random.default_rng(0).integers(0, 50, (2, 100))   # past original_max (64)
    np.testing.assert_allclose(ours(ids).numpy(), hf_logits(hf, ids), **TOL)


@pytest.mark.interop
@pytest.mark.parametrize("kind", list(ROPES))
def test_minilora_checkpoint_loads_in_transformers_with_same_rope(tmp_path, kind):
    transformers = _transformers()
    backend.manual_seed(2)
    ours = LlamaForCausalLM(LlamaConfig(**BASE, rope_theta=20000.0, rope_scaling=ROPES[kind]))
    ours.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.rope_parameters == {"rope_theta": 20000.0, "rope_type": kind,
                                         **(ROPES[kind] or {})}
    np.testing.assert_array_equal(hf.model.rotary_emb.inv_freq.numpy(), ours.model.rotary.inv_freq)
    ids = np.random.default_rng(1).integers(0, 50, (2, 90))
    np.testing.assert_allclose(hf_logits(hf, ids), ours(ids).numpy(), **TOL)
