"""``on_explosion``: see the onset of an explosion of the gradient norm while it is still finite, and
recover from it — PaLM's procedure, automated.

Skipping non-finite steps does not save a run whose norm explodes: the norm grows by orders of
magnitude over a few dozen steps while every value is finite, and by the first non-finite step the
weights are wrecked. Large runs are saved by hand instead (PaLM: restart from a checkpoint about
100 steps before the spike and skip the few hundred batches around it). ``on_explosion="recover"``
does that inside the loop:

1. **see the onset** (:class:`ExplosionWatch`): the host norms the guard already has — on the
   host-decided path the one read a step makes anyway carries the norm with the skip flag
   (:func:`read_step`); on the sync-free paths the records of each flush (every ``every`` steps)
   — go through :func:`gradguard.runtable.climb_onset`, the one definition of an explosion's onset
   that ``gradguard diagnose`` uses: a climb to :data:`~gradguard.runtable.GROWTH_FACTOR` × the
   median norm before it, held for :data:`~gradguard.runtable.SUSTAIN` steps, that rose
   :data:`~gradguard.runtable.EXPLOSION_FACTOR` × over that median (or ended in a non-finite step).
   No host read is added: a step's norm is looked at only when it already is on the host;
2. **rewind** to the newest snapshot from before the onset (:meth:`Recovery.before`; the recovery
   keeps two, and takes none while the norm climbs). The steps since are undone; the batches they
   used are not seen again: in a plain loop the script simply goes on with its next batches, so
   the batches of the bad window are skipped, as in PaLM's procedure;
3. **tighten**: every later step is clipped at the healthy norm scale on top of the guard's own
   clipper (the smaller threshold wins): the median norm before the onset, measured over at least
   :data:`SETTLE` healthy steps; a run that climbed from its first steps never had a stable scale
   (its first norm led into the climb), so it gets a tenth of that norm. Each further recovery
   halves the threshold (:data:`TIGHTEN`). With ``lr_backoff`` the learning rate is multiplied by
   it too. Measured on Pascanu's adding problem (``benchmarks/recovery.py``), clipping rescues
   more runs than lowering the learning rate, which only slows the run down;
4. **bounded**: recoveries are rollbacks, counted against ``max_rollbacks`` within
   ``rollback_window`` steps (and ``min_lr``); one more stops the run (``NonFiniteError``, an
   ``abort`` event), the model restored.

Every onset is an ``explosion`` event (what was done: ``action`` ``"warn"`` or ``"recover"``, the
snapshot rewound to, the clip threshold and learning rate now), followed by the ``rollback`` (and
``lr_backoff``) events of the rewind. Under torch.distributed the norms the guard records are the
globally reduced ones, so every rank sees the same onset at the same step and rewinds alike.

The onset is confirmed :data:`~gradguard.runtable.SUSTAIN` steps after it on the host-decided path;
on the sync-free paths at the first flush after that (``every`` bounds the delay).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gradguard import events
from gradguard._guard.clipping import ClipPlan
from gradguard._guard.measure import Constants, Measurement
from gradguard._guard.recovery import Limit, Recovery
from gradguard._guard.row import host_values
from gradguard.clip import coefficient, fraction_clipped
from gradguard.errors import check_state_version
from gradguard.record import DECIDED
from gradguard.runtable import (
    EXPLOSION_FACTOR,
    GROWTH_FACTOR,
    MIN_HISTORY,
    ONSET_WINDOW,
    SUSTAIN,
    climb_onset,
)

__all__ = ["SETTLE", "TIGHTEN", "Explosion", "ExplosionWatch", "Explosions", "read_step"]

SETTLE = 50
"""A climb that held this many steps without rising :data:`~gradguard.runtable.EXPLOSION_FACTOR` ×
is a new level of the norm, not an explosion: the watch measures later climbs from it."""
TIGHTEN = 0.5
"""Each recovery after the first multiplies the recovery's clip threshold by this."""
_KEEP = 2 * ONSET_WINDOW  # norms the watch keeps while no climb is in sight (it trims to half)
_STATE_VERSION = 1


