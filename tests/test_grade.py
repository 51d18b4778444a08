"""``minilora grade``: a synthetic class written into tmp_path, graded as notebooks and as scripts.

The class: a learner with every answer right, one with a usual mistake in several tasks, one whose
notebook has a cell that does not parse, a stray ``print(scratch)`` cell and IPython magics, one who
left a function out, and one whose function never returns. The rows, the CSV, the class statistics
and the commands of docs/teachers-guide.md (run exactly as written there) are checked.
"""
import ast
import csv
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minilora.commands import grade
from minilora.teaching.exercises import get_task, solutions, task_names

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "teachers-guide.md"
TASKS = task_names()

SETUP = """\
import numpy as np

from minilora.teaching.exercises import check, check_all, list_tasks
from minilora.memory import count_parameters
from minilora.quant import DYNAMIC_MAP, NF4_CODE

np.set_printoptions(precision=4, suppress=True)
list_tasks()"""

# usual mistakes, written as a learner would (each equals a Mistake of tasks.py on every case)
ALPHA_NOT_OVER_R = '''\
def lora_forward(x, W0, A, B, alpha, r):
    return x @ W0.T + alpha * (x @ A.T) @ B.T'''
NIBBLES_SWAPPED = '''\
def pack_nibbles(indices):
    idx = np.asarray(indices, dtype=np.uint8)
    if idx.size % 2 == 1:
        idx = np.append(idx, np.uint8(7))
    return ((idx[1::2] << 4) | idx[0::2]).astype(np.uint8)'''
FORGOT_W0 = '''\
def merge(W0, A, B, alpha, r):
    return (alpha / r) * (B @ A)'''
ENDLESS = '''\
def lora_forward(x, W0, A, B, alpha, r):
    h = x @ W0.T
    while True:          # waiting for inspiration
        h = h + 0.0
    return h'''


def _answer(name: str) -> str:
    return inspect.getsource(getattr(solutions, name)).rstrip()


def _cells(answers: dict) -> list:
    """The student notebook's code cells, in order: setup, then per task its function and check."""
    cells = [SETUP]
    for name in TASKS:
        if name in answers:
            cells += [answers[name], f'check("{name}", {name})']
    return cells + ["results = check_all(globals())"]


def write_notebook(path: Path, cells: list) -> Path:
    """A notebook as Jupyter saves it (nbformat 4), code cells only, as JSON."""
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                     "source": src.splitlines(keepends=True)} for src in cells],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return path


