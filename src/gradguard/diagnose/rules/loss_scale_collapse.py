"""``loss_scale_collapse``: the guard's ``loss_scale_collapse`` event, or a recorded scale below 1.

The AMP GradScaler's scale collapsing means float16 cannot hold the gradients: every overflow is
a skipped step. A scaler started far above torch's default (``init_scale=1e30``) overflows on its
first steps whatever the gradients are: that start, not float16's range, is the finding's cause then.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt
from gradguard.diagnose.rules import Rule, Seen
from gradguard.runtable import num

_EVENT_KEYS = ("loss_scale", "floor", "consecutive_overflows", "recent_scales")
_DEFAULT_SCALE = 2.0**16  # torch.amp.GradScaler's init_scale
_HIGH_START = _DEFAULT_SCALE * 2.0**8  # a start this far above it overflows on ordinary gradients


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The collapse event (or the first record with a scale below 1), and the overflow count."""

    event: dict[str, Any]
    overflows: int


def detect(f: Facts, seen: Seen) -> Evidence | None:
    event = next(iter(f.events_of("loss_scale_collapse")), None)
    if event is None:
        low = next((i for i, s in enumerate(f.scale) if math.isfinite(s) and s < 1.0), None)
        if low is None:
            return None
        event = {"step": f.steps[low], "loss_scale": f.scale[low]}
    skips = [e for e in f.events_of("skip") if e.get("reason") == "amp_overflow"]
    return Evidence(event, sum(f.amp) or len(skips))


def explain(f: Facts, ev: Evidence) -> Finding:
    event = ev.event
    evidence: dict[str, Any] = {k: event.get(k) for k in _EVENT_KEYS if k in event}
    evidence["amp_overflow_steps"] = ev.overflows
    scales = [s for s in f.scale if math.isfinite(s)]
    if scales:
        evidence["loss_scale_max"] = max(scales)
        evidence["loss_scale_min"] = min(scales)
    step = event.get("step") if isinstance(event.get("step"), int) else None
    start = _high_start(f)
    if start is not None:
        evidence["initial_loss_scale"] = start
        return _started_too_high(f, start, step, evidence)
    message = (
        f"AMP loss-scale collapse at step {step}: the GradScaler's scale fell to {fmt(num(event.get('loss_scale')))} "
        "after repeated overflows — float16 cannot hold these gradients, and every overflow is a skipped step."
    )
    rec = {
        "text": "Train in bfloat16 (torch.autocast(device_type, dtype=torch.bfloat16): float32's range, no scaler), "
        "or lower the learning rate / clip the global norm so the gradients stay in float16's range.",
        "dtype": "bfloat16",
    }
    return Finding("loss_scale_collapse", "error", step, message, evidence, rec)


def _high_start(f: Facts) -> float | None:
    """The scaler's initial scale when it was far above torch's default and the first step overflowed
    (else None). A record holds the scale after its step's update: an overflow had halved it."""
    first = next((s for s in f.scale if math.isfinite(s)), None)
    if first is None or f.amp[:1] != [True] or 2 * first <= _HIGH_START:
        return None
    return 2 * first


def _started_too_high(f: Facts, start: float, step: int | None, evidence: dict[str, Any]) -> Finding:
    """The scaler's start overflowed the first steps: an error while no step got through, else a warning."""
    leading = next((i for i, amp in enumerate(f.amp) if not amp), len(f.amp))
    taken = any(f.ok)
    message = (
        f"AMP loss scale started at {fmt(start)}, far above torch's default of 65536: the scaled gradients overflow "
        f"float16 whatever they are, so the GradScaler skipped the first {leading} steps while it halved the scale "
        f"to {fmt(f.scale[leading - 1])}"
        + ("; then steps got through." if taken else "; no step got through.")
    )
    rec = {
        "text": "Leave the GradScaler's init_scale at its default (torch.amp.GradScaler() starts at 65536 and "
        "grows the scale by itself while the gradients allow), or start it at 2**16 or below.",
        "init_scale": _DEFAULT_SCALE,
    }
    return Finding("loss_scale_collapse", "warning" if taken else "error", step, message, evidence, rec)


RULE = Rule("loss_scale_collapse", detect, explain)
