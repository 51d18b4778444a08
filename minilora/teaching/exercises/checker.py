"""The autograder behind ``minilora.teaching.exercises.check``: run a learner's function on many cases, compare
it with the library, and explain a failure in words.

A *task* (defined in ``tasks.py``, looked up by name in ``registry.py``) is a small function to
write, such as ``lora_forward(x, W0, A, B, alpha, r)``. For each task the checker knows

* a **reference**: the answer, computed by calling minilora itself (``lora/``, ``quant/``,
  ``memory.py``, the autograd engine), never a second copy of the formula;
* **cases**: a few fixed edge cases first (r = 1, α ≠ r, batch axes, exact ties, odd lengths...),
  then cases drawn with Hypothesis (derandomized, so every run sees the same ones);
* **a contract**: the type, shape and dtype of the output, stated in the task's signature. They are
  compared exactly, before any value: ``pack_nibbles`` must return uint8, not int64; a count must be
  an int; a float32 scale must be a float32;
* **usual mistakes**: small wrong solutions, each with a hint. The verdict names a mistake ("you
  scaled by alpha, not alpha/r") only when the learner's output equals that mistake's output on
  EVERY failing case (an exception of the same type counts where the learner's code raised, but at
  least one case must be a wrong output). One case alone proves little: ``alpha // r`` equals
  "forgot the adapter" wherever α < r. Otherwise the verdict says what differs (the type, shape,
  dtype or values, on the smallest failing case, described in one line) and gives that case's note
  or the task's general hint.

Each check starts every random generator a learner's code might touch (minilora's ``backend.rng()``,
NumPy's global one, Python's ``random``) from a seed of its own and puts them back afterwards, so a
verdict never depends on what ran before it, and a notebook's random numbers are not changed by it.

``check`` never raises because an answer is wrong (notebooks with unfilled stubs must still run top to
bottom); it prints a verdict and returns a ``CheckResult`` that is truthy when every case passed.
``check(..., raise_on_fail=True)`` raises ``ExerciseFailed`` instead, for pytest.

This follows minitorch's idea (Rush, "MiniTorch", Cornell Tech) of named tasks with their own test
markers, with property-based cases as in its ``hypothesis`` tests.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import random
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ... import backend
from .registry import Case, Mistake, Task, get_task, task_names

__all__ = ["CheckResult", "ExerciseFailed", "Diff", "check", "check_all", "compare", "draw_cases"]

PASS, FAIL, ERROR, NOT_DONE = "passed", "failed", "error", "not implemented"
_MARK = {PASS: "✓", FAIL: "✗", ERROR: "✗", NOT_DONE: "○"}


@dataclass
class Diff:
    """How an output differs from the expected one: the part ("dB"), the lines to print, the largest
    absolute difference when both are numbers of the same shape, and ``kind``: what differs first,
    one of "type" (not an array, a tuple of the wrong length...), "shape", "dtype" or "values"."""
    part: str
    lines: list
    max_diff: float | None = None
    kind: str = "values"


class ExerciseFailed(AssertionError):
    """Raised by ``check(..., raise_on_fail=True)``; the message is the verdict."""


@dataclass
class CheckResult:
    """What ``check`` found. Truthy exactly when every case passed.

    ``status``: "passed", "failed", "error" (the function raised) or "not implemented";
    ``case``: the number of the reported case (1-based) and ``case_args`` its arguments;
    ``mistake``: the name of the usual mistake that explains every failing case, if one does;
    ``differs``: what differs on the reported case: "type", "shape", "dtype", "values", or
    "exception" when the function raised (None when it passed);
    ``message``: the verdict as printed.
    """
    task: str
    status: str
    n_cases: int = 0
    n_failed: int = 0
    case: int | None = None
    case_args: dict | None = None
    mistake: str | None = None
    differs: str | None = None
    hint: str = ""
    message: str = ""
    _printed: bool = field(default=False, repr=False)

    def __bool__(self) -> bool:
        return self.status == PASS

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        extra = f", mistake={self.mistake!r}" if self.mistake else ""
        return (f"CheckResult(task={self.task!r}, status={self.status!r}, "
                f"cases={self.n_cases}, failed={self.n_failed}{extra})")

    def _ipython_display_(self):
        # check() already printed the verdict; showing the returned object again would repeat it
        if not self._printed:
            print(self.message)


# ---------------------------------------------------------------- drawing cases
class _RandomDrawer:
    """The drawer API on a seeded ``random.Random`` (used when Hypothesis is not installed)."""

    def __init__(self, seed: int):
        self._r = random.Random(seed)

    def integers(self, lo: int, hi: int) -> int:
        return self._r.randint(lo, hi)

    def sampled_from(self, seq):
        seq = list(seq)
        return seq[self._r.randrange(len(seq))]

    def booleans(self) -> bool:
        return self._r.random() < 0.5

    def seed(self) -> int:
        return self._r.randrange(2**32)


class _HypothesisDrawer:
    """The drawer API on Hypothesis' ``st.data()``."""

    def __init__(self, data, st):
        self._data, self._st = data, st

    def integers(self, lo: int, hi: int) -> int:
        return self._data.draw(self._st.integers(lo, hi))

    def sampled_from(self, seq):
        return self._data.draw(self._st.sampled_from(list(seq)))

    def booleans(self) -> bool:
        return self._data.draw(self._st.booleans())

    def seed(self) -> int:
        return self._data.draw(self._st.integers(0, 2**32 - 1))


