"""QLoRA: the frozen 4-bit Linear (quant/linear.py), quantize_model, LoRA on a 4-bit base, merging
into it, and a QLoRA fine-tune of the shipped base model against the float32 LoRA one.

Oracles: NF4Linear must equal ``x @ dequant(W).T`` computed by PyTorch (and by bitsandbytes'
``Linear4bit`` on the CPU, tests marked ``interop``); gradients wrt x must equal the autograd
composite's. Tolerances: a float32 GEMM over K terms rounds to about K·2^-24 relative to Σ|x·w|;
with K <= 512 and O(1) inputs that is below 1e-5 absolute, which the comparisons use.
"""
import numpy as np
import pytest

from minilora import Tensor, backend, settings
from minilora import functional as F
from minilora.lora import LoraConfig, LoraLinear, get_peft_model
from minilora.lora import merge as merge_math
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.nn import Linear
from minilora.optim import AdamW
from minilora.quant import (NF4Linear, dequantize_model, load_quantized_model, quantization_summary,
                            quantize_model, quantize_nf4, quantized_modules, release_workspace,
                            requantization_errors, save_quantized_model, storage_bytes,
                            workspace_bytes)

ATOL = 1e-5   # float32 GEMM rounding for K <= 512 and O(1) values (see the module docstring)
# Inputs go to the test device (MINILORA_TEST_DEVICE runs the suite on CUDA); results come back to
# the host for NumPy's comparisons.
dev, host = backend.to_device, backend.to_numpy


def _tiny_llama(hidden=64, inter=128, layers=2, heads=4, kv_heads=None):
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


# ================================================================ NF4Linear, the layer
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dq", [False, True])
def test_forward_equals_linear_with_the_dequantized_weight(device, bias, dq):
    lin = Linear(96, 40, bias=bias)
    q = NF4Linear.from_linear(lin, blocksize=64, double_quant=dq)
    W = q.dequantized_weight()                                   # (40, 96) float32
    assert q.qweight.device == device and W.shape == (40, 96)
    ref = Linear(96, 40, bias=bias)
    ref.weight.data = W.copy()
    if bias:
        ref.bias.data = lin.bias.data.copy()
    x = Tensor(backend.to_device(np.random.default_rng(0).standard_normal((2, 5, 96))
                                 .astype(np.float32)))
    got, want = q(x).numpy(), ref(x).numpy()
    assert got.shape == (2, 5, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_gradient_wrt_x_equals_the_autograd_composite():
    """dL/dx of the fused op against x @ W_deq.T built from primitive ops (and their backward)."""
    q = NF4Linear.from_linear(Linear(80, 48, bias=True), double_quant=True)
    W = Tensor(q.dequantized_weight())
    rng = np.random.default_rng(1)
    x1 = Tensor(dev(rng.standard_normal((3, 4, 80)).astype(np.float32)), requires_grad=True)
    x2 = Tensor(x1.data.copy(), requires_grad=True)
    g = rng.standard_normal((3, 4, 48)).astype(np.float32)
    q(x1).backward(g)
    (x2 @ W.T + Tensor(q.bias.data)).backward(g)
    np.testing.assert_allclose(host(x1.grad), host(x2.grad), rtol=0, atol=ATOL)


def test_gradient_in_float64_by_central_differences():
    """The op is linear in x, so central differences in float64 are exact up to rounding."""
    from minilora.testing import gradcheck
    q = NF4Linear.from_weight(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    with backend.default_float_dtype(np.float64):                # on the CPU: NumPy weight and x
        x = Tensor(np.random.default_rng(2).standard_normal((2, 3, 16)), requires_grad=True)
        assert gradcheck(lambda t: (q(t) ** 2).sum(), [x])


def test_frozen_weight_gets_no_gradient_and_no_parameters():
    lin = Linear(64, 32, bias=True)
    q = NF4Linear.from_linear(lin)
    names = [n for n, _ in q.named_parameters()]
    assert names == ["bias"] and not q.bias.requires_grad     # the 4-bit weight is no Parameter
    assert list(q.state_dict()) == ["bias"]
    assert not q.weight.requires_grad and q.weight.shape == (32, 64)
    x = Tensor(dev(np.ones((2, 64), np.float32)), requires_grad=True)
    y = q(x)
    assert y._op == "nf4_linear" and y._prev == (x, q.bias)
    y.sum().backward()
    assert x.grad is not None and q.bias.grad is None
    # the frozen path alone records no graph at all
    assert not q(Tensor(dev(np.ones((2, 64), np.float32)))).requires_grad
    # a trained bias (LoRA's bias="all") does get its gradient
    q.bias.requires_grad = True
    q(Tensor(dev(np.ones((3, 64), np.float32)))).sum().backward()
    np.testing.assert_array_equal(host(q.bias.grad), np.full(32, 3.0, np.float32))


def test_layers_of_one_shape_share_one_buffer_and_backward_dequantizes_again():
    """Two layers of the same shape share a scratch buffer: the second forward overwrites the first
    layer's W, so backward must dequantize again, and gradients must still be right."""
    release_workspace()
    a, b = (NF4Linear.from_linear(Linear(64, 64)) for _ in range(2))
    x = Tensor(dev(np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)),
               requires_grad=True)
    y = b(F.silu(a(x)))                                          # a then b: b's W is in the buffer
    assert workspace_bytes() == 64 * 64 * 4                      # one float32 matrix, not two
    g = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)
    y.backward(g)
    Wa, Wb = Tensor(a.dequantized_weight()), Tensor(b.dequantized_weight())
    x2 = Tensor(x.data.copy(), requires_grad=True)
    (F.silu(x2 @ Wa.T) @ Wb.T).backward(g)
    np.testing.assert_allclose(host(x.grad), host(x2.grad), rtol=0, atol=ATOL)
    release_workspace()
    assert workspace_bytes() == 0


