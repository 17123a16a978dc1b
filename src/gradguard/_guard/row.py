"""A step's device row: the columns of :data:`gradguard.record.SCALARS`, in buffer order
(:func:`device_row` builds them in that order; ``tests/test_guard_parts.py`` holds it to it).

The row is assembled on the device with a few ops (about 10 µs on a CPU) and copied into the monitor's buffer; the host
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


def device_row(m: Measurement, plan: ClipPlan, skip: Tensor, overflow: Tensor, consts: Constants) -> Tensor:
    """The step's row (float32, on the device): one ``cat`` of pieces of one dtype each (a ``stack``
    of mixed dtypes takes torch's slow type-promotion path). ``loss_scale`` is NaN until
    :func:`set_column` writes the scaler's scale; ``clip_fraction`` is the norm clipper's (see
    :class:`ClipPlan`) or NaN."""
    if plan.coef is None or plan.threshold is None:
        clip = consts.numbers((math.nan, math.inf), m.device)
    else:
        clip = torch.stack([plan.coef, plan.threshold]).float()
    loss_nonfinite, grad_nonfinite = m.nonfinite.unbind()
    flags = torch.stack([m.bad, loss_nonfinite, grad_nonfinite, m.grad_nan, skip, plan.spike, overflow])
    if plan.fraction is None:  # loss_scale, clip_fraction
        tail = consts.numbers((math.nan, math.nan), m.device)
    else:
        tail = torch.stack([consts.number(math.nan, m.device), plan.fraction])
    # loss, grad_norm | clip_coef, threshold | the 7 flags | loss_scale, clip_fraction
    return torch.cat([m.values, clip, flags.float(), tail])


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
