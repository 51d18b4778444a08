"""Data parallelism over CPU threads (minilora.data_parallel): ``DataParallel(model)`` is called like
the model and its loss's ``backward()`` like any loss; the split batch gives the full batch's loss
and gradients, replicas share the weights' memory, the result never depends on timing, and when it
does not split it is exactly the model's own call."""
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import backend, settings
from minilora.fast import parallel
from minilora import data_parallel as DP
from minilora.lora import LoraConfig, get_peft_model
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.nn import Linear, Module
from minilora.quant import quantize_model

# The split itself is the fast path: in reference mode the wrapper is the plain call (tested here
# too, with settings.reference()), so these checks have nothing to split there.
pytestmark = pytest.mark.fast_path


def _llama(dtype=np.float64, tie=True):
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.data = p.data.astype(dtype)
    return model


def _batch(B=5, T=9):
    """ids, labels with a prompt masked in row 0 and no target at all in row 3, a padding mask."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 61, (B, T))
    labels = ids.copy()
    labels[0, :6] = -100
    labels[3, :] = -100
    mask = np.ones((B, T), np.int64)
    mask[1, :2] = 0
    labels[1, :2] = -100
    return ids, labels, mask


def _grads(model):
    return {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}


def _clear(model):
    for p in model.parameters():
        p.grad = None


def _step(model, ids, labels, mask=None, n_threads=None):
    """The training loop's two lines through the wrapper; returns the loss value."""
    kwargs = {} if mask is None else {"attention_mask": mask}
    loss = DP.DataParallel(model, n_threads=n_threads)(ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss.item()


def _plain_then_split(model, n_threads, **kw):
    ids, labels, mask = _batch()
    plain = _step(model, ids, labels, mask, n_threads=1)
    g_plain = _grads(model)
    _clear(model)
    split = _step(model, ids, labels, mask, n_threads=n_threads)
    g_split = _grads(model)
    _clear(model)
    return plain, g_plain, split, g_split


@pytest.mark.parametrize("n_threads", [2, 3, 5])
@pytest.mark.parametrize("tie", [True, False])
def test_split_batch_gives_the_full_batch_loss_and_gradients_float64(n_threads, tie):
    """Micro-batches weighted by their target counts (row 3 has none, row 0 few) add up to the full
    batch exactly in float64 (differences are summation-order rounding, ~1e-16)."""
    model = _llama(np.float64, tie)
    plain, g_plain, split, g_split = _plain_then_split(model, n_threads)
    assert split == pytest.approx(plain, rel=0, abs=1e-13)   # float64: the model's dtype
    assert g_split.keys() == g_plain.keys() and len(g_plain) == len(list(model.parameters()))
    for name in g_plain:
        np.testing.assert_allclose(g_split[name], g_plain[name], rtol=0, atol=1e-13, err_msg=name)


_MODEL64 = None


@given(B=st.integers(2, 6), T=st.integers(2, 8), n_threads=st.integers(2, 4),
       seed=st.integers(0, 2 ** 16), p_ignore=st.sampled_from([0.0, 0.5, 0.9]))
def test_any_split_equals_the_full_batch_float64(B, T, n_threads, seed, p_ignore):
    """Property: for any batch shape, thread count and pattern of ignored targets (whole rows
    included), the split step's loss and gradients are the full batch's, to float64 rounding."""
    global _MODEL64
    if _MODEL64 is None:
        backend.manual_seed(0)
        _MODEL64 = _llama(np.float64, tie=False)
    model = _MODEL64
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 61, (B, T))
    labels = np.where(rng.random((B, T)) < p_ignore, -100, ids)
    if (labels[:, 1:] == -100).all():
        labels[0, -1] = ids[0, -1]                       # at least one target in the batch
    _clear(model)
    plain = _step(model, ids, labels, n_threads=1)
    g_plain = _grads(model)
    _clear(model)
    split = _step(model, ids, labels, n_threads=n_threads)
    g_split = _grads(model)
    _clear(model)
    assert split == pytest.approx(plain, rel=0, abs=1e-13)
    assert g_split.keys() == g_plain.keys()
    for name in g_plain:
        np.testing.assert_allclose(g_split[name], g_plain[name], rtol=0, atol=1e-12, err_msg=name)


