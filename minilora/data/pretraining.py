"""A pretraining corpus built offline from the docstrings of Python's own standard library.

A base model has to learn "English" before LoRA can teach it to follow instructions, and that needs a
few megabytes of text that every machine already has, with no download. The standard library's
docstrings are exactly that: ~30k human-written paragraphs of technical English, present wherever
Python is. This module gathers them at run time with ``ast`` (no module is imported or executed):

    walk sysconfig's stdlib dir (sorted)  ->  parse each .py  ->  module/class/function docstrings
    ->  inspect.cleandoc (via ast.get_docstring)  ->  keep >= 40 chars, mostly ASCII  ->  dedupe

and caches the result as JSON under ``$MINILORA_CACHE`` (default ``~/.cache/minilora``), one file per
Python version, so the walk (a few seconds) happens once. ``pretraining_data`` turns the documents into
one long stream of byte tokens, each document followed by ``<|endoftext|>`` (GPT-2's convention), and
``random_batches`` cuts random windows out of it, the way nanoGPT and the original GPT papers pretrain.

Docstrings alone teach a small model English but not to *copy from its context*: a docstring rarely
repeats an unusual string, so nothing rewards attending back to an earlier token and predicting what
followed it. That skill is carried by "induction heads" (Olsson et al., 2022, "In-context learning and
induction heads": a head that finds the previous occurrence of the current token and copies the token
after it), and instruction following leans on it ("Repeat the word twice. / brick" -> "brick brick").
``copy_drills`` makes synthetic records in which made-up words come back later in the same record,
and ``pretraining_data(copy_fraction=...)`` mixes them into the training stream.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from .. import backend
from ..fileio import write_text_atomic
from .instructions import NAMES, TASK_FAMILIES, WORDS

MIN_DOC_CHARS = 40             # shorter docstrings ("Return x.") are mostly noise
MAX_NON_ASCII_FRACTION = 0.01  # skip docstrings that are more than 1% non-ASCII (unicode tables, ...)
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
                       "__pycache__", "turtledemo"})
_FORMAT_VERSION = 1            # bump when the extraction rules change, to invalidate old caches
DOC_SEPARATOR = "\n\n"         # how load_stdlib_corpus joins documents into one string

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def cache_dir() -> Path:
    """Where minilora caches what it builds: ``$MINILORA_CACHE`` or ``~/.cache/minilora``."""
    return Path(os.environ.get("MINILORA_CACHE") or Path.home() / ".cache" / "minilora")


def stdlib_dir() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _python_tag() -> str:
    return "py" + ".".join(map(str, sys.version_info[:3]))


def _keep(doc: str) -> bool:
    if len(doc) < MIN_DOC_CHARS:
        return False
    non_ascii = len(doc.encode("utf-8")) - len(doc)  # each non-ASCII char adds >= 1 extra byte
    return non_ascii <= MAX_NON_ASCII_FRACTION * len(doc)


def _clean(doc: str) -> str:
    # ast.get_docstring already ran inspect.cleandoc (tabs expanded, common indent removed, edges
    # stripped); here: no trailing spaces and no runs of blank lines.
    lines = [line.rstrip() for line in doc.splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def docstrings_of_source(source: bytes | str) -> list[str]:
    """The cleaned module, class and function docstrings of one Python source, in source order.

    Returns [] for a file that does not parse (the stdlib ships a few deliberately broken ones).
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes / bad encoding cookie
        return []
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, _DOC_NODES)),
                   key=lambda n: getattr(n, "lineno", 0))
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            docs.append(_clean(doc))
    return docs


def extract_docstrings(root: str | os.PathLike | None = None) -> list[str]:
    """All kept docstrings under ``root`` (default: the stdlib), deduplicated, in sorted-path order.

    Directories named in ``SKIP_DIRS`` and files named ``test_*.py`` are skipped, so the corpus is
    the library's documentation, not its test fixtures. Deterministic for a given Python install.
    """
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} does not exist; "
                                "pass root= a folder of .py files")
    seen: set[str] = set()
    docs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)  # prune and fix the order
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            try:
                source = (Path(dirpath) / name).read_bytes()
            except OSError:
                continue
            for doc in docstrings_of_source(source):
                if _keep(doc) and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs


def _truncate(docs: list[str], max_chars: int | None) -> list[str]:
    """The leading documents holding at most ``max_chars`` characters (the last one cut to fit)."""
    if max_chars is None:
        return docs
    if max_chars <= 0:
        raise ValueError(f"max_chars must be a positive number of characters, got {max_chars}")
    out, used = [], 0
    for doc in docs:
        if used + len(doc) >= max_chars:
            out.append(doc[:max_chars - used])
            break
        out.append(doc)
        used += len(doc)
    return out


