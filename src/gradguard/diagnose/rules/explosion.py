"""``explosion``: the norm rose ≥ 10× over its healthy median (or ≥ 3× and then went non-finite).

Evidence: the growth onset (:func:`gradguard.runtable.climb_onset`, the definition the guard's
locator uses too) and rate, the peak and its z-score against the healthy log-norms, the layer
whose norm grew first (:func:`gradguard.runtable.first_layer_to_grow`), weight norms growing, the
guard's spike and overflow events.

Not every rise is an explosion. In a finite run (no non-finite step, no overflow):

* a norm that rose while the loss kept falling (Adam's early steps often raise it 10-20×) harmed
  nothing and is not reported, unless a fixed threshold was there to catch it under an optimizer
  whose step clipping bounds (SGD and its kin; not Adam and its kin, which normalize their step:
  the rnn demo's ``adam+norm:5`` surges ~20× and trains fine);
* there, a **surge that settled** — the norm stopped climbing after its peak (no climb onset after
  it, the last quarter no higher than :data:`SETTLE` × the median since the peak) while the loss
  kept falling, also after the peak — is an ``info`` saying the threshold held it, with nothing to
  change; a rise still climbing at the end is an ``info`` explosion;
* a norm that grew while the weights stayed put (``Facts.weights_still``: the gradient grew with
  the objective, e.g. an RL loss summed over longer episodes) is not reported.

Severity: an error when the run went non-finite or diverged (the ``divergence`` rule), so a CI
gate fails on it; in a finite run a warning, or an ``info`` when a fixed threshold caught the rise
and the loss kept falling.

Advice: a threshold from the healthy norms, never at or above a level the run was clipped to when
it failed (then: lower the learning rate), verified by ``tune.json`` or marked unverified with the
``gradguard tune`` command line that verifies it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from gradguard import optable
from gradguard.diagnose.facts import Facts, fields
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.healthy import HealthyWindow
from gradguard.diagnose.numbers import ends, fmt, layer_name, median, sig
from gradguard.diagnose.rules import Rule, Seen, lr_too_high
from gradguard.diagnose.rules._clipping import (
    either,
    failed_levels,
    lower_lr,
    lr_advice,
    scale_at_start,
    scale_free,
    threshold_advice,
    thresholds_tried,
    tuned,
    with_lr,
)
from gradguard.runtable import EXPLOSION_FACTOR, GROWTH_FACTOR, climb_onset, first_above, first_layer_to_grow

_LOSS_SAMPLES = 20  # fewest finite losses (and norms after a peak) that can show a trend
FELL = 0.05
"""The loss fell when its end is below its start by at least this fraction of the start's size."""
FEW_HEALTHY = 10
"""Fewer healthy norms than this before the climb: the learning rate's advice leads the threshold's (an
FSDP2 char-LM at SGD lr 5 climbed from step 2: "clip at 3.2 (from 2 healthy norms)", followed, ended at
loss 1,359; lr 0.5 trained)."""
SETTLE = 2.0
"""A surge settled when the median of the last quarter of the norms after its peak is at most this
many times the median of all of them (and no new climb started): the norm stopped growing."""


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The peak after the healthy window, its rise over the healthy median, the overflow events."""

    peak_index: int | None
    peak: float
    ratio: float
    overflows: int
    diverged: bool = False
    falling: bool = False
    settled_at: float | None = None  # the norm's level after a surge that settled (see _settled)
    schedule: tuple[float, str, str] | None = None  # the LR schedule drove it (lr_too_high.scheduled)


def detect(f: Facts, seen: Seen) -> Evidence | None:
    h = f.healthy
    if not h.norms or not h.p50 > 0:
        return None
    last = h.last_step if h.last_step is not None else -1
    after = [i for i in range(len(f.rows)) if f.steps[i] > last and f.ok[i]]
    peak_i = max(after, key=lambda i: f.norm[i], default=None)
    peak = f.norm[peak_i] if peak_i is not None else math.nan
    ratio = peak / h.p50 if math.isfinite(peak) else math.nan
    overflows = len(f.events_of("overflow"))
    big = math.isfinite(ratio) and ratio >= EXPLOSION_FACTOR
    climbed = h.onset_step is not None and f.went_bad and math.isfinite(ratio) and ratio >= GROWTH_FACTOR
    if not (big or climbed or overflows):
        return None
    finite = not f.went_bad and not overflows
    if finite and f.weights_still:
        return None
    falling = finite and (_falling(f.loss_at(0, len(f.rows))) or _fell_since(f, h.onset_step))
    if falling and (f.clip_kind != "fixed" or scale_free(f)):
        return None  # nothing bounded it, or clipping barely changes the step (Adam): it harmed nothing
    settled = _settled(f, peak_i) if falling and peak_i is not None else None
    rate = seen.evidence("lr_too_high")
    schedule = lr_too_high.scheduled(f, rate) if rate is not None else None
    diverged = seen.finding("divergence") is not None
    return Evidence(peak_i, peak, ratio, overflows, diverged, falling, settled, schedule)


def _falling(losses: list[float]) -> bool:
    """Whether finite ``losses`` fell: the end at least :data:`FELL` of its size below the start
    (:func:`~gradguard.diagnose.numbers.ends`; a flat loss that wobbles down by a hair did not fall)."""
    if len(losses) < _LOSS_SAMPLES:
        return False
    loss = ends(losses)
    return loss.end < loss.start - FELL * abs(loss.start)


def _fell_since(f: Facts, onset_step: int | None) -> bool:
    """Whether the loss fell from the climb's onset to the end: a curriculum's harder stage raises the
    norm and the loss together, then both come down; over the whole run its loss rose (the first
    stage's was near 0), yet nothing exploded (a 55× rise read "Gradient explosion")."""
    return onset_step is not None and _falling(f.loss_at(f.index_of(onset_step), len(f.rows)))


def _settled(f: Facts, peak_i: int) -> float | None:
    """Where the norm settled after its peak (row ``peak_i``): the median of the last quarter of the
    norms since, when there are enough of them, no new climb started, that quarter is no higher than
    :data:`SETTLE` × the median since the peak, and the loss kept falling after the peak too;
    ``None``: it did not settle."""
    after = [f.norm[i] for i in range(peak_i + 1, f.trouble) if f.ok[i] and f.norm[i] > 0]
    if len(after) < _LOSS_SAMPLES or climb_onset(after, ends_in_trouble=False) is not None:
        return None
    level = median(after[-max(5, len(after) // 4) :])
    calm = level <= SETTLE * median(after) and _falling(f.loss_at(peak_i, len(f.rows)))
    return level if calm else None


def explain(f: Facts, ev: Evidence) -> Finding:
    h = f.healthy
    first_big = first_above(f.norm, EXPLOSION_FACTOR * h.p50, _after(f, h), ignore=f.amp)
    onset = (
        h.onset_step if h.onset_step is not None else (f.steps[first_big] if first_big is not None else None)
    )
    evidence: dict[str, Any] = {
        **h.evidence(),
        "onset_step": onset,
        "first_spike_step": f.steps[first_big] if first_big is not None else None,
        "peak_norm": sig(ev.peak, 4),
        "peak_step": f.steps[ev.peak_index] if ev.peak_index is not None else None,
        "peak_over_healthy_median": sig(ev.ratio, 3),
        "peak_z_score_log": sig(_z_score(h, ev.peak), 3),
        "spike_events": len(f.events_of("spike")),
        "overflow_events": ev.overflows,
        **_growth_rate(f, onset),
        **_first_layer(f, h),
        **_weights(f),
        **_end(f),
    }
    if ev.settled_at is not None:
        return _surge_held(f, ev, ev.settled_at, onset, evidence)
    still_rising = ev.schedule is not None and _rate_kept_rising(f, onset)
    message = _message(f, ev, onset, evidence)
    advice = (
        _schedule(f, ev.schedule)
        if ev.schedule is not None and (still_rising or lr_too_high.joined(ev.schedule))
        else _advice(f, ev.schedule)
    )
    if ev.schedule is not None:  # the schedule's doing: said first, with its own rate
        message = f"{message[:-1]}; {ev.schedule[2]}."
    scale = scale_at_start(f)
    if scale:  # not the learning rate: the scale was wrong before the first update
        evidence.update(scale[2])
        message = f"{message[:-1]}; {scale[0]}."
        advice["text"] = f"{scale[1]}. Then: {advice['text']}"
    return Finding("explosion", _severity(f, ev), onset, message, evidence, advice)


def _surge_held(f: Facts, ev: Evidence, level: float, onset: int | None, evidence: dict[str, Any]) -> Finding:
    """An ``info``: a fixed threshold clipped a surge that then settled (at ``level``) while the loss
    kept falling."""
    evidence.update(
        settled=True, settled_norm=sig(level, 4), settled_over_healthy_median=sig(level / f.healthy.p50, 3)
    )
    loss = ends(f.loss_at(0, len(f.rows)))
    message = (
        f"A surge of the gradient norm that settled, not an explosion: the pre-clip norm rose from a healthy "
        f"median of {fmt(f.healthy.p50)} to {fmt(ev.peak)} ({fmt(ev.ratio)}×) from step {onset}, then settled "
        f"near {fmt(level)} while the loss kept falling ({loss.text()}); "
        f"the threshold ({f.clip_spec}) bounded those steps."
    )
    rec = {"text": "Nothing to fix: keep the threshold, which bounded the surge."}
    return Finding("explosion", "info", onset, message, evidence, rec)


def _after(f: Facts, h: HealthyWindow) -> int:
    """The first row after the healthy window."""
    last = h.last_step if h.last_step is not None else -1
    return next((i for i, s in enumerate(f.steps) if s > last), len(f.steps))


def _z_score(h: HealthyWindow, peak: float) -> float:
    logs = [math.log(v) for v in h.norms if v > 0]
    if not math.isfinite(peak) or not logs:
        return math.nan
    sd = statistics.pstdev(logs) if len(logs) > 1 else 0.0
    return (math.log(peak) - statistics.fmean(logs)) / (sd + 1e-6)


def _growth_rate(f: Facts, onset: int | None) -> dict[str, Any]:
    """The climb's log-linear growth: ×factor per step, from the onset to the first bad step."""
    if onset is None:
        return {}
    lo = f.index_of(onset)
    climb = [(f.steps[i], math.log(f.norm[i])) for i in range(lo, f.trouble) if f.ok[i] and f.norm[i] > 0]
    if len(climb) < 2:
        return {}
    xs, ys = [s for s, _ in climb], [v for _, v in climb]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    vx = sum((x - mx) ** 2 for x in xs)
    if not vx > 0:
        return {}
    slope = sum((x - mx) * (v - my) for x, v in zip(xs, ys)) / vx
    return {"growth_per_step": sig(math.exp(slope), 3)}


def _first_layer(f: Facts, h: HealthyWindow) -> dict[str, Any]:
    """The layer whose grad norm first exceeded 10× its own healthy median (or went non-finite)."""
    if h.first_step is None or h.last_step is None or not f.layers:
        return {}
    healthy = range(f.index_of(h.first_step), f.index_of(h.last_step) + 1)
    grew = first_layer_to_grow(f.table.layer_columns("grad_norm"), healthy, f.bad)
    if grew is None:
        return {}
    return {
        "first_layer": grew.name,
        "first_layer_step": f.steps[grew.index],
        "first_layer_over_its_median": sig(grew.ratio, 3),
    }


def _weights(f: Facts) -> dict[str, Any]:
    top = sorted(f.weight_ratios.items(), key=lambda kv: -kv[1][0])[:5]
    return {"weight_norm_growth": {name: sig(r, 3) for name, (r, _) in top}} if top else {}


def _end(f: Facts) -> dict[str, Any]:
    """How the run ended: its first non-finite step, and the op where the overflow landed."""
    out: dict[str, Any] = {
        "first_nonfinite_step": f.steps[f.trouble] if f.went_bad and f.trouble_reason != "overflow" else None
    }
    located = f.first_located()
    if located is not None and f.went_bad:
        out["overflowed_in"] = {k: located.get(k) for k in ("phase", "module", "op", "source")}
    return out


def _edge_birth(f: Facts) -> dict[str, Any] | None:
    """The run's first located birth where it is an op at the edge of its domain (a division by a
    temperature annealed to 0, log of 0), not an overflow: no growth of the norm explains that op,
    and its own fix (``nonfinite_op``, then the headline) is what stops the NaN; ``None`` otherwise."""
    located = f.first_located() if f.went_bad else None
    if located is None:
        return None
    why = fields(located.get("evidence")).get("reason")
    return located if optable.at_domain_edge(located.get("op"), why) else None


def _severity(f: Facts, ev: Evidence) -> str:
    if (f.went_bad and _edge_birth(f) is None) or ev.diverged:
        return "error"
    if f.went_bad:
        return "warning"  # the growth led up to an op at its domain's edge: that op is the headline
    return "info" if f.clip_kind == "fixed" and ev.falling else "warning"  # a fixed threshold caught it


def _message(f: Facts, ev: Evidence, onset: int | None, evidence: dict[str, Any]) -> str:
    where = f" in layer {layer_name(evidence['first_layer'])} first" if "first_layer" in evidence else ""
    nonfinite = evidence["first_nonfinite_step"]
    edge = _edge_birth(f)
    if nonfinite is not None and edge is not None:
        why = fields(edge.get("evidence")).get("reason")
        end = (
            f"; the run went non-finite at step {nonfinite}, where {edge.get('op')} met the edge of its "
            f"domain ({why}), which no threshold or rate keeps it from: fix that op first (nonfinite_op)"
        )
    elif nonfinite is not None:
        end = f"; the run went non-finite at step {nonfinite}"
    else:
        end = "; float32 could no longer hold the norm" if ev.overflows else ""
    return (
        f"Gradient explosion: the pre-clip norm rose from a healthy median of {fmt(f.healthy.p50)} to "
        f"{fmt(ev.peak)} ({fmt(ev.ratio)}×) starting at step {onset}{where}{end}."
    )


def _advice(f: Facts, schedule: tuple[float, str, str] | None = None) -> dict[str, Any]:
    """Clip at the healthy norms — or, where the run was clipped and still exploded, lower the LR.

    A threshold at or above a level this run was clipped to when it failed is never recommended:
    that level did not hold. Every threshold is verified by ``tune.json`` or marked unverified
    (:func:`~gradguard.diagnose.rules._clipping.threshold_advice`), and so is the learning rate
    (:func:`~gradguard.diagnose.rules._clipping.lower_lr`; after a jump of the rate that then held,
    the rate before it, as ``lr_too_high`` says).
    """
    h = f.healthy
    failed = failed_levels(f)
    if failed and h.max_norm is not None and min(failed) <= h.max_norm:
        return _clipped_and_exploded(f, min(failed))
    why = f"from {len(h.norms)} healthy norms, steps {h.first_step}–{h.last_step}"
    rec = threshold_advice(f, h.max_norm, why)
    lr = (
        lower_lr(f) if schedule is None else lr_advice(f, schedule[0], schedule[1])
    )  # (the rate before a jump)
    text = either(rec["text"], lr["text"]) if "max_norm" in rec else f"{rec['text']}. {lr['text']}."
    if "max_norm" in rec and not rec.get("verified") and len(h.norms) < FEW_HEALTHY:
        text = (  # a climb from the first steps: the rate first, a threshold from a handful of norms second
            f"Lower the learning rate first: the norm climbed from step {h.onset_step}, after {len(h.norms)} "
            f"healthy step(s) — a rate that explodes a run that early is too high, and that few norms are no "
            f"ground for a threshold. {lr['text']}. Or, second, clip the global norm. {rec['text']}."
        )
    if not rec.get("verified"):
        text += " Keep on_nonfinite='skip' so a bad step never reaches the weights."
    rec["text"] = text
    return with_lr(rec, lr)


def _rate_kept_rising(f: Facts, onset: int | None) -> bool:
    """Whether the learning rate kept rising after the climb's onset (to 1.5× or more of its rate
    there): a schedule still raising it, which no threshold holds."""
    at = f.index_of(onset) if onset is not None else 0
    rates = [v for v in f.lr[at:] if math.isfinite(v) and v > 0]
    return len(rates) > 1 and rates[-1] >= 1.5 * rates[0]


def _schedule(f: Facts, schedule: tuple[float, str, str]) -> dict[str, Any]:
    """The learning rate's schedule drove the climb: keep the rate where it still trained (the one
    ``lr_too_high`` advises: one rate, one tune command); neither a threshold from the healthy norms
    nor a tenth of the peak rate the schedule reached (a LambdaLR tripling the rate each step: the
    peak was 2.43 where the script's rate was 0.01, "a tenth" 0.2) fixes a schedule that keeps raising it."""
    rate, why, _ = schedule
    lr = lr_advice(f, rate, why)
    if lr_too_high.joined(schedule):  # a group added at a rate far above the others'
        text = (
            "The rate of the param group added right before the climb drove it: give that group a rate like the "
            f"others' (the rate passed to add_param_group, a per-layer decay); clipping cannot hold it. {lr['text']}."
        )
    else:
        text = (
            "The learning-rate schedule drove it: lower the learning rate it reaches (cap the schedule, or end the "
            "warm-up) so the rate stays at or below the one that trained; clipping only bounds each step while the "
            f"rate keeps growing. {lr['text']}."
        )
    return with_lr({"text": text}, lr)


def _clipped_and_exploded(f: Facts, level: float) -> dict[str, Any]:
    """Clipped at ``level`` and still exploded: lower the learning rate — or, where ``tune.json``
    verified a tighter threshold that held, either that threshold or the lower rate."""
    lr = lower_lr(f)
    said = f"The norm was already clipped at {fmt(level)} and still exploded"
    text = (
        f"{said}: lower the learning rate (3–10×) or add warm-up; clipping alone keeps the step bounded, "
        f"not the weights. {lr['text']}."
    )
    rec: dict[str, Any] = {}
    result = tuned(f)
    if result is not None and thresholds_tried(result):
        rec = threshold_advice(f, None, "")
        text = f"{said}. {either(rec['text'], lr['text'])}" if "max_norm" in rec else f"{text} {rec['text']}."
    return with_lr({**rec, "text": text}, lr)


RULE = Rule("explosion", detect, explain)
