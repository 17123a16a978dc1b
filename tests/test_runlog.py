"""Tests of gradguard.runlog: format, writer, tolerant reader, durability under SIGKILL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import gradguard
from gradguard import runlog
from gradguard.errors import GradGuardError
from gradguard.runlog import (
    SCHEMA_VERSION,
    RunLog,
    RunWriter,
    _reader,
    atomic_write_json,
    atomic_write_text,
    check_run_dir,
    default_run_dir,
    find_runs,
    read_run,
)

SRC_DIR = str(Path(gradguard.__file__).resolve().parent)

# A child-process prelude that imports gradguard.runlog without running gradguard/__init__.py
# (which imports torch): a bare package object whose __path__ is the source folder.
CHILD_PRELUDE = f"""
import sys, types
_pkg = types.ModuleType("gradguard")
_pkg.__path__ = [{SRC_DIR!r}]
sys.modules["gradguard"] = _pkg
"""


def same(a: Any, b: Any) -> bool:
    """Equality where nan equals nan (and float types must match for non-finite values)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def strict_json_lines(path: Path) -> list[Any]:
    """Parse every line of a JSONL file refusing the non-standard NaN/Infinity tokens."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"non-standard JSON token {token} in {path.name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------


def test_round_trip_meta_metrics_events_with_nonfinite_values(tmp_path: Path) -> None:
    run = tmp_path / "run"
    meta = {"torch_version": "2.13.0", "world_size": 2, "guard": {"clip": "auto", "max_norm": math.inf}}
    metrics = [
        {
            "step": 0,
            "loss": 2.5,
            "grad_norm": math.inf,
            "clip_coef": 0.0,
            "skipped": True,
            "layers": {"enc.fc1": {"grad_norm": math.nan, "weight_norm": 1.5, "update_ratio": -math.inf}},
        },
        {"step": 1, "loss": math.nan, "grad_norm": 3.0, "hist": [1.0, math.nan, [math.inf, -math.inf]]},
    ]
    events = [
        {"type": "nonfinite", "step": 1, "kind": "nan", "op": "exp", "module": None, "value": math.nan},
        {"type": "spike", "step": 0, "grad_norm": math.inf},
    ]
    with RunWriter(run, meta) as w:
        w.write_metrics(metrics)
        w.write_event(events[0])
        w.write_events(events[1:])

    log = read_run(run)
    assert log.path == run
    assert log.skipped == []
    assert same(log.metrics, metrics)
    assert same(log.events, events)
    assert log.meta["schema_version"] == SCHEMA_VERSION == 1
    assert log.meta["gradguard_version"] == gradguard.__version__
    assert log.meta["argv"] == sys.argv
    assert log.meta["python"] == platform.python_version()
    started = dt.datetime.fromisoformat(log.meta["start_time"])
    assert started.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - started).total_seconds()) < 60
    assert same(log.meta["guard"], meta["guard"]) and log.meta["world_size"] == 2

    # the files themselves are standard JSON: no NaN / Infinity tokens anywhere
    raw = strict_json_lines(run / "metrics.jsonl")
    assert raw[0]["grad_norm"] == "inf" and raw[0]["layers"]["enc.fc1"]["update_ratio"] == "-inf"
    assert raw[1]["hist"] == [1.0, "nan", ["inf", "-inf"]]
    strict_json_lines(run / "events.jsonl")
    json.loads((run / "meta.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_text_fields_keep_their_nan_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A nonfinite event's `kind` is the *string* "nan" | "inf" | "-inf" (DESIGN.md), and argv is text.
    monkeypatch.setattr(sys, "argv", ["train.py", "--fill", "nan", "--clip", "inf"])
    with RunWriter(tmp_path / "r") as w:
        w.write_events(
            [{"type": "nonfinite", "step": 3, "kind": k, "value": float(k)} for k in ("nan", "inf", "-inf")]
        )
    log = read_run(tmp_path / "r")
    assert [e["kind"] for e in log.events] == ["nan", "inf", "-inf"]
    assert math.isnan(log.events[0]["value"]) and log.events[1]["value"] == math.inf
    assert log.meta["argv"] == ["train.py", "--fill", "nan", "--clip", "inf"]


def test_accessors(tmp_path: Path) -> None:
    with RunWriter(tmp_path / "r") as w:
        w.write_metrics(
            [
                {"step": 0, "loss": 1.0, "layers": {"fc": {"grad_norm": 0.5}}},
                {"step": 1, "loss": math.nan, "layers": {"fc": {"grad_norm": math.inf}}},
                {"step": 2, "lr": 0.1},  # no loss: left out of series("loss")
                {"loss": 9.0},  # no step: left out
            ]
        )
        w.write_metrics({"step": 3, "loss": None})  # a single dict is one record; None is left out
        w.write_events(
            [{"type": "skip", "step": 1}, {"type": "spike", "step": 1}, {"type": "skip", "step": 2}]
        )
    log = read_run(tmp_path / "r")
    assert same(log.series("loss"), [(0, 1.0), (1, math.nan)])
    assert log.series("lr") == [(2, 0.1)]
    assert log.layer_series("fc") == [(0, 0.5), (1, math.inf)]
    assert [e["step"] for e in log.events_of("skip")] == [1, 2]
    assert log.first_event("spike") == {"type": "spike", "step": 1}
    assert log.first_event("abort") is None
    assert "5 records" in repr(log) and "events=3" in repr(log)


# ------------------------------------------------------------------------------------------
# tolerant reader
# ------------------------------------------------------------------------------------------


def test_truncated_last_line_is_skipped_and_reported(tmp_path: Path) -> None:
    run = tmp_path / "r"
    with RunWriter(run) as w:
        w.write_metrics([{"step": i, "loss": 1.0} for i in range(3)])
        w.write_event({"type": "spike", "step": 1})
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": 0.12')  # the process died inside this write
    with open(run / "events.jsonl", "ab") as f:
        f.write(b'{"type": "nonfin')
    log = read_run(run)
    assert [r["step"] for r in log.metrics] == [0, 1, 2]
    assert log.events == [{"type": "spike", "step": 1}]
    assert log.skipped == [
        "metrics.jsonl: line 4 is cut off (the process stopped mid-write); skipped",
        "events.jsonl: line 2 is cut off (the process stopped mid-write); skipped",
    ]


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 0}\n{"step": 1}')
    log = read_run(run)
    assert [r["step"] for r in log.metrics] == [0, 1]
    assert log.skipped == [
        "meta.json: missing; run metadata is empty",
        "events.jsonl: missing; read as empty",
    ]


def test_corrupt_middle_lines_are_skipped_and_reported(tmp_path: Path) -> None:
    run = tmp_path / "r"
    with RunWriter(run):
        pass
    (run / "metrics.jsonl").write_bytes(
        b'{"step": 0}\n'
        b"\x00\x00\x00garbage\n"
        b"\n"  # blank lines are not worth a note
        b'{"step": 1}\n'
        b"[1, 2]\n"
        b'{"step": 2, "bad": \xff}\n'
        b'{"step": 3}\n'
    )
    log = read_run(run)
    assert [r["step"] for r in log.metrics] == [0, 1, 3]
    assert len(log.skipped) == 3
    assert log.skipped[0].startswith("metrics.jsonl: line 2 is not valid JSON (")
    assert log.skipped[1] == "metrics.jsonl: line 5 is a JSON list, not an object; skipped"
    assert log.skipped[2] == "metrics.jsonl: line 6 is not valid JSON (not UTF-8); skipped"


def test_many_bad_lines_are_summarised(tmp_path: Path) -> None:
    run = tmp_path / "r"
    with RunWriter(run):
        pass
    (run / "events.jsonl").write_text("oops\n" * 50 + '{"type": "skip"}\n')
    log = read_run(run)
    assert log.events == [{"type": "skip"}]
    assert len(log.skipped) == 21
    assert log.skipped[-1] == "events.jsonl: 30 more unreadable lines skipped"


def test_missing_or_broken_meta_is_reported(tmp_path: Path) -> None:
    run = tmp_path / "r"
    with RunWriter(run) as w:
        w.write_metrics([{"step": 0}])
    (run / "meta.json").unlink()
    log = read_run(run)
    assert log.meta == {} and log.metrics == [{"step": 0}]
    assert log.skipped == ["meta.json: missing; run metadata is empty"]

    (run / "meta.json").write_text('{"schema_version": 1, "start_')
    log = read_run(run)
    assert log.meta == {} and len(log.skipped) == 1
    assert log.skipped[0].startswith("meta.json: not valid JSON")

    (run / "meta.json").write_text('{"schema_version": 99}')
    assert "newer than this gradguard reads" in read_run(run).skipped[0]


# ------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------


def test_exist_ok_false_refuses_an_existing_run_log(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()  # an existing but empty folder is fine
    with RunWriter(run) as w:
        w.write_metrics([{"step": 0}])
    with pytest.raises(GradGuardError) as info:
        RunWriter(run, {"x": 1})
    message = str(info.value)
    assert str(run) in message and "metrics.jsonl" in message
    assert "new directory" in message and "exist_ok=True" in message
    assert read_run(run).metrics == [{"step": 0}]  # nothing was touched

    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(GradGuardError, match="is a file"):
        RunWriter(f)
    with pytest.raises(GradGuardError, match="must be a dict"):
        RunWriter(tmp_path / "r2", ["not", "a", "dict"])  # type: ignore[arg-type]


@pytest.mark.parametrize("exist_ok", [False, True])
def test_a_folder_with_another_tools_meta_json_is_refused_and_left_as_it_was(
    tmp_path: Path, exist_ok: bool
) -> None:
    """A data folder (its own meta.json) given as the log dir: the writer replaced the user's file."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "meta.json").write_text('{"dataset": "houses", "rows": 20640}\n')
    with pytest.raises(GradGuardError, match=r"not a gradguard run's meta\.json") as info:
        RunWriter(folder, exist_ok=exist_ok)
    assert "new directory" in str(info.value)
    with pytest.raises(GradGuardError, match=r"not a gradguard run's meta\.json"):
        check_run_dir(folder)  # gradguard run --out: before the script runs
    (folder / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')  # that tool's own log
    with pytest.raises(GradGuardError, match="not a gradguard run directory"):
        read_run(folder)  # gradguard diagnose / report: it read "No findings" and wrote findings.json there
    assert (folder / "meta.json").read_text() == '{"dataset": "houses", "rows": 20640}\n'
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "metrics.jsonl"]


