"""Embedded scenarios that really diverge, run side by side through :class:`gradguard.Guard`.

``gradguard demo`` (or :func:`run_demo`) trains each scenario's configurations — no clipping,
the story's threshold, the one ``gradguard diagnose`` recommends, ``auto``, Adam — each with
its own run directory in one demo folder, prints a summary table and writes one HTML report:

* ``rnn`` (:mod:`gradguard.demos.rnn`): a character-level LSTM language model trained with SGD
  at learning rate 1, the textbook recipe for clipping (Zaremba et al. 2014).
* ``deepsad`` (:mod:`gradguard.demos.deepsad`): Deep SAD anomaly detection on scikit-learn's
  digits — an explosion, the over-clipping that looks like vanishing gradients, and the fix.

Example:
    >>> from gradguard.demos import run_demo
    >>> run_demo("deepsad", out="demo-runs")  # doctest: +SKIP
    0
"""

from __future__ import annotations

from gradguard.demos._run import (
    SCENARIOS,
    STEPS_ENV,
    Row,
    Verification,
    run_demo,
    run_scenario,
    takeaways,
    verified_advice,
    verify,
)

__all__ = [
    "SCENARIOS",
    "STEPS_ENV",
    "Row",
    "Verification",
    "run_demo",
    "run_scenario",
    "takeaways",
    "verified_advice",
    "verify",
]
