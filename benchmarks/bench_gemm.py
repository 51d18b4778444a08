"""The matrix products of one Linear layer, NumPy's BLAS against PyTorch's, at the benchmark configs' shapes.

Half of a training step of the tiny config is the Linear layers' GEMMs, and minilora runs them through
``numpy.matmul``, i.e. the BLAS NumPy was built with (OpenBLAS in the wheels from PyPI), while PyTorch's
CPU wheels use Intel's MKL. For each Linear of a micro-batch (N = 8 sequences x seq tokens) this
times the three products a training step runs, on one thread each:

    forward  y  = x @ W^T     (N, in) @ (in, out)
    backward dx = g @ W       (N, out) @ (out, in)
    backward dW = g^T @ x     (out, N) @ (N, in)

and prints GFLOP/s for both libraries and the time ratio (NumPy / PyTorch; above 1 = NumPy slower).
Whatever this ratio is, no NumPy program can make the same GEMMs faster: it bounds what the
training-step benchmark can show on this machine.

Run:  python benchmarks/bench_gemm.py [--configs tiny,small] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import CpuSteal, blas_info, limit_threads, median_time  # noqa: E402

CONFIGS = {   # (hidden, intermediate, tokens per micro-batch) of bench_train_step.py's configs
    "tiny": (128, 344, 8 * 128),
    "small": (384, 1024, 8 * 256),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=60)
    args = p.parse_args(argv)
    limit_threads(args.threads)
    import numpy as np
    import torch

    import minilora  # noqa: F401  (its malloc settings, as in a training step)
    print(f"NumPy: {blas_info()}; torch {torch.__version__} "
          f"({'MKL' if torch.backends.mkl.is_available() else 'no MKL'}), {args.threads} thread(s)")
    rng = np.random.default_rng(0)
    steal = CpuSteal().__enter__()
    for config in args.configs.split(","):
        hidden, inter, n = CONFIGS[config]
        print(f"\n{config}: N = {n} rows")
        for name, (d_in, d_out) in (("q/k/v/o_proj", (hidden, hidden)), ("gate/up_proj", (hidden, inter)),
                                    ("down_proj", (inter, hidden))):
            x = rng.standard_normal((n, d_in), dtype=np.float32)
            w = rng.standard_normal((d_out, d_in), dtype=np.float32)
            g = rng.standard_normal((n, d_out), dtype=np.float32)
            tx, tw, tg = (torch.from_numpy(a) for a in (x, w, g))
            flops = 2.0 * n * d_in * d_out
            for what, fn_np, fn_t in (("y = x W^T", lambda: x @ w.T, lambda: tx @ tw.t()),
                                      ("dx = g W", lambda: g @ w, lambda: tg @ tw),
                                      ("dW = g^T x", lambda: g.T @ x, lambda: tg.t() @ tx)):
                t_np = median_time(fn_np, steps=args.repeats, warmup=3)
                t_torch = median_time(fn_t, steps=args.repeats, warmup=3)
                print(f"  {name:13s} {what:11s} (N={n}, in={d_in}, out={d_out}): "
                      f"NumPy {flops / t_np / 1e9:6.1f} GFLOP/s, torch {flops / t_torch / 1e9:6.1f} "
                      f"GFLOP/s, time ratio {t_np / t_torch:.2f}")
    steal.__exit__()
    print(steal.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
