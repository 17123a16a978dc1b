"""The facts layer: what every rule reads about a run, computed once.

:class:`Facts` holds the run table's columns (:class:`gradguard.runtable.RunTable`), the events,
the clipper the run was guarded with, the first step that went wrong, and the healthy window
(:mod:`gradguard.diagnose.healthy`). Rules read facts; they never read the run log themselves.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from typing import Any

from gradguard.diagnose.healthy import HealthyWindow, window
from gradguard.diagnose.numbers import layer_name
from gradguard.runlog import RunLog
from gradguard.runtable import EXPLOSION_FACTOR, RunTable, clip_config
from gradguard.tunelog import TuneResult, read_tune

__all__ = ["Facts", "fields"]

_LONE_BEFORE = 20  # healthy norms before a lone non-finite step that it is compared with
_LONE_AFTER = 6  # steps after it that must be healthy again
WEIGHT_MOVED = 2.0
"""A layer whose weight norm grew by this factor moved: an unstable optimizer moves the weights far."""
HUGE_START_LOSS = 1e6
#: a gradient norm at step 0 this large or more: its scale is off before any update (initial norms of
#: standard models on standardized data with a mean loss are ~0.1-10; features in raw units ~1e4 gave
#: 7e6, a loss summed and multiplied by the accumulation steps 2.8e3)
_INIT_LAYERS = 3  # weight matrices needed to judge the initialization (Facts.init_gain)
HUGE_START_GRAD = 1e3
"""A loss this large at step 0 is a scale off by orders of magnitude: a cross-entropy starts near
log(classes) (≤ ~12), a mean squared error on standardized targets near 1."""


def fields(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object (an event's ``evidence``, a meta entry), else ``{}``: a log
    written by another tool, or damaged, may hold anything there."""
    return value if isinstance(value, dict) else {}


