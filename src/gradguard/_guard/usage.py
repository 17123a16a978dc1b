"""Two slips of a loop that adopts ``guard.step(loss)``, each said once, on the user's line.

* The loop's own ``optimizer.step()`` kept after ``guard.step(loss)``: every step is taken twice (the
  same gradient applied again), and a step the guard skipped is applied anyway — the weights go NaN
  under ``on_nonfinite="skip"`` (a field loop: Adam's step count 16 against 10 guarded steps). A step
  post-hook on the optimizer, registered at the first :meth:`Usage.enter`, counts the steps taken
  outside ``guard.step``; the first one is warned of at once.
* ``guard.step`` called again on the loss it already stepped (no ``backward()`` between): the same
  gradient applied twice. The last loss is kept by weak reference.

Cost a step: a Python hook call and two attribute writes. Only :meth:`gradguard.Guard.step` enters:
``before_step`` (Lightning, the HF Trainer, ``gradguard run``) leaves the optimizer's step to its caller.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["Usage", "stepping"]

#: the optimizers gradguard is stepping now (by id; two guards over one optimizer see each other's steps,
#: tune's trials step the guarded optimizer)
_STEPPING: dict[int, int] = {}


@contextlib.contextmanager
def stepping(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """gradguard's own steps of ``optimizer`` (a guard's, a tuning trial's): not the loop's."""
    _begin(id(optimizer))
    try:
        yield
    finally:
        _end(id(optimizer))


def _begin(key: int) -> None:
    _STEPPING[key] = _STEPPING.get(key, 0) + 1


def _end(key: int) -> None:
    left = _STEPPING.get(key, 0) - 1
    if left > 0:
        _STEPPING[key] = left
    else:
        _STEPPING.pop(key, None)


class Usage:
    """Watches one guard's optimizer for steps outside ``guard.step`` and ``guard.step`` for a loss
    stepped twice. ``warn(message)`` says each slip once (a warning at the user's line)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warn: Callable[[str], None]) -> None:
        self.optimizer = optimizer
        self._warn = warn
        self._handle: Any = None
        self._said: set[str] = set()
        self._last: weakref.ref[Tensor] | None = None

    def enter(self, loss: Any) -> None:
        """``guard.step(loss)`` begins (``loss``: what it was passed; a closure's is not judged)."""
        if self._handle is None:
            self._handle = self.optimizer.register_step_post_hook(self._after_step)
        if isinstance(loss, Tensor):
            if self._last is not None and self._last() is loss:
                self._once(
                    "twice",
                    "guard.step(loss) was called again on the loss it already stepped, with no backward() "
                    "between: the same gradients are applied twice. Call guard.step(loss) once per backward().",
                )
            self._last = weakref.ref(loss)
        _begin(id(self.optimizer))  # (two dict writes a step: no context-manager object on the hot path)

    def leave(self) -> None:
        _end(id(self.optimizer))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) not in _STEPPING:
            self._once(
                "outside",
                f"{type(optimizer).__name__}.step() was called outside guard.step(): guard.step(loss) already "
                "steps the optimizer, so every step is taken twice, and a step the guard skipped is applied "
                "anyway. Remove the loop's own optimizer.step() (and its clip_grad_norm_) where guard.step(loss) "
                "was added.",
            )

    def _once(self, kind: str, message: str) -> None:
        if kind not in self._said:
            self._said.add(kind)
            self._warn(message)
