"""(IA)³ (Liu et al., 2022): learned vectors that rescale a frozen model's activations, as PEFT's.

The layer (a fresh adapter is the base exactly; merged = unmerged up to float32 rounding; unmerge
undoes merge), training (only ia3_l moves, the loss falls), the model API (switch, disable, delete,
unload, the 4-bit base), the files (PEFT's keys and JSON; damaged files refused in one line) and
parity with PEFT both ways (``interop``: logits to 1e-5, the same trainable count).
"""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from _lora_toy import ToyLM
from _tiny_llama import ids_of, model_of
from minilora import Tensor, backend
from minilora.lora import AdapterError, IA3Config, LoraConfig, PeftModel, get_peft_model
from minilora.lora.ia3 import IA3Linear, IA3Model, ia3_merged_weight
from minilora.nn import Linear
from minilora.optim import AdamW

try:   # PEFT's side: its helpers build the same Llama in transformers (skipped without torch/peft)
    import test_peft_interop as interop
    from test_peft_interop import base_dir  # noqa: F401  (the fixture: a saved base both sides load)
except pytest.skip.Exception:
    interop = None

EPS32 = float(np.finfo(np.float32).eps)


def random_vectors(peft_model, low=0.5, high=1.5, seed=0):
    """Give every ia3_l entries in [low, high) (a trained-looking adapter, no entry near zero)."""
    rng = np.random.default_rng(seed)
    for _, layer in peft_model.adapter_layers():
        for name in layer.ia3_l:
            p = layer.ia3_l[name]
            p.data = rng.uniform(low, high, p.shape).astype(p.data.dtype)


# ------------------------------------------------------------------ the layer and its formula
def test_fresh_adapter_is_the_base_exactly():
    ids = ids_of()
    want = model_of()(ids).numpy()
    model = get_peft_model(model_of(), IA3Config())
    assert np.array_equal(model(ids).numpy(), want)


