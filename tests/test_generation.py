"""Generation: the top-k and top-p filters (by hand and against transformers' warpers), eos lists,
streaming, the fast decode step against the model's forward, and greedy SmolLM2 against
transformers' ``generate``."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minilora
from minilora import settings
from minilora.fast import decode as fast_decode
from minilora.lora import LoraConfig, get_peft_model
from minilora.models import (KVCache, decode_arrays, sample_next_token,
                             stream_generate, top_k_filter, top_p_filter)
from minilora.tensor import no_grad

from _tiny_llama import ids_of, model_of  # noqa: E402


# ---------------------------------------------------------------- the filters
def kept(z):
    return [np.flatnonzero(np.isfinite(row)).tolist() for row in z]


@pytest.mark.parametrize("top_p, expected", [(0.4, [0]), (0.75, [0, 1]), (0.9, [0, 1, 2]),
                                             (1.0, [0, 1, 2, 3])])
def test_top_p_by_hand(top_p, expected):
    """Probabilities .5 .3 .15 .05: the smallest set of most likely tokens with mass >= top_p."""
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert kept(top_p_filter(logits, top_p)) == [expected]
    # the same set in any vocabulary order
    perm = np.array([2, 0, 3, 1])
    assert kept(top_p_filter(logits[:, perm], top_p)) == [sorted(np.flatnonzero(np.isin(perm, expected)))]


def test_top_p_keeps_at_least_one_token_and_refuses_bad_values():
    logits = np.array([[0.0, 10.0, 0.0]])
    assert kept(top_p_filter(logits, 1e-9)) == [[1]]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            top_p_filter(logits, bad)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(logits, 0)


@pytest.mark.interop
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 300), top_p=st.floats(0.01, 0.99),
       scale=st.floats(0.1, 8.0))
def test_top_p_and_top_k_equal_transformers_warpers(seed, V, top_p, scale):
    torch = pytest.importorskip("torch", reason="the interop extra is not installed")
    warpers = pytest.importorskip("transformers.generation.logits_process")
    z = (np.random.default_rng(seed).standard_normal((3, V)) * scale).astype(np.float32)
    # float32 cumulative sums may land either side of 1 - top_p when they are within rounding of
    # it (V terms of relative error 2^-24 each): such rows are a tie, not a disagreement
    p = np.sort(np.exp(z - z.max(-1, keepdims=True)), axis=-1)
    cum = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
    assume(np.abs(cum - (1 - top_p)).min() > 1e-5)
    hf = warpers.TopPLogitsWarper(top_p)(None, torch.from_numpy(z)).numpy()
    assert kept(top_p_filter(z, top_p)) == kept(hf)
    k = 1 + seed % V
    hf_k = warpers.TopKLogitsWarper(k)(None, torch.from_numpy(z)).numpy()
    assert kept(top_k_filter(z, k)) == kept(hf_k)


def test_top_p_sampling_follows_the_renormalised_nucleus():
    logits = np.log(np.array([[0.05, 0.3, 0.1, 0.25, 0.2, 0.1]] * 4000))
    # ascending mass .05 .15 .25 .45 .70 1: top_p=.7 drops the three with cumulative mass <= .3
    draws = sample_next_token(logits, do_sample=True, top_p=0.7, rng=np.random.default_rng(0))
    assert set(np.unique(draws)) == {1, 3, 4}
    freq = np.bincount(draws, minlength=6)[[1, 3, 4]] / len(draws)
    # binomial standard error at n=4000 is <= 0.008; 0.03 is almost 4 of them
    np.testing.assert_allclose(freq, [0.4, 1 / 3, 0.8 / 3], atol=0.03)
    # top_k first, then top_p on what is left (transformers' order): top_k=2 leaves .3 and .25,
    # renormalised .545 and .455, and top_p=.5 keeps only the first
    both = sample_next_token(logits[:50], do_sample=True, top_k=2, top_p=0.5,
                             rng=np.random.default_rng(1))
    assert set(both) == {1}


# ---------------------------------------------------------------- eos, streaming
def test_eos_list_stops_at_any_of_its_ids_and_pads_finished_rows():
    m = model_of()
    prompt = ids_of(B=2, T=3)
    free = m.generate(prompt, 8)
    stop = int(free[0, 3 + 2])            # row 0's third new token, as an end-of-turn id
    other = int(free[0, 3 + 4])           # row 0's fifth, listed first: the fill value
    # the premise of this test on the seeded model: row 0 meets `stop` first at step 2, and row 1
    # never produces either id (so it runs to the end while row 0 is padded)
    assert stop not in free[0, 3:5] and other not in free[0, 3:5] and other != stop
    assert not np.isin(free[1, 3:], [stop, other]).any()
    out = m.generate(prompt, 8, eos_token_id=[other, stop])
    np.testing.assert_array_equal(out[1], free[1])
    np.testing.assert_array_equal(out[0, :6], free[0, :6])
    assert (out[0, 6:] == other).all()    # no pad id in the config: the first eos id fills
    alone = m.generate(prompt[:1], 8, eos_token_id=[other, stop])
    np.testing.assert_array_equal(alone, free[:1, :6])   # one row: stops right after `stop`


def test_stream_yields_what_generate_returns():
    m = model_of()
    prompt = ids_of(B=2, T=4)
    expected = m.generate(prompt, 9, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    steps = list(m.stream_generate(prompt, 9, do_sample=True, temperature=0.8, top_p=0.9, seed=3))
    assert all(s.shape == (2,) and s.dtype == np.int64 for s in steps)
    np.testing.assert_array_equal(np.stack(steps, axis=1), expected[:, 4:])
    one = list(stream_generate(m, prompt[0], 9))                 # a 1-D prompt yields ints
    assert all(type(t) is int for t in one)
    assert one == m.generate(prompt[:1], 9)[0, 4:].tolist()


def test_stream_restores_training_mode_and_leaves_grad_on_between_tokens():
    m = model_of()
    stream = m.stream_generate(ids_of(B=1, T=3), 5)
    next(stream)
    assert not m.training and minilora.tensor.is_grad_enabled()
    stream.close()
    assert m.training


def test_sampling_arguments_are_checked_before_any_forward():
    m = model_of()
    for kw, name in [(dict(temperature=0.0), "temperature"), (dict(top_p=1.2), "top_p"),
                     (dict(top_k=0), "top_k")]:
        with pytest.raises(ValueError, match=name):
            m.generate(ids_of(B=1, T=2), 3, do_sample=True, **kw)
    with pytest.raises(ValueError, match="eos_token_id"):
        m.generate(ids_of(B=1, T=2), 3, eos_token_id=[])


# ---------------------------------------------------------------- the fast decode twin
@pytest.mark.fast_path
@pytest.mark.parametrize("B, n_threads", [(1, 1), (1, 2), (2, 2), (3, 3)])
def test_fast_decode_step_equals_the_model_forward(B, n_threads):
    """Logits and cached keys/values of the twin equal the reference forward's at every step.
    Both compute the same float32 sums in other orders (gemv or GEMM, one einsum for the mean
    square): sums of at most 40 products of O(1) terms, relative error ~1e-6 per layer."""
    m = model_of().eval()
    arrays = decode_arrays(m)
    assert arrays is not None
    prompt = ids_of(B=B, T=5)
    ref_cache, fast_cache = KVCache(2, 8), KVCache(2, 8)      # both grow past capacity on the way
    with no_grad():
        m(prompt, past_key_values=ref_cache)
        m(prompt, past_key_values=fast_cache)
        tokens = ids_of(B=B, T=6, seed=1)
        for t in range(tokens.shape[1]):
            ref = m(tokens[:, t:t + 1], past_key_values=ref_cache).data[:, -1]
            cos, sin = m.model.rotary(1, fast_cache.seq_len, np, np.float32)
            fast = fast_decode.decode_step(arrays, tokens[:, t], fast_cache, cos[0], sin[0],
                                           n_threads=n_threads)
            np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)
    for layer in range(2):
        k_ref, v_ref = ref_cache.update(layer, np.zeros((B, 2, 0, 8), np.float32),
                                        np.zeros((B, 2, 0, 8), np.float32))
        k_fast, v_fast = fast_cache.update(layer, np.zeros((B, 2, 0, 8), np.float32),
                                           np.zeros((B, 2, 0, 8), np.float32))
        np.testing.assert_allclose(k_fast, k_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v_fast, v_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.fast_path
def test_generate_picks_the_same_tokens_on_the_twin_and_the_reference():
    m = model_of()
    prompt = ids_of(B=2, T=4)
    fast = m.generate(prompt, 20)
    with minilora.reference():
        assert decode_arrays(m) is None
        ref = m.generate(prompt, 20)
    np.testing.assert_array_equal(fast, ref)


def test_a_lora_wrapped_model_decodes_through_its_own_forward():
    """The twin knows plain Linears only: with LoRA it steps aside, and the adapter counts."""
    m = model_of()
    peft = get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data[...] = np.random.default_rng(0).standard_normal(p.shape) * 0.5
    assert decode_arrays(m) is None
    prompt = ids_of(B=1, T=4)
    adapted = peft.generate(prompt, 10)
    merged = peft.merge_and_unload()
    assert (decode_arrays(merged) is None) == settings.reference_mode()   # plain again
    np.testing.assert_array_equal(merged.generate(prompt, 10), adapted)


# ---------------------------------------------------------------- SmolLM2 against transformers
@pytest.mark.slow
@pytest.mark.interop
def test_smollm2_greedy_equals_transformers_generate(smollm2_pair):
    from minilora.data import BPETokenizer
    from minilora.models import smollm2_path
    ours, _, hf, _, torch = smollm2_pair
    tok = BPETokenizer.from_pretrained(smollm2_path())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = np.array([tok.apply_chat_template(messages, add_generation_prompt=True)])
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    mine = ours.generate(prompt, 16, eos_token_id=[end_of_turn, tok.eos_token_id])
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(prompt), max_new_tokens=16, do_sample=False,
                             eos_token_id=[end_of_turn, tok.eos_token_id],
                             pad_token_id=tok.eos_token_id).numpy()
    np.testing.assert_array_equal(mine, theirs)
    answer = mine[0, prompt.shape[1]:].tolist()
    assert answer[-1] == end_of_turn
    assert tok.decode(answer[:-1]) == "The capital of France is Paris."
    streamed = list(ours.stream_generate(prompt[0], 16, eos_token_id=[end_of_turn, tok.eos_token_id]))
    assert streamed == answer
