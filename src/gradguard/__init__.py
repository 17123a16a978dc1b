"""gradguard — find, explain and stop exploding gradients and NaN losses in PyTorch training.

Public API (everything else lives in the submodules ``gradguard.stats``, ``gradguard.clip``…)::

    guard = gradguard.Guard(model, optimizer, clip="auto")          # then guard.step(loss) per step
    gradguard.clip_grad_norm_(model.parameters(), max_norm=5.0)   # torch-compatible, sync-free
    clipper = gradguard.AutoClip(percentile=10)                     # or ZClip(), "auto", "norm:5"

``import gradguard`` does not import torch: the names that need it load their module on first
access (PEP 562), so the readers — ``gradguard.runlog``, ``gradguard.diagnose``, ``gradguard.report``
and the ``gradguard diagnose`` / ``gradguard report`` commands — work where torch is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from gradguard._version import __version__
from gradguard.errors import GradGuardError, NonFiniteError

if TYPE_CHECKING:
    from gradguard.clip import (
        AGC,
        Auto,
        AutoClip,
        Norm,
        PerLayer,
        Value,
        ZClip,
        clip_grad_agc_,
        clip_grad_norm_,
        clip_grad_value_,
        clip_grads_with_norm_,
        get_total_norm,
    )
    from gradguard.guard import Guard
    from gradguard.locate import locate

__all__ = [
    "AGC",
    "Auto",
    "AutoClip",
    "GradGuardError",
    "Guard",
    "NonFiniteError",
    "Norm",
    "PerLayer",
    "Value",
    "ZClip",
    "__version__",
    "clip_grad_agc_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "locate",
]

_CLIP_NAMES = (
    "AGC",
    "Auto",
    "AutoClip",
    "Norm",
    "PerLayer",
    "Value",
    "ZClip",
    "clip_grad_agc_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
)
# public name → the module that defines it (each needs torch, so each loads on first access)
_LAZY = {
    **dict.fromkeys(_CLIP_NAMES, "gradguard.clip"),
    "Guard": "gradguard.guard",
    "locate": "gradguard.locate",
}


def __getattr__(name: str) -> Any:
    """Load a public name's module on first access; a submodule (``gradguard.stats``) on first use."""
    if name in _LAZY:
        value = getattr(_import(_LAZY[name], name), name)
        globals()[name] = value  # later accesses skip this function
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return _import(f"{__name__}.{name}", name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _import(module: str, name: str) -> ModuleType:
    """``module``, with a clear error when what it needs is PyTorch and PyTorch is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise ModuleNotFoundError(
            f"gradguard.{name} needs PyTorch, which is not installed here ({e}); install it "
            "(pip install torch). Reading run directories does not need it: gradguard.runlog, "
            "gradguard.diagnose, gradguard.report and `gradguard diagnose/report` work without torch.",
            name=e.name,
        ) from e


class _Package(ModuleType):
    """The package's module type: keeps ``gradguard.locate`` the function, as ``__all__`` says.

    Importing the submodule ``gradguard.locate`` (the Guard does) makes Python set the package's
    attribute ``locate`` to that submodule; with lazy names nothing would set it back to the function.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name == "locate" and isinstance(value, ModuleType):
            value = getattr(value, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
