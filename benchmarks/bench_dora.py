"""One training step with DoRA against the same step with LoRA, in minilora and in transformers + PEFT.

DoRA (Liu et al. 2024) adds to each adapted layer's step the norm of W0 + s·B·A per output row: the
(out, in) product B·A (out·in·r multiply-adds) and a pass over an (out, in) array, every step, plus
the (N, out) products of the magnitude scale; PEFT pays the same. This script measures what that
costs on the configurations of ``bench_lora_step.py`` (same models, same LoRA: r=8, alpha=16 on
q/k/v/o_proj), the step being the one ``minilora.train`` runs (forward + loss + backward + AdamW +
zero_grad, ``data_parallel.forward_backward``):

* minilora LoRA and minilora DoRA in one process, interleaved step by step;
* transformers + PEFT LoRA and DoRA in another process, interleaved the same way;
* the two processes alternate ``--rounds`` times (at least 5 by default), so that drift in the
  machine's load hits both libraries alike; medians over every timed step, wall and CPU time.

It prints each library's DoRA / LoRA ratio (the target for minilora: at most 1.3x) and the steps'
medians. BLAS and torch are limited to ``--threads`` threads in each subprocess.

Run:  python benchmarks/bench_dora.py [--configs tiny,small] [--steps 3] [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_step import (CONFIGS, LORA, _median, _minilora_step_fn,  # noqa: E402
                             _torch_step_fn)
from common import CpuSteal, run_child  # noqa: E402

TARGET = 1.3   # DoRA step / LoRA step, minilora


def _child(args) -> dict:
    """{variant: {times, cpu_times}} for "lora" and "dora" of one library, interleaved step by step."""
    cfg = CONFIGS[args.config]
    if args.library == "torch":
        import torch
        torch.set_num_threads(args.threads)
    build = _minilora_step_fn if args.library == "minilora" else _torch_step_fn
    # bench_lora_step's steps: the minilora one is minilora.train's (data_parallel.forward_backward)
    steps = {v: build(cfg, "lora" if args.library == "minilora" else True, use_dora=v == "dora")[0]
             for v in ("lora", "dora")}
    out = {v: dict(times=[], cpu_times=[]) for v in steps}
    for i in range(args.warmup + args.steps):
        for v, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if i >= args.warmup:
                out[v]["times"].append(time.perf_counter() - t0)
                out[v]["cpu_times"].append(time.process_time() - c0)
    return out


def _spawn(library: str, config: str, args):
    env = dict(os.environ, MINILORA_DEVICE="cpu")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINILORA_NUM_THREADS"):
        env[var] = str(args.threads)
    try:
        return run_child(__file__, ["--child", library, "--config", config, "--steps", args.steps,
                                    "--warmup", args.warmup, "--threads", args.threads], env)
    except RuntimeError as e:
        print(f"  {config} {library}: skipped ({e})", file=sys.stderr)
        return None


def _measure(p, config: str, args) -> dict:
    """Time one config's four steps, print their medians and ratios, return the rows."""
    if config not in CONFIGS:
        p.error(f"unknown config {config!r}; use {sorted(CONFIGS)}")
    c = CONFIGS[config]
    print(f"\n== {config}: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, seq {c['seq']}, "
          f"batch {c['batch']}; r={LORA['r']} on {','.join(LORA['target_modules'])}; "
          f"{args.threads} threads; median of {args.rounds} rounds x {args.steps} steps", flush=True)
    rows = {}
    libraries = ["minilora"] + ([] if args.no_torch else ["torch"])
    for _ in range(args.rounds):
        for library in libraries:
            for v, res in (_spawn(library, config, args) or {}).items():
                row = rows.setdefault(f"{library}-{v}", dict(times=[], cpu_times=[]))
                row["times"] += res["times"]
                row["cpu_times"] += res["cpu_times"]
    for name, r in rows.items():
        r["median_s"], r["median_cpu_s"] = _median(r["times"]), _median(r["cpu_times"])
        print(f"  {name:14s} step {r['median_s'] * 1e3:8.1f} ms (CPU {r['median_cpu_s'] * 1e3:8.1f} ms)")
    for library in libraries:
        lora, dora = rows.get(f"{library}-lora"), rows.get(f"{library}-dora")
        if lora and dora:
            target = f"; target <= {TARGET}x" if library == "minilora" else ""
            print(f"  {library} DoRA / LoRA step time: {dora['median_s'] / lora['median_s']:.2f}x "
                  f"(CPU time {dora['median_cpu_s'] / lora['median_cpu_s']:.2f}x{target})")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny", help="comma-separated: tiny, small")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="alternate the two libraries' processes "
                                                         "this many times")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for BLAS and torch")
    p.add_argument("--no-torch", action="store_true", help="skip transformers + PEFT")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", choices=["minilora", "torch"], dest="library", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.library:
        print("RESULT " + json.dumps(_child(args)))
        return 0
    with CpuSteal() as steal:
        results = {config: _measure(p, config, args) for config in args.configs.split(",")}
    print(steal.line())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
