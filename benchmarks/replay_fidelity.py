"""What replay fidelity costs (issue 12, part D): the healthy step's autocast read, and the replay.

* **Per forward** (the only cost on a healthy step): :func:`gradguard._replay.autocast_state`,
  which the step capture calls at each grad-enabled forward of the root (off: one C call; on: the
  state of each usable device type), in ns per call (``timeit``, median of 5 rounds).
* **Per replay** (the anomaly path): :meth:`gradguard.locate.Locator.replay` of one training step
  of a 4-layer ``nn.TransformerEncoder`` (d=128, 8×64 tokens): the replay as built (the graph walk
  that hooks the autograd nodes inside functional wrappers and custom Functions), against the same
  replay hooking only the nodes of the calls the watch sees (the walk off), and the plain step;
  medians of 5.

Run ``OMP_NUM_THREADS=1 python benchmarks/replay_fidelity.py`` (about 30 s on one core).
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from gradguard import _replay
from gradguard.locate import Locator, rng_state


def ns_per_call(fn: Callable[[], Any], n: int = 100_000) -> float:
    return statistics.median(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9


def median_s(fn: Callable[[], Any], n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    off = ns_per_call(_replay.autocast_state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        on = ns_per_call(_replay.autocast_state)
    print(f"autocast_state per forward: {off:.0f} ns (autocast off), {on:.0f} ns (on)")

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(128, 4, 256, batch_first=True)
    model = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    x = torch.randn(8, 64, 128)

    def step() -> None:
        model(x).sum().backward()

    def replay() -> None:
        Locator(model).replay(step, rng_state())

    plain = median_s(step)
    walk = median_s(replay)
    full_walk = _replay.new_nodes

    def roots_only(root: Any, seen: set[int], keep: list[Any], since: int = 0) -> Iterator[Any]:
        yield from list(full_walk(root, seen, keep, since))[:1]

    _replay.new_nodes = roots_only  # type: ignore[assignment]
    try:
        no_walk = median_s(replay)
    finally:
        _replay.new_nodes = full_walk  # type: ignore[assignment]
    print(
        f"4-layer transformer step: plain {plain * 1e3:.0f} ms, replay {walk * 1e3:.0f} ms "
        f"({walk / plain:.2f}x the step), without the graph walk {no_walk * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
