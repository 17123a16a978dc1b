"""``clip_before_backward``: the script calls ``clip_grad_norm_`` / ``clip_grad_value_`` before ``backward()``.

Right after ``zero_grad()`` there is nothing to clip: the call clips nothing, and the step applies the
unclipped gradient the backward that follows makes. ``gradguard run`` sees the call come before the step's
backward (no gradient yet, or no backward since the last step) and notes it (``meta.json``
``clip_before_backward``, with the script's line). A field script (heavy-tailed return targets, SGD 0.05
with momentum, "clipped at 1.0") exploded and read "the norm was already clipped at 1 and still exploded:
lower the learning rate"; with the call moved after ``backward()`` it trains. An error in a run that did
not train, a driver (its explosion is not the rate's); a warning in one that did (the clip is still dead
code).
"""

from __future__ import annotations

from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import trained


def detect(f: Facts, seen: Seen) -> dict[str, Any] | None:
    noted = f.log.meta.get("clip_before_backward")
    return noted if isinstance(noted, dict) and isinstance(noted.get("call"), str) else None


def explain(f: Facts, noted: dict[str, Any]) -> Finding:
    failed = trained(f) is None
    at = f" at {noted['source']}" if noted.get("source") else ""
    message = (
        f"The script's {noted['call']}{at} runs before loss.backward(): there is no new gradient to clip then, so "
        "it clipped nothing, and every step applied the unclipped gradient of the backward that followed"
        + (": the run did not train." if failed else ".")
    )
    text = (
        f"Move {noted['call'].split('(')[0]}(...) between loss.backward() and optimizer.step() (after "
        "scaler.unscale_(optimizer) under AMP), then run again."
    )
    severity = "error" if failed else "warning"
    return Finding(
        "clip_before_backward", severity, None, message, dict(noted), {"verified": False, "text": text}
    )


RULE = Rule("clip_before_backward", detect, explain)
