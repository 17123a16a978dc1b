"""The Lightning callback: ``Trainer(callbacks=[GradGuard()])``.

Example:
    >>> import lightning as L
    >>> from gradguard.integrations.lightning import GradGuard
    >>> trainer = L.Trainer(callbacks=[GradGuard(clip="auto", on_nonfinite="skip")])  # doctest: +SKIP

How it fits into Lightning's step. Lightning calls ``on_before_optimizer_step`` after the backward
pass, with the gradients already unscaled under ``16-mixed`` AMP (except for fused optimizers,
whose unscaling Lightning leaves to the kernel: the callback unscales them itself, so it measures
and clips the true gradients, the case where Lightning's own clipping refuses). There the callback
runs :meth:`gradguard.Guard.before_step`: measure → clip in place → decide. Lightning then takes
its one real ``optimizer.step()`` (through ``GradScaler.step`` under AMP), unless the guard decided
to skip: the callback gates the optimizer's ``step`` (:class:`~gradguard.integrations._common.StepGate`),
so a skipped step leaves the weights and the optimizer state bit-identical, and the LR schedule
too: Lightning steps its schedulers after every batch, so the callback holds the next step of a
skipped step's scheduler (:class:`~gradguard.integrations._schedule.HeldScheduler`, in
``trainer.lr_scheduler_configs`` while the fit runs; checkpoints get the scheduler's own state).
The gradients stay in place: the LightningModule's own ``on_before_optimizer_step`` (called after the callbacks') sees
what the optimizer steps with (unscaled, clipped; ``lightning.pytorch.utilities.grad_norm`` works
there), and the optimizer's step pre/post hooks fire once per step taken. On CPU, Lightning turns
``precision="16-mixed"`` into ``"bf16-mixed"`` (no loss scaler); nothing changes for the callback.

Clipping happens once. A ``Trainer(gradient_clip_val=...)`` would clip again after gradguard, so
the callback refuses it, unless gradguard does not clip: ``clip="none"`` (measure the pre-clip
gradients, skip bad steps, let Lightning clip; what ``gradguard run`` attaches) or
``monitor_only=True`` (only measure; never touch the gradients or the optimizer).

Checkpoints: the guard's state (step counters, adaptive clipper and spike statistics) goes into
Lightning checkpoints under the callback's ``state_key``; ``Trainer.fit(ckpt_path=...)`` restores
it, and the adaptive clipper continues exactly as if the run had not stopped.

Logging: the run directory (``<trainer.log_dir>/gradguard`` by default) is the source of truth;
at the guard's flush cadence (``every`` steps, one host copy) the same numbers also go to the
Trainer's loggers (``gradguard/grad_norm``, ``gradguard/grad_norm_clipped``, ``gradguard/clip_rate``…)
and to any extra ``sinks`` (:mod:`gradguard.integrations.sinks`).

Manual optimization works the same: ``self.manual_backward(loss)`` shows the loss to the callback
and ``opt.step()`` calls the hook. With several optimizers (a GAN), each gets its own guard and run
directory, laid out as ``gradguard run`` lays them out: the first optimizer's in the run directory,
the others' in its ``optimizer1/``, … (listed in its ``meta.json``), every record with the
``global_step`` of the process's optimizer steps, so that ``gradguard diagnose`` on the run
directory reads them all and names the optimizer that failed first. The loss of the last
``manual_backward`` before an optimizer's step is that step's loss.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

import lightning.pytorch as pl
import torch
from torch import Tensor

from gradguard._guard.callerclip import CallerClip
from gradguard.clip import Clipper, from_spec
from gradguard.errors import GradGuardError
from gradguard.guard import Guard, OnNonFinite, _unscale_once, ended_by
from gradguard.integrations._common import (
    FlushListener,
    StepGate,
    add_flush_listener,
    check_guard_kwargs,
    clip_rate,
    describe_optimizer,
    fresh_run_dir,
    has_grads,
    optimizer_run_dir,
    scalars_of,
    stepped,
    unwrap_optimizer,
    write_report,
)
from gradguard.integrations._schedule import HeldScheduler, holds
from gradguard.locate import StepCapture

__all__ = ["GradGuard"]

_STATE_VERSION = 1
_UNSET: Any = object()


class _LoggerSink:
    """Sends the flushed records to the Trainer's loggers (rank zero only)."""

    def __init__(self, trainer: pl.Trainer, prefix: str, layers: bool) -> None:
        self.trainer = trainer
        self.prefix = prefix
        self.layers = layers

    def __call__(self, records: list[dict[str, Any]]) -> None:
        if not records or not self.trainer.is_global_zero or not self.trainer.loggers:
            return
        rows = [
            (r["step"], {self.prefix + k: v for k, v in scalars_of(r, layers=self.layers)}) for r in records
        ]
        rate = clip_rate(records)
        if rate == rate:
            rows[-1][1][self.prefix + "clip_rate"] = rate
        for logger in self.trainer.loggers:
            for step, metrics in rows:
                logger.log_metrics(metrics, step=step)


