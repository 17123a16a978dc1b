"""The writer of a run directory: :class:`RunWriter` (standard library only).

Append-only, one live writer per run directory, thread-safe; a storage fault never stops training
(one :class:`RunLogWarning`, what was lost counted); ``meta.json`` merged on reopening and marked
closed (``end_time``) at :meth:`RunWriter.close`; a rewind marked with a ``resume`` event
(:meth:`RunWriter.resume`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gradguard._version import __version__
from gradguard.errors import GradGuardError
from gradguard.runlog._encoding import _line, _safe_repr
from gradguard.runlog._files import (
    _fsync_dir,
    _fsync_file,
    _in_use_error,
    _is_locked,
    _LogFile,
    atomic_write_json,
)
from gradguard.runlog._format import (
    _MAX_LISTED,
    EVENTS_FILE,
    META_FILE,
    METRICS_FILE,
    SCHEMA_VERSION,
    _as_step,
    _read_json_quiet,
    _step,
    foreign_files,
)


class RunLogWarning(RuntimeWarning):
    """A run log could not be written (full disk, I/O error, directory deleted): training goes on.

    Issued once per :class:`RunWriter`; silence it with
    ``warnings.filterwarnings("ignore", category=RunLogWarning)``.
    """


_TAIL_CHUNK = 1 << 16  # bytes read at a time from the end of metrics.jsonl
_TAIL_LIMIT = 64 << 20  # at most this much of it is read to find the last logged step


def _utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _step_of_line(raw: bytes) -> int | None:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return _step(obj) if isinstance(obj, dict) else None


def _last_step_in(path: Path) -> int | None:
    """The ``step`` of the last complete record of a metrics file, read backwards from its end
    (at most :data:`_TAIL_LIMIT` bytes); ``None`` if there is none or the file cannot be read."""
    try:
        with open(path, "rb") as f:
            end = pos = f.seek(0, os.SEEK_END)
            carry, in_tail = b"", True  # in_tail: still inside the text after the last newline
            while pos > 0 and end - pos < _TAIL_LIMIT:
                n = min(_TAIL_CHUNK, pos)
                pos -= n
                f.seek(pos)
                lines = (f.read(n) + carry).split(b"\n")
                if in_tail:
                    if len(lines) == 1:
                        carry = b""
                        continue
                    lines.pop()  # empty, or a line cut by a killed writer
                    in_tail = False
                carry = lines.pop(0) if pos > 0 else b""
                for raw in reversed(lines):
                    step = _step_of_line(raw)
                    if step is not None:
                        return step
    except OSError:
        return None
    return None


def _describe_records(records: list[Mapping[str, Any]]) -> str:
    steps = [s for s in (_as_step(r.get("step")) for r in records) if s is not None]
    noun = "step record" if len(records) == 1 else "step records"
    if not steps:
        return f"{len(records)} {noun}"
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {min(steps)}–{max(steps)}"
    return f"{len(records)} {noun} ({span})"


def _describe_events(events: list[Mapping[str, Any]]) -> str:
    named = [f"{e.get('type', '?')} at step {e.get('step', '?')}" for e in events[:_MAX_LISTED]]
    more = f", +{len(events) - _MAX_LISTED} more" if len(events) > _MAX_LISTED else ""
    return f"{len(events)} event{'s' if len(events) != 1 else ''} ({', '.join(named)}{more})"


def _error_text(error: OSError) -> str:
    code = errno.errorcode.get(error.errno, "") if error.errno is not None else ""
    text = error.strerror or str(error) or type(error).__name__
    return f"{text} ({code})" if code else text


def _fix_for(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Free space on that file system to go on logging."
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "Make the run directory writable to go on logging."
    return "Check the disk or file system holding the run directory."


class RunWriter:
    """Append-only writer of one run directory: ``meta.json``, ``metrics.jsonl``, ``events.jsonl``.

    Creates the directory (and its parents) and writes ``meta.json`` atomically with
    ``schema_version``, ``gradguard_version``, ``start_time`` (ISO 8601, UTC), ``argv``,
    ``python`` and every key of ``meta`` (the caller's keys win, except ``schema_version``).

    Every write to a ``.jsonl`` file is one ``write`` call that ends with a newline, on a file
    opened in append mode, so a crash can only cut the last line. Methods are thread-safe.

    **One writer per run directory.** The writer holds an exclusive ``flock`` on
    ``metrics.jsonl`` from construction to :meth:`close` (the OS drops it when the process
    dies); a second writer of the same directory, in this process or another, gets a
    :class:`GradGuardError`, whatever ``exist_ok`` says. Without ``flock`` (Windows, some network
    file systems) there is no such check.

    **Storage faults never stop training.** A write that fails (full disk, I/O error, read-only
    file system, the run directory deleted) issues **one** :class:`RunLogWarning` per writer
    naming the file, the error and what was lost; what was lost is counted in :attr:`lost`
    (and saved in ``meta.json``'s ``lost`` at :meth:`close`, where possible). Later writes keep
    trying, in whole lines: what a failed write left of a line is removed before the next one.
    Once a file is found deleted (with its run directory, say) the writer stops writing: the
    log is gone and writing on into unlinked files would only hide that. Only writing after
    :meth:`close` is an error; :meth:`close` never raises for I/O.

    **End and resume.** :meth:`close` writes ``end_time`` to ``meta.json`` (unless the caller
    did), the marker of a run that was closed (:attr:`RunLog.closed`). :meth:`resume` marks that
    training goes on from an earlier step, so readers drop the superseded records.

    Args:
        run_dir: the run directory (see :func:`default_run_dir`).
        meta: extra metadata, e.g. torch version, world size, module tree, guard configuration.
        exist_ok: append to a directory that already holds a run log (that no live writer holds).
            ``meta.json`` is then merged: the first ``start_time`` is kept, this start is added to
            ``resumed_at`` and the old ``end_time`` is dropped (the run is open again).

    Raises:
        GradGuardError: ``run_dir`` is empty text or a file; it already holds ``metrics.jsonl``
            or ``events.jsonl`` and ``exist_ok`` is false; another live writer holds it.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with RunWriter(run, {"world_size": 1}) as w:
        ...     w.write_metrics([{"step": 0, "loss": 1.0, "grad_norm": float("inf")}])
        ...     w.write_event({"type": "skip", "step": 0})
        >>> (run / "metrics.jsonl").read_text()
        '{"step": 0, "loss": 1.0, "grad_norm": "inf"}\\n'
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        meta: Mapping[str, Any] | None = None,
        *,
        exist_ok: bool = False,
    ) -> None:
        if meta is not None and not isinstance(meta, Mapping):
            raise GradGuardError(
                f"RunWriter meta must be a dict, got {type(meta).__name__}: {_safe_repr(meta)[:200]}; "
                "pass a dict of metadata (or None)."
            )
        self._lock = threading.Lock()
        self._metrics: _LogFile | None = None
        self._events: _LogFile | None = None
        self._closed = False
        self._gone = False  # a log file was deleted: writing stopped
        self._warned = False
        self._meta_unsynced = False  # meta.json rewritten since its last fsync (done at close)
        self._lost = {"records": 0, "events": 0}
        self._last_step: int | None = None
        self._meta: dict[str, Any] = {}
        self.path = _checked_run_dir(run_dir)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unwritable(self.path, e) from e
        refuse_foreign(self.path)
        existing = _existing_log(self.path)
        if not exist_ok:
            refuse_existing(self.path)
        try:
            self._open(meta, reopened=bool(existing))
        except OSError as e:
            self._release()
            raise _unwritable(self.path, e) from e
        except BaseException:
            self._release()
            raise
        _fsync_dir(self.path)

    def _open(self, meta: Mapping[str, Any] | None, *, reopened: bool) -> None:
        """Lock the run directory first, then end cut lines and write ``meta.json``: a writer
        refused by the lock has changed nothing."""
        self._metrics = _LogFile(self.path / METRICS_FILE)
        self._metrics.lock(self.path)
        self._metrics.end_cut_line()
        self._meta = _start_meta(self.path, meta, reopened=reopened)
        atomic_write_json(self.path / META_FILE, self._meta, fsync=False)  # fsync-ed at close
        self._meta_unsynced = True
        self._events = _LogFile(self.path / EVENTS_FILE)
        self._events.end_cut_line()

    # -- properties -----------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the metadata as last written to ``meta.json``."""
        return dict(self._meta)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def lost(self) -> dict[str, int]:
        """What failed writes lost so far: ``{"records": n, "events": m}`` (zeros when nothing)."""
        return dict(self._lost)

    # -- writing --------------------------------------------------------------------------

    def _file(self, f: _LogFile | None, what: str) -> _LogFile:
        if self._closed or f is None:
            raise GradGuardError(
                f"cannot write {what} to run directory {str(self.path)!r}: the RunWriter is closed; "
                "write before close() or open a new RunWriter(..., exist_ok=True)."
            )
        return f

    def _fault(self, path: Path, error: OSError, lost: str) -> None:
        """Note a failed write: stop writing if the log was deleted; warn the first time."""
        if isinstance(error, FileNotFoundError) or not self.path.is_dir():
            self._gone = True
        if self._warned:
            return
        self._warned = True
        if self._gone:
            message = (
                f"gradguard: the run log {str(path)!r} was deleted while the run was writing to it "
                f"({_error_text(error)}): {lost} and everything after are not logged. Training goes on "
                f"without a run log; keep the run directory {str(self.path)!r} in place for the whole run."
            )
        else:
            message = (
                f"gradguard: cannot write the run log {str(path)!r}: {_error_text(error)}. Lost: {lost}. "
                "Training goes on; later writes keep trying, in whole lines (this warning is not repeated, "
                f"RunWriter.lost counts what is lost). {_fix_for(error)}"
            )
        warnings.warn(message, RunLogWarning, stacklevel=4)

    def _append(self, f: _LogFile, data: bytes, kind: str, items: list[Mapping[str, Any]]) -> bool:
        """Append ``data`` to ``f`` (lock held); on an I/O error count ``items`` as lost, warn once
        and return ``False``."""
        if not data:
            return True
        if self._gone:
            self._lost[kind] += len(items)
            return False
        try:
            f.append(data)
        except OSError as e:
            self._lost[kind] += len(items)
            lost = _describe_records(items) if kind == "records" else _describe_events(items)
            self._fault(f.path, e, lost)
            return False
        return True

    def _sync(self, f: _LogFile) -> None:
        try:
            f.sync()
        except OSError as e:
            self._fault(f.path, e, "lines written since the last sync may not be on disk")

    def write_metrics(
        self, records: Iterable[Mapping[str, Any]] | Mapping[str, Any], *, fsync: bool = False
    ) -> None:
        """Append records to ``metrics.jsonl``, one JSON object per line, in one write call.

        An I/O error does not raise: see the class docs (one warning, :attr:`lost`).

        Args:
            records: step records (``step``, ``loss``, ``grad_norm``, ``layers``, ...). A single
                dict is taken as one record.
            fsync: also ``os.fsync`` the file (the data is always handed to the OS at once).
        """
        batch = [records] if isinstance(records, Mapping) else list(records)
        data = "".join(_line(r) for r in batch).encode("utf-8")
        with self._lock:
            f = self._file(self._metrics, "metrics")
            if not self._append(f, data, "records", batch):
                return
            steps = [s for s in (_as_step(r.get("step")) for r in batch) if s is not None]
            if steps:
                self._last_step = steps[-1]
            if fsync:
                self._sync(f)

    def last_logged_step(self) -> int | None:
        """The ``step`` of the last record in ``metrics.jsonl`` (this writer's, or an earlier run's
        it appends to); ``None`` when there is none."""
        with self._lock:
            if self._last_step is not None:
                return self._last_step
        return _last_step_in(self.path / METRICS_FILE)

    def write_event(self, event: Mapping[str, Any]) -> None:
        """Append one event to ``events.jsonl`` and ``os.fsync`` it before returning.

        Args:
            event: the event, with a ``type`` (``nonfinite``, ``spike``, ``skip``, ...).
        """
        self.write_events([event])

    def write_events(self, events: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> None:
        """Append several events to ``events.jsonl`` in one write call, then one ``os.fsync``.

        An I/O error does not raise: see the class docs (one warning, :attr:`lost`).

        Args:
            events: the events; a single dict is taken as one event.
        """
        batch = [events] if isinstance(events, Mapping) else list(events)
        with self._lock:
            self._write_events(batch)

    def _write_events(self, batch: list[Mapping[str, Any]]) -> None:
        f = self._file(self._events, "events")
        data = "".join(_line(e) for e in batch).encode("utf-8")
        if data and self._append(f, data, "events", batch):
            self._sync(f)

    def resume(self, step: int) -> None:
        """Mark that training goes on from ``step`` (a checkpoint of that step was loaded).

        Appends ``{"type": "resume", "step": step, "last_logged_step": ..., "metrics_offset": ...}``
        to ``events.jsonl``: ``last_logged_step`` is the step of the last record in
        ``metrics.jsonl`` (``None`` if none), ``metrics_offset`` the size of ``metrics.jsonl``
        at the resume (``None`` if unknown). :func:`read_run` then drops the records of steps
        ``>= step`` written before the resume, and the events of steps ``>= step`` written before
        it, so a rewound run is not counted twice. :class:`gradguard.Guard` calls this from
        ``load_state_dict``.

        Args:
            step: the first step that will be logged again (the checkpoint's step count).

        Raises:
            GradGuardError: ``step`` is not an integer ``>= 0``, or the writer is closed.
        """
        value = _as_step(step)
        if value is None or value < 0:
            raise GradGuardError(
                f"RunWriter.resume(step) needs an integer step >= 0, got {_safe_repr(step)[:200]}; "
                "pass the step count of the checkpoint that was loaded."
            )
        with self._lock:
            metrics = self._file(self._metrics, "a resume")
            offset: int | None = None
            if not self._gone:
                with contextlib.suppress(OSError):
                    offset = metrics.size()
            last = self._last_step if self._last_step is not None else _last_step_in(metrics.path)
            event = {"type": "resume", "step": value, "last_logged_step": last, "metrics_offset": offset}
            self._write_events([event])

    def _write_meta(self, fields: Iterable[str]) -> None:
        """Rewrite ``meta.json`` from :attr:`_meta` (lock held); an I/O error warns once.

        Atomic but not ``fsync``-ed (a process that dies leaves the old or the new file, whole):
        :meth:`close` syncs it once, not every update (~1 ms each)."""
        if self._gone:
            return
        try:
            atomic_write_json(self.path / META_FILE, self._meta, fsync=False)
        except OSError as e:
            self._fault(self.path / META_FILE, e, f"the update of {META_FILE} ({', '.join(fields)})")
            return
        self._meta_unsynced = True

    def _sync_meta(self) -> None:
        """``fsync`` ``meta.json`` if it changed since the last sync (lock held); warns once."""
        if self._gone or not self._meta_unsynced:
            return
        self._meta_unsynced = False
        try:
            _fsync_file(self.path / META_FILE)
        except OSError as e:
            self._fault(self.path / META_FILE, e, f"{META_FILE} may not be on disk")

    def update_meta(self, **fields: Any) -> None:
        """Merge ``fields`` into the metadata and rewrite ``meta.json`` atomically.

        An I/O error does not raise: it warns once (see the class docs); the fields are kept and
        written with the next update that succeeds.

        Example:
            >>> import tempfile, pathlib
            >>> w = RunWriter(pathlib.Path(tempfile.mkdtemp()) / "r")
            >>> w.update_meta(end_time="2025-01-01T00:00:00+00:00", steps=10)
            >>> w.meta["steps"]
            10
            >>> w.close()
        """
        with self._lock:
            self._meta.update(fields)
            self._meta["schema_version"] = SCHEMA_VERSION
            self._write_meta(fields)

    def _finish_meta(self) -> None:
        """Write the close marker (``end_time``) and what was lost to ``meta.json`` (lock held)."""
        fields = []
        if self._meta.get("end_time") is None:
            self._meta["end_time"] = _utc_now_iso()
            fields.append("end_time")
        if any(self._lost.values()):
            before = self._meta.get("lost")
            earlier = before if isinstance(before, dict) else {}
            self._meta["lost"] = {k: (_as_step(earlier.get(k)) or 0) + n for k, n in self._lost.items()}
            fields.append("lost")
        if fields:
            self._write_meta(fields)

    def close(self) -> None:
        """Write ``end_time`` to ``meta.json`` (unless set), ``fsync`` and close the log files, and
        release the run directory. Never raises for I/O. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._finish_meta()
            self._sync_meta()
        self._release()

    def _release(self) -> None:
        """Close the files and drop the lock, nothing else (also after a failed construction)."""
        with self._lock:
            self._closed = True
            files = [f for f in (self._metrics, self._events) if f is not None]
            self._metrics = self._events = None
        for f in files:
            f.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"RunWriter({str(self.path)!r}, {state})"


def _checked_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    if isinstance(run_dir, str) and not run_dir.strip():
        raise GradGuardError(
            f"run directory {run_dir!r} is empty: it would write into the current directory; "
            "pass a directory path, or 'auto' for gradguard-runs/<timestamp>-<name>."
        )
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise GradGuardError(
            f"run directory {str(path)!r} is a file, not a directory; "
            "pass a directory path (it is created if missing)."
        )
    return path


def _unwritable(path: Path, e: OSError) -> GradGuardError:
    return GradGuardError(
        f"cannot write the run log in {str(path)!r}: {e.strerror or e}; pass a run directory in a folder you can "
        "write to."
    )


def check_run_dir(run_dir: str | os.PathLike[str]) -> None:
    """Refuse, before a run starts, a run directory that cannot be created or written (a path below a file, a
    read-only folder), or whose ``meta.json`` is another tool's: the run would otherwise go on unguarded,
    end at its first step, or replace that file. Nothing is created."""
    path = _checked_run_dir(run_dir)
    folder = path.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise GradGuardError(
            f"run directory {str(path)!r} cannot be created: {str(folder)!r} is a file; pass a directory path."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GradGuardError(
            f"run directory {str(path)!r} cannot be written: {str(folder)!r} is not writable (a read-only "
            "folder or file system); pass a run directory in a folder you can write to."
        )
    if path.is_dir():
        refuse_foreign(path)


def _existing_log(run_dir: Path) -> list[str]:
    return [n for n in (META_FILE, METRICS_FILE, EVENTS_FILE) if (run_dir / n).exists()]


def refuse_foreign(run_dir: Path) -> None:
    """Refuse a directory holding a file gradguard would write that is not gradguard's (another tool's
    ``meta.json`` or ``metrics.jsonl``, the user's own ``report.html`` or ``findings.json``:
    :func:`foreign_files`): a writer, a run's report or a diagnosis would replace it or append into it,
    ``exist_ok`` or not. A gradguard ``meta.json`` cut or damaged still names its ``schema_version``
    (its first key), or is empty, or sits beside gradguard's own log lines."""
    found = foreign_files(run_dir)
    if not found:
        return
    what = "; ".join(
        f"{str(run_dir / name)!r} is not a gradguard run's {name} ({why})" for name, why in found
    )
    verb = "append to" if all(name in (METRICS_FILE, EVENTS_FILE) for name, _ in found) else "overwrite"
    raise GradGuardError(
        f"{what}: another tool's or your own file{'s' if len(found) > 1 else ''}, and a gradguard "
        f"run there would {verb} {'it' if len(found) == 1 else 'them'}. Pass a new directory for the run log "
        "(e.g. `gradguard run --out runs/NAME`, or gradguard.runlog.default_run_dir()), or move those files away."
    )


_NEW_DIR_FIX = (
    "pass a new directory (e.g. gradguard.runlog.default_run_dir()) for a new run, or exist_ok=True"
)


def in_use(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a live writer (a run still going, in this or another process) holds ``run_dir``'s lock:
    what is read there now is a snapshot, and a file derived from it (``findings.json``) would be stale
    once the run ends. ``False`` where locks are unknown (no ``flock``)."""
    return _is_locked(Path(run_dir) / METRICS_FILE)


def refuse_existing(run_dir: Path, fix: str = _NEW_DIR_FIX) -> None:
    """Refuse a directory that already holds a run log (in use by a live writer, or left by an
    earlier run): ``fix`` says how to pass another one, or to append (``gradguard run``: its flags)."""
    existing = _existing_log(run_dir)
    if not existing:
        return
    if _is_locked(run_dir / METRICS_FILE):
        raise _in_use_error(run_dir)
    raise GradGuardError(
        f"run directory {str(run_dir)!r} already holds a run log ({', '.join(existing)}); {fix} to append to this one."
    )


def _start_meta(run_dir: Path, meta: Mapping[str, Any] | None, *, reopened: bool) -> dict[str, Any]:
    """The metadata a writer starts with; when ``reopened``, merged with the run's ``meta.json``."""
    now = _utc_now_iso()
    fresh: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "gradguard_version": __version__,
        "start_time": now,
        "argv": list(sys.argv),
        "python": platform.python_version(),
    }
    fresh.update(meta or {})
    fresh["schema_version"] = SCHEMA_VERSION
    old = _read_json_quiet(run_dir / META_FILE) if reopened else None
    if not isinstance(old, dict):
        return fresh
    merged = {**old, **fresh}
    merged.pop("end_time", None)  # open again: the run has not ended
    merged["start_time"] = old.get("start_time", fresh["start_time"])
    resumed = old.get("resumed_at")
    merged["resumed_at"] = [*(resumed if isinstance(resumed, list) else []), now]
    if old.get("argv") != fresh.get("argv"):  # another command appended: the earlier ones are kept
        before = old.get("sessions")
        first = [{"start_time": old.get("start_time"), "argv": old.get("argv")}]
        merged["sessions"] = [
            *(before if isinstance(before, list) else first),
            {"start_time": now, "argv": fresh["argv"]},
        ]
    return merged