@dataclass(frozen=True)
class Explosion:
    """An explosion's onset, confirmed at step ``at``: the climb began at ``onset``; ``baseline``
    is the median norm before it, ``peak`` the largest norm since; ``healthy``: how many measured
    norms came before the onset (a run that climbed from its first steps has a handful)."""

    onset: int
    baseline: float
    peak: float
    at: int
    healthy: int


def read_step(row: Tensor) -> dict[str, float]:
    """The step's one host read on the host-decided path when explosions are watched: the whole
    row (the skip flag, with the norm and the flags that say what the norm is worth)."""
    return host_values(row)  # host sync: the step's one read (it replaces bool(skip))


class ExplosionWatch:
    """The norms of the steps seen (host values), and whether they show an explosion's onset.

    :meth:`add` takes one step's norm. It runs :func:`gradguard.runtable.climb_onset` only while
    a climb may be under way (a norm reached ``GROWTH_FACTOR`` × the median before it); otherwise
    a step costs an insertion into a sorted window.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.norms: list[float] = []
        self.watching = False  # a climb may be under way: snapshots wait, every step is checked
        self.trouble = False  # a non-finite step came after the norms held
        self.seeded = 0  # the first norms held stand for a restored state's scale (restart), not measured
        self.reported = -(2**62)  # the onset of the last explosion answered
        self._window: list[float] = []  # the last ONSET_WINDOW norms, sorted

    @property
    def calm(self) -> bool:
        """No climb under way: a snapshot taken now is from before any onset still to come."""
        return not self.watching

    def add(self, step: int, norm: float) -> Explosion | None:
        """One step's norm (NaN / inf: a non-finite step); the explosion it confirms, if any."""
        if not math.isfinite(norm):
            if not self.norms:
                return None
            self.trouble = True
            return self._check()
        if norm <= 0.0:
            return None
        if len(self._window) >= MIN_HISTORY and norm >= GROWTH_FACTOR * self._low_median():
            self.watching = True
        self._append(step, norm)
        if self.watching:
            return self._check()
        if len(self.norms) > _KEEP:
            self._keep_from(len(self.norms) - _KEEP // 2)
        return None

    def first_after(self, step: int) -> float | None:
        """The first norm held of a step after ``step`` (what the state after ``step`` gave), or ``None``."""
        i = bisect.bisect_right(self.steps, step)
        return self.norms[i] if i < len(self.steps) else None

    def restart(self, until: int | None, healthy: float | None = None) -> None:
        """Forget the norms of steps after ``until`` (``None``: all): the run was rewound to the
        state they came from, or the climb was reported and its level is the new normal.
        ``healthy``: the norm scale of the state rewound to; where fewer than
        :data:`~gradguard.runtable.MIN_HISTORY` norms are left, it stands for the missing ones (a
        climb from the restored state is then seen from its first steps)."""
        keep = 0 if until is None else bisect.bisect_right(self.steps, until)
        del self.steps[keep:]
        del self.norms[keep:]
        self.seeded = min(self.seeded, keep)
        if healthy is not None and until is not None and keep < MIN_HISTORY:
            missing = MIN_HISTORY - keep
            self.steps[:0] = range(until - keep - missing + 1, until - keep + 1)
            self.norms[:0] = [healthy] * missing
            self.seeded += missing
        self._keep_from(0)
        self.watching = self.trouble = False

    def _low_median(self) -> float:
        """The lower median of the window: at most the median :func:`climb_onset` compares with."""
        return self._window[(len(self._window) - 1) // 2]

    def _append(self, step: int, norm: float) -> None:
        self.steps.append(step)
        self.norms.append(norm)
        bisect.insort(self._window, norm)
        if len(self._window) > ONSET_WINDOW:
            old = self.norms[-ONSET_WINDOW - 1]
            del self._window[bisect.bisect_left(self._window, old)]

    def _keep_from(self, start: int) -> None:
        """Keep the norms from index ``start`` on; the window is rebuilt from them."""
        del self.steps[:start]
        del self.norms[:start]
        self.seeded = max(0, self.seeded - start)
        self._window = sorted(self.norms[-ONSET_WINDOW:])

    def _check(self) -> Explosion | None:
        """Whether the norms held show an explosion's onset (the runtable's definition)."""
        k = climb_onset(self.norms, ends_in_trouble=True)
        if k is None:  # the high norm was a lone spike, the non-finite step a lone bad batch
            self.watching = self.trouble = False
            return None
        self.watching = True
        held = len(self.norms) - 1 - k  # norms after the climb's first one
        if not (self.trouble or held >= SUSTAIN):
            return None  # not confirmed yet
        exploded = self.trouble or climb_onset(self.norms, ends_in_trouble=False) is not None
        if exploded and self.steps[k] > self.reported:
            self.reported = self.steps[k]  # one explosion, one answer
            before = self.norms[max(0, k - ONSET_WINDOW) : k]
            peak = max(self.norms[k:])
            return Explosion(self.steps[k], statistics.median(before), peak, self.steps[-1], k - self.seeded)
        if held > SETTLE:  # a new level (or an explosion answered): later climbs are measured from it
            self._keep_from(k)
            self.watching = False
            return self._check() if len(self.norms) > MIN_HISTORY else None
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "norms": list(self.norms),
            "watching": self.watching,
            "trouble": self.trouble,
            "seeded": self.seeded,
            "reported": self.reported,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self.norms = [float(v) for v in state["norms"]]
        self._keep_from(0)
        self.watching, self.trouble = bool(state["watching"]), bool(state["trouble"])
        self.seeded, self.reported = int(state["seeded"]), int(state["reported"])


class Explosions:
    """The guard's ``on_explosion`` policy: the watch, the recovery's clip threshold, the response.

    Args:
        policy: ``"ignore"``, ``"warn"`` (an ``explosion`` event) or ``"recover"`` (rewind, tighten).
        recovery: the guard's snapshots (``keep_earlier`` under ``"recover"``).
    """

    def __init__(self, policy: str, recovery: Recovery) -> None:
        self.policy = policy
        self.recovery = recovery
        self.watch = ExplosionWatch()
        self.cap: float | None = None  # the recovery's clip threshold (None: not tightened)
        self.recoveries = 0
        self.seen_until = -1  # steps up to this one are not looked at again (a rewind undid them)
        self.rewound_at: int | None = None  # the step whose host decision was a rewind
        if self.recovers:
            recovery.healthy = lambda: self.watch.calm

    @property
    def active(self) -> bool:
        return self.policy != "ignore"

    @property
    def recovers(self) -> bool:
        return self.policy == "recover"

    # ------------------------------------------------------------------ the step
    def initial_snapshot(self, step: int) -> None:
        """Under ``"recover"``, before the first step (and after the snapshots were forgotten): the
        initial state is the first healthy snapshot (the state step ``step`` measures)."""
        if self.recovers and self.recovery.snapshot is None:
            self.recovery.take(step - 1)

    def tighten(self, plan: ClipPlan, m: Measurement, consts: Constants) -> ClipPlan:
        """The step's clip plan under the recovery's threshold (the smaller one wins); no host read."""
        if self.cap is None:
            return plan
        cap = consts.number(self.cap, m.device)
        threshold = cap if plan.threshold is None else plan.threshold.minimum(cap)
        coef = coefficient(m.total, threshold)
        return ClipPlan(coef, threshold, plan.spike, fraction_clipped(coef))

    def see_step(self, step: int, vals: Mapping[str, float]) -> Explosion | None:
        """A host-decided step's norm (from :func:`read_step`)."""
        if vals["amp_overflow"] or step <= self.seen_until:
            return None
        return self.watch.add(step, vals["grad_norm"] if not vals["nonfinite"] else math.nan)

    def see_records(self, records: Iterable[Mapping[str, Any]]) -> Explosion | None:
        """The flushed records the host had not decided (the sync-free path); the first explosion."""
        for rec in records:
            if rec.get(DECIDED) or rec["amp_overflow"] or rec["step"] <= self.seen_until:
                continue
            found = self.watch.add(rec["step"], rec["grad_norm"] if not rec["nonfinite"] else math.nan)
            if found is not None:
                return found
        return None

    def snapshot_at_flush(self, records: list[dict[str, Any]]) -> None:
        """Under ``"recover"`` on the sync-free path: a due snapshot at the flush (the state after
        its last step) when none of its steps was non-finite and no climb is under way."""
        if not (self.recovers and records) or any(r["nonfinite"] for r in records):
            return
        step = records[-1]["step"]
        if self.recovery.due(step):
            self.recovery.take(step)

    # ------------------------------------------------------------------ the response
    def respond(self, found: Explosion, step: int) -> tuple[list[events.Event], Limit | None, bool]:
        """Log the explosion; under ``"recover"`` rewind and tighten. Returns the events, the bound
        passed (then the guard stops the run) and whether the model was rewound."""
        self.seen_until = step
        fields = {"baseline_norm": found.baseline, "peak_norm": found.peak}
        if not self.recovers:
            return [events.explosion(step, found.onset, action="warn", **fields)], None, False
        snap = self.recovery.before(found.onset)
        if snap is None:
            note = "no snapshot from before the onset: not rewound"
            return (
                [events.explosion(step, found.onset, action="recover", recovered=False, note=note, **fields)],
                None,
                False,
            )
        limit = self.recovery.limit(step, to=snap, cause="explosion")
        done = self.recovery.rollback(step, back_off=limit is None, to=snap)
        self.recovery.keep_until(snap, step)
        healthy = self._healthy_norm(found, snap["step"])
        self.watch.restart(snap["step"], healthy)
        if limit is None:
            self.recoveries += 1
            self.cap = self._tighter(found, healthy)
        self.rewound_at = step
        lr = float(self.recovery.optimizer.param_groups[0]["lr"])
        event = events.explosion(
            step, found.onset, action="recover", to_step=snap["step"], max_norm=self.cap, lr=lr,
            recoveries=self.recoveries, **fields,
        )  # fmt: skip
        return [event, *done], limit, True

    def _healthy_norm(self, found: Explosion, to_step: int) -> float:
        """The healthy norm scale: the median before the onset, or the norm the restored state gave
        where smaller (a run that climbed from its first steps has no healthy median)."""
        first = self.watch.first_after(to_step)
        return found.baseline if first is None else min(found.baseline, first)

    def _tighter(self, found: Explosion, healthy: float) -> float:
        """The recovery's clip threshold: the healthy norm, trusted when it was measured over a
        healthy stretch (:data:`SETTLE` steps). A run that climbed from its first steps never had a
        stable scale — its first norm led into the climb — so it gets a tenth of it
        (1 / ``EXPLOSION_FACTOR``). Each further recovery multiplies it by :data:`TIGHTEN`."""
        cap = healthy if found.healthy >= SETTLE else healthy / EXPLOSION_FACTOR
        return cap if self.cap is None else TIGHTEN * min(self.cap, cap)

    def rewound(self, step: int) -> bool:
        """Whether ``step``'s host decision was a rewind (its events are written already)."""
        return self.rewound_at == step

    # ------------------------------------------------------------------ state
    def state_dict(self, pending: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """The watch (with the ``pending`` records the next flush will show it), the recovery's
        clip threshold, the recoveries so far."""
        watch = self.watch
        rows = [r for r in pending if not r.get(DECIDED)]
        if rows and self.active:
            watch = ExplosionWatch()
            watch.load_state_dict(self.watch.state_dict())
            for rec in rows:
                if not rec["amp_overflow"] and rec["step"] > self.seen_until:
                    watch.add(rec["step"], rec["grad_norm"] if not rec["nonfinite"] else math.nan)
        return {
            "version": _STATE_VERSION,
            "watch": watch.state_dict(),
            "cap": self.cap,
            "recoveries": self.recoveries,
            "seen_until": self.seen_until,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state_version(state, _STATE_VERSION, "explosion", "Pass what Guard.state_dict() returned.")
        self.watch.load_state_dict(state["watch"])
        self.cap = None if state["cap"] is None else float(state["cap"])
        self.recoveries = int(state["recoveries"])
        self.seen_until = int(state["seen_until"])
