"""``minilora pretrain``: train the small byte-level Llama that minilora ships as its base model.

LoRA adapts a model that already knows its language; this command makes such a model from nothing
in a few CPU minutes. The recipe is nanoGPT's, at toy scale:

* data: the Python standard library's docstrings (``minilora.data.pretraining_data``: ~1.5 M bytes
  of technical English, on every machine, no download), one byte per token (``ByteTokenizer``), with
  ``--copy-fraction`` of the training bytes made of synthetic copy drills (``data.copy_drills``:
  made-up words repeated later in the same record), so the model learns to copy from its context
  (induction heads; Olsson et al., 2022), which the instruction tasks LoRA teaches later rely on;
* model: a 4-layer Llama, hidden 128, 4 heads, SwiGLU width 344, vocab 259 (~0.9 M parameters);
* training: random 128-byte windows, AdamW (betas 0.9/0.95, weight decay 0.1), linear warm-up then
  cosine decay, gradient clipping at 1.0, a fixed seed;
* output: ``config.json`` + ``model.safetensors`` (Hugging Face's format) and a README.md recording
  the command, the losses and a sample, in ``./minilora-base`` by default. Nothing is ever written
  inside the installed package: the base model it ships is replaced by hand, by copying a folder
  made here (``--out`` inside the package is refused);
* faults: every argument is checked before any work; resumable checkpoints go to
  ``--checkpoint-dir`` (``OUT-checkpoints``) every ``--checkpoint-every`` steps and on Ctrl-C, and
  ``--resume DIR`` continues a run bit for bit; a diverged run does not replace an existing
  ``--out`` without ``--force``.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .. import backend
from .checks import (add_resume_arguments, check_output_folder, fraction, int_at_least, nonnegative_float,
                     nonnegative_int, positive_float, positive_int, refuse_diverged_overwrite)

DEFAULT_OUT = "minilora-base"
SAMPLE_PROMPT = "The "
SAMPLE_TOKENS = 200
COPY_TEST_SPANS = 128
# Chosen by experiment (seed 0, the demo's LoRA run on each base: held-out exact match after, docstring
# validation loss, copy_accuracy):
#   1500 steps: 0 -> 14% / 1.380 / 0%;  0.15 -> 23% / 1.446 / 0%;  0.25 -> 39% / 1.512 / 2%;
#               0.5 -> 41% / 1.664 / 41%
#   3000 steps: 0 (the earlier base) -> 17% / 1.281 / 0%;  0.15 -> 43% / 1.338 / 11%;
#               0.25 -> 53% / 1.360 / 68%
# 0.25 buys the copying (and +36 points of LoRA accuracy) for 0.08 nats/byte of docstring loss.
DEFAULT_COPY_FRACTION = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="output folder (config.json, model.safetensors, README.md); not inside "
                        "the installed package")
    parser.add_argument("--steps", type=positive_int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="windows per step")
    parser.add_argument("--block-size", type=int_at_least(2), default=128,
                        help="tokens (bytes) per window")
    parser.add_argument("--hidden-size", type=positive_int, default=128, help="model width")
    parser.add_argument("--layers", type=positive_int, default=4, help="decoder layers")
    parser.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    parser.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (GQA); "
                        "default: as many as --heads")
    parser.add_argument("--intermediate-size", type=positive_int, default=344, help="SwiGLU width")
    parser.add_argument("--max-position-embeddings", type=positive_int, default=None,
                        help="context length written to the config (default: --block-size, the "
                        "length trained on; generation slides its window beyond it)")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=fraction, default=0.1,
                        help="final lr as a fraction of the peak")
    parser.add_argument("--warmup", type=nonnegative_int, default=100, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=nonnegative_float, default=0.1,
                        help="AdamW's decoupled weight decay (not on norm gains)")
    parser.add_argument("--eval-every", type=positive_int, default=250,
                        help="steps between validation losses")
    parser.add_argument("--eval-batches", type=positive_int, default=16,
                        help="validation batches per evaluation")
    parser.add_argument("--copy-fraction", type=float, default=DEFAULT_COPY_FRACTION,
                        help="share of the training bytes that are synthetic copy drills, in [0, 1) "
                        "(0 = docstrings only); validation is docstrings only either way")
    parser.add_argument("--max-chars", type=positive_int, default=None,
                        help="use only the first N characters of the corpus (quick runs; default: all)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float16",
                        help="dtype of the saved weights (training is float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data and sampling")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: $MINILORA_DEVICE or cpu")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for BLAS and minilora's kernels (default: all, up to 2); "
                        "1 is faster on a machine busy with other work")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="folder for resumable checkpoints (default: OUT-checkpoints)")
    add_resume_arguments(parser, checkpoint_every=500, checkpoints="the --checkpoint-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def validate(args) -> None:
    """The checks that involve more than one argument, or the file system: before any work."""
    check_output_folder(args.out)
    if args.checkpoint_dir is not None:
        check_output_folder(args.checkpoint_dir, "--checkpoint-dir")
    if not 0.0 <= args.copy_fraction < 1.0:
        raise ValueError(f"--copy-fraction must be in [0, 1), got {args.copy_fraction}")
    if args.hidden_size % args.heads:
        raise ValueError(f"--hidden-size {args.hidden_size} must be a multiple of --heads {args.heads}")
    if (args.hidden_size // args.heads) % 2:
        raise ValueError(f"--hidden-size / --heads = {args.hidden_size // args.heads} must be even "
                         "(RoPE rotates pairs of dimensions)")
    if args.kv_heads is not None and args.heads % args.kv_heads:
        raise ValueError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.resume is not None and not Path(args.resume).is_dir():
        raise ValueError(f"--resume {args.resume} is not a folder; pass the checkpoint folder a run "
                         "saved (see --checkpoint-dir)")


def copy_accuracy(model, tokenizer, n: int = COPY_TEST_SPANS, seed: int = 1234) -> float:
    """Share of ``n`` made-up spans that ``model`` copies exactly after seeing them once.

    Each prompt is ``<|endoftext|>`` + a span of 1-4 ``pseudo_words`` + one of the drills'
    ``SEPARATORS`` ("mib qzvk | "); greedy decoding must continue with the span itself. A direct test
    of induction heads (Olsson et al., 2022): a model that cannot copy from its context scores ~0.
    """
    from ..data.pretraining import SEPARATORS, pseudo_words
    rng = np.random.default_rng(seed)  # its own seed: not the training drills
    words = pseudo_words(4 * n, rng).reshape(n, 4).tolist()
    spans = [" ".join(w[:k]) for w, k in zip(words, rng.integers(1, 5, size=n).tolist())]
    seps = [SEPARATORS[i] for i in rng.integers(0, len(SEPARATORS), size=n).tolist()]
    prompts = [[tokenizer.eos_id] + tokenizer.encode(span + sep) for span, sep in zip(spans, seps)]
    by_length: dict = {}
    for i, p in enumerate(prompts):  # generate() takes a batch of equal-length prompts
        by_length.setdefault(len(p), []).append(i)
    hits = 0
    for length, rows in by_length.items():
        ids = np.array([prompts[i] for i in rows], dtype=np.int64)                   # (b, length)
        new = max(len(spans[i]) for i in rows)
        out = np.asarray(model.generate(ids, max_new_tokens=new))[:, length:]         # (b, new)
        hits += sum(tokenizer.decode(row[:len(spans[i])].tolist()) == spans[i]
                    for row, i in zip(out, rows))
    return hits / n


def _readme(args, config, n_params, history, val_loss, sample, sampled, seconds, n_train,
            n_val, copy_score) -> str:
    words = sys.argv[1:]
    if words and words[0] == "pretrain":  # run as `minilora pretrain ...` (or python -m minilora)
        words = words[1:]
    argv = " ".join(shlex.quote(a) for a in words)
    last = history[-50:] if history else []
    train_loss = float(np.mean([h["loss"] for h in last])) if last else float("nan")
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    curve = "\n".join(f"| {s} | {v:.4f} |" for s, v in evals)
    f = args.copy_fraction
    copies = " and repeats what it was shown" if copy_score >= 0.5 else ""
    if f > 0:
        drill_intro = f"\nmixed with synthetic copy drills ({100 * f:g}% of the training bytes)"
        drill_para = """

