"""Chat-format supervised fine-tuning data: conversations -> (input_ids, labels) with the loss on the
assistant's turns only, and two generated tasks for fine-tuning a real chat model.

A chat model such as SmolLM2-135M-Instruct reads conversations laid out by its chat template
(``BPETokenizer.apply_chat_template``). Fine-tuning it on conversations (as InstructGPT's and
Alpaca's supervised stage does, here with LoRA: Hu et al., 2021, "LoRA: Low-Rank Adaptation of
Large Language Models") trains the model to write the ASSISTANT's turns, so every other token (the
system prompt, the user's turns, the template's headers, padding) gets label -100 and adds nothing
to the loss.

**Finding the assistant's tokens without knowing the template** (``encode_chat``). The positions
are not hard-coded for ChatML; they are found by rendering, as TRL's assistant-only loss and
transformers' ``return_assistant_tokens_mask`` find them. For the assistant message at index i:

    prefix = template(messages[:i], add_generation_prompt=True)   # ends where the reply begins
    upto   = template(messages[:i + 1])                           # ends after the reply's turn

``upto[len(prefix):]`` is the assistant's turn as the template writes it: for ChatML
``"Sure!<|im_end|>\\n"``. The labelled text runs from its start through the first added token
(end-of-turn) after the content, ``<|im_end|>``, and leaves out what the template writes between
turns (the ``\\n``). The whole conversation is then tokenized ONCE (the ids the model sees at
inference), each token's byte offset is the sum of the byte lengths of the tokens before it
(byte-level BPE spells the text's bytes exactly), and a token is labelled when it starts inside an
assistant span. So for SmolLM2 (S = system prompt and user turn, A = the reply)::

    text     <|im_start|>system\\n ... <|im_start|>assistant\\n  A  A  A  <|im_end|>  \\n
    labels   -100 ...                                   -100  A  A  A  <|im_end|> -100

``collate_chat`` pads a batch on the right (pad id in input_ids, -100 in labels, 0 in the
attention mask), as ``data.collate`` does for Alpaca records.

**The generated tasks** (``make_chat_dataset``), built offline from the lists below, seeded, with
train and held-out splits that share no prompt:

* ``"persona"``: a pirate answering everyday questions (the "character" use of LoRA: a style the
  base model never writes). Held-out questions are about topics the training split never asks
  about; ``pirate_rate`` (fraction of answers with a pirate marker such as "arr" or "matey") scores
  them.
* ``"exact"``: extract a person's name, age and city from a sentence as one fixed-format JSON
  object. Held-out sentences use names the training split never contains; scored by exact match.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import backend
from .batching import IGNORE_INDEX
from .bpe import unicode_to_bytes

ROLES = ("system", "user", "assistant")


# ------------------------------------------------------------------ assistant spans by rendering
def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                         tokenize=False)


def _first_added_token_end(tokenizer, text: str, start: int) -> int | None:
    """End (a character index) of the first added token (``<|im_end|>``...) found in ``text`` at or
    after ``start``; None when there is none."""
    best = None
    for token in getattr(tokenizer, "added_tokens", {}):
        j = text.find(token, start)
        if j >= 0 and (best is None or (j, -len(token)) < best):
            best = (j, -len(token))                    # leftmost, then longest, as encode cuts them
    return None if best is None else best[0] - best[1]


def assistant_spans(messages, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans of the assistant's turns in it).

    Each span covers what the assistant writes: its content as the template lays it out, through
    the end-of-turn token that closes it (the first added token after the content); the template's
    text between turns is outside. Found by rendering prefixes of the conversation (module
    docstring), so any template that renders a conversation as an extension of its prefixes works.
    """
    _check_messages(messages)
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise ValueError(f"message {i}: the chat template does not render the conversation as an "
                             "extension of its prefixes, so the assistant's turn cannot be located; "
                             "start the conversation with a system or user message, or use a "
                             "template that renders turns in order")
        turn = upto[len(prefix):]
        content = message["content"].strip()
        at = turn.find(content) if content else -1
        after_content = at + len(content) if at >= 0 else 0
        end = _first_added_token_end(tokenizer, turn, after_content)
        spans.append((len(prefix), len(prefix) + (len(turn) if end is None else end)))
    return full, spans


