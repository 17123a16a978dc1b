"""GPU benchmark (issue 16): one read of the gradients, the guard's fixed cost, host syncs, CUDA graphs.

One prepared script for a session that has an H100/H200 (about 5 minutes there; every section is
guarded, so a failure is reported in its row and the script goes on). It prints markdown tables and
writes everything as JSON (``--out``).

1. Correctness on the device: the Triton kernels (gradguard._kernels) against the torch path —
   per-tensor norms (float32/bfloat16/float16/float64, NaN/inf/overflow/zeros) and the clip, bit for
   bit against ``torch._foreach_mul_``.
2. The 1.3B-parameter set (291 transformer-shaped tensors: a 24-layer, 2048-wide GPT with a 50257
   vocabulary and tied head, 1.31e9 parameters), fp32 and bf16: the one-read floor (half a copy of
   the same bytes as one flat buffer; and ``vector_norm`` over that flat buffer), torch's
   ``get_total_norm``, ``clip_grad_norm_``, ``_foreach_norm``; the guard's measure + clip + flags
   (its :class:`Meter`, the clip coefficient and the scale) on today's torch path and on the kernels;
   the kernels alone (norms + counts; scale) for a few chunk / block / warp settings.
3. A guarded GPT step (12 layers, 768 wide, context 1024, batch 8, bf16 autocast, fused AdamW,
   ``clip=1.0``) against a plain clipped one (``clip_grad_norm_(1.0)`` + the same optimizer):
   twin models, interleaved pairs, the median of the pair ratios.
4. The fixed cost on a tiny model (a 2×32 MLP, batch 32, fused AdamW): µs per step, guarded − plain,
   blocks of steps without a sync, interleaved; and the same with ``locate=False`` (the share of
   locate's per-step capture).
4b. Locate on the device: a forward failure whose place depends on the dropout mask (the replay
   must draw the same mask: the CUDA RNG state the capture reads) and one born in the backward (the
   output gradient kept on the device), each located by replay; the bad steps' time.
5. Host syncs of a guarded step with a fused optimizer: ``torch.cuda.set_sync_debug_mode("error")``
   over steps between two flushes, and the syncs counted ("warn") over 50 steps (one flush).
6. CUDA-graph capture: the guard's measure + clip alone, and a whole guarded step (success or the
   error, replayed 3 times).

Timings: CUDA events, the median of ``--reps`` repetitions after warm-up. ``--dry-run``: the CPU,
tiny sizes, every CPU-able row (the kernel rows under Triton's interpreter where triton is
installed), the CUDA-only rows reported as skipped; ``tests/test_kernels.py`` runs it.

Run: ``python benchmarks/gpu.py --out gpu.json`` (``--dry-run`` to check it on a CPU).
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # the kernel rows run on the CPU under Triton's interpreter (set before it loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import contextlib
import importlib.util
import json
import math
import platform
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradguard
import gradguard._guard.measure as measure_mod
from gradguard import _kernels as K
from gradguard import _rule_kernel as R
from gradguard import _step_kernel as S
from gradguard._guard.measure import Meter
from gradguard.clip import coefficient
from gradguard.clip import scale_ as torch_scale_
from gradguard.stats import LayerIndex, tensor_norms

# the clip threshold of a step that needs no clipping (coefficient 1); a clipping step's is half the
# norm (each call halves the gradients: a coefficient not rounded to 1 in bfloat16)
MAX_NORM = 1e30


@dataclass(frozen=True)
class Sizes:
    d: int  # the 1.3B set's width, layers and vocabulary
    layers: int
    vocab: int
    gpt: tuple[int, int, int, int, int, int]  # vocab, d, layers, heads, ctx, batch
    pairs: int  # GPT step pairs
    tiny_blocks: int  # fixed-cost blocks (each `tiny_steps` steps)
    tiny_steps: int


FULL = Sizes(2048, 24, 50257, (50304, 768, 12, 12, 1024, 8), 20, 10, 50)
DRY = Sizes(32, 1, 256, (128, 32, 2, 2, 16, 2), 3, 2, 5)


# ----------------------------------------------------------------------------- timing
def timer(device: torch.device) -> Callable[[Callable[[], Any], int, int], float]:
    """``time(fn, reps, warmup)``: the median ms of one call (CUDA events on a GPU)."""

    def on_cuda(fn: Callable[[], Any], reps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def on_cpu(fn: Callable[[], Any], reps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return on_cuda if device.type == "cuda" else on_cpu


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def guarded(name: str, out: dict[str, Any], fn: Callable[[], Any]) -> Any:
    """Run one section; an error is recorded (and printed), never raised."""
    try:
        return fn()
    except Exception as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "trace": traceback.format_exc()[-3000:]}
        print(f"[{name}] failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return None


def kernels_here(device: torch.device) -> str | None:
    """Why the kernel rows cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA (and not under TRITON_INTERPRET=1)"
    return None


