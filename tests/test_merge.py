"""minilora.lora.merge: the LoRA formula (scaling, ΔW, merge, unmerge, trace) against float32 error
bounds and against PyTorch / PEFT.

Tolerances come from the standard forward-error bound for a dot product of length n computed in
floating point with unit roundoff u: |fl(a·b) − a·b| ≤ γ_n |a|·|b|, γ_n ≈ n·u (Higham, "Accuracy and
Stability of Numerical Algorithms", §3.1). For float32 u = 2^-24.
"""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minilora import backend
from minilora.lora import merge

U32 = 2.0 ** -24  # float32 unit roundoff


def _factors(seed, out, inn, r, dtype=np.float32, scale=1.0):
    g = np.random.default_rng(seed)
    W0 = g.standard_normal((out, inn)).astype(dtype)
    A = (g.standard_normal((r, inn)) * scale).astype(dtype)
    B = (g.standard_normal((out, r)) * scale).astype(dtype)  # nonzero B: a trained adapter
    x = g.standard_normal((inn,)).astype(dtype)
    return W0, A, B, x


# ---------------------------------------------------------------- scaling
def test_scaling_alpha_over_r_and_rslora():
    assert merge.scaling(16, 8) == 2.0
    assert merge.scaling(8, 2) == 4.0
    assert merge.scaling(16, 4, use_rslora=True) == 8.0          # 16 / sqrt(4)
    assert merge.scaling(7, 3, use_rslora=True) == pytest.approx(7 / math.sqrt(3), rel=1e-15)


@pytest.mark.parametrize("r", [0, -2, 2.5, True, "8", None])
def test_scaling_rejects_bad_rank(r):
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        merge.scaling(8, r)


def test_scaling_rejects_bad_alpha():
    with pytest.raises(ValueError, match="lora_alpha"):
        merge.scaling(float("nan"), 4)


# ---------------------------------------------------------------- merged == unmerged
@settings(max_examples=40, deadline=None, derandomize=True)
@given(out=st.integers(1, 12), inn=st.integers(1, 12), r=st.integers(1, 6),
       alpha=st.sampled_from([1, 3, 8, 16, 32.5]), rslora=st.booleans(), seed=st.integers(0, 2**31))
def test_merged_output_equals_unmerged_to_float32_rounding(out, inn, r, alpha, rslora, seed):
    assume(alpha != r)  # α = r would hide a missing scaling
    W0, A, B, x = _factors(seed, out, inn, r)
    s = merge.scaling(alpha, r, rslora)
    W = merge.merge_weight(W0, A, B, alpha, r, use_rslora=rslora)
    assert W.dtype == np.float32 and W.shape == W0.shape
    h_merged = W @ x                                     # (out, in) @ (in,) -> (out,)
    h_unmerged = W0 @ x + s * (B @ (A @ x))              # the LoRA layer's forward
    # Both sides are sums of at most in + r + 3 rounded operations over the same absolute terms.
    absterms = (np.abs(W0.astype(np.float64)) + s * np.abs(B.astype(np.float64)) @ np.abs(A)) @ np.abs(x)
    bound = 2 * (inn + r + 3) * U32 * absterms
    assert np.all(np.abs(h_merged.astype(np.float64) - h_unmerged) <= bound + 1e-30)
    # and ΔW is exactly what the formula says, in float32
    exact = (B.astype(np.float64) @ A) * s
    assert np.all(np.abs(merge.delta_weight(A, B, alpha, r, rslora) - exact)
                  <= (r + 2) * U32 * s * (np.abs(B) @ np.abs(A)).astype(np.float64) + 1e-30)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(out=st.integers(1, 10), inn=st.integers(1, 10), r=st.integers(1, 5),
       alpha=st.sampled_from([2, 5, 16]), seed=st.integers(0, 2**31))
def test_unmerge_inverts_merge(out, inn, r, alpha, seed):
    W0, A, B, _ = _factors(seed, out, inn, r)
    W = merge.merge_weight(W0, A, B, alpha, r)
    back = merge.unmerge_weight(W, A, B, alpha, r)
    d = np.abs(merge.delta_weight(A, B, alpha, r)).astype(np.float64)
    # two float32 roundings (the add, the subtract), each ≤ u·|value|, values ≤ |W0| + |ΔW|
    assert np.all(np.abs(back.astype(np.float64) - W0) <= 3 * U32 * (np.abs(W0) + d) + 1e-30)


def test_delta_is_zero_when_B_is_zero():
    W0, A, B, x = _factors(1, 5, 7, 3)
    B0 = np.zeros_like(B)  # PEFT's init: a fresh adapter changes nothing
    assert not merge.delta_weight(A, B0, 16, 3).any()
    np.testing.assert_array_equal(merge.merge_weight(W0, A, B0, 16, 3), W0)
    assert merge.merge_trace(W0, A, B0, 16, 3, x=x)["max_diff"].value == 0.0


