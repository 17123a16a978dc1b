"""The events of ``events.jsonl``: one constructor per event type, the one place each is built.

Every event is a dict with a ``type`` and a ``step``; the readers (diagnose, report, the sinks)
select them by type and read their fields by name, so the type strings and field names here are
the format. Plain Python, no torch: the readers import it on machines without torch.

Example:
    >>> from gradguard import events
    >>> events.skip(7, events.SKIP_SPIKE, grad_norm=12.5)
    {'type': 'skip', 'step': 7, 'reason': 'spike', 'grad_norm': 12.5}
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "ABORT_CONSECUTIVE",
    "ABORT_MAX_ROLLBACKS",
    "ABORT_MIN_LR",
    "SKIP_AMP_OVERFLOW",
    "SKIP_NONFINITE",
    "SKIP_NO_SNAPSHOT",
    "SKIP_SPIKE",
    "TYPES",
    "Event",
    "abort",
    "explosion",
    "kind_of",
    "layers",
    "loss_scale_collapse",
    "lr_backoff",
    "nonfinite",
    "nonfinite_where",
    "op_called",
    "overflow",
    "rollback",
    "skip",
    "spike",
]

Event = dict[str, Any]

#: Every event type, in the order of the constructors below.
TYPES = (
    "nonfinite",
    "skip",
    "spike",
    "overflow",
    "rollback",
    "lr_backoff",
    "abort",
    "loss_scale_collapse",
    "layers",
    "explosion",
    "buffers",
)

#: The ``reason`` of a ``skip`` event.
SKIP_NONFINITE = "nonfinite"
SKIP_SPIKE = "spike"
SKIP_AMP_OVERFLOW = "amp_overflow"
SKIP_NO_SNAPSHOT = "nonfinite (no snapshot yet to roll back to)"

#: The ``reason`` of an ``abort`` event (an abort without one is an old run's: ``max_consecutive``).
ABORT_CONSECUTIVE = "max_consecutive"  # too many skipped steps in a row
ABORT_MAX_ROLLBACKS = "max_rollbacks"  # too many rollbacks within rollback_window steps
ABORT_MIN_LR = "min_lr"  # one more LR back-off would take the learning rate below min_lr

_OVERFLOW_NOTE = "finite gradients whose float32 norm overflows; measured exactly"
_COLLAPSE_MESSAGE = (
    "the GradScaler keeps overflowing: fp16 cannot hold these gradients. Lower the learning rate, "
    "clip harder, or train in bf16 (torch.autocast(dtype=torch.bfloat16))."
)


def kind_of(value: float) -> str:
    """The ``kind`` of a non-finite value: ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def nonfinite(
    step: int,
    *,
    phase: str | None,
    tensor: str | None,
    kind: str | None,
    located_by: str,
    module: str | None = None,
    op: str | None = None,
    source: str | None = None,
    **fields: Any,
) -> Event:
    """Where a NaN/±inf was born: ``phase`` (``data``, ``forward``, ``loss``, ``backward``,
    ``optimizer``), ``module``, ``op``, ``tensor`` (``output``, ``grad``, ``param``…), ``kind``,
    ``source`` (file:line), and how it was found (``located_by``: ``norm``, ``replay``, ``watch``,
    ``hooks``). ``fields`` add the evidence (``layers``, ``loss``, ``policy``, ``evidence``…)."""
    return {
        "type": "nonfinite",
        "step": step,
        "phase": phase,
        "module": module,
        "op": op,
        "tensor": tensor,
        "kind": kind,
        "source": source,
        "located_by": located_by,
        **fields,
    }


def op_called(event: Event) -> str:
    """The located op as the messages name it: ```div``` — or ```div`` inside ``gumbel_softmax```
    where the op was found inside the functional call the user's line made (``evidence.inside``)."""
    evidence = event.get("evidence")
    inside = evidence.get("inside") if isinstance(evidence, dict) else None
    return f"`{event.get('op')}`" + (f" inside `{inside}`" if inside else "")


def nonfinite_where(event: Event) -> tuple[str, Event]:
    """What a one-line summary of a ``nonfinite`` event shows: ``(lead, where)``. An explosion's
    event names the layer whose norm took off (``phase: backward``, no op) and keeps where the
    values finally overflowed (the located op) in ``evidence.overflow``: the lead names the
    explosion, ``where`` is that overflow. Any other event: no lead, the event itself."""
    evidence = event.get("evidence") or {}
    overflow = evidence.get("overflow") if event.get("cause") == "explosion" else None
    if not isinstance(overflow, dict):
        return "", event
    step, layer = evidence.get("first_spike_step"), event.get("module")
    since = f" from step {step}" if step is not None else ""
    where = f" in layer {layer}" if layer not in (None, "") else ""
    return f"an explosion{since}{where}, overflowing at", overflow


