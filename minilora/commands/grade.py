"""``minilora grade SUBMISSIONS... [--csv FILE] [--timeout SECONDS] [--tasks NAME...]``: grade a class.

Each submission is a learner's copy of ``notebooks/exercises/exercises.ipynb`` (read as JSON: no
Jupyter needed) or a Python script. For every learner the grader

1. **extracts** what a grade can rest on, with ``ast``, cell by cell (a script is one cell, or is cut
   at its ``# In[...]`` / ``# %%`` markers when it does not parse whole). The rule: keep the
   top-level ``def`` statements (decorators included), the top-level ``import`` / ``from ... import``
   statements, and assignments of plain names whose right-hand side calls nothing (no call, lambda,
   comprehension, ``await`` or ``yield``: ``MID = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2`` is kept,
   ``data = load_big_file()`` is not). Everything else is ignored: stray cells, ``print(scratch)``,
   ``check(...)`` calls, plots. Lines starting with ``%`` or ``!`` (IPython magics and shell
   commands) are blanked before parsing; a cell that still does not parse is skipped and named in
   the report;
2. **runs** the kept statements, in order, in a child process (one statement failing, for example
   on a name defined by an ignored cell, is reported and the rest go on), then ``check``-s each task
   whose function is defined. The child has a memory cap (``resource.setrlimit`` on its address
   space: what the grader itself uses plus ``--memory-mb``), runs NumPy on one thread, and each task
   (and each kept statement) has ``--timeout`` seconds: an endless loop makes that task "timeout"
   for that learner, never a hang of the grader. A child that stops answering (code that catches
   the timeout, a C loop that never returns) is killed and a new one grades the remaining tasks;
3. **reports** one row per learner (score, a mark per task, the first hint), the skipped cells,
   then per task the class's pass rate and the most common mistakes; ``--csv FILE`` writes the same
   rows with one column per task.

The exit code is 0 whenever grading ran, whatever the scores. The checks are those of
``minilora.teaching.exercises.check`` (docs/teachers-guide.md explains the verdicts), following
minitorch's named tasks (Rush, "MiniTorch", Cornell Tech).
"""
from __future__ import annotations

import argparse
import ast
import collections
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# what a task's cell shows, per status (a legend is printed under the table)
MARKS = {"passed": "✓", "failed": "✗", "error": "✗", "not implemented": "○", "missing": "○",
         "timeout": "T", "crashed": "!"}
LEGEND = ("✓ passed   ✗ wrong output or raised   ○ not implemented or not defined   T timeout   "
          "! the grader's child process died")
_CELL_MARKER = re.compile(r"^# (In\[[ 0-9]*\]:?|%%)")   # nbconvert's and editors' cell markers
_STARTUP_S = 60.0   # a child's allowance for importing minilora and NumPy on a loaded machine
_GRACE_S = 10.0     # beyond --timeout before a silent child is killed (its own alarm comes first)


# ---------------------------------------------------------------- reading and extracting
@dataclass
class Extracted:
    """What the grader keeps from one submission: ``chunks``, dicts of a filename, the cell's source
    (magics blanked) and ``kept``, the positions of the kept statements in its top level; ``notes``: one line per cell skipped because it does not parse; ``lost``: the
    functions such a cell starts to define (``def name(`` at the start of a line), by cell label."""
    chunks: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    lost: dict = field(default_factory=dict)


