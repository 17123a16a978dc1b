"""The healthy window: the pre-clip norms of a run before anything went wrong, and their threshold.

The window holds the finite norms recorded before the norm started growing (the onset of
:func:`gradguard.runtable.climb_onset`), before the first non-finite or overflowing step, with
spikes and lone bad batches left out. From a window of :data:`LONG_WINDOW` norms or more, or from a
run that never went wrong, the recommended threshold is ``min(p90, 2 × p50)``: about the 90th
percentile of the Deep Learning Tuning Playbook, capped at twice the median so that the first
steps of a climb cannot loosen it. From a shorter window that ends in trouble it is the median (a
90th percentile over a start that is already climbing was too loose in a Deep SAD probe).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any, Protocol

from gradguard.diagnose.numbers import quantile, sig, sig_floor
from gradguard.runtable import EXPLOSION_FACTOR, GROWTH_FACTOR, MIN_HISTORY, climb_onset

__all__ = ["LONG_WINDOW", "HealthyWindow", "window"]

LONG_WINDOW = 50
"""A healthy window this long gives ``min(p90, 2 × p50)``; a shorter one that ends in trouble its median."""


@dataclasses.dataclass(frozen=True)
class HealthyWindow:
    """The healthy pre-clip norms of a run and the threshold they give.

    Attributes:
        norms: the finite pre-clip global norms in the window (file order).
        first_step: first step of the window (``None`` when empty).
        last_step: last step of the window.
        onset_step: the step where the norm started growing (``None``: no growth found).
        end_reason: why the window ends: ``"growth"``, ``"nonfinite"``, ``"overflow"`` or ``"end"``.
        p50: median of ``norms``.
        p90: 90th percentile of ``norms``.
        mean: mean of ``norms``.
        max_norm: the recommended threshold, rounded down to two significant digits: the median
            where the window ends in trouble (growth, non-finite, overflow), else ``min(p90, 2 × p50)``.
        rule: how ``max_norm`` was chosen, in words.
    """

    norms: list[float]
    first_step: int | None
    last_step: int | None
    onset_step: int | None
    end_reason: str
    p50: float
    p90: float
    mean: float
    max_norm: float | None
    rule: str = ""

    def evidence(self) -> dict[str, Any]:
        """The window as finding evidence."""
        return {
            "healthy_steps": [self.first_step, self.last_step],
            "healthy_count": len(self.norms),
            "healthy_p50": sig(self.p50, 4),
            "healthy_p90": sig(self.p90, 4),
            "healthy_mean": sig(self.mean, 4),
            "healthy_ends": self.end_reason,
            "max_norm_rule": self.rule,
        }


class Columns(Protocol):
    """What the window reads of a run (:class:`gradguard.diagnose.facts.Facts` has it)."""

    @property
    def steps(self) -> Sequence[int]: ...
    @property
    def norm(self) -> Sequence[float]: ...
    @property
    def ok(self) -> Sequence[bool]: ...  # healthy steps (taken, finite)
    @property
    def spike(self) -> Sequence[bool]: ...
    @property
    def trouble(self) -> int: ...  # index of the first non-finite (or overflowing) step
    @property
    def trouble_reason(self) -> str: ...


def window(f: Columns) -> HealthyWindow:
    """The healthy window of a run's facts: before growth, before the first non-finite step."""
    reason = f.trouble_reason
    idx = [i for i in range(f.trouble) if f.ok[i] and f.norm[i] > 0]
    k = climb_onset([f.norm[i] for i in idx], ends_in_trouble=reason != "end")
    if k is None and reason != "end":
        k = _short_climb([f.norm[i] for i in idx])
    onset_step = None
    if k is not None:
        onset_step, reason = f.steps[idx[k]], "growth"
    else:
        k = len(idx)
    rows = [i for i in idx[:k] if not f.spike[i]] or idx[:k]
    if len(rows) < MIN_HISTORY:  # growth from the very start: the first finite norms are all we have
        rows = idx[: min(MIN_HISTORY, k)] or idx[:MIN_HISTORY]
    norms = [f.norm[i] for i in rows]
    if not norms:
        return HealthyWindow([], None, None, onset_step, reason, math.nan, math.nan, math.nan, None, "")
    p50, p90 = quantile(norms, 0.5), quantile(norms, 0.9)
    max_norm, rule = _threshold(p50, p90, reason, len(norms))
    return HealthyWindow(
        norms=norms,
        first_step=f.steps[rows[0]],
        last_step=f.steps[rows[-1]],
        onset_step=onset_step,
        end_reason=reason,
        p50=p50,
        p90=p90,
        mean=statistics.fmean(norms),
        max_norm=max_norm,
        rule=rule,
    )


def _short_climb(norms: Sequence[float]) -> int | None:
    """Where a run too short for :func:`~gradguard.runtable.climb_onset` (fewer norms than its history
    and sustain need) climbed before it went wrong: the first norm ≥ :data:`EXPLOSION_FACTOR` × the
    median of those before it, with every later one ≥ :data:`GROWTH_FACTOR` × that median (a ReLU RNN
    at lr 1: 6.4 → 4742 → NaN). Without it the spike would sit in the healthy window."""
    for i in range(1, len(norms)):
        base = statistics.median(norms[:i])
        if norms[i] >= EXPLOSION_FACTOR * base and all(v >= GROWTH_FACTOR * base for v in norms[i:]):
            return i
    return None


def _threshold(p50: float, p90: float, reason: str, count: int) -> tuple[float | None, str]:
    """The recommended threshold of a window and how it was chosen."""
    if not p50 > 0:
        return None, ""
    if reason == "end" or count >= LONG_WINDOW:  # about the 90th percentile (Tuning Playbook)
        return sig_floor(min(p90, 2.0 * p50)), "min(p90, 2 × p50) of the healthy pre-clip norms"
    # a short start of a run that went wrong: its tail may already be climbing
    return sig_floor(p50), f"the median of the finite pre-clip norms before the {reason}"
