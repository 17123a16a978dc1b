"""The run directory: its format, an append-only writer and a tolerant reader (standard library only).

A run directory holds::

    meta.json       one JSON object: schema_version, versions, command line, start time, ...
    metrics.jsonl   one JSON object per recorded step
    events.jsonl    one JSON object per event (``type``: nonfinite, spike, skip, rollback, ...)
    findings.json   written later by ``gradguard.diagnose``
    report.html     written later by ``gradguard.report``

The default location is ``gradguard-runs/<YYYYmmdd-HHMMSS>-<name>/`` (:func:`default_run_dir`).

Durability: each write to a ``.jsonl`` file is **one** ``write`` call on a file opened in append
mode that ends with ``"\\n"``, so a crash or ``SIGKILL`` can only cut the last line. Metrics are
written at flush cadence (``fsync`` optional); events are ``fsync``-ed as soon as they are written.
``meta.json`` and every other whole-file write go through :func:`atomic_write_text` (temp file,
``fsync``, ``os.replace``), so a reader sees the old file or the new one, never half of one;
``meta.json`` is ``fsync``-ed once, at close (a killed process still leaves it whole).

Faults (see :class:`RunWriter`): a full disk, an I/O error or a deleted run directory never stops
training: one :class:`RunLogWarning` says which file, which error and what was lost, and the log
stays whole lines (a record is never glued to a cut line). One live writer per run directory
(an ``flock`` on ``metrics.jsonl``). ``meta.json``'s ``end_time`` marks a closed run
(:attr:`RunLog.closed`).

Rewinds: a run resumed from an earlier checkpoint logs some steps again. The writer marks it with
a ``resume`` event (:meth:`RunWriter.resume`) and the reader keeps the latest record of each step:
records and events of the abandoned attempt are dropped, into :attr:`RunLog.superseded` and
:attr:`RunLog.superseded_events`, with a note.

Encoding: standard JSON only. ``float('nan')``, ``inf`` and ``-inf`` are written as the strings
``"nan"``, ``"inf"`` and ``"-inf"`` (anywhere in nested dicts and lists) and the reader turns
exactly those strings back into floats, except under the keys of :data:`TEXT_KEYS` (``kind``,
``type``, ``argv``, ...), whose values are text by contract: a ``nonfinite`` event's
``"kind": "nan"`` stays the string ``"nan"``. Values JSON does not know (numpy and torch scalars or
arrays, tuples, sets, :class:`pathlib.Path`, dataclasses, datetimes, anything with
``__float__``) are converted; a value that cannot be converted becomes its ``repr()`` string,
so logging never stops a training run.

The reader (:func:`read_run`) loads everything up to the last complete line, skips what it cannot
parse (including lines nested too deeply to parse) and says what it skipped in
:attr:`RunLog.skipped`. It reads the lines as a stream; with ``records=False`` it keeps the run
table's columns only (:attr:`RunLog.table`, :mod:`gradguard.runtable`), not one dict per record,
so a million steps, or thousands of layers, read in a fraction of the log's size.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with RunWriter(root / "demo", {"world_size": 1}) as w:
    ...     w.write_metrics([{"step": 0, "loss": 2.5}, {"step": 1, "loss": float("nan")}])
    ...     w.write_event({"type": "nonfinite", "step": 1, "kind": "nan"})
    >>> log = read_run(root)
    >>> log.series("loss")
    [(0, 2.5), (1, nan)]
    >>> log.first_event("nonfinite")["kind"]  # text by contract (see TEXT_KEYS)
    'nan'
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import io
import json
import math
import operator
import os
import platform
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from gradguard._version import __version__
from gradguard.errors import GradGuardError
from gradguard.runtable import RunTable, TableBuilder

try:  # POSIX: the one-writer-per-run-directory lock
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs go unlocked
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "EVENTS_FILE",
    "FINDINGS_FILE",
    "META_FILE",
    "METRICS_FILE",
    "REPORT_FILE",
    "SCHEMA_VERSION",
    "TEXT_KEYS",
    "RunLog",
    "RunLogWarning",
    "RunWriter",
    "atomic_write_json",
    "atomic_write_text",
    "default_run_dir",
    "find_runs",
    "from_jsonable",
    "is_run_dir",
    "read_run",
    "to_jsonable",
]

SCHEMA_VERSION = 1
"""Version of the run-directory format; written to ``meta.json`` as ``schema_version``."""

META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
FINDINGS_FILE = "findings.json"
REPORT_FILE = "report.html"

TEXT_KEYS = frozenset(
    {"type", "kind", "phase", "module", "op", "tensor", "source", "located_by", "argv", "id", "severity"}
)
"""Keys whose values the reader never turns into floats: their ``"nan"``/``"inf"`` are text.

