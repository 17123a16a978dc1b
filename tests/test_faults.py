"""The fault matrix of issue 14: one test per case, grouped by the issue's sections.

Each test is named after its case. What gradguard promises for each case is in the README's fault
matrix. Sections:

* Poisoned training state (silent)
* Lost or corrupted logs — storage faults, one writer per run directory, rewinds, unclosed runs
* Crashes on what the tool reads or prints
* Bad input without a clear error
* Drop-in parity with ``torch.nn.utils``

The run-log cases exercise :mod:`gradguard.runlog` directly (no torch needed) and, where the case
is about training, through a :class:`gradguard.Guard`.
"""

from __future__ import annotations

import dataclasses
import errno
import html
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gradguard
from gradguard import runlog
from gradguard.diagnose import diagnose
from gradguard.errors import GradGuardError
from gradguard.runlog import RunLogWarning, RunWriter, default_run_dir, read_run

SRC_DIR = str(Path(gradguard.__file__).resolve().parent)

# A child-process prelude that imports gradguard.runlog without torch (see tests/test_runlog.py).
CHILD_PRELUDE = f"""
import sys, types
_pkg = types.ModuleType("gradguard")
_pkg.__path__ = [{SRC_DIR!r}]
sys.modules["gradguard"] = _pkg
"""

needs_flock = pytest.mark.skipif(runlog.fcntl is None, reason="needs fcntl.flock (POSIX)")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


class FullDisk:
    """A file system that fills up: writes to files of ``run`` store at most ``room`` more bytes
    (a short write), then fail with ``ENOSPC``, until :meth:`free`. Other files are untouched.

    ``truncate_fails`` also makes ``os.ftruncate`` fail there (the writer must then end the cut
    line instead of removing it).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, run: Path, *, code: int = errno.ENOSPC) -> None:
        self.run, self.code = run, code
        self.room: int | None = None  # None: not full
        self.truncate_fails = False
        self.real_write, self.real_truncate = os.write, os.ftruncate
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "ftruncate", self.ftruncate)

    def fill(self, room: int = 0) -> None:
        self.room = room

    def free(self) -> None:
        self.room, self.truncate_fails = None, False

    def _ours(self, fd: int) -> bool:
        try:
            ino = os.fstat(fd).st_ino
            return any(e.inode() == ino for e in os.scandir(self.run))
        except OSError:
            return False

    def write(self, fd: int, data: Any) -> int:
        if self.room is None or not self._ours(fd):
            return self.real_write(fd, data)
        if self.room == 0:
            raise OSError(self.code, os.strerror(self.code))
        n = self.real_write(fd, bytes(data)[: self.room])
        self.room -= n
        return n

    def ftruncate(self, fd: int, length: int) -> None:
        if self.truncate_fails and self._ours(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.real_truncate(fd, length)


def records(steps: range) -> list[dict[str, Any]]:
    return [{"step": s, "loss": 1.0 / (s + 1), "grad_norm": 2.0 + s} for s in steps]


def strict_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file parsed: fails on any garbage line."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def steps_of(log: runlog.RunLog) -> list[int]:
    return [r["step"] for r in log.metrics]


def one_warning(caught: list[warnings.WarningMessage]) -> str:
    ours = [w for w in caught if issubclass(w.category, RunLogWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    return str(ours[0].message)


@pytest.fixture
def caught() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        yield got


def hold_in_child(run: Path, exist_ok: bool = False) -> subprocess.Popen[str]:
    """A child process that opens a RunWriter on ``run`` and keeps it open until killed."""
    code = CHILD_PRELUDE + textwrap.dedent(
        f"""
        from gradguard.runlog import RunWriter
        w = RunWriter(sys.argv[1], {{"child": True}}, exist_ok={exist_ok})
        w.write_metrics([{{"step": 0}}])
        print("ready", flush=True)
        sys.stdin.read()  # hold until killed
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=30)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


# ------------------------------------------------------------------------------------------
# Poisoned training state (silent)
# ------------------------------------------------------------------------------------------

# (cases added by the GUARD part)


# ------------------------------------------------------------------------------------------
# Lost or corrupted logs: a full disk
# ------------------------------------------------------------------------------------------


def test_full_disk_warns_once_naming_the_path_the_error_and_what_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caught: list[warnings.WarningMessage]
) -> None:
    run = tmp_path / "run"
    w = RunWriter(run)
    disk = FullDisk(monkeypatch, run)
    w.write_metrics(records(range(10)))
    disk.fill(room=30)  # the next write stores 30 bytes of its first line, then ENOSPC
    w.write_metrics(records(range(10, 12)))  # does not raise
    w.write_metrics(records(range(12, 14)))  # still full: no second warning
    w.write_event({"type": "spike", "step": 13})
    message = one_warning(caught)
    assert str(run / "metrics.jsonl") in message
    assert "No space left on device (ENOSPC)" in message
    assert "2 step records (steps 10–11)" in message and "Free space" in message
    assert w.lost == {"records": 4, "events": 1}
    disk.free()
    w.close()


def test_full_disk_then_freed_leaves_no_garbage_line_and_no_shifted_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caught: list[warnings.WarningMessage]
) -> None:
    run = tmp_path / "run"
    w = RunWriter(run)
    disk = FullDisk(monkeypatch, run)
    w.write_metrics(records(range(10)))
    disk.fill(room=30)
    w.write_metrics(records(range(10, 12)))  # cut mid-line: removed at once
    disk.free()
    w.write_metrics(records(range(12, 20)))
    w.write_event({"type": "skip", "step": 19})
    w.close()
    assert [r["step"] for r in strict_lines(run / "metrics.jsonl")] == [*range(10), *range(12, 20)]
    log = read_run(run)
    assert log.skipped == []
    assert steps_of(log) == [*range(10), *range(12, 20)]
    assert [r["loss"] for r in log.metrics] == [1.0 / (s + 1) for s in steps_of(log)]
    assert log.events == [{"type": "skip", "step": 19}]
    assert log.meta["lost"] == {"records": 2, "events": 0}
    one_warning(caught)


def test_full_disk_when_the_cut_line_cannot_be_removed_it_stays_a_line_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caught: list[warnings.WarningMessage]
) -> None:
    run = tmp_path / "run"
    w = RunWriter(run)
    disk = FullDisk(monkeypatch, run)
    w.write_metrics(records(range(5)))
    disk.fill(room=30)
    disk.truncate_fails = True
    w.write_metrics(records(range(5, 7)))
    disk.room = None  # space again, but truncating still fails: the cut line gets its newline
    w.write_metrics(records(range(7, 10)))
    disk.free()
    w.close()
    log = read_run(run)
    assert steps_of(log) == [*range(5), *range(7, 10)]  # nothing glued, nothing shifted
    assert len(log.skipped) == 1 and "line 6 is not valid JSON" in log.skipped[0]
    one_warning(caught)


def test_full_disk_close_never_raises_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caught: list[warnings.WarningMessage]
) -> None:
    run = tmp_path / "run"
    w = RunWriter(run)
    w.write_metrics(records(range(3)))
    disk = FullDisk(monkeypatch, run)
    disk.fill()
    w.update_meta(steps=3)  # meta.json cannot be rewritten: a warning, no raise
    w.close()  # end_time cannot be written either: no raise
    disk.free()
    assert w.closed
    assert sorted(p.name for p in run.iterdir()) == ["events.jsonl", "meta.json", "metrics.jsonl"]
    log = read_run(run)
    assert steps_of(log) == [0, 1, 2] and "steps" not in log.meta
    message = one_warning(caught)
    assert str(run / "meta.json") in message and "steps" in message


def test_full_disk_guard_step_does_not_raise_and_the_step_counter_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caught: list[warnings.WarningMessage]
) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = tmp_path / "run"
    guard = gradguard.Guard(model, opt, log_dir=run, every=5)
    disk = FullDisk(monkeypatch, run)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for step in range(30):
        if step == 10:
            disk.fill(room=40)
        if step == 20:
            disk.free()
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        guard.step(loss)
        assert guard.step_count == step + 1
    guard.close()
    log = read_run(run)
    assert steps_of(log) == [*range(10), *range(20, 30)]  # whole lines, steps not shifted
    assert log.closed
    message = one_warning(caught)
    assert str(run / "metrics.jsonl") in message and "ENOSPC" in message


def test_io_error_and_read_only_file_system_warn_with_their_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caught: list[warnings.WarningMessage]
) -> None:
    run = tmp_path / "ro"
    w = RunWriter(run)
    disk = FullDisk(monkeypatch, run, code=errno.EROFS)
    disk.fill()
    w.write_event({"type": "nonfinite", "step": 4, "kind": "nan"})
    disk.free()
    w.write_event({"type": "skip", "step": 5})
    w.close()
    message = one_warning(caught)
    assert "EROFS" in message and "writable" in message and "nonfinite at step 4" in message
    assert read_run(run).events == [{"type": "skip", "step": 5}]


def test_failed_fsync_warns_and_does_not_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caught: list[warnings.WarningMessage]
) -> None:
    run = tmp_path / "run"
    w = RunWriter(run)

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken_fsync)
    w.write_event({"type": "skip", "step": 0})
    w.write_metrics(records(range(2)), fsync=True)
    w.close()
    monkeypatch.undo()
    message = one_warning(caught)
    assert "EIO" in message and "may not be on disk" in message
    assert steps_of(read_run(run)) == [0, 1]


