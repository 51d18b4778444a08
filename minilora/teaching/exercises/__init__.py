"""Classroom exercises with an autograder: write a function, check it in one line.

    >>> from minilora.teaching.exercises import check, list_tasks
    >>> list_tasks()                          # the eleven tasks, one line each
    >>> def lora_forward(x, W0, A, B, alpha, r):
    ...     return x @ W0.T + alpha / r * (x @ A.T) @ B.T
    >>> check("lora_forward", lora_forward)   # ✓ lora_forward: all 34 cases passed ...

``check`` compares the function with minilora's own implementation on fixed edge cases and on cases
drawn with Hypothesis, and prints which case failed, with shapes, expected and got values, and a hint
naming the usual mistake (alpha instead of alpha/r, A and B swapped, a gradient not summed over
broadcast axes...). It never raises for a wrong answer unless ``raise_on_fail=True``.
``check_all(globals())`` checks every task defined in a notebook. The student notebook is
notebooks/exercises/exercises.ipynb; docs/teachers-guide.md explains how to run a class with it.
"""
from .checker import CheckResult, ExerciseFailed, check, check_all
from .registry import get_task, list_tasks, task_names
from . import tasks  # noqa: F401  (defining the tasks registers them; nothing else loads them)

__all__ = ["check", "check_all", "list_tasks", "task_names", "get_task", "CheckResult",
           "ExerciseFailed"]
