"""get_peft_model / PeftModel: injection, freezing, counting, merging, switching, combining adapters.

Uses a tiny model with Hugging Face Llama's module names (tests/_lora_toy.py); the real Llama is
exercised in test_lora_io.py, test_peft_interop.py and test_finetune.py.
"""
import re

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilora import Tensor, backend, nn
from minilora.lora import LoraConfig, LoraLinear, ModulesToSaveWrapper, PeftModel, get_peft_model
from minilora.lora.config import matches

from _lora_toy import ToyLM

EPS32 = float(np.finfo(np.float32).eps)


def ids(B=2, T=5, vocab=20, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T))


def logits(model, x):
    return model(x).numpy()


def wrapped(config=None, **kw):
    return get_peft_model(ToyLM(**kw), config or LoraConfig(r=4, lora_alpha=8))


# ------------------------------------------------------------------ config
def test_config_validation_errors():
    for bad, pattern in [(dict(r=0), "r must be a positive"), (dict(r=2.5), "r must be"),
                         (dict(bias="some"), "bias="), (dict(lora_dropout=1.0), "lora_dropout"),
                         (dict(init_lora_weights="corda"), "init_lora_weights"),
                         (dict(target_modules=[]), "non-empty"), (dict(target_modules="("), "regex"),
                         (dict(target_modules="q_proj", layers_to_transform=0), "layers_to_transform"),
                         (dict(layers_to_transform=[-1]), "layers_to_transform"),
                         (dict(task_type="SEQ_CLS"), "CAUSAL_LM"), (dict(peft_type="IA3"), "LORA")]:
        with pytest.raises(ValueError, match=pattern):
            LoraConfig(**bad)


def test_config_dict_round_trip_has_peft_keys_and_types():
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["v_proj", "q_proj"], lora_dropout=0.05,
                     layers_to_transform=[0, 1], modules_to_save=["lm_head"], init_lora_weights="gaussian")
    d = cfg.to_dict()
    for key in ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
                "fan_in_fan_out", "init_lora_weights", "use_rslora", "use_dora", "modules_to_save",
                "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
                "inference_mode", "base_model_name_or_path", "revision"]:
        assert key in d, key
    assert d["peft_type"] == "LORA" and d["target_modules"] == ["q_proj", "v_proj"]
    assert d["fan_in_fan_out"] is False and d["rank_pattern"] == {}
    back = LoraConfig.from_dict(d)
    assert back == LoraConfig.from_dict(back.to_dict())
    assert back.r == 16 and back.layers_to_transform == [0, 1] and back.init_lora_weights == "gaussian"


def test_config_from_dict_refuses_unsupported_and_unknown():
    d = LoraConfig().to_dict()
    with pytest.raises(ValueError, match="lora_bias"):
        LoraConfig.from_dict({**d, "lora_bias": True})
    with pytest.raises(ValueError, match="peft_type 'PREFIX_TUNING'"):
        LoraConfig.from_dict({**d, "peft_type": "PREFIX_TUNING"})
    with pytest.raises(ValueError, match="does not know"):
        LoraConfig.from_dict({**d, "quantum_flux": 3})


def test_matching_rules():
    cfg = LoraConfig(target_modules=["q_proj"])
    assert matches(cfg, "model.layers.0.self_attn.q_proj") and matches(cfg, "q_proj")
    assert not matches(cfg, "model.layers.0.self_attn.qq_proj")
    rx = LoraConfig(target_modules=r".*layers\.1\..*(q|v)_proj")
    assert matches(rx, "model.layers.1.self_attn.v_proj")
    assert not matches(rx, "model.layers.0.self_attn.v_proj")
    assert not re.fullmatch(rx.target_modules, "model.layers.1.self_attn.v_proj.lora_A")
    lt = LoraConfig(target_modules=["q_proj"], layers_to_transform=1)
    assert matches(lt, "model.layers.1.self_attn.q_proj")
    assert not matches(lt, "model.layers.0.self_attn.q_proj")


