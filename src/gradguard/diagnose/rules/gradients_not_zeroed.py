"""``gradients_not_zeroed``: the script never zeroed the gradients between optimizer steps.

``gradguard run`` counts the script's ``zero_grad()`` calls (of any optimizer or module) and keeps
the identity of each optimizer's first gradient: three steps in a row with no call and the same
``.grad`` tensors (``p.grad = None`` would have made new ones) are a script whose gradients add up
— each step applies the sum of every gradient since the last zeroing, so the step grows with the
run (a ``zero_grad()`` under the wrong condition in a gradient-accumulation loop). ``meta.json``'s
``gradients_not_zeroed`` is the first step that did not zero.

No threshold or learning rate fixes it: a threshold bounds the sum, whose direction is no longer the
batch's gradient (clipped at 3.7 it trained to a loss of 1.6–6.7 from 0.69), and a lower rate only
delays the climb. An error where the run failed (non-finite, an explosion, a divergence), an
``info`` where it did not (a script that zeroes in its own way, ``p.grad.zero_()``, reads so too).
"""

from __future__ import annotations

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.rules import Rule, Seen


def detect(f: Facts, seen: Seen) -> int | None:
    step = f.log.meta.get("gradients_not_zeroed")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def explain(f: Facts, step: int) -> Finding:
    failed = f.went_bad or f.healthy.onset_step is not None or seen_growth(f)
    message = (
        f"The gradients were not zeroed between optimizer steps from step {step} on: no zero_grad() call, "
        "and the same .grad tensors step after step. Backward adds into .grad, so each step applied the sum of "
        "every gradient since the last zeroing"
        + (", which grows with the run: the growth of the norm follows from it." if failed else ".")
        + (
            ""
            if failed
            else " If the script zeroes them another way (p.grad.zero_() in a loop), this is no fault."
        )
    )
    rec = {
        "text": "Call optimizer.zero_grad() once per optimizer step: before each backward, or (gradient "
        "accumulation) right after optimizer.step(). Neither a threshold nor a lower learning rate fixes it: "
        "the step then follows the running sum, not the batch's gradient."
    }
    evidence = {"first_step_not_zeroed": step}
    return Finding("gradients_not_zeroed", "error" if failed else "info", step, message, evidence, rec)


def seen_growth(f: Facts) -> bool:
    """Whether the norm at the end is 10× or more its level at the start (the sum growing)."""
    norms = [n for n in f.norm if n == n and n > 0]
    if len(norms) < 10:
        return False
    k = max(1, len(norms) // 10)
    start, end = sorted(norms[:k])[k // 2], sorted(norms[-k:])[k // 2]
    return end >= 10 * start


RULE = Rule("gradients_not_zeroed", detect, explain)
