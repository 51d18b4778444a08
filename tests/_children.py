"""Starting child processes that a test interrupts."""
from __future__ import annotations

import signal


def sigint_by_default():
    """``preexec_fn`` for a child that the test interrupts with SIGINT: a shell without job control
    starts background commands with SIGINT ignored, children inherit that, and Python then installs
    no KeyboardInterrupt handler; the default disposition lets the child's Python install its own."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
