"""The model's output head and loss as one op (``models.llama.causal_lm_head_loss``, whose fast twin
is ``fast.functional.linear_cross_entropy``) against the two-op reference path.

``LlamaForCausalLM(ids, labels=...)`` on the fast path never builds the (B, T, V) logits for the
loss; its output still gives ``.logits`` (computed when read). Tolerance, as in
tests/test_functional_fused.py: 8 (K + S) u * scale with u = 2^-53 (float64 here), S = 10 rounded
steps and K the longest sum; through a 2-layer model the sums are at most a few hundred terms, so
1e-12 is far above rounding and far below any formula error (order one).
"""
import numpy as np
import pytest

import minilora
from minilora import backend
from minilora.lora import LoraConfig, get_peft_model
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.models.llama import CausalLMOutput

CFG = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
TOL = 1e-12


def _model():
    backend.manual_seed(0)
    model = LlamaForCausalLM(CFG)
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    return model


def _loss_and_grads(model, ids, labels, reference: bool):
    model.zero_grad()
    with minilora.reference(reference):
        out = model(ids, labels=labels)
        out.loss.backward()
        logits = out.logits.data.copy()
    grads = {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}
    return out, out.loss.item(), logits, grads


@pytest.mark.fast_path
def test_fused_head_loss_equals_the_reference_and_logits_are_still_there():
    model = _model()
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 9))
    labels = ids.copy()
    labels[0, :4] = -100                                   # a prompt: no loss there
    fast, loss_f, logits_f, grads_f = _loss_and_grads(model, ids, labels, reference=False)
    ref, loss_r, logits_r, grads_r = _loss_and_grads(model, ids, labels, reference=True)
    assert fast.loss._op == "linear_cross_entropy" and ref.loss._op != "linear_cross_entropy"
    assert isinstance(fast, CausalLMOutput) and not fast.logits.requires_grad
    assert abs(loss_f - loss_r) <= TOL
    np.testing.assert_allclose(logits_f, logits_r, rtol=0, atol=TOL)
    assert grads_f.keys() == grads_r.keys() and "lm_head.weight" in grads_f   # tied: embed's too
    for name in grads_r:
        np.testing.assert_allclose(grads_f[name], grads_r[name], rtol=0, atol=TOL, err_msg=name)


def test_a_wrapped_head_keeps_the_two_op_path():
    """LoRA on lm_head replaces the plain Linear: the loss is then cross_entropy(lm_head(h))."""
    model = get_peft_model(_model(), LoraConfig(r=2, target_modules=["lm_head"]))
    ids = np.arange(8).reshape(1, 8)
    out = model(ids, labels=ids)
    assert out.loss._op != "linear_cross_entropy" and out.logits.shape == (1, 8, CFG.vocab_size)
