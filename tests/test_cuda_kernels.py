"""minilora's CUDA row kernels (``minilora/fast/cuda_kernels.py``) against exact references.

What runs where:

* everywhere: the error analysis. Each kernel has a float64 NumPy reference and an elementwise error
  bound derived from float32 rounding (below); a NumPy float32 *model* of each kernel, adding in the
  kernel's order (strided per-thread sums, then the warp-shuffle tree), must stay inside the bounds.
  That checks the bounds themselves here, so a GPU failure means the kernel, not the test;
* everywhere: every launch against a fake device that checks it against the kernel's C signature
  (argument order, dtypes, outputs, grid and block) and computes it with the model, so that
  ``fast/functional.py``'s CUDA branch runs end to end and must match the CPU path;
* where ``nvcc`` is on PATH: every kernel source compiles for sm_90 with CuPy's flags, warnings as
  errors; with an NVRTC library (``MINILORA_NVRTC_LIB=/path/libnvrtc.so`` or one on the loader path)
  also through NVRTC, the compiler CuPy's RawKernel really uses (it rejects e.g. ``INFINITY``, which
  nvcc's implicit headers define);
* on a GPU (``cuda_device``; skipped elsewhere): the kernels inside the same bounds, over
  hypothesis-drawn shapes (C = 1, C below a warp, not a multiple of 32, above the block size),
  ignored targets and logits up to 1e4 in magnitude; and ``functional``'s dispatch to them.

Error bounds: U = 2^-24 is float32's unit roundoff (one correctly rounded operation is off by at
most U relative); expf is within 2 ulp (<= 4U relative) and logf within 1 ulp (<= 2U); a sum of n
terms in any order is off by at most (n - 1) U times the sum of their magnitudes. CuPy compiles
with -ftz, so anything below TINY = 2^-126 may be flushed to zero. Each bound below adds these up to
first order and is doubled (SAFETY) for the second-order terms.
"""
import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilora
from minilora import Tensor, backend
from minilora import settings as ml_settings
from minilora.fast import cuda_kernels as ck
from minilora import functional as F

U = 2.0 ** -24
TINY = 2.0 ** -126
SAFETY = 2.0
IGNORE = -100
KERNEL_NAMES = sorted(ck.SOURCES)


# ================================================================ references and bounds (float64)
def _row_max_shift(x):
    x = x.astype(np.float64)
    d = x - x.max(axis=1, keepdims=True)          # (N, C), <= 0: the shifted logits
    e = np.exp(d)
    Z = e.sum(axis=1, keepdims=True)               # (N, 1)
    s = e / Z
    # relative error of the kernel's Z: each exp(fl(x - m)) is off by U|d| (the rounded argument)
    # + 4U (expf), weighted by its share s of Z; the sum adds (C - 1) U.
    zrel = U * ((s * -d).sum(axis=1, keepdims=True) + x.shape[1] + 4)
    return d, s, Z, zrel


def ref_softmax(x):
    d, s, _, zrel = _row_max_shift(x)
    return s, SAFETY * s * (U * -d + 5 * U + zrel) + TINY


def ref_softmax_backward(s, g):
    s, g = s.astype(np.float64), g.astype(np.float64)
    dot = (g * s).sum(axis=1, keepdims=True)
    dx = s * (g - dot)
    D = np.abs(g * s).sum(axis=1, keepdims=True)   # the dot's error is <= (C + 1) U D
    bound = SAFETY * (s * ((s.shape[1] + 1) * U * D + U * np.abs(g - dot)) + U * np.abs(dx))
    return dx, bound + TINY * (1 + np.abs(g - dot))


def ref_log_softmax(x):
    d, _, Z, zrel = _row_max_shift(x)
    y = d - np.log(Z)
    return y, SAFETY * (U * -d + zrel + 2 * U * np.abs(np.log(Z)) + U * np.abs(y)) + TINY


def ref_log_softmax_backward(y, g):
    y, g = y.astype(np.float64), g.astype(np.float64)
    total = g.sum(axis=1, keepdims=True)
    ey = np.exp(y)
    dx = g - ey * total
    G = np.abs(g).sum(axis=1, keepdims=True)
    bound = SAFETY * (ey * ((g.shape[1] - 1) * U * G + 5 * U * np.abs(total)) + U * np.abs(dx))
    return dx, bound + TINY * (1 + np.abs(total))


