"""Tokenizer encode speed: minilora's BPETokenizer (plain Python) vs Hugging Face's Rust ``tokenizers``.

Both tokenizers come from the same file, SmolLM2-135M-Instruct's GGUF (``models.smollm2_path()``):
ours with ``BPETokenizer.from_pretrained(path)``, the Rust one from transformers' GGUF loader
(``AutoTokenizer.from_pretrained(dir, gguf_file=name)``) saved as a tokenizer.json and loaded
with ``tokenizers.Tokenizer.from_file``. transformers' GGUF loader does not know llama.cpp's
"smollm" pre-tokenizer (digits isolated before GPT-2's split) and falls back to GPT-2's alone, so the
exported tokenizer.json gets SmolLM2's own pre-tokenizer, ``Digits(individual_digits=True)`` then
``ByteLevel``, as tests/test_bpe.py builds its oracle. Every document's ids are asserted equal.

The corpus is the package's instruction data set rendered as text: ``make_instruction_dataset``'s
records as Alpaca prompts followed by their answers (``format_prompt``), and the same records as
chat conversations laid out by the file's chat template (``apply_chat_template(...,
tokenize=False)``, ``<|im_start|>`` and friends included, which both tokenizers cut out as added
tokens). Each document is encoded on its own, one call per document, no special tokens added.

Timed (median of ``--repeats`` passes over the corpus, the contenders interleaved pass by pass; one
thread each: ``RAYON_NUM_THREADS=1`` for the Rust library, whose single ``encode`` call is serial
anyway): the Rust ``Tokenizer.encode``; ours from a cold cache (a tokenizer freshly loaded before
each pass), with a warm cache (a second pass of the same tokenizer), and inside
``minilora.reference()`` (no cache at all). Printed: tokens/s of each and ours / Rust (the
requirement: at least 1/20 = 0.05).

Run:  python benchmarks/bench_tokenizer.py [--train 2000] [--repeats 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")      # before tokenizers starts its thread pool
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CpuSteal, machine_summary  # noqa: E402

TARGET = 1 / 20


def corpus(n_train: int, tok) -> list[str]:
    """The instruction data set as documents: Alpaca prompt + answer, then the same as chats."""
    from minilora.data.instructions import format_prompt, make_instruction_dataset
    train, test = make_instruction_dataset(n_train=n_train)
    records = train + test
    alpaca = [format_prompt(r) + r["output"] for r in records]
    chats = [tok.apply_chat_template(
        [{"role": "user", "content": (r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""))},
         {"role": "assistant", "content": r["output"]}], tokenize=False) for r in records]
    return alpaca + chats


def rust_tokenizer(path):
    """The Rust tokenizer of the GGUF file with SmolLM2's own pre-tokenizer (see the docstring)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.json"), encoding="utf-8") as f:
            spec = json.load(f)
    byte_level = spec["pre_tokenizer"]
    if byte_level.get("type") != "ByteLevel":
        raise SystemExit(f"transformers' GGUF loader gave a {byte_level.get('type')} pre-tokenizer; "
                         "this benchmark expects ByteLevel (update rust_tokenizer)")
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}
    return Tokenizer.from_str(json.dumps(spec))


def _pass(encode, docs) -> tuple[float, int, list]:
    """(seconds, tokens, ids per document) of one pass of ``encode`` over ``docs``."""
    t0 = time.perf_counter()
    ids = [encode(d) for d in docs]
    return time.perf_counter() - t0, sum(map(len, ids)), ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000, help="training records of the data set "
                    "(plus its 210 test records), each rendered twice")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes of each contender")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    import minilora
    from minilora.data import BPETokenizer
    from minilora.models import smollm2_path
    try:
        path = smollm2_path()
    except FileNotFoundError as e:
        print(f"skipped: {e}")
        return 0
    try:
        rust = rust_tokenizer(path)
    except ImportError:
        print("skipped: transformers and tokenizers are needed (pip install transformers tokenizers)")
        return 0
    ours = BPETokenizer.from_pretrained(path)
    docs = corpus(args.train, ours)
    n_chars = sum(map(len, docs))
    print(machine_summary())
    print(f"corpus: {len(docs)} documents, {n_chars / 1e3:.0f}k characters (the instruction data "
          f"set as Alpaca text and as {path.name}'s chat template); one thread each")

    def rust_encode(d):
        return rust.encode(d, add_special_tokens=False).ids

    def cold(d):                                   # bound to a fresh tokenizer before each pass
        return cold.tok.encode(d)

    def no_cache(d):
        with minilora.reference():                 # the reference path: no per-word cache
            return ours.encode(d)

    times = {"rust tokenizers": [], "ours, cold cache": [], "ours, warm cache": [],
             "ours, no cache (reference)": []}
    tokens = {}
    with CpuSteal() as steal:
        _, n_ref, want = _pass(rust_encode, docs)
        for _ in range(args.repeats):
            cold.tok = BPETokenizer.from_pretrained(path)   # an empty cache, outside the timing
            for name, fn in (("rust tokenizers", rust_encode), ("ours, cold cache", cold),
                             ("ours, warm cache", cold), ("ours, no cache (reference)", no_cache)):
                seconds, n, got = _pass(fn, docs)
                if got != want:
                    bad = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                    raise SystemExit(f"{name}: ids differ from the Rust tokenizer's on document "
                                     f"{bad}: {docs[bad][:80]!r}")
                times[name].append(seconds)
                tokens[name] = n
    rust_rate = n_ref / statistics.median(times["rust tokenizers"])
    results = {}
    print(f"{len(docs)} documents, {n_ref:,} tokens, ids equal; median of {args.repeats} passes")
    for name, ts in times.items():
        rate = tokens[name] / statistics.median(ts)
        ratio = rate / rust_rate
        results[name] = dict(seconds=ts, tokens_per_s=rate, ratio_to_rust=ratio)
        verdict = "" if name == "rust tokenizers" else (
            f"   {ratio:.3f}x Rust (target >= 1/20 = 0.05x: "
            f"{'OK' if ratio >= TARGET else 'MISSED'})")
        print(f"  {name:28s} {statistics.median(ts) * 1e3:8.1f} ms  {rate / 1e6:6.3f}M tokens/s{verdict}")
    print(steal.line())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(documents=len(docs), tokens=n_ref, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
