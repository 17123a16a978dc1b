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

Host syncs: with a fused optimizer (``fused=True`` Adam/AdamW/SGD/Adagrad) and
``on_nonfinite`` in ``skip``/``warn``, or with any optimizer in ``warn``, a step never waits for
the device: the clip coefficient and the non-finite flag go into the optimizer through the
``grad_scale``/``found_inf`` protocol of :class:`torch.amp.GradScaler`, so the kernel itself
skips the step. Otherwise one host read per step decides (in :meth:`Guard._decide`).
"""

from __future__ import annotations

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
from gradguard.clip import Clipper, NormClipper, ZClip, coefficient, from_spec, scale_
from gradguard.errors import GradGuardError, NonFiniteError
from gradguard.monitor import SCALARS, Monitor
from gradguard.stats import LayerIndex, check_tensors, exact_norms, tensor_norms, total_norm, update_ratios

__all__ = ["Guard", "OnNonFinite", "OnSpike"]

OnNonFinite = Literal["skip", "rollback", "raise", "warn"]
OnSpike = Literal["ignore", "warn", "clip", "skip"]
_STATE_VERSION = 1
_FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def _check_choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise GradGuardError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
    return str(value)


def _positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GradGuardError(f"{name} must be a positive int{' or None' if allow_none else ''}; got {value!r}.")
    return value


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """All groups fused, and the optimizer honours ``grad_scale``/``found_inf`` (GradScaler protocol)."""
    return (
        isinstance(optimizer, _FUSED_OPTIMIZERS)
        and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        and all(g.get("fused") for g in optimizer.param_groups)
    )


class Guard:
    """Measure, clip and guard every optimizer step of a model.

    Call :meth:`step` where you called ``optimizer.step()``.

    Args:
        model: the root module (its ``named_parameters()`` name the layers in the log).
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
            threshold) or ``"skip"``.
        spike_z: the z-score of a spike.
        log_dir: the run directory (``None``: no files; ``"auto"``: ``gradguard-runs/<time>-<name>``).
        name: the run's name in the default run directory.
        every: flush interval in steps (the only host copy of the metrics).
        layer_every: record per-layer gradient norms every this many steps (1: every step).
        weight_every: measure weight norms and update/weight ratios every this many steps
            (a temporary copy of the weights on those steps only); ``None`` never.
        snapshot_every: ``rollback`` snapshot cadence in good steps. A snapshot is one copy of
            the model and optimizer state in **host memory**; ``snapshot_dir`` also writes it to
            disk (atomically).
        lr_backoff: multiply every group's learning rate by this after a rollback (``None``: keep).
        max_consecutive: abort (``NonFiniteError``, log flushed) after this many bad steps in a row.
        norm_type: p of the gradient norms.
        exist_ok: append to an existing run directory instead of refusing it.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise GradGuardError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise GradGuardError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        self.model = model
        self.optimizer = optimizer
        self.on_nonfinite = _check_choice(on_nonfinite, "on_nonfinite", get_args(OnNonFinite))
        self.on_spike = _check_choice(on_spike, "on_spike", get_args(OnSpike))
        self.clipper = from_spec(clip)
        self.norm_type = float(norm_type)
        self.every = _positive_int(every, "every")
        self.layer_every = _positive_int(layer_every, "layer_every")
        self.weight_every = _positive_int(weight_every, "weight_every", allow_none=True)
        self.snapshot_every = _positive_int(snapshot_every, "snapshot_every")
        self.max_consecutive = _positive_int(max_consecutive, "max_consecutive")
        if lr_backoff is not None and not 0.0 < float(lr_backoff) <= 1.0:
            raise GradGuardError(f"lr_backoff must be in (0, 1] or None; got {lr_backoff!r}. 0.5 halves the LR.")
        self.lr_backoff = None if lr_backoff is None else float(lr_backoff)
        self._spike = ZClip(z_thresh=float(spike_z)) if self.on_spike != "ignore" else None

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise GradGuardError(
                f"{type(model).__name__} has no trainable parameters (all have requires_grad=False); "
                "there is nothing to guard. Unfreeze some parameters or guard the module that trains."
            )
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        check_tensors(self._params, what="parameter")
        own = {id(p) for p in model.parameters()}
        foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
        if foreign:
            shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3])
            raise GradGuardError(
                f"the optimizer holds {len(foreign)} parameter(s) that are not the model's (shapes {shapes}). "
                "Pass the model the optimizer trains (build it as `optimizer = Opt(model.parameters())`), "
                "or the root module that owns all of them."
            )
        self._index = LayerIndex(self._names)
        self.fused = _is_fused(optimizer)
        # the one-host-read path is needed unless the kernel can skip by itself, or nothing is skipped
        self.sync_free = self.on_nonfinite == "warn" or (
            self.fused and self.on_nonfinite == "skip" and self.on_spike != "skip"
        )
        self.step_count = 0  # guard.step() calls
        self.skipped_steps = 0
        self._consecutive = 0
        self._consecutive_dev: Tensor | None = None
        self._last_skipped: Tensor | bool = False
        self._reported: set[int] = set()
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_step = -snapshot_every  # the first good step takes a snapshot
        self._snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self._closed = False

        self.writer: runlog.RunWriter | None = None
        if log_dir is not None:
            run_dir = runlog.default_run_dir(name) if str(log_dir) == "auto" else Path(log_dir)
            self.writer = runlog.RunWriter(run_dir, self._meta(), exist_ok=exist_ok)
        self.monitor = Monitor(self._index.layers, every=self.every, writer=self.writer, on_flush=self._on_flush)

    # ------------------------------------------------------------------ public
    @property
    def run_dir(self) -> Path | None:
        """The run directory, or ``None`` when not logging."""
        return self.writer.path if self.writer is not None else None

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last :meth:`step` was skipped. Reading it syncs with the device on the sync-free path."""
        s = self._last_skipped
        return bool(s)  # host sync: only when the user asks

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
            scaler: the :class:`torch.amp.GradScaler` of an AMP loop; gradguard unscales (if you
                have not) before measuring and steps through the scaler.

        Returns:
            The loss (what the closure returned, or what was passed).
        """
        if callable(loss_or_closure) and not isinstance(loss_or_closure, Tensor):
            with torch.enable_grad():
                loss = loss_or_closure()
        else:
            loss = loss_or_closure
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(self.optimizer)  # measured and clipped unscaled (no-op if already done)
        self._step(loss, scaler)
        return loss

    def flush(self) -> None:
        """Write the pending records and events now (one host copy)."""
        self.monitor.flush()

    def close(self) -> None:
        """Flush and close the run log. Safe to call twice."""
        if self._closed:
            return
        self.flush()
        if self.writer is not None:
            self.writer.update_meta(end_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), steps=self.step_count)
            self.writer.close()
        self._closed = True

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Counters and the clipper's / spike detector's state (tensors and Python scalars only)."""
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
        if state.get("version") != _STATE_VERSION:
            raise GradGuardError(
                f"Guard state has version {state.get('version')!r}; this gradguard reads {_STATE_VERSION}."
            )
        self.step_count = int(state["step_count"])
        self.skipped_steps = int(state["skipped_steps"])
        self._consecutive = int(state["consecutive"])
        if self.clipper is not None and state["clipper"] is not None:
            self.clipper.load_state_dict(state["clipper"])
        if self._spike is not None and state["spike"] is not None:
            self._spike.load_state_dict(state["spike"])

    # ------------------------------------------------------------------ the step
    def _step(self, loss: Tensor | float | None, scaler: torch.amp.GradScaler | None) -> None:
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        grads = [g for g in (self._params[i].grad for i in present) if g is not None]
        check_tensors(grads, what="gradient")
        device = grads[0].device if grads else self._params[0].device
        p = self.norm_type

        norms = tensor_norms(grads, p)  # the one read of the gradients
        total = total_norm(norms, p).to(device)
        if isinstance(loss, Tensor):
            loss_val = loss.detach().float().sum() if loss.numel() != 1 else loss.detach().float().reshape(())
            loss_val = loss_val.to(device)
        elif loss is None:
            loss_val = torch.full((), math.nan, device=device)
        else:
            loss_val = torch.full((), float(loss), device=device)
        loss_bad = ~torch.isfinite(loss_val) if loss is not None else torch.zeros((), dtype=torch.bool, device=device)
        grad_nan = torch.isnan(total)
        grad_inf = torch.isinf(total)
        bad = loss_bad | grad_nan | grad_inf
        # adaptive state sees only the norms of good steps
        observed = torch.where(bad, torch.full_like(total, math.nan), total)

        spike = torch.zeros((), dtype=torch.bool, device=device)
        threshold = torch.full((), math.inf, device=device)
        if self._spike is not None:
            spike_tau = self._spike.threshold(observed)
            spike = torch.isfinite(spike_tau)
            if self.on_spike == "clip":
                threshold = torch.minimum(threshold, spike_tau)
        if isinstance(self.clipper, NormClipper):
            threshold = torch.minimum(threshold, self.clipper.threshold(observed).to(device))
        coef = coefficient(total, threshold)
        skip = bad if self.on_nonfinite != "warn" else torch.zeros_like(bad)
        if self.on_spike == "skip":
            skip = skip | spike

        scalars = torch.stack(
            [
                loss_val.float(),
                total.float(),
                coef.float() if isinstance(self.clipper, NormClipper) or self.on_spike == "clip" else coef * math.nan,
                threshold.float(),
                bad.float(),
                loss_bad.float(),
                grad_nan.float(),
                grad_inf.float(),
                skip.float(),
                spike.float(),
            ]
        )
        step = self.step_count
        layer_grads = self._index.reduce(norms, p, present) if step % self.layer_every == 0 else None
        measure_weights = self.weight_every is not None and step % self.weight_every == 0
        before = [w.detach().clone() for w in self._params] if measure_weights else None

        if self.sync_free:
            took = self._step_sync_free(grads, coef, skip, scaler)
        else:
            took = self._step_with_sync(grads, norms, present, coef, skip, scaler, scalars)
        self._last_skipped = skip if self.sync_free else not took

        extras: dict[str, Tensor] = {}
        if before is not None:
            with torch.no_grad():
                w_norms = tensor_norms(before, p)
                u_norms = tensor_norms(torch._foreach_sub([w.detach() for w in self._params], before), p)
            extras["weight_norm"] = self._index.reduce(w_norms, p)
            extras["update_ratio"] = update_ratios(self._index.reduce(u_norms, p), extras["weight_norm"])
            del before
        lr = self.optimizer.param_groups[0].get("lr")
        host = {"lr": float(lr) if isinstance(lr, (int, float)) else None}
        if not self.sync_free:
            host["skipped"] = not took
        self.monitor.record(step, scalars, layer_grads, host, extras)
        self.step_count += 1

    def _step_sync_free(
        self, grads: list[Tensor], coef: Tensor, skip: Tensor, scaler: torch.amp.GradScaler | None
    ) -> bool:
        """No host read: fold clip and skip into the fused kernel, or clip and always step (warn)."""
        if self.clipper is not None and not isinstance(self.clipper, NormClipper):
            self.clipper(self._named_or_params(), None)
        if self.fused and scaler is None:
            dev = grads[0].device if grads else self._params[0].device
            self.optimizer.grad_scale = (1.0 / coef).to(device=dev, dtype=torch.float32)  # type: ignore[attr-defined]
            self.optimizer.found_inf = skip.to(device=dev, dtype=torch.float32)  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale  # type: ignore[attr-defined]
                del self.optimizer.found_inf  # type: ignore[attr-defined]
        else:
            if grads and (isinstance(self.clipper, NormClipper) or self.on_spike == "clip"):
                scale_(grads, coef)
            self._optimizer_step(scaler)
        # skipped steps are counted at flush (their flags reach the host then)
        return True

    def _decide(self, skip: Tensor) -> bool:
        """The step's one host read: is this step skipped?"""
        return bool(skip)  # host sync: the one read per step on the non-fused path

    def _step_with_sync(
        self,
        grads: list[Tensor],
        norms: Tensor,
        present: list[int],
        coef: Tensor,
        skip: Tensor,
        scaler: torch.amp.GradScaler | None,
        scalars: Tensor,
    ) -> bool:
        skipped = self._decide(skip)
        # anomaly path from here on: extra host reads are fine
        if skipped and bool(scalars[4]) and self._overflow_only(grads, norms, scalars):
            skipped, coef = False, scalars[2]
        if not skipped:
            self._consecutive = 0
            self._apply_clip(grads, coef)
            self._optimizer_step(scaler)
            if self.on_nonfinite == "rollback" and self.step_count - self._snapshot_step >= self.snapshot_every:
                self._take_snapshot()
            return True
        step = self.step_count
        is_bad = bool(scalars[4])
        self.skipped_steps += 1
        self._consecutive += 1
        if is_bad:
            self._report_nonfinite(step, scalars, norms, present)
        if self._consecutive >= self.max_consecutive:
            self._abort(step)
        if is_bad and self.on_nonfinite == "raise":
            self.flush()
            raise NonFiniteError(self._nonfinite_message(step, scalars))
        if is_bad and self.on_nonfinite == "rollback":
            self._rollback(step)
        else:
            reason = "nonfinite" if is_bad else "spike"
            self._event({"type": "skip", "step": step, "reason": reason, "grad_norm": float(scalars[1])})
        return False

    def _apply_clip(self, grads: list[Tensor], coef: Tensor) -> None:
        if self.clipper is not None and not isinstance(self.clipper, NormClipper):
            self.clipper(self._named_or_params(), None)
        if grads and (isinstance(self.clipper, NormClipper) or self.on_spike == "clip"):
            scale_(grads, coef)

    def _overflow_only(self, grads: list[Tensor], norms: Tensor, scalars: Tensor) -> bool:
        """On a bad step: are all gradients finite and only their float32 norm overflowed?"""
        if bool(scalars[5]) or bool(scalars[6]):  # loss non-finite, or a NaN gradient
            return False
        suspects = [g for g, inf in zip(grads, torch.isinf(norms).tolist()) if inf]
        if not suspects:
            return False
        exact = exact_norms(suspects, self.norm_type)
        if not bool(torch.isfinite(exact).all()):
            return False
        # rebuild the norms with the exact values and recompute the coefficient on the exact total
        fixed = norms.to(torch.float64).clone()
        fixed[torch.isinf(norms)] = exact.to(fixed.device)
        total = total_norm(fixed, self.norm_type)
        threshold = scalars[3].to(torch.float64)
        scalars[1] = total.float()
        scalars[2] = coefficient(total, threshold).float()
        scalars[4] = scalars[7] = 0.0
        self._event(
            {"type": "overflow", "step": self.step_count, "grad_norm": float(total), "note": "finite gradients "
             "whose norm overflows float32; measured exactly and clipped"}
        )
        return True

    # ------------------------------------------------------------------ helpers
    def _named_or_params(self) -> list[Any]:
        return list(zip(self._names, self._params))

    def _optimizer_step(self, scaler: torch.amp.GradScaler | None) -> None:
        if scaler is not None and scaler.is_enabled():
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()

    def _meta(self) -> dict[str, Any]:
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return {
            "torch_version": torch.__version__,
            "world_size": world,
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
                "sync_free": self.sync_free,
            },
        }

    def _event(self, event: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write_event(event)

    def _nonfinite_layers(self, layer_norms: list[float]) -> tuple[list[str], str]:
        bad = [(n, v) for n, v in zip(self._index.layers, layer_norms) if not math.isfinite(v)]
        kind = "nan" if any(math.isnan(v) for _, v in bad) else "inf"
        return [n for n, _ in bad], kind

    def _report_nonfinite(self, step: int, scalars: Tensor, norms: Tensor, present: list[int]) -> None:
        vals = scalars.tolist()
        layer_norms = self._index.reduce(norms, self.norm_type, present).tolist()
        self._emit_nonfinite(step, vals, layer_norms)

    def _emit_nonfinite(self, step: int, vals: list[float], layer_norms: list[float]) -> None:
        if step in self._reported:
            return
        self._reported.add(step)
        layers, kind = self._nonfinite_layers(layer_norms)
        loss_bad = bool(vals[5])
        loss = vals[0]
        if loss_bad:
            kind = "nan" if math.isnan(loss) else ("inf" if loss > 0 else "-inf")
        self._event(
            {
                "type": "nonfinite",
                "step": step,
                "phase": "loss" if loss_bad else "backward",
                "module": layers[0] if layers and not loss_bad else None,
                "op": None,
                "tensor": "output" if loss_bad else "grad",
                "kind": kind,
                "source": None,
                "located_by": "norm",
                "layers": layers,
                "loss": loss,
                "grad_norm": vals[1],
                "policy": self.on_nonfinite,
            }
        )

    def _nonfinite_message(self, step: int, scalars: Tensor) -> str:
        vals = scalars.tolist()
        what = f"the loss is {vals[0]}" if vals[5] else f"the gradient norm is {vals[1]}"
        where = f" Run log: {self.run_dir}." if self.run_dir else ""
        return (
            f"step {step}: {what}.{where} Use on_nonfinite='skip' to drop such steps, 'rollback' to restore "
            "the last good state, or locate the first non-finite value with `gradguard diagnose`."
        )

    def _abort(self, step: int) -> None:
        weights_bad = not bool(torch.isfinite(total_norm(tensor_norms([p.detach() for p in self._params]))))
        msg = (
            f"{self._consecutive} consecutive non-finite/skipped steps (last: step {step}); gradguard stopped the run."
            + (" The weights themselves are non-finite: use on_nonfinite='rollback'." if weights_bad else "")
            + " Lower the learning rate or clip harder (`gradguard diagnose` recommends a threshold)."
            + (f" Run log: {self.run_dir}." if self.run_dir else "")
        )
        self._event({"type": "abort", "step": step, "consecutive": self._consecutive, "weights_nonfinite": weights_bad})
        self.flush()
        if self.writer is not None:
            self.writer.update_meta(aborted=True, abort_step=step)
        raise NonFiniteError(msg)

    # ------------------------------------------------------------------ rollback
    def _take_snapshot(self) -> None:
        state = {
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "guard": self.state_dict(),
            "step": self.step_count,
        }
        self._snapshot = state
        self._snapshot_step = self.step_count
        if self._snapshot_dir is not None:
            self._snapshot_dir.mkdir(parents=True, exist_ok=True)
            target = self._snapshot_dir / "snapshot.pt"
            tmp = target.with_suffix(".pt.tmp")
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)

    def _rollback(self, step: int) -> None:
        if self._snapshot is None:
            self._event({"type": "skip", "step": step, "reason": "nonfinite (no snapshot yet to roll back to)"})
            return
        snap = self._snapshot
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        if self.clipper is not None and snap["guard"]["clipper"] is not None:
            self.clipper.load_state_dict(snap["guard"]["clipper"])
        self._event({"type": "rollback", "step": step, "to_step": snap["step"]})
        if self.lr_backoff is not None:
            for g in self.optimizer.param_groups:
                old = g["lr"]
                g["lr"] = old * self.lr_backoff if not isinstance(old, Tensor) else old.mul_(self.lr_backoff)
            self._event(
                {"type": "lr_backoff", "step": step, "factor": self.lr_backoff, "lr": _lr(self.optimizer)}
            )

    # ------------------------------------------------------------------ flush → events
    def _on_flush(self, records: list[dict[str, Any]]) -> None:
        events: list[dict[str, Any]] = []
        for rec in records:
            step = rec["step"]
            if self.sync_free and rec["skipped"]:
                self.skipped_steps += 1
            if rec["nonfinite"] and step not in self._reported:
                layer_norms = [rec["layers"][n]["grad_norm"] for n in self._index.layers]
                before = len(self._reported)
                self._emit_nonfinite(step, [rec[k] for k in SCALARS], layer_norms)
                if len(self._reported) > before and self.sync_free and rec["skipped"]:
                    events.append({"type": "skip", "step": step, "reason": "nonfinite"})
            if rec["spike"] and not rec["nonfinite"] and self.on_spike in ("warn", "clip"):
                events.append({"type": "spike", "step": step, "grad_norm": rec["grad_norm"], "action": self.on_spike})
            if self.sync_free:
                self._consecutive = self._consecutive + 1 if rec["skipped"] else 0
        if events and self.writer is not None:
            self.writer.write_events(events)
        if self.sync_free and self._consecutive >= self.max_consecutive and self.on_nonfinite != "warn":
            self._abort(records[-1]["step"])


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


def _lr(optimizer: torch.optim.Optimizer) -> float | None:
    lr = optimizer.param_groups[0].get("lr")
    return float(lr) if lr is not None else None