def ref_cross_entropy(z, t, ignore_index):
    _, _, Z, zrel = _row_max_shift(z)
    z64 = z.astype(np.float64)
    lse = (np.log(Z) + z64.max(axis=1, keepdims=True))[:, 0]          # (N,)
    valid = t != ignore_index
    safe_t = np.where(valid, t, 0)
    nll = (lse - z64[np.arange(len(t)), safe_t]) * valid
    lse_bound = SAFETY * (zrel[:, 0] + 2 * U * np.abs(np.log(Z[:, 0])) + U * np.abs(lse))
    return (lse, lse_bound), (nll, valid * (lse_bound + SAFETY * U * np.abs(nll)))  # ignored: 0


def ref_cross_entropy_backward(z, t, ignore_index, lse, scale):
    z64, lse64 = z.astype(np.float64), lse.astype(np.float64)[:, None]
    valid = (t != ignore_index)[:, None]
    onehot = np.zeros_like(z64)
    onehot[np.arange(len(t)), np.where(valid[:, 0], t, 0)] = 1.0
    p = np.exp(z64 - lse64)
    dz = (p - onehot) * (valid * float(scale))
    bound = SAFETY * (abs(float(scale)) * valid * (p * (U * np.abs(z64 - lse64) + 4 * U)
                                                  + U * np.abs(p - onehot)) + U * np.abs(dz))
    return dz, bound + TINY * abs(float(scale))


def ref_rms_norm(x, w, eps):
    x64 = x.astype(np.float64)
    w64 = np.ones(x.shape[1]) if w is None else w.astype(np.float64)
    r = 1.0 / np.sqrt((x64 * x64).mean(axis=1) + float(np.float32(eps)))   # (N,)
    y = x64 * r[:, None] * w64
    rr = (x.shape[1] / 2 + 3) * U          # r's relative error: half the mean's (C + 2) U, + 2U
    return (y, SAFETY * np.abs(y) * (rr + 2 * U) + TINY), (r, SAFETY * r * rr)


def ref_rms_norm_backward(x, w, r, g):
    x64, g64, r64 = x.astype(np.float64), g.astype(np.float64), r.astype(np.float64)[:, None]
    w64 = np.ones(x.shape[1]) if w is None else w.astype(np.float64)
    gw, xh = g64 * w64, x64 * r64
    dot = (gw * xh).mean(axis=1, keepdims=True)
    dx = r64 * (gw - xh * dot)
    dot_err = (x.shape[1] + 3) * U * np.abs(gw * xh).mean(axis=1, keepdims=True) + U * np.abs(dot)
    bound = SAFETY * (r64 * (U * np.abs(gw) + 2 * U * np.abs(xh * dot) + np.abs(xh) * dot_err
                             + U * np.abs(gw - xh * dot)) + U * np.abs(dx))
    return dx, bound + TINY


