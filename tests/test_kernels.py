"""The Triton norm and clip kernels (gradguard._kernels) against the torch path, on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``).

The torch path is :func:`gradguard.stats.tensor_norms` (what the guard measures with today) and
``torch._foreach_mul_`` (what :func:`gradguard.clip.scale_` clips with): the kernels must give the
same norms within float rounding, the same NaN / inf pattern, and bit-identical clipped gradients.

Triton decides at import whether it interprets, and in a test session torch has imported it long
before (an optimizer step imports ``torch._dynamo``, which imports triton): each check runs in one
worker process spawned with ``TRITON_INTERPRET=1`` set before anything imports triton. Where
Triton is not installed the kernel checks are skipped (the fallback test still runs).
"""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from gradguard import _kernels as K
from gradguard.clip import scale_
from gradguard.stats import tensor_norms

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# shapes around the kernel's block and chunk edges, an empty tensor and a large one
SHAPES = [
    (0,),
    (1,),
    (7,),
    (3, 33, 5),
    (K.BLOCK,),
    (K.BLOCK + 1,),
    (K.CHUNK - 1,),
    (K.CHUNK + 3,),
    (200_003,),
]
# float32 accumulation: torch's CPU path itself is up to 1.6e-5 off the exact norm of 200k elements
# here (p = 1, bfloat16); the kernels stay within 1e-7 of it (checked against float64: EXACT_RTOL)
RTOL = {torch.float32: 5e-5, torch.bfloat16: 5e-5, torch.float16: 5e-5, torch.float64: 1e-13}
EXACT_RTOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6, torch.float64: 1e-13}
ROOT = Path(__file__).resolve().parents[1]


def _interpret() -> None:
    """The worker's start: Triton interprets (set before its first import, in this process only)."""
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def worker() -> Iterator[ProcessPoolExecutor]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton): the kernel checks are skipped")
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: triton not yet imported
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_interpret) as pool:
        yield pool


@pytest.fixture
def run(worker: ProcessPoolExecutor) -> Callable[..., Any]:
    """``run(check, *args)``: ``check(*args)`` in the interpreter worker (its assertion errors here)."""
    return lambda check, *args: worker.submit(check, *args).result(timeout=300)


def assert_same_norms(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Same dtype, same NaN/inf pattern, finite values within ``rtol``."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    assert torch.equal(torch.isinf(got), torch.isinf(want)), (got, want)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=0.0)


def counts_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([int((~torch.isfinite(t)).sum()) for t in tensors], dtype=torch.int64)


def gradients(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) * 3 for s in SHAPES]


def poisoned(dtype: torch.dtype) -> list[torch.Tensor]:
    """One tensor per kind of value: NaN, inf, -inf, inf with NaN, zeros, huge, the dtype's max, ±inf."""
    huge = 6e4 if dtype == torch.float16 else 3e19  # float32 squares overflow (float16: its own max)
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(n, generator=g).to(dtype) for n in (9, 4099, 1, 40_000, 17, 5000, 3, 2)]
    ts[0][4] = math.nan
    ts[1][4098] = math.inf
    ts[2][0] = -math.inf
    ts[3][[7, 33_000]] = torch.tensor([math.inf, math.nan]).to(dtype)
    ts[4].zero_()
    ts[5][:100] = huge
    ts[6][:] = torch.finfo(dtype).max
    ts[7][:] = torch.tensor([-math.inf, math.inf]).to(dtype)
    return ts


# ----------------------------------------------------------------------------- checks (in the worker)
def check_norms(dtype: torch.dtype, p: float) -> None:
    ts = gradients(dtype)
    got = K.norms_and_counts(ts, p)
    assert_same_norms(got.norms, tensor_norms(ts, p), RTOL[dtype])
    assert torch.equal(got.nonfinite, torch.zeros(len(ts), dtype=torch.int64))
    exact = torch.stack([torch.linalg.vector_norm(t.double(), p) for t in ts]).to(got.norms.dtype)
    assert_same_norms(got.norms, exact, EXACT_RTOL[dtype])  # and closer to the exact norm


def check_poisoned(dtype: torch.dtype, p: float) -> None:
    ts = poisoned(dtype)
    got = K.norms_and_counts(ts, p)
    assert_same_norms(got.norms, tensor_norms(ts, p), RTOL[dtype])
    assert torch.equal(got.nonfinite, counts_of(ts))
    # the count tells an overflow of finite values (an inf norm, count 0) from a real inf
    overflowed = (torch.isinf(got.norms) & (got.nonfinite == 0)).tolist()
    wide_enough = [dtype == torch.float16 or dtype == torch.float64 or p == 1.0, dtype == torch.float16]
    assert overflowed[5:7] == [not w for w in wide_enough], (overflowed, got.norms)