def draw_cases(task: Task, n: int) -> list:
    """``n`` cases of ``task`` drawn with Hypothesis (derandomized: the same cases on every run).

    Hypothesis drives ``task.draw`` through ``@given(st.data())``, called here as a plain function
    with only its generation phase (no database, no shrinking: the checker reports the smallest
    failing case itself). Without Hypothesis installed, a ``random.Random`` seeded by the task's
    name draws them instead, also deterministically.
    """
    if n <= 0:
        return []
    cases: list = []
    try:
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import strategies as st
    except ImportError:
        seed = sum(map(ord, task.name))
        return [Case(task.draw(_RandomDrawer(seed + i))) for i in range(n)]

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], verbosity=Verbosity.quiet, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data):
        if len(cases) < n:
            cases.append(Case(task.draw(_HypothesisDrawer(data, st))))

    collect()
    return cases


# ---------------------------------------------------------------- describing things in one line
def _short_array(a, max_chars: int = 160) -> str:
    a = np.asarray(a)
    floats = a.dtype.kind == "f"
    text = np.array2string(a, precision=4 if floats else 8, threshold=16, edgeitems=3,
                           suppress_small=False, max_line_width=10**6)
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 4] + " ...]"


def _describe_value(name: str, v) -> str:
    """'x (2, 5)', 'alpha=8', 'indices (5,) uint8 = [3 15 0 7 9]', 'config LlamaConfig(...)'."""
    if hasattr(v, "hidden_size") and hasattr(v, "num_hidden_layers"):  # a LlamaConfig
        return (f"{name}=LlamaConfig(hidden_size={v.hidden_size}, intermediate_size="
                f"{v.intermediate_size}, num_hidden_layers={v.num_hidden_layers}, num_attention_heads="
                f"{v.num_attention_heads}, num_key_value_heads={v.num_key_value_heads}, "
                f"vocab_size={v.vocab_size})")
    if isinstance(v, np.ndarray):
        dt = "" if v.dtype == np.float64 else f" {v.dtype}"
        shown = f" = {_short_array(v, 80)}" if v.size <= 8 else ""
        return f"{name} {tuple(v.shape)}{dt}{shown}"
    if isinstance(v, (list, tuple)) and len(v) <= 8:
        return f"{name}={tuple(v)!r}" if isinstance(v, tuple) else f"{name}={v!r}"
    text = repr(v)
    return f"{name}={text if len(text) <= 60 else text[:57] + '...'}"


def describe_case(args: dict) -> str:
    return ", ".join(_describe_value(k, v) for k, v in args.items())


