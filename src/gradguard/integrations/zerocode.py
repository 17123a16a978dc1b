"""``gradguard run``: guard an unmodified training script, leaving no trace on its objects.

Nothing in the script changes, and nothing of gradguard is put on the script's models or
optimizers: while :class:`ZeroCode` is active it listens through torch's *global* hooks and a few
wrapped torch functions, all restored on exit (and switched off in a forked child, such as a
DataLoader worker):

* a global module forward pre-hook and forward hook note each *root* module (one called while no
  other module's forward runs) and feed its :class:`~gradguard.locate.StepCapture` (the inputs a
  replay needs, the loss-code watch): nothing is registered on the module, so ``torch.save(model)``
  writes what a plain run writes;
* ``torch.autograd.backward`` (what ``loss.backward()`` calls) notes the loss: a step's loss is the
  sum of what was back-propagated since the last step (all micro-batches of gradient
  accumulation), unscaled when it came from ``GradScaler.scale``;
* ``torch.nn.utils.clip_grad_norm_`` / ``clip_grads_with_norm_`` / ``clip_grad_value_``: the step is
  measured *before* the script's own clip, so the run log has the true pre-clip norm, and the
  script's threshold and coefficient; ``--clip`` on the command line replaces the script's clip;
* ``GradScaler.step`` / ``GradScaler.scale``: a step under a GradScaler is measured on unscaled
  gradients, an fp16 overflow is the scaler's business (logged, not a non-finite step), the loss
  and the scale are logged;
* a global optimizer step pre-hook measures the steps not measured yet (a script without clipping)
  and enforces the guard's decision: a skipped step has its gradients dropped, so the script's
  own ``optimizer.step()`` leaves the parameters and the optimizer state untouched. A closure
  (LBFGS) is wrapped: its first evaluation is measured, and a bad one ends the step unchanged.

* ``Optimizer.add_param_group`` (how every optimizer is built): the optimizers are known before
  their first step, so a clip call or a backward can be matched to its optimizer.

A model updated by hand (``p.data.add_(p.grad, alpha=-lr)``, no optimizer) is measured after each
``backward()`` (from its second step on, at its clip when the script clips) and a non-finite step
is replayed and located (one host read a step); such a step cannot be skipped, which is said once.

Known limits: a fused optimizer under a GradScaler whose script does not call ``unscale_`` is
measured on scaled gradients (its kernel unscales inside the step); two clip calls in one step log
the first one's threshold.

The first non-finite or skipped step, and the first gradient-norm spike, are reported on stderr
as they happen, then at most every :data:`LIVE_EVERY_S` seconds while it lasts.

Example::

    with ZeroCode(out="runs/exp") as zc:
        runpy.run_path("train.py", run_name="__main__")
    print(zc.summary())
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import sys
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import events, runlog
from gradguard._guard.apply import HostDecided
from gradguard.errors import GradGuardError
from gradguard.guard import Guard
from gradguard.integrations._common import drop_grads
from gradguard.locate import Birth, Locator, StepCapture, keep_out_of_pickles
from gradguard.record import COLUMN

__all__ = ["LIVE_EVERY_S", "ManualUpdate", "ZeroCode", "check_options", "run_script"]

LIVE_EVERY_S = 30.0  #: at most one live stderr line per this many seconds while a problem lasts
_CLIP_EPS = 1e-6  #: torch's clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)


class ManualUpdate(torch.optim.Optimizer):
    """Stands for a hand-written parameter update (no ``torch.optim`` optimizer): what a
    :class:`~gradguard.Guard` that only measures needs. It never steps."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__(list(params), {})

    # torch's own versions of these two are wrapped to import torch._dynamo (~2 s on a first use)

    def _patch_step_function(self) -> None:
        """Nothing to patch: it never steps."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        self.param_groups.append(param_group)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        raise GradGuardError("ManualUpdate stands for a hand-written update; it is never stepped.")


# ----------------------------------------------------------------------------- one optimizer's guard
class _Session:
    """The guard of one optimizer (or one hand-updated model) and the state of its current step."""

    def __init__(self, guard: Guard, *, manual: bool) -> None:
        self.guard = guard
        self.manual = manual
        self.param_ids = {id(p) for g in guard.optimizer.param_groups for p in g["params"]}
        self.measured_at: int | None = None  # the backward count when this step was measured
        self.skip = False
        self.clips = False  # the script clips this model's gradients (its steps are measured there)
        self.script_clips = 0  # steps the script's own clip_grad_norm_ ran on
        self.script_threshold: float | None = None
        self.capture: StepCapture | None = None  # the guard's capture (a hand-updated model's replay)
        self.replays = 0
        self._amend: dict[str, Tensor | float] | None = None
        self._record = guard.monitor.record
        guard.monitor.record = self._amended_record  # type: ignore[method-assign]

    def _amended_record(self, step: int, scalars: Tensor, *args: Any, **kwargs: Any) -> None:
        """The step's row, with what the script's own clip did (set by :meth:`ZeroCode._measure`)."""
        amend, self._amend = self._amend, None
        if amend:
            scalars = scalars.clone()
            for name, value in amend.items():
                scalars[COLUMN[name]] = value
        self._record(step, scalars, *args, **kwargs)

    def end_step(self) -> None:
        self.measured_at = None
        self.skip = False


def _before_step(guard: Guard, loss: Tensor | float | None, scaler: torch.amp.GradScaler | None) -> bool:
    """``guard.before_step(loss)``; under a GradScaler (gradients unscaled by the caller), the same
    with the scaler's overflow handling (an overflow is a skipped ``amp_overflow`` step, not a
    non-finite one) and the scale logged, ``scaler.update()`` left to the script.

    The scaler case reaches into the guard: it stands for a ``Guard.before_step(loss, scaler=...)``
    that the guard does not have yet (asked of its owner).
    """
    if scaler is None:
        return guard.before_step(loss)
    external = guard._apply_external
    guard._apply_external = HostDecided(guard.optimizer, steps=False, updates_scaler=False)
    try:
        guard._check_open()
        try:
            outcome = guard._step(loss, scaler, external=True)
        finally:
            guard._anomaly.end_step()
    finally:
        guard._apply_external = external
    return not bool(outcome.skipped)  # decided on the host already: no new sync


# ----------------------------------------------------------------------------- roots
class _Root:
    """A model the script called at the top level, and the captures (one per guard) fed from its calls."""

    def __init__(self, module: nn.Module) -> None:
        self.ref = weakref.ref(module)
        model = getattr(module, "_orig_mod", module)  # torch.compile: replay and name the eager model
        self.model_ref = weakref.ref(model)
        self.captures: list[StepCapture] = []
        self.unused: StepCapture | None = None  # the capture waiting for the first guard
        self.kind: str | None = None  # "optimizer" or "manual", once its first backward is seen
        # the guard's own anomaly path may hook the model for one forward: never into a pickle
        self.kept_out = keep_out_of_pickles(type(module))

    @property
    def model(self) -> nn.Module | None:
        return self.model_ref()

    def new_capture(self, *, watch: bool) -> StepCapture:
        model = self.model
        assert model is not None
        capture = StepCapture(model, hooks=False, watch_loss=watch)
        self.captures.append(capture)
        return capture

    def take_capture(self) -> StepCapture:
        """The capture for a new guard of this model: the one fed since its first call, else a new one."""
        capture, self.unused = self.unused, None
        return capture if capture is not None else self.new_capture(watch=False)


# ----------------------------------------------------------------------------- the runner
class ZeroCode:
    """Guards every optimizer that steps while active (see the module docstring).

    Args:
        out: the run directory of the first guard (later ones get ``<out>/optimizer<k>``);
            ``None``: ``gradguard-runs/<time>-<name>``.
        name: the run's name (the script's).
        live: report the first bad step (and spikes) on stderr as they happen.
        scan_existing: optimizers may exist before the runner starts (it looks for them once, when
            a model's first backward needs to know whether an optimizer or a hand-written update
            trains it); ``gradguard run`` starts before the script, so it passes ``False``.
        **guard: :class:`gradguard.Guard` options (``clip``, ``on_nonfinite``, ``every``…).
            Defaults here: ``clip="none"`` (measure only), ``on_nonfinite="skip"``; the others are
            the guard's. A ``clip`` other than ``"none"`` replaces the script's own clipping.
    """

    def __init__(
        self,
        out: str | os.PathLike[str] | None = None,
        name: str = "run",
        *,
        live: bool = True,
        scan_existing: bool = True,
        **guard: Any,
    ) -> None:
        self.out = Path(out) if out is not None else runlog.default_run_dir(name)
        self.name = name
        self.options = {"clip": "none", "on_nonfinite": "skip", **guard}
        self.replace_clip = self.options["clip"] not in (None, "none")
        self.sessions: dict[int, _Session] = {}  # id(optimizer) → session
        self._order: list[_Session] = []
        self._roots: dict[int, _Root] = {}
        self._inner: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # submodules of roots (never roots)
        self._not_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # called, without parameters
        self._called: dict[int, _Root] = {}  # roots called with grad since the last backward
        self._depth = 0
        self._watching: StepCapture | None = None
        self._unguarded: set[int] = set()
        self._losses: list[Tensor] = []
        self._last_loss: Tensor | None = None
        self._scaled: dict[int, tuple[weakref.ref[Tensor], Tensor]] = {}
        self._scaler: weakref.ref[torch.amp.GradScaler] | None = None
        self._backwards = 0
        self._norm_type: float | None = None  # of the clip_grad_norm_ call under way
        self._said: set[str] = set()
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self.scan_existing = scan_existing
        self.live = _Live(enabled=live)
        self._patches = _Patches(self)
        self._active = False

    @property
    def guards(self) -> dict[int, Guard]:
        """``{id(optimizer): guard}`` of every guard made so far (hand-updated models included)."""
        return {key: s.guard for key, s in self.sessions.items()}

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> ZeroCode:
        self._patches.install()
        self._active = True
        _ACTIVE.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and wrapper; close the guards (their logs flushed). Safe to call twice."""
        if self._active:
            self._active = False
            self._patches.remove()
            _ACTIVE.discard(self)
        for root in self._roots.values():
            for capture in root.captures:
                capture.remove()
            root.kept_out.remove()
        errors = []
        for session in self._order:
            try:
                session.guard.close()
            except Exception as e:  # one guard's log must not keep the others from closing
                errors.append(e)
        if errors:
            self._say(f"could not close a run log ({errors[0]})")

    def forked(self) -> None:
        """In a forked child (a DataLoader worker): take off every hook, wrapper and mode, forget
        the captures and the run logs (the parent's files are never written from here)."""
        self._active = False
        self._patches.remove()
        for root in self._roots.values():
            for capture in root.captures:
                capture.forget()
            root.kept_out.remove()
        for session in self._order:
            session.guard.writer = None
            session.guard.monitor.writer = None
        self._order, self.sessions, self._roots = [], {}, {}

    # ------------------------------------------------------------------ module calls
    def on_call(self, module: nn.Module, args: Any) -> None:
        """The global forward pre-hook: a root's call starts (feed its captures)."""
        if self._depth == 0 and module not in self._inner and torch._C._current_graph_task_id() == -1:
            root = self._root_of(module)
            if root is not None:
                if self._watching is not None:
                    self._watching.stop_watching()
                    self._watching = None
                for capture in root.captures:
                    capture.pre(module, args, {})
                if torch.is_grad_enabled():
                    self._called[id(module)] = root
        self._depth += 1

    def on_return(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        """The global forward hook: a root's call returned (start watching its loss code)."""
        self._depth = max(0, self._depth - 1)
        if self._depth != 0:
            return
        root = self._roots.get(id(module))
        if root is None or root.ref() is not module or torch._C._current_graph_task_id() != -1:
            return
        for capture in root.captures:
            capture.post_with_kwargs(module, args, kwargs, out)
            if capture.watching:
                self._watching = capture

    def _root_of(self, module: nn.Module) -> _Root | None:
        """The root entry of a module called at the top level (made at its first call); ``None``
        for a module without parameters (a loss module)."""
        root = self._roots.get(id(module))
        if root is not None and root.ref() is module:
            return root
        if module in self._not_models:
            return None
        if next(module.parameters(), None) is None:
            self._not_models.add(module)
            return None
        return self._new_root(module)

    def _new_root(self, module: nn.Module) -> _Root:
        root = _Root(module)
        self._roots[id(module)] = root  # (an entry whose module died is replaced here)
        self._inner.update(m for m in module.modules() if m is not module)
        # capture from this very call on (a guard comes at the first step); only the first model
        # watches its loss code (the watches are modes: one at a time)
        root.unused = root.new_capture(
            watch=not any(r.captures for r in self._roots.values() if r is not root)
        )
        return root

    def _root_owning(self, ids: set[int]) -> _Root | None:
        """The smallest root (model) that owns every parameter in ``ids``."""
        best: tuple[int, _Root | None] = (0, None)
        for root in self._roots.values():
            model = root.model
            if model is None or root.ref() is None:
                continue
            owned = {id(p) for p in model.parameters()}
            if ids <= owned and (best[1] is None or len(owned) < best[0]):
                best = (len(owned), root)
        return best[1]

    # ------------------------------------------------------------------ sessions
    def _session_of(self, optimizer: torch.optim.Optimizer) -> _Session | None:
        """The optimizer's session; made at its first step (or clip). ``None``: not guarded."""
        session = self.sessions.get(id(optimizer))
        if session is not None or id(optimizer) in self._unguarded:
            return session
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        root = self._root_owning(ids)
        if root is None:
            self._unguarded.add(id(optimizer))
            self._say(
                f"{type(optimizer).__name__} steps parameters that no model called so far owns; "
                "this optimizer is not guarded."
            )
            return None
        root.kind = "optimizer"
        guard, _ = self._guard(root, optimizer, dict(self.options))
        return self._add(id(optimizer), _Session(guard, manual=False))

    def _manual_session(self, root: _Root) -> _Session | None:
        """The session of a model updated by hand: measured and located, never skipped."""
        model = root.model
        if model is None:
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        options = {**self.options, "clip": None, "monitor_only": True}
        if options.get("on_nonfinite") != "raise":
            options["on_nonfinite"] = "warn"
        if options.get("on_spike") in ("clip", "skip"):
            options["on_spike"] = "warn"
        for unused in (
            "snapshot_every",
            "snapshot_dir",
            "lr_backoff",
            "min_lr",
            "max_rollbacks",
            "rollback_window",
        ):
            options.pop(unused, None)
        stand_in = ManualUpdate(params)
        guard, capture = self._guard(root, stand_in, options)
        self._say(
            f"{type(model).__name__}'s parameters are updated by hand (no torch.optim optimizer steps "
            "them): each step is measured and a non-finite one is located, but gradguard cannot skip it."
        )
        session = self._add(id(stand_in), _Session(guard, manual=True))
        session.capture = capture
        return session

    def _guard(
        self, root: _Root, optimizer: torch.optim.Optimizer, options: dict[str, Any]
    ) -> tuple[Guard, StepCapture | None]:
        """A guard of ``root``'s model for ``optimizer`` (its run directory, its capture)."""
        k = len(self._order)
        log_dir = self.out if k == 0 else self.out / f"optimizer{k}"
        locate = options.pop("locate", True)
        capture = root.take_capture() if locate else None
        model = root.model
        assert model is not None
        guard = Guard(
            model, optimizer, log_dir=log_dir, name=self.name, capture=capture, locate=locate, **options
        )
        guard.add_flush_callback(self.live.flushed(guard))
        return guard, capture

    def _add(self, key: int, session: _Session) -> _Session:
        self.sessions[key] = session
        self._order.append(session)
        return session

    def _optimizers_holding(self, ids: set[int]) -> list[torch.optim.Optimizer]:
        """The optimizers that hold any of these parameters (one that has not stepped yet is
        known only from its creation, seen through ``add_param_group``)."""
        if self.scan_existing:  # optimizers made before the runner started: looked for once
            self.scan_existing = False
            self._optimizers.update(_all_optimizers())
        return [o for o in self._optimizers if any(id(p) in ids for g in o.param_groups for p in g["params"])]

    def on_param_group(self, optimizer: torch.optim.Optimizer) -> None:
        """``Optimizer.add_param_group`` (also how an optimizer is built): note the optimizer."""
        if not isinstance(optimizer, ManualUpdate):
            self._optimizers.add(optimizer)

    def _session_for_params(self, params: list[Tensor]) -> _Session | None:
        """The session whose model these parameters belong to (a clip call): made if needed."""
        ids = {id(p) for p in params}
        for session in self._order:
            if ids & session.param_ids:
                return session
        for optimizer in self._optimizers_holding(ids):
            found = self._session_of(optimizer)
            if found is not None:
                return found
        root = self._root_owning(ids)
        if root is None or root.kind == "optimizer":
            return None
        root.kind = "manual"
        return self._manual_session(root)

    # ------------------------------------------------------------------ the loss
    def on_scale(self, scaler: torch.amp.GradScaler, outputs: Any, scaled: Any) -> None:
        """``GradScaler.scale(loss)``: remember the unscaled loss behind the scaled one."""
        if scaled is outputs:  # a disabled scaler
            return
        self._scaler = weakref.ref(scaler)
        if isinstance(outputs, Tensor) and isinstance(scaled, Tensor) and outputs.numel() == 1:
            if len(self._scaled) > 64:
                self._scaled.clear()
            self._scaled[id(scaled)] = (weakref.ref(scaled), outputs.detach())

    def on_backward(self, tensors: Any) -> None:
        """``torch.autograd.backward``: a loss (a one-element tensor) joins the step's loss; the
        captures of the models called since the last backward keep the gradient of their output."""
        if self._watching is not None:
            self._watching.loss_code_done()
        for root in self._called.values():
            for capture in root.captures:
                capture.before_backward()
        if isinstance(tensors, Tensor) and tensors.numel() == 1:
            entry = self._scaled.pop(id(tensors), None)
            loss = entry[1] if entry is not None and entry[0]() is tensors else tensors.detach()
            self._losses.append(loss.reshape(()))

    def end_loss_code(self) -> None:
        """After ``backward()``, at the runner's next hook (clip, step): leave the loss watch's mode,
        so the ops that follow (clipping, the optimizer's update) run without it."""
        if self._watching is not None and self._watching.loss_code_over():
            self._watching.stop_watching(compact=False)  # the step's last window: read or released soon
            self._watching = None

    def after_backward(self) -> None:
        """A backward ended: measure the models updated by hand (unless their clip comes next)."""
        self._backwards += 1
        called, self._called = self._called, {}
        for root in called.values():
            if root.kind is None:
                root.kind = self._kind_of(root)
            if root.kind != "manual":
                continue
            session = self._session_of_root(root) or self._manual_session(root)
            if session is not None and not session.clips:
                self._measure(session)  # the step ends with the next backward (see _fresh)

    def _kind_of(self, root: _Root) -> str:
        model = root.model
        if model is None:
            return "optimizer"
        ids = {id(p) for p in model.parameters()}
        return "optimizer" if self._optimizers_holding(ids) else "manual"

    def _session_of_root(self, root: _Root) -> _Session | None:
        model = root.model
        return next((s for s in self._order if s.manual and s.guard.model is model), None)

    def _take_loss(self) -> Tensor | None:
        """The step's loss: the sum of what was back-propagated since the last step."""
        losses, self._losses = self._losses, []
        self._scaled.clear()
        if losses:
            self._last_loss = (
                losses[0] if len(losses) == 1 else torch.stack([x.float() for x in losses]).sum()
            )
        return self._last_loss  # several optimizers stepping after one backward share it

    # ------------------------------------------------------------------ measuring a step
    def _fresh(self, session: _Session) -> bool:
        """Whether this step is not measured yet (a new backward since the last measurement)."""
        if session.measured_at is not None and session.measured_at != self._backwards:
            session.end_step()  # the script skipped its own step: that one is over
        return session.measured_at is None

    def _measure(
        self,
        session: _Session,
        *,
        loss: Tensor | float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        amend: dict[str, Tensor | float] | None = None,
    ) -> bool:
        """Measure (and decide) the session's step now; ``True``: the step may be taken."""
        if loss is None:
            loss = self._take_loss()
        session._amend = amend
        try:
            if session.manual:
                ok = self._measure_by_hand(session, loss)
            else:
                ok = _before_step(session.guard, loss, scaler)
        finally:
            session._amend = None
        session.measured_at = self._backwards
        session.skip = not ok and not session.manual
        if not ok:
            self.live.bad_step(session.guard)
        return ok

    def _measure_by_hand(self, session: _Session, loss: Tensor | float | None) -> bool:
        """A hand-updated step: measured (monitor only, nothing skipped); a non-finite one is then
        replayed and located here, from the capture the guard is done with (one host read a step:
        the script updates its weights whatever the answer)."""
        guard, capture = session.guard, session.capture
        if capture is None:
            return guard.before_step(loss)
        with capture.pinned():
            guard.before_step(loss)
            norm = guard.last_grad_norm
            if norm is None or bool(torch.isfinite(norm)):  # host sync: see the docstring
                return True
            if session.replays < guard.max_replays and capture.inputs is not None:
                session.replays += 1
                self._locate_by_hand(session, capture)
        return False

    def _locate_by_hand(self, session: _Session, capture: StepCapture) -> None:
        """Replay a bad hand-updated step and write where its first non-finite value was born."""
        guard = session.guard
        found, how = capture.replay(Locator(guard.model))
        if found is None:
            return
        fields = found.event() if isinstance(found, Birth) else dict(found)
        located_by = "watch" if how == "watch" else "replay"
        event = events.nonfinite(guard.step_count - 1, **fields, located_by=located_by, policy="warn")
        if guard.writer is not None:
            guard.writer.write_event(event)

    def _scaler_of(self, optimizer: torch.optim.Optimizer) -> torch.amp.GradScaler | None:
        """The GradScaler that scaled this step's loss, if it unscaled this optimizer's gradients."""
        from torch.amp.grad_scaler import OptState

        scaler = self._scaler() if self._scaler is not None else None
        if scaler is None or not scaler.is_enabled():
            return None
        state = scaler._per_optimizer_states.get(id(optimizer))  # GradScaler's own bookkeeping
        return scaler if state is not None and state["stage"] is OptState.UNSCALED else None

    # ------------------------------------------------------------------ the script's clip
    def on_clip_norm(self, parameters: Any, max_norm: float, total_norm: Tensor) -> bool:
        """Inside ``clip_grad_norm_``, after torch computed the total norm and before it clips:
        measure the step on the pre-clip gradients. ``False``: the script's clip is replaced."""
        self.end_loss_code()
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        session = self._session_for_params(params)
        if session is None:
            return True
        session.clips = True
        if not self._fresh(session):
            return not self.replace_clip
        if self.replace_clip:
            self._replaced("clip_grad_norm_", f"max_norm={max_norm}")
            self._measure_step(session)
            return False
        max_norm = float(max_norm)
        session.script_clips += 1
        session.script_threshold = max_norm
        total = total_norm.detach().float()
        coef = torch.clamp(max_norm / (total + _CLIP_EPS), max=1.0)
        amend: dict[str, Tensor | float] = {
            "threshold": max_norm,
            "clip_coef": coef,
            "clip_fraction": (coef < 1.0).float(),
        }
        if self._norm_type is not None and self._norm_type == session.guard.norm_type:
            amend["grad_norm"] = total  # torch's own number, to the last bit
        self._measure_step(session, amend=amend)
        return True

    def on_clip_value(self, parameters: Any, clip_value: float) -> bool:
        """Before ``clip_grad_value_``: measure the step on the unclipped gradients (and the
        fraction of elements the script's clip will clamp). ``False``: the clip is replaced."""
        self.end_loss_code()
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        session = self._session_for_params(params)
        if session is None:
            return True
        session.clips = True
        if not self._fresh(session):
            return not self.replace_clip
        if self.replace_clip:
            self._replaced("clip_grad_value_", f"clip_value={clip_value}")
            self._measure_step(session)
            return False
        grads = [p.grad for p in params if p.grad is not None]
        amend: dict[str, Tensor | float] = {}
        if grads:
            clamped = torch.stack([(g.detach().abs() > clip_value).sum() for g in grads]).sum()
            amend["clip_fraction"] = clamped.float() / max(1, sum(g.numel() for g in grads))
        session.script_clips += 1
        self._measure_step(session, amend=amend)
        return True

    def _measure_step(self, session: _Session, *, amend: dict[str, Tensor | float] | None = None) -> None:
        self._measure(session, scaler=self._scaler_of(session.guard.optimizer), amend=amend)

    def _replaced(self, what: str, how: str) -> None:
        self._say_once(
            "clip",
            f"--clip {self.options['clip']} replaces the script's own {what}({how}); the script's call "
            "returns the pre-clip norm and leaves the gradients to gradguard's clipper.",
        )

    # ------------------------------------------------------------------ optimizer steps
    def on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        """The global optimizer step pre-hook (``args[0]`` is the optimizer; a further argument is a closure)."""
        if isinstance(optimizer, ManualUpdate):
            return None
        self.end_loss_code()
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is not None:  # the model runs inside the closure: the session waits for it
            if id(optimizer) in self._unguarded:
                return None
            wrapped = self._closure(optimizer, closure)
            if len(args) > 1:
                return (args[0], wrapped, *args[2:]), kwargs
            return args, {**kwargs, "closure": wrapped}
        session = self._session_of(optimizer)
        if session is None:
            return None
        if self._fresh(session):
            self._measure(session)
        if session.skip:
            drop_grads(optimizer)  # the step that runs right after this hook then changes nothing
        session.end_step()
        return None

    def _closure(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any]) -> Callable[[], Any]:
        """The closure ``optimizer.step`` gets: its first evaluation (the step's loss and gradients)
        is measured; a bad one has its gradients dropped (LBFGS then stops with the weights as they
        were)."""
        first = True

        def guarded() -> Any:
            nonlocal first
            loss = closure()
            if first:
                first = False
                self._losses = []
                value = loss.detach() if isinstance(loss, Tensor) else loss
                self._patches.call("optimizer.step(closure)", self._call_once, optimizer, value)
            return loss

        return guarded

    def _call_once(self, optimizer: torch.optim.Optimizer, loss: Tensor | float | None) -> None:
        """The first evaluation of a closure: measure the step (the session is made here if needed)."""
        session = self._session_of(optimizer)
        if session is None:
            return
        if not self._measure(session, loss=loss):
            drop_grads(optimizer)
        session.end_step()

    def on_scaler_step(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
        """Before ``GradScaler.step``: unscale as it would, measure with the scaler. ``False``: skip it."""
        from torch.amp.grad_scaler import OptState

        self.end_loss_code()
        session = self._session_of(optimizer)
        if session is None:
            return True
        state = scaler._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.READY and not getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # the first thing GradScaler.step does itself
        if self._fresh(session):
            self._measure(session, scaler=scaler if state["stage"] is OptState.UNSCALED else None)
        if session.skip:
            session.end_step()
            return False
        return True

    # ------------------------------------------------------------------ messages
    def _say(self, message: str) -> None:
        print(f"gradguard: {message}", file=sys.stderr)

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._say(message)

    def internal_error(self, where: str, error: BaseException) -> None:
        """A bug in gradguard's own hooks: say so once and stop guarding; the script goes on."""
        self._say_once(
            "internal",
            f"internal error in {where}; gradguard stops guarding this run, the script goes on:\n"
            + "".join(traceback.format_exception(error)).rstrip(),
        )
        if self._active:
            self._active = False
            self._patches.remove()

    def summary(self) -> str:
        """What happened, in a few lines for the terminal."""
        if not self._order:
            return "gradguard: no optimizer step was seen; nothing was guarded."
        return "\n".join(line for session in self._order for line in _summary_lines(session))


def _summary_lines(session: _Session) -> list[str]:
    guard = session.guard
    model = type(guard.model).__name__
    if session.manual:
        head = f"gradguard: hand-written update of {model}: {guard.step_count} steps measured (none can be skipped)"
    else:
        head = (
            f"gradguard: {type(guard.optimizer).__name__} on {model}: {guard.step_count} steps, "
            f"{guard.skipped_steps} skipped"
        )
    lines = [f"{head}. Run log: {guard.run_dir}"]
    if session.script_clips and session.script_threshold is not None:
        lines.append(
            f"  the script clipped the gradient norm to {session.script_threshold:g} itself on "
            f"{session.script_clips} steps (the log has the pre-clip norms)"
        )
    if guard.run_dir is None:
        return lines
    first = runlog.read_run(guard.run_dir).first_nonfinite()
    if first is not None:
        where = ", ".join(
            f"{k}={first.get(k)}" for k in ("phase", "module", "op", "kind", "source") if first.get(k)
        )
        reason = (first.get("evidence") or {}).get("reason")
        lines.append(
            f"  first non-finite value at step {first['step']}: {where}"
            + (f" — {reason}" if reason else "")
            + f" (located by {first.get('located_by')})"
        )
    return lines


def _all_optimizers() -> list[torch.optim.Optimizer]:
    """Every optimizer in the process: a walk over the objects the garbage collector tracks."""
    found = []
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: it reads __class__, which some objects warn or raise on
        if issubclass(kind, torch.optim.Optimizer) and not issubclass(kind, ManualUpdate):
            found.append(obj)
    return found


# ----------------------------------------------------------------------------- live lines
class _Live:
    """stderr lines while the run goes: the first bad step and spike at once, then rate-limited."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def _line(self, key: str, first: Callable[[], str], again: Callable[[int], str]) -> None:
        """The first occurrence of ``key`` at once; then a count at most every :data:`LIVE_EVERY_S`."""
        if not self.enabled:
            return
        n = self._count[key] = self._count.get(key, 0) + 1
        now = time.monotonic()
        if n == 1:
            message = first()
        elif now - self._last.get(key, 0.0) >= LIVE_EVERY_S:
            message = again(n)
        else:
            return
        self._last[key] = now
        print(f"gradguard: {message}", file=sys.stderr, flush=True)

    def bad_step(self, guard: Guard) -> None:
        """A step the guard decided on the host was bad (skipped, rolled back, or not skippable)."""
        step = guard.step_count - 1
        self._line(
            f"bad{id(guard)}",
            lambda: (
                f"step {step} of {_name(guard)} is not finite{_where(guard)}: "
                + ("measured only." if isinstance(guard.optimizer, ManualUpdate) else f"{_policy(guard)}.")
            ),
            lambda n: (
                f"{n} bad steps so far (last: step {step}); `gradguard diagnose {guard.run_dir}` explains."
            ),
        )

    def flushed(self, guard: Guard) -> Callable[[list[dict[str, Any]]], None]:
        """A flush callback: non-finite steps the host learns of at a flush, and norm spikes."""

        def seen(records: list[dict[str, Any]]) -> None:
            for rec in records:
                if rec.get("nonfinite") and not rec.get("_decided"):
                    self._nonfinite_at_flush(guard, rec["step"])
                if rec.get("spike") and _finite(rec.get("grad_norm")):
                    self._spike(guard, rec["step"], rec["grad_norm"])

        return seen

    def _nonfinite_at_flush(self, guard: Guard, step: int) -> None:
        self._line(
            f"bad{id(guard)}",
            lambda: f"step {step} of {_name(guard)} is not finite{_where(guard)}.",
            lambda n: f"{n} non-finite steps so far (last: step {step}).",
        )

    def _spike(self, guard: Guard, step: int, norm: float) -> None:
        self._line(
            f"spike{id(guard)}",
            lambda: f"gradient norm spike at step {step} of {_name(guard)}: {norm:.4g}.",
            lambda n: f"{n} gradient norm spikes so far (last: step {step}, {norm:.4g}).",
        )


def _name(guard: Guard) -> str:
    if isinstance(guard.optimizer, ManualUpdate):
        return f"{type(guard.model).__name__} (updated by hand)"
    return f"{type(guard.optimizer).__name__} on {type(guard.model).__name__}"


_POLICY = {
    "skip": "skipped (parameters and optimizer state untouched)",
    "rollback": "rolled back to the last snapshot",
    "raise": "the run stops",
    "warn": "taken anyway (--on-nonfinite warn)",
}


def _policy(guard: Guard) -> str:
    return _POLICY.get(str(guard.on_nonfinite), str(guard.on_nonfinite))


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def _where(guard: Guard) -> str:
    """Where the last non-finite event of this guard located it (read back from its events file)."""
    if guard.run_dir is None:
        return ""
    try:
        event = runlog.read_run(guard.run_dir, records=False).first_nonfinite()
    except Exception:
        return ""
    if event is None:
        return ""
    parts = [f"{k}={event[k]}" for k in ("phase", "module", "op", "source") if event.get(k)]
    return f" ({', '.join(parts)})" if parts else ""


# ----------------------------------------------------------------------------- hooks and wrappers
_ACTIVE: weakref.WeakSet[ZeroCode] = weakref.WeakSet()


def _in_forked_child() -> None:
    for zc in list(_ACTIVE):
        zc.forked()
    _ACTIVE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_forked_child)


class _Patches:
    """Torch's global hooks and the wrapped torch functions of one :class:`ZeroCode` (installed on
    enter, restored on exit). Every wrapper passes straight through when the runner is off or
    while torch.compile traces, and a bug in gradguard never breaks the script's call."""

    def __init__(self, zc: ZeroCode) -> None:
        self.zc = zc
        self._handles: list[Any] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._filter: Any = None

    def install(self) -> None:
        from torch.amp.grad_scaler import GradScaler
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.nn.utils import clip_grad
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        zc = self.zc
        # torch warns that global hooks fire "an extra time" for a torch.compile'd module: these
        # know (the compiled module is the root; its inner module is not one), so the script's
        # user does not need to read it
        warnings.filterwarnings(
            "ignore", message=r"Using `torch.compile\(module\)` when there are global hooks"
        )
        self._filter = warnings.filters[0]
        self._handles = [
            register_module_forward_pre_hook(self._guarded("a model's call", zc.on_call)),
            register_module_forward_hook(
                self._guarded("a model's return", zc.on_return), with_kwargs=True, always_call=True
            ),
            register_optimizer_step_pre_hook(self._guarded("optimizer.step", zc.on_step)),
        ]
        self._wrap(torch.autograd, "backward", self._backward)
        self._wrap(torch.optim.Optimizer, "add_param_group", self._add_param_group)
        self._wrap(GradScaler, "scale", self._scale)
        self._wrap(GradScaler, "step", self._scaler_step)
        clip_norm = self._clip_norm(clip_grad.clip_grad_norm_)
        clip_with_norm = self._clip_with_norm(clip_grad._clip_grads_with_norm_)
        clip_value = self._clip_value(clip_grad.clip_grad_value_)
        for module in (clip_grad, torch.nn.utils):
            self._wrap(module, "clip_grad_norm_", lambda _: clip_norm)
            self._wrap(module, "clip_grad_value_", lambda _: clip_value)
        self._wrap(clip_grad, "_clip_grads_with_norm_", lambda _: clip_with_norm)
        self._wrap(torch.nn.utils, "clip_grads_with_norm_", lambda _: clip_with_norm)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._filter in warnings.filters:
            warnings.filters.remove(self._filter)  # type: ignore[attr-defined]
            warnings._filters_mutated()  # type: ignore[attr-defined]
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def _wrap(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        self._saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def _on(self) -> bool:
        return self.zc._active and not torch.compiler.is_compiling()

    def _guarded(self, where: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as a hook: off while torch.compile traces or the runner is off; gradguard's own
        bugs reported, not raised (a guard's stop — :class:`GradGuardError` — is raised)."""

        def hook(*args: Any, **kwargs: Any) -> Any:
            if not self._on():
                return None
            try:
                return fn(*args, **kwargs)
            except GradGuardError:
                raise
            except Exception as e:
                self.zc.internal_error(where, e)
                return None

        return hook

    def call(self, where: str, fn: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        """``fn(*args)`` unless the runner is off; gradguard's own bugs reported, not raised."""
        if not self._on():
            return default
        try:
            return fn(*args)
        except GradGuardError:
            raise
        except Exception as e:
            self.zc.internal_error(where, e)
            return default

    def _backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            self.call("loss.backward()", self.zc.on_backward, tensors)
            result = original(tensors, *args, **kwargs)
            self.call("loss.backward()", self.zc.after_backward)
            return result

        return _like(original, backward)

    def _add_param_group(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def add_param_group(optimizer: Any, param_group: Any) -> Any:
            result = original(optimizer, param_group)
            self.call("Optimizer.add_param_group", self.zc.on_param_group, optimizer)
            return result

        return _like(original, add_param_group)

    def _scale(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def scale(scaler: Any, outputs: Any) -> Any:
            scaled = original(scaler, outputs)
            self.call("GradScaler.scale", self.zc.on_scale, scaler, outputs, scaled)
            return scaled

        return _like(original, scale)

    def _scaler_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def step(scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs or not scaler.is_enabled():
                return original(scaler, optimizer, *args, **kwargs)
            if not self.call("GradScaler.step", self.zc.on_scaler_step, scaler, optimizer, default=True):
                return None  # skipped: GradScaler.update() still learns of an overflow
            return original(scaler, optimizer)

        return _like(original, step)

    def _clip_norm(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def clip_grad_norm_(
            parameters: Any, max_norm: float, norm_type: float = 2.0, *args: Any, **kwargs: Any
        ) -> Any:
            self.call("clip_grad_norm_", self.zc.end_loss_code)  # before torch's norm pass
            self.zc._norm_type = float(norm_type)
            try:
                return original(parameters, max_norm, norm_type, *args, **kwargs)
            finally:
                self.zc._norm_type = None

        return _like(original, clip_grad_norm_)

    def _clip_with_norm(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def clip_grads_with_norm_(
            parameters: Any, max_norm: float, total_norm: Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            if isinstance(parameters, Iterable) and not isinstance(parameters, (Tensor, list, tuple)):
                parameters = list(parameters)  # a generator: read once here, once by torch
            if not self.call(
                "clip_grad_norm_", self.zc.on_clip_norm, parameters, max_norm, total_norm, default=True
            ):
                return None
            return original(parameters, max_norm, total_norm, *args, **kwargs)

        return _like(original, clip_grads_with_norm_)

    def _clip_value(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def clip_grad_value_(parameters: Any, clip_value: float, *args: Any, **kwargs: Any) -> Any:
            if isinstance(parameters, Iterable) and not isinstance(parameters, (Tensor, list, tuple)):
                parameters = list(parameters)
            if not self.call("clip_grad_value_", self.zc.on_clip_value, parameters, clip_value, default=True):
                return None
            return original(parameters, clip_value, *args, **kwargs)

        return _like(original, clip_grad_value_)


def _like(original: Any, wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """``wrapper`` with the name and docstring of the torch function it stands in for."""
    for attr in ("__name__", "__qualname__", "__doc__"):
        with contextlib.suppress(AttributeError, TypeError):
            setattr(wrapper, attr, getattr(original, attr))
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


# ----------------------------------------------------------------------------- gradguard run
class _Stopped(BaseException):
    """Raised inside the script by a signal handler, so that the summary and report are written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


def run_script(path: str, argv: list[str], *, report: bool = True, **options: Any) -> int:
    """Run a script as ``__main__`` under :class:`ZeroCode`; its exit code, its output kept.

    gradguard's own messages go to stderr. With ``report`` (and plotly installed), ``report.html``
    is written into the run directory at exit — also after an uncaught exception, Ctrl-C or a
    SIGTERM (the process then ends by that signal, as the plain script would).
    """
    import runpy

    script = Path(path)
    if not script.is_file():
        print(
            f"gradguard run: no such script {path!r}; pass the path of a Python training script.",
            file=sys.stderr,
        )
        return 2
    check_options(options)  # a bad option is refused before the script starts, not at its first step
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.resolve().parent))
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_signal)
    code: int = 0
    killed_by: int | None = None
    zc = ZeroCode(name=script.stem, scan_existing=False, **options)
    try:
        with zc:
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                code = _exit_code(e)
            except _Stopped as e:
                killed_by = e.signum
            except KeyboardInterrupt:
                traceback.print_exc()
                killed_by = signal.SIGINT
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        if signal.getsignal(signal.SIGTERM) is _on_signal:
            signal.signal(signal.SIGTERM, previous)
    print(zc.summary(), file=sys.stderr)
    if report and zc.sessions:
        _write_report(zc.out)
    if killed_by is not None:  # end the way the plain script would have: by that signal
        sys.stderr.flush()
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    return code


def check_options(options: dict[str, Any]) -> None:
    """Refuse bad Guard options now (:class:`GradGuardError`, the guard's own message): a guard is
    built on a stand-in model with them (no run log) and closed."""
    guard_options = {k: v for k, v in options.items() if k not in ("out", "name", "live")}
    guard_options.setdefault("clip", "none")
    probe = nn.Linear(1, 1)
    guard = Guard(probe, ManualUpdate(probe.parameters()), log_dir=None, **guard_options)
    guard.close()


def _exit_code(e: SystemExit) -> int:
    """The exit status of ``sys.exit(code)`` as Python gives it (a message is printed, status 1)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _write_report(run_dir: Path) -> None:
    try:
        from gradguard.report import write_report
    except ImportError:  # the report extra is optional
        return
    try:
        path = write_report(run_dir)
    except Exception as e:  # a report must never turn a finished run into a failure
        print(f"gradguard: could not write the report ({e}).", file=sys.stderr)
        return
    print(f"gradguard: report: {path}", file=sys.stderr)
