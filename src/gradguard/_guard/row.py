"""A step's device row: the columns of :data:`gradguard.record.SCALARS`, in buffer order
(``tests/test_guard_parts.py`` holds :func:`device_row` to it).

The row is made in place, in the monitor's next row, by the ops that compute its numbers: the
measurement writes ``[loss, grad_norm]`` (:meth:`gradguard._guard.measure.Meter.measure`), the
clip coefficient's last op writes ``clip_coef`` (:meth:`gradguard._guard.clipping.Clipping.plan`),
and one ``where`` writes the rest from two constant rows, a good step's and a bad step's, picked by
the step's bad flag: a fixed threshold, the flags, ``loss_scale`` (NaN until :func:`set_column`
writes a GradScaler's scale). What the host can tell from the row's own numbers is left to it
(:data:`gradguard.record.DERIVED`): which of the loss and the norm was not finite, and a norm
clipper's clip fraction. Anything else — a skip flag other than the bad flag, a device spike, an AMP
overflow, a measured clip fraction, an adaptive threshold, flags that hold more than the row's
numbers (a rank's own, under torch.distributed) — is one small write more. The host reads the row
only on the anomaly path (:func:`host_values`). On a CPU step the coefficient, an adaptive threshold
and the constant tail are written into the row's memory on the host instead, no op
(:attr:`gradguard._guard.measure.Measurement.host`); on a GPU the measurement's numbers and the
coefficient (with an adaptive threshold) come from one launch each (:mod:`gradguard._step_kernel`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradguard._guard.clipping import ClipPlan
from gradguard._guard.measure import Constants, Measurement, host_view
from gradguard.record import COLUMN, DERIVED, SCALARS, derive

__all__ = ["column", "device_row", "host_values", "rescued", "set_column"]

_COEF, _THRESHOLD, _FLAGS = COLUMN["clip_coef"], COLUMN["threshold"], COLUMN["nonfinite"]
_NAN = math.nan


def device_row(m: Measurement, plan: ClipPlan, skip: Tensor, overflow: Tensor, consts: Constants) -> Tensor:
    """The step's row (float32, on the device): ``m.row`` (the monitor's next row) where the
    measurement has one, else a new tensor. A usual step (a fixed norm threshold, the bad flag as
    its skip flag) adds 1 op to the measurement's and the coefficient's: the ``where``."""
    row = m.row if m.row is not None and m.row.device == m.device else _new_row(m.device)
    if not m.values_in_row or row is not m.row:
        row[:_COEF].copy_(m.values)
    clips = plan.coef is not None and plan.threshold is not None
    baked = clips and consts.made(plan.threshold)  # type: ignore[arg-type]
    if clips:
        assert plan.coef is not None and plan.threshold is not None
        if plan.coef is not m.column("clip_coef"):  # (not made in the row: the recovery's, the caller's)
            _put(row, _COEF, plan.coef)
        written = plan.threshold is m.column("threshold")  # (there with the coefficient)
        if not baked and not written:
            _put(row, _THRESHOLD, plan.threshold)
    start = _THRESHOLD if baked else _FLAGS if clips else _COEF
    from_coef = clips and plan.fraction is None and plan.fraction_from_coef
    derives = m.flags_from_values
    rows = _constants(
        consts, m.device, start, plan.threshold if baked else None, skip is m.bad, derives, from_coef
    )
    tail = m.columns(start, len(SCALARS)) if row is m.row else None
    if tail is not None and m.host is not None and rows.host is not None:  # a CPU step: copied on the host
        m.put_columns(start, rows.host[m.host_bad])
    else:
        torch.where(m.bad, rows.bad, rows.good, out=tail if tail is not None else row[start:])
    if not derives:  # flags that hold a rank's own values too (or were given)
        loss_nonfinite, grad_nonfinite = m.flags()
        torch.stack([m.bad, loss_nonfinite, grad_nonfinite, m.nan()], out=row[_FLAGS : _FLAGS + 4])
    false = consts.false(m.device)
    for name, flag in (("skipped", skip), ("spike", plan.spike), ("amp_overflow", overflow)):
        if flag is not false and not (name == "skipped" and flag is m.bad):
            set_column(row, name, flag)
    if plan.fraction is not None:  # a fraction measured otherwise (a bool, a float)
        set_column(row, "clip_fraction", plan.fraction)
    return row


def _new_row(device: torch.device) -> Tensor:
    return torch.empty(len(SCALARS), dtype=torch.float32, device=device)


def _put(row: Tensor, index: int, value: Tensor) -> None:
    """Write a 0-D or 1-element tensor into one column (converted to float32)."""
    row[index].copy_(value if value.dim() == 0 else value.reshape(()))


def _constants(
    consts: Constants,
    device: torch.device,
    start: int,
    threshold: Tensor | None,
    skip_is_bad: bool,
    derives: bool,
    from_coef: bool,
) -> _Rows:
    """The columns ``start:`` of a bad step's and of a good step's row (device constants, made once
    per kind of step; ``threshold``: a device constant baked in as column ``threshold``)."""
    key = ("row", start, skip_is_bad, derives, from_coef)
    make = lambda: _make(device, start, threshold, skip_is_bad, derives, from_coef)  # noqa: E731
    return consts.get(key, device, make, of=() if threshold is None else (threshold,))


def _make(
    device: torch.device,
    start: int,
    threshold: Tensor | None,
    skip_is_bad: bool,
    derives: bool,
    from_coef: bool,
) -> _Rows:
    """See :func:`_constants`."""
    fraction = DERIVED if from_coef else _NAN
    good = dict.fromkeys(SCALARS, 0.0) | {"clip_coef": _NAN, "threshold": math.inf}
    good |= {"loss_scale": _NAN, "clip_fraction": fraction}
    bad = good | {"nonfinite": 1.0, "skipped": 1.0 if skip_is_bad else 0.0}
    if derives:  # which of the loss and the norm: the host tells from them
        bad |= dict.fromkeys(("loss_nonfinite", "grad_nonfinite", "grad_nan"), DERIVED)
    rows = []
    for values in (bad, good):
        row = torch.tensor([values[name] for name in SCALARS[start:]], dtype=torch.float32).to(device)
        if threshold is not None:
            row[0] = threshold.to(device=device, dtype=torch.float32).reshape(())
        rows.append(row)
    host = (host_view(rows[1]), host_view(rows[0])) if device.type == "cpu" else None
    return _Rows(rows[0], rows[1], None if host is None or host[0] is None else host)


class _Rows(NamedTuple):
    """A bad step's and a good step's constant columns, and on a CPU their NumPy views ``(good, bad)``
    (a CPU step copies them into its row on the host: :attr:`Measurement.host`)."""

    bad: Tensor
    good: Tensor
    host: tuple[Any, Any] | None


def set_column(row: Tensor, name: str, value: Any) -> None:
    """Write one column of the row (a device tensor or a number; no host read)."""
    row[COLUMN[name]] = value


def rescued(row: Tensor, total: Tensor, coef: Tensor, fraction: Tensor | None) -> None:
    """A bad step that was only a float32 norm overflow: its exact norm and coefficient, not bad.
    (``loss_nonfinite`` and ``grad_nan``, left to the host, follow from the loss and the new norm.)"""
    set_column(row, "grad_norm", total.float())
    set_column(row, "clip_coef", coef)
    for flag in ("nonfinite", "grad_nonfinite", "skipped"):
        set_column(row, flag, 0.0)
    if fraction is not None:
        set_column(row, "clip_fraction", fraction.reshape(()))


def host_values(row: Tensor) -> dict[str, float]:
    """The row on the host, by column name, the columns left to the host derived (a host read:
    the anomaly path only)."""
    values = row.tolist()  # host sync: anomaly path
    derive(values)
    return dict(zip(SCALARS, values))


def column(row: Tensor, name: str) -> Tensor:
    """One column of the row (a 0-D device view; no host read)."""
    return row[COLUMN[name]]
