"""``explosion`` (recovered): the guard caught an explosion under ``on_explosion="recover"`` and
rolled the model back; the run went on and may have trained.

The run's own norms may show nothing once the rollback took the climb away (the steps it rewound are
kept in the log, but the run trained after them): a run at lr 0.8 whose norm took off at step 3 and
that the guard rolled back read "No findings", though the rate that made it is still the run's and
the climb recurs at it. A warning with the rate's advice (:func:`~gradguard.diagnose.rules._clipping.lower_lr`);
the explosion rule's own finding, where it has one, is the report (this rule gives way to it).
"""

from __future__ import annotations

from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import fmt
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import lower_lr, with_lr


def detect(f: Facts, seen: Seen) -> list[dict[str, Any]] | None:
    recovered = [e for e in f.events_of("explosion") if e.get("action") == "recover"]
    return recovered or None


def explain(f: Facts, recovered: list[dict[str, Any]]) -> Finding:
    first = recovered[0]
    step, onset = first.get("step"), first.get("onset_step")
    base, peak, lr = first.get("baseline_norm"), first.get("peak_norm"), first.get("lr")
    norms = (
        f"; the norm rose from {fmt(base)} to {fmt(peak)}"
        if isinstance(base, (int, float)) and isinstance(peak, (int, float))
        else ""
    )
    rate = f" at lr {fmt(lr)}" if isinstance(lr, (int, float)) else ""
    times = f" ({len(recovered)} recoveries in all)" if len(recovered) > 1 else ""
    message = (
        f"The guard caught an explosion at step {step} (onset at step {onset}{norms}){rate} and rolled the model "
        f"back (on_explosion='recover'){times}. The run went on, but what made the climb is still the run's: "
        "at the same rate it recurs, and each recovery costs the steps it rewinds."
    )
    advice = lower_lr(f)
    rec = with_lr({}, advice)
    rec["text"] = f"Lower the learning rate. {advice['text']}."
    evidence = {"recoveries": len(recovered), "step": step, "onset_step": onset, "peak_norm": peak, "lr": lr}
    return Finding("explosion", "warning", step if isinstance(step, int) else None, message, evidence, rec)


RULE = Rule("recovered_explosion", detect, explain, finding="explosion")
