"""An on-device ring buffer of step records, copied to the host once per flush interval.

The guard records a handful of device scalars (the columns of :data:`gradguard.record.SCALARS`,
re-exported here) every step and the gradient norms on the steps of its per-layer cadence; nothing
leaves the device until :meth:`Monitor.flush` (every ``every`` steps), which makes one host copy of
the buffer and appends the records to the run log (the columns a row left to the host,
:data:`gradguard.record.DERIVED`, derived on the way). With ``reduce`` a step records its per-tensor
norms with one copy, and the flush reduces every row to per-layer norms at once (a few ops per
flush instead of a few per step). Device memory is ``every × scalars`` floats and ``every × layers``
floats (or, with ``reduce``, ``every × tensors`` doubles), whatever the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.errors import GradGuardError
from gradguard.record import COLUMN, FLAGS, SCALARS, derive_columns
from gradguard.runlog import RunWriter, to_jsonable

__all__ = ["SCALARS", "Monitor"]

_VIEW_CACHE = 1024  # buffers up to this many rows keep their row views
_FLAG_COLUMNS = [j for j, name in enumerate(SCALARS) if name in FLAGS]  # 0/1 on the device, bool in a record


class Monitor:
    """Ring buffer of per-step records on device; one host copy per flush.

    Args:
        layers: qualified names of the layers whose gradient norms are recorded each step.
        every: flush interval in steps (the buffer length).
        writer: where records go (``None``: kept only for :attr:`on_flush`).
        on_flush: called with the host records of each flush (the guard derives events there).
        prepare: called with the records before they are written (to fill host-computed fields).
        reduce: turns gradient norms recorded per tensor into the per-layer norms of the records, at
            the flush, all rows at once (``rows × tensors`` → ``rows × layers``): a step records its
            per-tensor norms with one copy instead of reducing them itself. ``None``: a step
            records per-layer norms.
    """

    def __init__(
        self,
        layers: Sequence[str],
        every: int = 50,
        writer: RunWriter | None = None,
        on_flush: Callable[[list[dict[str, Any]]], None] | None = None,
        prepare: Callable[[list[dict[str, Any]]], None] | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise GradGuardError(f"every must be a positive int, got {every!r}. The default is 50 steps.")
        self.layers = list(layers)
        self.every = every
        self.writer = writer
        self.on_flush = on_flush
        self.prepare = prepare
        self.reduce = reduce
        self._scalars: Tensor | None = None
        self._layer_grads: Tensor | None = None  # per layer, or per tensor (float64) with ``reduce``
        # the buffers' rows as views made once (a view made per record costs ~1 µs on the host)
        # for buffers up to _VIEW_CACHE rows; a longer one makes each row's view when it records
        self._rows: list[Tensor] = []
        self._grad_rows: list[Tensor] = []
        self._steps: list[int] = []
        self._host: list[dict[str, Any]] = []  # host-side fields of the pending rows (lr, …)
        self._has_layers: list[bool] = []
        self._absent: list[tuple[int, ...]] = []  # per row: the layers without a gradient (null)
        self._sparse: list[tuple[int, str, Tensor]] = []  # (row, field, per-layer tensor) on cadence steps
        self._held: int | None = None  # the row waiting for measurements taken after its step (complete)
        self._last: int | None = None  # the row record() wrote last (last_row)

    def _ensure(self, device: torch.device, width: int) -> None:
        """The buffers on ``device``, the gradient norms' ``width`` columns wide (per-tensor norms
        widen when parameters join an existing layer: the pending rows keep theirs, 0 for the new)."""
        if self._scalars is None or self._scalars.device != device:
            self._scalars = torch.zeros(self.every, len(SCALARS), dtype=torch.float32, device=device)
            self._rows = _row_views(self._scalars)
            self._layer_grads = None
            self._last = None
        grads = self._layer_grads
        if grads is None or grads.device != device or grads.shape[1] < width:
            dtype = torch.float32 if self.reduce is None else torch.float64
            self._layer_grads = torch.zeros(self.every, width, dtype=dtype, device=device)
            self._grad_rows = _row_views(self._layer_grads)
            if grads is not None and grads.device == device and self._steps:
                self._layer_grads[:, : grads.shape[1]].copy_(grads)

    def add_layers(self, layers: Sequence[str]) -> None:
        """More layers from now on (parameters joined the guard): the pending records, which have
        the old layers, are flushed first (one host copy, on the step the layers are added)."""
        if not layers:
            return
        self.flush()
        self.layers += layers
        self._scalars = self._layer_grads = None  # reallocated, one column per layer, at the next record
        self._rows, self._grad_rows = [], []
        self._last = None

    @property
    def pending(self) -> int:
        """Records waiting in the buffer."""
        return len(self._steps)

    def record(
        self,
        step: int,
        scalars: Tensor,
        layer_grad_norms: Tensor | None = None,
        host: dict[str, Any] | None = None,
        layer_extras: dict[str, Tensor] | None = None,
        absent: tuple[int, ...] = (),
        held: bool = False,
    ) -> None:
        """Store one step (device copies only); flushes when the buffer is full.

        Args:
            step: the step index.
            scalars: 1-D device tensor in :data:`SCALARS` order.
            layer_grad_norms: per-layer gradient norms (same order as ``layers``); with ``reduce``,
                the per-tensor norms (every tensor, in the order ``reduce`` expects).
            host: fields already on the host (``lr``…), stored as they are.
            layer_extras: per-layer tensors measured on this step only (``weight_norm``,
                ``update_ratio``), kept as device tensors until the flush.
            absent: positions of the layers that had no gradient this step: their ``grad_norm``
                is written as null (not 0.0).
            held: more of this row is measured after the step (:meth:`complete`); until then a full
                buffer is not flushed. A row still held at the next record is released as it is.
        """
        self._release()  # a row still held: what it waited for never came
        row = len(self._steps)
        in_place = row < len(self._rows) and self._rows[row] is scalars  # made in next_rows' view
        if not in_place:  # (next_rows made the buffers ready for it)
            self._ensure(scalars.device, _width(self.layers, layer_grad_norms, self.reduce))
        assert self._scalars is not None and self._layer_grads is not None
        target = _row(self._rows, self._scalars, row)
        if target is not scalars:
            target.copy_(_detached(scalars))
        has_layers = layer_grad_norms is not None and bool(self.layers)
        if has_layers:
            assert layer_grad_norms is not None
            target = _row(self._grad_rows, self._layer_grads, row)
            if target is not layer_grad_norms:
                target.copy_(_detached(layer_grad_norms))
        self._has_layers.append(has_layers)
        self._absent.append(absent if has_layers else ())
        for name, value in (layer_extras or {}).items():
            self._sparse.append((row, name, _detached(value)))
        self._steps.append(step)
        self._host.append(dict(host or {}))
        self._last = row
        if held:
            self._held = row
        else:
            self._flush_if_full()

    def last_row(self) -> Tensor | None:
        """The scalar row :meth:`record` wrote last, in :data:`SCALARS` order (a device view, no
        host read; valid until the next record), also when the flush it set off has written it;
        ``None`` before the first. For a caller that reads each step's record (the demos:
        ``gradguard._guard.row.host_values(row)``, one host read)."""
        if self._last is None or self._scalars is None:
            return None
        return self._scalars[self._last]

    def next_rows(self, device: torch.device, tensors: int) -> tuple[Tensor | None, Tensor | None]:
        """Where the next :meth:`record` keeps its row, and (with ``reduce``) its per-tensor norms
        of ``tensors`` columns: views of the buffers on ``device`` that a step may fill in place, so
        that its record copies nothing. ``(None, None)`` while a full buffer waits for a held row.
        The views are the buffers' rows: valid until the next record, flush or new layers."""
        i = len(self._steps)
        if i >= self.every:
            return None, None
        self._ensure(device, tensors if self.reduce is not None else len(self.layers))
        assert self._scalars is not None and self._layer_grads is not None
        row = _row(self._rows, self._scalars, i)
        if self.reduce is None or self._layer_grads.shape[1] != tensors:
            return row, None
        return row, _row(self._grad_rows, self._layer_grads, i)

    def complete(self, layer_extras: dict[str, Tensor]) -> None:
        """Add the held row's per-layer measurements taken after its step (``weight_norm``,
        ``update_ratio`` after the caller's optimizer step), then let it flush. Nothing when no row
        is held (a flush wrote it since, as it was)."""
        if self._held is None:
            return
        for name, value in layer_extras.items():
            self._sparse.append((self._held, name, _detached(value)))
        self._release()

    def amend(self, step: int, columns: dict[str, Any]) -> bool:
        """Overwrite columns of the pending row of ``step`` (device tensors or numbers; no host
        read). ``False`` when that row was flushed already (it is written as it was)."""
        if not self._steps or self._steps[-1] != step or self._scalars is None:
            return False
        row = self._scalars[len(self._steps) - 1]
        for name, value in columns.items():
            row[COLUMN[name]] = value
        return True

    def _release(self) -> None:
        """The held row is complete, or will never be: flush if the buffer is full."""
        if self._held is not None:
            self._held = None
            self._flush_if_full()

    def _flush_if_full(self) -> None:
        if len(self._steps) >= self.every:
            self.flush()

    def peek(self) -> list[dict[str, Any]]:
        """The pending records, as the next flush will see them (one host copy); nothing is written,
        cleared or passed on. For readers in the middle of an interval (``Guard.state_dict``)."""
        return self._host_records()

    def flush(self) -> list[dict[str, Any]]:
        """Copy the pending records to the host (one copy), write them, and return them.

        Host fields whose name starts with ``_`` are passed to :attr:`on_flush` but not written.
        """
        records = self._host_records()
        if not records:
            return []
        hidden = {key for host in self._host if host for key in host if key.startswith("_")}
        self._steps.clear()
        self._host.clear()
        self._has_layers.clear()
        self._absent.clear()
        self._sparse.clear()
        self._held = None  # written as it is
        if self.prepare is not None:
            self.prepare(records)
        if self.writer is not None:
            self.writer.write_metrics([_written(rec, hidden) for rec in records])
        if self.on_flush is not None:
            self.on_flush(records)
        return records

    def _layer_norms(self, records: list[dict[str, Any]], values: list[float], start: int) -> None:
        """Each record's per-layer gradient norms (``layers``), from the host copy's values at
        ``start`` (a row of ``layers`` values per record; null where the layer had no gradient)."""
        names, nl = self.layers, len(self.layers)
        for r, rec in enumerate(records):
            if not self._has_layers[r]:
                continue
            at = start + r * nl
            layers: dict[str, dict[str, float | None]] = {
                name: {"grad_norm": v} for name, v in zip(names, values[at : at + nl])
            }
            for j in self._absent[r]:
                layers[names[j]]["grad_norm"] = None
            rec["layers"] = layers

    def _host_records(self) -> list[dict[str, Any]]:
        """The pending rows as host records (one copy of the buffer), the buffer left as it is."""
        n = len(self._steps)
        if n == 0 or self._scalars is None or self._layer_grads is None:
            return []
        with_layers = any(self._has_layers)
        parts = [self._scalars[:n].reshape(-1)]
        if with_layers:
            grads = self._layer_grads[:n]
            if self.reduce is not None:  # every row at once: one pass, not one per step
                grads = self.reduce(grads).to(torch.float32)
            parts.append(grads.reshape(-1))
        parts += [t.reshape(-1).to(torch.float32) for _, _, t in self._sparse]
        values = torch.cat(parts).cpu().tolist()  # host sync: the one copy per flush interval
        k, nl = len(SCALARS), len(self.layers)
        end = n * k + (n * nl if with_layers else 0)
        columns = [values[j : n * k : k] for j in range(k)]  # column by column: C loops, not Python's
        derive_columns(columns)  # the columns the device left to the host (record.DERIVED)
        for j in _FLAG_COLUMNS:
            columns[j] = list(map(bool, columns[j]))
        records = [dict(zip(_KEYS, row)) for row in zip(self._steps, *columns)]
        for rec, host in zip(records, self._host):
            if host:
                rec.update(host)
        if with_layers:
            self._layer_norms(records, values, n * k)
        rest = values[end:]
        pos = 0
        for row, field, t in self._sparse:
            vals = rest[pos : pos + t.numel()]
            pos += t.numel()
            layers = records[row].setdefault("layers", {})
            for name, v in zip(self.layers, vals):
                layers.setdefault(name, {})[field] = v
        return records


