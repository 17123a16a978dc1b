"""Does ``on_explosion="recover"`` rescue the unclipped runs that explode? (issue 15, part B)

The runs are those of ``benchmarks/pascanu.py`` — the issue's benchmark family: the adding and
temporal-order problems with a tanh RNN at two lengths each and the textbook char-LSTM recipe,
plain SGD over a grid of learning rates, the same data, initial weights (per seed) and step budget
for every configuration — trained with **no clipping** (``clip=None``). Each group's budget is one
in which a clipped run reaches the target (``auto`` does in 12-20 of 20 runs per group), so a run
that misses it unclipped could have been saved.

Variants (a real :class:`gradguard.Guard`, ``locate=False``, ``weight_every=None``):

* ``none``: ``on_explosion="warn"``: the guard only watches; the run ends at its first non-finite
  step, as in ``pascanu.py``. A run **explodes** when it goes non-finite or the guard reports an
  explosion (the onset ``gradguard diagnose`` uses); the runs that explode and miss the target are
  the denominator: what a recovery has to rescue;
* ``recover``: ``on_explosion="recover"`` + ``on_nonfinite="rollback"`` (what ``pascanu.py`` runs as
  "none + recovery"): a run fails when it misses the target or the guard gives up;
* ``recover+lr``: also ``lr_backoff=0.5``.

A run that does not explode must come out **untouched**: with recovery on it gets no explosion
event and the same outcome, steps and metric as ``none`` (the ``healthy`` line of the output).

Usage::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/recovery.py           # the README's table
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recovery.py --groups adding-10 --seeds 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recovery.py --quick              # seconds: a smoke check
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import gradguard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pascanu import Group, _pool, groups

VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"on_explosion": "warn"},
    "recover": {"on_explosion": "recover", "on_nonfinite": "rollback"},
    "recover+lr": {"on_explosion": "recover", "on_nonfinite": "rollback", "lr_backoff": 0.5},
}


@dataclass
class Outcome:
    group: str
    lr: float
    seed: int
    variant: str
    exploded: bool  # went non-finite, or the guard saw an explosion
    success: bool
    reason: str  # "target", "nonfinite", "budget", "aborted"
    steps: int
    metric: float
    recoveries: int


def train(group: Group, lr: float, seed: int, variant: str, warmup: int = 0) -> Outcome:
    """One unclipped run (``pascanu.py``'s loop) under ``variant``'s guard settings; ``warmup``: the
    learning rate rises linearly from 1 % of ``lr`` to ``lr`` over that many steps."""
    model, loss_at, evaluate = group.make(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    guard = gradguard.Guard(model, opt, clip=None, locate=False, weight_every=None, **VARIANTS[variant])
    recovers = variant != "none"
    reason, metric, steps, nonfinite = "budget", math.nan, group.steps, False
    try:
        for step in range(group.steps):
            if warmup:
                for g in opt.param_groups:
                    g["lr"] = lr * min(1.0, 0.01 + step / warmup)
            opt.zero_grad(set_to_none=True)
            loss = loss_at(step)
            loss.backward()
            guard.step(loss)
            norm = guard.last_grad_norm
            finite = math.isfinite(float(loss.detach())) and norm is not None and math.isfinite(float(norm))
            nonfinite |= not finite
            if not finite and not recovers:
                reason, steps = "nonfinite", step + 1
                break
            if (step + 1) % group.eval_every == 0:
                ok, metric = evaluate(model)
                if ok:
                    reason, steps = "target", step + 1
                    break
    except gradguard.NonFiniteError:  # the bound: max_rollbacks
        reason = "aborted"
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seen = guard._explosions.watch.reported > -(2**62)  # an explosion was reported
            recoveries = guard._explosions.recoveries
            guard.close()
    exploded = nonfinite or seen
    return Outcome(
        group.name, lr, seed, variant, exploded, reason == "target", reason, steps, metric, recoveries
    )


_GROUPS: list[Group] = []  # set before the workers fork (a group's closures do not pickle)


def _run(cell: tuple[int, float, int, str, float]) -> Outcome:
    """One run, in this process or a forked worker (which inherits :data:`_GROUPS`)."""
    gi, lr, seed, variant, warmup = cell
    torch.set_num_threads(1)
    return train(_GROUPS[gi], lr, seed, variant, int(warmup * _GROUPS[gi].steps))


def main(argv: list[str] | None = None) -> int:
    global _GROUPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--groups", default=None, help="comma-separated pascanu.py groups (default: all five)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--warmup", type=float, default=0.0, help="a linear LR warm-up over this fraction of each budget"
    )
    ap.add_argument("--jobs", type=int, default=2, help="worker processes of one thread each")
    ap.add_argument("--quick", action="store_true", help="pascanu.py's quick group, 2 seeds: a smoke check")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _GROUPS = groups(args.quick)
    if args.groups:
        keep = set(args.groups.split(","))
        _GROUPS = [g for g in _GROUPS if g.name in keep]
    seeds = 2 if args.quick else args.seeds
    variants = args.variants.split(",")
    todo = [
        (gi, lr, seed, v, args.warmup)
        for gi, g in enumerate(_GROUPS)
        for v in variants
        for lr in g.lrs
        for seed in range(seeds)
    ]
    t0 = time.perf_counter()
    with _pool(1 if args.quick else args.jobs) as pool:
        out = list(pool.imap(_run, todo) if pool else map(_run, todo))
    print(table(out, variants))
    print(f"\n{len(out)} runs, {time.perf_counter() - t0:.0f} s wall, torch {torch.__version__}")
    return 0


def table(out: list[Outcome], variants: list[str]) -> str:
    """Per group: the unclipped runs that explode and miss the target, how many each variant
    rescues; the runs that do not explode, and whether recovery left them untouched."""
    rescue = [v for v in variants if v != "none"]
    lines = ["| group | lr | exploding (none) | " + " | ".join(f"{v}: rescued" for v in rescue) + " |"]
    lines.append("|---|---|---|" + "---|" * len(rescue))
    totals = {v: 0 for v in rescue}
    boom_total, healthy, touched = 0, 0, []
    for name in dict.fromkeys(o.group for o in out):
        for lr in sorted({o.lr for o in out if o.group == name}):
            cell = [o for o in out if (o.group, o.lr) == (name, lr)]
            base = {o.seed: o for o in cell if o.variant == "none"}
            boom = {s for s, o in base.items() if o.exploded and not o.success}
            boom_total += len(boom)
            wins = []
            for v in rescue:
                won = sum(o.success for o in cell if o.variant == v and o.seed in boom)
                totals[v] += won
                wins.append(f"{won}/{len(boom)}")
                for o in cell:
                    b = base.get(o.seed)
                    if o.variant == v and b is not None and not b.exploded:
                        healthy += 1
                        same = (o.success, o.steps, o.recoveries) == (b.success, b.steps, 0)
                        if not same or not (
                            o.metric == b.metric or (math.isnan(o.metric) and math.isnan(b.metric))
                        ):
                            touched.append(f"{name} lr {lr:g} seed {o.seed} {v}: {o}")
            lines.append(f"| {name} | {lr:g} | {len(boom)}/{len(base)} | " + " | ".join(wins) + " |")
    lines.append(
        f"| **all** | | **{boom_total}** | "
        + " | ".join(f"**{totals[v]}/{boom_total}**" for v in rescue)
        + " |"
    )
    quiet = [o for o in out if o.variant == "none" and not o.exploded]
    lines.append(
        f"\nunclipped runs that do not explode: {len(quiet)} ({sum(not o.success for o in quiet)} miss the "
        f"target: too slow, or wandering without a climb; not counted above)"
    )
    lines.append(f"their runs with recovery on: {healthy}, changed: {len(touched)}")
    lines += touched
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
