"""Does an adaptive clipper leave a healthy Adam run alone? ``auto`` under Adam-like optimizers.

Under Adam the update is about lr per element whatever the gradient's norm, so ``auto`` keeps only
ZClip's spike rule and the growth cap there (:class:`gradguard.clip.Auto`). A user who switches it
on for a run that was training fine must not pay for it: this benchmark trains healthy runs at
ordinary Adam/AdamW rates, unclipped and under each clipper, from the same start and batches, and
compares the held-out metric per seed.

Tasks (small, CPU, a few seconds each):

* ``sort``: a 2-layer post-LN transformer encoder sorts 10 tokens of 16 (Adam 1e-2 and 3e-3, 600
  steps); metric: held-out sequence error (1 − exact-sort accuracy on 1,000 sequences).
* ``charlm``: the char transformer of ``transformer_lr.py`` at AdamW 3e-3 with a 10 % warm-up
  (its healthy reference), 400 steps; metric: held-out bits per character.
* ``lstm``: a 1-layer LSTM language model of the same text (Adam 3e-3, 400 steps); bits per character.
* ``mlp``: a 4-layer ReLU MLP on a 10-class Gaussian-mixture problem (Adam 1e-3, 500 steps);
  held-out error.

Columns: ``none`` and the clippers (default ``auto``, ``zclip``, ``norm:1``). The table gives each
method's metric per seed, its clip rate, and the median over seeds of its metric minus ``none``'s
(0: no cost; lower is better for every metric).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adam_healthy.py                # see the README
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adam_healthy.py --tasks sort --seeds 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradguard
from gradguard.demos.rnn import corpus


@dataclass
class Healthy:
    """One seed's fresh start: the model, its optimizer, the batches, the loss, the held-out metric
    and a learning-rate schedule (a factor of the base rate for each step; ``None``: constant)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[Any]
    loss_fn: Callable[[Any], Tensor]
    metric: Callable[[], float]
    schedule: Callable[[int], float] | None = None


# ------------------------------------------------------------------------------------------ tasks
class Sorter(nn.Module):
    def __init__(self, vocab: int = 16, n: int = 10, d: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(n, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.enc(self.tok(x) + self.pos))
        return out


def sort_task(seed: int, lr: float) -> Healthy:
    torch.manual_seed(seed)
    model = Sorter()
    gen = torch.Generator().manual_seed(1000 + seed)
    test = torch.randint(0, 16, (1000, 10), generator=torch.Generator().manual_seed(99))

    def batches() -> Iterator[Tensor]:
        while True:
            yield torch.randint(0, 16, (64, 10), generator=gen)

    def loss_fn(x: Tensor) -> Tensor:
        return F.cross_entropy(model(x).reshape(-1, 16), x.sort(1).values.reshape(-1))

    def seq_error() -> float:
        with torch.no_grad():
            return 1.0 - float((model(test).argmax(-1) == test.sort(1).values).all(1).float().mean())

    return Healthy(model, torch.optim.Adam(model.parameters(), lr=lr), batches(), loss_fn, seq_error)


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, width: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.lstm(self.embed(x))[0])
        return out


def _char_lm(seed: int, make_model: Callable[[int], nn.Module], opt: Callable[[nn.Module], Any]) -> Healthy:
    alphabet, train, val = corpus()
    vocab, context, batch = len(alphabet), 32, 16
    torch.manual_seed(seed)
    model = make_model(vocab)
    gen = torch.Generator().manual_seed(1000 + seed)
    held = val[: 8192 + 1]
    val_x, val_y = held[:-1].view(-1, context), held[1:].view(-1, context)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            starts = torch.randint(0, len(train) - context - 1, (batch,), generator=gen)
            chunk = train[starts[:, None] + torch.arange(context + 1)]
            yield chunk[:, :-1], chunk[:, 1:]

    def loss_fn(b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(b[0]).reshape(-1, vocab), b[1].reshape(-1))

    def bpc() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(val_x).reshape(-1, vocab), val_y.reshape(-1))) / math.log(2)

    return Healthy(model, opt(model), batches(), loss_fn, bpc)


