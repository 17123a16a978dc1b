"""The step record: the fields of one row of ``metrics.jsonl``, defined once.

The guard writes one record per step (through :class:`gradguard.monitor.Monitor`); every reader
(diagnose, report, the sinks, the demos) reads them by these names. Plain Python, no torch: the
readers import it on machines without torch.

A record holds

* the device scalars of :data:`SCALARS`, measured every step and copied to the host once per
  flush (the flags of :data:`FLAGS` come back as ``bool``); a column the device left to the host
  (:data:`DERIVED`) is filled in from the row's own numbers (:func:`derive`);
* the host fields of :data:`HOST_FIELDS`: the step index, the learning rate and, on the steps
  that measure them, the per-layer numbers of :data:`LAYER_FIELDS` under ``layers``.

Example:
    >>> from gradguard.record import COLUMN, SCALARS
    >>> SCALARS[COLUMN["clip_fraction"]]
    'clip_fraction'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "COLUMN",
    "DECIDED",
    "DERIVED",
    "FLAGS",
    "HOST_FIELDS",
    "LAYERS",
    "LAYER_FIELDS",
    "LR",
    "SCALARS",
    "STEP",
    "derive",
    "derive_columns",
    "weight_stats",
]

#: The per-step device scalars, in the column order of the monitor's buffer. New columns go at the
#: end (readers of old runs find them missing).
SCALARS: tuple[str, ...] = (
    "loss",  # the step's loss (the mean over ranks under torch.distributed; null without one)
    "grad_norm",  # the pre-clip global gradient norm
    "clip_coef",  # the norm-clipping coefficient min(1, τ/‖g‖); NaN without norm clipping
    "threshold",  # τ, the norm-clipping threshold of this step; inf without norm clipping
    "nonfinite",  # the loss or a gradient is NaN/±inf
    "loss_nonfinite",
    "grad_nonfinite",
    "grad_nan",  # a gradient holds a NaN (not only ±inf)
    "skipped",  # the optimizer step did not happen
    "spike",  # the norm is a z-score outlier (on_spike)
    "amp_overflow",  # a GradScaler overflow: non-finite gradients with a finite loss
    "loss_scale",  # the GradScaler's scale after update(); NaN without a scaler
    "clip_fraction",  # the fraction of the clipper's units clipped this step; NaN without a clipper
)

#: The columns that are flags (0/1 on the device, ``bool`` in the record).
FLAGS: frozenset[str] = frozenset(
    {"nonfinite", "loss_nonfinite", "grad_nonfinite", "grad_nan", "skipped", "spike", "amp_overflow"}
)

#: ``{column name: index}`` into a row of :data:`SCALARS`.
COLUMN: dict[str, int] = {name: i for i, name in enumerate(SCALARS)}

#: What a column holds where the device left its value to the host (never a flag's or a fraction's
#: value): :func:`derive` computes it from the row's own numbers. The guard's device row does so
#: for the non-finite flags of a bad step (functions of its loss and grad_norm) and for a norm
#: clipper's clip_fraction (whether clip_coef < 1): device ops saved every step.
DERIVED = -1.0

_LOSS, _NORM, _COEF = COLUMN["loss"], COLUMN["grad_norm"], COLUMN["clip_coef"]
_NONFINITE, _LOSS_NF, _GRAD_NF = COLUMN["nonfinite"], COLUMN["loss_nonfinite"], COLUMN["grad_nonfinite"]
_NAN, _FRACTION = COLUMN["grad_nan"], COLUMN["clip_fraction"]


def derive(row: list[float]) -> None:
    """Fill in, in place, the columns of one host row (:data:`SCALARS` order) that hold
    :data:`DERIVED` (see :func:`derive_columns`)."""
    if DERIVED not in row:
        return
    columns = [[v] for v in row]
    derive_columns(columns)
    row[:] = [c[0] for c in columns]


def derive_columns(columns: list[list[float]]) -> None:
    """Fill in, in place, the entries that hold :data:`DERIVED` in the columns of many host rows
    (``columns[j]``: column ``j`` of :data:`SCALARS`, a value per row): ``loss_nonfinite`` /
    ``grad_nonfinite`` (the row's loss / grad_norm is not finite), ``grad_nan`` (grad_norm is NaN),
    ``nonfinite`` (either), as 1.0 / 0.0; ``clip_fraction`` 1.0 where ``clip_coef`` < 1, else 0.0
    (what a norm clipper's one coefficient clipped). A column without one is left as it is."""
    loss, norm, coef = columns[_LOSS], columns[_NORM], columns[_COEF]
    for j, value in _DERIVATIONS:
        column = columns[j]
        if DERIVED in column:
            columns[j] = [
                value(loss[r], norm[r], coef[r]) if v == DERIVED else v for r, v in enumerate(column)
            ]


_DERIVATIONS = (  # (column, its value from the row's loss, grad_norm and clip_coef)
    (_LOSS_NF, lambda loss, norm, coef: 0.0 if math.isfinite(loss) else 1.0),
    (_GRAD_NF, lambda loss, norm, coef: 0.0 if math.isfinite(norm) else 1.0),
    (_NAN, lambda loss, norm, coef: 1.0 if math.isnan(norm) else 0.0),
    (_NONFINITE, lambda loss, norm, coef: 0.0 if math.isfinite(loss) and math.isfinite(norm) else 1.0),
    (_FRACTION, lambda loss, norm, coef: 1.0 if coef < 1.0 else 0.0),
)


STEP = "step"  #: the step index (``Guard.step`` calls before this one)
LR = "lr"  #: the first parameter group's learning rate (null when it is a tensor)
LAYERS = "layers"  #: ``{layer: {field: value}}`` on the steps that measure layers
HOST_FIELDS: tuple[str, ...] = (STEP, LR, LAYERS)

#: The per-layer fields under ``layers``: every ``layer_every`` steps the gradient norms (null for a
#: layer none of whose parameters had a gradient that step), every ``weight_every`` steps the weight
#: norms and update/weight ratios.
LAYER_FIELDS: tuple[str, ...] = ("grad_norm", "weight_norm", "update_ratio")


def weight_stats(rec: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    """A ``weight_every`` step's per-layer fields (every layer has its ``weight_norm`` there);
    ``{}`` on the other steps, which have no weight norms."""
    layers = rec.get(LAYERS) or {}
    return layers if "weight_norm" in next(iter(layers.values()), {}) else {}


#: A host-only marker (never written: fields starting with ``_`` are not): the guard already
#: decided this step on the host (its counters and events are done).
DECIDED = "_decided"
