"""The guarded parameters: every parameter the optimizer steps, from the step it joins.

A parameter is guarded from the first step it has a gradient. Those that require grad at
construction are guarded from the start; the others wait:

* held by the optimizer but frozen at construction (``requires_grad=False``): progressive
  unfreezing flips ``requires_grad_(True)`` later;
* added to the optimizer later (``optimizer.add_param_group``).

:meth:`GuardedParams.joining` is called at every step and costs, on the hot path, one look at each
parameter group (is it the same list, of the same length?) and one ``grad is not None`` per
waiting parameter: no scan of the model, no device op. A parameter that has a gradient joins
before the step is measured, so its first gradient is measured, clipped and checked like any other.

The lists :attr:`GuardedParams.params`, :attr:`~GuardedParams.names` and
:attr:`~GuardedParams.named` grow in place: the parts that hold them (measure, apply, anomaly,
clipping) see the new parameters without being told.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradguard._guard.config import check_parameters, guarded_parameters

__all__ = ["GuardedParams"]

Named = tuple[str, nn.Parameter]


class GuardedParams:
    """The parameters of ``model`` that ``optimizer`` holds: those guarded, and those waiting.

    ``on_change`` is called when the optimizer's parameter groups change (the rollback snapshot
    no longer fits the optimizer).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.on_change = on_change
        self.root, guarded, self.waiting = guarded_parameters(model, optimizer)
        self.named: list[Named] = list(guarded)
        self.names: list[str] = [n for n, _ in guarded]
        self.params: list[nn.Parameter] = [p for _, p in guarded]
        self._groups = self._group_lists()

    def _group_lists(self) -> list[tuple[list[nn.Parameter], int]]:
        """Each parameter group's list and its length (what a change of the optimizer changes)."""
        return [(g["params"], len(g["params"])) for g in self.optimizer.param_groups]

    def _groups_changed(self) -> bool:
        """Whether the optimizer's groups changed since the last look (O(groups), no tensor touched)."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self._groups):
            return True
        for group, (seen, n) in zip(groups, self._groups):  # (a loop: cheaper than any() over a generator)
            if group["params"] is not seen or len(seen) != n:
                return True
        return False

    def _rescan(self) -> None:
        """The optimizer changed (the rare path): its new parameters wait for their first gradient."""
        held = check_parameters(self.root, (p for g in self.optimizer.param_groups for p in g["params"]))
        self._groups = self._group_lists()
        known = {id(p) for p in self.params} | {id(p) for _, p in self.waiting}
        self.waiting += [
            (n, p) for n, p in self.root.named_parameters() if id(p) in held and id(p) not in known
        ]
        if self.on_change is not None:
            self.on_change()

    def joining(self) -> list[Named]:
        """The waiting parameters that have a gradient now: they join (are appended to
        :attr:`params`) and are returned; ``[]`` at almost every step."""
        if self._groups_changed():
            self._rescan()
        if not self.waiting:
            return []
        ready = [(n, p) for n, p in self.waiting if p.grad is not None]
        if ready:
            self.waiting = [(n, p) for n, p in self.waiting if p.grad is None]
            self.named += ready
            self.names += [n for n, _ in ready]
            self.params += [p for _, p in ready]
        return ready
