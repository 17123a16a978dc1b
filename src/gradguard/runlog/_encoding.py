"""How a value becomes a run log's JSON and back (standard library only).

Standard JSON only: non-finite floats are the strings ``"nan"``, ``"inf"`` and ``"-inf"``
(:func:`to_jsonable`), read back into floats everywhere but under :data:`TEXT_KEYS`
(:func:`from_jsonable`). Plain data takes the fast path, one C-encoder call a line (:func:`_line`);
anything else is converted, and a value that cannot be becomes its ``repr()``: logging never stops
a training run.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import operator
import os
from collections.abc import Callable, Mapping
from typing import Any

from gradguard.runlog._format import TEXT_KEYS

_NONFINITE_FROM_STR = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_MAX_REPR = 2000  # characters kept of an unencodable value's repr()


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


def _not_plain(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__qualname__} is not plain JSON data")


def _line_encoder() -> Callable[[Any], str]:
    """One-line strict JSON (``json.dumps(obj, allow_nan=False)``'s text), by one C encoder made
    once: ``json.dumps`` and ``JSONEncoder.encode`` make a new one on every call, which encodes
    every key again (a record's 16 keys: ~20 % of its line's cost). No cycle check: a cycle ends in
    a ``RecursionError``, which :func:`_dumps` catches like the other errors of the fast path."""
    make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
    if make is None:  # pragma: no cover - a Python without the _json module
        return json.JSONEncoder(allow_nan=False).encode
    chunks = make(
        None, _not_plain, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, False
    )
    return lambda obj: "".join(chunks(obj, 0))


_ENCODE_LINE = _line_encoder()


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
