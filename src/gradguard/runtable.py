"""The run table: a run's step records as columns, and the series every reader derives from them.

One owner for what a step *was* (standard library only, no torch): diagnose, the report, the
integrations' dashboards and the demos read their columns and derived series here instead of each
recomputing them from the records.

Columns (one value per record that has an integer ``step``, ``nan`` where a record lacks the key):
``loss``, ``grad_norm`` (pre-clip), ``clip_coef``, ``threshold``, ``clip_fraction``, ``lr``,
``loss_scale``; flags ``skipped``, ``spike``, ``amp_overflow``; ``global_step`` (the process-wide
optimizer step ``gradguard run`` writes into every record of a process with several optimizers;
``-1`` where a record has none). Derived series:

* **clipped** (:func:`clipped`): the clipper changed a step that was taken — ``clip_fraction > 0``
  (the fraction of the clipper's units clipped: AGC, value and per-layer clipping too) or
  ``clip_coef < 1`` (norm clipping); a log without either (another tool's, or an old one) falls
  back to ``grad_norm > threshold``. A skipped step is never clipped: its gradients were dropped.
* **clip rate** (:func:`clip_rate`): clipped steps / steps taken. Skipped steps are left out of
  the denominator (they reached no weights); ``nan`` when no step was taken.
* **bad**: a non-finite step (the flag, or a non-finite loss or norm) that is not an AMP overflow.
* **healthy**: a step taken with a finite norm, neither bad nor an AMP overflow.

And the one definition of **explosion onset** (:func:`climb_onset`, :func:`first_layer_to_grow`,
:func:`explosion_onset`), used by :func:`gradguard.locate.explosion` on the guard's host history
and by ``gradguard.diagnose`` on a whole run: the first step of a sustained climb of the norm
(three times the median of the norms before it, held for the next steps), and the layer whose own
norm first rose ten times over its healthy median.

Example:
    >>> table = RunTable.from_records(
    ...     [{"step": 0, "grad_norm": 2.0, "clip_coef": 0.5}, {"step": 1, "grad_norm": 0.5, "clip_coef": 1.0}]
    ... )
    >>> table.clipped, table.clip_rate
    ([True, False], 0.5)
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
import statistics
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeGuard

__all__ = [
    "CLIP_KINDS",
    "EXPLOSION_FACTOR",
    "GROWTH_FACTOR",
    "ClipConfig",
    "LayerGrowth",
    "Onset",
    "RunTable",
    "TableBuilder",
    "climb_onset",
    "clip_config",
    "clip_rate",
    "clipped",
    "explosion_onset",
    "first_above",
    "first_layer_to_grow",
    "num",
    "post_clip_norm",
]

EXPLOSION_FACTOR = 10.0
"""A norm this many times its healthy median has exploded (a layer's: has grown first)."""
GROWTH_FACTOR = 3.0
"""A climb starts where the norm is this many times the median of the norms before it."""
ONSET_WINDOW = 200  # norms before a step that its climb is measured against
SUSTAIN = 3  # values after a climb's first step that must stay as high
MIN_HISTORY = 3  # fewest norms before a climb (and fewest a healthy stretch holds)
_CLIP_SLACK = 1e-6  # grad_norm > threshold × (1 + slack): clipped, in logs without a coefficient


# ============================================================================================
# One record
# ============================================================================================


def num(x: Any) -> float:
    """A record value as a float; missing, boolean or non-numeric → ``nan``."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    return float(x)


def _is_step(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def clipped(rec: Mapping[str, Any]) -> bool:
    """Whether the clipper changed this (taken) step's gradients; see the module docstring."""
    numbers = (num(rec.get(key)) for key in ("clip_fraction", "clip_coef", "grad_norm", "threshold"))
    return _clipped(bool(rec.get("skipped")), *numbers)


def _clipped(skipped: bool, fraction: float, coef: float, norm: float, threshold: float) -> bool:
    """:func:`clipped` of a record's numbers (the one definition)."""
    if skipped:
        return False
    if math.isfinite(fraction) or math.isfinite(coef):  # what the clipper said it did
        return fraction > 0 or coef < 1.0  # a nan compares False
    return math.isfinite(norm) and math.isfinite(threshold) and norm > threshold * (1 + _CLIP_SLACK)


def _rate(skipped: Iterable[bool], clipped_: Iterable[bool]) -> float:
    """Clipped steps / steps taken (``nan`` when none was taken): THE clip rate."""
    taken = [c for s, c in zip(skipped, clipped_) if not s]
    return sum(taken) / len(taken) if taken else math.nan


def clip_rate(records: Iterable[Mapping[str, Any]]) -> float:
    """The fraction of the steps taken that the clipper changed (``nan``: no step taken)."""
    rows = list(records)
    return _rate((bool(r.get("skipped")) for r in rows), (clipped(r) for r in rows))


def post_clip_norm(rec: Mapping[str, Any]) -> float:
    """The global norm after norm clipping: ``grad_norm × clip_coef`` (``grad_norm`` without one)."""
    norm, coef = num(rec.get("grad_norm")), num(rec.get("clip_coef"))
    return norm * coef if math.isfinite(coef) else norm


# ============================================================================================
# The table
# ============================================================================================

_FLOATS = ("loss", "grad_norm", "clip_coef", "threshold", "clip_fraction", "lr", "loss_scale")
_FLAGS = ("skipped", "spike", "amp_overflow", "clipped", "bad", "healthy", "nonfinite_loss")


def _nonfinite(rec: Mapping[str, Any], key: str) -> bool:
    """Whether ``rec[key]`` is present and a non-finite float."""
    value = rec.get(key)
    return isinstance(value, float) and not math.isfinite(value)


def _flags(rec: Mapping[str, Any], numbers: Sequence[float]) -> tuple[bool, ...]:
    """The flag columns of one record, in :data:`_FLAGS` order (``numbers``: its :data:`_FLOATS`)."""
    _, norm, coef, threshold, fraction, *_ = numbers
    skipped, amp = bool(rec.get("skipped")), bool(rec.get("amp_overflow"))
    nonfinite_loss = _nonfinite(rec, "loss")
    bad = not amp and (bool(rec.get("nonfinite")) or nonfinite_loss or _nonfinite(rec, "grad_norm"))
    healthy = not (bad or skipped or amp) and math.isfinite(norm)
    was_clipped = _clipped(skipped, fraction, coef, norm, threshold)
    return skipped, bool(rec.get("spike")), amp, was_clipped, bad, healthy, nonfinite_loss


@dataclasses.dataclass
class _Sparse:
    """One layer's values of one field, where recorded: the rows and the values (compact arrays)."""

    rows: array[int] = dataclasses.field(default_factory=lambda: array("q"))
    values: array[float] = dataclasses.field(default_factory=lambda: array("d"))

    def cut(self, row: int) -> None:
        """Drop the values of rows ``>= row``."""
        if self.rows and self.rows[-1] >= row:
            keep = bisect.bisect_left(self.rows, row)
            del self.rows[keep:]
            del self.values[keep:]


@dataclasses.dataclass(frozen=True)
class RunTable:
    """The step records of a run as columns (see the module docstring); index ``i`` is one record.

    Build it with :meth:`from_records`, :class:`TableBuilder` or :meth:`from_log`. The columns are
    compact (floats in ``array('d')``, flags in lists of ``bool``) and no record is kept, so a
    table costs a fraction of its log's size: ``gradguard diagnose`` reads a million steps this
    way. Per-layer values are kept where recorded only (:meth:`layer` spreads one over the rows).

    Attributes:
        layers: the layer names, in order.
        steps: the step of each row (strictly increasing in a table read from a run directory).
        loss, grad_norm, clip_coef, threshold, clip_fraction, lr, loss_scale: the record's numbers
            (``nan`` where absent or not a number).
        skipped, spike, amp_overflow: the record's flags. clipped, bad, healthy: derived (see the
            module docstring). nonfinite_loss: the record holds a loss and it is NaN or ±inf.
        layer_rows: the rows of the records that hold per-layer numbers.
        global_steps: the record's ``global_step`` (the process-wide optimizer step, several
            optimizers under ``gradguard run``), ``-1`` where it has none; see :meth:`global_step`.
    """

    layers: list[str]
    steps: list[int]
    loss: array[float]
    grad_norm: array[float]
    clip_coef: array[float]
    threshold: array[float]
    clip_fraction: array[float]
    lr: array[float]
    loss_scale: array[float]
    skipped: list[bool]
    spike: list[bool]
    amp_overflow: list[bool]
    clipped: list[bool]
    bad: list[bool]
    healthy: list[bool]
    nonfinite_loss: list[bool]
    layer_rows: array[int]
    global_steps: array[int]
    _by_field: dict[str, dict[str, _Sparse]] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], layers: Sequence[str] = ()) -> RunTable:
        """The table of ``records`` (those without an integer ``step`` are left out).

        Args:
            records: step records, e.g. :attr:`gradguard.runlog.RunLog.metrics`.
            layers: the layer names; by default every name the records hold, in order of appearance.
        """
        builder = TableBuilder(layers, more_layers=not layers)
        for rec in records:
            builder.append(rec)
        return builder.table()

    @classmethod
    def from_log(cls, log: _HasTable) -> RunTable:
        """The table of a :class:`~gradguard.runlog.RunLog`: :attr:`~gradguard.runlog.RunLog.table`
        (built once per log)."""
        return log.table

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def clip_rate(self) -> float:
        """Clipped steps / steps taken (see :func:`clip_rate`)."""
        return _rate(self.skipped, self.clipped)

    def column(self, key: str) -> array[float]:
        """The float column ``key`` (one of ``loss``, ``grad_norm``, ``clip_coef``, ``threshold``,
        ``clip_fraction``, ``lr``, ``loss_scale``)."""
        if key not in _FLOATS:
            raise KeyError(
                f"the run table has no float column {key!r}; its float columns are {list(_FLOATS)}"
            )
        column: array[float] = getattr(self, key)
        return column

    def layer(self, name: str, key: str) -> array[float]:
        """``layers[name][key]`` per row (``nan`` where absent)."""
        out = array("d", [math.nan]) * len(self.steps)
        sparse = self._by_field.get(key, {}).get(name)
        if sparse is not None:
            for row, value in zip(sparse.rows, sparse.values):
                out[row] = value
        return out

    def layer_values(self, name: str, key: str) -> tuple[Sequence[int], Sequence[float]]:
        """``(rows, values)`` of ``layers[name][key]`` where recorded (no row spread)."""
        sparse = self._by_field.get(key, {}).get(name)
        return (sparse.rows, sparse.values) if sparse is not None else ((), ())

    def layer_columns(self, key: str) -> Mapping[str, Sequence[float]]:
        """``{layer: layer(layer, key)}`` for every layer, each column built when it is read (one at a
        time while iterating): for :func:`first_layer_to_grow` on wide models."""
        return _LayerColumns(self, key)

    def has_layer_key(self, key: str) -> bool:
        """Whether any record has ``key`` for some layer."""
        return any(sparse.rows for sparse in self._by_field.get(key, {}).values())

    def index_of(self, step: int) -> int:
        """Index of the first record at or after ``step`` (``len(self)`` when none)."""
        for i, s in enumerate(self.steps):
            if s >= step:
                return i
        return len(self.steps)

    def global_step(self, step: int) -> int | None:
        """The process-wide optimizer step (``global_step``) of this run's ``step``, from the record
        of that step; ``None`` when there is no such record or it has none."""
        row = self.index_of(step)
        if row >= len(self.steps) or self.steps[row] != step or self.global_steps[row] < 0:
            return None
        return self.global_steps[row]