def _own_clipper(clip: Any, *, first: bool) -> Any:
    """Each optimizer's guard its own clipper: a clipper instance given to the callback goes to the
    first optimizer's guard, a copy of it to each other's (a GAN's two optimizers would otherwise
    share one norm history, which :class:`gradguard.Guard` refuses)."""
    return clip if first or not isinstance(clip, Clipper) else copy.deepcopy(clip)


def _one_per_trainer(callbacks: Sequence[Any]) -> None:
    """Refuse a Trainer with several GradGuard callbacks (or one passed twice): one guards every optimizer."""
    count = sum(isinstance(cb, GradGuard) for cb in callbacks)
    if count > 1:
        raise GradGuardError(
            f"the Trainer has {count} GradGuard callbacks; one GradGuard guards every optimizer of the "
            "LightningModule (several optimizers each get their own guard and run directory), and a second one "
            "would measure, clip and skip the same steps again. Pass one GradGuard, with the settings you want: "
            "Trainer(callbacks=[GradGuard(...)])."
        )


class GradGuard(pl.Callback):
    """Measure, clip and guard every optimizer step of a Lightning run.

    Args:
        clip: how gradguard clips (see :class:`gradguard.Guard`): ``"auto"`` (default), ``"norm:1.0"``,
            ``"zclip"``, a number, a :class:`gradguard.clip.Clipper`, or ``"none"``. Not with
            ``monitor_only=True``.
        on_nonfinite: ``"skip"`` (default), ``"rollback"``, ``"raise"`` or ``"warn"``; with
            ``monitor_only=True`` only ``"warn"`` (default) or ``"raise"``.
        monitor_only: only measure and log; Lightning (``gradient_clip_val``) clips and steps (a
            norm ``gradient_clip_val`` is logged as the run's clipper: threshold and clip rate).
        log_dir: the run directory; default ``<trainer.log_dir>/gradguard`` (beside the logger's
            files), or a new ``<default_root_dir>/gradguard-runs/<time>-lightning`` without a logger. With several optimizers, one
            folder per optimizer inside it.
        every: the flush interval in steps (the only host copy of the metrics).
        log_to_logger: also send the numbers to the Trainer's loggers at each flush.
        log_layers: include per-layer norms in what goes to the loggers.
        sinks: extra flush listeners, e.g. :class:`~gradguard.integrations.sinks.TensorBoardSink`.
        report: write ``report.html`` into the run directory when the fit ends (also after an
            error): ``None`` (default) when the ``report`` extra is installed, ``True`` always (or
            warn why not), ``False`` never.
        save_state: put the guards' state into Lightning checkpoints (``gradguard run`` attaches the
            callback with ``False``: the script's checkpoints stay what a plain run writes).
        guard_kwargs: any other :class:`gradguard.Guard` argument (``on_spike``, ``spike_z``,
            ``weight_every``, ``max_consecutive``, ``snapshot_every``, ``lr_backoff``…); another key is
            refused here, with the valid ones named.

    Raises:
        GradGuardError: at ``fit`` start, for a ``Trainer(gradient_clip_val=...)`` without
            ``monitor_only=True`` (clipping twice), an LBFGS optimizer, or bad arguments; at
            ``Trainer(callbacks=...)``, for a second GradGuard (one guards every optimizer).
    """

    def __init__(
        self,
        clip: str | float | Clipper | None = _UNSET,
        on_nonfinite: OnNonFinite | None = None,
        *,
        monitor_only: bool = False,
        log_dir: str | os.PathLike[str] | None = None,
        every: int = 50,
        log_to_logger: bool = True,
        log_layers: bool = False,
        sinks: Sequence[FlushListener] = (),
        report: bool | None = None,
        save_state: bool = True,
        **guard_kwargs: Any,
    ) -> None:
        super().__init__()
        if monitor_only:
            if clip is not _UNSET and clip not in (None, "none"):
                raise GradGuardError(
                    f"GradGuard(monitor_only=True) only measures, but got clip={clip!r}. Let Lightning clip "
                    "(Trainer(gradient_clip_val=...)), or drop monitor_only to let gradguard clip."
                )
            on_nonfinite = on_nonfinite or "warn"
            if on_nonfinite not in ("warn", "raise"):
                raise GradGuardError(
                    f"GradGuard(monitor_only=True) never touches the step, so on_nonfinite must be 'warn' or "
                    f"'raise'; got {on_nonfinite!r}. Drop monitor_only to skip or roll back bad steps."
                )
            if guard_kwargs.get("on_spike") in ("clip", "skip"):
                raise GradGuardError(
                    f"GradGuard(monitor_only=True) cannot act on spikes; got on_spike={guard_kwargs['on_spike']!r}. "
                    "Use 'warn' or 'ignore'."
                )
            clip = None
        else:
            clip = "auto" if clip is _UNSET else clip
            on_nonfinite = on_nonfinite or "skip"
        check_guard_kwargs(guard_kwargs, "GradGuard", set_here=("model", "optimizer", "exist_ok"))
        self.clip = clip
        self.on_nonfinite: OnNonFinite = on_nonfinite
        self.monitor_only = bool(monitor_only)
        self.log_dir = log_dir
        self.every = every
        self.log_to_logger = log_to_logger
        self.log_layers = log_layers
        self.sinks = list(sinks)
        self.report = report
        self.save_state = save_state
        self.guard_kwargs = guard_kwargs
        self.guards: list[Guard] = []
        self._by_optimizer: dict[int, Guard] = {}
        self._gates: dict[int, StepGate] = {}  # the gate on each optimizer's step (not when monitoring)
        self._held: set[int] = set()  # optimizers with a step skipped since their scheduler stepped
        self._held_configs: list[Any] = []  # Lightning's scheduler configs holding a HeldScheduler
        self._unpatch: Callable[[], Any] = lambda: (
            None
        )  # undoes _refuse_manual_clip / _measure_at_manual_clip
        #: optimizers whose step was measured at the module's own clip call (manual optimization), and
        #: whether they step: their ``on_before_optimizer_step`` comes after the clip
        self._measured_early: dict[int, bool] = {}
        self._loss: Tensor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._active = False  # guards built and open (between fit start and teardown)
        #: ``gradguard run``'s callback: the runner logs Lightning's clip from its clip_grad_norm_ call itself
        self._clip_logged_by_runner = False
        self._global_step = 0  # optimizer steps measured so far, all optimizers (several optimizers)
        # bad arguments fail here, not when fit starts
        from_spec(clip)  # type: ignore[arg-type]
        if on_nonfinite not in get_args(OnNonFinite):
            raise GradGuardError(
                f"on_nonfinite must be one of {', '.join(map(repr, get_args(OnNonFinite)))}; got {on_nonfinite!r}."
            )

    # ------------------------------------------------------------------ public
    @property
    def guard(self) -> Guard:
        """The guard of the (first) optimizer; exists from ``on_fit_start`` on (closed after ``fit``)."""
        if not self.guards:
            raise GradGuardError("GradGuard has no guard yet: it is created when Trainer.fit starts.")
        return self.guards[0]

    @property
    def run_dir(self) -> Path | None:
        """The run directory (of the first optimizer's guard; with several optimizers the others'
        are in its ``optimizer<k>/``, and ``gradguard diagnose`` on it reads them all)."""
        return self.guards[0].run_dir if self.guards else None

    @property
    def state_key(self) -> str:
        """Where Lightning keeps the callback's checkpoint state: the class name (Lightning's default:
        one instance a Trainer). Lightning reads it when ``Trainer(callbacks=...)`` checks its callbacks:
        a second GradGuard is refused there with gradguard's reason (:func:`_one_per_trainer`), before
        Lightning's own error about duplicate state keys."""
        caller = sys._getframe(1)
        if (
            caller.f_code.co_name == "_validate_callbacks_list"
        ):  # Lightning's check of the Trainer's callbacks
            _one_per_trainer(caller.f_locals.get("callbacks") or ())
        return super().state_key

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _one_per_trainer(trainer.callbacks)  # type: ignore[attr-defined]  # (one added after the Trainer was made)
        clip_val = trainer.gradient_clip_val
        clips = not self.monitor_only and from_spec(self.clip) is not None  # type: ignore[arg-type]
        if clip_val is not None and float(clip_val) > 0 and clips:
            same = f"clip='{_clip_algorithm(trainer)}:{float(clip_val):g}'"
            raise GradGuardError(
                f"Trainer(gradient_clip_val={clip_val!r}) would clip the gradients again after GradGuard "
                f"(clip={self.clip!r}) has clipped them. Remove gradient_clip_val and let gradguard clip "
                f"(GradGuard({same}) does what Lightning did), or use GradGuard(monitor_only=True) to only measure."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            return
        self.guards = []
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        if not optimizers:
            raise GradGuardError(
                "GradGuard found no optimizer: configure_optimizers() returned none. Return the optimizer that "
                "trains the model."
            )
        if not self.monitor_only:
            for opt in optimizers:
                if isinstance(opt, torch.optim.LBFGS):
                    raise GradGuardError(
                        "GradGuard cannot step LBFGS (it calls its closure several times per step); use "
                        "GradGuard(monitor_only=True), or a first-order optimizer."
                    )
        resumed = self._pending_state is not None
        base = self._base_dir(trainer)
        for i, opt in enumerate(optimizers):
            log_dir: Any = (
                base if i == 0 or base is None else optimizer_run_dir(self.guards[0].run_dir or base, i)
            )
            guard = self._guard(pl_module, opt, log_dir, resumed)
            if self.log_to_logger:
                add_flush_listener(guard, _LoggerSink(trainer, "gradguard/", self.log_layers))
            for sink in self.sinks:
                add_flush_listener(guard, sink)
            self.guards.append(guard)
            if len(optimizers) > 1:
                describe_optimizer(guard, self.guards[0], i, type(opt).__name__, stepped(pl_module, opt))
            self._by_optimizer[id(opt)] = guard
            if not self.monitor_only:
                self._gates[id(opt)] = StepGate.on(opt)
        self._hold_schedulers(trainer)
        if not pl_module.automatic_optimization:
            if not self.monitor_only and from_spec(self.clip) is not None:  # type: ignore[arg-type]
                self._refuse_manual_clip(pl_module)
            else:
                self._measure_at_manual_clip(pl_module)
        self._active = True
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def _guard(
        self, pl_module: pl.LightningModule, opt: torch.optim.Optimizer, log_dir: Any, resumed: bool
    ) -> Guard:
        """The guard of one optimizer; its capture on the module the ``training_step`` calls."""
        called = _called_module(pl_module, opt)
        locate = called is not pl_module and self.guard_kwargs.get("locate", True)
        capture = StepCapture(called) if locate else None
        try:
            return Guard(
                pl_module,
                opt,
                clip=_own_clipper(self.clip, first=not self.guards),
                on_nonfinite=self.on_nonfinite,
                log_dir=log_dir,
                name="lightning",
                every=self.every,
                exist_ok=resumed,
                monitor_only=self.monitor_only,
                capture=capture,
                **self.guard_kwargs,
            )
        except BaseException:
            if capture is not None:
                capture.remove()
            raise

    def _refuse_manual_clip(self, pl_module: pl.LightningModule) -> None:
        """Manual optimization that clips in its ``training_step`` (``self.clip_gradients(opt,
        gradient_clip_val=5.0)``) while GradGuard clips too: refused at that call, as
        ``Trainer(gradient_clip_val=...)`` is at setup — the guard would clip the clipped gradients
        again (a GAN's generator read "over_clipping" under the default ``clip="auto"``)."""
        original = pl_module.clip_gradients

        def clip_gradients(optimizer: Any, gradient_clip_val: Any = None, *args: Any, **kwargs: Any) -> None:
            if gradient_clip_val is not None and float(gradient_clip_val) > 0:
                algorithm = kwargs.get("gradient_clip_algorithm") or (args[0] if args else None) or "norm"
                several = (
                    f" for this optimizer; it clips all {len(self.guards)} optimizers' steps, where the call clipped "
                    "one: keep the call and use GradGuard(monitor_only=True) to clip only that one"
                    if len(self.guards) > 1
                    else ""
                )
                raise GradGuardError(
                    f"self.clip_gradients(..., gradient_clip_val={gradient_clip_val!r}) clips the gradients and "
                    f"GradGuard (clip={self.clip!r}) would clip them again. Drop the call and let gradguard clip "
                    f"(GradGuard(clip='{algorithm}:{float(gradient_clip_val):g}') does what it did{several}), or use "
                    "GradGuard(monitor_only=True) to only measure."
                )
            original(optimizer, gradient_clip_val, *args, **kwargs)

        pl_module.clip_gradients = clip_gradients  # type: ignore[method-assign]
        self._unpatch = lambda: pl_module.__dict__.pop("clip_gradients", None)

    def _measure_at_manual_clip(self, pl_module: pl.LightningModule) -> None:
        """Manual optimization that clips in its ``training_step`` while gradguard only measures: the
        step is measured at that call, on the gradients before the clip (``on_before_optimizer_step``
        comes inside ``opt.step()``, after it: the log held the clipped norms, capped at the threshold,
        with each clip's coefficient on the row before)."""
        original = pl_module.clip_gradients

        def clip_gradients(optimizer: Any, gradient_clip_val: Any = None, *args: Any, **kwargs: Any) -> None:
            algorithm = kwargs.get("gradient_clip_algorithm") or (args[0] if args else None) or "norm"
            self._measure_before_clip(pl_module.trainer, optimizer, gradient_clip_val, str(algorithm))
            original(optimizer, gradient_clip_val, *args, **kwargs)

        pl_module.clip_gradients = clip_gradients  # type: ignore[method-assign]
        self._unpatch = lambda: pl_module.__dict__.pop("clip_gradients", None)

    def _measure_before_clip(self, trainer: pl.Trainer, optimizer: Any, value: Any, algorithm: str) -> None:
        """The step of ``optimizer`` measured now, before the module's clip of ``value`` (its threshold
        and coefficient in the row where the clip is a norm clip gradguard's norm measures)."""
        opt = unwrap_optimizer(optimizer)
        guard = self._by_optimizer.get(id(opt))
        if guard is None or not value or id(opt) in self._measured_early or not has_grads(opt):
            return
        if self._scaler(trainer) is not None:
            return  # (fp16: the gradients are unscaled inside the step; measured there, as before)
        logged = algorithm == "norm" and guard.config.norm_type == 2.0 and not self._clip_logged_by_runner
        clip = CallerClip().add_at_guards_norm(float(value)) if logged else None
        loss, self._loss = self._loss, None
        self._measured_early[id(opt)] = self._measure(guard, loss, clip)

    def _hold_schedulers(self, trainer: pl.Trainer) -> None:
        """Put a :class:`HeldScheduler` in place of each per-step LR scheduler of a gated optimizer:
        its next ``step()`` after a skipped step does nothing (undone when the fit ends). An
        ``interval="epoch"`` scheduler still steps once an epoch (the epoch ends either way)."""
        for config in trainer.lr_scheduler_configs:
            inner = getattr(config.scheduler, "optimizer", None)
            key = id(unwrap_optimizer(inner)) if inner is not None else -1
            if key in self._gates and config.interval == "step" and holds(config.scheduler):
                held = HeldScheduler(config.scheduler, functools.partial(self._unhold, key))
                config.scheduler = held  # type: ignore[assignment]  # the scheduler's stand-in
                self._held_configs.append(config)

    def _unhold(self, key: int) -> bool:
        """Whether a step of this optimizer was skipped since its scheduler last stepped (forgotten now)."""
        held = key in self._held
        self._held.discard(key)
        return held

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        loss = loss.detach()
        scaler = self._scaler(trainer)
        if scaler is not None:  # Lightning scaled the loss before this hook under fp16 AMP
            scale = scaler._get_scale_async()
            if scale is not None:
                loss = loss / scale
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        opt = unwrap_optimizer(optimizer)
        guard = self._by_optimizer.get(id(opt))
        loss, self._loss = self._loss, None
        if guard is None:
            return
        gate = self._gates.get(id(opt))
        take = True
        if id(opt) in self._measured_early:  # measured at the module's own clip, before it clipped
            take = self._measured_early.pop(id(opt))
        elif has_grads(opt):  # none: training_step returned None, nothing to guard
            scaler = self._scaler(trainer)
            if scaler is not None:  # Lightning unscaled, except a fused optimizer's (left to its kernel)
                _unscale_once(scaler, opt)  # its found_inf still tells Lightning's scaler.step() to skip
            take = self._measure(guard, loss, self._lightnings_clip(trainer, guard))
        if gate is not None:
            gate.decide(take)  # Lightning's optimizer.step() after the hooks steps, or not
        if not take:
            self._held.add(id(opt))  # its scheduler's next step is held

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # a step that raised before its optimizer step (Trainer(detect_anomaly=True) on a NaN
        # backward): its forward is located and logged, as at the end of a plain script
        for guard in self.guards:
            guard.end_unfinished_step({"global_step": self._global_step} if len(self.guards) > 1 else None)
            how = ended_by(exception)
            if (
                guard.writer is not None and how is not None
            ):  # how the run ended, for diagnose (incomplete_log)
                guard.writer.update_meta(ended_by=how)
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The guards' states (tensors and Python scalars), saved in Lightning checkpoints (nothing
        without ``save_state``)."""
        if not self.save_state:
            return {}
        if not self._active:
            return dict(self._pending_state) if self._pending_state is not None else {}
        guards = [g.state_dict() for g in self.guards]
        return {"version": _STATE_VERSION, "guards": guards, "global_step": self._global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from a checkpoint; Lightning calls this before ``on_fit_start`` builds the guards."""
        if not state_dict:
            return
        if state_dict.get("version") != _STATE_VERSION or not isinstance(state_dict.get("guards"), list):
            raise GradGuardError(
                f"GradGuard checkpoint state has version {state_dict.get('version')!r}; this gradguard reads "
                f"{_STATE_VERSION}. Resume with the gradguard version that wrote the checkpoint."
            )
        if self._active:
            self._apply_state(state_dict)
        else:
            self._pending_state = state_dict

    # ------------------------------------------------------------------ helpers
    def _apply_state(self, state: dict[str, Any]) -> None:
        states = state["guards"]
        if len(states) != len(self.guards):
            raise GradGuardError(
                f"the checkpoint holds GradGuard state for {len(states)} optimizer(s), this run has "
                f"{len(self.guards)}; resume with the same configure_optimizers()."
            )
        for guard, s in zip(self.guards, states):
            guard.load_state_dict(s)
        self._global_step = int(state.get("global_step", 0))

    def _base_dir(self, trainer: pl.Trainer) -> str | os.PathLike[str] | None:
        if self.log_dir is not None:
            return self.log_dir
        if trainer.loggers and not getattr(
            trainer, "fast_dev_run", False
        ):  # beside the logger's own files, in its new version
            # folder (fast_dev_run puts a DummyLogger in, whose folder is the same on every run)
            return Path(trainer.log_dir or trainer.default_root_dir) / "gradguard"
        return fresh_run_dir(Path(trainer.default_root_dir) / "gradguard-runs", "lightning")

    @staticmethod
    def _scaler(trainer: pl.Trainer) -> Any:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _measure(self, guard: Guard, loss: Tensor | None, clip: CallerClip | None) -> bool:
        """Measure, clip and decide this step; whether the optimizer steps (always, under
        ``monitor_only``: then nothing is clipped, and a bad step is located before Lightning's
        step, see ``Guard(locate=...)``). The update ratio is measured after Lightning's own step."""
        if len(self.guards) == 1:
            return guard.before_step(loss, clip=clip)
        fields = {"global_step": self._global_step}  # which optimizer failed first, by global step
        self._global_step += 1
        return guard.before_step(loss, clip=clip, fields=fields)

    def _lightnings_clip(self, trainer: pl.Trainer, guard: Guard) -> CallerClip | None:
        """Where gradguard does not clip (``monitor_only``, or ``clip="none"``), Lightning's own norm clip
        (``gradient_clip_val``, which it applies after this hook) as the step's clip: its threshold,
        coefficient and clip rate go into the row, from the norm the guard measures (its norm type is
        Lightning's, 2) — ``clip="none"`` beside ``gradient_clip_val=0.5`` logged "clipping none (clip rate
        0)" while Lightning clipped 40 of 64 steps. A value clip, or a guard measuring another norm, is not
        logged (it would take a second read of the gradients)."""
        value = trainer.gradient_clip_val
        if not (
            (self.monitor_only or from_spec(self.clip) is None)  # type: ignore[arg-type]
            and not self._clip_logged_by_runner
            and value
            and _clip_algorithm(trainer) == "norm"
            and guard.config.norm_type == 2.0
        ):
            return None
        return CallerClip().add_at_guards_norm(float(value))

    def _close(self) -> None:
        """Flush and close the run logs and sinks; a later ``fit`` goes on from the same state."""
        if not self._active:
            return
        self._pending_state = self.state_dict()
        for guard in self.guards:
            guard.close()
            write_report(guard.run_dir, self.report)
        for gate in self._gates.values():
            gate.remove()
        for config in self._held_configs:
            config.scheduler = config.scheduler.scheduler
        self._held_configs, self._held = [], set()
        self._unpatch()
        self._active, self._by_optimizer, self._gates, self._loss = False, {}, {}, None
        for sink in self.sinks:
            close: Callable[[], None] | None = getattr(sink, "close", None)
            if close is not None:
                close()


def _clip_algorithm(trainer: pl.Trainer) -> str:
    """Lightning's ``gradient_clip_algorithm`` as gradguard's clip spec names it: ``"norm"`` (its
    default) or ``"value"`` (Lightning holds an enum whose str() is ``GradClipAlgorithmType.VALUE``)."""
    algorithm = trainer.gradient_clip_algorithm or "norm"
    return str(getattr(algorithm, "value", algorithm)).lower()


def _called_module(pl_module: pl.LightningModule, opt: torch.optim.Optimizer) -> torch.nn.Module:
    """The module whose forward a ``training_step`` calls, where its inputs are the step's data
    (what locate keeps and replays): the LightningModule itself when it defines ``forward``; else
    (``self.net(x)``: the LightningModule has no forward to call) its one child that holds every
    parameter ``opt`` steps. Without such a child, the LightningModule (a bad step is then located
    by the norms only)."""
    if type(pl_module).forward is not pl.LightningModule.forward:
        return pl_module
    stepped_ids = {id(p) for group in opt.param_groups for p in group["params"]}
    for child in pl_module.children():
        if stepped_ids <= {id(p) for p in child.parameters()}:
            return child
    return pl_module
