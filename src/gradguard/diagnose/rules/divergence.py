"""``divergence``: the loss climbed by orders of magnitude while finite, and the model moved.

Finiteness is not health: a z-score clipper can keep every value finite while the loss climbs to
1e17. Reported when no non-finite step follows (then the explosion tells the story). How far the
loss must climb depends on what else the log shows:

* the weight norms grew (≥ 2× in a layer): the optimizer drove the climb; 10× above the loss's best
  and its start is divergence (a loss going 4.5 → 271);
* the weight norms were logged and stayed put (``Facts.weights_still``): the loss grew with the
  objective (an RL loss summed over episodes that get longer), not with the model: not divergence;
* no weight norms in the log: the loss alone, 100× above its best and 10× above its start.

Advice: lower the learning rate (the rate ``gradguard tune --lr`` verified, or a tenth of the
run's, marked unverified) — after fixing the scale where the loss was already huge at step 0
(:func:`~gradguard.diagnose.rules._clipping.scale_at_start`: raw-unit targets); where the norms climbed, a fixed threshold from the healthy norms
through :func:`~gradguard.diagnose.rules._clipping.threshold_advice` (verified, or marked unverified).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradguard.diagnose.facts import WEIGHT_MOVED, Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt, median, rolling_median, sig
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import either, lower_lr, scale_at_start, threshold_advice, with_lr

DIVERGENCE_FACTOR = 100.0  # loss above its best by two orders of magnitude...
DIVERGENCE_START_FACTOR = 10.0  # ...and above where it started by one
MOVED_FACTOR = 10.0  # above its best by one order of magnitude, when the weights grew too
_SMOOTH = 5  # rolling-median width for the loss
_TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Where the loss diverged: ``rows``, the indices of the steps taken (a finite loss, not skipped),
    and ``onset``, an index of ``rows``: the first loss itself above the line, near where the rolling
    median of :data:`_SMOOTH` steps (which the climb is judged on) crossed it; the step the message names."""

    rows: list[int]
    onset: int


