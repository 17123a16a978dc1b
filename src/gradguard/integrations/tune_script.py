"""``gradguard tune SCRIPT``: verify candidate thresholds on the user's unmodified training script.

Each candidate ``max_norm`` is one **trial**: the script runs as ``__main__`` in a fresh Python
process under the zero-code runner (:class:`gradguard.integrations.zerocode.ZeroCode`, with
``clip="norm:<max_norm>"`` replacing the script's own clipping; ``None`` runs it unclipped,
``norm:inf``), with Python's and torch's RNGs seeded to 0 first (so a script that does not seed
itself sees the same batches in every trial), and stops after ``steps`` optimizer steps or at
its first non-finite step. Each trial writes its own run directory and works in a folder of its own there
(``<trial>/workdir``: a copy-on-write view of the current directory, :func:`_copy_on_write`), so the
script's relative reads find the user's files and what it writes (checkpoints, outputs) never
replaces them; a file of the user's working directory written by absolute path (built from ``__file__``)
is the user's own, and tune names it in a warning. The trial is judged from its run directory by
:func:`gradguard.tunelog.judge` (the definition the in-memory :func:`gradguard.tune.tune` uses) and
the recommendation is :func:`gradguard.tunelog.choose`'s.

Candidates: ``max_norms`` when given; else, with ``run`` (a run directory of the same script),
a ladder of halvings from 4× the median healthy pre-clip norm ``gradguard diagnose`` found there;
else an unclipped probe trial first and the same ladder from its first norm. With ``run``, ``tune.json`` is also written
into that run directory: ``gradguard diagnose RUN`` then quotes the verified threshold.

**Learning rates** (``lrs``, ``gradguard tune SCRIPT --lr LIST``): each trial also sets the
script's learning rate when it builds its optimizer — the largest group rate becomes the candidate,
the others keep their ratio to it, and a scheduler made afterwards starts from it — and keeps the
script's own clipping (``clip="none"``: measured, not replaced; :attr:`Trial.own_clip`) unless
``max_norms`` are given too (then each threshold at each rate). ``lrs="auto"``: :data:`LR_RUNGS`
halvings down from the script's own (largest) learning rate, read from ``run`` or, without one,
from a probe trial of the script as it is (the top candidate). ``tune.json`` then holds the verified
rate (``recommended_lr``), which ``gradguard diagnose`` quotes for ``lr_too_high``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradguard import runlog
from gradguard.errors import GradGuardError
from gradguard.runtable import RunTable
from gradguard.tunelog import Trial, TuneResult, candidates_around, judge, ladder, read_tune, write_tune

__all__ = ["ABSOLUTE_WRITES", "LR_RUNGS", "tune_script"]

LR_RUNGS = 8
"""Learning-rate candidates of ``lrs="auto"``: the script's own rate and 7 halvings below it (128× lower)."""
_OWN = "own"  # a trial that keeps the script's own clipping (a learning-rate candidate)

_TRIAL_FAILED = 3  # the child's exit code when the script itself raised


class _Done(BaseException):
    """Raised from the optimizer's step hook when the trial's step budget is spent (a BaseException:
    a script's ``except Exception`` does not swallow it)."""