# ------------------------------------------------------------------ injection
def test_default_targets_q_v_and_peft_names():
    model = wrapped()
    names = [n for n, _ in model.named_parameters()]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight" in names
    adapted = sorted(n for n, _ in model.lora_layers())
    assert adapted == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    # parameter order is the model's own (the wrapper takes the Linear's place)
    attn = model.base_model.model.model.layers[0].self_attn
    assert [n for n, _ in attn.named_children()] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_all_linear_excludes_lm_head_and_regex_targets():
    model = wrapped(LoraConfig(target_modules="all-linear"))
    adapted = {n.rsplit(".", 1)[-1] for n, _ in model.lora_layers()}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.base_model.model.lm_head, nn.Linear)
    assert model.peft_config["default"].target_modules == sorted(adapted)
    model = wrapped(LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj"))
    assert sorted(n for n, _ in model.lora_layers()) == ["model.layers.1.mlp.down_proj",
                                                          "model.layers.1.mlp.up_proj"]


def test_no_match_error_lists_linear_names():
    with pytest.raises(ValueError) as e:
        wrapped(LoraConfig(target_modules=["query"]))
    msg = str(e.value)
    assert "matched no Linear" in msg and "q_proj" in msg and "lm_head" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="not Linear"):
        wrapped(LoraConfig(target_modules=["mlp"]))


def test_layers_to_transform():
    model = wrapped(LoraConfig(target_modules=["q_proj", "o_proj"], layers_to_transform=[1]))
    assert sorted(n for n, _ in model.lora_layers()) == ["model.layers.1.self_attn.o_proj",
                                                          "model.layers.1.self_attn.q_proj"]


def test_config_is_not_mutated_and_model_cannot_be_wrapped_twice():
    cfg = LoraConfig(target_modules="all-linear")
    model = get_peft_model(ToyLM(), cfg)
    assert cfg.target_modules == "all-linear"
    with pytest.raises(ValueError, match="already"):
        get_peft_model(model, cfg)
    with pytest.raises(ValueError, match="already contains LoRA"):
        get_peft_model(model.base_model.model, cfg)


# ------------------------------------------------------------------ freezing and counting
@given(r=st.integers(1, 6), d=st.sampled_from([8, 12, 16]), n_layers=st.integers(1, 3))
def test_trainable_count_is_r_in_plus_out_per_adapted_linear(r, d, n_layers):
    model = get_peft_model(ToyLM(d=d, n_layers=n_layers), LoraConfig(r=r, target_modules="all-linear"))
    expected = sum(r * (m.in_features + m.out_features) for _, m in model.lora_layers())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    base_total = sum(p.size for p in ToyLM(d=d, n_layers=n_layers).parameters())
    assert total == base_total + expected  # each base weight counted once
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_print_trainable_parameters_exact_format(capsys):
    model = wrapped()
    model.print_trainable_parameters()
    t, a = model.get_nb_trainable_parameters()
    out = capsys.readouterr().out.strip()
    assert out == f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", out)


def test_bias_modes():
    m = get_peft_model(ToyLM(bias=True), LoraConfig(bias="none"))
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.endswith("bias"))
    m = get_peft_model(ToyLM(bias=True), LoraConfig(bias="all"))
    biases = [p.requires_grad for n, p in m.named_parameters() if n.endswith("bias")]
    assert biases and all(biases)
    m = get_peft_model(ToyLM(bias=True), LoraConfig(bias="lora_only"))
    on = {n for n, p in m.named_parameters() if n.endswith("bias") and p.requires_grad}
    assert on == {f"base_model.model.model.layers.{i}.self_attn.{p}.base_layer.bias"
                  for i in (0, 1) for p in ("q_proj", "v_proj")}


def test_training_updates_only_lora_and_loss_backward_skips_base():
    model = wrapped(LoraConfig(r=4, init_lora_weights=False))
    x = ids()
    out = model(x, labels=x)
    out.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n


def test_modules_to_save_trains_a_copy_of_lm_head():
    model = wrapped(LoraConfig(modules_to_save=["lm_head"]))
    head = model.base_model.model.lm_head
    assert isinstance(head, ModulesToSaveWrapper)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.lm_head.modules_to_save.default.weight" in trainable
    assert "base_model.model.lm_head.original_module.weight" not in trainable
    x = ids()
    before = logits(model, x)
    head.modules_to_save["default"].weight.data += 1.0
    assert not np.allclose(logits(model, x), before)
    with model.disable_adapter():
        assert np.allclose(logits(model, x), before)


# ------------------------------------------------------------------ merge / unmerge / unload
def test_fresh_peft_model_output_is_bit_identical_to_base():
    base = ToyLM()
    x = ids()
    ref = logits(base, x)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert np.array_equal(logits(model, x), ref)


def test_merge_unmerge_and_disable():
    base = ToyLM()
    x = ids()
    ref = logits(base, x)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, target_modules="all-linear",
                                            init_lora_weights=False))
    unmerged = logits(model, x)
    assert np.abs(unmerged - ref).max() > 1e-3
    model.merge_adapter()
    merged = logits(model, x)
    scale = np.abs(unmerged).max()
    assert np.abs(merged - unmerged).max() < 1e-5 * scale
    model.unmerge_adapter()
    assert np.abs(logits(model, x) - unmerged).max() < 1e-5 * scale
    with model.disable_adapter():
        assert np.abs(logits(model, x) - ref).max() < 1e-5 * scale
    model.merge_adapter()
    with model.disable_adapter():  # unmerges first, then runs the base alone
        assert np.abs(logits(model, x) - ref).max() < 1e-5 * scale
    assert np.abs(logits(model, x) - unmerged).max() < 1e-5 * scale


