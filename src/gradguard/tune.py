"""Advice verified before it is given: a short counterfactual from an in-memory snapshot.

In the spirit of an LR finder: :func:`tune` copies the model's and the optimizer's state (and the
RNG) once, then for each candidate — a global-norm ``max_norm`` (``None``: no clipping) and/or a
learning rate — restores that copy and trains a few dozen steps on the same batches, recording
each step's loss and pre-clip norm. Each trial is judged by :func:`gradguard.tunelog.judge` (finite?
exploded, as :func:`gradguard.runtable.climb_onset` defines it? did the loss fall?) and the
recommendation is :func:`gradguard.tunelog.choose`'s. Afterwards the model, the optimizer, the
gradients, the learning rates and the RNG are exactly as they were (bit for bit): tuning changes
nothing but what you know.

Example::

    batches = [next(it) for _ in range(40)]
    loss_of = lambda b: loss_fn(model(b[0]), b[1])
    result = gradguard.tune.tune(model, optimizer, loss_of, batches, max_norms=[0.5, 1, 2, 5, None])
    print(result.summary())          # per-candidate evidence, then the verified recommendation
    result.max_norm                  # e.g. 1.0 (None: nothing to clip, or nothing trained)
    gradguard.tune.tune(model, optimizer, loss_of, batches, lrs=[1e-3, 3e-4, 1e-4]).lr   # a verified learning rate

Every step reads its loss and norm on the host: tuning is a short, deliberate detour, not the hot path.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradguard._guard.usage import stepping
from gradguard.clip import clip_grad_norm_, get_total_norm
from gradguard.errors import GradGuardError
from gradguard.tunelog import Trial, TuneResult, candidates_around, explosion_onset, judge

__all__ = ["Snapshot", "tune"]


class Snapshot:
    """The state a trial starts from and the caller gets back: parameters and buffers, the
    optimizer's state and learning rates, the gradients, and the RNG (Python, torch CPU and CUDA)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.opt_state = copy.deepcopy(optimizer.state_dict())
        self.lrs = [g["lr"] for g in optimizer.param_groups]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]
        self.modes = [(m, m.training) for m in model.modules()]
        self.rng = (
            random.getstate(),
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        )

    def restore(self) -> None:
        """Put everything back as it was when the snapshot was taken."""
        with torch.no_grad():
            self.model.load_state_dict(self.weights)
        self.optimizer.load_state_dict(copy.deepcopy(self.opt_state))  # keep the snapshot intact
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr
        for p, g in self.grads:
            p.grad = None if g is None else g.clone()
        for m, mode in self.modes:
            m.training = mode
        py, cpu, cuda = self.rng
        random.setstate(py)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def tune(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., Tensor],
    batches: Iterable[Any] | None = None,
    *,
    max_norms: Sequence[float | None] | None = None,
    lrs: Sequence[float] | None = None,
    steps: int = 30,
    reset: Callable[[], None] | None = None,
    norm_type: float = 2.0,
) -> TuneResult:
    """Try each candidate for ``steps`` steps from the same state on the same batches; keep the one that trains.

    Args:
        model: the model (trained in place during a trial, restored after).
        optimizer: its optimizer (stepped during a trial, restored after).
        loss_fn: the forward pass and the loss of one batch: ``loss_fn(batch)``, or ``loss_fn()``
            when ``batches`` is ``None`` (the closure fetches its own data; the RNG is restored
            before each trial, so random batches repeat).
        batches: where the trial's batches come from: the first ``steps`` are taken once and
            replayed for every candidate (a list, a DataLoader, a generator).
        max_norms: global-norm thresholds to try (``None`` in the list: no clipping). Default:
            a ladder of halvings from 4× the first batch's pre-clip norm down to 1/512× of it, and
            no clipping; with ``lrs`` and no ``max_norms``: no clipping only (the rates are the candidates).
        lrs: learning rates to try (each candidate threshold at each rate); the optimizer's largest
            group rate becomes this one, the other groups keep their ratio to it. Default: the
            optimizer's own. The recommended rate is :attr:`TuneResult.lr`.
        steps: optimizer steps per trial (a few dozen: enough for an explosion to show).
        reset: called before each trial (e.g. to forget an RNN's carried hidden state).
        norm_type: the p of the global norm.

    Returns:
        A :class:`gradguard.tunelog.TuneResult`: per-candidate evidence (:attr:`~TuneResult.trials`)
        and the verified recommendation (:attr:`~TuneResult.recommended`; ``None`` when none of the
        candidates trained).

    Raises:
        GradGuardError: a bad argument (the message says which and how to fix it), or a
            ``loss_fn`` that does not return a scalar tensor.
    """
    _check(steps, max_norms, lrs)
    data = _take(batches, steps)
    snap = Snapshot(model, optimizer)
    try:
        thresholds: list[float | None]
        if max_norms is not None:
            thresholds = list(max_norms)
        elif lrs is not None:
            thresholds = [None]  # the rates are the candidates
        else:
            thresholds = _default_max_norms(snap, loss_fn, data, norm_type)
        rates: list[float | None] = list(lrs) if lrs is not None else [None]
        trials: list[Trial] = []
        for max_norm, lr in itertools.product(thresholds, rates):
            snap.restore()
            if reset is not None:
                reset()
            trials.append(_trial(snap, loss_fn, data, steps, max_norm, lr, norm_type))
    finally:
        snap.restore()
    return TuneResult(trials, steps, source="memory")


