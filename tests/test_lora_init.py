"""PiSSA, OLoRA and LoftQ (``lora/init.py``): each init's identity, the conversion to plain LoRA, and
PEFT parity.

Checked here: PiSSA and OLoRA keep base' + s·B·A = W0 (the layer's output is unchanged at step 0);
PiSSA's s·B·A is the best rank-r approximation of W0 (its residual holds exactly the tail of the
spectrum) with the singular values split evenly between A and B, and "pissa_niter_K" approaches it
as K grows; OLoRA's B has orthonormal columns; LoftQ's error ‖W − (Q + s·B·A)‖ does not grow from
one alternation to the next and is below plain NF4's ‖W − NF4(W)‖; a trained PiSSA/OLoRA adapter
saved with ``path_initial_model_for_weight_conversion`` is a plain LoRA of rank 2r that gives the
trained model's output on the original base. Against PEFT (``interop``): the residual base and B·A
of each init, LoftQ against PEFT's algorithm with bitsandbytes' NF4, and the converted adapter loaded
by PEFT on the original base.

Bounds: identities are checked in float64 to 1e-12 of the weights' scale (a few roundings of
2⁻⁵³). Float32 comparisons use eps = 2⁻²⁴: a length-n dot product is off by at most n·eps·Σ|terms|,
two float32 SVDs of the same matrix differ in their rank-r part by about eps·σ₁·(1 + σ₁/(σ_r − σ_{r+1}))
(the subspace's sensitivity to a perturbation of size eps·σ₁, Wedin's theorem), and two Householder
QRs by n·eps·σ₁ (their backward error); each times 8 for the several LAPACK steps behind one result.
"""
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import backend
from minilora.lora import LoraConfig, LoraLinear, PeftModel, get_peft_model
from minilora.lora import init as lora_init
from minilora.lora.io import read_adapter_dir
from minilora.nn import Linear
from minilora.optim import AdamW
from minilora.quant import NF4Linear, dequantize_nf4, quantize_nf4

from _lora_toy import ToyLM
from _tiny_llama import model_of

EPS32 = float(np.finfo(np.float32).eps)
FROM_BASE = ["pissa", "pissa_niter_3", "olora"]   # the inits whose base' + s·B·A is W0 exactly


