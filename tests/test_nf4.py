"""Tests for minilora.quant: NF4 / FP4 / int4 code books, blockwise 4-bit quantization, double
quantization, storage figures, the checkpoint report and CLI, and the CUDA kernels.

The oracle is bitsandbytes 0.50.2 on the CPU (tests marked ``interop``): packed bytes and absmax
must be identical, dequantized values identical, and double quantization identical up to the
documented differences (PyTorch's float32 mean vs our float64 mean; bitsandbytes' lookup-table
rounding vs our exact nearest rounding), which the tests measure.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora import backend
from minilora.quant import (DYNAMIC_MAP, FP4_CODE, INT4_CODE, NF4_CODE, VALID_BLOCKSIZES,
                            DoubleQuantState, NF4Tensor, QuantizedTensor4bit, create_normal_map,
                            dequantize_nf4, double_quantize, float32_linspace,
                            nf4_bits_per_parameter, pack_4bit, quantization_error,
                            quantize_blockwise_8bit, quantize_fp4, quantize_int4, quantize_nf4,
                            storage_bytes, unpack_4bit)
from minilora.quant import report as qreport

# The 16 values of bitsandbytes 0.50.2's NF4 code book (``functional.create_normal_map``), to 9 digits.
NF4_REFERENCE = [-1.0, -0.696192801, -0.525073051, -0.394917488, -0.284441382, -0.184773430,
                 -0.0910500363, 0.0, 0.0795802996, 0.160930201, 0.246112302, 0.337915242,
                 0.440709829, 0.562617004, 0.722956836, 1.0]

# Error of a standard-normal 4096x4096 matrix at blocksize 64, measured with bitsandbytes 0.50.2:
# (mean abs error, max abs error, RMSE).
BNB_ERROR_TABLE = {("nf4", False): (0.072807, 0.604105, 0.091988),
                ("nf4", True): (0.072881, 0.598553, 0.092013),
                ("fp4", False): (0.096563, 0.722610, 0.121954)}


# ================================================================ code books
def test_nf4_code_equals_reference_values():
    expected = np.array(NF4_REFERENCE, dtype=np.float32)
    assert NF4_CODE.dtype == np.float32 and NF4_CODE.shape == (16,)
    np.testing.assert_array_equal(NF4_CODE, expected)          # exact float32 equality
    np.testing.assert_array_equal(create_normal_map(), expected)


def test_nf4_code_is_built_from_normal_quantiles():
    """Recompute the positive and negative halves independently from Phi^-1."""
    from statistics import NormalDist
    phi_inv = NormalDist().inv_cdf
    p9 = float32_linspace(0.9677083, 0.5, 9)[:-1]
    p8 = float32_linspace(0.9677083, 0.5, 8)[:-1]
    top = np.float32(phi_inv(float(p9[0])))
    positive = np.array([phi_inv(float(p)) for p in p9], dtype=np.float32) / top
    negative = -np.array([phi_inv(float(p)) for p in p8], dtype=np.float32) / top
    np.testing.assert_array_equal(NF4_CODE[8:], positive[::-1])   # 8 positive values
    np.testing.assert_array_equal(NF4_CODE[:7], negative)         # 7 negative values
    assert NF4_CODE[7] == 0.0 and NF4_CODE[0] == -1.0 and NF4_CODE[-1] == 1.0
    assert np.all(np.diff(NF4_CODE) > 0)


def test_float32_spacing_of_the_probabilities_matters():
    """bitsandbytes spaces the probabilities in float32: a float64 linspace changes several code
    values in their last bits."""
    from statistics import NormalDist
    phi_inv = NormalDist().inv_cdf
    v = [phi_inv(p) for p in np.linspace(0.9677083, 0.5, 9)[:-1]]
    v += [-phi_inv(p) for p in np.linspace(0.9677083, 0.5, 8)[:-1]] + [0.0]
    v = np.sort(np.array(v, dtype=np.float32))
    assert np.count_nonzero(v / v.max() != NF4_CODE) > 0


def test_symmetric_variant_wastes_a_pattern_on_a_second_zero():
    sym = create_normal_map(use_extra_value=False)
    assert np.count_nonzero(sym == 0) == 2 and np.count_nonzero(NF4_CODE == 0) == 1
    assert np.count_nonzero(NF4_CODE > 0) == 8 and np.count_nonzero(NF4_CODE < 0) == 7
    with pytest.raises(ValueError, match="offset"):
        create_normal_map(offset=1.0)


def test_int4_and_fp4_code_books():
    np.testing.assert_array_equal(INT4_CODE, -INT4_CODE[::-1])          # symmetric
    assert np.count_nonzero(INT4_CODE == 0) == 2                        # the wasted pattern
    assert FP4_CODE[3] == 1.0 and FP4_CODE[11] == -1.0 and FP4_CODE[1] == np.float32(0.0625 / 12)
    for code in (NF4_CODE, FP4_CODE, INT4_CODE, DYNAMIC_MAP):
        assert not code.flags.writeable                                 # format constants


@pytest.mark.interop
def test_code_books_equal_bitsandbytes(bnb_functional):
    F = bnb_functional
    np.testing.assert_array_equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(FP4_CODE, F.get_4bit_type("fp4", device="cpu").numpy())
    np.testing.assert_array_equal(DYNAMIC_MAP, F.create_dynamic_map(signed=True).numpy())


@pytest.mark.interop
def test_float32_linspace_equals_torch():
    torch = pytest.importorskip("torch")
    for start, end, steps in [(0.9677083, 0.5, 9), (0.9677083, 0.5, 8), (0.1, 1.0, 65),
                              (0.1, 1.0, 33), (-3.0, 7.5, 101), (0.0, 1.0, 2)]:
        np.testing.assert_array_equal(float32_linspace(start, end, steps),
                                      torch.linspace(start, end, steps).numpy())


# ================================================================ against bitsandbytes
@pytest.fixture(scope="module")
def bnb_functional():
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    # bitsandbytes' pure-PyTorch dequantization is wrapped in torch.compile, which recompiles for
    # every new shape; eager mode runs the same float32 operations without minutes of compiling.
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield F
    torch._dynamo.config.disable = old


def _bnb_dequantize(F, packed, state, shape, blocksize):
    """bitsandbytes' dequantization. Its C kernel (used for an even last dimension) assumes every
    row holds whole blocks: when the last dimension is not a multiple of the blocksize it reads the
    wrong absmax (e.g. shape (2, 96), blocksize 64: value 128 gets block 1's scale, not block 2's),
    disagreeing with its own quantizer and with its pure-PyTorch reference. There we compare with
    that reference, which follows the steps in minilora/quant/nf4.py's docstring."""
    import torch
    if shape[-1] % 2 == 1 or shape[-1] % blocksize == 0:
        return F.dequantize_4bit(packed, state).numpy().reshape(shape)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), state.absmax, code, blocksize, shape,
                                    torch.float32).numpy()


