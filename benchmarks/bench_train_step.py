"""One full training step of a Llama: minilora (NumPy) vs transformers (PyTorch), on the CPU.

A step is forward + loss + backward + AdamW update + zero_grad, on random byte ids (labels = ids);
minilora's is the one ``minilora.train`` runs (``data_parallel.forward_backward``). Both libraries get
the same ``--threads`` threads (torch.set_num_threads; NumPy's BLAS via threadpoolctl; minilora's
kernels). Each library runs in a process of its own (importing minilora sets up the process's
memory allocator for NumPy, which would also change PyTorch's), the two processes alternating
``--rounds`` times so that drift in the machine's load hits both alike; ``--same-process``
interleaves them step by step in one process instead (``common.interleaved_medians``).
Reported: the median step time of each, the ratio minilora / torch (the requirement is <= 1.0), and
the model FLOPs per step against a measured float32 matmul peak.

FLOPs per step: 6 x (matmul parameters) x tokens for the Linear layers (2 forward + 4 backward per
weight per token) plus, per layer, 4 B T^2 C forward for the two attention products (q k^T and P v),
tripled for forward + backward. The causal half of the scores is computed anyway (as torch does).

Configurations (vocab 256, batch 16): tiny = hidden 128, 4 layers, 4 heads, intermediate 344,
seq 128; small = hidden 384, 6 layers, 6 heads, intermediate 1024, seq 256.

Run:  python benchmarks/bench_train_step.py [--configs tiny,small] [--steps 5] [--warmup 2]
                                           [--rounds 2] [--threads 2] [--same-process]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (CpuSteal, interleaved_medians, limit_threads, machine_summary,  # noqa: E402
                    matmul_peak_gflops, run_child)

CONFIGS = {
    "tiny": dict(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=344, seq=128, batch=16),
    "small": dict(vocab_size=256, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                  intermediate_size=1024, seq=256, batch=16),
}


def model_kwargs(cfg: dict) -> dict:
    kw = {k: v for k, v in cfg.items() if k not in ("seq", "batch")}
    kw.update(num_key_value_heads=cfg["num_attention_heads"], max_position_embeddings=cfg["seq"],
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return kw


def step_flops(cfg: dict) -> float:
    B, T, C, L = cfg["batch"], cfg["seq"], cfg["hidden_size"], cfg["num_hidden_layers"]
    I, V = cfg["intermediate_size"], cfg["vocab_size"]
    linear_params = L * (4 * C * C + 3 * C * I) + C * V
    attention_fwd = L * 4 * B * T * T * C
    return 6.0 * linear_params * B * T + 3.0 * attention_fwd


def minilora_step(cfg: dict):
    import numpy as np

    from minilora import backend
    from minilora.data_parallel import forward_backward
    from minilora.models import LlamaConfig, LlamaForCausalLM
    from minilora.optim import AdamW

    backend.keep_freed_host_memory()   # as the CLI and train() do (not on import): malloc keeps a step's freed buffers
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**model_kwargs(cfg)))
    opt = AdamW(model.parameters(), lr=1e-4)
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]))

    def step():   # as minilora.train runs it: the batch split over the threads (data_parallel)
        forward_backward(model, ids, ids)
        opt.step()
        opt.zero_grad()
    return step


def torch_step(cfg: dict):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_kwargs(cfg)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]),
                        generator=torch.Generator().manual_seed(0))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


STEP_BUILDERS = {"minilora": minilora_step, "torch": torch_step}


def _child(args) -> int:
    """One library, one config: print the step times (after the warm-up) as a RESULT line."""
    limit_threads(args.threads, torch=args.child == "torch")   # a minilora process never loads torch
    step = STEP_BUILDERS[args.child](CONFIGS[args.config])
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps(times))
    return 0


def separate_medians(config: str, libs: list, args) -> dict:
    """{library: median step seconds}, each library in its own processes, alternating rounds."""
    times = {lib: [] for lib in libs}
    for _ in range(args.rounds):
        for lib in libs:
            try:
                times[lib] += run_child(__file__, ["--child", lib, "--config", config,
                                                   "--steps", args.steps, "--warmup", args.warmup,
                                                   "--threads", args.threads])
            except RuntimeError as e:
                raise RuntimeError(f"the {lib} process for {config} failed: {e}") from None
    return {lib: statistics.median(ts) for lib, ts in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate the minilora and torch processes this many times")
    ap.add_argument("--threads", type=int, default=2,
                    help="threads for both: torch, NumPy's BLAS and minilora's kernels")
    ap.add_argument("--same-process", action="store_true",
                    help="both libraries in this process, interleaved step by step")
    ap.add_argument("--child", choices=sorted(STEP_BUILDERS), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    limit_threads(args.threads)

    print(machine_summary())
    peak = matmul_peak_gflops()
    print(f"float32 matmul peak (NumPy, 1536^3): {peak:.0f} GFLOP/s")
    try:
        import torch
        import transformers
        have_torch = True
        print(f"torch {torch.__version__} ({args.threads} threads), transformers "
              f"{transformers.__version__} (attn_implementation: default sdpa)")
    except ImportError:
        have_torch = False
        print("torch/transformers not installed: minilora timings only")
    worst = 0.0
    steal = CpuSteal().__enter__()
    libs = ["minilora", "torch"] if have_torch else ["minilora"]
    print(f"median of {args.rounds} x {args.steps} steps, " + (
        "both libraries in one process, interleaved" if args.same_process
        else "each library in its own processes, alternating"))
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        if args.same_process:
            med = interleaved_medians({lib: STEP_BUILDERS[lib](cfg) for lib in libs},
                                      steps=args.rounds * args.steps, warmup=args.warmup)
        else:
            med = separate_medians(name, libs, args)
        flops = step_flops(cfg)
        line = f"{name:6s} minilora {med['minilora'] * 1e3:8.1f} ms"
        if have_torch:
            ratio = med["minilora"] / med["torch"]
            worst = max(worst, ratio)
            line += f" | torch {med['torch'] * 1e3:8.1f} ms | ratio {ratio:.2f}"
        line += (f" | {flops / 1e9:.1f} GFLOP/step, minilora {flops / med['minilora'] / 1e9:.0f} "
                 f"GFLOP/s = {flops / med['minilora'] / 1e9 / peak:.0%} of peak")
        print(line, flush=True)
    steal.__exit__()
    print(steal.line())
    if have_torch:
        print(f"worst ratio minilora/torch: {worst:.2f} ({'OK' if worst <= 1.0 else 'SLOWER'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
