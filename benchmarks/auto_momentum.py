"""Why ``auto`` misses the char transformer at SGD lr 1 with momentum, and why a momentum-aware cap is no fix (issue 15).

``auto`` caps the SGD step at half the Polyak step, ``lr·τ ≤ 0.5·f/‖g‖``, reading ``lr`` only. With
momentum β the update is ``lr`` × the momentum buffer: up to ``1/(1 − β)`` = 10× the clipped gradient
when successive gradients align, about ``1/√(1 − β²)`` ≈ 2.3× when they do not. The candidate fix
divides the cap by ``1/(1 − β)``; with every group at one momentum that is ``Auto(polyak=0.05)``
(the ``auto10`` column), so it is measured here through the public API.

Rows (SGD, momentum 0.9, no warm-up; ``seeds`` seeds, identical data and initialisation per seed):

* ``transformer``: ``benchmarks/transformer_lr.py``'s 2-layer post-LN char transformer, 400 steps;
  success = held-out bits/char ≤ 3.8.
* ``mlp`` (64-256-256-10, ReLU) and ``cnn`` (two 3×3 convolutions, 16 and 32 channels, max-pool, a
  64-unit layer): scikit-learn's digits (1,500 train / 297 test), batches of 64, 300 steps;
  success = test accuracy ≥ 0.9 with no non-finite step.

Columns: ``none``, ``auto`` (the ``"auto"`` spec), ``auto10`` (the momentum-aware cap). Each cell prints
successes and the per-seed metric.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/auto_momentum.py                 # ~5 min CPU
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/auto_momentum.py --rows cnn --lrs 0.1 --seeds 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradguard
import transformer_lr
from gradguard.clip import Auto

MOMENTUM = 0.9
LRS = {"transformer": [1.0], "mlp": [0.1, 0.3, 1.0], "cnn": [0.1, 0.3, 1.0]}
METHODS = ["none", "auto", "auto10"]
CLASSIFIER_STEPS, BATCH, ACCURACY = 300, 64, 0.9


def clipper(method: str) -> Any:
    """The clip= of a column; ``auto10`` is the ``"auto"`` spec with the cap divided by 1/(1 − 0.9);
    ``trust:ETA`` is the spec plus the per-layer trust cap ``Auto(trust=ETA)`` (session 13)."""
    if method == "auto10":
        return Auto(**{**Auto.SPEC, "polyak": Auto.SPEC["polyak"] * (1 - MOMENTUM)})
    if method.startswith("trust:"):
        return Auto(**{**Auto.SPEC, "trust": float(method.split(":")[1])})
    return None if method == "none" else method


def classifier(arch: str) -> nn.Module:
    if arch == "mlp":
        return nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def train(model: nn.Module, opt: torch.optim.Optimizer, method: str, steps: int, batch: Any) -> bool:
    """Train through a Guard; False at the first non-finite loss or norm."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = gradguard.Guard(
            model, opt, clip=clipper(method), locate=False, weight_every=None, on_spike="ignore"
        )
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = batch()
            loss.backward()
            guard.step(loss)
            if not (math.isfinite(float(loss)) and math.isfinite(float(guard.last_grad_norm))):
                return False
    return True


def run_classifier(arch: str, lr: float, method: str, seed: int) -> float:
    """Test accuracy after the steps (NaN when a step went non-finite)."""
    x, y = digits()
    torch.manual_seed(seed)
    model = classifier(arch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(100 + seed)

    def batch() -> Tensor:
        idx = torch.randint(0, 1500, (BATCH,), generator=gen)
        return F.cross_entropy(model(x[idx]), y[idx])

    if not train(model, opt, method, CLASSIFIER_STEPS, batch):
        return math.nan
    with torch.no_grad():
        return float((model(x[1500:]).argmax(1) == y[1500:]).float().mean())


def run_transformer(lr: float, method: str, seed: int) -> float:
    """Held-out bits/char after ``transformer_lr.STEPS`` steps (NaN when a step went non-finite)."""
    s = transformer_lr.make(seed, "sgd", lr)  # SGD with momentum 0.9
    losses: list[float] = []

    def batch() -> Tensor:
        loss = s.loss_fn(next(s.batches))
        losses.append(float(loss.detach()))
        return loss

    if not train(s.model, s.optimizer, method, transformer_lr.STEPS, batch):
        return math.nan
    return s.final(losses)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="transformer,mlp,cnn")
    ap.add_argument("--lrs", default=None, help="comma-separated rates for every row (default: LRS)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS), help="columns (also trust:ETA)")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print("| row | lr | " + " | ".join(methods) + " |\n|---|---|" + "---|" * len(methods))
    for row in args.rows.split(","):
        lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else LRS[row]
        for lr in lrs:
            cells = []
            for method in methods:
                if row == "transformer":
                    vals = [run_transformer(lr, method, s) for s in range(args.seeds)]
                    ok = sum(v <= transformer_lr.TARGET for v in vals)  # NaN compares False
                else:
                    vals = [run_classifier(row, lr, method, s) for s in range(args.seeds)]
                    ok = sum(v >= ACCURACY for v in vals)
                cells.append(f"{ok}/{args.seeds} ({', '.join(f'{v:.3g}' for v in vals)})")
            print(f"| {row} | {lr:g} | " + " | ".join(cells) + " |", flush=True)
    wall, cpu = time.perf_counter() - t0, time.process_time()
    print(f"\n{wall:.0f} s wall, {cpu:.0f} s CPU, torch {torch.__version__}, one thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
