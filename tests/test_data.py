"""minilora.data: the byte tokenizer, the stdlib pretraining corpus, instruction data and batching."""
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.data import (IGNORE_INDEX, NAMES, TASK_FAMILIES, WORDS, ByteTokenizer, collate,
                           copy_drills, encode_instruction, encode_prompt, exact_match, format_prompt,
                           iterate_batches, load_alpaca_json, load_stdlib_corpus,
                           make_instruction_dataset, pretraining_data, random_batches,
                           save_alpaca_json, task_family)
from minilora.data import pretraining

tok = ByteTokenizer()
few = settings(max_examples=200, deadline=None, derandomize=True)


# ---------------------------------------------------------------- tokenizer
@few
@given(st.text())
def test_text_round_trip(text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids


@few
@given(st.binary())
def test_bytes_round_trip(data):
    ids = tok.encode(data, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode_bytes(ids) == data
    assert tok.encode_array(data, add_bos=True, add_eos=True).tolist() == ids


def test_special_tokens():
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, len(tok)) == (256, 257, 258, 259, 259)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    ids = [tok.bos_id, *b"hi", tok.eos_id, *b"!", tok.pad_id]
    assert tok.decode(ids) == "hi!"  # specials dropped; decoding does not stop at eos
    assert tok.decode(ids, skip_special=False) == "<|bos|>hi<|endoftext|>!<|pad|>"
    assert tok.encode("<|pad|>") == list(b"<|pad|>")  # special names in text are plain bytes
    assert tok.id_to_token(257) == "<|endoftext|>" and tok.id_to_token(10) == "\\n"


def test_decode_accepts_arrays_and_batches():
    ids = np.array([[104, 105, 257], [111, 107, 258]], dtype=np.int64)
    assert tok.batch_decode(ids) == ["hi", "ok"]
    assert tok(["hi", "ok"]) == [[104, 105], [111, 107]]
    assert tok.decode(np.array([], dtype=np.int64)) == "" and tok.decode([]) == ""
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode(ids)


def test_broken_utf8_and_bad_input():
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # half a character: replaced, not raised
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([259])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match="str or bytes"):
        tok.encode(42)


# ---------------------------------------------------------------- pretraining corpus
def test_docstrings_of_source_order_and_cleaning():
    src = b'''"""Module doc."""
class A:
    """Class doc,
        indented\tline.   


    after blank lines."""
    def f(self):
        """Method doc."""
def g(): pass
'''
    assert pretraining.docstrings_of_source(src) == [
        "Module doc.", "Class doc,\n    indented        line.\n\nafter blank lines.", "Method doc."]
    assert pretraining.docstrings_of_source(b"def (:") == []  # unparseable: skipped


def test_extract_docstrings_rules(tmp_path):
    long = "A docstring long enough to be kept in the corpus, {}."
    (tmp_path / "b.py").write_text(f'"""{long.format("b")}"""\n')
    (tmp_path / "a.py").write_text(f'"""{long.format("a")}"""\ndef f():\n    """Too short."""\n'
                                   f'def g():\n    """{long.format("b")}"""\n')  # duplicate of b.py's
    (tmp_path / "c.py").write_text(f'"""{long.format("ααααα")}"""\n', encoding="utf-8")  # non-ASCII
    (tmp_path / "test_x.py").write_text(f'"""{long.format("test file")}"""\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "d.py").write_text(f'"""{long.format("test dir")}"""\n')
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "e.py").write_text(f'"""{long.format("pkg")}"""\n')
    assert pretraining.extract_docstrings(tmp_path) == [long.format(x) for x in ("a", "b", "pkg")]


def test_cache_written_then_reused(tmp_path, monkeypatch):
    docs = ["first document " * 5, "second document " * 5]
    monkeypatch.setattr(pretraining, "extract_docstrings", lambda: list(docs))
    assert pretraining.load_stdlib_docstrings(cache=tmp_path) == docs
    (path,) = tmp_path.glob("stdlib_docstrings_py*.json")
    assert json.loads(path.read_text())["docs"] == docs
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file

    def fail():
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(pretraining, "extract_docstrings", fail)
    assert pretraining.load_stdlib_docstrings(max_chars=80, cache=tmp_path) == [docs[0], docs[1][:5]]
    path.write_text("{not json")  # a corrupt cache is rebuilt, not an error
    monkeypatch.setattr(pretraining, "extract_docstrings", lambda: list(docs))
    assert pretraining.load_stdlib_docstrings(cache=tmp_path) == docs


