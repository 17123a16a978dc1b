"""A finding: what a rule saw, the numbers that show it, and what to do (the ``findings.json`` row)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["SEVERITIES", "Finding", "Severity"]

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
"""Severities, most severe first. ``error``: training went wrong (non-finite, diverged, stalled)."""


@dataclasses.dataclass(frozen=True)
class Finding:
    """One diagnosis: what happened, the numbers that show it, and what to do.

    Attributes:
        id: one of :data:`gradguard.diagnose.RULES` (stable snake_case).
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        step: the step where it shows first (``None`` when it has no single step).
        message: one or two sentences for a person.
        evidence: the numbers behind it (JSON-ready).
        recommendation: what to do; ``"max_norm"`` holds a recommended clip threshold, ``"lr"`` a
            learning rate, ``"text"`` the advice in words, ``"code"`` a line to paste.
    """

    id: str
    severity: str
    step: int | None
    message: str
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    recommendation: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written to ``findings.json``."""
        return {
            "id": self.id,
            "severity": self.severity,
            "step": self.step,
            "message": self.message,
            "evidence": self.evidence,
            "recommendation": self.recommendation,
        }