def check(what, got, ref, bound):
    """Every |got - ref| <= bound (NaN fails); the message names the worst value."""
    got = backend.to_numpy(got).astype(np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    err = np.abs(got - ref)
    ok = err <= bound
    if not ok.all():
        ratio = np.where(ok, 0.0, np.nan_to_num(err / np.maximum(bound, 1e-300), nan=np.inf))
        i = np.unravel_index(np.argmax(ratio), ratio.shape)
        pytest.fail(f"{what}: {int((~ok).sum())} of {ok.size} values outside the bound; worst at "
                    f"{i}: got {got[i]!r}, exact {ref[i]!r}, bound {bound[i]!r}")


# ================================================================ a NumPy model of the kernels
_F32 = np.float32


def _block_reduce(v, op, identity):
    """(N, C) float32 -> (N,) reduced in the kernels' order: thread t of T folds columns t, t + T,
    ... in turn; then the warp butterfly (offsets 16 .. 1; each lane ends with lane 0's bits, as
    + and max commute) and the same over the warp totals, padded with the identity to 32."""
    N, C = v.shape
    T = ck.block_threads(C)
    k = -(-C // T)
    lanes = np.full((N, k * T), identity, _F32)
    lanes[:, :C] = v
    lanes = lanes.reshape(N, k, T)                 # column j -> thread j % T, step j // T
    acc = lanes[:, 0]
    for i in range(1, k):
        acc = op(acc, lanes[:, i])

    def butterfly(a):                              # (..., 32) -> (...)
        for h in (16, 8, 4, 2, 1):
            a = op(a[..., :h], a[..., h:2 * h])
        return a[..., 0]
    warps = butterfly(acc.reshape(N, T // 32, 32))  # (N, T / 32) warp totals
    slots = np.full((N, 32), identity, _F32)
    slots[:, :T // 32] = warps
    return butterfly(slots)[:, None]               # (N, 1)


def _sum(v):
    return _block_reduce(v, np.add, 0.0)


def _max(v):
    return _block_reduce(v, np.fmax, -np.inf)


MODEL = {   # line by line what each kernel computes, in float32
    "softmax_forward_cuda": lambda x: np.exp(x - _max(x)) / _sum(np.exp(x - _max(x))),
    "softmax_backward_cuda": lambda s, g: s * (g - _sum(g * s)),
    "log_softmax_forward_cuda": lambda x: (x - _max(x)) - np.log(_sum(np.exp(x - _max(x)))),
    "log_softmax_backward_cuda": lambda y, g: g - np.exp(y) * _sum(g),
}


def _model_cross_entropy_forward(z, t, ignore_index):
    m = _max(z)
    lse = np.log(_sum(np.exp(z - m))) + m                          # (N, 1)
    valid = t != ignore_index
    safe_t = np.where(valid & (t >= 0) & (t < z.shape[1]), t, 0)
    nll = (lse[:, 0] - z[np.arange(len(t)), safe_t]) * valid.astype(_F32)
    return lse[:, 0], nll


def _model_cross_entropy_backward(z, t, ignore_index, lse, scale):
    valid = t != ignore_index
    safe_t = np.where(valid & (t >= 0) & (t < z.shape[1]), t, 0)
    p = np.exp(z - lse[:, None])
    p[np.arange(len(t)), safe_t] -= _F32(1)
    return p * (valid.astype(_F32) * _F32(scale))[:, None]


def _model_rms_norm_forward(x, w, eps):
    w = np.ones(x.shape[1], _F32) if w is None else w
    r = _F32(1) / np.sqrt(_sum(x * x) / _F32(x.shape[1]) + _F32(eps))   # (N, 1)
    return (x * r) * w, r[:, 0]


def _model_rms_norm_backward(x, w, r, g):
    w = np.ones(x.shape[1], _F32) if w is None else w
    r = r[:, None]
    dot = _sum((g * w) * (x * r)) / _F32(x.shape[1])
    return r * ((g * w) - (x * r) * dot)


MODEL.update(cross_entropy_forward_cuda=_model_cross_entropy_forward,
             cross_entropy_backward_cuda=_model_cross_entropy_backward,
             rms_norm_forward_cuda=_model_rms_norm_forward,
             rms_norm_backward_cuda=_model_rms_norm_backward)


def _on_gpu(name):
    """ck.<name> taking and returning NumPy arrays (moved to the GPU and back)."""
    fn = getattr(ck, name)

    def call(*args):
        out = fn(*[backend.to_device(a, "cuda") if isinstance(a, np.ndarray) else a for a in args])
        return tuple(map(backend.to_numpy, out)) if isinstance(out, tuple) else backend.to_numpy(out)
    return call


# ================================================================ one case, for any implementation
def inputs(n, c, scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c)) * scale).astype(_F32)
    g = rng.standard_normal((n, c)).astype(_F32)
    w = rng.standard_normal(c).astype(_F32)
    t = rng.integers(0, c, n)
    t[rng.random(n) < 0.3] = IGNORE
    if n > 1:
        t[0] = IGNORE                              # at least one ignored row
    return x, g, w, t


def run_case(impl, op, n, c, scale, seed):
    """Forward and backward of ``op`` by ``impl`` (name -> function of NumPy arrays), checked
    against the references. Each backward gets float32-rounded exact forward results as input, so
    its bound covers the backward kernel alone."""
    x, g, w, t = inputs(n, c, scale, seed)
    if op == "softmax":
        check("softmax", impl["softmax_forward_cuda"](x), *ref_softmax(x))
        s = ref_softmax(x)[0].astype(_F32)
        check("softmax backward", impl["softmax_backward_cuda"](s, g), *ref_softmax_backward(s, g))
    elif op == "log_softmax":
        check("log_softmax", impl["log_softmax_forward_cuda"](x), *ref_log_softmax(x))
        y = ref_log_softmax(x)[0].astype(_F32)
        check("log_softmax backward", impl["log_softmax_backward_cuda"](y, g),
              *ref_log_softmax_backward(y, g))
    elif op == "cross_entropy":
        lse, nll = impl["cross_entropy_forward_cuda"](x, t, IGNORE)
        (lse_ref, lse_b), (nll_ref, nll_b) = ref_cross_entropy(x, t, IGNORE)
        check("cross_entropy lse", lse, lse_ref, lse_b)
        check("cross_entropy nll", nll, nll_ref, nll_b)
        lse32 = lse_ref.astype(_F32)
        scale32 = _F32(1.0 / max(1, int((t != IGNORE).sum())))     # upstream 1 over n_valid
        check("cross_entropy backward",
              impl["cross_entropy_backward_cuda"](x, t, IGNORE, lse32, scale32),
              *ref_cross_entropy_backward(x, t, IGNORE, lse32, scale32))
    elif op == "rms_norm":
        for weight in (w, None):
            y, r = impl["rms_norm_forward_cuda"](x, weight, 1e-6)
            (y_ref, y_b), (r_ref, r_b) = ref_rms_norm(x, weight, 1e-6)
            check("rms_norm y", y, y_ref, y_b)
            check("rms_norm r", r, r_ref, r_b)
            r32 = r_ref.astype(_F32)
            check("rms_norm backward", impl["rms_norm_backward_cuda"](x, weight, r32, g),
                  *ref_rms_norm_backward(x, weight, r32, g))
    else:
        raise AssertionError(op)


OPS = ["softmax", "log_softmax", "cross_entropy", "rms_norm"]
# widths that matter for the indexing: 1, below a warp, around 32 and the block size, above it
WIDTHS = st.one_of(st.sampled_from([1, 2, 31, 32, 33, 255, 256, 257, 1000, 4099]),
                   st.integers(1, 2100))
SCALES = st.sampled_from([1.0, 10.0, 1e4])   # 1e4: exp(x) alone would overflow at 88
GPU_SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                               HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("op", OPS)
@given(n=st.integers(1, 5), c=WIDTHS, scale=SCALES, seed=st.integers(0, 2**16))
def test_kernel_model_within_bounds(op, n, c, scale, seed):
    """The float32 model of each kernel (same order of additions) stays inside the error bounds."""
    run_case(MODEL, op, n, c, scale, seed)


def test_bounds_catch_a_wrong_answer():
    """The bounds are tight enough to fail a plausible bug (here one value off by 0.1%)."""
    x, g, w, t = inputs(3, 37, 1.0, 0)
    wrong = MODEL["softmax_forward_cuda"](x).copy()
    wrong[1, 36] *= 1.001
    with pytest.raises(pytest.fail.Exception, match="outside the bound"):
        check("softmax", wrong, *ref_softmax(x))


# ================================================================ sources: compile checks
def test_block_threads_is_a_full_power_of_two():
    assert ck.MAX_THREADS in (32, 64, 128, 256, 512, 1024)   # block_sum has 32 warp slots
    for C in list(range(1, 1100)) + [4099, 50_000, 2**31 - 2000]:
        T = ck.block_threads(C)
        assert T & (T - 1) == 0 and 32 <= T <= ck.MAX_THREADS
        assert T >= min(C, ck.MAX_THREADS) and (T == 32 or T < 2 * C)   # no block of idle warps


def test_sources_use_only_nvrtc_builtins():
    """NVRTC compiles without headers: no includes, no host macros (INFINITY, NAN, FLT_MAX), and
    each source defines its kernel unmangled (extern "C"), the name RawKernel looks up."""
    for name, src in ck.SOURCES.items():
        assert not re.search(r"#include|\bINFINITY\b|\bNAN\b|\bFLT_|\bstd::|printf", src), name
        assert f'extern "C" __global__ void {name}(' in src
        assert src.count("__global__") == 1, name
        body = src.split("__global__")[1]
        if "block_sum(" in body or "block_max(" in body:       # the reductions' 32 warp slots
            assert "__shared__ float partial[32];" in body, name


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_source_compiles_with_nvcc(name, tmp_path):
    """The exact string RawKernel gets, through nvcc with CuPy's -ftz=true, for sm_90 (H100/H200)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (install the CUDA toolkit to run the compile checks)")
    src = tmp_path / f"{name}.cu"
    src.write_text(ck.SOURCES[name])
    ptx = tmp_path / f"{name}.ptx"
    proc = subprocess.run([nvcc, "--ptx", "-arch=sm_90", "-ftz=true", "--Werror", "all-warnings",
                           "-o", str(ptx), str(src)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f".entry {name}(" in ptx.read_text()      # extern "C": the name is not mangled


def _nvrtc():
    path = os.environ.get("MINILORA_NVRTC_LIB") or ctypes.util.find_library("nvrtc")
    if not path:
        pytest.skip("no NVRTC library (set MINILORA_NVRTC_LIB=/path/to/libnvrtc.so.12)")
    return ctypes.CDLL(path)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_source_compiles_with_nvrtc(name):
    """The compiler CuPy's RawKernel uses, with its options (-arch=compute_90 -ftz=true)."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), ck.SOURCES[name].encode(),
                                  f"{name}.cu".encode(), 0, None, None) == 0
    try:
        opts = (ctypes.c_char_p * 2)(b"-arch=compute_90", b"-ftz=true")
        rc = lib.nvrtcCompileProgram(prog, 2, opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode(errors="replace")
        assert "warning" not in log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ================================================================ on the CPU: nothing changes
def test_launchers_check_their_input_before_any_cuda():
    with pytest.raises(ValueError, match="float32"):
        ck.softmax_forward_cuda(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        ck.rms_norm_forward_cuda(np.zeros(3, _F32), None, 1e-6)


def test_kernels_need_cuda():
    if backend.cuda_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        ck.kernel("minilora_softmax_forward")


def _forbid_kernels(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a CUDA kernel was called")
    for name in [*MODEL, "kernel"]:
        monkeypatch.setattr(ck, name, boom)


def _fused_ops_on(x, g, w, t, to):
    """Outputs and input gradients of the four fused ops (``F``'s fast path), on arrays moved by
    ``to``."""
    results = {}
    for op in OPS:
        xt = Tensor(to(x), requires_grad=True)
        wt = Tensor(to(w), requires_grad=True)
        if op == "softmax":
            out = F.softmax(xt)
        elif op == "log_softmax":
            out = F.log_softmax(xt)
        elif op == "cross_entropy":
            out = F.cross_entropy(xt, to(t), ignore_index=IGNORE)
        else:
            out = F.rms_norm(xt, wt, 1e-6)
        out.backward(to(g) if out.ndim else None)
        results[op] = [backend.to_numpy(a) for a in (out.data, xt.grad)]
        if op == "rms_norm":
            results[op].append(backend.to_numpy(wt.grad))
    return results


def test_cpu_path_calls_no_kernel_and_matches_references(monkeypatch):
    """On NumPy the dispatch never reaches cuda_kernels, and the fused ops stay within the same
    float32 bounds the kernels must meet."""
    _forbid_kernels(monkeypatch)
    x, g, w, t = inputs(4, 37, 3.0, 1)
    res = _fused_ops_on(x.reshape(2, 2, 37), g.reshape(2, 2, 37), w, t.reshape(2, 2), lambda a: a)
    check("softmax", res["softmax"][0].reshape(4, 37), *ref_softmax(x))
    s = res["softmax"][0].reshape(4, 37)
    check("softmax grad", res["softmax"][1].reshape(4, 37), *ref_softmax_backward(s, g))
    check("log_softmax", res["log_softmax"][0].reshape(4, 37), *ref_log_softmax(x))
    (y_ref, y_b), _ = ref_rms_norm(x, w, 1e-6)
    check("rms_norm", res["rms_norm"][0].reshape(4, 37), y_ref, y_b)
    _, (nll, nll_b) = ref_cross_entropy(x, t, IGNORE)
    n_valid = (t != IGNORE).sum()
    # the rows' errors, plus the N-term sum's rounding and the division's
    loss_bound = (nll_b.sum() + 2 * len(t) * U * np.abs(nll).sum()) / n_valid
    assert abs(float(res["cross_entropy"][0]) - nll.sum() / n_valid) <= loss_bound


# ================================================================ the launches, against a fake device
# The CUDA C itself cannot run here, but everything around it can: a fake ``ck.kernel`` checks each
# launch against the kernel's C signature (parsed from its source: argument count, order, dtypes,
# const inputs vs outputs, contiguity) and the launch shape (grid (N,), block (block_threads(C),)),
# then computes the outputs with the NumPy model. fast/functional.py's CUDA branch, told that NumPy float32
# arrays are on the GPU, then runs end to end.
_C_TYPES = {"const float*": np.ndarray, "float*": np.ndarray, "const long long*": np.ndarray,
            "const long long": np.int64, "const int": np.int32, "const float": np.float32}
_POINTEE = {"const float*": np.float32, "float*": np.float32, "const long long*": np.int64}


def c_signature(name):
    """[(C type, parameter name)] of kernel ``name``, from its source."""
    params = re.search(rf"void {name}\((.*?)\)\s*{{", ck.SOURCES[name], re.S).group(1)
    sig = []
    for p in params.split(","):
        p = " ".join(p.replace("__restrict__", "").split()).replace(" *", "*")
        ctype, pname = p.rsplit(" ", 1)
        sig.append((ctype.replace("* ", "*"), pname))
    return sig


def _emulate(name, a):
    """The outputs of kernel ``name`` from its named arguments, written in place (the model)."""
    kind = name.removeprefix("minilora_")
    if kind in ("softmax_forward", "log_softmax_forward"):
        a["s" if "s" in a else "y"][...] = MODEL[kind + "_cuda"](a["x"])
    elif kind in ("softmax_backward", "log_softmax_backward"):
        a["dx"][...] = MODEL[kind + "_cuda"](a["s" if "s" in a else "y"], a["g"])
    elif kind == "cross_entropy_forward":
        a["lse"][...], a["nll"][...] = MODEL["cross_entropy_forward_cuda"](
            a["z"], a["targets"], a["ignore_index"])
    elif kind == "cross_entropy_backward":
        a["dz"][...] = MODEL["cross_entropy_backward_cuda"](
            a["z"], a["targets"], a["ignore_index"], a["lse"], a["scale"][0])
    elif kind == "rms_norm_forward":
        a["y"][...], a["r"][...] = MODEL["rms_norm_forward_cuda"](a["x"], a["w"], a["eps"])
    elif kind == "rms_norm_backward":
        a["dx"][...] = MODEL["rms_norm_backward_cuda"](a["x"], a["w"], a["r"], a["g"])
    else:
        raise AssertionError(name)


class FakeKernel:
    launches: list = []

    def __init__(self, name):
        self.name, self.sig = name, c_signature(name)

    def __call__(self, grid, block, args, shared_mem=0):
        assert len(args) == len(self.sig), f"{self.name}: {len(args)} arguments for {self.sig}"
        named = {}
        for (ctype, pname), arg in zip(self.sig, args):
            assert isinstance(arg, _C_TYPES[ctype]), f"{self.name}({pname}): {type(arg)} for {ctype}"
            if ctype in _POINTEE:
                assert arg.dtype == _POINTEE[ctype] and arg.flags.c_contiguous, (self.name, pname)
                if not ctype.startswith("const"):
                    arg.fill(np.nan)           # an output: every value must be written
            named[pname] = arg
        N, C = grid[0], int(named["C"])
        assert grid == (N,) and block == (ck.block_threads(C),) and shared_mem == 0
        for pname, arg in named.items():       # (N, C) rows, (N,) per row, (C,) weights, (1,)
            if isinstance(arg, np.ndarray):
                assert arg.shape in ((N, C), (N,), (C,), (1,)), (self.name, pname, arg.shape)
        _emulate(self.name, named)
        FakeKernel.launches.append(self.name)


@pytest.fixture
def fake_gpu(monkeypatch):
    """NumPy float32 arrays take fast/functional.py's CUDA branch; kernels launch on the fake device."""
    monkeypatch.setattr(ck, "kernel", FakeKernel)
    monkeypatch.setattr(ck, "applies", lambda *arrays: all(
        a.dtype == np.float32 and a.size > 0 and a.ndim > 0 for a in arrays))
    FakeKernel.launches = []
    yield FakeKernel.launches


def test_applies_reads_the_switch_at_each_call_and_not_in_reference_mode(monkeypatch):
    """``ck.applies`` is True for non-empty float32 arrays of a GPU module (faked: any module but
    NumPy), and False once ``settings.USE_CUDA_KERNELS`` is switched off or inside reference()."""
    monkeypatch.setattr(ck.backend, "get_xp", lambda *arrays: object())
    x = np.ones((2, 3), dtype=_F32)
    with minilora.reference(False):
        assert ck.applies(x, x[0])
        assert not ck.applies(x.astype(np.float64)) and not ck.applies(x[:0])
        monkeypatch.setattr(ml_settings, "USE_CUDA_KERNELS", False)
        assert not ck.applies(x)
        monkeypatch.setattr(ml_settings, "USE_CUDA_KERNELS", True)
    with minilora.reference():
        assert not ck.applies(x)


def test_every_signature_parses():
    for name in KERNEL_NAMES:
        sig = c_signature(name)
        assert sig[-1] == ("const int", "C") and all(t in _C_TYPES for t, _ in sig), sig


@pytest.mark.fast_path
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 / 0: a mean over no row
@pytest.mark.parametrize("shape", [(2, 3, 37), (1, 1), (4, 300), (3, 1)])
def test_functional_cuda_branch_on_a_fake_device(fake_gpu, monkeypatch, shape):
    """The CUDA branch of each fused op (reshapes, launches, the graph, the CE scale, dw) gives the
    CPU path's outputs and gradients, and launches every kernel."""
    x, g, w, t = inputs(int(np.prod(shape[:-1])), shape[-1], 3.0, 5)
    args = (x.reshape(shape), g.reshape(shape), w, t.reshape(shape[:-1]))
    on_fake = _fused_ops_on(*args, lambda a: a)
    assert sorted(set(fake_gpu)) == KERNEL_NAMES
    monkeypatch.undo()                          # the real dispatch: NumPy's own code
    on_cpu = _fused_ops_on(*args, lambda a: a)
    for op in OPS:
        for a, b in zip(on_fake[op], on_cpu[op]):
            # both within ~C U of the exact value relative to the array's largest (as on the GPU)
            tol = 8 * (shape[-1] + 16) * U * max(1.0, float(np.abs(b).max()))
            np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=op)


@pytest.mark.fast_path
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 / 0: a mean over no row
def test_cross_entropy_branch_semantics_on_a_fake_device(fake_gpu, monkeypatch):
    """Ignored rows, "sum", and the NaN of a mean over no valid row, as the CPU path gives them."""
    z = np.random.default_rng(4).standard_normal((2, 5, 33)).astype(_F32)
    for t in (np.array([[1, IGNORE, 3, 32, 0], [IGNORE, 5, 6, 7, 8]], dtype=np.int32),
              np.full((2, 5), IGNORE)):
        for reduction in ("mean", "sum"):
            results = []
            for fake in (True, False):
                with monkeypatch.context() as m:
                    if not fake:
                        m.setattr(ck, "applies", lambda *arrays: False)
                    zt = Tensor(z.copy(), requires_grad=True)
                    loss = F.cross_entropy(zt, t, ignore_index=IGNORE, reduction=reduction)
                    loss.backward()
                    results.append((np.asarray(loss.data), zt.grad))
            (l_fake, g_fake), (l_cpu, g_cpu) = results
            np.testing.assert_allclose(l_fake, l_cpu, rtol=64 * 33 * U, equal_nan=True)
            np.testing.assert_allclose(g_fake, g_cpu, rtol=0, atol=64 * 33 * U, equal_nan=True)
    assert "minilora_cross_entropy_backward" in fake_gpu


# ================================================================ on a GPU
GPU_IMPL = {name: _on_gpu(name) for name in MODEL}


@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
@GPU_SETTINGS
@given(n=st.integers(1, 6), c=WIDTHS, scale=SCALES, seed=st.integers(0, 2**16))
def test_cuda_kernel_within_bounds(cuda_device, op, n, c, scale, seed):
    run_case(GPU_IMPL, op, n, c, scale, seed)


@pytest.mark.cuda
@pytest.mark.parametrize("n,c", [(1, 1), (3, 32), (2, 257), (4096, 7), (2, 70_000)])
def test_cuda_kernels_at_the_edges(cuda_device, n, c):
    """Many short rows (a large grid) and rows far longer than the block, deterministically."""
    for op in OPS:
        run_case(GPU_IMPL, op, n, c, 1.0, n + c)


@pytest.mark.cuda
def test_cuda_softmax_masked_entries_and_rows(cuda_device):
    """-inf logits (attention masks) get probability 0; a fully masked row is NaN, as in NumPy."""
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(_F32)
    x[0, ::3] = -np.inf
    x[2, :] = -np.inf
    s = backend.to_numpy(ck.softmax_forward_cuda(backend.to_device(x, "cuda")))
    assert (s[0, ::3] == 0).all() and np.isnan(s[2]).all()
    finite = np.isfinite(x[:2])
    ref = np.exp(x[:2] - x[:2].max(axis=1, keepdims=True))
    ref /= ref.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(s[:2][finite], ref[finite], rtol=1e-5, atol=TINY)
    y = backend.to_numpy(ck.log_softmax_forward_cuda(backend.to_device(x, "cuda")))
    assert (y[0, ::3] == -np.inf).all() and np.isnan(y[2]).all()


@pytest.mark.cuda
def test_functional_dispatches_to_the_kernels(cuda_device, monkeypatch):
    """float32 CuPy tensors go through cuda_kernels (each function called), with results equal to
    the CPU path within float32 rounding; inputs of 3 dims and non-contiguous ones included."""
    calls = []
    for name in MODEL:
        fn = getattr(ck, name)
        monkeypatch.setattr(ck, name, lambda *a, _fn=fn, _n=name: (calls.append(_n), _fn(*a))[1])
    x, g, w, t = inputs(6, 300, 3.0, 2)

    def to_gpu(a):
        return backend.to_device(a, "cuda")

    def strided(a):                         # a non-contiguous view with a's values: every 2nd column
        return to_gpu(np.repeat(a, 2, axis=-1))[..., ::2] if a.ndim == 3 else to_gpu(a)

    shape = (2, 3, 300)
    on_cpu = _fused_ops_on(x.reshape(shape), g.reshape(shape), w, t.reshape(2, 3), lambda a: a)
    for move in (to_gpu, strided):
        calls.clear()
        on_gpu = _fused_ops_on(x.reshape(shape), g.reshape(shape), w, t.reshape(2, 3), move)
        assert set(calls) == set(MODEL), sorted(set(MODEL) - set(calls))
        for op in OPS:
            for a, b in zip(on_gpu[op], on_cpu[op]):
                # both sides are within ~C U (a length-C sum) of the exact value, relative to the
                # array's largest value; 8x headroom for the two sides and forward + backward
                tol = 8 * (300 + 16) * U * max(1.0, float(np.abs(b).max()))
                np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=op)


@pytest.mark.cuda
def test_functional_falls_back_where_no_kernel_applies(cuda_device, monkeypatch):
    """float64 (gradient checks), softmax over another axis, and USE_CUDA_KERNELS=False run the
    generic CuPy code: the kernels are never called, and the results are still right."""
    _forbid_kernels(monkeypatch)
    x = np.random.default_rng(3).standard_normal((4, 5))
    F.softmax(Tensor(backend.to_device(x, "cuda")))             # float64
    s0 = F.softmax(Tensor(backend.to_device(x.astype(_F32), "cuda")), axis=0)
    np.testing.assert_allclose(backend.to_numpy(s0.data), ref_softmax(x.T.astype(_F32))[0].T,
                               rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(ml_settings, "USE_CUDA_KERNELS", False)
    F.rms_norm(Tensor(backend.to_device(x.astype(_F32), "cuda")), None)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 / 0: a mean over no row
@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_cross_entropy_semantics(cuda_device, reduction):
    """Ignored rows count for nothing, int32 targets work, and a mean over no valid row is NaN with
    a zero gradient (as PyTorch), exactly as on the CPU."""
    z = np.random.default_rng(4).standard_normal((2, 5, 33)).astype(_F32)
    for t in (np.array([[1, IGNORE, 3, 32, 0], [IGNORE, 5, 6, 7, 8]], dtype=np.int32),
              np.full((2, 5), IGNORE)):
        results = []
        for move in (lambda a: a, lambda a: backend.to_device(a, "cuda")):
            zt = Tensor(move(z), requires_grad=True)
            loss = F.cross_entropy(zt, move(t), ignore_index=IGNORE, reduction=reduction)
            loss.backward()
            results.append((backend.to_numpy(loss.data), backend.to_numpy(zt.grad)))
        (l_gpu, g_gpu), (l_cpu, g_cpu) = results
        np.testing.assert_allclose(l_gpu, l_cpu, rtol=64 * 33 * U, equal_nan=True)
        np.testing.assert_allclose(g_gpu, g_cpu, rtol=0, atol=64 * 33 * U, equal_nan=True)
        assert not np.isnan(g_gpu).any() and not np.isnan(g_cpu).any()
    with pytest.raises(ValueError, match="outside"):
        F.cross_entropy(Tensor(backend.to_device(z, "cuda")),
                        backend.to_device(np.full((2, 5), 33), "cuda"))
