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

``--blocks N`` interleaves blocks of ``N`` consecutive steps of each model instead of single steps
(the value of a block: the median of its steps): a training run's pattern, one model stepping back
to back. Single-step pairs of twin models evict each other's working set from the caches at every
step; from ``mlp4x256`` on (~4 MB of weights, gradients and AdamW state a model, against a 1 MB L2 a
core here) that eviction moves the ratios more than the guard's fixed cost does.

Op counts (deterministic, unlike the timings): the aten ops that launch a kernel (a
``TorchDispatchMode`` that counts them; views, metadata ops and host reads left out) inside one warm
``guard.step``, the guard's own apart from those of the optimizer step it calls, against those of
``clip_grad_norm_`` and of the plain ``opt.step()``; the guard's own for a typical step and on
average over 100 steps (weight-norm and flush steps included). On a CPU each costs ~3-5 µs of
dispatch; on a GPU each is a kernel launch.

Run ``python benchmarks/fixed_cost.py`` (about 2 minutes), ``--quick``, ``--ops`` (op counts only,
seconds), ``--parts`` (where the µs of a step go: each part timed alone, the fastest of 7 rounds),
``--locate-off`` (plain / guard / guard with ``locate=False`` in one process: the capture's share), ``--json out.json``, ``--identical DIR`` (this tree logs bit for bit what an older one logs: 69 runs
of 60 steps over the common settings; ~2 minutes). ``--baseline DIR`` (an older tree's ``src/gradguard``, e.g. from
``git archive HEAD src/gradguard | tar -x -C /tmp/base``): plain / that guard / this guard as
interleaved triples in one process, with the median ratios guard / baseline (``--clock thread``:
CPU time, steadier on a busy machine).
"""

from __future__ import annotations

import argparse
import collections
import gc
import importlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard
from guard import contention_pct, cpu_wait_us  # benchmarks/guard.py

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

    def __init__(self, case: str, opt_kind: str, clip: str, module: Any = gradguard, **guard_kw: Any) -> None:
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
        self.guard = module.Guard(self.guard_model, self.guard_opt, clip=clip, **guard_kw)
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
# ops that launch no kernel besides views: autograd bookkeeping, the profiler's markers, a host read
_NO_KERNEL = {"aten.detach.default", "aten.lift_fresh.default", "aten.alias.default"}


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside it that launch a kernel (no views, no metadata ops),
    apart for those inside an optimizer's step (see :meth:`watch`) and the host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.own: collections.Counter[str] = collections.Counter()  # outside the optimizer step
        self.in_step = 0  # inside the optimizer step
        self.syncs = 0  # host reads (``.item()``, ``bool(t)``)
        self._stepping = False

    def watch(self, opt: torch.optim.Optimizer) -> None:
        """Count the ops of ``opt.step()`` apart (the optimizer's, not the guard's)."""
        step = opt.step

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._stepping = True
            try:
                return step(*args, **kwargs)
            finally:
                self._stepping = False

        opt.step = counted  # type: ignore[method-assign]

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = str(func)
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += not self._stepping
        elif not (func.is_view or name in _NO_KERNEL or name.startswith("profiler")):
            if self._stepping:
                self.in_step += 1
            else:
                self.own[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.own.values())


@dataclass
class Ops:
    case: str
    optimizer: str
    clip: str
    clip_grad_norm: int  # torch.nn.utils.clip_grad_norm_
    plain_step: int  # the plain loop's opt.step()
    guard_own: int  # guard.step outside the optimizer step, a typical step
    guard_step: int  # the optimizer step under the guard (found_inf / grad_scale: a few more)
    guard_syncs: int  # the guard's host reads (the host-decided path: 1), outside the optimizer step
    guard_mean: float  # the guard's own ops per step over 100 steps (weight-norm and flush steps in)
    guard_ops: dict[str, int]  # the typical step's own ops, by name


def count_ops(case: str, opt_kind: str, clip: str, steps: int = 100, **guard_kw: Any) -> Ops:
    """The ops of the plain update and of guard.step (warm: after 3 steps)."""
    twin = _Twin(case, opt_kind, clip, **guard_kw)
    for _ in range(3):
        twin.plain()
        twin.guarded()
    clip_ops, plain_ops = OpCount(), OpCount()
    plain_ops.watch(twin.plain_opt)
    twin.backward(twin.plain_model, twin.plain_opt)
    with clip_ops:
        torch.nn.utils.clip_grad_norm_(twin.plain_model.parameters(), 1.0)
    with plain_ops:
        twin.plain_opt.step()
    counts: list[OpCount] = []
    for _ in range(steps):
        loss = twin.backward(twin.guard_model, twin.guard_opt)
        c = OpCount()
        c.watch(twin.guard_opt)
        with c:
            twin.guard.step(loss)
        twin.guard_opt.__dict__.pop("step")  # the optimizer's own step again
        counts.append(c)
    twin.guard.close()
    typical = collections.Counter(c.total for c in counts).most_common(1)[0][0]
    one = next(c for c in counts if c.total == typical)
    return Ops(
        case,
        opt_kind,
        clip,
        clip_ops.total,
        plain_ops.in_step,
        one.total,
        one.in_step,
        one.syncs,
        statistics.mean(c.total for c in counts),
        dict(sorted(one.own.items())),
    )


def op_matrix(case: str = "mlp2x32") -> list[dict[str, Any]]:
    """The guard's own ops (outside the optimizer step) of a warm layer step and a warm step without
    per-layer norms, for the common settings: fused / foreach AdamW × ``on_nonfinite`` skip / warn ×
    clip ``auto`` / ``norm:1`` / none (``layer_every=2``; no weight norms, no flush in the window)."""
    rows = []
    for opt_kind, policy in (("fused", "skip"), ("foreach", "skip"), ("foreach", "warn"), ("fused", "warn")):
        for clip in ("auto", "norm:1", "none"):
            twin = _Twin(
                case, opt_kind, clip, on_nonfinite=policy, layer_every=2, weight_every=None, every=1000
            )
            for _ in range(4):
                twin.guarded()
            counts = []
            for _ in range(2):  # a layer step (even), then one without
                loss = twin.backward(twin.guard_model, twin.guard_opt)
                c = OpCount()
                c.watch(twin.guard_opt)
                with c:
                    twin.guard.step(loss)
                twin.guard_opt.__dict__.pop("step")
                counts.append(c)
            twin.guard.close()
            rows.append(
                {
                    "optimizer": opt_kind,
                    "on_nonfinite": policy,
                    "clip": clip,
                    "layer_step": counts[0].total,
                    "other_step": counts[1].total,
                    "in_optimizer_step": counts[1].in_step,
                    "host_reads": counts[1].syncs,
                }
            )
    return rows


# ----------------------------------------------------------------------------- where the µs go
def parts(case: str, opt_kind: str, clip: str, number: int = 200, repeat: int = 7) -> dict[str, float]:
    """µs per call of each part of a plain and a guarded step (the fastest of ``repeat`` rounds of
    ``number`` calls: a quiet-core estimate, steadier than pairs on a busy machine), on a warm twin.

    The guard's parts are its own calls on the step's tensors (``Meter.measure``, ``Clipping.plan``,
    ``device_row``), the optimizer step under the fused protocol (``grad_scale`` / ``found_inf`` set,
    as the guard sets them), the forward and backward with locate's capture hooks; ``guard.step``
    is the whole call (of a typical step: no flush, no weight norms), its glue what the parts leave of it."""
    from gradguard._guard import apply as applying
    from gradguard._guard.row import column, device_row

    twin = _Twin(case, opt_kind, clip, every=4000, weight_every=None)  # typical steps: no flush among them
    for _ in range(20):
        twin.plain()
        twin.guarded()
    g, gm, go, pm, po = twin.guard, twin.guard_model, twin.guard_opt, twin.plain_model, twin.plain_opt
    loss = twin.backward(gm, go)
    twin.backward(pm, po)
    m = g._meter.measure(loss, g.monitor.next_rows)
    plan = g._clipping.plan(m)
    skip, overflow = g._skip_flags(m, plan.spike, None)
    row = device_row(m, plan, skip, overflow, g._consts)

    def guarded_backward() -> None:
        twin.backward(gm, go)
        g._anomaly.end_step()  # (the capture keeps the step's inputs until its step)

    def protocol_step() -> (
        None
    ):  # the optimizer step as the guard calls it (fused on a GPU: grad_scale, found_inf)
        planned = applying.Planned(m.grads, plan.coef, skip, None, lambda: None)
        if applying.branches_on_host(g._params) and twin.guard.fused:  # the CPU's host branch
            applying._fused_step(go, planned, on_cpu=True)
        elif applying.branches_on_host(g._params):  # HostDecided's clip (a coefficient of 1: no multiply)
            applying._clip(planned, on_cpu=True)
            go.step()
        elif twin.guard.fused and plan.coef is not None:
            go.grad_scale, go.found_inf = plan.coef.reciprocal(), column(row, "skipped")  # type: ignore[attr-defined]
            go.step()
            del go.grad_scale, go.found_inf  # type: ignore[attr-defined]
        else:
            go.step()

    calls: dict[str, Callable[[], Any]] = {
        "forward + backward, plain": lambda: twin.backward(pm, po),
        "forward + backward, guarded (locate's capture)": guarded_backward,
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(pm.parameters(), 1.0),
        "opt.step(), plain": po.step,
        "opt.step(), as the guard calls it": protocol_step,
        "guard.step": lambda: g.step(loss),
        "Meter.measure": lambda: g._meter.measure(loss, g.monitor.next_rows),
        "Clipping.plan": lambda: g._clipping.plan(m),
        "device_row": lambda: device_row(m, plan, skip, overflow, g._consts),
    }
    import timeit

    assert 20 + number * repeat < 4000  # (guard.step's calls: no flush)
    found = {
        name: 1e6 * min(timeit.repeat(fn, number=number, repeat=repeat)) / number
        for name, fn in calls.items()
    }
    g.close()
    own = sum(
        found[k]
        for k in ("Meter.measure", "Clipping.plan", "device_row", "opt.step(), as the guard calls it")
    )
    found["guard.step's glue (the rest)"] = found["guard.step"] - own
    return found


def locate_share(
    case: str, opt_kind: str, clip: str, rounds: int = 400, block: int = 1
) -> dict[str, tuple[float, float]]:
    """The guard's extra over the plain step with and without locate's capture: plain, the guard and
    the guard with ``locate=False`` interleaved in one process (thread CPU time, gc off; ``block``
    steps of one model at a time, see :func:`interleaved`); the median ratio to plain and the median
    difference in µs of each."""
    twins = {
        "guard": _Twin(case, opt_kind, clip),
        "guard, locate=False": _Twin(case, opt_kind, clip, locate=False),
    }
    runs = [("plain", twins["guard"].plain)] + [(k, t.guarded) for k, t in twins.items()]
    for _ in range(30):
        for _, fn in runs:
            fn()
    times = interleaved(runs, rounds, block, time.thread_time)
    for t in twins.values():
        t.guard.close()
    plain = times.pop("plain")
    return {
        k: (
            statistics.median(a / b for a, b in zip(v, plain)),
            1e6 * statistics.median(a - b for a, b in zip(v, plain)),
        )
        for k, v in times.items()
    }


def interleaved(
    runs: list[tuple[str, Callable[[], None]]], rounds: int, block: int, now: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds a step of each run, round by round (the order reversed every other round, gc off).

    ``block=1``: one step of each run a round (step pairs). ``block=N``: ``N`` consecutive steps of
    each run a round, the round's value the median of its ``N``: the pattern of a training run,
    whose model steps back to back and keeps its working set in the caches. Step pairs of twin models
    evict each other's working set at every step (at ``mlp4x256``, ~4 MB of weights, gradients and
    AdamW state a model against a 1 MB L2 a core): a cost a run that trains one model never pays,
    and which moves with the placement more than the guard's fixed cost does."""
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    gc.disable()
    try:
        for r in range(rounds):
            for name, fn in runs if r % 2 == 0 else runs[::-1]:
                steps = []
                for _ in range(block):
                    t0 = now()
                    fn()
                    steps.append(now() - t0)
                times[name].append(statistics.median(steps))
    finally:
        gc.enable()
    return times