# ------------------------------------------------------------------------------------------
# Lost or corrupted logs: the run directory deleted mid-run
# ------------------------------------------------------------------------------------------


def test_run_dir_deleted_mid_run_warns_once_and_never_raises(
    tmp_path: Path, caught: list[warnings.WarningMessage]
) -> None:
    run = tmp_path / "run"
    w = RunWriter(run)
    w.write_metrics(records(range(3)))
    shutil.rmtree(run)
    w.write_metrics(records(range(3, 6)))
    w.write_event({"type": "nonfinite", "step": 5, "kind": "nan"})
    w.resume(2)
    w.update_meta(steps=6)
    w.close()
    w.close()
    assert not run.exists()  # not re-created behind the user's back
    message = one_warning(caught)
    assert str(run / "metrics.jsonl") in message and "deleted" in message
    assert "3 step records (steps 3–5)" in message
    assert w.lost == {"records": 3, "events": 2}


def test_run_dir_deleted_mid_run_under_a_guard(tmp_path: Path, caught: list[warnings.WarningMessage]) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = tmp_path / "run"
    guard = gradguard.Guard(model, opt, log_dir=run, every=2)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for step in range(8):
        if step == 4:
            shutil.rmtree(run)
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        guard.step(loss)
    guard.close()  # no FileNotFoundError on a temp file
    assert guard.step_count == 8 and not run.exists()
    assert "deleted" in one_warning(caught)


# ------------------------------------------------------------------------------------------
# Lost or corrupted logs: a run that was never closed
# ------------------------------------------------------------------------------------------


def test_run_never_closed_is_reported_by_the_reader(tmp_path: Path) -> None:
    left_open = RunWriter(tmp_path / "open")
    left_open.write_metrics(records(range(3)))
    assert not read_run(tmp_path / "open").closed  # diagnose turns this into a finding
    with RunWriter(tmp_path / "closed") as w:
        w.write_metrics(records(range(3)))
    assert read_run(tmp_path / "closed").closed
    with RunWriter(tmp_path / "closed", exist_ok=True) as again:
        assert not read_run(tmp_path / "closed").closed  # open again: the old end_time is gone
        again.write_metrics(records(range(3, 5)))
    assert read_run(tmp_path / "closed").closed
    left_open.close()


# ------------------------------------------------------------------------------------------
# Lost or corrupted logs: not closed — what diagnose says of a run not closed, or of lost records
# ------------------------------------------------------------------------------------------

DAY = 86_400.0


def age(run: Path, seconds: float) -> None:
    """Make the run's files look last written ``seconds`` ago."""
    then = time.time() - seconds
    for name in ("meta.json", "metrics.jsonl", "events.jsonl"):
        if (run / name).exists():
            os.utime(run / name, (then, then))


def incomplete(run: Path) -> Any:
    """The ``incomplete_log`` finding of ``run``, or ``None``."""
    from gradguard.diagnose import diagnose

    found = [f for f in diagnose(run) if f.id == "incomplete_log"]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_not_closed_a_killed_run_is_an_info_finding(tmp_path: Path) -> None:
    run = tmp_path / "run"
    stop(hold_in_child(run))  # SIGKILL: close() never ran
    age(run, 2 * DAY)
    finding = incomplete(run)
    assert finding is not None and finding.severity == "info" and finding.step == 0
    assert "was not closed" in finding.message and "killed" in finding.message
    assert "last written 2 days ago" in finding.message and "may be missing" in finding.message
    assert finding.evidence["closed"] is False and finding.evidence["maybe_still_running"] is False
    assert "close()" in finding.recommendation["text"]


def test_not_closed_a_run_still_being_written_is_not_called_killed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    writer = RunWriter(run, {"config": {"every": 10}})
    try:
        writer.write_metrics(records(range(30)))
        finding = incomplete(run)  # read while the writer is live
        assert finding is not None and finding.severity == "info" and finding.step == 29
        assert "may still be running" in finding.message and "killed" not in finding.message
        assert "after step 29 (up to 9 steps)" in finding.message
        assert finding.evidence["maybe_still_running"] is True and finding.evidence["flush_every"] == 10
    finally:
        writer.close()
    assert incomplete(run) is None  # closed: nothing missing


def test_not_closed_is_said_in_the_terminal_summary_and_is_not_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradguard.cli import main

    run = tmp_path / "run"
    stop(hold_in_child(run))
    age(run, DAY)
    assert main(["diagnose", str(run), "--no-write"]) == 0  # info: the exit code stays 0
    out = capsys.readouterr().out
    assert "incomplete_log" in out and "was not closed" in out


def test_not_closed_records_lost_to_a_full_disk_are_a_warning_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caught: list[warnings.WarningMessage]
) -> None:
    run = tmp_path / "run"
    w = RunWriter(run)
    disk = FullDisk(monkeypatch, run)
    w.write_metrics(records(range(10)))
    disk.fill()
    w.write_metrics(records(range(10, 13)))
    w.write_event({"type": "spike", "step": 12})
    disk.free()
    w.write_metrics(records(range(13, 20)))
    w.close()
    one_warning(caught)
    finding = incomplete(run)
    assert finding is not None and finding.severity == "warning" and finding.step is None
    assert "lost 3 step records and 1 event" in finding.message
    assert finding.evidence["lost_records"] == 3 and finding.evidence["lost_events"] == 1
    assert finding.evidence["closed"] is True


def test_not_closed_says_nothing_of_closed_runs_nor_of_logs_that_do_not_say(tmp_path: Path) -> None:
    with RunWriter(tmp_path / "closed") as w:
        w.write_metrics(records(range(20)))
    assert incomplete(tmp_path / "closed") is None
    other = tmp_path / "other"  # another tool's log: no meta.json, so nothing says it was ever open
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(range(20))))
    assert incomplete(other) is None


# ------------------------------------------------------------------------------------------
# Lost or corrupted logs: one writer per run directory
# ------------------------------------------------------------------------------------------


@needs_flock
def test_two_writers_on_one_new_log_dir_the_second_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = RunWriter(run)
    for exist_ok in (False, True):  # exist_ok=True does not bypass the lock
        with pytest.raises(GradGuardError) as info:
            RunWriter(run, exist_ok=exist_ok)
        message = str(info.value)
        assert str(run) in message and "in use" in message
        assert "another log_dir" in message and "close the other run" in message
    first.write_metrics(records(range(2)))
    first.close()
    with RunWriter(run, exist_ok=True) as second:  # released on close
        second.write_metrics(records(range(2, 4)))
    assert steps_of(read_run(run)) == [0, 1, 2, 3]


def race_for(run: Path, writers: int = 2) -> list[object]:
    """``writers`` threads open ``run`` at once (exist_ok=True); what each got: a writer or an error."""
    barrier = threading.Barrier(writers)
    results: list[object] = []

    def open_it() -> None:
        barrier.wait()
        try:
            results.append(RunWriter(run, exist_ok=True))
        except GradGuardError as e:
            results.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@needs_flock
def test_two_writers_racing_for_one_new_log_dir_exactly_one_wins(tmp_path: Path) -> None:
    for attempt in range(20):
        results = race_for(tmp_path / f"run{attempt}")
        writers = [r for r in results if isinstance(r, RunWriter)]
        assert len(writers) == 1, results
        writers[0].close()


