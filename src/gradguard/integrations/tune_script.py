"""``gradguard tune SCRIPT``: verify candidate thresholds on the user's unmodified training script.

Each candidate ``max_norm`` is one **trial**: the script runs as ``__main__`` in a fresh Python
process under the zero-code runner (:class:`gradguard.integrations.zerocode.ZeroCode`, with
``clip="norm:<max_norm>"`` replacing the script's own clipping; ``None`` runs it unclipped,
``norm:inf``), with Python's and torch's RNGs seeded to 0 first (so a script that does not seed
itself sees the same batches in every trial), and stops after ``steps`` optimizer steps or at
its first non-finite step. Each trial writes its own run directory; the trial is judged from it by
:func:`gradguard.tunelog.judge` (the definition the in-memory :func:`gradguard.tune.tune` uses) and
the recommendation is :func:`gradguard.tunelog.choose`'s.

Candidates: ``max_norms`` when given; else, with ``run`` (a run directory of the same script),
a ladder of halvings from 4× the median healthy pre-clip norm ``gradguard diagnose`` found there;
else an unclipped probe trial first and the same ladder from its first norm. With ``run``, ``tune.json`` is also written
into that run directory: ``gradguard diagnose RUN`` then quotes the verified threshold.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradguard import runlog
from gradguard.errors import GradGuardError
from gradguard.runtable import RunTable
from gradguard.tunelog import Trial, TuneResult, candidates_around, judge, write_tune

__all__ = ["tune_script"]

_TRIAL_FAILED = 3  # the child's exit code when the script itself raised


class _Done(BaseException):
    """Raised from the optimizer's step hook when the trial's step budget is spent (a BaseException:
    a script's ``except Exception`` does not swallow it)."""


def tune_script(
    script: str,
    argv: Sequence[str] = (),
    *,
    max_norms: Sequence[float | None] | None = None,
    steps: int = 30,
    run: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    timeout_s: float | None = None,
) -> TuneResult:
    """Run ``script`` once per candidate threshold for ``steps`` steps; the judged trials.

    Args:
        script: the training script (run as ``__main__``, unmodified).
        argv: its own arguments.
        max_norms: thresholds to try (``None``: unclipped). Default: see the module docstring.
        steps: optimizer steps per trial.
        run: a run directory of the same script: candidates from its healthy norms, and
            ``tune.json`` written there.
        out: the folder of the trials' run directories (default ``gradguard-runs/<time>-tune-<script>``).
        timeout_s: give up on a trial after this many seconds (it counts as not trained).

    Raises:
        GradGuardError: no such script, a bad ``steps`` / ``max_norms``, ``run`` not a run
            directory, or a script that failed before its first step.
    """
    path = Path(script)
    if not path.is_file():
        raise GradGuardError(
            f"gradguard tune: no such script {script!r}; pass the path of a Python training script."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise GradGuardError(
            f"gradguard tune: --steps must be an int ≥ 2 (a few dozen is typical), got {steps!r}."
        )
    folder = Path(out) if out is not None else runlog.default_run_dir(f"tune-{path.stem}", create=True)
    folder.mkdir(parents=True, exist_ok=True)
    trials: list[Trial] = []
    candidates: list[float | None] | None = list(max_norms) if max_norms is not None else _from_run(run)
    if candidates is None:  # an unclipped probe first: its first norm gives the ladder
        trials.append(_trial(path, argv, None, steps, folder, 0, timeout_s))
        candidates = [*candidates_around(_first_norm(folder / _name(0, None)))]
    for k, max_norm in enumerate(candidates, start=len(trials)):
        trials.append(_trial(path, argv, max_norm, steps, folder, k, timeout_s))
    command = shlex.join(
        ["gradguard", "tune", str(path), *(["--run", str(run)] if run is not None else []), *argv]
    )
    result = TuneResult(trials, steps, source="script", command=command)
    write_tune(folder, result)
    if run is not None:
        write_tune(runlog.read_run(run, records=False).path, result)
    return result


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


def _name(k: int, max_norm: float | None) -> str:
    return f"trial{k:02d}-" + ("none" if max_norm is None else f"norm-{max_norm:g}")


def _first_norm(run_dir: Path) -> float:
    """The probe's first finite pre-clip norm (taken before any update)."""
    table = RunTable.from_log(runlog.read_run(run_dir, records=False))
    first = next((g for g in table.grad_norm if math.isfinite(g) and g > 0), math.nan)
    return first


def _trial(
    script: Path,
    argv: Sequence[str],
    max_norm: float | None,
    steps: int,
    folder: Path,
    k: int,
    timeout_s: float | None,
) -> Trial:
    """One trial in a fresh process; judged from the run directory it wrote."""
    run_dir = folder / _name(k, max_norm)
    clip = "norm:inf" if max_norm is None else f"norm:{max_norm!r}"
    job = {"script": str(script), "argv": list(argv), "clip": clip, "steps": steps, "out": str(run_dir)}
    cmd = [sys.executable, "-m", "gradguard.integrations.tune_script", json.dumps(job)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return judge(max_norm, None, [], [])  # no step finished in time: not trained
    if not runlog.is_run_dir(run_dir):
        tail = " | ".join(line.strip() for line in (done.stderr or "").strip().splitlines()[-3:])
        raise GradGuardError(
            f"gradguard tune: {script} took no optimizer step under clip={clip} (exit code {done.returncode}); "
            f"check that it trains under `gradguard run --clip {clip} {script}`. Its last output: {tail}"
        )
    table = RunTable.from_log(runlog.read_run(run_dir, records=False))
    return judge(max_norm, None, list(table.loss), list(table.grad_norm))


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
    sys.argv = [str(script), *job["argv"]]
    sys.path.insert(0, str(script.resolve().parent))
    _seed_everything()
    zc = ZeroCode(
        out=job["out"],
        name=script.stem,
        live=False,
        scan_existing=False,
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


if __name__ == "__main__":
    sys.exit(_trial_main(sys.argv[1:]))
