"""One read of a list of gradients on a GPU: per-tensor norms and non-finite counts (Triton).

The torch path (:func:`gradguard.stats.tensor_norms`: one ``torch._foreach_norm`` per dtype) reads
the gradients once too, but over 291 separate tensors it runs at ~1.5× copy bandwidth on an H100
(bf16 ~2×). The kernels here read every gradient once, as one grid of fixed-size chunks over the
whole list (a table of pointers and sizes), and write per-chunk partial sums; a second tiny kernel
adds each tensor's partials in a fixed order (deterministic, no atomics) and takes the root.

Numerics are those of the torch path, checked against it (``tests/test_kernels.py``):

* float16/bfloat16/float32 accumulate in float32, float64 in float64; the result is float32, or
  float64 when any tensor is float64; a tensor with no elements has norm 0.
* NaN gives NaN, ±inf gives inf (NaN where a tensor holds both); a float32/bfloat16 tensor whose
  squares overflow float32 measures ``inf``, as torch's does. The non-finite count tells the two
  apart in the same read: an ``inf`` norm with a count of 0 is an overflow of finite values (what
  :meth:`gradguard._guard.measure.Meter.exact_total` then measures exactly).

Only CUDA tensors take this path in training (:func:`usable`); everything else — the CPU, other
norms than 1 and 2, other dtypes, strided views, ``torch.compile`` tracing, no Triton — keeps the
torch path (:func:`grad_norms` and :func:`scale_grads_` pick). Triton is imported on first use
only. The tests run the same kernels on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported) and compile them for sm_90 ahead of time.
Nothing here reads a device value on the host; the tables (pointers, sizes, chunks) are built on the
host from metadata and cached on the device, so a step with the same gradients copies nothing.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradguard import clip
from gradguard._triton import module as triton_module
from gradguard._triton import on_device_of
from gradguard.stats import tensor_norms

__all__ = [
    "MIN_ELEMENTS",
    "Layout",
    "NormsAndCounts",
    "grad_norms",
    "norms_and_counts",
    "scale_",
    "scale_grads_",
    "usable",
]

CHUNK = 32768  # elements one program reads (a multiple of BLOCK)
BLOCK = 2048  # elements one program reads per iteration
FINISH_BLOCK = 256  # partials the finishing kernel adds per iteration
NUM_WARPS = 8
# fused multiply-add in acc + x·x (as torch's CUDA build); said explicitly (Triton 3.9 warns when
# it is left to a default that 3.10 changes)
FP_FUSION = True
VECTOR_HINTS = True  # tell the compiler 16-byte-aligned tensors are (vector loads), where they are
# below this many elements in all, the torch path's one foreach launch costs less than two Triton
# launches (a guess until benchmarks/gpu.py measures the crossover on a GPU)
MIN_ELEMENTS = 1 << 20
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CACHE = 16  # layouts and pointer tables kept per kind (a training run uses one or two)


@dataclass(frozen=True)
class NormsAndCounts:
    """Per-tensor norms (float32, float64 when any tensor is) and non-finite element counts (int64),
    both 1-D in input order, on the tensors' device."""

    norms: Tensor
    nonfinite: Tensor


def usable(tensors: Sequence[Tensor], norm_type: float) -> bool:
    """Whether the kernels measure ``tensors`` in training: CUDA tensors of one device and the four
    float dtypes, contiguous, ``MIN_ELEMENTS`` or more in all, p = 1 or 2, Triton importable and not
    inside ``torch.compile`` tracing (host metadata only; a CPU list is refused at its first tensor)."""
    if norm_type not in (1.0, 2.0) or not tensors or not tensors[0].is_cuda or torch.compiler.is_compiling():
        return False
    index, total = tensors[0].get_device(), 0
    for t in tensors:
        if t.get_device() != index or t.dtype not in _DTYPES or not t.is_contiguous():
            return False
        total += t.numel()
    return total >= MIN_ELEMENTS and _triton() is not None