def test_rslora_delta():
    W0, A, B, _ = _factors(2, 6, 4, 4)
    np.testing.assert_allclose(merge.delta_weight(A, B, 8, 4, use_rslora=True),
                               (B @ A) * (8 / 2.0), rtol=1e-6)
    np.testing.assert_allclose(merge.delta_weight(A, B, 8, 4), (B @ A) * 2.0, rtol=1e-6)


def test_merge_does_not_modify_inputs():
    W0, A, B, _ = _factors(3, 4, 4, 2)
    W0c = W0.copy()
    merge.merge_weight(W0, A, B, 4, 2)
    merge.unmerge_weight(W0, A, B, 4, 2)
    np.testing.assert_array_equal(W0, W0c)


# ---------------------------------------------------------------- dtypes
def test_float16_weight_gets_float32_delta_rounded_once():
    W0, A, B, _ = _factors(4, 16, 32, 4, dtype=np.float16, scale=0.05)
    d = merge.delta_weight(A, B, 32, 4)
    assert d.dtype == np.float32  # float16 factors are upcast for the product
    W = merge.merge_weight(W0, A, B, 32, 4)
    assert W.dtype == np.float16
    np.testing.assert_array_equal(W, (W0.astype(np.float32) + d).astype(np.float16))
    exact = W0.astype(np.float64) + (B.astype(np.float64) @ A.astype(np.float64)) * 8
    # one rounding to float16 (half an ulp) plus the float32 work before it
    half_ulp = np.spacing(np.abs(W).astype(np.float16)).astype(np.float64) / 2
    assert np.all(np.abs(W - exact) <= half_ulp + 64 * U32 * (np.abs(exact) + 1))


def test_bfloat16_factors_are_upcast():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    _, A, B, _ = _factors(5, 3, 5, 2)
    d = merge.delta_weight(A.astype(ml_dtypes.bfloat16), B.astype(ml_dtypes.bfloat16), 4, 2)
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, (B.astype(ml_dtypes.bfloat16).astype(np.float32)
                                   @ A.astype(ml_dtypes.bfloat16).astype(np.float32)) * 2, rtol=1e-6)


def test_float64_stays_float64():
    W0, A, B, _ = _factors(6, 3, 3, 1, dtype=np.float64)
    assert merge.delta_weight(A, B, 2, 1).dtype == np.float64
    assert merge.merge_weight(W0, A, B, 2, 1).dtype == np.float64


def test_non_float_input_refused():
    with pytest.raises(ValueError, match="floating-point"):
        merge.delta_weight(np.array([["a", "b"]]), np.ones((1, 1)), 1, 1)


# ---------------------------------------------------------------- safe merge
def test_safe_merge_refuses_nan_and_names_the_layer():
    W0, A, B, _ = _factors(7, 4, 4, 2)
    A[0, 1] = np.nan
    with pytest.raises(ValueError, match=r"safe_merge refused in model\.layers\.3\.self_attn\.q_proj"):
        merge.merge_weight(W0, A, B, 8, 2, safe_merge=True, name="model.layers.3.self_attn.q_proj")
    # without safe_merge the NaN goes through, as in PEFT
    assert np.isnan(merge.merge_weight(W0, A, B, 8, 2)).any()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_safe_merge_refuses_float16_overflow():
    W0 = np.full((2, 2), 60000, np.float16)
    A = np.full((1, 2), 100, np.float32)
    B = np.full((2, 1), 100, np.float32)
    with pytest.raises(ValueError, match="NaN/Inf"):
        merge.merge_weight(W0, A, B, 1, 1, safe_merge=True)
    W = merge.merge_weight(W0.astype(np.float32), A, B, 1, 1, safe_merge=True)  # fine in float32
    assert np.isfinite(W).all()


# ---------------------------------------------------------------- shapes
def test_shape_errors_name_the_convention():
    W0, A, B, _ = _factors(8, 5, 3, 2)  # W0 (5, 3), A (2, 3), B (5, 2)
    with pytest.raises(ValueError, match=r"lora_A has shape \(r, in\)=\(3, 2\), expected \(2, 3\); "
                                         r"minilora uses PEFT's convention A: \(r, in\), B: \(out, r\)"):
        merge.merge_weight(W0, A.T, B, 4, 2)
    with pytest.raises(ValueError, match=r"lora_B has shape \(out, r\)=\(2, 5\), expected \(5, 2\)"):
        merge.merge_weight(W0, A, B.T, 4, 2)
    with pytest.raises(ValueError, match=r"lora_A has shape \(r, in\)=\(2, 3\), expected \(3, 3\)"):
        merge.delta_weight(A, B, 4, 3)        # r argument disagrees with the factors
    with pytest.raises(ValueError, match="must be 2-D"):
        merge.delta_weight(A[0], B, 4, 2)
    with pytest.raises(ValueError, match="W0 must be 2-D"):
        merge.merge_weight(W0[0], A, B, 4, 2)
    with pytest.raises(ValueError, match=r"in q_proj"):
        merge.merge_weight(W0, A.T, B, 4, 2, name="q_proj")
    with pytest.raises(ValueError, match="last axis must be in_features=3"):
        merge.merge_trace(W0, A, B, 4, 2, x=np.ones(5))


