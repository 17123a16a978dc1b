"""``nonfinite_op``: the first located non-finite value (op, module, source) and its specific fix.

Not reported where an explosion explains the non-finite step (the registry: it gives way to an
``explosion`` error; the answer then is the explosion, not the op where the overflow landed), where
the guard's own event calls it an explosion, nor for a bad input batch (``bad_data``'s steps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradguard import optable
from gradguard.diagnose.facts import Facts, fields
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt, layer_name
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import how_to_name_the_op, scale_at_start, with_buffers
from gradguard.events import op_called

_EVENT_KEYS = (
    "phase",
    "module",
    "op",
    "tensor",
    "kind",
    "source",
    "located_by",
    "layers",
    "evidence",
    "cause",
)


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The event that says where (a located one if any), and how many steps were non-finite."""

    event: dict[str, Any]
    nonfinite_steps: int


def detect(f: Facts, seen: Seen) -> Evidence | None:
    bad_data = seen.evidence("bad_data")
    data_steps = set(bad_data.steps) if bad_data is not None else set()
    events = [e for e in f.nonfinite_events if e.get("phase") != "data" and e.get("step") not in data_steps]
    if not events and f.trouble_reason != "nonfinite":
        return None
    if events and _is_explosion_event(events[0]) and scale_at_start(f) is None:
        return None  # (the explosion rule's; one huge from step 0 has no healthy norms to grow from: here)
    fed = _fed_bad_data(bad_data.event if bad_data is not None else None)
    births = [
        e for e in f.births() if e.get("step") not in data_steps and (e.get("op"), e.get("source")) != fed
    ]
    event = _most_precise(births)
    if event is not None:
        return Evidence(event, sum(f.bad))
    first = events[0] if events else None  # no birth located: what the flags (or an unlocated event) say
    if first is not None and _unreplayed_after_data(first, data_steps):
        return None
    i = f.index_of(first["step"]) if first is not None and isinstance(first.get("step"), int) else f.trouble
    if i >= len(f.rows) or f.steps[i] in data_steps or _continues(f, i):
        return None
    kind = "nan" if math.isnan(f.loss[i]) else "inf"
    return Evidence(first or {"step": f.steps[i], "phase": None, "kind": kind}, sum(f.bad))


def _fed_bad_data(event: dict[str, Any] | None) -> tuple[Any, Any] | None:
    """The loss op (and its line) a non-finite tensor entered the loss code at (``bad_data``'s event: a
    NaN class weight of ``cross_entropy``): a later step's birth there is that tensor again, not the op."""
    if event is None:
        return None
    consumer = fields(event.get("evidence")).get("consumer")
    return (consumer, event.get("source")) if isinstance(consumer, str) else None


def _unreplayed_after_data(event: dict[str, Any], data_steps: set[int]) -> bool:
    """An unlocated step (the flags only: ``max_replays`` were spent) after bad batches that the
    replays found as data: most likely one more of them, not an op of its own (``bad_data`` counts it)."""
    step = event.get("step")
    return (
        bool(data_steps)
        and event.get("located_by") == "norm"
        and isinstance(step, int)
        and step > min(data_steps)
    )


def _continues(f: Facts, i: int) -> bool:
    """Whether unlocated step ``i`` only continues a failure whose start a ``data`` event explained
    (the steps since were all non-finite: the state the bad batch left behind)."""
    j = i - 1
    while j >= 0 and f.bad[j] and j not in f.data_bad:
        j -= 1
    return j >= 0 and j in f.data_bad and j < i


