"""A small transformer at a too-high learning rate without warm-up: which clipping trains it? (issue 15)

A character-level language model of the text the rnn demo reads (:func:`gradguard.demos.rnn.corpus`:
Python's help topics, 90 % train / 10 % held out): a GPT-style decoder with learned positions,
``LAYERS`` post-LN blocks (``nn.TransformerEncoderLayer`` with a causal mask, the original
Transformer's layout, which needs a warm-up: Xiong et al. 2020), width ``WIDTH``, ``HEADS`` heads,
context ``CONTEXT``, batches of ``BATCH`` random windows. Trained **without warm-up** at learning
rates above the stable range: AdamW (weight decay 0.01) and SGD with momentum 0.9.

Columns (``benchmarks/_longrun.py``): ``none``, ``norm:1`` (Hugging Face's ``max_grad_norm``
default), ``norm:5``, ``auto``, ``zclip``, ``autoclip:10``, ``recover`` (unclipped,
``on_explosion="recover"``), ``tune`` (the threshold :func:`gradguard.tune.tune` verifies, 60 steps
per candidate) and ``tune lr`` (the learning rate it verifies among ``LR_LADDER`` halvings below the
run's rate, unclipped). Success: ``STEPS`` steps with no non-finite step and held-out bits per
character at or below ``TARGET``. ``reference``: the same model at a sane rate with a warm-up
(AdamW 3e-3, SGD 0.3; 10 % linear warm-up), unclipped — it shows the target is reachable in the budget.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transformer_lr.py            # see the README
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transformer_lr.py --steps 100 --seeds 1 --methods none,auto
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _longrun import Setup, Task, run, table
from gradguard.demos.rnn import corpus
from gradguard.tunelog import ladder

LAYERS, WIDTH, HEADS, CONTEXT, BATCH = 2, 48, 4, 32, 16
STEPS = 400
TARGET = 3.8
"""Held-out bits per character: one bit below the text's unigram entropy (4.79), as ``advice.py``'s LM target.
The warm-up reference reaches 3.54–3.69 in the budget; a run stuck near the unigram entropy (4.4–4.9) misses it."""
LRS = {"adamw": 3e-2, "sgd": 1.0}
"""The too-high learning rates (no warm-up)."""
LR_LADDER = 8
EVAL_CHARS = 8192


class CharTransformer(nn.Module):
    """Embedding + learned positions → post-LN causal transformer blocks → a linear decoder."""

    mask: Tensor

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, WIDTH)
        self.pos = nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        block = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(block, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, vocab)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        out: Tensor = self.head(h)
        return out


def make(seed: int, optimizer: str, lr: float) -> Setup:
    """A fresh model (by seed), its optimizer at ``lr`` (no warm-up), the seed's batch stream."""
    alphabet, train, val = corpus()
    vocab = len(alphabet)
    torch.manual_seed(seed)
    model = CharTransformer(vocab)
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + seed)
    held = val[: EVAL_CHARS + 1]
    val_x = held[:-1].view(-1, CONTEXT)
    val_y = held[1:].view(-1, CONTEXT)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            starts = torch.randint(0, len(train) - CONTEXT - 1, (BATCH,), generator=gen)
            idx = starts[:, None] + torch.arange(CONTEXT + 1)
            chunk = train[idx]
            yield chunk[:, :-1], chunk[:, 1:]

    def loss_fn(b: tuple[Tensor, Tensor]) -> Tensor:
        x, y = b
        return F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))

    def bpc(_: list[float]) -> float:
        with torch.no_grad():
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                return math.nan
            return float(F.cross_entropy(model(val_x).reshape(-1, vocab), val_y.reshape(-1))) / math.log(2)

    return Setup(model, opt, batches(), loss_fn, bpc)


def task(steps: int = STEPS) -> Task:
    lrs = {name: ladder(lr, LR_LADDER) for name, lr in LRS.items()}
    return Task("char transformer", steps, TARGET, "held-out bits/char", make, ["norm:1", "norm:5"], lrs)


def reference(t: Task, optimizer: str, seed: int) -> float:
    """Held-out bits/char at a sane rate with a 10 % linear warm-up, unclipped (no guard)."""
    lr = {"adamw": 3e-3, "sgd": 0.3}[optimizer]
    s = t.make(seed, optimizer, lr)
    warm = max(1, t.steps // 10)
    losses: list[float] = []
    for step in range(t.steps):
        for g in s.optimizer.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm)
        s.optimizer.zero_grad(set_to_none=True)
        loss = s.loss_fn(next(s.batches))
        loss.backward()
        s.optimizer.step()
        losses.append(float(loss.detach()))
    return s.final(losses)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--optimizers", default="adamw,sgd")
    ap.add_argument("--lr", type=float, default=None, help="override the too-high rate (probes)")
    ap.add_argument("--methods", default=None, help="comma-separated columns (default: all)")
    ap.add_argument("--reference", action="store_true", help="also train the warm-up reference")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t = task(args.steps)
    t0 = time.perf_counter()
    runs: list[Any] = []
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    for opt in args.optimizers.split(","):
        lr = args.lr if args.lr is not None else LRS[opt]
        if args.reference:
            refs = [reference(t, opt, seed) for seed in range(args.seeds)]
            log(f"reference {opt}: " + ", ".join(f"{r:.3g}" for r in refs))
        for method in args.methods.split(",") if args.methods else t.methods(opt):
            for seed in range(args.seeds):
                runs.append(run(t, opt, lr, method, seed))
                r = runs[-1]
                log(f"{opt} {method} seed {seed}: {r.reason} {r.final:.4g} {r.chosen} ({r.seconds:.0f} s)")
    print(table(runs, t))
    wall, cpu = time.perf_counter() - t0, time.process_time()
    print(f"\n{len(runs)} runs, {wall:.0f} s wall, {cpu:.0f} s CPU, torch {torch.__version__}, one thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
