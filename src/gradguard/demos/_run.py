"""The engine of ``gradguard demo``: each scenario's configurations through the real :class:`gradguard.Guard`.

For every configuration of a scenario (see each scenario's ``demo_configs()``) the plain loop of
:func:`gradguard.demos._common.train` runs with a :class:`gradguard.Guard` in place of
"clip + ``optimizer.step()``", logging to its own run directory inside one demo folder. Nothing
is planted: a non-finite step is whatever the training produced; the guard skips it, locates
where it was born and logs it. Afterwards every run is read back from its run directory and
diagnosed (:func:`gradguard.diagnose.diagnose`, ``findings.json`` written), a configuration with
``recommend_from`` takes its threshold from the diagnosis of an earlier run, a summary table is
printed, and one HTML report (:func:`gradguard.report.write_report`) covers the folder.

Advice is verified before it is given (:func:`verify`): a threshold a diagnosis recommends is
tried first by :func:`gradguard.tune.tune` from the scenario's fresh start (candidates halving down
from it, a few dozen steps each), and a lower learning rate it recommends is tried the same way
(the candidates of its own ``gradguard tune --lr`` command, at the run's clipping); both go into
that run's ``tune.json``, the run is diagnosed again (its findings now quote what was verified),
and a configuration with ``recommend_from`` follows the verified threshold. The takeaways quote
only verified advice (:func:`verified_advice`), and never call a run that trained over-clipped.

Every step reads the guard's numbers on the host (a per-step progress line on a CPU); the
library's hot path does not.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import torch
from torch import Tensor

from gradguard._guard.row import host_values
from gradguard.clip import Norm, from_spec
from gradguard.demos._common import RunConfig, RunResult, StepOutcome, StepRecord, train
from gradguard.diagnose import Finding, diagnose, recommended_max_norm
from gradguard.diagnose.numbers import Ends
from gradguard.errors import GradGuardError, NonFiniteError
from gradguard.guard import Guard
from gradguard.runlog import RunLog, default_run_dir, read_run
from gradguard.runtable import RunTable, clipped
from gradguard.tune import tune
from gradguard.tunelog import TuneResult, ladder, write_tune

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

SCENARIOS = ("rnn", "deepsad")
"""The embedded scenarios, in the order ``gradguard demo`` runs them."""

STEPS_ENV = "GRADGUARD_DEMO_STEPS"
"""Environment variable: cap every configuration at this many steps (quick checks and tests)."""

TUNE_STEPS = 60
"""Steps of each :func:`gradguard.tune.tune` trial that verifies a recommended threshold (capped by the demo's steps)."""


def _module(name: str) -> ModuleType:
    if name == "rnn":
        from gradguard.demos import rnn

        return rnn
    if name == "deepsad":
        from gradguard.demos import deepsad

        return deepsad
    raise GradGuardError(f"no demo scenario {name!r}; choose one of {', '.join(SCENARIOS)}.")


class GuardUpdate:
    """The loop's ``update(loss)`` seam, filled by a :class:`gradguard.Guard` (``guard.step(loss)``).

    Reads back the step the guard just recorded (pre-clip norm, threshold, clip coefficient,
    skipped) for the progress line. When the guard gives up (``max_consecutive`` skipped steps in
    a row, :class:`gradguard.NonFiniteError`) it asks the loop to stop and keeps the error.
    """

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.error: NonFiniteError | None = None

    def __call__(self, loss: Tensor) -> StepOutcome:
        try:
            self.guard.step(loss)
        except NonFiniteError as e:
            self.error = e
            return StepOutcome(math.nan, stepped=False, stop=True)
        row = self.guard.monitor.last_row()
        assert row is not None  # (guard.step records every step)
        rec = host_values(row)  # the step's record (a host read per step: fine on a CPU demo)
        skipped = bool(rec["skipped"])
        norm = rec["grad_norm"]
        return StepOutcome(
            grad_norm=math.nan if skipped and math.isfinite(norm) else norm,
            threshold=rec["threshold"],
            clipped=clipped(rec),
            stepped=not skipped,
        )


@dataclass
class Row:
    """One configuration's result, read back from its run directory."""

    scenario: str
    config: RunConfig
    seed: int
    run_dir: Path
    planned_steps: int
    result: RunResult
    log: RunLog
    findings: list[Finding]
    metric: str
    threshold: float | None = None  # a recommended threshold this configuration used
    recommended_from: str | None = None  # the configuration whose diagnosis gave it
    verification: Verification | None = None  # what tune verified of this run's advice (also its tune.json)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def steps_taken(self) -> int:
        return sum(1 for r in self.log.metrics if isinstance(r.get("step"), int) and not r.get("skipped"))

    @property
    def skipped(self) -> int:
        return sum(1 for r in self.log.metrics if r.get("skipped"))

    @property
    def first_nonfinite(self) -> dict[str, Any] | None:
        return self.log.first_nonfinite()

    @property
    def clip_rate(self) -> float:
        """The run table's clip rate (:mod:`gradguard.runtable`); 0 when no step was taken."""
        rate = RunTable.from_log(self.log).clip_rate
        return rate if math.isfinite(rate) else 0.0

    @property
    def final_loss(self) -> float:
        return self.result.final_loss

    @property
    def metric_value(self) -> float:
        return self.result.metrics.get(self.metric, math.nan)

    @property
    def finding_ids(self) -> list[str]:
        return [f.id for f in self.findings]

    def finding(self, finding_id: str) -> Finding | None:
        return next((f for f in self.findings if f.id == finding_id), None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready numbers of this row (for tests and benchmarks)."""
        first = self.first_nonfinite
        return {
            "scenario": self.scenario,
            "config": self.name,
            "seed": self.seed,
            "run_dir": str(self.run_dir),
            "steps": self.steps_taken,
            "planned_steps": self.planned_steps,
            "skipped": self.skipped,
            "stopped": self.result.stopped,
            "first_nonfinite_step": None if first is None else first.get("step"),
            "first_nonfinite": first,
            "where": where(first),
            "final_loss": self.final_loss,
            self.metric: self.metric_value,
            "clip_rate": self.clip_rate,
            "findings": self.finding_ids,
            "threshold": self.threshold,
            "recommended_from": self.recommended_from,
            "wall_s": self.result.wall_s,
        }


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def where(event: dict[str, Any] | None, *, short: bool = False) -> str:
    """The first non-finite step and where it was born, in words (from the located event).

    ``short``: the step and the cause or op only (for the table); otherwise the explosion's first
    step and layer, and the op where it overflowed with its source line, where the guard found them.
    """
    if event is None:
        return "—"
    step = event.get("step")
    raw = event.get("evidence")
    ev: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if event.get("cause") == "explosion":
        module = event.get("module")
        if short:
            return f"{step}: explosion" + (f" ({module})" if module else "")
        first = ev.get("first_spike_step")
        growth = ev.get("growth")
        text = f"step {step}: an explosion"
        if _is_number(growth):
            text += f" (the gradient norm grew {growth:.0e}×"
            text += f" from step {first}" if isinstance(first, int) else ""
            text += f", first in layer {module})" if module else ")"
        overflow = ev.get("overflow")
        if isinstance(overflow, dict) and overflow.get("op"):
            text += f"; it overflowed in {_site(overflow)}"
        return text
    if short:
        return f"{step}: " + " · ".join(str(event[k]) for k in ("phase", "module", "op") if event.get(k))
    return f"step {step}: {_site(event)}"


def _site(event: dict[str, Any]) -> str:
    """``backward of code (linear, -inf) at deepsad.py:121, found by replay``."""
    text = str(event.get("phase") or "?")
    if event.get("module"):
        text += f" of {event['module']}"
    detail = [str(event[k]) for k in ("op", "kind") if event.get(k)]
    if detail:
        text += f" ({', '.join(detail)})"
    source = event.get("source")
    if source:
        text += f" at {Path(str(source).rsplit(':', 1)[0]).name}:{str(source).rsplit(':', 1)[-1]}"
    if event.get("located_by"):
        text += f", found by {event['located_by']}"
    return text


# ---------------------------------------------------------------------------------------- output


def _pct(x: float) -> str:
    """A rate in percent, with a decimal where rounding would show 0% or 100% for a rate that is neither."""
    text = f"{x:.0%}"
    return f"{x:.1%}" if text in ("0%", "100%") and 0.0 < x < 1.0 else text


def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


class Progress:
    """One line per configuration; redrawn in place (a bar) when the stream is a terminal."""

    def __init__(self, stream: IO[str], label: str, total: int) -> None:
        self.stream = stream
        self.label = label
        self.total = max(1, total)
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.last: StepRecord | None = None

    def bar(self, done: int, width: int = 20) -> str:
        filled = min(width, round(width * done / self.total))
        return "█" * filled + "·" * (width - filled)

    def __call__(self, rec: StepRecord) -> None:
        self.last = rec
        now = time.perf_counter()
        if self.tty and (now - self.last_draw > 0.1 or rec.step + 1 == self.total):
            self.last_draw = now
            text = (
                f"\r  {self.label} {self.bar(rec.step + 1)} {rec.step + 1}/{self.total}  "
                f"loss {_fmt(rec.loss)}  ‖g‖ {_fmt(rec.grad_norm)}  {now - self.start:.1f}s"
            )
            self.stream.write(text + "\x1b[K")
            self.stream.flush()

    def done(self, summary: str) -> None:
        n = 0 if self.last is None else self.last.step + 1
        elapsed = time.perf_counter() - self.start
        line = f"  {self.label} {self.bar(n)} {n}/{self.total}  {summary}  {elapsed:.1f}s"
        self.stream.write(("\r" + line + "\x1b[K\n") if self.tty else line + "\n")
        self.stream.flush()


def _describe(name: str, module: ModuleType) -> str:
    doc = (module.__doc__ or name).strip().splitlines()[0]
    return doc.rstrip(".")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


# ---------------------------------------------------------------------------------------- running


def _run_config(
    module: ModuleType,
    scenario: str,
    config: RunConfig,
    seed: int,
    run_dir: Path,
    steps: int | None,
    stream: IO[str],
    label: str,
    recommended_from: str | None = None,
) -> Row:
    sc = module.build(seed)
    n_steps = sc.steps if steps is None else min(steps, sc.steps)
    optimizer = sc.make_optimizer(config)
    guard = Guard(
        sc.model,
        optimizer,
        clip=config.clip,  # type: ignore[arg-type]  # a spec string or a clipper
        on_nonfinite=config.on_nonfinite,  # type: ignore[arg-type]
        log_dir=run_dir,
        name=f"{scenario}-{config.name}",
    )
    update = GuardUpdate(guard)
    progress = Progress(stream, label, n_steps)
    try:
        result = train(
            sc,
            config,
            steps=n_steps,
            update=update,
            optimizer=optimizer,
            step_hook=progress,
            stop_on_nonfinite=config.stop_at_nonfinite,
        )
        if guard.writer is not None:
            guard.writer.update_meta(
                demo={
                    "scenario": scenario,
                    "configuration": config.name,
                    "note": config.note,
                    "recommended_from": recommended_from,
                    "seed": seed,
                    "optimizer": config.optimizer,
                    "lr": config.lr,
                    "steps_planned": n_steps,
                    "stopped": result.stopped,
                    "final_loss": result.final_loss,
                    "metric": sc.metric,
                    "metrics": result.metrics,
                    "baseline": sc.baseline,
                    "loss_unit": sc.loss_unit,
                    "hparams": {k: v for k, v in sc.info.items() if isinstance(v, (int, float, str, tuple))},
                }
            )
    finally:
        guard.close()
    log = read_run(run_dir)
    findings = diagnose(log, write=True)
    row = Row(scenario, config, seed, run_dir, n_steps, result, log, findings, sc.metric)
    progress.done(_progress_summary(row, sc.metric, update.error))
    return row


def _progress_summary(row: Row, metric: str, error: NonFiniteError | None) -> str:
    first = row.first_nonfinite
    if row.result.stopped == "nonfinite" and first is not None:
        return f"non-finite at step {first.get('step')} (skipped by the guard and located); stopped there"
    text = f"loss {_fmt(row.final_loss)}  {metric} {_fmt(row.metric_value, '.3f')}  clipped {_pct(row.clip_rate)}"
    if row.skipped:
        text += f"  skipped {row.skipped}"
    if error is not None:
        text += "  (the guard gave up: too many skipped steps in a row)"
    return text


def _estimate(row: Row) -> float | None:
    """The threshold the diagnosis of ``row`` recommends (verified or not), or ``None``."""
    over = row.finding("over_clipping")
    value = over.recommendation.get("max_norm") if over is not None else None
    if not _is_number(value):
        value = recommended_max_norm(row.findings)
    return float(value) if value is not None and _is_number(value) else None


def _lr_estimate(row: Row) -> float | None:
    """The learning rate the diagnosis of ``row`` recommends without having verified it, or ``None``."""
    return next(
        (
            float(f.recommendation["lr"])
            for f in row.findings
            if f.recommendation.get("lr_verified") is False and _is_number(f.recommendation.get("lr"))
        ),
        None,
    )


def verified_advice(row: Row, key: str) -> float | None:
    """The value of ``key`` (``"max_norm"`` or ``"lr"``) that a finding of ``row`` recommends as verified
    (``verified`` / ``lr_verified``: read from ``tune.json`` by diagnose), or ``None``."""
    flag = "verified" if key == "max_norm" else "lr_verified"
    return next(
        (
            float(f.recommendation[key])
            for f in row.findings
            if f.recommendation.get(flag) is True and _is_number(f.recommendation.get(key))
        ),
        None,
    )


def _unverified(row: Row) -> bool:
    """Whether a finding of ``row`` recommends a threshold or a learning rate that was not verified."""
    return any(
        (_is_number(f.recommendation.get("max_norm")) and not f.recommendation.get("verified"))
        or f.recommendation.get("lr_verified") is False
        for f in row.findings
    )


def _lr_candidates(row: Row) -> list[float]:
    """The learning rates ``row``'s diagnosis asks to verify (the candidates of its unverified advice's
    ``gradguard tune --lr`` command, every finding's together)."""
    rates = {
        float(x)
        for f in row.findings
        if f.recommendation.get("lr_verified") is False
        for x in f.recommendation.get("lr_candidates") or ()
        if _is_number(x) and x > 0
    }
    return sorted(rates)


def _own_threshold(config: RunConfig) -> tuple[bool, float | None]:
    """Whether a trial can keep ``config``'s own clipping, and its threshold (``None``: no clipping):
    only a fixed global-norm threshold or none can (an adaptive clipper's state is the run's)."""
    clipper = from_spec(config.clip)  # type: ignore[arg-type]  # a spec string or a clipper
    if clipper is None:
        return True, None
    if isinstance(clipper, Norm):
        return True, float(clipper.max_norm)
    return False, None


@dataclass(frozen=True)
class Verification:
    """What the demo verified of one run's advice, before giving it.

    ``max_norm`` and ``lr``: the diagnosis's estimates (unverified); ``thresholds``: tune's trials of
    thresholds at the run's learning rate; ``rates``: its trials of learning rates at the run's own
    clipping (``None``: that question was not asked). ``tune.json`` holds both.
    """

    max_norm: float | None
    lr: float | None
    thresholds: TuneResult | None
    rates: TuneResult | None


def verify(module: ModuleType, row: Row, steps: int | None) -> Verification | None:
    """Verify ``row``'s advice before it is given, the way following it means: train again from the
    scenario's fresh start with :func:`gradguard.tune.tune`, a few dozen steps per candidate.

    * a threshold the diagnosis estimates: candidates halving down from it, at the run's learning rate;
    * a learning rate it estimates: the candidates its ``gradguard tune --lr`` command names, at the
      run's own clipping (as that command tries them: :attr:`~gradguard.tunelog.Trial.own_clip`).

    Both go into one ``tune.json`` in the run directory (diagnose reads each question's own trials)
    and the run is re-diagnosed, so its findings quote what was verified. ``None``: nothing to verify
    (or a learning rate under an adaptive clipper, whose state a trial cannot reproduce).
    """
    estimate, lr = _estimate(row), _lr_estimate(row)
    rates = _lr_candidates(row)
    keeps, own = _own_threshold(row.config)
    n = TUNE_STEPS if steps is None else max(2, min(TUNE_STEPS, steps))
    thresholds = _tune(module, row, n, max_norms=ladder(estimate)) if estimate is not None else None
    by_rate = _tune(module, row, n, max_norms=[own], lrs=rates) if rates and keeps else None
    if by_rate is not None:  # the run's own clipping kept: only the rate is a candidate
        by_rate = dataclasses.replace(
            by_rate, trials=[dataclasses.replace(t, own_clip=True) for t in by_rate.trials]
        )
    if thresholds is None and by_rate is None:
        return None
    trials = [*(thresholds.trials if thresholds else ()), *(by_rate.trials if by_rate else ())]
    write_tune(row.run_dir, TuneResult(trials, n))
    row.findings = diagnose(read_run(row.run_dir), write=True)
    row.verification = Verification(estimate, lr, thresholds, by_rate)
    return row.verification


def _tune(module: ModuleType, row: Row, steps: int, **candidates: Any) -> TuneResult:
    """:func:`gradguard.tune.tune` of ``row``'s configuration from the scenario's fresh start."""
    sc = module.build(row.seed)
    optimizer = sc.make_optimizer(row.config)
    return tune(
        sc.model,
        optimizer,
        lambda b: sc.loss_fn(sc.model, b),
        sc.batches(),
        steps=steps,
        reset=sc.reset,
        **candidates,
    )


def _recommended(
    module: ModuleType, rows: Sequence[Row], sources: Sequence[str], steps: int | None
) -> tuple[float | None, str | None, Verification | None]:
    """The verified threshold for the first run of ``sources`` whose diagnosis recommends one.

    The diagnosed threshold is an estimate: it is verified with :func:`verify` first, and the
    threshold the re-diagnosed run recommends as verified is the one followed (``None``: none of the
    candidates trained).
    """
    for source in sources:
        src = next((r for r in rows if r.name == source), None)
        if src is None or _estimate(src) is None:
            continue
        check = src.verification or verify(module, src, steps)
        return verified_advice(src, "max_norm"), source, check
    return None, None, None


def run_scenario(
    name: str,
    folder: Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    stream: IO[str] | None = None,
    start_index: int = 1,
) -> list[Row]:
    """Run every demo configuration of scenario ``name``; one run directory each under ``folder``."""
    out = stream if stream is not None else sys.stdout
    module = _module(name)
    configs: list[RunConfig] = module.demo_configs()
    rows: list[Row] = []
    out.write(f"\n{name}: {_describe(name, module)} (seed {seed})\n")
    listed = "; ".join(f"{c.name} ({c.note})" if c.note else c.name for c in configs)
    out.write(f"  configurations: {listed}\n")
    width = max(len(c.name) for c in configs) + 2
    for i, config in enumerate(configs):
        threshold: float | None = None
        source: str | None = None
        if config.recommend_from:
            threshold, source, check = _recommended(module, rows, config.recommend_from, steps)
            if threshold is None:
                tried = " or ".join(config.recommend_from)
                why = (
                    check.thresholds.verdict()
                    if check is not None and check.thresholds is not None
                    else f"diagnose of {tried} recommended no verified threshold"
                )
                out.write(f"  {config.name}: not run ({why})\n")
                continue
            config = replace(config, name=f"norm:{threshold:g}", clip=f"norm:{threshold}")
        label = f"[{i + 1}/{len(configs)}] {config.name:<{max(width, len(config.name) + 1)}}"

        run_dir = folder / f"{start_index + len(rows):02d}-{name}-{_slug(config.name)}"
        row = _run_config(module, name, config, seed, run_dir, steps, out, label, source)
        if threshold is not None:
            row.threshold, row.recommended_from = threshold, source
        rows.append(row)
    for row in rows:  # advice is verified before it is given
        if _unverified(row) and row.verification is None:
            verify(module, row, steps)
    return rows


# ---------------------------------------------------------------------------------------- summary


def _metric_label(row: Row) -> str:
    return {"bpc": "bits/char", "roc_auc": "ROC-AUC"}.get(row.metric, row.metric)


def summary_table(rows: Sequence[Row]) -> str:
    """The summary of the runs of one scenario as an aligned text table."""
    if not rows:
        return ""
    head = [
        "configuration",
        "steps",
        "first non-finite",
        "final loss",
        _metric_label(rows[0]),
        "clipped",
        "findings",
    ]
    body = []
    for r in rows:
        name = r.name
        steps = f"{r.steps_taken}/{r.planned_steps}" + (f" ({r.skipped} skipped)" if r.skipped else "")
        body.append(
            [
                name,
                steps,
                where(r.first_nonfinite, short=True),
                _fmt(r.final_loss),
                _fmt(r.metric_value, ".3f"),
                _pct(r.clip_rate),
                ", ".join(f.id + (" (info)" if f.severity == "info" else "") for f in r.findings) or "—",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("─" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in body]
    return "\n".join(lines)


def takeaways(name: str, rows: Sequence[Row]) -> list[str]:
    """What the runs show, in sentences computed from them (never from expectations).

    Advice is quoted only as verified: a threshold or a learning rate the run's re-diagnosed findings
    recommend as verified (:func:`verified_advice`), with the trials of ``gradguard tune`` behind it;
    a clip rate is never called over-clipping in a run that trained (diagnose's ``info``).
    """
    out: list[str] = []
    by = {r.name: r for r in rows}
    none = by.get("none")
    if none is not None:
        first = none.first_nonfinite
        out.append(
            f"none: non-finite at {where(first)}." if first else "none: no non-finite step in this run."
        )
    out += [line for r in rows if (line := _clip_rate_line(r))]
    for r in rows:
        out += _verification_lines(r)
    for r in rows:
        if r.threshold is not None:
            out.append(_followed_line(r, by.get(r.recommended_from or "")))
    return out


def _clip_rate_line(r: Row) -> str | None:
    """A configuration that clipped most steps: over-clipped only when diagnose says so (not ``info``)."""
    over = r.finding("over_clipping")
    if over is None or r.config.recommend_from:
        return None
    ev = over.evidence
    k = ev.get("loss_ends_median_of")
    loss = (  # medians of the first and last k steps, labelled the way diagnose labels them
        "loss " + Ends(ev["loss_start"], ev["loss_end"], k if isinstance(k, int) else 1).text()
        if _is_number(ev.get("loss_start")) and _is_number(ev.get("loss_end"))
        else ""
    )
    if over.severity == "info":
        return (
            f"{r.name}: clipped {_pct(r.clip_rate)} of the steps and still trained"
            + (f" — {loss}" if loss else "")
            + ": not over-clipping (diagnose notes the clip rate as info and recommends no threshold for it)."
        )
    text = f"{r.name}: clipped {_pct(r.clip_rate)} of the steps — diagnose: over_clipping" + (
        f" — {loss}" if loss else ""
    )
    rec = verified_advice(r, "max_norm")
    return text + (f"; verified by gradguard tune: max_norm={rec:g}." if rec is not None else ".")


def _verification_lines(r: Row) -> list[str]:
    """What ``gradguard tune`` found of ``r``'s advice: each question's candidates, outcomes and verdict."""
    v = r.verification
    if v is None:
        return []
    lines = []
    if v.thresholds is not None:
        estimate = f"diagnose estimated max_norm={v.max_norm:g}; " if v.max_norm is not None else ""
        verified = verified_advice(r, "max_norm")
        verdict = (
            f"verified: max_norm={verified:g} ({_trained(v.thresholds, verified, 'max_norm')})"
            if verified is not None
            else "none of them trained: no threshold recommended"
        )
        lines.append(
            f"{r.name}: {estimate}gradguard tune tried {_tried(v.thresholds, 'max_norm')} "
            f"({v.thresholds.steps} steps each, from the fresh start) — {verdict}."
        )
    if v.rates is not None:
        asked = (  # no estimate: the run trained, and diagnose asked whether a lower rate does better
            f"diagnose advised a lower learning rate (estimate lr={v.lr:g}, unverified)"
            if v.lr is not None
            else "diagnose asked whether a lower learning rate trains better than the run's own"
        )
        clip = "no clipping" if _own_threshold(r.config)[1] is None else f"its {r.config.clip}"
        verified = verified_advice(r, "lr")
        keep = ", the run's own rate: keep it" if _keeps_lr(r) else ""
        verdict = (
            f"verified: lr={verified:g}{keep} ({_trained(v.rates, verified, 'lr')})"
            if verified is not None
            else f"none of them trained: go below lr={min(v.rates.lr_candidates()):g}"
        )
        lines.append(
            f"{r.name}: {asked}; gradguard tune tried "
            f"{_tried(v.rates, 'lr')} with {clip} ({v.rates.steps} steps each) — {verdict}."
        )
    return lines


def _keeps_lr(row: Row) -> bool:
    """Whether ``row``'s verified rate is its own (diagnose's ``lr_keep``: tune kept it)."""
    return any(f.recommendation.get("lr_keep") is True for f in row.findings)


def _tried(result: TuneResult, key: str) -> str:
    """The candidates of one question, tight to loose, the failed ones with their outcome."""
    trials = sorted(result.trials, key=lambda t: getattr(t, key) or 0.0)
    return ", ".join(
        f"{'lr=' if key == 'lr' else ''}{getattr(t, key):g}" + ("" if t.trained else f" ({t.outcome})")
        for t in trials
    )


def _trained(result: TuneResult, value: float, key: str) -> str:
    """The evidence of the trial that verified ``value``: its loss and clip rate."""
    t = next((t for t in result.trials if getattr(t, key) == value), None)
    if t is None:
        return "verified by gradguard tune"
    return f"loss {t.loss_start:.4g} → {t.loss_final:.4g}, clipped {_pct(t.clip_rate)}, no explosion"


def _followed_line(r: Row, src: Row | None) -> str:
    """The run that followed a verified threshold, to the end."""
    ratio = (
        f", {src.final_loss / r.final_loss:.0f}× lower than {src.name}'s"
        if src is not None
        and r.final_loss > 0
        and math.isfinite(src.final_loss)
        and src.first_nonfinite is None
        else ""
    )
    nf = (
        "no non-finite step"
        if r.first_nonfinite is None
        else f"non-finite at step {r.first_nonfinite.get('step')}"
    )
    return (
        f"{r.name} (recommended by diagnose of {r.recommended_from}, verified by gradguard tune, followed for "
        f"{r.steps_taken}/{r.planned_steps} steps): clipped {_pct(r.clip_rate)}, {nf}, final loss "
        f"{_fmt(r.final_loss)}{ratio}."
    )


# ---------------------------------------------------------------------------------------- entry


def _steps_from_env() -> int | None:
    raw = os.environ.get(STEPS_ENV)
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise GradGuardError(f"{STEPS_ENV} must be a positive int, got {raw!r}.") from None
    if n < 1:
        raise GradGuardError(f"{STEPS_ENV} must be a positive int, got {raw!r}.")
    return n


def _baseline_line(name: str, rows: Sequence[Row]) -> str:
    if not rows:
        return ""
    meta = rows[0].log.meta.get("demo") or {}
    base = meta.get("baseline") or {}
    if name == "rnn" and _is_number(base.get("unigram_bpc")):
        return (
            f"  bits/char on held-out text; the unigram baseline (no context) is {base['unigram_bpc']:.2f}: "
            "below it, the model learned."
        )
    if name == "deepsad":
        return "  ROC-AUC of the anomaly score on the test digits (0.5 = chance); the training loss shows the stall."
    return ""


def run_demo(
    name: str | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    stream: IO[str] | None = None,
    progress_stream: IO[str] | None = None,
) -> int:
    """Run the embedded scenarios (or one), print the summary, write one report; return an exit code.

    Args:
        name: ``"rnn"``, ``"deepsad"`` or ``None`` (all, in :data:`SCENARIOS` order).
        out: the demo folder (default ``gradguard-runs/<time>-demo``); it must be new or empty.
        seed: the seed of every scenario (weights, data order).
        steps: cap every configuration at this many steps (default: each scenario's own;
            also read from :data:`STEPS_ENV`).
        stream: where the summary goes (default stdout).
        progress_stream: where the progress lines go (default: ``stream``).

    Returns:
        0 when every run finished and the report was written; 1 when the report could not be
        written (e.g. plotly missing); 2 for an unknown scenario or an unusable ``out`` folder.
    """
    stream = stream if stream is not None else sys.stdout
    progress = progress_stream if progress_stream is not None else stream
    names = list(SCENARIOS) if name is None else [name]
    if name is not None and name not in SCENARIOS:
        print(f"gradguard demo: no scenario {name!r}; choose one of: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    try:
        steps = steps if steps is not None else _steps_from_env()
    except GradGuardError as e:
        print(f"gradguard demo: {e}", file=sys.stderr)
        return 2
    folder = Path(out) if out is not None else None
    if folder is not None and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        print(
            f"gradguard demo: {str(folder)!r} exists and is not an empty folder; pass a new folder to --out "
            "(the demo writes one run directory per configuration into it).",
            file=sys.stderr,
        )
        return 2
    try:
        if folder is None:
            folder = default_run_dir("demo", create=True)
        else:
            folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable", str(folder))
    except OSError as e:  # a read-only file system or folder, a path below a file
        where = str(folder) if folder is not None else "gradguard-runs/"
        print(
            f"gradguard demo: cannot write {where!r}: {e.strerror or e}; pass --out a new folder in a place you "
            "can write to (e.g. --out /tmp/gradguard-demo).",
            file=sys.stderr,
        )
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is as fast, never oversubscribed, and reproducible
    try:
        return _run_all(names, folder, seed, steps, stream, progress)
    finally:
        torch.set_num_threads(threads)


def _run_all(
    names: Sequence[str], folder: Path, seed: int, steps: int | None, stream: IO[str], progress: IO[str]
) -> int:
    start = time.perf_counter()
    stream.write(
        f"gradguard demo: {', '.join(names)} — each configuration trained through gradguard.Guard, "
        f"run directories in {folder}/\n"
    )
    if steps is not None:
        stream.write(f"  (every configuration capped at {steps} steps: {STEPS_ENV} / --steps)\n")
    stream.flush()
    results: dict[str, list[Row]] = {}
    count = 1
    for scenario in names:
        rows = run_scenario(scenario, folder, seed=seed, steps=steps, stream=progress, start_index=count)
        count += len(rows)
        results[scenario] = rows
    train_s = time.perf_counter() - start
    for scenario, rows in results.items():
        stream.write(f"\nSummary — {scenario} (seed {seed}):\n{summary_table(rows)}\n")
        base = _baseline_line(scenario, rows)
        if base:
            stream.write(base + "\n")
        for line in takeaways(scenario, rows):
            stream.write(f"  • {line}\n")
    code = 0
    try:
        from gradguard.report import write_report

        report = write_report(folder)
    except GradGuardError as e:
        stream.write(f"\nNo report: {e}\n")
        code = 1
    else:
        stream.write(f"\nReport (one page, every run): {report}\n")
    stream.write(
        f"Run directories: {folder}/ — `gradguard diagnose DIR` explains any of them. "
        f"Demo time {time.perf_counter() - start:.0f} s (training {train_s:.0f} s).\n"
    )
    stream.flush()
    return code