def test_exist_ok_true_appends_and_keeps_first_start(tmp_path: Path) -> None:
    run = tmp_path / "r"
    with RunWriter(run, {"torch_version": "2.13.0", "start_time": "2025-01-01T00:00:00+00:00"}) as w:
        w.write_metrics([{"step": 0}])
        w.write_event({"type": "spike", "step": 0})
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 1, "lo')  # the first process was killed mid-line
    with RunWriter(run, {"resumed": True}, exist_ok=True) as w:
        w.write_metrics([{"step": 2}])
        w.write_event({"type": "skip", "step": 2})
    log = read_run(run)
    assert log.metrics == [{"step": 0}, {"step": 2}]  # the new record is not glued to the cut line
    assert [e["type"] for e in log.events] == ["spike", "skip"]
    assert len(log.skipped) == 1 and "line 2" in log.skipped[0]
    assert log.meta["start_time"] == "2025-01-01T00:00:00+00:00"
    assert log.meta["torch_version"] == "2.13.0" and log.meta["resumed"] is True
    assert len(log.meta["resumed_at"]) == 1


def test_events_are_fsynced_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "r"
    w = RunWriter(run)
    events_ino = os.stat(run / "events.jsonl").st_ino
    metrics_ino = os.stat(run / "metrics.jsonl").st_ino
    synced: list[tuple[str, int]] = []  # (file, its line count when fsync was called)
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        ino = os.fstat(fd).st_ino
        for name, file_ino in (("events", events_ino), ("metrics", metrics_ino)):
            if ino == file_ino:
                synced.append((name, len((run / f"{name}.jsonl").read_bytes().splitlines())))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    w.write_event({"type": "spike", "step": 1})
    assert synced == [("events", 1)]  # fsynced right away, after the line was written
    w.write_events([{"type": "skip", "step": i} for i in range(3)])
    assert synced == [("events", 1), ("events", 4)]  # one fsync for the batch
    w.write_events([])
    w.write_metrics([{"step": 0}, {"step": 1}])
    assert synced == [("events", 1), ("events", 4)]  # metrics: no fsync by default
    w.write_metrics([{"step": 2}], fsync=True)
    assert synced[-1] == ("metrics", 3)
    w.close()
    assert {s[0] for s in synced[-2:]} == {"events", "metrics"}  # close syncs both