def _num(v) -> str:
    """A number as a person writes it: 4,194,304 or 2.358108 (no np.float64(...) wrapper)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        return repr(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.7g}"
    return repr(v)


def _first_line(text: str, limit: int = 200) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------- comparing outputs
def _to_numpy(v):
    """A learner may return a minilora Tensor, a CuPy array or a list: compare them as NumPy."""
    if hasattr(v, "backward") and hasattr(v, "data"):  # a minilora Tensor: its array
        v = v.data
    if isinstance(v, (list, tuple)):
        try:
            return np.asarray(v)
        except ValueError:  # ragged: leave it, the comparison reports "got a list"
            return v
    if type(v).__module__.startswith("cupy"):
        return backend.to_numpy(v)
    return v


def _dtype_of(v) -> str:
    """The dtype a value carries, as NumPy names it ("uint8", "float32"), for a verdict; a Python
    number says so ("float64 (a Python float)"), since it is no NumPy scalar of that dtype."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int (a Python int)"
    if isinstance(v, float):
        return "float64 (a Python float)"
    return str(np.asarray(v).dtype)


def compare_arrays(expected, got, part: str, rtol: float, atol: float, exact: bool = False):
    """None when ``got`` matches ``expected``, else a Diff saying what differs first: the type, the
    shape, the dtype (both exactly), then the values (within rtol/atol, or exactly for integer
    outputs)."""
    got = _to_numpy(got)
    label = f"{part} " if part else ""
    if not isinstance(got, (np.ndarray, np.generic, int, float)):
        return Diff(part, [f"expected {part + ' as ' if part else ''}an array of shape "
                           f"{tuple(expected.shape)} {expected.dtype}, got a {type(got).__name__}"],
                    kind="type")
    got_dtype = _dtype_of(got)
    got = np.asarray(got)
    if got.dtype == object or got.dtype.kind not in "biuf":
        return Diff(part, [f"{part or 'the output'} has dtype {got.dtype}; "
                           f"expected numbers ({expected.dtype})"], kind="dtype")
    if got.shape != expected.shape:
        return Diff(part, [f"expected {label}shape {tuple(expected.shape)}, got shape {tuple(got.shape)}",
                           f"expected {label}{_short_array(expected)}",
                           f"got      {label}{_short_array(got)}"], kind="shape")
    if got.dtype != expected.dtype:
        return Diff(part, [f"expected {label}dtype {expected.dtype}, got {got_dtype} (the shape "
                           f"{tuple(expected.shape)} is right): convert with .astype(np.{expected.dtype})"],
                    kind="dtype")
    e64, g64 = expected.astype(np.float64), got.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(g64 - e64)
        if exact:
            bad = (g64 != e64)
        else:
            scale = max(1.0, float(np.max(np.abs(e64)))) if e64.size else 1.0
            bad = ~(diff <= atol * scale + rtol * np.abs(e64))
    bad |= np.isnan(g64) != np.isnan(e64)
    if not bad.any():
        return None
    diff = np.where(np.isnan(diff), np.inf, diff)
    i = int(np.argmax(np.where(bad, diff, -1.0)))
    where = np.unravel_index(i, expected.shape) if expected.ndim else ()
    idx = tuple(int(j) for j in where)
    md = float(diff.reshape(-1)[i]) if diff.size else 0.0
    ev, gv = expected.reshape(-1)[i], got.reshape(-1)[i]
    shape = f"{tuple(expected.shape)}" if expected.ndim else ""
    lines = [f"expected {label}{shape}: {_short_array(expected)}",
             f"got      {label}{shape}: {_short_array(got)}",
             f"{int(bad.sum())} of {bad.size} entries differ; largest |diff| {md:.4g}"
             + (f" at index {idx}" if idx else "") + f": expected {_num(ev)}, got {_num(gv)}"
             if expected.ndim else f"|diff| {md:.4g}"]
    return Diff(part, lines, md)


