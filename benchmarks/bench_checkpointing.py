"""Gradient checkpointing: activation memory and step time of a LoRA step with and without it.

Chen et al. (2016), "Training Deep Nets with Sublinear Memory Cost"; ``minilora/checkpoint.py``.
The model has SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 key-value heads,
intermediate 1536, vocab 49152, tied embeddings) with seeded random weights (the step's cost does not
depend on the values); LoRA r=8, alpha=16 on q_proj, k_proj, v_proj, o_proj; one sequence of
``--seq`` 1024 tokens (``--batch`` 1). A step is the one ``minilora.train`` runs: forward + loss +
backward (``data_parallel.forward_backward``) + AdamW update + zero_grad.

* **activation memory**, one fresh subprocess per variant, over the first step after the model is
  built: the peak of all traced allocations during the step above what was allocated before it
  (``tracemalloc``; NumPy reports its array buffers to it; the weights are in the baseline, so the
  difference is what the step itself holds at its worst: activations kept for backward, the
  transients of the op running at that moment, and the LoRA factors' gradients and AdamW state,
  under 10 MiB here), and the peak RSS during the step above the RSS before it (Linux's VmHWM, reset
  through ``/proc/self/clear_refs``; "-" where that is not available). These children run with
  ``MINILORA_KEEP_FREED_MEMORY=0``: malloc then hands big freed buffers back to the system at once,
  so the RSS follows what is alive instead of what the model's construction left in malloc's heap;
* **step time**: both variants in one process on one model, checkpointing switched on and off
  between steps (``gradient_checkpointing_enable/disable``), alternating for ``--rounds`` rounds
  after a warm-up step each, so that load from other processes on a shared machine hits both alike;
  medians of wall time and of the process's CPU time (which load from other processes inflates
  less).

Targets: activation memory cut >= 3x, step time <= 1.4x.

Run:  python benchmarks/bench_checkpointing.py [--seq 1024] [--batch 1] [--rounds 3] [--threads 2]
      [--no-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuSteal, machine_summary, reset_peak_rss, run_child, status_bytes  # noqa: E402

# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=None,
                    bos_token_id=None, eos_token_id=None)
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def build_step(seq: int, batch: int):
    """(model, step function) for the seeded LoRA model at SmolLM2-135M's shape."""
    import numpy as np

    from minilora import backend
    from minilora.data_parallel import forward_backward
    from minilora.lora import LoraConfig, get_peft_model
    from minilora.models import LlamaConfig, LlamaForCausalLM
    from minilora.optim import AdamW

    backend.keep_freed_host_memory()   # as the CLI and train() do
    backend.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M, max_position_embeddings=max(seq, 2048))
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(**LORA)).train()
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, seq))

    def step():
        forward_backward(model, ids, ids)
        opt.step()
        opt.zero_grad()
    return model, step


def _child_memory(args) -> dict:
    import gc
    import tracemalloc
    tracemalloc.start()
    model, step = build_step(args.seq, args.batch)
    if args.variant == "checkpointing":
        model.gradient_checkpointing_enable()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    rss_reset = reset_peak_rss()
    rss_before = status_bytes("VmRSS")
    step()
    peak = tracemalloc.get_traced_memory()[1]
    rss_peak = status_bytes("VmHWM") if rss_reset else None
    return dict(traced=peak - before,
                rss=None if rss_peak is None or rss_before is None else rss_peak - rss_before,
                baseline_traced=before)


def _child_time(args) -> dict:
    model, step = build_step(args.seq, args.batch)
    times = {"plain": [], "checkpointing": []}
    cpu = {"plain": [], "checkpointing": []}
    switch = {"plain": model.gradient_checkpointing_disable,
              "checkpointing": model.gradient_checkpointing_enable}
    for name in times:                          # warm-up, one step each
        switch[name]()
        step()
    for _ in range(args.rounds):
        for name in times:
            switch[name]()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return dict(wall=times, cpu=cpu)


def _spawn(mode: str, args, variant: str = "") -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINILORA_NUM_THREADS"):
        env[var] = str(args.threads)
    env["MINILORA_DEVICE"] = "cpu"
    if mode == "memory":
        env["MINILORA_KEEP_FREED_MEMORY"] = "0"
    return run_child(__file__, ["--child", mode, "--variant", variant or "-", "--seq", args.seq,
                                "--batch", args.batch, "--rounds", args.rounds,
                                "--threads", args.threads], env)


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--rounds", type=int, default=3, help="timed steps per variant, alternating")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for BLAS and minilora")
    p.add_argument("--no-memory", action="store_true", help="time the step only")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = _child_time(args) if args.child == "time" else _child_memory(args)
        print("RESULT " + json.dumps(out))
        return 0

    print(f"SmolLM2-135M shape, random weights; LoRA r={LORA['r']} on "
          f"{','.join(LORA['target_modules'])}; batch {args.batch} x seq {args.seq}; "
          f"{args.threads} threads\n{machine_summary()}", flush=True)
    with CpuSteal() as steal:
        memory = {v: None if args.no_memory else _spawn("memory", args, v)
                  for v in ("plain", "checkpointing")}
        timed = _spawn("time", args)
    times = timed["wall"]
    med = {v: statistics.median(ts) for v, ts in times.items()}
    med_cpu = {v: statistics.median(ts) for v, ts in timed["cpu"].items()}
    rows = [] if args.no_memory else [
            ("activation memory, traced peak of a step", *(_mib(memory[v]["traced"])
                                                           for v in ("plain", "checkpointing")),
             f"{memory['plain']['traced'] / memory['checkpointing']['traced']:.2f}x cut"),
            ("peak RSS of a step above its start", *(_mib(memory[v]["rss"])
                                                     for v in ("plain", "checkpointing")),
             f"{memory['plain']['rss'] / memory['checkpointing']['rss']:.2f}x cut"
             if memory["plain"]["rss"] and memory["checkpointing"]["rss"] else "-")]
    rows += [(f"step time, median of {args.rounds} (alternating)",
             f"{med['plain']:.2f} s", f"{med['checkpointing']:.2f} s",
             f"{med['checkpointing'] / med['plain']:.2f}x"),
            (f"step CPU time, median of {args.rounds}",
             f"{med_cpu['plain']:.2f} s", f"{med_cpu['checkpointing']:.2f} s",
             f"{med_cpu['checkpointing'] / med_cpu['plain']:.2f}x")]
    print("\n| measure | plain | checkpointing | checkpointing vs plain |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nstep times: plain {[round(t, 2) for t in times['plain']]}, checkpointing "
          f"{[round(t, 2) for t in times['checkpointing']]}")
    if not args.no_memory:
        print(f"traced before the step (weights): {_mib(memory['plain']['baseline_traced'])}")
    print(steal.line())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(memory=memory, times=timed), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
