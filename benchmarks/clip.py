"""CPU benchmark: gradguard's clipping against torch and against per-parameter reference code.

Every comparison runs the candidate (gradguard) and its reference on the *same* gradients, in
alternating repetitions (A B, B A, A B, ...), after a warm-up, with the gradients restored (and
rescaled by a fixed schedule with periodic spikes) before every timed call, outside the timer.
Reported: the median time of each side and the ratio candidate / reference measured in this run.

Run ``python benchmarks/clip.py`` (about 2 minutes), ``--quick`` (under 30 s), ``--json out.json``
to save the numbers, ``--threads N`` to pin torch's intra-op threads (default 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradguard
from gradguard.clip import coefficient, scale_
from gradguard.stats import LayerIndex, grad_stats

# ----------------------------------------------------------------------------- models


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """GPT-style stack: 256 wide, 4 blocks, vocab 1280, context 128 -> about 3.9M parameters."""

    def __init__(
        self, vocab: int = 1280, d: int = 256, layers: int = 4, heads: int = 4, ctx: int = 128
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class LSTMLM(nn.Module):
    """2-layer LSTM language model: vocab 1000, embedding 256, hidden 384 -> about 2.8M parameters."""

    def __init__(self, vocab: int = 1000, emb: int = 256, hidden: int = 384, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        out, _ = self.lstm(self.emb(idx))
        return self.head(out)


def build(name: str) -> nn.Module:
    """The model after one real backward, its gradients then refilled with N(0, 0.01²)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model: nn.Module
    if name == "gpt":
        model, vocab, seq = GPT(), 1280, 64
    else:
        model, vocab, seq = LSTMLM(), 1000, 32
    idx = torch.randint(0, vocab, (4, seq + 1), generator=g)
    logits = model(idx[:, :-1])
    F.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1)).backward()
    with torch.no_grad():
        for p in model.parameters():
            assert p.grad is not None
            p.grad.normal_(0.0, 0.01, generator=g)
    return model


# ----------------------------------------------------------------------------- references


def _unitwise_norm(x: Tensor) -> Tensor:
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


def agc_loop(params: list[Tensor], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """Per-parameter AGC in the style of timm's ``adaptive_clip_grad`` (written from the formula)."""
    for p in params:
        if p.grad is None:
            continue
        p_data = p.detach()
        g_data = p.grad.detach()
        max_norm = _unitwise_norm(p_data).clamp(min=eps) * clip_factor
        grad_norm = _unitwise_norm(g_data)
        clipped = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new = torch.where(grad_norm < max_norm, g_data, clipped)
        p.grad.detach().copy_(new)


class AutoClipRef:
    """AutoClip as in the paper's reference code: ``.item()`` per parameter, unbounded list, numpy percentile."""

    def __init__(self, percentile: float = 10.0) -> None:
        self.percentile = percentile
        self.history: list[float] = []

    def __call__(self, params: list[Tensor]) -> float:
        total = 0.0
        for p in params:
            if p.grad is not None:
                total += p.grad.norm().item() ** 2
        norm = total**0.5
        self.history.append(norm)
        tau = float(np.percentile(self.history, self.percentile))
        torch.nn.utils.clip_grad_norm_(params, tau)
        return norm


class ZClipRef:
    """Plain-Python ZClip (host floats, one ``.item()`` per step; clips only on a spike, like the package)."""

    def __init__(
        self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, eps: float = 1e-6
    ) -> None:
        self.alpha, self.z_thresh, self.warmup, self.eps = alpha, z_thresh, warmup, eps
        self.buffer: list[float] = []
        self.mean = self.var = 0.0
        self.ready = False

    def __call__(self, params: list[Tensor]) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).item()
        if not self.ready:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.ready = True
            return norm
        std = self.var**0.5
        z = (norm - self.mean) / (std + self.eps)
        g_eff = norm
        if z > self.z_thresh:
            g_eff = self.mean + self.z_thresh**2 * std / z
            torch.nn.utils.clip_grad_norm_(params, g_eff)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * g_eff
        self.var = self.alpha * self.var + (1 - self.alpha) * (g_eff - self.mean) ** 2
        return norm


# ----------------------------------------------------------------------------- harness


def scale_schedule(i: int) -> float:
    """Gradient scale of step i: healthy jitter (±5%); from step 30 on, an 8x spike every 7th step."""
    return (8.0 if i >= 30 and i % 7 == 3 else 1.0) * (1.0 + 0.05 * math.sin(0.7 * i))


