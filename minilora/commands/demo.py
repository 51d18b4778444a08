"""``minilora demo``: the whole LoRA story in a few CPU minutes, offline.

1. Load the small pretrained Llama that ships with minilora (it writes English-like prose and knows
   nothing about following instructions).
2. Ask it a few held-out instructions: it rambles; exact-match accuracy on the held-out set is ~0.
3. Wrap it with LoRA (Hu et al., 2021): r=8 adapters on the attention projections; every pretrained
   weight is frozen, and only A (r, in) and B (out, r) of each adapted layer train.
4. Fine-tune on Alpaca-format instruction data with the prompt masked out of the loss.
5. Ask again: the answers and the accuracy on instructions never seen in training.
6. Merge W = W0 + (α/r)·B·A and check that the merged model computes the same logits.
7. Save the adapter in PEFT's format (a few hundred KiB next to a multi-MiB base) and plot the loss,
   in ``./minilora-demo`` (``--out``; never inside the installed package), named at the end.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .. import backend
from .checks import check_output_folder, nonnegative_int, positive_float, positive_int

DEFAULT_OUT = "minilora-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", "-r", type=positive_int, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=positive_float, default=16,
                        help="lora_alpha; the update is scaled by alpha / r")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                        help="modules that get adapters: comma-separated names or 'all-linear'")
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="examples per step")
    parser.add_argument("--n-eval", type=positive_int, default=70,
                        help="held-out instructions scored by exact match")
    parser.add_argument("--show", type=nonnegative_int, default=5, help="held-out answers to print")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="folder (made in the working directory unless a path is given) for the "
                        "adapter and the loss curve; printed at the end")
    parser.add_argument("--base", help="base model folder (default: the base model shipped in the package)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, LoRA init and dropout")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="cpu (NumPy) or cuda (CuPy); default: $MINILORA_DEVICE or cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _pick_examples(test, n: int) -> list:
    """Up to n held-out examples, one per task family first, for a varied showcase."""
    from ..data import task_family
    seen, picked = set(), []
    for ex in test:
        fam = task_family(ex)
        if fam not in seen:
            seen.add(fam)
            picked.append(ex)
    rest = [ex for ex in test if not any(ex is p for p in picked)]
    return (picked + rest)[:n]


def _prompt_line(ex) -> str:
    return ex["instruction"] + (f" [{ex['input']}]" if ex.get("input") else "")


def _clean(text: str, width: int = 20) -> str:
    """An answer for printing: newlines as '\\n', other control bytes as '.', cut to ``width``."""
    text = "".join("\\n" if ch == "\n" else ch if ch.isprintable() else "." for ch in text)
    return '"' + (text if len(text) <= width else text[:width - 3] + "...") + '"'


def _show(title, examples, before, after=None) -> None:
    print(title)
    w = max(len(_prompt_line(ex)) for ex in examples)
    for i, ex in enumerate(examples):
        line = f"     {_prompt_line(ex):<{w}}  expected {_clean(ex['output']):<14} " \
               f"before {_clean(before[i]):<22}"
        if after is not None:
            ok = "ok" if after[i].strip() == ex["output"].strip() else "x"
            line += f" after {_clean(after[i]):<14} {ok}"
        print(line)


def save_loss_plot(history, path) -> bool:
    """Write the training-loss curve as a PNG; False (and a message) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install minilora[notebooks]); skipping the loss plot")
        return False
    from ..fileio import atomic_path
    steps = [h["step"] for h in history]
    losses = np.array([h["loss"] for h in history])
    k = max(1, len(losses) // 30)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")  # running mean over k steps
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, losses, color="0.75", lw=1, label="loss per step")
    ax.plot(steps[k - 1:], smooth, color="C0", lw=2, label=f"mean of {k} steps")
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if evals:
        ax.plot(*zip(*evals), "o-", color="C1", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("LoRA fine-tuning: only A and B train")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def run(args) -> int:
    from ..data import ByteTokenizer, encode_prompt, make_instruction_dataset
    from .finetune import _targets, exact_match_accuracy, lora_finetune, per_family_accuracy
    from .. import settings
    from ..lora import LoraConfig
    from ..lora.io import adapter_size_bytes
    from ..models import BASE_MODEL_DIR, LlamaForCausalLM, load_base_model

    t_start = time.perf_counter()
    out = check_output_folder(args.out)      # before any work: an existing file, or the package
    if args.base is not None and not Path(args.base).is_dir():
        raise ValueError(f"--base {args.base} is not a folder; pass a model folder (config.json + "
                         "model.safetensors)")
    if args.device:
        backend.set_device(args.device)
    tok = ByteTokenizer()

    print("== 1. the base model")
    base = LlamaForCausalLM.from_pretrained(args.base) if args.base else load_base_model()
    base_dir = Path(args.base) if args.base else BASE_MODEL_DIR
    base_bytes = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    c = base.config
    print(f"   a byte-level Llama: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{base.num_parameters():,} parameters ({base_bytes / 2**20:.1f} MiB on disk), "
          f"pretrained on text only")

    train_set, test = make_instruction_dataset(2000, args.n_eval, seed=args.seed)
    shown = _pick_examples(test, args.show)
    print(f"\n== 2. before fine-tuning ({len(train_set)} training instructions, {len(test)} held out "
          f"with words/names/numbers never seen in training)")
    acc_before, answers_before = exact_match_accuracy(base, test, tok)
    t_eval = time.perf_counter()
    idx = [next(i for i, ex in enumerate(test) if ex is s) for s in shown]
    _show("   held-out instructions:", shown, [answers_before[i] for i in idx])
    print(f"   held-out exact-match accuracy: {acc_before:.1%}")

    print(f"\n== 3. LoRA: r={args.rank}, alpha={args.alpha:g} (scaling {args.alpha / args.rank:g}) "
          f"on {args.targets}")
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=_targets(args.targets),
                        base_model_name_or_path=str(base_dir))
    print(f"\n== 4. fine-tuning {args.steps} steps (batch {args.batch_size}, lr {args.lr:g}, "
          "prompt tokens masked out of the loss)")
    model, history = lora_finetune(base, config, train_set, tok, steps=args.steps, lr=args.lr,
                                   batch_size=args.batch_size, seed=args.seed,
                                   progress=not args.no_progress)
    t_train = time.perf_counter()
    model.print_trainable_parameters()
    first = np.mean([h["loss"] for h in history[:10]])
    last = np.mean([h["loss"] for h in history[-10:]])
    print(f"   loss {first:.3f} -> {last:.3f} (mean of the first / last 10 steps); "
          f"{t_train - t_eval:.0f} s, {(t_train - t_eval) / args.steps * 1e3:.0f} ms per step")

    print("\n== 5. after fine-tuning")
    acc_after, answers_after = exact_match_accuracy(model, test, tok)
    _show("   held-out instructions:", shown, [answers_before[i] for i in idx],
          [answers_after[i] for i in idx])
    print(f"   held-out exact-match accuracy: {acc_before:.1%} -> {acc_after:.1%}")
    fam = per_family_accuracy(test, answers_after)
    print("   by task: " + ", ".join(f"{k} {v:.0%}" for k, v in fam.items()))

    print("\n== 6. merging W = W0 + (alpha/r)·B·A")
    prompts = [encode_prompt(ex, tok) for ex in shown]
    n = min(len(p) for p in prompts)
    probe = np.array([p[:n] for p in prompts])                  # (examples, shortest prompt)
    # unmerged: the equation term by term, W0·x + (α/r)·B·(A·x), module by module (LoraLinear's
    # fused op may already use the merged weight for long inputs, which would make this check vacuous)
    with settings.reference():
        unmerged = model(probe).numpy()
    model.merge_adapter()
    merged = model(probe).numpy()
    model.unmerge_adapter()
    print(f"   max |logits merged - logits unmerged| = {np.abs(merged - unmerged).max():.2e} "
          f"(float32 rounding; logits are O({np.abs(unmerged).max():.0f}))")

    print("\n== 7. saving")
    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)
    size = adapter_size_bytes(adapter_dir)
    print(f"   adapter (PEFT format: adapter_config.json + adapter_model.safetensors) in {adapter_dir}: "
          f"{size / 1024:.1f} KiB, {size / max(base_bytes, 1):.1%} of the base checkpoint")
    if save_loss_plot(history, out / "loss_curve.png"):
        print(f"   loss curve: {out / 'loss_curve.png'}")
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s; outputs in {out.resolve()}. Load the "
          "adapter with "
          f"PeftModel.from_pretrained(load_base_model(), {str(adapter_dir)!r}), or merge it with "
          f"`minilora merge --adapter {adapter_dir} --out merged-model`.")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="minilora demo")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