@needs_flock
def test_two_processes_with_exist_ok_do_not_interleave(tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = hold_in_child(run)
    try:
        with pytest.raises(GradGuardError, match="in use"):
            RunWriter(run, exist_ok=True)
        with pytest.raises(GradGuardError, match="in use"):
            RunWriter(run)
    finally:
        stop(child)  # the lock goes with the process
    with RunWriter(run, exist_ok=True) as w:
        w.write_metrics([{"step": 1}])
    log = read_run(run)
    assert steps_of(log) == [0, 1] and log.meta["child"] is True


def test_concurrent_auto_run_dirs_stay_distinct(tmp_path: Path) -> None:
    paths: list[Path] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        path = default_run_dir("same", tmp_path, create=True)
        with RunWriter(path) as w:
            w.write_metrics([{"step": 0}])
        paths.append(path)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 8
    assert all(steps_of(read_run(p)) == [0] for p in paths)


# ------------------------------------------------------------------------------------------
# Lost or corrupted logs: resuming from an older checkpoint into the same log_dir
# ------------------------------------------------------------------------------------------


def test_resume_from_an_older_checkpoint_counts_each_step_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunWriter(run) as w:
        for start in range(0, 100, 10):
            w.write_metrics(records(range(start, start + 10)))
        w.write_events([{"type": "spike", "step": 30}, {"type": "spike", "step": 70}])
    with RunWriter(run, exist_ok=True) as w:
        w.resume(50)  # what Guard.load_state_dict does
        for start in range(50, 120, 10):
            w.write_metrics(records(range(start, start + 10)))
        w.write_event({"type": "spike", "step": 71})
    log = read_run(run)
    assert steps_of(log) == list(range(120))  # 120 records, steps strictly increasing
    assert [r["step"] for r in log.superseded] == list(range(50, 100))
    resume = log.first_event("resume")
    assert resume is not None and resume["step"] == 50 and resume["last_logged_step"] == 99
    # events of the dropped range are dropped too (kept aside in superseded_events)
    assert [(e["type"], e["step"]) for e in log.events] == [("spike", 30), ("resume", 50), ("spike", 71)]
    assert log.superseded_events == [{"type": "spike", "step": 70}]
    assert any("50 records superseded" in n and "step 50" in n for n in log.skipped)
    assert any("1 events superseded" in n for n in log.skipped)


def test_resume_drops_the_old_attempt_even_where_the_new_one_logs_sparser(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunWriter(run) as w:
        w.write_metrics(records(range(100)))
        w.resume(50)
        w.write_metrics(records(range(60, 120, 10)))  # the first new record is step 60
    log = read_run(run)
    assert steps_of(log) == [*range(50), *range(60, 120, 10)]  # old 50-59 dropped: the resume says so
    assert log.first_event("resume")["last_logged_step"] == 99  # type: ignore[index]


def test_resume_without_a_resume_event_still_counts_each_step_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunWriter(run) as w:
        w.write_metrics(records(range(100)))
    with RunWriter(run, exist_ok=True) as w:
        w.write_metrics(records(range(50, 120)))  # an older Guard or another tool: no resume()
    log = read_run(run)
    assert steps_of(log) == list(range(120)) and len(log.superseded) == 50


def test_resume_under_a_guard_into_the_same_log_dir(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    run = tmp_path / "run"
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def train(guard: Any, model: Any, opt: Any, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            guard.step()

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gradguard.Guard(model, opt, log_dir=run, every=10)
    train(guard, model, opt, 50)
    checkpoint = guard.state_dict()
    train(guard, model, opt, 50)
    guard.close()
    again = gradguard.Guard(model, opt, log_dir=run, every=10, exist_ok=True)
    again.load_state_dict(checkpoint)  # back to step 50: steps 50-99 are logged again
    train(again, model, opt, 70)
    again.close()
    log = read_run(run)
    assert steps_of(log) == list(range(120))  # not "170 recorded"
    assert [r["step"] for r in log.superseded] == list(range(50, 100))


def resumed_run(run: Path) -> Path:
    """100 steps (50-99 clipped, a spike event at 70), then a resume at step 50 and steps 50-119
    (none clipped): 120 steps count, none clipped after step 49."""

    def rec(step: int, coef: float) -> dict[str, Any]:
        return {**records(range(step, step + 1))[0], "clip_coef": coef, "layers": {"a": {"grad_norm": 1.0}}}

    meta = {"config": {"clip": {"kind": "norm", "max_norm": 5.0}}}
    with RunWriter(run, meta) as w:
        w.write_metrics([rec(s, 1.0 if s < 50 else 0.5) for s in range(100)])
        w.write_events([{"type": "spike", "step": 30}, {"type": "spike", "step": 70}])
    with RunWriter(run, exist_ok=True) as w:
        w.resume(50)
        w.write_metrics([rec(s, 1.0) for s in range(50, 120)])
    return run


def same_tables(a: Any, b: Any) -> bool:
    """Two run tables hold the same columns (``nan`` equal to ``nan``), per-layer ones included."""

    def packed(x: Any) -> Any:
        return x.tobytes() if isinstance(x, array) else x

    fields = [f.name for f in dataclasses.fields(a) if f.compare]
    layers = [(n, k) for n in a.layers for k in ("grad_norm", "weight_norm")]
    return all(packed(getattr(a, f)) == packed(getattr(b, f)) for f in fields) and all(
        packed(a.layer(n, k)) == packed(b.layer(n, k)) for n, k in layers
    )


def test_resume_counts_each_step_once_in_the_run_table(tmp_path: Path) -> None:
    run = resumed_run(tmp_path / "run")
    kept, streamed = read_run(run), read_run(run, records=False)
    for table in (kept.table, streamed.table):
        assert table.steps == list(range(120)) and table.clip_rate == 0.0
        assert list(table.layer("a", "grad_norm")) == [1.0] * 120
    assert same_tables(streamed.table, kept.table) and streamed.metrics == [] and len(kept.superseded) == 50
    assert any("50 records superseded" in n for n in streamed.skipped)


def test_resume_counts_each_step_once_in_diagnose_and_the_report(tmp_path: Path) -> None:
    from gradguard import report
    from gradguard.diagnose import diagnose

    run = resumed_run(tmp_path / "run")
    straight = tmp_path / "straight"  # the same 120 steps, written once
    with RunWriter(straight, {"config": {"clip": {"kind": "norm", "max_norm": 5.0}}}) as w:
        w.write_metrics(read_run(run).metrics)
        w.write_events([{"type": "spike", "step": 30}])
    assert [f.as_dict() for f in diagnose(run)] == [f.as_dict() for f in diagnose(straight)]
    facts = report._run_facts(read_run(run, records=False), [])
    assert (facts["steps"], facts["last_step"], facts["clip_rate"]) == (120, 119, 0.0)
    out = io.StringIO()
    report.print_summary(read_run(run, records=False), [], file=out)
    assert "120 recorded" in out.getvalue()


def test_resume_without_a_resume_event_counts_each_step_once_without_records(tmp_path: Path) -> None:
    run = tmp_path / "run"
    layered = [{**r, "layers": {f"l{r['step'] // 40}": {"grad_norm": 2.0}}} for r in records(range(100))]
    with RunWriter(run) as w:
        w.write_metrics(layered)
    with RunWriter(run, exist_ok=True) as w:
        w.write_metrics(records(range(50, 120)))  # no resume(): the overlap alone says it
        w.write_metrics(records(range(110, 130)))  # and again
    kept, streamed = read_run(run), read_run(run, records=False)
    assert streamed.table.steps == steps_of(kept) == list(range(130))
    assert same_tables(streamed.table, kept.table)
    assert streamed.table.layers == kept.layer_names() == ["l0", "l1"]  # l2's records were superseded
    assert streamed.layer_names() == ["l0", "l1"] and streamed.skipped == kept.skipped


# ------------------------------------------------------------------------------------------
# Crashes on what the tool reads or prints
# ------------------------------------------------------------------------------------------

DEEP = 100_000


def test_deeply_nested_metrics_line_is_skipped_with_a_note(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunWriter(run) as w:
        w.write_metrics(records(range(2)))
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[" * DEEP + "]" * DEEP + "\n")
        f.write('{"a": ' * DEEP + "1" + "}" * DEEP + "\n")
        f.write(json.dumps({"step": 2, "loss": 0.5}) + "\n")
    log = read_run(run)
    assert steps_of(log) == [0, 1, 2]
    assert log.skipped == [
        "metrics.jsonl: line 3 is nested too deeply to read; skipped",
        "metrics.jsonl: line 4 is nested too deeply to read; skipped",
    ]


def test_deeply_nested_events_line_is_skipped_with_a_note(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunWriter(run) as w:
        w.write_event({"type": "skip", "step": 0})
    with open(run / "events.jsonl", "a") as f:
        f.write('{"type": ' + "[" * DEEP + "]" * DEEP + "}\n")
    log = read_run(run)
    assert log.events == [{"type": "skip", "step": 0}]
    assert log.skipped == ["events.jsonl: line 2 is nested too deeply to read; skipped"]


def test_deeply_nested_meta_json_falls_back_to_empty_with_a_note(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "run"
    with RunWriter(run) as w:
        w.write_metrics(records(range(2)))
    (run / "meta.json").write_text('{"schema_version": 1, "layers": ' + "[" * DEEP + "]" * DEEP + "}")
    log = read_run(tmp_path / "runs")  # find_runs reads meta.json's start_time too
    assert log.meta == {} and steps_of(log) == [0, 1]
    assert log.skipped == ["meta.json: nested too deeply to read; run metadata is empty"]
    with RunWriter(run, exist_ok=True):  # reopening merges meta.json: no crash either
        pass


def test_deeply_nested_lines_do_not_crash_diagnose_or_report(tmp_path: Path) -> None:
    from gradguard import report
    from gradguard.diagnose import diagnose

    run = tmp_path / "run"
    with RunWriter(run) as w:
        w.write_metrics(records(range(20)))
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[" * DEEP + "]" * DEEP + "\n")
    (run / "meta.json").write_text('{"schema_version": 1, "x": ' + "[" * DEEP + "]" * DEEP + "}")
    findings = diagnose(run)
    assert "nested too deeply" in report.render_html(run)
    out = io.StringIO()
    report.print_summary(read_run(run), findings, file=out)
    assert "nested too deeply" in out.getvalue()


# ------------------------------------------------------------------------------------------
# Crashes on what the tool reads or prints: hostile names
# ------------------------------------------------------------------------------------------

MARKUP = "[bold]enc[/bold] [/x]"
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m"  # OSC window title, clear screen, C1 CSI
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m"  # the same, escaped visibly
RAW = ("\x1b]0;pwned", "\x1b[2J", "\x9b", "\x07")


def hostile_run(root: Path, name: str = "run") -> Path:
    """A run whose names, op, source line and clipper hold Rich markup and escape sequences."""
    run = root / name
    layers = [f"{MARKUP}{ESCAPES}", "<script>alert(1)</script>"]
    clip = {"clip": {"kind": "norm", "max_norm": 100.0}, "clip_repr": f"Norm{MARKUP}{ESCAPES}"}
    meta = {"layers": layers, "config": clip}
    with RunWriter(run, meta) as w:
        rows = [
            {**r, "layers": {n: {"grad_norm": 1.0, "weight_norm": 2.0 + r["step"]} for n in layers}}
            for r in records(range(40))
        ]
        w.write_metrics(
            [*rows, {"step": 40, "loss": float("nan"), "grad_norm": float("nan"), "nonfinite": True}]
        )
        w.write_event(
            {
                "type": "nonfinite",
                "step": 40,
                "phase": "forward",
                "kind": "nan",
                "module": f"{MARKUP}{ESCAPES}",
                "op": f"log{ESCAPES}",
                "source": f"train.py:1 {MARKUP}{ESCAPES}",
                "located_by": "hooks",
            }
        )
    return run


def diagnose_output(run: Path, capsys: pytest.CaptureFixture[str], *, rich: bool) -> str:
    from gradguard.cli import main

    if not rich:
        sys.modules["rich"] = None  # type: ignore[assignment]  # import rich → ImportError
    try:
        code = main(["diagnose", str(run), "--no-write"])
    finally:
        if not rich:
            del sys.modules["rich"]
    captured = capsys.readouterr()
    assert code == 1, captured  # the non-finite step: an error finding, and no crash
    return captured.out + captured.err


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_hostile_names_rich_markup_in_a_run_path_does_not_crash_diagnose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, rich: bool
) -> None:
    if rich:
        pytest.importorskip("rich")
    monkeypatch.setenv("COLUMNS", "500")
    run = hostile_run(tmp_path, "run[/x] [bold]")
    out = diagnose_output(run, capsys, rich=rich)
    assert f"run: {run}" in out or str(run) in out  # shown literally, nothing eaten


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_hostile_names_markup_in_names_is_shown_literally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, rich: bool
) -> None:
    if rich:
        pytest.importorskip("rich")
    monkeypatch.setenv("COLUMNS", "500")
    out = diagnose_output(hostile_run(tmp_path), capsys, rich=rich)
    assert f"Norm{MARKUP}" in out  # the clipper's label
    assert f"'{MARKUP}" in out  # the module, in the non-finite finding
    assert f"train.py:1 {MARKUP}" in out  # the source line


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_hostile_names_escape_sequences_never_reach_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, rich: bool
) -> None:
    if rich:
        pytest.importorskip("rich")
    monkeypatch.setenv("COLUMNS", "500")
    run = hostile_run(tmp_path, f"run{ESCAPES}")  # in the path too
    out = diagnose_output(run, capsys, rich=rich)
    for raw in RAW:
        assert raw not in out
    assert f"log{SHOWN}" in out  # the op, escaped visibly
    assert f"run{SHOWN}" in out  # the path


def test_hostile_names_escape_sequences_in_cli_errors_and_paths_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradguard.cli import main

    assert main(["diagnose", str(tmp_path / f"missing{ESCAPES}")]) == 2
    err = capsys.readouterr().err
    assert f"missing{SHOWN}" in err and not any(raw in err for raw in RAW)
    pytest.importorskip("plotly")
    run = hostile_run(tmp_path, f"run{ESCAPES}")
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"run{SHOWN}" in out and not any(raw in out for raw in RAW)


def test_hostile_names_json_output_keeps_the_names_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradguard.cli import main

    main(["diagnose", str(hostile_run(tmp_path)), "--json", "--no-write"])
    out = capsys.readouterr().out
    assert not any(raw in out for raw in RAW)  # JSON escapes control characters itself
    assert json.loads(out)["first_nonfinite"]["module"] == f"{MARKUP}{ESCAPES}"  # data, unchanged


def test_hostile_names_in_the_html_report_are_escaped(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from gradguard import report

    page = report.render_html(hostile_run(tmp_path, f"run{ESCAPES}"))
    for raw in RAW:
        assert raw not in page
    assert "<script>alert(1)</script>" not in page
    assert html.escape(f"log{SHOWN}") in page and html.escape(f"Norm{MARKUP}{SHOWN}") in page


def test_hostile_names_safe_text_escapes_every_control_character() -> None:
    from gradguard.safetext import safe_text

    text = "".join(chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0), 0x202E, 0x2028))
    shown = safe_text(text)
    assert shown.isprintable() and shown.count("\\") == len(text)
    assert safe_text("ünïcode [b] ok") == "ünïcode [b] ok"


# ------------------------------------------------------------------------------------------
# Crashes on what the tool reads or prints: huge logs
# ------------------------------------------------------------------------------------------

MIB = 2**20
DIAGNOSE_RSS = 1.0  # peak RSS over the imports' / metrics.jsonl's size (measured: see benchmarks/README.md)
REPORT_RSS = 1.5


def readers_benchmark() -> Any:
    """benchmarks/readers.py: the log generator and the child-process measurement."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "readers.py"
    spec = importlib.util.spec_from_file_location("readers_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HUGE = pytest.mark.parametrize(("steps", "layers"), [(200_000, 4), (300, 2500)], ids=["long", "wide"])


@pytest.mark.slow
@HUGE
def test_huge_logs_diagnose_memory_is_bounded_by_the_log_size(
    tmp_path: Path, steps: int, layers: int
) -> None:
    bench = readers_benchmark()
    run = bench.generate(tmp_path / "run", steps, layers)
    size = (run / "metrics.jsonl").stat().st_size
    base = bench.measure(["import"])["peak_rss"]
    got = bench.measure(["diagnose", str(run), "--no-write"])
    assert got["code"] == 0
    # before: ~9× the log (3.3 GB for 361 MB); now a fraction of it
    assert got["peak_rss"] - base < DIAGNOSE_RSS * size + 32 * MIB, (got, base, size)


@pytest.mark.slow
@HUGE
def test_huge_logs_report_memory_is_bounded_by_the_log_size(tmp_path: Path, steps: int, layers: int) -> None:
    pytest.importorskip("plotly")
    bench = readers_benchmark()
    run = bench.generate(tmp_path / "run", steps, layers)
    size = (run / "metrics.jsonl").stat().st_size
    base = bench.measure(["import"])["peak_rss"]
    got = bench.measure(["report", str(run), "-o", str(tmp_path / "report.html")])
    assert got["code"] == 0
    assert got["peak_rss"] - base < REPORT_RSS * size + 160 * MIB, (got, base, size)


# ------------------------------------------------------------------------------------------
# Bad input without a clear error
# ------------------------------------------------------------------------------------------


def test_log_dir_empty_string_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(GradGuardError, match="empty") as info:
            RunWriter(empty)
        assert "'auto'" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# Drop-in parity with torch.nn.utils
# ------------------------------------------------------------------------------------------

# (the CLIP part's cases, with the clip-level bad input: the section "clip" at the end of this file)


# ==========================================================================================
# guard: the Guard-side cases (poisoned training state, recovery, logs, bad input)
# ==========================================================================================
# torch is imported inside these tests: the run-log cases above run without it.


def _seq(seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _batch(step: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)


def _backward(model: Any, opt: Any, step: int, nan_in: Any = None) -> Any:
    """One forward/backward; ``nan_in``: a parameter whose gradient gets a NaN."""
    import torch

    x, y = _batch(step)
    opt.zero_grad(set_to_none=True)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    if nan_in is not None:
        with torch.no_grad():
            nan_in.grad.view(-1)[0] = float("nan")
    return loss


def _global_norm(params: Any) -> float:
    return sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None) ** 0.5


def _assert_guarded_from_join(log: runlog.RunLog, join: int, nan_step: int, layer: str) -> None:
    """The layer is in every record from ``join`` on, in meta.json, in a ``layers`` event; the
    NaN in its gradient at ``nan_step`` was skipped, with events."""
    assert [layer in r.get("layers", {}) for r in log.metrics] == [s >= join for s in steps_of(log)]
    assert layer in log.meta["layers"]
    joined = log.events_of("layers")
    assert [(e["step"], e["added"]) for e in joined] == [(join, [layer])]
    assert joined[0]["parameters"] == [f"{layer}.weight", f"{layer}.bias"]
    nan_rec = log.metrics[nan_step]
    assert nan_rec["skipped"] and nan_rec["grad_nan"]
    assert math.isnan(nan_rec["layers"][layer]["grad_norm"])
    assert [e["step"] for e in log.events_of("skip")] == [nan_step]
    assert log.first_event("nonfinite")["step"] == nan_step  # type: ignore[index]


def test_guard_param_added_with_add_param_group_is_measured_clipped_and_checked(tmp_path: Path) -> None:
    import torch

    model = _seq()
    opt = torch.optim.SGD(model[0].parameters(), lr=1.0)  # the head joins later
    guard = gradguard.Guard(model, opt, clip="norm:0.05", log_dir=tmp_path / "r", every=50)
    for step in range(5):
        guard.step(_backward(model, opt, step))
    opt.add_param_group({"params": list(model[2].parameters())})
    head = model[2].weight
    totals = {}
    for step in range(5, 10):
        loss = _backward(model, opt, step, nan_in=head if step == 7 else None)
        totals[step] = _global_norm(model.parameters())
        grad, before = head.grad.clone(), head.detach().clone()
        guard.step(loss)
        if step == 7:  # skipped: the NaN never reaches the weights
            assert torch.equal(head, before)
        else:  # measured with all the others and clipped with them
            coef = min(1.0, 0.05 / totals[step])
            torch.testing.assert_close(head.detach(), before - coef * grad, rtol=1e-5, atol=1e-7)
    guard.close()
    log = read_run(tmp_path / "r")
    _assert_guarded_from_join(log, join=5, nan_step=7, layer="2")
    for step in (5, 6, 8, 9):  # the global norm counts the new parameters
        assert log.metrics[step]["grad_norm"] == pytest.approx(totals[step], rel=1e-5)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_guard_param_unfrozen_after_construction_is_measured_clipped_and_checked(tmp_path: Path) -> None:
    import torch

    model = _seq()
    model[0].requires_grad_(False)  # progressive unfreezing: the optimizer holds it from the start
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, clip="norm:1", log_dir=tmp_path / "r", every=4)
    for step in range(10):
        if step == 3:
            model[0].requires_grad_(True)
        loss = _backward(model, opt, step, nan_in=model[0].weight if step == 6 else None)
        total = _global_norm(model.parameters())
        guard.step(loss)
        if step in (3, 4):
            assert guard.last_grad_norm is not None
            assert float(guard.last_grad_norm) == pytest.approx(total, rel=1e-5)  # the new layer measured
    guard.close()
    log = read_run(tmp_path / "r")
    _assert_guarded_from_join(log, join=3, nan_step=6, layer="0")
    assert log.meta["layers"] == ["2", "0"]  # the log's layer list grows at the end
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_guard_param_join_check_touches_no_parameter_while_nothing_changes() -> None:
    """The hot path: one look at each parameter group, no scan of the parameters."""
    import torch

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt)

    class Counted(list):  # type: ignore[type-arg]
        iterations = 0

        def __iter__(self) -> Any:
            Counted.iterations += 1
            return super().__iter__()

    for group in opt.param_groups:
        group["params"] = Counted(group["params"])
    assert guard._guarded.joining() == []  # a new list: one rescan (the rare path)
    Counted.iterations = 0
    for _ in range(100):
        assert guard._guarded.joining() == []
    assert Counted.iterations == 0


def _rollback_loop(tmp_path: Path, **kw: Any) -> tuple[Any, runlog.RunLog, Any, int]:
    """NaN every third step under rollback with lr_backoff=0.5, until the guard stops the run."""
    import torch

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(
        model, opt, on_nonfinite="rollback", lr_backoff=0.5, log_dir=tmp_path / "r", every=10, **kw
    )
    stopped = None
    for step in range(3000):
        try:
            guard.step(_backward(model, opt, step, nan_in=model[2].weight if step % 3 == 2 else None))
        except gradguard.NonFiniteError as e:
            stopped = e
            break
    assert stopped is not None, f"no abort after 3000 steps; lr={opt.param_groups[0]['lr']}"
    guard.close()
    return stopped, read_run(tmp_path / "r"), opt, step


def test_guard_rollback_loop_stops_at_max_rollbacks(tmp_path: Path) -> None:
    error, log, opt, step = _rollback_loop(tmp_path)  # defaults: max_rollbacks=5 within 1000 steps
    assert step == 17  # the 6th rollback (steps 2, 5, 8, 11, 14, 17)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**5)  # 3.1e-3, far above 1e-11
    assert "6 rollbacks within 1000 steps (max_rollbacks=5)" in str(error)
    assert "raise max_rollbacks" in str(error) and "snapshot of step 0" in str(error)
    abort = log.first_event("abort")
    assert abort is not None and abort["step"] == 17 and abort["reason"] == "max_rollbacks"
    assert (abort["rollbacks"], abort["window"], abort["to_step"]) == (6, 1000, 0)
    assert abort["message"] == str(error)
    assert log.meta["aborted"] is True and log.meta["abort_reason"] == "max_rollbacks"
    assert steps_of(log) == list(range(18))  # every record up to the abort


def test_guard_rollback_loop_stops_at_min_lr(tmp_path: Path) -> None:
    error, log, opt, step = _rollback_loop(tmp_path, max_rollbacks=None)  # default min_lr=1e-8
    lr = opt.param_groups[0]["lr"]
    assert 1e-8 <= lr < 2e-8 and step == 2 + 3 * 23  # 23 back-offs; a 24th would go below 1e-8
    assert "below min_lr=1e-08" in str(error) and "lower min_lr" in str(error)
    abort = log.first_event("abort")
    assert abort is not None and abort["reason"] == "min_lr" and abort["lr"] == pytest.approx(lr)


def test_guard_rollback_resume_is_bit_identical_to_not_stopping(tmp_path: Path) -> None:
    import torch

    nan_steps = {4, 11, 18, 33, 47}  # five rollbacks: within the default max_rollbacks

    def build(seed: int, run: Path, exist_ok: bool = False) -> tuple[Any, Any, Any]:
        model = _seq(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        guard = gradguard.Guard(
            model,
            opt,
            clip="autoclip:10",
            on_nonfinite="rollback",
            snapshot_every=7,
            lr_backoff=0.5,
            log_dir=run,
            every=10,
            exist_ok=exist_ok,
        )
        return model, opt, guard

    def train(model: Any, opt: Any, guard: Any, steps: range) -> None:
        for step in steps:
            guard.step(_backward(model, opt, step, nan_in=model[2].weight if step in nan_steps else None))

    model, opt, guard = build(0, tmp_path / "straight")
    train(model, opt, guard, range(60))
    guard.close()
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, guard = build(0, tmp_path / "resumed")
    train(model, opt, guard, range(30))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}, buf)
    guard.close()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["guard"]["recovery"]["snapshot"] is not None  # the snapshot travels with the state
    model, opt, guard = build(1, tmp_path / "resumed", exist_ok=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    guard.load_state_dict(saved["guard"])
    train(model, opt, guard, range(30, 60))
    guard.close()

    for a, b in zip(straight, model.parameters(), strict=True):
        assert torch.equal(a, b.detach())
    a, b = read_run(tmp_path / "straight"), read_run(tmp_path / "resumed")
    by_step = lambda log: sorted((e for e in log.events if e["type"] != "resume"), key=lambda e: e["step"])  # noqa: E731
    assert [e["type"] for e in by_step(a)].count("rollback") == 5
    assert by_step(a) == by_step(b)
    assert b.first_event("resume")["step"] == 30  # type: ignore[index]
    lines = lambda run: (run / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert lines(tmp_path / "straight") == lines(tmp_path / "resumed")


_UNCLOSED_CHILD = """
import sys, torch, gradguard
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
guard = gradguard.Guard(model, opt, log_dir=sys.argv[1], every=50)
for step in range(120):
    opt.zero_grad()
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    guard.step(loss)
    if step == int(sys.argv[2]):
        raise RuntimeError("the training loop failed")
# guard.close() never called
"""


@pytest.mark.parametrize(("raise_at", "records_kept"), [(-1, 120), (74, 75)], ids=["exits", "raises"])
def test_guard_log_flushes_at_exit_when_close_is_never_called(
    tmp_path: Path, raise_at: int, records_kept: int
) -> None:
    run = tmp_path / "r"
    out = subprocess.run(
        [sys.executable, "-c", _UNCLOSED_CHILD, str(run), str(raise_at)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (out.returncode != 0) == (raise_at >= 0), out.stderr
    log = read_run(run)
    assert steps_of(log) == list(range(records_kept))  # not 100 of 120, not 50 of 75
    assert log.meta["closed_at_exit"] is True and log.meta["steps"] == records_kept
    assert "could not close" not in out.stderr
    # a run that crashed does not read as a healthy one: diagnose says how it ended
    (said,) = [f for f in diagnose(run) if f.id == "incomplete_log"]
    if raise_at >= 0:
        assert log.meta["ended_by"] == "RuntimeError: the training loop failed"
        assert said.severity == "warning" and "ended early after step 74" in said.message
        assert "RuntimeError: the training loop failed" in said.message
    else:
        assert "ended_by" not in log.meta
        assert said.severity == "info" and "never closed its guard" in said.message


def test_guard_log_flushes_when_a_with_block_raises(tmp_path: Path) -> None:
    import torch

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with (
        pytest.raises(RuntimeError, match="loop failed"),
        gradguard.Guard(model, opt, log_dir=tmp_path / "r") as guard,
    ):
        for step in range(30):
            guard.step(_backward(model, opt, step))
        raise RuntimeError("the training loop failed")
    assert guard.closed and steps_of(read_run(tmp_path / "r")) == list(range(30))


def test_guard_dropped_without_close_can_be_collected() -> None:
    import gc
    import weakref

    import torch

    model = _seq()
    guard = gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ref = weakref.ref(guard)
    del guard
    gc.collect()
    assert ref() is None  # the exit hook holds it weakly


def test_guard_log_dir_auto_gives_guards_started_together_their_own_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runlog, "_timestamp", lambda: "20250101-000000")  # the same second
    model = _seq()
    guards = [
        gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir="auto", name="same")
        for _ in range(3)
    ]
    dirs = [g.run_dir for g in guards]
    for g in guards:
        g.close()
    assert len(set(dirs)) == 3 and all(d is not None and d.parent.name == "gradguard-runs" for d in dirs)


def test_guard_log_dir_empty_is_refused_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.chdir(tmp_path)
    model = _seq()
    for empty in ("", " "):
        with pytest.raises(GradGuardError, match=r"log_dir='\s*' is empty.*log_dir='auto'.*None"):
            gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=empty)
    assert list(tmp_path.iterdir()) == []


def test_guard_complex_parameters_are_refused_at_construction() -> None:
    import torch

    model = _seq()
    model.register_parameter("phase", torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)))
    with pytest.raises(
        GradGuardError, match=r"parameter 'phase' is complex \(torch.complex64, shape \(3,\)\).*view_as_real"
    ):
        gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    later = torch.optim.SGD(model[0].parameters(), lr=0.1)
    guard = gradguard.Guard(model, later)  # the complex one is not the optimizer's: fine
    later.add_param_group({"params": [model.phase]})
    with pytest.raises(GradGuardError, match="is complex"):  # added later: refused at the call
        guard.step(_backward(model, later, 0))


def test_guard_lbfgs_closure_form_trains_and_is_guarded(tmp_path: Path) -> None:
    import torch

    model = _seq()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    guard = gradguard.Guard(model, opt, clip="norm:10", log_dir=tmp_path / "r", every=5)
    x, y = _batch(0)
    now = {"step": 0}

    def closure() -> Any:
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        if now["step"] == 3:
            with torch.no_grad():
                model[2].weight.grad[0, 0] = float("nan")
        return loss

    losses = []
    for step in range(8):
        now["step"] = step
        before = [p.detach().clone() for p in model.parameters()]
        losses.append(float(guard.step(closure)))
        if step == 3:  # skipped: LBFGS never ran
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    guard.close()
    assert losses[-1] < 0.5 * losses[0]  # it trains
    log = read_run(tmp_path / "r")
    assert [e["step"] for e in log.events_of("skip")] == [3]
    assert log.first_event("nonfinite")["step"] == 3  # type: ignore[index]


@pytest.mark.parametrize("norm_type", [-1, 0, math.nan, "foo"])
def test_guard_norm_type_bad_values_are_refused_at_construction(norm_type: Any) -> None:
    import torch

    from gradguard.stats import check_norm_type

    model = _seq()
    with pytest.raises(GradGuardError, match="norm_type must be") as info:
        gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), norm_type=norm_type)
    with pytest.raises(GradGuardError) as same:  # the one validator: the same words as clip_grad_norm_'s
        check_norm_type(norm_type)
    assert str(info.value) == str(same.value) and repr(norm_type) in str(info.value)


def test_guard_loss_that_is_not_a_number_is_refused_at_the_call() -> None:
    import torch

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt)
    _backward(model, opt, 0)
    with pytest.raises(GradGuardError, match=r"the loss must be a tensor, a number or None; got str 'abc'"):
        guard.step("abc")  # type: ignore[arg-type]
    with pytest.raises(GradGuardError, match=r"the loss is an empty tensor \(shape \(0,\)\)"):
        guard.step(torch.zeros(0))
    with pytest.raises(GradGuardError, match="the loss is a complex tensor"):
        guard.before_step(torch.ones((), dtype=torch.complex64))
    with pytest.raises(GradGuardError, match=r"the loss must be a tensor, a number or None; got SGD\. Pass"):
        guard.step(opt)  # (its repr is many lines: not pasted into the message)
    with pytest.raises(GradGuardError, match=r"the loss is a torch.bool tensor \(a comparison\?\)"):
        guard.step(torch.tensor(1.5) > 0)
    with pytest.raises(GradGuardError, match=r"the loss is a torch\.int64 tensor"):
        guard.step(torch.tensor(3))
    assert guard.step_count == 0  # nothing was stepped or recorded
    guard.step(torch.tensor(1.5))
    guard.step(2)
    assert guard.step_count == 2


def test_a_closure_that_returns_nothing_is_said_once(tmp_path: Path) -> None:
    import torch

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path, every=1)

    def closure() -> None:  # forgot `return loss`
        _backward(model, opt, 0)

    with pytest.warns(RuntimeWarning, match=r"the closure passed to guard.step\(\) returned None") as said:
        for _ in range(3):
            guard.step(closure)
    guard.close()
    assert len([w for w in said if "returned None" in str(w.message)]) == 1
    assert said[0].filename == __file__


@pytest.mark.parametrize("floor", [-1, math.nan, "low", True])
def test_a_bad_loss_scale_floor_is_refused_at_construction(floor: Any) -> None:
    import torch

    model = _seq()
    with pytest.raises(
        GradGuardError, match=f"loss_scale_floor must be a number >= 0; got {re.escape(repr(floor))}"
    ):
        gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_scale_floor=floor)


def test_one_stateful_clipper_in_two_open_guards_is_refused() -> None:
    import torch

    g_model, d_model = _seq(), _seq()
    shared = gradguard.AutoClip()
    first = gradguard.Guard(g_model, torch.optim.SGD(g_model.parameters(), lr=0.1), clip=shared)
    with pytest.raises(GradGuardError, match=r"this AutoClip clipper is already used by another open Guard"):
        gradguard.Guard(d_model, torch.optim.SGD(d_model.parameters(), lr=0.1), clip=shared)
    fixed = gradguard.Norm(1.0)  # no state: as good shared
    gradguard.Guard(g_model, torch.optim.SGD(g_model.parameters(), lr=0.1), clip=fixed)
    gradguard.Guard(d_model, torch.optim.SGD(d_model.parameters(), lr=0.1), clip=fixed)
    first.close()  # a closed guard's clipper is taken over
    gradguard.Guard(d_model, torch.optim.SGD(d_model.parameters(), lr=0.1), clip=shared).close()


def test_a_guard_state_with_keys_it_never_writes_is_refused_before_loading() -> None:
    import torch

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt)
    state = guard.state_dict()
    checkpoint = {**state, "model": model.state_dict(), "epoch": 3}  # the whole checkpoint
    with pytest.raises(GradGuardError, match=r"never writes: 'epoch', 'model'. Pass the guard's own part"):
        guard.load_state_dict(checkpoint)
    with pytest.raises(GradGuardError, match=r"'step_count' must be a count \(an int >= 0\); got 'abc'"):
        guard.load_state_dict({**state, "step_count": "abc"})
    assert guard.step_count == 0
    guard.load_state_dict({**state, "step_count": 5})
    assert guard.step_count == 5


def test_a_per_sample_loss_vector_is_said_once_and_logged_as_its_sum(tmp_path: Path) -> None:
    import torch

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path, every=1)
    _backward(model, opt, 0)
    with pytest.warns(
        UserWarning, match=r"a loss of shape \(3,\), not a scalar: it checks and logs the sum"
    ) as said:
        guard.step(torch.tensor([1.0, 2.0, 4.0]))
    assert said[0].filename == __file__  # the user's line, not gradguard's
    guard.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == 7.0


def test_guard_param_without_gradient_is_logged_as_null(tmp_path: Path) -> None:
    import torch

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, log_dir=tmp_path / "r", every=2)
    for step in range(4):
        _backward(model, opt, step)
        if step == 1:
            model[0].weight.grad = model[0].bias.grad = None  # no gradient in layer 0 this step
        guard.step()
    guard.close()
    log = read_run(tmp_path / "r")
    assert [r["layers"]["0"]["grad_norm"] is None for r in log.metrics] == [False, True, False, False]
    assert all(r["layers"]["2"]["grad_norm"] > 0 for r in log.metrics)
    assert "null" in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[1]


def test_guard_layer_cadence_default_keeps_wide_models_logs_small(tmp_path: Path) -> None:
    import torch

    def run(width: int, **kw: Any) -> tuple[Any, runlog.RunLog]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(width)])
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        run_dir = tmp_path / f"w{width}{kw}"
        guard = gradguard.Guard(model, opt, log_dir=run_dir, every=20, weight_every=None, **kw)
        for _ in range(40):
            opt.zero_grad()
            model(torch.randn(2, 4)).pow(2).mean().backward()
            guard.step()
        guard.close()
        return guard, read_run(run_dir)

    small, small_log = run(64)
    assert small.layer_every == 1 and all("layers" in r for r in small_log.metrics)  # small: every step
    wide, wide_log = run(200)
    assert wide.layer_every == 4 and wide_log.meta["config"]["layer_every_auto"] is True
    assert [r["step"] for r in wide_log.metrics if "layers" in r] == list(range(0, 40, 4))
    kept = sum(len(r["layers"]) for r in wide_log.metrics if "layers" in r) / len(wide_log.metrics)
    assert kept <= 64  # layer norms per record, on average
    every, every_log = run(200, layer_every=1)  # asked for: every step
    assert every.layer_every == 1 and all(len(r["layers"]) == 200 for r in every_log.metrics)


# ==========================================================================================
# clip: bad input at the clip level, and drop-in parity with torch.nn.utils (the CLIP part)
# ==========================================================================================
# torch is imported inside these tests, as in the Guard-side cases. PyTorch's own clip tests,
# transcribed, are in tests/test_torch_parity.py; these are the cases, one test each.

CLIP_SPECS = ["norm:5", "value:1", "agc", "autoclip", "zclip", "layer:1", "auto"]


def _clip_params(dtype: Any = None, grad: list[float] | None = None) -> list[Any]:
    import torch

    values = grad if grad is not None else [3.0, -4.0, 0.5]
    g = torch.tensor(values, dtype=dtype)
    p = torch.nn.Parameter(torch.ones_like(g))
    p.grad = g.clone()
    return [p]


def test_clip_complex_gradients_are_refused_at_the_call_naming_shape_dtype_and_fix() -> None:
    import torch

    from gradguard import clip as C

    w = torch.nn.Parameter(torch.ones(4, 2, dtype=torch.complex64))
    w.grad = torch.ones(4, 2, dtype=torch.complex64)
    calls = [
        lambda: C.clip_grad_norm_([w], 1.0),
        lambda: C.clip_grad_value_([w], 1.0),
        lambda: C.clip_grad_agc_([w]),
        lambda: C.get_total_norm([w.grad]),
        lambda: C.clip_grads_with_norm_([w], 1.0, torch.tensor(2.0)),
        *[(lambda s=s: C.from_spec(s)([w])) for s in CLIP_SPECS],  # type: ignore[misc]
    ]
    for call in calls:
        with pytest.raises(GradGuardError) as info:
            call()
        msg = str(info.value)
        assert "complex" in msg and "(4, 2)" in msg and "torch.complex64" in msg, msg
        assert "view_as_real" in msg, msg  # the fix
    assert torch.equal(w.grad, torch.ones(4, 2, dtype=torch.complex64))  # nothing was touched


@pytest.mark.parametrize(
    "spec", ["norm:0", "agc:0", "layer:0", "value:0", "0", 0, {"kind": "norm", "max_norm": 0}]
)
def test_clip_specs_that_zero_every_gradient_are_refused_with_the_fix(tmp_path: Path, spec: Any) -> None:
    import torch

    from gradguard import clip as C

    with pytest.raises(GradGuardError) as info:
        C.from_spec(spec)
    msg = str(info.value)
    assert repr(spec) in msg and "zeroes every gradient" in msg  # what, and the value
    assert "positive threshold" in msg and "'none'" in msg  # the fix
    model = torch.nn.Linear(2, 2)
    with pytest.raises(GradGuardError, match="zeroes every gradient"):
        gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), clip=spec, log_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_clip_functions_keep_torchs_behaviour_for_a_threshold_of_zero() -> None:
    import torch

    from gradguard import clip as C

    for name in ["clip_grad_norm_", "clip_grad_value_"]:
        ours, theirs = _clip_params(), _clip_params()
        getattr(C, name)(ours, 0.0)
        getattr(torch.nn.utils, name)(theirs, 0.0)
        assert torch.equal(ours[0].grad, theirs[0].grad) and float(ours[0].grad.abs().max()) == 0.0
    assert C.Norm(0.0).max_norm == 0.0  # a clipper built directly is taken as it is


@pytest.mark.parametrize("norm_type", [-1, 0, math.nan, "foo"])
def test_clip_norm_types_that_are_not_norms_are_refused_with_the_value_and_fix(norm_type: Any) -> None:
    from gradguard import clip as C

    ps = _clip_params()
    for call in [
        lambda: C.clip_grad_norm_(ps, 1.0, norm_type),
        lambda: C.get_total_norm([ps[0].grad], norm_type),
        lambda: C.Norm(1.0, norm_type=norm_type),
        lambda: C.PerLayer(1.0, norm_type=norm_type),
    ]:
        with pytest.raises(GradGuardError) as info:  # never a bare ValueError
            call()
        msg = str(info.value)
        assert type(info.value) is GradGuardError and "norm_type" in msg and repr(norm_type) in msg, msg
        assert "Use 2.0" in msg, msg
    assert ps[0].grad.tolist() == [3.0, -4.0, 0.5]


def test_clip_parity_the_decomposed_api_and_foreach() -> None:
    import torch

    from gradguard import clip as C

    for foreach in [None, False, True]:
        whole, parts, theirs = _clip_params(), _clip_params(), _clip_params()
        norm = C.clip_grad_norm_(whole, 1.0, foreach=foreach)
        total = C.get_total_norm([parts[0].grad], foreach=foreach)
        C.clip_grads_with_norm_(parts, 1.0, total, foreach=foreach)
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=foreach)
        assert torch.equal(norm, total) and torch.equal(whole[0].grad, parts[0].grad)
        torch.testing.assert_close(whole[0].grad, theirs[0].grad)
        C.clip_grad_value_(whole, 0.1, foreach=foreach)
        assert float(whole[0].grad.abs().max()) == pytest.approx(0.1)


def test_clip_parity_an_exhausted_generator_warns_like_torch() -> None:
    import torch

    from gradguard import clip as C

    model = torch.nn.Linear(2, 2)
    params = model.parameters()
    list(params)  # used up
    with pytest.warns(
        UserWarning, match=r"^`parameters` is an empty generator, no gradient clipping will occur\."
    ):
        assert float(C.clip_grad_norm_(params, 1.0)) == 0.0


def test_clip_parity_the_norm_is_computed_under_no_grad() -> None:
    import torch

    from gradguard import clip as C

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on create_graph's reference cycle
        w.pow(3).sum().backward(create_graph=True)
    grad_fn = w.grad.grad_fn
    norm = C.clip_grad_norm_([w], 1.0)
    assert not norm.requires_grad and norm.grad_fn is None
    assert w.grad.grad_fn is grad_fn  # the clip is not recorded in the graph
    w.grad = None


def test_clip_parity_error_if_nonfinite_says_what_torch_says() -> None:
    import torch

    from gradguard import clip as C

    theirs, ours = _clip_params(grad=[1.0, math.nan]), _clip_params(grad=[1.0, math.nan])
    with pytest.raises(RuntimeError) as want:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as got:
        C.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    assert str(want.value).startswith(
        "The total norm of order 2.0 for gradients from `parameters` is non-finite"
    )
    assert str(got.value).startswith(str(want.value))  # torch's message word for word, then gradguard's note
    assert isinstance(got.value, gradguard.NonFiniteError)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_clip_parity_float32_gradients_whose_squares_overflow_are_clipped(dtype_name: str) -> None:
    """Measured and clipped (torch: inf, zeroed). A healthy step stays one read and no host read
    (checked on CPU and meta); only the overflowed tensor is read again, on the CPU."""
    import torch

    from gradguard import clip as C
    from nosync import NoSync

    dtype = getattr(torch, dtype_name)
    for device in ("cpu", "meta"):
        healthy = torch.nn.Parameter(torch.ones(3, dtype=dtype, device=device))
        healthy.grad = torch.ones(3, dtype=dtype, device=device)
        with NoSync(watch=[healthy.grad]) as ns:
            C.clip_grad_norm_([healthy], 1.0)
        assert ns.reads == [2] and ns.syncs == []  # one measure + one scale
    ps = _clip_params(dtype, [1.8e19, -5e19, 1.0])
    exact = float(ps[0].grad.double().norm())
    with NoSync() as ns:
        norm = C.clip_grad_norm_(ps, 1.0)
    assert ns.syncs == []
    assert float(norm) == pytest.approx(exact, rel=1e-6)  # torch: inf
    assert float(ps[0].grad.double().norm()) == pytest.approx(1.0, rel=1e-2)  # torch: zeroed


def test_clip_parity_documented_differences_nonfinite_untouched_and_half_norms_in_float32() -> None:
    import torch

    from gradguard import clip as C

    ours, theirs = _clip_params(grad=[3.0, math.inf, 1.0]), _clip_params(grad=[3.0, math.inf, 1.0])
    assert (
        float(C.clip_grad_norm_(ours, 1.0)) == float(torch.nn.utils.clip_grad_norm_(theirs, 1.0)) == math.inf
    )
    assert ours[0].grad.tolist() == [3.0, math.inf, 1.0]  # gradguard: untouched
    assert bool(theirs[0].grad.isnan().any())  # torch: NaN written
    for dtype_name in ["float16", "bfloat16"]:
        half = _clip_params(getattr(torch, dtype_name), [6e4, 6e4])
        assert C.clip_grad_norm_(half, 1.0).dtype == torch.float32  # torch: the gradients' dtype


def test_a_sparse_embedding_is_measured_clipped_and_skipped_by_the_guard(tmp_path: Path) -> None:
    """``nn.Embedding(sparse=True)`` (a recommender's tables, with SparseAdam or SGD): the guard
    stopped the run at its first step ("measures dense gradients only"), under ``gradguard run``
    too, where the plain script trained. Its gradient is measured by its values (duplicate rows
    summed: the norm of the dense gradient), clipped where the optimizer reads it, and a NaN in it
    skips the step."""
    import torch
    from torch import nn

    from gradguard import Guard

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(50, 4, sparse=True), nn.Flatten(), nn.Linear(12, 1))

    idx = torch.tensor([[3, 3, 7], [7, 9, 3]])  # repeated rows: an uncoalesced sparse gradient
    ours, ref = model(), model()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    guard = Guard(ours, opt, clip="norm:0.01", log_dir=tmp_path / "run", every=1)
    ours(idx).pow(2).mean().backward()
    ref(idx).pow(2).mean().backward()
    dense = [p.grad.to_dense() for p in ref.parameters()]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in dense]))
    guard.step(torch.tensor(1.0))
    assert float(guard.last_grad_norm) == pytest.approx(float(total), rel=1e-5)
    with torch.no_grad():
        for p, g in zip(ref.parameters(), dense):
            p -= 0.1 * g * (0.01 / float(total))  # clip_grad_norm_'s result, on the dense gradients
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    opt.zero_grad()
    before = [p.detach().clone() for p in ours.parameters()]
    ours(idx).pow(2).mean().backward()
    nan_row = torch.sparse_coo_tensor([[3]], [[math.nan] * 4], (50, 4), check_invariants=True)
    ours[0].weight.grad = nan_row
    guard.step(torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), before))
    guard.close()
    assert read_run(tmp_path / "run").metrics[-1]["skipped"]


def test_buffers_already_nan_at_start_are_said_then_not_blamed_on_a_step(tmp_path: Path) -> None:
    """A fine-tune from a checkpoint whose BatchNorm running statistics hold NaN (BatchNorm frozen in
    eval mode): every forward is NaN. It read "step 0's forward also wrote NaN into the buffers … a
    rollback restores them" (the snapshot holds them too), and the abort said "lower the learning
    rate or clip harder". Said when the guard starts; the abort names the state."""
    import torch
    from torch import nn

    from gradguard import Guard, NonFiniteError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model[1].running_var[3] = math.nan  # as loaded from the checkpoint
    model[1].eval()  # frozen statistics: the fine-tune's usual choice
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(
        RuntimeWarning, match=r"the buffers 1.running_var already hold NaN before the first step"
    ):
        guard = Guard(model, opt, log_dir=tmp_path / "run", max_consecutive=3)
    with pytest.raises(
        NonFiniteError, match=r"in the buffer '1\.running_var', non-finite before the first step"
    ) as stop:
        for _ in range(5):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 2, (16,)))
            loss.backward()
            guard.step(loss)
    assert "Lower the learning rate" not in str(stop.value)
    guard.close()
    log = read_run(tmp_path / "run")
    assert log.meta["nonfinite_buffers_at_start"] == ["1.running_var"]
    assert not [e for e in log.events if e["type"] == "buffers"]


def test_a_closed_run_whose_records_were_cut_is_an_error_not_a_clean_verdict(tmp_path: Path) -> None:
    """metrics.jsonl emptied or cut after the run closed (meta.json counts 32 steps): "No findings", exit 0."""
    import torch

    import gradguard

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, optimizer, log_dir=tmp_path / "run") as guard:
        for _ in range(32):
            optimizer.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            guard.step(loss)
    assert incomplete(tmp_path / "run") is None  # whole: nothing to say
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    for kept in (lines[:6], []):
        metrics.write_text("".join(kept))
        finding = incomplete(tmp_path / "run")
        assert finding is not None and finding.severity == "error", finding
        assert f"meta.json counts 32 steps but the log holds {len(kept)}" in finding.message


@pytest.mark.parametrize("name", ["exist_ok", "locate", "rank_logs", "monitor_only"])
def test_a_yes_no_setting_that_is_not_a_bool_is_refused(name: str) -> None:
    """`exist_ok="no"` is truthy: it appended a new run to an existing log."""
    import torch

    model = _seq()
    with pytest.raises(GradGuardError, match=f"{name} must be True or False; got str 'no'"):
        gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), **{name: "no"})


