"""LoRA fine-tuning end to end: the demo, ``minilora finetune`` / ``minilora merge``, and a real run.

The fast tests use a tiny random base saved to a temporary folder; the slow one fine-tunes the
shipped pretrained base and checks that held-out exact-match accuracy rises from near zero.
"""
import json
import re

import numpy as np
import pytest

from minilora.cli import main as cli_main
from minilora.data import ByteTokenizer, make_instruction_dataset, save_alpaca_json
from minilora.commands.finetune import exact_match_accuracy, per_family_accuracy, generate_answers, lora_finetune
from minilora.lora import LoraConfig, PeftModel
from minilora.models import BASE_MODEL_DIR, LlamaForCausalLM, load_base_model
from _tiny_llama import save_tiny_base  # noqa: E402


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def test_generate_answers_groups_prompts_by_length(tiny_base):
    model = LlamaForCausalLM.from_pretrained(tiny_base)
    _, test = make_instruction_dataset(10, 9, seed=1)
    tok = ByteTokenizer()
    answers = generate_answers(model, test, tok, max_new_tokens=3, batch_size=2)
    assert len(answers) == len(test) and all(isinstance(a, str) for a in answers)
    # the same answer as generating each prompt alone
    from minilora.data import encode_prompt
    ids = np.array([encode_prompt(test[4], tok)])
    alone = model.generate(ids, max_new_tokens=3, eos_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
    if tok.eos_id in alone:
        alone = alone[:alone.index(tok.eos_id)]
    assert answers[4] == tok.decode(alone)


def test_lora_finetune_lowers_loss_and_trains_only_the_adapter(tiny_base):
    base = LlamaForCausalLM.from_pretrained(tiny_base)
    W0 = base.model.layers[0].self_attn.q_proj.weight.numpy().copy()
    emb = base.model.embed_tokens.weight.numpy().copy()
    train_set, test = make_instruction_dataset(64, 7, seed=0)
    model, history = lora_finetune(base, LoraConfig(r=4, lora_alpha=8), train_set, ByteTokenizer(),
                                   steps=12, lr=1e-2, batch_size=8, progress=False,
                                   eval_examples=test, eval_every=6)
    assert np.mean([h["loss"] for h in history[-3:]]) < np.mean([h["loss"] for h in history[:3]])
    assert "eval_loss" in history[5] and "eval_loss" in history[-1]
    layer = dict(model.lora_layers())["model.layers.0.self_attn.q_proj"]
    assert np.array_equal(layer.base_layer.weight.numpy(), W0)
    assert np.array_equal(model.base_model.model.model.embed_tokens.weight.numpy(), emb)
    assert np.abs(layer.lora_B["default"].weight.numpy()).max() > 0


def test_demo_runs_end_to_end(tiny_base, tmp_path, capsys):
    rc = cli_main(["demo", "--base", str(tiny_base), "--steps", "4", "--n-eval", "7", "--show", "3",
                   "--out", str(tmp_path / "demo"), "--no-progress", "--batch-size", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", out)
    diff = float(re.search(r"max \|logits merged - logits unmerged\| = (\S+)", out).group(1))
    assert diff < 1e-4
    assert "held-out exact-match accuracy" in out
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "demo" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "demo" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        assert "skipping the loss plot" in out


def test_finetune_and_merge_commands(tiny_base, tmp_path, capsys):
    data = tmp_path / "mine.json"
    train_set, _ = make_instruction_dataset(40, 0, seed=3)
    save_alpaca_json(train_set, data)
    adapter = tmp_path / "adapter"
    rc = cli_main(["finetune", "--base", str(tiny_base), "--data", str(data), "--steps", "3",
                   "--out", str(adapter), "--n-test", "5", "--no-progress", "--rank", "2",
                   "--targets", "all-linear"])
    assert rc == 0
    assert "adapter saved to" in capsys.readouterr().out
    merged_dir = tmp_path / "merged"
    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(merged_dir),
                     "--base", str(tiny_base)]) == 0
    assert "saved to" in capsys.readouterr().out
    merged = LlamaForCausalLM.from_pretrained(merged_dir)
    with_adapter = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), adapter)
    ids = np.random.default_rng(0).integers(0, 259, size=(2, 12))
    assert np.abs(merged(ids).numpy() - with_adapter(ids).numpy()).max() < 1e-5
    assert not np.allclose(merged(ids).numpy(),
                           LlamaForCausalLM.from_pretrained(tiny_base)(ids).numpy(), atol=1e-6)


def test_merge_command_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["merge", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minilora merge: error:") and "does not exist" in err and "\n" not in err


def test_shipped_base_copies_from_its_context():
    """The copy drills did their job: the shipped base continues a made-up span it has seen once.

    Measured: 87 of 128 spans (68%; the docstrings-only base before it: 0). Asserted: half.
    """
    from minilora.commands.pretrain import copy_accuracy
    if not (BASE_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("the shipped base model is not built yet (minilora pretrain)")
    assert copy_accuracy(load_base_model(), ByteTokenizer()) >= 0.5


@pytest.mark.slow
def test_real_finetune_raises_held_out_accuracy():
    """From the shipped base: held-out exact match rises from ~0 (CI: about 20 seconds).

    Measured with the shipped base (3000 steps on docstrings + 25% copy drills, which taught it to
    copy from its context), this run (200 steps) over LoRA seeds 0-4: 0% before, then 44.3 / 45.7 /
    42.9 / 44.3 / 48.6% after (31 / 32 / 30 / 31 / 34 of 70; mean 45%, sd 2 points), with the
    families that copy the input learned: "repeat" 90-100%, "first_letter" 100%. Asserted: >= 35%
    (25 of 70, 5 answers below the worst seed, room for other BLAS rounding), and >= 70% on each of
    those two families (10 examples each; worst seen 9 of 10). The docstrings-only base it replaced
    could not copy: 17% after, "repeat" 0%.
    """
    if not (BASE_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("the shipped base model is not built yet (minilora pretrain)")
    tok = ByteTokenizer()
    train_set, test = make_instruction_dataset(2000, 70, seed=0)
    base = load_base_model()
    before, _ = exact_match_accuracy(base, test, tok)
    model, history = lora_finetune(base, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj"]), train_set, tok, steps=200, lr=3e-3, progress=False)
    after, answers = exact_match_accuracy(model, test, tok)
    family = per_family_accuracy(test, answers)
    print(f"held-out exact match: {before:.1%} -> {after:.1%}; {family}")
    assert before <= 0.05
    assert after >= 0.35
    assert family["repeat"] >= 0.7 and family["first_letter"] >= 0.7   # the base copies its input
    assert np.mean([h["loss"] for h in history[-10:]]) < 0.5 * np.mean([h["loss"] for h in history[:10]])
