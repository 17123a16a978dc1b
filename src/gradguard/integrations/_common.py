"""What the framework integrations share: the flush listeners, record summaries, optimizer helpers.

Stdlib and torch only; no framework is imported here.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradguard import runlog
from gradguard._distributed import same_on_all_ranks
from gradguard.errors import GradGuardError
from gradguard.guard import Guard

__all__ = [
    "FlushListener",
    "MonitorOnly",
    "add_flush_listener",
    "clip_rate",
    "drop_grads",
    "fresh_run_dir",
    "has_grads",
    "post_clip_norm",
    "scalars_of",
    "unwrap_optimizer",
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


# ----------------------------------------------------------------------------- records → scalars
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def post_clip_norm(rec: dict[str, Any]) -> float:
    """The global norm after norm clipping: ``grad_norm × clip_coef`` (``grad_norm`` without one)."""
    norm, coef = rec.get("grad_norm", math.nan), rec.get("clip_coef", math.nan)
    return float(norm) * float(coef) if _finite(coef) else float(norm)


def _clipped(rec: dict[str, Any]) -> bool:
    coef = rec.get("clip_coef", math.nan)
    return _finite(coef) and coef < 1.0 and not rec.get("skipped")


def clip_rate(records: Iterable[dict[str, Any]]) -> float:
    """The fraction of the steps taken whose gradients norm clipping scaled down (NaN: no step)."""
    taken = [r for r in records if not r.get("skipped")]
    return sum(_clipped(r) for r in taken) / len(taken) if taken else math.nan


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


class MonitorOnly(torch.optim.Optimizer):
    """Stands for a framework's optimizer in a measure-only :class:`~gradguard.Guard`.

    It shares the optimizer's parameter groups (so the log has the live learning rate) and state,
    and its :meth:`step` does nothing: the framework clips and steps the real optimizer itself.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__: nothing is copied
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None

    def __repr__(self) -> str:
        return f"MonitorOnly({type(self.optimizer).__name__})"


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
                f'(pip install "gradguard[report]") or run `gradguard report {run_dir}` later.',
                UserWarning,
                stacklevel=3,
            )
        return None
