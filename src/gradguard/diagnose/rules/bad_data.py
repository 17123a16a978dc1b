"""``bad_data``: a tensor entering the step (input, target, label, carried state) was non-finite.

A confirmed ``data``-phase event is an error, and says which tensor. A lone step — healthy norms
before it, no climb, finite steps again after it was skipped — is only a *possible* bad batch: it
is a warning, and only for lone steps nobody located. A lone step whose replay located an op that
made the non-finite value from finite inputs is that op's fault (``nonfinite_op``), not the data's:
a softmax over a fully masked row or a division by a zero count is isolated too, and
``torch.isfinite(x)`` on that batch finds nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradguard import optable
from gradguard.diagnose.facts import Facts, fields
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import sig
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import how_to_name_the_op, with_buffers

_EVENT_KEYS = ("step", "batch", "tensor", "kind", "source", "evidence", "cause")
_MAX_LISTED = 50
_IN_TEXT = 8  # bad steps named in a finding's text
_TENSOR_WORDS = {
    "input": "the model's input",
    "target": "the target",
    "label": "the label",
    "loss input": "a tensor entering the loss code (a target or label)",
    "class weights": "the loss's class weights (its weight= / pos_weight= argument)",
    "state": "the state carried from the previous step",
    "carried state": "the state carried from the previous step",
}
_MIN_EVERY = 3  # steps that all had a bad batch before "every batch" is said
_PREPROCESSING = (
    "Fix the preprocessing, not the samples (dropping them would drop every batch): a standardization "
    "(x - mean) / std divides by 0 for a constant feature (use std.clamp_min(1e-8)), a mean or std over a "
    "column with a missing value is NaN for the whole column (use torch.nanmean, or fill the missing values "
    "first), log of 0 or of a negative value in a feature transform; check with torch.isfinite({x}).all(dim=0) "
    "which features are non-finite."
)
_CLEAN = (
    "Clean the data: drop or repair samples with torch.isfinite({x}).all() in the dataset or collate_fn; "
    "meanwhile on_nonfinite='skip' drops those steps without touching the weights."
)


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The bad steps (all of them); the first ``data`` event, or ``None`` for lone steps."""

    steps: list[int]
    event: dict[str, Any] | None
    nonfinite_steps: int


def detect(f: Facts, seen: Seen) -> Evidence | None:
    data_events = _entering(f)
    if data_events:
        steps = sorted(
            {s for e in data_events for s in (e.get("step"), e.get("seen_at_step")) if isinstance(s, int)}
        )  # (a recurrence located at a later step had that step's bad batch too)
        return Evidence(steps, data_events[0], len(steps))
    bad = sum(f.bad)
    located = _op_fault_steps(f)
    # after an op's located failure, an unlocated lone step is most likely that op again (the replays
    # were spent: max_replays), not a bad batch (87 such steps of a located 0/0 read "a bad batch")
    after = min(located, default=math.inf)
    lone = sorted(i for i in f.lone if f.steps[i] not in located and f.steps[i] < after)
    if not lone or len(lone) < bad / 2:
        return None
    return Evidence([f.steps[i] for i in lone], None, bad)


def _entering(f: Facts) -> list[dict[str, Any]]:
    """The ``data`` events that start a failure: state carried from a step that already failed — a
    located birth there (``nonfinite_op``), a bad batch there, or state carried there in turn — only
    passed the value on, step after step, and is left out."""
    explained = {e["step"] for e in f.births()}
    kept: list[dict[str, Any]] = []
    events = [e for e in f.nonfinite_events if e.get("phase") == "data" and isinstance(e.get("step"), int)]
    for e in sorted(events, key=lambda e: e["step"]):
        origin = fields(e.get("evidence")).get("carried_from_step")
        if not (isinstance(origin, int) and origin in explained):
            kept.append(e)
        explained.add(e["step"])
    return kept


def _op_fault_steps(f: Facts) -> set[int]:
    """Steps whose non-finite value a located op (or the optimizer step) made from finite inputs (not
    the data's doing)."""
    return {e["step"] for e in f.births() if not _passed_on(e)}