def test_lora_model_float32_within_rounding_and_only_lora_factors_get_gradients():
    """float32: the split sums the same products in another order, so they agree to a few float32
    ulps of the gradient's scale (eps 6e-8 x terms ~1e2 summed => 1e-5 relative is generous)."""
    backend.manual_seed(0)
    model = get_peft_model(_llama(np.float32), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                           target_modules=["q_proj", "v_proj"]))
    plain, g_plain, split, g_split = _plain_then_split(model, 2)
    assert split == pytest.approx(plain, rel=1e-6)
    assert g_plain and all("lora_" in n for n in g_plain)
    assert g_split.keys() == g_plain.keys()
    for name in g_plain:
        scale = np.abs(g_plain[name]).max()
        np.testing.assert_allclose(g_split[name], g_plain[name], rtol=0, atol=1e-5 * scale,
                                   err_msg=name)


def test_qlora_threads_use_their_own_dequantization_buffers():
    """q_proj and o_proj have one shape, so they share a scratch buffer: if the two threads shared
    one too, a thread's GEMM would read the other thread's layer and the gradients would be wrong."""
    backend.manual_seed(0)
    base = quantize_model(_llama(np.float32, tie=False), double_quant=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for _ in range(3):                                     # a race would show up on some repeat
        plain, g_plain, split, g_split = _plain_then_split(model, 2)
        assert split == pytest.approx(plain, rel=1e-6)
        for name in g_plain:
            scale = np.abs(g_plain[name]).max()
            np.testing.assert_allclose(g_split[name], g_plain[name], rtol=0, atol=1e-5 * scale,
                                       err_msg=name)


def test_gradients_accumulate_into_existing_ones_like_backward():
    model = _llama()
    ids, labels, mask = _batch()
    _step(model, ids, labels, mask, n_threads=1)
    once = _grads(model)
    _step(model, ids, labels, mask, n_threads=2)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, 2 * once[name], rtol=0, atol=1e-13)


def test_one_thread_is_exactly_the_plain_call():
    """Without a split the wrapper is the model's own call: same output type, logits, loss, bits."""
    model = _llama(np.float32)
    ids, labels, mask = _batch()
    ref_out = model(ids, labels=labels, attention_mask=mask)
    ref_out.loss.backward()
    ref = _grads(model)
    _clear(model)
    out = DP.DataParallel(model, n_threads=1)(ids, labels=labels, attention_mask=mask)
    assert type(out) is type(ref_out)
    np.testing.assert_array_equal(out.logits.data, ref_out.logits.data)
    assert out.loss.item() == ref_out.loss.item()
    out.loss.backward()
    for name, g in _grads(model).items():
        np.testing.assert_array_equal(g, ref[name])
    assert DP.DataParallel(model)(ids).data.shape == (5, 9, 61)     # no labels: logits, as model(ids)


def test_a_split_call_returns_the_loss_as_a_graph_node_and_no_logits():
    """The split loss is a Tensor in a graph: an upstream gradient (here 3) scales every replica's
    share, as for any loss; logits are None (documented: the model's own call gives them)."""
    model = _llama(np.float64)
    ids, labels, mask = _batch()
    plain = _step(model, ids, labels, mask, n_threads=1)
    g_plain = _grads(model)
    _clear(model)
    out = DP.DataParallel(model, n_threads=2)(ids, labels=labels, attention_mask=mask)
    assert isinstance(out, DP.DataParallelOutput) and out.logits is None
    assert out.loss.requires_grad and all(p.grad is None for p in model.parameters())  # no backward yet
    assert out.loss.item() == pytest.approx(plain, rel=0, abs=1e-13)
    (out.loss * 3.0).backward()
    for name, g in _grads(model).items():
        np.testing.assert_allclose(g, 3 * g_plain[name], rtol=0, atol=1e-13, err_msg=name)


