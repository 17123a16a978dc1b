"""The reader of a run directory: :func:`read_run` → :class:`RunLog` (standard library only).

Tolerant: everything up to the last complete line is read, what cannot be is skipped with a note
(:attr:`RunLog.skipped`); rewinds are not counted twice (the later attempt wins); with
``records=False`` the records stream into the run table's columns and are not kept. Also
:func:`find_runs` (a folder of runs, newest first) and :func:`is_run_dir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from gradguard.errors import GradGuardError
from gradguard.runlog._encoding import from_jsonable
from gradguard.runlog._format import (
    _MAX_LISTED,
    _RUN_MARKERS,
    EVENTS_FILE,
    FINDINGS_FILE,
    META_FILE,
    METRICS_FILE,
    REPORT_FILE,
    SCHEMA_VERSION,
    _is_step,
    _read_json_quiet,
    _step,
    is_foreign,
)
from gradguard.runtable import RunTable, TableBuilder

_META_EMPTY = "run metadata is empty"  # the end of every note on an unread meta.json
_MAX_NOTES_PER_FILE = 20  # skipped-line notes per file before they are summarised


@dataclasses.dataclass
class RunLog:
    """A run directory as read by :func:`read_run`.

    Attributes:
        path: the run directory.
        meta: the contents of ``meta.json`` (empty if missing or unreadable).
        metrics: the step records of ``metrics.jsonl``, in file order, without superseded ones:
            their steps strictly increase. Empty when read with ``records=False`` (then the
            records are in :attr:`table` only).
        events: the events of ``events.jsonl``, in file order, without superseded ones
            (``resume`` events included).
        skipped: human-readable notes on what the reader skipped or could not read.
        superseded: records dropped because the run was rewound (a ``resume`` event, or records
            of the same steps written again later), in the order they were superseded. Empty when
            read with ``records=False`` (the note in :attr:`skipped` counts them).
        superseded_events: events of steps ``>=`` a resume's step written before that resume.
        modified: when the run's files were last written (the newest modification time of
            ``meta.json``, ``metrics.jsonl`` and ``events.jsonl``, seconds since the epoch); ``None``
            for a log built in memory.
    """

    path: Path
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    superseded: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    superseded_events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    modified: float | None = None
    _table: RunTable | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _streamed: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    @property
    def meta_unread(self) -> str | None:
        """Why a ``meta.json`` that is there could not be read (the reader's note: cut off, not JSON, not an
        object), ``None`` when it was read or is absent (a log written without one, by hand or by another
        tool: nothing says it had settings): the run's settings are then unknown to every rule."""
        missing = f"{META_FILE}: missing"
        return next(
            (
                n
                for n in self.skipped
                if n.startswith(f"{META_FILE}:") and n.endswith(_META_EMPTY) and not n.startswith(missing)
            ),
            None,
        )

    @property
    def table(self) -> RunTable:
        """The run table of the records (:class:`gradguard.runtable.RunTable`): built on first use
        from :attr:`metrics` and kept (build a new ``RunLog`` after changing :attr:`metrics`), or
        built while reading when read with ``records=False``."""
        if self._table is None:
            self._table = RunTable.from_records(self.metrics, self.layer_names())
        return self._table

    @property
    def closed(self) -> bool:
        """Whether the run was closed: ``meta.json`` holds its ``end_time`` (written by
        :meth:`RunWriter.close` and ``Guard.close``).

        ``False`` for a run still going, one that was killed, or whose ``close()`` was never
        called (its last records may be missing), and when ``meta.json`` is unreadable.
        """
        return self.meta.get("end_time") is not None

    @property
    def lost(self) -> dict[str, int]:
        """What failed disk writes lost, as the writer saved it in ``meta.json``'s ``lost``:
        ``{"records": n, "events": m}`` with the positive counts only (``{}``: nothing known lost)."""
        lost = self.meta.get("lost")
        if not isinstance(lost, dict):
            return {}
        return {str(k): v for k, v in lost.items() if _is_step(v) and v > 0}

    def events_of(self, type: str) -> list[dict[str, Any]]:
        """The events whose ``type`` is ``type``, in file order."""
        return [e for e in self.events if e.get("type") == type]

    def first_event(self, type: str) -> dict[str, Any] | None:
        """The first event whose ``type`` is ``type``, or ``None``."""
        return next((e for e in self.events if e.get("type") == type), None)

    def first_nonfinite(self) -> dict[str, Any] | None:
        """The ``nonfinite`` event of the earliest failing step, the most precise one for that step.

        A step can have two: the one written at once from the always-on flags, and one written a
        step later by armed instrumentation (``located_by="hooks"``). An event that names an op or
        a cause (``replay``, ``hooks``, an explosion) wins over one located by the norm alone.
        """
        events = [e for e in self.events_of("nonfinite") if _is_step(e.get("step"))]
        if not events:
            return None
        first = min(e["step"] for e in events)
        same = [e for e in events if e["step"] == first]
        return max(
            same, key=lambda e: (e.get("located_by") in ("replay", "hooks") or "cause" in e, -same.index(e))
        )

    def layer_names(self) -> list[str]:
        """The layers of the run: ``meta.json``'s ``layers`` in order, then any other name the records hold."""
        if self._streamed:
            return list(self.table.layers)
        order = _meta_layers(self.meta)
        seen = set(order)
        for r in self.metrics:
            layers = r.get("layers")
            if isinstance(layers, dict):
                for name in layers:
                    if name not in seen:
                        seen.add(name)
                        order.append(name)
        return order

    def series(self, key: str) -> list[tuple[int, Any]]:
        """``(step, value)`` for a top-level metric key, in file order.

        Records without an integer ``step``, without ``key`` or with ``key`` null are left out.
        Non-finite values come back as floats (``nan``, ``inf``, ``-inf``).

        Raises:
            GradGuardError: the log was read with ``records=False`` (read :attr:`table`).
        """
        self._need_records("series")
        return [
            (r["step"], r[key]) for r in self.metrics if _is_step(r.get("step")) and r.get(key) is not None
        ]

    def layer_series(self, layer: str, key: str = "grad_norm") -> list[tuple[int, Any]]:
        """``(step, value)`` of ``layers[layer][key]`` (e.g. a layer's ``grad_norm``), in file order.

        Raises:
            GradGuardError: the log was read with ``records=False`` (read :attr:`table`).
        """
        self._need_records("layer_series")
        out: list[tuple[int, Any]] = []
        for r in self.metrics:
            layers = r.get("layers")
            entry = layers.get(layer) if isinstance(layers, dict) else None
            if isinstance(entry, dict) and _is_step(r.get("step")) and entry.get(key) is not None:
                out.append((r["step"], entry[key]))
        return out

    def _need_records(self, what: str) -> None:
        if self._streamed:
            raise GradGuardError(
                f"RunLog.{what}() reads the records, and {str(self.path)!r} was read with records=False "
                "(its records are in RunLog.table only); read it with read_run(path) to keep them."
            )

    def __repr__(self) -> str:
        records = len(self.table) if self._streamed else len(self.metrics)
        return (
            f"RunLog(path={str(self.path)!r}, metrics={records} records, "
            f"events={len(self.events)}, skipped={len(self.skipped)} notes)"
        )


