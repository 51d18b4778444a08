"""LoRA fine-tuning on instruction data, held-out evaluation, and merging: ``minilora finetune`` / ``merge``.

The recipe of Alpaca-LoRA at toy scale: take the pretrained base (``models.load_base_model()``),
wrap it with ``get_peft_model`` (only A and B train; Hu et al., 2021), and train on Alpaca-format
records with the prompt masked out of the loss (``data.collate``). Evaluation is what the user sees:
greedy answers to held-out instructions, scored by exact match.

Library functions (the demo and the notebooks call them):

* ``lora_finetune(model, config, train_examples, ...)`` -> (PeftModel, history);
* ``generate_answers(model, examples, tokenizer)`` -> the model's greedy answers;
* ``exact_match_accuracy(model, examples, tokenizer)`` -> (accuracy, answers);
* ``merge_adapter_into_base(base_dir, adapter_dir, out_dir)``: a standalone merged checkpoint.

Command line: ``minilora finetune [--data alpaca.json] [--out DIR] ...`` writes an adapter directory
(PEFT's files); ``minilora merge --adapter DIR --out DIR [--base DIR]`` writes a merged Llama
checkpoint (config.json + model.safetensors) that needs no LoRA code to run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .. import backend

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ------------------------------------------------------------------ evaluation
def generate_answers(model, examples, tokenizer, max_new_tokens: int | None = None,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers of ``model`` to each example's prompt (the text before <|endoftext|>).

    ``generate`` runs a batch of prompts of equal length, so prompts are grouped by length; each
    group is decoded in batches of ``batch_size``. ``max_new_tokens`` defaults to the longest
    reference output plus a few bytes of slack.
    """
    from ..data import encode_prompt
    if not examples:
        return []
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(ex["output"])) for ex in examples) + 4
    prompts = [encode_prompt(ex, tokenizer) for ex in examples]
    answers: list = [None] * len(examples)
    by_length: dict = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, rows in sorted(by_length.items()):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids = np.array([prompts[i] for i in chunk], dtype=np.int64)     # (b, length)
            out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id)
            for i, row in zip(chunk, np.asarray(out)[:, length:]):          # (b, new tokens)
                row = row.tolist()
                if tokenizer.eos_id in row:
                    row = row[:row.index(tokenizer.eos_id)]
                answers[i] = tokenizer.decode(row)
    return answers


def exact_match_accuracy(model, examples, tokenizer, **kw) -> tuple[float, list[str]]:
    """(fraction of examples answered exactly right, the answers), with ``data.exact_match``."""
    from ..data import exact_match
    answers = generate_answers(model, examples, tokenizer, **kw)
    if not examples:
        return float("nan"), answers
    hits = sum(exact_match(a, ex["output"]) for a, ex in zip(answers, examples))
    return hits / len(examples), answers


def per_family_accuracy(examples, answers) -> dict:
    """{task family: accuracy} for the generated dataset (records from elsewhere count as "other")."""
    from ..data import exact_match, task_family
    hits: dict = {}
    for ex, a in zip(examples, answers):
        fam = task_family(ex) or "other"
        h, n = hits.get(fam, (0, 0))
        hits[fam] = (h + exact_match(a, ex["output"]), n + 1)
    return {fam: h / n for fam, (h, n) in hits.items()}


# ------------------------------------------------------------------ training
def lora_finetune(model, config, train_examples, tokenizer, steps: int = 300, lr: float = 3e-3,
                  batch_size: int = 16, warmup: int = 20, max_len: int = 128, seed: int = 0,
                  weight_decay: float = 0.0, eval_examples=None, eval_every: int = 100,
                  progress: bool = True, desc: str = "LoRA fine-tune"):
    """Wrap ``model`` with ``config`` (LoRA) and train the adapter; returns (PeftModel, history).

    Batches are drawn from ``train_examples`` (Alpaca records) epoch after epoch in a seeded order;
    AdamW over the adapter's parameters only, linear warm-up then cosine decay, gradient clipping at
    1.0 (``train.train``). ``eval_examples`` adds a held-out loss to the history every
    ``eval_every`` steps.
    """
    from ..data import collate, iterate_batches
    from ..lora import PeftModel, get_peft_model
    from ..optim import AdamW, LambdaLR, WarmupCosine
    from ..train import evaluate, train

    if not train_examples:
        raise ValueError("no training examples; pass a non-empty list of Alpaca records")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    backend.manual_seed(seed)
    peft_model = model if isinstance(model, PeftModel) else get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = LambdaLR(optimizer, WarmupCosine(min(warmup, steps - 1), steps))
    rng = np.random.default_rng(seed)

    def endless():
        while True:  # one shuffled epoch after another
            yield from iterate_batches(train_examples, tokenizer, batch_size, rng=rng, max_len=max_len)

    eval_fn = None
    if eval_examples:
        eval_batches = [collate(eval_examples[i:i + 64], tokenizer, max_len)
                        for i in range(0, len(eval_examples), 64)]
        eval_fn = lambda m: evaluate(m, eval_batches)  # noqa: E731
    history = train(peft_model, endless(), optimizer, steps, eval_fn=eval_fn, eval_every=eval_every,
                    scheduler=scheduler, clip=1.0, progress=progress, seed=seed, desc=desc)
    peft_model.eval()
    return peft_model, history


