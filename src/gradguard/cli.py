"""The ``gradguard`` command line: ``demo``, ``run``, ``tune``, ``diagnose`` and ``report``.

``gradguard run [OPTIONS] SCRIPT [ARGS...]`` exits with the script's own exit code (1 if it raised;
2 if SCRIPT does not exist, an option is bad, or PyTorch is not installed).

Exit codes of ``gradguard demo [NAME] [--out DIR] [--seed N]``: 0 — every configuration ran and the
report was written; 1 — the report could not be written (plotly missing); 2 — an unknown scenario,
``--out`` names a file or a folder that is not empty (the demo never writes into earlier runs), or
PyTorch is not installed.

Exit codes of ``gradguard diagnose RUN_DIR [--json]``:

* 0 — the run was read and no finding has severity ``error``;
* 1 — at least one finding has severity ``error`` (non-finite steps, an explosion, a divergence,
  heavy over-clipping, a loss-scale collapse): scripts and CI can stop on it;
* 2 — bad usage, or no run at ``RUN_DIR`` (the message says what was expected).

Exit codes of ``gradguard report RUN_DIR [-o FILE]``: 0 — the report was written (an earlier
gradguard report there is replaced atomically, and the command says so); 2 — bad usage, no run at
``RUN_DIR``, a file there that is not gradguard's report (never replaced), or plotly missing
(``pip install 'gradguard[report]'``).

``RUN_DIR`` is a run directory, or a folder of runs: ``diagnose`` then reads the newest run
(``runlog.find_runs``); ``report`` writes one page holding every run of the folder.

``diagnose`` and ``report`` only read files and work where PyTorch is not installed: this module
imports what needs torch only inside ``run``, ``tune`` and ``demo`` (tests/test_architecture.py holds it to that).

Exit codes of ``gradguard tune SCRIPT [--max-norm LIST] [--lr LIST|auto] [--steps N] [--run RUN_DIR]``: 0 — a
candidate trained (the verified recommendation is printed); 1 — none of the candidates trained;
2 — bad usage (no such script, a bad list, a script that takes no step), or PyTorch missing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from gradguard._version import __version__
from gradguard.errors import GradGuardError
from gradguard.safetext import safe_text

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"gradguard: error: {safe_text(message)}", file=sys.stderr)
    return EXIT_USAGE


def _no_torch(command: str, error: ModuleNotFoundError) -> int:
    """The usage error of ``run`` and ``demo`` where PyTorch is not installed (another missing module raises)."""
    if error.name != "torch":
        raise error
    return _fail(
        f"gradguard {command} trains with PyTorch, which is not installed here ({error}); install it "
        "(pip install torch). `gradguard diagnose` and `gradguard report` work without it."
    )


def _demo(args: argparse.Namespace) -> int:
    try:
        from gradguard.demos import run_demo
    except ModuleNotFoundError as e:
        return _no_torch("demo", e)
    return run_demo(args.name, out=args.out, seed=args.seed, steps=args.steps)


def _diagnose(args: argparse.Namespace) -> int:
    import json

    from gradguard.diagnose import diagnose, to_json, write_findings
    from gradguard.errors import GradGuardError
    from gradguard.runlog import FINDINGS_FILE, find_runs, in_use, is_run_dir, read_run, to_jsonable

    try:
        log = read_run(args.run_dir, records=False)  # the run table only: memory bounded by its columns
    except GradGuardError as e:
        return _fail(str(e))
    if (
        not is_run_dir(args.run_dir)
        and not os.path.isfile(args.run_dir)
        and log.path.parent.resolve() != log.path.resolve()
    ):
        count = len(find_runs(log.path.parent))
        if count > 1:
            print(f"gradguard: reading the newest of {count} runs: {safe_text(log.path)}", file=sys.stderr)
    findings = diagnose(log)
    written = False
    if not args.no_write and in_use(log.path):  # a snapshot: its findings.json would stay stale after the run
        print(
            f"gradguard: {FINDINGS_FILE} not written: the run is still being written (a live writer holds "
            f"{safe_text(log.path)}), so these findings are a snapshot; diagnose it again once it has ended.",
            file=sys.stderr,
        )
    elif not args.no_write:
        with _warnings_said() as caught:
            write_findings(log, findings)
        written = not caught
    if args.json:
        print(json.dumps(to_jsonable(to_json(findings, log)), indent=2, allow_nan=False))
    else:
        from gradguard.report import print_summary

        print_summary(_run_of(log, findings), findings)
        report = f"HTML report: {_command('gradguard', 'report', log.path)}"
        if written:
            print(f"findings: {safe_text(log.path / FINDINGS_FILE)}; {report}")
        elif not args.no_write:  # not written (a live run, a read-only folder): no path claimed
            print(report)
    return EXIT_FINDINGS if any(f.severity == "error" for f in findings) else EXIT_OK


@contextlib.contextmanager
def _warnings_said() -> Iterator[list[warnings.WarningMessage]]:
    """The Python warnings raised inside, each said on stderr as a line of gradguard's own
    (``gradguard: warning: …``, no file and line of gradguard's source) once the block ends."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for w in caught:
        print(f"gradguard: warning: {safe_text(w.message)}", file=sys.stderr)


def _command(*words: object) -> str:
    """A command to print as a hint, quoted so that it pastes into a shell (a path with a space, a
    quote, a non-ASCII letter) and made safe to show (:func:`safe_text`)."""
    return safe_text(shlex.join(str(w) for w in words))


def _run_of(log: Any, findings: Sequence[Any]) -> Any:
    """The run whose numbers the summary shows: the leading finding's optimizer's (several optimizers: the
    one that failed first leads; its steps, clipping and first non-finite step, not the first optimizer's)."""
    from pathlib import Path

    from gradguard.runlog import read_run

    run_dir = findings[0].evidence.get("run_dir") if findings else None
    if not isinstance(run_dir, str) or Path(run_dir).resolve() == log.path.resolve():
        return log
    try:
        return read_run(run_dir, records=False)
    except GradGuardError:
        return log


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gradguard.errors import GradGuardError
    from gradguard.report import refuse_to_replace, write_report
    from gradguard.runlog import REPORT_FILE, find_runs, is_run_dir

    src = Path(args.run_dir)
    if not src.exists():
        return _fail(
            f"no run log at {str(src)!r}: the path does not exist; pass a run directory "
            "(with meta.json / metrics.jsonl / events.jsonl) or a folder of runs such as gradguard-runs/."
        )
    if args.out is not None:
        planned = Path(args.out) / REPORT_FILE if Path(args.out).is_dir() else Path(args.out)
    elif src.is_dir() and (is_run_dir(src) or len(find_runs(src)) > 1):
        planned = src / REPORT_FILE
    else:
        planned = None  # a folder holding one run: its run directory decides
    existed = planned is not None and planned.exists()
    try:
        if planned is not None:
            refuse_to_replace(planned)  # before the work of the report
        path = write_report(src, args.out)
    except GradGuardError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"could not write the report ({e}); pass -o FILE in a folder you can write to.")
    print(f"report: {safe_text(path)}" + (" (replaced the existing file)" if existed else ""))
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    launcher = None if args.module else _launcher(args)
    if launcher is not None:  # before torch is imported: nothing of the launcher is run
        return _fail(launcher)
    try:
        from gradguard.integrations.zerocode import run_script
    except ModuleNotFoundError as e:
        return _no_torch("run", e)

    options = {dest: getattr(args, dest) for dest in RUN_GUARD_OPTIONS if hasattr(args, dest)}
    script = _folder_main(args.script) if not args.module else args.script
    problem = (
        (_module_problem(script) if args.module else _script_problem(script))
        or _monitor_only_conflict(options)
        or _flags_without_effect(options)
        or _snapshot_dir_problem(options.get("snapshot_dir"))
    )
    if problem is not None:
        return _fail(problem)
    if args.out is not None:
        options["out"] = args.out
        from pathlib import Path

        from gradguard.runlog import check_run_dir, refuse_existing

        try:  # before the script runs (its data may take long to load)
            check_run_dir(args.out)
            if not options.get("exist_ok"):
                refuse_existing(
                    Path(args.out),
                    "pass a new --out (or none: a new folder under gradguard-runs/), or --exist-ok",
                )
        except GradGuardError as e:
            return _fail(str(e))
    if args.quiet:
        options["live"] = False
    try:
        with _argparse_leftovers() as parses:
            code = run_script(
                script, list(args.args), report=not args.no_report, module=args.module, **options
            )
    except GradGuardError as e:  # a bad option, refused before the script starts
        return _fail(_with_flag(str(e)))
    said = _misplaced(args, parses)
    if said is not None:
        print(f"gradguard: warning: {safe_text(said)}", file=sys.stderr)
    return code


