"""Tokenizer and datasets: bytes as tokens, stdlib docstrings for pretraining, Alpaca-style instructions.

Everything here produces plain integer arrays (NumPy on the host, moved to the current device per
batch); nothing depends on the autograd engine.

- ``ByteTokenizer``: UTF-8 bytes + <|bos|>, <|endoftext|>, <|pad|> (vocab 259).
- ``BPETokenizer``: GPT-2's byte-level BPE read from a GGUF file or a tokenizer.json (SmolLM2's),
  with the file's chat template rendered in Jinja's sandbox (``render_chat_template``).
- ``pretraining_data`` / ``random_batches``: the standard library's docstrings as a token stream,
  optionally mixed with ``copy_drills`` (synthetic records that teach copying from the context).
- ``make_instruction_dataset`` / ``load_alpaca_json`` / ``format_prompt``: instruction data.
- ``collate`` / ``iterate_batches``: padded batches with the prompt masked out of the labels (-100).
- ``encode_chat`` / ``collate_chat`` / ``make_chat_dataset``: conversations with the loss on the
  assistant's turns only, and two generated chat tasks (a pirate persona, JSON extraction).
"""
from .bpe import BPETokenizer, TokenizerError
from .chat_template import ChatTemplateError, render_chat_template
from .batching import IGNORE_INDEX, collate, encode_instruction, encode_prompt, iterate_batches
from .chat_sft import (CHAT_TASKS, assistant_spans, chat_metric, collate_chat, encode_chat,
                       load_chat_jsonl, make_chat_dataset)
from .instructions import (NAMES, TASK_FAMILIES, WORDS, exact_match, format_prompt, load_alpaca_json,
                           load_instruction_dataset, make_instruction_dataset, save_alpaca_json,
                           task_family)
from .pretraining import (cache_dir, copy_drills, extract_docstrings, load_stdlib_corpus,
                          load_stdlib_docstrings, pretraining_data, random_batches, tokenize_documents)
from .tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer", "BPETokenizer", "TokenizerError", "ChatTemplateError", "render_chat_template",
    "IGNORE_INDEX", "collate", "encode_instruction", "encode_prompt", "iterate_batches",
    "CHAT_TASKS", "assistant_spans", "chat_metric", "collate_chat", "encode_chat", "load_chat_jsonl",
    "make_chat_dataset",
    "NAMES", "TASK_FAMILIES", "WORDS", "exact_match", "format_prompt", "load_alpaca_json",
    "load_instruction_dataset", "make_instruction_dataset", "save_alpaca_json", "task_family",
    "cache_dir", "copy_drills", "extract_docstrings", "load_stdlib_corpus", "load_stdlib_docstrings",
    "pretraining_data", "random_batches", "tokenize_documents",
]
