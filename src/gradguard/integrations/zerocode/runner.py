"""The runner, :class:`ZeroCode`: from what the hooks report (a model's call, a backward, a clip,
an optimizer step), which guard measures which step, with which loss, and what is done with a bad
one (see the package docstring).

The class holds the runner's state, its lifetime, the module-call and backward hooks and the
messages; its parts live beside it, as functions of the runner: :mod:`._lookup` (roots, sessions,
guards), :mod:`._steps` (measuring a step; optimizer steps, closures, ``GradScaler.step``) and
:mod:`._clip` (the script's own clipping)."""

from __future__ import annotations

import os
import sys
import traceback
import weakref
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import runlog
from gradguard._backcheck import BackwardCheck
from gradguard.guard import Guard
from gradguard.integrations._common import optimizer_run_dir
from gradguard.integrations.zerocode import _clip, _lookup, _steps
from gradguard.integrations.zerocode.frameworks import Frameworks
from gradguard.integrations.zerocode.live import Live
from gradguard.integrations.zerocode.patches import ACTIVE, Patches
from gradguard.integrations.zerocode.sessions import (
    DESCRIBE_TRIES,
    LossDescription,
    ManualUpdate,
    Root,
    Session,
    summary_lines,
)
from gradguard.locate import WATCHED_WARNINGS, StepCapture, in_transform, user_name_of, user_values

__all__ = ["ZeroCode"]


# ----------------------------------------------------------------------------- the runner
_RAISED: Any = object()  # on_return's ``out`` when the call raised (torch passes none)
_PROBABILITY_STEPS = (
    3  # the steps (of each optimizer) whose logits losses are checked for probabilities given
)
_PROBABILITY_LATE = (25, 100)  # and these, once training moved the outputs (BCEWithLogits needs one)


def _attribute_path(model: nn.Module) -> str | None:
    """``target.encoder``: the script's variable that holds ``model`` as a submodule, and its path there."""
    for var, value in user_values(skip=3):
        if isinstance(value, nn.Module) and value is not model:
            path = next((n for n, m in value.named_modules() if m is model), None)
            if path:
                return f"{var}.{path}"
    return None


_HUGE_RMS = 1e3  # a weight tensor whose root-mean-square is this large did not come from training


def _sane(p: Tensor) -> bool:
    """Finite, and of a trained network's size (RMS below :data:`_HUGE_RMS`): an EMA whose decay was 99.6
    multiplied the weights by ~99 a step, inf only a few steps after its outputs were."""
    with torch.no_grad():
        rms = p.detach().double().pow(2).mean().sqrt() if p.numel() else torch.zeros(())
    return bool(torch.isfinite(rms)) and float(rms) < _HUGE_RMS


_FRAMEWORKS = ("accelerate.", "transformers.", "lightning.", "pytorch_lightning.")


