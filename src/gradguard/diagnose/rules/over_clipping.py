"""``over_clipping``: a fixed threshold clips > 50% of the steps of a window (the last quarter).

Evidence: the clip rate (window and whole run), median pre-clip norm / threshold, the effective
learning-rate scale (median of ``threshold / norm`` capped at 1) and the loss's progress, against
the unclipped steps where there are some. An error from 90% clipped: the stall that looks like
vanishing gradients. The recommended threshold is never below the median pre-clip norm of the
run's first steps, the closest the clipped run comes to the unclipped one.
"""

from __future__ import annotations

import math
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import clip_advice, fmt, median, sig, sig_floor
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import OVERCLIP_RATE, ClipWindow, clip_window, window_evidence

OVERCLIP_ERROR_RATE = 0.9  # almost every step clipped: the effective LR is the threshold's


def detect(f: Facts, seen: Seen) -> ClipWindow | None:
    if f.clip_kind != "fixed":
        return None
    w = clip_window(f)
    return w if w is not None and w.rate > OVERCLIP_RATE else None


def explain(f: Facts, w: ClipWindow) -> Finding:
    evidence = window_evidence(f, w)
    early = [f.norm[i] for i in w.rows[: min(10, max(3, len(w.rows) // 20))]]
    evidence["early_median_norm"] = sig(median(early), 4)
    severity = "error" if w.rate >= OVERCLIP_ERROR_RATE else "warning"
    lr, scale = w.lr, w.scale
    message = (
        f"Over-clipping: max_norm={fmt(w.threshold)} clipped {w.rate:.0%} of the last {len(w.window)} steps "
        f"({w.overall:.0%} of the run); the median pre-clip norm is {fmt(w.median_norm / w.threshold)}× the "
        f"threshold, so every step is scaled by ~{fmt(scale)} — an effective learning rate of {fmt(lr * scale)} "
        f"instead of {fmt(lr)}. The loss went {fmt(w.loss_start)} → {fmt(w.loss_end)}. This stall looks like "
        "vanishing gradients."
    )
    return Finding("over_clipping", severity, f.steps[w.window[0]], message, evidence, _advice(f, w, early))


def _advice(f: Facts, w: ClipWindow, early: list[float]) -> dict[str, Any]:
    """Raise the threshold to the healthy one (never below the first steps' median), or lower the LR.

    The run's own norms follow a clipped trajectory; its first steps are the closest to the
    unclipped one (clipping has not moved the weights far yet).
    """
    h = f.healthy
    early_med = sig_floor(median(early))
    candidates = [x for x in (h.max_norm, early_med) if x is not None and math.isfinite(x) and x > 0]
    if not candidates:
        return {}
    max_norm = max(candidates)
    why = (
        f"the median pre-clip norm of the first {len(early)} steps, before clipping bent the trajectory"
        if max_norm == early_med and max_norm != h.max_norm
        else f"{h.rule} over {len(h.norms)} steps"
    )
    rec = clip_advice(max_norm)
    would = sum(1 for i in w.rows if f.norm[i] > max_norm) / len(w.rows)
    rec["expected_clip_rate"] = round(would, 4)
    rec["text"] = (
        f"Raise max_norm to {max_norm:g} ({why}; it would have clipped {would:.0%} of this run's "
        f"steps), or keep the threshold and lower the "
        f"learning rate to ~{fmt(sig(w.lr * w.scale, 2))} — more than 50% clipped is extremely aggressive."
    )
    if math.isfinite(w.lr):
        rec["lr"] = sig(w.lr * w.scale, 2)
    return rec


RULE = Rule("over_clipping", detect, explain)