def read_cells(path: Path) -> list:
    """The submission's code as (label, source) pairs: a notebook's code cells (label "cell 7",
    counting every cell from 1), or a script's cells cut at ``# In[...]`` / ``# %%`` markers when
    the whole file does not parse (label "lines 12-30")."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".ipynb":
        try:
            nb = json.loads(text)
            cells = nb["cells"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path.name} is not a Jupyter notebook ({e}); submit the .ipynb file "
                             f"as saved by Jupyter, or a .py script") from None
        out = []
        for i, cell in enumerate(cells, 1):
            if cell.get("cell_type") == "code":
                src = cell.get("source", "")
                out.append((f"cell {i}", "".join(src) if isinstance(src, list) else str(src)))
        return out
    lines = text.splitlines(keepends=True)
    try:
        ast.parse(_blank_magics(text))
        return [(f"lines 1-{len(lines)}", text)]
    except SyntaxError:
        pass
    starts = [i for i, ln in enumerate(lines) if _CELL_MARKER.match(ln)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [len(lines)]
    # blank lines in front keep every chunk's line numbers those of the file
    return [(f"lines {a + 1}-{b}", "\n" * a + "".join(lines[a:b])) for a, b in zip(bounds, bounds[1:])
            if "".join(lines[a:b]).strip()]


def _blank_magics(source: str) -> str:
    """IPython magics (``%time``, ``%%capture``) and shell lines (``!pip install``) blanked, so the
    rest parses as Python and keeps its line numbers."""
    return "".join("\n" if ln.lstrip().startswith(("%", "!")) else ln
                   for ln in source.splitlines(keepends=True))


_FORBIDDEN_IN_CONSTANTS = (ast.Call, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                           ast.GeneratorExp, ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr)


def _keep(node: ast.stmt) -> bool:
    """The extraction rule of the module docstring, for one top-level statement."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return True
    if isinstance(node, ast.Import):
        return True
    if isinstance(node, ast.ImportFrom):
        return node.module != "__future__"
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if node.value is None or not all(isinstance(t, ast.Name) for t in targets):
            return False
        return not any(isinstance(n, _FORBIDDEN_IN_CONSTANTS) for n in ast.walk(node.value))
    return False


def extract(path: Path) -> Extracted:
    """Parse each cell of ``path`` and keep the statements the extraction rule allows."""
    found = Extracted()
    for label, source in read_cells(path):
        clean = _blank_magics(source)
        try:
            tree = ast.parse(clean)
        except SyntaxError as e:
            found.notes.append(f"{label} skipped: it does not parse ({type(e).__name__} at line "
                               f"{e.lineno}: {e.msg})")
            for name in re.findall(r"^def\s+(\w+)\s*\(", clean, re.M):
                found.lost.setdefault(name, label)
            continue
        kept = [i for i, n in enumerate(tree.body) if _keep(n)]
        if kept:
            found.chunks.append({"filename": f"{path.name} ({label})", "source": clean, "kept": kept})
    return found


# ---------------------------------------------------------------- the child process
class _Timeout(BaseException):
    """Raised by the alarm inside the child. A BaseException, so that the checker (which reports a
    learner's ``Exception`` as a wrong answer) and most learner code let it through."""


