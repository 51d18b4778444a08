"""Training faults are caught before they reach the weights: a non-finite loss or gradient stops the
run (or skips the step, counted), a diverged run is warned about and marked, no checkpoint holds
inf or NaN, and the gradient norm neither overflows nor hides an inf (torch's behaviour, checked
in tests/test_optim.py)."""
import math

import numpy as np
import pytest

from minilora import backend, nn
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.optim import AdamW, NonFiniteGradientError, clip_grad_norm_, global_grad_norm
from minilora.resume import list_checkpoints
from minilora.train import DivergenceWarning, NonFiniteError, TrainingError, train

CFG = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
           num_attention_heads=2, max_position_embeddings=16, pad_token_id=None)
FIXED = np.random.default_rng(0).integers(0, 32, (2, 8))


def tiny_model():
    backend.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG))


def weights(model):
    return {n: p.data.copy() for n, p in model.named_parameters()}


def poisoning_clip(model, bad_steps, value=np.inf):
    """(AdamW over the model, a stand-in for train's clip_grad_norm_ that plants ``value`` in
    lm_head's gradient on the calls in ``bad_steps`` (1-based) and then clips as usual): the loss
    stays finite, so only the gradient check can catch it."""
    import minilora.train as train_mod
    opt = AdamW(model.parameters(), lr=1e-2)
    head = model.lm_head.weight
    real_clip = train_mod.clip_grad_norm_
    calls = {"n": 0}

    def clip(params, max_norm, *a, **kw):
        calls["n"] += 1
        if calls["n"] in bad_steps:
            head.grad = head.grad.copy()
            head.grad[0, 0] = value
        return real_clip(params, max_norm, *a, **kw)
    return opt, clip


def test_nonfinite_error_is_a_runtime_error_and_the_old_floating_point_error():
    assert issubclass(NonFiniteError, TrainingError) and issubclass(NonFiniteError, RuntimeError)
    assert issubclass(NonFiniteError, FloatingPointError)


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_a_nonfinite_gradient_stops_before_the_update(monkeypatch, value):
    model = tiny_model()
    opt, clip = poisoning_clip(model, {3}, value)
    monkeypatch.setattr("minilora.train.clip_grad_norm_", clip)
    seen = []
    with pytest.raises(NonFiniteError, match=r"gradient norm became (inf|nan) at step 3 \(in "
                                             r"lm_head.weight\)") as info:
        train(model, lambda s: (FIXED, FIXED), opt, 6, progress=False,
              eval_fn=lambda m: seen.append(weights(m)) or 0.0, eval_every=1)
    assert "\n" not in str(info.value)
    after_step_2 = seen[-1]
    for n, w in weights(model).items():       # the weights are exactly those after step 2
        np.testing.assert_array_equal(w, after_step_2[n], err_msg=n)
    assert all(p.grad is None for p in model.parameters())


def test_skip_counts_and_reports_nonfinite_steps(monkeypatch):
    model = tiny_model()
    opt, clip = poisoning_clip(model, {2, 4})
    monkeypatch.setattr("minilora.train.clip_grad_norm_", clip)
    with pytest.warns(RuntimeWarning, match="skipped 2 of 6 steps"):
        hist = train(model, lambda s: (FIXED, FIXED), opt, 6, progress=False, on_nonfinite="skip")
    assert hist.skipped_steps == [2, 4]
    assert [bool(h.get("skipped")) for h in hist] == [False, True, False, True, False, False]
    assert all(np.isfinite(p.data).all() for p in model.parameters())
    # the optimizer stepped 4 times, not 6
    assert opt.state[id(model.lm_head.weight)]["step"] == 4
    with pytest.raises(ValueError, match="on_nonfinite must be"):
        train(model, lambda s: (FIXED, FIXED), opt, 1, progress=False, on_nonfinite="ignore")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_a_nan_loss_stops_without_a_checkpoint_of_nan(tmp_path):
    model = tiny_model()
    opt = AdamW(model.parameters(), lr=1e-2)
    nothing = np.full_like(FIXED, -100)

    def batch(step):
        return (FIXED, FIXED) if step < 4 else (FIXED, nothing)   # step 5's loss is NaN
    with pytest.raises(NonFiniteError, match="loss became nan at step 5; the weights are those "
                                             "after step 4"):
        train(model, batch, opt, 8, progress=False, checkpoint_dir=tmp_path / "ck",
              checkpoint_every=2)
    assert [c.name for c in list_checkpoints(tmp_path / "ck")] == ["checkpoint-000002",
                                                                   "checkpoint-000004"]
    assert all(np.isfinite(p.data).all() for p in model.parameters())


