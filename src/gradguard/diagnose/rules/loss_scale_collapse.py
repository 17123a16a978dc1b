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
    if _bfloat16(f):
        return _under_bfloat16(f, step, evidence)
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


def _bfloat16(f: Facts) -> bool:
    """Whether the run computed in bfloat16, not float16: the located ops' inputs were bfloat16 (a
    GradScaler kept beside ``autocast(dtype=torch.bfloat16)`` counts any NaN/inf as an overflow)."""
    dtypes = {
        str(i.get("dtype"))
        for e in f.nonfinite_events
        for i in (e.get("evidence") or {}).get("inputs") or ()
        if isinstance(i, dict)
    }
    return "bfloat16" in dtypes and "float16" not in dtypes


def _under_bfloat16(f: Facts, step: int | None, evidence: dict[str, Any]) -> Finding:
    """The scale collapsed in a bfloat16 run: not float16's range (bfloat16 has float32's) — the scaler
    halved its scale at each non-finite step the run made (a log of 0 recurring). "Train in bfloat16" was
    said to a run already in bfloat16."""
    first = next((f.steps[i] for i, b in enumerate(f.bad) if b), None)
    message = (
        f"AMP loss-scale collapse at step {step}: the GradScaler halved its scale at every non-finite step"
        + (f" (the first at step {first})" if first is not None else "")
        + ". The run computes in bfloat16, whose range is float32's: these were no float16 overflows but the "
        "non-finite values the run made (see the finding that locates them)."
    )
    rec = {
        "text": "Fix the op that made the non-finite values (the located finding); under bfloat16 autocast a "
        "GradScaler is not needed (drop it: it only turns each non-finite step into a skipped one).",
    }
    evidence["autocast_dtype"] = "bfloat16"
    return Finding("loss_scale_collapse", "warning", step, message, evidence, rec)


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