def _cap_memory(extra_mb: int) -> None:
    """Cap the address space at what this process maps now plus ``extra_mb`` (Linux; elsewhere no
    cap: ``/proc/self/statm`` is missing and macOS ignores RLIMIT_AS)."""
    try:
        import resource
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        return
    limit = used + extra_mb * 2**20
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _run_statements(chunks: list, ns: dict, timeout: float) -> list:
    """Execute the kept statements in ``ns``, each under the alarm; one line per failure."""
    import linecache
    notes = []
    for chunk in chunks:
        # the source in linecache lets tracebacks (and the checker's "at line N") quote the code
        lines = chunk["source"].splitlines(keepends=True)
        linecache.cache[chunk["filename"]] = (len(chunk["source"]), None, lines, chunk["filename"])
        body = ast.parse(chunk["source"]).body
        for node in (body[i] for i in chunk["kept"]):
            code = compile(ast.Module(body=[node], type_ignores=[]), chunk["filename"], "exec")
            try:
                _with_alarm(timeout, exec, code, ns)
            except _Timeout:
                notes.append(f"{chunk['filename']} line {node.lineno}: ran past {timeout:g} s, skipped")
            except BaseException as e:  # noqa: BLE001  (SystemExit, KeyboardInterrupt from learner code too)
                notes.append(f"{chunk['filename']} line {node.lineno}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": ") + ", skipped")
    return notes


def _with_alarm(seconds: float, fn, *args):
    import signal

    def ring(signum, frame):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load_definitions(path, timeout: float = 60.0) -> tuple:
    """The learner's kept statements (the extraction rule above) run in this process, each under
    ``timeout`` seconds. Returns (namespace dict, notes): what ``MINILORA_EXERCISES_FROM`` grades in
    tests/test_exercises.py, without the child process, its memory cap or its per-task timeout."""
    found = extract(Path(path))
    ns = {"__name__": "__submission__", "__builtins__": __builtins__}
    return ns, found.notes + _run_statements(found.chunks, ns, timeout)


def child_main(spec_path: str) -> int:
    """The child's whole job: read the spec, run the learner's statements, check each task, and
    append one JSON line per event to the spec's ``out`` file (flushed, so the parent sees progress
    and keeps what was done if it must kill the child)."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    import hypothesis  # noqa: F401  (imported before the memory cap: the checker draws with it)

    from minilora.teaching.exercises import check
    out = open(spec["out"], "a", encoding="utf-8")

    def emit(**event):
        out.write(json.dumps(event) + "\n")
        out.flush()
    _cap_memory(spec["memory_mb"])
    devnull = open(os.devnull, "w")
    sys.stdout = sys.stderr = devnull          # a learner's prints are not the grader's output
    ns = {"__name__": "__submission__", "__builtins__": __builtins__}
    emit(event="ready", notes=_run_statements(spec["chunks"], ns, spec["timeout"]))
    for name in spec["tasks"]:
        fn = ns.get(name)
        if not callable(fn):
            lost = spec["lost"].get(name)
            emit(event="task", task=name, status="missing",
                 hint=f"not defined ({lost}, which defines it, does not parse)" if lost else "not defined")
            continue
        try:
            r = _with_alarm(spec["timeout"], check, name, fn, spec["max_examples"], False)
        except _Timeout:
            emit(event="task", task=name, status="timeout",
                 hint=f"ran past {spec['timeout']:g} s (an endless loop?)")
            continue
        except (SystemExit, KeyboardInterrupt) as e:   # exit() in the learner's function
            emit(event="task", task=name, status="error", verdict=f"✗ {name} raised {type(e).__name__}",
                 hint=f"your function raised {type(e).__name__} (exit() or sys.exit()?): return a value")
            continue
        except Exception as e:  # noqa: BLE001  (an output so odd that comparing it failed)
            emit(event="task", task=name, status="error",
                 hint=f"the checker could not compare the output: {type(e).__name__}: {e}")
            continue
        first = r.message.splitlines()[0] if r.message else ""
        hint = r.hint or ("not implemented yet" if r.status == "not implemented" else "")
        emit(event="task", task=name, status=r.status, mistake=r.mistake, differs=r.differs,
             hint=hint, verdict=first)
    out.close()
    return 0


# ---------------------------------------------------------------- the parent
@dataclass
class Student:
    """One learner's grade: ``results`` maps a task name to its child's report (a dict with
    ``status`` and, when not passed, ``hint``, and from a check ``mistake``, ``differs`` and
    ``verdict``, the verdict's first line)."""
    name: str
    path: Path
    results: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def score(self) -> int:
        return sum(r["status"] == "passed" for r in self.results.values())

    def first_hint(self, tasks: list) -> str:
        for name in tasks:
            r = self.results.get(name, {})
            if r.get("status") != "passed":
                return f"{name}: {r.get('hint') or r.get('status', '')}"
        return ""


def _child_command() -> list:
    return [sys.executable, "-c",
            "import sys; from minilora.commands.grade import child_main; sys.exit(child_main(sys.argv[1]))"]


def _child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])       # the folder holding this minilora package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINILORA_NUM_THREADS"):
        env[var] = "1"          # one thread per learner: the grader runs them one after another
    env["MINILORA_DEVICE"] = "cpu"
    return env


def _read_events(path: Path) -> list:
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:        # a line cut short when the child was killed
            pass
    return events


