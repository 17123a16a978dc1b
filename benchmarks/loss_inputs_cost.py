"""CPU benchmark: what issue 12's part E adds to a healthy step (one thread, a few minutes).

Three costs, each measured A/B in one process with the new work switched off in B (interleaved
pairs A B, B A, … after a warm-up, gc off; the median of the pair differences in µs and of the
ratios):

(1) ``guard.step`` (AdamW foreach, ``clip="norm:1"``, ``Guard`` defaults otherwise): the check of the
    weights after each optimizer step (:mod:`gradguard._guard.births`: one foreach L2-norm pass,
    two reads of each weight's version counter) and the carried-state note of each forward
    (:class:`gradguard._inputs.CarriedState`: a weak reference per input/output storage).
    B: the same guard with both switched off. Models as in ``fixed_cost.py``: ``mlp2x32``
    (6 tensors), ``mlp4x256`` (10), ``deep100x16`` (202).
(2) the zero-code runner's loss-code watch, per op: a 24-op loss code under a :class:`LossWatch`
    (references to each op's tensors; now also the role of each input entering the loss code and
    a cross-entropy's target). B: the role and target bookkeeping switched off.

Run ``OMP_NUM_THREADS=1 python benchmarks/loss_inputs_cost.py [--pairs N]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradguard
from gradguard import _inputs
from gradguard.locate import LossWatch

CASES = {"mlp2x32": (2, 32), "mlp4x256": (4, 256), "deep100x16": (100, 16)}


def mlp(depth: int, width: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def guarded_step(case: str, *, new_work: bool) -> Callable[[], None]:
    """One guarded training step of ``case``; ``new_work=False`` switches part E's work off."""
    depth, width = CASES[case]
    torch.manual_seed(0)
    model = mlp(depth, width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    guard = gradguard.Guard(model, opt, clip="norm:1")
    if not new_work:
        guard._births.close()
        guard._births._done = True
        capture = guard._anomaly.capture
        assert capture is not None
        capture.carried.note = lambda *a, **k: None  # type: ignore[method-assign]
    x, y = torch.randn(32, width), torch.randint(0, 10, (32,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)

    return step


def loss_code(new_work: bool) -> Callable[[], None]:
    """A 24-op loss code (a cross-entropy, a regression term, a KL term) under a loss watch."""
    out = torch.randn(32, 10, requires_grad=True)
    logits = out * 1.0
    target, reg = torch.randint(0, 10, (32,)), torch.randn(32, 10)
    roles, target_of = LossWatch._entering, _inputs.target_of

    def run() -> None:
        if not new_work:
            LossWatch._entering = lambda self, *a: None  # type: ignore[method-assign,assignment]
            _inputs.target_of = lambda *a: None  # type: ignore[assignment]
        try:
            with LossWatch(made=[logits]) as watch:
                ce = F.cross_entropy(logits, target)
                mse = F.mse_loss(logits.softmax(-1), reg.softmax(-1))
                mu, logvar = logits[:, :5], logits[:, 5:]
                kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
                z = (logits - logits.mean(0)) / (logits.std(0) + 1e-6)
                extra = (z.abs() * reg).clamp(max=10).mean() + torch.log1p(logits.exp()).mean()
                loss = ce + mse + 0.1 * kl + 0.01 * extra
            watch.close()
            del loss
        finally:
            LossWatch._entering, _inputs.target_of = roles, target_of  # type: ignore[method-assign]

    return run


def pairs(a: Callable[[], None], b: Callable[[], None], n: int, warm: int = 20) -> tuple[float, float, float]:
    """Interleaved pairs (A B, B A, …): medians of A's µs, of the difference A − B, of A / B."""
    for _ in range(warm):
        a(), b()
    ta, diffs, ratios = [], [], []
    gc.disable()
    try:
        for i in range(n):
            order = (a, b) if i % 2 == 0 else (b, a)
            times = []
            for fn in order:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            t_a, t_b = (times[0], times[1]) if i % 2 == 0 else (times[1], times[0])
            ta.append(t_a * 1e6)
            diffs.append((t_a - t_b) * 1e6)
            ratios.append(t_a / t_b)
    finally:
        gc.enable()
    return statistics.median(ta), statistics.median(diffs), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    print(f"torch {torch.__version__}, one thread, {args.pairs} interleaved pairs per row")
    print("| what | new µs | added µs (median of pair differences) | ratio |")
    print("|---|---:|---:|---:|")
    for case in CASES:
        new, old = guarded_step(case, new_work=True), guarded_step(case, new_work=False)
        us, diff, ratio = pairs(new, old, args.pairs)
        print(f"| guard.step + forward/backward, {case} | {us:.0f} | {diff:+.1f} | {ratio:.3f} |")
    us, diff, ratio = pairs(loss_code(True), loss_code(False), args.pairs)
    print(
        f"| 24-op loss code under LossWatch | {us:.0f} | {diff:+.1f} ({diff / 24:+.2f} per op) | {ratio:.3f} |"
    )
    print(f"took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
