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

Where it lives (one module a responsibility; import the names from ``gradguard.runlog``):
``_format`` (the files, ``SCHEMA_VERSION``, ``TEXT_KEYS``, a record's ``step``), ``_encoding``
(:func:`to_jsonable`, :func:`from_jsonable`, the fast one-line encoder), ``_files`` (atomic
whole-file writes, the append-only line file and its lock), ``_writer`` (:class:`RunWriter`,
``meta.json``'s start and end), ``_reader`` (:func:`read_run`, :class:`RunLog`, :func:`find_runs`);
naming a new run directory (:func:`default_run_dir`) is here.

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

import os
import re
import time
from pathlib import Path

from gradguard.runlog._encoding import from_jsonable, to_jsonable
from gradguard.runlog._files import atomic_write_json, atomic_write_text
from gradguard.runlog._files import fcntl as fcntl  # the lock's module, None where there is none
from gradguard.runlog._format import (
    EVENTS_FILE,
    FINDINGS_FILE,
    META_FILE,
    METRICS_FILE,
    REPORT_FILE,
    REPORT_GENERATOR,
    SCHEMA_VERSION,
    TEXT_KEYS,
    is_gradguard_report,
)
from gradguard.runlog._reader import RunLog, find_runs, is_run_dir, read_run
from gradguard.runlog._writer import RunLogWarning, RunWriter, check_run_dir, in_use, refuse_existing

__all__ = [
    "EVENTS_FILE",
    "FINDINGS_FILE",
    "META_FILE",
    "METRICS_FILE",
    "REPORT_FILE",
    "REPORT_GENERATOR",
    "SCHEMA_VERSION",
    "TEXT_KEYS",
    "RunLog",
    "RunLogWarning",
    "RunWriter",
    "atomic_write_json",
    "atomic_write_text",
    "check_run_dir",
    "default_run_dir",
    "find_runs",
    "from_jsonable",
    "in_use",
    "is_gradguard_report",
    "is_run_dir",
    "read_run",
    "refuse_existing",
    "to_jsonable",
]

_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 64


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