def test_stdlib_corpus_is_real_english():
    text = load_stdlib_corpus()  # first call builds the cache (~3 s), later calls read it
    assert len(text) > 1_000_000
    letters = np.frombuffer(text.encode("utf-8"), np.uint8)
    is_letter_or_space = ((letters | 0x20) >= ord("a")) & ((letters | 0x20) <= ord("z")) | (letters == 32)
    assert is_letter_or_space.mean() > 0.75
    assert "Return" in text and len(load_stdlib_corpus(max_chars=1000)) == 1000


def test_pretraining_data_documents_and_split():
    docs = [f"document number {i} " * 3 for i in range(40)]
    train, val = pretraining_data(tok, val_fraction=0.1, documents=docs, seed=3)
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert (train == tok.eos_id).sum() == 36 and (val == tok.eos_id).sum() == 4
    assert train[-1] == tok.eos_id and val[-1] == tok.eos_id
    train_docs = tok.decode_bytes(train, skip_special=False).decode().split("<|endoftext|>")[:-1]
    val_docs = tok.decode_bytes(val, skip_special=False).decode().split("<|endoftext|>")[:-1]
    assert sorted(train_docs + val_docs) == sorted(docs)  # every doc once, none split
    again = pretraining_data(tok, val_fraction=0.1, documents=docs, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    with pytest.raises(ValueError, match="val_fraction"):
        pretraining_data(tok, val_fraction=1.0, documents=docs)


def test_random_batches():
    ids = np.arange(1000, dtype=np.uint16) % 259
    x, y = random_batches(ids, 4, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x, y)  # HF convention: the model shifts labels itself
    assert np.all(np.diff(x, axis=1) % 259 == 1)  # each row is a contiguous window of the stream
    x2, _ = random_batches(ids, 4, 16, np.random.default_rng(0))
    assert np.array_equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        random_batches(ids[:10], 2, 16, np.random.default_rng(0))


# ---------------------------------------------------------------- copy drills
_SPAN_REPEATED = re.compile(r"([a-z]+(?: [a-z]+)*)( \| |\n| -> |; )\1(?:\2\1)*")


def test_copy_drills_deterministic_and_repeating():
    drills = copy_drills(400, seed=5)
    assert drills == copy_drills(400, seed=5)
    assert drills != copy_drills(400, seed=6)
    rng = np.random.default_rng(5)
    assert copy_drills(400, rng) == drills and copy_drills(400, rng) != drills  # a Generator advances
    assert all(d.isascii() and 20 <= len(d) <= 200 for d in drills)
    spans = 0
    for d in drills:
        words = re.findall(r"[a-z]+", d.lower())
        assert len(words) > len(set(words)), d            # some word comes back later in the record
        m = _SPAN_REPEATED.fullmatch(d)
        if m:                                             # "mib qzvk | mib qzvk | ...": copies agree
            spans += 1
            span, sep = m.group(1), m.group(2)
            assert d.split(sep) == [span] * (d.count(sep) + 1) and 1 <= len(span.split()) <= 4
            assert len(d) > pretraining.REPEAT_BYTES      # longer than a window: every window copies
    assert abs(spans - pretraining.REPEAT_SHARE * 400) <= 40   # binomial sd ~9
    assert copy_drills(0) == []


def test_copy_drills_never_use_instruction_words():
    # every word and name of the instruction data, train and held-out, checked over ~60k drill words
    forbidden = set(WORDS) | {n.lower() for n in NAMES}
    test = make_instruction_dataset(10, 210, seed=0)[1]
    held_out = ({ex["input"] for ex in test if ex["input"].isalpha()}
                | {n.lower() for ex in test for n in re.findall(r"Greet (\w+)", ex["instruction"])})
    assert len(held_out) > 50 and held_out <= forbidden
    words = {w.lower() for d in copy_drills(10_000, seed=0) for w in re.findall(r"[A-Za-z]+", d)}
    assert len(words) > 15_000 and not words & forbidden
    instruction_words = {w.lower() for ex in test for w in re.findall(r"[A-Za-z]+", ex["instruction"])}
    assert words & instruction_words <= {"the", "a"}  # nor the instructions' own words
    assert not any("###" in d or "Ahoy" in d for d in copy_drills(2000, seed=1))


def test_pretraining_data_mixes_copy_drills():
    docs = [f"Document {i} describes the parser in a few plain words. " * (1 + i % 4)
            for i in range(120)]
    plain_train, plain_val = pretraining_data(tok, val_fraction=0.1, documents=docs, seed=3)
    train, val = pretraining_data(tok, val_fraction=0.1, documents=docs, seed=3, copy_fraction=0.25)
    assert np.array_equal(val, plain_val)                 # validation: the same documents, no drills
    assert np.array_equal(pretraining_data(tok, val_fraction=0.1, documents=docs, seed=3,
                                           copy_fraction=0.25)[0], train)
    records = tok.decode_bytes(train, skip_special=False).decode().split("<|endoftext|>")[:-1]
    doc_set = set(docs)
    kept = [r for r in records if r in doc_set]
    plain = tok.decode_bytes(plain_train, skip_special=False).decode().split("<|endoftext|>")[:-1]
    assert kept == plain                                  # every train document, in corpus order
    drills = [r for r in records if r not in doc_set]
    drill_bytes = sum(len(r) + 1 for r in drills)          # + its <|endoftext|>
    assert abs(drill_bytes / len(train) - 0.25) <= 201 / len(train)  # to within one record
    for d in drills:                                      # each one repeats a word
        words = re.findall(r"[a-z]+", d.lower())
        assert len(words) > len(set(words)), d
    first_doc = records.index(kept[0])
    assert 0 < len(drills) and records.index(drills[-1]) > first_doc  # interleaved, not appended
    with pytest.raises(ValueError, match="copy_fraction"):
        pretraining_data(tok, documents=docs, copy_fraction=1.0)
    with pytest.raises(ValueError, match="copy_fraction"):
        pretraining_data(tok, documents=docs, copy_fraction=-0.1)


# ---------------------------------------------------------------- instruction dataset
def test_dataset_deterministic_disjoint_and_short():
    train, test = make_instruction_dataset(n_train=700, n_test=140, seed=0)
    assert (train, test) == make_instruction_dataset(n_train=700, n_test=140, seed=0)
    assert make_instruction_dataset(n_train=700, n_test=140, seed=1)[1] != test
    assert len(train) == 700 and len(test) == 140
    key = lambda e: (e["instruction"], e["input"])  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in test}
    for split in (train, test):
        counts = {f: sum(task_family(e) == f for e in split) for f in TASK_FAMILIES}
        assert set(counts.values()) == {len(split) // len(TASK_FAMILIES)}  # every family, balanced
    assert all(len(e["output"].encode()) <= 12 for e in train + test)
    assert all(set(e) == {"instruction", "input", "output"} for e in train + test)


def test_dataset_answers_are_right():
    train, _ = make_instruction_dataset(n_train=140, n_test=7)
    for e in train:
        family, x = task_family(e), e["input"]
        expected = {"uppercase": x.upper(), "reverse": "".join(reversed(x)), "repeat": x + " " + x,
                    "first_letter": x[:1], "length": str(len(x)),
                    "add": str(eval(x)) if family == "add" else None,  # noqa: S307 (digits and + only)
                    "pirate": "Ahoy, " + e["instruction"].split()[1] + "!"}[family]
        assert e["output"] == expected, e


def test_format_prompt_and_exact_match():
    assert format_prompt({"instruction": "Uppercase the word.", "input": "cat", "output": "CAT"}) == \
        "### Instruction:\nUppercase the word.\n### Input:\ncat\n### Response:\n"
    assert format_prompt({"instruction": "Greet Ann like a pirate.", "input": "", "output": "x"}) == \
        "### Instruction:\nGreet Ann like a pirate.\n### Response:\n"
    assert exact_match(" CAT\n", "CAT") and not exact_match("CA", "CAT")


def test_save_load_round_trip(tmp_path):
    train, _ = make_instruction_dataset(n_train=30, n_test=0)
    train[0] = dict(train[0], output="héllo ✓")  # non-ASCII survives
    path = tmp_path / "sub" / "data.json"
    save_alpaca_json(train, path)
    assert load_alpaca_json(path) == train
    assert not list(path.parent.glob("*.tmp"))
    lines = '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d", "k": 1}\n'
    (tmp_path / "d.jsonl").write_text(lines)  # JSON Lines; a blank line is skipped, extra keys kept
    assert load_alpaca_json(tmp_path / "d.jsonl") == [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "", "output": "d", "k": 1}]


