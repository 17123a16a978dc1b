"""Locating the first non-finite value: gradguard against ``torch.autograd.detect_anomaly`` and a
hook-per-module detector (fairseq NanDetector style), on the fault corpus (tests/faults/*.py).

For each script, each tool runs the unmodified script and gives its answer:

* **gradguard**: the script under :class:`gradguard.integrations.zerocode.ZeroCode` (what
  ``gradguard run`` does); the answer is the run log's first ``nonfinite`` event. The time to
  localize is the time the guard spent in its anomaly path (replay) on that step.
* **detect_anomaly**: the script inside ``torch.autograd.detect_anomaly()``; the answer is the
  autograd node named by its error (phase ``backward``, op from the node's name, no module). It
  never sees inf, nor anything that does not make a backward NaN.
* **hooks**: global module forward hooks and full-backward hooks that read every module's outputs
  and gradients on the host; the answer is the first module whose output (``forward``) or input
  gradient (``backward``) is non-finite (no op).

Accuracy is counted per field of the script's ``EXPECTED`` (phase, module, op; an explosion counts
as right only when the tool says ``cause: explosion``). Overhead: the per-step time of a healthy
training step (the 4-block GPT of benchmarks/clip.py on a batch of 8×64 tokens) with each tool
always on, over the same step without it, as the median of interleaved pair ratios; for gradguard:
a guarded step with ``locate=True`` over the same guarded step with ``locate=False``.

Run ``python benchmarks/locate.py`` (about 2 minutes), ``--json out.json``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import io
import itertools
import json
import os
import re
import runpy
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip import GPT
from gradguard.errors import NonFiniteError
from gradguard.guard import Guard
from gradguard.integrations.zerocode import ZeroCode
from gradguard.locate import node_op_name
from gradguard.runlog import read_run

FAULTS = Path(__file__).resolve().parent.parent / "tests" / "faults"
FIELDS = ("phase", "module", "op")


def expected_of(script: Path) -> dict[str, Any]:
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXPECTED":
            return ast.literal_eval(node.value)
    raise ValueError(script)


def run_quiet(script: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_path(str(script), run_name="__main__")


# ----------------------------------------------------------------------------- the tools
STEP_TIMES: dict[str, float] = {}


def with_gradguard(script: Path) -> tuple[dict[str, Any] | None, float]:
    """The answer, and the time spent locating it; the script's median step time goes to STEP_TIMES."""
    spent: list[float] = []
    starts: list[float] = []
    original, before = Guard._locate, Guard.before_step

    def timed(self: Guard, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    def stamped(self: Guard, *args: Any, **kwargs: Any) -> Any:
        starts.append(time.perf_counter())
        return before(self, *args, **kwargs)

    Guard._locate, Guard.before_step = timed, stamped  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with contextlib.suppress(NonFiniteError), ZeroCode(out=Path(tmp) / "run", every=10):
                run_quiet(script)
            event = read_run(Path(tmp) / "run").first_nonfinite()
    finally:
        Guard._locate, Guard.before_step = original, before  # type: ignore[method-assign]
    deltas = [b - a for a, b in itertools.pairwise(starts)]
    STEP_TIMES[script.stem] = statistics.median(deltas) if deltas else float("nan")
    return event, (spent[0] if spent else float("nan"))


def with_detect_anomaly(script: Path) -> tuple[dict[str, Any] | None, float]:
    t0 = time.perf_counter()
    try:
        with torch.autograd.detect_anomaly():
            run_quiet(script)
    except RuntimeError as e:
        m = re.search(r"Function '(\w+)' returned nan", str(e))
        if m:
            return {
                "phase": "backward",
                "module": None,
                "op": node_op_name(m.group(1)),
                "kind": "nan",
            }, time.perf_counter() - t0
        return {"error": str(e)[:80]}, time.perf_counter() - t0
    return None, time.perf_counter() - t0


class HookDetector:
    """fairseq-NanDetector-style: every module's outputs and input gradients read on the host."""

    def __init__(self) -> None:
        self.found: dict[str, Any] | None = None
        self.names: dict[int, str] = {}
        self.handles: list[Any] = []
        self.depth = 0

    def _name(self, m: nn.Module) -> str:
        return self.names.get(id(m), type(m).__name__)

    @staticmethod
    def _bad(x: Any) -> str | None:
        for t in x if isinstance(x, (tuple, list)) else (x,):
            if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return "nan" if bool(torch.isnan(t).any()) else "inf"
        return None

    def pre(self, m: nn.Module, args: Any) -> None:
        if self.depth == 0 and id(m) not in self.names:  # a root: name its modules as named_modules() does
            self.names.update({id(mod): name for name, mod in m.named_modules()})
        self.depth += 1

    def forward(self, m: nn.Module, args: Any, out: Any) -> None:
        self.depth = max(0, self.depth - 1)
        kind = self._bad(out)
        if kind and self.found is None:
            self.found = {"phase": "forward", "module": self._name(m), "op": None, "kind": kind}

    def backward(self, m: nn.Module, grad_in: Any, grad_out: Any) -> None:
        kind = self._bad(grad_in)
        if kind and self.found is None:
            self.found = {"phase": "backward", "module": self._name(m), "op": None, "kind": kind}

    def __enter__(self) -> HookDetector:
        from torch.nn.modules.module import (
            register_module_forward_hook,
            register_module_forward_pre_hook,
            register_module_full_backward_hook,
        )

        self.handles = [
            register_module_forward_pre_hook(self.pre),
            register_module_forward_hook(self.forward),
            register_module_full_backward_hook(self.backward),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def with_hooks(script: Path) -> tuple[dict[str, Any] | None, float]:
    det = HookDetector()
    t0 = time.perf_counter()
    try:
        with det:
            run_quiet(script)
    except Exception as e:  # full backward hooks break in-place ops on module outputs
        return {"error": type(e).__name__}, time.perf_counter() - t0
    return det.found, time.perf_counter() - t0


def score(expected: dict[str, Any], got: dict[str, Any] | None) -> dict[str, bool]:
    if "cause" in expected:
        ok = got is not None and got.get("cause") == expected["cause"]
        return dict.fromkeys(FIELDS, ok)
    return {f: got is not None and got.get(f) == expected.get(f) for f in FIELDS}


# ----------------------------------------------------------------------------- overhead
def overhead(pairs: int) -> dict[str, float]:
    """Median pair ratios of a healthy GPT step with each tool on, over the step without it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 1280, (8, 65), generator=g)

    def make(locate: bool | None = None) -> Callable[[], None]:
        torch.manual_seed(0)
        model = GPT()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        guard = Guard(model, opt, clip="norm:1", locate=locate) if locate is not None else None

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, 1280), idx[:, 1:].reshape(-1))
            loss.backward()
            if guard is None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            else:
                guard.step(loss)

        return step

    plain = make()
    variants: dict[str, tuple[Callable[[], None], Callable[[], None], Callable[[], Any]]] = {
        "gradguard locate (guarded step, locate on / off)": (make(True), make(False), contextlib.nullcontext),
        "detect_anomaly (plain step, on / off)": (plain, plain, torch.autograd.detect_anomaly),
        "hooks per module (plain step, on / off)": (plain, plain, HookDetector),
    }
    out = {}
    for name, (with_tool, without, ctx) in variants.items():
        for _ in range(3):
            with ctx():
                with_tool()
            without()
        ratios = []
        gc.disable()
        try:
            for i in range(pairs):
                order = [True, False] if i % 2 == 0 else [False, True]
                t = {}
                for on in order:
                    t0 = time.perf_counter()
                    if on:
                        with ctx():
                            with_tool()
                    else:
                        without()
                    t[on] = time.perf_counter() - t0
                ratios.append(t[True] / t[False])
        finally:
            gc.enable()
        out[name] = statistics.median(ratios)
    # one step's time, for the "localize within 5× a step" comparison
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        plain()
        times.append(time.perf_counter() - t0)
    out["gpt step (s)"] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tools = {"gradguard": with_gradguard, "detect_anomaly": with_detect_anomaly, "hooks": with_hooks}
    rows = []
    totals = {t: dict.fromkeys(FIELDS, 0) for t in tools}
    scripts = sorted(FAULTS.glob("*.py"))
    for script in scripts:
        expected = expected_of(script)
        row: dict[str, Any] = {"script": script.stem, "expected": expected}
        for tool, fn in tools.items():
            got, seconds = fn(script)
            s = score(expected, got)
            for f in FIELDS:
                totals[tool][f] += s[f]
            row[tool] = {
                "answer": got and {k: got.get(k) for k in ("phase", "module", "op", "kind", "cause")},
                "ok": s,
                "seconds": seconds,
            }
        rows.append(row)
        print(
            f"{script.stem:24s} "
            + "  ".join(f"{t}: {''.join('✓' if row[t]['ok'][f] else '·' for f in FIELDS)}" for t in tools),
            flush=True,
        )
    n = len(scripts)
    print(f"\naccuracy over {n} scripts (phase / module / op):")
    for tool in tools:
        print(f"  {tool:15s} " + " / ".join(f"{totals[tool][f]}/{n}" for f in FIELDS))
    locate_times = [
        r["gradguard"]["seconds"] for r in rows if r["gradguard"]["seconds"] == r["gradguard"]["seconds"]
    ]
    in_steps = [
        r["gradguard"]["seconds"] / STEP_TIMES[r["script"]]
        for r in rows
        if r["gradguard"]["seconds"] == r["gradguard"]["seconds"] and STEP_TIMES.get(r["script"], 0) > 0
    ]
    for r in rows:
        r["step_seconds"] = STEP_TIMES.get(r["script"])
    over = overhead(args.pairs)
    print("\nalways-on overhead (median of pair ratios, healthy GPT step):")
    for k, v in over.items():
        print(f"  {k}: {v:.3f}")
    print(f"gradguard time to localize (replay) per script: median {1e3 * statistics.median(locate_times):.1f} ms, "
          f"max {1e3 * max(locate_times):.1f} ms; in steps of that script: median {statistics.median(in_steps):.1f}, "
          f"max {max(in_steps):.1f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "totals": totals, "overhead": over}, indent=2, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
