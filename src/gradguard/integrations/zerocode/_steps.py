"""The runner's step path: a step's loss, measuring (and deciding) a step, and the hooks of an
optimizer's step, its closure and ``GradScaler.step`` (see
:class:`~gradguard.integrations.zerocode.runner.ZeroCode`).

Each function takes the runner (``zc``, typed ``Any``: runner.py imports this module)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradguard._guard.callerclip import CallerClip
from gradguard.integrations._common import drop_grads, what_it_steps
from gradguard.integrations.zerocode._lookup import session_of
from gradguard.integrations.zerocode._signals import deliver_lost
from gradguard.integrations.zerocode.sessions import ManualUpdate, Session


# ----------------------------------------------------------------------------- measuring a step
def take_loss(zc: Any) -> Tensor | None:
    """The step's loss: the sum of what was back-propagated since the last step."""
    losses, zc._losses = zc._losses, []
    zc._zeroed_since = False
    zc._scaled.clear()
    if losses:
        zc._last_loss = losses[0] if len(losses) == 1 else torch.stack([x.float() for x in losses]).sum()
    return zc._last_loss  # several optimizers stepping after one backward share it


def fresh(zc: Any, session: Session) -> bool:
    """Whether this step is not measured yet (a new backward since the last measurement)."""
    if session.measured_at is not None and session.measured_at != zc._backwards:
        session.end_step()  # the script skipped its own step: that one is over
    return session.measured_at is None


def measure(
    zc: Any,
    session: Session,
    *,
    loss: Tensor | float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip: CallerClip | None = None,
) -> bool:
    """Measure (and decide) the session's step now; ``True``: the step may be taken. Its record
    and events carry ``global_step``: the optimizer steps measured before it, in the process."""
    if loss is None:
        loss = take_loss(zc)
    fields = {"global_step": zc.global_step}
    zc.global_step += 1
    zc.take_loss_description(session)
    if not session.manual:
        watch_zeroing(zc, session)
    if session.manual:
        ok = measure_by_hand(session, loss, clip, fields)
    else:
        ok = session.guard.before_step(loss, scaler=scaler, clip=clip, fields=fields)
    if not session.manual and len(zc._order) == 1 and session.guard.step_count <= _ACCUMULATION_STEPS:
        session.micro_batches = max(session.micro_batches, zc._backwards - (session.backwards_seen or 0))
    session.measured_at = session.backwards_seen = zc._backwards
    session.skip = not ok and not session.manual
    if not ok:
        zc.live.bad_step(session.guard)
        zc.check_models_outside_optimizers()
    return ok


_ACCUMULATION_STEPS = 3  # the first steps whose backward() calls are counted (gradient accumulation)
UNZEROED_STEPS = 3  # steps in a row with no zero_grad() and the same .grad tensors: the gradients add up


def watch_zeroing(zc: Any, session: Session) -> None:
    """Whether the script zeroes the gradients between optimizer steps: no ``zero_grad()`` call (of
    any optimizer or module) since the session's last step, and its first gradient still the same
    tensor (``p.grad = None`` would have made a new one), :data:`UNZEROED_STEPS` steps in a row, is
    a script that never zeroes them — each step applies the sum of every gradient so far; unless
    the gradient tensor was written in place more often than ``backward()`` accumulated into it with
    no clip to explain it (zeroed by hand: ``p.grad.zero_()``). Said once, live and in ``meta.json``
    (``gradients_not_zeroed``: the first step that did not zero), where diagnose reads it. Host work
    only: a counter, an ``id`` and a version counter."""
    grad = next(
        (p.grad for g in session.guard.optimizer.param_groups for p in g["params"] if p.grad is not None),
        None,
    )
    kept = grad is not None and id(grad) == session.grad_id and zc.zero_grads == session.zero_grads
    if kept and grad is not None and not (session.clips or session.guard.clipper is not None):
        # written in place more often than the backward() calls since the last step: zeroed by hand
        # (p.grad.zero_(), p.grad.mul_(0)), as no clip wrote it either
        kept = grad._version - session.grad_version <= zc._backwards - (session.backwards_seen or 0)
    session.grad_id, session.zero_grads = (id(grad) if grad is not None else None), zc.zero_grads
    session.grad_version = grad._version if grad is not None else 0
    session.unzeroed = session.unzeroed + 1 if kept else 0
    if session.unzeroed != UNZEROED_STEPS:
        return
    first = session.guard.step_count - UNZEROED_STEPS + 1  # the first step that did not zero before it
    if session.guard.writer is not None:
        session.guard.writer.update_meta(gradients_not_zeroed=first)
    zc._say(
        f"{type(session.guard.optimizer).__name__}'s gradients have not been zeroed since step {first - 1} "
        f"(steps {first}–{first + UNZEROED_STEPS - 1}: "
        "no zero_grad() between them): every step applies the sum of all the gradients so far. "
        "Call optimizer.zero_grad() before each backward (or after each step)."
    )


def measure_by_hand(
    session: Session,
    loss: Tensor | float | None,
    clip: CallerClip | None,
    fields: dict[str, Any],
) -> bool:
    """A hand-updated step, measured by its monitor-only guard (nothing skipped), which
    locates a non-finite step itself before the script's update (``Guard.last_step_nonfinite``).
    ``False``: the step was seen non-finite (the script updates its weights anyway)."""
    deliver_lost()
    session.guard.before_step(loss, clip=clip, fields=fields)
    _check_updated(session)
    return not session.guard.last_step_nonfinite


