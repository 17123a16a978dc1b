"""``lr_too_high``: a layer's median update/weight ratio ≥ 0.1 while healthy (≈1e-3 is typical),
the LR jumped ≥ 2× within the few steps before the norm started growing, a warm-up that never
stopped: the LR still rising when the loss turned up, or a first step that scrambled the initial
weights of a run that then did not train.

The first step is its own evidence: the median ratio over healthy steps leaves out the warm-up
steps, and a rate that wrecks the initial weights (AdamW's first steps move every weight by ≈ lr:
at lr 0.03 a post-LN transformer's layers moved 0.34–1.5× their norm) leaves a model whose later
updates are tiny (the layers stuck at ``lr × weight_decay``, 3e-4), with a loss stalled near
uniform and gradients that look like vanishing. A median over the layers of the first recorded
ratios ≥ :data:`FIRST_STEP_HIGH`, in a run that did not train, is that.

By evidence, not by the schedule's name: an ordinary warm-up rises in a ramp and then holds, and
its first steps double the LR from a tiny value; that is no jump. A jump is a step change from an
LR that held (the LR one step before equals the one before that).

Advice: the rate before the jump, where the loss was best, or one giving update ratios near 1e-2 —
through :func:`~gradguard.diagnose.rules._clipping.lr_advice`: the rate ``gradguard tune --lr``
verified when ``tune.json`` holds one, else the estimate marked unverified with the command line
that verifies it.

High update ratios in a run that trained (:func:`~gradguard.diagnose.rules._clipping.trained`, the
test ``over_clipping`` asks too) are an ``info``, not a failure, with no lower rate recommended that
nothing backs: keep the rate (the rnn demo's ``norm:5`` recipe at lr 1, decoder ratio ~0.11, trains
to 2.99–3.02 bits/char where the 0.18 it used to be told to try reaches 3.15–3.18). Where a rate is
advised (the run did not train), tune's candidates are lower rates only: the run stalled at its own,
which tune's few dozen steps cannot show (:func:`~gradguard.diagnose.rules._clipping.own_lr`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import ends, fmt, layer_name, median, rolling_median, sig
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import (
    LR_JUMP,
    UPDATE_RATIO_HIGH,
    lower_lr,
    lr_advice,
    lr_jump,
    ratio_lr,
    trained,
    tuned,
    update_ratios,
    with_lr,
)

_RISING_MIN = 20  # fewest healthy steps to judge a warm-up that never stops
_SMOOTH = 5  # rolling-median width for the loss
_ZERO_INIT_RATIO = 1e3  # a first-step ratio this large is a tensor initialised at (near) zero
FIRST_STEP_HIGH = 0.1  # the layers' median update ratio at the first recorded step of a run that stalled


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Median update ratio per layer (healthy steps after warm-up, before ``end``), the worst one
    when it is high, and an LR jump ``(step, before, after)`` right before the onset."""

    per_layer: dict[str, float]
    worst: tuple[str, float] | None
    jump: tuple[int, float, float] | None
    end: int
    warm: int
    rising: tuple[int, float, float] | None = None
    first: tuple[int, float, str, float] | None = None  # (step, median over layers, worst layer, its ratio)
    joined: tuple[int, float, float, list[str]] | None = (
        None  # (step, its group's rate, the logged rate, layers)
    )


