"""A wall-clock budget for one fuzz example: a hang becomes a failure.

:class:`Hang` derives from BaseException, not Exception, so that the code
under test -- whose last line of defence turns any Exception into a one-line
error -- cannot swallow it and report a hang as a clean refusal.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager


class Hang(BaseException):
    """Raised in the main thread when an example overruns its budget."""


@contextmanager
def time_budget(seconds: float):
    """Raise :class:`Hang` if the block runs longer than ``seconds`` (SIGALRM;
    main thread only)."""
    def on_alarm(signum, frame):
        raise Hang(f"example exceeded its {seconds} s budget")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
