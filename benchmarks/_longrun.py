"""The shared harness of the long training-outcome rows (``deepsad_long.py``, ``transformer_lr.py``).

A **task** builds, for a seed, a fresh model, its optimizer, a deterministic batch stream and a
loss; every **method** (a column) trains it from that same start for the same number of steps
through a real :class:`gradguard.Guard` (``guard.step(loss)`` where a user calls
``optimizer.step()``), so data, initialisation and budget are identical across columns:

* ``none`` and the task's fixed thresholds (``norm:k``): the ``clip=`` a user passes;
* ``auto``, ``zclip``, ``autoclip`` (AutoClip at the 10th percentile): gradguard's adaptive clippers;
* ``recover``: no clipping, ``on_explosion="recover"`` and ``on_nonfinite="rollback"`` (rewind to
  the last healthy snapshot when the norm takes off or a step goes non-finite);
* ``tune``: the threshold :func:`gradguard.tune.tune` verifies from the fresh start (its default
  candidates — a ladder of halvings from 4× the first norm, and no clipping — ``TUNE_STEPS`` steps
  each on the run's first batches), then trained from scratch with it; a seed where no candidate
  trained counts as a failure;
* ``tune lr`` (where the task sets ``lrs``): the learning rate :func:`gradguard.tune.tune` verifies
  among the task's candidates (``lrs=``, at the task's own clipping), then trained from scratch with it.

A run **succeeds** when it trains every step with no non-finite loss or gradient norm (for
``recover``: the guard never gave up; the steps it rolled back never reached the weights) and the
task's final metric ends at or below its target. Each run reads its loss on the host every step
(a CPU benchmark); the guard's own path is the library's.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gradguard
from gradguard.tune import tune

TUNE_STEPS = 60
ADAPTIVE = ["auto", "zclip", "autoclip:10"]


@dataclass
class Setup:
    """One seed's fresh start: the model, its optimizer, the batch stream and the loss of a batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[Any]
    loss_fn: Callable[[Any], Tensor]
    final: Callable[[list[float]], float]  # the final metric, from the training losses (and the model)


@dataclass
class Task:
    """A benchmark row: ``make(seed, optimizer, lr)`` builds a fresh :class:`Setup`."""

    name: str
    steps: int
    target: float
    metric: str
    make: Callable[[int, str, float], Setup]
    fixed: list[str]
    lrs: dict[str, list[float]] = field(default_factory=dict)  # the optimizer's LR candidates for ``tune lr``

    def methods(self, optimizer: str) -> list[str]:
        tail = ["tune lr"] if self.lrs.get(optimizer) else []
        return ["none", *self.fixed, *ADAPTIVE, "recover", "tune", *tail]


@dataclass
class Run:
    task: str
    optimizer: str
    lr: float
    method: str
    seed: int
    success: bool
    reason: str  # "ok", "target missed", "non-finite at step N", "aborted", "tune: nothing trained"
    steps: int
    final: float
    clip_rate: float
    recoveries: int
    chosen: str  # what tune chose ("norm:38", "lr=0.001"), else ""
    seconds: float


def run(task: Task, optimizer: str, lr: float, method: str, seed: int) -> Run:
    """One column of one seed: tune first where the method says so, then train from the fresh start."""
    start = time.perf_counter()
    clip, chosen, train_lr = method, "", lr
    if method in ("tune", "tune lr"):
        pick = _tuned(task, optimizer, lr, seed, lrs=task.lrs.get(optimizer) if method == "tune lr" else None)
        if pick is None:
            return Run(task.name, optimizer, lr, method, seed, False, "tune: nothing trained", 0,
                       math.nan, 0.0, 0, "", time.perf_counter() - start)  # fmt: skip
        clip, train_lr, chosen = pick
    setup = task.make(seed, optimizer, train_lr)
    out = _train(task, setup, clip)
    return Run(task.name, optimizer, lr, method, seed, *out, chosen, time.perf_counter() - start)


def _tuned(
    task: Task, optimizer: str, lr: float, seed: int, lrs: list[float] | None
) -> tuple[str, float, str] | None:
    """What :func:`gradguard.tune.tune` verifies from the fresh start: ``(clip, lr, label)``, or ``None``."""
    setup = task.make(seed, optimizer, lr)
    options: dict[str, Any] = {"lrs": lrs, "max_norms": [None]} if lrs else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tune(setup.model, setup.optimizer, setup.loss_fn, setup.batches, steps=TUNE_STEPS, **options)
    rec = result.recommended
    if rec is None:
        return None
    if lrs:
        return "none", float(rec.lr if rec.lr is not None else lr), f"lr={rec.lr:g}"
    clip = "none" if rec.max_norm is None else f"norm:{rec.max_norm:g}"
    return clip, lr, clip