def write_script(path: Path, cells: list) -> Path:
    """A script as ``jupyter nbconvert --to script`` writes it: cells after ``# In[k]:`` markers."""
    parts = ["#!/usr/bin/env python\n# coding: utf-8\n"]
    parts += [f"# In[{k}]:\n\n\n{src}\n\n" for k, src in enumerate(cells, 1)]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def the_class() -> dict:
    """learner name -> their notebook's code cells."""
    right = {name: _answer(name) for name in TASKS}
    no_colon = _answer("lora_grads").replace("alpha, r):", "alpha, r)", 1)      # a SyntaxError
    broken = _cells({**right, "lora_grads": no_colon})
    broken.insert(3, "print(scratch)")                                            # a stray cell
    broken.insert(4, "%time merge(np.ones((2, 2)), np.ones((1, 2)), np.ones((2, 1)), 1, 1)\n"
                     "!pip list\nHALF = 1 / 2")
    return {
        "all_right": _cells(right),
        "broken_cells": broken,
        "endless_loop": _cells({**right, "lora_forward": ENDLESS}),
        "missing_one": _cells({k: v for k, v in right.items() if k != "lora_grads"}),
        "usual_mistakes": _cells({**right, "lora_forward": ALPHA_NOT_OVER_R,
                                  "pack_nibbles": NIBBLES_SWAPPED, "merge": FORGOT_W0}),
    }


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def guide_commands() -> list:
    """The fenced commands of docs/teachers-guide.md that follow a ``<!-- tested by
    tests/test_grade.py -->`` marker, and the output block after each (``<!-- its output -->``)."""
    text = GUIDE.read_text(encoding="utf-8")
    found = []
    pattern = r"<!-- tested by tests/test_grade.py -->\s*```bash\n(.*?)```" \
              r"(?:.*?<!-- its output -->\s*```text\n(.*?)```)?"
    for m in re.finditer(pattern, text, re.S):
        found.append((m.group(1).strip(), m.group(2)))
    return found


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """The guide's grading commands, run exactly as written in a folder holding submissions/."""
    work = tmp_path_factory.mktemp("course")
    (work / "submissions").mkdir()
    # "from a minilora checkout, with the submissions folder beside tests/": links stand for the checkout
    (work / "tests").symlink_to(ROOT / "tests", target_is_directory=True)
    (work / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
    for name, cells in the_class().items():
        write_notebook(work / "submissions" / f"{name}.ipynb", cells)
    commands = guide_commands()
    assert commands, "docs/teachers-guide.md has no command marked <!-- tested by tests/test_grade.py -->"
    runs = []
    for command, shown in commands:
        t0 = time.monotonic()
        p = subprocess.run(command, shell=True, cwd=work, env=_env(), capture_output=True, text=True,
                           timeout=300)
        runs.append((command, shown, p, time.monotonic() - t0))
    return work, runs


def _grade_run(graded_class):
    work, runs = graded_class
    command, shown, p, seconds = runs[0]
    assert "minilora grade submissions/*.ipynb --csv grades.csv" in command
    assert p.returncode == 0, p.stderr
    return work, p.stdout, seconds


def _row(out: str, name: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith(name + " "))


def test_one_row_per_student_with_score_marks_and_first_hint(graded_class):
    work, out, _ = _grade_run(graded_class)
    n = len(TASKS)
    marks = lambda row: row.split()[2:2 + n]   # noqa: E731
    row = _row(out, "all_right")
    assert row.split()[1] == f"{n}/{n}" and marks(row) == ["✓"] * n and row.endswith("✓")
    row = _row(out, "usual_mistakes")
    assert row.split()[1] == f"{n - 3}/{n}"
    wrong = {TASKS[i] for i, m in enumerate(marks(row)) if m == "✗"}
    assert wrong == {"lora_forward", "merge", "pack_nibbles"}
    assert "lora_forward: you scaled by alpha, not alpha/r" in row        # the first task's hint
    row = _row(out, "missing_one")
    assert marks(row)[TASKS.index("lora_grads")] == "○" and row.split()[1] == f"{n - 1}/{n}"
    assert "lora_grads: not defined" in row
    row = _row(out, "endless_loop")
    assert marks(row)[TASKS.index("lora_forward")] == "T" and row.split()[1] == f"{n - 1}/{n}"
    assert "lora_forward: ran past 10 s" in row


def test_a_broken_cell_and_a_stray_cell_cost_only_their_own_task(graded_class):
    work, out, _ = _grade_run(graded_class)
    row = _row(out, "broken_cells")
    n = len(TASKS)
    assert row.split()[1] == f"{n - 1}/{n}"       # lora_grads is lost: it was in the broken cell
    assert "lora_grads: not defined (cell 8, which defines it, does not parse)" in row
    notes = [ln.strip() for ln in out.splitlines() if ln.startswith("  broken_cells: ")]
    assert notes == ["broken_cells: cell 8 skipped: it does not parse (SyntaxError at line 1: "
                     "expected ':')"]
    assert "scratch" not in out and len(out.splitlines()) < 40   # the stray print never ran


def test_the_class_statistics_count_passes_and_mistakes(graded_class):
    work, out, _ = _grade_run(graded_class)
    stats = out[out.index("class statistics (5 submissions):"):].split("\n\n")[0].splitlines()[1:]
    by_task = {ln.split()[1]: ln for ln in stats}
    assert set(by_task) == set(TASKS)
    assert "3/5 passed ( 60%)" in by_task["lora_forward"]
    assert "alpha_not_alpha_over_r ×1" in by_task["lora_forward"] and "timeout ×1" in by_task["lora_forward"]
    assert "3/5 passed ( 60%)" in by_task["lora_grads"] and "missing ×2" in by_task["lora_grads"]
    assert "5/5 passed (100%)" in by_task["unmerge"]
    assert "low_high_swapped ×1" in by_task["pack_nibbles"]
    assert "forgot_W0 ×1" in by_task["merge"]
    assert "5/5 passed (100%)" in by_task["softmax_backward"]


def test_the_csv_has_the_same_rows(graded_class):
    work, out, _ = _grade_run(graded_class)
    with open(work / "grades.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["student"] for r in rows] == ["all_right", "broken_cells", "endless_loop", "missing_one",
                                            "usual_mistakes"]
    assert list(rows[0]) == ["student", "score", "out_of", *TASKS, "first_hint", "notes"]
    by_name = {r["student"]: r for r in rows}
    assert by_name["all_right"]["score"] == str(len(TASKS)) and by_name["all_right"]["first_hint"] == ""
    assert all(by_name["all_right"][t] == "passed" for t in TASKS)
    m = by_name["usual_mistakes"]
    assert m["lora_forward"] == "failed (alpha_not_alpha_over_r)"
    assert m["pack_nibbles"] == "failed (low_high_swapped)" and m["merge"] == "failed (forgot_W0)"
    assert m["first_hint"] == "lora_forward: " + next(
        x.hint for x in get_task("lora_forward").mistakes if x.name == "alpha_not_alpha_over_r")
    assert by_name["endless_loop"]["lora_forward"] == "timeout"
    assert by_name["missing_one"]["lora_grads"] == "missing"
    assert "cell 8 skipped" in by_name["broken_cells"]["notes"]
    for name, r in by_name.items():                 # the CSV's score is the row's score
        assert f" {r['score']}/{len(TASKS)} " in _row(out, name)


def test_the_guide_shows_the_real_output_of_its_command(graded_class):
    """docs/teachers-guide.md pastes the output of its grading command on this very class."""
    work, runs = graded_class
    command, shown, p, _ = runs[0]
    assert shown is not None, "the guide's grading command should be followed by its output"
    assert p.stdout.strip() == shown.strip()


def test_the_guides_pytest_command_grades_one_task_of_one_learner(graded_class):
    work, runs = graded_class
    command, _, p, _ = runs[1]
    assert command.startswith("MINILORA_EXERCISES_FROM=submissions/usual_mistakes.ipynb python -m pytest")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]     # merge is wrong: one failure
    assert "1 failed" in p.stdout and "passed" not in p.stdout.splitlines()[-1]
    assert "✗ merge failed on case" in p.stdout
    assert "hint: you returned ΔW alone: add it to W0" in p.stdout