A ``nonfinite`` event's ``kind`` is the string ``"nan"``, ``"inf"`` or ``"-inf"`` by contract, and
``argv`` may hold such words; under these keys (at any depth) the whole value is kept as written.
"""

_RUN_MARKERS = (META_FILE, METRICS_FILE, EVENTS_FILE)
_NONFINITE_FROM_STR = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_MAX_REPR = 2000  # characters kept of an unencodable value's repr()
_MAX_NOTES_PER_FILE = 20  # skipped-line notes per file before they are summarised
_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 64


# --------------------------------------------------------------------------------------------
# JSON encoding
# --------------------------------------------------------------------------------------------


def _float_str(x: float) -> float | str:
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "nan"
    return "inf" if x > 0 else "-inf"


def _safe_repr(x: Any) -> str:
    try:
        text = repr(x)
    except Exception:
        return f"<unrepresentable {type(x).__qualname__}>"
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 1] + "…"
    return text


def _key_str(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, float):
        return str(_float_str(key))
    if isinstance(key, int):
        return str(int(key))
    return _safe_repr(key)


def _jsonable(x: Any, active: set[int]) -> Any:
    """Convert ``x`` into plain JSON values; ``active`` holds the containers being walked."""
    if x is None or isinstance(x, (str, bool, int)):
        return x
    if isinstance(x, float):
        return _float_str(float(x))
    if isinstance(x, (Mapping, list, tuple, set, frozenset)):
        if id(x) in active:
            return f"<cycle {type(x).__qualname__}>"
        active.add(id(x))
        try:
            if isinstance(x, Mapping):
                return {_key_str(k): _jsonable(v, active) for k, v in x.items()}
            if isinstance(x, (set, frozenset)):
                try:
                    items: list[Any] = sorted(x)
                except TypeError:
                    items = list(x)
                return [_jsonable(v, active) for v in items]
            return [_jsonable(v, active) for v in x]
        finally:
            active.discard(id(x))
    try:
        if isinstance(x, os.PathLike):
            path = os.fspath(x)
            return path if isinstance(path, str) else _safe_repr(path)
        if isinstance(x, (_dt.datetime, _dt.date, _dt.time)):
            return x.isoformat()
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return _jsonable({f.name: getattr(x, f.name) for f in dataclasses.fields(x)}, active)
        tolist = getattr(x, "tolist", None)  # numpy scalars/arrays, torch tensors
        if callable(tolist):
            value = tolist()
            if type(value) is not type(x):
                return _jsonable(value, active)
        if hasattr(x, "__index__"):
            return operator.index(x)
        if hasattr(x, "__float__"):
            return _float_str(float(x))
    except Exception:
        pass
    return _safe_repr(x)


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: non-finite floats as ``"nan"``/``"inf"``/``"-inf"``.

    Never raises: a value that cannot be converted becomes its ``repr()`` string (cut to 2000
    characters), a reference cycle becomes ``"<cycle TYPE>"``.

    Args:
        obj: any Python object, usually a dict of numbers, strings, lists and dicts.

    Returns:
        An object made of ``dict`` (string keys), ``list``, ``str``, ``int``, finite ``float``,
        ``bool`` and ``None`` only.

    Example:
        >>> to_jsonable({"loss": float("inf"), "shape": (3, 4)})
        {'loss': 'inf', 'shape': [3, 4]}
    """
    try:
        return _jsonable(obj, set())
    except RecursionError:
        return _safe_repr(obj)