def test_close_twice_and_write_after_close(tmp_path: Path) -> None:
    w = RunWriter(tmp_path / "r")
    assert not w.closed
    w.close()
    w.close()
    assert w.closed
    with pytest.raises(GradGuardError, match="closed"):
        w.write_metrics([{"step": 0}])
    with pytest.raises(GradGuardError, match="closed"):
        w.write_event({"type": "skip"})
    with RunWriter(tmp_path / "r2") as w2:
        pass
    assert w2.closed


def test_update_meta_merges_atomically(tmp_path: Path) -> None:
    run = tmp_path / "r"
    with RunWriter(run, {"world_size": 1}) as w:
        w.update_meta(end_time="2025-01-01T00:00:00+00:00", steps=10, schema_version=7)
        assert w.meta["steps"] == 10
    meta = read_run(run).meta
    assert meta["world_size"] == 1 and meta["steps"] == 10 and meta["schema_version"] == SCHEMA_VERSION
    assert sorted(p.name for p in run.iterdir()) == ["events.jsonl", "meta.json", "metrics.jsonl"]


@dataclasses.dataclass
class _Config:
    max_norm: float
    path: Path


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class _Floaty:
    def __float__(self) -> float:
        return math.inf


def test_unencodable_values_do_not_crash_the_writer(tmp_path: Path) -> None:
    cycle: list[Any] = [1]
    cycle.append(cycle)
    record: dict[Any, Any] = {
        "step": 0,
        "tuple": (1, 2.5, math.nan),
        "set": {3, 1, 2},
        "path": Path("a") / "b",
        "decimal": decimal.Decimal("1.5"),
        "floaty": _Floaty(),
        "complex": 1 + 2j,
        "when": dt.datetime(2025, 1, 2, 3, 4, 5),
        "config": _Config(max_norm=math.nan, path=Path("x")),
        "bad": _BadRepr(),
        "obj": object(),
        "cycle": cycle,
        "bytes": b"\x00\xff",
        (1, 2): "tuple key",
        7: "int key",
    }
    with RunWriter(tmp_path / "r", {"weird": _BadRepr()}) as w:
        w.write_metrics([record])
        w.write_event({"type": "skip", "payload": record})
    log = read_run(tmp_path / "r")
    assert log.skipped == []
    m = log.metrics[0]
    assert same(m["tuple"], [1, 2.5, math.nan])
    assert m["set"] == [1, 2, 3]
    assert m["path"] == os.fspath(Path("a") / "b")
    assert m["decimal"] == 1.5 and m["floaty"] == math.inf
    assert m["complex"] == "(1+2j)"
    assert m["when"] == "2025-01-02T03:04:05"
    assert same(m["config"], {"max_norm": math.nan, "path": "x"})
    assert m["bad"] == "<unrepresentable _BadRepr>"
    assert m["obj"].startswith("<object object at")
    assert m["cycle"] == [1, "<cycle list>"]
    assert m["bytes"] == repr(b"\x00\xff")
    assert m["(1, 2)"] == "tuple key" and m["7"] == "int key"
    assert log.events[0]["payload"]["set"] == [1, 2, 3]
    assert log.meta["weird"] == "<unrepresentable _BadRepr>"