NEVER_UPDATED_AT = 5  # the hand-updated step at which parameters still as at the first are said


def _check_updated(session: Session) -> None:
    """Whether a "hand-updated" model is updated at all: its parameters' sums at its first measured step
    and at step :data:`NEVER_UPDATED_AT` (two host reads in the run). Unchanged: no optimizer steps them
    and the script does not either (an optimizer built before the model's head was replaced holds the old
    head: the run sat at ln 10 and read "stalled … check the signal"). Said once, in ``meta.json``
    (``never_updated``), where diagnose's ``stalled`` reads it."""
    guard = session.guard
    if guard.step_count not in (1, NEVER_UPDATED_AT):
        return
    params = list(guard.optimizer.param_groups[0]["params"])
    with torch.no_grad():
        sums = torch.stack(
            [p.detach().double().sum().cpu() for p in params]
        ).tolist()  # host sync: twice a run
    if guard.step_count == 1:
        session.sums = sums
        return
    if session.sums != sums:
        return
    ids = {id(p) for p in params}
    names = ", ".join([n for n, p in guard.model.named_parameters() if id(p) in ids][:4])
    if guard.writer is not None:
        guard.writer.update_meta(never_updated=names)
    print(
        f"gradguard: {what_it_steps(guard)}'s trainable parameters ({names}) have not changed in "
        f"{NEVER_UPDATED_AT - 1} steps: no optimizer steps them and the script does not update them. An optimizer "
        "built before the model (or its head) was replaced holds the old parameters: build it after the change.",
        file=sys.stderr,
    )


def scaler_of(zc: Any, optimizer: torch.optim.Optimizer) -> torch.amp.GradScaler | None:
    """The GradScaler that scaled this step's loss, if it unscaled this optimizer's gradients."""
    scaler = zc._scaler() if zc._scaler is not None else None
    if scaler is None or not scaler.is_enabled():
        return None
    from torch.amp.grad_scaler import OptState  # (a scaler is in use: not on every plain step)

    state = scaler._per_optimizer_states.get(id(optimizer))  # GradScaler's own bookkeeping
    return scaler if state is not None and state["stage"] is OptState.UNSCALED else None


def measure_step(zc: Any, session: Session, *, clip: CallerClip | None = None) -> None:
    """Measure the session's step with the scaler that unscaled it (if any)."""
    measure(zc, session, scaler=scaler_of(zc, session.guard.optimizer), clip=clip)


# ----------------------------------------------------------------------------- optimizer steps
def on_step(zc: Any, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
    """The global optimizer step pre-hook (``args[0]`` is the optimizer; a further argument is a closure)."""
    deliver_lost()
    if isinstance(optimizer, ManualUpdate):
        return None
    zc.end_loss_code()
    if zc.frameworks.callbacks:
        session = session_of(zc, optimizer)
        if session is not None and session.framework:  # the Trainer's callback measured, gates it
            zc._losses = []
            zc.take_loss_description(session)
            return None
    closure = args[1] if len(args) > 1 else kwargs.get("closure")
    if closure is not None:  # the model runs inside the closure: the session waits for it
        if optimizer in zc._unguarded:
            return None
        wrapped = guarded_closure(zc, optimizer, closure)
        if len(args) > 1:
            return (args[0], wrapped, *args[2:]), kwargs
        return args, {**kwargs, "closure": wrapped}
    session = session_of(zc, optimizer)
    if session is None:
        return None
    if fresh(zc, session):
        measure(zc, session)
    if session.skip:
        drop_grads(optimizer)  # the step that runs right after this hook then changes nothing
    session.end_step()
    return None


def guarded_closure(
    zc: Any, optimizer: torch.optim.Optimizer, closure: Callable[..., Any]
) -> Callable[..., Any]:
    """The closure ``optimizer.step`` gets: its first evaluation (the step's loss and gradients)
    is measured; a bad one has its gradients dropped (LBFGS then stops with the weights as they
    were). Its arguments go to the script's closure as given (a line search's
    ``closure(backward=False)``)."""
    first = True

    def guarded(*args: Any, **kwargs: Any) -> Any:
        nonlocal first
        loss = closure(*args, **kwargs)
        if first:
            first = False
            zc._losses = []
            value = loss.detach() if isinstance(loss, Tensor) else loss
            zc.patches.call("optimizer.step(closure)", call_once, zc, optimizer, value)
        return loss

    return guarded


def call_once(zc: Any, optimizer: torch.optim.Optimizer, loss: Tensor | float | None) -> None:
    """The first evaluation of a closure: measure the step (the session is made here if needed)."""
    session = session_of(zc, optimizer)
    if session is None:
        return
    if fresh(zc, session):  # else measured inside the closure, at the script's clip (Lightning)
        measure(zc, session, loss=loss)
    if session.skip:
        drop_grads(optimizer)
    session.end_step()


def on_scaler_step(zc: Any, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Before ``GradScaler.step``: unscale as it would, measure with the scaler. ``False``: skip it."""
    from torch.amp.grad_scaler import OptState

    deliver_lost()
    zc.end_loss_code()
    session = session_of(zc, optimizer)
    if session is None or session.framework:
        return True
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.READY:
        # what GradScaler.step does first itself; a fused optimizer then gets no grad_scale (its
        # kernel would unscale): the step is measured on the true gradients either way
        scaler.unscale_(optimizer)
    if fresh(zc, session):
        measure(zc, session, scaler=scaler if state["stage"] is OptState.UNSCALED else None)
    if session.skip:
        session.end_step()
        return False
    return True
