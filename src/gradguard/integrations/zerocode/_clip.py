"""The script's own clipping (``clip_grad_norm_``, ``clip_grad_value_``): the step is measured on
the pre-clip gradients, the row gets the script's clip, or ``--clip`` replaces it (see
:class:`~gradguard.integrations.zerocode.runner.ZeroCode`).

Each function takes the runner (``zc``, typed ``Any``: runner.py imports this module)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradguard._guard.callerclip import CallerClip
from gradguard.integrations.zerocode._lookup import clip_target
from gradguard.integrations.zerocode._steps import fresh, measure_step
from gradguard.integrations.zerocode.sessions import Session
from gradguard.locate import user_source


def on_clip_norm(zc: Any, parameters: Any, max_norm: float, total_norm: Tensor) -> bool:
    """Inside ``clip_grad_norm_``, after torch computed the total norm and before it clips (see
    :func:`script_clip`); the row gets the script's threshold and coefficient, and torch's own
    total norm (to the last bit) when the call covered the whole optimizer."""
    if not float(max_norm) >= 0:  # a negative or NaN max_norm, which torch takes too: the script's own
        return True  # business — not recorded, never refused in its place (the step is measured at step())
    norm_type = zc.norm_type if zc.norm_type is not None else math.nan  # nan: not known

    def first(session: Session, params: list[Tensor], covers_all: bool) -> CallerClip:
        clip = CallerClip(norm_type=norm_type)
        clip.add(max_norm, total_norm, covers_all=covers_all)
        clip.known, zc.script_norms = zc.script_norms, None
        return clip

    def further(session: Session) -> None:  # another group of a measured step
        session.guard.record_clip(max_norm, total_norm, norm_type=norm_type)

    call = f"clip_grad_norm_(max_norm={float(max_norm):g})"
    clips = math.isfinite(float(max_norm))  # (max_norm=inf: a norm read for logging, after the step too)
    return script_clip(zc, parameters, call, first, further, clips=clips)


def total_norm(zc: Any, grads: Any, norm_type: float) -> Tensor | None:
    """Inside the script's ``clip_grad_norm_``, in place of torch's ``_get_total_norm``: for plain
    float32 gradients of one CPU / CUDA device (torch's foreach path), the total norm with torch's
    own ops (``_foreach_norm``, ``stack``, ``vector_norm``: the same number to the last bit), its
    per-tensor norms kept for the step's measurement (:attr:`CallerClip.known`: the guard reads the
    gradients once less). ``None`` for any other call: torch computes it."""
    p = float(norm_type)
    if not isinstance(grads, list) or not grads or math.isinf(p) or math.isnan(p):
        return None
    if grads[0].device.type not in ("cpu", "cuda"):
        return None
    index = grads[0].get_device()  # (-1: the CPU; no device object made a tensor)
    for g in grads:
        if type(g) is not Tensor or g.dtype is not torch.float32 or g.get_device() != index or g.is_sparse:
            return None
    norms = torch.stack(torch._foreach_norm(grads, p))
    zc.script_norms = (grads, norms)
    return torch.linalg.vector_norm(norms, p)


def on_clip_value(zc: Any, parameters: Any, clip_value: float) -> bool:
    """Before ``clip_grad_value_`` (see :func:`script_clip`); the row gets the fraction of
    elements the script's clip will clamp."""

    def grads() -> list[Tensor]:
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        return [p.grad for p in params if p.grad is not None]

    def first(session: Session, params: list[Tensor], covers_all: bool) -> CallerClip:
        clip = CallerClip()
        clip.add_value(clip_value, [p.grad for p in params if p.grad is not None])
        return clip

    def further(session: Session) -> None:  # a framework's value clip of the step its callback measured
        session.guard.record_clip_value(float(clip_value), grads())

    return script_clip(zc, parameters, f"clip_grad_value_(clip_value={float(clip_value):g})", first, further)


def script_clip(
    zc: Any,
    parameters: Any,
    call: str,
    first: Callable[[Session, list[Tensor], bool], CallerClip],
    further: Callable[[Session], None] | None,
    *,
    clips: bool = True,
) -> bool:
    """The script's own clip call, before it touches the gradients: the step is measured here,
    on the pre-clip gradients, with what ``first`` says of the clip; a later clip call of the
    same step goes to ``further``. ``False``: the script's clip is replaced (``--clip``)."""
    zc.end_loss_code()
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    session, covers_all = clip_target(zc, params)
    if session is None:
        return True
    session.clips = True
    if session.framework:  # the callback measured this step: its row gets the Trainer's clip
        if further is not None and not zc.replace_clip:
            _count_clip(session, call)
            further(session)
        return not zc.replace_clip
    if clips and fresh(zc, session) and _before_backward(zc, session, params):
        _misplaced(zc, session, call)
        return True
    if zc.replace_clip:
        replaced(zc, call)
        if fresh(zc, session):
            measure_step(zc, session)
        return False
    if fresh(zc, session):  # the step's first clip call: its row holds this clip
        _count_clip(session, call)
        measure_step(zc, session, clip=first(session, params, covers_all))
    elif further is not None:
        _name_call(session, call)  # (the step is counted: its first call measured it)
        further(session)
    return True


def _before_backward(zc: Any, session: Session, params: list[Tensor]) -> bool:
    """Whether the clip call comes before this step's ``backward()``: no gradient yet (zeroed to None),
    or no backward since the last measured step (zeroed in place)."""
    if all(p.grad is None for p in params if isinstance(p, Tensor)):
        return True
    # gradients there, and no backward() since the last step: zeroed in place (a script that never calls
    # backward(), writing .grad itself — torch.autograd.grad, evolution strategies — clips what it wrote)
    return zc._backwards > 0 and session.backwards_seen == zc._backwards


def _misplaced(zc: Any, session: Session, call: str) -> None:
    """The script clips before ``backward()``: nothing to clip; said once, in ``meta.json``
    (``clip_before_backward``, where diagnose reads it); the step is measured at the optimizer's step."""
    where = user_source(3)
    noted = {"call": call, "source": where or ""}
    at = f" at {where}" if where else ""
    zc.say_once(
        "clip before backward",
        f"the script's {call}{at} runs before loss.backward(): there are no new gradients to clip, so it "
        "clips nothing. Move it between loss.backward() and optimizer.step().",
    )
    writer = session.guard.writer
    if writer is not None and writer.meta.get("clip_before_backward") != noted:
        writer.update_meta(clip_before_backward=noted)


def replaced(zc: Any, call: str) -> None:
    zc.say_once(
        "clip",
        f"--clip {zc.options['clip']} replaces the script's own {call}; the script's call "
        "returns the pre-clip norm and leaves the gradients to gradguard's clipper.",
    )


def _count_clip(session: Session, call: str) -> None:
    """A clip of the script's (``clip_grad_norm_(max_norm=1)``, ``clip_grad_value_(clip_value=0.5)``): its
    step counted once, however many clip calls it made (one per group, a norm clip then a value clip);
    the summary names each distinct call (at most :data:`_CALLS_SAID`), the step's first first."""
    step = session.guard.step_count
    if session.script_clip_step != step:
        session.script_clip_step = step
        session.script_clips += 1
    _name_call(session, call)


def _name_call(session: Session, call: str) -> None:
    if call not in session.script_calls and len(session.script_calls) < _CALLS_SAID:
        session.script_calls.append(call)


_CALLS_SAID = 3
