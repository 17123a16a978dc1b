"""Memory and time of the readers (``gradguard diagnose`` and ``gradguard report``) on generated run logs.

Writes a run directory the way a guard writes one — ``meta.json``, ``metrics.jsonl`` (every step's
scalars, every layer's gradient norm every ``--layer-every`` steps, weight norms and update ratios
every ``--weight-every`` steps), ``events.jsonl`` (a spike now and then) — then runs
``gradguard diagnose --no-write`` and ``gradguard report -o FILE`` on it, each in a fresh child
process, and prints each child's peak resident set size (``resource.getrusage``, the whole
process: interpreter and imports included; on Linux ``VmHWM`` of ``/proc/self/status``, since
``ru_maxrss`` also counts the parent's RSS when it forked) and wall time. A child that only imports
the readers gives the baseline.

    python benchmarks/readers.py --steps 1000000 --layers 4       # a long run of a small model (551 MB)
    python benchmarks/readers.py --steps 3000 --layers 2500       # a wide model (447 MB)
    python benchmarks/readers.py ... --src /path/to/other/src     # the same log, another source tree
    python benchmarks/readers.py ... --keep DIR                   # write the log to DIR (reused if there)
    python benchmarks/readers.py ... --only diagnose --json out.json

The generator (:func:`generate`) needs the standard library only; tests/test_faults.py uses it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# The child: run one command of the command line, then report its own peak RSS and wall time.
CHILD = """
import json, resource, sys, time
start = time.perf_counter()
argv = sys.argv[1:]
if argv == ["import"]:
    import gradguard.cli, gradguard.diagnose, gradguard.report, plotly.graph_objects, rich.console
    code = 0
else:
    from gradguard.cli import main
    code = main(argv)
seconds = time.perf_counter() - start
try:  # Linux: this process's own high-water mark (ru_maxrss also counts the parent's RSS at fork)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"code": code, "seconds": seconds, "peak_rss": peak}), file=sys.stderr)
"""


# ------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _record(step: int, rng: random.Random, names: list[str], layers: bool, weights: bool) -> dict[str, Any]:
    """One step record, as a guard with ``clip="norm:5"`` writes it."""
    norm = 1.5 * math.exp(rng.gauss(0.0, 0.3))
    coef = min(1.0, 5.0 / norm)
    rec: dict[str, Any] = {
        "step": step,
        "loss": 2.0 / (1.0 + step / 1000.0) * (1.0 + 0.05 * rng.random()),
        "grad_norm": norm,
        "clip_coef": coef,
        "threshold": 5.0,
        "nonfinite": False,
        "loss_nonfinite": False,
        "grad_nonfinite": False,
        "grad_nan": False,
        "skipped": False,
        "spike": False,
        "amp_overflow": False,
        "loss_scale": "nan",
        "clip_fraction": 1.0 if coef < 1.0 else 0.0,
        "lr": 1e-3,
    }
    if layers:
        share = norm / math.sqrt(len(names))
        entries: dict[str, dict[str, float]] = {}
        for name in names:
            entry = {"grad_norm": share * (0.5 + rng.random())}
            if weights:
                entry["weight_norm"] = 10.0 + rng.random()
                entry["update_ratio"] = 1e-3 * (0.5 + rng.random())
            entries[name] = entry
        rec["layers"] = entries
    return rec


def generate(
    run: Path,
    steps: int,
    layers: int,
    *,
    layer_every: int = 1,
    weight_every: int = 50,
    seed: int = 0,
    closed: bool = True,
) -> Path:
    """Write a healthy run directory of ``steps`` steps and ``layers`` layers at ``run``.

    Args:
        run: the run directory (created).
        steps: step records in ``metrics.jsonl``.
        layers: layers in each per-layer entry (``0``: no per-layer numbers).
        layer_every: per-layer gradient norms every this many steps.
        weight_every: weight norms and update ratios every this many steps (on layer steps).
        seed: of the numbers.
        closed: write ``end_time`` to ``meta.json`` (a run that was closed).

    Returns:
        ``run``.
    """
    run.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = [f"blocks.{i}.mlp.fc" for i in range(layers)]
    meta: dict[str, Any] = {
        "schema_version": 1,
        "start_time": "2026-01-01T00:00:00+00:00",
        "argv": ["benchmarks/readers.py"],
        "model": f"Generated({layers} layers)",
        "optimizer": "AdamW",
        "layers": names,
        "config": {"clip": {"kind": "norm", "max_norm": 5.0}, "clip_repr": "Norm(max_norm=5.0)", "every": 50},
    }
    if closed:
        meta["end_time"] = "2026-01-02T00:00:00+00:00"
    (run / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    with open(run / "metrics.jsonl", "w") as f:
        batch: list[str] = []
        for step in range(steps):
            on_layers = bool(names) and step % layer_every == 0
            rec = _record(step, rng, names, on_layers, on_layers and step % weight_every == 0)
            batch.append(json.dumps(rec))
            if len(batch) >= 256:
                f.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            f.write("\n".join(batch) + "\n")
    with open(run / "events.jsonl", "w") as f:
        for step in range(997, steps, 997):
            f.write(json.dumps({"type": "spike", "step": step, "grad_norm": _num(9.0), "z": 4.2}) + "\n")
    return run


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------


def measure(argv: list[str], src: Path | None = None) -> dict[str, Any]:
    """Run ``gradguard <argv>`` (or ``["import"]``: the imports only) in a fresh child process;
    its peak RSS (bytes), wall time (s) and exit code."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        check=False,
    )
    try:
        return dict(json.loads(done.stderr.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        raise RuntimeError(f"the child failed (exit {done.returncode}):\n{done.stderr[-3000:]}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--layer-every", type=int, default=1)
    parser.add_argument("--weight-every", type=int, default=50)
    parser.add_argument("--keep", type=Path, default=None, help="write the log here (reused if it exists)")
    parser.add_argument(
        "--src", type=Path, default=None, help="the source tree to measure (default: installed)"
    )
    parser.add_argument("--only", choices=["diagnose", "report"], default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.keep if args.keep is not None else Path(tmp) / "run"
        if not (run / "metrics.jsonl").exists():
            start = time.perf_counter()
            generate(
                run, args.steps, args.layers, layer_every=args.layer_every, weight_every=args.weight_every
            )
            print(f"generated {run} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        size = sum((run / n).stat().st_size for n in ("meta.json", "metrics.jsonl", "events.jsonl"))
        commands = {
            "import": ["import"],
            "diagnose": ["diagnose", str(run), "--no-write"],
            "report": ["report", str(run), "-o", str(Path(tmp) / "report.html")],
        }
        rows = []
        for name, argv in commands.items():
            if args.only not in (None, name) and name != "import":
                continue
            got = measure(argv, args.src)
            rows.append({"command": name, **got})
            print(
                f"{name:9} {got['seconds']:8.1f} s  peak RSS {got['peak_rss'] / 2**20:8.0f} MiB  "
                f"({got['peak_rss'] / size:.2f}× the log)  exit {got['code']}",
                flush=True,
            )
    shape = {"steps": args.steps, "layers": args.layers, "layer_every": args.layer_every, "log_bytes": size}
    print(f"log: {args.steps} steps × {args.layers} layers, {size / 2**20:.0f} MiB")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"shape": shape, "src": str(args.src or "installed"), "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
