"""CPU benchmark: what the optimizer-birth check (``gradguard._guard.births``) costs a healthy step.

One guard, ``Guard`` defaults (``on_nonfinite="skip"``) with ``clip="norm:1"``, AdamW
``foreach=True``, one thread; each round times one step under each of three birth checks, swapped
in and out of the same guard (same model, same memory: separate twin models differ by ±1–2% from
memory placement alone, more than the effect), in alternating order, after a warm-up:

* ``now``: the check as built (the anomaly-path check: no device op; a step pre- and post-hook
  that read one weight's version counter; every counter read once per flush);
* ``norms``: the per-step check (a foreach L2 norm over the weights after each optimizer step, read
  at the flush: the check used under ``on_nonfinite="warn"``, and the one before session 11's fix);
* ``none``: no birth check at all.

Reported per model: the median step, and the medians of the per-round ratios ``norms / now`` and
``now / none`` with the differences in µs; ``none / none`` (two ``none`` slots a round) is the noise
floor. Models as in ``fixed_cost.py``: ``mlp2x32`` (6 tensors), ``mlp4x256`` (10), ``deep100x16``
(202). Run ``OMP_NUM_THREADS=1 python benchmarks/births_cost.py [--rounds N]`` (about 1.5 minutes
at the default 1000 rounds).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import gradguard
from fixed_cost import BATCH, CASES, mlp  # benchmarks/fixed_cost.py
from gradguard._guard.births import OptimizerBirths

VARIANTS = ("now", "norms", "none", "none2")


class _NoBirths:
    """A stand-in for the birth check that does nothing."""

    def begin(self, step: int) -> None: ...
    def found(self, records: object) -> list[object]:
        return []

    def at_bad_step(self, step: int, pending: object) -> list[object]:
        return []

    def close(self) -> None: ...


def _switch(guard: gradguard.Guard, opt: torch.optim.Optimizer) -> Callable[[str], None]:
    """``use(variant)``: put that birth check (and only its hooks) on the guard and its optimizer."""
    now: Any = guard._births
    norms: Any = OptimizerBirths(opt, guard._guarded.named, bad_steps_applied=True)
    checks = {"now": now, "norms": norms, "none": _NoBirths(), "none2": _NoBirths()}

    def use(variant: str) -> None:
        now._writes.close()
        norms._each.close()
        if variant == "now":
            now._writes._handles = [
                opt.register_step_pre_hook(now._writes._pre),
                opt.register_step_post_hook(now._writes._post),
            ]
        elif variant == "norms":
            norms._each._handle = opt.register_step_post_hook(norms._each._after_step)
        guard._births = checks[variant]

    return use


def run(case: str, rounds: int) -> dict[str, list[float]]:
    width = CASES[case][1]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, width, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    torch.manual_seed(0)
    model = mlp(*CASES[case])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    guard = gradguard.Guard(model, opt, clip="norm:1")
    use = _switch(guard, opt)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(30):
        for v in VARIANTS:
            use(v)
            step()
    gc.disable()
    try:
        for r in range(rounds):
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                use(v)
                times[v].append(step())
    finally:
        gc.enable()
    use("now")
    guard.close()
    return times


def _pair(a: list[float], b: list[float]) -> str:
    ratio = statistics.median(x / y for x, y in zip(a, b))
    diff = statistics.median(x - y for x, y in zip(a, b)) * 1e6
    return f"{ratio:.3f} | {diff:+.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| model | step (µs) | norms / now | µs | now / none | µs | none / none | µs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in CASES:
        t = run(case, args.rounds)
        print(
            f"| {case} | {statistics.median(t['now']) * 1e6:.0f} | {_pair(t['norms'], t['now'])} "
            f"| {_pair(t['now'], t['none'])} | {_pair(t['none2'], t['none'])} |"
        )


if __name__ == "__main__":
    main()
