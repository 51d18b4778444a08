"""Instruction data in the Alpaca format, and a small generated dataset a tiny model can learn.

Alpaca (Taori et al., 2023, "Stanford Alpaca: An Instruction-following LLaMA model") fine-tuned LLaMA
on 52k records of the form ``{"instruction": ..., "input": ..., "output": ...}``, shown to the model
through a fixed prompt template; Alpaca-LoRA repeated it with LoRA. This module provides that format:
``format_prompt`` (the template), ``load_alpaca_json`` / ``save_alpaca_json`` (any Alpaca-format file,
validated record by record), ``exact_match`` (the accuracy metric) and ``make_instruction_dataset``.

The generated dataset is sized for minilora's byte-level model (4 layers, width 128-256, pretrained for
a few CPU minutes): seven task families with short inputs and outputs of at most a dozen bytes, each a
rule the model can learn from a few hundred examples in a minute of LoRA training. The held-out test
set uses words, names and number pairs that never appear in training, so test accuracy measures the
rule, not memory. ``TASK_FAMILIES`` lists them; ``task_family(example)`` says which one a record is.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..fileio import write_text_atomic

# ---------------------------------------------------------------- the prompt template
# Alpaca's headers, without its preamble sentence ("Below is an instruction that describes a task...",
# ~30 tokens of BPE but ~190 of bytes): every byte is a token here, so the template is kept short.
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n### Response:\n"


def format_prompt(example: dict) -> str:
    """The text the model sees before its answer; the Input section is left out when input is empty.

    >>> format_prompt({"instruction": "Uppercase the word.", "input": "cat", "output": "CAT"})
    '### Instruction:\\nUppercase the word.\\n### Input:\\ncat\\n### Response:\\n'
    """
    if example.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


def exact_match(prediction: str, reference: str) -> bool:
    """True when the answer is right up to surrounding whitespace (the accuracy used in evaluation)."""
    return prediction.strip() == reference.strip()


# ---------------------------------------------------------------- reading and writing Alpaca files
_REQUIRED = ("instruction", "output")
_OPTIONAL = ("input",)


def _check_record(rec, where: str, i: int) -> dict:
    """One validated record, with ``input`` defaulting to "" (extra keys are kept as they are)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: record {i} is a JSON {type(rec).__name__}, expected an object with "
                         "string 'instruction' and 'output' (and optional 'input')")
    for key in _REQUIRED:
        if key not in rec:
            raise ValueError(f"{where}: record {i} has no {key!r} key; every record needs string "
                             "'instruction' and 'output' (and optional 'input')")
    for key in _REQUIRED + _OPTIONAL:
        if key in rec and not isinstance(rec[key], str):
            raise ValueError(f"{where}: record {i} field {key!r} is a {type(rec[key]).__name__} "
                             f"({rec[key]!r:.40}), expected a string; quote it in the file")
    return {"instruction": rec["instruction"], "input": rec.get("input", ""), "output": rec["output"],
            **{k: v for k, v in rec.items() if k not in _REQUIRED + _OPTIONAL}}


def _parse_json_lines(text: str, where: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}); "
                                 "a .jsonl file holds one JSON object per line") from None
    return records


