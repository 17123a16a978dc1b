"""Framework Trainers under ``gradguard run``: a script that builds a ``lightning.Trainer`` gets
gradguard's Lightning callback (:class:`gradguard.integrations.lightning.GradGuard`) attached, zero
code: the callback measures each step before Lightning clips (``gradient_clip_val`` stays the
script's, and the runner records its threshold and coefficient from Lightning's own
``clip_grad_norm_`` call), gates a bad step and sends the numbers to the Trainer's loggers. The
runner leaves the optimizers it guards alone. A ``--clip`` given to ``gradguard run`` replaces
``gradient_clip_val`` (said once). A Trainer that already has a ``GradGuard`` keeps it as it is.

A ``transformers.Trainer`` needs nothing attached: it clips with ``clip_grad_norm_`` and steps the
optimizer, which the runner guards like any script's (pre-clip norms, the Trainer's
``max_grad_norm`` logged as the threshold, a bad step's gradients dropped). Its LR scheduler does
not advance on a step the guard skipped, as on an fp16 overflow: the Trainer asks Accelerate's
``AcceleratedOptimizer.step_was_skipped`` before it steps the scheduler, and that answers ``True``
after a skipped step too (the Trainer's ``global_step`` counts the step, as it counts an overflow).

The classes are patched when their module is imported (an import hook on ``sys.meta_path``), or
at once if the script imported it before the runner started; all of it is undone on exit.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["Frameworks"]

#: the modules that define Lightning's Trainer (the unified package and the older one)
_LIGHTNING = ("lightning.pytorch.trainer.trainer", "pytorch_lightning.trainer.trainer")
#: the module of Accelerate's optimizer wrapper (what a transformers.Trainer steps through)
_ACCELERATE = "accelerate.optimizer"
#: run options the callback does not take (it sets them itself, or they are the runner's)
_NOT_FOR_CALLBACK = ("exist_ok", "locate", "clip", "on_nonfinite")


class Frameworks:
    """Attaches gradguard's Lightning callback to every ``Trainer`` built while the runner is
    active, and holds a ``transformers.Trainer``'s LR scheduler on a skipped step."""

    def __init__(self, zc: Any) -> None:  # the ZeroCode (runner.py imports this module)
        self.zc = zc
        self.callbacks: list[Any] = []  # the GradGuard callbacks attached so far
        self._patched: list[tuple[type, str, Any]] = []  # (class, attribute, the original)
        self._finder: _AfterImport | None = None

    def install(self) -> None:
        patches: dict[str, Callable[[ModuleType], None]] = dict.fromkeys(_LIGHTNING, self._patch)
        patches[_ACCELERATE] = self._patch_accelerate
        for name, patch in patches.items():
            module = sys.modules.get(name)
            if module is not None:
                patch(module)
        self._finder = _AfterImport(patches)
        sys.meta_path.insert(0, self._finder)

    def remove(self) -> None:
        if self._finder is not None and self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        self._finder = None
        for cls, name, original in reversed(self._patched):
            setattr(cls, name, original)
        self._patched.clear()

    def skipped(self, optimizer: Any) -> bool:
        """Whether the runner's guard skipped this optimizer's last step (no host read: a step
        decided on the host; a Lightning callback's optimizer is the callback's business)."""
        session = self.zc.sessions.get(id(optimizer))
        return session is not None and not session.framework and session.guard.last_step_skipped

    def _patch_accelerate(self, module: ModuleType) -> None:
        """``AcceleratedOptimizer.step_was_skipped`` (a property the Trainer reads before it steps
        its LR scheduler): also ``True`` after a step the guard skipped."""
        cls: Any = getattr(module, "AcceleratedOptimizer", None)
        original = getattr(cls, "__dict__", {}).get("step_was_skipped")
        if not isinstance(original, property) or original.fget is None or self._has(cls):
            return
        frameworks, was_skipped = self, original.fget

        def step_was_skipped(wrapper: Any) -> bool:
            if was_skipped(wrapper):
                return True
            inner = getattr(wrapper, "optimizer", None)
            return bool(
                frameworks.zc.patches.call("a Trainer's step", frameworks.skipped, inner, default=False)
            )

        cls.step_was_skipped = property(step_was_skipped, doc=original.__doc__)
        self._patched.append((cls, "step_was_skipped", original))

    def _has(self, cls: Any) -> bool:
        return any(c is cls for c, _, _ in self._patched)

    def guard_of(self, optimizer: Any) -> Any:
        """The guard an attached callback made for this optimizer (``None``: not a framework's)."""
        for callback in self.callbacks:
            for guard in callback.guards:
                if guard.optimizer is optimizer and not guard.closed:
                    return guard
        return None

    def _patch(self, module: ModuleType) -> None:
        cls = getattr(module, "Trainer", None)
        if cls is None or self._has(cls):
            return
        original = cls.__init__
        frameworks = self

        def __init__(trainer: Any, *args: Any, **kwargs: Any) -> None:
            original(trainer, *args, **kwargs)
            if frameworks.zc.active:
                frameworks.zc.patches.call("lightning.Trainer", frameworks.attach, trainer)

        __init__.__wrapped__ = original  # type: ignore[attr-defined]
        cls.__init__ = __init__
        self._patched.append((cls, "__init__", original))

    def attach(self, trainer: Any) -> None:
        """A new Lightning Trainer: add a ``GradGuard`` callback writing into the runner's run dir."""
        from gradguard.integrations.lightning import GradGuard

        if any(isinstance(cb, GradGuard) for cb in trainer.callbacks):
            return  # the script attached its own
        zc = self.zc
        if _starts_its_own_processes(trainer):
            zc.stop(
                "lightning.Trainer",
                f"this Trainer starts its other {trainer.num_devices * trainer.num_nodes - 1} process(es) itself, as "
                "plain `python` runs of the script, without gradguard: guarding only this one would wait for them "
                "forever, so gradguard stops here and the script runs unguarded. Launch every process under "
                f"gradguard with torchrun: `torchrun --nproc-per-node {trainer.num_devices} -m gradguard run "
                "SCRIPT ARGS` (Lightning then uses torchrun's processes).",
            )
            return
        if zc.replace_clip and trainer.gradient_clip_val:
            zc.say_once(
                "clip",
                f"--clip {zc.options['clip']} replaces the script's Trainer(gradient_clip_val="
                f"{trainer.gradient_clip_val}); gradguard clips the gradients instead.",
            )
            trainer.gradient_clip_val = None
        options = {k: v for k, v in zc.options.items() if k not in _NOT_FOR_CALLBACK}
        callback = GradGuard(
            clip=zc.options["clip"],
            on_nonfinite=zc.options["on_nonfinite"],
            log_dir=zc.next_run_dir(),
            report=False,  # gradguard run writes the report at exit
            save_state=False,  # the script's checkpoints stay what a plain run writes
            **options,
        )
        callback._clip_logged_by_runner = True  # (its clip_grad_norm_ patch sees Lightning's clip)
        trainer.callbacks.append(callback)
        self.callbacks.append(callback)


def _starts_its_own_processes(trainer: Any) -> bool:
    """Whether Lightning will start the other ranks itself by running the script again
    (``strategy="ddp"`` with several devices outside torchrun: its subprocess launcher)."""
    strategy = getattr(trainer, "strategy", None)
    launcher = getattr(strategy, "launcher", None)
    environment = getattr(strategy, "cluster_environment", None)
    return (
        type(launcher).__name__ == "_SubprocessScriptLauncher"
        and environment is not None
        and not environment.creates_processes_externally
    )


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then(module)`` right after one of these modules is first imported."""

    def __init__(self, then: dict[str, Callable[[ModuleType], None]]) -> None:
        self.then = then

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.then:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, self.then[name])
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: Any, then: Callable[[ModuleType], None]) -> None:
        self.loader, self.then = loader, then

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.then(module)
