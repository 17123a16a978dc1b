"""Non-finite values born inside ``optimizer.step()``: found at the step that wrote them.

A hand-written optimizer that divides by a norm that can be 0, or Adam with ``eps=0`` on a
parameter whose second moment is still 0, writes NaN into the weights *from finite gradients*.
Nothing on that step looks wrong (the loss and gradients were finite); the NaN shows up a step — or
many steps — later, in an op that only passed it on. So after every optimizer step the guard
takes, a step post-hook measures the guarded parameters' L2 norms (one foreach pass over the
weights; NaN and ±inf propagate through it) into a small device vector: no host read. The vectors
are read at the next flush, which syncs anyway (:meth:`OptimizerBirths.found`): the first step
whose weights turned non-finite while its gradients were finite (its record says so) is a birth in
the optimizer, reported for that step with the optimizer's class and the parameters it wrote.
Weights written between steps by anything else (the script, a rollback) move their version
counters: they are checked again before the next optimizer step, so a value written there is
never blamed on the optimizer (the first step is checked before, too).

Cost on a healthy step: one ``torch._foreach_norm`` over the weights (memory traffic of one read
of the weights), one ``stack``, and two reads of each weight's version counter (host ints); a
host read of ``steps × parameters`` floats per flush.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradguard import events
from gradguard.errors import GradGuardError
from gradguard.stats import layer_name, tensor_norms

__all__ = ["OptimizerBirths"]

_MAX_NAMED = 20  # parameters named in the event
_HYPER = (
    "lr",
    "eps",
    "betas",
    "momentum",
    "weight_decay",
    "alpha",
    "rho",
    "lr_decay",
    "initial_accumulator_value",
)


class OptimizerBirths:
    """Checks the weights after each optimizer step the guard takes; reports the first birth there.

    Args:
        optimizer: the guarded optimizer (a step post-hook goes on it until :meth:`close`).
        named: the guarded ``(name, parameter)`` pairs (the guard's list: it grows as parameters join).
        active: check at all (not under torch.distributed, where a rank holds shards).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named: Sequence[tuple[str, nn.Parameter]],
        *,
        active: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self.named = named
        self._step: int | None = None  # the guard step whose optimizer step comes next
        self._checks: list[tuple[int, int, Tensor, bool]] = []  # (step, n, L2 norm per parameter, after)
        self._versions: list[int] | None = None  # the weights' versions at the last check
        self._done = not active  # a birth was reported (or the weights went non-finite otherwise): stop
        self._handle: RemovableHandle | None = (
            optimizer.register_step_post_hook(self._after_step) if active else None
        )

    def begin(self, step: int) -> None:
        """The guard's step ``step`` starts: the optimizer step that follows (if taken) is checked.

        If something other than the optimizer wrote the weights since the last check (the script,
        a rollback; the first step: nothing checked yet) — their version counters moved — they are
        checked now too, so that a value written there is never blamed on the optimizer."""
        self._step = step
        if self._done or not self.named:
            return
        if self._versions != [p._version for _, p in self.named]:
            self._check(step, after=False)

    def _check(self, step: int, *, after: bool) -> None:
        """Measure the weights' L2 norms (a device vector, no host read) and their versions.

        L2: NaN and ±inf propagate, and it is the one norm with a single fast foreach kernel on
        every device (the inf or L1 norm cost 5× more on a CPU). A finite weight above ~1e19 also
        overflows it: a birth is confirmed on the weight itself before it is reported."""
        params = [p for _, p in self.named]
        try:
            with torch.no_grad():  # (no graph: the parameters need no detach)
                norms = tensor_norms(params, 2.0)  # no host read
        except GradGuardError:  # parameters on several devices: not checked
            self._done = True
            return
        self._versions = [p._version for _, p in self.named]
        if not norms.is_meta:
            self._checks.append((step, len(params), norms, after))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        step, self._step = self._step, None  # once per guard step (LBFGS's line search steps once too)
        if step is None or self._done or not self.named:
            return
        self._check(step, after=True)

    def found(self, records: Iterable[Mapping[str, Any]]) -> list[events.Event]:
        """At a flush (one host read of the pending checks): the ``nonfinite`` event of the first step
        whose optimizer step made a weight non-finite from finite gradients (a list of one), or ``[]``.

        ``records``: the flushed records (a step whose loss or gradients were non-finite passed its
        NaN on through the update: that is not the optimizer's birth)."""
        checks, self._checks = self._checks, []
        if not checks or self._done:
            return []
        bad_steps = {r["step"] for r in records if r.get("nonfinite")}
        # host sync: at the flush, right after the monitor's own copy (the device is idle)
        rows = torch.cat([v.double() for _, _, v, _ in checks]).tolist()
        at = 0
        for step, n, _, after in checks:
            row, at = rows[at : at + n], at + n
            bad = [i for i, x in enumerate(row) if not math.isfinite(x)]
            if not bad:
                continue
            self._done = True  # report the first only: after it the weights stay non-finite
            if not after or step in bad_steps:
                return []  # written outside the optimizer, or passed on from non-finite gradients
            names = [self.named[i][0] for i in bad if not _finite(self.named[i][1])]
            return [self._event(step, names, row[bad[0]])] if names else []
        return []

    def _event(self, step: int, names: list[str], value: float) -> events.Event:
        """The ``nonfinite`` event of a birth in the optimizer: which optimizer, which parameters."""
        cls = type(self.optimizer)
        kind = _kind(dict(self.named)[names[0]], value)
        hyper = self._hyperparameters(names[0])
        custom = not cls.__module__.startswith("torch.")
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        reason = (
            f"inside optimizer.step(): {cls.__name__}.step() wrote {kind} into {names[0]}{more}, whose gradients "
            f"and previous values were finite"
        )
        evidence = {
            "reason": reason,
            "optimizer": cls.__name__,
            "custom_optimizer": custom,
            "parameters": names[:_MAX_NAMED],
            "hyperparameters": hyper,
        }
        return events.nonfinite(
            step,
            phase="optimizer",
            module=layer_name(names[0]),
            tensor="param",
            kind=kind,
            located_by="check",
            optimizer=cls.__name__,
            parameters=names[:_MAX_NAMED],
            parameters_nonfinite=len(names),
            evidence=evidence,
        )

    def _hyperparameters(self, name: str) -> dict[str, Any]:
        """The numbers of the parameter group that holds ``name`` (lr, eps, betas…)."""
        param = dict(self.named).get(name)
        group = next((g for g in self.optimizer.param_groups if any(p is param for p in g["params"])), None)
        if group is None:
            return {}
        out: dict[str, Any] = {}
        for key, value in group.items():
            if key == "params" or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) or (
                isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value)
            ):
                out[key] = list(value) if isinstance(value, tuple) else value
            elif isinstance(value, Tensor) and value.numel() == 1 and key in _HYPER:
                out[key] = float(value)  # host read: at a birth only
        return out

    def close(self) -> None:
        """Take the hook off the optimizer (pending checks are read by the last flush first)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _finite(param: Tensor) -> bool:
    """Whether every value of ``param`` is finite now (host read: at a birth only)."""
    with torch.no_grad():
        return bool(torch.isfinite(param).all())


def _kind(param: Tensor, norm: float) -> str:
    """What the parameter holds now: ``nan``, ``inf`` or ``-inf`` (host reads: at a birth only); the
    kind of its norm if it was written again since."""
    with torch.no_grad():
        if bool(torch.isnan(param).any()):
            return "nan"
        if bool((param == -math.inf).any()) and not bool((param == math.inf).any()):
            return "-inf"
    return events.kind_of(norm)