def test_replace_weight_requantizes_and_reports_the_error():
    q = NF4Linear.from_linear(Linear(64, 64), double_quant=True)
    W = q.dequantized_weight() + np.float32(0.01)
    err = q.replace_weight(W)
    assert set(err) == {"mean_abs_error", "max_abs_error", "rmse"} and q.requantization_error is err
    np.testing.assert_array_equal(host(q.dequantized_weight()),
                                  host(quantize_nf4(W, 64, True).dequantize()))
    assert 0 < err["mean_abs_error"] < err["max_abs_error"]
    assert q.qweight.double_quant and q.qweight.blocksize == 64
    with pytest.raises(ValueError, match="shape"):
        q.replace_weight(np.zeros((3, 3), np.float32))


def test_bad_inputs_are_one_line_errors():
    q = NF4Linear.from_linear(Linear(64, 8))
    with pytest.raises(ValueError, match="features"):
        q(Tensor(dev(np.ones((2, 63), np.float32))))
    with pytest.raises(ValueError, match="nn.Linear"):
        NF4Linear.from_linear(object())
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(quantize_nf4(np.ones(64, np.float32)))
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear.from_linear(Linear(64, 8), blocksize=48)


def test_to_linear_and_quantized_state():
    lin = Linear(64, 16, bias=True)
    q = NF4Linear.from_linear(lin)
    f = q.to_linear()
    assert type(f) is Linear and not f.weight.requires_grad
    np.testing.assert_array_equal(host(f.weight.data), host(q.dequantized_weight()))
    np.testing.assert_array_equal(host(f.bias.data), host(lin.bias.data))
    st = q.quantized_state()
    assert st["weight"] is q.qweight and st["bias"] is q.bias.data
    assert q.nbytes == q.qweight.nbytes + 16 * 4


