"""Recovery for ``on_nonfinite="rollback"`` and ``on_explosion="recover"``: snapshots of good states,
rollback, LR back-off.

A snapshot is one copy of the model's and the optimizer's state (and of the guard's stateful
parts: clipper, spike detector) in **host memory**, taken after a good step at least
``snapshot_every`` steps after the last one; with ``snapshot_dir`` it is also written to
``snapshot_dir/snapshot.pt`` (atomically), at the step that takes it. Rolling back restores it,
keeps the learning rate of now, and multiplies it by ``lr_backoff``.

Recovery is bounded: a run that keeps failing after each restore would otherwise roll back for
ever while the back-off drives the learning rate to nothing (0.1 → 1e-303 in 3,000 steps with a
NaN every third step). :meth:`Recovery.limit` says when a rollback would pass a bound: more than
``max_rollbacks`` rollbacks within ``window`` steps, or a back-off that takes the largest learning
rate below ``min_lr``. The guard then restores the snapshot one last time (no back-off) and stops
the run with an ``abort`` event.

For explosions (``keep_earlier``) the recovery also keeps the snapshot before the newest one, at
least :data:`MIN_GAP` steps older: an explosion is confirmed some steps after its onset, and the
newest snapshot may already be from the climb; :meth:`Recovery.before` picks the newest one from
before the onset. A gate (``healthy``) holds a due snapshot back while the norm climbs.

The snapshots, their steps (the cadence) and the recent rollbacks are the recovery's state
(:meth:`Recovery.state_dict`, part of the guard's): a resumed run rolls back to the same snapshot
at the same steps as one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gradguard import events
from gradguard.errors import GradGuardError, check_state_version
from gradguard.runtable import SUSTAIN

__all__ = ["MIN_GAP", "Limit", "Recovery", "Stateful"]

_STATE_VERSION = 1
_UNDONE_STEPS = 3  # steps after a back-off at which a rate set back up is said (Recovery.undone)
_UNDONE = 1.5  # a group's rate this many times its backed-off value: a scheduler undid the back-off

MIN_GAP = SUSTAIN + 2
"""The fewest steps between the two snapshots an explosion recovery keeps: an onset is confirmed
:data:`gradguard.runtable.SUSTAIN` steps after it, so the earlier snapshot is from before it."""

Snapshot = dict[str, Any]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Limit:
    """A bound that one more rollback would pass: why the run stops."""

    reason: str  # events.ABORT_MAX_ROLLBACKS or events.ABORT_MIN_LR
    why: str  # what happened, in a sentence (the error's first words)
    fix: str  # what to change
    fields: dict[str, Any] = field(default_factory=dict)  # for the abort event


class Recovery:
    """Snapshots and rollback of ``model`` + ``optimizer`` (+ ``parts``, by name).

    Args:
        parts: the guard's other stateful parts (``{"clipper": ..., "spike": ...}``, ``None`` for absent).
        every: snapshot cadence in good steps.
        lr_backoff: multiply every group's LR by this after a rollback (``None``: keep it).
        snapshot_dir: also write each snapshot to ``snapshot_dir/snapshot.pt``.
        active: take snapshots at all (``on_nonfinite="rollback"``).
        min_lr: a back-off may not take the largest group LR below this.
        max_rollbacks: at most this many rollbacks within ``window`` steps (``None``: no cap).
        window: the window of ``max_rollbacks``, in steps.
        keep_earlier: also keep the snapshot before the newest (explosion recovery), taken at least
            :data:`MIN_GAP` steps after it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful | None],
        *,
        every: int,
        lr_backoff: float | None,
        snapshot_dir: str | os.PathLike[str] | None,
        active: bool,
        min_lr: float = 0.0,
        max_rollbacks: int | None = None,
        window: int = 1000,
        keep_earlier: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.parts = parts
        self.every = every
        self.lr_backoff = lr_backoff
        self._backed: tuple[int, list[Any]] | None = None  # (steps left to check, the rates after a back-off)
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.active = active
        self.min_lr = min_lr
        self.max_rollbacks = max_rollbacks
        self.window = window
        self.keep_earlier = keep_earlier
        self.snapshot: Snapshot | None = None
        self.earlier: Snapshot | None = None  # keep_earlier: the snapshot before ``snapshot``
        self.snapshot_step = -every  # the first good step takes a snapshot
        self.rollbacks: list[int] = []  # the steps of the rollbacks within the window
        self.healthy: Callable[[], bool] = lambda: True  # a due snapshot waits while this is False
        self._disk_failed = False  # a snapshot_dir write failed: memory only from then on (said once)

    def due(self, step: int) -> bool:
        """Whether a snapshot is due after ``step`` (the cadence, and the gate)."""
        if not self.active:  # (the usual case: no snapshots kept)
            return False
        every = max(self.every, MIN_GAP) if self.keep_earlier else self.every
        return step - self.snapshot_step >= every and self.healthy()

    def after_good_step(self, step: int) -> None:
        """Take a snapshot if one is due (``step`` was taken and is good)."""
        if self.due(step):
            self.take(step)

    def take(self, step: int) -> None:
        """Copy the state of now (after ``step``) to host memory (and to ``snapshot_dir``)."""
        if self.keep_earlier and self.snapshot is not None:
            self.earlier = self.snapshot
        state = {
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            **{name: part.state_dict() if part is not None else None for name, part in self.parts.items()},
            "step": step,
        }
        self.snapshot, self.snapshot_step = state, step
        if self.snapshot_dir is not None and not self._disk_failed:
            try:
                _save_atomically(state, self.snapshot_dir / "snapshot.pt")
            except (OSError, RuntimeError) as e:  # (torch.save reports a full disk as a RuntimeError)
                self._disk_failed = True
                warnings.warn(
                    f"gradguard: cannot write the rollback snapshot into {str(self.snapshot_dir)!r} ({e}); "
                    "training goes on with the snapshot kept in memory only (rollbacks still work; a "
                    "restart cannot use it). Pass a snapshot_dir on a disk with room that you can write to. "
                    "Said once.",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _recent(self, step: int) -> list[int]:
        """The rollbacks within ``window`` steps of ``step``."""
        return [s for s in self.rollbacks if step - s < self.window]

    def limit(self, step: int, to: Snapshot | None = None, cause: str = "non-finite") -> Limit | None:
        """The bound a rollback at ``step`` (to ``to``, by default the newest snapshot) would pass
        (then the run stops), or ``None``. ``cause``: what makes the run fail, for the message."""
        snap = to if to is not None else self.snapshot
        if snap is None:
            return None  # nothing to roll back to: the step is skipped
        lr = max(float(g["lr"]) for g in self.optimizer.param_groups)  # host read: the rollback path
        at = {"lr": lr, "to_step": snap["step"]}
        find = (
            "Find what makes the steps non-finite (`gradguard diagnose`)"
            if cause == "non-finite"
            else "Find what makes the gradient norm explode (`gradguard diagnose`)"
        )
        count = len(self._recent(step)) + 1
        if self.max_rollbacks is not None and count > self.max_rollbacks:
            return Limit(
                events.ABORT_MAX_ROLLBACKS,
                f"{count} rollbacks within {self.window} steps (max_rollbacks={self.max_rollbacks}): the run "
                f"keeps failing after each restore of the snapshot of step {at['to_step']} (learning rate now "
                f"{lr:.3g}).",
                f"{find}: lower the learning rate, clip harder, check the data; or raise max_rollbacks / "
                "lower rollback_window.",
                {**at, "rollbacks": count, "window": self.window, "max_rollbacks": self.max_rollbacks},
            )
        if self.lr_backoff is not None and lr * self.lr_backoff < self.min_lr:
            return Limit(
                events.ABORT_MIN_LR,
                f"one more back-off (lr_backoff={self.lr_backoff}) would take the learning rate from {lr:.3g} "
                f"to {lr * self.lr_backoff:.3g}, below min_lr={self.min_lr:g}: the weights would barely move.",
                f"{find}: lower the learning rate, clip harder, check the data; or lower min_lr.",
                {**at, "min_lr": self.min_lr, "lr_backoff": self.lr_backoff},
            )
        return None

    def forget(self) -> None:
        """The optimizer's parameter groups changed: the snapshots no longer fit it; the next good
        step takes a new one."""
        self.snapshot, self.earlier, self.snapshot_step = None, None, -self.every

    def before(self, onset: int) -> Snapshot | None:
        """The newest snapshot whose weights gave a norm from before ``onset`` (a snapshot taken
        after step ``s`` is what step ``s + 1`` measured: ``s + 1 < onset``), or ``None``."""
        for snap in (self.snapshot, self.earlier):
            if snap is not None and snap["step"] + 1 < onset:
                return snap
        return None

    def keep_until(self, snap: Snapshot, step: int) -> None:
        """After a rewind to ``snap`` at ``step``: the snapshots taken after it (in the climb) are
        dropped; the next one is due ``every`` steps from now."""
        if self.snapshot is not snap:
            self.snapshot, self.earlier = snap, None
        self.snapshot_step = step

    def rollback(self, step: int, *, back_off: bool = True, to: Snapshot | None = None) -> list[events.Event]:
        """Restore the snapshot (``to``, by default the newest; the learning rate of now, backed off
        unless ``back_off`` is false); the events that say so."""
        snap = to if to is not None else self.snapshot
        if snap is None:
            return [events.skip(step, events.SKIP_NO_SNAPSHOT)]
        self.rollbacks = [*self._recent(step), step]
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.model.load_state_dict(snap["model"])
        # the optimizer keeps references to what it loads: give it copies, the snapshot stays intact
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        for name, part in self.parts.items():
            if part is not None and snap.get(name) is not None:
                part.load_state_dict(snap[name])
        for g, lr in zip(self.optimizer.param_groups, lrs):  # the LR of now, not of the snapshot
            g["lr"] = lr
        done = [events.rollback(step, snap["step"])]
        if self.lr_backoff is not None and back_off:
            done.append(self._back_off(step, self.lr_backoff))
        return done

    def _back_off(self, step: int, factor: float) -> events.Event:
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"].mul_(factor) if isinstance(g["lr"], Tensor) else g["lr"] * factor
        rates = [g["lr"] for g in self.optimizer.param_groups]
        self._backed = (_UNDONE_STEPS, rates) if not any(isinstance(r, Tensor) for r in rates) else None
        return events.lr_backoff(step, factor, float(self.optimizer.param_groups[0]["lr"]))

    def undone(self) -> str | None:
        """Where an LR scheduler set a backed-off rate back up within :data:`_UNDONE_STEPS` steps (LambdaLR,
        OneCycleLR and their kin compute the rate from their own base rates, not from the group's): what to
        say, once; ``None`` otherwise. Host floats only."""
        if self._backed is None:
            return None
        left, rates = self._backed
        now = [g["lr"] for g in self.optimizer.param_groups]
        if len(now) == len(rates) and any(
            isinstance(n, float) and n > _UNDONE * r for n, r in zip(now, rates, strict=True)
        ):
            self._backed = None
            return (
                f"the learning rate scheduler set the rate back to {now[0]:.3g} right after gradguard's lr_backoff "
                f"lowered it to {rates[0]:.3g}: schedulers that compute the rate from their own base rates "
                "(LambdaLR, OneCycleLR, CyclicLR, CosineAnnealingWarmRestarts) undo a back-off. Scale "
                "the scheduler's base rates with it (scheduler.base_lrs = [lr * lr_backoff for lr in "
                "scheduler.base_lrs]), use a scheduler that multiplies the current rate (StepLR, ExponentialLR, "
                "ReduceLROnPlateau), or lr_backoff=None."
            )
        self._backed = (left - 1, rates) if left > 1 else None
        return None

    def state_dict(self) -> dict[str, Any]:
        """The snapshots held (host tensors and Python scalars), the cadence's step and the recent
        rollbacks. No I/O; ``torch.load(..., weights_only=True)`` reads it back."""
        return {
            "version": _STATE_VERSION,
            "snapshot_step": self.snapshot_step,
            "snapshot": self.snapshot,
            "earlier": self.earlier,
            "rollbacks": list(self.rollbacks),
        }

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse (before anything is loaded) a state whose rollback snapshots are of another model (keys
        or shapes differ): it would fail only at the first rollback, mid-training, when the guard should
        protect the run."""
        check_state_version(state, _STATE_VERSION, "recovery", "Pass what Recovery.state_dict() returned.")
        for snapshot in (state["snapshot"], state.get("earlier")):
            self._fits(snapshot)
            self._fits_optimizer(snapshot)

    def _fits_optimizer(self, snapshot: Any) -> None:
        """A snapshot's optimizer state must be this optimizer's kind: the same groups, of the same sizes
        and hyperparameter names (an AdamW state rolled back into SGD died in torch's sgd.py: 'momentum')."""
        saved = snapshot.get("optimizer") if isinstance(snapshot, dict) else None
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(groups, list):
            return
        now = self.optimizer.state_dict()["param_groups"]
        shape = [(sorted(_DEFINING.intersection(g)), len(g.get("params", ()))) for g in groups]
        here = [(sorted(_DEFINING.intersection(g)), len(g["params"])) for g in now]
        if shape == here:
            return
        keys = ", ".join(shape[0][0]) if shape else "none"
        raise GradGuardError(
            f"the Guard state holds a rollback snapshot of another optimizer ({len(groups)} group(s) with "
            f"{keys or 'lr'}; this {type(self.optimizer).__name__} has {len(now)} with "
            f"{', '.join(here[0][0]) if here else 'none'}): a rollback would load it into this optimizer and fail. "
            "Load the Guard state saved with this optimizer, or start a new Guard."
        )

    def _fits(self, snapshot: Any) -> None:
        saved = snapshot.get("model") if isinstance(snapshot, dict) else None
        if not isinstance(saved, dict):
            return
        now = self.model.state_dict()
        missing, extra = sorted(set(now) - set(saved)), sorted(set(saved) - set(now))
        shapes = [
            k for k in set(now) & set(saved) if tuple(now[k].shape) != tuple(getattr(saved[k], "shape", ()))
        ]
        if not (missing or extra or shapes):
            return
        what = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:4])}" if missing else "",
                f"unexpected {', '.join(extra[:4])}" if extra else "",
                f"other shapes for {', '.join(sorted(shapes)[:4])}" if shapes else "",
            )
            if part
        )
        raise GradGuardError(
            f"the Guard state holds a rollback snapshot of another model ({what}): a rollback would fail. Load "
            "the Guard state saved with this model's architecture, or start a new Guard (its first snapshot is "
            "taken at its first steps)."
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_fits(state)
        self.snapshot_step = int(state["snapshot_step"])
        self.snapshot = state["snapshot"]
        self.earlier = state.get("earlier")
        self.rollbacks = [int(s) for s in state.get("rollbacks", ())]


#: The hyperparameters that tell torch's optimizers apart (keys a scheduler adds, ``initial_lr``, are not)
_DEFINING = frozenset(
    {"momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "alpha", "centered", "rho", "lr_decay",
     "lambd", "t0", "etas", "step_sizes", "momentum_decay", "decoupled_weight_decay", "initial_accumulator_value"}
)  # fmt: skip


def _save_atomically(state: dict[str, Any], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()  # no half-written file left behind (a full disk)
        raise


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
