"""CPU benchmark: the Lightning ``GradGuard`` callback against Lightning's own ``gradient_clip_val``.

(a) lightning: ``Trainer(gradient_clip_val=1.0)`` — Lightning's ``clip_grad_norm_`` then the optimizer step.
(b) gradguard: ``Trainer(callbacks=[GradGuard(clip="norm:1.0")])`` — measure, per-layer norms, spike
    detection, non-finite check, clip folded into the step (fused: into the kernel), a flush every 50
    steps, weight norms every 50 steps, and the run directory on disk (the callback's defaults).

Both fit the same model (784 → 1024 → 1024 → 10 MLP, batch 128, AdamW; ``--optim fused`` for the fused
kernel) from the same initial weights on the same batches, in the same process. A fit of each variant
makes one round; rounds alternate the order (A B, B A, …). A timing callback measures every training
batch from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, clip, step and the
hooks), the first ``--warmup`` batches of each fit dropped. The figure is the **ratio of the medians**
of the per-step times, gradguard / lightning (target ≤ 1.05); the median of the per-round ratios is
printed beside it. Garbage collection is off while timing; threads are pinned (``--threads``).

Run ``python benchmarks/lightning_overhead.py`` (about 2 minutes), ``--quick`` (under 30 s),
``--json out.json`` to keep the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradguard.integrations.lightning import GradGuard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip import cpu_pressure


class MLP(L.LightningModule):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
        self.fused = fused

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=1e-4, fused=self.fused, foreach=None if self.fused else True
        )


class StepTimer(L.Callback):
    """Wall time of each training batch (forward → step, hooks included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)


def data(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    # the same batch every step: the data pipeline is not what is measured
    return DataLoader(TensorDataset(x.repeat(steps, 1), y.repeat(steps)), batch_size=128, shuffle=False)


def fit(variant: str, steps: int, fused: bool, root: str) -> list[float]:
    timer = StepTimer()
    callbacks: list[L.Callback] = [timer]
    kwargs: dict[str, Any] = {}
    if variant == "lightning":
        kwargs["gradient_clip_val"] = 1.0
    else:
        callbacks.append(GradGuard(clip="norm:1.0", log_dir=tempfile.mkdtemp(dir=root), report=False))
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )
    gc.collect()
    gc.disable()
    try:
        trainer.fit(MLP(fused), data(steps))
    finally:
        gc.enable()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 rounds of 50 steps (under 30 s)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=10, help="first steps of each fit not timed")
    parser.add_argument("--optim", choices=["adamw", "fused"], default="adamw")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 6, 50
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    fused = args.optim == "fused"

    times: dict[str, list[float]] = {"lightning": [], "gradguard": []}
    round_ratios: list[float] = []
    started = time.perf_counter()
    pressure = [cpu_pressure()]
    with tempfile.TemporaryDirectory() as root:
        fit("lightning", args.warmup + 5, fused, root)  # first-use costs (imports, allocator) out of the way
        fit("gradguard", args.warmup + 5, fused, root)
        for r in range(args.rounds):
            order = ["lightning", "gradguard"] if r % 2 == 0 else ["gradguard", "lightning"]
            medians = {}
            for variant in order:
                t = fit(variant, args.steps, fused, root)[args.warmup :]
                times[variant].extend(t)
                medians[variant] = statistics.median(t)
            round_ratios.append(medians["gradguard"] / medians["lightning"])
            pressure.append(cpu_pressure())
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["gradguard"] / med["lightning"]
    result = {
        "optimizer": "AdamW(fused=True)" if fused else "AdamW(foreach=True)",
        "rounds": args.rounds,
        "steps_per_fit": args.steps,
        "timed_steps": {k: len(v) for k, v in times.items()},
        "median_step_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "ratio_of_medians": round(ratio, 4),
        "median_round_ratio": round(statistics.median(round_ratios), 4),
        "target": 1.05,
        "threads": args.threads,
        # Linux PSI "some avg10" (% of time a task waited for a core) before and after each round:
        # well above 5 means another process shared the cores and the figures are noisy
        "cpu_pressure": pressure,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"Lightning GradGuard(clip='norm:1.0') vs gradient_clip_val=1.0, {result['optimizer']}, "
        f"{args.rounds} rounds × {args.steps} steps, {args.threads} threads:\n"
        f"  median step: lightning {result['median_step_ms']['lightning']} ms, "
        f"gradguard {result['median_step_ms']['gradguard']} ms\n"
        f"  ratio of medians {ratio:.3f} (target ≤ 1.05); median of per-round ratios "
        f"{result['median_round_ratio']:.3f}; {result['seconds']} s"
        + (
            f"\n  CPU pressure (PSI some avg10) up to {max(p for p in pressure if p is not None):.0f}%: noisy"
            if any(p is not None and p > 5 for p in pressure)
            else ""
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    sys.exit(0)


if __name__ == "__main__":
    main()
