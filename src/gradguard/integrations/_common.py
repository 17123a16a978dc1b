"""What the framework integrations share: flush listeners, record summaries, optimizer helpers, the step gate.

Stdlib and torch only; no framework is imported here.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import shlex
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradguard import runlog
from gradguard._distributed import same_on_all_ranks
from gradguard.errors import GradGuardError, did_you_mean
from gradguard.guard import Guard
from gradguard.runtable import clip_rate, post_clip_norm  # the one definition (re-exported)

__all__ = [
    "FlushListener",
    "StepGate",
    "add_flush_listener",
    "check_guard_kwargs",
    "clip_rate",
    "describe_optimizer",
    "drop_grads",
    "fresh_run_dir",
    "has_grads",
    "optimizer_run_dir",
    "post_clip_norm",
    "scalars_of",
    "stepped",
    "unwrap_optimizer",
    "what_it_steps",
    "write_report",
]

#: A callable that receives the host records of each flush (the rows of ``metrics.jsonl`` plus the
#: step flags), after the guard has written them and derived its events.
FlushListener = Callable[[list[dict[str, Any]]], None]

ListenerHandle = Any  # what Guard.add_flush_callback returns: an object with remove()


def add_flush_listener(guard: Guard, listener: FlushListener) -> ListenerHandle:
    """Call ``listener(records)`` at each flush of ``guard``, after the guard's own handling.

    The records are the host copies that the flush made anyway (one copy per ``every`` steps), so a
    listener adds no host sync; it still runs when the guard's own handling raises (an abort at
    flush), so the last steps reach the dashboards too. A thin check over
    :meth:`gradguard.Guard.add_flush_callback`.
    """
    if not isinstance(guard, Guard):
        raise GradGuardError(f"expected a gradguard.Guard, got {type(guard).__name__}.")
    return guard.add_flush_callback(listener)


def check_guard_kwargs(
    kwargs: Mapping[str, Any], who: str, *, set_here: Sequence[str], own: Iterable[str] = ()
) -> None:
    """Refuse, when an integration is built, the :class:`gradguard.Guard` options it cannot pass on: one
    it sets itself (``set_here``: the model, the optimizer…), or a key that is no Guard argument nor one
    of the integration's ``own`` (a typo, ``spike={...}``), with the valid keys named — not Guard's bare
    ``TypeError`` once training starts."""
    for key in set_here:
        if key in kwargs:
            raise GradGuardError(f"{who} sets {key!r} itself (from the Trainer); do not pass it.")
    known = (
        set(inspect.signature(Guard.__init__).parameters) - {"self", "model", "optimizer"} | set(own)
    ) - set(set_here)
    for key in kwargs:
        if key not in known:
            raise GradGuardError(
                f"{who}: unknown gradguard option {key!r}{did_you_mean(key, known)}; the options are "
                f"gradguard.Guard's arguments ({', '.join(sorted(known))})."
            )


# ----------------------------------------------------------------------------- records → scalars
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_KEYS = ("loss", "grad_norm", "clip_coef", "threshold", "lr", "loss_scale")
_FLAG_KEYS = ("skipped", "nonfinite", "spike", "amp_overflow")


def scalars_of(rec: dict[str, Any], *, layers: bool = True) -> Iterator[tuple[str, float]]:
    """``(name, value)`` pairs of one record for a dashboard: norms, clip, flags, per-layer numbers.

    ``grad_norm`` is the pre-clip norm, ``grad_norm_clipped`` the norm the optimizer stepped with.
    Non-finite values are kept (dashboards that drop them still get the ``nonfinite`` flag); values
    a step does not have (no loss scaler, no norm clipping) are left out.
    """
    for key in _KEYS:
        value = rec.get(key)
        if _finite(value) or (key in ("loss", "grad_norm") and isinstance(value, float)):
            yield key, float(value)  # type: ignore[arg-type]
    if isinstance(rec.get("grad_norm"), float):
        yield "grad_norm_clipped", post_clip_norm(rec)
    for key in _FLAG_KEYS:
        if key in rec:
            yield key, float(bool(rec[key]))
    if layers:
        for name, stats in (rec.get("layers") or {}).items():
            for field, value in stats.items():
                if isinstance(value, (int, float)):
                    yield f"layers/{name or '(root)'}/{field}", float(value)


def fresh_run_dir(root: str | os.PathLike[str], name: str) -> Path:
    """A new ``<root>/<time>-<name>`` run directory path, named once on rank 0 under torch.distributed."""
    return Path(str(same_on_all_ranks(str(runlog.default_run_dir(name, root=root)))))


# ----------------------------------------------------------------------------- several optimizers
def optimizer_run_dir(base: str | os.PathLike[str], k: int) -> Path:
    """Where the ``k``-th optimizer of a process (a GAN's, an actor-critic's) logs: ``base`` for the
    first, ``base/optimizer<k>`` for the others, which the first's ``meta.json`` lists as its
    ``children`` (:func:`describe_optimizer`): ``gradguard diagnose base`` reads them all and names
    the optimizer that failed."""
    return Path(base) if k == 0 else Path(base) / f"optimizer{k}"


def describe_optimizer(guard: Guard, root: Guard, k: int, kind: str, params: str) -> None:
    """``meta.json`` of the ``k``-th optimizer's run: which optimizer it is (``index``, ``class``
    ``kind``, the ``params`` it steps); the ``root`` run's (the first optimizer's, in the directory
    the user named) lists the others as ``children``, kept current."""
    if guard.writer is not None:
        guard.writer.update_meta(optimizer={"index": k, "class": kind, "params": params})
    if k > 0 and root.writer is not None:
        root.writer.update_meta(children=[optimizer_run_dir("", i).name for i in range(1, k + 1)])


_CONTAINERS = frozenset({"Sequential", "ModuleList", "ModuleDict"})  # classes that say nothing of a model


def stepped(model: torch.nn.Module, optimizer: torch.optim.Optimizer, variable: str | None = None) -> str:
    """What an optimizer steps, for meta.json and messages: the model's class, or the submodules
    (by name) that hold its parameters when it steps only part of the model. A container's class
    says nothing (a GAN's two ``nn.Sequential``): with ``variable``, the name the script gave the
    model comes first, ``netD (Sequential)``."""
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    name = type(model).__name__
    base = variable if variable and name in _CONTAINERS else None
    if all(id(p) in ids for p in model.parameters() if p.requires_grad):
        return f"{base} ({name})" if base else name
    parts = [n for n, child in model.named_children() if any(id(p) in ids for p in child.parameters())]
    return ", ".join(f"{base or name}.{n}" for n in parts) or name


def what_it_steps(guard: Guard) -> str:
    """What a guard's optimizer steps, as its run's meta.json says (:func:`stepped`), else the
    model's class: the one wording of the live lines, the summary and diagnose."""
    info = guard.writer.meta.get("optimizer") if guard.writer is not None else None
    params = info.get("params") if isinstance(info, dict) else None
    return str(params) if params else type(guard.model).__name__


# ----------------------------------------------------------------------------- optimizers
def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (Accelerate's, Lightning's)."""
    opt = optimizer
    for _ in range(8):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is opt:
            break
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer):
        raise GradGuardError(
            f"expected a torch.optim.Optimizer (or a wrapper with .optimizer), got {type(optimizer).__name__}."
        )
    return opt


def _params(optimizer: torch.optim.Optimizer) -> Iterator[Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def has_grads(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any parameter of ``optimizer`` has a gradient (host-side check, no sync)."""
    return any(p.grad is not None for p in _params(optimizer))


def drop_grads(optimizer: torch.optim.Optimizer) -> None:
    """Set every gradient to ``None``: a following ``optimizer.step()`` then leaves parameters and
    optimizer state bit-identical (zeroing would not: momentum and weight decay still move them)."""
    for p in _params(optimizer):
        p.grad = None


class StepGate:
    """The framework's own ``optimizer.step()``, skipped when the guard decided to skip the step.

    The integrations measure, clip and decide in a framework hook (:meth:`gradguard.Guard.before_step`)
    and let the framework take the one real optimizer step. The gate is that step: installed as the
    optimizer instance's ``step`` (what Lightning's precision plugins, ``GradScaler.step`` and
    Accelerate's optimizer wrapper call), it returns without stepping after :meth:`decide` ``(False)``.
    So a skipped step leaves parameters and optimizer state untouched, the optimizer's step pre/post
    hooks fire once per step taken (never for a skipped one), and the gradients stay as the guard left
    them for every later hook of the step.

    ``step(closure)`` (Lightning's plain precision plugin: the closure runs the backward pass and the
    ``on_before_optimizer_step`` hooks, where the guard decides) calls the closure first, then steps
    without it, and returns what the closure returned. An LR scheduler or Accelerate that wraps the
    gate later still goes through it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.active = True
        self._skip = False
        self._own = optimizer.__dict__.get("step")  # an instance wrapper already there (an LR scheduler's)
        self._inner: Callable[..., Any] = optimizer.step

        def step(opt: torch.optim.Optimizer, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            return self._step(closure, **kwargs)

        step._gradguard_gate = self  # type: ignore[attr-defined]
        if hasattr(self._inner, "_wrapped_by_lr_sched"):  # the scheduler's wrapper is still called
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self._bound = types.MethodType(step, optimizer)  # bound, as a scheduler wrapping it expects
        optimizer.step = self._bound  # type: ignore[method-assign]

    @classmethod
    def on(cls, optimizer: torch.optim.Optimizer) -> StepGate:
        """The gate on ``optimizer.step``, installed on first use (one per optimizer)."""
        gate = getattr(optimizer.step, "_gradguard_gate", None)  # wrappers made with functools.wraps keep it
        if not isinstance(gate, StepGate):
            gate = cls(optimizer)
        gate.active = True
        return gate

    def decide(self, take: bool) -> None:
        """Whether the framework's next ``optimizer.step()`` steps (what ``before_step`` returned)."""
        self._skip = not take

    def remove(self) -> None:
        """Give the optimizer its own ``step`` back (or pass every step through, if wrapped since)."""
        self.active, self._skip = False, False
        if self.optimizer.__dict__.get("step") is self._bound:
            if self._own is None:
                del self.optimizer.step
            else:
                self.optimizer.step = self._own  # type: ignore[method-assign]

    def _step(self, closure: Callable[[], Any] | None, **kwargs: Any) -> Any:
        if not self.active:
            return self._inner(closure, **kwargs)
        if closure is None:
            return self._inner(**kwargs) if self._take() else None
        self._skip = False  # decided inside the closure
        with torch.enable_grad():
            result = closure()
        if self._take():
            self._inner(**kwargs)
        return result

    def _take(self) -> bool:
        """The decision for this step; it holds for one step (a GradScaler overflow never calls step)."""
        skip, self._skip = self._skip, False
        return not skip


def write_report(run_dir: Path | None, mode: bool | None) -> Path | None:
    """Write ``report.html`` into ``run_dir`` at the end of a run (the ``report`` extra: plotly).

    ``mode``: ``True`` writes it or warns why not; ``None`` writes it when the report extra is
    installed (and warns only if drawing it fails); ``False`` never. It never raises: the run is over.
    """
    if run_dir is None or mode is False:
        return None
    try:
        report = importlib.import_module("gradguard.report")  # lazily: the core never needs plotly
        path: Path = report.write_report(run_dir)
        return path
    except Exception as e:  # a report that cannot be drawn must not fail a finished run
        if mode or not isinstance(e, ImportError):
            warnings.warn(
                f"gradguard could not write the HTML report of {run_dir}: {e}. Install the report extra "
                f'(pip install "gradguard[report]") or run `gradguard report {shlex.quote(str(run_dir))}` later.',
                UserWarning,
                stacklevel=3,
            )
        return None
