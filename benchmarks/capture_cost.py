"""CPU benchmark: what locate's per-step capture (``StepCapture``) adds to a forward + backward.

The guard keeps, at every step, what a replay of a bad step needs: the root's inputs and RNG state
(a forward pre-hook), a weak identity of its inputs and outputs and a keeper of the gradient that
reaches its output (a forward hook), and drops them at the optimizer step (``end_step`` and
``release``). This benchmark times ``zero grads; cross_entropy(model(x), y).backward()`` without and
with a capture (plus ``end_step(); release()``), on the MLPs of ``fixed_cost.py`` (``mlp2x32``,
``mlp4x256``; a batch of 32), and with ``--baseline DIR`` an older tree's capture in the same
process (see ``fixed_cost.py --baseline``).

One thread; rounds interleave the variants; each round times ``--number`` calls with the thread's
CPU clock (steadier than the wall clock on a shared machine); reported: the fastest round of each,
and the capture's extra µs over the plain forward + backward. Run
``OMP_NUM_THREADS=1 python benchmarks/capture_cost.py [--baseline /tmp/base/src/gradguard]``
(about a minute).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import time
import timeit
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixed_cost import load_baseline

CASES = {"mlp2x32": (2, 32), "mlp4x256": (4, 256), "lm7M": (10_000, 700)}
#: ``lm7M``: a word-LM-shaped model (embedding 10,000 × 128 and a 128 → 10,000 head) on 700 tokens:
#: a 7M-element output, above ``locate.RETAIN_MAX`` (its gradient is kept by reference, not copied);
#: timed with ``--number`` / 400 calls a round.


def _mlp(depth: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width if i else 32, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _case(case: str, number: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """The case's model, batch and calls a round."""
    if case == "lm7M":
        vocab, tokens = CASES[case]
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(vocab, 128), nn.Linear(128, vocab))
        return (
            model,
            torch.randint(0, vocab, (tokens,)),
            torch.randint(0, vocab, (tokens,)),
            max(1, number // 400),
        )
    depth, width = CASES[case]
    return _mlp(depth, width), torch.randn(32, 32), torch.randint(0, 10, (32,)), number


def _step(model: nn.Module, capture: Any, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    params = list(model.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        if capture is not None:
            capture.end_step()
            capture.release()

    return step


def _only(locate: Any, model: nn.Module, capture: Any) -> None:
    """Make ``capture`` the only one its module knows (the usual run: one model, one capture)."""
    if locate is None:
        return
    locate._CAPTURES.clear()
    group = locate._CAPTURES.setdefault(model, weakref.WeakSet())
    group.add(capture)
    if hasattr(capture, "_group"):
        capture._group = group


def measure(case: str, locates: dict[str, Any], rounds: int, number: int) -> dict[str, float]:
    """The fastest round of each variant, in µs per forward + backward."""
    base, x, y, number = _case(case, number)
    variants: dict[str, tuple[Callable[[], None], Any, nn.Module, Any]] = {}
    for name, locate in {"plain": None, **locates}.items():
        model = copy.deepcopy(base)
        capture = locate.StepCapture(model) if locate is not None else None
        variants[name] = (_step(model, capture, x, y), locate, model, capture)
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, (step, locate, model, capture) in variants.items():
            _only(locate, model, capture)
            seconds = timeit.timeit(step, number=number, timer=time.thread_time)
            best[name] = min(best[name], 1e6 * seconds / number)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="an older tree's src/gradguard, timed in the same process")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    locates = {"this": importlib.import_module("gradguard.locate")}
    if args.baseline:
        load_baseline(args.baseline)
        locates = {"baseline": importlib.import_module("gradguard_baseline.locate"), **locates}
    print(
        f"load average {os.getloadavg()[0]:.2f}; fastest of {args.rounds} rounds of {args.number} (thread CPU time)"
    )
    for case in args.cases:
        best = measure(case, locates, args.rounds, args.number)
        plain = best.pop("plain")
        extras = "  ".join(f"{name} +{us - plain:.1f} µs" for name, us in best.items())
        print(f"{case}: forward + backward {plain:.1f} µs; capture: {extras}")


if __name__ == "__main__":
    main()
