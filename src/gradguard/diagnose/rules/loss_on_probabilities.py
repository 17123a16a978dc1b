"""``loss_on_probabilities``: a loss that takes logits was given probabilities.

``CrossEntropyLoss`` applies ``log_softmax`` itself: a model that ends in ``nn.Softmax`` hands it rows in
[0, 1], and the loss can barely move from ``ln K`` (a field script over 100 classes: 4.600–4.603 for the
whole run against ln 100 = 4.605, "No findings"; without the Softmax, accuracy 1.0). The same mistake in
``BCEWithLogitsLoss`` (a sigmoid before it) and ``NLLLoss`` (probabilities where log-probabilities belong:
the loss goes negative). ``gradguard run``'s loss-code watch checks the input of each such loss on the
first steps, on the device (``meta.json`` ``loss_on_probabilities``: every step checked read as
probabilities). An error in a run that did not train, a warning in one that did.
"""

from __future__ import annotations

from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import trained

_WHAT = {
    "cross_entropy": (
        "rows in [0, 1] that sum to 1 (a softmax already applied); cross_entropy applies log_softmax itself, so "
        "the logits it sees are squashed into [0, 1] and the loss can barely move from ln K",
        "Remove the softmax before CrossEntropyLoss / F.cross_entropy: give it the raw logits (nn.Softmax in the "
        "model, or F.softmax on its output); apply softmax only to report probabilities.",
    ),
    "binary_cross_entropy_with_logits": (
        "values all in [0, 1] (a sigmoid already applied); BCEWithLogitsLoss applies the sigmoid itself, so the "
        "prediction it scores stays between 0.5 and 0.73",
        "Remove the sigmoid before BCEWithLogitsLoss / F.binary_cross_entropy_with_logits (give it the raw logits), "
        "or keep the sigmoid and use BCELoss.",
    ),
    "nll_loss": (
        "values all ≥ 0 (probabilities, not log-probabilities); nll_loss takes log-probabilities, and on "
        "probabilities it rewards pushing one of them up without bound",
        "Give NLLLoss / F.nll_loss log-probabilities: F.log_softmax in place of F.softmax (or CrossEntropyLoss on "
        "the raw logits).",
    ),
}


def detect(f: Facts, seen: Seen) -> list[dict[str, Any]] | None:
    noted = f.log.meta.get("loss_on_probabilities")
    if not isinstance(noted, list):
        return None
    found = [n for n in noted if isinstance(n, dict) and n.get("op") in _WHAT]
    return found or None


def explain(f: Facts, found: list[dict[str, Any]]) -> Finding:
    first = found[0]
    what, fix = _WHAT[first["op"]]
    at = f" at {first['source']}" if first.get("source") else ""
    losses = f.loss_at(0, len(f.rows))
    failed = (
        trained(f) is None and bool(losses) and losses[0] > 0
    )  # (a negative loss: not judged by its fall)
    message = f"`{first['op']}`{at} was given probabilities on every step checked: {what}" + (
        ". The run did not train." if failed else "."
    )
    severity = "error" if failed else "warning"
    return Finding(
        "loss_on_probabilities", severity, None, message, {"losses": found}, {"verified": False, "text": fix}
    )


RULE = Rule("loss_on_probabilities", detect, explain)