def _options_after_script(args: argparse.Namespace) -> list[tuple[int, list[str]]]:
    """``gradguard run``'s own options typed after SCRIPT (up to a ``--``), each with its value, by where
    it starts in the script's arguments: they went to the script, and ``gradguard run`` never reads those."""
    flags: dict[str, bool] = args.own_flags
    words: list[str] = list(args.args)
    found, i = [], 0
    while i < len(words) and words[i] != "--":
        flag = words[i].partition("=")[0]
        if flag not in flags:
            i += 1
            continue
        end = i + 1 + (flags[flag] and "=" not in words[i] and i + 1 < len(words))
        found.append((i, words[i:end]))
        i = end
    return found


@contextlib.contextmanager
def _argparse_leftovers() -> Iterator[list[list[str]]]:
    """While ``gradguard run`` runs the script: what each argparse parse of the script's command line left
    over (``parse_known_args`` returns it, ``parse_args`` stops on it), one list a parse."""
    parses: list[list[str]] = []
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        found = original(self, args, namespace)
        if args is None or list(args) == sys.argv[1:]:
            parses.append(list(found[1]))
        return found

    argparse.ArgumentParser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    try:
        yield parses
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]


def _misplaced(args: argparse.Namespace, parses: list[list[str]]) -> str | None:
    """Why gradguard's options typed after SCRIPT were not applied, with the command that applies them;
    ``None`` where there are none, or where the script's argparse took them (its own ``--out``).
    ``parses``: what each argparse parse of the script's command line left over."""

    def left_over(flag: str) -> bool:
        return all(flag in {w.partition("=")[0] for w in p} for p in parses)

    left = [(i, words) for i, words in _options_after_script(args) if left_over(words[0].partition("=")[0])]
    if not left:
        return None
    flags = ", ".join(words[0].partition("=")[0] for _, words in left)
    them = "it" if len(left) == 1 else "them"
    why = (
        f"its argparse left {them} over (parse_known_args): neither the script nor gradguard applied {them}"
        if parses
        else f"gradguard did not apply {them} (if the script takes {flags} itself, ignore this)"
    )
    skip = {i + k for i, words in left for k in range(len(words))}
    rest = [w for k, w in enumerate(args.args) if k not in skip]
    moved = [w for _, words in left for w in words]
    command = shlex.join(["gradguard", "run", *_run_options(args), *moved, args.script, *rest])
    return (
        f"{flags} came after the script, so {them} went to the script as its own argument{'s' * (len(left) > 1)}, "
        f"and {why}. gradguard's options go before the script: {command}"
    )