def check_mixed_dtypes() -> None:
    ts = [t for i, d in enumerate(DTYPES) for t in gradients(d, seed=i)[2:6]]
    for p in (2.0, 1.0):
        assert_same_norms(K.norms_and_counts(ts, p).norms, tensor_norms(ts, p), 5e-5)  # float64 out
    no_double = [t for t in ts if t.dtype != torch.float64]
    assert K.norms_and_counts(no_double).norms.dtype == torch.float32


def check_many_chunks() -> None:
    """A tensor of more chunks than the finishing kernel adds per iteration (small chunks here)."""
    chunk, block = K.CHUNK, K.BLOCK
    K.CHUNK, K.BLOCK = 1024, 256
    try:
        ts = [torch.randn(K.FINISH_BLOCK * 1024 * 2 + 5), torch.randn(3)]
        ts[0][-1] = math.inf
        got = K.norms_and_counts(ts)
        assert_same_norms(got.norms, tensor_norms(ts), 5e-5)
        assert got.nonfinite.tolist() == [1, 0]
        ts[0][-1] = 1.0
        assert_same_norms(K.norms_and_counts(ts).norms, tensor_norms(ts), 5e-5)
    finally:
        K.CHUNK, K.BLOCK = chunk, block


def check_unaligned_views() -> None:
    """Gradients as views into one flat buffer (DDP's gradient buckets), not on a 16-byte boundary."""
    flat = torch.randn(10_000)
    ts = [flat[1:4100], flat[4100:4107], flat[4107:]]
    assert not K._pointers(ts, ts[0].device)[1]
    assert_same_norms(K.norms_and_counts(ts).norms, tensor_norms(ts), 5e-5)


def check_deterministic() -> None:
    ts = gradients(torch.float32)
    assert torch.equal(K.norms_and_counts(ts).norms, K.norms_and_counts(ts).norms)


