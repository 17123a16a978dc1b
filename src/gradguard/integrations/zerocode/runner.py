"""The runner, :class:`ZeroCode`: from what the hooks report (a model's call, a backward, a clip,
an optimizer step), which guard measures which step, with which loss, and what is done with a bad
one (see the package docstring)."""

from __future__ import annotations

import math
import os
import sys
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import runlog
from gradguard._guard.callerclip import CallerClip
from gradguard.guard import Guard
from gradguard.integrations._common import drop_grads
from gradguard.integrations.zerocode.frameworks import Frameworks
from gradguard.integrations.zerocode.live import Live
from gradguard.integrations.zerocode.patches import ACTIVE, Patches
from gradguard.integrations.zerocode.sessions import (
    ManualUpdate,
    Root,
    Session,
    all_optimizers,
    covers,
    stepped,
    summary_lines,
)
from gradguard.locate import StepCapture

__all__ = ["ZeroCode"]


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
        self.sessions: dict[int, Session] = {}  # id(optimizer) → session
        self._order: list[Session] = []
        self._roots: dict[int, Root] = {}
        self._inner: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # submodules of roots (never roots)
        self._not_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # called, without parameters
        self._called: dict[int, Root] = {}  # roots called with grad since the last backward
        self._depth = 0
        self._watching: StepCapture | None = None
        self._unguarded: set[int] = set()
        self._losses: list[Tensor] = []
        self._last_loss: Tensor | None = None
        self._scaled: dict[int, tuple[weakref.ref[Tensor], Tensor]] = {}
        self._scaler: weakref.ref[torch.amp.GradScaler] | None = None
        self._backwards = 0
        self.global_step = 0  #: optimizer steps measured so far in the process (all optimizers)
        self.norm_type: float | None = None  # of the clip_grad_norm_ call under way
        self._said: set[str] = set()
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self.scan_existing = scan_existing
        self.live = Live(enabled=live)
        self.patches = Patches(self)
        self.frameworks = Frameworks(self)
        self.active = False
        self._run_dirs = 0  # run directories handed out so far (the first is ``out``)

    @property
    def guards(self) -> dict[int, Guard]:
        """``{id(optimizer): guard}`` of every guard made so far (hand-updated models included)."""
        return {key: s.guard for key, s in self.sessions.items()}

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> ZeroCode:
        self.patches.install()
        self.frameworks.install()
        self.active = True
        ACTIVE.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and wrapper; close the guards (their logs flushed). Safe to call twice."""
        if self.active:
            self.active = False
            self.patches.remove()
            self.frameworks.remove()
            ACTIVE.discard(self)
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
        self.active = False
        self.patches.remove()
        self.frameworks.remove()
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
        if self._depth:  # a submodule inside a call (the usual call: a counter, nothing else)
            self._depth += 1
            return
        if module not in self._inner and torch._C._current_graph_task_id() == -1:
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
        if self._depth > 1:  # a submodule's return
            self._depth -= 1
            return
        self._depth = 0
        root = self._roots.get(id(module))
        if root is None or root.ref() is not module or torch._C._current_graph_task_id() != -1:
            return
        for capture in root.captures:
            capture.post_with_kwargs(module, args, kwargs, out)
            if capture.watching:
                self._watching = capture

    def _root_of(self, module: nn.Module) -> Root | None:
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

    def _new_root(self, module: nn.Module) -> Root:
        root = Root(module)
        self._roots[id(module)] = root  # (an entry whose module died is replaced here)
        self._inner.update(m for m in module.modules() if m is not module)
        # capture from this very call on (a guard comes at the first step); every model watches its
        # loss code (one window open at a time: the runner closes it at every root forward)
        root.unused = root.new_capture(watch=True)
        return root

    def _root_owning(self, ids: set[int]) -> Root | None:
        """The smallest root (model) that owns every parameter in ``ids``."""
        best: tuple[int, Root | None] = (0, None)
        for root in self._roots.values():
            model = root.model
            if model is None or root.ref() is None:
                continue
            owned = {id(p) for p in model.parameters()}
            if ids <= owned and (best[1] is None or len(owned) < best[0]):
                best = (len(owned), root)
        return best[1]

    # ------------------------------------------------------------------ sessions
    def _session_of(self, optimizer: torch.optim.Optimizer) -> Session | None:
        """The optimizer's session; made at its first step (or clip). ``None``: not guarded."""
        session = self.sessions.get(id(optimizer))
        if session is not None or id(optimizer) in self._unguarded:
            return session
        framework = self.frameworks.guard_of(optimizer)
        if framework is not None:  # a Trainer's callback guards it
            framework.add_flush_callback(self.live.flushed(framework))
            return self._add(id(optimizer), Session(framework, manual=False, framework=True))
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
        return self._add(id(optimizer), Session(guard, manual=False))

    def _manual_session(self, root: Root) -> Session | None:
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
        guard, _ = self._guard(root, stand_in, options)
        self._say(
            f"{type(model).__name__}'s parameters are updated by hand (no torch.optim optimizer steps "
            "them): each step is measured and a non-finite one is located, but gradguard cannot skip it."
        )
        return self._add(id(stand_in), Session(guard, manual=True))

    def _guard(
        self, root: Root, optimizer: torch.optim.Optimizer, options: dict[str, Any]
    ) -> tuple[Guard, StepCapture | None]:
        """A guard of ``root``'s model for ``optimizer`` (its run directory, its capture)."""
        k = self._run_dirs
        log_dir = self.next_run_dir()
        locate = options.pop("locate", True)
        capture = root.take_capture() if locate else None
        model = root.model
        assert model is not None
        guard = Guard(
            model, optimizer, log_dir=log_dir, name=self.name, capture=capture, locate=locate, **options
        )
        guard.add_flush_callback(self.live.flushed(guard))
        self._describe(guard, k, model, optimizer)
        return guard, capture

    def next_run_dir(self) -> Path:
        """The run directory of the next guard: ``out``, then ``out/optimizer<k>``."""
        k, self._run_dirs = self._run_dirs, self._run_dirs + 1
        return self.out if k == 0 else self.out / f"optimizer{k}"

    def _describe(self, guard: Guard, k: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """meta.json of a new run dir: which optimizer it is (``index``, ``class``, the ``params`` it
        steps); the root's lists its children (``optimizer<k>``), kept current."""
        kind = "manual update" if isinstance(optimizer, ManualUpdate) else type(optimizer).__name__
        info = {"index": k, "class": kind, "params": stepped(model, optimizer)}
        if guard.writer is not None:
            guard.writer.update_meta(optimizer=info)
        root = self._order[0].guard.writer if self._order else None
        if k > 0 and root is not None:
            root.update_meta(children=[f"optimizer{i}" for i in range(1, k + 1)])

    def _add(self, key: int, session: Session) -> Session:
        self.sessions[key] = session
        self._order.append(session)
        return session

    def _optimizers_holding(self, ids: set[int]) -> list[torch.optim.Optimizer]:
        """The optimizers that hold any of these parameters (one that has not stepped yet is
        known only from its creation, seen through ``add_param_group``)."""
        if self.scan_existing:  # optimizers made before the runner started: looked for once
            self.scan_existing = False
            self._optimizers.update(all_optimizers())
        return [o for o in self._optimizers if any(id(p) in ids for g in o.param_groups for p in g["params"])]

    def on_param_group(self, optimizer: torch.optim.Optimizer) -> None:
        """``Optimizer.add_param_group`` (also how an optimizer is built): note the optimizer."""
        if not isinstance(optimizer, ManualUpdate):
            self._optimizers.add(optimizer)

    def _session_for_params(self, params: list[Tensor]) -> Session | None:
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
            self._losses.append(loss if loss.dim() == 0 else loss.reshape(()))

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

    def _kind_of(self, root: Root) -> str:
        model = root.model
        if model is None:
            return "optimizer"
        ids = {id(p) for p in model.parameters()}
        return "optimizer" if self._optimizers_holding(ids) else "manual"

    def _session_of_root(self, root: Root) -> Session | None:
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
    def _fresh(self, session: Session) -> bool:
        """Whether this step is not measured yet (a new backward since the last measurement)."""
        if session.measured_at is not None and session.measured_at != self._backwards:
            session.end_step()  # the script skipped its own step: that one is over
        return session.measured_at is None

    def _measure(
        self,
        session: Session,
        *,
        loss: Tensor | float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        clip: CallerClip | None = None,
    ) -> bool:
        """Measure (and decide) the session's step now; ``True``: the step may be taken. Its record
        and events carry ``global_step``: the optimizer steps measured before it, in the process."""
        if loss is None:
            loss = self._take_loss()
        fields = {"global_step": self.global_step}
        self.global_step += 1
        if session.manual:
            ok = self._measure_by_hand(session, loss, clip, fields)
        else:
            ok = session.guard.before_step(loss, scaler=scaler, clip=clip, fields=fields)
        session.measured_at = self._backwards
        session.skip = not ok and not session.manual
        if not ok:
            self.live.bad_step(session.guard)
        return ok

    def _measure_by_hand(
        self,
        session: Session,
        loss: Tensor | float | None,
        clip: CallerClip | None,
        fields: dict[str, Any],
    ) -> bool:
        """A hand-updated step, measured by its monitor-only guard (nothing skipped), which
        locates a non-finite step itself before the script's update (``Guard.last_step_nonfinite``).
        ``False``: the step was seen non-finite (the script updates its weights anyway)."""
        session.guard.before_step(loss, clip=clip, fields=fields)
        return not session.guard.last_step_nonfinite

    def _scaler_of(self, optimizer: torch.optim.Optimizer) -> torch.amp.GradScaler | None:
        """The GradScaler that scaled this step's loss, if it unscaled this optimizer's gradients."""
        scaler = self._scaler() if self._scaler is not None else None
        if scaler is None or not scaler.is_enabled():
            return None
        from torch.amp.grad_scaler import OptState  # (a scaler is in use: not on every plain step)

        state = scaler._per_optimizer_states.get(id(optimizer))  # GradScaler's own bookkeeping
        return scaler if state is not None and state["stage"] is OptState.UNSCALED else None

    # ------------------------------------------------------------------ the script's clip
    def on_clip_norm(self, parameters: Any, max_norm: float, total_norm: Tensor) -> bool:
        """Inside ``clip_grad_norm_``, after torch computed the total norm and before it clips (see
        :meth:`_script_clip`); the row gets the script's threshold and coefficient, and torch's own
        total norm (to the last bit) when the call covered the whole optimizer."""
        norm_type = self.norm_type if self.norm_type is not None else math.nan  # nan: not known

        def first(session: Session, params: list[Tensor]) -> CallerClip:
            clip = CallerClip(norm_type=norm_type)
            clip.add(max_norm, total_norm, covers_all=covers(params, session.guard.optimizer))
            return clip

        def further(session: Session) -> None:  # another group of a measured step
            session.guard.record_clip(max_norm, total_norm, norm_type=norm_type)

        call = f"clip_grad_norm_(max_norm={max_norm})"
        return self._script_clip(parameters, call, first, further, threshold=float(max_norm))

    def on_clip_value(self, parameters: Any, clip_value: float) -> bool:
        """Before ``clip_grad_value_`` (see :meth:`_script_clip`); the row gets the fraction of
        elements the script's clip will clamp."""

        def first(session: Session, params: list[Tensor]) -> CallerClip:
            clip = CallerClip()
            clip.add_value(clip_value, [p.grad for p in params if p.grad is not None])
            return clip

        return self._script_clip(parameters, f"clip_grad_value_(clip_value={clip_value})", first, None)

    def _script_clip(
        self,
        parameters: Any,
        call: str,
        first: Callable[[Session, list[Tensor]], CallerClip],
        further: Callable[[Session], None] | None,
        *,
        threshold: float | None = None,
    ) -> bool:
        """The script's own clip call, before it touches the gradients: the step is measured here,
        on the pre-clip gradients, with what ``first`` says of the clip; a later clip call of the
        same step goes to ``further``. ``False``: the script's clip is replaced (``--clip``)."""
        self.end_loss_code()
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        session = self._session_for_params(params)
        if session is None:
            return True
        session.clips = True
        if session.framework:  # the callback measured this step: its row gets the Trainer's clip
            if further is not None and not self.replace_clip:
                session.script_clips += 1
                session.script_threshold = threshold
                further(session)
            return not self.replace_clip
        if self.replace_clip:
            self._replaced(call)
            if self._fresh(session):
                self._measure_step(session)
            return False
        session.script_clips += 1
        if threshold is not None:
            session.script_threshold = threshold
        if self._fresh(session):
            self._measure_step(session, clip=first(session, params))
        elif further is not None:
            further(session)
        return True

    def _measure_step(self, session: Session, *, clip: CallerClip | None = None) -> None:
        self._measure(session, scaler=self._scaler_of(session.guard.optimizer), clip=clip)

    def _replaced(self, call: str) -> None:
        self.say_once(
            "clip",
            f"--clip {self.options['clip']} replaces the script's own {call}; the script's call "
            "returns the pre-clip norm and leaves the gradients to gradguard's clipper.",
        )

    # ------------------------------------------------------------------ optimizer steps
    def on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        """The global optimizer step pre-hook (``args[0]`` is the optimizer; a further argument is a closure)."""
        if isinstance(optimizer, ManualUpdate):
            return None
        self.end_loss_code()
        if self.frameworks.callbacks:
            session = self._session_of(optimizer)
            if session is not None and session.framework:  # the Trainer's callback measured, gates it
                self._losses = []
                return None
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
                self.patches.call("optimizer.step(closure)", self._call_once, optimizer, value)
            return loss

        return guarded

    def _call_once(self, optimizer: torch.optim.Optimizer, loss: Tensor | float | None) -> None:
        """The first evaluation of a closure: measure the step (the session is made here if needed)."""
        session = self._session_of(optimizer)
        if session is None:
            return
        if self._fresh(session):  # else measured inside the closure, at the script's clip (Lightning)
            self._measure(session, loss=loss)
        if session.skip:
            drop_grads(optimizer)
        session.end_step()

    def on_scaler_step(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
        """Before ``GradScaler.step``: unscale as it would, measure with the scaler. ``False``: skip it."""
        from torch.amp.grad_scaler import OptState

        self.end_loss_code()
        session = self._session_of(optimizer)
        if session is None or session.framework:
            return True
        state = scaler._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.READY:
            # what GradScaler.step does first itself; a fused optimizer then gets no grad_scale (its
            # kernel would unscale): the step is measured on the true gradients either way
            scaler.unscale_(optimizer)
        if self._fresh(session):
            self._measure(session, scaler=scaler if state["stage"] is OptState.UNSCALED else None)
        if session.skip:
            session.end_step()
            return False
        return True

    # ------------------------------------------------------------------ messages
    def _say(self, message: str) -> None:
        print(f"gradguard: {message}", file=sys.stderr)

    def say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._say(message)

    def internal_error(self, where: str, error: BaseException) -> None:
        """A bug in gradguard's own hooks: say so once and stop guarding; the script goes on."""
        self.say_once(
            "internal",
            f"internal error in {where}; gradguard stops guarding this run, the script goes on:\n"
            + "".join(traceback.format_exception(error)).rstrip(),
        )
        if self.active:
            self.active = False
            self.patches.remove()
            self.frameworks.remove()

    def summary(self) -> str:
        """What happened, in a few lines for the terminal."""
        if not self._order:
            return "gradguard: no optimizer step was seen; nothing was guarded."
        return "\n".join(line for session in self._order for line in summary_lines(session))
