"""LoRA+ (Hayou et al. 2024): B at ratio x lr, A at lr, in PEFT's four parameter groups.

Checked: which parameter lands in which group with which lr and weight decay; ratio 1 is plain AdamW
bit for bit; a schedule keeps the ratio; one step equals PEFT's ``create_loraplus_optimizer`` with
``torch.optim.AdamW`` on the same weights and gradients; and on the shipped tiny base, at one lr
and step count, ratio 16 fine-tunes to a lower held-out loss than plain LoRA.
"""
from contextlib import nullcontext

import numpy as np
import pytest

from minilora import backend, settings
from minilora.lora import LoraConfig, create_loraplus_optimizer, get_peft_model
from minilora.optim import AdamW, get_cosine_schedule_with_warmup

from _lora_toy import ToyLM
from _tiny_llama import SMALL, model_of

F32_EPS = float(np.finfo(np.float32).eps)


def names_of(model, group):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return sorted(by_id[id(p)] for p in group["params"])


def toy_peft_model():
    """ToyLM with biases: LoRA on every Linear, the LoRA layers' biases trained ("lora_only") and the
    final RMSNorm trained whole (``modules_to_save``): every kind of trainable parameter once.
    Seeded: two calls build the same weights."""
    backend.manual_seed(0)
    return get_peft_model(ToyLM(bias=True), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], bias="lora_only",
        modules_to_save=["norm"], init_lora_weights=False))


def test_groups_hold_a_at_lr_and_b_at_ratio_times_lr():
    model = toy_peft_model()
    opt = create_loraplus_optimizer(model, AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                    loraplus_weight_decay=0.05, betas=(0.8, 0.99))
    group_a, embedding, group_b, group_b_no_decay = opt.param_groups
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    lora_a = [n for n in trainable if ".lora_A." in n]
    lora_b = [n for n in trainable if ".lora_B." in n]
    biases = [n for n in trainable if n.endswith(".bias")]
    norm = [n for n in trainable if "norm.modules_to_save" in n]
    assert lora_a and lora_b and biases and norm
    assert sorted(lora_a + lora_b + biases + norm) == trainable
    assert names_of(model, group_a) == sorted(lora_a)
    assert names_of(model, embedding) == []           # minilora's LoRA wraps Linear layers only
    assert names_of(model, group_b) == sorted(lora_b + norm)   # B and the 1-D norm weight
    assert names_of(model, group_b_no_decay) == sorted(biases)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-6, 16e-3, 16e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.05, 0.05, 0.0]
    assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)    # kwargs reach the optimizer


def test_refuses_a_model_without_trainable_parameters():
    model = model_of()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="get_peft_model"):
        create_loraplus_optimizer(model, AdamW, lr=1e-3, loraplus_lr_ratio=16)


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_ratio_one_is_plain_adamw_bit_for_bit(reference):
    """With ratio 1 every group has lr and the same decay, so each parameter's update is AdamW's."""
    def stepped(make_optimizer):
        model = get_peft_model(model_of(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False))
        opt = make_optimizer(model)
        ids = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (2, 9))
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return {n: p.data.copy() for n, p in model.named_parameters() if p.requires_grad}

    with settings.reference() if reference else nullcontext():
        plus = stepped(lambda m: create_loraplus_optimizer(m, AdamW, lr=1e-2, loraplus_lr_ratio=1.0,
                                                          loraplus_weight_decay=0.1))
        plain = stepped(lambda m: AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2,
                                        weight_decay=0.1))
    assert plus.keys() == plain.keys()
    for name in plus:
        np.testing.assert_array_equal(plus[name], plain[name], err_msg=name)


def test_paged_adamw_takes_the_groups_too():
    """PagedAdamW (its state paged through host buffers) is AdamW over the same four groups."""
    from minilora.paged_optim import PagedAdamW

    def stepped(optimizer_cls, **kw):
        model = toy_peft_model()
        opt = create_loraplus_optimizer(model, optimizer_cls, lr=1e-2, loraplus_lr_ratio=8,
                                        loraplus_weight_decay=0.1, **kw)
        ids = np.random.default_rng(2).integers(0, 20, (2, 6))
        model(ids, labels=ids).loss.backward()
        opt.step()
        return [p.data.copy() for g in opt.param_groups for p in g["params"]]

    for got, want in zip(stepped(PagedAdamW, paged=True), stepped(AdamW)):
        np.testing.assert_array_equal(got, want)