def _snapshot_dir_problem(folder: str | None) -> str | None:
    """Why ``--snapshot-dir DIR`` cannot hold the rollback snapshot (a file, a path below a file, a folder
    that cannot be written), said before the script starts: the guard's first snapshot would otherwise
    end the run at its first step. ``None`` when DIR can be made and written (or is not given)."""
    if folder is None:
        return None
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"--snapshot-dir {shlex.quote(folder)} is a file, not a folder; pass a folder (it is created if missing)."
    above = os.path.abspath(folder)
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        return f"--snapshot-dir {shlex.quote(folder)} cannot be created: {above!r} is a file; pass a folder path."
    if not os.access(above, os.W_OK | os.X_OK):
        return (
            f"--snapshot-dir {shlex.quote(folder)} cannot be written: {above!r} is not writable (a read-only "
            "folder or file system); pass a --snapshot-dir in a folder you can write to."
        )
    return None


def _folder_main(script: str) -> str:
    """A folder's ``__main__.py``, which ``python FOLDER`` runs (with the folder first on the path, as
    gradguard run puts a script's folder); any other SCRIPT as it is."""
    main = os.path.join(script, "__main__.py")
    return main if os.path.isdir(script) and os.path.isfile(main) else script


def _script_problem(script: str) -> str | None:
    """Why SCRIPT is no script Python runs (a folder with no ``__main__.py``, a Jupyter notebook);
    ``None`` otherwise."""
    if os.path.isdir(script):
        return (
            f"{script!r} is a folder with no __main__.py, not a script; pass the training script in it "
            f"(gradguard run {os.path.join(script, 'train.py')} ARGS), or its package's module with -m."
        )
    if script.lower().endswith(".ipynb"):
        exported = os.path.splitext(script)[0] + ".py"
        return (
            f"{script!r} is a Jupyter notebook, not a Python script (python cannot run it, nor can gradguard "
            f"run). Export it: jupyter nbconvert --to script {shlex.quote(script)}, then gradguard run "
            f"{shlex.quote(exported)} ARGS; or guard the loop in the notebook itself with gradguard.Guard "
            "(README: Use)."
        )
    return None


