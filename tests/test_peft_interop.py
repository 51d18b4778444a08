"""Adapters move between minilora and Hugging Face PEFT, and compute the same thing there.

The oracle: transformers' LlamaForCausalLM loaded from the same base checkpoint (minilora's
``save_pretrained`` -> transformers' ``from_pretrained``) with PEFT on top. An adapter with nonzero B
(init_lora_weights=False) saved on one side is loaded on the other and must give the same logits to
1e-5, unmerged and merged; ``add_weighted_adapter("cat")`` must agree with PEFT's and with the exact
weighted sum of the deltas.
"""
import numpy as np
import pytest

from minilora import backend
from minilora.lora import LoraConfig as MiniLoraConfig, PeftModel as MiniPeftModel, get_peft_model
from minilora.models import LlamaConfig, LlamaForCausalLM

torch = pytest.importorskip("torch", reason="interop needs torch")
transformers = pytest.importorskip("transformers", reason="interop needs transformers")
peft = pytest.importorskip("peft", reason="interop needs peft")

pytestmark = [pytest.mark.interop,
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]

TINY = dict(vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ATOL = 1e-5  # relative to the logits' scale: max |a - b| <= 1e-5 * max(1, max |b|)


def assert_close(got, want):
    """Same logits to 1e-5 of their scale. The weights are scaled so logits reach ~5; two float32
    implementations then differ by a few 1e-6 (the bases alone, without LoRA, differ by ~6e-6)."""
    err = np.abs(got - want).max()
    assert err <= ATOL * max(1.0, float(np.abs(want).max())), f"max |diff| {err:.3g}"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.set_num_threads(1)
    backend.manual_seed(11)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    # larger weights than the 0.02 init so that logits are O(1) and differences show
    for p in model.parameters():
        if p.ndim == 2:
            p.data *= 10
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(d)
    return d


def mini_base(base_dir):
    return LlamaForCausalLM.from_pretrained(base_dir)


def hf_base(base_dir):
    m = transformers.LlamaForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    return m.eval()


IDS = np.random.default_rng(5).integers(0, 259, size=(2, 9))


def mini_logits(model):
    return model(IDS).numpy()


def hf_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def test_bases_agree(base_dir):
    assert_close(mini_logits(mini_base(base_dir)), hf_logits(hf_base(base_dir)))


@pytest.mark.parametrize("kw", [
    dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"]),
    dict(r=3, lora_alpha=5, target_modules="all-linear", use_rslora=True),
    dict(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"], layers_to_transform=[1]),
])
def test_minilora_adapter_loads_in_peft(base_dir, tmp_path, kw):
    model = get_peft_model(mini_base(base_dir), MiniLoraConfig(init_lora_weights=False, **kw))
    assert_loads_in_peft(model, base_dir, tmp_path)


def assert_loads_in_peft(model, base_dir, tmp_path, effect=1e-2):
    """``model`` (a minilora PeftModel) saved and loaded in PEFT gives the same logits, unmerged and
    merged on both sides, which differ from the base's by more than ``effect``, and PEFT counts the
    same trainable parameters."""
    want = mini_logits(model)
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(hf_base(base_dir), str(tmp_path)).eval()
    got = hf_logits(hf)
    assert_close(got, want)
    assert np.abs(got - hf_logits(hf_base(base_dir))).max() > effect  # the adapter does something
    hf.merge_adapter()
    model.merge_adapter()
    assert_close(hf_logits(hf), mini_logits(model))
    assert_close(mini_logits(model), want)
    # same trainable-parameter count as PEFT reports
    hf_train = peft.PeftModel.from_pretrained(hf_base(base_dir), str(tmp_path), is_trainable=True)
    mini_train = MiniPeftModel.from_pretrained(mini_base(base_dir), tmp_path, is_trainable=True)
    assert mini_train.get_nb_trainable_parameters() == hf_train.get_nb_trainable_parameters()


def test_long_inputs_use_the_merged_weight_path_and_still_match_peft(base_dir, tmp_path):
    """With batch·seq >= the layer widths, LoraLinear computes x·(W0 + ΔW)ᵀ in one GEMM (training
    speed); it must still give PEFT's logits, and so must the module-by-module form."""
    from minilora import settings
    long_ids = np.random.default_rng(6).integers(0, 259, size=(4, 30))   # 120 rows >= 48
    model = get_peft_model(mini_base(base_dir), MiniLoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules="all-linear"))
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(hf_base(base_dir), str(tmp_path)).eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(long_ids)).logits.numpy()
    assert_close(model(long_ids).numpy(), want)
    with settings.reference():       # the module form
        assert_close(model(long_ids).numpy(), want)


