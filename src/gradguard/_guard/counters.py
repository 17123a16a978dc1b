"""The guard's step counters, changed in one place whichever path learns of a step.

A step is decided on the host at once (the host-decided path: :meth:`Counters.taken`,
:meth:`Counters.skipped`, :meth:`Counters.overflowed`), or on the device and learnt at the next
flush from its record (:meth:`Counters.learn`, which calls the same three methods).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gradguard.errors import GradGuardError
from gradguard.record import DECIDED

__all__ = ["Counters"]


@dataclass
class Counters:
    """``step_count``: ``Guard.step`` calls; ``skipped_steps``: steps not taken (AMP overflows
    included); ``consecutive``: skipped steps in a row (an AMP overflow neither counts nor breaks it:
    it is the scaler's business)."""

    step_count: int = 0
    skipped_steps: int = 0
    consecutive: int = 0

    def advance(self) -> None:
        """A step call ended (taken or not)."""
        self.step_count += 1

    def taken(self) -> None:
        """The optimizer stepped."""
        self.consecutive = 0

    def skipped(self) -> None:
        """A bad step (non-finite, or a spike under ``on_spike="skip"``) was not taken."""
        self.skipped_steps += 1
        self.consecutive += 1

    def overflowed(self) -> None:
        """A GradScaler overflow: not taken, but not a bad step in a row."""
        self.skipped_steps += 1

    def learn(self, rec: Mapping[str, Any]) -> None:
        """Count a step from its host record, unless the host decided it already (and counted it)."""
        if rec.get(DECIDED):
            return
        if rec["amp_overflow"]:
            self.overflowed()
        elif rec["skipped"]:
            self.skipped()
        else:
            self.taken()

    def after(self, records: Iterable[Mapping[str, Any]]) -> Counters:
        """A copy that has also learnt of ``records`` (the pending ones): these counters are unchanged."""
        later = copy.copy(self)
        for rec in records:
            later.learn(rec)
        return later

    def state_dict(self) -> dict[str, int]:
        return {
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
            "consecutive": self.consecutive,
        }

    @staticmethod
    def check_state(state: Mapping[str, Any]) -> None:
        """Refuse, before anything is loaded, counters that are missing or not counts (a hand-edited or
        foreign checkpoint: ``int("abc")`` half-way through loading)."""
        for name in ("step_count", "skipped_steps", "consecutive"):
            value = state.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise GradGuardError(
                    f"Guard state's {name!r} must be a count (an int >= 0); got {value!r}. Pass what "
                    "Guard.state_dict() returned, unchanged."
                )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive = int(state["consecutive"])