def test_micro_batches_go_to_threads_at_the_call_and_at_backward(monkeypatch):
    """The micro-batches are handed to run_chunks with BLAS held to one thread: once for the
    forwards at the call, once for the backwards at ``backward()``."""
    model = _llama(np.float64)
    ids, labels, mask = _batch()
    calls = []
    real = parallel.run_chunks

    def spy(fn, chunks, blas_one_thread=False):
        if len(chunks) > 1:                 # the kernels inside run one chunk each (one thread)
            calls.append((len(chunks), blas_one_thread))
        return real(fn, chunks, blas_one_thread)
    monkeypatch.setattr(parallel, "run_chunks", spy)
    out = DP.DataParallel(model, n_threads=2)(ids, labels=labels, attention_mask=mask)
    assert calls == [(2, True)]
    out.loss.backward()
    assert calls == [(2, True), (2, True)]
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("why", ["reference", "no_grad", "extra_kwarg", "no_labels"])
def test_no_split_where_it_cannot_or_must_not(monkeypatch, why):
    """Reference mode (one thread, no replicas), no grad, an argument the wrapper cannot slice, no
    labels: the plain call, and no replica is ever made."""
    monkeypatch.setattr(DP, "replicate", lambda m: pytest.fail("replicated"))
    model = _llama(np.float32)
    ids, labels, mask = _batch()
    wrapper = DP.DataParallel(model, n_threads=2)
    if why == "reference":
        with settings.reference():
            out = wrapper(ids, labels=labels, attention_mask=mask)
    elif why == "no_grad":
        from minilora import no_grad
        with no_grad():
            out = wrapper(ids, labels=labels, attention_mask=mask)
    elif why == "extra_kwarg":
        out = wrapper(ids, labels=labels, attention_mask=mask, past_key_values=None)
    else:
        out = wrapper(ids, labels=None)
    assert out is not None and not isinstance(out, DP.DataParallelOutput)


def test_the_wrapper_reaches_the_model_like_torch_ddp():
    model = _llama(np.float32)
    wrapper = DP.DataParallel(model)
    assert wrapper.module is model
    assert [id(p) for p in wrapper.parameters()] == [id(p) for p in model.parameters()]
    wrapper.eval()
    assert not model.training
    wrapper.train()
    assert model.training


def test_forward_backward_is_the_wrapper_in_one_call():
    """forward_backward (benchmarks, notebook 08) = the wrapper's loss and backward, same bits."""
    model = _llama(np.float32)
    ids, labels, mask = _batch()
    ref = _step(model, ids, labels, mask, n_threads=2)
    g_ref = _grads(model)
    _clear(model)
    loss = DP.forward_backward(model, ids, labels, mask, n_threads=2)
    assert loss.item() == ref and not loss.requires_grad
    for name, g in _grads(model).items():
        np.testing.assert_array_equal(g, g_ref[name])


def test_same_seed_same_bits_with_dropout():
    """Each micro-batch draws its dropout mask from its own generator spawned from backend.rng(), so
    two runs from one seed are bit-identical whatever order the threads ran in; the spawn leaves
    backend.rng()'s stream where it was (the batches it draws do not change)."""
    runs = []
    for _ in range(2):
        backend.manual_seed(0)
        model = get_peft_model(_llama(np.float32), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                              init_lora_weights=False))
        backend.manual_seed(7)
        ids, labels, mask = _batch()
        for _ in range(3):
            _step(model, ids, labels, mask, n_threads=2)
        runs.append((_grads(model), backend.rng().random()))
    assert runs[0][1] == runs[1][1] == np.random.default_rng(7).random()
    for name, g in runs[0][0].items():
        np.testing.assert_array_equal(g, runs[1][0][name])


