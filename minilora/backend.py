"""The one door to the array library: NumPy on the CPU, CuPy on CUDA.

Every other module asks this one for its array module (``xp()`` or ``get_xp(*arrays)``) and never
imports CuPy itself, so the same from-scratch code runs on both. The API mirrors PyTorch's device
handling: a current device (``set_device`` / ``get_device``, default from ``MINILORA_DEVICE``),
``to_device`` / ``to_numpy`` to move arrays, and ``manual_seed`` to seed every generator at once.

Also here: the default float dtype (float32; float64 for gradient checks) and the few operations
whose spelling differs between NumPy and CuPy (scatter-add for embedding gradients), and
``keep_freed_host_memory()``, the CPU's counterpart of CuPy's memory pool, which a program opts into.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
from contextlib import contextmanager

import numpy as np

from . import settings

_VALID_DEVICES = ("cpu", "cuda")
_cupy = None          # the cupy module once imported successfully
_cupy_error = None    # why it could not be imported / used, for the error message


def _load_cupy():
    """Import CuPy lazily and check that a GPU is visible; remember the failure reason."""
    global _cupy, _cupy_error
    if _cupy is not None or _cupy_error is not None:
        return _cupy
    try:
        import cupy  # the only CuPy import in minilora
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        _cupy_error = (f"CuPy is not installed or failed to import ({type(e).__name__}: {e}); "
                       "install it with `pip install minilora[cuda]` or use device 'cpu'")
        return None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        n, why = 0, f"{type(e).__name__}: {e}"
    else:
        why = "no device found"
    if n == 0:
        _cupy_error = (f"CuPy is installed but no CUDA GPU is available ({why}); "
                       "use device 'cpu' or run on a machine with an NVIDIA GPU")
        return None
    _cupy = cupy
    return _cupy


def cuda_available() -> bool:
    """True when CuPy imports and at least one CUDA GPU is visible."""
    return _load_cupy() is not None


def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used here (None when it can): for error messages and pytest skips."""
    _load_cupy()
    return _cupy_error


def _check_device(device: str) -> str:
    if device not in _VALID_DEVICES:
        raise ValueError(f"unknown device {device!r}; use one of {_VALID_DEVICES}")
    if device == "cuda" and _load_cupy() is None:
        raise RuntimeError(f"device 'cuda' requested but {_cupy_error}")
    return device


_device = os.environ.get("MINILORA_DEVICE", "cpu").strip().lower() or "cpu"
if _device not in _VALID_DEVICES:
    raise ValueError(f"MINILORA_DEVICE={_device!r} is not a device; set it to 'cpu' or 'cuda'")


def set_device(device: str) -> None:
    """Make ``device`` ("cpu" or "cuda") the default for new tensors and modules."""
    global _device
    _device = _check_device(device)


def get_device() -> str:
    """The current default device, "cpu" or "cuda" (checked on first use)."""
    return _check_device(_device)


@contextmanager
def device(name: str):
    """Temporarily switch the default device: ``with backend.device("cuda"): ...``."""
    old = get_device()
    set_device(name)
    try:
        yield
    finally:
        set_device(old)


def xp():
    """The array module of the current device: ``numpy`` or ``cupy``."""
    return _cupy if get_device() == "cuda" else np


def get_xp(*arrays):
    """The array module the given arrays live in (numpy if none is a CuPy array)."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def device_of(a) -> str:
    """"cuda" for a CuPy array, else "cpu"."""
    return "cuda" if get_xp(a) is not np else "cpu"


def to_numpy(a) -> np.ndarray:
    """A NumPy copy (or view, on the CPU) of any array, scalar or CuPy array."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def to_device(a, device: str | None = None):
    """``a`` as an array on ``device`` (default: the current device); no copy when already there."""
    device = _check_device(device or get_device())
    if device == "cuda":
        return _cupy.asarray(a)
    return to_numpy(a)


# ---------------------------------------------------------------- dtypes
DEFAULT_FLOAT = np.float32  # what parameters and activations use; float64 only for gradient checks


def default_float():
    return DEFAULT_FLOAT