def skip(step: int, reason: str, *, grad_norm: float | None = None, loss_scale: float | None = None) -> Event:
    """The optimizer step did not happen (``reason``: one of the ``SKIP_*`` constants)."""
    event: Event = {"type": "skip", "step": step, "reason": reason}
    if grad_norm is not None:
        event["grad_norm"] = grad_norm
    if loss_scale is not None:
        event["loss_scale"] = loss_scale
    return event


def spike(step: int, grad_norm: float, action: str) -> Event:
    """A finite step whose norm is a z-score outlier; ``action`` is the ``on_spike`` policy."""
    return {"type": "spike", "step": step, "grad_norm": grad_norm, "action": action}


def overflow(step: int, grad_norm: float, *, clipped: bool) -> Event:
    """Finite gradients whose float32 norm overflowed: measured exactly (``grad_norm``), and clipped
    when the guard has a threshold (the note says which)."""
    note = f"{_OVERFLOW_NOTE} and clipped" if clipped else f"{_OVERFLOW_NOTE}; not clipped (no threshold)"
    return {"type": "overflow", "step": step, "grad_norm": grad_norm, "note": note}


def rollback(step: int, to_step: int) -> Event:
    """Model and optimizer restored to the snapshot taken after step ``to_step``."""
    return {"type": "rollback", "step": step, "to_step": to_step}


def lr_backoff(step: int, factor: float, lr: float) -> Event:
    """Every group's learning rate multiplied by ``factor`` after a rollback (``lr``: group 0's)."""
    return {"type": "lr_backoff", "step": step, "factor": factor, "lr": lr}


def abort(
    step: int, consecutive: int, weights_nonfinite: bool, *, reason: str | None = None, **fields: Any
) -> Event:
    """The guard stopped the run at ``step``; ``consecutive``: skipped steps in a row by then.

    ``reason`` (one of the ``ABORT_*`` constants) says which bound stopped it; ``fields`` add what a
    reader shows (``message``, and for a rollback loop ``rollbacks``, ``window``, ``lr``,
    ``min_lr``, ``to_step``). An event without ``reason`` is ``ABORT_CONSECUTIVE``'s.
    """
    event: Event = {
        "type": "abort",
        "step": step,
        "consecutive": consecutive,
        "weights_nonfinite": weights_nonfinite,
    }
    if reason is not None:
        event["reason"] = reason
    return {**event, **fields}


def loss_scale_collapse(
    step: int,
    loss_scale: float,
    floor: float,
    consecutive_overflows: int,
    recent_scales: list[tuple[int, float]],
) -> Event:
    """The GradScaler's scale fell below ``floor``, or it overflowed too many steps in a row."""
    return {
        "type": "loss_scale_collapse",
        "step": step,
        "loss_scale": loss_scale,
        "floor": floor,
        "consecutive_overflows": consecutive_overflows,
        "recent_scales": list(recent_scales),
        "message": _COLLAPSE_MESSAGE,
    }


def layers(step: int, parameters: list[str], added: list[str], lr: float | None = None) -> Event:
    """Parameters joined the guard at ``step`` (unfrozen, or added with ``add_param_group``): from
    this step on they are measured, clipped and checked. ``added``: the layers new to the log
    (``meta.json``'s ``layers`` lists them too); a parameter of a known layer adds none. ``lr``: the
    highest learning rate of the param groups that hold them (the step's logged rate is group 0's)."""
    event: Event = {"type": "layers", "step": step, "parameters": list(parameters), "added": list(added)}
    if lr is not None:
        event["lr"] = lr
    return event


def explosion(step: int, onset_step: int, *, action: str, **fields: Any) -> Event:
    """The gradient norm exploded: a climb that began at ``onset_step`` (the run table's onset),
    confirmed at ``step``. ``action`` is the ``on_explosion`` policy (``"warn"``, ``"recover"``);
    ``fields`` add the evidence (``baseline_norm``, ``peak_norm``) and, for a recovery, what was done
    (``to_step``: the snapshot rewound to; ``clip`` ``"auto"`` and its ``polyak`` fraction: the
    bound from now on under SGD; ``max_norm``: the clip threshold from now on (Adam-like, momentum); ``lr``;
    ``recoveries`` so far; or ``recovered`` false and a ``note``)."""
    return {"type": "explosion", "step": step, "onset_step": onset_step, "action": action, **fields}


def buffers(step: int, names: list[str], *, skipped: bool) -> Event:
    """Buffers found non-finite after the non-finite step ``step`` (``names``: BatchNorm's running
    statistics, written by that step's forward in train mode): ``skipped``: the step was skipped, so
    the weights are untouched but these buffers are not — the model's eval output is non-finite."""
    return {"type": "buffers", "step": step, "buffers": list(names), "skipped": skipped}
