"""The one prepared GPU run: CUDA tests, then training-step times and memory against PyTorch + PEFT.

Run on a machine with an NVIDIA GPU, CuPy and the interop extra:

    python benchmarks/gpu.py --out gpu-results        # tests + tiny, small, medium (about 5 minutes)
    python benchmarks/gpu.py --skip-tests --configs tiny --steps 3 --device cpu   # plumbing check

What it does, in order:

1. ``MINILORA_TEST_DEVICE=cuda pytest tests``: the whole suite with CUDA as the default device, plus
   the GPU-only tests (``-m cuda``). Their summaries go to ``tests.log``.
2. For each config (tiny, small, medium) and each method (full fine-tuning, LoRA r=8
   on q,k,v,o, QLoRA = the same LoRA on an NF4 base with double quantization), one training step
   (forward, loss, backward, AdamW update) of minilora on CuPy and of transformers + PEFT on PyTorch
   CUDA, same config and batch, float32, TF32 off on both, interleaved step by step; medians.
3. Peak device memory per step: CuPy's memory pool (bytes held after a step that started from an
   emptied pool) and ``torch.cuda.max_memory_allocated``, next to ``minilora.memory``'s prediction of
   weights + gradients + optimizer state (activations are not predicted, so measured > predicted).
4. QLoRA's frozen Linear weights: bits per parameter measured from the stored arrays on the device.
5. minilora's own CUDA kernels (``minilora/fast/cuda_kernels.py``: softmax, log_softmax,
   cross_entropy, rms_norm) alone, forward + backward at the medium config's sizes, against the same
   op written with generic CuPy array calls (``settings.USE_CUDA_KERNELS = False``) and against its
   reference composite of primitive Tensor ops (``minilora.reference()``); medians of interleaved
   repeats. Skipped on the CPU.

Everything is printed and written to ``--out`` as ``gpu.json`` and ``gpu.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train_step import CONFIGS as CPU_CONFIGS  # noqa: E402  (tiny, small)
from bench_train_step import model_kwargs  # noqa: E402
from common import interleaved_medians  # noqa: E402

# the CPU benchmark's tiny and small, plus a medium one that fills a GPU better
CONFIGS = dict(CPU_CONFIGS, medium=dict(vocab_size=2048, hidden_size=1024, num_hidden_layers=8,
                                        num_attention_heads=16, intermediate_size=2816, seq=512,
                                        batch=16))
METHODS = ("full", "lora", "qlora")
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])



# ------------------------------------------------------------------ 1. the CUDA tests
def run_tests(out_dir: str) -> dict:
    env = dict(os.environ, MINILORA_TEST_DEVICE="cuda")
    results = {}
    for name, args in (("suite_on_cuda", ["tests", "-q", "-x", "--no-header", "-p", "no:cacheprovider"]),
                       ("cuda_only", ["tests", "-q", "-m", "cuda", "--no-header",
                                      "-p", "no:cacheprovider"])):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", *args], env=env if name == "suite_on_cuda"
                              else os.environ, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        results[name] = dict(returncode=proc.returncode, seconds=round(time.perf_counter() - t0, 1),
                             summary=tail[-1] if tail else "")
        with open(os.path.join(out_dir, f"tests_{name}.log"), "w") as f:
            f.write(proc.stdout + proc.stderr)
        print(f"[tests] {name}: rc={proc.returncode} in {results[name]['seconds']} s: "
              f"{results[name]['summary']}", flush=True)
    return results


# ------------------------------------------------------------------ 2. minilora's step
def minilora_step(cfg: dict, method: str, device: str):
    import numpy as np

    from minilora import backend
    from minilora.lora import LoraConfig, get_peft_model
    from minilora.models import LlamaConfig, LlamaForCausalLM
    from minilora.optim import AdamW
    from minilora.quant.linear import quantization_summary, quantize_model

    backend.set_device(device)
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**model_kwargs(cfg))).to(device)
    bits = None
    if method != "full":
        if method == "qlora":
            quantize_model(model, blocksize=64, double_quant=True)
            bits = quantization_summary(model).get("bits_per_parameter")
        model = get_peft_model(model, LoraConfig(**LORA))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=1e-4)
    ids = backend.to_device(np.random.default_rng(0).integers(0, cfg["vocab_size"],
                                                              (cfg["batch"], cfg["seq"])), device)

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        backend.synchronize()
    return step, bits


def minilora_peak_bytes(step) -> int | None:
    from minilora import backend
    pool = backend.memory_pool()
    if pool is None or backend.get_device() != "cuda":
        return None
    backend.synchronize()
    pool.free_all_blocks()      # the pool now holds only live arrays (model, optimizer state)
    step()
    return int(pool.total_bytes())  # freed blocks stay in the pool: this is the step's high-water mark


# ------------------------------------------------------------------ 2'. the same in PyTorch + PEFT
def torch_step(cfg: dict, method: str, device: str):
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    model = HFLlama(HFConfig(**model_kwargs(cfg), attn_implementation="sdpa")).to(dev)
    if method == "qlora":  # the Linear layers in bnb's Linear4bit (NF4, double quant), fp32 compute
        model = _to_bnb_4bit(model, dev)
    if method != "full":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model as peft_get_peft_model
        model = peft_get_peft_model(model, PeftLoraConfig(**LORA))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), device=dev)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return step


def _to_bnb_4bit(model, dev):
    """Swap every decoder Linear for bitsandbytes' Linear4bit (NF4, double quant, fp32 compute)."""
    import bitsandbytes as bnb
    import torch
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False,
                                  compute_dtype=torch.float32, compress_statistics=True,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, q.to(dev))
    return model


