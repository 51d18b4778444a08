"""Benchmark minilora's NF4 quantize / dequantize against bitsandbytes' CPU path, in the same run.

Both quantize the same float32 matrix (default 4096 x 4096, blocksize 64); the outputs are checked
to be identical first. Timings are interleaved (ours, theirs, ours, ...) so that load from other
processes hits both alike; the median of the repeats is reported as GB/s of float32 input and as
the ratio ours / bitsandbytes (above 1: minilora is faster). "dequant(out)" reuses one output
buffer (``dequantize(out=...)``), as a layer that dequantizes its weight every step would.

    python benchmarks/bench_nf4.py [--size 4096] [--blocksize 64] [--repeats 7] [--double-quant]
                                   [--threads 2]

``--threads`` gives both the same threads (``common.limit_threads``): PyTorch's, and so
bitsandbytes', and minilora's (its dequantize shares cache-sized tiles among them). Without
bitsandbytes installed, only minilora's numbers are printed.

The "write floor" line is the least any dequantize must do: fill the n float32 outputs (NumPy's
``fill`` of the same buffer, split over the same threads). Dequantizing costs that plus reading the
codes and looking them up; a compiled kernel that reaches the floor cannot be beaten from NumPy,
whose lookup (``np.take``, one call per tile) runs at a fraction of the write bandwidth.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuSteal, limit_threads  # noqa: E402
from minilora import backend  # noqa: E402
from minilora.fast import parallel  # noqa: E402
from minilora.quant import quantize_nf4  # noqa: E402


def _timed(fn):
    backend.synchronize()
    start = time.perf_counter()
    out = fn()
    backend.synchronize()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the matrix is size x size")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="threads for both libraries")
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    backend.keep_freed_host_memory()   # as the CLI and train() do (not on import): freed buffers reused

    backend.manual_seed(0)
    w = backend.rng().standard_normal((args.size, args.size), dtype=np.float32)
    gb = w.nbytes / 1e9

    try:
        import torch
        import bitsandbytes.functional as F
        torch._dynamo.config.disable = True     # eager bitsandbytes: no compile time in the timings
        wt = torch.from_numpy(w)
    except ImportError:
        F = None

    def ours_q():
        return quantize_nf4(w, args.blocksize, args.double_quant)

    def bnb_q():
        return F.quantize_4bit(wt, blocksize=args.blocksize, quant_type="nf4",
                               compress_statistics=args.double_quant)

    q = ours_q()
    buffer = np.empty(w.shape, np.float32)
    rows = parallel.split_rows(buffer.shape[0], buffer.size, np)

    def write_floor():
        parallel.run_chunks(lambda r: buffer[r].fill(1.0), rows)

    tasks = {"quantize": {"minilora": ours_q}, "dequantize": {"minilora": q.dequantize},
             "dequant(out)": {"minilora": lambda: q.dequantize(out=buffer)},
             "write floor": {"minilora": write_floor}}
    if F is not None:
        packed, state = bnb_q()
        if not np.array_equal(q.packed, packed.numpy().reshape(-1)):
            print("packed bytes differ from bitsandbytes'", file=sys.stderr)
            return 1
        tasks["quantize"]["bitsandbytes"] = bnb_q
        tasks["dequantize"]["bitsandbytes"] = lambda: F.dequantize_4bit(packed, state)

    times = {(task, who): [] for task, impls in tasks.items() for who in impls}
    steal = CpuSteal().__enter__()
    for fn in [f for impls in tasks.values() for f in impls.values()]:
        fn()                                                       # warm up (page faults, caches)
    for _ in range(args.repeats):
        for task, impls in tasks.items():
            for who, fn in impls.items():
                times[task, who].append(_timed(fn)[0])

    steal.__exit__()
    threads = f"minilora threads {parallel.num_threads()}" + (
        f", torch threads {torch.get_num_threads()}" if F is not None else "")
    print(f"NF4, {args.size}x{args.size} float32 ({gb * 1e3:.0f} MB), blocksize {args.blocksize}"
          f"{', double quant' if args.double_quant else ''}, median of {args.repeats}; {threads}")
    print(f"{'':<12} {'minilora':>18} {'bitsandbytes':>18} {'ratio':>8}")
    for task in tasks:
        ours = statistics.median(times[task, "minilora"])
        line = f"{task:<12} {ours * 1e3:8.1f} ms {gb / ours:5.2f} GB/s"
        if (task, "bitsandbytes") in times:
            theirs = statistics.median(times[task, "bitsandbytes"])
            line += f" {theirs * 1e3:8.1f} ms {gb / theirs:5.2f} GB/s {theirs / ours:7.2f}x"
        print(line)
    print(steal.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
