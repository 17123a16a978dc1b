"""The per-step orchestrator: measure → plan the clip → decide → apply → record.

Example:
    >>> import torch, gradguard
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> guard = gradguard.Guard(model, opt, clip="norm:1.0", on_nonfinite="skip")
    >>> loss = model(torch.randn(8, 4)).pow(2).mean()
    >>> loss.backward()
    >>> _ = guard.step(loss)      # replaces opt.step()
    >>> guard.close()

The guard is a small orchestrator; its parts live in :mod:`gradguard._guard` (each with its own
tests): measuring (``measure``), the clip plan (``clipping``), how a step is applied (``apply``,
chosen once at construction), the counters, anomaly handling (capture, replay, locate), recovery
(snapshots, rollback), the events derived at flush, the run's metadata. Record fields are named
in :mod:`gradguard.record`, events built in :mod:`gradguard.events`.

Host syncs. A step never waits for the device when nothing on it needs the host:

* with a fused optimizer (``fused=True`` Adam/AdamW/SGD/Adagrad) and ``on_nonfinite="skip"``,
  the clip coefficient and the skip flag go into the optimizer through the ``grad_scale`` /
  ``found_inf`` protocol of :class:`torch.amp.GradScaler`, so the kernel itself skips the step;
* with ``on_nonfinite="warn"`` (and ``on_spike`` not ``"skip"``) nothing is ever skipped.

Otherwise the step makes **one** host read, in :meth:`Guard._decide`, to choose between stepping
and skipping (the cost :class:`torch.amp.GradScaler` pays on every unfused step). On the
sync-free path the host learns about bad steps at the next flush (every ``every`` steps): their
events are written then, and ``max_consecutive`` is checked then.

Parameters on the CPU, where a read waits for no device, are the exception that costs nothing: a
fused step the flag does not skip is taken by a host branch (cheaper there than the kernel's
protocol), and a host-decided step leaves a clip coefficient of 1 unapplied, with the same bits
and the same outcome as on a device (:mod:`gradguard._guard.apply`).

Guarded from the step they join: every parameter the optimizer steps is measured, clipped and
checked from the first step it has a gradient, also when it joins after construction (unfrozen
with ``requires_grad_(True)``, or added with ``optimizer.add_param_group``). Finding those costs
one look at each parameter group and one ``grad is None`` test per still-frozen parameter a step
(:mod:`gradguard._guard.params`); the step a parameter joins flushes the pending records once and
writes a ``layers`` event (``meta.json``'s ``layers`` grows with it).

The log is not lost when the script forgets :meth:`Guard.close`: a guard still open at interpreter
exit (a normal exit, or an exception that ends the script) is closed then, its pending records
written; ``with Guard(...) as guard:`` closes it when the block ends, exception or not.

Known torch trap, handled: fused SGD with momentum that skips its *first* step (via
``found_inf``) leaves its momentum buffers uninitialised (``torch.empty_like``), and the next
step reads garbage. The guard decides such a first step on the host instead (one sync, once).
A fused Adam/AdamW/Adagrad that skips its first step creates its state (zeros, ``step`` 0); the
next step gives exactly the result of a fresh optimizer.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import events, optable
from gradguard._distributed import Reducer, local, world
from gradguard._guard import apply as applying
from gradguard._guard.anomaly import Anomalies, flagged_nonfinite
from gradguard._guard.apply import Apply, Outcome, Planned, reuse_first_call
from gradguard._guard.births import OptimizerBirths
from gradguard._guard.callerclip import CallerClip
from gradguard._guard.clipping import Clipping, ClipPlan, spike_detector
from gradguard._guard.config import (
    GuardConfig,
    OnExplosion,
    OnNonFinite,
    OnSpike,
    check_distributed,
    check_flag,
    check_log_dir,
    check_model,
    check_monitor_only,
    check_optimizer,
    check_snapshot_dir,
    is_fused,
    momentum_sgd,
)
from gradguard._guard.counters import Counters
from gradguard._guard.explosion import Explosion, Explosions, read_step
from gradguard._guard.flush import FlushEvents, mark_host_spikes
from gradguard._guard.measure import Constants, Measurement, Meter, check_loss
from gradguard._guard.params import GuardedParams
from gradguard._guard.poststep import AfterStep
from gradguard._guard.recovery import Limit, Recovery
from gradguard._guard.row import column, device_row, host_values, rescued, set_column
from gradguard._guard.runmeta import open_run_log, run_meta
from gradguard._guard.usage import Usage
from gradguard.clip import Clipper, HostZClip, coefficient, from_spec
from gradguard.errors import GradGuardError, NonFiniteError, check_state_version
from gradguard.locate import StepCapture
from gradguard.monitor import Monitor
from gradguard.record import DECIDED, LR
from gradguard.runlog import RunWriter
from gradguard.safetext import safe_text
from gradguard.stats import LayerIndex, check_tensors
from gradguard.tunelog import TuneResult, write_tune

__all__ = ["Guard", "OnNonFinite", "OnSpike"]

_STATE_VERSION = 1

#: The guards not closed yet (weakly: a guard dropped by the script can still be collected).
_OPEN: weakref.WeakSet[Guard] = weakref.WeakSet()


def _close_at_exit() -> None:
    """Interpreter exit: close the guards the script left open, so their last records are written."""
    for guard in list(_OPEN):
        if guard._pid != os.getpid():  # a forked child inherits the set: the log is its parent's
            continue
        try:
            guard._close(at_exit=True)
        except Exception as e:  # never fail the exit
            warnings.warn(
                f"gradguard: could not close the run log {guard.run_dir} at exit: {e!r}",
                RuntimeWarning,
                stacklevel=1,
            )


atexit.register(_close_at_exit)


def local_of(named: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
    """This rank's shard of each named tensor (FSDP2 in one process: its shard), detached."""
    return [local(t) for _, t in named]


def _bad_buffers_at_start(guard: Guard, bad: list[str]) -> frozenset[str]:
    """Buffers already non-finite when the guard starts (BatchNorm running statistics loaded from a
    checkpoint with a NaN): said at once and kept in ``meta.json`` (``nonfinite_buffers_at_start``); a
    bad step's forward did not write them (its ``buffers`` event leaves them out), and a rollback's
    snapshot holds them too."""
    if bad:
        if guard.writer is not None:
            guard.writer.update_meta(nonfinite_buffers_at_start=bad)
        warnings.warn(
            f"gradguard: the buffers {', '.join(bad[:4])}{' and more' if len(bad) > 4 else ''} already hold NaN "
            "before the first step — made so when they were built (a mask written as torch.triu(ones) * "
            "float('-inf'), where 0 * -inf is NaN; a statistic of an empty set) or loaded from a checkpoint: every "
            "forward that reads them is non-finite. Build them finite (torch.full((n, n), float('-inf')).triu(1), "
            "or masked_fill), load clean ones, or re-estimate BatchNorm's running statistics "
            "(reset_running_stats() and a few forwards in train mode).",
            RuntimeWarning,
            stacklevel=_user_stacklevel() + 1,
        )
    return frozenset(bad)


def _sparse(root: nn.Module) -> bool:
    """Whether a module of ``root`` makes sparse gradients (``nn.Embedding`` / ``nn.EmbeddingBag``
    with ``sparse=True``): the meter then reads them as their values (:class:`Meter`)."""
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in root.modules())


def _uncaught() -> str | None:
    """At interpreter exit: the uncaught exception that ended the script (Python keeps it in
    ``sys.last_value`` once it printed the traceback), as ``"Type: message"``; ``None`` if none."""
    error = getattr(sys, "last_value", None)
    return None if error is None else ended_by(error)


