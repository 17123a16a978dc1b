"""What ``gradguard run`` says on stderr while the script runs: the first non-finite or skipped
step and the first gradient-norm spike at once, then at most every :data:`LIVE_EVERY_S` seconds
while it lasts (rank 0 only under torchrun)."""

from __future__ import annotations

import collections
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from gradguard import runlog
from gradguard.events import nonfinite_where
from gradguard.guard import Guard
from gradguard.integrations._common import what_it_steps
from gradguard.integrations.zerocode.sessions import ManualUpdate

__all__ = ["LIVE_EVERY_S", "Live", "rank"]

LIVE_EVERY_S = 30.0  #: at most one live stderr line per this many seconds while a problem lasts
SPIKE_SAID = 5.0  #: a spike is said live when its norm is at least this many times the recent median
_RECENT = 50  # the norms the median of a spike's line is taken over


# ----------------------------------------------------------------------------- live lines
class Live:
    """stderr lines while the run goes: the first bad step and spike at once, then rate-limited."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._recent: dict[int, collections.deque[float]] = {}  # each guard's last finite norms

    def _line(self, key: str, first: Callable[[], str], again: Callable[[int], str]) -> None:
        """The first occurrence of ``key`` at once; then a count at most every :data:`LIVE_EVERY_S`."""
        if not self.enabled or rank() != 0:
            return
        n = self._count[key] = self._count.get(key, 0) + 1
        now = time.monotonic()
        if n == 1:
            message = first()
        elif now - self._last.get(key, 0.0) >= LIVE_EVERY_S:
            message = again(n)
        else:
            return
        self._last[key] = now
        print(f"gradguard: {message}", file=sys.stderr, flush=True)

    def bad_step(self, guard: Guard) -> None:
        """A step the guard decided on the host was bad (skipped, rolled back, or not skippable)."""
        step = guard.step_count - 1
        norm = guard.last_grad_norm
        finite = guard.last_step_nonfinite is not True and norm is not None and math.isfinite(float(norm))
        if (
            finite
        ):  # (host sync: a bad step, decided on the host) not taken: an explosion's onset, rolled back
            self._line(
                f"explosion{id(guard)}",
                lambda: (
                    f"step {step} of {_name(guard)} was not taken: its gradient norm took off (on_explosion="
                    f"{guard.on_explosion!r}); its values were finite."
                ),
                lambda n: (
                    f"{n} steps not taken so far (last: step {step}); `gradguard diagnose {shlex.quote(str(guard.run_dir))}`."
                ),
            )
            return
        self._line(
            f"bad{id(guard)}",
            lambda: (
                f"step {step} of {_name(guard)} is not finite{_where(guard)}: "
                + ("measured only." if isinstance(guard.optimizer, ManualUpdate) else f"{_policy(guard)}.")
            ),
            lambda n: (
                f"{n} bad steps so far (last: step {step}); `gradguard diagnose {shlex.quote(str(guard.run_dir))}` explains."
            ),
        )

    def flushed(self, guard: Guard, *, framework: bool = False) -> Callable[[list[dict[str, Any]]], None]:
        """A flush callback: non-finite steps the host learns of at a flush, and norm spikes. A framework's
        guard (its Trainer's callback decides each step, and the runner never sees it: :meth:`bad_step` is
        not called) has its decided bad steps said here too."""

        recent = self._recent.setdefault(id(guard), collections.deque(maxlen=_RECENT))

        def seen(records: list[dict[str, Any]]) -> None:
            for rec in records:
                if rec.get("nonfinite") and (framework or not rec.get("_decided")):
                    self._nonfinite_at_flush(guard, rec["step"])
                norm = rec.get("grad_norm")
                if not isinstance(norm, float) or not _finite(norm):
                    continue
                typical = statistics.median(recent) if recent else 0.0
                if rec.get("spike") and typical > 0:  # (a median of 0: most steps had no gradient — a
                    self._spike(guard, rec["step"], norm, norm / typical)  # hinge loss met — no scale to say)
                recent.append(norm)

        return seen

    def _nonfinite_at_flush(self, guard: Guard, step: int) -> None:
        self._line(
            f"bad{id(guard)}",
            lambda: f"step {step} of {_name(guard)} is not finite{_where(guard)}.",
            lambda n: f"{n} non-finite steps so far (last: step {step}).",
        )

    def _spike(self, guard: Guard, step: int, norm: float, ratio: float) -> None:
        """A norm the spike rule flagged: said when it is :data:`SPIKE_SAID` × the recent median or
        more (the rule flags a 1.6× blip after a quiet start; the run log keeps every flag)."""
        if ratio < SPIKE_SAID:
            return
        self._line(
            f"spike{id(guard)}",
            lambda: (
                f"gradient norm spike at step {step} of {_name(guard)}: {norm:.4g}, {ratio:.3g}× the median "
                "of the steps before."
            ),
            lambda n: (
                f"{n} gradient norm spikes so far (last: step {step}, {norm:.4g}, {ratio:.3g}× the median)."
            ),
        )


def _name(guard: Guard) -> str:
    if isinstance(guard.optimizer, ManualUpdate):
        return f"{what_it_steps(guard)} (updated by hand)"
    return f"{type(guard.optimizer).__name__} on {what_it_steps(guard)}"


_POLICY = {
    "skip": "skipped (parameters and optimizer state untouched)",
    "rollback": "rolled back to the last snapshot",
    "raise": "the run stops",
    "warn": "taken anyway (--on-nonfinite warn)",
}


def _policy(guard: Guard) -> str:
    return _POLICY.get(str(guard.on_nonfinite), str(guard.on_nonfinite))


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def _where(guard: Guard) -> str:
    """Where the last non-finite event of this guard located it (read back from its events file)."""
    if guard.run_dir is None:
        return ""
    try:
        event = runlog.read_run(guard.run_dir, records=False).first_nonfinite()
    except Exception:
        return ""
    if event is None:
        return ""
    lead, at = nonfinite_where(event)  # an explosion: where it overflowed, as the summary says
    parts = [f"{k}={at[k]}" for k in ("phase", "module", "op", "source") if at.get(k)]
    if not parts:
        return f" ({lead.removesuffix(', overflowing at')})" if lead else ""
    return f" ({f'{lead} ' if lead else ''}{', '.join(parts)})"


def rank() -> int:
    """This process's rank under torch.distributed (or torchrun's ``RANK`` once the group is gone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)