def _passed_on(e: dict[str, Any]) -> bool:
    """Whether the located op only passed on a non-finite value it was given — unless, in backward,
    that NaN is its own forward's, selected away by a ``torch.where`` (then the op made it)."""
    details = fields(e.get("evidence"))
    reason = details.get("reason")
    given = isinstance(reason, str) and reason.startswith(optable.NAN_INPUT)
    return given and not optable.masked_nan(e.get("phase"), details)


def explain(f: Facts, ev: Evidence) -> Finding:
    return _confirmed(f, ev) if ev.event is not None else _lone(f, ev)


def _confirmed(f: Facts, ev: Evidence) -> Finding:
    e0 = ev.event or {}
    evidence = {k: e0.get(k) for k in _EVENT_KEYS if e0.get(k) is not None}
    evidence["bad_batches"] = len(ev.steps)
    evidence["bad_steps"] = ev.steps[:_MAX_LISTED]
    first = ev.steps[0] if ev.steps else None
    tensor = str(e0.get("tensor") or "input")
    details = fields(e0.get("evidence"))
    if tensor in ("state", "carried state"):
        return _carried(ev, e0, details, evidence)
    if tensor == "class weights":
        return _class_weights(ev, e0, details, evidence)
    if tensor == "loss input" and details.get("consumer") in _LOOKUPS:
        return _lookup_table(ev, e0, details, evidence)
    words = _TENSOR_WORDS.get(tensor, f"the tensor {tensor!r}")
    argument = details.get("argument") if isinstance(details.get("argument"), str) else None
    consumer = f" (into `{details['consumer']}`)" if details.get("consumer") else ""
    consumer += f" (`{argument}=` of the model)" if argument else ""
    if isinstance(e0.get("rank"), int):  # torch.distributed: whose batch
        consumer += f" on rank {e0['rank']}"
    later = _unreplayed(f, ev.steps)
    more = (
        f"; {later} later non-finite step(s) not replayed (max_replays), most likely more of them"
        if later
        else ""
    )
    if later:
        evidence["unreplayed_steps"] = later
    message = (
        f"Step {first if first is not None else '?'}: {words}{consumer} entering the step already held "
        f"{e0.get('kind', 'non-finite values')} ({len(ev.steps)} bad batch(es) in all{more}); the model is not at fault."
    )
    x = argument or ("x" if tensor == "input" else "y")
    rec = {
        "text": _CLEAN.format(x=x) + ("" if tensor == "input" else f" Check {words} as well as the inputs."),
        "on_nonfinite": "skip",
        "code": f"assert torch.isfinite({x}).all(), 'non-finite {tensor}'",
    }
    if _every_batch(f, ev.steps):
        evidence["every_batch"] = True
        message += (
            " Every batch held them from the first step: the preprocessing makes them, not a few bad samples."
        )
        rec["text"] = _PREPROCESSING.format(x=x)
    return Finding("bad_data", "error", first, message, evidence, rec)


_LOOKUPS = frozenset({"index", "__getitem__", "index_select", "embedding", "gather", "take"})


def _lookup_table(
    ev: Evidence, e0: dict[str, Any], details: dict[str, Any], evidence: dict[str, Any]
) -> Finding:
    """A table the loss code looks values up in (``log_q[items]``: a logQ correction from item counts) held
    non-finite entries: made before the loop (a log of a zero count), not a bad sample — it read "a target or
    label … drop the bad samples"."""
    first = ev.steps[0] if ev.steps else None
    held = fields(details.get("input"))
    kind = str(e0.get("kind", "non-finite values"))
    count = held.get({"-inf": "neginf", "inf": "posinf"}.get(kind, "nan"))
    shape = held.get("shape")
    how_many = (
        f" in {count} of its {shape[0] if isinstance(shape, list) and len(shape) == 1 else '?'} entries"
        if count
        else ""
    )
    at = f" at {e0['source']}" if e0.get("source") else ""
    message = (
        f"Step {first if first is not None else '?'}: a table the loss code looks values up in (`{details['consumer']}`{at}) "
        f"held {kind}{how_many}: it was made before the loop (a log of a count or a frequency that is 0, a division by a "
        "count of 0), so every batch that picks those entries fails; the model and the samples are not at fault."
    )
    rec = {
        "text": "Fix the table where it is computed: add a pseudo-count before the log (torch.log(counts + 1), or "
        "counts.clamp_min(1)), or give the missing entries a finite value; check it once with "
        "torch.isfinite(table).all() before training.",
        "on_nonfinite": "skip",
        "code": "table = torch.log(counts.float() + 1.0)",
    }
    return Finding("bad_data", "error", first, message, evidence, rec)