def tune_script(
    script: str,
    argv: Sequence[str] = (),
    *,
    max_norms: Sequence[float | None] | None = None,
    steps: int | None = None,
    run: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    timeout_s: float | None = None,
    lrs: Sequence[float] | str | None = None,
) -> TuneResult:
    """Run ``script`` once per candidate (threshold and/or learning rate) for ``steps`` steps; the judged trials.

    Args:
        script: the training script (run as ``__main__``, unmodified).
        argv: its own arguments.
        max_norms: thresholds to try (``None``: unclipped). Default: see the module docstring.
        lrs: learning rates to try, or ``"auto"`` (see the module docstring); ``None``: thresholds only.
        steps: optimizer steps per trial. Default: :data:`STEPS`; with ``run``, enough to pass the
            step where that run went non-finite (a failure at step 84 is not in 30 steps), at most
            :data:`MAX_DEFAULT_STEPS`.
        run: a run directory of the same script: candidates from its healthy norms, and
            ``tune.json`` written there.
        out: the folder of the trials' run directories (default ``gradguard-runs/<time>-tune-<script>``).
        timeout_s: give up on a trial after this many seconds (it counts as not trained).

    Raises:
        GradGuardError: no such script, a bad ``steps`` / ``max_norms`` / ``lrs``, ``run`` not a run
            directory, or a script that failed before its first step.
    """
    path = Path(script)
    if not path.is_file():
        raise GradGuardError(
            f"gradguard tune: no such script {script!r}; pass the path of a Python training script."
        )
    if steps is None:
        steps = default_steps(run)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise GradGuardError(
            f"gradguard tune: --steps must be an int ≥ 2 (a few dozen is typical), got {steps!r}."
        )
    _check_lrs(lrs)
    folder = Path(out) if out is not None else runlog.default_run_dir(f"tune-{path.stem}", create=True)
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.absolute()  # a trial works in a folder of its own (_copy_on_write): no relative path
    job = _Job(path.absolute(), list(argv), steps, folder, timeout_s)
    trials = (
        _lr_trials(job, max_norms, lrs, run) if lrs is not None else _threshold_trials(job, max_norms, run)
    )
    lr_flag = (
        [] if lrs is None else ["--lr", lrs if isinstance(lrs, str) else ",".join(f"{x:g}" for x in lrs)]
    )
    command = shlex.join(
        # tune's options before the script: what follows the script is the script's own
        ["gradguard", "tune", *(["--run", str(run)] if run is not None else []), *lr_flag, str(path), *argv]
    )
    _warn_absolute_writes(folder)
    result = TuneResult(trials, steps, source="script", command=command)
    write_tune(folder, result)
    if run is not None:
        run_dir = runlog.read_run(run, records=False).path
        write_tune(run_dir, with_other_question(read_tune(run_dir), result))
    return result


STEPS = 30  #: steps per trial by default
MAX_DEFAULT_STEPS = 300  #: the most steps per trial a run's late failure sets by default
_PAST = 10  #: steps past the run's first non-finite step


def default_steps(run: str | os.PathLike[str] | None) -> int:
    """Steps per trial when none are given: :data:`STEPS`, or enough to pass the step where ``run``
    went non-finite (a trial that stops before the failure verifies nothing about it)."""
    if run is None:
        return STEPS
    first = runlog.read_run(run, records=False).first_nonfinite()
    step = first.get("step") if first is not None else None
    if not isinstance(step, int):
        return STEPS
    return max(STEPS, min(step + _PAST, MAX_DEFAULT_STEPS))