def _train(task: Task, s: Setup, method: str) -> tuple[bool, str, int, float, float, int]:
    """``(success, reason, steps, final metric, clip rate, recoveries)`` of one guarded run."""
    recover = method == "recover"
    extra: dict[str, Any] = {"on_explosion": "recover", "on_nonfinite": "rollback"} if recover else {}
    clip = None if method in ("none", "recover") else method
    fractions: list[float] = []
    losses: list[float] = []
    reason, step = "ok", 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = gradguard.Guard(
            s.model, s.optimizer, clip=clip, locate=False, weight_every=None, on_spike="ignore", **extra
        )
        guard.add_flush_callback(lambda records: fractions.extend(_fractions(records)))
        try:
            for step in range(task.steps):
                s.optimizer.zero_grad(set_to_none=True)
                loss = s.loss_fn(next(s.batches))
                loss.backward()
                guard.step(loss)
                value, norm = float(loss.detach()), guard.last_grad_norm
                finite = math.isfinite(value) and norm is not None and math.isfinite(float(norm))
                if not finite and not recover:
                    reason = f"non-finite at step {step}"
                    break
                if finite:
                    losses.append(value)
        except gradguard.NonFiniteError:
            reason = "aborted"
        finally:
            recoveries = _recoveries(guard)
            guard.close()
    done = step + 1 if reason == "ok" else step
    final = s.final(losses) if reason == "ok" and losses else math.nan
    if reason == "ok" and not final <= task.target:
        reason = "target missed"
    rate = statistics.fmean(fractions) if fractions else 0.0
    return reason == "ok", reason, done, final, rate, recoveries


def _recoveries(guard: gradguard.Guard) -> int:
    """Explosion rewinds the guard made (0 for the other methods)."""
    return int(guard._explosions.recoveries)


def _fractions(records: list[dict[str, Any]]) -> list[float]:
    """The recorded ``clip_fraction`` of each step (1.0 clipped, 0.0 not), where there is one."""
    return [
        float(f)
        for r in records
        if isinstance(f := r.get("clip_fraction"), (int, float)) and math.isfinite(f)
    ]


def mean_tail(n: int) -> Callable[[list[float]], float]:
    """The final metric "mean training loss of the last ``n`` steps"."""
    return lambda losses: statistics.fmean(losses[-n:])


# ------------------------------------------------------------------------------------------ tables
def table(runs: list[Run], task: Task) -> str:
    """A markdown table per (optimizer, lr): successes per method, the final metric range, clip rate."""
    lines: list[str] = []
    for opt, lr in dict.fromkeys((r.optimizer, r.lr) for r in runs):
        rs = [r for r in runs if (r.optimizer, r.lr) == (opt, lr)]
        lines += [
            f"\n{task.name}, {opt} lr {lr:g}, {task.steps} steps, target: {task.metric} ≤ {task.target:g}\n",
            f"| method | successes | {task.metric} (per seed) | clipped | notes |",
            "|---|---|---|---|---|",
        ]
        for method in dict.fromkeys(r.method for r in rs):
            sub = [r for r in rs if r.method == method]
            wins = sum(r.success for r in sub)
            finals = ", ".join(_fmt(r) for r in sub)
            rate = statistics.fmean(r.clip_rate for r in sub)
            quiet = ("ok", "target missed", "non-finite")  # the per-seed column shows these
            notes = "; ".join(sorted({r.reason for r in sub if not r.reason.startswith(quiet)}))
            chosen = ", ".join(r.chosen for r in sub if r.chosen)
            rec = sum(r.recoveries for r in sub)
            extra = "; ".join(
                x
                for x in (notes, f"chose {chosen}" if chosen else "", f"{rec} recoveries" if rec else "")
                if x
            )
            lines += [f"| {method} | {wins}/{len(sub)} | {finals} | {rate:.0%} | {extra} |"]
    return "\n".join(lines)


def _fmt(r: Run) -> str:
    if math.isfinite(r.final):
        return f"{r.final:.3g}"
    return "—" if r.reason.startswith("tune") else f"NaN@{r.steps}"
