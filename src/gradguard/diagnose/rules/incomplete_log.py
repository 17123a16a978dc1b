"""``incomplete_log``: the run log may lack records — the run was not closed, or disk writes failed.

* **Not closed** (``info``): ``meta.json`` has the ``start_time`` a RunWriter writes but no
  ``end_time`` (:attr:`gradguard.runlog.RunLog.closed` is false). The process was killed or
  crashed, ``close()`` was never called, or the run is still going: records are written in batches
  of ``every`` steps, so the steps after the last batch may be missing. A log written in the last
  :data:`RECENT` seconds may belong to a run that is still going, and is worded so: nothing says
  it was killed.
* **Lost** (``warning``): failed disk writes (a full disk, I/O errors) lost records or events;
  the writer counts them in ``meta.json``'s ``lost`` when it closes.
* **Ended early** (``warning``): the script ended by an uncaught exception or a signal; a non-zero
  ``sys.exit`` is an ``info`` (it may follow the last step: a CI gate) (``meta.json``'s ``ended_by``: the guard closed at interpreter exit, or ``gradguard
  run`` saw it), or it never closed its guard (``closed_at_exit``, ``info``): every record was
  written, but the run did not finish — a log that looks healthy is not a run that trained.
* **Guarding stopped** (``error``): ``gradguard run`` hit an internal error in its own hooks and stopped
  guarding (``meta.json``'s ``guarding_stopped``): the script went on, unmeasured and unguarded —
  "No findings" on the steps before it would say nothing of the rest.
* **Records missing** (``error``): a closed run whose ``meta.json`` counts more steps than its log
  holds, beyond what failed writes and resumes explain: ``metrics.jsonl`` was truncated, emptied or
  replaced (a copy cut short, a report written over it); "No findings" on what is left would pass a CI gate.
* **Settings unknown** (``warning``): ``meta.json`` is missing, cut off or not JSON (a copy made
  while the run wrote it, an edit): the clipper, optimizer, rate and loss code are unknown, so the
  rules that need them said nothing — "No findings" would be a partial verdict read as a clean one.
* **Resumed over a gap** (``info``): a ``resume`` event (``Guard.load_state_dict`` from a
  checkpoint) at a step after the last step the log had: the run stopped before those steps were
  flushed, and the resumed run, closed since, does not have them either.

The other rules judge the records that are there; this one says what may be missing.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from gradguard import optable
from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.rules import Rule, Seen

RECENT = 900.0
"""Seconds: a run whose log was written this recently may still be going."""


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Whether the run was closed, how long ago its log was last written, what writes lost."""

    unclosed: bool
    age: float | None  # seconds since the run's files were last written (None: unknown)
    lost: dict[str, int]
    gaps: tuple[tuple[int, int], ...] = ()  # (first, last) steps missing before a resume
    ended_by: str | None = None  # the exception (or signal) that ended the script
    at_exit: bool = False  # closed at interpreter exit: the script never closed the guard
    missing: tuple[int, int] | None = None  # (steps meta.json counts, steps the log holds): records gone
    stopped: dict[str, Any] | None = None  # gradguard run stopped guarding (its internal error)
    meta_unread: str | None = None  # why meta.json could not be read (the reader's note)

    @property
    def maybe_running(self) -> bool:
        return self.unclosed and self.age is not None and self.age < RECENT


def detect(f: Facts, seen: Seen) -> Evidence | None:
    unclosed = f.opened and not f.closed
    gaps = _resumed_over(f)
    ended = f.log.meta.get("ended_by")
    ended = ended if isinstance(ended, str) and ended else None
    at_exit = f.log.meta.get("closed_at_exit") is True
    missing = _missing(f, gaps)
    stopped = f.log.meta.get("guarding_stopped")
    stopped = stopped if isinstance(stopped, dict) else None
    meta_unread = f.log.meta_unread
    if not (unclosed or f.lost or gaps or ended or at_exit or missing or stopped or meta_unread):
        return None
    age = max(0.0, time.time() - f.modified) if f.modified is not None else None
    return Evidence(unclosed, age, dict(f.lost), gaps, ended, at_exit, missing, stopped, meta_unread)


