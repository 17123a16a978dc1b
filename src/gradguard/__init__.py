"""gradguard — find, explain and stop exploding gradients and NaN losses in PyTorch training.

Public API (everything else lives in the submodules ``gradguard.stats``, ``gradguard.clip``…)::

    guard = gradguard.Guard(model, optimizer, clip="auto")          # then guard.step(loss) per step
    gradguard.clip_grad_norm_(model.parameters(), max_norm=5.0)   # torch-compatible, sync-free
    clipper = gradguard.AutoClip(percentile=10)                     # or ZClip(), "auto", "norm:5"
"""

from gradguard._version import __version__
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
)
from gradguard.errors import GradGuardError, NonFiniteError
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
    "locate",
]
