"""Two paths, one meaning: one training step on the fast path and inside ``minilora.reference()``.

From the same weights and batch, full fine-tuning, LoRA (dropout 0 and 0.1, same seed) and QLoRA
(NF4 base) give the same loss, the same gradient for every trainable parameter, and the same
parameters after one AdamW step, up to float32 rounding; and in reference mode no fast code runs
(no function of ``minilora/fast/`` nor ``lora/fused.py`` is even called), while on the fast path it
does (so the check is not vacuous).
"""
import os
import sys
import threading
from collections import Counter

import numpy as np
import pytest

import minilora
from minilora import backend
from minilora.data_parallel import DataParallel, DataParallelOutput
from minilora.lora import LoraConfig, get_peft_model
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.optim import AdamW

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
LR, EPS = 1e-3, 1e-8

# Tolerances from float32 rounding. Unit roundoff u = 2^-24 ~ 6e-8. The two paths sum the same
# products in other orders (BLAS blocking, fused vs composite ops, micro-batches summed per replica
# then added), and a K-term sum in another order differs by ~sqrt(K)*u of the sum of its |terms|
# (rounding errors add like a random walk). The longest sums here have K <= 64 (hidden 32,
# intermediate 64, vocab 64, B*T = 64 rows in a weight gradient): sqrt(64)*u ~ 5e-7. The backward
# chains about ten such stages through two layers: ~5e-6, relative to the gradient's largest entry
# (a small entry carries the absolute error of the sums it came from, so the scale is the tensor's).
# Safety factor 4: 2e-5. (Measured: at most 6e-7; a dropout mask or a scaling that differs gives
# differences of order 1.)
GRAD_TOL = 2e-5
U32 = 2.0 ** -24

FAST_FILES = (os.path.join(os.path.dirname(minilora.__file__), "fast") + os.sep,
              os.path.join(os.path.dirname(minilora.__file__), "lora", "fused.py"))


def _build(kind: str):
    backend.manual_seed(0)
    model = LlamaForCausalLM(CFG)
    # init_lora_weights=False: B random too, so that A's gradient is not identically zero
    if kind == "full":
        return model
    if kind == "qlora":
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
                              quantize="nf4")
    dropout = 0.1 if kind == "lora_dropout" else 0.0
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                            init_lora_weights=False))


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (4, 16))
    labels = ids.copy()
    labels[0, :5] = -100                      # a prompt: no loss on it
    mask = np.ones_like(ids)
    mask[1, :3] = 0                           # left padding
    labels[1, :3] = -100
    return ids, labels, mask


class _FastCalls:
    """Counts calls of functions defined in minilora/fast/ and lora/fused.py, in every thread."""

    def __init__(self):
        self.calls = Counter()

    def _profile(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(FAST_FILES):
            self.calls[f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"] += 1

    def __enter__(self):
        sys.setprofile(self._profile)
        threading.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        threading.setprofile(None)


def _one_step(kind: str, reference: bool):
    """Loss, gradients, updated parameters and the fast calls of one step (forward, backward, AdamW).

    The step is the training loop's: through ``DataParallel`` on two threads (on the fast path it
    splits the batch; in reference mode it is the plain call). With dropout it calls the model
    itself: the split draws each micro-batch's mask from a generator of its own, so its masks are
    not the plain step's (same distribution, other numbers)."""
    model = _build(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=LR, eps=EPS)
    net = model if kind == "lora_dropout" else DataParallel(model, n_threads=2)
    ids, labels, mask = _batch()
    with minilora.reference(reference), _FastCalls() as fast:
        backend.manual_seed(1)                   # the dropout masks
        out = net(ids, labels=labels, attention_mask=mask)
        out.loss.backward()
        grads = [p.grad.copy() for p in params]
        opt.step()
    split = isinstance(out, DataParallelOutput)
    return out.loss.item(), grads, [p.data.copy() for p in params], fast.calls, split


KINDS = ["full", "lora", "lora_dropout", "qlora"]


@pytest.mark.parametrize("kind", KINDS)
def test_reference_mode_runs_no_fast_code(kind):
    calls_f, split_f = _one_step(kind, reference=False)[3:]
    calls_r, split_r = _one_step(kind, reference=True)[3:]
    assert calls_f, "no fast code ran on the fast path: the other test's comparison would be vacuous"
    assert split_f == (kind != "lora_dropout") and not split_r
    assert calls_r == Counter(), f"fast code ran in reference mode: {dict(calls_r)}"


@pytest.mark.parametrize("kind", KINDS)
def test_one_training_step_is_the_same_on_both_paths(kind):
    loss_f, grads_f, w_f = _one_step(kind, reference=False)[:3]
    loss_r, grads_r, w_r = _one_step(kind, reference=True)[:3]
    assert loss_f == pytest.approx(loss_r, rel=GRAD_TOL)
    assert len(grads_f) == len(grads_r) > 0
    for i, (gf, gr) in enumerate(zip(grads_f, grads_r)):
        scale = np.abs(gr).max()
        assert scale > 0, f"trainable parameter {i} got a zero gradient: nothing would be compared"
        np.testing.assert_allclose(gf, gr, rtol=0, atol=GRAD_TOL * scale, err_msg=f"gradient {i}")

    # AdamW's first step moves w by lr * (g / (|g| + eps) + wd * w) (m and v bias-corrected to g
    # and g^2). With the two paths' gradients g_f, g_r, the first term differs by at most
    # lr * |g_f - g_r| * eps / (m + eps)^2, m = min(|g_f|, |g_r|) when they share a sign, else 0
    # (the derivative of g / (|g| + eps) is eps / (|g| + eps)^2), and never by more than 2 lr.
    # On top: the float32 rounding of the update (a few u of lr) and of w - update (a few u of |w|).
    for i, (wf, wr, gf, gr) in enumerate(zip(w_f, w_r, grads_f, grads_r)):
        gf, gr = gf.astype(np.float64), gr.astype(np.float64)
        m = np.where(np.sign(gf) == np.sign(gr), np.minimum(np.abs(gf), np.abs(gr)), 0.0)
        bound = (LR * np.minimum(2.0, np.abs(gf - gr) * EPS / (m + EPS) ** 2 + 8 * U32)
                 + 4 * U32 * np.abs(wr))
        excess = np.abs(wf.astype(np.float64) - wr) - bound
        assert excess.max() <= 0, f"parameter {i} after AdamW: off by {excess.max():.3g} beyond the bound"
