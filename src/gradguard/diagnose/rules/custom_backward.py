"""``custom_backward``: a custom autograd Function whose backward is not linear in its incoming gradient,
in a run that did not train.

A backward computes a vector-Jacobian product, linear in the gradient it receives: ``backward(2·g)``
is ``2·backward(g)``. ``gradguard run`` checks each custom Function's backward once on its first graph
(:class:`gradguard._backcheck.BackwardCheck`, ``meta.json`` ``nonlinear_backward``). One that fails
most often forgot the chain rule: it returns the local derivative instead of ``grad_output`` times it,
and every layer below it follows a "gradient" that does not depend on the loss (a field script's
hand-written memory-efficient Swish: a regression at Var(y) = 1.0 for 632 steps under Adam, "No
findings"; with ``grad_output *`` restored, val MSE 0.047). A deliberately non-linear backward (a
gradient clamp) in a run that trained is not reported. An error, and a driver: the growth or the stall
it causes is not the rate's.
"""

from __future__ import annotations

from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import median
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import trained, update_ratios

_STILL = (
    1e-5  # a median update ratio this small: the weights did not move (a deliberate clamp is then not blamed)
)


def detect(f: Facts, seen: Seen) -> list[dict[str, Any]] | None:
    noted = f.log.meta.get("nonlinear_backward")
    if not isinstance(noted, list) or not f.rows or trained(f) is not None:
        return None
    ratios = list(update_ratios(f, 0, len(f.rows)).values())
    if (
        ratios and median(ratios) <= _STILL
    ):  # the weights did not move: the rate is the obvious cause (stalled's)
        return None
    found = [n for n in noted if isinstance(n, dict) and isinstance(n.get("function"), str)]
    return found or None


def explain(f: Facts, found: list[dict[str, Any]]) -> Finding:
    first = found[0]
    where = f" ({first['source']})" if first.get("source") else ""
    more = f" (and {len(found) - 1} more, in the evidence)" if len(found) > 1 else ""
    deviation = first.get("deviation")
    off = f", off by {deviation:.0%} of it" if isinstance(deviation, (int, float)) else ""
    message = (
        f"The custom autograd Function {first['function']}{where}{more} is not linear in the gradient it "
        f"receives: called on 2·g it did not return 2× what it returned on g{off}. The run did not train: "
        "the layers below it follow a gradient that does not come from the loss."
    )
    name = first["function"].rsplit(".", 1)[0]
    text = (
        f"Return grad_output times the local derivative from {first['function']} (the chain rule: "
        "return grad_output * d_out_d_in, one result per forward input), then check it against autograd: "
        f"torch.autograd.gradcheck({name}.apply, (torch.randn(8, dtype=torch.double, requires_grad=True),))."
    )
    return Finding(
        "custom_backward", "error", None, message, {"functions": found}, {"verified": False, "text": text}
    )


RULE = Rule("custom_backward", detect, explain)