SHAPES = [(1,), (3, 5), (7, 33), (64, 64), (2, 96), (1000,), (5, 3, 7), (129, 65)]


@pytest.mark.interop
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_packed_absmax_and_values_equal_bitsandbytes(bnb_functional, shape, quant_type):
    import torch
    F = bnb_functional
    quantize = quantize_nf4 if quant_type == "nf4" else quantize_fp4
    rng = np.random.default_rng(zlib.crc32(repr((shape, quant_type)).encode()))
    for blocksize in VALID_BLOCKSIZES[:6]:                      # 32 .. 1024
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        w.reshape(-1)[:: 7] = 0.0                               # exact zeros, ties at 0
        q = quantize(w, blocksize)
        packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=blocksize,
                                        quant_type=quant_type)
        assert packed.shape == ((w.size + 1) // 2, 1)           # bnb keeps a trailing axis of 1
        np.testing.assert_array_equal(q.packed, packed.numpy().reshape(-1))
        np.testing.assert_array_equal(q.absmax, state.absmax.numpy())
        ours = q.dequantize()
        assert ours.shape == shape and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, _bnb_dequantize(F, packed, state, shape, blocksize))


@pytest.mark.interop
def test_large_blocksizes_and_midpoint_ties_equal_bitsandbytes(bnb_functional):
    """Blocksizes 2048 and 4096 with a partial block, and values placed exactly on midpoints
    (which must take the lower index)."""
    import torch
    F = bnb_functional
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    for blocksize in (2048, 4096):
        w = np.random.default_rng(blocksize).standard_normal(3 * blocksize + 101).astype(np.float32)
        w[0] = 1.0                                              # first block's absmax is exactly 1
        w[1:blocksize] = 0.0
        w[1:16] = midpoints                                     # scaled values exactly on midpoints
        q = quantize_nf4(w, blocksize)
        packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=blocksize, quant_type="nf4")
        np.testing.assert_array_equal(q.packed, packed.numpy().reshape(-1))
        np.testing.assert_array_equal(q.absmax, state.absmax.numpy())
        np.testing.assert_array_equal(q.indices()[1:16], np.arange(15))   # lower index on ties


