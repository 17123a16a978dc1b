"""The one error hierarchy of gradguard.

Every message says what went wrong, the offending value, and how to fix it.
"""

from __future__ import annotations

__all__ = ["GradGuardError", "NonFiniteError"]


class GradGuardError(ValueError):
    """Base class of every error gradguard raises on bad input or a stopped run."""


class NonFiniteError(GradGuardError, RuntimeError):
    """A training step produced a non-finite loss or gradient and the policy says stop.

    Raised by :class:`gradguard.Guard` with ``on_nonfinite="raise"`` (after the run log is
    flushed) and by ``clip_grad_norm_(..., error_if_nonfinite=True)``.
    """
