"""``optimizer_setting``: an optimizer hyperparameter outside the range where the optimizer works, in a
run that failed or did not train (``meta.json`` ``optimizer_groups``, written when the guard starts).

* a running average that never forgets: SGD's ``momentum ≥ 1`` (the velocity sums every gradient ever
  seen: an EmbeddingBag classifier at momentum 1.0 went NaN by epoch 2 and read "clip at 0.88 or lr 0.05",
  both of which only delayed it; momentum 0.9 trains), Adam's ``betas[0] ≥ 1`` or ``betas[1] ≥ 1``,
  RMSprop's ``alpha ≥ 1`` (its square average stays at its initial 0: every step divides by ``eps``;
  a field script read "lr=1e-09", which only trained by turning RMSprop into SGD at lr/eps);
* Adam, RMSprop, Adagrad and their kin with ``weight_decay ≥`` :data:`COUPLED_HIGH`: they add
  ``weight_decay × w`` to the gradient before normalising it (L2, coupled), so that term outweighs the
  loss's gradient and every normalised step pulls the weights toward 0 at ~lr, whatever the loss (an AdamW
  config's ``weight_decay=1.0`` given to Adam: a classifier at chance, "lr_too_high … lr=4e-5", which did not
  train; AdamW trains it to 1.0). AdamW and SGD's decay are ``weight_decay``'s.

An error where the run went non-finite or its norm climbed, a warning where it did not train, nothing
where it trained; a driver: the climb it causes is not the rate's or a threshold's.
"""

from __future__ import annotations

from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import finite_number
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import optimizer_class, trained

COUPLED_HIGH = 0.1  # weight_decay this large in an optimizer that adds it to the gradient (L2)
_COUPLED = frozenset({"Adam", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "Adadelta"})


def detect(f: Facts, seen: Seen) -> dict[str, Any] | None:
    groups = f.log.meta.get("optimizer_groups")
    if not isinstance(groups, list) or (
        not f.went_bad and f.healthy.onset_step is None and trained(f) is not None
    ):
        return None
    name = optimizer_class(f)
    for i, g in enumerate(groups):
        if isinstance(g, dict):
            found = _unusual(name, g)
            if found is not None:
                return {"group": i, **found}
    return None


def _unusual(name: str, g: dict[str, Any]) -> dict[str, Any] | None:
    momentum, betas, alpha, wd = g.get("momentum"), g.get("betas"), g.get("alpha"), g.get("weight_decay")
    if name == "SGD" and finite_number(momentum) and momentum >= 1:
        return {
            "setting": f"momentum={momentum:g}",
            "why": "the velocity then sums every gradient ever seen instead of a running average of the recent ones, "
            "so the steps grow without bound",
            "fix": "Use momentum below 1 (0.9 is the usual value; nesterov=True if wanted)",
        }
    if isinstance(betas, list) and any(finite_number(b) and b >= 1 for b in betas):
        return {
            "setting": f"betas=({', '.join(f'{b:g}' for b in betas)})",
            "why": "a beta of 1 or more keeps the moment estimate at its start (0) or lets it grow: the step's "
            "numerator or denominator never tracks the gradients",
            "fix": "Use betas below 1 (the usual (0.9, 0.999))",
        }
    if name == "RMSprop" and finite_number(alpha) and alpha >= 1:
        return {
            "setting": f"alpha={alpha:g}",
            "why": "the square average then stays at its initial 0, so every step divides the gradient by eps",
            "fix": "Use alpha below 1 (the usual 0.99)",
        }
    if name in _COUPLED and not g.get("decoupled_weight_decay") and finite_number(wd) and wd >= COUPLED_HIGH:
        return {
            "setting": f"weight_decay={wd:g}",
            "why": f"{name} adds weight_decay × w to the gradient before normalising it (L2, coupled): that term "
            "outweighs the loss's gradient, and every normalised step pulls the weights toward 0 at ~lr, whatever "
            "the loss",
            "fix": f"Use torch.optim.AdamW for decoupled weight decay (a weight_decay of {wd:g} belongs to an AdamW "
            f"config), or a weight_decay near 1e-5–1e-4 with {name}",
        }
    return None


def explain(f: Facts, ev: dict[str, Any]) -> Finding:
    name = optimizer_class(f) or "the optimizer"
    failed = f.went_bad or f.healthy.onset_step is not None
    group = f" (parameter group {ev['group']})" if len(f.log.meta.get("optimizer_groups") or []) > 1 else ""
    message = (
        f"{name}'s {ev['setting']}{group} is outside the range where it works: {ev['why']}. The run "
        + ("went wrong with it." if failed else "did not train.")
    )
    rec = {
        "verified": False,
        "text": f"{ev['fix']}. Lowering the learning rate or clipping only delays the same failure.",
    }
    evidence = {"optimizer": name, "group": ev["group"], "setting": ev["setting"]}
    return Finding(
        "optimizer_setting",
        "error" if failed else "warning",
        f.steps[0] if f.steps else None,
        message,
        evidence,
        rec,
    )


RULE = Rule("optimizer_setting", detect, explain)