def print_parts(configs: list[tuple[str, str, str]]) -> None:
    for cfg in configs:
        found = parts(*cfg)
        print(f"\n{cfg[0]}, AdamW {cfg[1]}, `{cfg[2]}` (µs per call, fastest of 7 rounds):\n")
        print("| part | µs |\n|---|---:|")
        for name, us in found.items():
            print(f"| {name} | {us:.1f} |", flush=True)


# ----------------------------------------------------------------------------- timings
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
    pairs: int  # rounds: pairs of steps, or of blocks of ``block`` steps
    block: int
    clock: str
    contention_pct: float | None  # % of the wall time a task waited for a core (PSI)
    load: float  # 1-minute load average at the end


def time_case(
    case: str,
    opt_kind: str,
    clip: str,
    pairs: int,
    warmup: int,
    block: int = 1,
    clock: str = "wall",
    **guard_kw: Any,
) -> Timing:
    """Plain and guarded steps of twin models, ``pairs`` interleaved pairs (of blocks of ``block``
    steps: :func:`interleaved`), on the wall clock or the thread's CPU clock."""
    twin = _Twin(case, opt_kind, clip, **guard_kw)
    for _ in range(warmup):
        twin.plain()
        twin.guarded()
    runs: list[tuple[str, Callable[[], None]]] = [("plain", twin.plain), ("guard", twin.guarded)]
    before, t_start = cpu_wait_us(), time.monotonic()
    times = interleaved(runs, pairs, block, time.thread_time if clock == "thread" else time.perf_counter)
    contention = contention_pct(before, cpu_wait_us(), time.monotonic() - t_start)
    twin.guard.close()
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
        block,
        clock,
        contention,
        os.getloadavg()[0],
    )