def _every_batch(f: Facts, steps: list[int]) -> bool:
    """Whether every recorded step (at least :data:`_MIN_EVERY` of them) went non-finite, the first
    with a bad batch (later ones past ``max_replays`` are not replayed)."""
    return len(f.steps) >= _MIN_EVERY and bool(steps) and steps[0] == f.steps[0] and all(f.bad)


def _unreplayed(f: Facts, data_steps: list[int]) -> int:
    """The non-finite steps after the first bad batch that only the flags saw (no replay was left)."""
    found = {
        e["step"]
        for e in f.nonfinite_events
        if e.get("located_by") == "norm" and isinstance(e.get("step"), int) and e["step"] > data_steps[0]
    }
    return len(found - set(data_steps))


def _carried(ev: Evidence, e0: dict[str, Any], details: dict[str, Any], evidence: dict[str, Any]) -> Finding:
    """State the model carries across steps (an RNN's hidden state fed back, a buffer written in
    place) that went non-finite in an earlier step nobody located: not the data, and not this step."""
    first = ev.steps[0] if ev.steps else None
    origin = details.get("carried_from_step")
    since = f"step {origin}" if isinstance(origin, int) else "an earlier step"
    what = "a buffer kept across steps" if details.get("carried") == "buffer" else "the recurrent state"
    message = (
        f"Step {first if first is not None else '?'}: the state carried from {since} into this step already held "
        f"{e0.get('kind', 'non-finite values')}: {what} went non-finite there; the batch is not at fault."
    )
    rec = {
        "text": f"{what[0].upper()}{what[1:]} went non-finite at {since}: find what made it so there (clip or "
        "normalise the state), and reset the state when it is non-finite (h = torch.zeros_like(h) if not "
        "torch.isfinite(h).all()) or at each sequence/episode boundary.",
        "on_nonfinite": "skip",
        "code": "if not torch.isfinite(h).all(): h = torch.zeros_like(h)",
    }
    return Finding("bad_data", "error", first, message, evidence, rec)


def _class_weights(
    ev: Evidence, e0: dict[str, Any], details: dict[str, Any], evidence: dict[str, Any]
) -> Finding:
    """The loss's class weights were non-finite: computed from class counts (1 / count, n / (k·count))
    with a class that has no sample in the split — the data is fine, the weighting is not."""
    first = ev.steps[0] if ev.steps else None
    consumer = f" of `{details['consumer']}`" if details.get("consumer") else ""
    message = (
        f"Step {first if first is not None else '?'}: the class weights{consumer} (its weight= argument) held "
        f"{e0.get('kind', 'non-finite values')} from the start: weights computed from class counts (1 / count, "
        "normalised by their sum) are inf or NaN for a class with no sample in the training split. The inputs "
        "and labels are not at fault."
    )
    rec = {
        "text": "Compute the weights from counts clamped to at least 1 (counts.clamp_min(1), np.maximum(counts, 1)) "
        "or give a class absent from the split weight 0; check with torch.isfinite(weight).all() before building "
        "the loss.",
        "on_nonfinite": "skip",
        "code": "weight = 1.0 / counts.clamp_min(1); weight = weight / weight.sum()",
    }
    return Finding("bad_data", "error", first, message, evidence, rec)