def set_default_float(dtype) -> None:
    """Use float64 everywhere (gradient checks) or back to float32."""
    global DEFAULT_FLOAT
    dtype = np.dtype(dtype).type
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"default float must be float32 or float64, got {np.dtype(dtype).name}")
    DEFAULT_FLOAT = dtype


@contextmanager
def default_float_dtype(dtype):
    """Temporarily change the default float dtype: ``with default_float_dtype(np.float64): ...``."""
    old = DEFAULT_FLOAT
    set_default_float(dtype)
    try:
        yield
    finally:
        set_default_float(old)


# ---------------------------------------------------------------- random numbers
_rng: np.random.Generator = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed every generator minilora uses (NumPy's, and CuPy's when it is loaded)."""
    global _rng
    _rng = np.random.default_rng(seed)
    np.random.seed(seed % 2**32)
    if _cupy is not None:
        _cupy.random.seed(seed)


_thread_rng = threading.local()   # .generator: set by use_rng() for the current thread only


def rng() -> np.random.Generator:
    """minilora's NumPy generator. Random initialisation draws here on the host, then moves to the
    device, so the same seed gives the same weights on CPU and GPU. Inside ``use_rng(g)``, ``g``."""
    local = getattr(_thread_rng, "generator", None)
    return _rng if local is None else local


@contextmanager
def use_rng(generator: np.random.Generator):
    """Draw from ``generator`` in this thread inside the block (other threads are not affected).

    ``data_parallel`` gives each micro-batch its own generator, spawned from ``rng()``, so that the
    dropout masks do not depend on which thread happens to draw first."""
    old = getattr(_thread_rng, "generator", None)
    _thread_rng.generator = generator
    try:
        yield generator
    finally:
        _thread_rng.generator = old


def random_uniform(shape, xpmod, dtype):
    """Uniform [0, 1) numbers drawn on the array's own device (used by dropout masks)."""
    if xpmod is np:
        return rng().random(shape, dtype=np.float32 if dtype == np.float32 else np.float64)
    return xpmod.random.random(shape, dtype=dtype)


# ---------------------------------------------------------------- shims
def scatter_add(target, indices, values) -> None:
    """target[indices] += values, accumulating repeated indices (np.add.at / cupyx.scatter_add).

    Used for the gradient of an embedding lookup, where the same token appears many times.
    For a 2-D target and 1-D integer indices this uses a sorted segment sum, which is far faster
    than ``np.add.at`` on NumPy.
    """
    xpmod = get_xp(target)
    if xpmod is np:
        if target.ndim == 2 and values.ndim == 2 and np.asarray(indices).ndim == 1:
            idx = np.asarray(indices)
            order = np.argsort(idx, kind="stable")
            sorted_idx = idx[order]
            uniq, starts = np.unique(sorted_idx, return_index=True)
            sums = np.add.reduceat(values[order], starts, axis=0)  # (n_unique, dim)
            target[uniq] += sums
        else:
            np.add.at(target, indices, values)
    else:
        import cupyx  # noqa: F401  (part of CuPy; imported here, inside the backend, only)
        cupyx.scatter_add(target, indices, values)


def synchronize() -> None:
    """Wait for queued GPU work (for timings); a no-op on the CPU."""
    if _cupy is not None and get_device() == "cuda":
        _cupy.cuda.Device().synchronize()


def memory_pool():
    """CuPy's default memory pool (for peak-memory figures), or None on the CPU."""
    return _cupy.get_default_memory_pool() if _cupy is not None else None


# ---------------------------------------------------------------- host memory: keep freed buffers
# CuPy keeps freed GPU blocks in a pool for the next allocation of the same size; NumPy hands every
# buffer back to C's malloc, and glibc's malloc returns large ones (above its mmap threshold, 128 KiB
# to 32 MiB depending on history) to the kernel at once. A training step allocates the same few
# hundred activation and gradient buffers every time, so each step then page-faults its whole working
# set in again: measured on a 2-core VM, a quarter to a third of a tiny model's step went to page
# faults.
# Raising the thresholds makes malloc keep and reuse freed memory, the CPU's version of CuPy's pool.
# One arena for all threads: a thread that allocates while another holds the main arena's lock gets
# an arena of its own, whose heaps glibc shrinks and unmaps whatever the trim threshold says; in a
# worker thread (data_parallel's micro-batches run in one) a round of 1-12 MiB buffers then cost
# 10,800 page faults against 0 with one arena. The shared lock costs far less: NumPy makes a few
# allocations per op, and a split training step ran 2-7% faster with one arena (5 of 6 A/B pairs).
# It changes malloc for the whole process (PyTorch in the same process included), so it is never
# done on import: the CLI, ``train.train`` and the benchmarks call it; library users opt in.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8   # mallopt() parameters (malloc.h)
_host_memory_kept: tuple | None = None   # the (mmap, trim) thresholds applied, once applied