def test_a_home_relative_log_dir_is_expanded_not_a_folder_named_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = _seq()
    gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir="~/runs/a").close()
    assert (tmp_path / "home" / "runs" / "a" / "meta.json").exists() and not (tmp_path / "~").exists()


def test_a_snapshot_dir_that_is_a_file_is_refused_and_a_failed_write_does_not_stop_training(
    tmp_path: Path,
) -> None:
    """`snapshot_dir` a file: accepted, then FileExistsError at the first step killed the loop; an unwritable
    one (read-only, full disk) killed it too, leaving a half-written temp file."""
    import torch

    model = _seq()
    taken = tmp_path / "snap.txt"
    taken.write_text("mine")
    with pytest.raises(GradGuardError, match=r"snapshot_dir .*snap.txt' is a file, not a directory"):
        gradguard.Guard(
            model, torch.optim.SGD(model.parameters(), lr=0.1), on_nonfinite="rollback", snapshot_dir=taken
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, on_nonfinite="rollback", snapshot_every=1, snapshot_dir=taken / "sub")
    with pytest.warns(RuntimeWarning, match="cannot write the rollback snapshot into") as said:
        for step in range(4):
            _backward(model, opt, step)
            guard.step()
    guard.close()
    assert guard.step_count == 4 and taken.read_text() == "mine"
    assert len([w for w in said if "rollback snapshot" in str(w.message)]) == 1


