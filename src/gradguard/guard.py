"""The per-step orchestrator: measure → clip → decide → step, skip or roll back → log.

Example:
    >>> import torch, gradguard
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> guard = gradguard.Guard(model, opt, clip="norm:1.0", on_nonfinite="skip")
    >>> loss = model(torch.randn(8, 4)).pow(2).mean()
    >>> loss.backward()
    >>> _ = guard.step(loss)      # replaces opt.step()
    >>> guard.close()

Host syncs. A step never waits for the device when nothing on it needs the host:

* with a fused optimizer (``fused=True`` Adam/AdamW/SGD/Adagrad) and ``on_nonfinite="skip"``,
  the clip coefficient and the skip flag go into the optimizer through the ``grad_scale`` /
  ``found_inf`` protocol of :class:`torch.amp.GradScaler`, so the kernel itself skips the step;
* with ``on_nonfinite="warn"`` (and ``on_spike`` not ``"skip"``) nothing is ever skipped.

Otherwise the step makes **one** host read, in :meth:`Guard._decide`, to choose between stepping
and skipping (the cost :class:`torch.amp.GradScaler` pays on every unfused step). On the
sync-free path the host learns about bad steps at the next flush (every ``every`` steps): their
events are written then, and ``max_consecutive`` is checked then.

Known torch trap, handled: fused SGD with momentum that skips its *first* step (via
``found_inf``) leaves its momentum buffers uninitialised (``torch.empty_like``), and the next
step reads garbage. The guard decides such a first step on the host instead (one sync, once).
A fused Adam/AdamW/Adagrad that skips its first step creates its state (zeros, ``step`` 0); the
next step gives exactly the result of a fresh optimizer.
"""

from __future__ import annotations

import collections
import copy
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from gradguard import runlog
from gradguard._distributed import Reducer, local, rank, same_on_all_ranks, sharded, world
from gradguard.clip import AGC, Clipper, NormClipper, PerLayer, ZClip, coefficient, from_spec, scale_
from gradguard.errors import GradGuardError, NonFiniteError
from gradguard.locate import Locator, LossWatch, StepCapture, explosion, rng_state
from gradguard.monitor import SCALARS, Monitor
from gradguard.stats import LayerIndex, check_tensors, exact_norms, tensor_norms, total_norm, update_ratios

__all__ = ["Guard", "OnNonFinite", "OnSpike"]

OnNonFinite = Literal["skip", "rollback", "raise", "warn"]
OnSpike = Literal["ignore", "warn", "clip", "skip"]
_STATE_VERSION = 1
_FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
_COL = {name: i for i, name in enumerate(SCALARS)}
_MAX_LAYERS_IN_EVENT = 20
_SCALE_HISTORY = 20  # loss scales kept as evidence for a loss_scale_collapse event
_HISTORY = 512  # host copies of the last steps' norms, for telling an explosion from a single bad op


def _check_choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise GradGuardError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
    return str(value)


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GradGuardError(f"{name} must be a positive int; got {value!r}.")
    return value


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """All groups fused, and the optimizer honours ``grad_scale``/``found_inf`` (GradScaler protocol)."""
    return (
        isinstance(optimizer, _FUSED_OPTIMIZERS)
        and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        and all(g.get("fused") for g in optimizer.param_groups)
    )