# ----------------------------------------------------------------------------- against a baseline
def load_baseline(src: str) -> Any:
    """An older gradguard package directory (e.g. ``git archive <rev> src/gradguard | tar -x -C DIR``,
    then ``DIR/src/gradguard``) imported beside this one as ``gradguard_baseline``: copied to a
    temporary directory with its imports of ``gradguard`` renamed."""
    if not os.path.isfile(os.path.join(src, "guard.py")):
        raise SystemExit(f"--baseline {src!r} is not a gradguard package directory (no guard.py in it)")
    root = tempfile.mkdtemp(prefix="gradguard_baseline_")
    dest = os.path.join(root, "gradguard_baseline")
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, _, files in os.walk(dest):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    text = f.read()
                text = re.sub(r"\bfrom gradguard(\.| import)", r"from gradguard_baseline\1", text)
                text = re.sub(r"\bimport gradguard\b", "import gradguard_baseline as gradguard", text)
                text = text.replace('"gradguard.', '"gradguard_baseline.')
                with open(path, "w") as f:
                    f.write(text)
    sys.path.insert(0, root)
    return importlib.import_module("gradguard_baseline")


@dataclass
class VsBaseline:
    case: str
    optimizer: str
    clip: str
    plain_us: float  # medians
    baseline_us: float
    guard_us: float
    baseline_ratio: float  # median of the ratios to the plain step of the same triple
    ratio: float
    vs_baseline: float  # median of the ratios guard / baseline
    triples: int
    clock: str
    contention_pct: float | None


