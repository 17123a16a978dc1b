"""CPU benchmark: a whole training step with ``Guard`` against the plain loop with ``clip_grad_norm_``.

(a) plain: ``zero_grad; loss = f(model(x)); backward; torch.nn.utils.clip_grad_norm_(1.0); opt.step()``
(b) guard: the same, with ``guard.step(loss)`` in place of the last two calls (``clip="norm:1"`` or
    ``"auto"``, per-layer gradient norms every step, spike detection, weight norms and update ratios
    every 50 steps, flush every 50 steps, no run directory on disk unless ``--log``).

Both run on twin models (same initial weights, same batch) in interleaved pairs (A B, B A, …) after a
warm-up, with garbage collection off while timing; the ratio of each pair is guard / plain and the
reported number is the **median of the pair ratios**. Threads are pinned (``--threads``, default 2).

Memory (``--memory``): each variant in a fresh subprocess on the MLP for ``--memory-steps`` steps
(default 100 000), the resident set size (RSS) sampled every 10% of the run: flat for the guard,
and its peak against the plain loop's.

Run ``python benchmarks/guard.py`` (about 3 minutes), ``--quick`` (under a minute), ``--json out.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gradguard
from clip import GPT, LSTMLM, wait_idle


class MLP(nn.Module):
    """784 → 1024 → 1024 → 10 with ReLU: about 1.9M parameters in 6 tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def task(name: str) -> tuple[Callable[[], nn.Module], Callable[[nn.Module], Tensor]]:
    """A model factory and a loss on a fixed batch."""
    g = torch.Generator().manual_seed(0)
    if name == "gpt":
        idx = torch.randint(0, 1280, (8, 65), generator=g)
        return GPT, lambda m: F.cross_entropy(m(idx[:, :-1]).reshape(-1, 1280), idx[:, 1:].reshape(-1))
    if name == "lstm":
        idx = torch.randint(0, 1000, (8, 33), generator=g)
        return LSTMLM, lambda m: F.cross_entropy(m(idx[:, :-1]).reshape(-1, 1000), idx[:, 1:].reshape(-1))
    x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    return MLP, lambda m: F.cross_entropy(m(x), y)


def optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=1e-4, fused=kind == "fused", foreach=None if kind == "fused" else True
    )


@dataclass
class Result:
    model: str
    optimizer: str
    clip: str
    params: int
    plain_ms: float
    guard_ms: float
    ratio: float  # median of pair ratios
    ratio_q1: float
    ratio_q3: float
    pairs: int
    contention_pct: float | None