def test_names_shapes_and_defaults_are_peft_s():
    model = get_peft_model(model_of(), IA3Config())
    assert isinstance(model.base_model, IA3Model)
    params = dict(model.named_parameters())
    k = "base_model.model.model.layers.0.self_attn.k_proj"
    down = "base_model.model.model.layers.0.mlp.down_proj"
    assert params[f"{k}.ia3_l.default"].shape == (16, 1)          # (out_features, 1): output scaled
    assert params[f"{down}.ia3_l.default"].shape == (1, 40)       # (1, in_features): input scaled
    assert not params[f"{k}.base_layer.weight"].requires_grad
    trained = sorted(n for n, p in params.items() if p.requires_grad)
    assert trained == sorted(f"base_model.model.model.layers.{i}.{m}.ia3_l.default" for i in (0, 1)
                             for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"))
    config = model.peft_config["default"]
    assert config.target_modules == ["k_proj", "v_proj", "down_proj"]
    assert config.feedforward_modules == ["down_proj"]


def _float32_bound(W, x, l, b, feedforward):
    """|merged - unmerged| bound: each side rounds a length-n dot product (γ_n ≤ n·eps/2 of the sum
    of |terms|) plus one product by l and the bias add; the difference is at most twice that."""
    n = W.shape[1]
    W64, x64, l64 = (a.astype(np.float64) for a in (W, x, l))
    if feedforward:
        scale = np.abs(x64 * l64.reshape(-1)) @ np.abs(W64).T                # (N, out)
    else:
        scale = (np.abs(x64) @ np.abs(W64).T + np.abs(b)) * np.abs(l64.reshape(-1))
    return 2 * (n + 3) * EPS32 * scale + 1e-30


@given(st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans(), st.integers(0, 10**6))
def test_merged_equals_unmerged_and_unmerge_undoes_merge(n_in, n_out, feedforward, bias, seed):
    rng = np.random.default_rng(seed)
    backend.manual_seed(seed)
    base = Linear(n_in, n_out, bias=bias)
    W0 = base.weight.data.copy()
    b0 = base.bias.data.copy() if bias else np.zeros(n_out, np.float32)
    layer = IA3Linear(base, "toy", is_feedforward=feedforward)
    layer.update_layer("default")
    layer.set_adapter("default")
    l = (rng.uniform(0.25, 4.0, layer.ia3_l["default"].shape) *
         rng.choice([-1, 1], layer.ia3_l["default"].shape)).astype(np.float32)
    layer.ia3_l["default"].data = l
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    unmerged = layer(Tensor(x)).numpy()
    layer.merge()
    merged = layer(Tensor(x)).numpy()
    assert np.all(np.abs(merged - unmerged) <= _float32_bound(W0, x, l, b0, feedforward))
    layer.unmerge()
    # W·l rounds once (eps/2), the division once (eps/2), and PEFT's +1e-8 shifts l by 1e-8/|l|
    tol = 2 * EPS32 + 1e-8 / np.abs(l)
    assert np.all(np.abs(base.weight.data - W0) <= np.abs(W0) * tol)
    if bias and not feedforward:
        assert np.all(np.abs(base.bias.data - b0) <= np.abs(b0) * tol.reshape(-1))


def test_merged_weight_scales_rows_or_columns():
    W = np.arange(6, dtype=np.float32).reshape(2, 3) + 1           # (out=2, in=3)
    rows = np.array([[2.0], [3.0]], np.float32)                    # (out, 1)
    cols = np.array([[2.0, 3.0, 4.0]], np.float32)                 # (1, in)
    assert np.array_equal(ia3_merged_weight(W, rows), np.diag([2.0, 3.0]) @ W)
    assert np.array_equal(ia3_merged_weight(W, cols), W @ np.diag([2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="safe_merge refused"):
        ia3_merged_weight(W, rows * np.inf, safe_merge=True)


def test_bias_is_scaled_with_the_output_when_merged():
    model = get_peft_model(ToyLM(bias=True), IA3Config(target_modules=["q_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"]))
    random_vectors(model)
    ids = np.random.default_rng(1).integers(0, 20, (2, 5))
    want = model(ids).numpy()
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is Linear
    np.testing.assert_allclose(merged(ids).numpy(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ training
def test_training_moves_only_ia3_l_and_lowers_the_loss():
    model = get_peft_model(model_of(), IA3Config())
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    ids = ids_of(B=4, T=12)
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses
    for n, p in model.named_parameters():
        changed = not np.array_equal(p.data, before[n])
        assert changed == n.endswith(".ia3_l.default"), n


# ------------------------------------------------------------------ the model API
def test_switch_disable_delete_and_unload():
    ids = ids_of()
    base_out = model_of()(ids).numpy()
    model = get_peft_model(model_of(), IA3Config(init_ia3_weights=False))
    first = model(ids).numpy()
    model.add_adapter("other", IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    model.set_adapter("other")           # still ones: the base again
    assert np.array_equal(model(ids).numpy(), base_out)
    assert all(p.requires_grad == n.endswith("ia3_l.other") for n, p in model.named_parameters())
    model.set_adapter("default")
    with model.disable_adapter():
        assert np.array_equal(model(ids).numpy(), base_out)
    assert np.array_equal(model(ids).numpy(), first)
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    plain = model.unload()
    assert not any(isinstance(m, IA3Linear) for m in plain.modules())
    assert np.array_equal(plain(ids).numpy(), base_out)


def test_lora_and_ia3_never_share_a_model():
    ia3 = get_peft_model(model_of(), IA3Config())
    with pytest.raises(ValueError, match="holds \\(IA\\)³ adapters and cannot take a LoRA one"):
        ia3.add_adapter("lora", LoraConfig())
    lora = get_peft_model(model_of(), LoraConfig())
    with pytest.raises(ValueError, match="holds LoRA adapters and cannot take a \\(IA\\)³ one"):
        lora.add_adapter("ia3", IA3Config())
    with pytest.raises(ValueError, match="combines LoRA adapters"):
        ia3.add_weighted_adapter(["default"], [1.0], "mix")


@pytest.mark.parametrize("kw, match", [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "subset of target_modules"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out=False"),
    (dict(init_ia3_weights="false"), "expected true or false"),
    (dict(feedforward_modules=[3]), "IA3Config: feedforward_modules must be"),
])
def test_bad_configs_are_refused_in_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        IA3Config(**kw)
    assert "\n" not in str(e.value)


def test_exclude_modules_and_regex_targets():
    model = get_peft_model(model_of(), IA3Config(target_modules=r".*\.(k_proj|down_proj)",
                                                 feedforward_modules=r".*down_proj",
                                                 exclude_modules=["layers.1.mlp.down_proj"]))
    names = {n for n, _ in model.adapter_layers()}
    assert names == {"model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj",
                     "model.layers.0.mlp.down_proj"}
    assert model.base_model.model.model.layers[0].mlp.down_proj.is_feedforward


def test_4bit_base_forward_and_merge():
    ids = ids_of()
    model = get_peft_model(model_of(), IA3Config(), quantize="nf4")
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    assert type(layer.base_layer).__name__ == "NF4Linear"
    plain = model_of()
    from minilora.quant import quantize_model
    quantize_model(plain, skip_modules=("lm_head",))
    assert np.array_equal(model(ids).numpy(), plain(ids).numpy())     # fresh: the 4-bit base exactly
    random_vectors(model)
    want = model(ids).numpy()
    merged = model.merge_and_unload()        # dequantized, scaled in float32: no second rounding
    np.testing.assert_allclose(merged(ids).numpy(), want, rtol=1e-5, atol=1e-5)
    again = get_peft_model(model_of(), IA3Config(init_ia3_weights=False), quantize="nf4")
    again.merge_adapter()                    # into the 4-bit weights: re-quantized, as LoRA's merge
    assert again.base_model.model.model.layers[0].self_attn.k_proj.requantization_error is not None


# ------------------------------------------------------------------ files
def test_save_load_round_trip_with_peft_s_keys_and_json(tmp_path):
    ids = ids_of()
    model = get_peft_model(model_of(), IA3Config(modules_to_save=["lm_head"]))
    random_vectors(model)
    want = model(ids).numpy()
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.k_proj.ia3_l" in keys
    assert "base_model.model.lm_head.weight" in keys and len(keys) == 7
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["inference_mode"] is True
    assert set(config) == {"auto_mapping", "base_model_name_or_path", "exclude_modules",
                           "fan_in_fan_out", "feedforward_modules", "inference_mode",
                           "init_ia3_weights", "modules_to_save", "peft_type", "revision",
                           "target_modules", "task_type"}   # PEFT's, less peft_version (as LoRA's)
    loaded = PeftModel.from_pretrained(model_of(), tmp_path)
    assert np.array_equal(loaded(ids).numpy(), want)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    assert IA3Config.from_dict(IA3Config().to_dict()) == IA3Config()


def _saved(tmp_path):
    get_peft_model(model_of(), IA3Config()).save_pretrained(tmp_path)
    return tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _edit_tensors(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("damage, match", [
    (lambda c, w: _edit_json(c, peft_type="PREFIX_TUNING"), "peft_type 'PREFIX_TUNING'"),
    (lambda c, w: _edit_json(c, fan_in_fan_out=True), "fan_in_fan_out"),
    (lambda c, w: _edit_json(c, ia3_rank=4), "peft_type .IA3. has keys an \\(IA\\)³ config does not"),
    (lambda c, w: _edit_tensors(w, lambda t: t.update(
        {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": np.ones((1, 16), np.float32)})),
     "has shape \\(1, 16\\).*needs \\(16, 1\\)"),
    (lambda c, w: _edit_tensors(w, lambda t: t.update(
        {"base_model.model.model.layers.0.self_attn.q_proj.ia3_l": np.ones((32, 1), np.float32)})),
     "module 'model.layers.0.self_attn.q_proj' is not targeted"),
    (lambda c, w: _edit_tensors(w, lambda t: t.pop("base_model.model.model.layers.1.mlp.down_proj.ia3_l")),
     "has no weight 'base_model.model.model.layers.1.mlp.down_proj.ia3_l'"),
])
def test_bad_files_are_one_line_adapter_errors(tmp_path, damage, match):
    config, weights = _saved(tmp_path)
    damage(config, weights)
    model = model_of()
    with pytest.raises(AdapterError, match=match) as e:
        PeftModel.from_pretrained(model, tmp_path)
    assert "\n" not in str(e.value)
    assert not any(isinstance(m, IA3Linear) for m in model.modules())   # refused before any change


def test_an_ia3_file_does_not_load_into_a_lora_model(tmp_path):
    _saved(tmp_path)
    lora = get_peft_model(model_of(), LoraConfig())
    with pytest.raises(AdapterError, match="cannot take a \\(IA\\)³ one"):
        lora.load_adapter(tmp_path, "ia3")


# ------------------------------------------------------------------ parity with PEFT
needs_peft = pytest.mark.skipif(interop is None, reason="interop needs torch, transformers and peft")
hf_warnings = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.mark.interop
@needs_peft
@hf_warnings
@pytest.mark.parametrize("kw", [dict(), dict(target_modules="all-linear")])
def test_minilora_ia3_adapter_loads_in_peft(base_dir, tmp_path, kw):  # noqa: F811
    model = get_peft_model(interop.mini_base(base_dir), IA3Config(**kw))
    ids = interop.IDS
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):                       # trained here: the vectors move away from ones
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    want = interop.mini_logits(model)
    model.save_pretrained(tmp_path)
    hf = interop.peft.PeftModel.from_pretrained(interop.hf_base(base_dir), str(tmp_path)).eval()
    assert type(hf.base_model).__name__ == "IA3Model"
    got = interop.hf_logits(hf)
    interop.assert_close(got, want)
    assert np.abs(got - interop.hf_logits(interop.hf_base(base_dir))).max() > 1e-3
    hf.merge_adapter()
    model.merge_adapter()
    interop.assert_close(interop.hf_logits(hf), interop.mini_logits(model))


@pytest.mark.interop
@needs_peft
@hf_warnings
def test_peft_ia3_adapter_loads_in_minilora_with_the_same_trainable_count(base_dir, tmp_path):  # noqa: F811
    torch, peft = interop.torch, interop.peft
    torch.manual_seed(0)
    hf = peft.get_peft_model(interop.hf_base(base_dir), peft.IA3Config(
        task_type="CAUSAL_LM", init_ia3_weights=False,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        feedforward_modules=["down_proj"])).eval()
    want = interop.hf_logits(hf)
    hf.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = IA3Config(**{k: saved[k] for k in ("target_modules", "feedforward_modules")}).to_dict()
    assert set(ours) == set(saved) - {"peft_version"}
    model = PeftModel.from_pretrained(interop.mini_base(base_dir), tmp_path)
    interop.assert_close(interop.mini_logits(model), want)
    hf_train = peft.PeftModel.from_pretrained(interop.hf_base(base_dir), str(tmp_path), is_trainable=True)
    mini_train = PeftModel.from_pretrained(interop.mini_base(base_dir), tmp_path, is_trainable=True)
    assert mini_train.get_nb_trainable_parameters() == hf_train.get_nb_trainable_parameters()
    fresh = get_peft_model(interop.mini_base(base_dir), IA3Config())
    hf_fresh = peft.get_peft_model(interop.hf_base(base_dir), peft.IA3Config(task_type="CAUSAL_LM"))
    assert fresh.get_nb_trainable_parameters() == hf_fresh.get_nb_trainable_parameters()


def test_math_md_quotes_the_shipped_base_s_trainable_counts():
    from pathlib import Path

    from minilora.models import BASE_MODEL_DIR, LlamaForCausalLM
    text = (Path(__file__).resolve().parents[1] / "docs" / "math.md").read_text(encoding="utf-8")
    ia3 = get_peft_model(LlamaForCausalLM.from_pretrained(BASE_MODEL_DIR), IA3Config())
    lora = get_peft_model(LlamaForCausalLM.from_pretrained(BASE_MODEL_DIR), LoraConfig(r=1))
    assert f"{ia3.get_nb_trainable_parameters()[0]:,d} for the shipped base" in text
    assert f"against {lora.get_nb_trainable_parameters()[0]:,d} for LoRA with $r = 1$" in text
