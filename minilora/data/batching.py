"""Instruction examples -> padded batches of (input_ids, labels, attention_mask).

Supervised fine-tuning trains the model to produce the RESPONSE, not to reproduce the prompt: the
prompt tokens get label -100 (``cross_entropy``'s ``ignore_index``, as in PyTorch), so the loss and
every gradient come from the response and its closing ``<|endoftext|>`` only. This is what Alpaca's
training script does, and what Hugging Face's ``DataCollatorForCompletionOnlyLM`` automates.

Labels follow Hugging Face: ``labels`` is aligned with ``input_ids`` (same shape, same positions) and
the MODEL shifts by one internally, scoring the logits at position t against ``labels[t + 1]``.
So one example looks like this (P = prompt byte, R = response byte):

    input_ids       P  P  P  P  R  R  eos  pad  pad
    labels       -100 ... -100  R  R  eos -100 -100
    attention_mask  1  1  1  1  1  1   1    0    0

Padding is on the right (the causal mask already keeps real tokens from seeing it); padded positions
carry ``pad_id`` in input_ids, -100 in labels and 0 in the attention mask.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from .. import backend
from .instructions import format_prompt

IGNORE_INDEX = -100  # label of a position the loss skips (PyTorch's and Hugging Face's value)


def encode_prompt(example: dict, tokenizer) -> list[int]:
    """Token ids of the formatted prompt alone: what to feed ``generate`` at evaluation time."""
    return tokenizer.encode(format_prompt(example))


def encode_instruction(example: dict, tokenizer, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of one example as 1-D int64 NumPy arrays, unpadded: its formatted prompt
    and its output, as ``encode_prompt_and_response`` lays them out."""
    return encode_prompt_and_response(format_prompt(example), example["output"], tokenizer, max_len)


def encode_prompt_and_response(prompt: str, response: str, tokenizer,
                               max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of a prompt text and its response as 1-D int64 NumPy arrays, unpadded.

    input_ids = prompt + response + eos; labels = -100 on the prompt, the response + eos ids after it.
    Longer than ``max_len``: the prompt is cut from the LEFT (its start is dropped, the response is
    kept whole, since the response is what the model learns); a response + eos that alone exceeds
    ``max_len`` raises ValueError.
    """
    prompt = tokenizer.encode(prompt)
    response = tokenizer.encode(response, add_eos=True)
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if len(response) > max_len:
            raise ValueError(f"response of {len(response)} tokens (with eos) does not fit max_len={max_len}; "
                             "raise max_len or shorten the output")
        overflow = len(prompt) + len(response) - max_len
        if overflow > 0:
            prompt = prompt[overflow:]  # keep the end of the prompt, next to the response
    ids = np.asarray(prompt + response, dtype=np.int64)
    labels = ids.copy()
    labels[:len(prompt)] = IGNORE_INDEX
    return ids, labels


def collate(examples: Sequence[dict], tokenizer, max_len: int | None = None) -> dict:
    """A right-padded batch: {"input_ids", "labels", "attention_mask"}, each (B, T) int64 on the device.

    T is the longest (truncated) example in the batch, so short batches stay short.
    """
    if len(examples) == 0:
        raise ValueError("cannot collate an empty list of examples; pass at least one")
    return pad_batch([encode_instruction(ex, tokenizer, max_len) for ex in examples], tokenizer)


def pad_batch(encoded: Sequence[tuple[np.ndarray, np.ndarray]], tokenizer) -> dict:
    """Rows of (input_ids, labels) right-padded into {"input_ids", "labels", "attention_mask"}, each
    (B, T) int64 on the device, T the longest row: padding is ``tokenizer.pad_id`` with label -100
    and mask 0."""
    lengths = np.array([len(ids) for ids, _ in encoded])                  # (B,)
    B, T = len(encoded), int(lengths.max())
    input_ids = np.full((B, T), tokenizer.pad_id, dtype=np.int64)          # (B, T)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)                 # (B, T)
    for row, (ids, lab) in enumerate(encoded):  # one copy per example (not per token)
        input_ids[row, :len(ids)] = ids
        labels[row, :len(lab)] = lab
    attention_mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)  # (B, T)
    return {"input_ids": backend.to_device(input_ids), "labels": backend.to_device(labels),
            "attention_mask": backend.to_device(attention_mask)}


def iterate_batches(examples: Sequence[dict], tokenizer, batch_size: int,
                    rng: np.random.Generator | None = None, max_len: int | None = None,
                    shuffle: bool = True, drop_last: bool = False) -> Iterator[dict]:
    """One epoch of collated batches (the caller loops over epochs).

    ``rng`` (a NumPy Generator, default ``backend.rng()``) orders the examples when ``shuffle``;
    the last batch may be smaller unless ``drop_last``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(examples)
    if shuffle:
        order = (rng if rng is not None else backend.rng()).permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], tokenizer, max_len)