def test_merge_and_unload_gives_plain_linears_with_merged_weights():
    base = ToyLM()
    x = ids()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    want = logits(model, x)
    deltas = {n: layer.base_layer.weight.numpy() + layer.get_delta_weight("default")
              for n, layer in model.lora_layers()}
    plain = model.merge_and_unload()
    assert plain is base
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    for n, w in deltas.items():
        assert np.array_equal(plain.get_submodule(n).weight.numpy(), w.astype(np.float32))
    assert np.abs(logits(plain, x) - want).max() < 1e-5 * np.abs(want).max()
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ToyLM().named_parameters()]


def test_unload_gives_back_original_weights():
    base = ToyLM()
    x = ids()
    ref = logits(base, x)
    W0 = base.model.layers[0].self_attn.q_proj.weight.numpy().copy()
    model = get_peft_model(base, LoraConfig(init_lora_weights=False))
    model.merge_adapter()
    plain = model.unload()
    assert np.allclose(plain.model.layers[0].self_attn.q_proj.weight.numpy(), W0, atol=1e-6, rtol=0)
    assert np.allclose(logits(plain, x), ref, atol=1e-5)


# ------------------------------------------------------------------ several adapters
def test_add_set_delete_adapter():
    model = wrapped(LoraConfig(r=4, init_lora_weights=False))
    x = ids()
    y_default = logits(model, x)
    model.add_adapter("mlp", LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False))
    assert model.active_adapter == "default"
    assert np.array_equal(logits(model, x), y_default)
    # the new adapter is frozen until it is made active
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mlp." in n and "lora" in n)
    model.set_adapter("mlp")
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A.mlp" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A.default" in n)
    y_mlp = logits(model, x)
    assert not np.allclose(y_mlp, y_default)
    with pytest.raises(ValueError, match="no adapter called 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("mlp", LoraConfig())
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter("a.b", LoraConfig())
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.delete_adapter("mlp")
    model.unmerge_adapter()
    model.delete_adapter("mlp")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert np.allclose(logits(model, x), y_default, atol=1e-6)
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("default")


def _deltas(model, name):
    return {n: layer.get_delta_weight(name) for n, layer in model.lora_layers() if name in layer.lora_A}


def _two_adapters(r1=4, r2=4, rslora=False):
    model = get_peft_model(ToyLM(), LoraConfig(r=r1, lora_alpha=8, init_lora_weights=False,
                                                use_rslora=rslora))
    model.add_adapter("b", LoraConfig(r=r2, lora_alpha=3, init_lora_weights=False, use_rslora=rslora))
    return model


@pytest.mark.parametrize("rslora", [False, True])
def test_weighted_cat_is_exact(rslora):
    model = _two_adapters(4, 3, rslora)
    w = [0.7, -1.3]
    model.add_weighted_adapter(["default", "b"], w, "mix", combination_type="cat")
    assert model.peft_config["mix"].r == 7 and model.peft_config["mix"].lora_alpha == 7
    d0, d1, mix = _deltas(model, "default"), _deltas(model, "b"), _deltas(model, "mix")
    for n in mix:
        want = w[0] * d0[n] + w[1] * d1[n]
        # one extra rounding per product term: K·eps bound with K = Σr
        bound = 8 * EPS32 * (abs(w[0]) * np.abs(d0[n]).max() + abs(w[1]) * np.abs(d1[n]).max())
        assert np.abs(mix[n] - want).max() <= bound
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)


def test_combined_rslora_adapter_runs_with_its_own_scale_in_both_forms():
    """add_weighted_adapter gives the new adapter α = r and no rsLoRA: scaling[name] = 1, set once.
    The fused op reads that number (it does not recompute a scale from r and α), so its logits equal
    the module form's and the merged model's. A scale that disagreed would move the logits by a
    sizeable fraction; float32 rounding moves them by a few ulps of their largest value per layer
    (K <= 64 terms each), far below the 64·eps·max|logit| allowed here."""
    from minilora import settings
    model = _two_adapters(4, 3, rslora=True)
    model.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", combination_type="cat")
    model.set_adapter("mix")
    assert all(layer.scaling["mix"] == 1.0 for _, layer in model.lora_layers())
    x = ids(B=4, T=8)                      # 32 rows: the fused op uses the merged weight
    fused = logits(model, x)
    with settings.reference():
        plain = logits(model, x)
    with model.disable_adapter():
        base = logits(model, x)
    model.merge_adapter()
    merged = logits(model, x)
    tol = 64 * EPS32 * np.abs(plain).max()
    assert np.abs(fused - plain).max() <= tol and np.abs(merged - plain).max() <= tol
    assert np.abs(plain - base).max() > 100 * tol       # the adapter does change the logits