@pytest.mark.interop
def test_double_quant_against_bitsandbytes(bnb_functional):
    """Double quantization vs bitsandbytes, part by part.

    - packed bytes are the same as without double quantization;
    - offset: our float64 mean rounded once (the correctly rounded mean) vs PyTorch's float32
      mean: within two ulp;
    - given the same offset, the nested absmax are identical and the 8-bit codes differ only where
      bitsandbytes' lookup-table search keeps the farther neighbour: a small fraction, one index,
      and our choice is never farther from the value;
    - reconstruction from bitsandbytes' stored state equals its own, bit for bit.
    """
    import torch
    F = bnb_functional
    rng = np.random.default_rng(7)
    total = differing = 0
    for shape, blocksize in [((512, 512), 64), ((300, 77), 32), ((1024, 700), 64),
                             ((256, 999), 128)]:
        w = rng.standard_normal(shape).astype(np.float32)
        q = quantize_nf4(w, blocksize, double_quant=True)
        plain = quantize_nf4(w, blocksize)
        packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=blocksize,
                                        quant_type="nf4", compress_statistics=True)
        np.testing.assert_array_equal(q.packed, packed.numpy().reshape(-1))
        np.testing.assert_array_equal(q.packed, plain.packed)
        dq = q.double_quant_state
        bnb_offset = np.float32(state.offset.item())
        # Ours is the correctly rounded mean; PyTorch sums in float32, which here lands up to
        # 1.6 ulp from the exact mean (so its rounding can be 2 ulp from ours).
        exact = math.fsum(plain.absmax.astype(np.float64).tolist()) / plain.absmax.size
        assert dq.offset[0] == np.float32(exact)
        assert abs(float(dq.offset[0]) - float(bnb_offset)) <= 2 * float(np.spacing(bnb_offset))

        codes, nested = quantize_blockwise_8bit(plain.absmax - bnb_offset)
        np.testing.assert_array_equal(nested, state.state2.absmax.numpy())
        bnb_codes = state.absmax.numpy()
        diff = np.nonzero(codes != bnb_codes)[0]
        total += codes.size
        differing += diff.size
        assert np.all(np.abs(codes[diff].astype(int) - bnb_codes[diff]) == 1)
        scaled = (plain.absmax - bnb_offset) / np.repeat(nested, 256)[: codes.size]
        ours_err = np.abs(scaled[diff] - DYNAMIC_MAP[codes[diff]])
        bnb_err = np.abs(scaled[diff] - DYNAMIC_MAP[bnb_codes[diff]])
        assert np.all(ours_err <= bnb_err)

        bnb_state = DoubleQuantState(bnb_codes, state.state2.absmax.numpy(),
                                     np.array([bnb_offset], dtype=np.float32))
        bnb_absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
        np.testing.assert_array_equal(bnb_state.dequantize(), bnb_absmax)
        same_blocks = np.repeat(codes == bnb_codes, blocksize)[: w.size].reshape(shape)
        bnb_values = F.dequantize_4bit(packed, state).numpy().reshape(shape)
        if float(dq.offset[0]) == float(bnb_offset):            # then equal codes give equal values
            np.testing.assert_array_equal(q.dequantize()[same_blocks], bnb_values[same_blocks])
        # Elsewhere the difference is at most one step of the 8-bit map times the nested absmax.
        bound = np.diff(DYNAMIC_MAP).max() * nested.max() + 1e-6
        assert np.abs(q.dequantize() - bnb_values).max() <= bound
    assert differing / total < 0.005, f"{differing} of {total} 8-bit codes differ"