def _missing(f: Facts, gaps: tuple[tuple[int, int], ...]) -> tuple[int, int] | None:
    """A closed run whose ``meta.json`` counts more steps than its log holds, beyond what failed writes
    and resumes explain (a truncated, emptied or replaced ``metrics.jsonl``): ``(counted, held)``."""
    counted = f.log.meta.get("steps")
    if not f.closed or not isinstance(counted, int) or isinstance(counted, bool):
        return None
    held = len(set(f.steps))
    explained = f.lost.get("records", 0) + sum(b - a + 1 for a, b in gaps)
    return (counted, held) if counted > held + explained else None


def _resumed_over(f: Facts) -> tuple[tuple[int, int], ...]:
    """The steps a resume skipped over: after the last step logged before it (``last_logged_step``,
    none: -1), up to the step it resumed at."""
    gaps = []
    for e in f.events_of("resume"):
        step, logged = e.get("step"), e.get("last_logged_step", -1)
        if isinstance(step, int) and isinstance(logged, int) and step > logged + 1:
            gaps.append((logged + 1, step - 1))
    return tuple(gaps)


def _exited(ended_by: str) -> bool:
    """Whether the script ended itself by a non-zero ``sys.exit`` (``SystemExit: 1``): on purpose, maybe
    after its last step (a CI gate on its own metric), which the log cannot tell from an early exit — an
    info, not "ended early … run it to the end" after a run of all its 400 steps. A code of 128 + a
    signal's number (130 after a Ctrl-C the script caught) is a stop, as the signal itself is."""
    code = ended_by.removeprefix("SystemExit: ")
    return ended_by.startswith("SystemExit") and not (code.isdigit() and 128 < int(code) < 160)  # 130: Ctrl-C


def explain(f: Facts, ev: Evidence) -> Finding:
    last = f.steps[-1] if f.steps else None
    parts, advice = [], []
    if ev.unclosed:
        parts.append(_unclosed(f, ev, last))
        advice.append(
            "Close the guard when training ends (guard.close(), or `with Guard(...)`) so the last records "
            "are written; after a kill, the records up to the last flush are all there is"
        )
    if ev.ended_by is not None and _exited(ev.ended_by):
        after = f" after step {last} (the last one logged)" if last is not None else ""
        parts.append(
            f"The script exited with sys.exit({ev.ended_by.removeprefix('SystemExit: ')}){after}. Every record "
            "was written: a script that exits non-zero after training (a check of its own metric, a CI gate) "
            "left nothing out; one that exited before its last step stopped the log there."
        )
        advice.append("If it exited before training finished, fix what made it exit and run again")
    elif ev.ended_by is not None:
        after = f" after step {last} (the last one logged)" if last is not None else ""
        parts.append(
            f"The script ended early{after}: {ev.ended_by.rstrip('.')}. Every record was written; the run did not "
            "finish."
        )
        stopped = ev.ended_by.startswith(("SystemExit", "KeyboardInterrupt", "killed by"))
        advice.append(
            "Run it to the end (it was stopped, or stopped itself, before it finished)"
            if stopped
            else _exception_fix(ev.ended_by)
            or "Fix what ended it (the traceback the script printed) and run again"
        )
    elif ev.at_exit:
        parts.append(
            "The script never closed its guard: it was closed at interpreter exit (every record was written)."
        )
        advice.append("Close the guard when training ends (guard.close(), or `with Guard(...)`)")
    if ev.gaps:
        parts.append(_gaps(ev.gaps))
        advice.append(
            "Close the guard (or save its state) before the process stops; after a kill, the records up "
            "to the last flush are all there is (a smaller every= flushes more often)"
        )
    if ev.stopped is not None:
        parts.append(
            f"gradguard stopped guarding after {ev.stopped.get('after_steps')} step(s): an internal error in "
            f"{ev.stopped.get('where')} ({ev.stopped.get('error')}). The script went on unmeasured and unguarded: "
            "this log covers the steps before it only."
        )
        advice.append(
            "Report the error (gradguard's bug: the traceback it printed), and meanwhile guard the loop in code "
            "(gradguard.Guard) or run without gradguard"
        )
    if ev.missing is not None:
        counted, held = ev.missing
        parts.append(
            f"meta.json counts {counted} steps but the log holds {held}: records are missing (metrics.jsonl "
            "truncated, emptied or replaced after the run closed), so this verdict covers part of the run at most."
        )
        advice.append("Diagnose the run directory as the run wrote it (a copy that kept metrics.jsonl whole)")
    if ev.meta_unread is not None:
        parts.append(
            f"The run's settings are unknown ({ev.meta_unread}): the clipper, optimizer, learning rate and "
            "loss code the rules read from it are missing, so those rules said nothing — this verdict is partial."
        )
        advice.append(
            "Diagnose the run directory as the run wrote it (meta.json whole: copy it after the run ends)"
        )
    if ev.lost:
        parts.append(f"Failed disk writes lost {_counted(ev.lost)} (meta.json's lost): the log has gaps.")
        advice.append(
            "Keep the run directory on a disk with room (the RunLogWarning at training time named the "
            "file and the error)"
        )
    evidence: dict[str, Any] = {
        "closed": not ev.unclosed,
        "last_step": last,
        "seconds_since_last_write": round(ev.age) if ev.age is not None else None,
        "maybe_still_running": ev.maybe_running,
        "flush_every": f.flush_every,
    }
    evidence.update({f"lost_{k}": n for k, n in ev.lost.items()})
    if ev.gaps:
        evidence["missing_steps"] = [list(g) for g in ev.gaps]
    if ev.ended_by is not None:
        evidence["ended_by"] = ev.ended_by
    if ev.missing is not None:
        evidence["steps_counted"], evidence["steps_held"] = ev.missing
    if ev.stopped is not None:
        evidence["guarding_stopped"] = ev.stopped
    if ev.meta_unread is not None:
        evidence["meta_unread"] = ev.meta_unread
    numeric = (
        ev.ended_by is not None and _exception_fix(ev.ended_by) is not None
    )  # a torch.linalg op's failure
    severity = (
        "error"
        if ev.missing is not None or ev.stopped is not None or numeric
        else "warning"
        if ev.lost or (ev.ended_by is not None and not _exited(ev.ended_by)) or ev.meta_unread is not None
        else "info"
    )
    rec = {"text": "; ".join(advice) + "."}
    message = " ".join(parts) + " The findings are about the records that were written."
    step = last if ev.unclosed or ev.ended_by is not None else None
    return Finding("incomplete_log", severity, step, message, evidence, rec)