class _HasTable(Protocol):
    @property
    def table(self) -> RunTable: ...


class _LayerColumns(Mapping[str, Sequence[float]]):
    """A read-only ``{layer: column}`` view whose columns are built on access (see :meth:`RunTable.layer_columns`)."""

    def __init__(self, table: RunTable, key: str) -> None:
        self._table, self._key = table, key

    def __getitem__(self, name: str) -> Sequence[float]:
        if name not in self._table.layers:
            raise KeyError(name)
        return self._table.layer(name, self._key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table.layers)

    def __len__(self) -> int:
        return len(self._table.layers)


class TableBuilder:
    """Builds a :class:`RunTable` one record at a time, keeping columns only (no record).

    :func:`gradguard.runlog.read_run` streams a run's records into one (``records=False``), and
    applies the run's rewinds with :meth:`drop_from`; :meth:`RunTable.from_records` uses one too.

    Args:
        layers: the layer names known before the records (``meta.json``'s ``layers``).
        more_layers: also take the other names the records hold, in order of appearance.
    """

    def __init__(self, layers: Sequence[str] = (), *, more_layers: bool = True) -> None:
        self._steps: list[int] = []
        self._floats: dict[str, array[float]] = {key: array("d") for key in _FLOATS}
        self._flags: dict[str, list[bool]] = {key: [] for key in _FLAGS}
        self._names: dict[str, int] = dict.fromkeys(layers, -1)  # name → the row it first came in (-1: given)
        self._more = more_layers
        self._layer_rows: array[int] = array("q")
        self._global_steps: array[int] = array("q")
        self._by_field: dict[str, dict[str, _Sparse]] = {}

    def __len__(self) -> int:
        return len(self._steps)

    def append(self, rec: Mapping[str, Any]) -> None:
        """Add one record as a row (a record without an integer ``step`` is left out)."""
        step = rec.get("step")
        if not _is_step(step):
            return
        row = len(self._steps)
        self._steps.append(step)
        numbers = [v if type(v) is float else num(v) for v in map(rec.get, _FLOATS)]  # floats first: fast
        for column, value in zip(self._floats.values(), numbers):
            column.append(value)
        for flags, flag in zip(self._flags.values(), _flags(rec, numbers)):
            flags.append(flag)
        at = rec.get("global_step")
        self._global_steps.append(at if _is_step(at) and 0 <= at < 2**63 else -1)
        layers = rec.get("layers")
        if isinstance(layers, dict):
            self._add_layers(row, layers)

    def _add_layers(self, row: int, layers: Mapping[str, Any]) -> None:
        self._layer_rows.append(row)
        names, by_field = self._names, self._by_field
        for name, entry in layers.items():
            if name not in names:
                if not self._more:
                    continue
                names[name] = row
            if not isinstance(entry, dict):
                continue
            for key, value in entry.items():
                by_name = by_field.get(key)
                if by_name is None:
                    by_name = by_field[key] = {}
                sparse = by_name.get(name)
                if sparse is None:
                    sparse = by_name[name] = _Sparse()
                sparse.rows.append(row)
                sparse.values.append(value if type(value) is float else num(value))

    def drop_from(self, step: int) -> tuple[int, int | None]:
        """Drop the last rows, those of steps ``>= step`` (a rewind of the run).

        Returns:
            How many rows were dropped, and the step of the last row kept (``None``: none).
        """
        keep = len(self._steps)
        while keep and self._steps[keep - 1] >= step:
            keep -= 1
        dropped = len(self._steps) - keep
        if dropped:
            self._cut(keep)
        return dropped, self._steps[keep - 1] if keep else None

    def _cut(self, row: int) -> None:
        """Keep rows ``< row`` only; forget the layers that first came in a dropped row."""
        del self._steps[row:]
        for column in self._floats.values():
            del column[row:]
        for flags in self._flags.values():
            del flags[row:]
        del self._global_steps[row:]
        del self._layer_rows[bisect.bisect_left(self._layer_rows, row) :]
        gone = [name for name, first in self._names.items() if first >= row]
        for name in gone:
            del self._names[name]
        for by_name in self._by_field.values():
            for name in gone:
                by_name.pop(name, None)
            for sparse in by_name.values():
                sparse.cut(row)

    def table(self) -> RunTable:
        """The table of the records added so far (the builder's columns, not copies)."""
        columns: dict[str, Any] = {**self._floats, **self._flags}
        return RunTable(
            layers=list(self._names),
            steps=self._steps,
            layer_rows=self._layer_rows,
            global_steps=self._global_steps,
            _by_field=self._by_field,
            **columns,
        )