def weight(out_f, in_f, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal((out_f, in_f)).astype(dtype)


def decaying(out_f, in_f, ratio=0.7, seed=0):
    """A weight with singular values ratio**i (trained weights' spectra decay; a Gaussian one is flat)."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((out_f, min(out_f, in_f))))   # (out, k)
    V, _ = np.linalg.qr(rng.standard_normal((in_f, min(out_f, in_f))))    # (in, k)
    S = ratio ** np.arange(min(out_f, in_f))
    return (U * S) @ V.T, S                                               # (out, k) @ (k, in)


def layer_with(W, init, r=4, alpha=8, **kw):
    """A LoraLinear around a Linear holding W, with one adapter initialised by ``init``."""
    lin = Linear(W.shape[1], W.shape[0])
    lin.weight.data = W.copy()
    layer = LoraLinear(lin, module_name="proj")
    layer.update_layer("default", r, alpha, init_lora_weights=init, **kw)
    layer.set_adapter("default")
    return layer


def factors(layer, name="default"):
    return layer.lora_A[name].weight.data, layer.lora_B[name].weight.data, layer.scaling[name]


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_1", "pissa_niter_16", "olora"])
def test_config_accepts_the_inits_that_start_from_w0(init):
    cfg = LoraConfig(init_lora_weights=init)
    assert LoraConfig.from_dict(cfg.to_dict()).init_lora_weights == init


@pytest.mark.parametrize("init", ["pissa_niter_0", "pissa_niter_", "pissa_niter_-2", "pissa_niter_x",
                                  "PiSSA", "corda", "loftq_niter_2", "eva"])
def test_config_refuses_other_init_names_in_one_line(init):
    with pytest.raises(ValueError, match="init_lora_weights") as e:
        LoraConfig(init_lora_weights=init)
    assert "\n" not in str(e.value)


def test_loftq_config_is_peft_json_and_checked():
    cfg = LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 3})
    assert cfg.to_dict()["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 3}   # PEFT's vars(LoftQConfig)
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    assert LoraConfig().to_dict()["loftq_config"] == {}                         # PEFT's "off" value
    for bad, pattern in [({}, "needs loftq_config"), ({"loftq_bits": 8}, "loftq_bits=4"),
                         ({"loftq_iter": 0}, "loftq_iter"), ({"loftq_iter": True}, "loftq_iter"),
                         ({"bits": 4}, "only")]:
        with pytest.raises(ValueError, match=pattern):
            LoraConfig(init_lora_weights="loftq", loftq_config=bad)
    with pytest.warns(UserWarning, match="ignored"):          # PEFT drops it with a warning too
        assert LoraConfig(loftq_config={"loftq_iter": 2}).loftq_config == {}


def test_loftq_with_a_scaling_other_than_one_warns_that_peft_rebuilds_another_base():
    """PEFT 0.21 splits LoftQ's residual without the scaling: only at lora_alpha / r = 1 do both
    libraries rebuild the same base from one adapter file, so any other scaling is said aloud."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraConfig(r=8, lora_alpha=8, init_lora_weights="loftq", loftq_config={"loftq_iter": 1})
        LoraConfig(r=4, lora_alpha=2, use_rslora=True, init_lora_weights="loftq",
                   loftq_config={"loftq_iter": 1})                             # α/√r = 1
    with pytest.warns(UserWarning, match="lora_alpha = r"):
        LoraConfig(r=8, lora_alpha=16, init_lora_weights="loftq", loftq_config={"loftq_iter": 1})


# ------------------------------------------------------------------ PiSSA and OLoRA keep W0
@pytest.mark.parametrize("init", FROM_BASE)
def test_base_plus_adapter_is_w0_so_the_output_is_unchanged_float64(init):
    with backend.default_float_dtype(np.float64):
        W0 = weight(12, 20)
        layer = layer_with(W0, init, r=4, alpha=6)
        A, B, s = factors(layer)
        assert A.shape == (4, 20) and B.shape == (12, 4) and A.dtype == np.float64
        residual = layer.base_layer.weight.data
        assert np.abs(residual - W0).max() > 0.1                 # the base DID change
        np.testing.assert_allclose(residual + s * (B @ A), W0, rtol=0, atol=1e-12 * np.abs(W0).max())
        x = np.random.default_rng(1).standard_normal((3, 20))
        np.testing.assert_allclose(layer(x).numpy(), x @ W0.T, rtol=0, atol=1e-12 * 20 * np.abs(W0).max())


@given(out_f=st.integers(2, 12), in_f=st.integers(2, 12), data=st.data(),
       alpha=st.sampled_from([1, 4, 16]), rslora=st.booleans())
def test_pissa_is_the_best_rank_r_approximation_split_evenly(out_f, in_f, data, alpha, rslora):
    r = data.draw(st.integers(1, min(out_f, in_f)))
    W0 = weight(out_f, in_f, seed=out_f * 13 + in_f)
    with backend.default_float_dtype(np.float64):
        A, B, s = factors(layer_with(W0, "pissa", r=r, alpha=alpha, use_rslora=rslora))
    S = np.linalg.svd(W0, compute_uv=False)
    residual = W0 - s * (B @ A)
    # Eckart-Young: the best rank-r approximation leaves exactly the tail of the spectrum behind
    np.testing.assert_allclose(np.sum(residual ** 2), np.sum(S[r:] ** 2), rtol=0,
                               atol=1e-12 * np.sum(S ** 2))
    # PEFT's form: B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ, so BᵀB = A·Aᵀ = diag(S_r/s)
    np.testing.assert_allclose(B.T @ B, np.diag(S[:r] / s), rtol=0, atol=1e-12 * S[0] / s)
    np.testing.assert_allclose(A @ A.T, np.diag(S[:r] / s), rtol=0, atol=1e-12 * S[0] / s)


def test_pissa_niter_approaches_the_truncated_svd_as_k_grows():
    """Randomized SVD without oversampling (PEFT's svd_lowrank(W, r, niter)): each subspace iteration
    shrinks the basis's error by (σ_{r+1}/σ_r)², so the excess of ‖residual‖² over the best one
    (quadratic in that error) by about (σ_{r+1}/σ_r)⁴ = 0.7⁴ = 0.24 here (measured: 0.24 per step;
    allowed: 0.30)."""
    W0, S = decaying(40, 24)
    r, tail = 4, np.sum(S[4:] ** 2)
    excess = []
    for k in (1, 2, 4, 8):
        backend.manual_seed(0)
        A, B, residual = lora_init.pissa(W0, r, 2.0, niter=k)
        np.testing.assert_allclose(residual + 2.0 * (B @ A), W0, rtol=0, atol=1e-12)
        excess.append(np.sum(residual ** 2) / tail - 1)
    for (k1, e1), (k2, e2) in zip(zip((1, 2, 4, 8), excess), zip((2, 4, 8), excess[1:])):
        assert 0 <= e2 <= e1 * 0.30 ** (k2 - k1), excess


def test_svd_lowrank_matches_the_svd_on_a_wide_matrix():
    W0, S = decaying(10, 30, ratio=0.3)        # wide: the algorithm works on the transpose
    U, S_r, V = lora_init.svd_lowrank(W0, 3, niter=6)
    assert U.shape == (10, 3) and V.shape == (30, 3)
    np.testing.assert_allclose(S_r, S[:3], rtol=1e-9)
    np.testing.assert_allclose((U * S_r) @ V.T, (U * S_r) @ V.T @ V @ V.T, atol=1e-12)  # V orthonormal
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)


