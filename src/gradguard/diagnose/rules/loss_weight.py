"""``loss_weight``: a weighted term of the loss that outweighs the rest of it, in a run that did not train.

``gradguard run`` reads the first loss's additive terms from the ops that made it (``loss = ce +
gp_weight * penalty``: :meth:`gradguard.locate.LossWatch.terms`, ``meta.json`` ``loss_terms``). A term
multiplied by a Python number of :data:`LARGE_WEIGHT` or more that is :data:`DOMINANT` times the rest of
the loss or more at the start sets the gradient's scale and its direction: the optimizer serves the
regularizer, not the task. A field script's input-gradient penalty weighted 1e4 (meant 1e-4): 60 of a
loss of 60.4 at the start, an explosion at SGD 0.05; every threshold and rate advised for the explosion
left it at chance (val accuracy 0.50: clip 680, lr 5e-4, the tune-verified lr 2.5e-4); weights 100 / 10
/ 1 / 1e-4: 0.50 / 0.94 / 0.99 / 0.99. The advice: a weight that makes the term at most a tenth of the
rest at the start. An error, and a driver: the climb it drives is not the rate's or a threshold's.

A term that is never negative (a distance, a penalty: ``mse_loss``, ``norm``…) weighted by a negative
number is maximised, not minimised: a VQ-VAE whose commitment weight was −0.25 (for 0.25) used 1 code
of 64 and read "lower the learning rate or clip", both of which failed. Its sign is the fix.
"""

from __future__ import annotations

import math
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import finite_number, fmt
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import trained

LARGE_WEIGHT = 100.0  # a term's Python-number weight this large or more (WGAN-GP's λ = 10 is not)
DOMINANT = 30.0  # the term this many times the rest of the loss, or more, at the start
_SHARE = 0.1  # the advised weight makes the term this share of the rest at the start


def detect(f: Facts, seen: Seen) -> dict[str, Any] | None:
    noted = f.log.meta.get("loss_terms")
    if not isinstance(noted, dict) or not f.rows or trained(f) is not None:
        return None
    terms = [t for t in noted.get("terms") or () if isinstance(t, dict) and finite_number(t.get("value"))]
    if len(terms) < 2:
        return None
    rewarded = next((t for t in terms if _rewards_a_penalty(t)), None)
    if rewarded is not None:
        return {"term": rewarded, "negative": True, "source": noted.get("source"), "terms": terms}
    top = max(terms, key=lambda t: abs(t["value"]))
    rest = sum(abs(t["value"]) for t in terms if t is not top)
    weight = top.get("weight")
    if not finite_number(weight) or abs(weight) < LARGE_WEIGHT:
        return None
    if not (rest > 0 and abs(top["value"]) >= DOMINANT * rest):
        return None
    return {"term": top, "rest": rest, "source": noted.get("source"), "terms": terms}


_NON_NEGATIVE = frozenset(
    {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
     "binary_cross_entropy_with_logits", "cross_entropy", "kl_div", "norm", "linalg_vector_norm", "frobenius_norm"}
)  # fmt: skip
"""Ops whose value is ≥ 0 whatever their inputs: a term of one weighted by a negative number is maximised."""


def _rewards_a_penalty(term: dict[str, Any]) -> bool:
    """A term ``weight × op`` with a negative Python-number weight and an op that is ≥ 0 (a distance, a
    penalty): minimising the loss grows it without bound (VQ-VAE's commitment weight −0.25 for 0.25)."""
    weight = term.get("weight")
    return finite_number(weight) and weight < 0 and term.get("op") in _NON_NEGATIVE


def _negative(f: Facts, ev: dict[str, Any]) -> Finding:
    term, weight = ev["term"], ev["term"]["weight"]
    made = f"the {term['op']} at {term['source']}" if term.get("source") else f"a {term['op']}"
    message = (
        f"The loss subtracts a term that is never negative: {fmt(weight)} × {made}. Minimising the loss "
        f"maximises that {term['op']} — it grows without bound, and the run did not train."
    )
    text = (
        f"Check the sign of that weight ({fmt(weight)}: a typo for {fmt(-weight)}?): a penalty or distance "
        "(a commitment loss, a regularizer) is added with a positive weight. Lowering the learning rate or "
        "clipping only slows the climb."
    )
    evidence = {"terms": ev["terms"], "negative_weight": weight, "op": term.get("op")}
    return Finding("loss_weight", "error", None, message, evidence, {"verified": False, "text": text})


def explain(f: Facts, ev: dict[str, Any]) -> Finding:
    if ev.get("negative"):
        return _negative(f, ev)
    term, rest, weight = ev["term"], ev["rest"], ev["term"]["weight"]
    where = f" ({ev['source']})" if ev.get("source") else ""
    made = f"the {term['op']} at {term['source']}" if term.get("source") else f"a {term['op']}"
    share = abs(term["value"]) / (abs(term["value"]) + rest)
    message = (
        f"One term of the loss outweighs the rest of it: the loss{where} is a sum of {len(ev['terms'])} terms, and "
        f"{fmt(weight)} × {made} was {fmt(term['value'])} of it at the start ({share:.0%}), against "
        f"{fmt(rest)} for the rest. The gradient follows that term, at its scale: the run did not train."
    )
    advised = 10.0 ** math.floor(
        math.log10(abs(weight) * _SHARE * rest / abs(term["value"]))
    )  # a power of 10
    text = (
        f"Lower that term's weight from {fmt(weight)} so it starts at most a tenth of the rest of the loss: "
        f"{fmt(advised)} or less here (a regularizer or penalty weighted to outweigh the task keeps the model "
        "from fitting it; check the weight for a typo such as 1e4 for 1e-4). Lowering the learning rate or "
        "clipping only slows the same imbalance."
    )
    evidence = {"terms": ev["terms"], "dominant_weight": weight, "rest": rest, "share": round(share, 4)}
    return Finding("loss_weight", "error", None, message, evidence, {"verified": False, "text": text})


RULE = Rule("loss_weight", detect, explain)
