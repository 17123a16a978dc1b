"""CPU benchmark: the guard's fixed per-step cost on tiny models, where it shows the most.

A guarded step pays a fixed cost on top of the plain clipped step: the guard's per-step device math
(norms, flags, the clip coefficient, the step's row) is a few dozen small device ops, each ~3–5 µs of
dispatch on a CPU (and a kernel launch on a GPU), plus its Python bookkeeping. On a mid-size model
that is lost in the step; on a tiny one it is most of the difference. This benchmark measures it.

Models (``depth × width``): ``depth`` hidden ``Linear(width, width)`` + ReLU layers and a 10-class
head, a batch of 32: ``mlp2x32`` (6 tensors), ``mlp4x256`` (10 tensors), ``deep100x16`` (202 tensors).

(a) plain: ``zero_grad; loss = f(model(x)); backward; torch.nn.utils.clip_grad_norm_(1.0); opt.step()``
(b) guard: the same, with ``guard.step(loss)`` in place of the last two calls; ``Guard`` defaults
    (``on_nonfinite="skip"``, ``on_spike="warn"``, per-layer norms every step up to 64 layers,
    weight norms every 50 steps, flush every 50, locate on, no run directory) with ``clip``.

One thread (``torch.set_num_threads(1)``), AdamW (``foreach=True`` or ``fused=True``), twin models
(same weights, same batch), interleaved pairs (A B, B A, …) after a warm-up, gc off while timing.
Reported: the median of the pair ratios guard / plain, the median of the pair differences in µs,
and the CPU contention while timing (Linux PSI ``cpu some``: the % of the wall time in which a task
of this machine waited for a core; and the load average) — timings on a shared machine move with
it, so read a ratio with its contention.

Op counts (deterministic, unlike the timings): the aten ops dispatched inside one warm ``guard.step``
and inside the plain ``clip_grad_norm_`` + ``opt.step()`` (a ``TorchDispatchMode`` that counts every
op; ``compute`` leaves out views and metadata ops, which launch no kernel), for a typical step and on
average over 100 steps (weight-norm and flush steps included).

Run ``python benchmarks/fixed_cost.py`` (about 2 minutes), ``--quick``, ``--ops`` (op counts only,
seconds), ``--json out.json``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard

CASES = {"mlp2x32": (2, 32), "mlp4x256": (4, 256), "deep100x16": (100, 16)}
BATCH = 32


def mlp(depth: int, width: int) -> nn.Module:
    """``depth`` hidden layers of ``width`` (Linear + ReLU) and a 10-class head."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=1e-4, fused=kind == "fused", foreach=None if kind == "fused" else True
    )


class _Twin:
    """A plain and a guarded copy of one model, one batch; ``plain()`` and ``guarded()`` run one step."""

    def __init__(self, case: str, opt_kind: str, clip: str, **guard_kw: Any) -> None:
        depth, width = CASES[case]
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(BATCH, width, generator=g)
        self.y = torch.randint(0, 10, (BATCH,), generator=g)
        torch.manual_seed(0)
        self.plain_model = mlp(depth, width)
        torch.manual_seed(0)
        self.guard_model = mlp(depth, width)
        self.plain_opt = optimizer(opt_kind, self.plain_model)
        self.guard_opt = optimizer(opt_kind, self.guard_model)
        self.guard = gradguard.Guard(self.guard_model, self.guard_opt, clip=clip, **guard_kw)
        self.params = sum(p.numel() for p in self.plain_model.parameters())
        self.tensors = len(list(self.plain_model.parameters()))

    def backward(self, model: nn.Module, opt: torch.optim.Optimizer) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(self.x), self.y)
        loss.backward()
        return loss

    def plain_update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.plain_model.parameters(), 1.0)
        self.plain_opt.step()

    def plain(self) -> None:
        self.backward(self.plain_model, self.plain_opt)
        self.plain_update()

    def guarded(self) -> None:
        self.guard.step(self.backward(self.guard_model, self.guard_opt))


# ----------------------------------------------------------------------------- op counts
_NO_KERNEL = {"aten.detach.default", "aten.lift_fresh.default", "aten.alias.default"}


