"""Does training succeed? Clipping rules on Pascanu-style RNN problems and the textbook LSTM recipe.

Pascanu, Mikolov & Bengio (ICML 2013) measured gradient clipping by the fraction of runs that solve
a pathological long-term-memory problem. This benchmark does the same for gradguard's clippers,
through a real :class:`gradguard.Guard` in the training loop (``guard.step(loss)`` where a user
calls ``optimizer.step()``):

* **adding**: a sequence of (value ~ U(0, 1), marker) pairs; the target is the sum of the two
  marked values (one marker in the first half, one in the second). MSE; predicting the mean
  (1.0) gives 1/6. Target: held-out MSE ≤ 0.04.
* **order** (temporal order): one-hot symbols, distractors from 4 symbols, and two of X/Y at a
  position in ``[0.1T, 0.2T)`` and one in ``[0.5T, 0.6T)``; the class is the ordered pair (4
  classes). Target: held-out accuracy ≥ 0.95 (chance: 0.25).
* **lstm**: the textbook recipe (Zaremba et al. 2014): a character-level LSTM language model
  (with a projection, as in ``gradguard demo rnn``, smaller) trained by truncated BPTT with plain SGD,
  the loss summed over the unrolled steps. Target: held-out bits/char ≤ ``LSTM_TARGET``.

Each (task, length) is a *group*. In a group every configuration — method × learning rate ×
seed — gets the same data stream, the same initial weights (by seed) and the same step budget.
A run **succeeds** when it reaches the target (checked every ``eval_every`` steps) with no
non-finite step (a non-finite loss or gradient norm ends the run as a failure). Plain SGD
(no momentum) over a grid of learning rates.

Methods: ``none``; the fixed-threshold grid ``norm:k``; ``auto`` (gradguard's default);
``autoclip`` (AutoClip, p = 10); ``zclip``. "best fixed" is the one fixed threshold chosen after
the fact per group (the one with the most successes in that group: a hindsight oracle a user
does not have). ``auto-v1`` (``--with-old``) is the previous ``auto`` (ZClip capped at half the
first norm, not learning-rate aware), for comparison.

``with recovery``: the methods of ``--recovery`` again with the guard's explosion recovery
(:data:`RECOVERY_OPTION`; left out, with a note, on a Guard without it).

Every run is independent (its own seed, data and model), so ``--jobs N`` runs them in N forked
processes of one thread each; the results do not depend on N.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pascanu.py            # full (see the README), 2 processes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pascanu.py --jobs 1   # the same runs in this process
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pascanu.py --quick    # seconds: a smoke check
    .venv/bin/python benchmarks/pascanu.py --json out.json --methods none,auto,norm:1
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import multiprocessing
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradguard
from gradguard.clip import Auto

#: The Guard keyword that turns on explosion recovery (issue 15, part B). The benchmark adds the
#: "with recovery" runs when ``gradguard.Guard`` accepts it; until then it reports them as missing.
RECOVERY_OPTION = "on_explosion"
RECOVERY_VALUE = "recover"

LSTM_TARGET = 3.6  # bits/char on held-out text (unigram entropy of the text: 4.79)


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A (task, length) group's data: ``batch(step)`` and a fixed held-out set, from ``seed``."""

    name: str
    length: int
    batch_size: int = 32
    test_size: int = 512

    def examples(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.name == "adding":
            return adding(n, self.length, gen)
        return temporal_order(n, self.length, gen)

    @property
    def inputs(self) -> int:
        return 2 if self.name == "adding" else 6

    @property
    def outputs(self) -> int:
        return 1 if self.name == "adding" else 4

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.name == "adding":
            return F.mse_loss(out.squeeze(-1), y)
        return F.cross_entropy(out, y)

    def solved(self, out: Tensor, y: Tensor) -> tuple[bool, float]:
        """(target reached, the metric): MSE ≤ 0.04 (adding), accuracy ≥ 0.95 (order)."""
        if self.name == "adding":
            mse = float(F.mse_loss(out.squeeze(-1), y))
            return mse <= 0.04, mse
        acc = float((out.argmax(-1) == y).float().mean())
        return acc >= 0.95, acc


def adding(n: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The adding problem: values U(0,1) and two markers (first half / second half); y = their sum."""
    values = torch.rand(n, length, generator=gen)
    half = max(length // 2, 1)
    first = torch.randint(0, half, (n,), generator=gen)
    second = torch.randint(half, length, (n,), generator=gen)
    markers = torch.zeros(n, length)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return torch.stack([values, markers], -1), (values * markers).sum(1)


def temporal_order(n: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The temporal-order problem: distractors from symbols 2-5; X (0) or Y (1) at one position in
    [0.1T, 0.2T) and one in [0.5T, 0.6T); the class is 2·first + second."""
    symbols = torch.randint(2, 6, (n, length), generator=gen)
    lo1, hi1 = int(0.1 * length), max(int(0.2 * length), int(0.1 * length) + 1)
    lo2, hi2 = int(0.5 * length), max(int(0.6 * length), int(0.5 * length) + 1)
    p1 = torch.randint(lo1, hi1, (n,), generator=gen)
    p2 = torch.randint(lo2, hi2, (n,), generator=gen)
    a = torch.randint(0, 2, (n,), generator=gen)
    b = torch.randint(0, 2, (n,), generator=gen)
    rows = torch.arange(n)
    symbols[rows, p1] = a
    symbols[rows, p2] = b
    return F.one_hot(symbols, 6).float(), 2 * a + b


class TanhRNN(nn.Module):
    """An Elman RNN (tanh) read out from its last hidden state; recurrent weights N(0, σ²/H)."""

    def __init__(self, inputs: int, hidden: int, outputs: int, sigma: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(inputs, hidden, batch_first=True, nonlinearity="tanh")
        self.out = nn.Linear(hidden, outputs)
        with torch.no_grad():
            nn.init.normal_(self.rnn.get_parameter("weight_hh_l0"), 0.0, sigma / math.sqrt(hidden))

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


# ----------------------------------------------------------------------------- one run
@dataclass
class Run:
    """One configuration's outcome."""

    group: str
    method: str
    lr: float
    seed: int
    recovery: bool
    success: bool
    steps: int
    reason: str  # "target", "nonfinite", "budget", "aborted"
    metric: float
    clip_rate: float
    seconds: float
    cpu_seconds: float = math.nan  # this process's CPU time in the run (absent from older files)


@dataclass
class Group:
    """A (task, length) group: how to build a run's model, data and loss."""

    name: str
    lrs: list[float]
    steps: int
    eval_every: int
    make: Callable[
        [int], tuple[nn.Module, Callable[[int], Tensor], Callable[[nn.Module], tuple[bool, float]]]
    ]
    info: dict[str, Any] = field(default_factory=dict)


def rnn_group(
    task: Task, *, hidden: int, sigma: float, lrs: list[float], steps: int, eval_every: int
) -> Group:
    """A Pascanu-style group: the same data (seed 1000 + seed) and init (seed) for every method and lr."""

    def make(
        seed: int,
    ) -> tuple[nn.Module, Callable[[int], Tensor], Callable[[nn.Module], tuple[bool, float]]]:
        torch.manual_seed(seed)
        model = TanhRNN(task.inputs, hidden, task.outputs, sigma)
        gen = torch.Generator().manual_seed(1000 + seed)
        test_x, test_y = task.examples(task.test_size, gen)
        batches = [task.examples(task.batch_size, gen) for _ in range(steps)]

        def loss_at(step: int) -> Tensor:
            x, y = batches[step]
            return task.loss(model(x), y)

        def evaluate(m: nn.Module) -> tuple[bool, float]:
            with torch.no_grad():
                return task.solved(m(test_x), test_y)

        return model, loss_at, evaluate

    info = {
        "task": task.name,
        "length": task.length,
        "hidden": hidden,
        "sigma": sigma,
        "batch": task.batch_size,
    }
    return Group(f"{task.name}-{task.length}", lrs, steps, eval_every, make, info)


def lstm_group(*, lrs: list[float], steps: int, eval_every: int, hidden: int = 64, proj: int = 32) -> Group:
    """The textbook recipe, small: char LSTM (projection) LM, truncated BPTT 35, loss summed over time."""
    from gradguard.demos.rnn import CharLSTM, corpus

    alphabet, train_ids, val_ids = corpus()
    vocab, batch, bptt = len(alphabet), 20, 35
    n_cols = len(train_ids) // batch
    streams = train_ids[: n_cols * batch].view(batch, n_cols)
    val_x, val_y = val_ids[:4000].view(-1, 200), val_ids[1:4001].view(-1, 200)

    def make(
        seed: int,
    ) -> tuple[nn.Module, Callable[[int], Tensor], Callable[[nn.Module], tuple[bool, float]]]:
        torch.manual_seed(seed)
        model = CharLSTM(vocab, 16, hidden, proj, 1, 0.1)
        state: dict[str, Any] = {"h": None}

        def loss_at(step: int) -> Tensor:
            pos = (step * bptt) % (n_cols - bptt - 1)
            if pos < bptt:
                state["h"] = None
            x, y = streams[:, pos : pos + bptt], streams[:, pos + 1 : pos + bptt + 1]
            h = state["h"]
            logits, new = model(x, None if h is None else (h[0].detach(), h[1].detach()))
            state["h"] = new
            ce = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="none").view(x.shape)
            return ce.mean(0).sum()

        def evaluate(m: nn.Module) -> tuple[bool, float]:
            with torch.no_grad():
                logits, _ = m(val_x)
                bpc = float(F.cross_entropy(logits.reshape(-1, vocab), val_y.reshape(-1))) / math.log(2)
            return bpc <= LSTM_TARGET, bpc

        return model, loss_at, evaluate

    info = {"task": "char LSTM LM", "hidden": hidden, "proj": proj, "bptt": bptt, "target_bpc": LSTM_TARGET}
    return Group("lstm", lrs, steps, eval_every, make, info)


def clipper_of(method: str) -> Any:
    """The ``clip=`` a user passes for ``method``; for comparison, ``auto-v1`` is the first auto (half
    the first norm, blind to the learning rate) ``auto-s11`` the Polyak auto without the warm-up ramp; ``trust:ETA`` auto with ``Auto(trust=ETA)``."""
    if method == "auto-v1":
        return Auto(first=0.5)
    if method == "auto-s11":
        return Auto(polyak=0.5, first=0.5)
    if method.startswith("trust:"):  # auto with the per-layer trust cap (session 13)
        return Auto(**{**Auto.SPEC, "trust": float(method.split(":")[1])})
    return method


def train(group: Group, method: str, lr: float, seed: int, recovery: bool) -> Run:
    """One configuration through a real Guard; stops at the target, a non-finite step or the budget."""
    start, cpu = time.perf_counter(), time.process_time()
    model, loss_at, evaluate = group.make(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    # with recovery: the guard rewinds explosions and rolls back non-finite steps; a run fails when
    # the guard gives up (NonFiniteError) or misses the target, not at the first non-finite step
    extra: dict[str, Any] = {RECOVERY_OPTION: RECOVERY_VALUE, "on_nonfinite": "rollback"} if recovery else {}
    guard = gradguard.Guard(
        model, optimizer, clip=clipper_of(method), locate=False, weight_every=None, **extra
    )
    fractions: list[float] = []
    guard.add_flush_callback(lambda records: fractions.extend(_fractions(records)))
    reason, metric, steps = "budget", math.nan, group.steps
    try:
        for step in range(group.steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_at(step)
            loss.backward()
            guard.step(loss)
            norm = guard.last_grad_norm
            finite = math.isfinite(float(loss.detach())) and norm is not None and math.isfinite(float(norm))
            if not finite and not recovery:
                reason, steps = "nonfinite", step + 1
                break
            if (step + 1) % group.eval_every == 0:
                ok, metric = evaluate(model)
                if ok:
                    reason, steps = "target", step + 1
                    break
    except gradguard.NonFiniteError:
        reason = "aborted"
    except Exception as e:  # a recovery still being built must not end the whole benchmark
        if not recovery:
            raise
        reason = f"error: {type(e).__name__}: {e}"[:200]
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guard.close()
    clip_rate = sum(fractions) / len(fractions) if fractions else 0.0
    return Run(
        group.name,
        method,
        lr,
        seed,
        recovery,
        reason == "target",
        steps,
        reason,
        metric,
        clip_rate,
        time.perf_counter() - start,
        time.process_time() - cpu,
    )


def _fractions(records: list[dict[str, Any]]) -> list[float]:
    """The recorded ``clip_fraction`` of each step (1.0 clipped, 0.0 not), where there is one."""
    out = []
    for rec in records:
        f = rec.get("clip_fraction")
        if isinstance(f, (int, float)) and math.isfinite(f):
            out.append(float(f))
    return out


# ----------------------------------------------------------------------------- the grid
FIXED = ["norm:0.1", "norm:0.3", "norm:1", "norm:3", "norm:10"]
METHODS = ["none", *FIXED, "auto", "autoclip", "zclip"]


def groups(quick: bool) -> list[Group]:
    """The groups of the full run, or a tiny one for ``--quick``."""
    if quick:
        return [rnn_group(Task("order", 10), hidden=32, sigma=1.0, lrs=[0.3, 3.0], steps=100, eval_every=25)]
    rnn_lrs = [0.1, 0.3, 1.0, 3.0]
    rnn = {"hidden": 32, "sigma": 1.0, "lrs": rnn_lrs, "eval_every": 25}
    return [
        rnn_group(Task("adding", 5), steps=600, **rnn),  # type: ignore[arg-type]
        rnn_group(Task("adding", 10), steps=1000, **rnn),  # type: ignore[arg-type]
        rnn_group(Task("order", 10), steps=300, **rnn),  # type: ignore[arg-type]
        rnn_group(Task("order", 20), steps=400, **rnn),  # type: ignore[arg-type]
        lstm_group(lrs=[0.25, 1.0, 4.0], steps=400, eval_every=50),
    ]


def recovery_available() -> bool:
    """Whether the Guard has the explosion-recovery option (part B of issue 15)."""
    return RECOVERY_OPTION in inspect.signature(gradguard.Guard.__init__).parameters


#: the methods also run "with recovery" by default (each one doubles a method's cost)
RECOVERY_METHODS = ["none", "auto"]


@dataclass(frozen=True)
class Cell:
    """One run to do: the group (its index in the run's groups), the method, recovery, lr and seed."""

    group: int
    method: str
    recovery: bool
    lr: float
    seed: int


def cells(gs: list[Group], methods: list[str], seeds: int, recovery: list[str]) -> list[Cell]:
    """Every run of the benchmark in the tables' order: group, method (then with recovery), lr, seed."""
    return [
        Cell(gi, method, rec, lr, seed)
        for gi, g in enumerate(gs)
        for method in methods
        for rec in ([False, True] if method in recovery else [False])
        for lr in g.lrs
        for seed in range(seeds)
    ]


#: the groups the worker processes run (set before they fork: a group's closures do not pickle)
_GROUPS: list[Group] = []


def _run_cell(cell: Cell) -> Run:
    """One cell, in this process or a forked worker (which inherits :data:`_GROUPS`)."""
    torch.set_num_threads(1)
    return train(_GROUPS[cell.group], cell.method, cell.lr, cell.seed, cell.recovery)


def run_all(
    gs: Iterable[Group],
    methods: list[str],
    seeds: int,
    recovery: list[str],
    log: Callable[[str], None],
    jobs: int = 1,
) -> list[Run]:
    """Every cell's run, in the tables' order; ``jobs`` > 1 runs cells in that many forked processes
    (each run is independent: its own seed, data and model; the results do not depend on ``jobs``)."""
    global _GROUPS
    _GROUPS = list(gs)
    todo = cells(_GROUPS, methods, seeds, recovery)
    left = Counter((c.group, c.method, c.recovery) for c in todo)  # runs still to come per table row
    wins: Counter[tuple[int, str, bool]] = Counter()
    runs: list[Run] = []
    t0 = time.perf_counter()
    with _pool(jobs) as pool:
        for cell, run in zip(todo, pool.imap(_run_cell, todo) if pool else map(_run_cell, todo)):
            runs.append(run)
            key = (cell.group, cell.method, cell.recovery)
            left[key] -= 1
            wins[key] += run.success
            if not left[key]:
                rec = " + recovery" if cell.recovery else ""
                n = sum(1 for c in todo if (c.group, c.method, c.recovery) == key)
                log(f"  {run.group} {cell.method}{rec}: {wins[key]}/{n} ({time.perf_counter() - t0:.0f} s)")
    return runs


@contextmanager
def _pool(jobs: int) -> Iterator[Any]:
    """A pool of ``jobs`` forked worker processes, or None for ``jobs`` ≤ 1 (run here)."""
    if jobs <= 1:
        yield None
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield pool


# ----------------------------------------------------------------------------- tables
def table(runs: list[Run], methods: list[str]) -> str:
    """Per group: successes per method (and per lr), the best fixed threshold after the fact; totals."""
    lines: list[str] = []
    names = list(dict.fromkeys(r.group for r in runs))
    totals: dict[str, int] = {}
    best_total, n_total = 0, 0
    for name in names:
        rs = [r for r in runs if r.group == name]
        lrs = sorted({r.lr for r in rs})
        n = len([r for r in rs if r.method == methods[0] and not r.recovery])
        n_total += n
        lines += [f"\n### {name} ({n} runs per method: {len(lrs)} learning rates × seeds)\n"]
        lines += ["| method | successes | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"]
        lines += ["|---|---|" + "---|" * len(lrs)]
        for label, sub in _columns(rs, methods):
            wins = sum(r.success for r in sub)
            totals[label] = totals.get(label, 0) + wins
            per_lr = [sum(r.success for r in sub if r.lr == lr) for lr in lrs]
            lines += [f"| {label} | {wins}/{len(sub)} | " + " | ".join(map(str, per_lr)) + " |"]
        fixed = {
            m: sum(r.success for r in rs if r.method == m and not r.recovery)
            for m in methods
            if m.startswith("norm:")
        }
        if fixed:
            best = max(fixed, key=lambda m: fixed[m])
            best_total += fixed[best]
            lines += [f"\nbest fixed after the fact: `{best}` {fixed[best]}/{n}"]
    lines += [f"\n### all groups ({n_total} runs per method)\n", "| method | successes |", "|---|---|"]
    lines += [f"| {label} | {wins}/{n_total} |" for label, wins in totals.items()]
    if any(m.startswith("norm:") for m in methods):
        lines += [f"| best fixed per group (hindsight) | {best_total}/{n_total} |"]
    return "\n".join(lines)


def _columns(rs: list[Run], methods: list[str]) -> list[tuple[str, list[Run]]]:
    out = []
    for m in methods:
        for rec in (False, True):
            sub = [r for r in rs if r.method == m and r.recovery == rec]
            if sub:
                out.append((m + (" + recovery" if rec else ""), sub))
    return out


def saved_runs(paths: list[str]) -> tuple[list[Run], list[str]]:
    """The runs of saved ``--json`` files and their methods, in the table's order."""
    runs: list[Run] = []
    for path in paths:
        with open(path) as f:
            runs += [Run(**r) for r in json.load(f)["runs"]]
    known = [*METHODS, "auto-s11", "auto-v1"]
    present = list(dict.fromkeys(r.method for r in runs))
    return runs, [m for m in known if m in present] + [m for m in present if m not in known]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one tiny group, 2 seeds: a smoke check (seconds)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 5; quick 2)")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    ap.add_argument("--groups", default=None, help="comma-separated group names (default: all)")
    ap.add_argument(
        "--recovery",
        default=",".join(RECOVERY_METHODS),
        help=f"methods also run with {RECOVERY_OPTION}={RECOVERY_VALUE!r} (default: %(default)s; '' for none)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes, each running whole runs on one thread (default 2; quick 1)",
    )
    ap.add_argument("--with-old", action="store_true", help="also run auto-v1, the previous auto")
    ap.add_argument("--json", default=None, help="write every run's outcome here")
    ap.add_argument(
        "--tables", nargs="+", default=None, help="print the tables of saved --json files (no runs)"
    )
    args = ap.parse_args(argv)
    if args.tables:
        print(table(*saved_runs(args.tables)))
        return 0
    torch.set_num_threads(1)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    if args.with_old and "auto-v1" not in methods:
        methods.insert(methods.index("auto") + 1 if "auto" in methods else len(methods), "auto-v1")
    seeds = args.seeds or (2 if args.quick else 5)
    gs = groups(args.quick)
    if args.groups:
        keep = set(args.groups.split(","))
        gs = [g for g in gs if g.name in keep]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    recovery = args.recovery.split(",") if args.recovery else []
    if recovery and not recovery_available():
        log(f"with recovery: not measured (gradguard.Guard has no {RECOVERY_OPTION!r} option yet)")
        recovery = []
    t0 = time.perf_counter()
    jobs = args.jobs or (1 if args.quick else 2)
    runs = run_all(gs, methods, seeds, recovery, log, jobs)
    print(table(runs, methods))
    cpu = sum(r.cpu_seconds for r in runs)
    print(
        f"\n{len(runs)} runs, {time.perf_counter() - t0:.0f} s wall, {cpu:.0f} CPU-s in runs, "
        f"{jobs} process(es) of one thread, torch {torch.__version__}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "groups": [{"name": g.name, "lrs": g.lrs, "steps": g.steps, **g.info} for g in gs],
                    "runs": [asdict(r) for r in runs],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
