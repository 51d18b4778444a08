"""BPETokenizer: GPT-2's byte-level BPE from a GGUF file or a tokenizer.json, with chat templates.

Byte-pair encoding (Sennrich et al., 2016, "Neural Machine Translation of Rare Words with Subword
Units") learns a list of merges from a corpus: start from single symbols, and repeatedly glue the
most frequent adjacent pair into a new symbol. Encoding replays that list: the earlier a merge was
learned (its *rank*), the earlier it applies. GPT-2 (Radford et al., 2019, "Language Models are
Unsupervised Multitask Learners") made the symbols *bytes*, so any text encodes with no unknown
token, as long as the vocabulary keeps all 256 bytes (SmolLM2's lacks 21, see BPETokenizer).
SmolLM2, like most open models, uses GPT-2's scheme. Text becomes ids in four steps:

1. **added tokens**: control strings such as ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``
   written in the text are cut out first and become their own ids, as Hugging Face does (the
   longest one wins where two start at the same place); the pieces between go on to step 2.
2. **pre-tokenizer**: a regex cuts each piece into words, so merges never cross a word boundary.
   It is GPT-2's pattern (Hugging Face's ``ByteLevel`` pre-tokenizer)::

       's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

   a contraction, or letters / numbers / other symbols with at most one leading space, or
   whitespace (``\\s+(?!\\S)`` leaves a run's last space to the word after it). SmolLM2's own
   tokenizer.json first isolates every number character (``Digits(individual_digits=True)``, so
   ``2024`` is four words and arithmetic sees digits), and so does llama.cpp for the ``smollm``
   pre-tokenizer its GGUF names; ``split_digits`` says which of the two a tokenizer uses.
3. **bytes to symbols**: each word's UTF-8 bytes are spelled with ``bytes_to_unicode``, GPT-2's
   map of the 256 bytes to 256 printable characters (a space is ``Ġ``, a newline ``Ċ``), so that
   the vocabulary is a table of strings.
4. **merges**: ``bpe_merge`` finds the adjacent pair with the lowest rank, merges all its
   occurrences, and repeats until no adjacent pair has a rank; each resulting symbol is a token.

Decoding runs it backwards: ids -> token strings -> bytes (the inverse map) -> UTF-8, with broken
sequences (half a character) replaced by U+FFFD, as Hugging Face decodes.

**Cost.** ``bpe_merge`` on a word of n bytes does at most n - 1 rounds, each a scan of the
remaining symbols, so O(n^2) dictionary look-ups; words are short (a few bytes) and the scan is
plain Python, about 8 µs per word. Text repeats its words, so a per-word cache (the one speed
trick here: ``settings.BPE_CACHE_SIZE`` words, skipped in ``minilora.reference()``) answers most of
them with one look-up. On 200 KB of Python source with SmolLM2's vocabulary (46k tokens, medians
of a few runs on one core): 0.13M tokens/s without the cache, 0.50M from an empty cache, 0.98M
with a warm one; Hugging Face's Rust ``tokenizers`` (``Tokenizer.encode``, which also tracks
offsets) gave 0.62M. Both give the same tokens (tests/test_bpe.py compares them on a varied
corpus); the Rust BPE keeps a priority queue of pairs instead of rescanning.

``re`` has no ``\\p{L}`` / ``\\p{N}``, so the pattern is built with explicit character classes from
``unicodedata`` (Python's Unicode version, which may lag the Rust library's on characters assigned
in the newest Unicode releases), and ``\\s`` is the Unicode White_Space property, as in the
Oniguruma regex engine Hugging Face uses (Python's own ``\\s`` adds U+001C-U+001F).

Chat templates are rendered by ``minilora.data.chat_template`` (Jinja in a sandbox).
"""
from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Iterable

from .. import settings
from .chat_template import compile_chat_template, render_chat_template

# ------------------------------------------------------------------ bytes as printable characters


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to 256 printable characters.

    Bytes that are already printable and not a space (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``)
    stand for themselves; the other 68 (controls, space, DEL, ...) are moved, in byte order, to
    the characters from U+0100 on: byte 0 is ``Ā``, the space (byte 32) is ``Ġ``, ``\\n`` is ``Ċ``.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    mapping, moved = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + moved)
            moved += 1
    return mapping


