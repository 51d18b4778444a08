"""DoRA (Liu et al. 2024): the layer, its gradients, merging, the 4-bit base, files, and PEFT parity.

W' = m · (W0 + s·B·A) / ‖W0 + s·B·A‖ with the norm per output row, detached (``lora/dora.py``).
Checked here: a fresh adapter changes nothing; the layer computes x·W'ᵀ; its gradients equal central
differences (norm held fixed) and PyTorch+PEFT's autograd on the same weights (float64); merging
and unmerging keep the output and give W0 back; a 4-bit base equals a float base holding
dequant(W0); the magnitude's file key is PEFT's, and adapters move both ways with PEFT.

Float32 bounds: a dot product of n terms computed in float32 is off by at most about n·eps·Σ|xᵢ||wᵢ|
(eps = 2⁻²⁴ per rounding); ``f32_bound`` takes twice that (two forms compared) with n = in +
extra_terms + 4: the base product, the low-rank path's r products (``extra_terms=r``) and the few
elementwise roundings of f.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import Tensor, backend, settings
from minilora.lora import LoraConfig, LoraLinear, PeftModel, get_peft_model
from minilora.lora import dora
from minilora.lora.config import AdapterError
from minilora.lora.io import read_adapter_dir, write_safetensors
from minilora.nn import Linear
from minilora.optim import AdamW
from minilora.quant import NF4Linear
from minilora.testing import gradcheck

from _tiny_llama import ids_of, model_of
from test_qlora import peft_on_bitsandbytes_linear4bit, run_both

EPS32 = float(np.finfo(np.float32).eps)


def f32_bound(x, *weights, extra_terms=0):
    """Twice the worst-case float32 error of x·Wᵀ over the given (out, in) weights' magnitudes."""
    x = np.abs(np.asarray(x, np.float64)).reshape(-1, np.shape(x)[-1])
    total = sum(x @ np.abs(np.asarray(w, np.float64)).T for w in weights)        # (N, out)
    n = np.shape(x)[-1] + extra_terms + 4
    return 2 * n * EPS32 * float(total.max())


def dora_layer(base, r=3, alpha=6, seed=1, perturb=0.3, dropout=0.0):
    """A LoraLinear with one DoRA adapter: random nonzero A and B, magnitude m = ‖W0 + ΔW‖ times
    (1 + perturb·noise), all trainable."""
    layer = LoraLinear(base, "probe")
    backend.manual_seed(seed)
    layer.update_layer("default", r=r, lora_alpha=alpha, lora_dropout=dropout,
                       init_lora_weights=False, use_dora=True)
    layer.set_adapter("default")
    m = layer.lora_magnitude_vector["default"]
    noise = np.random.default_rng(seed).standard_normal(m.shape)
    m.data = (m.data * (1 + perturb * noise)).astype(m.data.dtype)
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, m):
        p.requires_grad = True
    return layer


def decomposed_weight(layer, name="default"):
    """W' = m · V / ‖V‖ per row, V = W0 + s·B·A, written out here in float64 (the test's own formula)."""
    W0 = np.asarray(layer.base_layer.weight.data, np.float64)
    A = np.asarray(layer.lora_A[name].weight.data, np.float64)
    B = np.asarray(layer.lora_B[name].weight.data, np.float64)
    m = np.asarray(layer.lora_magnitude_vector[name].data, np.float64)
    V = W0 + layer.scaling[name] * B @ A
    return m[:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)


# ================================================================ config
def test_use_dora_is_a_config_field_written_and_read():
    cfg = LoraConfig(r=4, use_dora=True)
    d = cfg.to_dict()
    assert d["use_dora"] is True
    assert LoraConfig.from_dict(d).use_dora is True
    assert LoraConfig().to_dict()["use_dora"] is False
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig(use_dora="false")       # JSON "false" is a truthy string


