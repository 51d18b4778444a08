"""DPO (Rafailov et al. 2023) on a LoRA adapter: the loss, the log-probabilities, the reference model
that is the same model with its adapter off, the preference pairs, and a short run that learns.

The loss is checked against a hand computation and against TRL's sigmoid loss written out from its
documentation (-logsigmoid(β·h), with label smoothing), in float64; its gradient through
``sequence_logps`` by central differences; and the claims of the module docstring: loss log 2 and
rewards 0 at B = 0, reference log-probs equal to a separate base model's, no gradient for the base.
"""
import math

import numpy as np
import pytest

from minilora import backend
from minilora.data import ByteTokenizer, TASK_FAMILIES, task_family
from minilora.data.preferences import (collate_preferences, make_preference_dataset,
                                       rejected_answer)
from minilora.dpo import (DPOObjective, dpo_loss, evaluate_preferences, log_sigmoid,
                          reference_logps, sequence_logps, train_dpo)
from minilora.lora import LoraConfig, get_peft_model
from minilora.tensor import Tensor

from _tiny_llama import SMALL, model_of

F64 = np.float64


def small_pairs_batch(V=SMALL["vocab_size"], B=2, T=8, prompt=3, seed=0):
    """2B rows of random ids (chosen rows, then rejected rows), labels -100 on each row's first
    ``prompt`` tokens and on a padded tail of the last row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (2 * B, T))                 # (2B, T)
    labels = ids.copy()
    labels[:, :prompt] = -100
    labels[-1, T - 2:] = -100                            # the last row ends in two padding tokens
    attention = np.ones_like(ids)
    attention[-1, T - 2:] = 0
    return ids, labels, attention


# ------------------------------------------------------------------ the loss on numbers
def test_dpo_loss_equals_a_hand_computation():
    pc, pr, rc, rr = (np.array([v], dtype=F64) for v in (-3.0, -5.0, -4.0, -4.5))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # h = (π_c − ρ_c) − (π_r − ρ_r) = 1.0 − (−0.5) = 1.5; loss = −log σ(0.15) = log(1 + e^−0.15)
    assert losses.data[0] == pytest.approx(math.log1p(math.exp(-0.15)), rel=1e-15)
    assert chosen.data[0] == pytest.approx(0.1 * 1.0, rel=1e-15)
    assert rejected.data[0] == pytest.approx(0.1 * -0.5, rel=1e-15)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.25)
    want = 0.75 * math.log1p(math.exp(-0.15)) + 0.25 * math.log1p(math.exp(0.15))
    assert smoothed.data[0] == pytest.approx(want, rel=1e-15)


@pytest.mark.interop
@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3)])
def test_dpo_loss_equals_trls_formula(beta, label_smoothing):
    """TRL's DPOTrainer, loss_type="sigmoid": logits = (π_c − π_r) − (ρ_c − ρ_r);
    losses = −logsigmoid(β·logits)·(1 − ε) − logsigmoid(−β·logits)·ε; rewards β·(π − ρ)."""
    torch = pytest.importorskip("torch", reason="interop needs torch")
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (rng.normal(-20, 8, 64) for _ in range(4))
    pc[:2] = [-1.0, -900.0]                          # |β·h| in the hundreds: the stable log σ
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
    t = [torch.from_numpy(a) for a in (pc, pr, rc, rr)]
    logits = (t[0] - t[1]) - (t[2] - t[3])
    want = (-torch.nn.functional.logsigmoid(beta * logits) * (1 - label_smoothing)
            - torch.nn.functional.logsigmoid(-beta * logits) * label_smoothing)
    # float64 throughout: the two arrangements differ by a few ulps of values of at most a few
    # hundred, through log σ's one log and one exp
    np.testing.assert_allclose(losses.data, want.numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(chosen.data, beta * (pc - rc), rtol=1e-15)
    np.testing.assert_allclose(rejected.data, beta * (pr - rr), rtol=1e-15)


def test_log_sigmoid_is_finite_far_out_with_finite_gradients():
    x = Tensor(np.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=np.float32), requires_grad=True)
    y = log_sigmoid(x)
    y.sum().backward()
    np.testing.assert_array_equal(y.data, np.float32([-1e4, -100.0, -math.log(2), 0.0, 0.0]))
    np.testing.assert_array_equal(x.grad, np.float32([1.0, 1.0, 0.5, 0.0, 0.0]))   # 1 − σ(x)


def test_dpo_loss_checks_its_arguments():
    a = np.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(a, a, a, a, label_smoothing=0.7)


# ------------------------------------------------------------------ through the model
def test_sequence_logps_sum_the_labelled_tokens_only():
    model = model_of()
    ids, labels, attention = small_pairs_batch()
    got = sequence_logps(model, ids, labels, attention).data                 # (2B,)
    logits = model(ids, attention_mask=attention).data.astype(F64)           # (2B, T, V)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.zeros(len(ids))
    for b in range(len(ids)):
        for t in range(1, ids.shape[1]):
            if labels[b, t] != -100:
                want[b] += logp[b, t - 1, labels[b, t]]
    # float32 log-softmax: each term within a few ulps of |log p| <= ~6, summed over <= 5 terms
    np.testing.assert_allclose(got, want, rtol=0, atol=5 * 8 * 6 * np.finfo(np.float32).eps)


def test_gradcheck_dpo_loss_through_sequence_logps_float64():
    from minilora.testing import gradcheck
    with backend.default_float_dtype(np.float64):
        model = get_peft_model(model_of(), LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"],
                                                      init_lora_weights=False))
        layer = dict(model.lora_layers())["model.layers.1.self_attn.v_proj"]
        ids, labels, attention = small_pairs_batch()
        ref = reference_logps(model, ids, labels, attention)                # (2B,), a constant
        A0, B0 = layer.lora_A["default"].weight.data.copy(), layer.lora_B["default"].weight.data.copy()

        def fn(A, B):
            for lin, t in ((layer.lora_A["default"], A), (layer.lora_B["default"], B)):
                lin._parameters["weight"] = t
                object.__setattr__(lin, "weight", t)
            pi = sequence_logps(model, ids, labels, attention)
            losses, _, _ = dpo_loss(pi[:2], pi[2:], ref[:2], ref[2:], beta=0.7, label_smoothing=0.2)
            return losses

        assert gradcheck(fn, [A0, B0], names=["lora_A", "lora_B"])


def test_at_init_the_loss_is_log_2_and_the_rewards_0():
    """B = 0: the policy is the reference, so h = 0 exactly and −log σ(0) = log 2."""
    model = get_peft_model(model_of(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids, labels, attention = small_pairs_batch()
    out = DPOObjective(model)(ids, labels=labels, attention_mask=attention)
    assert out.loss.item() == np.float32(math.log(2))
    np.testing.assert_array_equal(out.chosen_rewards.data, 0.0)
    np.testing.assert_array_equal(out.rejected_rewards.data, 0.0)


def test_the_reference_is_the_base_model_and_gets_no_gradient():
    """The adapter-disabled model scores like a separate copy of the base; the DPO gradient reaches
    the adapter only."""
    base = model_of()
    model = get_peft_model(model_of(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    ids, labels, attention = small_pairs_batch()
    ref = reference_logps(model, ids, labels, attention).data
    np.testing.assert_array_equal(ref, sequence_logps(base, ids, labels, attention).data)
    policy = sequence_logps(model, ids, labels, attention).data
    assert np.abs(policy - ref).min() > 1e-3           # the adapter does change the scores

    out = DPOObjective(model, beta=0.5)(ids, labels=labels, attention_mask=attention)
    out.loss.backward()
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert frozen and trained
    assert all(p.grad is None for _, p in frozen), [n for n, p in frozen if p.grad is not None]
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for _, p in trained)


# ------------------------------------------------------------------ the preference pairs
def test_preference_pairs_are_right_against_plausibly_wrong():
    train_pairs, test_pairs = make_preference_dataset(140, 70, seed=0)
    again, _ = make_preference_dataset(140, 70, seed=0)
    assert train_pairs == again
    for pair in train_pairs + test_pairs:
        assert pair["chosen"] != pair["rejected"]
    adds = [p for p in train_pairs if "Add the numbers." in p["prompt"]]
    assert adds and all(abs(int(p["chosen"]) - int(p["rejected"])) == 1 for p in adds)
    greet = [p for p in train_pairs if "like a pirate" in p["prompt"]]
    assert greet and all(p["rejected"] != p["chosen"] and p["chosen"].startswith("Ahoy")
                         for p in greet)
    # held out by item: no held-out prompt appears in training
    assert not {p["prompt"] for p in test_pairs} & {p["prompt"] for p in train_pairs}


def test_every_word_of_every_family_gets_a_different_wrong_answer():
    from minilora.data import NAMES, WORDS
    rng = np.random.default_rng(0)
    for family, (instruction, pool, answer) in TASK_FAMILIES.items():
        items = {"words": WORDS, "names": NAMES, "pairs": ["0+0", "3+4", "29+29"]}[pool]
        for x in items:
            ex = ({"instruction": instruction.format(x=x), "input": "", "output": answer(x)}
                  if "{x}" in instruction else {"instruction": instruction, "input": x,
                                                "output": answer(x)})
            assert task_family(ex) == family
            assert rejected_answer(ex, rng) != ex["output"], (family, x)


def test_collate_puts_chosen_rows_then_rejected_rows():
    tok = ByteTokenizer()
    pairs, _ = make_preference_dataset(7, 0, seed=1)
    batch = collate_preferences(pairs[:3], tok)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape[0] == 6
    for i, pair in enumerate(pairs[:3]):
        for row, answer in ((i, pair["chosen"]), (3 + i, pair["rejected"])):
            n_prompt = len(tok.encode(pair["prompt"]))
            want = tok.encode(answer, add_eos=True)
            assert list(ids[row, :n_prompt]) == tok.encode(pair["prompt"])
            assert list(labels[row][labels[row] != -100]) == want
            assert batch["attention_mask"][row].sum() == n_prompt + len(want)


# ------------------------------------------------------------------ a short run on the tiny base
def test_a_short_dpo_run_raises_held_out_margin_and_accuracy():
    """10 seeded steps of 8 pairs on the shipped tiny base with r=8 adapters: on 70 held-out pairs
    (words never trained on) the mean reward margin goes from 0 to 0.57 and the preference accuracy
    from 0 to 0.74 (measured); at least 0.15 and 0.6 are asked."""
    from minilora.models import load_base_model
    tok = ByteTokenizer()
    train_pairs, held_out = make_preference_dataset(400, 70, seed=0)
    backend.manual_seed(0)
    model = get_peft_model(load_base_model(), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    before = evaluate_preferences(model, held_out[:14], tok)   # B = 0: every margin is exactly 0
    assert before["reward_margin"] == 0.0 and before["accuracy"] == 0.0
    history = train_dpo(model, train_pairs, tok, steps=10, lr=1e-2, batch_size=8,
                        eval_pairs=held_out, eval_every=10, progress=False, seed=0)
    after = history[-1]
    assert after["eval_reward_margin"] > 0.15, after
    assert after["eval_accuracy"] > 0.6, after
    assert after["eval_loss"] < math.log(2)
    for name, p in model.named_parameters():
        if name in frozen:
            np.testing.assert_array_equal(p.data, frozen[name], err_msg=name)