class Facts:
    """Columns of the metrics, the events and the guard's configuration of one run, read once.

    Attributes (one value per record, in file order, unless said otherwise):
        rows: the row indices, ``range(len(table))``.
        steps, loss, norm (pre-clip), thr (threshold), lr, scale (loss scale), clip_coef,
        clip_fraction: floats, ``nan`` where absent.
        skipped, amp (AMP overflow), bad (non-finite, not an overflow), ok (healthy: taken, finite),
        clipped (see :func:`gradguard.runtable.clipped`), spike (flag or ``spike`` event): flags.
        events: the events (dicts). data_bad: indices of steps with a ``data``-phase non-finite
        event. lone: indices of lone non-finite steps between healthy ones (one bad batch).
        layers: layer names. clip: the clipper (:class:`gradguard.runtable.ClipConfig`).
        clip_kind: ``fixed``, ``adaptive``, ``other`` or ``none``. clip_spec: the clipper in words.
        trouble, trouble_reason: index of the first non-finite (or overflowing) step and why
        (``len(steps)``, ``"end"`` when none).
        tuned: the run directory's ``tune.json`` (what ``gradguard tune`` verified; ``None`` when it
        holds none), read once on first use however many rules quote it.
        The log itself: opened (``meta.json`` holds the ``start_time`` a RunWriter writes), closed
        (it holds the ``end_time`` of ``close()``), lost (what failed disk writes lost:
        ``{"records": n, "events": m}``), modified (when the run's files were last written; ``None``
        for a log built in memory), flush_every (the guard's ``every``: records are written in
        batches of that many steps; ``None`` when the run does not say).
    """

    def __init__(self, log: RunLog) -> None:
        self.log = log
        t = self.table = RunTable.from_log(log)
        self.rows, self.steps, self.loss, self.norm = range(len(t)), t.steps, t.loss, t.grad_norm
        self.thr, self.lr, self.scale = t.threshold, t.lr, t.loss_scale
        self.clip_coef, self.clip_fraction, self.clipped = t.clip_coef, t.clip_fraction, t.clipped
        self.skipped, self.amp, self.bad, self.ok = t.skipped, t.amp_overflow, t.bad, t.healthy
        self.layers = t.layers
        self.events = [e for e in log.events if isinstance(e, dict)]
        self.spike = self._spikes()
        data_steps = self._data_event_steps()
        self.data_bad = {i for i, s in enumerate(self.steps) if s in data_steps}
        self.lone = self._lone_bad()
        self.clip = clip_config(log.meta)
        self.clip_kind = self._clip_kind()
        self.clip_spec = self._clip_label()
        self.trouble, self.trouble_reason = self._first_trouble()
        self.opened = isinstance(log.meta.get("start_time"), str)
        world = log.meta.get("world_size")
        self.distributed = isinstance(world, int) and world > 1  # replays are off across ranks
        self.closed, self.lost, self.modified = log.closed, log.lost, log.modified
        every = config.get("every") if isinstance(config := log.meta.get("config"), dict) else None
        self.flush_every = every if isinstance(every, int) and not isinstance(every, bool) else None

    # -- events ---------------------------------------------------------------------------
    @property
    def nonfinite_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "nonfinite"]

    def events_of(self, type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == type]

    def _data_event_steps(self) -> set[int]:
        return {
            e["step"]
            for e in self.nonfinite_events
            if e.get("phase") == "data" and isinstance(e.get("step"), int)
        }

    def _spikes(self) -> list[bool]:
        """The spike flag of each record, or a ``spike`` event at its step."""
        steps = {e["step"] for e in self.events_of("spike") if isinstance(e.get("step"), int)}
        return [flag or s in steps for flag, s in zip(self.table.spike, self.steps)]

    def births(self) -> list[dict[str, Any]]:
        """The ``nonfinite`` events that say where a non-finite value was born — an op (forward,
        backward, loss code, a custom Function) or an optimizer step — earliest step first (file
        order within a step). Not ``data`` events: a tensor entering the step was born elsewhere.
        An optimizer's check is written after the step it judges, so file order is not step order."""
        found = [
            e
            for e in self.nonfinite_events
            if isinstance(e.get("step"), int)
            and e.get("phase") != "data"
            and (e.get("op") or e.get("phase") in ("optimizer", "script"))
        ]
        return sorted(found, key=lambda e: e["step"])

    def first_located(self) -> dict[str, Any] | None:
        """The first ``nonfinite`` event that names an op or a module (a located one)."""
        for e in self.nonfinite_events:
            if e.get("op") or e.get("module") or e.get("located_by") in ("replay", "hooks"):
                return e
        return None

    # -- steps ----------------------------------------------------------------------------
    def _lone_bad(self) -> set[int]:
        """Non-finite steps between healthy neighbours: finite norms close to the recent median on
        both sides, no other non-finite step next to them (the signature of one bad batch)."""
        lone: set[int] = set()
        bad, n = self.bad, len(self.bad)
        for i, b in enumerate(bad):
            if not b or (i > 0 and bad[i - 1]) or (i + 1 < n and bad[i + 1]):
                continue
            before = [self.norm[j] for j in range(max(0, i - _LONE_BEFORE), i) if self.ok[j]]
            after = [self.norm[j] for j in range(i + 1, min(n, i + _LONE_AFTER)) if self.ok[j]]
            if len(before) < 2 or not after:
                continue
            if max(before[-5:] + after) < EXPLOSION_FACTOR * statistics.median(before):
                lone.add(i)
        return lone

    def _first_trouble(self) -> tuple[int, str]:
        """Index of the first non-finite (or float32-overflowing) step and why; ``(len, "end")`` if none.

        A lone bad step and a bad input batch are not trouble: they are not the norm's doing.
        """
        first, reason = len(self.rows), "end"
        for i, b in enumerate(self.bad):
            if b and i not in self.lone and i not in self.data_bad:
                first, reason = i, "nonfinite"
                break
        for e in self.events:
            if e.get("type") not in ("nonfinite", "overflow") or not isinstance(e.get("step"), int):
                continue
            if e.get("type") == "nonfinite" and e.get("phase") == "data":
                continue
            i = self.index_of(e["step"])
            if i not in self.lone and i < first:
                first, reason = i, "nonfinite" if e["type"] == "nonfinite" else "overflow"
        return first, reason

    @functools.cached_property
    def start_loss(self) -> float | None:
        """The loss of step 0, before any update, where it is already :data:`HUGE_START_LOSS` or
        more: the targets, the inputs or the initial weights are off by orders of magnitude, which
        no learning rate fixes (the run then overflows in its first updates, whatever the rate)."""
        if not self.steps or self.steps[0] != 0:
            return None  # (a resumed run: its first record comes after updates)
        loss = self.loss[0]
        return loss if math.isfinite(loss) and abs(loss) >= HUGE_START_LOSS else None

    @functools.cached_property
    def start_grad(self) -> float | None:
        """The gradient norm of step 0, before any update, where it is already :data:`HUGE_START_GRAD`
        or more (and the loss is not :attr:`start_loss`-huge): the inputs or the loss's scale is off."""
        if not self.steps or self.steps[0] != 0 or self.start_loss is not None:
            return None
        norm = self.norm[0]
        return norm if math.isfinite(norm) and norm >= HUGE_START_GRAD else None

    def root_scalars(self, layer: str) -> list[str]:
        """The parameters of the layer ``layer`` when it is the root module's own and every one is a
        scalar (shape ``[]`` or ``[1]`` in ``meta.json``): a learned temperature, a scale, a log-variance."""
        shapes = self.log.meta.get("parameters")
        own = (
            {n: v for n, v in shapes.items() if "." not in n}
            if isinstance(shapes, dict) and not layer
            else {}
        )
        scalar = all(isinstance(v, list) and (v == [] or v == [1]) for v in own.values())
        return sorted(own) if own and scalar else []

    def layer_label(self, layer: str) -> str:
        """A layer for a message: its name, or for the root module (the layer ``""``: the parameters set
        directly on the model) those parameters' names from ``meta.json`` — a learned ``temperature`` or
        ``log_scale``, not "(the root module)"."""
        shapes = self.log.meta.get("parameters")
        own = [n for n in shapes if "." not in n] if isinstance(shapes, dict) and not layer else []
        if not own:
            return layer_name(layer)
        listed = ", ".join(repr(n) for n in own[:3]) + (", …" if len(own) > 3 else "")
        return f"{listed} (on the root module)"

    @functools.cached_property
    def init_gain(self) -> tuple[float, int, float] | None:
        """How much the initial weights amplify the signal, from step 0's layer weight norms and
        ``meta.json``'s parameter shapes: ``(median gain, layers, amplification)`` where a layer's gain is
        ‖W‖ / √fan_out (a row's RMS norm: std·√fan_in; He's init gives √2, torch's default 0.58) and the
        amplification is the product of gain / √2 over the layers (1 at He's init through ReLUs); ``None``
        without step 0's weight norms or the shapes of at least :data:`_INIT_LAYERS` weight matrices."""
        shapes = self.log.meta.get("parameters")
        if not self.steps or self.steps[0] != 0 or not isinstance(shapes, dict):
            return None
        gains = []
        for name in self.layers:
            shape = shapes.get(f"{name}.weight")
            norm = self.layer(name, "weight_norm")[0]
            if (
                isinstance(shape, list)
                and len(shape) >= 2
                and shape[0] > 0
                and math.isfinite(norm)
                and norm > 0
            ):
                gains.append(norm / math.sqrt(shape[0]))
        if len(gains) < _INIT_LAYERS:
            return None
        amplification = math.prod(g / math.sqrt(2) for g in gains)
        return statistics.median(gains), len(gains), amplification

    @property
    def went_bad(self) -> bool:
        """Whether the run reached a non-finite (or overflowing) step."""
        return self.trouble < len(self.rows)

    def index_of(self, step: int) -> int:
        """Index of the first record at or after ``step`` (``len(rows)`` when none)."""
        return self.table.index_of(step)

    def loss_at(self, lo: int, hi: int) -> list[float]:
        """The finite losses of records ``lo:hi``."""
        return [v for v in self.loss[lo:hi] if math.isfinite(v)]

    # -- layers and the clipper -----------------------------------------------------------
    def layer(self, name: str, key: str) -> Sequence[float]:
        """``layers[name][key]`` per record (nan where absent)."""
        return self.table.layer(name, key)

    @functools.cached_property
    def weight_ratios(self) -> dict[str, tuple[float, int]]:
        """Per layer: (largest finite weight norm / the first measured one, the step of it), when > 1."""
        out: dict[str, tuple[float, int]] = {}
        for name in self.layers:
            rows, values = self.table.layer_values(name, "weight_norm")
            series = [(self.steps[i], v) for i, v in zip(rows, values) if math.isfinite(v)]
            start = next((v for _, v in series if v > 1e-8), None)
            if start is None:
                continue
            peak_step, peak = max(series, key=lambda sv: sv[1])
            if peak / start > 1.0:
                out[name] = (peak / start, peak_step)
        return out

    @functools.cached_property
    def weights_still(self) -> bool:
        """Whether the weight norms were logged (two or more measurements of a layer) and no layer's
        grew by :data:`WEIGHT_MOVED` or more: the model barely moved. A loss or a gradient that grew
        meanwhile grew with the objective (longer episodes, a larger target), not from instability."""
        logged = any(
            sum(1 for v in self.table.layer_values(name, "weight_norm")[1] if math.isfinite(v)) >= 2
            for name in self.layers
        )
        return logged and all(r < WEIGHT_MOVED for r, _ in self.weight_ratios.values())

    def _clip_kind(self) -> str:
        """``"none"``, ``"fixed"`` (a constant global-norm threshold), ``"adaptive"`` or ``"other"``.

        From the clipper in ``meta.json``. A run directory that does not say (another tool's log) is
        judged by its thresholds: one value is fixed, several adaptive. So is a run whose guard
        clipped nothing but whose records hold a threshold on at least half of the steps: the
        caller's own clipping (a script's ``clip_grad_norm_`` under ``gradguard run``,
        ``before_step(clip=...)``), not ``on_spike="clip"``'s caps of a few spikes.
        """
        family = self.clip.family
        if family in ("adaptive", "other"):
            return family
        thresholds = [t for t in self.thr if math.isfinite(t)]
        finite = set(thresholds)
        if family == "fixed":
            return "fixed" if finite else "none"
        if self.clip.kind and 2 * len(thresholds) < len(self.thr):
            return "none"  # the guard said it clipped nothing, and the records agree
        return "fixed" if len(finite) == 1 else "adaptive" if finite else "none"

    def _clip_label(self) -> str | None:
        """The clipper in words: the guard's, or the caller's own threshold (see :meth:`_clip_kind`)."""
        if self.clip.family != "none" or self.clip_kind == "none":
            return self.clip.label
        finite = sorted({t for t in self.thr if math.isfinite(t)})
        return f"the caller's clip_grad_norm_ (max_norm {finite[0]:g}{'…' if len(finite) > 1 else ''})"

    @functools.cached_property
    def tuned(self) -> TuneResult | None:
        """The run directory's ``tune.json`` (verified advice), read on first use and kept: every rule
        that recommends a threshold or a learning rate quotes it, one read a diagnosis."""
        return read_tune(self.log.path)

    @functools.cached_property
    def healthy(self) -> HealthyWindow:
        """The healthy window of the run (see :func:`gradguard.diagnose.healthy.window`)."""
        return window(self)