def _rel_err(model, w, name):
    d0, d1, mix = _deltas(model, "default"), _deltas(model, "b"), _deltas(model, name)
    num = sum(np.sum((mix[n] - (w[0] * d0[n] + w[1] * d1[n])) ** 2) for n in mix)
    den = sum(np.sum((w[0] * d0[n] + w[1] * d1[n]) ** 2) for n in mix)
    return float(np.sqrt(num / den))


def test_weighted_svd_and_linear_are_approximations():
    model = _two_adapters(4, 4)
    w = [0.5, 0.5]
    model.add_weighted_adapter(["default", "b"], w, "svd8", combination_type="svd", svd_rank=8)
    model.add_weighted_adapter(["default", "b"], w, "svd4", combination_type="svd", svd_rank=4)
    model.add_weighted_adapter(["default", "b"], w, "lin", combination_type="linear")
    assert _rel_err(model, w, "svd8") < 1e-5        # rank(ΔW) ≤ 8: nothing truncated
    assert 0.05 < _rel_err(model, w, "svd4") < 1.0  # truncated to rank 4: approximate
    assert _rel_err(model, w, "lin") > 0.3          # the cross terms B_i A_j dominate
    with pytest.raises(ValueError, match="equal rank"):
        _two_adapters(4, 2).add_weighted_adapter(["default", "b"], w, "x", combination_type="linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "b"], [1.0], "y", combination_type="cat")
    with pytest.raises(ValueError, match="combination_type"):
        model.add_weighted_adapter(["default", "b"], w, "z", combination_type="ties")


def test_weighted_single_adapter_linear_is_exact():
    model = _two_adapters()
    model.add_weighted_adapter(["b"], [2.0], "double", combination_type="svd")
    d, dd = _deltas(model, "b"), _deltas(model, "double")
    for n in d:
        assert np.allclose(dd[n], 2 * d[n], rtol=1e-5, atol=1e-7)


def test_forward_passes_labels_and_attributes_through():
    model = wrapped()
    x = ids()
    out = model(x, labels=x)
    assert out.loss.shape == () and out.logits.shape == (2, 5, 20)
    assert model.get_output_embeddings() is model.base_model.model.lm_head
    assert model.model is model.base_model.model          # as in PEFT: the wrapped model
    with pytest.raises(AttributeError):
        model.no_such_attribute


def test_peft_model_to_float64_gradcheck_through_injected_model():
    """dL/dA and dL/dB through a whole injected model, by central differences in float64."""
    from minilora import functional as F
    from minilora.testing import gradcheck
    with backend.default_float_dtype(np.float64):
        model = get_peft_model(ToyLM(d=8, inter=8, n_layers=1, vocab=6),
                               LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"],
                                          init_lora_weights=False))
        layer = dict(model.lora_layers())["model.layers.0.self_attn.v_proj"]
        x = np.random.default_rng(0).integers(0, 6, size=(2, 3))
        A0, B0 = layer.lora_A["default"].weight.data.copy(), layer.lora_B["default"].weight.data.copy()

        def fn(A, B):
            for lin, t in ((layer.lora_A["default"], A), (layer.lora_B["default"], B)):
                lin._parameters["weight"] = t
                object.__setattr__(lin, "weight", t)
            return F.log_softmax(model(x))

        assert gradcheck(fn, [A0, B0], names=["lora_A", "lora_B"])


def test_set_adapter_while_merged_unmerges_first():
    """PEFT's behaviour: switching adapters while one is merged unmerges it (and warns), so the new
    adapter, not the merged one, answers."""
    import warnings as _w

    from minilora.lora import LoraConfig, get_peft_model
    from minilora.models import LlamaConfig, LlamaForCausalLM
    backend.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=16)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    ids = np.arange(8).reshape(1, 8)
    model.set_adapter("other")
    expected = model(ids).data.copy()
    model.set_adapter("default")
    model.merge_adapter()
    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        model.set_adapter("other")
    assert any("unmerging" in str(w.message) for w in caught)
    np.testing.assert_allclose(model(ids).data, expected, rtol=1e-5, atol=1e-5)