@contextlib.contextmanager
def measure_path(kernel: bool) -> Iterator[None]:
    """The guard's Meter on the kernels or on today's torch path (``stats.tensor_norms``): the name
    measure.py measures with (``tensor_norms``; ``grad_norms`` once wired to the kernels) is
    pointed at one or the other, and the kernels' size floor lifted or raised to match."""
    names = [n for n in ("tensor_norms", "grad_norms") if hasattr(measure_mod, n)]
    saved, floor = {n: getattr(measure_mod, n) for n in names}, K.MIN_ELEMENTS
    for n in names:
        setattr(measure_mod, n, kernel_norms if kernel else tensor_norms)
    K.MIN_ELEMENTS = 0 if kernel else 1 << 62
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(measure_mod, n, fn)
        K.MIN_ELEMENTS = floor


def kernel_norms(tensors: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """The kernels' norms on any device they run on (the interpreter in a dry run; no fallback)."""
    return K.norms_and_counts(tensors, norm_type).norms


# ----------------------------------------------------------------------------- 1. correctness
def correctness(device: torch.device) -> dict[str, Any]:
    """The kernels against the torch path on this device: norms, flags, counts and the clip."""
    out: dict[str, Any] = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        ts = [
            (torch.randn(n, generator=g) * 3).to(device=device, dtype=dtype) for n in (0, 1, 7, 4099, 70001)
        ]
        ts += [t.clone() for t in ts[2:]]
        ts[5][3], ts[6][5], ts[7][0] = math.nan, math.inf, -math.inf
        ts.append(torch.full((100,), 6e4 if dtype == torch.float16 else 3e19, dtype=dtype, device=device))
        got, want = K.norms_and_counts(ts), tensor_norms(ts)
        same_flags = torch.equal(got.norms.isnan(), want.isnan()) and torch.equal(
            got.norms.isinf(), want.isinf()
        )
        fin = torch.isfinite(want)
        rel = float(((got.norms[fin] - want[fin]).abs() / want[fin].clamp_min(1e-30)).max())
        counts = [int((~torch.isfinite(t)).sum()) for t in ts]
        scaled, ref = [t.clone() for t in ts], [t.clone() for t in ts]
        coef = torch.tensor(
            0.37, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32
        )
        K.scale_(scaled, coef)
        torch._foreach_mul_(ref, coef)
        bitwise = all(torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)) for a, b in zip(scaled, ref))
        out[str(dtype)] = {
            "flags_same": same_flags,
            "max_rel_diff": rel,
            "counts_same": got.nonfinite.tolist() == counts,
            "scale_bitwise_same_as_foreach_mul": bitwise,
        }
    if device.type != "cuda":
        out["note"] = (
            "CPU dry run: torch's CPU mul_ keeps a float32 coefficient unrounded for 16-bit tensors, "
            "and the interpreter's bfloat16 cast truncates; on CUDA all four must be bitwise the same"
        )
    out["clipping rule kernel"] = rule_kernel_vs_tensor_ops(device)
    out["step kernel"] = step_kernel_vs_ops(device)
    return out