def detect(f: Facts, seen: Seen) -> Evidence | None:
    rows = [i for i in range(len(f.rows)) if math.isfinite(f.loss[i]) and not f.skipped[i]]
    if len(rows) < _SMOOTH or f.weights_still:
        return None
    moved = any(r >= WEIGHT_MOVED for r, _ in f.weight_ratios.values())
    factor = MOVED_FACTOR if moved else DIVERGENCE_FACTOR
    smooth = rolling_median([f.loss[i] for i in rows], _SMOOTH)
    start = _start(f.loss[rows[0]], smooth[0])
    best, best_at = start, 0
    for j, v in enumerate(smooth):
        if v < best:
            best, best_at = v, j
        if _climbed(v, best, start, factor):
            if any(f.bad[i] for i in range(rows[j], len(f.rows))):
                return None  # it went non-finite after all: the explosion finding covers it
            window = range(max(best_at, j - _SMOOTH // 2), min(len(rows), j + _SMOOTH // 2 + 1))
            onset = next((k for k in window if _climbed(f.loss[rows[k]], best, start, factor)), j)
            if _new_data(f, rows, onset) or not _held(f, rows, onset, best):
                return None
            return Evidence(rows, onset)
    return None


_JUMP = 10.0  # a loss this many times its last value in one step...
_CALM = 3.0  # ...after a step whose gradient norm was within this many times the median before it


def _new_data(f: Facts, rows: list[int], onset: int) -> bool:
    """Whether the climb is the data's, not the model's: the loss jumped ≥ :data:`_JUMP`× in one step
    after a step of usual size (its gradient norm within :data:`_CALM`× the median before it: the
    weights barely moved, so the loss rose with what it was given — a curriculum's next stage, a
    heavy-tailed batch), and it has fallen since to a tenth of its peak or less, not climbing again.
    A curriculum (sequence length 2 → 8 → 32, the loss 0.07 → 154 at the stage, 0.33 at the end)
    read "Divergence … lower the rate 10×"."""
    if onset < 2:
        return False
    before, at = f.loss[rows[onset - 1]], f.loss[rows[onset]]
    if not (before > 0 and at >= _JUMP * before):
        return False
    norms = [f.norm[rows[k]] for k in range(onset - 1)]
    norms = [n for n in norms if math.isfinite(n)]
    last = f.norm[rows[onset - 1]]
    if not norms or not (math.isfinite(last) and last <= _CALM * median(norms)):
        return False
    after = [f.loss[i] for i in rows[onset:]]
    tail = after[-max(1, len(after) // 4) :]
    return len(after) >= 8 and median(tail) <= max(after) / 10 and median(tail) <= median(after)


def _held(f: Facts, rows: list[int], onset: int, best: float) -> bool:
    """Whether the loss stayed up: the median of the losses from the onset to the end is still
    :data:`DIVERGENCE_START_FACTOR` × above the best (a climb that came back only part of the way is
    one). A few heavy batches in a row lift the rolling median over the line once and the loss goes on
    at its floor (a Huber regression on Cauchy noise: 87, 2.2, 40, 98 at a floor of 0.4 read
    "Divergence" on one seed, "stalled" on another and nothing on a third)."""
    after = median([f.loss[i] for i in rows[onset:]])
    floor = max(abs(best), _TINY)
    return after - best >= (DIVERGENCE_START_FACTOR - 1) * floor


def _climbed(v: float, best: float, start: float, factor: float) -> bool:
    """Whether a loss ``v`` is ``factor`` × above the best so far and 10× above the start."""
    floor = max(abs(best), _TINY) if best > 0 else max(abs(start), _TINY)
    return v - best >= (factor - 1) * floor and v >= DIVERGENCE_START_FACTOR * max(abs(start), _TINY)


def _start(first: float, smoothed: float) -> float:
    """Where the loss started: the smoothed first value, or the run's first loss where it is lower
    and positive. The first smoothed value is the median of the first losses, which holds the climb
    itself when the loss climbed in the first steps (a far too high learning rate: 2.8, 289, 2015,
    8144, … gives 289): the first loss, taken before any update, is then where the run started."""
    return first if 0 < first < smoothed else smoothed


def explain(f: Facts, ev: Evidence) -> Finding:
    """The message quotes losses as the log holds them: the first (the start of the run), the lowest
    before the climb and the highest since (the smoothed loss only decides that it climbed)."""
    losses = [f.loss[i] for i in ev.rows]
    low = min(range(ev.onset + 1), key=losses.__getitem__)
    high = max(range(ev.onset, len(losses)), key=losses.__getitem__)
    step = f.steps[ev.rows[ev.onset]]
    at = {j: f.steps[ev.rows[j]] for j in (0, low, high)}
    evidence: dict[str, Any] = {
        "loss_start": sig(losses[0], 4),
        "loss_start_step": at[0],
        "loss_best": sig(losses[low], 4),
        "loss_best_step": at[low],
        "loss_peak": sig(losses[high], 4),
        "loss_peak_step": at[high],
        "loss_final": sig(losses[-1], 4),
        "all_finite": not any(f.bad),
    }
    grown = {n: sig(r, 3) for n, (r, _) in f.weight_ratios.items() if r >= DIVERGENCE_FACTOR}
    if grown:
        evidence["weight_norm_growth"] = grown
    began = (
        f"(step {at[low]}, the start of the run)"
        if low == 0
        else f"(step {at[low]}; it was {fmt(losses[0])} at the start of the run, step {at[0]})"
    )
    message = (
        f"Divergence without NaN: from step {step} the loss climbed from its lowest {fmt(losses[low])} {began} "
        f"to {fmt(losses[high])} (step {at[high]}) while every value stayed finite — finiteness is not health."
    )
    advice = _advice(f)
    scale = scale_at_start(f)
    if scale:  # not the learning rate: the scale was wrong before the first update
        evidence.update(scale[2])
        message = f"{message} But {scale[0]}."
        advice["text"] = f"{scale[1]}. Then: {advice['text']}"
    return Finding("divergence", "error", step, message, evidence, advice)


def _advice(f: Facts) -> dict[str, Any]:
    """Lower the learning rate (:func:`~gradguard.diagnose.rules._clipping.lower_lr`: verified, or
    marked unverified); where the norms climbed, a fixed threshold from the healthy ones (through
    :func:`~gradguard.diagnose.rules._clipping.threshold_advice`) bounds every step."""
    text = (
        "Lower the learning rate (3–10×) or add warm-up; a spike-only clipper keeps values finite but does not "
        "stop a climb."
    )
    lr = lower_lr(f)
    h = f.healthy
    if h.onset_step is None:
        return {**with_lr({}, lr), "text": f"{text} {lr['text']}."}
    rec = threshold_advice(f, h.max_norm, f"the healthy norms before step {h.onset_step}")
    both = either(rec["text"], lr["text"]) if "max_norm" in rec else f"{lr['text']}. {rec['text']}."
    rec["text"] = f"{text} A fixed threshold bounds every step. {both}"
    return with_lr(rec, lr)


RULE = Rule("divergence", detect, explain)
