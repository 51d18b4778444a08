"""minilora.memory: parameter counts and training-memory accounting, checked against published totals,
against Hugging Face transformers / PEFT (built on the meta device, so a 70B model costs no memory)
and against minilora's own model and NF4 storage."""
import math

import numpy as np
import pytest

from minilora import memory, quant
from minilora.models.config import PRESETS, LlamaConfig

# Published totals (Hugging Face model cards / the models' papers); also re-derived from the formula.
KNOWN_TOTALS = {
    "llama-7b": 6_738_415_616,      # Llama-2-7B
    "llama-13b": 13_015_864_320,    # Llama-2-13B
    "llama-70b": 68_976_648_192,    # Llama-2-70B (GQA, 8 KV heads)
    "llama3-8b": 8_030_261_248,     # Meta-Llama-3-8B
    "llama3-70b": 70_553_706_496,   # Meta-Llama-3-70B
    "llama-65b": 65_285_660_672,    # LLaMA-65B
}
TINY = LlamaConfig(vocab_size=260, hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2)


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", sorted(KNOWN_TOTALS))
def test_preset_totals_match_published_counts(name):
    assert memory.count_parameters(name)["total"] == KNOWN_TOTALS[name]


def test_llama7b_by_hand():
    c = memory.count_parameters("llama-7b")
    d, f, v, L = 4096, 11008, 32000, 32
    assert c["layer"]["self_attn"] == 4 * d * d
    assert c["layer"]["mlp"] == 3 * d * f
    assert c["layer"]["total"] == 4 * d * d + 3 * d * f + 2 * d
    assert c["embed_tokens"] == c["lm_head"] == v * d
    assert c["total"] == 2 * v * d + L * (4 * d * d + 3 * d * f + 2 * d) + d
    assert c["linear"] == L * (4 * d * d + 3 * d * f)


def test_gqa_shapes_and_tied_embeddings():
    shapes = memory.linear_shapes("llama-70b")
    assert shapes["q_proj"] == (8192, 8192) and shapes["o_proj"] == (8192, 8192)
    assert shapes["k_proj"] == shapes["v_proj"] == (1024, 8192)  # 8 KV heads × 128
    assert shapes["gate_proj"] == shapes["up_proj"] == (28672, 8192)
    assert shapes["down_proj"] == (8192, 28672)
    tied = LlamaConfig(**{**TINY.__dict__, "tie_word_embeddings": True})
    assert memory.count_parameters(tied)["lm_head"] == 0
    assert memory.count_parameters(TINY)["total"] - memory.count_parameters(tied)["total"] == 260 * 16


def test_bad_model_argument():
    with pytest.raises(ValueError, match="unknown preset 'llama-9b'"):
        memory.count_parameters("llama-9b")
    with pytest.raises(ValueError, match="expected a LlamaConfig"):
        memory.count_parameters(42)


def test_count_matches_minilora_model():
    models = pytest.importorskip("minilora.models")
    if not hasattr(models, "LlamaForCausalLM"):
        pytest.skip("minilora.models.LlamaForCausalLM is not written yet")
    for cfg in (TINY, LlamaConfig(**{**TINY.__dict__, "tie_word_embeddings": True})):
        model = models.LlamaForCausalLM(cfg)
        named = dict(model.named_parameters())
        assert sum(int(np.prod(p.shape)) for p in named.values()) == memory.count_parameters(cfg)["total"]
        for name, (out, inn) in memory.linear_shapes(cfg).items():
            group = "self_attn" if name in memory.ATTENTION_MODULES else "mlp"
            assert tuple(named[f"model.layers.0.{group}.{name}.weight"].shape) == (out, inn)


@pytest.mark.interop
@pytest.mark.parametrize("name", ["llama-7b", "llama3-70b", "llama-65b"])
def test_count_matches_transformers_on_meta_device(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = PRESETS[name]
    hf = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items()
                                     if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):  # shapes only: no memory for the weights
        model = transformers.LlamaForCausalLM(hf)
    assert sum(p.numel() for p in model.parameters()) == memory.count_parameters(cfg)["total"]
    counts = memory.count_parameters(cfg)
    assert sum(p.numel() for n, p in model.named_parameters()
               if n.startswith("model.layers.") and p.dim() == 2) == counts["linear"]