@pytest.mark.interop
@pytest.mark.parametrize("dq", [False, True])
def test_forward_and_input_gradient_equal_bitsandbytes_linear4bit(dq):
    """bitsandbytes' Linear4bit (CPU, nf4, float32 compute) is the outside oracle for the layer."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    W = torch.randn(48, 128)
    ref = bnb.nn.Linear4bit(128, 48, bias=False, compute_dtype=torch.float32,
                            compress_statistics=dq, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, compress_statistics=dq,
                                   quant_type="nf4", blocksize=64)
    ref = ref.to("cpu")                                           # quantizes here
    q = NF4Linear.from_weight(W.numpy(), blocksize=64, double_quant=dq)
    if not dq:   # without double quantization the stored bytes are identical
        np.testing.assert_array_equal(q.qweight.packed, ref.weight.data.numpy().reshape(-1))
    x = torch.randn(2, 3, 128, requires_grad=True)
    y = ref(x)
    y.backward(torch.ones_like(y))
    xt = Tensor(x.detach().numpy(), requires_grad=True)
    yt = q(xt)
    yt.backward(np.ones(yt.shape, np.float32))
    # dq=True: bitsandbytes rounds a few 8-bit absmax codes to the farther neighbour (quant/
    # double_quant.py), moving those blocks' weights by ~1e-6 relative; 1e-4 absolute covers it
    tol = ATOL if not dq else 1e-4
    np.testing.assert_allclose(yt.numpy(), y.detach().numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(xt.grad, x.grad.numpy(), rtol=0, atol=tol)


# ================================================================ whole models
def test_quantize_model_replaces_every_linear_but_lm_head():
    model = _tiny_llama(kv_heads=2)
    names = [n for n, m in model.named_modules() if type(m) is Linear]
    ids = np.random.default_rng(0).integers(0, 259, size=(2, 9))
    order_before = [n for n, _ in model.named_modules()]
    params_before = [n for n, _ in model.named_parameters()]
    weights = {n: model.get_submodule(n).weight.data.copy() for n in names}
    assert quantize_model(model) is model
    q = dict(quantized_modules(model))
    assert sorted(q) == sorted(n for n in names if n != "lm_head")
    assert len(q) == 2 * 7 and type(model.lm_head) is Linear
    assert [n for n, _ in model.named_modules()] == order_before      # positions kept
    assert [n for n, _ in model.named_parameters()] == \
        [n for n in params_before if not n.endswith("_proj.weight")]
    for n, layer in q.items():
        assert layer.qweight.double_quant and layer.qweight.blocksize == 64
        np.testing.assert_array_equal(host(layer.dequantized_weight()),
                                      host(quantize_nf4(weights[n], 64, True).dequantize()))
    # the quantized model equals the float model holding the dequantized weights
    ref = dequantize_model(_clone(model))
    np.testing.assert_allclose(model(ids).numpy(), ref(ids).numpy(), rtol=0, atol=1e-4)


def _clone(model):
    import copy
    return copy.deepcopy(model)


def test_quantize_model_skips_tied_heads_and_named_modules():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=32, tie_word_embeddings=True)
    tied = quantize_model(LlamaForCausalLM(cfg), skip_modules=())
    assert type(tied.lm_head) is Linear        # tied to the embedding: never split in two
    m = quantize_model(_tiny_llama(layers=1), skip_modules=("lm_head", "mlp"))
    assert sorted(n.rsplit(".", 1)[-1] for n, _ in quantized_modules(m)) == \
        ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_bits_per_parameter_is_4_127_measured_from_stored_arrays():
    """Blocksize 64 with double quantization: 4 + 8/64 + 32/(64*256) = 4.126953 bits on large
    matrices, plus the per-tensor offset (32 bits); measured from the arrays the model holds."""
    model = quantize_model(_tiny_llama(hidden=256, inter=512, layers=1, heads=4),
                           blocksize=64, double_quant=True)
    s = quantization_summary(model)
    layers = [m for _, m in quantized_modules(model)]
    stored = sum(a.nbytes for m in layers for a in m.qweight.stored_arrays().values())
    n = sum(m.qweight.size for m in layers)
    assert s["quantized_bytes"] == stored and s["quantized_parameters"] == n
    assert s["quantized_bytes"] == sum(sum(storage_bytes(m.qweight.size, 64, True).values())
                                       for m in layers)
    assert round(s["bits_per_parameter"], 3) == 4.127
    assert 4.126953 < s["bits_per_parameter"] < 4.1275
    no_dq = quantization_summary(quantize_model(_tiny_llama(hidden=256, inter=512, layers=1),
                                                double_quant=False))
    assert no_dq["bits_per_parameter"] == 4.5
    # totals: the 4-bit weights plus every float parameter, against all of it in float32
    assert s["total_bytes"] == s["quantized_bytes"] + s["float_bytes"]
    assert s["float32_bytes"] == 4 * (n + s["float_parameters"])
    assert s["ratio"] > 2


def test_save_and_load_a_quantized_model(tmp_path):
    model = quantize_model(_tiny_llama(layers=1))
    ids = np.random.default_rng(0).integers(0, 259, size=(1, 7))
    path = save_quantized_model(model, tmp_path)
    assert path.name == "model.nf4.safetensors"
    fresh = load_quantized_model(_tiny_llama(layers=1), tmp_path)   # a float model in, 4-bit out
    assert len(quantized_modules(fresh)) == 7
    np.testing.assert_array_equal(fresh(ids).numpy(), model(ids).numpy())
    with pytest.raises(ValueError, match="names no module|shape"):
        load_quantized_model(_tiny_llama(hidden=32, inter=64, layers=1), tmp_path)


@pytest.mark.cuda
def test_cuda_layer_uses_the_kernel_and_matches_the_cpu(cuda_device):
    backend.set_device("cpu")
    lin = Linear(128, 64)
    x = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    cpu = NF4Linear.from_linear(lin, double_quant=True)
    want = cpu(Tensor(x)).numpy()
    backend.set_device("cuda")
    gpu = NF4Linear.from_linear(lin, double_quant=True).to("cuda")
    assert gpu.qweight.device == "cuda"
    xg = Tensor(backend.to_device(x, "cuda"), requires_grad=True)
    y = gpu(xg)
    y.sum().backward()
    np.testing.assert_allclose(y.numpy(), want, rtol=0, atol=ATOL)
    np.testing.assert_allclose(backend.to_numpy(xg.grad),
                               np.ones((4, 64), np.float32) @ cpu.dequantized_weight(),
                               rtol=0, atol=ATOL)


# ================================================================ LoRA on a 4-bit base (QLoRA)
IDS = np.random.default_rng(7).integers(0, 259, size=(2, 11))


def _qlora(targets=("q_proj", "v_proj"), init=True, **kw):
    backend.manual_seed(0)
    model = _tiny_llama(**kw)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                     target_modules=targets if isinstance(targets, str) else list(targets))
    return get_peft_model(model, cfg, quantize="nf4")


def test_get_peft_model_quantize_nf4_trains_only_the_adapters():
    backend.manual_seed(0)
    float_total = _tiny_llama().num_parameters()
    pm = _qlora(targets="all-linear")
    inner = pm.get_base_model()
    layers = pm.lora_layers()
    assert len(layers) == 14 and all(isinstance(m.base_layer, NF4Linear) for _, m in layers)
    assert type(inner.lm_head) is Linear and not inner.lm_head.weight.requires_grad
    assert all(m.base_layer.qweight.double_quant and m.base_layer.qweight.blocksize == 64
               for _, m in layers)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    t, total = pm.get_nb_trainable_parameters()
    assert t == sum(4 * (m.in_features + m.out_features) for _, m in layers)
    assert total == float_total + t          # 4-bit weights count as parameters, as in PEFT
    # one training step: gradients reach A and B only
    opt = AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm(IDS, labels=IDS).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for _, p in pm.named_parameters())
    opt.step()
    assert len(opt.state) == len(trainable)  # optimizer state for the adapters only


def test_fresh_qlora_model_equals_the_quantized_base():
    """B = 0 at initialisation: the QLoRA model computes exactly what the 4-bit base does."""
    backend.manual_seed(0)
    base = quantize_model(_tiny_llama())
    want = base(IDS).numpy()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8))
    np.testing.assert_array_equal(pm(IDS).numpy(), want)


def test_get_peft_model_quantize_errors():
    with pytest.raises(ValueError, match="quantize"):
        get_peft_model(_tiny_llama(), LoraConfig(r=4), quantize="int8")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("batch", [(2, 5), (4, 32)], ids=["side-path", "merged-weight"])
def test_lora_on_a_4bit_base_equals_lora_on_its_dequantized_float_weight(fused, batch):
    """The same adapter (random A and B) on NF4Linear and on a float Linear holding dequant(W0):
    outputs and the gradients of A, B and x agree to float32 rounding. With 128 rows the fused op
    multiplies by the merged weight dequant(W0) + ΔW instead of running the side path; in reference
    mode (fused=False) both layers run the module form."""
    with settings.reference(not fused):
        lin = Linear(96, 48)
        q = NF4Linear.from_linear(lin, double_quant=True)
        f = q.to_linear()
        layers = []
        for base in (q, f):
            layer = LoraLinear(base, "probe")
            backend.manual_seed(3)
            layer.update_layer("default", r=4, lora_alpha=8, init_lora_weights=False)
            layer.set_adapter("default")
            layer.lora_A["default"].requires_grad_(True)
            layer.lora_B["default"].requires_grad_(True)
            layers.append(layer)
        rng = np.random.default_rng(0)
        x0 = rng.standard_normal((*batch, 96)).astype(np.float32)
        g = rng.standard_normal((*batch, 48)).astype(np.float32)
        out = []
        for layer in layers:
            x = Tensor(dev(x0.copy()), requires_grad=True)
            y = layer(x)
            y.backward(g)
            out.append((y.numpy(), host(x.grad), host(layer.lora_A["default"].weight.grad),
                        host(layer.lora_B["default"].weight.grad)))
        for a, b in zip(*out):
            np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)


def peft_on_bitsandbytes_linear4bit(**lora_kw):
    """(W, PEFT model, its q_proj layer): PEFT's adapter (r=4, α=8, random B; ``lora_kw`` added)
    around bitsandbytes' Linear4bit (128 -> 64, CPU, nf4, blocksize 64, no double quantization, so
    its stored bytes are NF4Linear's) holding W = 0.1·N(0, 1) (torch seed 0): outputs O(1), so
    float32 GEMM rounding bounds the comparisons. Skips when torch, bitsandbytes or peft is absent."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32,
                                            compress_statistics=False, quant_type="nf4")

        def forward(self, x):
            return self.q_proj(x)

    torch.manual_seed(0)
    W = 0.1 * torch.randn(64, 128)
    holder = Holder()
    holder.q_proj.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False,
                                             compress_statistics=False, quant_type="nf4",
                                             blocksize=64)
    ref = peft.get_peft_model(holder.to("cpu"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, **lora_kw))
    return W, ref, ref.base_model.model.q_proj


