"""CPU benchmark: the guard's fixed per-step cost in instructions, which no other process moves.

``fixed_cost.py`` times twin steps; on a shared 2-core machine its ratios move by ~2 % from hour to
hour and a pair's IQR spans ±7 %, the size of the targets themselves (≤ 1.15 at ``mlp2x32``, ≤ 1.05
at ``mlp4x256``). This benchmark counts what the CPU executes instead: each part of a plain and a
guarded step runs under Valgrind's callgrind, which counts instructions, not time
(a whole process: two runs within ~3,000 of 10¹⁰; a part's mean: within ~0.3 % between runs).
The count leaves out caches and branch prediction: at ``mlp2x32`` the guard's share of a step's time
is ~2–4× its share of the instructions (benchmarks/README.md, session 18).

The parts (``fixed_cost.py``'s twins: ``depth`` hidden ``Linear`` + ReLU layers, a batch of 32,
AdamW ``foreach``, the guard's defaults with ``clip``; a third twin guarded with ``locate=False``):

* ``plain fwd+bwd``, ``clip_grad_norm_``, ``plain opt.step``: the plain loop's step;
* ``guarded fwd+bwd``: the same forward and backward under locate's capture (its hooks, the RNG read,
  the gradient keeper); ``guard.step``: all the rest of the guarded step (measure, plan, decide, the
  optimizer step, the record; the flush every 50 steps and the weight norms every 50 are in the
  average, as in a run);
* the same two of the ``locate=False`` twin: the capture's share is the difference.

Each part runs through its own C function of ``itertools`` / ``functools`` (none runs inside a
step otherwise), whose inclusive count callgrind reports: the part's instructions, with ~1–3
thousand of the trampoline's own. Reported per step (the mean over ``--steps`` steps after a
warm-up of 30), with whole-step ratios.

Run ``OMP_NUM_THREADS=1 python benchmarks/instructions.py`` (needs ``valgrind`` and
``callgrind_annotate``; about 3 minutes a case and clip on 2 cores, two at a time), ``--cases``,
``--clip``, ``--steps``, ``--baseline DIR`` (an older tree's ``src`` directory, the parent of its
``gradguard``: the same parts counted for it, in a process of its own), ``--log`` (the guards write
a run log, as under ``gradguard run``: the flush then also encodes and writes its records).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

#: part → the C function it runs under (its name in callgrind's report)
PARTS = {
    "plain fwd+bwd": "starmap_next",
    "clip_grad_norm_": "filterfalse_next",
    "plain opt.step": "functools_reduce",
    "guarded fwd+bwd": "takewhile_next",
    "guard.step": "dropwhile_next",
    "locate=False fwd+bwd": "groupby_next",
    "locate=False guard.step": "accumulate_next",
}


def _under(c_function: str, fn: Callable[[], Any]) -> None:
    """Run ``fn`` once inside ``c_function`` (see :data:`PARTS`)."""
    if c_function == "starmap_next":
        list(itertools.starmap(fn, [()]))
    elif c_function == "filterfalse_next":
        list(itertools.filterfalse(lambda _: fn() or True, [None]))
    elif c_function == "functools_reduce":
        functools.reduce(lambda a, b: fn(), [0, 0])
    elif c_function == "takewhile_next":
        list(itertools.takewhile(lambda _: fn() or False, [None]))
    elif c_function == "dropwhile_next":
        list(itertools.dropwhile(lambda _: fn() or False, [None]))
    elif c_function == "groupby_next":
        list(itertools.groupby([None], key=lambda _: fn()))
    elif c_function == "accumulate_next":
        list(itertools.accumulate([0, 0], lambda a, b: fn()))
    else:
        raise ValueError(c_function)


def child(case: str, clip: str, steps: int, log: bool = False) -> None:
    """The counted process: the three twins' parts, ``steps`` rounds after a warm-up; ``log``: the
    guards write a run log (what ``gradguard run`` and ``log_dir=`` pay at each flush)."""
    import torch

    sys.path.insert(0, HERE)
    from fixed_cost import _Twin

    torch.set_num_threads(1)
    logs = [{"log_dir": tempfile.mkdtemp(prefix="instructions-")} if log else {} for _ in range(2)]
    twin = _Twin(case, "foreach", clip, **logs[0])
    off = _Twin(case, "foreach", clip, locate=False, **logs[1])
    for _ in range(30):
        twin.plain()
        twin.guarded()
        off.guarded()
    losses: dict[str, Any] = {}

    def backward(name: str, t: Any) -> Callable[[], None]:
        return lambda: losses.__setitem__(name, t.backward(t.guard_model, t.guard_opt))

    calls = {
        "plain fwd+bwd": lambda: twin.backward(twin.plain_model, twin.plain_opt),
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(twin.plain_model.parameters(), 1.0),
        "plain opt.step": twin.plain_opt.step,
        "guarded fwd+bwd": backward("guard", twin),
        "guard.step": lambda: twin.guard.step(losses["guard"]),
        "locate=False fwd+bwd": backward("off", off),
        "locate=False guard.step": lambda: off.guard.step(losses["off"]),
    }
    for _ in range(steps):
        for name, fn in calls.items():
            _under(PARTS[name], fn)


def count(src: str, case: str, clip: str, steps: int, log: bool = False) -> dict[str, float]:
    """Instructions per step of each part, for the tree whose package is under ``src``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        env = {**os.environ, "PYTHONPATH": src, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        cmd += [os.path.abspath(__file__), "--child", case, clip, str(steps), "log" if log else "nolog"]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"the counted run failed ({' '.join(cmd)}):\n{run.stderr[-2000:]}")
        report = subprocess.run(
            ["callgrind_annotate", "--threshold=100", "--inclusive=yes", out],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return parse(report, steps)


def parse(report: str, steps: int) -> dict[str, float]:
    """Each part's instructions per step from ``callgrind_annotate --inclusive=yes``'s report."""
    found: dict[str, float] = {}
    for name, fn in PARTS.items():
        m = re.search(rf"^\s*([\d,]+) \([^)]*\)\s+\S*:{fn} \[", report, re.MULTILINE)
        if m is None:
            raise SystemExit(f"callgrind_annotate did not report {fn} (the part {name!r})")
        found[name] = int(m.group(1).replace(",", "")) / steps
    return found


def summary(parts: dict[str, float]) -> dict[str, float]:
    plain = parts["plain fwd+bwd"] + parts["clip_grad_norm_"] + parts["plain opt.step"]
    guard = parts["guarded fwd+bwd"] + parts["guard.step"]
    off = parts["locate=False fwd+bwd"] + parts["locate=False guard.step"]
    return {
        "plain step": plain,
        "guarded step": guard,
        "guarded / plain": guard / plain,
        "locate=False / plain": off / plain,
        "capture (guarded − locate=False fwd+bwd)": parts["guarded fwd+bwd"] - parts["locate=False fwd+bwd"],
        "guard.step − (clip_grad_norm_ + opt.step)": parts["guard.step"]
        - parts["clip_grad_norm_"]
        - parts["plain opt.step"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("CASE", "CLIP", "STEPS", "LOG"), help=argparse.SUPPRESS)
    ap.add_argument("--cases", nargs="+", default=["mlp2x32", "mlp4x256"])
    ap.add_argument("--clip", nargs="+", default=["norm:1", "auto"])
    ap.add_argument(
        "--steps", type=int, default=100, help="counted steps (the flush and weight-norm steps among them)"
    )
    ap.add_argument("--baseline", default=None, metavar="DIR", help="an older tree's src directory")
    ap.add_argument(
        "--log", action="store_true", help="the guards write a run log (its flush writes records)"
    )
    args = ap.parse_args()
    if args.child:
        case, clip, steps, log = args.child
        child(case, clip, int(steps), log == "log")
        return
    missing = [tool for tool in ("valgrind", "callgrind_annotate") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"instructions.py needs {' and '.join(missing)} on PATH (apt-get install valgrind)")
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "gradguard", "guard.py")):
        raise SystemExit(
            f"--baseline {args.baseline!r}: no gradguard/guard.py under it (give the tree's src directory)"
        )
    trees = {"this": SRC, **({"baseline": args.baseline} if args.baseline else {})}
    jobs = [(tree, case, clip) for case in args.cases for clip in args.clip for tree in trees]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        counted = dict(
            zip(jobs, pool.map(lambda j: count(trees[j[0]], j[1], j[2], args.steps, args.log), jobs))
        )
    logged = ", the guards writing a run log" if args.log else ""
    print(f"instructions per step (thousands), mean of {args.steps} steps; callgrind, one thread{logged}\n")
    names = list(PARTS) + list(summary(counted[jobs[0]]))
    header = [f"{case} `{clip}` {tree}" for tree, case, clip in jobs]
    print("| part | " + " | ".join(header) + " |")
    print("|---|" + "---:|" * len(jobs))
    for name in names:
        cells = []
        for job in jobs:
            value = {**counted[job], **summary(counted[job])}[name]
            cells.append(f"{value:.3f}" if "/" in name and "−" not in name else f"{value / 1e3:,.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
