"""The runner's bookkeeping of what it guards: a :class:`Session` per optimizer (or hand-updated
model), a :class:`Root` per model the script calls, and :class:`ManualUpdate`, the stand-in
optimizer of a hand-written update; the summary lines and the optimizer facts for meta.json."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import runlog
from gradguard.errors import GradGuardError
from gradguard.events import nonfinite_where
from gradguard.guard import Guard
from gradguard.integrations._common import what_it_steps
from gradguard.locate import StepCapture, keep_out_of_pickles
from gradguard.runtable import clipped

__all__ = ["ManualUpdate", "Root", "Session", "all_optimizers", "covers", "summary_lines"]


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
@dataclasses.dataclass(frozen=True)
class LossDescription:
    """What the loss code of a step was, as its watch saw it at ``backward()``: the loss's additive
    terms (:meth:`LossWatch.terms`), its loss functions (:meth:`LossWatch.criteria`) and the number
    it was multiplied by (:meth:`LossWatch.scale_of`)."""

    terms: dict[str, Any]
    criteria: list[dict[str, Any]]
    scale: tuple[float, str | None] | None
    framework: str | None = None  # the trainer whose code called backward() (it averages accumulated losses)


DESCRIBE_TRIES = 3  # a session's steps whose loss code is looked for, before it goes without


class Session:
    """The guard of one optimizer (or one hand-updated model) and the state of its current step."""

    def __init__(self, guard: Guard, *, manual: bool, framework: bool = False, first_step: int = 0) -> None:
        self.guard = guard
        self.first_step = first_step  # the process-wide optimizer step it began at (runner.global_step)
        self.first_logged = guard.step_count  # its first step's number in the log (--exist-ok numbers on)
        self.manual = manual
        self.framework = framework  # a framework's callback measures and gates its steps (frameworks.py)
        self.param_ids = {id(p) for g in guard.optimizer.param_groups for p in g["params"]}
        self.measured_at: int | None = None  # the backward count when this step was measured
        self.backwards_seen: int | None = None  # the backward count when the last step was measured
        self.micro_batches = 0  # backward() calls per optimizer step on its first steps (accumulation)
        self.skip = False
        self.clips = False  # the script clips this model's gradients (its steps are measured there)
        self.script_clips = 0  # steps the script's own clip_grad_norm_ / clip_grad_value_ ran on
        self.script_clip_step: int | None = None  # (the step counted last: several clip calls, one step)
        self.script_calls: list[str] = []  # the distinct clip calls, as the summary says them
        self.grad_id: int | None = (
            None  # id of the first gradient at the last step (zeroing: _steps.watch_zeroing)
        )
        self.zero_grads = 0  # the runner's zero_grad() count at the last step
        self.grad_version = 0  # that first gradient's version counter at the last step (in-place writes)
        self.unzeroed = 0  # steps in a row with no zero_grad() and the same gradient tensors
        self.sums: list[float] | None = None  # a hand-updated model's parameter sums at its first step
        self.loss: LossDescription | None = None  # its loss code, from the first step it was watched
        self.describe_tries = 0  # its steps measured with no loss code watched since the last step

    def end_step(self) -> None:
        self.measured_at = None
        self.skip = False


# ----------------------------------------------------------------------------- roots
class Root:
    """A model the script called at the top level, and the captures (one per guard) fed from its calls."""

    def __init__(self, module: nn.Module) -> None:
        self.ref = weakref.ref(module)
        model = getattr(module, "_orig_mod", module)  # torch.compile: replay and name the eager model
        self.model_ref = weakref.ref(model)
        self.captures: list[StepCapture] = []
        self.unused: StepCapture | None = None  # the capture waiting for the first guard
        self.kind: str | None = None  # "optimizer" or "manual", once its first backward is seen
        self.session: Session | None = None  # "manual": its session, once made
        self.union: nn.Module | None = None  # a Union of models (kept alive here: nobody else holds it)
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

    def take_capture(self, *, watch: bool = False) -> StepCapture:
        """The capture for a new guard of this model: the one fed since its first call, else a new one
        (``watch``: watching the loss code, as the first one does: a guard taking over the model's steps
        from another, a new optimizer over the same model)."""
        capture, self.unused = self.unused, None
        return capture if capture is not None else self.new_capture(watch=watch)


def summary_lines(session: Session) -> list[str]:
    guard = session.guard
    model = what_it_steps(guard)
    if session.manual:
        head = f"gradguard: hand-written update of {model}: {guard.step_count} steps measured (none can be skipped)"
    else:
        head = (
            f"gradguard: {type(guard.optimizer).__name__} on {model}: {guard.step_count} steps, "
            f"{guard.skipped_steps} skipped"
        )
    lines = [f"{head}. Run log: {guard.run_dir}"]
    log = runlog.read_run(guard.run_dir) if guard.run_dir is not None else None
    if session.script_clips and session.script_calls:
        mine = [r for r in log.metrics if r["step"] >= session.first_logged] if log is not None else None
        bound = (
            sum(clipped(r) for r in mine) if mine is not None else None
        )  # (not an appended log's earlier run)
        of = f"; it clipped {bound} of them" if bound is not None else ""
        lines.append(
            f"  the script called {' and '.join(session.script_calls)} on {session.script_clips} steps{of} "
            "(the log has the pre-clip norms)"
        )
    if log is None:
        return lines
    first = log.first_nonfinite()
    if first is not None:
        lead, at = nonfinite_where(first)
        where = ", ".join(
            f"{k}={at.get(k)}" for k in ("phase", "module", "op", "kind", "source") if at.get(k)
        )
        reason = (at.get("evidence") or {}).get("reason")
        lines.append(
            f"  first non-finite value at step {first['step']}: {f'{lead} ' if lead else ''}{where}"
            + (f" — {reason}" if reason else "")
            + f" (located by {at.get('located_by') or first.get('located_by')})"
        )
    return lines


def covers(params: list[Tensor], optimizer: torch.optim.Optimizer) -> bool:
    """Whether a clip call's gradients are exactly the optimizer's (its norm is then the guard's)."""
    mine = {id(p) for p in params if p.grad is not None}
    theirs = {id(p) for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
    return bool(mine) and mine == theirs


def all_optimizers() -> list[torch.optim.Optimizer]:
    """Every optimizer in the process: a walk over the objects the garbage collector tracks."""
    found = []
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: it reads __class__, which some objects warn or raise on
        if issubclass(kind, torch.optim.Optimizer) and not issubclass(kind, ManualUpdate):
            found.append(obj)
    return found