def torch_peak_bytes(step) -> int | None:
    import torch
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    return int(torch.cuda.max_memory_allocated())


def predicted_bytes(cfg: dict, method: str) -> int:
    """minilora.memory's weights + gradients + optimizer state in float32 (no activations)."""
    from minilora.memory import memory_breakdown
    from minilora.models import LlamaConfig
    b = memory_breakdown(LlamaConfig(**model_kwargs(cfg)), method, r=LORA["r"],
                         target_modules=tuple(LORA["target_modules"]), weight_bytes=4,
                         master_weights=False)
    return int(b.total)


# ------------------------------------------------------------------ 5. the fused kernels alone
# (rows, columns) of each op at the medium config's sizes: a quarter of the attention scores
# (batch * heads * seq / 4, seq), the LM head's logits (batch * seq, vocab) and a Llama-sized vocab,
# the hidden states (batch * seq, hidden).
KERNEL_CASES = (("softmax", (32768, 512)), ("log_softmax", (32768, 512)),
                ("cross_entropy", (8192, 2048)), ("cross_entropy", (2048, 32000)),
                ("rms_norm", (8192, 1024)))


def _composite(op: str, x, w, targets):
    """The op's reference composite (``functional.py`` in ``minilora.reference()``): every step a
    graph node and a full-size array."""
    import minilora
    from minilora import functional as F
    with minilora.reference():
        if op == "rms_norm":
            return F.rms_norm(x, w, 1e-6)
        if op == "cross_entropy":
            return F.cross_entropy(x, targets)
        return getattr(F, op)(x)


def bench_kernels(device: str, steps: int, warmup: int, cases=KERNEL_CASES) -> list:
    """Median ms of forward + backward for each fused op: kernel, generic CuPy code, composite."""
    if device != "cuda":
        print("[kernels] skipped: minilora's CUDA kernels run on a GPU only", flush=True)
        return []
    return time_fused_ops(device, steps, warmup, cases)


def time_fused_ops(device: str, steps: int, warmup: int, cases) -> list:
    """The timings of ``bench_kernels`` on any device (on the CPU all three are NumPy code)."""
    import numpy as np

    from minilora import Tensor, backend, settings
    from minilora import functional as F

    backend.set_device(device)          # backend.synchronize() waits for the current device
    rows = []
    for op, (n, c) in cases:
        row = dict(op=op, shape=[n, c])
        try:
            rng = np.random.default_rng(0)
            x = Tensor(backend.to_device(rng.standard_normal((n, c), dtype=np.float32), device),
                       requires_grad=True)
            w = Tensor(backend.to_device(rng.standard_normal(c, dtype=np.float32), device),
                       requires_grad=True)
            t = backend.to_device(rng.integers(0, c, n), device)
            g = backend.to_device(rng.standard_normal((n, c), dtype=np.float32), device)

            def fused(use_kernels: bool):
                def step():
                    settings.USE_CUDA_KERNELS = use_kernels
                    try:
                        if op == "rms_norm":
                            F.rms_norm(x, w, 1e-6).backward(g)
                        elif op == "cross_entropy":
                            F.cross_entropy(x, t).backward()
                        else:
                            getattr(F, op)(x).backward(g)
                    finally:
                        settings.USE_CUDA_KERNELS = True
                    x.grad = w.grad = None
                    backend.synchronize()
                return step

            def composite():
                out = _composite(op, x, w, t)
                out.backward(None if op == "cross_entropy" else g)
                x.grad = w.grad = None
                backend.synchronize()

            med = interleaved_medians({"kernel": fused(True), "generic": fused(False),
                                       "composite": composite}, steps=steps, warmup=warmup)
            row.update({f"{k}_ms": round(v * 1e3, 3) for k, v in med.items()})
            row["generic_over_kernel"] = round(med["generic"] / med["kernel"], 2)
            row["composite_over_kernel"] = round(med["composite"] / med["kernel"], 2)
        except Exception as e:  # keep going: one failure must not lose the other figures
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(f"[kernels] {json.dumps(row)}", flush=True)
    return rows


