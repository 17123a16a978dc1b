"""``logit_scale``: the logits of a classification loss were multiplied by a large Python number (``logits /
temperature`` with a temperature of 0.02 or less), in a run that did not train or failed.

``gradguard run``'s loss-code watch sees the division (``meta.json`` ``loss_functions``: ``logit_scale`` and
the line). At a temperature of 0.001 the softmax is one-hot from the first step: an InfoNCE over 256
candidates sat at ln 255 (collapsed) and read "lr_too_high … lr=3e-4", which left the probe below the true
fix's; at 0.1 it trains (loss 4.08, probe 1.0). An error where the run went non-finite, a warning where it
did not train; a driver: the rate's and a threshold's advice do not fix it.
"""

from __future__ import annotations

from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import trained


def detect(f: Facts, seen: Seen) -> dict[str, Any] | None:
    noted = f.log.meta.get("loss_functions")
    if not isinstance(noted, list) or not f.rows:
        return None
    if not (f.went_bad or f.healthy.onset_step is not None or trained(f) is None):
        return None
    return next(
        (e for e in noted if isinstance(e, dict) and isinstance(e.get("logit_scale"), (int, float))), None
    )


def explain(f: Facts, ev: dict[str, Any]) -> Finding:
    scale = float(ev["logit_scale"])
    failed = f.went_bad or f.healthy.onset_step is not None
    at = f" at {ev['scaled_at']}" if ev.get("scaled_at") else ""
    message = (
        f"The logits given to `{ev['op']}` were multiplied by {fmt(scale)}{at} (÷ a temperature of {fmt(1 / scale)}): "
        "the softmax over them is one-hot from the first step, its gradient is 0 for all but the top candidate "
        "and huge where it is wrong. The run " + ("went wrong with it." if failed else "did not train.")
    )
    text = (
        f"Raise the temperature (÷ {fmt(1 / scale)} → ÷ 0.05–0.2: SimCLR uses 0.1–0.5, CLIP starts at 0.07 and caps "
        "the scale at 100), or learn it with a cap. A lower learning rate or clipping leaves the saturated softmax."
    )
    severity = "error" if failed else "warning"
    return Finding(
        "logit_scale",
        severity,
        None,
        message,
        {"logit_scale": scale, "op": ev["op"]},
        {"verified": False, "text": text},
    )


RULE = Rule("logit_scale", detect, explain)