def with_other_question(before: TuneResult | None, now: TuneResult) -> TuneResult:
    """``now``, keeping the trials of ``before`` (the run directory's ``tune.json``) that answered
    the other question: ``diagnose`` prints one command for a threshold and one for the rates, and
    each would otherwise erase what the other verified (rate trials set ``lr``; threshold trials
    run at the script's own rate)."""
    if before is None or before.source != "script" or before.start_step != now.start_step:
        return now
    rates_now = all(t.lr is not None for t in now.trials)
    kept = [t for t in before.trials if (t.lr is None) == rates_now]
    return dataclasses.replace(now, trials=[*kept, *now.trials]) if kept else now


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every trial of one tuning shares: the script, its arguments, the budget, the folder."""

    script: Path
    argv: list[str]
    steps: int
    folder: Path
    timeout_s: float | None

    def trial(self, k: int, max_norm: float | str | None, lr: float | None = None) -> Trial:
        """Trial ``k`` (``max_norm`` :data:`_OWN`: the script's own clipping)."""
        return _trial(self.script, self.argv, max_norm, self.steps, self.folder, k, self.timeout_s, lr)


def _threshold_trials(job: _Job, max_norms: Sequence[float | None] | None, run: Any) -> list[Trial]:
    """One trial per threshold: ``max_norms``, or a ladder around the norms of ``run`` or of a probe."""
    trials: list[Trial] = []
    candidates: list[float | None] | None = list(max_norms) if max_norms is not None else _from_run(run)
    if candidates is None:  # an unclipped probe first: its first norm gives the ladder
        trials.append(job.trial(0, None))
        candidates = [*candidates_around(_first_norm(job.folder / _name(0, None)))]
    for k, max_norm in enumerate(candidates, start=len(trials)):
        trials.append(job.trial(k, max_norm))
    return trials


def _lr_trials(
    job: _Job, max_norms: Sequence[float | None] | None, lrs: Sequence[float] | str, run: Any
) -> list[Trial]:
    """One trial per learning rate (× threshold when ``max_norms``; else the script's own clipping)."""
    thresholds: list[float | str | None] = list(max_norms) if max_norms is not None else [_OWN]
    trials: list[Trial] = []
    if isinstance(lrs, str):  # "auto": halvings down from the script's own rate
        top = _run_lr(run) if run is not None else None
        if top is None:  # the script as it is: the top candidate (with its own clipping)
            trials.append(job.trial(0, _OWN))
            top = _run_lr(job.folder / _name(0, _OWN))
            trials[0] = dataclasses.replace(trials[0], lr=top)
        rates = ladder(top, LR_RUNGS)
        if trials:  # the probe was the top rung
            rates = rates[:-1]
    else:
        rates = list(lrs)
    for max_norm in thresholds:
        for lr in rates:
            trials.append(job.trial(len(trials), max_norm, lr))
    return _overridden(trials)


def _overridden(trials: list[Trial]) -> list[Trial]:
    """``trials`` with ``lr_ignored`` where the candidate rates never took effect: trials of different
    rates all ran at one rate (the script sets ``param_group['lr']`` itself every step), so each verified
    nothing ("Verified: lr=0.4" was quoted from four bit-identical trials)."""
    rated = [t for t in trials if t.lr is not None and t.lr_used is not None]
    if len({t.lr for t in rated}) < 2 or len({t.lr_used for t in rated}) != 1:
        return trials
    return [dataclasses.replace(t, lr_ignored=True) if t in rated else t for t in trials]


def _check_lrs(lrs: Sequence[float] | str | None) -> None:
    if lrs is None or lrs == "auto":
        return
    if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Sequence) or not lrs:
        raise GradGuardError(
            f"gradguard tune: --lr must be a non-empty list of learning rates or 'auto', got {lrs!r}."
        )
    for v in lrs:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise GradGuardError(
                f"gradguard tune: every learning rate must be a positive finite number, got {v!r} in {list(lrs)!r}."
            )


def _run_lr(run: Any) -> float:
    """The largest finite learning rate a run (of the same script) recorded: the rate to halve down from."""
    table = RunTable.from_log(runlog.read_run(run, records=False))
    rates = [x for x in table.lr if math.isfinite(x) and x > 0]
    if not rates:
        raise GradGuardError(
            f"gradguard tune --lr auto: the run {str(run)!r} recorded no learning rate; pass the rates, e.g. --lr 1e-3,3e-4,1e-4."
        )
    return max(rates)


def _from_run(run: str | os.PathLike[str] | None) -> list[float | None] | None:
    """A ladder around the healthy norms of ``run`` (``None`` without one)."""
    if run is None:
        return None
    from gradguard.diagnose import healthy_window

    window = healthy_window(run)
    if not window.norms:
        raise GradGuardError(
            f"gradguard tune: the run {str(run)!r} has no finite gradient norm to build candidates from."
        )
    return [*candidates_around(window.p50)]


def _name(k: int, max_norm: float | str | None, lr: float | None = None) -> str:
    clip = "none" if max_norm is None else "own" if max_norm == _OWN else f"norm-{max_norm:g}"
    return f"trial{k:02d}-" + clip + ("" if lr is None else f"-lr-{lr:g}")


def _first_norm(run_dir: Path) -> float:
    """The probe's first finite pre-clip norm (taken before any update)."""
    table = RunTable.from_log(runlog.read_run(run_dir, records=False))
    first = next((g for g in table.grad_norm if math.isfinite(g) and g > 0), math.nan)
    return first


