"""Checks every command runs on its arguments before any work: argparse types for numbers in range,
and the rules for output folders (never an existing file, never inside the installed package,
never over a good model with a diverged one).

A type function raises ``argparse.ArgumentTypeError``; the ``minilora`` parser (``cli.py``) turns
that into one line naming the argument, so ``--lr nan`` or ``--steps 0`` fails before a model is
built, in the user's terms.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def float_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in the interval from ``low`` to ``high`` (open ends as told)."""
    left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
    interval = f"{left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low) \
                or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value
    parse.__name__ = f"number in {interval}"
    return parse


positive_float = float_in(0.0, low_open=True)          # learning rates, alpha
nonnegative_float = float_in(0.0)                       # weight decay
fraction = float_in(0.0, 1.0)                           # ratios in [0, 1]


def inside_package(path) -> bool:
    """Whether ``path`` (resolved, symlinks followed) is the installed minilora package or in it."""
    resolved = Path(path).resolve()
    return resolved == PACKAGE_DIR or PACKAGE_DIR in resolved.parents


def check_output_folder(path, flag: str = "--out") -> Path:
    """Refuse, at once, an output folder that is an existing file or lies inside the package (its
    shipped assets are read by every user of the installation, and an upgrade would lose them)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file, not a folder; pass a folder name")
    if inside_package(path):
        raise ValueError(f"{flag} {path} is inside the installed minilora package, whose shipped "
                         "files must not change; pass a folder outside it (e.g. in the working "
                         "directory)")
    return path


def holds_files(path) -> bool:
    """Whether ``path`` is a folder with something in it (a previous model or adapter)."""
    path = Path(path)
    return path.is_dir() and any(path.iterdir())


def refuse_diverged_overwrite(history, out, force: bool) -> None:
    """A diverged run (``history.diverged``) may not replace what ``out`` holds without --force."""
    reason = getattr(history, "diverged", None)
    if reason and holds_files(out) and not force:
        raise ValueError(f"training diverged ({reason}), so {out} was left as it was; lower --lr, "
                         "or pass --force to overwrite it anyway")


def add_resume_arguments(parser: argparse.ArgumentParser, checkpoint_every: int,
                         checkpoints: str) -> None:
    """``--checkpoint-every``, ``--resume`` and ``--force``, as every training command takes them;
    ``checkpoints`` names where the checkpoints go, for the help text."""
    parser.add_argument("--checkpoint-every", type=positive_int, default=checkpoint_every,
                        help=f"steps between resumable checkpoints, in {checkpoints} (one is also "
                        "saved on Ctrl-C)")
    parser.add_argument("--resume", metavar="DIR", default=None,
                        help=f"continue the run saved in DIR (a checkpoint folder or {checkpoints}: "
                        "its newest), with the same other arguments "
                        "(--steps too: the schedule depends on it)")
    parser.add_argument("--force", action="store_true",
                        help="save over an existing --out even when training diverged")


__all__ = ["add_resume_arguments", "int_at_least", "positive_int", "nonnegative_int", "float_in", "positive_float",
           "nonnegative_float", "fraction", "inside_package", "check_output_folder",
           "holds_files", "refuse_diverged_overwrite"]