def load_alpaca_json(path: str | os.PathLike) -> list[dict]:
    """Read an Alpaca-format file: a JSON list of {"instruction", "input"?, "output"} objects.

    Also reads JSON Lines (``.jsonl``, one object per line). Every record is checked, and a malformed
    file raises one ``ValueError`` naming the file, the record and what is wrong. Missing ``input``
    becomes "" (Alpaca's convention for instructions without input); extra keys are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction file {str(path)!r} does not exist; pass the path of an "
                                "Alpaca-format JSON file (a list of {instruction, input, output} objects)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8 JSON") from None
    if path.suffix == ".jsonl":
        records = _parse_json_lines(text, str(path))
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); an "
                             "Alpaca file is a JSON list of {instruction, input, output} objects") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: the top level is a JSON {type(records).__name__}, expected a list of "
                         "{instruction, input, output} objects")
    if not records:
        raise ValueError(f"{path}: the file holds no records; an instruction dataset needs at least one")
    return [_check_record(rec, str(path), i) for i, rec in enumerate(records)]


load_instruction_dataset = load_alpaca_json  # the name the article uses


def save_alpaca_json(examples: list[dict], path: str | os.PathLike) -> None:
    """Write ``examples`` as an Alpaca JSON list (UTF-8, indented), atomically: temp file + rename."""
    records = [_check_record(rec, "examples", i) for i, rec in enumerate(examples)]
    write_text_atomic(path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")


# ---------------------------------------------------------------- the generated dataset
# Common short English words, lowercase ASCII, 3-5 letters: the inputs of the word tasks.
WORDS = tuple("""
able acid aged also area army away baby back ball band bank base bath bear beat bell belt best bird
blue boat body bone book boot born both bowl bread brick bring brown cake call calm came camp card
care cart case cash cast chair cheap chest child city clay clean clock cloud coal coat code cold
cook cool corn cost crew crop crowd dark data date dawn deal dear deep desk dish door down draw
dream dress drink drop drum duck dust duty earth east easy edge egg farm fast fear feet file fill
film find fire fish flag flat floor flow food foot fork form fox free frog fruit full fund game
gate gift girl glad glass goal gold good grass green grey grow hair half hall hand hard hat head
heat help hero hill hold home hope horse hot hour house idea iron jump keep kind king knee lake
lamp land last late leaf left lemon light line lion list long lost loud love luck lunch map mark
meal milk mind moon mouse music name near neck nest news night nose note open over page paint
park path pen pick pink plan plant play pool quiet rain read rest rice ring river road rock roof
room rope rose round salt sand seed ship shoe shop sign silk sing size sky slow snow soft song
soup star stone sun table tall team tent tiger tool town toy train tree wall warm wash water wave
week wind wing whale wolf wood word yard year zero
""".split())

# Short first names for the persona task.
NAMES = tuple("""
Ada Adam Alan Alex Ali Amy Ann Anna Ben Bob Carl Cleo Dan Dora Ed Ella Emma Eva Finn Gus Hana Ian
Ida Ivan Jack Jade Jane Jill Jim Joe John Kate Kim Leo Lily Lisa Liz Luke Mae Mark Max Mia Nina Noah
Olga Omar Paul Pete Rosa Ruth Sam Sara Tara Ted Tom Uma Vic Walt Zoe Yuki
""".split())

MAX_ADDEND = 29                   # the addition task adds two numbers in 0..29 (answers 0..58)
TEST_FRACTION = 0.2               # share of words / names / number pairs held out for the test split


def _pairs():
    a, b = np.meshgrid(np.arange(MAX_ADDEND + 1), np.arange(MAX_ADDEND + 1), indexing="ij")
    return [f"{x}+{y}" for x, y in zip(a.ravel(), b.ravel())]


# family -> (instruction, input pool, answer function). A family whose instruction contains "{x}"
# puts the item in the instruction and leaves input empty (the template without an Input section).
TASK_FAMILIES = {
    "uppercase": ("Uppercase the word.", "words", str.upper),
    "reverse": ("Reverse the word.", "words", lambda w: w[::-1]),
    "repeat": ("Repeat the word twice.", "words", lambda w: f"{w} {w}"),
    "first_letter": ("Give the first letter.", "words", lambda w: w[0]),
    "length": ("Count the letters.", "words", lambda w: str(len(w))),
    "add": ("Add the numbers.", "pairs", lambda p: str(sum(map(int, p.split("+"))))),
    "pirate": ("Greet {x} like a pirate.", "names", lambda n: f"Ahoy, {n}!"),
}


def task_family(example: dict) -> str | None:
    """Which of ``TASK_FAMILIES`` produced ``example`` (None for a record from elsewhere)."""
    for family, (instruction, _, _) in TASK_FAMILIES.items():
        pattern = "^" + re.escape(instruction).replace(r"\{x\}", r"\S+") + "$"
        if re.match(pattern, example.get("instruction", "")):
            return family
    return None


def _split_pools(seed: int) -> tuple[dict, dict]:
    """(train pools, test pools): each pool's items split once, disjointly, by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for name, items in (("words", WORDS), ("names", NAMES), ("pairs", _pairs())):
        items = list(items)
        order = rng.permutation(len(items))
        n_test = max(1, int(round(TEST_FRACTION * len(items))))
        test[name] = [items[i] for i in order[:n_test]]
        train[name] = [items[i] for i in order[n_test:]]
    return train, test


def _draw(pool: list, n: int, rng: np.random.Generator) -> list:
    """``n`` items from ``pool``: without repeats until the pool is used up, then another shuffled pass."""
    if n == 0:
        return []
    passes = -(-n // len(pool))  # ceil
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(passes)])[:n]
    return [pool[i] for i in order]


def _examples(pools: dict, n: int, rng: np.random.Generator) -> list[dict]:
    families = list(TASK_FAMILIES)
    # n examples spread evenly over the families (the first n % F families get one more)
    counts = [n // len(families) + (i < n % len(families)) for i in range(len(families))]
    out = []
    for family, count in zip(families, counts):
        instruction, pool, answer = TASK_FAMILIES[family]
        for x in _draw(pools[pool], count, rng):
            if "{x}" in instruction:
                out.append({"instruction": instruction.format(x=x), "input": "", "output": answer(x)})
            else:
                out.append({"instruction": instruction, "input": x, "output": answer(x)})
    return [out[i] for i in rng.permutation(len(out))]


def make_instruction_dataset(n_train: int = 2000, n_test: int = 210,
                             seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) lists of Alpaca records from ``TASK_FAMILIES``, identical for the same arguments.

    The held-out split is by item: a fifth of the words, names and number pairs (chosen by ``seed``)
    appear only in test, so no test prompt was seen in training. Families are balanced in both splits,
    and the test set depends only on ``n_test`` and ``seed`` (not on ``n_train``).
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train} and {n_test}")
    train_pools, test_pools = _split_pools(seed)
    # separate streams, so the test set does not change with n_train
    return (_examples(train_pools, n_train, np.random.default_rng([seed, 1])),
            _examples(test_pools, n_test, np.random.default_rng([seed, 2])))
