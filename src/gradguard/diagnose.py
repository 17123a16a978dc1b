"""Rules over a run log → findings, each with its evidence and a recommendation (reads files only).

:func:`diagnose` reads a run directory (see :mod:`gradguard.runlog`) and returns a list of
:class:`Finding`. Each finding has a stable ``id``:

============================ ========================================================================
``explosion``                the gradient norm grew by an order of magnitude or more over its healthy
                             level (growth trend, z-score, the layer that grew first, weights growing)
``over_clipping``            a fixed threshold clips more than half of the steps: the stall that looks
                             like vanishing gradients (clip rate, median norm / threshold, effective LR)
``vanishing``                per-layer gradient norms decaying toward the input by orders of magnitude
``divergence``               the loss (or the weights) growing by orders of magnitude while finite
``nonfinite_op``             the op that produced the first NaN/inf (from the locate event) and its fix
``bad_data``                 a non-finite input batch (or a lone non-finite step amid healthy ones)
``lr_too_high``              update/weight ratios far above ~1e-3, or an LR increase right before growth
``weight_growth``            a layer's weight norm growing by an order of magnitude
``loss_scale_collapse``      the AMP GradScaler's scale collapsing: fp16 cannot hold the gradients
============================ ========================================================================

The recommended clipping threshold (``finding.recommendation["max_norm"]``) always comes from the
**healthy** pre-clip norms: the finite norms recorded before the norm started growing (the first
step at 3× the median of the norms before it that stays there), before the first non-finite or
overflowing step, with spikes and lone bad batches left out. From a window of 50 norms or more,
or from a run that never went wrong, it is ``min(p90, 2 × p50)``: about the 90th percentile of the
Deep Learning Tuning Playbook, capped at twice the median so that the first steps of a climb cannot
loosen it (within the 0.5–10× the mean norm that Pascanu, Mikolov & Bengio, ICML 2013, found to
converge). From a shorter window that ends in trouble (a run that went wrong early) it is the
median: a 90th percentile taken over a start that is already climbing was too loose in a Deep SAD
probe, where the median kept all seeds finite. For over-clipping it is never below the median
pre-clip norm of the run's first steps, the closest the clipped run comes to the unclipped one.

Example:
    >>> from gradguard.diagnose import diagnose, recommended_max_norm
    >>> findings = diagnose("gradguard-runs")             # doctest: +SKIP
    >>> [(f.id, f.severity, f.step) for f in findings]     # doctest: +SKIP
    [('explosion', 'error', 61), ('lr_too_high', 'warning', 60)]
    >>> recommended_max_norm(findings)                     # doctest: +SKIP
    0.93
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import os
import re
import statistics
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from gradguard.runlog import FINDINGS_FILE, RunLog, atomic_write_json, read_run

__all__ = [
    "RULES",
    "SEVERITIES",
    "Finding",
    "HealthyWindow",
    "diagnose",
    "first_nonfinite",
    "healthy_window",
    "recommended_max_norm",
    "to_json",
    "write_findings",
]

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
"""Severities, most severe first. ``error``: training went wrong (non-finite, diverged, stalled)."""

RULES: tuple[str, ...] = (
    "nonfinite_op",
    "bad_data",
    "explosion",
    "divergence",
    "over_clipping",
    "lr_too_high",
    "weight_growth",
    "vanishing",
    "loss_scale_collapse",
)
"""The stable finding ids."""

# --- thresholds (documented in the README and in each rule's docstring) ---------------------
EXPLOSION_FACTOR = 10.0  # peak norm / healthy median that is an explosion
GROWTH_FACTOR = 3.0  # a climb of this much ending in a non-finite step is an explosion
OVERCLIP_RATE = 0.5  # > 50% of steps clipped is aggressive (Tuning Playbook)
OVERCLIP_ERROR_RATE = 0.9  # almost every step clipped: the effective LR is the threshold's
DIVERGENCE_FACTOR = 100.0  # loss above its best by two orders of magnitude...
DIVERGENCE_START_FACTOR = 10.0  # ...and above where it started by one
UPDATE_RATIO_HIGH = 0.1  # a layer's median ‖Δw‖/‖w‖ (≈1e-3 is the rule of thumb)
LR_JUMP = 2.0  # an LR increase by this factor shortly before the growth
WEIGHT_GROWTH_FACTOR = 10.0  # a layer's weight norm over its first measured value
VANISHING_RATIO = 100.0  # output-side layer's median grad norm over the input side's
_MIN_HEALTHY = 3  # fewest norms a healthy window holds
_SMOOTH = 5  # rolling-median width for the loss
_ONSET_WINDOW = 200  # norms before a step that its climb is measured against
_SUSTAIN = 3  # values after a climb's first step that must stay as high
_LONG_WINDOW = 50  # a healthy window this long gives min(p90, 2 × p50); a shorter one that ends in
# trouble gives its median (Deep SAD probe: p90 of a short, already climbing start was too loose)

_TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class Finding:
    """One diagnosis: what happened, the numbers that show it, and what to do.

    Attributes:
        id: one of :data:`RULES` (stable snake_case).
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        step: the step where it shows first (``None`` when it has no single step).
        message: one or two sentences for a person.
        evidence: the numbers behind it (JSON-ready).
        recommendation: what to do; ``"max_norm"`` holds a recommended clip threshold, ``"lr"`` a
            learning rate, ``"text"`` the advice in words, ``"code"`` a line to paste.
    """

    id: str
    severity: str
    step: int | None
    message: str
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    recommendation: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written to ``findings.json``."""
        return {
            "id": self.id,
            "severity": self.severity,
            "step": self.step,
            "message": self.message,
            "evidence": self.evidence,
            "recommendation": self.recommendation,
        }


@dataclasses.dataclass(frozen=True)
class HealthyWindow:
    """The healthy pre-clip norms of a run and the threshold they give.

    Attributes:
        norms: the finite pre-clip global norms in the window (file order).
        first_step: first step of the window (``None`` when empty).
        last_step: last step of the window.
        onset_step: the step where the norm started growing (``None``: no growth found).
        end_reason: why the window ends: ``"growth"``, ``"nonfinite"``, ``"overflow"`` or ``"end"``.
        p50: median of ``norms``.
        p90: 90th percentile of ``norms``.
        mean: mean of ``norms``.
        max_norm: the recommended threshold, rounded down to two significant digits: the median
            where the window ends in trouble (growth, non-finite, overflow), else ``min(p90, 2 × p50)``.
        rule: how ``max_norm`` was chosen, in words.
    """

    norms: list[float]
    first_step: int | None
    last_step: int | None
    onset_step: int | None
    end_reason: str
    p50: float
    p90: float
    mean: float
    max_norm: float | None
    rule: str = ""

    def evidence(self) -> dict[str, Any]:
        return {
            "healthy_steps": [self.first_step, self.last_step],
            "healthy_count": len(self.norms),
            "healthy_p50": _sig(self.p50, 4),
            "healthy_p90": _sig(self.p90, 4),
            "healthy_mean": _sig(self.mean, 4),
            "healthy_ends": self.end_reason,
            "max_norm_rule": self.rule,
        }