def charlm_task(seed: int, lr: float, steps: int) -> Healthy:
    from transformer_lr import CharTransformer

    h = _char_lm(seed, CharTransformer, lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01))
    warm = max(1, steps // 10)
    h.schedule = lambda step: min(1.0, (step + 1) / warm)
    return h


def lstm_task(seed: int, lr: float) -> Healthy:
    return _char_lm(seed, CharLSTM, lambda m: torch.optim.Adam(m.parameters(), lr=lr))


def mlp_task(seed: int, lr: float) -> Healthy:
    data = torch.Generator().manual_seed(7)
    centers = torch.randn(10, 32, generator=data) * 0.4

    def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, 10, (n,), generator=gen)
        return centers[y] + torch.randn(n, 32, generator=gen), y

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1000 + seed)
    test = sample(2000, torch.Generator().manual_seed(99))

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield sample(64, gen)

    def error() -> float:
        with torch.no_grad():
            return 1.0 - float((model(test[0]).argmax(1) == test[1]).float().mean())

    loss_fn: Callable[[tuple[Tensor, Tensor]], Tensor] = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    return Healthy(model, torch.optim.Adam(model.parameters(), lr=lr), batches(), loss_fn, error)


#: name → (steps, [(optimizer label, lr)], metric name, builder(seed, lr, steps))
TASKS: dict[str, tuple[int, list[tuple[str, float]], str, Callable[[int, float, int], Healthy]]] = {
    "sort": (600, [("Adam", 1e-2), ("Adam", 3e-3)], "seq error", lambda s, lr, n: sort_task(s, lr)),
    "charlm": (400, [("AdamW+warm-up", 3e-3)], "bits/char", charlm_task),
    "lstm": (400, [("Adam", 3e-3)], "bits/char", lambda s, lr, n: lstm_task(s, lr)),
    "mlp": (500, [("Adam", 1e-3)], "error", lambda s, lr, n: mlp_task(s, lr)),
}


# ------------------------------------------------------------------------------------------ runs
def train(h: Healthy, steps: int, method: str) -> tuple[float, float]:
    """``(held-out metric, clip rate)`` of one run (NaN metric: a non-finite step)."""
    clip = None if method == "none" else method
    clipped: list[float] = []
    base = [g["lr"] for g in h.optimizer.param_groups]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = gradguard.Guard(
            h.model, h.optimizer, clip=clip, locate=False, weight_every=None, on_spike="ignore"
        )
        guard.add_flush_callback(lambda rs: clipped.extend(_fractions(rs)))
        try:
            for step in range(steps):
                if h.schedule is not None:
                    for g, lr in zip(h.optimizer.param_groups, base):
                        g["lr"] = lr * h.schedule(step)
                h.optimizer.zero_grad(set_to_none=True)
                loss = h.loss_fn(next(h.batches))
                loss.backward()
                guard.step(loss)
                if not math.isfinite(float(loss.detach())):
                    return math.nan, statistics.fmean(clipped or [0.0])
        finally:
            guard.close()
    return h.metric(), statistics.fmean(clipped or [0.0])


def _fractions(records: list[dict[str, Any]]) -> list[float]:
    """Each step's ``clip_fraction`` (1.0 clipped, 0.0 not); none without a clipper (NaN there)."""
    return [
        float(f)
        for r in records
        if isinstance(f := r.get("clip_fraction"), (int, float)) and math.isfinite(f)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--methods", default="auto,zclip,norm:1")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = ["none", *args.methods.split(",")]
    t0 = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    lines = [
        "| task | optimizer, lr | method | metric per seed | clipped | median change vs none |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.tasks.split(","):
        steps, settings, metric, make = TASKS[name]
        for label, lr in settings:
            got: dict[str, list[tuple[float, float]]] = {}
            for method in methods:
                got[method] = [train(make(seed, lr, steps), steps, method) for seed in range(args.seeds)]
                log(f"{name} {label} {lr:g} {method}: " + ", ".join(f"{m:.3g}" for m, _ in got[method]))
            for method in methods:
                values = [m for m, _ in got[method]]
                diff = statistics.median(v - n for v, n in zip(values, (m for m, _ in got["none"])))
                rate = statistics.fmean(c for _, c in got[method])
                lines.append(
                    f"| {name} ({metric}) | {label} {lr:g} | {method} | {', '.join(f'{v:.3g}' for v in values)} "
                    f"| {rate:.0%} | {diff:+.3g} |"
                )
    print("\n".join(lines))
    wall = time.perf_counter() - t0
    print(
        f"\n{args.seeds} seeds, {steps} steps max, {wall:.0f} s wall, torch {torch.__version__}, one thread"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
