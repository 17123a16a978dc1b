"""What the clipping rules share: the steps a threshold clipped, over the run and its last quarter.

Not a rule (no ``RULE``): the window that ``over_clipping`` (a fixed threshold) and
``adaptive_clipping`` (an adaptive one) judge, and the evidence they both report.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.numbers import median, sig

OVERCLIP_RATE = 0.5  # > 50% of steps clipped is aggressive (Tuning Playbook)
_MIN_STEPS = 10  # fewest thresholded steps to judge
_MIN_DELTAS = 10  # fewest loss changes after clipped (and unclipped) steps to compare them


@dataclasses.dataclass(frozen=True)
class ClipWindow:
    """The healthy steps with a threshold (``rows``), and the last quarter of them (``window``).

    ``rate``: clip rate of the window; ``overall``: of all ``rows``; ``progress``: 1 − the loss at
    the end over the loss at the start (medians of a tenth of the steps). Over the window:
    ``threshold`` and ``median_norm`` (medians), ``scale`` (the median of ``threshold / norm``
    capped at 1: the effective learning-rate scale), ``lr`` (median; ``nan`` when not logged).
    """

    rows: list[int]
    window: list[int]
    rate: float
    overall: float
    loss_start: float
    loss_end: float
    progress: float
    threshold: float
    median_norm: float
    scale: float
    lr: float


def clip_window(f: Facts) -> ClipWindow | None:
    """The clipping window of a run, or ``None`` with fewer than 10 thresholded healthy steps."""
    rows = [i for i in range(f.trouble) if f.ok[i] and math.isfinite(f.thr[i]) and f.thr[i] > 0]
    if len(rows) < _MIN_STEPS:
        return None
    width = max(_MIN_STEPS, min(500, len(rows) // 4))
    window = rows[-width:]
    losses = f.loss_at(rows[0], rows[-1] + 1)
    k = max(1, min(len(losses) // 10, 50))
    start, end = median(losses[:k]), median(losses[-k:])
    progress = 1 - end / start if start and math.isfinite(start) and start > 0 else math.nan
    lrs = [f.lr[i] for i in window if math.isfinite(f.lr[i])]
    return ClipWindow(
        rows=rows,
        window=window,
        rate=sum(f.clipped[i] for i in window) / len(window),
        overall=sum(f.clipped[i] for i in rows) / len(rows),
        loss_start=start,
        loss_end=end,
        progress=progress,
        threshold=median([f.thr[i] for i in window]),
        median_norm=median([f.norm[i] for i in window]),
        scale=median([min(1.0, f.thr[i] / f.norm[i]) for i in window if f.norm[i] > 0]),
        lr=median(lrs) if lrs else math.nan,
    )


def window_evidence(f: Facts, w: ClipWindow) -> dict[str, Any]:
    """Clip rates, the threshold against the norms, the effective learning rate, the loss's progress."""
    thr, med_norm, scale, lr = w.threshold, w.median_norm, w.scale, w.lr
    evidence: dict[str, Any] = {
        "clipper": f.clip_spec,
        "clip_rate_window": round(w.rate, 4),
        "window_steps": [f.steps[w.window[0]], f.steps[w.window[-1]]],
        "clip_rate_overall": round(w.overall, 4),
        "threshold": sig(thr, 4),
        "median_norm": sig(med_norm, 4),
        "median_norm_over_threshold": sig(med_norm / thr, 3) if thr > 0 else None,
        "effective_lr_scale": sig(scale, 3),
        "lr": lr if math.isfinite(lr) else None,
        "effective_lr": sig(lr * scale, 3) if math.isfinite(lr) else None,
        "loss_start": sig(w.loss_start, 4),
        "loss_end": sig(w.loss_end, 4),
        "loss_progress": sig(w.progress, 3),
    }
    evidence.update(_loss_change(f, w))
    evidence.update(f.healthy.evidence())
    return evidence


def _loss_change(f: Facts, w: ClipWindow) -> dict[str, Any]:
    """The mean loss change after clipped vs unclipped steps, where both are common enough."""
    deltas: dict[bool, list[float]] = {True: [], False: []}
    for i, j in zip(w.rows, w.rows[1:]):
        if math.isfinite(f.loss[i]) and math.isfinite(f.loss[j]):
            deltas[f.clipped[i]].append(f.loss[j] - f.loss[i])
    if len(deltas[True]) < _MIN_DELTAS or len(deltas[False]) < _MIN_DELTAS:
        return {}
    return {
        "loss_change_per_clipped_step": sig(statistics.fmean(deltas[True]), 3),
        "loss_change_per_unclipped_step": sig(statistics.fmean(deltas[False]), 3),
    }