def _module_problem(name: str) -> str | None:
    """Why ``-m NAME`` names no module ``python -m`` runs, where Python says more than "no module":
    a file name (``train.py``: not imported, it would run unguarded) or a package with no ``__main__``."""
    if name.endswith(".py"):
        return (
            f"-m takes a module name, not a file: {name!r}; pass -m {name[:-3].replace(os.sep, '.')} "
            f"(the name without .py), or the file without -m: gradguard run {name}"
        )
    import importlib.util

    sys.path.insert(0, os.getcwd())  # where python -m looks first
    try:
        spec = importlib.util.find_spec(name)
        package = spec is not None and spec.submodule_search_locations is not None
        runnable = not package or importlib.util.find_spec(f"{name}.__main__") is not None
    except (ImportError, ValueError):
        return None  # gradguard run says there is no such module
    finally:
        sys.path.pop(0)
    if runnable:
        return None
    return (
        f"{name!r} is a package and cannot be directly executed: it has no __main__.py (python -m {name} "
        f"says the same); pass the module of it that trains, e.g. gradguard run -m {name}.train ARGS."
    )


#: Programs given as ``gradguard run``'s SCRIPT that start the script themselves: their name → (the words
#: of the program before its options, the words that make it run a module). gradguard goes inside them.
_LAUNCHERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "torchrun": ((), ("-m",)),
    "accelerate": (("launch",), ("-m",)),
    "deepspeed": ((), ("--module",)),
}


def _launcher(args: argparse.Namespace) -> str | None:
    """Why SCRIPT is a launcher (``torchrun``, ``accelerate launch``, ``deepspeed``) or the Python
    interpreter, not a training script, with the command that guards the run; ``None`` otherwise.
    Under ``gradguard run`` a launcher starts the script in processes of its own, unguarded."""
    name = os.path.basename(args.script)
    words = list(args.args)
    if re.fullmatch(r"python[0-9.]*(\.exe)?", name):
        how, words = ["gradguard", "run"], words[words[:1] == ["-u"] :]
        what = f"{name!r} is the Python interpreter, not a training script (gradguard run is Python); pass the script"
    elif name in _LAUNCHERS and tuple(words[: len(head := _LAUNCHERS[name][0])]) == head:
        module = _LAUNCHERS[name][1]
        k = next((i for i, w in enumerate(words) if w.endswith(".py")), len(words))
        how, words = [args.script, *words[:k], *module, "gradguard", "run"], words[k:]
        what = (
            f"{name} is a launcher, not a training script: under gradguard run its workers would train "
            "unguarded; put gradguard inside the launcher"
        )
    else:
        return None
    return f"{what}: {shlex.join([*how, *_run_options(args), *(words or ['SCRIPT'])])}"


def _run_options(args: argparse.Namespace) -> list[str]:
    """The words of ``gradguard run``'s own options as typed (those before SCRIPT)."""
    typed: list[str] = args.typed
    end = len(typed) - len(args.args) - 1  # SCRIPT, then its REMAINDER
    return typed[typed.index("run") + 1 : end]


#: What ``--monitor-only`` leaves each flag that acts on a step (the Guard's rule, said with run's flags).
_MONITOR_ONLY_ALLOWS: dict[str, tuple[str, ...]] = {
    "clip": ("none",),
    "on_nonfinite": ("warn", "raise"),
    "on_spike": ("warn", "ignore"),
    "on_explosion": ("warn", "ignore"),
}


def _flag(dest: str) -> str:
    """The ``gradguard run`` flag of a Guard setting: ``on_nonfinite`` → ``--on-nonfinite``."""
    return next(flag for flag, name, _ in _RUN_GUARD_FLAGS if name == dest)


def _monitor_only_conflict(options: dict[str, Any]) -> str | None:
    """Why ``--monitor-only`` cannot go with a flag given that acts on a step, said with the flags
    (the Guard's own refusal names its Python arguments); ``None`` when nothing conflicts."""
    if not options.get("monitor_only"):
        return None
    for dest, allowed in _MONITOR_ONLY_ALLOWS.items():
        value = options.get(dest)
        if value is not None and str(value).strip().lower() not in allowed:
            flag = _flag(dest)
            return (
                f"--monitor-only never touches a step, so {flag} must be {' or '.join(allowed)} with it; got "
                f"{flag} {value}. Drop {flag} {value} (or pass {flag} {allowed[0]}), or drop --monitor-only "
                "to let gradguard act on the steps."
            )
    return None