def _trial(
    script: Path,
    argv: Sequence[str],
    max_norm: float | str | None,
    steps: int,
    folder: Path,
    k: int,
    timeout_s: float | None,
    lr: float | None = None,
) -> Trial:
    """One trial in a fresh process; judged from the run directory it wrote (``max_norm``
    :data:`_OWN`: the script's own clipping, measured; ``lr``: the rate its optimizer starts at)."""
    run_dir = folder / _name(k, max_norm, lr)
    own = max_norm == _OWN
    threshold = None if isinstance(max_norm, str) else max_norm
    clip = "none" if own else "norm:inf" if threshold is None else f"norm:{threshold!r}"
    job = {
        "script": str(script),
        "argv": list(argv),
        "clip": clip,
        "steps": steps,
        "out": str(run_dir),
        "lr": lr,
        "cwd": os.getcwd(),
        "workdir": str(run_dir / WORKDIR),
    }
    cmd = [sys.executable, "-m", "gradguard.integrations.tune_script", json.dumps(job)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return judge(threshold, lr, [], [], own_clip=own)  # no step finished in time: not trained
    if not runlog.is_run_dir(run_dir):
        raise GradGuardError(
            f"gradguard tune: {script} took no optimizer step under clip={clip} (exit code {done.returncode}); "
            f"check that it trains under `{shlex.join(['gradguard', 'run', '--clip', clip, str(script)])}`. "
            f"Its last output: {_last_output(done)}"
        )
    table = RunTable.from_log(runlog.read_run(run_dir, records=False))
    trial = judge(threshold, lr, list(table.loss), list(table.grad_norm), own_clip=own)
    used = next((float(x) for x in table.lr if math.isfinite(x)), None)
    return dataclasses.replace(trial, lr_used=used)


def _last_output(done: subprocess.CompletedProcess[str]) -> str:
    """The last lines the trial printed, on stdout (the script's ``print``) and on stderr (a traceback,
    gradguard's message), each stream's last 3 non-blank lines; ``(nothing)`` where it printed none."""
    parts = []
    for name, text in (("stdout", done.stdout), ("stderr", done.stderr)):
        lines = [line.strip() for line in (text or "").splitlines() if line.strip()][-3:]
        if lines:
            parts.append(f"{name}: " + " | ".join(lines))
    return "; ".join(parts) or "(nothing)"


WORKDIR = "workdir"
"""The working directory of a trial, in its run directory: see :func:`_copy_on_write`."""


ABSOLUTE_WRITES = "absolute-writes.txt"
"""The paths in the user's working directory a trial wrote by their absolute path, one a line, in its
run directory: the view cannot keep those apart (see :func:`_copy_on_write`); :func:`tune_script` says so."""


def _copy_on_write(user_cwd: Path, workdir: Path, noted: Path) -> None:
    """Make the trial work in ``workdir``, a copy-on-write view of the user's working directory: it
    shows the user's files (symbolic links, made folder by folder as the script goes down), so the
    script's relative reads (``data/train.csv``, ``--resume checkpoints/last.pt``) find them; a write
    into it (``open``, ``os.open``, ``torch.save``, a rename, a new folder) first turns the linked
    folders above the path into folders of the trial's own and removes the linked file (copied first
    where the write keeps its content: append, update). The user's files are never written: a trial
    does not overwrite ``checkpoints/last.pt``, and every trial starts from the same files. A path
    written by its absolute name is the script's own business, as under plain Python (an audit hook
    cannot change where a write goes): one in the user's working directory (built from ``__file__``,
    passed absolute) is written there, and listed in ``noted`` (:data:`ABSOLUTE_WRITES`) for tune to
    say. The child process only (an audit hook lasts as long as the process)."""
    import shutil

    root = os.path.abspath(workdir)
    linked: set[str] = set()  # the links this view made (a link the script makes is its own)
    busy = [False]  # the hook's own file operations raise audit events too
    escaped = _absolute_writes(user_cwd, noted)

    def holds_root(target: str) -> bool:
        real = os.path.realpath(target)
        return root == real or root.startswith(real.rstrip(os.sep) + os.sep)

    def link_children(source: str, folder: str) -> None:
        for entry in os.scandir(source):
            if not holds_root(entry.path):  # the folder that holds the trial (gradguard-runs/): no loop
                os.symlink(os.path.abspath(entry.path), os.path.join(folder, entry.name))
                linked.add(os.path.join(folder, entry.name))

    def own(path: Any, *, last: bool, keep: bool) -> None:
        if isinstance(path, int) or path is None:
            return
        p = os.path.abspath(os.fsdecode(path))
        if not p.startswith(root + os.sep):
            escaped(p)
            return
        parts = os.path.relpath(p, root).split(os.sep)
        here = root
        for part in parts[:-1]:
            here = os.path.join(here, part)
            if here in linked and os.path.isdir(here):  # a folder of the user's: the trial's own, of links
                source = os.readlink(here)
                os.unlink(here)
                linked.discard(here)
                os.mkdir(here)
                link_children(source, here)
        here = os.path.join(here, parts[-1])
        if last and here in linked:
            source = os.readlink(here)
            os.unlink(here)
            linked.discard(here)
            if keep and os.path.isfile(source):
                shutil.copy2(source, here)

    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if busy[0] or event not in _WRITE_EVENTS:
            return
        busy[0] = True
        try:
            if event == "open":
                path, mode, flags = args
                if mode is not None:
                    if any(c in mode for c in "wax+"):
                        own(path, last=True, keep="w" not in mode)
                elif flags & writes:
                    own(path, last=True, keep=not flags & os.O_TRUNC)
            elif event in ("os.rename", "os.replace"):
                own(args[0], last=False, keep=False)
                own(args[1], last=True, keep=False)
            elif event == "os.truncate":
                own(args[0], last=True, keep=True)
            else:  # os.mkdir, os.remove, os.rmdir: the folder above is the trial's own
                own(args[0], last=False, keep=False)
        except OSError:
            pass  # the operation itself then says what is wrong
        finally:
            busy[0] = False

    os.makedirs(root, exist_ok=True)
    link_children(str(user_cwd), root)
    os.chdir(root)
    sys.addaudithook(hook)

    import torch

    save = torch.save

    def saved(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:  # writes from C++: no audit event
        if isinstance(f, (str, os.PathLike)):
            hook("open", (f, "wb", 0))
        return save(obj, f, *args, **kwargs)

    torch.save = saved  # type: ignore[assignment]


def _absolute_writes(user_cwd: Path, noted: Path) -> Callable[[str], None]:
    """What a trial's view calls with each path written outside it: one inside the user's working
    directory is appended to ``noted`` the first time — not in the trial's own run directory (where
    ``noted`` is), Python's bytecode cache or a hidden folder (``~/.cache`` when the working directory
    is the home folder: the libraries' caches)."""
    user, trial = os.path.realpath(user_cwd), os.path.realpath(noted.parent)
    seen: set[str] = set()

    def escaped(path: str) -> None:
        real = os.path.realpath(path)
        if real in seen or not _within(real, user) or _within(real, trial):
            return
        if any(
            part.startswith(".") or part == "__pycache__"
            for part in os.path.relpath(real, user).split(os.sep)
        ):
            return
        seen.add(real)
        with open(noted, "a", encoding="utf-8") as f:
            f.write(real + "\n")

    return escaped


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _warn_absolute_writes(folder: Path) -> None:
    """Say which files of the user's working directory the trials wrote by absolute path (see
    :data:`ABSOLUTE_WRITES`): the copy-on-write view did not keep them apart."""
    written = sorted(
        {
            line
            for f in folder.glob(f"*/{ABSOLUTE_WRITES}")
            for line in f.read_text(encoding="utf-8").splitlines()
        }
    )
    if not written:
        return
    shown = ", ".join(written[:5]) + (f" and {len(written) - 5} more" if len(written) > 5 else "")
    warnings.warn(
        f"gradguard tune: the trials wrote into your working directory by absolute path: {shown}. A trial's "
        f"copy-on-write view (<trial>/{WORKDIR}) keeps apart only what the script writes by relative path, so "
        "these files are the trials' now (each trial wrote over the last; restore them if they mattered). Have "
        "the script write by relative path (not one built from __file__, nor passed absolute), then tune again.",
        UserWarning,
        stacklevel=3,
    )


_WRITE_EVENTS = frozenset(
    {"open", "os.rename", "os.replace", "os.truncate", "os.mkdir", "os.remove", "os.rmdir"}
)


def _seed_everything() -> None:
    """Seed Python's and torch's RNGs to 0: every trial of an unseeded script sees the same data
    (a script that draws from NumPy's global RNG without seeding it should seed it itself)."""
    import random

    import torch

    random.seed(0)
    torch.manual_seed(0)


def _trial_main(args: list[str]) -> int:
    """The child process of one trial: the script under ZeroCode, stopped after the step budget."""
    import runpy

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from gradguard.errors import NonFiniteError
    from gradguard.integrations.zerocode import ZeroCode

    job: dict[str, Any] = json.loads(args[0])
    script, budget = Path(job["script"]), int(job["steps"])
    count = [0]

    def after_step(optimizer: Any, *_: Any) -> None:
        count[0] += 1
        if count[0] >= budget:
            raise _Done

    handle = register_optimizer_step_post_hook(after_step)
    _keep_script_guards_in(Path(job["out"]) / "script-guard")
    if job.get("lr") is not None:
        _start_at_lr(float(job["lr"]))
    if job.get("workdir") is not None:
        _copy_on_write(Path(job["cwd"]), Path(job["workdir"]), Path(job["out"]) / ABSOLUTE_WRITES)
    sys.argv = [str(script), *job["argv"]]
    sys.path.insert(0, str(script.resolve().parent))
    _seed_everything()
    zc = ZeroCode(
        out=job["out"],
        name=script.stem,
        live=False,
        scan_existing=False,
        defer=False,  # a trial is judged from its own run log, even where the script guards itself
        clip=job["clip"],
        on_nonfinite="raise",
    )
    code = 0
    try:
        with zc:
            runpy.run_path(str(script), run_name="__main__")
    except (_Done, NonFiniteError, SystemExit):
        pass
    except BaseException as e:  # the script failed: what it logged so far is still judged
        print(f"gradguard tune: the script raised {type(e).__name__}: {e}", file=sys.stderr)
        code = _TRIAL_FAILED
    finally:
        handle.remove()
    return code


def _keep_script_guards_in(folder: Path) -> None:
    """A ``gradguard.Guard`` the script makes itself writes into the trial's ``folder`` (a new run
    directory each), not where the script says: its ``log_dir`` is often the very run being tuned
    (the script takes ``--log-dir`` and tune's command line repeats it), which holds a run log — every
    trial stopped there ("already holds a run log") and tune read "took no optimizer step". The
    child process only."""
    from gradguard import guard as guard_module
    from gradguard.locate import users

    init = guard_module.Guard.__init__

    def in_the_trial(self: Any, *args: Any, **kwargs: Any) -> None:
        mine = not users(sys._getframe(1).f_code.co_filename)  # the trial's own guards (gradguard's code)
        if not mine and kwargs.get("log_dir") not in (None, "auto"):
            kwargs["log_dir"] = runlog.default_run_dir("script", root=folder, create=True)
            kwargs.pop("exist_ok", None)
        init(self, *args, **kwargs)

    guard_module.Guard.__init__ = in_the_trial  # type: ignore[method-assign]


def _start_at_lr(lr: float) -> None:
    """Every optimizer the script builds starts at ``lr``: its largest group rate becomes ``lr``, the
    other groups (and the default of groups added later) keep their ratio to it. Done as the optimizer
    is built, so a learning-rate scheduler made afterwards starts from it. The child process only."""
    import torch

    init = torch.optim.Optimizer.__init__

    def started_at_lr(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        rates = [float(g["lr"]) for g in self.param_groups if isinstance(g.get("lr"), (int, float))]
        top = max(rates, default=0.0)
        if top <= 0:
            return
        for group in [*self.param_groups, self.defaults]:
            if isinstance(group.get("lr"), (int, float)) and not isinstance(group["lr"], bool):
                group["lr"] = float(group["lr"]) * lr / top

    torch.optim.Optimizer.__init__ = started_at_lr  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(_trial_main(sys.argv[1:]))
