"""One training step: QLoRA (4-bit NF4 base + float32 LoRA) vs LoRA on a float32 base, in minilora.

QLoRA (Dettmers et al., 2023) stores every frozen Linear in NF4 (4.127 bits per parameter with
blocksize 64 and double quantization) and dequantizes it on the fly in forward and backward; LoRA's
factors A and B train in float32 either way. This script measures, on the same model and batch:

* weight memory: bytes of every stored array (``quant.quantization_summary``): the 4-bit weights with
  their constants, plus the float parameters (embeddings, norms, lm_head, LoRA factors);
* peak traced memory of one training step (``tracemalloc``; NumPy reports its buffers to it), above
  what was allocated before the step: activations, gradients, optimizer state, and for QLoRA the
  shared dequantization buffers (one float32 matrix per distinct weight shape);
* step time (forward + loss + backward + AdamW + zero_grad, the training loop's step:
  ``data_parallel.forward_backward``), the median of ``--steps`` steps after a warm-up, LoRA and
  QLoRA interleaved so that load from other processes hits both alike.

Configurations (vocab 256, batch 16, seq 128): tiny = hidden 128, 4 layers, intermediate 344;
small = hidden 384, 6 layers, intermediate 1024. LoRA: r=8, alpha=16 on q, k, v, o.

Run:  python benchmarks/bench_qlora.py [--configs tiny,small] [--steps 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import sys
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import interleaved_medians, machine_summary  # noqa: E402

CONFIGS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344),
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                  intermediate_size=1024),
}
SEQ, BATCH = 128, 16
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def build(cfg: dict, qlora: bool):
    """(PeftModel, AdamW over its trainable parameters, input ids) for LoRA or QLoRA."""
    import numpy as np

    from minilora import backend
    from minilora.lora import LoraConfig, get_peft_model
    from minilora.models import LlamaConfig, LlamaForCausalLM
    from minilora.optim import AdamW
    from minilora.quant import quantize_model

    backend.keep_freed_host_memory()   # as the CLI and train() do (not on import): malloc keeps a step's freed buffers
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, max_position_embeddings=SEQ, **cfg))
    if qlora:
        quantize_model(model, blocksize=64, double_quant=True)   # what get_peft_model(quantize=) does
    model = get_peft_model(model, LoraConfig(**LORA))
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = backend.to_device(np.random.default_rng(0).integers(0, 256, size=(BATCH, SEQ)))
    return model, opt, ids


def step_fn(model, opt, ids):
    from minilora import backend
    from minilora.data_parallel import forward_backward

    def step():   # as minilora.train runs it (on the CPU: the batch split over the threads)
        forward_backward(model, ids, ids)
        opt.step()
        opt.zero_grad()
        backend.synchronize()
    return step


def traced_step_peak(cfg: dict, qlora: bool) -> int:
    """Peak traced bytes of one training step above the bytes live before it (CPU only)."""
    from minilora.quant import release_workspace
    release_workspace()
    model, opt, ids = build(cfg, qlora)
    step = step_fn(model, opt, ids)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - before


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args(argv)

    from minilora import backend
    from minilora.quant import quantization_summary
    backend.set_device(args.device)
    print(f"machine: {machine_summary()}; device {args.device}")
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        print(f"\n== {name}: {cfg}, batch {BATCH}, seq {SEQ}, LoRA {LORA}")
        built = {"LoRA": build(cfg, False), "QLoRA": build(cfg, True)}
        for label, (model, _, _) in built.items():
            s = quantization_summary(model)
            extra = (f" (4-bit part {s['quantized_bytes'] / 2**20:.2f} MiB at "
                     f"{s['bits_per_parameter']:.4f} bits/param)" if s["quantized_parameters"] else "")
            print(f"   {label:<6} weights {s['total_bytes'] / 2**20:7.2f} MiB{extra}; "
                  f"trainable {s['trainable_parameters']:,} params")
        times = interleaved_medians({k: step_fn(*v) for k, v in built.items()}, steps=args.steps,
                                    warmup=1)
        for label, t in times.items():
            print(f"   {label:<6} step {t * 1000:8.1f} ms (median of {args.steps})")
        if args.device == "cpu":
            del built
            for label, q in (("LoRA", False), ("QLoRA", True)):
                print(f"   {label:<6} peak traced memory of one step: "
                      f"{traced_step_peak(cfg, q) / 2**20:7.2f} MiB (above the live weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