def ended_by(error: BaseException) -> str | None:
    """An exception that ended a run, as ``meta.json``'s ``ended_by`` says it: ``"Type: message"``
    (its first line, at most 200 characters); ``None`` for gradguard's own stop (a
    :class:`NonFiniteError`: the run's ``abort`` event and ``meta.json``'s ``aborted`` say it)."""
    if isinstance(error, NonFiniteError):
        return None
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:199] + "…"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Setting:
    """A read-only attribute of the guard that reads its :class:`GuardConfig` (``guard.every``…)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, guard: Any, owner: type | None = None) -> Any:
        return self if guard is None else getattr(guard.config, self.name)


class Guard:
    """Measure, clip and guard every optimizer step of a model.

    Call :meth:`step` where you called ``optimizer.step()``.

    Every parameter of ``model`` that ``optimizer`` steps is guarded from the first step it has a
    gradient, also those that join later (unfrozen, or added with ``optimizer.add_param_group``).
    Complex parameters are refused. A layer none of whose parameters has a gradient at a step is
    logged with ``grad_norm`` null (not 0.0).

    The log is written every ``every`` steps, at :meth:`close`, at the end of a ``with`` block
    (exception or not) and, for a guard never closed, at interpreter exit.

    Memory: the always-on part keeps an on-device buffer of ``every × 13`` floats and
    ``every × tensors`` doubles (the per-tensor gradient norms, reduced to per-layer norms at the
    flush; ``every × layers`` floats for a ``norm_type`` other than 0.5, 1, 2 and inf) and never
    copies a gradient. On the steps where weight norms are measured (``weight_every``) it
    holds a temporary copy of the weights. With ``on_nonfinite="rollback"`` a snapshot costs one
    copy of the model and optimizer state, in **host memory** (plus a file with ``snapshot_dir``);
    it is part of :meth:`state_dict`, so a resumed run rolls back as one that never stopped.

    Args:
        model: the root module (its ``named_parameters()`` name the layers in the log). The
            parameters that the optimizer holds are measured from their first gradient on.
        optimizer: the optimizer that steps the model's parameters.
        clip: a spec (``"auto"``, ``"norm:5"``, ``"autoclip:10"``, ``"zclip"``, ``"agc:0.01"``,
            ``"value:1"``, ``"layer:1"``, ``"none"``), a number (norm clipping) or a
            :class:`gradguard.clip.Clipper`.
        on_nonfinite: what to do when the loss or any gradient is NaN/±inf: ``"skip"`` (the step
            never happens: parameters and optimizer state unchanged), ``"rollback"`` (restore the
            last snapshot of model + optimizer), ``"raise"`` (:class:`NonFiniteError` after the
            log is flushed) or ``"warn"`` (measure and log only; the step is taken).
        on_spike: a finite step whose norm is a z-score outlier (ZClip statistics, ``spike_z``):
            ``"ignore"``, ``"warn"`` (log a ``spike`` event), ``"clip"`` (clip it to the spike
            threshold) or ``"skip"`` (the batch's step index is logged in a ``skip`` event).
        spike_z: the z-score of a spike.
        log_dir: the run directory (``None``: no files; ``"auto"``: a new
            ``gradguard-runs/<time>-<name>``, created at once so two guards never share it). Empty
            text is refused (it would write into the current directory).
        name: the run's name in the default run directory.
        every: flush interval in steps (the only host copy of the metrics).
        layer_every: record per-layer gradient norms every this many steps (1: every step).
            ``None`` (the default) keeps wide models' logs small: every step for up to 64 layers,
            every ``ceil(layers / 64)`` steps for wider models (a 2,500-layer model: every 40
            steps), so a record carries at most about 64 layer norms a step on average; chosen
            again when parameters join.
        weight_every: measure weight norms and update/weight ratios every this many steps
            (a temporary copy of the weights on those steps only); ``None`` never.
        snapshot_every: ``rollback`` snapshot cadence in steps (a snapshot is taken after a good
            step at least this many steps after the last one).
        snapshot_dir: also write the snapshot to ``snapshot_dir/snapshot.pt`` (atomically).
        lr_backoff: multiply every group's learning rate by this after a rollback (``None``: keep).
            An LR scheduler that sets the LR from its base values overrides it.
        min_lr: a rollback whose back-off would take the largest group learning rate below this
            stops the run instead (``NonFiniteError``, an ``abort`` event with reason ``min_lr``);
            0 never stops. Below ~1e-8 fp32 weights barely move.
        max_rollbacks: at most this many rollbacks within ``rollback_window`` steps; one more
            stops the run (reason ``max_rollbacks``). ``None``: no cap. The run stops with the
            model and optimizer restored to the last snapshot.
        rollback_window: the window of ``max_rollbacks``, in steps.
        on_explosion: a finite gradient norm that takes off (the onset of an explosion as
            ``gradguard diagnose`` defines it: :func:`gradguard.runtable.climb_onset`): ``"ignore"``,
            ``"warn"`` (an ``explosion`` event) or ``"recover"``: PaLM's procedure, automated —
            rewind the model and optimizer to the last snapshot from before the onset (the batches
            since are not seen again: a plain loop goes on with its next batches), bound every
            later step by ``auto``'s rule from the restored state on (under SGD-like optimizers no
            step longer than half the Polyak step, following the learning rate; under Adam-like
            ones, and with momentum too, a clip at the healthy norm scale, the median before the
            onset; ``lr_backoff`` also lowers the learning rate) and go on; recover again, the bound halved, when a non-finite
            step or a diverging loss shows it too loose. The norm watched is the one applied after the guard's clipping (a climb
            the clipper holds is no explosion). Recoveries count against ``max_rollbacks``. Seen
            from the host values the guard reads anyway: at once on the host-decided path, at the
            next flush on the sync-free paths (``every``). Keeps two snapshots in host memory
            (``snapshot_every``; the first is the initial state). See :mod:`gradguard._guard.explosion`.
        max_consecutive: abort (``NonFiniteError``, log flushed) after this many skipped steps in
            a row (on the sync-free path: checked at the next flush).
        norm_type: p of the gradient norms: a number > 0 or ``inf`` (checked as
            :func:`gradguard.clip_grad_norm_` checks it).
        exist_ok: append to an existing run directory instead of refusing it.
        locate: on a non-finite step, find where the first non-finite value was born (phase,
            module, op, source line): the step is replayed under full instrumentation (exactly
            with ``guard.step(closure)``; otherwise the model's forward is replayed from its
            captured inputs), or, for an explosion, the first spiking step and layer are named.
            Healthy steps only keep references to the model's inputs and the RNG state; under
            ``monitor_only`` with ``on_nonfinite="warn"`` they also cost one host read each (the
            caller applies a bad step, so it is located before that: until ``max_replays`` bad
            steps are located; ``locate=False`` reads nothing). Under ``"warn"`` with
            ``before_step`` a bad step is located before the caller's update too.
        max_replays: replay at most this many anomalous steps (the first ones).
        capture: a :class:`gradguard.locate.StepCapture` already on the model (the zero-code
            runner starts one before the first optimizer step creates the guard).
        loss_scale_floor: under a GradScaler, a scale below this (or ``max_consecutive``
            overflows in a row) is a ``loss_scale_collapse`` event (checked at flush).
        process_group: under ``torch.distributed``, the group whose ranks train together
            (``None``: the default group). Every step makes one all-reduce over it of
            ``4 + (number of FSDP2-sharded tensors)`` floats, so that every rank sees the same
            mean loss, full-tensor norms and non-finite flags and takes the same decision; only
            rank 0 writes the run log (``rank_logs=True``: every other rank also writes its own, in
            ``<run dir>/ranks/rank<r>/``).
        monitor_only: measure, log and check only: never clip, skip or step (the caller steps;
            for framework integrations that own the step). Needs ``clip=None``,
            ``on_nonfinite="warn"`` or ``"raise"``, and ``on_spike`` ``"warn"`` or ``"ignore"``.
            A non-finite step is located at that step, before the caller applies it (see ``locate``).
    """

    on_nonfinite = _Setting()
    on_spike = _Setting()
    norm_type = _Setting()
    every = _Setting()
    layer_every = _Setting()
    weight_every = _Setting()
    snapshot_every = _Setting()
    max_consecutive = _Setting()
    lr_backoff = _Setting()
    loss_scale_floor = _Setting()
    max_replays = _Setting()
    monitor_only = _Setting()
    min_lr = _Setting()
    max_rollbacks = _Setting()
    rollback_window = _Setting()
    on_explosion = _Setting()

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip: str | float | Clipper | None = "auto",
        on_nonfinite: OnNonFinite = "skip",
        *,
        on_spike: OnSpike = "warn",
        spike_z: float = 6.0,
        log_dir: str | os.PathLike[str] | None = None,
        name: str = "run",
        every: int = 50,
        layer_every: int | None = None,
        weight_every: int | None = 50,
        snapshot_every: int = 100,
        snapshot_dir: str | os.PathLike[str] | None = None,
        lr_backoff: float | None = None,
        min_lr: float = 1e-8,
        max_rollbacks: int | None = 5,
        rollback_window: int = 1000,
        on_explosion: OnExplosion = "ignore",
        max_consecutive: int = 10,
        norm_type: float = 2.0,
        exist_ok: bool = False,
        process_group: Any = None,
        loss_scale_floor: float = 1.0,
        rank_logs: bool = False,
        locate: bool = True,
        max_replays: int = 3,
        capture: StepCapture | None = None,
        monitor_only: bool = False,
    ) -> None:
        self.model = check_model(model)
        self.optimizer = check_optimizer(optimizer)
        log_dir = check_log_dir(log_dir)
        snapshot_dir = check_snapshot_dir(snapshot_dir)
        for flag, name_ in ((exist_ok, "exist_ok"), (rank_logs, "rank_logs"), (locate, "locate")):
            check_flag(flag, name_)
        config = GuardConfig.checked(
            on_nonfinite=on_nonfinite,
            on_spike=on_spike,
            spike_z=spike_z,
            norm_type=norm_type,
            every=every,
            layer_every=layer_every,
            weight_every=weight_every,
            snapshot_every=snapshot_every,
            max_consecutive=max_consecutive,
            lr_backoff=lr_backoff,
            loss_scale_floor=loss_scale_floor,
            max_replays=max_replays,
            monitor_only=monitor_only,
            min_lr=min_lr,
            max_rollbacks=max_rollbacks,
            rollback_window=rollback_window,
            on_explosion=on_explosion,
        )
        self.clipper = from_spec(clip)  # type: ignore[arg-type]  # a number means norm clipping
        _claim_clipper(self.clipper, self, optimizer)
        _warn_if_guarded(self, optimizer)
        _warn_duplicates(model, optimizer)
        check_monitor_only(config, self.clipper)
        self._guarded = GuardedParams(model, optimizer, on_change=lambda: self._recovery.forget())
        self._params = self._guarded.params  # grows in place when parameters join
        check_tensors(self._params, what="parameter")
        self._index = LayerIndex(self._guarded.names)
        self.config = config.for_layers(len(self._index.layers))
        self._process_group = process_group
        self._reducer = _reducer(self._params, config, self.clipper, process_group, model)
        self._spike = spike_detector(config.on_spike, spike_z)
        root = self._guarded.root
        self._build_parts(root, (capture or StepCapture(root)) if locate else None, snapshot_dir)
        try:
            self.writer: RunWriter | None = open_run_log(
                log_dir,
                name,
                self._meta(),
                distributed=self._reducer is not None,
                exist_ok=exist_ok,
                rank_logs=rank_logs,
            )
        except BaseException:
            if capture is None:
                self._anomaly.close(0)  # the hooks of the capture it made go with the guard that failed
            raise
        self.monitor = Monitor(
            self._index.layers,
            every=config.every,
            writer=self.writer,
            on_flush=self._on_flush,
            prepare=lambda records: mark_host_spikes(self._spike, records),
            reduce=self._meter.reduce_rows if self._meter.reduces_at_flush else None,
        )
        self._pid = os.getpid()
        _OPEN.add(self)  # closed at interpreter exit if the script never closes it
        self._bad_at_start = self._check_initial_weights()

    def _build_parts(
        self,
        root: nn.Module,
        capture: StepCapture | None,
        snapshot_dir: str | os.PathLike[str] | None,
    ) -> None:
        """The parts the step runs over (see :mod:`gradguard._guard`), and the step's host state."""
        config, optimizer = self.config, self.optimizer
        self._consts = Constants()
        self._meter = Meter(self._params, config.norm_type, self._index, self._reducer, sparse=_sparse(root))
        named = self._guarded.named  # grows in place when parameters join
        self._clipping = Clipping(
            self.clipper, self._spike, config.on_spike == "clip", named, self._consts, optimizer
        )
        self._choose_apply()
        self.counters = Counters()
        self._anomaly = Anomalies(
            root,
            self._params,
            capture,
            max_replays=config.max_replays,
            can_replay=self._reducer is None,
            applied=config.monitor_only and config.on_nonfinite == "warn",  # the caller applies bad steps
            gather=None if self._reducer is None else self._reducer.gather,
        )
        self._recovery = Recovery(
            self.model,
            optimizer,
            {"clipper": self.clipper, "spike": self._spike},
            every=config.snapshot_every,
            lr_backoff=config.lr_backoff,
            snapshot_dir=snapshot_dir,
            active=config.snapshots,
            min_lr=config.min_lr,
            max_rollbacks=config.max_rollbacks,
            window=config.rollback_window,
            keep_earlier=config.on_explosion == "recover",
        )
        self._explosions = Explosions(config.on_explosion, self._recovery)
        self._after = AfterStep(optimizer)  # before_step: the work that waits for the caller's step
        self._usage = Usage(
            optimizer, _warn_at_user
        )  # step(): the loop's own optimizer.step() kept, a loss stepped twice
        self._births = OptimizerBirths(
            optimizer,
            self._guarded.named,
            active=self._reducer is None,
            bad_steps_applied=config.on_nonfinite == "warn",  # else: checked on the anomaly path only
        )
        self._flush_events = FlushEvents(config, self.counters, self._anomaly)
        self._flush_callbacks: list[Callable[[list[dict[str, Any]]], None]] = []
        self._last_skipped: Tensor | bool = False
        self._last_norm: Tensor | None = None
        self._last_nonfinite: bool | None = None  # what the host saw of the last step (last_step_nonfinite)
        # the first bad step's birth, an op or the data (what an abort tells the user to fix)
        self._first_located: events.Event | None = None
        self._warned_no_gradient = False
        self._warned_closure_none = False
        self._buffers_said = False  # buffers found non-finite after a bad step (said once)
        self._buffers_bad_at_start: frozenset[str] = frozenset()  # (set by _check_initial_weights)
        self._stop: NonFiniteError | None = None  # raised once the step's record is in the log
        self._caller_clip: CallerClip | None = None  # before_step(clip=...): of the last step
        self._fields: dict[str, Any] = {}  # before_step(fields=...): the last step's host fields
        self._closed = False

    def _choose_apply(self) -> None:
        """How a step is applied (see :mod:`gradguard._guard.apply`), chosen from the settings and the
        optimizer: at construction, and again when parameters join (a new group may not be fused)."""
        config, optimizer = self.config, self.optimizer
        self.fused = is_fused(optimizer)
        on_cpu = applying.branches_on_host(self._params)
        self._apply = applying.choose(
            config,
            optimizer,
            fused=self.fused,
            momentum_sgd=momentum_sgd(optimizer),
            on_cpu=on_cpu,
        )
        self._kernel_flag = self.fused and not on_cpu  # the fused kernel reads the skip flag (found_inf)
        self._apply_external = applying.choose_external(config, optimizer, on_cpu=on_cpu)  # the caller steps

    def _meta(self) -> dict[str, Any]:
        """The run's ``meta.json`` (see :func:`gradguard._guard.runmeta.run_meta`)."""
        return run_meta(
            model=self.model,
            optimizer=self.optimizer,
            named=self._guarded.named,
            layers=self._index.layers,
            fused=self.fused,
            allreduce_floats=self._reducer.floats_per_step if self._reducer is not None else 0,
            config=self.config,
            clipper=self.clipper,
        )

    # ------------------------------------------------------------------ public
    @property
    def run_dir(self) -> Path | None:
        """The run directory, or ``None`` when not logging."""
        return self.writer.path if self.writer is not None else None

    @property
    def step_count(self) -> int:
        """``step()`` / ``before_step()`` calls so far."""
        return self.counters.step_count

    @property
    def skipped_steps(self) -> int:
        """Steps not taken (on the sync-free path: as of the last flush)."""
        return self.counters.skipped_steps

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last :meth:`step` was skipped.

        On the sync-free path the answer is still on the device: reading this property waits
        for it (one host sync). Unlike Accelerate's ``step_was_skipped``, it is right for fused
        optimizers too.
        """
        return bool(self._last_skipped)  # host sync: only when the user asks

    @property
    def last_step_nonfinite(self) -> bool | None:
        """Whether the last step's loss or gradients were non-finite, as the host saw it during the
        step (no device read here): ``True`` for a bad step it handled then (skipped, rolled back,
        raised, or — under ``monitor_only`` with ``on_nonfinite="warn"`` and ``locate`` — located
        before the caller applies it); ``False`` when it read the step and found it finite;
        ``None`` when it read nothing that tells (the sync-free paths learn of a bad step at the
        next flush, ``every``)."""
        return self._last_nonfinite

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The last step's pre-clip global gradient norm, a device tensor (reading it on the host syncs)."""
        return self._last_norm

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def step(
        self,
        loss_or_closure: Tensor | float | Callable[[], Any] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Any:
        """Measure → clip → step (or skip / roll back / raise). Replaces ``optimizer.step()``.

        Args:
            loss_or_closure: this step's loss (checked for NaN/inf), or a closure that zeroes the
                gradients, recomputes the loss, calls ``backward()`` and returns the loss.
            scaler: the :class:`torch.amp.GradScaler` of an AMP loop. The guard unscales (unless
                you already called ``scaler.unscale_(optimizer)``), measures and clips the unscaled
                gradients, steps the optimizer unless the step is skipped, and calls
                ``scaler.update()`` (which lowers the scale after an overflow). With
                ``monitor_only`` it only unscales: you step and update the scaler.

        A closure is also handed to ``optimizer.step(closure)`` (LBFGS needs it): its first call
        returns the loss already computed (the gradients the guard checked and clipped); later
        calls (LBFGS's line search) run it again, unguarded. A skipped step calls neither.

        Returns:
            The loss (what the closure returned, or what was passed).
        """
        self._check_open()
        _check_scaler(scaler)
        closure = None
        if isinstance(self.optimizer, torch.optim.LBFGS) and not callable(loss_or_closure):
            raise GradGuardError(
                "LBFGS re-evaluates the loss during its step, so it needs a closure: "
                "guard.step(closure), with closure() zeroing the gradients, computing the loss, calling "
                "backward() and returning the loss (as optimizer.step(closure) takes it)."
            )
        if callable(loss_or_closure) and not isinstance(loss_or_closure, Tensor):
            loss = self._anomaly.run_closure(loss_or_closure)
            closure = reuse_first_call(loss_or_closure, loss)
            if loss is None:
                self._warn_closure_without_loss()
        else:
            loss = loss_or_closure
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        if scaler is not None:
            _unscale_once(scaler, self.optimizer)
        watching = not self.config.monitor_only  # (monitor_only: the loop steps the optimizer itself)
        if watching:
            self._usage.enter(loss_or_closure)
        try:
            self._step(loss, scaler, external=False, closure=closure)
        finally:
            if watching:
                self._usage.leave()
            self._anomaly.end_step()
        return loss

    def before_step(
        self,
        loss: Tensor | float | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        clip: CallerClip | None = None,
        fields: dict[str, Any] | None = None,
    ) -> bool:
        """Measure, clip in place and decide, for callers that call ``optimizer.step()`` themselves.

        Framework integrations and the zero-code runner use it where they cannot replace
        ``optimizer.step()``. It decides on the host (one sync) and does the step's bookkeeping
        (counters, events, rollback under ``on_nonfinite="rollback"``). With ``monitor_only`` and
        ``on_nonfinite="warn"`` nothing is ever skipped: it returns ``True`` without a host read.

        What needs the weights after the step (the weight norms and update ratios of a
        ``weight_every`` step, the ``rollback`` snapshot) runs right after the caller's next
        ``optimizer.step()``, from a step post-hook (:mod:`gradguard._guard.poststep`). Step once
        per ``True``: if the optimizer does not step before the next ``before_step`` / :meth:`step`
        or :meth:`close`, that work is dropped (the step's record has no weight norms or update
        ratios; no snapshot is taken for it).

        Args:
            loss: this step's loss (checked for NaN/inf).
            scaler: the caller's :class:`torch.amp.GradScaler`: the gradients are unscaled (unless
                the caller did), an fp16 overflow is a skipped ``amp_overflow`` step (not a
                non-finite one) and the scale is logged; ``scaler.step`` / ``scaler.update()``
                stay the caller's.
            clip: the caller's own norm clipping of this step's gradients (measured before it
                clipped): its threshold, coefficient and clip rate go into the step's row.
                Further clip calls of the same step: :meth:`record_clip`.
            fields: host fields for this step's record and for the events written during it
                (``gradguard run`` adds ``global_step``).

        Returns:
            ``True`` when the optimizer should step. On ``False`` the gradients are left as they
            are: the caller must not step (drop them, or skip its ``optimizer.step()``).
        """
        self._check_open()
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        if scaler is not None:
            _unscale_once(scaler, self.optimizer)
        try:
            outcome = self._step(loss, scaler, external=True, clip=clip, fields=fields)
        finally:
            self._anomaly.end_step()
        return _caller_steps(outcome)

    def record_clip(self, threshold: float, norm: Tensor, *, norm_type: float = 2.0) -> bool:
        """A further norm clip by the caller of the step :meth:`before_step` just measured (a second
        ``clip_grad_norm_`` call, on another parameter group): its threshold and pre-clip norm join
        the step's row (see :class:`~gradguard._guard.callerclip.CallerClip`). ``False`` when the
        row was flushed already (``every=1``): it keeps the first clip's numbers."""
        clip = self._caller_clip
        if clip is None:
            clip = self._caller_clip = CallerClip(norm_type=norm_type)
        clip.add(threshold, norm)
        return self.monitor.amend(self.counters.step_count - 1, clip.columns(self.norm_type))

    def record_clip_value(self, clip_value: float, grads: list[Tensor]) -> bool:
        """A value clip by the caller of the step :meth:`before_step` just measured (Lightning's
        ``gradient_clip_algorithm="value"``, after its hook): the fraction of elements it clamps joins the
        step's row as its ``clip_fraction``. ``False`` when the row was flushed already (``every=1``)."""
        clip = self._caller_clip
        if clip is None:
            clip = self._caller_clip = CallerClip()
        clip.add_value(clip_value, grads)
        return self.monitor.amend(self.counters.step_count - 1, clip.columns(self.norm_type))

    def add_flush_callback(self, fn: Callable[[list[dict[str, Any]]], None]) -> Any:
        """Call ``fn(records)`` at every flush, after the guard's own handling (even if that raises).

        The records are the host copies the flush makes anyway (one per ``every`` steps): a sink
        (TensorBoard, W&B, a framework logger) adds no host sync. Returns a handle with ``remove()``.
        """
        if not callable(fn):
            raise GradGuardError(f"a flush callback must be callable with the records, got {fn!r}.")
        self._flush_callbacks.append(fn)
        return _Handle(self._flush_callbacks, fn)

    def flush(self) -> None:
        """Write the pending records and events now (one host copy)."""
        self.monitor.flush()

    def tune(
        self, loss_fn: Callable[..., Tensor], batches: Iterable[Any] | None = None, **options: Any
    ) -> TuneResult:
        """Verify candidate thresholds (and/or learning rates) from the state of now: :func:`gradguard.tune.tune`
        on this guard's model and optimizer (both restored exactly afterwards). The result (a
        :class:`gradguard.tunelog.TuneResult`) is also written to ``tune.json`` in the run directory,
        where ``gradguard diagnose`` quotes it as verified advice."""
        from gradguard.tune import tune

        self._check_open()
        result = tune(self.model, self.optimizer, loss_fn, batches, **options)
        result = dataclasses.replace(result, start_step=self.step_count)
        if self.run_dir is not None:
            write_tune(self.run_dir, result)
        return result

    def end_unfinished_step(self, fields: dict[str, Any] | None = None) -> None:
        """The script ends after this step's forward, before its optimizer step (``gradguard run``
        of timm-style code: ``if not math.isfinite(loss_value): sys.exit(1)``; a backward that raised
        under ``detect_anomaly``): where that forward or its loss code made a non-finite value, locate
        it and log the step's ``nonfinite`` event (the anomaly path: host reads and a replay of the
        forward; nothing on a healthy end). ``fields``: the unfinished step's own host fields (its
        ``global_step``), in place of the last step's."""
        capture = self._anomaly.capture
        if self._closed or capture is None or not capture.unfinished_nonfinite():
            return
        if fields is not None:
            self._fields = dict(fields)
        step = self.counters.step_count
        located = self._anomaly.locate(step, True, self.monitor.peek) or {}
        stopped = events.nonfinite(
            step,
            phase="loss",
            tensor="output",
            kind=None,
            located_by="norm",
            policy=self.config.on_nonfinite,
            note="the script stopped after this step's forward, before its backward and optimizer step",
        )
        event = self._anomaly.report_once({**stopped, **located})
        if event is not None:
            self._event(event)

    def close(self) -> None:
        """Flush and close the run log. Safe to call twice."""
        self._close(at_exit=False)

    def _close(self, *, at_exit: bool) -> None:
        """Flush and close; ``at_exit``: at interpreter exit, for a guard the script never closed
        (``meta.json`` says ``closed_at_exit``)."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._after.close()  # a step after close is not the guard's
        self._usage.close()
        try:
            recurred = self._anomaly.close(self.counters.step_count)
            if recurred is not None:
                self._event(recurred)
            self.flush()
        finally:  # a flush callback that raises still leaves a closed run log
            self._births.close()
            if self.writer is not None:
                self.writer.update_meta(
                    end_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    steps=self.step_count,
                    skipped_steps=self.skipped_steps,
                    **({"closed_at_exit": True} if at_exit else {}),
                    **({"ended_by": ended} if at_exit and (ended := _uncaught()) else {}),
                )
                self.writer.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Counters, the clipper's / spike detector's state and, under ``on_nonfinite="rollback"`` or
        ``on_explosion="recover"``, the recovery's (the snapshots in host memory, their step, the
        recent rollbacks) and the explosion watch's (its norms, the recovery's bound):
        tensors and Python containers of scalars, read back by ``torch.load(..., weights_only=True)``.

        No I/O: the steps still in the monitor's buffer are read (one host copy) and counted in
        the state as the next flush will count them; nothing is flushed or written.
        """
        pending = self.monitor.peek()
        spike = self._spike
        if isinstance(spike, HostZClip) and pending:  # the norms the next flush will feed it
            spike = copy.deepcopy(spike)
            mark_host_spikes(spike, pending)
        return {
            "version": _STATE_VERSION,
            **self.counters.after(pending).state_dict(),
            "clipper": self.clipper.state_dict() if self.clipper is not None else None,
            "spike": spike.state_dict() if spike is not None else None,
            "recovery": self._recovery.state_dict() if self._recovery.active else None,
            "anomaly": self._anomaly.state_dict(),
            "explosion": self._explosions.state_dict(pending) if self._explosions.active else None,
        }

    def _load_parts(self, state: dict[str, Any]) -> None:
        """Load each part of ``state`` (checked already as a whole); :class:`_PartError` names the one
        whose values cannot be read."""
        loaders: list[tuple[str, Callable[[Any], None] | None]] = [
            ("step_count", lambda _: self.counters.load_state_dict(state)),
            ("clipper", self.clipper.load_state_dict if self.clipper is not None else None),
            ("spike", self._spike.load_state_dict if self._spike is not None else None),
            ("recovery", self._recovery.load_state_dict if self._recovery.active else None),
            ("anomaly", self._anomaly.load_state_dict),
            ("explosion", self._explosions.load_state_dict if self._explosions.active else None),
        ]
        for key, load in loaders:
            part = state.get(key)
            if load is None or part is None:
                continue
            try:
                load(part)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
                raise _PartError(key, e) from e

    def number_on_from_the_log(self) -> None:
        """Before the first step: number this guard's steps on from the last step its run log holds.
        A script resumed under ``gradguard run --exist-ok`` (its own checkpoint, not the guard's
        state) then follows the first session in the log instead of superseding it from step 0."""
        last = self.writer.last_logged_step() if self.writer is not None else None
        if last is not None and self.counters.step_count == 0:
            self.counters.step_count = last + 1

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next steps equal those of a guard that never stopped.

        When logging, the run log is told (:meth:`gradguard.runlog.RunWriter.resume`): the records
        of the steps from the checkpoint's on, logged before, are superseded by the new ones.
        """
        check_state_version(state, _STATE_VERSION, "Guard", "Pass what Guard.state_dict() returned.")
        _check_state_keys(state)
        Counters.check_state(state)
        if self.clipper is not None and state.get("clipper") is not None:
            self.clipper.check_state(state["clipper"])  # before anything is loaded
        if self._recovery.active and state.get("recovery") is not None:
            self._recovery.check_fits(state["recovery"])
        self._after.drop()  # the post-step work of a step from before the checkpoint
        self.flush()  # this guard's own pending steps, before the step count moves
        before = self.state_dict()
        try:
            self._load_parts(state)
        except _PartError as e:  # a part that cannot be read: the guard is put back as it was
            self._load_parts(before)
            raise GradGuardError(
                f"Guard state's {e.part!r} part cannot be loaded ({type(e.error).__name__}: {e.error}); nothing was "
                "loaded. Pass what Guard.state_dict() returned, unchanged (or set that part to None to start it fresh)."
            ) from e.error
        if self.writer is not None:
            self.writer.resume(self.counters.step_count)

    # ------------------------------------------------------------------ the step
    def _step(
        self,
        loss: Tensor | float | None,
        scaler: torch.amp.GradScaler | None,
        *,
        external: bool,
        closure: Callable[[], Any] | None = None,
        clip: CallerClip | None = None,
        fields: dict[str, Any] | None = None,
    ) -> Outcome:
        """(Parameters join) → measure → plan the clip → decide → apply → record.

        ``external``: ``before_step``, the caller steps the optimizer; on a step it takes, the
        post-step work waits for its step (:meth:`_after_callers_step`). ``clip`` and ``fields``:
        see :meth:`before_step`.
        """
        check_loss(loss)
        self._caller_clip, self._fields = clip, dict(fields) if fields else {}
        self._after.drop()  # the caller did not step after the last before_step
        step = self.counters.step_count
        undone = self._recovery.undone()  # a scheduler that set a backed-off rate back up (host floats)
        if undone is not None:
            _warn_at_user(f"gradguard: {undone}")
        self._births.begin(step)  # under "warn": the optimizer step that follows is checked for a birth
        joined = self._guarded.joining()
        if joined:
            self._join(joined, step)
        self._explosions.initial_snapshot(step)
        apply: Apply = self._apply_external if external else self._apply
        loss, recurred = self._anomaly.begin(loss, step)
        if recurred is not None:
            self._event(recurred)
            self._note_located(recurred)
        known = clip.known_norms(self.config.norm_type) if clip is not None else None  # the caller's norms
        with torch.no_grad():  # gradients made by backward(create_graph=True) require grad themselves
            m = self._meter.measure(
                loss, self.monitor.next_rows, known=known
            )  # in the record's rows: no copies
        if clip is not None:
            clip.measured(m.total)  # a caller's clip that comes after this measurement (Lightning's)
        if not m.present:
            self._warn_no_gradient(step)
        self._last_norm = m.total
        plan = self._explosions.tighten(self._clipping.plan(m), m, self._consts)
        skip, overflow = self._skip_flags(m, plan.spike, scaler)
        row_plan, clip_columns = self._caller_clip_in_row(plan, clip, apply)
        row = device_row(m, row_plan, skip, overflow, self._consts)
        weights = self._meter.copy_weights() if self._weight_step(step) else None
        clip_in_place = lambda: self._clip_in_place(row)  # noqa: E731
        found_inf = column(row, "skipped") if self._kernel_flag else None  # the fused kernel's skip flag
        planned = Planned(m.grads, plan.coef, skip, scaler, clip_in_place, closure, found_inf)
        outcome = apply(planned, lambda p: self._decide_on_host(p, m, row))
        self._last_skipped = outcome.skipped
        self._last_nonfinite = None
        later = external and _caller_steps(outcome)  # the caller steps: the post-step work waits for it
        if outcome.on_host:
            self._decided(step, bool(outcome.skipped), m, row, scaler, stepped=not later)
        elif self._anomaly.reads_each_step:  # monitor only, warn: the caller applies it next
            self._report_applied(step, m, row, replayable=True)
        for name, value in clip_columns.items():  # what the caller's own clip did, measured before it clipped
            set_column(row, name, value)
        held = later and weights is not None  # the weight stats come after the caller's step
        self._record(step, loss, m, row, outcome, scaler, None if held else weights, held=held)
        if held or (later and self._recovery.active):
            self._after.arm(lambda: self._after_callers_step(step, weights))
        return outcome

    def _join(self, joined: list[tuple[str, nn.Parameter]], step: int) -> None:
        """Parameters joined at ``step`` (unfrozen, or added to the optimizer; the rare path): from
        this step on they are measured, clipped and checked. The layer index, the all-reduce, the
        apply strategy and the log's layer list grow with them; pending records are flushed first."""
        check_tensors(self._params, what="parameter")
        index = LayerIndex(self._guarded.names)
        added = index.layers[len(self._index.layers) :]
        self.monitor.add_layers(added)  # the pending records are flushed over the layers they measured
        self._index = index
        if self._reducer is not None:
            self._reducer = _reducer(self._params, self.config, self.clipper, self._process_group, self.model)
        self._meter.reindex(self._index, self._reducer)
        self.config = self.config.for_layers(len(self._index.layers))
        self._choose_apply()
        if self.writer is not None:  # what the new parameters change; the optimizer entry stays as written
            self.writer.update_meta(**{k: v for k, v in self._meta().items() if k != "optimizer"})
        self._event(events.layers(step, [n for n, _ in joined], added, _group_lr(self.optimizer, joined)))

    def _caller_clip_in_row(
        self, plan: ClipPlan, clip: CallerClip | None, apply: Apply
    ) -> tuple[ClipPlan, dict[str, Tensor | float]]:
        """The plan the step's row is built from, and the caller's clip columns written into the
        row after the step is decided (``clip``: see :meth:`before_step`).

        Monitor only (:class:`~gradguard._guard.apply.Observe`: nothing decided or clipped by the
        guard), one caller clip's coefficient, threshold and clip flag go into the row as it is
        built (no write after it); ``grad_norm`` (torch's total norm) is still written after, so
        the step's flags and its ``nonfinite`` event keep the guard's own measurement. Elsewhere the
        decision reads the guard's own columns (an overflow rescue, its threshold): all are written
        after it."""
        if clip is None:
            return plan, {}
        one_call = clip.single() if isinstance(apply, applying.Observe) else None
        if one_call is None:
            return plan, clip.columns(self.config.norm_type)
        coef, threshold, clipped = one_call
        norm = clip.grad_norm(self.config.norm_type)
        return plan._replace(coef=coef, threshold=threshold, fraction=clipped), (
            {} if norm is None else {"grad_norm": norm}
        )

    def _skip_flags(
        self, m: Measurement, spike: Tensor, scaler: torch.amp.GradScaler | None
    ) -> tuple[Tensor, Tensor]:
        """Which steps the policy skips (``skip``), and AMP overflows (``overflow``), as device flags.

        Under a GradScaler, non-finite gradients with a finite loss are an fp16 overflow: the
        scaler's normal business (skipped whatever the policy; the scaler lowers its scale).
        """
        overflow = m.flags()[1] & ~m.flags()[0] if scaler is not None else self._consts.false(m.device)
        skip = m.bad if self.config.on_nonfinite != "warn" else overflow
        if self.config.on_spike == "skip":
            skip = skip | spike
        return skip, overflow

    def _weight_step(self, step: int) -> bool:
        """Whether this step measures weight norms and update ratios."""
        return self.config.weight_every is not None and step % self.config.weight_every == 0

    def _clip_in_place(self, row: Tensor) -> None:
        """Run the in-place clipper (value / AGC / per-layer); its clip fraction into the row."""
        fraction = self._clipping.in_place()
        if fraction is not None:
            set_column(row, "clip_fraction", fraction)

    def _decide(self, skip: Tensor) -> bool:
        """The step's one host read: is this step skipped?"""
        return bool(skip)  # host sync: the one read per step on the host-decided path

    def _decide_on_host(self, planned: Planned, m: Measurement, row: Tensor) -> bool:
        """The one host read; then, on a bad step, the anomaly path: finite gradients whose float32
        norm only overflowed are measured exactly and the step goes on, clipped. Watching for
        explosions, the one read brings the norm too; a confirmed onset may rewind (step not taken)."""
        if self._explosions.active:
            vals = read_step(row)  # host sync: the step's one read, the norm with the skip flag
            found = self._explosions.see_step(self.counters.step_count, vals)
            if found is not None and self._explode(found, self.counters.step_count):
                return True  # rewound to before the onset: this step is not taken
            skipped = bool(vals["skipped"])
        else:
            skipped = self._decide(planned.skip)
        if not skipped:
            return False
        if self._reducer is not None:  # a host decision from local values could differ between ranks
            return True
        vals = host_values(row)  # host sync: a bad step (the anomaly path)
        if not vals["nonfinite"] or vals["loss_nonfinite"] or vals["grad_nan"]:
            return True
        total = self._meter.exact_total(m)
        if total is None:
            return True
        planned.coef = coefficient(total, column(row, "threshold").to(torch.float64)).float()
        rescued(row, total, planned.coef, self._clipping.fraction(planned.coef))
        clipped = bool(planned.coef < 1)  # host read: the anomaly path
        self._event(events.overflow(self.counters.step_count, float(total), clipped=clipped))
        return False

    def _decided(
        self,
        step: int,
        skipped: bool,
        m: Measurement,
        row: Tensor,
        scaler: torch.amp.GradScaler | None,
        *,
        stepped: bool = True,
    ) -> None:
        """The host decided this step: count it; a good step may be snapshotted (``stepped``: now,
        else after the caller's step), a skipped one is logged and its policy followed (raise, roll
        back, abort after too many in a row)."""
        if skipped and self._explosions.rewound(step):  # its events (explosion, rollback) are written
            self.counters.skipped_steps += 1
            return
        if not skipped:
            self.counters.taken()
            if self.config.on_nonfinite == "warn":  # a bad step is taken: the flush will not report it
                self._report_applied(step, m, row, replayable=not stepped)
            if stepped:
                self._recovery.after_good_step(step)
            return
        vals = host_values(row)  # host sync: a skipped step (the anomaly path)
        if vals["amp_overflow"]:  # normal under AMP: logged, not an anomaly
            self.counters.overflowed()
            scale = scaler.get_scale() if scaler is not None else None  # host sync: an overflow step
            self._event(events.skip(step, events.SKIP_AMP_OVERFLOW, loss_scale=scale))
            return
        self.counters.skipped()
        bad = bool(vals["nonfinite"])
        if bad:
            self._report_nonfinite(step, vals, m)
        if self.counters.consecutive >= self.config.max_consecutive:
            self._stop = self._abort(step)
        elif bad and self.config.on_nonfinite == "raise":
            self._stop = NonFiniteError(self._nonfinite_message(step, vals), located=self._first_located)
        elif bad and self.config.on_nonfinite == "rollback":
            self._roll_back(step)
        else:
            reason = events.SKIP_NONFINITE if bad else events.SKIP_SPIKE
            self._event(events.skip(step, reason, grad_norm=vals["grad_norm"]))

    def _after_callers_step(self, step: int, weights: list[Tensor] | None) -> None:
        """Right after the caller's optimizer step (``before_step`` returned ``True``): the weight
        stats of a ``weight_every`` step into its held record, a due ``rollback`` snapshot."""
        if weights is not None:
            self.monitor.complete(self._meter.weight_stats(weights))
        self._recovery.after_good_step(step)

    def _roll_back(self, step: int) -> None:
        """Restore the last snapshot (and back off the LR); past a bound of recovery (``max_rollbacks``,
        ``min_lr``) restore it without a back-off and stop the run."""
        limit = self._recovery.limit(step)
        for event in self._recovery.rollback(step, back_off=limit is None):
            self._event(event)
        if limit is not None:
            self._stop = self._stop_recovery(step, limit)

    def _explode(self, found: Explosion, step: int) -> bool:
        """An explosion's onset, confirmed at ``step``: its events; under ``on_explosion="recover"``
        the rewind (past a bound: restored, and the run stops). Returns whether it rewound."""
        done, limit, rewound = self._explosions.respond(found, step)
        for event in done:
            self._event(event)
        if rewound:
            self.counters.consecutive = 0
        if limit is not None:
            self._stop = self._stop_recovery(step, limit)
        return rewound

    def _report_applied(self, step: int, m: Measurement, row: Tensor, *, replayable: bool) -> None:
        """``on_nonfinite="warn"``: a step applied whatever it holds, read on the host now (under
        ``monitor_only``, one read a step while replays are left: :attr:`Anomalies.reads_each_step`;
        on the host-decided path, after its one read). A bad one gets its ``nonfinite`` event here,
        located while replays are left and its update has not run (``replayable``: the caller steps
        next; after the update a replay would see other weights)."""
        vals = host_values(row)  # host sync: see the docstring
        bad = bool(vals["nonfinite"]) and not vals["amp_overflow"]  # an overflow is the scaler's business
        self._last_nonfinite = bad
        if bad:
            self._report_nonfinite(step, vals, m, locate=replayable and self._anomaly.replays_left)

    def _report_nonfinite(
        self, step: int, vals: dict[str, float], m: Measurement, *, locate: bool = True
    ) -> None:
        """The step's ``nonfinite`` event (once): where it was born (``locate``: replayed), the
        always-on flags as evidence; before it, a birth in the last optimizer step taken (the
        weights read: the anomaly path)."""
        self._last_nonfinite = True
        for born in self._births.at_bad_step(step, self.monitor.peek):
            self._event(born)
            self._note_located(born)
        if self._anomaly.reported(step):
            return
        layer_norms = dict(zip(self._index.layers, self._meter.layer_norms(m).tolist()))  # host sync: anomaly
        located = (
            self._anomaly.locate(step, bool(vals["loss_nonfinite"]), self.monitor.peek) if locate else None
        )
        flagged = flagged_nonfinite(step, vals, layer_norms, self.config.on_nonfinite)
        event = self._anomaly.report_once({**flagged, **(located or {})})
        if event is not None:
            self._event(event)
            self._note_located(event)
        self._check_buffers(step)

    def _check_buffers(self, step: int) -> None:
        """After a non-finite step (the anomaly path: host reads): buffers the step's forward made
        non-finite (BatchNorm's running statistics update in the forward, in train mode, before any
        step is skipped). Said once, with its fix: skipping kept the weights, not these."""
        if self._buffers_said:
            return
        named = [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point() and not b.is_meta]
        if not named:
            return
        device = named[0][1].device
        finite = torch.stack(
            [torch.isfinite(b).all().to(device) for _, b in named]
        ).tolist()  # host sync: the anomaly path, once
        bad = [n for (n, _), ok in zip(named, finite) if not ok and n not in self._buffers_bad_at_start]
        if not bad:
            return
        self._buffers_said = True
        skipped = self.config.on_nonfinite != "warn"
        self._event(events.buffers(step, bad, skipped=skipped))
        warnings.warn(
            f"gradguard: step {step}'s forward wrote NaN/inf into the buffers {', '.join(bad[:4])}"
            f"{' and more' if len(bad) > 4 else ''}{' (the step itself was skipped: the weights are untouched)' if skipped else ''}: "
            "the model's eval output is non-finite from now on. on_nonfinite='rollback' restores them with the "
            "weights; else reload them from a checkpoint (or reset BatchNorm's running stats) after training.",
            RuntimeWarning,
            stacklevel=_user_stacklevel(),
        )

    def _note_located(self, event: events.Event) -> None:
        """The first located birth (an op, or the data): what an abort names as the fix."""
        event = self._births.attribute(event)
        if self._first_located is None and (
            event.get("op")
            or event.get("phase") in ("data", "optimizer", "script")
            or event.get("tensor") in _STATE
        ):
            self._first_located = event

    def _record(
        self,
        step: int,
        loss: Tensor | float | None,
        m: Measurement,
        row: Tensor,
        outcome: Outcome,
        scaler: torch.amp.GradScaler | None,
        weights: list[Tensor] | None,
        *,
        held: bool = False,
    ) -> None:
        """The step's record into the monitor's buffer (device copies); a pending raise / abort.

        ``held``: the weight stats come later (:meth:`_after_callers_step`); the monitor holds the row.
        """
        if scaler is not None:  # the scale after update(), for the loss-scale collapse check at flush
            scale = scaler._get_scale_async()
            if scale is not None:
                set_column(row, "loss_scale", scale)
        extras = self._meter.weight_stats(weights) if weights is not None else {}
        layer_grads = self._meter.layer_record(m) if self.config.layer_step(step) else None
        lr = self.optimizer.param_groups[0].get("lr")
        host: dict[str, Any] = {LR: float(lr) if isinstance(lr, (int, float)) else None}
        if self._fields:
            host.update(self._fields)
        if loss is None:
            host["loss"] = None
        if outcome.on_host:
            host["skipped"] = bool(outcome.skipped)
            host[DECIDED] = True  # the host already handled this step (events, counters)
        self.monitor.record(step, row, layer_grads, host, extras, absent=m.absent, held=held)
        self.counters.advance()
        if self._stop is not None:  # raise / abort, with this step's record in the log
            err, self._stop = self._stop, None
            self.flush()
            raise err

    def _sync_free(self) -> bool:
        """Whether ``step()`` usually decides on the device, without a read that waits for it: the host
        learns of a skipped step at the flush (see :mod:`gradguard._guard.apply`)."""
        return self._apply.sync_free

    # ------------------------------------------------------------------ events
    def _warn_closure_without_loss(self) -> None:
        """A closure that returns nothing: the loss is neither checked nor logged; said once."""
        if self._warned_closure_none:
            return
        self._warned_closure_none = True
        warnings.warn(
            "gradguard: the closure passed to guard.step() returned None, so the loss is not checked for "
            "NaN/inf nor logged (the run log's loss is null). End the closure with `return loss` (as "
            "optimizer.step(closure) expects; LBFGS needs it). Said once per guard.",
            RuntimeWarning,
            stacklevel=_user_stacklevel(),
        )

    def _warn_no_gradient(self, step: int) -> None:
        """A step with no gradient at all (``loss.backward()`` forgotten, or called on another loss):
        it is recorded with a norm of 0, which a reader could take for a converged model; said once."""
        if self._warned_no_gradient:
            return
        self._warned_no_gradient = True
        warnings.warn(
            f"gradguard: step {step}: no guarded parameter has a gradient; was loss.backward() called before "
            "the optimizer step (optimizer.zero_grad() between backward() and step() clears them), on a loss "
            "computed from this model (a loss of another model, or of detached outputs, reaches none of its "
            "weights)? The step is recorded with a gradient norm of 0 (said once per guard).",
            RuntimeWarning,
            stacklevel=_user_stacklevel(),
        )

    def _check_initial_weights(self) -> frozenset[str]:
        """The parameters already non-finite when the guard starts (an initialisation or a loaded
        matrix with a NaN row): said at once, kept in ``meta.json`` (``nonfinite_at_start``), and a
        later event that finds one of them non-finite says so (not "an earlier optimizer step wrote
        it"). One read of the weights, here only; not across ranks (a rank holds shards)."""
        named = [(n, p) for n, p in self._guarded.named if p.is_floating_point() and not p.is_meta]
        buffers = [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point() and not b.is_meta]
        if not named or self._reducer is not None:
            return frozenset()
        device = local(named[0][1]).device
        # a weight must be finite; a buffer only NaN-free: ±inf there is a mask (a causal attention mask of
        # -inf above the diagonal) that a softmax reads as "excluded", not a fault
        ok_of = [torch.isfinite(t.detach()).all() for t in local_of(named)] + [
            ~torch.isnan(t.detach()).any() for t in local_of(buffers)
        ]
        finite = torch.stack([flag.to(device) for flag in ok_of]).tolist()  # host sync: once
        bad = [n for (n, _), ok in zip(named, finite) if not ok]
        held = [n for (n, _), ok in zip(buffers, finite[len(named) :]) if not ok]
        self._buffers_bad_at_start = _bad_buffers_at_start(self, held)
        if bad:
            if self.writer is not None:
                self.writer.update_meta(nonfinite_at_start=bad)
            holds = "holds" if len(bad) == 1 else "hold"
            warnings.warn(
                f"gradguard: {', '.join(bad[:5])}{' and more' if len(bad) > 5 else ''} already {holds} NaN or inf "
                "before the first step: the initialisation or the weights loaded. Training goes non-finite where "
                "they are used; fix them before training (torch.isfinite(p).all()).",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
        return frozenset(bad)

    def _event(self, event: events.Event) -> None:
        """Write one event now (the step's path), with the step's host fields (``before_step(fields=)``)."""
        event = self._births.attribute(_from_the_start(event, self._bad_at_start))
        if self.writer is not None:
            self.writer.write_event({**event, **self._fields} if self._fields else event)

    def _nonfinite_message(self, step: int, vals: dict[str, float]) -> str:
        what = (
            f"the loss is {vals['loss']}"
            if vals["loss_nonfinite"]
            else f"the gradient norm is {vals['grad_norm']}"
        )
        where = f" Run log: {self.run_dir}." if self.run_dir else ""
        fix = (
            _fix_of(self._first_located, self._buffers_bad_at_start)
            if self._first_located is not None
            else ""
        )
        return (
            f"step {step}: {what}.{fix}{where} Use on_nonfinite='skip' to drop such steps, 'rollback' to "
            "restore the last good state, or look at the run with `gradguard diagnose`."
        )

    def _abort(self, step: int) -> NonFiniteError:
        """Too many skipped steps in a row: log the abort, return the error to raise (after the flush)."""
        weights_bad = not self._meter.weights_finite()
        consecutive = self.counters.consecutive
        msg = (
            f"{consecutive} consecutive skipped steps (last: step {step}); gradguard stopped the run."
            + (" The weights themselves are non-finite: use on_nonfinite='rollback'." if weights_bad else "")
            + (
                self._negative_lr()
                or self._runaway_update() + _fix_of(self._first_located, self._buffers_bad_at_start)
            )
            + " Or raise max_consecutive."
            + (f" Run log: {self.run_dir}." if self.run_dir else "")
        )
        return self._aborted(step, msg, events.ABORT_CONSECUTIVE, weights_bad)

    def _stop_recovery(self, step: int, limit: Limit) -> NonFiniteError:
        """A rollback loop passed a bound (``limit``): log the abort, return the error to raise."""
        msg = (
            f"step {step}: {limit.why} gradguard stopped the run; the model and optimizer hold the snapshot "
            f"of step {limit.fields['to_step']}. {limit.fix}"
            + (f" Run log: {self.run_dir}." if self.run_dir else "")
        )
        return self._aborted(step, msg, limit.reason, False, **limit.fields)

    def _negative_lr(self) -> str:
        """An abort's cause where the optimizer's learning rate is negative now (a schedule run past
        its end: every step climbs the loss, and neither the rate's size nor clipping is the fix);
        ``""`` otherwise. The same cause as diagnose's ``lr_schedule``."""
        rates = [g["lr"] for g in self.optimizer.param_groups if isinstance(g.get("lr"), float)]
        if not rates or min(rates) >= 0:
            return ""
        return (
            f" The learning rate is negative (lr={min(rates):.3g} now): every step climbs the loss. The schedule "
            "ran past its end — size it to the run (total steps = epochs × steps per epoch) and keep its factor ≥ 0."
        )

    def _runaway_update(self) -> str:
        """An abort's first words where an update before the first bad step moved a layer by its own
        norm or more (the records still pending; update ratios are measured every ``weight_every``
        steps): the learning rate is the cause, and the op then located is only where the values
        overflowed (a log of a softmax saturated at 0 after a step at lr 20)."""
        located = self._first_located
        first = located.get("step") if located is not None else None
        moved = [
            (ratio, name, rec["step"])
            for rec in self.monitor.peek()
            if not isinstance(first, int) or rec["step"] < first
            for name, stats in (rec.get("layers") or {}).items()
            if isinstance(ratio := stats.get("update_ratio"), float) and math.isfinite(ratio)
        ]
        if not moved or max(moved)[0] < RUNAWAY_UPDATE:
            return ""
        ratio, name, at = max(moved)
        return (
            f" The update of step {at} moved layer {name!r} by {ratio:.3g}× its own norm (~1e-3 is typical): the "
            "learning rate is far too high — lower it 10× or more first; the op below is where the values "
            "it made overflowed."
        )

    def _aborted(self, step: int, msg: str, reason: str, weights_bad: bool, **fields: Any) -> NonFiniteError:
        """Write the ``abort`` event (its ``reason`` and ``message``) and mark the run aborted."""
        consecutive = self.counters.consecutive
        self._event(events.abort(step, consecutive, weights_bad, reason=reason, message=msg, **fields))
        if self.writer is not None:
            self.writer.update_meta(aborted=True, abort_step=step, abort_reason=reason)
        return NonFiniteError(msg)

    def _check_open(self) -> None:
        if self._closed:
            raise GradGuardError(
                "this Guard is closed; create a new Guard (log_dir=..., exist_ok=True) to go on."
            )

    # ------------------------------------------------------------------ flush
    def _on_flush(self, records: list[dict[str, Any]]) -> None:
        """The monitor's flush: the guard's own handling, then the flush callbacks (sinks)."""
        try:
            self._handle_flush(records)
        finally:
            for fn in list(self._flush_callbacks):
                fn(records)

    def _handle_flush(self, records: list[dict[str, Any]]) -> None:
        """Events of the steps the host had not seen yet (the sync-free path), from one host copy."""
        born = self._births.found(records)
        for event in born:
            self._note_located(event)
        derived = [*born, *self._flush_events(records)]
        found = [
            self._births.attribute(_from_the_start(e, self._bad_at_start))
            for e in _with_step_fields(derived, records, self._fields)
        ]
        if found and self.writer is not None:
            self.writer.write_events(found)
        if self._explosions.active and records and not self._closed:
            self._explosions_at_flush(records)
        # the host-decided path checks at once; here the host learns of skipped steps only now
        if (
            self.counters.consecutive >= self.config.max_consecutive
            and not self._closed
            and records
            and not records[-1].get(DECIDED)
        ):
            raise self._abort(records[-1]["step"])

    def _explosions_at_flush(self, records: list[dict[str, Any]]) -> None:
        """The sync-free path's explosion watch: the flushed steps' norms (a confirmed onset rewinds
        the state of now, after the last of them), else a due snapshot of a calm run."""
        exploded = self._explosions.see_records(records)
        if exploded is None:
            self._explosions.snapshot_at_flush(records)
        elif self._explode(exploded, records[-1]["step"]) and self._stop is not None:
            err, self._stop = self._stop, None
            raise err


_STATE = ("buffer", "state")  # a located birth's tensor that the forward read but did not make


def _fix_of(located: events.Event | None, at_start: frozenset[str] = frozenset()) -> str:
    """What an abort tells the user to fix: the first bad step's birth where it was located (an op
    at its numerical edge, a non-finite batch: the learning rate is not the cause), else the
    usual causes of a run that keeps going non-finite."""
    if located is None:
        return " Lower the learning rate or clip harder (`gradguard diagnose` recommends a threshold)."
    step, reason = located["step"], (located.get("evidence") or {}).get("reason")
    if located.get("phase") == "data":
        what = located.get("tensor") or "input"
        what += f" of rank {located['rank']}" if isinstance(located.get("rank"), int) else ""
        return (
            f" The first non-finite value (step {step}) was already in the {what}: check the data "
            "(torch.isfinite(x).all() on each batch); the training itself is not the cause."
        )
    buffer = (located.get("evidence") or {}).get("buffer")
    if located.get("tensor") == "buffer" and buffer in at_start:  # non-finite before the first step
        return (
            f" The first non-finite value (step {step}) was in the buffer {buffer!r}, non-finite before the first "
            "step: build it finite where it is made (a mask as torch.full((n, n), float('-inf')).triu(1); "
            "torch.triu(ones) * float('-inf') holds 0 * -inf = NaN) or load clean values (BatchNorm statistics: "
            "reset_running_stats() and a few forwards in train mode); the training is not the cause."
        )
    if located.get("tensor") in _STATE:  # a buffer (a checkpoint's BatchNorm stats) or state the forward read
        return (
            f" The first non-finite value (step {step}) was already in the model's state: {reason}. Reset it (clean "
            "buffers from a checkpoint, or BatchNorm's running statistics re-estimated); the training is not the cause."
        )
    if located.get("phase") == "script":  # a weight the script wrote between steps
        return (
            f" The first non-finite value (step {step}) was in the weight {(located.get('evidence') or {}).get('parameter')}"
            f": {reason}. Check where the script writes it (torch.isfinite(p).all() after each write)."
        )
    if located.get("phase") == "optimizer":  # born inside optimizer.step(): its hyperparameters, not the rate
        details = located.get("evidence") or {}
        name = located.get("optimizer") or details.get("optimizer")
        fix = optable.optimizer_fix(name, details.get("hyperparameters") or {})
        return (
            f" The first non-finite value (step {step}) was born inside {name or 'the optimizer'}.step() from "
            f"finite gradients. Fix: {fix}."
        )
    why, fix = optable.advice(located.get("op"), reason, located.get("cause"), located.get("evidence"))
    at = f" at {located['source']}" if located.get("source") else ""
    return f" The first non-finite value (step {step}) came from {events.op_called(located)}{at}: {why}. Fix: {fix}."


def _warn_at_user(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning that points at the user's line (a ``Guard(...)`` in the script,
    or the script's first optimizer step under ``gradguard run``), not at gradguard's."""
    from gradguard.locate import users

    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and not users(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


RUNAWAY_UPDATE = 1.0  # an update this many times the layer's own norm: the rate, whatever op then fails


def _from_the_start(event: events.Event, bad_at_start: frozenset[str]) -> events.Event:
    """A ``nonfinite`` event that found a parameter non-finite which already was when the guard started:
    its birth is the initialisation (phase ``init``), not an optimizer step."""
    if not bad_at_start or event.get("type") != "nonfinite" or event.get("phase") != "optimizer":
        return event
    details = dict(event.get("evidence") or {})
    names = [details.get("parameter"), *(event.get("parameters") or details.get("parameters") or [])]
    module = event.get("module")  # (an event from the records' weight norms names the layer only)
    names += [n for n in sorted(bad_at_start) if module is not None and n.rpartition(".")[0] == module]
    name = next((n for n in names if n in bad_at_start), None)
    if name is None:
        return event
    details.setdefault("parameter", name)
    details["reason"] = (
        f"{name} already held {event.get('kind') or 'a non-finite value'} before the first step: its "
        "initialisation or the weights loaded into it (no optimizer step wrote it)"
    )
    return {**event, "phase": "init", "evidence": details}


def _reducer(
    params: Sequence[Tensor],
    config: GuardConfig,
    clipper: Clipper | None,
    process_group: Any,
    model: nn.Module,
) -> Reducer | None:
    """Under torch.distributed: the one all-reduce a step that makes every rank see the same numbers
    (paused while ``model``, a DDP module, runs under its ``join()`` context)."""
    if world(process_group) <= 1:
        return None
    reducer = Reducer(check_distributed(params, config, clipper), config.norm_type, process_group)
    reducer.watch_join(model)
    return reducer


def _with_step_fields(found: list[Any], records: list[dict[str, Any]], names: Iterable[str]) -> list[Any]:
    """Events derived at a flush, with the host fields ``names`` (``before_step(fields=...)``, e.g.
    ``global_step``) that the record of their step has."""
    names = tuple(names)
    if not names or not found:
        return found
    extra = {rec["step"]: {k: rec[k] for k in names if k in rec} for rec in records}
    return [{**e, **extra.get(e.get("step"), {})} for e in found]


def _group_lr(optimizer: torch.optim.Optimizer, joined: Sequence[tuple[str, Tensor]]) -> float | None:
    """The highest learning rate of the param groups holding the ``joined`` parameters (host floats)."""
    ids = {id(p) for _, p in joined}
    rates = [
        float(g["lr"])
        for g in optimizer.param_groups
        if isinstance(g.get("lr"), (int, float)) and any(id(p) in ids for p in g["params"])
    ]
    return max(rates, default=None)


def _caller_steps(outcome: Outcome) -> bool:
    """``before_step``'s answer: whether the caller steps. Its strategies decide on the host
    (``HostDecided``) or never skip (``Observe``: monitor only, ``"warn"``): no device value is read."""
    return not outcome.skipped if outcome.on_host else True


class _PartError(Exception):
    """A part of a saved Guard state whose values could not be loaded (``part``: its key)."""

    def __init__(self, part: str, error: BaseException) -> None:
        super().__init__(part)
        self.part, self.error = part, error


#: Each optimizer's newest guard: a second open guard on it steps it twice per backward.
_OPTIMIZER_GUARDS: weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.ref[Guard]] = (
    weakref.WeakKeyDictionary()
)


def _weakly_keyable(obj: Any) -> bool:
    """Whether ``obj`` can key a ``WeakKeyDictionary`` (hashable and weakly referenced)."""
    try:
        weakref.ref(obj)
        hash(obj)
    except TypeError:
        return False
    return True


def open_guard_of(optimizer: torch.optim.Optimizer) -> Guard | None:
    """The open :class:`Guard` made last on ``optimizer`` (``None``: none, or it was closed)."""
    if not _weakly_keyable(optimizer):
        return None
    ref = _OPTIMIZER_GUARDS.get(optimizer)
    owner = ref() if ref is not None else None
    return owner if owner is not None and not owner.closed else None


def _warn_if_guarded(guard: Guard, optimizer: torch.optim.Optimizer) -> None:
    """Say when ``optimizer`` already has an open guard (a notebook cell run again, a second Guard made
    by mistake): calling both ``step``s steps it twice per backward. The new guard is then its guard."""
    if not _weakly_keyable(optimizer):
        return
    if open_guard_of(optimizer) is not None:
        _warn_at_user(
            f"gradguard: this {type(optimizer).__name__} already has an open Guard: stepping both guards steps "
            "the optimizer twice per backward. Close the first (guard.close()) before making a new one, or keep "
            "one Guard per optimizer."
        )
    _OPTIMIZER_GUARDS[optimizer] = weakref.ref(guard)


def _warn_duplicates(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Say when a parameter is in the optimizer more than once (appended to a second group by hand):
    torch steps it once per appearance, the guard measures it once."""
    seen: dict[int, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    twice = {i for i, n in seen.items() if n > 1}
    if not twice:
        return
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in twice] or ["(unnamed)"]
    _warn_at_user(
        f"gradguard: {len(twice)} parameter(s) appear more than once in the optimizer's param_groups "
        f"({', '.join(sorted(set(names))[:5])}): optimizer.step() updates each once per appearance, so they move "
        "two or more times a step. Put each parameter in one group only."
    )


#: Each clipper instance's guard: one clipper's state (a norm history, a running mean) is one run's.
_CLIPPER_OWNERS: weakref.WeakKeyDictionary[Clipper, weakref.ref[Guard]] = weakref.WeakKeyDictionary()


def _claim_clipper(clipper: Clipper | None, guard: Guard, optimizer: torch.optim.Optimizer) -> None:
    """Refuse one clipper instance in two open guards of different optimizers: an AutoClip's
    percentile or a ZClip's mean would mix the norms of both (each step of one moving the other's
    threshold). A closed guard's clipper, or the same optimizer's (a guard made again), is taken over."""
    if clipper is None or not set(clipper.state_dict()) - {"version", "kind"}:
        return  # (a stateless clipper, a fixed threshold, is as good shared)
    if not _weakly_keyable(clipper):
        return  # (a user's clipper that defines __eq__ without __hash__: not tracked)
    ref = _CLIPPER_OWNERS.get(clipper)
    owner = ref() if ref is not None else None
    if owner is not None and not owner.closed and owner.optimizer is not optimizer:
        raise GradGuardError(
            f"this {type(clipper).__name__} clipper is already used by another open Guard (its optimizer: "
            f"{type(owner.optimizer).__name__}): one clipper keeps one run's norms, and two guards would mix "
            f"theirs. Give each Guard its own: a new {type(clipper).__name__}(...) each (or a spec such as "
            f"clip={getattr(clipper, 'kind', 'norm')!r}), or close() the other guard first."
        )
    _CLIPPER_OWNERS[clipper] = weakref.ref(guard)


#: The keys of :meth:`Guard.state_dict` (``anomaly`` and ``explosion`` absent from older states).
_STATE_KEYS = frozenset(
    {
        "version",
        "step_count",
        "skipped_steps",
        "consecutive",
        "clipper",
        "spike",
        "recovery",
        "anomaly",
        "explosion",
    }
)


def _check_state_keys(state: dict[str, Any]) -> None:
    """Refuse a state with keys :meth:`Guard.state_dict` never writes (like ``strict=True`` in
    ``nn.Module.load_state_dict``): a whole checkpoint passed for the guard's part, or an edited one."""
    extra = sorted(str(k) for k in state if k not in _STATE_KEYS)
    if extra:
        raise GradGuardError(
            f"Guard state has keys Guard.state_dict() never writes: {', '.join(map(repr, extra[:8]))}. Pass "
            "the guard's own part of your checkpoint (e.g. checkpoint['guard'], saved from "
            "guard.state_dict()), not the whole checkpoint or an edited copy."
        )


def _check_scaler(scaler: Any) -> None:
    """Refuse a ``scaler`` that is not a GradScaler (``scaler=True``, the scale factor, the optimizer)."""
    if scaler is None or all(
        callable(getattr(scaler, a, None)) for a in ("is_enabled", "unscale_", "update")
    ):
        return
    raise GradGuardError(
        f"scaler must be the torch.amp.GradScaler that scaled the loss, got {type(scaler).__name__}: "
        f"{safe_text(repr(scaler))[:80]}; pass guard.step(loss, scaler=scaler) with scaler = "
        "torch.amp.GradScaler(), or no scaler."
    )


def _unscale_once(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless the user already called it since the last ``update()``."""
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]  # GradScaler's own bookkeeping
    if state["stage"] is not OptState.READY:
        return
    if getattr(scaler, "_scale", True) is None:  # (torch: "Attempted unscale_ but _scale is None")
        raise GradGuardError(
            "the GradScaler passed to guard.step(..., scaler=scaler) has not scaled any loss yet: call "
            "scaler.scale(loss).backward() instead of loss.backward() (the scaler then knows its scale), or "
            "leave scaler= out if this loop does not use one."
        )
    scaler.unscale_(optimizer)


class _Handle:
    """``remove()`` takes a callback out of its list."""

    def __init__(self, callbacks: list[Any], fn: Any) -> None:
        self._callbacks, self._fn = callbacks, fn

    def remove(self) -> None:
        if self._fn in self._callbacks:
            self._callbacks.remove(self._fn)
