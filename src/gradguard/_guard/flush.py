"""What the host learns at a flush: the events of the steps it had not seen, from one host copy.

On the sync-free paths the host learns of a bad step only when the monitor flushes (every
``every`` steps); :class:`FlushEvents` derives those steps' events and counts them
(:meth:`gradguard._guard.counters.Counters.learn`). It also watches the GradScaler's scale and the
weight norms, which are only ever seen here, and :func:`mark_host_spikes` runs the host spike
detector of ``on_spike="warn"`` over the flushed norms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from gradguard import events
from gradguard._guard.anomaly import Anomalies, flagged_nonfinite, weights_nonfinite
from gradguard._guard.config import GuardConfig
from gradguard._guard.counters import Counters
from gradguard.clip import HostZClip
from gradguard.record import DECIDED, LAYERS, weight_stats

__all__ = ["FlushEvents", "LossScaleWatch", "layer_field", "mark_host_spikes"]

_SCALE_HISTORY = 20  # loss scales kept as evidence for a loss_scale_collapse event


def layer_field(rec: Mapping[str, Any], field: str) -> dict[str, float]:
    """``{layer: value}`` of one per-layer field of a record (the layers that have a value)."""
    return {n: v[field] for n, v in rec.get(LAYERS, {}).items() if v.get(field) is not None}


def mark_host_spikes(spike: Any, records: Iterable[dict[str, Any]]) -> None:
    """Before the records are written: the host spike flags of ``on_spike="warn"`` (fed with the
    norms of the steps taken)."""
    if not isinstance(spike, HostZClip):
        return
    for rec in records:
        if not rec["nonfinite"] and not rec["skipped"]:
            rec["spike"] = spike.observe(rec["grad_norm"])


class LossScaleWatch:
    """A ``loss_scale_collapse`` event when the GradScaler's scale falls below ``floor`` or it
    overflows ``max_overflows`` steps in a row (once per collapse)."""

    def __init__(self, floor: float, max_overflows: int) -> None:
        self.floor = floor
        self.max_overflows = max_overflows
        self.overflow_run = 0  # AMP overflows in a row
        self.scales: list[tuple[int, float]] = []
        self.collapsed = False

    def check(self, rec: Mapping[str, Any]) -> events.Event | None:
        scale = rec["loss_scale"]
        if math.isnan(scale):
            return None  # no scaler
        self.overflow_run = self.overflow_run + 1 if rec["amp_overflow"] else 0
        self.scales.append((rec["step"], scale))
        del self.scales[:-_SCALE_HISTORY]
        collapsed = scale < self.floor or self.overflow_run >= self.max_overflows
        event = None
        if collapsed and not self.collapsed:
            event = events.loss_scale_collapse(rec["step"], scale, self.floor, self.overflow_run, self.scales)
        self.collapsed = collapsed
        return event


class FlushEvents:
    """``flush_events(records) -> events``: the events of a flush, in step order; counts the steps
    that the host had not decided."""

    def __init__(self, config: GuardConfig, counters: Counters, anomalies: Anomalies) -> None:
        self.policy = config.on_nonfinite
        self.on_spike = config.on_spike
        self.counters = counters
        self.anomalies = anomalies
        self.loss_scale = LossScaleWatch(config.loss_scale_floor, config.max_consecutive)
        self._weights_reported = False  # a non-finite weight is reported once

    def __call__(self, records: list[dict[str, Any]]) -> list[events.Event]:
        self.anomalies.remember(records)
        found: list[events.Event | None] = []
        for rec in records:
            found.append(self.loss_scale.check(rec))
            found += self._undecided(rec)
            found.append(self._weights(rec))
            if rec["spike"] and not rec["nonfinite"] and self.on_spike in ("warn", "clip"):
                found.append(events.spike(rec["step"], rec["grad_norm"], self.on_spike))
        return [e for e in found if e is not None]

    def _undecided(self, rec: dict[str, Any]) -> list[events.Event | None]:
        """A step decided on the device: count it; its ``nonfinite`` and ``skip`` events."""
        if rec.get(DECIDED):
            return []
        self.counters.learn(rec)
        step = rec["step"]
        if rec["amp_overflow"]:
            return [events.skip(step, events.SKIP_AMP_OVERFLOW)]
        found: list[events.Event | None] = []
        if rec["nonfinite"]:
            flagged = flagged_nonfinite(step, rec, layer_field(rec, "grad_norm"), self.policy)
            found.append(self.anomalies.report_once(flagged))
        if rec["skipped"]:
            reason = events.SKIP_NONFINITE if rec["nonfinite"] else events.SKIP_SPIKE
            found.append(events.skip(step, reason, grad_norm=rec["grad_norm"]))
        return found

    def _weights(self, rec: dict[str, Any]) -> events.Event | None:
        """A weight that went non-finite without a non-finite loss or gradient (reported once)."""
        if self._weights_reported or not weight_stats(rec):
            return None
        event = weights_nonfinite(rec["step"], layer_field(rec, "weight_norm"), self.policy)
        self._weights_reported = event is not None
        return event