def test_an_endless_loop_costs_its_timeout_not_a_hang(graded_class):
    work, out, seconds = _grade_run(graded_class)
    # five learners: one 10 s timeout, the rest a few seconds each even on a loaded machine
    assert seconds < 120, f"grading the class took {seconds:.0f} s"


# ---------------------------------------------------------------- scripts, the child, the rules
def test_scripts_are_graded_like_notebooks(tmp_path, monkeypatch):
    """The script form (.py as nbconvert writes it, with a cell that does not parse) and a
    per-task selection with --tasks; a loop that swallows the alarm is killed, not waited for."""
    right = {name: _answer(name) for name in TASKS}
    stubborn = ("def lora_forward(x, W0, A, B, alpha, r):\n    import signal\n"
                "    signal.signal(signal.SIGALRM, signal.SIG_IGN)   # no alarm stops it now\n"
                "    while True:\n        pass")
    class_ = {"right": _cells(right),
              "mixed": _cells({**right, "pack_nibbles": NIBBLES_SWAPPED}) + ["def oops(:\n    pass"],
              "stubborn": _cells({**right, "lora_forward": stubborn})}
    paths = [write_script(tmp_path / f"{n}.py", cells) for n, cells in class_.items()]
    monkeypatch.setattr(grade, "_GRACE_S", 2.0)     # the silent child's grace, shortened for the test
    students = [grade.grade_one(p, p.stem, ["lora_forward", "merge", "pack_nibbles"], 3.0, 5, 2048)
                for p in paths]
    right_s, mixed, stubborn_s = students
    assert right_s.score() == 3 and right_s.notes == []
    assert mixed.results["pack_nibbles"]["mistake"] == "low_high_swapped" and mixed.score() == 2
    assert len(mixed.notes) == 1 and "skipped: it does not parse" in mixed.notes[0]
    assert stubborn_s.results["lora_forward"]["status"] == "timeout"
    assert "ignored the alarm" in stubborn_s.results["lora_forward"]["hint"]
    assert stubborn_s.results["merge"]["status"] == "passed"      # a new child graded the rest
    table = grade.report(students, ["lora_forward", "merge", "pack_nibbles"])
    assert table.splitlines()[0].split()[:5] == ["student", "score", "1", "2", "3"]