def _flags_without_effect(options: dict[str, Any]) -> str | None:
    """Why flags given would be ignored (rollback settings with no rollback, ``--max-replays`` with
    ``--no-locate``), with the flag they need; ``None`` when each flag given acts."""
    from gradguard.integrations.zerocode import ROLLBACK_SETTINGS  # (run only: the guard's own list)

    given = [_flag(dest) for dest in ROLLBACK_SETTINGS if dest in options]
    rolls_back = options.get("on_nonfinite") == "rollback" or options.get("on_explosion") == "recover"
    if given and not rolls_back:
        flags = ", ".join(given)
        return (
            f"{flags} {'acts' if len(given) == 1 else 'act'} only when gradguard rolls back, and this run never "
            "does (neither --on-nonfinite rollback nor --on-explosion recover was given): add --on-nonfinite "
            f"rollback (or --on-explosion recover), or drop {flags}."
        )
    if "max_replays" in options and options.get("locate") is False:
        return (
            "--max-replays bounds the replays that locate a bad step, and --no-locate turns locating off: "
            "drop --no-locate to locate, or drop --max-replays."
        )
    return None


def _with_flag(message: str) -> str:
    """A Guard's refusal of one setting, said with its ``run`` flag: "every must be …" → "--every must be …"."""
    for flag, dest, _ in _RUN_GUARD_FLAGS:
        if message.startswith(f"{dest} must "):
            return flag + message[len(dest) :]
    return message


def _tune(args: argparse.Namespace) -> int:
    """``gradguard tune SCRIPT``: one short trial of the script per candidate threshold; the table and
    the verified recommendation (exit 0), or that none of the candidates trained (exit 1)."""
    try:
        from gradguard.integrations.tune_script import tune_script
    except ModuleNotFoundError as e:
        return _no_torch("tune", e)
    problem = _tune_out_problem(args)
    if problem is not None:
        return _fail(problem)
    try:
        with _warnings_said():
            result = tune_script(
                args.script,
                list(args.args),
                max_norms=args.max_norm,
                steps=args.steps,
                run=args.run,
                out=args.out,
                timeout_s=args.timeout,
                lrs=args.lr,
            )
    except GradGuardError as e:
        return _fail(str(e))
    for line in result.summary().splitlines():
        print(safe_text(line))
    if args.run is not None:
        where = _run_dir_of(args.run)
        print(
            f"tune.json written into {safe_text(where)}: `{_command('gradguard', 'diagnose', where)}` now quotes it"
        )
    return EXIT_OK if result.recommended is not None else EXIT_FINDINGS


def _run_dir_of(path: str) -> str:
    """The run directory ``path`` names, as the reader takes it: a file of a run → its folder; a folder
    of runs → the newest run in it."""
    from gradguard.runlog import find_runs, is_run_dir

    where = (os.path.dirname(path) or ".") if os.path.isfile(path) else path
    if not is_run_dir(where) and (runs := find_runs(where)):
        return str(runs[0])
    return where


def _tune_out_problem(args: argparse.Namespace) -> str | None:
    """Why ``tune --out DIR`` cannot take DIR: it holds a run log that ``--run`` does not name (tune
    would replace its ``tune.json``, which ``gradguard diagnose`` reads as that run's verification)."""
    from gradguard.runlog import is_run_dir

    if args.out is None or not is_run_dir(args.out):
        return None
    if args.run is not None and os.path.realpath(_run_dir_of(args.run)) == os.path.realpath(args.out):
        return None  # the run being tuned: its tune.json is what --run writes anyway
    return (
        f"--out {shlex.quote(args.out)} holds a run log (a run directory): tune would write its trials there and "
        "replace its tune.json, which `gradguard diagnose` reads as the verification of that run's advice. Pass "
        "a new --out folder for the trials (or none: gradguard-runs/<time>-tune-<script>); to verify that "
        f"run's advice, pass --run {shlex.quote(args.out)} instead."
    )