@functools.lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of ``bytes_to_unicode``."""
    return {c: b for b, c in bytes_to_unicode().items()}


# ------------------------------------------------------------------ the pre-tokenizer

# Unicode's White_Space property: what ``\s`` means in the Oniguruma engine behind Hugging Face's
# regexes (Python's ``\s`` would add the separators U+001C-U+001F and change the splits there).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.lru_cache(maxsize=None)
def _letter_and_number_classes() -> tuple[str, str]:
    """Bodies of two regex character classes: every code point of Unicode category L* (``\\p{L}``)
    and N* (``\\p{N}``). One pass over the 1.1M code points (~0.3 s, once per process)."""
    ranges = {"L": [], "N": []}
    open_at = {"L": None, "N": None}
    for cp in range(sys.maxunicode + 2):
        major = unicodedata.category(chr(cp))[0] if cp <= sys.maxunicode else ""
        for cls in ("L", "N"):
            if major == cls and open_at[cls] is None:
                open_at[cls] = cp
            elif major != cls and open_at[cls] is not None:
                ranges[cls].append((open_at[cls], cp - 1))
                open_at[cls] = None

    def body(spans):
        return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in spans)

    return body(ranges["L"]), body(ranges["N"])


@functools.lru_cache(maxsize=None)
def gpt2_split_pattern() -> re.Pattern:
    """GPT-2's word pattern (the module docstring shows it with ``\\p{..}``) for Python's ``re``."""
    L, N = _letter_and_number_classes()
    S = _WHITESPACE
    return re.compile(f"'s|'t|'re|'ve|'m|'ll|'d"
                      f"| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+"   # letters, numbers, other symbols
                      f"|[{S}]+(?![^{S}])|[{S}]+")             # whitespace (\s+(?!\S)|\s+)


@functools.lru_cache(maxsize=None)
def _single_number_pattern() -> re.Pattern:
    """One number character (``\\p{N}``), captured, to isolate digits with ``re.split``."""
    return re.compile(f"([{_letter_and_number_classes()[1]}])")


def pre_tokenize(text: str, split_digits: bool = False) -> list[str]:
    """The words of ``text``: GPT-2's pattern, after isolating each number character first when
    ``split_digits`` (Hugging Face's ``Sequence[Digits(individual_digits=True), ByteLevel]``).

    >>> pre_tokenize("Hello world, it's 2024!")
    ['Hello', ' world', ',', ' it', "'s", ' 2024', '!']
    >>> pre_tokenize("it's 2024!", split_digits=True)
    ['it', "'s", ' ', '2', '0', '2', '4', '!']
    """
    if not split_digits:
        return gpt2_split_pattern().findall(text)
    words = []
    # re.split with a captured group alternates: a run without numbers, one number character, ...
    for i, part in enumerate(_single_number_pattern().split(text)):
        if i % 2:
            words.append(part)
        elif part:
            words.extend(gpt2_split_pattern().findall(part))
    return words


# ------------------------------------------------------------------ the merges


def bpe_merge(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The tokens of one word (spelled with ``bytes_to_unicode``) under the merge ``ranks``.

    Start from single characters; find the adjacent pair with the lowest rank; merge every
    occurrence of it, left to right; repeat until no adjacent pair has a rank.

    >>> ranks = {("l", "o"): 0, ("lo", "w"): 1, ("e", "r"): 2}
    >>> bpe_merge("lower", ranks)
    ['low', 'er']
    """
    symbols = list(word)
    while len(symbols) > 1:
        pairs = list(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break                       # no adjacent pair was ever merged: done
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


# ------------------------------------------------------------------ the tokenizer


class BPETokenizer:
    """Text <-> token ids with a byte-level BPE vocabulary (GPT-2's scheme, see the module doc).

    ``vocab`` maps token strings (spelled with ``bytes_to_unicode``) to ids; ``merges`` lists the
    merge pairs, best first; ``added_tokens`` maps strings recognised whole in the text (control
    tokens) to ids, and ``special_tokens`` names those of them that ``decode(...,
    skip_special_tokens=True)`` drops. ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``
    are token strings (or None); ``chat_template`` is the file's Jinja template (or None).

    A vocabulary may lack some byte symbols (SmolLM2's lacks 21: control bytes such as 0x04 and
    bytes that valid UTF-8 never or rarely uses, 0xC0, 0xF5-0xFF, ...). A word's byte with no
    token becomes ``missing_byte_id``, or, when that is None, is dropped: what Hugging Face's BPE
    does with and without an ``unk_token``, so such text does not survive a round trip.

    Method names follow Hugging Face's tokenizers (``encode``, ``decode``, ``batch_decode``,
    ``convert_ids_to_tokens``, ``apply_chat_template``, ``eos_token_id``, ...). ``vocab_size`` is
    one more than the largest id, added tokens included (Hugging Face's ``len(tokenizer)``).
    """

    def __init__(self, vocab: dict[str, int], merges: Iterable[tuple[str, str]],
                 added_tokens: dict[str, int] | None = None, special_tokens: Iterable[str] = (),
                 split_digits: bool = False, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, chat_template: str | None = None,
                 missing_byte_id: int | None = None):
        self.vocab = dict(vocab)
        self.missing_byte_id = missing_byte_id
        self.added_tokens = dict(added_tokens or {})
        self.special_tokens = set(special_tokens)
        self.split_digits = bool(split_digits)
        self.chat_template = chat_template
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, (a, b) in enumerate(merges):
            self.ranks.setdefault((a, b), rank)         # a repeated merge keeps its first rank
        self._check_tables()

        self.id_to_token_table = {i: t for t, i in self.vocab.items()}
        self.id_to_token_table.update({i: t for t, i in self.added_tokens.items()})
        self.vocab_size = max(self.id_to_token_table) + 1
        self._special_ids = {self.convert_tokens_to_ids(t) for t in self.special_tokens}
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token),
                            ("unk", unk_token)):
            if token is not None and self.convert_tokens_to_ids(token) is None:
                raise ValueError(f"{name}_token {token!r} is not in the vocabulary; pass one of its "
                                 "tokens or None")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token

        # Added tokens, longest first: at one position re's alternation takes the first branch
        # that matches, so this finds the leftmost, then longest, as Hugging Face's matcher does.
        by_length = sorted(self.added_tokens, key=len, reverse=True)
        self._added_pattern = (re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
                               if by_length else None)
        self._cache: dict[str, tuple[int, ...]] = {}

    def _check_tables(self) -> None:
        for (a, b), rank in self.ranks.items():
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise ValueError(f"merge {rank} ({a!r} {b!r}) uses or makes a token that is not in "
                                 "the vocabulary; the tokenizer file is inconsistent, re-download it")

    # ------------------------------------------------------------------ ids of special tokens
    def convert_tokens_to_ids(self, tokens):
        """The id of a token string (None if unknown), or a list of them for a list of strings."""
        if isinstance(tokens, str):
            return self.added_tokens.get(tokens, self.vocab.get(tokens))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.convert_tokens_to_ids(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.convert_tokens_to_ids(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.convert_tokens_to_ids(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self.convert_tokens_to_ids(self.unk_token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.ranks)}, "
                f"added_tokens={len(self.added_tokens)}, split_digits={self.split_digits}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r})")

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. No BOS/EOS is added; added tokens written in the text
        (``<|im_end|>``) become their ids, as with Hugging Face's ``encode(text,
        add_special_tokens=False)``."""
        if not isinstance(text, str):
            raise ValueError(f"can only encode str, got {type(text).__name__}; pass the text itself "
                             "(decode token ids with .decode)")
        ids: list[int] = []
        pieces = self._added_pattern.split(text) if self._added_pattern else [text]
        # re.split with a captured group alternates: plain text, an added token, plain text, ...
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.added_tokens[piece])
                continue
            for word in pre_tokenize(piece, self.split_digits):
                ids.extend(self._word_ids(word))
        return ids

    def __call__(self, text):
        """``tok("hi")`` -> ids; ``tok(["hi", "yo"])`` -> a list of id lists."""
        if isinstance(text, str):
            return self.encode(text)
        return [self.encode(t) for t in text]

    def _word_ids(self, word: str) -> tuple[int, ...]:
        if not settings.reference_mode():
            hit = self._cache.get(word)
            if hit is not None:
                return hit
        try:
            raw = word.encode("utf-8")
        except UnicodeEncodeError as e:   # a lone surrogate, e.g. from a mis-decoded file
            raise ValueError(f"text has a lone surrogate {word[e.start]!r} that UTF-8 cannot "
                             "encode; read the source with errors='replace' first") from None
        spelled = "".join(bytes_to_unicode()[b] for b in raw)
        # only single byte symbols can be missing from the vocabulary: every merge's parts and
        # result are in it (checked in __init__)
        ids = tuple(self.vocab[token] if token in self.vocab else self.missing_byte_id
                    for token in bpe_merge(spelled, self.ranks))
        if self.missing_byte_id is None:
            ids = tuple(i for i in ids if i is not None)
        # Like Hugging Face's BPE cache, a full cache keeps what it has and stores nothing more.
        if not settings.reference_mode() and len(self._cache) < settings.BPE_CACHE_SIZE:
            self._cache[word] = ids
        return ids

    # ------------------------------------------------------------------ decoding
    def convert_ids_to_tokens(self, ids):
        """The token string of an id, or a list of them for a list of ids (byte-level spelling:
        ``" world"`` is ``"Ġworld"``)."""
        if isinstance(ids, int) or hasattr(ids, "__index__"):
            return self._token_of(int(ids))
        return [self._token_of(int(i)) for i in ids]

    def _token_of(self, i: int) -> str:
        token = self.id_to_token_table.get(i)
        if token is None:
            raise ValueError(f"token id {i} is not in the vocabulary (ids 0..{self.vocab_size - 1}); "
                             "was it produced by a model with a different tokenizer?")
        return token

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``: each token's characters mapped back to bytes, the bytes read as
        UTF-8 with broken sequences replaced by U+FFFD (as Hugging Face decodes). Added tokens
        are written as they are; ``skip_special_tokens`` drops the special ones."""
        to_byte = unicode_to_bytes()
        out = bytearray()
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self._special_ids:
                continue
            token = self._token_of(i)
            if all(c in to_byte for c in token):
                out.extend(to_byte[c] for c in token)
            else:    # an added token spelled outside the byte alphabet: its own UTF-8
                out.extend(token.encode("utf-8"))
        return out.decode("utf-8", errors="replace")

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """``decode`` for each sequence."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages, add_generation_prompt: bool = False,
                            tokenize: bool = True):
        """The conversation laid out by the file's chat template (rendered in Jinja's sandbox,
        see ``minilora.data.chat_template``), as ids, or as text with ``tokenize=False``.
        ``add_generation_prompt`` ends it with the opening of the assistant's turn. The template
        sees ``messages``, ``add_generation_prompt`` and the special tokens (``bos_token``,
        ``eos_token``, ``pad_token``, ``unk_token``), as in transformers."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; load one from a chat model's "
                             "file (tokenizer.chat_template in a GGUF, chat_template in "
                             "tokenizer_config.json) or set tokenizer.chat_template")
        specials = {name: token for name, token in (
            ("bos_token", self.bos_token), ("eos_token", self.eos_token),
            ("pad_token", self.pad_token), ("unk_token", self.unk_token)) if token is not None}
        text = render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt, **specials)
        return self.encode(text) if tokenize else text

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path) -> "BPETokenizer":
        """The tokenizer of a ``.gguf`` file (its ``tokenizer.*`` metadata) or of a folder with
        Hugging Face's ``tokenizer.json`` (and, if present, ``tokenizer_config.json`` and
        ``chat_template.jinja`` for the special tokens and the chat template)."""
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            return _checked(_from_gguf, path, path)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            return _checked(_from_tokenizer_json, path, path / "tokenizer.json")
        if path.exists():
            raise TokenizerError(f"{path} is neither a .gguf file nor a folder with tokenizer.json; pass "
                             "one of those")
        raise FileNotFoundError(f"{path} does not exist; pass a .gguf file or a folder with "
                                "tokenizer.json")


