"""``explosion``: the norm rose ≥ 10× over its healthy median (or ≥ 3× and then went non-finite).

Evidence: the growth onset (:func:`gradguard.runtable.climb_onset`, the definition the guard's
locator uses too) and rate, the peak and its z-score against the healthy log-norms, the layer
whose norm grew first (:func:`gradguard.runtable.first_layer_to_grow`), weight norms growing, the
guard's spike and overflow events. A norm that rose while the loss kept falling and nothing went
non-finite (Adam's early steps often do) harmed nothing and is not reported, unless a fixed
threshold was there to catch it (then it is ``info``); nor is a norm that grew in a finite run
whose weights stayed put (``Facts.weights_still``: the gradient grew with the objective, e.g. an RL
loss summed over longer episodes). Severity: an error when the run went non-finite or diverged
(the ``divergence`` rule), so a CI gate fails on it.

Advice: a threshold from the healthy norms, never at or above a level the run was clipped to when
it failed (then: lower the learning rate), verified by ``tune.json`` or marked unverified with the
``gradguard tune`` command line that verifies it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.healthy import HealthyWindow
from gradguard.diagnose.numbers import fmt, layer_name, median, sig
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import failed_levels, threshold_advice, tune_command, tuned
from gradguard.runtable import EXPLOSION_FACTOR, GROWTH_FACTOR, first_above, first_layer_to_grow

_LOSS_SAMPLES = 20  # fewest finite losses that can show the loss kept falling


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The peak after the healthy window, its rise over the healthy median, the overflow events."""

    peak_index: int | None
    peak: float
    ratio: float
    overflows: int
    diverged: bool = False


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
    if not f.went_bad and not overflows and f.clip_kind != "fixed" and _loss_kept_falling(f):
        return None
    if not f.went_bad and not overflows and f.weights_still:
        return None
    return Evidence(peak_i, peak, ratio, overflows, seen.finding("divergence") is not None)


def _loss_kept_falling(f: Facts) -> bool:
    losses = f.loss_at(0, len(f.rows))
    k = max(1, min(len(losses) // 10, 50))
    return len(losses) >= _LOSS_SAMPLES and median(losses[-k:]) < median(losses[:k])


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
    return Finding(
        "explosion", _severity(f, ev), onset, _message(f, ev, onset, evidence), evidence, _advice(f)
    )


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


def _severity(f: Facts, ev: Evidence) -> str:
    if f.went_bad or ev.diverged:
        return "error"
    return "info" if f.clip_kind == "fixed" else "warning"  # a fixed threshold caught it


def _message(f: Facts, ev: Evidence, onset: int | None, evidence: dict[str, Any]) -> str:
    where = f" in layer {layer_name(evidence['first_layer'])} first" if "first_layer" in evidence else ""
    nonfinite = evidence["first_nonfinite_step"]
    if nonfinite is not None:
        end = f"; the run went non-finite at step {nonfinite}"
    else:
        end = "; float32 could no longer hold the norm" if ev.overflows else ""
    return (
        f"Gradient explosion: the pre-clip norm rose from a healthy median of {fmt(f.healthy.p50)} to "
        f"{fmt(ev.peak)} ({fmt(ev.ratio)}×) starting at step {onset}{where}{end}."
    )


def _advice(f: Facts) -> dict[str, Any]:
    """Clip at the healthy norms — or, where the run was clipped and still exploded, lower the LR.

    A threshold at or above a level this run was clipped to when it failed is never recommended:
    that level did not hold. Every threshold is verified by ``tune.json`` or marked unverified
    (:func:`~gradguard.diagnose.rules._clipping.threshold_advice`).
    """
    h = f.healthy
    failed = failed_levels(f)
    if failed and h.max_norm is not None and min(failed) <= h.max_norm:
        command = tune_command(f)
        rec: dict[str, Any] = {
            "verified": False,
            "tune": command,
            "text": f"The norm was already clipped at {fmt(min(failed))} and still exploded: lower the learning "
            "rate (3–10×) or add warm-up; clipping alone keeps the step bounded, not the weights. Verify the new "
            f"learning rate before a long run: {command} --lr ...",
        }
        result = tuned(f)
        if result is not None:
            rec.update(threshold_advice(f, None, ""))
        return rec
    why = f"from {len(h.norms)} healthy norms, steps {h.first_step}–{h.last_step}"
    rec = threshold_advice(f, h.max_norm, why)
    if not rec.get("verified"):
        rec["text"] = (
            "Lower the learning rate (3–10×) or clip the global norm. "
            + rec["text"]
            + "; keep on_nonfinite='skip' so a bad step never reaches the weights"
        )
    rec["text"] += "."
    return rec


RULE = Rule("explosion", detect, explain)