def _token_byte_lengths(tokenizer, ids) -> list[int]:
    """Bytes of text each token stands for (byte-level BPE: its symbols map back to bytes; an
    added token spelled outside the byte alphabet stands for its own UTF-8)."""
    to_byte = unicode_to_bytes()
    lengths = []
    for token in tokenizer.convert_ids_to_tokens(list(ids)):
        if token in tokenizer.added_tokens or not all(c in to_byte for c in token):
            lengths.append(len(token.encode("utf-8")))
        else:
            lengths.append(len(token))             # one symbol per byte
    return lengths


def encode_chat(messages, tokenizer, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of one conversation as 1-D int64 NumPy arrays, unpadded.

    input_ids are the tokens of the whole rendered conversation (what ``apply_chat_template``
    gives); labels equal them on the assistant's turns (content and closing end-of-turn token,
    ``assistant_spans``) and are -100 everywhere else. A token is labelled when it starts inside a
    span, so a token that starts before one stays -100 (a reply's leading whitespace fused with
    the template's newline by the pre-tokenizer). Longer than ``max_len``: cut on the right,
    as TRL's SFT trainer truncates (the conversation's start, which the replies depend on, is kept).
    """
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    text, spans = assistant_spans(messages, tokenizer)
    ids = tokenizer.encode(text)
    lengths = np.asarray(_token_byte_lengths(tokenizer, ids), dtype=np.int64)           # (T,)
    if int(lengths.sum()) != len(text.encode("utf-8")):
        raise ValueError("the conversation has characters the tokenizer's vocabulary cannot spell "
                         "(it drops or replaces them), so token positions cannot be matched to "
                         "the text; remove such characters (control characters; for SmolLM2 "
                         "also code points from U+40000) from the messages")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])                             # (T,)
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    for a, b in spans:
        a_byte, b_byte = len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))
        inside = (starts >= a_byte) & (starts < b_byte)
        labels[inside] = ids[inside]
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def collate_chat(records: Sequence[dict], tokenizer, max_len: int | None = None) -> dict:
    """A right-padded batch of conversations (records with a ``"messages"`` list):
    {"input_ids", "labels", "attention_mask"}, each (B, T) int64 on the current device, T the
    longest (truncated) conversation. Padding: the tokenizer's pad id (else its eos id, else 0) in
    input_ids, -100 in labels, 0 in the mask."""
    if len(records) == 0:
        raise ValueError("cannot collate an empty list of conversations; pass at least one")
    encoded = [encode_chat(r["messages"], tokenizer, max_len) for r in records]
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    lengths = np.array([len(ids) for ids, _ in encoded])                  # (B,)
    B, T = len(encoded), int(lengths.max())
    input_ids = np.full((B, T), pad, dtype=np.int64)                       # (B, T)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)                 # (B, T)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(lab)] = lab
    attention_mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)  # (B, T)
    return {"input_ids": backend.to_device(input_ids), "labels": backend.to_device(labels),
            "attention_mask": backend.to_device(attention_mask)}


def prompt_messages(record: dict) -> list[dict]:
    """The conversation up to (not including) its last assistant message: what the model answers."""
    messages = record["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("the conversation has no assistant message to evaluate against; add the "
                         "reference reply as the last message")
    return messages[:last]


def reference_reply(record: dict) -> str:
    """The content of the conversation's last assistant message (the reference answer)."""
    return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]


def end_of_turn_id(tokenizer) -> int | None:
    """The id of the token that closes an assistant turn in the tokenizer's chat template (SmolLM2:
    ``<|im_end|>``), found by rendering a one-turn conversation; None when the template writes none."""
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    text, [(a, b)] = assistant_spans(probe, tokenizer)
    turn = text[a:b]
    token = next((t for t in tokenizer.added_tokens if turn.endswith(t)), None)
    return None if token is None else tokenizer.convert_tokens_to_ids(token)


# ------------------------------------------------------------------ reading conversations
def _check_messages(messages, where: str = "messages") -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{'role', 'content'}} dicts; wrap "
                         "the turns of one conversation in a list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}[{i}] must be a dict with role in {ROLES} and string content, "
                             f"got {m!r:.80}; fix that message")


