"""The exercise checker: it accepts the model answers, rejects every usual mistake with that mistake's
hint, names a mistake only when it explains every failing case, holds every output to its dtype and
shape, survives stubs and crashing code, and prints verdicts a learner can read.

Every task has its own marker (``pytest -m task_lora_forward``), as in minitorch. By default the
answers checked are ``minilora.teaching.exercises.solutions``; point ``MINILORA_EXERCISES_FROM`` at a
learner's notebook (.ipynb) or script (.py) to grade that file instead. Only its function
definitions, imports and call-free assignments are run (the rule of ``minilora grade``, in
minilora/commands/grade.py), so stray cells cannot break it:

    MINILORA_EXERCISES_FROM=submissions/alice.ipynb python -m pytest tests/test_exercises.py \
        -k test_answers_pass -m task_lora_forward
"""
import functools
import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from minilora import Tensor, backend
from minilora.commands.grade import load_definitions
from minilora.teaching.exercises import (CheckResult, ExerciseFailed, check, check_all, get_task, list_tasks,
                                task_names)
from minilora.teaching.exercises import checker
from minilora.teaching.exercises import solutions as model_answers

pytestmark = [pytest.mark.exercise,
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # wrong answers may divide by 0

TASKS = task_names()


@functools.lru_cache(maxsize=None)
def _answers():
    path = os.environ.get("MINILORA_EXERCISES_FROM")
    if not path:
        return model_answers
    if not Path(path).is_file() or Path(path).suffix not in (".ipynb", ".py"):
        raise ValueError(f"MINILORA_EXERCISES_FROM={path!r} is not a notebook (.ipynb) or script (.py); "
                         f"give the path of a learner's file")
    namespace, notes = load_definitions(path)
    for note in notes:
        print(f"MINILORA_EXERCISES_FROM: {note}")
    return types.SimpleNamespace(**namespace)


def _task_param(name):
    return pytest.param(name, marks=getattr(pytest.mark, f"task_{name}"), id=name)


def _mistake_params():
    return [pytest.param(name, m.name, marks=getattr(pytest.mark, f"task_{name}"),
                         id=f"{name}-{m.name}")
            for name in TASKS for m in get_task(name).mistakes]


def _mistake(task, name):
    return next(m for m in get_task(task).mistakes if m.name == name)


# ---------------------------------------------------------------- the tasks themselves
def test_at_least_eight_tasks_cover_lora_merging_and_nf4():
    assert len(TASKS) >= 8
    for needed in ("lora_forward", "count_lora_params", "lora_grads", "merge", "unmerge",
                   "matmul_backward", "nf4_quantize_block", "pack_nibbles",
                   "double_quantize_absmax", "memory_full_lora_qlora"):
        assert needed in TASKS
    for name in TASKS:
        assert len(get_task(name).mistakes) >= 3, f"{name} should know at least 3 usual mistakes"


@pytest.mark.parametrize("name", [_task_param(n) for n in TASKS])
def test_answers_pass(name):
    fn = getattr(_answers(), name, None)
    if fn is None:
        pytest.skip(f"{name} is not defined in {os.environ.get('MINILORA_EXERCISES_FROM')}")
    result = check(name, fn, verbose=False)
    if not result:
        pytest.fail(result.message, pytrace=False)   # the verdict alone, as the learner sees it
    assert result.status == "passed" and result.n_cases >= 30


@pytest.mark.parametrize("name,mistake", _mistake_params())
def test_usual_mistake_is_rejected_with_its_hint(name, mistake):
    m = _mistake(name, mistake)
    result = check(name, m.fn, verbose=False)
    assert not result
    assert result.status in ("failed", "error")
    assert result.mistake == m.name, result.message
    assert f"hint: {m.hint}" in result.message


def test_every_mistake_is_caught_by_the_edge_cases_alone():
    """The fixed cases catch every usual mistake by themselves, so no verdict depends on what
    Hypothesis happens to draw."""
    for name in TASKS:
        for m in get_task(name).mistakes:
            result = check(name, m.fn, max_examples=0, verbose=False)
            assert not result and result.mistake == m.name, (name, m.name, result.message)


def test_hints_name_the_three_classic_mistakes():
    """Three classic mistakes each get their hint: alpha instead of alpha/r, A and B swapped, the
    gradient not reduced over broadcast axes."""
    r1 = check("lora_forward", _mistake("lora_forward", "alpha_not_alpha_over_r").fn, verbose=False)
    assert "scaled by alpha, not alpha/r" in r1.message
    r2 = check("lora_forward", _mistake("lora_forward", "delta_transposed").fn, verbose=False)
    assert "A and B swapped" in r2.message
    r3 = check("matmul_backward", _mistake("matmul_backward", "not_reduced").fn, verbose=False)
    assert "not reduced over broadcast axes" in r3.message


# ---------------------------------------------------------------- stubs, crashes, bad calls
def _stub(x, W0, A, B, alpha, r):
    raise NotImplementedError  # your code here


def test_a_stub_is_not_implemented_yet_and_does_not_raise(capsys):
    result = check("lora_forward", _stub)
    out = capsys.readouterr().out
    assert not result and result.status == "not implemented"
    assert out.strip().startswith("○ lora_forward: not implemented yet")
    with pytest.raises(ExerciseFailed, match="not implemented yet"):
        check("lora_forward", _stub, verbose=False, raise_on_fail=True)


def _crashes(x, W0, A, B, alpha, r):
    scaling = {"alpha": alpha}["r"]
    return x @ W0.T * scaling


def test_an_exception_is_reported_with_the_case_and_the_line():
    result = check("lora_forward", _crashes, verbose=False)
    assert result.status == "error" and not result
    first, second, third = result.message.splitlines()[:3]
    assert first.startswith(f"✗ lora_forward raised KeyError on case {result.case} of {result.n_cases}")
    for arg in ("x (", "W0 (", "A (", "B (", "alpha=", "r="):
        assert arg in first
    assert second.strip() == "KeyError: 'r'"
    assert third.strip() == 'at line ' + str(_crashes.__code__.co_firstlineno + 1) + \
        ': scaling = {"alpha": alpha}["r"]'
    assert "hint: check the shapes" in result.message


def test_wrong_signature_is_explained():
    result = check("merge", lambda W0, A, B: W0, verbose=False)
    assert result.status == "error"
    assert "takes (W0, A, B) but the task passes (W0, A, B, alpha, r)" in result.message


def test_unknown_task_and_non_function_are_value_errors():
    with pytest.raises(ValueError, match="did you mean 'lora_forward'"):
        check("lora_foward", model_answers.lora_forward)
    with pytest.raises(ValueError, match="pass it without calling it"):
        check("merge", 3.0)
    with pytest.raises(ValueError, match="max_examples"):
        check("merge", model_answers.merge, max_examples=-1)


# ---------------------------------------------------------------- the verdict reads well
def test_failure_verdict_names_case_shapes_expected_got_and_hint():
    result = check("lora_forward", _mistake("lora_forward", "alpha_not_alpha_over_r").fn, verbose=False)
    lines = result.message.splitlines()
    assert lines[0].startswith(f"✗ lora_forward failed on case {result.case} of {result.n_cases}")
    for arg in ("x (", "W0 (", "A (", "B (", "alpha=", "r="):
        assert arg in lines[0]
    assert lines[1].strip() == "what differs: the values (its type, shape and dtype are right)"
    assert lines[2].strip().startswith("expected (") and lines[3].strip().startswith("got      (")
    assert "largest |diff|" in lines[4] and "np.float64" not in result.message
    assert lines[-2].strip().startswith("hint: you scaled by alpha")
    assert lines[-1].strip() == f"({result.n_failed} of {result.n_cases} cases failed)"
    assert result.case_args is not None and set(result.case_args) == {"x", "W0", "A", "B", "alpha", "r"}


def test_tuple_and_dict_outputs_name_the_wrong_part():
    r = check("lora_grads", _mistake("lora_grads", "swapped").fn, verbose=False)
    assert "expected dA shape" in r.message or "expected dA " in r.message
    r = check("memory_full_lora_qlora", _mistake("memory_full_lora_qlora", "qlora_16bit_base").fn,
              verbose=False)
    assert "expected 'qlora' 3,932,700,672" in r.message          # Llama-7B, r = 8 on q and v
    r = check("nf4_quantize_block", lambda block: block, verbose=False)
    assert "expected a tuple (indices, absmax), got an array of shape (" in r.message


def test_passing_verdict_and_result_object(capsys):
    result = check("pack_nibbles", model_answers.pack_nibbles, max_examples=5)
    assert capsys.readouterr().out.strip() == \
        "✓ pack_nibbles: all 9 cases passed (4 edge cases + 5 drawn by hypothesis)"
    assert isinstance(result, CheckResult) and bool(result) and result.passed
    assert repr(result) == "CheckResult(task='pack_nibbles', status='passed', cases=9, failed=0)"
    result._ipython_display_()                     # already printed: a notebook shows it once
    assert capsys.readouterr().out == ""
    quiet = check("pack_nibbles", model_answers.pack_nibbles, max_examples=5, verbose=False)
    quiet._ipython_display_()
    assert capsys.readouterr().out.startswith("✓ pack_nibbles")


def test_list_tasks_prints_one_described_line_per_task(capsys):
    list_tasks()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(TASKS)
    for i, name in enumerate(TASKS):
        assert lines[2 * i].split()[:2] == [f"{i + 1}.", name]
        assert len(lines[2 * i].split()) > 3                          # a description follows
        assert lines[2 * i + 1].strip().startswith(f"{name}(")       # then the signature


def test_check_all_finds_the_functions_in_a_namespace(capsys):
    ns = {"merge": model_answers.merge, "unmerge": model_answers.unmerge, "other": 1}
    results = check_all(ns, max_examples=3)
    assert set(results) == {"merge", "unmerge"} and all(results.values())
    assert f"2 of {len(TASKS)} tasks passed" in capsys.readouterr().out.splitlines()[-1]


# ---------------------------------------------------------------- robustness
def test_cases_are_deterministic():
    task = get_task("lora_forward")
    a, b = checker.draw_cases(task, 10), checker.draw_cases(task, 10)
    assert len(a) == len(b) == 10
    for ca, cb in zip(a, b):
        for k in ca.args:
            np.testing.assert_array_equal(ca.args[k], cb.args[k])
    shapes = {c.args["x"].shape for c in a}
    assert len(shapes) > 3, "the drawn cases should vary the shapes"


def test_without_hypothesis_cases_come_from_a_seeded_random(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)   # `import hypothesis` now fails
    task = get_task("merge")
    a, b = checker.draw_cases(task, 5), checker.draw_cases(task, 5)
    assert len(a) == 5
    np.testing.assert_array_equal(a[3].args["W0"], b[3].args["W0"])
    assert check("merge", model_answers.merge, max_examples=5, verbose=False)


def test_checking_leaves_minilora_random_numbers_alone():
    backend.manual_seed(123)
    expected = backend.rng().random(3)
    backend.manual_seed(123)
    check("lora_forward", model_answers.lora_forward, max_examples=3, verbose=False)
    check("lora_grads", model_answers.lora_grads, max_examples=3, verbose=False)
    np.testing.assert_array_equal(backend.rng().random(3), expected)


def test_a_function_that_writes_into_its_inputs_does_not_fool_the_checker():
    def scribbles(W0, A, B, alpha, r):
        out = model_answers.merge(W0, A, B, alpha, r)
        A[...] = 0.0                                # would change the reference's input if shared
        W0 += 1.0
        return out
    assert check("merge", scribbles, verbose=False)


def test_tensor_and_list_outputs_are_accepted():
    def with_tensors(x, W0, A, B, alpha, r):
        xt = Tensor(x)
        return xt @ Tensor(W0).T + (xt @ Tensor(A).T) @ Tensor(B).T * (alpha / r)
    assert check("lora_forward", with_tensors, verbose=False)
    assert check("pack_nibbles", lambda idx: list(model_answers.pack_nibbles(idx)), verbose=False)


def test_other_correct_ways_of_rounding_are_accepted():
    """Multiplying by float32(1/absmax) (bitsandbytes' way for a full block) instead of dividing,
    and a float64 mean for the offset, are both right even where they flip a code at a midpoint."""
    from minilora.quant import NF4_CODE

    def reciprocal(block):
        block = np.asarray(block, np.float32)
        absmax = np.float32(np.abs(block).max())
        x = block * (np.float32(1) / max(absmax, np.float32(1e-38)))
        return np.searchsorted((NF4_CODE[:-1] + NF4_CODE[1:]) / 2, x).astype(np.uint8), absmax
    assert check("nf4_quantize_block", reciprocal, verbose=False)

    def float64_mean(absmax):
        codes, nested, _ = model_answers.double_quantize_absmax(absmax)
        offset = np.float32(np.asarray(absmax, np.float64).mean())
        return model_answers.double_quantize_absmax(absmax)[0], nested, offset
    assert check("double_quantize_absmax", float64_mean, verbose=False)


def test_a_near_miss_is_still_rejected():
    """Tolerances are tight: a relative error of 1e-3 in one entry fails."""
    def almost(W0, A, B, alpha, r):
        out = model_answers.merge(W0, A, B, alpha, r)
        out.flat[0] *= 1.001
        return out
    result = check("merge", almost, verbose=False)
    assert not result and result.mistake is None
    assert "hint: W = W0 + (α/r) · B @ A" in result.message


# ---------------------------------------------------------------- honest hints, exact contracts
def test_a_mistake_that_explains_one_failing_case_only_is_not_named():
    """alpha // r equals "forgot the adapter" where α < r (the scaling floors to 0) but not where α/r
    is a fraction above 1 (16 // 3 = 5): no usual mistake explains every failing case."""
    def floor_division(x, W0, A, B, alpha, r):
        return x @ W0.T + (alpha // r) * (x @ A.T) @ B.T
    result = check("lora_forward", floor_division, verbose=False)
    assert not result and result.mistake is None, result.message
    assert _mistake("lora_forward", "forgot_adapter").hint not in result.message
    assert result.differs == "values"
    assert "what differs: the values (its type, shape and dtype are right)" in result.message
    assert result.message.splitlines()[-2].strip() == f"hint: {get_task('lora_forward').hint}"


def test_front_padding_is_not_called_a_nibble_swap():
    """Padding an odd count in front equals the nibble swap on a single index ([7, 12] -> 0x7C) and
    nowhere else, so the verdict names no mistake and shows that case's own note."""
    def front_padded(indices):
        idx = np.asarray(indices, dtype=np.uint8)
        if idx.size % 2 == 1:
            idx = np.concatenate([np.array([7], np.uint8), idx])
        return ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8)
    result = check("pack_nibbles", front_padded, verbose=False)
    assert not result and result.mistake is None, result.message
    assert _mistake("pack_nibbles", "low_high_swapped").hint not in result.message
    assert result.message.splitlines()[0].startswith("✗ pack_nibbles failed on case 3 of 34 (a single "
                                                     "index): indices (1,) uint8 = [12]")
    assert "[12] packs to 12 << 4 | 7 = 199" in result.message


def test_pack_nibbles_must_return_uint8():
    """The task says uint8: the right bytes as int64 fail, on the dtype, with the conversion to use."""
    result = check("pack_nibbles", lambda idx: model_answers.pack_nibbles(idx).astype(np.int64),
                   verbose=False)
    assert not result and result.differs == "dtype" and result.mistake is None
    assert "what differs: the dtype (its shape is right)" in result.message
    assert "expected dtype uint8, got int64 (the shape (1,) is right): convert with .astype(np.uint8)" \
        in result.message
    assert "packs to" not in result.message          # the case's note is about values, not dtypes


def _as(dtype):
    return lambda v: np.asarray(v).astype(dtype)


@pytest.mark.parametrize("name,change,expected", [
    ("lora_forward", lambda h: h.astype(np.float32), "expected dtype float64, got float32"),
    ("count_lora_params", float, "expected a whole number (int) 4,194,304, got float64 (a Python float)"),
    ("nf4_quantize_block", lambda out: (out[0].astype(np.int64), out[1]),
     "expected indices dtype uint8, got int64"),
    ("nf4_quantize_block", lambda out: (out[0], float(out[1])),
     "expected absmax a float32 number"),
    ("double_quantize_absmax", lambda out: (out[0], out[1].astype(np.float64), out[2]),
     "expected nested_absmax dtype float32, got float64"),
    ("memory_full_lora_qlora", lambda out: {k: float(v) for k, v in out.items()},
     "expected 'full' a whole number (int)"),
    ("merge", lambda W: W[None], "expected shape (2, 3), got shape (1, 2, 3)"),
    ("count_lora_params", lambda n: np.array([n]), "expected a number, got an array of shape (1,)"),
], ids=["float32-h", "float-count", "int64-indices", "python-float-absmax", "float64-nested",
        "float-bytes", "extra-axis", "count-in-array"])
def test_dtype_and_shape_are_part_of_every_contract(name, change, expected):
    """Right values in the wrong dtype or shape fail, before any value is compared; a count must be
    an int, a float32 scale a float32 (the task's signature and the notebook's docstring say so)."""
    answer = getattr(model_answers, name)
    result = check(name, lambda *args: change(answer(*args)), max_examples=0, verbose=False)
    assert not result and result.differs in ("dtype", "shape") and result.mistake is None
    assert expected in result.message, result.message


def test_every_contract_states_the_output_dtype():
    for name in TASKS:
        said = get_task(name).signature + (getattr(model_answers, name).__doc__ or "")
        assert any(w in said for w in ("float64", "float32", "uint8", "an int", "int}")), name


def test_the_alternative_roundings_do_not_excuse_a_wrong_dtype():
    """nf4_quantize_block and double_quantize_absmax accept two roundings of the codes; codes of
    the right values in int64 are still wrong."""
    r = check("nf4_quantize_block", lambda b: (model_answers.nf4_quantize_block(b)[0].astype(np.int64),
                                               model_answers.nf4_quantize_block(b)[1]), verbose=False)
    assert not r and r.differs == "dtype"
    r = check("double_quantize_absmax",
              lambda a: (model_answers.double_quantize_absmax(a)[0].astype(np.int16),
                         *model_answers.double_quantize_absmax(a)[1:]), verbose=False)
    assert not r and r.differs == "dtype"


def _noisy(x, W0, A, B, alpha, r):
    """A wrong answer whose output depends on every generator a learner might draw from."""
    noise = np.random.standard_normal() + random.random() + backend.rng().standard_normal()
    return model_answers.lora_forward(x, W0, A, B, alpha, r) + 1e-3 * noise


def test_a_verdict_does_not_depend_on_the_random_state_before_it():
    """Each check seeds the generators for its task and puts them back: the same verdict whatever
    ran before, and the caller's random numbers untouched (two tests once passed or failed depending
    on the order they ran in)."""
    verdicts = []
    for seed in (0, 1, 2):
        np.random.seed(seed)
        random.seed(seed)
        backend.manual_seed(seed)
        before = np.random.get_state()[1].copy(), random.getstate(), backend.rng().bit_generator.state
        verdicts.append(check("lora_forward", _noisy, verbose=False).message)
        assert np.array_equal(np.random.get_state()[1], before[0])
        assert random.getstate() == before[1] and backend.rng().bit_generator.state == before[2]
    assert verdicts[0] == verdicts[1] == verdicts[2]


def test_the_teachers_guide_covers_every_task_and_mistake():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "teachers-guide.md").read_text("utf-8")
    for name in TASKS:
        assert f"`{name}`" in guide, f"docs/teachers-guide.md does not mention the task {name}"
        for m in get_task(name).mistakes:
            assert f"`{m.name}`" in guide, f"docs/teachers-guide.md does not list {name}'s {m.name}"