class Grads:
    """Saves a model's gradients and restores them (times a scale) before each timed call."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.grad is not None]
        self.names = [n for n, p in model.named_parameters() if p.grad is not None]
        self.grads = [p.grad for p in self.params]
        self.saved = [g.clone() for g in self.grads]  # type: ignore[union-attr]

    def reset(self, i: int = 0, schedule: bool = False) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.grads, self.saved)
            if schedule:
                torch._foreach_mul_(self.grads, scale_schedule(i))

    def global_norm(self) -> float:
        return float(torch.nn.utils.get_total_norm(self.saved))


@dataclass
class Case:
    comparison: str
    model: str
    candidate: Callable[[], object]
    reference: Callable[[], object]
    target: float | None  # max allowed ratio candidate/reference (None: informational)
    reset: Callable[[int], None]
    candidate_name: str
    reference_name: str
    prime: int = 0  # extra untimed steps (stateful clippers past their warm-up)
    check: bool | None = None


@dataclass
class Result:
    comparison: str
    model: str
    candidate: str
    reference: str
    candidate_us: float
    reference_us: float
    ratio: float
    target: float | None
    met: bool | None
    reps: int
    same_result: bool | None
    candidate_iqr_us: list[float] = field(default_factory=list)
    reference_iqr_us: list[float] = field(default_factory=list)
    stalled: int = 0
    noisy: bool = False
    contention_pct: float | None = None


def measure(case: Case, reps: int, min_reps: int, warmup: int, budget_s: float) -> Result:
    """Median times of interleaved repetitions (A B, B A, ...), the gradients reset before each call.

    Stops after ``reps`` pairs, or once ``budget_s`` is spent and ``min_reps`` pairs are done, or
    at a hard cap of ``2 * budget_s + 3`` seconds (CPU stalls: see ``stalled`` in the result).
    """
    psi0, t_psi0 = _psi("total"), time.perf_counter()
    step = 0
    for _ in range(case.prime + warmup):
        for fn in (case.candidate, case.reference):
            case.reset(step)
            fn()
        step += 1
    tc: list[float] = []
    tr: list[float] = []
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        i = 0
        while i < reps:
            elapsed = time.perf_counter() - start
            if (i >= min_reps and elapsed > budget_s) or elapsed > 2 * budget_s + 3:
                break
            order = ((case.candidate, tc), (case.reference, tr))
            for fn, out in order if i % 2 == 0 else order[::-1]:
                case.reset(step)
                t0 = time.perf_counter_ns()
                fn()
                out.append((time.perf_counter_ns() - t0) / 1e3)
            step += 1
            i += 1
    finally:
        gc.enable()
    psi1, t_psi1 = _psi("total"), time.perf_counter()
    # % of the case's wall time during which some task waited for a core (PSI total is in µs)
    contention = None if psi0 is None or psi1 is None else round((psi1 - psi0) / 1e4 / (t_psi1 - t_psi0), 1)
    mc, mr = statistics.median(tc), statistics.median(tr)
    ratio = mc / mr
    # repetitions over 3x their side's median: the machine stalled (another process on the cores makes
    # torch's OpenMP threads wait on each other: 10-500x slower calls)
    stalled = sum(x > 3 * mc for x in tc) + sum(x > 3 * mr for x in tr)
    q = lambda xs: [round(x, 1) for x in statistics.quantiles(xs, n=4)[::2]]  # noqa: E731
    return Result(
        case.comparison,
        case.model,
        case.candidate_name,
        case.reference_name,
        round(mc, 1),
        round(mr, 1),
        round(ratio, 3),
        case.target,
        None if case.target is None else ratio <= case.target,
        len(tc),
        case.check,
        q(tc),
        q(tr),
        stalled,
        len(tc) < min_reps or stalled > 0.2 * 2 * len(tc) or (contention or 0.0) > 10.0,
        contention,
    )


def _same(a: list[Tensor], b: list[Tensor], rtol: float = 1e-4) -> bool:
    return all(torch.allclose(x, y, rtol=rtol, atol=1e-9) for x, y in zip(a, b))


def _run_and_keep(g: Grads, fn: Callable[[], object], steps: int, schedule: bool) -> list[list[Tensor]]:
    out = []
    for i in range(steps):
        g.reset(i, schedule)
        fn()
        out.append([t.clone() for t in g.grads])  # type: ignore[union-attr]
    return out


def check(
    g: Grads, cand: Callable[[], object], ref: Callable[[], object], steps: int = 1, schedule: bool = False
) -> bool:
    a = _run_and_keep(g, cand, steps, schedule)
    b = _run_and_keep(g, ref, steps, schedule)
    return all(_same(x, y) for x, y in zip(a, b))


def cases_for(model_name: str) -> list[Case]:
    model = build(model_name)
    g = Grads(model)
    params = g.params
    norm0 = g.global_norm()
    clip_at = 0.25 * norm0  # always below the scheduled norms (>= 0.95 * norm0): clipping happens
    no_clip_at = 1e6 * norm0
    index = LayerIndex(g.names)
    tag = f"{model_name} ({sum(p.numel() for p in params) / 1e6:.2f}M params, {len(params)} tensors)"
    plain = lambda i: g.reset(i, False)  # noqa: E731
    sched = lambda i: g.reset(i, True)  # noqa: E731

    def full_stats_clip() -> None:
        st = grad_stats(params)
        index.reduce(st.norms)
        _ = (st.nonfinite, st.nan, st.inf)
        scale_([p.grad for p in params], coefficient(st.total, clip_at))  # type: ignore[misc]

    out: list[Case] = []
    for label, mx in (("clip_grad_norm_ (clips)", clip_at), ("clip_grad_norm_ (no clip)", no_clip_at)):
        cand = lambda mx=mx: gradguard.clip_grad_norm_(params, mx)  # noqa: E731
        ref = lambda mx=mx: torch.nn.utils.clip_grad_norm_(params, mx)  # noqa: E731
        out.append(
            Case(label, tag, cand, ref, 1.25, plain, "gradguard.clip_grad_norm_", "torch clip_grad_norm_",
                 check=check(g, cand, ref))
        )  # fmt: skip
    ref_clip = lambda: torch.nn.utils.clip_grad_norm_(params, clip_at)  # noqa: E731
    out.append(
        Case("full stats + clip", tag, full_stats_clip, ref_clip, 1.15, plain,
             "grad_stats + LayerIndex.reduce + scale_", "torch clip_grad_norm_", check=check(g, full_stats_clip, ref_clip))
    )  # fmt: skip
    agc = lambda: gradguard.clip_grad_agc_(params, 0.01, 1e-3)  # noqa: E731
    loop = lambda: agc_loop(params, 0.01, 1e-3)  # noqa: E731
    out.append(
        Case("AGC", tag, agc, loop, 0.5, plain, "gradguard.clip_grad_agc_", "per-parameter loop (timm style)",
             check=check(g, agc, loop))
    )  # fmt: skip

    fresh_a, fresh_ar = gradguard.AutoClip(10), AutoClipRef(10)
    ok_auto = check(g, lambda: fresh_a(params), lambda: fresh_ar(params), 40, True)
    auto, auto_ref = gradguard.AutoClip(10), AutoClipRef(10)
    out.append(
        Case("AutoClip vs reference", tag, lambda: auto(params), lambda: auto_ref(params), None, sched,
             "gradguard.AutoClip(10)", ".item() per param + numpy.percentile", check=ok_auto)
    )  # fmt: skip
    auto2 = gradguard.AutoClip(10)
    gg_clip = lambda: gradguard.clip_grad_norm_(params, clip_at)  # noqa: E731
    out.append(
        Case("AutoClip vs clip_grad_norm_", tag, lambda: auto2(params), gg_clip, 1.15, sched,
             "gradguard.AutoClip(10)", "gradguard.clip_grad_norm_")
    )  # fmt: skip

    fresh_z, fresh_zr = gradguard.ZClip(), ZClipRef()
    ok_z = check(g, lambda: fresh_z(params), lambda: fresh_zr(params), 60, True)
    zc, zc_ref = gradguard.ZClip(), ZClipRef()
    out.append(
        Case("ZClip vs reference", tag, lambda: zc(params), lambda: zc_ref(params), None, sched,
             "gradguard.ZClip()", "Python ZClip (.item() per step)", prime=30, check=ok_z)
    )  # fmt: skip
    zc2 = gradguard.ZClip()
    out.append(
        Case("ZClip vs clip_grad_norm_", tag, lambda: zc2(params), gg_clip, 1.15, sched,
             "gradguard.ZClip()", "gradguard.clip_grad_norm_", prime=30)
    )  # fmt: skip
    return out


def _psi(field: str) -> float | None:
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split(field + "=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def cpu_pressure() -> float | None:
    """Linux PSI "some avg10" for the CPU: % of the last 10 s in which a task waited for a core."""
    return _psi("avg10")


def wait_idle(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (p := cpu_pressure()) is not None and p > 5.0 and time.monotonic() < deadline:
        time.sleep(2.0)


def fmt_target(t: float | None) -> str:
    if t is None:
        return "—"
    return f"≤ {t:.2f} (≥ {1 / t:.0f}× faster)" if t < 1 else f"≤ {t:.2f}"


def table(results: list[Result]) -> str:
    lines = [
        "| comparison | model | candidate µs | reference µs | ratio | target | met | same result | contention % |",
        "|---|---|---:|---:|---:|---|:-:|:-:|---:|",
    ]
    for r in results:
        met = "—" if r.met is None else ("yes" if r.met else "**NO**")
        same = "—" if r.same_result is None else ("yes" if r.same_result else "**NO**")
        cont = "—" if r.contention_pct is None else f"{r.contention_pct:.1f}"
        lines.append(
            f"| {r.comparison} | {r.model} | {r.candidate_us:,.0f} | {r.reference_us:,.0f} | "
            f"{r.ratio:.3f}{' (noisy)' if r.noisy else ''} | {fmt_target(r.target)} | {met} | {same} | {cont} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="few repetitions (under 30 s)")
    ap.add_argument("--reps", type=int, default=None, help="max timed repetitions per side and case")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per case (after min reps)")
    ap.add_argument("--models", default="gpt,lstm", help="comma-separated: gpt, lstm")
    ap.add_argument("--only", default="", help="run comparisons whose name contains this text")
    ap.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for other processes to leave the CPU (Linux PSI) before starting",
    )
    ap.add_argument(
        "--retries", type=int, default=1, help="re-measure a noisy case up to N times (default 1)"
    )
    args = ap.parse_args(argv)

    wait_idle(args.wait_idle)
    pressure_before = cpu_pressure()
    if pressure_before is not None and pressure_before > 10.0:
        print(
            f"warning: other processes are using the CPU (PSI some avg10={pressure_before}%): "
            "timings will be noisy; try --wait-idle 300",
            file=sys.stderr,
        )

    torch.set_num_threads(args.threads)
    reps = args.reps or (25 if args.quick else 400)
    budget = args.budget if args.budget is not None else (0.6 if args.quick else 6.0)
    min_reps, warmup = (9, 3) if args.quick else (41, 10)

    t_start = time.perf_counter()
    results: list[Result] = []
    for name in args.models.split(","):
        for case in cases_for(name.strip()):
            if args.only and args.only.lower() not in case.comparison.lower():
                continue
            r = measure(case, reps, min_reps, warmup, budget)
            for _ in range(args.retries):
                if not r.noisy:
                    break
                # other processes took the cores: wait for them (up to --wait-idle s), measure again
                wait_idle(max(args.wait_idle, 2.0))
                r = measure(case, reps, min_reps, warmup, budget)
            results.append(r)
            print(f"  {r.comparison:28s} {r.model[:4]:5s} {r.candidate_us:9.0f} µs {r.reference_us:9.0f} µs "
                  f"ratio {r.ratio:.3f} ({r.reps} reps, {r.stalled} stalled, contention {r.contention_pct}%)", file=sys.stderr, flush=True)  # fmt: skip
    elapsed = time.perf_counter() - t_start

    meta = {
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "gradguard": gradguard.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "seconds": round(elapsed, 1),
        "cpu_pressure_avg10_before": pressure_before,
        "cpu_pressure_avg10_after": cpu_pressure(),
        "ratio": "candidate time / reference time (median of interleaved repetitions); < 1 is faster",
    }
    print(
        f"\ngradguard {meta['gradguard']}, torch {meta['torch']}, {meta['threads']} threads, "
        f"{meta['cpu_count']} cores, {meta['date']}, {elapsed:.0f} s\n"
    )
    print(table(results))
    print(
        "\nratio = candidate / reference (medians of interleaved repetitions); < 1 means gradguard is faster."
        " (noisy): other processes competed for the cores (PSI > 10% of the case's time, or > 20% of its"
        " repetitions stalled) even after the retries: rerun with --wait-idle."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