def load_chat_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON Lines file of conversations, one ``{"messages": [{"role", "content"}, ...]}``
    object per line (TRL's conversational format); each must contain an assistant message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat data file {str(path)!r} does not exist; pass a .jsonl file of "
                                '{"messages": [...]} records')
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not JSON ({e.msg}); write one object per line") from None
        if not isinstance(rec, dict) or "messages" not in rec:
            raise ValueError(f'{path}: line {n} has no "messages" key; write {{"messages": [...]}}')
        _check_messages(rec["messages"], f"{path}: line {n}: messages")
        if not any(m["role"] == "assistant" for m in rec["messages"]):
            raise ValueError(f"{path}: line {n} has no assistant message; add the reply to learn")
        records.append(rec)
    if not records:
        raise ValueError(f"{path} holds no conversations; write one JSON object per line")
    return records


# ------------------------------------------------------------------ task 1: a pirate persona
# (topic as it follows "tips for", the plain advice); the pirate version is made by pirate_style.
TOPICS = [
    ("boiling an egg", "Put the egg in cold water, bring it to a boil, then let it sit for ten minutes."),
    ("saving money", "Write down what you spend for a month and cut the things you do not miss."),
    ("falling asleep faster", "Keep your room dark and cool, and put your phone away an hour before bed."),
    ("keeping houseplants alive", "Water only when the soil is dry and give them a bright window."),
    ("learning a new language", "Practice a little every day and talk with people who speak it."),
    ("staying focused at work", "Work in short blocks, close your messages and take a break between them."),
    ("making friends in a new city", "Join a club or a class and go back every week so people know you."),
    ("cleaning a cast iron pan", "Rinse it with hot water, dry it on the stove and rub in a little oil."),
    ("packing for a trip", "Make a list, roll your clothes and pack only what you will really use."),
    ("drinking more water", "Keep a bottle with you and drink a glass with every meal."),
    ("taking better photos", "Stand with the light behind you and get closer to what you shoot."),
    ("writing a thank-you note", "Name the gift or the help, say how it made your day and keep it short."),
    ("running your first race", "Build up slowly, rest between runs and start the race at an easy pace."),
    ("cooking rice", "Rinse the rice, use twice as much water and let it rest with the lid on."),
    ("remembering names", "Say the name back when you meet someone and use it once more before you leave."),
    ("organizing a closet", "Take everything out, give away what you did not wear this year and group the rest."),
    ("preparing for a job interview", "Learn about the company, practice your answers aloud and arrive early."),
    ("spending less time on your phone", "Turn off the alerts you do not need and keep the phone out of the bedroom."),
    ("making good coffee", "Use fresh beans, grind them just before brewing and do not use boiling water."),
    ("waking up early", "Go to bed at the same time every night and open the curtains as soon as you wake."),
    ("planning a picnic", "Pick a shady spot, pack food that keeps well and bring a blanket and water."),
    ("staying warm in winter", "Wear thin layers, a hat and warm socks, and keep moving."),
    ("keeping cool in summer", "Drink often, stay in the shade at noon and close the blinds during the day."),
    ("starting a vegetable garden", "Start small with easy plants like beans and lettuce in a sunny spot."),
    ("washing a wool sweater", "Wash it by hand in cool water and dry it flat on a towel."),
    ("giving a short speech", "Know your first line by heart, speak slowly and look at a few friendly faces."),
    ("studying for an exam", "Study a little each day, test yourself and sleep well the night before."),
    ("training a puppy", "Reward good behavior right away and keep the lessons short and happy."),
    ("fixing a squeaky door", "Put a few drops of oil on the hinges and swing the door a few times."),
    ("baking bread", "Let the dough rise until it doubles and bake it until it sounds hollow."),
    ("walking more every day", "Take the stairs, get off the bus one stop early and walk after dinner."),
    ("hosting a dinner party", "Cook something you know well and prepare as much as you can the day before."),
    ("sharpening a kitchen knife", "Hold the blade at a low steady angle and use the same number of strokes on each side."),
    ("saying no politely", "Thank the person, say no clearly and do not make up long excuses."),
    ("choosing a good book", "Read the first page in the shop and pick the one you do not want to put down."),
    ("keeping a tidy desk", "Clear it at the end of every day and keep only what you use on top."),
    ("learning to cook", "Start with three simple dishes and cook them until you know them by heart."),
    ("staying calm before a test", "Breathe slowly, arrive early and remind yourself that you have prepared."),
    ("keeping your bike in good shape", "Pump the tires every week and oil the chain after it rains."),
    ("making a budget for the month", "Add up your income, set money aside first and split the rest by need."),
]