def grad_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Per-tensor norms: the Triton kernels where :func:`usable`, else the torch path
    (:func:`gradguard.stats.tensor_norms`); the same numbers either way, within float rounding."""
    if usable(tensors, norm_type):
        try:
            return _measure(tensors, float(norm_type)).norms
        except Exception as exc:  # a Triton that cannot compile here: the torch path from now on
            _give_up(exc)
    return tensor_norms(tensors, norm_type)


def scale_grads_(tensors: Sequence[Tensor], coef: Tensor) -> None:
    """Clip in place by a device coefficient: :func:`scale_` where :func:`usable`, else
    :func:`gradguard.clip.scale_` (the same values; on CUDA torch scales bfloat16/float16 gradients
    by a float32 coefficient one launch per tensor, the kernel in one)."""
    if coef.numel() == 1 and usable(tensors, 2.0) and coef.device == tensors[0].device:
        try:
            return _scale(tensors, coef)
        except Exception as exc:
            _give_up(exc)
    clip.scale_(tensors, coef)


def norms_and_counts(tensors: Sequence[Tensor], norm_type: float = 2.0) -> NormsAndCounts:
    """The p-norm (p = 1 or 2) and the number of non-finite elements of each tensor, in one read.

    The tensors: one device, contiguous, of float32/float16/bfloat16/float64 (checked: a clear error
    otherwise). Runs wherever Triton runs them: CUDA, or any device under ``TRITON_INTERPRET=1``.
    """
    return _measure(tensors, _check(tensors, norm_type))


def _measure(tensors: Sequence[Tensor], p: float) -> NormsAndCounts:
    """:func:`norms_and_counts` of checked tensors: two launches per dtype."""
    kernels = _kernels()
    device = tensors[0].device
    out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch.empty(len(tensors), dtype=out_dtype, device=device)
    counts = torch.empty(len(tensors), dtype=torch.int64, device=device)
    with on_device_of(tensors[0]):
        _measure_into(kernels, tensors, p, device, norms, counts)
    return NormsAndCounts(norms, counts)


def _measure_into(
    kernels: _Kernels,
    tensors: Sequence[Tensor],
    p: float,
    device: torch.device,
    norms: Tensor,
    counts: Tensor,
) -> None:
    """:func:`_measure`'s launches, on the tensors' device."""
    for dtype, idx in _by_dtype(tensors).items():
        group = [tensors[i] for i in idx]
        layout = _layout(group, idx, device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        part_sq = torch.empty(max(layout.chunks, 1), dtype=acc, device=device)
        part_bad = torch.empty(max(layout.chunks, 1), dtype=torch.int32, device=device)
        if layout.chunks:
            ptrs, aligned = _pointers(group, device)
            kernels.partials[(layout.chunks,)](
                ptrs, layout.sizes, layout.chunk_tensor, layout.chunk_index, part_sq, part_bad,
                DTYPE=kernels.types[dtype], ACC=kernels.types[acc], P=int(p), ALIGNED=aligned,
                CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
            )  # fmt: skip
        kernels.finish[(len(group),)](
            part_sq, part_bad, layout.chunk_first, layout.position, norms, counts,
            ACC=kernels.types[acc], P=int(p), FBLOCK=FINISH_BLOCK, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip


def scale_(tensors: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply every tensor in place by a one-element device tensor ``coef``, one write pass over
    the list, bit for bit what :func:`gradguard.clip.scale_` (``torch._foreach_mul_``) does on CUDA:
    the coefficient rounded to the tensor's dtype, the product in float32 (float64), rounded back.
    A coefficient of 1 (a step that needs no clipping) costs no read or write at all, where torch
    multiplies every element by it. (On CUDA torch takes its multi-tensor route only where the dtypes match: a float32 coefficient
    scales bfloat16 gradients one launch per tensor there.)"""
    _check(tensors, 2.0)
    if coef.numel() != 1 or coef.device != tensors[0].device:
        raise ValueError(
            f"scale_ needs a one-element coefficient on {tensors[0].device}, got shape {tuple(coef.shape)} "
            f"on {coef.device}. Pass gradguard.clip.coefficient(norm, max_norm) of the same device."
        )
    _scale(tensors, coef)


def _scale(tensors: Sequence[Tensor], coef: Tensor) -> None:
    """:func:`scale_` of checked tensors: one launch per dtype."""
    kernels = _kernels()
    device = tensors[0].device
    with on_device_of(tensors[0]):
        _scale_launches(kernels, tensors, coef, device)


def _scale_launches(kernels: _Kernels, tensors: Sequence[Tensor], coef: Tensor, device: torch.device) -> None:
    """:func:`_scale`'s launches, on the tensors' device."""
    for dtype, idx in _by_dtype(tensors).items():
        group = [tensors[i] for i in idx]
        layout = _layout(group, idx, device)
        if layout.chunks:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            ptrs, aligned = _pointers(group, device)
            kernels.scale[(layout.chunks,)](
                ptrs, layout.sizes, layout.chunk_tensor, layout.chunk_index, coef,
                DTYPE=kernels.types[dtype], ACC=kernels.types[acc], ALIGNED=aligned,
                CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
            )  # fmt: skip