def test_a_loraplus_run_resumes_bit_for_bit(tmp_path):
    """The checkpoint keeps the four groups (their lr, initial_lr and AdamW moments): stopping after
    3 steps and resuming gives the uninterrupted run's losses and weights exactly."""
    from minilora.train import train

    def run(steps, resume_from=None):
        model = get_peft_model(model_of(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
        opt = create_loraplus_optimizer(model, AdamW, lr=1e-2, loraplus_lr_ratio=16)
        sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
        batch = lambda step: (np.random.default_rng(step).integers(0, SMALL["vocab_size"], (2, 9)),) * 2
        history = train(model, batch, opt, steps, scheduler=sched, progress=False, seed=0,
                        checkpoint_dir=tmp_path / "run" if resume_from is None else None,
                        resume_from=resume_from)
        return [h["loss"] for h in history], [p.data.copy() for p in model.parameters()]

    whole_losses, whole_weights = run(6)
    run(3)
    losses, weights = run(6, resume_from=tmp_path / "run")
    assert losses == whole_losses
    for got, want in zip(weights, whole_weights):
        np.testing.assert_array_equal(got, want)


def test_a_schedule_keeps_the_ratio():
    """LambdaLR scales each group's initial lr by one factor, so η_B / η_A stays the ratio."""
    model = toy_peft_model()
    opt = create_loraplus_optimizer(model, AdamW, lr=2e-3, loraplus_lr_ratio=16)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=10)
    for _ in range(6):
        sched.step()
        lr_a, _, lr_b, lr_b_no_decay = sched.get_last_lr()
        assert lr_a > 0
        assert lr_b == pytest.approx(16 * lr_a, rel=1e-12) and lr_b_no_decay == lr_b


# ------------------------------------------------------------------ against PEFT's function
TINY = dict(vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


@pytest.mark.interop
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_groups_and_one_adamw_step_equal_peft(tmp_path):
    torch = pytest.importorskip("torch", reason="interop needs torch")
    transformers = pytest.importorskip("transformers", reason="interop needs transformers")
    peft = pytest.importorskip("peft", reason="interop needs peft")
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus
    from minilora.models import LlamaConfig, LlamaForCausalLM

    backend.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(tmp_path)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
              modules_to_save=["model.norm"], init_lora_weights=False)
    ours = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path), LoraConfig(**kw))
    theirs = peft.get_peft_model(
        transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32),
        peft.LoraConfig(**kw))
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    other = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(other)
    rng = np.random.default_rng(4)
    for name, p in mine.items():          # the same weights and the same gradients on both sides
        p.data[...] = rng.standard_normal(p.shape).astype(np.float32) * 0.1
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
        with torch.no_grad():
            other[name].copy_(torch.from_numpy(p.data))
        other[name].grad = torch.from_numpy(p.grad.copy())
    before = {n: p.data.copy() for n, p in mine.items()}

    args = dict(lr=3e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1, betas=(0.9, 0.95))
    opt = create_loraplus_optimizer(ours, AdamW, **args)
    torch_opt = peft_loraplus(theirs, torch.optim.AdamW, **args)

    their_names = {id(p): n for n, p in theirs.named_parameters()}
    assert len(opt.param_groups) == len(torch_opt.param_groups) == 4
    for g, tg in zip(opt.param_groups, torch_opt.param_groups):
        assert names_of(ours, g) == sorted(their_names[id(p)] for p in tg["params"])
        assert g["lr"] == tg["lr"] and g["weight_decay"] == tg["weight_decay"]
    assert any(n.endswith("norm.modules_to_save.default.weight")
               for n in names_of(ours, opt.param_groups[2]))

    opt.step()
    torch_opt.step()
    for g in opt.param_groups:
        for p in g["params"]:
            name = {id(q): n for n, q in mine.items()}[id(p)]
            want = other[name].detach().numpy()
            # one step moves w by lr·(1 + λ|w|) at most (|m̂ / (√v̂ + ε)| <= 1 at step 1); two float32
            # arrangements of that arithmetic differ by a few ulps of |w| and of the step
            bound = 4 * F32_EPS * (np.abs(before[name]) + g["lr"] * (1 + g["weight_decay"]))
            assert np.all(np.abs(p.data - want) <= bound), name
            assert not np.array_equal(p.data, before[name]), name


# ------------------------------------------------------------------ on the shipped tiny base
def test_loraplus_fine_tunes_faster_than_lora_at_the_same_lr():
    """10 seeded steps at lr 1e-3 on the instruction tasks: B at 16x lr reaches a held-out loss well
    below plain LoRA's (measured: 2.87 against 4.07 nats per byte; half a nat is asked)."""
    from minilora.data import ByteTokenizer, collate, make_instruction_dataset
    from minilora.models import load_base_model
    from minilora.train import evaluate, train

    tok = ByteTokenizer()
    train_set, test = make_instruction_dataset(400, 70, seed=0)
    held_out = [collate(test[:35], tok), collate(test[35:], tok)]
    losses = {}
    for ratio in (1, 16):
        backend.manual_seed(0)
        model = get_peft_model(load_base_model(), LoraConfig(r=8, lora_alpha=16,
                                                             target_modules=["q_proj", "v_proj"]))
        opt = create_loraplus_optimizer(model, AdamW, lr=1e-3, loraplus_lr_ratio=ratio)
        rng = np.random.default_rng(1)
        train(model, lambda step: collate([train_set[i] for i in rng.integers(0, 400, 8)], tok),
              opt, steps=10, progress=False, seed=0, data_parallel=False)
        losses[ratio] = evaluate(model, held_out)
    assert losses[16] < losses[1] - 0.5, losses
