"""What an exercise is made of (``Task``, ``Case``, ``Mistake``) and the registry of tasks by name.

``tasks.py`` defines the exercises and ``register``-s each one here; ``checker.py`` looks them up
here to grade a learner's function. ``tasks.py`` imports ``checker.py`` (for its default
comparison) and this module; ``checker.py`` imports only this module, never ``tasks.py``; so the
imports have no cycle. The package's ``__init__`` imports ``tasks`` once, which fills the registry
before anyone can ask for a task by name.

This follows minitorch's idea (Rush, "MiniTorch", Cornell Tech) of named tasks, each with its own
tests.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

__all__ = ["Case", "Mistake", "Task", "register", "get_task", "task_names", "list_tasks"]


@dataclass(frozen=True)
class Case:
    """One set of arguments, in the order of the task's signature.

    ``label`` says why a fixed case exists ("α ≠ r"); ``note`` is a hint for this case alone, used
    when no usual mistake explains the failure (an all-zero block, an odd length...).
    """
    args: dict
    label: str = ""
    note: str = ""


@dataclass(frozen=True)
class Mistake:
    """A usual wrong answer: ``fn`` has the learner's signature and makes exactly this mistake."""
    name: str
    hint: str
    fn: Callable


@dataclass(frozen=True)
class Task:
    """A named exercise; ``checker.py``'s module docstring says how the checker uses each part.

    ``draw(d)`` builds one case's arguments from a drawer ``d`` (``d.integers(lo, hi)``,
    ``d.sampled_from(seq)``, ``d.booleans()``, ``d.seed()``); ``edge_cases()`` returns the fixed
    ``Case`` list; ``compare(expected, got, args)`` may replace the default comparison (it returns
    None when they agree, else a ``checker.Diff``).
    """
    name: str
    summary: str                      # one line, for list_tasks()
    signature: str                    # e.g. "lora_forward(x, W0, A, B, alpha, r) -> h"
    reference: Callable               # the answer, from the library
    draw: Callable                    # d -> dict of arguments
    edge_cases: Callable              # () -> list[Case]
    mistakes: tuple = ()
    hint: str = ""                    # when no usual mistake matches
    error_hint: str = ""              # when the learner's code raises
    output_names: tuple = ()          # names of the parts of a tuple/dict output ("dA", "dB")
    rtol: float = 1e-6
    atol: float = 1e-9                # scaled by max(1, max|expected|)
    compare: Callable | None = None
    minutes: int = 10                 # a teacher's estimate, shown in the guide


# Filled by tasks.py on import, in teaching order (dicts keep insertion order).
_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to the registry under its name and return it (names must be unique)."""
    if task.name in _TASKS:
        raise ValueError(f"a task called {task.name!r} is already registered; give the new one "
                         f"another name")
    _TASKS[task.name] = task
    return task


def task_names() -> list:
    """The task names, in teaching order."""
    return list(_TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name raises ValueError with the closest match."""
    if name not in _TASKS:
        close = difflib.get_close_matches(str(name), _TASKS, n=1)
        did_you_mean = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown exercise {name!r}{did_you_mean} list_tasks() shows them all")
    return _TASKS[name]


def list_tasks() -> None:
    """Print every task with its signature and a one-line description."""
    width = max(len(n) for n in _TASKS)
    for i, task in enumerate(_TASKS.values(), 1):
        print(f"{i:2d}. {task.name:<{width}}  {task.summary}")
        print(f"    {'':<{width}}  {task.signature}")
