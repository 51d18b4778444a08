"""One training step: LoRA vs full fine-tuning in minilora, and vs transformers + PEFT on PyTorch.

What LoRA saves in a training step (Hu et al., 2021, section 4.2): no gradient for the frozen
weights (backward skips the dL/dW matmul of every frozen Linear: about a third of the step's FLOPs)
and no optimizer state for them (AdamW's two moments = 8 bytes per trained parameter). This script
measures both on the same model:

* step time, the median of ``--steps`` steps after ``--warmup`` (forward + loss + backward + AdamW
  update + zero_grad; wall time, and the process's CPU time, which load from other processes inflates
  less), for minilora full FT and LoRA, and (when torch, transformers and peft are
  installed) transformers full FT and transformers + PEFT LoRA, on ``--threads`` CPU threads. Full
  and LoRA run in the same process, interleaved step by step, so that load from other processes on
  a shared machine hits both alike; the minilora and the torch processes alternate ``--rounds``
  times, so that slow drift in the machine's load hits both libraries alike too. minilora's step
  is the one ``minilora.train`` runs (``data_parallel.forward_backward``: the batch split over the
  threads);
* peak memory of each variant in a fresh subprocess: peak resident set size (``resource``) above the
  RSS after imports and, for minilora, the peak of all traced allocations from before the model is
  built (``tracemalloc``; NumPy reports its array buffers to it): weights, gradients, optimizer
  state and activations together;
* the floor of any adapter method on this model ("minilora-floor"): every weight frozen except the
  first layer's input RMSNorm weight, so backward still carries dL/dx through every layer (as LoRA
  must, to reach its first adapter) but computes no weight gradient and AdamW updates 128-384
  numbers. A LoRA step cannot cost less than this step plus its adapters' own work, so floor / full
  says how far below full fine-tuning *any* LoRA step on this model can go: the weight-gradient
  GEMMs it skips are one third of the Linear layers' FLOPs, while attention, the norms, SwiGLU,
  RoPE and the loss cost the same in both.

BLAS is limited to ``--threads`` threads in every subprocess. Configurations (vocab 256, batch 16): tiny = hidden 128, 4 layers, 4 heads, intermediate
344, seq 128; small = hidden 384, 6 layers, 6 heads, intermediate 1024, seq 256. LoRA: r=8, alpha=16
on q_proj, k_proj, v_proj, o_proj.

Run:  python benchmarks/bench_lora_step.py [--configs tiny,small] [--steps 5] [--rounds 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuSteal, run_child  # noqa: E402

CONFIGS = {
    "tiny": dict(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=344, seq=128, batch=16),
    "small": dict(vocab_size=256, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                  intermediate_size=1024, seq=256, batch=16),
}
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _model_kwargs(cfg: dict) -> dict:
    kw = {k: v for k, v in cfg.items() if k not in ("seq", "batch")}
    kw.update(num_key_value_heads=cfg["num_attention_heads"], max_position_embeddings=cfg["seq"],
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return kw


# ------------------------------------------------------------------ building one variant
def build_minilora_model(cfg: dict, kind: str, **lora_kw):
    """The seeded minilora model of a config: kind "full" (everything trained), "lora" (``LORA``
    with ``lora_kw`` added, e.g. use_dora=True), or "floor" (only the first layer's input norm
    trained: no weight gradients at all)."""
    from minilora import backend
    from minilora.lora import LoraConfig, get_peft_model
    from minilora.models import LlamaConfig, LlamaForCausalLM

    backend.keep_freed_host_memory()   # as the CLI and train() do (not on import): malloc keeps a step's freed buffers
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_model_kwargs(cfg)))
    if kind == "lora":
        model = get_peft_model(model, LoraConfig(**LORA, **lora_kw))
    elif kind == "floor":
        model.requires_grad_(False)
        model.model.layers[0].input_layernorm.weight.requires_grad = True
    return model


def _minilora_step_fn(cfg: dict, kind: str, **lora_kw):
    """(step function, trainable count, total count) for ``build_minilora_model(cfg, kind, **lora_kw)``."""
    import numpy as np

    from minilora.data_parallel import forward_backward
    from minilora.optim import AdamW

    model = build_minilora_model(cfg, kind, **lora_kw)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=1e-4)
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(cfg["batch"], cfg["seq"]))

    def step():   # as minilora.train runs it: the batch split over the threads (data_parallel)
        forward_backward(model, ids, ids)
        opt.step()
        opt.zero_grad()
    return step, sum(p.size for p in params), sum(p.size for p in model.parameters())


def _torch_step_fn(cfg: dict, lora: bool, **lora_kw):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_model_kwargs(cfg)))
    model.config.use_cache = False
    if lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA, **lora_kw))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]),
                        generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())


def _builder(variant: str, threads: int):
    if variant.startswith("minilora"):
        return lambda cfg: _minilora_step_fn(cfg, variant.split("-")[1])
    import torch
    torch.set_num_threads(threads)
    return lambda cfg: _torch_step_fn(cfg, variant.endswith("lora"))


# ------------------------------------------------------------------ the subprocesses
def _child_time(args) -> dict:
    """Time the given variants in one process, interleaved step by step, so that load from other
    processes on a shared machine hits them alike."""
    cfg = CONFIGS[args.config]
    variants = args.variant.split(",")
    built = {v: _builder(v, args.threads)(cfg) for v in variants}
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            built[v][0]()
            if i >= args.warmup:
                times[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
    return {v: dict(times=times[v], cpu_times=cpu[v], trainable=built[v][1], total=built[v][2])
            for v in variants}


def _child_memory(args) -> dict:
    """Peak memory of one variant over two steps: the peak RSS of this fresh process (minus the RSS
    after imports) and, for minilora, the peak of all traced NumPy/Python allocations (weights,
    gradients, optimizer state and activations; tracemalloc runs from before the model is built)."""
    import resource
    import tracemalloc
    cfg = CONFIGS[args.config]
    build = _builder(args.variant, args.threads)
    import numpy  # noqa: F401  (imported before the baseline is taken)
    if args.variant.startswith("torch"):
        import peft  # noqa: F401
        import transformers  # noqa: F401
    else:
        import minilora.lora  # noqa: F401
        import minilora.models  # noqa: F401
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    traced = args.variant.startswith("minilora")
    if traced:
        tracemalloc.start()
    step, _, _ = build(cfg)
    for _ in range(2):
        step()
    peak_traced = tracemalloc.get_traced_memory()[1] if traced else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(peak_rss=peak_rss, baseline_rss=baseline, peak_traced=peak_traced)


def _spawn(mode: str, config: str, variants: str, steps: int, warmup: int, threads: int):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "MINILORA_NUM_THREADS"):
        env[var] = str(threads)
    env["MINILORA_DEVICE"] = "cpu"
    try:
        return run_child(__file__, ["--child", mode, "--config", config, "--variant", variants,
                                    "--steps", steps, "--warmup", warmup, "--threads", threads],
                         env)
    except RuntimeError as e:
        print(f"  {config} {mode} {variants}: skipped ({e})", file=sys.stderr)
        return None


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _mib(n):
    return f"{n / 2**20:7.1f} MiB" if n is not None else "      -    "


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2,
                   help="alternate the minilora and torch processes this many times")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for BLAS and torch")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers + PEFT variants")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = _child_time(args) if args.child == "time" else _child_memory(args)
        print("RESULT " + json.dumps(out))
        return 0
    results = {}
    steal = CpuSteal().__enter__()
    for config in args.configs.split(","):
        if config not in CONFIGS:
            p.error(f"unknown config {config!r}; use {sorted(CONFIGS)}")
        c = CONFIGS[config]
        print(f"\n== {config}: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
              f"{c['num_attention_heads']} heads, intermediate {c['intermediate_size']}, seq {c['seq']}, "
              f"batch {c['batch']}; LoRA r={LORA['r']} on {','.join(LORA['target_modules'])}; "
              f"{args.threads} threads; median of {args.rounds} x {args.steps} steps (interleaved within "
              f"a library, the libraries' processes alternating)", flush=True)
        rows = {}
        groups = [("minilora-full", "minilora-lora", "minilora-floor")]
        if not args.no_torch:
            groups.append(("torch-full", "torch-peft-lora"))
        for _ in range(args.rounds):   # the two libraries' processes alternate, so drift hits both
            for group in groups:
                r = _spawn("time", config, ",".join(group), args.steps, args.warmup, args.threads)
                for v, res in (r or {}).items():
                    if v in rows:
                        rows[v]["times"] += res["times"]
                        rows[v]["cpu_times"] += res["cpu_times"]
                    else:
                        rows[v] = res
        for res in rows.values():
            res["median_s"] = _median(res["times"])
            res["median_cpu_s"] = _median(res["cpu_times"])
        if not args.no_memory:
            for v in [v for v in rows if v != "minilora-floor"]:
                m = _spawn("memory", config, v, args.steps, args.warmup, args.threads)
                if m:
                    rows[v].update(m)
        for v, r in rows.items():
            mem = ""
            if "peak_rss" in r:
                mem = (f"   peak RSS {_mib(r['peak_rss'])} (+{_mib(r['peak_rss'] - r['baseline_rss']).strip()}"
                       f" over imports)   traced peak {_mib(r['peak_traced'])}")
            print(f"  {v:16s} step {r['median_s'] * 1e3:8.1f} ms (CPU {r['median_cpu_s'] * 1e3:7.1f} ms)"
                  f"{mem}   trainable "
                  f"{r['trainable']:,} / {r['total']:,}")
        if "minilora-full" in rows and "minilora-lora" in rows:
            full, lora = rows["minilora-full"], rows["minilora-lora"]
            line = (f"  minilora LoRA / full step time: {lora['median_s'] / full['median_s']:.2f}x "
                    f"(CPU time {lora['median_cpu_s'] / full['median_cpu_s']:.2f}x; target <= 0.75x)")
            if full.get("peak_traced"):
                line += (f"; traced peak memory LoRA / full: "
                         f"{lora['peak_traced'] / full['peak_traced']:.2f}x")
            print(line)
        if "minilora-full" in rows and "minilora-floor" in rows:
            floor_s = rows["minilora-floor"]["median_s"]
            print(f"  floor of any adapter method (no weight gradients) / full step time: "
                  f"{floor_s / rows['minilora-full']['median_s']:.2f}x "
                  f"(LoRA / floor: {rows['minilora-lora']['median_s'] / floor_s:.2f}x)")
        if "torch-full" in rows and "torch-peft-lora" in rows:
            t_full, t_lora = rows["torch-full"], rows["torch-peft-lora"]
            print(f"  transformers+PEFT LoRA / full step time: {t_lora['median_s'] / t_full['median_s']:.2f}x"
                  f" (CPU time {t_lora['median_cpu_s'] / t_full['median_cpu_s']:.2f}x)")
        if "minilora-lora" in rows and "torch-peft-lora" in rows:
            m, t = rows["minilora-lora"], rows["torch-peft-lora"]
            print(f"  minilora LoRA / transformers+PEFT LoRA step time: {m['median_s'] / t['median_s']:.2f}x"
                  f" (CPU time {m['median_cpu_s'] / t['median_cpu_s']:.2f}x)")
        results[config] = rows
    steal.__exit__()
    print(steal.line())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
