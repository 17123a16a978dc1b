"""CPU benchmark: the realistic scripts of tests/run_scripts/ plain against under ``gradguard run``.

Each measurement is a fresh process that imports torch (and, for ``run``, gradguard), then times
the script itself — ``runpy.run_path`` of the unmodified file, its own argument list — plain, or
inside :class:`gradguard.integrations.zerocode.ZeroCode` (what ``gradguard run`` does, without the
terminal summary and the HTML report; closing the run log is timed). The script's stdout goes to
/dev/null. Plain and guarded runs alternate (A B, B A, …) so a drift of the machine's speed falls on
both; the figure is the **median of the per-pair ratios** run / plain of the script's CPU time
(its wall time beside it: on a shared machine the CPU time is the steadier of the two; targets from issue 13:
≤ 1.3 on tiny-step scripts such as the RL loop, ≤ 1.1 on the small GPT trainer). The interpreter
and import start-up (the same in both, plus gradguard's import) are outside the timed span and
printed apart; so is the process's first full garbage collection: both children run ``gc.collect()``
right before the timed span (after ``import torch`` the first generation-2 pass walks torch's
objects, ~0.15 s once per process, and whichever run's allocations happen to trigger it inside a
0.2 s script would look 1.8× slower for it). The collections that still run inside the span are
counted and timed (``gc_s``, ``gc_full``).

Run ``python benchmarks/run_overhead.py`` (a few minutes), ``--pairs 3`` for a quick look,
``--only actor_critic`` for one script, ``--json out.json`` to keep the numbers, ``--markdown`` for
the table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parent / "tests" / "run_scripts"

#: name → (script, its arguments): long enough that the loop, not the script's set-up, dominates.
CASES: dict[str, tuple[str, list[str]]] = {
    "actor_critic": ("actor_critic.py", ["--episodes", "60"]),
    "char_gpt": ("char_gpt.py", ["--max-iters", "40", "--eval-interval", "1000"]),
    "char_gpt_amp": ("char_gpt.py", ["--max-iters", "40", "--eval-interval", "1000", "--amp"]),
    "word_lm": ("word_lm.py", ["--epochs", "6"]),
    # the same ~1.5 ms steps, 480 of them: the fixed cost of a run (the guard's construction, its
    # run directory, closing the log) spread as over any run longer than a fifth of a second
    "word_lm_480": ("word_lm.py", ["--epochs", "30"]),
    "lbfgs_sine": ("lbfgs_sine.py", ["--steps", "4"]),
    "toy_gan": ("toy_gan.py", ["--niter", "4"]),
}


def child(mode: str, script: str, args: list[str]) -> None:
    """One measurement (in its own process): print ``{"import_s", "script_s", "cpu_s", "gc_s",
    "gc_full"}`` as JSON (the script's wall and CPU seconds; the garbage collections inside it)."""
    t0 = time.perf_counter()
    import runpy

    import torch

    torch.set_num_threads(1)
    zerocode = None
    if mode == "run":
        from gradguard.integrations import zerocode
    imported = time.perf_counter() - t0
    path = SCRIPTS / script
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent))
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        with contextlib.redirect_stdout(io.StringIO()), _gc_timed() as collected:
            t1, c1 = time.perf_counter(), time.process_time()
            if zerocode is not None:
                with zerocode.ZeroCode(
                    out=Path(work) / "run", name=path.stem, live=False, scan_existing=False
                ):
                    _run(runpy, path)
            else:
                _run(runpy, path)
            elapsed, cpu = time.perf_counter() - t1, time.process_time() - c1
    print(json.dumps({"import_s": imported, "script_s": elapsed, "cpu_s": cpu, **collected}))


@contextlib.contextmanager
def _gc_timed() -> Iterator[dict[str, float]]:
    """A full collection first (outside the span), then the time and number of full collections
    the block runs (``gc_s``, ``gc_full``)."""
    gc.collect()
    got = {"gc_s": 0.0, "gc_full": 0}
    started: list[float] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            got["gc_s"] += time.perf_counter() - started.pop()
            got["gc_full"] += info["generation"] == 2

    gc.callbacks.append(note)
    try:
        yield got
    finally:
        gc.callbacks.remove(note)


def _run(runpy: object, path: Path) -> None:
    try:
        runpy.run_path(str(path), run_name="__main__")  # type: ignore[attr-defined]
    except SystemExit as e:
        if e.code not in (None, 0):
            raise


