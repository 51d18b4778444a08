"""LoraLinear: the equation, the initialisation, merging, the frozen base, and the gradients.

Tolerances are derived from float32 rounding: a length-K dot product is off by at most about
K·eps·Σ|x_k·w_k| (the classic γ_K bound), so merged-vs-unmerged is compared against that bound
computed from the actual magnitudes, not a magic number.
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minilora
from minilora import Tensor, backend, nn, settings
from minilora.lora import LoraLinear
from minilora.lora.fused import lora_linear
from minilora.lora import merge as merge_math
from minilora.testing import gradcheck

EPS32 = float(np.finfo(np.float32).eps)


def make_layer(in_f=12, out_f=10, r=4, alpha=8, init=True, rslora=False, dropout=0.0, bias=False):
    base = nn.Linear(in_f, out_f, bias=bias)
    layer = LoraLinear(base, module_name="toy")
    layer.update_layer("default", r=r, lora_alpha=alpha, lora_dropout=dropout,
                       init_lora_weights=init, use_rslora=rslora)
    layer.set_adapter("default")
    return layer


def rand(*shape, dtype=np.float32):
    return backend.rng().standard_normal(shape).astype(dtype)


def numpy_lora(x, W0, A, B, s):
    """The paper's equation in float64 NumPy: x W0ᵀ + s · (x Aᵀ) Bᵀ."""
    x, W0, A, B = (np.asarray(a, np.float64) for a in (x, W0, A, B))
    return x @ W0.T + s * (x @ A.T) @ B.T


def dot_bound(x, W0, A, B, s, extra_terms=2):
    """Elementwise float32 rounding bound for both ways of computing the layer (γ_K, K = in + r)."""
    x, W0, A, B = (np.abs(np.asarray(a, np.float64)) for a in (x, W0, A, B))
    K = W0.shape[1] + A.shape[0] + extra_terms
    return K * EPS32 * (x @ W0.T + abs(s) * (x @ A.T) @ B.T) + 1e-30


# ------------------------------------------------------------------ structure and init
def test_names_and_shapes_follow_peft():
    layer = make_layer(in_f=12, out_f=10, r=4)
    names = dict(layer.named_parameters())
    assert set(names) == {"base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"}
    assert names["lora_A.default.weight"].shape == (4, 12)   # A: (r, in)
    assert names["lora_B.default.weight"].shape == (10, 4)   # B: (out, r)
    assert layer.scaling["default"] == 8 / 4
    assert not names["base_layer.weight"].requires_grad


def test_default_init_kaiming_uniform_A_zero_B():
    layer = make_layer(in_f=400, out_f=8, r=16)
    A = layer.lora_A["default"].weight.numpy()
    bound = 1 / math.sqrt(400)
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.9 * bound
    # U(-b, b) has std b/√3
    assert abs(A.std() - bound / math.sqrt(3)) < 0.05 * bound
    assert not layer.lora_B["default"].weight.numpy().any()


def test_gaussian_init_std_one_over_r_and_false_init_nonzero_B():
    layer = make_layer(in_f=512, out_f=8, r=4, init="gaussian")
    A = layer.lora_A["default"].weight.numpy()
    assert abs(A.std() - 1 / 4) < 0.02
    assert not layer.lora_B["default"].weight.numpy().any()
    layer = make_layer(init=False)
    assert np.abs(layer.lora_B["default"].weight.numpy()).min() > 0


def test_fresh_adapter_output_is_bit_identical():
    layer = make_layer(in_f=32, out_f=24, r=8, alpha=16)
    x = Tensor(rand(3, 5, 32))
    assert np.array_equal(layer(x).numpy(), layer.base_layer(x).numpy())


def test_forward_is_the_equation():
    layer = make_layer(in_f=12, out_f=10, r=3, alpha=7, init=False)
    x = rand(2, 4, 12)
    got = layer(Tensor(x)).numpy()
    A, B = layer.lora_A["default"].weight.numpy(), layer.lora_B["default"].weight.numpy()
    want = numpy_lora(x, layer.base_layer.weight.numpy(), A, B, 7 / 3)
    assert np.all(np.abs(got - want) <= dot_bound(x, layer.base_layer.weight.numpy(), A, B, 7 / 3))