# ================================================================ error statistics
def test_error_statistics_match_the_nf4_table():
    """Standard-normal 4096x4096 at blocksize 64 (fixed seed) against bitsandbytes' measured figures.

    Means over 16.7 M values have a sampling spread of ~1e-5, so mean abs error and RMSE must agree
    to 1e-4 with bitsandbytes' figures from another draw. The max is set by the few largest
    draws, so it only agrees to a few percent; it must also stay under its bound, half the largest
    gap between codes times the largest absmax.
    """
    backend.manual_seed(0)
    w = backend.rng().standard_normal((4096, 4096), dtype=np.float32)
    results = {}
    for (kind, dq), (mean_abs, max_abs, rmse) in BNB_ERROR_TABLE.items():
        q = (quantize_nf4 if kind == "nf4" else quantize_fp4)(w, 64, double_quant=dq)
        err = quantization_error(w, q.dequantize())
        results[kind, dq] = err
        assert abs(err["mean_abs_error"] - mean_abs) < 1e-4
        assert abs(err["rmse"] - rmse) < 1e-4
        assert abs(err["max_abs_error"] - max_abs) < 0.1 * max_abs
        code = np.sort(q.code)
        assert err["max_abs_error"] <= np.diff(code).max() / 2 * float(q.absmax.max()) * 1.001
    int4 = quantization_error(w, quantize_int4(w, 64).dequantize())
    nf4 = results["nf4", False]
    for other in (results["fp4", False], int4):                   # NF4 wins on normal weights
        assert nf4["mean_abs_error"] < other["mean_abs_error"]
        assert nf4["rmse"] < other["rmse"]


# ================================================================ properties
float_arrays = hnp.arrays(
    dtype=np.float32,
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=70),
    elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(w=float_arrays, blocksize=st.sampled_from(VALID_BLOCKSIZES),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]))