# ------------------------------------------------------------------ merging a saved adapter
def merge_adapter_into_base(adapter_dir, out_dir, base_dir=None, safe_merge: bool = True):
    """Load the base (``base_dir`` or the shipped one), apply the adapter in ``adapter_dir``, merge
    ΔW = (α/r)·B·A into the weights and save a plain Llama checkpoint to ``out_dir``.

    Returns (merged model, max |logits merged - logits with the adapter| on a probe batch).
    """
    from ..lora import PeftModel
    from ..lora.io import read_adapter_dir
    from ..models import LlamaForCausalLM, load_base_model

    read_adapter_dir(adapter_dir)  # a missing or broken adapter fails before the base is loaded
    base = LlamaForCausalLM.from_pretrained(base_dir) if base_dir else load_base_model()
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    probe = np.random.default_rng(0).integers(0, base.config.vocab_size, size=(2, 16))
    want = peft_model(probe).numpy()
    merged = peft_model.merge_and_unload(safe_merge=safe_merge)
    diff = float(np.abs(merged(probe).numpy() - want).max())
    merged.save_pretrained(out_dir)
    return merged, diff


# ------------------------------------------------------------------ command line: finetune
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="an Alpaca-format JSON file (list of {instruction, input, "
                        "output}); default: minilora's generated instruction dataset")
    parser.add_argument("--base", help="base model folder (config.json + model.safetensors); "
                        "default: the shipped base model")
    parser.add_argument("--out", default="lora-adapter", help="where to write the adapter")
    parser.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=16, help="lora_alpha (scaling = alpha / r)")
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated module names, or 'all-linear'")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=128, help="tokens (bytes) per example, max")
    parser.add_argument("--n-train", type=int, default=2000, help="generated dataset: training size")
    parser.add_argument("--n-test", type=int, default=70,
                        help="held-out examples for exact-match accuracy (0: skip evaluation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _targets(spec: str):
    return "all-linear" if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


def run(args) -> int:
    from ..data import ByteTokenizer, load_alpaca_json, make_instruction_dataset
    from ..lora import LoraConfig
    from ..lora.io import adapter_size_bytes
    from ..models import LlamaForCausalLM, load_base_model

    if args.device:
        backend.set_device(args.device)
    tok = ByteTokenizer()
    if args.data:
        records = load_alpaca_json(args.data)
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(records))
        n_test = min(args.n_test, len(records) // 5)
        test = [records[i] for i in order[:n_test]]
        train_set = [records[i] for i in order[n_test:]]
    else:
        train_set, test = make_instruction_dataset(args.n_train, args.n_test, seed=args.seed)
    base = LlamaForCausalLM.from_pretrained(args.base) if args.base else load_base_model()
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=_targets(args.targets),
                        base_model_name_or_path=str(args.base) if args.base else "minilora/base-model")
    before = None
    if test:
        before, _ = exact_match_accuracy(base, test, tok)
    t0 = time.perf_counter()
    model, history = lora_finetune(base, config, train_set, tok, steps=args.steps, lr=args.lr,
                                   batch_size=args.batch_size, max_len=args.max_len, seed=args.seed,
                                   progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    model.print_trainable_parameters()
    print(f"trained {args.steps} steps in {seconds:.1f} s; final loss "
          f"{np.mean([h['loss'] for h in history[-20:]]):.4f}")
    if test:
        after, _ = exact_match_accuracy(model, test, tok)
        print(f"held-out exact match ({len(test)} examples): {before:.1%} before -> {after:.1%} after")
    model.save_pretrained(args.out)
    print(f"adapter saved to {args.out} ({adapter_size_bytes(args.out) / 1024:.1f} KiB)")
    return 0


# ------------------------------------------------------------------ command line: merge
def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + "
                        "adapter_model.safetensors)")
    parser.add_argument("--out", required=True, help="folder for the merged model")
    parser.add_argument("--base", help="base model folder; default: the shipped base model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)


def run_merge(args) -> int:
    if args.device:
        backend.set_device(args.device)
    if Path(args.out).resolve() == Path(args.adapter).resolve():
        raise ValueError("--out must differ from --adapter (the merged model would overwrite it)")
    _, diff = merge_adapter_into_base(args.adapter, args.out, args.base)
    print(f"merged {args.adapter} into {'the base at ' + args.base if args.base else 'the shipped base'}"
          f"; max |logits merged - adapter| = {diff:.2e}; saved to {args.out}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="minilora finetune")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
