"""Preference pairs for DPO, generated offline from the instruction tasks: (prompt, chosen, rejected).

Direct Preference Optimization (Rafailov et al. 2023) learns from pairs of answers to one prompt, one
preferred ("chosen") and one not ("rejected"), in the record layout of TRL's DPOTrainer:
``{"prompt", "chosen", "rejected"}``. Human raters usually make those pairs; here the tasks of
``data/instructions.py`` (the ones ``minilora demo`` fine-tunes the shipped tiny base on) make them:
the chosen answer is the task's correct output, the rejected one a plausible wrong answer of the same
task family (the word left as it was, a letter off, a sum off by one, ...), so that telling them
apart needs the task's rule, not the answer's form.

``make_preference_dataset`` returns seeded (train, held-out) lists, split by item as
``make_instruction_dataset`` splits them: no word, name or number pair of the held-out split appears in
training. ``collate_preferences`` turns a list of pairs into one batch, chosen rows first and rejected
rows after them (TRL's "concatenated forward": one model call scores both halves).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .batching import encode_prompt_and_response, pad_batch
from .instructions import format_prompt, make_instruction_dataset, task_family


def _off_by_one(number: str, rng: np.random.Generator) -> str:
    """A count or sum one away from ``number`` (one more when the number is 0)."""
    n = int(number)
    return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)


def _other_letter(word: str, rng: np.random.Generator) -> str:
    """A letter of ``word`` that is not its first (the last one when it differs), else a neighbour."""
    others = [ch for ch in word[1:] if ch != word[0]]
    if others:
        return others[int(rng.integers(len(others)))]
    return chr(ord("a") + (ord(word[0]) - ord("a") + 1) % 26)


# family -> functions (item, correct output, rng) -> a wrong output; one is picked per pair. Each
# makes a mistake a learner of that task would plausibly make, and never the correct output.
WRONG_ANSWERS = {
    "uppercase": (lambda x, out, rng: x,                      # left lowercase
                  lambda x, out, rng: x.capitalize()),        # only the first letter
    "reverse": (lambda x, out, rng: x,                        # not reversed
                lambda x, out, rng: out[1:] + out[0]),        # reversed, then rotated by one
    "repeat": (lambda x, out, rng: x,                         # once
               lambda x, out, rng: f"{x} {x} {x}"),           # three times
    "first_letter": (lambda x, out, rng: _other_letter(x, rng),
                     lambda x, out, rng: x[-1] if x[-1] != x[0] else _other_letter(x, rng)),
    "length": (lambda x, out, rng: _off_by_one(out, rng),),
    "add": (lambda x, out, rng: _off_by_one(out, rng),),
    "pirate": (lambda x, out, rng: f"Hello, {x}!",            # greeted, not like a pirate
               lambda x, out, rng: "Ahoy!"),                  # the name left out
}


def _item(example: dict) -> str:
    """The word, name or number pair the example is about (the input, or the name in the prompt)."""
    if example["input"]:
        return example["input"]
    return example["instruction"].split()[1]                  # "Greet {x} like a pirate."


def rejected_answer(example: dict, rng: np.random.Generator) -> str:
    """A plausible wrong output for an example of ``TASK_FAMILIES`` (``WRONG_ANSWERS`` of its family),
    different from the correct one."""
    family = task_family(example)
    if family not in WRONG_ANSWERS:
        raise ValueError(f"example {example['instruction']!r} is not from a known task family; "
                         f"preference pairs are made for {sorted(WRONG_ANSWERS)}")
    choices = WRONG_ANSWERS[family]
    wrong = choices[int(rng.integers(len(choices)))](_item(example), example["output"], rng)
    if wrong == example["output"]:     # e.g. an uppercase word already upper: fall back to the first
        wrong = choices[0](_item(example), example["output"], rng)
    if wrong == example["output"]:
        raise ValueError(f"no wrong answer differs from {example['output']!r} for "
                         f"{example['instruction']!r}; add a choice to WRONG_ANSWERS[{family!r}]")
    return wrong


def preference_pair(example: dict, rng: np.random.Generator) -> dict:
    """{"prompt", "chosen", "rejected"} (TRL's layout) for one Alpaca record of ``TASK_FAMILIES``:
    the prompt is ``format_prompt``'s text, chosen the record's output."""
    return {"prompt": format_prompt(example), "chosen": example["output"],
            "rejected": rejected_answer(example, rng)}


def make_preference_dataset(n_train: int = 700, n_test: int = 140,
                            seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) lists of preference pairs, identical for the same arguments.

    The prompts and correct answers are ``make_instruction_dataset(n_train, n_test, seed)``'s (so the
    held-out pairs use words, names and number pairs that no training pair uses, and the families are
    balanced); the rejected answers are drawn by a generator seeded with ``seed``.
    """
    train, test = make_instruction_dataset(n_train, n_test, seed=seed)
    return ([preference_pair(ex, np.random.default_rng([seed, 3, i])) for i, ex in enumerate(train)],
            [preference_pair(ex, np.random.default_rng([seed, 4, i])) for i, ex in enumerate(test)])


def collate_preferences(pairs: Sequence[dict], tokenizer, max_len: int | None = None) -> dict:
    """One right-padded batch of 2·B rows: the B chosen answers, then the B rejected ones, each after
    its prompt; row i and row B + i share a prompt.

    {"input_ids", "labels", "attention_mask"}, each (2B, T) int64 on the device, laid out as
    ``data.collate`` lays out instruction data: labels are -100 on the prompt and the padding, so a
    row's label tokens are its answer and the closing <|endoftext|>. Longer than ``max_len``: the
    prompt is cut from the left, as ``data.encode_instruction`` cuts it.
    """
    if len(pairs) == 0:
        raise ValueError("cannot collate an empty list of preference pairs; pass at least one")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in pairs[0]]
    if missing:
        raise ValueError(f"a preference pair needs 'prompt', 'chosen' and 'rejected'; the first has no "
                         f"{missing}")
    rows = [encode_prompt_and_response(p["prompt"], p[answer], tokenizer, max_len)
            for answer in ("chosen", "rejected") for p in pairs]          # 2B rows: chosen, then rejected
    return pad_batch(rows, tokenizer)


__all__ = ["WRONG_ANSWERS", "collate_preferences", "make_preference_dataset", "preference_pair",
           "rejected_answer"]