def test_round_trip_shape_dtype_and_error_bound(w, blocksize, quant_type):
    quantize = {"nf4": quantize_nf4, "fp4": quantize_fp4, "int4": quantize_int4}[quant_type]
    q = quantize(w, blocksize)
    w_hat = q.dequantize()
    assert w_hat.shape == w.shape and w_hat.dtype == np.float32
    assert q.packed.dtype == np.uint8 and q.packed.size == (w.size + 1) // 2
    assert q.absmax.dtype == np.float32 and q.absmax.size == -(-w.size // blocksize)
    # |error| <= half the largest gap between codes * the block's absmax (+ float32 rounding:
    # the scaled value and the product are each within a few ulp).
    half_gap = np.diff(np.sort(q.code)).max() / 2
    # The quantizer scales by max(absmax, 1e-38) (step 2 in minilora/quant/nf4.py), so a block of
    # subnormals is scaled by 1e-38 and rounds to the zero code: the bound uses that same clamped
    # scale.
    scale = np.maximum(np.repeat(q.absmax, blocksize)[: w.size].reshape(w.shape), np.float32(1e-38))
    assert np.all(np.abs(w - w_hat) <= scale * (half_gap + 1e-6))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(w=float_arrays, blocksize=st.sampled_from(VALID_BLOCKSIZES))
def test_index_is_the_nearest_code_by_the_spec(w, blocksize):
    """Indices equal the recipe (step 3 in minilora/quant/nf4.py) computed independently with
    searchsorted(side='left')."""
    q = quantize_nf4(w, blocksize)
    x = w.reshape(-1)
    n_full = x.size // blocksize * blocksize
    absmax = q.absmax
    block = np.arange(x.size) // blocksize
    inv = np.float32(1) / np.maximum(absmax, np.float32(1e-38))
    scaled = np.where(np.arange(x.size) < n_full, x * inv[block],
                      x / np.maximum(absmax[block], np.float32(1e-38))).astype(np.float32)
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    expected = np.searchsorted(midpoints, np.clip(scaled, -1, 1), side="left")
    np.testing.assert_array_equal(q.indices().reshape(-1), expected)
    np.testing.assert_array_equal(dequantize_nf4(q).reshape(-1),
                                  NF4_CODE[expected] * absmax[block])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(idx=hnp.arrays(np.uint8, st.integers(0, 301), elements=st.integers(0, 15)))
def test_packing_and_unpacking_are_inverse(idx):
    packed = pack_4bit(idx)
    assert packed.dtype == np.uint8 and packed.size == (idx.size + 1) // 2
    np.testing.assert_array_equal(unpack_4bit(packed, idx.size), idx)
    if idx.size >= 2:                                         # even element in the high nibble
        assert packed[0] == (idx[0] << 4) | idx[1]


def test_odd_sizes_pad_with_the_index_of_zero():
    w = np.array([1.0, -1.0, 0.5], dtype=np.float32)
    q = quantize_nf4(w, 32)
    assert q.packed.size == 2 and (q.packed[1] & 0x0F) == 7     # NF4_CODE[7] == 0
    np.testing.assert_array_equal(q.dequantize()[:2], [1.0, -1.0])


@pytest.mark.parametrize("shape", [(5,), (3, 67), (64, 64)])
def test_dequantize_into_a_buffer(shape):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for dq in (False, True):
        q = quantize_nf4(w, 32, double_quant=dq)
        buf = np.full(shape, np.nan, np.float32)
        result = q.dequantize(out=buf)
        assert np.shares_memory(result, buf)
        np.testing.assert_array_equal(buf, q.dequantize())
    with pytest.raises(ValueError, match="out must be"):
        q.dequantize(out=np.empty(w.size + 1, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        q.dequantize(out=np.empty(shape, np.float64))


# ================================================================ storage and double quant
@pytest.mark.parametrize("n", [1, 63, 64, 1000, 64 * 256 + 5, 100_003])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dq", [False, True])
def test_nbytes_is_what_is_stored_and_matches_the_formula(n, blocksize, dq):
    q = quantize_nf4(np.linspace(-1, 1, n, dtype=np.float32), blocksize, double_quant=dq)
    assert q.nbytes == sum(a.nbytes for a in q.stored_arrays().values())
    assert q.nbytes == sum(storage_bytes(n, blocksize, dq).values())
    assert q.bits_per_parameter == pytest.approx(8 * q.nbytes / n)
    assert q.bits_per_parameter == pytest.approx(nf4_bits_per_parameter(blocksize, dq, n=n))


def test_bits_per_parameter_figures():
    assert nf4_bits_per_parameter(64) == 4.5
    assert nf4_bits_per_parameter(64, double_quant=True) == pytest.approx(4.126953, abs=1e-6)
    assert nf4_bits_per_parameter(256) == 4.125
    assert nf4_bits_per_parameter(256, double_quant=True) == pytest.approx(4.031738, abs=1e-6)
    # A large tensor approaches the asymptotic figure (the offset is 4 bytes per tensor).
    q = quantize_nf4(np.ones((512, 512), np.float32), 64, double_quant=True)
    assert q.bits_per_parameter == pytest.approx(4.126953, abs=1e-3)


def test_double_quant_keeps_packed_bytes_and_reconstructs_absmax():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 301)).astype(np.float32)
    plain = quantize_nf4(w, 64)
    dq = quantize_nf4(w, 64, double_quant=True)
    np.testing.assert_array_equal(dq.packed, plain.packed)
    state = dq.double_quant_state
    assert set(dq.stored_arrays()) == {"packed", "absmax_q", "nested_absmax", "offset"}
    assert state.q.dtype == np.uint8 and state.nested_absmax.size == -(-plain.absmax.size // 256)
    # Reconstruction error: at most half the largest step of the 8-bit map times the nested absmax.
    half_step = np.diff(DYNAMIC_MAP).max() / 2
    nested = np.repeat(state.nested_absmax, 256)[: plain.absmax.size]
    assert np.all(np.abs(dq.absmax - plain.absmax) <= nested * half_step + 1e-6)
    again = double_quantize(plain.absmax)
    np.testing.assert_array_equal(again.q, state.q)


# ================================================================ bad input
@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, 64.0, True, "64", None])
def test_bad_blocksize_raises(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096"):
        quantize_nf4(np.ones(128, np.float32), blocksize)


@pytest.mark.parametrize("w", [np.arange(10), np.ones(4, dtype=bool), np.array(["a", "b"])])
def test_non_float_input_raises(w):
    with pytest.raises(ValueError, match="floating-point"):
        quantize_nf4(w)


def test_empty_and_non_finite_input_raise():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_nf4(np.array([1.0, np.nan, 2.0], np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_nf4(np.full(64, np.inf, np.float32))
    with pytest.raises(ValueError, match="QuantizedTensor4bit"):
        dequantize_nf4(np.ones(4))


def test_inputs_of_other_dtypes_and_tensors():
    w = np.random.default_rng(0).standard_normal((8, 40))
    q64 = quantize_nf4(w)                                       # float64 is rounded to float32 first
    q32 = quantize_nf4(w.astype(np.float32))
    np.testing.assert_array_equal(q64.packed, q32.packed)
    assert isinstance(q64, NF4Tensor) and q64.shape == (8, 40) and q64.device == "cpu"
    assert isinstance(quantize_fp4(w), QuantizedTensor4bit)
    import minilora
    np.testing.assert_array_equal(quantize_nf4(minilora.Tensor(w.astype(np.float32))).packed,
                                  q32.packed)
    zeros = quantize_nf4(np.zeros((3, 64), np.float32))          # all-zero blocks stay zero
    np.testing.assert_array_equal(zeros.dequantize(), 0.0)


# ================================================================ report and CLI
def _toy_state_dict():
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((50, 32)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((32, 32)) * 0.02
                                                   ).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": (rng.standard_normal((32, 87)) * 0.02
                                                ).astype(np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(32, np.float32),
        "model.norm.weight": np.ones(32, np.float32),
    }


def test_quantize_state_dict_and_report():
    sd = _toy_state_dict()
    quantized = qreport.quantize_state_dict(sd, 64, double_quant=True)
    kinds = {k: isinstance(v, NF4Tensor) for k, v in quantized.items()}
    assert kinds == {"model.embed_tokens.weight": False,
                     "model.layers.0.self_attn.q_proj.weight": True,
                     "model.layers.0.mlp.down_proj.weight": True,
                     "model.layers.0.input_layernorm.weight": False, "model.norm.weight": False}
    rep = qreport.quantization_report(sd, quantized, 64, True)
    rows = {r.name: r for r in rep.rows}
    q_row = rows["model.layers.0.self_attn.q_proj.weight"]
    q = quantized["model.layers.0.self_attn.q_proj.weight"]
    assert q_row.bytes_before == 32 * 32 * 4 and q_row.bytes_after == q.nbytes
    err = quantization_error(sd["model.layers.0.self_attn.q_proj.weight"], q.dequantize())
    assert q_row.rmse == err["rmse"] and q_row.max_abs_error == err["max_abs_error"]
    assert rows["model.norm.weight"].bytes_after == rows["model.norm.weight"].bytes_before
    assert rep.bytes_after < rep.bytes_before
    table = rep.format_table()
    assert "total" in table and "q_proj" in table and "(kept)" in table


def test_cli_quantize_writes_and_reads_back(tmp_path, capsys):
    from safetensors.numpy import save_file
    from minilora.cli import main
    sd = _toy_state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"))
    out = tmp_path / "out"
    assert main(["quantize", str(tmp_path), "--blocksize", "32", "--double-quant",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocksize 32" in printed and "quantized weights" in printed
    assert sorted(p.name for p in out.iterdir()) == [qreport.QUANTIZED_FILE]   # no temp files left
    loaded = qreport.load_quantized(out)
    for name, value in sd.items():
        if qreport.should_quantize(name, value):
            expect = quantize_nf4(value, 32, double_quant=True)
            assert isinstance(loaded[name], NF4Tensor) and loaded[name].double_quant
            np.testing.assert_array_equal(loaded[name].dequantize(), expect.dequantize())
        else:
            np.testing.assert_array_equal(loaded[name], value)


def test_cli_quantize_errors(tmp_path, capsys):
    from minilora.cli import main
    assert main(["quantize", str(tmp_path / "missing")]) != 0
    assert "model.safetensors" in capsys.readouterr().err
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["quantize", str(tmp_path)]) != 0
    assert "cannot read" in capsys.readouterr().err


# ================================================================ CUDA
def _cuda_cases():
    rng = np.random.default_rng(11)
    for shape, blocksize in [((1,), 32), ((7, 33), 64), ((129, 65), 128), ((256, 256), 64),
                             ((3, 1001), 4096), ((1000,), 2048)]:
        yield rng.standard_normal(shape).astype(np.float32), blocksize


@pytest.mark.cuda
@pytest.mark.parametrize("dq", [False, True])
def test_cuda_kernel_equals_numpy(cuda_device, dq):
    """Quantizing on the GPU gives the same bytes; the dequantization kernel the same float32."""
    for w, blocksize in _cuda_cases():
        on_cpu = quantize_nf4(w, blocksize, double_quant=dq)
        on_gpu = quantize_nf4(backend.to_device(w, "cuda"), blocksize, double_quant=dq)
        assert on_gpu.device == "cuda" and backend.device_of(on_gpu.packed) == "cuda"
        np.testing.assert_array_equal(backend.to_numpy(on_gpu.packed), on_cpu.packed)
        # The same stored state dequantized by the kernel and by NumPy: identical bits.
        moved = on_cpu.to("cuda")
        np.testing.assert_array_equal(backend.to_numpy(moved.absmax), on_cpu.absmax)
        np.testing.assert_array_equal(backend.to_numpy(moved.dequantize()), on_cpu.dequantize())
        if not dq:
            np.testing.assert_array_equal(backend.to_numpy(on_gpu.absmax), on_cpu.absmax)
            np.testing.assert_array_equal(backend.to_numpy(on_gpu.dequantize()),
                                          on_cpu.dequantize())


@pytest.mark.cuda
def test_cuda_fp4_and_round_trip_to_host(cuda_device):
    w = np.random.default_rng(5).standard_normal((33, 70)).astype(np.float32)
    q = quantize_fp4(backend.to_device(w, "cuda"), 64)
    np.testing.assert_array_equal(backend.to_numpy(q.packed), quantize_fp4(w, 64).packed)
    np.testing.assert_array_equal(q.to("cpu").dequantize(), quantize_fp4(w, 64).dequantize())