def detect(f: Facts, seen: Seen) -> Evidence | None:
    h = f.healthy
    end = f.index_of(h.onset_step) if h.onset_step is not None else f.trouble
    warm = max(3, len(f.rows) // 50)
    per_layer = update_ratios(f, warm, end)
    worst = max(per_layer.items(), key=lambda kv: kv[1], default=None)
    high = worst if worst is not None and worst[1] >= UPDATE_RATIO_HIGH else None
    if h.onset_step is not None:
        jump = lr_jump(f, end)
    else:  # no climb of the norm (a finite divergence under Adam): a jump anywhere, in a run that did not train
        jump = lr_jump(f, end, lookback=end + 1) if trained(f) is None else None
    rising = _still_rising(f)
    first = _first_step_scramble(f, warm)
    joined = joined_group(f, end) if h.onset_step is not None else None
    if not (high or jump or rising or first or joined):
        return None
    return Evidence(per_layer, high, jump, end, warm, rising, first, joined)


_GROUP_JUMP = 10.0  # an added param group's rate this many times the logged (group 0's) rate or more
JOINED_GROUP = "in a param group at lr"  # how scheduled() says a group added at a far higher rate drove it


def joined(schedule: tuple[float, str, str] | None) -> bool:
    """Whether :func:`scheduled`'s reading is an added param group's rate (not the schedule's)."""
    return schedule is not None and JOINED_GROUP in schedule[2]


def joined_group(f: Facts, end: int) -> tuple[int, float, float, list[str]] | None:
    """Parameters that joined (``add_param_group``, an unfrozen stage: a ``layers`` event with its
    groups' rate) in the few steps before the climb began at row ``end``, in a group whose rate is
    ≥ :data:`_GROUP_JUMP`× the logged one (group 0's): ``(step, that rate, the logged rate, layers)``.
    A gradual unfreeze whose decay factor was typed 0.026 for 2.6 gave the groups 0.115, 4.44, 171,
    6565 against 0.003, and read "lower the rate to 0.0003" (group 0's, which was fine)."""
    lo = f.steps[max(0, end - _JOIN_LOOKBACK)] if f.steps else 0
    hi = f.steps[min(end, len(f.steps) - 1)] if f.steps else 0
    for e in f.events_of("layers"):
        at, rate = e.get("step"), e.get("lr")
        if not (isinstance(at, int) and isinstance(rate, (int, float)) and lo <= at <= hi):
            continue
        logged = f.lr[f.index_of(at)]
        if math.isfinite(logged) and logged > 0 and rate >= _GROUP_JUMP * logged:
            names = [str(n) for n in e.get("added") or e.get("parameters") or []]
            return at, float(rate), float(logged), names
    return None


_JOIN_LOOKBACK = 5  # rows before the climb's onset where a join counts


def _first_step_scramble(f: Facts, warm: int) -> tuple[int, float, str, float] | None:
    """The first recorded update ratios (within the warm-up rows), when their median over the layers
    is ≥ :data:`FIRST_STEP_HIGH` and the run stalled (finite, no climb, and did not train; an explosion
    has its own finding and rate): ``(step, median, worst layer, its ratio)``."""
    if f.went_bad or f.healthy.onset_step is not None:
        return None
    for i in range(min(warm, len(f.rows))):
        ratios = {n: r for n in f.layers if math.isfinite(r := f.layer(n, "update_ratio")[i]) and r > 0}
        if not (ratios and f.ok[i]):
            continue
        med = median(list(ratios.values()))
        if med < FIRST_STEP_HIGH or med >= _ZERO_INIT_RATIO or trained(f) is not None:
            # (a median ratio of 1e3 or more: the weights started at 0 — stalled names the init, not the rate)
            return None
        # the layer quoted: the largest ratio of a layer that had weights (one initialised at 0 moves
        # "1e11×" its norm at any rate)
        shown = {n: r for n, r in ratios.items() if r < _ZERO_INIT_RATIO} or ratios
        worst = max(shown.items(), key=lambda kv: kv[1])
        return f.steps[i], med, worst[0], worst[1]
    return None


def scheduled(f: Facts, ev: Evidence) -> tuple[float, str, str] | None:
    """Where the learning rate's own schedule drove the failure (a jump right before the climb, or a
    warm-up that never stopped): ``(the rate to keep, why, what the schedule did)``; ``None``
    otherwise. The one reading of it: this rule's advice and the explosion's."""
    if ev.joined is not None:
        at, rate, logged, names = ev.joined
        onset = f.healthy.onset_step
        then = f"the norm started growing (step {onset})" if onset is not None else "the loss climbed"
        shown = ", ".join(layer_name(n) for n in names[:3]) + (" …" if len(names) > 3 else "")
        did = (
            f"parameters joined the optimizer at step {at} ({shown}) {JOINED_GROUP} {fmt(rate)}, "
            f"{fmt(rate / logged)}× the logged rate {fmt(logged)} (group 0's), right before {then}: check the rate "
            "given to that group (add_param_group, a per-layer decay)"
        )
        return sig(logged, 2), f"the other groups' rate, for the group added at step {at}", did
    if ev.jump is not None:
        at, before, after = ev.jump
        onset = f.healthy.onset_step
        then = f"the norm started growing (step {onset})" if onset is not None else "the loss climbed"
        row = f.index_of(at)
        if row > 0 and f.lr[row - 1] == 0:  # annealed to 0 first: the rate that trained was before that
            did = (
                f"the learning rate rose from 0 to {fmt(after)} at step {at} (it had trained at up to {fmt(before)} "
                f"before its schedule annealed it to 0), right before {then}"
            )
            return sig(before, 2), f"the highest rate that trained before its jump at step {at}", did
        did = f"the learning rate rose from {fmt(before)} to {fmt(after)} at step {at}, right before {then}"
        return sig(before, 2), f"the rate before its jump at step {at}", did
    if ev.rising is not None:
        at, lr_best, lr_last = ev.rising
        did = (
            f"the learning rate kept rising ({fmt(lr_best)} → {fmt(lr_last)}) after the loss was best at "
            f"step {at}, and the loss climbed since: a warm-up that never stops"
        )
        return sig(lr_best, 2), f"the rate where the loss was best, step {at}: stop the warm-up there", did
    return None


def _still_rising(f: Facts) -> tuple[int, float, float] | None:
    """A warm-up that never stopped: the LR rose ≥ 2× from where the loss was best to the end,
    rising all the way, while the smoothed loss climbed ≥ 2× above its best: ``(step, lr at the
    loss's best, last lr)``."""
    rows = [i for i in f.rows if f.ok[i] and math.isfinite(f.loss[i]) and math.isfinite(f.lr[i])]
    if len(rows) < _RISING_MIN:
        return None
    smooth = rolling_median([f.loss[i] for i in rows], _SMOOTH)
    best = min(range(len(smooth)), key=smooth.__getitem__)
    after = [f.lr[i] for i in rows[best:]]
    rose = all(b >= a for a, b in itertools.pairwise(after)) and after[-1] >= LR_JUMP * after[0] > 0
    climbed = smooth[best] > 0 and smooth[-1] >= LR_JUMP * smooth[best]
    return (f.steps[rows[best]], after[0], after[-1]) if rose and climbed else None


def explain(f: Facts, ev: Evidence) -> Finding:
    ranked = sorted(ev.per_layer.items(), key=lambda kv: -kv[1])[:8]
    evidence: dict[str, Any] = {
        "update_ratio_median_by_layer": {n: sig(v, 3) for n, v in ranked},
        "typical_update_ratio": 1e-3,
    }
    lrs = [v for v in f.lr[: ev.end] if math.isfinite(v)]
    lr = lrs[-1] if lrs else math.nan
    estimate: tuple[float, str] | None = None  # the rate to recommend, and why
    parts: list[str] = []
    step: int | None = None
    if ev.jump is not None:
        at, before, after = ev.jump
        evidence.update({"lr_jump_step": at, "lr_before": before, "lr_after": after})
        step = at
    if ev.rising is not None:
        at, lr_best, lr_last = ev.rising
        evidence.update({"lr_still_rising_from_step": at, "lr_at_best_loss": lr_best, "lr_last": lr_last})
        step = step if step is not None else at
    schedule = scheduled(f, ev)
    if schedule is not None:
        rate, why, did = schedule
        parts.append(did)
        estimate = (rate, why)
    if ev.joined is not None:
        evidence.update({"joined_step": ev.joined[0], "joined_group_lr": ev.joined[1]})
        step = step if step is not None else ev.joined[0]
    if ev.first is not None:
        at, med, name, ratio = ev.first
        stall = ends(f.loss_at(0, len(f.rows)))
        start = next((x for x in f.loss if math.isfinite(x)), stall.start)
        evidence.update({"first_step": at, "first_step_update_ratio_median": sig(med, 3)})
        parts.append(
            f"step {at} moved the layers by {fmt(med)} of their weight norm (median over layers; "
            f"{layer_name(name)} {fmt(ratio)}), which scrambles the initial weights; the loss then stalled "
            f"at {fmt(stall.end)} (from {fmt(start)} at step {f.steps[0]})"
        )
        step = step if step is not None else at
        first_lr = f.lr[f.index_of(at)]  # (the rate of that step: a schedule may have decayed it since)
        if math.isfinite(first_lr) and estimate is None:
            estimate = (ratio_lr(first_lr, med), "a first-step update/weight ratio near 1e-2")
    if ev.worst is not None:
        name, ratio = ev.worst
        parts.append(
            f"layer {layer_name(name)} moves {fmt(ratio)} of its weight norm per step (median; ~1e-3 is typical)"
        )
        step = step if step is not None else f.steps[min(ev.warm, len(f.steps) - 1)]
        if math.isfinite(lr) and estimate is None:
            estimate = (ratio_lr(lr, ratio), "an update/weight ratio near 1e-2")
    evidence["lr"] = lr if math.isfinite(lr) else None
    loss = trained(f) if ev.rising is None else None  # a loss climbing at the end did not train
    if loss is not None:
        message = (
            "High update ratios, not a failure: " + "; ".join(parts) + f", but the loss fell {loss.text()} "
            "and stayed finite to a healthy end."
        )
        return Finding("lr_too_high", "info", step, message, evidence, _keep(f, lr))
    message = "Learning rate too high: " + "; ".join(parts) + "."
    from_ratios = ev.jump is None and ev.rising is None and ev.joined is None
    rec = _advice(f, estimate, from_ratios=from_ratios)
    above = _above_base(f) if ev.first is not None else None
    if above is not None:  # the schedule, not the base rate, made the first step's rate
        first_lr, base = above
        message += (
            f" The schedule started the rate at {fmt(first_lr)}, {fmt(first_lr / base)}× its base rate {fmt(base)} "
            "(a warm-up written the wrong way round, or a factor meant for the end)."
        )
        rec = {
            "verified": False,
            "text": "Fix the schedule so that the first steps run at or below the base rate: a warm-up rises to it "
            "(LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))); then the base rate, if still too "
            "high (gradguard tune --lr).",
        }
    return Finding("lr_too_high", "warning", step, message, evidence, rec)


def _above_base(f: Facts) -> tuple[float, float] | None:
    """``(the first step's rate, the base rate)`` where an LR schedule started the rate at ≥ 10× the base
    rate it holds (``initial_lr``, set by torch's schedulers, in ``meta.json``'s optimizer groups)."""
    groups = f.log.meta.get("optimizer_groups")
    base = (
        groups[0].get("initial_lr")
        if isinstance(groups, list) and groups and isinstance(groups[0], dict)
        else None
    )
    first = f.lr[0] if f.rows else math.nan
    if isinstance(base, (int, float)) and base > 0 and math.isfinite(first) and first >= 10 * base:
        return first, float(base)
    return None


def _keep(f: Facts, lr: float) -> dict[str, Any]:
    """A run that trained: keep its rate. No lower one is recommended, nor sent to a few dozen steps
    of ``gradguard tune`` to verify: so short a horizon favours low rates (rnn demo, ``norm:5`` at
    lr 1: 0.022–0.18 fall further in 60 steps, and train worse over 500) and cannot outweigh a run
    that trained. A ``tune.json`` that kept the run's rate is quoted; one that chose another is
    reported as what it is, with no ``lr``."""
    rate = f" (lr={fmt(lr)})" if math.isfinite(lr) else ""
    rec: dict[str, Any] = {
        "text": f"Keep the learning rate that trained{rate}: no lower rate is recommended."
    }
    result = tuned(f)
    if result is not None and result.lr_candidates():
        verified = lr_advice(f, None, "")
        if verified.get("lr_keep"):
            return {**with_lr({}, verified), "text": f"{verified['text']}."}
        rec["text"] += (
            f" {verified['text']}: trials of {result.steps} steps, which favour low rates — compare over a "
            "longer run before changing a rate that trained."
        )
    return rec


def _advice(f: Facts, estimate: tuple[float, str] | None, *, from_ratios: bool) -> dict[str, Any]:
    """Lower the learning rate: the verified rate, or the estimate marked unverified
    (:func:`~gradguard.diagnose.rules._clipping.lr_advice`). An estimate from the update ratios in a
    run that exploded or went non-finite is the rate the explosion advises
    (:func:`~gradguard.diagnose.rules._clipping.lower_lr`, which reads the same ratios): one rate
    and one tune command, not two (a heteroscedastic regression got 0.01 and 0.008). A jump's or a
    warm-up's own rate stays."""
    failed = f.went_bad or f.healthy.onset_step is not None
    lr = lower_lr(f) if failed and from_ratios else lr_advice(f, *(estimate or (None, "")))
    rec = with_lr({}, lr)
    rec["text"] = (
        "Lower the learning rate (or warm it up); clipping bounds a step's size but not a learning rate that is "
        f"too large. {lr['text']}."
    )
    return rec


RULE = Rule("lr_too_high", detect, explain)
