"""ZClip's and ``auto``'s rule for one step in one Triton launch (a GPU's path; issue 16).

On a device :class:`gradguard.clip.ZClip` and :class:`gradguard.clip.Auto` run their rule as device
tensors: ~20 (ZClip) to ~33 (``auto`` under SGD) small ops a step, each a kernel launch of a few µs of
host time, which a small model's step cannot hide. Here the same rule is one single-program kernel
over the same state tensors, read and written in place, with no host read: the threshold comes out
as the 0-D float32 tensor :meth:`gradguard.clip.ZClip.threshold` returns.

What it computes is :func:`gradguard.clip._zclip_step` and ``Auto._rule_step`` as they run on
tensors (``_TensorArith``): the same float64 state, the same update table and ramp table (read from
the device tensors the clipper made), the same order of operations; the tests hold the kernel to the
tensor path on every cap (``tests/test_kernels.py``, under Triton's interpreter: equal to 1e-12, the
rounding of a fused multiply-add, which the tensor path's ``addcmul`` may use; the kernel fuses
none: each operation rounded once, as separate ops are). Float64 numbers travel as their bits in an
int64 argument (Triton passes a Python float as float32).

Used where :func:`usable` (a CUDA norm, Triton importable, outside ``torch.compile`` tracing) and the
clipper's step is one the kernel knows (``Auto``'s trust cap and a tensor learning rate under SGD stay
on the tensor path). A kernel that fails once is not tried again (the tensor path from then on).
"""

from __future__ import annotations

import functools
import math
import os
import struct
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradguard._triton import module as triton_module
from gradguard._triton import on_device_of

__all__ = ["Step", "threshold", "usable"]

#: the step cap: none (ZClip; ``auto`` under an Adam-like optimizer), the first-norm cap, or the
#: Polyak cap (its fraction over the largest learning rate, ``polyak / lr``, a host number)
NO_CAP, FIRST_CAP, POLYAK_CAP = 0, 1, 2

_BROKEN: list[str] = []


class Step(NamedTuple):
    """What one step of a clipper's rule needs besides its state (:func:`threshold`)."""

    table: Tensor  # ZClip's update table, (warmup + 1, 3, 3) float64 on the device
    eps: Tensor  # ZClip's eps, (1,) float64 on the device
    zt2: Tensor  # z_thresh², (1,) float64 on the device
    warmup: int
    max_norm: float  # inf: none
    growth: float = math.inf  # auto's growth cap (inf: not auto)
    first: float | None = None  # auto's first-norm factor (None: its cap never set)
    cap: int = NO_CAP  # NO_CAP, FIRST_CAP or POLYAK_CAP
    loss: Tensor | None = None  # POLYAK_CAP: the step's loss (a 0-D device tensor)
    polyak_over_lr: float = math.nan  # POLYAK_CAP: polyak / the largest learning rate
    ramp: Tensor | None = None  # POLYAK_CAP with ramp: the ramp table, (warmup + 1,) float64


def usable(norm: Tensor) -> bool:
    """Whether the kernel takes a step on ``norm``: a CUDA tensor, Triton importable, not inside
    ``torch.compile`` tracing, and no failure of the kernel before."""
    return norm.is_cuda and not _BROKEN and not torch.compiler.is_compiling() and triton_module() is not None