def time_vs_baseline(
    case: str, opt_kind: str, clip: str, baseline: Any, triples: int, warmup: int, clock: str
) -> VsBaseline:
    """Plain, the baseline's guard and this guard on triplets of one model and batch, interleaved
    (the order rotated and reversed triple by triple)."""
    twin = _Twin(case, opt_kind, clip)
    base = _Twin(case, opt_kind, clip, module=baseline)
    runs: list[tuple[str, Callable[[], None]]] = [
        ("plain", twin.plain),
        ("baseline", base.guarded),
        ("guard", twin.guarded),
    ]
    for _ in range(warmup):
        for _, fn in runs:
            fn()
    now = time.thread_time if clock == "thread" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    before, t_start = cpu_wait_us(), time.monotonic()
    gc.disable()
    try:
        for i in range(triples):
            order = runs[i % 3 :] + runs[: i % 3]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t0 = now()
                fn()
                times[name].append(now() - t0)
    finally:
        gc.enable()
    contention = contention_pct(before, cpu_wait_us(), time.monotonic() - t_start)
    twin.guard.close()
    base.guard.close()

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    med = {name: 1e6 * statistics.median(v) for name, v in times.items()}
    return VsBaseline(
        case,
        opt_kind,
        clip,
        med["plain"],
        med["baseline"],
        med["guard"],
        ratio("baseline", "plain"),
        ratio("guard", "plain"),
        ratio("guard", "baseline"),
        triples,
        clock,
        contention,
    )