# ============================================================================================
# The clipper of a run (meta.json config.clip)
# ============================================================================================

CLIP_KINDS: dict[str, str] = {
    "norm": "fixed",
    "autoclip": "adaptive",
    "zclip": "adaptive",
    "auto": "adaptive",
    "value": "other",
    "agc": "other",
    "layer": "other",
    "perlayer": "other",
}
"""A clipper's kind → how diagnose judges it: ``fixed`` (one global-norm threshold), ``adaptive``
(a threshold that follows the norms) or ``other`` (clips units, not the global norm)."""


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """The clipper a run was guarded with, as ``meta.json`` says.

    Attributes:
        kind: the clipper's kind (``"norm"``, ``"autoclip"``, ``"agc"``…), ``"none"`` for no clipper,
            ``""`` when the run directory does not say.
        label: the clipper for a person (today's ``repr``), ``None`` when the run does not say.
        params: the clipper's parameters (``{"max_norm": 5.0}``); empty for old run directories.
    """

    kind: str
    label: str | None
    params: dict[str, Any]

    @property
    def family(self) -> str:
        """``fixed``, ``adaptive``, ``other`` (see :data:`CLIP_KINDS`) or ``none``."""
        return CLIP_KINDS.get(self.kind, "none")


_REPR_NAME = re.compile(r"^\s*([A-Za-z_]\w*)")