def _positive(part: str, expected: str, what: str, fix: str = "") -> float:
    """A positive finite number (one item of ``_thresholds``, ``_rates``; ``_seconds``); ``what`` names
    it in the error, ``fix`` ends the error."""
    try:
        value = float(part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {part!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{what} must be a positive finite number, got {part!r}{fix}")
    return value


def _seconds(text: str) -> float:
    """An argparse type: ``--timeout`` seconds, a positive finite number."""
    fix = "; it is how long one trial may run (e.g. 600), leave --timeout out for no limit"
    return _positive(text.strip(), "a number of seconds, e.g. 600", "the timeout", fix)


def _thresholds(text: str) -> list[float | None]:
    """An argparse type: ``0.5,1,2,none`` → ``[0.5, 1.0, 2.0, None]`` (positive finite numbers)."""
    out: list[float | None] = []
    for part in text.split(","):
        part = part.strip()
        if part.lower() == "none":
            out.append(None)
            continue
        out.append(_positive(part, "numbers or none separated by commas", "every threshold"))
    return out


def _rates(text: str) -> list[float] | str:
    """An argparse type: ``1e-3,3e-4`` → ``[0.001, 0.0003]`` (positive finite numbers), or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    out: list[float] = []
    for part in text.split(","):
        expected = "learning rates separated by commas (e.g. 1e-3,3e-4) or auto"
        out.append(_positive(part.strip(), expected, "every learning rate"))
    return out


def _add_script_arguments(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    """What ``run`` and ``tune`` end with: ``SCRIPT [ARGS...]`` (the script's arguments kept as they
    are) and the command's function."""
    parser.add_argument("script", metavar="SCRIPT", help="the training script")
    rest = parser.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's own arguments (optional)"
    )
    rest.required = False  # argparse requires a positional REMAINDER: "required: SCRIPT, ARGS"
    parser.set_defaults(func=func)


def _add_tune_parser(sub: Any) -> None:
    tune = sub.add_parser(
        "tune",
        help="verify candidate clip thresholds or learning rates on an unmodified training script (exit 1 if none trains)",
        description="Run SCRIPT once per candidate max_norm (or --lr learning rate) for a few dozen optimizer steps "
        "(each in a fresh process, under the zero-code runner, RNGs seeded to 0, the script's own clipping replaced "
        "by the candidate's; with --lr alone, kept), judge "
        "each trial (did the loss fall, without a non-finite step or an explosion of the norm?) and print a "
        "table and the verified recommendation. With --run, tune.json goes into that run directory and "
        "`gradguard diagnose` quotes it. Exit codes: 0 a candidate trained, 1 none did, 2 bad usage.",
    )
    tune.add_argument(
        "--max-norm",
        type=_thresholds,
        default=None,
        metavar="LIST",
        help="thresholds to try, e.g. 0.5,1,2,none (default: a ladder around the norms of --run, or of an "
        "unclipped probe trial)",
    )
    tune.add_argument(
        "--lr",
        type=_rates,
        default=None,
        metavar="LIST",
        help="learning rates to try, e.g. 1e-3,3e-4,1e-4, or auto (the script's own rate and 7 halvings below it); "
        "each trial keeps the script's own clipping unless --max-norm is given too",
    )
    tune.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="optimizer steps per trial (default 30; with --run, past the step where that run went "
        "non-finite, at most 300)",
    )
    tune.add_argument(
        "--run",
        default=None,
        metavar="RUN_DIR",
        help="a run directory of this script: candidates from its healthy norms; tune.json written there",
    )
    tune.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="the folder of the trials' run directories (default: gradguard-runs/<time>-tune-<script>)",
    )
    tune.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="give up on a trial after S seconds; a trial that timed out is not judged (default: no limit)",
    )
    _add_script_arguments(tune, _tune)


def _number_or_none(kind: type) -> Callable[[str], object]:
    """An argparse type: ``none`` → ``None``, else ``kind(text)``."""

    def parse(text: str) -> object:
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or none, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