@pytest.mark.parametrize("content, message", [
    ("[{\"instruction\": \"a\", \"output\": ", r"data\.json: not valid JSON \(.* line 1 column"),
    ('{"instruction": "a", "output": "b"}', r"top level is a JSON dict, expected a list"),
    ("[]", "holds no records"),
    ('[{"instruction": "a", "output": "b"}, "text"]', "record 1 is a JSON str"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', "record 1 has no 'output' key"),
    ('[{"output": "b"}]', "record 0 has no 'instruction' key"),
    ('[{"instruction": "a", "input": 3, "output": "b"}]', "record 0 field 'input' is a int"),
    ('[{"instruction": "a", "output": null}]', "record 0 field 'output' is a NoneType"),
])
def test_loader_errors(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_alpaca_json(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_loader_missing_and_non_utf8(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json.*does not exist"):
        load_alpaca_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_bytes(b'[{"instruction": "\xff"}]')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_alpaca_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        (tmp_path / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
        load_alpaca_json(tmp_path / "x.jsonl")


# ---------------------------------------------------------------- batching
EXAMPLES = [{"instruction": "Uppercase the word.", "input": "cat", "output": "CAT"},
            {"instruction": "Greet Ann like a pirate.", "input": "", "output": "Ahoy, Ann!"}]


def test_encode_instruction_masks_prompt():
    ids, labels = encode_instruction(EXAMPLES[0], tok)
    prompt = encode_prompt(EXAMPLES[0], tok)
    assert ids.tolist() == prompt + list(b"CAT") + [tok.eos_id]
    assert labels.tolist() == [IGNORE_INDEX] * len(prompt) + list(b"CAT") + [tok.eos_id]


def test_collate_padding_and_masks():
    batch = collate(EXAMPLES, tok)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    lengths = [len(format_prompt(e)) + len(e["output"]) + 1 for e in EXAMPLES]
    assert ids.shape == labels.shape == mask.shape == (2, max(lengths))
    assert ids.dtype == labels.dtype == mask.dtype == np.int64
    for row, (e, n) in enumerate(zip(EXAMPLES, lengths)):
        n_prompt = len(format_prompt(e))
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert np.all(ids[row, n:] == tok.pad_id)
        assert np.all(labels[row, :n_prompt] == IGNORE_INDEX) and np.all(labels[row, n:] == IGNORE_INDEX)
        assert labels[row, n_prompt:n].tolist() == list(e["output"].encode()) + [tok.eos_id]
        assert np.array_equal(labels[row, n_prompt:n], ids[row, n_prompt:n])
        assert tok.decode(ids[row, :n_prompt]) == format_prompt(e)


def test_truncation_keeps_the_response():
    ids, labels = encode_instruction(EXAMPLES[1], tok, max_len=20)
    assert len(ids) == 20 and tok.decode(ids) == "esponse:\nAhoy, Ann!"
    assert (labels != IGNORE_INDEX).sum() == len("Ahoy, Ann!") + 1
    assert collate(EXAMPLES, tok, max_len=20)["input_ids"].shape == (2, 20)
    with pytest.raises(ValueError, match="does not fit max_len=5"):
        encode_instruction(EXAMPLES[1], tok, max_len=5)


def test_iterate_batches_one_epoch():
    train, _ = make_instruction_dataset(n_train=50, n_test=0)
    batches = list(iterate_batches(train, tok, 8, np.random.default_rng(0)))
    assert [b["input_ids"].shape[0] for b in batches] == [8] * 6 + [2]
    seen = sorted(tok.decode(row) for b in batches for row in b["input_ids"])
    assert seen == sorted(format_prompt(e) + e["output"] for e in train)  # every example exactly once
    again = list(iterate_batches(train, tok, 8, np.random.default_rng(0)))
    assert all(np.array_equal(a["labels"], b["labels"]) for a, b in zip(batches, again))
    assert len(list(iterate_batches(train, tok, 8, shuffle=False, drop_last=True))) == 6


def test_docstring_examples():
    import doctest

    from minilora.data import instructions, tokenizer
    for module in (tokenizer, instructions):
        assert doctest.testmod(module).failed == 0