# ---------------------------------------------------------------- LoRA counts
def test_lora_counts_are_r_times_in_plus_out():
    for name in ("llama-7b", "llama3-70b"):
        shapes = memory.linear_shapes(name)
        for r in (1, 8, 16, 64):
            bd = memory.lora_parameter_breakdown(name, r, "all-linear")
            for mod, (out, inn) in shapes.items():
                assert bd["per_module"][mod] == r * (inn + out)
            assert bd["per_layer"] == sum(bd["per_module"].values())
            assert bd["total"] == bd["per_layer"] * PRESETS[name].num_hidden_layers
    assert memory.lora_linear_parameters(8192, 8192, 16) == 262_144
    assert memory.lora_parameters("llama-7b", 16, ("q_proj", "k_proj", "v_proj", "o_proj")) == 16_777_216
    assert memory.lora_parameters("llama-7b", 8) == 32 * 2 * 8 * (4096 + 4096)  # PEFT default q, v


def test_lora_layers_and_errors():
    full = memory.lora_parameters(TINY, 4, "all-linear")
    assert memory.lora_parameters(TINY, 4, "all-linear", layers=[0, 2]) == full * 2 // 3
    assert memory.lora_parameters(TINY, 4, "all-linear", layers=1) == full // 3
    assert memory.lora_parameter_breakdown(TINY, 4, layers=[2, 0, 2])["layers"] == (0, 2)
    with pytest.raises(ValueError, match="unknown target_modules"):
        memory.lora_parameters(TINY, 4, ("q_proj", "lm_head"))
    with pytest.raises(ValueError, match=r"layers \[3\] must be indices in \[0, 3\)"):
        memory.lora_parameters(TINY, 4, layers=[3])
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        memory.lora_parameters(TINY, 0)


@pytest.mark.interop
def test_lora_count_matches_peft_on_meta_device():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = PRESETS["llama3-70b"]
    hf = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items()
                                     if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=targets,
                                                    layers_to_transform=[0, 5, 79]))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == memory.lora_parameters(cfg, 16, targets, layers=[0, 5, 79])
    assert total == memory.count_parameters(cfg)["total"] + trainable


