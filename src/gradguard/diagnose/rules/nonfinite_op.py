"""``nonfinite_op``: the first located non-finite value (op, module, source) and its specific fix.

Not reported where an explosion explains the non-finite step (the registry: it gives way to an
``explosion`` error; the answer then is the explosion, not the op where the overflow landed), where
the guard's own event calls it an explosion, nor for a bad input batch (``bad_data``'s steps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradguard import optable
from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.rules import Rule, Seen

_EVENT_KEYS = (
    "phase",
    "module",
    "op",
    "tensor",
    "kind",
    "source",
    "located_by",
    "layers",
    "evidence",
    "cause",
)


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The event that says where (a located one if any), and how many steps were non-finite."""

    event: dict[str, Any]
    nonfinite_steps: int


def detect(f: Facts, seen: Seen) -> Evidence | None:
    bad_data = seen.evidence("bad_data")
    data_steps = set(bad_data.steps) if bad_data is not None else set()
    events = [e for e in f.nonfinite_events if e.get("phase") != "data" and e.get("step") not in data_steps]
    if not events and f.trouble_reason != "nonfinite":
        return None
    if events and _is_explosion_event(events[0]):
        return None
    event = next((e for e in events if e.get("op")), None) or (events[0] if events else None)
    if event is None:  # the flags only: the first non-finite step
        if f.steps[f.trouble] in data_steps:
            return None
        kind = "nan" if math.isnan(f.loss[f.trouble]) else "inf"
        event = {"step": f.steps[f.trouble], "phase": None, "kind": kind}
    return Evidence(event, sum(f.bad))


def _is_explosion_event(e: dict[str, Any]) -> bool:
    text = f"{e.get('cause', '')} {e.get('kind_of_fault', '')}".lower()
    return "explosion" in text or "explod" in text


def explain(f: Facts, ev: Evidence) -> Finding:
    event = ev.event
    step = event.get("step") if isinstance(event.get("step"), int) else None
    evidence: dict[str, Any] = {k: event.get(k) for k in _EVENT_KEYS if event.get(k) is not None}
    evidence["nonfinite_steps"] = ev.nonfinite_steps
    message, rec = _located(event, step) if event.get("op") else _unlocated(event, step, ev.nonfinite_steps)
    rec["on_nonfinite"] = "skip"
    return Finding("nonfinite_op", "error", step, message, evidence, rec)


def _located(event: dict[str, Any], step: int | None) -> tuple[str, dict[str, Any]]:
    """The op, where it ran, why it failed (the event's own reason first) and the op's fix."""
    details = event.get("evidence")
    reason = details.get("reason") if isinstance(details, dict) else None
    why, fix = optable.advice(str(event.get("op") or ""), reason, event.get("cause"))
    where = f" in module {event['module']!r}" if event.get("module") not in (None, "") else ""
    at = f" at {event['source']}" if event.get("source") else ""
    message = (
        f"Step {step}: {event.get('kind', 'a non-finite value')} first came out of `{event['op']}` "
        f"({event.get('phase', '?')}){where}{at}: {why}."
    )
    return message, {"text": f"Fix: {fix}.", "op": event["op"]}


def _unlocated(event: dict[str, Any], step: int | None, count: int) -> tuple[str, dict[str, Any]]:
    """No op named: what went non-finite, and how to have gradguard name the op."""
    phase = event.get("phase")
    what = "the loss" if phase == "loss" else ("the weights" if phase == "optimizer" else "the gradients")
    message = (
        f"Step {step}: {what} became {event.get('kind', 'non-finite')} without a preceding explosion; "
        f"{count} step(s) non-finite in all. The always-on flags do not name the op."
    )
    rec = {
        "text": "Pass a closure, guard.step(closure), so gradguard replays the failed step op by op and "
        "names the op, module and source line; meanwhile on_nonfinite='skip' keeps the weights finite.",
    }
    return message, rec


RULE = Rule("nonfinite_op", detect, explain)