class OpCount(TorchDispatchMode):
    """Counts every aten op dispatched inside it (``compute``: those that are no view / metadata op)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.compute = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        name = str(func)
        self.ops[name] += 1
        if not func.is_view and name not in _NO_KERNEL:
            self.compute += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@dataclass
class Ops:
    case: str
    optimizer: str
    clip: str
    plain: int  # clip_grad_norm_ + opt.step()
    plain_compute: int
    guard: int  # guard.step, a typical step
    guard_compute: int
    guard_mean: float  # per step over 100 steps (weight-norm and flush steps included)
    guard_ops: dict[str, int]  # the typical step's ops, by name


def count_ops(case: str, opt_kind: str, clip: str, steps: int = 100, **guard_kw: Any) -> Ops:
    """The ops of the plain update and of guard.step (warm: after 3 steps)."""
    twin = _Twin(case, opt_kind, clip, **guard_kw)
    for _ in range(3):
        twin.plain()
        twin.guarded()
    twin.backward(twin.plain_model, twin.plain_opt)
    with OpCount() as plain:
        twin.plain_update()
    counts: list[OpCount] = []
    for _ in range(steps):
        loss = twin.backward(twin.guard_model, twin.guard_opt)
        with OpCount() as c:
            twin.guard.step(loss)
        counts.append(c)
    twin.guard.close()
    typical = collections.Counter(c.total for c in counts).most_common(1)[0][0]
    one = next(c for c in counts if c.total == typical)
    return Ops(
        case,
        opt_kind,
        clip,
        plain.total,
        plain.compute,
        one.total,
        one.compute,
        statistics.mean(c.total for c in counts),
        dict(sorted(one.ops.items())),
    )


# ----------------------------------------------------------------------------- timings
def _psi_total() -> float | None:
    """Linux PSI ``cpu some total``: µs in which a task waited for a core (None where not available)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("total=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Timing:
    case: str
    optimizer: str
    clip: str
    tensors: int
    params: int
    plain_us: float  # median
    guard_us: float
    ratio: float  # median of the pair ratios
    ratio_q1: float
    ratio_q3: float
    diff_us: float  # median of the pair differences
    pairs: int
    contention_pct: float | None  # % of the wall time a task waited for a core (PSI)
    load: float  # 1-minute load average at the end


def time_case(case: str, opt_kind: str, clip: str, pairs: int, warmup: int, **guard_kw: Any) -> Timing:
    twin = _Twin(case, opt_kind, clip, **guard_kw)
    for _ in range(warmup):
        twin.plain()
        twin.guarded()
    times: dict[str, list[float]] = {"plain": [], "guard": []}
    runs: list[tuple[str, Callable[[], None]]] = [("plain", twin.plain), ("guard", twin.guarded)]
    before, t_start = _psi_total(), time.monotonic()
    gc.disable()
    try:
        for i in range(pairs):
            for name, fn in runs if i % 2 == 0 else runs[::-1]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    after, elapsed = _psi_total(), time.monotonic() - t_start
    twin.guard.close()
    contention = None
    if before is not None and after is not None and elapsed > 0:
        contention = 100.0 * (after - before) / (elapsed * 1e6)
    ratios = sorted(g / p for g, p in zip(times["guard"], times["plain"]))
    q = statistics.quantiles(ratios, n=4)
    diffs = [1e6 * (g - p) for g, p in zip(times["guard"], times["plain"])]
    return Timing(
        case,
        opt_kind,
        clip,
        twin.tensors,
        twin.params,
        1e6 * statistics.median(times["plain"]),
        1e6 * statistics.median(times["guard"]),
        statistics.median(ratios),
        q[0],
        q[2],
        statistics.median(diffs),
        pairs,
        contention,
        os.getloadavg()[0],
    )


# ----------------------------------------------------------------------------- main
TARGETS = {"mlp2x32": 1.15, "mlp4x256": 1.05}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer pairs (smoke check)")
    ap.add_argument("--ops", action="store_true", help="op counts only (deterministic, seconds)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--optim", nargs="+", default=["foreach", "fused"], choices=["foreach", "fused"])
    ap.add_argument("--clip", nargs="+", default=["norm:1", "auto"])
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--verbose", action="store_true", help="list the guard's ops by name")
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pairs = args.pairs or (100 if args.quick else 400)
    warmup = 20
    configs = [(c, o, k) for c in args.cases for o in args.optim for k in args.clip]
    ops = [count_ops(*cfg) for cfg in configs]
    print("| model | optimizer | clip | plain ops (compute) | guard.step ops (compute) | mean over 100 steps |")
    print("|---|---|---|---:|---:|---:|")
    for o in ops:
        print(
            f"| {o.case} | AdamW {o.optimizer} | `{o.clip}` | {o.plain} ({o.plain_compute}) | "
            f"{o.guard} ({o.guard_compute}) | {o.guard_mean:.1f} |"
        )
        if args.verbose:
            print("   ", o.guard_ops)
    timings: list[Timing] = []
    if not args.ops:
        print(
            "\n| model | optimizer | clip | tensors | plain µs | guard µs | ratio (median of pairs) | IQR "
            "| diff µs | target | contention % | load |"
        )
        print("|---|---|---|---:|---:|---:|---:|---|---:|---|---:|---:|")
        for cfg in configs:
            t = time_case(*cfg, pairs=pairs, warmup=warmup)
            timings.append(t)
            target = TARGETS.get(t.case)
            cont = "—" if t.contention_pct is None else f"{t.contention_pct:.1f}"
            print(
                f"| {t.case} | AdamW {t.optimizer} | `{t.clip}` | {t.tensors} | {t.plain_us:.0f} | "
                f"{t.guard_us:.0f} | {t.ratio:.3f} | {t.ratio_q1:.3f}–{t.ratio_q3:.3f} | {t.diff_us:+.0f} | "
                f"{'—' if target is None else f'≤ {target:.2f}'} | {cont} | {t.load:.2f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "ops": [asdict(o) for o in ops],
                    "timings": [asdict(t) for t in timings],
                    "machine": {
                        "python": platform.python_version(),
                        "torch": torch.__version__,
                        "threads": 1,
                        "cpus": os.cpu_count(),
                        "cpu": platform.processor(),
                    },
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