def from_jsonable(obj: Any, keep: frozenset[str] = TEXT_KEYS) -> Any:
    """The inverse of :func:`to_jsonable` for floats: ``"nan"``, ``"inf"``, ``"-inf"`` → floats.

    Only those three exact strings are converted, in dict values and list items at any depth;
    dict keys stay strings, and so does everything under a key in ``keep``.

    Args:
        obj: a value as parsed by :func:`json.loads`.
        keep: keys whose values are text by contract (default :data:`TEXT_KEYS`).

    Example:
        >>> from_jsonable({"loss": "-inf", "name": "infinity", "kind": "nan"})
        {'loss': -inf, 'name': 'infinity', 'kind': 'nan'}
    """
    if isinstance(obj, str):
        return _NONFINITE_FROM_STR.get(obj, obj)
    if isinstance(obj, dict):
        return {k: v if k in keep else from_jsonable(v, keep) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v, keep) for v in obj]
    return obj


_ENCODE_LINE = json.JSONEncoder(allow_nan=False).encode
"""One-line strict JSON, built once: ``json.dumps`` builds an encoder on every call (~1.5 µs a record)."""


def _dumps(obj: Any, indent: int | None = None) -> str:
    """Standard JSON text of ``obj`` (see :func:`to_jsonable`); never raises."""
    try:  # fast path: plain data, all floats finite (the C encoder)
        return _ENCODE_LINE(obj) if indent is None else json.dumps(obj, allow_nan=False, indent=indent)
    except (TypeError, ValueError, OverflowError, RecursionError):
        pass
    try:
        return json.dumps(to_jsonable(obj), allow_nan=False, indent=indent)
    except (TypeError, ValueError, OverflowError, RecursionError):  # pragma: no cover - defensive
        return json.dumps(_safe_repr(obj))


def _line(obj: Any) -> str:
    return _dumps(obj) + "\n"


# --------------------------------------------------------------------------------------------
# Atomic whole-file writes
# --------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """``fsync`` a folder so a rename in it is durable; a no-op where the OS does not allow it."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically: readers see the old file or the new one.

    Writes a temporary file in the same folder, flushes and ``fsync``-s it, renames it over
    ``path`` with :func:`os.replace`, then ``fsync``-s the folder where the OS allows it. On an
    error the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the file to write; its folder must exist.
        text: the whole new content.
        fsync: ``False``: no ``fsync`` (still atomic for readers and when the process dies; the
            caller makes it durable later, e.g. with :func:`_fsync_file`). Saves ~0.1–1 ms a write.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write_text(p, "hello\\n"); p.read_text()
        'hello\\n'
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    data = text.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)  # the umask applies, as for an ordinary open()
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(target.parent)


def _fsync_file(path: str | os.PathLike[str]) -> None:
    """``fsync`` an existing file and its folder: makes an earlier ``atomic_write_text(...,
    fsync=False)`` durable. Raises :class:`OSError` as ``os.open`` / ``os.fsync`` do."""
    target = Path(path)
    fd = os.open(target, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(target.parent)


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, fsync: bool = True
) -> None:
    """Write ``obj`` as standard JSON to ``path`` atomically (see :func:`atomic_write_text`).

    Non-finite floats become ``"nan"``/``"inf"``/``"-inf"`` and other values are converted as by
    :func:`to_jsonable`, so this never fails on the data.

    Args:
        path: the file to write; its folder must exist.
        obj: the value to write.
        indent: JSON indentation (``None`` for one line).
        fsync: see :func:`atomic_write_text`.
    """
    atomic_write_text(path, _dumps(obj, indent=indent) + "\n", fsync=fsync)