def test_only_definitions_imports_and_call_free_assignments_are_kept(tmp_path):
    source = textwrap.dedent('''\
        import numpy as np
        from __future__ import annotations
        HALF = 1 / 2
        MID = (np.e - np.pi) * HALF
        CODES: tuple = (1, 2, 3)
        OK = 1; print(scratch)
        data = np.ones(10 ** 9)
        cache = [x for x in range(10 ** 9)]
        print(scratch)
        for i in range(3):
            pass
        class Helper:
            pass
        @staticmethod
        def f(x):
            return x
        ''')
    path = tmp_path / "s.py"
    path.write_text(source)
    found = grade.extract(path)
    body = ast.parse(found.chunks[0]["source"]).body
    kept = [body[i] for i in found.chunks[0]["kept"]]
    assert [type(n).__name__ for n in kept] == ["Import", "Assign", "Assign", "AnnAssign", "Assign",
                                                "FunctionDef"]
    assert [n.targets[0].id for n in kept if hasattr(n, "targets")] == ["HALF", "MID", "OK"]
    ns, notes = grade.load_definitions(path)        # the print on OK's line is not run
    assert notes == [] and ns["OK"] == 1 and ns["CODES"] == (1, 2, 3) and ns["f"](3) == 3


def test_magics_are_blanked_and_line_numbers_kept(tmp_path):
    path = write_notebook(tmp_path / "m.ipynb", ["%load_ext autoreload\n!ls\ndef merge(W0, A, B, alpha, r):\n"
                                                 "    return W0 + (alpha / r) * (B @ A)"])
    found = grade.extract(path)
    assert found.notes == [] and found.chunks[0]["kept"] == [0]
    assert ast.parse(found.chunks[0]["source"]).body[0].lineno == 3      # the def's own line


def test_a_submission_that_is_not_a_notebook_gets_a_row_and_a_note(tmp_path):
    path = tmp_path / "garbled.ipynb"
    path.write_text("{ not json")
    s = grade.grade_one(path, "garbled", ["merge"], 5.0, 5, 2048)
    assert s.results["merge"]["status"] == "missing" and "is not a Jupyter notebook" in s.notes[0]


def test_names_come_from_the_files_and_bad_arguments_are_one_line_errors(tmp_path):
    a, b = tmp_path / "alice" / "exercises.ipynb", tmp_path / "bob" / "exercises.ipynb"
    assert grade._names([a, b]) == ["alice/exercises", "bob/exercises"]
    assert grade._names([tmp_path / "carol.py"]) == ["carol"]
    p = subprocess.run([sys.executable, "-m", "minilora", "grade", str(tmp_path / "nobody.ipynb")],
                       capture_output=True, text=True, env=_env())
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "no submission at" in p.stderr
    p = subprocess.run([sys.executable, "-m", "minilora", "grade", str(tmp_path), "--tasks", "lora_foward"],
                       capture_output=True, text=True, env=_env())
    assert p.returncode == 2 and "did you mean 'lora_forward'" in p.stderr


def test_the_memory_cap_turns_a_huge_array_into_a_memory_error(tmp_path):
    """With --memory-mb 200, a 400 MB array fails inside the child instead of being allocated."""
    hog = "import numpy as np\n\ndef merge(W0, A, B, alpha, r):\n    big = np.ones(50_000_000)\n" \
          "    return W0 + (alpha / r) * (B @ A) + 0 * big[0]"
    path = write_notebook(tmp_path / "hog.ipynb", [hog])
    s = grade.grade_one(path, "hog", ["merge"], 10.0, 0, 200)
    assert s.results["merge"]["status"] == "error", s.results
    assert "raised MemoryError" in s.results["merge"]["verdict"]


def test_the_shipped_notebooks_grade_as_handed_out():
    """The student notebook as handed out (every stub ○) and the teacher's copy (every task ✓)."""
    folder = ROOT / "notebooks" / "exercises"
    blank, model = (grade.grade_one(folder / f, f, TASKS, 10.0, 3, 2048)
                    for f in ("exercises.ipynb", "solutions.ipynb"))
    assert {r["status"] for r in blank.results.values()} == {"not implemented"} and blank.notes == []
    assert model.score() == len(TASKS) and model.notes == []