def _framework_caller() -> str | None:
    """The trainer module that called ``backward()`` (HF Trainer, Accelerate, Lightning), if any: it
    averages gradient accumulation's micro-batch losses itself (a loss normalised by the batch's token
    count, ``loss / accumulation_steps`` in its ``backward``), where the loss code shows no factor.
    A walk up the stack, at a step's first backward only."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return None
        name = frame.f_globals.get("__name__", "")
        if isinstance(name, str) and name.startswith(_FRAMEWORKS):
            return name
        frame = frame.f_back
    return None


def _meta_of(loss: LossDescription) -> dict[str, Any]:
    """``meta.json``'s fields of a loss code (see :meth:`ZeroCode._note_loss_terms`)."""
    noted: dict[str, Any] = {}
    if loss.terms:
        terms = [{**term, "value": float(f"{float(term['value']):.4g}")} for term in loss.terms["terms"]]
        noted["loss_terms"] = {"source": loss.terms["source"], "terms": terms}
    noted["loss_functions"] = [  # the loss code was watched: its loss functions, none included
        {k: float(f"{float(v):.4g}") if isinstance(v, Tensor) else v for k, v in entry.items()}
        for entry in loss.criteria
    ]
    if loss.scale is not None and loss.scale[0] != 1.0:  # the loss multiplied by a number
        noted["loss_scale"] = {"factor": loss.scale[0], "source": loss.scale[1] or ""}
    return noted


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
        defer: leave an optimizer the script guards itself (its own :class:`gradguard.Guard`) to that
            guard (``gradguard run``); ``False``: guard it too (a ``gradguard tune`` trial measures and
            judges every trial itself, whatever the script does).
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
        defer: bool = True,
        **guard: Any,
    ) -> None:
        self.defer = defer
        # absolute now: a script that changes directory (os.chdir, Hydra) must not move the run log
        self.out = (Path(out) if out is not None else runlog.default_run_dir(name)).absolute()
        self.name = name
        self.options = {"clip": "none", "on_nonfinite": "skip", **guard}
        self.replace_clip = self.options["clip"] not in (None, "none")
        self.sessions: dict[int, Session] = {}  # id(optimizer) → session
        self._order: list[Session] = []
        self._roots: dict[int, Root] = {}
        self._models_checked = False  # check_models_outside_optimizers ran (once a run)
        self._stopped_in: str | None = None  # where an internal error stopped the guarding
        self._inner: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # submodules of roots (never roots)
        self._not_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # called, without parameters
        self._called: dict[int, Root] = {}  # roots called with grad since the last backward
        self._depth = 0
        self._watching: StepCapture | None = None
        #: optimizers judged not guarded (weakly: a new optimizer can reuse a freed one's id)
        self._unguarded: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._losses: list[Tensor] = []
        #: zero_grad() ran while losses were pending: the next backward starts over (the script dropped them)
        self._zeroed_since = False
        self._last_loss: Tensor | None = None
        self._scaled: dict[int, tuple[weakref.ref[Tensor], Tensor]] = {}
        self._scaler: weakref.ref[torch.amp.GradScaler] | None = None
        self._backwards = 0
        self.transformed_calls = 0  #: top-level model calls seen inside vmap / grad (torch.func)
        self._backcheck = BackwardCheck()  # custom Functions' backward, checked once each
        #: the loss code of the backward() since the last measured step, until a step takes it
        self._described: LossDescription | None = None
        self._first_loss: LossDescription | None = None  # the run's first (for a session never watched)
        #: (op, line) → (backward, device flag) per checked backward: a logits loss given probabilities
        self._probabilities: dict[tuple[str, str | None], list[tuple[int, Tensor]]] = {}
        self.global_step = 0  #: optimizer steps measured so far in the process (all optimizers)
        self.zero_grads = 0  #: zero_grad() calls so far (of any optimizer or module)
        self.norm_type: float | None = None  # of the clip_grad_norm_ call under way
        self.script_norms: tuple[list[Tensor], Tensor] | None = None  # its tensors' norms (_clip)
        self._said: set[str] = set()
        self._clip_targets: dict[tuple[int, ...], _lookup.ClipTarget] = {}  # see _lookup.clip_target
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        #: the optimizer steps measured when each optimizer was built (a new optimizer over a model
        #: whose steps began before it exists takes over that model's run: _lookup._rebuilt). Weakly
        #: keyed: by id, a new optimizer that reused a freed one's id read as built at its time.
        self._built_at: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = weakref.WeakKeyDictionary()
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
        WATCHED_WARNINGS.clear()  # (the process's last run's)
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
            self._end_unfinished_steps()
        for root in self._roots.values():
            for capture in root.captures:
                capture.remove()
            root.kept_out.remove()
        self._note_warnings()
        self._note_backwards()
        self._note_loss_terms()
        self._note_probabilities()
        errors = []
        for session in self._order:
            try:
                session.guard.close()
            except Exception as e:  # one guard's log must not keep the others from closing
                errors.append(e)
        if errors:
            self._say(f"could not close a run log ({errors[0]})")

    def _note_warnings(self) -> None:
        """The torch warnings the script's loss code raised (:data:`gradguard.locate.WATCHED_WARNINGS`),
        in every run's ``meta.json`` (``loss_code_warnings``), where diagnose reads them."""
        noted = [{"warning": text, "source": where} for text, where in WATCHED_WARNINGS.items()]
        for session in self._order if noted else ():
            writer = session.guard.writer
            if writer is not None and not session.guard.closed:
                writer.update_meta(loss_code_warnings=noted)

    def _note_backwards(self) -> None:
        """The custom autograd Functions whose backward is not linear in its incoming gradient
        (:class:`gradguard._backcheck.BackwardCheck`), in every run's ``meta.json``
        (``nonlinear_backward``), where diagnose's ``custom_backward`` reads them."""
        try:
            found = self._backcheck.report()
        except Exception as e:  # gradguard's own bug: said, the logs still close
            self._say(f"could not check the custom autograd Functions ({type(e).__name__}: {e})")
            return
        for session in self._order if found else ():
            writer = session.guard.writer
            if writer is not None and not session.guard.closed:
                writer.update_meta(nonlinear_backward=found)

    def _describing(self) -> bool:
        """Whether a backward's loss code is still to be described: a session (optimizer) has none yet."""
        return not self._order or any(
            s.loss is None and s.describe_tries < DESCRIBE_TRIES for s in self._order
        )

    def take_loss_description(self, session: Session) -> None:
        """A step of ``session`` is measured: the loss code described since the last step is its
        (a GAN's generator steps after its own loss, not the discriminator's)."""
        described, self._described = self._described, None
        if session.loss is None:
            if described is not None:
                session.loss = described
            else:
                session.describe_tries += 1

    def _note_loss_terms(self) -> None:
        """Each optimizer's loss code (its first watched step's; the run's first where none was), in its
        run's ``meta.json``: the loss's additive terms, their values read now (one host read at the end
        of the run: ``loss_terms``), where diagnose's ``loss_weight`` reads them; its loss functions
        (``loss_functions``: op, line, classes), where ``stalled`` reads which chance level a loss can
        sit at; the number it was multiplied by (``loss_scale``) and gradient accumulation."""
        for session in self._order:
            writer = session.guard.writer
            described = session.loss or self._first_loss
            if writer is None or session.guard.closed or described is None:
                continue
            noted = _meta_of(described)
            if session.micro_batches >= 2 and described.scale is not None and described.framework is None:
                noted["accumulation"] = {
                    "micro_batches": session.micro_batches,
                    "loss_scale": described.scale[0],
                }
            if noted:
                writer.update_meta(**noted)

    def check_models_outside_optimizers(self) -> None:
        """A bad step (the anomaly path; once a run): a model the script calls whose parameters no
        optimizer steps (a target network, an EMA teacher, updated by hand) and that holds non-finite
        weights is what fed the step its non-finite targets — said live and in every run's
        ``meta.json`` (``nonfinite_model``), where diagnose's ``bad_data`` reads it (an EMA decay of
        99.6 for 0.996 read "clean the data")."""
        if self._models_checked:
            return
        self._models_checked = True
        stepped = {id(p) for s in self._order for g in s.guard.optimizer.param_groups for p in g["params"]}
        for root in list(self._roots.values()):
            model = root.model
            if model is None or root.union is not None:
                continue
            named = [
                (n, p) for n, p in model.named_parameters() if id(p) not in stepped and p.is_floating_point()
            ]
            bad = [n for n, p in named if not _sane(p)]  # host reads: the anomaly path
            if not bad or len(named) < len(list(model.parameters())):
                continue  # (finite, or partly trained by an optimizer: the guard's own check covers those)
            name = user_name_of(model, skip=2) or _attribute_path(model) or type(model).__name__
            noted = {"model": name, "class": type(model).__name__, "parameters": bad[:8]}
            self._say(
                f"the model {name} ({type(model).__name__}), which no optimizer steps, holds non-finite or huge weights "
                f"({', '.join(bad[:3])}): it is updated by hand (a target network, an EMA teacher), and its "
                "output feeds the loss. Check that update (an EMA decay must be in [0, 1]: 0.996, not 99.6)."
            )
            for session in self._order:
                writer = session.guard.writer
                if writer is not None and not session.guard.closed:
                    writer.update_meta(nonfinite_model=noted)
            return

    def _note_probabilities(self) -> None:
        """The logits losses given probabilities on every early step (a softmax before CrossEntropyLoss, a
        sigmoid before BCEWithLogitsLoss, NLLLoss without the log), read now, in every run's ``meta.json``
        (``loss_on_probabilities``), where diagnose's ``loss_on_probabilities`` reads them."""
        found = [
            {"op": op, "source": source or ""}
            for (op, source), checked in self._probabilities.items()
            if all(bool(flag.reshape(-1)[0]) for _, flag in checked)
            # logits in [0, 1] are a sigmoid's only once 100 steps of training moved them (a prior-bias init
            # starts at 0.85; a GAN critic at Adam 2e-4 was still in [0.03, 0.07] at its step 25), and spread
            # over [0, 1] by then (a low-signal click model's raw logits stayed in 0.55–0.85: "remove the sigmoid")
            and (
                op != "binary_cross_entropy_with_logits"
                or (
                    max(at for at, _ in checked) >= _PROBABILITY_LATE[-1]
                    and bool(checked[-1][1].reshape(-1)[-1])
                )
            )
        ]
        for session in self._order if found else ():
            writer = session.guard.writer
            if writer is not None and not session.guard.closed:
                writer.update_meta(loss_on_probabilities=found)

    def ended(self, how: str | None) -> None:
        """The script ended early (``"ValueError: bad config"``, a signal, a non-zero exit): said in
        every run's ``meta.json`` (``ended_by``), where diagnose reads it (``incomplete_log``)."""
        for session in self._order if how is not None else ():
            writer = session.guard.writer
            if writer is not None:
                writer.update_meta(ended_by=how)

    def _end_unfinished_steps(self) -> None:
        """The script ended: a forward whose step never came and that went non-finite is located
        and logged (the script stopped on its NaN loss before ``backward()``)."""
        for session in self._order:
            try:
                session.guard.end_unfinished_step({"global_step": self.global_step})
            except Exception as e:  # gradguard's own bug: said, the other logs still close
                self._say(f"could not check the script's last forward ({type(e).__name__}: {e})")

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
        if in_transform() is not None:  # torch.func's call (functional_call inside vmap / grad)
            self.transformed_calls += 1
        if module not in self._inner and torch._C._current_graph_task_id() == -1:
            root = _lookup.root_of(self, module)
            if root is not None:
                if self._watching is not None:
                    self._watching.stop_watching()
                    self._watching = None
                for capture in root.captures:
                    capture.pre(module, args, {})
                if torch.is_grad_enabled():
                    self._called[id(module)] = root
        self._depth += 1

    def on_return(self, module: nn.Module, args: Any, kwargs: Any, out: Any = _RAISED) -> None:
        """The global forward hook: a root's call returned (start watching its loss code). A call
        that raised comes here too (``always_call``: torch then passes ``(module, args, None)``,
        without the kwargs): it is only unwound (the script may catch the error and go on)."""
        if self._depth > 1:  # a submodule's return
            self._depth -= 1
            return
        self._depth = 0
        if out is _RAISED:
            return
        root = self._roots.get(id(module))
        if root is None or root.ref() is not module or torch._C._current_graph_task_id() != -1:
            return
        for capture in root.captures:
            capture.post_with_kwargs(module, args, kwargs, out)
            if capture.watching:
                self._watching = capture

    # ------------------------------------------------------------------ run directories, optimizers
    def next_run_dir(self) -> Path:
        """The run directory of the next guard: ``out``, then ``out/optimizer<k>``."""
        k, self._run_dirs = self._run_dirs, self._run_dirs + 1
        return optimizer_run_dir(self.out, k)

    def on_param_group(self, optimizer: torch.optim.Optimizer) -> None:
        """``Optimizer.add_param_group`` (also how an optimizer is built): note the optimizer."""
        if not isinstance(optimizer, ManualUpdate):
            self._optimizers.add(optimizer)
            self._built_at.setdefault(optimizer, self.global_step)

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
        entry = self._scaled.pop(id(tensors), None) if isinstance(tensors, Tensor) else None
        unscaled = entry[1] if entry is not None and entry[0]() is tensors else tensors
        if self._watching is not None:
            if self._described is None and isinstance(unscaled, Tensor) and self._describing():
                self._described = LossDescription(
                    self._watching.loss_terms(unscaled) or {},
                    self._watching.criteria(),
                    self._watching.loss_scale(unscaled),
                    _framework_caller(),
                )
                self._first_loss = self._first_loss or self._described
            at = self.global_step // max(1, len(self._order))  # each optimizer's steps (a GAN steps two)
            if at < _PROBABILITY_STEPS or at in _PROBABILITY_LATE:
                for found in self._watching.probability_inputs():
                    checked = self._probabilities.setdefault((found["op"], found["source"]), [])
                    checked.append((at, found["flag"]))
            self._watching.loss_code_done()
        for root in self._called.values():
            for capture in root.captures:
                capture.before_backward()
        self._backcheck.watch(tensors)
        if isinstance(tensors, Tensor) and tensors.numel() == 1:
            loss = unscaled.detach()
            if (
                self._zeroed_since
            ):  # gradients were zeroed after the pending losses' backward: dropped batches
                self._losses = []
            self._zeroed_since = False
            self._losses.append(loss if loss.dim() == 0 else loss.reshape(()))

    def end_loss_code(self) -> None:
        """After ``backward()``, at the runner's next hook (clip, step): leave the loss watch's mode,
        so the ops that follow (clipping, the optimizer's update) run without it."""
        if self._watching is not None and self._watching.loss_code_over():
            self._watching.stop_watching(compact=False)  # the step's last window: read or released soon
            self._watching = None

    def on_zero_grad(self) -> None:
        """``zero_grad()`` with losses back-propagated since the last step: if another backward() follows
        before a step, the script dropped those batches (an exception caught after backward(), the loop going
        on) and their losses are not that step's — they were added to it (a logged 2.79 for a step whose loss
        was 0.688). A zero_grad() of part of the model before the step (a frozen encoder's gradients cleared)
        keeps them: no backward follows."""
        self._zeroed_since = True

    def after_backward(self) -> None:
        """A backward ended: measure the models updated by hand (unless their clip comes next)."""
        self._backwards += 1
        called, self._called = self._called, {}
        for root in called.values():
            if root.kind is None:
                root.kind = _lookup.kind_of(self, root)
                if root.kind == "manual" and not _lookup.has_gradients(root):
                    root.kind = "none"  # no optimizer and no gradient: a teacher whose output is detached
            if root.kind != "manual":
                continue
            session = _lookup.manual_session_of(self, root)
            if session is not None and not session.clips:
                _steps.measure(self, session)  # the step ends with the next backward (see _steps.fresh)

    # ------------------------------------------------------------------ the script's clip (_clip)
    def on_clip_norm(self, parameters: Any, max_norm: float, total_norm: Tensor) -> bool:
        """Inside ``clip_grad_norm_``, before it clips: see :func:`._clip.on_clip_norm`."""
        return _clip.on_clip_norm(self, parameters, max_norm, total_norm)

    def total_norm(self, grads: Any, norm_type: float) -> Tensor | None:
        """Torch's total norm inside ``clip_grad_norm_``: see :func:`._clip.total_norm`."""
        return _clip.total_norm(self, grads, norm_type)

    def on_clip_value(self, parameters: Any, clip_value: float) -> bool:
        """Before ``clip_grad_value_``: see :func:`._clip.on_clip_value`."""
        return _clip.on_clip_value(self, parameters, clip_value)

    # ------------------------------------------------------------------ optimizer steps (_steps)
    def on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        """The global optimizer step pre-hook: see :func:`._steps.on_step`."""
        return _steps.on_step(self, optimizer, args, kwargs)

    def on_scaler_step(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
        """Before ``GradScaler.step``: see :func:`._steps.on_scaler_step`. ``False``: skip it."""
        return _steps.on_scaler_step(self, scaler, optimizer)

    # ------------------------------------------------------------------ messages
    def _say(self, message: str) -> None:
        print(f"gradguard: {message}", file=sys.stderr)

    def say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._say(message)

    def internal_error(self, where: str, error: BaseException) -> None:
        """A bug in gradguard's own hooks: say so once and stop guarding; the script goes on. Every run's
        ``meta.json`` keeps it (``guarding_stopped``), where diagnose's ``incomplete_log`` says it."""
        self.stop(
            where,
            f"internal error in {where}; gradguard stops guarding this run, the script goes on:\n"
            + "".join(traceback.format_exception(error)).rstrip(),
        )
        noted = {"where": where, "error": f"{type(error).__name__}: {error}"[:500]}
        for session in self._order:
            writer = session.guard.writer
            if writer is not None and not session.guard.closed and "guarding_stopped" not in writer.meta:
                writer.update_meta(guarding_stopped={**noted, "after_steps": session.guard.step_count})

    def stop(self, where: str, message: str) -> None:
        """Say ``message`` once and stop guarding (every hook and wrapper removed); the script goes on."""
        self.say_once("internal", message)
        if self.active:
            self.active = False
            self._stopped_in = where
            self.patches.remove()
            self.frameworks.remove()

    def summary(self) -> str:
        """What happened, in a few lines for the terminal."""
        if not self._order and self._stopped_in is not None:
            return f"gradguard: stopped guarding in {self._stopped_in} (above), before any step; no run log."
        if not self._order and len(self._unguarded):
            return (
                "gradguard: no optimizer was guarded (said above why); the script ran as without gradguard, and "
                f"no run log was written into {self.out}."
            )
        if not self._order:
            return "gradguard: no optimizer step was seen; nothing was guarded."
        return "\n".join(line for session in self._order for line in summary_lines(session))
