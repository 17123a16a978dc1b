"""``lr_schedule``: the learning-rate schedule went negative or collapsed to nothing mid-run.

Read from the learning rate the guard logs at every step (``lr``: the largest of the optimizer's
groups, after the scheduler), so it holds whatever scheduler set it:

* **negative** (error): from the first step with a rate below 0 every optimizer step climbs the
  loss. A decay that runs past its end does it — a ``LambdaLR`` / linear ``1 − step/total_steps``
  sized in epochs but stepped every batch. Measured (a field script): the explosion 78 steps later
  read "clip at 1.1, or lr 1e-5": neither trained (val acc 0.09), sizing the schedule to the run did
  (0.61). The climb it drives is not reported again with a clipping or rate advice
  (:data:`~gradguard.diagnose.rules._DRIVERS`).
* **collapsed** (error where the run did not train, else a warning): the rate fell below
  :data:`COLLAPSED` of its peak before :data:`EARLY` of the run and stayed below :data:`STAYED` of it
  to the end: the steps after it cannot move the weights. A ``StepLR`` / ``ExponentialLR`` sized in
  epochs and stepped every batch does it (γ 0.7 per batch: 1e-3 → 2e-11 by step 50, 3e-149 at the
  end; was "stalled … raise the learning rate, try lr=3e-141"). Ordinary schedules stay clear:
  cosine and OneCycle are at 2–5 % of their peak at 90 % of the run, a linear decay reaches 0 only
  at its end, a warm restart recovers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import Ends, fmt, median, sig
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import trained

COLLAPSED = 1e-4  # of the peak rate: a rate this far below it moves nothing
STAYED = 1e-2  # ...and the rate never came back above this fraction of the peak (a warm restart does)
EARLY = 0.8  # ...from a step before this fraction of the run
_MIN_STEPS = 10


@dataclasses.dataclass(frozen=True)
class Evidence:
    """``kind`` ``"negative"`` or ``"collapsed"``; ``at``: the row where it began; ``peak_at``: the row of
    the peak rate; ``worst_at``: the row of the lowest rate from ``at`` on."""

    kind: str
    at: int
    peak_at: int
    worst_at: int


def detect(f: Facts, seen: Seen) -> Evidence | None:
    rates = f.lr
    known = [i for i, v in enumerate(rates) if math.isfinite(v)]
    if len(known) < _MIN_STEPS:
        return None
    peak_at = max(known, key=lambda i: rates[i])
    if not rates[peak_at] > 0:
        return None
    negative = next((i for i in known if rates[i] < 0), None)
    if negative is not None:
        return Evidence("negative", negative, peak_at, _lowest(rates, known, negative))
    peak = rates[peak_at]
    at = next((i for i in known if i > peak_at and rates[i] < COLLAPSED * peak), None)
    if at is None or at >= EARLY * len(f.rows):
        return None
    if any(rates[i] >= STAYED * peak for i in known if i > at):
        return None  # it came back (a warm restart)
    loss = trained(f)
    if loss is not None and _fell_before_the_cuts(f, loss, known, peak_at):
        return None  # a ReduceLROnPlateau that cut the rate after the loss had stopped falling
    return Evidence("collapsed", at, peak_at, _lowest(rates, known, at))


CONVERGED = 0.7  # of the loss's whole fall, made before the rate was first cut: it had converged


def _fell_before_the_cuts(f: Facts, loss: Ends, known: list[int], peak_at: int) -> bool:
    """Whether the loss had made most (:data:`CONVERGED`) of its fall before the rate was first cut
    to half its peak: a plateau scheduler cuts a rate once the loss has stopped falling. A StepLR sized
    in epochs and stepped every batch cuts it while the loss is still falling (a 10-class CNN: 2.28 →
    2.07 at the first cut, step 30, of a fall to 1.80: 44 %; val acc 0.30, 0.93 stepped per epoch), and
    the loss then sits where the collapse left it: that run "trained", yet was read "No findings"."""
    cut = next((i for i in known if i > peak_at and f.lr[i] < 0.5 * f.lr[peak_at]), None)
    start = next(
        (v for v in f.loss if math.isfinite(v)), math.nan
    )  # before any update (not a spike after it)
    fall = start - loss.end
    if cut is None or not fall > 0:
        return True
    width = max(3, min(20, (cut - peak_at) // 2))
    before = [v for v in f.loss[max(0, cut - width) : cut] if math.isfinite(v)]
    return bool(before) and (start - median(before)) >= CONVERGED * fall


def _lowest(rates: Sequence[float], known: list[int], start: int) -> int:
    return min((i for i in known if i >= start), key=lambda i: rates[i])


def explain(f: Facts, ev: Evidence) -> Finding:
    rates, steps = f.lr, f.steps
    peak, first, worst = rates[ev.peak_at], rates[ev.at], rates[ev.worst_at]
    left = len(f.rows) - ev.at
    evidence: dict[str, Any] = {
        "lr_peak": sig(peak, 4),
        "lr_peak_step": steps[ev.peak_at],
        "lr_at_step": sig(first, 4),
        "lr_lowest": sig(worst, 4),
        "lr_lowest_step": steps[ev.worst_at],
        "steps_after": left,
    }
    if ev.kind == "negative":
        message = (
            f"The learning rate went negative at step {steps[ev.at]} ({fmt(first)}; {fmt(worst)} by step "
            f"{steps[ev.worst_at]}, from a peak of {fmt(peak)}): from there every optimizer step climbs the "
            "loss instead of descending it, which neither clipping nor a lower rate can fix. A schedule that "
            "runs past its end does this: a decay such as LambdaLR(lambda s: 1 - s / total_steps) whose "
            "total_steps is shorter than the steps taken (sized in epochs, stepped every batch)."
        )
        text = (
            "Size the schedule to the run: total_steps = epochs × len(train_loader) when scheduler.step() is "
            "called every batch (or step it once per epoch), and keep its factor ≥ 0 "
            "(max(0.0, 1 - s / total_steps))."
        )
        return Finding(
            "lr_schedule", "error", steps[ev.at], message, evidence, {"verified": False, "text": text}
        )
    message = (
        f"The learning-rate schedule collapsed: the rate fell from its peak {fmt(peak)} (step "
        f"{steps[ev.peak_at]}) to {fmt(first)} by step {steps[ev.at]} and to {fmt(worst)} by step "
        f"{steps[ev.worst_at]}, below {COLLAPSED:g} of its peak for the last {left} steps "
        f"({left / len(f.rows):.0%} of the run): steps that small cannot move the weights. A decay stepped "
        "more often than it was sized for does this: StepLR / ExponentialLR / MultiStepLR sized in epochs "
        "but stepped every batch."
    )
    text = (
        "Step the scheduler as often as it was sized for (once per epoch for a schedule in epochs), or size it "
        "in batches (step_size and milestones × len(train_loader), gamma ** (1 / len(train_loader)))."
    )
    severity = "warning" if trained(f) is not None else "error"
    return Finding(
        "lr_schedule", severity, steps[ev.at], message, evidence, {"verified": False, "text": text}
    )


RULE = Rule("lr_schedule", detect, explain)
