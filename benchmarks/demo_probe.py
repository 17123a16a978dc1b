"""Probe the embedded demo scenarios: which clipping configurations really survive, on several seeds.

For each scenario (``rnn``: char-level LSTM LM, SGD lr = 1; ``deepsad``: Deep SAD on digits, SGD
with momentum) and each configuration it trains from the same start on seeds 0, 1, 2 and prints
one row per run: optimizer steps taken, first non-finite step, final training loss, the task
metric (held-out bits per character; test ROC-AUC), clip rate and wall time.

Configurations: ``none``, ``norm:5``, ``autoclip:10``, ``zclip``, ``auto`` (the library's
:class:`gradguard.clip.Auto`), Adam with and without ``norm:5`` (rnn), the threshold recommended
from the healthy start of the unclipped run (deepsad: median of its first finite norms, see
:func:`gradguard.demos._common.healthy_median`) and the story's ``norm:100`` (deepsad), plus
candidate rules for a better ``auto`` (defined here, not in the library):

* ``cand:median``: clip from step 1 at the median of the finite norms seen so far, frozen after
  25 steps (a warm-up that clips, anchored at 1× the healthy median instead of 10× the mean);
* ``cand:first/2``: a fixed threshold of half the first step's norm (Pascanu et al.'s
  "0.5× to 10× the average norm", lower end, with the first norm as the average);
* ``auto(warmup=5)``: the library's warm-up rule (``Auto()``, no first-norm cap) with a 5-step warm-up.

``cand:first/2`` kept both scenarios finite on every seed and became the ``first=0.5`` cap of the
library's ``auto`` (:class:`gradguard.clip.Auto`); ``auto`` in the rows below is that rule.

``--advice`` checks the demo's advice instead (issue 15): it runs the demo's own pipeline on each
seed (runs, diagnoses, ``gradguard tune``'s verification), collects every threshold and learning
rate the re-diagnosed runs recommend as verified, and follows each for the scenario's full run on
every seed: every one must take all its steps with no non-finite step (exit code 1 otherwise).

Run ``python benchmarks/demo_probe.py`` (about 3-4 minutes on 2 CPU cores), ``--scenario rnn``,
``--seeds 0 1 2``, ``--json out.json``. Timings are wall-clock on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradguard.clip import Auto, NormClipper
from gradguard.demos import deepsad, rnn, run_scenario, verified_advice
from gradguard.demos._common import RunConfig, RunResult, Scenario, healthy_median, train

# ----------------------------------------------------------------------------- candidate rules


class RunningMedian(NormClipper):
    """τ_t = factor × median of the finite norms before step t (step 0: no clip); frozen after ``warmup``."""

    def __init__(self, factor: float = 1.0, warmup: int = 25) -> None:
        self.factor = factor
        self.warmup = warmup
        self.seen: list[float] = []

    def threshold(self, norm: Tensor) -> Tensor:
        tau = self.factor * statistics.median(self.seen) if self.seen else math.inf
        n = float(norm)  # host read: fine for a probe on a CPU
        if math.isfinite(n) and len(self.seen) < self.warmup:
            self.seen.append(n)
        return torch.tensor(tau, dtype=torch.float32)


class FirstNorm(NormClipper):
    """A fixed threshold of ``factor`` × the first finite norm (step 0 itself is not clipped)."""

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor
        self.tau = math.inf

    def threshold(self, norm: Tensor) -> Tensor:
        tau = self.tau
        n = float(norm)
        if math.isinf(self.tau) and math.isfinite(n):
            self.tau = self.factor * n
        return torch.tensor(tau, dtype=torch.float32)


# ----------------------------------------------------------------------------- configurations


def _fixed(config: RunConfig) -> Callable[[], RunConfig]:
    return lambda: config


def rnn_configs() -> list[Callable[[], RunConfig]]:
    lr = rnn.HPARAMS["lr"]
    out: list[Callable[[], RunConfig]] = [_fixed(c) for c in rnn.configs()]
    out += [
        lambda: RunConfig("cand:median", RunningMedian(1.0), "sgd", lr),
        lambda: RunConfig("cand:first/2", FirstNorm(0.5), "sgd", lr),
        lambda: RunConfig("auto(warmup=5)", Auto(warmup=5), "sgd", lr),
    ]
    return out


def deepsad_configs() -> list[Callable[[], RunConfig]]:
    hp = deepsad.HPARAMS
    kw: dict[str, Any] = {
        "optimizer": "sgd",
        "lr": hp["lr"],
        "momentum": hp["momentum"],
        "weight_decay": hp["weight_decay"],
    }
    out: list[Callable[[], RunConfig]] = [_fixed(c) for c in deepsad.configs()]
    out += [
        lambda: RunConfig("norm:100 (story)", "norm:100", **kw),
        lambda: RunConfig("cand:median", RunningMedian(1.0), **kw),
        lambda: RunConfig("cand:first/2", FirstNorm(0.5), **kw),
        lambda: RunConfig("auto(warmup=5)", Auto(warmup=5), **kw),
    ]
    return out


# ----------------------------------------------------------------------------- running


def run_one(build: Callable[[int], Scenario], config: RunConfig, seed: int) -> tuple[RunResult, float]:
    t0 = time.perf_counter()
    scenario = build(seed)
    result = train(scenario, config)
    return result, time.perf_counter() - t0


def fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


HEADER = (
    f"{'scenario':8} {'config':26} {'seed':>4} {'steps':>5} {'first NF':>8} {'final loss':>11} "
    f"{'metric':>14} {'clip %':>6} {'wall s':>6} {'total s':>7}"
)


def print_row(r: RunResult, total_s: float, metric: str) -> None:
    m = r.metrics.get(metric, math.nan)
    print(
        f"{r.scenario:8} {r.config.name:26} {r.seed:>4} {r.steps:>5} {fmt(r.first_nonfinite, 'd'):>8} "
        f"{fmt(r.final_loss):>11} {metric + '=' + fmt(m, '.3f'):>14} {100 * r.clip_rate:>6.1f} "
        f"{r.wall_s:>6.2f} {total_s:>7.2f}",
        flush=True,
    )


def probe(name: str, seeds: list[int], rows: list[dict[str, Any]]) -> None:
    if name == "rnn":
        build: Callable[[int], Scenario] = rnn.build
        makers = rnn_configs()
    else:
        build = deepsad.build
        makers = deepsad_configs()
    first = build(seeds[0])
    metric = first.metric
    print(f"\n== {name}: {json.dumps(first.info, default=str)}")
    print(f"   baseline: {first.baseline}; loss unit: {first.loss_unit}")
    print(HEADER)
    recommended: dict[int, float] = {}
    for make in makers:
        for seed in seeds:
            config = make()  # fresh stateful clipper per run
            if config.name.endswith("(recommended)"):
                continue
            result, total = run_one(build, config, seed)
            print_row(result, total, metric)
            rows.append({**result.row(), "total_s": total})
            if config.name == "none":
                recommended[seed] = healthy_median(result.norms())
    print(
        "   healthy_median of the unclipped run's first finite norms: "
        + ", ".join(f"seed {s}: {v:.3g}" for s, v in recommended.items())
    )
    if name == "deepsad":
        hp = deepsad.HPARAMS
        for seed in seeds:
            tau = recommended[seed]
            config = RunConfig(
                f"norm:{tau:.3g} (recommended)",
                f"norm:{tau}",
                "sgd",
                hp["lr"],
                hp["momentum"],
                hp["weight_decay"],
            )
            result, total = run_one(build, config, seed)
            print_row(result, total, metric)
            rows.append({**result.row(), "total_s": total, "threshold": tau})


# ----------------------------------------------------------------------------- the demo's advice, followed


def demo_advice(name: str, seeds: list[int], folder: Path) -> list[tuple[int, str, RunConfig]]:
    """Every piece of verified advice ``gradguard demo`` gives on ``name`` for each seed:
    ``(seed, the run it came from, the configuration that follows it)``.

    Runs the demo's own pipeline (:func:`gradguard.demos.run_scenario`: the runs, their diagnoses,
    tune's verification) and reads what each re-diagnosed run recommends as verified: a threshold
    (followed at the run's learning rate) and a learning rate (followed with the run's clipping).
    """
    out: list[tuple[int, str, RunConfig]] = []
    for seed in seeds:
        rows = run_scenario(name, folder / f"{name}-{seed}", seed=seed, stream=io.StringIO())
        for r in rows:
            tau, lr = verified_advice(r, "max_norm"), verified_advice(r, "lr")
            if tau is not None:
                out.append((seed, r.name, replace(r.config, name=f"norm:{tau:g}", clip=f"norm:{tau}")))
            if lr is not None:
                clip = r.config.clip if isinstance(r.config.clip, str) else "none"
                out.append((seed, r.name, replace(r.config, name=f"{clip} lr={lr:g}", lr=lr)))
    return out


def follow_advice(names: list[str], seeds: list[int], rows: list[dict[str, Any]]) -> None:
    """Each piece of the demo's advice (from any seed) trained for the scenario's full run on every seed.

    Passes when every followed run takes all its steps without a non-finite one (issue 15: "every
    threshold gradguard recommends there trains to the end").
    """
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            build: Callable[[int], Scenario] = rnn.build if name == "rnn" else deepsad.build
            advice = demo_advice(name, seeds, Path(tmp))
            print(f"\n== {name}: the demo's verified advice, followed for the full run on seeds {seeds}")
            for seed, source, config in advice:
                print(f"   seed {seed}: {source} → {config.name}")
            print(HEADER)
            unique = {(c.clip, c.lr, c.optimizer): c for _, _, c in advice}
            for config in unique.values():
                for seed in seeds:
                    result, total = run_one(build, config, seed)
                    print_row(result, total, build(seed).metric)
                    ok = result.stopped == "steps" and result.first_nonfinite is None
                    rows.append({**result.row(), "total_s": total, "advice": True, "trained_to_end": ok})
    followed = [r for r in rows if r.get("advice")]
    good = sum(r["trained_to_end"] for r in followed)
    print(f"\nfollowed advice: {good}/{len(followed)} runs trained to the end with no non-finite step")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["rnn", "deepsad", "all"], default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1, as gradguard demo)")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument(
        "--advice",
        action="store_true",
        help="instead: run the demo's pipeline per seed and follow every piece of its verified advice "
        "for the full run on every seed",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    names = ["rnn", "deepsad"] if args.scenario == "all" else [args.scenario]
    start = time.perf_counter()
    if args.advice:
        follow_advice(names, args.seeds, rows)
        print(
            f"\nadvice check: {time.perf_counter() - start:.1f} s (torch {torch.__version__}, {args.threads} threads)"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
        return 0 if all(r["trained_to_end"] for r in rows) else 1
    for name in names:
        probe(name, args.seeds, rows)
    print(
        f"\nprobe total: {time.perf_counter() - start:.1f} s (torch {torch.__version__}, {args.threads} threads)"
    )
    # the demo's own configurations on one seed: what `gradguard demo` costs
    demo_names = {c.name for c in rnn.configs()} | {c.name for c in deepsad.configs()}
    seed0 = [r for r in rows if r["seed"] == args.seeds[0]]
    demo_rows = [r for r in seed0 if r["config"] in demo_names or r["config"].endswith("(recommended)")]
    print(f"demo configurations on seed {args.seeds[0]}: {sum(r['total_s'] for r in demo_rows):.1f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