def test_olora_b_has_orthonormal_columns_and_a_is_r_of_the_qr():
    with backend.default_float_dtype(np.float64):
        W0 = weight(16, 10)
        A, B, s = factors(layer_with(W0, "olora", r=5, alpha=10))
    np.testing.assert_allclose(B.T @ B, np.eye(5), rtol=0, atol=1e-13)
    assert np.all(np.tril(A, -1) == 0)                       # R's rows: upper trapezoidal
    Q, R = np.linalg.qr(W0)
    np.testing.assert_allclose(B @ A, Q[:, :5] @ R[:5], rtol=0, atol=1e-12 * np.abs(W0).max())


def test_olora_on_a_4bit_base_stores_the_residual_in_4_bits():
    """As PEFT on a bitsandbytes layer: dequantize, take the QR, re-quantize the residual. The sum is
    dequant(W0) up to that one re-quantization, at most half an NF4 step (≤ 0.16·absmax) per value."""
    W0 = weight(16, 64, dtype=np.float32)
    lin = Linear(64, 16)
    lin.weight.data = W0
    base = NF4Linear.from_linear(lin)
    before = base.dequantized_weight()
    layer = LoraLinear(base, module_name="proj")
    layer.update_layer("default", 4, 8, init_lora_weights="olora")
    A, B, s = factors(layer)
    after = base.dequantized_weight() + s * (B @ A)
    assert np.abs(after - before).max() <= 0.17 * np.abs(before).max()
    assert np.abs(base.dequantized_weight() - before).max() > 0.1     # the residual replaced W0


def test_pissa_and_loftq_refuse_a_4bit_base_and_oversized_ranks_in_one_line():
    lin = Linear(64, 16)
    for init, kw in [("pissa", {}), ("loftq", {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}})]:
        layer = LoraLinear(NF4Linear.from_linear(lin), module_name="q_proj")
        with pytest.raises(ValueError, match="float model") as e:
            layer.update_layer("default", 4, 8, init_lora_weights=init, **kw)
        assert "q_proj" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="larger than min"):
        layer_with(weight(6, 8), "olora", r=7)
    with pytest.raises(ValueError, match="lora_alpha > 0"):
        layer_with(weight(6, 8), "pissa", r=2, alpha=-2)