def _compare_number(expected, got, part, rtol, atol):
    """A number: its kind first (an int where an int is due; a float of the expected precision, a
    NumPy scalar or a 0-d array standing for it), then its value."""
    got = _to_numpy(got)
    label = f"{part} " if part else ""
    if isinstance(got, np.ndarray) and got.ndim > 0:
        return Diff(part, [f"expected {part + ' as ' if part else ''}a number, got an array of shape "
                           f"{got.shape}"], kind="shape")
    if isinstance(got, np.ndarray):                       # 0-d: the number it holds, dtype kept
        got = got[()]
    if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, float, np.integer, np.floating)):
        return Diff(part, [f"expected {part + ' as ' if part else ''}a number {_num(expected)}, got a "
                           f"{type(got).__name__}"], kind="type")
    want_int = isinstance(expected, (int, np.integer)) and not isinstance(expected, bool)
    if want_int and not isinstance(got, (int, np.integer)):
        return Diff(part, [f"expected {label}a whole number (int) {_num(expected)}, got "
                           f"{_dtype_of(got)} {_num(got)}: return an int (round() or int())"],
                    kind="dtype")
    if not want_int:
        want = np.dtype(type(expected)) if isinstance(expected, np.floating) else np.dtype(np.float64)
        have = np.dtype(type(got)) if isinstance(got, (np.integer, np.floating)) else \
            np.dtype(np.float64 if isinstance(got, float) else np.int64)
        if have != want:
            return Diff(part, [f"expected {label}a {want} number {_num(expected)}, got {_dtype_of(got)} "
                               f"{_num(got)}: convert with np.{want}(...)"], kind="dtype")
    got = got.item() if isinstance(got, np.generic) else got
    if want_int:
        ok = int(got) == int(expected) if rtol == 0 and atol == 0 else \
            abs(got - expected) <= atol + rtol * abs(expected)
    else:
        tol = atol * max(1.0, abs(expected)) + rtol * abs(expected)
        ok = math.isfinite(got) and abs(got - expected) <= tol
    if ok:
        return None
    ratio = f" ({got / expected:.4g}× the expected value)" if expected and math.isfinite(got) else ""
    return Diff(part, [f"expected {label}{_num(expected)}", f"got      {label}{_num(got)}{ratio}"],
                abs(got - expected) if math.isfinite(got) else math.inf)


def compare(expected, got, task: Task, part: str = ""):
    """The default comparison: arrays by type, shape and dtype, then values; numbers by kind (int or
    float of the expected precision), then value; tuples and dicts part by part."""
    if isinstance(expected, tuple):
        names = task.output_names or tuple(f"output[{i}]" for i in range(len(expected)))
        got = tuple(got) if isinstance(got, list) else got
        if not isinstance(got, tuple) or len(got) != len(expected):
            what = f"a tuple of {len(got)}" if isinstance(got, tuple) else \
                f"an array of shape {got.shape}" if hasattr(got, "shape") else f"a {type(got).__name__}"
            return Diff(part, [f"expected a tuple ({', '.join(names)}), got {what}"], kind="type")
        for name, e, g in zip(names, expected, got):
            d = compare(e, g, task, name)
            if d is not None:
                return d
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return Diff(part, [f"expected a dict with keys {list(expected)}, got a {type(got).__name__}"],
                        kind="type")
        missing = [k for k in expected if k not in got]
        if missing:
            return Diff(part, [f"the dict has no key {missing[0]!r} (expected keys {list(expected)})"],
                        kind="type")
        for k, e in expected.items():
            d = compare(e, got[k], task, repr(k))
            if d is not None:
                return d
        return None
    if isinstance(expected, np.ndarray):
        return compare_arrays(expected, got, part, task.rtol, task.atol,
                              exact=expected.dtype.kind in "biu")
    return _compare_number(expected, got, part, task.rtol, task.atol)


def _compare(task: Task, expected, got, args) -> Diff | None:
    if task.compare is not None:
        return task.compare(expected, got, args)
    return compare(expected, got, task)


# ---------------------------------------------------------------- running functions
def _copy_args(args: dict) -> list:
    """Fresh copies, so a function that writes into its inputs cannot change the next one's."""
    return [v.copy() if isinstance(v, np.ndarray) else v for v in args.values()]


def _run_reference(task: Task, args: dict):
    with np.errstate(all="ignore"):
        return task.reference(*_copy_args(args))


def _mistake_output(m: Mistake, args: dict):
    try:
        with np.errstate(all="ignore"):
            return True, m.fn(*_copy_args(args))
    except Exception:  # a mistake that cannot even run on this case explains nothing here
        return False, None