def test_numpy_values_are_converted(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    with RunWriter(tmp_path / "r") as w:
        w.write_metrics(
            [
                {
                    "step": np.int64(4),
                    "loss": np.float32(0.5),
                    "nan": np.float64("nan"),
                    "inf": np.float32("inf"),
                    "flag": np.bool_(True),
                    "arr": np.array([1.0, np.nan, -np.inf]),
                }
            ]
        )
    m = read_run(tmp_path / "r").metrics[0]
    assert m["step"] == 4 and type(m["step"]) is int
    assert m["loss"] == 0.5 and math.isnan(m["nan"]) and m["inf"] == math.inf
    assert m["flag"] is True
    assert same(m["arr"], [1.0, math.nan, -math.inf])


# ------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------


def test_atomic_writes_leave_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "findings.json"
    atomic_write_json(target, [{"id": "over-clipping", "value": math.inf}])
    atomic_write_json(target, [{"id": "explosion", "value": math.nan}])
    atomic_write_text(tmp_path / "report.html", "<html></html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["findings.json", "report.html"]
    assert json.loads(target.read_text()) == [{"id": "explosion", "value": "nan"}]
    assert target.read_text().endswith("\n")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(target, "half")
    assert json.loads(target.read_text()) == [{"id": "explosion", "value": "nan"}]  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["findings.json", "report.html"]


# ------------------------------------------------------------------------------------------
# locating runs
# ------------------------------------------------------------------------------------------


def test_folder_of_runs_resolves_to_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "gradguard-runs"
    starts = {
        "b-middle": "2025-03-01T00:00:00+00:00",
        "a-newest": "2025-06-01T00:00:00Z",
        "c-oldest": "2024-12-31T23:00:00+00:00",
    }
    for name, start in starts.items():
        with RunWriter(root / name, {"start_time": start}) as w:
            w.write_metrics([{"step": 0, "name": name}])
    (root / "not-a-run").mkdir()
    (root / "stray.txt").write_text("x")
    assert [p.name for p in find_runs(root)] == ["a-newest", "b-middle", "c-oldest"]
    log = read_run(root)
    assert log.path == root / "a-newest" and log.metrics[0]["name"] == "a-newest"
    assert read_run(root / "c-oldest" / "metrics.jsonl").path == root / "c-oldest"  # a file of a run


def test_folder_of_runs_falls_back_to_mtime(tmp_path: Path) -> None:
    for name, mtime in (("x", 1_700_000_300), ("y", 1_700_000_100), ("z", 1_700_000_200)):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "name": name}) + "\n")
        os.utime(run, (mtime, mtime))
    assert [p.name for p in find_runs(tmp_path)] == ["x", "z", "y"]
    assert read_run(tmp_path).metrics[0]["name"] == "x"