# ============================================================================================
# Numbers
# ============================================================================================


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any) -> float:
    """A metric value as a float; missing or non-numeric → nan."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    return float(x)


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of finite values; nan when empty."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = q * (len(data) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _sig(x: float, digits: int = 2) -> float:
    """``x`` rounded to ``digits`` significant digits (non-finite and 0 unchanged)."""
    if not math.isfinite(x) or x == 0:
        return x
    return round(x, -math.floor(math.log10(abs(x))) + digits - 1)


def _sig_floor(x: float) -> float:
    """``x`` rounded down to two significant digits (a threshold errs on the tight side)."""
    if not math.isfinite(x) or x <= 0:
        return x
    e = math.floor(math.log10(x)) - 1
    return round(math.floor(x / 10.0**e + 1e-9) * 10.0**e, max(0, -e))


def _name(layer: str) -> str:
    """A layer name for a message (the root module's name is empty)."""
    return repr(layer) if layer else "(the root module)"


def _fmt(x: float) -> str:
    """A number for a message: ``0.93``, ``1.2e+05``, ``nan``."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def _rolling_median(values: Sequence[float], width: int) -> list[float]:
    half = width // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def _nonfinite_value(record: dict[str, Any], key: str) -> bool:
    """Whether ``record[key]`` is present and a non-finite number."""
    value = record.get(key)
    return isinstance(value, float) and not math.isfinite(value)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# ============================================================================================
# The facts every rule reads
# ============================================================================================


class _Facts:
    """Columns of the metrics, the events and the guard's configuration, read once."""

    def __init__(self, log: RunLog) -> None:
        self.log = log
        rows = [r for r in log.metrics if isinstance(r.get("step"), int) and not isinstance(r["step"], bool)]
        self.rows = rows
        self.steps = [int(r["step"]) for r in rows]
        self.loss = [_num(r.get("loss")) for r in rows]
        self.norm = [_num(r.get("grad_norm")) for r in rows]
        self.thr = [_num(r.get("threshold", math.inf)) for r in rows]
        self.lr = [_num(r.get("lr")) for r in rows]
        self.scale = [_num(r.get("loss_scale")) for r in rows]
        self.skipped = [bool(r.get("skipped")) for r in rows]
        self.spike = [bool(r.get("spike")) for r in rows]
        self.amp = [bool(r.get("amp_overflow")) for r in rows]
        self.bad = [
            not self.amp[i]
            and (bool(r.get("nonfinite")) or _nonfinite_value(r, "loss") or _nonfinite_value(r, "grad_norm"))
            for i, r in enumerate(rows)
        ]
        self.ok = [
            not self.bad[i] and not self.skipped[i] and not self.amp[i] and math.isfinite(self.norm[i])
            for i in range(len(rows))
        ]
        self.events = [e for e in log.events if isinstance(e, dict)]
        data_steps = {
            e["step"]
            for e in self.events
            if e.get("type") == "nonfinite" and e.get("phase") == "data" and isinstance(e.get("step"), int)
        }
        self.data_bad = {i for i, s in enumerate(self.steps) if s in data_steps}
        self.lone = self._lone_bad()
        for e in self.events:
            if e.get("type") == "spike" and isinstance(e.get("step"), int):
                self._mark(self.spike, e["step"])
        self.layers = self._layer_names()
        config = log.meta.get("config") if isinstance(log.meta.get("config"), dict) else {}
        self.clip_spec = str(config.get("clip")) if config and config.get("clip") is not None else None
        self.clip_kind = self._clip_kind()

    def _lone_bad(self) -> set[int]:
        """Non-finite steps between healthy neighbours: finite norms close to the recent median on
        both sides, no other non-finite step next to them (the signature of one bad batch)."""
        lone: set[int] = set()
        for i, b in enumerate(self.bad):
            if not b or (i > 0 and self.bad[i - 1]) or (i + 1 < len(self.bad) and self.bad[i + 1]):
                continue
            before = [self.norm[j] for j in range(max(0, i - 20), i) if self.ok[j]]
            after = [self.norm[j] for j in range(i + 1, min(len(self.bad), i + 6)) if self.ok[j]]
            if len(before) < 2 or not after:
                continue
            ref = statistics.median(before)
            if max(before[-5:] + after) < EXPLOSION_FACTOR * ref:
                lone.add(i)
        return lone

    def _mark(self, flags: list[bool], step: int) -> None:
        for i, s in enumerate(self.steps):
            if s == step:
                flags[i] = True

    def index_of(self, step: int) -> int:
        """Index of the first record at or after ``step`` (``len(rows)`` when none)."""
        for i, s in enumerate(self.steps):
            if s >= step:
                return i
        return len(self.steps)

    def _layer_names(self) -> list[str]:
        return self.log.layer_names()

    def layer(self, name: str, key: str) -> list[float]:
        """``layers[name][key]`` per row (nan where absent)."""
        out: list[float] = []
        for r in self.rows:
            layers = r.get("layers")
            entry = layers.get(name) if isinstance(layers, dict) else None
            out.append(_num(entry.get(key)) if isinstance(entry, dict) else math.nan)
        return out

    def _clip_kind(self) -> str:
        """``"none"``, ``"fixed"`` (a constant global-norm threshold), ``"adaptive"`` or ``"other"``."""
        spec = (self.clip_spec or "").strip()
        name = spec.split("(", 1)[0].strip().lower()
        if name in ("autoclip", "zclip", "auto"):
            return "adaptive"
        if name in ("value", "agc", "perlayer"):
            return "other"
        finite = {t for t in self.thr if math.isfinite(t)}
        if name == "norm" or (not spec and len(finite) == 1):
            return "fixed" if finite else "none"
        if not spec and len(finite) > 1:
            return "adaptive"
        return "none"

    @property
    def nonfinite_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "nonfinite"]

    def first_trouble(self) -> tuple[int, str]:
        """Index of the first non-finite (or float32-overflowing) step and why; ``(len, "end")`` if none."""
        first = len(self.rows)
        reason = "end"
        for i, b in enumerate(self.bad):
            if b and i not in self.lone and i not in self.data_bad:
                first, reason = i, "nonfinite"
                break
        for e in self.events:
            if e.get("type") in ("nonfinite", "overflow") and isinstance(e.get("step"), int):
                if e.get("type") == "nonfinite" and e.get("phase") == "data":
                    continue  # a bad batch is not the norm's doing
                i = self.index_of(e["step"])
                if i in self.lone:
                    continue
                if i < first:
                    first, reason = i, "nonfinite" if e["type"] == "nonfinite" else "overflow"
        return first, reason

    def loss_at(self, lo: int, hi: int) -> list[float]:
        return [v for v in self.loss[lo:hi] if math.isfinite(v)]


# ============================================================================================
# The healthy window
# ============================================================================================


