"""A step's measurement math in one Triton launch, and its clip coefficient in another (a GPU's
path; issue 16).

After the per-tensor norms, :meth:`gradguard._guard.measure.Meter.measure` makes the step's numbers
as six small device ops: the norms in float64 (the row's copy), the global norm, its float32,
``[loss, global norm]`` in the row, the non-finite probe and the bad flag. On a GPU each op is a
kernel launch of a few µs of host time, which a small model's step cannot hide. Here they are one
single-program kernel that writes the same tensors:

* ``wide``: the norms in float64 (exact);
* the global norm ``‖norms‖_p`` (p = 1 or 2) summed in float64, rounded once to float32 (the
  step's ``total``, its own tensor, and the row's second column);
* the row's first column: the loss as float32;
* the probe ``[[l·0, t·0], [l·0, 1e-6 + t·0]]`` (0 where finite, NaN where not) and the bad flag.

The clip coefficient (:func:`coefficient`) is :func:`gradguard.clip.coefficient` with the step's
1e-6-or-NaN (3–4 ops: ``add``, ``div``, ``fmin``, ``fmax``) in one launch, bit for bit, with an
adaptive threshold's write into the row.

Numerics: those of the ops, except the order of the float64 sum (torch's reduction tree against
the kernel's lanes), which may move the float64 norm by an ulp and so, rarely, its float32 rounding;
the tests hold the kernel to the ops (``tests/test_kernels.py``, under Triton's interpreter). Used
where :func:`usable` (float32 norms on a CUDA device, p = 1 or 2, Triton importable, outside
``torch.compile`` tracing); a kernel that fails once is not tried again (the ops from then on).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradguard._triton import module as triton_module
from gradguard._triton import on_device_of

__all__ = ["Measured", "coefficient", "measure", "takes_coefficient", "usable"]

BLOCK = 1024  # norms one iteration reads (a step with more tensors loops)
_BROKEN: list[str] = []


class Measured(NamedTuple):
    """What :func:`measure` made: the float64 norms, the float32 global norm (its own tensor) and the
    bad flag (a 0-D bool)."""

    wide: Tensor
    total: Tensor
    bad: Tensor


def usable(norms: Tensor, p: float) -> bool:
    """Whether the kernel takes the step: float32 norms on a CUDA device, p = 1 or 2, Triton
    importable, not inside ``torch.compile`` tracing, and no failure of the kernel before."""
    return (
        norms.is_cuda
        and norms.dtype is torch.float32
        and p in (1.0, 2.0)
        and not _BROKEN
        and not torch.compiler.is_compiling()
        and triton_module() is not None
    )


def measure(
    norms: Tensor, loss: Tensor, wide: Tensor | None, values: Tensor, probe: Tensor, p: float
) -> Measured | None:
    """One launch: ``wide`` (or a new float64 tensor) ← the norms, ``values`` ← ``[loss, global norm]``
    (float32, the row's first columns), ``probe`` (2 × 2 float32) ← the non-finite probe; returns the
    float64 norms, the global norm and the bad flag, or None where the kernel failed (then the ops,
    from now on). ``loss``: a 0-D float32 on the norms' device."""
    try:
        return _launch(norms, loss, wide, values, probe, p)
    except Exception as exc:  # a Triton that cannot compile or run here
        _fail(exc)
        return None


def takes_coefficient(total: Tensor, threshold: Tensor) -> bool:
    """Whether :func:`coefficient` takes the step: a float32 0-D global norm on a CUDA device, a
    one-element float threshold there, Triton importable, outside tracing, no failure before."""
    return (
        total.is_cuda
        and total.dtype is torch.float32
        and threshold.numel() == 1
        and threshold.is_floating_point()
        and threshold.device == total.device
        and not _BROKEN
        and not torch.compiler.is_compiling()
        and triton_module() is not None
    )


def coefficient(
    total: Tensor,
    threshold: Tensor,
    finite_eps: Tensor,
    out: Tensor,
    threshold_out: Tensor | None,
    nonnegative: bool,
) -> bool:
    """:func:`gradguard.clip.coefficient` with the guard's ``finite_eps`` and ``out`` in one launch
    (3–4 ops otherwise), bit for bit: ``out`` ← ``min(1, τ / (‖g‖ + ε))`` (τ rounded to float32; 1 where
    that is NaN; clamped at 0 unless ``nonnegative``), and ``threshold_out`` (the row's column, or None)
    ← τ as float32. False where the kernel failed (then the ops, from now on)."""
    try:
        kernel = _build_coefficient(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
        with on_device_of(total):
            kernel[(1,)](
                total, threshold.detach(), finite_eps, out, threshold_out if threshold_out is not None else out,
                PUT=threshold_out is not None, NONNEG=nonnegative, num_warps=1, enable_fp_fusion=False,
            )  # fmt: skip
        return True
    except Exception as exc:
        _fail(exc)
        return False


def _fail(exc: Exception) -> None:
    _BROKEN.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(
        f"gradguard: a Triton kernel of the step's math failed ({_BROKEN[-1][:200]}); making it with "
        "tensor ops from now on (same numbers, more launches a step).",
        RuntimeWarning,
        stacklevel=4,
    )


def _launch(
    norms: Tensor, loss: Tensor, wide: Tensor | None, values: Tensor, probe: Tensor, p: float
) -> Measured:
    n = norms.numel()
    device = norms.device
    wide = wide if wide is not None else torch.empty(n, dtype=torch.float64, device=device)
    total = torch.empty((), dtype=torch.float32, device=device)
    bad = torch.empty((), dtype=torch.bool, device=device)
    kernel = _build(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    with on_device_of(norms):
        kernel[(1,)](
            norms, loss.detach(), wide, values, probe, bad, total, n,
            P=int(p), BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False,  # each operation rounded once
        )  # fmt: skip
    return Measured(wide, total, bad)


@functools.lru_cache(maxsize=2)
def _build(interpreted: bool) -> Any:
    """The jitted kernel (built on first use: Triton reads ``TRITON_INTERPRET`` when it jits)."""
    triton = triton_module()
    assert triton is not None
    import triton.language as tl

    @triton.jit(do_not_specialize=["n"])
    def step(norms, loss, wide, values, probe, bad, total, n,  # type: ignore[no-untyped-def]
             P: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        lanes = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for off in range(0, n, BLOCK):
            at = off + lanes
            x = tl.load(norms + at, mask=at < n, other=0.0).to(tl.float64)
            tl.store(wide + at, x, mask=at < n)
            if P == 2:
                acc += x * x
            else:
                acc += tl.abs(x)
        s = tl.sum(acc, axis=0)
        if P == 2:
            s = tl.sqrt(s)  # float64: rounded to nearest
        t = s.to(tl.float32)
        f = tl.load(loss)
        tl.store(values, f)
        tl.store(values + 1, t)
        tl.store(total, t)
        fz = f * 0.0  # 0 where finite, NaN where not (as base + values·0)
        tz = t * 0.0
        tl.store(probe, 0.0 + fz)
        tl.store(probe + 1, 0.0 + tz)
        tl.store(probe + 2, 0.0 + fz)
        tl.store(probe + 3, 1e-6 + tz)
        tl.store(bad, (fz != fz) | (tz != tz))

    return step


@functools.lru_cache(maxsize=2)
def _build_coefficient(interpreted: bool) -> Any:
    """The jitted coefficient kernel (see :func:`_build`)."""
    triton = triton_module()
    assert triton is not None
    import triton.language as tl

    @triton.jit
    def coef(total, threshold, eps, out, threshold_out,  # type: ignore[no-untyped-def]
             PUT: tl.constexpr, NONNEG: tl.constexpr):  # fmt: skip
        tau = tl.load(threshold).to(tl.float32)
        c = tl.div_rn(tau, tl.load(total) + tl.load(eps))  # IEEE: a NaN ε (non-finite norm) gives NaN
        c = tl.where(c < 1.0, c, 1.0)  # fmin with 1: NaN → 1
        if not NONNEG:
            c = tl.where(c < 0.0, 0.0, c)  # fmax with 0
        tl.store(out, c)
        if PUT:
            tl.store(threshold_out, tau)

    return coef