# ------------------------------------------------------------------ LoftQ
@pytest.mark.parametrize("scaling", [0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_loftq_error_does_not_grow_and_beats_plain_nf4(seed, scaling):
    W = weight(64, 48, seed=seed, dtype=np.float32)
    plain = np.linalg.norm(W - dequantize_nf4(quantize_nf4(W)))
    errors = []
    for A, B, Q in lora_init.loftq_iterations(W, 8, scaling, num_iter=5):
        np.testing.assert_array_equal(dequantize_nf4(quantize_nf4(Q)), Q)   # Q holds NF4 values
        errors.append(float(np.linalg.norm(W - (Q + scaling * (B @ A)))))
        # s·B·A is the best rank-8 fit of what quantization lost (Eckart-Young, as for PiSSA)
        S = np.linalg.svd((W - Q).astype(np.float64), compute_uv=False)
        assert abs(errors[-1] ** 2 - np.sum(S[8:] ** 2)) <= 1e-4 * np.sum(S ** 2)
    assert errors[0] < plain
    # one rounding of the float32 sum per element: ‖·‖ moves by about eps·‖W‖ at most
    slack = 4 * EPS32 * float(np.linalg.norm(W))
    assert all(later <= earlier + slack for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_loftq_on_a_layer_stores_the_nf4_values_in_the_float_base():
    W0 = weight(32, 64, dtype=np.float32)
    layer = layer_with(W0, "loftq", r=4, alpha=4, loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    A, B, s = factors(layer)
    want_A, want_B, want_Q = lora_init.loftq(W0, 4, s, num_iter=2)
    np.testing.assert_array_equal(layer.base_layer.weight.data, want_Q)
    np.testing.assert_array_equal(A, want_A)
    np.testing.assert_array_equal(B, want_B)


# ------------------------------------------------------------------ conversion to plain LoRA
def test_to_plain_lora_is_the_trained_adapter_on_w0_float64():
    with backend.default_float_dtype(np.float64):
        W0 = weight(12, 20)
        layer = layer_with(W0, "pissa", r=3, alpha=6)
        A0, B0, s = factors(layer)
        A0, B0 = A0.copy(), B0.copy()                             # the adapter right after init
        rng = np.random.default_rng(2)
        layer.lora_A["default"].weight.data += 0.1 * rng.standard_normal(A0.shape)   # "training"
        layer.lora_B["default"].weight.data += 0.1 * rng.standard_normal(B0.shape)
        A, B, _ = factors(layer)
    cfg = LoraConfig(r=3, lora_alpha=6, init_lora_weights="pissa")
    key = "base_model.model.proj.lora_{}.weight"
    new_cfg, state = lora_init.to_plain_lora(cfg, {key.format("A"): A, key.format("B"): B},
                                             {key.format("A"): A0, key.format("B"): B0})
    assert (new_cfg.r, new_cfg.lora_alpha, new_cfg.init_lora_weights) == (6, 12, True)
    A2, B2 = state[key.format("A")], state[key.format("B")]
    assert A2.shape == (6, 20) and B2.shape == (12, 6)
    s2 = new_cfg.lora_alpha / new_cfg.r
    trained = layer.base_layer.weight.data + s * (B @ A)
    np.testing.assert_allclose(W0 + s2 * (B2 @ A2), trained, rtol=0, atol=1e-12 * np.abs(W0).max())


def test_converted_config_keeps_the_scaling_with_rslora_and_patterns():
    rs = lora_init.to_plain_lora(LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                            init_lora_weights="olora"), {}, {})[0]
    assert rs.r == 8 and rs.lora_alpha / np.sqrt(rs.r) == pytest.approx(8 / np.sqrt(4))
    pat = lora_init.to_plain_lora(LoraConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 2},
                                             alpha_pattern={"q_proj": 3}, init_lora_weights="pissa"),
                                  {}, {})[0]
    assert pat.rank_pattern == {"q_proj": 4} and pat.alpha_pattern == {"q_proj": 6}
    for cfg, pattern in [(LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 1}), "LoftQ"),
                         (LoraConfig(use_rslora=True, rank_pattern={"q": 2}, init_lora_weights="pissa"),
                          "use_rslora")]:
        with pytest.raises(ValueError, match=pattern):
            lora_init.to_plain_lora(cfg, {}, {})


def toy_pair(seed=3):
    """Two ToyLMs with the same weights: one to train, one that stays the original base."""
    backend.manual_seed(seed)
    a = ToyLM()
    backend.manual_seed(seed)
    return a, ToyLM()


IDS = np.random.default_rng(4).integers(0, 20, size=(2, 6))


def close(got, want):
    """float32 logits of two orders of summation: 1e-5 of their scale (~100 eps for sums of 16-24
    terms through two blocks)."""
    err = np.abs(got - want).max()
    assert err <= 1e-5 * max(1.0, np.abs(want).max()), f"max |diff| {err:.3g}"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_saved_as_plain_lora_gives_the_trained_output_on_w0(tmp_path, init):
    model, original = toy_pair()
    want_base = original(IDS).numpy()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                          target_modules="all-linear"))
    close(pm(IDS).numpy(), want_base)                         # unchanged at step 0
    pm.save_pretrained(tmp_path / "init")                     # PEFT's flow: save right after init
    opt = AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        pm(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = pm(IDS).numpy()
    assert np.abs(trained - want_base).max() > 1e-3           # training moved the model
    pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    cfg, tensors = read_adapter_dir(tmp_path / "lora")
    assert (cfg.r, cfg.lora_alpha, cfg.init_lora_weights) == (8, 16, True)
    assert all(a.shape[0] == 8 for k, a in tensors.items() if k.endswith("lora_A.weight"))
    plain = PeftModel.from_pretrained(original, tmp_path / "lora")
    close(plain(IDS).numpy(), trained)
    # the untouched base is still W0: the adapter switched off gives the original model back
    with plain.disable_adapter():
        close(plain(IDS).numpy(), want_base)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_adapter_loads_on_w0_by_running_the_init_again(tmp_path, init):
    """PEFT's behaviour: loading a PiSSA/OLoRA adapter runs the (deterministic) init on the base
    first, which makes the same residual, then copies the trained factors in."""
    model, original = toy_pair()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                          target_modules=["q_proj", "down_proj"]))
    for _, layer in pm.lora_layers():
        layer.lora_B["default"].weight.data *= 1.5           # a stand-in for training
    pm.save_pretrained(tmp_path / "a")
    close(PeftModel.from_pretrained(original, tmp_path / "a")(IDS).numpy(), pm(IDS).numpy())


