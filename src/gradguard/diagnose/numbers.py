"""Small number helpers the rules share: quantiles, rounding for people, a threshold's advice."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any, TypeGuard

__all__ = [
    "Ends",
    "clip_advice",
    "ends",
    "fmt",
    "layer_name",
    "median",
    "quantile",
    "rolling_median",
    "sig",
    "sig_floor",
    "still_falling",
]


def median(values: Sequence[float]) -> float:
    """The median; ``nan`` when empty."""
    return statistics.median(values) if values else math.nan


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of finite values; nan when empty."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = q * (len(data) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def sig(x: float, digits: int = 2) -> float:
    """``x`` rounded to ``digits`` significant digits (non-finite and 0 unchanged)."""
    if not math.isfinite(x) or x == 0:
        return x
    return round(x, -math.floor(math.log10(abs(x))) + digits - 1)


def sig_floor(x: float) -> float:
    """``x`` rounded down to two significant digits (a threshold errs on the tight side)."""
    if not math.isfinite(x) or x <= 0:
        return x
    e = math.floor(math.log10(x)) - 1
    return round(math.floor(x / 10.0**e + 1e-9) * 10.0**e, max(0, -e))


def fmt(x: float) -> str:
    """A number for a message: ``0.93``, ``1.2e+05``, ``nan``."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def layer_name(layer: str) -> str:
    """A layer name for a message (the root module's name is empty)."""
    return repr(layer) if layer else "(the root module)"


def rolling_median(values: Sequence[float], width: int) -> list[float]:
    """The centred rolling median (``width`` values, fewer at the ends)."""
    half = width // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


@dataclasses.dataclass(frozen=True)
class Ends:
    """Where a series of losses started and ended: the medians of its first and of its last ``k``
    values (batches differ, so one loss is a noisy start).

    A message that quotes them says they are medians (:meth:`text`): the start a user reads in the
    log is the first loss, and a median of the first ``k`` is another number.
    """

    start: float
    end: float
    k: int

    def text(self) -> str:
        """``"3.58 → 3.39 (medians of the first and last 15 steps)"``; no label where ``k`` is 1."""
        arrow = f"{fmt(self.start)} → {fmt(self.end)}"
        return arrow if self.k <= 1 else f"{arrow} (medians of the first and last {self.k} steps)"


def ends(values: Sequence[float]) -> Ends:
    """The :class:`Ends` of ``values``: medians of the first and of the last tenth of them, at least
    one and at most 50 (``nan`` when empty)."""
    k = max(1, min(len(values) // 10, 50))
    return Ends(median(values[:k]), median(values[-k:]), k)


def still_falling(values: Sequence[float]) -> bool:
    """Whether a loss is still falling at its end: its second half's start (median of its first quarter)
    above its last quarter's median by more than that quarter's spread (a run learning slowly, not a
    stall; eight or more values)."""
    if len(values) < 8:
        return False
    half, quarter = values[len(values) // 2 :], values[-(len(values) // 4) :]
    return median(half[: len(half) // 4]) - median(quarter) > statistics.pstdev(quarter)


def clip_advice(max_norm: float) -> dict[str, Any]:
    """The recommendation entries of a global-norm threshold: the value, the spec and a line to paste."""
    return {
        "max_norm": max_norm,
        "clip": f"norm:{max_norm:g}",
        "code": f'gradguard.Guard(model, optimizer, clip="norm:{max_norm:g}")  '
        f"# or torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})",
    }


def finite_number(x: Any) -> TypeGuard[float]:
    """Whether ``x`` (read from a run log) is a finite int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