def test_a_state_part_that_cannot_be_loaded_leaves_the_guard_as_it_was() -> None:
    """`anomaly="garbage"`: a raw TypeError, and the guard half-loaded (step count and clipper history applied)."""
    import torch

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    source = gradguard.Guard(model, opt, clip="autoclip")
    for step in range(5):
        _backward(model, opt, step)
        source.step()
    state = source.state_dict()
    source.close()
    fresh = gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), clip="autoclip")
    clean = fresh.state_dict()
    with pytest.raises(
        GradGuardError, match=r"Guard state's 'anomaly' part cannot be loaded .*nothing was loaded"
    ):
        fresh.load_state_dict({**state, "anomaly": "garbage"})
    assert fresh.step_count == 0 and str(fresh.state_dict()["clipper"]) == str(clean["clipper"])
    for bad in (None, "ckpt/guard.pt", model.state_dict()):
        with pytest.raises(GradGuardError, match=r"takes the dict state_dict|has no version"):
            fresh.load_state_dict(bad)  # type: ignore[arg-type]


def test_a_second_open_guard_on_one_optimizer_and_a_parameter_in_two_groups_are_said() -> None:
    """Both silently stepped the weights twice a step."""
    import torch

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = gradguard.Guard(model, opt)
    with pytest.warns(UserWarning, match="already has an open Guard: stepping both guards") as said:
        gradguard.Guard(model, opt)
    assert said[0].filename == __file__
    first.close()
    weight = next(model.parameters())
    rest = list(model.parameters())[1:]
    twice = torch.optim.SGD([{"params": rest}, {"params": [weight]}], lr=0.1)
    twice.param_groups[0]["params"].append(weight)  # by hand (torch refuses it in the constructor)
    with pytest.warns(
        UserWarning,
        match=r"1 parameter\(s\) appear more than once in the optimizer's param_groups \(0.weight\)",
    ):
        gradguard.Guard(model, twice)