QUESTION_FRAMES = [
    "Any tips for {topic}?",
    "What's the secret to {topic}?",
    "Can you help me with {topic}?",
    "I'm not good at {topic}. What should I do?",
    "What is your best advice about {topic}?",
    "Where do I start with {topic}?",
    "My friend asked me about {topic}. What should I tell them?",
    "How can I get better at {topic}?",
]

PIRATE_OPENERS = ["Arr, matey!", "Ahoy there, matey!", "Arr, me hearty!", "Shiver me timbers!",
                  "Yo-ho-ho, matey!"]
PIRATE_CLOSERS = ["Now hoist the sails, matey!", "Fair winds to ye!", "Yo-ho-ho!",
                  "That be the pirate's way, arr!", "Off ye go, me hearty!"]
# plain word -> pirate word (whole words, first letter's case kept)
PIRATE_WORDS = {"you": "ye", "your": "yer", "my": "me", "is": "be", "are": "be", "friend": "matey",
                "friends": "mateys", "money": "doubloons", "yes": "aye", "hello": "ahoy",
                "the": "th'", "stop": "avast"}
# markers of the persona, scored by pirate_rate (words a plain answer almost never contains)
PIRATE_MARKERS = re.compile(r"\b(arr+|matey|mateys|ahoy|ye|yer|aye|me hearty|me hearties|"
                            r"yo-ho-ho|shiver me timbers|avast|landlubbers?|doubloons)\b", re.I)


def pirate_style(text: str) -> str:
    """``text`` with the plain words of ``PIRATE_WORDS`` swapped for a pirate's."""
    def swap(m):
        word = m.group(0)
        new = PIRATE_WORDS.get(word.lower())
        if new is None:
            return word
        return new[0].upper() + new[1:] if word[0].isupper() else new
    return re.sub(r"[A-Za-z]+", swap, text)


def pirate_rate(answers: Sequence[str]) -> float:
    """Fraction of ``answers`` that contain a pirate marker (``PIRATE_MARKERS``): 0 for a plain
    assistant, 1 when every answer speaks like a pirate."""
    if not answers:
        return float("nan")
    return sum(bool(PIRATE_MARKERS.search(a)) for a in answers) / len(answers)


def _persona_records(topics, n: int, rng: np.random.Generator) -> list[dict]:
    pairs = [(t, f) for t in range(len(topics)) for f in range(len(QUESTION_FRAMES))]
    order = rng.permutation(len(pairs))
    records = []
    for k in range(n):
        t, f = pairs[order[k % len(pairs)]]
        topic, advice = topics[t]
        question = QUESTION_FRAMES[f].format(topic=topic)
        answer = " ".join([PIRATE_OPENERS[rng.integers(len(PIRATE_OPENERS))], pirate_style(advice),
                           PIRATE_CLOSERS[rng.integers(len(PIRATE_CLOSERS))]])
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}], "task": "persona"})
    return records


# ------------------------------------------------------------------ task 2: JSON extraction
FIRST_NAMES = ["Maria", "John", "Aisha", "Wei", "Lucas", "Emma", "Omar", "Sofia", "Kenji", "Olga",
               "Pedro", "Fatima", "Liam", "Chloe", "Ravi", "Hana", "Diego", "Nora", "Ivan", "Zara",
               "Tom", "Elena", "Samuel", "Mei", "Ahmed", "Lena", "Carlos", "Ingrid", "Yusuf", "Amara",
               "Felix", "Priya", "Marco", "Leila", "Oscar", "Anya", "Tariq", "Greta", "Hugo", "Nia"]
CITIES = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Madrid", "Berlin", "Denver", "Cairo", "Oslo",
          "Lima", "Dublin", "Seoul", "Prague", "Austin", "Mumbai", "Sydney", "Vienna", "Quito",
          "Helsinki", "Boston", "Rome", "Bogota", "Athens", "Glasgow", "Hanoi", "Zurich"]
SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {name} just turned {age}.",
    "{name}, {age}, moved to {city} last year.",
    "At {age}, {name} still calls {city} home.",
    "My neighbor {name} is {age} and grew up in {city}.",
    "{name} from {city} celebrated a {age}th birthday yesterday.",
    "Since moving to {city}, {name} ({age}) has taken up painting.",
    "The new manager, {name}, is {age} and commutes across {city} every day.",
]
EXTRACT_INSTRUCTION = ("Extract the person's name, age and city from this sentence. Answer with only "
                       "a JSON object with the keys name, age and city.\n\n")