def _where_in(fn, exc: BaseException) -> str:
    """The line of the learner's function where ``exc`` was raised (or that called the failing op)."""
    code = getattr(fn, "__code__", None)
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if code is not None and f.filename == code.co_filename]
    f = mine[-1] if mine else None
    return f"at line {f.lineno}: {f.line.strip()}" if f is not None and f.line else ""


def _size(case: Case) -> int:
    return sum(v.size if isinstance(v, np.ndarray) else 1 for v in case.args.values())


def _arity_problem(fn, task: Task, args: dict) -> str:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return ""
    try:
        sig.bind(*args.values())
    except TypeError:
        return (f"your function takes {sig} but the task passes ({', '.join(args)}): "
                f"write it as {task.signature}")
    return ""


def _matches(task: Task, m: Mistake, k: int, case: Case, outcome) -> bool:
    """Does mistake ``m`` behave like the learner on this case: the same output, or an exception of
    the same type?"""
    kind, value = outcome
    if kind == "raised":
        try:
            with np.errstate(all="ignore"):
                m.fn(*_copy_args(case.args))
        except Exception as exc:  # noqa: BLE001  (any exception type is a fingerprint)
            return type(exc) is type(value)
        return False
    ran, out = _mistake_output(m, case.args)
    return ran and _compare(task, out, value, case.args) is None


# Comparisons stop at the first difference, in this order: type, shape, dtype, values.
_WHAT_IS_RIGHT = {"type": "", "shape": "", "dtype": " (its shape is right)",
                  "values": " (its type, shape and dtype are right)"}


def _hint_for(task: Task, failing: list, outcomes: dict, diffs: dict) -> tuple:
    """Name the usual mistake that explains the failure. Returns (mistake name or None, hint).

    A mistake is named only when it behaves like the learner on EVERY failing case (the same output,
    or the same exception type where the learner's code raised) and at least one of those cases is
    a wrong output (an exception type alone proves little). Otherwise no mistake is named: the hint
    is the reported case's note (when its values differ, or the code raised), or the task's general
    hint (its error hint when the code raised).
    """
    k0, case0 = failing[0]
    if any(outcomes[k][0] == "returned" for k, _ in failing):
        for m in task.mistakes:
            if all(_matches(task, m, k, c, outcomes[k]) for k, c in failing):
                return m.name, m.hint
    if outcomes[k0][0] == "returned":
        # a case's note speaks of its values; a wrong type, shape or dtype is named by the diff itself
        values_differ = diffs[k0].kind == "values"
        return None, (case0.note if values_differ else "") or task.hint
    return None, case0.note or task.error_hint or task.hint


def _seed_for(name: str) -> int:
    """A seed of the task's own, the same in every process (``hash(str)`` is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


@contextlib.contextmanager
def _own_random_numbers(name: str):
    """Run a check with every generator a learner's function or the references might draw from
    seeded for this task alone, and put each one back afterwards: minilora's ``backend.rng()``,
    NumPy's global generator and Python's ``random``. A verdict then never depends on which checks
    or tests ran before it, and a notebook's own random numbers are left where they were."""
    g = backend.rng()
    saved = g.bit_generator.state, np.random.get_state(), random.getstate()
    seed = _seed_for(name)
    g.bit_generator.state = type(g.bit_generator)(seed).state
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        g.bit_generator.state = saved[0]
        np.random.set_state(saved[1])
        random.setstate(saved[2])


