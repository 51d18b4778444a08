"""CPU threads for the fast twins: split the rows of an op across cores.

NumPy runs each elementwise call on one core, while PyTorch spreads it over all of them. The fused
ops of ``fast/functional.py`` (SwiGLU, RMSNorm, RoPE, the Linear GEMMs), ``fast/attention.py`` and
a few others (NF4, the LoRA op, AdamW) therefore cut their work into row chunks and run the chunks
in a small pool of Python threads: NumPy releases the GIL inside every ufunc and matmul, so the
chunks really run in parallel. Each chunk is independent (rows of a norm, batch elements of
attention), so the row ops give results bit-identical to the single-threaded ones
(``tests/test_functional_fused.py``, ``test_threaded_kernels_are_bit_identical``).

A batched matmul of many small matrices (attention's q k^T per head) is a loop of small BLAS calls
whose own threading is mostly synchronisation cost, and which collapses when another process holds
a core; inside a parallel region BLAS is held to one thread (``threadpoolctl``, when installed).

On CuPy, with ``MINILORA_NUM_THREADS=1`` and inside ``minilora.reference()``, everything runs as one
chunk in the calling thread; so does a thread inside ``single_threaded()``: ``data_parallel`` runs
whole micro-batches in these threads, each keeping its own ops in one chunk. The thresholds and the
default thread count are ``settings.MIN_PARALLEL_ELEMENTS``, ``MIN_PARALLEL_MACS`` and
``DEFAULT_MAX_THREADS`` (their reasons are written there), read at each call.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import numpy as np

from .. import settings

_pool = None
_blas_controller = None
_CPU_COUNT = os.cpu_count() or 1
_local = threading.local()       # .single: this thread keeps its ops in one chunk


def num_threads() -> int:
    """Threads for the CPU kernels: $MINILORA_NUM_THREADS, else min(settings.DEFAULT_MAX_THREADS,
    CPU count); 1 inside ``single_threaded()`` and inside ``minilora.reference()``."""
    if settings.reference_mode() or getattr(_local, "single", False):
        return 1
    env = os.environ.get("MINILORA_NUM_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"MINILORA_NUM_THREADS={env!r} is not an integer; set it to e.g. 2") from None
    return max(1, min(settings.DEFAULT_MAX_THREADS, _CPU_COUNT))


def _blas_libs() -> list:
    """threadpoolctl's controllers of the loaded BLAS libraries ([] without threadpoolctl)."""
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas_controller = ThreadpoolController().select(user_api="blas").lib_controllers
        except Exception:  # not installed (or no BLAS found): BLAS keeps its own threads
            _blas_controller = []
    return _blas_controller


def can_hold_blas() -> bool:
    """True when BLAS can be held to one thread, so that our threads may call it concurrently."""
    return bool(_blas_libs())


@contextmanager
def single_threaded():
    """Inside the block, this thread runs every op as one chunk (``num_threads()`` is 1 here only).

    For work that is already spread over the pool's threads at a coarser grain (``data_parallel``'s
    micro-batches): splitting each op again would only add hand-offs. Hold BLAS to one thread too
    (``run_chunks(..., blas_one_thread=True)`` does)."""
    old = getattr(_local, "single", False)
    _local.single = True
    try:
        yield
    finally:
        _local.single = old


_blas_holds = 0                  # blas_single_thread() blocks open now, in any thread
_blas_holds_lock = threading.Lock()


@contextmanager
def blas_single_thread():
    """Hold the BLAS library to one thread inside the block (via threadpoolctl, when installed).

    BLAS's thread count belongs to the whole process, so a block opened while another is open (in
    any thread: ``lora_linear``'s small products run in ``data_parallel``'s threads, inside the
    hold of ``run_chunks``) only counts itself instead of calling into the library twice; the
    block that set the count restores it when it closes. (OpenBLAS ignores a raise of its thread
    count made from a thread other than the main one, which is one more reason for the block that
    set the count, normally the main thread's, to be the one that restores it.)"""
    global _blas_holds
    with _blas_holds_lock:
        first = _blas_holds == 0
        _blas_holds += 1
    restore = []
    try:
        if first:
            restore = [(lib, n) for lib in _blas_libs() if (n := lib.num_threads) != 1]
            for lib, _ in restore:
                lib.set_num_threads(1)
        yield
    finally:
        for lib, n in restore:
            lib.set_num_threads(n)
        with _blas_holds_lock:
            _blas_holds -= 1


