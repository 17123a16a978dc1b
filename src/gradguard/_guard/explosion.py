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
   The norm watched is the one the step applied, after the guard's clipping
   (:func:`gradguard.runtable.post_clip_norm`; unclipped: the norm): a climb the clipper holds is
   no explosion to rewind. No host read is added: a step's norm is looked at only when it already
   is on the host;
2. **rewind** to the newest snapshot from before the onset (:meth:`Recovery.before`; the recovery
   keeps two, and takes none while the norm climbs). The steps since are undone; the batches they
   used are not seen again: in a plain loop the script simply goes on with its next batches, so
   the batches of the bad window are skipped, as in PaLM's procedure. Later climbs are measured
   from the norm the restored state gave;
3. **tighten**: from the restored state on, every step is also bounded by ``auto``'s rule
   (:class:`gradguard.clip.Auto` with :data:`BOUND`, fresh: under SGD-like optimizers, whose step
   is lr × the gradient, no step longer than half the Polyak step f/‖g‖², ramped up over its first
   25 steps, and following the learning rate at every step — a warm-up still under way, a
   schedule; ZClip's spike and growth caps), on top of the guard's own clipper (the smaller threshold wins). An
   unclipped run that explodes then trains like a clipped one: on ``benchmarks/recovery.py`` (the
   ``pascanu.py`` family, 5 seeds) it rescues 47 of the 58 unclipped runs that explode, where a
   clip at the healthy median norm (the previous rule) rescued 19: that bound is fixed, too loose
   at high learning rates and too tight for the char-LSTM, whose norm grows as it learns.
   Adam-like optimizers take steps of about lr per element whatever the gradient's norm (``auto``
   only clips spikes there): they are clipped at the healthy norm scale instead — the median norm
   before the onset, over at least :data:`SETTLE` healthy steps, or a tenth of the first norm
   for a run that climbed from its first steps. SGD with momentum gets both (its update is up to
   1/(1 − β) × the clipped gradient, which the Polyak cap does not see: :meth:`Explosions._momentum`).
   With ``lr_backoff`` the learning rate is multiplied by it too;
4. **a further recovery** (the bound halved, :data:`TIGHTEN`: the Polyak fraction, or the
   threshold) when the bound does not hold: a climb under it, a non-finite step, or a loss that
   diverges in a window of :data:`PROBE` steps after the rewind (:meth:`Explosions._relapse`: the
   norm stays bounded, but the steps are still too long and the run wanders at a higher loss);
5. **bounded**: recoveries are rollbacks, counted against ``max_rollbacks`` within
   ``rollback_window`` steps (and ``min_lr``); one more stops the run (``NonFiniteError``, an
   ``abort`` event), the model restored.