def _unclosed(f: Facts, ev: Evidence, last: int | None) -> str:
    batch = f"up to {f.flush_every - 1} steps" if f.flush_every and f.flush_every > 1 else "the last steps"
    after = f"after step {last}" if last is not None else "of the run"
    if ev.maybe_running and ev.age is not None:
        return (
            f"The run is not closed and its log was written {_ago(ev.age)} ago: it may still be running "
            f"(this is a snapshot), or it stopped without closing — then the records {after} ({batch}) "
            "may be missing."
        )
    when = f", last written {_ago(ev.age)} ago" if ev.age is not None else ""
    return (
        f"The run was not closed (meta.json has no end_time{when}): it was killed or crashed, or close() "
        f"was never called; the records {after} ({batch}) may be missing."
    )


def _exception_fix(ended_by: str) -> str | None:
    """The fix for an exception a torch op raised on its numbers (``linalg.cholesky``: "the input is not
    positive-definite", a GP's noise gone negative): the op table's, not only "fix what ended it" (the
    run's explosion finding beside it advised clipping, which left the same crash)."""
    found = re.search(r"\blinalg[._](\w+)", ended_by)
    entry = optable.lookup(f"linalg_{found.group(1)}") if found else None
    if entry is None:
        return None
    return f"It ended in torch.linalg.{found.group(1)} on its numbers — {entry.why}: {entry.fix}"  # type: ignore[union-attr]


def _gaps(gaps: tuple[tuple[int, int], ...]) -> str:
    spans = ", ".join(f"{a}–{b}" if b > a else f"{a}" for a, b in gaps)
    n = sum(b - a + 1 for a, b in gaps)
    return (
        f"Steps {spans} are not in the log ({n} step{'s' if n != 1 else ''}): the run stopped before they "
        "were flushed and was resumed from a checkpoint after them (a resume event)."
    )


def _ago(seconds: float) -> str:
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n != 1 else ''}"
    return f"{int(seconds)} s"


def _counted(lost: dict[str, int]) -> str:
    names = {"records": "step record", "events": "event"}
    return " and ".join(f"{n} {names.get(k, k)}{'s' if n != 1 else ''}" for k, n in lost.items())


RULE = Rule("incomplete_log", detect, explain)