def test_read_run_errors_name_the_path_and_what_was_expected(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(GradGuardError, match="does not exist") as info:
        read_run(missing)
    assert str(missing) in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GradGuardError) as info:
        read_run(empty)
    assert str(empty) in str(info.value) and "meta.json" in str(info.value)
    assert "folder of" in str(info.value)
    assert find_runs(missing) == []
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(GradGuardError, match="it is a file"):
        read_run(other)


# ------------------------------------------------------------------------------------------
# naming
# ------------------------------------------------------------------------------------------


def test_default_run_dir_naming_and_suffixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runlog, "_timestamp", lambda: "20250102-030405")
    first = default_run_dir("my model/v2 (fp16)!", tmp_path)
    assert first == tmp_path / "20250102-030405-my-model-v2-fp16"
    assert not first.exists()  # only a path unless create=True
    first.mkdir()
    assert default_run_dir("my model/v2 (fp16)!", tmp_path).name == "20250102-030405-my-model-v2-fp16-2"
    claimed = default_run_dir("my model/v2 (fp16)!", tmp_path, create=True)
    assert claimed.name.endswith("-fp16-2") and claimed.is_dir()
    assert default_run_dir("my model/v2 (fp16)!", tmp_path).name.endswith("-fp16-3")
    assert default_run_dir("../..", tmp_path).name == "20250102-030405-run"
    assert default_run_dir("a" * 200, tmp_path).name == "20250102-030405-" + "a" * 64
    assert default_run_dir().parent == Path("gradguard-runs")
    monkeypatch.undo()
    assert re.fullmatch(r"\d{8}-\d{6}-x\.y_z", default_run_dir("x.y_z", tmp_path).name)


# ------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------