def test_delta_shape_of_the_articles_factors():
    # The article's A (4×2) and B (2×4) read as PEFT's lora_A / lora_B: B @ A is (2×2), not (4×4).
    assert merge.delta_shape((4, 2), (2, 4)) == (2, 2)
    assert merge.delta_shape((2, 4), (4, 2)) == (4, 4)


# ---------------------------------------------------------------- trace
def test_merge_trace_steps_agree_with_the_functions():
    W0, A, B, x = _factors(9, 4, 6, 2)
    t = merge.merge_trace(W0, A, B, 8, 2, x=x)
    assert list(t) == ["BA", "scaling", "delta_W", "W0", "W_merged", "W0x", "Ax", "BAx", "scaled",
                       "h_unmerged", "h_merged", "max_diff"]
    assert t["BA"].shape == (4, 6) and t["Ax"].shape == (2,) and t["h_merged"].shape == (4,)
    assert t["scaling"].value == 4.0
    np.testing.assert_array_equal(t["delta_W"].value, merge.delta_weight(A, B, 8, 2))
    np.testing.assert_array_equal(t["W_merged"].value, merge.merge_weight(W0, A, B, 8, 2))
    np.testing.assert_allclose(t["h_merged"].value, t["h_unmerged"].value, rtol=1e-5, atol=1e-5)
    assert t["max_diff"].value < 1e-5
    text = merge.format_trace(t)
    assert "[1] B·A   (4×6)" in text and "A·x   (2)" in text and str(t) == text
    assert t.values_of()["scaling"] == 4.0


def test_merge_trace_batched_rows_and_lists():
    W0, A, B, _ = _factors(10, 3, 4, 2)
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)  # (batch, seq, in)
    t = merge.merge_trace(W0, A, B, 2, 2, x=x)
    assert t["h_unmerged"].shape == (2, 5, 3) and t["Ax"].shape == (2, 5, 2)
    np.testing.assert_allclose(t["h_unmerged"].value, x @ W0.T + (x @ A.T) @ B.T, rtol=1e-5, atol=1e-6)
    # plain Python lists (a notebook's typed numbers) are accepted, in float64
    t2 = merge.merge_trace(W0.tolist(), A.tolist(), B.tolist(), 2, 2, x=[1, 0, 0, 0])
    assert t2["W_merged"].value.dtype == np.float64


def test_merge_on_every_device(device):
    xp = backend.xp()
    W0, A, B, x = (xp.asarray(a) for a in _factors(11, 8, 8, 2))
    W = merge.merge_weight(W0, A, B, 4, 2, safe_merge=True)
    assert backend.get_xp(W) is xp
    t = merge.merge_trace(W0, A, B, 4, 2, x=x)
    assert t["max_diff"].value < 1e-5
    np.testing.assert_allclose(backend.to_numpy(merge.unmerge_weight(W, A, B, 4, 2)),
                               backend.to_numpy(W0), atol=1e-5)


# ---------------------------------------------------------------- oracles
@pytest.mark.interop
def test_delta_weight_matches_torch():
    torch = pytest.importorskip("torch")
    _, A, B, _ = _factors(12, 7, 9, 3)
    ref = (torch.from_numpy(B) @ torch.from_numpy(A)) * (5 / 3)
    np.testing.assert_allclose(merge.delta_weight(A, B, 5, 3), ref.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.interop
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_matches_peft_lora_linear(rslora):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(6, 5, bias=False)

    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=3, lora_alpha=7, target_modules=["q_proj"],
                                                        use_rslora=rslora))
    layer = model.base_model.model.q_proj
    _, A, B, x = _factors(13, 5, 6, 3)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
    W0 = layer.base_layer.weight.detach().numpy().copy()
    assert merge.scaling(7, 3, rslora) == pytest.approx(layer.scaling["default"], rel=1e-12)
    np.testing.assert_allclose(merge.delta_weight(A, B, 7, 3, rslora),
                               layer.get_delta_weight("default").detach().numpy(), rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        h_peft = layer(torch.from_numpy(x)).numpy()      # unmerged forward in PEFT
        layer.merge(safe_merge=True)
    np.testing.assert_allclose(merge.merge_weight(W0, A, B, 7, 3, rslora),
                               layer.base_layer.weight.detach().numpy(), rtol=1e-6, atol=1e-6)
    t = merge.merge_trace(W0, A, B, 7, 3, x=x, use_rslora=rslora)
    np.testing.assert_allclose(t["h_unmerged"].value, h_peft, rtol=1e-5, atol=1e-6)
