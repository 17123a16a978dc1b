"""``weight_growth``: a layer's weight norm grew ≥ 10× over its first measured value — a warning where the
run failed or did not train; in a run that trained (finite to a healthy end, its loss fell) an info: a
layer initialised small (a CRF's transitions at 0.1, embeddings at 1e-3) grows while it learns."""

from __future__ import annotations

import dataclasses
import math

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt, sig
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import trained

WEIGHT_GROWTH_FACTOR = 10.0  # a layer's weight norm over its first measured value


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The layers that grew: ``{layer: (peak / first weight norm, step of the peak)}``."""

    grown: dict[str, tuple[float, int]]


def detect(f: Facts, seen: Seen) -> Evidence | None:
    grown = {n: rs for n, rs in f.weight_ratios.items() if rs[0] >= WEIGHT_GROWTH_FACTOR}
    return Evidence(grown) if grown else None


def explain(f: Facts, ev: Evidence) -> Finding:
    name, (ratio, at) = max(ev.grown.items(), key=lambda kv: kv[1][0])
    series = [(f.steps[i], v) for i, v in enumerate(f.layer(name, "weight_norm")) if math.isfinite(v)]
    start = next(v for _, v in series if v > 1e-8)
    step = next((s for s, v in series if v >= WEIGHT_GROWTH_FACTOR * start), at)
    evidence = {
        "layers": {n: sig(r, 3) for n, (r, _) in sorted(ev.grown.items(), key=lambda kv: -kv[1][0])[:8]},
        "layer": name,
        "weight_norm_start": sig(start, 4),
        "weight_norm_peak": sig(start * ratio, 4),
        "peak_step": at,
    }
    message = (
        f"Weight growth: the weights of layer {f.layer_label(name)} grew {fmt(ratio)}× (norm {fmt(start)} → "
        f"{fmt(start * ratio)}); {len(ev.grown)} layer(s) grew by 10× or more."
    )
    rec = {
        "text": "Weights growing by orders of magnitude go with a too-large learning rate and precede "
        "explosions: lower the LR, add weight decay (AdamW), and clip the global norm.",
    }
    scalars = f.root_scalars(name)
    if scalars:  # a learned temperature or scale: unbounded, and free to cross 0 (its norm hides the sign)
        rec = {
            "text": f"{', '.join(scalars)} is a learned scalar with no bound: its size is its value (a temperature "
            "of 27 flattens every softmax; a negative one inverts them), so a lower rate only slows its drift. "
            "Parametrize it positive and bounded (t = log_t.exp().clamp(0.05, 10), or softplus), fit it after "
            "training on held-out data (temperature scaling), or fix it.",
        }
    loss = trained(f)
    if loss is not None:
        message += (
            f" The run trained (loss {fmt(loss.start)} → {fmt(loss.end)}) and stayed finite: a layer that started "
            "small grows while it learns."
        )
        rec = {
            "text": "Nothing to fix while the loss falls; if the norm keeps climbing on a longer run, add weight decay."
        }
        return Finding("weight_growth", "info", step, message, evidence, rec)
    return Finding("weight_growth", "warning", step, message, evidence, rec)


RULE = Rule("weight_growth", detect, explain)
