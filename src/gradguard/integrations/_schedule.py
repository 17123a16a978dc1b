"""An LR scheduler held on the steps the guard skipped (the Trainer integrations share it).

A skipped step is a step that did not happen: the weights and the optimizer state stay as they
were, and so should the learning-rate schedule, as Accelerate (and so the Hugging Face Trainer)
holds it on an fp16 overflow. Lightning and the Trainer step their scheduler after every optimizer
step whatever the guard decided; :class:`HeldScheduler` stands in for the scheduler and lets
``step()`` through only when no step was skipped since the last one. A ``ReduceLROnPlateau``
(stepped on a metric, not on optimizer steps) is left as it is.

Stdlib and torch only; no framework is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["HeldScheduler", "holds"]


class HeldScheduler:
    """The scheduler, except that ``step()`` does nothing when ``skipped()`` says a step was
    skipped since the last one (``skipped`` also forgets it). Everything else (``state_dict``,
    ``get_last_lr``, ``optimizer``…) is the scheduler's own, so checkpoints hold what they hold
    without gradguard.

    Args:
        scheduler: the framework's LR scheduler.
        skipped: answers, and resets, whether the guard skipped a step of the scheduler's optimizer
            since the scheduler last stepped (a host bool: no device read).
    """

    def __init__(self, scheduler: Any, skipped: Callable[[], bool]) -> None:
        self.scheduler = scheduler
        self._skipped = skipped

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if self._skipped():
            return None
        return self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


def holds(scheduler: Any) -> bool:
    """Whether ``scheduler`` should be held on skipped steps: one that follows optimizer steps (not a
    ``ReduceLROnPlateau``) and is not held already."""
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    return scheduler is not None and not isinstance(scheduler, (HeldScheduler, plateau))