# --------------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------------


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _sanitize_name(name: str) -> str:
    cleaned = _NAME_BAD_CHARS.sub("-", str(name)).strip(".-")[:_MAX_NAME].strip(".-")
    return cleaned or "run"


def default_run_dir(
    name: str = "run", root: str | os.PathLike[str] = "gradguard-runs", *, create: bool = False
) -> Path:
    """A fresh run directory path: ``<root>/<YYYYmmdd-HHMMSS>-<name>`` in local time.

    ``name`` is cut to the characters ``[A-Za-z0-9._-]`` (others become ``-``, at most 64
    characters, ``"run"`` if nothing is left). Where that path exists, ``-2``, ``-3``, … is added.

    Args:
        name: a short name for the run, e.g. the script's name.
        root: the folder of runs.
        create: also create the directory (and ``root``), atomically claiming the name so two
            processes starting in the same second get different directories.

    Returns:
        The path (created only when ``create`` is true).

    Example:
        >>> default_run_dir("my model!").name  # doctest: +SKIP
        '20250101-120000-my-model'
    """
    base = f"{_timestamp()}-{_sanitize_name(name)}"
    root_path = Path(root)
    suffix = 1
    while True:
        candidate = root_path / (base if suffix == 1 else f"{base}-{suffix}")
        suffix += 1
        if candidate.exists():
            continue
        if not create:
            return candidate
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        return candidate


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class RunLogWarning(RuntimeWarning):
    """A run log could not be written (full disk, I/O error, directory deleted): training goes on.

    Issued once per :class:`RunWriter`; silence it with
    ``warnings.filterwarnings("ignore", category=RunLogWarning)``.
    """


_TAIL_CHUNK = 1 << 16  # bytes read at a time from the end of metrics.jsonl
_TAIL_LIMIT = 64 << 20  # at most this much of it is read to find the last logged step
_MAX_LISTED = 3  # lost events named one by one in a warning


