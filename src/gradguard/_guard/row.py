"""A step's device row: the columns of :data:`gradguard.record.SCALARS`, in buffer order
(:func:`device_row` builds them in that order; ``tests/test_guard_parts.py`` holds it to it).

The row is assembled on the device with 3 ops (a few µs on a CPU) and copied into the monitor's buffer; the host
reads it only on the anomaly path (:func:`host_values`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradguard._guard.clipping import ClipPlan
from gradguard._guard.measure import Constants, Measurement
from gradguard.record import COLUMN, SCALARS

__all__ = ["column", "device_row", "host_values", "rescued", "set_column"]

# the last 9 columns (the 7 flags, loss_scale, clip_fraction) are made from 9 device bools times
# one of these (a bool times a float is that float or 0; times NaN it is NaN: loss_scale, which
# set_column fills under a GradScaler, and the clip_fraction of a step without a norm clipper)
_FLAGS_FRACTION = (1.0,) * 7 + (math.nan, 1.0)
_FLAGS_NO_FRACTION = (1.0,) * 7 + (math.nan, math.nan)


def device_row(m: Measurement, plan: ClipPlan, skip: Tensor, overflow: Tensor, consts: Constants) -> Tensor:
    """The step's row (float32, on the device), in 3 small ops: the 9 flag-like columns as one
    ``stack`` of bools times a constant, then one ``cat`` of float32 pieces (a ``stack`` of mixed
    dtypes takes torch's slow type-promotion path). ``loss_scale`` is NaN until :func:`set_column`
    writes the scaler's scale; ``clip_fraction`` is the norm clipper's (see :class:`ClipPlan`) or
    NaN until an in-place clipper's is written. Made in ``m.row`` (the monitor's next row) where
    the measurement has one."""
    loss_nonfinite, grad_nonfinite = m.flags()
    fraction = plan.fraction
    as_bit = fraction is not None and fraction.dtype == torch.bool  # a norm clipper's coef < 1
    bits = [m.bad, loss_nonfinite, grad_nonfinite, m.grad_nan, skip, plan.spike, overflow, m.bad]
    bits.append(fraction if fraction is not None and as_bit else m.bad)
    mask = _FLAGS_FRACTION if as_bit else _FLAGS_NO_FRACTION
    tail = torch.stack(bits) * consts.numbers(mask, m.device)
    if plan.coef is None or plan.threshold is None:
        clip = [consts.numbers((math.nan, math.inf), m.device)]
    else:  # as views (a stack would be one more device op: a kernel launch on a GPU)
        clip = [_float32(plan.coef).reshape(1), _float32(plan.threshold).reshape(1)]
    # loss, grad_norm | clip_coef, threshold | the 7 flags, loss_scale, clip_fraction
    out = m.row
    if out is not None and out.device == m.device:
        row = torch.cat([m.values, *clip, tail], out=out)
    else:
        row = torch.cat([m.values, *clip, tail])
    if fraction is not None and not as_bit:  # a fraction measured otherwise (a float)
        set_column(row, "clip_fraction", fraction)
    return row


def _float32(t: Tensor) -> Tensor:
    """``t`` as float32 (no call when it is: a no-op ``to`` still costs ~1 µs on the host)."""
    return t if t.dtype == torch.float32 else t.float()


def set_column(row: Tensor, name: str, value: Any) -> None:
    """Write one column of the row (a device tensor or a number; no host read)."""
    row[COLUMN[name]] = value


def rescued(row: Tensor, total: Tensor, coef: Tensor, fraction: Tensor | None) -> None:
    """A bad step that was only a float32 norm overflow: its exact norm and coefficient, not bad."""
    set_column(row, "grad_norm", total.float())
    set_column(row, "clip_coef", coef)
    for flag in ("nonfinite", "grad_nonfinite", "skipped"):
        set_column(row, flag, 0.0)
    if fraction is not None:
        set_column(row, "clip_fraction", fraction.reshape(()))


def host_values(row: Tensor) -> dict[str, float]:
    """The row on the host, by column name (a host read: the anomaly path only)."""
    return dict(zip(SCALARS, row.tolist()))  # host sync: anomaly path


def column(row: Tensor, name: str) -> Tensor:
    """One column of the row (a 0-D device view; no host read)."""
    return row[COLUMN[name]]