#: The options of ``gradguard run`` that go to every :class:`gradguard.Guard` it makes:
#: ``(flag, Guard parameter, argparse settings)``. An option not given is not passed, so the
#: guard's own default applies (one owner: ``Guard.__init__``); ``--clip`` alone has a default of
#: its own under ``run`` (``none``: measure, let the script clip). tests/test_run_cli.py checks
#: that every Guard policy is here, under its own name.
_RUN_GUARD_FLAGS: tuple[tuple[str, str, dict[str, object]], ...] = (
    (
        "--clip",
        "clip",
        dict(
            metavar="SPEC",
            help="clip spec: none (default under run: measure only, the script's "
            "own clipping stays), auto, norm:5, autoclip:10, zclip, agc:0.01, value:1, layer:1; anything but none "
            "replaces the script's clip_grad_norm_ / clip_grad_value_",
        ),
    ),
    (
        "--on-nonfinite",
        "on_nonfinite",
        dict(
            choices=["skip", "rollback", "raise", "warn"],
            help="what a "
            "non-finite step does (Guard's default: skip — parameters and optimizer state untouched)",
        ),
    ),
    (
        "--on-spike",
        "on_spike",
        dict(
            choices=["ignore", "warn", "clip", "skip"],
            help="what a finite norm spike does (Guard's default: warn)",
        ),
    ),
    (
        "--on-explosion",
        "on_explosion",
        dict(
            choices=["ignore", "warn", "recover"],
            help="what the onset of an explosion of the gradient norm does (Guard's default: ignore); "
            "recover: rewind to the last snapshot before it, clip harder from then on, go on",
        ),
    ),
    ("--spike-z", "spike_z", dict(type=float, metavar="Z", help="the z-score of a spike")),
    ("--every", "every", dict(type=int, metavar="N", help="flush interval in steps")),
    (
        "--layer-every",
        "layer_every",
        dict(
            type=_number_or_none(int), metavar="N|none", help="record per-layer gradient norms every N steps"
        ),
    ),
    (
        "--weight-every",
        "weight_every",
        dict(
            type=_number_or_none(int),
            metavar="N|none",
            help="measure weight norms and update ratios every N steps (none: never)",
        ),
    ),
    ("--snapshot-every", "snapshot_every", dict(type=int, metavar="N", help="rollback snapshot cadence")),
    ("--snapshot-dir", "snapshot_dir", dict(metavar="DIR", help="also write the rollback snapshot here")),
    (
        "--lr-backoff",
        "lr_backoff",
        dict(
            type=_number_or_none(float),
            metavar="F|none",
            help="multiply the learning rate by F after a rollback",
        ),
    ),
    (
        "--min-lr",
        "min_lr",
        dict(type=float, metavar="LR", help="the learning rate a backoff never goes below"),
    ),
    (
        "--max-rollbacks",
        "max_rollbacks",
        dict(
            type=_number_or_none(int),
            metavar="N|none",
            help="stop the run after this many rollbacks within --rollback-window steps",
        ),
    ),
    (
        "--rollback-window",
        "rollback_window",
        dict(type=int, metavar="N", help="the window of --max-rollbacks"),
    ),
    (
        "--max-consecutive",
        "max_consecutive",
        dict(type=int, metavar="N", help="stop the run after N skipped steps in a row"),
    ),
    ("--norm-type", "norm_type", dict(type=float, metavar="P", help="p of the gradient norms (inf allowed)")),
    (
        "--loss-scale-floor",
        "loss_scale_floor",
        dict(type=float, metavar="S", help="a GradScaler scale below S is a loss-scale collapse"),
    ),
    ("--max-replays", "max_replays", dict(type=int, metavar="N", help="replay at most N anomalous steps")),
    (
        "--no-locate",
        "locate",
        dict(action="store_false", help="do not locate non-finite values (no capture of the model's inputs)"),
    ),
    (
        "--monitor-only",
        "monitor_only",
        dict(
            action="store_true",
            help="only measure, log and locate: never skip, clip or touch a step (the script's own clipping "
            "stays); --on-nonfinite then defaults to warn (raise also allowed)",
        ),
    ),
    (
        "--rank-logs",
        "rank_logs",
        dict(action="store_true", help="under torch.distributed, every rank writes a log"),
    ),
    ("--exist-ok", "exist_ok", dict(action="store_true", help="append to an existing run directory")),
)
RUN_GUARD_OPTIONS: tuple[str, ...] = tuple(dest for _, dest, _ in _RUN_GUARD_FLAGS)