def load_stdlib_docstrings(max_chars: int | None = None, cache: str | os.PathLike | None = None,
                           refresh: bool = False) -> list[str]:
    """The standard library's docstrings as a list of documents, built once and cached.

    ``cache`` is the cache folder (default ``cache_dir()``); the file is named after the Python
    version, because another interpreter has other docstrings. A missing, stale or unreadable cache is
    rebuilt; an unwritable cache folder only costs the rebuild next time.
    """
    path = Path(cache or cache_dir()) / f"stdlib_docstrings_{_python_tag()}_v{_FORMAT_VERSION}.json"
    docs = None
    if path.is_file() and not refresh:
        try:
            with open(path, encoding="utf-8") as f:
                blob = json.load(f)
            if blob.get("stdlib") == str(stdlib_dir()):
                docs = blob["docs"]
        except (OSError, ValueError, KeyError, AttributeError):
            docs = None  # a corrupt cache is just rebuilt
    if docs is None:
        docs = extract_docstrings()
        try:
            blob = {"python": sys.version, "stdlib": str(stdlib_dir()), "format": _FORMAT_VERSION,
                    "docs": docs}
            write_text_atomic(path, json.dumps(blob, ensure_ascii=False))
        except OSError:
            pass  # read-only home, full disk: work without the cache
    return _truncate(docs, max_chars)


def load_stdlib_corpus(max_chars: int | None = None) -> str:
    """The standard library's docstrings as one string, documents separated by a blank line."""
    return DOC_SEPARATOR.join(load_stdlib_docstrings(max_chars))[:max_chars]


# ---------------------------------------------------------------- copy drills
# Pseudo-words are random lowercase letters, so they mean nothing and the only way to predict a later
# copy is to find the earlier one. The letters are drawn uniformly from all 26, not as pronounceable
# consonant-vowel syllables: then one byte of context usually pins down where to copy from (in
# "kerimup" style words each of the 5 vowels recurs), the cleanest signal for an induction head.
_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
_MIN_WORD_BYTES, _MAX_WORD_BYTES = 3, 8
# Every word and name of the instruction data (train and held-out) and every word of its instructions,
# lowercase: no pseudo-word spells one ("cake", "kate", "give"...), so pretraining shows none of the
# instruction set's inputs in a copy setting.
FORBIDDEN_DRILL_WORDS = frozenset(WORDS) | frozenset(n.lower() for n in NAMES) | frozenset(
    w.lower() for instruction, _, _ in TASK_FAMILIES.values()
    for w in instruction.replace("{x}", " ").rstrip(".").split())


# Generic copying, in two shapes. Most records say a span of 1-4 pseudo-words over and over until the
# record is longer than a training window (128 bytes), so every window cut from one is all copying:
# that density is what made induction heads form within a 1500-step pretraining in our runs (spans
# said only 2-6 times, ~60-byte records, taught no copying at all, even at half the training bytes).
# The rest are docstring-like sentences that name the same made-up identifiers twice (some as
# key-value pairs looked up later: A B ... A -> B, the pattern induction heads complete).
# None of the instruction families (reversal, uppercasing, counting, arithmetic, greetings) and no
# "### Instruction" header appear: LoRA still has those to teach. The sentences' own English words
# avoid the instruction data's words too ("read", "open", "name", "first"...; only "the" and "a" are
# shared), and none starts like a typical docstring ("The ...", "Return ..."), so prompting the model
# with one still gets docstring prose.
SEPARATORS = (" | ", "\n", " -> ", "; ")
SENTENCE_TEMPLATES = (
    "{8} returns the {0} of the {1}; the {0} is cached on the {1}.",
    "{6} calls {7}, then {7} calls {6} in turn.",
    "{0} is set to {1}; reading {0} later gives {1}.",
    "{6} may be None; then {1} is used instead of {6}.",
    "Module {0} wraps {1}: use {0}.{1}() to create a {2}.",
    "{6} and {7} share a {0}. Only {7} may close the {0}.",
    "Keys: {0}={1}, {2}={3}, {4}={5}. Look up {2}: {3}.",
    'Label "{6}" is printed as "{6}".',
    "{0}: {1}\n{2}: {3}\n{4}: {5}\n{2}: {3}",
    "See {0}.{1} and {0}.{2}; {0}.{1} is the default.",
    "{6} wrote to {7}, and {7} replied to {6}.",
    "Arguments:\n{0} -- the {1} to parse\n{2} -- where {0} is written",
)
REPEAT_SHARE = 0.75   # share of the records that repeat a span; the rest are sentences
REPEAT_BYTES = 128    # a span is repeated until its record is longer than this (one training window)
_SLOTS = 6  # words per record; sentence fields {0}..{5} are the words, {6}..{11} the same capitalised