@pytest.mark.parametrize("lora", [False, True])
def test_replicas_share_the_weights_memory_and_keep_ties(lora):
    """Trainable Parameters are new objects over the same arrays; frozen modules are shared as they
    are (a LoRA model's MLPs, base layers, norms and tied embeddings)."""
    model = _llama(np.float32, tie=True)
    if lora:
        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4))
    replica, mapping = DP.replicate(model)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in replica.named_parameters()] == names
    for (_, p), (_, r) in zip(model.named_parameters(), replica.named_parameters()):
        assert r.data is p.data and r.requires_grad == p.requires_grad
        assert (r is not p and mapping[id(p)] is r) if p.requires_grad else r is p
    base = model.get_base_model() if lora else model
    rbase = replica.get_base_model() if lora else replica
    assert rbase.lm_head.weight is rbase.model.embed_tokens.weight        # still tied
    attn, rattn = base.model.layers[0].self_attn, rbase.model.layers[0].self_attn
    assert rattn is not attn and rattn.q_proj is not attn.q_proj
    assert (rbase.model.layers[0].mlp is base.model.layers[0].mlp) == lora   # frozen: shared
    if lora:
        assert rattn.q_proj.base_layer is attn.q_proj.base_layer


def test_a_parameter_held_outside_the_module_tree_is_caught():
    """A module that keeps a layer in a plain list reaches the original, not the replica: its
    gradient would be written by two threads at once, so the step refuses with a clear error."""
    class Hidden(Module):
        def __init__(self):
            super().__init__()
            self.emb = _llama(np.float64)
            self.layers = [Linear(61, 61)]          # a plain list: invisible to the module tree

        def forward(self, ids, labels=None, attention_mask=None):
            out = self.emb(ids, labels=labels)
            out.loss = out.loss + (self.layers[0](out.logits) * 0.0).sum()
            return out

    model = Hidden()
    model.extra = model.layers[0]                    # registered too, so it is trained
    ids, labels, mask = _batch()
    loss = DP.DataParallel(model, n_threads=2)(ids, labels=labels).loss
    with pytest.raises(RuntimeError, match="original model instead of its replica"):
        loss.backward()


def test_thread_local_switches_stay_in_their_thread():
    seen = {}

    def other():
        seen["threads"] = parallel.num_threads()
        seen["rng"] = backend.rng()

    with parallel.single_threaded(), backend.use_rng(np.random.default_rng(3)) as g:
        assert parallel.num_threads() == 1 and backend.rng() is g
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["rng"] is backend.rng() and seen["threads"] == parallel.num_threads()


def test_small_batches_are_not_split(monkeypatch):
    """Below MIN_TOKENS_PER_MICRO_BATCH tokens per thread the split costs more than it saves: the
    default runs the plain step (bit-identical), or fewer micro-batches."""
    monkeypatch.setattr(settings, "MIN_TOKENS_PER_MICRO_BATCH", 20)
    monkeypatch.setenv("MINILORA_NUM_THREADS", "3")
    model = _llama(np.float32)
    ids, labels, mask = _batch()                          # 5 x 9 = 45 tokens: 2 x 20 fit, not 3
    calls = []
    monkeypatch.setattr(DP, "replicate", lambda m, _r=DP.replicate: calls.append(1) or _r(m))
    _step(model, ids, labels, mask)
    assert len(calls) == 2
    calls.clear()
    _step(model, ids[:4, :9], labels[:4, :9], mask[:4, :9])   # 36 tokens: one micro-batch, plain
    assert calls == []


def test_micro_batches_cover_the_batch():
    assert DP.micro_batches(16, 2) == [slice(0, 8), slice(8, 16)]
    assert DP.micro_batches(5, 3) == [slice(0, 2), slice(2, 3), slice(3, 5)]
    assert DP.micro_batches(1, 4) == [slice(0, 1)]


@pytest.mark.parametrize("n_threads", [1, 2])
def test_forward_backward_runs_no_backward_for_a_non_finite_loss(n_threads):
    model = _llama(np.float64)
    ids, labels, mask = _batch()
    model.lm_head.weight.data[0, 0] = np.nan                 # every logit row with token 0 is NaN
    loss = DP.forward_backward(model, ids, labels, mask, n_threads=n_threads)
    assert not np.isfinite(loss.item())
    assert all(p.grad is None for p in model.parameters())
