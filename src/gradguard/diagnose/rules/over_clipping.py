"""``over_clipping``: a fixed threshold clips > 50% of the steps of a window (the last quarter).

Evidence: the clip rate (window and whole run), median pre-clip norm / threshold, the effective
learning-rate scale (median of ``threshold / norm`` capped at 1) and the loss's progress, against
the unclipped steps where there are some.

Clipping most steps is a failure only when training stalled under it — the stall that looks like
vanishing gradients: the run did not train (:func:`~gradguard.diagnose.rules._clipping.trained`,
the one test: finite to a healthy end, the loss down by at least ``STALLED``). Then it is an error
from 90% clipped (a warning below), and the advice raises the threshold (never below the median
pre-clip norm of the run's first steps, the closest the clipped run comes to the unclipped one).
It is at most an ``info``, with no threshold recommended, when the run reached its target anyway
(the loss fell and stayed finite to a healthy end) or when the optimizer normalizes its step (Adam
and its kin: clipping does not shrink their step). It is not reported at all for a run whose loss
grew (clipping slows a run, it does not make its loss grow: an RL loss summed over longer episodes),
nor for a run that went non-finite or whose norm climbed: a threshold that did not hold is not too
tight, and raising it is the wrong advice (``explosion`` reports that run).

Every threshold comes through :func:`~gradguard.diagnose.rules._clipping.threshold_advice`: verified
by ``tune.json`` when the run directory holds one, otherwise marked unverified with the ``gradguard
tune`` command line that checks it. No learning rate is advised: with the threshold kept, a lower rate
only shrinks steps that are already too small (``lr × threshold``).
"""

from __future__ import annotations

import math
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt, median, sig, sig_floor, still_falling
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import (
    OVERCLIP_RATE,
    ClipWindow,
    check_with,
    clip_window,
    optimizer_class,
    scale_free,
    threshold_advice,
    thresholds_tried,
    trained,
    tune_command,
    tuned,
    window_evidence,
)

OVERCLIP_ERROR_RATE = 0.9  # almost every step clipped: the effective LR is the threshold's
GREW = -0.1  # the loss grew by more than this fraction: not a stall clipping could cause


def detect(f: Facts, seen: Seen) -> ClipWindow | None:
    if f.clip_kind != "fixed" or f.went_bad or (f.healthy.onset_step is not None and not f.weights_still):
        return None  # (a climb with the weights still: the objective grew, and the clip held every step)
    w = clip_window(f)
    if w is None or not w.rate > OVERCLIP_RATE:
        return None
    if math.isfinite(w.progress) and w.progress < GREW:
        return None
    return w


def stalled(f: Facts, w: ClipWindow) -> bool:
    """Whether training stalled under the clipping: an SGD-like optimizer, and the run did not train
    (:func:`~gradguard.diagnose.rules._clipping.trained` over the clipped steps)."""
    if not math.isfinite(w.progress):  # no loss recorded (gradients from torch.autograd.grad): not judged
        return False
    return not scale_free(f) and trained(f, w.loss) is None


def explain(f: Facts, w: ClipWindow) -> Finding:
    evidence = window_evidence(f, w)
    early = [f.norm[i] for i in w.rows[: min(10, max(3, len(w.rows) // 20))]]
    evidence["early_median_norm"] = sig(median(early), 4)
    if not stalled(f, w):
        return _not_a_failure(f, w, evidence)
    falling = still_falling(f.loss_at(w.rows[0], w.rows[-1] + 1))  # learning slowly, not stalled
    severity = "error" if w.rate >= OVERCLIP_ERROR_RATE and not falling else "warning"
    lr, scale = w.lr, w.scale
    how = (
        "The loss is still falling, slowly: the threshold slows training"
        if falling
        else "This stall looks like vanishing gradients"
    )
    message = (
        f"Over-clipping: max_norm={fmt(w.threshold)} clipped {w.rate:.0%} of the last {len(w.window)} steps "
        f"({w.overall:.0%} of the run); the median pre-clip norm is {fmt(w.median_norm / w.threshold)}× the "
        f"threshold, so every step is scaled by ~{fmt(scale)} — an effective learning rate of {fmt(lr * scale)} "
        f"instead of {fmt(lr)}. The loss went {w.loss.text()}. {how}."
    )
    if f.healthy.onset_step is not None:  # (detect: the weights stayed put)
        message += (
            f" The pre-clip norm climbed from step {f.healthy.onset_step} while the weights stayed put: the loss "
            "itself grew its gradients (a loss term's weight raised during training, a sum over a growing count) "
            "— check the loss's terms before raising the threshold."
        )
    return Finding("over_clipping", severity, f.steps[w.window[0]], message, evidence, _advice(f, w, early))


def _not_a_failure(f: Facts, w: ClipWindow, evidence: dict[str, Any]) -> Finding:
    """An ``info``: most steps clipped, but the run trained (or Adam-like steps ignore the scale)."""
    if scale_free(f):
        why = f"but this is not a failure: {optimizer_class(f)} normalizes its step, so clipping the norm barely changes it"
    elif not math.isfinite(w.progress):
        why = "and no loss was recorded (gradients computed without backward()): whether it slowed training is not judged"
    else:
        why = f"but this is not a failure: the loss fell {w.loss.text()} and stayed finite to a healthy end"
    message = f"max_norm={fmt(w.threshold)} clipped {w.rate:.0%} of the last {len(w.window)} steps, {why}."
    result = tuned(f)
    if result is not None and thresholds_tried(result):  # tune.json answered it: quote that
        rec = threshold_advice(f, None, "")
        rec["text"] += "."
    else:
        command = tune_command(f)
        rec = {
            "verified": False,
            "tune": command,
            "text": f"Keep the threshold that trained. A looser one may train faster: {check_with(f, command)}",
        }
    return Finding("over_clipping", "info", f.steps[w.window[0]], message, evidence, rec)


def _advice(f: Facts, w: ClipWindow, early: list[float]) -> dict[str, Any]:
    """Raise the threshold to the healthy one (never below the first steps' median).

    The run's own norms follow a clipped trajectory; its first steps are the closest to the
    unclipped one (clipping has not moved the weights far yet).
    """
    h = f.healthy
    early_med = sig_floor(median(early))
    candidates = [x for x in (h.max_norm, early_med) if x is not None and math.isfinite(x) and x > 0]
    max_norm = max(candidates) if candidates else None
    why = (
        f"the median pre-clip norm of the first {len(early)} steps, before clipping bent the trajectory"
        if max_norm == early_med and max_norm != h.max_norm
        else f"{h.rule} over {len(h.norms)} steps"
    )
    rec = threshold_advice(f, max_norm, why)
    value = rec.get("max_norm")
    if isinstance(value, float | int) and not rec.get("verified"):
        would = sum(1 for i in w.rows if f.norm[i] > value) / len(w.rows)
        rec["expected_clip_rate"] = round(would, 4)
        rec["text"] += f" (it would have clipped {would:.0%} of this run's steps)"
    rec["text"] += "."
    # (no learning-rate alternative: under a threshold that binds every step, the update is
    # lr × threshold along the gradient's direction; a lower rate with it kept only stalls further)
    return rec


RULE = Rule("over_clipping", detect, explain)
