"""``gradguard run``: guard an unmodified training script through torch's global hooks.

Nothing in the script changes. While :class:`ZeroCode` is active:

* a global module forward pre-hook notes each *root* module (one called while no other module's
  forward is running): the model whose parameters an optimizer will step;
* a global optimizer step pre-hook gives every optimizer, the first time it steps, a
  :class:`gradguard.Guard` over its root model, and calls :meth:`Guard.before_step` before each
  of its steps: the gradients are measured (and clipped if asked); a non-finite step is located
  (the guard replays the model's forward from its captured inputs, or instruments the next step)
  and skipped: when ``before_step`` says so, the runner sets the gradients to ``None`` (a step
  pre-hook cannot cancel the step), so the script's own ``optimizer.step()`` leaves the parameters
  and the optimizer state untouched.

No global full-backward module hook is used (they break in-place ops on module outputs).

Example::

    with ZeroCode(out="runs/exp") as zc:
        runpy.run_path("train.py", run_name="__main__")
    print(zc.summary())
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradguard import runlog
from gradguard.guard import Guard
from gradguard.integrations._common import drop_grads
from gradguard.locate import StepCapture

__all__ = ["ZeroCode"]


class ZeroCode:
    """Guards every optimizer that steps while active (see the module docstring).

    Args:
        out: the run directory of the first optimizer (later ones get ``<out>/optimizer<k>``);
            ``None``: ``gradguard-runs/<time>-<name>``.
        name: the run's name (the script's).
        **guard: :class:`gradguard.Guard` options (``clip``, ``on_nonfinite``, ``every``…).
            Defaults here: ``clip="none"`` (measure only), ``on_nonfinite="skip"``.
    """

    def __init__(self, out: str | os.PathLike[str] | None = None, name: str = "run", **guard: Any) -> None:
        self.out = Path(out) if out is not None else runlog.default_run_dir(name)
        self.name = name
        self.options = {"clip": "none", "on_nonfinite": "skip", **guard}
        self.guards: dict[int, Guard] = {}
        self._roots: list[weakref.ref[nn.Module]] = []
        self._depth = 0
        self._handles: list[Any] = []
        self._unguarded: set[int] = set()
        self._captures: dict[int, StepCapture] = {}

    # ------------------------------------------------------------------ hooks
    def _pre(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0 and not any(r() is module for r in self._roots):
            self._roots.append(weakref.ref(module))
            if next(module.parameters(), None) is not None:  # a model, not a loss module
                # capture from this very call on (the guard comes at the first optimizer step):
                # the capture's own pre-hook joins from the next call, so feed it this one. Only
                # the first model watches its loss code (the watches are modes: one at a time)
                watch = not self._captures and not self.guards
                capture = StepCapture(module, watch_loss=watch)
                self._captures[id(module)] = capture
                capture.pre(module, args, {})
        self._depth += 1

    def _post(self, module: nn.Module, args: Any, out: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _root_of(self, optimizer: torch.optim.Optimizer) -> nn.Module | None:
        params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        best: tuple[int, nn.Module | None] = (0, None)
        for ref in self._roots:
            module = ref()
            if module is None:
                continue
            owned = {id(p) for p in module.parameters()}
            if params <= owned:
                size = len(owned)
                if best[1] is None or size < best[0]:  # the smallest root that owns them all
                    best = (size, module)
        return best[1]

    def _step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # args[0] is the optimizer itself; a further argument is a closure
        if len(args) > 1 or kwargs.get("closure") is not None or id(optimizer) in self._unguarded:
            return  # a closure optimizer (LBFGS) computes its gradients inside step(): not guarded
        guard = self.guards.get(id(optimizer))
        if guard is None:
            root = self._root_of(optimizer)
            if root is None:
                self._unguarded.add(id(optimizer))
                warnings.warn(
                    f"gradguard: {type(optimizer).__name__} steps parameters that no model called so far owns; "
                    "this optimizer is not guarded.",
                    stacklevel=2,
                )
                return
            k = len(self.guards)
            log_dir = self.out if k == 0 else self.out / f"optimizer{k}"
            capture = self._captures.pop(id(root), None)
            guard = Guard(root, optimizer, log_dir=log_dir, name=self.name, capture=capture, **self.options)
            self.guards[id(optimizer)] = guard
        if not guard.before_step(None):
            drop_grads(optimizer)  # the step that runs right after this hook then changes nothing

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> ZeroCode:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handles = [
            register_module_forward_pre_hook(self._pre),
            register_module_forward_hook(self._post, always_call=True),
            register_optimizer_step_pre_hook(self._step_pre),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for capture in self._captures.values():  # roots no optimizer ever stepped
            capture.remove()
        self._captures.clear()
        for guard in self.guards.values():
            guard.close()

    def summary(self) -> str:
        """What happened, in a few lines for the terminal."""
        if not self.guards:
            return "gradguard: no optimizer step was seen; nothing was guarded."
        lines = []
        for guard in self.guards.values():
            lines.append(
                f"gradguard: {type(guard.optimizer).__name__} on {type(guard.model).__name__}: "
                f"{guard.step_count} steps, {guard.skipped_steps} skipped. Run log: {guard.run_dir}"
            )
            if guard.run_dir is not None:
                log = runlog.read_run(guard.run_dir)
                first = log.first_nonfinite()
                if first is not None:
                    where = ", ".join(
                        f"{k}={first.get(k)}"
                        for k in ("phase", "module", "op", "kind", "source")
                        if first.get(k)
                    )
                    reason = (first.get("evidence") or {}).get("reason")
                    lines.append(
                        f"  first non-finite value at step {first['step']}: {where}"
                        + (f" — {reason}" if reason else "")
                        + f" (located by {first.get('located_by')})"
                    )
        return "\n".join(lines)


def run_script(path: str, argv: list[str], *, report: bool = True, **options: Any) -> int:
    """Run a script as ``__main__`` under :class:`ZeroCode`; its exit code, its output kept.

    gradguard's own messages go to stderr. With ``report`` (and plotly installed), ``report.html``
    is written into the run directory at exit.
    """
    import runpy
    import traceback

    script = Path(path)
    if not script.is_file():
        print(
            f"gradguard run: no such script {path!r}; pass the path of a Python training script.",
            file=sys.stderr,
        )
        return 2
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.resolve().parent))
    code = 0
    zc = ZeroCode(name=script.stem, **options)
    try:
        with zc:
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    print(zc.summary(), file=sys.stderr)
    if report and zc.guards:
        _write_report(zc.out)
    return code


def _write_report(run_dir: Path) -> None:
    try:
        from gradguard.report import write_report
    except ImportError:  # the report extra is optional
        return
    try:
        path = write_report(run_dir)
    except Exception as e:  # a report must never turn a finished run into a failure
        print(f"gradguard: could not write the report ({e}).", file=sys.stderr)
        return
    print(f"gradguard: report: {path}", file=sys.stderr)
