"""``over_clipping`` of an adaptive clipper (AutoClip, ZClip, ``auto``) that stalled training.

Adaptive clippers clip most steps by design, so the clip rate alone says nothing: reported when
more than half of the last quarter of the steps were clipped and the loss made no progress
(< 10%), in a run that neither went non-finite nor exploded (the registry: it gives way to any
``explosion``). The fixed threshold it recommends comes through
:func:`~gradguard.diagnose.rules._clipping.threshold_advice` (verified, or marked unverified).
"""

from __future__ import annotations

import math

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import (
    OVERCLIP_RATE,
    ClipWindow,
    clip_window,
    threshold_advice,
    window_evidence,
)

STALLED = 0.1  # the loss fell by less than this fraction


def detect(f: Facts, seen: Seen) -> ClipWindow | None:
    if f.clip_kind != "adaptive" or f.went_bad:
        return None
    w = clip_window(f)
    if w is None or not (w.rate > OVERCLIP_RATE and math.isfinite(w.progress) and w.progress < STALLED):
        return None
    return w


def explain(f: Facts, w: ClipWindow) -> Finding:
    message = (
        f"{f.clip_spec} clips {w.rate:.0%} of the last {len(w.window)} steps (adaptive clippers do by design), "
        f"but the loss made no progress ({w.loss.text()})."
    )
    h = f.healthy
    rec = threshold_advice(f, h.max_norm, f"{h.rule}, {len(h.norms)} steps")
    rec["text"] = (
        f"Use a fixed threshold instead of the adaptive clipper, or a lower learning rate. {rec['text']}."
    )
    evidence = window_evidence(f, w)
    return Finding("over_clipping", "warning", f.steps[w.window[0]], message, evidence, rec)


RULE = Rule("adaptive_clipping", detect, explain, finding="over_clipping")