def test_conversion_refuses_several_adapters_and_a_foreign_initial_folder(tmp_path):
    model, _ = toy_pair()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path / "init")
    other, _ = toy_pair()
    get_peft_model(other, LoraConfig(r=2, lora_alpha=8, init_lora_weights="pissa")).save_pretrained(
        tmp_path / "r2")
    with pytest.raises(ValueError, match="shape"):
        pm.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "r2")
    pm.add_adapter("second", LoraConfig(r=4, lora_alpha=8))
    with pytest.raises(ValueError, match="selected_adapters"):
        pm.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "x").exists()                      # refused before anything was written
    pm.save_pretrained(tmp_path / "x", selected_adapters=["default"],
                       path_initial_model_for_weight_conversion=tmp_path / "init")
    assert read_adapter_dir(tmp_path / "x")[0].r == 8


# ------------------------------------------------------------------ PEFT parity
def _torch_peft():
    torch = pytest.importorskip("torch", reason="interop needs torch")
    peft = pytest.importorskip("peft", reason="interop needs peft")
    return torch, peft


def _peft_layer(W, init, r, alpha, **kw):
    """PEFT's LoRA on one torch Linear holding W: (residual base, B·A, scaling)."""
    torch, peft = _torch_peft()

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)

    m = One()
    with torch.no_grad():
        m.proj.weight.copy_(torch.from_numpy(W))
    pm = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                init_lora_weights=init, **kw))
    lay = pm.base_model.model.proj
    with torch.no_grad():
        BA = (lay.lora_B["default"].weight @ lay.lora_A["default"].weight).numpy()
        return lay.base_layer.weight.numpy().copy(), BA, lay.scaling["default"]


def _svd_bound(W, r):
    """Two float32 SVDs' rank-r parts differ by about 8·eps·σ₁·(1 + σ₁/(σ_r − σ_{r+1}))."""
    S = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    return 8 * EPS32 * S[0] * (1 + S[0] / (S[r - 1] - S[r]))


@pytest.mark.interop
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_and_adapter_equal_peft(init):
    """SVD and QR signs may differ between LAPACK calls: compare B·A and the residual, not A and B."""
    W = weight(24, 40, seed=5, dtype=np.float32)
    peft_res, peft_BA, s = _peft_layer(W, init, 4, 8)
    A, B, s_ours = factors(layer_with(W, init, r=4, alpha=8))
    assert s == s_ours
    res = W - s * (B @ A)
    sigma1 = np.linalg.norm(W.astype(np.float64), 2)
    bound = _svd_bound(W, 4) if init == "pissa" else 8 * 40 * EPS32 * sigma1     # QR: n = in = 40
    assert np.abs(s * (B @ A) - s * peft_BA).max() <= bound
    assert np.abs(res - peft_res).max() <= bound


@pytest.mark.interop
def test_pissa_niter_is_near_peft_s_randomized_result():
    """Different random test matrices (torch's and minilora's generators): both land near the
    truncated SVD, so near each other (loose: 8 iterations leave ~1e-4·σ₁ each, see above)."""
    W, S = decaying(40, 24, seed=6)
    W = W.astype(np.float32)
    _, peft_BA, s = _peft_layer(W, "pissa_niter_8", 4, 8)
    A, B, _ = factors(layer_with(W, "pissa_niter_8", r=4, alpha=8))
    assert np.abs(s * (B @ A) - s * peft_BA).max() <= 1e-2 * S[0]


