"""The step record: the fields of one row of ``metrics.jsonl``, defined once.

The guard writes one record per step (through :class:`gradguard.monitor.Monitor`); every reader
(diagnose, report, the sinks, the demos) reads them by these names. Plain Python, no torch: the
readers import it on machines without torch.

A record holds

* the device scalars of :data:`SCALARS`, measured every step and copied to the host once per
  flush (the flags of :data:`FLAGS` come back as ``bool``);
* the host fields of :data:`HOST_FIELDS`: the step index, the learning rate and, on the steps
  that measure them, the per-layer numbers of :data:`LAYER_FIELDS` under ``layers``.

Example:
    >>> from gradguard.record import COLUMN, SCALARS
    >>> SCALARS[COLUMN["clip_fraction"]]
    'clip_fraction'
"""

from __future__ import annotations

__all__ = [
    "COLUMN",
    "DECIDED",
    "FLAGS",
    "HOST_FIELDS",
    "LAYERS",
    "LAYER_FIELDS",
    "LR",
    "SCALARS",
    "STEP",
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

STEP = "step"  #: the step index (``Guard.step`` calls before this one)
LR = "lr"  #: the first parameter group's learning rate (null when it is a tensor)
LAYERS = "layers"  #: ``{layer: {field: value}}`` on the steps that measure layers
HOST_FIELDS: tuple[str, ...] = (STEP, LR, LAYERS)

#: The per-layer fields under ``layers``: every ``layer_every`` steps the gradient norms (null for a
#: layer none of whose parameters had a gradient that step), every ``weight_every`` steps the weight
#: norms and update/weight ratios.
LAYER_FIELDS: tuple[str, ...] = ("grad_norm", "weight_norm", "update_ratio")

#: A host-only marker (never written: fields starting with ``_`` are not): the guard already
#: decided this step on the host (its counters and events are done).
DECIDED = "_decided"
