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
``fsync``, ``os.replace``), so a reader sees the old file or the new one, never half of one.

Encoding: standard JSON only. ``float('nan')``, ``inf`` and ``-inf`` are written as the strings
``"nan"``, ``"inf"`` and ``"-inf"`` (anywhere in nested dicts and lists) and the reader turns
exactly those strings back into floats, except under the keys of :data:`TEXT_KEYS` (``kind``,
``type``, ``argv``, ...), whose values are text by contract: a ``nonfinite`` event's
``"kind": "nan"`` stays the string ``"nan"``. Values JSON does not know (numpy and torch scalars or
arrays, tuples, sets, :class:`pathlib.Path`, dataclasses, datetimes, anything with
``__float__``) are converted; a value that cannot be converted becomes its ``repr()`` string,
so logging never stops a training run.

The reader (:func:`read_run`) loads everything up to the last complete line, skips what it cannot
parse and says what it skipped in :attr:`RunLog.skipped`.

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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gradguard._version import __version__
from gradguard.errors import GradGuardError

__all__ = [
    "EVENTS_FILE",
    "FINDINGS_FILE",
    "META_FILE",
    "METRICS_FILE",
    "REPORT_FILE",
    "SCHEMA_VERSION",
    "TEXT_KEYS",
    "RunLog",
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


def _dumps(obj: Any, indent: int | None = None) -> str:
    """Standard JSON text of ``obj`` (see :func:`to_jsonable`); never raises."""
    try:  # fast path: plain data, all floats finite (the C encoder)
        return json.dumps(obj, allow_nan=False, indent=indent)
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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically: readers see the old file or the new one.

    Writes a temporary file in the same folder, flushes and ``fsync``-s it, renames it over
    ``path`` with :func:`os.replace`, then ``fsync``-s the folder where the OS allows it. On an
    error the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the file to write; its folder must exist.
        text: the whole new content.

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
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as standard JSON to ``path`` atomically (see :func:`atomic_write_text`).

    Non-finite floats become ``"nan"``/``"inf"``/``"-inf"`` and other values are converted as by
    :func:`to_jsonable`, so this never fails on the data.

    Args:
        path: the file to write; its folder must exist.
        obj: the value to write.
        indent: JSON indentation (``None`` for one line).
    """
    atomic_write_text(path, _dumps(obj, indent=indent) + "\n")


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


def _utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _open_append(path: Path) -> io.FileIO:
    """Open ``path`` for appending, unbuffered; if it ends mid-line (a killed writer), end that line.

    The cut line then stays a line of its own that the reader skips, instead of swallowing the
    first new record.
    """
    f = io.FileIO(path, "ab")
    try:
        size = os.fstat(f.fileno()).st_size
        if size:
            with open(path, "rb") as r:
                r.seek(size - 1)
                if r.read(1) != b"\n":
                    _write_all(f, b"\n")
    except BaseException:
        f.close()
        raise
    return f


def _write_all(f: io.FileIO, data: bytes) -> None:
    """One ``write`` call (repeated only for the rest of a short write, which regular files rarely do)."""
    view = memoryview(data)
    while view:
        written = f.write(view)
        if written is None:  # pragma: no cover - only for non-blocking files
            continue
        view = view[written:]


class RunWriter:
    """Append-only writer of one run directory: ``meta.json``, ``metrics.jsonl``, ``events.jsonl``.

    Creates the directory (and its parents) and writes ``meta.json`` atomically with
    ``schema_version``, ``gradguard_version``, ``start_time`` (ISO 8601, UTC), ``argv``,
    ``python`` and every key of ``meta`` (the caller's keys win, except ``schema_version``).

    Every write to a ``.jsonl`` file is one ``write`` call that ends with a newline, on a file
    opened in append mode, so a crash can only cut the last line. Methods are thread-safe.

    Args:
        run_dir: the run directory (see :func:`default_run_dir`).
        meta: extra metadata, e.g. torch version, world size, module tree, guard configuration.
        exist_ok: append to a directory that already holds a run log. ``meta.json`` is then
            merged: the first ``start_time`` is kept and this start is added to ``resumed_at``.

    Raises:
        GradGuardError: ``run_dir`` already holds ``metrics.jsonl`` or ``events.jsonl`` and
            ``exist_ok`` is false, or ``run_dir`` is a file.

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
        self._metrics: io.FileIO | None = None
        self._events: io.FileIO | None = None
        self._closed = False
        self.path = Path(run_dir)
        if self.path.exists() and not self.path.is_dir():
            raise GradGuardError(
                f"run directory {str(self.path)!r} is a file, not a directory; "
                "pass a directory path (it is created if missing)."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        existing = [n for n in (METRICS_FILE, EVENTS_FILE) if (self.path / n).exists()]
        if existing and not exist_ok:
            raise GradGuardError(
                f"run directory {str(self.path)!r} already holds a run log ({', '.join(existing)}); "
                "pass a new directory (e.g. gradguard.runlog.default_run_dir()) for a new run, "
                "or exist_ok=True to append to this one."
            )

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
        merged = fresh
        if existing:
            old = _read_json_quiet(self.path / META_FILE)
            if isinstance(old, dict):
                merged = {**old, **fresh}
                merged["start_time"] = old.get("start_time", fresh["start_time"])
                resumed = old.get("resumed_at")
                merged["resumed_at"] = [*(resumed if isinstance(resumed, list) else []), now]
        self._meta: dict[str, Any] = merged
        atomic_write_json(self.path / META_FILE, self._meta)
        try:
            self._metrics = _open_append(self.path / METRICS_FILE)
            self._events = _open_append(self.path / EVENTS_FILE)
        except BaseException:
            self.close()
            raise
        _fsync_dir(self.path)

    # -- properties -----------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the metadata as last written to ``meta.json``."""
        return dict(self._meta)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- writing --------------------------------------------------------------------------

    def _file(self, f: io.FileIO | None, what: str) -> io.FileIO:
        if self._closed or f is None:
            raise GradGuardError(
                f"cannot write {what} to run directory {str(self.path)!r}: the RunWriter is closed; "
                "write before close() or open a new RunWriter(..., exist_ok=True)."
            )
        return f

    def write_metrics(
        self, records: Iterable[Mapping[str, Any]] | Mapping[str, Any], *, fsync: bool = False
    ) -> None:
        """Append records to ``metrics.jsonl``, one JSON object per line, in one write call.

        Args:
            records: step records (``step``, ``loss``, ``grad_norm``, ``layers``, ...). A single
                dict is taken as one record.
            fsync: also ``os.fsync`` the file (the data is always handed to the OS at once).
        """
        if isinstance(records, Mapping):
            records = [records]
        data = "".join(_line(r) for r in records).encode("utf-8")
        with self._lock:
            f = self._file(self._metrics, "metrics")
            if data:
                _write_all(f, data)
            if fsync:
                os.fsync(f.fileno())

    def write_event(self, event: Mapping[str, Any]) -> None:
        """Append one event to ``events.jsonl`` and ``os.fsync`` it before returning.

        Args:
            event: the event, with a ``type`` (``nonfinite``, ``spike``, ``skip``, ...).
        """
        self.write_events([event])

    def write_events(self, events: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> None:
        """Append several events to ``events.jsonl`` in one write call, then one ``os.fsync``.

        Args:
            events: the events; a single dict is taken as one event.
        """
        if isinstance(events, Mapping):
            events = [events]
        data = "".join(_line(e) for e in events).encode("utf-8")
        with self._lock:
            f = self._file(self._events, "events")
            if data:
                _write_all(f, data)
                os.fsync(f.fileno())

    def update_meta(self, **fields: Any) -> None:
        """Merge ``fields`` into the metadata and rewrite ``meta.json`` atomically.

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
            atomic_write_json(self.path / META_FILE, self._meta)

    def close(self) -> None:
        """``fsync`` and close the log files. Safe to call more than once."""
        with self._lock:
            self._closed = True
            files = [f for f in (self._metrics, self._events) if f is not None]
            self._metrics = self._events = None
        for f in files:
            try:
                if not f.closed:
                    os.fsync(f.fileno())
            except OSError:
                pass
            finally:
                f.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"RunWriter({str(self.path)!r}, {state})"


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunLog:
    """A run directory as read by :func:`read_run`.

    Attributes:
        path: the run directory.
        meta: the contents of ``meta.json`` (empty if missing or unreadable).
        metrics: the step records of ``metrics.jsonl``, in file order.
        events: the events of ``events.jsonl``, in file order.
        skipped: human-readable notes on what the reader skipped or could not read.
    """

    path: Path
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

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
        names = self.meta.get("layers")
        order: list[str] = [str(n) for n in names] if isinstance(names, list) else []
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
        """
        return [
            (r["step"], r[key]) for r in self.metrics if _is_step(r.get("step")) and r.get(key) is not None
        ]

    def layer_series(self, layer: str, key: str = "grad_norm") -> list[tuple[int, Any]]:
        """``(step, value)`` of ``layers[layer][key]`` (e.g. a layer's ``grad_norm``), in file order."""
        out: list[tuple[int, Any]] = []
        for r in self.metrics:
            layers = r.get("layers")
            entry = layers.get(layer) if isinstance(layers, dict) else None
            if isinstance(entry, dict) and _is_step(r.get("step")) and entry.get(key) is not None:
                out.append((r["step"], entry[key]))
        return out

    def __repr__(self) -> str:
        return (
            f"RunLog(path={str(self.path)!r}, metrics={len(self.metrics)} records, "
            f"events={len(self.events)}, skipped={len(self.skipped)} notes)"
        )


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json_quiet(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _needs_decode(text: str) -> bool:
    return '"nan"' in text or 'inf"' in text


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """Every complete JSON-object line of ``path``; what is skipped goes to ``notes``."""
    name = path.name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        notes.append(f"{name}: missing; read as empty")
        return []
    except OSError as e:
        notes.append(f"{name}: cannot be read ({e.strerror or e}); read as empty")
        return []
    records: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    tail = lines.pop()  # the text after the last newline: b"" unless the last line was cut
    problems = 0

    def note(message: str) -> None:
        nonlocal problems
        problems += 1
        if problems <= _MAX_NOTES_PER_FILE:
            notes.append(message)

    for number, raw in enumerate([*lines, tail], start=1):
        is_tail = number == len(lines) + 1
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            obj = json.loads(text)
        except (UnicodeDecodeError, ValueError) as e:
            if is_tail:
                note(f"{name}: line {number} is cut off (the process stopped mid-write); skipped")
            else:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                note(f"{name}: line {number} is not valid JSON ({reason}); skipped")
            continue
        if not isinstance(obj, dict):
            note(f"{name}: line {number} is a JSON {type(obj).__name__}, not an object; skipped")
            continue
        records.append(from_jsonable(obj) if _needs_decode(text) else obj)
    if problems > _MAX_NOTES_PER_FILE:
        notes.append(f"{name}: {problems - _MAX_NOTES_PER_FILE} more unreadable lines skipped")
    return records


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
    except ValueError as e:
        notes.append(f"{META_FILE}: not valid JSON ({e}); run metadata is empty")
        return {}
    if not isinstance(meta, dict):
        notes.append(f"{META_FILE}: a JSON {type(meta).__name__}, not an object; run metadata is empty")
        return {}
    version = meta.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        notes.append(
            f"{META_FILE}: schema_version {version} is newer than this gradguard reads "
            f"({SCHEMA_VERSION}); read anyway, unknown fields kept as they are"
        )
    decoded: dict[str, Any] = from_jsonable(meta)
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


def read_run(path: str | os.PathLike[str]) -> RunLog:
    """Read a run directory, or the newest run in a folder of runs, tolerating damage.

    Everything up to the last complete line is loaded; a line cut off by a killed process, a
    malformed line, a missing or broken ``meta.json`` are skipped and described in
    :attr:`RunLog.skipped`. Only a path with no run at all is an error.

    Args:
        path: a run directory (holding meta.json, metrics.jsonl or events.jsonl), one of those
            files, or a folder whose subfolders are run directories (the newest is read).

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
    metrics = _read_jsonl(p / METRICS_FILE, notes)
    events = _read_jsonl(p / EVENTS_FILE, notes)
    return RunLog(path=p, meta=meta, metrics=metrics, events=events, skipped=notes)