def kernels_table(rows: list) -> str:
    lines = ["| op | shape | kernel ms | generic CuPy ms | composite ms | generic / kernel |"
             " composite / kernel |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape'][0]} x {r['shape'][1]} | {r.get('kernel_ms', '-')} | "
                     f"{r.get('generic_ms', '-')} | {r.get('composite_ms', '-')} | "
                     f"{r.get('generic_over_kernel', '-')} | {r.get('composite_over_kernel', '-')} |"
                     + (f" error: {r['error']}" if "error" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small,medium")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--no-torch", action="store_true", help="time minilora only")
    ap.add_argument("--skip-kernels", action="store_true",
                    help="do not time the CUDA kernels against generic CuPy code (section 5)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    report = dict(device=args.device, results=[], tests=None, kernels=[])
    if args.device == "cuda":
        from minilora import backend
        if not backend.cuda_available():
            print(f"no GPU: {backend.cuda_unavailable_reason()}")
            return 2
    if not args.skip_tests:
        report["tests"] = run_tests(args.out)
    for cname in args.configs.split(","):
        cfg = CONFIGS[cname]
        for method in args.methods.split(","):
            row = dict(config=cname, method=method)
            try:
                ml_step, bits = minilora_step(cfg, method, args.device)
                fns = {"minilora": ml_step}
                if not args.no_torch:
                    fns["torch"] = torch_step(cfg, method, args.device)
                med = interleaved_medians(fns, steps=args.steps, warmup=args.warmup)
                row.update({f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()})
                if "torch" in med:
                    row["ratio"] = round(med["minilora"] / med["torch"], 3)
                row["minilora_peak_bytes"] = minilora_peak_bytes(ml_step)
                if "torch" in fns:
                    row["torch_peak_bytes"] = torch_peak_bytes(fns["torch"])
                row["predicted_state_bytes"] = predicted_bytes(cfg, method)
                row["qlora_bits_per_param"] = bits
            except Exception as e:  # keep going: one failure must not lose the other figures
                row["error"] = f"{type(e).__name__}: {e}"
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    if not args.skip_kernels:
        report["kernels"] = bench_kernels(args.device, args.steps, args.warmup)
    by = {(r["config"], r["method"]): r for r in report["results"]}
    lines = ["| config | method | minilora ms | torch ms | ratio | minilora peak MiB | torch peak MiB |"
             " predicted state MiB |", "|---|---|---|---|---|---|---|---|"]
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    for (c, m), r in by.items():
        lines.append(f"| {c} | {m} | {r.get('minilora_ms', '-')} | {r.get('torch_ms', '-')} | "
                     f"{r.get('ratio', '-')} | {mib(r.get('minilora_peak_bytes'))} | "
                     f"{mib(r.get('torch_peak_bytes'))} | {mib(r.get('predicted_state_bytes'))} |")
    for c in args.configs.split(","):
        if (c, "lora") in by and (c, "full") in by and "minilora_ms" in by[(c, "lora")] \
                and "minilora_ms" in by[(c, "full")]:
            lines.append(f"\n{c}: LoRA step / full step (minilora) = "
                         f"{by[(c, 'lora')]['minilora_ms'] / by[(c, 'full')]['minilora_ms']:.2f}")
    text = "\n".join(lines)
    if report["kernels"]:
        text += "\n\nminilora's CUDA kernels, forward + backward (median ms):\n\n" + \
            kernels_table(report["kernels"])
    print(text)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