def _at_or_after(item: Mapping[str, Any], step: int) -> bool:
    """Whether ``item`` has an integer ``step`` that is ``>= step``."""
    own = _step(item)
    return own is not None and own >= step


def _needs_decode(text: str) -> bool:
    return '"nan"' in text or 'inf"' in text


class _Notes:
    """The notes of one file: at most :data:`_MAX_NOTES_PER_FILE`, then a count."""

    def __init__(self, name: str, notes: list[str]) -> None:
        self.name, self.notes, self.problems = name, notes, 0

    def add(self, message: str) -> None:
        self.problems += 1
        if self.problems <= _MAX_NOTES_PER_FILE:
            self.notes.append(f"{self.name}: {message}")

    def finish(self) -> None:
        if self.problems > _MAX_NOTES_PER_FILE:
            self.notes.append(
                f"{self.name}: {self.problems - _MAX_NOTES_PER_FILE} more unreadable lines skipped"
            )


def _parse_line(raw: bytes, number: int, is_tail: bool, note: _Notes) -> dict[str, Any] | None:
    """One JSONL line as a JSON object, or ``None`` (with a note) if it is not one."""
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text)
        if isinstance(obj, dict) and _needs_decode(text):
            obj = from_jsonable(obj)
    except RecursionError:
        note.add(f"line {number} is nested too deeply to read; skipped")
        return None
    except (UnicodeDecodeError, ValueError) as e:
        if is_tail:
            note.add(f"line {number} is cut off (the process stopped mid-write); skipped")
        else:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            note.add(f"line {number} is not valid JSON ({reason}); skipped")
        return None
    if not isinstance(obj, dict):
        note.add(f"line {number} is a JSON {type(obj).__name__}, not an object; skipped")
        return None
    return obj


