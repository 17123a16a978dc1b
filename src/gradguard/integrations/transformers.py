"""Hugging Face ``transformers.Trainer``: a subclass that guards every step, and a monitor callback.

Two front doors, because the callback API cannot do everything:

* :class:`GradGuardTrainer` (or :class:`GradGuardMixin` for your own ``Trainer`` subclass, e.g. TRL's
  ``SFTTrainer``) — **gradguard clips, and the Trainer's own clipping is off.** It sees the loss of
  every step (``training_step``), measures the raw gradients, clips them (by default at
  ``args.max_grad_norm``, so nothing changes for a run that used it) and decides; the Trainer then
  takes its own ``optimizer.step()``, or none on a skipped step, and the LR scheduler does not
  advance on a skipped step. One line in place of ``Trainer``::

      trainer = GradGuardTrainer(model=model, args=args, train_dataset=ds, gradguard={"clip": "auto"})

* :class:`GradGuardCallback` — **gradguard only monitors; the Trainer clips and steps.** One line:
  ``Trainer(..., callbacks=[GradGuardCallback()])``. A callback runs after the Trainer's
  ``clip_grad_norm_`` (``on_pre_optimizer_step``), so the norms it logs are those the optimizer gets
  (post-clip); since transformers 5 even ``max_grad_norm=0`` calls ``clip_grad_norm_(max_norm=inf)``,
  which turns an inf gradient into NaN everywhere before any callback sees it. It cannot stop the
  Trainer's ``lr_scheduler.step()`` either (Accelerate gates it on a private overflow flag, and
  reports ``step_was_skipped=False`` for fused optimizers). Use it to watch a run you do not want
  to change.

Why the Trainer's clipping is off under :class:`GradGuardTrainer`: clipping twice is wasted work
and hides the raw norm, and ``clip_grad_norm_`` writes NaN over inf gradients. The mixin sets
``args.max_grad_norm = 0`` and replaces the Trainer's ``_clip_grad_norm`` / ``_get_grad_norm``
(transformers ≥ 5) so that nothing touches the gradients before the guard. It warns when you
pass both a ``clip`` and a ``max_grad_norm > 0`` (only the former applies).

How a step is skipped under :class:`GradGuardTrainer`: the guard measures, clips and decides
(:meth:`gradguard.Guard.before_step`) right before the Trainer's ``on_pre_optimizer_step``
(transformers 4.x: in it, after the callbacks passed to the Trainer). The Trainer's one
``optimizer.step()`` (through Accelerate's wrapper and its ``GradScaler``) then goes through a gate
on the torch optimizer's ``step``, installed when the Trainer creates the optimizer
(:class:`~gradguard.integrations._common.StepGate`), which returns without stepping after a skip.
The gradients stay in place, so your callbacks' ``on_pre_optimizer_step`` / ``on_optimizer_step``
see what the optimizer steps with (unscaled, clipped), and the optimizer's step pre/post hooks fire
once per step taken.

Logs: the run directory (``<output_dir>/gradguard-runs/<time>-transformers`` by default; ``gradguard
diagnose <output_dir>/gradguard-runs`` reads the newest) is the source of truth. At each
Trainer log step, :class:`GradGuardTrainer` adds to the logs (and so to TensorBoard, W&B…, whatever
``report_to`` names): ``grad_norm`` (pre-clip, as the Trainer logs it), ``grad_norm_clipped`` (what
the optimizer stepped with), ``clip_rate`` (fraction of the steps since the last log that clipping
scaled down) and ``skipped_steps`` (running total).

Host syncs: the Trainer already reads the loss on the host every step (``logging_nan_inf_filter``);
:class:`GradGuardTrainer` adds one read per step, the guard's decision, which gates both the
optimizer step and the LR scheduler. Checkpoints: ``gradguard.pt`` in each ``checkpoint-N``
folder; ``train(resume_from_checkpoint=...)`` restores it, and the adaptive clipper continues exactly.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from gradguard.clip import Norm, from_spec
from gradguard.errors import GradGuardError
from gradguard.guard import Guard
from gradguard.integrations._common import (
    FlushListener,
    StepGate,
    add_flush_listener,
    check_guard_kwargs,
    clip_rate,
    fresh_run_dir,
    has_grads,
    post_clip_norm,
    unwrap_optimizer,
    write_report,
)
from gradguard.integrations._schedule import HeldScheduler, holds

__all__ = ["CHECKPOINT_FILE", "GradGuardCallback", "GradGuardMixin", "GradGuardTrainer"]

log = logging.getLogger("gradguard")

#: The guard's state in each ``checkpoint-N`` folder.
CHECKPOINT_FILE = "gradguard.pt"

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old transformers
    import transformers

    raise GradGuardError(
        f"gradguard.integrations.transformers needs transformers>=4.46 (a TrainerCallback with "
        f"on_pre_optimizer_step); this is transformers {transformers.__version__}. "
        'pip install -U "gradguard[transformers]".'
    )


_NOT_FOR_GUARD = ("model", "optimizer", "exist_ok", "monitor_only")  # set from the Trainer
_OWN_OPTIONS = ("sinks", "report")  # taken by the integration itself, not by Guard


def _close_sinks(sinks: Sequence[Any]) -> None:
    for sink in sinks:
        close: Callable[[], None] | None = getattr(sink, "close", None)
        if close is not None:
            close()


class _Hooks(TrainerCallback):
    """The mixin's own callback: build the guard at train start, step it, save it with checkpoints."""

    def __init__(self, trainer: GradGuardMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._gradguard_begin()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._gradguard_step()  # transformers 4.x; on 5.x the step already ran in _get_grad_norm

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._gradguard_save(state.global_step)


class GradGuardMixin:
    """Guard every optimizer step of a ``transformers.Trainer`` (sub)class.

    Put it first: ``class MyTrainer(GradGuardMixin, SFTTrainer): ...``. It adds one keyword argument,
    ``gradguard``: a dict of :class:`gradguard.Guard` arguments (``clip``, ``on_nonfinite``,
    ``every``, ``log_dir``, ``on_spike``…) plus ``sinks`` (flush listeners, see
    :mod:`gradguard.integrations.sinks`) and ``report`` (write ``report.html`` when ``train()``
    ends: ``None`` when the ``report`` extra is installed, ``True`` always or warn, ``False`` never).

    Defaults: ``clip`` = ``norm:<args.max_grad_norm>`` (``"none"`` when it is 0), ``on_nonfinite="skip"``,
    ``log_dir`` = a new ``<args.output_dir>/gradguard-runs/<time>-transformers`` (a resumed
    run appends to the one its checkpoint names), ``every`` = ``args.logging_steps``.

    Attributes:
        guard: the :class:`gradguard.Guard` of the current ``train()`` (``None`` before it starts).
    """

    # what the mixin reads from the Trainer it is mixed into
    args: Any
    model: Any
    optimizer: Any
    lr_scheduler: Any
    accelerator: Any
    state: Any

    def __init__(self, *args: Any, gradguard: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not isinstance(gradguard, (dict, type(None))):  # (dict("skip"): "dictionary update sequence …")
            raise GradGuardError(
                f"gradguard= takes a dict of gradguard.Guard arguments, e.g. {{'clip': 'auto', 'on_nonfinite': "
                f"'skip'}}; got {type(gradguard).__name__} {gradguard!r}."
            )
        super().__init__(*args, **kwargs)
        config = dict(gradguard or {})
        check_guard_kwargs(config, type(self).__name__, set_here=_NOT_FOR_GUARD, own=_OWN_OPTIONS)
        self._gg_sinks: list[FlushListener] = list(config.pop("sinks", ()))
        self._gg_report: bool | None = config.pop("report", None)
        max_norm = float(self.args.max_grad_norm or 0.0)
        if "clip" in config:
            from_spec(config["clip"])  # a bad spec fails here, not at train()
            if max_norm > 0:
                warnings.warn(
                    f"TrainingArguments.max_grad_norm={max_norm:g} is not applied: gradguard clips with "
                    f"clip={config['clip']!r} in its place (the Trainer's own clipping is off, so nothing clips "
                    "twice and inf gradients are not turned into NaN). Set max_grad_norm=0 to silence this, or "
                    "leave out clip= to clip at max_grad_norm.",
                    UserWarning,
                    stacklevel=2,
                )
        else:
            config["clip"] = Norm(max_norm) if max_norm > 0 else None
            log.info("gradguard clips at max_grad_norm=%g; the Trainer's own clipping is off.", max_norm)
        self.args.max_grad_norm = 0.0  # transformers 4.x clips inline when > 0
        config.setdefault("on_nonfinite", "skip")
        config.setdefault(
            "every", max(1, int(self.args.logging_steps)) if self.args.logging_steps >= 1 else 50
        )
        self._gg_config = config
        self.guard: Guard | None = None
        self._gg_open = False  # the guard of the current train() is open
        self._gg_loss: Tensor | None = None
        self._gg_pending = False  # a backward happened since the last guarded step
        self._gg_gate: StepGate | None = None  # on the torch optimizer's step
        self._gg_skipped = False  # the guard skipped the step the LR scheduler is about to follow
        self._gg_window: list[dict[str, Any]] = []
        self._gg_resume: dict[str, Any] | None = None
        self.add_callback(_Hooks(self))  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ Trainer overrides
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        self._gg_resume = self._gradguard_load(resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        finally:
            if self.guard is not None and self._gg_open:
                self._gg_open = False
                self.guard.close()
                _close_sinks(self._gg_sinks)
                write_report(self.guard.run_dir, self._gg_report)

    def training_step(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Tensor:
        loss: Tensor = super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
        step_loss = loss.detach()  # already divided by the accumulation steps: the sum is the step's loss
        self._gg_loss = step_loss if self._gg_loss is None else self._gg_loss + step_loss
        self._gg_pending = True
        return loss

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        optimizer = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        if not getattr(self, "is_deepspeed_enabled", False):  # refused when train() begins
            # gate the step before Accelerate wraps it: its fp16 wrapper keeps the step it found
            StepGate.on(unwrap_optimizer(optimizer))
        return optimizer

    def _clip_grad_norm(self, model: nn.Module) -> Any:  # transformers >= 5: the Trainer does not clip
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:  # transformers >= 5
        # called right before on_pre_optimizer_step and optimizer.step(): the guard decides here,
        # so that the Trainer's clip_grad_norm_(inf) never runs over the gradients
        self._gradguard_step()
        return None  # the pre-clip norm goes into the logs at the log step (see log()), without a sync here

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.guard is not None and self._gg_open:
            self.guard.flush()  # one host copy, at the Trainer's log cadence
        if self._gg_window:
            window = list(self._gg_window)
            self._gg_window.clear()
            last = window[-1]
            logs["grad_norm"] = float(last["grad_norm"])
            logs["grad_norm_clipped"] = post_clip_norm(last)
            rate = clip_rate(window)
            if rate == rate:
                logs["clip_rate"] = rate
            if self.guard is not None:
                logs["skipped_steps"] = self.guard.skipped_steps
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------ the guard
    def _gradguard_begin(self) -> None:
        if self._gg_open:
            return
        if getattr(self, "is_deepspeed_enabled", False):
            raise GradGuardError(
                "GradGuardTrainer steps the optimizer itself, which DeepSpeed's engine does not allow; use "
                "Trainer(..., callbacks=[GradGuardCallback()]) to monitor a DeepSpeed run."
            )
        optimizer = unwrap_optimizer(self.optimizer)
        if isinstance(optimizer, torch.optim.LBFGS):
            raise GradGuardError("GradGuardTrainer cannot step LBFGS; use GradGuardCallback to monitor it.")
        config = dict(self._gg_config)
        resume = self._gg_resume
        log_dir = config.pop("log_dir", None)
        if log_dir is None and resume is not None and Path(resume.get("run_dir") or "").is_dir():
            log_dir = resume["run_dir"]  # a resumed run appends to the run log it started
        if log_dir is None:
            log_dir = fresh_run_dir(Path(self.args.output_dir) / "gradguard-runs", "transformers")
        self.guard = Guard(
            self.model, optimizer, log_dir=log_dir, exist_ok=resume is not None, name="transformers", **config
        )
        self._gg_gate = self._gradguard_gate(optimizer)
        if self.guard.writer is not None:
            self.guard.writer.update_meta(
                integration="transformers.GradGuardTrainer",
                clipping="gradguard (the Trainer's max_grad_norm is off)",
            )
        self._gg_open = True
        add_flush_listener(self.guard, self._gg_window.extend)
        for sink in self._gg_sinks:
            add_flush_listener(self.guard, sink)
        if resume is not None:
            self.guard.load_state_dict(resume["guard"])
            self._gg_resume = None
        if holds(self.lr_scheduler):
            self.lr_scheduler = HeldScheduler(self.lr_scheduler, self._gradguard_skipped)

    def _gradguard_gate(self, optimizer: torch.optim.Optimizer) -> StepGate:
        """The gate on the optimizer's step (from :meth:`create_optimizer`, or installed now)."""
        gate = StepGate.on(optimizer)
        wrapper = self.optimizer
        captured = getattr(wrapper, "_optimizer_original_step_method", None)
        if captured is not None and getattr(captured, "_gradguard_gate", None) is not gate:
            # an Accelerate fp16 wrapper prepared before the gate existed: it steps what it captured then
            from accelerate.optimizer import patch_optimizer_step

            wrapper._optimizer_original_step_method = optimizer.step
            wrapper._optimizer_patched_step_method = patch_optimizer_step(wrapper, optimizer.step)
        return gate

    def _gradguard_step(self) -> None:
        """Measure → clip → decide; the Trainer's own ``optimizer.step()`` then steps, or not (the gate)."""
        if not self._gg_pending:
            return
        self._gg_pending = False
        if not self._gg_open:
            self._gradguard_begin()
        assert self.guard is not None and self._gg_gate is not None
        loss, self._gg_loss = self._gg_loss, None
        take = True
        if has_grads(self.guard.optimizer):
            if getattr(self.accelerator, "scaler", None) is not None:
                # fp16 AMP: unscale now; the scaler keeps its found_inf, so Accelerate's scaler.step() and
                # update() still see an overflow and lower the scale
                self.accelerator.unscale_gradients()
            take = self.guard.before_step(loss)
        self._gg_gate.decide(take)
        self._gg_skipped = not take

    def _gradguard_skipped(self) -> bool:
        """Whether the guard skipped the step the scheduler is about to follow."""
        skipped, self._gg_skipped = self._gg_skipped, False
        return skipped

    def _gradguard_save(self, global_step: int) -> None:
        if self.guard is None or not self._gg_open:
            return
        folder = Path(self.args.output_dir) / f"checkpoint-{global_step}"
        if folder.is_dir() and self.args.should_save:
            tmp = folder / f".{CHECKPOINT_FILE}.tmp"
            run_dir = self.guard.run_dir
            state = {
                "guard": self.guard.state_dict(),
                "run_dir": str(run_dir) if run_dir is not None else None,
            }
            torch.save(state, tmp)
            os.replace(tmp, folder / CHECKPOINT_FILE)

    def _gradguard_load(self, resume_from_checkpoint: str | bool | None) -> dict[str, Any] | None:
        if not resume_from_checkpoint:
            return None
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            found = get_last_checkpoint(self.args.output_dir)
            if found is None:
                return None  # the Trainer itself raises a clear error
            resume_from_checkpoint = found
        path = Path(str(resume_from_checkpoint)) / CHECKPOINT_FILE
        if not path.is_file():
            warnings.warn(
                f"{path} is missing: the checkpoint was not written by GradGuardTrainer, so gradguard starts "
                "fresh (adaptive clipping statistics and step counters from zero).",
                UserWarning,
                stacklevel=3,
            )
            return None
        state = torch.load(path, weights_only=True)
        if not isinstance(state, dict) or "guard" not in state:
            raise GradGuardError(
                f"{path} does not hold gradguard checkpoint state (a dict with 'guard'); it is not from "
                "GradGuardTrainer. Delete it to start gradguard fresh."
            )
        return state


class GradGuardTrainer(GradGuardMixin, Trainer):
    """``transformers.Trainer`` with every step guarded; takes ``gradguard={...}`` (see :class:`GradGuardMixin`).

    Example:
        >>> from gradguard.integrations.transformers import GradGuardTrainer
        >>> trainer = GradGuardTrainer(model=model, args=args, train_dataset=ds,  # doctest: +SKIP
        ...                            gradguard={"clip": "auto", "on_nonfinite": "skip"})
        >>> trainer.train()  # doctest: +SKIP
    """


class GradGuardCallback(TrainerCallback):
    """Monitor a ``transformers.Trainer`` run: measure and log every step; never change it.

    The Trainer clips and steps as it always does; gradguard measures the gradients the optimizer
    receives (after the Trainer's ``clip_grad_norm_``) and the loss (from the model's output
    ``loss``), and writes the run directory. To clip with gradguard, skip bad steps and keep the LR
    schedule right, use :class:`GradGuardTrainer`.

    Args:
        on_nonfinite: ``"warn"`` (log only) or ``"raise"`` (stop ``train()`` with
            :class:`gradguard.NonFiniteError`, after the log is flushed).
        log_dir: the run directory (default: a new ``<output_dir>/gradguard-runs/<time>-transformers``).
        every: flush interval in steps (default: ``args.logging_steps``).
        sinks: flush listeners (see :mod:`gradguard.integrations.sinks`).
        report: write ``report.html`` when training ends (``None``: when the ``report`` extra is
            installed; ``True``: always, or warn why not; ``False``: never).
        guard_kwargs: other :class:`gradguard.Guard` arguments (``weight_every``, ``spike_z``…).
    """

    def __init__(
        self,
        on_nonfinite: str = "warn",
        *,
        log_dir: str | os.PathLike[str] | None = None,
        every: int | None = None,
        sinks: Sequence[FlushListener] = (),
        report: bool | None = None,
        **guard_kwargs: Any,
    ) -> None:
        if "clip" in guard_kwargs:
            raise GradGuardError(
                f"GradGuardCallback only monitors (the Trainer clips, before any callback); got clip="
                f"{guard_kwargs['clip']!r}. To clip with gradguard use GradGuardTrainer(..., gradguard="
                f"{{'clip': {guard_kwargs['clip']!r}}}), which turns the Trainer's clipping off."
            )
        if on_nonfinite not in ("warn", "raise"):
            raise GradGuardError(
                f"GradGuardCallback cannot skip or roll back a step (the Trainer steps the optimizer and the LR "
                f"scheduler itself); on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}. Use "
                "GradGuardTrainer to skip bad steps."
            )
        if guard_kwargs.get("on_spike") in ("clip", "skip"):
            raise GradGuardError(
                f"GradGuardCallback cannot act on spikes; got on_spike={guard_kwargs['on_spike']!r}. "
                "Use 'warn' or 'ignore', or GradGuardTrainer."
            )
        check_guard_kwargs(guard_kwargs, "GradGuardCallback", set_here=_NOT_FOR_GUARD, own=_OWN_OPTIONS)
        self.on_nonfinite = on_nonfinite
        self.log_dir = log_dir
        self.every = every
        self.sinks = list(sinks)
        self.report = report
        self.guard_kwargs = guard_kwargs
        self.guard: Guard | None = None
        self._hook: Any = None
        self._losses: list[Tensor] = []
        self._shares = False  # the micro-batches' losses are shares of the step's (num_items_in_batch)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model: nn.Module = kwargs["model"]
        optimizer = unwrap_optimizer(kwargs["optimizer"])
        max_norm = float(args.max_grad_norm or 0.0)
        if max_norm > 0:
            measured = f"after the Trainer's clip_grad_norm_(max_norm={max_norm:g})"
            log.info(
                "GradGuardCallback only monitors: the Trainer clips (max_grad_norm=%g) before gradguard sees the "
                "gradients, so the logged norms are post-clip (at most %g) and an inf gradient arrives as NaN. "
                "GradGuardTrainer measures the raw gradients and clips with gradguard instead.",
                max_norm,
                max_norm,
            )
        else:
            measured = "the gradients the optimizer receives (the Trainer does not clip)"
        log_dir = self.log_dir
        if log_dir is None:
            log_dir = fresh_run_dir(Path(args.output_dir) / "gradguard-runs", "transformers")
        every = self.every if self.every is not None else max(1, int(args.logging_steps))
        self.guard = Guard(
            model,
            optimizer,
            clip=None,
            on_nonfinite=self.on_nonfinite,  # type: ignore[arg-type]
            log_dir=log_dir,
            every=every,
            name="transformers",
            monitor_only=True,
            **self.guard_kwargs,
        )
        if self.guard.writer is not None:
            self.guard.writer.update_meta(integration="transformers.GradGuardCallback", measured=measured)
        for sink in self.sinks:
            add_flush_listener(self.guard, sink)
        self._hook = model.register_forward_hook(self._capture_loss, with_kwargs=True)

    def _capture_loss(self, module: nn.Module, inputs: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()))
            # the Trainer passed the whole step's token count: each micro-batch's loss is its share of the
            # step's mean, and the step's loss is their sum (their mean read half of it at 2 micro-batches)
            self._shares = kwargs.get("num_items_in_batch") is not None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.guard is None:
            return
        losses, self._losses = self._losses, []
        if not has_grads(self.guard.optimizer):
            return
        stacked = torch.stack(losses) if losses else None  # (none: the model returned no loss, grads only)
        loss = None if stacked is None else stacked.sum() if self._shares else stacked.mean()
        self.guard.before_step(loss)  # monitor_only: measures, logs, locates a bad step; the Trainer steps

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.guard is not None:
            self.guard.close()
            write_report(self.guard.run_dir, self.report)
        _close_sinks(self.sinks)