def host_memory_kept() -> bool:
    """True once ``keep_freed_host_memory()`` has changed malloc's settings in this process."""
    return _host_memory_kept is not None


def keep_freed_host_memory(mmap_threshold: int | None = None,
                           trim_threshold: int | None = None) -> bool:
    """Make glibc's malloc keep freed buffers for reuse, in every thread (one arena for all).

    The thresholds default to ``settings.HOST_MMAP_THRESHOLD`` and ``HOST_TRIM_THRESHOLD``. Returns
    True when malloc keeps freed memory now; False with ``MINILORA_KEEP_FREED_MEMORY=0`` in the
    environment (the off switch, for every caller), and elsewhere than glibc on Linux (other C
    libraries keep their own defaults). A second call with the same thresholds calls nothing. The
    price is a process that holds on to up to ``trim_threshold`` bytes of freed memory instead of
    returning it to the system."""
    global _host_memory_kept
    if os.environ.get("MINILORA_KEEP_FREED_MEMORY", "1").strip() == "0":
        return False
    wanted = (int(settings.HOST_MMAP_THRESHOLD if mmap_threshold is None else mmap_threshold),
              int(settings.HOST_TRIM_THRESHOLD if trim_threshold is None else trim_threshold))
    if _host_memory_kept == wanted:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, wanted[0])) and bool(mallopt(_M_TRIM_THRESHOLD, wanted[1])) \
        and bool(mallopt(_M_ARENA_MAX, 1))
    if ok:
        _host_memory_kept = wanted
    return ok


# ---------------------------------------------------------------- custom CUDA kernels
# Modules that fuse work into a kernel of their own (quant/, functional) describe the kernel here and
# get back a compiled CuPy kernel object, so that CuPy stays behind this one door. Kernels are cached
# by CuPy after their first compilation.
def _need_cupy(what: str):
    if _load_cupy() is None:
        raise RuntimeError(f"{what} needs CUDA but {_cupy_error}")
    return _cupy


def elementwise_kernel(in_params: str, out_params: str, operation: str, name: str, **kwargs):
    """A ``cupy.ElementwiseKernel`` (one thread per output element)."""
    return _need_cupy(f"kernel {name!r}").ElementwiseKernel(in_params, out_params, operation, name,
                                                             **kwargs)


def reduction_kernel(in_params: str, out_params: str, map_expr: str, reduce_expr: str,
                     post_map_expr: str, identity: str, name: str, **kwargs):
    """A ``cupy.ReductionKernel`` (map, then reduce along axes, then post-map)."""
    return _need_cupy(f"kernel {name!r}").ReductionKernel(in_params, out_params, map_expr,
                                                           reduce_expr, post_map_expr, identity,
                                                           name, **kwargs)


def raw_kernel(code: str, name: str, **kwargs):
    """A ``cupy.RawKernel`` compiled from CUDA C source (launch with grid, block, args)."""
    return _need_cupy(f"kernel {name!r}").RawKernel(code, name, **kwargs)


def pinned_empty(shape, dtype=np.float32) -> np.ndarray:
    """A NumPy array in page-locked (pinned) host memory, for fast host<->GPU streaming
    (the paged optimizer keeps its moments here). Plain host memory on the CPU."""
    if _load_cupy() is None:
        return np.empty(shape, dtype)
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    mem = _cupy.cuda.alloc_pinned_memory(max(n, 1))
    return np.frombuffer(mem, dtype, int(np.prod(shape))).reshape(shape)