def measure(mode: str, name: str) -> dict[str, float]:
    """One child: ``plain``, ``run``, or ``base`` (``run`` importing gradguard from ``BASELINE``)."""
    script, args = CASES[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if mode == "base":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [BASELINE, env.get("PYTHONPATH")]))
        mode = "run"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, script, *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(name: str, pairs: int) -> dict[str, object]:
    """Alternating plain / run measurements of one script (one warm-up pair, not counted); with
    ``--baseline``, rounds of three (plain, run, base) in rotating order."""
    modes = MODES + (("base",) if BASELINE else ())
    got: dict[str, dict[str, list[float]]] = {
        m: {"script_s": [], "cpu_s": [], "import_s": [], "gc_s": [], "gc_full": []} for m in modes
    }
    for i in range(pairs + 1):
        order = modes[i % len(modes) :] + modes[: i % len(modes)] if BASELINE else modes[:: 1 - 2 * (i % 2)]
        once = {mode: measure(mode, name) for mode in order}
        if i == 0:
            continue
        for mode in modes:
            for key in got[mode]:
                got[mode][key].append(once[mode][key])
    row: dict[str, object] = {"script": name, "args": CASES[name][1], "pairs": pairs}
    for key, label in (("script_s", "wall"), ("cpu_s", "cpu")):
        for mode in modes[1:]:
            ratios = [r / p for r, p in zip(got[mode][key], got["plain"][key])]
            prefix = "" if mode == "run" else "base_"
            row[f"{prefix}run_{label}_s"] = statistics.median(got[mode][key])
            row[f"{prefix}{label}_ratio"] = statistics.median(ratios)
            row[f"{prefix}{label}_ratio_range"] = (min(ratios), max(ratios))
        row[f"plain_{label}_s"] = statistics.median(got["plain"][key])
    for mode in MODES:
        row[f"{mode}_gc_s"] = statistics.median(got[mode]["gc_s"])
        row[f"{mode}_gc_full"] = max(got[mode]["gc_full"])
    row["import_extra_s"] = statistics.median(got["run"]["import_s"]) - statistics.median(
        got["plain"]["import_s"]
    )
    return row


MODES = ("plain", "run")
BASELINE = ""  # --baseline: a gradguard source tree (its ``src``) the ``base`` children import


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| script | arguments | plain CPU (s) | `run` CPU (s) | CPU ratio, median (min–max) | wall ratio, median (min–max) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cpu_lo, cpu_hi = r["cpu_ratio_range"]  # type: ignore[misc]
        wall_lo, wall_hi = r["wall_ratio_range"]  # type: ignore[misc]
        lines.append(
            f"| `{CASES[str(r['script'])][0]}` | `{' '.join(r['args'])}` | {r['plain_cpu_s']:.2f} "  # type: ignore[arg-type]
            f"| {r['run_cpu_s']:.2f} | **{r['cpu_ratio']:.2f}** ({cpu_lo:.2f}–{cpu_hi:.2f}) "
            f"| {r['wall_ratio']:.2f} ({wall_lo:.2f}–{wall_hi:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7, help="counted plain/run pairs per script")
    parser.add_argument("--only", action="append", choices=sorted(CASES), help="only these scripts")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument(
        "--baseline",
        default="",
        help="also time `run` importing gradguard from this src directory (before/after)",
    )
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global BASELINE
    BASELINE = str(Path(args.baseline).resolve()) if args.baseline else ""
    if args.child:
        child(args.child[0], args.child[1], args.child[2:])
        return
    rows = []
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    for name in args.only or list(CASES):
        row = bench(name, args.pairs)
        rows.append(row)
        print(
            f"{name:14s} cpu plain {row['plain_cpu_s']:6.2f}s run {row['run_cpu_s']:6.2f}s "
            f"ratio {row['cpu_ratio']:.3f} {row['cpu_ratio_range']}  wall ratio {row['wall_ratio']:.3f}  "
            f"import +{row['import_extra_s']:.2f}s  full GCs in span plain {row['plain_gc_full']} run {row['run_gc_full']}"
            + (
                f"  | baseline ratio {row['base_cpu_ratio']:.3f} {row['base_cpu_ratio_range']}"
                if BASELINE
                else ""
            ),
            flush=True,
        )
    if args.markdown:
        print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