class _Workers:
    """n - 1 daemon threads fed through queues; the calling thread runs the first chunk itself.

    Leaner than a ThreadPoolExecutor (one queue put and get per extra chunk, no futures), which
    matters at ~100 dispatches per training step. A call made while another is in flight (from a
    worker, or from a second user thread) simply runs its chunks in the calling thread.
    """

    def __init__(self, n: int):
        import queue
        import threading
        self.size = n
        self._lock = threading.Lock()
        self._done = queue.SimpleQueue()
        self._inboxes = [queue.SimpleQueue() for _ in range(n - 1)]
        for i, box in enumerate(self._inboxes):
            threading.Thread(target=self._loop, args=(box,), daemon=True,
                             name=f"minilora-worker-{i}").start()

    def _loop(self, box) -> None:
        while True:
            fn, arg, slot, results = box.get()
            try:
                results[slot] = (True, fn(arg))
            except BaseException as e:  # handed back to the caller, re-raised there
                results[slot] = (False, e)
            self._done.put(slot)

    def map(self, fn, chunks: list) -> list:
        if not self._lock.acquire(blocking=False):
            return [fn(c) for c in chunks]
        try:
            results = [None] * len(chunks)
            for i in range(1, len(chunks)):
                self._inboxes[(i - 1) % len(self._inboxes)].put((fn, chunks[i], i, results))
            try:
                results[0] = (True, fn(chunks[0]))
            except BaseException as e:
                results[0] = (False, e)
            for _ in range(len(chunks) - 1):
                self._done.get()
        finally:
            self._lock.release()
        for ok, value in results:
            if not ok:
                raise value
        return [value for _, value in results]


def run_chunks(fn, chunks: list, blas_one_thread: bool = False) -> list:
    """[fn(c) for c in chunks], the chunks in parallel threads when there is more than one."""
    global _pool
    if len(chunks) == 1:
        return [fn(chunks[0])]
    n = num_threads()
    if _pool is None or _pool.size != n:
        _pool = _Workers(n)   # (a pool replaced after a thread-count change leaves idle daemons)
    if blas_one_thread:
        with blas_single_thread():
            return _pool.map(fn, chunks)
    return _pool.map(fn, chunks)


def split_rows(n_rows: int, work: int, xpmod, min_work: int | None = None) -> list:
    """Slices of ``range(n_rows)``, one per thread, for ``work`` units (numbers touched, or
    multiply-adds); a single ``slice(None)`` on the GPU, with one thread, or when the work is below
    ``min_work`` (default ``settings.MIN_PARALLEL_ELEMENTS``), too small to be worth a thread
    hand-off."""
    n = num_threads()
    min_work = settings.MIN_PARALLEL_ELEMENTS if min_work is None else min_work
    if xpmod is not np or n < 2 or n_rows < 2 or work < min_work:
        return [slice(None)]
    n = min(n, n_rows)
    bounds = [(i * n_rows + n // 2) // n for i in range(n + 1)]   # n near-equal parts (plain ints:
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]  # ~400 calls a step)


def matmul(a, b, out=None):
    """a @ b for 2-D arrays, the rows of a (and of the result) split across threads, each a
    single-threaded BLAS call. BLAS's own threads busy-wait for each other and collapse when another
    process holds a core; ours block instead, so a busy machine slows us down gracefully. Falls back
    to one plain call on the GPU, for small products, or without threadpoolctl."""
    M, K = a.shape
    N = b.shape[1]
    xpmod = np if isinstance(a, np.ndarray) else None
    chunks = split_rows(M, M * K * N, xpmod, settings.MIN_PARALLEL_MACS)
    if len(chunks) == 1 or not can_hold_blas():
        return a @ b if out is None else matmul_into(a, b, out)
    if out is None:
        out = np.empty((M, N), dtype=np.result_type(a.dtype, b.dtype))
    run_chunks(lambda rows: np.matmul(a[rows], b, out=out[rows]), chunks, blas_one_thread=True)
    return out


def matmul_into(a, b, out):
    """out[...] = a @ b without a temporary on NumPy (``out`` may be a strided view); CuPy gets
    the plain assignment, which works for any ``out``."""
    if isinstance(a, np.ndarray):
        return np.matmul(a, b, out=out)
    out[...] = a @ b
    return out


def for_rows(fn, n_rows: int, n_elements: int, xpmod) -> None:
    """Call ``fn(rows)`` for row slices covering ``range(n_rows)``, in parallel when worthwhile.
    ``fn`` writes its results into preallocated outputs (views ``out[rows]``)."""
    run_chunks(fn, split_rows(n_rows, n_elements, xpmod))