def step_kernel_vs_ops(device: torch.device) -> dict[str, Any]:
    """A step's math by its kernels (``gradguard._step_kernel``, their first run on a GPU) against the
    ops they replace, on this device. The measurement: norms of 1 to 3,000 tensors (log-normal; a 0,
    an inf, a NaN; huge) and losses (finite, NaN, inf); expected: the float64 norms, the row's loss, the
    probe (its NaNs and values) and the flag the same, the row's global norm the kernel's, which is
    within an ulp of the ops' (the float64 sum's order). The coefficient: norms and thresholds of every
    kind (0, tiny, huge, inf, NaN, negative; float32, float64 and bfloat16 thresholds); expected: bit
    for bit :func:`gradguard.clip.coefficient`, the threshold written as float32."""
    from gradguard._guard.measure import _Probe, _total, _wide

    g = torch.Generator(device="cpu").manual_seed(2)
    probe = _Probe(device)
    same, rel, cases = True, 0.0, 0
    for n in (1, 6, 1023, 1025, 3000):
        base = torch.exp(torch.randn(n, generator=g) * 4)
        variants = [base, base.clamp_max(1) * 3e38] + [base.index_fill(0, torch.tensor([n // 2]), v)
                                                       for v in (0.0, math.inf, math.nan)]  # fmt: skip
        for norms in (v.to(device) for v in variants):
            for loss_value in (0.75, math.nan, math.inf):
                loss, row = torch.tensor(loss_value, device=device), torch.empty(2, device=device)
                got = (
                    S.measure(norms, loss, None, row, probe.out, 2.0)
                    if S.usable(norms, 2.0) or device.type != "cuda"
                    else None
                )
                if got is None:
                    return {"fell back": list(S._BROKEN) or ["not usable here"]}
                kept = probe.out.clone()
                wide = _wide(norms, None)
                total = _total(wide, 2.0, torch.float32)
                want = torch.addcmul(probe.base, torch.stack([loss, total]), probe.zero)
                same &= (
                    torch.equal(got.wide.nan_to_num(), wide.nan_to_num())
                    and torch.equal(kept.isnan(), want.isnan())
                    and torch.equal(kept.nan_to_num(), want.nan_to_num())
                    and bool(got.bad) == bool(want[0].isnan().any())
                    and _same_bits(row[0], loss)
                    and _same_bits(row[1], got.total)
                )
                t, w = float(got.total), float(total)
                if math.isfinite(w) and w:
                    rel = max(rel, abs(t - w) / w)
                cases += 1
    return {"cases": cases, "same norms, probe and flag": same, "max_rel_diff of the global norm": rel,
            "coefficient": _coefficient_kernel_vs_ops(device), "fell back": list(S._BROKEN)}  # fmt: skip


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Two 0-D float32 tensors hold the same number (any NaN matches a NaN)."""
    return bool(a.isnan() and b.isnan()) or bool(a.view(torch.int32) == b.view(torch.int32))


def _coefficient_kernel_vs_ops(device: torch.device) -> dict[str, Any]:
    """:func:`gradguard._step_kernel.coefficient` against :func:`gradguard.clip.coefficient` (see
    :func:`step_kernel_vs_ops`)."""
    values = [0.0, 1e-45, 1e-9, 0.5, 1.0, 3.0, 1e30, 3.4e38, math.inf, math.nan, -1.0]
    eps = torch.tensor(1e-6, device=device)
    same, cases = True, 0
    for n in values[:-1]:
        norm = torch.tensor(n, device=device)
        finite_eps = torch.where(torch.isfinite(norm), eps, torch.tensor(math.nan, device=device))
        for t in values:
            for dtype in (torch.float32, torch.float64, torch.bfloat16):
                tau = torch.tensor(t, dtype=dtype, device=device)
                for nonnegative in (False, True) if t >= 0 else (False,):
                    want = coefficient(norm, tau, finite_eps=finite_eps, nonnegative=nonnegative)
                    out = torch.full((), -7.0, device=device)
                    put = torch.full((), -7.0, device=device)
                    if not S.coefficient(norm, tau, finite_eps, out, put, nonnegative):
                        return {"fell back": list(S._BROKEN)}
                    same &= _same_bits(out, want) and _same_bits(put, tau.float())
                    cases += 1
    return {"cases": cases, "bit for bit clip.coefficient": same}


def rule_kernel_vs_tensor_ops(device: torch.device) -> dict[str, Any]:
    """ZClip's and auto's rule by its kernel (``gradguard._rule_kernel``, its first run on a GPU) and as
    tensor ops on this device, over 90 steps of norms (log-normal, spikes, NaN, inf, 0) and losses
    (NaN, 0, negative): the launches, and the largest relative difference of the thresholds (1e-12
    expected: the rounding of a fused multiply-add in the tensor path's ``addcmul``)."""
    import random

    import gradguard.clip as C

    rng = random.Random(1)
    stream = [
        (math.exp(rng.gauss(0, 0.4)) * (25.0 if i % 17 == 16 else 1.0), rng.uniform(0.1, 3))
        for i in range(90)
    ]
    stream[7], stream[11], stream[13] = (math.nan, 1.0), (math.inf, 1.0), (0.0, 1.0)
    stream[20], stream[21], stream[22] = (1.0, math.nan), (1.0, 0.0), (1.0, -0.5)
    params = [nn.Parameter(torch.zeros(3, device=device))]
    configs: dict[str, Callable[[], C.NormClipper]] = {
        "zclip": lambda: C.ZClip(warmup=5),
        "auto, SGD": lambda: _bound(C.Auto(**C.Auto.SPEC, warmup=5), torch.optim.SGD(params, lr=0.3)),
        "auto, AdamW": lambda: _bound(C.Auto(**C.Auto.SPEC, warmup=5), torch.optim.AdamW(params)),
    }
    out: dict[str, Any] = {}
    for name, make in configs.items():
        launches: list[int] = []
        kernel = _rule_taus(make, stream, device, launches, kernel=True)
        tensors = _rule_taus(make, stream, device, [], kernel=False)
        same_kind = all(math.isfinite(a) == math.isfinite(b) for a, b in zip(kernel, tensors))
        rel = max(
            (abs(a - b) / abs(b) for a, b in zip(kernel, tensors) if math.isfinite(b) and b), default=0.0
        )
        out[name] = {"kernel launches": len(launches), "same finiteness": same_kind, "max_rel_diff": rel}
    out["fell back"] = list(R._BROKEN)
    return out


def _rule_taus(
    make: Callable[[], Any],
    stream: list[tuple[float, float]],
    device: torch.device,
    launches: list[int],
    kernel: bool,
) -> list[float]:
    """The thresholds of a fresh clipper over ``stream``: its rule by the kernel (launches counted) or as
    tensor ops (on a CPU, a dry run: the device path pinned, the kernel interpreted)."""
    import gradguard.clip as C

    real_launch, real_usable, pinned = R._launch, R.usable, C._PIN_DEVICE_PATH

    def launch(*args: Any) -> Any:
        launches.append(1)
        return real_launch(*args)

    R._launch = launch  # type: ignore[assignment]
    C._PIN_DEVICE_PATH = True  # (a CPU: the device path, not the host floats)
    if not kernel:
        R.usable = lambda norm: False  # type: ignore[assignment]
    elif device.type != "cuda":
        R.usable = lambda norm: not R._BROKEN  # type: ignore[assignment]  # (the interpreter)
    try:
        clipper = make()
        return [_tau(clipper, g, f, device) for g, f in stream]
    finally:
        R._launch, R.usable, C._PIN_DEVICE_PATH = real_launch, real_usable, pinned  # type: ignore[assignment]


def _bound(clipper: Any, optimizer: torch.optim.Optimizer) -> Any:
    clipper.attach(optimizer)
    return clipper


def _tau(clipper: Any, norm: float, loss: float, device: torch.device) -> float:
    clipper.observe_loss(torch.tensor(loss, device=device))
    return float(clipper.threshold(torch.tensor(norm, device=device)))


# ----------------------------------------------------------------------------- 2. the 1.3B set
def transformer_shapes(d: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """291 tensors at d=2048, 24 layers: the tied embedding, 12 per block, the final norm."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, d))]
    for i in range(layers):
        for name, shape in (
            ("ln1.weight", (d,)), ("ln1.bias", (d,)),
            ("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
            ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
            ("ln2.weight", (d,)), ("ln2.bias", (d,)),
            ("mlp.fc.weight", (4 * d, d)), ("mlp.fc.bias", (4 * d,)),
            ("mlp.proj.weight", (d, 4 * d)), ("mlp.proj.bias", (d,)),
        ):  # fmt: skip
            shapes.append((f"h.{i}.{name}", shape))
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def param_set(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> tuple[list[str], list[Tensor]]:
    """Parameters (uninitialised) with random gradients of the 1.3B set's shapes."""
    names, params = [], []
    for name, shape in transformer_shapes(sizes.d, sizes.layers, sizes.vocab):
        p = torch.empty(shape, dtype=dtype, device=device, requires_grad=True)
        p.grad = torch.randn(shape, dtype=dtype, device=device) * 1e-3
        names.append(name)
        params.append(p)
    return names, params


# (chunk, block, warps, vector hints): the defaults first; one without the alignment hints (a fallback
# should a Triton refuse them)
KERNEL_CONFIGS = [
    (K.CHUNK, K.BLOCK, K.NUM_WARPS, True),
    (K.CHUNK, K.BLOCK, K.NUM_WARPS, False),
    (16384, 1024, 4, True),
    (65536, 4096, 8, True),
    (131072, 4096, 16, True),
]


def big_set(sizes: Sizes, dtype: torch.dtype, device: torch.device, reps: int, warmup: int) -> dict[str, Any]:
    """The rows of one dtype: ms per call, and the ratio to the one-read floor."""
    names, params = param_set(sizes, dtype, device)
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads)
    gs: list[Tensor] = grads  # type: ignore[assignment]
    numel = sum(g.numel() for g in gs)
    time_ms = timer(device)
    rows: dict[str, Any] = {"tensors": len(gs), "parameters": numel, "bytes": numel * gs[0].element_size()}
    flat = torch.cat([g.reshape(-1) for g in gs])
    rows["one read (half a copy of one flat buffer)"] = copy_ms(flat, time_ms, reps, warmup) / 2
    rows["vector_norm over one flat buffer"] = time_ms(lambda: torch.linalg.vector_norm(flat), reps, warmup)
    rows["torch get_total_norm"] = guarded_time(  # (torch >= 2.6 only)
        lambda: torch.nn.utils.get_total_norm(gs), time_ms, reps, warmup
    )
    rows["torch clip_grad_norm_"] = time_ms(
        lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM), reps, warmup
    )
    rows["torch _foreach_norm"] = time_ms(lambda: torch._foreach_norm(gs), reps, warmup)
    meter = Meter(params, 2.0, LayerIndex(names), None)

    def guard_measure_clip(scale: Callable[[list[Tensor], Tensor], None], clips: bool) -> Callable[[], Any]:
        def run() -> Tensor:
            m = meter.measure(None)
            scale(m.grads, coefficient(m.total, 0.5 * m.total if clips else MAX_NORM))
            return m.bad

        return run

    with measure_path(kernel=False):
        rows["guard measure + flags (torch path)"] = time_ms(lambda: meter.measure(None), reps, warmup)
        rows["guard measure + clip + flags (torch path)"] = time_ms(
            guard_measure_clip(torch_scale_, False), reps, warmup
        )
        rows["guard measure + clip + flags, clipping (torch path)"] = time_ms(
            guard_measure_clip(torch_scale_, True), reps, warmup
        )
    why_not = kernels_here(device)
    if why_not is not None:
        rows["kernel rows"] = f"skipped: {why_not}"
        return rows
    configs = KERNEL_CONFIGS if device.type == "cuda" else KERNEL_CONFIGS[:1]
    best: tuple[float, tuple[int, int, int, bool]] | None = None
    saved = (K.CHUNK, K.BLOCK, K.NUM_WARPS, K.VECTOR_HINTS)
    for config in configs:
        K.CHUNK, K.BLOCK, K.NUM_WARPS, K.VECTOR_HINTS = config
        ms = guarded_time(lambda: K.norms_and_counts(gs), time_ms, reps, warmup)
        chunk, block, warps, hints = config
        rows[f"kernel norms + counts (chunk {chunk}, block {block}, {warps} warps, hints {hints})"] = ms
        if isinstance(ms, float) and (best is None or ms < best[0]):
            best = (ms, config)
    K.CHUNK, K.BLOCK, K.NUM_WARPS, K.VECTOR_HINTS = best[1] if best else saved
    rows["kernel config used below"] = list(best[1]) if best else None
    if best:
        want, got = tensor_norms(gs), K.norms_and_counts(gs).norms
        rows["kernel vs torch norms: max relative difference"] = float(((got - want).abs() / want).max())
    rows["kernel norms over one flat buffer"] = guarded_time(
        lambda: K.norms_and_counts([flat]), time_ms, reps, warmup
    )
    one = torch.ones((), device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    near = torch.full_like(one, 0.75)  # (clipping: every element read and written)
    rows["kernel scale_ (coefficient 1: no clip needed)"] = guarded_time(
        lambda: K.scale_(gs, one), time_ms, reps, warmup
    )
    rows["kernel scale_ (clipping)"] = guarded_time(lambda: K.scale_(gs, near), time_ms, reps, warmup)
    rows["torch _foreach_mul_ (clipping)"] = time_ms(lambda: torch._foreach_mul_(gs, near), reps, warmup)
    for g in gs:  # fresh gradients: the clipping rows above shrank them (~1e-16 by now; the coefficient
        g.normal_(0.0, 1e-3)  # τ/(‖g‖ + 1e-6) then collapses and the clipping row below scaled zeros by 0)
    with measure_path(kernel=True):
        rows["guard measure + flags (kernel)"] = guarded_time(
            lambda: meter.measure(None), time_ms, reps, warmup
        )
        rows["guard measure + clip + flags (kernel)"] = guarded_time(
            guard_measure_clip(K.scale_, False), time_ms, reps, warmup
        )
        rows["guard measure + clip + flags, clipping (kernel)"] = guarded_time(
            guard_measure_clip(K.scale_, True), time_ms, reps, warmup
        )
    return rows


def copy_ms(flat: Tensor, time_ms: Callable[..., float], reps: int, warmup: int) -> float:
    """The time of one copy of ``flat`` (a read and a write of every byte)."""
    dst = torch.empty_like(flat)
    return time_ms(lambda: dst.copy_(flat), reps, warmup)


def guarded_time(fn: Callable[[], Any], time_ms: Callable[..., float], reps: int, warmup: int) -> float | str:
    try:
        return time_ms(fn, reps, warmup)
    except Exception as exc:
        return f"error: {type(exc).__name__}: {str(exc)[:500]}"


# ----------------------------------------------------------------------------- 3. GPT step
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied head


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def twins(make: Callable[[], nn.Module], device: torch.device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = make().to(device)
    b = make().to(device)
    b.load_state_dict(a.state_dict())
    return a, b


def gpt_step(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    vocab, d, layers, heads, ctx, batch = sizes.gpt
    plain, model = twins(lambda: GPT(vocab, d, layers, heads, ctx), device)
    opt_plain, opt = adamw(plain), adamw(model)
    guard = gradguard.Guard(model, opt, clip=1.0)
    x = torch.randint(0, vocab, (batch, ctx), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def loss_of(m: nn.Module) -> Tensor:
        with autocast:
            return F.cross_entropy(m(x).flatten(0, 1).float(), x.flatten())

    def step_plain() -> None:
        opt_plain.zero_grad(set_to_none=True)
        loss_of(plain).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt_plain.step()

    def step_guarded() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model)
        loss.backward()
        guard.step(loss)

    out: dict[str, Any] = {
        "model": f"GPT {layers} layers, {d} wide, context {ctx}, batch {batch}, vocab {vocab}, "
        "bf16 autocast, fused AdamW",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    paths = [("torch path", False)] + ([("kernel", True)] if kernels_here(device) is None else [])
    for label, kernel in paths:
        try:
            with measure_path(kernel):
                ratios, plain_ms, guard_ms = pairs(step_plain, step_guarded, sizes.pairs, device, steps=1)
        except Exception as exc:  # (one path's failure stays in its row)
            out[f"{label}: error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            continue
        out[f"plain clipped step ms (median; {label} pairs)"] = statistics.median(plain_ms)
        out[f"guarded step ms (median, {label})"] = statistics.median(guard_ms)
        out[f"guarded / plain ({label}; median of {len(ratios)} pair ratios)"] = statistics.median(ratios)
    return out


def pairs(
    a: Callable[[], None], b: Callable[[], None], n: int, device: torch.device, steps: int
) -> tuple[list[float], list[float], list[float]]:
    """Interleaved pairs (A B, B A, ...) after warm-up: per pair the ratio B / A and both times (ms
    per step of a block of ``steps`` steps with no sync inside)."""

    def block(fn: Callable[[], None]) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        return (time.perf_counter() - t0) * 1e3 / steps

    for _ in range(3):
        block(a), block(b)
    ratios, ta, tb = [], [], []
    for i in range(n):
        if i % 2:
            y, x = block(b), block(a)
        else:
            x, y = block(a), block(b)
        ta.append(x)
        tb.append(y)
        ratios.append(y / x)
    return ratios, ta, tb


# ----------------------------------------------------------------------------- 4. fixed cost
class MLP(nn.Module):
    def __init__(self, depth: int = 2, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(width, width)]
        for _ in range(depth - 1):
            layers += [nn.ReLU(), nn.Linear(width, width)]
        self.net = nn.Sequential(*layers, nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def tiny_setup(
    device: torch.device, **guard_kw: Any
) -> tuple[Callable[[], None], Callable[[], None], gradguard.Guard]:
    plain, model = twins(MLP, device)
    opt_plain, opt = adamw(plain), adamw(model)
    guard = gradguard.Guard(model, opt, **{"clip": 1.0, **guard_kw})
    x, y = torch.randn(32, 32, device=device), torch.randint(0, 10, (32,), device=device)

    def step_plain() -> None:
        opt_plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt_plain.step()

    def step_guarded() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)

    return step_plain, step_guarded, guard


def fixed_cost(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """The guard's fixed cost on a tiny model, and its split: the same with ``locate=False`` (no
    per-step capture for a replay: on a CPU nearly all of what is left, benchmarks/fixed_cost.py
    ``--locate-off``); the step's measurement math after the norms in one launch
    (``gradguard._step_kernel``) and as its 6 ops; and with the default clip, ``auto``: its rule in
    one launch (``gradguard._rule_kernel``) and as its ~30 small tensor ops (both kernels off), where a
    CPU runs both on host floats."""
    out: dict[str, Any] = {"model": "MLP 2x32, batch 32, fused AdamW, clip 1.0 (and auto)"}
    variants: tuple[tuple[str, dict[str, Any], bool], ...] = (
        ("guarded", {}, True),
        ("guarded, step math as tensor ops", {}, False),
        ("guarded, locate=False", {"locate": False}, True),
        ("guarded, clip auto", {"clip": "auto"}, True),
        ("guarded, clip auto, rule and step math as tensor ops", {"clip": "auto"}, False),
    )
    for label, kw, kernels in variants:
        with contextlib.ExitStack() as stack:
            if not kernels:
                stack.enter_context(_rule_kernel_off())
            step_plain, step_guarded, _ = tiny_setup(device, **kw)
            ratios, ta, tb = pairs(
                step_plain, step_guarded, sizes.tiny_blocks, device, steps=sizes.tiny_steps
            )
        diffs = [(y - x) * 1e3 for x, y in zip(ta, tb)]
        out["plain µs/step (median)"] = statistics.median(ta) * 1e3
        out[f"{label} µs/step (median)"] = statistics.median(tb) * 1e3
        out[f"{label} - plain µs/step (median of pair differences)"] = statistics.median(diffs)
        out[f"{label} / plain (median of pair ratios)"] = statistics.median(ratios)
    out["blocks"] = f"{sizes.tiny_blocks} pairs of {sizes.tiny_steps} steps, each variant"
    out["kernels fell back (their rows then ran the ops)"] = list(S._BROKEN) + list(R._BROKEN)
    return out


@contextlib.contextmanager
def _rule_kernel_off() -> Iterator[None]:
    """ZClip's / auto's rule and the step's measurement math as tensor ops (the path before their
    kernels), for the comparison."""
    usable, step_usable, takes_coefficient = R.usable, S.usable, S.takes_coefficient
    R.usable = lambda norm: False  # type: ignore[assignment]
    S.usable = lambda norms, p: False  # type: ignore[assignment]
    S.takes_coefficient = lambda total, tau: False  # type: ignore[assignment]
    try:
        yield
    finally:
        R.usable, S.usable, S.takes_coefficient = usable, step_usable, takes_coefficient  # type: ignore[assignment]


def crossover(device: torch.device, totals: tuple[int, ...], calls: int) -> dict[str, Any]:
    """Where the kernels start to pay: µs per call (host wall time of ``calls`` calls, one sync) of the
    kernels' norms and of the torch path over 64 tensors of ``total`` elements in all (float32) —
    below the crossover two Triton launches cost more than one foreach launch; set
    ``_kernels.MIN_ELEMENTS`` from it."""
    out: dict[str, Any] = {}
    for total in totals:
        ts = [torch.randn(max(1, total // 64), device=device) for _ in range(64)]
        for label, fn in (("torch", tensor_norms), ("kernel", kernel_norms)):
            for _ in range(min(calls, 3)):
                fn(ts)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(ts)
            sync(device)
            out[f"{total:.0e} elements, {label} µs/call"] = (time.perf_counter() - t0) / calls * 1e6
    return out


# ----------------------------------------------------------------------------- 4b. locate on the device
class FaultyNet(nn.Module):
    """A small net with dropout whose forward can be made to fail: ``fault="log"`` takes the log of
    the dropout output (-inf exactly where dropout dropped: the count tells whether a replay drew
    the same mask), ``fault="norm"`` divides by the norm of a row that is exactly zero (a finite
    forward, a NaN gradient: located in the backward from the output gradient the capture kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop, self.head = nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 4)
        self.fault: str | None = None
        self.dropped: int | None = None  # the original forward's zeros after dropout (fault "log")

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(torch.relu(self.lin(x)) + 1.0)  # > 0, but exactly 0 where dropout dropped
        if self.fault == "log":
            if self.dropped is None:  # (the original forward; a replay leaves it)
                self.dropped = int((h == 0).sum())
            h = torch.log(h)
        elif self.fault == "norm":
            keep = torch.ones(x.shape[0], 1, device=x.device)
            keep[0] = 0.0
            h = self.lin(x) * keep
            h = h / (torch.sqrt((h * h).sum(1, keepdim=True)) + 1.0)
        return self.head(h)


def locate_on(device: torch.device) -> dict[str, Any]:
    """Locate's capture and replay on the device (the CUDA RNG state, the output-gradient keeper on
    a device output): a forward failure whose place depends on the dropout mask, then a failure
    born in the backward; each located by replay; the bad steps' wall time."""
    torch.manual_seed(0)
    model = FaultyNet().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    faults = {5: "log", 9: "norm"}
    times: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as d:
        guard = gradguard.Guard(model, opt, clip=1.0, log_dir=d)
        for step in range(12):
            x, y = torch.randn(64, 16, device=device), torch.randint(0, 4, (64,), device=device)
            model.fault = faults.get(step)
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            guard.step(loss)
            sync(device)
            times[step] = (time.perf_counter() - t0) * 1e3
        guard.close()
        events = [
            json.loads(line)
            for path in Path(d).rglob("*events.jsonl")
            for line in path.read_text().splitlines()
        ]
    found = {e["step"]: e for e in events if e.get("type") == "nonfinite"}
    out: dict[str, Any] = {}
    for step, fault in faults.items():
        e = found.get(step, {})
        out[f"{fault} fault (step {step}): located"] = " ".join(
            str(e.get(k)) for k in ("phase", "op", "kind", "located_by")
        )
        out[f"{fault} fault: bad step ms"] = times[step]
    zeros = [i.get("zeros") for i in found.get(5, {}).get("evidence", {}).get("inputs", [])]
    out["replay drew the same dropout mask"] = zeros == [model.dropped]
    out["healthy step ms (median)"] = statistics.median(
        t for s, t in times.items() if s not in faults and s > 1
    )
    return out


# ----------------------------------------------------------------------------- 5. host syncs
def host_syncs(device: torch.device) -> dict[str, Any]:
    """Syncs of guarded steps with fused AdamW, on the torch path and on the kernels; and with the
    default clip, ``auto`` (its rule's kernel, or its tensor ops where Triton is missing)."""
    out: dict[str, Any] = {}
    paths = [("torch path", False, 1.0)] + ([("kernel", True, 1.0)] if kernels_here(device) is None else [])
    for label, kernel, clip in [*paths, ("torch path, clip auto", False, "auto")]:
        try:
            out[label] = _syncs(device, kernel=kernel, clip=clip)
        except Exception as exc:  # (one path's failure stays in its row)
            out[label] = {
                "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                "trace": traceback.format_exc()[-3000:],
            }
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out


def _syncs(device: torch.device, kernel: bool, clip: float | str = 1.0) -> dict[str, Any]:
    """'error' mode over the steps before the first flush; syncs counted ('warn') over 50 more (one flush)."""
    out: dict[str, Any] = {}
    with measure_path(kernel):
        _, step_guarded, guard = tiny_setup(device, clip=clip)
        for _ in range(3):
            step_guarded()
        torch.cuda.synchronize()
        steps = max(1, 45 - guard.step_count)  # stay before the flush at step 50 (every=50)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                step_guarded()
            out['set_sync_debug_mode("error")'] = f"passed: {steps} guarded steps, no host sync"
        except Exception as exc:  # (RuntimeError, or torch.AcceleratorError, or a guard error wrapping it)
            out['set_sync_debug_mode("error")'] = f"FAILED at step {guard.step_count}: {str(exc)[:500]}"
            out["trace"] = traceback.format_exc()[-3000:]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        first = guard.step_count
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(50):  # 50 consecutive steps: exactly one flush (every=50)
                    step_guarded()
            except Exception as exc:  # (the error mode above may have left the guard mid-step)
                out["warn mode error"] = f"at step {guard.step_count}: {type(exc).__name__}: {str(exc)[:500]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message).lower()]
    out["syncs over 50 guarded steps (warn mode, one flush)"] = len(syncs)
    out["steps counted"] = f"{first + 1}..{guard.step_count} (a flush every 50)"
    out["first sync messages"] = syncs[:3]
    return out


# ----------------------------------------------------------------------------- 6. CUDA graphs
def cuda_graphs(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["measure + clip (tiny MLP, torch path)"] = _capture_measure(device, kernel=False)
    if kernels_here(device) is None:
        out["measure + clip (tiny MLP, kernels)"] = _capture_measure(device, kernel=True)
    out["whole guarded step (tiny MLP)"] = _capture_step(device)
    return out


def _capture_measure(device: torch.device, kernel: bool) -> str:
    model = MLP().to(device)
    x, y = torch.randn(32, 32, device=device), torch.randint(0, 10, (32,), device=device)
    F.cross_entropy(model(x), y).backward()
    meter = Meter(list(model.parameters()), 2.0, LayerIndex([n for n, _ in model.named_parameters()]), None)

    def run() -> Tensor:
        with measure_path(kernel):
            m = meter.measure(None)
            (K.scale_ if kernel else torch_scale_)(m.grads, coefficient(m.total, 1.0))
        return m.bad

    prev = torch.cuda.current_stream()
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            bad = run()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        return f"captured and replayed 3 times (bad={bool(bad)})"
    except Exception as exc:
        torch.cuda.set_stream(prev)  # (a raising capture_end leaves torch.cuda.graph's stream current)
        return f"FAILED: {type(exc).__name__}: {str(exc)[:500]}"


def _capture_step(device: torch.device) -> str:
    model = MLP().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    guard = gradguard.Guard(model, opt, clip=1.0)
    x, y = torch.randn(32, 32, device=device), torch.randint(0, 10, (32,), device=device)

    def run() -> Tensor:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
        return loss

    prev = torch.cuda.current_stream()
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = run()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        return f"captured and replayed 3 times (loss {float(loss):.4f}, weights finite: {finite})"
    except Exception as exc:
        torch.cuda.set_stream(prev)  # (a raising capture_end leaves torch.cuda.graph's stream current)
        return f"FAILED: {type(exc).__name__}: {str(exc)[:500]}"


# ----------------------------------------------------------------------------- report
def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "gradguard measure.py wired to the kernels": "grad_norms" in Path(measure_mod.__file__).read_text(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:
        return None


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# gradguard GPU benchmark — {results['machine'].get('device')}", ""]
    lines += ["| | " + " | ".join(f"{k}" for k in results["machine"]) + " |"]
    lines += ["|---" * (len(results["machine"]) + 1) + "|"]
    lines += ["| machine | " + " | ".join(str(v) for v in results["machine"].values()) + " |", ""]
    sets = {k: v for k, v in results.get("1.3B set", {}).items() if isinstance(v, dict) and "error" not in v}
    if sets:
        names = [n for n in next(iter(sets.values())) if n not in ("tensors", "parameters", "bytes")]
        header = " | ".join(f"{d} ms | {d} × floor" for d in sets)
        lines += [f"| 1.3B set (291 tensors) | {header} |", "|---" * (2 * len(sets) + 1) + "|"]
        for n in names:
            cells = []
            for rows in sets.values():
                v, floor = rows.get(n), rows.get("one read (half a copy of one flat buffer)")
                if isinstance(v, float) and isinstance(floor, float):
                    cells += [f"{v:.3f}", f"{v / floor:.2f}"]
                else:
                    cells += [str(v), ""]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    for section in (
        "correctness",
        "crossover",
        "GPT step",
        "fixed cost",
        "locate",
        "host syncs",
        "CUDA graphs",
    ):
        body = results.get(section)
        if not body:
            continue
        lines += [f"| {section} | |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in body.items() if k != "trace"]
        lines.append("")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes (checks the script)")
    ap.add_argument("--out", default="gpu.json", help="where the JSON results go")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip (e.g. 'GPT step')")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes, reps, warmup = (DRY, 2, 1) if args.dry_run else (FULL, args.reps, 3)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(device), "sizes": sizes.__dict__}
    cuda_only = "skipped: needs CUDA (dry run)" if device.type != "cuda" else None

    def section(name: str, fn: Callable[[], Any], needs_cuda: bool = False) -> None:
        if name in args.skip:
            return
        started = time.perf_counter()
        if needs_cuda and cuda_only:
            results[name] = {"skipped": cuda_only}
        else:
            value = guarded(name, results, fn)
            if value is not None:
                results[name] = value
        print(f"[{name}] {time.perf_counter() - started:.1f} s", flush=True)
        with open(args.out, "w") as f:  # after every section: a crash later keeps what was measured
            json.dump(results, f, indent=1, default=str)

    why_not = kernels_here(device)
    section("correctness", lambda: correctness(device) if why_not is None else {"skipped": why_not})
    results["1.3B set"] = {}
    for dtype in (torch.float32, torch.bfloat16):
        started = time.perf_counter()
        rows = guarded(f"1.3B set {dtype}", results, lambda d=dtype: big_set(sizes, d, device, reps, warmup))
        if rows is not None:
            results["1.3B set"][str(dtype).replace("torch.", "")] = rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[1.3B set {dtype}] {time.perf_counter() - started:.1f} s", flush=True)
        with open(args.out, "w") as f:  # (as after every section)
            json.dump(results, f, indent=1, default=str)
    totals, calls = ((640,), 1) if args.dry_run else ((10_000, 100_000, 1_000_000, 4_000_000, 16_000_000), 50)
    section(
        "crossover", lambda: crossover(device, totals, calls) if why_not is None else {"skipped": why_not}
    )
    section("GPT step", lambda: gpt_step(sizes, device))
    section("fixed cost", lambda: fixed_cost(sizes, device))
    section("locate", lambda: locate_on(device))
    section("host syncs", lambda: host_syncs(device), needs_cuda=True)
    section("CUDA graphs", lambda: cuda_graphs(device), needs_cuda=True)
    results["seconds"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(markdown(results))
    print(f"\n{results['seconds']:.0f} s; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