def extraction_answer(name: str, age: int, city: str) -> str:
    """The one accepted answer: ``{"name": "Maria", "age": 34, "city": "Lisbon"}``."""
    return json.dumps({"name": name, "age": age, "city": city})


def _extraction_records(names, n: int, rng: np.random.Generator) -> list[dict]:
    records = []
    for _ in range(n):
        name = names[rng.integers(len(names))]
        city = CITIES[rng.integers(len(CITIES))]
        age = int(rng.integers(18, 90))
        sentence = SENTENCES[rng.integers(len(SENTENCES))].format(name=name, age=age, city=city)
        records.append({"messages": [{"role": "user", "content": EXTRACT_INSTRUCTION + sentence},
                                     {"role": "assistant", "content": extraction_answer(name, age, city)}],
                        "task": "exact"})
    return records


def exact_match_rate(answers: Sequence[str], records: Sequence[dict]) -> float:
    """Fraction of answers equal to the record's reference reply up to surrounding whitespace."""
    if not answers:
        return float("nan")
    return sum(a.strip() == reference_reply(r).strip() for a, r in zip(answers, records)) / len(answers)


# ------------------------------------------------------------------ the two tasks
CHAT_TASKS = {
    "persona": "a pirate answering everyday questions; metric: fraction of answers with a pirate marker",
    "exact": "name, age and city from a sentence as a fixed JSON object; metric: exact match",
}


def make_chat_dataset(task: str, n_train: int = 400, n_test: int = 40,
                      seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out) lists of ``{"messages": [user, assistant], "task": task}`` records.

    The split is made on what the prompts are about, so no held-out prompt occurs in training:
    "persona" holds out a fifth of ``TOPICS`` (at least one), "exact" a quarter of ``FIRST_NAMES``.
    Held-out prompts are distinct ("persona" has one question per held-out topic and frame of
    ``QUESTION_FRAMES``, so ``n_test`` is at most their number). Training records of "persona"
    cycle through the training topics' questions in a seeded order; those of "exact" draw name,
    age, city and sentence at random, so either may repeat a prompt.
    """
    if task not in CHAT_TASKS:
        raise ValueError(f"unknown chat task {task!r}; use one of {sorted(CHAT_TASKS)}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    rng = np.random.default_rng(seed)
    if task == "persona":
        order = rng.permutation(len(TOPICS))
        n_held = max(1, len(TOPICS) // 5)
        held = [TOPICS[i] for i in order[:n_held]]
        train_topics = [TOPICS[i] for i in order[n_held:]]
        if n_test > n_held * len(QUESTION_FRAMES):
            raise ValueError(f"n_test={n_test} exceeds the {n_held * len(QUESTION_FRAMES)} distinct "
                             "held-out persona questions; lower n_test")
        return _persona_records(train_topics, n_train, rng), _persona_records(held, n_test, rng)
    order = rng.permutation(len(FIRST_NAMES))
    n_held = len(FIRST_NAMES) // 4
    held = [FIRST_NAMES[i] for i in order[:n_held]]
    train_names = [FIRST_NAMES[i] for i in order[n_held:]]
    test = []
    seen = set()
    while len(test) < n_test:        # distinct held-out prompts (8 sentences x 10 names x ages x cities)
        rec = _extraction_records(held, 1, rng)[0]
        key = rec["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            test.append(rec)
    return _extraction_records(train_names, n_train, rng), test


def chat_metric(task: str | None, answers: Sequence[str], records: Sequence[dict]) -> tuple[str, float]:
    """(metric name, value) on held-out answers: ``pirate_rate`` for "persona", exact match
    otherwise (the generated "exact" task and a user's own file)."""
    if task == "persona":
        return "pirate-marker rate", pirate_rate(answers)
    return "exact match", exact_match_rate(answers, records)


__all__ = ["CHAT_TASKS", "assistant_spans", "chat_metric", "collate_chat", "encode_chat",
           "end_of_turn_id", "exact_match_rate", "extraction_answer", "load_chat_jsonl",
           "make_chat_dataset", "pirate_rate", "pirate_style", "prompt_messages", "reference_reply"]
