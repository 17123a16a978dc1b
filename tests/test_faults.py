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

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gradguard
from gradguard import runlog
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
    (run / "meta.json").write_text('{"layers": ' + "[" * DEEP + "]" * DEEP + "}")
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
    (run / "meta.json").write_text("[" * DEEP + "]" * DEEP)
    findings = diagnose(run)
    assert "nested too deeply" in report.render_html(run)
    out = io.StringIO()
    report.print_summary(read_run(run), findings, file=out)
    assert "nested too deeply" in out.getvalue()


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

# (cases added by the CLIP part)
