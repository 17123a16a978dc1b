"""``loss_scale_collapse``: the guard's ``loss_scale_collapse`` event, or a recorded scale below 1.

The AMP GradScaler's scale collapsing means float16 cannot hold the gradients: every overflow is
a skipped step.
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


RULE = Rule("loss_scale_collapse", detect, explain)