def test_rslora_scaling():
    layer = make_layer(r=16, alpha=8, rslora=True)
    assert layer.scaling["default"] == pytest.approx(8 / 4)


# ------------------------------------------------------------------ merge / unmerge (property tests)
@given(in_f=st.integers(1, 24), out_f=st.integers(1, 24), r=st.integers(1, 8),
       alpha=st.floats(0.5, 64), rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_equals_unmerged_and_unmerge_restores(in_f, out_f, r, alpha, rslora, seed):
    backend.manual_seed(seed)
    layer = make_layer(in_f, out_f, r, alpha, init=False, rslora=rslora)
    # make B and A of comparable size to W0 so the delta is not negligible
    layer.lora_B["default"].weight.data = rand(out_f, r)
    x = rand(3, in_f)
    W0 = layer.base_layer.weight.numpy().copy()
    A, B = layer.lora_A["default"].weight.numpy(), layer.lora_B["default"].weight.numpy()
    s = layer.scaling["default"]
    unmerged = layer(Tensor(x)).numpy()
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    merged = layer(Tensor(x)).numpy()
    # each side is within the γ bound of the exact value, so they differ by at most twice that
    assert np.all(np.abs(merged - unmerged) <= 2 * dot_bound(x, W0, A, B, s))
    delta = merge_math.delta_weight(A, B, alpha, r, rslora)
    # the merged weight is W0 + ΔW rounded once to float32, with ΔW from the one delta_weight
    assert np.array_equal(layer.base_layer.weight.numpy(), (W0 + delta).astype(np.float32))
    layer.unmerge()
    assert not layer.merged
    # two roundings of |W0 + ΔW| and one of |W0|
    tol = 2 * EPS32 * (np.abs(W0) + np.abs(delta)) + 1e-30
    assert np.all(np.abs(layer.base_layer.weight.numpy() - W0) <= tol)


@given(in_f=st.integers(1, 64), out_f=st.integers(1, 64), r=st.integers(1, 16))
def test_parameter_count_is_r_times_in_plus_out(in_f, out_f, r):
    layer = make_layer(in_f, out_f, r)
    trainable = sum(p.size for p in layer.parameters() if p.requires_grad)
    assert trainable == r * (in_f + out_f)


def test_merge_twice_is_idempotent_and_get_delta_weight_uses_merge_math():
    layer = make_layer(init=False)
    W0 = layer.base_layer.weight.numpy().copy()
    layer.merge()
    once = layer.base_layer.weight.numpy().copy()
    layer.merge()                       # already merged: nothing happens
    assert np.array_equal(layer.base_layer.weight.numpy(), once)
    d = layer.get_delta_weight("default")
    assert d.shape == W0.shape
    assert np.array_equal(d, merge_math.delta_weight(layer.lora_A["default"].weight.data,
                                                     layer.lora_B["default"].weight.data, 8, 4))


def test_safe_merge_refuses_nan_and_leaves_weight():
    layer = make_layer(init=False)
    W0 = layer.base_layer.weight.numpy().copy()
    layer.lora_B["default"].weight.data[0, 0] = np.nan
    with pytest.raises(ValueError, match="safe_merge"):
        layer.merge(safe_merge=True)
    assert np.array_equal(layer.base_layer.weight.numpy(), W0) and not layer.merged


def test_disabled_gives_base_output_and_unmerges():
    layer = make_layer(init=False)
    x = Tensor(rand(2, 12))
    base = layer.base_layer(x).numpy()
    layer.merge()
    layer.disable_adapters = True
    out = layer(x).numpy()
    assert not layer.merged
    assert np.allclose(out, base, atol=1e-6)


def test_multiple_adapters_active_selection():
    layer = make_layer(init=False)
    layer.update_layer("other", r=2, lora_alpha=2, init_lora_weights=False)
    x = Tensor(rand(2, 12))
    layer.set_adapter("default")
    y_default = layer(x).numpy()
    layer.set_adapter("other")
    y_other = layer(x).numpy()
    layer.set_adapter(["default", "other"])
    y_both = layer(x).numpy()
    base = layer.base_layer(x).numpy()
    assert np.allclose(y_both - base, (y_default - base) + (y_other - base), atol=1e-5)
    with pytest.raises(ValueError, match="already has an adapter"):
        layer.update_layer("other", r=2, lora_alpha=2)
    layer.merge(["other"])
    with pytest.raises(ValueError, match="unmerge"):
        layer.delete_adapter("other")
    layer.unmerge()
    layer.delete_adapter("other")
    assert list(layer.lora_A) == ["default"] and layer.active_adapters == ["default"]


def test_dropout_only_on_the_adapter_path_and_only_in_training():
    layer = make_layer(init=False, dropout=0.5)
    x = Tensor(rand(4, 12))
    layer.eval()
    y_eval = layer(x).numpy()
    layer.train()
    y_train = layer(x).numpy()
    assert not np.allclose(y_eval, y_train)
    layer.disable_adapters = True
    assert np.array_equal(layer(x).numpy(), layer.base_layer(x).numpy())  # base path: no dropout


def test_rejects_non_linear():
    with pytest.raises(ValueError, match="only wrap Linear"):
        LoraLinear(nn.RMSNorm(4))
    layer = make_layer()
    with pytest.raises(ValueError, match="positive integer"):
        layer.update_layer("x", r=0, lora_alpha=8)


# ------------------------------------------------------------------ gradients
def test_frozen_base_gets_no_gradient_and_lora_does():
    layer = make_layer(init=False, bias=True)
    x = Tensor(rand(3, 5, 12), requires_grad=True)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_A["default"].weight.grad is not None
    assert layer.lora_B["default"].weight.grad is not None
    assert x.grad is not None


def test_frozen_base_gets_no_optimizer_state():
    from minilora import optim
    layer = make_layer(init=False, bias=True)
    opt = optim.AdamW(list(layer.parameters()), lr=1e-2)  # even when handed every parameter
    W0 = layer.base_layer.weight.numpy().copy()
    A0 = layer.lora_A["default"].weight.numpy().copy()
    x = Tensor(rand(3, 12))
    for _ in range(2):
        opt.zero_grad()
        (layer(x) * layer(x)).mean().backward()
        opt.step()
    assert np.array_equal(layer.base_layer.weight.numpy(), W0)
    assert not np.array_equal(layer.lora_A["default"].weight.numpy(), A0)
    assert set(opt.state) == {id(layer.lora_A["default"].weight), id(layer.lora_B["default"].weight)}


def test_step_zero_dA_is_zero_because_B_is_zero():
    layer = make_layer(in_f=8, out_f=6, r=3)
    x = Tensor(rand(4, 8))
    (layer(x) ** 2).sum().backward()
    # dL/dA = s · Bᵀ (dL/dh)ᵀ x: zero while B = 0; dL/dB = s · (dL/dh)ᵀ (A x): not zero
    assert not layer.lora_A["default"].weight.grad.any()
    assert np.abs(layer.lora_B["default"].weight.grad).max() > 0


def _bind(linear, tensor):
    """Let a Linear compute with a gradcheck leaf as its weight (for checking dL/dA and dL/dB)."""
    linear._parameters["weight"] = tensor
    object.__setattr__(linear, "weight", tensor)


@pytest.mark.parametrize("rslora", [False, True])
def test_gradcheck_dA_dB_dx_float64(rslora):
    with backend.default_float_dtype(np.float64):
        layer = make_layer(in_f=5, out_f=4, r=2, alpha=3, init=False, rslora=rslora)
        A0 = layer.lora_A["default"].weight.data.copy()
        B0 = layer.lora_B["default"].weight.data.copy()
        x0 = backend.rng().standard_normal((3, 5))

        def fn(x, A, B):
            _bind(layer.lora_A["default"], A)
            _bind(layer.lora_B["default"], B)
            return layer(x)

        assert gradcheck(fn, [x0, A0, B0], names=["x", "lora_A", "lora_B"])


def test_layer_under_no_grad_records_nothing():
    layer = make_layer(init=False)
    with minilora.no_grad():
        y = layer(Tensor(rand(2, 12)))
    assert not y.requires_grad


# ------------------------------------------------------------------ the fused op vs the module form
# The module form (forward in reference mode) is the equation; the fused op (lora/fused.py) is its
# fast twin. Both are checked against central differences in float64, and against each other in
# float32 with bounds from float32 rounding (the γ_K bound of the module docstring).

def _run(layer, x0, g0, reference, seed=7):
    """Forward and backward of ``layer`` on x0 with upstream gradient g0: (y, dL/dx, dL/dA, dL/dB).
    The seed is set before the forward, so both forms draw the same dropout mask."""
    x = Tensor(x0.copy(), requires_grad=True)
    backend.manual_seed(seed)
    with settings.reference(reference):
        y = layer(x)
        y.backward(g0)
    out = (y.numpy(), x.grad.copy(), layer.lora_A["default"].weight.grad.copy(),
           layer.lora_B["default"].weight.grad.copy())
    layer.zero_grad()
    return out


def _bounds(x, W0, A, B, s, g, p):
    """Elementwise float32 bounds for |fused − module| of (y, dL/dx, dL/dA, dL/dB): each form is
    within γ_K·(the same sum of absolute products) of the exact value, so twice that. With dropout
    p, |dropout(x)| <= |x| / (1 − p)."""
    x, W0, A, B, g = (np.abs(np.asarray(a, np.float64).reshape(-1, a.shape[-1]))
                      for a in (x, W0, A, B, g))
    xd = x / (1.0 - p)
    s = abs(s)
    N, (out_f, in_f), r = x.shape[0], W0.shape, A.shape[0]
    y = (in_f + r + 3) * (x @ W0.T + s * (xd @ A.T) @ B.T)
    dx = (out_f + r + 3) * (g @ W0 + s * (g @ B) @ A / (1.0 - p))
    dA = (N + out_f + 2) * s * (g @ B).T @ xd
    dB = (N + in_f + 2) * s * g.T @ (xd @ A.T)
    return [2 * EPS32 * b + 1e-30 for b in (y, dx, dA, dB)]


def _quantized_base(in_f, out_f):
    from minilora.quant import NF4Linear
    return NF4Linear.from_linear(nn.Linear(in_f, out_f), double_quant=True)


# rows N of x: N < max(in, out) runs the side path; N >= max(in, out) the merged weight, kept for
# backward when out <= KEEP_MERGED_WEIGHT·N (10 <= 48/4), formed again otherwise (10 > 12/4)
PATHS = {"side-path": 6, "merged-recomputed": 12, "merged-kept": 48}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base", ["float", "float+bias", "4-bit"])
def test_fused_equals_module_form_float32(path, dropout, base):
    """Output and the gradients of x, A and B, fused vs module form, same dropout mask."""
    in_f, out_f = 12, 10
    if base == "4-bit":
        layer = LoraLinear(_quantized_base(in_f, out_f), module_name="toy")
        layer.update_layer("default", r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False)
        layer.set_adapter("default")
        W0 = layer.base_layer.dequantized_weight()
    else:
        layer = make_layer(in_f, out_f, r=4, alpha=8, init=False, dropout=dropout,
                           bias=base == "float+bias")
        W0 = layer.base_layer.weight.numpy()
    layer.train()
    x0, g0 = rand(PATHS[path], in_f), rand(PATHS[path], out_f)
    fused, plain = _run(layer, x0, g0, reference=False), _run(layer, x0, g0, reference=True)
    A, B = layer.lora_A["default"].weight.numpy(), layer.lora_B["default"].weight.numpy()
    bounds = _bounds(x0, W0, A, B, layer.scaling["default"], g0, dropout)
    for f, p, bound, what in zip(fused, plain, bounds, ["output", "dL/dx", "dL/dA", "dL/dB"]):
        assert np.all(np.abs(f - p) <= bound), what


@pytest.mark.parametrize("rows,dropout", [(6, 0.0), (16, 0.0), (2, 0.0), (6, 0.25)],
                         ids=["merged-weight", "merged-weight-kept", "side-path", "side-path-dropout"])
def test_lora_linear_gradcheck_all_inputs_float64(rows, dropout):
    """Both ways lora_linear computes h (N >= max(in, out) without dropout: the merged weight,
    recomputed in backward, or kept from forward once out <= N / 4; otherwise the side path)
    against central differences, for x, W0, b, A and B."""
    rng = np.random.default_rng(0)
    x0, W0, b0 = rng.standard_normal((rows, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    A0, B0 = rng.standard_normal((2, 5)), rng.standard_normal((4, 2))

    def fn(x, W, b, A, B):
        backend.manual_seed(3)  # the same dropout mask on every call of the finite differences
        return lora_linear(x, W, b, A, B, scaling=1.5, dropout_p=dropout, training=True)

    assert gradcheck(fn, [x0, W0, b0, A0, B0], names=["x", "W0", "bias", "lora_A", "lora_B"])


@pytest.mark.parametrize("reference", [False, True], ids=["fused", "module-form"])
@pytest.mark.parametrize("rows,dropout", [(3, 0.0), (8, 0.0), (3, 0.4)],
                         ids=["side-path", "merged-weight", "dropout"])
def test_layer_gradcheck_float64_both_forms(reference, rows, dropout):
    """The layer as the model calls it, in both forms, against central differences in float64."""
    with backend.default_float_dtype(np.float64):
        layer = make_layer(in_f=5, out_f=4, r=2, alpha=3, init=False, dropout=dropout)
        layer.train()
        A0 = layer.lora_A["default"].weight.data.copy()
        B0 = layer.lora_B["default"].weight.data.copy()
        x0 = backend.rng().standard_normal((rows, 5))

        def fn(x, A, B):
            _bind(layer.lora_A["default"], A)
            _bind(layer.lora_B["default"], B)
            backend.manual_seed(3)  # one dropout mask for every evaluation
            with settings.reference(reference):
                return layer(x)

        assert gradcheck(fn, [x0, A0, B0], names=["x", "lora_A", "lora_B"])


def _ops_in_graph(y):
    seen, stack, ops = set(), [y], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        ops.add(t._op)
        stack.extend(t._prev)
    return ops


@pytest.mark.fast_path   # compares with the fused op, which reference mode never runs
@pytest.mark.parametrize("rows", [2, 64], ids=["side-path", "merged-weight"])
def test_reference_mode_builds_the_module_form_graph(rows):
    layer = make_layer(in_f=12, out_f=10, init=False)
    x = Tensor(rand(rows, 12), requires_grad=True)
    with settings.reference():
        ops = _ops_in_graph(layer(x))
    assert "lora_linear" not in ops and len(ops) >= 4     # base matmul, A, B, scale, add
    assert _ops_in_graph(layer(x)) >= {"lora_linear"}      # outside: the fused node


@pytest.mark.parametrize("rows", [3, 40], ids=["side-path", "merged-weight"])
def test_fused_op_reads_the_scale_from_scaling(rows):
    """The scale lives in one place, ``scaling[name]``: changing it (as PEFT's scale_layer does)
    changes the fused op, the module form and the merge alike; rsLoRA's α/√r reaches all three."""
    layer = make_layer(in_f=12, out_f=10, r=16, alpha=8, init=False, rslora=True)
    assert layer.scaling["default"] == pytest.approx(2.0)      # α/√r, not α/r = 0.5
    layer.scaling["default"] = 0.37
    x = rand(rows, 12)
    W0 = layer.base_layer.weight.numpy().copy()
    A, B = layer.lora_A["default"].weight.numpy(), layer.lora_B["default"].weight.numpy()
    want, bound = numpy_lora(x, W0, A, B, 0.37), dot_bound(x, W0, A, B, 0.37)
    fused = layer(Tensor(x)).numpy()
    with settings.reference():
        plain = layer(Tensor(x)).numpy()
    assert np.all(np.abs(fused - want) <= bound) and np.all(np.abs(plain - want) <= bound)
    layer.merge()
    np.testing.assert_array_equal(layer.base_layer.weight.numpy(),
                                  merge_math.merge_weight_scaled(W0, A, B, 0.37))


@pytest.mark.fast_path   # measures the fused op's graph, which reference mode never builds
def test_fused_path_keeps_fewer_activation_arrays():
    """The fused layer's graph holds one (N, out) output; the module form holds B's output, the
    scaled copy and the sum as well: count the bytes of (N, out) arrays reachable from the output."""
    layer = make_layer(in_f=64, out_f=64, r=4, init=False)
    x = Tensor(rand(32, 64), requires_grad=True)

    def graph_bytes(y):
        seen, stack, total = set(), [y], 0
        while stack:
            t = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.shape == (32, 64) and t is not x:
                total += t.data.nbytes
            stack.extend(t._prev)
        return total

    fused = graph_bytes(layer(x))
    with settings.reference():
        plain = graph_bytes(layer(x))
    assert fused == 32 * 64 * 4 and plain >= 3 * fused


def test_layer_forward_backward_merge_on_every_device(device):
    """The same layer on NumPy and (where present) CuPy: outputs, gradients and merged weights."""
    backend.manual_seed(5)
    layer = make_layer(in_f=16, out_f=12, r=4, alpha=8, init=False)
    x_host = rand(2, 3, 16)
    x = Tensor(backend.to_device(x_host), requires_grad=True)
    y = layer(x)
    assert backend.device_of(y.data) == device
    (y * y).sum().backward()
    W0 = layer.base_layer.weight.numpy().copy()
    A, B = layer.lora_A["default"].weight.numpy(), layer.lora_B["default"].weight.numpy()
    want = numpy_lora(x_host, W0, A, B, 2.0)
    assert np.all(np.abs(y.numpy() - want) <= dot_bound(x_host, W0, A, B, 2.0))
    g = 2 * want                                            # dL/dy for L = sum(y^2)
    dB = 2.0 * g.reshape(-1, 12).T @ (x_host.reshape(-1, 16) @ A.T)
    assert np.allclose(backend.to_numpy(layer.lora_B["default"].weight.grad), dB, rtol=1e-4, atol=1e-4)
    layer.merge()
    assert np.allclose(layer.base_layer.weight.numpy(), W0 + 2.0 * B @ A, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows,merges", [(16, 1), (6, 2)], ids=["kept", "recomputed"])
def test_lora_linear_merged_weight_kept_only_when_small(monkeypatch, rows, merges):
    """The merged weight (out, in) is formed once per step when out <= N / 4, and formed again in
    backward otherwise (a weight-sized array per layer is not held for a large model)."""
    from minilora.lora import fused as lora_fused
    calls = []
    real = lora_fused.merge_math.merge_weight_scaled
    monkeypatch.setattr(lora_fused.merge_math, "merge_weight_scaled",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((rows, 5)).astype(np.float32), requires_grad=True)
    A = Tensor(rng.standard_normal((2, 5)).astype(np.float32), requires_grad=True)
    B = Tensor(rng.standard_normal((4, 2)).astype(np.float32), requires_grad=True)
    W = Tensor(rng.standard_normal((4, 5)).astype(np.float32))
    lora_linear(x, W, None, A, B, scaling=1.5).sum().backward()
    assert len(calls) == merges and x.grad is not None
