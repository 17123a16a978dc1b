"""``weight_decay``: a weight decay so large that every step multiplies the weights by a factor far
from 1, whatever the gradients.

SGD adds ``weight_decay × w`` to the gradient and AdamW (and any optimizer with decoupled weight
decay) multiplies the weights by ``1 − lr × weight_decay`` at each step. Usual values keep that
product near 1e-5–1e-4 (SGD 0.1 × 5e-4, AdamW 1e-3 × 0.01–0.1); at :data:`PRODUCT_HIGH` or more
each step shrinks the weights by a tenth or more, and above 2 the factor is below −1: the weights
flip sign and grow every step (SGD at lr 0.01 with ``weight_decay=5e2``, a typo for ``5e-4``:
−4× a step, an explosion at step 2 that no clipping stops — the decay is applied inside
``optimizer.step()``, after the gradients are clipped). The optimizer's groups are in ``meta.json``
(``optimizer_groups``, written when the guard starts).

Only a weight decay beyond its usual range (:data:`UNUSUAL`) is blamed: a usual one in a large product
is the learning rate's doing (AdamW at lr 30 with ``weight_decay=0.1``), which ``lr_too_high`` and
the explosion name. Adam, RMSprop and Adagrad add the decay to the gradient before normalising it: no
such product holds for them, and the rule says nothing there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import optimizer_class, trained

PRODUCT_HIGH = 0.1  # lr × weight_decay: each step shrinks the weights by this fraction or more
_MULTIPLIES = frozenset({"SGD", "AdamW"})  # w ← w (1 − lr × weight_decay) (SGD: before momentum)
_USUAL = {"SGD": 5e-4, "AdamW": 0.01}
#: a weight decay beyond its usual range (SGD 1e-5–5e-3, AdamW 0–0.3): below it, a large product is the
#: learning rate's (AdamW at lr 30 with weight_decay 0.1: the rate is the typo, lr_too_high's)
UNUSUAL = {"SGD": 0.01, "AdamW": 1.0}


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The group with the largest ``lr × weight_decay``: its index, lr and weight decay."""

    group: int
    lr: float
    weight_decay: float

    @property
    def factor(self) -> float:
        return 1.0 - self.lr * self.weight_decay


def detect(f: Facts, seen: Seen) -> Evidence | None:
    name = optimizer_class(f)
    groups = f.log.meta.get("optimizer_groups")
    if not isinstance(groups, list):
        return None
    found: Evidence | None = None
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not (name in _MULTIPLIES or g.get("decoupled_weight_decay") is True):
            continue
        lr, wd = g.get("lr"), g.get("weight_decay")
        if not (isinstance(lr, (int, float)) and isinstance(wd, (int, float))):
            continue
        product = float(lr) * float(wd)
        if (
            math.isfinite(product)
            and product >= PRODUCT_HIGH
            and float(wd) >= UNUSUAL.get(name, 1.0)
            and (found is None or product > found.lr * found.weight_decay)
        ):
            found = Evidence(i, float(lr), float(wd))
    return found


def explain(f: Facts, ev: Evidence) -> Finding:
    name = optimizer_class(f) or "the optimizer"
    group = f" (parameter group {ev.group})" if len(f.log.meta.get("optimizer_groups") or []) > 1 else ""
    effect = (
        f"their sign flips and they grow {fmt(abs(ev.factor))}× a step"
        if ev.factor < -1
        else "they shrink toward 0 faster than the gradients can move them"
    )
    message = (
        f"Weight decay far too large: {name}'s weight_decay={ev.weight_decay:g} at lr={ev.lr:g}{group} multiplies "
        f"the weights by 1 − lr × weight_decay = {fmt(ev.factor)} at every step, whatever the gradients: "
        f"{effect} (usual values keep lr × weight_decay near 1e-5–1e-4)."
    )
    usual = _USUAL.get(name, 0.01)
    evidence: dict[str, Any] = {
        "optimizer": name,
        "group": ev.group,
        "lr": ev.lr,
        "weight_decay": ev.weight_decay,
        "lr_times_weight_decay": ev.lr * ev.weight_decay,
        "factor_per_step": ev.factor,
    }
    rec = {
        "weight_decay": usual,
        "verified": False,
        "text": (
            f"Set weight_decay to a usual value (weight_decay={usual:g} for {name}; a typo such as 5e2 for 5e-4 "
            "is common). Neither clipping nor a lower threshold helps: the decay is applied inside "
            "optimizer.step(), after the gradients are clipped."
        ),
    }
    return Finding("weight_decay", _severity(f), f.steps[0] if f.steps else None, message, evidence, rec)


def _severity(f: Facts) -> str:
    if f.went_bad or f.healthy.onset_step is not None:
        return "error"
    return "info" if trained(f) is not None else "warning"


RULE = Rule("weight_decay", detect, explain)