def _unscale_once(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless the user already called it since the last ``update()``."""
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]  # GradScaler's own bookkeeping
    if state["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


class Guard:
    """Measure, clip and guard every optimizer step of a model.

    Call :meth:`step` where you called ``optimizer.step()``.

    Memory: the always-on part keeps an on-device buffer of ``every × (10 + layers)`` floats and
    never copies a gradient. On the steps where weight norms are measured (``weight_every``) it
    holds a temporary copy of the weights. With ``on_nonfinite="rollback"`` a snapshot costs one
    copy of the model and optimizer state, in **host memory** (plus a file with ``snapshot_dir``).

    Args:
        model: the root module (its ``named_parameters()`` name the layers in the log). Only the
            parameters that the optimizer holds and that require grad are measured.
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
        log_dir: the run directory (``None``: no files; ``"auto"``: ``gradguard-runs/<time>-<name>``).
        name: the run's name in the default run directory.
        every: flush interval in steps (the only host copy of the metrics).
        layer_every: record per-layer gradient norms every this many steps (1: every step).
        weight_every: measure weight norms and update/weight ratios every this many steps
            (a temporary copy of the weights on those steps only); ``None`` never.
        snapshot_every: ``rollback`` snapshot cadence in steps (a snapshot is taken after a good
            step at least this many steps after the last one).
        snapshot_dir: also write the snapshot to ``snapshot_dir/snapshot.pt`` (atomically).
        lr_backoff: multiply every group's learning rate by this after a rollback (``None``: keep).
            An LR scheduler that sets the LR from its base values overrides it.
        max_consecutive: abort (``NonFiniteError``, log flushed) after this many skipped steps in
            a row (on the sync-free path: checked at the next flush).
        norm_type: p of the gradient norms.
        exist_ok: append to an existing run directory instead of refusing it.
        locate: on a non-finite step, find where the first non-finite value was born (phase,
            module, op, source line): the step is replayed under full instrumentation (exactly
            with ``guard.step(closure)``; otherwise the model's forward is replayed from its
            captured inputs), or, for an explosion, the first spiking step and layer are named.
            Healthy steps only keep references to the model's inputs and the RNG state.
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
    """

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
        layer_every: int = 1,
        weight_every: int | None = 50,
        snapshot_every: int = 100,
        snapshot_dir: str | os.PathLike[str] | None = None,
        lr_backoff: float | None = None,
        max_consecutive: int = 10,
        norm_type: float = 2.0,
        exist_ok: bool = False,
        process_group: Any = None,
        loss_scale_floor: float = 1.0,
        rank_logs: bool = False,
        locate: bool = True,
        max_replays: int = 3,
        capture: StepCapture | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise GradGuardError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise GradGuardError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        self.model = model
        self.optimizer = optimizer
        self.on_nonfinite = _check_choice(on_nonfinite, "on_nonfinite", get_args(OnNonFinite))
        self.on_spike = _check_choice(on_spike, "on_spike", get_args(OnSpike))
        self.clipper = from_spec(clip)  # type: ignore[arg-type]  # a number means norm clipping
        self.norm_type = float(norm_type)
        self.every = _positive_int(every, "every")
        self.layer_every = _positive_int(layer_every, "layer_every")
        self.weight_every = None if weight_every is None else _positive_int(weight_every, "weight_every")
        self.snapshot_every = _positive_int(snapshot_every, "snapshot_every")
        self.max_consecutive = _positive_int(max_consecutive, "max_consecutive")
        if lr_backoff is not None and not 0.0 < float(lr_backoff) <= 1.0:
            raise GradGuardError(
                f"lr_backoff must be in (0, 1] or None; got {lr_backoff!r}. 0.5 halves the LR."
            )
        self.lr_backoff = None if lr_backoff is None else float(lr_backoff)
        self.loss_scale_floor = float(loss_scale_floor)
        # spikes that act on the step (clip, skip) are found on device; "warn" only logs them, so its
        # z-score runs on the host at flush, over the norms the flush copies anyway (no per-step ops)
        self._spike: ZClip | _HostSpike | None = None
        if self.on_spike in ("clip", "skip"):
            self._spike = ZClip(z_thresh=float(spike_z))
        elif self.on_spike == "warn":
            self._spike = _HostSpike(float(spike_z))

        own = {id(p) for p in model.parameters()}
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
        if foreign:
            shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3])
            raise GradGuardError(
                f"the optimizer holds {len(foreign)} parameter(s) that are not the model's (shapes {shapes}). "
                "Pass the model the optimizer trains (build it as `optimizer = Opt(model.parameters())`), "
                "or the root module that owns all of them."
            )
        # DDP's wrapper adds "module." to every name: name the layers after the user's model
        root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        named = [(n, p) for n, p in root.named_parameters() if p.requires_grad and id(p) in held]
        if not named:
            raise GradGuardError(
                f"{type(model).__name__} has no trainable parameter that the optimizer holds (all have "
                "requires_grad=False, or the optimizer trains none of them); there is nothing to guard. "
                "Unfreeze some parameters or guard the module that trains."
            )
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        check_tensors(self._params, what="parameter")
        self._index = LayerIndex(self._names)
        self._reducer: Reducer | None = None
        if world(process_group) > 1:
            mask = sharded(self._params)
            if any(mask) and self.on_nonfinite == "rollback":
                raise GradGuardError(
                    "on_nonfinite='rollback' is not supported for FSDP2 (sharded DTensor parameters) yet; "
                    "use 'skip' (every rank skips the same step) or checkpoint with torch.distributed.checkpoint."
                )
            if any(mask) and isinstance(self.clipper, PerLayer):
                raise GradGuardError(
                    "clip='layer:…' needs full-layer norms on every rank, which FSDP2 shards; use 'norm:…' or 'auto'."
                )
            self._reducer = Reducer(mask, self.norm_type, process_group)
        self.fused = _is_fused(optimizer)
        self._momentum_sgd = isinstance(optimizer, torch.optim.SGD) and any(
            g.get("momentum", 0) for g in optimizer.param_groups
        )
        self.step_count = 0  # guard.step() calls
        self.skipped_steps = 0
        self._consecutive = 0
        self._last_skipped: Tensor | bool = False
        self._last_reported = -1  # the last step whose non-finite event was written
        self._weights_reported = False
        self._stop: NonFiniteError | None = None
        self._consts: dict[tuple[str, torch.device], Tensor] = {}
        self._history: collections.deque[tuple[int, float, dict[str, float]]] = collections.deque(
            maxlen=_HISTORY
        )
        self.max_replays = _positive_int(max_replays, "max_replays")
        self._replays = 0
        self._closure: Callable[[], Any] | None = None
        self._external = False
        self._armed: tuple[Locator, dict[str, Any], int] | None = None
        self._closure_rng: dict[str, Any] | None = None
        self._root = root
        self._capture: StepCapture | None = (capture or StepCapture(root)) if locate else None
        self._last_watch: LossWatch | None = None
        self._overflow_run = 0  # AMP overflows in a row (seen at flush)
        self._scale_history: list[tuple[int, float]] = []
        self._collapsed = False
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_step = -snapshot_every  # the first good step takes a snapshot
        self._snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self._closed = False
        self._flush_callbacks: list[Callable[[list[dict[str, Any]]], None]] = []
        self._last_norm: Tensor | None = None

        self.writer: runlog.RunWriter | None = None
        if log_dir is not None:
            run_dir = runlog.default_run_dir(name) if str(log_dir) == "auto" else Path(log_dir)
            if self._reducer is not None:
                run_dir = Path(str(same_on_all_ranks(str(run_dir))))  # "auto" names it once, on rank 0
            if rank() == 0:  # the job's run log
                self.writer = runlog.RunWriter(run_dir, self._meta(), exist_ok=exist_ok)
            elif rank_logs:  # what this rank saw, beside it
                meta = {**self._meta(), "rank": rank()}
                self.writer = runlog.RunWriter(run_dir / "ranks" / f"rank{rank()}", meta, exist_ok=exist_ok)
        self.monitor = Monitor(
            self._index.layers,
            every=self.every,
            writer=self.writer,
            on_flush=self._on_flush,
            prepare=self._prepare_records,
        )

    # ------------------------------------------------------------------ public
    @property
    def run_dir(self) -> Path | None:
        """The run directory, or ``None`` when not logging."""
        return self.writer.path if self.writer is not None else None

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last :meth:`step` was skipped.

        On the sync-free path the answer is still on the device: reading this property waits
        for it (one host sync). Unlike Accelerate's ``step_was_skipped``, it is right for fused
        optimizers too.
        """
        return bool(self._last_skipped)  # host sync: only when the user asks

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
                ``scaler.update()`` (which lowers the scale after an overflow).

        Returns:
            The loss (what the closure returned, or what was passed).
        """
        if self._closed:
            raise GradGuardError(
                "this Guard is closed; create a new Guard (log_dir=..., exist_ok=True) to go on."
            )
        self._closure = None
        if callable(loss_or_closure) and not isinstance(loss_or_closure, Tensor):
            self._closure, self._closure_rng = loss_or_closure, rng_state()
            with torch.enable_grad():
                loss = loss_or_closure()
        else:
            loss = loss_or_closure
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        if scaler is not None:
            _unscale_once(scaler, self.optimizer)
        try:
            self._step(loss, scaler)
        finally:
            self._closure = None
            if self._capture is not None:
                self._capture.release()  # hold the batch no longer than its step
        return loss

    def before_step(self, loss: Tensor | float | None = None) -> bool:
        """Measure, clip and decide, for callers that call ``optimizer.step()`` themselves.

        The zero-code runner and framework callbacks use it where they cannot replace
        ``optimizer.step()``. It always decides on the host (one sync).

        Returns:
            ``True`` when the optimizer should step. On ``False`` every guarded gradient is set to
            ``None``, so a following ``optimizer.step()`` leaves parameters and optimizer state
            untouched (the step is skipped).
        """
        if self._closed:
            raise GradGuardError("this Guard is closed; create a new Guard to go on.")
        self._external = True
        try:
            self._step(loss, None)
        finally:
            self._external = False
            if self._capture is not None:
                self._capture.release()
        return not bool(self._last_skipped)

    def add_flush_callback(self, fn: Callable[[list[dict[str, Any]]], None]) -> Any:
        """Call ``fn(records)`` at every flush, after the guard's own handling (even if that raises).

        The records are the host copies the flush makes anyway (one per ``every`` steps): a sink
        (TensorBoard, W&B, a framework logger) adds no host sync. Returns a handle with ``remove()``.
        """
        if not callable(fn):
            raise GradGuardError(f"a flush callback must be callable with the records, got {fn!r}.")
        self._flush_callbacks.append(fn)
        return _Handle(self._flush_callbacks, fn)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The last step's pre-clip global gradient norm, a device tensor (reading it on the host syncs)."""
        return self._last_norm

    def flush(self) -> None:
        """Write the pending records and events now (one host copy)."""
        self.monitor.flush()

    def close(self) -> None:
        """Flush and close the run log. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._capture is not None:
            self._capture.remove()
        self._finish_armed(None)
        self.flush()
        if self.writer is not None:
            self.writer.update_meta(
                end_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                steps=self.step_count,
                skipped_steps=self.skipped_steps,
            )
            self.writer.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Counters and the clipper's / spike detector's state (tensors and Python scalars only).

        Pending records are flushed first, so the counters include every step taken.
        """
        self.flush()
        return {
            "version": _STATE_VERSION,
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
            "consecutive": self._consecutive,
            "clipper": self.clipper.state_dict() if self.clipper is not None else None,
            "spike": self._spike.state_dict() if self._spike is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next steps equal those of a guard that never stopped."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise GradGuardError(
                f"Guard state has version {got!r}; this gradguard reads {_STATE_VERSION}. "
                "Pass what Guard.state_dict() returned."
            )
        self.step_count = int(state["step_count"])
        self.skipped_steps = int(state["skipped_steps"])
        self._consecutive = int(state["consecutive"])
        if self.clipper is not None and state["clipper"] is not None:
            self.clipper.load_state_dict(state["clipper"])
        if self._spike is not None and state["spike"] is not None:
            self._spike.load_state_dict(state["spike"])

    # ------------------------------------------------------------------ the step
    def _false(self, device: torch.device) -> Tensor:
        """A cached 0-D ``False`` on ``device`` (no allocation per step)."""
        t = self._consts.get(("false", device))
        if t is None:
            t = self._consts[("false", device)] = torch.zeros((), dtype=torch.bool, device=device)
        return t

    def _nan(self, device: torch.device) -> Tensor:
        """A cached 1-element NaN (the loss-scale column when there is no scaler)."""
        t = self._consts.get(("nan", device))
        if t is None:
            t = self._consts[("nan", device)] = torch.full((1,), math.nan, device=device)
        return t

    def _no_clip(self, device: torch.device) -> Tensor:
        """The logged ``[clip_coef, threshold]`` of a step with no norm clipping: ``[nan, inf]``."""
        t = self._consts.get(("no_clip", device))
        if t is None:
            t = self._consts[("no_clip", device)] = torch.tensor([math.nan, math.inf], device=device)
        return t

    def _sync_free(self, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Can this step be decided without a host read?"""
        if self._external:
            return False  # the caller steps: a skip must be decided (grads set to None) before that
        if self.on_nonfinite in ("rollback", "raise"):
            return False  # a bad step needs the host at once
        if self.on_nonfinite == "warn" and self.on_spike != "skip" and scaler is None:
            return True  # nothing is ever skipped (under a scaler, overflows are)
        if not self.fused:
            return False
        # fused SGD skipping its first step leaves empty_like momentum buffers: decide that one on the host
        return not (
            self._momentum_sgd and any("momentum_buffer" not in self.optimizer.state[p] for p in self._params)
        )

    def _step(self, loss: Tensor | float | None, scaler: torch.amp.GradScaler | None) -> None:
        self._last_watch = self._capture.end_step() if self._capture is not None else None
        if loss is None and self._last_watch is not None and self._last_watch.loss is not None:
            loss = self._last_watch.loss  # zero-code: the tensor the script called backward() on
        self._finish_armed(loss)
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        grads: list[Tensor] = [self._params[i].grad for i in present]  # type: ignore[misc]
        check_tensors(grads, what="gradient")
        device = grads[0].device if grads else self._params[0].device
        p = self.norm_type

        if self._reducer is not None:
            grads = [local(g) for g in grads]  # FSDP2: this rank's shards
        norms = tensor_norms(grads, p)  # the one read of the gradients
        if isinstance(loss, Tensor):
            loss_val = loss.detach()
            loss_val = loss_val.reshape(()) if loss_val.numel() == 1 else loss_val.sum()
            loss_val = loss_val.to(device=device, dtype=torch.float32)  # a no-op for a float32 loss
        else:  # a float, or no loss (then only the gradients are checked; the log says null)
            loss_val = torch.full((), 0.0 if loss is None else float(loss), device=device)
        rank_flags = None
        if self._reducer is not None:  # the same numbers on every rank: one all-reduce
            if len(present) != len(self._params):  # same vector on every rank: a missing grad has norm 0
                norms = torch.zeros(len(self._params), dtype=norms.dtype, device=device).index_copy(
                    0, torch.tensor(present, device=device), norms
                )
                present = list(range(len(self._params)))
            norms, loss_val, rank_flags = self._reducer.reduce(norms, loss_val, present)
        total = total_norm(norms, p).to(device)
        # flags with few small ops (each costs ~5 µs of dispatch on a CPU): x - x is NaN iff x is not finite
        values = torch.stack([loss_val, total.float()])
        nonfinite = torch.isnan(values - values)  # [loss, gradients]
        grad_nan = torch.isnan(total)
        if rank_flags is not None:  # a value on one rank only (its loss, or its copy of a gradient)
            nonfinite = nonfinite | rank_flags[:2]
            grad_nan = grad_nan | rank_flags[2]
        bad = nonfinite.any()
        observed = torch.where(bad, math.nan, total)  # adaptive state only sees the norms of good steps

        self._last_norm = total
        threshold: Tensor | None = None
        spike = self._false(device)
        if isinstance(self._spike, ZClip):
            spike_tau = self._spike.threshold(observed)
            spike = spike_tau < math.inf
            if self.on_spike == "clip":
                threshold = spike_tau
        if isinstance(self.clipper, NormClipper):
            tau = self.clipper.threshold(observed).to(device)
            threshold = tau if threshold is None else torch.minimum(threshold, tau)
        coef = coefficient(total, threshold) if threshold is not None else None
        # under a GradScaler, non-finite gradients with a finite loss are an fp16 overflow: the
        # scaler's normal business (skipped whatever the policy; the scaler lowers its scale)
        overflow = nonfinite[1] & ~nonfinite[0] if scaler is not None else self._false(device)
        skip = bad if self.on_nonfinite != "warn" else overflow
        if self.on_spike == "skip":
            skip = skip | spike

        clip_stats = (
            torch.stack([coef, threshold]).float() if coef is not None and threshold is not None else None
        )
        flags = torch.stack([bad, nonfinite[0], nonfinite[1], grad_nan, skip, spike, overflow]).float()
        clip_part = self._no_clip(device) if clip_stats is None else clip_stats
        scalars = torch.cat([values, clip_part, flags, self._nan(device)])
        step = self.step_count
        layer_grads = self._index.reduce(norms, p, present) if step % self.layer_every == 0 else None
        measure_weights = self.weight_every is not None and step % self.weight_every == 0
        before = [w.detach().clone() for w in self._params] if measure_weights else None

        sync_free = self._sync_free(scaler)
        if sync_free:
            self._step_sync_free(grads, coef, skip, scaler)
            self._last_skipped = skip
        else:
            took = self._step_with_sync(grads, norms, present, coef, skip, scaler, scalars)
            self._last_skipped = not took
        if scaler is not None:  # the scale after update(), for the loss-scale collapse check at flush
            scale = scaler._get_scale_async()
            if scale is not None:
                scalars[_COL["loss_scale"]] = scale

        extras: dict[str, Tensor] = {}
        if before is not None:
            with torch.no_grad():
                before = [local(w) for w in before]
                after = [local(w.detach()) for w in self._params]
                w_t, u_t = tensor_norms(before, p), tensor_norms(torch._foreach_sub(after, before), p)
                if self._reducer is not None:
                    w_t, u_t = self._reducer.full_norms(w_t), self._reducer.full_norms(u_t)
                w_norms, u_norms = self._index.reduce(w_t, p), self._index.reduce(u_t, p)
            extras["weight_norm"] = w_norms
            extras["update_ratio"] = update_ratios(u_norms, w_norms)
            del before
        lr = self.optimizer.param_groups[0].get("lr")
        host: dict[str, Any] = {"lr": float(lr) if isinstance(lr, (int, float)) else None}
        if loss is None:
            host["loss"] = None
        if not sync_free:
            host["skipped"] = not took
            host["_decided"] = True  # the host already handled this step (events, counters)
        self.monitor.record(step, scalars, layer_grads, host, extras)
        self.step_count += 1
        if self._stop is not None:  # raise / abort, with this step's record in the log
            err, self._stop = self._stop, None
            self.flush()
            raise err

    def _run_clipper(self) -> None:
        """Value / AGC / per-layer clippers act on the gradients themselves (norm clipping is a coefficient)."""
        if self.clipper is None or isinstance(self.clipper, NormClipper):
            return
        if isinstance(self.clipper, (AGC, PerLayer)):
            self.clipper(list(zip(self._names, self._params)))
        else:
            self.clipper(self._params)

    def _step_sync_free(
        self, grads: list[Tensor], coef: Tensor | None, skip: Tensor, scaler: torch.amp.GradScaler | None
    ) -> None:
        """No host read: fold clip and skip into the fused kernel, or clip and always step (warn)."""
        self._run_clipper()
        if self.fused:
            # the GradScaler protocol: the kernel divides the gradients by grad_scale, skips on found_inf
            if coef is not None:
                self.optimizer.grad_scale = coef.reciprocal().to(torch.float32)  # type: ignore[attr-defined]
            self.optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                self.optimizer.__dict__.pop("grad_scale", None)
                del self.optimizer.found_inf  # type: ignore[attr-defined]
        else:
            if grads and coef is not None:
                scale_(grads, coef)
            self.optimizer.step()
        if scaler is not None:
            scaler.update()

    def _decide(self, skip: Tensor) -> bool:
        """The step's one host read: is this step skipped?"""
        return bool(skip)  # host sync: the one read per step on the non-fused path

    def _step_with_sync(
        self,
        grads: list[Tensor],
        norms: Tensor,
        present: list[int],
        coef: Tensor | None,
        skip: Tensor,
        scaler: torch.amp.GradScaler | None,
        scalars: Tensor,
    ) -> bool:
        skipped = self._decide(skip)
        # anomaly path from here on: extra host reads are fine
        if (
            skipped
            and self._reducer is None  # a host decision from local values could differ between ranks
            and bool(scalars[_COL["nonfinite"]])
            and self._overflow_only(grads, norms, scalars)
        ):
            skipped, coef = False, scalars[_COL["clip_coef"]]
        if not skipped:
            self._consecutive = 0
            self._run_clipper()
            if grads and coef is not None:
                scale_(grads, coef)
            if not self._external:
                self.optimizer.step()
            if scaler is not None:
                scaler.update()
            if (
                self.on_nonfinite == "rollback"
                and self.step_count - self._snapshot_step >= self.snapshot_every
            ):
                self._take_snapshot()
            return True
        if scaler is not None:
            scaler.update()  # the scaler still learns about an overflow (and lowers its scale)
        if self._external:  # the caller's optimizer.step() then leaves parameters and state untouched
            for p in self._params:
                p.grad = None
        step = self.step_count
        self.skipped_steps += 1
        if bool(scalars[_COL["amp_overflow"]]):  # normal under AMP: logged, not an anomaly
            self._event(self._overflow_event(step, scaler))
            return False
        is_bad = bool(scalars[_COL["nonfinite"]])
        self._consecutive += 1
        if is_bad:
            vals = scalars.tolist()  # host sync: a skipped, non-finite step (the anomaly path)
            layer_norms = self._index.reduce(norms, self.norm_type, present).tolist()  # host sync: same
            located = self._locate(step, vals) if step > self._last_reported else None
            self._emit_nonfinite(step, vals, layer_norms, located)
        if self._consecutive >= self.max_consecutive:
            self._stop = self._abort(step)
            return False
        if is_bad and self.on_nonfinite == "raise":
            self._stop = NonFiniteError(self._nonfinite_message(step, scalars.tolist()))  # host sync: anomaly
            return False
        if is_bad and self.on_nonfinite == "rollback":
            self._rollback(step)
        else:
            reason = "nonfinite" if is_bad else "spike"
            self._event(
                {
                    "type": "skip",
                    "step": step,
                    "reason": reason,
                    "grad_norm": float(scalars[_COL["grad_norm"]]),
                }
            )
        return False

    def _overflow_only(self, grads: list[Tensor], norms: Tensor, scalars: Tensor) -> bool:
        """On a bad step: are all gradients finite, and only their float32 norm overflowed?

        If so, measure them exactly (scaled by the max-abs), put the exact norm and coefficient
        into ``scalars`` and let the step go on, clipped.
        """
        if bool(scalars[_COL["loss_nonfinite"]]) or bool(scalars[_COL["grad_nan"]]):
            return False
        suspects = [g for g, inf in zip(grads, torch.isinf(norms).tolist()) if inf]  # host sync: anomaly path
        if not suspects:
            return False
        exact = exact_norms(suspects, self.norm_type)
        if not bool(torch.isfinite(exact).all()):
            return False
        fixed = norms.to(torch.float64).clone()
        fixed[torch.isinf(norms)] = exact.to(fixed.device)
        total = total_norm(fixed, self.norm_type)
        threshold = scalars[_COL["threshold"]].to(torch.float64)
        scalars[_COL["grad_norm"]] = total.float()
        scalars[_COL["clip_coef"]] = coefficient(total, threshold).float()
        scalars[_COL["nonfinite"]] = scalars[_COL["grad_nonfinite"]] = scalars[_COL["skipped"]] = 0.0
        self._event(
            {
                "type": "overflow",
                "step": self.step_count,
                "grad_norm": float(total),
                "note": "finite gradients whose float32 norm overflows; measured exactly and clipped",
            }
        )
        return True

    # ------------------------------------------------------------------ helpers
    def _meta(self) -> dict[str, Any]:
        return {
            "torch_version": torch.__version__,
            "world_size": world(),
            "allreduce_floats_per_step": self._reducer.floats_per_step if self._reducer is not None else 0,
            "model": type(self.model).__name__,
            "parameters": {n: list(p.shape) for n, p in zip(self._names, self._params)},
            "layers": self._index.layers,
            "optimizer": type(self.optimizer).__name__,
            "fused": self.fused,
            "config": {
                "clip": repr(self.clipper),
                "on_nonfinite": self.on_nonfinite,
                "on_spike": self.on_spike,
                "every": self.every,
                "layer_every": self.layer_every,
                "weight_every": self.weight_every,
                "snapshot_every": self.snapshot_every,
                "lr_backoff": self.lr_backoff,
                "max_consecutive": self.max_consecutive,
                "norm_type": self.norm_type,
            },
        }

    def _event(self, event: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write_event(event)

    def _emit_nonfinite(
        self, step: int, vals: list[float], layer_norms: list[float], located: dict[str, Any] | None = None
    ) -> None:
        """Write the ``nonfinite`` event of a step (once): from the always-on flags (``located_by="norm"``),
        with what :meth:`_locate` found in ``located`` taking precedence."""
        if step <= self._last_reported:
            return
        self._last_reported = step
        bad_layers = [(n, v) for n, v in zip(self._index.layers, layer_norms) if not math.isfinite(v)]
        loss_bad = bool(vals[_COL["loss_nonfinite"]])
        loss = vals[_COL["loss"]]
        if loss_bad:
            kind = "nan" if math.isnan(loss) else ("inf" if loss > 0 else "-inf")
        else:
            kind = "nan" if vals[_COL["grad_nan"]] else "inf"
        self._event(
            {
                "type": "nonfinite",
                "step": step,
                "phase": "loss" if loss_bad else "backward",
                "module": None,
                "op": None,
                "tensor": "output" if loss_bad else "grad",
                "kind": kind,
                "source": None,
                "located_by": "norm",
                "layers": [n for n, _ in bad_layers[:_MAX_LAYERS_IN_EVENT]],
                "layers_nonfinite": len(bad_layers),
                "loss": loss,
                "grad_norm": vals[_COL["grad_norm"]],
                "policy": self.on_nonfinite,
                **(located or {}),
            }
        )

    # ------------------------------------------------------------------ locate
    def _arm(self, step: int) -> None:
        """Instrument the model's next forward call (and, through the autograd-node hooks it leaves,
        that forward's backward), in case the failure recurs.

        The instrumentation is a :class:`TorchFunctionMode`: it is entered in the root's forward
        pre-hook and left in its forward hook, around exactly one forward call, so it never
        outlives that call (an unclosed guard cannot leave it on the mode stack).
        """
        loc = Locator(self._root)
        state: dict[str, Any] = {}

        def enter(module: nn.Module, args: Any, kwargs: Any) -> None:
            if "ctx" in state or (self._capture is not None and self._capture.replaying):
                return
            state["ctx"] = loc.watch()
            state["ctx"].__enter__()
            loc._pre(module, args, kwargs)  # the watch's own pre-hook joins from the next call
            # registered after the watch's hooks, so it runs after them when this call ends
            state["handles"].append(self._root.register_forward_hook(leave, always_call=True))

        def leave(module: nn.Module, args: Any, out: Any) -> None:
            ctx = state.pop("ctx", None)
            if ctx is None:
                return
            ctx.__exit__(None, None, None)
            for h in state.pop("handles", ()):
                h.remove()
            outs = [t for t in _tensors(out) if t.is_floating_point()]
            state["out"] = outs[0] if outs else None

        state["handles"] = [self._root.register_forward_pre_hook(enter, with_kwargs=True)]
        self._armed = (loc, state, step)

    def _finish_armed(self, loss: Tensor | float | None) -> None:
        """End the armed window; if the failure recurred, write where it was born (``located_by="hooks"``)."""
        if self._armed is None:
            return
        loc, state, step = self._armed
        self._armed = None
        for h in state.pop("handles", ()):  # the model never ran: nothing was instrumented
            h.remove()
        target = loss if isinstance(loss, Tensor) else state.get("out")
        birth = loc.answer(target) if target is not None or loc.backward_birth is not None else None
        if birth is not None:
            self._event(
                {
                    "type": "nonfinite",
                    "step": step,
                    **birth.event(),
                    "located_by": "hooks",
                    "seen_at_step": self.step_count,
                    "note": f"step {step} failed without a way to replay it; the failure recurred at step "
                    f"{self.step_count}, whose forward ran instrumented",
                }
            )

    def _locate(self, step: int, vals: list[float]) -> dict[str, Any] | None:
        """Where the first non-finite value of this (skipped, not yet stepped) step was born.

        The anomaly path: host reads and a replay are fine here. Weights are unchanged (the step
        has not been taken), so the replay sees what the failed step saw.
        """
        if self._capture is None:
            return None
        self.flush()  # the steps before this one, into the history
        exploded = explosion(list(self._history))
        birth: Any = None
        how = "replay"
        if self._replays < self.max_replays and self._reducer is None:
            self._replays += 1
            loc = Locator(self._root)
            loss_bad = bool(vals[_COL["loss_nonfinite"]])
            if self._closure is not None:
                birth, _ = loc.replay(self._closure, self._closure_rng, grads=self._params)
            elif self._capture.inputs is not None:
                found, how = self._capture.replay(loc)
                birth = _Found(found) if isinstance(found, dict) else found
                if birth is None and loss_bad and how == "replay":
                    how = "the model's output was finite: the loss code made the loss non-finite"
        located: dict[str, Any] = {}
        if birth is not None:
            located = {**birth.event(), "located_by": "watch" if isinstance(birth, _Found) else "replay"}
        else:
            if how != "replay":
                located = {"phase": "loss", "located_by": "replay", "evidence": {"reason": how}}
            if exploded is None and self._closure is None and self._armed is None:
                self._arm(step)  # the next step runs under full instrumentation, in case it recurs
        if exploded is not None:  # the answer is the explosion, the op where it overflowed is evidence
            evidence = {**exploded, "overflow": located or None}
            return {
                "phase": "backward",
                "module": exploded["module"],
                "op": None,
                "tensor": "grad",
                "source": None,
                "cause": "explosion",
                "located_by": "norm",
                "evidence": evidence,
            }
        return located or None

    def _nonfinite_message(self, step: int, vals: list[float]) -> str:
        what = (
            f"the loss is {vals[_COL['loss']]}"
            if vals[_COL["loss_nonfinite"]]
            else (f"the gradient norm is {vals[_COL['grad_norm']]}")
        )
        where = f" Run log: {self.run_dir}." if self.run_dir else ""
        return (
            f"step {step}: {what}.{where} Use on_nonfinite='skip' to drop such steps, 'rollback' to restore "
            "the last good state, or look at the run with `gradguard diagnose`."
        )

    def _abort(self, step: int) -> NonFiniteError:
        """Log the abort and return the error to raise (after the log is flushed)."""
        with torch.no_grad():
            weights_bad = not bool(
                torch.isfinite(total_norm(tensor_norms([p.detach() for p in self._params])))
            )
        msg = (
            f"{self._consecutive} consecutive skipped steps (last: step {step}); gradguard stopped the run."
            + (" The weights themselves are non-finite: use on_nonfinite='rollback'." if weights_bad else "")
            + " Lower the learning rate or clip harder (`gradguard diagnose` recommends a threshold), or raise "
            "max_consecutive." + (f" Run log: {self.run_dir}." if self.run_dir else "")
        )
        self._event(
            {
                "type": "abort",
                "step": step,
                "consecutive": self._consecutive,
                "weights_nonfinite": weights_bad,
            }
        )
        if self.writer is not None:
            self.writer.update_meta(aborted=True, abort_step=step)
        return NonFiniteError(msg)

    # ------------------------------------------------------------------ rollback
    def _take_snapshot(self) -> None:
        state = {
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "clipper": self.clipper.state_dict() if self.clipper is not None else None,
            "spike": self._spike.state_dict() if self._spike is not None else None,
            "step": self.step_count,
        }
        self._snapshot = state
        self._snapshot_step = self.step_count
        if self._snapshot_dir is not None:
            self._snapshot_dir.mkdir(parents=True, exist_ok=True)
            target = self._snapshot_dir / "snapshot.pt"
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)

    def _rollback(self, step: int) -> None:
        if self._snapshot is None:
            self._event(
                {"type": "skip", "step": step, "reason": "nonfinite (no snapshot yet to roll back to)"}
            )
            return
        snap = self._snapshot
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.model.load_state_dict(snap["model"])
        # the optimizer keeps references to what it loads: give it copies, the snapshot stays intact
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        if self.clipper is not None and snap["clipper"] is not None:
            self.clipper.load_state_dict(snap["clipper"])
        if self._spike is not None and snap["spike"] is not None:
            self._spike.load_state_dict(snap["spike"])
        for g, lr in zip(self.optimizer.param_groups, lrs):  # the LR of now, not of the snapshot
            g["lr"] = lr
        self._event({"type": "rollback", "step": step, "to_step": snap["step"]})
        if self.lr_backoff is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = (
                    g["lr"] * self.lr_backoff
                    if not isinstance(g["lr"], Tensor)
                    else g["lr"].mul_(self.lr_backoff)
                )
            lr0 = self.optimizer.param_groups[0]["lr"]
            self._event({"type": "lr_backoff", "step": step, "factor": self.lr_backoff, "lr": float(lr0)})

    # ------------------------------------------------------------------ flush → events
    def _overflow_event(self, step: int, scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
        event: dict[str, Any] = {"type": "skip", "step": step, "reason": "amp_overflow"}
        if scaler is not None:
            event["loss_scale"] = scaler.get_scale()  # host sync: on an overflow step only
        return event

    def _check_loss_scale(self, rec: dict[str, Any], events: list[dict[str, Any]]) -> None:
        """A ``loss_scale_collapse`` event when the scale falls below the floor or overflows repeat."""
        scale = rec["loss_scale"]
        if math.isnan(scale):
            return
        self._overflow_run = self._overflow_run + 1 if rec["amp_overflow"] else 0
        self._scale_history.append((rec["step"], scale))
        del self._scale_history[:-_SCALE_HISTORY]
        collapsed = scale < self.loss_scale_floor or self._overflow_run >= self.max_consecutive
        if collapsed and not self._collapsed:
            events.append(
                {
                    "type": "loss_scale_collapse",
                    "step": rec["step"],
                    "loss_scale": scale,
                    "floor": self.loss_scale_floor,
                    "consecutive_overflows": self._overflow_run,
                    "recent_scales": list(self._scale_history),
                    "message": "the GradScaler keeps overflowing: fp16 cannot hold these gradients. Lower the "
                    "learning rate, clip harder, or train in bf16 (torch.autocast(dtype=torch.bfloat16)).",
                }
            )
        self._collapsed = collapsed

    def _weights_nonfinite(self, rec: dict[str, Any]) -> bool:
        """A weight that went non-finite without a non-finite loss or gradient (e.g. behind a tanh).

        Seen at the ``weight_every`` cadence, where weight norms are measured; reported once.
        """
        layers = rec.get("layers", {})
        bad = [n for n in self._index.layers if not math.isfinite(layers.get(n, {}).get("weight_norm", 0.0))]
        if not bad:
            return False
        first = layers[bad[0]]["weight_norm"]
        self._event(
            {
                "type": "nonfinite",
                "step": rec["step"],
                "phase": "optimizer",
                "module": bad[0],
                "op": None,
                "tensor": "param",
                "kind": "nan" if math.isnan(first) else "inf",
                "source": None,
                "located_by": "norm",
                "layers": bad[:_MAX_LAYERS_IN_EVENT],
                "layers_nonfinite": len(bad),
                "policy": self.on_nonfinite,
            }
        )
        return True

    def _on_flush(self, records: list[dict[str, Any]]) -> None:
        """The monitor's flush: the guard's own handling, then the flush callbacks (sinks)."""
        try:
            self._handle_flush(records)
        finally:
            for fn in list(self._flush_callbacks):
                fn(records)

    def _prepare_records(self, records: list[dict[str, Any]]) -> None:
        """Before the records are written: the host-side spike flags of ``on_spike="warn"``."""
        if isinstance(self._spike, _HostSpike):
            for rec in records:
                if not rec["nonfinite"] and not rec["skipped"]:
                    rec["spike"] = self._spike.observe(rec["grad_norm"])

    def _handle_flush(self, records: list[dict[str, Any]]) -> None:
        """Events of the steps the host had not seen yet (the sync-free path), from one host copy."""
        events: list[dict[str, Any]] = []
        for rec in records:
            step = rec["step"]
            layers = {n: v.get("grad_norm", math.nan) for n, v in rec.get("layers", {}).items()}
            self._history.append((step, rec["grad_norm"] if not rec["nonfinite"] else math.nan, layers))
            self._check_loss_scale(rec, events)
            if not rec.get("_decided") and rec["amp_overflow"]:
                self.skipped_steps += 1
                events.append(self._overflow_event(step, None))
            elif not rec.get("_decided"):
                if rec["nonfinite"]:
                    layer_norms = [
                        rec["layers"].get(n, {}).get("grad_norm", math.nan) for n in self._index.layers
                    ]
                    self._emit_nonfinite(step, [float(rec[k]) for k in SCALARS], layer_norms)
                if rec["skipped"]:
                    self.skipped_steps += 1
                    reason = "nonfinite" if rec["nonfinite"] else "spike"
                    events.append(
                        {"type": "skip", "step": step, "reason": reason, "grad_norm": rec["grad_norm"]}
                    )
                self._consecutive = self._consecutive + 1 if rec["skipped"] else 0
            if not self._weights_reported and self._weights_nonfinite(rec):
                self._weights_reported = True
            if rec["spike"] and not rec["nonfinite"] and self.on_spike in ("warn", "clip"):
                events.append(
                    {"type": "spike", "step": step, "grad_norm": rec["grad_norm"], "action": self.on_spike}
                )
        if events and self.writer is not None:
            self.writer.write_events(events)
        # the sync path checks at once; here the host learns of skipped steps only now
        if (
            self._consecutive >= self.max_consecutive
            and not self._closed
            and records
            and not records[-1].get("_decided")
        ):
            raise self._abort(records[-1]["step"])


def _tensors(tree: Any) -> list[Tensor]:
    """The tensors in a module's output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return []


class _HostSpike:
    """ZClip's z-score rule (:class:`gradguard.clip.ZClip`, Kumar et al. 2025) on the host, for logging.

    Same statistics: the first ``warmup`` finite norms give μ and σ²; then a norm with
    ``z = (g − μ)/(σ + eps) > z_thresh`` is a spike, and μ, σ² follow an EMA of the clipped value
    ``μ + z_thresh²·σ/z``. Fed at flush with the norms of the steps that were taken.
    """

    def __init__(self, z_thresh: float, alpha: float = 0.97, warmup: int = 25, eps: float = 1e-6) -> None:
        if not z_thresh > 0:
            raise GradGuardError(f"spike_z must be > 0, got {z_thresh!r}. The default is 6.")
        self.z_thresh, self.alpha, self.warmup, self.eps = z_thresh, alpha, warmup, eps
        self.mean = self.var = 0.0
        self.seen = 0

    def observe(self, g: float) -> bool:
        if not math.isfinite(g):
            return False
        if self.seen < self.warmup:  # Welford: mean and population variance of the warm-up norms
            self.seen += 1
            d = g - self.mean
            self.mean += d / self.seen
            self.var += (d * (g - self.mean) - self.var) / self.seen
            return False
        std = math.sqrt(max(self.var, 0.0))
        z = (g - self.mean) / (std + self.eps)
        spike = z > self.z_thresh
        g_eff = self.mean + self.z_thresh**2 * std / z if spike else g
        self.mean = self.alpha * self.mean + (1 - self.alpha) * g_eff
        self.var = self.alpha * self.var + (1 - self.alpha) * (g_eff - self.mean) ** 2
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "host": True, "mean": self.mean, "var": self.var, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("host"):
            return  # a device spike detector's state (on_spike changed between runs): start afresh
        self.mean, self.var, self.seen = float(state["mean"]), float(state["var"]), int(state["seen"])


class _Handle:
    """``remove()`` takes a callback out of its list."""

    def __init__(self, callbacks: list[Any], fn: Any) -> None:
        self._callbacks, self._fn = callbacks, fn

    def remove(self) -> None:
        if self._fn in self._callbacks:
            self._callbacks.remove(self._fn)


class _Found:
    """A ready event (from the loss watch) that quacks like a :class:`gradguard.locate.Birth`."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.phase = fields["phase"]

    def event(self) -> dict[str, Any]:
        return dict(self.fields)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)
