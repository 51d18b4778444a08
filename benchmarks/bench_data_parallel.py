"""What two threads cost: one micro-batch alone, two in threads (data_parallel), two in processes.

``data_parallel.forward_backward`` runs one micro-batch per CPU thread (see its docstring). Ideally
two micro-batches on two cores take as long as one alone. This script measures how far from that
the threads are, and how far two *processes* are (no GIL, no shared heap), so that the cost of
sharing one Python process can be told apart from the cost of sharing the machine (memory
bandwidth, caches, other guests of a VM):

* alone: forward + backward of one micro-batch (half the benchmark batch) on one thread;
* threads: two such micro-batches at once on two replicas, in ``parallel.run_chunks``'s threads,
  exactly as ``forward_backward`` runs them (each with one BLAS thread);
* processes: two processes, each timing its own micro-batch alone, started together at a barrier.

It prints each median and the per-thread CPU time of the threaded run (``time.thread_time``): a
thread whose CPU time grows ran slower (caches, memory, the GIL's hand-offs moving hot Python
objects between cores), one whose wall time grows beyond its CPU time waited (for the GIL, or for
the slower thread at the end). Model: the tiny or small config of ``bench_lora_step.py``.

Run:  python benchmarks/bench_data_parallel.py [--config tiny] [--lora] [--steps 12]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import CpuSteal, limit_threads  # noqa: E402


def _build(config: str, lora: bool):
    """(model, input ids of one micro-batch) for the config of bench_lora_step.py."""
    import numpy as np

    from bench_lora_step import CONFIGS, build_minilora_model

    cfg = CONFIGS[config]
    model = build_minilora_model(cfg, "lora" if lora else "full")
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(cfg["batch"] // 2, cfg["seq"]))
    return model, ids


def _micro_batch(model, ids) -> None:
    """Forward and backward of one micro-batch on this thread, as data_parallel runs it."""
    import numpy as np

    from minilora.fast import parallel
    from minilora.data_parallel import model_loss
    with parallel.single_threaded():
        model_loss(model, ids, ids).backward(grad=np.float32(0.5))
    for p in model.parameters():
        p.grad = None


def _process_worker(config, lora, steps, barrier, results) -> None:
    limit_threads(1, torch=False)
    model, ids = _build(config, lora)
    _micro_batch(model, ids)   # warm-up
    times = []
    for _ in range(steps):
        barrier.wait()
        t0 = time.perf_counter()
        _micro_batch(model, ids)
        times.append(time.perf_counter() - t0)
    results.put(statistics.median(times))


def time_processes(config: str, lora: bool, steps: int) -> list:
    """Median micro-batch time of each of two processes running side by side."""
    ctx = mp.get_context("spawn")     # a fresh interpreter: no threads or heap inherited
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(config, lora, steps, barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return out


def time_threads(config: str, lora: bool, steps: int) -> dict:
    """Medians of: one micro-batch alone, and two at once in data_parallel's threads (with each
    thread's wall and CPU time), alternating so that drift in the machine's load hits both."""
    from minilora.fast import parallel
    from minilora.data_parallel import replicate

    limit_threads(2, torch=False)
    model, ids = _build(config, lora)
    replicas = [replicate(model)[0] for _ in range(2)]
    per_thread = [[], []]

    def run(i):
        t0, c0 = time.perf_counter(), time.thread_time()
        _micro_batch(replicas[i], ids)
        per_thread[i].append((time.perf_counter() - t0, time.thread_time() - c0))

    alone, pair = [], []
    for step in range(steps + 1):
        with parallel.blas_single_thread():
            t0 = time.perf_counter()
            _micro_batch(model, ids)
            t_alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        parallel.run_chunks(run, [0, 1], blas_one_thread=True)
        if step:    # the first round warms up
            alone.append(t_alone)
            pair.append(time.perf_counter() - t0)
    med = statistics.median
    slow = [max(per_thread[0][i], per_thread[1][i]) for i in range(1, steps + 1)]
    fast = [min(per_thread[0][i], per_thread[1][i]) for i in range(1, steps + 1)]
    return dict(alone=med(alone), pair=med(pair),
                slow_wall=med(w for w, _ in slow), slow_cpu=med(c for _, c in slow),
                fast_wall=med(w for w, _ in fast), fast_cpu=med(c for _, c in fast))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", choices=["tiny", "small"])
    p.add_argument("--lora", action="store_true", help="the LoRA model (r=8 on q,k,v,o)")
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args(argv)
    ms = lambda s: f"{s * 1e3:7.1f} ms"  # noqa: E731
    steal = CpuSteal().__enter__()
    procs = time_processes(args.config, args.lora, args.steps)
    thr = time_threads(args.config, args.lora, args.steps)
    steal.__exit__()
    print(f"{args.config} {'LoRA' if args.lora else 'full'}, one micro-batch of half the batch; "
          f"medians of {args.steps}")
    print(f"  alone, one thread          {ms(thr['alone'])}")
    print(f"  two in threads             {ms(thr['pair'])}   = {thr['pair'] / thr['alone']:.2f}x alone"
          f"   (slower thread {ms(thr['slow_wall'])}, CPU {ms(thr['slow_cpu'])}; faster "
          f"{ms(thr['fast_wall'])}, CPU {ms(thr['fast_cpu'])})")
    print(f"  two in processes           {ms(max(procs))}   = {max(procs) / thr['alone']:.2f}x alone"
          f"   (each: {', '.join(ms(t).strip() for t in procs)})")
    print(steal.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
