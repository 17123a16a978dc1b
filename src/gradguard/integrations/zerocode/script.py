"""``gradguard run SCRIPT``: the script as ``__main__`` under a :class:`ZeroCode`, its output and
exit code kept; the summary and the report also after Ctrl-C, SIGTERM or an uncaught exception."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard
from gradguard.errors import GradGuardError
from gradguard.guard import Guard, ended_by
from gradguard.integrations.zerocode._signals import Stopped, on_signal, watch
from gradguard.integrations.zerocode.live import rank
from gradguard.integrations.zerocode.runner import ZeroCode
from gradguard.integrations.zerocode.sessions import ManualUpdate

__all__ = ["check_options", "run_script"]


# ----------------------------------------------------------------------------- gradguard run
def run_script(
    path: str, argv: list[str], *, report: bool = True, module: bool = False, **options: Any
) -> int:
    """Run a script as ``__main__`` under :class:`ZeroCode`; its exit code, its output kept.

    gradguard's own messages go to stderr. With ``report`` (and plotly installed), ``report.html``
    is written into the run directory at exit — also after an uncaught exception, Ctrl-C or a
    SIGTERM (the process then ends by that signal, as the plain script would). With ``module``,
    ``path`` is a module name run as ``python -m`` runs it (the current directory first on the path,
    ``sys.argv[0]`` the module's file).
    """
    import runpy

    found = _module_file(path) if module else Path(path)
    if found is None or not found.is_file():
        what = f"no module named {path!r} here" if module else f"no such script {path!r}"
        how = (
            "pass an importable module (run from the folder that holds its package)"
            if module
            else (
                "pass the path of a Python training script (a package's module: gradguard run -m pkg.module)"
            )
        )
        print(f"gradguard run: {what}; {how}.", file=sys.stderr)
        return 2
    if not module and _binary(found):
        print(
            f"gradguard run: {path!r} is a program, not a Python script; pass the script itself: "
            f"gradguard run train.py ARGS (not gradguard run {os.path.basename(path)} train.py).",
            file=sys.stderr,
        )
        return 2
    script = found
    script_file = script.absolute()  # before the script changes directory (its traceback, its __file__)
    if options.get("monitor_only"):  # watching only: a bad step is reported, not skipped (as Lightning's)
        options.setdefault("on_nonfinite", "warn")
    check_options(options)  # a bad option is refused before the script starts, not at its first step
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv]
    sys.path.insert(0, os.getcwd() if module else str(script.resolve().parent))
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, on_signal)
    code: int = 0
    killed_by: int | None = None
    zc = ZeroCode(name=path if module else script.stem, scan_existing=False, **options)
    stop_watching = watch()  # a Ctrl-C Python swallowed in a callback is raised at the next step
    try:
        with zc:
            try:
                if module:
                    runpy.run_module(path, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(script_file), run_name="__main__")  # __file__ as python gives it
            except SystemExit as e:
                code = _exit_code(e)
                if code:
                    zc.ended(f"SystemExit: {e.code}")
            except Stopped as e:
                killed_by = e.signum
                zc.ended(f"killed by {signal.Signals(e.signum).name}")
            except KeyboardInterrupt as e:
                _print_script_error(e, script_file)
                killed_by = signal.SIGINT
                zc.ended("KeyboardInterrupt")
            except BaseException as e:
                _print_script_error(e, script_file)
                zc.ended(ended_by(e))
                if isinstance(e, ImportError) and "no known parent package" in str(e) and not module:
                    print(
                        f"gradguard run: {script} is a module of a package (relative imports): run it as "
                        "`python -m` would, `gradguard run -m package.module ARGS` from the package's folder.",
                        file=sys.stderr,
                    )
                code = 1
    finally:
        stop_watching()
        sys.argv, sys.path[:] = old_argv, old_path
        if signal.getsignal(signal.SIGTERM) is on_signal:
            signal.signal(signal.SIGTERM, previous)
    if rank() == 0:  # under torchrun rank 0 speaks and writes the report, as it writes the log
        if not _print_summary(zc):
            killed_by = signal.SIGINT  # a Ctrl-C during the summary: the run ends by it
            report = False
        if report and zc.sessions and not _write_report(zc.out) and killed_by is None:
            killed_by = signal.SIGINT  # a Ctrl-C during the report: the run ends by it, as Python's would
    if killed_by is not None:  # end the way the plain script would have: by that signal
        sys.stderr.flush()
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    return code


def _print_summary(zc: Any) -> bool:
    """Print the run's summary on stderr; ``False`` when a Ctrl-C came while it was made (a second one after
    the script's): one line with the commands that say the rest, not gradguard's traceback."""
    try:
        print(zc.summary(), file=sys.stderr)
    except KeyboardInterrupt:
        out = shlex.quote(str(zc.out))
        print(
            f"\ngradguard: summary and report not written (interrupted): gradguard diagnose {out}; "
            f"gradguard report {out}",
            file=sys.stderr,
        )
        return False
    return True


def _binary(path: Path) -> bool:
    """Whether ``path`` is a compiled program (the Python interpreter passed as the script), not source."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith((b"\x7fELF", b"MZ", b"\xcf\xfa\xed\xfe")) or b"\x00" in head


def _module_file(name: str) -> Path | None:
    """The file ``python -m name`` would run (a package's ``__main__``), found from the current
    directory as ``python -m`` looks; ``None`` when there is no such module."""
    import importlib.util

    sys.path.insert(0, os.getcwd())
    try:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:  # a package: its __main__
            spec = importlib.util.find_spec(f"{name}.__main__")
    except (ImportError, ValueError):
        spec = None
    finally:
        sys.path.pop(0)
    return Path(spec.origin) if spec is not None and spec.origin else None


def check_options(options: dict[str, Any]) -> None:
    """Refuse bad Guard options now (:class:`GradGuardError`, the guard's own message): a guard is
    built on a stand-in model with them (no run log) and closed."""
    guard_options = {k: v for k, v in options.items() if k not in ("out", "name", "live")}
    guard_options.setdefault("clip", "none")
    probe = nn.Linear(1, 1)
    guard = Guard(probe, ManualUpdate(probe.parameters()), log_dir=None, **guard_options)
    guard.close()


def _print_script_error(error: BaseException, script: Path) -> None:
    """The traceback Python prints for the script run plainly: from the script's first frame (the
    frames of gradguard's runner and runpy above it left out); all of it if the script has none.
    gradguard's own stop (a :class:`GradGuardError` raised in the step, e.g. 10 skipped steps in a
    row) ends at the script's call that stepped (``optimizer.step()``): the frames of torch's
    dispatch and of gradguard below it say nothing the message does not."""
    target = os.path.realpath(script)
    tb = error.__traceback__
    while tb is not None and os.path.realpath(tb.tb_frame.f_code.co_filename) != target:
        tb = tb.tb_next
    if tb is None and isinstance(error, SyntaxError) and os.path.realpath(error.filename or "") == target:
        print("".join(traceback.format_exception_only(type(error), error)), end="", file=sys.stderr)
        return  # the script does not compile: Python prints the error alone, with no frame of its own
    tb = tb if tb is not None else error.__traceback__
    if not isinstance(error, GradGuardError):
        traceback.print_exception(type(error), error, tb)
        return
    frames = traceback.extract_tb(tb)
    while len(frames) > 1 and _inside_torch_or_gradguard(frames[-1].filename):
        frames = traceback.StackSummary.from_list(frames[:-1])
    print("Traceback (most recent call last):", file=sys.stderr)
    print("".join(frames.format()), end="", file=sys.stderr)
    print("".join(traceback.format_exception_only(type(error), error)), end="", file=sys.stderr)


_LIBRARIES = tuple(
    os.path.realpath(os.path.dirname(m.__file__)) + os.sep for m in (torch, gradguard) if m.__file__
)


def _inside_torch_or_gradguard(filename: str) -> bool:
    return os.path.realpath(filename).startswith(_LIBRARIES)


def _exit_code(e: SystemExit) -> int:
    """The exit status of ``sys.exit(code)`` as Python gives it (a message is printed, status 1)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _write_report(run_dir: Path) -> bool:
    """Write the run's report; ``False`` where a Ctrl-C (a second one, after the script's) stopped it:
    one line says so, with the command that writes it later (the run log is whole), no traceback."""
    try:
        from gradguard.report import write_report
    except ImportError:  # the report extra is optional
        return True
    try:
        path = write_report(run_dir)
    except KeyboardInterrupt:
        print(
            f"gradguard: report not written (interrupted): {shlex.join(['gradguard', 'report', str(run_dir)])}",
            file=sys.stderr,
        )
        return False
    except Exception as e:  # a report must never turn a finished run into a failure
        print(f"gradguard: could not write the report ({e}).", file=sys.stderr)
        return True
    print(f"gradguard: report: {path}", file=sys.stderr)
    return True