def _peft_loftq_cpu(W, r, num_iter):
    """PEFT 0.21's ``loftq_utils.loftq_init`` line by line, on the CPU (PEFT itself moves the weight
    to CUDA): bitsandbytes' NF4 at blocksize 64 without double quantization (Params4bit's defaults
    with compress_statistics=False), then the rank-r SVD split as L = U·√S, R = √S·Vh."""
    torch, _ = _torch_peft()
    F = pytest.importorskip("bitsandbytes.functional", reason="LoftQ's oracle needs bitsandbytes")
    weight_t = torch.from_numpy(W)
    res = weight_t.clone()
    for i in range(num_iter):
        packed, state = F.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
        dequantized = F.dequantize_4bit(packed, state)
        res = weight_t - dequantized
        U, S, Vh = torch.linalg.svd(res, full_matrices=False)
        L = U @ torch.sqrt(torch.diag(S)[:, :r])
        R = torch.sqrt(torch.diag(S)[:r, :]) @ Vh
        if i + 1 == num_iter:
            break
        res = weight_t - L @ R
    return dequantized.numpy(), (L @ R).numpy()


@pytest.mark.interop
@pytest.mark.parametrize("alpha", [4, 8])          # s = 1 (PEFT's B·A is ours) and s = 2
def test_loftq_equals_peft_s_algorithm_with_bitsandbytes_nf4(alpha):
    """One alternation: the same NF4 bytes, so Q is equal bit for bit and s·B·A (ours) equals L·R
    (PEFT's, which leaves s out of its split: its B·A is our s·B·A) to float32 SVD rounding. Three:
    a value near an NF4 boundary may round the other way once the inputs differ by rounding, so the
    reconstruction errors are compared instead."""
    W = weight(48, 64, seed=7, dtype=np.float32)
    torch, _ = _torch_peft()
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True            # bitsandbytes' eager CPU path (tests/test_nf4.py)
    try:
        peft_Q, peft_LR = _peft_loftq_cpu(W, 4, 1)
        peft_Q3, peft_LR3 = _peft_loftq_cpu(W, 4, 3)
    finally:
        torch._dynamo.config.disable = old
    s = alpha / 4
    A, B, Q = lora_init.loftq(W, 4, s, num_iter=1)
    np.testing.assert_array_equal(Q, peft_Q)
    assert np.abs(s * (B @ A) - peft_LR).max() <= _svd_bound(W - Q, 4)
    A, B, Q = lora_init.loftq(W, 4, s, num_iter=3)
    ours, theirs = np.linalg.norm(W - Q - s * (B @ A)), np.linalg.norm(W - peft_Q3 - peft_LR3)
    assert abs(ours - theirs) <= 1e-4 * theirs   # measured: equal to 7 digits


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face checkpoint, with weights of std 0.2 (not 0.02) so that
    logits are O(1) and a wrong adapter shows."""
    d = tmp_path_factory.mktemp("base")
    model_of(initializer_range=0.2).save_pretrained(d)
    return d


def _hf_logits(base_dir, adapter_dir):
    torch, peft = _torch_peft()
    transformers = pytest.importorskip("transformers", reason="interop needs transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf.eval(), str(adapter_dir))
    with torch.no_grad():
        return pm(torch.from_numpy(LLAMA_IDS)).logits.numpy()


LLAMA_IDS = np.random.default_rng(8).integers(0, 61, size=(2, 7))


@pytest.mark.interop
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_and_unconverted_adapters_give_our_logits_in_peft(llama_base, tmp_path, init):
    """The converted adapter on PEFT's original base, and the unconverted one (PEFT runs the init
    again on its base when it loads it, as minilora does), give the logits of our trained model."""
    from minilora.models import LlamaForCausalLM
    pm = get_peft_model(LlamaForCausalLM.from_pretrained(llama_base),
                        LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                   target_modules=["q_proj", "v_proj", "up_proj"]))
    pm.save_pretrained(tmp_path / "init")
    rng = np.random.default_rng(9)
    for _, layer in pm.lora_layers():                     # a stand-in for training
        for f in (layer.lora_A["default"], layer.lora_B["default"]):
            f.weight.data += 0.3 * np.abs(f.weight.data).mean() * rng.standard_normal(f.weight.shape)
    ours = pm(LLAMA_IDS).numpy()
    pm.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    pm.save_pretrained(tmp_path / "raw")
    for folder in ("plain", "raw"):
        theirs = _hf_logits(llama_base, tmp_path / folder)
        err = np.abs(ours - theirs).max()
        assert err <= 1e-5 * max(1.0, np.abs(theirs).max()), f"{folder}: max |diff| {err:.3g}"