_INF = float("inf")
_KEYS = ("step", *SCALARS)  # a record's first keys, in order
_FLOAT_COLUMNS = tuple(name for name in SCALARS if name not in FLAGS)  # those that may be NaN / ±inf


def _written(rec: dict[str, Any], hidden: set[str]) -> dict[str, Any]:
    """What the run log gets of a record: its fields but the ``_`` ones (``hidden``: the host
    fields so named), its non-finite scalar columns (``loss_scale`` is NaN on every step without a
    GradScaler) already in the log's text form (:func:`gradguard.runlog.to_jsonable`), so that the
    writer's fast JSON path takes the record (the same text; ~20 µs a record less than its general
    fallback, which still takes a record with another non-finite value)."""
    out = rec.copy()
    for key in hidden:
        out.pop(key, None)
    for key in _FLOAT_COLUMNS:
        value = out[key]
        if value.__class__ is float and not -_INF < value < _INF:  # (a host field may be None)
            out[key] = to_jsonable(value)
    return out


def _width(layers: Sequence[str], norms: Tensor | None, reduce: Callable[[Tensor], Tensor] | None) -> int:
    """The columns a step's gradient norms need: one per layer, or (``reduce``) one per tensor."""
    if reduce is None:
        return len(layers)
    return 0 if norms is None else len(norms)


def _row_views(buffer: Tensor) -> list[Tensor]:
    """The rows of a buffer as views, made once (none for a buffer longer than ``_VIEW_CACHE``)."""
    return list(buffer.unbind(0)) if buffer.shape[0] <= _VIEW_CACHE else []


def _row(views: list[Tensor], buffer: Tensor, i: int) -> Tensor:
    """Row ``i`` of ``buffer``: its view made once, or made now."""
    return views[i] if views else buffer[i]


def _detached(t: Tensor) -> Tensor:
    """``t`` out of the autograd graph (no op for the guard's tensors, which are in none)."""
    return t.detach() if t.requires_grad else t
