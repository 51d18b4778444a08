"""Adapter files: PEFT's names and layout, round trips, and one clear error per way a file can be wrong."""
import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minilora.lora import LoraConfig, PeftModel, get_peft_model
from minilora.lora.io import adapter_size_bytes, get_peft_model_state_dict
from minilora.models import LlamaConfig, LlamaForCausalLM

TINY = dict(vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def llama(seed=0, **kw):
    from minilora import backend
    backend.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **kw}))


def ids(B=2, T=7):
    return np.random.default_rng(3).integers(0, 259, size=(B, T))


def trained(config=None, seed=0):
    """A PeftModel whose B factors are nonzero (as after training)."""
    return get_peft_model(llama(seed), config or LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules=["q_proj", "v_proj", "down_proj"]))


def test_save_writes_peft_files_and_keys(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["inference_mode"] is True
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in tensors
    assert len(tensors) == 2 * 3 * 2
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp files left behind
    assert adapter_size_bytes(tmp_path) == sum(f.stat().st_size for f in tmp_path.iterdir())


def test_round_trip_same_logits_and_not_trainable_by_default(tmp_path):
    model = trained()
    x = ids()
    want = model(x).numpy()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(0), tmp_path)
    assert np.array_equal(loaded(x).numpy(), want)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    again = PeftModel.from_pretrained(llama(0), tmp_path, is_trainable=True)
    assert again.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_loading_for_inference_switches_to_eval_mode_as_peft(tmp_path):
    """An adapter loaded for inference (is_trainable=False) leaves the model in eval mode, as PEFT's
    load_adapter does: dropout off, and mixed-adapter batches allowed; loaded to train, the mode is
    left as it was."""
    trained(LoraConfig(r=2, lora_dropout=0.5, init_lora_weights=False)).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(0).train(), tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    x = ids()
    assert np.array_equal(loaded(x).numpy(), loaded(x).numpy())     # no dropout mask drawn
    assert PeftModel.from_pretrained(llama(0).train(), tmp_path, is_trainable=True).training
    loaded.train()
    loaded.load_adapter(tmp_path, adapter_name="second")
    assert not loaded.training


def test_second_adapter_in_subfolder_and_load_adapter(tmp_path):
    model = trained()
    model.add_adapter("mlp", LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "mlp" / "adapter_model.safetensors").is_file()
    x = ids()
    model.set_adapter("mlp")
    want_mlp = model(x).numpy()
    fresh = PeftModel.from_pretrained(llama(0), tmp_path)
    fresh.load_adapter(tmp_path / "mlp", adapter_name="mlp")
    assert fresh.active_adapter == "default"
    fresh.set_adapter("mlp")
    assert np.array_equal(fresh(x).numpy(), want_mlp)
    assert set(get_peft_model_state_dict(fresh, "mlp")) == {
        f"base_model.model.model.layers.{i}.mlp.up_proj.lora_{f}.weight" for i in (0, 1) for f in "AB"}


def test_modules_to_save_key(tmp_path):
    model = trained(LoraConfig(r=2, modules_to_save=["lm_head"], init_lora_weights=False))
    model.base_model.model.lm_head.modules_to_save["default"].weight.data += 0.5
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.lm_head.weight"].shape == (259, 32)
    x = ids()
    loaded = PeftModel.from_pretrained(llama(0), tmp_path)
    assert np.array_equal(loaded(x).numpy(), model(x).numpy())


# ------------------------------------------------------------------ errors: one line, names the fix
def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_missing_dir_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        PeftModel.from_pretrained(llama(), tmp_path / "nope")
    assert "does not exist" in _one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        PeftModel.from_pretrained(llama(), tmp_path)
    assert "adapter_config.json" in _one_line(e)
    trained().save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(llama(), tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickle"):
        PeftModel.from_pretrained(llama(), tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    trained().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100] if damage == "truncate" else b"\x10\x00" + raw[2:40])
    base = llama()
    with pytest.raises(ValueError) as e:
        PeftModel.from_pretrained(base, tmp_path)
    assert "safetensors" in _one_line(e)
    assert not any("lora" in n for n, _ in base.named_parameters())  # the model was not touched


def test_not_lora_config(tmp_path):
    trained().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        PeftModel.from_pretrained(llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftModel.from_pretrained(llama(), tmp_path)


def test_shape_mismatch_names_module_and_sizes(tmp_path):
    trained().save_pretrained(tmp_path)
    other = llama(hidden_size=64, intermediate_size=96)
    with pytest.raises(ValueError) as e:
        PeftModel.from_pretrained(other, tmp_path)
    msg = _one_line(e)
    assert re.fullmatch(r"\S+adapter_model\.safetensors: shape of lora_A for model\.layers\.0\.\S+ "
                        r"is \(4, (32|48)\) but the base "
                        r"layer has in_features (64|96); .*", msg)
    assert not any("lora" in n for n, _ in other.named_parameters())


def test_rank_mismatch_between_config_and_weights(tmp_path):
    trained().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has rank 4 but adapter_config.json says r=8"):
        PeftModel.from_pretrained(llama(), tmp_path)


def test_missing_and_unexpected_keys(tmp_path):
    trained().save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, path)
    with pytest.raises(ValueError) as e:
        PeftModel.from_pretrained(llama(), tmp_path)
    assert key in _one_line(e) and "has no weight" in str(e.value)
    extra = dict(tensors)
    extra["base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 32), np.float32)
    save_file(extra, path)
    with pytest.raises(ValueError) as e:
        PeftModel.from_pretrained(llama(), tmp_path)
    assert "model.layers.5.self_attn.q_proj" in _one_line(e)


def test_load_adapter_name_clash_and_save_after_unload(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already exists"):
        model.load_adapter(tmp_path, adapter_name="default")
    model.merge_and_unload()
    with pytest.raises(ValueError, match="no adapters left"):
        model.save_pretrained(tmp_path / "x")


def test_float16_adapter_file_loads_as_float32(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    save_file({k: v.astype(np.float16) for k, v in load_file(path).items()}, path)
    loaded = PeftModel.from_pretrained(llama(0), tmp_path)
    layer = dict(loaded.lora_layers())["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["default"].weight.dtype == np.float32
    x = ids()
    assert np.abs(loaded(x).numpy() - model(x).numpy()).max() < 1e-2