def _read_jsonl(path: Path, notes: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(byte offset, object)`` of every complete JSON-object line of ``path``, read as a stream;
    what is skipped goes to ``notes``."""
    note = _Notes(path.name, notes)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the generator is consumed
    except FileNotFoundError:
        notes.append(f"{path.name}: missing; read as empty")
        return
    except OSError as e:
        notes.append(f"{path.name}: cannot be read ({e.strerror or e}); read as empty")
        return
    with f:
        offset = 0
        try:
            for number, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                is_tail = not raw.endswith(b"\n")  # only the last line: cut off unless it parses
                if raw.strip():
                    obj = _parse_line(raw, number, is_tail, note)
                    if obj is not None:
                        yield start, obj
        except OSError as e:
            notes.append(
                f"{path.name}: read failed after byte {offset} ({e.strerror or e}); read up to there"
            )
    note.finish()


class RecordSink(Protocol):
    """Where :func:`read_run` puts the step records it keeps: a list of dicts (the default) or a
    :class:`gradguard.runtable.TableBuilder` (``records=False``)."""

    def append(self, record: dict[str, Any]) -> None:
        """Add the next record (file order)."""

    def drop_from(self, step: int) -> tuple[int, int | None]:
        """Drop the last records, those of steps ``>= step`` (a rewind); return how many were
        dropped and the step of the last record kept (``None``: none)."""
        ...


@dataclasses.dataclass
class _Rewinds:
    """What the rewinds of a run dropped from one file: how many items, at which steps."""

    dropped: int = 0
    steps: list[int] = dataclasses.field(default_factory=list)  # the step of each rewind that dropped some

    def add(self, step: int, count: int) -> None:
        if count:
            self.dropped += count
            self.steps.append(step)

    def note(self, name: str, noun: str, notes: list[str]) -> None:
        if not self.dropped:
            return
        steps = ", ".join(str(s) for s in self.steps[:_MAX_LISTED])
        more = ", ..." if len(self.steps) > _MAX_LISTED else ""
        notes.append(
            f"{name}: {self.dropped} {noun} superseded by a rewind of the run (resumed at step "
            f"{steps}{more}: the later {noun} of those steps count); read without them"
        )


@dataclasses.dataclass
class _Records:
    """The records kept as dicts, in file order, and those a rewind dropped (a :class:`RecordSink`)."""

    kept: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    dropped: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def append(self, record: dict[str, Any]) -> None:
        self.kept.append(record)

    def drop_from(self, step: int) -> tuple[int, int | None]:
        """Drop the kept records of steps ``>= step`` — the last ones, as kept steps increase;
        records without a step stay where they are."""
        others: list[dict[str, Any]] = []
        gone: list[dict[str, Any]] = []
        head: int | None = None
        while self.kept:
            s = _step(self.kept[-1])
            if s is None:
                others.append(self.kept.pop())
            elif s >= step:
                gone.append(self.kept.pop())
            else:
                head = s
                break
        self.kept.extend(reversed(others))
        self.dropped.extend(reversed(gone))
        return len(gone), head


@dataclasses.dataclass
class _Events:
    """The events in file order, minus those a ``resume`` superseded (see :func:`read_run`)."""

    kept: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    dropped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rewinds: _Rewinds = dataclasses.field(default_factory=_Rewinds)

    def supersede_all(self, step: int) -> None:
        """Drop the kept events of steps ``>= step``, wherever they are (events are not in step order)."""
        gone = [e for e in self.kept if _at_or_after(e, step)]
        if gone:
            self.kept = [e for e in self.kept if not _at_or_after(e, step)]
            self.dropped.extend(gone)
        self.rewinds.add(step, len(gone))


def _resume_cuts(events: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """``(metrics_offset, step)`` of every ``resume`` event that has both, by offset."""
    cuts = [
        (e["metrics_offset"], e["step"])
        for e in events
        if e.get("type") == "resume" and _is_step(e.get("step")) and _is_step(e.get("metrics_offset"))
    ]
    return sorted(cuts, key=lambda c: c[0])


def _read_metrics(path: Path, notes: list[str], cuts: list[tuple[int, int]], into: RecordSink) -> _Rewinds:
    """Stream the records of ``metrics.jsonl`` into ``into`` with rewinds applied: a resume cut
    (offset, step) drops the records of steps ``>= step`` before ``offset``; a record drops the
    earlier ones of its step or later. Returns what the rewinds dropped."""
    rewinds, head, pending = _Rewinds(), None, list(reversed(cuts))

    def drop_from(step: int) -> int | None:
        count, last = into.drop_from(step)
        rewinds.add(step, count)
        return last

    for offset, record in _read_jsonl(path, notes):
        while pending and pending[-1][0] <= offset:
            head = drop_from(pending.pop()[1])
        step = _step(record)
        if step is not None:
            if head is not None and step <= head:
                drop_from(step)
            head = step
        into.append(record)
    while pending:
        drop_from(pending.pop()[1])
    return rewinds


def _read_events(path: Path, notes: list[str]) -> _Events:
    """The events of ``events.jsonl``; each ``resume`` drops the earlier events of its step or later."""
    events = _Events()
    for _, event in _read_jsonl(path, notes):
        step = _step(event)
        if event.get("type") == "resume" and step is not None:
            events.supersede_all(step)
        events.kept.append(event)
    return events


def _meta_layers(meta: Mapping[str, Any]) -> list[str]:
    """``meta.json``'s ``layers`` (the layer names in order), or ``[]``."""
    names = meta.get("layers")
    return [str(n) for n in names] if isinstance(names, list) else []


def _modified(run: Path) -> float | None:
    """The newest modification time of the run's files (``None`` when none can be read)."""
    times = []
    for name in _RUN_MARKERS:
        with contextlib.suppress(OSError):
            times.append((run / name).stat().st_mtime)
    return max(times, default=None)


def _read_meta(path: Path, notes: list[str]) -> dict[str, Any]:
    file = path / META_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        notes.append(f"{META_FILE}: missing; {_META_EMPTY}")
        return {}
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"{META_FILE}: cannot be read ({e}); {_META_EMPTY}")
        return {}
    try:
        meta = json.loads(text)
        decoded = from_jsonable(meta) if isinstance(meta, dict) else meta
    except RecursionError:
        notes.append(f"{META_FILE}: nested too deeply to read; {_META_EMPTY}")
        return {}
    except ValueError as e:
        notes.append(f"{META_FILE}: not valid JSON ({e}); {_META_EMPTY}")
        return {}
    if not isinstance(decoded, dict):
        notes.append(f"{META_FILE}: a JSON {type(decoded).__name__}, not an object; {_META_EMPTY}")
        return {}
    version = decoded.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        notes.append(
            f"{META_FILE}: schema_version {version} is newer than this gradguard reads "
            f"({SCHEMA_VERSION}); read anyway, unknown fields kept as they are"
        )
    return decoded


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a run directory: a folder holding meta.json, metrics.jsonl or events.jsonl."""
    p = Path(path)
    return p.is_dir() and any((p / n).is_file() for n in _RUN_MARKERS)


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


def _start_time(run: Path) -> float:
    meta = _read_json_quiet(run / META_FILE)
    started = _parse_time(meta.get("start_time")) if isinstance(meta, dict) else None
    if started is not None:
        return started
    try:
        return run.stat().st_mtime
    except OSError:  # pragma: no cover - removed while we look
        return 0.0


def find_runs(root: str | os.PathLike[str]) -> list[Path]:
    """The run directories directly inside ``root``, newest first.

    Newest is by ``start_time`` in ``meta.json``, else the folder's modification time; ties go
    to the later name (names start with a timestamp). A missing ``root`` gives ``[]``.

    Args:
        root: a folder of runs, e.g. ``gradguard-runs``.
    """
    base = Path(root)
    try:
        children = [c for c in base.iterdir() if is_run_dir(c)]
    except OSError:
        return []
    keyed = [(_start_time(c), c.name, c) for c in children]
    keyed.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [c for _, _, c in keyed]


def read_run(path: str | os.PathLike[str], *, records: bool = True) -> RunLog:
    """Read a run directory, or the newest run in a folder of runs, tolerating damage.

    Everything up to the last complete line is loaded; a line cut off by a killed process, a
    malformed or too deeply nested line, a missing or broken ``meta.json`` are skipped and
    described in :attr:`RunLog.skipped`. Only a path with no run at all is an error.

    Rewinds are not counted twice; the later attempt wins:

    * a ``resume`` event (``step`` s, ``metrics_offset`` o) drops the records of steps ``>= s``
      that start before byte o of ``metrics.jsonl``, and the events of steps ``>= s`` written
      before it in ``events.jsonl`` (the resume events themselves are kept);
    * a record whose step is not above the step of the record kept before it drops the earlier
      records of its step or later (a rewind without a ``resume`` event).

    So :attr:`RunLog.metrics`' steps strictly increase. The dropped records and events are in
    :attr:`RunLog.superseded` and :attr:`RunLog.superseded_events`, with one note per file.

    Memory: the lines are read as a stream. With ``records=False`` each record goes into the run
    table (:attr:`RunLog.table`, compact columns) and is not kept: reading costs a fraction of
    ``metrics.jsonl``'s size however long or wide the run (``gradguard diagnose`` and ``report``
    read this way); :attr:`RunLog.metrics` and :attr:`RunLog.superseded` are then empty.

    Args:
        path: a run directory (holding meta.json, metrics.jsonl or events.jsonl), one of those
            files, or a folder whose subfolders are run directories (the newest is read).
        records: keep every record as a dict in :attr:`RunLog.metrics` (default), or only the
            run table's columns (``False``).

    Returns:
        The :class:`RunLog`.

    Raises:
        GradGuardError: ``path`` does not exist, holds no run directory, or holds another tool's
            ``meta.json``.

    Example:
        >>> log = read_run("gradguard-runs")  # doctest: +SKIP
        >>> log.skipped  # doctest: +SKIP
        ['metrics.jsonl: line 1234 is cut off (the process stopped mid-write); skipped']
    """
    p = Path(path)
    if not p.exists():
        raise GradGuardError(
            f"no run log at {str(p)!r}: the path does not exist; pass a run directory "
            "(with meta.json / metrics.jsonl / events.jsonl) or a folder of runs such as gradguard-runs/."
        )
    if p.is_file():
        if p.name not in (*_RUN_MARKERS, FINDINGS_FILE, REPORT_FILE):
            raise GradGuardError(
                f"no run log at {str(p)!r}: it is a file; pass a run directory "
                "(with meta.json / metrics.jsonl / events.jsonl) or a folder of runs."
            )
        p = p.parent
    if not is_run_dir(p):
        runs = find_runs(p)
        if not runs:
            raise GradGuardError(
                f"no run log in {str(p)!r}: expected a run directory holding meta.json, metrics.jsonl "
                "or events.jsonl, or a folder of such run directories (gradguard-runs/<timestamp>-<name>/)."
            )
        p = runs[0]
    if is_foreign(p / META_FILE):
        raise GradGuardError(
            f"{str(p)!r} is not a gradguard run directory: its meta.json is another tool's (no schema_version); "
            "pass the directory gradguard wrote (Guard(log_dir=...), `gradguard run --out`, or gradguard-runs/)."
        )
    notes: list[str] = []
    meta = _read_meta(p, notes)
    event_notes: list[str] = []
    events = _read_events(p / EVENTS_FILE, event_notes)
    resumes = _resume_cuts([*events.kept, *events.dropped])
    sink: _Records | TableBuilder = _Records() if records else TableBuilder(_meta_layers(meta))
    rewinds = _read_metrics(p / METRICS_FILE, notes, resumes, sink)
    notes += event_notes
    rewinds.note(METRICS_FILE, "records", notes)
    events.rewinds.note(EVENTS_FILE, "events", notes)
    log = RunLog(
        path=p,
        meta=meta,
        events=events.kept,
        skipped=notes,
        superseded_events=events.dropped,
        modified=_modified(p),
    )
    if isinstance(sink, _Records):
        log.metrics, log.superseded = sink.kept, sink.dropped
    else:
        log._table, log._streamed = sink.table(), True
    return log
