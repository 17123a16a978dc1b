"""The Deep SAD story run long: does each way of clipping train 5,000 steps? (issue 15)

The user's story (``../shared/seeds``, DESIGN.md): a pretrained Deep SAD detector, trained with SGD,
explodes to NaN; ``clip_grad_norm_(max_norm=5)`` stops the NaN but "the gradients vanished" (every
step clipped, training stalls); ``max_norm=100``, read off the typical gradient norms, trains all
the batches. The model, data and optimizer are ``gradguard demo deepsad``'s
(:mod:`gradguard.demos.deepsad`: a bias-free MLP encoder pretrained as an autoencoder on
scikit-learn's digits, centre c, 5 labeled anomalies; SGD lr 0.0225, momentum 0.9, weight decay
1e-6, batches of 32), run for ``STEPS`` steps instead of the demo's 400.

Columns (``benchmarks/_longrun.py``): ``none``, ``norm:5`` (the stall), ``norm:100`` (the story's
fix), ``auto``, ``zclip``, ``autoclip:10``, ``recover`` (unclipped, ``on_explosion="recover"``)
and ``tune`` (the threshold :func:`gradguard.tune.tune` verifies from the fresh start, 60 steps
per candidate). Success: all ``STEPS`` steps with no non-finite step, and the mean Deep SAD loss
of the last 100 steps at or below ``TARGET``.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deepsad_long.py             # 3 seeds (see the README)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deepsad_long.py --steps 500 --seeds 1
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from _longrun import Setup, Task, mean_tail, run, table
from gradguard.demos import deepsad

STEPS = 5000
TARGET = 0.05
"""Mean Deep SAD loss of the last 100 steps: 10× below where ``norm:5`` stalls in the demo (0.45–0.75
after 400 steps), above where the story's ``norm:100`` ends (0.01–0.02 after 400)."""


def make(seed: int, optimizer: str, lr: float) -> Setup:
    """The demo's scenario for ``seed``: the pretrained encoder, SGD as the story trains it."""
    sc = deepsad.build(seed)
    hp = deepsad.HPARAMS
    opt = torch.optim.SGD(
        sc.model.parameters(), lr=lr, momentum=hp["momentum"], weight_decay=hp["weight_decay"]
    )
    return Setup(sc.model, opt, sc.batches(), lambda b: sc.loss_fn(sc.model, b), mean_tail(100))


def task(steps: int = STEPS) -> Task:
    return Task("Deep SAD (digits)", steps, TARGET, "loss (last 100 steps)", make, ["norm:5", "norm:100"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=None, help="comma-separated columns (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t = task(args.steps)
    methods = args.methods.split(",") if args.methods else t.methods("sgd")
    t0 = time.perf_counter()
    runs: list[Any] = []
    for method in methods:
        for seed in range(args.seeds):
            runs.append(run(t, "sgd", deepsad.HPARAMS["lr"], method, seed))
            r = runs[-1]
            print(
                f"{method} seed {seed}: {r.reason} {r.final:.4g} ({r.seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    print(table(runs, t))
    wall, cpu = time.perf_counter() - t0, time.process_time()
    print(f"\n{len(runs)} runs, {wall:.0f} s wall, {cpu:.0f} s CPU, torch {torch.__version__}, one thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