def check_scale(dtype: torch.dtype, value: float) -> None:
    """What torch does on CUDA: the coefficient rounded to the gradients' dtype (its multi-tensor
    route needs one dtype; a float32 one scales bfloat16 per tensor, with a dynamic cast), the
    product in float32 (float64), rounded back. (Torch's CPU ``mul_`` keeps a float32 coefficient
    unrounded for bfloat16/float16; the kernels follow CUDA, where they run.)"""
    ts = gradients(dtype) + poisoned(dtype)
    coef = torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    acc = coef.dtype
    want = [(t.to(acc) * coef.to(dtype).to(acc)).to(dtype) for t in ts]
    if dtype in (torch.float32, torch.float64):
        same = [t.clone() for t in ts]
        torch._foreach_mul_(same, coef)
        assert all(torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)) for a, b in zip(same, want))
    K.scale_(ts, coef)
    for got, ref in zip(ts, want):
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
        if dtype == torch.bfloat16:  # the interpreter's float32 -> bfloat16 cast truncates (1 ulp);
            # on a GPU it rounds to nearest even (benchmarks/gpu.py checks against torch bit for bit)
            ulps = (got.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
            assert bool((ulps[torch.isfinite(ref)] <= 1).all()), ulps.max()
        else:
            assert torch.equal(got.nan_to_num(0.0), ref.nan_to_num(0.0))


def check_guard_on_the_kernels() -> None:
    """A guarded run measured by the kernels (the Meter's norms) equals the same run on the torch
    path: the same clipped weights, the same skipped step (a NaN gradient), the same last norm."""
    import gradguard
    import gradguard._guard.measure as measure_mod

    def run(kernel: bool) -> tuple[list[torch.Tensor], int, float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        names = [n for n in ("tensor_norms", "grad_norms") if hasattr(measure_mod, n)]  # (wired or not)
        saved, calls = {n: getattr(measure_mod, n) for n in names}, []

        def kernel_norms(ts: list[torch.Tensor], p: float = 2.0) -> torch.Tensor:
            calls.append(len(ts))
            return K.norms_and_counts(ts, p).norms

        for name in names if kernel else ():
            setattr(measure_mod, name, kernel_norms)
        uniform = measure_mod._uniform  # (a CPU model's norms skip grad_norms: routed through it here)
        if kernel:
            measure_mod._uniform = lambda params, p: None  # type: ignore[assignment]
        try:
            guard = gradguard.Guard(model, opt, clip=0.5, locate=False)
            for step in range(6):
                x = torch.randn(4, 8) * (1e6 if step == 3 else 1.0)
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                if step == 4:
                    next(model.parameters()).grad[0, 0] = math.nan  # type: ignore[index]
                guard.step(loss)
            norm = guard.last_grad_norm
            guard.close()
        finally:
            for name, fn in saved.items():
                setattr(measure_mod, name, fn)
            measure_mod._uniform = uniform  # type: ignore[assignment]
        assert len(calls) >= 6 * kernel  # the Meter measured every step with the kernels
        return [p.detach().clone() for p in model.parameters()], guard.skipped_steps, float(norm)  # type: ignore[arg-type]

    (w_k, skipped_k, norm_k), (w_t, skipped_t, norm_t) = run(True), run(False)
    assert skipped_k == skipped_t == 1
    assert math.isclose(norm_k, norm_t, rel_tol=1e-5)
    for a, b in zip(w_k, w_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def check_guard_clips_with_the_kernel() -> None:
    """Where the kernels read the gradients (CUDA; here every list, under the interpreter), a guard
    whose optimizer is not fused clips them with the kernel's one pass (``_kernels.scale_``), and
    the run is bit for bit the run that clips with ``torch._foreach_mul_`` (float32)."""
    import gradguard

    gradguard.clip._PIN_DEVICE_PATH = True  # a device's path (a CPU would not apply a coefficient of 1)

    def run(kernel: bool) -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
        usable, scale, calls = K.usable, K._scale, []

        def counted(ts: list[torch.Tensor], coef: torch.Tensor) -> None:
            calls.append(len(ts))
            scale(ts, coef)

        if kernel:
            K.usable = lambda ts, p: bool(ts) and float(p) == 2.0  # type: ignore[assignment]
            K._scale = counted  # type: ignore[assignment]
        try:
            guard = gradguard.Guard(model, opt, clip=0.5, locate=False)
            for step in range(6):
                x = torch.randn(4, 8) * (30.0 if step % 2 else 1.0)  # every other step clipped
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                guard.step(loss)
            guard.close()
        finally:
            K.usable, K._scale = usable, scale  # type: ignore[assignment]
        return [p.detach().clone() for p in model.parameters()], len(calls)

    try:
        (w_k, calls_k), (w_t, calls_t) = run(True), run(False)
    finally:
        gradguard.clip._PIN_DEVICE_PATH = False
    assert calls_k == 6 and calls_t == 0  # every taken step clipped through the kernel (coef 1: no write)
    assert all(torch.equal(a, b) for a, b in zip(w_k, w_t))


def check_refusals() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        K.norms_and_counts([torch.randn(4, 6).t()])
    with pytest.raises(ValueError, match="p = 1 or 2"):
        K.norms_and_counts([torch.randn(4)], math.inf)
    with pytest.raises(ValueError, match="no tensors"):
        K.norms_and_counts([])
    with pytest.raises(ValueError, match="one device"):
        K.norms_and_counts([torch.randn(4), torch.randn(2, device="meta")])
    with pytest.raises(ValueError, match="one-element coefficient"):
        K.scale_([torch.randn(4)], torch.ones(2))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_norms_match_the_torch_path(run: Callable[..., Any], dtype: torch.dtype, p: float) -> None:
    run(check_norms, dtype, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_nan_inf_overflow_and_zeros_as_the_torch_path(
    run: Callable[..., Any], dtype: torch.dtype, p: float
) -> None:
    run(check_poisoned, dtype, p)


def test_mixed_dtypes_keep_the_input_order(run: Callable[..., Any]) -> None:
    run(check_mixed_dtypes)


def test_many_chunks_per_tensor(run: Callable[..., Any]) -> None:
    run(check_many_chunks)


def test_views_not_on_a_16_byte_boundary(run: Callable[..., Any]) -> None:
    run(check_unaligned_views)


def test_deterministic(run: Callable[..., Any]) -> None:
    run(check_deterministic)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.37, 1.0, 0.0])
def test_scale_as_torch_on_cuda(run: Callable[..., Any], dtype: torch.dtype, value: float) -> None:
    run(check_scale, dtype, value)


def test_a_guarded_run_on_the_kernels_is_the_run_on_the_torch_path(run: Callable[..., Any]) -> None:
    run(check_guard_on_the_kernels)


def test_the_guard_clips_with_the_kernel_where_it_reads_the_gradients(run: Callable[..., Any]) -> None:
    run(check_guard_clips_with_the_kernel)


def test_refuses_what_it_cannot_read(run: Callable[..., Any]) -> None:
    run(check_refusals)


def test_the_cpu_keeps_the_torch_path() -> None:
    """No kernel on the CPU (nor for other p): the guard measures exactly as before."""
    ts = [t.clone() for t in gradients(torch.float32) * 8]  # (distinct tensors: scaled in place)
    assert not K.usable(ts, 2.0)
    assert torch.equal(K.grad_norms(ts, 2.0), tensor_norms(ts, 2.0))
    assert torch.equal(K.grad_norms([], 2.0), tensor_norms([], 2.0))
    assert not K.usable(ts, math.inf)
    coef = torch.tensor(0.37)
    want = [t.clone() for t in ts]
    scale_(want, coef)
    K.scale_grads_(ts, coef)
    assert all(torch.equal(a, b) for a, b in zip(ts, want))


# ----------------------------------------------------------------------------- the clipping rule's kernel
#: the configurations the kernel takes (the others — the trust cap, a tensor rate under SGD, AutoClip —
#: keep the tensor path, checked to give the same numbers too)
RULE_KERNEL_TAKES = {
    "zclip", "zclip-max_norm", "auto-sgd", "auto-adamw", "auto-first", "auto-unbound",
}  # fmt: skip


def check_rule_kernel(name: str) -> None:
    """The rule in one launch (``gradguard._rule_kernel``, interpreted here on CPU tensors) against
    the same rule as device tensor ops (``_TensorArith``): thresholds and final state to 1e-12, over a
    run's stream of norms (spikes, NaN, inf, 0) and losses (NaN, 0, negative)."""
    import gradguard.clip as C
    from adaptive_cases import assert_same_numbers, bound, norms_and_losses, params_with_grads, tau_of
    from gradguard import _rule_kernel as R

    launches = []
    real_launch, real_usable = R._launch, R.usable

    def launch(*args: Any) -> Any:
        launches.append(1)
        return real_launch(*args)

    ps = params_with_grads(0)
    kernel, tensors = bound(name, ps), bound(name, ps)
    R._launch = launch  # type: ignore[assignment]
    try:
        for norm, loss in norms_and_losses(1):
            want = tau_of(tensors, norm, loss, device_path=True)  # a CPU norm: the tensor ops
            R.usable = lambda t: not R._BROKEN  # type: ignore[assignment]  # the kernel, on the CPU
            try:
                got = tau_of(kernel, norm, loss, device_path=True)
            finally:
                R.usable = real_usable  # type: ignore[assignment]
            assert_same_numbers(got, want)
    finally:
        R._launch = real_launch  # type: ignore[assignment]
    assert not R._BROKEN, R._BROKEN
    assert len(launches) == (90 if name in RULE_KERNEL_TAKES else 0), name
    ks, ts = kernel.state_dict(), tensors.state_dict()
    for key, value in ts.items():
        if isinstance(value, torch.Tensor):
            for x, y in zip(ks[key].reshape(-1).tolist(), value.reshape(-1).tolist()):
                assert_same_numbers(x, y)
    assert isinstance(kernel, C.NormClipper)


def faulty_steps(
    guard: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, *,
    inf_loss_at: int | None = None, each: Callable[[], Any] | None = None,
) -> None:  # fmt: skip
    """Guarded steps of a small regression: a spiking batch every 13th step, a NaN gradient at step
    20, an infinite loss of finite gradients at ``inf_loss_at``; ``each()`` after every step."""
    for step in range(steps):
        x = torch.randn(16, 8) * (30.0 if step % 13 == 12 else 1.0)
        loss = (model(x) - x[:, :3]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if step == 20:
            next(model.parameters()).grad[0, 0] = math.nan  # type: ignore[index]
        guard.step(loss if step != inf_loss_at else loss.detach() + math.inf)
        if each is not None:
            each()


def check_guard_auto_on_the_rule_kernel() -> None:
    """A guarded SGD run with the default clip, ``auto``, whose rule runs in the kernel equals the run
    whose rule runs as tensor ops (the device path on the CPU): the same clipped weights and skipped
    step (a NaN gradient), the threshold from the kernel on every step."""
    import gradguard
    import gradguard.clip as C
    from gradguard import _rule_kernel as R

    def run(kernel: bool) -> tuple[list[torch.Tensor], int, int]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        launches: list[int] = []
        real_launch, real_usable = R._launch, R.usable

        def launch(*args: Any) -> Any:
            launches.append(1)
            return real_launch(*args)

        C._PIN_DEVICE_PATH = True  # (the device path: no host arithmetic on this CPU)
        R._launch = launch  # type: ignore[assignment]
        if kernel:
            R.usable = lambda t: not R._BROKEN  # type: ignore[assignment]
        try:
            guard = gradguard.Guard(model, opt, clip="auto", locate=False)
            faulty_steps(guard, model, opt, 40)
            guard.close()
        finally:
            C._PIN_DEVICE_PATH = False
            R._launch, R.usable = real_launch, real_usable  # type: ignore[assignment]
        return [p.detach().clone() for p in model.parameters()], guard.skipped_steps, len(launches)

    (w_k, skipped_k, launches_k), (w_t, skipped_t, launches_t) = run(True), run(False)
    assert not R._BROKEN, R._BROKEN
    assert (skipped_k, skipped_t, launches_k, launches_t) == (1, 1, 40, 0)
    for a, b in zip(w_k, w_t):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_a_guarded_auto_run_on_the_rule_kernel_is_the_run_on_tensor_ops(run: Callable[..., Any]) -> None:
    run(check_guard_auto_on_the_rule_kernel)


@pytest.mark.parametrize("name", ["zclip", "zclip-max_norm", "auto-sgd", "auto-sgd-tensor-lr", "auto-adamw",
                                  "auto-trust", "auto-first", "auto-unbound"])  # fmt: skip
def test_the_rule_kernel_gives_the_tensor_rules_numbers(run: Callable[..., Any], name: str) -> None:
    run(check_rule_kernel, name)


def test_the_rule_kernel_is_used_on_cuda_only_outside_compiling() -> None:
    """On a CPU (and where Triton is missing, or inside torch.compile) the rule stays tensor ops."""
    from gradguard import _rule_kernel as R

    assert not R.usable(torch.ones(()))


def check_step_kernel(p: float) -> None:
    """A step's measurement math in one launch (``gradguard._step_kernel``, interpreted here on CPU
    tensors) against the ops it replaces (``Meter.measure``'s: ``_wide``, ``_total``, ``stack``, the
    probe's ``addcmul`` and ``any``): the float64 norms and ``values``' loss bit for bit, the global norm
    (see below), the probe's NaN pattern and finite values, the flag;
    over norms of 0 to 3,000 tensors (the block's edges), with 0, tiny, huge, inf and NaN norms and
    finite, NaN, ±inf and -0.0 losses. (Under the interpreter the float64 sum comes out bit for bit
    torch's here; on a GPU its order may move it by an ulp.)"""
    from gradguard import _step_kernel as S
    from gradguard._guard.measure import _Probe, _total, _wide

    g = torch.Generator().manual_seed(0)
    probe = _Probe(torch.device("cpu"))
    cases = 0
    for n in (0, 1, 6, S.BLOCK - 1, S.BLOCK, S.BLOCK + 1, 3000):
        base = torch.exp(torch.randn(n, generator=g) * 4)
        variants = [base, base * 1e-30, base.clamp_max(1) * 3e38]
        if n:
            for value in (0.0, math.inf, math.nan):
                v = base.clone()
                v[n // 2] = value
                variants.append(v)
        for norms in variants:
            for loss_value in (0.75, -0.0, math.nan, math.inf, -math.inf):
                loss = torch.tensor(loss_value)
                row, into = torch.full((2,), -1.0), torch.full((n,), -1.0, dtype=torch.float64)
                got = S.measure(norms, loss, into, row, probe.out, p)
                assert got is not None and not S._BROKEN, S._BROKEN
                kept_probe = probe.out.clone()
                wide = _wide(norms, None)
                total = _total(wide, p, norms.dtype)
                values = torch.stack([loss, total])
                want_probe = torch.addcmul(probe.base, values, probe.zero)
                assert got.wide is into and torch.equal(into.isnan(), wide.isnan())
                assert torch.equal(into.nan_to_num(), wide.nan_to_num())
                assert row[0].view(torch.int32) == loss.view(torch.int32) or (row[0].isnan() and loss.isnan())
                t, w = float(got.total), float(total)
                assert (math.isnan(t) and math.isnan(w)) or t == w, (
                    n,
                    t,
                    w,
                )  # (here; a GPU's sum order may differ)
                assert float(row[1]) == t or math.isnan(t)
                assert torch.equal(kept_probe.isnan(), want_probe.isnan())
                assert torch.equal(kept_probe.nan_to_num(), want_probe.nan_to_num())
                assert bool(got.bad) == bool(want_probe[0].isnan().any())
                cases += 1
    assert cases == 5 * (3 + 6 * 6)


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_the_step_kernel_gives_the_ops_numbers(run: Callable[..., Any], p: float) -> None:
    run(check_step_kernel, p)


def check_guard_on_the_step_kernels(clip: str) -> None:
    """A guarded run whose step math runs in the kernels (forced on the CPU, interpreted: the
    measurement and the clip coefficient, an adaptive threshold written with it) equals the run on
    the ops (the device path on the CPU): the same weights, log rows and skipped steps (a NaN
    gradient, an infinite loss), one launch of each a step."""
    import gradguard
    import gradguard.clip as C
    from gradguard import _step_kernel as S

    def run(kernel: bool) -> tuple[list[torch.Tensor], list[list[float]], int, int]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        launches: list[int] = []
        real = S._launch, S.usable, S.coefficient, S.takes_coefficient

        def launch(*args: Any) -> Any:
            launches.append(1)
            return real[0](*args)

        def coefficient(*args: Any) -> Any:
            launches.append(1)
            return real[2](*args)

        C._PIN_DEVICE_PATH = True  # (the device path: no host arithmetic on this CPU)
        S._launch, S.coefficient = launch, coefficient  # type: ignore[assignment]
        if kernel:
            S.usable = lambda norms, p: not S._BROKEN and norms.dtype is torch.float32  # type: ignore[assignment]
            S.takes_coefficient = lambda total, tau: not S._BROKEN and tau.numel() == 1  # type: ignore[assignment]
        rows: list[list[float]] = []
        try:
            guard = gradguard.Guard(model, opt, clip=clip, locate=False, every=1000)
            last = lambda: rows.append(guard.monitor.last_row().nan_to_num(-7.0).tolist())  # type: ignore[union-attr]  # noqa: E731
            faulty_steps(guard, model, opt, 30, inf_loss_at=25, each=last)
            guard.close()
        finally:
            C._PIN_DEVICE_PATH = False
            S._launch, S.usable, S.coefficient, S.takes_coefficient = real  # type: ignore[assignment]
        return [p.detach().clone() for p in model.parameters()], rows, guard.skipped_steps, len(launches)

    (w_k, rows_k, skipped_k, launches_k), (w_t, rows_t, skipped_t, launches_t) = run(True), run(False)
    assert not S._BROKEN, S._BROKEN
    assert (skipped_k, skipped_t, launches_k, launches_t) == (2, 2, 60, 0)
    assert rows_k == rows_t
    assert (
        len({r[3] for r in rows_k}) > 2 or clip == "norm:1"
    )  # (an adaptive threshold, written by the kernel)
    for a, b in zip(w_k, w_t):
        assert torch.equal(a, b)


@pytest.mark.parametrize("clip", ["norm:1", "auto", "autoclip:10"])
def test_a_guarded_run_on_the_step_kernels_is_the_run_on_the_ops(run: Callable[..., Any], clip: str) -> None:
    run(check_guard_on_the_step_kernels, clip)


def check_coefficient_kernel() -> None:
    """The clip coefficient in one launch (``_step_kernel.coefficient``, interpreted) is bit for bit
    :func:`gradguard.clip.coefficient` with the guard's 1e-6-or-NaN: on zero, tiny, huge, infinite, NaN
    and negative norms and thresholds (±0; float32 and float64 thresholds), with and without the clamp
    at 0, and it writes the threshold as float32 where asked."""
    import gradguard.clip as C
    from gradguard import _step_kernel as S

    values = [0.0, -0.0, 1e-45, 1e-9, 0.5, 1.0, 3.0, 1e30, 3.4e38, math.inf, -math.inf, math.nan, -1.0]
    g = torch.Generator().manual_seed(0)
    norms = values + torch.exp(torch.randn(40, generator=g) * 5).tolist()
    eps = torch.tensor(1e-6)
    for n in norms:
        norm = torch.tensor(n)
        finite_eps = torch.where(torch.isfinite(norm), eps, torch.tensor(math.nan))
        for t in [*values, n * 0.3, n * 3.0]:
            for dtype in (torch.float32, torch.float64):
                tau = torch.tensor(t, dtype=dtype)
                for nonnegative in (False, True) if n >= 0 and t >= 0 else (False,):
                    want = C.coefficient(norm, tau, finite_eps=finite_eps, nonnegative=nonnegative)
                    out, put = torch.full((), -7.0), torch.full((), -7.0)
                    assert S.coefficient(norm, tau, finite_eps, out, put, nonnegative), S._BROKEN
                    assert out.view(torch.int32) == want.view(torch.int32) or (
                        out.isnan() and want.isnan()
                    ), (n, t)
                    assert put.view(torch.int32) == tau.float().view(torch.int32) or (
                        put.isnan() and tau.isnan()
                    )


def test_the_coefficient_kernel_is_the_coefficient_bit_for_bit(run: Callable[..., Any]) -> None:
    run(check_coefficient_kernel)


def check_device_path_launches(clip: str) -> tuple[int, float]:
    """A warm guarded step on a GPU's path (the device path pinned on the CPU, every kernel forced and
    interpreted): its device ops outside the optimizer's own step and its kernel launches."""
    from torch.utils._python_dispatch import _disable_current_modes

    import gradguard.clip as C
    from gradguard import _rule_kernel as R
    from gradguard import _step_kernel as S
    from test_guard_parts import _guard_ops

    real = S.usable, S.takes_coefficient, R.usable, S._launch, S.coefficient, R._launch
    launches: list[int] = []

    def one_launch(f: Callable[..., Any]) -> Callable[..., Any]:
        def launch(*args: Any) -> Any:
            launches.append(1)
            with _disable_current_modes():  # (the interpreter's own tensor glue is not the launch's)
                return f(*args)

        return launch

    C._PIN_DEVICE_PATH = True
    S.usable = lambda norms, p: not S._BROKEN and norms.dtype is torch.float32  # type: ignore[assignment]
    S.takes_coefficient = lambda total, tau: not S._BROKEN and tau.numel() == 1  # type: ignore[assignment]
    R.usable = lambda t: not R._BROKEN  # type: ignore[assignment]
    S._launch, S.coefficient, R._launch = one_launch(real[3]), one_launch(real[4]), one_launch(real[5])  # type: ignore[assignment]
    try:
        ops = _guard_ops(False, warm=30, clip=clip)
    finally:
        C._PIN_DEVICE_PATH = False
        S.usable, S.takes_coefficient, R.usable, S._launch, S.coefficient, R._launch = real  # type: ignore[assignment]
    assert not S._BROKEN and not R._BROKEN, (S._BROKEN, R._BROKEN)
    return ops, len(launches) / 31


@pytest.mark.parametrize(("clip", "ops", "launches"), [("norm:1", 4, 2), ("auto", 5, 3), ("zclip", 5, 3)])
def test_on_a_gpus_path_a_guarded_step_is_a_few_launches(
    run: Callable[..., Any], clip: str, ops: int, launches: int
) -> None:
    """A GPU's guarded step (warm, outside the optimizer's step): the norms, the row's tail and the
    clip are ops; the measurement, the coefficient and ZClip's / auto's rule one launch each — 6
    launches for ``norm:1`` and 8 for ``auto`` (13 and 16 before session 17's kernels, 46 for ``auto``
    before session 16's)."""
    assert run(check_device_path_launches, clip) == (ops, launches)


def test_the_step_kernel_is_used_on_cuda_only() -> None:
    """On a CPU (and where Triton is missing, or inside torch.compile) the step's math stays the ops."""
    from gradguard import _step_kernel as S

    assert not S.usable(torch.ones(3), 2.0)


# ----------------------------------------------------------------------------- compiled for a GPU
def test_the_kernels_compile_for_an_h100_with_vector_loads() -> None:
    """Every kernel variant compiled ahead of time for sm_90 (Triton's own ptxas; no GPU needed):
    what the interpreter cannot check — the code generator takes the kernels, 16-byte-aligned
    tensors get vector loads (the unmasked whole blocks), and bfloat16 rounds to nearest."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process: the kernels are jitted for the interpreter")
    import re

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = K._build(False)
    tables = {"ptrs": "*i64", "sizes": "*i64", "chunk_tensor": "*i64", "chunk_index": "*i64"}
    blocks = {"CHUNK": K.CHUNK, "BLOCK": K.BLOCK}

    def ptx(kernel: Any, pointers: dict[str, str], constants: dict[str, Any]) -> str:
        signature = pointers | dict.fromkeys(constants, "constexpr")
        source = ASTSource(kernel, signature, constants)
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 8, "enable_fp_fusion": K.FP_FUSION},
        )
        return compiled.asm["ptx"]

    for dtype in DTYPES:
        t, acc = (
            kernels.types[dtype],
            kernels.types[torch.float64 if dtype == torch.float64 else torch.float32],
        )
        sq = "*fp64" if dtype == torch.float64 else "*fp32"
        for aligned in (True, False):
            for p in (1, 2):
                code = ptx(
                    kernels.partials,
                    tables | {"part_sq": sq, "part_bad": "*i32"},
                    {"DTYPE": t, "ACC": acc, "P": p, "ALIGNED": aligned} | blocks,
                )
                vector = re.search(r"ld\.global(\.nc)?\.v[24]\.b(32|64)", code)
                assert bool(vector) == aligned, (dtype, aligned, p)
            code = ptx(
                kernels.scale,
                tables | {"coef": "*fp32"},
                {"DTYPE": t, "ACC": acc, "ALIGNED": aligned} | blocks,
            )
            assert bool(re.search(r"st\.global\.v[24]\.b(32|64)", code)) == aligned, (dtype, aligned)
            if dtype == torch.bfloat16:
                assert "cvt.rn.bf16" in code  # round to nearest even, as torch
        for p in (1, 2):
            outs = {"norms": "*fp32", "counts": "*i64"}
            ptx(kernels.finish, {"part_sq": sq, "part_bad": "*i32", "chunk_first": "*i64", "position": "*i64"} | outs,
                {"ACC": acc, "P": p, "FBLOCK": K.FINISH_BLOCK})  # fmt: skip
    assert tl.float32 in kernels.types.values()


def test_the_rule_kernel_compiles_for_an_h100() -> None:
    """The clipping rule's kernel, every variant (ZClip; auto with no step cap, the first-norm cap or
    the Polyak cap, with and without the ramp and the first-norm factor), compiled ahead of time for
    sm_90: the code generator takes the float64 bit casts, the NaN-propagating minima, and the
    divisions and square root stay the IEEE ones (``div.rn.f64``, ``sqrt.rn.f64``)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process: the kernels are jitted for the interpreter")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gradguard import _rule_kernel as R

    kernel = R._build(False)
    pointers = dict.fromkeys(("zs", "ac", "fc", "table", "eps", "zt2", "ramp"), "*fp64")
    args = {"warmup": "i32", "max_norm": "i64", "growth": "i64", "first": "i64", "c": "i64"}
    variants = [(False, False, R.NO_CAP, False)] + [
        (True, first, cap, ramp)
        for first in (False, True)
        for cap in (R.NO_CAP, R.FIRST_CAP, R.POLYAK_CAP)
        for ramp in ((False, True) if cap == R.POLYAK_CAP else (False,))
    ]
    for norm in ("*fp32", "*bf16", "*fp64"):
        for auto, first, cap, ramp in variants:
            constants = {"AUTO": auto, "FIRST": first, "CAP": cap, "RAMP": ramp}
            signature = pointers | {"norm": norm, "loss": "*fp32", "out": "*fp32"} | args
            source = ASTSource(kernel, signature | dict.fromkeys(constants, "constexpr"), constants)
            options = {"num_warps": 1, "enable_fp_fusion": False}  # as _rule_kernel launches it
            code = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
            assert "div.rn.f64" in code and "sqrt.rn.f64" in code, (norm, constants)
            assert "div.approx" not in code and "div.full" not in code and "fma.rn.f64" not in code


def test_the_step_kernel_compiles_for_an_h100() -> None:
    """The step's measurement kernel, p = 1 and 2, compiled ahead of time for sm_90: it takes the bool
    flag's pointer, its float64 root is the IEEE one (``sqrt.rn.f64``) and it fuses no multiply-add;
    the coefficient kernel (every variant) divides as IEEE (``div.rn.f32``, not the approximate one)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process: the kernels are jitted for the interpreter")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gradguard import _step_kernel as S

    kernel = S._build(False)
    signature = {"norms": "*fp32", "loss": "*fp32", "wide": "*fp64", "values": "*fp32", "probe": "*fp32",
                 "bad": "*i1", "total": "*fp32", "n": "i32", "P": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
    for p in (1, 2):
        source = ASTSource(kernel, signature, {"P": p, "BLOCK": S.BLOCK})
        options = {"num_warps": 4, "enable_fp_fusion": False}  # as _step_kernel launches it
        code = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        assert ("sqrt.rn.f64" in code) == (p == 2) and "fma.rn.f64" not in code, p
    coef = S._build_coefficient(False)
    signature = dict.fromkeys(("total", "eps", "out", "threshold_out"), "*fp32") | {
        "PUT": "constexpr",
        "NONNEG": "constexpr",
    }
    for tau in ("*fp32", "*fp64", "*bf16"):
        for put in (False, True):
            for nonneg in (False, True):
                source = ASTSource(coef, signature | {"threshold": tau}, {"PUT": put, "NONNEG": nonneg})
                options = {"num_warps": 1, "enable_fp_fusion": False}
                code = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
                assert "div.rn.f32" in code and "div.full" not in code and "div.approx" not in code, tau


# ----------------------------------------------------------------------------- benchmarks/gpu.py
def _gpu_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (its dataclasses look it up)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_measures_the_issue_s_parameter_set() -> None:
    """291 transformer-shaped tensors, 1.31e9 parameters (5.25 GB of float32 gradients)."""
    shapes = _gpu_benchmark().transformer_shapes(2048, 24, 50257)
    assert len(shapes) == 291
    assert round(sum(math.prod(s) for _, s in shapes) / 1e9, 2) == 1.31


def test_the_gpu_benchmark_dry_run(tmp_path: Path) -> None:
    """``benchmarks/gpu.py --dry-run``: the whole script on the CPU at tiny sizes (the kernel rows
    under the interpreter where triton is installed; the CUDA-only rows skipped), no section failing."""
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    failed = {k: v for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert not failed, failed
    assert "| 1.3B set (291 tensors) |" in proc.stdout
    for rows in results["1.3B set"].values():
        assert isinstance(rows["torch clip_grad_norm_"], float)
        assert isinstance(rows["guard measure + clip + flags (torch path)"], float)
        if importlib.util.find_spec("triton") is not None:
            assert isinstance(rows["guard measure + clip + flags (kernel)"], float), rows
            assert rows["kernel vs torch norms: max relative difference"] < 1e-4
    if (
        importlib.util.find_spec("triton") is not None
    ):  # the rule's kernel, interpreted: the tensor ops' numbers
        for rule in ("zclip", "auto, SGD", "auto, AdamW"):
            row = results["correctness"]["clipping rule kernel"][rule]
            assert row["kernel launches"] == 90 and row["same finiteness"] and row["max_rel_diff"] < 1e-12, (
                row
            )
    for name in ("GPT step", "fixed cost"):
        assert any("guarded / plain" in key for key in results[name]), results[name]
    if importlib.util.find_spec("triton") is not None:  # the step's kernel, interpreted: the ops' numbers
        row = results["correctness"]["step kernel"]
        assert row["cases"] == 75 and row["same norms, probe and flag"] and not row["fell back"], row
        assert row["max_rel_diff of the global norm"] == 0.0, row
        assert row["coefficient"] == {"cases": 600, "bit for bit clip.coefficient": True}, row
    labels = ("guarded, step math as tensor ops", "guarded, locate=False", "guarded, clip auto")
    for label in (*labels, "guarded, clip auto, rule and step math as tensor ops"):
        assert isinstance(results["fixed cost"][f"{label} / plain (median of pair ratios)"], float)
    located = results["locate"]
    assert located["log fault (step 5): located"] == "forward log -inf replay", located
    assert located["norm fault (step 9): located"] == "backward sqrt nan replay", located
    assert located["replay drew the same dropout mask"] is True, located
    assert results["host syncs"] == {"skipped": "skipped: needs CUDA (dry run)"}