def threshold(state: tuple[Tensor, ...], norm: Tensor, step: Step) -> Tensor | None:
    """One step of the rule on ``state`` ((μ, σ², n) as a (1, 3) float64 tensor; for ``auto`` also
    [anchor, growth cap] and [first norm, first-norm cap], (2,) each), updated in place; returns the
    step's threshold (0-D float32 on the device), or None where the kernel failed (then: the tensor
    path, from now on)."""
    try:
        return _launch(state, norm, step)
    except Exception as exc:  # a Triton that cannot compile or run here
        _BROKEN.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(
            f"gradguard: the Triton kernel of the clipping rule failed ({_BROKEN[-1][:200]}); running the "
            "rule as tensor ops from now on (same numbers, more launches a step).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _bits(x: float) -> int:
    """A float64's bits as an int64 (the kernel casts them back: Triton passes a Python float as float32)."""
    return int(struct.unpack("<q", struct.pack("<d", float(x)))[0])


def _launch(state: tuple[Tensor, ...], norm: Tensor, step: Step) -> Tensor:
    zs = state[0]
    auto = len(state) == 3
    anchor, first = (state[1], state[2]) if auto else (zs, zs)  # (unread without auto)
    out = torch.empty((), dtype=torch.float32, device=norm.device)
    loss = step.loss if step.loss is not None else zs
    ramp = step.ramp if step.ramp is not None else zs
    kernel = _build(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    with on_device_of(norm):
        _run(kernel, zs, anchor, first, norm, loss, ramp, out, step, auto)
    return out


def _run(
    kernel: Any, zs: Tensor, anchor: Tensor, first: Tensor, norm: Tensor, loss: Tensor, ramp: Tensor,
    out: Tensor, step: Step, auto: bool,
) -> None:  # fmt: skip
    kernel[(1,)](
        zs, anchor, first, norm.detach(), loss.detach(), step.table, step.eps, step.zt2, ramp, out,
        step.warmup, _bits(step.max_norm), _bits(step.growth),
        _bits(step.first if step.first is not None else math.nan), _bits(step.polyak_over_lr),
        AUTO=auto, FIRST=step.first is not None, CAP=step.cap, RAMP=step.ramp is not None,
        num_warps=1, enable_fp_fusion=False,  # one thread's scalar work; each operation rounded once
    )  # fmt: skip


@functools.lru_cache(maxsize=2)
def _build(interpreted: bool) -> Any:
    """The jitted kernel (built on first use: Triton reads ``TRITON_INTERPRET`` when it jits)."""
    triton = triton_module()
    assert triton is not None
    import triton.language as tl

    @triton.jit(do_not_specialize=["warmup", "max_norm", "growth", "first", "c"])
    def rule(zs, ac, fc, norm, loss, table, eps, zt2, ramp, out,  # type: ignore[no-untyped-def]
             warmup, max_norm, growth, first, c,
             AUTO: tl.constexpr, FIRST: tl.constexpr, CAP: tl.constexpr, RAMP: tl.constexpr):  # fmt: skip
        inf = float("inf")
        # the float64 arguments, from their bits (an int64; a small one arrives as an int32)
        max_norm = max_norm.to(tl.int64).to(tl.float64, bitcast=True)
        growth = growth.to(tl.int64).to(tl.float64, bitcast=True)
        first = first.to(tl.int64).to(tl.float64, bitcast=True)
        c = c.to(tl.int64).to(tl.float64, bitcast=True)
        # --- ZClip (_zclip_step): the row of the update table for n, then [μ, σ², n] ← A·s + B·[Δ, Δ², 1]
        mean, var, nf = tl.load(zs), tl.load(zs + 1), tl.load(zs + 2)
        n = nf.to(tl.int32)
        row = table + n * 9  # [[zt ×3], [A ×3], [B ×3]]
        zt = tl.load(row)
        a0, a1, a2 = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
        b0, b1, b2 = tl.load(row + 6), tl.load(row + 7), tl.load(row + 8)
        g = tl.load(norm).to(tl.float64)
        d = g - mean
        d = d + d * 0.0  # ±inf → NaN
        finite = d < inf
        std = tl.sqrt(var)
        z = d / (std + tl.load(eps))
        spike = z > zt
        off = tl.load(zt2) * std / z
        delta = tl.where(spike, off, d)
        new_mean = tl.where(finite, a0 * mean + b0 * delta, mean)
        tl.store(zs, new_mean)
        tl.store(zs + 1, tl.where(finite, a1 * var + b1 * (delta * delta), var))
        tl.store(zs + 2, tl.where(finite, a2 * nf + b2, nf))
        tau = tl.where(spike, mean + off, inf)
        if AUTO:  # --- auto (Auto._rule_step): the growth cap, the first-norm cap, the step cap
            done = finite & (n == warmup - 1)
            anchor, acap = tl.load(ac), tl.load(ac + 1)
            acap = tl.where(done, new_mean * growth, acap)
            tl.store(ac, tl.where(done, new_mean * 1.0, anchor))
            tl.store(ac + 1, acap)
            tau = tl.minimum(tau, acap, propagate_nan=tl.PropagateNan.ALL)
            first_norm, first_cap = tl.load(fc), tl.load(fc + 1)
            if FIRST:
                fresh = finite & (first_norm != first_norm)
                tl.store(fc, tl.where(fresh, g * 1.0, first_norm))
                tl.store(fc + 1, tl.where(fresh, g * first, first_cap))
            if CAP == 1:
                tau = tl.minimum(tau, first_cap, propagate_nan=tl.PropagateNan.ALL)
            if CAP == 2:
                f = tl.load(loss).to(tl.float64)
                cap = (f * c) / g
                cap = tl.where((f > 0) & (tl.abs(cap) < inf), cap, float("nan"))
                if RAMP:
                    cap = cap * tl.load(ramp + n)
                cap = tl.where(cap != cap, first_cap, cap)
                tau = tl.minimum(tau, cap, propagate_nan=tl.PropagateNan.ALL)
        tau = tl.minimum(tau, max_norm, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out, tau.to(tl.float32))

    return rule