def _utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _write_all(fd: int, data: bytes) -> None:
    """One ``os.write`` call (repeated only for the rest of a short write, which regular files rarely do)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _as_step(value: Any) -> int | None:
    """``value`` as a step number (ints and int-like scalars such as numpy's), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


class _LogFile:
    """One append-only ``.jsonl`` file of a run directory, written in whole lines only.

    Opened unbuffered in append mode (``O_APPEND``), so each :meth:`append` is one ``write`` at
    the end of the file. :attr:`cut` is the size the file had before a write that failed: that
    write may have left part of a line, which is truncated away (or, where truncating fails too,
    ended with a newline so the reader skips it as one bad line) before anything new is written.
    A record is never glued to a cut line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = io.FileIO(path, "a+")
        self.cut: int | None = None

    def lock(self, run_dir: Path) -> None:
        """Take the run directory's writer lock: an exclusive ``flock`` on this file, released on
        :meth:`close` and when the process dies. Where the OS or file system has no ``flock``
        (Windows, some network mounts) the run goes on unlocked."""
        if fcntl is None:
            return
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use_error(run_dir) from None
        except OSError:
            return

    def end_cut_line(self) -> None:
        """If the file ends mid-line (a killed writer), end that line: the cut line stays a line of
        its own that the reader skips, instead of swallowing the first new record."""
        fd = self.file.fileno()
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)  # reads only: writes go to the end (O_APPEND)
            if os.read(fd, 1) != b"\n":
                _write_all(fd, b"\n")

    def size(self) -> int:
        """The file's size, at a line boundary (a cut line is repaired first).

        Raises:
            FileNotFoundError: the file was deleted (e.g. with its run directory) while open.
            OSError: the repair failed.
        """
        st = os.fstat(self.file.fileno())
        if st.st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, "deleted while the run was writing to it", str(self.path))
        return st.st_size if self.cut is None else self._repair(st.st_size, self.cut)

    def _repair(self, size: int, cut: int) -> int:
        """Remove what a failed write left after ``cut`` (the size before it); return the new size."""
        fd = self.file.fileno()
        if size > cut:
            try:
                os.ftruncate(fd, cut)
                size = cut
            except OSError:
                _write_all(fd, b"\n")  # cannot remove the cut line: end it, the reader skips it
                size += 1
        self.cut = None
        return size

    def append(self, data: bytes) -> None:
        """Append ``data`` (whole lines) in one write; on failure leave no part of it behind
        (at once if possible, else before the next append) and raise the ``OSError``."""
        self.cut = self.size()
        try:
            _write_all(self.file.fileno(), data)
        except OSError:
            with contextlib.suppress(OSError):
                self.size()  # repair now, so the file is whole even if nothing more is written
            raise
        self.cut = None

    def sync(self) -> None:
        """``os.fsync`` the file."""
        os.fsync(self.file.fileno())

    def close(self) -> None:
        """Sync, unlock and close; never raises for I/O."""
        with contextlib.suppress(OSError):
            self.sync()
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            self.file.close()


def _in_use_error(run_dir: Path) -> GradGuardError:
    return GradGuardError(
        f"run directory {str(run_dir)!r} is in use: a live RunWriter (a Guard in this or another process) "
        f"holds its lock on {METRICS_FILE}, and two writers would interleave their records. "
        "Pass another log_dir (e.g. log_dir='auto' or gradguard.runlog.default_run_dir()), "
        "or close the other run (guard.close() / writer.close()) first."
    )


def _is_locked(path: Path) -> bool:
    """Whether a live writer holds the lock on ``path`` (a metrics file); ``False`` where locks are unknown."""
    if fcntl is None:
        return False
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except OSError:
        return False
    return False


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
        self.path.mkdir(parents=True, exist_ok=True)
        existing = [n for n in (METRICS_FILE, EVENTS_FILE) if (self.path / n).exists()]
        if existing and not exist_ok:
            if _is_locked(self.path / METRICS_FILE):
                raise _in_use_error(self.path)
            raise _exists_error(self.path, existing)
        try:
            self._open(meta, reopened=bool(existing))
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


def _exists_error(run_dir: Path, existing: list[str]) -> GradGuardError:
    return GradGuardError(
        f"run directory {str(run_dir)!r} already holds a run log ({', '.join(existing)}); "
        "pass a new directory (e.g. gradguard.runlog.default_run_dir()) for a new run, "
        "or exist_ok=True to append to this one."
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
    return merged


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


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


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _step(item: Mapping[str, Any]) -> int | None:
    """A record's or event's ``step`` if it is an integer, else ``None``."""
    step = item.get("step")
    return step if _is_step(step) else None


def _at_or_after(item: Mapping[str, Any], step: int) -> bool:
    """Whether ``item`` has an integer ``step`` that is ``>= step``."""
    own = _step(item)
    return own is not None and own >= step


def _read_json_quiet(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


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
        notes.append(f"{META_FILE}: missing; run metadata is empty")
        return {}
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"{META_FILE}: cannot be read ({e}); run metadata is empty")
        return {}
    try:
        meta = json.loads(text)
        decoded = from_jsonable(meta) if isinstance(meta, dict) else meta
    except RecursionError:
        notes.append(f"{META_FILE}: nested too deeply to read; run metadata is empty")
        return {}
    except ValueError as e:
        notes.append(f"{META_FILE}: not valid JSON ({e}); run metadata is empty")
        return {}
    if not isinstance(decoded, dict):
        notes.append(f"{META_FILE}: a JSON {type(decoded).__name__}, not an object; run metadata is empty")
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
        GradGuardError: ``path`` does not exist, or holds no run directory.

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
