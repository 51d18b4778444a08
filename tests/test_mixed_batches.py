"""Several adapters in one batch (``lora/mixed.py``): ``model(ids, adapter_names=[...])`` and
``generate(..., adapter_names=[...])`` give each row what its adapter alone gives it.

Three adapters with different ranks and targets (one with rsLoRA, one on the second layer only, one
with its own ``lm_head`` copy) on the SMALL Llama; every row of a mixed batch is compared with the
same prompt run with ``set_adapter(name)`` ("__base__": inside ``disable_adapter()``), on the fast
path and in ``minilora.reference()``; greedy generation row by row; PEFT's refusals; and PEFT itself
on the same two adapters (``interop``).
"""
import importlib.util
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import settings
from minilora.lora import LoraConfig, get_peft_model
from minilora.tensor import no_grad

from _tiny_llama import ids_of, model_of  # noqa: E402

# Tolerance from float32 rounding. Unit roundoff u = 2^-24 ~ 6e-8. A mixed row and the same row run
# alone add the same products in other orders: the adapter's A and B products run on a subset of
# the rows (BLAS blocks a GEMM by its row count), and alone, outside reference mode, the layer may
# form W0 + ΔW first (lora/fused.py). A K-term sum in another order differs by ~sqrt(K)·u of the sum
# of its |terms| (rounding errors add like a random walk); the longest sums here have K <= 40
# (hidden 32, intermediate 40, ranks <= 8): sqrt(40)·u ~ 4e-7. The logits come out of 13 such
# stages in a chain (per layer: q/k/v, scores, weighted values, o, gate/up, down; then the head):
# ~5e-6 of the logits' largest entry. Safety factor 4: 2e-5. (Measured over 30 random assignments:
# at most 3e-6 on the fast path, where the row alone uses W0 + ΔW, and 2.5e-7 in reference mode; the
# row of another adapter differs by more than 100 times the tolerance: tests check that too.)
TOL = 2e-5
ADAPTERS = ("a", "b", "c")


def three_adapters():
    """The SMALL Llama in eval mode with adapters "a" (r=4 on q, v; its own lm_head copy, moved off
    the original so it counts), "b" (r=2 on k, o, down of layer 1 only) and "c" (r=8, rsLoRA, every
    Linear); B random (init_lora_weights=False) so that each changes the logits."""
    model = get_peft_model(model_of(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["lm_head"],
                                                  init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "down_proj"],
                                      layers_to_transform=[1], init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                      init_lora_weights=False))
    head = model.base_model.model.lm_head.modules_to_save["a"]
    head.weight.data = head.weight.data + np.random.default_rng(1).standard_normal(
        head.weight.shape).astype(np.float32) * 0.3
    return model.eval()


def alone(model, ids, name):
    """Logits of ``ids`` with adapter ``name`` alone active ("__base__": adapters disabled)."""
    with no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(ids).numpy()
        model.set_adapter(name)
        return model(ids).numpy()


def mixed(model, ids, names):
    with no_grad():
        return model(ids, adapter_names=names).numpy()


def assert_rows_match(got, want, names):
    for i, name in enumerate(names):
        err = np.abs(got[i] - want[name][i]).max()
        assert err <= TOL * np.abs(want[name][i]).max(), f"row {i} ({name}): off by {err:.3g}"


@pytest.fixture(scope="module")
def pool():
    """(model, six prompts, each adapter's and the base's logits of all six run alone)."""
    model = three_adapters()
    ids = ids_of(B=6, T=7)
    want = {name: alone(model, ids, name) for name in ADAPTERS + ("__base__",)}
    return model, ids, want


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_each_row_gets_what_its_adapter_alone_gives(reference):
    model = three_adapters()
    ids = ids_of(B=6, T=7)
    names = ["b", "a", "__base__", "c", "a", "b"]
    with settings.reference(reference):
        want = {name: alone(model, ids, name) for name in ADAPTERS + ("__base__",)}
        got = mixed(model, ids, names)
    assert_rows_match(got, want, names)
    np.testing.assert_array_equal(got[2], want["__base__"][2])   # base rows: W0·x + exact zeros
    scale = np.abs(want["__base__"]).max()
    for x, y in [("a", "b"), ("a", "c"), ("b", "c"), ("a", "__base__"), ("b", "__base__")]:
        assert np.abs(want[x] - want[y]).max() > 100 * TOL * scale, (x, y)   # not vacuous


@given(st.lists(st.tuples(st.sampled_from(ADAPTERS[:2] + ("__base__",)), st.integers(0, 5)),
                min_size=1, max_size=6),
       st.booleans())
def test_any_assignment_of_adapters_to_rows(pool, rows, with_c):
    """1-6 rows, each a prompt of the pool (repeats allowed) and one of 2-3 adapters or the base,
    in any order: row i is still what its adapter alone gives that prompt."""
    model, ids, want = pool
    names = [("c" if with_c and k % 2 else name) for k, (name, _) in enumerate(rows)]
    prompts = [p for _, p in rows]
    got = mixed(model, ids[prompts], names)
    assert_rows_match(got, {n: want[n][prompts] for n in set(names)}, names)


def test_one_prompt_and_one_adapter_for_the_whole_batch(pool):
    model, ids, want = pool
    np.testing.assert_allclose(mixed(model, ids[0], ["c"])[0], want["c"][0],
                               rtol=0, atol=TOL * np.abs(want["c"][0]).max())   # a 1-D prompt: one row
    assert_rows_match(mixed(model, ids, ["a"] * 6), want, ["a"] * 6)


