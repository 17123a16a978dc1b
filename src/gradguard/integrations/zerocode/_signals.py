"""Ctrl-C and SIGTERM under ``gradguard run`` are never lost inside the script.

Python raises a signal's exception (``KeyboardInterrupt``; :class:`Stopped` for SIGTERM) in whatever
Python code runs when the signal arrives. When that is a weakref callback, a ``__del__`` or a GC
callback — torch and gradguard run such code every step — Python cannot propagate it: it prints
"Exception ignored in …" and the script goes on, training to its end instead of stopping (the
plain script loses such a Ctrl-C too). While the script runs, :func:`watch` keeps every such swallowed interrupt (``sys.unraisablehook``) and the
next optimizer step raises it again (:func:`deliver_lost`), where it propagates. An interrupt the
script catches itself is not swallowed, so it is never raised twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Stopped", "deliver_lost", "on_signal", "watch"]

_LOST: list[BaseException] = []


class Stopped(BaseException):
    """Raised inside the script by a signal handler, so that the summary and report are written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def on_signal(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def watch() -> Callable[[], None]:
    """Keep the interrupts Python swallows from now on; returns the function that stops watching."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, (KeyboardInterrupt, Stopped)):
            _LOST.append(unraisable.exc_value)
        previous(unraisable)

    sys.unraisablehook = hook

    def stop() -> None:
        sys.unraisablehook = previous
        _LOST.clear()

    return stop


def deliver_lost() -> None:
    """Raise again, at a step, the first interrupt Python swallowed since the last step."""
    if _LOST:
        lost = _LOST[0]
        _LOST.clear()
        raise lost
