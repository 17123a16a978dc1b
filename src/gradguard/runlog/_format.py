"""The run directory's format: its files, the schema version, the keys whose values are text, and the
readings of a record's ``step`` that the writer and the reader share (standard library only)."""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
_MAX_LISTED = 3  # items (lost events, rewound steps) named one by one in a warning or a note


def _as_step(value: Any) -> int | None:
    """``value`` as a step number (ints and int-like scalars such as numpy's), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _step(item: Mapping[str, Any]) -> int | None:
    """A record's or event's ``step`` if it is an integer, else ``None``."""
    step = item.get("step")
    return step if _is_step(step) else None


def _read_json_quiet(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


REPORT_GENERATOR = '<meta name="generator" content="gradguard">'
"""The mark of gradguard's HTML report, in its ``<head>``: ``report -o`` and ``run --out`` replace such a
file freely and refuse any other (the user's own page)."""

_HEAD = 4096  # bytes read from the start of a file to tell whose it is


def _head(path: Path) -> bytes | None:
    """The first :data:`_HEAD` bytes of ``path``; ``None`` where it is missing or cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(_HEAD)
    except OSError:
        return None


def is_gradguard_report(path: Path) -> bool:
    """Whether ``path`` is an HTML report gradguard wrote: its head holds :data:`REPORT_GENERATOR`
    (or, written before that mark, the title ``gradguard report: ...``)."""
    head = _head(path)
    if head is None:
        return False
    return REPORT_GENERATOR.encode() in head or b"<title>gradguard report" in head.lower()


def _first_object(path: Path) -> Any:
    """The first line of a ``.jsonl`` file, parsed (``None`` for an empty file; ``...`` where the line is
    not JSON)."""
    head = _head(path)
    if not head or not head.strip():
        return None
    line = head.lstrip().split(b"\n", 1)[0]
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return ...


def _gradguard_lines(path: Path, key: str) -> bool | None:
    """Whether a ``.jsonl`` log reads as gradguard's (its first line an object with ``key``: ``step`` for
    metrics, ``type`` for events); ``None`` where it is missing or empty (nobody's)."""
    first = _first_object(path)
    if first is None:
        return None
    return isinstance(first, dict) and key in first


def _gradguard_logs_beside(run_dir: Path) -> bool:
    return bool(
        _gradguard_lines(run_dir / METRICS_FILE, "step") or _gradguard_lines(run_dir / EVENTS_FILE, "type")
    )


def is_foreign(path: Path) -> bool:
    """Whether ``path`` (a ``meta.json``) exists and is not gradguard's: a JSON object without
    ``schema_version`` and ``gradguard_version``, or text that does not name ``schema_version``.

    An empty (or blank) file, or one cut inside its opening ``{"schema_version"`` (gradguard writes that
    key first), is gradguard's damaged file, not another tool's; so is any unreadable text beside
    gradguard's own ``metrics.jsonl`` / ``events.jsonl`` lines."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    meta = _read_json_quiet(path)
    if isinstance(meta, dict):
        return "schema_version" not in meta and "gradguard_version" not in meta
    if '"schema_version"' in text:
        return False
    squeezed = "".join(text.split())
    if '{"schema_version"'.startswith(squeezed):  # empty, or cut in its first key
        return False
    return not _gradguard_logs_beside(path.parent)


def _gradguard_meta(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds gradguard's ``meta.json`` (whole, or a cut one that names its schema)."""
    path = run_dir / META_FILE
    return path.exists() and not is_foreign(path) and (_head(path) or b"").strip() != b""


def foreign_files(run_dir: Path) -> list[tuple[str, str]]:
    """The files of ``run_dir`` that gradguard would write (append to, replace) but did not write
    itself: ``(name, what it holds)`` each. ``meta.json``: see :func:`is_foreign`; ``metrics.jsonl`` /
    ``events.jsonl``: lines that are not gradguard's records / events (without a gradguard
    ``meta.json`` beside them); ``findings.json``: not a list of findings; ``report.html``: an HTML
    file without gradguard's mark (:func:`is_gradguard_report`). Empty files are nobody's."""
    found: list[tuple[str, str]] = []
    if is_foreign(run_dir / META_FILE):
        found.append((META_FILE, "no schema_version"))
    if not _gradguard_meta(run_dir):
        for name, key in ((METRICS_FILE, "step"), (EVENTS_FILE, "type")):
            if _gradguard_lines(run_dir / name, key) is False:
                found.append(
                    (
                        name,
                        f"its first line is not a gradguard {'record' if key == 'step' else 'event'} (no {key!r})",
                    )
                )
    findings = run_dir / FINDINGS_FILE
    if (_head(findings) or b"").strip():
        value = _read_json_quiet(findings)
        if not (
            isinstance(value, list)
            and all(isinstance(x, dict) and "id" in x and "severity" in x for x in value)
        ):
            found.append((FINDINGS_FILE, "not a list of gradguard findings"))
    report = run_dir / REPORT_FILE
    if (_head(report) or b"").strip() and not is_gradguard_report(report):
        found.append((REPORT_FILE, "a page gradguard did not write"))
    return found
