"""minilora's Llama against Hugging Face transformers: checkpoints move both ways with the same logits,
and one training step (loss, every gradient, the AdamW update) matches transformers + torch.

Tolerances: both compute in float32 with different summation orders; logits of these tiny models are
O(1) and agree to ~1e-6, checked at 1e-5. Gradients are compared relative to each tensor's largest
entry (1e-5 of it), since tiny entries carry cancellation noise of that absolute size.
"""
import json

import numpy as np
import pytest

from minilora.models import LlamaForCausalLM
from minilora.optim import AdamW

torch = pytest.importorskip("torch", reason="the interop extra (torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the interop extra is not installed")

pytestmark = pytest.mark.interop

HF_SMALL = dict(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=None, eos_token_id=None,
                pad_token_id=None)


def hf_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**HF_SMALL, **kw}, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


def ids_batch(B=2, T=11, V=67, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_checkpoint_gives_same_logits(tmp_path, tied):
    hf = hf_model(tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.config.tie_word_embeddings == tied
    ids = ids_batch()
    np.testing.assert_allclose(ours(ids).numpy(), hf_logits(hf, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_minilora_checkpoint_loads_in_transformers(tmp_path, tied):
    from minilora import backend
    from minilora.models import LlamaConfig
    backend.manual_seed(1)
    ours = LlamaForCausalLM(LlamaConfig(**{**HF_SMALL, "tie_word_embeddings": tied}))
    ours.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings == tied
    ids = ids_batch(seed=3)
    np.testing.assert_allclose(hf_logits(hf, ids), ours(ids).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_load(tmp_path, dtype):
    hf = hf_model(seed=2).to(getattr(torch, dtype))
    hf.save_pretrained(tmp_path)
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "model.safetensors").read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == \
        {"F16" if dtype == "float16" else "BF16"}
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert all(p.dtype == np.float32 for p in ours.parameters())
    ref = hf.float()                     # the same rounded weights, computed in float32
    for name, p in ref.named_parameters():
        np.testing.assert_array_equal(dict(ours.named_parameters())[name].data, p.detach().numpy())
    ids = ids_batch()
    np.testing.assert_allclose(ours(ids).numpy(), hf_logits(ref, ids), rtol=1e-5, atol=1e-5)


def test_one_training_step_matches_transformers(tmp_path):
    hf = hf_model(seed=4)
    hf.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    hf.train()
    ids = ids_batch(B=3, T=9, seed=5)
    labels = ids.copy()
    labels[0, :4] = -100                 # a masked prompt, as in instruction tuning
    labels[2, -2:] = -100
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    out = ours(ids, labels=labels)
    out.loss.backward()
    t_out = hf(input_ids=torch.tensor(ids), labels=torch.tensor(labels))
    t_out.loss.backward()
    assert out.loss.item() == pytest.approx(t_out.loss.item(), rel=1e-6)

    t_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        tg = t_params[name].grad.numpy()
        scale = np.abs(tg).max()
        np.testing.assert_allclose(p.grad, tg, rtol=1e-4, atol=1e-5 * scale, err_msg=name)

    AdamW(ours.parameters(), **kw).step()
    torch.optim.AdamW(hf.parameters(), **kw).step()
    for name, p in ours.named_parameters():
        tw = t_params[name].detach().numpy()
        np.testing.assert_allclose(p.data, tw, rtol=1e-5, atol=1e-6, err_msg=name)


def test_sharded_transformers_checkpoint_loads(tmp_path):
    hf = hf_model(seed=5)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")       # several model-0000k-of-0000n files
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = ids_batch(seed=6)
    np.testing.assert_allclose(ours(ids).numpy(), hf_logits(hf, ids), rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_with_a_missing_tensor_is_refused(tmp_path):
    from minilora.models import CheckpointError
    hf = hf_model(seed=5)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lists \['model.layers.9.mlp.up_proj.weight'\]"):
        LlamaForCausalLM.from_pretrained(tmp_path)