def test_modules_to_save_copy_runs_on_its_rows_only(pool):
    """Adapter "a" trains its own lm_head: its rows use that copy, the other rows the original."""
    model, ids, want = pool
    head = model.base_model.model.lm_head
    names = ["a", "b", "a", "__base__"]
    calls = []
    for label, module in (("original", head.original_module), ("a", head.modules_to_save["a"])):
        module.forward = (lambda f, label: lambda x: calls.append((label, x.shape[0])) or f(x))(
            module.forward, label)              # an instance attribute: counts, then runs forward
    try:
        got = mixed(model, ids[:4], names)
    finally:
        del head.original_module.forward, head.modules_to_save["a"].forward
    assert sorted(calls) == [("a", 2), ("original", 2)]
    assert_rows_match(got, {n: want[n][:4] for n in set(names)}, names)


def test_names_are_gone_after_the_call_even_after_an_error(pool):
    model, ids, want = pool
    model.set_adapter("c")
    with pytest.raises(ValueError, match="outside"):
        model(ids[:2] + 1000, adapter_names=["a", "b"])     # ids outside the vocabulary
    mixed(model, ids[:2], ["a", "b"])
    with no_grad():
        np.testing.assert_array_equal(model(ids).numpy(), alone(model, ids, "c"))


def test_the_names_hold_in_the_calling_thread_only(pool):
    """While one thread runs a mixed batch, a plain call of the same model from another thread
    still runs the active adapter (the names are recorded per thread)."""
    model, ids, want = pool
    seen = []
    with model._rows_use_adapters(ids, ["a"] * 6, training=False):
        worker = threading.Thread(target=lambda: seen.append(alone(model, ids, "c")))
        worker.start()
        worker.join()
        inside = alone(model, ids, "c")                 # this thread: every row on "a" all the same
    np.testing.assert_array_equal(seen[0], want["c"])
    assert_rows_match(inside, want, ["a"] * 6)


# ---------------------------------------------------------------- generate
def test_generate_gives_each_row_its_adapters_tokens():
    """Greedy generation of a mixed batch equals each prompt generated alone with its adapter (the
    prompt step and every cached step run the names), "__base__" with the adapters disabled."""
    model = three_adapters()
    prompts = ids_of(B=4, T=5, seed=3)
    names = ["c", "__base__", "a", "b"]
    got = model.generate(prompts, max_new_tokens=12, adapter_names=names)
    assert got.shape == (4, 17)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                want = model.generate(prompts[i:i + 1], max_new_tokens=12)
        else:
            model.set_adapter(name)
            want = model.generate(prompts[i:i + 1], max_new_tokens=12)
        np.testing.assert_array_equal(got[i], want[0], err_msg=f"row {i} ({name})")
    assert len({tuple(r[5:]) for r in got}) == 4      # four different continuations: not vacuous


def test_generate_with_adapter_names_works_from_training_mode_and_restores_it():
    model = three_adapters().train()
    prompt = ids_of(B=2, T=4)
    out = model.generate(prompt, max_new_tokens=3, adapter_names=["a", "c"])
    assert out.shape == (2, 7) and model.training


# ---------------------------------------------------------------- refusals
def test_refusals_name_the_fix(pool):
    model, ids, _ = pool
    with pytest.raises(ValueError, match="one adapter name .* per row"):
        model(ids[:3], adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="one adapter name .* per row"):
        model.generate(ids[:3], max_new_tokens=2, adapter_names=["a"])
    with pytest.raises(ValueError, match=r"\['typo'\], which no layer .* '__base__'"):
        model(ids[:2], adapter_names=["a", "typo"])
    with pytest.raises(ValueError, match="list of adapter names"):
        model(ids[:1], adapter_names="a")
    model.train()
    try:
        with pytest.raises(ValueError, match=r"training mode; call model.eval\(\)"):
            model(ids[:2], adapter_names=["a", "b"])
    finally:
        model.eval()


def test_merged_adapters_are_refused():
    model = three_adapters()
    model.set_adapter("b")
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged .* call unmerge_adapter\(\)"):
        model(ids_of(B=2), adapter_names=["a", "__base__"])
    model.unmerge_adapter()
    model(ids_of(B=2), adapter_names=["a", "__base__"])


def test_dora_adapters_are_refused():
    model = three_adapters()
    model.add_adapter("d", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"DoRA .* set_adapter\(\)"):
        model(ids_of(B=2), adapter_names=["d", "a"])
    model(ids_of(B=2), adapter_names=["a", "__base__"])      # the other adapters still mix


def test_a_plain_model_refuses_adapter_names_in_generate():
    with pytest.raises(ValueError, match="needs a model with LoRA adapters: wrap .* get_peft_model"):
        model_of().generate(ids_of(B=1), max_new_tokens=2, adapter_names=["a"])


# ---------------------------------------------------------------- PEFT, the oracle
HAVE_PEFT = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
if HAVE_PEFT:
    from test_peft_interop import (TINY, assert_close, base_dir, hf_base,  # noqa: F401,E402
                                   mini_base)


@pytest.mark.interop
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.skipif(not HAVE_PEFT, reason="interop needs torch, transformers and peft: "
                    "pip install 'minilora[interop]'")
def test_mixed_batch_matches_peft(base_dir, tmp_path):  # noqa: F811
    """The same two adapters in PEFT: ``model(ids, adapter_names=...)`` gives the same logits."""
    import peft
    import torch
    model = get_peft_model(mini_base(base_dir), LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,
                                                           target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules="all-linear",
                                          init_lora_weights=False))
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(hf_base(base_dir), str(tmp_path))
    hf.load_adapter(str(tmp_path / "other"), "other")
    hf.eval()
    model.eval()
    ids = np.random.default_rng(7).integers(0, TINY["vocab_size"], size=(5, 9))
    names = ["other", "default", "__base__", "other", "default"]
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), adapter_names=names).logits.numpy()
    assert_close(mixed(model, ids, names), want)