def test_the_public_names_come_from_gradguard_runlog_each_defined_once_in_its_part() -> None:
    """``gradguard.runlog`` is a package of parts (the format, the encoding, the files, the writer,
    the reader); every public name is imported from the package as before, and each is one object
    defined in one part (no second copy)."""
    import importlib

    parts = ("_format", "_encoding", "_files", "_writer", "_reader")
    modules = [importlib.import_module(f"gradguard.runlog.{p}") for p in parts]
    for name in runlog.__all__:
        value = getattr(runlog, name)
        defined = [m.__name__ for m in modules if name in vars(m) and vars(m)[name] is value]
        assert defined or getattr(value, "__module__", None) == "gradguard.runlog", name
        if callable(value):
            assert value.__module__ in {"gradguard.runlog", *(m.__name__ for m in modules)}, name
    assert runlog.RunWriter.__module__ == "gradguard.runlog._writer"
    assert runlog.read_run.__module__ == runlog.RunLog.__module__ == "gradguard.runlog._reader"


def test_runlog_imports_the_standard_library_only() -> None:
    code = CHILD_PRELUDE + textwrap.dedent(
        """
        before = set(sys.modules)
        import gradguard.runlog
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        print(sorted(new - set(sys.stdlib_module_names) - {"gradguard"}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_mid_run_leaves_a_readable_log(tmp_path: Path) -> None:
    run = tmp_path / "killed"
    code = CHILD_PRELUDE + textwrap.dedent(
        """
        from gradguard.runlog import RunWriter
        layers = {f"block{j}.fc": {"grad_norm": 1.0 + j, "weight_norm": float("nan")} for j in range(40)}
        w = RunWriter(sys.argv[1], {"child": True})
        step = 0
        while True:
            w.write_metrics([{"step": step, "loss": float("inf") if step % 7 == 0 else 1.0, "layers": layers}])
            w.write_event({"type": "spike", "step": step, "kind": "inf"})
            print(step, flush=True)  # the marker: event `step` is on disk
            step += 1
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        last = -1
        while last < 40:
            line = proc.stdout.readline()
            if not line:  # the child died on its own
                pytest.fail(f"child stopped early: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}")
            last = int(line)
        proc.send_signal(signal.SIGKILL)  # the child is still writing: no clean close()
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        proc.kill()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()

    log = read_run(tmp_path)  # the folder of runs resolves to the killed run
    assert log.path == run and log.meta["child"] is True
    steps = [e["step"] for e in log.events]
    assert steps == list(range(len(steps))) and len(steps) > last  # every event before the kill
    assert all(e["kind"] == "inf" for e in log.events)
    metric_steps = [r["step"] for r in log.metrics]
    assert metric_steps == list(range(len(metric_steps))) and len(metric_steps) > last
    assert log.metrics[0]["loss"] == math.inf and math.isnan(
        log.metrics[0]["layers"]["block0.fc"]["weight_norm"]
    )
    # at most the very last line of each file may have been cut
    assert len(log.skipped) <= 2 and all("is cut off" in note for note in log.skipped)


def test_runlog_dataclass_defaults() -> None:
    log = RunLog(path=Path("x"))
    assert log.meta == {} and log.metrics == [] and log.events == [] and log.skipped == []
    assert log.series("loss") == [] and log.first_event("nonfinite") is None


# ------------------------------------------------------------------------------------------
# faults, lock, end marker and rewinds (the fault-matrix cases are in tests/test_faults.py)
# ------------------------------------------------------------------------------------------


def test_close_writes_end_time_once_and_keeps_the_callers(tmp_path: Path) -> None:
    with RunWriter(tmp_path / "a") as w:
        pass
    assert read_run(tmp_path / "a").closed and w.meta["end_time"]
    with RunWriter(tmp_path / "b") as w:
        w.update_meta(end_time="2025-01-01T00:00:00Z")
    assert read_run(tmp_path / "b").meta["end_time"] == "2025-01-01T00:00:00Z"
    assert "lost" not in read_run(tmp_path / "b").meta  # only written when something was lost
    assert not RunLog(path=Path("x")).closed
    assert RunLog(path=Path("x")).superseded == [] and RunLog(path=Path("x")).superseded_events == []


def test_a_failed_construction_leaves_the_holders_meta_alone(tmp_path: Path) -> None:
    if runlog.fcntl is None:
        pytest.skip("needs fcntl.flock")
    run = tmp_path / "r"
    holder = RunWriter(run, {"who": "holder"})
    before = (run / "meta.json").read_text()
    with pytest.raises(GradGuardError, match="in use"):
        RunWriter(run, {"who": "intruder"}, exist_ok=True)
    assert (run / "meta.json").read_text() == before
    holder.close()
    assert read_run(run).meta["who"] == "holder"


def test_resume_reads_the_last_logged_step_from_the_file_end(tmp_path: Path) -> None:
    run = tmp_path / "r"
    wide = {f"layer{j}": {"grad_norm": 1.0} for j in range(4000)}  # lines of ~100 KB: several chunks
    with RunWriter(run) as w:
        w.write_metrics([{"step": s, "layers": wide} for s in range(5)])
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "layers": {"lay')  # killed mid-line
    with RunWriter(run, exist_ok=True) as w:
        w.resume(3)
        w.write_metrics([{"step": 3}])
    resume = read_run(run).first_event("resume")
    assert resume is not None and resume["last_logged_step"] == 4
    assert isinstance(resume["metrics_offset"], int)
    with RunWriter(tmp_path / "empty") as w:
        w.resume(0)
    assert read_run(tmp_path / "empty").first_event("resume")["last_logged_step"] is None  # type: ignore[index]


def test_resume_refuses_a_bad_step(tmp_path: Path) -> None:
    with RunWriter(tmp_path / "r") as w:
        for bad in (-1, "5", 1.5, True, None):
            with pytest.raises(GradGuardError, match="integer step >= 0"):
                w.resume(bad)  # type: ignore[arg-type]
    with pytest.raises(GradGuardError, match="closed"):
        w.resume(1)


def test_rewinds_keep_records_without_a_step_and_apply_in_order(tmp_path: Path) -> None:
    run = tmp_path / "r"
    with RunWriter(run) as w:
        w.write_metrics([{"step": s} for s in range(10)])
        w.write_metrics({"note": "no step"})
        w.resume(8)
        w.write_metrics([{"step": s, "try": 2} for s in range(8, 12)])
        w.write_event({"type": "skip", "step": 0})
        w.resume(5)
        w.write_metrics([{"step": s, "try": 3} for s in range(5, 7)])
    log = read_run(run)
    assert [(r.get("step"), r.get("try")) for r in log.metrics] == [
        *[(s, None) for s in range(5)],
        (None, None),
        (5, 3),
        (6, 3),
    ]
    assert [r["step"] for r in log.superseded] == [8, 9, 5, 6, 7, 8, 9, 10, 11]
    assert [(e["type"], e["step"]) for e in log.events] == [("skip", 0), ("resume", 5)]
    assert [(e["type"], e["step"]) for e in log.superseded_events] == [("resume", 8)]
    assert len(log.skipped) == 2 and "resumed at step 8, 5" in log.skipped[0]


def test_reader_streams_and_reports_offsets_of_whole_lines(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    body = b'{"step": 0}\n\n{"step": 1}\n'
    (run / "metrics.jsonl").write_bytes(body)
    got = list(_reader._read_jsonl(run / "metrics.jsonl", []))
    assert got == [(0, {"step": 0}), (13, {"step": 1})]
    assert body[13:].startswith(b'{"step": 1}')


# ------------------------------------------------------------------------------------------
# Files of a run directory that gradguard did not write (field test N11, N12, K2)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exist_ok", [False, True])
def test_a_folder_holding_the_users_report_or_findings_is_refused_and_left_as_it_was(
    tmp_path: Path, exist_ok: bool
) -> None:
    """Field test N11: ``gradguard run --out .`` in a project holding a pytest-html ``report.html`` and a
    ``findings.json`` of its own replaced both silently (by gradguard's report and ``[]``)."""
    folder = tmp_path / "proj"
    folder.mkdir()
    page = "<!DOCTYPE html>\n<html><head><title>Test report</title></head><body>42 passed</body></html>\n"
    (folder / "report.html").write_text(page)
    (folder / "findings.json").write_text('{"audit": "ok"}\n')
    for refuse in (lambda: RunWriter(folder, exist_ok=exist_ok), lambda: check_run_dir(folder)):
        with pytest.raises(GradGuardError) as info:
            refuse()
        message = str(info.value)
        assert "report.html" in message and "findings.json" in message and "new directory" in message
    assert (folder / "report.html").read_text() == page and (
        folder / "findings.json"
    ).read_text() == '{"audit": "ok"}\n'
    assert sorted(p.name for p in folder.iterdir()) == ["findings.json", "report.html"]


def test_gradguards_own_report_and_findings_in_a_run_directory_are_not_foreign(tmp_path: Path) -> None:
    run = tmp_path / "r"
    with RunWriter(run) as w:
        w.write_metrics([{"step": 0, "loss": 1.0}])
    (run / "findings.json").write_text('[{"id": "explosion", "severity": "error", "step": 3}]\n')
    (run / "report.html").write_text(
        f"<!DOCTYPE html>\n<html><head>{runlog.REPORT_GENERATOR}</head></html>\n"
    )
    with RunWriter(run, exist_ok=True) as w:  # appends: nothing refused
        w.write_metrics([{"step": 1, "loss": 1.0}])
    (run / "findings.json").write_text("[]\n")
    check_run_dir(run)


@pytest.mark.parametrize("exist_ok", [False, True])
def test_another_loggers_metrics_jsonl_is_called_so_and_never_appended_to(
    tmp_path: Path, exist_ok: bool
) -> None:
    """Field test N12: a ``metrics.jsonl`` of another logger got "already holds a run log … or --exist-ok to
    append", and --exist-ok then appended gradguard's records into that tool's file."""
    folder = tmp_path / "proj"
    folder.mkdir()
    lines = '{"epoch": 1, "acc": 0.9}\n{"epoch": 2, "acc": 0.93}\n'
    (folder / "metrics.jsonl").write_text(lines)
    for refuse in (lambda: RunWriter(folder, exist_ok=exist_ok), lambda: check_run_dir(folder)):
        with pytest.raises(GradGuardError) as info:
            refuse()
        message = str(info.value)
        assert "not a gradguard run's metrics.jsonl" in message and "another tool's" in message
        assert "exist" not in message.lower()  # no --exist-ok / exist_ok hint: it would mix the two logs
    assert (folder / "metrics.jsonl").read_text() == lines and not (folder / "meta.json").exists()


@pytest.mark.parametrize("text", ["", "\n", "{", '{\n  "sch'])
def test_an_empty_or_cut_meta_json_beside_gradguards_log_is_gradguards_damaged_file(
    tmp_path: Path, text: str
) -> None:
    """Field test K2: a meta.json of 0 or 1 bytes was "another tool's (no schema_version)": diagnose refused
    the run (exit 2) though its metrics.jsonl and events.jsonl were gradguard's."""
    run = tmp_path / "r"
    with RunWriter(run) as w:
        w.write_metrics([{"step": s, "loss": 1.0, "grad_norm": 1.0} for s in range(3)])
        w.write_event({"type": "spike", "step": 1})
    (run / "meta.json").write_text(text)
    log = read_run(run)  # read, with the damage said
    assert [r["step"] for r in log.metrics] == [0, 1, 2] and log.meta == {}
    check_run_dir(run)
    with RunWriter(run, exist_ok=True) as w:  # appended to: a fresh meta.json
        w.write_metrics([{"step": 3, "loss": 1.0, "grad_norm": 1.0}])
    assert read_run(run).meta["schema_version"] == SCHEMA_VERSION
    other = tmp_path / "other"  # text of another tool, with no gradguard log beside it, stays another tool's
    other.mkdir()
    (other / "meta.json").write_text("name: houses\n")
    with pytest.raises(GradGuardError, match="not a gradguard run's meta"):
        check_run_dir(other)


@pytest.mark.skipif(runlog.fcntl is None, reason="needs fcntl.flock (POSIX)")
def test_in_use_says_whether_a_live_writer_holds_the_run(tmp_path: Path) -> None:
    run = tmp_path / "r"
    w = RunWriter(run)
    assert runlog.in_use(run)
    w.close()
    assert not runlog.in_use(run) and not runlog.in_use(tmp_path / "missing")