@pytest.mark.interop
def test_the_gradient_references_agree_with_torch():
    """The checker's answers for the autograd tasks, against PyTorch's autograd on every edge case."""
    torch = pytest.importorskip("torch", reason="the interop extra (torch) is not installed")
    t = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)  # noqa: E731

    for case in get_task("lora_grads").edge_cases():
        x, A, B, g, alpha, r = case.args.values()
        tA, tB = t(A), t(B)
        (((torch.tensor(x) @ tA.T) @ tB.T) * (alpha / r)).backward(torch.tensor(g))
        dA, dB = get_task("lora_grads").reference(*case.args.values())
        np.testing.assert_allclose(dA, tA.grad.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dB, tB.grad.numpy(), rtol=1e-12, atol=1e-12)

    for case in get_task("matmul_backward").edge_cases():
        a, b, g = case.args.values()
        ta, tb = t(a), t(b)
        (ta @ tb).backward(torch.tensor(g))
        da, db = get_task("matmul_backward").reference(a, b, g)
        np.testing.assert_allclose(da, ta.grad.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-12, atol=1e-12)

    for case in get_task("softmax_backward").edge_cases():
        x, g = case.args.values()
        tx = t(x)
        torch.softmax(tx, dim=-1).backward(torch.tensor(g))
        np.testing.assert_allclose(get_task("softmax_backward").reference(x, g), tx.grad.numpy(),
                                   rtol=1e-10, atol=1e-12)

    for case in get_task("lora_forward").edge_cases():
        x, W0, A, B, alpha, r = (torch.tensor(v) if isinstance(v, np.ndarray) else v
                                 for v in case.args.values())
        h = torch.nn.functional.linear(x, W0) + (alpha / r) * torch.nn.functional.linear(
            torch.nn.functional.linear(x, A), B)
        np.testing.assert_allclose(get_task("lora_forward").reference(*case.args.values()),
                                   h.numpy(), rtol=1e-12, atol=1e-12)
