"""``vanishing``: per-layer grad norms decaying toward the input by ≥ 100× (mostly monotone).

Not in a run whose first step scrambled the initial weights and then stalled (``lr_too_high``'s
first-step evidence): the wrecked layers' gradients look vanishing, and the rate is the cause.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt, layer_name, median, sig
from gradguard.diagnose.rules import Rule, Seen

VANISHING_RATIO = 100.0  # output-side layer's median grad norm over the input side's
MONOTONE = 0.75  # this share of neighbouring layers must grow toward the output
WITHIN = 10.0  # ...and one top-level module at least must see a fall of this much along its own layers


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Median grad norm per layer over the healthy window (input side first), and how it rises."""

    medians: list[tuple[str, float]]
    ratio: float
    rising: float


def detect(f: Facts, seen: Seen) -> Evidence | None:
    wrecked = seen.evidence("lr_too_high")
    if wrecked is not None and wrecked.first is not None:
        return None  # a first step that scrambled the weights, then a stall: the rate's (lr_too_high)
    h = f.healthy
    if len(f.layers) < 3 or h.first_step is None or h.last_step is None:
        return None
    lo, hi = f.index_of(h.first_step), f.index_of(h.last_step) + 1
    meds: list[tuple[str, float]] = []
    for name in f.layers:
        series = f.layer(name, "grad_norm")
        vals = [series[i] for i in range(lo, hi) if f.ok[i] and math.isfinite(series[i]) and series[i] > 0]
        if vals:
            meds.append((name, median(vals)))
    if len(meds) < 3:
        return None
    ratio = meds[-1][1] / meds[0][1]
    rising = sum(1 for a, b in itertools.pairwise(meds) if b[1] > a[1]) / (len(meds) - 1)
    if ratio < VANISHING_RATIO or rising < MONOTONE or _between_modules(meds):
        return None
    return Evidence(meds, ratio, rising)


def _between_modules(meds: list[tuple[str, float]]) -> bool:
    """Whether the fall lies between the model's top-level modules, not along any of them: each of its
    modules (``pi.*``, ``v.*``) keeps its gradient within :data:`WITHIN` × from its input side to its
    output side. Separate towers on separate losses (PPO's policy and value networks, a value loss's
    gradients 500× the policy's) are not a chain: the registration order put one after the other."""
    groups: dict[str, list[float]] = {}
    for name, value in meds:
        groups.setdefault(name.split(".")[0], []).append(value)
    chains = [
        values for values in groups.values() if len(values) >= 2
    ]  # (a Sequential's "0", "2": no modules)
    return len(chains) >= 2 and all(values[-1] / values[0] < WITHIN for values in chains)


def explain(f: Facts, ev: Evidence) -> Finding:
    (first_name, first), (last_name, last) = ev.medians[0], ev.medians[-1]
    orders = round(math.log10(ev.ratio), 1)
    evidence = {
        "median_grad_norm_by_layer": {n: sig(v, 3) for n, v in ev.medians[:40]},
        "output_over_input": sig(ev.ratio, 3),
        "orders_of_magnitude": orders,
        "monotone_fraction": round(ev.rising, 2),
    }
    message = (
        f"Vanishing gradients: the gradient norm falls {orders} orders of magnitude from "
        f"the output-side layer {layer_name(last_name)} (median {fmt(last)}) to the input-side layer "
        f"{layer_name(first_name)} (median {fmt(first)}) over the healthy steps."
    )
    rec = {
        "text": "Use non-saturating activations (ReLU/GELU instead of sigmoid/tanh), residual connections, "
        "normalisation (LayerNorm/BatchNorm) and a matching init (Kaiming/Xavier); for RNNs an LSTM/GRU. "
        "Clipping does not help here (if max_norm clips most steps, see over_clipping).",
    }
    return Finding("vanishing", "warning", f.healthy.first_step, message, evidence, rec)


RULE = Rule("vanishing", detect, explain)