def test_peft_adapter_loads_in_minilora(base_dir, tmp_path):
    torch.manual_seed(0)
    hf = peft.get_peft_model(hf_base(base_dir), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM")).eval()
    want = hf_logits(hf)
    hf.save_pretrained(str(tmp_path))
    model = MiniPeftModel.from_pretrained(mini_base(base_dir), tmp_path)
    assert_close(mini_logits(model), want)
    model.merge_adapter()
    assert_close(mini_logits(model), want)
    plain = model.merge_and_unload()
    assert_close(mini_logits(plain), want)


def test_peft_second_adapter_subfolder_and_modules_to_save(base_dir, tmp_path):
    torch.manual_seed(1)
    hf = peft.get_peft_model(hf_base(base_dir), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False,
        modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    hf.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["gate_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        hf.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.3)
    hf.eval()
    want_default = hf_logits(hf)
    hf.set_adapter("other")
    want_other = hf_logits(hf)
    hf.save_pretrained(str(tmp_path))
    model = MiniPeftModel.from_pretrained(mini_base(base_dir), tmp_path)
    assert_close(mini_logits(model), want_default)
    model.load_adapter(tmp_path / "other", "other")
    model.set_adapter("other")
    assert_close(mini_logits(model), want_other)


def test_modules_to_save_names_the_same_modules_as_peft(base_dir, tmp_path):
    """PEFT finds a modules_to_save entry as a plain suffix of the dotted name ("norm" is also
    "...input_layernorm"); minilora wraps the same modules, and PEFT's file loads here."""
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["norm"],
                  init_lora_weights=False)
    hf = peft.get_peft_model(hf_base(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **config))
    mini = get_peft_model(mini_base(base_dir), MiniLoraConfig(**config))
    wrapped = lambda m: sorted(n.removeprefix("base_model.model.") for n, mod in m.named_modules()  # noqa: E731
                               if type(mod).__name__ == "ModulesToSaveWrapper")
    assert wrapped(mini) == wrapped(hf) and "model.layers.0.input_layernorm" in wrapped(mini)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if ".modules_to_save.default." in n:
                p.add_(0.25)
    hf.eval()
    hf.save_pretrained(str(tmp_path))
    assert_close(mini_logits(MiniPeftModel.from_pretrained(mini_base(base_dir), tmp_path)), hf_logits(hf))


@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd"])
def test_add_weighted_adapter_matches_peft(base_dir, tmp_path, combination_type):
    model = get_peft_model(mini_base(base_dir), MiniLoraConfig(r=4, lora_alpha=8,
                                                               init_lora_weights=False))
    model.add_adapter("b", MiniLoraConfig(r=4, lora_alpha=2, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(hf_base(base_dir), str(tmp_path))
    hf.load_adapter(str(tmp_path / "b"), adapter_name="b")
    w = [0.6, -1.4]
    kw = dict(svd_rank=8) if combination_type == "svd" else {}
    model.add_weighted_adapter(["default", "b"], w, "mix", combination_type=combination_type, **kw)
    hf.add_weighted_adapter(["default", "b"], w, "mix", combination_type=combination_type, **kw)
    model.set_adapter("mix")
    hf.set_adapter("mix")
    hf.eval()
    assert_close(mini_logits(model), hf_logits(hf))
    hf_layers = dict(hf.base_model.model.named_modules())
    for name, layer in model.lora_layers():
        mine = layer.get_delta_weight("mix")
        theirs = hf_layers[name].get_delta_weight("mix").detach().numpy()
        assert np.abs(mine - theirs).max() < 1e-6
        if combination_type != "linear":  # cat and full-rank svd are the exact weighted sum
            exact = w[0] * layer.get_delta_weight("default") + w[1] * layer.get_delta_weight("b")
            assert np.abs(mine - exact).max() < 1e-6