def _add_run_parser(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run an unmodified training script under the guard (no code change)",
        description="Run SCRIPT as __main__ with a gradguard.Guard on every optimizer it steps (and every model "
        "it updates by hand), through torch's global hooks: nothing is put on the script's objects, so what it "
        "saves is what it saves without gradguard. Norms are measured before the script's own clipping, the "
        "first non-finite value is located, bad steps are handled per --on-nonfinite, and the run directory "
        "and report are written (also on Ctrl-C, SIGTERM or an exception). The script's output and exit code "
        "are kept; gradguard's messages go to stderr. When the guard itself stops the run (--on-nonfinite "
        "raise, --max-consecutive, --max-rollbacks) it raises NonFiniteError inside the script: exit code 1, "
        "as for any uncaught exception. Guard options not given keep the guard's defaults. A script that builds a "
        "lightning.Trainer gets gradguard's Lightning callback attached (its gradient_clip_val stays); a skipped "
        "step does not advance a Lightning or transformers.Trainer LR schedule. Under "
        "torchrun: `torchrun --nproc-per-node N -m gradguard run SCRIPT` (rank 0 writes the run log).",
    )
    run.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="the run directory (default: gradguard-runs/<time>-<script>)",
    )
    for flag, dest, settings in _RUN_GUARD_FLAGS:
        default = "none" if dest == "clip" else argparse.SUPPRESS
        run.add_argument(flag, dest=dest, default=default, **settings)  # type: ignore[arg-type]
    run.add_argument("--no-report", action="store_true", help="do not write report.html at exit")
    run.add_argument("--quiet", action="store_true", help="no live lines on stderr while the script runs")
    run.add_argument(
        "-m",
        dest="module",
        action="store_true",
        help="SCRIPT is a module, run as `python -m SCRIPT` would (e.g. `gradguard run -m mypkg.train --epochs 1`)",
    )
    _add_script_arguments(run, _run)
    run.set_defaults(own_flags=_long_flags(run))


def _long_flags(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """The parser's own ``--flags`` (not ``--help``), each with whether it takes a value."""
    return {
        flag: action.nargs != 0
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }


class _Parser(argparse.ArgumentParser):
    """argparse, reading every word that starts with a minus and a digit (``-1e-3``, ``-0.5,1``) as a
    value, not an unknown flag (argparse's own rule takes only ``-1`` and ``-1.5``): a negative
    ``--lr`` then gets gradguard's own refusal, not "expected one argument" (Python 3.13's rule)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, the script's own arguments shown optional: ``SCRIPT [ARGS ...]``."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.nargs == argparse.REMAINDER:
            return f"[{self._metavar_formatter(action, default_metavar)(1)[0]} ...]"
        return super()._format_args(action, default_metavar)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradguard", description="Find, explain and stop exploding gradients and NaN losses."
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the embedded scenarios that really diverge",
        description="Train two small problems that really diverge (rnn, deepsad), each in several "
        "configurations side by side (unclipped, over-clipped, the recommended threshold...), under "
        "gradguard.Guard; diagnose every run, print a summary table and write one report.html. Exit codes: "
        "0 every configuration ran and the report was written, 1 the report could not be written (plotly "
        "missing), 2 an unknown scenario, an --out that is a file or a folder that is not empty, or no PyTorch.",
    )
    demo.add_argument("name", nargs="?", default=None, help="one scenario: rnn or deepsad (default: both)")
    demo.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="a new folder for the demo's run directories (default gradguard-runs/<time>-demo)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and data order (default 0)")
    demo.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)  # quick runs and tests
    demo.set_defaults(func=_demo)

    diag = sub.add_parser(
        "diagnose",
        help="what went wrong in a run and what to do (exit 1 if a finding is an error)",
        description="Run the diagnosis rules over a run log; print the findings and write findings.json. "
        "Exit codes: 0 no error-severity finding, 1 at least one, 2 bad usage or no run.",
    )
    diag.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or a folder of runs (the newest)")
    diag.add_argument("--json", action="store_true", help="print {findings, first_nonfinite} as JSON")
    diag.add_argument("--no-write", action="store_true", help=f"do not write findings.json into {'RUN_DIR'}")
    diag.set_defaults(func=_diagnose)

    rep = sub.add_parser(
        "report",
        help="write the self-contained HTML report of a run (or of a folder of runs)",
        description="Write one HTML file that opens offline: findings, then interactive plots. "
        "An earlier gradguard report there is replaced; any other file is not. Exit codes: 0 written, 2 bad usage, no run, or plotly missing.",
    )
    rep.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run directory, or a folder of runs (one page for all)"
    )
    rep.add_argument(
        "-o", "--out", default=None, metavar="FILE", help="the HTML file (default: RUN_DIR/report.html)"
    )
    rep.set_defaults(func=_report)

    _add_run_parser(sub)
    _add_tune_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    typed = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(typed)
    args.typed = typed  # the words as typed: a refusal can spell the command to run instead
    if args.func not in (_demo, _diagnose, _report):  # run, tune: the script's own output, as it is
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except (
        BrokenPipeError
    ):  # `gradguard diagnose RUN | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's own flush at exit)
        return 1


if __name__ == "__main__":
    sys.exit(main())