def clip_config(meta: Mapping[str, Any]) -> ClipConfig:
    """The run's clipper from ``meta["config"]``: ``clip`` as a dict (``clipper.config()``), or as
    the ``repr`` string of older run directories (``"Norm(max_norm=5.0)"``, ``"None"``)."""
    config = meta.get("config")
    spec = config.get("clip") if isinstance(config, dict) else None
    label = config.get("clip_repr") if isinstance(config, dict) else None
    if isinstance(spec, dict):
        kind = str(spec.get("kind", "")).lower()
        params = {k: v for k, v in spec.items() if k != "kind"}
        return ClipConfig(kind, str(label) if label is not None else _label(kind, params), params)
    if spec is None or str(spec).strip() in ("", "None"):
        said = isinstance(config, dict) and "clip" in config
        return ClipConfig("none" if said else "", "None" if said else None, {})
    match = _REPR_NAME.match(str(spec))
    return ClipConfig(match.group(1).lower() if match else "unknown", str(spec), {})


def _label(kind: str, params: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v}" for k, v in params.items())
    return f"{kind}({args})"


# ============================================================================================
# Explosion onset: the one definition
# ============================================================================================


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def climb_onset(norms: Sequence[float], *, ends_in_trouble: bool) -> int | None:
    """Index where positive norms start a sustained climb that is an explosion; ``None``: none.

    A climb starts at the first ``i`` (after :data:`MIN_HISTORY` norms) whose norm is at least
    :data:`GROWTH_FACTOR` × the median of the (up to :data:`ONSET_WINDOW`) norms before it, and
    whose next :data:`SUSTAIN` norms stay that high (a lone spike is not a climb). It counts when
    the run then went wrong (``ends_in_trouble``) or the norm rose :data:`EXPLOSION_FACTOR` × over
    that median. A climb may start sooner, after one norm, where it is :data:`EXPLOSION_FACTOR` ×
    the norms before it, stays there, and goes on climbing another :data:`EXPLOSION_FACTOR` × (a
    VAE at a far too high rate: 198, then 80,875, on to 1e10; with the usual three norms first, its
    onset read step 4 and the "healthy" median 90,000). A jump that then holds is not one: a
    zero-initialised layer's gradient can jump that much after step 0 of a healthy run (which may
    go wrong much later, on a bad batch). In a run that stayed finite the norms must also hold the
    rise: the median of the (up to :data:`ONSET_WINDOW`) norms from the start of the climb on stays
    that high. Norms that scatter over two decades at a loss floor (a linear head on separable data:
    1e-4 to 0.13 around 0.007) pass four high in a row by chance and read as an explosion the run then
    "survived" — every finding of it a warning. Sliding median: O(n·window).
    """
    y = [math.log(v) for v in norms]
    bar, early = math.log(GROWTH_FACTOR), math.log(EXPLOSION_FACTOR)
    past: list[float] = []  # sorted values of the sliding window
    for i, v in enumerate(y):
        if len(past) >= MIN_HISTORY or (past and max(y[i:]) - v >= early):
            need = bar if len(past) >= MIN_HISTORY else early
            m = len(past)
            med = past[m // 2] if m % 2 else 0.5 * (past[m // 2 - 1] + past[m // 2])
            sustained = all(w - med >= need for w in y[i + 1 : i + 1 + SUSTAIN])
            if (
                v - med >= need
                and sustained
                and (ends_in_trouble or _median(y[i : i + ONSET_WINDOW]) - med >= need)
            ):
                rise = max(y[i:]) - _median(y[max(0, i - ONSET_WINDOW) : i])
                return i if ends_in_trouble or rise >= math.log(EXPLOSION_FACTOR) else None
        bisect.insort(past, v)
        if len(past) > ONSET_WINDOW:
            past.pop(bisect.bisect_left(past, y[i - ONSET_WINDOW]))
    return None


@dataclasses.dataclass(frozen=True)
class LayerGrowth:
    """The layer whose gradient norm grew first: at row ``index``, ``ratio`` × its healthy median."""

    name: str
    index: int
    ratio: float


def first_layer_to_grow(
    layers: Mapping[str, Sequence[float]], healthy: range, bad: Sequence[bool]
) -> LayerGrowth | None:
    """The layer whose grad norm first reached :data:`EXPLOSION_FACTOR` × its own median over the
    ``healthy`` rows (or went non-finite), scanning the rows after them; ties go to the larger rise.

    Args:
        layers: per layer, its grad norm per row (``nan`` where not measured).
        healthy: the rows of the healthy stretch (the baseline).
        bad: per row, whether the step was non-finite (a ``nan`` there counts as grown).
    """
    best: LayerGrowth | None = None
    for name, series in layers.items():
        base = _median([v for v in series[healthy.start : healthy.stop] if math.isfinite(v) and v > 0])
        if not base > 0:
            continue
        for i in range(healthy.stop, len(series)):
            v = series[i]
            if math.isnan(v) and not bad[i]:
                continue  # not measured this step
            if not math.isfinite(v) or v >= EXPLOSION_FACTOR * base:
                ratio = v / base if math.isfinite(v) else math.inf
                if best is None or (i, -ratio, name) < (best.index, -best.ratio, best.name):
                    best = LayerGrowth(name, i, ratio)
                break
    return best


@dataclasses.dataclass(frozen=True)
class Onset:
    """Where an explosion started in a run's history (see :func:`explosion_onset`).

    Attributes:
        step: the first step of the climb (else the first step at :data:`EXPLOSION_FACTOR` × the
            healthy median); ``None`` when the norm never rose that far.
        healthy: the rows before it whose norms are the baseline.
        layer: the layer that grew first, or ``None``.
    """

    step: int | None
    healthy: range
    layer: LayerGrowth | None


def explosion_onset(
    steps: Sequence[int], norms: Sequence[float], layers: Mapping[str, Sequence[float]]
) -> Onset:
    """The onset of an explosion in a history that ended in a non-finite step (the guard's).

    Non-finite norms are not part of the climb; the finite norms before it are the healthy
    baseline (one, for a climb from the second step). ``gradguard.diagnose`` applies the same :func:`climb_onset` and
    :func:`first_layer_to_grow` to a whole run, whose healthy window also leaves out spikes and
    lone bad batches.
    """
    idx = [i for i, g in enumerate(norms) if math.isfinite(g) and g > 0]
    k = climb_onset([norms[i] for i in idx], ends_in_trouble=True)
    healthy_idx = idx[:k] if k is not None else idx
    if not healthy_idx:
        return Onset(None, range(0), None)
    healthy = range(healthy_idx[0], healthy_idx[-1] + 1)
    bad = [not math.isfinite(g) for g in norms]
    if k is not None:
        onset: int | None = steps[idx[k]]
    else:
        bar = EXPLOSION_FACTOR * _median([norms[i] for i in healthy_idx])
        big = first_above(norms, bar, healthy.stop)
        onset = steps[big] if big is not None else None
    return Onset(onset, healthy, first_layer_to_grow(layers, healthy, bad))


def first_above(
    norms: Sequence[float], bar: float, start: int, ignore: Sequence[bool] | None = None
) -> int | None:
    """The first index from ``start`` whose norm is non-finite or at least ``bar`` (rows marked in
    ``ignore``, e.g. AMP overflows, left out): where no climb was found, the explosion's first step."""
    for i in range(start, len(norms)):
        v = norms[i]
        if (not math.isfinite(v) or v >= bar) and not (ignore is not None and ignore[i]):
            return i
    return None