# ================================================================ the layer
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_fresh_dora_adapter_leaves_the_output_unchanged(quantized):
    """m starts at ‖W0 + ΔW‖, so f = m / ‖W0 + ΔW‖ = 1: with PEFT's default init (B = 0) the output
    is the base's exactly, and with a nonzero B it is the plain LoRA adapter's output."""
    backend.manual_seed(0)
    base = Linear(24, 16, bias=True)
    if quantized:
        base = NF4Linear.from_linear(base)
    x = Tensor(np.random.default_rng(0).standard_normal((3, 5, 24)).astype(np.float32))
    want = base(x).numpy()
    layer = LoraLinear(base, "probe")
    layer.update_layer("default", r=4, lora_alpha=8, use_dora=True)
    layer.set_adapter("default")
    np.testing.assert_array_equal(layer(x).numpy(), want)

    backend.manual_seed(2)
    lora = LoraLinear(base, "probe")
    lora.update_layer("default", r=4, lora_alpha=8, init_lora_weights=False)
    backend.manual_seed(2)
    dl = LoraLinear(base, "probe")
    dl.update_layer("default", r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    for layer_ in (lora, dl):
        layer_.set_adapter("default")
    with settings.reference():       # both in module form: the same roundings up to f ≈ 1
        got, want = dl(x).numpy(), lora(x).numpy()
    W0, dW = np.asarray(lora._base_weight_array()), lora.get_delta_weight("default")
    np.testing.assert_allclose(got, want, rtol=0, atol=f32_bound(x.data, W0, dW, extra_terms=4))


@pytest.mark.parametrize("bias", [False, True])
def test_layer_computes_x_times_the_decomposed_weight(bias):
    """With m moved off the norm, the layer's output is x·W'ᵀ + b, W' = m·V/‖V‖ row by row."""
    backend.set_default_float(np.float64)
    backend.manual_seed(0)
    layer = dora_layer(Linear(10, 7, bias=bias))
    x = np.random.default_rng(1).standard_normal((4, 10))
    want = x @ decomposed_weight(layer).T + (layer.base_layer.bias.data if bias else 0)
    np.testing.assert_allclose(layer(Tensor(x)).numpy(), want, rtol=0, atol=1e-12)
    assert layer.lora_magnitude_vector["default"].shape == (7,)
    assert not layer._fusable(["default"])         # a DoRA adapter never takes the fused op


@given(inn=st.integers(1, 6), out=st.integers(1, 6), r=st.integers(1, 3), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_dora_forward_gradcheck_float64(inn, out, r, batch, seed):
    """dL/dx, dL/dA, dL/dB, dL/dm of the DoRA term by central differences, with the norm held fixed
    (it is detached: a constant for backward, so the numeric derivative must not move it)."""
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((out, inn))
    A, B = rng.standard_normal((r, inn)), rng.standard_normal((out, r))
    norm = dora.weight_norm(W0, A, B, 0.7)
    m = norm * (1 + 0.3 * rng.standard_normal(out))
    x = rng.standard_normal((batch, inn))
    for with_base in (False, True):
        def fn(x_, A_, B_, m_):
            base = x_ @ Tensor(W0).T if with_base else None          # (batch, in) @ (in, out)
            return dora.dora_forward(x_, W0, A_, B_, m_, 0.7, norm, base)
        assert gradcheck(fn, [x, A, B, m], names=["x", "lora_A", "lora_B", "magnitude"])


def test_dropout_recomputes_the_base_term_on_the_dropped_input():
    """Training with dropout (PEFT's rule): the DoRA term sees dropout(x) in both its parts, the
    base layer x itself: h = W0·x + (f − 1)·W0·x̃ + f·s·B·A·x̃, x̃ the same dropped x."""
    backend.set_default_float(np.float64)
    backend.manual_seed(0)
    layer = dora_layer(Linear(12, 5), dropout=0.4)
    layer.train()
    x = np.random.default_rng(3).standard_normal((6, 12))
    backend.manual_seed(9)
    got = layer(Tensor(x)).numpy()
    backend.manual_seed(9)
    from minilora import functional as F
    dropped = F.dropout(Tensor(x), 0.4, True).numpy()
    W0 = layer.base_layer.weight.data
    Wd = decomposed_weight(layer)
    want = x @ W0.T + dropped @ (Wd - W0).T        # W0·x + (W'·x̃ − W0·x̃)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert not np.allclose(dropped, x)


def test_only_a_b_and_the_magnitude_train_and_adamw_moves_them():
    model = get_peft_model(model_of(), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                  target_modules="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_layers = len(model.lora_layers())
    assert len(trainable) == 3 * n_layers
    assert sum(n.endswith(".lora_magnitude_vector.default") for n in trainable) == n_layers
    t, _ = model.get_nb_trainable_parameters()
    assert t == sum(4 * (m.in_features + m.out_features) + m.out_features for _, m in model.lora_layers())
    ids = ids_of()
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    m0 = model.lora_layers()[0][1].lora_magnitude_vector["default"].data.copy()
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert not np.array_equal(model.lora_layers()[0][1].lora_magnitude_vector["default"].data, m0)


def test_delete_adapter_removes_the_magnitude():
    model = get_peft_model(model_of(), LoraConfig(r=2, use_dora=True))
    model.add_adapter("plain", LoraConfig(r=2))
    model.delete_adapter("default")
    for _, layer in model.lora_layers():
        assert "default" not in layer.lora_magnitude_vector and "default" not in layer.use_dora


# ================================================================ merging
@given(inn=st.integers(1, 8), out=st.integers(1, 8), r=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_unmerge_of_merge_gives_the_weight_back_float64(inn, out, r, seed):
    """Property: W' = f·(W + ΔW) then W'/f − ΔW with the same kept norm is W again, to float64
    rounding (|W| ~ 1, f ~ 1: a few eps64)."""
    rng = np.random.default_rng(seed)
    W0, A, B = rng.standard_normal((out, inn)), rng.standard_normal((r, inn)), rng.standard_normal((out, r))
    norm = dora.weight_norm(W0, A, B, 0.5)
    m = norm * rng.uniform(0.5, 1.5, out)
    merged = dora.merged_weight(W0, A, B, 0.5, m, norm)
    V = W0 + 0.5 * B @ A
    np.testing.assert_allclose(merged, m[:, None] * V / np.linalg.norm(V, axis=1, keepdims=True),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(merged, axis=1), m, rtol=1e-12)   # rows of length m
    np.testing.assert_allclose(dora.unmerged_weight(merged, A, B, 0.5, m, norm), W0,
                               rtol=0, atol=1e-12 * (1 + np.abs(V).max()))


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_merged_output_equals_unmerged_and_unmerge_restores_w0(quantized):
    backend.manual_seed(0)
    base = Linear(32, 20, bias=True)
    base.weight.data *= 4
    if quantized:
        base = NF4Linear.from_linear(base)
    layer = dora_layer(base, r=4)
    layer.eval()
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    W0 = np.array(layer._base_weight_array())
    unmerged = layer(Tensor(x)).numpy()
    if quantized:
        layer.dequantize_base()        # merge into dequant(W0) in float32, no second rounding
    layer.merge()
    assert layer.merged and "default" in layer._dora_norm
    merged = layer(Tensor(x)).numpy()
    W, dW = np.asarray(layer.base_layer.weight.data), layer.get_delta_weight("default")
    f_max = float(np.abs(layer.lora_magnitude_vector["default"].data / layer._dora_norm["default"]).max())
    # merged: x·W'ᵀ; unmerged: W0·x and B·(A·x), each scaled by f
    np.testing.assert_allclose(merged, unmerged, rtol=0,
                               atol=f32_bound(x, W) + f_max * f32_bound(x, W0, dW, extra_terms=4))
    layer.unmerge()
    assert not layer.merged and not layer._dora_norm
    # W/f − ΔW in float32: W0 comes back to a few ulps of the rows' size
    row = np.abs(W0).max(axis=1, keepdims=True) + np.abs(layer.get_delta_weight("default")).max()
    assert (np.abs(layer.base_layer.weight.data - W0) <= 8 * EPS32 * row).all()


def test_lora_then_dora_merged_equals_both_unmerged():
    """Two active adapters, LoRA then DoRA: PEFT's DoRA term scales the output so far, and its merge
    scales the weight so far, f·(W0 + ΔW1 + ΔW2), with the norm of the unmerged W0 + ΔW2 (the base
    with the earlier merge taken out again). Merged, unmerged and unmerge's W0 agree."""
    backend.set_default_float(np.float64)
    backend.manual_seed(0)
    layer = LoraLinear(Linear(9, 6), "probe")
    layer.update_layer("plain", r=2, lora_alpha=2, init_lora_weights=False)
    layer.update_layer("dora", r=3, lora_alpha=3, init_lora_weights=False, use_dora=True)
    layer.lora_magnitude_vector["dora"].data *= 1.3
    layer.set_adapter(["plain", "dora"])
    layer.eval()
    W0 = layer.base_layer.weight.data.copy()
    x = np.random.default_rng(1).standard_normal((4, 9))
    unmerged = layer(Tensor(x)).numpy()
    layer.merge()
    np.testing.assert_allclose(layer(Tensor(x)).numpy(), unmerged, rtol=0, atol=1e-12)
    V2 = W0 + layer.get_delta_weight("dora")
    np.testing.assert_allclose(layer._dora_norm["dora"], np.linalg.norm(V2, axis=1), rtol=1e-13)
    layer.unmerge()
    np.testing.assert_allclose(layer.base_layer.weight.data, W0, rtol=0, atol=1e-13)


def test_safe_merge_refuses_a_nan_magnitude_and_keeps_w0():
    backend.manual_seed(0)
    layer = dora_layer(Linear(8, 4))
    W0 = layer.base_layer.weight.data.copy()
    layer.lora_magnitude_vector["default"].data[1] = np.nan
    with pytest.raises(ValueError, match="safe_merge"):
        layer.merge(safe_merge=True)
    np.testing.assert_array_equal(layer.base_layer.weight.data, W0)
    assert not layer.merged


def test_dora_trace_lists_magnitude_and_direction():
    rng = np.random.default_rng(0)
    W0, A, B = rng.standard_normal((5, 7)), rng.standard_normal((2, 7)), rng.standard_normal((5, 2))
    m = rng.uniform(1, 2, 5)
    x = rng.standard_normal((3, 7))
    trace = dora.dora_trace(W0, A, B, m, lora_alpha=4, r=2, x=x)
    assert list(trace)[:9] == ["scaling", "delta_W", "V", "norm", "magnitude", "scale_f", "direction",
                               "W_merged", "W_unmerged"]
    v = trace.values_of()
    np.testing.assert_allclose(np.linalg.norm(v["direction"], axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(v["W_merged"], axis=1), m, rtol=1e-12)
    np.testing.assert_allclose(v["W_unmerged"], W0, atol=1e-12)
    assert v["max_diff"] < 1e-12
    assert "m / ‖V‖" in str(trace) and trace["norm"].shape == (5,)
    with pytest.raises(ValueError, match="one number per output row"):
        dora.dora_trace(W0, A, B, m[:3], lora_alpha=4, r=2)


# ================================================================ QDoRA: a 4-bit base
def test_dora_on_a_4bit_base_equals_dora_on_its_dequantized_float_weight():
    """The norm uses dequant(W0) (PEFT's bnb DoRA): the same adapter on NF4Linear and on a float
    Linear holding dequant(W0) gives the same output and gradients of x, A, B and m (both bases
    multiply by the same dequantized array, so the two agree bit for bit on the CPU)."""
    backend.manual_seed(0)
    q = NF4Linear.from_linear(Linear(64, 40))
    layers = [dora_layer(base, r=4, seed=3) for base in (q, q.to_linear())]
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 5, 64)).astype(np.float32)
    g = rng.standard_normal((2, 5, 40)).astype(np.float32)
    got = []
    for layer in layers:
        x = Tensor(x0.copy(), requires_grad=True)
        y = layer(x)
        y.backward(g)
        got.append([y.numpy(), x.grad, layer.lora_A["default"].weight.grad,
                    layer.lora_B["default"].weight.grad, layer.lora_magnitude_vector["default"].grad])
    for a, b in zip(*got):   # the same float32 operations on the same arrays: bit for bit
        np.testing.assert_array_equal(a, b)


def test_get_peft_model_nf4_with_dora_starts_at_the_4bit_base_and_trains():
    from minilora.quant import quantize_model
    ids = ids_of()
    want = quantize_model(model_of())(ids).numpy()
    pm = get_peft_model(model_of(), LoraConfig(r=4, lora_alpha=8, use_dora=True), quantize="nf4")
    assert all(isinstance(m.base_layer, NF4Linear) for _, m in pm.lora_layers())
    np.testing.assert_array_equal(pm(ids).numpy(), want)
    pm(ids, labels=ids).loss.backward()
    assert all(m.lora_magnitude_vector["default"].grad is not None for _, m in pm.lora_layers())


# ================================================================ files
def _saved_dora(tmp_path):
    model = get_peft_model(model_of(), LoraConfig(r=2, lora_alpha=4, use_dora=True,
                                                  init_lora_weights=False))
    for _, layer in model.lora_layers():
        layer.lora_magnitude_vector["default"].data *= 1.1
    model.save_pretrained(tmp_path)
    return model


def test_magnitude_is_saved_under_peft_key_and_loaded(tmp_path):
    model = _saved_dora(tmp_path)
    config, tensors = read_adapter_dir(tmp_path)
    assert config.use_dora
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert tensors[key].shape == (model.get_base_model().config.hidden_size,)
    assert sum(k.endswith(".lora_magnitude_vector") for k in tensors) == len(model.lora_layers())
    loaded = PeftModel.from_pretrained(model_of(), tmp_path)
    ids = ids_of()
    np.testing.assert_array_equal(loaded(ids).numpy(), model(ids).numpy())


@pytest.mark.parametrize("damage", ["shape", "missing", "not_dora"])
def test_bad_magnitude_files_are_one_line_adapter_errors(tmp_path, damage):
    _saved_dora(tmp_path)
    config, tensors = read_adapter_dir(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    if damage == "shape":
        tensors[key] = tensors[key][:-1]
    elif damage == "missing":
        del tensors[key]
    else:
        import json
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        cfg["use_dora"] = False
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    write_safetensors(str(tmp_path / "adapter_model.safetensors"), tensors)
    with pytest.raises(AdapterError) as e:
        PeftModel.from_pretrained(model_of(), tmp_path)
    assert "\n" not in str(e.value) and "magnitude" in str(e.value)


# ================================================================ PyTorch + PEFT, the oracle
try:
    from test_peft_interop import (assert_close, assert_loads_in_peft, base_dir,  # noqa: F401
                                   hf_base, hf_logits, mini_base, mini_logits)
    import peft
    import torch
    HAVE_PEFT = True
except (ImportError, pytest.skip.Exception):
    HAVE_PEFT = False

def _peft_dora_linear(W, A, B, m, alpha, bias=None, dropout=0.0):
    """PEFT's DoRA around a torch Linear holding W (and bias), with A, B and m copied in."""
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=bias is not None,
                                       dtype=torch.float64)

        def forward(self, x):
            return self.lin(x)

    holder = Holder()
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=A.shape[0], lora_alpha=alpha, use_dora=True,
                                                     lora_dropout=dropout, target_modules=["lin"]))
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(W))
        if bias is not None:
            layer.base_layer.bias.copy_(torch.from_numpy(bias))
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m))
    return pm, layer