def print_vs_baseline(configs: list[tuple[str, str, str]], baseline: Any, args: Any) -> list[VsBaseline]:
    triples = args.pairs or (100 if args.quick else 400)
    print(f"\nAgainst the baseline ({args.clock} clock; medians over {triples} interleaved triples):\n")
    print(
        "| model | optimizer | clip | plain µs | baseline µs | guard µs | baseline / plain | guard / plain "
        "| guard / baseline | contention % |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    found = []
    for cfg in configs:
        v = time_vs_baseline(*cfg, baseline, triples, 20, args.clock)
        found.append(v)
        cont = "—" if v.contention_pct is None else f"{v.contention_pct:.1f}"
        print(
            f"| {v.case} | AdamW {v.optimizer} | `{v.clip}` | {v.plain_us:.0f} | {v.baseline_us:.0f} | "
            f"{v.guard_us:.0f} | {v.baseline_ratio:.3f} | {v.ratio:.3f} | {v.vs_baseline:.3f} | {cont} |",
            flush=True,
        )
    return found


# ----------------------------------------------------------------------------- bit-identity
def _identity_run(module: Any, clip: str, policy: str, opt_kind: str, dtype: torch.dtype, **kw: Any) -> Any:
    """60 steps of a small MLP under ``module.Guard`` (a flush every 7 steps; a NaN loss at step 20
    and an inf one at 40, a 50× batch at 30): every flushed record, every event, the final weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).to(
        dtype
    )
    if opt_kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=opt_kind == "fused" or None)
    records: list[Any] = []
    with tempfile.TemporaryDirectory() as d:
        guard = module.Guard(model, opt, clip=clip, on_nonfinite=policy, every=7, log_dir=d, **kw)
        guard.add_flush_callback(
            lambda rs: records.extend(json.loads(json.dumps(r, default=str)) for r in rs)
        )
        gen = torch.Generator().manual_seed(1)
        for i in range(60):
            x = torch.randn(16, 8, generator=gen).to(dtype) * (50.0 if i == 30 else 1.0)
            y = torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y) * {20: math.nan, 40: math.inf}.get(i, 1.0)
            loss.backward()
            try:
                guard.step(loss)
            except Exception as exc:  # raise / abort: part of what is compared
                records.append({"raised": type(exc).__name__})
                break
        guard.close()
        events = []
        for root, _, files in os.walk(d):
            for name in sorted(f for f in files if f.endswith("events.jsonl")):
                with open(os.path.join(root, name)) as f:
                    events += [json.loads(line.replace(d, "DIR")) for line in f]
    return json.dumps([records, events], sort_keys=True), [p.detach().clone() for p in model.parameters()]


IDENTITY_SETTINGS: list[tuple[str, str, str, torch.dtype, dict[str, Any]]] = [
    *(
        (clip, policy, opt_kind, torch.float32, {})
        for clip in ("norm:1", "auto", "none", "norm:0.01", "zclip", "value:0.1", "agc")
        for policy in ("skip", "warn", "rollback", "raise")
        for opt_kind in ("fused", "foreach")
    ),
    *(
        ("norm:1", "skip", k, torch.float32, {"on_spike": s})
        for s in ("skip", "clip")
        for k in ("fused", "foreach")
    ),
    ("norm:1", "skip", "foreach", torch.float64, {}),
    ("auto", "skip", "fused", torch.float64, {}),
    ("norm:1", "skip", "sgd", torch.float32, {}),
    ("auto", "skip", "sgd", torch.float32, {}),  # auto's Polyak cap (session 16: its rule on host floats)
    ("autoclip:10", "skip", "fused", torch.float32, {}),  # (session 16: AutoClip's window on the host)
    ("norm:1", "skip", "foreach", torch.float32, {"layer_every": 3}),
    ("norm:1", "skip", "fused", torch.float32, {"norm_type": 1.0}),
    ("norm:1", "skip", "fused", torch.float32, {"norm_type": math.inf}),
    ("none", "warn", "fused", torch.float32, {"monitor_only": True}),
]


def identical_to(baseline: Any) -> tuple[int, list[str]]:
    """Run every setting of :data:`IDENTITY_SETTINGS` under the baseline package and this one: the
    runs whose records, events or final weights differ (compared bit for bit)."""
    differ = []
    for clip, policy, opt_kind, dtype, kw in IDENTITY_SETTINGS:
        (a, wa), (b, wb) = (
            _identity_run(mod, clip, policy, opt_kind, dtype, **kw) for mod in (baseline, gradguard)
        )
        same_weights = all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(wa, wb))
        if a != b or not same_weights:
            differ.append(f"{clip} {policy} {opt_kind} {dtype} {kw}")
    return len(IDENTITY_SETTINGS), differ


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
    ap.add_argument("--matrix", action="store_true", help="also the op counts of the common settings")
    ap.add_argument("--parts", action="store_true", help="where the µs go: each part of the steps (timeit)")
    ap.add_argument(
        "--locate-off",
        action="store_true",
        help="plain / guard / guard(locate=False) interleaved in one process (thread clock): the capture's share",
    )
    ap.add_argument(
        "--blocks",
        type=int,
        default=1,
        metavar="N",
        help="interleave blocks of N consecutive steps of each model (a training run's pattern; "
        "the timing table and --locate-off) instead of single steps; --pairs then counts blocks",
    )
    ap.add_argument(
        "--identical",
        default=None,
        metavar="DIR",
        help="an older gradguard package directory: check that this one logs the same numbers (records, "
        "events, final weights, bit for bit) over many settings, then exit",
    )
    ap.add_argument("--json", default=None, help="also write every number to this file")
    ap.add_argument(
        "--baseline",
        default=None,
        metavar="DIR",
        help="an older gradguard package directory: time plain / its guard / this guard as interleaved "
        "triples (instead of the plain / guard pairs)",
    )
    ap.add_argument(
        "--clock", default="wall", choices=["wall", "thread"], help="the timings' clock (thread: CPU time)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.identical:
        runs, differ = identical_to(load_baseline(args.identical))
        print(f"{runs} runs (60 steps each), {runs - len(differ)} bit-identical to {args.identical}")
        for line in differ:
            print("  differs:", line)
        return 1 if differ else 0
    if args.blocks < 1:
        raise SystemExit(f"--blocks {args.blocks}: a block is at least 1 step (e.g. --blocks 100)")
    pairs = args.pairs or max(8, (100 if args.quick else 400) // args.blocks)
    warmup = 20
    configs = [(c, o, k) for c in args.cases for o in args.optim for k in args.clip]
    ops = [count_ops(*cfg) for cfg in configs]
    print(
        "| model | optimizer | clip | clip_grad_norm_ ops | guard's own ops (mean over 100 steps) "
        "| optimizer step ops: plain / guarded | the guard's host reads |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for o in ops:
        print(
            f"| {o.case} | AdamW {o.optimizer} | `{o.clip}` | {o.clip_grad_norm} | {o.guard_own} "
            f"({o.guard_mean:.1f}) | {o.plain_step} / {o.guard_step} | {o.guard_syncs} |"
        )
        if args.verbose:
            print("   ", o.guard_ops)
    matrix = op_matrix() if args.matrix else []
    if matrix:
        print(
            "\n| AdamW | on_nonfinite | clip | layer step | step without layer norms | in the optimizer step | host reads |"
        )
        print("|---|---|---|---:|---:|---:|---:|")
        for m in matrix:
            print(
                f"| {m['optimizer']} | {m['on_nonfinite']} | `{m['clip']}` | {m['layer_step']} | {m['other_step']} "
                f"| {m['in_optimizer_step']} | {m['host_reads']} |"
            )
    if args.parts:
        print_parts(configs)
    timings: list[Timing] = []
    vs_baseline: list[VsBaseline] = []
    if args.parts:
        pass
    elif args.locate_off:
        for case, opt_kind, clip in configs:
            for name, (ratio, diff) in locate_share(case, opt_kind, clip, pairs, args.blocks).items():
                print(f"{case}, AdamW {opt_kind}, `{clip}`: {name} {ratio:.3f}× plain, {diff:+.0f} µs")
    elif args.baseline and not args.ops:
        vs_baseline = print_vs_baseline(configs, load_baseline(args.baseline), args)
    elif not args.ops:
        unit = "pairs" if args.blocks == 1 else f"pairs of {args.blocks}-step blocks"
        print(
            f"\n| model | optimizer | clip | tensors | plain µs | guard µs | ratio (median of {unit}) | IQR "
            "| diff µs | target | contention % | load |"
        )
        print("|---|---|---|---:|---:|---:|---:|---|---:|---|---:|---:|")
        for cfg in configs:
            t = time_case(*cfg, pairs=pairs, warmup=warmup, block=args.blocks, clock=args.clock)
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
                    "op_matrix": matrix,
                    "timings": [asdict(t) for t in timings],
                    "vs_baseline": [asdict(v) for v in vs_baseline],
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
