"""The post-step work of a step the caller takes (``Guard.before_step``), run after its ``optimizer.step()``.

``before_step`` measures, clips and decides; the caller then steps the optimizer. What needs the
weights *after* the step cannot run inside ``before_step``: the update ratios of a ``weight_every``
step would measure an update of 0, and the ``rollback`` snapshot would hold the state before the
step. So ``before_step``, when it returns ``True``, arms :class:`AfterStep` with that work, and a
step post-hook on the optimizer runs it once, right after the caller's next ``step()``.

The integrations step exactly once per taken step (their ``StepGate``); the zero-code runner calls
``before_step`` from the optimizer's step pre-hook, so the step follows at once. A caller that does
not step before the next ``before_step`` / ``step``, ``load_state_dict`` or ``close`` loses the
work (:meth:`AfterStep.drop`): that step's record has no weight norms or update ratios, and no
snapshot is taken for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["AfterStep"]


class AfterStep:
    """Work to run once, right after the optimizer's next ``step()``.

    One step post-hook, registered on the optimizer at the first :meth:`arm` and kept until
    :meth:`close` (a hook cannot take itself out while torch runs the hooks): between armed steps
    it finds nothing to do.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._work: Callable[[], None] | None = None
        self._handle: RemovableHandle | None = None

    @property
    def armed(self) -> bool:
        """Whether work waits for the optimizer's next step."""
        return self._work is not None

    def arm(self, work: Callable[[], None]) -> None:
        """Run ``work`` once, after the optimizer's next ``step()`` (work armed before is dropped)."""
        if self._handle is None:
            self._handle = self.optimizer.register_step_post_hook(self._after_step)
        self._work = work

    def drop(self) -> None:
        """Forget the armed work: the caller did not step."""
        self._work = None

    def close(self) -> None:
        """Drop the armed work and take the hook off the optimizer."""
        self._work = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        work, self._work = self._work, None  # once: a later step has nothing to do
        if work is not None:
            work()