def _growth_onset(y: Sequence[float], window: int = _ONSET_WINDOW, min_history: int = _MIN_HEALTHY) -> int:
    """Index where the log-norms ``y`` start a sustained climb; ``len(y)`` when they never do.

    A climb starts at the first ``i`` whose value exceeds the median of the (up to ``window``)
    values before it by ``log(GROWTH_FACTOR)`` (the norm tripled) and whose next
    ``_SUSTAIN`` values stay that high (a lone spike is not a climb), after at least
    ``min_history`` values. Sliding median: O(n·window).
    """
    n = len(y)
    bar = math.log(GROWTH_FACTOR)
    past: list[float] = []  # sorted values of the sliding window
    for i, v in enumerate(y):
        if len(past) >= min_history:
            m = len(past)
            med = past[m // 2] if m % 2 else 0.5 * (past[m // 2 - 1] + past[m // 2])
            if v - med >= bar and all(w - med >= bar for w in y[i + 1 : i + 1 + _SUSTAIN]):
                return i
        bisect.insort(past, v)
        if len(past) > window:
            past.pop(bisect.bisect_left(past, y[i - window]))
    return n


def healthy_window(run: RunLog | str | os.PathLike[str]) -> HealthyWindow:
    """The healthy pre-clip norms of a run: before growth, before the first non-finite step.

    Args:
        run: a :class:`~gradguard.runlog.RunLog` or a path :func:`~gradguard.runlog.read_run` accepts.

    Returns:
        The :class:`HealthyWindow`, with ``max_norm`` the recommended threshold (``None`` when the
        run has no finite norm).
    """
    return _healthy(_Facts(_as_log(run)))


def _healthy(f: _Facts) -> HealthyWindow:
    end, reason = f.first_trouble()
    idx = [i for i in range(end) if f.ok[i] and f.norm[i] > 0]
    y = [math.log(f.norm[i]) for i in idx]
    k = _growth_onset(y)
    onset_step: int | None = None
    if k < len(y):
        rise = max(y[k:]) - statistics.median(y[max(0, k - _ONSET_WINDOW) : k])
        if rise >= math.log(EXPLOSION_FACTOR) or reason != "end":
            onset_step = f.steps[idx[k]]
            reason = "growth"
        else:
            k = len(y)
    window = [i for i in idx[:k] if not f.spike[i]] or idx[:k]
    if len(window) < _MIN_HEALTHY:  # growth from the very start: the first finite norms are all we have
        window = idx[:_MIN_HEALTHY]
    norms = [f.norm[i] for i in window]
    if not norms:
        return HealthyWindow([], None, None, onset_step, reason, math.nan, math.nan, math.nan, None, "")
    p50, p90 = _quantile(norms, 0.5), _quantile(norms, 0.9)
    if not p50 > 0:
        max_norm, rule = None, ""
    elif reason == "end" or len(norms) >= _LONG_WINDOW:  # about the 90th percentile (Tuning Playbook)
        max_norm, rule = _sig_floor(min(p90, 2.0 * p50)), "min(p90, 2 × p50) of the healthy pre-clip norms"
    else:  # a short start of a run that went wrong: its tail may already be climbing
        max_norm, rule = _sig_floor(p50), f"the median of the finite pre-clip norms before the {reason}"
    return HealthyWindow(
        norms=norms,
        first_step=f.steps[window[0]],
        last_step=f.steps[window[-1]],
        onset_step=onset_step,
        end_reason=reason,
        p50=p50,
        p90=p90,
        mean=statistics.fmean(norms),
        max_norm=max_norm,
        rule=rule,
    )


def _clip_advice(max_norm: float) -> dict[str, Any]:
    return {
        "max_norm": max_norm,
        "clip": f"norm:{max_norm:g}",
        "code": f'gradguard.Guard(model, optimizer, clip="norm:{max_norm:g}")  '
        f"# or torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})",
    }


# ============================================================================================
# Rules
# ============================================================================================


class _Context:
    """What the rules share: the facts, the healthy window, and what earlier rules concluded."""

    def __init__(self, f: _Facts) -> None:
        self.f = f
        self.healthy = _healthy(f)
        self.trouble, self.trouble_reason = f.first_trouble()
        self.explosion: Finding | None = None


def _explosion(c: _Context) -> Finding | None:
    """``explosion``: the norm rose ≥ 10× over its healthy median (or ≥ 3× and then went non-finite).

    Evidence: the growth onset and rate, the peak and its z-score against the healthy log-norms,
    the layer whose norm grew first, weight norms growing, the guard's spike and overflow events.
    """
    f, h = c.f, c.healthy
    if not h.norms or not h.p50 > 0:
        return None
    last = h.last_step if h.last_step is not None else -1
    after = [i for i in range(len(f.rows)) if f.steps[i] > last and f.ok[i]]
    peak_i = max(after, key=lambda i: f.norm[i], default=None)
    peak = f.norm[peak_i] if peak_i is not None else math.nan
    ratio = peak / h.p50 if math.isfinite(peak) else math.nan
    went_bad = c.trouble < len(f.rows)
    overflow = [e for e in f.events if e.get("type") == "overflow"]
    big = math.isfinite(ratio) and ratio >= EXPLOSION_FACTOR
    climbed = h.onset_step is not None and went_bad and math.isfinite(ratio) and ratio >= GROWTH_FACTOR
    if not (big or climbed or overflow):
        return None
    if not went_bad and not overflow and f.clip_kind != "fixed":
        # a norm that rose while the loss kept falling (Adam's early steps often do) harmed nothing:
        # an explosion shows in the loss, or in a non-finite step
        losses = f.loss_at(0, len(f.rows))
        k = max(1, min(len(losses) // 10, 50))
        if len(losses) >= 20 and _median(losses[-k:]) < _median(losses[:k]):
            return None
    logs = [math.log(v) for v in h.norms if v > 0]
    sd = statistics.pstdev(logs) if len(logs) > 1 else 0.0
    z = (math.log(peak) - statistics.fmean(logs)) / (sd + 1e-6) if math.isfinite(peak) and logs else math.nan
    first_big = next(
        (
            i
            for i in range(len(f.rows))
            if f.steps[i] > last
            and (not math.isfinite(f.norm[i]) or f.norm[i] >= EXPLOSION_FACTOR * h.p50)
            and not f.amp[i]
        ),
        None,
    )
    onset = (
        h.onset_step if h.onset_step is not None else (f.steps[first_big] if first_big is not None else None)
    )
    evidence: dict[str, Any] = {
        **h.evidence(),
        "onset_step": onset,
        "first_spike_step": f.steps[first_big] if first_big is not None else None,
        "peak_norm": _sig(peak, 4),
        "peak_step": f.steps[peak_i] if peak_i is not None else None,
        "peak_over_healthy_median": _sig(ratio, 3),
        "peak_z_score_log": _sig(z, 3),
        "spike_events": sum(1 for e in f.events if e.get("type") == "spike"),
        "overflow_events": len(overflow),
    }
    # growth rate of the climb (log-linear): ×factor per step
    if onset is not None:
        lo = f.index_of(onset)
        climb = [(f.steps[i], math.log(f.norm[i])) for i in range(lo, c.trouble) if f.ok[i] and f.norm[i] > 0]
        if len(climb) >= 2:
            xs, ys = [s for s, _ in climb], [v for _, v in climb]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            vx = sum((x - mx) ** 2 for x in xs)
            if vx > 0:
                slope = sum((x - mx) * (v - my) for x, v in zip(xs, ys)) / vx
                evidence["growth_per_step"] = _sig(math.exp(slope), 3)
    first_layer = _first_layer_to_grow(f, h)
    if first_layer:
        evidence.update(first_layer)
    weights = _weight_ratios(f)
    if weights:
        top = sorted(weights.items(), key=lambda kv: -kv[1][0])[:5]
        evidence["weight_norm_growth"] = {name: _sig(r, 3) for name, (r, _) in top}
    nonfinite_step = f.steps[c.trouble] if went_bad else None
    evidence["first_nonfinite_step"] = nonfinite_step if c.trouble_reason != "overflow" else None
    located = _first_located(f)
    if located is not None and went_bad:
        evidence["overflowed_in"] = {k: located.get(k) for k in ("phase", "module", "op", "source")}
    severity = "error" if went_bad else "warning"
    if f.clip_kind == "fixed" and not went_bad:
        severity = "info"  # the threshold caught it
    where = f" in layer {_name(evidence['first_layer'])} first" if "first_layer" in evidence else ""
    end = (
        f"; the run went non-finite at step {nonfinite_step}"
        if nonfinite_step is not None and c.trouble_reason != "overflow"
        else ("; float32 could no longer hold the norm" if overflow else "")
    )
    message = (
        f"Gradient explosion: the pre-clip norm rose from a healthy median of {_fmt(h.p50)} to "
        f"{_fmt(peak)} ({_fmt(ratio)}×) starting at step {onset}{where}{end}."
    )
    rec = _clip_advice(h.max_norm) if h.max_norm is not None else {}
    current = [t for t in f.thr if math.isfinite(t)]
    text = (
        f"Clip the global norm at {h.max_norm:g} (from {len(h.norms)} healthy norms, steps "
        f"{h.first_step}–{h.last_step}) and keep on_nonfinite='skip' so a bad step never reaches the weights"
        if h.max_norm is not None
        else "Clip the global norm"
    )
    if current and h.max_norm is not None and min(current) <= h.max_norm:
        text = (
            f"The norm was already clipped at {_fmt(min(current))} and still exploded: lower the learning "
            "rate (3–10×) or add warm-up; clipping alone keeps the step bounded, not the weights"
        )
    rec["text"] = text + "."
    return Finding("explosion", severity, onset, message, evidence, rec)


def _first_layer_to_grow(f: _Facts, h: HealthyWindow) -> dict[str, Any]:
    """The layer whose grad norm first exceeded 10× its own healthy median (or went non-finite)."""
    if h.first_step is None or h.last_step is None or not f.layers:
        return {}
    lo, hi = f.index_of(h.first_step), f.index_of(h.last_step) + 1
    best: tuple[int, float, str] | None = None
    for name in f.layers:
        series = f.layer(name, "grad_norm")
        base = _median([v for v in series[lo:hi] if math.isfinite(v) and v > 0])
        if not base > 0:
            continue
        for i in range(hi, len(series)):
            v = series[i]
            if math.isnan(v) and not f.bad[i]:
                continue
            grown = not math.isfinite(v) or v >= EXPLOSION_FACTOR * base
            if grown:
                score = v / base if math.isfinite(v) else math.inf
                key = (i, -score, name)
                if best is None or key < (best[0], -best[1], best[2]):
                    best = (i, score, name)
                break
    if best is None:
        return {}
    return {
        "first_layer": best[2],
        "first_layer_step": f.steps[best[0]],
        "first_layer_over_its_median": _sig(best[1], 3),
    }


def _weight_ratios(f: _Facts) -> dict[str, tuple[float, int]]:
    """Per layer: (largest finite weight norm after the first / the first measured one, step of it)."""
    out: dict[str, tuple[float, int]] = {}
    for name in f.layers:
        series = [(f.steps[i], v) for i, v in enumerate(f.layer(name, "weight_norm")) if math.isfinite(v)]
        start = next((v for _, v in series if v > 1e-8), None)
        if start is None:
            continue
        peak_step, peak = max(series, key=lambda sv: sv[1])
        if peak / start > 1.0:
            out[name] = (peak / start, peak_step)
    return out


def _first_located(f: _Facts) -> dict[str, Any] | None:
    for e in f.nonfinite_events:
        if e.get("op") or e.get("module") or e.get("located_by") in ("replay", "hooks"):
            return e
    return None


def _is_explosion_event(e: dict[str, Any]) -> bool:
    text = f"{e.get('cause', '')} {e.get('kind_of_fault', '')}".lower()
    return "explosion" in text or "explod" in text


# --- non-finite root cause ------------------------------------------------------------------

_FIXES: list[tuple[re.Pattern[str], str, str]] = [
    (
        re.compile(r"^(_?log_)?softmax$|^_softmax$|^_log_softmax$|attention"),
        "a row whose entries are all -inf (every key masked) gives 0/0; very large logits overflow exp",
        "leave at least one key unmasked per row (or fill the mask with torch.finfo(dtype).min instead of "
        "-inf), and compute the softmax in float32",
    ),
    (
        re.compile(r"^binary_cross_entropy$"),
        "log of a probability that saturated at 0 or 1",
        "use torch.nn.BCEWithLogitsLoss on the logits (or F.logsigmoid) instead of sigmoid + BCELoss",
    ),
    (
        re.compile(r"^log(2|10|1p)?$|^xlogy$"),
        "log of 0 (or of a negative number)",
        "clamp the input: torch.log(x.clamp_min(eps)); for probabilities use F.logsigmoid, log_softmax "
        "or BCEWithLogitsLoss",
    ),
    (
        re.compile(r"^(div|true_divide|reciprocal|rsqrt|remainder|fmod|std|var)"),
        "a zero denominator (a zero count, a zero standard deviation)",
        "divide by y.clamp_min(eps) (or y + eps), and guard empty counts",
    ),
    (
        re.compile(r"^(sqrt|pow|hypot|norm|linalg_vector_norm|cdist|_cdist_backward)$"),
        "sqrt (or a fractional power) at exactly 0: its gradient is infinite there",
        "use torch.sqrt(x + eps), or torch.linalg.vector_norm (finite gradient at 0 since torch 2.13)",
    ),
    (
        re.compile(r"^(exp|expm1|exp2|sinh|cosh|softplus)$"),
        "exp of a large argument overflows",
        "work in log space (torch.logsumexp, log_softmax), clamp the argument, compute in float32",
    ),
    (
        re.compile(r"^ctc_loss$"),
        "a target that cannot be aligned (longer than the input) gives an infinite loss",
        "use torch.nn.CTCLoss(zero_infinity=True) and check target lengths ≤ input lengths",
    ),
    (
        re.compile(r"^atan2$"),
        "atan2 at the origin (0, 0)",
        "add eps to one argument, or mask the origin out",
    ),
    (
        re.compile(r"^(acos|asin|atanh|acosh)$"),
        "an argument outside the function's domain (e.g. |x| > 1 for acos)",
        "clamp the argument into the domain, e.g. x.clamp(-1 + eps, 1 - eps)",
    ),
    (
        re.compile(r"^where$"),
        "torch.where evaluates both branches: the unselected one's NaN gradient still flows",
        "make the unselected branch safe too (apply where to the argument before the unsafe op)",
    ),
]


def _fix_for(event: dict[str, Any]) -> tuple[str, str]:
    """Why the op produced a non-finite value, and the specific fix.

    Uses the locate event's own reason (``evidence["reason"]``, e.g. "log of 0") where there is
    one, and the op's name for the fix.
    """
    op = str(event.get("op") or "").lower().removeprefix("aten::").split(".")[0]
    evidence = event.get("evidence")
    reason = evidence.get("reason") if isinstance(evidence, dict) else None
    text = f"{reason or ''} {event.get('cause') or ''}".lower()
    if "dtype's max" in text or "65504" in text or "float16" in text:
        return (
            str(reason or "a value above float16's largest (65504)"),
            "compute this op in float32 (or autocast to bfloat16, whose range is float32's)",
        )
    if "already in the input" in text:
        return (
            str(reason),
            "the op only passed it on: find where its input became non-finite (an earlier op, or the data)",
        )
    for pattern, why, fix in _FIXES:
        if op and pattern.search(op):
            return str(reason or why), fix
    return (
        str(reason or "its inputs put it at a numerical edge"),
        "check the op's inputs at that line and keep them in range (clamp_min(eps), log-space, float32)",
    )


def _nonfinite(c: _Context, bad_data_steps: set[int]) -> Finding | None:
    """``nonfinite_op``: the first located non-finite value (op, module, source) and its specific fix.

    Not reported where an explosion explains the non-finite step (the answer then is the explosion,
    not the op where the overflow landed) nor for a bad input batch (``bad_data``).
    """
    f = c.f
    events = [
        e for e in f.nonfinite_events if e.get("phase") != "data" and e.get("step") not in bad_data_steps
    ]
    if not events and c.trouble_reason != "nonfinite":
        return None
    if c.explosion is not None and c.explosion.severity == "error":
        return None
    if events and _is_explosion_event(events[0]):
        return None
    located = next((e for e in events if e.get("op")), None)
    event = located or (events[0] if events else None)
    if event is None:
        if f.steps[c.trouble] in bad_data_steps:
            return None
        event = {
            "step": f.steps[c.trouble],
            "phase": None,
            "kind": "nan" if math.isnan(f.loss[c.trouble]) else "inf",
        }
    step = event.get("step") if isinstance(event.get("step"), int) else None
    count = sum(1 for b in f.bad if b)
    evidence: dict[str, Any] = {
        k: event.get(k)
        for k in (
            "phase",
            "module",
            "op",
            "tensor",
            "kind",
            "source",
            "located_by",
            "layers",
            "evidence",
            "cause",
        )
        if event.get(k) is not None
    }
    evidence["nonfinite_steps"] = count
    if event.get("op"):
        why, fix = _fix_for(event)
        where = f" in module {event['module']!r}" if event.get("module") not in (None, "") else ""
        at = f" at {event['source']}" if event.get("source") else ""
        message = (
            f"Step {step}: {event.get('kind', 'a non-finite value')} first came out of `{event['op']}` "
            f"({event.get('phase', '?')}){where}{at}: {why}."
        )
        rec = {"text": f"Fix: {fix}.", "op": event["op"]}
    else:
        phase = event.get("phase")
        what = "the loss" if phase == "loss" else ("the weights" if phase == "optimizer" else "the gradients")
        message = (
            f"Step {step}: {what} became {event.get('kind', 'non-finite')} without a preceding explosion; "
            f"{count} step(s) non-finite in all. The always-on flags do not name the op."
        )
        rec = {
            "text": "Pass a closure, guard.step(closure), so gradguard replays the failed step op by op and "
            "names the op, module and source line; meanwhile on_nonfinite='skip' keeps the weights finite.",
        }
    rec["on_nonfinite"] = "skip"
    return Finding("nonfinite_op", "error", step, message, evidence, rec)


def _bad_data(c: _Context) -> tuple[Finding | None, set[int]]:
    """``bad_data``: a non-finite input batch (a ``data``-phase event), or a lone non-finite step.

    A lone step — healthy norms before it, no climb, finite steps again after it was skipped — is
    the signature of one bad batch; it is reported as a warning (the always-on flags cannot see
    the batch itself). A confirmed ``data``-phase event is an error.
    """
    f = c.f
    data_events = [e for e in f.nonfinite_events if e.get("phase") == "data"]
    if data_events:
        steps = sorted({e["step"] for e in data_events if isinstance(e.get("step"), int)})
        e0 = data_events[0]
        evidence = {
            k: e0.get(k)
            for k in ("step", "batch", "tensor", "kind", "source", "evidence", "cause")
            if e0.get(k) is not None
        }
        evidence["bad_batches"] = len(steps)
        evidence["bad_steps"] = steps[:50]
        message = (
            f"Step {steps[0] if steps else '?'}: the input batch itself held {e0.get('kind', 'non-finite values')}"
            f" ({len(steps)} bad batch(es) in all); the model is not at fault."
        )
        rec = {
            "text": "Clean the data: drop or repair samples with torch.isfinite(x).all() in the dataset or "
            "collate_fn; meanwhile on_nonfinite='skip' drops those steps without touching the weights.",
            "on_nonfinite": "skip",
            "code": "assert torch.isfinite(x).all(), 'non-finite input'",
        }
        return Finding("bad_data", "error", steps[0] if steps else None, message, evidence, rec), set(steps)
    # heuristic: isolated non-finite steps amid healthy ones
    bad_idx = [i for i, b in enumerate(f.bad) if b]
    lone = sorted(f.lone)
    if not lone or len(lone) < len(bad_idx) / 2:
        return None, set()
    h = c.healthy
    steps = [f.steps[i] for i in lone]
    evidence = {
        "bad_steps": steps[:50],
        "lone_nonfinite_steps": len(steps),
        "nonfinite_steps": len(bad_idx),
        "healthy_p50": _sig(h.p50, 4),
        "located_by": "norm",
    }
    message = (
        f"Step {steps[0]}: a lone non-finite step ({len(steps)} in all) between healthy steps — the norms "
        "before it were normal and training went on finite after it. The usual cause is a bad batch "
        "(NaN/inf in the inputs or targets); otherwise an op at its numerical edge on that batch only."
    )
    rec = {
        "text": f"Check the batch of step {steps[0]} with torch.isfinite(x).all() (inputs and targets); "
        "keep on_nonfinite='skip' meanwhile. guard.step(closure) lets gradguard replay the step and tell "
        "the data from an op.",
        "on_nonfinite": "skip",
    }
    return Finding("bad_data", "warning", steps[0], message, evidence, rec), set(steps)


def _divergence(c: _Context) -> Finding | None:
    """``divergence``: the loss grew ≥ 100× above its best and ≥ 10× above its start while finite.

    Finiteness is not health: a z-score clipper can keep every value finite while the loss climbs
    to 1e17. Reported when no non-finite step follows (then the explosion tells the story).
    Weight norms growing by ≥ 100× while finite are evidence too.
    """
    f = c.f
    idx = [i for i in range(len(f.rows)) if math.isfinite(f.loss[i]) and not f.skipped[i]]
    if len(idx) < _SMOOTH:
        return None
    smooth = _rolling_median([f.loss[i] for i in idx], _SMOOTH)
    start = smooth[0]
    best = math.inf
    best_at = 0
    hit: int | None = None
    for j, v in enumerate(smooth):
        if v < best:
            best, best_at = v, j
        floor = max(abs(best), _TINY) if best > 0 else max(abs(start), _TINY)
        if v - best >= (DIVERGENCE_FACTOR - 1) * floor and v >= DIVERGENCE_START_FACTOR * max(
            abs(start), _TINY
        ):
            hit = j
            break
    if hit is None:
        return None
    step = f.steps[idx[hit]]
    if any(f.bad[i] for i in range(idx[hit], len(f.rows))):
        return None  # it went non-finite after all: the explosion finding covers it
    peak = max(smooth[hit:])
    final = smooth[-1]
    evidence: dict[str, Any] = {
        "loss_start": _sig(start, 4),
        "loss_best": _sig(best, 4),
        "loss_best_step": f.steps[idx[best_at]],
        "loss_peak": _sig(peak, 4),
        "loss_final": _sig(final, 4),
        "all_finite": not any(f.bad),
    }
    weights = _weight_ratios(f)
    grown = {n: _sig(r, 3) for n, (r, _) in weights.items() if r >= DIVERGENCE_FACTOR}
    if grown:
        evidence["weight_norm_growth"] = grown
    message = (
        f"Divergence without NaN: from step {step} the loss climbed from its best {_fmt(best)} to "
        f"{_fmt(peak)} (it started at {_fmt(start)}) while every value stayed finite — finiteness is not health."
    )
    rec: dict[str, Any] = {
        "text": "Lower the learning rate (3–10×) or add warm-up; a spike-only clipper keeps values finite but "
        "does not stop a climb.",
    }
    h = c.healthy
    if h.max_norm is not None and h.onset_step is not None:
        rec.update(_clip_advice(h.max_norm))
        rec["text"] += (
            f" A fixed threshold at {h.max_norm:g} (the healthy norms before step {h.onset_step}) bounds every step."
        )
    return Finding("divergence", "error", step, message, evidence, rec)


def _over_clipping(c: _Context) -> Finding | None:
    """``over_clipping``: a fixed threshold clips > 50% of the steps of a window (the last quarter).

    Evidence: the clip rate (window and whole run), median pre-clip norm / threshold, the effective
    learning-rate scale (median of ``threshold / norm`` capped at 1) and the loss's progress, against
    the unclipped steps where there are some. Adaptive clippers (AutoClip p10, ZClip, auto) clip
    most steps by design: judged by the loss's progress only (a warning when it made none).
    """
    f, h = c.f, c.healthy
    if f.clip_kind not in ("fixed", "adaptive"):
        return None
    idx = [i for i in range(c.trouble) if f.ok[i] and math.isfinite(f.thr[i]) and f.thr[i] > 0]
    if len(idx) < 10:
        return None
    clipped = [f.norm[i] > f.thr[i] * (1 + 1e-6) for i in idx]
    width = max(10, min(500, len(idx) // 4))
    win = idx[-width:]
    win_clipped = clipped[-width:]
    rate = sum(win_clipped) / len(win)
    overall = sum(clipped) / len(idx)
    losses = f.loss_at(idx[0], idx[-1] + 1)
    k = max(1, min(len(losses) // 10, 50))
    loss_start = _median(losses[:k])
    loss_end = _median(losses[-k:])
    progress = (
        1 - loss_end / loss_start if loss_start and math.isfinite(loss_start) and loss_start > 0 else math.nan
    )
    if f.clip_kind == "adaptive" and (c.explosion is not None or c.trouble < len(f.rows)):
        return None
    if f.clip_kind == "adaptive" and not (
        rate > OVERCLIP_RATE and math.isfinite(progress) and progress < 0.1
    ):
        return None
    if rate <= OVERCLIP_RATE:
        return None
    thr = _median([f.thr[i] for i in win])
    med_norm = _median([f.norm[i] for i in win])
    coefs = [min(1.0, f.thr[i] / f.norm[i]) for i in win if f.norm[i] > 0]
    scale = _median(coefs)
    lrs = [f.lr[i] for i in win if math.isfinite(f.lr[i])]
    lr = _median(lrs) if lrs else math.nan
    evidence: dict[str, Any] = {
        "clipper": f.clip_spec,
        "clip_rate_window": round(rate, 4),
        "window_steps": [f.steps[win[0]], f.steps[win[-1]]],
        "clip_rate_overall": round(overall, 4),
        "threshold": _sig(thr, 4),
        "median_norm": _sig(med_norm, 4),
        "median_norm_over_threshold": _sig(med_norm / thr, 3) if thr > 0 else None,
        "effective_lr_scale": _sig(scale, 3),
        "lr": lr if math.isfinite(lr) else None,
        "effective_lr": _sig(lr * scale, 3) if math.isfinite(lr) else None,
        "loss_start": _sig(loss_start, 4),
        "loss_end": _sig(loss_end, 4),
        "loss_progress": _sig(progress, 3),
    }
    # progress per step after clipped vs unclipped steps, where both exist
    deltas: dict[bool, list[float]] = {True: [], False: []}
    for n, i in enumerate(idx[:-1]):
        j = idx[n + 1]
        if math.isfinite(f.loss[i]) and math.isfinite(f.loss[j]):
            deltas[clipped[n]].append(f.loss[j] - f.loss[i])
    if len(deltas[True]) >= 10 and len(deltas[False]) >= 10:
        evidence["loss_change_per_clipped_step"] = _sig(statistics.fmean(deltas[True]), 3)
        evidence["loss_change_per_unclipped_step"] = _sig(statistics.fmean(deltas[False]), 3)
    evidence.update(h.evidence())
    if f.clip_kind == "adaptive":
        message = (
            f"{f.clip_spec} clips {rate:.0%} of the last {len(win)} steps (adaptive clippers do by design), but "
            f"the loss made no progress ({_fmt(loss_start)} → {_fmt(loss_end)})."
        )
        rec: dict[str, Any] = {
            "text": "Try a fixed threshold from the healthy norms, or a lower learning rate."
        }
        if h.max_norm is not None:
            rec.update(_clip_advice(h.max_norm))
        return Finding("over_clipping", "warning", f.steps[win[0]], message, evidence, rec)
    severity = "error" if rate >= OVERCLIP_ERROR_RATE else "warning"
    message = (
        f"Over-clipping: max_norm={_fmt(thr)} clipped {rate:.0%} of the last {len(win)} steps ({overall:.0%} of "
        f"the run); the median pre-clip norm is {_fmt(med_norm / thr)}× the threshold, so every step is "
        f"scaled by ~{_fmt(scale)} — an effective learning rate of {_fmt(lr * scale)} instead of {_fmt(lr)}. "
        f"The loss went {_fmt(loss_start)} → {_fmt(loss_end)}. This stall looks like vanishing gradients."
    )
    # The run's own norms follow a clipped trajectory; its first steps are the closest to the
    # unclipped one (clipping has not moved the weights far yet): never recommend below their median.
    early = [f.norm[i] for i in idx[: min(10, max(3, len(idx) // 20))]]
    early_med = _sig_floor(_median(early))
    evidence["early_median_norm"] = _sig(_median(early), 4)
    candidates = [x for x in (h.max_norm, early_med) if x is not None and math.isfinite(x) and x > 0]
    rec = {}
    if candidates:
        max_norm = max(candidates)
        why = (
            f"the median pre-clip norm of the first {len(early)} steps, before clipping bent the trajectory"
            if max_norm == early_med and max_norm != h.max_norm
            else f"{h.rule} over {len(h.norms)} steps"
        )
        rec.update(_clip_advice(max_norm))
        would = sum(1 for i in idx if f.norm[i] > max_norm) / len(idx)
        rec["expected_clip_rate"] = round(would, 4)
        rec["text"] = (
            f"Raise max_norm to {max_norm:g} ({why}; it would have clipped {would:.0%} of this run's "
            f"steps), or keep the threshold and lower the "
            f"learning rate to ~{_fmt(_sig(lr * scale, 2))} — more than 50% clipped is extremely aggressive."
        )
        if math.isfinite(lr):
            rec["lr"] = _sig(lr * scale, 2)
    return Finding("over_clipping", severity, f.steps[win[0]], message, evidence, rec)


def _lr_too_high(c: _Context) -> Finding | None:
    """``lr_too_high``: a layer's median update/weight ratio ≥ 0.1 while healthy (≈1e-3 is typical),
    or the LR rose ≥ 2× within the few steps before the norm started growing."""
    f, h = c.f, c.healthy
    hi = f.index_of(h.onset_step) if h.onset_step is not None else c.trouble
    warm = max(3, len(f.rows) // 50)
    per_layer: dict[str, float] = {}
    for name in f.layers:
        series = f.layer(name, "update_ratio")
        vals = [series[i] for i in range(warm, hi) if f.ok[i] and math.isfinite(series[i]) and series[i] > 0]
        if vals:
            per_layer[name] = _median(vals)
    worst = max(per_layer.items(), key=lambda kv: kv[1], default=None)
    jump: tuple[int, float, float] | None = None
    if h.onset_step is not None:
        lo_j = max(0, hi - 10)
        for i in range(lo_j + 1, min(hi + 2, len(f.rows))):
            prev = f.lr[i - 1]
            if math.isfinite(prev) and prev > 0 and math.isfinite(f.lr[i]) and f.lr[i] >= LR_JUMP * prev:
                jump = (f.steps[i], prev, f.lr[i])
                break
    high = worst is not None and worst[1] >= UPDATE_RATIO_HIGH
    if not (high or jump):
        return None
    evidence: dict[str, Any] = {
        "update_ratio_median_by_layer": {
            n: _sig(v, 3) for n, v in sorted(per_layer.items(), key=lambda kv: -kv[1])[:8]
        },
        "typical_update_ratio": 1e-3,
    }
    lrs = [v for v in f.lr[:hi] if math.isfinite(v)]
    lr = lrs[-1] if lrs else math.nan
    rec: dict[str, Any] = {}
    parts: list[str] = []
    step: int | None = None
    if jump is not None:
        evidence.update({"lr_jump_step": jump[0], "lr_before": jump[1], "lr_after": jump[2]})
        parts.append(
            f"the learning rate rose from {_fmt(jump[1])} to {_fmt(jump[2])} at step {jump[0]}, "
            f"right before the norm started growing (step {h.onset_step})"
        )
        step = jump[0]
        rec["lr"] = jump[1]
    if high and worst is not None:
        parts.append(
            f"layer {_name(worst[0])} moves {_fmt(worst[1])} of its weight norm per step (median; ~1e-3 is typical)"
        )
        step = step if step is not None else f.steps[min(warm, len(f.steps) - 1)]
        if math.isfinite(lr) and "lr" not in rec:
            rec["lr"] = _sig(lr * min(0.5, 1e-2 / worst[1]), 1)
    evidence["lr"] = lr if math.isfinite(lr) else None
    message = "Learning rate too high: " + "; ".join(parts) + "."
    rec["text"] = (
        f"Lower the learning rate to ~{_fmt(rec['lr'])} (or warm it up)"
        if "lr" in rec
        else "Lower the learning rate"
    ) + "; clipping bounds a step's size but not a learning rate that is too large."
    return Finding("lr_too_high", "warning", step, message, evidence, rec)


def _weight_growth(c: _Context) -> Finding | None:
    """``weight_growth``: a layer's weight norm grew ≥ 10× over its first measured value."""
    f = c.f
    ratios = _weight_ratios(f)
    grown = {n: rs for n, rs in ratios.items() if rs[0] >= WEIGHT_GROWTH_FACTOR}
    if not grown:
        return None
    name, (ratio, at) = max(grown.items(), key=lambda kv: kv[1][0])
    series = [(f.steps[i], v) for i, v in enumerate(f.layer(name, "weight_norm")) if math.isfinite(v)]
    start = next(v for _, v in series if v > 1e-8)
    step = next((s for s, v in series if v >= WEIGHT_GROWTH_FACTOR * start), at)
    evidence = {
        "layers": {n: _sig(r, 3) for n, (r, _) in sorted(grown.items(), key=lambda kv: -kv[1][0])[:8]},
        "layer": name,
        "weight_norm_start": _sig(start, 4),
        "weight_norm_peak": _sig(start * ratio, 4),
        "peak_step": at,
    }
    message = (
        f"Weight growth: the weights of layer {_name(name)} grew {_fmt(ratio)}× (norm {_fmt(start)} → "
        f"{_fmt(start * ratio)}); {len(grown)} layer(s) grew by 10× or more."
    )
    rec = {
        "text": "Weights growing by orders of magnitude go with a too-large learning rate and precede "
        "explosions: lower the LR, add weight decay (AdamW), and clip the global norm.",
    }
    return Finding("weight_growth", "warning", step, message, evidence, rec)


def _vanishing(c: _Context) -> Finding | None:
    """``vanishing``: per-layer grad norms decaying toward the input by ≥ 100× (mostly monotone)."""
    f, h = c.f, c.healthy
    if len(f.layers) < 3 or h.first_step is None or h.last_step is None:
        return None
    lo, hi = f.index_of(h.first_step), f.index_of(h.last_step) + 1
    meds: list[tuple[str, float]] = []
    for name in f.layers:
        series = f.layer(name, "grad_norm")
        vals = [series[i] for i in range(lo, hi) if f.ok[i] and math.isfinite(series[i]) and series[i] > 0]
        if vals:
            meds.append((name, _median(vals)))
    if len(meds) < 3:
        return None
    first, last = meds[0][1], meds[-1][1]
    ratio = last / first
    rising = sum(1 for a, b in itertools.pairwise(meds) if b[1] > a[1]) / (len(meds) - 1)
    if ratio < VANISHING_RATIO or rising < 0.75:
        return None
    evidence = {
        "median_grad_norm_by_layer": {n: _sig(v, 3) for n, v in meds[:40]},
        "output_over_input": _sig(ratio, 3),
        "orders_of_magnitude": round(math.log10(ratio), 1),
        "monotone_fraction": round(rising, 2),
    }
    message = (
        f"Vanishing gradients: the gradient norm falls {round(math.log10(ratio), 1)} orders of magnitude from "
        f"the output-side layer {_name(meds[-1][0])} ({_fmt(last)}) to the input-side layer {_name(meds[0][0])} "
        f"({_fmt(first)})."
    )
    rec = {
        "text": "Use non-saturating activations (ReLU/GELU instead of sigmoid/tanh), residual connections, "
        "normalisation (LayerNorm/BatchNorm) and a matching init (Kaiming/Xavier); for RNNs an LSTM/GRU. "
        "Clipping does not help here (if max_norm clips most steps, see over_clipping).",
    }
    return Finding("vanishing", "warning", h.first_step, message, evidence, rec)


def _loss_scale(c: _Context) -> Finding | None:
    """``loss_scale_collapse``: the guard's ``loss_scale_collapse`` event, or a recorded scale below 1."""
    f = c.f
    event = next((e for e in f.events if e.get("type") == "loss_scale_collapse"), None)
    overflows = sum(1 for a in f.amp if a) or sum(
        1 for e in f.events if e.get("type") == "skip" and e.get("reason") == "amp_overflow"
    )
    if event is None:
        low = next((i for i, s in enumerate(f.scale) if math.isfinite(s) and s < 1.0), None)
        if low is None:
            return None
        event = {"step": f.steps[low], "loss_scale": f.scale[low]}
    scales = [s for s in f.scale if math.isfinite(s)]
    evidence: dict[str, Any] = {
        k: event.get(k)
        for k in ("loss_scale", "floor", "consecutive_overflows", "recent_scales")
        if k in event
    }
    evidence["amp_overflow_steps"] = overflows
    if scales:
        evidence["loss_scale_max"] = max(scales)
        evidence["loss_scale_min"] = min(scales)
    step = event.get("step") if isinstance(event.get("step"), int) else None
    message = (
        f"AMP loss-scale collapse at step {step}: the GradScaler's scale fell to {_fmt(_num(event.get('loss_scale')))} "
        "after repeated overflows — float16 cannot hold these gradients, and every overflow is a skipped step."
    )
    rec = {
        "text": "Train in bfloat16 (torch.autocast(device_type, dtype=torch.bfloat16): float32's range, no scaler), "
        "or lower the learning rate / clip the global norm so the gradients stay in float16's range.",
        "dtype": "bfloat16",
    }
    return Finding("loss_scale_collapse", "error", step, message, evidence, rec)


# ============================================================================================
# Public functions
# ============================================================================================


def _as_log(run: RunLog | str | os.PathLike[str]) -> RunLog:
    return run if isinstance(run, RunLog) else read_run(run)


def _severity_rank(finding: Finding) -> tuple[int, int]:
    rank = SEVERITIES.index(finding.severity) if finding.severity in SEVERITIES else len(SEVERITIES)
    return rank, RULES.index(finding.id) if finding.id in RULES else len(RULES)


def diagnose(run: RunLog | str | os.PathLike[str], *, write: bool = False) -> list[Finding]:
    """Run every rule over a run log; return the findings, most severe first.

    A healthy run gives ``[]``. Rules and thresholds are listed in the module docstring
    (:mod:`gradguard.diagnose`); every threshold recommendation comes from the healthy norms
    (:func:`healthy_window`).

    Args:
        run: a :class:`~gradguard.runlog.RunLog`, a run directory, or a folder of runs (the newest).
        write: also write ``findings.json`` into the run directory (atomically). A run directory
            that cannot be written to is reported with a :class:`RuntimeWarning`, not an error.

    Returns:
        The findings (see :class:`Finding`).

    Raises:
        GradGuardError: ``run`` is a path holding no run directory.

    Example:
        >>> import pathlib, tempfile
        >>> from gradguard.runlog import RunWriter
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with RunWriter(path) as w:
        ...     w.write_metrics([{"step": s, "loss": 1.0 / (s + 1), "grad_norm": 1.0} for s in range(50)])
        >>> diagnose(path)
        []
    """
    log = _as_log(run)
    c = _Context(_Facts(log))
    findings: list[Finding] = []
    bad, bad_steps = _bad_data(c)
    c.explosion = _explosion(c)
    for finding in (
        c.explosion,
        bad,
        _nonfinite(c, bad_steps),
        _divergence(c),
        _over_clipping(c),
        _lr_too_high(c),
        _weight_growth(c),
        _vanishing(c),
        _loss_scale(c),
    ):
        if finding is not None:
            findings.append(finding)
    findings.sort(key=_severity_rank)
    if write:
        write_findings(log, findings)
    return findings


def write_findings(log: RunLog, findings: Iterable[Finding]) -> None:
    """Write ``findings.json`` (a list of finding objects) into the run directory, atomically."""
    try:
        atomic_write_json(log.path / FINDINGS_FILE, [x.as_dict() for x in findings])
    except OSError as e:
        warnings.warn(
            f"could not write {FINDINGS_FILE} into {str(log.path)!r} ({e.strerror or e}); the findings are "
            "still returned. Copy the run directory somewhere writable to keep them.",
            RuntimeWarning,
            stacklevel=2,
        )


def first_nonfinite(run: RunLog | str | os.PathLike[str]) -> dict[str, Any] | None:
    """The first ``nonfinite`` event of the run (DESIGN.md's fields), or ``None``.

    Where the earliest failing step has several events (the always-on one and a located one),
    the reader's choice (``RunLog.first_nonfinite``: the most precise) is taken.
    """
    log = _as_log(run)
    pick = getattr(log, "first_nonfinite", None)  # the reader's own choice, where it has one
    return pick() if callable(pick) else log.first_event("nonfinite")


def recommended_max_norm(findings: Iterable[Finding]) -> float | None:
    """The first recommended clip threshold among ``findings`` (most severe first), or ``None``."""
    for finding in findings:
        value = finding.recommendation.get("max_norm")
        if isinstance(value, (int, float)) and _finite(value):
            return float(value)
    return None


def to_json(findings: Iterable[Finding], run: RunLog) -> dict[str, Any]:
    """The ``gradguard diagnose --json`` object.

    ``{"findings": [...], "first_nonfinite": <the first nonfinite event> | null, "run": path,
    "reader_notes": [...]}``.
    """
    return {
        "findings": [x.as_dict() for x in findings],
        "first_nonfinite": first_nonfinite(run),
        "run": str(run.path),
        "reader_notes": list(run.skipped),
    }
