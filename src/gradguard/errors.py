"""The one error hierarchy of gradguard.

Every message says what went wrong, the offending value, and how to fix it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["GradGuardError", "NonFiniteError", "check_state_version", "did_you_mean"]


class GradGuardError(ValueError):
    """Base class of every error gradguard raises on bad input or a stopped run."""


class NonFiniteError(GradGuardError, RuntimeError):
    """A training step produced a non-finite loss or gradient and the policy says stop.

    Raised by :class:`gradguard.Guard` with ``on_nonfinite="raise"`` (after the run log is
    flushed) and by ``clip_grad_norm_(..., error_if_nonfinite=True)``.

    Attributes:
        located: where the first non-finite value of the run was born, as its ``nonfinite`` event
            holds it (``phase``, ``module``, ``op``, ``source``, ``kind``…), or ``None`` (not located).
    """

    def __init__(self, *args: object, located: dict[str, object] | None = None) -> None:
        super().__init__(*args)
        self.located = located


def did_you_mean(key: object, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to a misspelt ``key``; ``""`` when none is close."""
    near = difflib.get_close_matches(str(key), sorted(known), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def check_state_version(state: Any, version: int, what: str, fix: str) -> None:
    """Refuse a saved state that is not a mapping of this ``version``: what was passed, what this
    gradguard reads, and ``fix`` (how to get a state it reads). One check for every ``load_state_dict``."""
    if isinstance(state, Mapping) and state.get("version") == version:
        return
    if hasattr(state, "__fspath__") or (
        isinstance(state, str) and re.search(r"[/\\]|\.(pt|pth|ckpt|bin)$", state)
    ):
        raise GradGuardError(
            f"{what}.load_state_dict takes the dict state_dict() returned, not a path ({state!r}): load the file "
            f"first, e.g. {what.lower()}.load_state_dict(torch.load(path)['{what.lower()}']). {fix}"
        )
    if not isinstance(state, Mapping):
        raise GradGuardError(
            f"{what}.load_state_dict takes the dict state_dict() returned, not {type(state).__name__}. {fix}"
        )
    if "version" not in state:
        keys = ", ".join(repr(k) for k in list(state)[:3])
        raise GradGuardError(
            f"{what} state has no version: its keys ({keys}{', …' if len(state) > 3 else ''}) are not what "
            f"{what}.state_dict() writes (a model's or an optimizer's state_dict?). {fix}"
        )
    raise GradGuardError(
        f"{what} state has version {state.get('version')!r}; this gradguard reads {version}. {fix}"
    )