The copy drills (`minilora.data.copy_drills`) are records in which made-up words come back later in
the same record: mostly a span repeated past the 128-byte window (`mib qzvk | mib qzvk | ...`), some
sentences (`qzvk is set to mib; reading qzvk later gives mib.`). Docstrings alone rarely reward
copying from the context, so a base trained on them alone does not learn it, and instructions like
"Repeat the word twice." stay out of LoRA's reach; the drills are there to grow induction heads, the
attention heads that copy (Olsson et al., 2022). The validation set is docstrings only, so its losses
compare with a docstrings-only base's."""
        data_row = (f"stdlib docstrings + copy drills: {n_train:,} train bytes ({100 * f:g}% drills, "
                    f"~{round(f * n_train):,}) / {n_val:,} validation bytes (docstrings only; whole "
                    "documents held out)")
    else:
        drill_intro = drill_para = ""
        data_row = (f"stdlib docstrings: {n_train:,} train / {n_val:,} validation bytes (whole "
                    "documents held out)")
    return f"""# minilora base model

A byte-level Llama (vocab 259: 256 bytes + `<|bos|>`, `<|endoftext|>`, `<|pad|>`) pretrained from
scratch on the docstrings of Python's standard library{drill_intro}, as the starting point for
minilora's LoRA examples. Hugging Face format: `config.json` + `model.safetensors` (weights stored as
{args.dtype}; minilora loads them as float32). It writes English-looking technical prose{copies};
it knows nothing else.{drill_para}

## How it was made

    minilora pretrain {argv}

| | |
|---|---|
| architecture | {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads ({config.num_key_value_heads} KV), SwiGLU {config.intermediate_size}, RoPE theta {config.rope_theta:g}, context {config.max_position_embeddings} |
| parameters | {n_params:,} |
| data | {data_row} |
| training | {args.steps} steps x {args.batch_size} windows x {args.block_size} bytes, AdamW lr {args.lr:g} (warm-up {args.warmup}, cosine to {args.min_lr_ratio:g}x), wd {args.weight_decay:g}, clip 1.0, seed {args.seed} |
| time | {seconds / 60:.1f} minutes on {platform.machine()} ({backend.get_device()}) |
| final train loss | {train_loss:.4f} nats/byte (mean of the last {len(last)} steps) |
| final validation loss | {val_loss:.4f} nats/byte ({val_loss / np.log(2):.3f} bits/byte) |
| copy test | {copy_score:.1%} of {COPY_TEST_SPANS} made-up spans continued exactly after one sight (`minilora.commands.pretrain.copy_accuracy`, greedy; ~0% for a model that cannot copy) |

Validation loss during training:

| step | val loss |
|---|---|
{curve}

## Samples

Prompt `{SAMPLE_PROMPT!r}`, {SAMPLE_TOKENS} new bytes. Greedy decoding (`model.generate(ids, {SAMPLE_TOKENS})`)
loops on its most likely phrase, as small models do:

```
{sample}
```

Sampling (`do_sample=True, temperature=0.8, top_k=40, seed=0`) reads more like the corpus:

```
{sampled}
```
"""