def cpu_wait_us() -> float | None:
    """Linux PSI ``cpu some total``: µs in which a task of this machine waited for a core (None where
    the kernel does not say)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("total=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def contention_pct(before: float | None, after: float | None, elapsed_s: float) -> float | None:
    """The % of ``elapsed_s`` in which a task waited for a core (from two :func:`cpu_wait_us` readings)."""
    if before is None or after is None or elapsed_s <= 0:
        return None
    return 100.0 * (after - before) / (elapsed_s * 1e6)


def run_case(
    model_name: str, opt_kind: str, clip: str, pairs: int, warmup: int, log_dir: str | None
) -> Result:
    make, loss_fn = task(model_name)
    torch.manual_seed(0)
    plain_model = make()
    torch.manual_seed(0)
    guard_model = make()
    plain_opt = optimizer(opt_kind, plain_model)
    guard_opt = optimizer(opt_kind, guard_model)
    guard = gradguard.Guard(
        guard_model, guard_opt, clip=clip, every=50, layer_every=1, weight_every=50, log_dir=log_dir
    )

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        loss = loss_fn(plain_model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        plain_opt.step()

    def guarded() -> None:
        guard_opt.zero_grad(set_to_none=True)
        loss = loss_fn(guard_model)
        loss.backward()
        guard.step(loss)

    for _ in range(warmup):
        plain()
        guarded()
    times: dict[str, list[float]] = {"plain": [], "guard": []}
    before = cpu_wait_us()
    t_start = time.monotonic()
    gc.disable()
    try:
        for i in range(pairs):
            order = [("plain", plain), ("guard", guarded)]
            if i % 2:
                order.reverse()
            for name, fn in order:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    contention = contention_pct(before, cpu_wait_us(), time.monotonic() - t_start)
    guard.close()
    ratios = sorted(g / p for g, p in zip(times["guard"], times["plain"]))
    q = statistics.quantiles(ratios, n=4)
    return Result(
        model_name,
        opt_kind,
        clip,
        sum(p.numel() for p in guard_model.parameters()),
        1e3 * statistics.median(times["plain"]),
        1e3 * statistics.median(times["guard"]),
        statistics.median(ratios),
        q[0],
        q[2],
        pairs,
        contention,
    )


# ----------------------------------------------------------------------------- memory
_MEMORY_CHILD = """
import resource, sys, torch, gradguard
from torch import nn
import torch.nn.functional as F
torch.set_num_threads(1)
variant, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
guard = gradguard.Guard(model, opt, clip="auto", every=50, weight_every=50) if variant == "guard" else None
x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024
samples = []
for step in range(steps):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if guard is None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    else:
        guard.step(loss)
    if (step + 1) % (steps // 10) == 0:
        samples.append(rss_kib())
print(" ".join(map(str, samples)), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory(steps: int) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for variant in ("plain", "guard"):
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, variant, str(steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        *samples, peak = map(int, proc.stdout.split())
        out[variant] = {"rss_kib": samples, "peak_kib": peak, "growth_kib": samples[-1] - samples[0]}
    return out


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer pairs (smoke check)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["gpt", "lstm", "mlp"])
    ap.add_argument("--log", action="store_true", help="the guard writes a run directory (in a temp folder)")
    ap.add_argument("--memory", action="store_true", help="also measure RSS over --memory-steps steps")
    ap.add_argument("--memory-steps", type=int, default=100_000)
    ap.add_argument(
        "--wait-idle", type=float, default=0.0, help="wait up to this many seconds for an idle CPU"
    )
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs, warmup = (20, 3) if args.quick else (60, 5)
    configs = [("foreach", "norm:1"), ("fused", "norm:1"), ("foreach", "auto")]
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            for opt_kind, clip in configs:
                if args.wait_idle:
                    wait_idle(args.wait_idle)
                log_dir = os.path.join(tmp, f"{model_name}-{opt_kind}-{clip}") if args.log else None
                r = run_case(model_name, opt_kind, clip, pairs, warmup, log_dir)
                results.append(r)
                print(
                    f"{r.model:5s} {r.optimizer:8s} {r.clip:7s} plain {r.plain_ms:8.2f} ms  guard {r.guard_ms:8.2f} ms"
                    f"  ratio {r.ratio:.3f} [{r.ratio_q1:.3f}, {r.ratio_q3:.3f}]  contention "
                    f"{'-' if r.contention_pct is None else f'{r.contention_pct:.1f}%'}",
                    flush=True,
                )
    overall = statistics.median(r.ratio for r in results)
    print(f"\nmedian of the cases' ratios: {overall:.3f} (target ≤ 1.05)")
    print(
        "\n| model | optimizer | guard clip | params | plain ms | guard ms | ratio (median of pairs) | IQR |"
    )
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r.model} | AdamW {r.optimizer} | `{r.clip}` | {r.params / 1e6:.2f}M | {r.plain_ms:.2f} | "
            f"{r.guard_ms:.2f} | {r.ratio:.3f} | {r.ratio_q1:.3f}–{r.ratio_q3:.3f} |"
        )
    mem = None
    if args.memory:
        mem = memory(args.memory_steps)
        for variant, m in mem.items():
            print(
                f"memory {variant}: RSS every 10% (KiB) {m['rss_kib']}, growth {m['growth_kib']} KiB, peak {m['peak_kib']} KiB"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "results": [asdict(r) for r in results],
                    "memory": mem,
                    "median_ratio": overall,
                    "machine": {
                        "python": platform.python_version(),
                        "torch": torch.__version__,
                        "threads": args.threads,
                        "cpu": platform.processor(),
                        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    },
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
