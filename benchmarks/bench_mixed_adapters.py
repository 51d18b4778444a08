"""Serving several LoRA adapters from one base: mixed batches vs switching adapters per request.

A server holds one base model and ``--adapters`` N LoRA adapters and gets ``--requests`` R requests,
each a prompt of ``--prompt-len`` tokens naming one adapter (request i uses adapter i mod N), each
answered by ``--new-tokens`` greedy tokens. Three ways to serve them:

* **mixed**: one ``generate(prompts, adapter_names=[...])`` for all R requests (``lora/mixed.py``):
  every step runs the frozen W0 GEMMs once for the whole batch and each adapter's side path on its
  own rows;
* **switching**: for each request, ``set_adapter(its adapter)`` then ``generate`` it alone (batch 1),
  what a server without mixed batches does when requests arrive one by one;
* **grouped**: for each adapter, ``set_adapter`` then one ``generate`` of its requests together
  (possible only when a server may hold requests back to sort them by adapter).

The forward-only case times one forward of the R prompts with ``adapter_names`` against N forwards,
one per adapter on its own rows after ``set_adapter``.

Models: ``base`` is the shipped tiny base (``models.load_base_model()``: hidden 128, 4 layers, vocab
259); ``SMALL`` the tests' random SMALL Llama (tests/_tiny_llama.py: hidden 32, 2 layers, vocab 61).
Each adapter: r=8, lora_alpha=16 on q, k, v and o, B random (``init_lora_weights=False``) so that
the adapters answer differently. The generated tokens of the three ways are checked equal before
timing (greedy; a near-tie of two logits could in principle differ in float32, which is reported).

The ways run interleaved (mixed, switching, grouped, mixed, ...) for ``--rounds`` rounds after one
warm-up, in one process, so that outside load hits them alike; reported are medians of wall time
and of the process's CPU time (user + system), and generated tokens per second (R x new tokens over
the median wall time). ``--threads`` limits BLAS and minilora's own threads (``common.limit_threads``).

Run:  python benchmarks/bench_mixed_adapters.py [--configs base,SMALL] [--rounds 5] [--requests 16]
      [--adapters 4] [--prompt-len 32] [--new-tokens 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CpuSteal, limit_threads, machine_summary  # noqa: E402

# The tests' SMALL Llama (tests/_tiny_llama.py), the smallest shape the suite runs generation on.
SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def build(config: str, n_adapters: int):
    """A PeftModel in eval mode with adapters "a0" ... "a{N-1}" on the ``config`` base."""
    from minilora import backend
    from minilora.lora import LoraConfig, get_peft_model
    from minilora.models import LlamaConfig, LlamaForCausalLM, load_base_model
    backend.manual_seed(0)
    base = load_base_model() if config == "base" else LlamaForCausalLM(LlamaConfig(**SMALL))
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(**lora), "a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", LoraConfig(**lora))
    return model.eval()


def ways(model, prompts, names, new_tokens: int) -> dict:
    """{way: callable returning the (R, T + new) generated ids}, and the forward-only pair."""
    import numpy as np

    from minilora.tensor import no_grad
    adapters = sorted(set(names))
    rows = {a: [i for i, n in enumerate(names) if n == a] for a in adapters}

    def mixed():
        return model.generate(prompts, max_new_tokens=new_tokens, adapter_names=names)

    def switching():
        out = []
        for prompt, name in zip(prompts, names):
            model.set_adapter(name)
            out.append(model.generate(prompt[None], max_new_tokens=new_tokens)[0])
        return np.stack(out)

    def grouped():
        out = np.zeros((len(names), prompts.shape[1] + new_tokens), dtype=np.int64)
        for a in adapters:
            model.set_adapter(a)
            out[rows[a]] = model.generate(prompts[rows[a]], max_new_tokens=new_tokens)
        return out

    def forward_mixed():
        with no_grad():
            return model(prompts, adapter_names=names)

    def forward_per_adapter():
        with no_grad():
            for a in adapters:
                model.set_adapter(a)
                model(prompts[rows[a]])

    return ({"mixed": mixed, "switching": switching, "grouped": grouped},
            {"forward mixed": forward_mixed, "forward per adapter": forward_per_adapter})


def timed_rounds(fns: dict, rounds: int) -> dict:
    """{name: (median wall s, median CPU s)} over ``rounds`` interleaved rounds after one warm-up."""
    for fn in fns.values():
        fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def run(config: str, args) -> None:
    import numpy as np
    model = build(config, args.adapters)
    vocab = model.config.vocab_size
    prompts = np.random.default_rng(1).integers(0, vocab, (args.requests, args.prompt_len))
    names = [f"a{i % args.adapters}" for i in range(args.requests)]
    gen, fwd = ways(model, prompts, names, args.new_tokens)
    outputs = {name: fn() for name, fn in gen.items()}
    same = all(np.array_equal(outputs["mixed"], out) for out in outputs.values())
    n_tokens = args.requests * args.new_tokens
    print(f"\n{config}: {args.adapters} adapters, {args.requests} requests of {args.prompt_len} "
          f"prompt + {args.new_tokens} new tokens; the three ways give the same tokens: {same}")
    times = timed_rounds(gen, args.rounds)
    print(f"{'way':<22}{'wall s':>9}{'CPU s':>9}{'tokens/s':>10}{'vs switching':>14}")
    for name, (w, c) in times.items():
        print(f"{name:<22}{w:9.3f}{c:9.3f}{n_tokens / w:10.1f}{times['switching'][0] / w:13.2f}x")
    times = timed_rounds(fwd, args.rounds)
    for name, (w, c) in times.items():
        ratio = times["forward per adapter"][0] / w
        print(f"{name:<22}{w:9.4f}{c:9.4f}{'':>10}{ratio:13.2f}x (vs per adapter)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", default="base,SMALL", help="comma-separated: base, SMALL")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--requests", type=int, default=16, help="requests R")
    parser.add_argument("--adapters", type=int, default=4, help="adapters N")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per request")
    parser.add_argument("--threads", type=int, default=2, help="BLAS and minilora threads")
    args = parser.parse_args()
    limit_threads(args.threads, torch=False)
    print(machine_summary())
    with CpuSteal() as steal:
        for config in args.configs.split(","):
            if config not in ("base", "SMALL"):
                raise SystemExit(f"--configs: unknown config {config!r}; use base and/or SMALL")
            run(config, args)
    print(steal.line())


if __name__ == "__main__":
    main()