def check(name: str, fn: Callable, max_examples: int = 30, verbose: bool = True,
          raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn`` against the task ``name`` on its edge cases and ``max_examples`` drawn cases.

    Prints a verdict (unless ``verbose=False``) and returns a CheckResult (truthy when all passed).
    Never raises for a wrong answer unless ``raise_on_fail=True`` (then ``ExerciseFailed``).
    """
    task = get_task(name)
    if not callable(fn):
        raise ValueError(f"check({name!r}, ...) needs your function itself, got a {type(fn).__name__}; "
                         f"pass it without calling it: check({name!r}, {name})")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 0:
        raise ValueError(f"max_examples must be a whole number >= 0, got {max_examples!r}")
    with _own_random_numbers(task.name):
        edges = list(task.edge_cases())
        cases = edges + draw_cases(task, max_examples)
        result = _run_all(task, fn, cases, n_edges=len(edges))
    if verbose:
        print(result.message)
        result._printed = True
    if raise_on_fail and not result:
        raise ExerciseFailed(result.message)
    return result


def _run_all(task: Task, fn: Callable, cases: list, n_edges: int) -> CheckResult:
    n = len(cases)
    arity = _arity_problem(fn, task, cases[0].args)
    if arity:
        return CheckResult(task.name, ERROR, n_cases=n, n_failed=n, case=1, case_args=cases[0].args,
                           differs="exception", message=f"{_MARK[ERROR]} {task.name}: {arity}")
    outcomes, diffs, failing = {}, {}, []
    for k, case in enumerate(cases):
        try:
            got = fn(*_copy_args(case.args))
        except NotImplementedError:
            msg = (f"{_MARK[NOT_DONE]} {task.name}: not implemented yet — replace "
                   f"`raise NotImplementedError` with your code and run the check again")
            return CheckResult(task.name, NOT_DONE, n_cases=n, n_failed=n, case=k + 1,
                               case_args=case.args, message=msg)
        except Exception as exc:  # the learner's bug: report it in words, never crash the notebook
            outcomes[k] = ("raised", exc)
            failing.append((k, case))
            continue
        outcomes[k] = ("returned", got)
        d = _compare(task, _run_reference(task, case.args), got, case.args)
        if d is not None:
            diffs[k] = d
            failing.append((k, case))
    if not failing:
        msg = (f"{_MARK[PASS]} {task.name}: all {n} cases passed "
               f"({n_edges} edge cases + {n - n_edges} drawn by hypothesis)")
        return CheckResult(task.name, PASS, n_cases=n, message=msg)
    # Report an exception before a wrong value (it is what the learner must fix first), and the
    # smallest such case (easiest to read), the earliest among equals.
    failing.sort(key=lambda kc: (outcomes[kc[0]][0] != "raised", _size(kc[1]), kc[0]))
    k, case = failing[0]
    mistake, hint = _hint_for(task, failing, outcomes, diffs)
    if callable(hint):
        hint = hint(case.args)
    where = f" on case {k + 1} of {n}{' (' + case.label + ')' if case.label else ''}: " \
            f"{describe_case(case.args)}"
    kind, value = outcomes[k]
    if kind == "raised":
        status, differs = ERROR, "exception"
        lines = [f"{_MARK[ERROR]} {task.name} raised {type(value).__name__}{where}",
                 f"  {type(value).__name__}: {_first_line(value)}"]
        at = _where_in(fn, value)
        if at:
            lines.append(f"  {at}")
    else:
        status, differs = FAIL, diffs[k].kind
        part = f" of {diffs[k].part}" if diffs[k].part else ""
        lines = [f"{_MARK[FAIL]} {task.name} failed{where}",
                 f"  what differs: the {differs}{part}{_WHAT_IS_RIGHT[differs]}"]
        lines += [f"  {ln}" for ln in diffs[k].lines]
    if hint:
        lines.append(f"  hint: {hint}")
    lines.append(f"  ({len(failing)} of {n} cases failed)")
    return CheckResult(task.name, status, n_cases=n, n_failed=len(failing), case=k + 1,
                       case_args=case.args, mistake=mistake, differs=differs, hint=hint or "",
                       message="\n".join(lines))


def check_all(namespace, max_examples: int = 30, verbose: bool = True) -> dict:
    """Check every task whose function is defined in ``namespace`` (a dict such as ``globals()``, or a
    module) and print one verdict per task. Returns {task name: CheckResult} for the ones found."""
    get = namespace.get if isinstance(namespace, dict) else (lambda k: getattr(namespace, k, None))
    results = {}
    for name in task_names():
        fn = get(name)
        if callable(fn):
            results[name] = check(name, fn, max_examples=max_examples, verbose=verbose)
    if verbose:
        passed = sum(bool(r) for r in results.values())
        print(f"{passed} of {len(task_names())} tasks passed"
              + ("" if len(results) == len(task_names()) else
                 f" ({len(task_names()) - len(results)} not found: "
                 f"{', '.join(n for n in task_names() if n not in results)})"))
    return results

