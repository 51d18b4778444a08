"""ByteTokenizer: UTF-8 bytes as tokens, plus three special tokens.

The simplest tokenizer that can represent any text: every UTF-8 byte is its own token (ids 0-255), so
there is no vocabulary file, no merge table and no unknown token. Llama's real tokenizer is a 32k-128k
piece SentencePiece/BPE model; bytes keep minilora's embedding and output layers tiny (259 rows) at the
price of longer sequences (one token per byte, so "hello" is 5 tokens). ByT5 (Xue et al., 2022,
"ByT5: Towards a token-free future with pre-trained byte-to-byte models") works the same way.

Special tokens sit above the bytes, with the ids LlamaConfig's defaults expect:

    256  <|bos|>         beginning of sequence (bos_id)
    257  <|endoftext|>   end of a document or of a response (eos_id); generation stops here
    258  <|pad|>         right padding in batches (pad_id); never trained on (label -100)

The method names follow Hugging Face tokenizers where they overlap (``encode``, ``decode``,
``batch_decode``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``vocab_size``).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .. import backend


class ByteTokenizer:
    """Text <-> token ids, one id per UTF-8 byte, plus ``<|bos|>``, ``<|endoftext|>`` and ``<|pad|>``.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé", add_eos=True)
    [104, 195, 169, 257]
    >>> tok.decode([104, 195, 169, 257])
    'hé'
    """

    n_bytes = 256
    bos_token, eos_token, pad_token = "<|bos|>", "<|endoftext|>", "<|pad|>"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259
    special_tokens = {bos_token: bos_id, eos_token: eos_id, pad_token: pad_id}

    # Hugging Face spellings of the same ids, so code written against transformers reads the same.
    bos_token_id, eos_token_id, pad_token_id = bos_id, eos_id, pad_id

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"ByteTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id})")

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _to_bytes(text: str | bytes) -> bytes:
        if isinstance(text, (bytes, bytearray, memoryview)):
            return bytes(text)
        if not isinstance(text, str):
            raise ValueError(f"can only encode str or bytes, got {type(text).__name__}; "
                             "pass the text itself (decode token ids with .decode)")
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a mis-decoded file
            raise ValueError(f"text has a lone surrogate {text[e.start]!r} at index {e.start} that UTF-8 "
                             "cannot encode; read the source with errors='replace' first") from None

    def encode_array(self, text: str | bytes, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Token ids as a 1-D NumPy int32 array (fast path for long texts: no Python list per byte)."""
        body = np.frombuffer(self._to_bytes(text), dtype=np.uint8)
        ids = np.empty(add_bos + body.size + add_eos, dtype=np.int32)
        ids[add_bos:add_bos + body.size] = body
        if add_bos:
            ids[0] = self.bos_id
        if add_eos:
            ids[-1] = self.eos_id
        return ids

    def encode(self, text: str | bytes, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (its UTF-8 bytes), optionally framed by ``<|bos|>`` / ``<|endoftext|>``.

        Special-token strings inside ``text`` are NOT parsed: "<|pad|>" encodes as its 7 bytes, so user
        text can never inject a control token.
        """
        ids = list(self._to_bytes(text))
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def __call__(self, text, add_bos: bool = False, add_eos: bool = False):
        """``tok("hi")`` -> ids; ``tok(["hi", "yo"])`` -> a list of id lists (like HF's batch call)."""
        if isinstance(text, (str, bytes, bytearray, memoryview)):
            return self.encode(text, add_bos=add_bos, add_eos=add_eos)
        return self.encode_batch(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(self, texts: Iterable[str | bytes], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    # ------------------------------------------------------------------ decoding
    def _as_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids) if isinstance(ids, (list, tuple)) else backend.to_numpy(ids)
        if arr.ndim != 1:
            raise ValueError(f"decode takes one sequence of ids, got shape {arr.shape}; "
                             "use batch_decode for a (B, T) batch")
        if arr.size == 0:
            return arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}; "
                             "pass e.g. logits.argmax(-1)")
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(arr[bad][0])} is outside the vocabulary [0, {self.vocab_size}); "
                             "was this produced by a model with a different vocab_size?")
        return arr.astype(np.int64, copy=False)

    def decode_bytes(self, ids: Sequence[int] | np.ndarray, skip_special: bool = True) -> bytes:
        """The raw bytes of ``ids``; special tokens dropped, or spelled out if ``skip_special=False``."""
        arr = self._as_ids(ids)
        special = arr >= self.n_bytes
        if skip_special or not special.any():
            return arr[~special].astype(np.uint8).tobytes()
        # Spell specials out: split the id stream at each special token (a loop over the few
        # special tokens, not over bytes), and insert its name between the byte runs.
        names = {i: s.encode() for s, i in self.special_tokens.items()}
        out, start = [], 0
        for pos in np.flatnonzero(special):
            out += [arr[start:pos].astype(np.uint8).tobytes(), names[int(arr[pos])]]
            start = pos + 1
        out.append(arr[start:].astype(np.uint8).tobytes())
        return b"".join(out)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = True) -> str:
        """Text of ``ids``. Broken UTF-8 (e.g. a model emitting half a character) becomes U+FFFD rather
        than raising. Decoding does not stop at ``<|endoftext|>``: cut the ids first if you need to."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def batch_decode(self, sequences, skip_special: bool = True) -> list[str]:
        """``decode`` for each row of a (B, T) array or each list in a list."""
        return [self.decode(s, skip_special=skip_special) for s in sequences]

    decode_batch = batch_decode

    def id_to_token(self, i: int) -> str:
        """A readable name for one id: the special token's string, or the byte as Python writes it."""
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        for s, j in self.special_tokens.items():
            if j == i:
                return s
        return repr(bytes([int(i)]))[2:-1]