# ----------------------------------------------------------------------------- checks and tables
def _check(tensors: Sequence[Tensor], norm_type: float) -> float:
    """``norm_type`` as a float, after refusing what the kernels cannot read (with the fix)."""
    p = float(norm_type)
    if p not in (1.0, 2.0):
        raise ValueError(f"the Triton norm kernels measure p = 1 or 2, got {norm_type!r}; use "
                         "gradguard.stats.tensor_norms for other p.")  # fmt: skip
    if not tensors:
        raise ValueError("no tensors to measure; gradguard.stats.tensor_norms([]) gives the empty result.")
    devices = {t.device for t in tensors}
    for t in tensors:
        if t.dtype not in _DTYPES or not t.is_contiguous() or len(devices) > 1:
            raise ValueError(
                f"the Triton kernels read contiguous float32/float16/bfloat16/float64 tensors on one device; "
                f"got a {t.dtype} tensor of shape {tuple(t.shape)} (contiguous: {t.is_contiguous()}) among "
                f"devices {sorted(map(str, devices))}. Use gradguard.stats.tensor_norms (grad_norms picks)."
            )
    return p


def _by_dtype(tensors: Sequence[Tensor]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


@dataclass(frozen=True)
class Layout:
    """The device tables of one group of tensors (depend on their sizes only): ``sizes`` (T),
    ``chunk_first`` (T + 1: the first chunk of each tensor), ``position`` (T: where each norm goes in
    the output), ``chunk_tensor`` and ``chunk_index`` (C: each chunk's tensor, and its place there:
    the chunk starts at element ``chunk_index * CHUNK``)."""

    chunks: int
    sizes: Tensor
    chunk_first: Tensor
    position: Tensor
    chunk_tensor: Tensor
    chunk_index: Tensor


def _layout(group: Sequence[Tensor], position: Sequence[int], device: torch.device) -> Layout:
    return _cached_layout(tuple(t.numel() for t in group), tuple(position), device, CHUNK)


@functools.lru_cache(maxsize=_CACHE)
def _cached_layout(
    sizes: tuple[int, ...], position: tuple[int, ...], device: torch.device, chunk: int
) -> Layout:
    per = [math.ceil(n / chunk) for n in sizes]
    first = [0]
    for k in per:
        first.append(first[-1] + k)
    chunk_tensor = [t for t, k in enumerate(per) for _ in range(k)]
    chunk_index = [j for k in per for j in range(k)]
    t = len(sizes)
    table = _to_device([*sizes, *first, *position, *chunk_tensor, *chunk_index], device)
    parts = table.split([t, t + 1, t, first[-1], first[-1]])
    return Layout(first[-1], *parts)


def _pointers(group: Sequence[Tensor], device: torch.device) -> tuple[Tensor, bool]:
    """The tensors' addresses as an int64 device tensor (cached: the caching allocator usually hands
    a step's gradients the addresses of the step before), and whether all start on a 16-byte
    boundary (vector loads; a view into a flat buffer, e.g. DDP's gradient buckets, may not)."""
    ptrs = tuple(t.data_ptr() for t in group)
    return _cached_pointers(ptrs, device), VECTOR_HINTS and all(p % 16 == 0 for p in ptrs)


@functools.lru_cache(maxsize=_CACHE)
def _cached_pointers(ptrs: tuple[int, ...], device: torch.device) -> Tensor:
    return _to_device(list(ptrs), device)


def _to_device(values: list[int], device: torch.device) -> Tensor:
    """An int64 tensor of ``values`` on ``device`` with no host sync: copied from pinned memory,
    which the cached result keeps alive (a CUDA graph replays the copy from the same buffer)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    host = torch.tensor(values, dtype=torch.int64, pin_memory=True)
    out = host.to(device, non_blocking=True)
    _KEEP.append(host)  # the copy reads it later; cached entries are few (bounded below)
    del _KEEP[: -4 * _CACHE]
    return out


_KEEP: list[Tensor] = []
_BROKEN: list[str] = []  # why the kernels failed once (then never tried again)


def _give_up(exc: Exception) -> None:
    _BROKEN.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(
        f"gradguard: the Triton norm kernel failed ({_BROKEN[-1][:200]}); measuring with torch's "
        "foreach norm from now on (same numbers, a little slower on a GPU).",
        RuntimeWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------- the kernels
def _triton() -> Any | None:
    """The ``triton`` module, or None where it is missing (or the kernels failed here once)."""
    return None if _BROKEN else triton_module()


@dataclass(frozen=True)
class _Kernels:
    partials: Any
    finish: Any
    scale: Any
    types: dict[torch.dtype, Any]  # torch dtype -> triton dtype
    interpreted: bool


def _kernels() -> _Kernels:
    """The jitted kernels (built on first use: Triton reads ``TRITON_INTERPRET`` when it jits)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return _build(interpreted)


@functools.lru_cache(maxsize=2)
def _build(interpreted: bool) -> _Kernels:
    triton = _triton()
    if triton is None:
        raise RuntimeError(
            "the Triton kernels need the `triton` package (pip install triton); "
            "gradguard.stats.tensor_norms measures without it."
        )
    import triton.language as tl

    @triton.jit
    def partials(ptrs, sizes, chunk_tensor, chunk_index, part_sq, part_bad,  # type: ignore[no-untyped-def]
                 DTYPE: tl.constexpr, ACC: tl.constexpr, P: tl.constexpr, ALIGNED: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        # one chunk of one tensor: the sum of x² (|x| for p = 1) and the count of non-finite x
        c = tl.program_id(0)
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_index + c) * CHUNK  # a known multiple of BLOCK: vector loads below
        end = tl.minimum(start + CHUNK, tl.load(sizes + t))
        base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
        if ALIGNED:
            base = tl.multiple_of(base, 16)
        acc = tl.zeros([BLOCK], dtype=ACC)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        lanes = tl.arange(0, BLOCK)
        full = start + (end - start) // BLOCK * BLOCK
        for off in range(start, full, BLOCK):  # whole blocks: no mask (vector loads)
            x = tl.load(base + off + lanes).to(ACC)
            if P == 2:
                acc += x * x
            else:
                acc += tl.abs(x)
            bad += ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
        tail = full + lanes  # the last, partial block (all masked when the chunk is whole)
        x = tl.load(base + tail, mask=tail < end, other=0.0).to(ACC)
        if P == 2:
            acc += x * x
        else:
            acc += tl.abs(x)
        bad += ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
        tl.store(part_sq + c, tl.sum(acc, axis=0))
        tl.store(part_bad + c, tl.sum(bad, axis=0))

    @triton.jit
    def finish(part_sq, part_bad, chunk_first, position, norms, counts,  # type: ignore[no-untyped-def]
               ACC: tl.constexpr, P: tl.constexpr, FBLOCK: tl.constexpr):  # fmt: skip
        # one tensor: its chunks' partials added in a fixed order, then the root
        t = tl.program_id(0)
        first = tl.load(chunk_first + t)
        last = tl.load(chunk_first + t + 1)
        acc = tl.zeros([FBLOCK], dtype=ACC)
        bad = tl.zeros([FBLOCK], dtype=tl.int64)
        for j in range(first, last, FBLOCK):
            idx = j + tl.arange(0, FBLOCK)
            acc += tl.load(part_sq + idx, mask=idx < last, other=0.0)
            bad += tl.load(part_bad + idx, mask=idx < last, other=0).to(tl.int64)
        total = tl.sum(acc, axis=0)
        if P == 2:
            if ACC == tl.float64:  # noqa: SIM108, SIM300 (plain if: Triton compiles statements)
                total = tl.sqrt(total)  # float64: rounded to nearest
            else:
                total = tl.sqrt_rn(total)  # float32: tl.sqrt is the approximate one on CUDA
        at = tl.load(position + t)
        tl.store(norms + at, total.to(norms.dtype.element_ty))
        tl.store(counts + at, tl.sum(bad, axis=0))

    @triton.jit
    def scale(ptrs, sizes, chunk_tensor, chunk_index, coef,  # type: ignore[no-untyped-def]
              DTYPE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr,
              CHUNK: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        # one chunk of one tensor, multiplied in place by coef (as torch: coef in DTYPE, product in ACC)
        c = tl.program_id(0)
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_index + c) * CHUNK  # a known multiple of BLOCK: vector loads below
        end = tl.minimum(start + CHUNK, tl.load(sizes + t))
        base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
        if ALIGNED:
            base = tl.multiple_of(base, 16)
        k = tl.load(coef).to(DTYPE).to(ACC)
        lanes = tl.arange(0, BLOCK)
        # a coefficient of 1 (a step that needs no clipping) reads and writes nothing: x·1 is x
        stop = tl.where(k == 1.0, start, end)
        full = start + (stop - start) // BLOCK * BLOCK
        for off in range(start, full, BLOCK):
            at = base + off + lanes
            tl.store(at, (tl.load(at).to(ACC) * k).to(DTYPE))
        tail = full + lanes
        x = tl.load(base + tail, mask=tail < stop, other=0.0)
        tl.store(base + tail, (x.to(ACC) * k).to(DTYPE), mask=tail < stop)

    types = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}  # fmt: skip
    return _Kernels(partials, finish, scale, types, interpreted)