Every onset is an ``explosion`` event (what was done: ``action`` ``"warn"`` or ``"recover"``, the
snapshot rewound to, the bound now: ``clip="auto"`` and its ``polyak`` fraction, or ``max_norm``;
the learning rate), followed by the ``rollback`` (and
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
from gradguard.clip import PLAIN_UPDATE, Auto, coefficient, fraction_clipped
from gradguard.errors import check_state_version
from gradguard.record import DECIDED
from gradguard.runtable import (
    EXPLOSION_FACTOR,
    GROWTH_FACTOR,
    MIN_HISTORY,
    ONSET_WINDOW,
    SUSTAIN,
    climb_onset,
    post_clip_norm,
)

__all__ = ["BOUND", "PROBE", "SETTLE", "TIGHTEN", "Explosion", "ExplosionWatch", "Explosions", "read_step"]

SETTLE = 50
"""A climb that held this many steps without rising :data:`~gradguard.runtable.EXPLOSION_FACTOR` ×
is a new level of the norm, not an explosion: the watch measures later climbs from it."""
TIGHTEN = 0.5
"""Each recovery after the first multiplies the recovery's bound by this (``auto``'s Polyak fraction,
or the clip threshold)."""
BOUND: dict[str, Any] = {"polyak": 0.5, "first": 0.5, "ramp": True}
"""The recovery's bound under SGD: :class:`~gradguard.clip.Auto` with these settings — ``auto``'s
Polyak rule (half the Polyak step, ramped up over 25 steps; half the first norm without a loss), the
configuration ``benchmarks/recovery.py`` measured. Pinned, not ``Auto.SPEC``: a change to ``auto``
reaches the recovery only once it is measured there."""
PROBE = SETTLE
"""Steps after a rewind whose losses say whether its bound holds (:meth:`Explosions._relapse`)."""
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
    """The guard's ``on_explosion`` policy: the watch, the recovery's bound, the response.

    Args:
        policy: ``"ignore"``, ``"warn"`` (an ``explosion`` event) or ``"recover"`` (rewind, tighten).
        recovery: the guard's snapshots (``keep_earlier`` under ``"recover"``).
    """

    def __init__(self, policy: str, recovery: Recovery) -> None:
        self.policy = policy
        self.recovery = recovery
        self.watch = ExplosionWatch()
        self.cap: float | None = None  # Adam-like, SGD with momentum: the recovery's clip threshold
        self.bound: Auto | None = None  # SGD-like optimizers: auto's step bound, from the restored state on
        self.recoveries = 0
        self.seen_until = -1  # steps up to this one are not looked at again (a rewind undid them)
        self.rewound_at: int | None = None  # the step whose host decision was a rewind
        self.probe: list[float] | None = None  # after a recovery: the losses of the window under way
        self.probe_ref: float | None = None  # the loss the window is compared with (None: the first window)
        self.probe_from = 0  # where a rise seen at the window's end may have begun
        if self.recovers:  # no snapshot while the norm climbs, nor in the first window after a rewind
            recovery.healthy = lambda: self.watch.calm and (self.probe is None or self.probe_ref is not None)

    @property
    def active(self) -> bool:
        return self.policy != "ignore"

    @property
    def recovers(self) -> bool:
        return self.policy == "recover"

    @property
    def tightened(self) -> bool:
        """A recovery bounds the steps from now on (:meth:`tighten`)."""
        return self.bound is not None or self.cap is not None

    # ------------------------------------------------------------------ the step
    def initial_snapshot(self, step: int) -> None:
        """Under ``"recover"``, before the first step (and after the snapshots were forgotten): the
        initial state is the first healthy snapshot (the state step ``step`` measures)."""
        if self.recovers and self.recovery.snapshot is None:
            self.recovery.take(step - 1)

    def tighten(self, plan: ClipPlan, m: Measurement, consts: Constants) -> ClipPlan:
        """The step's clip plan under the recovery's bound (the smaller threshold wins); no host read."""
        if not self.tightened:
            return plan
        cap = None if self.cap is None else consts.number(self.cap, m.device)
        if self.bound is not None:
            self.bound.observe_loss(m.values[0])  # the loss as measured (0 without one: the first-norm cap)
            tau = self.bound.threshold(m.observed(consts, read_only=True)).to(m.device)  # (a clip.Auto)
            cap = tau if cap is None else cap.minimum(tau)
        assert cap is not None
        threshold = cap if plan.threshold is None else plan.threshold.minimum(cap)
        coef = coefficient(m.total, threshold)
        return ClipPlan(coef, threshold, plan.spike, fraction_clipped(coef))

    def see_step(self, step: int, vals: Mapping[str, float]) -> Explosion | None:
        """A host-decided step's norm (from :func:`read_step`)."""
        if vals["amp_overflow"] or step <= self.seen_until:
            return None
        return self._see(step, self._watched(vals), vals["loss"])

    def see_records(self, records: Iterable[Mapping[str, Any]]) -> Explosion | None:
        """The flushed records the host had not decided (the sync-free path); the first explosion."""
        for rec in records:
            if rec.get(DECIDED) or rec["amp_overflow"] or rec["step"] <= self.seen_until:
                continue
            found = self._see(rec["step"], self._watched(rec), rec["loss"])
            if found is not None:
                return found
        return None

    def _see(self, step: int, norm: float, loss: float) -> Explosion | None:
        """One step's watched norm and loss; the explosion it confirms. After a recovery a
        non-finite step is one too, climb or not (the recovery's bound holds the norm the watch
        sees: a run that still goes non-finite under it needs a tighter one), and so is a loss that
        rose (:meth:`_relapse`). Both are bounded by ``max_rollbacks``."""
        found = self.watch.add(step, norm)
        if found is not None or not self.tightened or step <= self.watch.reported:
            return found
        onset = self._relapse(step, loss) if math.isfinite(norm) else step
        if onset is None:
            return None
        self.watch.reported = step
        held = self.watch.norms[-ONSET_WINDOW:]
        baseline = statistics.median(held) if held else math.nan
        return Explosion(onset, baseline, max(held, default=baseline), step, len(held))

    def _relapse(self, step: int, loss: float) -> int | None:
        """Whether the loss since the last rewind shows its bound too loose; the step where the
        rise may have begun, or ``None``. The losses come in windows of :data:`PROBE` steps: the
        median of a window's second half is compared with the median of the first
        :data:`~gradguard.runtable.MIN_HISTORY` losses after the rewind (then with the previous
        window's second half); a rise by more than its magnitude is a *divergence* (``tunelog``'s
        definition for a trial). A threshold that lets through steps of lr × threshold that are
        still too long keeps the norm bounded, but the run wanders at a loss above where it was
        rewound to (adding problem at lr 1: 2–4× the restored state's loss; rescued runs fall to
        a fifth of it or less)."""
        if self.probe is None:
            return None
        self.probe.append(loss if math.isfinite(loss) else math.inf)
        if len(self.probe) < PROBE:
            return None
        ref = statistics.median(self.probe[:MIN_HISTORY]) if self.probe_ref is None else self.probe_ref
        later = statistics.median(self.probe[PROBE // 2 :])
        onset = self.probe_from
        self.probe, self.probe_ref, self.probe_from = [], later, step + 1 - (PROBE - PROBE // 2)
        return onset if later - ref > abs(ref) else None

    def _watched(self, rec: Mapping[str, Any]) -> float:
        """The norm a step is watched by (NaN: a non-finite step): the norm the step applied, after
        the guard's clipping (:func:`gradguard.runtable.post_clip_norm`). A climb the clipper holds
        is not an explosion: ``auto`` bounds the update, and the raw norm of an RNN learning a long
        dependency climbs 10× under it (order-20 at lr 0.1: watching the raw norm, recovery cut
        those runs to a tenth of their scale and lost 4 of 5). After a recovery its bound holds the
        norm: the bound is kept (a climb under it still counts), non-finite steps call the next
        recovery (:meth:`_see`)."""
        return math.nan if rec["nonfinite"] else post_clip_norm(rec)

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
        healthy = self._healthy_norm(found, snap["step"])  # before the restart forgets the climb
        self.watch.restart(snap["step"], self._restored_scale(found, snap["step"]))
        lr = float(self.recovery.optimizer.param_groups[0]["lr"])
        if limit is None:
            self.recoveries += 1
            plain = isinstance(self.recovery.optimizer, PLAIN_UPDATE)
            if plain:
                self.bound = self._new_bound()
            if not plain or self._momentum():
                self.cap = self._tighter(found, healthy)
        self.rewound_at = step
        self.probe, self.probe_ref, self.probe_from = ([] if limit is None else None), None, step + 1
        bound = {"clip": "auto", "polyak": self.bound.polyak} if self.bound is not None else {}
        event = events.explosion(
            step, found.onset, action="recover", to_step=snap["step"], max_norm=self.cap, lr=lr,
            recoveries=self.recoveries, **bound, **fields,
        )  # fmt: skip
        return [event, *done], limit, True

    def _healthy_norm(self, found: Explosion, to_step: int) -> float:
        """The healthy norm scale: the median before the onset, or the norm the restored state gave
        where smaller (a run that climbed from its first steps has no healthy median)."""
        first = self.watch.first_after(to_step)
        return found.baseline if first is None else min(found.baseline, first)

    def _restored_scale(self, found: Explosion, to_step: int) -> float:
        """The norm scale the watch measures later climbs from: what the restored state gave (the
        first norm held after ``to_step``), else the healthy median. Not the smaller of the two: a
        state whose norm was above the median (a run that was rewound to its start, where the norm
        is still high) would look like a new climb at once, and every recovery would call the next."""
        first = self.watch.first_after(to_step)
        return found.baseline if first is None else first

    def _tighter(self, found: Explosion, healthy: float) -> float:
        """The recovery's clip threshold: the healthy norm, trusted when it was measured over a
        healthy stretch (:data:`SETTLE` steps). A run that climbed from its first steps never had a
        stable scale — its first norm led into the climb — so it gets a tenth of it
        (1 / ``EXPLOSION_FACTOR``). A further recovery multiplies the threshold that did not hold
        (or the healthy norm since, where smaller: it was measured under that threshold) by
        :data:`TIGHTEN`."""
        if self.cap is not None:
            return TIGHTEN * min(self.cap, healthy)
        return healthy if found.healthy >= SETTLE else healthy / EXPLOSION_FACTOR

    def _momentum(self) -> bool:
        """SGD with momentum: its update is up to 1/(1 − β) × lr × the clipped gradient, which
        ``auto``'s Polyak cap does not see (a known limit of ``auto``: on
        ``benchmarks/transformer_lr.py`` at SGD lr 1, momentum 0.9, its bound lets the run wander at
        4.5 bits/char, the healthy-norm clip trains it); the healthy-norm clip bounds it too."""
        return any(float(g.get("momentum", 0.0) or 0.0) > 0.0 for g in self.recovery.optimizer.param_groups)

    def _new_bound(self, state: dict[str, Any] | None = None) -> Auto:
        """``auto``'s bound, fresh from the restored state (its Polyak fraction halved for each
        recovery after the first), or as saved in ``state``; bound to the optimizer."""
        bound = Auto(**{**BOUND, "polyak": BOUND["polyak"] * TIGHTEN ** max(0, self.recoveries - 1)})
        if state is not None:
            bound.load_state_dict(state)
        bound.attach(self.recovery.optimizer)
        return bound

    def rewound(self, step: int) -> bool:
        """Whether ``step``'s host decision was a rewind (its events are written already)."""
        return self.rewound_at == step

    # ------------------------------------------------------------------ state
    def state_dict(self, pending: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """The watch and the probe (with the ``pending`` records the next flush will show them),
        the recovery's bound (``auto``'s state, or the clip threshold), the recoveries so far."""
        watch, probe = self.watch, None if self.probe is None else list(self.probe)
        rows = [r for r in pending if not r.get(DECIDED)]
        if rows and self.active:
            watch = ExplosionWatch()
            watch.load_state_dict(self.watch.state_dict())
            for rec in rows:
                if not rec["amp_overflow"] and rec["step"] > self.seen_until:
                    watch.add(rec["step"], self._watched(rec))
                    if probe is not None and len(probe) < PROBE - 1:  # the flush judges a full window
                        probe.append(rec["loss"] if math.isfinite(rec["loss"]) else math.inf)
        return {
            "version": _STATE_VERSION,
            "watch": watch.state_dict(),
            "cap": self.cap,
            "bound": None if self.bound is None else self.bound.state_dict(),
            "probe": probe,
            "probe_ref": self.probe_ref,
            "probe_from": self.probe_from,
            "recoveries": self.recoveries,
            "seen_until": self.seen_until,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state_version(state, _STATE_VERSION, "explosion", "Pass what Guard.state_dict() returned.")
        self.watch.load_state_dict(state["watch"])
        self.cap = None if state["cap"] is None else float(state["cap"])
        self.bound = None if state.get("bound") is None else self._new_bound(state["bound"])
        probe = state.get("probe")
        self.probe = None if probe is None else [float(v) for v in probe]
        self.probe_ref = None if state.get("probe_ref") is None else float(state["probe_ref"])
        self.probe_from = int(state.get("probe_from", 0))
        self.recoveries = int(state["recoveries"])
        self.seen_until = int(state["seen_until"])