def run_both(ref, ours):
    """One x (2, 3, 128) and upstream gradient g (torch's generator) through PEFT's model and our
    layer, forward and backward: (x, g, y, xt, yt), the torch tensors then ours."""
    import torch
    x = torch.randn(2, 3, 128, requires_grad=True)
    g = torch.randn(2, 3, 64)
    y = ref(x)
    y.backward(g)
    xt = Tensor(x.detach().numpy(), requires_grad=True)
    yt = ours(xt)
    yt.backward(g.numpy())
    return x, g, y, xt, yt


@pytest.mark.interop
def test_lora_on_a_4bit_base_equals_peft_on_bitsandbytes_linear4bit():
    """PEFT's LoRA around bitsandbytes' Linear4bit (CPU, nf4, no double quantization, so the stored
    bytes are identical) vs ours, with the same A and B: outputs and gradients of A, B and x."""
    torch = pytest.importorskip("torch")
    W, ref, ref_layer = peft_on_bitsandbytes_linear4bit()
    ours = LoraLinear(NF4Linear.from_weight(W.numpy(), blocksize=64, double_quant=False), "q_proj")
    ours.update_layer("default", r=4, lora_alpha=8)
    ours.set_adapter("default")
    for mine, theirs in ((ours.lora_A["default"], ref_layer.lora_A["default"]),
                         (ours.lora_B["default"], ref_layer.lora_B["default"])):
        mine.weight.data = theirs.weight.detach().numpy().copy()
        mine.requires_grad_(True)
    np.testing.assert_array_equal(ours.base_layer.qweight.packed,
                                  ref_layer.base_layer.weight.data.numpy().reshape(-1))
    x, g, y, xt, yt = run_both(ref, ours)
    np.testing.assert_allclose(yt.numpy(), y.detach().numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(xt.grad, x.grad.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(ours.lora_A["default"].weight.grad,
                               ref_layer.lora_A["default"].weight.grad.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours.lora_B["default"].weight.grad,
                               ref_layer.lora_B["default"].weight.grad.numpy(), rtol=0, atol=1e-4)


def _trained(pm, seed=5):
    """Random B so that ΔW is not zero (as after training)."""
    rng = np.random.default_rng(seed)
    for _, layer in pm.lora_layers():
        B = layer.lora_B["default"].weight
        B.data = dev((0.1 * rng.standard_normal(B.shape)).astype(np.float32),
                     backend.device_of(B.data))
    return pm


def _merged_in_float(pm) -> dict:
    """{layer name: dequant(W0) + ΔW} for every adapted layer, computed with merge.py's formula."""
    return {name: merge_math.merge_weight(layer.base_layer.dequantized_weight(),
                                          layer.lora_A["default"].weight.data,
                                          layer.lora_B["default"].weight.data, 8, 4)
            for name, layer in pm.lora_layers()}


def test_merge_and_unload_into_a_4bit_base_gives_float_layers_with_dequant_plus_delta():
    pm = _trained(_qlora())
    want_logits = pm(IDS).numpy()
    expected = _merged_in_float(pm)
    merged = pm.merge_and_unload()
    for name, W in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is Linear                            # float: no second rounding
        np.testing.assert_array_equal(host(layer.weight.data), host(W))  # dequant(W0) + ΔW
    # layers LoRA did not touch stay 4-bit
    assert isinstance(merged.get_submodule("model.layers.0.mlp.up_proj"), NF4Linear)
    np.testing.assert_allclose(merged(IDS).numpy(), want_logits, rtol=0, atol=1e-4)


def test_merge_and_unload_requantize_reports_the_extra_error(capsys):
    pm = _trained(_qlora())
    want_logits = pm(IDS).numpy()
    floats = _merged_in_float(pm)
    merged = pm.merge_and_unload(requantize=True)
    errors = requantization_errors(merged)
    assert sorted(errors) == sorted(floats)
    for name, W in floats.items():
        layer = merged.get_submodule(name)
        assert isinstance(layer, NF4Linear)
        np.testing.assert_array_equal(host(layer.dequantized_weight()),
                                      host(quantize_nf4(W, 64, True).dequantize()))
        err = errors[name]
        # NF4's widest gap is 1 - 0.7230: no value moves by more than half of it times its absmax
        bound = 0.139 * float(np.abs(host(W)).max()) * 1.01
        assert 0 < err["mean_abs_error"] < err["max_abs_error"] <= bound
    worst = max(e["max_abs_error"] for e in errors.values())
    mean = np.mean([e["mean_abs_error"] for e in errors.values()])
    with capsys.disabled():
        print(f"\n  re-quantizing merged weights: mean |err| {mean:.2e}, max |err| {worst:.2e}")
    diff = np.abs(merged(IDS).numpy() - want_logits).max()
    assert diff > 1e-4        # re-quantization changes the model (PEFT warns about the same)


def test_merge_adapter_and_unmerge_on_a_4bit_base_requantize_each_time():
    pm = _trained(_qlora())
    name, layer = pm.lora_layers()[0]
    W0 = layer.base_layer.dequantized_weight()
    unmerged = pm(IDS).numpy()
    pm.merge_adapter()
    assert layer.merged and layer.base_layer.requantization_error is not None
    W_merged = layer.base_layer.dequantized_weight()
    delta = layer.get_delta_weight("default")
    np.testing.assert_array_equal(host(W_merged),
                                  host(quantize_nf4(W0 + delta, 64, True).dequantize()))
    assert np.abs(pm(IDS).numpy() - unmerged).max() < 0.5     # close, not exact: 4-bit rounding
    pm.unmerge_adapter()
    assert not layer.merged
    W_back = layer.base_layer.dequantized_weight()
    np.testing.assert_array_equal(host(W_back),
                                  host(quantize_nf4(W_merged - delta, 64, True).dequantize()))


def test_a_qlora_adapter_is_an_ordinary_peft_adapter(tmp_path):
    """Saved from a 4-bit base, the adapter holds only A and B in float32; it loads onto a freshly
    quantized base (same outputs) and onto the float base (outputs differ by the base's rounding)."""
    from minilora.lora import PeftModel
    pm = _trained(_qlora())
    want = pm(IDS).numpy()
    pm.save_pretrained(tmp_path)
    backend.manual_seed(0)
    again = PeftModel.from_pretrained(quantize_model(_tiny_llama()), tmp_path)
    np.testing.assert_array_equal(again(IDS).numpy(), want)
    backend.manual_seed(0)
    on_float = PeftModel.from_pretrained(_tiny_llama(), tmp_path)
    assert 0 < np.abs(on_float(IDS).numpy() - want).max() < 0.5


def test_qlora_with_paged_adamw_equals_adamw():
    from minilora.paged_optim import PagedAdamW
    results = []
    for opt_cls, kw in ((AdamW, {}), (PagedAdamW, {"paged": True})):
        pm = _qlora()
        opt = opt_cls([p for p in pm.parameters() if p.requires_grad], lr=1e-2, **kw)
        for _ in range(3):
            pm(IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
        results.append([p.numpy() for p in pm.parameters() if p.requires_grad])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# ================================================================ fine-tuning the shipped base
@pytest.mark.slow
def test_qlora_finetune_reaches_the_lora_finetune():
    """The demo's recipe (r=8, alpha=16 on q/k/v/o, AdamW, warm-up + cosine) at small settings, once
    on the float32 base (LoRA) and once on its NF4 version (QLoRA), same seed, same batches, same
    A initialisation: they differ only in the base weights.

    Measured with the shipped base (docstrings + copy drills; 60 steps, batch 8, lr 5e-3, 400
    training / 120 held-out examples; ~50 s on 2 cores), seed 0 as asserted: held-out loss LoRA
    4.636 -> 1.620, QLoRA 4.683 -> 1.707 (its base is the 4-bit one); exact match LoRA 16.7%, QLoRA
    8.3%. Seeds 1, 2, 3 (the A initialisation and the batch order): LoRA 6.7 / 18.3 / 12.5%, QLoRA
    6.7 / 21.7 / 13.3%, held-out losses within 0.03: the accuracy gap swings by several points from
    seed to seed (mean over the four seeds: 1.1 points in LoRA's favour). With the
    docstrings-only base before it, at the demo's full settings (300 steps, batch 16, 2000 / 70
    examples; seeds 0, 1, 2), exact match was LoRA 17.1 / 21.4 / 17.1%, QLoRA 18.6 / 17.1 / 15.7%: a
    mean margin of 1.4 points (one answer of 70), at most 4.3 (three answers). Asserted: QLoRA's
    held-out loss within 0.3 of LoRA's, its accuracy no more than 10 points (12 of 120 answers) below.
    """
    from minilora.data import ByteTokenizer, collate, make_instruction_dataset
    from minilora.commands.finetune import exact_match_accuracy, lora_finetune
    from minilora.models import BASE_MODEL_DIR, load_base_model
    from minilora.train import evaluate
    if not (BASE_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("the shipped base model is not built yet (minilora pretrain)")
    tok = ByteTokenizer()
    # 120 held-out answers: with 40 the standard deviation of the LoRA - QLoRA accuracy gap
    # between seeds (~9 points: two correlated rates near 0.2) was as large as the 10-point margin
    train_set, test = make_instruction_dataset(400, 120, seed=0)
    held_out = [collate(test, tok, 128)]
    results = {}
    for quantize in (None, "nf4"):
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                "o_proj"])
        backend.manual_seed(0)
        model = get_peft_model(load_base_model(), config, quantize=quantize)
        before = evaluate(model, held_out)
        model, _ = lora_finetune(model, config, train_set, tok, steps=60, batch_size=8, lr=5e-3,
                                 warmup=5, seed=0, progress=False)
        acc, _ = exact_match_accuracy(model, test, tok)
        results[quantize] = (before, evaluate(model, held_out), acc)
    (b_lora, l_lora, a_lora), (b_q, l_q, a_q) = results[None], results["nf4"]
    print(f"held-out loss LoRA {b_lora:.3f} -> {l_lora:.3f}, QLoRA {b_q:.3f} -> {l_q:.3f}; "
          f"exact match LoRA {a_lora:.1%}, QLoRA {a_q:.1%}")
    assert l_lora < 0.6 * b_lora and l_q < 0.6 * b_q
    assert abs(l_q - l_lora) < 0.3
    assert a_q >= a_lora - 0.10