def _limit_threads(n: int | None):
    """A context limiting BLAS (threadpoolctl, if installed) and minilora's kernels to n threads."""
    import contextlib
    import os
    if n is None:
        return contextlib.nullcontext()
    os.environ["MINILORA_NUM_THREADS"] = str(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def run(args) -> int:
    validate(args)
    with _limit_threads(args.threads):
        return _run(args)


def _run(args) -> int:
    from ..data import ByteTokenizer, pretraining_data, random_batches
    from ..models import LlamaConfig, LlamaForCausalLM
    from ..optim import AdamW, LambdaLR, WarmupCosine
    from ..train import evaluate, train

    if args.device:
        backend.set_device(args.device)
    backend.manual_seed(args.seed)
    tok = ByteTokenizer()
    train_ids, val_ids = pretraining_data(tok, max_chars=args.max_chars, seed=args.seed,
                                          copy_fraction=args.copy_fraction)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=args.max_position_embeddings or args.block_size,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = LlamaForCausalLM(config)
    n_params = model.num_parameters()
    drills = f", {100 * args.copy_fraction:g}% of them copy drills" if args.copy_fraction > 0 else ""
    print(f"pretraining {n_params:,} parameters on {len(train_ids):,} bytes{drills} "
          f"({len(val_ids):,} docstring bytes held out) for {args.steps} steps", flush=True)

    # no weight decay on norm gains (1-D), as nanoGPT / most Llama recipes
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = AdamW([{"params": decay, "weight_decay": args.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    scheduler = LambdaLR(optimizer, WarmupCosine(args.warmup, args.steps, min_ratio=args.min_lr_ratio))
    data_rng = np.random.default_rng(args.seed)
    val_rng = np.random.default_rng(args.seed + 1)
    val_batches = [random_batches(val_ids, args.batch_size, args.block_size, val_rng)
                   for _ in range(args.eval_batches)]   # fixed, so eval losses are comparable

    t0 = time.perf_counter()

    def eval_fn(m):
        loss = evaluate(m, val_batches)
        if args.no_progress:  # a log line per evaluation instead of the bar
            print(f"  {time.perf_counter() - t0:7.1f}s  val loss {loss:.4f}", flush=True)
        return loss

    checkpoint_dir = args.checkpoint_dir or f"{Path(args.out)}-checkpoints"
    history = train(model, lambda step: random_batches(train_ids, args.batch_size, args.block_size,
                                                       data_rng),
                    optimizer, args.steps, eval_fn=eval_fn,
                    eval_every=args.eval_every, scheduler=scheduler, clip=1.0,
                    progress=not args.no_progress, seed=args.seed, desc="pretrain",
                    checkpoint_dir=checkpoint_dir, checkpoint_every=args.checkpoint_every,
                    resume_from=args.resume, rngs={"data": data_rng})
    seconds = time.perf_counter() - t0
    val_loss = history[-1]["eval_loss"] if history else evaluate(model, val_batches)

    prompt = np.array([tok.encode(SAMPLE_PROMPT)])
    out = model.generate(prompt, max_new_tokens=SAMPLE_TOKENS, eos_token_id=tok.eos_id)
    sample = tok.decode(out[0].tolist())
    out = model.generate(prompt, max_new_tokens=SAMPLE_TOKENS, eos_token_id=tok.eos_id,
                         do_sample=True, temperature=0.8, top_k=40, seed=0)
    sampled = tok.decode(out[0].tolist())
    copy_score = copy_accuracy(model, tok)

    out_dir = Path(args.out)
    refuse_diverged_overwrite(history, out_dir, args.force)
    model.save_pretrained(out_dir, dtype=np.float16 if args.dtype == "float16" else np.float32)
    from ..fileio import write_text_atomic
    write_text_atomic(out_dir / "README.md", _readme(args, config, n_params, history, val_loss,
                                                     sample, sampled, seconds, len(train_ids),
                                                     len(val_ids), copy_score))
    print(f"done in {seconds / 60:.1f} min: val loss {val_loss:.4f} nats/byte, copies "
          f"{copy_score:.0%} of {COPY_TEST_SPANS} made-up spans; saved to {out_dir}")
    print("greedy sample:", sample)
    print("sampled:", sampled)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="minilora pretrain")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