def grade_one(path: Path, name: str, tasks: list, timeout: float, max_examples: int,
              memory_mb: int) -> Student:
    """Grade one submission in child processes; see the module docstring."""
    student = Student(name, path)
    try:
        found = extract(path)
    except (ValueError, OSError) as e:
        student.notes.append(str(e))
        student.results = {t: {"status": "missing", "hint": "nothing could be read"} for t in tasks}
        return student
    student.notes += found.notes
    remaining = list(tasks)
    first_run = True
    with tempfile.TemporaryDirectory(prefix="minilora-grade-") as work:
        while remaining:
            out = Path(work) / "events.jsonl"
            out.unlink(missing_ok=True)
            spec = Path(work) / "spec.json"
            spec.write_text(json.dumps({"chunks": found.chunks, "lost": found.lost, "tasks": remaining,
                                        "timeout": timeout,
                                        "max_examples": max_examples, "memory_mb": memory_mb,
                                        "out": str(out)}), encoding="utf-8")
            with open(Path(work) / "stderr.txt", "w") as err:
                proc = subprocess.Popen(_child_command() + [str(spec)], cwd=work, env=_child_env(),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
                killed = _watch(proc, out, timeout)
            events = _read_events(out)
            for e in events:
                if e["event"] == "ready" and first_run:
                    student.notes += e["notes"]
                elif e["event"] == "task":
                    student.results[e["task"]] = {k: v for k, v in e.items() if k not in ("event", "task")}
            ready = any(e["event"] == "ready" for e in events)
            first_run = first_run and not ready
            remaining = [t for t in remaining if t not in student.results]
            if not remaining:
                break
            status = "timeout" if killed else "crashed"
            reason = (f"ran past {timeout:g} s and ignored the alarm (an endless loop that catches "
                      f"every exception?)" if killed else _last_line(Path(work) / "stderr.txt"))
            if not ready:
                # the learner's top-level statements never finished: no task can be checked
                for t in remaining:
                    student.results[t] = {"status": status, "hint": "while running the submission's "
                                          "definitions: " + reason}
                break
            # the child died or was killed during remaining[0]: that task's verdict, then go on
            student.results[remaining.pop(0)] = {"status": status, "hint": reason}
    return student


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return f"the child process died: {lines[-1].strip()}" if lines else "the child process died"


def _watch(proc, out: Path, timeout: float) -> bool:
    """Wait for the child; kill it when no new event came for too long. True when it was killed."""
    seen, last_change = -1, time.monotonic()
    while proc.poll() is None:
        size = out.stat().st_size if out.exists() else 0
        now = time.monotonic()
        if size != seen:
            seen, last_change = size, now
        # before its first event the child imports minilora and runs every kept statement
        limit = timeout + _GRACE_S + (_STARTUP_S if size == 0 else 0)
        if now - last_change > limit:
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.05)
    return False


def _names(paths: list) -> list:
    """A learner's name is the file's name without its extension; where two files share one
    (alice/exercises.ipynb, bob/exercises.ipynb), the folder is kept: alice/exercises."""
    stems = collections.Counter(p.stem for p in paths)
    return [f"{p.parent.name}/{p.stem}" if stems[p.stem] > 1 else p.stem for p in paths]


def _submissions(items: list) -> list:
    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix in (".ipynb", ".py"))
        elif not p.exists():
            raise FileNotFoundError(f"no submission at {item!r} (an unmatched pattern stays as typed); "
                                    f"give .ipynb or .py files, or a folder of them")
        elif p.suffix not in (".ipynb", ".py"):
            raise ValueError(f"{item!r} is neither a notebook (.ipynb) nor a script (.py)")
        else:
            paths.append(p)
    if not paths:
        raise ValueError("no .ipynb or .py submission found in " + ", ".join(map(repr, items)))
    return paths


# ---------------------------------------------------------------- the report
def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _cell(r: dict) -> str:
    """A task's CSV cell: the status, and the usual mistake when one was named."""
    return r["status"] + (f" ({r['mistake']})" if r.get("mistake") else "")


