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
                     documents: list[str] | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, val_ids): host NumPy token streams for next-token pretraining.

    ``documents`` defaults to the standard library's docstrings (``load_stdlib_docstrings``); pass your
    own list of texts to pretrain on something else. Whole documents go to validation (a seeded draw of
    ``val_fraction`` of them), so no paragraph is split across the two; each keeps corpus order.
    The streams stay on the host (a few MB); ``random_batches`` moves only each batch to the device.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    docs = load_stdlib_docstrings(max_chars) if documents is None else _truncate(list(documents), max_chars)
    n_val = int(round(val_fraction * len(docs)))
    if val_fraction > 0 and (n_val == 0 or n_val == len(docs)):
        raise ValueError(f"{len(docs)} documents cannot be split with val_fraction={val_fraction}; "
                         "use more documents (larger max_chars) or val_fraction=0")
    is_val = np.zeros(len(docs), dtype=bool)
    is_val[np.random.default_rng(seed).choice(len(docs), size=n_val, replace=False)] = True
    train = tokenize_documents([d for d, v in zip(docs, is_val) if not v], tokenizer)
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