@pytest.mark.interop
@pytest.mark.skipif(not HAVE_PEFT, reason="interop needs torch, transformers and peft")
@given(inn=st.integers(1, 7), out=st.integers(1, 7), r=st.integers(1, 3), batch=st.integers(1, 4),
       seed=st.integers(0, 2**16), bias=st.booleans())
def test_gradients_equal_peft_dora_float64(inn, out, r, batch, seed, bias):
    """Output and dL/dx, dL/dA, dL/dB, dL/dm equal PyTorch autograd through PEFT's DoRA layer on the
    same float64 weights (the norm detached on both sides), to float64 rounding."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, inn))
    A, B = rng.standard_normal((r, inn)), rng.standard_normal((out, r))
    b = rng.standard_normal(out) if bias else None
    norm = np.linalg.norm(W + (4 / r) * B @ A, axis=1)
    m = norm * rng.uniform(0.5, 1.5, out)
    x = rng.standard_normal((batch, inn))
    g = rng.standard_normal((batch, out))
    pm, ref = _peft_dora_linear(W, A, B, m, alpha=4, bias=b)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = pm(xt)
    y.backward(torch.from_numpy(g))

    base = Linear(inn, out, bias=bias)
    base.weight.data = W.copy()
    if bias:
        base.bias.data = b.copy()
    layer = LoraLinear(base, "lin")
    layer.update_layer("default", r=r, lora_alpha=4, use_dora=True)
    layer.set_adapter("default")
    layer.lora_A["default"].weight.data = A.copy()
    layer.lora_B["default"].weight.data = B.copy()
    layer.lora_magnitude_vector["default"].data = m.copy()
    xm = Tensor(x.copy(), requires_grad=True)
    ym = layer(xm)
    ym.backward(g)
    pairs = [(ym.numpy(), y), (xm.grad, xt.grad),
             (layer.lora_A["default"].weight.grad, ref.lora_A["default"].weight.grad),
             (layer.lora_B["default"].weight.grad, ref.lora_B["default"].weight.grad),
             (layer.lora_magnitude_vector["default"].grad, ref.lora_magnitude_vector["default"].weight.grad)]
    for mine, theirs in pairs:
        theirs = theirs.detach().numpy()
        np.testing.assert_allclose(mine, theirs, rtol=1e-10, atol=1e-10 * (1 + np.abs(theirs).max()))


def _train_a_few_steps(model, steps=3):
    ids = np.random.default_rng(3).integers(0, 259, size=(2, 9))
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return model


@pytest.mark.interop
@pytest.mark.skipif(not HAVE_PEFT, reason="interop needs torch, transformers and peft")
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_dora_trained_here_loads_in_peft(base_dir, tmp_path):
    model = get_peft_model(mini_base(base_dir), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                           target_modules="all-linear"))
    _train_a_few_steps(model)
    layer = model.lora_layers()[0][1]
    assert np.abs(layer.lora_B["default"].weight.data).max() > 0
    assert_loads_in_peft(model, base_dir, tmp_path, effect=1e-3)


@pytest.mark.interop
@pytest.mark.skipif(not HAVE_PEFT, reason="interop needs torch, transformers and peft")
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_peft_dora_adapter_loads_here(base_dir, tmp_path):
    torch.manual_seed(0)
    hf = peft.get_peft_model(hf_base(base_dir), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
        init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    hf.eval()
    want = hf_logits(hf)
    hf.save_pretrained(str(tmp_path))
    model = PeftModel.from_pretrained(mini_base(base_dir), tmp_path)
    assert model.peft_config["default"].use_dora
    assert_close(mini_logits(model), want)
    model.merge_adapter()
    assert_close(mini_logits(model), want)
    model.unmerge_adapter()
    assert_close(mini_logits(model), want)
    assert_close(mini_logits(model.merge_and_unload()), want)


@pytest.mark.interop
def test_dora_on_a_4bit_base_equals_peft_on_bitsandbytes_linear4bit():
    """QDoRA against PEFT's DoRA around bitsandbytes' Linear4bit (nf4, CPU, same stored bytes):
    the norm is taken of dequant(W0) on both sides; outputs and gradients agree to float32."""
    W, ref, ref_layer = peft_on_bitsandbytes_linear4bit(use_dora=True)
    with torch.no_grad():
        ref_layer.lora_magnitude_vector["default"].weight.mul_(1.25)
    ours = LoraLinear(NF4Linear.from_weight(W.numpy(), blocksize=64, double_quant=False), "q_proj")
    ours.update_layer("default", r=4, lora_alpha=8, use_dora=True)
    ours.set_adapter("default")
    pairs = [(ours.lora_A["default"].weight, ref_layer.lora_A["default"].weight),
             (ours.lora_B["default"].weight, ref_layer.lora_B["default"].weight),
             (ours.lora_magnitude_vector["default"], ref_layer.lora_magnitude_vector["default"].weight)]
    for mine, theirs in pairs:
        mine.data = theirs.detach().numpy().copy()
        mine.requires_grad = True
    x, g, y, xt, yt = run_both(ref, ours)
    Wq, dW = np.asarray(ours._base_weight_array()), ours.get_delta_weight("default")
    # W' = f·V with f = 1.25 (m scaled by 1.25 from ‖V‖), |V| <= |W0| + |ΔW|
    np.testing.assert_allclose(yt.numpy(), y.detach().numpy(), rtol=0,
                               atol=1.25 * f32_bound(x.detach().numpy(), Wq, dW, extra_terms=4))
    # dL/dx sums g's rows against the columns of f·V: the same bound with g and Vᵀ
    np.testing.assert_allclose(xt.grad, x.grad.numpy(), rtol=0,
                               atol=1.25 * f32_bound(g.numpy(), Wq.T, dW.T, extra_terms=4))
    for mine, theirs in pairs:
        # a sum over the 6 rows of products that each carry the output's rounding, (128 + 6)·eps
        # relative to the gradient's size: 1e-5 covers it
        t = theirs.grad.numpy()
        np.testing.assert_allclose(mine.grad, t, rtol=0, atol=1e-5 * (1 + np.abs(t).max()))
