"""Does following gradguard's advice make training succeed? Old (estimated) vs new (verified) advice.

A cell is a task × learning rate × seed × starting point. The starting point is a run a user
would ask about: **over-clipped** (a fixed threshold far below the norms), **exploding** (no
clipping) or **textbook** (a common fixed threshold: ``norm:1`` for the adding problem, the
recipe's ``norm:5`` for the LM — runs that often succeed, where the old advice could turn a success
into a failure). Each cell:

1. trains the starting run under a :class:`gradguard.Guard` (``on_nonfinite="raise"``: the first
   non-finite step ends it) and diagnoses its run directory;
2. **old advice** — what ``gradguard diagnose`` recommended before issue 15 (commit 44b9dcd):
   ``over_clipping``'s ``max(healthy max_norm, median of the first norms)`` when over-clipping
   fired, else the first ``max_norm`` of the findings (``explosion``'s healthy ``max_norm``),
   re-derived here from the same healthy window; then trains from scratch with it;
3. **new advice** — what diagnose says now, followed the way it says: its estimate **verified**
   the way the demo verifies (``gradguard.tune.tune`` from the fresh start, 12 candidates halving
   down from the estimate, 60 steps each) and the verified threshold followed from scratch; an
   ``info`` that only points to ``gradguard tune`` (a run that trained) is followed the same way
   from 4× its healthy median norm; a cell whose tune found nothing that trains gets no advice.

Success = the task's target reached at the end with no non-finite step. A recommendation cell is
one where the advice names a threshold; "turned a success into a failure" counts cells whose
starting run succeeded and whose followed advice failed.

Tasks: the adding problem (Hochreiter & Schmidhuber 1997; Pascanu et al. 2013) with a tanh RNN
at length 10, SGD at two learning rates, 1,500 steps; the rnn demo's character LSTM LM (SGD lr=1, Zaremba et
al.), 300 steps. 3 seeds. Run: ``OMP_NUM_THREADS=1 python benchmarks/advice.py`` (a few minutes).

**Learning-rate advice** (``--lr-row``): the adding problem at learning rates too high for it
and at 0.1, where it trains (``LR_ROW``: is a success ever broken?), started unclipped and at ``norm:1``. Where ``gradguard diagnose`` finds ``lr_too_high``,
the **estimate** is its recommended ``lr`` (unverified), and the **verified** rate is what
:func:`gradguard.tune.tune` verifies from the fresh start among halvings down from the run's rate
(what ``gradguard tune --lr auto`` tries), at the run's own clipping; each is followed from scratch
with that clipping. A cell without ``lr_too_high`` gets no learning-rate advice.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import Guard
from gradguard.diagnose import diagnose, healthy_window
from gradguard.diagnose.numbers import median, sig_floor
from gradguard.errors import NonFiniteError
from gradguard.runlog import read_run
from gradguard.tune import tune
from gradguard.tunelog import ladder

TUNE_STEPS = 60
GAIN = 1.0


# ------------------------------------------------------------------------------------------ tasks
@dataclass
class Task:
    name: str
    model: nn.Module
    batches: Callable[[], Iterator[Any]]
    loss_fn: Callable[[Any], Tensor]
    reset: Callable[[], None]
    target: float  # success: mean loss of the last 20 steps below this


class AddingRNN(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(hidden, 1)
        # an orthogonal recurrence: SGD at a high learning rate still explodes within a few steps
        nn.init.orthogonal_(self.rnn.get_parameter("weight_hh_l0"), gain=GAIN)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.out(h[:, -1]).squeeze(-1)


def adding(seed: int, length: int = 10, batch: int = 64) -> Task:
    torch.manual_seed(seed)
    model = AddingRNN()

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(1000 + seed)
        while True:
            values = torch.rand(batch, length, generator=g)
            marks = torch.zeros(batch, length)
            first = torch.randint(0, length // 2, (batch,), generator=g)
            second = torch.randint(length // 2, length, (batch,), generator=g)
            marks[torch.arange(batch), first] = 1.0
            marks[torch.arange(batch), second] = 1.0
            yield torch.stack([values, marks], -1), (values * marks).sum(1)

    def loss_fn(b: tuple[Tensor, Tensor]) -> Tensor:
        return nn.functional.mse_loss(model(b[0]), b[1])

    # predicting the mean (1.0) gives 1/6 ≈ 0.167; the target is half of it
    return Task("adding10", model, batches, loss_fn, lambda: None, target=0.08)


def char_lm(seed: int) -> Task:
    from gradguard.demos import rnn

    sc = rnn.build(seed)
    # 3.7 bits/char on training segments of 35 chars: ~1 bit below the unigram entropy (4.79)
    return Task("char_lstm", sc.model, sc.batches, lambda b: sc.loss_fn(sc.model, b), sc.reset, target=90.0)


TASKS: dict[str, tuple[Callable[[int], Task], list[float], int, dict[str, str]]] = {
    # name: (build, learning rates, steps, starting points)
    "adding10": (
        adding,
        [0.1, 1.0],
        1500,
        {"over-clipped": "norm:0.001", "exploding": "none", "textbook": "norm:1"},
    ),
    "char_lstm": (
        char_lm,
        [1.0],
        300,
        {"over-clipped": "norm:0.05", "exploding": "none", "textbook": "norm:5"},
    ),
}


# ------------------------------------------------------------------------------------------ runs
@dataclass
class Outcome:
    success: bool
    nonfinite: bool
    final_loss: float


def train(task: Task, lr: float, clip: str, steps: int, log_dir: Path | None) -> Outcome:
    """Train ``task`` from its fresh state under a Guard; stop at the first non-finite step."""
    opt = torch.optim.SGD(task.model.parameters(), lr=lr)
    guard = Guard(task.model, opt, clip=clip, on_nonfinite="raise", log_dir=log_dir, locate=False)
    losses: list[float] = []
    task.reset()
    nonfinite = False
    try:
        for _, batch in zip(range(steps), task.batches()):
            opt.zero_grad(set_to_none=True)
            loss = task.loss_fn(batch)
            loss.backward()
            guard.step(loss)
            losses.append(float(loss.detach()))
    except NonFiniteError:
        nonfinite = True
    finally:
        guard.close()
    final = statistics.fmean(losses[-20:]) if losses else math.nan
    return Outcome(not nonfinite and len(losses) == steps and final < task.target, nonfinite, final)


def old_advice(run_dir: Path) -> float | None:
    """What diagnose recommended before issue 15 (commit 44b9dcd), from the same healthy window."""
    log = read_run(run_dir)
    h = healthy_window(log)
    clipped = [r for r in log.metrics if isinstance(r.get("clip_coef"), float) and r["clip_coef"] < 1.0]
    over = len(clipped) > len(log.metrics) / 2 and not log.first_nonfinite()
    if over:
        rows = [r["grad_norm"] for r in log.metrics if math.isfinite(r.get("grad_norm", math.nan))]
        early = rows[: min(10, max(3, len(rows) // 20))]
        values = [x for x in (h.max_norm, sig_floor(median(early))) if x is not None and x > 0]
        return max(values) if values else None
    # the other old threshold advice: explosion's (and divergence's) healthy max_norm
    return h.max_norm if any(f.id in ("explosion", "divergence") for f in diagnose(run_dir)) else None


def new_advice(
    task_of: Callable[[], Task], run_dir: Path, lr: float, current: float | None
) -> tuple[float | None, str]:
    """diagnose's advice now, verified by tune from the fresh start (``None``: no change advised).

    A threshold diagnose estimates is verified on a ladder of halvings from it; an ``info`` that
    points to ``gradguard tune`` (a run that trained, or an Adam-like one: "keep the threshold; a
    looser one may train faster, verify it first") is followed the same way from 4× its healthy
    median norm (what ``gradguard tune --run`` tries), and only when tune verifies a looser
    threshold than ``current``: otherwise the advice is to keep it (``"keep"``).
    """
    findings = diagnose(run_dir)
    estimate = next(
        (
            f.recommendation["max_norm"]
            for f in findings
            if isinstance(f.recommendation.get("max_norm"), float | int)
        ),
        None,
    )
    how = "verified from {:g}"
    if estimate is None and any("tune" in f.recommendation for f in findings):
        estimate, how = 4 * healthy_window(run_dir).p50, "tune pointer, ladder from {:.2g}"
    if estimate is None:
        return None, "no threshold advised"
    task = task_of()
    opt = torch.optim.SGD(task.model.parameters(), lr=lr)
    result = tune(
        task.model,
        opt,
        task.loss_fn,
        task.batches(),
        max_norms=ladder(estimate),
        steps=TUNE_STEPS,
        reset=task.reset,
    )
    if result.recommended is None:
        return None, "tune: none trained"
    if how.startswith("tune pointer") and current is not None and not (result.max_norm or math.inf) > current:
        return current, "keep"
    return result.max_norm, how.format(estimate)


def cell(name: str, lr: float, seed: int, start: str, clip: str, root: Path) -> dict[str, Any]:
    build, _, steps, _ = TASKS[name]
    run_dir = root / f"{name}-lr{lr:g}-s{seed}-{start}"
    first = train(build(seed), lr, clip, steps, run_dir)
    row: dict[str, Any] = {"task": name, "lr": lr, "seed": seed, "start": start, **outcome("start", first)}
    old = old_advice(run_dir)
    row["old_advice"] = old
    row.update(
        outcome("old", train(build(seed), lr, f"norm:{old}", steps, None) if old is not None else None)
    )
    current = float(clip.split(":")[1]) if clip.startswith("norm:") else None
    new, how = new_advice(lambda: build(seed), run_dir, lr, current)
    row["new_advice"], row["new_how"] = new, how
    if how == "keep":  # the run trained: keep its threshold (its outcome is the start's)
        row.update(outcome("new", first))
    else:
        row.update(
            outcome("new", train(build(seed), lr, f"norm:{new}", steps, None) if new is not None else None)
        )
    return row


def outcome(key: str, o: Outcome | None) -> dict[str, Any]:
    if o is None:
        return {f"{key}_success": None}
    return {
        f"{key}_success": o.success,
        f"{key}_nonfinite": o.nonfinite,
        f"{key}_loss": float(f"{o.final_loss:.4g}"),
    }


def rate(rows: list[dict[str, Any]], key: str) -> str:
    cells = [r[key] for r in rows if r[key] is not None]
    return f"{sum(cells)}/{len(cells)}"


def broke(rows: list[dict[str, Any]], key: str) -> int:
    return sum(1 for r in rows if r["start_success"] and r[key] is False)


LR_ROW: dict[str, Any] = {
    "task": "adding10",
    "lrs": [0.1, 1.0, 3.0],
    "starts": {"exploding": "none", "textbook": "norm:1"},
}
"""The learning-rate row: the adding problem at 0.1 and at rates too high for it, unclipped and at ``norm:1``."""
LR_RUNGS = 8


def lr_cell(lr: float, seed: int, start: str, clip: str, root: Path) -> dict[str, Any]:
    """One learning-rate advice cell: the start, diagnose's ``lr_too_high`` estimate and tune's verified rate."""
    name = LR_ROW["task"]
    build, _, steps, _ = TASKS[name]
    run_dir = root / f"lr-{name}-lr{lr:g}-s{seed}-{start}"
    first = train(build(seed), lr, clip, steps, run_dir)
    row: dict[str, Any] = {
        "task": f"{name} lr",
        "lr": lr,
        "seed": seed,
        "start": start,
        **outcome("start", first),
    }
    high = next((f for f in diagnose(run_dir) if f.id == "lr_too_high"), None)
    estimate = high.recommendation.get("lr") if high is not None else None
    row["old_advice"] = estimate
    row.update(outcome("old", train(build(seed), estimate, clip, steps, None) if estimate else None))
    verified = verified_lr(lambda: build(seed), lr, clip) if high is not None else None
    row["new_advice"], row["new_how"] = verified, "tune --lr" if high is not None else "no lr_too_high"
    row.update(outcome("new", train(build(seed), verified, clip, steps, None) if verified else None))
    return row


def verified_lr(task_of: Callable[[], Task], lr: float, clip: str) -> float | None:
    """The rate :func:`gradguard.tune.tune` verifies among halvings down from ``lr``, at the run's clipping."""
    task = task_of()
    opt = torch.optim.SGD(task.model.parameters(), lr=lr)
    threshold = float(clip.split(":")[1]) if clip.startswith("norm:") else None
    result = tune(
        task.model,
        opt,
        task.loss_fn,
        task.batches(),
        max_norms=[threshold],
        lrs=ladder(lr, LR_RUNGS),
        steps=TUNE_STEPS,
        reset=task.reset,
    )
    return result.lr


def lr_rows(seeds: int, root: Path) -> list[dict[str, Any]]:
    rows = []
    for lr in LR_ROW["lrs"]:
        for seed in range(seeds):
            for start, clip in LR_ROW["starts"].items():
                rows.append(lr_cell(lr, seed, start, clip, root))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument(
        "--starts", default=None, help="only these starting points (over-clipped,exploding,textbook)"
    )
    parser.add_argument("--lr-row", action="store_true", help="also the learning-rate advice row (LR_ROW)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.tasks.split(",")):
            _, lrs, _, starts = TASKS[name]
            for lr in lrs:
                for seed in range(args.seeds):
                    for start_name, clip in starts.items():
                        if args.starts and start_name not in args.starts.split(","):
                            continue
                        row = cell(name, lr, seed, start_name, clip, Path(tmp))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        if args.lr_row:
            rows += lr_rows(args.seeds, Path(tmp))
    print(f"\n{len(rows)} cells in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for name in dict.fromkeys(r["task"] for r in rows):
        sub = [r for r in rows if r["task"] == name]
        print(
            f"{name}: start succeeds {sum(r['start_success'] for r in sub)}/{len(sub)}; "
            f"old advice followed succeeds {rate(sub, 'old_success')} (successes broken: {broke(sub, 'old_success')}); "
            f"new verified advice {rate(sub, 'new_success')} (successes broken: {broke(sub, 'new_success')})"
        )
    print(
        f"all: old {rate(rows, 'old_success')} (broken {broke(rows, 'old_success')}), "
        f"new {rate(rows, 'new_success')} (broken {broke(rows, 'new_success')})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
