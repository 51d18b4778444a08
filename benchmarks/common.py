"""Shared helpers for the benchmarks: timing medians, interleaved comparisons, machine facts.

Timing on a shared 2-core machine is noisy: another process can take a core for seconds. Two rules
keep comparisons fair: report the *median* of several runs after a warm-up, and run the things being
compared *interleaved* (A, B, A, B, ...) in one process, so a burst of outside load hits both alike.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable


def median_time(fn: Callable[[], object], steps: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``steps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict, steps: int = 5, warmup: int = 2) -> dict:
    """{name: median seconds} for several callables run round-robin (A, B, A, B, ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def limit_threads(n: int, torch: bool = True) -> None:
    """Give every library the same ``n`` threads: NumPy's BLAS (threadpoolctl), minilora's kernels
    (MINILORA_NUM_THREADS) and PyTorch (set_num_threads; ``torch=False`` leaves it unimported, for a
    process that runs minilora alone), so that comparisons are like for like."""
    import numpy as np  # noqa: F401  (load the BLAS before limiting it)
    os.environ["MINILORA_NUM_THREADS"] = str(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n, user_api="blas")
    except ImportError:
        pass
    if not torch:
        return
    try:
        import torch as torch_module
        torch_module.set_num_threads(n)
    except ImportError:
        pass


def blas_info() -> str:
    """Which BLAS NumPy uses, its kernel (CPU architecture) and threads, as threadpoolctl reports."""
    import numpy as np  # noqa: F401  (loads the BLAS so threadpoolctl can see it)
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed (BLAS unknown)"
    parts = []
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            parts.append(f"{info.get('internal_api')} {info.get('version')} kernel="
                         f"{info.get('architecture')} threads={info.get('num_threads')}")
    return "; ".join(parts) or "no BLAS found"


def openblas_env() -> str:
    """The OpenBLAS variables that change which kernel runs (set on some machines for safety)."""
    keys = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
    return ", ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ) or "none set"


def matmul_peak_gflops(n: int = 1536, repeats: int = 5) -> float:
    """Best GFLOP/s of a large float32 matrix product in NumPy: the machine's practical peak."""
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine_summary() -> str:
    return (f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"BLAS: {blas_info()}; OpenBLAS env: {openblas_env()}")


class CpuSteal:
    """The share of CPU time the hypervisor gave to other machines while the block ran ("steal" in
    /proc/stat; Linux only, else None). On a shared VM this is the noise: a few percent is normal, at
    20% and above timings swing by tens of percent, and only ratios measured interleaved mean much.

        with CpuSteal() as steal: ...
        print(steal.line())
    """

    def __enter__(self):
        self.start, self.share = self._read(), None
        return self

    def __exit__(self, *exc):
        end = self._read()
        if self.start is not None and end is not None:
            total = sum(end) - sum(self.start)
            self.share = (end[7] - self.start[7]) / total if total > 0 else 0.0
        return False

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
            return [int(x) for x in fields[:8]]   # user nice system idle iowait irq softirq steal
        except (OSError, ValueError, IndexError):
            return None

    def line(self) -> str:
        if self.share is None:
            return "CPU steal during the run: unknown (no /proc/stat)"
        return f"CPU steal during the run: {self.share:.1%} (time the VM's cores ran other guests)"


def run_child(script: str, args: list, env: dict | None = None):
    """Run ``python script args...`` (a benchmark's ``--child`` mode) with this repository first on
    PYTHONPATH and return what its ``RESULT <json>`` line carries; RuntimeError with the child's last
    line of stderr when there is none. Benchmarks run each library in a process of its own, so that
    neither one's set-up (minilora's malloc tuning, PyTorch's threads) changes the other's timings."""
    env = dict(os.environ if env is None else env)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(script), *map(str, args)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1])


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process to its current RSS, so that a
    later ``status_bytes("VmHWM")`` is the peak since now; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_bytes(key: str):
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
