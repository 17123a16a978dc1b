"""``loss_code_warning``: torch warned in the script's loss code (under ``gradguard run``).

A torch function that warns while computing the loss usually computes something other than what
was meant, and the run goes on as if nothing happened: ``MSELoss`` of an output ``(N, 1)`` against a
target ``(N,)`` broadcasts to ``(N, N)`` ("Using a target size … different to the input size"), and a
regression that fits the mean reads as a stalled run (a field script: loss at Var(y) for 632 steps,
"No findings"; with the shapes matched, R² 0.91). The loss-code watch keeps the warnings its calls
raise (:data:`gradguard.locate.WATCHED_WARNINGS`), with the script's line, in ``meta.json``
(``loss_code_warnings``). A warning: the run may still have trained; a stalled run gives way to it.
"""

from __future__ import annotations

from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import trained

_BROADCAST = "different to the input size"


def detect(f: Facts, seen: Seen) -> list[dict[str, str]] | None:
    noted = f.log.meta.get("loss_code_warnings")
    if not isinstance(noted, list):
        return None
    found = [w for w in noted if isinstance(w, dict) and isinstance(w.get("warning"), str)]
    return found or None


def explain(f: Facts, noted: list[dict[str, str]]) -> Finding:
    first = noted[0]
    where = f" at {first['source']}" if first.get("source") else ""
    more = f" (and {len(noted) - 1} more, in the evidence)" if len(noted) > 1 else ""
    message = (
        f"torch warned in the loss code{where}: {first['warning']}{more}. A loss computed from what torch "
        "warns of is not the loss that was meant, and training goes on with it."
    )
    if _BROADCAST in first["warning"]:
        text = (
            "Make the output and the target the same shape before the loss (out.squeeze(-1), or the target "
            "y.view(-1, 1)): the loss broadcast them to a matrix of every output against every target, and "
            "the model learns their mean."
        )
    else:
        text = "Fix what torch warns of at that line, then run again."
    evidence: dict[str, Any] = {"warnings": noted}
    severity = "warning"
    if trained(f) is not None:  # the loss fell as it should: a warning torch gives of harmless code too
        severity = "info"
        message += " The run trained, so it may be harmless here."
    return Finding("loss_code_warning", severity, None, message, evidence, {"verified": False, "text": text})


RULE = Rule("loss_code_warning", detect, explain)