def _most_precise(births: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first step's birth; of an optimizer's, the one that names the optimizer (its own check,
    not the next forward's replay that found the parameter already non-finite)."""
    if not births:
        return None
    same = [e for e in births if e["step"] == births[0]["step"]]
    return next((e for e in same if _optimizer_of(e)), same[0])


def _is_explosion_event(e: dict[str, Any]) -> bool:
    text = f"{e.get('cause', '')} {e.get('kind_of_fault', '')}".lower()
    return "explosion" in text or "explod" in text


def explain(f: Facts, ev: Evidence) -> Finding:
    event = ev.event
    step = event.get("step") if isinstance(event.get("step"), int) else None
    evidence: dict[str, Any] = {k: event.get(k) for k in _EVENT_KEYS if event.get(k) is not None}
    evidence["nonfinite_steps"] = ev.nonfinite_steps
    if event.get("op"):
        message, rec = _located(event, step)
        message, rec = _after_growth(f, event, message, rec)
    elif event.get("phase") == "optimizer":
        dtype = f.log.meta.get("parameter_dtype")
        message, rec = _in_optimizer(
            event, step, _logged_lr(f, step), dtype if isinstance(dtype, str) else None
        )
    elif (event.get("tensor") in ("buffer", "state") and event.get("phase") == "forward") or event.get(
        "phase"
    ) in ("init", "script"):
        message, rec = _held(event, step, _at_start(f))
    elif _is_explosion_event(event):
        message, rec = _huge_from_the_start(f, step, ev.nonfinite_steps, evidence)
    else:
        message, rec = _unlocated(f, event, step, ev.nonfinite_steps)
    rec["on_nonfinite"] = "skip"
    return Finding("nonfinite_op", "error", step, message, evidence, rec)


def _located(event: dict[str, Any], step: int | None) -> tuple[str, dict[str, Any]]:
    """The op, where it ran, why it failed (the event's own reason first) and the op's fix."""
    details = event.get("evidence")
    reason = details.get("reason") if isinstance(details, dict) else None
    if optable.masked_nan(event.get("phase"), details if isinstance(details, dict) else None):
        reason = optable.MASKED_NAN  # "already in the input" of a backward node: its own forward's NaN
    why, fix = optable.advice(str(event.get("op") or ""), reason, event.get("cause"), fields(details))
    where = f" in module {event['module']!r}" if event.get("module") not in (None, "") else ""
    at = f" at {event['source']}" if event.get("source") else ""
    message = (
        f"Step {step}: {event.get('kind', 'a non-finite value')} first came out of {op_called(event)} "
        f"({event.get('phase', '?')}){where}{at}: {why}."
    )
    return message, {"text": f"Fix: {fix}.", "op": event["op"]}


def _at_start(f: Facts) -> frozenset[str]:
    """The buffers ``meta.json`` says were non-finite before the first step (``nonfinite_buffers_at_start``)."""
    noted = f.log.meta.get("nonfinite_buffers_at_start")
    return frozenset(str(n) for n in noted) if isinstance(noted, list) else frozenset()


def _held(
    event: dict[str, Any], step: int | None, at_start: frozenset[str] = frozenset()
) -> tuple[str, dict[str, Any]]:
    """A tensor the forward read but did not make held the NaN: a buffer (named), or a plain tensor
    attribute, a global, a constant built from a NaN. A buffer that held it before the first step was
    built so (a causal mask written ``triu(ones) * -inf``: 0 · -inf) or loaded so: no batch wrote it."""
    details = fields(event.get("evidence"))
    kind = event.get("kind", "a non-finite value")
    if event.get("phase") == "init":
        what = f"the parameter {details.get('parameter') or event.get('module')!r}, non-finite before the first step,"
        fix = (
            "repair the initialisation or the weights loaded into it (a row left unfilled by an off-by-one, a NaN in "
            "the checkpoint or the pretrained table) and check every parameter with torch.isfinite(p).all() "
            "before training; neither the learning rate nor clipping is the cause"
        )
    elif event.get("phase") == "script":
        what = f"the weight {details.get('parameter') or event.get('module')!r}, written between steps by the script,"
        fix = (
            "find where the script writes that weight between optimizer steps (weight surgery, a partial "
            "load_state_dict, an EMA or SWA copy, a hand-written clamp or update) and keep NaN/inf out of it: check "
            "torch.isfinite(p).all() right after the write; neither the optimizer, the learning rate nor clipping "
            "is the cause"
        )
    elif event.get("tensor") == "buffer" and details.get("buffer") in at_start:
        what = f"the buffer {details.get('buffer')!r}, non-finite before the first step,"
        fix = (
            "build it finite where it is made — statistics of a table with a missing value (torch.nanmean, or "
            "clean the table first), a mask as torch.full((n, n), float('-inf')).triu(1) or with masked_fill "
            "(torch.triu(ones) * float('-inf') puts 0 * -inf = NaN below the diagonal) — or load clean values "
            "into it; no batch wrote it, and neither the learning rate nor clipping is the cause"
        )
    elif event.get("tensor") == "buffer":
        what = f"the buffer {details.get('buffer', '?')!r}"
        fix = (
            "find what wrote it — a running statistic a bad batch updated (BatchNorm's running_mean / running_var "
            "are updated in the forward, before the step can be skipped), or a value the code set — and reset it "
            "(model.load_state_dict from a good checkpoint, or re-initialise the buffer); check it with "
            "torch.isfinite(buffer).all() after each step"
        )
    else:
        what = "a tensor the forward did not make (a plain tensor attribute, a global, or a constant)"
        fix = "find where that tensor was made or last written and keep NaN out of it (it is read on every step)"
    at = f" at {event['source']}" if event.get("source") else ""
    message = (
        f"Step {step}: {what} already held {kind} when the forward read it{at}: the model's output was non-finite "
        "from it, whatever the batch."
    )
    return message, {"text": f"Fix: {fix}."}


GREW = 10.0  # a layer's weight norm this many times its first one, before the birth: the weights ran away


def _after_growth(
    f: Facts, event: dict[str, Any], message: str, rec: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """An overflow (an exp overflow, a value above the dtype's max) after the weights grew by orders of
    magnitude: the op's input grew with them, so the learning rate comes first, the op's clamp second."""
    text = str(fields(event.get("evidence")).get("reason", "")).lower()
    step = event.get("step")
    if not isinstance(step, int) or not ("overflow" in text or "dtype's max" in text):
        return message, rec  # a log of 0, a 0/0: the op's edge, whatever the weights did
    grown = [(r, n) for n, (r, at) in f.weight_ratios.items() if r >= GREW and at <= step]
    if not grown:
        return message, rec
    ratio, name = max(grown)
    message += (
        f" The weights grew first: layer {layer_name(name)} to {fmt(ratio)}× its first norm before step {step}, "
        "and the op's input grew with them."
    )
    rec["text"] = (
        "Lower the learning rate (3–10×) or add warm-up / weight decay: the overflow follows the weights' "
        f"growth. Then, to keep the op in range: {rec['text'].removeprefix('Fix: ')}"
    )
    return message, rec


def _optimizer_of(event: dict[str, Any]) -> str | None:
    details = fields(event.get("evidence"))
    name = event.get("optimizer") or details.get("optimizer")
    return str(name) if name else None


def _logged_lr(f: Facts, step: int | None) -> float | None:
    """The learning rate the run logged at ``step`` (the one the step used; the hyperparameters an
    event quotes were read later, after a schedule may have set the rate again); ``None``: not logged."""
    if step is None or step not in f.steps or not any(math.isfinite(v) for v in f.lr):
        return None  # (a log with no rate at all: NaN there means "not logged")
    return f.lr[f.index_of(step)]


def _in_optimizer(
    event: dict[str, Any], step: int | None, lr: float | None = None, dtype: str | None = None
) -> tuple[str, dict[str, Any]]:
    """A NaN born inside ``optimizer.step()``: the optimizer, the parameters it wrote, and the fix its
    hyperparameters point to (``eps = 0``; a hand-written optimizer; otherwise the LR)."""
    details = fields(event.get("evidence"))
    name = _optimizer_of(event)
    params = (
        event.get("parameters")
        or details.get("parameters")
        or [details.get("parameter") or event.get("module")]
    )
    names = ", ".join(str(p) for p in params[:5] if p) or "a parameter"
    inside = f"{name}.step()" if name else "optimizer.step()"
    reason = details.get("reason") or "the weights were finite before it and non-finite after it"
    message = (
        f"Step {step}: {event.get('kind', 'a non-finite value')} was born inside {inside}, in {names}, from "
        f"finite gradients: {reason}. The model's ops did not make it."
    )
    fix = optable.optimizer_fix(name, fields(details.get("hyperparameters")), lr, dtype)
    return message, {"text": f"Fix: {fix}.", "optimizer": name, "parameters": params[:20]}


def _huge_from_the_start(
    f: Facts, step: int | None, count: int, evidence: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Values that overflowed where the loss or the gradients were already huge at step 0, before any
    update (no healthy norms for an explosion to grow from): a MAML inner loop at lr 0.3 made the loss
    3.7e35 at step 0 and read "No findings"."""
    scale = scale_at_start(f)
    assert scale is not None  # (detect checked it)
    cause, fix, more = scale
    evidence.update(more)
    message = (
        f"Step {step}: the values overflowed ({count} step(s) non-finite in all), and {cause}. A loss computed "
        "through an inner loop (a meta-learning inner update, an unrolled solver) is huge from the start when "
        "that loop's own step size is too large."
    )
    return message, {"text": f"{fix}; check any inner update of the loss code (its step size) the same way."}


def _unlocated(f: Facts, event: dict[str, Any], step: int | None, count: int) -> tuple[str, dict[str, Any]]:
    """No op named: what went non-finite, and how to have gradguard name the op."""
    phase, tensor = event.get("phase"), event.get("tensor")
    if phase == "optimizer":
        what = "the weights"
    elif phase == "loss":  # the loss code: its forward made the loss, or its backward the gradients
        what = "the gradients, in the loss code's backward," if tensor == "grad" else "the loss"
    else:
        what = "the gradients"
    message = (
        f"Step {step}: {what} became {event.get('kind', 'non-finite')} without a preceding explosion; "
        f"{count} step(s) non-finite in all. The always-on flags do not name the op."
    )
    how = how_to_name_the_op(f)
    rec = {"text": f"{how[0].upper()}{how[1:]}; meanwhile on_nonfinite='skip' keeps the weights finite."}
    return message, rec


RULE = Rule("nonfinite_op", detect, with_buffers(explain))
