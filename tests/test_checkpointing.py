"""Gradient checkpointing (``minilora.checkpoint``, ``model.gradient_checkpointing_enable()``).

With checkpointing the forward runs the same ops in the same order on the same numbers (under
``no_grad``), and backward runs each decoder layer's forward again and then exactly the backward
closures the plain graph would have run for that layer, in the same order: every layer's
gradients are accumulated in the same sequence, and the random generator is replayed, so dropout
draws the same mask. The expected difference is therefore zero, not a float32 rounding bound: these
tests compare loss and gradients bit for bit (``assert_array_equal``), for full fine-tuning, LoRA
with dropout, QLoRA, data-parallel replicas in threads and the reference path. The memory test
counts the bytes the graph keeps alive after forward (tracemalloc sees NumPy's buffers) and checks
that each checkpointed layer keeps exactly its (B, T, C) input.
"""
import gc
import threading
import tracemalloc

import numpy as np
import pytest

import minilora
from minilora import Tensor, backend, nn, no_grad
from minilora import functional as F
from minilora.autograd import enable_grad, is_grad_enabled
from minilora.checkpoint import checkpoint, trainable_parameters
from minilora.data_parallel import forward_backward
from minilora.lora import LoraConfig, get_peft_model
from minilora.models import LlamaConfig, LlamaForCausalLM

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           pad_token_id=None, bos_token_id=None, eos_token_id=None)
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def build(kind: str, checkpointing: bool, dropout: float = 0.1, **cfg):
    """A seeded model: "full" (every weight trained), "lora" (r=4 with dropout) or "qlora" (NF4
    base). LoRA B gets random values, so that every gradient is non-zero and a wrong one shows."""
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**CFG, **cfg}))
    if kind != "full":
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                          lora_dropout=dropout if kind == "lora" else 0.0)
        model = get_peft_model(model, lora, quantize="nf4" if kind == "qlora" else None)
        rng = np.random.default_rng(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data[...] = 0.1 * rng.standard_normal(p.shape).astype(np.float32)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def ids_of(B=2, T=16, seed=0):
    return np.random.default_rng(seed).integers(0, CFG["vocab_size"], (B, T))


def loss_and_grads(model, ids, step=None):
    """(loss, {name: grad or None}) of one forward + backward from the same generator state."""
    backend.manual_seed(7)
    if step is None:
        loss = model(ids, labels=ids).loss
        loss.backward()
    else:
        loss = step(model, ids)
    return loss.item(), {n: None if p.grad is None else p.grad.copy()
                         for n, p in model.named_parameters()}


def assert_same(plain, ckpt):
    (loss0, g0), (loss1, g1) = plain, ckpt
    assert loss1 == loss0
    assert g0.keys() == g1.keys()
    for name in g0:
        assert (g0[name] is None) == (g1[name] is None), name
        if g0[name] is not None:
            np.testing.assert_array_equal(g1[name], g0[name], err_msg=name)
    assert any(g is not None for g in g0.values())


def graph_ops(t) -> set:
    seen, stack, ops = set(), [t], set()
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            ops.add(node._op)
            stack.extend(node._prev)
    return ops


# ------------------------------------------------------------------ the model, every way it trains
@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
def test_checkpointing_gives_the_same_loss_and_gradients_bit_for_bit(kind):
    ids = ids_of()
    plain = loss_and_grads(build(kind, False), ids)
    model = build(kind, True)
    ckpt = loss_and_grads(model, ids)
    assert_same(plain, ckpt)
    if kind != "full":   # frozen weights: no gradient, with or without checkpointing
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(ckpt[1][n] is None for n in frozen)
        assert all(ckpt[1][n] is not None for n, p in model.named_parameters() if p.requires_grad)


def test_dropout_masks_are_replayed_not_redrawn():
    """LoRA dropout 0.5: a recomputation that drew a new mask would give other gradients. And the
    live generator ends where the plain run leaves it (the replay uses a copy)."""
    ids = ids_of()
    plain_model, ckpt_model = build("lora", False, dropout=0.5), build("lora", True, dropout=0.5)
    plain = loss_and_grads(plain_model, ids)
    after_plain = backend.rng().random()
    ckpt = loss_and_grads(ckpt_model, ids)
    after_ckpt = backend.rng().random()
    assert_same(plain, ckpt)
    assert after_ckpt == after_plain
    backend.manual_seed(8)                    # and another seed does change them: not vacuous
    other = ckpt_model(ids, labels=ids).loss
    assert other.item() != ckpt[0]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_reference_mode_with_checkpointing(kind):
    ids = ids_of()
    with minilora.reference():
        plain = loss_and_grads(build(kind, False), ids)
        ckpt = loss_and_grads(build(kind, True), ids)
    assert_same(plain, ckpt)


@pytest.mark.fast_path   # needs the fast path outside the block: MINILORA_REFERENCE=1 forces reference
def test_backward_recomputes_in_the_mode_forward_ran_in():
    """Forward in reference mode, backward outside it: the recomputation runs the reference path
    again (the fused LoRA op would round differently), so the gradients are those of reference."""
    ids = ids_of()
    with minilora.reference():
        plain = loss_and_grads(build("lora", False), ids)
    model = build("lora", True)
    backend.manual_seed(7)
    with minilora.reference():
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert not minilora.settings.reference_mode()
    assert_same(plain, (loss.item(), {n: None if p.grad is None else p.grad.copy()
                                      for n, p in model.named_parameters()}))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_data_parallel_replicas_in_threads(kind):
    """Two micro-batches on replicas in two threads, each checkpointing its layers (forward under
    no_grad in one thread while the other records its graph): the same bits as without."""
    ids = ids_of(B=4)

    def step(model, ids):
        return forward_backward(model, ids, ids, n_threads=2)

    plain = loss_and_grads(build(kind, False), ids, step)
    ckpt = loss_and_grads(build(kind, True), ids, step)
    assert_same(plain, ckpt)


def test_on_only_for_training_forwards_with_grad():
    model = build("lora", True)
    ids = ids_of()
    assert "checkpoint" in graph_ops(model(ids, labels=ids).loss)
    model.eval()
    assert "checkpoint" not in graph_ops(model(ids, labels=ids).loss)
    model.train()
    with no_grad():
        assert not model(ids, labels=ids).loss.requires_grad
    out = model.generate(ids[:, :4], max_new_tokens=3)
    assert out.shape == (2, 7)
    model.gradient_checkpointing_disable()
    assert "checkpoint" not in graph_ops(model(ids, labels=ids).loss)


def test_enable_disable_and_the_flag_through_peft_model():
    base = LlamaForCausalLM(LlamaConfig(**CFG))
    assert not base.is_gradient_checkpointing
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert peft.is_gradient_checkpointing and base.is_gradient_checkpointing
    peft.gradient_checkpointing_disable()
    assert not base.is_gradient_checkpointing
    with pytest.raises(ValueError, match="unknown keys"):
        base.gradient_checkpointing_enable({"preserve_rng_state": True})


# ------------------------------------------------------------------ memory
def kept_bytes(model, ids) -> int:
    """Bytes allocated by a forward and still alive when it returns: what the graph keeps for
    backward (the loss's graph holds every saved array), measured by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        loss = model(ids, labels=ids).loss
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    del loss
    return kept


def test_each_checkpointed_layer_keeps_only_its_input():
    """Sequence 128 with hidden 32: a layer's activations (attention's (B, H, T, T) probabilities,
    the MLP's (B, T, I) arrays, ...) dwarf its (B, T, C) input. With checkpointing, each extra layer
    adds exactly one (B, T, C) float32 array (32 KiB here) to what the graph keeps, plus about 2 KiB
    of Python objects (the node, its closure, the generator state): the bound below allows 4 KiB.
    Measured: 1.8 MB per layer without checkpointing, 34 KB with it; the whole graph of 4 layers
    7.9 MB against 0.83 MB (the embedding, the head's logits and the loss are the floor that stays)."""
    B, T, C = 2, 128, CFG["hidden_size"]
    ids = ids_of(B=B, T=T)
    cfg = dict(intermediate_size=128, max_position_embeddings=T)
    kept = {(L, c): kept_bytes(build("lora", c, num_hidden_layers=L, **cfg), ids)
            for L in (2, 4) for c in (False, True)}
    per_layer_input = B * T * C * 4
    per_layer_ckpt = (kept[4, True] - kept[2, True]) / 2
    per_layer_plain = (kept[4, False] - kept[2, False]) / 2
    assert per_layer_input <= per_layer_ckpt <= per_layer_input + 4096
    assert per_layer_plain >= 10 * per_layer_ckpt
    assert kept[4, False] >= 5 * kept[4, True]


# ------------------------------------------------------------------ checkpoint() itself
class Block(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.frozen = nn.Linear(d, d)
        self.frozen.weight.requires_grad = False

    def forward(self, x, scale):
        h = F.dropout(self.lin(x), 0.3, self.training) * scale
        return self.frozen(F.silu(h)) + x


def test_checkpoint_of_a_module_with_an_input_that_needs_grad():
    backend.manual_seed(0)
    block = Block()
    x0 = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    results = []
    for use in (False, True):
        x = Tensor(x0, requires_grad=True)
        backend.manual_seed(3)
        y = checkpoint(block, x, 2.0) if use else block(x, 2.0)
        assert (y._op == "checkpoint") == use
        (y * y).sum().backward()
        results.append((y.data.copy(), x.grad.copy(), block.lin.weight.grad.copy()))
        assert block.frozen.weight.grad is None
        block.lin.weight.grad = None
    for a, b in zip(*results):
        np.testing.assert_array_equal(b, a)


def test_checkpoint_with_explicit_params_and_a_frozen_input():
    """A plain function reaches its weight as a closure: ``params=`` tells checkpoint it is trained
    (without it, no input requiring grad would mean no graph: the plain call)."""
    w = Tensor(np.arange(4, dtype=np.float32).reshape(2, 2), requires_grad=True)
    x = Tensor(np.ones((3, 2), np.float32))

    def fn(x):
        return (x @ w).tanh()

    assert trainable_parameters(fn) == []
    assert checkpoint(fn, x)._op == "tanh"   # the plain call: fn's own graph, kept whole
    y = checkpoint(fn, x, params=[w])
    assert y._op == "checkpoint" and y._prev == (w,)
    y.sum().backward()
    expected = x.data.T @ (1 - np.tanh(x.data @ w.data) ** 2)
    np.testing.assert_allclose(w.grad, expected, rtol=1e-6)


def test_checkpoint_is_the_plain_call_without_grad_and_rejects_non_tensor_outputs():
    block = Block()
    x = Tensor(np.ones((2, 6), np.float32), requires_grad=True)
    with no_grad():
        assert checkpoint(block, x, 1.0)._op != "checkpoint"
    with pytest.raises(TypeError, match="must return one Tensor"):
        checkpoint(lambda x: x.data, x)


def test_grad_mode_is_per_thread():
    """checkpoint's forward runs under no_grad; in data_parallel another thread records its graph
    at the same time, so no_grad must not reach across threads."""
    inside, seen = threading.Event(), {}

    def other():
        inside.wait()
        seen["other"] = is_grad_enabled()

    t = threading.Thread(target=other)
    t.start()
    with no_grad():
        seen["here"] = is_grad_enabled()
        inside.set()
        t.join()
        with enable_grad():
            seen["enabled"] = is_grad_enabled()
    assert seen == {"here": False, "other": True, "enabled": True} and is_grad_enabled()
