"""Torch's global hooks and the wrapped torch functions through which the runner listens: installed
on enter, restored on exit, and taken off in a forked child (a DataLoader worker)."""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gradguard.errors import GradGuardError
from gradguard.locate import replaying

__all__ = ["ACTIVE", "Patches"]

_is_compiling = torch.compiler.is_compiling  # looked up once: every hook call asks

# ----------------------------------------------------------------------------- hooks and wrappers
ACTIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # the active runners (ZeroCode)


def _in_forked_child() -> None:
    for zc in list(ACTIVE):
        zc.forked()
    ACTIVE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_forked_child)


class Patches:
    """Torch's global hooks and the wrapped torch functions of one :class:`ZeroCode` (installed on
    enter, restored on exit). Every wrapper passes straight through when the runner is off or
    while torch.compile traces, and a bug in gradguard never breaks the script's call."""

    def __init__(self, zc: Any) -> None:  # the ZeroCode (runner.py imports this module)
        self.zc = zc
        self._handles: list[Any] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._filter: Any = None

    def install(self) -> None:
        from torch.amp.grad_scaler import GradScaler
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.nn.utils import clip_grad
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        zc = self.zc
        # torch warns that global hooks fire "an extra time" for a torch.compile'd module: these
        # know (the compiled module is the root; its inner module is not one), so the script's
        # user does not need to read it
        warnings.filterwarnings(
            "ignore", message=r"Using `torch.compile\(module\)` when there are global hooks"
        )
        self._filter = warnings.filters[0]
        self._handles = [
            register_module_forward_pre_hook(self._guarded("a model's call", zc.on_call)),
            register_module_forward_hook(
                self._guarded("a model's return", zc.on_return), with_kwargs=True, always_call=True
            ),
            register_optimizer_step_pre_hook(self._guarded("optimizer.step", zc.on_step)),
        ]
        self._wrap(torch.autograd, "backward", self._backward)
        self._wrap(torch.optim.Optimizer, "add_param_group", self._add_param_group)
        self._wrap(torch.optim.Optimizer, "zero_grad", self._zero_grad)
        self._wrap(torch.nn.Module, "zero_grad", self._zero_grad)
        self._wrap(GradScaler, "scale", self._scale)
        self._wrap(GradScaler, "step", self._scaler_step)
        clip_norm = self._clip_norm(clip_grad.clip_grad_norm_)
        # clip_grad_norm_'s own total norm (a module global, looked up at each call)
        self._wrap(clip_grad, "_get_total_norm", self._total_norm)
        clip_with_norm = self._clip_with_norm(clip_grad._clip_grads_with_norm_)
        clip_value = self._clip_value(clip_grad.clip_grad_value_)
        for module in (clip_grad, torch.nn.utils):
            self._wrap(module, "clip_grad_norm_", lambda _: clip_norm)
            self._wrap(module, "clip_grad_value_", lambda _: clip_value)
        self._wrap(clip_grad, "_clip_grads_with_norm_", lambda _: clip_with_norm)
        self._wrap(torch.nn.utils, "clip_grads_with_norm_", lambda _: clip_with_norm)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._filter in warnings.filters:
            warnings.filters.remove(self._filter)  # type: ignore[attr-defined]
            warnings._filters_mutated()  # type: ignore[attr-defined]
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def _wrap(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        self._saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def _on(self) -> bool:
        return self.zc.active and not _is_compiling() and not replaying()

    def _guarded(self, where: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as a hook: off while torch.compile traces or the runner is off; gradguard's own
        bugs reported, not raised (a guard's stop — :class:`GradGuardError` — is raised)."""

        zc = self.zc  # (every module call of the script runs this: no attribute chain, no method call)

        def hook(*args: Any, **kwargs: Any) -> Any:
            if not zc.active or _is_compiling() or replaying():
                return None
            try:
                return fn(*args, **kwargs)
            except GradGuardError:
                raise
            except Exception as e:
                zc.internal_error(where, e)
                return None

        return hook

    def call(self, where: str, fn: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        """``fn(*args)`` unless the runner is off; gradguard's own bugs reported, not raised."""
        if not self._on():
            return default
        try:
            return fn(*args)
        except GradGuardError:
            raise
        except Exception as e:
            self.zc.internal_error(where, e)
            return default

    def _zero_grad(self, original: Callable[..., Any]) -> Callable[..., Any]:
        zc = self.zc

        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            zc.zero_grads += 1  # (a counter: whether the script zeroes between steps, _steps.watch_zeroing)
            if zc._losses:  # (rare: a backward with no step yet) maybe a batch the script dropped
                zc.on_zero_grad()
            return original(*args, **kwargs)

        return zero_grad

    def _backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            self.call("loss.backward()", self.zc.on_backward, tensors)
            result = original(tensors, *args, **kwargs)
            self.call("loss.backward()", self.zc.after_backward)
            return result

        return _like(original, backward)

    def _add_param_group(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def add_param_group(optimizer: Any, param_group: Any) -> Any:
            result = original(optimizer, param_group)
            self.call("Optimizer.add_param_group", self.zc.on_param_group, optimizer)
            return result

        return _like(original, add_param_group)

    def _scale(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def scale(scaler: Any, outputs: Any) -> Any:
            scaled = original(scaler, outputs)
            self.call("GradScaler.scale", self.zc.on_scale, scaler, outputs, scaled)
            return scaled

        return _like(original, scale)

    def _scaler_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def step(scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs or not scaler.is_enabled():
                return original(scaler, optimizer, *args, **kwargs)
            if not self.call("GradScaler.step", self.zc.on_scaler_step, scaler, optimizer, default=True):
                return None  # skipped: GradScaler.update() still learns of an overflow
            return original(scaler, optimizer)

        return _like(original, step)

    def _clip_norm(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def clip_grad_norm_(
            parameters: Any, max_norm: float, norm_type: float = 2.0, *args: Any, **kwargs: Any
        ) -> Any:
            self.call("clip_grad_norm_", self.zc.end_loss_code)  # before torch's norm pass
            self.zc.norm_type = float(norm_type)
            try:
                return original(parameters, max_norm, norm_type, *args, **kwargs)
            finally:
                self.zc.norm_type = self.zc.script_norms = None

        return _like(original, clip_grad_norm_)

    def _total_norm(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def _get_total_norm(
            tensors: Any,
            norm_type: float = 2.0,
            error_if_nonfinite: bool = False,
            foreach: bool | None = None,
        ) -> Any:
            if self.zc.norm_type is not None and not error_if_nonfinite and foreach is not False:
                total = self.call("clip_grad_norm_", self.zc.total_norm, tensors, norm_type)
                if total is not None:
                    return total
            return original(tensors, norm_type, error_if_nonfinite, foreach)

        return _like(original, _get_total_norm)

    def _clip_with_norm(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def clip_grads_with_norm_(
            parameters: Any, max_norm: float, total_norm: Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            if isinstance(parameters, Iterable) and not isinstance(parameters, (Tensor, list, tuple)):
                parameters = list(parameters)  # a generator: read once here, once by torch
            if not self.call(
                "clip_grad_norm_", self.zc.on_clip_norm, parameters, max_norm, total_norm, default=True
            ):
                return None
            return original(parameters, max_norm, total_norm, *args, **kwargs)

        return _like(original, clip_grads_with_norm_)

    def _clip_value(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def clip_grad_value_(parameters: Any, clip_value: float, *args: Any, **kwargs: Any) -> Any:
            if isinstance(parameters, Iterable) and not isinstance(parameters, (Tensor, list, tuple)):
                parameters = list(parameters)
            if not self.call("clip_grad_value_", self.zc.on_clip_value, parameters, clip_value, default=True):
                return None
            return original(parameters, clip_value, *args, **kwargs)

        return _like(original, clip_grad_value_)


def _like(original: Any, wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """``wrapper`` with the name and docstring of the torch function it stands in for."""
    for attr in ("__name__", "__qualname__", "__doc__"):
        with contextlib.suppress(AttributeError, TypeError):
            setattr(wrapper, attr, getattr(original, attr))
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper
