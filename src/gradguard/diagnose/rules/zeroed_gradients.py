"""``over_clipping`` at its extreme: a clipper whose threshold is 0 zeroed the gradients.

``clip="norm:0"`` logs ``clip_coef`` 0 on every step; ``"agc:0"``, ``"value:0"`` and
``"layer:0"`` clip every unit (``clip_fraction`` 1) to nothing. The weights never move while every
number stays finite, so no other rule sees anything wrong. Reported as an error when at least
half of the steps taken were zeroed. The threshold it recommends comes through
:func:`~gradguard.diagnose.rules._clipping.threshold_advice` (verified, or marked unverified).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import ends, sig
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import threshold_advice

ZEROED_RATE = 0.5  # this share of the steps taken zeroed is a finding
_ZERO_PARAMS = ("max_norm", "clip_value", "clip_factor")  # a clipper parameter that zeroes at 0


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The rows of the steps taken, and of those the clipper zeroed."""

    taken: list[int]
    zeroed: list[int]


def detect(f: Facts, seen: Seen) -> Evidence | None:
    taken = [i for i in range(len(f.rows)) if not f.skipped[i]]
    zero_param = any(f.clip.params.get(k) == 0 for k in _ZERO_PARAMS)
    zeroed = [i for i in taken if _zeroed(f, i, zero_param)]
    if not zeroed or len(zeroed) < ZEROED_RATE * len(taken):
        return None
    return Evidence(taken, zeroed)


def _zeroed(f: Facts, i: int, zero_param: bool) -> bool:
    """A norm clipper's coefficient of 0, or every unit clipped by a clipper whose parameter is 0."""
    if math.isfinite(f.clip_coef[i]):
        return f.clip_coef[i] == 0
    return zero_param and f.clip_fraction[i] >= 1


def explain(f: Facts, ev: Evidence) -> Finding:
    rate = len(ev.zeroed) / len(ev.taken)
    losses = [f.loss[i] for i in ev.taken if math.isfinite(f.loss[i])]
    loss = ends(losses)
    label = f.clip_spec or "the clipper"
    evidence: dict[str, Any] = {
        "clipper": f.clip_spec,
        "zeroed_steps": len(ev.zeroed),
        "steps_taken": len(ev.taken),
        "zeroed_rate": round(rate, 4),
        "first_zeroed_step": f.steps[ev.zeroed[0]],
        "loss_start": sig(loss.start, 4),
        "loss_end": sig(loss.end, 4),
        "loss_ends_median_of": loss.k,
        **f.healthy.evidence(),
    }
    went = f" (the loss went {loss.text()})" if losses else ""
    message = (
        f"Over-clipping to zero: {label} set the gradients of {len(ev.zeroed)} of {len(ev.taken)} steps taken "
        f"({rate:.0%}) to zero — a threshold of 0 — so those steps did not move the weights{went}."
    )
    return Finding("over_clipping", "error", f.steps[ev.zeroed[0]], message, evidence, _advice(f))


def _advice(f: Facts) -> dict[str, Any]:
    """A threshold above 0, through :func:`~gradguard.diagnose.rules._clipping.threshold_advice`."""
    h = f.healthy
    rec = threshold_advice(f, h.max_norm, h.rule)
    rec["text"] = (
        f"Give the clipper a threshold above 0, or clip='auto' (AGC's usual factor is 0.01). {rec['text']}."
    )
    return rec


RULE = Rule("zeroed_gradients", detect, explain, finding="over_clipping")