def test_lbfgs_without_a_closure_and_a_scaler_that_scaled_nothing_are_refused_with_the_fix() -> None:
    """torch's own errors surfaced: "LBFGS.step() missing 1 required positional argument: 'closure'",
    "Attempted unscale_ but _scale is None"."""
    import torch

    model = _seq()
    opt = torch.optim.LBFGS(model.parameters())
    guard = gradguard.Guard(model, opt)
    loss = _backward(model, opt, 0)
    with pytest.raises(GradGuardError, match=r"LBFGS .* needs a closure: guard.step\(closure\)"):
        guard.step(loss)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    scaled = gradguard.Guard(model, sgd)
    loss = _backward(model, sgd, 0)
    with pytest.raises(
        GradGuardError, match=r"has not scaled any loss yet: call scaler.scale\(loss\).backward\(\)"
    ):
        scaled.step(loss, scaler=torch.amp.GradScaler("cpu"))


def test_a_buffer_holding_a_minus_inf_mask_is_not_a_bad_buffer_at_start(tmp_path: Path) -> None:
    """A causal attention mask registered as a buffer (-inf above the diagonal, what
    nn.Transformer.generate_square_subsequent_mask returns): it read "the buffers … already hold NaN or inf
    before the first step (a checkpoint loaded with them)", and under warnings.filterwarnings("error")
    gradguard run stopped guarding. A mask built as triu(ones) * -inf holds NaN (0 * -inf): still said."""
    import torch
    from torch import nn

    class Causal(nn.Module):
        def __init__(self, nan: bool) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            mask = (
                torch.triu(torch.ones(5, 5), 1) * float("-inf")
                if nan
                else torch.full((5, 5), -math.inf).triu(1)
            )
            self.register_buffer("mask", mask)

        def forward(self, x: Any) -> Any:
            return torch.softmax(self.proj(x) @ self.proj(x).transpose(-1, -2) + self.mask, -1).sum(-1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = Causal(nan=False)
        gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1)).close()
    model = Causal(nan=True)
    with pytest.warns(
        RuntimeWarning, match=r"the buffers mask already hold NaN .*torch.triu\(ones\) \* float\('-inf'\)"
    ):
        gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1)).close()


def test_a_users_unhashable_stateful_clipper_is_accepted() -> None:
    """A clipper that defines __eq__ (a dataclass) is unhashable: the registry of clipper owners must not
    make Guard() raise a TypeError for it."""
    import torch

    from gradguard.clip import NormClipper

    class Halving(NormClipper):
        kind = "halving-test"

        def __init__(self) -> None:
            self.seen = 0

        def __eq__(self, other: object) -> bool:  # (no __hash__: unhashable)
            return isinstance(other, Halving) and other.seen == self.seen

        def threshold(self, norm: Any) -> Any:
            self.seen += 1
            return norm / 2

        def state_dict(self) -> dict[str, Any]:
            return {**super().state_dict(), "seen": self.seen}

    model = _seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, clip=Halving())
    _backward(model, opt, 0)
    guard.step()
    guard.close()
