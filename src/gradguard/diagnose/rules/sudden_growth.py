"""``explosion`` too fast for the norms to show: the first non-finite value was born from growth,
not at an op's numerical edge.

The ``explosion`` rule needs a climb of the norms over several steps; a learning rate far too high
(a typo: lr=100 for 1e-2, a ReLU RNN at lr 0.05) overflows within one or two updates. Either piece
of evidence below then says "growth" for the first located birth:

* **a float32 overflow in an ordinary op** (a Linear, a matmul, an RNN step: one the op table gives
  no numerical edge of its own): its output went above float32's range (≥ 1e38: float32 and
  bfloat16) from finite inputs. float32 is already the widest dtype in use, so this is not a
  precision problem, and "compute it in float32" cannot help: the values grew;
* **an update as large as the weights** in the few steps before it: a layer's ‖Δw‖/‖w‖ ≥ 1
  (≈1e-3 is typical): the learning rate, whatever op the overflow or NaN then landed in (the
  backward of scaled_dot_product_attention at lr 100).

Reported only where the ``explosion`` rule saw no climb (the registry); the fix is the learning
rate (and clipping, its threshold through :func:`~gradguard.diagnose.rules._clipping.threshold_advice`),
never the op's clamp.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from gradguard import optable
from gradguard.diagnose.facts import Facts, fields
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt, layer_name, sig
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import either, lower_lr, scale_at_start, threshold_advice, with_lr
from gradguard.runtable import MIN_HISTORY

WIDE = 1e38  # a dtype whose largest value is at least this has float32's range (float32, bfloat16)
HUGE_UPDATE = 1.0  # an update/weight ratio this large moved the weights by their own size
LOOKBACK = 3  # steps before the birth whose updates are looked at
_SIZED = 0.1  # a layer's weight norm below this is near zero (its ratio says little)
_DTYPE_MAX = re.compile(r"dtype's max \(([0-9.eE+-]+)\)")


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The birth; the range it overflowed (``None``: not an overflow of float32's range); the
    largest update/weight ratio of the steps before it ``(layer, ratio, step)``."""

    event: dict[str, Any]
    dtype_max: float | None
    update: tuple[str, float, int] | None


def detect(f: Facts, seen: Seen) -> Evidence | None:
    births = f.births()
    if not births or not isinstance(births[0].get("op"), str):
        return None
    event = births[0]
    wide = _wide_overflow(event)
    update = _largest_update(f, event["step"])
    huge = update is not None and update[1] >= HUGE_UPDATE and update[2] >= event["step"] - LOOKBACK
    if wide is None and not huge:
        return None
    if not huge and not _updated_before(f, event["step"]):
        return None  # no step had changed the weights: the forward overflows at its start (nonfinite_op's)
    return Evidence(event, wide, update)


def _updated_before(f: Facts, step: int) -> bool:
    """Whether a finite (taken) step came before ``step``: the weights had moved since the start."""
    return any(f.steps[i] < step and f.ok[i] for i in f.rows)


def _wide_overflow(event: dict[str, Any]) -> float | None:
    """float32's range (the dtype's max) when an ordinary op overflowed it, else ``None``."""
    op = str(event.get("op"))
    if optable.lookup(op) is not None or optable.CUSTOM_FUNCTION.match(op):
        return None  # an op with a numerical edge of its own (exp, pow, a loss…): nonfinite_op's
    found = _DTYPE_MAX.search(str(fields(event.get("evidence")).get("reason", "")))
    try:
        dtype_max = float(found.group(1)) if found is not None else 0.0
    except ValueError:
        return None
    return dtype_max if dtype_max >= WIDE else None


def _largest_update(f: Facts, before: int) -> tuple[str, float, int] | None:
    """The largest finite update/weight ratio of a layer of some size on the healthy steps before
    ``before``: ``(layer, ratio, step)``."""
    best: tuple[str, float, int] | None = None
    for name in f.layers:
        ratio, weight = f.layer(name, "update_ratio"), f.layer(name, "weight_norm")
        for i in f.rows:
            if f.steps[i] >= before or not f.ok[i] or not math.isfinite(ratio[i]):
                continue
            if not weight[i] >= _SIZED:
                continue
            if best is None or ratio[i] > best[1]:
                best = (name, ratio[i], f.steps[i])
    return best


def explain(f: Facts, ev: Evidence) -> Finding:
    e = ev.event
    where = f" in module {e['module']!r}" if e.get("module") not in (None, "") else ""
    evidence: dict[str, Any] = {
        "birth": {k: e.get(k) for k in ("step", "phase", "module", "op", "kind", "source")},
        **f.healthy.evidence(),
    }
    lrs = [v for i, v in enumerate(f.lr) if f.steps[i] < e["step"] and math.isfinite(v)]
    if lrs:
        evidence["lr"] = lrs[-1]
    parts = [
        f"at step {e['step']} `{e.get('op')}` ({e.get('phase', '?')}){where} made {e.get('kind', 'a non-finite value')}"
    ]
    if ev.dtype_max is not None:
        evidence["dtype_max"] = ev.dtype_max
        parts[0] += (
            f" by going above {ev.dtype_max:g} (float32's range, the widest in use: not a precision problem)"
        )
    if ev.update is not None and ev.update[1] >= HUGE_UPDATE:
        name, ratio, at = ev.update
        evidence.update(update_ratio_max=sig(ratio, 3), update_ratio_layer=name, update_ratio_step=at)
        parts.append(
            f"the update of step {at} moved layer {layer_name(name)} {fmt(ratio)}× its own norm (~1e-3 is typical)"
        )
    scale = scale_at_start(f)
    blame = (
        f"The values grew from the start: {scale[0]}."
        if scale
        else "The values grew: the learning rate is far too high."
    )
    message = "Gradient explosion, too fast for the norms to show: " + "; ".join(parts) + f". {blame}"
    advice = _advice(f, lrs)
    if scale:
        evidence.update(scale[2])
        advice["text"] = f"{scale[1]}. Then: {advice['text']}"
    return Finding("explosion", "error", e["step"], message, evidence, advice)


def _advice(f: Facts, lrs: list[float]) -> dict[str, Any]:
    """Lower the learning rate and clip: a threshold from the healthy norms when there were enough
    of them (else the norms seen were already growing), through
    :func:`~gradguard.diagnose.rules._clipping.threshold_advice`."""
    h = f.healthy
    known = len(h.norms) >= MIN_HISTORY
    rec = threshold_advice(f, h.max_norm if known else None, f"the {len(h.norms)} healthy pre-clip norms")
    lr = lower_lr(f)
    now = f" (now {fmt(lrs[-1])})" if lrs else ""
    advice = either(rec["text"], lr["text"]) if "max_norm" in rec else f"{rec['text']}. {lr['text']}."
    rec["text"] = (
        f"Lower the learning rate{now} 10× or more, or add warm-up, or clip the global norm; keep "
        "on_nonfinite='skip' so a bad step never reaches the weights. A wider dtype or clamping the op's output "
        f"only delays the overflow. {advice}"
    )
    return with_lr(rec, lr)


RULE = Rule("sudden_growth", detect, explain, finding="explosion")