@pytest.mark.interop
def test_adapter_file_bytes_match_a_peft_save(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from safetensors import safe_open
    hf = transformers.LlamaConfig(**{k: v for k, v in TINY.to_dict().items()
                                     if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(hf),
                             peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    pm.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "np") as f:
        data = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert data == memory.adapter_file_bytes(TINY, 4, ("q_proj", "v_proj", "down_proj"), dtype_bytes=4)


# ---------------------------------------------------------------- bytes per parameter
def test_bytes_per_parameter_quick_reference():
    full = memory.bytes_per_parameter("full")["trainable"]
    assert (full.weights, full.gradients, full.optimizer, full.total) == (2, 2, 12, 16)  # 4 master + 8 m,v
    assert memory.bytes_per_parameter("full", weight_bytes=4)["trainable"].total == 16  # pure fp32
    assert memory.bytes_per_parameter("full", master_weights=False)["trainable"].total == 12
    assert memory.bytes_per_parameter("full", optimizer="adamw_8bit")["trainable"].total == 10
    assert memory.bytes_per_parameter("full", optimizer="sgd", weight_bytes=4)["trainable"].total == 8
    lora = memory.bytes_per_parameter("lora")
    assert lora["frozen"].total == 2 and lora["trainable"].total == 16
    assert memory.bytes_per_parameter("lora", adapter_bytes=4)["trainable"].total == 16  # fp32 adapters
    q = memory.bytes_per_parameter("qlora")["frozen"]
    assert q.weights == 0.5 and q.quant_constants * 8 == pytest.approx(0.126953125, abs=1e-12)
    assert memory.bytes_per_parameter("qlora", double_quant=False)["frozen"].total == 4.5 / 8
    assert memory.bytes_per_parameter("qlora", include_quant_constants=False)["frozen"].total == 0.5


def test_nf4_bits_come_from_quant(monkeypatch):
    calls = []

    def fake(blocksize, double_quant):
        calls.append((blocksize, double_quant))
        return 6.0
    monkeypatch.setattr(quant, "nf4_bits_per_parameter", fake)
    assert memory.bytes_per_parameter("qlora", nf4_blocksize=128)["frozen"].quant_constants == 0.25
    assert calls == [(128, True)]


def test_qlora_constants_equal_real_nf4_storage():
    n = 64 * 256 * 8  # whole nested blocks, so only the 4-byte offset differs
    per = memory.bytes_per_parameter("qlora")["frozen"].total
    stored = sum(quant.storage_bytes(n, 64, True).values())
    assert per * n == stored - 4
    w = np.random.default_rng(0).standard_normal((128, 1024)).astype(np.float32)
    assert quant.quantize_nf4(w, 64, double_quant=True).nbytes == pytest.approx(per * w.size, abs=16)


@pytest.mark.parametrize("kw, match", [({"optimizer": "lion"}, "unknown optimizer"),
                                       ({"weight_bytes": 0}, "weight_bytes"),
                                       ({"grad_bytes": -2}, "grad_bytes")])
def test_bytes_per_parameter_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        memory.bytes_per_parameter("full", **kw)
    with pytest.raises(ValueError, match="unknown method"):
        memory.bytes_per_parameter("dora")


# ---------------------------------------------------------------- memory breakdown
@pytest.mark.parametrize("method", memory.METHODS)
def test_breakdown_sums_and_units(method):
    b = memory.memory_breakdown("llama-7b", method, r=16)
    assert b.total == b.weights + b.adapter + b.gradients + b.optimizer + b.quant_constants
    assert b.base == b.weights + b.quant_constants
    assert b.gb() == b.total / 1e9 and b.gib("weights") == b.weights / 2**30
    assert b.as_dict()["total"] == b.total
    assert "activations not included" in str(b)


def test_breakdown_by_formula():
    n = memory.count_parameters("llama3-70b")
    lp = memory.lora_parameters("llama3-70b", 16, "all-linear")
    full = memory.memory_breakdown("llama3-70b", "full")
    assert full.total == 16 * n["total"] and full.trainable_params == n["total"]
    lora = memory.memory_breakdown("llama3-70b", "lora", r=16, target_modules="all-linear")
    assert (lora.weights, lora.adapter) == (2 * n["total"], 2 * lp)
    assert (lora.gradients, lora.optimizer) == (2 * lp, 12 * lp)
    q = memory.memory_breakdown("llama3-70b", "qlora", r=16, target_modules="all-linear")
    bits = quant.nf4_bits_per_parameter(64, True)
    assert q.quantized_params == n["linear"]
    assert q.weights == n["linear"] // 2 + 2 * (n["total"] - n["linear"])
    assert q.quant_constants == round(n["linear"] * (bits - 4) / 8)
    qa = memory.memory_breakdown("llama3-70b", "qlora", quantize_all=True)
    assert qa.quantized_params == n["total"]
    # a bare count like the article's "70B"
    assert memory.memory_breakdown(70e9, "full").weights == 140 * 10**9
    assert memory.memory_breakdown(70e9, "lora", lora_params=10**6).adapter == 2 * 10**6
    with pytest.raises(ValueError, match="needs the adapter size"):
        memory.memory_breakdown(70e9, "lora")
    with pytest.raises(ValueError, match="positive whole number"):
        memory.memory_breakdown(1.5, "full")


def test_ordering_and_monotonic_in_r():
    for name in ("llama-7b", "llama3-70b"):
        totals = [memory.memory_breakdown(name, m, r=16, target_modules="all-linear").total
                  for m in ("qlora", "lora", "full")]
        assert totals == sorted(totals) and len(set(totals)) == 3
        for method in ("lora", "qlora"):
            by_r = [memory.memory_breakdown(name, method, r=r).total for r in (1, 4, 16, 64, 256)]
            assert all(a < b for a, b in zip(by_r, by_r[1:]))


# ---------------------------------------------------------------- GPUs
def test_gpus_needed_and_fits_on():
    gib80 = 80 * 2**30
    assert memory.gpus_needed(gib80) == 1 and memory.gpus_needed(gib80 + 1) == 2
    assert memory.gpus_needed(0) == 0
    assert memory.fits_on(gib80, 80) and not memory.fits_on(gib80 + 1, 80)
    assert memory.fits_on(gib80 + 1, 80, n_gpus=2)
    full70 = memory.memory_breakdown("llama3-70b", "full").total
    assert memory.gpus_needed(full70, 80) == math.ceil(full70 / gib80)
    with pytest.raises(ValueError, match="gpu_gb"):
        memory.gpus_needed(1, 0)
    with pytest.raises(ValueError, match="total_bytes"):
        memory.gpus_needed(-1)


def test_adapter_file_bytes():
    assert memory.adapter_file_bytes("llama-7b", 16) == 4 * 8_388_608
    assert memory.adapter_file_bytes("llama-7b", 16, dtype_bytes=2) == 2 * 8_388_608
    with pytest.raises(ValueError, match="dtype_bytes"):
        memory.adapter_file_bytes("llama-7b", 16, dtype_bytes=3)


def test_lora_count_matches_minilora_get_peft_model():
    lora = pytest.importorskip("minilora.lora")
    models = pytest.importorskip("minilora.models")
    if not hasattr(lora, "get_peft_model") or not hasattr(models, "LlamaForCausalLM"):
        pytest.skip("minilora.lora.get_peft_model or the model is not written yet")
    targets = ["q_proj", "k_proj", "down_proj"]
    pm = lora.get_peft_model(models.LlamaForCausalLM(TINY),
                             lora.LoraConfig(r=3, lora_alpha=6, target_modules=targets))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == memory.lora_parameters(TINY, 3, targets)
    assert total == memory.count_parameters(TINY)["total"] + trainable
