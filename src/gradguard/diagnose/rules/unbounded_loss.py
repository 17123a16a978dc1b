"""``unbounded_loss``: the loss fell without a floor — negative, its size growing by orders of
magnitude until the run went non-finite (or the weights ran away).

An objective with no lower bound is minimised by scaling the model's outputs up: a WGAN critic
without its Lipschitz constraint (no weight clipping, gradient penalty or spectral norm), a
Gaussian likelihood whose learned variance has no floor, a loss that rewards an output's size.
The gradient norm then explodes too, but the explosion is the symptom: clipping the norm only
slows the drift, and the advice is to bound the objective. Reported before ``explosion`` (the
registry), so it heads the verdict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradguard.diagnose.facts import WEIGHT_MOVED, Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt, median, sig
from gradguard.diagnose.rules import Rule, Seen

FALL_FACTOR = 100.0  # the most negative loss, over the size of the first losses
FINITE_FALL_FACTOR = 1e4  # the same, for a run that stayed finite (then the weights must have run away)
_START = 5  # first finite losses that give the loss's scale
_LATE = 0.2  # the most negative loss lies in this last share of the finite losses: still falling
_TINY = 1e-3  # a floor on the scale of losses that start at about 0
_RAN_AWAY = 10.0  # a layer's weight norm grew this much
_FAR = 1e6  # a fall this far over the scale needs a layer only to have moved (WEIGHT_MOVED), not run away


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The finite losses' scale at the start (the median size of the first :data:`_START`), the most
    negative loss and its step, the median of the first losses (``start``) and the first loss itself
    (``first``, at ``first_step``: the start of the run a user reads in the log)."""

    scale: float
    low: float
    low_step: int
    start: float
    first: float
    first_step: int


def detect(f: Facts, seen: Seen) -> Evidence | None:
    rows = [i for i in f.rows if math.isfinite(f.loss[i]) and not f.skipped[i]]
    if len(rows) < _START + 1:
        return None
    if (
        f.went_bad and f.trouble <= rows[0]
    ):  # non-finite before the loss could fall (a REINFORCE return's std of
        return None  # one value at step 0): the objective's fall since drove nothing, the op did
    first = [f.loss[i] for i in rows[:_START]]
    scale = max(median([abs(v) for v in first]), _TINY)
    at = min(range(len(rows)), key=lambda j: f.loss[rows[j]])
    low = f.loss[rows[at]]
    if not low < 0 or at < (1 - _LATE) * (len(rows) - 1):
        return None
    # (a clipped run's weights grow slower: AdamW under clip 1.0 drove a BCE with 0/255 targets to -7e6
    # while its layers grew 2-7x, and read "No findings")
    # (nor need they, where the loss fell by orders of magnitude more: an energy-based model whose Langevin
    # sampler climbed the energy walked its negative samples, not its weights, to E = -5e9 — "No findings")
    far = -low >= _FAR * scale
    ran_away = any(
        r >= (WEIGHT_MOVED if f.clip_kind != "none" or far else _RAN_AWAY)
        for r, _ in f.weight_ratios.values()
    )
    factor = FALL_FACTOR if f.went_bad else FINITE_FALL_FACTOR
    if -low < factor * scale or not (f.went_bad or ran_away):
        return None
    return Evidence(scale, low, f.steps[rows[at]], median(first), first[0], f.steps[rows[0]])


_NEGATIVE_START = -0.5  # a first loss this negative: a log-likelihood of a few classes (-ln 8 = -2.1), not ~0


def explain(f: Facts, ev: Evidence) -> Finding:
    evidence: dict[str, Any] = {
        "loss_start": sig(ev.first, 4),
        "loss_start_step": ev.first_step,
        "loss_start_median": sig(ev.start, 4),  # of the first _START losses
        "loss_lowest": sig(ev.low, 4),
        "loss_lowest_step": ev.low_step,
        "fall_over_start": sig(-ev.low / ev.scale, 3),
        "went_nonfinite": f.went_bad,
    }
    grown = {n: sig(r, 3) for n, (r, _) in f.weight_ratios.items() if r >= _RAN_AWAY}
    if grown:
        evidence["weight_norm_growth"] = grown
    end = f"; the run went non-finite at step {f.steps[f.trouble]}" if f.went_bad else ""
    message = (
        f"Unbounded loss: the loss fell from {fmt(ev.first)} at the start of the run (step {ev.first_step}) to "
        f"{fmt(ev.low)} by step {ev.low_step} — {fmt(-ev.low / ev.scale)}× the size of its first {_START} losses "
        f"(their median), still falling{end}. The objective has no lower bound: "
        "the model lowers it by scaling its outputs up, and the gradients explode with them."
    )
    sign = (
        "The loss was already negative at its first step: a log-likelihood (or a reward, an accuracy) minimised "
        "instead of maximised — check its sign first (loss = -log_probs.gather(1, y[:, None]).mean(), or "
        "F.nll_loss / F.cross_entropy, which carry the minus). "
        if ev.first <= _NEGATIVE_START  # (a WGAN critic starts near 0, of either sign)
        else ""
    )
    rec = {
        "text": sign
        + "Bound the objective. A loss that is ≥ 0 for valid targets (cross-entropy, BCE, MSE) that goes "
        "negative has targets outside its range: BCE's must lie in [0, 1] (masks stored as 0/255 need / 255, "
        "labels as -1/1 need (y + 1) / 2). A WGAN critic needs its Lipschitz constraint: a gradient penalty (WGAN-GP, "
        "λ·(‖∇D(x̂)‖ − 1)² on interpolates) or torch.nn.utils.parametrizations.spectral_norm on its layers. "
        "A penalty or log-prior added with the wrong sign (loss - λ·‖w‖² where + was meant, a MAP objective "
        "minimising +log p(w)) rewards growing weights: check each term's sign. "
        "Other losses: a floor on a learned variance (log_var.clamp(min=-10)), a margin, or weight decay; an "
        "energy-based model's negative samples must descend the energy (Langevin: x - step * grad_x E(x) + noise; "
        "a flipped sign walks them off to ever lower energy), plus a penalty on E's size (α·(E⁺² + E⁻²)). "
        "Clipping the gradient norm only slows the drift.",
    }
    return Finding("unbounded_loss", "error", ev.low_step, message, evidence, rec)


RULE = Rule("unbounded_loss", detect, explain)