def _lone(f: Facts, ev: Evidence) -> Finding:
    steps = ev.steps
    evidence = {
        "bad_steps": steps[:_MAX_LISTED],
        "lone_nonfinite_steps": len(steps),
        "nonfinite_steps": ev.nonfinite_steps,
        "healthy_p50": sig(f.healthy.p50, 4),
        "located_by": "norm",
    }
    lead = _lone_lead(f, steps, ev.nonfinite_steps)
    on_rank = _loss_on_rank(f, steps[0])
    if on_rank is not None:  # torch.distributed: every rank said whose loss went non-finite
        rank, kind = on_rank
        evidence.update(rank=rank, located_by="watch")
        message = (
            f"{lead} On rank {rank} only, the loss was {kind} while that rank's inputs were finite: its loss code "
            "made it on that rank's batch (an op at its numerical edge there: a log of 0, a division by a count "
            "of 0, a non-finite target)."
        )
        text = (
            f"Check rank {rank}'s batch of step {steps[0]}: its targets (torch.isfinite(y).all()) and the loss code's "
            f"divisions and logs on it; keep on_nonfinite='skip' meanwhile. To have the op named: "
            f"{how_to_name_the_op(f)}."
        )
        return Finding(
            "bad_data", "warning", steps[0], message, evidence, {"text": text, "on_nonfinite": "skip"}
        )
    if _model_was_finite(f, steps[0]):  # the replay ran the model on that batch: the inputs were fine
        evidence["model_output_finite"] = True
        message = (
            f"{lead} Replayed, the model's output on that batch was finite: the loss code made it non-finite — "
            "an op at its numerical edge there (exp, log, a division) or a non-finite target."
        )
        if f.log.meta.get("runner") == "gradguard run":  # its loss-code watch ran and named no op
            how = (
                "gradguard run's loss-code watch named no op: the value came from code it does not watch (a target "
                "built under torch.no_grad, e.g. from a target network or a reward)"
            )
        else:
            how = (
                "to have the loss code's op named, pass a closure (guard.step(closure)) or run the script under "
                "`gradguard run`, which watches the loss code"
            )
        text = (
            f"Check the targets of step {steps[0]} with torch.isfinite(y).all() (rewards, labels, anything the loss "
            f"reads besides the model's output); {how}. Keep on_nonfinite='skip' meanwhile."
        )
    else:
        message = (
            f"{lead} The usual cause is a bad batch (NaN/inf in the inputs or targets); otherwise an op at its "
            "numerical edge on that batch only."
        )
        text = (
            f"Check the batch of step {steps[0]} with torch.isfinite(x).all() (inputs and targets); "
            f"keep on_nonfinite='skip' meanwhile. To tell the data from an op: {how_to_name_the_op(f)}."
        )
    return Finding("bad_data", "warning", steps[0], message, evidence, {"text": text, "on_nonfinite": "skip"})


def _lone_lead(f: Facts, steps: list[int], nonfinite: int) -> str:
    """The finding's first sentence: one lone step, or a failure that recurs on some batches (six
    isolated steps read "a lone non-finite step (5 in all)": the last one, with no step after it to
    show training went on, was not counted)."""
    if len(steps) == 1 and nonfinite <= 1:
        return (
            f"Step {steps[0]}: a lone non-finite step (no op located) between healthy steps — the norms before it "
            "were normal and training went on finite after it."
        )
    bad = [s for s, b in zip(f.steps, f.bad) if b]
    listed = ", ".join(map(str, bad[:_IN_TEXT])) + (", …" if len(bad) > _IN_TEXT else "")
    return (
        f"Step {steps[0]}: {nonfinite} non-finite steps ({listed}), none located, each between healthy steps — the "
        "norms before them were normal and training went on finite after them: a failure that recurs on some "
        "batches, not a growth of the model."
    )


def _loss_on_rank(f: Facts, step: int) -> tuple[int, str] | None:
    """The rank whose loss went non-finite at ``step`` with finite inputs (a ``loss``-phase event with
    ``rank``, from the ranks' gather), and the kind."""
    for e in f.nonfinite_events:
        if e.get("step") == step and e.get("phase") == "loss" and isinstance(e.get("rank"), int):
            return e["rank"], str(e.get("kind") or "non-finite")
    return None


def _model_was_finite(f: Facts, step: int) -> bool:
    """Whether the step's replay ran the model's forward on its batch and found the output finite
    (the event of a loss-phase step the replay could not locate further)."""
    return any(
        e.get("step") == step and e.get("phase") == "loss" and e.get("located_by") == "replay"
        for e in f.nonfinite_events
    )


RULE = Rule("bad_data", detect, with_buffers(explain))