# ------------------------------------------------------------------ readers
class TokenizerError(ValueError):
    """A tokenizer file (tokenizer.json and its companions, or a GGUF file's tokenizer.* metadata,
    chat template included) that cannot be loaded; one line names the file and what was expected."""


def _checked(read, path: Path, named: Path) -> "BPETokenizer":
    """``read(path)``, any failure on a damaged file (a missing key, a wrong type, a template that
    does not compile) raised as one ``TokenizerError`` naming ``named``."""
    try:
        tok = read(path)
        if isinstance(tok.chat_template, str):
            compile_chat_template(tok.chat_template)     # a broken template fails at load
        elif tok.chat_template is not None:
            raise TypeError(f"the chat template is a {type(tok.chat_template).__name__}; expected "
                            "a string")
        return tok
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError,
            OverflowError) as e:
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if str(named) in text or str(path) in text:    # the reader's own one-line refusal
            raise TokenizerError(text) from None
        raise TokenizerError(f"{named}: {type(e).__name__}: {text}; expected a byte-level BPE "
                             "tokenizer file as Hugging Face or llama.cpp writes it") from None



# llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) -> whether digits are isolated first.
# The groups are llama.cpp's: all use GPT-2's pattern; the first group splits off every ``\p{N}``
# character before it.
GGUF_PRE_TOKENIZERS = {
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), True),
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo", "jais"), False),
}