def _what_went_wrong(r: dict) -> str:
    """The key under which class statistics count a non-passing result."""
    if r.get("mistake"):
        return r["mistake"]
    if r["status"] == "failed":
        return f"no usual mistake, {r.get('differs') or 'values'} differ"
    if r["status"] == "error":
        verdict = r.get("verdict", "")
        m = re.search(r" raised (\w+)", verdict)
        return f"raised {m.group(1)}" if m else "raised"
    return r["status"]


def report(students: list, tasks: list, hint_width: int = 100) -> str:
    """The text the command prints: a row per learner, their skipped cells, the class statistics."""
    name_w = max([len("student")] + [len(s.name) for s in students])
    cols = [str(i) for i in range(1, len(tasks) + 1)]
    col_w = max(len(c) for c in cols)
    score_w = len(f"{len(tasks)}/{len(tasks)}")
    head = f"{'student':<{name_w}}  {'score':>{score_w}}  " + " ".join(c.rjust(col_w) for c in cols) \
        + "  first hint"
    lines = [head]
    for s in students:
        marks = " ".join(MARKS[s.results[t]["status"]].rjust(col_w) for t in tasks)
        lines.append(f"{s.name:<{name_w}}  {f'{s.score()}/{len(tasks)}':>{score_w}}  {marks}  "
                     f"{_short(s.first_hint(tasks), hint_width)}".rstrip())
    lines.append("")
    lines.append(LEGEND)
    lines.append("tasks: " + ", ".join(f"{i} {t}" for i, t in enumerate(tasks, 1)))
    noted = [s for s in students if s.notes]
    if noted:
        lines.append("")
        lines.append("skipped while reading the submissions:")
        for s in noted:
            lines += [f"  {s.name}: {n}" for n in s.notes]
    lines.append("")
    lines.append(f"class statistics ({len(students)} submission{'s' if len(students) != 1 else ''}):")
    task_w = max(len(t) for t in tasks)
    for i, t in enumerate(tasks, 1):
        passed = sum(s.results[t]["status"] == "passed" for s in students)
        wrong = collections.Counter(_what_went_wrong(s.results[t]) for s in students
                                    if s.results[t]["status"] != "passed")
        common = ", ".join(f"{k} ×{n}" for k, n in wrong.most_common(3))
        lines.append(f"{i:>{col_w}} {t:<{task_w}}  {passed}/{len(students)} passed "
                     f"({100 * passed / len(students):3.0f}%)" + (f"   {common}" if common else ""))
    return "\n".join(lines)


def write_csv(path: Path, students: list, tasks: list) -> None:
    """One row per learner: student, score, out_of, one column per task, first_hint, notes."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["student", "score", "out_of", *tasks, "first_hint", "notes"])
        for s in students:
            w.writerow([s.name, s.score(), len(tasks), *(_cell(s.results[t]) for t in tasks),
                        s.first_hint(tasks), " | ".join(s.notes)])


# ---------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("submissions", nargs="+", metavar="SUBMISSION",
                   help="learners' notebooks (.ipynb) or scripts (.py), or folders holding them")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE",
                   help="also write one row per learner to this CSV file")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time allowed to each task's check (and to each kept statement)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="NAME",
                   help="grade only these tasks (default: every task, in teaching order)")
    p.add_argument("--max-examples", type=int, default=30,
                   help="cases drawn by Hypothesis per task, after the fixed edge cases")
    p.add_argument("--memory-mb", type=int, default=2048,
                   help="memory a learner's code may take on top of the grader's own")


def run(args) -> int:
    from ..teaching.exercises import get_task, task_names
    tasks = task_names() if not args.tasks else [get_task(t).name for t in args.tasks]
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if args.max_examples < 0:
        raise ValueError(f"--max-examples must be 0 or more, got {args.max_examples}")
    paths = _submissions(args.submissions)
    students = [grade_one(p, n, tasks, args.timeout, args.max_examples, args.memory_mb)
                for p, n in zip(paths, _names(paths))]
    print(report(students, tasks))
    if args.csv is not None:
        write_csv(args.csv, students, tasks)
        print(f"\nwrote {args.csv}")
    return 0
