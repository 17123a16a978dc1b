"""``target_network``: a model the script calls but no optimizer steps (a target network, an EMA
teacher, updated by hand) whose weights went non-finite or huge, in a run that failed.

``gradguard run`` checks, at the first bad step, the models the script called whose parameters no
guarded optimizer steps (``meta.json`` ``nonfinite_model``). Its output feeds the loss as a target,
so its blow-up reads as the data going bad or as the trained model's explosion: a BYOL whose EMA decay
was 99.6 (a percent, for 0.996) read "clean the data"; a mean teacher read "explosion: clip or lower
the rate". The fix is that hand-written update. An error, and a driver: the growth it drives is not
the rate's or a threshold's, and the bad data it feeds is not the dataset's.
"""

from __future__ import annotations

from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.rules import Rule, Seen
from gradguard.diagnose.rules._clipping import trained


def detect(f: Facts, seen: Seen) -> dict[str, Any] | None:
    noted = f.log.meta.get("nonfinite_model")
    if not isinstance(noted, dict) or trained(f) is not None:
        return None
    return noted


def explain(f: Facts, noted: dict[str, Any]) -> Finding:
    name, cls = noted.get("model"), noted.get("class")
    params = ", ".join(str(p) for p in (noted.get("parameters") or [])[:3])
    message = (
        f"{name} ({cls}), a model the script calls but no optimizer steps, holds non-finite or huge weights "
        f"({params}): it is updated by hand (a target network, an EMA teacher), and its output — the loss's "
        "target — blew up with it. The data, the learning rate and the clipping threshold are not the cause."
    )
    text = (
        "Fix the hand-written update of that model: an EMA decay is in [0, 1] (0.996, not 99.6: a percent "
        "multiplies the weights by ~99 a step), a target network copies finite weights (load_state_dict of the "
        "online model); check torch.isfinite(p).all() on its parameters after each update."
    )
    return Finding(
        "target_network", "error", None, message, {"model": noted}, {"verified": False, "text": text}
    )


RULE = Rule("target_network", detect, explain)
