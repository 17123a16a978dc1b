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


def is_foreign(path: Path) -> bool:
    """Whether ``path`` (a ``meta.json``) exists and is not gradguard's: a JSON object without
    ``schema_version`` and ``gradguard_version``, or text that does not name ``schema_version``."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    meta = _read_json_quiet(path)
    if isinstance(meta, dict):
        return "schema_version" not in meta and "gradguard_version" not in meta
    return '"schema_version"' not in text