# ``tokenizer.ggml.token_type`` values (llama.cpp): the kinds recognised whole in the text.
_CONTROL, _USER_DEFINED = 3, 4


def _from_gguf(path: Path) -> BPETokenizer:
    from ..gguf import GGUFFile

    meta = GGUFFile(path).metadata

    def need(key):
        if key not in meta:
            raise ValueError(f"{path}: metadata key {key!r} is missing; the file has no byte-level "
                             "BPE tokenizer, use a GGUF converted with its tokenizer")
        return meta[key]

    model = need("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; BPETokenizer reads byte-level "
                         "BPE ('gpt2') only")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer BPETokenizer does "
                         f"not implement; it knows {', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
    tokens = need("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    # Control tokens are special (skipped by decode(skip_special_tokens=True)); user-defined ones
    # are matched whole but kept. A control token spelled outside the byte alphabet cannot be a
    # real token of this vocabulary (transformers skips those too).
    alphabet = set(bytes_to_unicode().values())
    special = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
    added = {t: vocab[t] for t, k in zip(tokens, types)
             if (k == _CONTROL and set(t) <= alphabet) or k == _USER_DEFINED}
    merges = [tuple(m.split(" ")) for m in need("tokenizer.ggml.merges")]

    def token_of(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return BPETokenizer(vocab, merges, added_tokens=added, special_tokens=special,
                        split_digits=GGUF_PRE_TOKENIZERS[pre], bos_token=token_of("bos_token_id"),
                        eos_token=token_of("eos_token_id"), pad_token=token_of("padding_token_id"),
                        unk_token=token_of("unknown_token_id"),
                        chat_template=meta.get("tokenizer.chat_template"))


def _from_tokenizer_json(folder: Path) -> BPETokenizer:
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges"):
        raise ValueError(f"{path}: model is {model.get('type')!r} (byte_fallback="
                         f"{model.get('byte_fallback')}, "
                         f"ignore_merges={model.get('ignore_merges')}); "
                         "BPETokenizer reads plain byte-level BPE only")
    if spec.get("normalizer") is not None:
        raise ValueError(f"{path}: has a normalizer ({spec['normalizer'].get('type')}); "
                         "BPETokenizer implements byte-level BPE without one")
    split_digits = _read_pre_tokenizer(spec.get("pre_tokenizer"), path)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    added, special = {}, []
    for entry in spec.get("added_tokens", []):
        if entry.get("lstrip") or entry.get("rstrip") or entry.get("single_word"):
            raise ValueError(f"{path}: added token {entry['content']!r} sets lstrip/rstrip/"
                             "single_word, which BPETokenizer does not implement")
        added[entry["content"]] = entry["id"]
        if entry.get("special"):
            special.append(entry["content"])

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

    def token(name):
        value = config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    template = config.get("chat_template")
    if isinstance(template, list):      # named templates: [{"name": "default", "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():       # transformers 5 writes it apart
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    unk = model.get("unk_token")
    missing = model["vocab"].get(unk, added.get(unk)) if unk is not None else None
    return BPETokenizer(model["vocab"], merges, added_tokens=added, special_tokens=special,
                        split_digits=split_digits, bos_token=token("bos_token"),
                        eos_token=token("eos_token"), pad_token=token("pad_token"),
                        unk_token=token("unk_token"), chat_template=template,
                        missing_byte_id=missing)


def _read_pre_tokenizer(pre, path: Path) -> bool:
    """Whether the tokenizer.json's pre-tokenizer isolates digits first; refuses any other kind."""
    def is_gpt2_byte_level(p):
        return (p.get("type") == "ByteLevel" and p.get("use_regex", True)
                and not p.get("add_prefix_space", False))

    if pre and is_gpt2_byte_level(pre):
        return False
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True}
            and is_gpt2_byte_level(steps[1])):
        return True
    raise ValueError(f"{path}: pre_tokenizer {json.dumps(pre)} is not one BPETokenizer implements; "
                     "it reads ByteLevel(add_prefix_space=false, use_regex=true), alone or after "
                     "Digits(individual_digits=true)")


__all__ = ["BPETokenizer", "TokenizerError", "GGUF_PRE_TOKENIZERS", "bpe_merge", "bytes_to_unicode",
           "gpt2_split_pattern", "pre_tokenize", "unicode_to_bytes"]