def _check(steps: int, max_norms: Sequence[float | None] | None, lrs: Sequence[float] | None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise GradGuardError(f"tune: steps must be an int ≥ 2 (a few dozen is typical), got {steps!r}.")
    for name, values, allow_none in (("max_norms", max_norms, True), ("lrs", lrs, False)):
        if values is None:
            continue
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise GradGuardError(f"tune: {name} must be a non-empty list of numbers, got {values!r}.")
        for v in values:
            if v is None and allow_none:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                what = (
                    "a positive finite number (or None: no clipping)"
                    if allow_none
                    else "a positive finite number"
                )
                raise GradGuardError(
                    f"tune: every entry of {name} must be {what}, got {v!r} in {list(values)!r}."
                )


def _take(batches: Iterable[Any] | None, steps: int) -> list[Any] | None:
    """The first ``steps`` batches, kept for every trial (``None``: the closure fetches its own)."""
    if batches is None:
        return None
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise GradGuardError(
            f"tune: batches must be an iterable of batches (a list, a DataLoader) or None, got {type(batches).__name__}."
        )
    data = list(itertools.islice(iter(batches), steps))
    if len(data) < steps:
        raise GradGuardError(
            f"tune: batches gave {len(data)} batches, fewer than steps={steps}; pass more batches or lower steps."
        )
    return data


def _loss(loss_fn: Callable[..., Tensor], data: list[Any] | None, i: int) -> Tensor:
    loss = loss_fn() if data is None else loss_fn(data[i])
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise GradGuardError(
            f"tune: loss_fn must return the loss as a one-element tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
            + "; return e.g. criterion(model(x), y)."
        )
    return loss


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _default_max_norms(
    snap: Snapshot, loss_fn: Callable[..., Tensor], data: list[Any] | None, norm_type: float
) -> list[float | None]:
    """Thresholds around the first batch's pre-clip norm, and no clipping (then the state is restored)."""
    snap.optimizer.zero_grad(set_to_none=True)
    _loss(loss_fn, data, 0).backward()
    grads = [p.grad for p in _params(snap.optimizer) if p.grad is not None]
    norm = float(get_total_norm(grads, norm_type))  # host sync: tuning, not a training step
    snap.restore()
    return [*candidates_around(norm), None]


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, base: Sequence[Any]) -> None:
    """The largest group rate becomes ``lr``; the others keep their ratio to it."""
    top = max(float(x) for x in base)
    for group, old in zip(optimizer.param_groups, base):
        group["lr"] = lr * float(old) / top if top > 0 else lr


def _trial(
    snap: Snapshot,
    loss_fn: Callable[..., Tensor],
    data: list[Any] | None,
    steps: int,
    max_norm: float | None,
    lr: float | None,
    norm_type: float,
) -> Trial:
    """Train one candidate ``steps`` steps (stopping at a non-finite step); its judged evidence."""
    optimizer = snap.optimizer
    if lr is not None:
        _set_lr(optimizer, lr, snap.lrs)
    params = _params(optimizer)
    losses: list[float] = []
    norms: list[float] = []
    snap.model.train()
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(loss_fn, data, i)
        loss.backward()
        grads = [p for p in params if p.grad is not None]
        if max_norm is None:
            norm = get_total_norm([p.grad for p in grads if p.grad is not None], norm_type)
        else:
            norm = clip_grad_norm_(grads, max_norm, norm_type)
        losses.append(float(loss.detach()))
        norms.append(float(norm))  # host sync: a tuning trial, not a training step
        if not (math.isfinite(losses[-1]) and math.isfinite(norms[-1])):
            break  # never step on a non-finite gradient: the trial has failed
        if explosion_onset([g for g in norms if g > 0]) is not None:
            break  # exploded: the verdict is in
        with stepping(optimizer):  # (a trial's step: not a loop's step outside an open guard's)
            optimizer.step()
    return judge(max_norm, lr, losses, norms)
