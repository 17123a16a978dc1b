"""The run's metadata (``meta.json``) and its run log, opened once at construction.

``config.clip`` is the clipper's ``config()`` (a JSON-able dict: its kind and parameters, data for
the readers) or ``null``; ``config.clip_repr`` keeps the repr for humans.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import runlog
from gradguard._distributed import rank, same_on_all_ranks, world
from gradguard._guard.config import GuardConfig
from gradguard.clip import Clipper

__all__ = ["clip_config", "group_numbers", "open_run_log", "run_meta"]

#: Hyperparameters that may be held as 0-D tensors (a scheduler's tensor lr, a capturable Adam's).
_HYPER = frozenset(
    {
        "lr",
        "eps",
        "betas",
        "momentum",
        "weight_decay",
        "alpha",
        "rho",
        "lr_decay",
        "initial_accumulator_value",
    }
)


def clip_config(clipper: Clipper | None) -> dict[str, Any] | str | None:
    """The clipper as data: its ``config()``; its repr for a clipper without one."""
    if clipper is None:
        return None
    config = getattr(clipper, "config", None)
    return config() if callable(config) else repr(clipper)


def group_numbers(group: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an optimizer's parameter group (lr, eps, betas, momentum, weight_decay…):
    what ``meta.json`` keeps of each group and what an optimizer-step birth quotes. A 0-D tensor
    hyperparameter is read on the host (at the guard's start, or at a birth)."""
    out: dict[str, Any] = {}
    for key, value in group.items():
        if key == "params" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) or (
            isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value)
        ):
            out[key] = list(value) if isinstance(value, tuple) else value
        elif isinstance(value, Tensor) and value.numel() == 1 and key in _HYPER:
            out[key] = float(value)
    return out


def _main_dtype(named: Sequence[tuple[str, Tensor]]) -> str | None:
    """The dtype that holds most of the parameters' elements (``"bfloat16"`` for a model cast with
    ``.to(torch.bfloat16)``): diagnose's ``stalled`` reads it (updates below half an ulp are lost)."""
    count: dict[torch.dtype, int] = {}
    for _, p in named:
        count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return str(max(count, key=count.__getitem__)).replace("torch.", "") if count else None


def run_meta(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    named: Sequence[tuple[str, Tensor]],
    layers: list[str],
    fused: bool,
    allreduce_floats: int,
    config: GuardConfig,
    clipper: Clipper | None,
) -> dict[str, Any]:
    """What ``meta.json`` says about the run: the model, optimizer, layers and the guard's settings."""
    return {
        "torch_version": torch.__version__,
        "world_size": world(),
        "allreduce_floats_per_step": allreduce_floats,
        "model": type(model).__name__,
        "parameters": {n: list(p.shape) for n, p in named},
        "parameter_dtype": _main_dtype(named),
        "layers": layers,
        "optimizer": type(optimizer).__name__,
        "optimizer_groups": [group_numbers(g) for g in optimizer.param_groups],
        "fused": fused,
        "config": {"clip": clip_config(clipper), "clip_repr": repr(clipper), **config.as_meta()},
    }


def open_run_log(
    log_dir: str | os.PathLike[str] | None,
    name: str,
    meta: dict[str, Any],
    *,
    distributed: bool,
    exist_ok: bool,
    rank_logs: bool,
) -> runlog.RunWriter | None:
    """The run log (``None`` without ``log_dir``): rank 0 writes the job's; with ``rank_logs`` every
    other rank writes what it saw in ``<run dir>/ranks/rank<r>/``.

    ``log_dir="auto"``: rank 0 creates ``gradguard-runs/<time>-<name>`` (atomically: two guards
    started in the same second get two directories) and every rank learns its name.
    """
    if log_dir is None:
        return None
    if str(log_dir) == "auto":
        run_dir = runlog.default_run_dir(name, create=True) if rank() == 0 else Path()
    else:
        run_dir = Path(log_dir)
    if distributed:
        run_dir = Path(str(same_on_all_ranks(str(run_dir))))  # "auto" names it once, on rank 0
    if rank() == 0:
        return runlog.RunWriter(run_dir, meta, exist_ok=exist_ok)
    if rank_logs:
        return runlog.RunWriter(
            run_dir / "ranks" / f"rank{rank()}", {**meta, "rank": rank()}, exist_ok=exist_ok
        )
    return None
