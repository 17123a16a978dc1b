"""Triton for gradguard's kernels (:mod:`gradguard._kernels`, :mod:`gradguard._rule_kernel`): the
module, imported on first use (never where no kernel runs), and the device a launch runs on."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["module", "on_device_of"]


def module() -> Any | None:
    """The ``triton`` module, or None where it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton


def on_device_of(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """``t``'s CUDA device made current for a launch where another one is (Triton launches on the
    current device); nothing to do otherwise (the usual case; a CPU tensor under the interpreter)."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