def test_a_huge_learning_rate_is_caught_as_divergence():
    """lr 1e6: one step throws the weights so far that float32's softmax saturates; from then on
    the loss is frozen and every gradient exactly zero. The run is marked diverged and warned
    about (and the weights stay finite)."""
    model = tiny_model()
    opt = AdamW(model.parameters(), lr=1e6, weight_decay=0.0)
    data = np.random.default_rng(1)

    def batch(step):
        ids = data.integers(0, 32, (4, 8))
        return ids, ids.copy()
    with pytest.warns(DivergenceWarning, match="training diverged: the gradients were exactly zero"):
        hist = train(model, batch, opt, 30, progress=False)
    assert hist.diverged.startswith("the gradients were exactly zero")
    assert all(np.isfinite(p.data).all() for p in model.parameters())


def test_zero_gradients_for_several_steps_are_divergence():
    """A saturated model: the final norm's gain is 0, so the head sees zero hidden states and its
    gradient (logits' gradient times hidden states) is exactly zero at every step."""
    model = tiny_model()
    model.requires_grad_(False)
    model.model.norm.weight.data[...] = 0.0
    model.lm_head.weight.requires_grad_(True)
    opt = AdamW([model.lm_head.weight], lr=1e-3)
    with pytest.warns(DivergenceWarning, match="exactly zero for 5 steps in a row"):
        hist = train(model, lambda s: (FIXED, FIXED), opt, 6, progress=False)
    assert "steps 1-5" in hist.diverged


def test_a_healthy_run_is_not_diverged():
    model = tiny_model()
    opt = AdamW(model.parameters(), lr=1e-2)
    hist = train(model, lambda s: (FIXED, FIXED), opt, 30, progress=False)
    assert hist.diverged is None and hist.skipped_steps == []


# ------------------------------------------------------------------ the norm itself
def grads(*arrays):
    ps = []
    for a in arrays:
        p = nn.Parameter(np.zeros(np.shape(a), dtype=np.float32))
        p.grad = np.asarray(a, dtype=np.float32)
        ps.append(p)
    return ps


def test_norm_of_huge_finite_gradients_does_not_overflow():
    ps = grads([3e38, 3e38], [1.0])
    want = math.sqrt(2 * 3e38 ** 2 + 1.0)       # 4.24e38: above float32's max, fine in a float
    assert global_grad_norm(ps) == pytest.approx(want, rel=1e-6)
    total = clip_grad_norm_(ps, 1.0)
    assert total == pytest.approx(want, rel=1e-6)
    clipped = np.concatenate([p.grad for p in ps])
    np.testing.assert_allclose(clipped, [3e38 / want, 3e38 / want, 1.0 / want], rtol=1e-6)
    assert global_grad_norm(ps) == pytest.approx(1.0, rel=1e-5)


def test_nonfinite_norm_is_reported_and_gradients_left_alone():
    ps = grads([np.inf, 1.0], [2.0])
    assert clip_grad_norm_(ps, 1.0) == math.inf
    np.testing.assert_array_equal(ps[0].grad, [np.inf, 1.0])    # not turned into NaN
    assert math.isnan(clip_grad_norm_(grads([np.inf, np.nan], [1.0]), 1.0))
    with pytest.raises(NonFiniteGradientError, match="error_if_nonfinite=False"):
        clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    assert issubclass(NonFiniteGradientError, RuntimeError)
    assert global_grad_norm(grads([0.0, 0.0])) == 0.0