def pseudo_words(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` made-up lowercase words (a NumPy str array) of 3-8 random letters, e.g. "qzvk", "mibtaw".

    Strings that happen to spell a word or name of the instruction data (``FORBIDDEN_DRILL_WORDS``:
    "cake", "kate", "give"...) are redrawn, so the chance that a drill contains one is zero, not just
    small (about 1 word in 2,300 otherwise, nearly all of them 3-letter ones: "egg", "fox", "tom").
    """
    if n < 0:
        raise ValueError(f"n must be >= 0 pseudo-words, got {n}")
    out = np.empty(n, dtype=f"<U{_MAX_WORD_BYTES}")
    todo = np.arange(n)
    forbidden = np.array(sorted(FORBIDDEN_DRILL_WORDS))
    while todo.size:  # rarely more than two rounds; the loop is over rounds, not words
        m = todo.size
        length = rng.integers(_MIN_WORD_BYTES, _MAX_WORD_BYTES + 1, size=m)            # (m,)
        chars = rng.choice(_LETTERS, size=(m, _MAX_WORD_BYTES))                         # (m, 8)
        chars[np.arange(_MAX_WORD_BYTES)[None, :] >= length[:, None]] = 0               # 0 = end
        # (m, 8) bytes -> m fixed-width byte strings (trailing NULs drop) -> str
        words = np.char.decode(chars.view(f"S{_MAX_WORD_BYTES}").ravel(), "ascii")
        out[todo] = words
        todo = todo[np.isin(words, forbidden)]
    return out


def copy_drills(n: int, seed: int | np.random.Generator = 0) -> list[str]:
    """``n`` synthetic records in which made-up words are repeated later in the same record.

    The pretraining signal for induction heads (Olsson et al., 2022): to predict the second "qzvk" in
    ``"mib qzvk | mib qzvk | ..."`` or in ``"qzvk is set to mib; reading qzvk later gives mib."`` the
    model has to find the earlier occurrence and copy what followed it. The words are ``pseudo_words``
    (never a word of the instruction data), so the drills teach copying in general and nothing about
    the instruction tasks. ``REPEAT_SHARE`` of the records repeat a span of 1-4 words, joined by one
    of ``SEPARATORS``, until the record is longer than ``REPEAT_BYTES`` (129-200 bytes); the others
    are docstring-like sentences from ``SENTENCE_TEMPLATES`` (30-110 bytes). ASCII only; the same
    ``seed`` (an int or a NumPy Generator, which is advanced) gives the same records.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0 records, got {n}")
    rng = np.random.default_rng(seed) if not isinstance(seed, np.random.Generator) else seed
    words = pseudo_words(n * _SLOTS, rng).reshape(n, _SLOTS)                          # (n, 6)
    fields = np.concatenate([words, np.char.capitalize(words)], axis=1).tolist()    # (n, 12)
    repeat = (rng.random(n) < REPEAT_SHARE).tolist()
    span_words = rng.integers(1, 5, size=n).tolist()
    sep = rng.integers(0, len(SEPARATORS), size=n).tolist()
    template = rng.integers(0, len(SENTENCE_TEMPLATES), size=n).tolist()
    out = []
    for i in range(n):  # per record, not per byte: ~12k records for a 1.5 MB mix, ~0.2 s
        if repeat[i]:
            span, s = " ".join(fields[i][:span_words[i]]), SEPARATORS[sep[i]]
            out.append(s.join([span] * (REPEAT_BYTES // (len(span) + len(s)) + 2)))
        else:  # str.format ignores the fields a template does not use
            out.append(SENTENCE_TEMPLATES[template[i]].format(*fields[i]))
    return out


def _drills_for_bytes(n_bytes: int, rng: np.random.Generator) -> list[str]:
    """Copy drills holding ``n_bytes`` bytes including one <|endoftext|> each (to within a record)."""
    drills: list[str] = []
    have = 0
    while have < n_bytes:
        batch = copy_drills(max(16, int(1.2 * (n_bytes - have) / 130)), rng)  # ~130 bytes a record
        ends = have + np.cumsum([len(d) + 1 for d in batch])                  # bytes after each
        take = int(np.searchsorted(ends, n_bytes)) + 1                        # first that reaches it
        drills += batch[:take]
        have = int(ends[min(take, len(batch)) - 1])
    return drills


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def tokenize_documents(documents, tokenizer) -> np.ndarray:
    """One token stream: each document's ids followed by ``eos_id`` (uint16 when the vocab allows)."""
    encode = getattr(tokenizer, "encode_array", None)
    parts = [encode(d, add_eos=True) if encode else np.asarray(tokenizer.encode(d, add_eos=True))
             for d in documents]
    if not parts:
        raise ValueError("no documents to tokenize; pass at least one non-empty text")
    return np.concatenate(parts).astype(_token_dtype(tokenizer.vocab_size))


def pretraining_data(tokenizer, val_fraction: float = 0.05, max_chars: int | None = None,
                     documents: list[str] | None = None, seed: int = 0,
                     copy_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, val_ids): host NumPy token streams for next-token pretraining.

    ``documents`` defaults to the standard library's docstrings (``load_stdlib_docstrings``); pass your
    own list of texts to pretrain on something else. Whole documents go to validation (a seeded draw of
    ``val_fraction`` of them), so no paragraph is split across the two; each keeps corpus order.
    ``copy_fraction`` > 0 mixes ``copy_drills`` into the TRAINING stream until they make up that share
    of its bytes (to within one record), each drill inserted between two documents at a seeded random
    place; the documents keep their order. Validation stays documents only, identical for every
    ``copy_fraction``, so validation losses remain comparable across mixes.
    The streams stay on the host (a few MB); ``random_batches`` moves only each batch to the device.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= copy_fraction < 1.0:
        raise ValueError(f"copy_fraction must be in [0, 1) (the share of training bytes that are copy "
                         f"drills), got {copy_fraction}")
    docs = load_stdlib_docstrings(max_chars) if documents is None else _truncate(list(documents), max_chars)
    n_val = int(round(val_fraction * len(docs)))
    if val_fraction > 0 and (n_val == 0 or n_val == len(docs)):
        raise ValueError(f"{len(docs)} documents cannot be split with val_fraction={val_fraction}; "
                         "use more documents (larger max_chars) or val_fraction=0")
    is_val = np.zeros(len(docs), dtype=bool)
    is_val[np.random.default_rng(seed).choice(len(docs), size=n_val, replace=False)] = True
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    train = tokenize_documents(train_docs, tokenizer)
    if copy_fraction > 0:
        rng = np.random.default_rng([seed, 1])  # its own stream: the split above does not change
        # drills / (docs + drills) = f  <=>  drills = f / (1 - f) * docs
        drills = _drills_for_bytes(int(round(copy_fraction / (1 - copy_fraction) * len(train))), rng)
        # drill i goes just before document slot[i]: sort keys i for the documents and slot - 0.5 for
        # the drills; a stable sort interleaves them and keeps each list's own order
        slot = np.sort(rng.integers(0, len(train_docs) + 1, size=len(drills)))
        key = np.concatenate([np.arange(len(train_docs)), slot - 0.5])
        texts = train_docs + drills
        train = tokenize_documents([texts[i] for i in np.argsort(key, kind="stable")], tokenizer)
    val = (tokenize_documents([d for d, v in zip(docs, is_val) if v], tokenizer) if n_val
           else np.zeros(0, dtype=train.dtype))
    return train, val


def random_batches(ids: np.ndarray, batch_size: int, block_size: int,
                   rng: np.random.Generator | None = None):
    """One batch of ``batch_size`` random windows of ``block_size`` tokens: (input_ids, labels).

    Both are int64 arrays of shape (B, T) on the current device, and ``labels`` is a copy of
    ``input_ids``: Hugging Face's convention, where the MODEL shifts by one internally (logits at
    position t are scored against labels[t + 1]). So the window needs only T tokens, not T + 1.
    ``rng`` is a NumPy Generator (default ``backend.rng()``), so a seed fixes the batches.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    n = len(ids)
    if n < block_size:
        raise ValueError(f"token stream has {n} tokens, fewer than block_size={block_size}; "
                         "use a shorter block_size or more text")
    rng = rng if rng is not None else backend.rng()
    starts = rng.integers(0, n - block_size + 1, size=batch_size)     # (B,)
    index = starts[:, None] + np.arange(block_size)[None, :]            # (B, T) positions to gather
    x = np.asarray(ids)[index].astype(np.int64)                         # (B, T)
    return backend.to_device(x), backend.to_device(x.copy())
