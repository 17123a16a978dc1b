"""Rules over a run log → findings, each with its evidence and a recommendation (reads files only).

:func:`diagnose` reads a run directory (see :mod:`gradguard.runlog`) and returns a list of
:class:`Finding`. Each finding has a stable ``id``:

============================ ========================================================================
``unbounded_loss``           the loss fell without a floor (negative, by orders of magnitude) until the run
                             went non-finite: an objective with no lower bound (a WGAN critic without its
                             Lipschitz constraint); bound it (gradient penalty, spectral norm)
``explosion``                the gradient norm grew by an order of magnitude or more over its healthy
                             level (growth trend, z-score, the layer that grew first, weights growing);
                             or growth too fast for the norms to show (a float32 overflow in an ordinary
                             op, an update as large as the weights); not a rise while the loss kept
                             falling in a finite run (Adam's early surge), at most an info there
``over_clipping``            a fixed threshold clips more than half of the steps: the stall that looks
                             like vanishing gradients (clip rate, median norm / threshold, effective
                             LR); an adaptive clipper that stalled the loss; a threshold of 0 that
                             zeroed the gradients
``vanishing``                per-layer gradient norms decaying toward the input by orders of magnitude
``divergence``               the loss (or the weights) growing by orders of magnitude while finite
``nonfinite_op``             the op that produced the first NaN/inf (from the locate event) and the fix its
                             evidence points to (a zero denominator, a masked row, …; a custom Function's
                             backward by name; a NaN born inside ``optimizer.step()`` with the optimizer,
                             its parameters and hyperparameters)
``target_network``           (``gradguard run``) a model the script calls but no optimizer steps (a target
                             network, an EMA teacher) whose hand-written update made its weights non-finite
                             or huge: the targets it feeds blew up with it
``bad_data``                 a non-finite tensor entering the step, named (input, target, label, state
                             carried from an earlier step); a lone unlocated step: warning
``lr_too_high``              update/weight ratios far above ~1e-3, or an LR increase right before growth;
                             the rate ``gradguard tune --lr`` verified, else an estimate marked unverified
``weight_growth``            a layer's weight norm growing by an order of magnitude
``loss_scale_collapse``      the AMP GradScaler's scale collapsing: fp16 cannot hold the gradients
``weight_decay``             SGD's / AdamW's ``lr × weight_decay`` ≥ 0.1: the weights multiplied by a factor
                             far from 1 at every step (a typo such as 5e2 for 5e-4)
``gradients_not_zeroed``     no ``zero_grad()`` between optimizer steps (``gradguard run`` sees it): each
                             step applied the running sum of the gradients
``optimizer_setting``        momentum / betas / RMSprop alpha ≥ 1, or Adam's kin with an AdamW config's
                             weight_decay, in a run that failed or did not train
``custom_backward``          (``gradguard run``) a custom autograd Function whose backward is not linear
                             in its incoming gradient (the chain rule forgotten), in a run that did not train
``loss_weight``              (``gradguard run``) a loss term weighted ≥ 100 that outweighs the rest ≥ 30×
``clip_before_backward``     (``gradguard run``) the script's clip called before ``backward()``: it clipped nothing
``loss_on_probabilities``    (``gradguard run``) a logits loss given probabilities (a softmax before
                             CrossEntropyLoss, a sigmoid before BCEWithLogitsLoss, NLLLoss without the log)
``logit_scale``              (``gradguard run``) logits ÷ a temperature ≤ 0.02 before a classification loss
``lr_schedule``              the learning rate went negative, or a schedule collapsed it mid-run
``loss_code_warning``        (``gradguard run``) torch warned in the loss code (a broadcast, an implicit dim)
``stalled``                  a finite run that did not train and that no other rule explains (the loss
                             stayed near its start, its second half flat), with the update ratios'
                             cause: steps too large (lower the rate) or too small (raise it)
``incomplete_log``           the log may lack records: the run was not closed (killed, crashed, or still
                             going: said so when it was written recently), or disk writes lost some
============================ ========================================================================

Several optimizers (a GAN, an actor-critic; ``gradguard run`` writes the first optimizer's log in
the run directory the user named and the others' in its ``children``, ``optimizer1``, …):
:func:`diagnose` on that root reads every child too. Each finding's message starts with its
optimizer (class, what it steps) and the global step (the process-wide optimizer step), its
evidence holds them and the run directory, and the run that went non-finite first (by global step)
leads, so the headline is the failing optimizer's. A run whose forward wrote NaN into buffers (a
BatchNorm's running statistics) that another optimizer's model then read (a linear probe over the
encoder) leads too: the other run's ``bad_data`` is said as its consequence, a warning.

How it is built: the facts layer (:mod:`gradguard.diagnose.facts`, over the run table of
:mod:`gradguard.runtable`) reads the run once; each rule is a module of
:mod:`gradguard.diagnose.rules` (detect → evidence, explain → finding); the precedence between
rules (which runs first, which gives way to which) is the registry there, and nowhere else.

The recommended clipping threshold (``finding.recommendation["max_norm"]``) always comes from the
**healthy** pre-clip norms (:func:`healthy_window`): the finite norms recorded before the norm
started growing (the first step at 3× the median of the norms before it that stays there), before
the first non-finite or overflowing step, with spikes and lone bad batches left out. From a window
of 50 norms or more, or from a run that never went wrong, it is ``min(p90, 2 × p50)``: about the
90th percentile of the Deep Learning Tuning Playbook, capped at twice the median so that the first
steps of a climb cannot loosen it (within the 0.5–10× the mean norm that Pascanu, Mikolov &
Bengio, ICML 2013, found to converge). From a shorter window that ends in trouble (a run that went
wrong early) it is the median: a 90th percentile taken over a start that is already climbing was
too loose in a Deep SAD probe, where the median kept all seeds finite. For over-clipping it is
never below the median pre-clip norm of the run's first steps, the closest the clipped run comes
to the unclipped one.

Example:
    >>> from gradguard.diagnose import diagnose, recommended_max_norm
    >>> findings = diagnose("gradguard-runs")             # doctest: +SKIP
    >>> [(f.id, f.severity, f.step) for f in findings]     # doctest: +SKIP
    [('explosion', 'error', 61), ('lr_too_high', 'warning', 60)]
    >>> recommended_max_norm(findings)                     # doctest: +SKIP
    0.93
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterable
from typing import Any

from gradguard.diagnose import rules
from gradguard.diagnose.facts import Facts, fields
from gradguard.diagnose.finding import SEVERITIES, Finding
from gradguard.diagnose.healthy import HealthyWindow
from gradguard.runlog import FINDINGS_FILE, RunLog, atomic_write_json, read_run

__all__ = [
    "RULES",
    "SEVERITIES",
    "Finding",
    "HealthyWindow",
    "diagnose",
    "first_nonfinite",
    "headline",
    "healthy_window",
    "recommended_max_norm",
    "to_json",
    "write_findings",
]

RULES: tuple[str, ...] = rules.finding_ids()
"""The stable finding ids, in report order (the registry's, :data:`gradguard.diagnose.rules.REGISTRY`)."""


def _as_log(run: RunLog | str | os.PathLike[str]) -> RunLog:
    """``run`` read as its run table (no record kept: memory bounded by the columns), or as given."""
    return run if isinstance(run, RunLog) else read_run(run, records=False)


def diagnose(run: RunLog | str | os.PathLike[str], *, write: bool = False) -> list[Finding]:
    """Run every rule over a run log; return the findings, most severe first.

    A healthy run gives ``[]``. Rules and thresholds are listed in the module docstring
    (:mod:`gradguard.diagnose`); every threshold recommendation comes from the healthy norms
    (:func:`healthy_window`).

    Args:
        run: a :class:`~gradguard.runlog.RunLog`, a run directory, or a folder of runs (the newest).
        write: also write ``findings.json`` into the run directory (atomically). A run directory
            that cannot be written to is reported with a :class:`RuntimeWarning`, not an error.

    Returns:
        The findings (see :class:`Finding`).

    Raises:
        GradGuardError: ``run`` is a path holding no run directory.

    Example:
        >>> import pathlib, tempfile
        >>> from gradguard.runlog import RunWriter
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with RunWriter(path) as w:
        ...     w.write_metrics([{"step": s, "loss": 1.0 / (s + 1), "grad_norm": 1.0} for s in range(50)])
        >>> diagnose(path)
        []
    """
    log = _as_log(run)
    children = _children(log)
    findings = rules.evaluate(Facts(log)) if not children else _of_every_optimizer(log, children)
    if write:
        write_findings(log, findings)
    return findings


def _children(log: RunLog) -> list[RunLog]:
    """The run directories of the other optimizers of the process (``meta.json``'s ``children``,
    written by ``gradguard run``: ``optimizer1``, …, each a run directory inside this one)."""
    names = log.meta.get("children")
    if not isinstance(names, list):
        return []
    found = []
    for name in names:
        path = log.path / str(name)
        if isinstance(name, str) and "/" not in name and ".." not in name and (path / "meta.json").exists():
            found.append(read_run(path, records=False))
    return found


def _of_every_optimizer(root: RunLog, children: list[RunLog]) -> list[Finding]:
    """Several optimizers in one process: every run directory's findings, each naming its optimizer
    and the global step; the run that went wrong first (by global step) leads, so the headline is its.
    A run whose bad data is another run's poisoned buffers says so, and that run's finding leads."""
    runs = []
    for log in (root, *children):
        facts = Facts(log)
        bad_at = _first_bad_global_step(facts)
        runs.append((log, bad_at, [_tagged(x, log, facts, bad_at) for x in rules.evaluate(facts)], facts))
    runs = _with_poisoned_buffers(runs)
    runs = _stalled_beside_a_failure(runs)
    per_run = []
    for i, (_, bad_at, found, _) in enumerate(runs):
        failed = rules.headline(found) is not None
        per_run.append((not failed, bad_at if bad_at is not None else math.inf, i, found))
    ordered = [x for *_, found in sorted(per_run, key=lambda r: r[:3]) for x in found]
    return sorted(ordered, key=lambda x: SEVERITIES.index(x.severity) if x.severity in SEVERITIES else 9)


_Run = tuple[RunLog, "int | None", list[Finding], Facts]


def _with_poisoned_buffers(runs: list[_Run]) -> list[_Run]:
    """``runs`` where one run's forward wrote NaN/inf into buffers (the guard's ``buffers`` event: a
    BatchNorm's running statistics, kept by a skipped step) before another run's data went
    non-finite: the buffers stay NaN, and what the other optimizer's model reads from that model
    later (a linear probe over the encoder, a generator's output fed to a critic) is NaN. The
    first run's finding naming the buffers becomes the error that leads; the later run's
    ``bad_data`` errors become warnings that point to it (not preprocessing to fix)."""
    poisoned = [
        (e["global_step"], i, e)
        for i, (_, _, _, facts) in enumerate(runs)
        for e in facts.events_of("buffers")
        if isinstance(e.get("global_step"), int)
    ]
    if not poisoned:
        return runs
    at, source, event = min(poisoned, key=lambda x: x[:2])
    names = ", ".join(str(n) for n in (event.get("buffers") or [])[:4])
    hit = [
        i
        for i, (_, bad_at, found, _) in enumerate(runs)
        if i != source and bad_at is not None and bad_at > at and any(_is_bad_data_error(x) for x in found)
    ]
    if not hit:
        return runs
    origin = fields(runs[source][0].meta.get("optimizer"))
    who = str(origin.get("class") or "the optimizer") + (
        f" over {origin['params']}" if origin.get("params") else ""
    )
    out = list(runs)
    log, bad_at, found, facts = runs[source]
    out[source] = (
        log,
        bad_at,
        [_as_root(x, names) if x.id == "bad_data" and names in x.message else x for x in found],
        facts,
    )
    for i in hit:
        log, bad_at, found, facts = runs[i]
        out[i] = (
            log,
            bad_at,
            [
                _as_consequence(x, at, who, names, runs[source][0]) if _is_bad_data_error(x) else x
                for x in found
            ],
            facts,
        )
    return out


def _stalled_beside_a_failure(runs: list[_Run]) -> list[_Run]:
    """Where one optimizer's run failed (an error), another's ``stalled`` is its consequence, not a
    cause of its own: the optimizers train one model or play one game (a GAN's generator stalls while
    its discriminator diverges, and read "lower lr to 7e-05"). It stays, as an info that says so."""
    failed = [i for i, (_, _, found, _) in enumerate(runs) if rules.headline(found) is not None]
    if not failed:
        return runs
    out = list(runs)
    for i, (log, bad_at, found, facts) in enumerate(runs):
        if i in failed:
            continue
        quiet = [
            dataclasses.replace(
                x,
                severity="info",
                message=f"{x.message} Another optimizer of this run failed (the error above): this stall follows it.",
            )
            if x.id == "stalled" and x.severity == "warning"
            else x
            for x in found
        ]
        out[i] = (log, bad_at, quiet, facts)
    return out


def _is_bad_data_error(finding: Finding) -> bool:
    return finding.id == "bad_data" and finding.severity == "error"


def _as_root(finding: Finding, names: str) -> Finding:
    """The finding that named the poisoned buffers, as the root cause of another run's failure."""
    return dataclasses.replace(
        finding,
        severity="error",
        message=f"{finding.message} Another optimizer's model read them later and got NaN.",
    )


def _as_consequence(finding: Finding, at: int, who: str, names: str, source: RunLog) -> Finding:
    """A ``bad_data`` error caused by ``source``'s poisoned buffers: a warning that points there, said
    first (after the optimizer's tag)."""
    tag, _, rest = finding.message.partition("] ")
    cause = (
        f"A consequence of global step {at}, not of the preprocessing: {who}'s forward wrote NaN/inf into "
        f"{names}, which stay NaN and feed this model (the finding above)."
    )
    return dataclasses.replace(
        finding,
        severity="warning",
        message=f"{tag}] {cause} {rest}" if rest else f"{cause} {finding.message}",
        recommendation={
            **finding.recommendation,
            "text": f"Fix global step {at} of {who} (the finding above): this data is its output.",
        },
        evidence={
            **finding.evidence,
            "consequence_of": {"global_step": at, "run_dir": str(source.path), "buffers": names},
        },
    )


def _tagged(finding: Finding, log: RunLog, facts: Facts, bad_at: int | None) -> Finding:
    """``finding`` of one optimizer's run: its message starts with the optimizer (class, what it
    steps) and the global step (of the finding's step, else of the run's first non-finite step);
    its evidence holds them and the run directory."""
    info = fields(log.meta.get("optimizer"))
    name = str(info.get("class") or "optimizer")
    steps = f" over {info['params']}" if info.get("params") else ""
    index = info.get("index")
    label = f"{name}{steps} (optimizer {index})" if index is not None else f"{name}{steps}"
    at = _global_step(facts, finding.step)
    if at is not None:
        when = f", global step {at}"
    else:
        when = f", non-finite from global step {bad_at}" if bad_at is not None else ""
    evidence = {**finding.evidence, "optimizer": info, "run_dir": str(log.path), "global_step": at}
    return dataclasses.replace(finding, message=f"[{label}{when}] {finding.message}", evidence=evidence)


def _global_step(facts: Facts, step: int | None) -> int | None:
    """The process-wide step (``global_step``) of this run's ``step``: from the record of that step
    (the run table's column), else from an event of that step."""
    if step is None:
        return None
    recorded = facts.table.global_step(step)
    if recorded is not None:
        return recorded
    at = (e.get("global_step") for e in facts.events if e.get("step") == step)
    return next((g for g in at if isinstance(g, int) and not isinstance(g, bool)), None)


def _first_bad_global_step(facts: Facts) -> int | None:
    """The global step of the run's first ``nonfinite`` event, else of its first non-finite record
    (``None``: the run stayed finite, or it was not recorded)."""
    at = [e.get("global_step") for e in facts.nonfinite_events]
    known = [g for g in at if isinstance(g, int) and not isinstance(g, bool)]
    if known:
        return min(known)
    return _global_step(facts, facts.steps[facts.trouble]) if facts.went_bad else None


def headline(findings: Iterable[Finding]) -> Finding | None:
    """The headline verdict: the first finding of severity ``error`` after the registry's precedence
    (:data:`gradguard.diagnose.rules.REGISTRY`: a non-finite tensor entering the step, then an
    objective with no lower bound, then an explosion (or growth too fast for the norms), then the op
    at fault, then divergence…), or ``None`` for a run with no error. Of several optimizers', the one
    that went non-finite first. ``gradguard diagnose`` prints it first."""
    return rules.headline(list(findings))


def healthy_window(run: RunLog | str | os.PathLike[str]) -> HealthyWindow:
    """The healthy pre-clip norms of a run: before growth, before the first non-finite step.

    Args:
        run: a :class:`~gradguard.runlog.RunLog` or a path :func:`~gradguard.runlog.read_run` accepts.

    Returns:
        The :class:`HealthyWindow`, with ``max_norm`` the recommended threshold (``None`` when the
        run has no finite norm).
    """
    return Facts(_as_log(run)).healthy


def write_findings(log: RunLog, findings: Iterable[Finding]) -> None:
    """Write ``findings.json`` (a list of finding objects) into the run directory, atomically."""
    try:
        atomic_write_json(log.path / FINDINGS_FILE, [x.as_dict() for x in findings])
    except OSError as e:
        warnings.warn(
            f"could not write {FINDINGS_FILE} into {str(log.path)!r} ({e.strerror or e}); the findings are "
            "still returned. Copy the run directory somewhere writable to keep them.",
            RuntimeWarning,
            stacklevel=2,
        )


def first_nonfinite(run: RunLog | str | os.PathLike[str]) -> dict[str, Any] | None:
    """The first ``nonfinite`` event of the run (DESIGN.md's fields), or ``None``.

    Where the earliest failing step has several events (the always-on one and a located one),
    the reader's choice (``RunLog.first_nonfinite``: the most precise) is taken. A run of several
    optimizers (``meta.json``'s ``children``) gives the event of the earliest ``global_step`` over
    all of them, with ``run_dir`` (the child's folder name) and ``optimizer`` added.
    """
    log = _as_log(run)
    found = []
    for i, each in enumerate((log, *_children(log))):
        pick = getattr(each, "first_nonfinite", None)  # the reader's own choice, where it has one
        event = pick() if callable(pick) else each.first_event("nonfinite")
        if event is not None:
            if each is not log:
                event = {**event, "run_dir": each.path.name, "optimizer": each.meta.get("optimizer")}
            at = event.get("global_step")
            found.append((at if isinstance(at, int) else math.inf, i, event))
    return min(found, key=lambda x: x[:2])[2] if found else None


def recommended_max_norm(findings: Iterable[Finding]) -> float | None:
    """The first recommended clip threshold among ``findings`` (most severe first), or ``None``."""
    for finding in findings:
        value = finding.recommendation.get("max_norm")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def to_json(findings: Iterable[Finding], run: RunLog) -> dict[str, Any]:
    """The ``gradguard diagnose --json`` object.

    ``{"findings": [...], "first_nonfinite": <the first nonfinite event> | null, "run": path,
    "reader_notes": [...]}``.
    """
    return {
        "findings": [x.as_dict() for x in findings],
        "first_nonfinite": first_nonfinite(run),
        "run": str(run.path),
        "reader_notes": list(run.skipped),
    }
